// ChatGlmTokenizer on stand-ins for both ChatGLM-6B releases of ice_text.model (trained at test
// time, see trained_tokenizers.h) and on the bundled demo tokenizer: the appended pieces' ids,
// the image-token offset, round trips, the space-run rule, specials and every error path.
#include "qinggeng/text/tokenizer.h"

#include <sentencepiece_processor.h>

#include <algorithm>
#include <fstream>
#include <string>
#include <vector>

#include "catch.hpp"
#include "scratch_dir.h"
#include "qinggeng/error.h"
#include "text/trained_tokenizers.h"

namespace {

namespace fs = std::filesystem;
using qg::text::ChatGlmTokenizer;

// Pieces in a model file as sentencepiece itself sees them, before any appending.
int raw_piece_count(const fs::path& dir) {
  sentencepiece::SentencePieceProcessor sp;
  REQUIRE(sp.Load((dir / "ice_text.model").string()).ok());
  return sp.GetPieceSize();
}

std::vector<std::string> pieces_of(const ChatGlmTokenizer& tok, const std::vector<int>& ids) {
  std::vector<std::string> pieces;
  for (int id : ids) pieces.push_back(tok.piece(id));
  return pieces;
}

bool contains_piece(const std::vector<std::string>& pieces, const std::string& piece) {
  return std::find(pieces.begin(), pieces.end(), piece) != pieces.end();
}

fs::path scratch_dir(const std::string& name) { return qg::test::scratch_dir("tokenizer/" + name); }

void write_file(const fs::path& file, const std::string& bytes) {
  std::ofstream(file, std::ios::binary) << bytes;
}

// Text that must survive encode -> decode unchanged with a model keeping spaces as written.
std::vector<std::string> round_trip_texts() {
  std::vector<std::string> texts = {
      "",
      "高血压患者每天食盐不超过5克。",
      "Most colds get better within 7 to 10 days.",
      "血压 blood pressure 120/80 mmHg，空腹血糖 5.6 mmol/L。",
      "第一行\n第二行\n\n第三行\n",
      "\n开头换行",
      "列1\t列2\t\t列3",
      " leading space, trailing space ",
      "表情😀和罕见字齉龘，Ωmega≈3",
      "[MASK] <sop> 写在正文里的特殊记号",
  };
  for (int k = 1; k <= 100; ++k) {
    texts.push_back("a" + std::string(k, ' ') + "b 字" + std::string(k, ' ') + "c");
  }
  texts.push_back("x" + std::string(161, ' ') + "y");
  return texts;
}

void check_round_trips(const ChatGlmTokenizer& tok) {
  for (const std::string& text : round_trip_texts()) {
    INFO("text: [" << text << "]");
    const std::vector<int> ids = tok.encode(text);
    for (int id : ids) REQUIRE((id >= tok.num_image_tokens() && id < tok.vocab_size()));
    CHECK(tok.decode(ids) == text);
  }
  CHECK(tok.encode("").empty());
  CHECK(tok.decode({}) == "");
}

void check_space_runs(const ChatGlmTokenizer& tok) {
  for (int k = 2; k <= 80; ++k) {
    const auto pieces = pieces_of(tok, tok.encode("a" + std::string(k, ' ') + "b"));
    INFO("run of " << k);
    CHECK(contains_piece(pieces, "<|blank_" + std::to_string(k) + "|>"));
    CHECK(std::count_if(pieces.begin(), pieces.end(),
                        [](const std::string& p) { return p.rfind("<|blank_", 0) == 0; }) == 1);
  }
  const auto p81 = pieces_of(tok, tok.encode("a" + std::string(81, ' ') + "b"));
  CHECK(contains_piece(p81, "<|blank_80|>"));
  CHECK(std::count(p81.begin(), p81.end(), "<|blank_80|>") == 1);
  const auto p100 = pieces_of(tok, tok.encode("a" + std::string(100, ' ') + "b"));
  CHECK(contains_piece(p100, "<|blank_80|>"));
  CHECK(contains_piece(p100, "<|blank_20|>"));
  const auto lines = pieces_of(tok, tok.encode("a\nb\tc"));
  CHECK(contains_piece(lines, "<n>"));
  CHECK(contains_piece(lines, "<|tab|>"));
  // As in the HF tokenizer, text spelling the GLM pieces decodes to what they stand for.
  CHECK(tok.decode(tok.encode("a<n>b<|tab|>c<|blank_3|>d")) == "a\nb\tc   d");
}

void check_specials(const ChatGlmTokenizer& tok) {
  const std::vector<int> body = tok.encode("多喝水，注意休息。");
  std::vector<int> ids = {tok.gmask_id(), tok.bos_id()};
  ids.insert(ids.end(), body.begin(), body.end());
  ids.push_back(tok.eos_id());
  ids.push_back(tok.mask_id());
  ids.push_back(tok.token_id("<dBLOCK>"));
  CHECK(tok.decode(ids) == "多喝水，注意休息。");
  // Control pieces are never produced from text, even when it spells them.
  const std::vector<int> spelled = tok.encode("[gMASK]<sop><eop>");
  for (int id : {tok.gmask_id(), tok.bos_id(), tok.eos_id()}) {
    CHECK(std::find(spelled.begin(), spelled.end(), id) == spelled.end());
  }
  for (const char* name : qg::test::kSpecialPieces) CHECK(tok.piece(tok.token_id(name)) == name);
  CHECK_THROWS_WITH(tok.token_id("<no_such_piece>"), QG_CONTAINS("<no_such_piece>"));
  CHECK_THROWS_WITH(tok.decode({tok.vocab_size()}), QG_CONTAINS("out of range"));
  CHECK_THROWS_WITH(tok.piece(tok.vocab_size()), QG_CONTAINS("out of range"));
  CHECK_THROWS_WITH(tok.piece(-1), QG_CONTAINS("out of range"));
}

void check_byte_fallback(const ChatGlmTokenizer& tok) {
  const std::string emoji = "\xF0\x9F\xA9\xBA";  // U+1FA7A stethoscope
  const auto pieces = pieces_of(tok, tok.encode(emoji));
  CHECK(contains_piece(pieces, "<0xF0>"));
  CHECK(contains_piece(pieces, "<0xBA>"));
  CHECK(tok.decode(tok.encode(emoji)) == emoji);
}

}  // namespace

TEST_CASE("first-release model: the release pieces are appended in order", "[text][tokenizer]") {
  const fs::path dir = qg::test::first_release_tokenizer_dir();
  const int n = raw_piece_count(dir);
  const ChatGlmTokenizer tok = ChatGlmTokenizer::load(dir);
  const int base = 20000 + n;  // no tokenizer_config.json: the HF default offset

  CHECK(tok.num_image_tokens() == 20000);
  CHECK(tok.appended_pieces() == 8 + 80 + 256 + 1);
  CHECK(tok.vocab_size() == base + 345);
  CHECK(tok.mask_id() == base + 0);
  CHECK(tok.gmask_id() == base + 1);
  CHECK(tok.token_id("[sMASK]") == base + 2);
  CHECK(tok.token_id("<unused_0>") == base + 3);
  CHECK(tok.bos_id() == base + 4);
  CHECK(tok.eos_id() == base + 5);
  CHECK(tok.token_id("<ENC>") == base + 6);
  CHECK(tok.token_id("<dBLOCK>") == base + 7);
  CHECK(tok.token_id("<|tab|>") == base + 8);
  CHECK(tok.token_id("<|blank_2|>") == base + 9);
  CHECK(tok.token_id("<|blank_80|>") == base + 87);
  CHECK(tok.token_id("<0x00>") == base + 88);
  CHECK(tok.token_id("<0xFF>") == base + 343);
  CHECK(tok.token_id("<n>") == base + 344);

  // Ids below the offset are image tokens.
  CHECK(tok.token_id("<image_0>") == 0);
  CHECK(tok.token_id("<image_19999>") == 19999);
  CHECK(tok.piece(123) == "<image_123>");
  CHECK_THROWS_WITH(tok.token_id("<image_20000>"), QG_CONTAINS("<image_20000>"));

  // Given the .model file itself with an explicit offset.
  const ChatGlmTokenizer plain = ChatGlmTokenizer::load(dir / "ice_text.model", 0);
  CHECK(plain.num_image_tokens() == 0);
  CHECK(plain.mask_id() == n);
  CHECK(plain.encode("多喝水") == [&] {
    std::vector<int> ids = tok.encode("多喝水");
    for (int& id : ids) id -= 20000;
    return ids;
  }());
}

TEST_CASE("first-release model: encode/decode", "[text][tokenizer]") {
  const ChatGlmTokenizer tok = ChatGlmTokenizer::load(qg::test::first_release_tokenizer_dir());
  check_round_trips(tok);
  check_space_runs(tok);
  check_specials(tok);
  check_byte_fallback(tok);
  // Negative ids and image tokens are dropped on decode.
  std::vector<int> ids = {-7, 0, 19999};
  const std::vector<int> body = tok.encode("血压");
  ids.insert(ids.end(), body.begin(), body.end());
  CHECK(tok.decode(ids) == "血压");
}

TEST_CASE("updated model: nothing appended, offset from tokenizer_config.json",
          "[text][tokenizer]") {
  const fs::path dir = qg::test::updated_tokenizer_dir();
  const ChatGlmTokenizer tok = ChatGlmTokenizer::load(dir);
  sentencepiece::SentencePieceProcessor sp;
  REQUIRE(sp.Load((dir / "ice_text.model").string()).ok());

  CHECK(tok.num_image_tokens() == 0);
  CHECK(tok.appended_pieces() == 0);
  CHECK(tok.vocab_size() == sp.GetPieceSize());
  CHECK(tok.mask_id() == sp.PieceToId("[MASK]"));
  CHECK(tok.gmask_id() == sp.PieceToId("[gMASK]"));
  CHECK(tok.bos_id() == sp.PieceToId("<sop>"));
  CHECK(tok.eos_id() == sp.PieceToId("<eop>"));
  CHECK(tok.token_id("<n>") == sp.PieceToId("<n>"));
  CHECK_THROWS_WITH(tok.token_id("<image_0>"), QG_CONTAINS("<image_0>"));

  // The same file with the first release's offset: ids shift, text does not.
  const ChatGlmTokenizer shifted = ChatGlmTokenizer::load(dir / "ice_text.model", 20000);
  CHECK(shifted.gmask_id() == tok.gmask_id() + 20000);
  CHECK(shifted.decode(shifted.encode("你好\n世界")) == "你好\n世界");
}

TEST_CASE("updated model: encode/decode", "[text][tokenizer]") {
  const ChatGlmTokenizer tok = ChatGlmTokenizer::load(qg::test::updated_tokenizer_dir());
  check_round_trips(tok);
  check_space_runs(tok);
  check_specials(tok);
  check_byte_fallback(tok);
  CHECK(tok.decode({-1, -100}) == "");
}

TEST_CASE("bundled demo tokenizer", "[text][tokenizer]") {
  const fs::path dir = fs::path(QG_SOURCE_DIR) / "data" / "demo-model";
  const ChatGlmTokenizer tok = ChatGlmTokenizer::load(dir);
  CHECK(tok.num_image_tokens() == 0);
  CHECK(tok.appended_pieces() == 0);
  CHECK(tok.mask_id() == 4);
  CHECK(tok.gmask_id() == 5);
  CHECK(tok.bos_id() == 8);
  CHECK(tok.eos_id() == 9);
  CHECK(tok.token_id("<pad>") == 3);
  CHECK(tok.token_id("<unk>") == 0);
  check_round_trips(tok);
  check_specials(tok);
  check_byte_fallback(tok);
}

TEST_CASE("tokenizer load errors name the file", "[text][tokenizer][errors]") {
  const fs::path dir = scratch_dir("errors");
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir / "absent"), QG_CONTAINS("absent"));
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir), QG_CONTAINS("ice_text.model"));
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir / "absent.model", 0), QG_CONTAINS("absent.model"));
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir, 0), QG_CONTAINS("errors"));

  write_file(dir / "garbage.model", "this is not a sentencepiece model\n\x01\x02\xff\xfe");
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir / "garbage.model", 0), QG_CONTAINS("garbage.model"));
  write_file(dir / "empty.model", "");
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir / "empty.model", 0), QG_CONTAINS("empty.model"));
  const fs::path model = qg::test::first_release_tokenizer_dir() / "ice_text.model";
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(model, -1), QG_CONTAINS("num_image_tokens"));

  // A truncated copy of a real model.
  std::ifstream in(model, std::ios::binary);
  std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  write_file(dir / "truncated.model", bytes.substr(0, bytes.size() / 2));
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir / "truncated.model", 0),
                    QG_CONTAINS("truncated.model"));
}

TEST_CASE("tokenizer_config.json is read and checked", "[text][tokenizer][errors]") {
  const fs::path model = qg::test::first_release_tokenizer_dir() / "ice_text.model";
  const fs::path dir = scratch_dir("config");
  fs::copy_file(model, dir / "ice_text.model");

  write_file(dir / "tokenizer_config.json", "{\"num_image_tokens\": 5}");
  CHECK(ChatGlmTokenizer::load(dir).num_image_tokens() == 5);
  CHECK(ChatGlmTokenizer::load(dir / "ice_text.model").num_image_tokens() == 5);
  write_file(dir / "tokenizer_config.json", "{\"eos_token\": \"<eop>\"}");
  CHECK(ChatGlmTokenizer::load(dir).num_image_tokens() == 20000);

  write_file(dir / "tokenizer_config.json", "{\"num_image_tokens\": \"many\"}");
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir), QG_CONTAINS("tokenizer_config.json"));
  write_file(dir / "tokenizer_config.json", "{\"num_image_tokens\": -3}");
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir), QG_CONTAINS("num_image_tokens"));
  write_file(dir / "tokenizer_config.json", "{not json");
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir), QG_CONTAINS("tokenizer_config.json"));
  write_file(dir / "tokenizer_config.json", "[1, 2]");
  CHECK_THROWS_WITH(ChatGlmTokenizer::load(dir), QG_CONTAINS("tokenizer_config.json"));
}
