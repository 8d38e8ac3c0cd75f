// The CPU reference loss and gradient of a whole tiny ChatGLM (train/reference_model_grad.h):
// the loss is the inference model's NLL, gradients of LoRA factors and of every kind of base
// weight match finite differences, checkpointing changes nothing, ignored labels carry no
// loss, and plain SGD on the gradients overfits one example.
#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "catch.hpp"
#include "finite_difference.h"
#include "lora_fixtures.h"
#include "model_fixtures.h"
#include "qinggeng/engine/generator.h"
#include "qinggeng/error.h"
#include "qinggeng/train/reference_model_grad.h"

using namespace qg;
using lora::LoraTarget;
using train::GradOptions;
using train::TrainingExample;
using train::ModelGrad;

namespace {

// q0..q3 [gMASK] <sop> a0 a1 a2 <eop>: labels on the answer and <eop> only.
TrainingExample answer_example(const io::ModelConfig& c) {
  TrainingExample e;
  e.input_ids = {5, 6, 7, 8, c.gmask_token_id, c.bos_token_id, 30, 31, 32, c.eos_token_id};
  e.context_length = 5;
  e.mask_position = 4;
  for (std::size_t t = 0; t < e.input_ids.size(); ++t) {
    e.labels.push_back(static_cast<int>(t) > e.context_length ? e.input_ids[t]
                                                              : train::kIgnoreLabel);
  }
  return e;
}

// Mean NLL of the labelled tokens of `e` from logits [tokens, vocab] of every position.
double mean_nll(const std::vector<float>& logits, std::size_t vocab, const TrainingExample& e) {
  double nll = 0;
  int count = 0;
  for (std::size_t t = 1; t < e.input_ids.size(); ++t) {
    if (e.labels[t] == train::kIgnoreLabel) continue;
    const float* row = logits.data() + (t - 1) * vocab;
    const double mx = *std::max_element(row, row + vocab);
    double sum = 0;
    for (std::size_t v = 0; v < vocab; ++v) sum += std::exp(row[v] - mx);
    nll += mx + std::log(sum) - row[e.labels[t]];
    ++count;
  }
  return nll / count;
}

// The same from the inference model (no adapter).
double inference_loss(const model::GlmModel& model, const TrainingExample& e) {
  return mean_nll(engine::score_logits(model, e.input_ids),
                  static_cast<std::size_t>(model.config().vocab_size), e);
}

// A few coordinates of a tensor: those of largest gradient (where FD is most telling) and some
// random ones.
std::vector<std::size_t> probe_indices(const std::vector<float>& grad, unsigned seed) {
  std::vector<std::size_t> order(grad.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::partial_sort(
      order.begin(), order.begin() + 3, order.end(),
      [&](std::size_t a, std::size_t b) { return std::abs(grad[a]) > std::abs(grad[b]); });
  std::vector<std::size_t> picked(order.begin(), order.begin() + 3);
  std::mt19937 rng(seed);
  for (int i = 0; i < 2; ++i) picked.push_back(rng() % grad.size());
  return picked;
}

// Checks the gradient of `name` against central differences of the loss on a few coordinates.
void check_fd(ModelGrad& m, const TrainingExample& e, const GradOptions& options,
              const train::LossAndGrad& lg, const std::string& name) {
  INFO(name);
  const auto& grad = lg.grads.at(name);
  auto& values = m.parameter(name);
  const double error = test::gradient_error(
      values, grad.data(), [&] { return m.loss(e, options); }, 1e-3f, probe_indices(grad, 7));
  CHECK(error < 2e-2);
}

lora::LoraAdapter training_adapter(const io::ModelConfig& c, std::vector<LoraTarget> targets,
                                   double dropout) {
  auto a = test::random_adapter(c, std::move(targets), 2, 3);
  lora::LoraConfig config = a.config();
  config.lora_dropout = dropout;
  lora::LoraAdapter out(config, c);
  for (int l = 0; l < c.num_layers; ++l) {
    for (LoraTarget t : lora::kLoraTargets) {
      if (!a.has(l, t)) continue;
      const auto f = a.factors(l, t);
      const auto [in, o] = a.features(t);
      out.set(l, t, std::vector<float>(f.a, f.a + f.rank * in),
              std::vector<float>(f.b, f.b + o * f.rank));
    }
  }
  return out;
}

const std::vector<LoraTarget> kAllTargets = {LoraTarget::QueryKeyValue, LoraTarget::Dense,
                                             LoraTarget::DenseHTo4H, LoraTarget::Dense4HToH};

}  // namespace

TEST_CASE("ModelGrad's loss is the mean NLL of the inference model's logits", "[train]") {
  const auto config = test::tiny_config();
  const auto dir = test::tiny_model_dir("grad-loss", 51, config);
  const auto store = io::WeightStore::open(dir);
  const auto e = answer_example(config);

  auto model = model::GlmModel::load(dir, model::make_cpu_backend(1));
  const auto full = ModelGrad::full_parameter(config, store);
  const auto lg = full.loss_and_grad(e);
  CHECK(lg.tokens == 4);
  CHECK(lg.loss == Approx(inference_loss(model, e)).epsilon(1e-5));
  CHECK(full.loss(e) == Approx(lg.loss).epsilon(1e-12));

  // LoRA on every target, evaluated without dropout, equals the runtime adapter.
  const auto lora = ModelGrad::lora(config, store, training_adapter(config, kAllTargets, 0.1));
  model.add_adapter(0, lora.adapter());
  const auto logits_model = [&] {
    auto cache = model.new_kv_cache();
    const auto layout = text::GlmLayout{e.context_length, e.mask_position};
    auto chunk = engine::layout_chunk(layout, *cache, e.input_ids, true);
    chunk.adapter = 0;
    return model.forward({chunk});
  }();
  GradOptions eval;
  eval.lora_dropout = false;
  const double nll = mean_nll(logits_model, static_cast<std::size_t>(config.vocab_size), e);
  CHECK(lora.loss(e, eval) == Approx(nll).epsilon(1e-5));
  CHECK(lora.loss(e, eval) != Approx(lg.loss).epsilon(1e-4));  // the adapter matters
}

TEST_CASE("LoRA gradients of every target match finite differences (dropout on)", "[train]") {
  const auto config = test::tiny_config();
  const auto store = io::WeightStore::open(test::tiny_model_dir("grad-lora", 52, config));
  const auto e = answer_example(config);
  auto m = ModelGrad::lora(config, store, training_adapter(config, kAllTargets, 0.1));
  REQUIRE(m.trainable().size() == 16);
  GradOptions options;
  options.dropout_seed = 9;
  const auto lg = m.loss_and_grad(e, options);
  for (const auto& name : m.trainable()) check_fd(m, e, options, lg, name);
  // Dropout is on: another seed gives another loss.
  GradOptions other = options;
  other.dropout_seed = 10;
  CHECK(m.loss(e, other) != Approx(lg.loss).epsilon(1e-6));
}

TEST_CASE("full-parameter gradients match finite differences (untied and tied lm_head)",
          "[train]") {
  const auto config = test::tiny_config();
  const bool tied = GENERATE(false, true);
  const auto dir = test::scratch_dir(tied ? "grad-full-tied" : "grad-full");
  model::RandomModelOptions random;
  random.seed = 53;
  random.dtype = DType::F32;
  random.tie_lm_head = tied;
  model::write_random_model(dir, config, random);
  auto m = ModelGrad::full_parameter(config, io::WeightStore::open(dir));
  const auto e = answer_example(config);
  const auto lg = m.loss_and_grad(e);
  CHECK(std::count(m.trainable().begin(), m.trainable().end(), "lm_head.weight") == (tied ? 0 : 1));
  std::vector<std::string> probes = {"transformer.word_embeddings.weight",
                                     "transformer.final_layernorm.weight",
                                     "transformer.final_layernorm.bias"};
  for (const char* w :
       {"input_layernorm.weight", "input_layernorm.bias", "attention.query_key_value.weight",
        "attention.query_key_value.bias", "attention.dense.weight",
        "post_attention_layernorm.weight", "mlp.dense_h_to_4h.weight", "mlp.dense_4h_to_h.bias"}) {
    probes.push_back(std::string("transformer.layers.0.") + w);
  }
  probes.push_back("transformer.layers.1.mlp.dense_4h_to_h.weight");
  if (!tied) probes.push_back("lm_head.weight");
  for (const auto& name : probes) check_fd(m, e, {}, lg, name);
}

TEST_CASE("activation checkpointing gives identical loss and gradients", "[train]") {
  const auto config = test::tiny_config();
  const auto store = io::WeightStore::open(test::tiny_model_dir("grad-ckpt", 54, config));
  const auto e = answer_example(config);
  GradOptions plain, checkpointed;
  plain.dropout_seed = checkpointed.dropout_seed = 4;
  checkpointed.checkpoint_layers = true;
  for (bool lora_mode : {true, false}) {
    const auto m = lora_mode
                       ? ModelGrad::lora(config, store, training_adapter(config, kAllTargets, 0.2))
                       : ModelGrad::full_parameter(config, store);
    const auto a = m.loss_and_grad(e, plain), b = m.loss_and_grad(e, checkpointed);
    CHECK(a.loss == b.loss);
    REQUIRE(a.grads.size() == b.grads.size());
    for (const auto& [name, g] : a.grads) CHECK(g == b.grads.at(name));
  }
}

TEST_CASE("labels -100 carry no loss and no gradient", "[train]") {
  const auto config = test::tiny_config();
  const auto dir = test::tiny_model_dir("grad-ignore", 55, config);
  const auto model = model::GlmModel::load(dir, model::make_cpu_backend(1));
  const auto m = ModelGrad::full_parameter(config, io::WeightStore::open(dir));
  const auto e = answer_example(config);

  // Only the last label left: the loss is that one token's NLL.
  auto single = e;
  std::fill(single.labels.begin(), single.labels.end() - 1, train::kIgnoreLabel);
  const auto one = m.loss_and_grad(single);
  CHECK(one.tokens == 1);
  CHECK(one.loss == Approx(inference_loss(model, single)).epsilon(1e-5));

  auto none = e;
  std::fill(none.labels.begin(), none.labels.end(), train::kIgnoreLabel);
  const auto zero = m.loss_and_grad(none);
  CHECK(zero.loss == 0);
  CHECK(zero.tokens == 0);
  for (const auto& [name, g] : zero.grads) {
    CHECK(std::all_of(g.begin(), g.end(), [](float v) { return v == 0.0f; }));
  }
  // A label on the prompt counts once given; labels[0] (no position before it) never does.
  auto prompt = e;
  prompt.labels[3] = 8;
  prompt.labels[0] = 5;
  CHECK(m.loss_and_grad(prompt).tokens == 5);
}

TEST_CASE("SGD on the reference gradients overfits one example", "[train]") {
  const auto config = test::tiny_config();
  const auto store = io::WeightStore::open(test::tiny_model_dir("grad-sgd", 56, config));
  // PEFT initialisation: B = 0, so only B moves at first.
  auto adapter = training_adapter(config, {LoraTarget::QueryKeyValue, LoraTarget::DenseHTo4H}, 0.0);
  for (int l = 0; l < config.num_layers; ++l) {
    for (LoraTarget t : {LoraTarget::QueryKeyValue, LoraTarget::DenseHTo4H}) {
      const auto f = adapter.factors(l, t);
      const auto [in, out] = adapter.features(t);
      adapter.set(l, t, std::vector<float>(f.a, f.a + f.rank * in),
                  std::vector<float>(static_cast<std::size_t>(out * f.rank), 0.0f));
    }
  }
  auto m = ModelGrad::lora(config, store, adapter);
  const auto e = answer_example(config);
  const double first = m.loss(e);
  double last = first;
  for (int step = 0; step < 30; ++step) {
    const auto lg = m.loss_and_grad(e);
    last = lg.loss;
    for (const auto& [name, g] : lg.grads) {
      auto& p = m.parameter(name);
      for (std::size_t i = 0; i < p.size(); ++i) p[i] -= 0.5f * g[i];
    }
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < 0.15 * first);
}

TEST_CASE("ModelGrad rejects examples and adapters that do not fit the model", "[train]") {
  const auto config = test::tiny_config();
  const auto store = io::WeightStore::open(test::tiny_model_dir("grad-errors", 57, config));
  const auto full = ModelGrad::full_parameter(config, store);
  const auto good = answer_example(config);

  auto e = good;
  e.labels.pop_back();
  REQUIRE_THROWS_WITH(full.loss(e), QG_CONTAINS("labels for"));
  e = good;
  e.labels[7] = 500;
  REQUIRE_THROWS_WITH(full.loss(e), QG_CONTAINS("labels[7]"));
  e = good;
  e.input_ids[2] = -1;
  REQUIRE_THROWS_WITH(full.loss(e), QG_CONTAINS("input_ids[2]"));
  e = good;
  e.context_length = 11;
  REQUIRE_THROWS_WITH(full.loss(e), QG_CONTAINS("context_length"));
  e = good;
  e.input_ids.assign(65, 5);
  e.labels.assign(65, 5);
  REQUIRE_THROWS_WITH(full.loss(e), QG_CONTAINS("max_sequence_length"));

  REQUIRE_THROWS_WITH(full.adapter(), QG_CONTAINS("LoRA mode"));
  REQUIRE_THROWS_WITH(full.parameter("nope"), QG_CONTAINS("'nope'"));
  auto bigger = config;
  bigger.num_layers = 3;
  REQUIRE_THROWS_WITH(
      ModelGrad::lora(config, store, test::random_adapter(bigger, {LoraTarget::Dense}, 2, 1)),
      QG_CONTAINS("layers"));
}
