// engine/model.cc: weight loading and the forward step (MLA attention over
// the paged latent cache, dense and MoE feed-forward layers).
#include "engine/model.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "engine/safetensors.h"
#include "kernels/elementwise.h"

namespace dserve::engine {
namespace {

using kernels::PackedWeight;

// Reads a 2-D weight; `rows`/`cols` are checked against the file.
absl::StatusOr<std::vector<float>> ReadMatrix(const Checkpoint& ckpt, const std::string& name,
                                              int64_t rows, int64_t cols) {
  return ckpt.ReadFloat(name, {rows, cols});
}

absl::StatusOr<std::vector<float>> ReadVector(const Checkpoint& ckpt, const std::string& name,
                                              int64_t n) {
  return ckpt.ReadFloat(name, {n});
}

}  // namespace

// Workspace: per-step activations, sized for the step's T token rows.
struct Model::Workspace {
  int64_t rows = 0;
  std::vector<float> x;         // residual stream [T x hidden]
  std::vector<float> h;         // normed input [T x hidden]
  std::vector<float> qkv_a;     // [T x qkv_a_width]
  std::vector<float> q;         // [T x heads*qk]
  std::vector<float> attn;      // [T x heads*v]
  std::vector<float> cos, sin;  // [T x rope/2], mscale applied
  std::vector<int64_t> pos;     // [T]
};

absl::StatusOr<std::unique_ptr<Model>> Model::Load(const std::string& dir,
                                                   const kernels::MatmulBackend& backend) {
  DSERVE_ASSIGN_OR_RETURN(ModelConfig config, LoadModelConfig(dir));
  DSERVE_ASSIGN_OR_RETURN(auto ckpt, Checkpoint::Open(dir));
  std::unique_ptr<Model> model(new Model(std::move(config), backend));
  DSERVE_RETURN_IF_ERROR(model->LoadWeights(*ckpt));
  return model;
}

absl::Status Model::LoadWeights(const Checkpoint& ckpt) {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, heads = c.num_attention_heads;
  const int64_t nope = c.qk_nope_head_dim, rope = c.qk_rope_head_dim, v = c.v_head_dim;
  const int64_t kv_lora = c.kv_lora_rank;
  inv_freq_ = c.RopeInvFreq();
  rope_mscale_ = static_cast<float>(c.RopeMscale());
  softmax_scale_ = static_cast<float>(c.SoftmaxScale());

  DSERVE_ASSIGN_OR_RETURN(embed_, ReadMatrix(ckpt, "model.embed_tokens.weight", c.vocab_size, H));
  DSERVE_ASSIGN_OR_RETURN(final_norm_, ReadVector(ckpt, "model.norm.weight", H));
  if (c.tie_word_embeddings) {
    lm_head_ = backend_.Pack(embed_.data(), c.vocab_size, H);
  } else {
    DSERVE_ASSIGN_OR_RETURN(auto w, ReadMatrix(ckpt, "lm_head.weight", c.vocab_size, H));
    lm_head_ = backend_.Pack(w.data(), c.vocab_size, H);
  }

  auto load_mlp = [&](const std::string& prefix, int64_t inter,
                      DenseMlpWeights& out) -> absl::Status {
    DSERVE_ASSIGN_OR_RETURN(auto gate, ReadMatrix(ckpt, prefix + "gate_proj.weight", inter, H));
    DSERVE_ASSIGN_OR_RETURN(auto up, ReadMatrix(ckpt, prefix + "up_proj.weight", inter, H));
    DSERVE_ASSIGN_OR_RETURN(auto down, ReadMatrix(ckpt, prefix + "down_proj.weight", H, inter));
    gate.insert(gate.end(), up.begin(), up.end());
    out.intermediate = inter;
    out.gate_up = backend_.Pack(gate.data(), 2 * inter, H);
    out.down = backend_.Pack(down.data(), H, inter);
    return absl::OkStatus();
  };

  std::vector<std::vector<ExpertWeights>> experts(c.num_hidden_layers);
  layers_.resize(c.num_hidden_layers);
  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    LayerWeights& lw = layers_[l];
    const std::string p = absl::StrCat("model.layers.", l, ".");
    const std::string a = p + "self_attn.";
    DSERVE_ASSIGN_OR_RETURN(lw.input_norm, ReadVector(ckpt, p + "input_layernorm.weight", H));
    DSERVE_ASSIGN_OR_RETURN(lw.post_attention_norm,
                            ReadVector(ckpt, p + "post_attention_layernorm.weight", H));
    std::vector<float> qkv_a;
    if (c.q_lora_rank) {
      DSERVE_ASSIGN_OR_RETURN(qkv_a, ReadMatrix(ckpt, a + "q_a_proj.weight", *c.q_lora_rank, H));
      DSERVE_ASSIGN_OR_RETURN(lw.q_a_norm,
                              ReadVector(ckpt, a + "q_a_layernorm.weight", *c.q_lora_rank));
      DSERVE_ASSIGN_OR_RETURN(auto q_b, ReadMatrix(ckpt, a + "q_b_proj.weight",
                                                   heads * c.qk_head_dim(), *c.q_lora_rank));
      lw.q_b = backend_.Pack(q_b.data(), heads * c.qk_head_dim(), *c.q_lora_rank);
    } else {
      DSERVE_ASSIGN_OR_RETURN(qkv_a,
                              ReadMatrix(ckpt, a + "q_proj.weight", heads * c.qk_head_dim(), H));
    }
    DSERVE_ASSIGN_OR_RETURN(auto kv_a,
                            ReadMatrix(ckpt, a + "kv_a_proj_with_mqa.weight", kv_lora + rope, H));
    qkv_a.insert(qkv_a.end(), kv_a.begin(), kv_a.end());
    lw.qkv_a = backend_.Pack(qkv_a.data(), static_cast<int64_t>(qkv_a.size()) / H, H);
    DSERVE_ASSIGN_OR_RETURN(lw.kv_a_norm, ReadVector(ckpt, a + "kv_a_layernorm.weight", kv_lora));
    DSERVE_ASSIGN_OR_RETURN(auto kv_b,
                            ReadMatrix(ckpt, a + "kv_b_proj.weight", heads * (nope + v), kv_lora));
    lw.kv_b = backend_.Pack(kv_b.data(), heads * (nope + v), kv_lora);
    std::vector<float> uk_t(kv_lora * nope);
    for (int64_t hd = 0; hd < heads; ++hd) {
      const float* w = kv_b.data() + hd * (nope + v) * kv_lora;
      for (int64_t d = 0; d < nope; ++d) {
        for (int64_t r = 0; r < kv_lora; ++r) uk_t[r * nope + d] = w[d * kv_lora + r];
      }
      lw.w_uk_t.push_back(backend_.Pack(uk_t.data(), kv_lora, nope));
      lw.w_uv.push_back(backend_.Pack(w + nope * kv_lora, v, kv_lora));
    }
    DSERVE_ASSIGN_OR_RETURN(auto o, ReadMatrix(ckpt, a + "o_proj.weight", H, heads * v));
    lw.o_proj = backend_.Pack(o.data(), H, heads * v);

    lw.is_moe = c.IsMoeLayer(l);
    if (!lw.is_moe) {
      DSERVE_RETURN_IF_ERROR(load_mlp(p + "mlp.", c.intermediate_size, lw.mlp));
      continue;
    }
    DSERVE_ASSIGN_OR_RETURN(auto router,
                            ReadMatrix(ckpt, p + "mlp.gate.weight", c.n_routed_experts, H));
    lw.router = backend_.Pack(router.data(), c.n_routed_experts, H);
    const std::string bias_name = p + "mlp.gate.e_score_correction_bias";
    if (c.topk_method == TopkMethod::kNoauxTc) {
      DSERVE_ASSIGN_OR_RETURN(lw.correction_bias, ReadVector(ckpt, bias_name, c.n_routed_experts));
    }
    if (c.n_shared_experts > 0) {
      DSERVE_RETURN_IF_ERROR(load_mlp(p + "mlp.shared_experts.",
                                      c.moe_intermediate_size * c.n_shared_experts, lw.mlp));
    }
    experts[l].resize(c.n_routed_experts);
    for (int64_t e = 0; e < c.n_routed_experts; ++e) {
      DenseMlpWeights ew;
      DSERVE_RETURN_IF_ERROR(
          load_mlp(absl::StrCat(p, "mlp.experts.", e, "."), c.moe_intermediate_size, ew));
      experts[l][e].gate_up = std::move(ew.gate_up);
      experts[l][e].down = std::move(ew.down);
    }
  }
  auto local = std::make_shared<LocalRoutedExperts>(backend_, H, c.moe_intermediate_size,
                                                    std::move(experts));
  expert_bytes_ = local->ExpertBytes();
  experts_ = std::move(local);
  return absl::OkStatus();
}

int64_t Model::DenseWeightBytes() const {
  int64_t bytes = lm_head_->bytes() + static_cast<int64_t>(final_norm_.size() * sizeof(float));
  for (const LayerWeights& lw : layers_) {
    bytes += lw.qkv_a->bytes() + lw.kv_b->bytes() + lw.o_proj->bytes();
    if (lw.q_b) bytes += lw.q_b->bytes();
    if (lw.mlp.gate_up) bytes += lw.mlp.gate_up->bytes() + lw.mlp.down->bytes();
    if (lw.router) bytes += lw.router->bytes();
    bytes += static_cast<int64_t>((lw.input_norm.size() + lw.post_attention_norm.size() +
                                   lw.q_a_norm.size() + lw.kv_a_norm.size()) *
                                  sizeof(float));
  }
  return bytes;
}

int64_t Model::TotalWeightBytes() const {
  int64_t moe_layers = 0;
  for (const LayerWeights& lw : layers_) moe_layers += lw.is_moe;
  return DenseWeightBytes() + moe_layers * config_.n_routed_experts * expert_bytes_ +
         static_cast<int64_t>(embed_.size() * sizeof(float));
}

void Model::Attention(const LayerWeights& lw, int64_t layer, std::span<const ModelChunk> chunks,
                      const std::vector<int64_t>& chunk_row, Workspace& ws, KvBlockPool& pool,
                      AttentionPath path) const {
  const ModelConfig& c = config_;
  const int64_t heads = c.num_attention_heads, nope = c.qk_nope_head_dim;
  const int64_t rope = c.qk_rope_head_dim, v = c.v_head_dim, kv_lora = c.kv_lora_rank;
  const int64_t qk = c.qk_head_dim();
  const int64_t bt = pool.layout().block_tokens;
  const float scale = softmax_scale_;

  std::vector<int64_t> absorbed_rows;  // token rows of chunks using the absorbed form
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const ModelChunk& ch = chunks[ci];
    const int64_t n = static_cast<int64_t>(ch.tokens.size());
    const bool absorbed =
        path == AttentionPath::kAbsorbed || (path == AttentionPath::kAuto && n == 1);
    if (absorbed) {
      for (int64_t i = 0; i < n; ++i) absorbed_rows.push_back(chunk_row[ci] + i);
      continue;
    }
    // Expanded form: decompress keys and values of the whole context.
    const int64_t ctx = ch.start_pos + n;
    std::vector<float> latent(ctx * kv_lora), kpe(ctx * rope);
    for (int64_t t = 0; t < ctx; ++t) {
      const float* slot = pool.Slot(layer, ch.block_table->BlockOf(t, bt), t % bt);
      std::copy_n(slot, kv_lora, latent.data() + t * kv_lora);
      std::copy_n(slot + kv_lora, rope, kpe.data() + t * rope);
    }
    std::vector<float> kv(ctx * heads * (nope + v));
    backend_.Matmul(latent.data(), ctx, kv_lora, *lw.kv_b, kv.data(), heads * (nope + v), false);
    std::vector<float> scores(n * ctx);
    const float* q0 = ws.q.data() + chunk_row[ci] * heads * qk;
    float* out0 = ws.attn.data() + chunk_row[ci] * heads * v;
    for (int64_t hd = 0; hd < heads; ++hd) {
      const float* qh = q0 + hd * qk;
      kernels::Gemm(false, true, n, ctx, nope, scale, qh, heads * qk, kv.data() + hd * (nope + v),
                    heads * (nope + v), 0.0f, scores.data(), ctx);
      kernels::Gemm(false, true, n, ctx, rope, scale, qh + nope, heads * qk, kpe.data(), rope, 1.0f,
                    scores.data(), ctx);
      for (int64_t i = 0; i < n; ++i) {
        float* row = scores.data() + i * ctx;
        const int64_t visible = ch.start_pos + i + 1;
        std::fill(row + visible, row + ctx, -std::numeric_limits<float>::infinity());
        kernels::SoftmaxInPlace(row, ctx);
      }
      kernels::Gemm(false, false, n, v, ctx, 1.0f, scores.data(), ctx,
                    kv.data() + hd * (nope + v) + nope, heads * (nope + v), 0.0f, out0 + hd * v,
                    heads * v);
    }
  }
  if (absorbed_rows.empty()) return;

  // Absorbed form, batched over the rows: q_nope is folded into the latent
  // space with W_UK, scores are taken against the cached latent directly,
  // and the attended latent is lifted to values with W_UV.
  const int64_t m = static_cast<int64_t>(absorbed_rows.size());
  std::vector<float> q_nope(m * nope), q_abs(m * heads * kv_lora), lat(m * heads * kv_lora);
  std::vector<float> out_h(m * v);
  for (int64_t hd = 0; hd < heads; ++hd) {
    for (int64_t r = 0; r < m; ++r) {
      std::copy_n(ws.q.data() + absorbed_rows[r] * heads * qk + hd * qk, nope,
                  q_nope.data() + r * nope);
    }
    backend_.Matmul(q_nope.data(), m, nope, *lw.w_uk_t[hd], q_abs.data() + hd * kv_lora,
                    heads * kv_lora, false);
  }
  std::vector<float> scores;
  // Rows map back to (chunk, position) to find their context.
  int64_t r = 0;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const ModelChunk& ch = chunks[ci];
    const int64_t n = static_cast<int64_t>(ch.tokens.size());
    if (r >= m || absorbed_rows[r] != chunk_row[ci]) continue;
    for (int64_t i = 0; i < n; ++i, ++r) {
      const int64_t row = absorbed_rows[r];
      const int64_t ctx = ch.start_pos + i + 1;
      scores.assign(heads * ctx, 0.0f);
      const float* qa = q_abs.data() + r * heads * kv_lora;
      const float* qrow = ws.q.data() + row * heads * qk;
      for (int64_t t = 0; t < ctx; ++t) {
        const float* slot = pool.Slot(layer, ch.block_table->BlockOf(t, bt), t % bt);
        for (int64_t hd = 0; hd < heads; ++hd) {
          scores[hd * ctx + t] =
              scale * (kernels::Dot(qa + hd * kv_lora, slot, kv_lora) +
                       kernels::Dot(qrow + hd * qk + nope, slot + kv_lora, rope));
        }
      }
      float* l = lat.data() + r * heads * kv_lora;
      std::fill_n(l, heads * kv_lora, 0.0f);
      for (int64_t hd = 0; hd < heads; ++hd) kernels::SoftmaxInPlace(&scores[hd * ctx], ctx);
      for (int64_t t = 0; t < ctx; ++t) {
        const float* slot = pool.Slot(layer, ch.block_table->BlockOf(t, bt), t % bt);
        for (int64_t hd = 0; hd < heads; ++hd) {
          kernels::Axpy(scores[hd * ctx + t], slot, l + hd * kv_lora, kv_lora);
        }
      }
    }
  }
  for (int64_t hd = 0; hd < heads; ++hd) {
    backend_.Matmul(lat.data() + hd * kv_lora, m, heads * kv_lora, *lw.w_uv[hd], out_h.data(), v,
                    false);
    for (int64_t i = 0; i < m; ++i) {
      std::copy_n(out_h.data() + i * v, v, ws.attn.data() + absorbed_rows[i] * heads * v + hd * v);
    }
  }
}

absl::StatusOr<std::vector<float>> Model::Forward(std::span<const ModelChunk> chunks,
                                                  KvBlockPool& pool, AttentionPath path,
                                                  const LayerDone& layer_done) const {
  const ModelConfig& c = config_;
  const int64_t H = c.hidden_size, heads = c.num_attention_heads;
  const int64_t rope = c.qk_rope_head_dim, kv_lora = c.kv_lora_rank, qk = c.qk_head_dim();
  const int64_t bt = pool.layout().block_tokens;
  if (pool.layout().token_width != c.kv_cache_width() ||
      pool.layout().num_layers != c.num_hidden_layers) {
    return absl::InvalidArgumentError(
        absl::StrCat("KV pool layout (", pool.layout().num_layers, " layers x ",
                     pool.layout().token_width, " values) does not match the model (",
                     c.num_hidden_layers, " x ", c.kv_cache_width(), ")"));
  }

  // Validate and lay out rows.
  Workspace ws;
  std::vector<int64_t> chunk_row(chunks.size());
  int64_t logit_rows = 0;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const ModelChunk& ch = chunks[ci];
    const int64_t n = static_cast<int64_t>(ch.tokens.size());
    if (n == 0) return absl::InvalidArgumentError(absl::StrCat("chunk ", ci, " has no tokens"));
    if (ch.block_table == nullptr || ch.block_table->capacity_tokens(bt) < ch.start_pos + n) {
      return absl::InvalidArgumentError(absl::StrCat(
          "chunk ", ci, ": block table holds fewer than ", ch.start_pos + n, " tokens"));
    }
    if (ch.start_pos < 0 || ch.start_pos + n > c.max_position_embeddings) {
      return absl::InvalidArgumentError(
          absl::StrCat("chunk ", ci, ": positions [", ch.start_pos, ", ", ch.start_pos + n,
                       ") exceed max_position_embeddings ", c.max_position_embeddings));
    }
    for (TokenId t : ch.tokens) {
      if (t < 0 || t >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrCat("token id ", t, " outside [0, vocab_size=", c.vocab_size, ")"));
      }
    }
    chunk_row[ci] = ws.rows;
    ws.rows += n;
    logit_rows += ch.logits == LogitsMode::kAll ? n : ch.logits == LogitsMode::kLast ? 1 : 0;
  }
  const int64_t T = ws.rows;
  ws.x.resize(T * H);
  ws.h.resize(T * H);
  ws.pos.resize(T);
  ws.cos.resize(T * rope / 2);
  ws.sin.resize(T * rope / 2);
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    for (size_t i = 0; i < chunks[ci].tokens.size(); ++i) {
      const int64_t row = chunk_row[ci] + static_cast<int64_t>(i);
      std::copy_n(embed_.data() + chunks[ci].tokens[i] * H, H, ws.x.data() + row * H);
      ws.pos[row] = chunks[ci].start_pos + static_cast<int64_t>(i);
      for (int64_t f = 0; f < rope / 2; ++f) {
        const double angle = static_cast<double>(ws.pos[row]) * inv_freq_[f];
        ws.cos[row * rope / 2 + f] = static_cast<float>(std::cos(angle)) * rope_mscale_;
        ws.sin[row * rope / 2 + f] = static_cast<float>(std::sin(angle)) * rope_mscale_;
      }
    }
  }
  auto apply_rope = [&](float* vec, int64_t row) {
    const float* cs = ws.cos.data() + row * rope / 2;
    const float* sn = ws.sin.data() + row * rope / 2;
    for (int64_t f = 0; f < rope / 2; ++f) {
      const float a = vec[2 * f], b = vec[2 * f + 1];
      vec[2 * f] = a * cs[f] - b * sn[f];
      vec[2 * f + 1] = a * sn[f] + b * cs[f];
    }
  };

  const int64_t q_width = c.q_lora_rank ? *c.q_lora_rank : heads * qk;
  const int64_t qkv_width = q_width + kv_lora + rope;
  ws.qkv_a.resize(T * qkv_width);
  ws.q.resize(T * heads * qk);
  ws.attn.resize(T * heads * c.v_head_dim);
  std::vector<float> ffn_a, ffn_b, routed, router_logits;
  std::vector<ExpertChoice> choices;
  const float eps = static_cast<float>(c.rms_norm_eps);

  for (int64_t l = 0; l < c.num_hidden_layers; ++l) {
    const LayerWeights& lw = layers_[l];
    // --- attention ---
    kernels::RmsNorm(ws.x.data(), T, H, H, lw.input_norm.data(), eps, ws.h.data(), H);
    backend_.Matmul(ws.h.data(), T, H, *lw.qkv_a, ws.qkv_a.data(), qkv_width, false);
    if (c.q_lora_rank) {
      kernels::RmsNorm(ws.qkv_a.data(), T, q_width, qkv_width, lw.q_a_norm.data(), eps,
                       ws.qkv_a.data(), qkv_width);
      backend_.Matmul(ws.qkv_a.data(), T, qkv_width, *lw.q_b, ws.q.data(), heads * qk, false);
    } else {
      for (int64_t row = 0; row < T; ++row) {
        std::copy_n(ws.qkv_a.data() + row * qkv_width, heads * qk, ws.q.data() + row * heads * qk);
      }
    }
    // Normalize the latent, rotate k_pe, and store both in the cache.
    kernels::RmsNorm(ws.qkv_a.data() + q_width, T, kv_lora, qkv_width, lw.kv_a_norm.data(), eps,
                     ws.qkv_a.data() + q_width, qkv_width);
    for (size_t ci = 0; ci < chunks.size(); ++ci) {
      const ModelChunk& ch = chunks[ci];
      for (size_t i = 0; i < ch.tokens.size(); ++i) {
        const int64_t row = chunk_row[ci] + static_cast<int64_t>(i);
        float* kva = ws.qkv_a.data() + row * qkv_width + q_width;
        apply_rope(kva + kv_lora, row);
        const int64_t p = ws.pos[row];
        std::copy_n(kva, kv_lora + rope, pool.Slot(l, ch.block_table->BlockOf(p, bt), p % bt));
        for (int64_t hd = 0; hd < heads; ++hd) {
          apply_rope(ws.q.data() + row * heads * qk + hd * qk + c.qk_nope_head_dim, row);
        }
      }
    }
    Attention(lw, l, chunks, chunk_row, ws, pool, path);
    backend_.Matmul(ws.attn.data(), T, heads * c.v_head_dim, *lw.o_proj, ws.x.data(), H, true);

    // --- feed-forward ---
    kernels::RmsNorm(ws.x.data(), T, H, H, lw.post_attention_norm.data(), eps, ws.h.data(), H);
    const DenseMlpWeights& mlp = lw.mlp;
    if (lw.is_moe) {
      const int64_t k = c.num_experts_per_tok;
      router_logits.resize(T * c.n_routed_experts);
      backend_.Matmul(ws.h.data(), T, H, *lw.router, router_logits.data(), c.n_routed_experts,
                      false);
      choices.resize(T * k);
      RouteTokens(c, router_logits.data(), lw.correction_bias, T, choices.data());
      routed.resize(T * H);
      DSERVE_RETURN_IF_ERROR(experts_->Forward(l, ws.h.data(), T, choices, k, routed.data()));
    }
    if (mlp.gate_up) {
      const int64_t inter = mlp.intermediate;
      ffn_a.resize(T * 2 * inter);
      backend_.Matmul(ws.h.data(), T, H, *mlp.gate_up, ffn_a.data(), 2 * inter, false);
      ffn_b.resize(T * inter);
      for (int64_t row = 0; row < T; ++row) {
        const float* g = ffn_a.data() + row * 2 * inter;
        kernels::SiluMul(g, g + inter, inter, ffn_b.data() + row * inter);
      }
      if (lw.is_moe) {
        // y = routed + shared, then the residual add (the reference order).
        backend_.Matmul(ffn_b.data(), T, inter, *mlp.down, routed.data(), H, true);
      } else {
        backend_.Matmul(ffn_b.data(), T, inter, *mlp.down, ws.x.data(), H, true);
      }
    }
    if (lw.is_moe) kernels::Axpy(1.0f, routed.data(), ws.x.data(), T * H);
    if (layer_done) layer_done(l);
  }

  // --- final norm and lm_head on the rows that want logits ---
  std::vector<float> normed(logit_rows * H);
  int64_t out_row = 0;
  for (size_t ci = 0; ci < chunks.size(); ++ci) {
    const ModelChunk& ch = chunks[ci];
    const int64_t n = static_cast<int64_t>(ch.tokens.size());
    int64_t first = ch.logits == LogitsMode::kAll ? 0 : n - 1;
    if (ch.logits == LogitsMode::kNone) continue;
    for (int64_t i = first; i < n; ++i, ++out_row) {
      kernels::RmsNorm(ws.x.data() + (chunk_row[ci] + i) * H, 1, H, H, final_norm_.data(), eps,
                       normed.data() + out_row * H, H);
    }
  }
  std::vector<float> logits(logit_rows * c.vocab_size);
  backend_.Matmul(normed.data(), logit_rows, H, *lm_head_, logits.data(), c.vocab_size, false);
  return logits;
}

}  // namespace dserve::engine
