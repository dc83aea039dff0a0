// services/load_generator_test.cc: length distributions, schedules, the
// public traces in shared/traces, percentiles and the open-loop runner
// against a real gRPC server on loopback.
#include "services/load_generator.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <thread>

#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"

namespace dserve::services {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::HasSubstr;

std::string TracesDir() {
  const char* src = std::getenv("DSERVE_SOURCE_DIR");
  return std::string(src ? src : ".") + "/../shared/traces";
}

// The public traces sit beside the checkout (shared/traces/README.md says
// where each came from); a checkout without them skips these tests.
#define SKIP_WITHOUT_TRACES()                                                 \
  if (!std::filesystem::exists(TracesDir() + "/README.md")) {                 \
    GTEST_SKIP() << "no traces at " << TracesDir() << " (DSERVE_SOURCE_DIR)"; \
  }

double Mean(const std::vector<double>& v) {
  double total = 0;
  for (double x : v) total += x;
  return v.empty() ? 0 : total / static_cast<double>(v.size());
}

std::vector<double> Draw(const LengthDistribution& d, int n, uint64_t seed = 1) {
  std::mt19937_64 rng(seed);
  std::vector<double> out;
  for (int i = 0; i < n; ++i) out.push_back(d.Sample(rng));
  return out;
}

ScheduleOptions Unlimited() {
  ScheduleOptions o;
  o.max_requests = 0;
  o.duration = absl::InfiniteDuration();
  return o;
}

TEST(LengthDistributionTest, ParsesEveryForm) {
  ASSERT_OK_AND_ASSIGN(auto fixed, LengthDistribution::Parse("--prompt-len", "128"));
  EXPECT_EQ(fixed.kind(), LengthDistribution::Kind::kFixed);
  EXPECT_EQ(fixed.ToString(), "128");
  ASSERT_OK_AND_ASSIGN(auto uniform, LengthDistribution::Parse("--prompt-len", "uniform:10,20"));
  EXPECT_EQ(uniform.kind(), LengthDistribution::Kind::kUniform);
  EXPECT_EQ(uniform.ToString(), "uniform:10,20");
  ASSERT_OK_AND_ASSIGN(auto normal, LengthDistribution::Parse("--output-len", "normal:100,15.5"));
  EXPECT_EQ(normal.kind(), LengthDistribution::Kind::kNormal);
  EXPECT_DOUBLE_EQ(normal.b(), 15.5);
  ASSERT_OK_AND_ASSIGN(auto lognormal,
                       LengthDistribution::Parse("--output-len", "lognormal:3,0.5"));
  EXPECT_EQ(lognormal.kind(), LengthDistribution::Kind::kLogNormal);
}

TEST(LengthDistributionTest, ErrorsNameTheFlag) {
  EXPECT_THAT(LengthDistribution::Parse("--prompt-len", "lots"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("--prompt-len"), HasSubstr("uniform:A,B"))));
  EXPECT_THAT(LengthDistribution::Parse("--prompt-len", "0"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--prompt-len")));
  EXPECT_THAT(LengthDistribution::Parse("--output-len", "uniform:20,10"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       AllOf(HasSubstr("--output-len"), HasSubstr("A <= B"))));
  EXPECT_THAT(LengthDistribution::Parse("--output-len", "uniform:1.5,10"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("integers")));
  EXPECT_THAT(LengthDistribution::Parse("--output-len", "normal:10,-1"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("STD >= 0")));
  EXPECT_THAT(LengthDistribution::Parse("--output-len", "normal:10"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--output-len")));
  EXPECT_THAT(LengthDistribution::Parse("--output-len", "zipf:1,2"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--output-len")));
}

TEST(LengthDistributionTest, SampleMeansMatch) {
  const int n = 50000;
  ASSERT_OK_AND_ASSIGN(auto fixed, LengthDistribution::Parse("--x", "7"));
  for (double v : Draw(fixed, 100)) EXPECT_EQ(v, 7);

  ASSERT_OK_AND_ASSIGN(auto uniform, LengthDistribution::Parse("--x", "uniform:10,20"));
  std::vector<double> u = Draw(uniform, n);
  EXPECT_NEAR(Mean(u), 15.0, 0.1);
  EXPECT_EQ(*std::min_element(u.begin(), u.end()), 10);
  EXPECT_EQ(*std::max_element(u.begin(), u.end()), 20);

  ASSERT_OK_AND_ASSIGN(auto normal, LengthDistribution::Parse("--x", "normal:200,20"));
  EXPECT_NEAR(Mean(Draw(normal, n)), 200.0, 0.5);

  // exp(mu + sigma^2 / 2) = exp(5.125) = 168.2
  ASSERT_OK_AND_ASSIGN(auto lognormal, LengthDistribution::Parse("--x", "lognormal:5,0.5"));
  EXPECT_NEAR(Mean(Draw(lognormal, n)), std::exp(5.125), 168.2 * 0.02);
}

TEST(LengthDistributionTest, NormalIsClippedToOne) {
  ASSERT_OK_AND_ASSIGN(auto d, LengthDistribution::Parse("--x", "normal:0,5"));
  std::vector<double> v = Draw(d, 10000);
  EXPECT_EQ(*std::min_element(v.begin(), v.end()), 1);
}

TEST(PoissonScheduleTest, InterArrivalMeanIsOneOverRate) {
  ScheduleOptions o;
  o.max_requests = 20000;
  o.seed = 9;
  ASSERT_OK_AND_ASSIGN(auto specs, PoissonSchedule(5.0, LengthDistribution::Fixed(3),
                                                   LengthDistribution::Fixed(4), o));
  ASSERT_EQ(specs.size(), 20000u);
  EXPECT_EQ(specs[0].arrival, absl::ZeroDuration());
  std::vector<double> gaps;
  for (size_t i = 1; i < specs.size(); ++i) {
    ASSERT_GE(specs[i].arrival, specs[i - 1].arrival);
    gaps.push_back(absl::ToDoubleSeconds(specs[i].arrival - specs[i - 1].arrival));
  }
  EXPECT_NEAR(Mean(gaps), 0.2, 0.2 * 0.03);
  // Exponential gaps: standard deviation equals the mean.
  double var = 0;
  for (double g : gaps) var += (g - 0.2) * (g - 0.2);
  EXPECT_NEAR(std::sqrt(var / gaps.size()), 0.2, 0.2 * 0.05);
  EXPECT_EQ(specs[5].prompt_tokens, 3);
  EXPECT_EQ(specs[5].output_tokens, 4);

  // Same seed, same schedule.
  ASSERT_OK_AND_ASSIGN(auto again, PoissonSchedule(5.0, LengthDistribution::Fixed(3),
                                                   LengthDistribution::Fixed(4), o));
  EXPECT_EQ(again[1234].arrival, specs[1234].arrival);
}

TEST(PoissonScheduleTest, DurationAndCapsLimitTheSchedule) {
  ScheduleOptions o = Unlimited();
  o.duration = absl::Seconds(10);
  o.max_output_tokens = 50;
  ASSERT_OK_AND_ASSIGN(auto out, LengthDistribution::Parse("--output-len", "uniform:1,100"));
  ASSERT_OK_AND_ASSIGN(auto specs, PoissonSchedule(100.0, LengthDistribution::Fixed(3), out, o));
  EXPECT_NEAR(static_cast<double>(specs.size()), 1000.0, 150.0);
  for (const RequestSpec& s : specs) {
    EXPECT_LT(s.arrival, absl::Seconds(10));
    EXPECT_LE(s.output_tokens, 50);
  }
}

TEST(PoissonScheduleTest, RefusesAnInfiniteOrBadSchedule) {
  EXPECT_THAT(
      PoissonSchedule(1.0, LengthDistribution::Fixed(1), LengthDistribution::Fixed(1), Unlimited()),
      StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--requests")));
  ScheduleOptions o;
  o.max_requests = 3;
  EXPECT_THAT(PoissonSchedule(0.0, LengthDistribution::Fixed(1), LengthDistribution::Fixed(1), o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--rate")));
}

TEST(TraceTest, DetectsFormats) {
  SKIP_WITHOUT_TRACES();
  ASSERT_OK_AND_ASSIGN(TraceFormat azure,
                       DetectTraceFormat(TracesDir() + "/AzureLLMInferenceTrace_code_2023.csv"));
  EXPECT_EQ(azure, TraceFormat::kAzure);
  ASSERT_OK_AND_ASSIGN(TraceFormat servegen,
                       DetectTraceFormat(TracesDir() + "/servegen-deepseek-r1/chunk-0-trace.csv"));
  EXPECT_EQ(servegen, TraceFormat::kServegen);
  EXPECT_THAT(DetectTraceFormat(TracesDir() + "/README.md"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--trace-format")));
  EXPECT_THAT(DetectTraceFormat("/nonexistent.csv"), StatusIs(absl::StatusCode::kNotFound));
  EXPECT_THAT(ParseTraceFormat("mooncake"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--trace-format")));
}

TEST(TraceTest, ReplaysTheAzureCodeTrace) {
  SKIP_WITHOUT_TRACES();
  const std::string path = TracesDir() + "/AzureLLMInferenceTrace_code_2023.csv";
  ASSERT_OK_AND_ASSIGN(auto specs, LoadTrace(path, TraceFormat::kAzure, Unlimited()));
  ASSERT_EQ(specs.size(), 8819u);  // every row (README.md)
  // First rows: 18:17:03.9799600,4808,10 then 18:17:04.0319600,3180,8.
  EXPECT_EQ(specs[0].arrival, absl::ZeroDuration());
  EXPECT_EQ(specs[0].prompt_tokens, 4808);
  EXPECT_EQ(specs[0].output_tokens, 10);
  EXPECT_EQ(specs[1].arrival, absl::Microseconds(52000));
  EXPECT_EQ(specs[1].prompt_tokens, 3180);
  double prompt = 0, output = 0;
  for (const RequestSpec& s : specs) {
    prompt += s.prompt_tokens;
    output += s.output_tokens;
  }
  // README.md: ctx mean 2,048, gen mean 28; about an hour long.
  EXPECT_NEAR(prompt / specs.size(), 2048, 1);
  EXPECT_NEAR(output / specs.size(), 28, 1);
  EXPECT_GT(specs.back().arrival, absl::Minutes(55));
  EXPECT_LT(specs.back().arrival, absl::Minutes(61));
}

TEST(TraceTest, ScalesCapsAndLimitsTheAzureTrace) {
  SKIP_WITHOUT_TRACES();
  const std::string path = TracesDir() + "/AzureLLMInferenceTrace_conv_2023.csv";
  ASSERT_OK_AND_ASSIGN(auto full, LoadTrace(path, TraceFormat::kAzure, Unlimited()));
  ScheduleOptions o = Unlimited();
  o.time_scale = 4;
  o.length_scale = 0.1;
  o.max_prompt_tokens = 64;
  o.max_output_tokens = 16;
  o.max_requests = 50;
  ASSERT_OK_AND_ASSIGN(auto specs, LoadTrace(path, TraceFormat::kAzure, o));
  ASSERT_EQ(specs.size(), 50u);
  for (size_t i = 0; i < specs.size(); ++i) {
    EXPECT_EQ(specs[i].arrival, full[i].arrival / 4);
    EXPECT_EQ(
        specs[i].prompt_tokens,
        std::min(64, std::max(1, static_cast<int>(std::llround(full[i].prompt_tokens * 0.1)))));
    EXPECT_LE(specs[i].output_tokens, 16);
    EXPECT_GE(specs[i].output_tokens, 1);
  }
  // An offset skips trace time; the duration bounds wall-clock time.
  o = Unlimited();
  o.trace_offset = absl::Minutes(10);
  o.duration = absl::Minutes(1);
  ASSERT_OK_AND_ASSIGN(auto window, LoadTrace(path, TraceFormat::kAzure, o));
  int64_t expected = 0;
  for (const RequestSpec& s : full) {
    if (s.arrival >= absl::Minutes(10) && s.arrival < absl::Minutes(11)) ++expected;
  }
  EXPECT_GT(expected, 0);
  EXPECT_EQ(static_cast<int64_t>(window.size()), expected);
}

TEST(TraceTest, RejectsMalformedAzureRows) {
  EXPECT_THAT(ParseAzureTrace("TIMESTAMP,ContextTokens,GeneratedTokens\n"
                              "2023-11-16 18:17:03.9799600,4808,10\n"
                              "yesterday,1,2\n",
                              "t.csv", Unlimited()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("t.csv:3")));
  EXPECT_THAT(ParseAzureTrace("a,b,c\n", "t.csv", Unlimited()),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("t.csv:1")));
}

TEST(TraceTest, ParsesServegenDistributions) {
  ASSERT_OK_AND_ASSIGN(auto empty, ParseServegenDistribution("{}"));
  EXPECT_TRUE(empty.empty());
  ASSERT_OK_AND_ASSIGN(auto d, ParseServegenDistribution("{45: 0.25, 46: 0.75}"));
  EXPECT_EQ(d.size(), 2u);
  EXPECT_DOUBLE_EQ(d[46], 0.75);
  EXPECT_THAT(ParseServegenDistribution("[1, 2]"), StatusIs(absl::StatusCode::kInvalidArgument));
  EXPECT_THAT(ParseServegenDistribution("{1: x}"),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("1: x")));
}

TEST(TraceTest, ReplaysAServegenChunk) {
  SKIP_WITHOUT_TRACES();
  const std::string path = TracesDir() + "/servegen-deepseek-r1/chunk-0-trace.csv";
  ScheduleOptions o = Unlimited();
  o.seed = 5;
  ASSERT_OK_AND_ASSIGN(auto specs, LoadTrace(path, TraceFormat::kServegen, o));
  // Sum over windows of rate * 600 s is 4926 for chunk 0; the windows'
  // renewal processes restart at each window, which loses a little.
  EXPECT_NEAR(static_cast<double>(specs.size()), 4926.0, 4926.0 * 0.1);
  EXPECT_EQ(specs[0].arrival, absl::ZeroDuration());
  double prompt = 0, output = 0;
  int32_t max_output = 0;
  for (size_t i = 0; i < specs.size(); ++i) {
    if (i > 0) {
      ASSERT_GE(specs[i].arrival, specs[i - 1].arrival);
    }
    prompt += specs[i].prompt_tokens;
    output += specs[i].output_tokens;
    max_output = std::max(max_output, specs[i].output_tokens);
  }
  // The dataset's two non-empty windows have mean input 264 and 273, mean
  // output 1399 and 1440; outputs reach 28,757.
  EXPECT_NEAR(prompt / specs.size(), 268, 15);
  EXPECT_NEAR(output / specs.size(), 1420, 120);
  EXPECT_GT(max_output, 8000);
  // Windows with requests run from 2400 s to 23400 s (the last starts at 22800).
  EXPECT_GT(specs.back().arrival, absl::Seconds(23400 - 2400 - 600));
  EXPECT_LT(specs.back().arrival, absl::Seconds(23400 - 2400));

  // Deterministic in the seed; the dataset file works as the path too.
  ASSERT_OK_AND_ASSIGN(auto again,
                       LoadTrace(TracesDir() + "/servegen-deepseek-r1/chunk-0-dataset.json",
                                 TraceFormat::kServegen, o));
  ASSERT_EQ(again.size(), specs.size());
  EXPECT_EQ(again[100].arrival, specs[100].arrival);
  EXPECT_EQ(again[100].output_tokens, specs[100].output_tokens);
}

TEST(TraceTest, ServegenWithLimitsAndMissingFiles) {
  SKIP_WITHOUT_TRACES();
  ScheduleOptions o = Unlimited();
  o.max_requests = 20;
  o.max_output_tokens = 32;
  o.time_scale = 100;
  ASSERT_OK_AND_ASSIGN(auto specs,
                       LoadTrace(TracesDir() + "/servegen-deepseek-r1/chunk-10-trace.csv",
                                 TraceFormat::kServegen, o));
  ASSERT_EQ(specs.size(), 20u);
  for (const RequestSpec& s : specs) EXPECT_LE(s.output_tokens, 32);
  EXPECT_THAT(
      LoadTrace(TracesDir() + "/servegen-deepseek-r1/chunk-1-trace.csv", TraceFormat::kServegen, o),
      StatusIs(absl::StatusCode::kNotFound, HasSubstr("chunk-1-trace.csv")));
  EXPECT_THAT(ParseServegenTrace("0,1,1,Gamma,1,1\nbad\n", R"({"0": {"input_tokens": "{5: 1}",
                                 "output_tokens": "{6: 1}"}})",
                                 "c", o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("c-trace.csv:2")));
  EXPECT_THAT(ParseServegenTrace("0,1,1,Gamma,1,1\n", R"({"0": {"input_tokens": "{}",
                                 "output_tokens": "{}"}})",
                                 "c", o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("c-dataset.json")));
}

TEST(FitToContextTest, KeepsPromptPlusOutputWithinTheContext) {
  std::vector<RequestSpec> specs = {{absl::ZeroDuration(), 10, 10},
                                    {absl::ZeroDuration(), 100, 50},
                                    {absl::ZeroDuration(), 500, 500}};
  EXPECT_EQ(FitToContext(128, specs), 2);
  EXPECT_EQ(specs[0].prompt_tokens, 10);
  EXPECT_EQ(specs[0].output_tokens, 10);
  EXPECT_EQ(specs[1].prompt_tokens, 100);
  EXPECT_EQ(specs[1].output_tokens, 28);
  EXPECT_EQ(specs[2].prompt_tokens, 127);
  EXPECT_EQ(specs[2].output_tokens, 1);
  EXPECT_EQ(FitToContext(0, specs), 0);
}

TEST(PromptTokenIdsTest, DeterministicAndInRange) {
  std::vector<int32_t> a = PromptTokenIds(1000, 384, 7, 3);
  ASSERT_EQ(a.size(), 1000u);
  for (int32_t id : a) {
    EXPECT_GE(id, 96);  // min(100, 384 / 4)
    EXPECT_LT(id, 384);
  }
  EXPECT_EQ(PromptTokenIds(1000, 384, 7, 3), a);
  EXPECT_NE(PromptTokenIds(1000, 384, 7, 4), a);
  EXPECT_NE(PromptTokenIds(1000, 384, 8, 3), a);
  for (int32_t id : PromptTokenIds(100, 129280, 1, 0)) EXPECT_GE(id, 100);
}

TEST(PercentileTest, InterpolatesBetweenClosestRanks) {
  const std::vector<double> v = {5, 1, 4, 2, 3};
  EXPECT_DOUBLE_EQ(Percentile(v, 0), 1);
  EXPECT_DOUBLE_EQ(Percentile(v, 50), 3);
  EXPECT_DOUBLE_EQ(Percentile(v, 90), 4.6);
  EXPECT_DOUBLE_EQ(Percentile(v, 100), 5);
  EXPECT_DOUBLE_EQ(Percentile({7}, 99), 7);
  EXPECT_DOUBLE_EQ(Percentile({}, 50), 0);
  std::vector<double> hundred;
  for (int i = 1; i <= 100; ++i) hundred.push_back(i);
  EXPECT_DOUBLE_EQ(Percentile(hundred, 99), 99.01);
}

TEST(SummarizeTest, CountsLatenciesAndErrors) {
  std::vector<RequestRecord> records(4);
  for (int i = 0; i < 3; ++i) {
    RequestRecord& r = records[i];
    r.code = absl::StatusCode::kOk;
    r.prompt_tokens = 10;
    r.requested_output_tokens = 5;
    r.output_tokens = 5;
    r.ttft = absl::Milliseconds(10 * (i + 1));
    r.tpot = absl::Milliseconds(2);
    r.e2e = absl::Milliseconds(100);
    r.finished = absl::Seconds(i + 1);
  }
  records[2].output_tokens = 4;
  records[3].code = absl::StatusCode::kResourceExhausted;
  records[3].error_message = "decode tier full";
  records[3].lateness = absl::Milliseconds(30);
  records[3].finished = absl::Seconds(2);
  const BenchSummary s = Summarize(records);
  EXPECT_EQ(s.requests, 4);
  EXPECT_EQ(s.succeeded, 3);
  EXPECT_EQ(s.failed, 1);
  EXPECT_EQ(s.errors.at("RESOURCE_EXHAUSTED"), 1);
  EXPECT_EQ(s.short_outputs, 1);
  EXPECT_EQ(s.late_requests, 1);
  EXPECT_DOUBLE_EQ(s.wall_seconds, 3);
  EXPECT_DOUBLE_EQ(s.request_throughput, 1);
  EXPECT_EQ(s.output_tokens, 14);
  EXPECT_EQ(s.prompt_tokens, 30);
  EXPECT_DOUBLE_EQ(s.ttft_ms.mean, 20);
  EXPECT_DOUBLE_EQ(s.ttft_ms.p50, 20);
  EXPECT_DOUBLE_EQ(s.ttft_ms.max, 30);
  EXPECT_DOUBLE_EQ(s.tpot_ms.p99, 2);
  const std::string table = FormatSummaryTable(s);
  EXPECT_THAT(table, HasSubstr("RESOURCE_EXHAUSTED x1"));
  EXPECT_THAT(table, HasSubstr("decode tier full"));
  const nlohmann::json j = SummaryToJson(s);
  EXPECT_EQ(j["errors"]["RESOURCE_EXHAUSTED"]["count"], 1);
  EXPECT_DOUBLE_EQ(j["e2e_ms"]["p90"].get<double>(), 100);
}

// StreamingInference: answers every Generate with max_tokens tokens, one
// chunk each, `token_gap` apart, after holding the request for `hold`.
class StreamingInference final : public v1::Inference::Service {
 public:
  StreamingInference(absl::Duration hold, absl::Duration token_gap)
      : hold_(hold), token_gap_(token_gap) {}
  grpc::Status Generate(grpc::ServerContext*, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    const int in_flight = ++in_flight_;
    int seen = max_in_flight_.load();
    while (in_flight > seen && !max_in_flight_.compare_exchange_weak(seen, in_flight)) {
    }
    if (!request->ignore_eos() || !request->has_token_ids()) {
      --in_flight_;
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "want ignore_eos and token_ids");
    }
    absl::SleepFor(hold_);
    for (int i = 0; i < request->max_tokens(); ++i) {
      if (i > 0) absl::SleepFor(token_gap_);
      v1::GenerateResponse chunk;
      chunk.mutable_chunk()->add_token_ids(request->token_ids().ids(0));
      writer->Write(chunk);
    }
    v1::GenerateResponse done;
    done.mutable_complete()->set_finish_reason(v1::FINISH_REASON_LENGTH);
    done.mutable_complete()->mutable_usage()->set_completion_tokens(request->max_tokens());
    writer->Write(done);
    --in_flight_;
    return grpc::Status::OK;
  }
  int max_in_flight() const { return max_in_flight_.load(); }

 private:
  const absl::Duration hold_, token_gap_;
  std::atomic<int> in_flight_{0};
  std::atomic<int> max_in_flight_{0};
};

class RunLoadTest : public ::testing::Test {
 protected:
  void Start(absl::Duration hold, absl::Duration token_gap) {
    service_ = std::make_unique<StreamingInference>(hold, token_gap);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(service_.get());
    server_ = builder.BuildAndStart();
    ASSERT_NE(port, 0);
    ASSERT_OK_AND_ASSIGN(client_, InferenceClient::Connect(absl::StrCat("127.0.0.1:", port)));
  }
  void TearDown() override {
    if (server_) server_->Shutdown();
  }
  std::unique_ptr<StreamingInference> service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<InferenceClient> client_;
};

std::vector<RequestSpec> EvenlySpaced(int n, absl::Duration gap, int32_t output) {
  std::vector<RequestSpec> specs;
  for (int i = 0; i < n; ++i) specs.push_back({gap * i, 8, output});
  return specs;
}

TEST_F(RunLoadTest, SendsOnScheduleWithoutWaitingForEarlierRequests) {
  Start(absl::Milliseconds(300), absl::Milliseconds(5));
  LoadOptions options;
  options.max_concurrency = 16;
  options.vocab_size = 384;
  const absl::Time t0 = absl::Now();
  std::vector<RequestRecord> records =
      RunLoad(*client_, EvenlySpaced(8, absl::Milliseconds(20), 4), options);
  const absl::Duration took = absl::Now() - t0;
  ASSERT_EQ(records.size(), 8u);
  for (const RequestRecord& r : records) {
    EXPECT_EQ(r.code, absl::StatusCode::kOk) << r.error_message;
    EXPECT_EQ(r.output_tokens, 4);
    EXPECT_LT(r.lateness, absl::Milliseconds(100));
    ASSERT_TRUE(r.ttft.has_value());
    EXPECT_GE(*r.ttft, absl::Milliseconds(300));
    ASSERT_TRUE(r.tpot.has_value());
    EXPECT_GE(*r.tpot, absl::Milliseconds(5));
  }
  // Open loop: all eight overlap on the server instead of running one by one
  // (8 x 300 ms).
  EXPECT_EQ(service_->max_in_flight(), 8);
  EXPECT_LT(took, absl::Milliseconds(1500));
  const BenchSummary s = Summarize(records);
  EXPECT_EQ(s.succeeded, 8);
  EXPECT_EQ(s.output_tokens, 32);
}

TEST_F(RunLoadTest, RecordsLatenessWhenEverySenderIsBusy) {
  Start(absl::Milliseconds(100), absl::ZeroDuration());
  LoadOptions options;
  options.max_concurrency = 1;
  options.vocab_size = 384;
  std::vector<RequestRecord> records =
      RunLoad(*client_, EvenlySpaced(4, absl::Milliseconds(1), 1), options);
  EXPECT_EQ(service_->max_in_flight(), 1);
  // Request 3 was due at 3 ms and went out after three 100 ms requests.
  EXPECT_GE(records[3].lateness, absl::Milliseconds(250));
  EXPECT_EQ(Summarize(records).late_requests, 3);
}

TEST_F(RunLoadTest, RecordsErrorsByCode) {
  // Nothing listens on the client's port once the server is gone.
  Start(absl::ZeroDuration(), absl::ZeroDuration());
  server_->Shutdown();
  server_.reset();
  LoadOptions options;
  options.vocab_size = 384;
  options.request_timeout = absl::Seconds(5);
  std::vector<RequestRecord> records =
      RunLoad(*client_, EvenlySpaced(3, absl::ZeroDuration(), 2), options);
  const BenchSummary s = Summarize(records);
  EXPECT_EQ(s.failed, 3);
  EXPECT_EQ(s.errors.at("UNAVAILABLE"), 3);
}

}  // namespace
}  // namespace dserve::services
