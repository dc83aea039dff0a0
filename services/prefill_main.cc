// services/prefill_main.cc: `dserve-prefill`, a prefill worker.
//
//   dserve-prefill [--config FILE] [--model DIR] [--listen HOST:PORT] [--worker-id ID]
#include <cstdio>
#include <string>
#include <vector>

#include "base/status_macros.h"
#include "prefill/prefill_scheduler.h"
#include "prefill/prefill_service.h"
#include "services/cli_args.h"
#include "services/config.h"
#include "services/load_service.h"
#include "services/runtime.h"
#include "services/worker_common.h"

namespace dserve {
namespace {

absl::StatusOr<config::v1::PrefillConfig> LoadConfig(const std::vector<std::string>& argv) {
  DSERVE_ASSIGN_OR_RETURN(
      auto args, services::CliArgs::Parse(argv, {"config", "model", "listen", "worker-id"}, {}));
  config::v1::PrefillConfig config;
  if (auto path = args.Get("config")) {
    DSERVE_RETURN_IF_ERROR(services::LoadConfigFile(*path, &config));
  }
  if (auto v = args.Get("model")) config.mutable_engine()->set_model_dir(*v);
  if (auto v = args.Get("listen")) config.mutable_server()->set_listen(*v);
  if (auto v = args.Get("worker-id")) config.set_worker_id(*v);
  DSERVE_RETURN_IF_ERROR(services::Finalize(config));
  if (config.engine().model_dir().empty()) {
    return absl::InvalidArgumentError("engine.model_dir is not set (use --model DIR)");
  }
  if (config.worker_id().empty()) config.set_worker_id("prefill");
  return config;
}

internal::v1::LoadReport Report(const config::v1::PrefillConfig& config,
                                const prefill::PrefillScheduler& scheduler) {
  const prefill::PrefillLoad load = scheduler.Load();
  internal::v1::LoadReport r;
  r.set_worker_id(config.worker_id());
  r.set_role(internal::v1::WORKER_ROLE_PREFILL);
  r.set_kv_blocks_total(load.kv_blocks_total);
  r.set_kv_blocks_free(load.kv_blocks_free);
  r.set_kv_block_tokens(load.kv_block_tokens);
  r.set_running_requests(load.running);
  r.set_queued_requests(load.queued);
  r.set_batch_size(load.batch_size);
  r.set_queued_prefill_tokens(load.queued_prefill_tokens);
  r.set_draining(load.draining);
  r.set_kv_transport_leases_open(load.leases_open);
  return r;
}

int Main(int argc, char** argv) {
  services::ShutdownSignal signal;
  services::SetLogService("prefill");
  auto config = LoadConfig(std::vector<std::string>(argv + 1, argv + argc));
  if (!config.ok()) {
    std::fprintf(stderr, "dserve-prefill: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  auto worker = services::LoadWorkerEngine(config->engine(), config->transport());
  if (!worker.ok()) {
    std::fprintf(stderr, "dserve-prefill: %s\n", std::string(worker.status().message()).c_str());
    return 1;
  }
  engine::Engine& engine = *(*worker)->engine;
  prefill::PrefillScheduler scheduler(
      &engine, (*worker)->transport.get(), (*worker)->region.id,
      services::KvLayoutOf(engine.pool()),
      {.worker_id = config->worker_id(),
       .max_queued_requests = config->max_queued_requests(),
       .max_step_tokens = config->engine().max_step_tokens(),
       .max_batch = config->engine().max_batch(),
       .open_timeout = services::ToDuration(config->transport().peer_timeout())});
  prefill::PrefillService prefill_service(&scheduler);
  services::LoadReportService load_service([&] { return Report(*config, scheduler); },
                                           services::ToDuration(config->load_report_interval()));
  auto server = services::GrpcServer::Start(config->server(), {&prefill_service, &load_service});
  if (!server.ok()) {
    std::fprintf(stderr, "dserve-prefill: %s\n", std::string(server.status().message()).c_str());
    return 2;
  }
  return services::RunUntilShutdown("prefill", **server, signal,
                                    services::ToDuration(config->server().drain_timeout()),
                                    [&](absl::Time deadline) {
                                      scheduler.Drain(deadline);
                                      load_service.Stop();
                                    });
}

}  // namespace
}  // namespace dserve

int main(int argc, char** argv) { return dserve::Main(argc, argv); }
