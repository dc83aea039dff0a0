// services/load_generator.h: the open-loop load generator behind
// `dserve bench`: request schedules (Poisson arrivals with length
// distributions, or replayed public traces), the runner that issues them
// against a router at their scheduled times from a bounded pool of threads,
// and the latency/throughput summary it reports.
//
// Times in a schedule are offsets from the run's start. Open loop: a request
// is sent at its scheduled time whether or not earlier ones have finished;
// when every one of the `max_concurrency` senders is busy the request goes
// out late, and the lateness is recorded rather than hidden.
#ifndef DSERVE_SERVICES_LOAD_GENERATOR_H_
#define DSERVE_SERVICES_LOAD_GENERATOR_H_

#include <cstdint>
#include <map>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "nlohmann/json.hpp"
#include "services/inference_client.h"

namespace dserve::services {

// LengthDistribution: a distribution of token counts, parsed from a flag:
//   N                 fixed
//   uniform:A,B       integers in [A, B], each equally likely
//   normal:MEAN,STD   rounded, clipped to >= 1
//   lognormal:MU,SIGMA  exp(N(MU, SIGMA)) rounded, clipped to >= 1
// Samples are always in [1, 2^30].
class LengthDistribution {
 public:
  enum class Kind { kFixed, kUniform, kNormal, kLogNormal };

  // Parse reads `spec`; INVALID_ARGUMENT naming `flag` (e.g. "--prompt-len")
  // and the accepted forms when it is malformed or out of range.
  static absl::StatusOr<LengthDistribution> Parse(std::string_view flag, std::string_view spec);
  static LengthDistribution Fixed(int32_t n);

  // Sample draws one length using `rng`.
  int32_t Sample(std::mt19937_64& rng) const;
  Kind kind() const { return kind_; }
  double a() const { return a_; }
  double b() const { return b_; }
  // ToString: the spec in the flag's syntax.
  std::string ToString() const;

 private:
  LengthDistribution(Kind kind, double a, double b) : kind_(kind), a_(a), b_(b) {}
  Kind kind_;
  double a_;
  double b_;
};

// RequestSpec: one request of a schedule.
struct RequestSpec {
  absl::Duration arrival;  // offset from the run's start
  int32_t prompt_tokens = 1;
  int32_t output_tokens = 1;
};

// ScheduleOptions: limits and transformations applied to every schedule.
struct ScheduleOptions {
  int64_t max_requests = 0;  // 0: no limit
  // Arrivals at or after `duration` (after time scaling) are dropped.
  absl::Duration duration = absl::InfiniteDuration();
  // Trace time runs this many times faster on the wall clock (10 = a 10 min
  // trace replays in 1 min). Traces only.
  double time_scale = 1.0;
  // Trace time skipped at the start, before scaling. Traces only.
  absl::Duration trace_offset = absl::ZeroDuration();
  // Trace lengths are multiplied by this, rounded, then capped below; always
  // at least 1. Traces only.
  double length_scale = 1.0;
  int32_t max_prompt_tokens = 0;  // 0: no cap
  int32_t max_output_tokens = 0;  // 0: no cap
  uint64_t seed = 0;
};

// PoissonSchedule: arrivals of a Poisson process at `rate` requests per
// second (the first at 0, then exponential gaps of mean 1/rate), lengths
// drawn from the two distributions (then capped), until max_requests or
// duration. INVALID_ARGUMENT when rate is not positive or neither limit is
// set (the schedule would be infinite).
absl::StatusOr<std::vector<RequestSpec>> PoissonSchedule(double rate,
                                                         const LengthDistribution& prompt,
                                                         const LengthDistribution& output,
                                                         const ScheduleOptions& options);

// TraceFormat: the public traces `dserve bench --trace` replays.
//   kAzure: Azure LLM inference trace 2023, CSV with header
//     TIMESTAMP,ContextTokens,GeneratedTokens; one row per request.
//   kServegen: one ServeGen client chunk: chunk-N-trace.csv (per 600 s
//     window: start, rate, CV, fitted inter-arrival family and its two
//     parameters) and, beside it, chunk-N-dataset.json (per 6 h window:
//     distributions of input and output tokens).
enum class TraceFormat { kAzure, kServegen };

// ParseTraceFormat: "azure" or "servegen"; INVALID_ARGUMENT naming
// --trace-format otherwise.
absl::StatusOr<TraceFormat> ParseTraceFormat(std::string_view name);
// DetectTraceFormat: servegen for a path ending in -trace.csv or
// -dataset.json, azure for a CSV whose first line starts with TIMESTAMP;
// INVALID_ARGUMENT (asking for --trace-format) otherwise.
absl::StatusOr<TraceFormat> DetectTraceFormat(const std::string& path);

// LoadTrace reads the trace at `path` (for servegen: the chunk's trace.csv or
// dataset.json; the other file is found beside it) and builds its schedule.
// Trace time zero is the trace's first request: leading idle time is not
// replayed. NOT_FOUND when a file cannot be read; INVALID_ARGUMENT naming the
// file and line for malformed content.
absl::StatusOr<std::vector<RequestSpec>> LoadTrace(const std::string& path, TraceFormat format,
                                                   const ScheduleOptions& options);

// ParseAzureTrace: the Azure CSV's text, `origin` naming it in errors.
absl::StatusOr<std::vector<RequestSpec>> ParseAzureTrace(std::string_view csv,
                                                         std::string_view origin,
                                                         const ScheduleOptions& options);

// ParseServegenTrace: a ServeGen chunk from its two files' text. Arrivals in
// each window with a positive rate follow the window's fitted family (Gamma
// or Weibull with the fitted shape, otherwise exponential) scaled to the
// window's mean rate, restarted at each window's start; each request's
// lengths are drawn from the dataset window (every 6 h) that holds its
// arrival, or the nearest non-empty one. Deterministic in options.seed.
absl::StatusOr<std::vector<RequestSpec>> ParseServegenTrace(std::string_view trace_csv,
                                                            std::string_view dataset_json,
                                                            std::string_view origin,
                                                            const ScheduleOptions& options);

// ParseServegenDistribution reads one of the dataset's string-encoded Python
// dicts, "{45: 0.0096, 46: 0.0117, ...}", into value -> probability.
absl::StatusOr<std::map<int64_t, double>> ParseServegenDistribution(std::string_view text);

// FitToContext caps each request so prompt + output <= max_context_tokens
// (prompt first kept below the context, then output shortened; both >= 1).
// Returns how many requests it changed. No-op when max_context_tokens <= 1.
int64_t FitToContext(int32_t max_context_tokens, std::vector<RequestSpec>& specs);

// PromptTokenIds: the token ids of request `index`'s prompt: `length` ids in
// [lo, vocab_size) with lo = min(100, vocab_size / 4), a pure function of
// (seed, index) so runs repeat exactly.
std::vector<int32_t> PromptTokenIds(int32_t length, int32_t vocab_size, uint64_t seed,
                                    int64_t index);

// Percentile: the p-th percentile (p in [0, 100]) of `values` by linear
// interpolation between closest ranks (numpy's default); 0 when empty.
double Percentile(std::vector<double> values, double p);

// LoadOptions: how RunLoad sends a schedule.
struct LoadOptions {
  int32_t max_concurrency = 128;  // sender threads, i.e. requests in flight
  absl::Duration request_timeout = absl::Minutes(10);
  int32_t vocab_size = 0;  // from GetModelInfo; prompts draw ids below it
  uint64_t seed = 0;       // prompt ids and each request's sampling seed
  // Send each request's exact output length as output_length_hint (an
  // oracle predictor for the router's placement).
  bool send_output_length_hint = false;
};

// RequestRecord: what happened to one request. Offsets are from the run's
// start; latencies are measured from when the request was actually sent.
struct RequestRecord {
  int64_t index = 0;
  absl::Duration scheduled;
  absl::Duration lateness;  // sent - scheduled, >= 0
  absl::StatusCode code = absl::StatusCode::kUnknown;
  std::string error_message;
  int32_t prompt_tokens = 0;
  int32_t requested_output_tokens = 0;
  int32_t output_tokens = 0;  // token ids received
  std::optional<absl::Duration> ttft;
  std::optional<absl::Duration> tpot;
  absl::Duration e2e;
  absl::Duration finished;  // offset of the stream's end
  // The servers' view of the time to first token (Complete.timings).
  absl::Duration prefill_queue, prefill_compute, kv_transfer;
};

// RunLoad sends every spec at run start + spec.arrival from
// min(max_concurrency, specs.size()) threads, each request with token-id
// prompts (PromptTokenIds), ignore_eos and max_tokens = output_tokens so the
// output length is exact, and returns one record per spec in spec order.
// Blocks until every request has finished. `client` must be thread-safe.
std::vector<RequestRecord> RunLoad(InferenceClient& client, const std::vector<RequestSpec>& specs,
                                   const LoadOptions& options);

// LatencySummary: one latency metric over the requests that have it, in ms.
struct LatencySummary {
  int64_t count = 0;
  double mean = 0, p50 = 0, p90 = 0, p99 = 0, max = 0;
};

// BenchSummary: the whole run.
struct BenchSummary {
  int64_t requests = 0;
  int64_t succeeded = 0;
  int64_t failed = 0;
  std::map<std::string, int64_t> errors;           // status code name -> count
  std::map<std::string, std::string> first_error;  // status code name -> a message
  int64_t prompt_tokens = 0;                       // of succeeded requests
  int64_t output_tokens = 0;                       // received, all requests
  int64_t short_outputs = 0;                       // succeeded with fewer tokens than requested
  double wall_seconds = 0;                         // run start to the last stream's end
  double request_throughput = 0;                   // succeeded / wall
  double output_token_throughput = 0;              // output tokens / wall
  LatencySummary ttft_ms, tpot_ms, e2e_ms, lateness_ms;
  // Server-side parts of TTFT (disaggregated requests): the prefill
  // worker's queue and compute, and the KV transfer's tail after the last
  // layer; kv_transfer_share_of_ttft = mean kv_transfer / mean TTFT.
  LatencySummary prefill_queue_ms, prefill_compute_ms, kv_transfer_ms;
  double kv_transfer_share_of_ttft = 0;
  int64_t late_requests = 0;  // sent more than 10 ms after their schedule
};

// Summarize aggregates records. TTFT, TPOT and end-to-end latency count
// succeeded requests only; lateness counts all.
BenchSummary Summarize(const std::vector<RequestRecord>& records);
// FormatSummaryTable: the human-readable report, several lines.
std::string FormatSummaryTable(const BenchSummary& summary);
// SummaryToJson: the same as one JSON object.
nlohmann::json SummaryToJson(const BenchSummary& summary);

}  // namespace dserve::services

#endif  // DSERVE_SERVICES_LOAD_GENERATOR_H_
