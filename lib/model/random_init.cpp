// Random ChatGLM weights (see include/qinggeng/model/random_init.h). Values come from a
// counter-based generator (splitmix64 keyed by seed, tensor index and element index; uniform
// values of the requested mean and standard deviation), so they do not depend on how many threads fill them and 6B-sized models are made
// in seconds.
#include "qinggeng/model/random_init.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "qinggeng/counter_hash.h"
#include "qinggeng/error.h"
#include "qinggeng/io/safetensors.h"

namespace qg::model {
namespace {

struct TensorSpec {
  std::string name;
  std::vector<std::int64_t> shape;
  float mean = 0.0f;
  float scale = 1.0f;
  std::int64_t numel() const {
    std::int64_t n = 1;
    for (auto d : shape) n *= d;
    return n;
  }
};

std::vector<TensorSpec> tensor_specs(const io::ModelConfig& config, bool tie_lm_head) {
  const std::int64_t H = config.hidden_size, I = config.inner_hidden_size, V = config.vocab_size;
  const float h_scale = 1.0f / std::sqrt(static_cast<float>(H));
  const float i_scale = 1.0f / std::sqrt(static_cast<float>(I));
  std::vector<TensorSpec> specs = {{"transformer.word_embeddings.weight", {V, H}, 0.0f, 1.0f}};
  for (std::int64_t l = 0; l < config.num_layers; ++l) {
    const std::string p = "transformer.layers." + std::to_string(l) + ".";
    specs.push_back({p + "input_layernorm.weight", {H}, 1.0f, 0.1f});
    specs.push_back({p + "input_layernorm.bias", {H}, 0.0f, 0.1f});
    specs.push_back({p + "attention.query_key_value.weight", {3 * H, H}, 0.0f, h_scale});
    specs.push_back({p + "attention.query_key_value.bias", {3 * H}, 0.0f, 0.1f});
    specs.push_back({p + "attention.dense.weight", {H, H}, 0.0f, h_scale});
    specs.push_back({p + "attention.dense.bias", {H}, 0.0f, 0.1f});
    specs.push_back({p + "post_attention_layernorm.weight", {H}, 1.0f, 0.1f});
    specs.push_back({p + "post_attention_layernorm.bias", {H}, 0.0f, 0.1f});
    specs.push_back({p + "mlp.dense_h_to_4h.weight", {I, H}, 0.0f, h_scale});
    specs.push_back({p + "mlp.dense_h_to_4h.bias", {I}, 0.0f, 0.1f});
    specs.push_back({p + "mlp.dense_4h_to_h.weight", {H, I}, 0.0f, i_scale});
    specs.push_back({p + "mlp.dense_4h_to_h.bias", {H}, 0.0f, 0.1f});
  }
  specs.push_back({"transformer.final_layernorm.weight", {H}, 1.0f, 0.1f});
  specs.push_back({"transformer.final_layernorm.bias", {H}, 0.0f, 0.1f});
  if (!tie_lm_head) specs.push_back({"lm_head.weight", {V, H}, 0.0f, h_scale});
  return specs;
}

// Random number `i` of stream `key`: uniform with mean 0 and variance 1 (cheap enough for
// 6B parameters; the scales above are standard deviations).
float unit_at(std::uint64_t key, std::uint64_t i) {
  const std::uint64_t bits = splitmix64(key ^ splitmix64(i));
  const double u = static_cast<double>(bits >> 11) * (1.0 / 9007199254740992.0);  // [0, 1)
  return static_cast<float>((2.0 * u - 1.0) * 1.7320508075688772);                 // sqrt(3)
}

/// The bytes of one tensor in `dtype`, filled on every hardware thread.
std::vector<std::byte> generate(const TensorSpec& spec, std::uint64_t key, DType dtype) {
  const std::int64_t n = spec.numel();
  std::vector<std::byte> bytes(static_cast<std::size_t>(n) * dtype_size(dtype));
  auto fill = [&](std::int64_t begin, std::int64_t end) {
    for (std::int64_t i = begin; i < end; ++i) {
      const float v = spec.mean + spec.scale * unit_at(key, static_cast<std::uint64_t>(i));
      if (dtype == DType::F32) {
        std::memcpy(bytes.data() + i * 4, &v, 4);
      } else {
        const std::uint16_t h = dtype == DType::F16 ? float_to_half(v) : float_to_bf16(v);
        std::memcpy(bytes.data() + i * 2, &h, 2);
      }
    }
  };
  const std::int64_t threads = std::max<std::int64_t>(
      1, std::min<std::int64_t>(std::thread::hardware_concurrency(), n / (1 << 16)));
  std::vector<std::thread> pool;
  const std::int64_t chunk = (n + threads - 1) / threads;
  for (std::int64_t t = 1; t < threads; ++t) {
    pool.emplace_back(fill, std::min(n, t * chunk), std::min(n, (t + 1) * chunk));
  }
  fill(0, std::min(n, chunk));
  for (auto& th : pool) th.join();
  return bytes;
}

void check_options(const io::ModelConfig& config, const RandomModelOptions& options) {
  config.validate("random model");
  QG_CHECK(options.dtype == DType::F32 || options.dtype == DType::F16 || options.dtype == DType::BF16,
           "random model: dtype must be F32, F16 or BF16");
}

std::uint64_t tensor_key(std::uint64_t seed, std::size_t index) {
  return splitmix64(seed * 0x100000001B3ull + index);
}

}  // namespace

void write_random_model(const std::filesystem::path& dir, const io::ModelConfig& config,
                        const RandomModelOptions& options) {
  check_options(config, options);
  std::filesystem::create_directories(dir);
  const auto specs = tensor_specs(config, options.tie_lm_head);
  std::vector<std::vector<std::byte>> data;
  std::vector<io::TensorToWrite> out;
  for (std::size_t k = 0; k < specs.size(); ++k) {
    data.push_back(generate(specs[k], tensor_key(options.seed, k), options.dtype));
  }
  for (std::size_t k = 0; k < specs.size(); ++k) {
    out.push_back(io::TensorToWrite{specs[k].name, options.dtype, specs[k].shape, data[k].data()});
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

GlmModel::WeightSource random_weight_source(const io::ModelConfig& config,
                                            const RandomModelOptions& options) {
  check_options(config, options);
  struct State {
    std::vector<TensorSpec> specs;
    std::vector<std::byte> current;
    io::TensorView view;
  };
  auto state = std::make_shared<State>();
  state->specs = tensor_specs(config, options.tie_lm_head);
  return [state, options](const std::string& name,
                          const std::vector<std::int64_t>&) -> const io::TensorView* {
    const auto& specs = state->specs;
    const auto it = std::find_if(specs.begin(), specs.end(),
                                 [&](const TensorSpec& s) { return s.name == name; });
    if (it == specs.end()) return nullptr;
    const auto k = static_cast<std::size_t>(it - specs.begin());
    state->current = generate(*it, tensor_key(options.seed, k), options.dtype);
    state->view = io::TensorView{name, options.dtype, it->shape, state->current.data(),
                                 state->current.size(), "random weights"};
    return &state->view;
  };
}

GlmModel random_model(const io::ModelConfig& config, std::shared_ptr<Backend> backend,
                      const RandomModelOptions& options) {
  return GlmModel::from_source(config, random_weight_source(config, options), std::move(backend));
}

}  // namespace qg::model
