// services/dserve_main.cc: the `dserve` command line.
//
//   dserve model init --preset tiny|small --seed N --out DIR [--dtype bf16|f16|f32|fp8]
//                     [--shards N]
//   dserve generate --model DIR --prompt TEXT [--max-tokens N] [--seed S]
//                   [--temperature T] [--top-k K] [--top-p P] [--min-p P]
//                   [--repetition-penalty R] [--presence-penalty P]
//                   [--frequency-penalty F] [--stop-token-id ID]... [--ignore-eos]
//                   [--backend cpu|openblas|reference] [--json]
//   dserve generate --endpoint HOST:PORT --prompt TEXT [same sampling flags]
//                   [--stop STR]... [--keep-special-tokens] [--json] [--timeout SECONDS]
//   dserve up [--config mesh.yaml] [--model DIR] [--transport tcp|shm]
//             [--prefill-workers N] [--decode-workers M] [--aggregated-workers K]
//             [--ready-file PATH] [--bin-dir DIR]
//   dserve bench --endpoint HOST:PORT (--trace FILE [--trace-format azure|servegen] |
//                --rate R --prompt-len DIST --output-len DIST) [--requests N] ...
//   dserve tokenize --tokenizer DIR [--add-special-tokens]      (text on stdin)
//   dserve detokenize --tokenizer DIR [--skip-special-tokens]   (JSON ids on stdin)
//
// The client subcommands (generate --endpoint, up, bench) report failures as
// "error: CODE: message" on stderr and exit 2 for INVALID_ARGUMENT, else 1.
#include <chrono>
#include <cstdio>
#include <iostream>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "engine/engine.h"
#include "engine/model_init.h"
#include "nlohmann/json.hpp"
#include "services/cli_args.h"
#include "services/inference_client.h"
#include "services/load_generator.h"
#include "services/mesh_launcher.h"
#include "tokenizer/tokenizer.h"

namespace dserve {
namespace {

constexpr char kUsage[] =
    "usage:\n"
    "  dserve model init --preset tiny|small --seed N --out DIR [--dtype bf16|f16|f32|fp8]"
    " [--shards N]\n"
    "  dserve generate --model DIR --prompt TEXT [--max-tokens N] [--seed S]"
    " [--temperature T]\n"
    "                  [--top-k K] [--top-p P] [--min-p P] [--repetition-penalty R]\n"
    "                  [--presence-penalty P] [--frequency-penalty F] [--stop-token-id ID]...\n"
    "                  [--ignore-eos] [--backend cpu|openblas|reference] [--json]\n"
    "  dserve generate --endpoint HOST:PORT --prompt TEXT [sampling flags as above]\n"
    "                  [--stop STR]... [--keep-special-tokens] [--json] [--timeout SECONDS]\n"
    "  dserve up [--config mesh.yaml] [--model DIR] [--transport tcp|shm]\n"
    "            [--prefill-workers N] [--decode-workers M] [--aggregated-workers K]\n"
    "            [--ready-file PATH] [--bin-dir DIR]\n"
    "  dserve bench --endpoint HOST:PORT\n"
    "            (--trace FILE [--trace-format azure|servegen] [--time-scale X]\n"
    "             [--trace-offset SECONDS] [--length-scale X]\n"
    "             | --rate R --prompt-len DIST --output-len DIST)\n"
    "            [--requests N] [--duration SECONDS] [--seed S] [--max-concurrency C]\n"
    "            [--max-prompt-len N] [--max-output-len N] [--timeout SECONDS]\n"
    "            [--output-length-hint] [--json]\n"
    "            DIST: N | uniform:A,B | normal:MEAN,STD | lognormal:MU,SIGMA\n"
    "  dserve tokenize --tokenizer DIR [--add-special-tokens]    < text\n"
    "  dserve detokenize --tokenizer DIR [--skip-special-tokens] < '[ids]'\n";

std::string ReadStdin() {
  std::stringstream ss;
  ss << std::cin.rdbuf();
  return ss.str();
}

absl::Status Tokenize(const std::vector<std::string>& argv) {
  DSERVE_ASSIGN_OR_RETURN(auto args,
                          services::CliArgs::Parse(argv, {"tokenizer"}, {"add-special-tokens"}));
  DSERVE_ASSIGN_OR_RETURN(std::string dir, args.Required("tokenizer"));
  DSERVE_ASSIGN_OR_RETURN(auto tok, tokenizer::Tokenizer::Load(dir));
  auto ids = tok->Encode(ReadStdin(), args.Flag("add-special-tokens"));
  if (!ids.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("standard input: ", ids.status().message()));
  }
  std::cout << nlohmann::json(*ids).dump() << "\n";
  return absl::OkStatus();
}

absl::Status Detokenize(const std::vector<std::string>& argv) {
  DSERVE_ASSIGN_OR_RETURN(auto args,
                          services::CliArgs::Parse(argv, {"tokenizer"}, {"skip-special-tokens"}));
  DSERVE_ASSIGN_OR_RETURN(std::string dir, args.Required("tokenizer"));
  DSERVE_ASSIGN_OR_RETURN(auto tok, tokenizer::Tokenizer::Load(dir));
  const nlohmann::json input = nlohmann::json::parse(ReadStdin(), nullptr, false);
  if (!input.is_array()) {
    return absl::InvalidArgumentError("standard input must be a JSON array of token ids");
  }
  std::vector<tokenizer::TokenId> ids;
  for (size_t i = 0; i < input.size(); ++i) {
    const nlohmann::json& v = input[i];
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() >= tok->vocab_size()) {
      return absl::InvalidArgumentError(absl::StrCat("token id at index ", i, " (", v.dump(),
                                                     ") is not an integer in [0, ",
                                                     tok->vocab_size(), ")"));
    }
    ids.push_back(v.get<tokenizer::TokenId>());
  }
  std::cout << tok->Decode(ids, args.Flag("skip-special-tokens"));
  return absl::OkStatus();
}

absl::Status ModelInit(const std::vector<std::string>& argv) {
  DSERVE_ASSIGN_OR_RETURN(
      auto args, services::CliArgs::Parse(argv, {"preset", "seed", "out", "dtype", "shards"}, {}));
  DSERVE_ASSIGN_OR_RETURN(std::string preset, args.Required("preset"));
  DSERVE_ASSIGN_OR_RETURN(std::string out, args.Required("out"));
  DSERVE_ASSIGN_OR_RETURN(engine::ModelConfig config, engine::PresetConfig(preset));
  engine::RandomModelOptions options;
  DSERVE_ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 0));
  options.seed = static_cast<uint64_t>(seed);
  DSERVE_ASSIGN_OR_RETURN(int64_t shards, args.Int("shards", 1));
  options.shards = static_cast<int>(shards);
  const std::string dtype = args.Get("dtype").value_or("bf16");
  if (dtype == "bf16")
    options.matrix_dtype = engine::DType::kBF16;
  else if (dtype == "f16")
    options.matrix_dtype = engine::DType::kF16;
  else if (dtype == "f32")
    options.matrix_dtype = engine::DType::kF32;
  else if (dtype == "fp8")
    options.matrix_dtype = engine::DType::kF8E4M3;
  else {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --dtype: \"", dtype, "\" is not one of bf16, f16, f32, fp8"));
  }
  const auto t0 = std::chrono::steady_clock::now();
  DSERVE_RETURN_IF_ERROR(engine::WriteRandomModel(config, options, out));
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("wrote %s model (seed %lld, %s) to %s in %.2f s\n", preset.c_str(),
              static_cast<long long>(seed), dtype.c_str(), out.c_str(), secs);
  return absl::OkStatus();
}

absl::Status Generate(const std::vector<std::string>& argv) {
  DSERVE_ASSIGN_OR_RETURN(
      auto args,
      services::CliArgs::Parse(argv,
                               {"model", "prompt", "max-tokens", "seed", "temperature", "top-k",
                                "top-p", "min-p", "repetition-penalty", "presence-penalty",
                                "frequency-penalty", "backend", "kv-block-tokens"},
                               {"json", "ignore-eos"}, {"stop-token-id"}));
  DSERVE_ASSIGN_OR_RETURN(std::string model_dir, args.Required("model"));
  DSERVE_ASSIGN_OR_RETURN(std::string prompt, args.Required("prompt"));

  engine::SamplingParams sp;
  DSERVE_ASSIGN_OR_RETURN(int64_t max_tokens, args.Int("max-tokens", 32));
  DSERVE_ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 0));
  DSERVE_ASSIGN_OR_RETURN(int64_t top_k, args.Int("top-k", 0));
  DSERVE_ASSIGN_OR_RETURN(double temperature, args.Double("temperature", 1.0));
  DSERVE_ASSIGN_OR_RETURN(double top_p, args.Double("top-p", 1.0));
  DSERVE_ASSIGN_OR_RETURN(double min_p, args.Double("min-p", 0.0));
  DSERVE_ASSIGN_OR_RETURN(double rep, args.Double("repetition-penalty", 1.0));
  DSERVE_ASSIGN_OR_RETURN(double presence, args.Double("presence-penalty", 0.0));
  DSERVE_ASSIGN_OR_RETURN(double frequency, args.Double("frequency-penalty", 0.0));
  if (max_tokens < 1 || max_tokens > (1 << 30)) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --max-tokens must be in [1, 2^30], got ", max_tokens));
  }
  sp.max_tokens = static_cast<int32_t>(max_tokens);
  sp.seed = static_cast<uint64_t>(seed);
  sp.top_k = static_cast<int32_t>(top_k);
  sp.temperature = static_cast<float>(temperature);
  sp.top_p = static_cast<float>(top_p);
  sp.min_p = static_cast<float>(min_p);
  sp.repetition_penalty = static_cast<float>(rep);
  sp.presence_penalty = static_cast<float>(presence);
  sp.frequency_penalty = static_cast<float>(frequency);
  sp.ignore_eos = args.Flag("ignore-eos");
  for (const std::string& s : args.GetAll("stop-token-id")) {
    int32_t id;
    if (!absl::SimpleAtoi(s, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --stop-token-id must be an integer, got \"", s, "\""));
    }
    sp.stop_token_ids.push_back(id);
  }

  engine::EngineOptions options;
  options.matmul_backend = args.Get("backend").value_or("cpu");
  DSERVE_ASSIGN_OR_RETURN(options.kv_block_tokens, args.Int("kv-block-tokens", 16));
  options.kv_cache_tokens = std::max<int64_t>(1 << 14, max_tokens + 4 * prompt.size() + 64);

  const auto t_load = std::chrono::steady_clock::now();
  DSERVE_ASSIGN_OR_RETURN(auto tok, tokenizer::Tokenizer::Load(model_dir));
  DSERVE_ASSIGN_OR_RETURN(auto eng, engine::Engine::Load(model_dir, options));
  const double load_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_load).count();

  engine::GenerationRequest req;
  DSERVE_ASSIGN_OR_RETURN(req.prompt, tok->Encode(prompt, /*add_special_tokens=*/true));
  req.sampling = sp;
  engine::GenerationStats stats;
  DSERVE_ASSIGN_OR_RETURN(auto results, eng->Generate({req}, &stats));
  const engine::GenerationResult& r = results[0];
  const std::string text = tok->Decode(r.output, /*skip_special_tokens=*/true);

  if (args.Flag("json")) {
    nlohmann::json j;
    j["text"] = text;
    j["prompt_token_ids"] = req.prompt;
    j["token_ids"] = r.output;
    j["finish_reason"] = std::string(engine::FinishReasonName(r.finish));
    j["usage"] = {{"prompt_tokens", r.prompt_tokens}, {"completion_tokens", r.output.size()}};
    const double decode_tps =
        stats.decode_seconds > 0 ? stats.decode_tokens / stats.decode_seconds : 0.0;
    j["timings"] = {{"load_seconds", load_s},
                    {"prefill_seconds", stats.prefill_seconds},
                    {"decode_seconds", stats.decode_seconds},
                    {"time_to_first_token_seconds", stats.first_token_seconds},
                    {"decode_tokens_per_second", decode_tps},
                    {"steps", stats.steps}};
    std::cout << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  } else {
    std::cout << prompt << text << "\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------
// Client subcommands: generate --endpoint, up, bench.

// ClientError prints "error: CODE: message" and returns the exit code
// (2 for INVALID_ARGUMENT, so scripts can tell a bad request from a failure).
int ClientError(const absl::Status& s) {
  std::cout.flush();
  std::cerr << "error: " << absl::StatusCodeToString(s.code()) << ": " << s.message() << "\n";
  return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

bool HasFlag(const std::vector<std::string>& argv, const std::string& name) {
  for (const std::string& a : argv) {
    if (a == "--" + name || a.rfind("--" + name + "=", 0) == 0) return true;
  }
  return false;
}

// Seconds reads a flag of seconds as a duration; `fallback` when absent.
absl::StatusOr<absl::Duration> Seconds(const services::CliArgs& args, const std::string& name,
                                       absl::Duration fallback) {
  if (!args.Has(name)) return fallback;
  DSERVE_ASSIGN_OR_RETURN(double s, args.Double(name, 0));
  if (!(s > 0) || s > 1e9) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", name, " must be a positive number of seconds, got ", s));
  }
  return absl::Seconds(s);
}

absl::StatusOr<int32_t> Int32Flag(const services::CliArgs& args, const std::string& name,
                                  int64_t lo, int64_t hi, int64_t fallback) {
  DSERVE_ASSIGN_OR_RETURN(int64_t v, args.Int(name, fallback));
  if (v < lo || v > hi) {
    return absl::InvalidArgumentError(
        absl::StrCat("flag --", name, " must be in [", lo, ", ", hi, "], got ", v));
  }
  return static_cast<int32_t>(v);
}

// RemoteRequest builds a GenerateRequest from generate's flags; only the
// flags given are set, so the router's defaults apply to the rest.
absl::StatusOr<v1::GenerateRequest> RemoteRequest(const services::CliArgs& args) {
  v1::GenerateRequest r;
  DSERVE_ASSIGN_OR_RETURN(std::string prompt, args.Required("prompt"));
  r.set_text(prompt);
  if (auto id = args.Get("request-id")) r.set_request_id(*id);
  if (args.Has("max-tokens")) {
    DSERVE_ASSIGN_OR_RETURN(int32_t n, Int32Flag(args, "max-tokens", 1, 1 << 30, 0));
    r.set_max_tokens(n);
  }
  v1::SamplingParams& sp = *r.mutable_sampling();
  if (args.Has("seed")) {
    DSERVE_ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 0));
    if (seed < 0) return absl::InvalidArgumentError("flag --seed must be >= 0");
    sp.set_seed(static_cast<uint64_t>(seed));
  }
  if (args.Has("top-k")) {
    DSERVE_ASSIGN_OR_RETURN(int32_t k, Int32Flag(args, "top-k", 0, 1 << 30, 0));
    sp.set_top_k(k);
  }
  const std::pair<const char*, void (v1::SamplingParams::*)(float)> floats[] = {
      {"temperature", &v1::SamplingParams::set_temperature},
      {"top-p", &v1::SamplingParams::set_top_p},
      {"min-p", &v1::SamplingParams::set_min_p},
      {"repetition-penalty", &v1::SamplingParams::set_repetition_penalty},
      {"presence-penalty", &v1::SamplingParams::set_presence_penalty},
      {"frequency-penalty", &v1::SamplingParams::set_frequency_penalty}};
  for (const auto& [name, setter] : floats) {
    if (!args.Has(name)) continue;
    DSERVE_ASSIGN_OR_RETURN(double v, args.Double(name, 0));
    (sp.*setter)(static_cast<float>(v));
  }
  for (const std::string& s : args.GetAll("stop-token-id")) {
    int32_t id;
    if (!absl::SimpleAtoi(s, &id)) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --stop-token-id must be an integer, got \"", s, "\""));
    }
    r.add_stop_token_ids(id);
  }
  for (const std::string& s : args.GetAll("stop")) r.add_stop(s);
  r.set_ignore_eos(args.Flag("ignore-eos"));
  // As the local mode prints it: special tokens left out of the text.
  r.set_skip_special_tokens(!args.Flag("keep-special-tokens"));
  return r;
}

// GenerateRemote: `dserve generate --endpoint`, one streamed request to a
// router. Text is printed as it arrives (after the prompt, as the local mode
// prints it); --json prints one object at the end instead.
int GenerateRemote(const std::vector<std::string>& argv) {
  auto parsed = services::CliArgs::Parse(
      argv,
      {"endpoint", "prompt", "max-tokens", "seed", "temperature", "top-k", "top-p", "min-p",
       "repetition-penalty", "presence-penalty", "frequency-penalty", "timeout", "request-id",
       "model", "backend", "kv-block-tokens"},
      {"json", "ignore-eos", "keep-special-tokens"}, {"stop-token-id", "stop"});
  if (!parsed.ok()) return ClientError(parsed.status());
  const services::CliArgs& args = *parsed;
  for (const char* local : {"model", "backend", "kv-block-tokens"}) {
    if (args.Has(local)) {
      return ClientError(absl::InvalidArgumentError(absl::StrCat(
          "flag --", local, " is for the local mode; --endpoint sends the request to a router")));
    }
  }
  auto request = RemoteRequest(args);
  if (!request.ok()) return ClientError(request.status());
  auto timeout = Seconds(args, "timeout", absl::InfiniteDuration());
  if (!timeout.ok()) return ClientError(timeout.status());
  auto client = services::InferenceClient::Connect(*args.Get("endpoint"));
  if (!client.ok()) return ClientError(client.status());

  const bool json = args.Flag("json");
  // The prompt is echoed with the first text, so a request refused outright
  // prints nothing on stdout.
  bool echoed = false;
  auto echo = [&](std::string_view text) {
    if (json) return;
    if (!echoed) std::cout << request->text();
    echoed = true;
    std::cout << text << std::flush;
  };
  services::GenerateResult result;
  const absl::Status status =
      (*client)->Generate(*request, *timeout, &result, [&](const v1::Chunk& chunk, absl::Time) {
        if (!chunk.text().empty()) echo(chunk.text());
      });
  if (status.ok()) echo("");
  if (echoed) std::cout << "\n" << std::flush;
  if (!status.ok()) return ClientError(status);
  if (json) {
    const auto ms = [](std::optional<absl::Duration> d) -> nlohmann::json {
      if (!d) return nullptr;
      return absl::ToDoubleMilliseconds(*d);
    };
    nlohmann::json j;
    j["request_id"] = result.request_id;
    j["text"] = result.text;
    j["token_ids"] = result.token_ids;
    j["finish_reason"] = services::FinishReasonName(result.finish_reason);
    j["matched_stop"] = result.matched_stop;
    j["usage"] = {{"prompt_tokens", result.usage.prompt_tokens()},
                  {"completion_tokens", result.usage.completion_tokens()},
                  {"cached_tokens", result.usage.cached_tokens()}};
    j["ttft_ms"] = ms(result.timing.TimeToFirstToken());
    j["tpot_ms"] = ms(result.timing.TimePerOutputToken());
    j["e2e_ms"] = absl::ToDoubleMilliseconds(result.timing.EndToEnd());
    std::cout << j.dump(2, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  return 0;
}

// Up: `dserve up`, a local mesh until Ctrl-C.
int Up(const std::vector<std::string>& argv) {
  auto parsed =
      services::CliArgs::Parse(argv,
                               {"config", "model", "transport", "prefill-workers", "decode-workers",
                                "aggregated-workers", "ready-file", "bin-dir"},
                               {});
  if (!parsed.ok()) return ClientError(parsed.status());
  const services::CliArgs& args = *parsed;
  services::MeshOverrides o;
  o.config_path = args.Get("config").value_or("");
  o.model_dir = args.Get("model").value_or("");
  o.transport = args.Get("transport").value_or("");
  const std::pair<const char*, std::optional<int32_t>*> counts[] = {
      {"prefill-workers", &o.prefill_workers},
      {"decode-workers", &o.decode_workers},
      {"aggregated-workers", &o.aggregated_workers}};
  for (const auto& [name, field] : counts) {
    if (!args.Has(name)) continue;
    auto v = Int32Flag(args, name, 0, 64, 0);
    if (!v.ok()) return ClientError(v.status());
    *field = *v;
  }
  auto config = services::LoadMeshConfig(o);
  if (!config.ok()) return ClientError(config.status());
  services::MeshLauncherOptions options;
  options.config = *std::move(config);
  if (auto dir = args.Get("bin-dir")) {
    options.bin_dir = *dir;
  } else {
    auto dir_or = services::SiblingBinaryDir();
    if (!dir_or.ok()) return ClientError(dir_or.status());
    options.bin_dir = *dir_or;
  }
  return services::RunMesh(std::move(options), args.Get("ready-file").value_or(""), stdout);
}

// BenchSchedule builds the request schedule from bench's flags.
absl::StatusOr<std::vector<services::RequestSpec>> BenchSchedule(const services::CliArgs& args,
                                                                 nlohmann::json& description) {
  services::ScheduleOptions o;
  DSERVE_ASSIGN_OR_RETURN(int64_t requests, args.Int("requests", 0));
  if (requests < 0) return absl::InvalidArgumentError("flag --requests must be >= 0");
  DSERVE_ASSIGN_OR_RETURN(o.duration, Seconds(args, "duration", absl::InfiniteDuration()));
  // Neither limit: a short run rather than an endless one.
  o.max_requests = requests > 0 || args.Has("duration") ? requests : 100;
  DSERVE_ASSIGN_OR_RETURN(int64_t seed, args.Int("seed", 0));
  if (seed < 0) return absl::InvalidArgumentError("flag --seed must be >= 0");
  o.seed = static_cast<uint64_t>(seed);
  DSERVE_ASSIGN_OR_RETURN(o.max_prompt_tokens, Int32Flag(args, "max-prompt-len", 0, 1 << 30, 0));
  DSERVE_ASSIGN_OR_RETURN(o.max_output_tokens, Int32Flag(args, "max-output-len", 0, 1 << 30, 0));
  description["max_requests"] = o.max_requests;
  description["seed"] = seed;

  const bool trace = args.Has("trace");
  if (trace == args.Has("rate")) {
    return absl::InvalidArgumentError("give exactly one of --trace FILE and --rate R");
  }
  if (!trace) {
    for (const char* flag : {"trace-format", "time-scale", "trace-offset", "length-scale"}) {
      if (args.Has(flag)) {
        return absl::InvalidArgumentError(absl::StrCat("flag --", flag, " applies to --trace"));
      }
    }
    DSERVE_ASSIGN_OR_RETURN(double rate, args.Double("rate", 0));
    DSERVE_ASSIGN_OR_RETURN(std::string prompt_spec, args.Required("prompt-len"));
    DSERVE_ASSIGN_OR_RETURN(std::string output_spec, args.Required("output-len"));
    DSERVE_ASSIGN_OR_RETURN(auto prompt,
                            services::LengthDistribution::Parse("--prompt-len", prompt_spec));
    DSERVE_ASSIGN_OR_RETURN(auto output,
                            services::LengthDistribution::Parse("--output-len", output_spec));
    description["arrivals"] = absl::StrCat("poisson ", rate, " req/s");
    description["prompt_len"] = prompt.ToString();
    description["output_len"] = output.ToString();
    return services::PoissonSchedule(rate, prompt, output, o);
  }
  for (const char* flag : {"prompt-len", "output-len"}) {
    if (args.Has(flag)) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --", flag, " applies to --rate; a trace has its own lengths"));
    }
  }
  DSERVE_ASSIGN_OR_RETURN(o.time_scale, args.Double("time-scale", 1.0));
  DSERVE_ASSIGN_OR_RETURN(o.length_scale, args.Double("length-scale", 1.0));
  DSERVE_ASSIGN_OR_RETURN(double offset, args.Double("trace-offset", 0.0));
  if (!(offset >= 0)) return absl::InvalidArgumentError("flag --trace-offset must be >= 0");
  o.trace_offset = absl::Seconds(offset);
  const std::string path = *args.Get("trace");
  services::TraceFormat format;
  if (auto name = args.Get("trace-format")) {
    DSERVE_ASSIGN_OR_RETURN(format, services::ParseTraceFormat(*name));
  } else {
    DSERVE_ASSIGN_OR_RETURN(format, services::DetectTraceFormat(path));
  }
  description["trace"] = path;
  description["trace_format"] = format == services::TraceFormat::kAzure ? "azure" : "servegen";
  description["time_scale"] = o.time_scale;
  description["length_scale"] = o.length_scale;
  return services::LoadTrace(path, format, o);
}

// Bench: `dserve bench`, open-loop load against a router.
int Bench(const std::vector<std::string>& argv) {
  auto parsed = services::CliArgs::Parse(
      argv,
      {"endpoint", "trace", "trace-format", "time-scale", "trace-offset", "length-scale", "rate",
       "prompt-len", "output-len", "requests", "duration", "seed", "max-concurrency",
       "max-prompt-len", "max-output-len", "timeout"},
      {"json", "output-length-hint"});
  if (!parsed.ok()) return ClientError(parsed.status());
  const services::CliArgs& args = *parsed;
  auto endpoint = args.Required("endpoint");
  if (!endpoint.ok()) return ClientError(endpoint.status());
  nlohmann::json description;
  auto specs = BenchSchedule(args, description);
  if (!specs.ok()) return ClientError(specs.status());
  services::LoadOptions load;
  auto concurrency = Int32Flag(args, "max-concurrency", 1, 4096, 128);
  if (!concurrency.ok()) return ClientError(concurrency.status());
  load.max_concurrency = *concurrency;
  auto timeout = Seconds(args, "timeout", absl::Minutes(10));
  if (!timeout.ok()) return ClientError(timeout.status());
  load.request_timeout = *timeout;
  load.seed = description["seed"].get<uint64_t>();
  load.send_output_length_hint = args.Flag("output-length-hint");

  auto client = services::InferenceClient::Connect(*endpoint);
  if (!client.ok()) return ClientError(client.status());
  auto info = (*client)->GetModelInfo(absl::Seconds(30));
  if (!info.ok()) {
    return ClientError(
        absl::Status(info.status().code(),
                     absl::StrCat("GetModelInfo from ", *endpoint, ": ", info.status().message())));
  }
  if (info->vocab_size() < 2) {
    return ClientError(absl::FailedPreconditionError(
        absl::StrCat(*endpoint, " reports vocab_size ", info->vocab_size())));
  }
  load.vocab_size = info->vocab_size();
  const int64_t capped = services::FitToContext(info->max_context_tokens(), *specs);

  double schedule_seconds = specs->empty() ? 0 : absl::ToDoubleSeconds(specs->back().arrival);
  std::cout << "bench " << *endpoint << " (" << info->name() << ", context "
            << info->max_context_tokens() << "): " << specs->size() << " requests over "
            << absl::StrFormat("%.1f", schedule_seconds) << " s";
  for (const char* key : {"arrivals", "prompt_len", "output_len", "trace"}) {
    if (description.contains(key)) {
      std::cout << ", " << key << " " << description[key].get<std::string>();
    }
  }
  if (capped > 0) std::cout << "; " << capped << " shortened to fit the context";
  std::cout << "\n" << std::flush;

  const std::vector<services::RequestRecord> records = services::RunLoad(**client, *specs, load);
  const services::BenchSummary summary = services::Summarize(records);
  std::cout << services::FormatSummaryTable(summary);
  if (args.Flag("json")) {
    nlohmann::json j = services::SummaryToJson(summary);
    j["endpoint"] = *endpoint;
    j["model"] = info->name();
    j["schedule"] = description;
    j["schedule"]["requests"] = specs->size();
    j["schedule"]["span_seconds"] = schedule_seconds;
    j["schedule"]["shortened_to_fit_context"] = capped;
    j["max_concurrency"] = load.max_concurrency;
    std::cout << j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) << "\n";
  }
  std::cout.flush();
  return 0;
}

int Main(int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  absl::Status s;
  if (args.size() >= 2 && args[0] == "model" && args[1] == "init") {
    s = ModelInit({args.begin() + 2, args.end()});
  } else if (!args.empty() && args[0] == "tokenize") {
    s = Tokenize({args.begin() + 1, args.end()});
  } else if (!args.empty() && args[0] == "detokenize") {
    s = Detokenize({args.begin() + 1, args.end()});
  } else if (!args.empty() && args[0] == "generate" && HasFlag(args, "endpoint")) {
    return GenerateRemote({args.begin() + 1, args.end()});
  } else if (!args.empty() && args[0] == "generate") {
    s = Generate({args.begin() + 1, args.end()});
  } else if (!args.empty() && args[0] == "up") {
    return Up({args.begin() + 1, args.end()});
  } else if (!args.empty() && args[0] == "bench") {
    return Bench({args.begin() + 1, args.end()});
  } else if (!args.empty() && (args[0] == "--help" || args[0] == "help")) {
    std::cout << kUsage;
    return 0;
  } else {
    std::cerr << kUsage;
    return 2;
  }
  if (!s.ok()) {
    std::cerr << "dserve: " << s.message() << "\n";
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

}  // namespace
}  // namespace dserve

int main(int argc, char** argv) { return dserve::Main(argc, argv); }
