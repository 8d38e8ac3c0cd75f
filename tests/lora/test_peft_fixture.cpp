// An adapter written by Python PEFT itself (tests/fixtures/peft_tiny, made on the GPU machine
// by tests/torch/make_peft_fixture.py): LoraAdapter::load reads PEFT's real adapter_config.json
// and safetensors, and the LoRA output computed from what it read equals the one PEFT computed
// (x.npy, delta_<layer>_<module>.npy, PEFT in eval mode). The opposite direction — PEFT
// loading an adapter we wrote — is checked by tests/torch/lora_grad_check.py.
#include <string>
#include <vector>

#include "catch.hpp"
#include "model_fixtures.h"
#include "qinggeng/io/npy.h"
#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/lora/lora_add.h"

using namespace qg;
using lora::LoraTarget;

TEST_CASE("an adapter saved by Python PEFT loads and computes PEFT's LoRA output", "[lora]") {
  const std::filesystem::path dir = std::filesystem::path(QG_TEST_FIXTURES) / "peft_tiny";
  const io::ModelConfig model = test::tiny_config();
  const lora::LoraAdapter adapter = lora::LoraAdapter::load(dir, model);
  CHECK(adapter.config().r == 4);
  CHECK(adapter.config().lora_alpha == Approx(8));
  CHECK(adapter.config().lora_dropout == Approx(0.1));
  CHECK(adapter.config().scale() == Approx(2.0));

  const io::NpyArray x = io::read_npy_f32(dir / "x.npy");
  REQUIRE(x.shape == std::vector<std::int64_t>{3, 64});
  int checked = 0;
  for (int layer = 0; layer < model.num_layers; ++layer) {
    for (LoraTarget t : lora::kLoraTargets) {
      const std::string module(lora::target_module(t));
      const std::string leaf = module.substr(module.find('.') + 1);
      const bool peft_adapted = leaf == "query_key_value" || leaf == "dense_h_to_4h";
      INFO("layer " << layer << " " << leaf);
      REQUIRE(adapter.has(layer, t) == peft_adapted);
      if (!peft_adapted) continue;
      const io::NpyArray expected =
          io::read_npy_f32(dir / ("delta_" + std::to_string(layer) + "_" + leaf + ".npy"));
      const auto [in, out] = lora::target_features(t, model);
      REQUIRE(expected.shape == std::vector<std::int64_t>{3, out});
      std::vector<float> y(static_cast<std::size_t>(3 * out), 0.0f);
      const std::vector<std::int32_t> rows(3, 0);
      lora::lora_add(x.data.data(), 3, in, y.data(), out, {adapter.factors(layer, t)},
                     rows.data());
      for (std::size_t i = 0; i < y.size(); ++i) CHECK(y[i] == Approx(expected.data[i]).margin(1e-5));
      ++checked;
    }
  }
  CHECK(checked == 4);
}
