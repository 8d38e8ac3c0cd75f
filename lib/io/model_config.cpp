// Reading and validating ChatGLM config.json (see include/qinggeng/io/model_config.h).
#include "qinggeng/io/model_config.h"

#include <sstream>

#include "io/json.h"
#include "qinggeng/error.h"

namespace qg::io {

void ModelConfig::validate(const std::string& origin) const {
  auto positive = [&](std::int64_t v, const char* key) {
    QG_CHECK(v > 0, origin, ": \"", key, "\" must be positive, got ", v);
  };
  positive(vocab_size, "vocab_size");
  positive(hidden_size, "hidden_size");
  positive(num_layers, "num_layers");
  positive(num_attention_heads, "num_attention_heads");
  positive(inner_hidden_size, "inner_hidden_size");
  positive(max_sequence_length, "max_sequence_length");
  QG_CHECK(hidden_size % num_attention_heads == 0, origin, ": hidden_size ", hidden_size,
           " is not divisible by num_attention_heads ", num_attention_heads);
  QG_CHECK(head_dim() % 4 == 0, origin, ": head dimension ", head_dim(),
           " must be divisible by 4 (two rotary halves, each rotated by halves)");
  QG_CHECK(layernorm_epsilon > 0, origin, ": \"layernorm_epsilon\" must be positive");
  auto in_vocab = [&](int id, const char* key) {
    QG_CHECK(id >= 0 && id < vocab_size, origin, ": \"", key, "\" ", id,
             " is outside the vocabulary [0, ", vocab_size, ")");
  };
  in_vocab(bos_token_id, "bos_token_id");
  in_vocab(eos_token_id, "eos_token_id");
  in_vocab(mask_token_id, "mask_token_id");
  in_vocab(gmask_token_id, "gmask_token_id");
}

std::string ModelConfig::to_json() const {
  std::ostringstream o;
  o.precision(10);
  o << "{\n"
    << "  \"architectures\": [\"ChatGLMModel\"],\n"
    << "  \"model_type\": \"chatglm\",\n"
    << "  \"vocab_size\": " << vocab_size << ",\n"
    << "  \"hidden_size\": " << hidden_size << ",\n"
    << "  \"num_layers\": " << num_layers << ",\n"
    << "  \"num_attention_heads\": " << num_attention_heads << ",\n"
    << "  \"inner_hidden_size\": " << inner_hidden_size << ",\n"
    << "  \"layernorm_epsilon\": " << layernorm_epsilon << ",\n"
    << "  \"max_sequence_length\": " << max_sequence_length << ",\n"
    << "  \"position_encoding_2d\": " << (position_encoding_2d ? "true" : "false") << ",\n"
    << "  \"bos_token_id\": " << bos_token_id << ",\n"
    << "  \"eos_token_id\": " << eos_token_id << ",\n"
    << "  \"mask_token_id\": " << mask_token_id << ",\n"
    << "  \"gmask_token_id\": " << gmask_token_id << ",\n"
    << "  \"pad_token_id\": " << pad_token_id << ",\n"
    << "  \"pre_seq_len\": null,\n"
    << "  \"torch_dtype\": " << json::quote(torch_dtype) << ",\n"
    << "  \"use_cache\": true\n"
    << "}\n";
  return o.str();
}

ModelConfig load_model_config(const std::filesystem::path& path) {
  const auto file = std::filesystem::is_directory(path) ? path / "config.json" : path;
  QG_CHECK(std::filesystem::exists(file), file.string(),
           ": not found (a model directory needs the HF config.json)");
  const auto doc = json::Document::load(file);
  const std::string origin = file.string();
  const auto o = json::as_object(doc.root(), origin, "the top level");

  if (auto type = json::optional_string(o, "model_type", origin)) {
    QG_CHECK(*type == "chatglm", origin, ": model_type \"", *type,
             "\" is not a ChatGLM v1 model (expected \"chatglm\")");
  }
  ModelConfig c;
  c.vocab_size = json::get_int(o, "vocab_size", origin);
  c.hidden_size = json::get_int(o, "hidden_size", origin);
  c.num_layers = json::get_int(o, "num_layers", origin);
  c.num_attention_heads = json::get_int(o, "num_attention_heads", origin);
  c.inner_hidden_size = json::optional_int(o, "inner_hidden_size", origin).value_or(4 * c.hidden_size);
  c.layernorm_epsilon = json::optional_number(o, "layernorm_epsilon", origin).value_or(1e-5);
  c.max_sequence_length = json::optional_int(o, "max_sequence_length", origin).value_or(2048);
  c.position_encoding_2d = json::optional_bool(o, "position_encoding_2d", origin).value_or(true);
  QG_CHECK(c.position_encoding_2d, origin,
           ": position_encoding_2d false (1-D GLM positions) is not supported by this library");
  c.bos_token_id = static_cast<int>(json::get_int(o, "bos_token_id", origin));
  c.eos_token_id = static_cast<int>(json::get_int(o, "eos_token_id", origin));
  // The first release's config lacks the mask ids (its code hard-wired 150000/150001); in both
  // releases they sit 4 and 3 below <sop>.
  c.mask_token_id = static_cast<int>(
      json::optional_int(o, "mask_token_id", origin).value_or(c.bos_token_id - 4));
  c.gmask_token_id = static_cast<int>(
      json::optional_int(o, "gmask_token_id", origin).value_or(c.bos_token_id - 3));
  c.pad_token_id = static_cast<int>(json::optional_int(o, "pad_token_id", origin).value_or(3));
  c.torch_dtype = json::optional_string(o, "torch_dtype", origin).value_or("float16");
  if (auto pre = json::optional_int(o, "pre_seq_len", origin)) {
    fail(origin, ": pre_seq_len ", *pre,
         " (a P-tuning v2 prefix) is not supported; use a LoRA adapter or a model without it");
  }
  c.validate(origin);
  return c;
}

}  // namespace qg::io
