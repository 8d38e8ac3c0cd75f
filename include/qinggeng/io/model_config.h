// ModelConfig: the hyper-parameters of a ChatGLM (v1) checkpoint, read from the HF
// `config.json` (keys in the spec, section 1). Special-token ids come from here, never from
// constants, because the first release and the updated tokenizer differ by 20000.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>

namespace qg::io {

/// \brief ChatGLM-6B style configuration.
struct ModelConfig {
  std::int64_t vocab_size = 130528;
  std::int64_t hidden_size = 4096;
  std::int64_t num_layers = 28;
  std::int64_t num_attention_heads = 32;
  std::int64_t inner_hidden_size = 16384;
  double layernorm_epsilon = 1e-5;
  std::int64_t max_sequence_length = 2048;
  bool position_encoding_2d = true;
  int bos_token_id = 130004;    ///< <sop>
  int eos_token_id = 130005;    ///< <eop>
  int mask_token_id = 130000;   ///< [MASK]
  int gmask_token_id = 130001;  ///< [gMASK]
  int pad_token_id = 3;
  std::string torch_dtype = "float16";

  /// \brief hidden_size / num_attention_heads.
  std::int64_t head_dim() const { return hidden_size / num_attention_heads; }

  /// \brief Checks the values are usable (positive sizes, hidden divisible by 4 * heads so
  /// each head splits into two rotary halves, special ids inside the vocabulary).
  /// \throws qg::Error naming `origin` and the offending field.
  void validate(const std::string& origin) const;

  /// \brief The config.json text for this configuration (HF key names).
  std::string to_json() const;
};

/// \brief Reads `dir/config.json` (or the file itself when `path` is a file).
/// \throws qg::Error naming the file and field for missing keys, wrong types, or values
/// this library cannot run (e.g. pre_seq_len P-tuning prefixes, position_encoding_2d false).
ModelConfig load_model_config(const std::filesystem::path& path);

}  // namespace qg::io
