// prefill/prefill_service.cc: the Prefill RPC.
#include "prefill/prefill_service.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "services/runtime.h"
#include "services/worker_common.h"

namespace dserve::prefill {
namespace {

// PrefillCall: one Prefill call. The scheduler's completion and gRPC's
// cancellation meet under the shared state's mutex; whichever comes first
// finishes the call, and the reactor deletes itself in OnDone.
class PrefillCall final : public grpc::ServerUnaryReactor {
 public:
  PrefillCall(PrefillScheduler* scheduler, const grpc::CallbackServerContext& context,
              const internal::v1::PrefillRequest& request,
              internal::v1::PrefillResponse* response)
      : scheduler_(scheduler), state_(std::make_shared<State>()) {
    state_->call = this;
    auto target = kvtransfer::ParseLeaseTarget(request.kv_target());
    if (!target.ok()) {
      absl::MutexLock lock(&state_->mu);
      FinishLocked(services::ToGrpcStatus(absl::InvalidArgumentError(
          absl::StrCat("kv_target: ", target.status().message()))));
      return;
    }
    PrefillJob job;
    job.request_id = request.request_id();
    job.request.prompt.assign(request.prompt().begin(), request.prompt().end());
    job.request.sampling = services::SamplingFromProto(request.sampling());
    job.target = std::move(target).value();
    job.deadline = absl::FromChrono(context.deadline());
    std::shared_ptr<State> state = state_;
    handle_ = scheduler_->Submit(
        std::move(job), [state, response](absl::StatusOr<PrefillResult> result) {
          absl::MutexLock lock(&state->mu);
          if (state->call == nullptr) return;
          if (!result.ok()) {
            state->call->FinishLocked(services::ToGrpcStatus(result.status()));
            return;
          }
          response->set_first_token(result->first_token);
          response->set_first_logprob(result->first_logprob);
          services::ToProtoDuration(result->queue_time, response->mutable_queue_time());
          services::ToProtoDuration(result->compute_time, response->mutable_compute_time());
          services::ToProtoDuration(result->transfer_tail_time,
                                    response->mutable_transfer_tail_time());
          response->set_kv_bytes(result->kv_bytes);
          state->call->FinishLocked(grpc::Status::OK);
        });
  }

  void OnCancel() override {
    scheduler_->Cancel(handle_);
    absl::MutexLock lock(&state_->mu);
    FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "prefill call cancelled"));
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&state_->mu);
      state_->call = nullptr;
    }
    delete this;
  }

 private:
  struct State {
    absl::Mutex mu;
    PrefillCall* call ABSL_GUARDED_BY(mu) = nullptr;
  };

  void FinishLocked(const grpc::Status& status) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  PrefillScheduler* const scheduler_;
  std::shared_ptr<State> state_;
  uint64_t handle_ = 0;
  bool finished_ = false;  // guarded by state_->mu
};

}  // namespace

grpc::ServerUnaryReactor* PrefillService::Prefill(grpc::CallbackServerContext* context,
                                                  const internal::v1::PrefillRequest* request,
                                                  internal::v1::PrefillResponse* response) {
  return new PrefillCall(scheduler_, *context, *request, response);
}

}  // namespace dserve::prefill
