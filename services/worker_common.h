// services/worker_common.h: what the prefill and decode workers share: an
// engine whose KV pool lives in memory registered with the KV transport (so
// peers write and read blocks in place), the pool's layout as the transport
// sees it, and conversions between the worker RPCs' messages and the
// engine's types.
#ifndef DSERVE_SERVICES_WORKER_COMMON_H_
#define DSERVE_SERVICES_WORKER_COMMON_H_

#include <memory>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/functional/function_ref.h"
#include "absl/status/statusor.h"
#include "base/status_macros.h"
#include "dserve/config/v1/config.pb.h"
#include "dserve/internal/v1/worker.pb.h"
#include "engine/engine.h"
#include "grpcpp/grpcpp.h"
#include "kvtransfer/transport.h"
#include "services/cli_args.h"
#include "services/config.h"
#include "services/runtime.h"

namespace dserve::services {

// WorkerEngine: an engine and the transport region holding its KV pool.
struct WorkerEngine {
  std::unique_ptr<kvtransfer::KvTransport> transport;
  kvtransfer::KvRegion region;
  std::unique_ptr<engine::Engine> engine;  // declared last: destroyed first
};

// LoadWorkerConfig: a worker binary's config from its flags: --config FILE,
// then the --model, --listen and --worker-id overrides, then `apply` for the
// binary's own `bool_flags`, then defaults and validation (errors name the
// field). The worker id defaults to `default_id`.
template <typename WorkerConfig>
absl::StatusOr<WorkerConfig> LoadWorkerConfig(
    const std::vector<std::string>& argv, std::string_view default_id,
    const std::set<std::string>& bool_flags,
    absl::FunctionRef<void(const CliArgs&, WorkerConfig&)> apply) {
  DSERVE_ASSIGN_OR_RETURN(
      CliArgs args, CliArgs::Parse(argv, {"config", "model", "listen", "worker-id"}, bool_flags));
  WorkerConfig config;
  if (auto path = args.Get("config")) DSERVE_RETURN_IF_ERROR(LoadConfigFile(*path, &config));
  if (auto v = args.Get("model")) config.mutable_engine()->set_model_dir(*v);
  if (auto v = args.Get("listen")) config.mutable_server()->set_listen(*v);
  if (auto v = args.Get("worker-id")) config.set_worker_id(*v);
  apply(args, config);
  DSERVE_RETURN_IF_ERROR(Finalize(config));
  if (config.engine().model_dir().empty()) {
    return absl::InvalidArgumentError("engine.model_dir is not set (use --model DIR)");
  }
  if (config.worker_id().empty()) config.set_worker_id(std::string(default_id));
  return config;
}

// ServeWorker is the tail of a worker's main: starts the gRPC server with
// `services` and runs it until SIGINT/SIGTERM (RunUntilShutdown), draining
// with `drain`. Returns the process exit code (2 when the server cannot
// start, after printing why).
int ServeWorker(std::string_view binary, std::string_view service,
                const config::v1::ServerConfig& server_config,
                const std::vector<grpc::Service*>& services, ShutdownSignal& signal,
                absl::AnyInvocable<void(absl::Time deadline)> drain);

// ExitWith prints "<binary>: <message>" on stderr and returns `code`.
int ExitWith(std::string_view binary, const absl::Status& status, int code);

// LoadWorkerEngine creates the KV transport of `transport_config`, loads the
// model of `engine_config` with its pool in a region the transport
// allocated, and logs the transport's description.
absl::StatusOr<std::unique_ptr<WorkerEngine>> LoadWorkerEngine(
    const config::v1::EngineConfig& engine_config,
    const config::v1::TransportConfig& transport_config);

// KvLayoutOf: the engine pool's layout for the transport.
kvtransfer::KvPoolLayout KvLayoutOf(const engine::KvBlockPool& pool);

// SamplingFromProto / SamplingToProto: internal.v1.Sampling <-> the engine's
// parameters (max_tokens, stop ids and ignore_eos included).
engine::SamplingParams SamplingFromProto(const internal::v1::Sampling& sampling);
void SamplingToProto(const engine::SamplingParams& params, internal::v1::Sampling* out);

// FinishReasonToProto: the engine's finish reason on the wire.
internal::v1::FinishReason FinishReasonToProto(engine::FinishReason reason);

}  // namespace dserve::services

#endif  // DSERVE_SERVICES_WORKER_COMMON_H_
