// router/policy_test.cc: least-loaded placement on hand-built cluster views.
#include "router/policy.h"

#include <algorithm>
#include <string>

#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dserve::router {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::HasSubstr;

WorkerView Decode(const std::string& id, int64_t total, int64_t committed, int32_t running = 0,
                  WorkerRole role = WorkerRole::kDecode) {
  WorkerView w;
  w.id = w.address = id;
  w.role = role;
  w.healthy = true;
  w.kv_blocks_total = total;
  w.kv_blocks_committed = committed;
  w.kv_blocks_free = total - committed;
  w.kv_block_tokens = 16;
  w.running = running;
  return w;
}

WorkerView Prefill(const std::string& id, int64_t queued_tokens) {
  WorkerView w;
  w.id = w.address = id;
  w.role = WorkerRole::kPrefill;
  w.healthy = true;
  w.queued_prefill_tokens = queued_tokens;
  return w;
}

RequestInfo Request(int64_t prompt, int64_t max_tokens) {
  RequestInfo r;
  r.prompt_tokens = prompt;
  r.max_tokens = max_tokens;
  return r;
}

TEST(PolicyTest, BlocksNeededRoundsUp) {
  EXPECT_EQ(KvBlocksNeeded(Request(16, 0), 16), 1);
  EXPECT_EQ(KvBlocksNeeded(Request(16, 1), 16), 2);
  EXPECT_EQ(KvBlocksNeeded(Request(100, 60), 16), 10);
}

TEST(PolicyTest, PicksMostUncommittedDecodeAndLeastQueuedPrefill) {
  ClusterView view;
  view.workers = {Decode("d1", 100, 80), Decode("d2", 100, 10), Decode("d3", 200, 150),
                  Prefill("p1", 500),    Prefill("p2", 20),     Prefill("p3", 300)};
  LeastLoadedPolicy policy;
  ASSERT_OK_AND_ASSIGN(Placement p, policy.Place(Request(10, 10), view));
  EXPECT_EQ(p.decode_worker, "d2");
  EXPECT_EQ(p.prefill_worker, "p2");
  EXPECT_EQ(p.kv_blocks, 2);
  EXPECT_FALSE(p.aggregated());
}

TEST(PolicyTest, TiesGoToFewestRunningThenAStableHash) {
  ClusterView view;
  view.workers = {Decode("a", 100, 0, 5), Decode("b", 100, 0, 2), Prefill("p", 0)};
  LeastLoadedPolicy policy;
  ASSERT_OK_AND_ASSIGN(Placement p, policy.Place(Request(10, 10), view));
  EXPECT_EQ(p.decode_worker, "b");

  // Identical workers: the choice does not depend on their order.
  ClusterView same;
  same.workers = {Decode("x", 100, 0), Decode("y", 100, 0), Decode("z", 100, 0), Prefill("p", 0)};
  ASSERT_OK_AND_ASSIGN(Placement first, policy.Place(Request(1, 1), same));
  std::reverse(same.workers.begin(), same.workers.end());
  ASSERT_OK_AND_ASSIGN(Placement second, policy.Place(Request(1, 1), same));
  EXPECT_EQ(first.decode_worker, second.decode_worker);
}

TEST(PolicyTest, SkipsUnhealthyDrainingAndUnreportedWorkers) {
  ClusterView view;
  WorkerView sick = Decode("sick", 1000, 0);
  sick.healthy = false;
  WorkerView draining = Decode("draining", 1000, 0);
  draining.draining = true;
  WorkerView unknown = Decode("unknown", 1000, 0);
  unknown.role = WorkerRole::kUnknown;
  WorkerView sick_prefill = Prefill("sick-p", 0);
  sick_prefill.healthy = false;
  view.workers = {sick, draining, unknown, Decode("ok", 10, 5), sick_prefill, Prefill("p", 900)};
  LeastLoadedPolicy policy;
  ASSERT_OK_AND_ASSIGN(Placement p, policy.Place(Request(16, 16), view));
  EXPECT_EQ(p.decode_worker, "ok");
  EXPECT_EQ(p.prefill_worker, "p");
}

TEST(PolicyTest, NothingFitsIsResourceExhausted) {
  ClusterView view;
  view.workers = {Decode("d1", 10, 9), Decode("d2", 10, 8), Prefill("p", 0)};
  LeastLoadedPolicy policy;
  EXPECT_THAT(policy.Place(Request(40, 10), view),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("no worker has room")));
  EXPECT_TRUE(CanEverFit(Request(40, 10), view));
  EXPECT_FALSE(CanEverFit(Request(1000, 10), view));
  EXPECT_THAT(policy.Place(Request(1, 1), ClusterView{}),
              StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_TRUE(CanEverFit(Request(1, 1), ClusterView{}));
}

TEST(PolicyTest, DecodeWorkersNeedAPrefillWorkerAggregatedOnesDoNot) {
  ClusterView view;
  view.workers = {Decode("d", 1000, 0)};
  LeastLoadedPolicy policy;
  EXPECT_THAT(policy.Place(Request(1, 1), view), StatusIs(absl::StatusCode::kResourceExhausted));

  EXPECT_FALSE(HasServingPath(view));
  view.workers.push_back(Prefill("p", 0));
  EXPECT_TRUE(HasServingPath(view));
  view.workers.pop_back();
  view.workers.push_back(Decode("agg", 100, 0, 0, WorkerRole::kAggregated));
  EXPECT_TRUE(HasServingPath(view));
  ASSERT_OK_AND_ASSIGN(Placement p, policy.Place(Request(1, 1), view));
  EXPECT_EQ(p.decode_worker, "agg");
  EXPECT_TRUE(p.aggregated());
}

TEST(PolicyTest, ExcludedPrefillWorkersAreSkipped) {
  ClusterView view;
  view.workers = {Decode("d", 100, 0), Prefill("p1", 0), Prefill("p2", 50)};
  LeastLoadedPolicy policy;
  RequestInfo r = Request(1, 1);
  r.exclude_prefill = {"p1"};
  ASSERT_OK_AND_ASSIGN(Placement p, policy.Place(r, view));
  EXPECT_EQ(p.prefill_worker, "p2");
  EXPECT_TRUE(HasUsablePrefill(r, view));
  r.exclude_prefill = {"p1", "p2"};
  EXPECT_THAT(policy.Place(r, view), StatusIs(absl::StatusCode::kResourceExhausted));
  EXPECT_FALSE(HasUsablePrefill(r, view));
}

TEST(PolicyTest, FactoryByName) {
  ASSERT_OK_AND_ASSIGN(auto policy, MakeRoutingPolicy("least-loaded"));
  EXPECT_EQ(policy->name(), "least-loaded");
  ASSERT_OK_AND_ASSIGN(policy, MakeRoutingPolicy(""));
  EXPECT_EQ(policy->name(), "least-loaded");
  EXPECT_THAT(MakeRoutingPolicy("round-robin"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("policy")));
}

}  // namespace
}  // namespace dserve::router
