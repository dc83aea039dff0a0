// services/load_generator.cc: schedules, trace replay, the open-loop runner
// and the summary of `dserve bench`.
#include "services/load_generator.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <mutex>
#include <sstream>
#include <thread>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/status_macros.h"
#include "services/runtime.h"

namespace dserve::services {
namespace {

constexpr int32_t kMaxLength = 1 << 30;

absl::string_view AbslView(std::string_view s) { return absl::string_view(s.data(), s.size()); }

int32_t ClampLength(double v) {
  if (!(v >= 1.0)) return 1;  // also NaN
  if (v >= static_cast<double>(kMaxLength)) return kMaxLength;
  return static_cast<int32_t>(std::llround(v));
}

int32_t Cap(int32_t v, int32_t cap) { return cap > 0 ? std::min(v, cap) : v; }

// TraceLength: a trace's token count after length_scale and the cap.
int32_t TraceLength(double raw, double scale, int32_t cap) {
  return Cap(ClampLength(raw * scale), cap);
}

absl::Status ReadFile(const std::string& path, std::string* out) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  *out = ss.str();
  return absl::OkStatus();
}

absl::Status ValidateOptions(const ScheduleOptions& o) {
  if (!(o.time_scale > 0) || !std::isfinite(o.time_scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--time-scale must be a positive number, got ", o.time_scale));
  }
  if (!(o.length_scale > 0) || !std::isfinite(o.length_scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--length-scale must be a positive number, got ", o.length_scale));
  }
  if (o.max_requests < 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--requests must be >= 0, got ", o.max_requests));
  }
  if (o.duration <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--duration must be positive");
  }
  if (o.trace_offset < absl::ZeroDuration()) {
    return absl::InvalidArgumentError("--trace-offset must be >= 0");
  }
  if (o.max_prompt_tokens < 0 || o.max_output_tokens < 0) {
    return absl::InvalidArgumentError("--max-prompt-len and --max-output-len must be >= 0");
  }
  return absl::OkStatus();
}

// TraceClock turns trace times (seconds since the trace's first request)
// into schedule offsets and says when the schedule is full.
class TraceClock {
 public:
  explicit TraceClock(const ScheduleOptions& o) : o_(o) {}
  // Place returns the arrival of a request at `trace_seconds`, or nullopt
  // when it falls before the offset. Sets done() once the limits are hit.
  std::optional<absl::Duration> Place(double trace_seconds, size_t scheduled_so_far) {
    if (o_.max_requests > 0 && static_cast<int64_t>(scheduled_so_far) >= o_.max_requests) {
      done_ = true;
      return std::nullopt;
    }
    const absl::Duration t = absl::Seconds(trace_seconds);
    if (t < o_.trace_offset) return std::nullopt;
    const absl::Duration arrival = (t - o_.trace_offset) / o_.time_scale;
    if (arrival >= o_.duration) {
      done_ = true;
      return std::nullopt;
    }
    return arrival;
  }
  bool done() const { return done_; }

 private:
  const ScheduleOptions& o_;
  bool done_ = false;
};

// DiscreteLengths: a value -> probability table to sample from.
class DiscreteLengths {
 public:
  explicit DiscreteLengths(const std::map<int64_t, double>& table) {
    double total = 0;
    for (const auto& [value, p] : table) {
      if (p > 0 && std::isfinite(p)) {
        total += p;
        values_.push_back(value);
        cdf_.push_back(total);
      }
    }
    for (double& c : cdf_) c /= total;
  }
  bool empty() const { return values_.empty(); }
  double Sample(std::mt19937_64& rng) const {
    const double u = std::uniform_real_distribution<double>(0.0, 1.0)(rng);
    size_t i = std::lower_bound(cdf_.begin(), cdf_.end(), u) - cdf_.begin();
    return static_cast<double>(values_[std::min(i, values_.size() - 1)]);
  }

 private:
  std::vector<int64_t> values_;
  std::vector<double> cdf_;
};

struct DatasetWindow {
  int64_t start;
  DiscreteLengths input;
  DiscreteLengths output;
};

}  // namespace

// ---------------------------------------------------------------------------
// LengthDistribution

absl::StatusOr<LengthDistribution> LengthDistribution::Parse(std::string_view flag,
                                                             std::string_view spec) {
  const std::string usage = absl::StrCat(
      "flag ", AbslView(flag), ": \"", AbslView(spec),
      "\" is not a length distribution (N, uniform:A,B, normal:MEAN,STD or lognormal:MU,SIGMA)");
  const absl::string_view s = absl::StripAsciiWhitespace(AbslView(spec));
  const size_t colon = s.find(':');
  if (colon == absl::string_view::npos) {
    int64_t n;
    if (!absl::SimpleAtoi(s, &n)) return absl::InvalidArgumentError(usage);
    if (n < 1 || n > kMaxLength) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag ", AbslView(flag), ": length must be in [1, 2^30], got ", n));
    }
    return Fixed(static_cast<int32_t>(n));
  }
  const absl::string_view name = s.substr(0, colon);
  std::vector<absl::string_view> parts = absl::StrSplit(s.substr(colon + 1), ',');
  double a, b;
  if (parts.size() != 2 || !absl::SimpleAtod(absl::StripAsciiWhitespace(parts[0]), &a) ||
      !absl::SimpleAtod(absl::StripAsciiWhitespace(parts[1]), &b) || !std::isfinite(a) ||
      !std::isfinite(b)) {
    return absl::InvalidArgumentError(usage);
  }
  const std::string prefix = absl::StrCat("flag ", AbslView(flag), ": ", name, ":");
  if (name == "uniform") {
    if (a != std::floor(a) || b != std::floor(b) || a < 1 || b < a || b > kMaxLength) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "A,B needs integers with 1 <= A <= B <= 2^30, got ", a, ",", b));
    }
    return LengthDistribution(Kind::kUniform, a, b);
  }
  if (name == "normal") {
    if (b < 0) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "MEAN,STD needs STD >= 0, got ", b));
    }
    return LengthDistribution(Kind::kNormal, a, b);
  }
  if (name == "lognormal") {
    if (b < 0) {
      return absl::InvalidArgumentError(absl::StrCat(prefix, "MU,SIGMA needs SIGMA >= 0, got ", b));
    }
    if (a > std::log(static_cast<double>(kMaxLength))) {
      return absl::InvalidArgumentError(
          absl::StrCat(prefix, "MU,SIGMA needs MU <= ln(2^30) = 20.79, got ", a));
    }
    return LengthDistribution(Kind::kLogNormal, a, b);
  }
  return absl::InvalidArgumentError(usage);
}

LengthDistribution LengthDistribution::Fixed(int32_t n) {
  return LengthDistribution(Kind::kFixed, n, 0);
}

int32_t LengthDistribution::Sample(std::mt19937_64& rng) const {
  switch (kind_) {
    case Kind::kFixed:
      return static_cast<int32_t>(a_);
    case Kind::kUniform:
      return static_cast<int32_t>(std::uniform_int_distribution<int64_t>(
          static_cast<int64_t>(a_), static_cast<int64_t>(b_))(rng));
    case Kind::kNormal:
      return ClampLength(std::normal_distribution<double>(a_, b_)(rng));
    case Kind::kLogNormal:
      return ClampLength(std::lognormal_distribution<double>(a_, b_)(rng));
  }
  return 1;
}

std::string LengthDistribution::ToString() const {
  switch (kind_) {
    case Kind::kFixed:
      return absl::StrCat(static_cast<int64_t>(a_));
    case Kind::kUniform:
      return absl::StrCat("uniform:", a_, ",", b_);
    case Kind::kNormal:
      return absl::StrCat("normal:", a_, ",", b_);
    case Kind::kLogNormal:
      return absl::StrCat("lognormal:", a_, ",", b_);
  }
  return "";
}

// ---------------------------------------------------------------------------
// Schedules

absl::StatusOr<std::vector<RequestSpec>> PoissonSchedule(double rate,
                                                         const LengthDistribution& prompt,
                                                         const LengthDistribution& output,
                                                         const ScheduleOptions& options) {
  DSERVE_RETURN_IF_ERROR(ValidateOptions(options));
  if (!(rate > 0) || !std::isfinite(rate)) {
    return absl::InvalidArgumentError(
        absl::StrCat("--rate must be a positive number of requests per second, got ", rate));
  }
  if (options.max_requests == 0 && options.duration == absl::InfiniteDuration()) {
    return absl::InvalidArgumentError("a Poisson schedule needs --requests or --duration");
  }
  std::mt19937_64 rng(options.seed);
  std::exponential_distribution<double> gap(rate);
  std::vector<RequestSpec> specs;
  double t = 0;
  while (options.max_requests == 0 || static_cast<int64_t>(specs.size()) < options.max_requests) {
    const absl::Duration arrival = absl::Seconds(t);
    if (arrival >= options.duration) break;
    RequestSpec spec;
    spec.arrival = arrival;
    spec.prompt_tokens = Cap(prompt.Sample(rng), options.max_prompt_tokens);
    spec.output_tokens = Cap(output.Sample(rng), options.max_output_tokens);
    specs.push_back(spec);
    t += gap(rng);
  }
  return specs;
}

absl::StatusOr<TraceFormat> ParseTraceFormat(std::string_view name) {
  if (name == "azure") return TraceFormat::kAzure;
  if (name == "servegen") return TraceFormat::kServegen;
  return absl::InvalidArgumentError(
      absl::StrCat("flag --trace-format: \"", AbslView(name), "\" is not one of azure, servegen"));
}

absl::StatusOr<TraceFormat> DetectTraceFormat(const std::string& path) {
  const absl::string_view p(path);
  if (absl::EndsWith(p, "-trace.csv") || absl::EndsWith(p, "-dataset.json")) {
    return TraceFormat::kServegen;
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::string first;
  std::getline(in, first);
  if (absl::StartsWith(first, "TIMESTAMP")) return TraceFormat::kAzure;
  return absl::InvalidArgumentError(absl::StrCat(
      "cannot tell the format of ", path,
      " (neither an Azure CSV nor a ServeGen chunk-N-trace.csv): pass --trace-format"));
}

absl::StatusOr<std::vector<RequestSpec>> LoadTrace(const std::string& path, TraceFormat format,
                                                   const ScheduleOptions& options) {
  if (format == TraceFormat::kAzure) {
    std::string csv;
    DSERVE_RETURN_IF_ERROR(ReadFile(path, &csv));
    return ParseAzureTrace(csv, path, options);
  }
  std::string stem = path;
  for (const char* suffix : {"-trace.csv", "-dataset.json"}) {
    if (absl::EndsWith(stem, suffix)) {
      stem.resize(stem.size() - std::string_view(suffix).size());
      break;
    }
  }
  const std::string trace_path = stem + "-trace.csv";
  const std::string dataset_path = stem + "-dataset.json";
  std::string csv, dataset;
  DSERVE_RETURN_IF_ERROR(ReadFile(trace_path, &csv));
  DSERVE_RETURN_IF_ERROR(ReadFile(dataset_path, &dataset));
  return ParseServegenTrace(csv, dataset, stem, options);
}

absl::StatusOr<std::vector<RequestSpec>> ParseAzureTrace(std::string_view csv,
                                                         std::string_view origin,
                                                         const ScheduleOptions& options) {
  DSERVE_RETURN_IF_ERROR(ValidateOptions(options));
  struct Row {
    absl::Time time;
    double context, generated;
  };
  std::vector<Row> rows;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(AbslView(csv), '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    if (line_no == 1) {
      if (!absl::StartsWith(line, "TIMESTAMP")) {
        return absl::InvalidArgumentError(absl::StrCat(
            AbslView(origin), ":1: expected the header TIMESTAMP,ContextTokens,GeneratedTokens"));
      }
      continue;
    }
    std::vector<absl::string_view> f = absl::StrSplit(line, ',');
    Row row;
    std::string error;
    if (f.size() != 3 ||
        !absl::ParseTime("%Y-%m-%d %H:%M:%E*S", std::string(f[0]), absl::UTCTimeZone(), &row.time,
                         &error) ||
        !absl::SimpleAtod(f[1], &row.context) || !absl::SimpleAtod(f[2], &row.generated)) {
      return absl::InvalidArgumentError(
          absl::StrCat(AbslView(origin), ":", line_no, ": expected \"YYYY-MM-DD HH:MM:SS.fff,",
                       "ContextTokens,GeneratedTokens\", got \"", line, "\""));
    }
    rows.push_back(row);
  }
  std::stable_sort(rows.begin(), rows.end(),
                   [](const Row& a, const Row& b) { return a.time < b.time; });
  std::vector<RequestSpec> specs;
  if (rows.empty()) return specs;
  TraceClock clock(options);
  const absl::Time first = rows.front().time;
  for (const Row& row : rows) {
    std::optional<absl::Duration> arrival =
        clock.Place(absl::ToDoubleSeconds(row.time - first), specs.size());
    if (clock.done()) break;
    if (!arrival) continue;
    RequestSpec spec;
    spec.arrival = *arrival;
    spec.prompt_tokens = TraceLength(row.context, options.length_scale, options.max_prompt_tokens);
    spec.output_tokens =
        TraceLength(row.generated, options.length_scale, options.max_output_tokens);
    specs.push_back(spec);
  }
  return specs;
}

absl::StatusOr<std::map<int64_t, double>> ParseServegenDistribution(std::string_view text) {
  absl::string_view s = absl::StripAsciiWhitespace(AbslView(text));
  if (!absl::ConsumePrefix(&s, "{") || !absl::ConsumeSuffix(&s, "}")) {
    return absl::InvalidArgumentError("expected a {value: probability, ...} dict");
  }
  std::map<int64_t, double> out;
  if (absl::StripAsciiWhitespace(s).empty()) return out;
  for (absl::string_view item : absl::StrSplit(s, ',')) {
    std::vector<absl::string_view> kv = absl::StrSplit(item, ':');
    double key, p;
    if (kv.size() != 2 || !absl::SimpleAtod(absl::StripAsciiWhitespace(kv[0]), &key) ||
        !absl::SimpleAtod(absl::StripAsciiWhitespace(kv[1]), &p)) {
      return absl::InvalidArgumentError(
          absl::StrCat("expected \"value: probability\", got \"", item, "\""));
    }
    out[std::llround(key)] += p;
  }
  return out;
}

absl::StatusOr<std::vector<RequestSpec>> ParseServegenTrace(std::string_view trace_csv,
                                                            std::string_view dataset_json,
                                                            std::string_view origin,
                                                            const ScheduleOptions& options) {
  DSERVE_RETURN_IF_ERROR(ValidateOptions(options));
  const std::string dataset_name = absl::StrCat(AbslView(origin), "-dataset.json");
  const std::string trace_name = absl::StrCat(AbslView(origin), "-trace.csv");

  // Length distributions per dataset window.
  const nlohmann::json dataset =
      nlohmann::json::parse(dataset_json, nullptr, /*allow_exceptions=*/false);
  if (!dataset.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(dataset_name, ": expected a JSON object keyed by window start"));
  }
  std::vector<DatasetWindow> windows;
  for (const auto& [key, value] : dataset.items()) {
    int64_t start;
    if (!absl::SimpleAtoi(key, &start) || !value.is_object() || !value.contains("input_tokens") ||
        !value.contains("output_tokens") || !value["input_tokens"].is_string() ||
        !value["output_tokens"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(
          dataset_name, ": window \"", key, "\" needs string input_tokens and output_tokens"));
    }
    auto input = ParseServegenDistribution(value["input_tokens"].get<std::string>());
    auto output = ParseServegenDistribution(value["output_tokens"].get<std::string>());
    if (!input.ok() || !output.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat(dataset_name, ": window \"", key,
                       "\": ", (input.ok() ? output.status() : input.status()).message()));
    }
    DatasetWindow w{start, DiscreteLengths(*input), DiscreteLengths(*output)};
    if (!w.input.empty() && !w.output.empty()) windows.push_back(std::move(w));
  }
  if (windows.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat(dataset_name, ": no window has input and output length distributions"));
  }
  std::sort(windows.begin(), windows.end(),
            [](const DatasetWindow& a, const DatasetWindow& b) { return a.start < b.start; });
  // WindowAt: the last non-empty window starting at or before t, else the first.
  auto window_at = [&](double t) -> const DatasetWindow& {
    const DatasetWindow* best = &windows.front();
    for (const DatasetWindow& w : windows) {
      if (static_cast<double>(w.start) <= t) best = &w;
    }
    return *best;
  };

  // Arrival windows.
  struct Window {
    double start, rate;
    std::string family;
    double shape;
  };
  std::vector<Window> rows;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(AbslView(trace_csv), '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    std::vector<absl::string_view> f = absl::StrSplit(line, ',');
    Window w;
    double cv, p2;
    if (f.size() != 6 || !absl::SimpleAtod(f[0], &w.start) || !absl::SimpleAtod(f[1], &w.rate) ||
        !absl::SimpleAtod(f[2], &cv) || !absl::SimpleAtod(f[4], &w.shape) ||
        !absl::SimpleAtod(f[5], &p2) || w.rate < 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(trace_name, ":", line_no,
                       ": expected \"start,rate,cv,family,param1,param2\", got \"", line, "\""));
    }
    w.family = std::string(f[3]);
    rows.push_back(w);
  }
  std::sort(rows.begin(), rows.end(),
            [](const Window& a, const Window& b) { return a.start < b.start; });

  std::mt19937_64 rng(options.seed);
  TraceClock clock(options);
  std::vector<RequestSpec> specs;
  std::optional<double> first;  // trace time zero: the first arrival
  for (size_t i = 0; i < rows.size() && !clock.done(); ++i) {
    const Window& w = rows[i];
    if (!(w.rate > 0)) continue;
    const double length = i + 1 < rows.size() ? rows[i + 1].start - w.start
                                              : (i > 0 ? w.start - rows[i - 1].start : 600.0);
    const double mean_gap = 1.0 / w.rate;
    const bool shaped = w.shape > 0 && std::isfinite(w.shape);
    std::function<double()> gap;
    if (w.family == "Gamma" && shaped) {
      gap = [&rng, d = std::gamma_distribution<double>(w.shape, mean_gap / w.shape)]() mutable {
        return d(rng);
      };
    } else if (w.family == "Weibull" && shaped) {
      const double scale = mean_gap / std::tgamma(1.0 + 1.0 / w.shape);
      gap = [&rng, d = std::weibull_distribution<double>(w.shape, scale)]() mutable {
        return d(rng);
      };
    } else {
      gap = [&rng, d = std::exponential_distribution<double>(w.rate)]() mutable { return d(rng); };
    }
    for (double t = w.start + gap(); t < w.start + length; t += gap()) {
      if (!first) first = t;
      std::optional<absl::Duration> arrival = clock.Place(t - *first, specs.size());
      if (clock.done()) break;
      if (!arrival) continue;
      const DatasetWindow& lengths = window_at(t);
      RequestSpec spec;
      spec.arrival = *arrival;
      spec.prompt_tokens =
          TraceLength(lengths.input.Sample(rng), options.length_scale, options.max_prompt_tokens);
      spec.output_tokens =
          TraceLength(lengths.output.Sample(rng), options.length_scale, options.max_output_tokens);
      specs.push_back(spec);
    }
  }
  return specs;
}

int64_t FitToContext(int32_t max_context_tokens, std::vector<RequestSpec>& specs) {
  if (max_context_tokens <= 1) return 0;
  int64_t changed = 0;
  for (RequestSpec& s : specs) {
    const RequestSpec before = s;
    s.prompt_tokens = std::min(s.prompt_tokens, max_context_tokens - 1);
    s.output_tokens = std::max(1, std::min(s.output_tokens, max_context_tokens - s.prompt_tokens));
    if (s.prompt_tokens != before.prompt_tokens || s.output_tokens != before.output_tokens) {
      ++changed;
    }
  }
  return changed;
}

std::vector<int32_t> PromptTokenIds(int32_t length, int32_t vocab_size, uint64_t seed,
                                    int64_t index) {
  const int32_t lo = std::min(100, vocab_size / 4);
  const int32_t hi = std::max(lo, vocab_size - 1);
  // A different stream per request, independent of the order requests are sent.
  std::seed_seq seq{static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32),
                    static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32)};
  std::mt19937_64 rng(seq);
  std::uniform_int_distribution<int32_t> id(lo, hi);
  std::vector<int32_t> ids(std::max(0, length));
  for (int32_t& x : ids) x = id(rng);
  return ids;
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::clamp(p, 0.0, 100.0) / 100.0 * static_cast<double>(values.size() - 1);
  const size_t lo = static_cast<size_t>(std::floor(rank));
  const size_t hi = std::min(lo + 1, values.size() - 1);
  const double frac = rank - static_cast<double>(lo);
  return values[lo] + (values[hi] - values[lo]) * frac;
}

// ---------------------------------------------------------------------------
// Runner

std::vector<RequestRecord> RunLoad(InferenceClient& client, const std::vector<RequestSpec>& specs,
                                   const LoadOptions& options) {
  std::vector<RequestRecord> records(specs.size());
  if (specs.empty()) return records;
  std::mutex mu;
  size_t next = 0;  // the next spec to claim, guarded by mu
  const absl::Time start = absl::Now();
  auto sender = [&]() {
    for (;;) {
      size_t i;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (next >= specs.size()) return;
        i = next++;
      }
      const RequestSpec& spec = specs[i];
      const absl::Time scheduled = start + spec.arrival;
      // The schedule itself, not synchronization: wait for the arrival time.
      if (absl::Now() < scheduled) absl::SleepFor(scheduled - absl::Now());
      RequestRecord& r = records[i];
      r.index = static_cast<int64_t>(i);
      r.scheduled = spec.arrival;
      r.prompt_tokens = spec.prompt_tokens;
      r.requested_output_tokens = spec.output_tokens;

      v1::GenerateRequest request;
      request.set_request_id(absl::StrCat("bench-", options.seed, "-", i));
      std::vector<int32_t> ids =
          PromptTokenIds(spec.prompt_tokens, options.vocab_size, options.seed, r.index);
      request.mutable_token_ids()->mutable_ids()->Assign(ids.begin(), ids.end());
      request.set_max_tokens(spec.output_tokens);
      request.set_ignore_eos(true);
      request.mutable_sampling()->set_seed(options.seed + i);
      if (options.send_output_length_hint) request.set_output_length_hint(spec.output_tokens);

      GenerateResult result;
      const absl::Status status = client.Generate(request, options.request_timeout, &result);
      r.lateness = std::max(absl::ZeroDuration(), result.timing.start - scheduled);
      r.code = status.code();
      r.error_message = std::string(status.message());
      r.output_tokens = static_cast<int32_t>(result.token_ids.size());
      r.ttft = result.timing.TimeToFirstToken();
      r.tpot = result.timing.TimePerOutputToken();
      r.e2e = result.timing.EndToEnd();
      r.finished = result.timing.end - start;
      r.prefill_queue = services::ToDuration(result.server_timings.prefill_queue());
      r.prefill_compute = services::ToDuration(result.server_timings.prefill_compute());
      r.kv_transfer = services::ToDuration(result.server_timings.kv_transfer());
    }
  };
  const size_t n_threads =
      std::min(specs.size(), static_cast<size_t>(std::max(1, options.max_concurrency)));
  std::vector<std::thread> threads;
  threads.reserve(n_threads);
  for (size_t t = 0; t < n_threads; ++t) threads.emplace_back(sender);
  for (std::thread& t : threads) t.join();
  return records;
}

// ---------------------------------------------------------------------------
// Summary

namespace {

LatencySummary Summarize(const std::vector<double>& ms) {
  LatencySummary s;
  s.count = static_cast<int64_t>(ms.size());
  if (ms.empty()) return s;
  double total = 0;
  for (double v : ms) total += v;
  s.mean = total / static_cast<double>(ms.size());
  s.p50 = Percentile(ms, 50);
  s.p90 = Percentile(ms, 90);
  s.p99 = Percentile(ms, 99);
  s.max = *std::max_element(ms.begin(), ms.end());
  return s;
}

nlohmann::json LatencyJson(const LatencySummary& s) {
  return {{"count", s.count}, {"mean", s.mean}, {"p50", s.p50},
          {"p90", s.p90},     {"p99", s.p99},   {"max", s.max}};
}

double Ms(absl::Duration d) { return absl::ToDoubleMilliseconds(d); }

}  // namespace

BenchSummary Summarize(const std::vector<RequestRecord>& records) {
  BenchSummary s;
  s.requests = static_cast<int64_t>(records.size());
  std::vector<double> ttft, tpot, e2e, late, prefill_queue, prefill_compute, kv_transfer;
  absl::Duration last_end = absl::ZeroDuration();
  for (const RequestRecord& r : records) {
    last_end = std::max(last_end, r.finished);
    late.push_back(Ms(r.lateness));
    if (r.lateness > absl::Milliseconds(10)) ++s.late_requests;
    s.output_tokens += r.output_tokens;
    if (r.code != absl::StatusCode::kOk) {
      ++s.failed;
      const std::string name = absl::StatusCodeToString(r.code);
      if (s.errors[name]++ == 0) s.first_error[name] = r.error_message;
      continue;
    }
    ++s.succeeded;
    s.prompt_tokens += r.prompt_tokens;
    if (r.output_tokens < r.requested_output_tokens) ++s.short_outputs;
    if (r.ttft) ttft.push_back(Ms(*r.ttft));
    if (r.tpot) tpot.push_back(Ms(*r.tpot));
    e2e.push_back(Ms(r.e2e));
    if (r.prefill_compute > absl::ZeroDuration()) {
      prefill_queue.push_back(Ms(r.prefill_queue));
      prefill_compute.push_back(Ms(r.prefill_compute));
      kv_transfer.push_back(Ms(r.kv_transfer));
    }
  }
  s.wall_seconds = absl::ToDoubleSeconds(last_end);
  if (s.wall_seconds > 0) {
    s.request_throughput = static_cast<double>(s.succeeded) / s.wall_seconds;
    s.output_token_throughput = static_cast<double>(s.output_tokens) / s.wall_seconds;
  }
  s.ttft_ms = Summarize(ttft);
  s.tpot_ms = Summarize(tpot);
  s.e2e_ms = Summarize(e2e);
  s.lateness_ms = Summarize(late);
  s.prefill_queue_ms = Summarize(prefill_queue);
  s.prefill_compute_ms = Summarize(prefill_compute);
  s.kv_transfer_ms = Summarize(kv_transfer);
  if (s.kv_transfer_ms.count > 0 && s.ttft_ms.mean > 0) {
    s.kv_transfer_share_of_ttft = s.kv_transfer_ms.mean / s.ttft_ms.mean;
  }
  return s;
}

std::string FormatSummaryTable(const BenchSummary& s) {
  std::string out = absl::StrFormat(
      "requests     %d sent, %d ok, %d failed in %.2f s\n"
      "throughput   %.3f req/s, %.1f output tok/s (%d prompt tokens, %d output tokens)\n",
      s.requests, s.succeeded, s.failed, s.wall_seconds, s.request_throughput,
      s.output_token_throughput, s.prompt_tokens, s.output_tokens);
  absl::StrAppendFormat(&out, "%-12s %8s %10s %10s %10s %10s %10s\n", "metric (ms)", "count",
                        "mean", "p50", "p90", "p99", "max");
  auto row = [&out](const char* name, const LatencySummary& l) {
    absl::StrAppendFormat(&out, "%-12s %8d %10.2f %10.2f %10.2f %10.2f %10.2f\n", name, l.count,
                          l.mean, l.p50, l.p90, l.p99, l.max);
  };
  row("ttft", s.ttft_ms);
  row("tpot", s.tpot_ms);
  row("e2e", s.e2e_ms);
  row("lateness", s.lateness_ms);
  if (s.kv_transfer_ms.count > 0) {
    row("prefill_q", s.prefill_queue_ms);
    row("prefill", s.prefill_compute_ms);
    row("kv_transfer", s.kv_transfer_ms);
    absl::StrAppendFormat(&out, "kv transfer  %.1f%% of mean TTFT (its tail after the last layer)\n",
                          100 * s.kv_transfer_share_of_ttft);
  }
  if (s.late_requests > 0) {
    absl::StrAppendFormat(&out,
                          "late         %d requests sent more than 10 ms after their schedule "
                          "(raise --max-concurrency)\n",
                          s.late_requests);
  }
  if (s.short_outputs > 0) {
    absl::StrAppendFormat(&out, "short        %d requests returned fewer tokens than asked\n",
                          s.short_outputs);
  }
  for (const auto& [code, count] : s.errors) {
    absl::StrAppendFormat(&out, "error        %s x%d (e.g. \"%s\")\n", code, count,
                          s.first_error.at(code));
  }
  return out;
}

nlohmann::json SummaryToJson(const BenchSummary& s) {
  nlohmann::json errors = nlohmann::json::object();
  for (const auto& [code, count] : s.errors) {
    errors[code] = {{"count", count}, {"example", s.first_error.at(code)}};
  }
  return {{"requests", s.requests},
          {"succeeded", s.succeeded},
          {"failed", s.failed},
          {"errors", errors},
          {"wall_seconds", s.wall_seconds},
          {"request_throughput", s.request_throughput},
          {"output_token_throughput", s.output_token_throughput},
          {"prompt_tokens", s.prompt_tokens},
          {"output_tokens", s.output_tokens},
          {"short_outputs", s.short_outputs},
          {"late_requests", s.late_requests},
          {"ttft_ms", LatencyJson(s.ttft_ms)},
          {"tpot_ms", LatencyJson(s.tpot_ms)},
          {"e2e_ms", LatencyJson(s.e2e_ms)},
          {"lateness_ms", LatencyJson(s.lateness_ms)},
          {"prefill_queue_ms", LatencyJson(s.prefill_queue_ms)},
          {"prefill_compute_ms", LatencyJson(s.prefill_compute_ms)},
          {"kv_transfer_ms", LatencyJson(s.kv_transfer_ms)},
          {"kv_transfer_share_of_ttft", s.kv_transfer_share_of_ttft}};
}

}  // namespace dserve::services
