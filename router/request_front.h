// router/request_front.h: the router's front end for one request, free of
// transport: checks a dserve.v1.GenerateRequest against the model's limits,
// tokenizes its prompt and resolves every sampling setting (RequestFront),
// and turns the token ids that come back into text deltas that stop at a
// stop string (StopStringMatcher, TextStreamer).
#ifndef DSERVE_ROUTER_REQUEST_FRONT_H_
#define DSERVE_ROUTER_REQUEST_FRONT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "dserve/internal/v1/worker.pb.h"
#include "dserve/v1/inference.pb.h"
#include "tokenizer/tokenizer.h"

namespace dserve::router {

// ModelLimits: what the served model accepts.
struct ModelLimits {
  int64_t vocab_size = 0;          // valid token ids are [0, vocab_size)
  int64_t max_context_tokens = 0;  // prompt + output tokens, at most
  // Ids that end the output unless ignore_eos (config.json's eos_token_id
  // and the tokenizer's eos token).
  std::vector<int32_t> eos_token_ids;
};

// FrontOptions: the router's own bounds on a request.
struct FrontOptions {
  int32_t default_max_tokens = 256;  // when the client sets none
  int max_stop_strings = 16;
  int max_stop_bytes = 256;  // per stop string
  int max_request_id_bytes = 256;
};

// RequestPlan: a request checked and resolved: what the workers are asked to
// do and what the router does with their output.
struct RequestPlan {
  std::string request_id;  // the client's; empty when it sent none
  std::vector<int32_t> prompt;
  // Every field holds its final value (defaults filled, seed chosen).
  internal::v1::Sampling sampling;
  std::vector<std::string> stop;
  int32_t output_length_hint = 0;  // 0: none given
  int32_t priority = 0;
  bool skip_special_tokens = false;
};

// RequestFront: turns GenerateRequests into RequestPlans. Immutable after
// construction and safe to share between threads; `tokenizer` must outlive
// it.
class RequestFront {
 public:
  RequestFront(const tokenizer::Tokenizer* tokenizer, ModelLimits limits, FrontOptions options);

  // Plan validates `request` and resolves it. `default_seed` is the seed
  // used when the client sets none (the caller draws it at random).
  // INVALID_ARGUMENT naming the field and the limit on any bad input:
  // "prompt" (missing, empty, or longer than the context), "prompt.token_ids[i]",
  // "max_tokens", "sampling.temperature", "sampling.top_p", "sampling.top_k",
  // "sampling.min_p", "sampling.repetition_penalty",
  // "sampling.presence_penalty", "sampling.frequency_penalty",
  // "stop", "stop[i]", "stop_token_ids[i]", "output_length_hint", "request_id".
  absl::StatusOr<RequestPlan> Plan(const v1::GenerateRequest& request, uint64_t default_seed) const;

  // IsStopToken: whether `id` ends the output of `plan` when sampled (an
  // eos id unless ignore_eos, or one of stop_token_ids). Such a token is
  // reported by id but adds no text.
  bool IsStopToken(const RequestPlan& plan, int32_t id) const;

  const ModelLimits& limits() const { return limits_; }
  const tokenizer::Tokenizer& tokenizer() const { return *tokenizer_; }

 private:
  absl::StatusOr<std::vector<int32_t>> Tokenize(const v1::GenerateRequest& request) const;

  const tokenizer::Tokenizer* tokenizer_;
  ModelLimits limits_;
  FrontOptions options_;
};

// StopStringMatcher: finds stop strings in text that arrives in pieces.
// Text that could still be the start of a stop string is held back until
// the next piece decides it; once a stop string is found, the output is cut
// just before it and everything after is dropped. Not thread-safe.
class StopStringMatcher {
 public:
  explicit StopStringMatcher(std::vector<std::string> stops);

  // Push appends `text` and returns the text that can be released now. After
  // a match it returns the text up to the stop string, and `matched()`
  // names it; later pushes return nothing.
  std::string Push(std::string_view text);
  // Flush ends the stream: returns the text still held back (no stop string
  // can complete any more).
  std::string Flush();

  bool stopped() const { return matched_.has_value(); }
  const std::optional<std::string>& matched() const { return matched_; }

 private:
  std::vector<std::string> stops_;
  std::string held_;
  std::optional<std::string> matched_;
};

// TextStreamer: token ids in, text deltas out: incremental detokenization
// that never splits a UTF-8 character (tokenizer::StreamDecoder), then stop
// strings (StopStringMatcher). Not thread-safe; `tokenizer` must outlive it.
class TextStreamer {
 public:
  TextStreamer(const tokenizer::Tokenizer& tokenizer, bool skip_special_tokens,
               std::vector<std::string> stops);

  // Push adds `id`'s text and returns the delta that can be sent now; empty
  // while text is held back or after a stop string matched.
  std::string Push(tokenizer::TokenId id);
  // Finish ends the stream and returns what is left to send.
  std::string Finish();

  bool stopped() const { return matcher_.stopped(); }
  const std::optional<std::string>& matched_stop() const { return matcher_.matched(); }

 private:
  tokenizer::StreamDecoder decoder_;
  StopStringMatcher matcher_;
};

// IsValidUtf8 reports whether `text` is well-formed UTF-8.
bool IsValidUtf8(std::string_view text);

}  // namespace dserve::router

#endif  // DSERVE_ROUTER_REQUEST_FRONT_H_
