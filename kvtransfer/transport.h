// kvtransfer/transport.h: KvTransport, the interface that moves KV-cache
// blocks between the pools of two processes, and the lease handoff around it.
//
// The handoff is a small transaction between a *holder* (the process whose
// blocks are written or read, e.g. a decode worker) and a *mover* (the
// process that writes or reads them, e.g. a prefill worker):
//
//   holder: OpenLease(blocks, access, ttl) -> KvLeaseTarget   (to the mover
//           through the control plane: worker address, remote key, layout,
//           block ids, lease id, generation)
//   mover:  Open(target, local blocks)   binds the lease (one round trip that
//           checks the generation), validates the whole plan; nothing has
//           been written if it fails
//           Submit(layers) ...           one-sided puts (push) or gets
//                                        (pull), many in flight; layer L may
//                                        be submitted while L+1 is computed
//           Commit(deadline)             waits for its operations, flushes,
//                                        sends the completion message and
//                                        waits for the holder's ack
//   holder: AwaitLease(lease, deadline)  OK once committed: the blocks are
//                                        the caller's again, holding the data
//
// Safety: a lease that is aborted (by either side), expires, or whose mover
// dies ends exactly once, and its blocks are handed back through the
// lease's release callback exactly once. A commit for a lease that is no
// longer live is refused (the generation is checked). Blocks are released
// only when no write can land in them any more: when the mover has fenced
// (flushed and stopped after the holder revoked the lease), when it has
// committed or aborted (both are sent after a flush), or when it is dead
// (heartbeats stopped or the endpoint failed). Where the transport delivers
// data through the holder (tcp), every data message is validated against the
// live lease on arrival and late data is dropped.
//
// Every wait has a deadline; peers exchange heartbeats so a dead peer turns
// into UNAVAILABLE within KvTransportOptions::peer_timeout, whatever the
// UCX error-handling mode of the transport.
//
// The same calls move a running request's KV from one decode worker to
// another (live migration): the destination opens a write lease, the source
// is the mover with first_token/num_tokens covering the request's tokens.
//
// Nothing here names a UCX type; kvtransfer/ucx/ implements it.
#ifndef DSERVE_KVTRANSFER_TRANSPORT_H_
#define DSERVE_KVTRANSFER_TRANSPORT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "kvtransfer/transfer_plan.h"

namespace dserve::kvtransfer {

// KvTransportKind: which links a transport may use.
enum class KvTransportKind {
  kTcp,           // TCP sockets (UCX_TLS=tcp); works across machines
  kSharedMemory,  // one machine: posix/sysv shared memory and cma
  kAuto,          // whatever UCX finds (RDMA verbs when the hardware has them)
};

// KvTransportKindName: "tcp", "shm" or "auto".
const char* KvTransportKindName(KvTransportKind kind);

// ParseKvTransportKind accepts the names above; INVALID_ARGUMENT otherwise.
absl::StatusOr<KvTransportKind> ParseKvTransportKind(std::string_view name);

// KvFaultInjection: deliberate protocol faults, for tests only. Each counter
// applies to that many messages, then the transport behaves normally.
struct KvFaultInjection {
  int drop_commits = 0;                                // mover: commit messages not sent
  int duplicate_commits = 0;                           // mover: commit messages sent twice
  int drop_acks = 0;                                   // holder: commit acks not sent
  absl::Duration delay_per_op = absl::ZeroDuration();  // mover: sleep before each data op
};

// KvTransportOptions: what a transport uses and how quickly it gives up.
struct KvTransportOptions {
  KvTransportKind kind = KvTransportKind::kSharedMemory;
  // Heartbeats go to every peer with an open transfer or lease at this
  // interval; a peer silent for peer_timeout is dead.
  absl::Duration heartbeat_interval = absl::Milliseconds(100);
  absl::Duration peer_timeout = absl::Seconds(2);
  // Data operations a transfer keeps in flight before Submit queues more.
  int max_ops_in_flight = 64;
  KvFaultInjection faults;
};

// KvRegionId: a registered memory region of one transport.
using KvRegionId = int32_t;

// KvRegion: memory registered for transfers (a whole KV pool). `data` stays
// valid until the transport is destroyed.
struct KvRegion {
  KvRegionId id = -1;
  uint8_t* data = nullptr;
  int64_t bytes = 0;
};

// KvLeaseAccess: what the mover may do to the lease's blocks.
enum class KvLeaseAccess {
  kWrite,  // push: the mover puts its KV into the holder's blocks
  kRead,   // pull: the mover gets the holder's KV into its own blocks
};

// KvLeaseTarget: everything a mover needs to reach a lease. Crosses process
// boundaries through the control plane (Serialize/Parse below); opaque byte
// strings are the transport's (worker address, packed remote key).
struct KvLeaseTarget {
  std::string worker_address;
  std::string remote_key;
  uint64_t remote_base = 0;  // the region's address in the holder's process
  KvPoolLayout layout;       // the holder's pool layout
  std::vector<KvBlockId> blocks;
  uint64_t lease_id = 0;
  uint64_t generation = 0;
  KvLeaseAccess access = KvLeaseAccess::kWrite;
  absl::Duration ttl;  // lease time left when the target was made
};

std::string SerializeLeaseTarget(const KvLeaseTarget& target);
// ParseLeaseTarget: INVALID_ARGUMENT naming the field when malformed.
absl::StatusOr<KvLeaseTarget> ParseLeaseTarget(std::string_view bytes);

// KvLeaseRelease: called exactly once, on the transport's progress thread,
// with the lease's blocks when the lease ends without being handed back to
// its owner by AwaitLease (aborted, expired, mover dead). Must not block and
// must not call back into the transport.
using KvLeaseRelease = absl::AnyInvocable<void(std::vector<KvBlockId> blocks)>;

// KvLocalBlocks: the mover's side of a transfer: its region and layout, the
// sequence's blocks in token order, and which tokens move.
struct KvLocalBlocks {
  KvRegionId region = -1;
  KvPoolLayout layout;
  std::span<const KvBlockId> blocks;  // read during Open only
  int64_t num_tokens = 0;
  int64_t first_token = 0;
};

// KvTransferStats: what one transfer moved.
struct KvTransferStats {
  int64_t bytes = 0;
  int64_t ops = 0;
  int64_t layers_submitted = 0;
};

// KvTransfer: one mover-side transfer against one lease. Not thread-safe:
// one thread drives it. Destroying a transfer that was not committed aborts
// it (waits for its in-flight operations, bounded by peer_timeout, then
// tells the holder).
class KvTransfer {
 public:
  virtual ~KvTransfer() = default;

  // Submit issues the operations of layers [layers.first, layers.last) and
  // returns without waiting for them. Layers may be submitted in any order,
  // each at most once. Fails (and stops the transfer) when the lease was
  // revoked, the peer died, or the layers are out of range.
  virtual absl::Status Submit(LayerRange layers) = 0;

  // Commit submits any layers not yet submitted, waits for every operation,
  // flushes, sends the completion message and waits for the holder's ack,
  // all by `deadline`. OK means the holder has the data. Otherwise
  // UNAVAILABLE (peer dead), DEADLINE_EXCEEDED (no ack in time, or the lease
  // expired) or ABORTED (the lease was aborted); the transfer is then over
  // and the holder frees its blocks.
  virtual absl::Status Commit(absl::Time deadline) = 0;

  // Abort stops the transfer: waits for in-flight operations (bounded), then
  // tells the holder, which frees the blocks. Idempotent.
  virtual void Abort() = 0;

  virtual KvTransferStats stats() const = 0;
};

// KvTransport: one process's endpoint for KV transfers. Thread-safe: any
// thread may call any method. All transport work (UCX worker, callbacks,
// timers) runs on one progress thread owned by the transport.
class KvTransport {
 public:
  virtual ~KvTransport() = default;

  // Describe: one line naming the transport, its error-handling mode and
  // whether device memory is supported, for start-up logs.
  virtual std::string Describe() const = 0;
  virtual bool SupportsDeviceMemory() const = 0;

  // AllocateRegion: `bytes` of registered memory, allocated by the transport
  // so that shared-memory peers can map it directly (the fastest path).
  virtual absl::StatusOr<KvRegion> AllocateRegion(int64_t bytes) = 0;
  // RegisterRegion: registers caller-owned memory, which must outlive the
  // transport.
  virtual absl::StatusOr<KvRegion> RegisterRegion(uint8_t* data, int64_t bytes) = 0;

  // OpenLease grants one mover `access` to `blocks` of `region` (laid out as
  // `layout`) for `ttl`. The caller has allocated the blocks; they come back
  // either through AwaitLease (OK) or through `release` (any other end),
  // exactly once. INVALID_ARGUMENT when a block id or the layout does not fit
  // the region.
  virtual absl::StatusOr<KvLeaseTarget> OpenLease(KvRegionId region, const KvPoolLayout& layout,
                                                  std::vector<KvBlockId> blocks,
                                                  KvLeaseAccess access, absl::Duration ttl,
                                                  KvLeaseRelease release) = 0;

  // AwaitLease waits until the lease's mover commits (OK: the blocks are the
  // caller's again, `release` will not be called) or the lease ends
  // otherwise: DEADLINE_EXCEEDED (lease expired), ABORTED (aborted by either
  // side), UNAVAILABLE (mover died). Returning DEADLINE_EXCEEDED because
  // `deadline` passed leaves the lease open. NOT_FOUND for an unknown lease.
  virtual absl::Status AwaitLease(uint64_t lease_id, absl::Time deadline) = 0;

  // AbortLease ends a lease from the holder's side (a cancelled request).
  // Blocks are released once the mover, if any, has fenced. Idempotent.
  virtual void AbortLease(uint64_t lease_id) = 0;

  // Open starts a transfer against `target` between it and `local`: it
  // connects to the holder (endpoints are cached per peer), binds the lease
  // and plans every layer, by `deadline`. INVALID_ARGUMENT (bad block id,
  // layout mismatch, wrong generation, more tokens than the lease holds)
  // before any byte moves; UNAVAILABLE when the holder cannot be reached;
  // DEADLINE_EXCEEDED / ABORTED when the lease already ended.
  virtual absl::StatusOr<std::unique_ptr<KvTransfer>> Open(const KvLeaseTarget& target,
                                                           const KvLocalBlocks& local,
                                                           absl::Time deadline) = 0;

  // LeasesOpen: leases not yet ended or handed back (including quarantined
  // ones waiting for a fence). For tests and metrics.
  virtual int64_t LeasesOpen() const = 0;
};

// CreateKvTransport: the UCX transport (kvtransfer/ucx/) for `options`.
absl::StatusOr<std::unique_ptr<KvTransport>> CreateKvTransport(const KvTransportOptions& options);

}  // namespace dserve::kvtransfer

#endif  // DSERVE_KVTRANSFER_TRANSPORT_H_
