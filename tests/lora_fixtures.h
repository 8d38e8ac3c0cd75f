// Random LoRA adapters for model-level tests (CPU and GPU suites).
#pragma once

#include <random>
#include <vector>

#include "qinggeng/lora/lora_adapter.h"

namespace qg::test {

/// An adapter of rank r on `targets` of every layer, A and B both random (a trained B is
/// non-zero) and large enough to move the logits clearly.
inline lora::LoraAdapter random_adapter(const io::ModelConfig& model,
                                        std::vector<lora::LoraTarget> targets, int r,
                                        unsigned seed) {
  lora::LoraConfig config;
  config.r = r;
  config.lora_alpha = 2.0 * r;
  config.targets = targets;
  lora::LoraAdapter adapter(config, model);
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 0.2f);
  for (int layer = 0; layer < model.num_layers; ++layer) {
    for (auto t : targets) {
      const auto [in, out] = lora::target_features(t, model);
      std::vector<float> a(static_cast<std::size_t>(r * in)), b(static_cast<std::size_t>(out * r));
      for (auto& v : a) v = normal(rng);
      for (auto& v : b) v = normal(rng);
      adapter.set(layer, t, std::move(a), std::move(b));
    }
  }
  return adapter;
}

}  // namespace qg::test
