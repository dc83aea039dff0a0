// kvtransfer/transport.cc: transport names and the lease target's wire form.
#include "kvtransfer/transport.h"

#include <cstring>

#include "absl/strings/str_cat.h"

namespace dserve::kvtransfer {
namespace {

// The wire form: a magic word, then fixed-width little-endian integers and
// length-prefixed byte strings, in the order of KvLeaseTarget's fields.
constexpr uint32_t kTargetMagic = 0x4B565431;  // "KVT1"
constexpr uint32_t kMaxTargetBlocks = 1 << 24;
constexpr uint32_t kMaxTargetString = 1 << 20;

class Writer {
 public:
  void U64(uint64_t v) { Append(&v, sizeof v); }
  void I64(int64_t v) { Append(&v, sizeof v); }
  void U32(uint32_t v) { Append(&v, sizeof v); }
  void Bytes(const std::string& s) {
    U32(static_cast<uint32_t>(s.size()));
    out_.append(s);
  }
  std::string Take() { return std::move(out_); }

 private:
  void Append(const void* p, size_t n) { out_.append(static_cast<const char*>(p), n); }
  std::string out_;
};

class Reader {
 public:
  explicit Reader(std::string_view in) : in_(in) {}
  bool U64(uint64_t* v) { return Read(v, sizeof *v); }
  bool I64(int64_t* v) { return Read(v, sizeof *v); }
  bool U32(uint32_t* v) { return Read(v, sizeof *v); }
  bool Bytes(std::string* s) {
    uint32_t n = 0;
    if (!U32(&n) || n > kMaxTargetString || n > in_.size()) return false;
    s->assign(in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  bool done() const { return in_.empty(); }

 private:
  bool Read(void* p, size_t n) {
    if (in_.size() < n) return false;
    std::memcpy(p, in_.data(), n);
    in_.remove_prefix(n);
    return true;
  }
  std::string_view in_;
};

absl::Status Malformed(const char* field) {
  return absl::InvalidArgumentError(absl::StrCat("lease target: malformed field ", field));
}

}  // namespace

const char* KvTransportKindName(KvTransportKind kind) {
  switch (kind) {
    case KvTransportKind::kTcp:
      return "tcp";
    case KvTransportKind::kSharedMemory:
      return "shm";
    case KvTransportKind::kAuto:
      return "auto";
  }
  return "unknown";
}

absl::StatusOr<KvTransportKind> ParseKvTransportKind(std::string_view name) {
  if (name == "tcp") return KvTransportKind::kTcp;
  if (name == "shm") return KvTransportKind::kSharedMemory;
  if (name == "auto") return KvTransportKind::kAuto;
  return absl::InvalidArgumentError(
      absl::StrCat("transport must be one of tcp, shm, auto; got \"", std::string(name), "\""));
}

std::string SerializeLeaseTarget(const KvLeaseTarget& t) {
  Writer w;
  w.U32(kTargetMagic);
  w.Bytes(t.worker_address);
  w.Bytes(t.remote_key);
  w.U64(t.remote_base);
  for (int64_t v : {t.layout.num_layers, t.layout.num_blocks, t.layout.block_tokens,
                    t.layout.bytes_per_token_per_layer, t.layout.layer_stride_bytes,
                    t.layout.block_stride_bytes, t.layout.base_offset_bytes, t.layout.pool_bytes}) {
    w.I64(v);
  }
  w.U32(static_cast<uint32_t>(t.blocks.size()));
  for (KvBlockId b : t.blocks) w.U32(static_cast<uint32_t>(b));
  w.U64(t.lease_id);
  w.U64(t.generation);
  w.U32(t.access == KvLeaseAccess::kWrite ? 0 : 1);
  w.I64(absl::ToInt64Microseconds(t.ttl));
  return w.Take();
}

absl::StatusOr<KvLeaseTarget> ParseLeaseTarget(std::string_view bytes) {
  Reader r(bytes);
  KvLeaseTarget t;
  uint32_t magic = 0;
  if (!r.U32(&magic) || magic != kTargetMagic) return Malformed("magic");
  if (!r.Bytes(&t.worker_address) || t.worker_address.empty()) return Malformed("worker_address");
  if (!r.Bytes(&t.remote_key) || t.remote_key.empty()) return Malformed("remote_key");
  if (!r.U64(&t.remote_base)) return Malformed("remote_base");
  for (int64_t* v :
       {&t.layout.num_layers, &t.layout.num_blocks, &t.layout.block_tokens,
        &t.layout.bytes_per_token_per_layer, &t.layout.layer_stride_bytes,
        &t.layout.block_stride_bytes, &t.layout.base_offset_bytes, &t.layout.pool_bytes}) {
    if (!r.I64(v)) return Malformed("layout");
  }
  uint32_t num_blocks = 0;
  if (!r.U32(&num_blocks) || num_blocks > kMaxTargetBlocks) return Malformed("blocks");
  t.blocks.resize(num_blocks);
  for (KvBlockId& b : t.blocks) {
    uint32_t v = 0;
    if (!r.U32(&v)) return Malformed("blocks");
    b = static_cast<KvBlockId>(v);
  }
  uint32_t access = 0;
  int64_t ttl_us = 0;
  if (!r.U64(&t.lease_id)) return Malformed("lease_id");
  if (!r.U64(&t.generation)) return Malformed("generation");
  if (!r.U32(&access) || access > 1) return Malformed("access");
  if (!r.I64(&ttl_us)) return Malformed("ttl");
  if (!r.done()) return Malformed("trailing bytes");
  t.access = access == 0 ? KvLeaseAccess::kWrite : KvLeaseAccess::kRead;
  t.ttl = absl::Microseconds(ttl_us);
  return t;
}

}  // namespace dserve::kvtransfer
