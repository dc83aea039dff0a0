// engine/engine.h: sequences over the model: one step API that takes a mixed
// batch (prefill chunks and decode tokens of many sequences), per-sequence
// sampling and stop conditions, KV blocks allocated and freed exactly, and a
// simple run-to-completion loop (Generate) on top.
#ifndef DSERVE_ENGINE_ENGINE_H_
#define DSERVE_ENGINE_ENGINE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "engine/kv_cache.h"
#include "engine/model.h"
#include "engine/sampler.h"
#include "kernels/matmul.h"

namespace dserve::engine {

using SequenceId = int64_t;

enum class FinishReason { kNone, kStop, kLength };
std::string_view FinishReasonName(FinishReason reason);

// EngineOptions: how the engine is built.
struct EngineOptions {
  std::string matmul_backend = "cpu";  // see kernels::MakeMatmulBackend
  int64_t kv_block_tokens = 16;
  int64_t kv_cache_tokens = 1 << 16;  // pool capacity, rounded up to blocks
  int64_t max_step_tokens = 2048;     // Generate: token budget of one step
  AttentionPath attention = AttentionPath::kAuto;
  // When set, the KV pool's memory (`bytes`, float-aligned) comes from here
  // instead of the heap: e.g. a region registered with a KV transport, so
  // peers read and write blocks in place. The memory must outlive the engine.
  std::function<absl::StatusOr<uint8_t*>(int64_t bytes)> kv_memory = nullptr;
};

// Sequence: a request's state. Owned by the Engine.
struct Sequence {
  SequenceId id = 0;
  std::vector<TokenId> tokens;  // prompt then output
  int64_t prompt_len = 0;
  int64_t num_computed = 0;  // tokens whose KV is in the cache
  BlockTable blocks;
  SamplingParams sampling;
  FinishReason finish = FinishReason::kNone;

  std::span<const TokenId> prompt() const {
    return {tokens.data(), static_cast<size_t>(prompt_len)};
  }
  std::span<const TokenId> output() const {
    return {tokens.data() + prompt_len, tokens.size() - prompt_len};
  }
  // Tokens not yet run through the model (prompt remainder, or the last
  // sampled token).
  int64_t num_pending() const { return static_cast<int64_t>(tokens.size()) - num_computed; }
};

// StepItem: feed `num_tokens` of a sequence's pending tokens this step. When
// they are the last pending ones, the step samples the sequence's next token.
struct StepItem {
  SequenceId sequence = 0;
  int64_t num_tokens = 1;
};

// StepOutcome: what one step did.
struct StepOutcome {
  int64_t tokens_computed = 0;
  std::vector<std::pair<SequenceId, TokenId>> sampled;
  // logprobs[i]: log-probability of sampled[i]'s token under the model's
  // distribution (log-softmax of the raw logits, before any sampling knob).
  std::vector<float> logprobs;
  std::vector<SequenceId> finished;
};

// GenerationRequest / GenerationResult: the run-to-completion interface.
struct GenerationRequest {
  std::vector<TokenId> prompt;
  SamplingParams sampling;
};
struct GenerationResult {
  std::vector<TokenId> output;
  FinishReason finish = FinishReason::kNone;
  int64_t prompt_tokens = 0;
};
struct GenerationStats {
  int64_t steps = 0;
  int64_t prefill_tokens = 0;
  int64_t decode_tokens = 0;
  double prefill_seconds = 0;      // steps that carried any prefill chunk
  double decode_seconds = 0;       // steps of decode tokens only
  double first_token_seconds = 0;  // until every request had its first token
};

// Engine: owns the model, the KV pool and the sequences. Thread-compatible:
// one thread (the scheduler) drives it.
class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Load(const std::string& model_dir,
                                                      const EngineOptions& options = {});

  const ModelConfig& config() const { return model_->config(); }
  const Model& model() const { return *model_; }
  const KvBlockPool& pool() const { return pool_; }
  // mutable_pool: for a scheduler that reserves blocks for KV arriving from
  // a peer (see AdoptSequence).
  KvBlockPool& mutable_pool() { return pool_; }
  const EngineOptions& options() const { return options_; }

  // AddSequence validates the request (INVALID_ARGUMENT naming the field)
  // and registers it; it takes no KV blocks until it runs.
  absl::StatusOr<SequenceId> AddSequence(const GenerationRequest& request);
  // AdoptSequence registers a request whose prompt KV is already in
  // `blocks` (allocated from this pool, in position order, covering the
  // prompt; computed elsewhere, e.g. by a prefill worker) and whose first
  // output token is `first_token`. On success the sequence owns the blocks
  // (Release frees them); on error the caller still does. The sequence may
  // already be finished (stop token, max_tokens 1, context full); otherwise
  // its next Step item feeds first_token.
  absl::StatusOr<SequenceId> AdoptSequence(const GenerationRequest& request,
                                           std::vector<KvBlockId> blocks, TokenId first_token);
  const Sequence* Find(SequenceId id) const;
  // EnsureCapacity allocates a sequence's blocks for its first `num_tokens`
  // ahead of the steps that fill them (e.g. so a transfer can be planned
  // over all of them). RESOURCE_EXHAUSTED, allocating nothing, when the pool
  // cannot hold them.
  absl::Status EnsureCapacity(SequenceId id, int64_t num_tokens);
  // Release frees a sequence's blocks and forgets it (finished or not).
  absl::Status Release(SequenceId id);
  int64_t num_sequences() const { return static_cast<int64_t>(sequences_.size()); }

  // Step runs one mixed batch. Each item's blocks are allocated first; if
  // the pool cannot hold them the step fails with RESOURCE_EXHAUSTED before
  // computing anything (blocks taken for earlier items stay with their
  // sequences). Finished sequences keep their blocks until Release.
  // `layer_done` is called as each layer's KV lands (Model::Forward).
  absl::StatusOr<StepOutcome> Step(std::span<const StepItem> items,
                                   const LayerDone& layer_done = {});

  // Logits of the last Step for sequences that sampled, for tests: row i
  // belongs to outcome.sampled[i].
  const std::vector<float>& last_logits() const { return last_logits_; }

  // Generate runs requests to completion with continuous batching: decode
  // tokens first, then prefill chunks up to max_step_tokens per step; a
  // request is admitted only when the pool can hold its whole lifetime
  // (prompt + max_tokens). Results are in request order.
  absl::StatusOr<std::vector<GenerationResult>> Generate(
      const std::vector<GenerationRequest>& requests, GenerationStats* stats = nullptr);

 private:
  Engine(std::unique_ptr<kernels::MatmulBackend> backend, std::unique_ptr<Model> model,
         const EngineOptions& options, const KvCacheLayout& layout, float* kv_memory);
  bool IsStop(const Sequence& seq, TokenId token) const;
  // Finish sets seq.finish after `token` was appended.
  void CheckFinish(Sequence& seq, TokenId token) const;
  absl::Status ValidateRequest(const GenerationRequest& request) const;

  EngineOptions options_;
  std::unique_ptr<kernels::MatmulBackend> backend_;
  std::unique_ptr<Model> model_;
  KvBlockPool pool_;
  absl::flat_hash_map<SequenceId, std::unique_ptr<Sequence>> sequences_;
  SequenceId next_id_ = 1;
  std::vector<float> last_logits_;
};

}  // namespace dserve::engine

#endif  // DSERVE_ENGINE_ENGINE_H_
