// The CPU reference loss and gradient of a whole ChatGLM model (see
// include/qinggeng/train/reference_model_grad.h): the layer forward keeps its activations in a
// LayerState, the backward walks the layers in reverse (recomputing a layer's state from its
// input when checkpointing), every op coming from reference_backward.h.
#include "qinggeng/train/reference_model_grad.h"

#include <array>
#include <utility>

#include "qinggeng/error.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/text/glm_layout.h"

namespace qg::train {

using lora::LoraTarget;
using Index = std::int64_t;

namespace {

std::vector<float> zeros(Index n) { return std::vector<float>(static_cast<std::size_t>(n), 0.0f); }

// Sizes a saved activation for `n` values and hands out its storage.
float* sized(std::vector<float>& v, Index n) {
  v.resize(static_cast<std::size_t>(n));
  return v.data();
}

// Moves between the fused qkv rows [T, 3H] (per head consecutive q, k, v slices of head_dim)
// and separate q, k, v [T, H]: `split` reads qkv, otherwise it is written.
void move_qkv(float* qkv, float* q, float* k, float* v, Index T, int nh, int hd, bool split) {
  const Index H = static_cast<Index>(nh) * hd;
  for (Index t = 0; t < T; ++t) {
    for (int h = 0; h < nh; ++h) {
      float* fused = qkv + t * 3 * H + h * 3 * hd;
      float* parts[3] = {q + t * H + h * hd, k + t * H + h * hd, v + t * H + h * hd};
      for (int p = 0; p < 3; ++p) {
        if (split) {
          std::copy(fused + p * hd, fused + (p + 1) * hd, parts[p]);
        } else {
          std::copy(parts[p], parts[p] + hd, fused + p * hd);
        }
      }
    }
  }
}

std::string layer_prefix(int layer) { return "transformer.layers." + std::to_string(layer) + "."; }

int target_index(LoraTarget target) {
  for (int i = 0; i < 4; ++i) {
    if (lora::kLoraTargets[i] == target) return i;
  }
  return 0;
}

const std::string kEmbeddings = "transformer.word_embeddings.weight";
const std::string kLmHead = "lm_head.weight";

}  // namespace

std::string lora_parameter_name(int layer, LoraTarget target, char which) {
  return "base_model.model." + layer_prefix(layer) + std::string(lora::target_module(target)) +
         ".lora_" + which + ".weight";
}

/// Activations of one layer's forward that its backward reads.
struct ModelGrad::LayerState {
  std::vector<float> x;                      // layer input [T, H]
  std::vector<float> a, mean1, rstd1;        // LN1 output and statistics
  std::vector<float> q, k, v, attn, lse;     // rotated q/k, v, attention output
  std::vector<float> h, m, mean2, rstd2;     // residual sum, LN2 output and statistics
  std::vector<float> f, g;                   // MLP pre- and post-gelu
  std::vector<float> out;                    // layer output
  std::array<std::vector<float>, 4> lora_u;  // dropout(x) A^T per target
  std::vector<int> positions, block_positions;
};

/// Gradient buffers of the trainable parameters (null for frozen ones).
struct ModelGrad::Trainables {
  std::map<std::string, std::vector<float>>& grads;
  float* operator()(const std::string& name) {
    const auto it = grads.find(name);
    return it == grads.end() ? nullptr : it->second.data();
  }
};

namespace {

// Loads every base weight as float32; returns the names in model order.
std::vector<std::string> load_base(const io::ModelConfig& c, const io::WeightStore& store,
                                   std::map<std::string, std::vector<float>>& params) {
  c.validate("ModelGrad");
  const Index H = c.hidden_size, I = c.inner_hidden_size, V = c.vocab_size;
  std::vector<std::string> names;
  auto add = [&](const std::string& name, std::vector<std::int64_t> shape) {
    params[name] = store.read_f32(name, shape);
    names.push_back(name);
  };
  add(kEmbeddings, {V, H});
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = layer_prefix(l);
    add(p + "input_layernorm.weight", {H});
    add(p + "input_layernorm.bias", {H});
    add(p + "attention.query_key_value.weight", {3 * H, H});
    add(p + "attention.query_key_value.bias", {3 * H});
    add(p + "attention.dense.weight", {H, H});
    add(p + "attention.dense.bias", {H});
    add(p + "post_attention_layernorm.weight", {H});
    add(p + "post_attention_layernorm.bias", {H});
    add(p + "mlp.dense_h_to_4h.weight", {I, H});
    add(p + "mlp.dense_h_to_4h.bias", {I});
    add(p + "mlp.dense_4h_to_h.weight", {H, I});
    add(p + "mlp.dense_4h_to_h.bias", {H});
  }
  add("transformer.final_layernorm.weight", {H});
  add("transformer.final_layernorm.bias", {H});
  if (store.contains(kLmHead)) add(kLmHead, {V, H});
  return names;
}

}  // namespace

ModelGrad ModelGrad::full_parameter(const io::ModelConfig& config, const io::WeightStore& store) {
  ModelGrad m;
  m.config_ = config;
  m.trainable_ = load_base(config, store, m.params_);
  m.lm_head_name_ = m.params_.count(kLmHead) ? kLmHead : kEmbeddings;
  return m;
}

ModelGrad ModelGrad::lora(const io::ModelConfig& config, const io::WeightStore& store,
                          const lora::LoraAdapter& adapter) {
  ModelGrad m;
  m.config_ = config;
  load_base(config, store, m.params_);
  m.lm_head_name_ = m.params_.count(kLmHead) ? kLmHead : kEmbeddings;
  m.lora_mode_ = true;
  m.lora_config_ = adapter.config();
  QG_CHECK(adapter.num_layers() == config.num_layers, "ModelGrad: LoRA adapter has ",
           adapter.num_layers(), " layers, the model ", config.num_layers);
  for (int l = 0; l < config.num_layers; ++l) {
    for (LoraTarget t : lora::kLoraTargets) {
      if (!adapter.has(l, t)) continue;
      QG_CHECK(adapter.features(t) == lora::target_features(t, config),
               "ModelGrad: LoRA adapter of ", target_module(t),
               " was made for another model shape");
      const auto [in, out] = lora::target_features(t, config);
      const lora::LoraFactors f = adapter.factors(l, t);
      const std::string a = lora_parameter_name(l, t, 'A'), b = lora_parameter_name(l, t, 'B');
      m.params_[a].assign(f.a, f.a + f.rank * in);
      m.params_[b].assign(f.b, f.b + out * f.rank);
      m.trainable_.push_back(a);
      m.trainable_.push_back(b);
    }
  }
  QG_CHECK(!m.trainable_.empty(), "ModelGrad: the LoRA adapter has no factors to train");
  return m;
}

std::vector<float>& ModelGrad::parameter(const std::string& name) {
  const auto it = params_.find(name);
  QG_CHECK(it != params_.end(), "ModelGrad: no parameter named '", name, "'");
  return it->second;
}

const std::vector<float>& ModelGrad::parameter(const std::string& name) const {
  return const_cast<ModelGrad*>(this)->parameter(name);
}

const float* ModelGrad::weight(const std::string& name) const { return parameter(name).data(); }

lora::LoraAdapter ModelGrad::adapter() const {
  QG_CHECK(lora_mode_, "ModelGrad: adapter() needs LoRA mode, this model trains every weight");
  lora::LoraAdapter out(lora_config_, config_);
  for (int l = 0; l < config_.num_layers; ++l) {
    for (LoraTarget t : lora::kLoraTargets) {
      if (adapted(l, t)) {
        out.set(l, t, parameter(lora_parameter_name(l, t, 'A')),
                parameter(lora_parameter_name(l, t, 'B')));
      }
    }
  }
  return out;
}

bool ModelGrad::adapted(int layer, LoraTarget target) const {
  return lora_mode_ && params_.count(lora_parameter_name(layer, target, 'A')) != 0;
}

LoraShape ModelGrad::lora_shape(int layer, LoraTarget target, Index tokens,
                                const GradOptions& options) const {
  const auto [in, out] = lora::target_features(target, config_);
  LoraShape s;
  s.tokens = tokens;
  s.in = in;
  s.out = out;
  s.rank = lora_config_.r;
  s.scale = lora_config_.scale();
  s.dropout = options.lora_dropout ? static_cast<float>(lora_config_.lora_dropout) : 0.0f;
  // One independent mask stream per (layer, target).
  s.seed = options.dropout_seed * 0x9E3779B97F4A7C15ull +
           static_cast<std::uint64_t>(layer * 4 + target_index(target) + 1);
  return s;
}

void check_training_example(const TrainingExample& e, const io::ModelConfig& config) {
  const Index T = static_cast<Index>(e.input_ids.size());
  QG_CHECK(T > 0, "TrainingExample: input_ids is empty");
  QG_CHECK(T <= config.max_sequence_length, "TrainingExample: ", T,
           " input_ids exceed max_sequence_length ", config.max_sequence_length);
  QG_CHECK(e.labels.size() == e.input_ids.size(), "TrainingExample: ", e.labels.size(),
           " labels for ", T, " input_ids");
  for (Index t = 0; t < T; ++t) {
    const int id = e.input_ids[static_cast<std::size_t>(t)];
    const int label = e.labels[static_cast<std::size_t>(t)];
    QG_CHECK(id >= 0 && id < config.vocab_size, "TrainingExample: input_ids[", t, "] = ", id,
             " outside the vocabulary [0, ", config.vocab_size, ")");
    QG_CHECK(label == kIgnoreLabel || (label >= 0 && label < config.vocab_size),
             "TrainingExample: labels[", t, "] = ", label, " is neither ", kIgnoreLabel,
             " nor inside the vocabulary [0, ", config.vocab_size, ")");
  }
  QG_CHECK(e.context_length >= 0 && e.context_length <= T, "TrainingExample: context_length ",
           e.context_length, " outside [0, ", T, "]");
  QG_CHECK(e.mask_position >= 0 && e.mask_position < T, "TrainingExample: mask_position ",
           e.mask_position, " outside [0, ", T, ")");
}

void ModelGrad::layer_forward(int layer, const float* x, const TrainingExample& e,
                              const GradOptions& options, LayerState& s) const {
  const Index T = static_cast<Index>(e.input_ids.size());
  const Index H = config_.hidden_size, I = config_.inner_hidden_size;
  const int nh = static_cast<int>(config_.num_attention_heads),
            hd = static_cast<int>(config_.head_dim());
  const float eps = static_cast<float>(config_.layernorm_epsilon);
  const float alpha = static_cast<float>(model::kGlmResidualAlpha);
  const std::string p = layer_prefix(layer);
  auto w = [&](const char* name) { return weight(p + name); };
  // The adapted linear `target`: y += scale * dropout(in) A^T B^T.
  auto lora = [&](LoraTarget target, const std::vector<float>& in, std::vector<float>& y) {
    if (!adapted(layer, target)) return;
    auto& u = s.lora_u[static_cast<std::size_t>(target_index(target))];
    lora_forward(in.data(), weight(lora_parameter_name(layer, target, 'A')),
                 weight(lora_parameter_name(layer, target, 'B')),
                 lora_shape(layer, target, T, options), y.data(), sized(u, T * lora_config_.r));
  };

  s.x.assign(x, x + T * H);
  layer_norm_forward(x, w("input_layernorm.weight"), w("input_layernorm.bias"), T, H, eps,
                     sized(s.a, T * H), sized(s.mean1, T), sized(s.rstd1, T));

  std::vector<float> qkv(static_cast<std::size_t>(T * 3 * H));
  linear_forward(s.a.data(), w("attention.query_key_value.weight"),
                 w("attention.query_key_value.bias"), T, H, 3 * H, qkv.data());
  lora(LoraTarget::QueryKeyValue, s.a, qkv);
  // Per head the qkv row holds (q, k, v) slices of head_dim; split into [T, H] each.
  move_qkv(qkv.data(), sized(s.q, T * H), sized(s.k, T * H), sized(s.v, T * H), T, nh, hd, true);
  const text::GlmLayout layout{e.context_length, e.mask_position};
  s.positions.resize(static_cast<std::size_t>(T));
  s.block_positions.resize(static_cast<std::size_t>(T));
  for (int t = 0; t < T; ++t) {
    s.positions[static_cast<std::size_t>(t)] = layout.position(t);
    s.block_positions[static_cast<std::size_t>(t)] = layout.block_position(t);
  }
  glm_rotary_forward(s.q.data(), T, nh, hd, s.positions.data(), s.block_positions.data());
  glm_rotary_forward(s.k.data(), T, nh, hd, s.positions.data(), s.block_positions.data());
  const GlmAttentionShape shape{nh, hd, static_cast<int>(T), static_cast<int>(T), e.context_length};
  glm_attention_forward(s.q.data(), s.k.data(), s.v.data(), shape, sized(s.attn, T * H),
                        sized(s.lse, T * nh));

  std::vector<float> o(static_cast<std::size_t>(T * H));
  linear_forward(s.attn.data(), w("attention.dense.weight"), w("attention.dense.bias"), T, H, H,
                 o.data());
  lora(LoraTarget::Dense, s.attn, o);
  scaled_residual_forward(s.a.data(), alpha, o.data(), T * H, sized(s.h, T * H));

  layer_norm_forward(s.h.data(), w("post_attention_layernorm.weight"),
                     w("post_attention_layernorm.bias"), T, H, eps, sized(s.m, T * H),
                     sized(s.mean2, T), sized(s.rstd2, T));
  linear_forward(s.m.data(), w("mlp.dense_h_to_4h.weight"), w("mlp.dense_h_to_4h.bias"), T, H, I,
                 sized(s.f, T * I));
  lora(LoraTarget::DenseHTo4H, s.m, s.f);
  gelu_forward(s.f.data(), T * I, sized(s.g, T * I));
  std::vector<float> y(static_cast<std::size_t>(T * H));
  linear_forward(s.g.data(), w("mlp.dense_4h_to_h.weight"), w("mlp.dense_4h_to_h.bias"), T, I, H,
                 y.data());
  lora(LoraTarget::Dense4HToH, s.g, y);
  scaled_residual_forward(s.m.data(), alpha, y.data(), T * H, sized(s.out, T * H));
}

void ModelGrad::layer_backward(int layer, const LayerState& s, const TrainingExample& e,
                               const GradOptions& options, std::vector<float>& dx,
                               Trainables& grads) const {
  const Index T = static_cast<Index>(e.input_ids.size());
  const Index H = config_.hidden_size, I = config_.inner_hidden_size;
  const int nh = static_cast<int>(config_.num_attention_heads),
            hd = static_cast<int>(config_.head_dim());
  const float alpha = static_cast<float>(model::kGlmResidualAlpha);
  const std::string p = layer_prefix(layer);
  auto w = [&](const char* name) { return weight(p + name); };
  auto gw = [&](const char* name) { return grads(p + name); };
  auto lora = [&](LoraTarget target, const std::vector<float>& in, const std::vector<float>& dy,
                  std::vector<float>& din) {
    if (!adapted(layer, target)) return;
    const std::string a = lora_parameter_name(layer, target, 'A');
    const std::string b = lora_parameter_name(layer, target, 'B');
    lora_backward(in.data(), weight(a), weight(b),
                  s.lora_u[static_cast<std::size_t>(target_index(target))].data(), dy.data(),
                  lora_shape(layer, target, T, options), din.data(), grads(a), grads(b));
  };

  const std::vector<float> dout = std::move(dx);  // gradient of the layer output
  // x' = m * alpha + MLP(m)
  std::vector<float> dm = zeros(T * H), dg = zeros(T * I), df = zeros(T * I);
  scaled_residual_backward(dout.data(), alpha, T * H, dm.data(), nullptr);
  linear_backward(s.g.data(), w("mlp.dense_4h_to_h.weight"), dout.data(), T, I, H, dg.data(),
                  gw("mlp.dense_4h_to_h.weight"), gw("mlp.dense_4h_to_h.bias"));
  lora(LoraTarget::Dense4HToH, s.g, dout, dg);
  gelu_backward(s.f.data(), dg.data(), T * I, df.data());
  linear_backward(s.m.data(), w("mlp.dense_h_to_4h.weight"), df.data(), T, H, I, dm.data(),
                  gw("mlp.dense_h_to_4h.weight"), gw("mlp.dense_h_to_4h.bias"));
  lora(LoraTarget::DenseHTo4H, s.m, df, dm);
  // m = LN2(h)
  std::vector<float> dh = zeros(T * H);
  layer_norm_backward(s.h.data(), w("post_attention_layernorm.weight"), s.mean2.data(),
                      s.rstd2.data(), dm.data(), T, H, dh.data(),
                      gw("post_attention_layernorm.weight"), gw("post_attention_layernorm.bias"));
  // h = a * alpha + dense(attn)
  std::vector<float> da = zeros(T * H), dattn = zeros(T * H);
  scaled_residual_backward(dh.data(), alpha, T * H, da.data(), nullptr);
  linear_backward(s.attn.data(), w("attention.dense.weight"), dh.data(), T, H, H, dattn.data(),
                  gw("attention.dense.weight"), gw("attention.dense.bias"));
  lora(LoraTarget::Dense, s.attn, dh, dattn);
  // attention over the rotated q, k
  std::vector<float> dq = zeros(T * H), dk = zeros(T * H), dv = zeros(T * H);
  const GlmAttentionShape shape{nh, hd, static_cast<int>(T), static_cast<int>(T), e.context_length};
  glm_attention_backward(s.q.data(), s.k.data(), s.v.data(), s.attn.data(), s.lse.data(),
                         dattn.data(), shape, dq.data(), dk.data(), dv.data());
  glm_rotary_backward(dq.data(), T, nh, hd, s.positions.data(), s.block_positions.data());
  glm_rotary_backward(dk.data(), T, nh, hd, s.positions.data(), s.block_positions.data());
  std::vector<float> dqkv(static_cast<std::size_t>(T * 3 * H));
  move_qkv(dqkv.data(), dq.data(), dk.data(), dv.data(), T, nh, hd, false);
  linear_backward(s.a.data(), w("attention.query_key_value.weight"), dqkv.data(), T, H, 3 * H,
                  da.data(), gw("attention.query_key_value.weight"),
                  gw("attention.query_key_value.bias"));
  lora(LoraTarget::QueryKeyValue, s.a, dqkv, da);
  // a = LN1(x)
  dx = zeros(T * H);
  layer_norm_backward(s.x.data(), w("input_layernorm.weight"), s.mean1.data(), s.rstd1.data(),
                      da.data(), T, H, dx.data(), gw("input_layernorm.weight"),
                      gw("input_layernorm.bias"));
}

LossAndGrad ModelGrad::run(const TrainingExample& e, const GradOptions& options,
                           bool backward) const {
  check_training_example(e, config_);
  const Index T = static_cast<Index>(e.input_ids.size());
  const Index H = config_.hidden_size, V = config_.vocab_size;
  const int L = static_cast<int>(config_.num_layers);
  const float eps = static_cast<float>(config_.layernorm_epsilon);

  LossAndGrad result;
  if (backward) {
    for (const auto& name : trainable_)
      result.grads[name] = zeros(static_cast<Index>(parameter(name).size()));
  }
  Trainables grads{result.grads};

  // Forward: every layer's state, or with checkpointing only its input.
  std::vector<float> x(static_cast<std::size_t>(T * H));
  embedding_forward(weight(kEmbeddings), V, H, e.input_ids.data(), T, x.data());
  const bool keep_states = backward && !options.checkpoint_layers;
  std::vector<LayerState> states(static_cast<std::size_t>(L));
  LayerState scratch;
  for (int l = 0; l < L; ++l) {
    LayerState& s = keep_states ? states[static_cast<std::size_t>(l)] : scratch;
    layer_forward(l, x.data(), e, options, s);
    if (backward && options.checkpoint_layers) states[static_cast<std::size_t>(l)].x = x;
    x = s.out;
  }
  std::vector<float> normed(static_cast<std::size_t>(T * H)), mean(static_cast<std::size_t>(T)),
      rstd(static_cast<std::size_t>(T));
  layer_norm_forward(x.data(), weight("transformer.final_layernorm.weight"),
                     weight("transformer.final_layernorm.bias"), T, H, eps, normed.data(),
                     mean.data(), rstd.data());
  // Next-token shift: the logits of position t are scored against labels[t + 1].
  std::vector<int> targets(static_cast<std::size_t>(T), kIgnoreLabel);
  for (Index t = 0; t + 1 < T; ++t)
    targets[static_cast<std::size_t>(t)] = e.labels[static_cast<std::size_t>(t + 1)];
  std::vector<float> dnormed = zeros(backward ? T * H : 0);
  const CrossEntropyResult ce = fused_cross_entropy(
      normed.data(), weight(lm_head_name_), targets.data(), T, H, V, options.cross_entropy,
      backward ? dnormed.data() : nullptr, backward ? grads(lm_head_name_) : nullptr);
  result.loss = ce.loss;
  result.tokens = ce.tokens;
  if (!backward) return result;

  std::vector<float> dx = zeros(T * H);
  layer_norm_backward(x.data(), weight("transformer.final_layernorm.weight"), mean.data(),
                      rstd.data(), dnormed.data(), T, H, dx.data(),
                      grads("transformer.final_layernorm.weight"),
                      grads("transformer.final_layernorm.bias"));
  for (int l = L - 1; l >= 0; --l) {
    LayerState& s = states[static_cast<std::size_t>(l)];
    if (options.checkpoint_layers) {
      const std::vector<float> input = std::move(s.x);
      layer_forward(l, input.data(), e, options, s);
    }
    layer_backward(l, s, e, options, dx, grads);
    s = LayerState();  // this layer's activations are no longer needed
  }
  if (float* dtable = grads(kEmbeddings)) {
    embedding_backward(e.input_ids.data(), T, dx.data(), V, H, dtable);
  }
  return result;
}

LossAndGrad ModelGrad::loss_and_grad(const TrainingExample& example,
                                     const GradOptions& options) const {
  return run(example, options, true);
}

double ModelGrad::loss(const TrainingExample& example, const GradOptions& options) const {
  return run(example, options, false).loss;
}

}  // namespace qg::train
