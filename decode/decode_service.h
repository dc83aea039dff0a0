// decode/decode_service.h: dserve.internal.v1.Decode over a DecodeScheduler,
// with gRPC's callback API: Reserve and Release answer when the scheduler
// thread has run them; Decode streams the scheduler's events with one write
// in flight, merging tokens that arrive while a write is pending; a
// cancelled call frees its blocks at once.
#ifndef DSERVE_DECODE_DECODE_SERVICE_H_
#define DSERVE_DECODE_DECODE_SERVICE_H_

#include "decode/decode_scheduler.h"
#include "dserve/internal/v1/worker.grpc.pb.h"

namespace dserve::decode {

class DecodeService final : public internal::v1::Decode::CallbackService {
 public:
  // `scheduler` must outlive the service.
  explicit DecodeService(DecodeScheduler* scheduler) : scheduler_(scheduler) {}

  grpc::ServerUnaryReactor* Reserve(grpc::CallbackServerContext* context,
                                    const internal::v1::ReserveRequest* request,
                                    internal::v1::ReserveResponse* response) override;
  grpc::ServerWriteReactor<internal::v1::DecodeResponse>* Decode(
      grpc::CallbackServerContext* context, const internal::v1::DecodeRequest* request) override;
  grpc::ServerUnaryReactor* Release(grpc::CallbackServerContext* context,
                                    const internal::v1::ReleaseRequest* request,
                                    internal::v1::ReleaseResponse* response) override;

 private:
  DecodeScheduler* const scheduler_;
};

}  // namespace dserve::decode

#endif  // DSERVE_DECODE_DECODE_SERVICE_H_
