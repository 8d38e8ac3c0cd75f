// Reading PEFT LoRA adapters (adapter_config.json + adapter_model.safetensors / .bin) into
// float32 factors, with errors that name the file, field or tensor (see lora/lora_adapter.h).
#include "qinggeng/lora/lora_adapter.h"

#include <cmath>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>

#include "io/json.h"
#include "qinggeng/error.h"
#include "qinggeng/io/weight_store.h"

namespace qg::lora {
namespace {

constexpr const char* kPeftPrefix = "base_model.model.";

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

/// The ChatGLM targets a PEFT target_modules entry selects (PEFT matches a module when its
/// name equals the entry or ends with "." + entry).
std::vector<LoraTarget> targets_matching(std::string_view entry) {
  std::vector<LoraTarget> found;
  for (LoraTarget t : kLoraTargets) {
    const std::string_view path = target_module(t);
    if (path == entry || ends_with(path, "." + std::string(entry))) found.push_back(t);
  }
  return found;
}

std::vector<LoraTarget> parse_targets(simdjson::dom::element e, const std::string& origin) {
  std::vector<std::string> entries;
  std::string_view single;
  simdjson::dom::array list;
  if (!e.get(single)) {
    // A string is a regular expression in PEFT; only plain names and "all-linear" are taken.
    if (single == "all-linear") return {std::begin(kLoraTargets), std::end(kLoraTargets)};
    entries.emplace_back(single);
  } else if (!e.get(list)) {
    for (simdjson::dom::element item : list) {
      std::string_view name;
      if (item.get(name)) fail(origin, ": target_modules must hold strings");
      entries.emplace_back(name);
    }
  } else {
    fail(origin, ": target_modules must be a list of module names");
  }
  std::set<LoraTarget> targets;
  for (const std::string& entry : entries) {
    const auto found = targets_matching(entry);
    QG_CHECK(!found.empty(), origin, ": target_modules entry \"", entry,
             "\" is not a LoRA-capable ChatGLM module (query_key_value, dense, dense_h_to_4h, "
             "dense_4h_to_h)");
    targets.insert(found.begin(), found.end());
  }
  QG_CHECK(!targets.empty(), origin, ": target_modules is empty");
  return {targets.begin(), targets.end()};
}

std::vector<int> parse_layers(simdjson::dom::element e, const std::string& origin) {
  std::int64_t one;
  if (!e.get(one)) return {static_cast<int>(one)};
  simdjson::dom::array list;
  QG_CHECK(!e.get(list), origin, ": layers_to_transform must be an integer or a list of them");
  std::vector<int> layers;
  for (simdjson::dom::element item : list) {
    std::int64_t v;
    if (item.get(v)) fail(origin, ": layers_to_transform must hold integers");
    layers.push_back(static_cast<int>(v));
  }
  return layers;
}

/// True when `key` is present and neither null nor an empty object / list.
bool non_empty(simdjson::dom::object o, std::string_view key) {
  simdjson::dom::element e;
  if (o[key].get(e) || e.is_null()) return false;
  simdjson::dom::object obj;
  if (!e.get(obj)) return obj.size() > 0;
  simdjson::dom::array arr;
  if (!e.get(arr)) return arr.size() > 0;
  return true;
}

std::string read_text(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  QG_CHECK(in, file.string(), ": cannot open file");
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

std::string peft_key(int layer, LoraTarget target, char which) {
  return std::string(kPeftPrefix) + "transformer.layers." + std::to_string(layer) + "." +
         std::string(target_module(target)) + ".lora_" + which + ".weight";
}

}  // namespace

std::string_view target_module(LoraTarget target) {
  switch (target) {
    case LoraTarget::QueryKeyValue: return "attention.query_key_value";
    case LoraTarget::Dense: return "attention.dense";
    case LoraTarget::DenseHTo4H: return "mlp.dense_h_to_4h";
    case LoraTarget::Dense4HToH: return "mlp.dense_4h_to_h";
  }
  return "";
}

std::pair<std::int64_t, std::int64_t> target_features(LoraTarget target,
                                                      const io::ModelConfig& model) {
  const std::int64_t h = model.hidden_size, ffn = model.inner_hidden_size;
  switch (target) {
    case LoraTarget::QueryKeyValue: return {h, 3 * h};
    case LoraTarget::Dense: return {h, h};
    case LoraTarget::DenseHTo4H: return {h, ffn};
    case LoraTarget::Dense4HToH: return {ffn, h};
  }
  return {0, 0};
}

std::string base_weight_name(int layer, LoraTarget target) {
  return "transformer.layers." + std::to_string(layer) + "." + std::string(target_module(target)) +
         ".weight";
}

float LoraConfig::scale() const {
  const double r_term = use_rslora ? std::sqrt(static_cast<double>(r)) : static_cast<double>(r);
  return static_cast<float>(lora_alpha / r_term);
}

bool LoraConfig::adapts_layer(int layer) const {
  if (layers.empty()) return true;
  for (int l : layers) {
    if (l == layer) return true;
  }
  return false;
}

LoraConfig parse_lora_config(std::string_view json_text, const std::string& origin) {
  const auto doc = json::Document::parse(json_text, origin);
  const auto o = json::as_object(doc.root(), origin, "the adapter config");
  const std::string peft_type = json::get_string(o, "peft_type", origin);
  QG_CHECK(peft_type == "LORA", origin, ": peft_type is \"", peft_type,
           "\"; only \"LORA\" adapters are supported");
  LoraConfig c;
  c.r = json::get_int(o, "r", origin);
  QG_CHECK(c.r >= 1, origin, ": r must be at least 1, got ", c.r);
  c.lora_alpha = json::optional_number(o, "lora_alpha", origin).value_or(8.0);
  c.lora_dropout = json::optional_number(o, "lora_dropout", origin).value_or(0.0);
  c.use_rslora = json::optional_bool(o, "use_rslora", origin).value_or(false);
  QG_CHECK(!json::optional_bool(o, "fan_in_fan_out", origin).value_or(false), origin,
           ": fan_in_fan_out true (Conv1D-style transposed weights) is not supported");
  const std::string bias = json::optional_string(o, "bias", origin).value_or("none");
  QG_CHECK(bias == "none", origin, ": bias \"", bias,
           "\" is not supported (adapters that train biases need bias \"none\")");
  QG_CHECK(!json::optional_bool(o, "use_dora", origin).value_or(false), origin,
           ": use_dora (DoRA) is not supported");
  for (const char* key : {"rank_pattern", "alpha_pattern", "modules_to_save"}) {
    QG_CHECK(!non_empty(o, key), origin, ": ", key, " is not supported (it must be empty)");
  }
  simdjson::dom::element e;
  if (o["target_modules"].get(e) || e.is_null()) fail(origin, ": missing field \"target_modules\"");
  c.targets = parse_targets(e, origin);
  if (!o["layers_to_transform"].get(e) && !e.is_null()) c.layers = parse_layers(e, origin);
  c.base_model_name_or_path =
      json::optional_string(o, "base_model_name_or_path", origin).value_or("");
  return c;
}

LoraAdapter::LoraAdapter(LoraConfig config, const io::ModelConfig& model)
    : config_(std::move(config)), num_layers_(model.num_layers), hidden_(model.hidden_size),
      inner_(model.inner_hidden_size),
      modules_(static_cast<std::size_t>(model.num_layers) * std::size(kLoraTargets)) {
  QG_CHECK(config_.r >= 1, "LoRA config: r must be at least 1, got ", config_.r);
  for (int l : config_.layers) {
    QG_CHECK(l >= 0 && l < num_layers_, "LoRA config: layers_to_transform names layer ", l,
             " but the model has ", num_layers_, " layers");
  }
}

std::pair<std::int64_t, std::int64_t> LoraAdapter::features(LoraTarget target) const {
  io::ModelConfig m;
  m.hidden_size = hidden_;
  m.inner_hidden_size = inner_;
  return target_features(target, m);
}

LoraAdapter::Module& LoraAdapter::module(int layer, LoraTarget target) {
  QG_CHECK(layer >= 0 && layer < num_layers_, "LoRA adapter: layer ", layer, " out of range [0, ",
           num_layers_, ")");
  return modules_[static_cast<std::size_t>(layer) * std::size(kLoraTargets) +
                  static_cast<std::size_t>(target)];
}

const LoraAdapter::Module& LoraAdapter::module(int layer, LoraTarget target) const {
  return const_cast<LoraAdapter*>(this)->module(layer, target);
}

void LoraAdapter::set(int layer, LoraTarget target, std::vector<float> a, std::vector<float> b) {
  const std::string where = "layers." + std::to_string(layer) + "." +
                            std::string(target_module(target));
  bool targeted = false;
  for (LoraTarget t : config_.targets) targeted |= t == target;
  QG_CHECK(targeted && config_.adapts_layer(layer), "LoRA adapter: ", where,
           " is not adapted by this config (target_modules / layers_to_transform)");
  const auto [in, out] = features(target);
  QG_CHECK(a.size() == static_cast<std::size_t>(config_.r * in), "LoRA adapter: ", where,
           " lora_A needs [", config_.r, ", ", in, "] = ", config_.r * in, " values, got ",
           a.size());
  QG_CHECK(b.size() == static_cast<std::size_t>(out * config_.r), "LoRA adapter: ", where,
           " lora_B needs [", out, ", ", config_.r, "] = ", out * config_.r, " values, got ",
           b.size());
  Module& m = module(layer, target);
  m.a = std::move(a);
  m.b = std::move(b);
}

bool LoraAdapter::has(int layer, LoraTarget target) const {
  return !module(layer, target).a.empty();
}

LoraFactors LoraAdapter::factors(int layer, LoraTarget target) const {
  const Module& m = module(layer, target);
  if (m.a.empty()) return {};
  return {m.a.data(), m.b.data(), config_.r, scale()};
}

LoraAdapter LoraAdapter::load(const std::filesystem::path& dir, const io::ModelConfig& model) {
  const auto config_file = dir / "adapter_config.json";
  QG_CHECK(std::filesystem::is_regular_file(config_file), config_file.string(),
           ": no adapter_config.json (not a PEFT adapter directory)");
  LoraConfig config = parse_lora_config(read_text(config_file), config_file.string());
  for (int l : config.layers) {
    QG_CHECK(l >= 0 && l < model.num_layers, config_file.string(),
             ": layers_to_transform names layer ", l, " but the model has ", model.num_layers,
             " layers");
  }
  LoraAdapter adapter(std::move(config), model);
  auto weights_file = dir / "adapter_model.safetensors";
  if (!std::filesystem::is_regular_file(weights_file)) weights_file = dir / "adapter_model.bin";
  QG_CHECK(std::filesystem::is_regular_file(weights_file), dir.string(),
           ": neither adapter_model.safetensors nor adapter_model.bin found");
  const io::WeightStore store = io::WeightStore::open(weights_file);
  const std::string file = weights_file.string();
  const std::int64_t r = adapter.config_.r;

  std::set<std::string> expected;
  for (int layer = 0; layer < model.num_layers; ++layer) {
    if (!adapter.config_.adapts_layer(layer)) continue;
    for (LoraTarget target : adapter.config_.targets) {
      const auto [in, out] = target_features(target, model);
      const std::string a_key = peft_key(layer, target, 'A'), b_key = peft_key(layer, target, 'B');
      expected.insert(a_key);
      expected.insert(b_key);
      QG_CHECK(store.contains(a_key), file, ": missing tensor ", a_key);
      QG_CHECK(store.contains(b_key), file, ": missing tensor ", b_key);
      const io::TensorView& a = store.get(a_key);
      const io::TensorView& b = store.get(b_key);
      QG_CHECK(a.shape.size() == 2 && b.shape.size() == 2, file, ": ", a_key, " ",
               a.shape_string(), " and ", b_key, " ", b.shape_string(), " must be matrices");
      QG_CHECK(a.shape[0] == r && b.shape[1] == r, file, ": ", a_key, " ", a.shape_string(),
               " / ", b_key, " ", b.shape_string(), " have rank ", a.shape[0],
               " but adapter_config.json says r = ", r);
      std::vector<float> a_values = store.read_f32(a_key, {r, in});
      std::vector<float> b_values = store.read_f32(b_key, {out, r});
      adapter.set(layer, target, std::move(a_values), std::move(b_values));
    }
  }
  for (const std::string& name : store.names()) {
    QG_CHECK(expected.count(name) != 0, file, ": unexpected tensor ", name,
             " (not a LoRA factor of a layer and module that adapter_config.json targets)");
  }
  return adapter;
}

}  // namespace qg::lora
