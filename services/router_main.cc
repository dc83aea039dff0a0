// services/router_main.cc: `dserve-router`, the front door: the public
// dserve.v1.Inference service over a set of prefill and decode (or
// aggregated) workers.
//
//   dserve-router [--config FILE] [--model DIR] [--listen HOST:PORT]
//                 [--prefill ADDR]... [--decode ADDR]...
//
// Flags override the config file; --prefill / --decode replace that group's
// addresses (and its dns_name).
#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "base/status_macros.h"
#include "router/inference_service.h"
#include "router/worker_registry.h"
#include "services/cli_args.h"
#include "services/config.h"
#include "services/runtime.h"

namespace dserve {
namespace {

absl::StatusOr<config::v1::RouterConfig> LoadConfig(const std::vector<std::string>& argv) {
  DSERVE_ASSIGN_OR_RETURN(
      auto args, services::CliArgs::Parse(argv, {"config", "model", "listen", "prefill", "decode"},
                                          {}, {"prefill", "decode"}));
  config::v1::RouterConfig config;
  if (auto path = args.Get("config")) {
    DSERVE_RETURN_IF_ERROR(services::LoadConfigFile(*path, &config));
  }
  if (auto v = args.Get("model")) config.set_model_dir(*v);
  if (auto v = args.Get("listen")) config.mutable_server()->set_listen(*v);
  auto replace = [](config::v1::WorkerGroup* group, const std::vector<std::string>& addresses) {
    if (addresses.empty()) return;
    group->clear_addresses();
    group->clear_dns_name();
    for (const std::string& a : addresses) group->add_addresses(a);
  };
  replace(config.mutable_prefill_workers(), args.GetAll("prefill"));
  replace(config.mutable_decode_workers(), args.GetAll("decode"));
  DSERVE_RETURN_IF_ERROR(services::Finalize(config));
  if (config.model_dir().empty()) {
    return absl::InvalidArgumentError("model_dir is not set (use --model DIR)");
  }
  return config;
}

int Main(int argc, char** argv) {
  services::ShutdownSignal signal;
  services::SetLogService("router");
  auto config = LoadConfig(std::vector<std::string>(argv + 1, argv + argc));
  if (!config.ok()) {
    std::fprintf(stderr, "dserve-router: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }

  router::WorkerRegistryOptions registry_options;
  registry_options.health_check_interval = services::ToDuration(config->health_check_interval());
  // A health check that takes longer than this is a failed one.
  registry_options.health_check_timeout =
      std::clamp(registry_options.health_check_interval, absl::Milliseconds(100), absl::Seconds(1));
  auto registry = router::WorkerRegistry::Create(*config, registry_options);
  if (!registry.ok()) {
    std::fprintf(stderr, "dserve-router: %s\n", std::string(registry.status().message()).c_str());
    return 2;
  }
  auto service = router::InferenceService::Create(
      router::InferenceServiceOptions::FromConfig(*config), registry->get());
  if (!service.ok()) {
    std::fprintf(stderr, "dserve-router: %s\n", std::string(service.status().message()).c_str());
    return 2;
  }
  auto server = services::GrpcServer::Start(config->server(), {service->get()});
  if (!server.ok()) {
    std::fprintf(stderr, "dserve-router: %s\n", std::string(server.status().message()).c_str());
    return 2;
  }
  return services::RunUntilShutdown("router", **server, signal,
                                    services::ToDuration(config->server().drain_timeout()),
                                    [&](absl::Time deadline) { (*service)->Drain(deadline); });
}

}  // namespace
}  // namespace dserve

int main(int argc, char** argv) { return dserve::Main(argc, argv); }
