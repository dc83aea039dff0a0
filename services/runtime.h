// services/runtime.h: what every dserve server binary shares: starting a
// gRPC server (callback API) with the standard health service, structured
// log lines that carry the request id, and the shutdown sequence (SIGINT or
// SIGTERM -> stop admitting -> drain running work within a deadline -> exit).
#ifndef DSERVE_SERVICES_RUNTIME_H_
#define DSERVE_SERVICES_RUNTIME_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "dserve/config/v1/config.pb.h"
#include "grpcpp/grpcpp.h"

namespace dserve::services {

// LogFields: extra key/value pairs for one log line.
using LogFields = std::vector<std::pair<std::string, std::string>>;

// Log writes one JSON object per line to stderr:
//   {"ts":"...","level":"info","service":"decode","msg":"...","request_id":"..."}
// `request_id` is omitted when empty; `fields` follow as string members (a
// field named like a standard one replaces it). Strings are JSON-escaped and
// invalid UTF-8 becomes U+FFFD; ts is RFC 3339 UTC with microseconds.
// Thread-safe; each line is one write(2), so lines never interleave.
void Log(std::string_view level, std::string_view msg, std::string_view request_id = {},
         const LogFields& fields = {});
// SetLogService names the process in every line ("router", "prefill", ...).
void SetLogService(std::string_view service);

// GrpcServer: a started gRPC server with the health service enabled.
class GrpcServer {
 public:
  // Start binds `config.listen` (port 0 picks a free port; empty means
  // 127.0.0.1:0) with the message size limit for both directions
  // (max_message_bytes, 4 MiB when 0), registers `services` (at least one;
  // they must outlive the server) and starts serving; health reports SERVING
  // for every service name. INVALID_ARGUMENT naming server.listen when it
  // cannot bind.
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(
      const config::v1::ServerConfig& config, const std::vector<grpc::Service*>& services);
  ~GrpcServer();

  // address: "host:port" with the host as configured and the port actually
  // bound (a wildcard host such as 0.0.0.0 stays as written).
  const std::string& address() const { return address_; }
  // SetServing flips grpc.health.v1 between SERVING and NOT_SERVING.
  void SetServing(bool serving);
  // Shutdown stops accepting calls and waits for running ones until
  // `deadline`, then cancels what is left; returns when the server has
  // stopped. Idempotent; the destructor shuts down at once if it was not
  // called. Not thread-safe: call from the thread that owns the server.
  void Shutdown(absl::Time deadline);

 private:
  GrpcServer() = default;
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
  bool shut_down_ = false;
};

// ShutdownSignal: blocks SIGINT and SIGTERM in the calling thread (construct
// it in main before starting any thread, so every thread inherits the mask
// and none is killed by them) and ignores SIGPIPE. The signals then stay
// pending until Wait reads them (through a signalfd), on whichever thread
// calls it.
class ShutdownSignal {
 public:
  ShutdownSignal();
  ~ShutdownSignal();
  ShutdownSignal(const ShutdownSignal&) = delete;
  ShutdownSignal& operator=(const ShutdownSignal&) = delete;

  // Wait blocks until SIGINT or SIGTERM arrives and returns its number, or
  // returns 0 once Notify has been called (also when Notify came first).
  // One caller at a time.
  int Wait();
  // Notify ends Wait without a signal (a fatal error elsewhere, a test).
  // Callable from any thread, and from a signal handler.
  void Notify();

 private:
  int signal_fd_ = -1;  // readable when SIGINT or SIGTERM is pending
  int event_fd_ = -1;   // readable after Notify
};

// RunUntilShutdown is the tail of every server's main: it prints
// "<service> listening on ADDRESS" on stdout (the line `dserve up` and tests
// wait for), waits for SIGINT/SIGTERM, marks the server NOT_SERVING, calls
// `drain` with the drain deadline (the service stops admitting and finishes
// running work by then) and shuts the server down by the same deadline:
// drain_timeout from the signal bounds the whole sequence. Logs
// "draining" (with the signal) and "stopped". Returns the process exit code:
// 0, also when Wait ended by Notify (the caller that notified reports its
// own failure).
int RunUntilShutdown(std::string_view service, GrpcServer& server, ShutdownSignal& signal,
                     absl::Duration drain_timeout,
                     absl::AnyInvocable<void(absl::Time deadline)> drain);

// ToDuration / ToProtoDuration convert google.protobuf.Duration;
// ToProtoDuration truncates to nanoseconds and clamps to the proto's range
// (+-315,576,000,000 s), so an infinite duration becomes the largest one.
absl::Duration ToDuration(const google::protobuf::Duration& d);
void ToProtoDuration(absl::Duration d, google::protobuf::Duration* out);

// ToGrpcStatus / FromGrpcStatus convert at the RPC edge, keeping code and
// message (the two share code numbers); payloads and details are dropped.
grpc::Status ToGrpcStatus(const absl::Status& status);
absl::Status FromGrpcStatus(const grpc::Status& status);

}  // namespace dserve::services

#endif  // DSERVE_SERVICES_RUNTIME_H_
