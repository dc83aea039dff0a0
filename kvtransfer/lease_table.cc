// kvtransfer/lease_table.cc: the lease state machine.
#include "kvtransfer/lease_table.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"

namespace dserve::kvtransfer {
namespace {

// How many ended leases are remembered for refusing late messages precisely.
constexpr size_t kRememberedEnds = 4096;

// SplitMix64: a bijective 64-bit mix; nearby inputs give unrelated outputs.
uint64_t SplitMix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

}  // namespace

uint64_t LeaseTargetFingerprint(const KvLeaseTarget& t) {
  uint64_t h = SplitMix64(t.remote_base);
  auto mix = [&h](uint64_t v) { h = SplitMix64(h ^ v); };
  for (int64_t v : {t.layout.num_layers, t.layout.num_blocks, t.layout.block_tokens,
                    t.layout.bytes_per_token_per_layer, t.layout.layer_stride_bytes,
                    t.layout.block_stride_bytes, t.layout.base_offset_bytes, t.layout.pool_bytes}) {
    mix(static_cast<uint64_t>(v));
  }
  mix(t.blocks.size());
  for (KvBlockId b : t.blocks) mix(static_cast<uint64_t>(static_cast<uint32_t>(b)));
  mix(t.access == KvLeaseAccess::kWrite ? 1 : 2);
  return h;
}

void KvLeaseActions::RunReleases() {
  for (Release& release : releases) {
    if (release.callback) release.callback(std::move(release.blocks));
  }
  releases.clear();
}

KvLeaseTable::KvLeaseTable(uint64_t epoch) : epoch_(epoch) {}

KvLeaseTable::OpenResult KvLeaseTable::Open(KvRegionId region, const KvPoolLayout& layout,
                                            std::vector<KvBlockId> blocks, KvLeaseAccess access,
                                            absl::Time deadline, KvLeaseRelease release,
                                            uint64_t fingerprint) {
  const uint64_t id = next_id_++;
  // The generation mixes the holder's epoch with the id, so a target from a
  // previous incarnation of this holder (same ids) never matches.
  uint64_t generation = SplitMix64(epoch_ ^ SplitMix64(id));
  if (generation == 0) generation = 1;
  Lease& lease = leases_[id];
  lease.generation = generation;
  lease.fingerprint = fingerprint;
  lease.region = region;
  lease.layout = layout;
  lease.block_set.insert(blocks.begin(), blocks.end());
  lease.blocks = std::move(blocks);
  lease.access = access;
  lease.deadline = deadline;
  lease.release = std::move(release);
  return {id, generation};
}

KvLeaseTable::Lease* KvLeaseTable::Find(uint64_t lease_id, uint64_t generation) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end() || it->second.generation != generation) return nullptr;
  return &it->second;
}

void KvLeaseTable::Remember(uint64_t lease_id, uint64_t generation, absl::Status status) {
  ended_.push_back({lease_id, generation, std::move(status)});
  if (ended_.size() > kRememberedEnds) ended_.pop_front();
}

absl::Status KvLeaseTable::Forgotten(uint64_t lease_id, uint64_t generation) const {
  for (auto it = ended_.rbegin(); it != ended_.rend(); ++it) {
    if (it->lease_id != lease_id) continue;
    if (it->generation != generation) break;
    if (it->status.ok()) {
      return absl::AbortedError(absl::StrCat("lease ", lease_id, " was already committed"));
    }
    return it->status;
  }
  auto live = leases_.find(lease_id);
  if (live != leases_.end()) {
    return absl::InvalidArgumentError(
        absl::StrCat("lease ", lease_id, ": wrong generation ", generation));
  }
  return absl::InvalidArgumentError(
      absl::StrCat("lease ", lease_id, " generation ", generation, " is unknown to this holder"));
}

absl::Status KvLeaseTable::Bind(uint64_t lease_id, uint64_t generation, KvPeerId mover,
                                absl::Time now, uint64_t fingerprint) {
  if (dead_peers_.contains(mover)) {
    return absl::UnavailableError("this holder has declared the mover dead");
  }
  Lease* lease = Find(lease_id, generation);
  if (lease == nullptr) return Forgotten(lease_id, generation);
  if (lease->state == State::kEnded) return lease->end_status;
  if (lease->state == State::kCommitted) {
    return absl::AbortedError(absl::StrCat("lease ", lease_id, " was already committed"));
  }
  if (now >= lease->deadline) {
    return absl::DeadlineExceededError(absl::StrCat("lease ", lease_id, " expired"));
  }
  if (fingerprint != lease->fingerprint) {
    return absl::InvalidArgumentError(absl::StrCat(
        "lease ", lease_id, ": the target's blocks, layout or access differ from the lease's"));
  }
  if (lease->mover != 0 && lease->mover != mover) {
    return absl::FailedPreconditionError(
        absl::StrCat("lease ", lease_id, " is bound to another mover"));
  }
  lease->mover = mover;
  lease->fenced = false;
  return absl::OkStatus();
}

std::optional<absl::Status> KvLeaseTable::Commit(uint64_t lease_id, uint64_t generation,
                                                 KvPeerId mover, int64_t bytes,
                                                 KvLeaseActions& actions) {
  Lease* lease = Find(lease_id, generation);
  if (lease == nullptr) return Forgotten(lease_id, generation);
  if (lease->mover != mover) {
    return absl::FailedPreconditionError(
        absl::StrCat("lease ", lease_id, " is not bound to the committing mover"));
  }
  switch (lease->state) {
    case State::kCommitted:
      return absl::OkStatus();  // a repeated commit: ack again, change nothing
    case State::kEnded: {
      absl::Status refusal = lease->end_status;
      lease->fenced = true;  // the mover flushed before committing
      MaybeRelease(lease_id, actions);
      return refusal;
    }
    case State::kOpen:
      break;
  }
  if (lease->receiving > 0 || lease->received_bytes < bytes) {
    lease->commit_bytes = bytes;  // data still on its way through the holder
    return std::nullopt;
  }
  lease->state = State::kCommitted;
  lease->fenced = true;
  return absl::OkStatus();
}

void KvLeaseTable::MoverAborted(uint64_t lease_id, uint64_t generation, KvPeerId mover,
                                KvLeaseActions& actions) {
  Lease* lease = Find(lease_id, generation);
  if (lease == nullptr || lease->mover != mover) return;
  lease->fenced = true;  // sent after the mover's flush
  End(lease_id, *lease,
      absl::AbortedError(absl::StrCat("lease ", lease_id, " aborted by the mover")), actions);
  MaybeRelease(lease_id, actions);
}

void KvLeaseTable::Fenced(uint64_t lease_id, uint64_t generation, KvPeerId mover,
                          KvLeaseActions& actions) {
  Lease* lease = Find(lease_id, generation);
  if (lease == nullptr || lease->mover != mover) return;
  lease->fenced = true;
  MaybeRelease(lease_id, actions);
}

void KvLeaseTable::PeerDead(KvPeerId mover, KvLeaseActions& actions) {
  if (mover == 0) return;
  dead_peers_.insert(mover);
  std::vector<uint64_t> ids;
  for (auto& [id, lease] : leases_) {
    if (lease.mover == mover) ids.push_back(id);
  }
  for (uint64_t id : ids) {
    Lease& lease = leases_.at(id);
    lease.fenced = true;  // a dead process writes nothing
    if (lease.state == State::kOpen) {
      End(id, lease, absl::UnavailableError(absl::StrCat("lease ", id, ": mover died")), actions);
    }
    MaybeRelease(id, actions);
  }
}

void KvLeaseTable::Abort(uint64_t lease_id, KvLeaseActions& actions) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) return;
  End(lease_id, it->second,
      absl::AbortedError(absl::StrCat("lease ", lease_id, " aborted by the holder")), actions);
  MaybeRelease(lease_id, actions);
}

void KvLeaseTable::Expire(absl::Time now, KvLeaseActions& actions) {
  std::vector<uint64_t> ids;
  for (auto& [id, lease] : leases_) {
    if (lease.state != State::kEnded && lease.deadline <= now) ids.push_back(id);
  }
  for (uint64_t id : ids) {
    End(id, leases_.at(id), absl::DeadlineExceededError(absl::StrCat("lease ", id, " expired")),
        actions);
    MaybeRelease(id, actions);
  }
}

std::optional<absl::Status> KvLeaseTable::Await(uint64_t lease_id) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) {
    for (auto e = ended_.rbegin(); e != ended_.rend(); ++e) {
      if (e->lease_id == lease_id) return e->status;
    }
    return absl::NotFoundError(absl::StrCat("lease ", lease_id, " is unknown"));
  }
  Lease& lease = it->second;
  switch (lease.state) {
    case State::kOpen:
      return std::nullopt;
    case State::kEnded:
      return lease.end_status;
    case State::kCommitted:
      break;
  }
  // Handed back: the blocks are the holder's again and release never runs.
  Remember(lease_id, lease.generation,
           absl::AbortedError(absl::StrCat("lease ", lease_id, " was already committed")));
  leases_.erase(it);
  return absl::OkStatus();
}

bool KvLeaseTable::BeginReceive(uint64_t lease_id, uint64_t generation, KvPeerId mover,
                                int64_t offset, int64_t bytes, KvRegionId* region) {
  Lease* lease = Find(lease_id, generation);
  if (lease == nullptr || lease->state != State::kOpen || lease->mover != mover ||
      lease->access != KvLeaseAccess::kWrite || !RangeInLease(*lease, offset, bytes)) {
    return false;
  }
  ++lease->receiving;
  *region = lease->region;
  return true;
}

std::optional<KvLeaseTable::DeferredAck> KvLeaseTable::FinishReceive(uint64_t lease_id,
                                                                     int64_t bytes, bool ok,
                                                                     KvLeaseActions& actions) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) return std::nullopt;  // cannot happen: receiving pins the lease
  Lease& lease = it->second;
  --lease.receiving;
  if (ok) lease.received_bytes += bytes;
  if (lease.state == State::kEnded) {
    MaybeRelease(lease_id, actions);
    return std::nullopt;
  }
  if (lease.commit_bytes >= 0 && lease.receiving == 0) {
    DeferredAck ack{lease.mover, lease_id, lease.generation, absl::OkStatus()};
    if (lease.received_bytes >= lease.commit_bytes) {
      lease.state = State::kCommitted;
      lease.fenced = true;
    } else {
      // Every receive has ended and bytes are missing: some were refused or
      // failed. The lease cannot hold the mover's data; end it.
      ack.status =
          absl::DataLossError(absl::StrCat("lease ", lease_id, ": received ", lease.received_bytes,
                                           " of ", lease.commit_bytes, " bytes"));
      lease.fenced = true;
      End(lease_id, lease, ack.status, actions);
      MaybeRelease(lease_id, actions);
    }
    return ack;
  }
  return std::nullopt;
}

std::vector<KvLeaseActions::Revoke> KvLeaseTable::UnfencedRevokes() const {
  std::vector<KvLeaseActions::Revoke> revokes;
  for (const auto& [id, lease] : leases_) {
    if (lease.state == State::kEnded && !lease.fenced) {
      revokes.push_back({lease.mover, id, lease.generation, lease.end_status});
    }
  }
  return revokes;
}

std::vector<KvPeerId> KvLeaseTable::WatchedMovers() const {
  std::vector<KvPeerId> movers;
  for (const auto& [id, lease] : leases_) {
    if (lease.mover != 0 && !lease.fenced) movers.push_back(lease.mover);
  }
  std::sort(movers.begin(), movers.end());
  movers.erase(std::unique(movers.begin(), movers.end()), movers.end());
  return movers;
}

void KvLeaseTable::End(uint64_t lease_id, Lease& lease, absl::Status status,
                       KvLeaseActions& actions) {
  if (lease.state == State::kEnded) return;  // the first end wins
  const bool was_committed = lease.state == State::kCommitted;
  lease.state = State::kEnded;
  lease.end_status = std::move(status);
  if (dead_peers_.contains(lease.mover)) lease.fenced = true;
  if (!lease.fenced && !was_committed) {
    actions.revokes.push_back({lease.mover, lease_id, lease.generation, lease.end_status});
  }
}

void KvLeaseTable::MaybeRelease(uint64_t lease_id, KvLeaseActions& actions) {
  auto it = leases_.find(lease_id);
  if (it == leases_.end()) return;
  Lease& lease = it->second;
  if (lease.state != State::kEnded || !lease.fenced || lease.receiving > 0) return;
  actions.releases.push_back({std::move(lease.release), std::move(lease.blocks)});
  ++releases_running_;
  Remember(lease_id, lease.generation, lease.end_status);
  leases_.erase(it);
}

bool KvLeaseTable::RangeInLease(const Lease& lease, int64_t offset, int64_t bytes) const {
  const KvPoolLayout& l = lease.layout;
  const int64_t block_bytes = l.block_tokens * l.bytes_per_token_per_layer;
  if (bytes <= 0 || offset < l.base_offset_bytes || offset > l.pool_bytes - bytes) return false;
  // Walk the range one (layer, block) slab at a time; every slab it touches
  // must belong to the lease.
  // A zero stride (one layer, or one block) never advances; treat it as
  // spanning the whole pool.
  const int64_t layer_stride = l.layer_stride_bytes > 0 ? l.layer_stride_bytes : l.pool_bytes;
  const int64_t block_stride = l.block_stride_bytes > 0 ? l.block_stride_bytes : l.pool_bytes;
  const bool layer_major = layer_stride >= block_stride;
  const int64_t outer_stride = layer_major ? layer_stride : block_stride;
  const int64_t inner_stride = layer_major ? block_stride : layer_stride;
  int64_t pos = offset - l.base_offset_bytes;
  int64_t left = bytes;
  while (left > 0) {
    const int64_t outer = pos / outer_stride;
    const int64_t inner = (pos % outer_stride) / inner_stride;
    const int64_t within = (pos % outer_stride) % inner_stride;
    const int64_t layer = layer_major ? outer : inner;
    const int64_t block = layer_major ? inner : outer;
    if (layer >= l.num_layers || block >= l.num_blocks || within >= block_bytes ||
        !lease.block_set.contains(static_cast<KvBlockId>(block))) {
      return false;
    }
    const int64_t run = std::min(left, block_bytes - within);
    pos += run;
    left -= run;
  }
  return true;
}

}  // namespace dserve::kvtransfer
