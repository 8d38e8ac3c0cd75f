// write_random_model (see include/qinggeng/model/random_init.h).
#include "qinggeng/model/random_init.h"

#include <cmath>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "qinggeng/error.h"
#include "qinggeng/io/safetensors.h"

namespace qg::model {
namespace {

struct Stored {
  std::string name;
  std::vector<std::int64_t> shape;
  std::vector<std::uint16_t> half;  // F16 / BF16 bits
  std::vector<float> full;          // F32 values
};

}  // namespace

void write_random_model(const std::filesystem::path& dir, const io::ModelConfig& config,
                        const RandomModelOptions& options) {
  config.validate("write_random_model");
  QG_CHECK(options.dtype == DType::F32 || options.dtype == DType::F16 || options.dtype == DType::BF16,
           "write_random_model: dtype must be F32, F16 or BF16");
  std::filesystem::create_directories(dir);
  std::mt19937_64 rng(options.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const std::int64_t H = config.hidden_size, I = config.inner_hidden_size, V = config.vocab_size;

  std::vector<Stored> tensors;
  auto add = [&](std::string name, std::vector<std::int64_t> shape, float mean, float scale) {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    Stored s{std::move(name), std::move(shape), {}, {}};
    for (std::int64_t i = 0; i < n; ++i) {
      const float v = mean + scale * normal(rng);
      if (options.dtype == DType::F32) s.full.push_back(v);
      else s.half.push_back(options.dtype == DType::F16 ? float_to_half(v) : float_to_bf16(v));
    }
    tensors.push_back(std::move(s));
  };
  const float h_scale = 1.0f / std::sqrt(static_cast<float>(H));
  const float i_scale = 1.0f / std::sqrt(static_cast<float>(I));
  add("transformer.word_embeddings.weight", {V, H}, 0.0f, 1.0f);
  for (std::int64_t l = 0; l < config.num_layers; ++l) {
    const std::string p = "transformer.layers." + std::to_string(l) + ".";
    add(p + "input_layernorm.weight", {H}, 1.0f, 0.1f);
    add(p + "input_layernorm.bias", {H}, 0.0f, 0.1f);
    add(p + "attention.query_key_value.weight", {3 * H, H}, 0.0f, h_scale);
    add(p + "attention.query_key_value.bias", {3 * H}, 0.0f, 0.1f);
    add(p + "attention.dense.weight", {H, H}, 0.0f, h_scale);
    add(p + "attention.dense.bias", {H}, 0.0f, 0.1f);
    add(p + "post_attention_layernorm.weight", {H}, 1.0f, 0.1f);
    add(p + "post_attention_layernorm.bias", {H}, 0.0f, 0.1f);
    add(p + "mlp.dense_h_to_4h.weight", {I, H}, 0.0f, h_scale);
    add(p + "mlp.dense_h_to_4h.bias", {I}, 0.0f, 0.1f);
    add(p + "mlp.dense_4h_to_h.weight", {H, I}, 0.0f, i_scale);
    add(p + "mlp.dense_4h_to_h.bias", {H}, 0.0f, 0.1f);
  }
  add("transformer.final_layernorm.weight", {H}, 1.0f, 0.1f);
  add("transformer.final_layernorm.bias", {H}, 0.0f, 0.1f);
  if (!options.tie_lm_head) add("lm_head.weight", {V, H}, 0.0f, h_scale);

  std::vector<io::TensorToWrite> out;
  for (const auto& s : tensors) {
    const void* data = options.dtype == DType::F32 ? static_cast<const void*>(s.full.data())
                                                   : static_cast<const void*>(s.half.data());
    out.push_back(io::TensorToWrite{s.name, options.dtype, s.shape, data});
  }
  io::write_safetensors(dir / "model.safetensors", out, {{"format", "pt"}});

  io::ModelConfig stored = config;
  stored.torch_dtype = options.dtype == DType::F32 ? "float32"
                       : options.dtype == DType::F16 ? "float16" : "bfloat16";
  const auto tmp = dir / "config.json.tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    QG_CHECK(f, tmp.string(), ": cannot write");
    f << stored.to_json();
    QG_CHECK(f.good(), tmp.string(), ": write failed");
  }
  std::filesystem::rename(tmp, dir / "config.json");
}

}  // namespace qg::model
