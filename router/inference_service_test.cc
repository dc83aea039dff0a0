// router/inference_service_test.cc: the router's Inference service on
// 127.0.0.1:0 against in-process fake workers (gRPC servers on port 0 with
// scripted Decode / Prefill / WorkerLoad / health behaviour), so that only
// the router is under test. The model is the tiny preset's byte-level
// tokenizer (id == byte value, eos 257) and config.
#include "router/inference_service.h"

#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "base/status_matchers.h"
#include "dserve/internal/v1/worker.grpc.pb.h"
#include "engine/model_config.h"
#include "engine/model_init.h"
#include "engine/test_models.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "router/testing/fake_worker.h"
#include "router/worker_registry.h"
#include "services/runtime.h"

namespace dserve::router {
namespace {

namespace iv1 = ::dserve::internal::v1;
using ::dserve::router::testing::FakeScript;
using ::dserve::router::testing::FakeWorker;
using ::dserve::router::testing::Seen;
using ::testing::ElementsAre;
using ::testing::ElementsAreArray;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::SizeIs;

constexpr int32_t kBos = 256;
constexpr int32_t kEos = 257;

std::vector<int32_t> Bytes(const std::string& s) {
  std::vector<int32_t> out;
  for (unsigned char c : s) out.push_back(c);
  return out;
}

// Result: what a client saw of one Generate call.
struct Result {
  grpc::Status status;
  std::vector<v1::GenerateResponse> responses;
  std::string retry_after_ms;
  std::vector<int32_t> tokens;
  std::vector<float> logprobs;
  std::string text;
  std::optional<v1::Complete> complete;
};

struct Router {
  std::unique_ptr<WorkerRegistry> registry;
  std::unique_ptr<InferenceService> service;
  std::unique_ptr<services::GrpcServer> server;
  std::unique_ptr<v1::Inference::Stub> stub;

  ~Router() {
    // The server goes first: the service must outlive its calls.
    server.reset();
    service.reset();
    registry.reset();
  }

  Result Generate(const v1::GenerateRequest& request,
                  absl::Duration timeout = absl::Seconds(10)) const {
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
    return Read(context, request, nullptr);
  }

  // Read runs Generate; `on_response` may cancel the call.
  Result Read(grpc::ClientContext& context, const v1::GenerateRequest& request,
              const std::function<void(const v1::GenerateResponse&)>& on_response) const {
    Result r;
    auto reader = stub->Generate(&context, request);
    v1::GenerateResponse response;
    while (reader->Read(&response)) {
      r.responses.push_back(response);
      if (response.has_chunk()) {
        for (int32_t id : response.chunk().token_ids()) r.tokens.push_back(id);
        for (float lp : response.chunk().logprobs()) r.logprobs.push_back(lp);
        r.text += response.chunk().text();
      }
      if (response.has_complete()) r.complete = response.complete();
      if (on_response) on_response(response);
    }
    r.status = reader->Finish();
    for (const auto& [key, value] : context.GetServerTrailingMetadata()) {
      if (key == "retry-after-ms") r.retry_after_ms = std::string(value.data(), value.size());
    }
    return r;
  }
};

class InferenceServiceTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    model_dir_ = new std::string(engine::testing::FreshDir("router-service-model"));
    engine::ModelConfig config = engine::PresetConfig("tiny").value();
    std::ofstream(*model_dir_ + "/config.json") << engine::ModelConfigToJson(config);
    ASSERT_OK(engine::WriteByteLevelTokenizer(*model_dir_, config.vocab_size));
  }
  static void TearDownTestSuite() { delete model_dir_; }

  static InferenceServiceOptions Options() {
    InferenceServiceOptions o;
    o.model_dir = *model_dir_;
    o.default_max_tokens = 16;
    o.max_queued_requests = 64;
    o.queue_timeout = absl::Seconds(2);
    o.prefill_retries = 1;
    return o;
  }

  // StartRouter starts a router over the given workers and waits until
  // every worker is usable.
  std::unique_ptr<Router> StartRouter(const std::vector<const FakeWorker*>& prefill,
                                      const std::vector<const FakeWorker*>& decode,
                                      const InferenceServiceOptions& options = Options()) {
    auto router = std::make_unique<Router>();
    config::v1::RouterConfig config;
    for (const FakeWorker* w : prefill)
      config.mutable_prefill_workers()->add_addresses(w->address());
    for (const FakeWorker* w : decode) config.mutable_decode_workers()->add_addresses(w->address());
    WorkerRegistryOptions registry_options;
    registry_options.health_check_interval = absl::Milliseconds(50);
    registry_options.health_check_timeout = absl::Milliseconds(500);
    registry_options.watch_backoff_initial = absl::Milliseconds(20);
    auto registry = WorkerRegistry::Create(config, registry_options);
    EXPECT_OK(registry.status());
    router->registry = *std::move(registry);
    auto service = InferenceService::Create(options, router->registry.get());
    EXPECT_OK(service.status());
    router->service = *std::move(service);
    config::v1::ServerConfig server_config;
    server_config.set_listen("127.0.0.1:0");
    auto server = services::GrpcServer::Start(server_config, {router->service.get()});
    EXPECT_OK(server.status());
    router->server = *std::move(server);
    router->stub = v1::Inference::NewStub(
        grpc::CreateChannel(router->server->address(), grpc::InsecureChannelCredentials()));
    const size_t n = prefill.size() + decode.size();
    EXPECT_TRUE(router->registry->WaitUntil(
        [n](const ClusterView& view) {
          int healthy = 0;
          for (const WorkerView& w : view.workers) healthy += w.healthy;
          return view.workers.size() == n && healthy == static_cast<int>(n);
        },
        absl::Now() + absl::Seconds(5)));
    return router;
  }

  static v1::GenerateRequest Text(const std::string& text, int32_t max_tokens) {
    v1::GenerateRequest r;
    r.set_text(text);
    r.set_max_tokens(max_tokens);
    return r;
  }

  static std::string* model_dir_;
};

std::string* InferenceServiceTest::model_dir_ = nullptr;

FakeScript PrefillScript() {
  FakeScript s;
  s.role = iv1::WORKER_ROLE_PREFILL;
  return s;
}

FakeScript DecodeScript(const std::string& tokens_after_first) {
  FakeScript s;
  s.role = iv1::WORKER_ROLE_DECODE;
  s.decode_tokens = Bytes(tokens_after_first);
  return s;
}

TEST_F(InferenceServiceTest, DisaggregatedRequestFlowsReservePrefillDecode) {
  FakeWorker prefill(PrefillScript());
  FakeWorker decode(DecodeScript("ello"));
  auto router = StartRouter({&prefill}, {&decode});

  v1::GenerateRequest request = Text("hi", 5);
  request.set_logprobs(true);
  request.set_request_id("req-flow");
  const Result r = router->Generate(request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text, "Hello");
  EXPECT_THAT(r.tokens, ElementsAreArray(Bytes("Hello")));
  EXPECT_THAT(r.logprobs, ElementsAre(-0.5f, -1.0f, -1.0f, -1.0f, -1.0f));
  // The first token comes alone, before the decode stream's.
  ASSERT_GE(r.responses.size(), 3u);
  EXPECT_THAT(r.responses[0].chunk().token_ids(), ElementsAre('H'));
  EXPECT_EQ(r.responses[0].chunk().text(), "H");
  for (const v1::GenerateResponse& response : r.responses) {
    EXPECT_EQ(response.request_id(), "req-flow");
  }
  ASSERT_TRUE(r.complete.has_value());
  EXPECT_TRUE(r.responses.back().has_complete());
  EXPECT_EQ(r.complete->finish_reason(), v1::FINISH_REASON_LENGTH);
  EXPECT_EQ(r.complete->usage().prompt_tokens(), 3);
  EXPECT_EQ(r.complete->usage().completion_tokens(), 5);
  EXPECT_EQ(r.complete->usage().cached_tokens(), 0);
  // The prefill worker's timings pass through; the router adds its queue.
  EXPECT_EQ(r.complete->timings().prefill_queue().nanos(), 1'000'000);
  EXPECT_EQ(r.complete->timings().prefill_compute().nanos(), 2'000'000);
  EXPECT_EQ(r.complete->timings().kv_transfer().nanos(), 3'000'000);
  EXPECT_TRUE(r.complete->timings().has_router_queue());

  const Seen d = decode.seen();
  ASSERT_THAT(d.reserves, SizeIs(1));
  EXPECT_EQ(d.reserves[0].request_id(), "req-flow");
  EXPECT_EQ(d.reserves[0].prompt_tokens(), 3);
  EXPECT_EQ(d.reserves[0].max_tokens(), 5);
  EXPECT_GT(d.reserves[0].ttl().seconds(), 0);
  const Seen p = prefill.seen();
  ASSERT_THAT(p.prefills, SizeIs(1));
  EXPECT_EQ(p.prefills[0].kv_target(), "target-1");
  EXPECT_THAT(p.prefills[0].prompt(), ElementsAre(kBos, 'h', 'i'));
  EXPECT_EQ(p.prefills[0].sampling().max_tokens(), 5);
  EXPECT_EQ(p.prefills[0].sampling().temperature(), 1.0f);
  EXPECT_TRUE(p.prefills[0].sampling().logprobs());
  ASSERT_THAT(d.decodes, SizeIs(1));
  EXPECT_EQ(d.decodes[0].reservation_id(), 1u);
  EXPECT_EQ(d.decodes[0].first_token(), 'H');
  EXPECT_EQ(d.decodes[0].first_logprob(), -0.5f);
  EXPECT_THAT(d.decodes[0].prompt(), ElementsAre(kBos, 'h', 'i'));
  EXPECT_EQ(d.decodes[0].sampling().seed(), p.prefills[0].sampling().seed());
  EXPECT_TRUE(d.decode_had_deadline);
  EXPECT_THAT(d.releases, IsEmpty());
}

TEST_F(InferenceServiceTest, AggregatedWorkerRunsTheWholeRequest) {
  FakeScript script;
  script.role = iv1::WORKER_ROLE_AGGREGATED;
  script.decode_tokens = {'o', 'k', kEos};
  script.finish = iv1::FINISH_REASON_STOP;
  FakeWorker worker(script);
  auto router = StartRouter({}, {&worker});

  const Result r = router->Generate(Text("q", 8));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  // The eos token is reported by id but adds no text.
  EXPECT_EQ(r.text, "ok");
  EXPECT_THAT(r.tokens, ElementsAre('o', 'k', kEos));
  ASSERT_TRUE(r.complete.has_value());
  EXPECT_EQ(r.complete->finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(r.complete->usage().completion_tokens(), 3);
  const Seen seen = worker.seen();
  EXPECT_THAT(seen.reserves, IsEmpty());
  ASSERT_THAT(seen.decodes, SizeIs(1));
  EXPECT_EQ(seen.decodes[0].reservation_id(), 0u);
  EXPECT_THAT(seen.decodes[0].prompt(), ElementsAre(kBos, 'q'));
}

TEST_F(InferenceServiceTest, StopStringCutsTheOutputAndCancelsDecode) {
  FakeWorker prefill(PrefillScript());
  FakeScript script = DecodeScript("abc STOP def");
  script.decode_hold = true;
  FakeWorker decode(script);
  auto router = StartRouter({&prefill}, {&decode});

  v1::GenerateRequest request = Text("x", 50);
  request.add_stop("STOP");
  const Result r = router->Generate(request);
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text, "Habc ");
  ASSERT_TRUE(r.complete.has_value());
  EXPECT_EQ(r.complete->finish_reason(), v1::FINISH_REASON_STOP);
  EXPECT_EQ(r.complete->matched_stop(), "STOP");
  // Tokens through the one that completed the stop string: "H" + "abc STOP".
  EXPECT_EQ(r.complete->usage().completion_tokens(), 9);
  EXPECT_TRUE(decode.WaitFor([](const Seen& s) { return s.decode_cancelled == 1; }));
}

TEST_F(InferenceServiceTest, ClientCancelCancelsTheWorkerCall) {
  FakeWorker prefill(PrefillScript());
  FakeScript script = DecodeScript("xy");
  script.decode_hold = true;
  FakeWorker decode(script);
  auto router = StartRouter({&prefill}, {&decode});

  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(10)));
  std::string text;
  const Result r = router->Read(context, Text("x", 50), [&](const v1::GenerateResponse& response) {
    text += response.chunk().text();
    if (text == "Hxy") context.TryCancel();
  });
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(decode.WaitFor([](const Seen& s) { return s.decode_cancelled == 1; }));
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (router->service->running_requests() > 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(2));
  }
  EXPECT_EQ(router->service->running_requests(), 0);
}

TEST_F(InferenceServiceTest, CancelDuringPrefillReleasesTheReservation) {
  FakeScript prefill_script = PrefillScript();
  prefill_script.prefill_hold = true;
  FakeWorker prefill(prefill_script);
  FakeWorker decode(DecodeScript("unused"));
  auto router = StartRouter({&prefill}, {&decode});

  grpc::ClientContext context;
  Result r;
  std::thread client([&] { r = router->Read(context, Text("x", 4), nullptr); });
  ASSERT_TRUE(prefill.WaitFor([](const Seen& s) { return s.prefills.size() == 1; }));
  context.TryCancel();
  client.join();
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(prefill.WaitFor([](const Seen& s) { return s.prefill_cancelled == 1; }));
  EXPECT_TRUE(decode.WaitFor([](const Seen& s) { return s.releases == std::vector<uint64_t>{1}; }));
  EXPECT_THAT(decode.seen().decodes, IsEmpty());
}

TEST_F(InferenceServiceTest, PrefillUnavailableIsRetriedOnAnotherPrefillWorker) {
  // The failing worker reports the shorter queue, so it is tried first.
  FakeScript failing = PrefillScript();
  failing.prefill_code = grpc::StatusCode::UNAVAILABLE;
  FakeWorker prefill_a(failing);
  FakeScript healthy = PrefillScript();
  healthy.queued_prefill_tokens = 1000;
  healthy.first_token = 'Z';
  FakeWorker prefill_b(healthy);
  FakeWorker decode(DecodeScript("z"));
  auto router = StartRouter({&prefill_a, &prefill_b}, {&decode});

  const Result r = router->Generate(Text("x", 2));
  ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  EXPECT_EQ(r.text, "Zz");
  EXPECT_THAT(prefill_a.seen().prefills, SizeIs(1));
  ASSERT_THAT(prefill_b.seen().prefills, SizeIs(1));
  EXPECT_EQ(prefill_b.seen().prefills[0].kv_target(), "target-2");
  const Seen d = decode.seen();
  EXPECT_THAT(d.reserves, SizeIs(2));
  EXPECT_THAT(d.releases, ElementsAre(1u));
  ASSERT_THAT(d.decodes, SizeIs(1));
  EXPECT_EQ(d.decodes[0].reservation_id(), 2u);
  EXPECT_EQ(d.decodes[0].first_token(), 'Z');
}

TEST_F(InferenceServiceTest, PrefillUnavailableWithNoOtherPrefillWorkerFailsAtOnce) {
  FakeScript failing = PrefillScript();
  failing.prefill_code = grpc::StatusCode::UNAVAILABLE;
  FakeWorker prefill(failing);
  FakeWorker decode(DecodeScript("z"));
  auto router = StartRouter({&prefill}, {&decode});

  const absl::Time start = absl::Now();
  const Result r = router->Generate(Text("x", 2));
  EXPECT_LT(absl::Now() - start, absl::Seconds(1));  // not queued for the 2 s timeout
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(r.status.error_message(), HasSubstr("fake: prefill worker failed"));
  EXPECT_THAT(decode.seen().releases, ElementsAre(1u));
  EXPECT_THAT(decode.seen().decodes, IsEmpty());
}

TEST_F(InferenceServiceTest, NoCapacityAnywhereIsResourceExhaustedWithRetryAfter) {
  FakeWorker prefill(PrefillScript());
  FakeScript full = DecodeScript("");
  full.reserve_code = grpc::StatusCode::RESOURCE_EXHAUSTED;
  FakeWorker decode(full);
  InferenceServiceOptions options = Options();
  options.max_queued_requests = 1;
  options.queue_timeout = absl::Milliseconds(800);
  auto router = StartRouter({&prefill}, {&decode}, options);

  Result waited;
  std::thread first([&] { waited = router->Generate(Text("x", 4)); });
  // Its second Reserve comes from the queue: the queue's one place is taken.
  ASSERT_TRUE(decode.WaitFor([](const Seen& s) { return s.reserves.size() >= 2; }));
  const Result refused = router->Generate(Text("y", 4));
  first.join();

  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(refused.status.error_message(), HasSubstr("admission queue is full"));
  EXPECT_THAT(refused.status.error_message(), HasSubstr("retry in about"));
  EXPECT_FALSE(refused.retry_after_ms.empty());
  EXPECT_EQ(waited.status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(waited.status.error_message(), HasSubstr("queue timeout"));
  EXPECT_THAT(waited.status.error_message(), HasSubstr("fake: no room"));
  EXPECT_FALSE(waited.retry_after_ms.empty());
  EXPECT_GT(std::stoi(waited.retry_after_ms), 0);
  EXPECT_THAT(decode.seen().decodes, IsEmpty());
  EXPECT_THAT(prefill.seen().prefills, IsEmpty());
}

TEST_F(InferenceServiceTest, WorkerFailingHealthChecksGetsNoRequests) {
  FakeScript script;
  script.role = iv1::WORKER_ROLE_AGGREGATED;
  script.decode_tokens = {'a'};
  FakeWorker sick(script);
  FakeWorker well(script);
  auto router = StartRouter({}, {&sick, &well});

  sick.SetHealthy(false);
  ASSERT_TRUE(router->registry->WaitUntil(
      [&](const ClusterView& view) {
        for (const WorkerView& w : view.workers) {
          if (w.id == sick.address()) return !w.healthy;
        }
        return false;
      },
      absl::Now() + absl::Seconds(5)));
  for (int i = 0; i < 4; ++i) {
    const Result r = router->Generate(Text("q", 1));
    ASSERT_TRUE(r.status.ok()) << r.status.error_message();
  }
  EXPECT_THAT(sick.seen().decodes, IsEmpty());
  EXPECT_THAT(well.seen().decodes, SizeIs(4));
}

TEST_F(InferenceServiceTest, DrainCancelsRequestsThatOutliveItsDeadline) {
  FakeWorker prefill(PrefillScript());
  FakeScript script = DecodeScript("ab");
  script.decode_hold = true;
  FakeWorker decode(script);
  auto router = StartRouter({&prefill}, {&decode});

  Result r;
  std::thread client([&] { r = router->Generate(Text("x", 50)); });
  ASSERT_TRUE(decode.WaitFor([](const Seen& s) { return s.decodes.size() == 1; }));
  const absl::Time start = absl::Now();
  router->service->Drain(absl::Now() + absl::Milliseconds(100));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(100));
  client.join();
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(r.status.error_message(), HasSubstr("shut down"));
  EXPECT_TRUE(decode.WaitFor([](const Seen& s) { return s.decode_cancelled == 1; }));
  EXPECT_EQ(router->service->running_requests(), 0);
}

TEST_F(InferenceServiceTest, NoLiveDecodeWorkerIsUnavailable) {
  FakeWorker prefill(PrefillScript());
  FakeWorker decode(DecodeScript("a"));
  InferenceServiceOptions options = Options();
  options.queue_timeout = absl::Milliseconds(300);
  auto router = StartRouter({&prefill}, {&decode}, options);

  decode.Stop();
  ASSERT_TRUE(
      router->registry->WaitUntil([](const ClusterView& view) { return !HasServingPath(view); },
                                  absl::Now() + absl::Seconds(5)));
  const Result r = router->Generate(Text("x", 2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(r.status.error_message(), HasSubstr("no healthy worker"));
}

TEST_F(InferenceServiceTest, WorkerFailureEndsTheStreamWithItsStatus) {
  FakeWorker prefill(PrefillScript());
  FakeScript script = DecodeScript("ab");
  script.decode_fail_code = grpc::StatusCode::UNAVAILABLE;
  FakeWorker decode(script);
  auto router = StartRouter({&prefill}, {&decode});

  const Result r = router->Generate(Text("x", 10));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(r.status.error_message(), HasSubstr("fake: decode worker failed"));
  EXPECT_EQ(r.text, "Hab");
  EXPECT_FALSE(r.complete.has_value());
}

TEST_F(InferenceServiceTest, BadRequestIsInvalidArgumentAndReachesNoWorker) {
  FakeWorker prefill(PrefillScript());
  FakeWorker decode(DecodeScript(""));
  auto router = StartRouter({&prefill}, {&decode});

  const Result r = router->Generate(Text("x", 0));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(r.status.error_message(), HasSubstr("max_tokens"));
  v1::GenerateRequest huge = Text("x", 100000);
  const Result too_long = router->Generate(huge);
  EXPECT_EQ(too_long.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(too_long.status.error_message(), HasSubstr("model context of 8192"));
  EXPECT_THAT(decode.seen().reserves, IsEmpty());
}

TEST_F(InferenceServiceTest, ModelInfoAndDrain) {
  FakeWorker prefill(PrefillScript());
  FakeWorker decode(DecodeScript(""));
  auto router = StartRouter({&prefill}, {&decode});

  grpc::ClientContext context;
  v1::ModelInfo info;
  ASSERT_TRUE(router->stub->GetModelInfo(&context, v1::GetModelInfoRequest(), &info).ok());
  EXPECT_EQ(info.vocab_size(), 384);
  EXPECT_EQ(info.max_context_tokens(), 8192);
  EXPECT_EQ(info.num_layers(), 3);
  EXPECT_EQ(info.kv_bytes_per_token(), 3 * (32 + 8) * 4);
  EXPECT_EQ(info.architecture(), "DeepseekV3ForCausalLM");
  EXPECT_EQ(info.name(), "dserve-" + std::to_string(getpid()) + "-router-service-model");

  router->service->Drain(absl::Now() + absl::Seconds(1));
  const Result r = router->Generate(Text("x", 2));
  EXPECT_EQ(r.status.error_code(), grpc::StatusCode::UNAVAILABLE);
  EXPECT_THAT(r.status.error_message(), HasSubstr("draining"));
}

}  // namespace
}  // namespace dserve::router
