// decode/decode_scheduler.h: the decode worker's scheduler: continuous
// batching over the engine's paged KV, with reservations for prompt KV that a
// prefill worker writes through the KV transport.
//
// One thread (the scheduler's) owns the engine, the reservations and the
// running requests. Every other thread talks to it through Post()ed closures
// that run between steps, and gets answers through callbacks invoked on the
// scheduler thread, so nothing waits on a lock held across a model step.
//
// Admission is over each request's whole lifetime: a request is admitted only
// when the blocks of prompt + max_tokens of every admitted request fit the
// pool, so a running request never has to be preempted for memory.
#ifndef DSERVE_DECODE_DECODE_SCHEDULER_H_
#define DSERVE_DECODE_DECODE_SCHEDULER_H_

#include <cstdint>
#include <atomic>
#include <deque>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "kvtransfer/transport.h"

namespace dserve::decode {

// DecodeSchedulerOptions: limits of one decode worker.
struct DecodeSchedulerOptions {
  std::string worker_id;
  bool aggregated = false;          // runs prompts itself (no reservations)
  int64_t max_batch = 256;          // sequences per step
  int64_t max_step_tokens = 2048;   // tokens per step (prefill chunks + decode)
  int64_t max_queued_requests = 256;
  absl::Duration reservation_ttl = absl::Seconds(30);
};

// DecodeEvent: what a stream receives. Tokens come in order; the last event
// has `finish` set (or a non-OK `status`, e.g. the worker draining).
struct DecodeEvent {
  std::vector<engine::TokenId> tokens;
  std::vector<float> logprobs;
  engine::FinishReason finish = engine::FinishReason::kNone;
  absl::Status status;
};
// DecodeSink: called on the scheduler thread, in order, until an event with
// finish or an error; must not block.
using DecodeSink = std::function<void(DecodeEvent event)>;

// DecodeJob: one Decode call. With reservation_id != 0 the prompt's KV is in
// the reservation's blocks and first_token was sampled by the prefill worker
// (not sent again); with 0 (aggregated) the scheduler runs the prompt.
struct DecodeJob {
  std::string request_id;
  uint64_t reservation_id = 0;
  engine::GenerationRequest request;
  engine::TokenId first_token = 0;
};

// Reservation: what Reserve returns.
struct Reservation {
  uint64_t id = 0;
  kvtransfer::KvLeaseTarget target;
};

// StepSample: one model step, for load reports.
struct StepSample {
  int32_t batch = 0;
  int32_t tokens = 0;
  int64_t context_tokens = 0;
  double seconds = 0;
};

// DecodeLoad: a snapshot for load reports.
struct DecodeLoad {
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_free = 0;
  int64_t kv_blocks_reserved = 0;   // held by reservations not yet decoding
  int64_t kv_blocks_committed = 0;  // lifetime blocks of admitted requests
  int32_t kv_block_tokens = 0;
  int32_t running = 0;
  int32_t queued = 0;
  int32_t batch_size = 0;
  int64_t queued_prefill_tokens = 0;
  int64_t leases_open = 0;
  bool draining = false;
  std::vector<StepSample> recent_steps;  // newest last, at most 16
};

class DecodeScheduler {
 public:
  // `engine` and `transport` must outlive the scheduler; `region` is the
  // transport region holding the engine's pool, laid out as `pool_layout`.
  // `transport` may be null for an aggregated worker. Starts the scheduler
  // thread, which owns the engine from then on.
  DecodeScheduler(engine::Engine* engine, kvtransfer::KvTransport* transport,
                  kvtransfer::KvRegionId region, const kvtransfer::KvPoolLayout& pool_layout,
                  const DecodeSchedulerOptions& options);
  ~DecodeScheduler();  // cancels everything still running, joins the thread

  // Reserve admits a request's lifetime (prompt_tokens + max_tokens) and
  // leases blocks for its prompt's KV. `done` runs on the scheduler thread:
  // RESOURCE_EXHAUSTED when the lifetime does not fit now, INVALID_ARGUMENT
  // for sizes past the model or the pool, UNAVAILABLE when draining or
  // aggregated.
  void Reserve(std::string request_id, int64_t prompt_tokens, int64_t max_tokens,
               absl::AnyInvocable<void(absl::StatusOr<Reservation>)> done);
  // Release frees a reservation not claimed by a Decode. Idempotent.
  void Release(uint64_t reservation_id);

  // Start begins a Decode call; events go to `sink`. Returns a handle for
  // Cancel. Errors (unknown reservation, KV not committed, bad request,
  // queue full: RESOURCE_EXHAUSTED) arrive as the sink's only event.
  uint64_t Start(DecodeJob job, DecodeSink sink);
  // Cancel ends a call at once and frees its blocks; its sink gets no more
  // events. Idempotent; safe after the call finished.
  void Cancel(uint64_t handle);

  // Drain stops admitting (new work gets UNAVAILABLE), waits until nothing
  // runs or `deadline`, then ends what is left with UNAVAILABLE.
  void Drain(absl::Time deadline);

  DecodeLoad Load() const;
  const engine::Engine& engine() const { return *engine_; }

 private:
  void Post(absl::AnyInvocable<void()> fn);
  void Loop();
  void RunStep();
  void Admit();
  void StartOnThread(uint64_t handle, DecodeJob job, DecodeSink sink);
  void Finish(uint64_t handle, DecodeEvent last);
  void FreeReservation(uint64_t id, bool abort_lease);
  void ExpireReservations(absl::Time now);
  void PublishLoad();
  int64_t LifetimeBlocks(int64_t prompt_tokens, int64_t max_tokens) const;

  engine::Engine* const engine_;
  kvtransfer::KvTransport* const transport_;
  const kvtransfer::KvRegionId region_;
  const kvtransfer::KvPoolLayout pool_layout_;
  const DecodeSchedulerOptions options_;

  // Scheduler-thread state.
  struct RunningRequest {
    std::string request_id;
    engine::SequenceId sequence = 0;
    DecodeSink sink;
    int64_t lifetime_blocks = 0;
  };
  struct QueuedRequest {
    uint64_t handle = 0;
    std::string request_id;
    engine::SequenceId sequence = 0;
    DecodeSink sink;
    int64_t lifetime_blocks = 0;
  };
  struct ReservationState {
    std::string request_id;
    uint64_t lease_id = 0;
    std::vector<engine::KvBlockId> blocks;
    int64_t lifetime_blocks = 0;
    bool committed = false;  // lease handed back: blocks are ours, holding KV
    absl::Time expires;
  };
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !inbox_.empty(); }
  void EndAll(const absl::Status& status);

  absl::flat_hash_map<uint64_t, RunningRequest> running_;  // by handle
  absl::flat_hash_map<engine::SequenceId, uint64_t> handle_of_;
  std::deque<QueuedRequest> queued_;  // aggregated requests waiting for room
  absl::flat_hash_map<uint64_t, ReservationState> reservations_;
  int64_t committed_blocks_ = 0;
  uint64_t next_reservation_ = 1;
  bool draining_ = false;
  std::deque<StepSample> recent_steps_;
  int32_t last_batch_ = 0;

  std::atomic<uint64_t> next_handle_{1};
  mutable absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void()>> inbox_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  DecodeLoad load_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
};

}  // namespace dserve::decode

#endif  // DSERVE_DECODE_DECODE_SCHEDULER_H_
