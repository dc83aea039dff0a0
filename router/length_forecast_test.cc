// router/length_forecast_test.cc: the length sketch's accuracy against exact
// quantiles, and conditional forecasts on a bimodal reasoning-like
// distribution.
#include "router/length_forecast.h"

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dserve::router {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::HasSubstr;

// ExactQuantile: the rank-ceil(q·n) smallest value, the definition the sketch
// approximates.
double ExactQuantile(std::vector<double> sorted, double q) {
  const size_t rank = std::max<size_t>(1, static_cast<size_t>(std::ceil(q * sorted.size())));
  return sorted[rank - 1];
}

TEST(LengthSketchTest, QuantilesWithinOneBucketOfExact) {
  std::mt19937 rng(42);
  std::lognormal_distribution<double> lengths(std::log(2000.0), 1.2);
  LengthSketch sketch;
  std::vector<double> values;
  for (int i = 0; i < 20000; ++i) {
    const double v = std::min(std::max(std::round(lengths(rng)), 1.0), 1e6);
    values.push_back(v);
    sketch.Add(v);
  }
  std::sort(values.begin(), values.end());
  EXPECT_EQ(sketch.count(), 20000);
  EXPECT_EQ(*sketch.Quantile(0), values.front());
  EXPECT_EQ(*sketch.Quantile(1), values.back());
  for (double q : {0.001, 0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99, 0.999}) {
    const double exact = ExactQuantile(values, q);
    EXPECT_NEAR(*sketch.Quantile(q), exact, 0.01 * exact) << q;
  }
}

TEST(LengthSketchTest, EmptyAndSingleValue) {
  LengthSketch sketch;
  EXPECT_EQ(sketch.Quantile(0.5), std::nullopt);
  EXPECT_EQ(sketch.QuantileAbove(0.5, 0), std::nullopt);
  sketch.Add(1000);
  EXPECT_EQ(*sketch.Quantile(0.5), 1000);
  EXPECT_EQ(*sketch.QuantileAbove(0.5, 10), 1000);
  EXPECT_EQ(sketch.QuantileAbove(0.5, 1000), std::nullopt);
}

TEST(LengthSketchTest, ClampsOutOfRangeValues) {
  LengthSketch sketch;
  sketch.Add(0);
  sketch.Add(5e6);
  EXPECT_EQ(sketch.min(), 1);
  EXPECT_EQ(sketch.max(), 1e6);
  EXPECT_EQ(LengthSketch::BucketOf(1e6), LengthSketch::NumBuckets() - 1);
  EXPECT_EQ(LengthSketch::BucketOf(1), 0);
}

TEST(LengthSketchTest, MergeEqualsAddingEverything) {
  std::mt19937 rng(3);
  std::uniform_real_distribution<double> u(1, 50000);
  LengthSketch a, b, all;
  for (int i = 0; i < 5000; ++i) {
    const double v = u(rng);
    (i % 3 == 0 ? a : b).Add(v);
    all.Add(v);
  }
  a.Merge(b);
  EXPECT_EQ(a.count(), all.count());
  EXPECT_EQ(a.min(), all.min());
  EXPECT_EQ(a.max(), all.max());
  for (double q : {0.1, 0.5, 0.9}) EXPECT_EQ(*a.Quantile(q), *all.Quantile(q));
}

TEST(LengthSketchTest, QuantileAboveMatchesExactConditionalQuantile) {
  std::mt19937 rng(9);
  std::lognormal_distribution<double> lengths(std::log(3000.0), 1.0);
  LengthSketch sketch;
  std::vector<double> values;
  for (int i = 0; i < 20000; ++i) {
    const double v = std::round(lengths(rng)) + 1;
    values.push_back(v);
    sketch.Add(v);
  }
  std::sort(values.begin(), values.end());
  for (double threshold : {500.0, 3000.0, 10000.0}) {
    std::vector<double> above(std::upper_bound(values.begin(), values.end(), threshold),
                              values.end());
    for (double q : {0.5, 0.9}) {
      const double exact = ExactQuantile(above, q);
      EXPECT_NEAR(*sketch.QuantileAbove(q, threshold), exact, 0.02 * exact)
          << threshold << " " << q;
    }
  }
}

// A reasoning-like bimodal class: 60% short answers around 500 tokens, 40%
// long ones around 8000.
std::vector<int64_t> Bimodal(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::lognormal_distribution<double> short_mode(std::log(500.0), 0.2);
  std::lognormal_distribution<double> long_mode(std::log(8000.0), 0.2);
  std::bernoulli_distribution is_long(0.4);
  std::vector<int64_t> out;
  for (int i = 0; i < n; ++i) {
    out.push_back(static_cast<int64_t>(std::round(is_long(rng) ? long_mode(rng) : short_mode(rng))));
  }
  return out;
}

TEST(OutputLengthForecasterTest, ConditionalForecastGrowsPastFirstMode) {
  OutputLengthForecaster forecaster;
  std::vector<int64_t> lengths = Bimodal(10000, 5);
  for (int64_t v : lengths) ASSERT_OK(forecaster.Observe("r1|chat|reasoning", v));
  std::sort(lengths.begin(), lengths.end());

  ASSERT_OK_AND_ASSIGN(LengthForecast fresh,
                       forecaster.Forecast("r1|chat|reasoning", 32768, std::nullopt, 0, 0.5));
  EXPECT_EQ(fresh.source, LengthForecast::Source::kLearned);
  EXPECT_LT(fresh.total_tokens, 1000);  // median is in the short mode

  ASSERT_OK_AND_ASSIGN(LengthForecast early,
                       forecaster.Forecast("r1|chat|reasoning", 32768, std::nullopt, 100, 0.5));
  ASSERT_OK_AND_ASSIGN(LengthForecast past,
                       forecaster.Forecast("r1|chat|reasoning", 32768, std::nullopt, 2000, 0.5));
  EXPECT_GT(past.remaining_tokens, 5 * early.remaining_tokens);
  // Past the short mode, the forecast is the long mode's median.
  std::vector<double> above;
  for (int64_t v : lengths) {
    if (v > 2000) above.push_back(static_cast<double>(v));
  }
  const double exact = ExactQuantile(above, 0.5);
  EXPECT_NEAR(static_cast<double>(past.total_tokens), exact, 0.02 * exact);
  EXPECT_EQ(past.total_tokens, 2000 + past.remaining_tokens);

  // A higher quantile is more conservative.
  ASSERT_OK_AND_ASSIGN(LengthForecast p90,
                       forecaster.Forecast("r1|chat|reasoning", 32768, std::nullopt, 2000, 0.9));
  EXPECT_GT(p90.remaining_tokens, past.remaining_tokens);
}

TEST(OutputLengthForecasterTest, HintWinsCappedByMaxTokens) {
  OutputLengthForecaster forecaster;
  for (int64_t v : Bimodal(1000, 1)) ASSERT_OK(forecaster.Observe("c", v));
  ASSERT_OK_AND_ASSIGN(LengthForecast f, forecaster.Forecast("c", 4096, 3000, 1000, 0.5));
  EXPECT_EQ(f.source, LengthForecast::Source::kHint);
  EXPECT_EQ(f.remaining_tokens, 2000);
  EXPECT_EQ(f.total_tokens, 3000);
  ASSERT_OK_AND_ASSIGN(f, forecaster.Forecast("c", 4096, 100000, 1000, 0.5));
  EXPECT_EQ(f.remaining_tokens, 3096);
  // Past its hint, the request is forecast from the learned distribution.
  ASSERT_OK_AND_ASSIGN(f, forecaster.Forecast("c", 32768, 300, 2000, 0.5));
  EXPECT_EQ(f.source, LengthForecast::Source::kLearned);
  EXPECT_GT(f.total_tokens, 5000);
}

TEST(OutputLengthForecasterTest, PriorWithoutDataOrBeyondAllData) {
  OutputLengthForecaster forecaster;
  ASSERT_OK_AND_ASSIGN(LengthForecast f, forecaster.Forecast("new", 8192, std::nullopt, 100, 0.5));
  EXPECT_EQ(f.source, LengthForecast::Source::kPrior);
  EXPECT_EQ(f.remaining_tokens, 8092);
  // Too few samples: still the prior.
  for (int i = 0; i < 10; ++i) ASSERT_OK(forecaster.Observe("new", 200));
  ASSERT_OK_AND_ASSIGN(f, forecaster.Forecast("new", 8192, std::nullopt, 100, 0.5));
  EXPECT_EQ(f.source, LengthForecast::Source::kPrior);
  for (int i = 0; i < 10; ++i) ASSERT_OK(forecaster.Observe("new", 200));
  ASSERT_OK_AND_ASSIGN(f, forecaster.Forecast("new", 8192, std::nullopt, 100, 0.5));
  EXPECT_EQ(f.source, LengthForecast::Source::kLearned);
  EXPECT_EQ(f.remaining_tokens, 100);
  // Outlived every length seen: back to the cap.
  ASSERT_OK_AND_ASSIGN(f, forecaster.Forecast("new", 8192, std::nullopt, 300, 0.5));
  EXPECT_EQ(f.source, LengthForecast::Source::kPrior);
  EXPECT_EQ(f.remaining_tokens, 7892);
  // Learned forecasts are capped by max_tokens and at least 1.
  ASSERT_OK_AND_ASSIGN(f, forecaster.Forecast("new", 150, std::nullopt, 100, 0.5));
  EXPECT_EQ(f.remaining_tokens, 50);
  ASSERT_OK_AND_ASSIGN(f, forecaster.Forecast("new", 150, std::nullopt, 150, 0.5));
  EXPECT_EQ(f.remaining_tokens, 0);
}

TEST(OutputLengthForecasterTest, ClassesAreSeparate) {
  OutputLengthForecaster forecaster;
  for (int i = 0; i < 100; ++i) {
    ASSERT_OK(forecaster.Observe("m|a|reasoning", 10000));
    ASSERT_OK(forecaster.Observe("m|a|plain", 100));
  }
  ASSERT_OK_AND_ASSIGN(LengthForecast r,
                       forecaster.Forecast("m|a|reasoning", 32768, std::nullopt, 0, 0.5));
  ASSERT_OK_AND_ASSIGN(LengthForecast p,
                       forecaster.Forecast("m|a|plain", 32768, std::nullopt, 0, 0.5));
  EXPECT_EQ(r.total_tokens, 10000);
  EXPECT_EQ(p.total_tokens, 100);
  EXPECT_EQ(forecaster.Sketch("m|b|plain"), nullptr);
}

TEST(OutputLengthForecasterTest, RejectsBadArguments) {
  OutputLengthForecaster forecaster;
  EXPECT_THAT(forecaster.Observe("c", 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("output_tokens")));
  EXPECT_THAT(forecaster.Forecast("c", 0, std::nullopt, 0, 0.5),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_tokens")));
  EXPECT_THAT(forecaster.Forecast("c", 10, std::nullopt, 11, 0.5),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("generated_so_far")));
  EXPECT_THAT(forecaster.Forecast("c", 10, std::nullopt, 0, 0),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("quantile")));
  EXPECT_THAT(forecaster.Forecast("c", 10, 0, 0, 0.5),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("hint")));
}

}  // namespace
}  // namespace dserve::router
