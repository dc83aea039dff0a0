// tests/child_process.h: a child process for end-to-end tests: started with
// its stdout on a pipe (to read the "listening on" line and anything else it
// prints), killed with the test if the test dies (PR_SET_PDEATHSIG), and
// reaped by the destructor.
#ifndef DSERVE_TESTS_CHILD_PROCESS_H_
#define DSERVE_TESTS_CHILD_PROCESS_H_

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"

namespace dserve::testing {

class ChildProcess {
 public:
  // Start runs argv[0] with `argv`; its stdout comes back through ReadLine,
  // its stderr goes to the test's.
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Start(std::vector<std::string> argv) {
    int out[2];
    if (pipe2(out, O_CLOEXEC) != 0) return absl::InternalError("pipe2 failed");
    std::vector<char*> args;
    for (std::string& a : argv) args.push_back(a.data());
    args.push_back(nullptr);
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError("fork failed");
    if (pid == 0) {
      dup2(out[1], STDOUT_FILENO);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      execv(args[0], args.data());
      _exit(127);
    }
    close(out[1]);
    return std::unique_ptr<ChildProcess>(new ChildProcess(argv[0], pid, out[0]));
  }

  ~ChildProcess() {
    if (pid_ > 0) {
      kill(pid_, SIGKILL);
      Wait(absl::Seconds(10)).IgnoreError();
    }
    close(out_);
  }

  pid_t pid() const { return pid_; }

  // ReadLine: the next line on the child's stdout within `timeout`.
  absl::StatusOr<std::string> ReadLine(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (true) {
      if (size_t eol = buffer_.find('\n'); eol != std::string::npos) {
        std::string line = buffer_.substr(0, eol);
        buffer_.erase(0, eol + 1);
        return line;
      }
      const int64_t left_ms = absl::ToInt64Milliseconds(deadline - absl::Now());
      if (left_ms <= 0) return absl::DeadlineExceededError(absl::StrCat(name_, ": no line in time"));
      pollfd p{.fd = out_, .events = POLLIN, .revents = 0};
      if (poll(&p, 1, static_cast<int>(left_ms)) <= 0) continue;
      char chunk[4096];
      const ssize_t n = read(out_, chunk, sizeof chunk);
      if (n == 0) return absl::UnavailableError(absl::StrCat(name_, ": exited"));
      if (n > 0) buffer_.append(chunk, static_cast<size_t>(n));
    }
  }

  // WaitForListening reads lines until "<service> listening on ADDRESS" and
  // returns ADDRESS.
  absl::StatusOr<std::string> WaitForListening(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (true) {
      absl::StatusOr<std::string> line = ReadLine(deadline - absl::Now());
      if (!line.ok()) return line.status();
      if (size_t at = line->find(" listening on "); at != std::string::npos) {
        return line->substr(at + 14);
      }
    }
  }

  void Signal(int sig) {
    if (pid_ > 0) kill(pid_, sig);
  }

  // Wait reaps the child: its exit code, 128 + signal when killed, or
  // DEADLINE_EXCEEDED.
  absl::StatusOr<int> Wait(absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (pid_ > 0) {
      int status = 0;
      const pid_t r = waitpid(pid_, &status, WNOHANG);
      if (r == pid_) {
        pid_ = -1;
        return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      }
      if (absl::Now() >= deadline) return absl::DeadlineExceededError(name_ + " still running");
      absl::SleepFor(absl::Milliseconds(5));
    }
    return absl::FailedPreconditionError(name_ + " already reaped");
  }

 private:
  ChildProcess(std::string name, pid_t pid, int out) : name_(std::move(name)), pid_(pid), out_(out) {}
  std::string name_;
  pid_t pid_;
  int out_;
  std::string buffer_;
};

}  // namespace dserve::testing

#endif  // DSERVE_TESTS_CHILD_PROCESS_H_
