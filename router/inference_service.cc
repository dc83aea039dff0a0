// router/inference_service.cc: Generate and GetModelInfo, and the sequence
// of worker calls behind one Generate.
#include "router/inference_service.h"

#include <atomic>
#include <deque>
#include <filesystem>
#include <thread>
#include <utility>
#include <vector>

#include "absl/random/random.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/status_macros.h"
#include "dserve/internal/v1/worker.grpc.pb.h"
#include "services/runtime.h"

namespace dserve::router {
namespace {

namespace iv1 = ::dserve::internal::v1;

// Reserve is a quick bookkeeping call; a worker that does not answer within
// this is treated as unavailable rather than holding up the admission queue.
constexpr absl::Duration kReserveTimeout = absl::Seconds(10);

absl::Status Annotate(const grpc::Status& status, std::string_view what,
                      const std::string& worker) {
  absl::Status s = services::FromGrpcStatus(status);
  return absl::Status(s.code(), absl::StrCat(absl::string_view(what.data(), what.size()), " ",
                                             worker, ": ", s.message()));
}

v1::FinishReason ToPublic(iv1::FinishReason reason) {
  return reason == iv1::FINISH_REASON_LENGTH ? v1::FINISH_REASON_LENGTH : v1::FINISH_REASON_STOP;
}

const char* FinishName(v1::FinishReason reason) {
  return reason == v1::FINISH_REASON_LENGTH ? "length" : "stop";
}

}  // namespace

// GenerateReactor: the server side of one Generate stream. Responses are
// queued and written one at a time (the next starts in OnWriteDone); End
// finishes the stream once the queue is drained. Send and End may be called
// from any thread; End is the owner's last touch of the reactor, which
// deletes itself in OnDone.
class GenerateReactor final : public grpc::ServerWriteReactor<v1::GenerateResponse> {
 public:
  explicit GenerateReactor(std::shared_ptr<RequestRun> run) : run_(std::move(run)) {}

  void Send(v1::GenerateResponse response);
  void End(const grpc::Status& status);

  void OnWriteDone(bool ok) override;
  void OnCancel() override;
  void OnDone() override { delete this; }

 private:
  std::shared_ptr<RequestRun> run_;
  // No gRPC call is made while mu_ is held: a write that fails at once may
  // run OnWriteDone on the calling thread.
  absl::Mutex mu_;
  std::deque<v1::GenerateResponse> pending_ ABSL_GUARDED_BY(mu_);
  bool writing_ ABSL_GUARDED_BY(mu_) = false;
  bool broken_ ABSL_GUARDED_BY(mu_) = false;
  bool finish_requested_ ABSL_GUARDED_BY(mu_) = false;
  grpc::Status finish_status_ ABSL_GUARDED_BY(mu_);
};

// RequestRun: one Generate request's state and the thread that drives its
// worker calls. Shared by that thread and the reactor (whose OnCancel may
// come at any time).
class RequestRun {
 public:
  RequestRun(InferenceService* service, grpc::CallbackServerContext* context,
             const v1::GenerateRequest* request)
      : service_(service), context_(context), request_(request) {}

  void set_reactor(GenerateReactor* reactor) { reactor_ = reactor; }

  // Run is the request's thread: it serves the request, finishes the call,
  // and tells the service it is done.
  void Run();
  // Cancel ends every outstanding worker call and any wait for capacity;
  // the call then ends with `why` (the first reason given wins). Idempotent;
  // any thread.
  void Cancel(absl::Status why);

 private:
  // Admitted: where admission placed the request and what it holds there.
  struct Admitted {
    Placement placement;
    uint64_t decode_charge = 0;
    uint64_t prefill_charge = 0;
    uint64_t reservation_id = 0;
    std::string kv_target;
  };

  // TrackedCall: a worker call's context, registered so that Cancel reaches
  // it, with the client's deadline.
  class TrackedCall {
   public:
    TrackedCall(RequestRun* run, absl::Time deadline) : run_(run) {
      if (deadline != absl::InfiniteFuture()) context_.set_deadline(absl::ToChronoTime(deadline));
      absl::MutexLock lock(&run_->mu_);
      run_->calls_.insert(&context_);
      if (run_->cancelled_.load()) context_.TryCancel();
    }
    ~TrackedCall() {
      absl::MutexLock lock(&run_->mu_);
      run_->calls_.erase(&context_);
    }
    grpc::ClientContext* context() { return &context_; }

   private:
    RequestRun* run_;
    grpc::ClientContext context_;
  };

  absl::Status Serve();
  absl::Status TryPlace(const RequestInfo& info, Admitted* out);
  absl::Status CallPrefill(const Admitted& admitted, iv1::PrefillResponse* response);
  // RunDecode streams the decode worker's tokens to the client (after the
  // first token, when `first` is set) and sends Complete.
  absl::Status RunDecode(const Admitted& admitted, const iv1::PrefillResponse* first);
  void Release(const Admitted& admitted);
  // Emit sends tokens to the client; returns true once a stop string
  // matched (tokens after the match are dropped).
  bool Emit(const int32_t* ids, const float* logprobs, int n);
  void SendComplete(v1::FinishReason reason);
  std::shared_ptr<grpc::Channel> ChannelOrNull(const std::string& worker) const {
    return service_->registry_->Channel(worker);
  }
  void Log(std::string_view level, std::string_view msg, const services::LogFields& fields = {}) {
    services::Log(level, msg, request_id_, fields);
  }

  InferenceService* const service_;
  grpc::CallbackServerContext* const context_;
  const v1::GenerateRequest* const request_;
  GenerateReactor* reactor_ = nullptr;

  absl::Mutex mu_;
  std::set<grpc::ClientContext*> calls_ ABSL_GUARDED_BY(mu_);
  absl::Status cancel_reason_ ABSL_GUARDED_BY(mu_);
  std::atomic<bool> cancelled_{false};

  // Owned by the request's thread.
  std::string request_id_;
  absl::Time deadline_ = absl::InfiniteFuture();
  RequestPlan plan_;
  std::unique_ptr<TextStreamer> streamer_;
  int32_t completion_tokens_ = 0;
  absl::Time start_;
  // Where the time to the first token went, for Complete.timings.
  absl::Duration router_queue_;
  iv1::PrefillResponse prefill_timings_;
};

// ---- GenerateReactor --------------------------------------------------------

void GenerateReactor::Send(v1::GenerateResponse response) {
  mu_.Lock();
  if (finish_requested_ || broken_) {
    mu_.Unlock();
    return;
  }
  pending_.push_back(std::move(response));
  if (writing_) {
    mu_.Unlock();
    return;
  }
  writing_ = true;
  const v1::GenerateResponse* next = &pending_.front();
  mu_.Unlock();
  StartWrite(next);
}

void GenerateReactor::End(const grpc::Status& status) {
  mu_.Lock();
  finish_requested_ = true;
  finish_status_ = status;
  if (writing_) {  // OnWriteDone finishes once the queue is drained
    mu_.Unlock();
    return;
  }
  mu_.Unlock();
  Finish(status);
}

void GenerateReactor::OnWriteDone(bool ok) {
  mu_.Lock();
  pending_.pop_front();
  if (!ok) {  // the client is gone: nothing more can be written
    broken_ = true;
    pending_.clear();
  }
  if (!pending_.empty()) {
    const v1::GenerateResponse* next = &pending_.front();
    mu_.Unlock();
    StartWrite(next);
    return;
  }
  writing_ = false;
  if (finish_requested_) {
    const grpc::Status status = finish_status_;
    mu_.Unlock();
    Finish(status);
    return;
  }
  mu_.Unlock();
  if (!ok) run_->Cancel(absl::CancelledError("the client went away"));
}

void GenerateReactor::OnCancel() {
  run_->Cancel(absl::CancelledError("the client cancelled the request"));
}

// ---- RequestRun -------------------------------------------------------------

void RequestRun::Cancel(absl::Status why) {
  {
    absl::MutexLock lock(&mu_);
    if (!cancelled_.load()) cancel_reason_ = std::move(why);
    cancelled_.store(true);
    // Sync client calls: TryCancel runs no callbacks on this thread.
    for (grpc::ClientContext* c : calls_) c->TryCancel();
  }
  service_->admission_.Wake();
}

void RequestRun::Run() {
  start_ = absl::Now();
  absl::Status status = Serve();
  if (!status.ok() && cancelled_.load()) {
    // The worker calls failed because the request was cancelled: say why.
    absl::MutexLock lock(&mu_);
    status = absl::IsCancelled(cancel_reason_) && absl::Now() >= deadline_
                 ? absl::DeadlineExceededError("the request's deadline passed")
                 : cancel_reason_;
  }
  if (status.ok()) {
    Log("info", "request finished",
        {{"completion_tokens", absl::StrCat(completion_tokens_)},
         {"seconds", absl::StrFormat("%.3f", absl::ToDoubleSeconds(absl::Now() - start_))}});
  } else {
    Log("warning", "request failed",
        {{"code", absl::StatusCodeToString(status.code())},
         {"error", std::string(status.message())},
         {"completion_tokens", absl::StrCat(completion_tokens_)}});
    if (std::optional<absl::Duration> retry = RetryAfter(status)) {
      context_->AddTrailingMetadata("retry-after-ms",
                                    absl::StrCat(absl::ToInt64Milliseconds(*retry)));
    }
  }
  GenerateReactor* reactor = reactor_;
  InferenceService* service = service_;
  reactor->End(services::ToGrpcStatus(status));
  service->Finished(this);
}

absl::Status RequestRun::Serve() {
  const auto chrono_deadline = context_->deadline();
  if (chrono_deadline != std::chrono::system_clock::time_point::max()) {
    deadline_ = absl::FromChrono(chrono_deadline);
  }
  absl::BitGen bitgen;
  const uint64_t default_seed = absl::Uniform<uint64_t>(bitgen);
  absl::StatusOr<RequestPlan> plan = service_->front_->Plan(*request_, default_seed);
  request_id_ = request_->request_id();
  // A request id that was refused (too long) is not logged either.
  if (request_id_.empty() || (!plan.ok() && request_id_.size() > 256)) {
    request_id_ = absl::StrFormat("req-%016x", absl::Uniform<uint64_t>(bitgen));
  }
  if (!plan.ok()) return plan.status();
  plan_ = *std::move(plan);
  plan_.request_id = request_id_;
  streamer_ =
      std::make_unique<TextStreamer>(*service_->tokenizer_, plan_.skip_special_tokens, plan_.stop);

  RequestInfo info;
  info.prompt_tokens = static_cast<int64_t>(plan_.prompt.size());
  info.max_tokens = plan_.sampling.max_tokens();
  info.output_length_hint = plan_.output_length_hint;
  info.priority = plan_.priority;
  Log("info", "request received",
      {{"prompt_tokens", absl::StrCat(info.prompt_tokens)},
       {"max_tokens", absl::StrCat(info.max_tokens)},
       {"priority", absl::StrCat(info.priority)}});
  if (!CanEverFit(info, service_->registry_->Snapshot())) {
    return absl::ResourceExhaustedError(
        absl::StrCat("prompt ", info.prompt_tokens, " + max_tokens ", info.max_tokens,
                     " tokens exceed the KV capacity of every decode worker; lower max_tokens"));
  }

  int prefill_failures = 0;
  while (true) {
    Admitted admitted;
    const absl::Time admit_start = absl::Now();
    absl::Status admit = service_->admission_.Admit(
        info.priority, deadline_, [&] { return TryPlace(info, &admitted); }, &cancelled_);
    router_queue_ += absl::Now() - admit_start;
    if (absl::IsResourceExhausted(admit) && !HasServingPath(service_->registry_->Snapshot())) {
      // Not a lack of capacity: no worker that could serve is up.
      return absl::UnavailableError(
          absl::StrCat("no healthy worker can serve requests (", admit.message(), ")"));
    }
    DSERVE_RETURN_IF_ERROR(admit);
    Log("info", "request placed",
        {{"decode", admitted.placement.decode_worker},
         {"prefill",
          admitted.placement.aggregated() ? "(aggregated)" : admitted.placement.prefill_worker},
         {"kv_blocks", absl::StrCat(admitted.placement.kv_blocks)}});
    if (admitted.placement.aggregated()) return RunDecode(admitted, nullptr);

    if (cancelled_.load()) {
      Release(admitted);
      return absl::CancelledError("cancelled");
    }
    iv1::PrefillResponse first;
    absl::Status s = CallPrefill(admitted, &first);
    service_->registry_->Settle(admitted.prefill_charge, /*worker_has_it=*/false);
    if (!s.ok()) {
      Release(admitted);
      if (!absl::IsUnavailable(s) || cancelled_.load()) return s;
      service_->registry_->ReportUnavailable(admitted.placement.prefill_worker);
      info.exclude_prefill.push_back(admitted.placement.prefill_worker);
      if (prefill_failures < service_->options_.prefill_retries &&
          HasUsablePrefill(info, service_->registry_->Snapshot())) {
        // The prefill worker died: the request is retried, not failed. Its
        // reservation was released (the dead worker may have written part
        // of the prompt's KV into it); the request is placed again with a
        // fresh reservation and any prefill worker but the failed ones.
        ++prefill_failures;
        Log("warning", "prefill worker unavailable; retrying on another",
            {{"prefill", admitted.placement.prefill_worker},
             {"error", std::string(s.message())},
             {"attempt", absl::StrCat(prefill_failures)}});
        continue;
      }
      return s;
    }
    Log("info", "prefill done",
        {{"first_token", absl::StrCat(first.first_token())},
         {"queue_ms",
          absl::StrCat(absl::ToDoubleMilliseconds(services::ToDuration(first.queue_time())))},
         {"compute_ms",
          absl::StrCat(absl::ToDoubleMilliseconds(services::ToDuration(first.compute_time())))},
         {"transfer_tail_ms", absl::StrCat(absl::ToDoubleMilliseconds(
                                  services::ToDuration(first.transfer_tail_time())))}});
    prefill_timings_ = first;
    return RunDecode(admitted, &first);
  }
}

absl::Status RequestRun::TryPlace(const RequestInfo& info, Admitted* out) {
  WorkerRegistry& registry = *service_->registry_;
  DSERVE_ASSIGN_OR_RETURN(Placement placement, service_->policy_->Place(info, registry.Snapshot()));
  Admitted admitted;
  admitted.placement = placement;
  admitted.decode_charge = registry.Charge(placement.decode_worker, placement.kv_blocks, 0);
  if (placement.aggregated()) {
    *out = std::move(admitted);
    return absl::OkStatus();
  }
  admitted.prefill_charge = registry.Charge(placement.prefill_worker, 0, info.prompt_tokens);
  auto settle_all = [&] {
    registry.Settle(admitted.decode_charge, false);
    registry.Settle(admitted.prefill_charge, false);
  };

  std::shared_ptr<grpc::Channel> channel = ChannelOrNull(placement.decode_worker);
  if (channel == nullptr) {
    settle_all();
    return absl::ResourceExhaustedError(
        absl::StrCat("decode worker ", placement.decode_worker, " left the cluster"));
  }
  iv1::ReserveRequest request;
  request.set_request_id(request_id_);
  request.set_prompt_tokens(static_cast<int32_t>(info.prompt_tokens));
  request.set_max_tokens(static_cast<int32_t>(info.max_tokens));
  absl::Duration ttl = service_->options_.reservation_ttl;
  if (deadline_ != absl::InfiniteFuture()) {
    ttl = std::clamp(deadline_ - absl::Now(), absl::Seconds(1), ttl);
  }
  services::ToProtoDuration(ttl, request.mutable_ttl());
  iv1::ReserveResponse response;
  grpc::Status status;
  {
    TrackedCall call(this, std::min(deadline_, absl::Now() + kReserveTimeout));
    status = iv1::Decode::NewStub(channel)->Reserve(call.context(), request, &response);
  }
  if (status.ok()) {
    registry.Settle(admitted.decode_charge, /*worker_has_it=*/true);
    admitted.reservation_id = response.reservation_id();
    admitted.kv_target = response.kv_target();
    *out = std::move(admitted);
    return absl::OkStatus();
  }
  settle_all();
  absl::Status s = Annotate(status, "Reserve on decode worker", placement.decode_worker);
  if (status.error_code() == grpc::StatusCode::UNAVAILABLE && !cancelled_.load()) {
    // Another decode worker may take it: wait for the next placement.
    registry.ReportUnavailable(placement.decode_worker);
    return absl::ResourceExhaustedError(s.message());
  }
  return s;
}

absl::Status RequestRun::CallPrefill(const Admitted& admitted, iv1::PrefillResponse* response) {
  const std::string& worker = admitted.placement.prefill_worker;
  std::shared_ptr<grpc::Channel> channel = ChannelOrNull(worker);
  if (channel == nullptr) {
    return absl::UnavailableError(absl::StrCat("prefill worker ", worker, " left the cluster"));
  }
  iv1::PrefillRequest request;
  request.set_request_id(request_id_);
  request.mutable_prompt()->Add(plan_.prompt.begin(), plan_.prompt.end());
  *request.mutable_sampling() = plan_.sampling;
  request.set_kv_target(admitted.kv_target);
  TrackedCall call(this, deadline_);
  const grpc::Status status =
      iv1::Prefill::NewStub(channel)->Prefill(call.context(), request, response);
  if (!status.ok()) return Annotate(status, "Prefill on prefill worker", worker);
  return absl::OkStatus();
}

void RequestRun::Release(const Admitted& admitted) {
  if (admitted.reservation_id == 0) return;
  std::shared_ptr<grpc::Channel> channel = ChannelOrNull(admitted.placement.decode_worker);
  if (channel == nullptr) return;  // the worker is gone, and its blocks with it
  // Not tracked: a release must go out even when the client has gone.
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + service_->options_.release_timeout));
  iv1::ReleaseRequest request;
  request.set_reservation_id(admitted.reservation_id);
  iv1::ReleaseResponse response;
  const grpc::Status status = iv1::Decode::NewStub(channel)->Release(&context, request, &response);
  if (!status.ok()) {
    Log("warning", "Release failed; the reservation expires by its ttl",
        {{"decode", admitted.placement.decode_worker}, {"error", status.error_message()}});
  }
}

bool RequestRun::Emit(const int32_t* ids, const float* logprobs, int n) {
  v1::GenerateResponse response;
  response.set_request_id(request_id_);
  v1::Chunk* chunk = response.mutable_chunk();
  std::string text;
  for (int i = 0; i < n && !streamer_->stopped(); ++i) {
    chunk->add_token_ids(ids[i]);
    if (plan_.sampling.logprobs()) chunk->add_logprobs(logprobs != nullptr ? logprobs[i] : 0.0f);
    ++completion_tokens_;
    // A stop token ends the output; it is reported by id but adds no text.
    if (!service_->front_->IsStopToken(plan_, ids[i])) text += streamer_->Push(ids[i]);
  }
  chunk->set_text(std::move(text));
  if (chunk->token_ids_size() > 0 || !chunk->text().empty()) reactor_->Send(std::move(response));
  return streamer_->stopped();
}

void RequestRun::SendComplete(v1::FinishReason reason) {
  if (!streamer_->stopped()) {
    std::string tail = streamer_->Finish();
    if (!tail.empty()) {
      v1::GenerateResponse response;
      response.set_request_id(request_id_);
      response.mutable_chunk()->set_text(std::move(tail));
      reactor_->Send(std::move(response));
    }
  }
  v1::GenerateResponse response;
  response.set_request_id(request_id_);
  v1::Complete* complete = response.mutable_complete();
  if (streamer_->matched_stop()) {
    reason = v1::FINISH_REASON_STOP;
    complete->set_matched_stop(*streamer_->matched_stop());
  }
  complete->set_finish_reason(reason);
  complete->mutable_usage()->set_prompt_tokens(static_cast<int32_t>(plan_.prompt.size()));
  complete->mutable_usage()->set_completion_tokens(completion_tokens_);
  complete->mutable_usage()->set_cached_tokens(0);
  v1::ServerTimings* timings = complete->mutable_timings();
  services::ToProtoDuration(router_queue_, timings->mutable_router_queue());
  *timings->mutable_prefill_queue() = prefill_timings_.queue_time();
  *timings->mutable_prefill_compute() = prefill_timings_.compute_time();
  *timings->mutable_kv_transfer() = prefill_timings_.transfer_tail_time();
  Log("info", "request complete",
      {{"finish_reason", FinishName(reason)}, {"matched_stop", complete->matched_stop()}});
  reactor_->Send(std::move(response));
}

absl::Status RequestRun::RunDecode(const Admitted& admitted, const iv1::PrefillResponse* first) {
  WorkerRegistry& registry = *service_->registry_;
  const std::string& worker = admitted.placement.decode_worker;
  if (first != nullptr) {
    // The first token goes out before the decode stream starts.
    const int32_t token = first->first_token();
    const float logprob = first->first_logprob();
    if (Emit(&token, &logprob, 1)) {
      // A stop string ended the output: the reservation is not needed.
      Release(admitted);
      SendComplete(v1::FINISH_REASON_STOP);
      return absl::OkStatus();
    }
  }
  std::shared_ptr<grpc::Channel> channel = ChannelOrNull(worker);
  if (channel == nullptr) {
    registry.Settle(admitted.decode_charge, false);
    return absl::UnavailableError(absl::StrCat("decode worker ", worker, " left the cluster"));
  }
  iv1::DecodeRequest request;
  request.set_request_id(request_id_);
  request.set_reservation_id(admitted.reservation_id);
  request.mutable_prompt()->Add(plan_.prompt.begin(), plan_.prompt.end());
  if (first != nullptr) {
    request.set_first_token(first->first_token());
    request.set_first_logprob(first->first_logprob());
  }
  *request.mutable_sampling() = plan_.sampling;

  TrackedCall call(this, deadline_);
  std::unique_ptr<grpc::ClientReader<iv1::DecodeResponse>> reader =
      iv1::Decode::NewStub(channel)->Decode(call.context(), request);
  iv1::DecodeResponse response;
  iv1::FinishReason finish = iv1::FINISH_REASON_UNSPECIFIED;
  bool any = false;
  bool stopped = false;
  while (reader->Read(&response)) {
    if (!any && admitted.placement.aggregated()) {
      registry.Settle(admitted.decode_charge, /*worker_has_it=*/true);
    }
    any = true;
    const float* logprobs = response.logprobs_size() == response.token_ids_size()
                                ? response.logprobs().data()
                                : nullptr;
    if (Emit(response.token_ids().data(), logprobs, response.token_ids_size())) {
      // The output ends at the stop string: cancelling the call frees the
      // request's blocks on the worker.
      stopped = true;
      call.context()->TryCancel();
      break;
    }
    if (response.finish_reason() != iv1::FINISH_REASON_UNSPECIFIED) {
      finish = response.finish_reason();
      break;
    }
  }
  const grpc::Status status = reader->Finish();
  if (!any && admitted.placement.aggregated()) registry.Settle(admitted.decode_charge, false);
  if (stopped) {
    SendComplete(v1::FINISH_REASON_STOP);
    return absl::OkStatus();
  }
  if (!status.ok()) {
    // Idempotent: frees the reservation if the Decode never claimed it.
    Release(admitted);
    absl::Status s = Annotate(status, "Decode on decode worker", worker);
    if (absl::IsResourceExhausted(s) && !any) {
      s = WithRetryAfter(s, service_->admission_.RetryAfterEstimate());
    }
    return s;
  }
  if (finish == iv1::FINISH_REASON_UNSPECIFIED) {
    return absl::UnavailableError(
        absl::StrCat("decode worker ", worker, " ended the stream without a finish reason"));
  }
  SendComplete(ToPublic(finish));
  return absl::OkStatus();
}

// ---- InferenceService -------------------------------------------------------

InferenceServiceOptions InferenceServiceOptions::FromConfig(
    const config::v1::RouterConfig& config) {
  InferenceServiceOptions o;
  o.model_dir = config.model_dir();
  if (!config.policy().empty()) o.policy = config.policy();
  if (config.default_max_tokens() > 0) o.default_max_tokens = config.default_max_tokens();
  if (config.max_queued_requests() > 0) o.max_queued_requests = config.max_queued_requests();
  if (config.has_queue_timeout()) o.queue_timeout = services::ToDuration(config.queue_timeout());
  o.prefill_retries = config.prefill_retries();
  return o;
}

InferenceService::InferenceService(const InferenceServiceOptions& options, WorkerRegistry* registry)
    : options_(options),
      registry_(registry),
      admission_(AdmissionQueue::Options{options.max_queued_requests, options.queue_timeout}) {}

absl::StatusOr<std::unique_ptr<InferenceService>> InferenceService::Create(
    const InferenceServiceOptions& options, WorkerRegistry* registry) {
  if (options.model_dir.empty()) {
    return absl::InvalidArgumentError("model_dir is not set (the router needs the tokenizer)");
  }
  std::unique_ptr<InferenceService> service(new InferenceService(options, registry));
  auto tokenizer = tokenizer::Tokenizer::Load(options.model_dir);
  if (!tokenizer.ok()) {
    return absl::Status(tokenizer.status().code(),
                        absl::StrCat("model_dir: ", tokenizer.status().message()));
  }
  service->tokenizer_ = *std::move(tokenizer);
  auto model_config = engine::LoadModelConfig(options.model_dir);
  if (!model_config.ok()) {
    return absl::Status(model_config.status().code(),
                        absl::StrCat("model_dir: ", model_config.status().message()));
  }
  service->model_config_ = *std::move(model_config);
  DSERVE_ASSIGN_OR_RETURN(service->policy_, MakeRoutingPolicy(options.policy));

  const engine::ModelConfig& mc = service->model_config_;
  ModelLimits limits;
  limits.vocab_size = mc.vocab_size;
  limits.max_context_tokens = mc.max_position_embeddings;
  for (int64_t id : mc.eos_token_ids) limits.eos_token_ids.push_back(static_cast<int32_t>(id));
  if (service->tokenizer_->eos_id()) limits.eos_token_ids.push_back(*service->tokenizer_->eos_id());
  FrontOptions front_options;
  front_options.default_max_tokens = options.default_max_tokens;
  service->front_ =
      std::make_unique<RequestFront>(service->tokenizer_.get(), limits, front_options);

  v1::ModelInfo& info = service->model_info_;
  std::filesystem::path dir(options.model_dir);
  if (!dir.has_filename()) dir = dir.parent_path();
  info.set_name(dir.filename().string());
  info.set_vocab_size(static_cast<int32_t>(mc.vocab_size));
  info.set_max_context_tokens(static_cast<int32_t>(mc.max_position_embeddings));
  info.set_num_layers(static_cast<int32_t>(mc.num_hidden_layers));
  // The KV pool stores MLA's latent (kv_lora_rank + qk_rope_head_dim) per
  // layer in float32 (engine/kv_cache.h).
  info.set_kv_bytes_per_token(mc.num_hidden_layers * mc.kv_cache_width() *
                              static_cast<int64_t>(sizeof(float)));
  info.set_architecture(mc.architecture);

  InferenceService* raw = service.get();
  registry->SetChangeListener([raw] { raw->admission_.NotifyChange(); });
  return service;
}

InferenceService::~InferenceService() {
  registry_->SetChangeListener(nullptr);
  Drain(absl::Now());
}

int InferenceService::running_requests() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(running_.size());
}

void InferenceService::Finished(RequestRun* run) {
  absl::MutexLock lock(&mu_);
  running_.erase(run);
}

void InferenceService::Drain(absl::Time deadline) {
  {
    absl::MutexLock lock(&mu_);
    draining_ = true;
  }
  admission_.Close();
  auto idle = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return running_.empty(); };
  {
    absl::MutexLock lock(&mu_);
    if (mu_.AwaitWithDeadline(absl::Condition(&idle), deadline)) return;
    services::Log("warning", "drain deadline passed; cancelling running requests", {},
                  {{"running", absl::StrCat(running_.size())}});
    // Cancel takes only the run's own lock and the admission queue's.
    for (RequestRun* run : running_) {
      run->Cancel(absl::UnavailableError("the router shut down before the request finished"));
    }
    // Every wait of a cancelled request ends promptly (worker calls are
    // cancelled; a Release has a short deadline).
    mu_.Await(absl::Condition(&idle));
  }
}

grpc::ServerWriteReactor<v1::GenerateResponse>* InferenceService::Generate(
    grpc::CallbackServerContext* context, const v1::GenerateRequest* request) {
  auto run = std::make_shared<RequestRun>(this, context, request);
  auto* reactor = new GenerateReactor(run);
  run->set_reactor(reactor);
  bool draining;
  {
    absl::MutexLock lock(&mu_);
    draining = draining_;
    if (!draining) running_.insert(run.get());
  }
  if (draining) {
    reactor->End(grpc::Status(grpc::StatusCode::UNAVAILABLE, "the router is draining"));
    return reactor;
  }
  std::thread([run] { run->Run(); }).detach();
  return reactor;
}

grpc::ServerUnaryReactor* InferenceService::GetModelInfo(grpc::CallbackServerContext* context,
                                                         const v1::GetModelInfoRequest*,
                                                         v1::ModelInfo* response) {
  *response = model_info_;
  grpc::ServerUnaryReactor* reactor = context->DefaultReactor();
  reactor->Finish(grpc::Status::OK);
  return reactor;
}

}  // namespace dserve::router
