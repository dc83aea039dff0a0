// services/worker_common.cc: engine + transport set-up and message
// conversions shared by the workers.
#include "services/worker_common.h"

#include <cstdio>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "services/runtime.h"

namespace dserve::services {

absl::StatusOr<std::unique_ptr<WorkerEngine>> LoadWorkerEngine(
    const config::v1::EngineConfig& engine_config,
    const config::v1::TransportConfig& transport_config) {
  kvtransfer::KvTransportOptions transport_options;
  DSERVE_ASSIGN_OR_RETURN(transport_options.kind,
                          kvtransfer::ParseKvTransportKind(transport_config.kind()));
  transport_options.peer_timeout = ToDuration(transport_config.peer_timeout());
  transport_options.heartbeat_interval = ToDuration(transport_config.heartbeat_interval());
  auto worker = std::make_unique<WorkerEngine>();
  DSERVE_ASSIGN_OR_RETURN(worker->transport, kvtransfer::CreateKvTransport(transport_options));
  Log("info", "kv transport", {}, {{"transport", worker->transport->Describe()}});

  engine::EngineOptions options;
  options.matmul_backend = engine_config.matmul_backend();
  options.kv_block_tokens = engine_config.kv_block_tokens();
  options.kv_cache_tokens = engine_config.kv_cache_tokens();
  options.max_step_tokens = engine_config.max_step_tokens();
  WorkerEngine* w = worker.get();
  options.kv_memory = [w](int64_t bytes) -> absl::StatusOr<uint8_t*> {
    DSERVE_ASSIGN_OR_RETURN(w->region, w->transport->AllocateRegion(bytes));
    return w->region.data;
  };
  auto loaded = engine::Engine::Load(engine_config.model_dir(), options);
  if (!loaded.ok()) {
    return absl::Status(loaded.status().code(),
                        absl::StrCat("engine.model_dir ", engine_config.model_dir(), ": ",
                                     loaded.status().message()));
  }
  worker->engine = std::move(loaded).value();
  return worker;
}

int ServeWorker(std::string_view binary, std::string_view service,
                const config::v1::ServerConfig& server_config,
                const std::vector<grpc::Service*>& services, ShutdownSignal& signal,
                absl::AnyInvocable<void(absl::Time deadline)> drain) {
  auto server = GrpcServer::Start(server_config, services);
  if (!server.ok()) return ExitWith(binary, server.status(), 2);
  return RunUntilShutdown(service, **server, signal, ToDuration(server_config.drain_timeout()),
                          std::move(drain));
}

int ExitWith(std::string_view binary, const absl::Status& status, int code) {
  std::fprintf(stderr, "%.*s: %.*s\n", static_cast<int>(binary.size()), binary.data(),
               static_cast<int>(status.message().size()), status.message().data());
  return code;
}

kvtransfer::KvPoolLayout KvLayoutOf(const engine::KvBlockPool& pool) {
  const engine::KvCacheLayout& l = pool.layout();
  return kvtransfer::LayerMajorLayout(
      {.num_layers = l.num_layers,
       .num_blocks = l.num_blocks,
       .block_tokens = l.block_tokens,
       .bytes_per_token_per_layer = l.token_width * static_cast<int64_t>(sizeof(float))});
}

engine::SamplingParams SamplingFromProto(const internal::v1::Sampling& s) {
  engine::SamplingParams p;
  p.temperature = s.temperature();
  p.top_p = s.top_p();
  p.top_k = s.top_k();
  p.min_p = s.min_p();
  p.repetition_penalty = s.repetition_penalty();
  p.presence_penalty = s.presence_penalty();
  p.frequency_penalty = s.frequency_penalty();
  p.seed = s.seed();
  p.max_tokens = s.max_tokens();
  p.stop_token_ids.assign(s.stop_token_ids().begin(), s.stop_token_ids().end());
  p.ignore_eos = s.ignore_eos();
  return p;
}

void SamplingToProto(const engine::SamplingParams& p, internal::v1::Sampling* out) {
  out->set_temperature(p.temperature);
  out->set_top_p(p.top_p);
  out->set_top_k(p.top_k);
  out->set_min_p(p.min_p);
  out->set_repetition_penalty(p.repetition_penalty);
  out->set_presence_penalty(p.presence_penalty);
  out->set_frequency_penalty(p.frequency_penalty);
  out->set_seed(p.seed);
  out->set_max_tokens(p.max_tokens);
  out->mutable_stop_token_ids()->Assign(p.stop_token_ids.begin(), p.stop_token_ids.end());
  out->set_ignore_eos(p.ignore_eos);
}

internal::v1::FinishReason FinishReasonToProto(engine::FinishReason reason) {
  switch (reason) {
    case engine::FinishReason::kStop:
      return internal::v1::FINISH_REASON_STOP;
    case engine::FinishReason::kLength:
      return internal::v1::FINISH_REASON_LENGTH;
    case engine::FinishReason::kNone:
      break;
  }
  return internal::v1::FINISH_REASON_UNSPECIFIED;
}

}  // namespace dserve::services
