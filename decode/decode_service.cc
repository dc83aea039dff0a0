// decode/decode_service.cc: the Decode RPCs.
#include "decode/decode_service.h"

#include <deque>
#include <memory>

#include "absl/synchronization/mutex.h"
#include "services/runtime.h"
#include "services/worker_common.h"

namespace dserve::decode {
namespace {

using internal::v1::DecodeResponse;

// DecodeStream: one Decode call. The scheduler's sink and gRPC's reactions
// meet under `mu_`; the reactor deletes itself in OnDone, after which the
// sink (which may still be called once) finds `alive_` false.
class DecodeStream final : public grpc::ServerWriteReactor<DecodeResponse> {
 public:
  DecodeStream(DecodeScheduler* scheduler, const internal::v1::DecodeRequest& request)
      : scheduler_(scheduler), state_(std::make_shared<State>()) {
    state_->stream = this;
    DecodeJob job;
    job.request_id = request.request_id();
    job.reservation_id = request.reservation_id();
    job.request.prompt.assign(request.prompt().begin(), request.prompt().end());
    job.request.sampling = services::SamplingFromProto(request.sampling());
    job.first_token = request.first_token();
    std::shared_ptr<State> state = state_;
    handle_ = scheduler_->Start(std::move(job), [state](DecodeEvent event) {
      absl::MutexLock lock(&state->mu);
      if (state->stream == nullptr) return;
      state->pending.push_back(std::move(event));
      state->stream->MaybeWriteLocked();
    });
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&state_->mu);
    writing_ = false;
    if (!ok) {  // the client is gone
      FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "stream write failed"));
      scheduler_->Cancel(handle_);
      return;
    }
    MaybeWriteLocked();
  }

  void OnCancel() override {
    scheduler_->Cancel(handle_);
    absl::MutexLock lock(&state_->mu);
    FinishLocked(grpc::Status(grpc::StatusCode::CANCELLED, "decode call cancelled"));
  }

  void OnDone() override {
    {
      absl::MutexLock lock(&state_->mu);
      state_->stream = nullptr;
    }
    delete this;
  }

 private:
  struct State {
    absl::Mutex mu;
    std::deque<DecodeEvent> pending ABSL_GUARDED_BY(mu);
    DecodeStream* stream ABSL_GUARDED_BY(mu) = nullptr;
  };

  // MaybeWriteLocked sends everything pending as one message when no write
  // is in flight; a final event finishes the call.
  void MaybeWriteLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_->mu) {
    if (writing_ || finished_ || state_->pending.empty()) return;
    response_.Clear();
    std::optional<DecodeEvent> last;
    while (!state_->pending.empty()) {
      DecodeEvent& e = state_->pending.front();
      if (!e.status.ok()) {
        if (response_.token_ids_size() == 0) {
          FinishLocked(services::ToGrpcStatus(e.status));
          return;
        }
        break;  // send the tokens first; the error goes after
      }
      response_.mutable_token_ids()->Add(e.tokens.begin(), e.tokens.end());
      response_.mutable_logprobs()->Add(e.logprobs.begin(), e.logprobs.end());
      if (e.finish != engine::FinishReason::kNone) {
        response_.set_finish_reason(services::FinishReasonToProto(e.finish));
        state_->pending.clear();
        finished_ = true;
        StartWriteAndFinish(&response_, grpc::WriteOptions(), grpc::Status::OK);
        return;
      }
      state_->pending.pop_front();
    }
    writing_ = true;
    StartWrite(&response_);
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(state_->mu) {
    if (finished_) return;
    finished_ = true;
    Finish(status);
  }

  DecodeScheduler* const scheduler_;
  std::shared_ptr<State> state_;
  uint64_t handle_ = 0;
  DecodeResponse response_;
  bool writing_ = false;   // guarded by state_->mu
  bool finished_ = false;  // guarded by state_->mu
};

}  // namespace

grpc::ServerUnaryReactor* DecodeService::Reserve(grpc::CallbackServerContext* context,
                                                 const internal::v1::ReserveRequest* request,
                                                 internal::v1::ReserveResponse* response) {
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  scheduler_->Reserve(request->request_id(), request->prompt_tokens(), request->max_tokens(),
                      [reactor, response](absl::StatusOr<Reservation> reservation) {
                        if (!reservation.ok()) {
                          reactor->Finish(services::ToGrpcStatus(reservation.status()));
                          return;
                        }
                        response->set_reservation_id(reservation->id);
                        response->set_kv_target(
                            kvtransfer::SerializeLeaseTarget(reservation->target));
                        reactor->Finish(grpc::Status::OK);
                      });
  return reactor;
}

grpc::ServerWriteReactor<DecodeResponse>* DecodeService::Decode(
    grpc::CallbackServerContext* /*context*/, const internal::v1::DecodeRequest* request) {
  return new DecodeStream(scheduler_, *request);
}

grpc::ServerUnaryReactor* DecodeService::Release(grpc::CallbackServerContext* context,
                                                 const internal::v1::ReleaseRequest* request,
                                                 internal::v1::ReleaseResponse* /*response*/) {
  scheduler_->Release(request->reservation_id());
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace dserve::decode
