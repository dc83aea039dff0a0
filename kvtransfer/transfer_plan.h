// kvtransfer/transfer_plan.h: plans the byte copies that move a sequence's KV
// cache from one paged pool to another.
//
// A pool is described by plain numbers (KvPoolLayout): how many layers and
// blocks it has, how many tokens a block holds, and where (layer, block)
// starts in bytes. A request names the blocks of one sequence on each side,
// in token order, and which tokens and layers to move. MakeTransferPlan turns
// that into, per layer, a list of {src_offset, dst_offset, bytes} copies:
// each copy is a run of tokens contiguous on both sides, so runs of
// consecutive block ids collapse into one copy per layer, and pools with
// different block sizes (16 tokens on one side, 64 on the other) are
// converted on the fly, with no staging buffer.
//
// The plan is transport-neutral: the UCX transport turns each op into a put,
// the shared-memory path and tests run it with ApplyPlan (memcpy). Nothing
// here sees UCX, gRPC or CUDA types.
#ifndef DSERVE_KVTRANSFER_TRANSFER_PLAN_H_
#define DSERVE_KVTRANSFER_TRANSFER_PLAN_H_

#include <cstdint>
#include <optional>
#include <span>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace dserve::kvtransfer {

// KvBlockId: a block's index in its pool (the same type as engine::KvBlockId).
using KvBlockId = int32_t;

// KvPoolShape: the logical shape of a pool, from which the two standard
// layouts derive their strides. For engine::KvCacheLayout (float32):
//   {.num_layers = l.num_layers, .num_blocks = l.num_blocks,
//    .block_tokens = l.block_tokens,
//    .bytes_per_token_per_layer = l.token_width * sizeof(float)}.
struct KvPoolShape {
  int64_t num_layers = 0;
  int64_t num_blocks = 0;
  int64_t block_tokens = 0;               // tokens per block
  int64_t bytes_per_token_per_layer = 0;  // token_width * element size
};

// KvPoolLayout: where every token of every layer lives in a pool's memory.
// Token `slot` of block `b` in layer `l` occupies the
// `bytes_per_token_per_layer` bytes starting at
//   base_offset_bytes + l * layer_stride_bytes + b * block_stride_bytes
//                     + slot * bytes_per_token_per_layer,
// relative to the start of the pool's memory region, which is `pool_bytes`
// long. Tokens of one (layer, block) are contiguous. Valid layouts (checked
// by MakeTransferPlan) have positive sizes, non-negative strides and offset,
// nesting strides (no two (layer, block) ranges overlap) and every byte
// inside [0, pool_bytes).
struct KvPoolLayout {
  int64_t num_layers = 0;
  int64_t num_blocks = 0;
  int64_t block_tokens = 0;
  int64_t bytes_per_token_per_layer = 0;
  int64_t layer_stride_bytes = 0;
  int64_t block_stride_bytes = 0;
  int64_t base_offset_bytes = 0;
  int64_t pool_bytes = 0;
};

// ValidateKvPoolLayout: INVALID_ARGUMENT, naming "<side>_layout.<field>",
// unless `layout` is valid as described above.
absl::Status ValidateKvPoolLayout(absl::string_view side, const KvPoolLayout& layout);

// LayerMajorLayout: [layer][block][slot][bytes], the layout of
// engine::KvBlockPool. A run of consecutive block ids is one contiguous range
// per layer, so such runs coalesce into one copy.
KvPoolLayout LayerMajorLayout(const KvPoolShape& shape);

// BlockMajorLayout: [block][layer][slot][bytes], all layers of a block
// together. Consecutive blocks are not contiguous within a layer (when there
// is more than one layer), so each block is its own copy.
KvPoolLayout BlockMajorLayout(const KvPoolShape& shape);

// LayerRange: layers [first, last).
struct LayerRange {
  int64_t first = 0;
  int64_t last = 0;
};

// KvTransferRequest: move tokens [first_token, first_token + num_tokens) of
// one sequence, in every layer of `layers` (all layers when unset), from the
// source pool to the destination pool.
//
// `src_blocks` and `dst_blocks` are the sequence's block tables on each side:
// entry i holds the sequence's tokens [i * block_tokens, (i + 1) *
// block_tokens) of that side. Both start at token 0 of the sequence even when
// first_token > 0 (moving the tail of a running request), and may list more
// blocks than the moved tokens need. The spans are only read during
// MakeTransferPlan; the plan does not refer to them.
struct KvTransferRequest {
  KvPoolLayout src_layout;
  std::span<const KvBlockId> src_blocks;
  KvPoolLayout dst_layout;
  std::span<const KvBlockId> dst_blocks;
  int64_t num_tokens = 0;
  int64_t first_token = 0;
  std::optional<LayerRange> layers;  // layer-wise streaming sends one at a time
};

// KvCopyOp: copy `bytes` bytes from source offset `src_offset` to destination
// offset `dst_offset` (offsets relative to each pool's memory region).
struct KvCopyOp {
  int64_t src_offset = 0;
  int64_t dst_offset = 0;
  int64_t bytes = 0;

  friend bool operator==(const KvCopyOp&, const KvCopyOp&) = default;
};

// KvLayerPlan: the copies for one layer, in token order. Their destination
// ranges are disjoint, so they may run in any order or in parallel.
struct KvLayerPlan {
  int64_t layer = 0;
  int64_t bytes = 0;  // sum of ops[i].bytes: num_tokens * bytes_per_token_per_layer
  std::vector<KvCopyOp> ops;
};

// TransferPlanStats: totals over a plan, for logging and metrics.
struct TransferPlanStats {
  int64_t num_layers = 0;
  int64_t num_ops = 0;
  int64_t bytes = 0;
  int64_t min_ops_per_layer = 0;
  int64_t max_ops_per_layer = 0;
};

// TransferPlan: per layer, in increasing layer order, the copies that carry
// out one KvTransferRequest. Layers are independent: a layer-wise sender may
// issue layers[i] as soon as layer layers[i].layer is computed.
struct TransferPlan {
  std::vector<KvLayerPlan> layers;

  TransferPlanStats Stats() const;
};

// MakeTransferPlan validates `request` completely, then plans it. Returns
// INVALID_ARGUMENT, naming the offending field and its limit, when a layout
// is malformed or overflows its pool, the layouts disagree on num_layers or
// bytes_per_token_per_layer, the layer range is empty or out of bounds,
// num_tokens is not positive, first_token is negative, a block id is out of
// range, a destination block is listed twice, or either block table is too
// short for the tokens moved. Adjacent copies contiguous on both sides are
// merged, so a plan has at most (source blocks + destination blocks touched)
// ops per layer and, for consecutive ids in layer-major pools, one.
absl::StatusOr<TransferPlan> MakeTransferPlan(const KvTransferRequest& request);

// ApplyPlan runs `plan` with memcpy: for every op, copies op.bytes from
// src_base + op.src_offset to dst_base + op.dst_offset. The caller guarantees
// that `src_base` and `dst_base` point to the pools' regions of the layouts
// the plan was made from (src_layout.pool_bytes and dst_layout.pool_bytes
// long) and that the two regions do not overlap. Not thread-safe with other
// writers of the destination blocks.
void ApplyPlan(const TransferPlan& plan, const uint8_t* src_base, uint8_t* dst_base);

// CopyKv plans `request` and applies it to the given regions (the
// shared-memory fast path). On error nothing is written.
absl::Status CopyKv(const KvTransferRequest& request, const uint8_t* src_base, uint8_t* dst_base);

}  // namespace dserve::kvtransfer

#endif  // DSERVE_KVTRANSFER_TRANSFER_PLAN_H_
