// The CUDA backend as a whole against the CPU reference: every Backend op through the shared
// harness (tests/backend_ops.h), then the full model on a tiny config and on a 2-layer
// full-width (hidden 4096) random model — logits within fp16 tolerance, identical greedy
// tokens, batched generation equal to one-by-one; decode steps replayed from CUDA graphs equal
// to op-by-op steps bit for bit (batch sizes changing, LoRA rows, continuous batching),
// chained launches (PDL) on and off bit for bit, and the LayerNorm fused into the decode GEMMs
// (CudaBackendOptions::fuse_layer_norm) on and off bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend_ops.h"
#include "catch.hpp"
#include "cuda/chained_launch.cuh"
#include "cuda/cuda_backend.h"
#include "lora_fixtures.h"
#include "model_fixtures.h"
#include "qinggeng/engine/batch_generator.h"
#include "qinggeng/engine/generator.h"

using namespace qg;
using test::HostMatrix;

namespace {

HostMatrix round_f16(HostMatrix m) {
  for (auto& v : m.data) v = half_to_float(float_to_half(v));
  return m;
}

// max |a - b| relative to max |b|.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double err = 0, scale = 1e-6;
  for (std::size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return err / scale;
}

}  // namespace

TEST_CASE("every CUDA backend op matches the CPU backend through the op harness") {
  auto gpu = model::make_backend("cuda");
  auto cpu = model::make_cpu_backend(4);
  const auto x = round_f16(test::random_matrix(37, 136, 1));
  const auto w = round_f16(test::random_matrix(72, 136, 2, 0.1f));
  const auto b = round_f16(test::random_matrix(1, 72, 3));
  CHECK(test::tolerance_ratio(test::run_linear(*gpu, x, w, &b), test::run_linear(*cpu, x, w, &b), 1e-2, 1e-2) <= 1.0);
  const auto g = round_f16(test::random_matrix(1, 136, 4, 0.1f, 1.0f));
  const auto be = round_f16(test::random_matrix(1, 136, 5, 0.1f));
  CHECK(test::tolerance_ratio(test::run_layer_norm(*gpu, x, g, be, 1e-5f), test::run_layer_norm(*cpu, x, g, be, 1e-5f), 1e-2, 1e-2) <= 1.0);
  CHECK(test::tolerance_ratio(test::run_gelu(*gpu, x), test::run_gelu(*cpu, x), 2e-3, 2e-3) <= 1.0);
  CHECK(test::tolerance_ratio(test::run_scaled_add(*gpu, x, 7.48f, x), test::run_scaled_add(*cpu, x, 7.48f, x), 1e-2, 2e-3) <= 1.0);
  CHECK(test::tolerance_ratio(test::run_embedding(*gpu, x, {36, 0, 5}), test::run_embedding(*cpu, x, {36, 0, 5}), 0, 0) <= 1.0);
  CHECK(test::tolerance_ratio(test::run_gather_rows(*gpu, x, {3, 1}), test::run_gather_rows(*cpu, x, {3, 1}), 0, 0) <= 1.0);

  const model::AttentionShape shape{4, 64};
  test::AttentionCase a{20, 9, {}, {}}, c{0, 3, {}, {}};
  for (int t = 0; t < 25; ++t) {
    a.positions.push_back(t < 9 ? t : 7);
    a.block_positions.push_back(t < 9 ? 0 : t - 8);
  }
  for (int t = 0; t < 11; ++t) {
    c.positions.push_back(t < 3 ? t : 2);
    c.block_positions.push_back(t < 3 ? 0 : t - 2);
  }
  const std::vector<HostMatrix> qkv = {round_f16(test::random_matrix(25, 3 * 256, 6)),
                                       round_f16(test::random_matrix(11, 3 * 256, 7))};
  CHECK(test::tolerance_ratio(test::run_attention(*gpu, shape, {a, c}, qkv),
                              test::run_attention(*cpu, shape, {a, c}, qkv), 5e-3, 5e-3) <= 1.0);
}

TEST_CASE("the CUDA model matches the CPU model: logits, greedy tokens, batching") {
  auto config = test::tiny_config();
  const auto dir = test::tiny_model_dir("cuda-tiny", 11, config);
  const auto cpu = model::GlmModel::load(dir, model::make_cpu_backend(8));
  const auto gpu = model::GlmModel::load(dir, model::make_backend("cuda"));
  const auto& c = config;
  const std::vector<int> ids = {5, 6, 7, 8, c.gmask_token_id, c.bos_token_id, 40, 41, 42};
  CHECK(relative_error(engine::score_logits(gpu, ids), engine::score_logits(cpu, ids)) < 1e-2);

  engine::GenerationConfig g;
  g.sampling.do_sample = false;
  g.max_new_tokens = 8;
  const std::vector<int> prompt = {5, 6, 7, 8, c.gmask_token_id, c.bos_token_id};
  const auto on_cpu = engine::generate(cpu, prompt, g);
  const auto on_gpu = engine::generate(gpu, prompt, g);
  const std::size_t same = std::min<std::size_t>(4, on_cpu.tokens.size());
  CHECK(std::vector<int>(on_gpu.tokens.begin(), on_gpu.tokens.begin() + same) ==
        std::vector<int>(on_cpu.tokens.begin(), on_cpu.tokens.begin() + same));

  const std::vector<std::vector<int>> prompts = {prompt, {9, c.gmask_token_id, c.bos_token_id},
                                                 {1, 2, 3, 4, 5, 6, 7, c.mask_token_id, c.bos_token_id}};
  const auto batched = engine::generate_batch(gpu, prompts, g, {3, 4096});
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    CHECK(batched[i].tokens == engine::generate(gpu, prompts[i], g).tokens);
  }
}

TEST_CASE("a 2-layer hidden-4096 model on CUDA matches the CPU reference") {
  const auto config = test::sized_config(4096, 32, 16384, 8192, 256);
  const auto dir = test::tiny_model_dir("cuda-4096", 12, config);
  const auto cpu = model::GlmModel::load(dir, model::make_cpu_backend(0));
  const auto gpu = model::GlmModel::load(dir, model::make_backend("cuda"));
  std::vector<int> ids;
  for (int i = 0; i < 40; ++i) ids.push_back((i * 37) % 7000);
  ids.push_back(config.gmask_token_id);
  ids.push_back(config.bos_token_id);
  for (int i = 0; i < 6; ++i) ids.push_back(100 + i);
  const auto l_cpu = engine::score_logits(cpu, ids);
  const auto l_gpu = engine::score_logits(gpu, ids);
  const double rel = relative_error(l_gpu, l_cpu);
  INFO("relative logits error " << rel);
  CHECK(rel < 2e-2);
  const std::size_t V = 8192;
  int agree = 0;
  for (std::size_t t = 0; t < ids.size(); ++t) {
    agree += engine::argmax(l_gpu.data() + t * V, V) == engine::argmax(l_cpu.data() + t * V, V);
  }
  CHECK(agree >= static_cast<int>(ids.size()) - 2);  // fp16 may flip a near-tie
}

TEST_CASE("runtime LoRA on CUDA matches the CPU reference, per sequence in one batch") {
  using lora::LoraTarget;
  auto config = test::tiny_config();
  const auto dir = test::tiny_model_dir("cuda-lora", 13, config);
  auto cpu = model::GlmModel::load(dir, model::make_cpu_backend(8));
  auto gpu = model::GlmModel::load(dir, model::make_backend("cuda"));
  const auto adapter = test::random_adapter(
      config, {LoraTarget::QueryKeyValue, LoraTarget::Dense, LoraTarget::DenseHTo4H, LoraTarget::Dense4HToH}, 8, 5);
  cpu.add_adapter(0, adapter);
  gpu.add_adapter(0, adapter);
  const std::vector<int> ids = {5, 6, 7, 8, config.gmask_token_id, config.bos_token_id, 40, 41};
  const auto layout = text::GlmLayout::from_ids(ids, config.bos_token_id, config.mask_token_id, config.gmask_token_id);
  std::vector<std::vector<float>> logits;
  for (auto* m : {&cpu, &gpu}) {
    auto with = m->new_kv_cache(), without = m->new_kv_cache();
    auto a = engine::layout_chunk(layout, *with, ids, true);
    a.adapter = 0;
    const auto b = engine::layout_chunk(layout, *without, ids, true);
    logits.push_back(m->forward({a, b}));  // adapted and plain sequences in one batch
  }
  CHECK(relative_error(logits[1], logits[0]) < 1e-2);
}

TEST_CASE("sampling on the device: greedy equals the CPU, sampled batches equal one-by-one") {
  auto config = test::tiny_config();
  const auto dir = test::tiny_model_dir("cuda-sampling", 14, config);
  const auto gpu = model::GlmModel::load(dir, model::make_backend("cuda"));
  REQUIRE(gpu.backend().samples_on_device());
  const std::vector<int> prompt = {5, 6, 7, config.gmask_token_id, config.bos_token_id};
  engine::GenerationConfig g;
  g.max_new_tokens = 10;
  g.sampling.temperature = 1.2f;
  g.sampling.top_p = 0.9f;
  g.sampling.repetition_penalty = 1.1f;
  g.sampling.seed = 9;
  const std::vector<std::vector<int>> prompts = {prompt, {9, 9, config.gmask_token_id, config.bos_token_id}};
  const auto batched = engine::generate_batch(gpu, prompts, g, {2, 4096});
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    CHECK(batched[i].tokens == engine::generate(gpu, prompts[i], g).tokens);
  }
  CHECK(engine::generate(gpu, prompt, g).tokens == engine::generate(gpu, prompt, g).tokens);
}

TEST_CASE("int8 and int4 weights on CUDA stay close to fp16 and generate") {
  const auto config = test::sized_config(256, 4, 1024, 512);
  const auto dir = test::tiny_model_dir("cuda-quant", 15, config);
  const auto f16 = model::GlmModel::load(dir, model::make_backend("cuda"));
  std::vector<int> ids;
  for (int i = 0; i < 20; ++i) ids.push_back(3 + (i * 37) % 490);  // 24 tokens: the prefill path
  ids.insert(ids.end(), {config.gmask_token_id, config.bos_token_id, 60, 61});
  const auto reference = engine::score_logits(f16, ids);
  // Documented bounds (docs/kernels/quant.md): relative logit error of these random models.
  for (const auto& [format, bound] : std::vector<std::pair<std::string, double>>{{"int8", 3e-2}, {"int4", 2e-1}}) {
    const auto quant = model::GlmModel::load(dir, model::make_backend("cuda", 0, format));
    const double rel = relative_error(engine::score_logits(quant, ids), reference);
    INFO(format << " relative logits error " << rel);
    CHECK(rel < bound);
    engine::GenerationConfig g;  // the decode path
    g.sampling.do_sample = false;
    g.max_new_tokens = 5;
    CHECK(engine::generate(quant, {5, 6, config.gmask_token_id, config.bos_token_id}, g).tokens.size() <= 5);
  }
  REQUIRE_THROWS_WITH(model::make_backend("cpu", 0, "int8"), QG_CONTAINS("CUDA"));
}

namespace {

// Logits of every forward of a scripted decode run (batch size changing as sequences join and
// leave, one sequence with a LoRA adapter), with decode graphs on or off. Greedy tokens are
// fed back, so a difference anywhere changes everything after it.
std::vector<std::vector<float>> scripted_decode(const model::GlmModel& m, bool graphs) {
  m.backend().set_decode_graphs(graphs);
  const auto& c = m.config();
  const std::size_t V = static_cast<std::size_t>(c.vocab_size);
  struct Seq {
    std::unique_ptr<model::KvCache> cache;
    text::GlmLayout layout;
    int adapter = -1;
    int next = 0;
  };
  std::vector<Seq> seqs;
  std::vector<std::vector<float>> trace;
  // A sequence joins: its prompt goes through one prefill forward of its own.
  auto join = [&](int length, int salt, int adapter) {
    std::vector<int> ids;
    for (int i = 0; i + 2 < length; ++i) ids.push_back(3 + (i * 37 + salt * 11) % 400);
    ids.push_back(c.gmask_token_id);
    ids.push_back(c.bos_token_id);
    Seq s{m.new_kv_cache(), text::GlmLayout::from_ids(ids, c.bos_token_id, c.mask_token_id, c.gmask_token_id),
          adapter, 0};
    auto chunk = engine::layout_chunk(s.layout, *s.cache, ids, false);
    chunk.adapter = adapter;
    trace.push_back(m.forward({chunk}));
    s.next = engine::argmax(trace.back().data(), V);
    seqs.push_back(std::move(s));
  };
  // Decode steps over the sequences in `active`.
  auto decode = [&](const std::vector<int>& active, int steps) {
    for (int step = 0; step < steps; ++step) {
      std::vector<model::SequenceChunk> batch;
      for (int i : active) {
        auto& s = seqs[static_cast<std::size_t>(i)];
        batch.push_back(engine::layout_chunk(s.layout, *s.cache, {s.next}, false));
        batch.back().adapter = s.adapter;
      }
      trace.push_back(m.forward(batch));
      for (std::size_t r = 0; r < active.size(); ++r) {
        seqs[static_cast<std::size_t>(active[r])].next = engine::argmax(trace.back().data() + r * V, V);
      }
    }
  };
  join(70, 1, -1);
  decode({0}, 4);  // batch 1: measured, captured, replayed twice
  join(5, 2, -1);
  join(150, 3, 0);
  join(33, 4, -1);
  decode({0, 1, 2, 3}, 5);  // batch 4 with LoRA rows, lengths 5..150
  decode({1, 3}, 4);        // two leave
  decode({3}, 3);           // batch 1 again: the graph captured first, other lengths
  decode({2}, 3);           // batch 1 with an adapter
  m.backend().set_decode_graphs(true);
  return trace;
}

/// The model in `dir` on `backend`, with adapter 0 on all four targets: scripted_decode op by
/// op, then with decode graphs.
std::pair<std::vector<std::vector<float>>, std::vector<std::vector<float>>> scripted_runs(
    const std::filesystem::path& dir, const io::ModelConfig& config,
    std::shared_ptr<model::Backend> backend) {
  using lora::LoraTarget;
  auto gpu = model::GlmModel::load(dir, std::move(backend));
  gpu.add_adapter(0, test::random_adapter(config,
                                          {LoraTarget::QueryKeyValue, LoraTarget::Dense,
                                           LoraTarget::DenseHTo4H, LoraTarget::Dense4HToH},
                                          8, 6));
  return {scripted_decode(gpu, false), scripted_decode(gpu, true)};
}

}  // namespace

TEST_CASE("decode steps replayed from CUDA graphs equal op-by-op steps bit for bit") {
  using lora::LoraTarget;
  const auto config = test::sized_config(256, 4, 1024, 512, 512);
  const auto dir = test::tiny_model_dir("cuda-graphs", 16, config);
  auto gpu = model::GlmModel::load(dir, model::make_backend("cuda"));
  gpu.add_adapter(0, test::random_adapter(config, {LoraTarget::QueryKeyValue, LoraTarget::Dense,
                                                   LoraTarget::DenseHTo4H, LoraTarget::Dense4HToH}, 8, 6));
  const auto eager = scripted_decode(gpu, false);
  const auto graphed = scripted_decode(gpu, true);
  REQUIRE(graphed.size() == eager.size());
  for (std::size_t i = 0; i < eager.size(); ++i) {
    INFO("forward " << i);
    CHECK(graphed[i] == eager[i]);
  }
  // A second graphed run replays the graphs captured by the first.
  CHECK(scripted_decode(gpu, true) == eager);

  // Continuous batching (prefills and decodes mixed, sequences finishing at different
  // lengths) and device sampling give the same tokens either way.
  engine::GenerationConfig g;
  g.max_new_tokens = 12;
  g.sampling.temperature = 0.9f;
  g.sampling.top_p = 0.8f;
  g.sampling.top_k = 40;
  g.sampling.repetition_penalty = 1.1f;
  g.sampling.seed = 3;
  std::vector<std::vector<int>> prompts;
  for (int p = 0; p < 6; ++p) {
    std::vector<int> ids;
    for (int i = 0; i < 4 + 9 * p; ++i) ids.push_back(3 + (i * 13 + p) % 400);
    ids.push_back(config.gmask_token_id);
    ids.push_back(config.bos_token_id);
    prompts.push_back(ids);
  }
  std::vector<std::vector<engine::GenerationResult>> runs;
  for (bool graphs : {false, true}) {
    gpu.backend().set_decode_graphs(graphs);
    runs.push_back(engine::generate_batch(gpu, prompts, g, {3, 4096}));
  }
  for (std::size_t i = 0; i < prompts.size(); ++i) CHECK(runs[1][i].tokens == runs[0][i].tokens);
}

TEST_CASE("chained launches (PDL) change no prefill or decode result, bit for bit") {
  const auto config = test::sized_config(256, 4, 1024, 512, 512);
  const auto dir = test::tiny_model_dir("cuda-chained", 16, config);
  struct Restore {  // the switch as it was (QG_CUDA_PDL may have turned it on)
    bool before = cuda::set_chained_launch(false);
    ~Restore() { cuda::set_chained_launch(before); }
  } restore;
  // Each setting gets its own backend, so graphs are captured under it.
  auto run = [&](bool chained) {
    cuda::set_chained_launch(chained);
    return scripted_runs(dir, config, model::make_backend("cuda"));
  };
  const auto ordinary = run(false);
  const auto chained = run(true);
  INFO("chained launches active on this GPU: " << cuda::chained_launch_enabled());
  CHECK(chained.first == ordinary.first);
  CHECK(chained.second == ordinary.second);
}

TEST_CASE("the LayerNorm fused into the decode GEMMs changes no result, bit for bit") {
  const auto config = test::sized_config(256, 4, 1024, 512, 512);
  const auto dir = test::tiny_model_dir("cuda-fused-ln", 16, config);
  struct Unset {  // QG_CUDA_FUSE_LN=1 would fuse the plain run too; restored afterwards
    const char* value = std::getenv("QG_CUDA_FUSE_LN");
    std::string saved = value ? value : "";
    Unset() { unsetenv("QG_CUDA_FUSE_LN"); }
    ~Unset() {
      if (value != nullptr) setenv("QG_CUDA_FUSE_LN", saved.c_str(), 1);
    }
  } unset;
  auto run = [&](bool fused) {
    model::CudaBackendOptions options;
    options.fuse_layer_norm = fused;
    return scripted_runs(dir, config, model::make_cuda_backend(0, options));
  };
  const auto plain = run(false);
  const auto fused = run(true);
  CHECK(fused.first == plain.first);
  CHECK(fused.second == plain.second);
}
