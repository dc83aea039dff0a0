// services/load_service.h: dserve.internal.v1.WorkerLoad, shared by every
// worker: each Watch call gets a LoadReport at once and then one per
// interval, from a snapshot function the worker provides. One publisher
// thread serves every watcher; a watcher whose previous report is still
// being written skips a tick instead of queueing.
#ifndef DSERVE_SERVICES_LOAD_SERVICE_H_
#define DSERVE_SERVICES_LOAD_SERVICE_H_

#include <functional>
#include <thread>

#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dserve/internal/v1/worker.grpc.pb.h"

namespace dserve::services {

class LoadReportService final : public internal::v1::WorkerLoad::CallbackService {
 public:
  // `snapshot` is called on the publisher thread; it must be thread-safe.
  LoadReportService(std::function<internal::v1::LoadReport()> snapshot, absl::Duration interval);
  ~LoadReportService() override;  // ends every watch and joins the publisher

  // Stop ends every watch (and refuses new ones) with UNAVAILABLE, so a
  // draining server is not held open by its watchers. Idempotent.
  void Stop();

  grpc::ServerWriteReactor<internal::v1::LoadReport>* Watch(
      grpc::CallbackServerContext* context, const internal::v1::WatchLoadRequest* request) override;

  class Watcher;

 private:
  void Publish();

  const std::function<internal::v1::LoadReport()> snapshot_;
  const absl::Duration interval_;
  absl::Mutex mu_;
  absl::flat_hash_set<Watcher*> watchers_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  std::thread publisher_;

  friend class Watcher;
};

}  // namespace dserve::services

#endif  // DSERVE_SERVICES_LOAD_SERVICE_H_
