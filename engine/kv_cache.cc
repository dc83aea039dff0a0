// engine/kv_cache.cc: block pool accounting and block hashing.
#include "engine/kv_cache.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "xxhash.h"

namespace dserve::engine {

KvBlockPool::KvBlockPool(const KvCacheLayout& layout, float* memory)
    : layout_(layout),
      owned_(memory ? 0 : static_cast<size_t>(layout.num_layers * layout.LayerStrideFloats())),
      data_(memory ? memory : owned_.data()),
      allocated_(static_cast<size_t>(layout.num_blocks), 0) {
  free_.reserve(layout.num_blocks);
  // Hand out low ids first, so fresh sequences get contiguous runs.
  for (int64_t b = layout.num_blocks - 1; b >= 0; --b) {
    free_.push_back(static_cast<KvBlockId>(b));
  }
}

absl::StatusOr<std::vector<KvBlockId>> KvBlockPool::Allocate(int64_t n) {
  if (n < 0) return absl::InvalidArgumentError(absl::StrCat("cannot allocate ", n, " blocks"));
  if (n > num_free()) {
    return absl::ResourceExhaustedError(absl::StrCat("KV cache full: ", n, " blocks needed, ",
                                                     num_free(), " of ", num_blocks(), " free"));
  }
  std::vector<KvBlockId> out(free_.end() - n, free_.end());
  std::reverse(out.begin(), out.end());
  free_.resize(free_.size() - n);
  for (KvBlockId b : out) allocated_[b] = 1;
  return out;
}

bool KvBlockPool::IsAllocated(KvBlockId block) const {
  return block >= 0 && block < num_blocks() && allocated_[block];
}

absl::Status KvBlockPool::Free(std::span<const KvBlockId> blocks) {
  std::vector<KvBlockId> sorted(blocks.begin(), blocks.end());
  std::sort(sorted.begin(), sorted.end());
  for (size_t i = 0; i < sorted.size(); ++i) {
    if (!IsAllocated(sorted[i]) || (i > 0 && sorted[i] == sorted[i - 1])) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot free KV block ", sorted[i], ": ",
                       sorted[i] < 0 || sorted[i] >= num_blocks()
                           ? absl::StrCat("out of range [0, ", num_blocks(), ")")
                           : "not allocated or freed twice"));
    }
  }
  // Push in reverse so the lowest id is handed out first again.
  for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
    allocated_[*it] = 0;
    free_.push_back(*it);
  }
  return absl::OkStatus();
}

uint64_t HashKvBlock(uint64_t parent_hash, std::span<const TokenId> tokens) {
  XXH64_state_t* state = XXH64_createState();
  XXH64_reset(state, 0x6473657276654b56ULL);  // "dserveKV"
  XXH64_update(state, &parent_hash, sizeof(parent_hash));
  XXH64_update(state, tokens.data(), tokens.size_bytes());
  uint64_t h = XXH64_digest(state);
  XXH64_freeState(state);
  return h;
}

void BlockTable::Assign(std::vector<KvBlockId> blocks) {
  blocks_ = std::move(blocks);
  hashes_.clear();
}

absl::Status BlockTable::EnsureCapacity(KvBlockPool& pool, int64_t num_tokens) {
  const int64_t bt = pool.layout().block_tokens;
  const int64_t needed = (num_tokens + bt - 1) / bt - static_cast<int64_t>(blocks_.size());
  if (needed <= 0) return absl::OkStatus();
  auto fresh = pool.Allocate(needed);
  if (!fresh.ok()) return fresh.status();
  blocks_.insert(blocks_.end(), fresh->begin(), fresh->end());
  return absl::OkStatus();
}

void BlockTable::UpdateHashes(std::span<const TokenId> tokens, int64_t num_computed,
                              int64_t block_tokens) {
  const int64_t full = std::min<int64_t>(num_computed / block_tokens, blocks_.size());
  while (static_cast<int64_t>(hashes_.size()) < full) {
    const int64_t b = static_cast<int64_t>(hashes_.size());
    uint64_t parent = hashes_.empty() ? 0 : hashes_.back();
    hashes_.push_back(HashKvBlock(parent, tokens.subspan(b * block_tokens, block_tokens)));
  }
}

absl::Status BlockTable::Release(KvBlockPool& pool) {
  absl::Status s = pool.Free(blocks_);
  blocks_.clear();
  hashes_.clear();
  return s;
}

}  // namespace dserve::engine
