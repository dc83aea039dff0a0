// kvtransfer/lease_table.h: the holder side of the KV handoff as a pure state
// machine: leases, their generations, binding to one mover, commit, the three
// ways a lease ends (abort, expiry, mover death), fencing, and exactly-once
// release of the blocks. No transport types: the UCX transport feeds it the
// protocol messages it receives and carries out the actions it returns, so
// every rule here is unit-tested without a network.
//
// A lease's life:
//
//   open --bind--> bound --commit--> committed --AwaitLease--> handed back
//   any of the three, on abort / expiry / mover death --> ended
//   ended, once fenced and with no data in flight --> released (callback, once)
//
// "Fenced" means no write from the mover can land any more: the lease was
// never bound, or the mover flushed and said so (commit, abort, fence reply to
// a revoke), or the mover is dead.
#ifndef DSERVE_KVTRANSFER_LEASE_TABLE_H_
#define DSERVE_KVTRANSFER_LEASE_TABLE_H_

#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/time/time.h"
#include "kvtransfer/transport.h"

namespace dserve::kvtransfer {

// KvPeerId: a process's random identity in the KV protocol (0 = none).
using KvPeerId = uint64_t;

// KvLeaseActions: what the transport must do after a table call, outside the
// table's lock: run release callbacks, and tell movers that their lease was
// revoked (they answer with a fence once their writes are flushed).
struct KvLeaseActions {
  struct Release {
    KvLeaseRelease callback;
    std::vector<KvBlockId> blocks;
  };
  struct Revoke {
    KvPeerId mover = 0;
    uint64_t lease_id = 0;
    uint64_t generation = 0;
    absl::Status reason;
  };
  std::vector<Release> releases;
  std::vector<Revoke> revokes;

  // Run calls every release callback (revokes are the transport's to send).
  void RunReleases();
};

// LeaseTargetFingerprint: a hash of what a target grants: the region's
// address, the layout, the blocks in order and the access. A mover sends it
// with its bind and the holder compares it with the lease's, so a target
// changed on its way (other blocks, another layout) is refused before any
// byte moves; one-sided writes could not be checked later.
uint64_t LeaseTargetFingerprint(const KvLeaseTarget& target);

// KvLeaseTable: all leases of one holder. Not thread-safe; the transport
// serializes calls under its own lock.
class KvLeaseTable {
 public:
  // `epoch` makes generations unique across restarts of the holder.
  explicit KvLeaseTable(uint64_t epoch);

  struct OpenResult {
    uint64_t lease_id = 0;
    uint64_t generation = 0;
  };
  // Open: a new lease on `blocks` (validated by the caller) until `deadline`;
  // `fingerprint` is the LeaseTargetFingerprint of the target handed out.
  OpenResult Open(KvRegionId region, const KvPoolLayout& layout, std::vector<KvBlockId> blocks,
                  KvLeaseAccess access, absl::Time deadline, KvLeaseRelease release,
                  uint64_t fingerprint);

  // Bind: the first message of a mover. OK when the lease is open and unbound
  // or already bound to `mover`. INVALID_ARGUMENT for an unknown lease or a
  // wrong generation; FAILED_PRECONDITION when bound to another mover;
  // the lease's end status once it has ended; ABORTED once committed;
  // INVALID_ARGUMENT when `fingerprint` is not the lease's (the mover's
  // target differs from the one handed out).
  absl::Status Bind(uint64_t lease_id, uint64_t generation, KvPeerId mover, absl::Time now,
                    uint64_t fingerprint);

  // Commit: the mover flushed everything (`bytes` moved through the holder,
  // 0 for one-sided writes) and asks to commit. Returns the ack status, or
  // nullopt when the commit waits for data still arriving through the holder
  // (FinishReceive then returns the ack). A commit for an ended lease is
  // refused with the lease's end status and fences it (the mover flushed
  // before committing). A repeated commit of a committed lease is acked OK
  // again without changing anything.
  std::optional<absl::Status> Commit(uint64_t lease_id, uint64_t generation, KvPeerId mover,
                                     int64_t bytes, KvLeaseActions& actions);

  // MoverAborted: the mover flushed and gave up. Ends the lease (ABORTED).
  void MoverAborted(uint64_t lease_id, uint64_t generation, KvPeerId mover,
                    KvLeaseActions& actions);

  // Fenced: the mover's answer to a revoke.
  void Fenced(uint64_t lease_id, uint64_t generation, KvPeerId mover, KvLeaseActions& actions);

  // PeerDead: `mover` is gone; its leases end (UNAVAILABLE) and are fenced.
  // The verdict is final: a mover that was only paused and speaks again is
  // refused (Bind, IsDead), since its leases were released as if it could
  // not write any more.
  void PeerDead(KvPeerId mover, KvLeaseActions& actions);
  bool IsDead(KvPeerId mover) const { return dead_peers_.contains(mover); }

  // Abort: the holder gives the lease up (ABORTED). Unknown ids are ignored.
  void Abort(uint64_t lease_id, KvLeaseActions& actions);

  // Expire ends every lease whose deadline is <= now (DEADLINE_EXCEEDED).
  void Expire(absl::Time now, KvLeaseActions& actions);

  // Await: the holder's view. OK hands a committed lease back (it leaves the
  // table); the end status for an ended lease; nullopt while still open;
  // NOT_FOUND for an unknown id.
  std::optional<absl::Status> Await(uint64_t lease_id);

  // BeginReceive: data for [offset, offset + bytes) of the region arrives
  // through the holder. True when the lease is bound to `mover`, not ended,
  // grants write access, and the range lies inside its blocks; the caller
  // then writes and calls FinishReceive. False: drop the data.
  bool BeginReceive(uint64_t lease_id, uint64_t generation, KvPeerId mover, int64_t offset,
                    int64_t bytes, KvRegionId* region);
  // FinishReceive: a receive begun above has ended (`ok` when the bytes were
  // written). May complete a deferred commit: returns its ack then.
  struct DeferredAck {
    KvPeerId mover = 0;
    uint64_t lease_id = 0;
    uint64_t generation = 0;
    absl::Status status;
  };
  std::optional<DeferredAck> FinishReceive(uint64_t lease_id, int64_t bytes, bool ok,
                                           KvLeaseActions& actions);

  // UnfencedRevokes: a revoke for every ended lease still waiting for its
  // mover's fence, to be sent again.
  std::vector<KvLeaseActions::Revoke> UnfencedRevokes() const;

  // Movers bound to leases that are not yet released: the peers whose
  // liveness the holder must watch.
  std::vector<KvPeerId> WatchedMovers() const;

  // Leases not yet released or handed back.
  int64_t size() const { return static_cast<int64_t>(leases_.size()); }

  // Releases handed out in KvLeaseActions whose callbacks have not returned
  // yet; the transport reports them back with ReleasesRan, so a count of
  // open leases can include them and never reads 0 before the blocks are back.
  int64_t releases_running() const { return releases_running_; }
  void ReleasesRan(int64_t n) { releases_running_ -= n; }

 private:
  enum class State { kOpen, kCommitted, kEnded };
  struct Lease {
    uint64_t generation = 0;
    uint64_t fingerprint = 0;
    KvRegionId region = -1;
    KvPoolLayout layout;
    std::vector<KvBlockId> blocks;
    absl::flat_hash_set<KvBlockId> block_set;
    KvLeaseAccess access = KvLeaseAccess::kWrite;
    absl::Time deadline;
    KvLeaseRelease release;
    State state = State::kOpen;
    absl::Status end_status;
    KvPeerId mover = 0;
    bool fenced = true;     // no writer can touch the blocks
    int64_t receiving = 0;  // receives in flight through the holder
    int64_t received_bytes = 0;
    int64_t commit_bytes = -1;  // >= 0: a commit waits for these bytes
  };

  Lease* Find(uint64_t lease_id, uint64_t generation);
  // End moves a live lease to kEnded with `status` (first end wins) and, if
  // a live mover may still write, asks for a revoke.
  void End(uint64_t lease_id, Lease& lease, absl::Status status, KvLeaseActions& actions);
  // MaybeRelease releases an ended, fenced, quiet lease and forgets it.
  void MaybeRelease(uint64_t lease_id, KvLeaseActions& actions);
  void Remember(uint64_t lease_id, uint64_t generation, absl::Status status);
  absl::Status Forgotten(uint64_t lease_id, uint64_t generation) const;
  bool RangeInLease(const Lease& lease, int64_t offset, int64_t bytes) const;

  uint64_t epoch_;
  uint64_t next_id_ = 1;
  absl::flat_hash_map<uint64_t, Lease> leases_;
  int64_t releases_running_ = 0;
  absl::flat_hash_set<KvPeerId> dead_peers_;
  // Recently ended leases (id, generation, how they ended), so a late
  // message gets the right refusal; bounded.
  struct Ended {
    uint64_t lease_id;
    uint64_t generation;
    absl::Status status;
  };
  std::deque<Ended> ended_;
};

}  // namespace dserve::kvtransfer

#endif  // DSERVE_KVTRANSFER_LEASE_TABLE_H_
