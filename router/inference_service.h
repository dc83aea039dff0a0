// router/inference_service.h: the public dserve.v1.Inference service. For
// each Generate call the router plans the request (router/request_front.h),
// admits and places it (router/admission.h, router/policy.h), drives the
// workers (Reserve -> Prefill -> Decode, or one Decode on an aggregated
// worker) and streams chunks of tokens and text back, then one Complete.
//
// Threading: Generate is a callback-API ServerWriteReactor whose reactions
// never block. The request's sequence of worker calls runs on a thread of
// its own, started when the call arrives and ended when the call is
// finished. Their number is bounded by what the router admits: at most
// max_queued_requests waiting in the admission queue plus the requests the
// workers' KV capacity holds.
#ifndef DSERVE_ROUTER_INFERENCE_SERVICE_H_
#define DSERVE_ROUTER_INFERENCE_SERVICE_H_

#include <cstdint>
#include <memory>
#include <set>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dserve/config/v1/config.pb.h"
#include "dserve/v1/inference.grpc.pb.h"
#include "engine/model_config.h"
#include "router/admission.h"
#include "router/policy.h"
#include "router/request_front.h"
#include "router/worker_registry.h"
#include "tokenizer/tokenizer.h"

namespace dserve::router {

class RequestRun;

// InferenceServiceOptions: the router settings the service uses.
struct InferenceServiceOptions {
  std::string model_dir;  // tokenizer.json and config.json
  std::string policy = "least-loaded";
  int32_t default_max_tokens = 256;
  int max_queued_requests = 1024;
  absl::Duration queue_timeout = absl::Seconds(30);
  int prefill_retries = 1;
  // How long a decode worker keeps a reservation that no Decode claims (a
  // router that dies between Reserve and Decode leaks blocks this long).
  absl::Duration reservation_ttl = absl::Seconds(120);
  // Deadline of a Release, which runs even after the client has gone.
  absl::Duration release_timeout = absl::Seconds(2);

  // FromConfig takes the fields of a finalized RouterConfig.
  static InferenceServiceOptions FromConfig(const config::v1::RouterConfig& config);
};

// InferenceService: serves dserve.v1.Inference. `registry` must outlive the
// service, and the gRPC server it is registered with must be shut down
// before the service is destroyed.
class InferenceService final : public v1::Inference::CallbackService {
 public:
  // Create loads the model's tokenizer and config from options.model_dir
  // and the policy by name. Errors name what failed to load.
  static absl::StatusOr<std::unique_ptr<InferenceService>> Create(
      const InferenceServiceOptions& options, WorkerRegistry* registry);
  // ~InferenceService cancels the requests still running and waits for
  // their threads.
  ~InferenceService() override;

  grpc::ServerWriteReactor<v1::GenerateResponse>* Generate(
      grpc::CallbackServerContext* context, const v1::GenerateRequest* request) override;
  grpc::ServerUnaryReactor* GetModelInfo(grpc::CallbackServerContext* context,
                                         const v1::GetModelInfoRequest* request,
                                         v1::ModelInfo* response) override;

  // Drain stops admitting (new calls and queued ones fail with UNAVAILABLE
  // "draining"), waits for running requests until `deadline`, then cancels
  // what is left and waits for it to end. For services::RunUntilShutdown.
  void Drain(absl::Time deadline);

  // running_requests: Generate calls not yet finished.
  int running_requests() const;

 private:
  friend class RequestRun;
  InferenceService(const InferenceServiceOptions& options, WorkerRegistry* registry);

  void Finished(RequestRun* run);

  const InferenceServiceOptions options_;
  WorkerRegistry* const registry_;
  std::unique_ptr<tokenizer::Tokenizer> tokenizer_;
  engine::ModelConfig model_config_;
  std::unique_ptr<RequestFront> front_;
  std::unique_ptr<RoutingPolicy> policy_;
  AdmissionQueue admission_;
  v1::ModelInfo model_info_;

  mutable absl::Mutex mu_;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  std::set<RequestRun*> running_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dserve::router

#endif  // DSERVE_ROUTER_INFERENCE_SERVICE_H_
