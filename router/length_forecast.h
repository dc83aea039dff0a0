// router/length_forecast.h: how many more tokens a running request will
// generate. Reasoning answers run 1k-30k tokens with long, often bimodal
// tails, and every generated token's KV stays on the decode worker until the
// request ends, so the router plans KV from a forecast of each request's
// remaining length: the client's hint when it gives one, otherwise the length
// distribution learned online for the request's class, conditioned on how
// far the request has already run (one that has outlived the short mode is
// expected to run much longer). Pure code on plain structs.
#ifndef DSERVE_ROUTER_LENGTH_FORECAST_H_
#define DSERVE_ROUTER_LENGTH_FORECAST_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dserve::router {

// LengthSketch: a streaming quantile sketch over token counts in
// [1, 1'000'000]: a fixed histogram of log-spaced buckets, each 1% wide
// (bucket i holds [1.01^i, 1.01^(i+1))). Insertion is O(1), two sketches
// merge by adding counts, and the result depends only on the multiset of
// values added (not their order). Values outside the range are clamped into
// it. Quantiles are exact to within one bucket (1% relative). Copyable;
// thread-compatible.
class LengthSketch {
 public:
  static constexpr double kMinValue = 1;
  static constexpr double kMaxValue = 1e6;
  static constexpr double kGrowth = 1.01;

  LengthSketch();

  // Add: records one value (clamped into [kMinValue, kMaxValue]).
  void Add(double value);

  // Merge: adds every value `other` holds.
  void Merge(const LengthSketch& other);

  int64_t count() const { return count_; }
  double min() const { return min_; }
  double max() const { return max_; }

  // Quantile: the q-quantile (q clamped to [0, 1]) of the values added;
  // nullopt when empty. q=0 is the minimum and q=1 the maximum.
  std::optional<double> Quantile(double q) const;

  // QuantileAbove: the q-quantile of the values added that are greater than
  // `threshold` (the bucket holding the threshold counts in proportion to
  // its log-width above it); nullopt when no value exceeds it.
  std::optional<double> QuantileAbove(double q, double threshold) const;

  // BucketOf / BucketLow: bucket index of a (clamped) value, lower bound of
  // bucket i.
  static int BucketOf(double value);
  static double BucketLow(int bucket);
  static int NumBuckets();

 private:
  std::vector<int64_t> counts_;
  int64_t count_ = 0;
  double min_ = 0;
  double max_ = 0;
};

// LengthForecast: a forecast for one request.
struct LengthForecast {
  enum class Source {
    kHint,     // the client's hint
    kLearned,  // the class's learned distribution
    kPrior,    // no usable data: max_tokens
  };
  int64_t remaining_tokens = 0;  // tokens still to generate
  int64_t total_tokens = 0;      // generated_so_far + remaining_tokens
  Source source = Source::kPrior;
};

// OutputLengthForecaster: per request class (an opaque key such as
// "model|class|reasoning"), a LengthSketch of finished requests' output
// lengths. Not thread-safe: the routing policy that owns it serializes calls.
class OutputLengthForecaster {
 public:
  struct Options {
    // A class's distribution is used once it holds this many lengths;
    // before that the forecast is the prior.
    int64_t min_samples = 16;
  };

  OutputLengthForecaster() : OutputLengthForecaster(Options()) {}
  explicit OutputLengthForecaster(const Options& options) : options_(options) {}

  // Observe: records a finished request's output length (tokens, ≥ 1).
  // INVALID_ARGUMENT for output_tokens < 1.
  absl::Status Observe(std::string_view request_class, int64_t output_tokens);

  // Forecast: remaining output of a request of `request_class` with output
  // cap `max_tokens` (≥ 1) that has generated `generated_so_far` tokens
  // (0 ≤ generated_so_far ≤ max_tokens), at quantile `quantile` in (0, 1]
  // (higher = more conservative).
  //   - A hint (≥ 1, the client's expected total output) that the request has
  //     not yet reached: remaining = min(hint, max_tokens) - generated.
  //     A request past its hint is forecast as if it had none.
  //   - Otherwise, with ≥ min_samples lengths for the class: the quantile of
  //     the class's lengths greater than generated_so_far, minus
  //     generated_so_far, rounded up, at least 1.
  //   - Otherwise (no data, or the request has outlived every length seen):
  //     the prior, max_tokens - generated_so_far, since an unknown request
  //     can be trusted only not to exceed its cap.
  // Every forecast is capped by max_tokens - generated_so_far; a request at
  // its cap has 0 remaining. INVALID_ARGUMENT naming the field otherwise.
  absl::StatusOr<LengthForecast> Forecast(std::string_view request_class, int64_t max_tokens,
                                          std::optional<int64_t> hint, int64_t generated_so_far,
                                          double quantile) const;

  // Sketch: the class's sketch, or nullptr when nothing was observed for it.
  const LengthSketch* Sketch(std::string_view request_class) const;

 private:
  Options options_;
  std::unordered_map<std::string, LengthSketch> sketches_;
};

}  // namespace dserve::router

#endif  // DSERVE_ROUTER_LENGTH_FORECAST_H_
