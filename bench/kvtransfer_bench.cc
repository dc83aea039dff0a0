// bench/kvtransfer_bench.cc: moves one prompt's MLA KV cache between two
// processes through KvTransport (kvtransfer/transport.h) and reports every
// figure beside a ceiling measured in the same run, as a ratio.
//
// Processes. This process is the mover (a prefill worker pushing its KV); a
// child forked before any UCX context exists is the holder (a decode worker
// whose blocks are leased). They talk over a socketpair: the holder sends
// its serialized KvLeaseTarget, the mover answers with commands, the holder
// reports when its lease ended and when the data became visible. Both use
// CLOCK_MONOTONIC, which is one clock for every process on the machine.
//
// Pools. Both sides hold a layer-major pool (engine::KvBlockPool's layout)
// of --pool-factor times the blocks the prompt needs. By default each side
// draws the sequence's blocks from its pool in shuffled order (a fragmented
// pool: one op per block per layer); --layout-blocks contiguous takes ids
// 0..n-1 on both sides (one op per layer).
//
// Figures (medians; each with its ceiling and ratio = ours / ceiling):
//  - bandwidth: the prompt's KV bytes / time from the first Submit to
//    Commit OK. Ceiling: ucx_perftest over the same UCX_TLS at the plan's
//    per-op message size, the fastest of -t tag_bw and -t ucp_put_bw (on tcp
//    each also with -e, error mode PEER). perftest reuses one message-sized
//    buffer (cache-resident); the run also measures two memory-bound
//    references: ApplyPlan (memcpy of the same plan in one process) and, on
//    shm, ucp_put_bw at 256 MiB.
//  - latency: one block of one layer (a single put) Submit -> Commit OK on the
//    mover (put, flush, commit message, ack: a round trip), and Submit -> last
//    byte visible in the holder's memory (one way). Ceiling: ucx_perftest
//    -t ucp_put_lat at that size, which reports half its ping-pong round
//    trip; the round-trip ratio uses twice that.
//  - overlap: the mover "computes" each layer (sleeps for the modelled
//    per-layer prefill time: the GPU computes, the CPU is free), submits it,
//    and commits after the last; the transfer time left exposed after the
//    last layer's compute, against the transfer alone, gives the hidden
//    fraction.
//
// Every phase also reports the CPU load of other processes during it
// (machine busy time from /proc/stat minus this benchmark's own), because
// the machine is small and shared.
//
// `--json` prints one JSON object as the last line of stdout.
#include <fcntl.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <spawn.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <numeric>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/time.h"
#include "base/status_macros.h"
#include "engine/model_init.h"
#include "kvtransfer/transfer_plan.h"
#include "kvtransfer/transport.h"
#include "nlohmann/json.hpp"

namespace dserve::bench {
namespace {

using kvtransfer::KvBlockId;
using kvtransfer::KvLeaseAccess;
using kvtransfer::KvLeaseTarget;
using kvtransfer::KvLocalBlocks;
using kvtransfer::KvPoolLayout;
using kvtransfer::KvPoolShape;
using kvtransfer::KvRegion;
using kvtransfer::KvTransfer;
using kvtransfer::KvTransport;
using kvtransfer::KvTransportKind;
using kvtransfer::KvTransportOptions;
using nlohmann::json;

constexpr int64_t kMiB = 1 << 20;
// DeepSeek-V3's MLA cache, the shape --shape deepseek-v3 moves and the
// 4k-token transfer every run converts its rate into.
constexpr int64_t kDeepSeekV3Layers = 61;
constexpr int64_t kDeepSeekV3Values = 576;  // kv_lora_rank 512 + qk_rope_head_dim 64
constexpr int64_t kDeepSeekV3ElementBytes = 2;
// Prefill rates for the overlap model (tokens per second of one prompt).
// small: bench/README.md's engine_bench run on this machine (512-token
// prompt, one thread). DeepSeek-V3 cannot run here; DeepSeek's published
// figure for its own service is 73.7k input tokens/s per H800 node during
// prefill (cache hits included), a GPU prefill worker's pace.
constexpr double kSmallPrefillTokensPerSecond = 1043;
constexpr double kDeepSeekV3PrefillTokensPerSecond = 73700;

// ----------------------------------------------------------------------------
// Options and the shape of what moves.

struct Args {
  KvTransportKind transport = KvTransportKind::kSharedMemory;
  int64_t tokens = 4096;
  int64_t block_tokens = 16;
  std::string shape = "deepseek-v3";
  bool contiguous = false;
  double pool_factor = 1.25;
  int64_t iters = 0;  // 0: by transfer size
  int64_t latency_iters = 200;
  int64_t overlap_iters = 0;        // 0: by modelled prefill time
  double prefill_tokens_per_s = 0;  // 0: the shape's default
  int max_ops_in_flight = KvTransportOptions{}.max_ops_in_flight;
  // Long by default: a benchmark on a loaded machine should not end because
  // a peer looked silent; dead-peer detection is tested elsewhere (tests/).
  double peer_timeout_s = 600;
  bool ceiling = true;
  int64_t ceiling_repeats = 2;
  double wait_quiet_s = 60;
  std::string perftest = "ucx_perftest";
  uint64_t seed = 1;
  bool json = false;
};

// KvShapeSpec: the MLA cache of one model: per token and layer it stores
// kv_lora_rank + qk_rope_head_dim values.
struct KvShapeSpec {
  std::string name;
  int64_t num_layers = 0;
  int64_t values_per_token = 0;
  int64_t element_bytes = 0;
  std::string element_type;
  double prefill_tokens_per_s = 0;
  std::string prefill_source;

  int64_t BytesPerTokenPerLayer() const { return values_per_token * element_bytes; }
};

absl::StatusOr<KvShapeSpec> ShapeFor(const std::string& name) {
  KvShapeSpec s;
  s.name = name;
  if (name == "deepseek-v3") {
    s.num_layers = kDeepSeekV3Layers;
    s.values_per_token = kDeepSeekV3Values;
    s.element_bytes = kDeepSeekV3ElementBytes;
    s.element_type = "bf16";
    s.prefill_tokens_per_s = kDeepSeekV3PrefillTokensPerSecond;
    s.prefill_source = "DeepSeek's published 73.7k input tok/s per H800 node (prefill)";
    return s;
  }
  if (name == "small") {
    DSERVE_ASSIGN_OR_RETURN(engine::ModelConfig c, engine::PresetConfig("small"));
    s.num_layers = c.num_hidden_layers;
    s.values_per_token = c.kv_cache_width();
    // engine::KvBlockPool stores the latent cache as float32.
    s.element_bytes = sizeof(float);
    s.element_type = "f32 (engine::KvBlockPool)";
    s.prefill_tokens_per_s = kSmallPrefillTokensPerSecond;
    s.prefill_source = "engine_bench on this machine (bench/README.md, 512-token prompt)";
    return s;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("--shape must be small or deepseek-v3, got \"", name, "\""));
}

// BenchSetup: everything both processes agree on, computed before the fork.
struct BenchSetup {
  Args args;
  KvShapeSpec shape;
  int64_t blocks_needed = 0;
  KvPoolLayout layout;              // both pools
  KvPoolLayout first_layer_layout;  // the same pool seen as layer 0 only
  std::vector<KvBlockId> mover_blocks;
  std::vector<KvBlockId> holder_blocks;
  kvtransfer::TransferPlan plan;
  kvtransfer::TransferPlanStats plan_stats;
  int64_t message_bytes = 0;  // the plan's median op size: the ceilings' message
  int64_t latency_bytes = 0;  // one block of one layer
};

// SequenceBlocks: `count` distinct ids of a `pool`-block pool, in the order
// a fragmented pool hands them out (shuffled) or as one run from 0.
std::vector<KvBlockId> SequenceBlocks(int64_t pool, int64_t count, bool contiguous, uint64_t seed) {
  std::vector<KvBlockId> ids(pool);
  std::iota(ids.begin(), ids.end(), 0);
  if (!contiguous) {
    std::mt19937_64 rng(seed);
    std::shuffle(ids.begin(), ids.end(), rng);
  }
  ids.resize(count);
  return ids;
}

absl::StatusOr<BenchSetup> MakeSetup(const Args& args) {
  BenchSetup s;
  s.args = args;
  DSERVE_ASSIGN_OR_RETURN(s.shape, ShapeFor(args.shape));
  if (args.prefill_tokens_per_s > 0) {
    s.shape.prefill_tokens_per_s = args.prefill_tokens_per_s;
    s.shape.prefill_source = "--prefill-tokens-per-s";
  }
  s.blocks_needed = (args.tokens + args.block_tokens - 1) / args.block_tokens;
  const int64_t pool_blocks = std::max(
      s.blocks_needed, static_cast<int64_t>(std::ceil(s.blocks_needed * args.pool_factor)));
  s.layout = kvtransfer::LayerMajorLayout(
      KvPoolShape{.num_layers = s.shape.num_layers,
                  .num_blocks = pool_blocks,
                  .block_tokens = args.block_tokens,
                  .bytes_per_token_per_layer = s.shape.BytesPerTokenPerLayer()});
  s.first_layer_layout = s.layout;
  s.first_layer_layout.num_layers = 1;
  s.mover_blocks = SequenceBlocks(pool_blocks, s.blocks_needed, args.contiguous, args.seed);
  s.holder_blocks = SequenceBlocks(pool_blocks, s.blocks_needed, args.contiguous, args.seed + 1);
  DSERVE_ASSIGN_OR_RETURN(s.plan, kvtransfer::MakeTransferPlan({.src_layout = s.layout,
                                                                .src_blocks = s.mover_blocks,
                                                                .dst_layout = s.layout,
                                                                .dst_blocks = s.holder_blocks,
                                                                .num_tokens = args.tokens,
                                                                .layers = std::nullopt}));
  s.plan_stats = s.plan.Stats();
  std::vector<int64_t> sizes;
  for (const auto& layer : s.plan.layers) {
    for (const auto& op : layer.ops) sizes.push_back(op.bytes);
  }
  std::nth_element(sizes.begin(), sizes.begin() + sizes.size() / 2, sizes.end());
  s.message_bytes = sizes[sizes.size() / 2];
  s.latency_bytes = args.block_tokens * s.shape.BytesPerTokenPerLayer();
  return s;
}

// ----------------------------------------------------------------------------
// Small utilities: clocks, CPU accounting, statistics.

int64_t MonotonicNs() {
  timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

void SleepUntilNs(int64_t deadline_ns) {
  timespec ts{.tv_sec = deadline_ns / 1000000000, .tv_nsec = deadline_ns % 1000000000};
  while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, nullptr) == EINTR) {
  }
}

double RusageSeconds(int who) {
  rusage u{};
  getrusage(who, &u);
  return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) * 1e-6;
}

// MachineBusySeconds: CPU time all cores spent running tasks (user, nice,
// system). Interrupt and softirq time are left out: loopback tcp does much of
// its work in softirq, which is this benchmark's, yet counted to no task.
double MachineBusySeconds() {
  std::ifstream stat("/proc/stat");
  std::string cpu;
  double user = 0, nice = 0, system = 0;
  stat >> cpu >> user >> nice >> system;
  return (user + nice + system) / static_cast<double>(sysconf(_SC_CLK_TCK));
}

double Median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(std::lround(p * (v.size() - 1))));
  return v[i];
}

// FillRandom: fast pseudo-random bytes (splitmix64), so no page is zero.
void FillRandom(uint8_t* data, int64_t bytes, uint64_t seed) {
  uint64_t x = seed;
  auto* words = reinterpret_cast<uint64_t*>(data);
  for (int64_t i = 0; i < bytes / 8; ++i) {
    uint64_t z = (x += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    words[i] = z ^ (z >> 31);
  }
}

// HashTokens: XXH3 of tokens [0, num_tokens) of every layer, in token order,
// so two pools holding the same sequence hash alike whatever their blocks.
uint64_t HashTokens(const uint8_t* base, const KvPoolLayout& y, std::span<const KvBlockId> blocks,
                    int64_t num_tokens) {
  XXH3_state_t* state = XXH3_createState();
  XXH3_64bits_reset(state);
  for (int64_t l = 0; l < y.num_layers; ++l) {
    for (int64_t t = 0, i = 0; t < num_tokens; t += y.block_tokens, ++i) {
      const int64_t n = std::min(y.block_tokens, num_tokens - t);
      XXH3_64bits_update(
          state,
          base + y.base_offset_bytes + l * y.layer_stride_bytes + blocks[i] * y.block_stride_bytes,
          n * y.bytes_per_token_per_layer);
    }
  }
  const uint64_t h = XXH3_64bits_digest(state);
  XXH3_freeState(state);
  return h;
}

// LastByteOffset: the offset of the last byte of (layer 0, `block`), where
// the latency probe watches for a block's data.
int64_t LastByteOffset(const KvPoolLayout& y, KvBlockId block) {
  return y.base_offset_bytes + block * y.block_stride_bytes +
         y.block_tokens * y.bytes_per_token_per_layer - 1;
}

// ----------------------------------------------------------------------------
// Channel: length-prefixed frames over one end of the socketpair.

class Channel {
 public:
  explicit Channel(int fd) : fd_(fd) {}

  absl::Status Send(std::string_view frame) {
    const uint64_t n = frame.size();
    DSERVE_RETURN_IF_ERROR(WriteAll(&n, sizeof n));
    return WriteAll(frame.data(), frame.size());
  }
  absl::Status SendJson(const json& j) { return Send(j.dump()); }

  absl::StatusOr<std::string> Receive() {
    uint64_t n = 0;
    DSERVE_RETURN_IF_ERROR(ReadAll(&n, sizeof n));
    std::string frame(n, '\0');
    DSERVE_RETURN_IF_ERROR(ReadAll(frame.data(), n));
    return frame;
  }
  absl::StatusOr<json> ReceiveJson() {
    DSERVE_ASSIGN_OR_RETURN(std::string frame, Receive());
    json j = json::parse(frame, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) return absl::InternalError("malformed frame from the peer process");
    return j;
  }

 private:
  absl::Status WriteAll(const void* data, size_t n) {
    const char* p = static_cast<const char*>(data);
    while (n > 0) {
      const ssize_t w = write(fd_, p, n);
      if (w < 0 && errno == EINTR) continue;
      if (w <= 0) return absl::UnavailableError("the peer process closed the channel");
      p += w;
      n -= static_cast<size_t>(w);
    }
    return absl::OkStatus();
  }
  absl::Status ReadAll(void* data, size_t n) {
    char* p = static_cast<char*>(data);
    while (n > 0) {
      const ssize_t r = read(fd_, p, n);
      if (r < 0 && errno == EINTR) continue;
      if (r <= 0) return absl::UnavailableError("the peer process closed the channel");
      p += r;
      n -= static_cast<size_t>(r);
    }
    return absl::OkStatus();
  }

  int fd_;
};

KvTransportOptions TransportOptions(const Args& args) {
  KvTransportOptions options;
  options.kind = args.transport;
  options.max_ops_in_flight = args.max_ops_in_flight;
  options.peer_timeout = absl::Seconds(args.peer_timeout_s);
  return options;
}

// ----------------------------------------------------------------------------
// The holder process: leases blocks of its pool on command and reports how
// each lease ended.

class Holder {
 public:
  Holder(const BenchSetup& setup, Channel channel) : setup_(setup), channel_(channel) {}

  // Serve answers commands until "quit" or until the mover goes away.
  absl::Status Serve() {
    DSERVE_ASSIGN_OR_RETURN(transport_,
                            kvtransfer::CreateKvTransport(TransportOptions(setup_.args)));
    DSERVE_ASSIGN_OR_RETURN(region_, transport_->AllocateRegion(setup_.layout.pool_bytes));
    DSERVE_RETURN_IF_ERROR(channel_.SendJson({{"describe", transport_->Describe()}}));
    while (true) {
      DSERVE_ASSIGN_OR_RETURN(json cmd, channel_.ReceiveJson());
      const std::string op = cmd.value("op", "");
      if (op == "quit") return absl::OkStatus();
      if (op == "lease") {
        DSERVE_RETURN_IF_ERROR(Lease(cmd));
      } else if (op == "hash") {
        const int64_t tokens = cmd.at("tokens").get<int64_t>();
        DSERVE_RETURN_IF_ERROR(channel_.SendJson(
            {{"hash", HashTokens(region_.data, setup_.layout, setup_.holder_blocks, tokens)}}));
      } else if (op == "cpu") {
        DSERVE_RETURN_IF_ERROR(channel_.SendJson({{"cpu_s", RusageSeconds(RUSAGE_SELF)}}));
      } else {
        return absl::InvalidArgumentError(absl::StrCat("unknown command ", op));
      }
    }
  }

 private:
  // Lease opens a write lease on the first `blocks` of the sequence, sends
  // the serialized target, optionally spins until the probe byte shows
  // `watch_value`, then waits for the lease to end and reports.
  absl::Status Lease(const json& cmd) {
    const bool first_layer = cmd.at("first_layer").get<bool>();
    const int64_t blocks = cmd.at("blocks").get<int64_t>();
    const int watch = cmd.at("watch").get<int>();  // 0: no probe
    const KvPoolLayout& layout = first_layer ? setup_.first_layer_layout : setup_.layout;
    std::vector<KvBlockId> ids(setup_.holder_blocks.begin(), setup_.holder_blocks.begin() + blocks);
    volatile uint8_t* probe = region_.data + LastByteOffset(layout, ids.front());
    if (watch != 0) *probe = 0;
    DSERVE_ASSIGN_OR_RETURN(
        KvLeaseTarget target,
        transport_->OpenLease(region_.id, layout, ids, KvLeaseAccess::kWrite, absl::Minutes(10),
                              [](const std::vector<KvBlockId>&) {}));
    DSERVE_RETURN_IF_ERROR(channel_.Send(kvtransfer::SerializeLeaseTarget(target)));
    int64_t data_ns = -1;
    if (watch != 0) {
      const int64_t give_up = MonotonicNs() + 10'000'000'000;
      // Yield while polling: on tcp the holder's own progress thread writes
      // the data, and this machine may have fewer cores than busy threads.
      while (*probe != watch && MonotonicNs() < give_up) sched_yield();
      if (*probe == watch) data_ns = MonotonicNs();
    }
    const absl::Status status =
        transport_->AwaitLease(target.lease_id, absl::Now() + absl::Minutes(10));
    const int64_t ended_ns = MonotonicNs();
    const std::string message(status.message());
    return channel_.SendJson({{"code", static_cast<int>(status.code())},
                              {"message", message},
                              {"data_ns", data_ns},
                              {"ended_ns", ended_ns}});
  }

  const BenchSetup& setup_;
  Channel channel_;
  std::unique_ptr<KvTransport> transport_;
  KvRegion region_;
};

// ----------------------------------------------------------------------------
// ucx_perftest: the ceilings.

struct PerftestRun {
  std::string test;
  std::string error_mode;  // "none" or "peer" (-e)
  int64_t message_bytes = 0;
  int64_t iters = 0;
  double typical_latency_us = 0;  // half the round trip for *_lat tests
  double bandwidth_bytes_per_s = 0;
  double foreign_load_cores = 0;

  json ToJson() const {
    return {{"test", test},
            {"error_mode", error_mode},
            {"message_bytes", message_bytes},
            {"iters", iters},
            {"typical_latency_us", typical_latency_us},
            {"gb_per_s", bandwidth_bytes_per_s / 1e9},
            {"foreign_load_cores", foreign_load_cores}};
  }
};

std::string UcxTls(KvTransportKind kind) {
  return kind == KvTransportKind::kTcp ? "tcp" : "posix,sysv,cma,self";
}

absl::StatusOr<int> FreeTcpPort() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return absl::InternalError("socket() failed");
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof addr;
  const bool ok = bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0 &&
                  getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len) == 0;
  close(fd);
  if (!ok) return absl::InternalError("cannot find a free tcp port");
  return ntohs(addr.sin_port);
}

// Spawn starts `argv` with UCX_TLS=`tls` in its environment, stdout and
// stderr to `out_fd` (/dev/null when -1).
absl::StatusOr<pid_t> Spawn(const std::vector<std::string>& argv, const std::string& tls,
                            int out_fd, int close_fd) {
  std::vector<std::string> env_storage;
  for (char** e = environ; *e != nullptr; ++e) {
    if (!absl::StartsWith(*e, "UCX_TLS=")) env_storage.push_back(*e);
  }
  env_storage.push_back("UCX_TLS=" + tls);
  std::vector<char*> envp, args;
  for (auto& e : env_storage) envp.push_back(e.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_storage = argv;
  for (auto& a : argv_storage) args.push_back(a.data());
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  if (out_fd >= 0) {
    posix_spawn_file_actions_adddup2(&actions, out_fd, 1);
    posix_spawn_file_actions_adddup2(&actions, out_fd, 2);
    if (close_fd >= 0) posix_spawn_file_actions_addclose(&actions, close_fd);
  } else {
    posix_spawn_file_actions_addopen(&actions, 1, "/dev/null", O_WRONLY, 0);
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0);
  }
  pid_t pid = -1;
  const int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), envp.data());
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("cannot run ", argv[0], ": ", std::strerror(rc),
                     " (Debian package ucx-utils; or pass --perftest PATH / --no-ceiling)"));
  }
  return pid;
}

// Reap waits for `pid` until `deadline_ns`, then kills it.
void Reap(pid_t pid, int64_t deadline_ns) {
  while (waitpid(pid, nullptr, WNOHANG) == 0) {
    if (MonotonicNs() > deadline_ns) {
      kill(pid, SIGKILL);
      waitpid(pid, nullptr, 0);
      return;
    }
    usleep(10000);
  }
}

// RunPerftest runs one ucx_perftest server/client pair on loopback and
// parses the client's final CSV line.
absl::StatusOr<PerftestRun> RunPerftest(const Args& args, const std::string& test,
                                        int64_t message_bytes, int64_t iters, bool peer_mode) {
  DSERVE_ASSIGN_OR_RETURN(const int port, FreeTcpPort());
  const std::string tls = UcxTls(args.transport);
  const double busy0 = MachineBusySeconds(), own0 = RusageSeconds(RUSAGE_CHILDREN);
  const int64_t t0 = MonotonicNs();
  DSERVE_ASSIGN_OR_RETURN(pid_t server,
                          Spawn({args.perftest, "-p", absl::StrCat(port)}, tls, -1, -1));
  std::vector<std::string> client_argv = {
      args.perftest, "127.0.0.1",
      "-p",          absl::StrCat(port),
      "-t",          test,
      "-s",          absl::StrCat(message_bytes),
      "-n",          absl::StrCat(iters),
      "-w",          absl::StrCat(std::max<int64_t>(1, iters / 10)),
      "-v"};
  if (peer_mode) client_argv.push_back("-e");
  const int64_t deadline = MonotonicNs() + 120'000'000'000;
  std::string output;
  std::optional<std::vector<double>> fields;
  for (int attempt = 0; attempt < 50 && !fields.has_value(); ++attempt) {
    usleep(100000);  // the server needs a moment to listen
    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
    absl::StatusOr<pid_t> client = Spawn(client_argv, tls, pipe_fds[1], pipe_fds[0]);
    close(pipe_fds[1]);
    if (!client.ok()) {
      close(pipe_fds[0]);
      kill(server, SIGKILL);
      Reap(server, 0);
      return client.status();
    }
    output.clear();
    char buf[4096];
    while (true) {
      pollfd p{.fd = pipe_fds[0], .events = POLLIN, .revents = 0};
      const int remaining_ms =
          static_cast<int>(std::max<int64_t>(0, (deadline - MonotonicNs()) / 1000000));
      if (poll(&p, 1, remaining_ms) <= 0) break;  // timed out
      const ssize_t n = read(pipe_fds[0], buf, sizeof buf);
      if (n <= 0) break;
      output.append(buf, static_cast<size_t>(n));
    }
    close(pipe_fds[0]);
    Reap(*client, MonotonicNs() < deadline ? deadline : 0);
    for (absl::string_view line : absl::StrSplit(output, '\n')) {
      std::vector<absl::string_view> parts = absl::StrSplit(line, ',');
      if (parts.size() != 8) continue;
      std::vector<double> v(8);
      bool numeric = true;
      for (size_t i = 0; i < 8; ++i) numeric = numeric && absl::SimpleAtod(parts[i], &v[i]);
      if (numeric) fields = v;  // the last one is the final result
    }
    if (fields.has_value() || !absl::StrContains(output, "onnect") || MonotonicNs() > deadline) {
      break;
    }
  }
  Reap(server, MonotonicNs() + 5'000'000'000);
  if (!fields.has_value()) {
    return absl::UnavailableError(absl::StrCat("ucx_perftest -t ", test, " -s ", message_bytes,
                                               " (UCX_TLS=", tls,
                                               ") gave no result: ", output.substr(0, 400)));
  }
  const double wall = (MonotonicNs() - t0) * 1e-9;
  PerftestRun run;
  run.test = test;
  run.error_mode = peer_mode ? "peer" : "none";
  run.message_bytes = message_bytes;
  run.iters = static_cast<int64_t>((*fields)[0]);
  run.typical_latency_us = (*fields)[1];
  run.bandwidth_bytes_per_s = (*fields)[5] * kMiB;  // perftest's "MB/s" is MiB/s
  run.foreign_load_cores = std::max(
      0.0, ((MachineBusySeconds() - busy0) - (RusageSeconds(RUSAGE_CHILDREN) - own0)) / wall);
  return run;
}

// Ceilings: the perftest figures a run compares against.
struct Ceilings {
  std::vector<PerftestRun> runs;
  std::optional<PerftestRun> bandwidth;  // fastest at the plan's message size
  std::optional<PerftestRun> streaming;  // shm: ucp_put_bw at 256 MiB
  std::optional<PerftestRun> latency;    // lowest ucp_put_lat at one block
  double memcpy_plan_bytes_per_s = 0;
};

int64_t BandwidthIters(int64_t message_bytes) {
  return std::clamp<int64_t>(512 * kMiB / message_bytes, 20, 100000);
}

absl::StatusOr<Ceilings> MeasureCeilings(const BenchSetup& s) {
  Ceilings c;
  const Args& a = s.args;
  const bool tcp = a.transport == KvTransportKind::kTcp;
  // On tcp the transport runs in error mode PEER, and so does perftest with
  // -e: UCX 1.13 then sends these sizes eagerly instead of by rendezvous,
  // several times faster. Both modes run; the faster counts. On shm PEER
  // would turn RMA off, and the transport runs in NONE.
  std::vector<bool> modes = tcp ? std::vector<bool>{false, true} : std::vector<bool>{false};
  for (int64_t r = 0; r < a.ceiling_repeats; ++r) {
    for (const char* test : {"tag_bw", "ucp_put_bw"}) {
      for (bool peer : modes) {
        std::fprintf(stderr, "ceiling: ucx_perftest -t %s -s %lld%s\n", test,
                     static_cast<long long>(s.message_bytes), peer ? " -e" : "");
        DSERVE_ASSIGN_OR_RETURN(
            PerftestRun run,
            RunPerftest(a, test, s.message_bytes, BandwidthIters(s.message_bytes), peer));
        c.runs.push_back(run);
        if (!c.bandwidth || run.bandwidth_bytes_per_s > c.bandwidth->bandwidth_bytes_per_s) {
          c.bandwidth = run;
        }
      }
    }
  }
  if (!tcp) {
    std::fprintf(stderr, "ceiling: ucx_perftest -t ucp_put_bw -s 256 MiB (streaming)\n");
    DSERVE_ASSIGN_OR_RETURN(PerftestRun run, RunPerftest(a, "ucp_put_bw", 256 * kMiB, 20, false));
    c.runs.push_back(run);
    c.streaming = run;
  }
  for (bool peer : modes) {
    std::fprintf(stderr, "ceiling: ucx_perftest -t ucp_put_lat -s %lld%s\n",
                 static_cast<long long>(s.latency_bytes), peer ? " -e" : "");
    DSERVE_ASSIGN_OR_RETURN(
        PerftestRun run, RunPerftest(a, "ucp_put_lat", s.latency_bytes, tcp ? 5000 : 20000, peer));
    c.runs.push_back(run);
    if (!c.latency || run.typical_latency_us < c.latency->typical_latency_us) c.latency = run;
  }
  // The same plan as plain memcpy in one process: what moving these ops
  // through memory costs with no transport at all.
  std::fprintf(stderr, "ceiling: memcpy of the plan\n");
  const size_t pool = static_cast<size_t>(s.layout.pool_bytes);
  std::unique_ptr<uint8_t[]> src(new uint8_t[pool]), dst(new uint8_t[pool]);
  FillRandom(src.get(), s.layout.pool_bytes, 7);
  std::memset(dst.get(), 0, pool);
  std::vector<double> seconds;
  for (int i = 0; i < 4; ++i) {
    const int64_t t0 = MonotonicNs();
    kvtransfer::ApplyPlan(s.plan, src.get(), dst.get());
    if (i > 0) seconds.push_back((MonotonicNs() - t0) * 1e-9);
  }
  c.memcpy_plan_bytes_per_s = s.plan_stats.bytes / Median(seconds);
  return c;
}

// ----------------------------------------------------------------------------
// The mover: drives transfers against the holder process.

// HolderReport: how the holder saw one lease end.
struct HolderReport {
  absl::Status status;
  int64_t data_ns = -1;  // probe byte seen (-1: not watched)
  int64_t ended_ns = 0;  // AwaitLease returned
};

// TransferTiming: one timed transfer.
struct TransferTiming {
  int64_t start_ns = 0;        // first Submit (overlap: start of layer 0's compute)
  int64_t committed_ns = 0;    // Commit returned OK
  int64_t compute_end_ns = 0;  // overlap: end of the last layer's compute
  int64_t ops = 0;
  int64_t bytes = 0;
  HolderReport holder;
};

enum class SubmitMode { kAllLayers, kLayerWise };

class Mover {
 public:
  Mover(const BenchSetup& setup, Channel channel) : setup_(setup), channel_(channel) {}

  absl::Status Init() {
    DSERVE_ASSIGN_OR_RETURN(json hello, channel_.ReceiveJson());
    holder_describe_ = hello.value("describe", "");
    DSERVE_ASSIGN_OR_RETURN(transport_,
                            kvtransfer::CreateKvTransport(TransportOptions(setup_.args)));
    DSERVE_ASSIGN_OR_RETURN(region_, transport_->AllocateRegion(setup_.layout.pool_bytes));
    FillRandom(region_.data, region_.bytes, setup_.args.seed * 7919);
    return absl::OkStatus();
  }

  const KvTransport& transport() const { return *transport_; }

  // Transfer: one lease and one transfer of `blocks` blocks (`num_tokens`
  // tokens) of all layers or of layer 0 only. `watch` (1..255) asks the
  // holder to time the arrival of the first block's last layer-0 byte.
  absl::StatusOr<TransferTiming> Transfer(bool first_layer, int64_t blocks, int64_t num_tokens,
                                          SubmitMode mode, int64_t layer_ns, int watch) {
    DSERVE_RETURN_IF_ERROR(channel_.SendJson(
        {{"op", "lease"}, {"first_layer", first_layer}, {"blocks", blocks}, {"watch", watch}}));
    DSERVE_ASSIGN_OR_RETURN(std::string wire, channel_.Receive());
    DSERVE_ASSIGN_OR_RETURN(KvLeaseTarget target, kvtransfer::ParseLeaseTarget(wire));
    const KvPoolLayout& layout = first_layer ? setup_.first_layer_layout : setup_.layout;
    KvLocalBlocks local{.region = region_.id,
                        .layout = layout,
                        .blocks = std::span(setup_.mover_blocks).first(blocks),
                        .num_tokens = num_tokens};
    if (watch != 0) region_.data[LastByteOffset(layout, setup_.mover_blocks.front())] = watch;
    TransferTiming timing;
    absl::Status status;
    {
      // If Open fails the holder waits out its lease: the run ends here (and
      // Run kills the holder).
      DSERVE_ASSIGN_OR_RETURN(std::unique_ptr<KvTransfer> transfer,
                              transport_->Open(target, local, absl::Now() + absl::Seconds(30)));
      timing.start_ns = MonotonicNs();
      status = Drive(*transfer, layout.num_layers, mode, layer_ns, timing);
      timing.committed_ns = MonotonicNs();
      timing.ops = transfer->stats().ops;
      timing.bytes = transfer->stats().bytes;
    }
    // The holder reports whatever happened (an aborted lease included).
    DSERVE_ASSIGN_OR_RETURN(json report, channel_.ReceiveJson());
    timing.holder.status = absl::Status(static_cast<absl::StatusCode>(report.at("code").get<int>()),
                                        report.at("message").get<std::string>());
    timing.holder.data_ns = report.at("data_ns").get<int64_t>();
    timing.holder.ended_ns = report.at("ended_ns").get<int64_t>();
    if (!status.ok()) return status;
    if (!timing.holder.status.ok()) return timing.holder.status;
    return timing;
  }

  absl::StatusOr<bool> VerifyFullTransfer() {
    DSERVE_RETURN_IF_ERROR(channel_.SendJson({{"op", "hash"}, {"tokens", setup_.args.tokens}}));
    DSERVE_ASSIGN_OR_RETURN(json reply, channel_.ReceiveJson());
    return reply.at("hash").get<uint64_t>() ==
           HashTokens(region_.data, setup_.layout, setup_.mover_blocks, setup_.args.tokens);
  }

  absl::StatusOr<double> HolderCpuSeconds() {
    DSERVE_RETURN_IF_ERROR(channel_.SendJson({{"op", "cpu"}}));
    DSERVE_ASSIGN_OR_RETURN(json reply, channel_.ReceiveJson());
    return reply.at("cpu_s").get<double>();
  }

  absl::Status Quit() { return channel_.SendJson({{"op", "quit"}}); }

  const std::string& holder_describe() const { return holder_describe_; }

 private:
  absl::Status Drive(KvTransfer& transfer, int64_t num_layers, SubmitMode mode, int64_t layer_ns,
                     TransferTiming& timing) {
    if (mode == SubmitMode::kAllLayers) {
      DSERVE_RETURN_IF_ERROR(transfer.Submit({0, num_layers}));
    } else {
      // Layer L is "computed" until start + (L + 1) * layer_ns, then
      // submitted; an absolute schedule, so the time Submit takes on this
      // CPU overlaps the next layer's (GPU) compute as it would for real.
      for (int64_t l = 0; l < num_layers; ++l) {
        SleepUntilNs(timing.start_ns + (l + 1) * layer_ns);
        DSERVE_RETURN_IF_ERROR(transfer.Submit({l, l + 1}));
      }
      timing.compute_end_ns = timing.start_ns + num_layers * layer_ns;
    }
    return transfer.Commit(absl::Now() + absl::Minutes(5));
  }

  const BenchSetup& setup_;
  Channel channel_;
  std::unique_ptr<KvTransport> transport_;
  KvRegion region_;
  std::string holder_describe_;
};

// LoadMeter: CPU used by other processes while a phase ran, in cores.
class LoadMeter {
 public:
  explicit LoadMeter(Mover& mover) : mover_(mover) {}
  absl::Status Start() {
    DSERVE_ASSIGN_OR_RETURN(holder0_, mover_.HolderCpuSeconds());
    busy0_ = MachineBusySeconds();
    self0_ = RusageSeconds(RUSAGE_SELF);
    t0_ = MonotonicNs();
    return absl::OkStatus();
  }
  // Stop: {foreign load in cores, mover CPU s, holder CPU s} since Start.
  absl::StatusOr<json> Stop() {
    const double wall = (MonotonicNs() - t0_) * 1e-9;
    const double busy = MachineBusySeconds() - busy0_;
    const double self = RusageSeconds(RUSAGE_SELF) - self0_;
    DSERVE_ASSIGN_OR_RETURN(double holder, mover_.HolderCpuSeconds());
    holder -= holder0_;
    return json{{"wall_s", wall},
                {"foreign_load_cores", std::max(0.0, (busy - self - holder) / wall)},
                {"mover_cpu_cores", self / wall},
                {"holder_cpu_cores", holder / wall}};
  }

 private:
  Mover& mover_;
  double holder0_ = 0, busy0_ = 0, self0_ = 0;
  int64_t t0_ = 0;
};

// WaitForQuiet waits (up to `max_s`) until other processes use less than a
// quarter of a core over one second; returns the last load seen.
double WaitForQuiet(double max_s) {
  const int64_t give_up = MonotonicNs() + static_cast<int64_t>(max_s * 1e9);
  double load = 0;
  do {
    const double busy0 = MachineBusySeconds(), self0 = RusageSeconds(RUSAGE_SELF);
    usleep(1000000);
    load = (MachineBusySeconds() - busy0) - (RusageSeconds(RUSAGE_SELF) - self0);
    if (load < 0.25) break;
    std::fprintf(stderr, "waiting for a quiet machine: other processes use %.2f cores\n", load);
  } while (MonotonicNs() < give_up);
  return load;
}

double Ratio(double ours, double ceiling) { return ceiling > 0 ? ours / ceiling : NAN; }

// RunMover measures everything; returns the result object.
absl::StatusOr<json> RunMover(const BenchSetup& s, Mover& mover, const Ceilings& ceilings,
                              double quiet_load) {
  const Args& a = s.args;
  DSERVE_RETURN_IF_ERROR(mover.Init());
  const int64_t transfer_bytes = s.plan_stats.bytes;
  const int64_t L = s.shape.num_layers;

  // Warm-up: connects, maps the holder's pool, and checks the bytes.
  std::fprintf(stderr, "warm-up transfer and check\n");
  DSERVE_RETURN_IF_ERROR(
      mover.Transfer(false, s.blocks_needed, a.tokens, SubmitMode::kAllLayers, 0, 0).status());
  DSERVE_ASSIGN_OR_RETURN(const bool verified, mover.VerifyFullTransfer());
  if (!verified) return absl::DataLossError("the holder's blocks differ from the mover's");

  // Bandwidth.
  const int64_t iters =
      a.iters > 0 ? a.iters : std::clamp<int64_t>(2'000'000'000 / transfer_bytes, 3, 20);
  std::fprintf(stderr, "bandwidth: %lld transfers of %.1f MB\n", static_cast<long long>(iters),
               transfer_bytes / 1e6);
  LoadMeter meter(mover);
  DSERVE_RETURN_IF_ERROR(meter.Start());
  std::vector<double> seconds;
  int64_t ops = 0;
  for (int64_t i = 0; i < iters; ++i) {
    DSERVE_ASSIGN_OR_RETURN(TransferTiming t, mover.Transfer(false, s.blocks_needed, a.tokens,
                                                             SubmitMode::kAllLayers, 0, 0));
    seconds.push_back((t.committed_ns - t.start_ns) * 1e-9);
    ops = t.ops;
  }
  DSERVE_ASSIGN_OR_RETURN(json bandwidth_load, meter.Stop());
  const double alone_s = Median(seconds);
  const double rate = transfer_bytes / alone_s;
  std::vector<double> rates;
  rates.reserve(seconds.size());
  for (double sec : seconds) rates.push_back(transfer_bytes / sec / 1e9);
  json bandwidth = {
      {"gb_per_s", rate / 1e9}, {"seconds", alone_s}, {"samples_gb_per_s", rates},
      {"iters", iters},         {"ops", ops},         {"message_bytes", s.message_bytes},
      {"load", bandwidth_load}, {"target", ">= 0.9"}};
  if (ceilings.bandwidth) {
    const PerftestRun& c = *ceilings.bandwidth;
    bandwidth["ceiling_gb_per_s"] = c.bandwidth_bytes_per_s / 1e9;
    bandwidth["ceiling"] = absl::StrCat(
        "ucx_perftest -t ", c.test, " -s ", c.message_bytes, " (error mode ", c.error_mode,
        ", UCX_TLS=", UcxTls(a.transport), "), fastest of tag_bw/ucp_put_bw");
    bandwidth["ratio"] = Ratio(rate, c.bandwidth_bytes_per_s);
    bandwidth["memcpy_plan_gb_per_s"] = ceilings.memcpy_plan_bytes_per_s / 1e9;
    bandwidth["ratio_vs_memcpy_plan"] = Ratio(rate, ceilings.memcpy_plan_bytes_per_s);
    if (ceilings.streaming) {
      bandwidth["streaming_ceiling_gb_per_s"] = ceilings.streaming->bandwidth_bytes_per_s / 1e9;
      bandwidth["streaming_ceiling"] = "ucx_perftest -t ucp_put_bw -s 268435456";
      bandwidth["ratio_vs_streaming"] = Ratio(rate, ceilings.streaming->bandwidth_bytes_per_s);
    }
  }

  // Latency: one block of layer 0 (one put), then one block of all layers.
  std::fprintf(stderr, "latency: %lld one-block transfers, three kinds\n",
               static_cast<long long>(a.latency_iters));
  DSERVE_RETURN_IF_ERROR(meter.Start());
  std::vector<double> commit_us, data_us, ended_us, all_layers_us;
  for (int64_t i = 0; i < a.latency_iters; ++i) {
    DSERVE_ASSIGN_OR_RETURN(
        TransferTiming t,
        mover.Transfer(true, 1, a.block_tokens, SubmitMode::kAllLayers, 0, /*watch=*/0));
    commit_us.push_back((t.committed_ns - t.start_ns) * 1e-3);
  }
  for (int64_t i = 0; i < a.latency_iters; ++i) {
    DSERVE_ASSIGN_OR_RETURN(TransferTiming t,
                            mover.Transfer(true, 1, a.block_tokens, SubmitMode::kAllLayers, 0,
                                           /*watch=*/static_cast<int>(i % 250) + 1));
    if (t.holder.data_ns > 0) data_us.push_back((t.holder.data_ns - t.start_ns) * 1e-3);
    ended_us.push_back((t.holder.ended_ns - t.start_ns) * 1e-3);
  }
  for (int64_t i = 0; i < a.latency_iters; ++i) {
    DSERVE_ASSIGN_OR_RETURN(TransferTiming t,
                            mover.Transfer(false, 1, a.block_tokens, SubmitMode::kAllLayers, 0, 0));
    all_layers_us.push_back((t.committed_ns - t.start_ns) * 1e-3);
  }
  DSERVE_ASSIGN_OR_RETURN(json latency_load, meter.Stop());
  json latency = {{"message_bytes", s.latency_bytes},
                  {"iters", a.latency_iters},
                  {"commit_us", Median(commit_us)},
                  {"commit_us_p10", Percentile(commit_us, 0.1)},
                  {"commit_us_p90", Percentile(commit_us, 0.9)},
                  {"data_visible_us", Median(data_us)},
                  {"data_visible_us_p90", Percentile(data_us, 0.9)},
                  {"holder_lease_done_us", Median(ended_us)},
                  {"all_layers_block_bytes", s.latency_bytes * L},
                  {"all_layers_block_commit_us", Median(all_layers_us)},
                  {"load", latency_load},
                  {"target", "ratio <= 1.5"}};
  if (ceilings.latency) {
    const double c = ceilings.latency->typical_latency_us;
    latency["ceiling_us"] = c;
    latency["ceiling"] =
        absl::StrCat("ucx_perftest -t ucp_put_lat -s ", s.latency_bytes,
                     " median (half its round trip), error mode ", ceilings.latency->error_mode);
    latency["ratio"] = Ratio(Median(commit_us), c);
    latency["ratio_round_trip"] = Ratio(Median(commit_us), 2 * c);
    latency["ratio_data_visible"] = Ratio(Median(data_us), c);
  }

  // Layer-wise overlap with modelled prefill compute.
  const double prefill_s = a.tokens / s.shape.prefill_tokens_per_s;
  const int64_t layer_ns = static_cast<int64_t>(prefill_s / L * 1e9);
  const int64_t overlap_iters =
      a.overlap_iters > 0 ? a.overlap_iters : (prefill_s > 10 ? 1 : (prefill_s > 2 ? 2 : 3));
  std::fprintf(stderr, "overlap: %lld prefills of %.3f s modelled\n",
               static_cast<long long>(overlap_iters), prefill_s);
  DSERVE_RETURN_IF_ERROR(meter.Start());
  std::vector<double> exposed_s, total_s;
  for (int64_t i = 0; i < overlap_iters; ++i) {
    DSERVE_ASSIGN_OR_RETURN(TransferTiming t, mover.Transfer(false, s.blocks_needed, a.tokens,
                                                             SubmitMode::kLayerWise, layer_ns, 0));
    exposed_s.push_back(std::max<int64_t>(0, t.committed_ns - t.compute_end_ns) * 1e-9);
    total_s.push_back((t.committed_ns - t.start_ns) * 1e-9);
  }
  DSERVE_ASSIGN_OR_RETURN(json overlap_load, meter.Stop());
  const double exposed = Median(exposed_s);
  const double bytes_per_token = static_cast<double>(transfer_bytes) / a.tokens;
  json overlap = {
      {"prefill_tokens_per_s", s.shape.prefill_tokens_per_s},
      {"prefill_source", s.shape.prefill_source},
      {"compute_model", "sleep (the prefill runs on an accelerator; the CPU stays free)"},
      {"layer_ms", layer_ns * 1e-6},
      {"prefill_ms", prefill_s * 1e3},
      {"total_ms", Median(total_s) * 1e3},
      {"exposed_ms", exposed * 1e3},
      {"transfer_alone_ms", alone_s * 1e3},
      {"hidden_fraction", std::clamp(1.0 - exposed / alone_s, 0.0, 1.0)},
      {"iters", overlap_iters},
      // Above this prefill rate the transfer cannot keep up with the
      // layers, whatever the overlap.
      {"break_even_prefill_tokens_per_s", rate / bytes_per_token},
      {"load", overlap_load}};

  const double dsv3_4k_bytes =
      4096.0 * kDeepSeekV3Layers * kDeepSeekV3Values * kDeepSeekV3ElementBytes;
  json out = {{"benchmark", "kvtransfer"},
              {"transport", kvtransfer::KvTransportKindName(a.transport)},
              {"ucx_tls", UcxTls(a.transport)},
              {"error_handling",
               absl::StrContains(mover.holder_describe(), "error handling peer") ? "peer" : "none"},
              {"describe", mover.transport().Describe()},
              {"shape", s.shape.name},
              {"num_layers", L},
              {"values_per_token", s.shape.values_per_token},
              {"element", s.shape.element_type},
              {"bytes_per_token_per_layer", s.shape.BytesPerTokenPerLayer()},
              {"tokens", a.tokens},
              {"block_tokens", a.block_tokens},
              {"layout_blocks", a.contiguous ? "contiguous" : "scattered"},
              {"blocks", s.blocks_needed},
              {"pool_blocks", s.layout.num_blocks},
              {"message_bytes", s.message_bytes},
              {"ops", s.plan_stats.num_ops},
              {"transfer_bytes", transfer_bytes},
              {"max_ops_in_flight", a.max_ops_in_flight},
              {"verified", verified},
              {"quiet_wait_load_cores", quiet_load},
              {"bandwidth", bandwidth},
              {"latency", latency},
              {"overlap", overlap},
              {"deepseek_v3_4k_ms_at_this_rate", dsv3_4k_bytes / rate * 1e3}};
  if (!ceilings.runs.empty()) {
    json runs = json::array();
    for (const auto& r : ceilings.runs) runs.push_back(r.ToJson());
    out["perftest_runs"] = runs;
  }
  return out;
}

// Num: a number of the result object; NaN where it is null (no samples).
double Num(const json& j) { return j.is_number() ? j.get<double>() : NAN; }

void PrintSummary(const json& o) {
  const json& b = o["bandwidth"];
  const json& l = o["latency"];
  const json& v = o["overlap"];
  std::printf(
      "kvtransfer_bench: %s (UCX_TLS=%s, error handling %s), %s: %lld layers x %lld B/token\n",
      o["transport"].get<std::string>().c_str(), o["ucx_tls"].get<std::string>().c_str(),
      o["error_handling"].get<std::string>().c_str(), o["shape"].get<std::string>().c_str(),
      o["num_layers"].get<long long>(), o["bytes_per_token_per_layer"].get<long long>());
  std::printf(
      "  %lld tokens, %lld-token blocks, %s (%lld of %lld pool blocks), %lld ops of %lld B, "
      "%.1f MB, verified %s\n",
      o["tokens"].get<long long>(), o["block_tokens"].get<long long>(),
      o["layout_blocks"].get<std::string>().c_str(), o["blocks"].get<long long>(),
      o["pool_blocks"].get<long long>(), o["ops"].get<long long>(),
      o["message_bytes"].get<long long>(), Num(o["transfer_bytes"]) / 1e6,
      o["verified"].get<bool>() ? "yes" : "NO");
  std::printf("  bandwidth: %.2f GB/s (median of %lld, %.1f ms)", Num(b["gb_per_s"]),
              b["iters"].get<long long>(), Num(b["seconds"]) * 1e3);
  if (b.contains("ratio")) {
    std::printf(
        "; ceiling %.2f GB/s [%s]: ratio %.2f (target >= 0.9); memcpy of the plan %.2f GB/s: "
        "%.2f",
        Num(b["ceiling_gb_per_s"]), b["ceiling"].get<std::string>().c_str(), Num(b["ratio"]),
        Num(b["memcpy_plan_gb_per_s"]), Num(b["ratio_vs_memcpy_plan"]));
    if (b.contains("streaming_ceiling_gb_per_s")) {
      std::printf("; ucp_put_bw 256 MiB %.2f GB/s: %.2f", Num(b["streaming_ceiling_gb_per_s"]),
                  Num(b["ratio_vs_streaming"]));
    }
  }
  std::printf(
      "\n  latency, one block of one layer (%lld B): Submit->Commit OK %.1f us "
      "(p10 %.1f, p90 %.1f), data visible at the holder %.1f us, lease done %.1f us",
      l["message_bytes"].get<long long>(), Num(l["commit_us"]), Num(l["commit_us_p10"]),
      Num(l["commit_us_p90"]), Num(l["data_visible_us"]), Num(l["holder_lease_done_us"]));
  if (l.contains("ratio")) {
    std::printf(
        "; ucp_put_lat %.2f us: ratio %.1f (target <= 1.5), vs its round trip %.1f, "
        "data visible %.1f",
        Num(l["ceiling_us"]), Num(l["ratio"]), Num(l["ratio_round_trip"]),
        Num(l["ratio_data_visible"]));
  }
  std::printf("\n  latency, one block of all layers (%lld B): %.1f us\n",
              l["all_layers_block_bytes"].get<long long>(), Num(l["all_layers_block_commit_us"]));
  std::printf(
      "  overlap: prefill %.1f ms modelled (%.0f tok/s, %s), %.3f ms/layer: total %.1f ms, "
      "exposed %.1f ms of %.1f ms alone -> %.0f%% hidden; break-even prefill rate %.0f "
      "tok/s\n",
      Num(v["prefill_ms"]), Num(v["prefill_tokens_per_s"]),
      v["prefill_source"].get<std::string>().c_str(), Num(v["layer_ms"]), Num(v["total_ms"]),
      Num(v["exposed_ms"]), Num(v["transfer_alone_ms"]), Num(v["hidden_fraction"]) * 100,
      Num(v["break_even_prefill_tokens_per_s"]));
  std::printf("  a 4k-token DeepSeek-V3 prompt (288 MB) at this rate: %.1f ms\n",
              Num(o["deepseek_v3_4k_ms_at_this_rate"]));
  std::printf("  other processes' load (cores): bandwidth %.2f, latency %.2f, overlap %.2f\n",
              Num(b["load"]["foreign_load_cores"]), Num(l["load"]["foreign_load_cores"]),
              Num(v["load"]["foreign_load_cores"]));
}

int Run(const Args& args) {
  absl::StatusOr<BenchSetup> setup = MakeSetup(args);
  if (!setup.ok()) {
    std::fprintf(stderr, "kvtransfer_bench: %s\n", setup.status().ToString().c_str());
    return 2;
  }
  const double quiet_load = args.wait_quiet_s > 0 ? WaitForQuiet(args.wait_quiet_s) : NAN;
  Ceilings ceilings;
  if (args.ceiling) {
    absl::StatusOr<Ceilings> c = MeasureCeilings(*setup);
    if (!c.ok()) {
      std::fprintf(stderr, "kvtransfer_bench: %s\n", c.status().ToString().c_str());
      return 1;
    }
    ceilings = *std::move(c);
  }

  // Fork the holder before this process creates any UCX context.
  int fds[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, fds) != 0) {
    std::perror("socketpair");
    return 1;
  }
  std::fflush(nullptr);
  const pid_t child = fork();
  if (child < 0) {
    std::perror("fork");
    return 1;
  }
  if (child == 0) {
    close(fds[0]);
    Holder holder(*setup, Channel(fds[1]));
    const absl::Status status = holder.Serve();
    if (!status.ok())
      std::fprintf(stderr, "kvtransfer_bench holder: %s\n", status.ToString().c_str());
    std::fflush(nullptr);
    _exit(status.ok() ? 0 : 1);
  }
  close(fds[1]);
  absl::StatusOr<json> result;
  {
    Mover mover(*setup, Channel(fds[0]));
    result = RunMover(*setup, mover, ceilings, quiet_load);
    (void)mover.Quit();
  }
  close(fds[0]);
  // A failed run may leave the holder waiting on a lease: end it.
  if (!result.ok()) kill(child, SIGKILL);
  int child_status = 0;
  waitpid(child, &child_status, 0);
  if (!result.ok()) {
    std::fprintf(stderr, "kvtransfer_bench: %s\n", result.status().ToString().c_str());
    return 1;
  }
  PrintSummary(*result);
  if (args.json) std::printf("%s\n", result->dump().c_str());
  return 0;
}

constexpr char kUsage[] =
    "usage: kvtransfer_bench --transport tcp|shm --tokens N --block-tokens B\n"
    "         --shape small|deepseek-v3 [--json]\n"
    "         [--layout-blocks scattered|contiguous] [--pool-factor F] [--iters N]\n"
    "         [--latency-iters N] [--overlap-iters N] [--prefill-tokens-per-s R]\n"
    "         [--max-ops-in-flight N] [--peer-timeout-s S] [--no-ceiling]\n"
    "         [--ceiling-repeats N]\n"
    "         [--wait-quiet-s S] [--perftest PATH] [--seed N]\n";

}  // namespace
}  // namespace dserve::bench

int main(int argc, char** argv) {
  dserve::bench::Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "kvtransfer_bench: %s needs a value\n%s", a.c_str(),
                     dserve::bench::kUsage);
        std::exit(2);
      }
      return argv[++i];
    };
    auto integer = [&](int64_t min) {
      int64_t v;
      const std::string s = value();
      if (!absl::SimpleAtoi(s, &v) || v < min) {
        std::fprintf(stderr, "kvtransfer_bench: %s must be an integer >= %lld, got %s\n", a.c_str(),
                     static_cast<long long>(min), s.c_str());
        std::exit(2);
      }
      return v;
    };
    auto real = [&](double min) {
      double v;
      const std::string s = value();
      if (!absl::SimpleAtod(s, &v) || v < min) {
        std::fprintf(stderr, "kvtransfer_bench: %s must be a number >= %g, got %s\n", a.c_str(),
                     min, s.c_str());
        std::exit(2);
      }
      return v;
    };
    if (a == "--transport") {
      auto kind = dserve::kvtransfer::ParseKvTransportKind(value());
      if (!kind.ok() || *kind == dserve::kvtransfer::KvTransportKind::kAuto) {
        std::fprintf(stderr, "kvtransfer_bench: --transport must be tcp or shm\n");
        return 2;
      }
      args.transport = *kind;
    } else if (a == "--tokens") {
      args.tokens = integer(1);
    } else if (a == "--block-tokens") {
      args.block_tokens = integer(1);
    } else if (a == "--shape") {
      args.shape = value();
    } else if (a == "--layout-blocks") {
      const std::string v = value();
      if (v != "scattered" && v != "contiguous") {
        std::fprintf(stderr, "kvtransfer_bench: --layout-blocks must be scattered or contiguous\n");
        return 2;
      }
      args.contiguous = v == "contiguous";
    } else if (a == "--pool-factor") {
      args.pool_factor = real(1);
    } else if (a == "--iters") {
      args.iters = integer(1);
    } else if (a == "--latency-iters") {
      args.latency_iters = integer(1);
    } else if (a == "--overlap-iters") {
      args.overlap_iters = integer(1);
    } else if (a == "--prefill-tokens-per-s") {
      args.prefill_tokens_per_s = real(1);
    } else if (a == "--max-ops-in-flight") {
      args.max_ops_in_flight = static_cast<int>(integer(1));
    } else if (a == "--peer-timeout-s") {
      args.peer_timeout_s = real(1);
    } else if (a == "--no-ceiling") {
      args.ceiling = false;
    } else if (a == "--ceiling-repeats") {
      args.ceiling_repeats = integer(1);
    } else if (a == "--wait-quiet-s") {
      args.wait_quiet_s = real(0);
    } else if (a == "--perftest") {
      args.perftest = value();
    } else if (a == "--seed") {
      args.seed = static_cast<uint64_t>(integer(0));
    } else if (a == "--json") {
      args.json = true;
    } else {
      std::fprintf(stderr, "%s", dserve::bench::kUsage);
      return 2;
    }
  }
  return dserve::bench::Run(args);
}
