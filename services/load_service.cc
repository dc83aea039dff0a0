// services/load_service.cc: the load report stream.
#include "services/load_service.h"

namespace dserve::services {

using internal::v1::LoadReport;

// Watcher: one Watch call. Registered with the service until OnDone; all
// its state is guarded by the service's mutex.
class LoadReportService::Watcher final : public grpc::ServerWriteReactor<LoadReport> {
 public:
  explicit Watcher(LoadReportService* service) : service_(service) {}

  // SendLocked writes `report` unless a write is in flight or it finished.
  void SendLocked(const LoadReport& report) ABSL_EXCLUSIVE_LOCKS_REQUIRED(service_->mu_) {
    if (writing_ || finished_) return;
    report_ = report;
    writing_ = true;
    StartWrite(&report_);
  }
  void FinishLocked(grpc::Status status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(service_->mu_) {
    if (finished_) return;
    finished_ = true;
    Finish(std::move(status));
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&service_->mu_);
    writing_ = false;
    if (!ok) FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "load watch write failed"));
  }
  void OnCancel() override {
    absl::MutexLock lock(&service_->mu_);
    FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "load watch cancelled"));
  }
  void OnDone() override {
    {
      absl::MutexLock lock(&service_->mu_);
      service_->watchers_.erase(this);
    }
    delete this;
  }

 private:
  LoadReportService* const service_;
  LoadReport report_;
  bool writing_ = false;
  bool finished_ = false;
};

LoadReportService::LoadReportService(std::function<LoadReport()> snapshot,
                                     absl::Duration interval)
    : snapshot_(std::move(snapshot)), interval_(interval) {
  publisher_ = std::thread([this] { Publish(); });
}

LoadReportService::~LoadReportService() {
  Stop();
  publisher_.join();
}

void LoadReportService::Stop() {
  absl::MutexLock lock(&mu_);
  stop_ = true;
  for (Watcher* w : watchers_) {
    w->FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker stopping"));
  }
}

grpc::ServerWriteReactor<LoadReport>* LoadReportService::Watch(
    grpc::CallbackServerContext* /*context*/, const internal::v1::WatchLoadRequest* /*request*/) {
  auto* watcher = new Watcher(this);
  const LoadReport report = snapshot_();
  absl::MutexLock lock(&mu_);
  watchers_.insert(watcher);
  if (stop_) {
    watcher->FinishLocked(grpc::Status(grpc::StatusCode::UNAVAILABLE, "worker stopping"));
  } else {
    watcher->SendLocked(report);
  }
  return watcher;
}

void LoadReportService::Publish() {
  absl::MutexLock lock(&mu_);
  while (!stop_) {
    mu_.AwaitWithTimeout(absl::Condition(&stop_), interval_);
    if (stop_ || watchers_.empty()) continue;
    mu_.Unlock();
    const LoadReport report = snapshot_();
    mu_.Lock();
    for (Watcher* w : watchers_) w->SendLocked(report);
  }
}

}  // namespace dserve::services
