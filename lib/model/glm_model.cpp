// The ChatGLM v1 forward pass over a Backend (see include/qinggeng/model/glm_model.h).
#include "qinggeng/model/glm_model.h"

#include <algorithm>
#include <string>

#include "qinggeng/error.h"

namespace qg::model {

GlmModel GlmModel::load(const std::filesystem::path& model_dir, std::shared_ptr<Backend> backend) {
  const auto config = io::load_model_config(model_dir);
  const auto store = io::WeightStore::open(model_dir);
  return from_store(config, store, std::move(backend));
}

GlmModel GlmModel::from_store(const io::ModelConfig& config, const io::WeightStore& store,
                              std::shared_ptr<Backend> backend) {
  return from_source(
      config,
      [&store](const std::string& name, const std::vector<std::int64_t>& shape) -> const io::TensorView* {
        if (name == "lm_head.weight" && !store.contains(name)) return nullptr;
        return &store.get(name, shape);
      },
      std::move(backend));
}

GlmModel GlmModel::from_source(const io::ModelConfig& config, const WeightSource& source,
                               std::shared_ptr<Backend> backend) {
  QG_CHECK(backend, "GlmModel: no backend given");
  config.validate("GlmModel");
  GlmModel m;
  m.config_ = config;
  m.backend_ = std::move(backend);
  const std::int64_t H = config.hidden_size, I = config.inner_hidden_size, V = config.vocab_size;

  auto fetch = [&](const std::string& name, std::int64_t rows, std::int64_t cols, bool vector) {
    const std::vector<std::int64_t> shape = vector ? std::vector<std::int64_t>{cols}
                                                   : std::vector<std::int64_t>{rows, cols};
    const io::TensorView* view = source(name, shape);
    QG_CHECK(view != nullptr, "weight '", name, "' is missing");
    m.weight_bytes_ += static_cast<std::size_t>(rows * cols) * dtype_size(view->dtype);
    return m.backend_->upload(*view, rows, cols);
  };
  auto matrix = [&](const std::string& name, std::int64_t rows, std::int64_t cols) {
    return fetch(name, rows, cols, false);
  };
  auto vector = [&](const std::string& name, std::int64_t n) { return fetch(name, 1, n, true); };

  const std::int64_t per_layer = 4 * H + 3 * H * H + 3 * H + H * H + H + 2 * I * H + I + H;
  m.backend_->plan_weights(static_cast<std::size_t>(2 * V * H + config.num_layers * per_layer + 2 * H));
  m.embeddings_ = matrix("transformer.word_embeddings.weight", V, H);
  for (std::int64_t i = 0; i < config.num_layers; ++i) {
    const std::string p = "transformer.layers." + std::to_string(i) + ".";
    Layer l;
    l.ln1_w = vector(p + "input_layernorm.weight", H);
    l.ln1_b = vector(p + "input_layernorm.bias", H);
    l.qkv_w = matrix(p + "attention.query_key_value.weight", 3 * H, H);
    l.qkv_b = vector(p + "attention.query_key_value.bias", 3 * H);
    l.dense_w = matrix(p + "attention.dense.weight", H, H);
    l.dense_b = vector(p + "attention.dense.bias", H);
    l.ln2_w = vector(p + "post_attention_layernorm.weight", H);
    l.ln2_b = vector(p + "post_attention_layernorm.bias", H);
    l.fc1_w = matrix(p + "mlp.dense_h_to_4h.weight", I, H);
    l.fc1_b = vector(p + "mlp.dense_h_to_4h.bias", I);
    l.fc2_w = matrix(p + "mlp.dense_4h_to_h.weight", H, I);
    l.fc2_b = vector(p + "mlp.dense_4h_to_h.bias", H);
    m.layers_.push_back(std::move(l));
  }
  m.final_ln_w_ = vector("transformer.final_layernorm.weight", H);
  m.final_ln_b_ = vector("transformer.final_layernorm.bias", H);
  const io::TensorView* head = source("lm_head.weight", {V, H});
  if (head) {
    m.weight_bytes_ += static_cast<std::size_t>(V * H) * dtype_size(head->dtype);
    m.lm_head_ = m.backend_->upload(*head, V, H);
  } else {
    m.lm_head_ = m.embeddings_;
  }
  m.backend_->prepare_kv_cache(static_cast<int>(config.num_layers),
                               {static_cast<int>(config.num_attention_heads),
                                static_cast<int>(config.head_dim())});
  return m;
}

void GlmModel::load_adapter(int id, const std::filesystem::path& adapter_dir) {
  add_adapter(id, lora::LoraAdapter::load(adapter_dir, config_));
}

void GlmModel::add_adapter(int id, const lora::LoraAdapter& adapter) {
  QG_CHECK(id >= 0, "LoRA adapter id must be non-negative, got ", id);
  QG_CHECK(adapter.num_layers() == config_.num_layers, "LoRA adapter has ", adapter.num_layers(),
           " layers, the model ", config_.num_layers);
  backend_->load_adapter(id, adapter);
  if (adapters_.size() <= static_cast<std::size_t>(id)) adapters_.resize(static_cast<std::size_t>(id) + 1);
  adapters_[static_cast<std::size_t>(id)] = std::make_unique<lora::LoraAdapter>(adapter);
}

bool GlmModel::adapted(int layer, lora::LoraTarget target) const {
  for (const auto& a : adapters_) {
    if (a && a->has(layer, target)) return true;
  }
  return false;
}

std::unique_ptr<KvCache> GlmModel::new_kv_cache(int capacity) const {
  const int max_len = static_cast<int>(config_.max_sequence_length);
  QG_CHECK(capacity >= 0, "KV cache capacity must be non-negative, got ", capacity);
  const AttentionShape shape{static_cast<int>(config_.num_attention_heads),
                             static_cast<int>(config_.head_dim())};
  return backend_->new_kv_cache(static_cast<int>(config_.num_layers), shape,
                                capacity == 0 ? max_len : capacity);
}

std::vector<float> GlmModel::forward(const std::vector<SequenceChunk>& batch) const {
  const Tensor logits = forward_logits(batch);
  std::vector<float> out(static_cast<std::size_t>(logits.numel()));
  backend_->to_host(logits, out.data());
  return out;
}

Tensor GlmModel::forward_logits(const std::vector<SequenceChunk>& batch) const {
  QG_CHECK(!batch.empty(), "GlmModel::forward: empty batch");
  std::vector<int> ids;
  std::vector<std::int64_t> logit_rows;  // rows of the activations that produce logits
  for (const auto& chunk : batch) {
    const auto n = chunk.tokens.size();
    QG_CHECK(chunk.cache != nullptr, "GlmModel::forward: a sequence has no KV cache");
    QG_CHECK(n > 0, "GlmModel::forward: a sequence has no new tokens");
    QG_CHECK(chunk.positions.size() == n && chunk.block_positions.size() == n,
             "GlmModel::forward: ", n, " tokens but ", chunk.positions.size(), " positions and ",
             chunk.block_positions.size(), " block positions");
    QG_CHECK(chunk.cache->length() + static_cast<int>(n) <= chunk.cache->capacity(),
             "sequence of ", chunk.cache->length() + n, " tokens exceeds the KV cache capacity ",
             chunk.cache->capacity(), " (max_sequence_length ", config_.max_sequence_length, ")");
    for (std::size_t i = 0; i < n; ++i) {
      const int t = chunk.tokens[i];
      QG_CHECK(t >= 0 && t < config_.vocab_size, "token id ", t, " is outside the vocabulary [0, ",
               config_.vocab_size, ")");
      if (chunk.all_logits || i + 1 == n) logit_rows.push_back(static_cast<std::int64_t>(ids.size()));
      ids.push_back(t);
    }
  }
  Backend& be = *backend_;
  const std::int64_t T = static_cast<std::int64_t>(ids.size());
  const std::int64_t H = config_.hidden_size, I = config_.inner_hidden_size;
  const float eps = static_cast<float>(config_.layernorm_epsilon);
  const float alpha = static_cast<float>(kGlmResidualAlpha);
  const AttentionShape shape{static_cast<int>(config_.num_attention_heads),
                             static_cast<int>(config_.head_dim())};

  Tensor x = be.activation(T, H), a = be.activation(T, H), attn = be.activation(T, H);
  Tensor qkv = be.activation(T, 3 * H), mlp = be.activation(T, I);
  be.begin_forward(batch);
  be.embedding(embeddings_, ids, x);
  const bool any_adapter = std::any_of(batch.begin(), batch.end(),
                                       [](const SequenceChunk& c) { return c.adapter >= 0; });
  using lora::LoraTarget;
  auto lora = [&](int layer, LoraTarget target) { return any_adapter && adapted(layer, target); };
  for (std::size_t li = 0; li < layers_.size(); ++li) {
    const Layer& l = layers_[li];
    const int i = static_cast<int>(li);
    be.layer_norm_linear(x, l.ln1_w, l.ln1_b, eps, a, l.qkv_w, l.qkv_b, false, qkv);
    if (lora(i, LoraTarget::QueryKeyValue)) be.lora_add(a, qkv, i, LoraTarget::QueryKeyValue);
    be.attention(qkv, batch, i, shape, attn);
    be.linear_residual(attn, l.dense_w, l.dense_b, a, alpha, x);  // h = a * alpha + o
    if (lora(i, LoraTarget::Dense)) be.lora_add(attn, x, i, LoraTarget::Dense);  // additive
    if (lora(i, LoraTarget::DenseHTo4H)) {  // the adapter acts before the gelu
      be.layer_norm_linear(x, l.ln2_w, l.ln2_b, eps, a, l.fc1_w, l.fc1_b, false, mlp);  // a = m
      be.lora_add(a, mlp, i, LoraTarget::DenseHTo4H);
      be.gelu(mlp);
    } else {
      be.layer_norm_linear(x, l.ln2_w, l.ln2_b, eps, a, l.fc1_w, l.fc1_b, true, mlp);
    }
    be.linear_residual(mlp, l.fc2_w, l.fc2_b, a, alpha, x);  // x' = m * alpha + y
    if (lora(i, LoraTarget::Dense4HToH)) be.lora_add(mlp, x, i, LoraTarget::Dense4HToH);
  }
  for (const auto& chunk : batch) chunk.cache->advance(static_cast<int>(chunk.tokens.size()));

  // Only the rows that need logits go through the final norm and the vocabulary projection.
  const std::int64_t R = static_cast<std::int64_t>(logit_rows.size());
  Tensor selected = x;
  if (R != T) {
    selected = be.activation(R, H);
    be.gather_rows(x, logit_rows, selected);
  }
  Tensor normed = be.activation(R, H), logits = be.logits_buffer(R, config_.vocab_size);
  be.layer_norm(selected, final_ln_w_, final_ln_b_, eps, normed);
  be.linear(normed, lm_head_, Tensor(), logits);
  return logits;
}

}  // namespace qg::model
