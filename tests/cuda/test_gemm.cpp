// qg::cuda::gemm_f16 (tiled and skinny paths) against the CPU reference backend over odd
// shapes, every epilogue and both output types; the Hopper wgmma tiles (both sizes, many
// tiles, tails in M, N and K, odd N) for gemm_f16 and gemm_f16_nn; against cuBLAS at
// model-sized shapes; batched decode equal to one-by-one; a low-rank term (GemmLowRank) equal
// to the GEMM over the concatenated K; the decode GEMM with its input LayerNorm fused
// (gemm_f16_layer_norm) equal to layer_norm then the skinny GEMM; and the argument checks.
#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backend_ops.h"
#include "catch.hpp"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/gemm_backward.h"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/tensor/dtype.h"

namespace {

using qg::cuda::GemmEpilogue;
using qg::cuda::GemmPath;
using qg::test::HostMatrix;
using Kind = GemmEpilogue::Kind;

/// A device allocation freed on scope exit.
class DeviceBuffer {
 public:
  explicit DeviceBuffer(std::size_t bytes) {
    REQUIRE(cudaMalloc(&ptr_, bytes == 0 ? 1 : bytes) == cudaSuccess);
    bytes_ = bytes;
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

/// Rounds every element to fp16 in place, so the CPU reference sees the GPU's exact inputs.
void round_to_half(HostMatrix& m) {
  for (auto& v : m.data) v = qg::half_to_float(qg::float_to_half(v));
}

std::unique_ptr<DeviceBuffer> upload_half(const HostMatrix& m) {
  std::vector<std::uint16_t> bits(m.data.size());
  for (std::size_t i = 0; i < bits.size(); ++i) bits[i] = qg::float_to_half(m.data[i]);
  auto buf = std::make_unique<DeviceBuffer>(bits.size() * 2);
  REQUIRE(cudaMemcpy(buf->as<void>(), bits.data(), bits.size() * 2, cudaMemcpyHostToDevice) ==
          cudaSuccess);
  return buf;
}

/// y as host floats; y was poisoned with all-ones bytes (NaN in both types) before the run.
HostMatrix download(const DeviceBuffer& y, std::int64_t rows, std::int64_t cols, bool fp32) {
  HostMatrix out{rows, cols, std::vector<float>(static_cast<std::size_t>(rows * cols))};
  if (fp32) {
    REQUIRE(cudaMemcpy(out.data.data(), y.as<void>(), out.data.size() * 4,
                       cudaMemcpyDeviceToHost) == cudaSuccess);
  } else {
    std::vector<std::uint16_t> bits(out.data.size());
    REQUIRE(cudaMemcpy(bits.data(), y.as<void>(), bits.size() * 2, cudaMemcpyDeviceToHost) ==
            cudaSuccess);
    for (std::size_t i = 0; i < bits.size(); ++i) out.data[i] = qg::half_to_float(bits[i]);
  }
  return out;
}

std::size_t count_non_finite(const HostMatrix& m) {
  std::size_t n = 0;
  for (float v : m.data) n += std::isfinite(v) ? 0 : 1;
  return n;
}

/// One problem on the device: fp16 copies of x, w, bias, residual and a poisoned output.
struct GpuProblem {
  std::int64_t M, N, K;
  std::unique_ptr<DeviceBuffer> x, w, bias, residual;
  DeviceBuffer y;

  GpuProblem(const HostMatrix& hx, const HostMatrix& hw, const HostMatrix& hb,
             const HostMatrix& hr)
      : M(hx.rows), N(hw.rows), K(hx.cols), x(upload_half(hx)), w(upload_half(hw)),
        bias(upload_half(hb)), residual(upload_half(hr)),
        y(static_cast<std::size_t>(hx.rows * hw.rows) * 4) {}

  HostMatrix run(Kind kind, float alpha, bool fp32, GemmPath path) {
    REQUIRE(cudaMemset(y.as<void>(), 0xff, y.bytes()) == cudaSuccess);
    GemmEpilogue e;
    e.kind = kind;
    e.bias = bias->as<std::uint16_t>();
    e.residual = residual->as<std::uint16_t>();
    e.alpha = alpha;
    qg::cuda::gemm_f16(x->as<std::uint16_t>(), w->as<std::uint16_t>(), y.as<void>(), fp32, M, N,
                       K, e, nullptr, path);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    return download(y, M, N, fp32);
  }
};

/// Inputs rounded to fp16: x ~ N(0, 1), w ~ N(0, 1/K) so outputs are O(1) at every K.
struct HostProblem {
  HostMatrix x, w, bias, residual;
  HostProblem(std::int64_t M, std::int64_t N, std::int64_t K, std::uint32_t seed)
      : x(qg::test::random_matrix(M, K, seed)),
        w(qg::test::random_matrix(N, K, seed + 1, 1.0f / std::sqrt(static_cast<float>(K)))),
        bias(qg::test::random_matrix(1, N, seed + 2, 0.5f)),
        residual(qg::test::random_matrix(M, N, seed + 3)) {
    round_to_half(x);
    round_to_half(w);
    round_to_half(bias);
    round_to_half(residual);
  }
};

bool wgmma_available() { return qg::cuda::gemm_plan(1024, 1024).rfind("wgmma", 0) == 0; }

/// The CPU backend's result of every epilogue kind for one problem.
struct EpilogueReferences {
  HostMatrix plain, biased, gelu, residual;

  EpilogueReferences(qg::model::Backend& cpu, const HostProblem& p, float alpha)
      : plain(qg::test::run_linear(cpu, p.x, p.w, nullptr)), biased(plain) {
    for (std::int64_t r = 0; r < biased.rows; ++r)
      for (std::int64_t c = 0; c < biased.cols; ++c) biased.at(r, c) += p.bias.at(0, c);
    gelu = qg::test::run_gelu(cpu, biased);
    residual = qg::test::run_scaled_add(cpu, p.residual, alpha, biased);
  }

  /// Each epilogue kind with the result it must give.
  std::vector<std::pair<Kind, const HostMatrix*>> cases() const {
    return {{Kind::None, &plain}, {Kind::Bias, &biased}, {Kind::BiasGelu, &gelu},
            {Kind::BiasResidual, &residual}};
  }
};

/// A GPU result against its reference: finite, and within one fp16 rounding (2^-11 relative)
/// on top of fp32 accumulation, or 2e-4 for fp32 output.
void check_against(const HostMatrix& got, const HostMatrix& ref, bool fp32) {
  const double tol = fp32 ? 2e-4 : 2e-3;
  REQUIRE(count_non_finite(got) == 0);
  REQUIRE(qg::test::tolerance_ratio(got, ref, tol, tol) <= 1.0);
}

}  // namespace

TEST_CASE("gemm_f16 matches the CPU reference on odd shapes, every epilogue and output type") {
  auto cpu = qg::model::make_cpu_backend();
  const float alpha = 1.75f;  // ChatGLM-6B's sqrt(2 * 28 layers) is 7.48; any value will do
  std::uint32_t seed = 100;
  std::size_t checked = 0;
  for (std::int64_t M : {1, 2, 3, 7, 16, 17, 64, 127, 300}) {
    for (std::int64_t N : {8, 24, 136, 1000, 4104}) {
      for (std::int64_t K : {8, 64, 72, 1032}) {
        seed += 10;
        HostProblem p(M, N, K, seed);
        const EpilogueReferences refs(*cpu, p, alpha);
        GpuProblem gpu(p.x, p.w, p.bias, p.residual);

        std::vector<GemmPath> paths{GemmPath::Tiled};
        if (wgmma_available()) paths.push_back(GemmPath::Wgmma);
        if (M <= qg::cuda::kGemmSkinnyMaxM) paths.push_back(GemmPath::Skinny);
        for (GemmPath path : paths) {
          for (bool fp32 : {false, true}) {
            for (const auto& [kind, ref] : refs.cases()) {
              INFO("M=" << M << " N=" << N << " K=" << K << " kind=" << static_cast<int>(kind)
                        << " fp32=" << fp32 << " path=" << static_cast<int>(path));
              check_against(gpu.run(kind, alpha, fp32, path), *ref, fp32);
              ++checked;
            }
          }
        }
      }
    }
  }
  CHECK(checked == (wgmma_available() ? 2 : 1) * 9 * 5 * 4 * 2 * 4 + 7 * 5 * 4 * 2 * 4);
}

TEST_CASE("gemm_f16 runs wgmma for prefill shapes on sm_90") {
  cudaDeviceProp prop{};
  REQUIRE(cudaGetDeviceProperties(&prop, 0) == cudaSuccess);
  const std::string plan = qg::cuda::gemm_plan(2048, 4096);
  INFO("sm_" << prop.major << prop.minor << " plan for 2048 x 4096: " << plan);
  if (prop.major == 9 && prop.minor == 0) {
    CHECK(plan.rfind("wgmma", 0) == 0);
  } else {
    CHECK(plan.rfind("mma.sync", 0) == 0);
    HostProblem p(32, 16, 64, 5);
    GpuProblem gpu(p.x, p.w, p.bias, p.residual);
    REQUIRE_THROWS_WITH(gpu.run(Kind::None, 1.0f, false, GemmPath::Wgmma),
                        QG_CONTAINS("needs an sm_90 GPU"));
  }
  CHECK(qg::cuda::gemm_plan(16, 4096) == "skinny");
  CHECK(qg::cuda::gemm_plan(64, 4096) == "skinny");  // 32 tiles would idle most SMs
}

TEST_CASE("gemm_f16 wgmma tiles: tails in M, N and K, odd N, every epilogue and output type") {
  if (!wgmma_available()) return;  // needs sm_90 and a build with the sm_90a kernels
  auto cpu = qg::model::make_cpu_backend();
  const float alpha = 0.75f;
  struct Shape {
    std::int64_t M, N, K;
    const char* plan;  // what the planner picks on a 132-SM H100 (INFO only: SM counts vary)
  };
  // 1000 rows = 7 full m-tiles + 104; N 4000 / 4001 end inside a 256-wide tile; N = 1001 and
  // 4001 are odd (pair stores instead of 16-byte rows); K = 72 and 1032 end inside a K slice.
  for (const Shape s : {Shape{1000, 4000, 1032, "wgmma 128x256"},
                        Shape{1000, 4001, 72, "wgmma 128x256"},
                        Shape{300, 4104, 72, "wgmma 128x128"},
                        Shape{300, 1001, 1032, "wgmma 128x128"}}) {
    HostProblem p(s.M, s.N, s.K, 900 + static_cast<std::uint32_t>(s.N));
    const EpilogueReferences refs(*cpu, p, alpha);
    GpuProblem gpu(p.x, p.w, p.bias, p.residual);
    for (bool fp32 : {false, true}) {
      for (const auto& [kind, ref] : refs.cases()) {
        INFO("M=" << s.M << " N=" << s.N << " K=" << s.K << " kind=" << static_cast<int>(kind)
                  << " fp32=" << fp32 << " plan " << qg::cuda::gemm_plan(s.M, s.N)
                  << " (132 SMs: " << s.plan << ")");
        check_against(gpu.run(kind, alpha, fp32, GemmPath::Wgmma), *ref, fp32);
      }
    }
  }
}

TEST_CASE("gemm_f16_nn on wgmma 128x256 tiles: more tiles than SMs, tails, residual in place") {
  if (!wgmma_available()) return;
  // 9 m-tiles (the last of 76 rows) x 16 n-tiles = 144 CTAs of 128x256 on an H100; K = 136
  // ends 8 into the third K slice. W is [K, N] (read MN-major).
  const std::int64_t M = 1100, N = 4096, K = 136;
  HostMatrix x = qg::test::random_matrix(M, K, 61);
  HostMatrix w = qg::test::random_matrix(K, N, 62, 1.0f / std::sqrt(static_cast<float>(K)));
  HostMatrix res = qg::test::random_matrix(M, N, 63);
  round_to_half(x);
  round_to_half(w);
  round_to_half(res);
  const float alpha = 1.5f;
  HostMatrix expect{M, N, std::vector<float>(static_cast<std::size_t>(M * N))};
  HostMatrix with_res = expect;
  for (std::int64_t m = 0; m < M; ++m) {
    std::vector<double> row(static_cast<std::size_t>(N), 0.0);
    for (std::int64_t k = 0; k < K; ++k) {
      const double xv = x.at(m, k);
      for (std::int64_t n = 0; n < N; ++n) row[n] += xv * w.at(k, n);
    }
    for (std::int64_t n = 0; n < N; ++n) {
      expect.at(m, n) = static_cast<float>(row[n]);
      with_res.at(m, n) = static_cast<float>(row[n] + alpha * res.at(m, n));
    }
  }
  auto gx = upload_half(x), gw = upload_half(w);
  for (bool fp32 : {false, true}) {
    DeviceBuffer y(static_cast<std::size_t>(M * N) * 4);
    REQUIRE(cudaMemset(y.as<void>(), 0xff, y.bytes()) == cudaSuccess);
    qg::cuda::gemm_f16_nn(gx->as<std::uint16_t>(), gw->as<std::uint16_t>(), y.as<void>(), fp32, M,
                          N, K, {}, nullptr);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    const HostMatrix got = download(y, M, N, fp32);
    INFO("fp32=" << fp32);
    REQUIRE(count_non_finite(got) == 0);
    CHECK(qg::test::tolerance_ratio(got, expect, 2e-3, 2e-3) <= 1.0);
  }
  // y = residual * alpha + X W, out of place, then with y and the residual the same buffer
  // (the same bits).
  auto residual = upload_half(res), y = upload_half(res);
  DeviceBuffer separate(static_cast<std::size_t>(M * N) * 2);
  qg::cuda::GemmNnEpilogue e;
  e.residual = residual->as<std::uint16_t>();
  e.alpha = alpha;
  qg::cuda::gemm_f16_nn(gx->as<std::uint16_t>(), gw->as<std::uint16_t>(), separate.as<void>(),
                        false, M, N, K, e, nullptr);
  e.residual = y->as<std::uint16_t>();
  qg::cuda::gemm_f16_nn(gx->as<std::uint16_t>(), gw->as<std::uint16_t>(), y->as<void>(), false, M,
                        N, K, e, nullptr);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const HostMatrix in_place = download(*y, M, N, false);
  CHECK(qg::test::tolerance_ratio(in_place, with_res, 2e-3, 2e-3) <= 1.0);
  CHECK(in_place.data == download(separate, M, N, false).data);
}

namespace {

/// [a | b]: the columns of b appended to each row of a (same row count).
HostMatrix concat_columns(const HostMatrix& a, const HostMatrix& b) {
  HostMatrix out{a.rows, a.cols + b.cols,
                 std::vector<float>(static_cast<std::size_t>(a.rows * (a.cols + b.cols)))};
  for (std::int64_t r = 0; r < a.rows; ++r) {
    for (std::int64_t c = 0; c < a.cols; ++c) out.at(r, c) = a.at(r, c);
    for (std::int64_t c = 0; c < b.cols; ++c) out.at(r, a.cols + c) = b.at(r, c);
  }
  return out;
}

}  // namespace

TEST_CASE("gemm_f16 with a low-rank term equals the GEMM over the concatenated K") {
  auto cpu = qg::model::make_cpu_backend();
  const float alpha = 1.25f;
  struct Shape {
    std::int64_t M, N, K, R;
  };
  // Rank 8 / 16 (one slice, mostly zero-filled), 64 (one whole wgmma slice), 72 (two); K
  // ending inside a slice (72, 1032) or on one (64, 1024: bitwise the concatenated GEMM).
  for (const Shape s :
       {Shape{300, 1001, 1032, 8}, Shape{1000, 4001, 72, 16}, Shape{130, 136, 64, 64},
        Shape{17, 24, 8, 72}, Shape{256, 512, 1024, 8}, Shape{1, 40, 64, 8}}) {
    const auto seed = static_cast<std::uint32_t>(7000 + s.M + s.N + s.K + s.R);
    HostProblem p(s.M, s.N, s.K, seed);
    HostMatrix u = qg::test::random_matrix(s.M, s.R, seed + 5);
    HostMatrix v = qg::test::random_matrix(s.N, s.R, seed + 6, 0.5f);
    round_to_half(u);
    round_to_half(v);
    HostProblem joined = p;  // [x | u] and [w | v]: the same product over K + R columns
    joined.x = concat_columns(p.x, u);
    joined.w = concat_columns(p.w, v);
    const EpilogueReferences refs(*cpu, joined, alpha);
    GpuProblem gpu(p.x, p.w, p.bias, p.residual);
    GpuProblem gpu_joined(joined.x, joined.w, p.bias, p.residual);
    auto gu = upload_half(u), gv = upload_half(v);
    const qg::cuda::GemmLowRank low_rank{gu->as<std::uint16_t>(), gv->as<std::uint16_t>(), s.R};

    std::vector<std::pair<GemmPath, int>> paths{{GemmPath::Auto, 0}, {GemmPath::Tiled, 32}};
    if (wgmma_available()) paths.emplace_back(GemmPath::Wgmma, 64);
    for (const auto& [path, slice] : paths) {
      for (bool fp32 : {false, true}) {
        for (const auto& [kind, ref] : refs.cases()) {
          INFO("M=" << s.M << " N=" << s.N << " K=" << s.K << " R=" << s.R
                    << " kind=" << static_cast<int>(kind) << " fp32=" << fp32
                    << " path=" << static_cast<int>(path));
          REQUIRE(cudaMemset(gpu.y.as<void>(), 0xff, gpu.y.bytes()) == cudaSuccess);
          GemmEpilogue e;
          e.kind = kind;
          e.bias = gpu.bias->as<std::uint16_t>();
          e.residual = gpu.residual->as<std::uint16_t>();
          e.alpha = alpha;
          qg::cuda::gemm_f16(gpu.x->as<std::uint16_t>(), gpu.w->as<std::uint16_t>(),
                             gpu.y.as<void>(), fp32, s.M, s.N, s.K, e, low_rank, nullptr, path);
          REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
          const HostMatrix got = download(gpu.y, s.M, s.N, fp32);
          check_against(got, *ref, fp32);
          // Where K ends on a slice boundary the slices are the concatenated GEMM's, in order.
          if (slice > 0 && s.K % slice == 0) {
            CHECK(got.data == gpu_joined.run(kind, alpha, fp32, path).data);
          }
        }
      }
    }
  }
}

TEST_CASE("gemm_f16 rejects a bad low-rank term with a message") {
  DeviceBuffer buf(64 * 64 * 4);
  const auto* x = buf.as<std::uint16_t>();
  const GemmEpilogue none;
  auto call = [&](const qg::cuda::GemmLowRank& lr, GemmPath path) {
    qg::cuda::gemm_f16(x, x, buf.as<void>(), false, 4, 16, 64, none, lr, nullptr, path);
  };
  REQUIRE_THROWS_WITH(call({x, x, 12}, GemmPath::Auto), QG_CONTAINS("multiple of 8"));
  REQUIRE_THROWS_WITH(call({x, nullptr, 8}, GemmPath::Auto), QG_CONTAINS("needs v"));
  REQUIRE_THROWS_WITH(call({x + 1, x, 8}, GemmPath::Auto), QG_CONTAINS("16-byte aligned"));
  REQUIRE_THROWS_WITH(call({x, x, 8}, GemmPath::Skinny), QG_CONTAINS("skinny path has no"));
}

TEST_CASE("gemm_f16 residual epilogue may update y in place") {
  // Every family; the wgmma shapes have a row tail and N a multiple of 8 but not of the tile
  // width (its epilogue fetches residuals ahead of the stores that overwrite them). 1000 x 4000
  // takes 128x256 tiles on a 132-SM H100, where each thread fetches two batches a tile. In
  // place gives the same path's bits out of place; a residual 4-byte but not 16-byte aligned
  // (no 16-byte rows, no fetching ahead) gives the same values.
  struct Shape {
    std::int64_t M, N, K;
  };
  cudaDeviceProp prop{};
  REQUIRE(cudaGetDeviceProperties(&prop, 0) == cudaSuccess);
  for (const Shape s :
       {Shape{5, 40, 64}, Shape{300, 520, 128}, Shape{257, 1032, 64}, Shape{1000, 4000, 72}}) {
    INFO("M " << s.M << " N " << s.N << " K " << s.K << " plan " << qg::cuda::gemm_plan(s.M, s.N));
    if (s.M == 1000 && wgmma_available() && prop.multiProcessorCount == 132) {
      CHECK(qg::cuda::gemm_plan(s.M, s.N) == "wgmma 128x256");
    }
    HostProblem p(s.M, s.N, s.K, 7);
    GpuProblem gpu(p.x, p.w, p.bias, p.residual);
    const HostMatrix expect = gpu.run(Kind::BiasResidual, 0.5f, false, GemmPath::Tiled);
    const std::size_t elements = static_cast<std::size_t>(s.M * s.N);
    DeviceBuffer shifted((elements + 8) * 2);  // the residual 2 halves (4 bytes) in
    REQUIRE(cudaMemcpy(shifted.as<std::uint16_t>() + 2, gpu.residual->as<void>(), elements * 2,
                       cudaMemcpyDeviceToDevice) == cudaSuccess);
    std::vector<GemmPath> paths{GemmPath::Tiled};
    if (s.M <= qg::cuda::kGemmSkinnyMaxM) paths.push_back(GemmPath::Skinny);
    if (wgmma_available()) paths.push_back(GemmPath::Wgmma);
    for (GemmPath path : paths) {
      INFO("path " << static_cast<int>(path));
      const HostMatrix out_of_place = gpu.run(Kind::BiasResidual, 0.5f, false, path);
      // residual and y are the same buffer: each element is read before it is written.
      auto y = upload_half(p.residual);
      GemmEpilogue e{Kind::BiasResidual, gpu.bias->as<std::uint16_t>(), y->as<std::uint16_t>(),
                     0.5f};
      qg::cuda::gemm_f16(gpu.x->as<std::uint16_t>(), gpu.w->as<std::uint16_t>(), y->as<void>(),
                         false, s.M, s.N, s.K, e, nullptr, path);
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      const HostMatrix in_place = download(*y, s.M, s.N, false);
      CHECK(qg::test::tolerance_ratio(in_place, expect, 1e-3, 1e-3) <= 1.0);
      CHECK(in_place.data == out_of_place.data);

      e.residual = shifted.as<std::uint16_t>() + 2;
      REQUIRE(cudaMemset(gpu.y.as<void>(), 0xff, gpu.y.bytes()) == cudaSuccess);
      qg::cuda::gemm_f16(gpu.x->as<std::uint16_t>(), gpu.w->as<std::uint16_t>(), gpu.y.as<void>(),
                         false, s.M, s.N, s.K, e, nullptr, path);
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      CHECK(qg::test::tolerance_ratio(download(gpu.y, s.M, s.N, false), expect, 1e-3, 1e-3) <= 1.0);
    }
  }
}

TEST_CASE("gemm_f16 skinny path: a batch of tokens equals each token alone, bit for bit") {
  const std::int64_t M = 64, N = 520, K = 4096;
  HostProblem p(M, N, K, 21);
  GpuProblem batch(p.x, p.w, p.bias, p.residual);
  const HostMatrix all = batch.run(Kind::BiasGelu, 1.0f, true, GemmPath::Skinny);
  for (std::int64_t m : {0, 5, 15, 16, 40, 63}) {
    HostMatrix row{1, K,
                   std::vector<float>(p.x.data.begin() + m * K, p.x.data.begin() + (m + 1) * K)};
    HostMatrix res{1, N, std::vector<float>(p.residual.data.begin() + m * N,
                                            p.residual.data.begin() + (m + 1) * N)};
    GpuProblem one(row, p.w, p.bias, res);
    const HostMatrix alone = one.run(Kind::BiasGelu, 1.0f, true, GemmPath::Skinny);
    std::size_t diff = 0;
    for (std::int64_t c = 0; c < N; ++c) diff += alone.at(0, c) != all.at(m, c);
    CHECK(diff == 0);
  }
}

TEST_CASE("gemm_f16 agrees with cuBLAS at model-sized shapes") {
  cublasHandle_t handle = nullptr;
  REQUIRE(cublasCreate(&handle) == CUBLAS_STATUS_SUCCESS);
  struct Shape {
    std::int64_t M, N, K;
  };
  // dense (prefill), h_to_4h (tiled, odd M), 4h_to_h (decode batches on the skinny path).
  for (const Shape s : {Shape{512, 4096, 4096}, Shape{300, 16384, 4096}, Shape{16, 4096, 16384},
                        Shape{64, 4096, 16384}, Shape{1, 12288, 4096}}) {
    HostProblem p(s.M, s.N, s.K, 300 + static_cast<std::uint32_t>(s.M));
    GpuProblem gpu(p.x, p.w, p.bias, p.residual);
    const HostMatrix ours = gpu.run(Kind::None, 1.0f, false, GemmPath::Auto);
    DeviceBuffer ref(static_cast<std::size_t>(s.M * s.N) * 2);
    const float one = 1.0f, zero = 0.0f;
    // Row-major Y = X W^T is column-major Y^T = W X^T: W is a K x N column-major matrix.
    REQUIRE(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(s.N),
                         static_cast<int>(s.M), static_cast<int>(s.K), &one, gpu.w->as<void>(),
                         CUDA_R_16F, static_cast<int>(s.K), gpu.x->as<void>(), CUDA_R_16F,
                         static_cast<int>(s.K), &zero, ref.as<void>(), CUDA_R_16F,
                         static_cast<int>(s.N), CUBLAS_COMPUTE_32F,
                         CUBLAS_GEMM_DEFAULT) == CUBLAS_STATUS_SUCCESS);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    INFO("M=" << s.M << " N=" << s.N << " K=" << s.K);
    REQUIRE(count_non_finite(ours) == 0);
    // Both round fp32 sums to fp16; summation order differs, so allow about two fp16 ulps.
    CHECK(qg::test::tolerance_ratio(ours, download(ref, s.M, s.N, false), 2e-3, 2e-3) <= 1.0);
  }
  cublasDestroy(handle);
}

TEST_CASE("gemm_f16 rejects bad arguments with a message") {
  HostProblem p(4, 16, 64, 3);
  GpuProblem gpu(p.x, p.w, p.bias, p.residual);
  const auto* x = gpu.x->as<std::uint16_t>();
  const auto* w = gpu.w->as<std::uint16_t>();
  void* y = gpu.y.as<void>();
  const GemmEpilogue none;
  REQUIRE_THROWS_WITH(qg::cuda::gemm_f16(x, w, y, false, 4, 16, 60, none, nullptr),
                      QG_CONTAINS("K = 60 must be a multiple of 8"));
  REQUIRE_THROWS_WITH(qg::cuda::gemm_f16(x, w, y, false, 4, 0, 64, none, nullptr),
                      QG_CONTAINS("N = 0"));
  REQUIRE_THROWS_WITH(qg::cuda::gemm_f16(x + 1, w, y, false, 4, 16, 56, none, nullptr),
                      QG_CONTAINS("16-byte aligned"));
  REQUIRE_THROWS_WITH(qg::cuda::gemm_f16(x, w, nullptr, false, 4, 16, 64, none, nullptr),
                      QG_CONTAINS("null pointer"));
  REQUIRE_THROWS_WITH(qg::cuda::gemm_f16(x, w, y, false, 4, 16, 64, GemmEpilogue{Kind::Bias},
                                         nullptr),
                      QG_CONTAINS("needs a bias"));
  GemmEpilogue no_residual{Kind::BiasResidual, gpu.bias->as<std::uint16_t>()};
  REQUIRE_THROWS_WITH(qg::cuda::gemm_f16(x, w, y, false, 4, 16, 64, no_residual, nullptr),
                      QG_CONTAINS("residual"));
  REQUIRE_THROWS_WITH(qg::cuda::gemm_f16(x, w, y, false, 65, 16, 64, none, nullptr,
                                         GemmPath::Skinny),
                      QG_CONTAINS("M <= 64"));
  // M == 0 is an empty batch: nothing to do, no error.
  qg::cuda::gemm_f16(x, w, y, false, 0, 16, 64, none, nullptr);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
}

TEST_CASE("gemm_f16_layer_norm equals layer_norm then the skinny GEMM, bit for bit") {
  struct Shape {
    std::int64_t M, N, K;
  };
  const float eps = 1e-5f;
  std::uint32_t seed = 60;
  // K = 6000 and 10000: the LayerNorm kernel's rows of 3 vectors a thread and rows read again
  // (past 4); M = 12: a lane's second row half partly filled.
  for (const Shape sh :
       {Shape{1, 40, 64}, Shape{3, 300, 520}, Shape{16, 264, 4096}, Shape{7, 4104, 1024},
        Shape{1, 12288, 4096}, Shape{12, 520, 6000}, Shape{2, 264, 10000}}) {
    INFO("M " << sh.M << " N " << sh.N << " K " << sh.K);
    HostProblem p(sh.M, sh.N, sh.K, seed++);
    // Rows with a mean far from 0 (the variance is taken about the mean), gamma around 1.
    HostMatrix x = qg::test::random_matrix(sh.M, sh.K, seed++, 2.0f, 7.0f);
    HostMatrix gamma = qg::test::random_matrix(1, sh.K, seed++, 0.3f, 1.0f);
    HostMatrix beta = qg::test::random_matrix(1, sh.K, seed++, 0.2f);
    round_to_half(x);
    round_to_half(gamma);
    round_to_half(beta);
    GpuProblem gpu(x, p.w, p.bias, p.residual);
    auto d_gamma = upload_half(gamma), d_beta = upload_half(beta);
    const std::size_t normed_bytes = static_cast<std::size_t>(sh.M * sh.K) * 2;
    DeviceBuffer normed_ref(normed_bytes), normed(normed_bytes), y_ref(gpu.y.bytes());
    for (const Kind kind : {Kind::None, Kind::Bias, Kind::BiasGelu, Kind::BiasResidual}) {
      for (const bool fp32 : {false, true}) {
        INFO("epilogue " << static_cast<int>(kind) << ", fp32 out " << fp32);
        GemmEpilogue e;
        e.kind = kind;
        e.bias = gpu.bias->as<std::uint16_t>();
        e.residual = gpu.residual->as<std::uint16_t>();
        e.alpha = 0.75f;
        qg::cuda::layer_norm(gpu.x->as<__half>(), d_gamma->as<__half>(), d_beta->as<__half>(), eps,
                             sh.M, sh.K, normed_ref.as<__half>(), nullptr);
        REQUIRE(cudaMemset(y_ref.as<void>(), 0xff, y_ref.bytes()) == cudaSuccess);
        qg::cuda::gemm_f16(normed_ref.as<std::uint16_t>(), gpu.w->as<std::uint16_t>(),
                           y_ref.as<void>(), fp32, sh.M, sh.N, sh.K, e, nullptr, GemmPath::Skinny);
        REQUIRE(cudaMemset(gpu.y.as<void>(), 0xff, gpu.y.bytes()) == cudaSuccess);
        REQUIRE(cudaMemset(normed.as<void>(), 0xff, normed_bytes) == cudaSuccess);
        qg::cuda::gemm_f16_layer_norm(gpu.x->as<std::uint16_t>(), d_gamma->as<std::uint16_t>(),
                                      d_beta->as<std::uint16_t>(), eps, normed.as<std::uint16_t>(),
                                      gpu.w->as<std::uint16_t>(), gpu.y.as<void>(), fp32, sh.M,
                                      sh.N, sh.K, e, nullptr);
        REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
        const HostMatrix got_normed = download(normed, sh.M, sh.K, false);
        const HostMatrix want_normed = download(normed_ref, sh.M, sh.K, false);
        CHECK(count_non_finite(got_normed) == 0);
        CHECK(got_normed.data == want_normed.data);
        const HostMatrix got = download(gpu.y, sh.M, sh.N, fp32);
        CHECK(count_non_finite(got) == 0);
        CHECK(got.data == download(y_ref, sh.M, sh.N, fp32).data);
        if (kind == Kind::BiasResidual && !fp32) {  // y the residual, updated in place
          auto y = upload_half(p.residual);
          e.residual = y->as<std::uint16_t>();
          qg::cuda::gemm_f16_layer_norm(gpu.x->as<std::uint16_t>(), d_gamma->as<std::uint16_t>(),
                                        d_beta->as<std::uint16_t>(), eps,
                                        normed.as<std::uint16_t>(), gpu.w->as<std::uint16_t>(),
                                        y->as<void>(), false, sh.M, sh.N, sh.K, e, nullptr);
          REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
          CHECK(download(*y, sh.M, sh.N, false).data == got.data);
        }
      }
    }
  }
  // Bad arguments, each named.
  DeviceBuffer buf(64 * 64 * 16);
  auto* b16 = buf.as<std::uint16_t>();
  const GemmEpilogue none;
  auto call = [&](std::int64_t M, std::int64_t K, const std::uint16_t* gamma,
                  std::uint16_t* normed) {
    qg::cuda::gemm_f16_layer_norm(b16, gamma, b16 + 4096, 1e-5f, normed, b16 + 8192, b16 + 16384,
                                  false, M, 8, K, none, nullptr);
  };
  REQUIRE_THROWS_WITH(call(0, 64, b16, b16 + 20480), QG_CONTAINS("M = 0"));
  REQUIRE_THROWS_WITH(call(17, 64, b16, b16 + 20480), QG_CONTAINS("M = 17"));
  REQUIRE_THROWS_WITH(call(2, 12, b16, b16 + 20480), QG_CONTAINS("multiple of 8"));
  REQUIRE_THROWS_WITH(call(2, 64, b16 + 1, b16 + 20480), QG_CONTAINS("16-byte aligned"));
  REQUIRE_THROWS_WITH(call(2, 64, b16, b16 + 64), QG_CONTAINS("must not overlap"));
  REQUIRE_THROWS_WITH(call(2, 64, b16 + 16384, b16 + 20480), QG_CONTAINS("y must not overlap"));
  REQUIRE_THROWS_WITH(call(2, 64, nullptr, b16 + 20480), QG_CONTAINS("device pointers"));
}
