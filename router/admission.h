// router/admission.h: admission control. A request that finds no capacity
// waits in a bounded priority queue and tries again when the workers' load
// changes; past the bound or the queue timeout it is refused with
// RESOURCE_EXHAUSTED and an estimate of when to retry.
#ifndef DSERVE_ROUTER_ADMISSION_H_
#define DSERVE_ROUTER_ADMISSION_H_

#include <atomic>
#include <cstdint>
#include <optional>
#include <set>
#include <utility>

#include "absl/base/thread_annotations.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"

namespace dserve::router {

// WithRetryAfter attaches a retry hint to `status` (a status payload that the
// RPC edge turns into the "retry-after-ms" trailer).
absl::Status WithRetryAfter(absl::Status status, absl::Duration retry_after);
// RetryAfter reads the hint WithRetryAfter attached, if any.
std::optional<absl::Duration> RetryAfter(const absl::Status& status);

// AdmissionQueue: waiting requests ordered by priority (higher first), then
// arrival. Only the head of the queue tries for capacity, so a large request
// is not starved by smaller ones behind it. Thread-safe.
class AdmissionQueue {
 public:
  struct Options {
    int max_queued = 1024;                       // waiting requests, at most
    absl::Duration timeout = absl::Seconds(30);  // longest wait in the queue
  };
  explicit AdmissionQueue(Options options);

  // Attempt: one try for capacity. OK: admitted. RESOURCE_EXHAUSTED: no
  // capacity now (the request waits). Anything else ends admission with that
  // status.
  using Attempt = absl::FunctionRef<absl::Status()>;

  // Admit runs `attempt` at once when nobody is waiting; otherwise, or when it
  // finds no capacity, the request joins the queue and `attempt` runs again
  // each time the request is at the head and NotifyChange was called since
  // its last try. `attempt` runs on the calling thread without the queue's
  // lock. Returns the attempt's final status, or:
  //  - RESOURCE_EXHAUSTED with a retry hint when the queue is full or the
  //    queue timeout passes;
  //  - DEADLINE_EXCEEDED when `deadline` (the client's) passes first;
  //  - CANCELLED once `*cancelled` is true (the canceller calls Wake);
  //  - UNAVAILABLE "draining" after Close.
  absl::Status Admit(int32_t priority, absl::Time deadline, Attempt attempt,
                     const std::atomic<bool>* cancelled);

  // NotifyChange: capacity may have changed; the head of the queue tries again.
  void NotifyChange();
  // Wake makes waiters re-check their cancellation flags.
  void Wake();
  // Close refuses new requests and fails the waiting ones with UNAVAILABLE.
  void Close();

  int size() const;
  // RetryAfterEstimate: how long a request joining the back of the queue
  // now would likely wait, from the recent rate of admissions out of it.
  absl::Duration RetryAfterEstimate() const;

 private:
  using Key = std::pair<int64_t, uint64_t>;  // (-priority, arrival): smallest first

  absl::Duration EstimateLocked(size_t position) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RecordAdmissionLocked(absl::Time now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable absl::Mutex mu_;
  std::set<Key> queue_ ABSL_GUARDED_BY(mu_);
  uint64_t next_arrival_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t epoch_ ABSL_GUARDED_BY(mu_) = 1;  // bumped on every change
  bool closed_ ABSL_GUARDED_BY(mu_) = false;
  // Admissions out of the queue: when the last was, and the smoothed gap.
  std::optional<absl::Time> last_admission_ ABSL_GUARDED_BY(mu_);
  std::optional<absl::Duration> admission_gap_ ABSL_GUARDED_BY(mu_);
};

}  // namespace dserve::router

#endif  // DSERVE_ROUTER_ADMISSION_H_
