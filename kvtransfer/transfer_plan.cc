// kvtransfer/transfer_plan.cc: request validation, copy planning with
// coalescing, and the memcpy executor.
#include "kvtransfer/transfer_plan.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "base/status_macros.h"

namespace dserve::kvtransfer {
namespace {

// Field: the name of a layout field in error messages, e.g.
// "dst_layout.block_stride_bytes".
std::string Field(absl::string_view side, absl::string_view name) {
  return absl::StrCat(side, "_layout.", name);
}

absl::Status RequirePositive(absl::string_view side, absl::string_view name, int64_t value) {
  if (value > 0) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(Field(side, name), " must be positive, got ", value));
}

absl::Status RequireNonNegative(absl::string_view side, absl::string_view name, int64_t value) {
  if (value >= 0) {
    return absl::OkStatus();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(Field(side, name), " must not be negative, got ", value));
}

}  // namespace

// ValidateKvPoolLayout checks one side's layout on its own: sizes, the extent
// of the addressed bytes against pool_bytes (in overflow-checked int64), and
// that strides nest so no two (layer, block) byte ranges overlap.
absl::Status ValidateKvPoolLayout(absl::string_view side, const KvPoolLayout& l) {
  DSERVE_RETURN_IF_ERROR(RequirePositive(side, "num_layers", l.num_layers));
  DSERVE_RETURN_IF_ERROR(RequirePositive(side, "num_blocks", l.num_blocks));
  DSERVE_RETURN_IF_ERROR(RequirePositive(side, "block_tokens", l.block_tokens));
  DSERVE_RETURN_IF_ERROR(
      RequirePositive(side, "bytes_per_token_per_layer", l.bytes_per_token_per_layer));
  DSERVE_RETURN_IF_ERROR(RequireNonNegative(side, "layer_stride_bytes", l.layer_stride_bytes));
  DSERVE_RETURN_IF_ERROR(RequireNonNegative(side, "block_stride_bytes", l.block_stride_bytes));
  DSERVE_RETURN_IF_ERROR(RequireNonNegative(side, "base_offset_bytes", l.base_offset_bytes));

  // The last byte addressed: base + (L-1)*layer_stride + (B-1)*block_stride
  // + one block.
  int64_t block_bytes = 0, layers_span = 0, blocks_span = 0, end = 0;
  if (__builtin_mul_overflow(l.block_tokens, l.bytes_per_token_per_layer, &block_bytes) ||
      __builtin_mul_overflow(l.num_layers - 1, l.layer_stride_bytes, &layers_span) ||
      __builtin_mul_overflow(l.num_blocks - 1, l.block_stride_bytes, &blocks_span) ||
      __builtin_add_overflow(l.base_offset_bytes, layers_span, &end) ||
      __builtin_add_overflow(end, blocks_span, &end) ||
      __builtin_add_overflow(end, block_bytes, &end)) {
    return absl::InvalidArgumentError(
        absl::StrCat(side, "_layout: the byte range it addresses overflows int64"));
  }
  if (end > l.pool_bytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        Field(side, "pool_bytes"), " is ", l.pool_bytes, " but the layout addresses ", end,
        " bytes (base_offset_bytes ", l.base_offset_bytes, " + ", end - l.base_offset_bytes, ")"));
  }

  // Strides nest: the smaller stride must clear one block, the larger one
  // everything the smaller one spans. A dimension of size 1 has no stride.
  struct Dim {
    absl::string_view name;
    int64_t stride;
    int64_t count;
  };
  std::vector<Dim> dims;
  if (l.num_layers > 1) {
    dims.push_back({"layer_stride_bytes", l.layer_stride_bytes, l.num_layers});
  }
  if (l.num_blocks > 1) {
    dims.push_back({"block_stride_bytes", l.block_stride_bytes, l.num_blocks});
  }
  std::sort(dims.begin(), dims.end(),
            [](const Dim& a, const Dim& b) { return a.stride < b.stride; });
  int64_t spanned = block_bytes;  // <= end, so nothing below overflows
  for (const Dim& d : dims) {
    if (d.stride < spanned) {
      return absl::InvalidArgumentError(absl::StrCat(Field(side, d.name), " is ", d.stride,
                                                     " but must be at least ", spanned,
                                                     " bytes, or (layer, block) ranges overlap"));
    }
    spanned += d.stride * (d.count - 1);
  }
  return absl::OkStatus();
}

namespace {

// ValidateBlocks checks one side's block table: ids in range, enough blocks
// for tokens [first_token, end_token), and (for the destination) no id twice.
absl::Status ValidateBlocks(absl::string_view side, std::span<const KvBlockId> blocks,
                            const KvPoolLayout& l, int64_t first_token, int64_t end_token,
                            bool require_unique) {
  const auto field = absl::StrCat(side, "_blocks");
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (blocks[i] < 0 || blocks[i] >= l.num_blocks) {
      return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "] is ", blocks[i],
                                                     ", outside [0, ", l.num_blocks, ") (",
                                                     Field(side, "num_blocks"), ")"));
    }
  }
  // end_token > 0 here, so this is ceil(end_token / block_tokens).
  const int64_t needed = (end_token - 1) / l.block_tokens + 1;
  if (static_cast<int64_t>(blocks.size()) < needed) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " has ", blocks.size(), " blocks of ", l.block_tokens,
                     " tokens, but tokens [", first_token, ", ", end_token, ") need ", needed));
  }
  if (require_unique) {
    absl::flat_hash_map<KvBlockId, size_t> first_index;
    first_index.reserve(blocks.size());
    for (size_t i = 0; i < blocks.size(); ++i) {
      auto [it, inserted] = first_index.try_emplace(blocks[i], i);
      if (!inserted) {
        return absl::InvalidArgumentError(absl::StrCat(field, "[", i, "] repeats block ", blocks[i],
                                                       " of ", field, "[", it->second, "]"));
      }
    }
  }
  return absl::OkStatus();
}

// ValidateRequest checks everything MakeTransferPlan relies on.
absl::Status ValidateRequest(const KvTransferRequest& r, LayerRange* layers, int64_t* end_token) {
  if (r.num_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("num_tokens must be positive, got ", r.num_tokens));
  }
  if (r.first_token < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("first_token must not be negative, got ", r.first_token));
  }
  if (__builtin_add_overflow(r.first_token, r.num_tokens, end_token)) {
    return absl::InvalidArgumentError(absl::StrCat("first_token ", r.first_token, " + num_tokens ",
                                                   r.num_tokens, " overflows int64"));
  }
  DSERVE_RETURN_IF_ERROR(ValidateKvPoolLayout("src", r.src_layout));
  DSERVE_RETURN_IF_ERROR(ValidateKvPoolLayout("dst", r.dst_layout));
  if (r.src_layout.num_layers != r.dst_layout.num_layers) {
    return absl::InvalidArgumentError(absl::StrCat(
        "layouts disagree on num_layers: src_layout.num_layers is ", r.src_layout.num_layers,
        ", dst_layout.num_layers is ", r.dst_layout.num_layers));
  }
  if (r.src_layout.bytes_per_token_per_layer != r.dst_layout.bytes_per_token_per_layer) {
    return absl::InvalidArgumentError(
        absl::StrCat("layouts disagree on bytes_per_token_per_layer: src_layout has ",
                     r.src_layout.bytes_per_token_per_layer, ", dst_layout has ",
                     r.dst_layout.bytes_per_token_per_layer));
  }
  const int64_t num_layers = r.src_layout.num_layers;
  *layers = r.layers.value_or(LayerRange{0, num_layers});
  if (layers->first < 0 || layers->first >= num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layers.first is ", layers->first,
                                                   ", outside [0, ", num_layers, ") (num_layers)"));
  }
  if (layers->last <= layers->first || layers->last > num_layers) {
    return absl::InvalidArgumentError(absl::StrCat("layers.last is ", layers->last, ", outside [",
                                                   layers->first + 1, ", ", num_layers,
                                                   "] (layers.first + 1 to num_layers)"));
  }
  DSERVE_RETURN_IF_ERROR(ValidateBlocks("src", r.src_blocks, r.src_layout, r.first_token,
                                        *end_token, /*require_unique=*/false));
  DSERVE_RETURN_IF_ERROR(ValidateBlocks("dst", r.dst_blocks, r.dst_layout, r.first_token,
                                        *end_token, /*require_unique=*/true));
  return absl::OkStatus();
}

// UnstridedLayout: `shape`'s sizes, strides still to be chosen.
KvPoolLayout UnstridedLayout(const KvPoolShape& shape) {
  KvPoolLayout l;
  l.num_layers = shape.num_layers;
  l.num_blocks = shape.num_blocks;
  l.block_tokens = shape.block_tokens;
  l.bytes_per_token_per_layer = shape.bytes_per_token_per_layer;
  return l;
}

}  // namespace

KvPoolLayout LayerMajorLayout(const KvPoolShape& shape) {
  KvPoolLayout l = UnstridedLayout(shape);
  l.block_stride_bytes = shape.block_tokens * shape.bytes_per_token_per_layer;
  l.layer_stride_bytes = shape.num_blocks * l.block_stride_bytes;
  l.pool_bytes = shape.num_layers * l.layer_stride_bytes;
  return l;
}

KvPoolLayout BlockMajorLayout(const KvPoolShape& shape) {
  KvPoolLayout l = UnstridedLayout(shape);
  l.layer_stride_bytes = shape.block_tokens * shape.bytes_per_token_per_layer;
  l.block_stride_bytes = shape.num_layers * l.layer_stride_bytes;
  l.pool_bytes = shape.num_blocks * l.block_stride_bytes;
  return l;
}

TransferPlanStats TransferPlan::Stats() const {
  TransferPlanStats s;
  s.num_layers = static_cast<int64_t>(layers.size());
  s.min_ops_per_layer = layers.empty() ? 0 : std::numeric_limits<int64_t>::max();
  for (const KvLayerPlan& layer : layers) {
    const auto ops = static_cast<int64_t>(layer.ops.size());
    s.num_ops += ops;
    s.bytes += layer.bytes;
    s.min_ops_per_layer = std::min(s.min_ops_per_layer, ops);
    s.max_ops_per_layer = std::max(s.max_ops_per_layer, ops);
  }
  return s;
}

absl::StatusOr<TransferPlan> MakeTransferPlan(const KvTransferRequest& request) {
  LayerRange layers;
  int64_t end_token = 0;
  DSERVE_RETURN_IF_ERROR(ValidateRequest(request, &layers, &end_token));
  const KvPoolLayout& src = request.src_layout;
  const KvPoolLayout& dst = request.dst_layout;
  const int64_t token_bytes = src.bytes_per_token_per_layer;

  // Layer 0's copies. Every layer has the same ones shifted by
  // layer * layer_stride_bytes on each side, so contiguity (and hence
  // coalescing) is the same in every layer. Each step takes the tokens from
  // `t` to the nearer of the two current blocks' ends.
  std::vector<KvCopyOp> ops;
  for (int64_t t = request.first_token; t < end_token;) {
    const int64_t src_slot = t % src.block_tokens;
    const int64_t dst_slot = t % dst.block_tokens;
    const int64_t n =
        std::min({src.block_tokens - src_slot, dst.block_tokens - dst_slot, end_token - t});
    const KvCopyOp op{
        .src_offset = src.base_offset_bytes +
                      request.src_blocks[t / src.block_tokens] * src.block_stride_bytes +
                      src_slot * token_bytes,
        .dst_offset = dst.base_offset_bytes +
                      request.dst_blocks[t / dst.block_tokens] * dst.block_stride_bytes +
                      dst_slot * token_bytes,
        .bytes = n * token_bytes,
    };
    if (!ops.empty() && ops.back().src_offset + ops.back().bytes == op.src_offset &&
        ops.back().dst_offset + ops.back().bytes == op.dst_offset) {
      ops.back().bytes += op.bytes;
    } else {
      ops.push_back(op);
    }
    t += n;
  }

  TransferPlan plan;
  plan.layers.reserve(layers.last - layers.first);
  for (int64_t layer = layers.first; layer < layers.last; ++layer) {
    KvLayerPlan& lp = plan.layers.emplace_back();
    lp.layer = layer;
    lp.bytes = request.num_tokens * token_bytes;
    lp.ops = ops;
    for (KvCopyOp& op : lp.ops) {
      op.src_offset += layer * src.layer_stride_bytes;
      op.dst_offset += layer * dst.layer_stride_bytes;
    }
  }
  return plan;
}

void ApplyPlan(const TransferPlan& plan, const uint8_t* src_base, uint8_t* dst_base) {
  for (const KvLayerPlan& layer : plan.layers) {
    for (const KvCopyOp& op : layer.ops) {
      std::memcpy(dst_base + op.dst_offset, src_base + op.src_offset,
                  static_cast<size_t>(op.bytes));
    }
  }
}

absl::Status CopyKv(const KvTransferRequest& request, const uint8_t* src_base, uint8_t* dst_base) {
  DSERVE_ASSIGN_OR_RETURN(const TransferPlan plan, MakeTransferPlan(request));
  ApplyPlan(plan, src_base, dst_base);
  return absl::OkStatus();
}

}  // namespace dserve::kvtransfer
