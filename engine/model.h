// engine/model.h: a DeepSeek-V3-architecture transformer on the CPU: weights
// loaded from a Hugging Face checkpoint, and one forward step over a mixed
// batch of prefill chunks and decode tokens that reads and writes the paged
// MLA latent cache.
#ifndef DSERVE_ENGINE_MODEL_H_
#define DSERVE_ENGINE_MODEL_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/kv_cache.h"
#include "engine/model_config.h"
#include "engine/moe.h"
#include "kernels/matmul.h"

namespace dserve::engine {

class Checkpoint;

// LogitsMode: which of a chunk's tokens get logits.
enum class LogitsMode { kNone, kLast, kAll };

// AttentionPath: how attention over the latent cache is computed. kAuto uses
// the absorbed form (scores against the latent directly, never expanding
// keys or values) for single-token chunks and the expanded form (keys and
// values decompressed per head) for longer chunks; the others force one
// form, for tests.
enum class AttentionPath { kAuto, kAbsorbed, kExpanded };

// LayerDone: called on the forward's thread when a layer's KV for every chunk
// of the step is in the pool (e.g. to start sending that layer elsewhere
// while the next ones compute). Must not touch the pool's other layers.
using LayerDone = std::function<void(int64_t layer)>;

// ModelChunk: one sequence's part of a step: `tokens` at positions
// start_pos, start_pos+1, ...; the KV of positions < start_pos is already in
// the cache. `block_table` must have capacity for start_pos + tokens.size().
struct ModelChunk {
  std::span<const TokenId> tokens;
  int64_t start_pos = 0;
  const BlockTable* block_table = nullptr;
  LogitsMode logits = LogitsMode::kLast;
};

// DenseMlpWeights: gate and up fused ([2 * intermediate x hidden]), down.
struct DenseMlpWeights {
  int64_t intermediate = 0;
  std::unique_ptr<kernels::PackedWeight> gate_up;
  std::unique_ptr<kernels::PackedWeight> down;
};

// LayerWeights: one decoder layer, packed for the matmul backend.
struct LayerWeights {
  std::vector<float> input_norm, post_attention_norm, q_a_norm, kv_a_norm;
  // Fused input projection: rows [q_a (q_lora) or q_proj (heads*qk)] then
  // kv_a_proj_with_mqa (kv_lora + rope).
  std::unique_ptr<kernels::PackedWeight> qkv_a;
  std::unique_ptr<kernels::PackedWeight> q_b;   // null without q_lora_rank
  std::unique_ptr<kernels::PackedWeight> kv_b;  // [heads*(nope+v) x kv_lora]
  // Absorbed decode: per head W_UK^T [kv_lora x nope] and W_UV [v x kv_lora].
  std::vector<std::unique_ptr<kernels::PackedWeight>> w_uk_t, w_uv;
  std::unique_ptr<kernels::PackedWeight> o_proj;
  bool is_moe = false;
  DenseMlpWeights mlp;                            // dense MLP, or the shared experts of a MoE layer
  std::unique_ptr<kernels::PackedWeight> router;  // [n_routed x hidden]
  std::vector<float> correction_bias;
};

// Model: the weights and the forward step. Immutable after Load; Forward may
// run on one thread at a time per KvBlockPool.
class Model {
 public:
  // Load reads config.json and the safetensors checkpoint in `dir` and packs
  // every weight for `backend`, which must outlive the model.
  static absl::StatusOr<std::unique_ptr<Model>> Load(const std::string& dir,
                                                     const kernels::MatmulBackend& backend);

  const ModelConfig& config() const { return config_; }
  const kernels::MatmulBackend& backend() const { return backend_; }

  // Forward runs every chunk through the model, writing their KV into `pool`
  // at their block tables' slots, and returns the logits rows the chunks asked
  // for, in chunk order ([rows x vocab_size]). `layer_done`, when set, is
  // called after each layer.
  absl::StatusOr<std::vector<float>> Forward(std::span<const ModelChunk> chunks, KvBlockPool& pool,
                                             AttentionPath path = AttentionPath::kAuto,
                                             const LayerDone& layer_done = {}) const;

  // Replaces the routed-expert backend (e.g. with remote expert services).
  void SetRoutedExperts(std::shared_ptr<RoutedExperts> experts) { experts_ = std::move(experts); }

  // Byte accounting for benchmarks: weights every token reads (attention,
  // dense MLPs, shared experts, routers, final norm, lm_head), and one routed
  // expert.
  int64_t DenseWeightBytes() const;
  int64_t RoutedExpertBytes() const { return expert_bytes_; }
  int64_t TotalWeightBytes() const;

 private:
  Model(ModelConfig config, const kernels::MatmulBackend& backend)
      : config_(std::move(config)), backend_(backend) {}
  absl::Status LoadWeights(const Checkpoint& ckpt);

  struct Workspace;
  void Attention(const LayerWeights& lw, int64_t layer, std::span<const ModelChunk> chunks,
                 const std::vector<int64_t>& chunk_row, Workspace& ws, KvBlockPool& pool,
                 AttentionPath path) const;

  ModelConfig config_;
  const kernels::MatmulBackend& backend_;
  std::vector<float> embed_;  // [vocab x hidden]
  std::vector<float> final_norm_;
  std::unique_ptr<kernels::PackedWeight> lm_head_;
  std::vector<LayerWeights> layers_;
  std::shared_ptr<RoutedExperts> experts_;
  int64_t expert_bytes_ = 0;
  std::vector<double> inv_freq_;
  float rope_mscale_ = 1.0f;
  float softmax_scale_ = 1.0f;
};

}  // namespace dserve::engine

#endif  // DSERVE_ENGINE_MODEL_H_
