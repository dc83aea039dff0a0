// router/admission.cc: the admission queue and the retry hint carried on
// statuses.
#include "router/admission.h"

#include <algorithm>
#include <string>

#include "absl/strings/cord.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace dserve::router {
namespace {

constexpr char kRetryAfterPayload[] = "type.dserve.dev/retry-after-ms";

bool IsNoCapacity(const absl::Status& s) { return absl::IsResourceExhausted(s); }

}  // namespace

absl::Status WithRetryAfter(absl::Status status, absl::Duration retry_after) {
  status.SetPayload(kRetryAfterPayload,
                    absl::Cord(absl::StrCat(absl::ToInt64Milliseconds(retry_after))));
  return status;
}

std::optional<absl::Duration> RetryAfter(const absl::Status& status) {
  auto payload = status.GetPayload(kRetryAfterPayload);
  if (!payload) return std::nullopt;
  int64_t ms = 0;
  if (!absl::SimpleAtoi(std::string(*payload), &ms)) return std::nullopt;
  return absl::Milliseconds(ms);
}

AdmissionQueue::AdmissionQueue(Options options) : options_(options) {}

int AdmissionQueue::size() const {
  absl::MutexLock lock(&mu_);
  return static_cast<int>(queue_.size());
}

absl::Duration AdmissionQueue::RetryAfterEstimate() const {
  absl::MutexLock lock(&mu_);
  return EstimateLocked(queue_.size());
}

absl::Duration AdmissionQueue::EstimateLocked(size_t position) const {
  // With no admissions seen yet there is no rate to go by: suggest a
  // second, a typical time for a few requests to finish.
  const absl::Duration gap = admission_gap_.value_or(absl::Seconds(1));
  absl::Duration estimate = gap * static_cast<int64_t>(position + 1);
  return std::clamp(estimate, absl::Milliseconds(10), std::max(options_.timeout, absl::Seconds(1)));
}

void AdmissionQueue::RecordAdmissionLocked(absl::Time now) {
  if (last_admission_) {
    const absl::Duration gap = now - *last_admission_;
    admission_gap_ = admission_gap_ ? (*admission_gap_ * 0.8 + gap * 0.2) : gap;
  }
  last_admission_ = now;
}

void AdmissionQueue::NotifyChange() {
  absl::MutexLock lock(&mu_);
  ++epoch_;
}

void AdmissionQueue::Wake() {
  // absl::Mutex re-evaluates waiters' conditions when it is released.
  absl::MutexLock lock(&mu_);
}

void AdmissionQueue::Close() {
  absl::MutexLock lock(&mu_);
  closed_ = true;
}

absl::Status AdmissionQueue::Admit(int32_t priority, absl::Time deadline, Attempt attempt,
                                   const std::atomic<bool>* cancelled) {
  bool waiting_before_us;
  {
    absl::MutexLock lock(&mu_);
    if (closed_) return absl::UnavailableError("the router is draining");
    waiting_before_us = !queue_.empty();
  }
  absl::Status last = absl::ResourceExhaustedError("requests are waiting for capacity");
  bool tried = false;
  if (!waiting_before_us) {
    last = attempt();
    if (!IsNoCapacity(last)) return last;
    tried = true;
  }

  absl::MutexLock lock(&mu_);
  if (closed_) return absl::UnavailableError("the router is draining");
  if (static_cast<int>(queue_.size()) >= options_.max_queued) {
    const absl::Duration hint = EstimateLocked(queue_.size());
    return WithRetryAfter(
        absl::ResourceExhaustedError(absl::StrCat(
            "admission queue is full (", queue_.size(), " requests waiting, max_queued_requests ",
            options_.max_queued, "): ", last.message(), "; retry in about ",
            absl::ToInt64Milliseconds(hint), " ms")),
        hint);
  }
  const Key key{-static_cast<int64_t>(priority), next_arrival_++};
  queue_.insert(key);
  // A request that has not tried yet tries as soon as it is at the head.
  uint64_t seen = tried ? epoch_ : 0;
  const absl::Time queue_deadline = std::min(absl::Now() + options_.timeout, deadline);
  auto leave = [&] {
    queue_.erase(key);
    ++epoch_;  // the head may have changed: the new one tries at once
  };
  while (true) {
    auto ready = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      return closed_ || (cancelled != nullptr && cancelled->load()) ||
             (*queue_.begin() == key && epoch_ != seen);
    };
    // Load reports may keep the head trying without a pause: the clock,
    // not only the wait, ends the stay in the queue.
    const bool woke = mu_.AwaitWithDeadline(absl::Condition(&ready), queue_deadline);
    if (!woke || (absl::Now() >= queue_deadline && !closed_)) {
      leave();
      if (deadline <= queue_deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat("deadline passed while waiting for capacity: ", last.message()));
      }
      const absl::Duration hint = EstimateLocked(queue_.size());
      return WithRetryAfter(
          absl::ResourceExhaustedError(absl::StrCat(
              "no capacity within the queue timeout of ", absl::FormatDuration(options_.timeout),
              ": ", last.message(), "; retry in about ", absl::ToInt64Milliseconds(hint), " ms")),
          hint);
    }
    if (closed_) {
      leave();
      return absl::UnavailableError("the router is draining");
    }
    if (cancelled != nullptr && cancelled->load()) {
      leave();
      return absl::CancelledError("cancelled while waiting for capacity");
    }
    seen = epoch_;
    mu_.Unlock();
    absl::Status s = attempt();
    mu_.Lock();
    if (!IsNoCapacity(s)) {
      leave();
      if (s.ok()) RecordAdmissionLocked(absl::Now());
      return s;
    }
    last = std::move(s);
  }
}

}  // namespace dserve::router
