// LoraAdapter: a PEFT LoRA adapter for ChatGLM-6B (adapter_config.json plus
// adapter_model.safetensors or adapter_model.bin), held as float32 factors per layer and
// target module. The factors are applied at run time (lora_add.h on the host, cuda/lora.h on
// the GPU, several adapters per batch) or folded into the base weights (merge.h).
//
// PEFT layout (spec section 5): tensor
//   base_model.model.transformer.layers.{i}.<module>.lora_A.weight  [r, in]
//   base_model.model.transformer.layers.{i}.<module>.lora_B.weight  [out, r]
// for each targeted <module> among attention.query_key_value, attention.dense,
// mlp.dense_h_to_4h and mlp.dense_4h_to_h; the update is W x + scale * B (A x) with
// scale = lora_alpha / r (lora_alpha / sqrt(r) when use_rslora is set).
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "qinggeng/io/model_config.h"
#include "qinggeng/lora/lora_add.h"

namespace qg::lora {

/// \brief A linear layer of a GLM block that LoRA can adapt.
enum class LoraTarget { QueryKeyValue, Dense, DenseHTo4H, Dense4HToH };

/// \brief Every LoraTarget, in block order.
inline constexpr LoraTarget kLoraTargets[] = {LoraTarget::QueryKeyValue, LoraTarget::Dense,
                                             LoraTarget::DenseHTo4H, LoraTarget::Dense4HToH};

/// \brief The module path inside a layer: "attention.query_key_value", "attention.dense",
/// "mlp.dense_h_to_4h" or "mlp.dense_4h_to_h".
std::string_view target_module(LoraTarget target);

/// \brief [in_features, out_features] of the target's Linear in a model of this shape.
std::pair<std::int64_t, std::int64_t> target_features(LoraTarget target,
                                                      const io::ModelConfig& model);

/// \brief Name of the base weight the target adapts:
/// "transformer.layers.{layer}.attention.query_key_value.weight" and so on.
std::string base_weight_name(int layer, LoraTarget target);

/// \brief The hyper-parameters of adapter_config.json that matter for inference.
struct LoraConfig {
  std::int64_t r = 8;
  double lora_alpha = 16;
  double lora_dropout = 0;                ///< training only; ignored at inference
  bool use_rslora = false;                ///< scale = alpha / sqrt(r) instead of alpha / r
  std::vector<LoraTarget> targets;        ///< modules named by target_modules
  std::vector<int> layers;                ///< layers_to_transform; empty means every layer
  std::string base_model_name_or_path;

  /// \brief lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora.
  float scale() const;
  /// \brief Whether `layer` is adapted (layers_to_transform).
  bool adapts_layer(int layer) const;
};

/// \brief Parses adapter_config.json (PEFT) text; `origin` names it in errors.
/// \throws qg::Error naming origin and field for a missing or mistyped field, peft_type other
/// than "LORA", r < 1, fan_in_fan_out true, bias other than "none", use_dora, rank_pattern /
/// alpha_pattern entries, modules_to_save, or a target module ChatGLM does not have.
LoraConfig parse_lora_config(std::string_view json_text, const std::string& origin);

/// \brief A loaded adapter: the config and the float32 A [r, in] / B [out, r] of every
/// adapted (layer, target).
class LoraAdapter {
 public:
  /// \brief An adapter with no factors yet, for a model of `model`'s shape (see set()).
  LoraAdapter(LoraConfig config, const io::ModelConfig& model);

  /// \brief Loads `dir`/adapter_config.json and `dir`/adapter_model.safetensors (or
  /// adapter_model.bin when there is no safetensors file) for a model shaped like `model`.
  /// \throws qg::Error naming the file and tensor for a missing file or key, a shape other
  /// than [r, in] / [out, r] (the r of the config, the in/out of the model), a tensor the
  /// config does not account for, or an unsupported setting (see parse_lora_config).
  static LoraAdapter load(const std::filesystem::path& dir, const io::ModelConfig& model);

  /// \brief Sets the factors of (layer, target): a is [r, in], b is [out, r] row-major.
  /// \throws qg::Error naming the module when the layer/target is not adapted by the config
  /// or the sizes are wrong.
  void set(int layer, LoraTarget target, std::vector<float> a, std::vector<float> b);

  const LoraConfig& config() const { return config_; }
  std::int64_t rank() const { return config_.r; }
  float scale() const { return config_.scale(); }
  std::int64_t num_layers() const { return num_layers_; }
  /// \brief [in, out] of `target` in the model this adapter was made for.
  std::pair<std::int64_t, std::int64_t> features(LoraTarget target) const;

  /// \brief True when (layer, target) has factors.
  bool has(int layer, LoraTarget target) const;
  /// \brief Borrowed factors of (layer, target) with this adapter's scale, or an empty entry
  /// (rank 0: "leave the rows as they are") when the adapter does not touch it.
  LoraFactors factors(int layer, LoraTarget target) const;

 private:
  struct Module {
    std::vector<float> a, b;  // empty when not adapted
  };
  Module& module(int layer, LoraTarget target);
  const Module& module(int layer, LoraTarget target) const;

  LoraConfig config_;
  std::int64_t num_layers_ = 0;
  std::int64_t hidden_ = 0, inner_ = 0;
  std::vector<Module> modules_;  // [layer][target]
};

}  // namespace qg::lora
