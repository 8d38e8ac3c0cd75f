// Passage splitting and loading, and JSONL writing with torn-tail repair.
#include <fstream>

#include "catch.hpp"
#include "mock_server.h"
#include "gen/utf8.h"
#include "qinggeng/gen/jsonl.h"
#include "qinggeng/gen/passages.h"

using namespace qg::gen;
using qg::gen::test::scratch_dir;
namespace fs = std::filesystem;

namespace {
std::string slurp(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

std::size_t chars(const std::string& s) { return utf8::length(s); }
}  // namespace

TEST_CASE("split_passages packs whole sentences up to the target", "[gen][passages]") {
  std::string sentence = "高血压是一种常见的慢性病，需要长期管理。";  // 20 characters
  std::string text;
  for (int i = 0; i < 60; ++i) text += sentence;
  SplitOptions o;
  o.target_chars = 100;
  o.max_chars = 160;
  o.min_chars = 30;
  auto parts = split_passages(text, o);
  REQUIRE(parts.size() == 12);
  for (const auto& p : parts) {
    CHECK(chars(p) == 100);
    CHECK(p.substr(p.size() - 3) == "。");  // ends at a sentence boundary
  }
}

TEST_CASE("split_passages keeps numbers and units intact", "[gen][passages]") {
  SplitOptions o;
  o.target_chars = 40;
  o.max_chars = 60;
  o.min_chars = 10;
  std::string text =
      "成人血压应低于120/80mmHg。体温超过37.5℃为发热! Take 3.5mg daily. 每次服用5毫克，每日2次；"
      "儿童剂量为0.25g/kg。";
  auto parts = split_passages(text, o);
  std::string joined;
  for (const auto& p : parts) joined += p;
  for (const char* value : {"120/80mmHg", "37.5℃", "3.5mg", "5毫克", "0.25g/kg"}) {
    int found = 0;
    for (const auto& p : parts) found += p.find(value) != std::string::npos;
    CHECK(found == 1);
  }

  // A single sentence far over the hard limit with no punctuation: cut, but never in a value.
  std::string run;
  for (int i = 0; i < 40; ++i) run += "剂量" + std::to_string(100 + i) + ".5mg及";
  auto pieces = split_passages(run, o);
  REQUIRE(pieces.size() > 3);
  std::string rejoined;
  for (const auto& p : pieces) {
    CHECK(chars(p) <= 60);
    rejoined += p;
  }
  CHECK(rejoined == run);
  for (int i = 0; i < 40; ++i) {
    std::string v = std::to_string(100 + i) + ".5mg";
    int found = 0;
    for (const auto& p : pieces) found += p.find(v) != std::string::npos;
    CHECK(found == 1);
  }
}

TEST_CASE("split_passages: newlines end sentences, short tails merge, ASCII dots", "[gen][passages]") {
  SplitOptions o;
  o.target_chars = 30;
  o.max_chars = 50;
  o.min_chars = 10;
  auto parts = split_passages("第一章 高血压\n\n  高血压的定义是收缩压持续升高。\n短尾。", o);
  REQUIRE(parts.size() == 1);
  CHECK(parts[0] == "第一章 高血压\n高血压的定义是收缩压持续升高。\n短尾。");
  CHECK(split_passages("   \n\n ", o).empty());
  REQUIRE_THROWS_WITH(split_passages("x", SplitOptions{100, 50, 10}),
                      QG_CONTAINS("target"));
}

TEST_CASE("load_passages: JSON array, JSONL, directory of books, bad input", "[gen][passages]") {
  fs::path dir = scratch_dir("passages");
  std::ofstream(dir / "book_data.json") << R"(["第一段内容。", "  ", "第二段内容。"])";
  auto a = load_passages(dir / "book_data.json");
  REQUIRE(a.size() == 2);
  CHECK(a[0].id == "book_data.json#0");
  CHECK(a[1].id == "book_data.json#2");
  CHECK(a[1].text == "第二段内容。");

  std::ofstream(dir / "p.jsonl") << R"({"text":"甲段落。"})" << "\n" << R"({"text":"乙段落。"})" << "\n";
  auto b = load_passages(dir / "p.jsonl");
  REQUIRE(b.size() == 2);
  CHECK(b[1].id == "p.jsonl#1");

  fs::create_directories(dir / "books" / "sub");
  std::ofstream(dir / "books" / "a.txt") << "\xEF\xBB\xBF甲书第一句。甲书第二句。";
  std::ofstream(dir / "books" / "sub" / "b.txt") << "乙书的内容。";
  std::ofstream(dir / "books" / "ignored.md") << "不读这个。";
  auto c = load_passages(dir / "books");
  REQUIRE(c.size() == 2);
  CHECK(c[0].id == "a.txt#0");
  CHECK(c[0].text == "甲书第一句。甲书第二句。");
  CHECK(c[1].id == "sub/b.txt#0");

  std::ofstream(dir / "books" / "bad.txt") << "好的文本\xC3\x28坏字节";
  REQUIRE_THROWS_WITH(load_passages(dir / "books"),
                      QG_CONTAINS("bad.txt") && QG_CONTAINS("UTF-8") &&
                          QG_CONTAINS("offset 12"));
  std::ofstream(dir / "empty.json") << R"(["", "  "])";
  REQUIRE_THROWS_WITH(load_passages(dir / "empty.json"), QG_CONTAINS("no passages"));
  std::ofstream(dir / "obj.json") << R"({"a":1})";
  REQUIRE_THROWS_WITH(load_passages(dir / "obj.json"), QG_CONTAINS("JSON array"));
  std::ofstream(dir / "nofield.jsonl") << R"({"content":"x"})" << "\n";
  REQUIRE_THROWS_WITH(load_passages(dir / "nofield.jsonl"),
                      QG_CONTAINS("nofield.jsonl:1") &&
                          QG_CONTAINS("\"text\""));
  REQUIRE_THROWS_WITH(load_passages(dir / "missing"), QG_CONTAINS("does not exist"));
}

TEST_CASE("JSONL writer appends whole lines and repairs a torn tail", "[gen][jsonl]") {
  fs::path dir = scratch_dir("jsonl");
  fs::path file = dir / "out" / "data.jsonl";
  {
    JsonlWriter w(file);
    w.append(JsonObject().add_string("q", "甲\n乙").add_int("n", 1).str());
    w.append(JsonObject().add_string("q", "丙").add_number("s", 0.5).add_bool("ok", true).str());
    REQUIRE_THROWS_WITH(w.append("{\n}"), QG_CONTAINS("newline"));
  }
  CHECK(slurp(file) == "{\"q\":\"甲\\n乙\",\"n\":1}\n{\"q\":\"丙\",\"s\":0.5,\"ok\":true}\n");

  SECTION("an unterminated last line is cut") {
    std::ofstream(file, std::ios::app) << R"({"q":"丁","n)";
    JsonlWriter w(file);
    CHECK(w.repaired_bytes() == 13);  // {"q":"丁","n with a 3-byte character
    w.append(R"({"q":"戊"})");
    CHECK(slurp(file) ==
          "{\"q\":\"甲\\n乙\",\"n\":1}\n{\"q\":\"丙\",\"s\":0.5,\"ok\":true}\n{\"q\":\"戊\"}\n");
  }
  SECTION("a terminated but invalid last line is cut") {
    std::ofstream(file, std::ios::app) << "{\"q\":\n";
    CHECK(repair_jsonl_tail(file) == 6);
    CHECK(repair_jsonl_tail(file) == 0);
  }
  SECTION("a file that is only a torn line becomes empty") {
    std::ofstream(file, std::ios::trunc) << "{\"q\"";
    CHECK(repair_jsonl_tail(file) == 4);
    CHECK(fs::file_size(file) == 0);
  }
  CHECK(repair_jsonl_tail(dir / "absent.jsonl") == 0);
}
