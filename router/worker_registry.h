// router/worker_registry.h: the router's view of its workers. Workers come
// from the RouterConfig's groups (static addresses, or a DNS name re-resolved
// on an interval); for each the registry keeps a gRPC channel, checks
// grpc.health.v1 on an interval, and follows the worker's WorkerLoad.Watch
// stream, reconnecting with backoff. Snapshot() turns all of it into the
// plain ClusterView that placement policies read.
#ifndef DSERVE_ROUTER_WORKER_REGISTRY_H_
#define DSERVE_ROUTER_WORKER_REGISTRY_H_

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dserve/config/v1/config.pb.h"
#include "dserve/internal/v1/worker.pb.h"
#include "grpcpp/grpcpp.h"
#include "router/policy.h"

namespace dserve::router {

// WorkerRegistryOptions: timings of the registry's background work.
struct WorkerRegistryOptions {
  absl::Duration health_check_interval = absl::Milliseconds(500);
  // Deadline of one health check; a worker that misses it is unhealthy.
  absl::Duration health_check_timeout = absl::Milliseconds(500);
  absl::Duration watch_backoff_initial = absl::Milliseconds(50);
  absl::Duration watch_backoff_max = absl::Seconds(2);
};

// WorkerRegistry: thread-safe. Background work runs on one maintenance thread
// (DNS, health checks issued as callback calls) and one thread per worker
// for its load stream; the destructor stops and joins all of it.
class WorkerRegistry {
 public:
  // Create validates the groups (INVALID_ARGUMENT naming the field), adds
  // the static addresses and starts the background work. Health and load
  // arrive asynchronously: a fresh registry has no usable worker until the
  // first health check answers and the first load report arrives.
  static absl::StatusOr<std::unique_ptr<WorkerRegistry>> Create(
      const config::v1::RouterConfig& config, WorkerRegistryOptions options);
  ~WorkerRegistry();
  WorkerRegistry(const WorkerRegistry&) = delete;
  WorkerRegistry& operator=(const WorkerRegistry&) = delete;

  // Snapshot returns every known worker with the router's unreported
  // charges added. A worker is `healthy` in the view only when its last
  // health check passed and its load stream is up with a report.
  ClusterView Snapshot() const;

  // Channel returns the channel to worker `id`, or null when it is not (or
  // no longer) known. The channel stays valid while the caller holds it.
  std::shared_ptr<grpc::Channel> Channel(const std::string& id) const;

  // Charge records load the router has placed on `worker` that its reports
  // do not show yet (KV blocks committed on a decode worker, prompt tokens
  // queued on a prefill worker), so that a burst of placements spreads
  // instead of piling onto the worker that looked emptiest. Returns a charge
  // id for Settle.
  uint64_t Charge(const std::string& worker, int64_t kv_blocks, int64_t prefill_tokens);
  // Settle ends a charge. `worker_has_it`: the worker accepted the work, so
  // its next reports include it; the charge is dropped after two more
  // reports (one may have been on the wire already). Otherwise it is
  // dropped now. Unknown ids are ignored.
  void Settle(uint64_t charge, bool worker_has_it);

  // ReportUnavailable marks `worker` unhealthy after a call to it failed
  // with UNAVAILABLE; its next passing health check restores it.
  void ReportUnavailable(const std::string& worker);

  // SetChangeListener installs `listener` (replacing any), called without
  // the registry's lock after every load report, health change and
  // membership change. Pass null to remove it; returns once no call to the
  // old listener is running.
  void SetChangeListener(std::function<void()> listener);

  // WaitUntil blocks until `predicate(Snapshot())` holds or `deadline`
  // passes; returns whether it held. For start-up and tests.
  bool WaitUntil(const std::function<bool(const ClusterView&)>& predicate, absl::Time deadline);

 private:
  struct Worker;
  struct Group {
    std::string field;  // "prefill_workers" / "decode_workers"
    WorkerRole role;    // the role its workers are expected to report
    std::string dns_name;
    absl::Duration resolve_interval;
    absl::Time next_resolve;
    std::vector<std::string> members;  // addresses currently in the group
  };
  struct ChargeEntry {
    std::string worker;
    int64_t kv_blocks = 0;
    int64_t prefill_tokens = 0;
    std::optional<uint64_t> drop_at_report;  // drop once report_seq reaches it
  };

  explicit WorkerRegistry(WorkerRegistryOptions options);
  void AddWorkerLocked(const std::string& address, WorkerRole expected)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // RemoveWorkerLocked stops the worker's background work; the thread to
  // join is returned and must be joined without the lock.
  std::thread RemoveWorkerLocked(const std::string& address) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void MaintenanceLoop();
  void ResolveGroup(Group& group, std::vector<std::thread>& to_join)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void StartHealthCheckLocked(const std::shared_ptr<Worker>& worker)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void WatchLoop(std::shared_ptr<Worker> worker);
  void OnReport(Worker& worker, const internal::v1::LoadReport& report);
  void NotifyChange();

  const WorkerRegistryOptions options_;
  mutable absl::Mutex mu_;
  std::vector<Group> groups_ ABSL_GUARDED_BY(mu_);
  std::map<std::string, std::shared_ptr<Worker>> workers_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, ChargeEntry> charges_ ABSL_GUARDED_BY(mu_);
  uint64_t next_charge_ ABSL_GUARDED_BY(mu_) = 1;
  uint64_t version_ ABSL_GUARDED_BY(mu_) = 0;  // bumped on every change
  int health_checks_in_flight_ ABSL_GUARDED_BY(mu_) = 0;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::thread maintenance_;

  absl::Mutex listener_mu_;  // held while the listener runs
  std::function<void()> listener_ ABSL_GUARDED_BY(listener_mu_);
};

// ResolveHostPort resolves "host:port" (host may be a name, an IPv4 address
// or a bracketed IPv6 address) to "ip:port" strings, sorted and unique.
// INVALID_ARGUMENT when there is no port; UNAVAILABLE when resolution fails.
absl::StatusOr<std::vector<std::string>> ResolveHostPort(const std::string& host_port);

}  // namespace dserve::router

#endif  // DSERVE_ROUTER_WORKER_REGISTRY_H_
