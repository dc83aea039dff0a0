// router/step_time_model.h: how long one decode step takes on a worker, as a
// function of its batch size B and the total context ΣL the batch attends to.
// A decode step reads the weights once and every running request's KV, and
// does per-token and per-context-token arithmetic; whichever of the two takes
// longer bounds the step:
//   t(B, ΣL) = max((W + b_tok·ΣL)/BW, (F_tok·B + F_ctx·ΣL)/FLOPS) + c.
// The critical batch B* is where the two terms meet: below it a step costs
// about the same whatever the batch (memory-bound), so a worker running below
// B* wastes throughput. Parameters start from a named hardware profile and are
// refitted online from the step times a worker reports (StepTimeFitter).
// Pure code on plain structs: the live router and the simulator share it.
#ifndef DSERVE_ROUTER_STEP_TIME_MODEL_H_
#define DSERVE_ROUTER_STEP_TIME_MODEL_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace dserve::router {

// HardwareProfile: one decode worker (one GPU, or one CPU engine) serving one
// model. Byte and FLOP figures are what this worker itself reads and computes
// per step, i.e. its share under the deployment's parallelism.
struct HardwareProfile {
  std::string name;
  double weight_bytes = 0;                // W: weight bytes read per step
  double kv_bytes_per_token = 0;          // b_tok: KV bytes per context token
  double memory_bandwidth = 0;            // BW: bytes/s
  double flops_per_token = 0;             // F_tok: FLOPs per generated token
  double flops_per_context_token = 0;     // F_ctx: attention FLOPs per context token
  double flops = 0;                       // FLOPS: FLOP/s
  double step_overhead_s = 0;             // c: launch, sampling, communication
  int64_t kv_capacity_tokens = 0;         // KV tokens that fit beside the weights
};

// FindProfile: the shipped profile called `name` ("h100-deepseek-v3",
// "h200-deepseek-v3", "cpu-small"); INVALID_ARGUMENT listing the known names
// otherwise.
absl::StatusOr<HardwareProfile> FindProfile(std::string_view name);

// KnownProfileNames: the names FindProfile accepts, in a fixed order.
std::vector<std::string> KnownProfileNames();

// StepTimeCoefficients: the step-time model reduced to the five seconds-valued
// coefficients that observations can identify (W and BW, say, cannot be told
// apart from step times, only W/BW can).
struct StepTimeCoefficients {
  double memory_fixed_s = 0;               // W/BW
  double memory_per_context_token_s = 0;   // b_tok/BW
  double compute_per_token_s = 0;          // F_tok/FLOPS
  double compute_per_context_token_s = 0;  // F_ctx/FLOPS
  double overhead_s = 0;                   // c
};

// StepTimeModel: a worker's step-time model plus its KV capacity. Copyable
// value type; all methods are const and thread-compatible.
class StepTimeModel {
 public:
  StepTimeModel() = default;
  StepTimeModel(const StepTimeCoefficients& coefficients, int64_t kv_capacity_tokens);

  // FromProfile: the model a profile implies.
  static StepTimeModel FromProfile(const HardwareProfile& profile);

  const StepTimeCoefficients& coefficients() const { return coefficients_; }
  int64_t kv_capacity_tokens() const { return kv_capacity_tokens_; }

  // MemorySeconds / ComputeSeconds: the two terms, without the overhead c.
  double MemorySeconds(double batch, double total_context) const;
  double ComputeSeconds(double batch, double total_context) const;

  // StepSeconds: t(B, ΣL) in seconds. Batch 0 still pays for the weights.
  double StepSeconds(double batch, double total_context) const;

  // CriticalBatch: B* for requests of `mean_context` tokens each (ΣL = B·L):
  // the batch where compute time reaches memory time, floored, at least 1.
  // When the memory term grows at least as fast as the compute term with B
  // (long contexts: reading KV costs more than attending over it), the two
  // never meet and the batch is bounded by KV capacity instead, so B* is
  // then kv_capacity_tokens / mean_context. Never above that bound either.
  int64_t CriticalBatch(double mean_context) const;

  // MaxBatchForTpot: the largest B, requests of `mean_context` tokens each,
  // whose step time is ≤ tpot_slo_s; 0 when even B=1 misses it. Also bounded
  // by KV capacity (kv_capacity_tokens / mean_context), since a larger batch
  // cannot run.
  int64_t MaxBatchForTpot(double mean_context, double tpot_slo_s) const;

 private:
  // KvBoundBatch: the most requests of `mean_context` tokens that fit.
  int64_t KvBoundBatch(double mean_context) const;

  StepTimeCoefficients coefficients_;
  int64_t kv_capacity_tokens_ = 0;
};

// StepSeconds / CriticalBatch / MaxBatchForTpot on a profile: shorthands for
// StepTimeModel::FromProfile(profile).<same>.
double StepSeconds(const HardwareProfile& profile, double batch, double total_context);
int64_t CriticalBatch(const HardwareProfile& profile, double mean_context);
int64_t MaxBatchForTpot(const HardwareProfile& profile, double mean_context, double tpot_slo_s);

// StepTimeSample: one observed decode step.
struct StepTimeSample {
  int64_t batch = 0;          // requests in the step, ≥ 1
  int64_t total_context = 0;  // ΣL over those requests, ≥ 0
  double seconds = 0;         // measured step time, > 0
};

// StepTimeFitter: refits a worker's step-time coefficients from its reported
// step times by least squares over a sliding window of recent samples. Each
// sample is assigned to the term (memory or compute) that the current model
// says bounds it; the compute piece t = c + p·B + q·ΣL is fitted (giving c),
// then the memory piece t = c + m + n·ΣL, and the assignment is redone until
// it settles (a two-piece regression). A piece with too few or degenerate
// samples, or a fit with a negative coefficient, keeps the prior's values,
// so the model never gets worse than the profile it started from.
// Not thread-safe: the owner (one worker's state) serializes calls.
class StepTimeFitter {
 public:
  struct Options {
    int32_t window = 512;        // samples kept for the fit
    int32_t refit_interval = 16; // Add() refits after this many new samples
    int32_t max_iterations = 10; // reassignment rounds per fit
    int32_t min_piece_samples = 8;
  };

  explicit StepTimeFitter(const StepTimeModel& prior);
  StepTimeFitter(const StepTimeModel& prior, const Options& options);

  // Add: records a sample; INVALID_ARGUMENT naming the field for batch < 1,
  // total_context < 0 or seconds ≤ 0 (not recorded). Refits every
  // refit_interval accepted samples.
  absl::Status Add(const StepTimeSample& sample);

  // Refit: fits now on the current window.
  void Refit();

  // model: the latest fit (the prior until a fit succeeds).
  const StepTimeModel& model() const { return model_; }
  const StepTimeModel& prior() const { return prior_; }
  int64_t samples_seen() const { return samples_seen_; }

 private:
  StepTimeModel prior_;
  Options options_;
  StepTimeModel model_;
  std::vector<StepTimeSample> window_;  // ring buffer, capacity options_.window
  size_t next_ = 0;
  int64_t samples_seen_ = 0;
  int32_t since_refit_ = 0;
};

}  // namespace dserve::router

#endif  // DSERVE_ROUTER_STEP_TIME_MODEL_H_
