// router/policy.h: request placement as a pure function of plain structs.
// A RoutingPolicy sees a snapshot of the workers' load (ClusterView) and a
// request's size (RequestInfo) and picks a decode worker and, for a
// disaggregated decode worker, a prefill worker. No gRPC types appear here,
// so the live router, the simulator and the tests run the same code.
#ifndef DSERVE_ROUTER_POLICY_H_
#define DSERVE_ROUTER_POLICY_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace dserve::router {

// WorkerRole: what a worker serves.
enum class WorkerRole {
  kUnknown,     // no load report yet
  kPrefill,     // Prefill
  kDecode,      // Reserve + Decode after a prefill worker's Prefill
  kAggregated,  // Decode without a reservation: runs the prompt itself
};

// WorkerView: one worker as the router last saw it, with the router's own
// not-yet-reported placements already added to the load figures.
struct WorkerView {
  std::string id;  // stable and unique: the worker's address
  std::string address;
  WorkerRole role = WorkerRole::kUnknown;
  bool healthy = false;   // answers health checks and its load stream is up
  bool draining = false;  // finishing its work; takes none
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_committed = 0;  // admitted requests' prompt + max_tokens
  int32_t kv_block_tokens = 0;
  int32_t running = 0;
  int32_t queued = 0;
  int64_t queued_prefill_tokens = 0;
};

// ClusterView: a consistent snapshot of every known worker.
struct ClusterView {
  std::vector<WorkerView> workers;
};

// RequestInfo: what placement needs to know about one request.
struct RequestInfo {
  int64_t prompt_tokens = 0;
  int64_t max_tokens = 0;
  int64_t output_length_hint = 0;  // 0: none
  int32_t priority = 0;
  // Prefill workers not to use (they failed this request already).
  std::vector<std::string> exclude_prefill;
};

// Placement: where one request runs. `prefill_worker` is empty when the
// decode worker is aggregated.
struct Placement {
  std::string decode_worker;   // WorkerView::id
  std::string prefill_worker;  // WorkerView::id, or empty
  int64_t kv_blocks = 0;       // blocks the request may grow into on the decode worker
  bool aggregated() const { return prefill_worker.empty(); }
};

// RoutingPolicy: chooses a placement. Implementations are stateless or
// internally synchronized: Place may be called from many threads.
class RoutingPolicy {
 public:
  virtual ~RoutingPolicy() = default;
  // Place returns where `request` should run, or RESOURCE_EXHAUSTED when no
  // worker can take it now (the caller may queue and try again later).
  virtual absl::StatusOr<Placement> Place(const RequestInfo& request,
                                          const ClusterView& cluster) = 0;
  virtual std::string_view name() const = 0;
};

// KvBlocksNeeded: blocks a request holds at its longest: ceil((prompt +
// max_tokens) / block_tokens).
int64_t KvBlocksNeeded(const RequestInfo& request, int32_t kv_block_tokens);

// CanEverFit: whether some usable decode or aggregated worker in `cluster`
// has enough blocks in total for `request` (so waiting may help). True when
// no worker is usable at all: workers may still come up.
bool CanEverFit(const RequestInfo& request, const ClusterView& cluster);

// HasServingPath: whether some request could be served at all: a usable
// aggregated worker, or a usable decode worker and a usable prefill worker.
bool HasServingPath(const ClusterView& cluster);

// HasUsablePrefill: whether `cluster` has a healthy, non-draining prefill
// worker that `request` does not exclude.
bool HasUsablePrefill(const RequestInfo& request, const ClusterView& cluster);

// LeastLoadedPolicy: decode = among healthy, non-draining decode or
// aggregated workers whose uncommitted blocks (total - committed) hold the
// request's whole lifetime, the one with the most uncommitted blocks, then
// the fewest running requests, then a stable hash of its id; a decode
// (non-aggregated) worker is only chosen when a prefill worker is usable.
// Prefill = the healthy, non-draining prefill worker with the fewest queued
// prefill tokens (then fewest queued requests, then the hash).
class LeastLoadedPolicy : public RoutingPolicy {
 public:
  absl::StatusOr<Placement> Place(const RequestInfo& request, const ClusterView& cluster) override;
  std::string_view name() const override { return "least-loaded"; }
};

// MakeRoutingPolicy returns the policy called `name` ("least-loaded"; empty
// means least-loaded). INVALID_ARGUMENT naming `policy` for anything else.
absl::StatusOr<std::unique_ptr<RoutingPolicy>> MakeRoutingPolicy(std::string_view name);

}  // namespace dserve::router

#endif  // DSERVE_ROUTER_POLICY_H_
