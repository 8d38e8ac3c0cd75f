// CRC32C, TFRecord framing and hand-encoded Event protobufs (see tfrecord.h). Field numbers are
// those of tensorflow/core/util/event.proto and framework/summary.proto.
#include "train/tfrecord.h"

#include <array>
#include <cstring>

namespace qg::train::tfrecord {

namespace {

const std::array<std::uint32_t, 256>& crc_table() {
  static const std::array<std::uint32_t, 256> table = [] {
    std::array<std::uint32_t, 256> t{};
    for (std::uint32_t i = 0; i < 256; ++i) {
      std::uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
      t[i] = c;
    }
    return t;
  }();
  return table;
}

// Protobuf wire format: each field is a varint key (field << 3 | wire type) then its value.
class ProtoWriter {
 public:
  void varint(std::uint64_t v) {
    while (v >= 0x80) {
      out_.push_back(static_cast<char>((v & 0x7F) | 0x80));
      v >>= 7;
    }
    out_.push_back(static_cast<char>(v));
  }
  void key(int field, int wire_type) { varint(static_cast<std::uint64_t>(field << 3 | wire_type)); }
  void int64_field(int field, std::int64_t v) {
    key(field, 0);
    varint(static_cast<std::uint64_t>(v));
  }
  void double_field(int field, double v) {
    key(field, 1);
    little_endian(v);
  }
  void float_field(int field, float v) {
    key(field, 5);
    little_endian(v);
  }
  void bytes_field(int field, std::string_view bytes) {
    key(field, 2);
    varint(bytes.size());
    out_.append(bytes);
  }
  const std::string& str() const { return out_; }

 private:
  template <typename T>
  void little_endian(T v) {
    unsigned char bytes[sizeof(T)];
    std::memcpy(bytes, &v, sizeof(T));  // x86 and ARM Linux are little-endian, as the format is
    out_.append(reinterpret_cast<const char*>(bytes), sizeof(T));
  }
  std::string out_;
};

void append_u32(std::string& out, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>(v >> (8 * i)));
}

}  // namespace

std::uint32_t crc32c(std::string_view data) {
  const auto& table = crc_table();
  std::uint32_t c = 0xFFFFFFFFu;
  for (unsigned char b : data) c = table[(c ^ b) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

std::uint32_t masked_crc32c(std::string_view data) {
  std::uint32_t c = crc32c(data);
  return ((c >> 15) | (c << 17)) + 0xA282EAD8u;
}

std::string frame(std::string_view payload) {
  std::string header;
  std::uint64_t n = payload.size();
  for (int i = 0; i < 8; ++i) header.push_back(static_cast<char>(n >> (8 * i)));
  std::string out = header;
  append_u32(out, masked_crc32c(header));
  out.append(payload);
  append_u32(out, masked_crc32c(payload));
  return out;
}

std::string file_version_event(double wall_time) {
  ProtoWriter event;
  event.double_field(1, wall_time);
  event.bytes_field(3, "brain.Event:2");
  return event.str();
}

std::string scalars_event(double wall_time, std::int64_t step, const std::vector<Scalar>& scalars) {
  ProtoWriter summary;
  for (const Scalar& s : scalars) {
    ProtoWriter value;
    value.bytes_field(1, s.tag);
    value.float_field(2, static_cast<float>(s.value));
    summary.bytes_field(1, value.str());
  }
  ProtoWriter event;
  event.double_field(1, wall_time);
  event.int64_field(2, step);
  event.bytes_field(5, summary.str());
  return event.str();
}

}  // namespace qg::train::tfrecord
