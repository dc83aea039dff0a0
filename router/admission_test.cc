// router/admission_test.cc: the admission queue's bound, timeout, priority
// order, cancellation and close.
#include "router/admission.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "base/status_matchers.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace dserve::router {
namespace {

using ::dserve::testing::StatusIs;
using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::Optional;

// WaitFor polls `condition` until it holds or 5 s pass.
bool WaitFor(const std::function<bool()>& condition) {
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (absl::Now() < deadline) {
    if (condition()) return true;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return condition();
}

// Capacity: slots that attempts take; none free means RESOURCE_EXHAUSTED.
class Capacity {
 public:
  absl::Status Take() {
    absl::MutexLock lock(&mu_);
    if (free_ == 0) return absl::ResourceExhaustedError("no slot");
    --free_;
    return absl::OkStatus();
  }
  void Add(int n) {
    absl::MutexLock lock(&mu_);
    free_ += n;
  }

 private:
  absl::Mutex mu_;
  int free_ = 0;
};

TEST(AdmissionTest, AdmitsAtOnceWhenThereIsCapacity) {
  AdmissionQueue queue({4, absl::Seconds(5)});
  int attempts = 0;
  EXPECT_OK(queue.Admit(
      0, absl::InfiniteFuture(),
      [&] {
        ++attempts;
        return absl::OkStatus();
      },
      nullptr));
  EXPECT_EQ(attempts, 1);
  EXPECT_EQ(queue.size(), 0);
}

TEST(AdmissionTest, OtherErrorsEndAdmission) {
  AdmissionQueue queue({4, absl::Seconds(5)});
  EXPECT_THAT(
      queue.Admit(
          0, absl::InfiniteFuture(), [] { return absl::UnavailableError("worker gone"); }, nullptr),
      StatusIs(absl::StatusCode::kUnavailable, HasSubstr("worker gone")));
}

TEST(AdmissionTest, TimesOutWithARetryHint) {
  AdmissionQueue queue({4, absl::Milliseconds(100)});
  const absl::Time start = absl::Now();
  absl::Status s = queue.Admit(
      0, absl::InfiniteFuture(), [] { return absl::ResourceExhaustedError("full"); }, nullptr);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(100));
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kResourceExhausted,
                          HasSubstr("no capacity within the queue timeout")));
  EXPECT_THAT(s.message(), HasSubstr("retry in about"));
  EXPECT_THAT(RetryAfter(s), Optional(::testing::Gt(absl::ZeroDuration())));
  EXPECT_EQ(queue.size(), 0);
}

TEST(AdmissionTest, TimesOutEvenWhileLoadKeepsChanging) {
  AdmissionQueue queue({4, absl::Milliseconds(100)});
  std::atomic<bool> done{false};
  std::thread reporter([&] {
    while (!done.load()) {
      queue.NotifyChange();
      absl::SleepFor(absl::Milliseconds(1));
    }
  });
  std::atomic<int> attempts{0};
  absl::Status s = queue.Admit(
      0, absl::InfiniteFuture(),
      [&] {
        ++attempts;
        return absl::ResourceExhaustedError("full");
      },
      nullptr);
  done.store(true);
  reporter.join();
  EXPECT_THAT(s, StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("queue timeout")));
  EXPECT_GT(attempts.load(), 1);
}

TEST(AdmissionTest, ClientDeadlineBeforeTheQueueTimeout) {
  AdmissionQueue queue({4, absl::Seconds(30)});
  EXPECT_THAT(queue.Admit(
                  0, absl::Now() + absl::Milliseconds(50),
                  [] { return absl::ResourceExhaustedError("full"); }, nullptr),
              StatusIs(absl::StatusCode::kDeadlineExceeded));
}

TEST(AdmissionTest, FullQueueRefusesAtOnce) {
  AdmissionQueue queue({1, absl::Seconds(30)});
  Capacity capacity;
  absl::Status waiter_status;
  std::thread waiter([&] {
    waiter_status = queue.Admit(
        0, absl::InfiniteFuture(), [&] { return capacity.Take(); }, nullptr);
  });
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 1; }));
  absl::Status refused = queue.Admit(
      0, absl::InfiniteFuture(), [&] { return capacity.Take(); }, nullptr);
  EXPECT_THAT(refused,
              StatusIs(absl::StatusCode::kResourceExhausted, HasSubstr("admission queue is full")));
  EXPECT_TRUE(RetryAfter(refused).has_value());
  capacity.Add(1);
  queue.NotifyChange();
  waiter.join();
  EXPECT_OK(waiter_status);
}

TEST(AdmissionTest, HigherPriorityFirstThenArrivalOrder) {
  AdmissionQueue queue({8, absl::Seconds(30)});
  Capacity capacity;
  absl::Mutex mu;
  std::vector<std::string> order;
  std::vector<std::thread> threads;
  auto start = [&](const std::string& name, int32_t priority) {
    threads.emplace_back([&, name, priority] {
      absl::Status s = queue.Admit(
          priority, absl::InfiniteFuture(), [&] { return capacity.Take(); }, nullptr);
      EXPECT_OK(s) << name;
      absl::MutexLock lock(&mu);
      order.push_back(name);
    });
  };
  start("low-1", 0);
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 1; }));
  start("high", 5);
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 2; }));
  start("low-2", 0);
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 3; }));
  start("mid", 2);
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 4; }));
  for (int admitted = 1; admitted <= 4; ++admitted) {
    capacity.Add(1);
    queue.NotifyChange();
    ASSERT_TRUE(WaitFor([&] {
      absl::MutexLock lock(&mu);
      return static_cast<int>(order.size()) == admitted;
    }));
  }
  for (std::thread& t : threads) t.join();
  EXPECT_THAT(order, ElementsAre("high", "mid", "low-1", "low-2"));
}

TEST(AdmissionTest, CancelAndClose) {
  AdmissionQueue queue({8, absl::Seconds(30)});
  std::atomic<bool> cancelled{false};
  absl::Status cancelled_status, closed_status;
  std::thread a([&] {
    cancelled_status = queue.Admit(
        0, absl::InfiniteFuture(), [] { return absl::ResourceExhaustedError("full"); }, &cancelled);
  });
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 1; }));
  std::thread b([&] {
    closed_status = queue.Admit(
        0, absl::InfiniteFuture(), [] { return absl::ResourceExhaustedError("full"); }, nullptr);
  });
  ASSERT_TRUE(WaitFor([&] { return queue.size() == 2; }));
  cancelled.store(true);
  queue.Wake();
  a.join();
  EXPECT_THAT(cancelled_status, StatusIs(absl::StatusCode::kCancelled));
  queue.Close();
  b.join();
  EXPECT_THAT(closed_status, StatusIs(absl::StatusCode::kUnavailable, HasSubstr("draining")));
  EXPECT_THAT(queue.Admit(
                  0, absl::InfiniteFuture(), [] { return absl::OkStatus(); }, nullptr),
              StatusIs(absl::StatusCode::kUnavailable));
}

TEST(AdmissionTest, RetryAfterRoundTrips) {
  absl::Status s = WithRetryAfter(absl::ResourceExhaustedError("x"), absl::Milliseconds(1234));
  EXPECT_THAT(RetryAfter(s), Optional(absl::Milliseconds(1234)));
  EXPECT_EQ(RetryAfter(absl::ResourceExhaustedError("x")), std::nullopt);
}

}  // namespace
}  // namespace dserve::router
