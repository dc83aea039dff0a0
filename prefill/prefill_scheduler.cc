// prefill/prefill_scheduler.cc: the queue, the batched steps with layer-wise
// KV streaming, and the committer.
#include "prefill/prefill_scheduler.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"

namespace dserve::prefill {

PrefillScheduler::PrefillScheduler(engine::Engine* engine, kvtransfer::KvTransport* transport,
                                   kvtransfer::KvRegionId region,
                                   const kvtransfer::KvPoolLayout& pool_layout,
                                   const PrefillSchedulerOptions& options)
    : engine_(engine),
      transport_(transport),
      region_(region),
      pool_layout_(pool_layout),
      options_(options) {
  PublishLoad();
  thread_ = std::thread([this] { Loop(); });
  committer_ = std::thread([this] { CommitLoop(); });
}

PrefillScheduler::~PrefillScheduler() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
  committer_.join();
}

void PrefillScheduler::Post(absl::AnyInvocable<void()> fn) {
  absl::MutexLock lock(&mu_);
  inbox_.push_back(std::move(fn));
}

uint64_t PrefillScheduler::Submit(PrefillJob job, PrefillDone done) {
  const uint64_t handle = next_handle_.fetch_add(1);
  Post([this, handle, job = std::move(job), done = std::move(done)]() mutable {
    Enqueue(handle, std::move(job), std::move(done));
  });
  return handle;
}

void PrefillScheduler::Cancel(uint64_t handle) {
  Post([this, handle] {
    auto match = [handle](const std::unique_ptr<Job>& j) { return j->handle == handle; };
    if (auto q = std::find_if(queued_.begin(), queued_.end(), match); q != queued_.end()) {
      std::unique_ptr<Job> job = std::move(*q);
      queued_.erase(q);
      Fail(std::move(job), absl::CancelledError("prefill cancelled"));
    } else if (auto a = std::find_if(active_.begin(), active_.end(), match); a != active_.end()) {
      std::unique_ptr<Job> job = std::move(*a);
      active_.erase(a);
      Fail(std::move(job), absl::CancelledError("prefill cancelled"));
    }
  });
}

void PrefillScheduler::Drain(absl::Time deadline) {
  Post([this] { draining_ = true; });
  while (absl::Now() < deadline) {
    const PrefillLoad load = Load();
    if (load.draining && load.running == 0 && load.queued == 0) return;
    absl::SleepFor(absl::Milliseconds(10));
  }
}

PrefillLoad PrefillScheduler::Load() const {
  absl::MutexLock lock(&mu_);
  return load_;
}

// ---------------------------------------------------------------------------
// The scheduler thread.

void PrefillScheduler::Loop() {
  while (true) {
    std::deque<absl::AnyInvocable<void()>> work;
    {
      absl::MutexLock lock(&mu_);
      if (active_.empty()) {
        mu_.AwaitWithTimeout(absl::Condition(this, &PrefillScheduler::HasWork),
                             absl::Milliseconds(50));
      }
      if (stop_) break;
      work.swap(inbox_);
    }
    for (auto& fn : work) fn();
    Activate();
    if (!active_.empty()) RunStep();
    PublishLoad();
  }
  const absl::Status stopping = absl::UnavailableError(
      absl::StrCat("prefill worker ", options_.worker_id, " stopped before the prompt ran"));
  while (!queued_.empty()) {
    Fail(std::move(queued_.front()), stopping);
    queued_.pop_front();
  }
  for (std::unique_ptr<Job>& job : active_) Fail(std::move(job), stopping);
  active_.clear();
}

void PrefillScheduler::Enqueue(uint64_t handle, PrefillJob job, PrefillDone done) {
  if (draining_) {
    done(absl::UnavailableError(
        absl::StrCat("prefill worker ", options_.worker_id, " is draining")));
    return;
  }
  if (static_cast<int64_t>(queued_.size()) >= options_.max_queued_requests) {
    done(absl::ResourceExhaustedError(
        absl::StrCat("prefill worker ", options_.worker_id, ": ", queued_.size(),
                     " prompts already queued (max_queued_requests)")));
    return;
  }
  const int64_t bt = engine_->pool().layout().block_tokens;
  const int64_t blocks = (static_cast<int64_t>(job.request.prompt.size()) + bt - 1) / bt;
  if (blocks > engine_->pool().num_blocks()) {
    done(absl::InvalidArgumentError(absl::StrCat(
        "prompt: ", job.request.prompt.size(), " tokens exceed the prefill worker's KV pool of ",
        engine_->pool().num_blocks() * bt, " tokens")));
    return;
  }
  auto sequence = engine_->AddSequence(job.request);
  if (!sequence.ok()) {
    done(sequence.status());
    return;
  }
  auto j = std::make_unique<Job>();
  j->handle = handle;
  j->request_id = std::move(job.request_id);
  j->sequence = *sequence;
  j->target = std::move(job.target);
  j->done = std::move(done);
  j->deadline = job.deadline;
  j->submitted = absl::Now();
  queued_.push_back(std::move(j));
}

void PrefillScheduler::Activate() {
  while (!queued_.empty()) {
    Job& job = *queued_.front();
    const absl::Time now = absl::Now();
    if (now >= job.deadline) {
      std::unique_ptr<Job> expired = std::move(queued_.front());
      queued_.pop_front();
      Fail(std::move(expired), absl::DeadlineExceededError("prefill deadline passed in the queue"));
      continue;
    }
    const engine::Sequence& seq = *engine_->Find(job.sequence);
    if (!engine_->EnsureCapacity(job.sequence, seq.prompt_len).ok()) return;  // wait for blocks
    const kvtransfer::KvLocalBlocks local{.region = region_,
                                          .layout = pool_layout_,
                                          .blocks = seq.blocks.blocks(),
                                          .num_tokens = seq.prompt_len};
    auto transfer =
        transport_->Open(job.target, local, std::min(job.deadline, now + options_.open_timeout));
    std::unique_ptr<Job> owned = std::move(queued_.front());
    queued_.pop_front();
    if (!transfer.ok()) {
      Fail(std::move(owned), transfer.status());
      continue;
    }
    owned->transfer = std::move(transfer).value();
    active_.push_back(std::move(owned));
  }
}

void PrefillScheduler::RunStep() {
  // First come, first served: earlier prompts get their chunks first, and a
  // prompt whose last chunk fits streams its KV during this step.
  std::vector<engine::StepItem> items;
  std::vector<Job*> finishing;
  int64_t budget = options_.max_step_tokens;
  const absl::Time now = absl::Now();
  for (const std::unique_ptr<Job>& job : active_) {
    if (budget <= 0 || static_cast<int64_t>(items.size()) >= options_.max_batch) break;
    const engine::Sequence& seq = *engine_->Find(job->sequence);
    const int64_t n = std::min(seq.num_pending(), budget);
    items.push_back({seq.id, n});
    if (n == seq.num_pending()) finishing.push_back(job.get());
    if (job->started == absl::Time()) job->started = now;
    budget -= n;
  }
  last_batch_ = static_cast<int32_t>(items.size());
  auto outcome = engine_->Step(items, [&finishing](int64_t layer) {
    for (Job* job : finishing) {
      if (job->submit_status.ok()) {
        job->submit_status = job->transfer->Submit({.first = layer, .last = layer + 1});
      }
    }
  });
  const absl::Time computed = absl::Now();
  if (!outcome.ok()) {
    for (std::unique_ptr<Job>& job : active_) Fail(std::move(job), outcome.status());
    active_.clear();
    return;
  }
  for (size_t i = 0; i < outcome->sampled.size(); ++i) {
    const auto [sequence, token] = outcome->sampled[i];
    auto it = std::find_if(active_.begin(), active_.end(),
                           [sequence](const auto& j) { return j->sequence == sequence; });
    std::unique_ptr<Job> job = std::move(*it);
    active_.erase(it);
    if (!job->submit_status.ok()) {
      absl::Status status = job->submit_status;
      Fail(std::move(job), std::move(status));
      continue;
    }
    Committing c;
    c.result.first_token = token;
    c.result.first_logprob = outcome->logprobs[i];
    c.result.queue_time = job->started - job->submitted;
    c.result.compute_time = computed - job->started;
    c.computed = computed;
    c.job = std::move(job);
    ++committing_;
    absl::MutexLock lock(&mu_);
    to_commit_.push_back(std::move(c));
  }
}

void PrefillScheduler::Fail(std::unique_ptr<Job> job, absl::Status status) {
  if (job->transfer) job->transfer->Abort();  // the holder frees its blocks
  (void)engine_->Release(job->sequence);
  job->done(std::move(status));
}

// ---------------------------------------------------------------------------
// The committer thread.

void PrefillScheduler::CommitLoop() {
  auto ready = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return stop_ || !to_commit_.empty();
  };
  while (true) {
    Committing c;
    {
      absl::MutexLock lock(&mu_);
      mu_.Await(absl::Condition(&ready));
      if (to_commit_.empty()) break;  // stopping, nothing left
      c = std::move(to_commit_.front());
      to_commit_.pop_front();
    }
    Job& job = *c.job;
    // A commit waits for the holder's ack; bound it even for calls without a
    // deadline (the holder's lease would have ended long before).
    const absl::Status committed =
        job.transfer->Commit(std::min(job.deadline, absl::Now() + absl::Seconds(30)));
    c.result.transfer_tail_time = absl::Now() - c.computed;
    c.result.kv_bytes = job.transfer->stats().bytes;
    job.transfer.reset();
    // The transfer no longer reads the blocks: give them back.
    Post([this, sequence = job.sequence] {
      (void)engine_->Release(sequence);
      --committing_;
    });
    if (committed.ok()) {
      job.done(c.result);
    } else {
      job.done(committed);
    }
  }
}

void PrefillScheduler::PublishLoad() {
  PrefillLoad load;
  const engine::KvBlockPool& pool = engine_->pool();
  load.kv_blocks_total = pool.num_blocks();
  load.kv_blocks_free = pool.num_free();
  load.kv_block_tokens = static_cast<int32_t>(pool.layout().block_tokens);
  load.running = static_cast<int32_t>(active_.size()) + committing_;
  load.queued = static_cast<int32_t>(queued_.size());
  for (const auto& job : active_) load.queued_prefill_tokens += engine_->Find(job->sequence)->num_pending();
  for (const auto& job : queued_) load.queued_prefill_tokens += engine_->Find(job->sequence)->prompt_len;
  load.batch_size = last_batch_;
  load.leases_open = transport_->LeasesOpen();
  load.draining = draining_;
  absl::MutexLock lock(&mu_);
  load_ = load;
}

}  // namespace dserve::prefill
