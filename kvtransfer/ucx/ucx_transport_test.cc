// kvtransfer/ucx/ucx_transport_test.cc: the UCX transport between two
// transports in one process (two UCP contexts and workers, real endpoints
// over loopback tcp or shared memory). Cross-process behaviour and faults
// are tested in tests/kvtransfer_test.cc.
#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtransfer/transport.h"

namespace dserve::kvtransfer {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::HasSubstr;

struct Pool {
  KvRegion region;
  KvPoolLayout layout;
};

Pool MakePool(KvTransport& transport, const KvPoolShape& shape, bool layer_major) {
  KvPoolLayout layout = layer_major ? LayerMajorLayout(shape) : BlockMajorLayout(shape);
  auto region = transport.AllocateRegion(layout.pool_bytes);
  EXPECT_OK(region.status());
  return {*region, layout};
}

void FillRandom(const KvRegion& region, uint64_t seed) {
  std::mt19937_64 rng(seed);
  auto* words = reinterpret_cast<uint64_t*>(region.data);
  for (int64_t i = 0; i < region.bytes / 8; ++i) words[i] = rng();
}

// TokenBytes: the bytes of token `t`, layer `l` in a pool.
const uint8_t* TokenBytes(const Pool& pool, std::span<const KvBlockId> blocks, int64_t l,
                          int64_t t) {
  const KvPoolLayout& y = pool.layout;
  return pool.region.data + y.base_offset_bytes + l * y.layer_stride_bytes +
         blocks[t / y.block_tokens] * y.block_stride_bytes +
         (t % y.block_tokens) * y.bytes_per_token_per_layer;
}

std::vector<KvBlockId> RandomBlocks(int64_t num_blocks, int64_t count, uint64_t seed) {
  std::vector<KvBlockId> ids(num_blocks);
  std::iota(ids.begin(), ids.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(ids.begin(), ids.end(), rng);
  ids.resize(count);
  return ids;
}

class UcxTransportTest : public ::testing::TestWithParam<KvTransportKind> {
 protected:
  void SetUp() override {
    KvTransportOptions options;
    options.kind = GetParam();
    options.peer_timeout = absl::Seconds(2);
    ASSERT_OK_AND_ASSIGN(holder_, CreateKvTransport(options));
    ASSERT_OK_AND_ASSIGN(mover_, CreateKvTransport(options));
  }
  std::unique_ptr<KvTransport> holder_;
  std::unique_ptr<KvTransport> mover_;
};

TEST_P(UcxTransportTest, DescribeNamesTransportAndDeviceMemory) {
  EXPECT_THAT(holder_->Describe(), HasSubstr(KvTransportKindName(GetParam())));
  EXPECT_THAT(holder_->Describe(), HasSubstr("device memory"));
}

TEST_P(UcxTransportTest, PushAndPullAreByteExactAcrossLayouts) {
  const KvPoolShape src_shape{
      .num_layers = 3, .num_blocks = 40, .block_tokens = 16, .bytes_per_token_per_layer = 96};
  const KvPoolShape dst_shape{
      .num_layers = 3, .num_blocks = 12, .block_tokens = 64, .bytes_per_token_per_layer = 96};
  for (KvLeaseAccess access : {KvLeaseAccess::kWrite, KvLeaseAccess::kRead}) {
    for (bool layer_major : {true, false}) {
      SCOPED_TRACE(absl::StrCat(access == KvLeaseAccess::kWrite ? "push" : "pull",
                                layer_major ? " layer-major" : " block-major"));
      // Push: the mover owns 16-token blocks, the holder 64-token ones. Pull:
      // the holder's pool is the source.
      const bool push = access == KvLeaseAccess::kWrite;
      Pool mover_pool = MakePool(*mover_, push ? src_shape : dst_shape, layer_major);
      Pool holder_pool = MakePool(*holder_, push ? dst_shape : src_shape, true);
      FillRandom(push ? mover_pool.region : holder_pool.region, 7);
      const int64_t tokens = 300;
      const int64_t src_block_count = (tokens + 15) / 16, dst_block_count = (tokens + 63) / 64;
      std::vector<KvBlockId> src_blocks = RandomBlocks(src_shape.num_blocks, src_block_count, 1);
      std::vector<KvBlockId> dst_blocks = RandomBlocks(dst_shape.num_blocks, dst_block_count, 2);
      std::vector<KvBlockId>& holder_blocks = push ? dst_blocks : src_blocks;
      std::vector<KvBlockId>& mover_blocks = push ? src_blocks : dst_blocks;

      int released = 0;
      ASSERT_OK_AND_ASSIGN(
          KvLeaseTarget target,
          holder_->OpenLease(holder_pool.region.id, holder_pool.layout, holder_blocks, access,
                             absl::Seconds(10), [&](std::vector<KvBlockId>) { ++released; }));
      ASSERT_OK_AND_ASSIGN(KvLeaseTarget wire, ParseLeaseTarget(SerializeLeaseTarget(target)));
      KvLocalBlocks local{.region = mover_pool.region.id,
                          .layout = mover_pool.layout,
                          .blocks = mover_blocks,
                          .num_tokens = tokens};
      ASSERT_OK_AND_ASSIGN(auto transfer,
                           mover_->Open(wire, local, absl::Now() + absl::Seconds(5)));
      ASSERT_OK(transfer->Submit({0, 1}));
      ASSERT_OK(transfer->Submit({2, 3}));
      ASSERT_OK(transfer->Commit(absl::Now() + absl::Seconds(5)));
      ASSERT_OK(holder_->AwaitLease(target.lease_id, absl::Now() + absl::Seconds(5)));
      EXPECT_EQ(released, 0);
      EXPECT_EQ(holder_->LeasesOpen(), 0);

      const Pool& src = push ? mover_pool : holder_pool;
      const Pool& dst = push ? holder_pool : mover_pool;
      for (int64_t l = 0; l < 3; ++l) {
        for (int64_t t = 0; t < tokens; ++t) {
          ASSERT_EQ(0, std::memcmp(TokenBytes(src, src_blocks, l, t),
                                   TokenBytes(dst, dst_blocks, l, t), 96))
              << "layer " << l << " token " << t;
        }
      }
    }
  }
}

// Live migration uses the same calls: the destination leases blocks, the
// source moves the request's tokens so far, then (after more decode steps)
// the tokens generated meanwhile, with first_token > 0, into the same blocks.
TEST_P(UcxTransportTest, MigrationMovesARunningRequestInTwoPhases) {
  const KvPoolShape shape{
      .num_layers = 2, .num_blocks = 32, .block_tokens = 16, .bytes_per_token_per_layer = 128};
  Pool source = MakePool(*mover_, shape, true);
  Pool destination = MakePool(*holder_, shape, true);
  FillRandom(source.region, 21);
  std::vector<KvBlockId> src_blocks = RandomBlocks(32, 8, 4);
  std::vector<KvBlockId> dst_blocks = RandomBlocks(32, 8, 5);
  const int64_t first_phase = 100, second_phase = 23;  // token 100 is mid-block
  int released = 0;
  auto move = [&](int64_t first_token, int64_t num_tokens) {
    ASSERT_OK_AND_ASSIGN(KvLeaseTarget target,
                         holder_->OpenLease(destination.region.id, destination.layout, dst_blocks,
                                            KvLeaseAccess::kWrite, absl::Seconds(10),
                                            [&](std::vector<KvBlockId>) { ++released; }));
    KvLocalBlocks local{.region = source.region.id,
                        .layout = source.layout,
                        .blocks = src_blocks,
                        .num_tokens = num_tokens,
                        .first_token = first_token};
    ASSERT_OK_AND_ASSIGN(auto transfer,
                         mover_->Open(target, local, absl::Now() + absl::Seconds(5)));
    ASSERT_OK(transfer->Commit(absl::Now() + absl::Seconds(5)));
    ASSERT_OK(holder_->AwaitLease(target.lease_id, absl::Now() + absl::Seconds(5)));
  };
  move(0, first_phase);
  // The source keeps decoding: its tokens after the first phase change.
  for (int64_t l = 0; l < 2; ++l) {
    for (int64_t t = first_phase; t < first_phase + second_phase; ++t) {
      std::memset(const_cast<uint8_t*>(TokenBytes(source, src_blocks, l, t)), static_cast<int>(t),
                  128);
    }
  }
  move(first_phase, second_phase);
  EXPECT_EQ(released, 0);
  for (int64_t l = 0; l < 2; ++l) {
    for (int64_t t = 0; t < first_phase + second_phase; ++t) {
      ASSERT_EQ(0, std::memcmp(TokenBytes(source, src_blocks, l, t),
                               TokenBytes(destination, dst_blocks, l, t), 128))
          << "layer " << l << " token " << t;
    }
    // Nothing past the moved tokens was written.
    const uint8_t* after = TokenBytes(destination, dst_blocks, l, first_phase + second_phase);
    for (int i = 0; i < 128; ++i) ASSERT_EQ(after[i], 0);
  }
}

TEST_P(UcxTransportTest, WrongGenerationIsRefusedBeforeAnyWrite) {
  const KvPoolShape shape{
      .num_layers = 2, .num_blocks = 8, .block_tokens = 16, .bytes_per_token_per_layer = 64};
  Pool a = MakePool(*mover_, shape, true);
  Pool b = MakePool(*holder_, shape, true);
  FillRandom(a.region, 3);
  std::vector<KvBlockId> blocks = {1, 2};
  int released = 0;
  ASSERT_OK_AND_ASSIGN(
      KvLeaseTarget target,
      holder_->OpenLease(b.region.id, b.layout, blocks, KvLeaseAccess::kWrite, absl::Seconds(10),
                         [&](std::vector<KvBlockId>) { ++released; }));
  KvLeaseTarget wrong = target;
  wrong.generation ^= 2;
  KvLocalBlocks local{
      .region = a.region.id, .layout = a.layout, .blocks = blocks, .num_tokens = 32};
  EXPECT_THAT(mover_->Open(wrong, local, absl::Now() + absl::Seconds(5)).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("generation")));
  KvLocalBlocks too_many = local;
  too_many.num_tokens = 33;
  EXPECT_THAT(mover_->Open(target, too_many, absl::Now() + absl::Seconds(5)).status(),
              StatusIs(absl::StatusCode::kInvalidArgument));
  for (int64_t i = 0; i < b.region.bytes; ++i) ASSERT_EQ(b.region.data[i], 0);
  holder_->AbortLease(target.lease_id);
  EXPECT_THAT(holder_->AwaitLease(target.lease_id, absl::Now() + absl::Seconds(5)),
              StatusIs(absl::StatusCode::kAborted));
  for (int i = 0; i < 100 && released == 0; ++i) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(released, 1);
}

TEST_P(UcxTransportTest, LeaseExpiryDuringSlowTransferNeverTouchesReusedBlocks) {
  KvTransportOptions slow;
  slow.kind = GetParam();
  slow.max_ops_in_flight = 1;
  slow.faults.delay_per_op = absl::Milliseconds(10);
  ASSERT_OK_AND_ASSIGN(auto slow_mover, CreateKvTransport(slow));
  const KvPoolShape shape{
      .num_layers = 4, .num_blocks = 64, .block_tokens = 16, .bytes_per_token_per_layer = 64};
  Pool a = MakePool(*slow_mover, shape, true);
  Pool b = MakePool(*holder_, shape, true);
  FillRandom(a.region, 5);
  std::vector<KvBlockId> src = RandomBlocks(64, 32, 8), dst = RandomBlocks(64, 32, 9);
  std::atomic<int> released{0};
  ASSERT_OK_AND_ASSIGN(
      KvLeaseTarget target,
      holder_->OpenLease(b.region.id, b.layout, dst, KvLeaseAccess::kWrite, absl::Milliseconds(150),
                         [&](std::vector<KvBlockId> blocks) {
                           // Reuse at once: another request's KV goes here.
                           for (KvBlockId id : blocks) {
                             for (int64_t l = 0; l < shape.num_layers; ++l) {
                               std::memset(b.region.data + l * b.layout.layer_stride_bytes +
                                               id * b.layout.block_stride_bytes,
                                           0xAB, 16 * 64);
                             }
                           }
                           released.fetch_add(1);
                         }));
  KvLocalBlocks local{
      .region = a.region.id, .layout = a.layout, .blocks = src, .num_tokens = 32 * 16};
  ASSERT_OK_AND_ASSIGN(auto transfer,
                       slow_mover->Open(target, local, absl::Now() + absl::Seconds(5)));
  // 4 layers x 32 scattered blocks at 10 ms each: far past the 150 ms lease.
  const absl::Time start = absl::Now();
  EXPECT_THAT(transfer->Commit(absl::Now() + absl::Seconds(10)),
              StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("expired")));
  EXPECT_LT(absl::Now() - start, absl::Seconds(3));
  EXPECT_THAT(holder_->AwaitLease(target.lease_id, absl::Now() + absl::Seconds(5)),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  for (int i = 0; i < 300 && released.load() == 0; ++i) absl::SleepFor(absl::Milliseconds(10));
  ASSERT_EQ(released.load(), 1);
  absl::SleepFor(absl::Milliseconds(100));  // anything still flying would land now
  for (KvBlockId id : dst) {
    for (int64_t l = 0; l < shape.num_layers; ++l) {
      const uint8_t* p =
          b.region.data + l * b.layout.layer_stride_bytes + id * b.layout.block_stride_bytes;
      for (int i = 0; i < 16 * 64; ++i) ASSERT_EQ(p[i], 0xAB) << "block " << id << " layer " << l;
    }
  }
  EXPECT_EQ(holder_->LeasesOpen(), 0);
  EXPECT_EQ(released.load(), 1);
}

TEST_P(UcxTransportTest, LostAndDuplicatedCommitMessages) {
  const KvPoolShape shape{
      .num_layers = 2, .num_blocks = 8, .block_tokens = 16, .bytes_per_token_per_layer = 64};
  for (int fault = 0; fault < 3; ++fault) {
    SCOPED_TRACE(fault == 0 ? "lost commit" : fault == 1 ? "duplicated commit" : "lost ack");
    KvTransportOptions options;
    options.kind = GetParam();
    if (fault == 0) options.faults.drop_commits = 1;
    if (fault == 1) options.faults.duplicate_commits = 1;
    KvTransportOptions holder_options;
    holder_options.kind = GetParam();
    if (fault == 2) holder_options.faults.drop_acks = 1;
    ASSERT_OK_AND_ASSIGN(auto mover, CreateKvTransport(options));
    ASSERT_OK_AND_ASSIGN(auto holder, CreateKvTransport(holder_options));
    Pool a = MakePool(*mover, shape, true);
    Pool b = MakePool(*holder, shape, true);
    FillRandom(a.region, 11);
    std::vector<KvBlockId> blocks = {3, 5};
    std::atomic<int> released{0};
    ASSERT_OK_AND_ASSIGN(KvLeaseTarget target,
                         holder->OpenLease(b.region.id, b.layout, blocks, KvLeaseAccess::kWrite,
                                           absl::Milliseconds(500),
                                           [&](std::vector<KvBlockId>) { released.fetch_add(1); }));
    KvLocalBlocks local{
        .region = a.region.id, .layout = a.layout, .blocks = blocks, .num_tokens = 32};
    ASSERT_OK_AND_ASSIGN(auto transfer, mover->Open(target, local, absl::Now() + absl::Seconds(5)));
    const absl::Status committed = transfer->Commit(absl::Now() + absl::Milliseconds(300));
    const absl::Status held = holder->AwaitLease(target.lease_id, absl::Now() + absl::Seconds(3));
    if (fault == 1) {
      EXPECT_OK(committed);
      EXPECT_OK(held);
    } else {
      EXPECT_THAT(committed, StatusIs(absl::StatusCode::kDeadlineExceeded));
      // Lost commit: the mover aborts after its deadline. Lost ack: the
      // holder had committed; the mover's abort takes the blocks back unless
      // the holder already took them.
      if (fault == 0) EXPECT_FALSE(held.ok());
    }
    for (int i = 0; i < 100 && holder->LeasesOpen() > 0; ++i)
      absl::SleepFor(absl::Milliseconds(10));
    EXPECT_EQ(holder->LeasesOpen(), 0);
    EXPECT_EQ(released.load(), held.ok() ? 0 : 1);
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, UcxTransportTest,
                         ::testing::Values(KvTransportKind::kTcp, KvTransportKind::kSharedMemory),
                         [](const auto& info) {
                           return std::string(KvTransportKindName(info.param));
                         });

}  // namespace
}  // namespace dserve::kvtransfer
