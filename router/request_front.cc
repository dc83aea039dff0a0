// router/request_front.cc: request validation, tokenization, sampling
// defaults and stop-string streaming.
#include "router/request_front.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include "absl/strings/str_cat.h"
#include "base/status_macros.h"
#include "nlohmann/json.hpp"

namespace dserve::router {
namespace {

absl::Status Invalid(absl::string_view field, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(field, " ", what));
}

// Range checks written so that NaN fails every one of them.
absl::Status CheckAtLeast(absl::string_view field, float value, float low) {
  if (value >= low) return absl::OkStatus();
  return Invalid(field, absl::StrCat("must be >= ", low, ", got ", value));
}

absl::Status CheckInRange(absl::string_view field, float value, float low, float high) {
  if (value >= low && value <= high) return absl::OkStatus();
  return Invalid(field, absl::StrCat("must be in [", low, ", ", high, "], got ", value));
}

}  // namespace

bool IsValidUtf8(std::string_view text) {
  size_t i = 0;
  const size_t n = text.size();
  while (i < n) {
    const auto c = static_cast<unsigned char>(text[i]);
    int len = 0;
    uint32_t cp = 0;
    if (c < 0x80) {
      ++i;
      continue;
    } else if ((c & 0xE0) == 0xC0) {
      len = 2;
      cp = c & 0x1F;
    } else if ((c & 0xF0) == 0xE0) {
      len = 3;
      cp = c & 0x0F;
    } else if ((c & 0xF8) == 0xF0) {
      len = 4;
      cp = c & 0x07;
    } else {
      return false;
    }
    if (i + len > n) return false;
    for (int k = 1; k < len; ++k) {
      const auto cc = static_cast<unsigned char>(text[i + k]);
      if ((cc & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (cc & 0x3F);
    }
    // Overlong forms, surrogates and values past U+10FFFF are not UTF-8.
    if ((len == 2 && cp < 0x80) || (len == 3 && cp < 0x800) || (len == 4 && cp < 0x10000) ||
        cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
      return false;
    }
    i += len;
  }
  return true;
}

// ---- RequestFront -----------------------------------------------------------

RequestFront::RequestFront(const tokenizer::Tokenizer* tokenizer, ModelLimits limits,
                           FrontOptions options)
    : tokenizer_(tokenizer), limits_(std::move(limits)), options_(options) {}

absl::StatusOr<std::vector<int32_t>> RequestFront::Tokenize(
    const v1::GenerateRequest& request) const {
  switch (request.prompt_case()) {
    case v1::GenerateRequest::kText: {
      if (request.text().empty()) return Invalid("prompt", "is empty");
      auto ids = tokenizer_->Encode(request.text(), /*add_special_tokens=*/true);
      if (!ids.ok()) return Invalid("prompt.text:", ids.status().message());
      return std::move(ids).value();
    }
    case v1::GenerateRequest::kTokenIds: {
      const auto& ids = request.token_ids().ids();
      if (ids.empty()) return Invalid("prompt", "is empty");
      for (int i = 0; i < ids.size(); ++i) {
        if (ids[i] < 0 || ids[i] >= limits_.vocab_size) {
          return Invalid(absl::StrCat("prompt.token_ids[", i, "]"),
                         absl::StrCat("= ", ids[i], " is outside the vocabulary [0, ",
                                      limits_.vocab_size, ")"));
        }
      }
      return std::vector<int32_t>(ids.begin(), ids.end());
    }
    case v1::GenerateRequest::kChat: {
      const v1::ChatMessages& chat = request.chat();
      if (chat.messages().empty()) return Invalid("prompt", "is empty (chat has no messages)");
      if (!tokenizer_->has_chat_template()) {
        return Invalid("prompt.chat", "cannot be used: the model's tokenizer has no chat template");
      }
      nlohmann::json messages = nlohmann::json::array();
      for (int i = 0; i < chat.messages_size(); ++i) {
        const v1::ChatMessage& m = chat.messages(i);
        if (m.role().empty()) {
          return Invalid(absl::StrCat("prompt.chat.messages[", i, "].role"), "is empty");
        }
        messages.push_back({{"role", m.role()}, {"content", m.content()}});
      }
      const bool add_generation_prompt =
          chat.has_add_generation_prompt() ? chat.add_generation_prompt() : true;
      auto text = tokenizer_->ApplyChatTemplate(messages, add_generation_prompt);
      if (!text.ok()) return Invalid("prompt.chat:", text.status().message());
      // Chat templates usually write the bos token themselves; the
      // post-processor would add a second one.
      bool template_has_bos = false;
      if (tokenizer_->bos_id().has_value()) {
        const absl::string_view bos = tokenizer_->TokenBytes(*tokenizer_->bos_id());
        template_has_bos = !bos.empty() && absl::string_view(*text).substr(0, bos.size()) == bos;
      }
      auto ids = tokenizer_->Encode(*text, /*add_special_tokens=*/!template_has_bos);
      if (!ids.ok()) return Invalid("prompt.chat:", ids.status().message());
      return std::move(ids).value();
    }
    case v1::GenerateRequest::PROMPT_NOT_SET:
      break;
  }
  return Invalid("prompt", "is missing (set text, token_ids or chat)");
}

absl::StatusOr<RequestPlan> RequestFront::Plan(const v1::GenerateRequest& request,
                                               uint64_t default_seed) const {
  RequestPlan plan;
  if (static_cast<int64_t>(request.request_id().size()) > options_.max_request_id_bytes) {
    return Invalid("request_id", absl::StrCat("is ", request.request_id().size(),
                                              " bytes; at most ", options_.max_request_id_bytes));
  }
  plan.request_id = request.request_id();

  const v1::SamplingParams& sp = request.sampling();
  internal::v1::Sampling& s = plan.sampling;
  s.set_temperature(sp.has_temperature() ? sp.temperature() : 1.0f);
  DSERVE_RETURN_IF_ERROR(CheckAtLeast("sampling.temperature", s.temperature(), 0.0f));
  s.set_top_p(sp.has_top_p() ? sp.top_p() : 1.0f);
  if (!(s.top_p() > 0.0f && s.top_p() <= 1.0f)) {
    return Invalid("sampling.top_p", absl::StrCat("must be in (0, 1], got ", s.top_p()));
  }
  s.set_top_k(sp.has_top_k() ? sp.top_k() : 0);
  if (s.top_k() < 0) {
    return Invalid("sampling.top_k", absl::StrCat("must be >= 0 (0 = off), got ", s.top_k()));
  }
  s.set_min_p(sp.has_min_p() ? sp.min_p() : 0.0f);
  DSERVE_RETURN_IF_ERROR(CheckInRange("sampling.min_p", s.min_p(), 0.0f, 1.0f));
  s.set_repetition_penalty(sp.has_repetition_penalty() ? sp.repetition_penalty() : 1.0f);
  if (!(s.repetition_penalty() > 0.0f) || std::isinf(s.repetition_penalty())) {
    return Invalid("sampling.repetition_penalty",
                   absl::StrCat("must be > 0 and finite (1 = off), got ", s.repetition_penalty()));
  }
  s.set_presence_penalty(sp.has_presence_penalty() ? sp.presence_penalty() : 0.0f);
  DSERVE_RETURN_IF_ERROR(
      CheckInRange("sampling.presence_penalty", s.presence_penalty(), -2.0f, 2.0f));
  s.set_frequency_penalty(sp.has_frequency_penalty() ? sp.frequency_penalty() : 0.0f);
  DSERVE_RETURN_IF_ERROR(
      CheckInRange("sampling.frequency_penalty", s.frequency_penalty(), -2.0f, 2.0f));
  s.set_seed(sp.has_seed() ? sp.seed() : default_seed);
  s.set_ignore_eos(request.ignore_eos());
  s.set_logprobs(request.logprobs());

  for (int i = 0; i < request.stop_token_ids_size(); ++i) {
    const int32_t id = request.stop_token_ids(i);
    if (id < 0 || id >= limits_.vocab_size) {
      return Invalid(
          absl::StrCat("stop_token_ids[", i, "]"),
          absl::StrCat("= ", id, " is outside the vocabulary [0, ", limits_.vocab_size, ")"));
    }
    s.add_stop_token_ids(id);
  }

  if (request.stop_size() > options_.max_stop_strings) {
    return Invalid("stop", absl::StrCat("has ", request.stop_size(), " strings; at most ",
                                        options_.max_stop_strings));
  }
  for (int i = 0; i < request.stop_size(); ++i) {
    const std::string& stop = request.stop(i);
    const std::string field = absl::StrCat("stop[", i, "]");
    if (stop.empty()) return Invalid(field, "is empty");
    if (static_cast<int64_t>(stop.size()) > options_.max_stop_bytes) {
      return Invalid(field,
                     absl::StrCat("is ", stop.size(), " bytes; at most ", options_.max_stop_bytes));
    }
    if (!IsValidUtf8(stop)) return Invalid(field, "is not valid UTF-8");
    plan.stop.push_back(stop);
  }

  if (request.has_output_length_hint() && request.output_length_hint() < 0) {
    return Invalid("output_length_hint",
                   absl::StrCat("must be >= 0, got ", request.output_length_hint()));
  }
  plan.output_length_hint = request.output_length_hint();
  plan.priority = request.priority();
  plan.skip_special_tokens = request.skip_special_tokens();

  DSERVE_ASSIGN_OR_RETURN(plan.prompt, Tokenize(request));
  const int64_t prompt_tokens = static_cast<int64_t>(plan.prompt.size());
  const int64_t context = limits_.max_context_tokens;
  if (prompt_tokens > context) {
    return Invalid("prompt:",
                   absl::StrCat(prompt_tokens, " tokens exceeds the model context of ", context));
  }
  if (prompt_tokens == context) {
    return Invalid("prompt:", absl::StrCat(prompt_tokens, " tokens fills the model context of ",
                                           context, " and leaves no room for output"));
  }
  if (request.has_max_tokens()) {
    const int64_t max_tokens = request.max_tokens();
    if (max_tokens < 1) {
      return Invalid("max_tokens", absl::StrCat("must be >= 1, got ", max_tokens));
    }
    if (prompt_tokens + max_tokens > context) {
      return Invalid("max_tokens",
                     absl::StrCat("= ", max_tokens, " with a prompt of ", prompt_tokens,
                                  " tokens exceeds the model context of ", context, " (at most ",
                                  context - prompt_tokens, ")"));
    }
    s.set_max_tokens(static_cast<int32_t>(max_tokens));
  } else {
    const int64_t room = context - prompt_tokens;
    s.set_max_tokens(
        static_cast<int32_t>(std::min<int64_t>(std::max(options_.default_max_tokens, 1), room)));
  }
  return plan;
}

bool RequestFront::IsStopToken(const RequestPlan& plan, int32_t id) const {
  if (!plan.sampling.ignore_eos() &&
      std::find(limits_.eos_token_ids.begin(), limits_.eos_token_ids.end(), id) !=
          limits_.eos_token_ids.end()) {
    return true;
  }
  const auto& stops = plan.sampling.stop_token_ids();
  return std::find(stops.begin(), stops.end(), id) != stops.end();
}

// ---- StopStringMatcher -------------------------------------------------------

StopStringMatcher::StopStringMatcher(std::vector<std::string> stops) : stops_(std::move(stops)) {
  stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

std::string StopStringMatcher::Push(std::string_view text) {
  if (matched_) return {};
  held_.append(text.data(), text.size());
  if (stops_.empty()) return std::exchange(held_, std::string());

  // Everything before held_ was released only when no stop string could
  // start there, so a match lies wholly inside held_.
  size_t best = std::string::npos;
  const std::string* best_stop = nullptr;
  for (const std::string& stop : stops_) {
    const size_t at = held_.find(stop);
    if (at < best) {
      best = at;
      best_stop = &stop;
    }
  }
  if (best_stop != nullptr) {
    matched_ = *best_stop;
    std::string out = held_.substr(0, best);
    held_.clear();
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of some stop string.
  size_t keep = 0;
  for (const std::string& stop : stops_) {
    const size_t longest = std::min(stop.size() - 1, held_.size());
    for (size_t len = longest; len > keep; --len) {
      if (held_.compare(held_.size() - len, len, stop, 0, len) == 0) {
        keep = len;
        break;
      }
    }
  }
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopStringMatcher::Flush() {
  if (matched_) return {};
  return std::exchange(held_, std::string());
}

// ---- TextStreamer ------------------------------------------------------------

TextStreamer::TextStreamer(const tokenizer::Tokenizer& tokenizer, bool skip_special_tokens,
                           std::vector<std::string> stops)
    : decoder_(tokenizer, skip_special_tokens), matcher_(std::move(stops)) {}

std::string TextStreamer::Push(tokenizer::TokenId id) {
  if (matcher_.stopped()) return {};
  return matcher_.Push(decoder_.Push(id));
}

std::string TextStreamer::Finish() {
  if (matcher_.stopped()) return {};
  std::string out = matcher_.Push(decoder_.Finish());
  if (matcher_.stopped()) return out;
  return out + matcher_.Flush();
}

}  // namespace dserve::router
