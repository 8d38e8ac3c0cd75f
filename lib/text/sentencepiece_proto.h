// Appending to a serialized sentencepiece ModelProto without a protobuf library.
// Protobuf wire format lets a parser see a repeated field spread over the whole message and
// merges an embedded message that appears twice, so new `pieces` entries and trainer_spec
// flags can be written after the bytes of an existing model file and the result parsed as one
// model. Only the few fields the ChatGLM loader needs are encoded here.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace qg::text::proto {

/// sentencepiece's ModelProto.SentencePiece.Type values (sentencepiece_model.proto).
enum class PieceType : int {
  kNormal = 1,
  kUnknown = 2,
  kControl = 3,
  kUserDefined = 4,
  kUnused = 5,
  kByte = 6,
};

/// Appends a ModelProto `pieces` entry (field 1) {piece, score, type} to `model`.
void append_piece(std::string& model, std::string_view piece, PieceType type, float score = 0.0f);

/// Appends a ModelProto `trainer_spec` (field 2) holding byte_fallback (field 35) = true; the
/// parser merges it into the model's existing trainer_spec.
void append_byte_fallback(std::string& model);

/// Whether `model` (a serialized ModelProto) has a top-level field `field`, scanning its wire
/// format; false also when the bytes are not well-formed protobuf (cut inside a field).
/// A spm_train model always ends with normalizer_spec (field 3), so its absence exposes a
/// file truncated exactly between two `pieces` entries, which still parses as a smaller model.
bool has_top_level_field(std::string_view model, std::uint32_t field);

/// ModelProto's normalizer_spec field number.
inline constexpr std::uint32_t kModelNormalizerSpec = 3;

/// "<0x0A>"-style name of the byte piece for `byte`, as sentencepiece spells it.
std::string byte_piece_name(unsigned char byte);

}  // namespace qg::text::proto
