// services/inference_client_test.cc: InferenceClient against a real gRPC
// server on loopback whose answers the request id selects.
#include "services/inference_client.h"

#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"

namespace dserve::services {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;

// ScriptedInference: request_id "ok" streams three chunks (two tokens, then
// one, then a text-only tail) and a Complete; "error-in-stream" sends one
// chunk then an Error; "exhausted" fails RESOURCE_EXHAUSTED with a
// retry-after-ms trailer; "no-complete" ends OK without a Complete; "hang"
// waits until the call is cancelled.
class ScriptedInference final : public v1::Inference::Service {
 public:
  grpc::Status Generate(grpc::ServerContext* context, const v1::GenerateRequest* request,
                        grpc::ServerWriter<v1::GenerateResponse>* writer) override {
    const std::string& id = request->request_id();
    v1::GenerateResponse r;
    r.set_request_id(id);
    if (id == "exhausted") {
      context->AddTrailingMetadata("retry-after-ms", "250");
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "decode tier full");
    }
    if (id == "hang") {
      while (!context->IsCancelled()) absl::SleepFor(absl::Milliseconds(5));
      return grpc::Status::CANCELLED;
    }
    r.mutable_chunk()->add_token_ids(11);
    r.mutable_chunk()->add_token_ids(12);
    r.mutable_chunk()->set_text("he");
    writer->Write(r);
    if (id == "error-in-stream") {
      r.Clear();
      r.mutable_error()->set_code(static_cast<int>(absl::StatusCode::kUnavailable));
      r.mutable_error()->set_message("decode-0 went away");
      writer->Write(r);
      return grpc::Status::OK;
    }
    absl::SleepFor(absl::Milliseconds(20));
    r.Clear();
    r.mutable_chunk()->add_token_ids(13);
    r.mutable_chunk()->set_text("llo");
    writer->Write(r);
    r.Clear();
    r.mutable_chunk()->set_text("!");
    writer->Write(r);
    if (id == "no-complete") return grpc::Status::OK;
    r.Clear();
    r.mutable_complete()->set_finish_reason(v1::FINISH_REASON_STOP);
    r.mutable_complete()->mutable_usage()->set_prompt_tokens(4);
    r.mutable_complete()->mutable_usage()->set_completion_tokens(3);
    r.mutable_complete()->set_matched_stop("\n");
    writer->Write(r);
    return grpc::Status::OK;
  }
  grpc::Status GetModelInfo(grpc::ServerContext*, const v1::GetModelInfoRequest*,
                            v1::ModelInfo* info) override {
    info->set_name("tiny");
    info->set_vocab_size(384);
    info->set_max_context_tokens(8192);
    return grpc::Status::OK;
  }
};

class InferenceClientTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(port, 0);
    ASSERT_OK_AND_ASSIGN(client_, InferenceClient::Connect(absl::StrCat("127.0.0.1:", port)));
  }
  void TearDown() override { server_->Shutdown(); }

  static v1::GenerateRequest Request(const std::string& id) {
    v1::GenerateRequest request;
    request.set_request_id(id);
    request.set_text("Hello");
    return request;
  }

  ScriptedInference service_;
  std::unique_ptr<grpc::Server> server_;
  std::unique_ptr<InferenceClient> client_;
};

TEST_F(InferenceClientTest, StreamsChunksWithTimings) {
  GenerateResult result;
  std::string streamed;
  int calls = 0;
  absl::Time last_arrival = absl::InfinitePast();
  ASSERT_OK(client_->Generate(Request("ok"), absl::Seconds(10), &result,
                              [&](const v1::Chunk& chunk, absl::Time arrival) {
                                streamed += chunk.text();
                                EXPECT_GE(arrival, last_arrival);
                                last_arrival = arrival;
                                ++calls;
                              }));
  EXPECT_EQ(calls, 3);
  EXPECT_EQ(streamed, "hello!");
  EXPECT_EQ(result.text, "hello!");
  EXPECT_THAT(result.token_ids, ElementsAre(11, 12, 13));
  EXPECT_TRUE(result.completed);
  EXPECT_EQ(result.finish_reason, v1::FINISH_REASON_STOP);
  EXPECT_EQ(FinishReasonName(result.finish_reason), "stop");
  EXPECT_EQ(result.usage.completion_tokens(), 3);
  EXPECT_EQ(result.matched_stop, "\n");
  EXPECT_EQ(result.request_id, "ok");

  const GenerateTiming& t = result.timing;
  ASSERT_EQ(t.chunks.size(), 2u);  // the text-only chunk carries no token
  EXPECT_EQ(t.chunks[0].num_tokens, 2);
  EXPECT_EQ(t.chunks[1].num_tokens, 1);
  ASSERT_TRUE(t.TimeToFirstToken().has_value());
  EXPECT_GE(*t.TimeToFirstToken(), absl::ZeroDuration());
  // Three tokens, the last 20 ms after the first two: TPOT = gap / 2.
  ASSERT_TRUE(t.TimePerOutputToken().has_value());
  EXPECT_GE(*t.TimePerOutputToken(), absl::Milliseconds(10));
  EXPECT_EQ(*t.TimePerOutputToken(), (*t.last_token - *t.first_token) / 2);
  EXPECT_GE(t.EndToEnd(), *t.last_token - t.start);
}

TEST_F(InferenceClientTest, ErrorInTheStreamBecomesTheStatus) {
  GenerateResult result;
  EXPECT_THAT(client_->Generate(Request("error-in-stream"), absl::Seconds(10), &result),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("decode-0 went away")));
  EXPECT_THAT(result.token_ids, ElementsAre(11, 12));  // what came before
  EXPECT_FALSE(result.completed);
}

TEST_F(InferenceClientTest, ResourceExhaustedCarriesRetryAfter) {
  GenerateResult result;
  EXPECT_THAT(client_->Generate(Request("exhausted"), absl::Seconds(10), &result),
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("decode tier full")));
  ASSERT_TRUE(result.retry_after.has_value());
  EXPECT_EQ(*result.retry_after, absl::Milliseconds(250));
}

TEST_F(InferenceClientTest, StreamWithoutCompleteIsInternal) {
  GenerateResult result;
  EXPECT_THAT(client_->Generate(Request("no-complete"), absl::Seconds(10), &result),
              StatusIs(absl::StatusCode::kInternal, HasSubstr("Complete")));
}

TEST_F(InferenceClientTest, DeadlineEndsTheCall) {
  GenerateResult result;
  const absl::Time t0 = absl::Now();
  EXPECT_THAT(client_->Generate(Request("hang"), absl::Milliseconds(200), &result),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
}

TEST_F(InferenceClientTest, GetModelInfo) {
  ASSERT_OK_AND_ASSIGN(v1::ModelInfo info, client_->GetModelInfo(absl::Seconds(10)));
  EXPECT_EQ(info.vocab_size(), 384);
  EXPECT_EQ(info.max_context_tokens(), 8192);
}

TEST(InferenceClientConnectTest, NoServerIsUnavailable) {
  EXPECT_THAT(InferenceClient::Connect(""), StatusIs(absl::StatusCode::kInvalidArgument));
  // Port 1 on loopback: nothing listens there and connecting is refused.
  ASSERT_OK_AND_ASSIGN(auto client, InferenceClient::Connect("127.0.0.1:1"));
  EXPECT_THAT(client->GetModelInfo(absl::Seconds(10)), StatusIs(absl::StatusCode::kUnavailable));
}

}  // namespace
}  // namespace dserve::services
