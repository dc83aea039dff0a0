// router/worker_registry_test.cc: membership, health, load streams and local
// load accounting of the worker registry, against fake workers on
// 127.0.0.1:0.
#include "router/worker_registry.h"

#include <map>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "router/testing/fake_worker.h"

namespace dserve::router {
namespace {

namespace iv1 = ::dserve::internal::v1;
using ::dserve::router::testing::FakeScript;
using ::dserve::router::testing::FakeWorker;
using ::dserve::testing::StatusIs;
using ::testing::Contains;
using ::testing::HasSubstr;

WorkerRegistryOptions FastOptions() {
  WorkerRegistryOptions o;
  o.health_check_interval = absl::Milliseconds(30);
  o.health_check_timeout = absl::Milliseconds(500);
  o.watch_backoff_initial = absl::Milliseconds(20);
  o.watch_backoff_max = absl::Milliseconds(100);
  return o;
}

FakeScript Aggregated(int64_t blocks_total) {
  FakeScript s;
  s.role = iv1::WORKER_ROLE_AGGREGATED;
  s.kv_blocks_total = blocks_total;
  return s;
}

const WorkerView* Find(const ClusterView& view, const std::string& id) {
  for (const WorkerView& w : view.workers) {
    if (w.id == id) return &w;
  }
  return nullptr;
}

bool Healthy(WorkerRegistry& registry, const std::string& id, bool healthy) {
  return registry.WaitUntil(
      [&](const ClusterView& view) {
        const WorkerView* w = Find(view, id);
        return w != nullptr && w->healthy == healthy;
      },
      absl::Now() + absl::Seconds(5));
}

TEST(WorkerRegistryTest, ValidatesGroups) {
  config::v1::RouterConfig config;
  EXPECT_THAT(WorkerRegistry::Create(config, FastOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("decode_workers")));
  config.mutable_decode_workers()->add_addresses("no-port");
  EXPECT_THAT(WorkerRegistry::Create(config, FastOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("decode_workers.addresses[0] must be host:port")));
  config.mutable_decode_workers()->set_addresses(0, "127.0.0.1:1");
  config.mutable_decode_workers()->set_dns_name("localhost:1");
  EXPECT_THAT(WorkerRegistry::Create(config, FastOptions()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("not both")));
}

TEST(WorkerRegistryTest, ResolvesHostPort) {
  ASSERT_OK_AND_ASSIGN(auto v4, ResolveHostPort("127.0.0.1:8080"));
  EXPECT_EQ(v4, std::vector<std::string>{"127.0.0.1:8080"});
  ASSERT_OK_AND_ASSIGN(auto v6, ResolveHostPort("[::1]:9"));
  EXPECT_EQ(v6, std::vector<std::string>{"[::1]:9"});
  ASSERT_OK_AND_ASSIGN(auto local, ResolveHostPort("localhost:7"));
  EXPECT_THAT(local, Contains("127.0.0.1:7"));
  EXPECT_THAT(ResolveHostPort("localhost"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ResolveHostPort("no-such-host.invalid:1"), StatusIs(absl::StatusCode::kUnavailable));
}

TEST(WorkerRegistryTest, FollowsHealthAndLoad) {
  FakeWorker worker(Aggregated(40));
  config::v1::RouterConfig config;
  config.mutable_decode_workers()->add_addresses(worker.address());
  ASSERT_OK_AND_ASSIGN(auto registry, WorkerRegistry::Create(config, FastOptions()));
  ASSERT_TRUE(Healthy(*registry, worker.address(), true));
  ClusterView view = registry->Snapshot();
  ASSERT_EQ(view.workers.size(), 1u);
  EXPECT_EQ(view.workers[0].role, WorkerRole::kAggregated);
  EXPECT_EQ(view.workers[0].kv_blocks_total, 40);
  EXPECT_EQ(view.workers[0].kv_block_tokens, 16);
  EXPECT_NE(registry->Channel(worker.address()), nullptr);
  EXPECT_EQ(registry->Channel("127.0.0.1:1"), nullptr);

  // Later reports replace earlier ones.
  worker.Update([](FakeScript& s) { s.kv_blocks_committed = 25; });
  ASSERT_TRUE(registry->WaitUntil(
      [&](const ClusterView& v) { return v.workers[0].kv_blocks_committed == 25; },
      absl::Now() + absl::Seconds(5)));

  // A failed health check takes the worker out; a passing one brings it back.
  worker.SetHealthy(false);
  ASSERT_TRUE(Healthy(*registry, worker.address(), false));
  worker.SetHealthy(true);
  ASSERT_TRUE(Healthy(*registry, worker.address(), true));

  // So does ReportUnavailable, until the next passing check.
  registry->ReportUnavailable(worker.address());
  EXPECT_FALSE(Find(registry->Snapshot(), worker.address())->healthy);
  ASSERT_TRUE(Healthy(*registry, worker.address(), true));

  // A worker that dies loses its load stream and its health.
  worker.Stop();
  ASSERT_TRUE(Healthy(*registry, worker.address(), false));
}

TEST(WorkerRegistryTest, ChargesSpreadABurstUntilReportsCatchUp) {
  FakeWorker a(Aggregated(10));
  FakeWorker b(Aggregated(10));
  config::v1::RouterConfig config;
  config.mutable_decode_workers()->add_addresses(a.address());
  config.mutable_decode_workers()->add_addresses(b.address());
  ASSERT_OK_AND_ASSIGN(auto registry, WorkerRegistry::Create(config, FastOptions()));
  ASSERT_TRUE(Healthy(*registry, a.address(), true));
  ASSERT_TRUE(Healthy(*registry, b.address(), true));

  // Four requests of 4 blocks each: the charges alternate them over the two
  // workers, and the fifth finds no room anywhere.
  LeastLoadedPolicy policy;
  RequestInfo request;
  request.prompt_tokens = 32;
  request.max_tokens = 32;
  std::vector<uint64_t> charges;
  std::map<std::string, int> placed;
  for (int i = 0; i < 4; ++i) {
    ASSERT_OK_AND_ASSIGN(Placement p, policy.Place(request, registry->Snapshot()));
    EXPECT_EQ(p.kv_blocks, 4);
    ++placed[p.decode_worker];
    charges.push_back(registry->Charge(p.decode_worker, p.kv_blocks, 0));
  }
  EXPECT_EQ(placed[a.address()], 2);
  EXPECT_EQ(placed[b.address()], 2);
  EXPECT_THAT(policy.Place(request, registry->Snapshot()),
              StatusIs(absl::StatusCode::kResourceExhausted));

  // A charge the worker refused is dropped at once.
  registry->Settle(charges[0], /*worker_has_it=*/false);
  EXPECT_OK(policy.Place(request, registry->Snapshot()).status());

  // A charge the worker took is dropped once its reports have caught up;
  // the fakes report nothing committed, so the room comes back.
  for (size_t i = 1; i < charges.size(); ++i) registry->Settle(charges[i], true);
  ASSERT_TRUE(registry->WaitUntil(
      [](const ClusterView& view) {
        for (const WorkerView& w : view.workers) {
          if (w.kv_blocks_committed != 0) return false;
        }
        return true;
      },
      absl::Now() + absl::Seconds(5)));
}

TEST(WorkerRegistryTest, DnsNameMembers) {
  FakeWorker worker(Aggregated(10));
  const std::string port = worker.address().substr(worker.address().rfind(':') + 1);
  config::v1::RouterConfig config;
  config.mutable_decode_workers()->set_dns_name("127.0.0.1:" + port);
  config.mutable_decode_workers()->mutable_resolve_interval()->set_nanos(50'000'000);
  ASSERT_OK_AND_ASSIGN(auto registry, WorkerRegistry::Create(config, FastOptions()));
  ASSERT_TRUE(Healthy(*registry, worker.address(), true));
}

}  // namespace
}  // namespace dserve::router
