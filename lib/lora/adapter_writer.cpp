// Writing PEFT adapter directories (adapter_writer.h) through io::write_safetensors.
#include "qinggeng/lora/adapter_writer.h"

#include <cstdint>
#include <cstring>
#include <sstream>
#include <vector>

#include "io/atomic_file.h"
#include "io/json.h"
#include "qinggeng/error.h"
#include "qinggeng/io/safetensors.h"

namespace qg::lora {
namespace {

/// The last component of the module path: what PEFT users put in target_modules.
std::string_view short_module_name(LoraTarget target) {
  const std::string_view path = target_module(target);
  return path.substr(path.rfind('.') + 1);
}

/// `values` as little-endian bytes of `dtype`.
std::vector<std::uint8_t> encode(const float* values, std::size_t n, DType dtype) {
  std::vector<std::uint8_t> out(n * dtype_size(dtype));
  if (dtype == DType::F32) {
    std::memcpy(out.data(), values, out.size());
    return out;
  }
  auto* bits = reinterpret_cast<std::uint16_t*>(out.data());
  for (std::size_t i = 0; i < n; ++i) {
    bits[i] = dtype == DType::F16 ? float_to_half(values[i]) : float_to_bf16(values[i]);
  }
  return out;
}

}  // namespace

std::string lora_config_json(const LoraConfig& config) {
  std::ostringstream o;
  o << "{\n  \"peft_type\": \"LORA\",\n  \"task_type\": \"CAUSAL_LM\",\n  \"r\": " << config.r
    << ",\n  \"lora_alpha\": " << json::number(config.lora_alpha)
    << ",\n  \"lora_dropout\": " << json::number(config.lora_dropout)
    << ",\n  \"target_modules\": [";
  for (std::size_t i = 0; i < config.targets.size(); ++i) {
    o << (i ? ", " : "") << json::quote(short_module_name(config.targets[i]));
  }
  o << "],\n";
  if (!config.layers.empty()) {
    o << "  \"layers_to_transform\": [";
    for (std::size_t i = 0; i < config.layers.size(); ++i) o << (i ? ", " : "") << config.layers[i];
    o << "],\n";
  }
  // Only when set: PEFT before 0.7 rejects keys its LoraConfig does not know.
  if (config.use_rslora) o << "  \"use_rslora\": true,\n";
  o << "  \"bias\": \"none\",\n  \"fan_in_fan_out\": false,\n  \"inference_mode\": true"
    << ",\n  \"base_model_name_or_path\": " << json::quote(config.base_model_name_or_path)
    << "\n}\n";
  return o.str();
}

void save_adapter(const LoraAdapter& adapter, const std::filesystem::path& dir, DType dtype) {
  QG_CHECK(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16, dir.string(),
           ": adapter factors can be saved as F32, F16 or BF16, not ", dtype_name(dtype));
  const LoraConfig& config = adapter.config();
  std::vector<std::vector<std::uint8_t>> buffers;  // keeps the encoded data alive
  std::vector<io::TensorToWrite> tensors;
  const std::int64_t r = adapter.rank();
  for (int layer = 0; layer < adapter.num_layers(); ++layer) {
    if (!config.adapts_layer(layer)) continue;
    for (LoraTarget target : config.targets) {
      const std::string module = "base_model.model.transformer.layers." + std::to_string(layer) +
                                 "." + std::string(target_module(target));
      QG_CHECK(adapter.has(layer, target), dir.string(), ": cannot save the adapter: ", module,
               " is targeted by the config but has no factors");
      const auto [in, out] = adapter.features(target);
      const LoraFactors f = adapter.factors(layer, target);
      buffers.push_back(encode(f.a, static_cast<std::size_t>(r * in), dtype));
      tensors.push_back({module + ".lora_A.weight", dtype, {r, in}, buffers.back().data()});
      buffers.push_back(encode(f.b, static_cast<std::size_t>(out * r), dtype));
      tensors.push_back({module + ".lora_B.weight", dtype, {out, r}, buffers.back().data()});
    }
  }
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  QG_CHECK(!ec, dir.string(), ": cannot create the adapter directory (", ec.message(), ")");
  // Weights first: the config is what makes the directory an adapter, so it goes in last.
  io::write_safetensors(dir / "adapter_model.safetensors", tensors, {{"format", "pt"}});
  io::write_file_atomic(dir / "adapter_config.json", lora_config_json(config));
}

}  // namespace qg::lora
