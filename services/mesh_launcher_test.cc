// services/mesh_launcher_test.cc: loading the mesh config, and launching,
// supervising and stopping a mesh of real child processes: stand-ins for the
// three server binaries (mesh_launcher_fake_server) that keep their
// command-line contract, and `dserve up` itself as users run it.
#include "services/mesh_launcher.h"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace dserve::services {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::AllOf;
using ::testing::Contains;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::IsEmpty;
using ::testing::Not;

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string FreshDir(const std::string& name) {
  const std::string dir = absl::StrCat(::testing::TempDir(), "/mesh-", name, "-", getpid());
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  return dir;
}

// ---------------------------------------------------------------------------
// LoadMeshConfig

TEST(LoadMeshConfigTest, BuiltInDefaultIsServicesMeshYaml) {
  const char* src = std::getenv("DSERVE_SOURCE_DIR");
  ASSERT_NE(src, nullptr);
  EXPECT_EQ(std::string(DefaultMeshConfigText()),
            ReadAll(std::string(src) + "/services/mesh.yaml"));
}

TEST(LoadMeshConfigTest, DefaultsAndOverrides) {
  MeshOverrides o;
  o.model_dir = "/models/tiny";
  ASSERT_OK_AND_ASSIGN(config::v1::MeshConfig c, LoadMeshConfig(o));
  EXPECT_EQ(c.model_dir(), "/models/tiny");
  EXPECT_EQ(c.prefill_workers(), 1);
  EXPECT_EQ(c.decode_workers(), 1);
  EXPECT_EQ(c.aggregated_workers(), 0);
  EXPECT_EQ(c.startup_timeout().seconds(), 60);
  EXPECT_EQ(c.prefill().engine().model_dir(), "/models/tiny");
  EXPECT_EQ(c.decode().transport().kind(), "shm");

  o.transport = "tcp";
  o.prefill_workers = 2;
  o.decode_workers = 3;
  ASSERT_OK_AND_ASSIGN(c, LoadMeshConfig(o));
  EXPECT_EQ(c.prefill_workers(), 2);
  EXPECT_EQ(c.decode_workers(), 3);
  EXPECT_EQ(c.prefill().transport().kind(), "tcp");
  EXPECT_EQ(c.decode().transport().kind(), "tcp");

  MeshOverrides agg;
  agg.model_dir = "/m";
  agg.aggregated_workers = 2;
  ASSERT_OK_AND_ASSIGN(c, LoadMeshConfig(agg));
  EXPECT_EQ(c.aggregated_workers(), 2);
  EXPECT_EQ(c.prefill_workers(), 0);
  EXPECT_EQ(c.decode_workers(), 0);
}

TEST(LoadMeshConfigTest, FileCountsGiveWayToFlags) {
  const std::string dir = FreshDir("config");
  std::ofstream(dir + "/agg.yaml") << "model_dir: /m\naggregated_workers: 3\n";
  MeshOverrides o;
  o.config_path = dir + "/agg.yaml";
  ASSERT_OK_AND_ASSIGN(config::v1::MeshConfig c, LoadMeshConfig(o));
  EXPECT_EQ(c.aggregated_workers(), 3);
  EXPECT_EQ(c.model_dir(), "/m");
  o.decode_workers = 2;
  ASSERT_OK_AND_ASSIGN(c, LoadMeshConfig(o));
  EXPECT_EQ(c.aggregated_workers(), 0);
  EXPECT_EQ(c.prefill_workers(), 1);
  EXPECT_EQ(c.decode_workers(), 2);
  std::filesystem::remove_all(dir);
}

TEST(LoadMeshConfigTest, Errors) {
  MeshOverrides o;
  EXPECT_THAT(LoadMeshConfig(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--model")));
  o.model_dir = "/m";
  o.transport = "rdma";
  EXPECT_THAT(LoadMeshConfig(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--transport")));
  o.transport = "";
  o.prefill_workers = 1;
  o.aggregated_workers = 1;
  EXPECT_THAT(LoadMeshConfig(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--aggregated-workers")));
  o.aggregated_workers.reset();
  o.prefill_workers = 65;
  EXPECT_THAT(LoadMeshConfig(o),
              StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("--prefill-workers")));
  o.prefill_workers.reset();
  o.config_path = "/nonexistent/mesh.yaml";
  EXPECT_THAT(LoadMeshConfig(o), StatusIs(absl::StatusCode::kNotFound));
  const std::string dir = FreshDir("bad-config");
  std::ofstream(dir + "/bad.yaml") << "model_dir: /m\nrouter:\n  polcy: x\n";
  o.config_path = dir + "/bad.yaml";
  EXPECT_THAT(LoadMeshConfig(o), StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr("polcy")));
  std::filesystem::remove_all(dir);
}

// ---------------------------------------------------------------------------
// MeshLauncher with stand-in servers

class MeshLauncherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const std::string name = ::testing::UnitTest::GetInstance()->current_test_info()->name();
    bin_dir_ = FreshDir(name + "-bin");
    log_dir_ = FreshDir(name + "-log");
    for (const char* binary : {"dserve-router", "dserve-prefill", "dserve-decode"}) {
      std::filesystem::create_symlink(MESH_FAKE_SERVER_PATH, bin_dir_ + "/" + binary);
    }
    setenv("FAKE_MESH_LOG_DIR", log_dir_.c_str(), 1);
    unsetenv("FAKE_MESH_FAIL");
    unsetenv("FAKE_MESH_IGNORE_TERM");
    unsetenv("FAKE_MESH_NEVER_SERVING");
  }

  void TearDown() override {
    std::filesystem::remove_all(bin_dir_);
    std::filesystem::remove_all(log_dir_);
  }

  MeshLauncherOptions Options(int prefill, int decode, int aggregated) {
    MeshOverrides o;
    o.model_dir = "/models/tiny";
    if (aggregated > 0) {
      o.aggregated_workers = aggregated;
    } else {
      o.prefill_workers = prefill;
      o.decode_workers = decode;
    }
    auto config = LoadMeshConfig(o);
    EXPECT_OK(config.status());
    MeshLauncherOptions options;
    options.config = *config;
    options.config.mutable_startup_timeout()->set_seconds(20);
    options.bin_dir = bin_dir_;
    return options;
  }

  std::vector<std::string> Args(const std::string& id) {
    std::vector<std::string> lines =
        absl::StrSplit(ReadAll(log_dir_ + "/" + id + ".args"), '\n', absl::SkipEmpty());
    return lines;
  }
  // FlagValues: every value of `flag` in `args`.
  static std::vector<std::string> FlagValues(const std::vector<std::string>& args,
                                             const std::string& flag) {
    std::vector<std::string> out;
    for (size_t i = 0; i + 1 < args.size(); ++i) {
      if (args[i] == flag) out.push_back(args[i + 1]);
    }
    return out;
  }
  int64_t StoppedAt(const std::string& id) {
    return std::stoll(ReadAll(log_dir_ + "/" + id + ".stopped"));
  }

  std::string bin_dir_, log_dir_;
};

bool NoInterrupt() { return false; }

bool Alive(pid_t pid) { return kill(pid, 0) == 0; }

TEST_F(MeshLauncherTest, StartsWorkersThenRouterAndStopsInOrder) {
  MeshLauncher mesh(Options(2, 2, 0));
  ASSERT_OK(mesh.Start(NoInterrupt));
  ASSERT_THAT(mesh.router_address(), HasSubstr("127.0.0.1:"));
  const std::string work_dir = mesh.work_dir();
  EXPECT_TRUE(std::filesystem::exists(work_dir + "/router.json"));

  // Each worker: its own id, loopback port 0, the model, a config file.
  for (const std::string id : {"prefill-0", "prefill-1", "decode-0", "decode-1"}) {
    std::vector<std::string> args = Args(id);
    EXPECT_THAT(FlagValues(args, "--worker-id"), ElementsAre(id));
    EXPECT_THAT(FlagValues(args, "--listen"), ElementsAre("127.0.0.1:0"));
    EXPECT_THAT(FlagValues(args, "--model"), ElementsAre("/models/tiny"));
    EXPECT_THAT(args, Not(Contains("--aggregated")));
    const std::string config = ReadAll(log_dir_ + "/" + id + ".config");
    EXPECT_THAT(config, HasSubstr(absl::StrCat("\"worker_id\": \"", id, "\"")));
    EXPECT_THAT(config, HasSubstr("\"model_dir\": \"/models/tiny\""));
  }
  // The router: every worker's address, by role.
  std::vector<std::string> router_args = Args("router");
  EXPECT_EQ(FlagValues(router_args, "--prefill").size(), 2u);
  EXPECT_EQ(FlagValues(router_args, "--decode").size(), 2u);
  for (const std::string& a : FlagValues(router_args, "--prefill")) {
    EXPECT_THAT(a, HasSubstr("127.0.0.1:"));
    EXPECT_NE(a, "127.0.0.1:0");
  }
  EXPECT_THAT(ReadAll(log_dir_ + "/router.config"), Not(HasSubstr("addresses")));

  // The router answers health checks on the address printed.
  auto health = grpc::health::v1::Health::NewStub(
      grpc::CreateChannel(mesh.router_address(), grpc::InsecureChannelCredentials()));
  grpc::ClientContext context;
  grpc::health::v1::HealthCheckResponse response;
  ASSERT_TRUE(health->Check(&context, {}, &response).ok());
  EXPECT_EQ(response.status(), grpc::health::v1::HealthCheckResponse::SERVING);

  health.reset();

  const auto running = mesh.Running();
  ASSERT_EQ(running.size(), 5u);
  std::vector<ProcessExit> exits = mesh.Stop();
  ASSERT_EQ(exits.size(), 5u);
  EXPECT_EQ(exits[0].name, "router");
  for (const ProcessExit& e : exits) {
    EXPECT_TRUE(WIFEXITED(e.wait_status) && WEXITSTATUS(e.wait_status) == 0) << e.Describe();
  }
  // Drained in order: router, then prefill, then decode.
  EXPECT_LT(StoppedAt("router"), StoppedAt("prefill-0"));
  EXPECT_LT(std::max(StoppedAt("prefill-0"), StoppedAt("prefill-1")),
            std::min(StoppedAt("decode-0"), StoppedAt("decode-1")));
  for (const auto& [name, pid] : running) EXPECT_FALSE(Alive(pid)) << name;
  EXPECT_FALSE(std::filesystem::exists(work_dir));
  EXPECT_THAT(mesh.Stop(), IsEmpty());  // idempotent
}

TEST_F(MeshLauncherTest, AggregatedWorkersServeDecodeAlone) {
  MeshLauncher mesh(Options(0, 0, 2));
  ASSERT_OK(mesh.Start(NoInterrupt));
  for (const std::string id : {"aggregated-0", "aggregated-1"}) {
    EXPECT_THAT(Args(id), Contains("--aggregated"));
    EXPECT_THAT(ReadAll(log_dir_ + "/" + id + ".config"), HasSubstr("\"aggregated\": true"));
  }
  std::vector<std::string> router_args = Args("router");
  EXPECT_THAT(FlagValues(router_args, "--prefill"), IsEmpty());
  EXPECT_EQ(FlagValues(router_args, "--decode").size(), 2u);
  EXPECT_EQ(mesh.Stop().size(), 3u);
}

TEST_F(MeshLauncherTest, ChildExitDuringStartUpStopsEverythingAndNamesIt) {
  setenv("FAKE_MESH_FAIL", "decode-1", 1);
  MeshLauncher mesh(Options(1, 2, 0));
  EXPECT_THAT(mesh.Start(NoInterrupt),
              StatusIs(absl::StatusCode::kUnavailable,
                       AllOf(HasSubstr("decode-1"), HasSubstr("exited with status 3"))));
  EXPECT_THAT(mesh.Running(), IsEmpty());
  EXPECT_FALSE(std::filesystem::exists(log_dir_ + "/router.args"));  // never started
}

TEST_F(MeshLauncherTest, RouterExitDuringStartUpIsNamed) {
  setenv("FAKE_MESH_FAIL", "router", 1);
  MeshLauncher mesh(Options(1, 1, 0));
  EXPECT_THAT(mesh.Start(NoInterrupt),
              StatusIs(absl::StatusCode::kUnavailable, HasSubstr("router (pid")));
  EXPECT_THAT(mesh.Running(), IsEmpty());
}

TEST_F(MeshLauncherTest, NotServingInTimeIsDeadlineExceeded) {
  setenv("FAKE_MESH_NEVER_SERVING", "prefill-0", 1);
  MeshLauncherOptions options = Options(1, 1, 0);
  options.config.mutable_startup_timeout()->set_seconds(1);
  MeshLauncher mesh(options);
  EXPECT_THAT(mesh.Start(NoInterrupt),
              StatusIs(absl::StatusCode::kDeadlineExceeded,
                       AllOf(HasSubstr("prefill-0"), HasSubstr("NOT_SERVING"))));
  EXPECT_THAT(mesh.Running(), IsEmpty());
}

TEST_F(MeshLauncherTest, InterruptCancelsStartUp) {
  setenv("FAKE_MESH_NEVER_SERVING", "router", 1);
  MeshLauncher mesh(Options(1, 1, 0));
  int polls = 0;
  EXPECT_THAT(mesh.Start([&] { return ++polls > 20; }), StatusIs(absl::StatusCode::kCancelled));
  EXPECT_THAT(mesh.Running(), IsEmpty());
}

TEST_F(MeshLauncherTest, MissingBinaryIsFailedPrecondition) {
  std::filesystem::remove(bin_dir_ + "/dserve-decode");
  MeshLauncher mesh(Options(1, 1, 0));
  EXPECT_THAT(mesh.Start(NoInterrupt),
              StatusIs(absl::StatusCode::kFailedPrecondition, HasSubstr("dserve-decode")));
}

TEST_F(MeshLauncherTest, KillsAChildThatDoesNotDrain) {
  setenv("FAKE_MESH_IGNORE_TERM", "prefill-0", 1);
  MeshLauncherOptions options = Options(1, 1, 0);
  options.config.mutable_prefill()->mutable_server()->mutable_drain_timeout()->set_seconds(0);
  options.config.mutable_prefill()->mutable_server()->mutable_drain_timeout()->set_nanos(
      100'000'000);
  options.kill_grace = absl::Milliseconds(100);
  MeshLauncher mesh(options);
  ASSERT_OK(mesh.Start(NoInterrupt));
  const absl::Time t0 = absl::Now();
  std::vector<ProcessExit> exits = mesh.Stop();
  EXPECT_LT(absl::Now() - t0, absl::Seconds(5));
  ASSERT_EQ(exits.size(), 3u);
  EXPECT_EQ(exits[1].name, "prefill-0");
  EXPECT_TRUE(WIFSIGNALED(exits[1].wait_status));
  EXPECT_THAT(exits[1].Describe(), HasSubstr("killed by signal 9"));
  EXPECT_TRUE(WIFEXITED(exits[2].wait_status));  // decode still drained
}

TEST_F(MeshLauncherTest, ReportsAWorkerThatDiesLater) {
  MeshLauncher mesh(Options(1, 2, 0));
  ASSERT_OK(mesh.Start(NoInterrupt));
  pid_t victim = 0;
  for (const auto& [name, pid] : mesh.Running()) {
    if (name == "decode-1") victim = pid;
  }
  ASSERT_GT(victim, 0);
  ASSERT_EQ(kill(victim, SIGKILL), 0);
  std::vector<ProcessExit> exits;
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (exits.empty() && absl::Now() < deadline) {
    exits = mesh.ReapExited();
    if (exits.empty()) absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(exits.size(), 1u);
  EXPECT_EQ(exits[0].name, "decode-1");
  EXPECT_EQ(exits[0].role, MeshRole::kDecode);
  EXPECT_EQ(mesh.Running().size(), 3u);
  EXPECT_EQ(mesh.Stop().size(), 3u);
}

// ---------------------------------------------------------------------------
// `dserve up` as a process

class DserveUpTest : public MeshLauncherTest {
 protected:
  // Up starts `dserve up ARGS` with stdout to a file; returns its pid.
  // Its temporary directory goes under tmp_dir_, so a killed launcher's
  // leftovers stay in the test's own directory.
  pid_t Up(const std::string& args) {
    tmp_dir_ = log_dir_ + "/tmp";
    std::filesystem::create_directories(tmp_dir_);
    const std::string cmd = absl::StrCat(
        "TMPDIR=", tmp_dir_, " exec ", std::getenv("DSERVE_BINARY_DIR"), "/services/dserve up ",
        args, " --bin-dir ", bin_dir_, " > ", log_dir_, "/up.out 2> ", log_dir_, "/up.err");
    const pid_t pid = fork();
    if (pid == 0) {
      execl("/bin/sh", "sh", "-c", cmd.c_str(), static_cast<char*>(nullptr));
      _exit(127);
    }
    return pid;
  }
  // AwaitReady waits until `up` has written `path`; false when it exits
  // first or the deadline passes.
  static bool AwaitReady(pid_t up, const std::string& path, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (!std::filesystem::exists(path)) {
      if (absl::Now() > deadline || waitpid(up, nullptr, WNOHANG) != 0) return false;
      absl::SleepFor(absl::Milliseconds(10));
    }
    return true;
  }
  static int Wait(pid_t pid) {
    int status = 0;
    waitpid(pid, &status, 0);
    return status;
  }
  bool TmpDirEmpty() const { return std::filesystem::is_empty(tmp_dir_); }
  std::vector<pid_t> WorkerPids() {
    // The stand-ins record nothing about their pid; find them by their
    // config files' directory in /proc instead.
    std::vector<pid_t> out;
    for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
      const std::string name = entry.path().filename();
      if (name.find_first_not_of("0123456789") != std::string::npos) continue;
      const std::string cmdline = ReadAll(entry.path().string() + "/cmdline");
      if (cmdline.find(bin_dir_) == 0) out.push_back(std::stoi(name));
    }
    return out;
  }

  std::string tmp_dir_;
};

TEST_F(DserveUpTest, PrintsTheRouterAndDrainsOnSigint) {
  const std::string ready = log_dir_ + "/ready";
  const pid_t up = Up("--model /models/tiny --prefill-workers 2 --ready-file " + ready);
  ASSERT_TRUE(AwaitReady(up, ready, absl::Seconds(30))) << ReadAll(log_dir_ + "/up.err");
  const std::string address(absl::StripAsciiWhitespace(ReadAll(ready)));
  EXPECT_THAT(address, HasSubstr("127.0.0.1:"));
  const std::string out = ReadAll(log_dir_ + "/up.out");
  EXPECT_THAT(out, HasSubstr(absl::StrCat("router listening on ", address, "\n")));
  EXPECT_THAT(out, HasSubstr(absl::StrCat("dserve generate --endpoint ", address)));
  // The children's other stdout lines go to stderr, marked.
  EXPECT_THAT(ReadAll(log_dir_ + "/up.err"), HasSubstr("[prefill-1] a line after the address"));
  EXPECT_EQ(WorkerPids().size(), 4u);

  ASSERT_EQ(kill(up, SIGINT), 0);
  const int status = Wait(up);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << ReadAll(log_dir_ + "/up.err");
  EXPECT_LT(StoppedAt("router"), StoppedAt("prefill-0"));
  EXPECT_LT(StoppedAt("prefill-1"), StoppedAt("decode-0"));
  EXPECT_THAT(WorkerPids(), IsEmpty());
  EXPECT_THAT(ReadAll(log_dir_ + "/up.err"), HasSubstr("decode-0 (pid"));
  EXPECT_TRUE(TmpDirEmpty());  // the children's config files are gone
}

TEST_F(DserveUpTest, KilledLauncherLeavesNoOrphans) {
  const std::string ready = log_dir_ + "/ready";
  const pid_t up = Up("--model /models/tiny --ready-file " + ready);
  ASSERT_TRUE(AwaitReady(up, ready, absl::Seconds(30))) << ReadAll(log_dir_ + "/up.err");
  ASSERT_EQ(WorkerPids().size(), 3u);
  ASSERT_EQ(kill(up, SIGKILL), 0);
  Wait(up);
  // Each child got SIGTERM from the kernel when its parent died.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (!WorkerPids().empty() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_THAT(WorkerPids(), IsEmpty());
  EXPECT_TRUE(std::filesystem::exists(log_dir_ + "/decode-0.stopped"));
}

TEST_F(DserveUpTest, StartUpFailureExitsOneNamingTheChild) {
  setenv("FAKE_MESH_FAIL", "prefill-0", 1);
  const pid_t up = Up("--model /models/tiny");
  const int status = Wait(up);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 1);
  EXPECT_THAT(ReadAll(log_dir_ + "/up.err"), AllOf(HasSubstr("error: UNAVAILABLE: prefill-0 (pid"),
                                                   HasSubstr("exited with status 3")));
  EXPECT_THAT(WorkerPids(), IsEmpty());
}

// Dserve runs the dserve binary to completion.
struct CliResult {
  int exit_code;
  std::string out, err;
};
CliResult Dserve(const std::string& args, const std::string& dir) {
  const std::string cmd = absl::StrCat(std::getenv("DSERVE_BINARY_DIR"), "/services/dserve ", args,
                                       " > ", dir, "/cli.out 2> ", dir, "/cli.err");
  const int status = std::system(cmd.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, ReadAll(dir + "/cli.out"),
          ReadAll(dir + "/cli.err")};
}

std::string LastLine(const std::string& text) {
  std::vector<std::string> lines = absl::StrSplit(text, '\n', absl::SkipEmpty());
  return lines.empty() ? "" : lines.back();
}

TEST_F(DserveUpTest, GenerateAndBenchAgainstTheMesh) {
  const std::string ready = log_dir_ + "/ready";
  const pid_t up = Up("--model /models/tiny --ready-file " + ready);
  ASSERT_TRUE(AwaitReady(up, ready, absl::Seconds(30))) << ReadAll(log_dir_ + "/up.err");
  const std::string address(absl::StripAsciiWhitespace(ReadAll(ready)));
  const std::string endpoint = "--endpoint " + address;

  CliResult r = Dserve("generate " + endpoint + " --prompt hi --max-tokens 3", log_dir_);
  EXPECT_EQ(r.exit_code, 0) << r.err;
  EXPECT_EQ(r.out, "hi t0 t1 t2\n");

  r = Dserve("generate " + endpoint +
                 " --prompt hi --max-tokens 3 --seed 4 --temperature 0 --stop x --json",
             log_dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  const nlohmann::json j = nlohmann::json::parse(r.out);
  EXPECT_EQ(j["text"], " t0 t1 t2");
  EXPECT_EQ(j["token_ids"], nlohmann::json({100, 101, 102}));
  EXPECT_EQ(j["finish_reason"], "length");
  EXPECT_EQ(j["usage"]["completion_tokens"], 3);
  EXPECT_GE(j["ttft_ms"].get<double>(), 0.0);
  EXPECT_GE(j["e2e_ms"].get<double>(), j["ttft_ms"].get<double>());

  r = Dserve("generate " + endpoint + " --prompt hi --max-tokens 5000", log_dir_);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("error: INVALID_ARGUMENT: max_tokens must be in [1, 1000]"));
  EXPECT_EQ(r.out, "");  // nothing streamed, nothing echoed
  r = Dserve("generate " + endpoint + " --prompt hi --backend cpu", log_dir_);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("--backend"));

  r = Dserve("bench " + endpoint +
                 " --rate 200 --prompt-len 8 --output-len uniform:1,4 --requests 20 --json",
             log_dir_);
  ASSERT_EQ(r.exit_code, 0) << r.err;
  EXPECT_THAT(r.out, AllOf(HasSubstr("ttft"), HasSubstr("tpot"), HasSubstr("e2e")));
  nlohmann::json b = nlohmann::json::parse(LastLine(r.out));
  EXPECT_EQ(b["succeeded"], 20);
  EXPECT_EQ(b["failed"], 0);
  EXPECT_EQ(b["schedule"]["requests"], 20);
  EXPECT_GT(b["output_token_throughput"].get<double>(), 0.0);

  // The stand-in's context is 64 tokens: long Azure prompts are shortened.
  const std::string trace = std::string(std::getenv("DSERVE_SOURCE_DIR")) +
                            "/../shared/traces/AzureLLMInferenceTrace_code_2023.csv";
  if (std::filesystem::exists(trace)) {
    r = Dserve("bench " + endpoint + " --trace " + trace +
                   " --requests 10 --time-scale 100 --max-output-len 4 --json",
               log_dir_);
    ASSERT_EQ(r.exit_code, 0) << r.err;
    EXPECT_THAT(r.out, HasSubstr("shortened to fit the context"));
    b = nlohmann::json::parse(LastLine(r.out));
    EXPECT_EQ(b["succeeded"], 10);
    EXPECT_EQ(b["schedule"]["trace_format"], "azure");
    EXPECT_GT(b["schedule"]["shortened_to_fit_context"].get<int>(), 0);
    EXPECT_LE(b["prompt_tokens"].get<int>(), 10 * 63);
  }

  r = Dserve("bench " + endpoint + " --rate 1 --output-len 4", log_dir_);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("error: INVALID_ARGUMENT: flag --prompt-len is required"));
  r = Dserve("bench " + endpoint + " --rate 1 --prompt-len normal:5 --output-len 4", log_dir_);
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_THAT(r.err, HasSubstr("flag --prompt-len: \"normal:5\""));

  ASSERT_EQ(kill(up, SIGTERM), 0);
  const int status = Wait(up);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);
}

TEST_F(DserveUpTest, GenerateWithNoServerIsUnavailable) {
  CliResult r = Dserve("generate --endpoint 127.0.0.1:1 --prompt hi", log_dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("error: UNAVAILABLE: "));
  r = Dserve("bench --endpoint 127.0.0.1:1 --rate 1 --prompt-len 1 --output-len 1", log_dir_);
  EXPECT_EQ(r.exit_code, 1);
  EXPECT_THAT(r.err, HasSubstr("error: UNAVAILABLE: GetModelInfo from 127.0.0.1:1"));
}

TEST_F(DserveUpTest, BadFlagsExitTwo) {
  const int status = Wait(Up("--model /m --transport rdma"));
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 2);
  EXPECT_THAT(ReadAll(log_dir_ + "/up.err"),
              HasSubstr("error: INVALID_ARGUMENT: flag --transport"));
}

}  // namespace
}  // namespace dserve::services
