// Training data: record shapes and their errors, the GLM layout of a handcrafted example and
// its truncation rules, bucketed batch plans (determinism, padding, resume) and the held-out
// split's stability.
#include <algorithm>
#include <filesystem>
#include <fstream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "catch.hpp"
#include "qinggeng/error.h"
#include "qinggeng/io/model_config.h"
#include "qinggeng/text/tokenizer.h"
#include "qinggeng/train/dataset.h"

namespace {

namespace fs = std::filesystem;
using qg::train::BatchPlanner;
using qg::train::BatchPlanOptions;
using qg::train::DataPosition;
using qg::train::kIgnoreLabel;
using qg::train::LayoutOptions;
using qg::train::PromptTruncation;
using qg::train::RecordShape;
using qg::train::TextExample;

const fs::path kDemoModel = fs::path(QG_SOURCE_DIR) / "data" / "demo-model";

std::vector<int> range_ids(int first, int count) {
  std::vector<int> v(static_cast<std::size_t>(count));
  for (int i = 0; i < count; ++i) v[static_cast<std::size_t>(i)] = first + i;
  return v;
}

std::vector<int> random_lengths(std::size_t n, int lo, int hi, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int> v(n);
  for (auto& len : v) len = lo + static_cast<int>(rng() % static_cast<std::uint32_t>(hi - lo + 1));
  return v;
}

std::vector<TextExample> numbered_examples(int first, int count) {
  std::vector<TextExample> v;
  for (int i = first; i < first + count; ++i) {
    v.push_back({"问题 " + std::to_string(i), "回答 " + std::to_string(i),
                 RecordShape::kQuestionAnswer, ""});
  }
  return v;
}

}  // namespace

TEST_CASE("train data: every record shape is detected per record", "[train][data]") {
  std::string jsonl =
      R"({"question": "q1", "answer": "a1"})"
      "\n"
      "\n"
      R"({"passage_id": "p7", "passage": "书", "question": "q2", "answer": "a2", "model": "m"})"
      "\n"
      R"({"instruction": "i3", "input": "x3", "output": "o3"})"
      "\n"
      R"({"instruction": "i4", "input": "", "output": "o4", "category": "c",)"
      R"( "most_similar": "", "similarity": 0.1, "request_id": "r", "model": "m"})"
      "\n"
      R"({"instruction": "i5", "input": null, "output": "o5"})";
  auto ex = qg::train::parse_text_examples(jsonl, "d.jsonl");
  REQUIRE(ex.size() == 5);
  CHECK(ex[0].shape == RecordShape::kQuestionAnswer);
  CHECK(ex[1].shape == RecordShape::kBookQa);
  CHECK(ex[2].shape == RecordShape::kInstruction);
  CHECK(ex[3].shape == RecordShape::kDialogue);
  CHECK(std::string(qg::train::shape_name(ex[3].shape)) == "dialogue");
  CHECK(ex[0].prompt == "q1");
  CHECK(ex[0].answer == "a1");
  CHECK(ex[1].prompt == "q2");  // the passage stays out of the prompt
  CHECK(ex[2].prompt == "i3\nx3");
  CHECK(ex[2].answer == "o3");
  CHECK(ex[3].prompt == "i4");
  CHECK(ex[4].prompt == "i5");
  CHECK(ex[1].origin == "d.jsonl:3");  // blank line 2 still counts
  CHECK(ex[4].origin == "d.jsonl:6");
}

TEST_CASE("train data: a JSON array names the line each record starts on", "[train][data]") {
  std::string text =
      "\xEF\xBB\xBF[\n"
      "  {\"question\": \"q, [1]\", \"answer\": \"a \\\"}\\\" \"},\n"
      "  {\n"
      "    \"instruction\": \"i\",\n"
      "    \"output\": \"o\"\n"
      "  }\n"
      "]\n";
  auto ex = qg::train::parse_text_examples(text, "d.json");
  REQUIRE(ex.size() == 2);
  CHECK(ex[0].prompt == "q, [1]");
  CHECK(ex[0].answer == "a \"}\" ");
  CHECK(ex[0].origin == "d.json:2");
  CHECK(ex[1].origin == "d.json:3");
  CHECK(ex[1].shape == RecordShape::kInstruction);
  CHECK(qg::train::parse_text_examples("[]", "e.json").empty());
}

TEST_CASE("train data: bad records name file, line and field", "[train][data]") {
  using qg::train::parse_text_examples;
  const std::string rec = R"({"question": "q", "answer": "a"})";
  const std::string good = rec + "\n";
  REQUIRE_THROWS_WITH(parse_text_examples(good + R"({"question": "q"})", "f.jsonl"),
                      QG_CONTAINS("f.jsonl:2") && QG_CONTAINS("\"answer\""));
  REQUIRE_THROWS_WITH(parse_text_examples(good + good + R"({"question": 5, "answer": "a"})", "f"),
                      QG_CONTAINS("f:3") && QG_CONTAINS("\"question\" must be a string"));
  REQUIRE_THROWS_WITH(parse_text_examples(good + "{\"question\": \"q\", ", "f.jsonl"),
                      QG_CONTAINS("f.jsonl:2") && QG_CONTAINS("invalid JSON"));
  REQUIRE_THROWS_WITH(
      parse_text_examples(R"({"instruction": "i", "input": 3, "output": "o"})", "f"),
      QG_CONTAINS("f:1") && QG_CONTAINS("\"input\""));
  REQUIRE_THROWS_WITH(parse_text_examples(R"({"instruction": "i", "input": "x"})", "f"),
                      QG_CONTAINS("f:1") && QG_CONTAINS("\"output\""));
  REQUIRE_THROWS_WITH(parse_text_examples(R"({"question": "q", "answer": "  "})", "f"),
                      QG_CONTAINS("\"answer\" is empty"));
  REQUIRE_THROWS_WITH(parse_text_examples(R"({"prompt": "q", "response": "a"})", "f"),
                      QG_CONTAINS("f:1") && QG_CONTAINS("neither"));
  REQUIRE_THROWS_WITH(
      parse_text_examples(R"({"question": "q", "answer": "a", "instruction": "i", "output": "o"})",
                          "f"),
      QG_CONTAINS("both"));
  REQUIRE_THROWS_WITH(parse_text_examples("[\n" + rec + ",\n 7\n]", "a.json"),
                      QG_CONTAINS("a.json:3") && QG_CONTAINS("must be a JSON object"));
  REQUIRE_THROWS_WITH(parse_text_examples("[\n" + rec + ",\n {\"question\": }\n]", "a.json"),
                      QG_CONTAINS("a.json:3") && QG_CONTAINS("invalid JSON"));
  REQUIRE_THROWS_WITH(parse_text_examples("[\n" + rec + ",\n]", "a.json"),
                      QG_CONTAINS("a.json:3") && QG_CONTAINS("empty array element"));
  REQUIRE_THROWS_WITH(parse_text_examples("[\n" + good, "a.json"),
                      QG_CONTAINS("a.json:2") && QG_CONTAINS("not closed"));
  REQUIRE_THROWS_WITH(parse_text_examples("[" + good + "]\n]", "a.json"),
                      QG_CONTAINS("a.json:3") && QG_CONTAINS("text after the array"));
  REQUIRE_THROWS_WITH(parse_text_examples("{\"question\": \"\xC3\x28\", \"answer\": \"a\"}", "u"),
                      QG_CONTAINS("u:1") && QG_CONTAINS("invalid JSON"));

  const fs::path empty = fs::path(QG_BINARY_DIR) / "train_empty.jsonl";
  std::ofstream(empty) << "\n\n";
  REQUIRE_THROWS_WITH(qg::train::load_text_examples(empty), QG_CONTAINS("no training records"));
  REQUIRE_THROWS_WITH(qg::train::load_text_examples(empty.string() + ".missing"),
                      QG_CONTAINS("train_empty.jsonl.missing"));
}

TEST_CASE("train data: the bundled sample parses and lays out", "[train][data]") {
  auto examples =
      qg::train::load_text_examples(fs::path(QG_SOURCE_DIR) / "data/train/sample.jsonl");
  REQUIRE(examples.size() >= 12);
  std::set<RecordShape> shapes;
  for (const auto& e : examples) shapes.insert(e.shape);
  CHECK(shapes.count(RecordShape::kQuestionAnswer) == 1);
  CHECK(shapes.count(RecordShape::kInstruction) == 1);

  auto tok = qg::text::ChatGlmTokenizer::load(kDemoModel);
  auto config = qg::io::load_model_config(kDemoModel);
  LayoutOptions opt;
  opt.max_length = 96;
  for (const auto& e : examples) {
    auto ex = qg::train::make_training_example(e, tok, config, opt);
    auto prompt = tok.encode(e.prompt);
    auto answer = tok.encode(e.answer);
    INFO(e.origin);
    CHECK(ex.size() <= opt.max_length);
    CHECK(ex.input_ids[static_cast<std::size_t>(ex.mask_position)] == config.gmask_token_id);
    CHECK(ex.input_ids[static_cast<std::size_t>(ex.context_length)] == config.bos_token_id);
    // The answer starts right after <sop>, whatever was cut.
    CHECK(ex.input_ids[static_cast<std::size_t>(ex.context_length) + 1] == answer[0]);
    if (ex.prompt_tokens_dropped == 0 && ex.answer_tokens_dropped == 0) {
      std::vector<int> expect = prompt;
      expect.push_back(config.gmask_token_id);
      expect.push_back(config.bos_token_id);
      expect.insert(expect.end(), answer.begin(), answer.end());
      expect.push_back(config.eos_token_id);
      CHECK(ex.input_ids == expect);
    }
  }
}

TEST_CASE("train layout: ids, labels and 2-D positions of a handcrafted example",
          "[train][layout]") {
  auto config = qg::io::load_model_config(kDemoModel);
  REQUIRE(config.gmask_token_id == 5);
  REQUIRE(config.bos_token_id == 8);
  REQUIRE(config.eos_token_id == 9);
  auto ex = qg::train::layout_example({100, 101, 102}, {200, 201}, config, LayoutOptions{});
  const int I = kIgnoreLabel;
  CHECK(ex.input_ids == std::vector<int>{100, 101, 102, 5, 8, 200, 201, 9});
  CHECK(ex.labels == std::vector<int>{I, I, I, I, I, 200, 201, 9});
  CHECK(ex.next_token_targets() == std::vector<int>{I, I, I, I, 200, 201, 9, I});
  CHECK(ex.context_length == 4);
  CHECK(ex.mask_position == 3);
  CHECK(ex.position_ids == std::vector<int>{0, 1, 2, 3, 3, 3, 3, 3});
  CHECK(ex.block_position_ids == std::vector<int>{0, 0, 0, 0, 1, 2, 3, 4});
  CHECK(ex.scored_tokens() == 3);
  CHECK(ex.prompt_tokens_dropped == 0);
  CHECK(ex.answer_tokens_dropped == 0);

  LayoutOptions mask;
  mask.use_gmask = false;
  auto m = qg::train::layout_example({100}, {200}, config, mask);
  CHECK(m.input_ids == std::vector<int>{100, config.mask_token_id, 8, 200, 9});

  auto empty_prompt = qg::train::layout_example({}, {200}, config, LayoutOptions{});
  CHECK(empty_prompt.input_ids == std::vector<int>{5, 8, 200, 9});
  CHECK(empty_prompt.position_ids == std::vector<int>{0, 0, 0, 0});
  CHECK(empty_prompt.block_position_ids == std::vector<int>{0, 1, 2, 3});
}

TEST_CASE("train layout: truncation keeps the answer's start", "[train][layout]") {
  auto config = qg::io::load_model_config(kDemoModel);
  const auto prompt = range_ids(100, 10);
  LayoutOptions opt;
  opt.max_length = 10;
  opt.min_prompt_tokens = 2;

  SECTION("a long prompt shrinks first, from the chosen side") {
    auto start = qg::train::layout_example(prompt, {200, 201, 202}, config, opt);
    CHECK(start.input_ids == std::vector<int>{100, 101, 102, 103, 5, 8, 200, 201, 202, 9});
    CHECK(start.prompt_tokens_dropped == 6);
    CHECK(start.answer_tokens_dropped == 0);
    opt.prompt_truncation = PromptTruncation::kKeepEnd;
    auto end = qg::train::layout_example(prompt, {200, 201, 202}, config, opt);
    CHECK(end.input_ids == std::vector<int>{106, 107, 108, 109, 5, 8, 200, 201, 202, 9});
    CHECK(end.context_length == 5);
  }
  SECTION("then the answer loses its tail and its <eop>") {
    auto ex = qg::train::layout_example(prompt, range_ids(200, 20), config, opt);
    CHECK(ex.input_ids == std::vector<int>{100, 101, 5, 8, 200, 201, 202, 203, 204, 205});
    CHECK(ex.prompt_tokens_dropped == 8);
    CHECK(ex.answer_tokens_dropped == 14);
    CHECK(ex.labels.back() == 205);
    CHECK(ex.scored_tokens() == 6);
  }
  SECTION("an answer alone longer than max length keeps its first tokens") {
    auto ex = qg::train::layout_example({}, range_ids(200, 50), config, opt);
    CHECK(ex.input_ids == std::vector<int>{5, 8, 200, 201, 202, 203, 204, 205, 206, 207});
    opt.min_prompt_tokens = 1000;  // clamped so one answer token always fits
    auto floor = qg::train::layout_example(prompt, range_ids(200, 50), config, opt);
    CHECK(floor.input_ids == std::vector<int>{100, 101, 102, 103, 104, 105, 106, 5, 8, 200});
  }
  SECTION("every size combination respects the limits") {
    for (int max_len : {3, 4, 7, 16}) {
      for (int p = 0; p <= 12; ++p) {
        for (int a = 1; a <= 12; ++a) {
          opt.max_length = max_len;
          auto ex = qg::train::layout_example(range_ids(100, p), range_ids(200, a), config, opt);
          INFO("max " << max_len << " prompt " << p << " answer " << a);
          REQUIRE(ex.size() <= max_len);
          REQUIRE(ex.input_ids[static_cast<std::size_t>(ex.context_length) + 1] == 200);
          bool whole = ex.prompt_tokens_dropped == 0 && ex.answer_tokens_dropped == 0;
          bool eop = ex.input_ids.back() == 9;
          CHECK((whole && eop) == (p + a + 3 <= max_len));
          CHECK(ex.size() == p - ex.prompt_tokens_dropped + 2 + a - ex.answer_tokens_dropped + eop);
          // The prompt only shrinks to its floor when even the answer had to give way.
          if (!eop) CHECK(p - ex.prompt_tokens_dropped == std::min({p, 2, max_len - 3}));
        }
      }
    }
  }
  opt.max_length = 2;
  REQUIRE_THROWS_WITH(qg::train::layout_example(prompt, {200}, config, opt),
                      QG_CONTAINS("max length"));
}

TEST_CASE("train batches: deterministic, complete, similar lengths", "[train][batches]") {
  const auto lengths = random_lengths(2000, 10, 500, 7);
  BatchPlanOptions opt;
  opt.batch_size = 8;
  opt.bucket_examples = 256;
  opt.seed = 42;
  BatchPlanner a(lengths, opt), b(lengths, opt);
  auto e0 = a.epoch_batches(0);
  CHECK(e0 == b.epoch_batches(0));
  CHECK(e0 != a.epoch_batches(1));
  BatchPlanOptions other = opt;
  other.seed = 43;
  CHECK(e0 != BatchPlanner(lengths, other).epoch_batches(0));
  CHECK(a.fingerprint() != BatchPlanner(lengths, other).fingerprint());

  std::vector<int> seen(lengths.size(), 0);
  for (const auto& batch : e0) {
    CHECK(batch.size() <= 8);
    for (std::size_t i : batch) ++seen[i];
  }
  CHECK(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));
  CHECK(e0.size() == 250);

  BatchPlanOptions naive = opt;
  naive.bucket_examples = 1;
  auto bucketed = qg::train::padding_stats(e0, lengths);
  auto plain = qg::train::padding_stats(BatchPlanner(lengths, naive).epoch_batches(0), lengths);
  CHECK(bucketed.examples == lengths.size());
  CHECK(bucketed.real_tokens == plain.real_tokens);
  CHECK(bucketed.efficiency() > 0.95);
  CHECK(plain.efficiency() < 0.75);
}

TEST_CASE("train batches: a token budget bounds padded tokens", "[train][batches]") {
  auto lengths = random_lengths(500, 5, 300, 3);
  lengths[17] = 900;  // longer than the budget: a batch of its own
  BatchPlanOptions opt;
  opt.batch_size = 0;
  opt.max_tokens = 800;
  opt.bucket_examples = 100;
  auto batches = BatchPlanner(lengths, opt).epoch_batches(3);
  std::size_t examples = 0;
  for (const auto& batch : batches) {
    int longest = 0;
    for (std::size_t i : batch) longest = std::max(longest, lengths[i]);
    if (batch.size() > 1) CHECK(batch.size() * static_cast<std::size_t>(longest) <= 800);
    examples += batch.size();
  }
  CHECK(examples == lengths.size());
  auto alone = std::find_if(batches.begin(), batches.end(), [](const auto& b) {
    return std::find(b.begin(), b.end(), std::size_t{17}) != b.end();
  });
  REQUIRE(alone != batches.end());
  CHECK(alone->size() == 1);

  REQUIRE_THROWS_WITH(BatchPlanner({}, opt), QG_CONTAINS("no training examples"));
  REQUIRE_THROWS_WITH(BatchPlanner({3, 0}, opt), QG_CONTAINS("length must be >= 1"));
  opt.max_tokens = 0;
  REQUIRE_THROWS_WITH(BatchPlanner({3}, opt), QG_CONTAINS("batch size or a token budget"));
}

TEST_CASE("train batches: a resumed run sees the same batches", "[train][batches]") {
  const auto lengths = random_lengths(103, 1, 64, 11);
  BatchPlanOptions opt;
  opt.batch_size = 4;
  opt.bucket_examples = 32;
  BatchPlanner straight(lengths, opt);
  DataPosition pos = straight.start();
  std::vector<std::vector<std::size_t>> expected;
  for (int i = 0; i < 70; ++i) expected.push_back(straight.next(pos));  // crosses two epochs
  CHECK(pos.epoch == 2);
  CHECK(expected[0] == straight.epoch_batches(0)[0]);
  CHECK(expected[26] == straight.epoch_batches(1)[0]);  // 103 examples: 26 batches an epoch

  BatchPlanner first(lengths, opt);
  DataPosition p = first.start();
  for (int i = 0; i < 23; ++i) CHECK(first.next(p) == expected[static_cast<std::size_t>(i)]);
  std::string saved = p.to_json();
  CHECK(saved.find("\"epoch\":0,\"batch\":23") != std::string::npos);

  BatchPlanner resumed(lengths, opt);
  DataPosition q = DataPosition::from_json(saved, "state.json");
  CHECK(q == p);
  for (std::size_t i = 23; i < expected.size(); ++i) CHECK(resumed.next(q) == expected[i]);

  auto changed = lengths;
  changed[0] += 1;
  BatchPlanner other(changed, opt);
  DataPosition r = DataPosition::from_json(saved, "state.json");
  REQUIRE_THROWS_WITH(other.next(r), QG_CONTAINS("another batch plan"));
  r = resumed.start();
  r.batch = 26;
  REQUIRE_THROWS_WITH(resumed.next(r), QG_CONTAINS("past the end of epoch 0"));
  REQUIRE_THROWS_WITH(DataPosition::from_json(R"({"epoch":1,"batch":-2,"fingerprint":"00"})", "s"),
                      QG_CONTAINS("s: field \"batch\""));
  REQUIRE_THROWS_WITH(DataPosition::from_json(R"({"epoch":1,"batch":2,"fingerprint":"xyz"})", "s"),
                      QG_CONTAINS("\"fingerprint\""));
  REQUIRE_THROWS_WITH(DataPosition::from_json(R"({"epoch":1})", "s"), QG_CONTAINS("\"batch\""));
}

TEST_CASE("train split: seeded, stable when the file grows", "[train][split]") {
  auto examples = numbered_examples(0, 1000);
  qg::train::SplitOptions opt;
  opt.fraction = 0.2;
  auto split = qg::train::split_examples(examples, opt);
  CHECK(split.held_out.size() > 150);
  CHECK(split.held_out.size() < 250);
  CHECK(split.train.size() + split.held_out.size() == 1000);
  CHECK(qg::train::split_examples(examples, opt).held_out == split.held_out);

  auto held_text = [](const std::vector<TextExample>& ex, const qg::train::DataSplit& s) {
    std::set<std::string> out;
    for (std::size_t i : s.held_out) out.insert(ex[i].prompt);
    return out;
  };
  // More records, in another order: the old ones keep their side.
  auto grown = numbered_examples(0, 1300);
  std::mt19937 rng(5);
  std::shuffle(grown.begin(), grown.end(), rng);
  auto grown_held = held_text(grown, qg::train::split_examples(grown, opt));
  for (const auto& prompt : held_text(examples, split)) CHECK(grown_held.count(prompt) == 1);
  std::size_t old_held = 0;
  for (const auto& prompt : grown_held)
    old_held += std::stoi(prompt.substr(prompt.find(' ') + 1)) < 1000;
  CHECK(old_held == split.held_out.size());

  opt.seed = 2;
  CHECK(qg::train::split_examples(examples, opt).held_out != split.held_out);

  qg::train::SplitOptions count;
  count.count = 10;
  auto dup = numbered_examples(0, 50);
  auto by_count = qg::train::split_examples(dup, count);
  CHECK(by_count.held_out.size() == 10);
  dup.insert(dup.end(), dup.begin(), dup.end());  // every record twice
  auto with_dups = qg::train::split_examples(dup, count);
  auto held = held_text(dup, with_dups);
  for (std::size_t i : with_dups.train) CHECK(held.count(dup[i].prompt) == 0);

  opt.fraction = 1.0;
  REQUIRE_THROWS_WITH(qg::train::split_examples(examples, opt), QG_CONTAINS("[0, 1)"));
  count.count = 50;
  REQUIRE_THROWS_WITH(qg::train::split_examples(numbered_examples(0, 50), count),
                      QG_CONTAINS("leaves none to train on"));
}
