// engine/engine.cc: the step API and the run-to-completion loop.
#include "engine/engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <deque>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"

namespace dserve::engine {
namespace {

int64_t BlocksFor(int64_t tokens, int64_t block_tokens) {
  return (tokens + block_tokens - 1) / block_tokens;
}

// LogProbability: log-softmax of `logits` at `token`, in double.
float LogProbability(std::span<const float> logits, TokenId token) {
  const float max = *std::max_element(logits.begin(), logits.end());
  double sum = 0;
  for (float v : logits) sum += std::exp(static_cast<double>(v - max));
  return static_cast<float>(static_cast<double>(logits[token] - max) - std::log(sum));
}

double SecondsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

std::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
  }
  return "unknown";
}

Engine::Engine(std::unique_ptr<kernels::MatmulBackend> backend, std::unique_ptr<Model> model,
               const EngineOptions& options, const KvCacheLayout& layout, float* kv_memory)
    : options_(options),
      backend_(std::move(backend)),
      model_(std::move(model)),
      pool_(layout, kv_memory) {}

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const std::string& model_dir,
                                                     const EngineOptions& options) {
  if (options.kv_block_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("kv_block_tokens must be >= 1, got ", options.kv_block_tokens));
  }
  if (options.kv_cache_tokens < options.kv_block_tokens) {
    return absl::InvalidArgumentError(absl::StrCat("kv_cache_tokens must be >= kv_block_tokens (",
                                                   options.kv_block_tokens, "), got ",
                                                   options.kv_cache_tokens));
  }
  if (options.max_step_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("max_step_tokens must be >= 1, got ", options.max_step_tokens));
  }
  DSERVE_ASSIGN_OR_RETURN(auto backend, kernels::MakeMatmulBackend(options.matmul_backend));
  DSERVE_ASSIGN_OR_RETURN(auto model, Model::Load(model_dir, *backend));
  KvCacheLayout layout;
  layout.num_layers = model->config().num_hidden_layers;
  layout.block_tokens = options.kv_block_tokens;
  layout.num_blocks = BlocksFor(options.kv_cache_tokens, options.kv_block_tokens);
  layout.token_width = model->config().kv_cache_width();
  float* kv_memory = nullptr;
  if (options.kv_memory) {
    DSERVE_ASSIGN_OR_RETURN(uint8_t* bytes, options.kv_memory(layout.TotalBytes()));
    if (reinterpret_cast<uintptr_t>(bytes) % alignof(float) != 0) {
      return absl::InvalidArgumentError("kv_memory returned memory not aligned for float");
    }
    kv_memory = reinterpret_cast<float*>(bytes);
  }
  return std::unique_ptr<Engine>(
      new Engine(std::move(backend), std::move(model), options, layout, kv_memory));
}

absl::Status Engine::ValidateRequest(const GenerationRequest& request) const {
  const ModelConfig& c = config();
  if (request.prompt.empty()) {
    return absl::InvalidArgumentError("prompt must hold at least 1 token");
  }
  if (static_cast<int64_t>(request.prompt.size()) >= c.max_position_embeddings) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt has ", request.prompt.size(),
                     " tokens; the model's limit (max_position_embeddings) is ",
                     c.max_position_embeddings, " including at least 1 output token"));
  }
  for (size_t i = 0; i < request.prompt.size(); ++i) {
    const TokenId t = request.prompt[i];
    if (t < 0 || t >= c.vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "prompt token ", i, " has id ", t, ", outside [0, vocab_size=", c.vocab_size, ")"));
    }
  }
  return ValidateSamplingParams(request.sampling, c.vocab_size);
}

absl::StatusOr<SequenceId> Engine::AddSequence(const GenerationRequest& request) {
  DSERVE_RETURN_IF_ERROR(ValidateRequest(request));
  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  seq->tokens = request.prompt;
  seq->prompt_len = static_cast<int64_t>(request.prompt.size());
  seq->sampling = request.sampling;
  const SequenceId id = seq->id;
  sequences_.emplace(id, std::move(seq));
  return id;
}

absl::StatusOr<SequenceId> Engine::AdoptSequence(const GenerationRequest& request,
                                                 std::vector<KvBlockId> blocks,
                                                 TokenId first_token) {
  DSERVE_RETURN_IF_ERROR(ValidateRequest(request));
  const int64_t prompt_len = static_cast<int64_t>(request.prompt.size());
  const int64_t bt = pool_.layout().block_tokens;
  if (static_cast<int64_t>(blocks.size()) < BlocksFor(prompt_len, bt)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "blocks: ", blocks.size(), " blocks cannot hold a ", prompt_len, "-token prompt"));
  }
  for (KvBlockId b : blocks) {
    if (!pool_.IsAllocated(b)) {
      return absl::InvalidArgumentError(absl::StrCat("blocks: block ", b, " is not allocated"));
    }
  }
  if (first_token < 0 || first_token >= config().vocab_size) {
    return absl::InvalidArgumentError(absl::StrCat(
        "first_token ", first_token, " outside [0, vocab_size=", config().vocab_size, ")"));
  }
  auto seq = std::make_unique<Sequence>();
  seq->id = next_id_++;
  seq->tokens = request.prompt;
  seq->prompt_len = prompt_len;
  seq->num_computed = prompt_len;
  seq->sampling = request.sampling;
  seq->blocks.Assign(std::move(blocks));
  seq->blocks.UpdateHashes(seq->tokens, seq->num_computed, bt);
  seq->tokens.push_back(first_token);
  CheckFinish(*seq, first_token);
  const SequenceId id = seq->id;
  sequences_.emplace(id, std::move(seq));
  return id;
}

const Sequence* Engine::Find(SequenceId id) const {
  auto it = sequences_.find(id);
  return it == sequences_.end() ? nullptr : it->second.get();
}

absl::Status Engine::EnsureCapacity(SequenceId id, int64_t num_tokens) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  return it->second->blocks.EnsureCapacity(pool_, num_tokens);
}

absl::Status Engine::Release(SequenceId id) {
  auto it = sequences_.find(id);
  if (it == sequences_.end()) {
    return absl::NotFoundError(absl::StrCat("sequence ", id, " not found"));
  }
  absl::Status s = it->second->blocks.Release(pool_);
  sequences_.erase(it);
  return s;
}

bool Engine::IsStop(const Sequence& seq, TokenId token) const {
  const auto& stops = seq.sampling.stop_token_ids;
  if (std::find(stops.begin(), stops.end(), token) != stops.end()) return true;
  if (seq.sampling.ignore_eos) return false;
  const auto& eos = config().eos_token_ids;
  return std::find(eos.begin(), eos.end(), token) != eos.end();
}

void Engine::CheckFinish(Sequence& seq, TokenId token) const {
  if (IsStop(seq, token)) {
    seq.finish = FinishReason::kStop;
  } else if (static_cast<int64_t>(seq.output().size()) >= seq.sampling.max_tokens ||
             static_cast<int64_t>(seq.tokens.size()) >= config().max_position_embeddings) {
    seq.finish = FinishReason::kLength;
  }
}

absl::StatusOr<StepOutcome> Engine::Step(std::span<const StepItem> items,
                                         const LayerDone& layer_done) {
  std::vector<Sequence*> seqs;
  seqs.reserve(items.size());
  for (const StepItem& item : items) {
    auto it = sequences_.find(item.sequence);
    if (it == sequences_.end()) {
      return absl::NotFoundError(absl::StrCat("sequence ", item.sequence, " not found"));
    }
    Sequence* seq = it->second.get();
    if (seq->finish != FinishReason::kNone) {
      return absl::FailedPreconditionError(absl::StrCat("sequence ", seq->id, " has finished"));
    }
    if (item.num_tokens < 1 || item.num_tokens > seq->num_pending()) {
      return absl::InvalidArgumentError(absl::StrCat("sequence ", seq->id, ": num_tokens ",
                                                     item.num_tokens, " outside [1, ",
                                                     seq->num_pending(), "]"));
    }
    if (std::find(seqs.begin(), seqs.end(), seq) != seqs.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat("sequence ", seq->id, " appears twice in one step"));
    }
    seqs.push_back(seq);
  }
  for (size_t i = 0; i < items.size(); ++i) {
    DSERVE_RETURN_IF_ERROR(
        seqs[i]->blocks.EnsureCapacity(pool_, seqs[i]->num_computed + items[i].num_tokens));
  }

  std::vector<ModelChunk> chunks(items.size());
  StepOutcome outcome;
  for (size_t i = 0; i < items.size(); ++i) {
    const Sequence& seq = *seqs[i];
    chunks[i].tokens = {seq.tokens.data() + seq.num_computed,
                        static_cast<size_t>(items[i].num_tokens)};
    chunks[i].start_pos = seq.num_computed;
    chunks[i].block_table = &seq.blocks;
    chunks[i].logits =
        items[i].num_tokens == seq.num_pending() ? LogitsMode::kLast : LogitsMode::kNone;
    outcome.tokens_computed += items[i].num_tokens;
  }
  DSERVE_ASSIGN_OR_RETURN(last_logits_,
                          model_->Forward(chunks, pool_, options_.attention, layer_done));

  const int64_t vocab = config().vocab_size;
  std::vector<float> scratch(vocab);
  int64_t row = 0;
  for (size_t i = 0; i < items.size(); ++i) {
    Sequence& seq = *seqs[i];
    seq.num_computed += items[i].num_tokens;
    seq.blocks.UpdateHashes(seq.tokens, seq.num_computed, pool_.layout().block_tokens);
    if (chunks[i].logits == LogitsMode::kNone) continue;
    const float* row_logits = last_logits_.data() + row * vocab;
    std::copy_n(row_logits, vocab, scratch.data());
    ++row;
    const TokenId token = SampleToken(scratch, seq.sampling, seq.prompt(), seq.output());
    seq.tokens.push_back(token);
    outcome.sampled.emplace_back(seq.id, token);
    outcome.logprobs.push_back(LogProbability(std::span(row_logits, vocab), token));
    CheckFinish(seq, token);
    if (seq.finish != FinishReason::kNone) outcome.finished.push_back(seq.id);
  }
  return outcome;
}

absl::StatusOr<std::vector<GenerationResult>> Engine::Generate(
    const std::vector<GenerationRequest>& requests, GenerationStats* stats) {
  GenerationStats local_stats;
  GenerationStats& st = stats ? *stats : local_stats;
  const int64_t bt = pool_.layout().block_tokens;
  const int64_t max_pos = config().max_position_embeddings;

  // Validate everything before running anything.
  std::vector<SequenceId> ids;
  std::vector<int64_t> lifetime_blocks;
  for (size_t r = 0; r < requests.size(); ++r) {
    auto id = AddSequence(requests[r]);
    if (!id.ok()) {
      for (SequenceId added : ids) (void)Release(added);
      return absl::Status(id.status().code(),
                          absl::StrCat("request ", r, ": ", id.status().message()));
    }
    ids.push_back(*id);
    const int64_t lifetime =
        std::min<int64_t>(requests[r].prompt.size() + requests[r].sampling.max_tokens, max_pos);
    lifetime_blocks.push_back(BlocksFor(lifetime, bt));
    if (lifetime_blocks.back() > pool_.num_blocks()) {
      for (SequenceId added : ids) (void)Release(added);
      return absl::ResourceExhaustedError(absl::StrCat(
          "request ", r, " needs ", lifetime, " tokens of KV over its lifetime; the cache holds ",
          pool_.num_blocks() * bt));
    }
  }

  std::vector<GenerationResult> results(requests.size());
  std::deque<size_t> waiting;
  for (size_t r = 0; r < requests.size(); ++r) waiting.push_back(r);
  std::vector<size_t> running;
  int64_t reserved_blocks = 0;
  const auto t_start = std::chrono::steady_clock::now();
  size_t with_first_token = 0;

  while (!waiting.empty() || !running.empty()) {
    // Admit in arrival order while the whole lifetime fits.
    while (!waiting.empty() &&
           reserved_blocks + lifetime_blocks[waiting.front()] <= pool_.num_blocks()) {
      reserved_blocks += lifetime_blocks[waiting.front()];
      running.push_back(waiting.front());
      waiting.pop_front();
    }
    std::vector<StepItem> items;
    int64_t budget = options_.max_step_tokens;
    bool has_prefill = false;
    for (size_t r : running) {  // decode first: one token each
      const Sequence& seq = *Find(ids[r]);
      if (seq.num_computed >= seq.prompt_len && budget > 0) {
        items.push_back({seq.id, 1});
        --budget;
      }
    }
    for (size_t r : running) {  // then prefill chunks in the remaining budget
      const Sequence& seq = *Find(ids[r]);
      if (seq.num_computed < seq.prompt_len && budget > 0) {
        const int64_t n = std::min(seq.num_pending(), budget);
        items.push_back({seq.id, n});
        budget -= n;
        has_prefill = true;
      }
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto outcome = Step(items);
    if (!outcome.ok()) {
      for (SequenceId id : ids) (void)Release(id);
      return outcome.status();
    }
    const double dt = SecondsSince(t0);
    ++st.steps;
    for (const StepItem& item : items) {
      const Sequence& seq = *Find(item.sequence);
      const bool prefill = seq.num_computed - item.num_tokens < seq.prompt_len;
      (prefill ? st.prefill_tokens : st.decode_tokens) += item.num_tokens;
    }
    (has_prefill ? st.prefill_seconds : st.decode_seconds) += dt;
    for (const auto& [id, token] : outcome->sampled) {
      if (Find(id)->output().size() == 1 && ++with_first_token == requests.size()) {
        st.first_token_seconds = SecondsSince(t_start);
      }
    }
    for (SequenceId id : outcome->finished) {
      const size_t r = std::find(ids.begin(), ids.end(), id) - ids.begin();
      const Sequence& seq = *Find(id);
      results[r].output.assign(seq.output().begin(), seq.output().end());
      results[r].finish = seq.finish;
      results[r].prompt_tokens = seq.prompt_len;
      DSERVE_RETURN_IF_ERROR(Release(id));
      reserved_blocks -= lifetime_blocks[r];
      running.erase(std::find(running.begin(), running.end(), r));
    }
  }
  return results;
}

}  // namespace dserve::engine
