// services/mesh_launcher.cc: child processes of `dserve up`: spawning,
// start-up checks, output forwarding and the ordered drain.
#include "services/mesh_launcher.h"

#include <fcntl.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <filesystem>
#include <fstream>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/strip.h"
#include "base/status_macros.h"
#include "google/protobuf/util/json_util.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "services/config.h"

namespace dserve::services {

// The generated mesh_yaml.cc defines this from services/mesh.yaml.
extern const char kMeshYaml[];

namespace {

absl::Duration FromProto(const google::protobuf::Duration& d) {
  return absl::Seconds(d.seconds()) + absl::Nanoseconds(d.nanos());
}

const char* RoleService(MeshRole role) {
  switch (role) {
    case MeshRole::kRouter:
      return "router";
    case MeshRole::kPrefill:
      return "prefill";
    case MeshRole::kDecode:
      return "decode";
  }
  return "";
}

absl::StatusOr<std::string> ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  options.add_whitespace = true;
  std::string json;
  const auto status = google::protobuf::util::MessageToJsonString(message, &json, options);
  if (!status.ok()) {
    return absl::InternalError(absl::StrCat("cannot write ", message.GetTypeName(),
                                            " as JSON: ", status.message().as_string()));
  }
  return json;
}

// PollInterval: how often start-up and shutdown look at children, signals
// and health answers.
constexpr absl::Duration kPollInterval = absl::Milliseconds(20);

}  // namespace

std::string_view DefaultMeshConfigText() { return kMeshYaml; }

absl::StatusOr<config::v1::MeshConfig> LoadMeshConfig(const MeshOverrides& o) {
  config::v1::MeshConfig config;
  if (o.config_path.empty()) {
    DSERVE_RETURN_IF_ERROR(
        ParseConfigText(DefaultMeshConfigText(), "services/mesh.yaml (built in)", &config));
  } else {
    DSERVE_RETURN_IF_ERROR(LoadConfigFile(o.config_path, &config));
  }
  if (!o.model_dir.empty()) config.set_model_dir(o.model_dir);
  if (!o.transport.empty()) {
    if (o.transport != "tcp" && o.transport != "shm") {
      return absl::InvalidArgumentError(
          absl::StrCat("flag --transport: \"", o.transport, "\" is not one of tcp, shm"));
    }
    config.mutable_prefill()->mutable_transport()->set_kind(o.transport);
    config.mutable_decode()->mutable_transport()->set_kind(o.transport);
  }
  const std::pair<const char*, const std::optional<int32_t>*> counts[] = {
      {"--prefill-workers", &o.prefill_workers},
      {"--decode-workers", &o.decode_workers},
      {"--aggregated-workers", &o.aggregated_workers}};
  for (const auto& [flag, value] : counts) {
    if (value->has_value() && (**value < 0 || **value > 64)) {
      return absl::InvalidArgumentError(
          absl::StrCat("flag ", flag, " must be in [0, 64], got ", **value));
    }
  }
  const bool disaggregated_flags = o.prefill_workers.has_value() || o.decode_workers.has_value();
  if (disaggregated_flags && o.aggregated_workers.value_or(0) > 0) {
    return absl::InvalidArgumentError(
        "flag --aggregated-workers excludes --prefill-workers and --decode-workers");
  }
  if (o.aggregated_workers.value_or(0) > 0) {
    config.set_aggregated_workers(*o.aggregated_workers);
    config.set_prefill_workers(0);
    config.set_decode_workers(0);
  } else if (disaggregated_flags || o.aggregated_workers.has_value()) {
    config.set_aggregated_workers(0);
    if (o.prefill_workers) config.set_prefill_workers(*o.prefill_workers);
    if (o.decode_workers) config.set_decode_workers(*o.decode_workers);
  }
  DSERVE_RETURN_IF_ERROR(Finalize(config));
  if (config.model_dir().empty()) {
    return absl::InvalidArgumentError(
        "model_dir must be set (with --model DIR or in the mesh config)");
  }
  return config;
}

absl::StatusOr<std::string> SiblingBinaryDir() {
  std::error_code ec;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot read /proc/self/exe: ", ec.message()));
  }
  return self.parent_path().string();
}

std::string ProcessExit::Describe() const {
  std::string how;
  if (WIFEXITED(wait_status)) {
    how = absl::StrCat("exited with status ", WEXITSTATUS(wait_status));
  } else if (WIFSIGNALED(wait_status)) {
    how = absl::StrCat("was killed by signal ", WTERMSIG(wait_status), " (",
                       strsignal(WTERMSIG(wait_status)), ")");
  } else {
    how = absl::StrCat("ended with wait status ", wait_status);
  }
  return absl::StrCat(name, " (pid ", pid, ") ", how);
}

// Child: one process of the mesh. `address` is set by its output reader
// thread (under mu_); the rest belongs to the launcher's thread.
struct MeshLauncher::Child {
  std::string name;
  MeshRole role;
  pid_t pid = -1;
  bool running = false;
  int stdout_fd = -1;
  std::thread reader;
  std::string address;  // guarded by MeshLauncher::mu_
};

MeshLauncher::MeshLauncher(MeshLauncherOptions options) : options_(std::move(options)) {}

MeshLauncher::~MeshLauncher() { Stop(); }

void MeshLauncher::Notice(std::string_view line) {
  absl::MutexLock lock(&mu_);
  std::fprintf(options_.notices, "%.*s\n", static_cast<int>(line.size()), line.data());
  std::fflush(options_.notices);
}

absl::Duration MeshLauncher::DrainTimeout(MeshRole role) const {
  const config::v1::MeshConfig& c = options_.config;
  switch (role) {
    case MeshRole::kRouter:
      return FromProto(c.router().server().drain_timeout());
    case MeshRole::kPrefill:
      return FromProto(c.prefill().server().drain_timeout());
    case MeshRole::kDecode:
      return FromProto(c.decode().server().drain_timeout());
  }
  return absl::ZeroDuration();
}

absl::StatusOr<MeshLauncher::Child*> MeshLauncher::Spawn(std::string name, MeshRole role,
                                                         const std::string& binary,
                                                         const std::string& config_json,
                                                         std::vector<std::string> args) {
  const std::string path = absl::StrCat(options_.bin_dir, "/", binary);
  const std::string config_path = absl::StrCat(work_dir_, "/", name, ".json");
  {
    std::ofstream f(config_path, std::ios::binary);
    f << config_json;
    if (!f.good()) return absl::InternalError(absl::StrCat("cannot write ", config_path));
  }
  args.insert(args.begin(), {path, "--config", config_path});
  // Everything the child needs is built before fork: after it, only
  // async-signal-safe calls (this process has other threads).
  std::vector<char*> argv;
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string exec_error = absl::StrCat("dserve up: cannot execute ", path, "\n");

  int out[2];
  if (pipe2(out, O_CLOEXEC) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", strerror(errno)));
  }
  const pid_t parent = getpid();
  const pid_t pid = fork();
  if (pid < 0) {
    close(out[0]);
    close(out[1]);
    return absl::InternalError(absl::StrCat("fork: ", strerror(errno)));
  }
  if (pid == 0) {
    // Own process group: the terminal's Ctrl-C goes to `dserve up` only.
    setpgid(0, 0);
    // A launcher that dies without draining takes its children with it; if it
    // already died before prctl, getppid() has changed.
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() != parent) _exit(1);
    dup2(out[1], STDOUT_FILENO);
    const int devnull = open("/dev/null", O_RDONLY);
    if (devnull >= 0) dup2(devnull, STDIN_FILENO);
    // Exec keeps the signal mask and ignored signals: give the server a
    // clean slate, except that writes to the terminal from this background
    // group must not stop it.
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);
    signal(SIGINT, SIG_DFL);
    signal(SIGTERM, SIG_DFL);
    signal(SIGPIPE, SIG_DFL);
    signal(SIGTTOU, SIG_IGN);
    execv(argv[0], argv.data());
    [[maybe_unused]] ssize_t n = write(STDERR_FILENO, exec_error.data(), exec_error.size());
    _exit(127);
  }
  // Also here, so the group exists before any signal is sent to it.
  setpgid(pid, pid);
  close(out[1]);
  auto child = std::make_unique<Child>();
  child->name = std::move(name);
  child->role = role;
  child->pid = pid;
  child->running = true;
  child->stdout_fd = out[0];
  Child* c = child.get();
  children_.push_back(std::move(child));
  c->reader = std::thread([this, c] { ReadOutput(c); });
  return c;
}

void MeshLauncher::ReadOutput(Child* child) {
  const std::string prefix = absl::StrCat(RoleService(child->role), " listening on ");
  std::string pending;
  char buf[4096];
  bool seen_address = false;
  auto line_done = [&](std::string line) {
    if (!seen_address && absl::StartsWith(line, prefix)) {
      seen_address = true;
      absl::MutexLock lock(&mu_);
      child->address = std::string(absl::StripAsciiWhitespace(line.substr(prefix.size())));
      return;
    }
    Notice(absl::StrCat("[", child->name, "] ", line));
  };
  for (;;) {
    const ssize_t n = read(child->stdout_fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    pending.append(buf, static_cast<size_t>(n));
    size_t nl;
    while ((nl = pending.find('\n')) != std::string::npos) {
      line_done(pending.substr(0, nl));
      pending.erase(0, nl + 1);
    }
  }
  if (!pending.empty()) line_done(pending);
}

std::vector<ProcessExit> MeshLauncher::ReapExited() {
  for (auto& c : children_) {
    if (!c->running) continue;
    int status = 0;
    const pid_t r = waitpid(c->pid, &status, WNOHANG);
    if (r == c->pid || (r < 0 && errno == ECHILD)) {
      c->running = false;
      reaped_.push_back({c->name, c->role, c->pid, status});
    }
  }
  return std::exchange(reaped_, {});
}

std::vector<std::pair<std::string, pid_t>> MeshLauncher::Running() const {
  std::vector<std::pair<std::string, pid_t>> out;
  for (const auto& c : children_) {
    if (c->running) out.emplace_back(c->name, c->pid);
  }
  return out;
}

absl::Status MeshLauncher::StartUpFailure() {
  std::vector<ProcessExit> exits = ReapExited();
  if (exits.empty()) return absl::OkStatus();
  reaped_ = exits;  // Stop reports them too
  std::vector<std::string> what;
  for (const ProcessExit& e : exits) what.push_back(e.Describe());
  return absl::UnavailableError(
      absl::StrCat(absl::StrJoin(what, "; "), " during start-up (its log is above)"));
}

absl::Status MeshLauncher::AwaitAddresses(const std::vector<Child*>& children, absl::Time deadline,
                                          absl::FunctionRef<bool()> interrupted) {
  for (;;) {
    std::vector<std::string> missing;
    {
      absl::MutexLock lock(&mu_);
      for (Child* c : children) {
        if (c->address.empty()) missing.push_back(c->name);
      }
    }
    if (missing.empty()) return absl::OkStatus();
    DSERVE_RETURN_IF_ERROR(StartUpFailure());
    if (interrupted()) return absl::CancelledError("interrupted during start-up");
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat(absl::StrJoin(missing, ", "), " did not print its listening address within ",
                       absl::FormatDuration(FromProto(options_.config.startup_timeout())),
                       " (startup_timeout)"));
    }
    absl::SleepFor(kPollInterval);
  }
}

absl::Status MeshLauncher::AwaitServing(absl::Time deadline,
                                        absl::FunctionRef<bool()> interrupted) {
  struct Probe {
    Child* child;
    std::unique_ptr<grpc::health::v1::Health::Stub> stub;
    bool serving = false;
    std::string last;
  };
  std::vector<Probe> probes;
  {
    absl::MutexLock lock(&mu_);
    for (auto& c : children_) {
      probes.push_back({c.get(),
                        grpc::health::v1::Health::NewStub(
                            grpc::CreateChannel(c->address, grpc::InsecureChannelCredentials())),
                        false, "no answer yet"});
    }
  }
  for (;;) {
    bool all = true;
    for (Probe& p : probes) {
      if (p.serving) continue;
      grpc::ClientContext context;
      // Not capped by the start-up deadline: a check cut short would hide the
      // last real answer the error message reports.
      context.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
      grpc::health::v1::HealthCheckRequest request;
      grpc::health::v1::HealthCheckResponse response;
      const grpc::Status s = p.stub->Check(&context, request, &response);
      if (s.ok() && response.status() == grpc::health::v1::HealthCheckResponse::SERVING) {
        p.serving = true;
        continue;
      }
      all = false;
      p.last = s.ok() ? grpc::health::v1::HealthCheckResponse::ServingStatus_Name(response.status())
                      : absl::StrCat(
                            absl::StatusCodeToString(static_cast<absl::StatusCode>(s.error_code())),
                            ": ", s.error_message());
    }
    if (all) return absl::OkStatus();
    DSERVE_RETURN_IF_ERROR(StartUpFailure());
    if (interrupted()) return absl::CancelledError("interrupted during start-up");
    if (absl::Now() >= deadline) {
      std::vector<std::string> what;
      for (const Probe& p : probes) {
        if (!p.serving) {
          what.push_back(absl::StrCat(p.child->name, " at ", p.child->address, " (", p.last, ")"));
        }
      }
      return absl::DeadlineExceededError(
          absl::StrCat(absl::StrJoin(what, ", "), " not SERVING within ",
                       absl::FormatDuration(FromProto(options_.config.startup_timeout())),
                       " (startup_timeout)"));
    }
    absl::SleepFor(kPollInterval);
  }
}

absl::Status MeshLauncher::Start(absl::FunctionRef<bool()> interrupted) {
  if (!children_.empty() || stopped_) {
    return absl::FailedPreconditionError("a MeshLauncher starts once");
  }
  absl::Status s = StartUp(interrupted);
  if (!s.ok()) {
    Stop(interrupted);
  }
  return s;
}

absl::Status MeshLauncher::StartUp(absl::FunctionRef<bool()> interrupted) {
  const config::v1::MeshConfig& mesh = options_.config;
  const bool aggregated = mesh.aggregated_workers() > 0;
  for (const char* binary : {"dserve-router", "dserve-prefill", "dserve-decode"}) {
    if (aggregated && std::string_view(binary) == "dserve-prefill") continue;
    const std::string path = absl::StrCat(options_.bin_dir, "/", binary);
    if (access(path.c_str(), X_OK) != 0) {
      return absl::FailedPreconditionError(
          absl::StrCat(binary, " is not in ", options_.bin_dir,
                       " (dserve up runs the server binaries built beside dserve)"));
    }
  }
  std::string dir_template =
      absl::StrCat(std::filesystem::temp_directory_path().string(), "/dserve-up-XXXXXX");
  if (mkdtemp(dir_template.data()) == nullptr) {
    return absl::InternalError(absl::StrCat("mkdtemp ", dir_template, ": ", strerror(errno)));
  }
  work_dir_ = dir_template;
  const absl::Time deadline = absl::Now() + FromProto(mesh.startup_timeout());
  const std::string worker_listen = "127.0.0.1:0";

  // Workers first: the router needs their addresses.
  std::vector<Child*> workers;
  for (int i = 0; i < mesh.prefill_workers() && !aggregated; ++i) {
    config::v1::PrefillConfig c = mesh.prefill();
    const std::string id = absl::StrCat("prefill-", i);
    c.set_worker_id(id);
    c.mutable_server()->set_listen(worker_listen);
    DSERVE_ASSIGN_OR_RETURN(std::string json, ToJson(c));
    DSERVE_ASSIGN_OR_RETURN(Child * child, Spawn(id, MeshRole::kPrefill, "dserve-prefill", json,
                                                 {"--model", mesh.model_dir(), "--listen",
                                                  worker_listen, "--worker-id", id}));
    workers.push_back(child);
  }
  const int decoders = aggregated ? mesh.aggregated_workers() : mesh.decode_workers();
  for (int i = 0; i < decoders; ++i) {
    config::v1::DecodeConfig c = mesh.decode();
    const std::string id = absl::StrCat(aggregated ? "aggregated-" : "decode-", i);
    c.set_worker_id(id);
    c.set_aggregated(aggregated);
    c.mutable_server()->set_listen(worker_listen);
    std::vector<std::string> args = {"--model",     mesh.model_dir(), "--listen",
                                     worker_listen, "--worker-id",    id};
    if (aggregated) args.push_back("--aggregated");
    DSERVE_ASSIGN_OR_RETURN(std::string json, ToJson(c));
    DSERVE_ASSIGN_OR_RETURN(Child * child,
                            Spawn(id, MeshRole::kDecode, "dserve-decode", json, std::move(args)));
    workers.push_back(child);
  }
  DSERVE_RETURN_IF_ERROR(AwaitAddresses(workers, deadline, interrupted));

  // The router, with the workers' addresses on its command line only.
  config::v1::RouterConfig router = mesh.router();
  router.clear_prefill_workers();
  router.clear_decode_workers();
  const std::string router_listen = router.server().listen();
  std::vector<std::string> args = {"--model", mesh.model_dir(), "--listen", router_listen};
  {
    absl::MutexLock lock(&mu_);
    for (Child* w : workers) {
      args.push_back(w->role == MeshRole::kPrefill ? "--prefill" : "--decode");
      args.push_back(w->address);
    }
  }
  DSERVE_ASSIGN_OR_RETURN(std::string json, ToJson(router));
  DSERVE_ASSIGN_OR_RETURN(Child * router_child,
                          Spawn("router", MeshRole::kRouter, "dserve-router", json, args));
  DSERVE_RETURN_IF_ERROR(AwaitAddresses({router_child}, deadline, interrupted));
  DSERVE_RETURN_IF_ERROR(AwaitServing(deadline, interrupted));
  absl::MutexLock lock(&mu_);
  router_address_ = router_child->address;
  return absl::OkStatus();
}

std::vector<ProcessExit> MeshLauncher::Stop() {
  return Stop([] { return false; });
}

std::vector<ProcessExit> MeshLauncher::Stop(absl::FunctionRef<bool()> hurry) {
  std::vector<ProcessExit> exits;
  if (stopped_) return exits;
  stopped_ = true;
  exits = ReapExited();
  bool hurried = false;
  for (MeshRole role : {MeshRole::kRouter, MeshRole::kPrefill, MeshRole::kDecode}) {
    std::vector<Child*> group;
    for (auto& c : children_) {
      if (c->role == role && c->running) group.push_back(c.get());
    }
    if (group.empty()) continue;
    // The whole process group, in case a server started helpers of its own.
    for (Child* c : group) {
      if (kill(-c->pid, SIGTERM) != 0) kill(c->pid, SIGTERM);
    }
    const absl::Time kill_at = absl::Now() + DrainTimeout(role) + options_.kill_grace;
    for (;;) {
      for (ProcessExit& e : ReapExited()) exits.push_back(std::move(e));
      bool any = false;
      for (Child* c : group) any = any || c->running;
      if (!any) break;
      hurried = hurried || hurry();
      if (hurried || absl::Now() >= kill_at) {
        for (Child* c : group) {
          if (!c->running) continue;
          Notice(absl::StrCat("dserve up: killing ", c->name, " (pid ", c->pid, ")",
                              hurried ? "" : ": it did not drain in time"));
          if (kill(-c->pid, SIGKILL) != 0) kill(c->pid, SIGKILL);
          int status = 0;
          while (waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {
          }
          c->running = false;
          exits.push_back({c->name, c->role, c->pid, status});
        }
        break;
      }
      absl::SleepFor(kPollInterval);
    }
  }
  for (auto& c : children_) {
    if (c->reader.joinable()) c->reader.join();
    if (c->stdout_fd >= 0) close(c->stdout_fd);
    c->stdout_fd = -1;
  }
  if (!work_dir_.empty()) {
    std::error_code ec;
    std::filesystem::remove_all(work_dir_, ec);
  }
  return exits;
}

int RunMesh(MeshLauncherOptions options, const std::string& ready_file, FILE* out) {
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);
  // A shell starting `dserve up &` without job control ignores SIGINT, and an
  // ignored signal is discarded even while blocked: take it back.
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  // A closed stdout must not kill the launcher before it drains the mesh.
  signal(SIGPIPE, SIG_IGN);
  // TakeSignal consumes a pending SIGINT/SIGTERM, waiting up to `wait`.
  auto take_signal = [&](absl::Duration wait) {
    const timespec ts = absl::ToTimespec(wait);
    return sigtimedwait(&stop_signals, nullptr, &ts) > 0;
  };
  auto pending_signal = [&] { return take_signal(absl::ZeroDuration()); };

  FILE* notices = options.notices;
  MeshLauncher mesh(std::move(options));
  const absl::Status started = mesh.Start(pending_signal);
  if (absl::IsCancelled(started)) {
    std::fprintf(notices, "dserve up: interrupted during start-up; stopped\n");
    return 0;
  }
  if (!started.ok()) {
    std::fprintf(stderr, "error: %s: %s\n", absl::StatusCodeToString(started.code()).c_str(),
                 std::string(started.message()).c_str());
    return 1;
  }
  const std::string& address = mesh.router_address();
  std::fprintf(out,
               "router listening on %s\ntry: dserve generate --endpoint %s --prompt \"Hello\"\n",
               address.c_str(), address.c_str());
  std::fflush(out);
  if (!ready_file.empty()) {
    const std::string tmp = ready_file + ".tmp";
    std::ofstream(tmp) << address << "\n";
    std::error_code ec;
    std::filesystem::rename(tmp, ready_file, ec);
    if (ec) {
      std::fprintf(notices, "dserve up: cannot write --ready-file %s: %s\n", ready_file.c_str(),
                   ec.message().c_str());
    }
  }

  int code = 0;
  for (;;) {
    if (take_signal(absl::Milliseconds(200))) break;
    bool router_died = false;
    for (const ProcessExit& e : mesh.ReapExited()) {
      if (e.role == MeshRole::kRouter) {
        router_died = true;
        std::fprintf(notices, "dserve up: %s; stopping the mesh\n", e.Describe().c_str());
      } else {
        std::fprintf(notices, "dserve up: %s; the rest of the mesh keeps running\n",
                     e.Describe().c_str());
      }
      std::fflush(notices);
    }
    if (router_died) {
      code = 1;
      break;
    }
  }
  std::fprintf(notices, "dserve up: stopping the router, then prefill, then decode workers\n");
  std::fflush(notices);
  for (const ProcessExit& e : mesh.Stop(pending_signal)) {
    std::fprintf(notices, "dserve up: %s\n", e.Describe().c_str());
  }
  std::fflush(notices);
  return code;
}

}  // namespace dserve::services
