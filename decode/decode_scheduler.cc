// decode/decode_scheduler.cc: the scheduler thread, reservations and the
// continuous-batching step loop.
#include "decode/decode_scheduler.h"

#include <algorithm>
#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/synchronization/notification.h"

namespace dserve::decode {
namespace {

int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

DecodeEvent ErrorEvent(absl::Status status) {
  DecodeEvent e;
  e.status = std::move(status);
  return e;
}

DecodeEvent FinishEvent(engine::FinishReason finish) {
  DecodeEvent e;
  e.finish = finish;
  return e;
}

}  // namespace

DecodeScheduler::DecodeScheduler(engine::Engine* engine, kvtransfer::KvTransport* transport,
                                 kvtransfer::KvRegionId region,
                                 const kvtransfer::KvPoolLayout& pool_layout,
                                 const DecodeSchedulerOptions& options)
    : engine_(engine),
      transport_(transport),
      region_(region),
      pool_layout_(pool_layout),
      options_(options) {
  PublishLoad();
  thread_ = std::thread([this] { Loop(); });
}

DecodeScheduler::~DecodeScheduler() {
  {
    absl::MutexLock lock(&mu_);
    stop_ = true;
  }
  thread_.join();
}

void DecodeScheduler::Post(absl::AnyInvocable<void()> fn) {
  absl::MutexLock lock(&mu_);
  inbox_.push_back(std::move(fn));
}

int64_t DecodeScheduler::LifetimeBlocks(int64_t prompt_tokens, int64_t max_tokens) const {
  const int64_t lifetime =
      std::min(prompt_tokens + max_tokens, engine_->config().max_position_embeddings);
  return CeilDiv(lifetime, engine_->pool().layout().block_tokens);
}

// ---------------------------------------------------------------------------
// Calls from other threads: each posts its work to the scheduler thread.

void DecodeScheduler::Reserve(std::string request_id, int64_t prompt_tokens, int64_t max_tokens,
                              absl::AnyInvocable<void(absl::StatusOr<Reservation>)> done) {
  Post([this, request_id = std::move(request_id), prompt_tokens, max_tokens,
        done = std::move(done)]() mutable {
    if (draining_) {
      done(absl::UnavailableError(absl::StrCat("decode worker ", options_.worker_id, " is draining")));
      return;
    }
    if (options_.aggregated || transport_ == nullptr) {
      done(absl::FailedPreconditionError(
          "an aggregated worker takes no reservations: call Decode with the prompt"));
      return;
    }
    const int64_t max_pos = engine_->config().max_position_embeddings;
    if (prompt_tokens < 1 || prompt_tokens >= max_pos) {
      done(absl::InvalidArgumentError(absl::StrCat("prompt_tokens must be in [1, ", max_pos - 1,
                                                   "], got ", prompt_tokens)));
      return;
    }
    if (max_tokens < 1) {
      done(absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", max_tokens)));
      return;
    }
    const int64_t total = engine_->pool().num_blocks();
    const int64_t lifetime = LifetimeBlocks(prompt_tokens, max_tokens);
    if (committed_blocks_ + lifetime > total) {
      done(absl::ResourceExhaustedError(absl::StrCat(
          "decode worker ", options_.worker_id, ": the request needs ", lifetime,
          " KV blocks over its lifetime; ", total - committed_blocks_, " of ", total,
          " are not committed to admitted requests")));
      return;
    }
    const int64_t bt = engine_->pool().layout().block_tokens;
    auto blocks = engine_->mutable_pool().Allocate(CeilDiv(prompt_tokens, bt));
    if (!blocks.ok()) {  // cannot happen while admissions are counted; say so if it does
      done(absl::InternalError(absl::StrCat("admitted but no blocks free: ",
                                            blocks.status().message())));
      return;
    }
    const uint64_t id = next_reservation_++;
    auto target = transport_->OpenLease(
        region_, pool_layout_, *blocks, kvtransfer::KvLeaseAccess::kWrite,
        options_.reservation_ttl, [this, id](std::vector<kvtransfer::KvBlockId>) {
          // The lease ended without a commit (aborted, expired, mover dead):
          // no write can land any more, so the blocks may be reused.
          Post([this, id] { FreeReservation(id, /*abort_lease=*/false); });
        });
    if (!target.ok()) {
      (void)engine_->mutable_pool().Free(*blocks);
      done(target.status());
      return;
    }
    committed_blocks_ += lifetime;
    reservations_[id] = ReservationState{.request_id = request_id,
                                         .lease_id = target->lease_id,
                                         .blocks = std::move(blocks).value(),
                                         .lifetime_blocks = lifetime,
                                         .expires = absl::Now() + options_.reservation_ttl};
    done(Reservation{.id = id, .target = std::move(target).value()});
  });
}

void DecodeScheduler::Release(uint64_t reservation_id) {
  Post([this, reservation_id] { FreeReservation(reservation_id, /*abort_lease=*/true); });
}

uint64_t DecodeScheduler::Start(DecodeJob job, DecodeSink sink) {
  const uint64_t handle = next_handle_.fetch_add(1);
  Post([this, handle, job = std::move(job), sink = std::move(sink)]() mutable {
    StartOnThread(handle, std::move(job), std::move(sink));
  });
  return handle;
}

void DecodeScheduler::Cancel(uint64_t handle) {
  Post([this, handle] {
    if (auto it = running_.find(handle); it != running_.end()) {
      (void)engine_->Release(it->second.sequence);
      committed_blocks_ -= it->second.lifetime_blocks;
      handle_of_.erase(it->second.sequence);
      running_.erase(it);
      return;
    }
    auto q = std::find_if(queued_.begin(), queued_.end(),
                          [&](const QueuedRequest& r) { return r.handle == handle; });
    if (q != queued_.end()) {
      (void)engine_->Release(q->sequence);
      queued_.erase(q);
    }
  });
}

void DecodeScheduler::Drain(absl::Time deadline) {
  Post([this] { draining_ = true; });
  while (absl::Now() < deadline) {
    const DecodeLoad load = Load();
    if (load.draining && load.running == 0 && load.queued == 0 && load.kv_blocks_reserved == 0) {
      return;
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
  absl::Notification ended;
  Post([this, &ended] {
    EndAll(absl::UnavailableError(
        absl::StrCat("decode worker ", options_.worker_id, " stopped before the request ended")));
    ended.Notify();
  });
  ended.WaitForNotification();
}

DecodeLoad DecodeScheduler::Load() const {
  absl::MutexLock lock(&mu_);
  return load_;
}

// ---------------------------------------------------------------------------
// The scheduler thread.

void DecodeScheduler::Loop() {
  absl::Time last_expiry_check = absl::Now();
  while (true) {
    std::deque<absl::AnyInvocable<void()>> work;
    {
      absl::MutexLock lock(&mu_);
      if (running_.empty()) {
        // Idle: sleep until work arrives, waking now and then for expiry.
        mu_.AwaitWithTimeout(absl::Condition(this, &DecodeScheduler::HasWork),
                             absl::Milliseconds(50));
      }
      if (stop_) break;
      work.swap(inbox_);
    }
    for (auto& fn : work) fn();
    const absl::Time now = absl::Now();
    if (now - last_expiry_check >= absl::Milliseconds(50)) {
      last_expiry_check = now;
      ExpireReservations(now);
    }
    Admit();
    if (!running_.empty()) RunStep();
    PublishLoad();
  }
  EndAll(absl::UnavailableError("decode worker shutting down"));
  for (auto& [id, r] : reservations_) {
    if (!r.committed && transport_ != nullptr) transport_->AbortLease(r.lease_id);
  }
}

void DecodeScheduler::StartOnThread(uint64_t handle, DecodeJob job, DecodeSink sink) {
  auto fail = [&](absl::Status status) { sink(ErrorEvent(std::move(status))); };
  if (draining_) {
    return fail(absl::UnavailableError(
        absl::StrCat("decode worker ", options_.worker_id, " is draining")));
  }
  if (job.reservation_id == 0) {
    if (!options_.aggregated) {
      return fail(absl::InvalidArgumentError(
          "reservation_id: required by a decode worker (only an aggregated worker runs prompts)"));
    }
    const int64_t lifetime =
        LifetimeBlocks(job.request.prompt.size(), job.request.sampling.max_tokens);
    if (lifetime > engine_->pool().num_blocks()) {
      return fail(absl::ResourceExhaustedError(absl::StrCat(
          "the request needs ", lifetime, " KV blocks over its lifetime; the worker has ",
          engine_->pool().num_blocks())));
    }
    if (static_cast<int64_t>(queued_.size()) >= options_.max_queued_requests) {
      return fail(absl::ResourceExhaustedError(absl::StrCat(
          "decode worker ", options_.worker_id, ": ", queued_.size(),
          " requests already queued (max_queued_requests)")));
    }
    auto sequence = engine_->AddSequence(job.request);
    if (!sequence.ok()) return fail(sequence.status());
    queued_.push_back(QueuedRequest{.handle = handle,
                                    .request_id = std::move(job.request_id),
                                    .sequence = *sequence,
                                    .sink = std::move(sink),
                                    .lifetime_blocks = lifetime});
    return;
  }

  auto it = reservations_.find(job.reservation_id);
  if (it == reservations_.end()) {
    return fail(absl::FailedPreconditionError(absl::StrCat(
        "reservation ", job.reservation_id, " is unknown, expired or released")));
  }
  ReservationState& r = it->second;
  if (!r.committed) {
    // Prefill answers only after the holder acked its commit, so the lease
    // is handed back by now; anything else means the KV never arrived.
    absl::Status handed_back = transport_->AwaitLease(r.lease_id, absl::Now());
    if (!handed_back.ok()) {
      FreeReservation(job.reservation_id, /*abort_lease=*/true);
      return fail(absl::FailedPreconditionError(absl::StrCat(
          "reservation ", job.reservation_id, ": the prompt's KV was not committed (",
          handed_back.message(), ")")));
    }
    r.committed = true;
  }
  auto sequence = engine_->AdoptSequence(job.request, r.blocks, job.first_token);
  if (!sequence.ok()) {
    FreeReservation(job.reservation_id, /*abort_lease=*/false);
    return fail(sequence.status());
  }
  const int64_t lifetime = r.lifetime_blocks;
  reservations_.erase(it);  // the sequence owns the blocks now
  running_[handle] = RunningRequest{.request_id = std::move(job.request_id),
                                    .sequence = *sequence,
                                    .sink = std::move(sink),
                                    .lifetime_blocks = lifetime};
  handle_of_[*sequence] = handle;
  const engine::Sequence& seq = *engine_->Find(*sequence);
  if (seq.finish != engine::FinishReason::kNone) Finish(handle, FinishEvent(seq.finish));
}

void DecodeScheduler::Admit() {
  const int64_t total = engine_->pool().num_blocks();
  while (!queued_.empty() && committed_blocks_ + queued_.front().lifetime_blocks <= total) {
    QueuedRequest q = std::move(queued_.front());
    queued_.pop_front();
    committed_blocks_ += q.lifetime_blocks;
    handle_of_[q.sequence] = q.handle;
    running_[q.handle] = RunningRequest{.request_id = std::move(q.request_id),
                                        .sequence = q.sequence,
                                        .sink = std::move(q.sink),
                                        .lifetime_blocks = q.lifetime_blocks};
  }
}

void DecodeScheduler::RunStep() {
  // Decode tokens first (one per running sequence), then prompt chunks in
  // the remaining token budget.
  std::vector<engine::StepItem> items;
  int64_t budget = options_.max_step_tokens;
  int64_t context = 0;
  std::vector<const engine::Sequence*> prefilling;
  for (const auto& [handle, r] : running_) {
    const engine::Sequence* seq = engine_->Find(r.sequence);
    if (seq->num_computed < seq->prompt_len) {
      prefilling.push_back(seq);
    } else if (budget > 0 && static_cast<int64_t>(items.size()) < options_.max_batch) {
      items.push_back({seq->id, 1});
      context += seq->num_computed + 1;
      --budget;
    }
  }
  std::sort(prefilling.begin(), prefilling.end(),
            [](const engine::Sequence* a, const engine::Sequence* b) { return a->id < b->id; });
  for (const engine::Sequence* seq : prefilling) {
    if (budget <= 0 || static_cast<int64_t>(items.size()) >= options_.max_batch) break;
    const int64_t n = std::min(seq->num_pending(), budget);
    items.push_back({seq->id, n});
    context += seq->num_computed + n;
    budget -= n;
  }
  if (items.empty()) return;

  const auto t0 = std::chrono::steady_clock::now();
  auto outcome = engine_->Step(items);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  if (!outcome.ok()) {
    // A step fails only on an engine invariant; end the step's requests
    // rather than the process.
    for (const engine::StepItem& item : items) {
      Finish(handle_of_.at(item.sequence), ErrorEvent(outcome.status()));
    }
    return;
  }
  last_batch_ = static_cast<int32_t>(items.size());
  recent_steps_.push_back({.batch = last_batch_,
                           .tokens = static_cast<int32_t>(outcome->tokens_computed),
                           .context_tokens = context,
                           .seconds = seconds});
  if (recent_steps_.size() > 16) recent_steps_.pop_front();

  for (size_t i = 0; i < outcome->sampled.size(); ++i) {
    const auto [sequence, token] = outcome->sampled[i];
    const uint64_t handle = handle_of_.at(sequence);
    const engine::Sequence& seq = *engine_->Find(sequence);
    DecodeEvent event = FinishEvent(seq.finish);
    event.tokens = {token};
    event.logprobs = {outcome->logprobs[i]};
    if (seq.finish != engine::FinishReason::kNone) {
      Finish(handle, std::move(event));
    } else {
      running_.at(handle).sink(std::move(event));
    }
  }
}

void DecodeScheduler::Finish(uint64_t handle, DecodeEvent last) {
  auto it = running_.find(handle);
  if (it == running_.end()) return;
  RunningRequest r = std::move(it->second);
  running_.erase(it);
  handle_of_.erase(r.sequence);
  (void)engine_->Release(r.sequence);
  committed_blocks_ -= r.lifetime_blocks;
  r.sink(std::move(last));
}

void DecodeScheduler::EndAll(const absl::Status& status) {
  std::vector<uint64_t> handles;
  for (const auto& [handle, r] : running_) handles.push_back(handle);
  for (uint64_t h : handles) Finish(h, ErrorEvent(status));
  for (QueuedRequest& q : queued_) {
    (void)engine_->Release(q.sequence);
    q.sink(ErrorEvent(status));
  }
  queued_.clear();
}

void DecodeScheduler::FreeReservation(uint64_t id, bool abort_lease) {
  auto it = reservations_.find(id);
  if (it == reservations_.end()) return;
  ReservationState& r = it->second;
  if (!r.committed && abort_lease) {
    // A mover may still be writing: the lease's release callback frees the
    // blocks once it cannot any more.
    transport_->AbortLease(r.lease_id);
    return;
  }
  (void)engine_->mutable_pool().Free(r.blocks);
  committed_blocks_ -= r.lifetime_blocks;
  reservations_.erase(it);
}

void DecodeScheduler::ExpireReservations(absl::Time now) {
  std::vector<uint64_t> expired;
  for (auto& [id, r] : reservations_) {
    if (now < r.expires) continue;
    // Past its ttl and never claimed by a Decode (the router gave up or
    // died). A committed lease is ours to free; an open one is aborted.
    if (!r.committed && transport_->AwaitLease(r.lease_id, now).ok()) r.committed = true;
    expired.push_back(id);
  }
  for (uint64_t id : expired) FreeReservation(id, /*abort_lease=*/true);
}

void DecodeScheduler::PublishLoad() {
  DecodeLoad load;
  const engine::KvBlockPool& pool = engine_->pool();
  load.kv_blocks_total = pool.num_blocks();
  load.kv_blocks_free = pool.num_free();
  for (const auto& [id, r] : reservations_) load.kv_blocks_reserved += r.blocks.size();
  load.kv_blocks_committed = committed_blocks_;
  load.kv_block_tokens = static_cast<int32_t>(pool.layout().block_tokens);
  load.running = static_cast<int32_t>(running_.size());
  load.queued = static_cast<int32_t>(queued_.size());
  load.batch_size = last_batch_;
  for (const auto& [handle, r] : running_) {
    const engine::Sequence* seq = engine_->Find(r.sequence);
    load.queued_prefill_tokens += std::max<int64_t>(0, seq->prompt_len - seq->num_computed);
  }
  for (const QueuedRequest& q : queued_) {
    load.queued_prefill_tokens += engine_->Find(q.sequence)->prompt_len;
  }
  load.leases_open = transport_ ? transport_->LeasesOpen() : 0;
  load.draining = draining_;
  load.recent_steps.assign(recent_steps_.begin(), recent_steps_.end());
  absl::MutexLock lock(&mu_);
  load_ = std::move(load);
}

}  // namespace dserve::decode
