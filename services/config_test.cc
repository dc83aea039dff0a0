// services/config_test.cc: parsing (YAML, JSON, errors), defaults and
// validation of the services' config messages.
#include "services/config.h"

#include <cstdlib>
#include <string>

#include "base/status_matchers.h"
#include "google/protobuf/util/message_differencer.h"
#include "google/protobuf/util/time_util.h"
#include "gtest/gtest.h"

namespace dserve::services {
namespace {

using config::v1::DecodeConfig;
using config::v1::MeshConfig;
using config::v1::PrefillConfig;
using config::v1::RouterConfig;
using ::dserve::testing::StatusIs;
using ::google::protobuf::util::MessageDifferencer;
using ::google::protobuf::util::TimeUtil;
using ::testing::AllOf;
using ::testing::HasSubstr;

constexpr absl::StatusCode kInvalid = absl::StatusCode::kInvalidArgument;

TEST(ParseConfigTextTest, YamlAndJsonGiveTheSameMessage) {
  const char* yaml = R"(
worker_id: "7"
server:
  listen: "127.0.0.1:5000"
  drain_timeout: 1.5s
engine:
  modelDir: /models/tiny
  kv_block_tokens: 32
  kvCacheTokens: "4096"
aggregated: true
reservation_ttl: 0.25s
)";
  const char* json = R"({
  "workerId": "7",
  "server": {"listen": "127.0.0.1:5000", "drainTimeout": "1.5s"},
  "engine": {"model_dir": "/models/tiny", "kvBlockTokens": 32, "kv_cache_tokens": 4096},
  "aggregated": true,
  "reservationTtl": "0.250s"
})";
  DecodeConfig from_yaml, from_json;
  ASSERT_OK(ParseConfigText(yaml, "a.yaml", &from_yaml));
  ASSERT_OK(ParseConfigText(json, "a.json", &from_json));
  EXPECT_TRUE(MessageDifferencer::Equals(from_yaml, from_json))
      << from_yaml.DebugString() << "\nvs\n"
      << from_json.DebugString();
  EXPECT_EQ(from_yaml.worker_id(), "7");
  EXPECT_EQ(from_yaml.engine().kv_cache_tokens(), 4096);
  EXPECT_TRUE(from_yaml.aggregated());
  EXPECT_EQ(TimeUtil::DurationToMilliseconds(from_yaml.server().drain_timeout()), 1500);
  EXPECT_EQ(TimeUtil::DurationToMilliseconds(from_yaml.reservation_ttl()), 250);
}

TEST(ParseConfigTextTest, EmptyDocumentIsAnEmptyMessage) {
  RouterConfig config;
  config.set_policy("stale");
  ASSERT_OK(ParseConfigText("", "empty.yaml", &config));
  EXPECT_EQ(config.ByteSizeLong(), 0u);
  ASSERT_OK(ParseConfigText("# only a comment\n", "comment.yaml", &config));
  EXPECT_EQ(config.ByteSizeLong(), 0u);
}

TEST(ParseConfigTextTest, DurationMustBeProtobufForm) {
  PrefillConfig config;
  ASSERT_OK(ParseConfigText("load_report_interval: 0.000001s", "x", &config));
  EXPECT_EQ(TimeUtil::DurationToMicroseconds(config.load_report_interval()), 1);
  EXPECT_THAT(ParseConfigText("load_report_interval: 100ms", "x", &config),
              StatusIs(kInvalid, HasSubstr("load_report_interval")));
  EXPECT_THAT(ParseConfigText("load_report_interval: 5", "x", &config),
              StatusIs(kInvalid, HasSubstr("load_report_interval")));
}

TEST(ParseConfigTextTest, UnknownFieldIsNamed) {
  PrefillConfig config;
  EXPECT_THAT(ParseConfigText("engine:\n  kv_blocks: 4\n", "prefill.yaml", &config),
              StatusIs(kInvalid, AllOf(HasSubstr("prefill.yaml: "), HasSubstr("engine"),
                                       HasSubstr("kv_blocks"))));
}

TEST(ParseConfigTextTest, WrongTypeIsNamed) {
  PrefillConfig config;
  EXPECT_THAT(ParseConfigText("engine:\n  max_batch: lots\n", "p.yaml", &config),
              StatusIs(kInvalid, HasSubstr("engine.max_batch")));
  EXPECT_THAT(ParseConfigText("engine: 5\n", "p.yaml", &config),
              StatusIs(kInvalid, HasSubstr("engine")));
  // An unquoted number is a number, as in JSON: string fields need quotes.
  EXPECT_THAT(ParseConfigText("worker_id: 7\n", "p.yaml", &config),
              StatusIs(kInvalid, HasSubstr("worker_id")));
  EXPECT_THAT(ParseConfigText("engine: {kv_cache_tokens: 1e999}\n", "p.yaml", &config),
              StatusIs(kInvalid, HasSubstr("engine.kv_cache_tokens")));
  EXPECT_THAT(ParseConfigText("- a\n- b\n", "p.yaml", &config),
              StatusIs(kInvalid, HasSubstr("mapping")));
}

TEST(ParseConfigTextTest, YamlSyntaxErrorHasLineAndColumn) {
  RouterConfig config;
  EXPECT_THAT(
      ParseConfigText("policy: least-loaded\nserver:\n  listen: [oops\n", "r.yaml", &config),
      StatusIs(kInvalid, HasSubstr("r.yaml:4:")));
  EXPECT_THAT(ParseConfigText("policy: a\npolicy: b\n", "r.yaml", &config),
              StatusIs(kInvalid, HasSubstr("r.yaml:2:1: duplicate key \"policy\"")));
}

TEST(LoadConfigFileTest, MissingFileIsNotFound) {
  RouterConfig config;
  EXPECT_THAT(LoadConfigFile("/nonexistent/dserve.yaml", &config),
              StatusIs(absl::StatusCode::kNotFound,
                       HasSubstr("config file /nonexistent/dserve.yaml: cannot read")));
  EXPECT_THAT(LoadConfigFile("/", &config), StatusIs(absl::StatusCode::kNotFound));
}

TEST(FinalizeTest, EveryDefaultIsApplied) {
  PrefillConfig prefill;
  ASSERT_OK(Finalize(prefill));
  EXPECT_EQ(prefill.server().listen(), "127.0.0.1:0");
  EXPECT_EQ(TimeUtil::DurationToSeconds(prefill.server().drain_timeout()), 10);
  EXPECT_EQ(prefill.server().max_message_bytes(), 4 << 20);
  EXPECT_EQ(prefill.engine().matmul_backend(), "openblas");
  EXPECT_EQ(prefill.engine().kv_block_tokens(), 16);
  EXPECT_EQ(prefill.engine().kv_cache_tokens(), 65536);
  EXPECT_EQ(prefill.engine().max_step_tokens(), 2048);
  EXPECT_EQ(prefill.engine().max_batch(), 256);
  EXPECT_EQ(prefill.transport().kind(), "shm");
  EXPECT_EQ(TimeUtil::DurationToSeconds(prefill.transport().peer_timeout()), 2);
  EXPECT_EQ(TimeUtil::DurationToMilliseconds(prefill.transport().heartbeat_interval()), 100);
  EXPECT_EQ(prefill.max_queued_requests(), 256);
  EXPECT_EQ(TimeUtil::DurationToMilliseconds(prefill.load_report_interval()), 100);

  DecodeConfig decode;
  ASSERT_OK(Finalize(decode));
  EXPECT_EQ(decode.max_queued_requests(), 256);
  EXPECT_EQ(TimeUtil::DurationToSeconds(decode.reservation_ttl()), 30);
  EXPECT_EQ(TimeUtil::DurationToMilliseconds(decode.load_report_interval()), 100);
  EXPECT_EQ(decode.engine().kv_block_tokens(), 16);

  RouterConfig router;
  ASSERT_OK(Finalize(router));
  EXPECT_EQ(router.server().listen(), "127.0.0.1:0");
  EXPECT_EQ(router.policy(), "least-loaded");
  EXPECT_EQ(router.max_queued_requests(), 1024);
  EXPECT_EQ(TimeUtil::DurationToSeconds(router.queue_timeout()), 30);
  EXPECT_EQ(router.default_max_tokens(), 256);
  EXPECT_EQ(TimeUtil::DurationToMilliseconds(router.health_check_interval()), 500);
  EXPECT_EQ(router.prefill_retries(), 1);
  EXPECT_EQ(TimeUtil::DurationToSeconds(router.prefill_workers().resolve_interval()), 5);
  EXPECT_EQ(TimeUtil::DurationToSeconds(router.decode_workers().resolve_interval()), 5);

  MeshConfig mesh;
  ASSERT_OK(Finalize(mesh));
  EXPECT_EQ(mesh.prefill_workers(), 1);
  EXPECT_EQ(mesh.decode_workers(), 1);
  EXPECT_EQ(mesh.aggregated_workers(), 0);
  EXPECT_EQ(TimeUtil::DurationToSeconds(mesh.startup_timeout()), 60);
  EXPECT_EQ(mesh.router().policy(), "least-loaded");
  EXPECT_EQ(mesh.prefill().engine().kv_block_tokens(), 16);
  EXPECT_EQ(mesh.decode().max_queued_requests(), 256);
}

TEST(FinalizeTest, IsIdempotentAndKeepsGivenValues) {
  DecodeConfig config;
  ASSERT_OK(ParseConfigText("engine: {kv_block_tokens: 64, max_batch: 8}\n", "d", &config));
  ASSERT_OK(Finalize(config));
  DecodeConfig again = config;
  ASSERT_OK(Finalize(again));
  EXPECT_TRUE(MessageDifferencer::Equals(config, again));
  EXPECT_EQ(config.engine().kv_block_tokens(), 64);
  EXPECT_EQ(config.engine().max_batch(), 8);
}

// FinalizeText parses `yaml` into a T and finalizes it.
template <typename T>
absl::Status FinalizeText(const std::string& yaml) {
  T config;
  absl::Status status = ParseConfigText(yaml, "test.yaml", &config);
  if (!status.ok()) return status;
  return Finalize(config);
}

TEST(FinalizeTest, ValidationNamesTheFieldAndTheLimit) {
  EXPECT_THAT(
      FinalizeText<PrefillConfig>("engine: {kv_block_tokens: 2048}"),
      StatusIs(kInvalid, HasSubstr("engine.kv_block_tokens must be in [1, 1024], got 2048")));
  EXPECT_THAT(FinalizeText<PrefillConfig>("engine: {kv_block_tokens: -1}"),
              StatusIs(kInvalid, HasSubstr("engine.kv_block_tokens")));
  EXPECT_THAT(FinalizeText<DecodeConfig>("engine: {kv_block_tokens: 64, kv_cache_tokens: 32}"),
              StatusIs(kInvalid, HasSubstr("engine.kv_cache_tokens must be in [64,")));
  EXPECT_THAT(FinalizeText<DecodeConfig>("engine: {max_step_tokens: 2000000}"),
              StatusIs(kInvalid, HasSubstr("engine.max_step_tokens")));
  EXPECT_THAT(FinalizeText<DecodeConfig>("engine: {max_batch: 100000}"),
              StatusIs(kInvalid, HasSubstr("engine.max_batch must be in [1, 65536]")));
  EXPECT_THAT(FinalizeText<DecodeConfig>("engine: {matmul_backend: cuda}"),
              StatusIs(kInvalid, HasSubstr("engine.matmul_backend must be one of")));
  EXPECT_THAT(FinalizeText<DecodeConfig>("transport: {kind: rdma}"),
              StatusIs(kInvalid, HasSubstr("transport.kind")));
  EXPECT_THAT(FinalizeText<DecodeConfig>("transport: {peer_timeout: 1s, heartbeat_interval: 1s}"),
              StatusIs(kInvalid, HasSubstr("transport.heartbeat_interval must be less than")));
  EXPECT_THAT(FinalizeText<DecodeConfig>("reservation_ttl: 0s"),
              StatusIs(kInvalid, HasSubstr("reservation_ttl must be positive")));
  EXPECT_THAT(FinalizeText<DecodeConfig>("max_queued_requests: -3"),
              StatusIs(kInvalid, HasSubstr("max_queued_requests")));
  EXPECT_THAT(
      FinalizeText<RouterConfig>("server: {listen: 127.0.0.1:70000}"),
      StatusIs(kInvalid, HasSubstr("server.listen must be host:port with port in [0, 65535]")));
  EXPECT_THAT(FinalizeText<RouterConfig>("server: {listen: localhost}"),
              StatusIs(kInvalid, HasSubstr("server.listen")));
  EXPECT_THAT(
      FinalizeText<RouterConfig>("server: {max_message_bytes: 100}"),
      StatusIs(kInvalid, HasSubstr("server.max_message_bytes must be in [1024, 1073741824]")));
  EXPECT_THAT(FinalizeText<RouterConfig>("server: {drain_timeout: -1s}"),
              StatusIs(kInvalid, HasSubstr("server.drain_timeout")));
  EXPECT_THAT(FinalizeText<RouterConfig>("policy: random"),
              StatusIs(kInvalid, HasSubstr("policy must be one of {least-loaded}")));
  EXPECT_THAT(FinalizeText<RouterConfig>("decode_workers: {addresses: [\"127.0.0.1:1\", nohost]}"),
              StatusIs(kInvalid, HasSubstr("decode_workers.addresses[1]")));
  EXPECT_THAT(FinalizeText<RouterConfig>("prefill_workers: {addresses: [\"127.0.0.1:0\"]}"),
              StatusIs(kInvalid, HasSubstr("prefill_workers.addresses[0]")));
  EXPECT_THAT(FinalizeText<RouterConfig>("prefill_retries: 100"),
              StatusIs(kInvalid, HasSubstr("prefill_retries")));
  EXPECT_THAT(FinalizeText<MeshConfig>("decode: {engine: {kv_block_tokens: 4096}}"),
              StatusIs(kInvalid, HasSubstr("decode.engine.kv_block_tokens")));
  EXPECT_THAT(FinalizeText<MeshConfig>("router: {policy: nope}"),
              StatusIs(kInvalid, HasSubstr("router.policy")));
  EXPECT_THAT(FinalizeText<MeshConfig>("prefill_workers: 65"),
              StatusIs(kInvalid, HasSubstr("prefill_workers must be in [0, 64]")));
  EXPECT_THAT(FinalizeText<MeshConfig>("aggregated_workers: 2\ndecode_workers: 1"),
              StatusIs(kInvalid, HasSubstr("aggregated_workers")));
}

TEST(FinalizeTest, AcceptedListenForms) {
  for (const char* listen : {"0.0.0.0:50051", "localhost:0", "[::1]:8080", "[::]:0"}) {
    RouterConfig config;
    config.mutable_server()->set_listen(listen);
    EXPECT_OK(Finalize(config)) << listen;
  }
}

TEST(FinalizeTest, AggregatedMeshHasNoPrefillOrDecodeWorkers) {
  MeshConfig mesh;
  mesh.set_aggregated_workers(2);
  ASSERT_OK(Finalize(mesh));
  EXPECT_EQ(mesh.prefill_workers(), 0);
  EXPECT_EQ(mesh.decode_workers(), 0);
  ASSERT_OK(Finalize(mesh));
}

TEST(RequireModelDirTest, NamesTheField) {
  EXPECT_OK(RequireModelDir("/models/tiny", "engine.model_dir"));
  EXPECT_THAT(RequireModelDir("", "engine.model_dir"),
              StatusIs(kInvalid, HasSubstr("engine.model_dir must be set")));
}

TEST(MeshConfigTest, SampleFileLoadsAndPropagatesModelDir) {
  const char* source_dir = std::getenv("DSERVE_SOURCE_DIR");
  ASSERT_NE(source_dir, nullptr) << "DSERVE_SOURCE_DIR is set by ctest";
  MeshConfig mesh;
  ASSERT_OK(LoadConfigFile(std::string(source_dir) + "/services/testdata/mesh.yaml", &mesh));
  ASSERT_OK(Finalize(mesh));
  EXPECT_EQ(mesh.prefill_workers(), 2);
  EXPECT_EQ(mesh.decode_workers(), 2);
  EXPECT_EQ(TimeUtil::DurationToSeconds(mesh.startup_timeout()), 30);
  EXPECT_EQ(mesh.router().model_dir(), "/tmp/dserve-model");
  EXPECT_EQ(mesh.prefill().engine().model_dir(), "/tmp/dserve-model");
  EXPECT_EQ(mesh.decode().engine().model_dir(), "/tmp/dserve-model");
  EXPECT_EQ(TimeUtil::DurationToSeconds(mesh.router().queue_timeout()), 10);
  EXPECT_EQ(mesh.router().max_queued_requests(), 512);
  EXPECT_EQ(mesh.decode().engine().kv_cache_tokens(), 32768);
  EXPECT_EQ(TimeUtil::DurationToMilliseconds(mesh.decode().transport().heartbeat_interval()), 250);
  EXPECT_EQ(mesh.prefill().transport().kind(), "tcp");
  EXPECT_EQ(mesh.prefill().max_queued_requests(), 256);  // a default

  // A sub-config's own model_dir wins over the mesh's.
  MeshConfig own;
  own.set_model_dir("/mesh");
  own.mutable_decode()->mutable_engine()->set_model_dir("/decode");
  ASSERT_OK(Finalize(own));
  EXPECT_EQ(own.prefill().engine().model_dir(), "/mesh");
  EXPECT_EQ(own.decode().engine().model_dir(), "/decode");
}

}  // namespace
}  // namespace dserve::services
