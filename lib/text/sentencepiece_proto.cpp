// Protobuf wire-format encoding of the few ModelProto fields the ChatGLM loader appends.
#include "text/sentencepiece_proto.h"

#include <cstdint>
#include <cstring>

namespace qg::text::proto {
namespace {

// Wire types of the protobuf encoding.
constexpr std::uint32_t kVarint = 0;
constexpr std::uint32_t kLengthDelimited = 2;
constexpr std::uint32_t kFixed32 = 5;

void put_varint(std::string& out, std::uint64_t value) {
  while (value >= 0x80) {
    out.push_back(static_cast<char>((value & 0x7f) | 0x80));
    value >>= 7;
  }
  out.push_back(static_cast<char>(value));
}

// Reads a varint at `at`; false when the bytes end first.
bool get_varint(std::string_view in, std::size_t& at, std::uint64_t& value) {
  value = 0;
  for (int shift = 0; shift < 64 && at < in.size(); shift += 7) {
    const auto byte = static_cast<unsigned char>(in[at++]);
    value |= static_cast<std::uint64_t>(byte & 0x7f) << shift;
    if ((byte & 0x80) == 0) return true;
  }
  return false;
}

void put_tag(std::string& out, std::uint32_t field, std::uint32_t wire_type) {
  put_varint(out, (static_cast<std::uint64_t>(field) << 3) | wire_type);
}

void put_bytes(std::string& out, std::uint32_t field, std::string_view bytes) {
  put_tag(out, field, kLengthDelimited);
  put_varint(out, bytes.size());
  out.append(bytes.data(), bytes.size());
}

// ModelProto and its nested messages' field numbers (sentencepiece_model.proto).
constexpr std::uint32_t kModelPieces = 1;
constexpr std::uint32_t kModelTrainerSpec = 2;
constexpr std::uint32_t kPiecePiece = 1;
constexpr std::uint32_t kPieceScore = 2;
constexpr std::uint32_t kPieceType = 3;
constexpr std::uint32_t kTrainerByteFallback = 35;

}  // namespace

void append_piece(std::string& model, std::string_view piece, PieceType type, float score) {
  std::string entry;
  put_bytes(entry, kPiecePiece, piece);
  put_tag(entry, kPieceScore, kFixed32);
  std::uint32_t bits = 0;
  std::memcpy(&bits, &score, sizeof bits);
  for (int shift = 0; shift < 32; shift += 8) {  // fixed32 is little-endian on the wire
    entry.push_back(static_cast<char>((bits >> shift) & 0xff));
  }
  put_tag(entry, kPieceType, kVarint);
  put_varint(entry, static_cast<std::uint64_t>(type));
  put_bytes(model, kModelPieces, entry);
}

void append_byte_fallback(std::string& model) {
  std::string spec;
  put_tag(spec, kTrainerByteFallback, kVarint);
  put_varint(spec, 1);
  put_bytes(model, kModelTrainerSpec, spec);
}

std::string byte_piece_name(unsigned char byte) {
  static const char kHex[] = "0123456789ABCDEF";
  return std::string("<0x") + kHex[byte >> 4] + kHex[byte & 0xf] + ">";
}

bool has_top_level_field(std::string_view model, std::uint32_t field) {
  bool found = false;
  std::size_t at = 0;
  while (at < model.size()) {
    std::uint64_t tag = 0, value = 0;
    if (!get_varint(model, at, tag)) return false;
    switch (tag & 7) {
      case kVarint:
        if (!get_varint(model, at, value)) return false;
        break;
      case 1:  // fixed64
        if (model.size() - at < 8) return false;
        at += 8;
        break;
      case kLengthDelimited:
        if (!get_varint(model, at, value) || value > model.size() - at) return false;
        at += static_cast<std::size_t>(value);
        break;
      case kFixed32:
        if (model.size() - at < 4) return false;
        at += 4;
        break;
      default:
        return false;
    }
    found = found || (tag >> 3) == field;
  }
  return found;
}

}  // namespace qg::text::proto
