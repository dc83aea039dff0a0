// services/runtime.cc: gRPC server bootstrap, JSON log lines, signal
// handling and the shutdown sequence shared by every server binary.
#include "services/runtime.h"

#include <poll.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "absl/base/const_init.h"
#include "absl/memory/memory.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "grpcpp/health_check_service_interface.h"
#include "nlohmann/json.hpp"

namespace dserve::services {
namespace {

ABSL_CONST_INIT absl::Mutex log_mu(absl::kConstInit);

// LogService is the process's name in log lines; never destroyed, so lines
// logged during static destruction still work.
std::string& LogService() ABSL_EXCLUSIVE_LOCKS_REQUIRED(log_mu) {
  static std::string* service = new std::string;
  return *service;
}

// WriteAll writes `line` with as few write(2) calls as the kernel allows;
// one call per line keeps lines whole even when several processes share
// the stream (pipe writes up to PIPE_BUF are atomic).
void WriteAll(int fd, const std::string& line) {
  size_t done = 0;
  while (done < line.size()) {
    const ssize_t n = ::write(fd, line.data() + done, line.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;  // Nowhere left to report a broken stderr.
    done += static_cast<size_t>(n);
  }
}

std::string SignalName(int signal) {
  switch (signal) {
    case 0:
      return "none";
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    default:
      return absl::StrCat(signal);
  }
}

sigset_t ShutdownSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  return set;
}

// A thread started before ShutdownSignal (libraries start some while
// loading) does not have the signals blocked, and the kernel may deliver
// them there. The handler turns that delivery into the same wake-up.
std::atomic<int> shutdown_event_fd{-1};
std::atomic<int> caught_signal{0};

void OnShutdownSignal(int signo) {
  caught_signal.store(signo);
  const uint64_t one = 1;
  [[maybe_unused]] ssize_t n = ::write(shutdown_event_fd.load(), &one, sizeof(one));
}

}  // namespace

void SetLogService(std::string_view service) {
  absl::MutexLock lock(&log_mu);
  LogService() = std::string(service);
}

void Log(std::string_view level, std::string_view msg, std::string_view request_id,
         const LogFields& fields) {
  const std::string ts = absl::FormatTime("%Y-%m-%dT%H:%M:%E6SZ", absl::Now(), absl::UTCTimeZone());
  nlohmann::ordered_json line;
  line["ts"] = ts;
  line["level"] = level;
  {
    absl::MutexLock lock(&log_mu);
    line["service"] = LogService();
  }
  line["msg"] = msg;
  if (!request_id.empty()) line["request_id"] = request_id;
  for (const auto& [key, value] : fields) line[key] = value;
  // Invalid UTF-8 (a client's bytes echoed in a message) becomes U+FFFD
  // instead of throwing.
  std::string text = line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  text.push_back('\n');
  absl::MutexLock lock(&log_mu);
  WriteAll(STDERR_FILENO, text);
}

absl::StatusOr<std::unique_ptr<GrpcServer>> GrpcServer::Start(
    const config::v1::ServerConfig& config, const std::vector<grpc::Service*>& services) {
  const std::string listen = config.listen().empty() ? "127.0.0.1:0" : config.listen();
  const size_t colon = listen.rfind(':');
  if (colon == std::string::npos) {
    return absl::InvalidArgumentError(
        absl::StrCat("server.listen must be host:port, got \"", listen, "\""));
  }
  if (services.empty()) {
    // gRPC registers the health service only after checking that some
    // service polls the server, so a server of health alone cannot start.
    return absl::InvalidArgumentError("GrpcServer::Start: no services to serve");
  }
  const int max_bytes = config.max_message_bytes() > 0 ? config.max_message_bytes() : 4 << 20;

  grpc::EnableDefaultHealthCheckService(true);
  grpc::ServerBuilder builder;
  int port = 0;
  builder.AddListeningPort(listen, grpc::InsecureServerCredentials(), &port);
  builder.SetMaxReceiveMessageSize(max_bytes);
  builder.SetMaxSendMessageSize(max_bytes);
  for (grpc::Service* service : services) builder.RegisterService(service);

  auto server = absl::WrapUnique(new GrpcServer);
  server->server_ = builder.BuildAndStart();
  if (server->server_ == nullptr || port == 0) {
    if (server->server_ != nullptr) server->Shutdown(absl::Now());
    return absl::InvalidArgumentError(absl::StrCat("server.listen: cannot bind ", listen));
  }
  server->address_ = absl::StrCat(listen.substr(0, colon), ":", port);
  server->SetServing(true);
  return server;
}

GrpcServer::~GrpcServer() { Shutdown(absl::Now()); }

void GrpcServer::SetServing(bool serving) {
  if (server_ == nullptr) return;
  grpc::HealthCheckServiceInterface* health = server_->GetHealthCheckService();
  if (health != nullptr) health->SetServingStatus(serving);
}

void GrpcServer::Shutdown(absl::Time deadline) {
  if (shut_down_ || server_ == nullptr) return;
  shut_down_ = true;
  server_->Shutdown(absl::ToChronoTime(deadline));
  server_->Wait();
}

ShutdownSignal::ShutdownSignal() {
  const sigset_t set = ShutdownSignals();
  // Blocked signals stay pending until Wait reads them from the signalfd;
  // threads created later inherit the mask, so no thread runs a handler.
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // A peer that closes a socket must not kill the process; writes report
  // EPIPE instead.
  std::signal(SIGPIPE, SIG_IGN);
  // Non-blocking: a signal poll() reported on the signalfd may be taken by
  // the handler on another thread before Wait reads it.
  signal_fd_ = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
  event_fd_ = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (signal_fd_ < 0 || event_fd_ < 0) {
    // Only descriptor exhaustion gets here; Wait then sees neither source.
    Log("error",
        absl::StrCat("shutdown signal: cannot create descriptors: ", std::strerror(errno)));
  }
  shutdown_event_fd.store(event_fd_);
  struct sigaction action = {};
  action.sa_handler = OnShutdownSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

ShutdownSignal::~ShutdownSignal() {
  if (signal_fd_ >= 0) ::close(signal_fd_);
  if (event_fd_ >= 0) ::close(event_fd_);
}

int ShutdownSignal::Wait() {
  pollfd fds[2] = {{signal_fd_, POLLIN, 0}, {event_fd_, POLLIN, 0}};
  while (true) {
    if (::poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      Log("error", absl::StrCat("shutdown signal: poll: ", std::strerror(errno)));
      return 0;
    }
    if (fds[0].revents & POLLIN) {
      signalfd_siginfo info;
      if (::read(signal_fd_, &info, sizeof(info)) == sizeof(info)) {
        return static_cast<int>(info.ssi_signo);
      }
    }
    if (fds[1].revents & POLLIN) {
      uint64_t count;
      // A signal caught by the handler, or 0 for Notify.
      if (::read(event_fd_, &count, sizeof(count)) == sizeof(count)) return caught_signal.exchange(0);
    }
  }
}

void ShutdownSignal::Notify() {
  const uint64_t one = 1;
  // eventfd writes are async-signal-safe and never short; a full counter
  // (2^64 - 2 notifications) is the only failure and already wakes Wait.
  [[maybe_unused]] ssize_t n = ::write(event_fd_, &one, sizeof(one));
}

int RunUntilShutdown(std::string_view service, GrpcServer& server, ShutdownSignal& signal,
                     absl::Duration drain_timeout,
                     absl::AnyInvocable<void(absl::Time deadline)> drain) {
  const std::string listening = absl::StrCat(absl::string_view(service.data(), service.size()),
                                             " listening on ", server.address());
  std::printf("%s\n", listening.c_str());
  std::fflush(stdout);
  Log("info", listening, {}, {{"address", server.address()}});

  const int signo = signal.Wait();
  // One deadline for the whole sequence: drain and the server's own
  // shutdown share drain_timeout from the signal.
  const absl::Time deadline = absl::Now() + drain_timeout;
  Log("info", "draining", {},
      {{"signal", SignalName(signo)}, {"drain_timeout", absl::FormatDuration(drain_timeout)}});
  server.SetServing(false);
  if (drain) drain(deadline);
  // The service's own work is done. gRPC 1.51's Shutdown would still wait
  // for the deadline while any client keeps its channel open (a router
  // always does), so give in-flight calls a short grace only.
  server.Shutdown(std::min(deadline, absl::Now() + absl::Milliseconds(250)));
  Log("info", "stopped");
  return 0;
}

absl::Duration ToDuration(const google::protobuf::Duration& d) {
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

void ToProtoDuration(absl::Duration d, google::protobuf::Duration* out) {
  // google.protobuf.Duration's range: about +-10,000 years.
  constexpr int64_t kMaxSeconds = 315'576'000'000;
  d = std::clamp(d, absl::Seconds(-kMaxSeconds), absl::Seconds(kMaxSeconds));
  const int64_t seconds = absl::IDivDuration(d, absl::Seconds(1), &d);
  out->set_seconds(seconds);
  out->set_nanos(static_cast<int32_t>(absl::ToInt64Nanoseconds(d)));
}

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  // absl and gRPC share the canonical code numbers.
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

absl::Status FromGrpcStatus(const grpc::Status& status) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

}  // namespace dserve::services
