// prefill/prefill_scheduler.h: the prefill worker's scheduler. Prompts wait
// in a bounded queue, run in batched steps with chunked prefill, and stream
// their KV into the blocks a decode worker leased for them: the transfer is
// opened (bound and planned) before the prompt's first step, and during its
// last step each layer is submitted as soon as the model has written it, so
// the transfer overlaps the remaining layers' compute.
//
// Threads: the scheduler thread owns the engine and runs the steps; a
// committer thread waits for each transfer's commit (flush, completion
// message, the holder's ack) so the next prompts compute meanwhile. A
// prompt's blocks are freed only after its commit finished, since the
// transfer reads them until then.
#ifndef DSERVE_PREFILL_PREFILL_SCHEDULER_H_
#define DSERVE_PREFILL_PREFILL_SCHEDULER_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/functional/any_invocable.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "engine/engine.h"
#include "kvtransfer/transport.h"

namespace dserve::prefill {

struct PrefillSchedulerOptions {
  std::string worker_id;
  int64_t max_queued_requests = 256;
  int64_t max_step_tokens = 2048;
  int64_t max_batch = 256;
  // Bound on binding a lease before compute starts.
  absl::Duration open_timeout = absl::Seconds(2);
};

// PrefillJob: one Prefill call.
struct PrefillJob {
  std::string request_id;
  engine::GenerationRequest request;
  kvtransfer::KvLeaseTarget target;
  absl::Time deadline = absl::InfiniteFuture();
};

// PrefillResult: the first token and where the time went.
struct PrefillResult {
  engine::TokenId first_token = 0;
  float first_logprob = 0;
  absl::Duration queue_time;          // submitted -> first step
  absl::Duration compute_time;        // first step -> last layer computed
  absl::Duration transfer_tail_time;  // last layer computed -> commit acked
  int64_t kv_bytes = 0;
};
// PrefillDone: called once, on the scheduler or the committer thread; must
// not block.
using PrefillDone = absl::AnyInvocable<void(absl::StatusOr<PrefillResult>)>;

// PrefillLoad: a snapshot for load reports.
struct PrefillLoad {
  int64_t kv_blocks_total = 0;
  int64_t kv_blocks_free = 0;
  int32_t kv_block_tokens = 0;
  int32_t running = 0;  // computing or committing
  int32_t queued = 0;
  int64_t queued_prefill_tokens = 0;  // prompt tokens not yet computed
  int32_t batch_size = 0;
  int64_t leases_open = 0;
  bool draining = false;
};

class PrefillScheduler {
 public:
  // `engine` and `transport` must outlive the scheduler; `region` holds the
  // engine's pool, laid out as `pool_layout`.
  PrefillScheduler(engine::Engine* engine, kvtransfer::KvTransport* transport,
                   kvtransfer::KvRegionId region, const kvtransfer::KvPoolLayout& pool_layout,
                   const PrefillSchedulerOptions& options);
  ~PrefillScheduler();  // fails what is left with UNAVAILABLE, joins

  // Submit queues a prompt. Errors (bad request: INVALID_ARGUMENT; queue
  // full: RESOURCE_EXHAUSTED; draining: UNAVAILABLE; transfer refused or
  // peer dead) arrive through `done`. Returns a handle for Cancel.
  uint64_t Submit(PrefillJob job, PrefillDone done);
  // Cancel drops a queued or computing prompt (its transfer is aborted, done
  // gets CANCELLED); a prompt already committing finishes. Idempotent.
  void Cancel(uint64_t handle);
  // Drain stops admitting and waits until nothing runs or `deadline`.
  void Drain(absl::Time deadline);

  PrefillLoad Load() const;

 private:
  struct Job {
    uint64_t handle = 0;
    std::string request_id;
    engine::SequenceId sequence = 0;
    kvtransfer::KvLeaseTarget target;
    std::unique_ptr<kvtransfer::KvTransfer> transfer;
    PrefillDone done;
    absl::Time deadline;
    absl::Time submitted;
    absl::Time started;  // first step
    absl::Status submit_status;
  };
  struct Committing {
    std::unique_ptr<Job> job;
    PrefillResult result;
    absl::Time computed;
  };

  void Post(absl::AnyInvocable<void()> fn);
  bool HasWork() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stop_ || !inbox_.empty(); }
  void Loop();
  void CommitLoop();
  void Enqueue(uint64_t handle, PrefillJob job, PrefillDone done);
  void Activate();
  void RunStep();
  void Fail(std::unique_ptr<Job> job, absl::Status status);
  void PublishLoad();

  engine::Engine* const engine_;
  kvtransfer::KvTransport* const transport_;
  const kvtransfer::KvRegionId region_;
  const kvtransfer::KvPoolLayout pool_layout_;
  const PrefillSchedulerOptions options_;

  // Scheduler-thread state.
  std::deque<std::unique_ptr<Job>> queued_;  // waiting for blocks
  std::vector<std::unique_ptr<Job>> active_;  // blocks allocated, transfer open
  int32_t committing_ = 0;  // updated through posts from the committer
  bool draining_ = false;
  int32_t last_batch_ = 0;

  std::atomic<uint64_t> next_handle_{1};
  mutable absl::Mutex mu_;
  std::deque<absl::AnyInvocable<void()>> inbox_ ABSL_GUARDED_BY(mu_);
  std::deque<Committing> to_commit_ ABSL_GUARDED_BY(mu_);
  bool stop_ ABSL_GUARDED_BY(mu_) = false;
  PrefillLoad load_ ABSL_GUARDED_BY(mu_);
  std::thread thread_;
  std::thread committer_;
};

}  // namespace dserve::prefill

#endif  // DSERVE_PREFILL_PREFILL_SCHEDULER_H_
