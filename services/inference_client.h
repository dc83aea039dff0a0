// services/inference_client.h: a small synchronous client of the public
// dserve.v1.Inference service, with the client-side timings (time to first
// token, per-chunk arrival, completion) that `dserve generate --endpoint`
// prints and `dserve bench` aggregates.
#ifndef DSERVE_SERVICES_INFERENCE_CLIENT_H_
#define DSERVE_SERVICES_INFERENCE_CLIENT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dserve/v1/inference.grpc.pb.h"
#include "grpcpp/grpcpp.h"

namespace dserve::services {

// GenerateTiming: when the parts of one Generate call arrived, on the
// client's clock. `first_token` and `last_token` are the arrivals of the
// first and last chunk that carried at least one token id (unset when none
// did); `chunks` has one entry per such chunk.
struct GenerateTiming {
  struct ChunkArrival {
    absl::Time time;
    int32_t num_tokens = 0;
  };
  absl::Time start;
  std::optional<absl::Time> first_token;
  std::optional<absl::Time> last_token;
  std::vector<ChunkArrival> chunks;
  absl::Time end;

  // TimeToFirstToken: first_token - start, or nullopt when no token came.
  std::optional<absl::Duration> TimeToFirstToken() const;
  // TimePerOutputToken: (last_token - first_token) / (tokens - 1), the mean
  // gap between tokens after the first; nullopt with fewer than 2 tokens.
  std::optional<absl::Duration> TimePerOutputToken() const;
  // EndToEnd: end - start.
  absl::Duration EndToEnd() const { return end - start; }
};

// GenerateResult: everything one Generate stream said, as far as it got.
// On error the fields hold what arrived before the stream ended.
struct GenerateResult {
  std::string request_id;
  std::string text;
  std::vector<int32_t> token_ids;
  std::vector<float> logprobs;
  bool completed = false;  // a Complete message arrived
  v1::FinishReason finish_reason = v1::FINISH_REASON_UNSPECIFIED;
  v1::Usage usage;
  std::string matched_stop;
  v1::ServerTimings server_timings;  // from Complete
  // The "retry-after-ms" trailer of a RESOURCE_EXHAUSTED answer.
  std::optional<absl::Duration> retry_after;
  GenerateTiming timing;
};

// FinishReasonName: "stop", "length" or "unspecified", the words the local
// `dserve generate` prints.
std::string FinishReasonName(v1::FinishReason reason);

// InferenceClient: one channel to a router (or any server of
// dserve.v1.Inference). Thread-safe: many threads may call Generate at once;
// each call is its own stream on the shared channel.
class InferenceClient {
 public:
  // Connect creates an insecure channel to `address` (host:port). It does not
  // wait for the server: calls on a server that is not there fail with
  // UNAVAILABLE. INVALID_ARGUMENT for an empty address.
  static absl::StatusOr<std::unique_ptr<InferenceClient>> Connect(const std::string& address);
  explicit InferenceClient(std::shared_ptr<grpc::Channel> channel);

  // ChunkCallback is called on the calling thread for every Chunk, in order,
  // with its arrival time; it must not block for long (the stream waits).
  using ChunkCallback = absl::FunctionRef<void(const v1::Chunk& chunk, absl::Time arrival)>;

  // Generate runs one streaming Generate with a deadline of now + `timeout`
  // (absl::InfiniteDuration(): none) and fills `result`. Returns the stream's
  // final status: an Error message in the stream becomes its own status; a
  // stream that ends OK without a Complete is INTERNAL. `result` must be
  // non-null; it is reset first.
  absl::Status Generate(const v1::GenerateRequest& request, absl::Duration timeout,
                        GenerateResult* result);
  absl::Status Generate(const v1::GenerateRequest& request, absl::Duration timeout,
                        GenerateResult* result, ChunkCallback on_chunk);

  // GetModelInfo asks the server which model it serves.
  absl::StatusOr<v1::ModelInfo> GetModelInfo(absl::Duration timeout);

 private:
  std::unique_ptr<v1::Inference::Stub> stub_;
};

}  // namespace dserve::services

#endif  // DSERVE_SERVICES_INFERENCE_CLIENT_H_
