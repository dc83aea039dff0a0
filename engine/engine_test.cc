// engine/engine_test.cc: the step API, stop conditions, exact KV accounting,
// and batch invariance: a request's tokens do not depend on its batch.
#include "engine/engine.h"

#include <random>

#include "base/status_matchers.h"
#include "engine/test_models.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dserve::engine {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::HasSubstr;

class EngineTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() { dir_ = new std::string(testing::WriteTinyModel("engine", 4)); }
  static void TearDownTestSuite() { delete dir_; }
  std::unique_ptr<Engine> Make(EngineOptions o = {}) {
    auto e = Engine::Load(*dir_, o);
    EXPECT_OK(e.status());
    return std::move(e).value();
  }
  static std::string* dir_;
};
std::string* EngineTest::dir_ = nullptr;

std::vector<GenerationRequest> MixedRequests(int n) {
  std::mt19937 rng(99);
  std::vector<GenerationRequest> reqs(n);
  for (int i = 0; i < n; ++i) {
    GenerationRequest& r = reqs[i];
    r.prompt.resize(1 + rng() % 70);
    for (TokenId& t : r.prompt) t = static_cast<TokenId>(rng() % 256);
    r.sampling.seed = 1000 + i;
    r.sampling.max_tokens = 1 + rng() % 40;
    r.sampling.ignore_eos = true;
    switch (i % 4) {
      case 0:
        r.sampling.temperature = 0;
        break;
      case 1:
        r.sampling.temperature = 0.8f;
        r.sampling.top_p = 0.9f;
        break;
      case 2:
        r.sampling.top_k = 20;
        r.sampling.repetition_penalty = 1.2f;
        break;
      case 3:
        r.sampling.min_p = 0.05f;
        r.sampling.frequency_penalty = 0.5f;
        break;
    }
  }
  return reqs;
}

TEST_F(EngineTest, BatchOf16EqualsEachAlone) {
  const auto reqs = MixedRequests(16);
  EngineOptions o;
  o.max_step_tokens = 48;  // forces chunked prefill mixed with decodes
  auto batched = Make(o);
  ASSERT_OK_AND_ASSIGN(auto together, batched->Generate(reqs));
  EXPECT_EQ(batched->pool().num_used(), 0);
  for (size_t i = 0; i < reqs.size(); ++i) {
    auto solo = Make();
    ASSERT_OK_AND_ASSIGN(auto alone, solo->Generate({reqs[i]}));
    EXPECT_EQ(together[i].output, alone[0].output) << "request " << i;
    EXPECT_EQ(together[i].output.size(), static_cast<size_t>(reqs[i].sampling.max_tokens));
    EXPECT_EQ(together[i].finish, FinishReason::kLength);
  }
}

TEST_F(EngineTest, StepApiMixedBatchAndAccounting) {
  auto e = Make({.kv_block_tokens = 8, .kv_cache_tokens = 256});
  GenerationRequest r;
  r.prompt = {256, 10, 20, 30, 40, 50, 60, 70, 80, 90};
  r.sampling.temperature = 0;
  r.sampling.max_tokens = 3;
  r.sampling.ignore_eos = true;
  ASSERT_OK_AND_ASSIGN(SequenceId a, e->AddSequence(r));
  ASSERT_OK_AND_ASSIGN(SequenceId b, e->AddSequence(r));
  // a: prefill 4 of 10 (no sample); b: whole prompt (samples).
  std::vector<StepItem> step1 = {{a, 4}, {b, 10}};
  ASSERT_OK_AND_ASSIGN(auto o1, e->Step(step1));
  EXPECT_EQ(o1.tokens_computed, 14);
  ASSERT_EQ(o1.sampled.size(), 1u);
  EXPECT_EQ(o1.sampled[0].first, b);
  EXPECT_EQ(e->pool().num_used(), 1 + 2);
  // a: the rest of its prompt; b: its first decode token.
  std::vector<StepItem> step2 = {{a, 6}, {b, 1}};
  ASSERT_OK_AND_ASSIGN(auto o2, e->Step(step2));
  ASSERT_EQ(o2.sampled.size(), 2u);
  // Same prompt, same seed, greedy: a's first token equals b's.
  EXPECT_EQ(o2.sampled[0].second, o1.sampled[0].second);
  std::vector<StepItem> bad = {{a, 5}};
  EXPECT_THAT(e->Step(bad), StatusIs(absl::StatusCode::kInvalidArgument,
                                     HasSubstr("num_tokens 5 outside [1, 1]")));
  std::vector<StepItem> twice = {{a, 1}, {a, 1}};
  EXPECT_THAT(e->Step(twice),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("appears twice")));
  std::vector<StepItem> unknown = {{12345, 1}};
  EXPECT_THAT(e->Step(unknown), StatusIs(absl::StatusCode::kNotFound));
  ASSERT_OK(e->Release(a));
  ASSERT_OK(e->Release(b));
  EXPECT_EQ(e->pool().num_used(), 0);
  EXPECT_EQ(e->num_sequences(), 0);
}

TEST_F(EngineTest, StopTokenAndMaxTokens) {
  auto e = Make();
  GenerationRequest r;
  r.prompt = {256, 1, 2, 3};
  r.sampling.temperature = 0;
  r.sampling.max_tokens = 20;
  r.sampling.ignore_eos = true;
  ASSERT_OK_AND_ASSIGN(auto free_run, e->Generate({r}));
  ASSERT_EQ(free_run[0].output.size(), 20u);
  // Stop at the 5th token's id: output ends at its first occurrence.
  const TokenId stop = free_run[0].output[4];
  r.sampling.stop_token_ids = {stop};
  ASSERT_OK_AND_ASSIGN(auto stopped, e->Generate({r}));
  const auto first = std::find(free_run[0].output.begin(), free_run[0].output.end(), stop);
  EXPECT_EQ(stopped[0].output, std::vector<TokenId>(free_run[0].output.begin(), first + 1));
  EXPECT_EQ(stopped[0].finish, FinishReason::kStop);
  EXPECT_EQ(e->pool().num_used(), 0);
}

TEST_F(EngineTest, LongGenerationStaysFinite) {
  auto e = Make();
  GenerationRequest r;
  r.prompt = {256, 65, 66};
  r.sampling.max_tokens = 1500;
  r.sampling.ignore_eos = true;
  r.sampling.seed = 3;
  ASSERT_OK_AND_ASSIGN(SequenceId id, e->AddSequence(r));
  std::vector<StepItem> prefill = {{id, 3}};
  ASSERT_OK(e->Step(prefill).status());
  for (int i = 1; i < 1500; ++i) {
    std::vector<StepItem> decode = {{id, 1}};
    ASSERT_OK(e->Step(decode).status());
    if (i % 250 == 0 || i == 1499) {
      for (float x : e->last_logits()) ASSERT_TRUE(std::isfinite(x)) << "step " << i;
    }
  }
  EXPECT_EQ(e->Find(id)->output().size(), 1500u);
  EXPECT_EQ(e->Find(id)->finish, FinishReason::kLength);
}

TEST_F(EngineTest, BadRequestsAreRefusedBeforeRunning) {
  auto e = Make({.kv_block_tokens = 16, .kv_cache_tokens = 64});
  GenerationRequest empty;
  EXPECT_THAT(e->Generate({empty}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("request 0: prompt")));
  GenerationRequest bad_token;
  bad_token.prompt = {1, 2, 5000};
  EXPECT_THAT(e->Generate({bad_token}), StatusIs(absl::StatusCode::kInvalidArgument,
                                                 HasSubstr("prompt token 2 has id 5000")));
  GenerationRequest bad_param;
  bad_param.prompt = {1};
  bad_param.sampling.top_p = 2;
  EXPECT_THAT(e->Generate({bad_param}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("top_p")));
  GenerationRequest too_long;
  too_long.prompt.assign(50, 1);
  too_long.sampling.max_tokens = 100;
  EXPECT_THAT(e->Generate({too_long}),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("150 tokens")));
  GenerationRequest over_limit;
  over_limit.prompt.assign(e->config().max_position_embeddings, 1);
  EXPECT_THAT(e->AddSequence(over_limit).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_position_embeddings")));
  EXPECT_EQ(e->num_sequences(), 0);
  EXPECT_EQ(e->pool().num_used(), 0);
  EXPECT_THAT(Engine::Load(*dir_, {.matmul_backend = "gpu9000"}).status(),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("gpu9000")));
}

// Disaggregation at the engine level: one engine runs the prompt, its KV is
// copied into blocks of a second engine (with another block size, from
// caller-provided memory), which adopts the sequence and decodes. The tokens
// equal a single engine's for every request, and layer_done fires per layer.
TEST_F(EngineTest, AdoptedSequenceDecodesLikeOneEngine) {
  const std::vector<GenerationRequest> reqs = MixedRequests(8);
  auto reference = Make()->Generate(reqs);
  ASSERT_OK(reference.status());

  auto prefill = Make({.kv_block_tokens = 16});
  std::vector<uint8_t> decode_memory;
  EngineOptions decode_options{.kv_block_tokens = 64};
  decode_options.kv_memory = [&](int64_t bytes) -> absl::StatusOr<uint8_t*> {
    decode_memory.assign(bytes, 0);
    return decode_memory.data();
  };
  auto decode = Make(decode_options);
  ASSERT_EQ(decode->pool().data(), reinterpret_cast<float*>(decode_memory.data()));
  const KvCacheLayout& pl = prefill->pool().layout();
  const KvCacheLayout& dl = decode->pool().layout();
  const int64_t free_at_start = decode->pool().num_free();

  for (size_t r = 0; r < reqs.size(); ++r) {
    SCOPED_TRACE(r);
    ASSERT_OK_AND_ASSIGN(SequenceId p, prefill->AddSequence(reqs[r]));
    const int64_t n = static_cast<int64_t>(reqs[r].prompt.size());
    std::vector<int64_t> layers;
    const StepItem item{p, n};
    ASSERT_OK_AND_ASSIGN(StepOutcome out, prefill->Step(std::span(&item, 1), [&](int64_t l) {
      layers.push_back(l);
    }));
    ASSERT_EQ(layers.size(), static_cast<size_t>(pl.num_layers));
    for (int64_t l = 0; l < pl.num_layers; ++l) EXPECT_EQ(layers[l], l);
    ASSERT_EQ(out.sampled.size(), 1u);
    ASSERT_EQ(out.logprobs.size(), 1u);
    EXPECT_LE(out.logprobs[0], 0.0f);
    EXPECT_EQ(out.sampled[0].second, (*reference)[r].output[0]);

    ASSERT_OK_AND_ASSIGN(auto blocks,
                         decode->mutable_pool().Allocate((n + dl.block_tokens - 1) / dl.block_tokens));
    const Sequence& ps = *prefill->Find(p);
    for (int64_t l = 0; l < pl.num_layers; ++l) {
      for (int64_t t = 0; t < n; ++t) {
        std::copy_n(prefill->pool().Slot(l, ps.blocks.BlockOf(t, pl.block_tokens), t % pl.block_tokens),
                    pl.token_width,
                    decode->mutable_pool().Slot(l, blocks[t / dl.block_tokens], t % dl.block_tokens));
      }
    }
    ASSERT_OK_AND_ASSIGN(SequenceId d, decode->AdoptSequence(reqs[r], blocks, out.sampled[0].second));
    ASSERT_OK(prefill->Release(p));
    while (decode->Find(d)->finish == FinishReason::kNone) {
      const StepItem next{d, 1};
      ASSERT_OK(decode->Step(std::span(&next, 1)).status());
    }
    const auto output = decode->Find(d)->output();
    EXPECT_EQ(std::vector<TokenId>(output.begin(), output.end()), (*reference)[r].output);
    EXPECT_EQ(decode->Find(d)->finish, (*reference)[r].finish);
    ASSERT_OK(decode->Release(d));
  }
  EXPECT_EQ(decode->pool().num_free(), free_at_start);
  EXPECT_EQ(prefill->pool().num_free(), prefill->pool().num_blocks());
}

TEST_F(EngineTest, AdoptSequenceRefusesBlocksThatCannotHoldThePrompt) {
  auto e = Make();
  GenerationRequest req;
  req.prompt.assign(40, 7);
  ASSERT_OK_AND_ASSIGN(auto blocks, e->mutable_pool().Allocate(2));  // 32 tokens
  EXPECT_THAT(e->AdoptSequence(req, blocks, 1), StatusIs(absl::StatusCode::kInvalidArgument,
                                                          HasSubstr("40-token prompt")));
  ASSERT_OK_AND_ASSIGN(auto more, e->mutable_pool().Allocate(1));
  blocks.push_back(more[0]);
  EXPECT_THAT(e->AdoptSequence(req, blocks, -3),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("first_token")));
  // A max_tokens of 1 is finished on adoption.
  req.sampling.max_tokens = 1;
  ASSERT_OK_AND_ASSIGN(SequenceId id, e->AdoptSequence(req, blocks, 5));
  EXPECT_EQ(e->Find(id)->finish, FinishReason::kLength);
  ASSERT_OK(e->Release(id));
  EXPECT_EQ(e->pool().num_free(), e->pool().num_blocks());
}

}  // namespace
}  // namespace dserve::engine
