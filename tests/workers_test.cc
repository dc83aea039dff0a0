// tests/workers_test.cc: the prefill and decode workers as real processes on
// loopback, driven through their internal RPCs the way the router drives
// them: Reserve -> Prefill (KV pushed over the KV transport) -> Decode. The
// tokens must equal a single-process engine's for the same seeds, and every
// way a request ends must give every block back.
#include <grpcpp/grpcpp.h>

#include <fstream>
#include <random>
#include <thread>

#include "base/status_macros.h"
#include "base/status_matchers.h"
#include "dserve/internal/v1/worker.grpc.pb.h"
#include "engine/engine.h"
#include "engine/test_models.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/runtime.h"
#include "services/worker_common.h"
#include "tests/child_process.h"

namespace dserve {
namespace {

using ::dserve::testing::ChildProcess;
using ::dserve::testing::StatusIs;
using ::testing::HasSubstr;
namespace iv1 = ::dserve::internal::v1;

constexpr absl::Duration kStartTimeout = absl::Seconds(60);

std::string BinPath(const char* name) { return absl::StrCat(DSERVE_BIN_DIR, "/", name); }

// Worker: one worker process and stubs to it.
struct Worker {
  std::unique_ptr<ChildProcess> process;
  std::string address;
  std::shared_ptr<grpc::Channel> channel;
};

absl::StatusOr<Worker> StartWorker(const std::string& binary, const std::string& model_dir,
                                   const std::string& config_json, std::vector<std::string> extra) {
  const std::string config_path =
      absl::StrCat(::testing::TempDir(), "/", binary, "-", getpid(), "-", rand(), ".json");
  std::ofstream(config_path) << config_json;
  std::vector<std::string> argv = {BinPath(binary.c_str()), "--config", config_path, "--model",
                                   model_dir};
  argv.insert(argv.end(), extra.begin(), extra.end());
  Worker w;
  DSERVE_ASSIGN_OR_RETURN(w.process, ChildProcess::Start(argv));
  DSERVE_ASSIGN_OR_RETURN(w.address, w.process->WaitForListening(kStartTimeout));
  w.channel = grpc::CreateChannel(w.address, grpc::InsecureChannelCredentials());
  return w;
}

// The decode pool uses 32-token blocks and the prefill pool 16, so every
// transfer converts layouts.
constexpr char kDecodeConfig[] = R"({
  "engine": {"kvBlockTokens": 32, "kvCacheTokens": 16384, "matmulBackend": "cpu"},
  "transport": {"kind": "shm", "peerTimeout": "1s"},
  "reservationTtl": "5s", "loadReportInterval": "0.05s", "server": {"drainTimeout": "2s"}})";
constexpr char kPrefillConfig[] = R"({
  "engine": {"kvBlockTokens": 16, "kvCacheTokens": 8192, "matmulBackend": "cpu"},
  "transport": {"kind": "shm", "peerTimeout": "1s"},
  "loadReportInterval": "0.05s", "server": {"drainTimeout": "2s"}})";

engine::GenerationRequest RandomRequest(std::mt19937& rng, uint64_t seed) {
  engine::GenerationRequest r;
  r.prompt.resize(1 + rng() % 90);
  for (engine::TokenId& t : r.prompt) t = static_cast<engine::TokenId>(rng() % 256);
  r.sampling.seed = seed;
  r.sampling.max_tokens = 1 + rng() % 40;
  r.sampling.temperature = (seed % 3 == 0) ? 0.0f : 0.9f;
  r.sampling.top_k = (seed % 2 == 0) ? 20 : 0;
  r.sampling.ignore_eos = seed % 5 != 0;
  return r;
}

// Outcome: what a request produced through the workers.
struct Outcome {
  std::vector<engine::TokenId> tokens;
  iv1::FinishReason finish = iv1::FINISH_REASON_UNSPECIFIED;
};

class WorkersTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(engine::testing::WriteTinyModel("workers", 3));
    decode_ = new Worker(StartWorker("dserve-decode", *model_dir_, kDecodeConfig,
                                     {"--worker-id", "decode-0"}).value());
    prefill_ = new Worker(StartWorker("dserve-prefill", *model_dir_, kPrefillConfig,
                                      {"--worker-id", "prefill-0"}).value());
  }
  static void TearDownTestSuite() {
    delete prefill_;
    delete decode_;
    delete model_dir_;
  }

  // Disaggregated: Reserve, Prefill, Decode; the first token comes from
  // the prefill worker, the rest from the decode stream.
  // With cancel_after >= 0 the client cancels the decode call after that
  // many stream messages.
  static absl::StatusOr<Outcome> Run(const engine::GenerationRequest& req, const std::string& id,
                                     int cancel_after = -1,
                                     absl::Duration decode_timeout = absl::Seconds(60)) {
    auto decode = iv1::Decode::NewStub(decode_->channel);
    auto prefill = iv1::Prefill::NewStub(prefill_->channel);
    iv1::Sampling sampling;
    services::SamplingToProto(req.sampling, &sampling);

    grpc::ClientContext reserve_ctx;
    reserve_ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    iv1::ReserveRequest reserve;
    reserve.set_request_id(id);
    reserve.set_prompt_tokens(static_cast<int32_t>(req.prompt.size()));
    reserve.set_max_tokens(req.sampling.max_tokens);
    iv1::ReserveResponse reservation;
    DSERVE_RETURN_IF_ERROR(services::FromGrpcStatus(
        decode->Reserve(&reserve_ctx, reserve, &reservation)));

    grpc::ClientContext prefill_ctx;
    prefill_ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(30)));
    iv1::PrefillRequest p;
    p.set_request_id(id);
    p.mutable_prompt()->Assign(req.prompt.begin(), req.prompt.end());
    *p.mutable_sampling() = sampling;
    p.set_kv_target(reservation.kv_target());
    iv1::PrefillResponse first;
    DSERVE_RETURN_IF_ERROR(services::FromGrpcStatus(prefill->Prefill(&prefill_ctx, p, &first)));

    grpc::ClientContext decode_ctx;
    decode_ctx.set_deadline(absl::ToChronoTime(absl::Now() + decode_timeout));
    iv1::DecodeRequest d;
    d.set_request_id(id);
    d.set_reservation_id(reservation.reservation_id());
    d.mutable_prompt()->Assign(req.prompt.begin(), req.prompt.end());
    d.set_first_token(first.first_token());
    *d.mutable_sampling() = sampling;
    Outcome out;
    out.tokens.push_back(first.first_token());
    auto reader = decode->Decode(&decode_ctx, d);
    iv1::DecodeResponse msg;
    for (int messages = 0; reader->Read(&msg); ++messages) {
      if (messages == cancel_after) decode_ctx.TryCancel();
      out.tokens.insert(out.tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
      if (msg.finish_reason() != iv1::FINISH_REASON_UNSPECIFIED) out.finish = msg.finish_reason();
    }
    DSERVE_RETURN_IF_ERROR(services::FromGrpcStatus(reader->Finish()));
    return out;
  }

  // Load: the worker's current load report.
  static iv1::LoadReport Load(const Worker& w) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    auto stub = iv1::WorkerLoad::NewStub(w.channel);
    auto reader = stub->Watch(&ctx, iv1::WatchLoadRequest());
    iv1::LoadReport report;
    EXPECT_TRUE(reader->Read(&report));
    ctx.TryCancel();
    reader->Finish().IgnoreError();
    return report;
  }

  // WaitIdle: true once the worker's load reports show every block free and
  // nothing admitted, running or leased, within `timeout`.
  static bool WaitIdle(const Worker& w, absl::Duration timeout = absl::Seconds(10)) {
    const absl::Time deadline = absl::Now() + timeout;
    iv1::LoadReport r;
    while (absl::Now() < deadline) {
      r = Load(w);
      if (r.kv_blocks_free() == r.kv_blocks_total() && r.kv_blocks_committed() == 0 &&
          r.running_requests() == 0 && r.queued_requests() == 0 &&
          r.kv_transport_leases_open() == 0) {
        return true;
      }
      absl::SleepFor(absl::Milliseconds(20));
    }
    ADD_FAILURE() << "worker not idle: " << r.ShortDebugString();
    return false;
  }

  static std::string* model_dir_;
  static Worker* decode_;
  static Worker* prefill_;
};
std::string* WorkersTest::model_dir_ = nullptr;
Worker* WorkersTest::decode_ = nullptr;
Worker* WorkersTest::prefill_ = nullptr;

TEST_F(WorkersTest, DisaggregatedTokensEqualOneEngineFor50ConcurrentRequests) {
  std::mt19937 rng(7);
  std::vector<engine::GenerationRequest> reqs;
  for (int i = 0; i < 50; ++i) reqs.push_back(RandomRequest(rng, 500 + i));
  auto local = engine::Engine::Load(*model_dir_, {.matmul_backend = "cpu"});
  ASSERT_OK(local.status());
  ASSERT_OK_AND_ASSIGN(auto expected, (*local)->Generate(reqs));

  std::vector<absl::StatusOr<Outcome>> got(reqs.size(), absl::UnknownError("not run"));
  std::vector<std::thread> threads;
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back([&, i] { got[i] = Run(reqs[i], absl::StrCat("req-", i)); });
  }
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_OK(got[i].status());
    EXPECT_EQ(got[i]->tokens, expected[i].output);
    EXPECT_EQ(got[i]->finish, services::FinishReasonToProto(expected[i].finish));
  }
  EXPECT_TRUE(WaitIdle(*decode_));
  EXPECT_TRUE(WaitIdle(*prefill_));
}

TEST_F(WorkersTest, CancelledDecodeAndReleasedReservationFreeEveryBlock) {
  auto decode = iv1::Decode::NewStub(decode_->channel);
  // A reservation never prefilled, released by the router.
  {
    grpc::ClientContext ctx;
    iv1::ReserveRequest reserve;
    reserve.set_prompt_tokens(100);
    reserve.set_max_tokens(50);
    iv1::ReserveResponse r;
    ASSERT_TRUE(decode->Reserve(&ctx, reserve, &r).ok());
    EXPECT_GT(Load(*decode_).kv_blocks_committed(), 0);
    grpc::ClientContext release_ctx;
    iv1::ReleaseRequest release;
    release.set_reservation_id(r.reservation_id());
    iv1::ReleaseResponse released;
    ASSERT_TRUE(decode->Release(&release_ctx, release, &released).ok());
    EXPECT_TRUE(WaitIdle(*decode_));
  }
  // A long decode cancelled mid-stream by the client, and one whose
  // deadline passes.
  std::mt19937 rng(3);
  engine::GenerationRequest req = RandomRequest(rng, 77);
  req.sampling.max_tokens = 4000;
  req.sampling.ignore_eos = true;
  EXPECT_THAT(Run(req, "cancel-me", /*cancel_after=*/2).status(),
              StatusIs(absl::StatusCode::kCancelled));
  EXPECT_TRUE(WaitIdle(*decode_));
  EXPECT_THAT(Run(req, "deadline", -1, absl::Milliseconds(300)).status(),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_TRUE(WaitIdle(*decode_));
  EXPECT_TRUE(WaitIdle(*prefill_));
}

TEST_F(WorkersTest, ReserveBeyondCapacityIsResourceExhausted) {
  // Each reservation admits 8000 tokens of lifetime; the pool holds 16384.
  auto decode = iv1::Decode::NewStub(decode_->channel);
  std::vector<uint64_t> held;
  grpc::Status s;
  for (int i = 0; i < 3 && s.ok(); ++i) {
    grpc::ClientContext ctx;
    iv1::ReserveRequest reserve;
    reserve.set_prompt_tokens(100);
    reserve.set_max_tokens(7900);
    iv1::ReserveResponse r;
    s = decode->Reserve(&ctx, reserve, &r);
    if (s.ok()) held.push_back(r.reservation_id());
  }
  EXPECT_EQ(held.size(), 2u);
  EXPECT_EQ(s.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << s.error_message();
  EXPECT_THAT(s.error_message(), HasSubstr("KV blocks"));
  for (uint64_t id : held) {
    grpc::ClientContext ctx;
    iv1::ReleaseRequest release;
    release.set_reservation_id(id);
    iv1::ReleaseResponse released;
    EXPECT_TRUE(decode->Release(&ctx, release, &released).ok());
  }
  EXPECT_TRUE(WaitIdle(*decode_));
}

TEST_F(WorkersTest, AggregatedWorkerGivesTheSameTokens) {
  ASSERT_OK_AND_ASSIGN(Worker aggregated,
                       StartWorker("dserve-decode", *model_dir_, kDecodeConfig,
                                   {"--aggregated", "--worker-id", "agg-0"}));
  std::mt19937 rng(11);
  std::vector<engine::GenerationRequest> reqs;
  for (int i = 0; i < 12; ++i) reqs.push_back(RandomRequest(rng, 900 + i));
  auto local = engine::Engine::Load(*model_dir_, {.matmul_backend = "cpu"});
  ASSERT_OK(local.status());
  ASSERT_OK_AND_ASSIGN(auto expected, (*local)->Generate(reqs));
  auto stub = iv1::Decode::NewStub(aggregated.channel);
  std::vector<std::thread> threads;
  std::vector<Outcome> got(reqs.size());
  std::vector<grpc::Status> status(reqs.size());
  for (size_t i = 0; i < reqs.size(); ++i) {
    threads.emplace_back([&, i] {
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(60)));
      iv1::DecodeRequest d;
      d.mutable_prompt()->Assign(reqs[i].prompt.begin(), reqs[i].prompt.end());
      services::SamplingToProto(reqs[i].sampling, d.mutable_sampling());
      auto reader = stub->Decode(&ctx, d);
      iv1::DecodeResponse msg;
      while (reader->Read(&msg)) {
        got[i].tokens.insert(got[i].tokens.end(), msg.token_ids().begin(), msg.token_ids().end());
        if (msg.finish_reason() != iv1::FINISH_REASON_UNSPECIFIED) got[i].finish = msg.finish_reason();
      }
      status[i] = reader->Finish();
    });
  }
  for (std::thread& t : threads) t.join();
  for (size_t i = 0; i < reqs.size(); ++i) {
    SCOPED_TRACE(i);
    ASSERT_TRUE(status[i].ok()) << status[i].error_message();
    EXPECT_EQ(got[i].tokens, expected[i].output);
    EXPECT_EQ(got[i].finish, services::FinishReasonToProto(expected[i].finish));
  }
  EXPECT_TRUE(WaitIdle(aggregated));
  // SIGTERM drains and exits cleanly.
  aggregated.process->Signal(SIGTERM);
  ASSERT_OK_AND_ASSIGN(int code, aggregated.process->Wait(absl::Seconds(10)));
  EXPECT_EQ(code, 0);
}

}  // namespace
}  // namespace dserve
