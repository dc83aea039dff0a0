// services/runtime_test.cc: the shared server runtime against a real gRPC
// server on loopback: health, binding errors, bounded shutdown, log lines,
// shutdown signals and the status/duration conversions.
#include "services/runtime.h"

#include <stdlib.h>
#include <unistd.h>

#include <csignal>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "base/status_matchers.h"
#include "dserve/v1/inference.grpc.pb.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dserve::services {
namespace {

using ::dserve::testing::StatusIs;
using ::grpc::health::v1::Health;
using ::grpc::health::v1::HealthCheckRequest;
using ::grpc::health::v1::HealthCheckResponse;
using ::testing::HasSubstr;

// A service with every method unimplemented: the servers under test only
// need something to serve besides health.
dserve::v1::Inference::CallbackService* Unimplemented() {
  static auto* service = new dserve::v1::Inference::CallbackService;
  return service;
}

std::unique_ptr<GrpcServer> StartServer() {
  config::v1::ServerConfig config;
  config.set_listen("127.0.0.1:0");
  auto server = GrpcServer::Start(config, {Unimplemented()});
  EXPECT_OK(server);
  return server.ok() ? std::move(server).value() : nullptr;
}

// CheckHealth asks the overall health ("" service) of the server at
// `address`; UNKNOWN when the call fails.
HealthCheckResponse::ServingStatus CheckHealth(const std::string& address) {
  auto stub = Health::NewStub(grpc::CreateChannel(address, grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
  HealthCheckRequest request;
  HealthCheckResponse response;
  if (!stub->Check(&context, request, &response).ok()) return HealthCheckResponse::UNKNOWN;
  return response.status();
}

TEST(GrpcServerTest, HealthFollowsSetServing) {
  std::unique_ptr<GrpcServer> server = StartServer();
  ASSERT_NE(server, nullptr);
  EXPECT_THAT(server->address(), HasSubstr("127.0.0.1:"));
  EXPECT_NE(server->address(), "127.0.0.1:0");
  EXPECT_EQ(CheckHealth(server->address()), HealthCheckResponse::SERVING);
  server->SetServing(false);
  EXPECT_EQ(CheckHealth(server->address()), HealthCheckResponse::NOT_SERVING);
  server->SetServing(true);
  EXPECT_EQ(CheckHealth(server->address()), HealthCheckResponse::SERVING);
}

TEST(GrpcServerTest, UnbindableAddressNamesServerListen) {
  config::v1::ServerConfig config;
  config.set_listen("192.0.2.1:0");  // TEST-NET-1: no local interface has it
  EXPECT_THAT(GrpcServer::Start(config, {Unimplemented()}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("server.listen")));
  config.set_listen("no-port");
  EXPECT_THAT(GrpcServer::Start(config, {Unimplemented()}),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("server.listen")));
  config.set_listen("127.0.0.1:0");
  EXPECT_THAT(GrpcServer::Start(config, {}), StatusIs(absl::StatusCode::kInvalidArgument));
}

TEST(GrpcServerTest, ShutdownReturnsByDeadlineWithAStreamOpen) {
  std::unique_ptr<GrpcServer> server = StartServer();
  ASSERT_NE(server, nullptr);
  auto stub =
      Health::NewStub(grpc::CreateChannel(server->address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  HealthCheckRequest request;
  std::unique_ptr<grpc::ClientReader<HealthCheckResponse>> watch = stub->Watch(&context, request);
  HealthCheckResponse first;
  ASSERT_TRUE(watch->Read(&first));  // the stream is open on the server
  EXPECT_EQ(first.status(), HealthCheckResponse::SERVING);

  const absl::Time start = absl::Now();
  server->Shutdown(start + absl::Milliseconds(200));
  EXPECT_LT(absl::Now() - start, absl::Seconds(5));
  server->Shutdown(absl::Now());  // idempotent

  HealthCheckResponse update;
  while (watch->Read(&update)) {
  }
  EXPECT_FALSE(watch->Finish().ok());
}

// CapturedStderr sends fd 2 to a temporary file until Release, which
// returns what was written.
class CapturedStderr {
 public:
  CapturedStderr() {
    char path[] = "/tmp/runtime_test_stderr_XXXXXX";
    fd_ = mkstemp(path);
    path_ = path;
    saved_ = dup(STDERR_FILENO);
    dup2(fd_, STDERR_FILENO);
  }
  std::string Release() {
    dup2(saved_, STDERR_FILENO);
    close(saved_);
    close(fd_);
    std::ifstream in(path_);
    std::stringstream text;
    text << in.rdbuf();
    unlink(path_.c_str());
    return text.str();
  }

 private:
  int fd_, saved_;
  std::string path_;
};

std::vector<nlohmann::json> ParseLines(const std::string& text) {
  std::vector<nlohmann::json> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) {
    EXPECT_TRUE(nlohmann::json::accept(line)) << line;
    if (nlohmann::json::accept(line)) lines.push_back(nlohmann::json::parse(line));
  }
  return lines;
}

TEST(LogTest, OneJsonObjectPerLine) {
  SetLogService("decode");
  CapturedStderr capture;
  Log("info", "quote \" backslash \\ newline \n tab \t", "req-1",
      {{"worker", "d0"}, {"bytes", "\x01\xff"}});
  Log("warn", "no request id");
  const std::vector<nlohmann::json> lines = ParseLines(capture.Release());
  ASSERT_EQ(lines.size(), 2u);
  EXPECT_EQ(lines[0]["level"], "info");
  EXPECT_EQ(lines[0]["service"], "decode");
  EXPECT_EQ(lines[0]["msg"], "quote \" backslash \\ newline \n tab \t");
  EXPECT_EQ(lines[0]["request_id"], "req-1");
  EXPECT_EQ(lines[0]["worker"], "d0");
  EXPECT_TRUE(lines[0]["bytes"].is_string());
  // RFC 3339, UTC, microseconds: 2026-01-02T03:04:05.123456Z
  const std::string ts = lines[0]["ts"];
  absl::Time parsed;
  std::string error;
  EXPECT_TRUE(absl::ParseTime("%Y-%m-%dT%H:%M:%E6SZ", ts, &parsed, &error)) << ts << error;
  EXPECT_EQ(ts.size(), 27u) << ts;
  EXPECT_LT(absl::AbsDuration(absl::Now() - parsed), absl::Minutes(1));
  EXPECT_FALSE(lines[1].contains("request_id"));
  EXPECT_EQ(lines[1]["level"], "warn");
}

TEST(LogTest, ConcurrentLinesDoNotInterleave) {
  CapturedStderr capture;
  constexpr int kThreads = 4, kLines = 200;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([t] {
      for (int i = 0; i < kLines; ++i) {
        Log("info", std::string(500, 'a' + t), absl::StrCat("r", t, "-", i));
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  EXPECT_EQ(ParseLines(capture.Release()).size(), static_cast<size_t>(kThreads * kLines));
}

TEST(ShutdownSignalTest, WaitReturnsTheSignalOrZeroAfterNotify) {
  ShutdownSignal signal;
  // raise() targets this thread, where the constructor blocked SIGTERM: it
  // stays pending for Wait instead of ending the test.
  ASSERT_EQ(raise(SIGTERM), 0);
  EXPECT_EQ(signal.Wait(), SIGTERM);

  std::thread notifier([&signal] { signal.Notify(); });
  EXPECT_EQ(signal.Wait(), 0);
  notifier.join();
}

TEST(RunUntilShutdownTest, DrainsWithinTheDeadlineAndStops) {
  ShutdownSignal signal;
  std::unique_ptr<GrpcServer> server = StartServer();
  ASSERT_NE(server, nullptr);
  const std::string address = server->address();
  signal.Notify();  // Wait returns at once
  HealthCheckResponse::ServingStatus health_during_drain = HealthCheckResponse::UNKNOWN;
  absl::Duration deadline_after_start;
  const absl::Time start = absl::Now();
  CapturedStderr capture;
  const int code =
      RunUntilShutdown("decode", *server, signal, absl::Seconds(3), [&](absl::Time deadline) {
        health_during_drain = CheckHealth(address);
        deadline_after_start = deadline - start;
      });
  const std::vector<nlohmann::json> lines = ParseLines(capture.Release());
  EXPECT_EQ(code, 0);
  EXPECT_EQ(health_during_drain, HealthCheckResponse::NOT_SERVING);
  EXPECT_GE(deadline_after_start, absl::Seconds(3));
  EXPECT_LT(deadline_after_start, absl::Seconds(4));
  EXPECT_EQ(CheckHealth(address), HealthCheckResponse::UNKNOWN);  // the server is gone
  ASSERT_EQ(lines.size(), 3u);
  EXPECT_EQ(lines[0]["msg"], "decode listening on " + address);
  EXPECT_EQ(lines[1]["msg"], "draining");
  EXPECT_EQ(lines[1]["signal"], "none");
  EXPECT_EQ(lines[2]["msg"], "stopped");
}

TEST(ConversionTest, StatusRoundTripsEveryCode) {
  for (int code = 0; code <= 16; ++code) {
    const absl::Status status(static_cast<absl::StatusCode>(code), code == 0 ? "" : "why");
    const grpc::Status grpc_status = ToGrpcStatus(status);
    EXPECT_EQ(static_cast<int>(grpc_status.error_code()), code);
    EXPECT_EQ(FromGrpcStatus(grpc_status), status);
  }
  EXPECT_EQ(ToGrpcStatus(absl::ResourceExhaustedError("kv full")).error_message(), "kv full");
  EXPECT_EQ(ToGrpcStatus(absl::UnavailableError("x")).error_code(), grpc::StatusCode::UNAVAILABLE);
}

TEST(ConversionTest, DurationRoundTrips) {
  for (absl::Duration d :
       {absl::ZeroDuration(), absl::Milliseconds(1500), absl::Milliseconds(-1500),
        absl::Nanoseconds(1), absl::Hours(24 * 365)}) {
    google::protobuf::Duration proto;
    ToProtoDuration(d, &proto);
    EXPECT_EQ(ToDuration(proto), d);
    EXPECT_TRUE(proto.seconds() == 0 || proto.nanos() == 0 ||
                (proto.seconds() > 0) == (proto.nanos() > 0));
  }
  google::protobuf::Duration proto;
  ToProtoDuration(absl::Milliseconds(-1500), &proto);
  EXPECT_EQ(proto.seconds(), -1);
  EXPECT_EQ(proto.nanos(), -500000000);
  ToProtoDuration(absl::InfiniteDuration(), &proto);
  EXPECT_EQ(proto.seconds(), 315'576'000'000);
}

}  // namespace
}  // namespace dserve::services
