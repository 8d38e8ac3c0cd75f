// Appending pieces and trainer flags to a serialized sentencepiece model (no protobuf library):
// the result must load in sentencepiece with the new pieces at the end, of the right type.
#include <sentencepiece_processor.h>

#include <algorithm>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "catch.hpp"
#include "text/sentencepiece_proto.h"
#include "text/trained_tokenizers.h"

namespace {

namespace proto = qg::text::proto;

std::string first_release_model_bytes() {
  std::ifstream in(qg::test::first_release_tokenizer_dir() / "ice_text.model", std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

}  // namespace

TEST_CASE("byte piece names are sentencepiece's", "[text][proto]") {
  CHECK(proto::byte_piece_name(0x00) == "<0x00>");
  CHECK(proto::byte_piece_name(0x0A) == "<0x0A>");
  CHECK(proto::byte_piece_name(0xF0) == "<0xF0>");
  CHECK(proto::byte_piece_name(0xFF) == "<0xFF>");
}

TEST_CASE("appended pieces load at the end with their types", "[text][proto]") {
  std::string model = first_release_model_bytes();
  sentencepiece::SentencePieceProcessor before;
  REQUIRE(before.LoadFromSerializedProto(model).ok());
  const int n = before.GetPieceSize();

  // A long piece checks multi-byte length varints; a non-zero score checks the fixed32 field.
  const std::string long_piece = "<" + std::string(300, 'x') + ">";
  proto::append_piece(model, "[gMASK]", proto::PieceType::kControl);
  proto::append_piece(model, "<|tab|>", proto::PieceType::kUserDefined);
  proto::append_piece(model, long_piece, proto::PieceType::kUserDefined, -2.5f);
  proto::append_piece(model, "<unused_9>", proto::PieceType::kUnused);

  sentencepiece::SentencePieceProcessor after;
  REQUIRE(after.LoadFromSerializedProto(model).ok());
  REQUIRE(after.GetPieceSize() == n + 4);
  CHECK(after.IdToPiece(n) == "[gMASK]");
  CHECK(after.IsControl(n));
  CHECK(after.IdToPiece(n + 1) == "<|tab|>");
  CHECK(after.IdToPiece(n + 2) == long_piece);
  CHECK(after.GetScore(n + 2) == -2.5f);
  CHECK(after.IsUnused(n + 3));
  for (int id = 0; id < n; ++id) REQUIRE(after.IdToPiece(id) == before.IdToPiece(id));

  // User-defined pieces are matched in text; control pieces are not.
  std::vector<std::string> pieces;
  REQUIRE(after.Encode("a<|tab|>b", &pieces).ok());
  CHECK(std::find(pieces.begin(), pieces.end(), "<|tab|>") != pieces.end());
  REQUIRE(after.Encode("[gMASK]", &pieces).ok());
  CHECK(std::find(pieces.begin(), pieces.end(), "[gMASK]") == pieces.end());
}

TEST_CASE("byte pieces plus the appended trainer flag give byte fallback", "[text][proto]") {
  std::string model = first_release_model_bytes();
  const std::string emoji = "\xF0\x9F\x98\x80";  // U+1F600, not in the corpus
  sentencepiece::SentencePieceProcessor plain;
  REQUIRE(plain.LoadFromSerializedProto(model).ok());
  std::vector<int> ids;
  REQUIRE(plain.Encode(emoji, &ids).ok());
  CHECK(std::find(ids.begin(), ids.end(), plain.unk_id()) != ids.end());

  const int n = plain.GetPieceSize();
  for (int b = 0; b < 256; ++b) {
    proto::append_piece(model, proto::byte_piece_name(static_cast<unsigned char>(b)),
                        proto::PieceType::kByte);
  }
  proto::append_byte_fallback(model);
  sentencepiece::SentencePieceProcessor fallback;
  REQUIRE(fallback.LoadFromSerializedProto(model).ok());
  REQUIRE(fallback.Encode(emoji, &ids).ok());
  CHECK(std::find(ids.begin(), ids.end(), fallback.unk_id()) == ids.end());
  CHECK(std::find(ids.begin(), ids.end(), n + 0xF0) != ids.end());
  CHECK(fallback.IsByte(n + 0xF0));
  std::string text;
  REQUIRE(fallback.Decode(ids, &text).ok());
  CHECK(text == emoji);
}
