// services/config.cc: YAML/JSON -> protobuf JSON mapping -> config message,
// then defaults and range checks for each service's config.
#include "services/config.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "base/status_macros.h"
#include "google/protobuf/duration.pb.h"
#include "google/protobuf/util/json_util.h"
#include "google/protobuf/util/time_util.h"
#include "nlohmann/json.hpp"
#include "yaml-cpp/yaml.h"

namespace dserve::services {
namespace {

using config::v1::DecodeConfig;
using config::v1::EngineConfig;
using config::v1::MeshConfig;
using config::v1::PrefillConfig;
using config::v1::RouterConfig;
using config::v1::ServerConfig;
using config::v1::TransportConfig;
using config::v1::WorkerGroup;
using google::protobuf::Duration;
using google::protobuf::util::TimeUtil;

// ---------------------------------------------------------------------------
// YAML -> JSON

// ScalarToJson types an unquoted YAML scalar the way JSON would read it
// (numbers, true/false, null); everything else, and every quoted scalar, is a
// string. Protobuf's JSON parser accepts numeric strings for numeric fields,
// so `kv_block_tokens: "16"` works too; a string field given an unquoted
// number (`worker_id: 7`) is a type error, as it is in JSON.
nlohmann::json ScalarToJson(const YAML::Node& node) {
  const std::string& text = node.Scalar();
  // "!" is yaml-cpp's tag for a quoted scalar, "?" for a plain one.
  if (node.Tag() != "?") return text;
  if (text == "true") return true;
  if (text == "false") return false;
  if (text.empty() || text == "~" || text == "null" || text == "Null" || text == "NULL") {
    return nullptr;
  }
  static const std::regex kJsonNumber(R"(-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?)");
  if (std::regex_match(text, kJsonNumber)) {
    // Out of double's range (1e999) parses as "discarded": keep the text.
    nlohmann::json number = nlohmann::json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (!number.is_discarded()) return number;
  }
  return text;
}

// YamlToJson converts a YAML node tree to JSON: maps -> objects (string
// keys, no duplicates), sequences -> arrays, scalars by ScalarToJson.
absl::StatusOr<nlohmann::json> YamlToJson(const YAML::Node& node) {
  auto error_at = [](const YAML::Node& where, const std::string& what) {
    const YAML::Mark mark = where.Mark();
    return absl::InvalidArgumentError(
        absl::StrCat(mark.line + 1, ":", mark.column + 1, ": ", what));
  };
  switch (node.Type()) {
    case YAML::NodeType::Undefined:
    case YAML::NodeType::Null:
      return nlohmann::json(nullptr);
    case YAML::NodeType::Scalar:
      return ScalarToJson(node);
    case YAML::NodeType::Sequence: {
      nlohmann::json out = nlohmann::json::array();
      for (const YAML::Node& item : node) {
        DSERVE_ASSIGN_OR_RETURN(nlohmann::json value, YamlToJson(item));
        out.push_back(std::move(value));
      }
      return out;
    }
    case YAML::NodeType::Map: {
      nlohmann::json out = nlohmann::json::object();
      for (const auto& kv : node) {
        if (!kv.first.IsScalar()) return error_at(kv.first, "mapping keys must be scalars");
        const std::string& key = kv.first.Scalar();
        if (out.contains(key)) {
          return error_at(kv.first, absl::StrCat("duplicate key \"", key, "\""));
        }
        DSERVE_ASSIGN_OR_RETURN(out[key], YamlToJson(kv.second));
      }
      return out;
    }
  }
  return error_at(node, "unsupported YAML node");
}

// ---------------------------------------------------------------------------
// Validation helpers. `path` is the field's path from the message root, in
// proto field names ("prefill.engine.kv_block_tokens").

absl::Status CheckRange(int64_t value, int64_t lo, int64_t hi, const std::string& path) {
  if (value >= lo && value <= hi) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(path, " must be in [", lo, ", ", hi, "], got ", value));
}

template <size_t N>
absl::Status CheckOneOf(const std::string& value, const char* const (&allowed)[N],
                        const std::string& path) {
  for (const char* a : allowed) {
    if (value == a) return absl::OkStatus();
  }
  return absl::InvalidArgumentError(absl::StrCat(
      path, " must be one of {", absl::StrJoin(allowed, ", "), "}, got \"", value, "\""));
}

// CheckHostPort accepts "host:port" and "[v6]:port" with a non-empty host
// and the port in [min_port, 65535].
absl::Status CheckHostPort(const std::string& value, int min_port, const std::string& path) {
  auto bad = [&] {
    return absl::InvalidArgumentError(absl::StrCat(path, " must be host:port with port in [",
                                                   min_port, ", 65535], got \"", value, "\""));
  };
  const size_t colon = value.rfind(':');
  if (colon == std::string::npos || colon == 0) return bad();
  const std::string_view host = std::string_view(value).substr(0, colon);
  const std::string_view port_text = std::string_view(value).substr(colon + 1);
  const bool bracketed = host.front() == '[';
  if (bracketed ? (host.size() < 3 || host.back() != ']') : host.find(':') != host.npos) {
    return bad();
  }
  int port = -1;
  if (port_text.empty() || port_text.find_first_not_of("0123456789") != port_text.npos ||
      !absl::SimpleAtoi(absl::string_view(port_text.data(), port_text.size()), &port) ||
      port < min_port || port > 65535) {
    return bad();
  }
  return absl::OkStatus();
}

// CheckPositive: a Duration that is present must be > 0 (an absent one has
// been defaulted before the check).
absl::Status CheckPositive(const Duration& d, const std::string& path) {
  if (d.seconds() > 0 || (d.seconds() == 0 && d.nanos() > 0)) return absl::OkStatus();
  return absl::InvalidArgumentError(
      absl::StrCat(path, " must be positive, got ", TimeUtil::ToString(d)));
}

// The accepted names of each choice. A new router placement policy adds
// its config name to kRouterPolicies.
constexpr const char* kMatmulBackends[] = {"cpu", "openblas", "reference"};
constexpr const char* kTransportKinds[] = {"tcp", "shm", "auto"};
constexpr const char* kRouterPolicies[] = {"least-loaded"};

constexpr int64_t kMiB = 1 << 20;

Duration Seconds(int64_t s) { return TimeUtil::SecondsToDuration(s); }
Duration Millis(int64_t ms) { return TimeUtil::MillisecondsToDuration(ms); }

// ---------------------------------------------------------------------------
// Per-message finalizers; `p` is the path prefix of the message ("" or
// "prefill.").

absl::Status FinalizeServer(ServerConfig& c, const std::string& p) {
  if (c.listen().empty()) c.set_listen("127.0.0.1:0");
  DSERVE_RETURN_IF_ERROR(CheckHostPort(c.listen(), 0, p + "listen"));
  if (!c.has_drain_timeout()) *c.mutable_drain_timeout() = Seconds(10);
  DSERVE_RETURN_IF_ERROR(CheckPositive(c.drain_timeout(), p + "drain_timeout"));
  if (c.max_message_bytes() == 0) c.set_max_message_bytes(4 * kMiB);
  return CheckRange(c.max_message_bytes(), 1 << 10, 1 << 30, p + "max_message_bytes");
}

absl::Status FinalizeEngine(EngineConfig& c, const std::string& p) {
  if (c.matmul_backend().empty()) c.set_matmul_backend("openblas");
  DSERVE_RETURN_IF_ERROR(CheckOneOf(c.matmul_backend(), kMatmulBackends, p + "matmul_backend"));
  if (c.kv_block_tokens() == 0) c.set_kv_block_tokens(16);
  DSERVE_RETURN_IF_ERROR(CheckRange(c.kv_block_tokens(), 1, 1024, p + "kv_block_tokens"));
  if (c.kv_cache_tokens() == 0) c.set_kv_cache_tokens(65536);
  DSERVE_RETURN_IF_ERROR(CheckRange(c.kv_cache_tokens(), c.kv_block_tokens(), int64_t{1} << 31,
                                    p + "kv_cache_tokens"));
  if (c.max_step_tokens() == 0) c.set_max_step_tokens(2048);
  DSERVE_RETURN_IF_ERROR(CheckRange(c.max_step_tokens(), 1, 1 << 20, p + "max_step_tokens"));
  if (c.max_batch() == 0) c.set_max_batch(256);
  return CheckRange(c.max_batch(), 1, 65536, p + "max_batch");
}

absl::Status FinalizeTransport(TransportConfig& c, const std::string& p) {
  if (c.kind().empty()) c.set_kind("shm");
  DSERVE_RETURN_IF_ERROR(CheckOneOf(c.kind(), kTransportKinds, p + "kind"));
  if (!c.has_peer_timeout()) *c.mutable_peer_timeout() = Seconds(2);
  DSERVE_RETURN_IF_ERROR(CheckPositive(c.peer_timeout(), p + "peer_timeout"));
  if (!c.has_heartbeat_interval()) *c.mutable_heartbeat_interval() = Millis(100);
  DSERVE_RETURN_IF_ERROR(CheckPositive(c.heartbeat_interval(), p + "heartbeat_interval"));
  if (c.heartbeat_interval() >= c.peer_timeout()) {
    return absl::InvalidArgumentError(absl::StrCat(p, "heartbeat_interval must be less than ", p,
                                                   "peer_timeout (",
                                                   TimeUtil::ToString(c.peer_timeout()), "), got ",
                                                   TimeUtil::ToString(c.heartbeat_interval())));
  }
  return absl::OkStatus();
}

absl::Status FinalizeWorkerGroup(WorkerGroup& c, const std::string& p) {
  for (int i = 0; i < c.addresses_size(); ++i) {
    DSERVE_RETURN_IF_ERROR(CheckHostPort(c.addresses(i), 1, absl::StrCat(p, "addresses[", i, "]")));
  }
  if (!c.dns_name().empty()) {
    DSERVE_RETURN_IF_ERROR(CheckHostPort(c.dns_name(), 1, p + "dns_name"));
  }
  if (!c.has_resolve_interval()) *c.mutable_resolve_interval() = Seconds(5);
  return CheckPositive(c.resolve_interval(), p + "resolve_interval");
}

// FinalizeWorker: what prefill and decode configs share (their messages name
// these fields alike).
template <typename WorkerConfig>
absl::Status FinalizeWorker(WorkerConfig& c, const std::string& p) {
  DSERVE_RETURN_IF_ERROR(FinalizeServer(*c.mutable_server(), p + "server."));
  DSERVE_RETURN_IF_ERROR(FinalizeEngine(*c.mutable_engine(), p + "engine."));
  DSERVE_RETURN_IF_ERROR(FinalizeTransport(*c.mutable_transport(), p + "transport."));
  if (c.max_queued_requests() == 0) c.set_max_queued_requests(256);
  DSERVE_RETURN_IF_ERROR(
      CheckRange(c.max_queued_requests(), 1, 1 << 20, p + "max_queued_requests"));
  if (!c.has_load_report_interval()) *c.mutable_load_report_interval() = Millis(100);
  return CheckPositive(c.load_report_interval(), p + "load_report_interval");
}

absl::Status FinalizePrefill(PrefillConfig& c, const std::string& p) {
  return FinalizeWorker(c, p);
}

absl::Status FinalizeDecode(DecodeConfig& c, const std::string& p) {
  DSERVE_RETURN_IF_ERROR(FinalizeWorker(c, p));
  if (!c.has_reservation_ttl()) *c.mutable_reservation_ttl() = Seconds(30);
  return CheckPositive(c.reservation_ttl(), p + "reservation_ttl");
}

absl::Status FinalizeRouter(RouterConfig& c, const std::string& p) {
  DSERVE_RETURN_IF_ERROR(FinalizeServer(*c.mutable_server(), p + "server."));
  DSERVE_RETURN_IF_ERROR(FinalizeWorkerGroup(*c.mutable_prefill_workers(), p + "prefill_workers."));
  DSERVE_RETURN_IF_ERROR(FinalizeWorkerGroup(*c.mutable_decode_workers(), p + "decode_workers."));
  if (c.policy().empty()) c.set_policy("least-loaded");
  DSERVE_RETURN_IF_ERROR(CheckOneOf(c.policy(), kRouterPolicies, p + "policy"));
  if (c.max_queued_requests() == 0) c.set_max_queued_requests(1024);
  DSERVE_RETURN_IF_ERROR(
      CheckRange(c.max_queued_requests(), 1, 1 << 20, p + "max_queued_requests"));
  if (!c.has_queue_timeout()) *c.mutable_queue_timeout() = Seconds(30);
  DSERVE_RETURN_IF_ERROR(CheckPositive(c.queue_timeout(), p + "queue_timeout"));
  if (c.default_max_tokens() == 0) c.set_default_max_tokens(256);
  DSERVE_RETURN_IF_ERROR(CheckRange(c.default_max_tokens(), 1, 1 << 20, p + "default_max_tokens"));
  if (!c.has_health_check_interval()) *c.mutable_health_check_interval() = Millis(500);
  DSERVE_RETURN_IF_ERROR(CheckPositive(c.health_check_interval(), p + "health_check_interval"));
  // proto3 cannot tell an explicit 0 from an absent field, so 0 means the
  // default (one retry); there is no way to ask for none.
  if (c.prefill_retries() == 0) c.set_prefill_retries(1);
  return CheckRange(c.prefill_retries(), 0, 64, p + "prefill_retries");
}

}  // namespace

absl::Status ParseConfigText(std::string_view text, std::string_view origin,
                             google::protobuf::Message* message) {
  const absl::string_view where(origin.data(), origin.size());
  message->Clear();
  std::vector<YAML::Node> docs;
  try {
    docs = YAML::LoadAll(std::string(text));
  } catch (const YAML::Exception& e) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ":", e.mark.line + 1, ":", e.mark.column + 1, ": ", e.msg));
  }
  if (docs.size() > 1) {
    return absl::InvalidArgumentError(
        absl::StrCat(where, ": expected one YAML document, got ", docs.size()));
  }
  if (docs.empty() || docs[0].IsNull()) return absl::OkStatus();
  if (!docs[0].IsMap()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": expected a mapping at the top level"));
  }
  absl::StatusOr<nlohmann::json> json = YamlToJson(docs[0]);
  if (!json.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ":", json.status().message()));
  }
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto status = google::protobuf::util::JsonStringToMessage(json->dump(), message, options);
  if (!status.ok()) {
    // Protobuf's message reads "(engine.kv_block_tokens): invalid value ..."
    // or "(engine) foo: Cannot find field.": it already names the field path.
    return absl::InvalidArgumentError(absl::StrCat(where, ": ", status.message().as_string()));
  }
  return absl::OkStatus();
}

absl::Status LoadConfigFile(const std::string& path, google::protobuf::Message* message) {
  auto unreadable = [&path] {
    return absl::NotFoundError(
        absl::StrCat("config file ", path, ": cannot read: ", std::strerror(errno)));
  };
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return unreadable();
  std::string text;
  char buffer[1 << 14];
  ssize_t n;
  while ((n = ::read(fd, buffer, sizeof(buffer))) != 0) {
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {  // e.g. EISDIR
      absl::Status status = unreadable();
      ::close(fd);
      return status;
    }
    text.append(buffer, static_cast<size_t>(n));
  }
  ::close(fd);
  return ParseConfigText(text, path, message);
}

absl::Status RequireModelDir(const std::string& model_dir, std::string_view field) {
  if (!model_dir.empty()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(absl::string_view(field.data(), field.size()),
                                                 " must be set (in the config or with --model)"));
}

absl::Status Finalize(PrefillConfig& config) { return FinalizePrefill(config, ""); }
absl::Status Finalize(DecodeConfig& config) { return FinalizeDecode(config, ""); }
absl::Status Finalize(RouterConfig& config) { return FinalizeRouter(config, ""); }

absl::Status Finalize(MeshConfig& config) {
  const bool aggregated = config.aggregated_workers() > 0;
  if (aggregated && (config.prefill_workers() > 0 || config.decode_workers() > 0)) {
    return absl::InvalidArgumentError(
        absl::StrCat("aggregated_workers (", config.aggregated_workers(),
                     ") excludes prefill_workers and decode_workers, got ",
                     config.prefill_workers(), " and ", config.decode_workers()));
  }
  if (!aggregated) {
    if (config.prefill_workers() == 0) config.set_prefill_workers(1);
    if (config.decode_workers() == 0) config.set_decode_workers(1);
  }
  DSERVE_RETURN_IF_ERROR(CheckRange(config.prefill_workers(), 0, 64, "prefill_workers"));
  DSERVE_RETURN_IF_ERROR(CheckRange(config.decode_workers(), 0, 64, "decode_workers"));
  DSERVE_RETURN_IF_ERROR(CheckRange(config.aggregated_workers(), 0, 64, "aggregated_workers"));
  if (config.decode_workers() + config.aggregated_workers() < 1) {
    return absl::InvalidArgumentError(
        "decode_workers + aggregated_workers must be at least 1, got 0");
  }
  if (!config.has_startup_timeout()) *config.mutable_startup_timeout() = Seconds(60);
  DSERVE_RETURN_IF_ERROR(CheckPositive(config.startup_timeout(), "startup_timeout"));
  for (std::string* dir : {config.mutable_router()->mutable_model_dir(),
                           config.mutable_prefill()->mutable_engine()->mutable_model_dir(),
                           config.mutable_decode()->mutable_engine()->mutable_model_dir()}) {
    if (dir->empty()) *dir = config.model_dir();
  }
  DSERVE_RETURN_IF_ERROR(FinalizeRouter(*config.mutable_router(), "router."));
  DSERVE_RETURN_IF_ERROR(FinalizePrefill(*config.mutable_prefill(), "prefill."));
  return FinalizeDecode(*config.mutable_decode(), "decode.");
}

}  // namespace dserve::services
