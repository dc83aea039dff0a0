// router/step_time_model.cc: shipped hardware profiles, the step-time model's
// closed forms, and the two-piece least-squares fitter.
#include "router/step_time_model.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace dserve::router {
namespace {

// kMaxBatch: bound on any batch this model reports, so that degenerate inputs
// (zero context, zero slopes) give a large finite number rather than overflow.
constexpr int64_t kMaxBatch = int64_t{1} << 20;

// DeepSeek-V3 decode, expert-parallel as DeepSeek deploys it (attention and
// dense layers data-parallel, one routed expert per GPU per MoE layer, FP8
// weights). Per GPU per step it reads: MLA attention weights 61 × ~187M =
// 11.4B, 3 dense MLP layers 1.2B, shared experts 58 × 44M = 2.55B, the LM
// head 0.93B and its own routed expert 58 × 44M = 2.55B: ~18.6 GB at 1
// byte/param. Expert load is balanced, so each GPU does a token's full
// active compute per token of its batch: 2 × 37B FLOPs. Attention (absorbed
// MLA) per context token: 61 layers × 128 heads × 2 × (576 + 512) ≈ 17
// MFLOPs. KV: 61 layers × 576 bf16 = 70,272 bytes per token. Capacity: HBM
// less weights less ~8 GB of activations and all-to-all buffers.
HardwareProfile DeepSeekV3(std::string name, double hbm_bytes, double bandwidth) {
  HardwareProfile p;
  p.name = std::move(name);
  p.weight_bytes = 18.6e9;
  p.kv_bytes_per_token = 61.0 * 576 * 2;
  p.memory_bandwidth = bandwidth;
  p.flops_per_token = 2 * 37e9;
  p.flops_per_context_token = 61.0 * 128 * 2 * (576 + 512);
  p.flops = 989e12;  // dense bf16 peak
  p.step_overhead_s = 2e-3;  // launches, sampling, expert dispatch/combine
  p.kv_capacity_tokens =
      static_cast<int64_t>((hbm_bytes - p.weight_bytes - 8e9) / p.kv_bytes_per_token);
  return p;
}

// The CPU engine's `small` preset (~107M params, 8 layers, float32). Rough,
// unmeasured figures for a shared 2-core machine: all weights read per step
// (at batch ≥ 4 every expert is hit), ~45M active params per token, MLA KV of
// 8 layers × (128 + 32) floats, ~10 GB/s and ~20 GFLOP/s effective.
HardwareProfile CpuSmall() {
  HardwareProfile p;
  p.name = "cpu-small";
  p.weight_bytes = 107e6 * 4;
  p.kv_bytes_per_token = 8.0 * (128 + 32) * 4;
  p.memory_bandwidth = 10e9;
  p.flops_per_token = 2 * 45e6;
  p.flops_per_context_token = 8.0 * 12 * 2 * (160 + 128);
  p.flops = 20e9;
  p.step_overhead_s = 1e-3;
  p.kv_capacity_tokens = 262144;
  return p;
}

std::vector<HardwareProfile> ShippedProfiles() {
  return {DeepSeekV3("h100-deepseek-v3", 80e9, 3.35e12),
          DeepSeekV3("h200-deepseek-v3", 141e9, 4.8e12), CpuSmall()};
}

// FloorBatch: floor(x) as a batch size in [0, kMaxBatch].
int64_t FloorBatch(double x) {
  if (!(x > 0)) return 0;  // also NaN
  if (x >= static_cast<double>(kMaxBatch)) return kMaxBatch;
  return static_cast<int64_t>(std::floor(x));
}

// SolveLeastSquares: minimizes Σ (y - Σ_j x_j·β_j)² over K unknowns by the
// normal equations with columns scaled to unit size (ΣL is ~1e6 where B is
// ~1e2). False when the design is degenerate (too little spread in a column).
template <size_t K>
bool SolveLeastSquares(const std::vector<std::array<double, K>>& x, const std::vector<double>& y,
                       std::array<double, K>& beta) {
  std::array<double, K> scale{};
  for (const auto& row : x) {
    for (size_t j = 0; j < K; ++j) scale[j] = std::max(scale[j], std::abs(row[j]));
  }
  for (size_t j = 0; j < K; ++j) {
    if (scale[j] == 0) return false;
  }
  std::array<std::array<double, K + 1>, K> a{};
  for (size_t i = 0; i < x.size(); ++i) {
    for (size_t r = 0; r < K; ++r) {
      const double xr = x[i][r] / scale[r];
      for (size_t c = 0; c < K; ++c) a[r][c] += xr * x[i][c] / scale[c];
      a[r][K] += xr * y[i];
    }
  }
  double trace = 0;
  for (size_t j = 0; j < K; ++j) trace += a[j][j];
  for (size_t col = 0; col < K; ++col) {
    size_t pivot = col;
    for (size_t r = col + 1; r < K; ++r) {
      if (std::abs(a[r][col]) > std::abs(a[pivot][col])) pivot = r;
    }
    // A tiny pivot relative to the matrix means two columns are (nearly)
    // collinear: e.g. every sample had the same ΣL/B ratio.
    if (std::abs(a[pivot][col]) <= 1e-9 * trace) return false;
    std::swap(a[col], a[pivot]);
    for (size_t r = 0; r < K; ++r) {
      if (r == col) continue;
      const double f = a[r][col] / a[col][col];
      for (size_t c = col; c <= K; ++c) a[r][c] -= f * a[col][c];
    }
  }
  for (size_t j = 0; j < K; ++j) beta[j] = a[j][K] / a[j][j] / scale[j];
  return true;
}

}  // namespace

absl::StatusOr<HardwareProfile> FindProfile(std::string_view name) {
  for (HardwareProfile& p : ShippedProfiles()) {
    if (p.name == name) return std::move(p);
  }
  return absl::InvalidArgumentError(absl::StrCat("unknown hardware profile \"",
                                                 absl::string_view(name.data(), name.size()),
                                                 "\" (profiles: ",
                                                 absl::StrJoin(KnownProfileNames(), ", "), ")"));
}

std::vector<std::string> KnownProfileNames() {
  std::vector<std::string> names;
  for (const HardwareProfile& p : ShippedProfiles()) names.push_back(p.name);
  return names;
}

StepTimeModel::StepTimeModel(const StepTimeCoefficients& coefficients,
                             int64_t kv_capacity_tokens)
    : coefficients_(coefficients), kv_capacity_tokens_(kv_capacity_tokens) {}

StepTimeModel StepTimeModel::FromProfile(const HardwareProfile& p) {
  StepTimeCoefficients k;
  if (p.memory_bandwidth > 0) {
    k.memory_fixed_s = p.weight_bytes / p.memory_bandwidth;
    k.memory_per_context_token_s = p.kv_bytes_per_token / p.memory_bandwidth;
  }
  if (p.flops > 0) {
    k.compute_per_token_s = p.flops_per_token / p.flops;
    k.compute_per_context_token_s = p.flops_per_context_token / p.flops;
  }
  k.overhead_s = p.step_overhead_s;
  return StepTimeModel(k, p.kv_capacity_tokens);
}

double StepTimeModel::MemorySeconds(double batch, double total_context) const {
  (void)batch;
  return coefficients_.memory_fixed_s + coefficients_.memory_per_context_token_s * total_context;
}

double StepTimeModel::ComputeSeconds(double batch, double total_context) const {
  return coefficients_.compute_per_token_s * batch +
         coefficients_.compute_per_context_token_s * total_context;
}

double StepTimeModel::StepSeconds(double batch, double total_context) const {
  return std::max(MemorySeconds(batch, total_context), ComputeSeconds(batch, total_context)) +
         coefficients_.overhead_s;
}

int64_t StepTimeModel::KvBoundBatch(double mean_context) const {
  return FloorBatch(static_cast<double>(kv_capacity_tokens_) / std::max(mean_context, 1.0));
}

int64_t StepTimeModel::CriticalBatch(double mean_context) const {
  const StepTimeCoefficients& k = coefficients_;
  const double l = std::max(mean_context, 0.0);
  // memory(B) = Wm + a·L·B, compute(B) = (p + q·L)·B: they meet at
  // B = Wm / (p + q·L - a·L) when compute grows faster.
  const double slope = k.compute_per_token_s + (k.compute_per_context_token_s -
                                                k.memory_per_context_token_s) * l;
  const int64_t kv_bound = std::max<int64_t>(1, KvBoundBatch(l));
  if (slope <= 0) return kv_bound;
  return std::clamp<int64_t>(FloorBatch(k.memory_fixed_s / slope), 1, kv_bound);
}

int64_t StepTimeModel::MaxBatchForTpot(double mean_context, double tpot_slo_s) const {
  const StepTimeCoefficients& k = coefficients_;
  const double l = std::max(mean_context, 0.0);
  const double budget = tpot_slo_s - k.overhead_s;
  if (budget < k.memory_fixed_s || budget <= 0) return 0;
  // Both terms rise linearly in B; each must fit in the budget.
  double bound = static_cast<double>(kMaxBatch);
  const double memory_slope = k.memory_per_context_token_s * l;
  if (memory_slope > 0) bound = std::min(bound, (budget - k.memory_fixed_s) / memory_slope);
  const double compute_slope = k.compute_per_token_s + k.compute_per_context_token_s * l;
  if (compute_slope > 0) bound = std::min(bound, budget / compute_slope);
  const int64_t limit = KvBoundBatch(l);
  int64_t b = std::min(FloorBatch(bound), limit);
  // The closed form can land one off where a batch meets the SLO exactly;
  // settle the boundary on the step time itself.
  while (b > 0 && StepSeconds(static_cast<double>(b), b * l) > tpot_slo_s) --b;
  while (b < limit && StepSeconds(static_cast<double>(b + 1), (b + 1) * l) <= tpot_slo_s) ++b;
  return b;
}

double StepSeconds(const HardwareProfile& profile, double batch, double total_context) {
  return StepTimeModel::FromProfile(profile).StepSeconds(batch, total_context);
}

int64_t CriticalBatch(const HardwareProfile& profile, double mean_context) {
  return StepTimeModel::FromProfile(profile).CriticalBatch(mean_context);
}

int64_t MaxBatchForTpot(const HardwareProfile& profile, double mean_context, double tpot_slo_s) {
  return StepTimeModel::FromProfile(profile).MaxBatchForTpot(mean_context, tpot_slo_s);
}

StepTimeFitter::StepTimeFitter(const StepTimeModel& prior) : StepTimeFitter(prior, Options()) {}

StepTimeFitter::StepTimeFitter(const StepTimeModel& prior, const Options& options)
    : prior_(prior), options_(options), model_(prior) {
  options_.window = std::max(options_.window, 1);
  options_.refit_interval = std::max(options_.refit_interval, 1);
  options_.min_piece_samples = std::max(options_.min_piece_samples, 3);
  window_.reserve(static_cast<size_t>(options_.window));
}

absl::Status StepTimeFitter::Add(const StepTimeSample& sample) {
  if (sample.batch < 1) {
    return absl::InvalidArgumentError(absl::StrCat("batch must be >= 1, got ", sample.batch));
  }
  if (sample.total_context < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("total_context must be >= 0, got ", sample.total_context));
  }
  if (!(sample.seconds > 0) || !std::isfinite(sample.seconds)) {
    return absl::InvalidArgumentError(
        absl::StrCat("seconds must be finite and > 0, got ", sample.seconds));
  }
  if (window_.size() < static_cast<size_t>(options_.window)) {
    window_.push_back(sample);
  } else {
    window_[next_] = sample;
  }
  next_ = (next_ + 1) % static_cast<size_t>(options_.window);
  ++samples_seen_;
  if (++since_refit_ >= options_.refit_interval) Refit();
  return absl::OkStatus();
}

void StepTimeFitter::Refit() {
  since_refit_ = 0;
  const size_t n = window_.size();
  const StepTimeCoefficients& fallback = prior_.coefficients();

  // FitFrom: the two-piece fit starting from an assignment of samples to the
  // compute term; returns the coefficients and their sum of squared relative
  // residuals under the full max() model.
  auto fit_from = [&](std::vector<bool> compute_bound) {
    StepTimeCoefficients k = fallback;
    for (int32_t iter = 0; iter < options_.max_iterations; ++iter) {
      StepTimeCoefficients next = fallback;
      std::vector<std::array<double, 3>> cx;
      std::vector<double> cy;
      for (size_t i = 0; i < n; ++i) {
        if (!compute_bound[i]) continue;
        cx.push_back({1.0, static_cast<double>(window_[i].batch),
                      static_cast<double>(window_[i].total_context)});
        cy.push_back(window_[i].seconds);
      }
      if (cx.size() >= static_cast<size_t>(options_.min_piece_samples)) {
        std::array<double, 3> beta{};
        bool ok = SolveLeastSquares<3>(cx, cy, beta);
        if (ok && beta[0] < 0) {
          // A small overhead fitted below zero by noise: pin it at zero.
          std::vector<std::array<double, 2>> cx2;
          for (const auto& row : cx) cx2.push_back({row[1], row[2]});
          std::array<double, 2> beta2{};
          ok = SolveLeastSquares<2>(cx2, cy, beta2);
          beta = {0.0, beta2[0], beta2[1]};
        }
        if (ok && beta[1] > 0 && beta[2] >= 0) {
          next.overhead_s = beta[0];
          next.compute_per_token_s = beta[1];
          next.compute_per_context_token_s = beta[2];
        }
      }
      std::vector<std::array<double, 2>> mx;
      std::vector<double> my;
      for (size_t i = 0; i < n; ++i) {
        if (compute_bound[i]) continue;
        mx.push_back({1.0, static_cast<double>(window_[i].total_context)});
        my.push_back(window_[i].seconds - next.overhead_s);
      }
      if (mx.size() >= static_cast<size_t>(options_.min_piece_samples)) {
        std::array<double, 2> beta{};
        if (SolveLeastSquares<2>(mx, my, beta) && beta[0] > 0 && beta[1] >= 0) {
          next.memory_fixed_s = beta[0];
          next.memory_per_context_token_s = beta[1];
        }
      }
      k = next;
      const StepTimeModel m(k, prior_.kv_capacity_tokens());
      bool changed = false;
      for (size_t i = 0; i < n; ++i) {
        const double b = static_cast<double>(window_[i].batch);
        const double l = static_cast<double>(window_[i].total_context);
        const bool cb = m.ComputeSeconds(b, l) > m.MemorySeconds(b, l);
        if (cb != compute_bound[i]) {
          compute_bound[i] = cb;
          changed = true;
        }
      }
      if (!changed) break;
    }
    const StepTimeModel m(k, prior_.kv_capacity_tokens());
    double sse = 0;
    for (const StepTimeSample& s : window_) {
      const double r =
          (m.StepSeconds(static_cast<double>(s.batch), static_cast<double>(s.total_context)) -
           s.seconds) /
          s.seconds;
      sse += r * r;
    }
    return std::make_pair(k, sse);
  };

  // Start from the prior's assignment, and from splits by batch size in case
  // the prior is far enough off to put every sample in one piece.
  std::vector<std::vector<bool>> starts;
  {
    std::vector<bool> by_prior(n);
    for (size_t i = 0; i < n; ++i) {
      const double b = static_cast<double>(window_[i].batch);
      const double l = static_cast<double>(window_[i].total_context);
      by_prior[i] = prior_.ComputeSeconds(b, l) > prior_.MemorySeconds(b, l);
    }
    starts.push_back(std::move(by_prior));
    std::vector<int64_t> batches;
    for (const StepTimeSample& s : window_) batches.push_back(s.batch);
    std::sort(batches.begin(), batches.end());
    for (double q : {0.25, 0.5, 0.75}) {
      if (batches.empty()) break;
      const int64_t threshold = batches[static_cast<size_t>(q * (batches.size() - 1))];
      std::vector<bool> split(n);
      for (size_t i = 0; i < n; ++i) split[i] = window_[i].batch > threshold;
      starts.push_back(std::move(split));
    }
  }
  double best_sse = std::numeric_limits<double>::infinity();
  StepTimeCoefficients best = fallback;
  for (std::vector<bool>& start : starts) {
    auto [k, sse] = fit_from(std::move(start));
    if (sse < best_sse) {
      best_sse = sse;
      best = k;
    }
  }
  model_ = StepTimeModel(best, prior_.kv_capacity_tokens());
}

}  // namespace dserve::router
