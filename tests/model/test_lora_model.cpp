// Runtime LoRA in the model: an adapter applied at run time gives the logits of the merged
// model; sequences with different adapters (or none) batch together and equal one-by-one.
#include <vector>

#include "catch.hpp"
#include "lora_fixtures.h"
#include "model_fixtures.h"
#include "qinggeng/engine/batch_generator.h"
#include "qinggeng/error.h"
#include "qinggeng/lora/merge.h"

using namespace qg;
using lora::LoraTarget;

namespace {

double max_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, static_cast<double>(std::abs(a[i] - b[i])));
  return worst;
}

}  // namespace

TEST_CASE("a runtime LoRA adapter gives the logits of the merged model") {
  const auto config = test::tiny_config();
  const auto dir = test::tiny_model_dir("lora-base", 41, config);
  auto model = model::GlmModel::load(dir, model::make_cpu_backend(2));
  const auto adapter = test::random_adapter(
      config, {LoraTarget::QueryKeyValue, LoraTarget::Dense, LoraTarget::DenseHTo4H, LoraTarget::Dense4HToH}, 4, 1);
  model.add_adapter(0, adapter);

  const auto merged_dir = test::scratch_dir("lora-merged");
  lora::merge_lora(io::WeightStore::open(dir), adapter, merged_dir);
  const auto merged = model::GlmModel::load(merged_dir, model::make_cpu_backend(2));

  const std::vector<int> ids = {5, 6, 7, config.gmask_token_id, config.bos_token_id, 30, 31};
  const auto layout = text::GlmLayout::from_ids(ids, config.bos_token_id, config.mask_token_id, config.gmask_token_id);
  auto cache = model.new_kv_cache();
  auto chunk = engine::layout_chunk(layout, *cache, ids, true);
  chunk.adapter = 0;
  const auto adapted = model.forward({chunk});
  const auto reference = engine::score_logits(merged, ids);
  const auto base = engine::score_logits(model, ids);  // adapter -1: the base model
  CHECK(max_diff(adapted, reference) < 1e-3);
  CHECK(max_diff(adapted, base) > 1e-2);  // the adapter really changes the output
}

TEST_CASE("sequences with different adapters batch together and equal one-by-one") {
  const auto config = test::tiny_config();
  auto model = model::GlmModel::load(test::tiny_model_dir("lora-batch", 42, config), model::make_cpu_backend(2));
  model.add_adapter(0, test::random_adapter(config, {LoraTarget::QueryKeyValue, LoraTarget::Dense4HToH}, 8, 2));
  model.add_adapter(1, test::random_adapter(config, {LoraTarget::DenseHTo4H}, 2, 3));
  const std::vector<int> prompt = {9, 10, 11, config.gmask_token_id, config.bos_token_id};
  engine::GenerationConfig g;
  g.sampling.do_sample = false;
  g.max_new_tokens = 6;
  engine::BatchGenerator batch(model, {3, 4096});
  std::vector<std::vector<int>> alone;
  for (int adapter : {0, -1, 1}) {
    g.adapter = adapter;
    batch.submit({prompt, g, {}});
    alone.push_back(engine::generate(model, prompt, g).tokens);
  }
  const auto results = batch.run();
  REQUIRE(results.size() == 3);
  for (std::size_t i = 0; i < 3; ++i) CHECK(results[i].result.tokens == alone[i]);
  CHECK((alone[0] != alone[1] || alone[2] != alone[1]));

  g.adapter = 5;
  REQUIRE_THROWS_WITH(engine::generate(model, prompt, g), QG_CONTAINS("adapter 5 is not loaded"));
  auto other = config;
  other.num_layers = 3;
  REQUIRE_THROWS_AS(model.add_adapter(2, test::random_adapter(other, {LoraTarget::Dense}, 2, 4)), qg::Error);
}
