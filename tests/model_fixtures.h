// Small random models written at test time in the real HF layout (config.json +
// model.safetensors), cached per test binary under the build directory.
#pragma once

#include <filesystem>
#include <string>

#include "qinggeng/io/model_config.h"
#include "qinggeng/model/random_init.h"
#include "scratch_dir.h"

namespace qg::test {

/// The tiny configuration the model tests use (vocab 200, hidden 64, 2 layers, 4 heads).
inline io::ModelConfig tiny_config() {
  io::ModelConfig c;
  c.vocab_size = 200;
  c.hidden_size = 64;
  c.num_layers = 2;
  c.num_attention_heads = 4;
  c.inner_hidden_size = 256;
  c.max_sequence_length = 64;
  c.mask_token_id = 190;
  c.gmask_token_id = 191;
  c.bos_token_id = 194;
  c.eos_token_id = 195;
  return c;
}

/// A wider configuration: the given sizes, special ids just below the vocabulary's end (the
/// release's relative layout: [MASK], [gMASK], then <sop>, <eop> four later).
inline io::ModelConfig sized_config(std::int64_t hidden, std::int64_t heads, std::int64_t inner,
                                    std::int64_t vocab, std::int64_t max_sequence_length = 64) {
  io::ModelConfig c = tiny_config();
  c.hidden_size = hidden;
  c.num_attention_heads = heads;
  c.inner_hidden_size = inner;
  c.vocab_size = vocab;
  c.max_sequence_length = max_sequence_length;
  const int base = static_cast<int>(vocab) - 12;
  c.mask_token_id = base;
  c.gmask_token_id = base + 1;
  c.bos_token_id = base + 4;
  c.eos_token_id = base + 5;
  return c;
}

/// Writes a random tiny model (F32 weights, given seed) and returns its directory.
inline std::filesystem::path tiny_model_dir(const std::string& name, std::uint64_t seed,
                                            const io::ModelConfig& config = tiny_config()) {
  const auto dir = scratch_dir("model-" + name);
  model::RandomModelOptions options;
  options.seed = seed;
  options.dtype = DType::F32;
  model::write_random_model(dir, config, options);
  return dir;
}

}  // namespace qg::test
