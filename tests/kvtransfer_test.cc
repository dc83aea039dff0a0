// tests/kvtransfer_test.cc: KvTransport across real processes. Every holder
// and mover is its own kvtransfer_peer process (tests/kvtransfer_peer_main.cc)
// with its own UCX context, over loopback tcp or shared memory. The test is
// the control plane: it carries lease targets from holders to movers, checks
// the bytes that moved by digest, checks that every peer's free blocks come
// back exactly, and kills peers to make faults. Every read from a peer has a
// deadline, so a hung peer fails the test instead of hanging it.
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "kvtransfer/transport.h"

namespace dserve::kvtransfer {

// PrintTo names a test parameter in gtest's messages.
static void PrintTo(KvTransportKind kind, std::ostream* os) { *os << KvTransportKindName(kind); }

namespace {

using ::dserve::testing::StatusIs;
using ::testing::AnyOf;
using ::testing::HasSubstr;

// IsOkAndHolds: a StatusOr that is OK and holds `value`.
MATCHER_P(IsOkAndHolds, value, "is OK and holds " + ::testing::PrintToString(value)) {
  if (!arg.ok()) {
    *result_listener << "status is " << arg.status();
    return false;
  }
  *result_listener << "holds " << ::testing::PrintToString(*arg);
  return *arg == value;
}

// How long a peer may take to answer an ordinary command.
constexpr absl::Duration kAnswerTimeout = absl::Seconds(10);
// Fault tests declare a silent peer dead after kPeerTimeoutMs.
constexpr int kPeerTimeoutMs = 500;
constexpr char kFastFailure[] = "peer_timeout_ms=500 heartbeat_ms=50";
// A mover that takes ~10 ms per data operation, one at a time.
constexpr char kSlowMover[] = "peer_timeout_ms=500 heartbeat_ms=50 delay_per_op_ms=10 max_ops=1";

// ParseAnswer: a peer's answer line: the values after "OK", or the status
// whose code the first word names, with the rest as its message. Anything
// else (ERROR lines) is INTERNAL.
absl::StatusOr<std::string> ParseAnswer(absl::string_view line) {
  std::pair<absl::string_view, absl::string_view> parts =
      absl::StrSplit(line, absl::MaxSplits(' ', 1));
  if (parts.first == "OK") return std::string(parts.second);
  for (int code = 1; code <= static_cast<int>(absl::StatusCode::kUnauthenticated); ++code) {
    if (parts.first == absl::StatusCodeToString(static_cast<absl::StatusCode>(code))) {
      return absl::Status(static_cast<absl::StatusCode>(code), parts.second);
    }
  }
  return absl::InternalError(absl::StrCat("unexpected answer: ", line));
}

// Leg: one transfer of a `send`: the mover's sequence and the holder's
// target (hex, as the control plane carries it).
struct Leg {
  int seq = 0;
  std::string target_hex;
};

// Accounting: a peer's `free` answer.
struct Accounting {
  int64_t free_blocks = 0;
  int64_t leases_open = 0;
  int64_t release_errors = 0;
};

// PeerProcess: one kvtransfer_peer child, its stdin and stdout as pipes.
// Destroying it kills the child if it is still running.
class PeerProcess {
 public:
  static absl::StatusOr<std::unique_ptr<PeerProcess>> Start(std::string name) {
    // A write to a killed peer must fail with EPIPE, not kill the test.
    signal(SIGPIPE, SIG_IGN);
    int to_child[2], from_child[2];
    if (pipe2(to_child, O_CLOEXEC) != 0 || pipe2(from_child, O_CLOEXEC) != 0) {
      return absl::InternalError("pipe2 failed");
    }
    const char* path = KVTRANSFER_PEER_PATH;
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError("fork failed");
    if (pid == 0) {
      // Child: only async-signal-safe calls until exec. dup2 clears
      // O_CLOEXEC on the copies; every other pipe end closes at exec, so no
      // peer holds another peer's stdin open.
      dup2(to_child[0], STDIN_FILENO);
      dup2(from_child[1], STDOUT_FILENO);
      prctl(PR_SET_PDEATHSIG, SIGKILL);  // never outlive the test
      execl(path, path, static_cast<char*>(nullptr));
      _exit(127);
    }
    close(to_child[0]);
    close(from_child[1]);
    return std::unique_ptr<PeerProcess>(
        new PeerProcess(std::move(name), pid, to_child[1], from_child[0]));
  }

  ~PeerProcess() {
    Kill();
    if (out_ >= 0) close(out_);
  }

  const std::string& name() const { return name_; }
  bool running() const { return pid_ > 0; }

  absl::Status Write(absl::string_view command) {
    std::string line = absl::StrCat(command, "\n");
    for (size_t done = 0; done < line.size();) {
      const ssize_t n = write(in_, line.data() + done, line.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return absl::InternalError(absl::StrCat(name_, ": write failed"));
      done += static_cast<size_t>(n);
    }
    return absl::OkStatus();
  }

  // ReadLine: the next line the peer prints, or INTERNAL when none comes
  // within `timeout` or the peer has exited.
  absl::StatusOr<std::string> ReadLine(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (true) {
      if (size_t eol = buffer_.find('\n'); eol != std::string::npos) {
        std::string line = buffer_.substr(0, eol);
        buffer_.erase(0, eol + 1);
        return line;
      }
      const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (left_ms <= 0) {
        return absl::InternalError(
            absl::StrCat(name_, ": no answer within ", absl::FormatDuration(timeout)));
      }
      pollfd p{.fd = out_, .events = POLLIN, .revents = 0};
      const int ready = poll(&p, 1, static_cast<int>(left_ms));
      if (ready < 0 && errno != EINTR) return absl::InternalError("poll failed");
      if (ready <= 0) continue;
      char chunk[4096];
      const ssize_t n = read(out_, chunk, sizeof chunk);
      if (n == 0) return absl::InternalError(absl::StrCat(name_, ": exited"));
      if (n < 0 && errno != EINTR) return absl::InternalError(absl::StrCat(name_, ": read failed"));
      if (n > 0) buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

  // Call: one command and its answer (see ParseAnswer).
  absl::StatusOr<std::string> Call(absl::string_view command,
                                   absl::Duration timeout = kAnswerTimeout) {
    if (absl::Status s = Write(command); !s.ok()) return s;
    absl::StatusOr<std::string> line = ReadLine(timeout);
    if (!line.ok()) {
      return absl::InternalError(absl::StrCat(line.status().message(), " to '", command, "'"));
    }
    return ParseAnswer(*line);
  }

  // Ok: a command that must answer OK; its values.
  absl::StatusOr<std::vector<std::string>> Ok(absl::string_view command) {
    absl::StatusOr<std::string> values = Call(command);
    if (!values.ok()) {
      return absl::Status(values.status().code(), absl::StrCat(name_, ": '", command.substr(0, 80),
                                                               "': ", values.status().message()));
    }
    return absl::StrSplit(*values, ' ', absl::SkipEmpty());
  }

  absl::StatusOr<int> Alloc(int64_t tokens) {
    absl::StatusOr<std::vector<std::string>> v = Ok(absl::StrCat("alloc ", tokens));
    if (!v.ok()) return v.status();
    int seq = 0;
    if (v->size() != 1 || !absl::SimpleAtoi((*v)[0], &seq)) return absl::InternalError("alloc");
    return seq;
  }

  // OpenLease: leases `seq`; the lease id and the target as hex.
  absl::StatusOr<std::pair<uint64_t, std::string>> OpenLease(int seq, int64_t ttl_ms,
                                                             KvLeaseAccess access) {
    absl::StatusOr<std::vector<std::string>> v = Ok(absl::StrCat(
        "lease ", seq, " ", ttl_ms, " ", access == KvLeaseAccess::kWrite ? "write" : "read"));
    if (!v.ok()) return v.status();
    uint64_t id = 0;
    if (v->size() != 2 || !absl::SimpleAtoi((*v)[0], &id)) return absl::InternalError("lease");
    return std::make_pair(id, (*v)[1]);
  }

  absl::StatusOr<std::string> Digest(absl::string_view what) {
    absl::StatusOr<std::vector<std::string>> v = Ok(what);
    if (!v.ok()) return v.status();
    if (v->size() != 1) return absl::InternalError("digest");
    return (*v)[0];
  }
  absl::StatusOr<std::string> Digest(int seq, int64_t first, int64_t tokens) {
    return Digest(absl::StrCat("digest ", seq, " ", first, " ", tokens));
  }

  absl::StatusOr<int64_t> CountPaint(absl::string_view command) {
    absl::StatusOr<std::vector<std::string>> v = Ok(command);
    int64_t n = 0;
    if (!v.ok()) return v.status();
    if (v->size() != 1 || !absl::SimpleAtoi((*v)[0], &n)) return absl::InternalError("paint");
    return n;
  }

  absl::StatusOr<Accounting> Free() {
    absl::StatusOr<std::vector<std::string>> v = Ok("free");
    if (!v.ok()) return v.status();
    Accounting a;
    if (v->size() != 3 || !absl::SimpleAtoi((*v)[0], &a.free_blocks) ||
        !absl::SimpleAtoi((*v)[1], &a.leases_open) ||
        !absl::SimpleAtoi((*v)[2], &a.release_errors)) {
      return absl::InternalError("free");
    }
    return a;
  }

  // StartSend writes a `send` without waiting for it; ReadOpened and
  // ReadSendResults read its answers.
  absl::Status StartSend(int64_t deadline_ms, int64_t first, int64_t tokens,
                         const std::vector<Leg>& legs) {
    std::string line = absl::StrCat("send ", deadline_ms, " ", first, " ", tokens);
    for (const Leg& leg : legs) absl::StrAppend(&line, " ", leg.seq, ":", leg.target_hex);
    return Write(line);
  }
  absl::StatusOr<int> ReadOpened(absl::Duration timeout = kAnswerTimeout) {
    absl::StatusOr<std::string> line = ReadLine(timeout);
    if (!line.ok()) return line.status();
    int n = 0;
    absl::string_view rest = *line;
    if (!absl::ConsumePrefix(&rest, "OPENED ") || !absl::SimpleAtoi(rest, &n)) {
      return absl::InternalError(absl::StrCat(name_, ": expected OPENED, got ", *line));
    }
    return n;
  }
  // ReadSendResults: per leg, the mover's digest of the moved tokens, or the
  // transfer's status.
  absl::StatusOr<std::vector<absl::StatusOr<std::string>>> ReadSendResults(
      size_t legs, absl::Duration timeout = kAnswerTimeout) {
    std::vector<absl::StatusOr<std::string>> results;
    for (size_t i = 0; i < legs; ++i) {
      absl::StatusOr<std::string> line = ReadLine(timeout);
      if (!line.ok()) return line.status();
      absl::StatusOr<std::string> digest = ParseAnswer(*line);
      if (digest.status().code() == absl::StatusCode::kInternal) return digest.status();
      results.push_back(std::move(digest));
    }
    return results;
  }

  // Signal sends `sig` (SIGSTOP, SIGCONT) to a running peer.
  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }

  // Kill: SIGKILL and reap. Idempotent.
  void Kill() {
    if (pid_ <= 0) return;
    kill(pid_, SIGKILL);
    waitpid(pid_, nullptr, 0);
    pid_ = -1;
    CloseInput();
  }

  // Quit closes the peer's stdin and waits (bounded) for it to exit; its
  // wait status, or nullopt if it had to be killed.
  std::optional<int> Quit(absl::Duration timeout) {
    if (pid_ <= 0) return std::nullopt;
    CloseInput();
    const absl::Time deadline = absl::Now() + timeout;
    int status = 0;
    while (absl::Now() < deadline) {
      if (waitpid(pid_, &status, WNOHANG) == pid_) {
        pid_ = -1;
        return status;
      }
      absl::SleepFor(absl::Milliseconds(5));
    }
    Kill();
    return std::nullopt;
  }

 private:
  PeerProcess(std::string name, pid_t pid, int in, int out)
      : name_(std::move(name)), pid_(pid), in_(in), out_(out) {}
  void CloseInput() {
    if (in_ >= 0) close(in_);
    in_ = -1;
  }

  std::string name_;
  pid_t pid_;
  int in_;
  int out_;
  std::string buffer_;
};

// PoolSpec: the arguments of a peer's `pool` command.
struct PoolSpec {
  int64_t layers = 4;
  int64_t blocks = 64;
  int64_t block_tokens = 16;
  int64_t bytes_per_token = 256;
  bool layer_major = true;

  std::string Command(uint64_t seed) const {
    return absl::StrCat("pool ", layers, " ", blocks, " ", block_tokens, " ", bytes_per_token, " ",
                        layer_major ? "layer" : "block", " ", seed);
  }
};

std::string AccessName(KvLeaseAccess access) {
  return access == KvLeaseAccess::kWrite ? "push" : "pull";
}

class KvTransferTest : public ::testing::TestWithParam<KvTransportKind> {
 protected:
  // TearDown: every peer still running must exit cleanly when its stdin
  // closes (the transport's destructor runs there).
  void TearDown() override {
    for (auto& peer : peers_) {
      if (!peer->running()) continue;
      std::optional<int> status = peer->Quit(absl::Seconds(5));
      EXPECT_TRUE(status.has_value() && WIFEXITED(*status) && WEXITSTATUS(*status) == 0)
          << peer->name() << " did not exit cleanly";
    }
  }

  // Spawn starts a peer, creates its transport (`options` as in `init`) and
  // its pool.
  absl::StatusOr<PeerProcess*> Spawn(std::string name, const PoolSpec& pool,
                                     absl::string_view options = "") {
    absl::StatusOr<std::unique_ptr<PeerProcess>> peer = PeerProcess::Start(std::move(name));
    if (!peer.ok()) return peer.status();
    peers_.push_back(*std::move(peer));
    PeerProcess* p = peers_.back().get();
    absl::StatusOr<std::vector<std::string>> init =
        p->Ok(absl::StrCat("init ", KvTransportKindName(GetParam()), " ", options));
    if (!init.ok()) return init.status();
    absl::StatusOr<std::vector<std::string>> made = p->Ok(pool.Command(++seed_));
    if (!made.ok()) return made.status();
    return p;
  }

  // ExpectSettled waits until `peer` is back at `start`: the same free blocks and
  // no open lease. Release callbacks may trail a lease's end a little.
  void ExpectSettled(PeerProcess& peer, const Accounting& start,
                     absl::Duration timeout = absl::Seconds(5)) {
    const absl::Time deadline = absl::Now() + timeout;
    absl::StatusOr<Accounting> now = peer.Free();
    while (now.ok() && (now->free_blocks != start.free_blocks || now->leases_open != 0) &&
           absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
      now = peer.Free();
    }
    ASSERT_OK(now.status());
    EXPECT_EQ(now->free_blocks, start.free_blocks) << peer.name() << ": blocks leaked";
    EXPECT_EQ(now->leases_open, 0) << peer.name() << ": leases left open";
    EXPECT_EQ(now->release_errors, 0) << peer.name() << ": a block came back twice or wrongly";
  }

  // DropWhenReleased drops a holder's sequence whose lease ended without
  // commit, once the release callback has given its blocks back.
  void DropWhenReleased(PeerProcess& holder, int seq, absl::Duration timeout = absl::Seconds(5)) {
    const absl::Time deadline = absl::Now() + timeout;
    absl::Status s = holder.Call(absl::StrCat("drop ", seq)).status();
    while (s.code() == absl::StatusCode::kFailedPrecondition && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
      s = holder.Call(absl::StrCat("drop ", seq)).status();
    }
    EXPECT_OK(s) << holder.name() << ": sequence " << seq << " was never released";
  }

  // ReuseAllFreeBlocks: the holder takes every free block (the released ones
  // among them) for new work and paints it with `byte`; the sequence.
  absl::StatusOr<int> ReuseAllFreeBlocks(PeerProcess& holder, const PoolSpec& pool, int byte) {
    absl::StatusOr<Accounting> a = holder.Free();
    if (!a.ok()) return a.status();
    absl::StatusOr<int> seq = holder.Alloc(a->free_blocks * pool.block_tokens);
    if (!seq.ok()) return seq.status();
    absl::StatusOr<int64_t> painted = holder.CountPaint(absl::StrCat("paint ", *seq, " ", byte));
    if (!painted.ok()) return painted.status();
    return seq;
  }

  // RunConcurrent: every mover sends one push and one pull leg to every holder,
  // all at once; the bytes arrive exactly and every peer's pool comes back.
  void RunConcurrent(const std::vector<PeerProcess*>& holders,
                     const std::vector<PeerProcess*>& movers, uint64_t seed) {
    std::mt19937_64 rng(seed);
    std::vector<Accounting> holder_start, mover_start;
    for (PeerProcess* h : holders) {
      ASSERT_OK(h->Ok(absl::StrCat("fill ", rng() % 100000)).status());
      ASSERT_OK_AND_ASSIGN(Accounting a, h->Free());
      holder_start.push_back(a);
    }
    for (PeerProcess* m : movers) {
      ASSERT_OK(m->Ok(absl::StrCat("fill ", rng() % 100000)).status());
      ASSERT_OK_AND_ASSIGN(Accounting a, m->Free());
      mover_start.push_back(a);
    }
    struct Planned {
      PeerProcess* holder;
      int hseq;
      uint64_t lease_id;
      int mseq;
    };
    std::vector<std::vector<Planned>> plans(movers.size());
    std::vector<std::vector<Leg>> legs(movers.size());
    std::vector<int64_t> tokens(movers.size());
    for (size_t m = 0; m < movers.size(); ++m) {
      tokens[m] = std::uniform_int_distribution<int64_t>(100, 400)(rng);
      for (PeerProcess* h : holders) {
        for (KvLeaseAccess access : {KvLeaseAccess::kWrite, KvLeaseAccess::kRead}) {
          ASSERT_OK_AND_ASSIGN(int hseq, h->Alloc(tokens[m]));
          ASSERT_OK_AND_ASSIGN(auto lease, h->OpenLease(hseq, 20000, access));
          ASSERT_OK_AND_ASSIGN(int mseq, movers[m]->Alloc(tokens[m]));
          plans[m].push_back({h, hseq, lease.first, mseq});
          legs[m].push_back({mseq, lease.second});
        }
      }
    }
    // Digests of every block outside the sequences: no stray writes.
    std::vector<PeerProcess*> everyone = holders;
    everyone.insert(everyone.end(), movers.begin(), movers.end());
    std::vector<std::string> others_before;
    for (PeerProcess* p : everyone) {
      ASSERT_OK_AND_ASSIGN(std::string others, p->Digest("digest_free"));
      others_before.push_back(others);
    }
    for (size_t m = 0; m < movers.size(); ++m) {
      ASSERT_OK(movers[m]->StartSend(10000, 0, tokens[m], legs[m]));
    }
    for (size_t m = 0; m < movers.size(); ++m) {
      ASSERT_OK_AND_ASSIGN(int opened, movers[m]->ReadOpened());
      EXPECT_EQ(opened, static_cast<int>(legs[m].size()));
    }
    for (size_t m = 0; m < movers.size(); ++m) {
      ASSERT_OK_AND_ASSIGN(auto results, movers[m]->ReadSendResults(legs[m].size()));
      for (size_t i = 0; i < results.size(); ++i) {
        const Planned& p = plans[m][i];
        SCOPED_TRACE(absl::StrCat(movers[m]->name(), " leg ", i, " to ", p.holder->name()));
        ASSERT_OK(results[i].status());
        ASSERT_OK(p.holder->Call(absl::StrCat("await ", p.lease_id, " 5000")));
        EXPECT_THAT(p.holder->Digest(p.hseq, 0, tokens[m]), IsOkAndHolds(*results[i]));
      }
    }
    for (size_t i = 0; i < everyone.size(); ++i) {
      EXPECT_THAT(everyone[i]->Digest("digest_free"), IsOkAndHolds(others_before[i]))
          << everyone[i]->name() << ": bytes changed outside the transfers' blocks";
    }
    for (size_t m = 0; m < movers.size(); ++m) {
      for (const Planned& p : plans[m]) {
        ASSERT_OK(p.holder->Call(absl::StrCat("drop ", p.hseq)));
        ASSERT_OK(movers[m]->Call(absl::StrCat("drop ", p.mseq)));
      }
    }
    for (size_t h = 0; h < holders.size(); ++h) ExpectSettled(*holders[h], holder_start[h]);
    for (size_t m = 0; m < movers.size(); ++m) ExpectSettled(*movers[m], mover_start[m]);
  }

  std::vector<std::unique_ptr<PeerProcess>> peers_;
  uint64_t seed_ = 1000;
};

// ----------------------------------------------------------------------------
// 1. Byte-exact transfers.

TEST_P(KvTransferTest, PushAndPullAreByteExactAcrossLayouts) {
  // Mover and holder pools: equal, or different block sizes and majorness.
  struct Side {
    int64_t block_tokens;
    bool layer_major;
  };
  struct Case {
    Side mover, holder;
  };
  const Case cases[] = {
      {{16, true}, {16, true}},
      {{16, true}, {64, false}},
      {{64, false}, {16, true}},
      {{16, false}, {16, false}},
  };
  auto pool = [](const Side& side) {
    return PoolSpec{.layers = 3,
                    .blocks = side.block_tokens == 16 ? 96 : 24,
                    .block_tokens = side.block_tokens,
                    .bytes_per_token = 256,
                    .layer_major = side.layer_major};
  };
  ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", pool(cases[0].holder)));
  ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", pool(cases[0].mover)));
  std::mt19937_64 rng(42);
  int round = 0;
  for (const Case& c : cases) {
    for (KvLeaseAccess access : {KvLeaseAccess::kWrite, KvLeaseAccess::kRead}) {
      ++round;
      const int64_t tokens = std::uniform_int_distribution<int64_t>(1, 1200)(rng);
      const int64_t first =
          round % 2 == 0 ? std::uniform_int_distribution<int64_t>(1, 200)(rng) : 0;
      SCOPED_TRACE(absl::StrCat(AccessName(access), ", mover ", c.mover.block_tokens,
                                c.mover.layer_major ? " layer-major" : " block-major", ", holder ",
                                c.holder.block_tokens,
                                c.holder.layer_major ? " layer-major" : " block-major",
                                ", tokens [", first, ", ", first + tokens, ")"));
      ASSERT_OK(holder->Ok(pool(c.holder).Command(++seed_)).status());
      ASSERT_OK(mover->Ok(pool(c.mover).Command(++seed_)).status());
      ASSERT_OK(holder->Ok(absl::StrCat("fill ", ++seed_)).status());
      ASSERT_OK(mover->Ok(absl::StrCat("fill ", ++seed_)).status());
      ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
      ASSERT_OK_AND_ASSIGN(Accounting mover_start, mover->Free());

      ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(first + tokens));
      ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(first + tokens));
      ASSERT_OK_AND_ASSIGN(auto lease, holder->OpenLease(hseq, 10000, access));
      const bool push = access == KvLeaseAccess::kWrite;
      PeerProcess& src = push ? *mover : *holder;
      PeerProcess& dst = push ? *holder : *mover;
      const int src_seq = push ? mseq : hseq, dst_seq = push ? hseq : mseq;
      ASSERT_OK_AND_ASSIGN(std::string src_digest, src.Digest(src_seq, first, tokens));
      ASSERT_OK_AND_ASSIGN(std::string dst_before, dst.Digest(dst_seq, first, tokens));
      ASSERT_NE(src_digest, dst_before);
      ASSERT_OK_AND_ASSIGN(std::string dst_others, dst.Digest("digest_free"));

      ASSERT_OK(mover->StartSend(5000, first, tokens, {{mseq, lease.second}}));
      ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
      EXPECT_EQ(opened, 1);
      ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1));
      ASSERT_OK(results[0].status());
      EXPECT_EQ(*results[0], src_digest);
      ASSERT_OK(holder->Call(absl::StrCat("await ", lease.first, " 5000")));

      EXPECT_THAT(dst.Digest(dst_seq, first, tokens), IsOkAndHolds(src_digest));
      EXPECT_THAT(src.Digest(src_seq, first, tokens), IsOkAndHolds(src_digest));
      // Nothing outside the destination sequence changed.
      EXPECT_THAT(dst.Digest("digest_free"), IsOkAndHolds(dst_others));
      ASSERT_OK(holder->Call(absl::StrCat("drop ", hseq)));
      ASSERT_OK(mover->Call(absl::StrCat("drop ", mseq)));
      ExpectSettled(*holder, holder_start);
      ExpectSettled(*mover, mover_start);
    }
  }
}

// ----------------------------------------------------------------------------
// 2. Many transfers at once.

TEST_P(KvTransferTest, ManySendersIntoOneReceiver) {
  const PoolSpec holder_pool{.layers = 2, .blocks = 256, .block_tokens = 16, .layer_major = true};
  const PoolSpec mover_pool{.layers = 2, .blocks = 32, .block_tokens = 64, .layer_major = false};
  ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", holder_pool));
  std::vector<PeerProcess*> movers;
  for (int i = 0; i < 3; ++i) {
    ASSERT_OK_AND_ASSIGN(PeerProcess * m, Spawn(absl::StrCat("mover", i), mover_pool));
    movers.push_back(m);
  }
  RunConcurrent({holder}, movers, 7);
}

TEST_P(KvTransferTest, OneSenderToManyReceivers) {
  const PoolSpec holder_pool{.layers = 2, .blocks = 32, .block_tokens = 64, .layer_major = false};
  const PoolSpec mover_pool{.layers = 2, .blocks = 256, .block_tokens = 16, .layer_major = true};
  std::vector<PeerProcess*> holders;
  for (int i = 0; i < 3; ++i) {
    ASSERT_OK_AND_ASSIGN(PeerProcess * h, Spawn(absl::StrCat("holder", i), holder_pool));
    holders.push_back(h);
  }
  ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", mover_pool));
  RunConcurrent(holders, {mover}, 8);
}

// TransferOutcome: how one transfer ended on each side.
struct TransferOutcome {
  absl::Status moved;        // the mover's send
  absl::Status held;         // the holder's await
  bool bytes_match = false;  // held OK and the holder has the mover's bytes
};

// ExpectDelivered: the mover's commit and the holder's wait both succeeded
// and the holder's blocks hold exactly the mover's bytes.
void ExpectDelivered(const TransferOutcome& out) {
  EXPECT_OK(out.moved);
  EXPECT_OK(out.held);
  EXPECT_TRUE(out.bytes_match);
}

// OneTransfer pushes `tokens` from a fresh mover sequence into a fresh holder
// sequence, committing by `commit_ms`, and drops both sequences afterwards
// (the holder's once its lease has released it).
absl::StatusOr<TransferOutcome> OneTransfer(PeerProcess& holder, PeerProcess& mover, int64_t tokens,
                                            int64_t commit_ms, bool await_during_send) {
  absl::StatusOr<int> hseq = holder.Alloc(tokens);
  absl::StatusOr<int> mseq = mover.Alloc(tokens);
  if (!hseq.ok() || !mseq.ok()) return absl::InternalError("alloc");
  absl::StatusOr<std::pair<uint64_t, std::string>> lease =
      holder.OpenLease(*hseq, 20000, KvLeaseAccess::kWrite);
  if (!lease.ok()) return lease.status();
  const std::string await = absl::StrCat("await ", lease->first, " 5000");
  // With await_during_send the holder is already waiting when the commit
  // arrives, and takes the blocks at once.
  if (await_during_send) {
    if (absl::Status s = holder.Write(await); !s.ok()) return s;
  }
  if (absl::Status s = mover.StartSend(commit_ms, 0, tokens, {{*mseq, lease->second}}); !s.ok()) {
    return s;
  }
  absl::StatusOr<int> opened = mover.ReadOpened();
  if (!opened.ok()) return opened.status();
  absl::StatusOr<std::vector<absl::StatusOr<std::string>>> results = mover.ReadSendResults(1);
  if (!results.ok()) return results.status();
  TransferOutcome out;
  out.moved = (*results)[0].status();
  if (await_during_send) {
    absl::StatusOr<std::string> line = holder.ReadLine(kAnswerTimeout);
    if (!line.ok()) return line.status();
    out.held = ParseAnswer(*line).status();
  } else {
    out.held = holder.Call(await).status();
  }
  if (out.held.ok()) {
    absl::StatusOr<std::string> held_digest = holder.Digest(*hseq, 0, tokens);
    absl::StatusOr<std::string> sent_digest = mover.Digest(*mseq, 0, tokens);
    out.bytes_match = held_digest.ok() && sent_digest.ok() && *held_digest == *sent_digest;
  }
  absl::Status dropped = holder.Call(absl::StrCat("drop ", *hseq)).status();
  for (int i = 0; i < 500 && dropped.code() == absl::StatusCode::kFailedPrecondition; ++i) {
    absl::SleepFor(absl::Milliseconds(10));  // the release callback may trail
    dropped = holder.Call(absl::StrCat("drop ", *hseq)).status();
  }
  if (!dropped.ok()) return dropped;
  if (absl::Status s = mover.Call(absl::StrCat("drop ", *mseq)).status(); !s.ok()) return s;
  return out;
}

// ----------------------------------------------------------------------------
// 3. Faults. Peers declare each other dead after kPeerTimeoutMs; a slow mover
// takes ~10 ms per operation, and its block-major pool makes every block of
// every layer its own operation: 32 blocks x 4 layers, ~1.3 s in all.

constexpr PoolSpec kHolderPool{.layers = 4, .blocks = 64, .block_tokens = 16, .layer_major = true};
constexpr PoolSpec kSlowMoverPool{
    .layers = 4, .blocks = 64, .block_tokens = 16, .layer_major = false};
constexpr int64_t kSlowTokens = 32 * 16;

// kDeathNoticed: how long a survivor may take to notice a dead peer.
constexpr absl::Duration kDeathNoticed = absl::Milliseconds(kPeerTimeoutMs + 1000);

// The controls for the fault tests: while both peers live, heartbeats keep
// them known alive, so a slow transfer that outlasts the peer timeout several
// times over succeeds ...
TEST_P(KvTransferTest, SlowTransferOutlastingPeerTimeoutSucceeds) {
  for (KvLeaseAccess access : {KvLeaseAccess::kWrite, KvLeaseAccess::kRead}) {
    SCOPED_TRACE(AccessName(access));
    ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", kHolderPool, kFastFailure));
    ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", kSlowMoverPool, kSlowMover));
    ASSERT_OK(holder->Ok("fill 11").status());
    ASSERT_OK(mover->Ok("fill 12").status());
    ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
    ASSERT_OK_AND_ASSIGN(Accounting mover_start, mover->Free());
    ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(kSlowTokens));
    ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(kSlowTokens));
    ASSERT_OK_AND_ASSIGN(auto lease, holder->OpenLease(hseq, 20000, access));
    const absl::Time start = absl::Now();
    ASSERT_OK(mover->StartSend(20000, 0, kSlowTokens, {{mseq, lease.second}}));
    ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
    ASSERT_EQ(opened, 1);
    ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1, absl::Seconds(20)));
    EXPECT_GT(absl::Now() - start, absl::Milliseconds(2 * kPeerTimeoutMs));
    ASSERT_OK(results[0].status());
    ASSERT_OK(holder->Call(absl::StrCat("await ", lease.first, " 5000")));
    EXPECT_THAT(holder->Digest(hseq, 0, kSlowTokens), IsOkAndHolds(*results[0]));
    ASSERT_OK(holder->Call(absl::StrCat("drop ", hseq)));
    ASSERT_OK(mover->Call(absl::StrCat("drop ", mseq)));
    ExpectSettled(*holder, holder_start);
    ExpectSettled(*mover, mover_start);
  }
}

// ... and a transfer over an endpoint that sat idle (no heartbeats are due
// then) for longer than the peer timeout succeeds.
TEST_P(KvTransferTest, TransferAfterIdleLongerThanPeerTimeoutSucceeds) {
  const PoolSpec pool{.layers = 2, .blocks = 64, .block_tokens = 16, .layer_major = true};
  ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", pool, kFastFailure));
  // Slow, so that each transfer spans several of the transport's timer ticks.
  ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", pool, kSlowMover));
  ASSERT_OK(mover->Ok("fill 13").status());
  ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(absl::StrCat("round ", round));
    if (round > 0) absl::SleepFor(absl::Milliseconds(2 * kPeerTimeoutMs));
    ASSERT_OK_AND_ASSIGN(TransferOutcome out, OneTransfer(*holder, *mover, 64, 5000, false));
    ExpectDelivered(out);
  }
  ExpectSettled(*holder, holder_start);
}

// SIGKILL of a slow mover: the holder's lease ends UNAVAILABLE within the
// peer timeout, its blocks come back once, and nothing lands in them later.
TEST_P(KvTransferTest, MoverKilledMidTransfer) {
  for (KvLeaseAccess access : {KvLeaseAccess::kWrite, KvLeaseAccess::kRead}) {
    SCOPED_TRACE(AccessName(access));
    ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", kHolderPool, kFastFailure));
    ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", kSlowMoverPool, kSlowMover));
    ASSERT_OK(holder->Ok("fill 1").status());
    ASSERT_OK(mover->Ok("fill 2").status());
    ASSERT_OK_AND_ASSIGN(Accounting start, holder->Free());
    ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(kSlowTokens));
    ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(kSlowTokens));
    ASSERT_OK_AND_ASSIGN(auto lease, holder->OpenLease(hseq, 20000, access));
    ASSERT_OK(mover->StartSend(20000, 0, kSlowTokens, {{mseq, lease.second}}));
    ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
    ASSERT_EQ(opened, 1);
    absl::SleepFor(absl::Milliseconds(150));
    mover->Kill();
    const absl::Time killed = absl::Now();
    EXPECT_THAT(holder->Call(absl::StrCat("await ", lease.first, " 5000")),
                StatusIs(absl::StatusCode::kUnavailable, HasSubstr("died")));
    EXPECT_LT(absl::Now() - killed, kDeathNoticed);
    DropWhenReleased(*holder, hseq);
    ExpectSettled(*holder, start);
    // The blocks are reused at once; nothing from the dead mover lands later.
    ASSERT_OK_AND_ASSIGN(int reused, ReuseAllFreeBlocks(*holder, kHolderPool, 0x5A));
    absl::SleepFor(absl::Milliseconds(200));
    EXPECT_THAT(holder->CountPaint(absl::StrCat("verify ", reused, " 90")), IsOkAndHolds(0));
    ASSERT_OK(holder->Call(absl::StrCat("drop ", reused)));
    ExpectSettled(*holder, start);
  }
}

// SIGKILL of the holder: the mover's transfer fails UNAVAILABLE within the
// peer timeout and its own blocks are free to drop.
TEST_P(KvTransferTest, HolderKilledMidTransfer) {
  for (KvLeaseAccess access : {KvLeaseAccess::kWrite, KvLeaseAccess::kRead}) {
    SCOPED_TRACE(AccessName(access));
    ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", kHolderPool, kFastFailure));
    ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", kSlowMoverPool, kSlowMover));
    ASSERT_OK_AND_ASSIGN(Accounting start, mover->Free());
    ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(kSlowTokens));
    ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(kSlowTokens));
    ASSERT_OK_AND_ASSIGN(auto lease, holder->OpenLease(hseq, 20000, access));
    ASSERT_OK(mover->StartSend(20000, 0, kSlowTokens, {{mseq, lease.second}}));
    ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
    ASSERT_EQ(opened, 1);
    absl::SleepFor(absl::Milliseconds(150));
    holder->Kill();
    const absl::Time killed = absl::Now();
    ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1));
    EXPECT_THAT(results[0].status(), StatusIs(absl::StatusCode::kUnavailable));
    EXPECT_LT(absl::Now() - killed, kDeathNoticed);
    ASSERT_OK(mover->Call(absl::StrCat("drop ", mseq)));
    ExpectSettled(*mover, start);
  }
}

// A lease that ends while a slow mover is still pushing (it expires, or the
// holder aborts it): the mover is told to stop, the holder gets its blocks
// back once the mover has fenced and reuses them at once, and nothing the
// mover still had to send ever lands in them.
TEST_P(KvTransferTest, LeaseEndingDuringSlowPushNeverTouchesReusedBlocks) {
  for (bool expire : {true, false}) {
    SCOPED_TRACE(expire ? "lease expires" : "holder aborts");
    ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", kHolderPool, kFastFailure));
    ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", kSlowMoverPool, kSlowMover));
    ASSERT_OK(mover->Ok("fill 3").status());
    ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
    ASSERT_OK_AND_ASSIGN(Accounting mover_start, mover->Free());
    ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(kSlowTokens));
    ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(kSlowTokens));
    ASSERT_OK_AND_ASSIGN(auto lease,
                         holder->OpenLease(hseq, expire ? 300 : 20000, KvLeaseAccess::kWrite));
    const absl::Time opened_at = absl::Now();
    ASSERT_OK(mover->StartSend(20000, 0, kSlowTokens, {{mseq, lease.second}}));
    ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
    ASSERT_EQ(opened, 1);
    if (expire) {
      EXPECT_THAT(holder->Call(absl::StrCat("await ", lease.first, " 5000")),
                  StatusIs(absl::StatusCode::kDeadlineExceeded, HasSubstr("expired")));
    } else {
      absl::SleepFor(absl::Milliseconds(300));
      ASSERT_OK(holder->Call(absl::StrCat("abort ", lease.first)));
      EXPECT_THAT(holder->Call(absl::StrCat("await ", lease.first, " 5000")),
                  StatusIs(absl::StatusCode::kAborted));
    }
    DropWhenReleased(*holder, hseq);
    ASSERT_OK_AND_ASSIGN(int reused, ReuseAllFreeBlocks(*holder, kHolderPool, 0xA5));
    ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1));
    EXPECT_THAT(results[0].status(), StatusIs(expire ? absl::StatusCode::kDeadlineExceeded
                                                     : absl::StatusCode::kAborted));
    // Told to stop well before its ~1.3 s of operations would have finished.
    EXPECT_LT(absl::Now() - opened_at, absl::Milliseconds(300) + kDeathNoticed);
    absl::SleepFor(absl::Milliseconds(100));
    EXPECT_THAT(holder->CountPaint(absl::StrCat("verify ", reused, " 165")), IsOkAndHolds(0));
    ASSERT_OK(holder->Call(absl::StrCat("drop ", reused)));
    ASSERT_OK(mover->Call(absl::StrCat("drop ", mseq)));
    ExpectSettled(*holder, holder_start);
    ExpectSettled(*mover, mover_start);
  }
}

// A mover that stops (SIGSTOP: a long pause, not a death) for longer than
// the peer timeout while pushing. The holder gives the lease up; whenever it
// gets the blocks back (while the mover is stopped, or after it resumed and
// fenced) it reuses them at once, and the resumed mover must not write into
// them.
TEST_P(KvTransferTest, PausedMoverNeverWritesIntoReusedBlocks) {
  ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", kHolderPool, kFastFailure));
  ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", kSlowMoverPool, kSlowMover));
  ASSERT_OK(mover->Ok("fill 14").status());
  ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
  ASSERT_OK_AND_ASSIGN(Accounting mover_start, mover->Free());
  ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(kSlowTokens));
  ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(kSlowTokens));
  ASSERT_OK_AND_ASSIGN(auto lease, holder->OpenLease(hseq, 20000, KvLeaseAccess::kWrite));
  ASSERT_OK(mover->StartSend(20000, 0, kSlowTokens, {{mseq, lease.second}}));
  ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
  ASSERT_EQ(opened, 1);
  absl::SleepFor(absl::Milliseconds(100));
  mover->Signal(SIGSTOP);
  EXPECT_THAT(holder->Call(absl::StrCat("await ", lease.first, " 5000")),
              StatusIs(absl::StatusCode::kUnavailable));
  // Reuse the blocks as soon as they are back, the mover still stopped.
  const absl::Time stopped_until = absl::Now() + absl::Milliseconds(2 * kPeerTimeoutMs);
  absl::Status dropped = holder->Call(absl::StrCat("drop ", hseq)).status();
  while (!dropped.ok() && absl::Now() < stopped_until) {
    absl::SleepFor(absl::Milliseconds(10));
    dropped = holder->Call(absl::StrCat("drop ", hseq)).status();
  }
  std::optional<int> reused;
  if (dropped.ok()) {
    ASSERT_OK_AND_ASSIGN(reused, ReuseAllFreeBlocks(*holder, kHolderPool, 0x3C));
  }
  absl::SleepFor(stopped_until - absl::Now());
  mover->Signal(SIGCONT);
  if (!reused.has_value()) {
    DropWhenReleased(*holder, hseq);
    ASSERT_OK_AND_ASSIGN(reused, ReuseAllFreeBlocks(*holder, kHolderPool, 0x3C));
  }
  ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1));
  EXPECT_FALSE(results[0].ok());
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_THAT(holder->CountPaint(absl::StrCat("verify ", *reused, " 60")), IsOkAndHolds(0))
      << "the resumed mover wrote into blocks the holder had reused";
  ASSERT_OK(holder->Call(absl::StrCat("drop ", *reused)));
  ASSERT_OK(mover->Call(absl::StrCat("drop ", mseq)));
  ExpectSettled(*holder, holder_start);
  ExpectSettled(*mover, mover_start);
}

// The holder aborts at varying moments around the mover's commit. Any order
// is fine as long as both sides agree where it matters: the holder keeps the
// data only if the mover was told it arrived, and blocks come back once.
TEST_P(KvTransferTest, AbortRacingCommit) {
  const PoolSpec pool{.layers = 2, .blocks = 64, .block_tokens = 16, .layer_major = true};
  ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", pool, kFastFailure));
  ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", pool, kFastFailure));
  ASSERT_OK(mover->Ok("fill 4").status());
  ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
  ASSERT_OK_AND_ASSIGN(Accounting mover_start, mover->Free());
  std::map<std::string, int> outcomes;
  for (int i = 0; i < 12; ++i) {
    SCOPED_TRACE(absl::StrCat("round ", i));
    const int64_t tokens = 64;
    ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(tokens));
    ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(tokens));
    ASSERT_OK_AND_ASSIGN(auto lease, holder->OpenLease(hseq, 20000, KvLeaseAccess::kWrite));
    ASSERT_OK(mover->StartSend(5000, 0, tokens, {{mseq, lease.second}}));
    // The abort lands anywhere from before the bind to after the ack.
    const int delays_us[] = {0, 300, 1000, 2000, 4000, 8000};
    absl::SleepFor(absl::Microseconds(delays_us[i % 6]));
    ASSERT_OK(holder->Call(absl::StrCat("abort ", lease.first)));
    ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
    ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1));
    const absl::Status held = holder->Call(absl::StrCat("await ", lease.first, " 5000")).status();
    const absl::Status moved = results[0].status();
    outcomes[absl::StrCat(opened == 1 ? "" : "refused at bind: ", "mover ",
                          absl::StatusCodeToString(moved.code()), ", holder ",
                          absl::StatusCodeToString(held.code()))]++;
    if (opened == 1) {
      EXPECT_THAT(moved, AnyOf(::dserve::testing::IsOk(), StatusIs(absl::StatusCode::kAborted)));
    } else {
      EXPECT_THAT(moved, StatusIs(absl::StatusCode::kAborted));  // aborted before the bind
    }
    EXPECT_THAT(held, AnyOf(::dserve::testing::IsOk(), StatusIs(absl::StatusCode::kAborted)));
    // The holder never keeps data the mover was told did not arrive.
    if (held.ok()) {
      EXPECT_OK(moved);
      ASSERT_OK_AND_ASSIGN(std::string digest, holder->Digest(hseq, 0, tokens));
      EXPECT_EQ(digest, *results[0]);
    }
    DropWhenReleased(*holder, hseq);
    ASSERT_OK(mover->Call(absl::StrCat("drop ", mseq)));
  }
  for (const auto& [outcome, count] : outcomes) {
    std::cout << "abort racing commit on " << KvTransportKindName(GetParam()) << ": " << outcome
              << " x" << count << "\n";
  }
  ExpectSettled(*holder, holder_start);
  ExpectSettled(*mover, mover_start);
}

// A commit message sent twice is acked once and releases nothing.
TEST_P(KvTransferTest, DuplicatedCommitIsHarmless) {
  const PoolSpec pool{.layers = 2, .blocks = 64, .block_tokens = 16, .layer_major = true};
  ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", pool, kFastFailure));
  ASSERT_OK_AND_ASSIGN(PeerProcess * mover,
                       Spawn("mover", pool, absl::StrCat(kFastFailure, " duplicate_commits=2")));
  ASSERT_OK(mover->Ok("fill 5").status());
  ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
  // The duplicate arrives before the hand-back (first) or after it (second);
  // the third transfer has no duplicate.
  for (bool await_during_send : {false, true, false}) {
    ASSERT_OK_AND_ASSIGN(TransferOutcome out,
                         OneTransfer(*holder, *mover, 200, 5000, await_during_send));
    ExpectDelivered(out);
  }
  ExpectSettled(*holder, holder_start);
}

// A lost commit: the mover gives up at its deadline and aborts; the holder's
// lease ends ABORTED and its blocks come back once.
TEST_P(KvTransferTest, LostCommitEndsInAbortAndReleasesOnce) {
  const PoolSpec pool{.layers = 2, .blocks = 64, .block_tokens = 16, .layer_major = true};
  ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", pool, kFastFailure));
  ASSERT_OK_AND_ASSIGN(PeerProcess * mover,
                       Spawn("mover", pool, absl::StrCat(kFastFailure, " drop_commits=1")));
  ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
  ASSERT_OK_AND_ASSIGN(Accounting mover_start, mover->Free());
  const absl::Time start = absl::Now();
  ASSERT_OK_AND_ASSIGN(TransferOutcome lost, OneTransfer(*holder, *mover, 200, 800, false));
  EXPECT_THAT(lost.moved, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_THAT(lost.held, StatusIs(absl::StatusCode::kAborted));
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(800) + kDeathNoticed);
  // The fault is spent: the next transfer goes through.
  ASSERT_OK_AND_ASSIGN(TransferOutcome next, OneTransfer(*holder, *mover, 200, 5000, false));
  ExpectDelivered(next);
  ExpectSettled(*holder, holder_start);
  ExpectSettled(*mover, mover_start);
}

// A lost ack: the holder has committed and keeps the data, the mover reports
// DEADLINE_EXCEEDED.
TEST_P(KvTransferTest, LostAckLeavesHolderWithTheData) {
  const PoolSpec pool{.layers = 2, .blocks = 64, .block_tokens = 16, .layer_major = true};
  ASSERT_OK_AND_ASSIGN(PeerProcess * holder,
                       Spawn("holder", pool, absl::StrCat(kFastFailure, " drop_acks=1")));
  ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", pool, kFastFailure));
  ASSERT_OK(mover->Ok("fill 6").status());
  ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
  ASSERT_OK_AND_ASSIGN(Accounting mover_start, mover->Free());
  // The holder is already waiting and takes the committed blocks; the mover's
  // abort after its deadline must not take them back (no second release).
  const absl::Time start = absl::Now();
  ASSERT_OK_AND_ASSIGN(TransferOutcome lost, OneTransfer(*holder, *mover, 200, 800, true));
  EXPECT_THAT(lost.moved, StatusIs(absl::StatusCode::kDeadlineExceeded));
  EXPECT_OK(lost.held);
  EXPECT_TRUE(lost.bytes_match);
  EXPECT_LT(absl::Now() - start, absl::Milliseconds(800) + kDeathNoticed);
  ASSERT_OK_AND_ASSIGN(TransferOutcome next, OneTransfer(*holder, *mover, 200, 5000, false));
  ExpectDelivered(next);
  ExpectSettled(*holder, holder_start);
  ExpectSettled(*mover, mover_start);
}

// ----------------------------------------------------------------------------
// 4. Bad descriptors: refused with INVALID_ARGUMENT before a byte moves.

// Edited: the target with `edit` applied, as hex.
std::string Edited(const std::string& hex, absl::FunctionRef<void(KvLeaseTarget&)> edit) {
  absl::StatusOr<KvLeaseTarget> target = ParseLeaseTarget(absl::HexStringToBytes(hex));
  EXPECT_OK(target.status());
  if (!target.ok()) return hex;
  edit(*target);
  return absl::BytesToHexString(SerializeLeaseTarget(*target));
}

TEST_P(KvTransferTest, BadDescriptorsAreRefusedBeforeAnyWrite) {
  const PoolSpec pool{.layers = 3, .blocks = 32, .block_tokens = 16, .layer_major = true};
  for (KvLeaseAccess access : {KvLeaseAccess::kWrite, KvLeaseAccess::kRead}) {
    SCOPED_TRACE(AccessName(access));
    ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", pool, kFastFailure));
    ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", pool, kFastFailure));
    ASSERT_OK(holder->Ok("fill 7").status());
    ASSERT_OK(mover->Ok("fill 8").status());
    ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
    ASSERT_OK_AND_ASSIGN(Accounting mover_start, mover->Free());
    const int64_t tokens = 100;  // 7 blocks of 16
    ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(tokens));
    ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(tokens));
    ASSERT_OK_AND_ASSIGN(auto lease, holder->OpenLease(hseq, 20000, access));
    // The side a transfer would write into.
    PeerProcess& written = access == KvLeaseAccess::kWrite ? *holder : *mover;
    ASSERT_OK_AND_ASSIGN(std::string region_before, written.Digest("digest_region"));

    struct Bad {
      std::string what;
      std::string target_hex;
      int64_t tokens;
      std::string message;
    };
    const std::vector<Bad> bad = {
        {"block id past the pool", Edited(lease.second, [](KvLeaseTarget& t) { t.blocks[3] = 32; }),
         tokens, "block"},
        {"negative block id", Edited(lease.second, [](KvLeaseTarget& t) { t.blocks[0] = -1; }),
         tokens, "block"},
        {"wrong generation", Edited(lease.second, [](KvLeaseTarget& t) { t.generation ^= 0x100; }),
         tokens, "generation"},
        {"more tokens than the lease holds", lease.second, 7 * 16 + 1, "blocks"},
        {"layout disagrees on bytes per token",
         Edited(lease.second,
                [](KvLeaseTarget& t) {
                  t.layout.bytes_per_token_per_layer = 128;
                  t.layout.block_stride_bytes /= 2;
                  t.layout.layer_stride_bytes /= 2;
                }),
         tokens, "bytes_per_token_per_layer"},
        {"layout disagrees on layers",
         Edited(lease.second, [](KvLeaseTarget& t) { t.layout.num_layers = 2; }), tokens,
         "num_layers"},
    };
    for (const Bad& b : bad) {
      SCOPED_TRACE(b.what);
      ASSERT_OK(mover->StartSend(5000, 0, b.tokens, {{mseq, b.target_hex}}));
      ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
      EXPECT_EQ(opened, 0);
      ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1));
      EXPECT_THAT(results[0].status(),
                  StatusIs(absl::StatusCode::kInvalidArgument, HasSubstr(b.message)));
      EXPECT_THAT(written.Digest("digest_region"), IsOkAndHolds(region_before));
    }
    // The refusals left the lease intact: the real target still works.
    ASSERT_OK(mover->StartSend(5000, 0, tokens, {{mseq, lease.second}}));
    ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
    EXPECT_EQ(opened, 1);
    ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1));
    ASSERT_OK(results[0].status());
    ASSERT_OK(holder->Call(absl::StrCat("await ", lease.first, " 5000")));
    EXPECT_THAT(holder->Digest(hseq, 0, tokens), IsOkAndHolds(*results[0]));
    ASSERT_OK(holder->Call(absl::StrCat("drop ", hseq)));
    ASSERT_OK(mover->Call(absl::StrCat("drop ", mseq)));
    ExpectSettled(*holder, holder_start);
    ExpectSettled(*mover, mover_start);
  }
}

// A target whose block list or layout was changed on the way (a corrupted or
// stale control-plane message) but still fits the holder's pool: the bind
// must catch it, since a one-sided put would land wherever the target says.
TEST_P(KvTransferTest, TargetNotMatchingItsLeaseIsRefusedBeforeAnyWrite) {
  const PoolSpec pool{.layers = 3, .blocks = 32, .block_tokens = 16, .layer_major = true};
  for (KvLeaseAccess access : {KvLeaseAccess::kWrite, KvLeaseAccess::kRead}) {
    SCOPED_TRACE(AccessName(access));
    ASSERT_OK_AND_ASSIGN(PeerProcess * holder, Spawn("holder", pool, kFastFailure));
    ASSERT_OK_AND_ASSIGN(PeerProcess * mover, Spawn("mover", pool, kFastFailure));
    ASSERT_OK(holder->Ok("fill 9").status());
    ASSERT_OK(mover->Ok("fill 10").status());
    ASSERT_OK_AND_ASSIGN(Accounting holder_start, holder->Free());
    const int64_t tokens = 64;
    ASSERT_OK_AND_ASSIGN(int hseq, holder->Alloc(tokens));
    ASSERT_OK_AND_ASSIGN(int mseq, mover->Alloc(tokens));
    ASSERT_OK_AND_ASSIGN(auto lease, holder->OpenLease(hseq, 20000, access));
    ASSERT_OK_AND_ASSIGN(KvLeaseTarget real,
                         ParseLeaseTarget(absl::HexStringToBytes(lease.second)));
    std::vector<KvBlockId> others;  // blocks of the pool outside the lease
    for (KvBlockId b = 0; b < 32 && others.size() < real.blocks.size(); ++b) {
      if (std::find(real.blocks.begin(), real.blocks.end(), b) == real.blocks.end()) {
        others.push_back(b);
      }
    }
    PeerProcess& written = access == KvLeaseAccess::kWrite ? *holder : *mover;
    ASSERT_OK_AND_ASSIGN(std::string region_before, written.Digest("digest_region"));
    const std::vector<std::pair<std::string, std::string>> forged = {
        {"other blocks of the pool",
         Edited(lease.second, [&](KvLeaseTarget& t) { t.blocks = others; })},
        {"block-major instead of layer-major", Edited(lease.second,
                                                      [](KvLeaseTarget& t) {
                                                        t.layout = BlockMajorLayout(
                                                            {.num_layers = 3,
                                                             .num_blocks = 32,
                                                             .block_tokens = 16,
                                                             .bytes_per_token_per_layer = 256});
                                                      })},
    };
    for (const auto& [what, hex] : forged) {
      SCOPED_TRACE(what);
      ASSERT_OK(mover->StartSend(5000, 0, tokens, {{mseq, hex}}));
      ASSERT_OK_AND_ASSIGN(int opened, mover->ReadOpened());
      ASSERT_OK_AND_ASSIGN(auto results, mover->ReadSendResults(1));
      EXPECT_EQ(opened, 0);
      EXPECT_THAT(results[0].status(), StatusIs(absl::StatusCode::kInvalidArgument));
      EXPECT_THAT(written.Digest("digest_region"), IsOkAndHolds(region_before));
    }
    ASSERT_OK(holder->Call(absl::StrCat("abort ", lease.first)));
    DropWhenReleased(*holder, hseq);
    ASSERT_OK(mover->Call(absl::StrCat("drop ", mseq)));
    ExpectSettled(*holder, holder_start);
  }
}

INSTANTIATE_TEST_SUITE_P(Transports, KvTransferTest,
                         ::testing::Values(KvTransportKind::kTcp, KvTransportKind::kSharedMemory),
                         [](const auto& info) {
                           return std::string(KvTransportKindName(info.param));
                         });

}  // namespace
}  // namespace dserve::kvtransfer
