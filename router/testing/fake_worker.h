// router/testing/fake_worker.h: a scripted stand-in for a prefill, decode
// or aggregated worker (a gRPC server on 127.0.0.1:0 with Decode, Prefill,
// WorkerLoad and the default health service) that records what it was
// asked, so router tests can isolate the router. Test-only.
#ifndef DSERVE_ROUTER_TESTING_FAKE_WORKER_H_
#define DSERVE_ROUTER_TESTING_FAKE_WORKER_H_

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "dserve/internal/v1/worker.grpc.pb.h"
#include "grpcpp/grpcpp.h"
#include "grpcpp/health_check_service_interface.h"
#include "gtest/gtest.h"

namespace dserve::router::testing {

namespace iv1 = ::dserve::internal::v1;

// FakeScript: how a fake worker answers.
struct FakeScript {
  iv1::WorkerRole role = iv1::WORKER_ROLE_DECODE;
  int64_t kv_blocks_total = 1000;
  int64_t kv_blocks_committed = 0;
  int32_t kv_block_tokens = 16;
  int64_t queued_prefill_tokens = 0;
  grpc::StatusCode reserve_code = grpc::StatusCode::OK;
  grpc::StatusCode prefill_code = grpc::StatusCode::OK;
  bool prefill_hold = false;  // Prefill waits until cancelled
  int32_t first_token = 'H';
  float first_logprob = -0.5f;
  std::vector<int32_t> decode_tokens;
  int tokens_per_message = 2;
  iv1::FinishReason finish = iv1::FINISH_REASON_LENGTH;
  bool decode_hold = false;  // after the tokens, wait until cancelled
  grpc::StatusCode decode_fail_code = grpc::StatusCode::OK;  // after the tokens
};

// Seen: what a fake worker was asked.
struct Seen {
  std::vector<iv1::ReserveRequest> reserves;
  std::vector<uint64_t> releases;
  std::vector<iv1::PrefillRequest> prefills;
  std::vector<iv1::DecodeRequest> decodes;
  int prefill_cancelled = 0;
  int decode_cancelled = 0;
  bool decode_had_deadline = false;
};

// FakeWorker: a gRPC server on 127.0.0.1:0 serving the worker RPCs from a
// script, with the default health service.
class FakeWorker {
 public:
  explicit FakeWorker(FakeScript script) : script_(std::move(script)) {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::ServerBuilder builder;
    int port = 0;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port);
    builder.RegisterService(&decode_);
    builder.RegisterService(&prefill_);
    builder.RegisterService(&load_);
    server_ = builder.BuildAndStart();
    EXPECT_NE(server_, nullptr);
    address_ = absl::StrCat("127.0.0.1:", port);
    SetHealthy(true);
  }
  ~FakeWorker() { Stop(); }

  // Stop shuts the server down (a worker that died). Idempotent.
  void Stop() {
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(1));
  }
  // Update changes the script; later calls and load reports follow it.
  void Update(const std::function<void(FakeScript&)>& change) {
    absl::MutexLock lock(&mu_);
    change(script_);
  }

  const std::string& address() const { return address_; }
  void SetHealthy(bool healthy) { server_->GetHealthCheckService()->SetServingStatus(healthy); }

  Seen seen() const {
    absl::MutexLock lock(&mu_);
    return seen_;
  }
  // WaitFor waits until `predicate` holds for what the worker saw.
  bool WaitFor(const std::function<bool(const Seen&)>& predicate,
               absl::Duration timeout = absl::Seconds(5)) const {
    absl::MutexLock lock(&mu_);
    auto holds = [&] { return predicate(seen_); };
    return mu_.AwaitWithTimeout(absl::Condition(&holds), timeout);
  }

 private:
  // WaitCancelled returns once the call is cancelled or the server stops.
  void WaitCancelled(grpc::ServerContext* context) {
    while (!context->IsCancelled()) {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Milliseconds(5))) return;
    }
  }

  class DecodeImpl : public iv1::Decode::Service {
   public:
    explicit DecodeImpl(FakeWorker* w) : w_(w) {}
    grpc::Status Reserve(grpc::ServerContext*, const iv1::ReserveRequest* request,
                         iv1::ReserveResponse* response) override {
      absl::MutexLock lock(&w_->mu_);
      w_->seen_.reserves.push_back(*request);
      if (w_->script_.reserve_code != grpc::StatusCode::OK) {
        return grpc::Status(w_->script_.reserve_code, "fake: no room");
      }
      const uint64_t id = w_->seen_.reserves.size();
      response->set_reservation_id(id);
      response->set_kv_target(absl::StrCat("target-", id));
      return grpc::Status::OK;
    }
    grpc::Status Release(grpc::ServerContext*, const iv1::ReleaseRequest* request,
                         iv1::ReleaseResponse*) override {
      absl::MutexLock lock(&w_->mu_);
      w_->seen_.releases.push_back(request->reservation_id());
      return grpc::Status::OK;
    }
    grpc::Status Decode(grpc::ServerContext* context, const iv1::DecodeRequest* request,
                        grpc::ServerWriter<iv1::DecodeResponse>* writer) override {
      FakeScript script;
      {
        absl::MutexLock lock(&w_->mu_);
        w_->seen_.decodes.push_back(*request);
        w_->seen_.decode_had_deadline =
            context->deadline() != std::chrono::system_clock::time_point::max();
        script = w_->script_;
      }
      const std::vector<int32_t>& tokens = script.decode_tokens;
      const bool finishes = !script.decode_hold && script.decode_fail_code == grpc::StatusCode::OK;
      size_t i = 0;
      do {
        iv1::DecodeResponse response;
        for (int k = 0; k < script.tokens_per_message && i < tokens.size(); ++k, ++i) {
          response.add_token_ids(tokens[i]);
          response.add_logprobs(-1.0f);
        }
        if (i == tokens.size() && finishes) response.set_finish_reason(script.finish);
        if (response.token_ids_size() == 0 && response.finish_reason() == 0) break;
        if (!writer->Write(response)) break;
      } while (i < tokens.size());
      if (script.decode_fail_code != grpc::StatusCode::OK) {
        return grpc::Status(script.decode_fail_code, "fake: decode worker failed");
      }
      if (script.decode_hold) {
        w_->WaitCancelled(context);
        absl::MutexLock lock(&w_->mu_);
        if (context->IsCancelled()) ++w_->seen_.decode_cancelled;
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      }
      return grpc::Status::OK;
    }

   private:
    FakeWorker* w_;
  };

  class PrefillImpl : public iv1::Prefill::Service {
   public:
    explicit PrefillImpl(FakeWorker* w) : w_(w) {}
    grpc::Status Prefill(grpc::ServerContext* context, const iv1::PrefillRequest* request,
                         iv1::PrefillResponse* response) override {
      FakeScript script;
      {
        absl::MutexLock lock(&w_->mu_);
        w_->seen_.prefills.push_back(*request);
        script = w_->script_;
      }
      if (script.prefill_hold) {
        w_->WaitCancelled(context);
        absl::MutexLock lock(&w_->mu_);
        if (context->IsCancelled()) ++w_->seen_.prefill_cancelled;
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      }
      if (script.prefill_code != grpc::StatusCode::OK) {
        return grpc::Status(script.prefill_code, "fake: prefill worker failed");
      }
      response->set_first_token(script.first_token);
      response->set_first_logprob(script.first_logprob);
      response->mutable_queue_time()->set_nanos(1'000'000);
      response->mutable_compute_time()->set_nanos(2'000'000);
      response->mutable_transfer_tail_time()->set_nanos(3'000'000);
      return grpc::Status::OK;
    }

   private:
    FakeWorker* w_;
  };

  class LoadImpl : public iv1::WorkerLoad::Service {
   public:
    explicit LoadImpl(FakeWorker* w) : w_(w) {}
    grpc::Status Watch(grpc::ServerContext* context, const iv1::WatchLoadRequest*,
                       grpc::ServerWriter<iv1::LoadReport>* writer) override {
      while (!context->IsCancelled()) {
        iv1::LoadReport report;
        {
          absl::MutexLock lock(&w_->mu_);
          const FakeScript& s = w_->script_;
          report.set_worker_id(w_->address_);
          report.set_role(s.role);
          report.set_kv_blocks_total(s.kv_blocks_total);
          report.set_kv_blocks_free(s.kv_blocks_total - s.kv_blocks_committed);
          report.set_kv_blocks_committed(s.kv_blocks_committed);
          report.set_running_requests(static_cast<int32_t>(w_->seen_.decodes.size()));
          report.set_kv_block_tokens(s.kv_block_tokens);
          report.set_queued_prefill_tokens(s.queued_prefill_tokens);
        }
        if (!writer->Write(report)) break;
        absl::MutexLock lock(&w_->mu_);
        if (w_->mu_.AwaitWithTimeout(absl::Condition(&w_->stopping_), absl::Milliseconds(20))) {
          break;
        }
      }
      return grpc::Status::OK;
    }

   private:
    FakeWorker* w_;
  };

  FakeScript script_;
  mutable absl::Mutex mu_;
  Seen seen_ ABSL_GUARDED_BY(mu_);
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  DecodeImpl decode_{this};
  PrefillImpl prefill_{this};
  LoadImpl load_{this};
  std::unique_ptr<grpc::Server> server_;
  std::string address_;
};

}  // namespace dserve::router::testing

#endif  // DSERVE_ROUTER_TESTING_FAKE_WORKER_H_
