// router/policy.cc: the least-loaded placement policy and the policy
// factory.
#include "router/policy.h"

#include <algorithm>
#include <tuple>

#include "absl/strings/str_cat.h"

namespace dserve::router {
namespace {

// StableHash: FNV-1a of the id, so ties break the same way in every process
// and every run.
uint64_t StableHash(std::string_view s) {
  uint64_t h = 1469598103934665603ull;
  for (unsigned char c : s) {
    h ^= c;
    h *= 1099511628211ull;
  }
  return h;
}

bool Usable(const WorkerView& w) { return w.healthy && !w.draining; }

bool IsDecodeRole(WorkerRole role) {
  return role == WorkerRole::kDecode || role == WorkerRole::kAggregated;
}

}  // namespace

int64_t KvBlocksNeeded(const RequestInfo& request, int32_t kv_block_tokens) {
  if (kv_block_tokens <= 0) return 0;
  const int64_t tokens = request.prompt_tokens + request.max_tokens;
  return (tokens + kv_block_tokens - 1) / kv_block_tokens;
}

bool CanEverFit(const RequestInfo& request, const ClusterView& cluster) {
  bool any_usable = false;
  for (const WorkerView& w : cluster.workers) {
    if (!Usable(w) || !IsDecodeRole(w.role) || w.kv_block_tokens <= 0) continue;
    any_usable = true;
    if (KvBlocksNeeded(request, w.kv_block_tokens) <= w.kv_blocks_total) return true;
  }
  return !any_usable;
}

bool HasServingPath(const ClusterView& cluster) {
  bool decode = false, prefill = false;
  for (const WorkerView& w : cluster.workers) {
    if (!Usable(w)) continue;
    if (w.role == WorkerRole::kAggregated && w.kv_block_tokens > 0) return true;
    decode |= w.role == WorkerRole::kDecode && w.kv_block_tokens > 0;
    prefill |= w.role == WorkerRole::kPrefill;
  }
  return decode && prefill;
}

bool HasUsablePrefill(const RequestInfo& request, const ClusterView& cluster) {
  for (const WorkerView& w : cluster.workers) {
    if (w.role == WorkerRole::kPrefill && Usable(w) &&
        std::find(request.exclude_prefill.begin(), request.exclude_prefill.end(), w.id) ==
            request.exclude_prefill.end()) {
      return true;
    }
  }
  return false;
}

absl::StatusOr<Placement> LeastLoadedPolicy::Place(const RequestInfo& request,
                                                   const ClusterView& cluster) {
  // Prefill first: a decode (non-aggregated) worker is useless without one.
  const WorkerView* prefill = nullptr;
  auto prefill_key = [](const WorkerView& w) {
    return std::make_tuple(w.queued_prefill_tokens, w.queued, StableHash(w.id));
  };
  for (const WorkerView& w : cluster.workers) {
    if (w.role != WorkerRole::kPrefill || !Usable(w)) continue;
    if (std::find(request.exclude_prefill.begin(), request.exclude_prefill.end(), w.id) !=
        request.exclude_prefill.end()) {
      continue;
    }
    if (prefill == nullptr || prefill_key(w) < prefill_key(*prefill)) prefill = &w;
  }

  const WorkerView* decode = nullptr;
  int64_t decode_blocks = 0;
  // Smaller key wins: most uncommitted blocks, fewest running, hash.
  auto decode_key = [](const WorkerView& w) {
    return std::make_tuple(-(w.kv_blocks_total - w.kv_blocks_committed), w.running,
                           StableHash(w.id));
  };
  int candidates = 0;
  for (const WorkerView& w : cluster.workers) {
    if (!IsDecodeRole(w.role) || !Usable(w) || w.kv_block_tokens <= 0) continue;
    if (w.role == WorkerRole::kDecode && prefill == nullptr) continue;
    ++candidates;
    const int64_t need = KvBlocksNeeded(request, w.kv_block_tokens);
    if (w.kv_blocks_total - w.kv_blocks_committed < need) continue;
    if (decode == nullptr || decode_key(w) < decode_key(*decode)) {
      decode = &w;
      decode_blocks = need;
    }
  }
  if (decode == nullptr) {
    if (candidates == 0) {
      return absl::ResourceExhaustedError(
          "no healthy decode worker (with a prefill worker) or aggregated worker is available");
    }
    return absl::ResourceExhaustedError(
        absl::StrCat("no worker has room for ", request.prompt_tokens + request.max_tokens,
                     " tokens (prompt ", request.prompt_tokens, " + max_tokens ",
                     request.max_tokens, ") among ", candidates, " candidate workers"));
  }
  Placement placement;
  placement.decode_worker = decode->id;
  placement.kv_blocks = decode_blocks;
  if (decode->role == WorkerRole::kDecode) placement.prefill_worker = prefill->id;
  return placement;
}

absl::StatusOr<std::unique_ptr<RoutingPolicy>> MakeRoutingPolicy(std::string_view name) {
  if (name.empty() || name == "least-loaded") return std::make_unique<LeastLoadedPolicy>();
  return absl::InvalidArgumentError(absl::StrCat("policy \"",
                                                 absl::string_view(name.data(), name.size()),
                                                 "\" is unknown (known: least-loaded)"));
}

}  // namespace dserve::router
