// Saving PEFT adapters: the exact key names and shapes PEFT uses, the adapter_config.json
// fields, a bit-exact round trip through LoraAdapter::load (F32) and the rounding of F16 /
// BF16, and the errors for an incomplete adapter.
#include <random>
#include <set>
#include <string>
#include <vector>

#include "catch.hpp"
#include "io/error_message.h"
#include "io/json.h"
#include "model_fixtures.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/adapter_writer.h"

namespace {

namespace fs = std::filesystem;
using qg::lora::LoraAdapter;
using qg::lora::LoraConfig;
using qg::lora::LoraTarget;

std::vector<float> random_factor(std::size_t n, std::uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.3f);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

/// Fills every adapted (layer, target) of `adapter` with random factors.
void fill(LoraAdapter& adapter) {
  std::uint32_t seed = 1;
  for (int layer = 0; layer < adapter.num_layers(); ++layer) {
    if (!adapter.config().adapts_layer(layer)) continue;
    for (LoraTarget t : adapter.config().targets) {
      const auto [in, out] = adapter.features(t);
      const auto r = static_cast<std::size_t>(adapter.rank());
      std::vector<float> a = random_factor(r * static_cast<std::size_t>(in), seed++);
      adapter.set(layer, t, std::move(a), random_factor(static_cast<std::size_t>(out) * r, seed++));
    }
  }
}

LoraConfig seed_config() {
  LoraConfig c;
  c.r = 4;
  c.lora_alpha = 16;
  c.lora_dropout = 0.1;
  c.targets = {LoraTarget::QueryKeyValue, LoraTarget::Dense4HToH};
  c.base_model_name_or_path = "THUDM/chatglm-6b";
  return c;
}

bool same_factors(const LoraAdapter& a, const LoraAdapter& b, int layer, LoraTarget t) {
  const auto [in, out] = a.features(t);
  const auto fa = a.factors(layer, t), fb = b.factors(layer, t);
  const auto r = a.rank();
  return fa.rank == fb.rank && fa.scale == fb.scale && std::equal(fa.a, fa.a + r * in, fb.a) &&
         std::equal(fa.b, fa.b + out * r, fb.b);
}

}  // namespace

TEST_CASE("save_adapter writes PEFT's keys, shapes and config; load gives the same factors") {
  const auto model = qg::test::tiny_config();
  LoraAdapter adapter(seed_config(), model);
  fill(adapter);
  const fs::path dir = qg::test::scratch_dir("adapter-writer") / "nested" / "adapter";
  qg::lora::save_adapter(adapter, dir);

  std::set<std::string> files;
  for (const auto& entry : fs::directory_iterator(dir)) files.insert(entry.path().filename());
  CHECK(files == std::set<std::string>{"adapter_config.json", "adapter_model.safetensors"});

  const auto store = qg::io::WeightStore::open(dir / "adapter_model.safetensors");
  const std::string p = "base_model.model.transformer.layers.";
  CHECK(store.names() == std::vector<std::string>{p + "0.attention.query_key_value.lora_A.weight",
                                                  p + "0.attention.query_key_value.lora_B.weight",
                                                  p + "0.mlp.dense_4h_to_h.lora_A.weight",
                                                  p + "0.mlp.dense_4h_to_h.lora_B.weight",
                                                  p + "1.attention.query_key_value.lora_A.weight",
                                                  p + "1.attention.query_key_value.lora_B.weight",
                                                  p + "1.mlp.dense_4h_to_h.lora_A.weight",
                                                  p + "1.mlp.dense_4h_to_h.lora_B.weight"});
  CHECK(store.get(p + "1.attention.query_key_value.lora_A.weight").shape ==
        std::vector<std::int64_t>{4, 64});
  CHECK(store.get(p + "1.attention.query_key_value.lora_B.weight").shape ==
        std::vector<std::int64_t>{192, 4});
  CHECK(store.get(p + "0.mlp.dense_4h_to_h.lora_A.weight").shape ==
        std::vector<std::int64_t>{4, 256});
  CHECK(store.get(p + "0.mlp.dense_4h_to_h.lora_B.weight").dtype == qg::DType::F32);

  const auto doc = qg::json::Document::load(dir / "adapter_config.json");
  const auto o = qg::json::as_object(doc.root(), "config", "config");
  CHECK(qg::json::get_string(o, "peft_type", "c") == "LORA");
  CHECK(qg::json::get_string(o, "task_type", "c") == "CAUSAL_LM");
  CHECK(qg::json::get_int(o, "r", "c") == 4);
  CHECK(qg::json::get_number(o, "lora_alpha", "c") == 16.0);
  CHECK(qg::json::get_number(o, "lora_dropout", "c") == 0.1);
  CHECK(qg::json::get_string(o, "bias", "c") == "none");
  CHECK_FALSE(qg::json::get_bool(o, "fan_in_fan_out", "c"));
  CHECK(qg::json::get_bool(o, "inference_mode", "c"));
  CHECK(qg::json::get_string(o, "base_model_name_or_path", "c") == "THUDM/chatglm-6b");
  CHECK(qg::test::mentions(qg::lora::lora_config_json(adapter.config()),
                           "\"target_modules\": [\"query_key_value\", \"dense_4h_to_h\"]"));

  const LoraAdapter loaded = LoraAdapter::load(dir, model);
  CHECK(loaded.config().targets == adapter.config().targets);
  CHECK(loaded.config().lora_dropout == 0.1);
  CHECK(loaded.scale() == 4.0f);
  for (int layer = 0; layer < 2; ++layer) {
    CHECK(same_factors(adapter, loaded, layer, LoraTarget::QueryKeyValue));
    CHECK(same_factors(adapter, loaded, layer, LoraTarget::Dense4HToH));
    CHECK_FALSE(loaded.has(layer, LoraTarget::Dense));
  }

  // Saving again over the directory replaces it cleanly.
  LoraAdapter second(seed_config(), model);
  fill(second);
  qg::lora::save_adapter(second, dir);
  CHECK(same_factors(second, LoraAdapter::load(dir, model), 1, LoraTarget::Dense4HToH));
}

TEST_CASE("save_adapter: layers_to_transform, rsLoRA, every target, half-precision storage") {
  const auto model = qg::test::tiny_config();
  LoraConfig c = seed_config();
  c.targets = {LoraTarget::QueryKeyValue, LoraTarget::Dense, LoraTarget::DenseHTo4H,
               LoraTarget::Dense4HToH};
  c.layers = {1};
  c.use_rslora = true;
  LoraAdapter adapter(c, model);
  fill(adapter);
  const fs::path root = qg::test::scratch_dir("adapter-writer-half");

  for (qg::DType dtype : {qg::DType::F16, qg::DType::BF16}) {
    const fs::path dir = root / std::string(qg::dtype_name(dtype));
    qg::lora::save_adapter(adapter, dir, dtype);
    const auto store = qg::io::WeightStore::open(dir / "adapter_model.safetensors");
    CHECK(store.names().size() == 8);
    CHECK(store.get("base_model.model.transformer.layers.1.attention.dense.lora_A.weight").dtype ==
          dtype);
    const LoraAdapter loaded = LoraAdapter::load(dir, model);
    CHECK(loaded.config().layers == std::vector<int>{1});
    CHECK(loaded.config().use_rslora);
    CHECK(loaded.scale() == Approx(8.0f));
    CHECK_FALSE(loaded.has(0, LoraTarget::Dense));
    const auto [in, out] = adapter.features(LoraTarget::DenseHTo4H);
    const auto fa = adapter.factors(1, LoraTarget::DenseHTo4H);
    const auto fl = loaded.factors(1, LoraTarget::DenseHTo4H);
    for (std::int64_t i = 0; i < out * adapter.rank(); ++i) {
      const float rounded = dtype == qg::DType::F16 ? qg::half_to_float(qg::float_to_half(fa.b[i]))
                                                    : qg::bf16_to_float(qg::float_to_bf16(fa.b[i]));
      REQUIRE(fl.b[i] == rounded);
    }
    (void)in;
  }
}

TEST_CASE("save_adapter refuses an incomplete adapter or a non-float dtype") {
  const auto model = qg::test::tiny_config();
  LoraAdapter adapter(seed_config(), model);
  const fs::path dir = qg::test::scratch_dir("adapter-writer-bad");
  qg::test::check_mentions(
      qg::test::error_message([&] { qg::lora::save_adapter(adapter, dir); }),
      {"base_model.model.transformer.layers.0.attention.query_key_value", "no factors"});
  CHECK_FALSE(fs::exists(dir / "adapter_config.json"));
  fill(adapter);
  CHECK_THAT(qg::test::error_message([&] { qg::lora::save_adapter(adapter, dir, qg::DType::I8); }),
             QG_CONTAINS("F32, F16 or BF16"));
}
