// Random ChatGLM checkpoints in the real HF layout (config.json + model.safetensors), for
// tests, benchmarks and as the starting point of full-parameter training of small models.
// Scales keep activations O(1): LayerNorm weights ~1, linear weights of variance 1/fan_in
// (uniform values, made by a counter-based generator).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>

#include "qinggeng/io/model_config.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::model {

/// \brief Options of write_random_model.
struct RandomModelOptions {
  std::uint64_t seed = 0;
  DType dtype = DType::F16;  ///< stored dtype: F32, F16 or BF16
  bool tie_lm_head = false;  ///< omit lm_head.weight (the model then reuses the embeddings)
};

/// \brief Writes `dir/config.json` and `dir/model.safetensors` with random weights of
/// `config`'s shapes (creating `dir`; existing files are replaced atomically).
void write_random_model(const std::filesystem::path& dir, const io::ModelConfig& config,
                        const RandomModelOptions& options = {});

/// \brief The tensors write_random_model would store, generated on request (a view stays valid
/// until the next call), for engines that load from a GlmModel::WeightSource.
GlmModel::WeightSource random_weight_source(const io::ModelConfig& config,
                                            const RandomModelOptions& options = {});

/// \brief A model with the same random weights write_random_model would store, built straight
/// on `backend` without files (benchmarks of 6B shapes).
GlmModel random_model(const io::ModelConfig& config, std::shared_ptr<Backend> backend,
                      const RandomModelOptions& options = {});

}  // namespace qg::model
