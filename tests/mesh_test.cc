// tests/mesh_test.cc: the whole mesh as real processes on loopback: router,
// prefill and decode workers (and aggregated workers), called through the
// public dserve.v1.Inference API. Checks the issue's promises end to end:
// identical tokens across the disaggregated mesh, the aggregated mesh and
// one engine; cancellation and deadlines free every block on every worker;
// worker deaths fail only their own requests; bad requests name the field;
// overload is queued, then refused with RESOURCE_EXHAUSTED.
#include <arpa/inet.h>
#include <grpcpp/grpcpp.h>
#include <netinet/in.h>
#include <sys/socket.h>

#include <atomic>
#include <fstream>
#include <random>
#include <thread>

#include "base/status_macros.h"
#include "base/status_matchers.h"
#include "dserve/internal/v1/worker.grpc.pb.h"
#include "dserve/v1/inference.grpc.pb.h"
#include "engine/engine.h"
#include "engine/test_models.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "services/runtime.h"
#include "tests/child_process.h"

namespace dserve {
namespace {

using ::dserve::testing::ChildProcess;
using ::dserve::testing::StatusIs;
using ::testing::AnyOf;
using ::testing::HasSubstr;
namespace iv1 = ::dserve::internal::v1;

constexpr absl::Duration kStartTimeout = absl::Seconds(60);

std::string BinPath(const std::string& name) { return absl::StrCat(DSERVE_BIN_DIR, "/", name); }

// FreePort: a port nothing listens on now, so a worker restarted on it
// keeps the address the router knows.
int FreePort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  close(fd);
  return ntohs(addr.sin_port);
}

std::string WriteConfig(const std::string& name, const std::string& json) {
  static std::atomic<int> counter{0};
  const std::string path =
      absl::StrCat(::testing::TempDir(), "/mesh-", getpid(), "-", counter++, "-", name, ".json");
  std::ofstream(path) << json;
  return path;
}

// Process: one server of the mesh.
struct Process {
  std::string binary;
  std::vector<std::string> argv;
  std::unique_ptr<ChildProcess> child = nullptr;
  std::string address = "";

  absl::Status Start() {
    std::vector<std::string> full = {BinPath(binary)};
    full.insert(full.end(), argv.begin(), argv.end());
    DSERVE_ASSIGN_OR_RETURN(child, ChildProcess::Start(full));
    DSERVE_ASSIGN_OR_RETURN(address, child->WaitForListening(kStartTimeout));
    return absl::OkStatus();
  }
};

// MeshOptions: the shape of one mesh.
struct MeshOptions {
  int prefill = 1;
  int decode = 1;
  int aggregated = 0;
  std::string transport = "shm";
  int64_t decode_kv_tokens = 16384;
  std::string router_extra_json = "";  // more RouterConfig fields, e.g. queue bounds
};

// Mesh: workers and a router in front of them.
class Mesh {
 public:
  static absl::StatusOr<std::unique_ptr<Mesh>> Start(const std::string& model_dir,
                                                     const MeshOptions& o) {
    auto mesh = std::unique_ptr<Mesh>(new Mesh);
    const std::string transport =
        absl::StrCat(R"("transport": {"kind": ")", o.transport, R"(", "peerTimeout": "1s"})");
    const std::string prefill_config = WriteConfig(
        "prefill", absl::StrCat(R"({"engine": {"kvBlockTokens": 16, "kvCacheTokens": 16384},)",
                                transport, R"(, "loadReportInterval": "0.05s"})"));
    const std::string decode_config = WriteConfig(
        "decode", absl::StrCat(R"({"engine": {"kvBlockTokens": 32, "kvCacheTokens": )",
                               o.decode_kv_tokens, "},", transport,
                               R"(, "reservationTtl": "5s", "loadReportInterval": "0.05s",)",
                               R"( "server": {"drainTimeout": "2s"}})"));
    for (int i = 0; i < o.prefill; ++i) {
      mesh->prefill_.push_back(
          {"dserve-prefill",
           {"--config", prefill_config, "--model", model_dir, "--worker-id",
            absl::StrCat("prefill-", i), "--listen", absl::StrCat("127.0.0.1:", FreePort())}});
    }
    for (int i = 0; i < o.decode + o.aggregated; ++i) {
      const bool aggregated = i >= o.decode;
      Process p{"dserve-decode",
                {"--config", decode_config, "--model", model_dir, "--worker-id",
                 absl::StrCat(aggregated ? "aggregated-" : "decode-", i), "--listen",
                 absl::StrCat("127.0.0.1:", FreePort())}};
      if (aggregated) p.argv.push_back("--aggregated");
      mesh->decode_.push_back(std::move(p));
    }
    std::vector<std::string> router_argv = {
        "--config",
        WriteConfig("router", absl::StrCat(R"({"healthCheckInterval": "0.1s", "server": {"drainTimeout": "2s"})",
                                           o.router_extra_json, "}")),
        "--model", model_dir};
    for (Process& p : mesh->prefill_) {
      DSERVE_RETURN_IF_ERROR(p.Start());
      router_argv.insert(router_argv.end(), {"--prefill", p.address});
    }
    for (Process& p : mesh->decode_) {
      DSERVE_RETURN_IF_ERROR(p.Start());
      router_argv.insert(router_argv.end(), {"--decode", p.address});
    }
    mesh->router_ = Process{"dserve-router", router_argv};
    DSERVE_RETURN_IF_ERROR(mesh->router_.Start());
    mesh->channel_ = grpc::CreateChannel(mesh->router_.address, grpc::InsecureChannelCredentials());
    mesh->stub_ = v1::Inference::NewStub(mesh->channel_);
    DSERVE_RETURN_IF_ERROR(mesh->WaitReady(kStartTimeout));
    return mesh;
  }

  // WaitReady: until a one-token request succeeds (the router has seen every
  // worker's first load report).
  absl::Status WaitReady(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    absl::Status last;
    while (absl::Now() < deadline) {
      v1::GenerateRequest r;
      r.mutable_token_ids()->add_ids(5);
      r.set_max_tokens(1);
      last = Generate(r, absl::Seconds(5)).status();
      if (last.ok()) return absl::OkStatus();
      absl::SleepFor(absl::Milliseconds(50));
    }
    return absl::DeadlineExceededError(absl::StrCat("mesh not ready: ", last.message()));
  }

  struct Result {
    std::vector<int32_t> tokens;
    std::string text;
    v1::Complete complete;
  };

  // Generate: one streaming call; `cancel_after` chunks, then the client
  // cancels.
  absl::StatusOr<Result> Generate(const v1::GenerateRequest& request,
                                  absl::Duration timeout = absl::Seconds(60),
                                  int cancel_after = -1) {
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    auto reader = stub_->Generate(&ctx, request);
    v1::GenerateResponse msg;
    Result result;
    for (int chunks = 0; reader->Read(&msg); ++chunks) {
      if (chunks == cancel_after) ctx.TryCancel();
      if (msg.has_chunk()) {
        result.tokens.insert(result.tokens.end(), msg.chunk().token_ids().begin(),
                             msg.chunk().token_ids().end());
        result.text += msg.chunk().text();
      } else if (msg.has_complete()) {
        result.complete = msg.complete();
      }
    }
    DSERVE_RETURN_IF_ERROR(services::FromGrpcStatus(reader->Finish()));
    return result;
  }

  // AllIdle: every live worker reports all blocks free and nothing running,
  // queued or leased, within `timeout`.
  bool AllIdle(absl::Duration timeout = absl::Seconds(10)) {
    std::vector<Process*> workers;
    for (Process& p : prefill_) workers.push_back(&p);
    for (Process& p : decode_) workers.push_back(&p);
    for (Process* p : workers) {
      if (p->child == nullptr) continue;
      const absl::Time deadline = absl::Now() + timeout;
      iv1::LoadReport r;
      bool idle = false;
      while (!idle && absl::Now() < deadline) {
        r = Load(*p);
        idle = r.kv_blocks_free() == r.kv_blocks_total() && r.kv_blocks_committed() == 0 &&
               r.running_requests() == 0 && r.queued_requests() == 0 &&
               r.kv_transport_leases_open() == 0;
        if (!idle) absl::SleepFor(absl::Milliseconds(20));
      }
      if (!idle) {
        ADD_FAILURE() << p->address << " not idle: " << r.ShortDebugString();
        return false;
      }
    }
    return true;
  }

  static iv1::LoadReport Load(const Process& p) {
    auto stub = iv1::WorkerLoad::NewStub(
        grpc::CreateChannel(p.address, grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
    auto reader = stub->Watch(&ctx, iv1::WatchLoadRequest());
    iv1::LoadReport report;
    reader->Read(&report);
    ctx.TryCancel();
    reader->Finish().IgnoreError();
    return report;
  }

  std::vector<Process>& prefill() { return prefill_; }
  std::vector<Process>& decode() { return decode_; }
  Process& router() { return router_; }

 private:
  std::vector<Process> prefill_;
  std::vector<Process> decode_;
  Process router_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Inference::Stub> stub_;
};

// RandomRequest: token-id prompts so the engine can be compared directly.
v1::GenerateRequest RandomRequest(std::mt19937& rng, uint64_t seed, int max_prompt = 120,
                                  int max_output = 40) {
  v1::GenerateRequest r;
  r.set_request_id(absl::StrCat("r", seed));
  const int n = 1 + static_cast<int>(rng() % max_prompt);
  for (int i = 0; i < n; ++i) r.mutable_token_ids()->add_ids(static_cast<int32_t>(rng() % 256));
  r.set_max_tokens(1 + static_cast<int32_t>(rng() % max_output));
  r.mutable_sampling()->set_seed(seed);
  r.mutable_sampling()->set_temperature(seed % 3 == 0 ? 0.0f : 0.9f);
  if (seed % 2 == 0) r.mutable_sampling()->set_top_k(20);
  r.set_ignore_eos(seed % 5 != 0);
  return r;
}

engine::GenerationRequest ToEngine(const v1::GenerateRequest& r) {
  engine::GenerationRequest e;
  e.prompt.assign(r.token_ids().ids().begin(), r.token_ids().ids().end());
  e.sampling.seed = r.sampling().seed();
  e.sampling.temperature = r.sampling().has_temperature() ? r.sampling().temperature() : 1.0f;
  e.sampling.top_k = r.sampling().top_k();
  e.sampling.max_tokens = r.max_tokens();
  e.sampling.ignore_eos = r.ignore_eos();
  return e;
}

class MeshTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(engine::testing::WriteTinyModel("mesh", 5));
  }
  static void TearDownTestSuite() { delete model_dir_; }

  // RunConcurrently: every request at once through `mesh`.
  static std::vector<absl::StatusOr<Mesh::Result>> RunConcurrently(
      Mesh& mesh, const std::vector<v1::GenerateRequest>& reqs) {
    std::vector<absl::StatusOr<Mesh::Result>> got(reqs.size(), absl::UnknownError("not run"));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < reqs.size(); ++i) {
      threads.emplace_back([&, i] { got[i] = mesh.Generate(reqs[i]); });
    }
    for (std::thread& t : threads) t.join();
    return got;
  }

  static std::string* model_dir_;
};
std::string* MeshTest::model_dir_ = nullptr;

TEST_F(MeshTest, SameTokensThroughDisaggregatedAndAggregatedMeshAndOneEngine) {
  std::mt19937 rng(17);
  std::vector<v1::GenerateRequest> reqs;
  std::vector<engine::GenerationRequest> engine_reqs;
  for (int i = 0; i < 50; ++i) {
    reqs.push_back(RandomRequest(rng, 100 + i));
    engine_reqs.push_back(ToEngine(reqs.back()));
  }
  auto local = engine::Engine::Load(*model_dir_, {.matmul_backend = "cpu"});
  ASSERT_OK(local.status());
  ASSERT_OK_AND_ASSIGN(auto expected, (*local)->Generate(engine_reqs));

  ASSERT_OK_AND_ASSIGN(auto disaggregated, Mesh::Start(*model_dir_, {.prefill = 2, .decode = 2}));
  ASSERT_OK_AND_ASSIGN(auto aggregated,
                       Mesh::Start(*model_dir_, {.prefill = 0, .decode = 0, .aggregated = 2}));
  for (Mesh* mesh : {disaggregated.get(), aggregated.get()}) {
    auto got = RunConcurrently(*mesh, reqs);
    for (size_t i = 0; i < reqs.size(); ++i) {
      SCOPED_TRACE(absl::StrCat(mesh == aggregated.get() ? "aggregated " : "disaggregated ", i));
      ASSERT_OK(got[i].status());
      EXPECT_EQ(got[i]->tokens, expected[i].output);
      EXPECT_EQ(got[i]->complete.usage().prompt_tokens(), engine_reqs[i].prompt.size());
      EXPECT_EQ(got[i]->complete.usage().completion_tokens(), expected[i].output.size());
      EXPECT_EQ(got[i]->complete.finish_reason(), expected[i].finish == engine::FinishReason::kStop
                                                      ? v1::FINISH_REASON_STOP
                                                      : v1::FINISH_REASON_LENGTH);
    }
    EXPECT_TRUE(mesh->AllIdle());
  }
}

TEST_F(MeshTest, CancelAndDeadlineFreeEveryBlockOnEveryWorker) {
  ASSERT_OK_AND_ASSIGN(auto mesh, Mesh::Start(*model_dir_, {.prefill = 1, .decode = 1}));
  std::mt19937 rng(3);
  v1::GenerateRequest r = RandomRequest(rng, 42);
  r.set_max_tokens(4000);
  r.set_ignore_eos(true);
  EXPECT_THAT(mesh->Generate(r, absl::Seconds(60), /*cancel_after=*/3).status(),
              StatusIs(absl::StatusCode::kCancelled));
  EXPECT_TRUE(mesh->AllIdle());
  EXPECT_THAT(mesh->Generate(r, absl::Milliseconds(400)).status(),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_TRUE(mesh->AllIdle());
}

TEST_F(MeshTest, BadRequestsNameTheFieldAndHurtNoOne) {
  ASSERT_OK_AND_ASSIGN(auto mesh, Mesh::Start(*model_dir_, {.prefill = 1, .decode = 1}));
  std::mt19937 rng(5);
  const v1::GenerateRequest good = RandomRequest(rng, 7);
  // Long requests run while the bad ones are refused.
  std::vector<v1::GenerateRequest> background;
  for (int i = 0; i < 4; ++i) {
    background.push_back(RandomRequest(rng, 200 + i));
    background.back().set_max_tokens(200);
  }
  std::vector<absl::StatusOr<Mesh::Result>> background_results;
  std::thread runner([&] { background_results = RunConcurrently(*mesh, background); });

  struct Case {
    std::string name;
    std::function<void(v1::GenerateRequest&)> edit;
    std::string field;
  };
  const std::vector<Case> cases = {
      {"no prompt", [](v1::GenerateRequest& r) { r.clear_token_ids(); }, "prompt"},
      {"empty text", [](v1::GenerateRequest& r) { r.set_text(""); }, "prompt"},
      {"prompt past context",
       [](v1::GenerateRequest& r) {
         r.mutable_token_ids()->clear_ids();
         for (int i = 0; i < 9000; ++i) r.mutable_token_ids()->add_ids(3);
       },
       "prompt"},
      {"max_tokens past context", [](v1::GenerateRequest& r) { r.set_max_tokens(9000); },
       "max_tokens"},
      {"max_tokens zero", [](v1::GenerateRequest& r) { r.set_max_tokens(0); }, "max_tokens"},
      {"negative temperature",
       [](v1::GenerateRequest& r) { r.mutable_sampling()->set_temperature(-0.5f); },
       "temperature"},
      {"top_p zero", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(0.0f); },
       "top_p"},
      {"top_p above one", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_p(1.5f); },
       "top_p"},
      {"negative top_k", [](v1::GenerateRequest& r) { r.mutable_sampling()->set_top_k(-1); },
       "top_k"},
      {"unknown token id", [](v1::GenerateRequest& r) { r.mutable_token_ids()->set_ids(0, 1 << 20); },
       "token_ids"},
      {"oversized prompt text",
       [](v1::GenerateRequest& r) { r.set_text(std::string(3 << 20, 'a')); }, "prompt"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    v1::GenerateRequest bad = good;
    c.edit(bad);
    EXPECT_THAT(mesh->Generate(bad).status(),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)));
  }
  EXPECT_OK(mesh->Generate(good).status());
  runner.join();
  for (const auto& r : background_results) EXPECT_OK(r.status());
  EXPECT_TRUE(mesh->AllIdle());
}

TEST_F(MeshTest, OverloadIsQueuedUpToABoundThenRefused) {
  // One decode worker that holds 1024 tokens; each request needs ~600 over
  // its lifetime, so one runs at a time; the router queues 4.
  ASSERT_OK_AND_ASSIGN(auto mesh, Mesh::Start(*model_dir_, {.prefill = 1,
                                                            .decode = 1,
                                                            .decode_kv_tokens = 1024,
                                                            .router_extra_json =
                                                                R"(, "maxQueuedRequests": 4)"}));
  std::mt19937 rng(9);
  std::vector<v1::GenerateRequest> reqs;
  for (int i = 0; i < 24; ++i) {
    v1::GenerateRequest r = RandomRequest(rng, 300 + i, 100);
    r.set_max_tokens(500);
    r.set_ignore_eos(true);
    reqs.push_back(r);
  }
  auto got = RunConcurrently(*mesh, reqs);
  int ok = 0, refused = 0;
  for (const auto& r : got) {
    if (r.ok()) {
      ++ok;
    } else {
      EXPECT_THAT(r.status(), StatusIs(absl::StatusCode::kResourceExhausted));
      ++refused;
    }
  }
  EXPECT_GE(ok, 1);
  EXPECT_GE(refused, 1);
  EXPECT_EQ(ok + refused, 24);
  EXPECT_TRUE(mesh->AllIdle());
  EXPECT_OK(mesh->Generate(reqs[0]).status());  // and it still serves
}

TEST_F(MeshTest, KilledPrefillWorkerFailsOrRetriesItsRequestsAndRejoins) {
  ASSERT_OK_AND_ASSIGN(auto mesh, Mesh::Start(*model_dir_, {.prefill = 2, .decode = 1}));
  std::mt19937 rng(23);
  std::vector<v1::GenerateRequest> reqs;
  for (int i = 0; i < 40; ++i) reqs.push_back(RandomRequest(rng, 400 + i, 400, 20));
  std::vector<absl::StatusOr<Mesh::Result>> got;
  std::thread runner([&] { got = RunConcurrently(*mesh, reqs); });
  absl::SleepFor(absl::Milliseconds(150));
  mesh->prefill()[0].child->Signal(SIGKILL);
  runner.join();
  int ok = 0;
  for (const auto& r : got) {
    if (r.ok()) {
      ++ok;
    } else {
      EXPECT_THAT(r.status(), StatusIs(absl::StatusCode::kUnavailable));
    }
  }
  EXPECT_GE(ok, 30);  // at most the killed worker's in-flight share fails
  // The router stops sending to the dead worker: everything succeeds now.
  for (int i = 0; i < 6; ++i) EXPECT_OK(mesh->Generate(reqs[i]).status());
  // Restarted on the same address, it rejoins: with the other one killed,
  // requests still succeed.
  mesh->prefill()[0].child.reset();
  ASSERT_OK(mesh->prefill()[0].Start());
  mesh->prefill()[1].child->Signal(SIGKILL);
  mesh->prefill()[1].child.reset();
  absl::Status last;
  for (int i = 0; i < 100; ++i) {
    last = mesh->Generate(reqs[0]).status();
    if (last.ok()) break;
    absl::SleepFor(absl::Milliseconds(100));
  }
  EXPECT_OK(last);
  EXPECT_TRUE(mesh->AllIdle());
}

TEST_F(MeshTest, KilledDecodeWorkerEndsItsStreamsPromptlyOthersContinue) {
  ASSERT_OK_AND_ASSIGN(auto mesh, Mesh::Start(*model_dir_, {.prefill = 1, .decode = 2}));
  std::mt19937 rng(29);
  std::vector<v1::GenerateRequest> reqs;
  for (int i = 0; i < 12; ++i) {
    v1::GenerateRequest r = RandomRequest(rng, 500 + i, 50);
    r.set_max_tokens(i % 2 == 0 ? 1500 : 30);
    r.set_ignore_eos(true);
    reqs.push_back(r);
  }
  std::vector<absl::StatusOr<Mesh::Result>> got;
  std::vector<absl::Duration> took(reqs.size());
  std::atomic<int64_t> killed_at_ns{0};
  std::thread runner([&] {
    got.assign(reqs.size(), absl::UnknownError("not run"));
    std::vector<std::thread> threads;
    for (size_t i = 0; i < reqs.size(); ++i) {
      threads.emplace_back([&, i] {
        got[i] = mesh->Generate(reqs[i]);
        took[i] = absl::Now() - absl::FromUnixNanos(killed_at_ns.load());
      });
    }
    for (std::thread& t : threads) t.join();
  });
  absl::SleepFor(absl::Milliseconds(400));
  killed_at_ns = absl::ToUnixNanos(absl::Now());
  mesh->decode()[1].child->Signal(SIGKILL);
  runner.join();
  int failed = 0;
  for (size_t i = 0; i < reqs.size(); ++i) {
    if (got[i].ok()) continue;
    ++failed;
    EXPECT_THAT(got[i].status(), StatusIs(absl::StatusCode::kUnavailable));
    EXPECT_LT(took[i], absl::Seconds(5)) << "stream " << i << " ended late";
  }
  EXPECT_LE(failed, 11);
  mesh->decode()[1].child.reset();
  for (int i = 0; i < 4; ++i) EXPECT_OK(mesh->Generate(reqs[1]).status());
  EXPECT_TRUE(mesh->AllIdle());
}

}  // namespace
}  // namespace dserve
