// services/decode_main.cc: `dserve-decode`, a decode worker (or, with
// --aggregated, a worker that runs prompts too).
//
//   dserve-decode [--config FILE] [--model DIR] [--listen HOST:PORT]
//                 [--worker-id ID] [--aggregated]
#include <string>
#include <vector>

#include "decode/decode_scheduler.h"
#include "decode/decode_service.h"
#include "services/load_service.h"
#include "services/worker_common.h"

namespace dserve {
namespace {

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
  auto config = services::LoadWorkerConfig<config::v1::DecodeConfig>(
      std::vector<std::string>(argv + 1, argv + argc), "decode", {"aggregated"},
      [](const services::CliArgs& args, config::v1::DecodeConfig& c) {
        if (args.Flag("aggregated")) c.set_aggregated(true);
      });
  if (!config.ok()) return services::ExitWith("dserve-decode", config.status(), 2);
  auto worker = services::LoadWorkerEngine(config->engine(), config->transport());
  if (!worker.ok()) return services::ExitWith("dserve-decode", worker.status(), 1);
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
  return services::ServeWorker("dserve-decode", "decode", config->server(),
                               {&decode_service, &load_service}, signal,
                               [&](absl::Time deadline) {
                                 scheduler.Drain(deadline);
                                 load_service.Stop();
                               });
}

}  // namespace
}  // namespace dserve

int main(int argc, char** argv) { return dserve::Main(argc, argv); }
