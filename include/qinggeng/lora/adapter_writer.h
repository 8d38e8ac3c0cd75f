// Saving a LoraAdapter as a PEFT adapter directory that Python PEFT (PeftModel.from_pretrained)
// and LoraAdapter::load read: adapter_config.json plus adapter_model.safetensors with the keys
//   base_model.model.transformer.layers.{i}.<module>.lora_A.weight  [r, in]
//   base_model.model.transformer.layers.{i}.<module>.lora_B.weight  [out, r]
#pragma once

#include <filesystem>
#include <string>

#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::lora {

/// \brief The adapter_config.json text PEFT writes for `config`: peft_type "LORA",
/// task_type "CAUSAL_LM", r, lora_alpha, lora_dropout, target_modules (the module names
/// "query_key_value", "dense", ...), layers_to_transform and use_rslora when set, bias "none",
/// fan_in_fan_out false, inference_mode true and base_model_name_or_path.
std::string lora_config_json(const LoraConfig& config);

/// \brief Writes `adapter` into `dir` (created if needed): adapter_model.safetensors first,
/// then adapter_config.json, each atomically (write-then-rename). Factors are stored as
/// `dtype` (F32, F16 or BF16, rounded to nearest even).
/// \throws qg::Error naming the module when a targeted (layer, module) has no factors, or
/// the path when a file cannot be written, or for a non-float dtype.
void save_adapter(const LoraAdapter& adapter, const std::filesystem::path& dir,
                  DType dtype = DType::F32);

}  // namespace qg::lora
