// engine/kv_cache.h: the paged KV cache. It stores the MLA latent of every
// token (kv_lora_rank normalized latent values followed by qk_rope_head_dim
// rotated key values) per layer, in fixed-size blocks drawn from one pool.
//
// Memory layout of the pool (float32): [layer][block][slot][width]. One
// (layer, block) is contiguous, and a layer's blocks are contiguous in block
// id order, so a run of consecutive block ids is one contiguous range per
// layer (what a KV transfer coalesces).
#ifndef DSERVE_ENGINE_KV_CACHE_H_
#define DSERVE_ENGINE_KV_CACHE_H_

#include <cstdint>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dserve::engine {

using KvBlockId = int32_t;
using TokenId = int32_t;

// KvCacheLayout: the shape of a pool.
struct KvCacheLayout {
  int64_t num_layers = 0;
  int64_t num_blocks = 0;
  int64_t block_tokens = 16;  // tokens per block
  int64_t token_width = 0;    // floats per token per layer

  int64_t BlockFloats() const { return block_tokens * token_width; }
  int64_t LayerStrideFloats() const { return num_blocks * BlockFloats(); }
  int64_t BytesPerToken() const {
    return num_layers * token_width * static_cast<int64_t>(sizeof(float));
  }
  int64_t TotalBytes() const {
    return num_layers * LayerStrideFloats() * static_cast<int64_t>(sizeof(float));
  }
};

// KvBlockPool: owns the cache memory and the free list. Accounting is exact:
// num_free() + num_used() == num_blocks() at all times, a block is handed out
// at most once until freed, and freeing a block that is not allocated is
// refused (never corrupts the free list).
//
// Thread-compatible: the owner (one scheduler thread) serializes calls.
class KvBlockPool {
 public:
  // The pool allocates its memory, or uses `memory` (layout.TotalBytes(),
  // float-aligned, owned by the caller and outliving the pool: e.g. memory
  // registered with a KV transport so peers can write blocks directly).
  explicit KvBlockPool(const KvCacheLayout& layout, float* memory = nullptr);
  KvBlockPool(const KvBlockPool&) = delete;
  KvBlockPool& operator=(const KvBlockPool&) = delete;

  const KvCacheLayout& layout() const { return layout_; }
  int64_t num_blocks() const { return layout_.num_blocks; }
  int64_t num_free() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used() const { return num_blocks() - num_free(); }

  // Allocate hands out `n` blocks, or RESOURCE_EXHAUSTED (allocating nothing)
  // when fewer than n are free.
  absl::StatusOr<std::vector<KvBlockId>> Allocate(int64_t n);
  // Free returns blocks to the pool. INVALID_ARGUMENT, freeing nothing, if
  // any id is out of range, not allocated, or repeated.
  absl::Status Free(std::span<const KvBlockId> blocks);
  bool IsAllocated(KvBlockId block) const;

  // Slot returns the `width` floats of token `slot` of `block` in `layer`.
  float* Slot(int64_t layer, KvBlockId block, int64_t slot) {
    return data_ + ((layer * layout_.num_blocks + block) * layout_.block_tokens + slot) *
                              layout_.token_width;
  }
  const float* Slot(int64_t layer, KvBlockId block, int64_t slot) const {
    return const_cast<KvBlockPool*>(this)->Slot(layer, block, slot);
  }
  float* data() { return data_; }
  const float* data() const { return data_; }

 private:
  KvCacheLayout layout_;
  std::vector<float> owned_;  // empty when the memory is the caller's
  float* data_;
  std::vector<KvBlockId> free_;     // stack; top is handed out next
  std::vector<uint8_t> allocated_;  // per block
};

// HashKvBlock: the content hash naming a full block: xxh64 over the parent
// block's hash and the block's token ids. Equal hashes mean equal prefixes
// (up to 64-bit collisions), which prefix caching and KV transfer rely on.
uint64_t HashKvBlock(uint64_t parent_hash, std::span<const TokenId> tokens);

// BlockTable: the blocks of one sequence, in position order, with the
// content hash of each full block.
class BlockTable {
 public:
  const std::vector<KvBlockId>& blocks() const { return blocks_; }
  const std::vector<uint64_t>& full_block_hashes() const { return hashes_; }
  int64_t capacity_tokens(int64_t block_tokens) const {
    return static_cast<int64_t>(blocks_.size()) * block_tokens;
  }
  KvBlockId BlockOf(int64_t position, int64_t block_tokens) const {
    return blocks_[position / block_tokens];
  }

  // Assign takes `blocks` (allocated from the pool by the caller, in position
  // order) into an empty table, e.g. blocks a peer has filled with KV.
  void Assign(std::vector<KvBlockId> blocks);
  // EnsureCapacity allocates blocks from `pool` until `num_tokens` fit.
  // On RESOURCE_EXHAUSTED nothing is allocated.
  absl::Status EnsureCapacity(KvBlockPool& pool, int64_t num_tokens);
  // UpdateHashes hashes every block that `tokens` (the sequence so far, of
  // which the first `num_computed` have KV) now fills completely.
  void UpdateHashes(std::span<const TokenId> tokens, int64_t num_computed, int64_t block_tokens);
  // Release returns every block to `pool` and empties the table.
  absl::Status Release(KvBlockPool& pool);

 private:
  std::vector<KvBlockId> blocks_;
  std::vector<uint64_t> hashes_;
};

}  // namespace dserve::engine

#endif  // DSERVE_ENGINE_KV_CACHE_H_
