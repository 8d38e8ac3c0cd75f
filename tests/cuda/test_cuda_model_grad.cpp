// The GPU LoRA training step (train/cuda_model_grad.h) against the CPU reference ModelGrad:
// packed micro-batches of several examples give the loss and every LoRA gradient of the sum
// of per-example reference gradients (same dropout masks), within fp16 tolerance; the loss
// scale cancels; checkpointing changes nothing; the backward ends at the lowest adapted target
// (four placements); the last layer on the labelled rows only, the LoRA term inside the base
// GEMM, chained launches (PDL) and the LoRA passes on tensor cores change only rounding;
// evaluation NLLs match; bad input is refused.
// Then the Trainer on the GPU: it starts from the CPU loss, and LoRA training drives a
// memorisation task's loss down.
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "cuda/chained_launch.cuh"
#include "fp16_device.h"
#include "lora_fixtures.h"
#include "model_fixtures.h"
#include "qinggeng/error.h"
#include "qinggeng/io/safetensors.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/adapter_writer.h"
#include "qinggeng/train/cuda_model_grad.h"
#include "qinggeng/train/reference_model_grad.h"
#include "qinggeng/train/trainer.h"
#include "scratch_dir.h"

using namespace qg;
using lora::LoraTarget;
using test::relative_l2;
using train::TrainingExample;

namespace {

// A model whose heads are 64 wide (the attention kernels' smallest common tile).
io::ModelConfig grad_config() { return test::sized_config(128, 2, 512, 256, 96); }

// [prompt of n_prompt ids] [gMASK] <sop> [answer of n_answer ids] <eop>, labels on the answer.
TrainingExample example(const io::ModelConfig& c, int n_prompt, int n_answer, int salt) {
  TrainingExample e;
  for (int i = 0; i < n_prompt; ++i) e.input_ids.push_back(5 + (i * 13 + salt * 7) % 200);
  e.input_ids.push_back(c.gmask_token_id);
  e.mask_position = n_prompt;
  e.input_ids.push_back(c.bos_token_id);
  e.context_length = n_prompt + 1;
  for (int i = 0; i < n_answer; ++i) e.input_ids.push_back(5 + (i * 31 + salt * 11) % 200);
  e.input_ids.push_back(c.eos_token_id);
  for (int t = 0; t < e.size(); ++t) {
    e.labels.push_back(t > e.context_length ? e.input_ids[static_cast<std::size_t>(t)]
                                            : train::kIgnoreLabel);
  }
  return e;
}

model::GlmModel::WeightSource store_source(const io::WeightStore& store) {
  return [&store](const std::string& name,
                  const std::vector<std::int64_t>& shape) -> const io::TensorView* {
    return store.contains(name) ? &store.get(name, shape) : nullptr;
  };
}

/// Random factors of rank 4 on `targets` of `layers` (empty: every layer), dropout 0.1.
lora::LoraAdapter dropout_adapter(
    const io::ModelConfig& c,
    const std::vector<LoraTarget>& targets = {LoraTarget::QueryKeyValue, LoraTarget::Dense,
                                              LoraTarget::DenseHTo4H, LoraTarget::Dense4HToH},
    const std::vector<int>& layers = {}) {
  lora::LoraAdapter a = test::random_adapter(c, targets, 4, 31);
  lora::LoraConfig lc = a.config();
  lc.lora_dropout = 0.1;
  lc.layers = layers;
  lora::LoraAdapter out(lc, c);
  for (int l = 0; l < c.num_layers; ++l) {
    if (!lc.adapts_layer(l)) continue;
    for (LoraTarget t : lc.targets) {
      const lora::LoraFactors f = a.factors(l, t);
      const auto [in, o] = lora::target_features(t, c);
      out.set(l, t, std::vector<float>(f.a, f.a + f.rank * in),
              std::vector<float>(f.b, f.b + o * f.rank));
    }
  }
  return out;
}

/// The CPU reference of a packed batch: the sum of per-example losses and gradients, each
/// normalised over the whole batch's `scored` tokens, example k's dropout from seeds[k].
train::LossAndGrad reference_batch(const train::ModelGrad& cpu,
                                   const std::vector<TrainingExample>& examples,
                                   const std::vector<std::uint64_t>& seeds, double scored) {
  train::LossAndGrad sum;
  for (std::size_t k = 0; k < examples.size(); ++k) {
    train::GradOptions o;
    o.dropout_seed = seeds[k];
    o.cross_entropy.normalizer = scored;
    const train::LossAndGrad r = cpu.loss_and_grad(examples[k], o);
    sum.loss += r.loss;
    for (const auto& [name, g] : r.grads) {
      auto& total = sum.grads[name];
      total.resize(g.size(), 0.0f);
      for (std::size_t i = 0; i < g.size(); ++i) total[i] += g[i];
    }
  }
  return sum;
}

struct GradModel {
  io::ModelConfig c = grad_config();
  std::filesystem::path dir = test::tiny_model_dir("cuda-grad", 5, c);
  io::WeightStore store = io::WeightStore::open(dir);
  lora::LoraAdapter adapter = dropout_adapter(c);
};

}  // namespace

TEST_CASE("GPU LoRA loss and gradients match the CPU reference on a packed batch",
          "[cuda][train]") {
  const GradModel model;
  const auto& [c, dir, store, adapter] = model;
  const train::ModelGrad cpu = train::ModelGrad::lora(c, store, adapter);

  const std::vector<TrainingExample> examples = {example(c, 7, 9, 1), example(c, 1, 3, 2),
                                                 example(c, 40, 37, 3)};
  std::vector<const TrainingExample*> batch;
  double scored = 0;
  for (const auto& e : examples) {
    batch.push_back(&e);
    scored += e.scored_tokens();
  }
  const std::vector<std::uint64_t> seeds = {11, 12, 13};

  const train::LossAndGrad reference = reference_batch(cpu, examples, seeds, scored);
  const double cpu_loss = reference.loss;
  const std::map<std::string, std::vector<float>>& cpu_grads = reference.grads;

  struct Variant {
    bool checkpoint, lora_in_gemm, lora_tensor_cores, labelled_rows, fused_rotary;
  };
  for (const auto& [checkpoint, lora_in_gemm, lora_tensor_cores, labelled_rows, fused_rotary] :
       {Variant{false, false, false, false, false}, Variant{true, false, false, false, false},
        Variant{false, true, false, false, false}, Variant{true, true, false, false, false},
        Variant{false, false, true, false, false}, Variant{true, true, true, false, false},
        Variant{false, false, false, true, false}, Variant{false, false, false, false, true},
        Variant{true, true, true, true, true}}) {
    train::CudaGradOptions options;
    options.checkpoint_layers = checkpoint;
    options.ce_row_chunk = 32;  // several chunks over the 106 rows
    options.lora_in_gemm = lora_in_gemm;
    options.lora_tensor_cores = lora_tensor_cores;
    options.last_layer_labelled_rows = labelled_rows;
    options.rotary_in_attention_backward = fused_rotary;
    train::CudaModelGrad gpu(c, store_source(store), adapter, 0, options);
    REQUIRE(gpu.trainable() == cpu.trainable());
    const train::LossAndGrad r = gpu.loss_and_grad(batch, seeds, scored, 1024.0f);
    INFO("checkpoint " << checkpoint << ", LoRA term in the GEMM " << lora_in_gemm
                       << ", LoRA on tensor cores " << lora_tensor_cores
                       << ", last layer on labelled rows " << labelled_rows
                       << ", rotary in the attention backward " << fused_rotary);
    CHECK(r.loss == Approx(cpu_loss).epsilon(1e-2));
    CHECK(r.tokens == static_cast<std::int64_t>(scored));
    for (const std::string& name : cpu.trainable()) {
      INFO(name);
      CHECK(relative_l2(r.grads.at(name), cpu_grads.at(name)) < 3e-2);
    }
  }
}

TEST_CASE("GPU LoRA backward ends at the lowest adapted target and still matches the CPU",
          "[cuda][train]") {
  // Nothing below the lowest adapted (layer, target) is trained, so the backward skips that
  // target's input gradient and everything under it: each of the four places it can end, in
  // the first layer and in the last (where the labelled-rows option also applies).
  const io::ModelConfig c = grad_config();
  const auto dir = test::tiny_model_dir("cuda-grad-lowest", 5, c);
  const io::WeightStore store = io::WeightStore::open(dir);
  const std::vector<TrainingExample> examples = {example(c, 7, 9, 1), example(c, 30, 12, 3)};
  const std::vector<const TrainingExample*> batch = {&examples[0], &examples[1]};
  const std::vector<std::uint64_t> seeds = {21, 22};
  const double scored = examples[0].scored_tokens() + examples[1].scored_tokens();
  struct Placement {
    std::vector<LoraTarget> targets;
    std::vector<int> layers;
  };
  for (const auto& [targets, layers] :
       {Placement{{LoraTarget::Dense4HToH}, {1}}, Placement{{LoraTarget::DenseHTo4H}, {}},
        Placement{{LoraTarget::Dense, LoraTarget::Dense4HToH}, {}},
        Placement{{LoraTarget::QueryKeyValue, LoraTarget::DenseHTo4H}, {1}},
        Placement{{LoraTarget::Dense}, {1}}, Placement{{LoraTarget::DenseHTo4H}, {1}}}) {
    const lora::LoraAdapter adapter = dropout_adapter(c, targets, layers);
    const train::ModelGrad cpu = train::ModelGrad::lora(c, store, adapter);
    const train::LossAndGrad want = reference_batch(cpu, examples, seeds, scored);
    struct Variant {
      bool checkpoint, labelled_rows, tensor_cores;  // (the LoRA passes' input-side-only end)
    };
    for (const auto& [checkpoint, labelled_rows, tensor_cores] :
         {Variant{false, false, false}, Variant{true, false, false}, Variant{false, true, false},
          Variant{true, true, false}, Variant{false, false, true}, Variant{true, true, true}}) {
      train::CudaGradOptions options;
      options.checkpoint_layers = checkpoint;
      options.last_layer_labelled_rows = labelled_rows;
      options.lora_tensor_cores = tensor_cores;
      train::CudaModelGrad gpu(c, store_source(store), adapter, 0, options);
      const train::LossAndGrad r = gpu.loss_and_grad(batch, seeds, scored, 1024.0f);
      INFO("first target " << lora::target_module(targets[0]) << ", layers "
                           << (layers.empty() ? "all" : "1") << ", checkpoint " << checkpoint
                           << ", last layer on labelled rows " << labelled_rows
                           << ", LoRA on tensor cores " << tensor_cores);
      CHECK(r.loss == Approx(want.loss).epsilon(1e-2));
      REQUIRE(r.grads.size() == want.grads.size());
      for (const auto& [name, grad] : want.grads) {
        INFO(name);
        CHECK(relative_l2(r.grads.at(name), grad) < 3e-2);
      }
    }
  }
}

TEST_CASE("GPU LoRA gradients: checkpointing and the loss scale change nothing, eval NLL",
          "[cuda][train]") {
  const GradModel model;
  const auto& [c, dir, store, adapter] = model;
  const std::vector<TrainingExample> examples = {example(c, 20, 30, 4), example(c, 5, 60, 5)};
  const std::vector<const TrainingExample*> batch = {&examples[0], &examples[1]};

  train::CudaModelGrad plain(c, store_source(store), adapter, 0);
  train::CudaGradOptions ckpt;
  ckpt.checkpoint_layers = true;
  train::CudaModelGrad recompute(c, store_source(store), adapter, 0, ckpt);
  const auto a = plain.loss_and_grad(batch, {1, 2}, 50.0, 256.0f);
  const auto b = recompute.loss_and_grad(batch, {1, 2}, 50.0, 256.0f);
  const auto scaled = plain.loss_and_grad(batch, {1, 2}, 50.0, 8192.0f);
  CHECK(a.loss == Approx(b.loss).epsilon(1e-6));
  for (const std::string& name : plain.trainable()) {
    INFO(name);
    CHECK(relative_l2(b.grads.at(name), a.grads.at(name)) < 1e-3);
    CHECK(relative_l2(scaled.grads.at(name), a.grads.at(name)) < 1e-2);
  }

  // Evaluation: summed NLL without dropout equals the reference's.
  const train::ModelGrad cpu = train::ModelGrad::lora(c, store, adapter);
  const std::vector<double> nll = plain.summed_nll(batch);
  for (std::size_t k = 0; k < examples.size(); ++k) {
    train::GradOptions o;
    o.lora_dropout = false;
    o.cross_entropy.normalizer = 1.0;
    CHECK(nll[k] == Approx(cpu.loss(examples[k], o)).epsilon(1e-2));
  }
  // The same with the last layer on the labelled rows only.
  train::CudaGradOptions labelled;
  labelled.last_layer_labelled_rows = true;
  train::CudaModelGrad compact(c, store_source(store), adapter, 0, labelled);
  const std::vector<double> compact_nll = compact.summed_nll(batch);
  for (std::size_t k = 0; k < examples.size(); ++k) {
    CHECK(compact_nll[k] == Approx(nll[k]).epsilon(1e-3));
  }

  // Bad input is refused with the field named.
  TrainingExample bad = examples[0];
  bad.input_ids[3] = static_cast<int>(c.vocab_size);
  CHECK_THROWS_WITH(plain.loss_and_grad({&bad}, {1}, 1.0), QG_CONTAINS("input_ids[3]"));
  CHECK_THROWS_WITH(plain.loss_and_grad(batch, {1}, 1.0), QG_CONTAINS("dropout seeds"));
  CHECK_THROWS_WITH(plain.set_parameter("nope", {}), QG_CONTAINS("nope"));
  CHECK(plain.memory_plan(1024).total() > plain.memory_plan(128).total());
}

TEST_CASE(
    "GPU LoRA step: the LoRA term in the GEMM, chained launches, tensor-core LoRA passes, "
    "the last layer on labelled rows and the fused rotary backward change only rounding",
    "[cuda][train]") {
  const GradModel model;
  const auto& [c, dir, store, adapter] = model;
  const std::vector<TrainingExample> examples = {example(c, 20, 30, 6), example(c, 5, 60, 7),
                                                 example(c, 64, 9, 8)};
  const std::vector<const TrainingExample*> batch = {&examples[0], &examples[1], &examples[2]};
  struct Restore {  // the switch as it was (QG_CUDA_PDL may have turned it on)
    bool before = cuda::set_chained_launch(false);
    ~Restore() { cuda::set_chained_launch(before); }
  } restore;
  // One step of the batch with `options`, chained launches on or off.
  auto run = [&](const train::CudaGradOptions& options, bool chained) {
    cuda::set_chained_launch(chained);
    train::CudaModelGrad gpu(c, store_source(store), adapter, 0, options);
    return gpu.loss_and_grad(batch, {3, 4, 5}, 99.0, 512.0f);
  };
  auto step = [&](bool lora_in_gemm, bool chained) {
    train::CudaGradOptions options;
    options.lora_in_gemm = lora_in_gemm;
    return run(options, chained);
  };
  const auto base = step(false, false);
  // Every gradient of r within `tolerance` (relative L2) of the plain step's.
  auto check_grads = [&](const train::LossAndGrad& r, const char* what, double tolerance) {
    REQUIRE(r.grads.size() == base.grads.size());
    for (const auto& [name, grad] : r.grads) {
      INFO(what << ": " << name);
      CHECK(relative_l2(grad, base.grads.at(name)) < tolerance);
    }
  };
  for (const auto& [lora_in_gemm, chained] :
       {std::pair{true, false}, {false, true}, {true, true}}) {
    INFO("LoRA term in the GEMM " << lora_in_gemm << ", chained launches " << chained
                                  << " (active here: " << cuda::chained_launch_enabled() << ")");
    const auto r = step(lora_in_gemm, chained);
    const auto same_step = step(lora_in_gemm, false);
    // Chained launches reorder nothing the forward computes: the same loss to the bit; the
    // gradients differ at most by the attention backward's fp32 atomics (dq).
    CHECK(r.loss == same_step.loss);
    REQUIRE(r.grads.size() == base.grads.size());
    for (const auto& [name, grad] : r.grads) {
      INFO(name);
      CHECK(relative_l2(grad, same_step.grads.at(name)) < 1e-5);
      // One fp16 rounding of y instead of two, and fp16 u and scale * B in the GEMM.
      CHECK(relative_l2(grad, base.grads.at(name)) < 1e-2);
    }
    CHECK(r.loss == Approx(base.loss).epsilon(1e-3));
  }
  // The last layer on the labelled rows only: the same rows through the same kernels (GEMMs
  // with fewer rows may pick another tile shape), so the same function within rounding.
  train::CudaGradOptions labelled;
  labelled.last_layer_labelled_rows = true;
  const auto compact = run(labelled, false);
  check_grads(compact, "last layer on labelled rows", 2e-3);
  CHECK(compact.loss == Approx(base.loss).epsilon(1e-3));
  // The rotary's backward inside the attention backward: the same bits for dk (and dv), dq up
  // to the order of its fp32 atomics, as the chained-launch comparison above.
  train::CudaGradOptions rotary;
  rotary.rotary_in_attention_backward = true;
  const auto fused = run(rotary, false);
  CHECK(fused.loss == base.loss);
  check_grads(fused, "rotary in the attention backward", 1e-5);
  // The LoRA passes on tensor cores: u, v and the factor gradients within fp32 rounding, so
  // only fp16 roundings of y and dx may flip.
  train::CudaGradOptions mma;
  mma.lora_tensor_cores = true;
  const auto tensor_cores = run(mma, false);
  check_grads(tensor_cores, "LoRA on tensor cores", 1e-2);
  CHECK(tensor_cores.loss == Approx(base.loss).epsilon(1e-3));
}

TEST_CASE("Trainer on the GPU starts at the CPU loss and learns", "[cuda][train]") {
  const io::ModelConfig c = grad_config();
  const auto dir = test::tiny_model_dir("cuda-train", 9, c);
  std::vector<TrainingExample> data;
  for (int k = 0; k < 8; ++k) data.push_back(example(c, 6 + k, 8, 20 + k));

  train::TrainerConfig config;
  config.lora_targets = {LoraTarget::QueryKeyValue, LoraTarget::Dense4HToH};
  config.lora_dropout = 0.0;
  config.optimizer = train::OptimizerKind::AdamW;
  config.lr = 1e-2;
  config.batch_size = 4;
  config.max_steps = 60;
  config.seed = 3;

  train::TrainerConfig cpu_config = config;
  cpu_config.max_steps = 1;
  train::Trainer cpu(dir, data, {}, cpu_config, test::scratch_dir("cuda-train-cpu"));
  const auto cpu_result = cpu.run();

  config.device = "cuda";
  train::Trainer gpu(dir, data, {}, config, test::scratch_dir("cuda-train-gpu"));
  CHECK(gpu.device_name().rfind("cuda:0", 0) == 0);
  CHECK_FALSE(gpu.memory_plan().empty());
  const auto result = gpu.run();
  REQUIRE(result.losses.size() == 60);
  CHECK(result.losses[0] == Approx(cpu_result.losses[0]).epsilon(1e-2));
  INFO("first loss " << result.losses[0] << ", last " << result.losses.back());
  CHECK(result.losses.back() < 0.6 * result.losses[0]);
  CHECK(std::filesystem::exists(result.output / "adapter_model.safetensors"));
}

// Not run by default: writes the inputs and GPU results of the PyTorch autograd check
// (tests/torch/lora_grad_check.py) into $QG_TORCH_DUMP_DIR — a 2-layer model of ChatGLM-6B
// width (hidden 4096, 32 heads, inner 16384), an adapter on all four targets in PEFT's
// format, one example, and the loss and LoRA gradients (no dropout) as safetensors.
TEST_CASE("dump GPU LoRA gradients at hidden 4096 for the PyTorch check", "[.torch-dump]") {
  const char* out_env = std::getenv("QG_TORCH_DUMP_DIR");
  REQUIRE(out_env != nullptr);
  const std::filesystem::path out(out_env);
  const io::ModelConfig c = test::sized_config(4096, 32, 16384, 2048, 256);
  model::RandomModelOptions weights;
  weights.seed = 4096;
  weights.dtype = DType::F16;
  model::write_random_model(out / "model", c, weights);
  // A trained-adapter scale: x A^T of unit size, B small, so LoRA moves the outputs by a
  // fraction of the base (a saturated softmax would make fp16 vs fp32 gradients incomparable).
  lora::LoraConfig lc;
  lc.r = 8;
  lc.lora_alpha = 16;
  lc.targets = {LoraTarget::QueryKeyValue, LoraTarget::Dense, LoraTarget::DenseHTo4H,
                LoraTarget::Dense4HToH};
  lora::LoraAdapter adapter(lc, c);
  std::mt19937 rng(77);
  for (int l = 0; l < c.num_layers; ++l) {
    for (LoraTarget t : lc.targets) {
      const auto [in, o] = lora::target_features(t, c);
      std::normal_distribution<float> a_dist(0.0f, 1.0f / std::sqrt(static_cast<float>(in)));
      std::normal_distribution<float> b_dist(0.0f, 0.05f);
      std::vector<float> a(static_cast<std::size_t>(8 * in)), b(static_cast<std::size_t>(o * 8));
      for (float& v : a) v = a_dist(rng);
      for (float& v : b) v = b_dist(rng);
      adapter.set(l, t, std::move(a), std::move(b));
    }
  }
  lora::save_adapter(adapter, out / "adapter", DType::F32);
  const TrainingExample e = example(c, 60, 90, 8);
  {
    std::ofstream f(out / "example.json");
    f << "{\"input_ids\": [";
    for (int t = 0; t < e.size(); ++t) f << (t ? ", " : "") << e.input_ids[static_cast<std::size_t>(t)];
    f << "], \"labels\": [";
    for (int t = 0; t < e.size(); ++t) f << (t ? ", " : "") << e.labels[static_cast<std::size_t>(t)];
    f << "]}\n";
  }
  const io::WeightStore store = io::WeightStore::open(out / "model");
  train::CudaModelGrad gpu(c, store_source(store), adapter, 0);
  const train::LossAndGrad r =
      gpu.loss_and_grad({&e}, {0}, e.scored_tokens(), 1024.0f, /*dropout=*/false);
  std::vector<io::TensorToWrite> tensors;
  const float loss = static_cast<float>(r.loss);
  tensors.push_back({"loss", DType::F32, {1}, &loss});
  for (const std::string& name : gpu.trainable()) {
    const auto& g = r.grads.at(name);
    const std::int64_t n = static_cast<std::int64_t>(g.size());
    const bool is_a = name.find("lora_A") != std::string::npos;
    const std::int64_t rows = is_a ? 8 : n / 8;
    tensors.push_back({name, DType::F32, {rows, n / rows}, g.data()});
  }
  io::write_safetensors(out / "qg_grads.safetensors", tensors);
}
