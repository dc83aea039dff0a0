// prefill/prefill_service.h: dserve.internal.v1.Prefill over a
// PrefillScheduler (gRPC callback API). The call answers once the prompt's
// KV is committed into the decode worker's blocks; cancelling it aborts the
// transfer.
#ifndef DSERVE_PREFILL_PREFILL_SERVICE_H_
#define DSERVE_PREFILL_PREFILL_SERVICE_H_

#include "dserve/internal/v1/worker.grpc.pb.h"
#include "prefill/prefill_scheduler.h"

namespace dserve::prefill {

class PrefillService final : public internal::v1::Prefill::CallbackService {
 public:
  // `scheduler` must outlive the service.
  explicit PrefillService(PrefillScheduler* scheduler) : scheduler_(scheduler) {}

  grpc::ServerUnaryReactor* Prefill(grpc::CallbackServerContext* context,
                                    const internal::v1::PrefillRequest* request,
                                    internal::v1::PrefillResponse* response) override;

 private:
  PrefillScheduler* const scheduler_;
};

}  // namespace dserve::prefill

#endif  // DSERVE_PREFILL_PREFILL_SERVICE_H_
