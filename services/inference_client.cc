// services/inference_client.cc: the synchronous dserve.v1.Inference client.
#include "services/inference_client.h"

#include <utility>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace dserve::services {
namespace {

// StatusFromGrpc keeps the code and the message; grpc and absl share the
// canonical code numbering.
absl::Status StatusFromGrpc(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

void SetDeadline(grpc::ClientContext& context, absl::Duration timeout) {
  if (timeout != absl::InfiniteDuration()) {
    context.set_deadline(absl::ToChronoTime(absl::Now() + timeout));
  }
}

}  // namespace

std::optional<absl::Duration> GenerateTiming::TimeToFirstToken() const {
  if (!first_token) return std::nullopt;
  return *first_token - start;
}

std::optional<absl::Duration> GenerateTiming::TimePerOutputToken() const {
  int64_t tokens = 0;
  for (const ChunkArrival& c : chunks) tokens += c.num_tokens;
  if (tokens < 2 || !first_token || !last_token) return std::nullopt;
  return (*last_token - *first_token) / (tokens - 1);
}

std::string FinishReasonName(v1::FinishReason reason) {
  switch (reason) {
    case v1::FINISH_REASON_STOP:
      return "stop";
    case v1::FINISH_REASON_LENGTH:
      return "length";
    default:
      return "unspecified";
  }
}

absl::StatusOr<std::unique_ptr<InferenceClient>> InferenceClient::Connect(
    const std::string& address) {
  if (address.empty()) return absl::InvalidArgumentError("endpoint address is empty");
  grpc::ChannelArguments args;
  // Responses are small chunks, but GetModelInfo and long texts should not
  // trip the 4 MiB default on a big model's reply.
  args.SetMaxReceiveMessageSize(64 << 20);
  return std::make_unique<InferenceClient>(
      grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args));
}

InferenceClient::InferenceClient(std::shared_ptr<grpc::Channel> channel)
    : stub_(v1::Inference::NewStub(std::move(channel))) {}

absl::Status InferenceClient::Generate(const v1::GenerateRequest& request, absl::Duration timeout,
                                       GenerateResult* result) {
  return Generate(request, timeout, result, [](const v1::Chunk&, absl::Time) {});
}

absl::Status InferenceClient::Generate(const v1::GenerateRequest& request, absl::Duration timeout,
                                       GenerateResult* result, ChunkCallback on_chunk) {
  *result = GenerateResult();
  grpc::ClientContext context;
  SetDeadline(context, timeout);
  result->request_id = request.request_id();
  result->timing.start = absl::Now();
  std::unique_ptr<grpc::ClientReader<v1::GenerateResponse>> reader =
      stub_->Generate(&context, request);
  v1::GenerateResponse response;
  absl::Status stream_error;  // an Error message inside the stream
  while (reader->Read(&response)) {
    const absl::Time arrival = absl::Now();
    if (!response.request_id().empty()) result->request_id = response.request_id();
    switch (response.kind_case()) {
      case v1::GenerateResponse::kChunk: {
        const v1::Chunk& chunk = response.chunk();
        result->text += chunk.text();
        result->token_ids.insert(result->token_ids.end(), chunk.token_ids().begin(),
                                 chunk.token_ids().end());
        result->logprobs.insert(result->logprobs.end(), chunk.logprobs().begin(),
                                chunk.logprobs().end());
        if (chunk.token_ids_size() > 0) {
          if (!result->timing.first_token) result->timing.first_token = arrival;
          result->timing.last_token = arrival;
          result->timing.chunks.push_back({arrival, chunk.token_ids_size()});
        }
        on_chunk(chunk, arrival);
        break;
      }
      case v1::GenerateResponse::kComplete:
        result->completed = true;
        result->finish_reason = response.complete().finish_reason();
        result->usage = response.complete().usage();
        result->matched_stop = response.complete().matched_stop();
        result->server_timings = response.complete().timings();
        break;
      case v1::GenerateResponse::kError:
        stream_error = absl::Status(static_cast<absl::StatusCode>(response.error().code()),
                                    response.error().message());
        if (stream_error.ok()) {
          stream_error = absl::InternalError(
              absl::StrCat("the server sent an Error with code OK: ", response.error().message()));
        }
        break;
      default:
        break;
    }
  }
  const grpc::Status final_status = reader->Finish();
  result->timing.end = absl::Now();
  const auto& trailers = context.GetServerTrailingMetadata();
  if (auto it = trailers.find("retry-after-ms"); it != trailers.end()) {
    int64_t ms;
    if (absl::SimpleAtoi(absl::string_view(it->second.data(), it->second.size()), &ms)) {
      result->retry_after = absl::Milliseconds(ms);
    }
  }
  if (!final_status.ok()) return StatusFromGrpc(final_status);
  if (!stream_error.ok()) return stream_error;
  if (!result->completed) {
    return absl::InternalError("the stream ended without a Complete message");
  }
  return absl::OkStatus();
}

absl::StatusOr<v1::ModelInfo> InferenceClient::GetModelInfo(absl::Duration timeout) {
  grpc::ClientContext context;
  SetDeadline(context, timeout);
  v1::ModelInfo info;
  grpc::Status status = stub_->GetModelInfo(&context, v1::GetModelInfoRequest(), &info);
  if (!status.ok()) return StatusFromGrpc(status);
  return info;
}

}  // namespace dserve::services
