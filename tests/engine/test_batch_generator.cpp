// Continuous batching: batched generation equals one-by-one generation; requests join and
// leave between steps; the batch never exceeds its limits.
#include <vector>

#include "catch.hpp"
#include "model_fixtures.h"
#include "qinggeng/engine/batch_generator.h"
#include "qinggeng/error.h"

using namespace qg;

namespace {

std::vector<std::vector<int>> prompts_for(const io::ModelConfig& c) {
  return {
      {5, 6, 7, c.gmask_token_id, c.bos_token_id},
      {c.gmask_token_id, c.bos_token_id},
      {9, 10, 11, 12, 13, 14, 15, 16, 17, c.gmask_token_id, c.bos_token_id},
      {20, c.mask_token_id, 21, 22, c.bos_token_id},
      {30, 31, c.gmask_token_id, c.bos_token_id},
  };
}

}  // namespace

TEST_CASE("batched generation equals one-by-one generation, greedy and sampled") {
  const auto model = model::GlmModel::load(test::tiny_model_dir("batchgen", 31), model::make_cpu_backend(2));
  const auto prompts = prompts_for(model.config());
  for (bool sample : {false, true}) {
    engine::GenerationConfig g;
    g.max_new_tokens = 9;
    g.sampling.do_sample = sample;
    g.sampling.temperature = 1.3f;
    g.sampling.top_p = 0.9f;
    g.sampling.seed = 77;
    for (int max_sequences : {1, 2, 5}) {
      INFO("sample " << sample << " max_sequences " << max_sequences);
      const auto batched = engine::generate_batch(model, prompts, g, {max_sequences, 4096});
      REQUIRE(batched.size() == prompts.size());
      for (std::size_t i = 0; i < prompts.size(); ++i) {
        const auto alone = engine::generate(model, prompts[i], g);
        CHECK(batched[i].tokens == alone.tokens);
        CHECK(batched[i].reason == alone.reason);
      }
    }
  }
}

TEST_CASE("requests join and leave between steps within the batch limits") {
  const auto model = model::GlmModel::load(test::tiny_model_dir("batchgen-flow", 32), model::make_cpu_backend(2));
  const auto prompts = prompts_for(model.config());
  engine::BatchGenerator batch(model, {2, 12});
  std::vector<std::vector<int>> streamed(prompts.size());
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    engine::GenerationConfig g;
    g.sampling.do_sample = false;
    g.max_new_tokens = 2 + static_cast<int>(i) * 3;  // different lengths: they finish apart
    batch.submit({prompts[i], g, [&streamed, i](int t) {
                    streamed[i].push_back(t);
                    return true;
                  }});
  }
  CHECK(batch.waiting() == prompts.size());
  std::vector<engine::FinishedRequest> finished;
  int steps = 0;
  while (batch.step()) {
    ++steps;
    CHECK(batch.active() <= 2);
    for (auto& f : batch.take_finished()) finished.push_back(std::move(f));
    // A late request joins while others are running.
    if (steps == 3) {
      engine::GenerationConfig g;
      g.sampling.do_sample = false;
      g.max_new_tokens = 4;
      CHECK(batch.submit({prompts[0], g, {}}) == 5);
    }
  }
  REQUIRE(finished.size() == prompts.size() + 1);
  for (const auto& f : finished) {
    if (f.id < static_cast<int>(prompts.size())) {
      CHECK(f.result.tokens == streamed[static_cast<std::size_t>(f.id)]);
      CHECK(static_cast<int>(f.result.tokens.size()) <= 2 + f.id * 3);
    }
  }
  CHECK(finished.front().id == 0);  // the shortest request leaves first
}

TEST_CASE("submit rejects prompts it cannot generate from") {
  const auto model = model::GlmModel::load(test::tiny_model_dir("batchgen-err", 33), model::make_cpu_backend(1));
  engine::BatchGenerator batch(model);
  REQUIRE_THROWS_WITH(batch.submit({{1, 2, 3}, {}, {}}), QG_CONTAINS("<sop>"));
  REQUIRE_THROWS_AS(batch.submit({{}, {}, {}}), qg::Error);
  std::vector<int> too_long(64, 1);
  too_long.back() = model.config().bos_token_id;
  REQUIRE_THROWS_WITH(batch.submit({too_long, {}, {}}), QG_CONTAINS("no room"));
  CHECK_FALSE(batch.step());
  REQUIRE_THROWS_AS(engine::BatchGenerator(model, {0, 10}), qg::Error);
}
