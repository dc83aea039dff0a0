// services/worker_common.h: what the prefill and decode workers share: an
// engine whose KV pool lives in memory registered with the KV transport (so
// peers write and read blocks in place), the pool's layout as the transport
// sees it, and conversions between the worker RPCs' messages and the
// engine's types.
#ifndef DSERVE_SERVICES_WORKER_COMMON_H_
#define DSERVE_SERVICES_WORKER_COMMON_H_

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "dserve/config/v1/config.pb.h"
#include "dserve/internal/v1/worker.pb.h"
#include "engine/engine.h"
#include "kvtransfer/transport.h"

namespace dserve::services {

// WorkerEngine: an engine and the transport region holding its KV pool.
struct WorkerEngine {
  std::unique_ptr<kvtransfer::KvTransport> transport;
  kvtransfer::KvRegion region;
  std::unique_ptr<engine::Engine> engine;  // declared last: destroyed first
};

// LoadWorkerEngine creates the KV transport of `transport_config`, loads the
// model of `engine_config` with its pool in a region the transport
// allocated, and logs the transport's description.
absl::StatusOr<std::unique_ptr<WorkerEngine>> LoadWorkerEngine(
    const config::v1::EngineConfig& engine_config,
    const config::v1::TransportConfig& transport_config);

// KvLayoutOf: the engine pool's layout for the transport.
kvtransfer::KvPoolLayout KvLayoutOf(const engine::KvBlockPool& pool);

// SamplingFromProto / SamplingToProto: internal.v1.Sampling <-> the engine's
// parameters (max_tokens, stop ids and ignore_eos included).
engine::SamplingParams SamplingFromProto(const internal::v1::Sampling& sampling);
void SamplingToProto(const engine::SamplingParams& params, internal::v1::Sampling* out);

// FinishReasonToProto: the engine's finish reason on the wire.
internal::v1::FinishReason FinishReasonToProto(engine::FinishReason reason);

}  // namespace dserve::services

#endif  // DSERVE_SERVICES_WORKER_COMMON_H_
