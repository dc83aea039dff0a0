// kvtransfer/ucx/ucx_transport.cc: KvTransport over UCX.
//
// Threads. One progress thread owns the UCP worker: every UCX call (sends,
// puts, gets, flushes, memory mapping, endpoint creation) and every UCX
// callback runs on it. Application threads post closures to it (Post) and
// wait on Completions with deadlines. The loop spins while operations are in
// flight and otherwise sleeps in epoll on the worker's event fd and a wake
// eventfd, at most kTick, so lease deadlines and heartbeats are checked
// even when nothing arrives.
//
// Data paths, chosen per transport for speed:
//   shm / auto: one-sided ucp_put_nbx (push) / ucp_get_nbx (pull) straight
//     into the peer's registered pool; on shared memory the holder's pool is
//     mapped by the mover (UCP_MEM_MAP_ALLOCATE memory), so a put is a memcpy.
//     Error-handling mode NONE, which keeps shared-memory RMA available;
//     liveness comes from heartbeats.
//   tcp: UCX emulates RMA over tcp at a fraction of the link's speed, so a
//     push travels as active messages (ucp_am_send_nbx, eager or rendezvous)
//     that the holder receives straight into the lease's blocks after
//     checking the lease on arrival. Error-handling mode PEER.
//
// Control messages (bind, commit, ack, abort, revoke, fenced, ping, pong) are
// small active messages on the same endpoints; replies go back on the reply
// endpoint UCX hands to the receive callback.
#include <sched.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/container/node_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "base/status_macros.h"
#include "kvtransfer/lease_table.h"
#include "kvtransfer/transport.h"

namespace dserve::kvtransfer {
namespace {

constexpr absl::Duration kTick = absl::Milliseconds(5);
// After activity the loop keeps polling this long before sleeping: a reply
// usually follows within microseconds, and a wake-up costs more than that.
constexpr absl::Duration kSpinAfterActivity = absl::Microseconds(200);

// A mover issues one-sided writes only within this fraction of peer_timeout
// after sending a message the holder has answered: a mover that was paused
// (not dead) for longer than the holder waits must not write into blocks the
// holder has since reused.
constexpr double kWriteLeaseFraction = 0.75;

constexpr unsigned kAmControl = 11;
constexpr unsigned kAmData = 12;

enum class MsgType : uint32_t {
  kBind = 1,
  kBindReply,
  kCommit,
  kAck,
  kAbort,
  kRevoke,
  kFenced,
  kPing,
  kPong,
};

// ControlMsg: every control message, as an active-message header.
struct ControlMsg {
  MsgType type = MsgType::kPing;
  int32_t code = 0;   // absl::StatusCode of a reply or a revoke
  KvPeerId peer = 0;  // the sender's identity
  uint64_t lease_id = 0;
  uint64_t generation = 0;
  uint64_t seq = 0;          // a request's number, echoed by its reply
  int64_t bytes = 0;         // commit: bytes sent through the holder
  uint64_t fingerprint = 0;  // bind: LeaseTargetFingerprint of the mover's target
  char text[104] = {};       // status message, truncated
};

// DataHeader: the header of a data message on the tcp push path.
struct DataHeader {
  KvPeerId peer = 0;
  uint64_t lease_id = 0;
  uint64_t generation = 0;
  int64_t offset = 0;
};

absl::Status StatusFromMsg(const ControlMsg& m) {
  return absl::Status(static_cast<absl::StatusCode>(m.code), m.text);
}

void SetMsgStatus(ControlMsg& m, const absl::Status& s) {
  m.code = static_cast<int32_t>(s.code());
  absl::string_view text = s.message();
  const size_t n = std::min(text.size(), sizeof m.text - 1);
  std::memcpy(m.text, text.data(), n);
  m.text[n] = '\0';
}

absl::Status UcsError(const char* what, ucs_status_t status) {
  return absl::UnavailableError(absl::StrCat(what, ": ", ucs_status_string(status)));
}

// Completion: a result posted by the progress thread and awaited, with a
// deadline, by an application thread.
class Completion {
 public:
  void Set(absl::Status status) {
    absl::MutexLock lock(&mu_);
    if (done_.load(std::memory_order_relaxed)) return;
    status_ = std::move(status);
    done_.store(true, std::memory_order_release);
  }
  // Wait: the status, or nullopt if `deadline` passed first.
  std::optional<absl::Status> Wait(absl::Time deadline) {
    // A short spin first: transfer completions on shared memory arrive in
    // microseconds, well under the cost of sleeping and being woken.
    const absl::Time spin_until = std::min(deadline, absl::Now() + absl::Microseconds(50));
    while (!done_.load(std::memory_order_acquire) && absl::Now() < spin_until) {
      sched_yield();  // the thread that will set us may need this core
    }
    absl::MutexLock lock(&mu_);
    auto done = [this] { return done_.load(std::memory_order_acquire); };
    mu_.AwaitWithDeadline(absl::Condition(&done), deadline);
    if (!done_.load(std::memory_order_acquire)) return std::nullopt;
    return status_;
  }

 private:
  absl::Mutex mu_;
  std::atomic<bool> done_{false};
  absl::Status status_ ABSL_GUARDED_BY(mu_);
};

struct Region {
  ucp_mem_h memh = nullptr;
  KvRegion region;
  std::string packed_key;
};

class UcxKvTransport;

// HolderPeer: the mover's view of a holder it writes to (keyed by address).
struct HolderPeer {
  std::string address;
  ucp_ep_h ep = nullptr;
  KvPeerId id = 0;
  absl::Time last_heard;
  absl::Time last_ping;
  // One-sided writes may be issued until then: the holder answered a message
  // we sent at t, so it cannot declare us dead before t + peer_timeout; we
  // stop short of that by a margin (see kWriteLeaseFraction).
  absl::Time write_until = absl::InfinitePast();
  absl::Status dead;  // not OK once the holder is considered gone
  int open_transfers = 0;
  absl::flat_hash_map<std::string, ucp_rkey_h> rkeys;
  UcxKvTransport* transport = nullptr;
};

// MoverPeer: the holder's view of a mover (keyed by its peer id).
struct MoverPeer {
  ucp_ep_h reply_ep = nullptr;
  absl::Time last_heard;
};

// TransferState: a mover-side transfer, shared by the KvTransfer handle and
// the progress thread. Fields other than `result`/`quiet` are touched only on
// the progress thread.
struct TransferState {
  HolderPeer* holder = nullptr;
  uint64_t lease_id = 0;
  uint64_t generation = 0;
  uint64_t fingerprint = 0;
  KvLeaseAccess access = KvLeaseAccess::kWrite;
  bool via_am = false;  // tcp push: data as active messages
  ucp_rkey_h rkey = nullptr;
  uint64_t remote_base = 0;
  uint8_t* local_base = nullptr;
  TransferPlan plan;
  std::deque<KvCopyOp> pending;
  int64_t in_flight = 0;
  int64_t bytes_sent = 0;
  KvTransferStats stats;
  absl::Status failure;  // first failure; the transfer stops issuing
  bool committing = false;
  bool issue_posted = false;  // an IssueOps continuation is queued
  bool flushing = false;
  bool finished = false;    // commit or abort has run its course
  bool send_abort = false;  // on quiesce: flush, then tell the holder
  bool send_fence = false;  // on quiesce: flush, then answer a revoke
  uint64_t commit_seq = 0;
  std::shared_ptr<Completion> bind = std::make_shared<Completion>();
  std::shared_ptr<Completion> result = std::make_shared<Completion>();  // commit / abort
  std::shared_ptr<Completion> quiet = std::make_shared<Completion>();   // nothing in flight
};

// OpContext: one data operation in flight.
struct OpContext {
  UcxKvTransport* transport;
  std::shared_ptr<TransferState> state;
  DataHeader header;  // tcp push: must live until the send completes
  int64_t bytes;
};

struct ControlContext {
  ControlMsg msg;
};

// ReceiveContext: one data message being received into a lease (tcp).
struct ReceiveContext {
  UcxKvTransport* transport;
  uint64_t lease_id;
  int64_t bytes;
  bool async = false;  // counted in requests_in_flight_
};

class UcxKvTransfer;

class UcxKvTransport final : public KvTransport {
 public:
  static absl::StatusOr<std::unique_ptr<KvTransport>> Create(const KvTransportOptions& options);
  ~UcxKvTransport() override;

  std::string Describe() const override { return description_; }
  bool SupportsDeviceMemory() const override { return device_memory_; }
  absl::StatusOr<KvRegion> AllocateRegion(int64_t bytes) override;
  absl::StatusOr<KvRegion> RegisterRegion(uint8_t* data, int64_t bytes) override;
  absl::StatusOr<KvLeaseTarget> OpenLease(KvRegionId region, const KvPoolLayout& layout,
                                          std::vector<KvBlockId> blocks, KvLeaseAccess access,
                                          absl::Duration ttl, KvLeaseRelease release) override;
  absl::Status AwaitLease(uint64_t lease_id, absl::Time deadline) override;
  void AbortLease(uint64_t lease_id) override;
  absl::StatusOr<std::unique_ptr<KvTransfer>> Open(const KvLeaseTarget& target,
                                                   const KvLocalBlocks& local,
                                                   absl::Time deadline) override;
  int64_t LeasesOpen() const override {
    absl::MutexLock lock(&table_mu_);
    return table_.size() + table_.releases_running();
  }

  // Used by UcxKvTransfer (any thread).
  void Post(absl::AnyInvocable<void()> fn);
  const KvTransportOptions& options() const { return options_; }

  // Progress-thread parts used by transfers and callbacks.
  void IssueOps(const std::shared_ptr<TransferState>& state);
  void FailTransfer(const std::shared_ptr<TransferState>& state, absl::Status status);
  void Advance(const std::shared_ptr<TransferState>& state);
  void AfterFlush(const std::shared_ptr<TransferState>& state);
  void OnOpDone(OpContext* op, ucs_status_t status, bool async);
  void OnReceiveDone(ReceiveContext* rc, ucs_status_t status);
  // AfterReceive: acks a commit the receive completed and carries out the
  // lease actions it caused.
  void AfterReceive(std::optional<KvLeaseTable::DeferredAck> ack, KvLeaseActions actions, bool ok);
  void OnEndpointError(HolderPeer* holder, ucs_status_t status);

 private:
  UcxKvTransport(const KvTransportOptions& options, uint64_t peer_id);
  absl::Status Init();
  absl::Status RunOnProgress(absl::AnyInvocable<absl::Status()> fn);
  void Loop();
  void RunTimers(absl::Time now);
  void CarryOut(KvLeaseActions actions);
  absl::StatusOr<KvRegion> MapRegion(uint8_t* data, int64_t bytes);

  // Control messages (progress thread).
  void SendControl(ucp_ep_h ep, ControlMsg msg);
  static ucs_status_t OnControlMessage(void* arg, const void* header, size_t header_length,
                                       void* data, size_t length, const ucp_am_recv_param_t* param);
  static ucs_status_t OnDataMessage(void* arg, const void* header, size_t header_length, void* data,
                                    size_t length, const ucp_am_recv_param_t* param);
  void HandleControl(const ControlMsg& msg, ucp_ep_h reply_ep);
  ucs_status_t HandleData(const DataHeader& header, void* data, size_t length,
                          const ucp_am_recv_param_t* param);
  void MarkHolderDead(HolderPeer* holder, absl::Status status);
  // ExtendWriteLease: the holder answered a message we sent at `sent`;
  // resumes transfers that waited for it.
  void ExtendWriteLease(HolderPeer* holder, absl::Time sent);
  absl::StatusOr<HolderPeer*> ConnectHolder(const std::string& address);
  absl::StatusOr<ucp_rkey_h> RemoteKey(HolderPeer* holder, const std::string& packed);

  const KvTransportOptions options_;
  const KvPeerId peer_id_;
  std::string description_;
  bool device_memory_ = false;

  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  std::string worker_address_;
  int worker_fd_ = -1;
  int wake_fd_ = -1;
  int epoll_fd_ = -1;

  std::thread thread_;
  std::atomic<bool> stop_{false};
  std::atomic<bool> sleeping_{false};
  absl::Mutex post_mu_;
  std::vector<absl::AnyInvocable<void()>> posted_ ABSL_GUARDED_BY(post_mu_);
  std::atomic<int> posted_count_{0};

  mutable absl::Mutex regions_mu_;
  std::vector<Region> regions_ ABSL_GUARDED_BY(regions_mu_);
  std::vector<uint8_t*> region_bases_;  // progress thread: regions_[i].region.data

  // Holder side.
  mutable absl::Mutex table_mu_;
  absl::CondVar table_changed_;
  KvLeaseTable table_ ABSL_GUARDED_BY(table_mu_);
  absl::flat_hash_map<KvPeerId, MoverPeer> movers_;           // progress thread
  absl::flat_hash_map<uint64_t, uint64_t> deferred_commits_;  // lease id -> commit seq
  absl::Time last_revoke_resend_ = absl::InfinitePast();

  // Mover side (progress thread).
  absl::node_hash_map<std::string, HolderPeer> holders_;
  // Binds awaiting their reply, by sequence number, with the holder asked.
  struct PendingBind {
    std::shared_ptr<Completion> done;
    HolderPeer* holder = nullptr;
    absl::Time sent;
  };
  absl::flat_hash_map<uint64_t, PendingBind> pending_replies_;
  absl::flat_hash_map<uint64_t, std::shared_ptr<TransferState>> commit_waiters_;
  absl::flat_hash_map<std::pair<uint64_t, uint64_t>, std::shared_ptr<TransferState>> transfers_;
  uint64_t next_seq_ = 1;
  int64_t requests_in_flight_ = 0;
  bool holder_engaged_ = false;  // a mover is bound to one of our leases
  KvFaultInjection faults_;      // progress thread copy, counted down
};

// ----------------------------------------------------------------------------
// UcxKvTransfer: the application-facing handle.

class UcxKvTransfer final : public KvTransfer {
 public:
  UcxKvTransfer(UcxKvTransport* transport, std::shared_ptr<TransferState> state)
      : transport_(transport),
        state_(std::move(state)),
        submitted_(state_->plan.layers.size(), false) {}
  ~UcxKvTransfer() override {
    if (!done_) Abort();
  }

  absl::Status Submit(LayerRange layers) override {
    if (done_) return absl::FailedPreconditionError("transfer already committed or aborted");
    std::vector<size_t> indices;
    for (size_t i = 0; i < state_->plan.layers.size(); ++i) {
      const int64_t layer = state_->plan.layers[i].layer;
      if (layer < layers.first || layer >= layers.last) continue;
      if (submitted_[i]) {
        return absl::FailedPreconditionError(absl::StrCat("layer ", layer, " already submitted"));
      }
      indices.push_back(i);
    }
    if (layers.first >= layers.last ||
        indices.size() != static_cast<size_t>(layers.last - layers.first)) {
      return absl::InvalidArgumentError(absl::StrCat("layers [", layers.first, ", ", layers.last,
                                                     ") are not all part of this transfer"));
    }
    SubmitPlanLayers(std::move(indices));
    return absl::OkStatus();
  }

  absl::Status Commit(absl::Time deadline) override {
    if (done_) return absl::FailedPreconditionError("transfer already committed or aborted");
    std::vector<size_t> rest;
    for (size_t i = 0; i < submitted_.size(); ++i) {
      if (!submitted_[i]) rest.push_back(i);
    }
    if (!rest.empty()) SubmitPlanLayers(std::move(rest));
    done_ = true;
    transport_->Post([t = transport_, state = state_] {
      state->committing = true;
      t->Advance(state);
    });
    std::optional<absl::Status> result = state_->result->Wait(deadline);
    if (result.has_value()) {
      // On failure, operations may still be in flight (a pull's gets land in
      // our own blocks): return only once they are done, bounded.
      if (!result->ok()) state_->quiet->Wait(absl::Now() + transport_->options().peer_timeout);
      return *result;
    }
    // No ack in time: stop, and tell the holder once nothing is in flight.
    transport_->Post([t = transport_, state = state_] {
      t->FailTransfer(state, absl::DeadlineExceededError("no commit ack before the deadline"));
    });
    state_->quiet->Wait(absl::Now() + transport_->options().peer_timeout);
    return absl::DeadlineExceededError(
        absl::StrCat("lease ", state_->lease_id, ": no commit ack before the deadline"));
  }

  void Abort() override {
    if (aborted_) return;
    aborted_ = true;
    done_ = true;
    transport_->Post([t = transport_, state = state_] {
      if (state->finished) return;
      t->FailTransfer(state, absl::AbortedError("transfer aborted by the mover"));
    });
    state_->quiet->Wait(absl::Now() + transport_->options().peer_timeout);
  }

  KvTransferStats stats() const override {
    // Read after Commit/Abort returned; the progress thread is done with it.
    return state_->stats;
  }

 private:
  // SubmitPlanLayers queues the ops of plan.layers[i] for every index and
  // lets the progress thread issue them.
  void SubmitPlanLayers(std::vector<size_t> indices) {
    for (size_t i : indices) submitted_[i] = true;
    transport_->Post([t = transport_, state = state_, indices = std::move(indices)] {
      if (!state->failure.ok()) return;
      for (size_t i : indices) {
        const KvLayerPlan& layer = state->plan.layers[i];
        state->pending.insert(state->pending.end(), layer.ops.begin(), layer.ops.end());
        ++state->stats.layers_submitted;
      }
      t->IssueOps(state);
    });
  }

  UcxKvTransport* transport_;
  std::shared_ptr<TransferState> state_;
  std::vector<bool> submitted_;
  bool done_ = false;
  bool aborted_ = false;
};

// ----------------------------------------------------------------------------
// Construction and the progress loop.

UcxKvTransport::UcxKvTransport(const KvTransportOptions& options, uint64_t peer_id)
    : options_(options), peer_id_(peer_id), table_(peer_id), faults_(options.faults) {}

absl::StatusOr<std::unique_ptr<KvTransport>> UcxKvTransport::Create(
    const KvTransportOptions& options) {
  if (options.max_ops_in_flight < 1) {
    return absl::InvalidArgumentError("max_ops_in_flight must be at least 1");
  }
  if (options.peer_timeout <= options.heartbeat_interval) {
    return absl::InvalidArgumentError("peer_timeout must be longer than heartbeat_interval");
  }
  std::random_device rd;
  const uint64_t id = (static_cast<uint64_t>(rd()) << 32 | rd()) | 1;
  std::unique_ptr<UcxKvTransport> transport(new UcxKvTransport(options, id));
  DSERVE_RETURN_IF_ERROR(transport->Init());
  return std::unique_ptr<KvTransport>(std::move(transport));
}

absl::Status UcxKvTransport::Init() {
  ucp_config_t* config = nullptr;
  ucs_status_t status = ucp_config_read(nullptr, nullptr, &config);
  if (status != UCS_OK) return UcsError("ucp_config_read", status);
  const char* tls = nullptr;
  switch (options_.kind) {
    case KvTransportKind::kTcp:
      tls = "tcp";
      break;
    case KvTransportKind::kSharedMemory:
      tls = "posix,sysv,cma,self";
      break;
    case KvTransportKind::kAuto:
      break;
  }
  if (tls != nullptr) ucp_config_modify(config, "TLS", tls);

  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  params.mt_workers_shared = 0;
  status = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  if (status != UCS_OK) return UcsError("ucp_init", status);

  ucp_context_attr_t context_attr{};
  context_attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(context_, &context_attr) == UCS_OK) {
    device_memory_ = (context_attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA)) != 0;
  }

  ucp_worker_params_t worker_params{};
  worker_params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  worker_params.thread_mode = UCS_THREAD_MODE_SINGLE;  // only the progress thread uses it
  status = ucp_worker_create(context_, &worker_params, &worker_);
  if (status != UCS_OK) return UcsError("ucp_worker_create", status);

  ucp_address_t* address = nullptr;
  size_t address_length = 0;
  status = ucp_worker_get_address(worker_, &address, &address_length);
  if (status != UCS_OK) return UcsError("ucp_worker_get_address", status);
  worker_address_.assign(reinterpret_cast<const char*>(address), address_length);
  ucp_worker_release_address(worker_, address);

  for (auto [id, cb] : {std::pair{kAmControl, &UcxKvTransport::OnControlMessage},
                        std::pair{kAmData, &UcxKvTransport::OnDataMessage}}) {
    ucp_am_handler_param_t handler{};
    handler.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB |
                         UCP_AM_HANDLER_PARAM_FIELD_ARG | UCP_AM_HANDLER_PARAM_FIELD_FLAGS;
    handler.id = id;
    handler.cb = cb;
    handler.arg = this;
    handler.flags = UCP_AM_FLAG_WHOLE_MSG;
    status = ucp_worker_set_am_recv_handler(worker_, &handler);
    if (status != UCS_OK) return UcsError("ucp_worker_set_am_recv_handler", status);
  }

  status = ucp_worker_get_efd(worker_, &worker_fd_);
  if (status != UCS_OK) return UcsError("ucp_worker_get_efd", status);
  wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (wake_fd_ < 0 || epoll_fd_ < 0) return absl::InternalError("eventfd/epoll_create1 failed");
  for (int fd : {worker_fd_, wake_fd_}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) {
      return absl::InternalError("epoll_ctl failed");
    }
  }

  const bool tcp = options_.kind == KvTransportKind::kTcp;
  description_ = absl::StrCat(
      "kv transport: ucx ", ucp_get_version_string(), ", ", KvTransportKindName(options_.kind),
      tls != nullptr ? absl::StrCat(" (UCX_TLS=", tls, ")")
                     : std::string(" (UCX default transports)"),
      ", data path ",
      tcp ? "active messages (eager/rendezvous) for push, rma get for pull"
          : "one-sided rma put (push) / get (pull)",
      ", error handling ", tcp ? "peer" : "none", " + heartbeats every ",
      absl::FormatDuration(options_.heartbeat_interval), ", peer timeout ",
      absl::FormatDuration(options_.peer_timeout), ", device memory: ",
      device_memory_ ? "yes (UCX built with CUDA)" : "no (UCX built without CUDA)");

  thread_ = std::thread([this] { Loop(); });
  return absl::OkStatus();
}

UcxKvTransport::~UcxKvTransport() {
  if (thread_.joinable()) {
    stop_.store(true);
    Post([] {});
    thread_.join();
  }
  if (worker_ != nullptr) {
    // Close every endpoint we opened, forcibly: peers may be gone.
    std::vector<void*> closing;
    ucp_request_param_t close{};
    close.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    close.flags = UCP_EP_CLOSE_FLAG_FORCE;
    for (auto& [address, holder] : holders_) {
      for (auto& [key, rkey] : holder.rkeys) ucp_rkey_destroy(rkey);
      if (holder.ep == nullptr) continue;
      void* req = ucp_ep_close_nbx(holder.ep, &close);
      if (UCS_PTR_IS_PTR(req)) closing.push_back(req);
    }
    for (void* req : closing) {
      for (int i = 0; i < 100000 && ucp_request_check_status(req) == UCS_INPROGRESS; ++i) {
        ucp_worker_progress(worker_);
      }
      ucp_request_free(req);
    }
    absl::MutexLock lock(&regions_mu_);
    for (Region& r : regions_) ucp_mem_unmap(context_, r.memh);
    ucp_worker_destroy(worker_);
  }
  if (context_ != nullptr) ucp_cleanup(context_);
  if (epoll_fd_ >= 0) close(epoll_fd_);
  if (wake_fd_ >= 0) close(wake_fd_);
}

void UcxKvTransport::Post(absl::AnyInvocable<void()> fn) {
  {
    absl::MutexLock lock(&post_mu_);
    posted_.push_back(std::move(fn));
    posted_count_.fetch_add(1, std::memory_order_seq_cst);
  }
  if (sleeping_.load(std::memory_order_seq_cst)) {
    const uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_fd_, &one, sizeof one);
  }
}

absl::Status UcxKvTransport::RunOnProgress(absl::AnyInvocable<absl::Status()> fn) {
  auto done = std::make_shared<Completion>();
  Post([fn = std::move(fn), done]() mutable { done->Set(fn()); });
  return *done->Wait(absl::InfiniteFuture());
}

void UcxKvTransport::Loop() {
  absl::Time last_activity = absl::Now();
  absl::Time next_timers = absl::Now();
  while (true) {
    bool active = false;
    if (posted_count_.load(std::memory_order_acquire) > 0) {
      std::vector<absl::AnyInvocable<void()>> batch;
      {
        absl::MutexLock lock(&post_mu_);
        batch.swap(posted_);
        posted_count_.store(0, std::memory_order_release);
      }
      for (auto& fn : batch) fn();
      active = true;
    }
    if (stop_.load()) return;
    while (ucp_worker_progress(worker_) != 0) active = true;
    absl::Time now = absl::Now();
    if (now >= next_timers) {
      RunTimers(now);
      next_timers = now + kTick;
    }
    if (active) last_activity = now;
    if (requests_in_flight_ > 0 || active) continue;  // busy: poll again at once
    // While a transfer is open here (or a mover is bound to one of our
    // leases), its next Submit or message is due any moment: keep polling,
    // yielding the core to runnable threads, instead of paying a wake-up.
    const bool engaged = !transfers_.empty() || holder_engaged_;
    if (engaged || now - last_activity < kSpinAfterActivity) {
      sched_yield();
      continue;
    }

    // Sleep until UCX has an event, a closure is posted, or the next tick.
    sleeping_.store(true, std::memory_order_seq_cst);
    if (posted_count_.load(std::memory_order_seq_cst) > 0) {
      sleeping_.store(false);
      continue;
    }
    const ucs_status_t armed = ucp_worker_arm(worker_);
    if (armed == UCS_ERR_BUSY) {
      sleeping_.store(false);
      continue;
    }
    epoll_event events[2];
    const int timeout_ms = std::max<int64_t>(1, absl::ToInt64Milliseconds(next_timers - now));
    const int n = epoll_wait(epoll_fd_, events, 2, timeout_ms);
    sleeping_.store(false);
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd == wake_fd_) {
        uint64_t value;
        [[maybe_unused]] ssize_t r = read(wake_fd_, &value, sizeof value);
      }
    }
    last_activity = absl::Now();
  }
}

void UcxKvTransport::RunTimers(absl::Time now) {
  // Holder: expire leases, declare silent movers dead, and repeat revokes
  // that have not been answered (a revoke may be lost like any message).
  KvLeaseActions actions;
  const bool resend = now - last_revoke_resend_ >= options_.heartbeat_interval;
  {
    absl::MutexLock lock(&table_mu_);
    if (resend) {
      last_revoke_resend_ = now;
      actions.revokes = table_.UnfencedRevokes();
    }
    table_.Expire(now, actions);
    const std::vector<KvPeerId> watched = table_.WatchedMovers();
    holder_engaged_ = !watched.empty();
    for (KvPeerId mover : watched) {
      auto it = movers_.find(mover);
      if (it == movers_.end() || now - it->second.last_heard > options_.peer_timeout) {
        table_.PeerDead(mover, actions);
      }
    }
  }
  CarryOut(std::move(actions));

  // Mover: heartbeat every holder we have transfers with; give up on the
  // silent ones.
  for (auto& [address, holder] : holders_) {
    if (holder.open_transfers == 0 || !holder.dead.ok()) continue;
    if (now - holder.last_heard > options_.peer_timeout) {
      MarkHolderDead(&holder,
                     absl::UnavailableError(absl::StrCat(
                         "KV holder silent for ", absl::FormatDuration(now - holder.last_heard))));
      continue;
    }
    if (now - holder.last_ping >= options_.heartbeat_interval) {
      holder.last_ping = now;
      // The pong echoes seq: when this ping was sent.
      ControlMsg ping{.type = MsgType::kPing, .seq = static_cast<uint64_t>(absl::ToUnixNanos(now))};
      SendControl(holder.ep, ping);
    }
  }
}

void UcxKvTransport::CarryOut(KvLeaseActions actions) {
  for (const KvLeaseActions::Revoke& revoke : actions.revokes) {
    auto it = movers_.find(revoke.mover);
    if (it == movers_.end()) continue;
    ControlMsg msg{
        .type = MsgType::kRevoke, .lease_id = revoke.lease_id, .generation = revoke.generation};
    SetMsgStatus(msg, revoke.reason);
    SendControl(it->second.reply_ep, msg);
  }
  const auto released = static_cast<int64_t>(actions.releases.size());
  actions.RunReleases();
  absl::MutexLock lock(&table_mu_);
  table_.ReleasesRan(released);
  table_changed_.SignalAll();
}

// ----------------------------------------------------------------------------
// Regions.

absl::StatusOr<KvRegion> UcxKvTransport::MapRegion(uint8_t* data, int64_t bytes) {
  if (bytes <= 0)
    return absl::InvalidArgumentError(absl::StrCat("region bytes must be positive, got ", bytes));
  KvRegion out;
  DSERVE_RETURN_IF_ERROR(RunOnProgress([&]() -> absl::Status {
    ucp_mem_map_params_t params{};
    params.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                        UCP_MEM_MAP_PARAM_FIELD_FLAGS;
    params.address = data;
    params.length = static_cast<size_t>(bytes);
    params.flags = data == nullptr ? UCP_MEM_MAP_ALLOCATE : 0;
    ucp_mem_h memh = nullptr;
    ucs_status_t status = ucp_mem_map(context_, &params, &memh);
    if (status != UCS_OK) return UcsError("ucp_mem_map", status);
    ucp_mem_attr_t attr{};
    attr.field_mask = UCP_MEM_ATTR_FIELD_ADDRESS | UCP_MEM_ATTR_FIELD_LENGTH;
    status = ucp_mem_query(memh, &attr);
    if (status != UCS_OK) {
      ucp_mem_unmap(context_, memh);
      return UcsError("ucp_mem_query", status);
    }
    void* packed = nullptr;
    size_t packed_size = 0;
    status = ucp_rkey_pack(context_, memh, &packed, &packed_size);
    if (status != UCS_OK) {
      ucp_mem_unmap(context_, memh);
      return UcsError("ucp_rkey_pack", status);
    }
    Region region;
    region.memh = memh;
    region.region.data = static_cast<uint8_t*>(attr.address);
    region.region.bytes = bytes;
    region.packed_key.assign(static_cast<const char*>(packed), packed_size);
    ucp_rkey_buffer_release(packed);
    if (data == nullptr) std::memset(region.region.data, 0, static_cast<size_t>(bytes));
    absl::MutexLock lock(&regions_mu_);
    region.region.id = static_cast<KvRegionId>(regions_.size());
    region_bases_.push_back(region.region.data);
    out = region.region;
    regions_.push_back(std::move(region));
    return absl::OkStatus();
  }));
  return out;
}

absl::StatusOr<KvRegion> UcxKvTransport::AllocateRegion(int64_t bytes) {
  return MapRegion(nullptr, bytes);
}

absl::StatusOr<KvRegion> UcxKvTransport::RegisterRegion(uint8_t* data, int64_t bytes) {
  if (data == nullptr) return absl::InvalidArgumentError("RegisterRegion: data is null");
  return MapRegion(data, bytes);
}

// ----------------------------------------------------------------------------
// Holder side.

absl::StatusOr<KvLeaseTarget> UcxKvTransport::OpenLease(KvRegionId region_id,
                                                        const KvPoolLayout& layout,
                                                        std::vector<KvBlockId> blocks,
                                                        KvLeaseAccess access, absl::Duration ttl,
                                                        KvLeaseRelease release) {
  KvLeaseTarget target;
  {
    absl::MutexLock lock(&regions_mu_);
    if (region_id < 0 || region_id >= static_cast<KvRegionId>(regions_.size())) {
      return absl::InvalidArgumentError(absl::StrCat("region ", region_id, " is not registered"));
    }
    const Region& region = regions_[region_id];
    DSERVE_RETURN_IF_ERROR(ValidateKvPoolLayout("lease", layout));
    if (layout.pool_bytes > region.region.bytes) {
      return absl::InvalidArgumentError(absl::StrCat("lease_layout.pool_bytes ", layout.pool_bytes,
                                                     " exceeds region ", region_id, "'s ",
                                                     region.region.bytes, " bytes"));
    }
    target.remote_key = region.packed_key;
    target.remote_base = reinterpret_cast<uint64_t>(region.region.data);
  }
  if (blocks.empty()) return absl::InvalidArgumentError("lease blocks must not be empty");
  absl::flat_hash_set<KvBlockId> seen;
  for (KvBlockId b : blocks) {
    if (b < 0 || b >= layout.num_blocks) {
      return absl::InvalidArgumentError(
          absl::StrCat("lease block id ", b, " outside [0, ", layout.num_blocks, ")"));
    }
    if (!seen.insert(b).second) {
      return absl::InvalidArgumentError(absl::StrCat("lease block id ", b, " listed twice"));
    }
  }
  if (ttl <= absl::ZeroDuration()) return absl::InvalidArgumentError("lease ttl must be positive");
  target.worker_address = worker_address_;
  target.layout = layout;
  target.blocks = blocks;
  target.access = access;
  target.ttl = ttl;
  absl::MutexLock lock(&table_mu_);
  KvLeaseTable::OpenResult opened =
      table_.Open(region_id, layout, std::move(blocks), access, absl::Now() + ttl,
                  std::move(release), LeaseTargetFingerprint(target));
  target.lease_id = opened.lease_id;
  target.generation = opened.generation;
  return target;
}

absl::Status UcxKvTransport::AwaitLease(uint64_t lease_id, absl::Time deadline) {
  absl::MutexLock lock(&table_mu_);
  while (true) {
    std::optional<absl::Status> result = table_.Await(lease_id);
    if (result.has_value()) return *result;
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("lease ", lease_id, " not committed before the wait's deadline"));
    }
    table_changed_.WaitWithDeadline(&table_mu_, deadline);
  }
}

void UcxKvTransport::AbortLease(uint64_t lease_id) {
  Post([this, lease_id] {
    KvLeaseActions actions;
    {
      absl::MutexLock lock(&table_mu_);
      table_.Abort(lease_id, actions);
    }
    CarryOut(std::move(actions));
  });
}

// ----------------------------------------------------------------------------
// Control messages.

void UcxKvTransport::SendControl(ucp_ep_h ep, ControlMsg msg) {
  if (ep == nullptr) return;
  msg.peer = peer_id_;
  auto* ctx = new ControlContext{msg};
  ucp_request_param_t param{};
  param.op_attr_mask =
      UCP_OP_ATTR_FIELD_FLAGS | UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  param.flags = UCP_AM_SEND_FLAG_REPLY | UCP_AM_SEND_FLAG_EAGER;
  param.cb.send = [](void* request, ucs_status_t, void* user_data) {
    delete static_cast<ControlContext*>(user_data);
    ucp_request_free(request);
  };
  param.user_data = ctx;
  ucs_status_ptr_t req =
      ucp_am_send_nbx(ep, kAmControl, &ctx->msg, sizeof ctx->msg, nullptr, 0, &param);
  if (!UCS_PTR_IS_PTR(req)) delete ctx;  // done at once, or failed: a lost message
}

ucs_status_t UcxKvTransport::OnControlMessage(void* arg, const void* header, size_t header_length,
                                              void*, size_t, const ucp_am_recv_param_t* param) {
  if (header_length != sizeof(ControlMsg)) return UCS_OK;  // not ours: drop
  ControlMsg msg;
  std::memcpy(&msg, header, sizeof msg);
  msg.text[sizeof msg.text - 1] = '\0';
  ucp_ep_h reply_ep =
      (param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP) ? param->reply_ep : nullptr;
  static_cast<UcxKvTransport*>(arg)->HandleControl(msg, reply_ep);
  return UCS_OK;
}

void UcxKvTransport::HandleControl(const ControlMsg& msg, ucp_ep_h reply_ep) {
  const absl::Time now = absl::Now();
  auto reply = [&](MsgType type, const absl::Status& status) {
    ControlMsg r{
        .type = type, .lease_id = msg.lease_id, .generation = msg.generation, .seq = msg.seq};
    SetMsgStatus(r, status);
    SendControl(reply_ep, r);
  };
  // Holder side: messages from movers.
  switch (msg.type) {
    case MsgType::kBind:
    case MsgType::kCommit:
    case MsgType::kAbort:
    case MsgType::kFenced:
    case MsgType::kPing: {
      MoverPeer& mover = movers_[msg.peer];
      if (reply_ep != nullptr) mover.reply_ep = reply_ep;
      mover.last_heard = now;
      KvLeaseActions actions;
      absl::Status bind_status;
      absl::Status pong_status;
      std::optional<absl::Status> ack;
      {
        absl::MutexLock lock(&table_mu_);
        switch (msg.type) {
          case MsgType::kPing:
            // A mover declared dead must stop writing: tell it so.
            if (table_.IsDead(msg.peer)) {
              pong_status = absl::UnavailableError("the KV holder declared this mover dead");
            }
            break;
          case MsgType::kBind:
            holder_engaged_ = true;
            bind_status = table_.Bind(msg.lease_id, msg.generation, msg.peer, now, msg.fingerprint);
            break;
          case MsgType::kCommit:
            ack = table_.Commit(msg.lease_id, msg.generation, msg.peer, msg.bytes, actions);
            break;
          case MsgType::kAbort:
            table_.MoverAborted(msg.lease_id, msg.generation, msg.peer, actions);
            break;
          case MsgType::kFenced:
            table_.Fenced(msg.lease_id, msg.generation, msg.peer, actions);
            break;
          default:
            break;
        }
      }
      if (msg.type == MsgType::kBind) reply(MsgType::kBindReply, bind_status);
      if (msg.type == MsgType::kPing) reply(MsgType::kPong, pong_status);
      if (msg.type == MsgType::kCommit && !ack.has_value()) {
        deferred_commits_[msg.lease_id] = msg.seq;
      }
      if (ack.has_value()) {
        if (faults_.drop_acks > 0) {
          --faults_.drop_acks;
        } else {
          reply(MsgType::kAck, *ack);
        }
      }
      CarryOut(std::move(actions));
      return;
    }
    default:
      break;
  }
  // Mover side: replies and revokes from holders.
  HolderPeer* holder = nullptr;
  for (auto& [address, h] : holders_) {
    if (h.id == msg.peer) holder = &h;
  }
  if (holder != nullptr) holder->last_heard = now;
  switch (msg.type) {
    case MsgType::kBindReply: {
      auto it = pending_replies_.find(msg.seq);
      if (it == pending_replies_.end()) return;
      // The reply carries the holder's peer id: from now on its pongs, acks
      // and revokes count as signs of life.
      it->second.holder->id = msg.peer;
      it->second.holder->last_heard = now;
      ExtendWriteLease(it->second.holder, it->second.sent);
      it->second.done->Set(StatusFromMsg(msg));
      pending_replies_.erase(it);
      return;
    }
    case MsgType::kAck: {
      auto it = commit_waiters_.find(msg.seq);
      if (it == commit_waiters_.end()) return;  // a duplicate, or a transfer already over
      std::shared_ptr<TransferState> state = std::move(it->second);
      commit_waiters_.erase(it);
      absl::Status status = StatusFromMsg(msg);
      state->finished = true;
      state->result->Set(status);
      if (!status.ok() && state->failure.ok()) state->failure = status;
      Advance(state);
      return;
    }
    case MsgType::kRevoke: {
      auto it = transfers_.find({msg.lease_id, msg.generation});
      if (it == transfers_.end()) {
        // Nothing of ours is in flight for this lease: fenced already.
        reply(MsgType::kFenced, absl::OkStatus());
        return;
      }
      std::shared_ptr<TransferState> state = it->second;
      state->send_fence = true;
      FailTransfer(state, StatusFromMsg(msg));
      return;
    }
    case MsgType::kPong: {
      if (holder == nullptr) return;
      if (absl::Status refused = StatusFromMsg(msg); !refused.ok()) {
        MarkHolderDead(holder, refused);
        return;
      }
      ExtendWriteLease(holder, absl::FromUnixNanos(static_cast<int64_t>(msg.seq)));
      return;
    }
    default:
      return;
  }
}

// ----------------------------------------------------------------------------
// Data arriving at the holder (tcp push).

ucs_status_t UcxKvTransport::OnDataMessage(void* arg, const void* header, size_t header_length,
                                           void* data, size_t length,
                                           const ucp_am_recv_param_t* param) {
  if (header_length != sizeof(DataHeader)) return UCS_ERR_INVALID_PARAM;
  DataHeader h;
  std::memcpy(&h, header, sizeof h);
  return static_cast<UcxKvTransport*>(arg)->HandleData(h, data, length, param);
}

ucs_status_t UcxKvTransport::HandleData(const DataHeader& h, void* data, size_t length,
                                        const ucp_am_recv_param_t* param) {
  const bool rndv = (param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV) != 0;
  const auto bytes = static_cast<int64_t>(length);
  KvRegionId region_id = -1;
  if (!rndv) {
    // Eager: the bytes are here. Check, copy and finish under one lock; this
    // is the per-message cost of the tcp path.
    std::optional<KvLeaseTable::DeferredAck> ack;
    KvLeaseActions actions;
    {
      absl::MutexLock lock(&table_mu_);
      // Late or foreign data is dropped (UCX allows an error status only for
      // rendezvous); the commit that follows finds the bytes missing.
      if (!table_.BeginReceive(h.lease_id, h.generation, h.peer, h.offset, bytes, &region_id)) {
        return UCS_OK;
      }
      std::memcpy(region_bases_[region_id] + h.offset, data, length);
      ack = table_.FinishReceive(h.lease_id, bytes, /*ok=*/true, actions);
    }
    if (auto it = movers_.find(h.peer); it != movers_.end()) it->second.last_heard = absl::Now();
    AfterReceive(std::move(ack), std::move(actions), /*ok=*/true);
    return UCS_OK;
  }
  {
    absl::MutexLock lock(&table_mu_);
    if (!table_.BeginReceive(h.lease_id, h.generation, h.peer, h.offset, bytes, &region_id)) {
      // Refused before a byte lands: the mover's send completes with this.
      return UCS_ERR_CANCELED;
    }
  }
  if (auto it = movers_.find(h.peer); it != movers_.end()) it->second.last_heard = absl::Now();
  auto* rc = new ReceiveContext{this, h.lease_id, bytes};
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.recv_am = [](void* request, ucs_status_t status, size_t, void* user_data) {
    auto* ctx = static_cast<ReceiveContext*>(user_data);
    ctx->transport->OnReceiveDone(ctx, status);
    ucp_request_free(request);
  };
  p.user_data = rc;
  ucs_status_ptr_t req =
      ucp_am_recv_data_nbx(worker_, data, region_bases_[region_id] + h.offset, length, &p);
  if (req == nullptr) {
    OnReceiveDone(rc, UCS_OK);
  } else if (UCS_PTR_IS_ERR(req)) {
    OnReceiveDone(rc, UCS_PTR_STATUS(req));
  } else {
    rc->async = true;
    ++requests_in_flight_;
  }
  return UCS_INPROGRESS;
}

void UcxKvTransport::OnReceiveDone(ReceiveContext* rc, ucs_status_t status) {
  std::unique_ptr<ReceiveContext> owned(rc);
  if (rc->async) --requests_in_flight_;
  KvLeaseActions actions;
  std::optional<KvLeaseTable::DeferredAck> ack;
  {
    absl::MutexLock lock(&table_mu_);
    ack = table_.FinishReceive(rc->lease_id, rc->bytes, status == UCS_OK, actions);
  }
  AfterReceive(std::move(ack), std::move(actions), status == UCS_OK);
}

void UcxKvTransport::AfterReceive(std::optional<KvLeaseTable::DeferredAck> ack,
                                  KvLeaseActions actions, bool ok) {
  if (ack.has_value()) {
    auto it = movers_.find(ack->mover);
    if (it != movers_.end()) {
      ControlMsg r{.type = MsgType::kAck, .lease_id = ack->lease_id, .generation = ack->generation};
      SetMsgStatus(r, ack->status);
      // The ack answers the deferred commit: echo its sequence number.
      if (auto seq = deferred_commits_.find(ack->lease_id); seq != deferred_commits_.end()) {
        r.seq = seq->second;
        deferred_commits_.erase(seq);
      }
      SendControl(it->second.reply_ep, r);
    }
  }
  // Wake AwaitLease only when a lease may have changed, not once per data
  // message: every wake-up is a futex call and a thread competing for a core.
  if (ack.has_value() || !ok || !actions.releases.empty() || !actions.revokes.empty()) {
    CarryOut(std::move(actions));
  }
}

// ----------------------------------------------------------------------------
// Mover side.

void UcxKvTransport::OnEndpointError(HolderPeer* holder, ucs_status_t status) {
  MarkHolderDead(holder, UcsError("KV holder endpoint failed", status));
}

absl::StatusOr<HolderPeer*> UcxKvTransport::ConnectHolder(const std::string& address) {
  auto [it, inserted] = holders_.try_emplace(address);
  HolderPeer& holder = it->second;
  if (!inserted && holder.dead.ok()) return &holder;
  if (!inserted) {
    // A holder we gave up on: reconnect from scratch (it may have restarted).
    for (auto& [key, rkey] : holder.rkeys) ucp_rkey_destroy(rkey);
    holder.rkeys.clear();
    holder.ep = nullptr;  // the failed endpoint was closed when marked dead
    holder.dead = absl::OkStatus();
    holder.id = 0;
  }
  holder.address = address;
  holder.transport = this;
  ucp_ep_params_t params{};
  params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
  params.address = reinterpret_cast<const ucp_address_t*>(address.data());
  if (options_.kind == KvTransportKind::kTcp) {
    params.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLER;
    params.err_handler.cb = [](void* arg, ucp_ep_h, ucs_status_t status) {
      auto* h = static_cast<HolderPeer*>(arg);
      h->transport->OnEndpointError(h, status);
    };
    params.err_handler.arg = &holder;
  } else {
    params.err_mode = UCP_ERR_HANDLING_MODE_NONE;
  }
  ucs_status_t status = ucp_ep_create(worker_, &params, &holder.ep);
  if (status != UCS_OK) {
    holder.ep = nullptr;
    holder.dead = UcsError("ucp_ep_create to the KV holder", status);
    return holder.dead;
  }
  holder.last_heard = absl::Now();
  holder.last_ping = absl::Now();
  return &holder;
}

absl::StatusOr<ucp_rkey_h> UcxKvTransport::RemoteKey(HolderPeer* holder,
                                                     const std::string& packed) {
  auto it = holder->rkeys.find(packed);
  if (it != holder->rkeys.end()) return it->second;
  ucp_rkey_h rkey = nullptr;
  ucs_status_t status = ucp_ep_rkey_unpack(holder->ep, packed.data(), &rkey);
  if (status != UCS_OK) {
    return absl::InvalidArgumentError(
        absl::StrCat("lease target remote_key does not unpack: ", ucs_status_string(status)));
  }
  holder->rkeys.emplace(packed, rkey);
  return rkey;
}

void UcxKvTransport::ExtendWriteLease(HolderPeer* holder, absl::Time sent) {
  const absl::Time until = sent + options_.peer_timeout * kWriteLeaseFraction;
  if (until <= holder->write_until) return;
  const bool resume = absl::Now() >= holder->write_until;
  holder->write_until = until;
  if (!resume) return;
  std::vector<std::shared_ptr<TransferState>> waiting;
  for (auto& [key, state] : transfers_) {
    if (state->holder == holder && !state->pending.empty()) waiting.push_back(state);
  }
  for (auto& state : waiting) IssueOps(state);
}

void UcxKvTransport::MarkHolderDead(HolderPeer* holder, absl::Status status) {
  if (!holder->dead.ok()) return;
  holder->dead = status;
  // Fail every transfer and pending reply bound to this holder.
  std::vector<std::shared_ptr<TransferState>> victims;
  for (auto& [key, state] : transfers_) {
    if (state->holder == holder) victims.push_back(state);
  }
  for (auto& state : victims) {
    state->send_abort = false;
    state->send_fence = false;
    FailTransfer(state, status);
    state->result->Set(status);
    state->bind->Set(status);
  }
  if (holder->ep != nullptr) {
    // Cancels whatever is still outstanding on the endpoint; the callbacks
    // of those operations run with an error status.
    ucp_request_param_t close{};
    close.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
    close.flags = UCP_EP_CLOSE_FLAG_FORCE;
    void* req = ucp_ep_close_nbx(holder->ep, &close);
    if (UCS_PTR_IS_PTR(req)) ucp_request_free(req);
    for (auto& [key, rkey] : holder->rkeys) ucp_rkey_destroy(rkey);
    holder->rkeys.clear();
    holder->ep = nullptr;
  }
}

absl::StatusOr<std::unique_ptr<KvTransfer>> UcxKvTransport::Open(const KvLeaseTarget& target,
                                                                 const KvLocalBlocks& local,
                                                                 absl::Time deadline) {
  auto state = std::make_shared<TransferState>();
  {
    absl::MutexLock lock(&regions_mu_);
    if (local.region < 0 || local.region >= static_cast<KvRegionId>(regions_.size())) {
      return absl::InvalidArgumentError(
          absl::StrCat("local region ", local.region, " is not registered"));
    }
    const KvRegion& region = regions_[local.region].region;
    if (local.layout.pool_bytes > region.bytes) {
      return absl::InvalidArgumentError(absl::StrCat("local_layout.pool_bytes ",
                                                     local.layout.pool_bytes, " exceeds region ",
                                                     local.region, "'s ", region.bytes, " bytes"));
    }
    state->local_base = region.data;
  }
  KvTransferRequest request;
  const bool push = target.access == KvLeaseAccess::kWrite;
  request.src_layout = push ? local.layout : target.layout;
  request.src_blocks = push ? local.blocks : std::span<const KvBlockId>(target.blocks);
  request.dst_layout = push ? target.layout : local.layout;
  request.dst_blocks = push ? std::span<const KvBlockId>(target.blocks) : local.blocks;
  request.num_tokens = local.num_tokens;
  request.first_token = local.first_token;
  DSERVE_ASSIGN_OR_RETURN(state->plan, MakeTransferPlan(request));

  state->lease_id = target.lease_id;
  state->generation = target.generation;
  state->fingerprint = LeaseTargetFingerprint(target);
  state->access = target.access;
  state->via_am = push && options_.kind == KvTransportKind::kTcp;
  state->remote_base = target.remote_base;
  for (const KvLayerPlan& layer : state->plan.layers) state->stats.bytes += layer.bytes;

  // Connect, unpack the key, register the transfer, send the bind.
  uint64_t bind_seq = 0;
  absl::Status setup = RunOnProgress([&]() -> absl::Status {
    DSERVE_ASSIGN_OR_RETURN(HolderPeer * holder, ConnectHolder(target.worker_address));
    DSERVE_ASSIGN_OR_RETURN(state->rkey, RemoteKey(holder, target.remote_key));
    state->holder = holder;
    if (!transfers_.try_emplace({state->lease_id, state->generation}, state).second) {
      return absl::FailedPreconditionError(
          absl::StrCat("lease ", state->lease_id, " already has a transfer from this process"));
    }
    // Pings go only to holders with open transfers, so an idle holder's
    // last_heard is stale: count its silence from now.
    if (holder->open_transfers++ == 0) holder->last_heard = absl::Now();
    const uint64_t seq = next_seq_++;
    bind_seq = seq;
    pending_replies_[seq] = {state->bind, holder, absl::Now()};
    ControlMsg bind{.type = MsgType::kBind,
                    .lease_id = state->lease_id,
                    .generation = state->generation,
                    .seq = seq,
                    .fingerprint = state->fingerprint};
    SendControl(holder->ep, bind);
    return absl::OkStatus();
  });
  auto forget = [&] {
    Post([this, state, seq = bind_seq] {
      pending_replies_.erase(seq);
      if (transfers_.erase({state->lease_id, state->generation}) > 0 && state->holder != nullptr) {
        --state->holder->open_transfers;
      }
    });
  };
  if (!setup.ok()) return setup;
  const absl::Time unavailable_at = absl::Now() + options_.peer_timeout;
  std::optional<absl::Status> bound = state->bind->Wait(std::min(deadline, unavailable_at));
  if (!bound.has_value()) {
    forget();
    if (deadline <= unavailable_at) {
      return absl::DeadlineExceededError(
          absl::StrCat("lease ", target.lease_id, ": the holder did not answer the bind in time"));
    }
    return absl::UnavailableError(absl::StrCat("lease ", target.lease_id,
                                               ": the holder did not answer within ",
                                               absl::FormatDuration(options_.peer_timeout)));
  }
  if (!bound->ok()) {
    forget();
    return *bound;
  }
  return std::unique_ptr<KvTransfer>(new UcxKvTransfer(this, std::move(state)));
}

void UcxKvTransport::IssueOps(const std::shared_ptr<TransferState>& state) {
  int issued = 0;
  while (state->failure.ok() && !state->pending.empty() &&
         state->in_flight < options_.max_ops_in_flight) {
    if (issued == options_.max_ops_in_flight) {
      // Operations that complete at once (shared memory) could keep this
      // loop going for a whole transfer; yield so revokes and heartbeats are
      // handled between batches.
      if (!state->issue_posted) {
        state->issue_posted = true;
        Post([this, state] {
          state->issue_posted = false;
          IssueOps(state);
        });
      }
      break;
    }
    ++issued;
    const KvCopyOp op = state->pending.front();
    state->pending.pop_front();
    if (faults_.delay_per_op > absl::ZeroDuration()) absl::SleepFor(faults_.delay_per_op);
    if (!state->via_am && state->access == KvLeaseAccess::kWrite &&
        absl::Now() >= state->holder->write_until) {
      // Not sure the holder still counts us alive: wait for its next pong
      // (ExtendWriteLease resumes us) or for it to be declared dead.
      state->pending.push_front(op);
      break;
    }
    auto* ctx = new OpContext{this, state, {}, op.bytes};
    ucp_request_param_t param{};
    param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    param.cb.send = [](void* request, ucs_status_t status, void* user_data) {
      auto* op = static_cast<OpContext*>(user_data);
      ucp_request_free(request);
      op->transport->OnOpDone(op, status, /*async=*/true);
    };
    param.user_data = ctx;
    ucs_status_ptr_t req;
    ucp_ep_h ep = state->holder->ep;
    if (state->via_am) {
      ctx->header = {peer_id_, state->lease_id, state->generation, op.dst_offset};
      req =
          ucp_am_send_nbx(ep, kAmData, &ctx->header, sizeof ctx->header,
                          state->local_base + op.src_offset, static_cast<size_t>(op.bytes), &param);
    } else if (state->access == KvLeaseAccess::kWrite) {
      req = ucp_put_nbx(ep, state->local_base + op.src_offset, static_cast<size_t>(op.bytes),
                        state->remote_base + static_cast<uint64_t>(op.dst_offset), state->rkey,
                        &param);
    } else {
      req = ucp_get_nbx(ep, state->local_base + op.dst_offset, static_cast<size_t>(op.bytes),
                        state->remote_base + static_cast<uint64_t>(op.src_offset), state->rkey,
                        &param);
    }
    ++state->in_flight;
    ++state->stats.ops;
    if (UCS_PTR_IS_PTR(req)) {
      ++requests_in_flight_;
      continue;
    }
    // Completed (or failed) at once: no callback will run.
    OnOpDone(ctx, UCS_PTR_STATUS(req), /*async=*/false);
  }
  Advance(state);
}

void UcxKvTransport::OnOpDone(OpContext* op, ucs_status_t status, bool async) {
  std::unique_ptr<OpContext> owned(op);
  std::shared_ptr<TransferState> state = op->state;
  if (async) --requests_in_flight_;
  --state->in_flight;
  if (status == UCS_OK) {
    if (state->via_am) state->bytes_sent += op->bytes;
  } else if (state->failure.ok()) {
    if (status == UCS_ERR_CANCELED && state->holder->dead.ok()) {
      FailTransfer(state, absl::AbortedError(absl::StrCat("lease ", state->lease_id,
                                                          ": the holder refused the data")));
    } else {
      FailTransfer(state, UcsError("KV data operation failed", status));
    }
    return;
  }
  if (async) IssueOps(state);
}

void UcxKvTransport::FailTransfer(const std::shared_ptr<TransferState>& state,
                                  absl::Status status) {
  if (state->failure.ok()) {
    state->failure = status;
    state->pending.clear();
    if (!state->finished && !state->send_fence) state->send_abort = true;
    if (state->commit_seq != 0) commit_waiters_.erase(state->commit_seq);
    state->result->Set(status);
  }
  Advance(state);
}

void UcxKvTransport::Advance(const std::shared_ptr<TransferState>& state) {
  if (state->in_flight > 0 || state->flushing) return;
  HolderPeer* holder = state->holder;
  const bool alive = holder->dead.ok() && holder->ep != nullptr;
  const bool want_commit =
      state->failure.ok() && state->committing && state->pending.empty() && state->commit_seq == 0;
  const bool want_notice = !state->failure.ok() && (state->send_abort || state->send_fence);
  if (!alive || (!want_commit && !want_notice)) {
    if (!state->failure.ok() || state->finished) {
      state->quiet->Set(absl::OkStatus());
      if (transfers_.erase({state->lease_id, state->generation}) > 0) --holder->open_transfers;
    }
    return;
  }
  // Flush first, so the holder sees every byte before the message that
  // follows (commit, abort or fence).
  state->flushing = true;
  struct FlushContext {
    UcxKvTransport* transport;
    std::shared_ptr<TransferState> state;
  };
  auto* ctx = new FlushContext{this, state};
  ucp_request_param_t param{};
  param.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  // The flush's own status does not matter: a failed endpoint is noticed
  // through the holder's state in AfterFlush.
  param.cb.send = [](void* request, ucs_status_t, void* user_data) {
    std::unique_ptr<FlushContext> c(static_cast<FlushContext*>(user_data));
    ucp_request_free(request);
    --c->transport->requests_in_flight_;
    c->transport->AfterFlush(c->state);
  };
  param.user_data = ctx;
  ucs_status_ptr_t req = ucp_ep_flush_nbx(holder->ep, &param);
  if (UCS_PTR_IS_PTR(req)) {
    ++requests_in_flight_;
    return;
  }
  delete ctx;
  AfterFlush(state);
}

void UcxKvTransport::AfterFlush(const std::shared_ptr<TransferState>& state) {
  state->flushing = false;
  HolderPeer* holder = state->holder;
  if (!holder->dead.ok() || holder->ep == nullptr) {
    Advance(state);
    return;
  }
  ControlMsg msg{.lease_id = state->lease_id, .generation = state->generation};
  if (state->failure.ok()) {
    msg.type = MsgType::kCommit;
    msg.bytes = state->via_am ? state->bytes_sent : 0;
    msg.seq = next_seq_++;
    state->commit_seq = msg.seq;
    commit_waiters_[msg.seq] = state;
    if (faults_.drop_commits > 0) {
      --faults_.drop_commits;
      return;
    }
    SendControl(holder->ep, msg);
    if (faults_.duplicate_commits > 0) {
      --faults_.duplicate_commits;
      SendControl(holder->ep, msg);
    }
    return;
  }
  msg.type = state->send_fence ? MsgType::kFenced : MsgType::kAbort;
  state->send_abort = false;
  state->send_fence = false;
  SendControl(holder->ep, msg);
  Advance(state);
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvTransport>> CreateKvTransport(const KvTransportOptions& options) {
  return UcxKvTransport::Create(options);
}

}  // namespace dserve::kvtransfer
