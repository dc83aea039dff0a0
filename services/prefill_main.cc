// services/prefill_main.cc: `dserve-prefill`, a prefill worker.
//
//   dserve-prefill [--config FILE] [--model DIR] [--listen HOST:PORT] [--worker-id ID]
#include <string>
#include <vector>

#include "prefill/prefill_scheduler.h"
#include "prefill/prefill_service.h"
#include "services/load_service.h"
#include "services/worker_common.h"

namespace dserve {
namespace {

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
  auto config = services::LoadWorkerConfig<config::v1::PrefillConfig>(
      std::vector<std::string>(argv + 1, argv + argc), "prefill", {},
      [](const services::CliArgs&, config::v1::PrefillConfig&) {});
  if (!config.ok()) return services::ExitWith("dserve-prefill", config.status(), 2);
  auto worker = services::LoadWorkerEngine(config->engine(), config->transport());
  if (!worker.ok()) return services::ExitWith("dserve-prefill", worker.status(), 1);
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
  return services::ServeWorker("dserve-prefill", "prefill", config->server(),
                               {&prefill_service, &load_service}, signal,
                               [&](absl::Time deadline) {
                                 scheduler.Drain(deadline);
                                 load_service.Stop();
                               });
}

}  // namespace
}  // namespace dserve

int main(int argc, char** argv) { return dserve::Main(argc, argv); }
