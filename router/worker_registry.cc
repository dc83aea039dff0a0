// router/worker_registry.cc: worker membership, health checks, load streams
// and the router's local load accounting.
#include "router/worker_registry.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <set>
#include <utility>

#include "absl/strings/str_cat.h"
#include "dserve/internal/v1/worker.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "services/runtime.h"

namespace dserve::router {
namespace {

using internal::v1::LoadReport;

WorkerRole FromProtoRole(internal::v1::WorkerRole role) {
  switch (role) {
    case internal::v1::WORKER_ROLE_PREFILL:
      return WorkerRole::kPrefill;
    case internal::v1::WORKER_ROLE_DECODE:
      return WorkerRole::kDecode;
    case internal::v1::WORKER_ROLE_AGGREGATED:
      return WorkerRole::kAggregated;
    default:
      return WorkerRole::kUnknown;
  }
}

const char* RoleName(WorkerRole role) {
  switch (role) {
    case WorkerRole::kPrefill:
      return "prefill";
    case WorkerRole::kDecode:
      return "decode";
    case WorkerRole::kAggregated:
      return "aggregated";
    case WorkerRole::kUnknown:
      break;
  }
  return "unknown";
}

// Channels to workers reconnect quickly: a restarted worker should be used
// again within a load-report interval or two, not after gRPC's default
// backoff of up to two minutes.
std::shared_ptr<grpc::Channel> MakeWorkerChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MIN_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 2000);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

absl::Status CheckAddress(const std::string& field, const std::string& address) {
  const size_t colon = address.rfind(':');
  if (address.empty() || colon == std::string::npos || colon == 0 || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, " must be host:port, got \"", address, "\""));
  }
  return absl::OkStatus();
}

}  // namespace

// Worker: one worker's channel and what the router knows of it. Fields are
// guarded by the registry's mutex except `address`, `channel` and the stubs,
// which are fixed at creation.
struct WorkerRegistry::Worker {
  std::string address;
  WorkerRole expected_role = WorkerRole::kUnknown;
  std::shared_ptr<grpc::Channel> channel;
  std::unique_ptr<grpc::health::v1::Health::Stub> health_stub;

  bool removed = false;
  bool health_ok = false;
  bool health_in_flight = false;
  absl::Time next_health_check = absl::InfinitePast();
  bool load_up = false;
  bool role_warned = false;
  std::optional<LoadReport> report;
  uint64_t report_seq = 0;
  std::shared_ptr<grpc::ClientContext> watch_context;
  std::thread watch_thread;
};

absl::StatusOr<std::vector<std::string>> ResolveHostPort(const std::string& host_port) {
  std::string host, port;
  if (!host_port.empty() && host_port[0] == '[') {
    const size_t close = host_port.find(']');
    if (close == std::string::npos || close + 1 >= host_port.size() ||
        host_port[close + 1] != ':') {
      return absl::InvalidArgumentError(absl::StrCat("\"", host_port, "\" is not [host]:port"));
    }
    host = host_port.substr(1, close - 1);
    port = host_port.substr(close + 2);
  } else {
    const size_t colon = host_port.rfind(':');
    if (colon == std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat("\"", host_port, "\" has no port"));
    }
    host = host_port.substr(0, colon);
    port = host_port.substr(colon + 1);
  }
  if (host.empty() || port.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("\"", host_port, "\" is not host:port"));
  }
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* result = nullptr;
  const int rc = getaddrinfo(host.c_str(), port.c_str(), &hints, &result);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve \"", host_port, "\": ", gai_strerror(rc)));
  }
  std::set<std::string> out;
  for (addrinfo* ai = result; ai != nullptr; ai = ai->ai_next) {
    char text[INET6_ADDRSTRLEN] = {};
    if (ai->ai_family == AF_INET) {
      const auto* sin = reinterpret_cast<const sockaddr_in*>(ai->ai_addr);
      inet_ntop(AF_INET, &sin->sin_addr, text, sizeof(text));
      out.insert(absl::StrCat(text, ":", ntohs(sin->sin_port)));
    } else if (ai->ai_family == AF_INET6) {
      const auto* sin6 = reinterpret_cast<const sockaddr_in6*>(ai->ai_addr);
      inet_ntop(AF_INET6, &sin6->sin6_addr, text, sizeof(text));
      out.insert(absl::StrCat("[", text, "]:", ntohs(sin6->sin6_port)));
    }
  }
  freeaddrinfo(result);
  return std::vector<std::string>(out.begin(), out.end());
}

WorkerRegistry::WorkerRegistry(WorkerRegistryOptions options) : options_(options) {}

absl::StatusOr<std::unique_ptr<WorkerRegistry>> WorkerRegistry::Create(
    const config::v1::RouterConfig& config, WorkerRegistryOptions options) {
  std::vector<Group> groups;
  auto add_group = [&](const std::string& field, const config::v1::WorkerGroup& g,
                       WorkerRole role) -> absl::Status {
    if (!g.dns_name().empty() && g.addresses_size() > 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(field, ": set either addresses or dns_name, not both"));
    }
    Group group;
    group.field = field;
    group.role = role;
    group.dns_name = g.dns_name();
    group.resolve_interval = absl::Seconds(g.resolve_interval().seconds()) +
                             absl::Nanoseconds(g.resolve_interval().nanos());
    if (group.resolve_interval <= absl::ZeroDuration()) group.resolve_interval = absl::Seconds(5);
    group.next_resolve = absl::InfinitePast();
    if (!group.dns_name.empty()) {
      if (absl::Status s = CheckAddress(field + ".dns_name", group.dns_name); !s.ok()) return s;
    }
    for (int i = 0; i < g.addresses_size(); ++i) {
      if (absl::Status s = CheckAddress(absl::StrCat(field, ".addresses[", i, "]"), g.addresses(i));
          !s.ok()) {
        return s;
      }
      if (std::find(group.members.begin(), group.members.end(), g.addresses(i)) ==
          group.members.end()) {
        group.members.push_back(g.addresses(i));
      }
    }
    groups.push_back(std::move(group));
    return absl::OkStatus();
  };
  if (absl::Status s = add_group("prefill_workers", config.prefill_workers(), WorkerRole::kPrefill);
      !s.ok()) {
    return s;
  }
  if (absl::Status s = add_group("decode_workers", config.decode_workers(), WorkerRole::kDecode);
      !s.ok()) {
    return s;
  }
  if (groups[1].members.empty() && groups[1].dns_name.empty()) {
    return absl::InvalidArgumentError(
        "decode_workers: no addresses and no dns_name (the router needs decode or aggregated "
        "workers)");
  }
  if (options.health_check_interval <= absl::ZeroDuration()) {
    options.health_check_interval = absl::Milliseconds(500);
  }
  if (options.health_check_timeout <= absl::ZeroDuration()) {
    options.health_check_timeout = options.health_check_interval;
  }

  std::unique_ptr<WorkerRegistry> registry(new WorkerRegistry(options));
  {
    absl::MutexLock lock(&registry->mu_);
    for (Group& g : groups) {
      for (const std::string& address : g.members) registry->AddWorkerLocked(address, g.role);
    }
    registry->groups_ = std::move(groups);
  }
  registry->maintenance_ = std::thread([r = registry.get()] { r->MaintenanceLoop(); });
  return registry;
}

WorkerRegistry::~WorkerRegistry() {
  std::vector<std::shared_ptr<grpc::ClientContext>> to_cancel;
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
    for (auto& [address, w] : workers_) {
      w->removed = true;
      if (w->watch_context) to_cancel.push_back(w->watch_context);
    }
  }
  for (auto& ctx : to_cancel) ctx->TryCancel();
  if (maintenance_.joinable()) maintenance_.join();
  std::vector<std::thread> threads;
  {
    absl::MutexLock lock(&mu_);
    for (auto& [address, w] : workers_) {
      if (w->watch_thread.joinable()) threads.push_back(std::move(w->watch_thread));
    }
  }
  for (std::thread& t : threads) t.join();
  // Health checks carry a short deadline; their callbacks touch `this`.
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(
      +[](int* n) { return *n == 0; }, &health_checks_in_flight_));
}

void WorkerRegistry::AddWorkerLocked(const std::string& address, WorkerRole expected) {
  if (workers_.contains(address)) return;
  auto w = std::make_shared<Worker>();
  w->address = address;
  w->expected_role = expected;
  w->channel = MakeWorkerChannel(address);
  w->health_stub = grpc::health::v1::Health::NewStub(w->channel);
  w->watch_thread = std::thread([this, w] { WatchLoop(w); });
  workers_[address] = w;
  ++version_;
  services::Log("info", "worker added", {}, {{"worker", address}, {"group", RoleName(expected)}});
}

std::thread WorkerRegistry::RemoveWorkerLocked(const std::string& address) {
  auto it = workers_.find(address);
  if (it == workers_.end()) return {};
  std::shared_ptr<Worker> w = it->second;
  workers_.erase(it);
  w->removed = true;
  for (auto c = charges_.begin(); c != charges_.end();) {
    c = c->second.worker == address ? charges_.erase(c) : std::next(c);
  }
  if (w->watch_context) w->watch_context->TryCancel();
  ++version_;
  services::Log("info", "worker removed", {}, {{"worker", address}});
  return std::move(w->watch_thread);
}

void WorkerRegistry::MaintenanceLoop() {
  while (true) {
    std::vector<std::pair<size_t, std::string>> to_resolve;
    std::vector<std::shared_ptr<Worker>> to_check;
    absl::Time wake = absl::InfiniteFuture();
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      const absl::Time now = absl::Now();
      for (size_t i = 0; i < groups_.size(); ++i) {
        Group& g = groups_[i];
        if (g.dns_name.empty()) continue;
        if (now >= g.next_resolve) {
          to_resolve.emplace_back(i, g.dns_name);
          g.next_resolve = now + g.resolve_interval;
        }
        wake = std::min(wake, g.next_resolve);
      }
      for (auto& [address, w] : workers_) {
        if (!w->health_in_flight && now >= w->next_health_check) {
          w->health_in_flight = true;
          w->next_health_check = now + options_.health_check_interval;
          ++health_checks_in_flight_;
          to_check.push_back(w);
        }
        wake = std::min(wake, w->next_health_check);
      }
    }

    // DNS and the calls' start run without the lock: getaddrinfo blocks,
    // and a call that fails at once may run its callback on this thread.
    std::vector<std::thread> to_join;
    for (const auto& [index, name] : to_resolve) {
      absl::StatusOr<std::vector<std::string>> addresses = ResolveHostPort(name);
      absl::MutexLock lock(&mu_);
      Group& g = groups_[index];
      if (!addresses.ok()) {
        // Keep the last known members: a DNS hiccup must not drop a tier.
        services::Log("warning", "worker DNS resolution failed", {},
                      {{"group", g.field}, {"error", std::string(addresses.status().message())}});
        continue;
      }
      for (const std::string& old : g.members) {
        if (std::find(addresses->begin(), addresses->end(), old) == addresses->end()) {
          to_join.push_back(RemoveWorkerLocked(old));
        }
      }
      for (const std::string& address : *addresses) AddWorkerLocked(address, g.role);
      g.members = *addresses;
    }
    for (std::thread& t : to_join) {
      if (t.joinable()) t.join();
    }
    if (!to_join.empty()) NotifyChange();

    for (const std::shared_ptr<Worker>& w : to_check) {
      struct HealthCall {
        grpc::ClientContext context;
        grpc::health::v1::HealthCheckRequest request;
        grpc::health::v1::HealthCheckResponse response;
      };
      auto call = std::make_shared<HealthCall>();
      call->context.set_deadline(absl::ToChronoTime(absl::Now() + options_.health_check_timeout));
      w->health_stub->async()->Check(
          &call->context, &call->request, &call->response,
          [this, w, call](const grpc::Status& status) {
            const bool ok = status.ok() && call->response.status() ==
                                               grpc::health::v1::HealthCheckResponse::SERVING;
            bool changed = false;
            {
              absl::MutexLock lock(&mu_);
              w->health_in_flight = false;
              if (!w->removed && ok != w->health_ok) {
                changed = true;
                w->health_ok = ok;
                ++version_;
              }
            }
            if (changed) {
              services::Log(ok ? "info" : "warning",
                            ok ? "worker healthy" : "worker failed its health check", {},
                            {{"worker", w->address},
                             {"status", status.ok() ? "ok" : status.error_message()}});
              NotifyChange();
            }
            absl::MutexLock lock(&mu_);
            --health_checks_in_flight_;
          });
    }

    absl::MutexLock lock(&mu_);
    mu_.AwaitWithDeadline(absl::Condition(&stopping_), wake);
    if (stopping_) return;
  }
}

void WorkerRegistry::WatchLoop(std::shared_ptr<Worker> w) {
  std::unique_ptr<internal::v1::WorkerLoad::Stub> stub =
      internal::v1::WorkerLoad::NewStub(w->channel);
  absl::Duration backoff = options_.watch_backoff_initial;
  while (true) {
    auto context = std::make_shared<grpc::ClientContext>();
    {
      absl::MutexLock lock(&mu_);
      if (stopping_ || w->removed) return;
      w->watch_context = context;
    }
    std::unique_ptr<grpc::ClientReader<LoadReport>> reader =
        stub->Watch(context.get(), internal::v1::WatchLoadRequest());
    LoadReport report;
    bool any = false;
    while (reader->Read(&report)) {
      if (!any) {
        any = true;
        services::Log("info", "worker load stream up", {},
                      {{"worker", w->address}, {"worker_id", report.worker_id()}});
      }
      OnReport(*w, report);
      backoff = options_.watch_backoff_initial;
    }
    const grpc::Status status = reader->Finish();
    bool was_up, quiet;
    {
      absl::MutexLock lock(&mu_);
      w->watch_context.reset();
      was_up = w->load_up;
      w->load_up = false;
      if (was_up) ++version_;
      quiet = stopping_ || w->removed;  // ended by the registry itself
    }
    if (was_up && !quiet) {
      services::Log("warning", "worker load stream ended", {},
                    {{"worker", w->address}, {"status", status.error_message()}});
      NotifyChange();
    }
    absl::MutexLock lock(&mu_);
    auto done = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_ || w->removed; };
    if (mu_.AwaitWithTimeout(absl::Condition(&done), backoff)) return;
    backoff = std::min(backoff * 2, options_.watch_backoff_max);
  }
}

void WorkerRegistry::OnReport(Worker& w, const LoadReport& report) {
  bool warn_role = false;
  {
    absl::MutexLock lock(&mu_);
    if (w.removed) return;
    w.report = report;
    w.load_up = true;
    ++w.report_seq;
    for (auto c = charges_.begin(); c != charges_.end();) {
      const ChargeEntry& e = c->second;
      const bool expired =
          e.worker == w.address && e.drop_at_report && *e.drop_at_report <= w.report_seq;
      c = expired ? charges_.erase(c) : std::next(c);
    }
    const WorkerRole role = FromProtoRole(report.role());
    const bool role_fits = w.expected_role == WorkerRole::kPrefill
                               ? role == WorkerRole::kPrefill
                               : (role == WorkerRole::kDecode || role == WorkerRole::kAggregated);
    if (!role_fits && !w.role_warned) {
      w.role_warned = true;
      warn_role = true;
    }
    ++version_;
  }
  if (warn_role) {
    services::Log("warning", "worker reports a role other than its group's", {},
                  {{"worker", w.address},
                   {"reported", RoleName(FromProtoRole(report.role()))},
                   {"group", RoleName(w.expected_role)}});
  }
  NotifyChange();
}

void WorkerRegistry::NotifyChange() {
  absl::MutexLock lock(&listener_mu_);
  if (listener_) listener_();
}

void WorkerRegistry::SetChangeListener(std::function<void()> listener) {
  absl::MutexLock lock(&listener_mu_);
  listener_ = std::move(listener);
}

ClusterView WorkerRegistry::Snapshot() const {
  ClusterView view;
  absl::MutexLock lock(&mu_);
  std::map<std::string, size_t> index;
  for (const auto& [address, w] : workers_) {
    WorkerView v;
    v.id = address;
    v.address = address;
    if (w->report) {
      const LoadReport& r = *w->report;
      v.role = FromProtoRole(r.role());
      v.draining = r.draining();
      v.kv_blocks_total = r.kv_blocks_total();
      v.kv_blocks_free = r.kv_blocks_free();
      v.kv_blocks_committed = r.kv_blocks_committed();
      v.kv_block_tokens = r.kv_block_tokens();
      v.running = r.running_requests();
      v.queued = r.queued_requests();
      v.queued_prefill_tokens = r.queued_prefill_tokens();
    }
    v.healthy = w->health_ok && w->load_up && w->report.has_value();
    index[address] = view.workers.size();
    view.workers.push_back(std::move(v));
  }
  for (const auto& [id, c] : charges_) {
    auto it = index.find(c.worker);
    if (it == index.end()) continue;
    WorkerView& v = view.workers[it->second];
    v.kv_blocks_committed += c.kv_blocks;
    v.kv_blocks_free = std::max<int64_t>(0, v.kv_blocks_free - c.kv_blocks);
    v.queued_prefill_tokens += c.prefill_tokens;
  }
  return view;
}

std::shared_ptr<grpc::Channel> WorkerRegistry::Channel(const std::string& id) const {
  absl::MutexLock lock(&mu_);
  auto it = workers_.find(id);
  return it == workers_.end() ? nullptr : it->second->channel;
}

uint64_t WorkerRegistry::Charge(const std::string& worker, int64_t kv_blocks,
                                int64_t prefill_tokens) {
  absl::MutexLock lock(&mu_);
  const uint64_t id = next_charge_++;
  charges_[id] = ChargeEntry{worker, kv_blocks, prefill_tokens, std::nullopt};
  ++version_;
  return id;
}

void WorkerRegistry::Settle(uint64_t charge, bool worker_has_it) {
  {
    absl::MutexLock lock(&mu_);
    auto it = charges_.find(charge);
    if (it == charges_.end()) return;
    auto w = workers_.find(it->second.worker);
    if (!worker_has_it || w == workers_.end()) {
      charges_.erase(it);
    } else {
      it->second.drop_at_report = w->second->report_seq + 2;
      return;
    }
    ++version_;
  }
  // Capacity came back: a waiting request may fit now.
  NotifyChange();
}

void WorkerRegistry::ReportUnavailable(const std::string& worker) {
  {
    absl::MutexLock lock(&mu_);
    auto it = workers_.find(worker);
    if (it == workers_.end() || !it->second->health_ok) return;
    it->second->health_ok = false;
    ++version_;
  }
  services::Log("warning", "worker unavailable; waiting for its health check", {},
                {{"worker", worker}});
  NotifyChange();
}

bool WorkerRegistry::WaitUntil(const std::function<bool(const ClusterView&)>& predicate,
                               absl::Time deadline) {
  while (true) {
    uint64_t seen;
    {
      absl::MutexLock lock(&mu_);
      seen = version_;
    }
    if (predicate(Snapshot())) return true;
    absl::MutexLock lock(&mu_);
    auto changed = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return version_ != seen; };
    if (!mu_.AwaitWithDeadline(absl::Condition(&changed), deadline)) return false;
  }
}

}  // namespace dserve::router
