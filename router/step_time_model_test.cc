// router/step_time_model_test.cc: the step-time model's closed forms on the
// shipped profiles, and the fitter recovering known coefficients from noisy
// synthetic step times.
#include "router/step_time_model.h"

#include <cmath>
#include <random>

#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dserve::router {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::HasSubstr;

TEST(FindProfileTest, ShipsNamedProfiles) {
  for (const char* name : {"h100-deepseek-v3", "h200-deepseek-v3", "cpu-small"}) {
    ASSERT_OK_AND_ASSIGN(HardwareProfile p, FindProfile(name));
    EXPECT_EQ(p.name, name);
    EXPECT_GT(p.weight_bytes, 0);
    EXPECT_GT(p.memory_bandwidth, 0);
    EXPECT_GT(p.flops, 0);
    EXPECT_GT(p.kv_capacity_tokens, 0);
  }
  ASSERT_OK_AND_ASSIGN(HardwareProfile h100, FindProfile("h100-deepseek-v3"));
  EXPECT_EQ(h100.kv_bytes_per_token, 70272);
  ASSERT_OK_AND_ASSIGN(HardwareProfile h200, FindProfile("h200-deepseek-v3"));
  EXPECT_GT(h200.memory_bandwidth, h100.memory_bandwidth);
  EXPECT_GT(h200.kv_capacity_tokens, 2 * h100.kv_capacity_tokens);
}

TEST(FindProfileTest, UnknownNameListsKnownOnes) {
  EXPECT_THAT(FindProfile("a100"),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("h100-deepseek-v3, h200-deepseek-v3, cpu-small")));
}

// Hand-checkable coefficients: memory 10 ms + 1e-7 s/ctx token, compute
// 1e-4 s/token + 2e-8 s/ctx token, overhead 2 ms.
StepTimeModel Simple(int64_t capacity = 10'000'000) {
  StepTimeCoefficients k;
  k.memory_fixed_s = 0.010;
  k.memory_per_context_token_s = 1e-7;
  k.compute_per_token_s = 1e-4;
  k.compute_per_context_token_s = 2e-8;
  k.overhead_s = 0.002;
  return StepTimeModel(k, capacity);
}

TEST(StepTimeModelTest, StepTimeIsMaxOfTermsPlusOverhead) {
  const StepTimeModel m = Simple();
  // B=10, ΣL=1000: memory 0.0101, compute 0.00102.
  EXPECT_NEAR(m.StepSeconds(10, 1000), 0.0101 + 0.002, 1e-12);
  // B=500, ΣL=1000: memory 0.0101, compute 0.05002.
  EXPECT_NEAR(m.StepSeconds(500, 1000), 0.05002 + 0.002, 1e-12);
}

TEST(StepTimeModelTest, ProfileStepTimeMatchesFormula) {
  ASSERT_OK_AND_ASSIGN(HardwareProfile p, FindProfile("h100-deepseek-v3"));
  const double b = 64, l = 64 * 2000.0;
  const double expected = std::max((p.weight_bytes + p.kv_bytes_per_token * l) / p.memory_bandwidth,
                                   (p.flops_per_token * b + p.flops_per_context_token * l) / p.flops) +
                          p.step_overhead_s;
  EXPECT_NEAR(StepSeconds(p, b, l), expected, 1e-12);
}

TEST(StepTimeModelTest, CriticalBatchIsWhereTermsMeet) {
  const StepTimeModel m = Simple();
  // L=0: 0.010 / 1e-4 = 100.
  EXPECT_EQ(m.CriticalBatch(0), 100);
  // L=100: 0.010 / (1e-4 + 100·(2e-8 - 1e-7)) = 0.010 / 9.2e-5 = 108.7.
  EXPECT_EQ(m.CriticalBatch(100), 108);
  const double b = 0.010 / 9.2e-5;
  EXPECT_NEAR(m.MemorySeconds(b, b * 100), m.ComputeSeconds(b, b * 100), 1e-12);
}

TEST(StepTimeModelTest, CriticalBatchFallsBackToKvBoundWhenTermsNeverMeet) {
  const StepTimeModel m = Simple(/*capacity=*/100'000);
  // L=2000: slope 1e-4 - 2000·8e-8 < 0, memory always dominates.
  EXPECT_EQ(m.CriticalBatch(2000), 50);
  // Never below 1, even when one request overfills the worker.
  EXPECT_EQ(m.CriticalBatch(1e9), 1);
  // Never above the KV bound.
  EXPECT_EQ(Simple(/*capacity=*/5000).CriticalBatch(100), 50);
}

TEST(StepTimeModelTest, ShippedProfilesHavePlausibleCriticalBatch) {
  ASSERT_OK_AND_ASSIGN(HardwareProfile h100, FindProfile("h100-deepseek-v3"));
  ASSERT_OK_AND_ASSIGN(HardwareProfile h200, FindProfile("h200-deepseek-v3"));
  // Short contexts: B* = (W/BW) / (F_tok/FLOPS) ≈ 74 on H100.
  EXPECT_EQ(CriticalBatch(h100, 0),
            static_cast<int64_t>((h100.weight_bytes / h100.memory_bandwidth) /
                                 (h100.flops_per_token / h100.flops)));
  EXPECT_GT(CriticalBatch(h100, 0), 50);
  EXPECT_LT(CriticalBatch(h100, 0), 150);
  // More bandwidth: the weights are cheaper, so compute catches up sooner.
  EXPECT_LT(CriticalBatch(h200, 1000), CriticalBatch(h100, 1000));
  ASSERT_OK_AND_ASSIGN(HardwareProfile cpu, FindProfile("cpu-small"));
  EXPECT_GE(CriticalBatch(cpu, 100), 1);
  EXPECT_LT(CriticalBatch(cpu, 100), 64);
}

TEST(StepTimeModelTest, MaxBatchForTpotIsLargestBatchMeetingSlo) {
  const StepTimeModel m = Simple();
  for (double l : {0.0, 100.0, 1000.0, 20000.0}) {
    for (double slo : {0.013, 0.02, 0.05, 0.2}) {
      const int64_t b = m.MaxBatchForTpot(l, slo);
      if (b > 0) {
        EXPECT_LE(m.StepSeconds(b, b * l), slo) << l << " " << slo;
      }
      EXPECT_GT(m.StepSeconds(b + 1, (b + 1) * l), slo) << l << " " << slo;
    }
  }
  EXPECT_GT(m.MaxBatchForTpot(1000, 0.05), 0);
  // Below the weights' read time nothing fits.
  EXPECT_EQ(m.MaxBatchForTpot(100, 0.011), 0);
  EXPECT_EQ(m.MaxBatchForTpot(100, 0), 0);
  // KV capacity bounds it as well.
  EXPECT_EQ(Simple(/*capacity=*/1000).MaxBatchForTpot(100, 10.0), 10);
}

TEST(StepTimeModelTest, DeepSeekOnH100MeetsFiftyMsAtModerateBatch) {
  ASSERT_OK_AND_ASSIGN(HardwareProfile h100, FindProfile("h100-deepseek-v3"));
  const int64_t b = MaxBatchForTpot(h100, 4000, 0.050);
  EXPECT_GT(b, CriticalBatch(h100, 4000) / 2);
  EXPECT_LE(StepSeconds(h100, b, b * 4000.0), 0.050);
}

// Samples from `truth` with multiplicative Gaussian noise, B in [1, 512] and
// per-request context log-uniform in [16, 4096]: both regimes get covered.
std::vector<StepTimeSample> Synthetic(const StepTimeModel& truth, int n, double noise,
                                      uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int64_t> batch(1, 512);
  std::uniform_real_distribution<double> log_ctx(std::log(16.0), std::log(4096.0));
  std::normal_distribution<double> eps(0, noise);
  std::vector<StepTimeSample> out;
  for (int i = 0; i < n; ++i) {
    StepTimeSample s;
    s.batch = batch(rng);
    s.total_context = static_cast<int64_t>(s.batch * std::exp(log_ctx(rng)));
    s.seconds = truth.StepSeconds(s.batch, s.total_context) * (1 + eps(rng));
    out.push_back(s);
  }
  return out;
}

StepTimeModel Scaled(const StepTimeModel& m, double f) {
  StepTimeCoefficients k = m.coefficients();
  k.memory_fixed_s *= f;
  k.memory_per_context_token_s *= f;
  k.compute_per_token_s /= f;
  k.compute_per_context_token_s *= f;
  k.overhead_s *= f;
  return StepTimeModel(k, m.kv_capacity_tokens());
}

TEST(StepTimeFitterTest, RecoversKnownCoefficientsFromNoisySamples) {
  const StepTimeModel truth = Simple();
  for (double prior_scale : {1.0, 2.0, 0.5}) {
    StepTimeFitter fitter(Scaled(truth, prior_scale));
    for (const StepTimeSample& s : Synthetic(truth, 2000, 0.01, 7)) ASSERT_OK(fitter.Add(s));
    fitter.Refit();
    const StepTimeCoefficients& got = fitter.model().coefficients();
    const StepTimeCoefficients& want = truth.coefficients();
    SCOPED_TRACE(prior_scale);
    EXPECT_NEAR(got.memory_fixed_s, want.memory_fixed_s, 0.03 * want.memory_fixed_s);
    EXPECT_NEAR(got.memory_per_context_token_s, want.memory_per_context_token_s,
                0.03 * want.memory_per_context_token_s);
    EXPECT_NEAR(got.compute_per_token_s, want.compute_per_token_s,
                0.03 * want.compute_per_token_s);
    EXPECT_NEAR(got.compute_per_context_token_s, want.compute_per_context_token_s,
                0.10 * want.compute_per_context_token_s);
    EXPECT_NEAR(got.overhead_s, want.overhead_s, 0.10 * want.overhead_s);
    // What the router uses: predicted step times and B*.
    for (double b : {1.0, 50.0, 200.0, 500.0}) {
      for (double l : {20.0, 500.0, 4000.0}) {
        EXPECT_NEAR(fitter.model().StepSeconds(b, b * l), truth.StepSeconds(b, b * l),
                    0.02 * truth.StepSeconds(b, b * l));
      }
    }
    EXPECT_NEAR(fitter.model().CriticalBatch(100), truth.CriticalBatch(100), 3);
  }
}

TEST(StepTimeFitterTest, RefitsOnlineAsSamplesArrive) {
  const StepTimeModel truth = Simple();
  StepTimeFitter::Options options;
  options.window = 256;
  options.refit_interval = 32;
  StepTimeFitter fitter(Scaled(truth, 2.0), options);
  EXPECT_DOUBLE_EQ(fitter.model().coefficients().memory_fixed_s, 0.020);
  for (const StepTimeSample& s : Synthetic(truth, 1024, 0.01, 11)) ASSERT_OK(fitter.Add(s));
  EXPECT_EQ(fitter.samples_seen(), 1024);
  EXPECT_NEAR(fitter.model().coefficients().memory_fixed_s, 0.010, 0.0005);
  EXPECT_NEAR(fitter.model().coefficients().compute_per_token_s, 1e-4, 5e-6);
}

TEST(StepTimeFitterTest, DegenerateSamplesKeepThePrior) {
  const StepTimeModel prior = Simple();
  StepTimeFitter fitter(prior);
  // One operating point says nothing about slopes.
  for (int i = 0; i < 100; ++i) ASSERT_OK(fitter.Add({8, 8000, 0.05}));
  fitter.Refit();
  const StepTimeCoefficients& got = fitter.model().coefficients();
  EXPECT_DOUBLE_EQ(got.memory_fixed_s, prior.coefficients().memory_fixed_s);
  EXPECT_DOUBLE_EQ(got.memory_per_context_token_s,
                   prior.coefficients().memory_per_context_token_s);
  EXPECT_DOUBLE_EQ(got.compute_per_token_s, prior.coefficients().compute_per_token_s);
  EXPECT_EQ(fitter.model().kv_capacity_tokens(), prior.kv_capacity_tokens());
}

TEST(StepTimeFitterTest, RejectsFitsWithNegativeCoefficients) {
  const StepTimeModel prior = Simple();
  StepTimeFitter fitter(prior);
  // Step time falling with context: a fit would need a negative slope.
  for (int i = 0; i < 200; ++i) {
    const int64_t ctx = 1000 + 10 * i;
    ASSERT_OK(fitter.Add({4, ctx, 0.05 - 1e-6 * ctx}));
  }
  fitter.Refit();
  const StepTimeCoefficients& got = fitter.model().coefficients();
  EXPECT_GE(got.memory_per_context_token_s, 0);
  EXPECT_GE(got.compute_per_context_token_s, 0);
  EXPECT_GT(got.memory_fixed_s, 0);
  EXPECT_GT(got.compute_per_token_s, 0);
  EXPECT_GE(got.overhead_s, 0);
}

TEST(StepTimeFitterTest, RejectsBadSamples) {
  StepTimeFitter fitter(Simple());
  EXPECT_THAT(fitter.Add({0, 10, 0.01}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("batch")));
  EXPECT_THAT(fitter.Add({1, -1, 0.01}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("total_context")));
  EXPECT_THAT(fitter.Add({1, 10, 0}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("seconds")));
  EXPECT_THAT(fitter.Add({1, 10, std::nan("")}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("seconds")));
  EXPECT_EQ(fitter.samples_seen(), 0);
}

}  // namespace
}  // namespace dserve::router
