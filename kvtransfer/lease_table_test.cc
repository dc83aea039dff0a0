// kvtransfer/lease_table_test.cc: the lease state machine without a network:
// every way a lease ends releases its blocks exactly once, never while a
// live mover may still write, and late messages get the right refusal.
#include "kvtransfer/lease_table.h"

#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dserve::kvtransfer {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::HasSubstr;

// 2 layers x 8 blocks x 4 tokens x 16 bytes, layer-major: block b of layer l
// starts at l * 512 + b * 64.
const KvPoolLayout kLayout = LayerMajorLayout(
    {.num_layers = 2, .num_blocks = 8, .block_tokens = 4, .bytes_per_token_per_layer = 16});
constexpr KvPeerId kMover = 7;
constexpr KvPeerId kOtherMover = 9;
const absl::Time kT0 = absl::FromUnixSeconds(1000);
constexpr uint64_t kFingerprint = 0x5EED;

class KvLeaseTableTest : public ::testing::Test {
 protected:
  KvLeaseTable::OpenResult Open(std::vector<KvBlockId> blocks = {1, 2},
                                KvLeaseAccess access = KvLeaseAccess::kWrite) {
    return table_.Open(
        0, kLayout, std::move(blocks), access, kT0 + absl::Seconds(1),
        [this](std::vector<KvBlockId> blocks) {
          ++releases_;
          released_blocks_ += static_cast<int>(blocks.size());
        },
        kFingerprint);
  }
  // Run carries out the releases as the transport does, checking that the
  // table counts every one it handed out until it is reported back.
  void Run() {
    const auto n = static_cast<int64_t>(actions_.releases.size());
    EXPECT_EQ(table_.releases_running(), n);
    actions_.RunReleases();
    table_.ReleasesRan(n);
  }

  KvLeaseTable table_{42};
  KvLeaseActions actions_;
  int releases_ = 0;
  int released_blocks_ = 0;
};

TEST_F(KvLeaseTableTest, CommitHandsBlocksBackWithoutRelease) {
  auto lease = Open();
  EXPECT_EQ(table_.Await(lease.lease_id), std::nullopt);
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  auto ack = table_.Commit(lease.lease_id, lease.generation, kMover, 0, actions_);
  ASSERT_TRUE(ack.has_value());
  EXPECT_OK(*ack);
  // A duplicated commit is acked again and changes nothing.
  ack = table_.Commit(lease.lease_id, lease.generation, kMover, 0, actions_);
  ASSERT_TRUE(ack.has_value());
  EXPECT_OK(*ack);
  EXPECT_OK(*table_.Await(lease.lease_id));
  EXPECT_EQ(table_.size(), 0);
  // After hand-back, a late commit is refused and nothing is released.
  ack = table_.Commit(lease.lease_id, lease.generation, kMover, 0, actions_);
  EXPECT_THAT(*ack, StatusIs(absl::StatusCode::kAborted, HasSubstr("committed")));
  table_.Expire(kT0 + absl::Hours(1), actions_);
  Run();
  EXPECT_EQ(releases_, 0);
}

TEST_F(KvLeaseTableTest, UnboundLeaseExpiresAndReleasesAtOnce) {
  auto lease = Open();
  table_.Expire(kT0 + absl::Milliseconds(999), actions_);
  Run();
  EXPECT_EQ(releases_, 0);
  table_.Expire(kT0 + absl::Seconds(1), actions_);
  EXPECT_TRUE(actions_.revokes.empty());
  Run();
  EXPECT_EQ(releases_, 1);
  EXPECT_EQ(released_blocks_, 2);
  EXPECT_THAT(*table_.Await(lease.lease_id), StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_THAT(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
}

TEST_F(KvLeaseTableTest, ExpiredBoundLeaseWaitsForFenceThenReleasesOnce) {
  auto lease = Open();
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  table_.Expire(kT0 + absl::Seconds(2), actions_);
  ASSERT_EQ(actions_.revokes.size(), 1u);
  EXPECT_EQ(actions_.revokes[0].mover, kMover);
  EXPECT_THAT(actions_.revokes[0].reason, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_TRUE(actions_.releases.empty());  // the mover may still be writing
  EXPECT_EQ(table_.UnfencedRevokes().size(), 1u);
  table_.Fenced(lease.lease_id, lease.generation, kMover, actions_);
  Run();
  EXPECT_EQ(releases_, 1);
  table_.Fenced(lease.lease_id, lease.generation, kMover, actions_);
  table_.PeerDead(kMover, actions_);
  Run();
  EXPECT_EQ(releases_, 1);
  EXPECT_EQ(table_.size(), 0);
  EXPECT_TRUE(table_.UnfencedRevokes().empty());
}

TEST_F(KvLeaseTableTest, LateCommitAfterExpiryIsRefusedAndFences) {
  auto lease = Open();
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  table_.Expire(kT0 + absl::Seconds(2), actions_);
  auto ack = table_.Commit(lease.lease_id, lease.generation, kMover, 0, actions_);
  EXPECT_THAT(*ack, StatusIs(absl::StatusCode::kDeadlineExceeded));
  Run();
  EXPECT_EQ(releases_, 1);  // the commit followed the mover's flush
}

TEST_F(KvLeaseTableTest, HolderAbortRacingCommit) {
  // Abort first: the commit is refused, and it fences.
  auto a = Open({1});
  ASSERT_OK(table_.Bind(a.lease_id, a.generation, kMover, kT0, kFingerprint));
  table_.Abort(a.lease_id, actions_);
  EXPECT_EQ(actions_.revokes.size(), 1u);
  EXPECT_THAT(*table_.Commit(a.lease_id, a.generation, kMover, 0, actions_),
              StatusIs(absl::StatusCode::kAborted));
  Run();
  EXPECT_EQ(releases_, 1);
  // Commit first: the abort still wins for the holder and releases once,
  // without a revoke (the mover is done).
  auto b = Open({3});
  ASSERT_OK(table_.Bind(b.lease_id, b.generation, kMover, kT0, kFingerprint));
  EXPECT_OK(*table_.Commit(b.lease_id, b.generation, kMover, 0, actions_));
  actions_.revokes.clear();
  table_.Abort(b.lease_id, actions_);
  table_.Abort(b.lease_id, actions_);
  EXPECT_TRUE(actions_.revokes.empty());
  Run();
  EXPECT_EQ(releases_, 2);
  EXPECT_THAT(*table_.Await(b.lease_id), StatusIs(absl::StatusCode::kAborted));
}

TEST_F(KvLeaseTableTest, MoverAbortAndDeathRelease) {
  auto a = Open({1});
  ASSERT_OK(table_.Bind(a.lease_id, a.generation, kMover, kT0, kFingerprint));
  table_.MoverAborted(a.lease_id, a.generation, kOtherMover, actions_);  // not its mover
  Run();
  EXPECT_EQ(releases_, 0);
  table_.MoverAborted(a.lease_id, a.generation, kMover, actions_);
  Run();
  EXPECT_EQ(releases_, 1);
  EXPECT_THAT(*table_.Await(a.lease_id), StatusIs(absl::StatusCode::kAborted));

  auto b = Open({2});
  ASSERT_OK(table_.Bind(b.lease_id, b.generation, kMover, kT0, kFingerprint));
  EXPECT_THAT(table_.WatchedMovers(), ::testing::ElementsAre(kMover));
  table_.PeerDead(kMover, actions_);
  Run();
  EXPECT_EQ(releases_, 2);
  EXPECT_THAT(*table_.Await(b.lease_id), StatusIs(absl::StatusCode::kUnavailable));
  EXPECT_TRUE(table_.WatchedMovers().empty());
}

TEST_F(KvLeaseTableTest, BindChecksGenerationAndOwner) {
  auto lease = Open();
  EXPECT_THAT(table_.Bind(lease.lease_id, lease.generation ^ 4, kMover, kT0, kFingerprint),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("generation")));
  EXPECT_THAT(table_.Bind(lease.lease_id + 100, lease.generation, kMover, kT0, kFingerprint),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("unknown")));
  EXPECT_THAT(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint + 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("differ")));
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  EXPECT_THAT(table_.Bind(lease.lease_id, lease.generation, kOtherMover, kT0, kFingerprint),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  EXPECT_THAT(*table_.Commit(lease.lease_id, lease.generation, kOtherMover, 0, actions_),
              StatusIs(absl::StatusCode::kFailedPrecondition));
  // A holder restarted with another epoch never accepts the old target.
  KvLeaseTable restarted(43);
  auto again = restarted.Open(0, kLayout, {1, 2}, KvLeaseAccess::kWrite, kT0 + absl::Seconds(1),
                              nullptr, kFingerprint);
  EXPECT_EQ(again.lease_id, lease.lease_id);
  EXPECT_NE(again.generation, lease.generation);
}

TEST_F(KvLeaseTableTest, ReceivesAreCheckedAgainstTheLeaseBlocks) {
  auto lease = Open({1, 2});  // layer 0: [64, 192); layer 1: [576, 704)
  KvRegionId region = -1;
  EXPECT_FALSE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 64, 16, &region))
      << "unbound";
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  EXPECT_TRUE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 64, 128, &region));
  EXPECT_EQ(region, 0);
  EXPECT_TRUE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 576, 128, &region));
  EXPECT_FALSE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 0, 16, &region));
  EXPECT_FALSE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 64, 129, &region));
  EXPECT_FALSE(table_.BeginReceive(lease.lease_id, lease.generation, kOtherMover, 64, 16, &region));
  EXPECT_FALSE(table_.BeginReceive(lease.lease_id, lease.generation ^ 4, kMover, 64, 16, &region));
  EXPECT_FALSE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 1 << 20, 16, &region));

  // The commit waits for the two receives in flight, then acks.
  auto ack = table_.Commit(lease.lease_id, lease.generation, kMover, 256, actions_);
  EXPECT_FALSE(ack.has_value());
  EXPECT_FALSE(table_.FinishReceive(lease.lease_id, 128, true, actions_).has_value());
  auto deferred = table_.FinishReceive(lease.lease_id, 128, true, actions_);
  ASSERT_TRUE(deferred.has_value());
  EXPECT_OK(deferred->status);
  EXPECT_EQ(deferred->mover, kMover);
  EXPECT_OK(*table_.Await(lease.lease_id));
}

TEST_F(KvLeaseTableTest, ReadLeaseRefusesIncomingData) {
  auto lease = Open({1}, KvLeaseAccess::kRead);
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  KvRegionId region = -1;
  EXPECT_FALSE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 64, 16, &region));
}

TEST_F(KvLeaseTableTest, ExpiryWithDataInFlightReleasesAfterTheLastReceive) {
  auto lease = Open({1});
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  KvRegionId region = -1;
  ASSERT_TRUE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 64, 64, &region));
  table_.PeerDead(kMover, actions_);
  Run();
  EXPECT_EQ(releases_, 0);  // a receive is still writing into the blocks
  // No new data is accepted once the lease has ended.
  EXPECT_FALSE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 64, 64, &region));
  table_.FinishReceive(lease.lease_id, 64, false, actions_);
  Run();
  EXPECT_EQ(releases_, 1);
}

TEST_F(KvLeaseTableTest, CommitWithMissingBytesIsDataLoss) {
  auto lease = Open({1});
  ASSERT_OK(table_.Bind(lease.lease_id, lease.generation, kMover, kT0, kFingerprint));
  KvRegionId region = -1;
  ASSERT_TRUE(table_.BeginReceive(lease.lease_id, lease.generation, kMover, 64, 64, &region));
  EXPECT_FALSE(table_.Commit(lease.lease_id, lease.generation, kMover, 64, actions_).has_value());
  auto ack = table_.FinishReceive(lease.lease_id, 64, /*ok=*/false, actions_);
  ASSERT_TRUE(ack.has_value());
  EXPECT_THAT(ack->status, StatusIs(absl::StatusCode::kDataLoss));
  Run();
  EXPECT_EQ(releases_, 1);
}

}  // namespace
}  // namespace dserve::kvtransfer
