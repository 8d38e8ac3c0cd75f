// qg::cuda::lora_add_f16 against the host reference qg::lora::lora_add for several adapters in
// one batch (rows with -1, an empty slot and an unknown id left untouched), ranks 1..64 and
// ChatGLM-sized in/out; slot reloading; and the argument checks. Tag [lora].
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "backend_ops.h"
#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/lora.h"
#include "qinggeng/lora/lora_add.h"

namespace {

using qg::lora::LoraAdapter;
using qg::lora::LoraTarget;
using qg::test::DeviceBuffer;
using qg::test::HostMatrix;

/// A model whose mlp.dense_h_to_4h is [out, in]: the target every shape test uses.
qg::io::ModelConfig model_for(std::int64_t in, std::int64_t out, std::int64_t layers) {
  qg::io::ModelConfig m;
  m.hidden_size = in;
  m.inner_hidden_size = out;
  m.num_layers = layers;
  return m;
}

/// An adapter of rank r with fp16-exact random factors on every layer (B is not zero, unlike
/// a fresh PEFT init, so the update is visible).
LoraAdapter random_adapter(const qg::io::ModelConfig& model, std::int64_t r, double alpha,
                           std::uint32_t seed) {
  qg::lora::LoraConfig config;
  config.r = r;
  config.lora_alpha = alpha;
  config.targets = {LoraTarget::DenseHTo4H};
  LoraAdapter adapter(config, model);
  const std::int64_t in = model.hidden_size, out = model.inner_hidden_size;
  for (int layer = 0; layer < model.num_layers; ++layer) {
    auto a = qg::test::round_to_fp16(qg::test::random_matrix(r, in, seed + 2 * layer,
                                                             1.0f / std::sqrt(float(in))));
    auto b = qg::test::round_to_fp16(qg::test::random_matrix(out, r, seed + 2 * layer + 1,
                                                             1.0f / std::sqrt(float(r))));
    adapter.set(layer, LoraTarget::DenseHTo4H, std::move(a.data), std::move(b.data));
  }
  return adapter;
}

/// Runs lora_add_f16 on fp16 copies of x and y; returns the updated y.
HostMatrix run_gpu(const qg::cuda::LoraLayerView& view, const HostMatrix& x, const HostMatrix& y,
                   const std::vector<std::int32_t>& ids) {
  DeviceBuffer<__half> dx(x.data.size()), dy(y.data.size());
  DeviceBuffer<std::int32_t> dids(ids.size());
  qg::test::upload_fp16(dx, x);
  qg::test::upload_fp16(dy, y);
  dids.upload(ids);
  const std::size_t bytes = qg::cuda::lora_add_workspace_bytes(view, x.rows);
  DeviceBuffer<char> workspace(bytes);
  qg::cuda::lora_add_f16(view, reinterpret_cast<const std::uint16_t*>(dx.get()),
                         reinterpret_cast<std::uint16_t*>(dy.get()), x.rows, dids.get(),
                         workspace.get(), bytes, nullptr);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  return qg::test::download_fp16(dy, y.rows, y.cols);
}

/// The host reference for the same rows: ids outside the loaded slots count as "none".
HostMatrix run_cpu(const std::vector<const LoraAdapter*>& slots, int layer, const HostMatrix& x,
                   HostMatrix y, std::vector<std::int32_t> ids) {
  std::vector<qg::lora::LoraFactors> factors;
  for (const LoraAdapter* a : slots)
    factors.push_back(a ? a->factors(layer, LoraTarget::DenseHTo4H) : qg::lora::LoraFactors{});
  for (auto& id : ids)
    if (id >= static_cast<std::int32_t>(slots.size())) id = -1;
  qg::lora::lora_add(x.data.data(), x.rows, x.cols, y.data.data(), y.cols, factors, ids.data());
  return y;
}

}  // namespace

TEST_CASE("lora_add_f16 matches the host reference for mixed adapters, ranks and shapes",
          "[lora]") {
  std::uint32_t seed = 1000;
  std::size_t checked = 0;
  for (std::int64_t in : {64, 4096, 12288}) {
    for (std::int64_t out : {64, 4096, 12288}) {
      for (std::int64_t r : {1, 8, 16, 64}) {
        const auto model = model_for(in, out, 2);
        // Slots 0-2 loaded (alphas give scales 2, 0.5, -1), slot 3 empty; capacity 4.
        qg::cuda::GpuLoraStack stack(LoraTarget::DenseHTo4H, model, 4, static_cast<int>(r));
        const LoraAdapter a0 = random_adapter(model, r, 2.0 * r, seed += 10);
        const LoraAdapter a1 = random_adapter(model, r, 0.5 * r, seed += 10);
        const LoraAdapter a2 = random_adapter(model, r, -1.0 * r, seed += 10);
        stack.load(0, a0);
        stack.load(1, a1);
        stack.load(2, a2);
        for (std::int64_t T : {1, 7, 64, 512}) {
          if (in == 12288 && out == 12288 && T == 512 && r == 64) continue;  // host time only
          const int layer = static_cast<int>(T % 2);
          std::vector<std::int32_t> ids(static_cast<std::size_t>(T));
          for (std::int64_t t = 0; t < T; ++t) {
            // Runs of a few rows per id (as sequences are), cycling through adapters, none,
            // the empty slot and an id beyond the capacity.
            const std::int32_t pattern[] = {0, 1, -1, 2, 3, 0, 9, 2};
            ids[static_cast<std::size_t>(t)] = T == 1 ? 2 : pattern[(t / 3) % 8];
          }
          const HostMatrix x = qg::test::round_to_fp16(qg::test::random_matrix(T, in, ++seed));
          const HostMatrix y = qg::test::round_to_fp16(qg::test::random_matrix(T, out, ++seed));
          const HostMatrix gpu = run_gpu(stack.layer(layer), x, y, ids);
          const HostMatrix cpu = run_cpu({&a0, &a1, &a2, nullptr}, layer, x, y, ids);
          INFO("in " << in << " out " << out << " r " << r << " T " << T);
          CHECK(qg::test::tolerance_ratio(gpu, cpu, 2e-2, 1e-2) <= 1.0);
          // Untouched rows are bit-identical (an fp16 round trip of an fp16 value is exact).
          for (std::int64_t t = 0; t < T; ++t) {
            const auto id = ids[static_cast<std::size_t>(t)];
            if (id >= 0 && id <= 2) continue;
            for (std::int64_t o = 0; o < out; ++o) REQUIRE(gpu.at(t, o) == y.at(t, o));
          }
          ++checked;
        }
      }
    }
  }
  CHECK(checked > 100);
}

TEST_CASE("GpuLoraStack mixes ranks, reloads and unloads slots", "[lora]") {
  const auto model = model_for(256, 384, 1);
  qg::cuda::GpuLoraStack stack(LoraTarget::DenseHTo4H, model, 3, 40);
  const LoraAdapter small = random_adapter(model, 3, 6.0, 1);
  const LoraAdapter large = random_adapter(model, 40, 20.0, 2);
  stack.load(0, small);
  stack.load(1, large);
  CHECK(stack.loaded(1));
  CHECK_FALSE(stack.loaded(2));
  const std::vector<std::int32_t> ids = {1, 0, 0, 1, -1, 2, 1, 0, 1, 1, 0};
  const auto T = static_cast<std::int64_t>(ids.size());
  const HostMatrix x = qg::test::round_to_fp16(qg::test::random_matrix(T, 256, 3));
  const HostMatrix y = qg::test::round_to_fp16(qg::test::random_matrix(T, 384, 4));
  CHECK(qg::test::tolerance_ratio(run_gpu(stack.layer(0), x, y, ids),
                                  run_cpu({&small, &large}, 0, x, y, ids), 2e-2, 1e-2) <= 1.0);
  // Swap: slot 0 gets the large adapter, slot 1 is emptied.
  stack.load(0, large);
  stack.unload(1);
  CHECK(qg::test::tolerance_ratio(run_gpu(stack.layer(0), x, y, ids),
                                  run_cpu({&large, nullptr}, 0, x, y, ids), 2e-2, 1e-2) <= 1.0);
}

TEST_CASE("lora_add_f16 and GpuLoraStack reject bad arguments", "[lora]") {
  const auto model = model_for(64, 64, 1);
  CHECK_THROWS_WITH(qg::cuda::GpuLoraStack(LoraTarget::DenseHTo4H, model, 2, 65),
                    QG_CONTAINS("max_rank"));
  qg::cuda::GpuLoraStack stack(LoraTarget::DenseHTo4H, model, 2, 8);
  CHECK_THROWS_WITH(stack.load(2, random_adapter(model, 8, 16, 1)), QG_CONTAINS("slot 2"));
  CHECK_THROWS_WITH(stack.load(0, random_adapter(model, 16, 16, 1)), QG_CONTAINS("rank 16"));
  CHECK_THROWS_WITH(stack.load(0, random_adapter(model_for(64, 128, 1), 8, 16, 1)),
                    QG_CONTAINS("different shape"));
  CHECK_THROWS_WITH(stack.layer(1), QG_CONTAINS("layer 1"));
  CHECK_THROWS_WITH(qg::cuda::check_adapter_rows(stack, {0, -1, 2}), QG_CONTAINS("row 2"));
  DeviceBuffer<__half> x(64), y(64);
  DeviceBuffer<std::int32_t> ids(1);
  DeviceBuffer<char> workspace(16);
  const auto view = stack.layer(0);
  CHECK_THROWS_WITH(qg::cuda::lora_add_f16(view, reinterpret_cast<std::uint16_t*>(x.get()),
                                           reinterpret_cast<std::uint16_t*>(y.get()), 1, ids.get(),
                                           workspace.get(), 16, nullptr),
                    QG_CONTAINS("workspace"));
  CHECK_THROWS_WITH(qg::cuda::lora_add_f16(view, nullptr, reinterpret_cast<std::uint16_t*>(y.get()),
                                           1, ids.get(), workspace.get(), 1 << 20, nullptr),
                    QG_CONTAINS("null"));
}
