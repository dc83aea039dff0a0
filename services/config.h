// services/config.h: loading the services' config messages
// (protos/dserve/config/v1/config.proto) from YAML or JSON through the
// protobuf JSON mapping, filling defaults and validating with errors that
// name the field (e.g. "decode.engine.kv_block_tokens must be in [1, 1024], got 0").
#ifndef DSERVE_SERVICES_CONFIG_H_
#define DSERVE_SERVICES_CONFIG_H_

#include <string>
#include <string_view>

#include "absl/status/status.h"
#include "dserve/config/v1/config.pb.h"
#include "google/protobuf/message.h"

namespace dserve::services {

// ParseConfigText parses YAML or JSON text (JSON is YAML) into `message`
// with the protobuf JSON mapping (field names in lowerCamelCase or as
// written in the proto; durations as "1.5s"). Unquoted YAML scalars read as
// JSON would (numbers, true/false, null); quoted ones are strings, so a
// numeric-looking string field needs quotes (worker_id: "7"). Clears
// `message` first; an empty document leaves it empty. Unknown fields and
// wrong types are INVALID_ARGUMENT naming the field path; YAML syntax errors
// give "origin:line:column". `origin` (a file name) prefixes the message.
absl::Status ParseConfigText(std::string_view text, std::string_view origin,
                             google::protobuf::Message* message);
// LoadConfigFile reads `path` and parses it as above; NOT_FOUND when it
// cannot be read.
absl::Status LoadConfigFile(const std::string& path, google::protobuf::Message* message);

// Finalize fills every unset field with its documented default (see the
// proto comments) and validates ranges, returning INVALID_ARGUMENT naming
// the first bad field by its path from the message root and the limit
// ("engine.kv_block_tokens must be in [1, 1024], got 2048"). Idempotent.
// As in proto3, a zero number or an empty string means "unset" and takes the
// default (so RouterConfig.prefill_retries cannot be set to 0); a Duration
// that is present must be positive.
// Finalize does not check model_dir: binaries apply a --model override after
// loading and then call RequireModelDir.
// For a MeshConfig it also finalizes router, prefill and decode (errors
// prefixed "router.", "prefill.", "decode.") after copying the mesh's
// model_dir into their empty model_dir fields. An aggregated mesh
// (aggregated_workers > 0) has no prefill or decode workers: setting those
// counts as well is INVALID_ARGUMENT naming aggregated_workers.
absl::Status Finalize(config::v1::PrefillConfig& config);
absl::Status Finalize(config::v1::DecodeConfig& config);
absl::Status Finalize(config::v1::RouterConfig& config);
absl::Status Finalize(config::v1::MeshConfig& config);

// RequireModelDir is INVALID_ARGUMENT naming `field` (e.g.
// "engine.model_dir") when `model_dir` is empty.
absl::Status RequireModelDir(const std::string& model_dir, std::string_view field);

}  // namespace dserve::services

#endif  // DSERVE_SERVICES_CONFIG_H_
