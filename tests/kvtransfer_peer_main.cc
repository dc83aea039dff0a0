// tests/kvtransfer_peer_main.cc: kvtransfer_peer, one process's KvTransport
// driven line by line on stdin/stdout, for the cross-process tests in
// tests/kvtransfer_test.cc.
//
// The test plays the control plane: it starts holders and movers as separate
// processes, carries lease targets between them (as hex), and kills them to
// inject faults. A peer owns one pool (a region allocated by its transport)
// and a free list of the pool's blocks, so the test can check that every
// block comes back exactly once, whichever way a lease ends.
//
// Blocks are handed out as sequences ("seq"): blocks taken at random from the
// free list, in token order. A holder leases a sequence; a mover sends from
// or into one. Each command is one line of words and gets one answer line,
// which starts with an absl status code name ("OK", "INVALID_ARGUMENT", ...)
// followed by values (OK) or the status message; a malformed command gets
// "ERROR <why>". `send` answers "OPENED <n>" first, once its transfers are
// open, so that the test knows when data starts to move.
//
//   init <tcp|shm> [peer_timeout_ms=N] [heartbeat_ms=N] [max_ops=N]
//        [delay_per_op_ms=N] [drop_commits=N] [duplicate_commits=N]
//        [drop_acks=N]                     -> OK <transport description>
//   pool <layers> <blocks> <block_tokens> <bytes_per_token> <layer|block>
//        <seed>                            -> OK   (a new region, all free)
//   fill <seed>                            -> OK   (random bytes everywhere)
//   alloc <tokens>                         -> OK <seq>
//   drop <seq>                             -> OK   (forget it; blocks it
//                                             still owns go back to the pool),
//                                             FAILED_PRECONDITION while leased
//   lease <seq> <ttl_ms> <write|read>      -> OK <lease_id> <target hex>
//   await <lease_id> <deadline_ms>         -> the AwaitLease status
//   abort <lease_id>                       -> OK
//   send <deadline_ms> <first_token> <tokens> <seq>:<target hex> ...
//                                          -> OPENED <n>, then one line per
//                                             target: "OK <digest>" or the
//                                             transfer's status
//   digest <seq> <first_token> <tokens>    -> OK <digest of those tokens>
//   digest_free                            -> OK <digest of the free blocks>
//   digest_region                          -> OK <digest of the whole region>
//   paint <seq> <byte>                     -> OK 0 (every byte of its blocks)
//   verify <seq> <byte>                    -> OK <bytes that differ>
//   free                                   -> OK <free blocks> <LeasesOpen()>
//                                             <release errors>
//   quit                                   -> OK, then exits
//
// Digests are 64-bit FNV-1a over the tokens in token order, layer by layer,
// so a mover's and a holder's digests of the same tokens are equal when the
// bytes are (and, but for hash collisions, only then), whatever the two
// pools' layouts.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/strings/escaping.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "kvtransfer/transfer_plan.h"
#include "kvtransfer/transport.h"

namespace dserve::kvtransfer {
namespace {

using Words = std::vector<absl::string_view>;

// Sequence: blocks of the pool in token order, and who has them now.
struct Sequence {
  enum class State {
    kOwned,     // the peer's: paint, verify, send, lease, drop
    kLeased,    // lent to a mover through a lease
    kReleased,  // the lease ended without commit; blocks are free again
  };
  std::vector<KvBlockId> blocks;
  State state = State::kOwned;
};

// Fnv1a: 64-bit FNV-1a over `n` bytes, continuing from `h`.
uint64_t Fnv1a(uint64_t h, const uint8_t* p, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}
constexpr uint64_t kFnvBasis = 0xcbf29ce484222325ull;

std::string Hex64(uint64_t v) { return absl::StrCat(absl::Hex(v, absl::kZeroPad16)); }

// Answer: `status` as an answer line (code name, then message).
std::string Answer(const absl::Status& status) {
  std::string message(status.message());
  std::replace(message.begin(), message.end(), '\n', ' ');
  return absl::StrCat(absl::StatusCodeToString(status.code()), " ", message);
}

std::string Error(absl::string_view why) { return absl::StrCat("ERROR ", why); }

// ParseInt: a decimal integer argument, or nullopt.
std::optional<int64_t> ParseInt(absl::string_view word) {
  int64_t v = 0;
  if (!absl::SimpleAtoi(word, &v)) return std::nullopt;
  return v;
}

// KvPeer: the peer's transport, pool and sequences. Commands run on the main
// thread; release callbacks run on the transport's progress thread and only
// touch the free list and sequences, under mu_. mu_ is never held across a
// call into the transport.
class KvPeer {
 public:
  // Handle runs one command and returns its (last) answer line; `say`
  // prints the lines before it (send's OPENED and per-target results).
  std::string Handle(const Words& w, absl::FunctionRef<void(absl::string_view)> say) {
    if (w.empty()) return Error("empty command");
    const absl::string_view cmd = w[0];
    if (cmd == "init") return Init(w);
    if (transport_ == nullptr) return Error("init first");
    if (cmd == "pool") return Pool(w);
    if (region_.data == nullptr) return Error("pool first");
    if (cmd == "fill" && w.size() == 2) return Fill(w[1]);
    if (cmd == "alloc" && w.size() == 2) return Alloc(w[1]);
    if (cmd == "drop" && w.size() == 2) return Drop(w[1]);
    if (cmd == "lease" && w.size() == 4) return Lease(w[1], w[2], w[3]);
    if (cmd == "await" && w.size() == 3) return Await(w[1], w[2]);
    if (cmd == "abort" && w.size() == 2) return Abort(w[1]);
    if (cmd == "send" && w.size() >= 5) return Send(w, say);
    if (cmd == "digest" && w.size() == 4) return DigestTokens(w[1], w[2], w[3]);
    if (cmd == "digest_free") return DigestFree();
    if (cmd == "digest_region") {
      return absl::StrCat("OK ", Hex64(Fnv1a(kFnvBasis, region_.data, layout_.pool_bytes)));
    }
    if (cmd == "paint" && w.size() == 3) return Paint(w[1], w[2], /*check=*/false);
    if (cmd == "verify" && w.size() == 3) return Paint(w[1], w[2], /*check=*/true);
    if (cmd == "free") {
      const int64_t leases_open = transport_->LeasesOpen();
      absl::MutexLock lock(&mu_);
      return absl::StrCat("OK ", free_.size(), " ", leases_open, " ", release_errors_);
    }
    return Error(absl::StrCat("unknown command or wrong arguments: ", cmd));
  }

 private:
  std::string Init(const Words& w) {
    if (transport_ != nullptr) return Error("already initialized");
    if (w.size() < 2) return Error("init <tcp|shm> [key=value...]");
    absl::StatusOr<KvTransportKind> kind = ParseKvTransportKind(std::string(w[1]));
    if (!kind.ok()) return Answer(kind.status());
    KvTransportOptions options;
    options.kind = *kind;
    for (size_t i = 2; i < w.size(); ++i) {
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(w[i], '=');
      std::optional<int64_t> v = ParseInt(kv.second);
      if (!v.has_value()) return Error(absl::StrCat("bad option ", w[i]));
      if (kv.first == "peer_timeout_ms") {
        options.peer_timeout = absl::Milliseconds(*v);
      } else if (kv.first == "heartbeat_ms") {
        options.heartbeat_interval = absl::Milliseconds(*v);
      } else if (kv.first == "max_ops") {
        options.max_ops_in_flight = static_cast<int>(*v);
      } else if (kv.first == "delay_per_op_ms") {
        options.faults.delay_per_op = absl::Milliseconds(*v);
      } else if (kv.first == "drop_commits") {
        options.faults.drop_commits = static_cast<int>(*v);
      } else if (kv.first == "duplicate_commits") {
        options.faults.duplicate_commits = static_cast<int>(*v);
      } else if (kv.first == "drop_acks") {
        options.faults.drop_acks = static_cast<int>(*v);
      } else {
        return Error(absl::StrCat("unknown option ", kv.first));
      }
    }
    absl::StatusOr<std::unique_ptr<KvTransport>> transport = CreateKvTransport(options);
    if (!transport.ok()) return Answer(transport.status());
    transport_ = *std::move(transport);
    return absl::StrCat("OK ", transport_->Describe());
  }

  std::string Pool(const Words& w) {
    int64_t v[4];
    if (w.size() != 7)
      return Error("pool <layers> <blocks> <block_tokens> <bpt> <layer|block> <seed>");
    for (int i = 0; i < 4; ++i) {
      std::optional<int64_t> x = ParseInt(w[i + 1]);
      if (!x.has_value() || *x <= 0) return Error(absl::StrCat("bad pool size ", w[i + 1]));
      v[i] = *x;
    }
    std::optional<int64_t> seed = ParseInt(w[6]);
    if ((w[5] != "layer" && w[5] != "block") || !seed.has_value()) return Error("bad pool args");
    {
      absl::MutexLock lock(&mu_);
      if (!seqs_.empty()) return Error("drop every sequence before a new pool");
    }
    const KvPoolShape shape{.num_layers = v[0],
                            .num_blocks = v[1],
                            .block_tokens = v[2],
                            .bytes_per_token_per_layer = v[3]};
    KvPoolLayout layout = w[5] == "layer" ? LayerMajorLayout(shape) : BlockMajorLayout(shape);
    // A region lives as long as the transport: earlier pools stay mapped.
    absl::StatusOr<KvRegion> region = transport_->AllocateRegion(layout.pool_bytes);
    if (!region.ok()) return Answer(region.status());
    absl::MutexLock lock(&mu_);
    region_ = *region;
    layout_ = layout;
    free_.clear();
    for (KvBlockId b = 0; b < layout.num_blocks; ++b) free_.insert(b);
    rng_.seed(static_cast<uint64_t>(*seed));
    return "OK";
  }

  std::string Fill(absl::string_view seed_word) {
    std::optional<int64_t> seed = ParseInt(seed_word);
    if (!seed.has_value()) return Error("fill <seed>");
    std::mt19937_64 rng(static_cast<uint64_t>(*seed));
    for (int64_t i = 0; i < layout_.pool_bytes; i += 8) {
      const uint64_t word = rng();
      std::memcpy(region_.data + i, &word, std::min<int64_t>(8, layout_.pool_bytes - i));
    }
    return "OK";
  }

  std::string Alloc(absl::string_view tokens_word) {
    std::optional<int64_t> tokens = ParseInt(tokens_word);
    if (!tokens.has_value() || *tokens <= 0) return Error("alloc <tokens>");
    const int64_t count = (*tokens + layout_.block_tokens - 1) / layout_.block_tokens;
    absl::MutexLock lock(&mu_);
    if (count > static_cast<int64_t>(free_.size())) {
      return Answer(absl::ResourceExhaustedError(
          absl::StrCat(count, " blocks wanted, ", free_.size(), " free")));
    }
    std::vector<KvBlockId> pick(free_.begin(), free_.end());
    std::shuffle(pick.begin(), pick.end(), rng_);
    pick.resize(count);
    for (KvBlockId b : pick) free_.erase(b);
    const int seq = next_seq_++;
    seqs_[seq].blocks = std::move(pick);
    return absl::StrCat("OK ", seq);
  }

  std::string Drop(absl::string_view seq_word) {
    absl::MutexLock lock(&mu_);
    Sequence* seq = FindSeq(seq_word);
    if (seq == nullptr) return Error(absl::StrCat("no sequence ", seq_word));
    if (seq->state == Sequence::State::kLeased) {
      return Answer(absl::FailedPreconditionError("sequence is still leased"));
    }
    if (seq->state == Sequence::State::kOwned) {
      for (KvBlockId b : seq->blocks) free_.insert(b);
    }
    seqs_.erase(*ParseInt(seq_word));
    return "OK";
  }

  std::string Lease(absl::string_view seq_word, absl::string_view ttl_word,
                    absl::string_view access_word) {
    std::optional<int64_t> ttl_ms = ParseInt(ttl_word);
    if (!ttl_ms.has_value() || (access_word != "write" && access_word != "read")) {
      return Error("lease <seq> <ttl_ms> <write|read>");
    }
    std::vector<KvBlockId> blocks;
    const int seq_id = static_cast<int>(ParseInt(seq_word).value_or(-1));
    {
      absl::MutexLock lock(&mu_);
      Sequence* seq = FindSeq(seq_word);
      if (seq == nullptr || seq->state != Sequence::State::kOwned) {
        return Error(absl::StrCat("no owned sequence ", seq_word));
      }
      // Leased before OpenLease: the release callback may run at once.
      seq->state = Sequence::State::kLeased;
      blocks = seq->blocks;
    }
    absl::StatusOr<KvLeaseTarget> target = transport_->OpenLease(
        region_.id, layout_, blocks,
        access_word == "write" ? KvLeaseAccess::kWrite : KvLeaseAccess::kRead,
        absl::Milliseconds(*ttl_ms),
        [this, seq_id](std::vector<KvBlockId> released) { Release(seq_id, std::move(released)); });
    absl::MutexLock lock(&mu_);
    if (!target.ok()) {
      seqs_[seq_id].state = Sequence::State::kOwned;
      return Answer(target.status());
    }
    lease_seqs_[target->lease_id] = seq_id;
    return absl::StrCat("OK ", target->lease_id, " ",
                        absl::BytesToHexString(SerializeLeaseTarget(*target)));
  }

  // Release: the lease's release callback (progress thread). Every block
  // must be the sequence's and must not be free already; anything else is
  // counted as a release error, which the test expects to stay 0.
  void Release(int seq_id, std::vector<KvBlockId> blocks) {
    absl::MutexLock lock(&mu_);
    auto it = seqs_.find(seq_id);
    if (it == seqs_.end() || it->second.state != Sequence::State::kLeased ||
        std::set<KvBlockId>(blocks.begin(), blocks.end()) !=
            std::set<KvBlockId>(it->second.blocks.begin(), it->second.blocks.end())) {
      ++release_errors_;
    }
    for (KvBlockId b : blocks) {
      if (!free_.insert(b).second) ++release_errors_;
    }
    if (it != seqs_.end()) it->second.state = Sequence::State::kReleased;
  }

  std::string Await(absl::string_view lease_word, absl::string_view deadline_word) {
    std::optional<int64_t> lease_id = ParseInt(lease_word);
    std::optional<int64_t> deadline_ms = ParseInt(deadline_word);
    if (!lease_id.has_value() || !deadline_ms.has_value()) return Error("await <lease> <ms>");
    absl::Status status = transport_->AwaitLease(static_cast<uint64_t>(*lease_id),
                                                 absl::Now() + absl::Milliseconds(*deadline_ms));
    if (status.ok()) {
      // Committed: the blocks are ours again, holding the mover's data.
      absl::MutexLock lock(&mu_);
      auto it = lease_seqs_.find(static_cast<uint64_t>(*lease_id));
      if (it == lease_seqs_.end()) return Error("await OK for a lease this peer did not open");
      Sequence& seq = seqs_[it->second];
      if (seq.state != Sequence::State::kLeased) ++release_errors_;
      seq.state = Sequence::State::kOwned;
    }
    return Answer(status);
  }

  std::string Abort(absl::string_view lease_word) {
    std::optional<int64_t> lease_id = ParseInt(lease_word);
    if (!lease_id.has_value()) return Error("abort <lease>");
    transport_->AbortLease(static_cast<uint64_t>(*lease_id));
    return "OK";
  }

  // Send: opens a transfer per target, submits them layer by layer
  // (interleaved, as layer-wise prefill would), then commits each. A failed
  // transfer is aborted, which waits for its operations in flight, so a pull
  // that failed cannot still be writing into the sequence afterwards.
  std::string Send(const Words& w, absl::FunctionRef<void(absl::string_view)> say) {
    std::optional<int64_t> deadline_ms = ParseInt(w[1]);
    std::optional<int64_t> first = ParseInt(w[2]);
    std::optional<int64_t> tokens = ParseInt(w[3]);
    if (!deadline_ms.has_value() || !first.has_value() || !tokens.has_value()) {
      return Error("send <deadline_ms> <first_token> <tokens> <seq>:<target hex>...");
    }
    const absl::Time deadline = absl::Now() + absl::Milliseconds(*deadline_ms);
    struct Leg {
      std::vector<KvBlockId> blocks;
      absl::Status status;
      std::unique_ptr<KvTransfer> transfer;
    };
    std::vector<Leg> legs(w.size() - 4);
    std::vector<std::string> seq_words;
    for (size_t i = 0; i < legs.size(); ++i) {
      std::pair<absl::string_view, absl::string_view> arg = absl::StrSplit(w[i + 4], ':');
      seq_words.emplace_back(arg.first);
      {
        absl::MutexLock lock(&mu_);
        Sequence* seq = FindSeq(arg.first);
        if (seq == nullptr || seq->state != Sequence::State::kOwned) {
          return Error(absl::StrCat("no owned sequence ", arg.first));
        }
        legs[i].blocks = seq->blocks;
      }
      absl::StatusOr<KvLeaseTarget> target =
          ParseLeaseTarget(absl::HexStringToBytes(std::string(arg.second)));
      if (!target.ok()) {
        legs[i].status = target.status();
        continue;
      }
      KvLocalBlocks local{.region = region_.id,
                          .layout = layout_,
                          .blocks = legs[i].blocks,
                          .num_tokens = *tokens,
                          .first_token = *first};
      absl::StatusOr<std::unique_ptr<KvTransfer>> transfer =
          transport_->Open(*target, local, deadline);
      if (transfer.ok()) {
        legs[i].transfer = *std::move(transfer);
      } else {
        legs[i].status = transfer.status();
      }
    }
    say(absl::StrCat("OPENED ", std::count_if(legs.begin(), legs.end(),
                                              [](const Leg& l) { return l.transfer != nullptr; })));
    for (int64_t layer = 0; layer < layout_.num_layers; ++layer) {
      for (Leg& leg : legs) {
        if (leg.transfer == nullptr || !leg.status.ok()) continue;
        leg.status = leg.transfer->Submit({layer, layer + 1});
      }
    }
    std::vector<std::string> lines;
    for (size_t i = 0; i < legs.size(); ++i) {
      Leg& leg = legs[i];
      if (leg.transfer != nullptr) {
        if (leg.status.ok()) leg.status = leg.transfer->Commit(deadline);
        if (!leg.status.ok()) leg.transfer->Abort();
      }
      if (!leg.status.ok()) {
        lines.push_back(Answer(leg.status));
        continue;
      }
      lines.push_back(DigestTokens(seq_words[i], w[2], w[3]));
    }
    // One answer line per target; all but the last are said here.
    for (size_t i = 0; i + 1 < lines.size(); ++i) say(lines[i]);
    return lines.back();
  }

  std::string DigestTokens(absl::string_view seq_word, absl::string_view first_word,
                           absl::string_view tokens_word) {
    std::optional<int64_t> first = ParseInt(first_word);
    std::optional<int64_t> tokens = ParseInt(tokens_word);
    std::vector<KvBlockId> blocks;
    {
      absl::MutexLock lock(&mu_);
      Sequence* seq = FindSeq(seq_word);
      if (seq == nullptr) return Error(absl::StrCat("no sequence ", seq_word));
      blocks = seq->blocks;
    }
    if (!first.has_value() || !tokens.has_value() || *first < 0 || *tokens <= 0 ||
        *first + *tokens > static_cast<int64_t>(blocks.size()) * layout_.block_tokens) {
      return Error("digest <seq> <first_token> <tokens>: tokens outside the sequence");
    }
    uint64_t h = kFnvBasis;
    for (int64_t l = 0; l < layout_.num_layers; ++l) {
      for (int64_t t = *first; t < *first + *tokens; ++t) {
        const int64_t offset = layout_.base_offset_bytes + l * layout_.layer_stride_bytes +
                               blocks[t / layout_.block_tokens] * layout_.block_stride_bytes +
                               (t % layout_.block_tokens) * layout_.bytes_per_token_per_layer;
        h = Fnv1a(h, region_.data + offset, layout_.bytes_per_token_per_layer);
      }
    }
    return absl::StrCat("OK ", Hex64(h));
  }

  // DigestFree: every byte of every free block, in block id order; equal
  // before and after a transfer when nothing outside the leases was touched.
  std::string DigestFree() {
    absl::MutexLock lock(&mu_);
    uint64_t h = kFnvBasis;
    for (KvBlockId b : free_) {
      for (int64_t l = 0; l < layout_.num_layers; ++l) {
        h = Fnv1a(h, SlabLocked(b, l), layout_.block_tokens * layout_.bytes_per_token_per_layer);
      }
    }
    return absl::StrCat("OK ", Hex64(h));
  }

  // Paint fills (or, with `check`, counts the bytes that differ from) every
  // byte of the sequence's blocks with `byte_word`: a holder reusing blocks.
  std::string Paint(absl::string_view seq_word, absl::string_view byte_word, bool check) {
    std::optional<int64_t> byte = ParseInt(byte_word);
    if (!byte.has_value() || *byte < 0 || *byte > 255) return Error("paint <seq> <byte>");
    absl::MutexLock lock(&mu_);
    Sequence* seq = FindSeq(seq_word);
    if (seq == nullptr || seq->state != Sequence::State::kOwned) {
      return Error(absl::StrCat("no owned sequence ", seq_word));
    }
    const int64_t slab = layout_.block_tokens * layout_.bytes_per_token_per_layer;
    int64_t differ = 0;
    for (KvBlockId b : seq->blocks) {
      for (int64_t l = 0; l < layout_.num_layers; ++l) {
        uint8_t* p = SlabLocked(b, l);
        if (!check) std::memset(p, static_cast<int>(*byte), static_cast<size_t>(slab));
        differ += std::count_if(p, p + slab, [&](uint8_t c) { return c != *byte; });
      }
    }
    return absl::StrCat("OK ", differ);
  }

  uint8_t* SlabLocked(KvBlockId b, int64_t layer) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return region_.data + layout_.base_offset_bytes + layer * layout_.layer_stride_bytes +
           b * layout_.block_stride_bytes;
  }

  Sequence* FindSeq(absl::string_view word) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::optional<int64_t> id = ParseInt(word);
    if (!id.has_value()) return nullptr;
    auto it = seqs_.find(static_cast<int>(*id));
    return it == seqs_.end() ? nullptr : &it->second;
  }

  // Only the main thread changes region_ and layout_ (in Pool, with no
  // sequence outstanding, so no release callback can be pending).
  KvRegion region_;
  KvPoolLayout layout_;
  std::mt19937_64 rng_;

  absl::Mutex mu_;
  std::set<KvBlockId> free_ ABSL_GUARDED_BY(mu_);
  std::map<int, Sequence> seqs_ ABSL_GUARDED_BY(mu_);
  std::map<uint64_t, int> lease_seqs_ ABSL_GUARDED_BY(mu_);
  int next_seq_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t release_errors_ ABSL_GUARDED_BY(mu_) = 0;

  // Last, so it is destroyed first: no release callback runs after the
  // state above is gone.
  std::unique_ptr<KvTransport> transport_;
};

}  // namespace
}  // namespace dserve::kvtransfer

int main() {
  dserve::kvtransfer::KvPeer peer;
  auto say = [](absl::string_view line) {
    std::fwrite(line.data(), 1, line.size(), stdout);
    std::fputc('\n', stdout);
    std::fflush(stdout);
  };
  std::string line;
  while (std::getline(std::cin, line)) {
    std::vector<absl::string_view> words = absl::StrSplit(line, ' ', absl::SkipEmpty());
    if (!words.empty() && words[0] == "quit") {
      say("OK");
      break;
    }
    say(peer.Handle(words, say));
  }
  return 0;
}
