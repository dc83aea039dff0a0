// services/mesh_launcher.h: `dserve up`, a whole mesh on one machine: N
// dserve-prefill and M dserve-decode workers (or K aggregated workers) and a
// dserve-router in front of them, each a child process on loopback, started
// in order, health-checked, and drained in order (router, then prefill, then
// decode) on Ctrl-C so no request is cut off and no process is left behind.
#ifndef DSERVE_SERVICES_MESH_LAUNCHER_H_
#define DSERVE_SERVICES_MESH_LAUNCHER_H_

#include <sys/types.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dserve/config/v1/config.pb.h"

namespace dserve::services {

// DefaultMeshConfigText: services/mesh.yaml, compiled into the binary so
// `dserve up` works from any directory.
std::string_view DefaultMeshConfigText();

// MeshOverrides: what `dserve up`'s flags change in the mesh config.
struct MeshOverrides {
  std::string config_path;  // empty: DefaultMeshConfigText()
  std::string model_dir;    // empty: keep the config's
  std::string transport;    // "", "tcp" or "shm": every worker's transport.kind
  std::optional<int32_t> prefill_workers;
  std::optional<int32_t> decode_workers;
  std::optional<int32_t> aggregated_workers;
};

// LoadMeshConfig reads the config (the file, or the compiled-in default),
// applies `overrides` and finalizes it (defaults, ranges). Count flags win
// over the file: asking for aggregated workers alone clears the file's
// prefill/decode counts and the other way round; asking for both is
// INVALID_ARGUMENT. INVALID_ARGUMENT naming the flag or field for bad values,
// including a missing model directory; NOT_FOUND for an unreadable file.
absl::StatusOr<config::v1::MeshConfig> LoadMeshConfig(const MeshOverrides& overrides);

// SiblingBinaryDir: the directory of the running executable
// (/proc/self/exe), where dserve-router, dserve-prefill and dserve-decode
// are built and installed beside dserve.
absl::StatusOr<std::string> SiblingBinaryDir();

// MeshRole: what a child process is; also the order of shutdown.
enum class MeshRole { kRouter, kPrefill, kDecode };

// ProcessExit: a child that has ended and been reaped.
struct ProcessExit {
  std::string name;  // "router", "prefill-0", "decode-1", "aggregated-0"
  MeshRole role = MeshRole::kRouter;
  pid_t pid = 0;
  int wait_status = 0;  // as from waitpid
  // Describe: "decode-0 (pid 123) exited with status 1" or "... was killed
  // by signal 9 (Killed)".
  std::string Describe() const;
};

// MeshLauncherOptions: a launch.
struct MeshLauncherOptions {
  config::v1::MeshConfig config;  // finalized (LoadMeshConfig)
  std::string bin_dir;            // holds dserve-router, dserve-prefill, dserve-decode
  // Where the launcher's notices and the children's stdout lines (other than
  // their "listening on" line), prefixed "[name] ", go. Children's stderr is
  // inherited unchanged. Not owned; must outlive the launcher.
  FILE* notices = stderr;
  // How long a child may take past its config's drain_timeout after SIGTERM
  // before it is killed.
  absl::Duration kill_grace = absl::Seconds(5);
};

// MeshLauncher: owns the child processes of one mesh and a private temporary
// directory with their config files.
//
// Children run in their own process groups, so a Ctrl-C on the terminal
// reaches only `dserve up`, which then drains them in order; each child also
// gets SIGTERM if the thread that started it dies (PR_SET_PDEATHSIG), so a
// killed launcher leaves no orphans. Call Start, ReapExited and Stop from one
// thread, the same one for the whole launch (the death signal follows the
// thread that forked), and keep that thread alive while the mesh runs.
class MeshLauncher {
 public:
  explicit MeshLauncher(MeshLauncherOptions options);
  // ~MeshLauncher stops whatever is still running (Stop without hurry).
  ~MeshLauncher();
  MeshLauncher(const MeshLauncher&) = delete;
  MeshLauncher& operator=(const MeshLauncher&) = delete;

  // Start launches the workers, reads each one's "<service> listening on
  // HOST:PORT" line, launches the router with their addresses, and waits
  // until every process answers grpc.health.v1 Check with SERVING, all within
  // the config's startup_timeout. `interrupted` is polled every few
  // milliseconds; when it returns true start-up ends with CANCELLED. Any
  // failure stops everything already started before returning:
  // FAILED_PRECONDITION when a binary is missing, UNAVAILABLE naming the child
  // that exited, DEADLINE_EXCEEDED naming the one that was not ready in time.
  absl::Status Start(absl::FunctionRef<bool()> interrupted);

  // router_address: host:port of the router once Start has succeeded.
  const std::string& router_address() const { return router_address_; }
  // work_dir: the temporary directory with the children's config files
  // (removed by Stop).
  const std::string& work_dir() const { return work_dir_; }

  // ReapExited collects children that have exited since the last call,
  // without blocking.
  std::vector<ProcessExit> ReapExited();

  // Running: the names and pids of the children still running, in start
  // order.
  std::vector<std::pair<std::string, pid_t>> Running() const;

  // Stop sends SIGTERM to the router and waits for it (its drain_timeout plus
  // kill_grace, then SIGKILL), then does the same for the prefill workers and
  // then the decode workers, and removes the temporary directory. When
  // `hurry` returns true (polled while waiting) whatever is left is killed at
  // once. Returns every child's exit, in stop order. Idempotent.
  std::vector<ProcessExit> Stop(absl::FunctionRef<bool()> hurry);
  std::vector<ProcessExit> Stop();

 private:
  struct Child;

  absl::Status StartUp(absl::FunctionRef<bool()> interrupted);
  absl::StatusOr<Child*> Spawn(std::string name, MeshRole role, const std::string& binary,
                               const std::string& config_json, std::vector<std::string> args);
  // AwaitAddresses waits for each child's listening line.
  absl::Status AwaitAddresses(const std::vector<Child*>& children, absl::Time deadline,
                              absl::FunctionRef<bool()> interrupted);
  // AwaitServing polls each child's health service until SERVING.
  absl::Status AwaitServing(absl::Time deadline, absl::FunctionRef<bool()> interrupted);
  // StartUpFailure: UNAVAILABLE naming a child that has exited, if any.
  absl::Status StartUpFailure();
  void ReadOutput(Child* child);
  void Notice(std::string_view line);
  absl::Duration DrainTimeout(MeshRole role) const;

  MeshLauncherOptions options_;
  std::string work_dir_;
  std::string router_address_;
  std::vector<std::unique_ptr<Child>> children_;  // start order
  std::vector<ProcessExit> reaped_;               // reaped but not yet returned
  bool stopped_ = false;
  mutable absl::Mutex mu_;  // guards the children's addresses and output
};

// RunMesh is `dserve up` after its flags: blocks SIGINT and SIGTERM (call it
// before any other thread exists), starts the mesh, prints
//   router listening on HOST:PORT
//   try: dserve generate --endpoint HOST:PORT --prompt "Hello"
// to `out` (flushed) and writes HOST:PORT to `ready_file` when not empty;
// reports children that exit later on `notices` (a dead worker leaves the rest
// running; a dead router stops the mesh); on SIGINT or SIGTERM stops the mesh
// in order (a second signal kills what is left). Returns the exit code: 0
// after a signal, 1 when start-up failed or the router died.
int RunMesh(MeshLauncherOptions options, const std::string& ready_file, FILE* out);

}  // namespace dserve::services

#endif  // DSERVE_SERVICES_MESH_LAUNCHER_H_
