// router/request_front_test.cc: request validation and resolution on the
// tiny model's byte-level tokenizer (id == byte value, bos 256, eos 257,
// <｜User｜> 258, <｜Assistant｜> 259), and stop-string streaming.
#include "router/request_front.h"

#include <memory>
#include <string>
#include <vector>

#include "base/status_matchers.h"
#include "engine/model_init.h"
#include "engine/test_models.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dserve::router {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr int32_t kBos = 256;
constexpr int32_t kEos = 257;
constexpr int32_t kUser = 258;
constexpr int32_t kAssistant = 259;
constexpr int64_t kVocab = 384;
constexpr int64_t kContext = 64;

class RequestFrontTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    const std::string dir = engine::testing::FreshDir("router-front");
    ASSERT_OK(engine::WriteByteLevelTokenizer(dir, kVocab));
    auto tok = tokenizer::Tokenizer::Load(dir);
    ASSERT_OK(tok.status());
    tokenizer_ = std::move(tok).value().release();
  }
  static void TearDownTestSuite() {
    delete tokenizer_;
    tokenizer_ = nullptr;
  }

  RequestFront Front(int32_t default_max_tokens = 256) const {
    FrontOptions options;
    options.default_max_tokens = default_max_tokens;
    return RequestFront(tokenizer_, ModelLimits{kVocab, kContext, {kEos}}, options);
  }

  static v1::GenerateRequest Text(const std::string& text) {
    v1::GenerateRequest r;
    r.set_text(text);
    return r;
  }

  static std::vector<int32_t> Bytes(const std::string& s) {
    std::vector<int32_t> out;
    for (unsigned char c : s) out.push_back(c);
    return out;
  }

  static tokenizer::Tokenizer* tokenizer_;
};

tokenizer::Tokenizer* RequestFrontTest::tokenizer_ = nullptr;

TEST_F(RequestFrontTest, TextIsEncodedWithBos) {
  ASSERT_OK_AND_ASSIGN(RequestPlan plan, Front().Plan(Text("hi!"), 7));
  EXPECT_THAT(plan.prompt, ElementsAre(kBos, 'h', 'i', '!'));
}

TEST_F(RequestFrontTest, ChatTemplateWritesBosOnce) {
  v1::GenerateRequest r;
  auto* sys = r.mutable_chat()->add_messages();
  sys->set_role("system");
  sys->set_content("S");
  auto* user = r.mutable_chat()->add_messages();
  user->set_role("user");
  user->set_content("hi");
  ASSERT_OK_AND_ASSIGN(RequestPlan plan, Front().Plan(r, 7));
  EXPECT_THAT(plan.prompt, ElementsAre(kBos, 'S', kUser, 'h', 'i', kAssistant));

  r.mutable_chat()->set_add_generation_prompt(false);
  ASSERT_OK_AND_ASSIGN(plan, Front().Plan(r, 7));
  EXPECT_THAT(plan.prompt, ElementsAre(kBos, 'S', kUser, 'h', 'i'));
}

TEST_F(RequestFrontTest, TokenIdsPassThrough) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(1);
  r.mutable_token_ids()->add_ids(kVocab - 1);
  ASSERT_OK_AND_ASSIGN(RequestPlan plan, Front().Plan(r, 7));
  EXPECT_THAT(plan.prompt, ElementsAre(1, kVocab - 1));
}

TEST_F(RequestFrontTest, ResolvesDefaults) {
  ASSERT_OK_AND_ASSIGN(RequestPlan plan, Front(10).Plan(Text("hello"), 1234));
  const internal::v1::Sampling& s = plan.sampling;
  EXPECT_EQ(s.temperature(), 1.0f);
  EXPECT_EQ(s.top_p(), 1.0f);
  EXPECT_EQ(s.top_k(), 0);
  EXPECT_EQ(s.min_p(), 0.0f);
  EXPECT_EQ(s.repetition_penalty(), 1.0f);
  EXPECT_EQ(s.presence_penalty(), 0.0f);
  EXPECT_EQ(s.frequency_penalty(), 0.0f);
  EXPECT_EQ(s.seed(), 1234u);
  EXPECT_EQ(s.max_tokens(), 10);
  EXPECT_FALSE(s.ignore_eos());
  EXPECT_FALSE(s.logprobs());
}

TEST_F(RequestFrontTest, KeepsExplicitValues) {
  v1::GenerateRequest r = Text("hello");
  r.mutable_sampling()->set_temperature(0);
  r.mutable_sampling()->set_top_p(0.5f);
  r.mutable_sampling()->set_top_k(5);
  r.mutable_sampling()->set_min_p(0.1f);
  r.mutable_sampling()->set_repetition_penalty(1.2f);
  r.mutable_sampling()->set_presence_penalty(-2);
  r.mutable_sampling()->set_frequency_penalty(2);
  r.mutable_sampling()->set_seed(99);
  r.set_max_tokens(3);
  r.add_stop_token_ids(42);
  r.add_stop("END");
  r.set_ignore_eos(true);
  r.set_logprobs(true);
  r.set_priority(4);
  r.set_output_length_hint(30);
  r.set_request_id("abc");
  ASSERT_OK_AND_ASSIGN(RequestPlan plan, Front().Plan(r, 1234));
  const internal::v1::Sampling& s = plan.sampling;
  EXPECT_EQ(s.temperature(), 0.0f);
  EXPECT_EQ(s.top_p(), 0.5f);
  EXPECT_EQ(s.top_k(), 5);
  EXPECT_EQ(s.min_p(), 0.1f);
  EXPECT_EQ(s.repetition_penalty(), 1.2f);
  EXPECT_EQ(s.presence_penalty(), -2.0f);
  EXPECT_EQ(s.frequency_penalty(), 2.0f);
  EXPECT_EQ(s.seed(), 99u);
  EXPECT_EQ(s.max_tokens(), 3);
  EXPECT_THAT(s.stop_token_ids(), ElementsAre(42));
  EXPECT_TRUE(s.ignore_eos());
  EXPECT_TRUE(s.logprobs());
  EXPECT_THAT(plan.stop, ElementsAre("END"));
  EXPECT_EQ(plan.priority, 4);
  EXPECT_EQ(plan.output_length_hint, 30);
  EXPECT_EQ(plan.request_id, "abc");
}

TEST_F(RequestFrontTest, DefaultMaxTokensIsCappedByTheContext) {
  // 1 + 10 prompt tokens leave 53 of 64.
  ASSERT_OK_AND_ASSIGN(RequestPlan plan, Front(256).Plan(Text("0123456789"), 1));
  EXPECT_EQ(plan.sampling.max_tokens(), kContext - 11);
}

TEST_F(RequestFrontTest, RejectsMissingOrEmptyPrompt) {
  EXPECT_THAT(Front().Plan(v1::GenerateRequest(), 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prompt")));
  EXPECT_THAT(Front().Plan(Text(""), 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prompt is empty")));
  v1::GenerateRequest ids;
  ids.mutable_token_ids();
  EXPECT_THAT(Front().Plan(ids, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prompt is empty")));
  v1::GenerateRequest chat;
  chat.mutable_chat();
  EXPECT_THAT(Front().Plan(chat, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prompt is empty")));
}

TEST_F(RequestFrontTest, RejectsPromptLongerThanContext) {
  EXPECT_THAT(Front().Plan(Text(std::string(80, 'a')), 1),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("prompt: 81 tokens exceeds the model context of 64")));
  // A prompt that fills the context leaves no room for one output token.
  EXPECT_THAT(Front().Plan(Text(std::string(63, 'a')), 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prompt: 64 tokens")));
}

TEST_F(RequestFrontTest, RejectsTokenIdsOutsideTheVocabulary) {
  v1::GenerateRequest r;
  r.mutable_token_ids()->add_ids(5);
  r.mutable_token_ids()->add_ids(kVocab);
  EXPECT_THAT(Front().Plan(r, 1),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("prompt.token_ids[1] = 384 is outside the vocabulary [0, 384)")));
  r.mutable_token_ids()->set_ids(1, -1);
  EXPECT_THAT(Front().Plan(r, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("prompt.token_ids[1]")));
}

TEST_F(RequestFrontTest, RejectsBadMaxTokens) {
  v1::GenerateRequest r = Text("hello");  // 6 tokens
  r.set_max_tokens(0);
  EXPECT_THAT(Front().Plan(r, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("max_tokens must be >= 1")));
  r.set_max_tokens(59);
  EXPECT_THAT(Front().Plan(r, 1),
              StatusIs(absl::StatusCode::kInvalidArgument,
                       HasSubstr("max_tokens = 59 with a prompt of 6 tokens exceeds the model "
                                 "context of 64 (at most 58)")));
  r.set_max_tokens(58);
  EXPECT_OK(Front().Plan(r, 1).status());
}

struct SamplingCase {
  const char* field;
  void (*set)(v1::SamplingParams*);
};

TEST_F(RequestFrontTest, RejectsSamplingOutOfRange) {
  const std::vector<SamplingCase> cases = {
      {"sampling.temperature", [](v1::SamplingParams* s) { s->set_temperature(-0.1f); }},
      {"sampling.temperature", [](v1::SamplingParams* s) { s->set_temperature(NAN); }},
      {"sampling.top_p", [](v1::SamplingParams* s) { s->set_top_p(0); }},
      {"sampling.top_p", [](v1::SamplingParams* s) { s->set_top_p(1.01f); }},
      {"sampling.top_k", [](v1::SamplingParams* s) { s->set_top_k(-1); }},
      {"sampling.min_p", [](v1::SamplingParams* s) { s->set_min_p(-0.1f); }},
      {"sampling.min_p", [](v1::SamplingParams* s) { s->set_min_p(1.5f); }},
      {"sampling.repetition_penalty", [](v1::SamplingParams* s) { s->set_repetition_penalty(0); }},
      {"sampling.presence_penalty", [](v1::SamplingParams* s) { s->set_presence_penalty(2.5f); }},
      {"sampling.presence_penalty", [](v1::SamplingParams* s) { s->set_presence_penalty(-2.5f); }},
      {"sampling.frequency_penalty", [](v1::SamplingParams* s) { s->set_frequency_penalty(-3); }},
  };
  for (const SamplingCase& c : cases) {
    v1::GenerateRequest r = Text("hello");
    c.set(r.mutable_sampling());
    EXPECT_THAT(Front().Plan(r, 1),
                StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(c.field)))
        << c.field;
  }
}

TEST_F(RequestFrontTest, RejectsBadStops) {
  v1::GenerateRequest r = Text("hello");
  r.add_stop_token_ids(1);
  r.add_stop_token_ids(kVocab + 5);
  EXPECT_THAT(Front().Plan(r, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("stop_token_ids[1]")));

  r = Text("hello");
  for (int i = 0; i < 17; ++i) r.add_stop(std::string(1, static_cast<char>('a' + i)));
  EXPECT_THAT(Front().Plan(r, 1), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("stop has 17 strings; at most 16")));

  r = Text("hello");
  r.add_stop("ok");
  r.add_stop(std::string(257, 'x'));
  EXPECT_THAT(Front().Plan(r, 1), StatusIs(absl::StatusCode::kInvalidArgument,
                                           HasSubstr("stop[1] is 257 bytes; at most 256")));

  r = Text("hello");
  r.add_stop("");
  EXPECT_THAT(Front().Plan(r, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("stop[0] is empty")));
}

TEST_F(RequestFrontTest, RejectsLongRequestIdAndNegativeHint) {
  v1::GenerateRequest r = Text("hello");
  r.set_request_id(std::string(257, 'r'));
  EXPECT_THAT(Front().Plan(r, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("request_id is 257 bytes")));
  r = Text("hello");
  r.set_output_length_hint(-1);
  EXPECT_THAT(Front().Plan(r, 1),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("output_length_hint")));
}

TEST_F(RequestFrontTest, StopTokens) {
  v1::GenerateRequest r = Text("hello");
  r.add_stop_token_ids(42);
  ASSERT_OK_AND_ASSIGN(RequestPlan plan, Front().Plan(r, 1));
  RequestFront front = Front();
  EXPECT_TRUE(front.IsStopToken(plan, kEos));
  EXPECT_TRUE(front.IsStopToken(plan, 42));
  EXPECT_FALSE(front.IsStopToken(plan, 'a'));
  r.set_ignore_eos(true);
  ASSERT_OK_AND_ASSIGN(plan, Front().Plan(r, 1));
  EXPECT_FALSE(front.IsStopToken(plan, kEos));
  EXPECT_TRUE(front.IsStopToken(plan, 42));
}

// ---- StopStringMatcher -------------------------------------------------------

TEST(StopStringMatcherTest, HoldsBackAPossibleStartAndCutsAtTheMatch) {
  StopStringMatcher m({"STOP"});
  EXPECT_EQ(m.Push("abc ST"), "abc ");
  EXPECT_FALSE(m.stopped());
  EXPECT_EQ(m.Push("OP and more"), "");
  EXPECT_TRUE(m.stopped());
  EXPECT_EQ(m.matched(), "STOP");
  EXPECT_EQ(m.Push("later"), "");
  EXPECT_EQ(m.Flush(), "");
}

TEST(StopStringMatcherTest, ReleasesAFalseStart) {
  StopStringMatcher m({"STOP"});
  EXPECT_EQ(m.Push("S"), "");
  EXPECT_EQ(m.Push("T"), "");
  EXPECT_EQ(m.Push("x"), "STx");
  EXPECT_EQ(m.Push("STO"), "");
  EXPECT_EQ(m.Flush(), "STO");
  EXPECT_FALSE(m.stopped());
}

TEST(StopStringMatcherTest, EarliestMatchWins) {
  StopStringMatcher m({"cd", "b"});
  EXPECT_EQ(m.Push("abcd"), "a");
  EXPECT_EQ(m.matched(), "b");
}

TEST(StopStringMatcherTest, RepeatedPrefix) {
  StopStringMatcher m({"aab"});
  EXPECT_EQ(m.Push("xaa"), "x");
  EXPECT_EQ(m.Push("ab"), "a");
  EXPECT_EQ(m.matched(), "aab");
}

TEST(StopStringMatcherTest, NoStopsPassesThrough) {
  StopStringMatcher m({});
  EXPECT_EQ(m.Push("anything"), "anything");
  EXPECT_EQ(m.Flush(), "");
}

// ---- TextStreamer --------------------------------------------------------------

TEST_F(RequestFrontTest, StreamerMatchesAcrossTokens) {
  TextStreamer streamer(*tokenizer_, false, {"END"});
  std::string out;
  const std::string text = "Hello world END tail";
  for (int32_t id : Bytes(text)) {
    out += streamer.Push(id);
    if (streamer.stopped()) break;
  }
  out += streamer.Finish();
  EXPECT_EQ(out, "Hello world ");
  EXPECT_EQ(streamer.matched_stop(), "END");
}

TEST_F(RequestFrontTest, StreamerNeverSplitsACharacterAndMatchesMultibyteStops) {
  // "→" is E2 86 92: three tokens.
  TextStreamer streamer(*tokenizer_, false, {"→x"});
  std::vector<std::string> deltas;
  for (int32_t id : Bytes("é → y →x z")) {
    std::string d = streamer.Push(id);
    EXPECT_TRUE(IsValidUtf8(d)) << d;
    if (!d.empty()) deltas.push_back(d);
    if (streamer.stopped()) break;
  }
  std::string out;
  for (const std::string& d : deltas) out += d;
  EXPECT_EQ(out, "é → y ");
  EXPECT_EQ(streamer.matched_stop(), "→x");
}

TEST_F(RequestFrontTest, StreamerFinishReleasesHeldText) {
  TextStreamer streamer(*tokenizer_, false, {"ab"});
  std::string out;
  for (int32_t id : Bytes("xa")) out += streamer.Push(id);
  EXPECT_EQ(out, "x");
  EXPECT_EQ(streamer.Finish(), "a");
  EXPECT_FALSE(streamer.stopped());
}

TEST_F(RequestFrontTest, StreamerSkipsSpecialTokensWhenAsked) {
  TextStreamer skip(*tokenizer_, true, {});
  TextStreamer keep(*tokenizer_, false, {});
  std::string a, b;
  for (int32_t id : std::vector<int32_t>{'a', kBos, 'b'}) {
    a += skip.Push(id);
    b += keep.Push(id);
  }
  EXPECT_EQ(a + skip.Finish(), "ab");
  EXPECT_EQ(b + keep.Finish(), "a<｜begin▁of▁sentence｜>b");
}

TEST(Utf8Test, Validity) {
  EXPECT_TRUE(IsValidUtf8("plain é → 😀"));
  EXPECT_FALSE(IsValidUtf8("\xC3"));
  EXPECT_FALSE(IsValidUtf8("\xC0\x80"));          // overlong
  EXPECT_FALSE(IsValidUtf8("\xED\xA0\x80"));      // surrogate
  EXPECT_FALSE(IsValidUtf8("\xF4\x90\x80\x80"));  // past U+10FFFF
}

}  // namespace
}  // namespace dserve::router
