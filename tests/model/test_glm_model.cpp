// The whole ChatGLM forward on the CPU reference: golden logits from an independent PyTorch
// implementation (tests/torch/glm_reference.py, real torch.save checkpoints), KV-cache decoding
// equal to a full forward, batched equal to one-by-one, and the error paths.
#include <filesystem>
#include <fstream>
#include <vector>

#include "catch.hpp"
#include "model_fixtures.h"
#include "qinggeng/engine/generator.h"
#include "qinggeng/error.h"
#include "qinggeng/io/npy.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/text/glm_layout.h"

using namespace qg;

namespace {

void check_logits_match(const std::vector<float>& got, const io::NpyArray& expect, double atol) {
  REQUIRE(got.size() == expect.data.size());
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    worst = std::max(worst, std::abs(static_cast<double>(got[i]) - expect.data[i]));
  }
  INFO("max |ours - torch| = " << worst);
  CHECK(worst < atol);
}

}  // namespace

TEST_CASE("golden logits: sharded fp16 torch .bin checkpoint equals the PyTorch reference") {
  const auto dir = std::filesystem::path(QG_TEST_FIXTURES) / "torch_tiny";
  const auto model = model::GlmModel::load(dir, model::make_cpu_backend(2));
  CHECK(model.config().vocab_size == 160);
  const std::vector<std::pair<const char*, std::vector<int>>> cases = {
      {"prompt", {5, 17, 33, 2, 151, 154}},
      {"answer", {5, 17, 33, 2, 151, 154, 40, 41, 99, 7}},
      {"mask", {9, 150, 12, 13, 154, 60, 61}},
      {"plain", {0, 1, 2, 3, 4}},
  };
  for (const auto& [name, ids] : cases) {
    INFO("case " << name);
    const auto golden = io::read_npy_f32(dir / (std::string("golden_") + name + ".npy"));
    REQUIRE(golden.shape == std::vector<std::int64_t>{static_cast<std::int64_t>(ids.size()), 160});
    check_logits_match(engine::score_logits(model, ids), golden, 2e-4);
  }
}

TEST_CASE("golden logits: single-file bf16 checkpoint with a tied lm_head") {
  const auto dir = std::filesystem::path(QG_TEST_FIXTURES) / "torch_tiny_bf16";
  const auto model = model::GlmModel::load(dir, model::make_cpu_backend(2));
  const auto golden = io::read_npy_f32(dir / "golden_answer.npy");
  check_logits_match(engine::score_logits(model, {5, 17, 33, 2, 151, 154, 40, 41, 99, 7}), golden, 2e-4);
}

TEST_CASE("KV-cache decoding gives the same logits as a full forward") {
  const auto dir = test::tiny_model_dir("kv", 3);
  const auto model = model::GlmModel::load(dir, model::make_cpu_backend(2));
  const auto& c = model.config();
  std::vector<int> ids = {11, 12, 13, 14, c.gmask_token_id, c.bos_token_id};
  const auto layout = text::GlmLayout::from_ids(ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id);
  auto cache = model.new_kv_cache();
  const auto V = static_cast<std::size_t>(c.vocab_size);
  // Prefill, then feed 8 more tokens one at a time, comparing each step's logits with the
  // matching row of one forward over the whole sequence.
  model::SequenceChunk prefill{cache.get(), ids, {}, {}, layout.context_length, false};
  for (int t = 0; t < static_cast<int>(ids.size()); ++t) {
    prefill.positions.push_back(layout.position(t));
    prefill.block_positions.push_back(layout.block_position(t));
  }
  std::vector<std::vector<float>> step_logits = {model.forward({prefill})};
  for (int step = 0; step < 8; ++step) {
    const int next = 20 + step * 7;
    const int t = static_cast<int>(ids.size());
    ids.push_back(next);
    step_logits.push_back(model.forward(
        {{cache.get(), {next}, {layout.position(t)}, {layout.block_position(t)}, layout.context_length, false}}));
  }
  const auto full = engine::score_logits(model, ids);
  for (std::size_t s = 0; s < step_logits.size(); ++s) {
    const std::size_t row = 5 + s;  // the <sop> row, then each fed token
    double worst = 0;
    for (std::size_t v = 0; v < V; ++v) {
      worst = std::max(worst, static_cast<double>(std::abs(step_logits[s][v] - full[row * V + v])));
    }
    INFO("step " << s);
    CHECK(worst < 1e-4);
  }
}

TEST_CASE("a batched forward equals one-by-one forwards") {
  const auto dir = test::tiny_model_dir("batch", 4);
  const auto model = model::GlmModel::load(dir, model::make_cpu_backend(2));
  const auto& c = model.config();
  const std::vector<std::vector<int>> seqs = {
      {3, 4, 5, c.gmask_token_id, c.bos_token_id, 30, 31},
      {7, c.mask_token_id, 8, 9, 10, c.bos_token_id},
      {c.gmask_token_id, c.bos_token_id, 44},
  };
  std::vector<std::unique_ptr<model::KvCache>> caches;
  std::vector<model::SequenceChunk> batch;
  for (const auto& ids : seqs) {
    const auto layout = text::GlmLayout::from_ids(ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id);
    caches.push_back(model.new_kv_cache());
    model::SequenceChunk chunk{caches.back().get(), ids, {}, {}, layout.context_length, true};
    for (int t = 0; t < static_cast<int>(ids.size()); ++t) {
      chunk.positions.push_back(layout.position(t));
      chunk.block_positions.push_back(layout.block_position(t));
    }
    batch.push_back(chunk);
  }
  const auto batched = model.forward(batch);
  std::vector<float> one_by_one;
  for (const auto& ids : seqs) {
    const auto l = engine::score_logits(model, ids);
    one_by_one.insert(one_by_one.end(), l.begin(), l.end());
  }
  REQUIRE(batched.size() == one_by_one.size());
  for (std::size_t i = 0; i < batched.size(); ++i) REQUIRE(batched[i] == Approx(one_by_one[i]).margin(1e-5));
}

TEST_CASE("model loading and forward report bad input clearly") {
  const auto dir = test::tiny_model_dir("errors", 5);
  SECTION("missing directory") {
    REQUIRE_THROWS_WITH(model::GlmModel::load(dir / "nope", model::make_cpu_backend(1)),
                        QG_CONTAINS("config.json"));
  }
  SECTION("config whose hidden size disagrees with the weights") {
    const auto bad = test::scratch_dir("bad-shape");
    std::filesystem::copy(dir, bad, std::filesystem::copy_options::recursive |
                                        std::filesystem::copy_options::overwrite_existing);
    auto cfg = io::load_model_config(dir);
    cfg.hidden_size = 48;
    cfg.num_attention_heads = 4;
    std::ofstream(bad / "config.json") << cfg.to_json();
    REQUIRE_THROWS_WITH(model::GlmModel::load(bad, model::make_cpu_backend(1)),
                        QG_CONTAINS("transformer.word_embeddings.weight"));
  }
  SECTION("token ids outside the vocabulary, empty input, missing <sop>, over-long input") {
    const auto model = model::GlmModel::load(dir, model::make_cpu_backend(1));
    const auto& c = model.config();
    REQUIRE_THROWS_WITH(engine::score_logits(model, {1, static_cast<int>(c.vocab_size)}),
                        QG_CONTAINS("outside the vocabulary"));
    REQUIRE_THROWS_AS(engine::score_logits(model, {}), qg::Error);
    REQUIRE_THROWS_WITH(engine::generate(model, {1, 2, 3}, {}), QG_CONTAINS("<sop>"));
    std::vector<int> longest(static_cast<std::size_t>(c.max_sequence_length) + 1, 1);
    REQUIRE_THROWS_WITH(engine::score_logits(model, longest), QG_CONTAINS("max_sequence_length"));
  }
}
