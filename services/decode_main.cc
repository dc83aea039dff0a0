// services/decode_main.cc: `dserve-decode`, a decode worker (or, with
// --aggregated, a worker that runs prompts too).
//
//   dserve-decode [--config FILE] [--model DIR] [--listen HOST:PORT]
//                 [--worker-id ID] [--aggregated]
#include <cstdio>
#include <string>
#include <vector>

#include "base/status_macros.h"
#include "decode/decode_scheduler.h"
#include "decode/decode_service.h"
#include "services/cli_args.h"
#include "services/config.h"
#include "services/load_service.h"
#include "services/runtime.h"
#include "services/worker_common.h"

namespace dserve {
namespace {

absl::StatusOr<config::v1::DecodeConfig> LoadConfig(const std::vector<std::string>& argv) {
  DSERVE_ASSIGN_OR_RETURN(auto args, services::CliArgs::Parse(
                                         argv, {"config", "model", "listen", "worker-id"},
                                         {"aggregated"}));
  config::v1::DecodeConfig config;
  if (auto path = args.Get("config")) {
    DSERVE_RETURN_IF_ERROR(services::LoadConfigFile(*path, &config));
  }
  if (auto v = args.Get("model")) config.mutable_engine()->set_model_dir(*v);
  if (auto v = args.Get("listen")) config.mutable_server()->set_listen(*v);
  if (auto v = args.Get("worker-id")) config.set_worker_id(*v);
  if (args.Flag("aggregated")) config.set_aggregated(true);
  DSERVE_RETURN_IF_ERROR(services::Finalize(config));
  if (config.engine().model_dir().empty()) {
    return absl::InvalidArgumentError("engine.model_dir is not set (use --model DIR)");
  }
  if (config.worker_id().empty()) config.set_worker_id("decode");
  return config;
}

internal::v1::LoadReport Report(const config::v1::DecodeConfig& config,
                                const decode::DecodeScheduler& scheduler) {
  const decode::DecodeLoad load = scheduler.Load();
  internal::v1::LoadReport r;
  r.set_worker_id(config.worker_id());
  r.set_role(config.aggregated() ? internal::v1::WORKER_ROLE_AGGREGATED
                                 : internal::v1::WORKER_ROLE_DECODE);
  r.set_kv_blocks_total(load.kv_blocks_total);
  r.set_kv_blocks_free(load.kv_blocks_free);
  r.set_kv_blocks_reserved(load.kv_blocks_reserved);
  r.set_kv_blocks_committed(load.kv_blocks_committed);
  r.set_kv_block_tokens(load.kv_block_tokens);
  r.set_running_requests(load.running);
  r.set_queued_requests(load.queued);
  r.set_batch_size(load.batch_size);
  r.set_queued_prefill_tokens(load.queued_prefill_tokens);
  r.set_draining(load.draining);
  r.set_kv_transport_leases_open(load.leases_open);
  for (const decode::StepSample& s : load.recent_steps) {
    internal::v1::StepTime* t = r.add_recent_steps();
    t->set_batch(s.batch);
    t->set_tokens(s.tokens);
    t->set_context_tokens(s.context_tokens);
    t->set_seconds(s.seconds);
  }
  return r;
}

int Main(int argc, char** argv) {
  services::ShutdownSignal signal;
  services::SetLogService("decode");
  auto config = LoadConfig(std::vector<std::string>(argv + 1, argv + argc));
  if (!config.ok()) {
    std::fprintf(stderr, "dserve-decode: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  auto worker = services::LoadWorkerEngine(config->engine(), config->transport());
  if (!worker.ok()) {
    std::fprintf(stderr, "dserve-decode: %s\n", std::string(worker.status().message()).c_str());
    return 1;
  }
  engine::Engine& engine = *(*worker)->engine;
  decode::DecodeScheduler scheduler(
      &engine, (*worker)->transport.get(), (*worker)->region.id,
      services::KvLayoutOf(engine.pool()),
      {.worker_id = config->worker_id(),
       .aggregated = config->aggregated(),
       .max_batch = config->engine().max_batch(),
       .max_step_tokens = config->engine().max_step_tokens(),
       .max_queued_requests = config->max_queued_requests(),
       .reservation_ttl = services::ToDuration(config->reservation_ttl())});
  decode::DecodeService decode_service(&scheduler);
  services::LoadReportService load_service([&] { return Report(*config, scheduler); },
                                           services::ToDuration(config->load_report_interval()));
  auto server = services::GrpcServer::Start(config->server(), {&decode_service, &load_service});
  if (!server.ok()) {
    std::fprintf(stderr, "dserve-decode: %s\n", std::string(server.status().message()).c_str());
    return 2;
  }
  return services::RunUntilShutdown("decode", **server, signal,
                                    services::ToDuration(config->server().drain_timeout()),
                                    [&](absl::Time deadline) {
                                      scheduler.Drain(deadline);
                                      load_service.Stop();
                                    });
}

}  // namespace
}  // namespace dserve

int main(int argc, char** argv) { return dserve::Main(argc, argv); }
