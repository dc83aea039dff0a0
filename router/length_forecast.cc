// router/length_forecast.cc: the log-bucket length sketch and the
// per-class output-length forecaster.
#include "router/length_forecast.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace dserve::router {
namespace {

const double kLogGrowth = std::log(LengthSketch::kGrowth);
const int kNumBuckets =
    static_cast<int>(std::floor(std::log(LengthSketch::kMaxValue) / kLogGrowth)) + 1;

double Clamp(double value) {
  if (!(value >= LengthSketch::kMinValue)) return LengthSketch::kMinValue;  // also NaN
  return std::min(value, LengthSketch::kMaxValue);
}

}  // namespace

LengthSketch::LengthSketch() : counts_(static_cast<size_t>(kNumBuckets), 0) {}

int LengthSketch::NumBuckets() { return kNumBuckets; }

int LengthSketch::BucketOf(double value) {
  const int b = static_cast<int>(std::floor(std::log(Clamp(value)) / kLogGrowth));
  return std::clamp(b, 0, kNumBuckets - 1);
}

double LengthSketch::BucketLow(int bucket) { return std::exp(bucket * kLogGrowth); }

void LengthSketch::Add(double value) {
  value = Clamp(value);
  ++counts_[static_cast<size_t>(BucketOf(value))];
  if (count_ == 0) {
    min_ = max_ = value;
  } else {
    min_ = std::min(min_, value);
    max_ = std::max(max_, value);
  }
  ++count_;
}

void LengthSketch::Merge(const LengthSketch& other) {
  if (other.count_ == 0) return;
  for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
  min_ = count_ == 0 ? other.min_ : std::min(min_, other.min_);
  max_ = count_ == 0 ? other.max_ : std::max(max_, other.max_);
  count_ += other.count_;
}

std::optional<double> LengthSketch::Quantile(double q) const {
  if (count_ == 0) return std::nullopt;
  q = std::clamp(q, 0.0, 1.0);
  if (q == 0) return min_;
  if (q == 1) return max_;
  // The rank-th smallest value lies in the bucket where the running count
  // reaches rank; interpolating log-linearly inside it stays in that bucket.
  const double rank = std::max(1.0, std::ceil(q * static_cast<double>(count_)));
  double before = 0;
  for (int i = 0; i < kNumBuckets; ++i) {
    const double c = static_cast<double>(counts_[static_cast<size_t>(i)]);
    if (c == 0) continue;
    if (before + c >= rank) {
      const double f = (rank - before) / c;
      const double v = BucketLow(i) * std::exp(f * kLogGrowth);
      return std::clamp(v, min_, max_);
    }
    before += c;
  }
  return max_;
}

std::optional<double> LengthSketch::QuantileAbove(double q, double threshold) const {
  if (count_ == 0 || threshold >= max_) return std::nullopt;
  if (threshold < min_) return Quantile(q);
  q = std::clamp(q, 0.0, 1.0);
  const int j = BucketOf(threshold);
  const double high_j = BucketLow(j + 1);
  // Share of bucket j above the threshold, assuming values spread evenly in
  // log space inside a bucket.
  const double partial_fraction =
      std::clamp(std::log(high_j / threshold) / kLogGrowth, 0.0, 1.0);
  const double partial = static_cast<double>(counts_[static_cast<size_t>(j)]) * partial_fraction;
  double total = partial;
  for (int i = j + 1; i < kNumBuckets; ++i) total += static_cast<double>(counts_[i]);
  if (total <= 0) return std::nullopt;
  const double target = std::max(q * total, 1e-9);
  double v = max_;
  if (target <= partial) {
    v = threshold * std::pow(high_j / threshold, target / partial);
  } else {
    double before = partial;
    for (int i = j + 1; i < kNumBuckets; ++i) {
      const double c = static_cast<double>(counts_[static_cast<size_t>(i)]);
      if (c == 0) continue;
      if (before + c >= target) {
        v = BucketLow(i) * std::exp((target - before) / c * kLogGrowth);
        break;
      }
      before += c;
    }
  }
  return std::clamp(v, threshold, max_);
}

absl::Status OutputLengthForecaster::Observe(std::string_view request_class,
                                             int64_t output_tokens) {
  if (output_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("output_tokens must be >= 1, got ", output_tokens));
  }
  sketches_[std::string(request_class)].Add(static_cast<double>(output_tokens));
  return absl::OkStatus();
}

const LengthSketch* OutputLengthForecaster::Sketch(std::string_view request_class) const {
  auto it = sketches_.find(std::string(request_class));
  return it == sketches_.end() ? nullptr : &it->second;
}

absl::StatusOr<LengthForecast> OutputLengthForecaster::Forecast(std::string_view request_class,
                                                                int64_t max_tokens,
                                                                std::optional<int64_t> hint,
                                                                int64_t generated_so_far,
                                                                double quantile) const {
  if (max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", max_tokens));
  }
  if (generated_so_far < 0 || generated_so_far > max_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("generated_so_far must be in [0, max_tokens=",
                                                   max_tokens, "], got ", generated_so_far));
  }
  if (!(quantile > 0 && quantile <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrCat("quantile must be in (0, 1], got ", quantile));
  }
  if (hint.has_value() && *hint < 1) {
    return absl::InvalidArgumentError(absl::StrCat("hint must be >= 1, got ", *hint));
  }
  const int64_t cap = max_tokens - generated_so_far;
  auto make = [&](int64_t remaining, LengthForecast::Source source) {
    LengthForecast f;
    f.remaining_tokens = std::clamp<int64_t>(remaining, cap > 0 ? 1 : 0, cap);
    f.total_tokens = generated_so_far + f.remaining_tokens;
    f.source = source;
    return f;
  };
  if (hint.has_value() && std::min(*hint, max_tokens) > generated_so_far) {
    return make(std::min(*hint, max_tokens) - generated_so_far, LengthForecast::Source::kHint);
  }
  if (const LengthSketch* sketch = Sketch(request_class);
      sketch != nullptr && sketch->count() >= options_.min_samples) {
    if (std::optional<double> total =
            sketch->QuantileAbove(quantile, static_cast<double>(generated_so_far))) {
      const auto remaining =
          static_cast<int64_t>(std::ceil(*total - static_cast<double>(generated_so_far)));
      return make(remaining, LengthForecast::Source::kLearned);
    }
  }
  return make(cap, LengthForecast::Source::kPrior);
}

}  // namespace dserve::router
