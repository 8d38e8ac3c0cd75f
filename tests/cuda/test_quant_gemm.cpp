// Quantized weights on the GPU (qinggeng/cuda/quant_gemm.h): the device quantizer and
// dequantizer equal to the host reference bit for bit; quant_gemm against the CPU backend's
// linear on the dequantized float32 weight (odd shapes, model shapes, every epilogue, both
// output types, decode and prefill paths); the quantization error against the unquantized
// product within the documented bound; batched decode equal to one-by-one; argument errors.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "backend_ops.h"
#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/quant_gemm.h"
#include "qinggeng/tensor/quantize.h"

namespace {

using qg::cuda::GemmEpilogue;
using qg::cuda::QuantizedWeight;
using qg::tensor::QuantScheme;
using qg::test::DeviceBuffer;
using qg::test::HostMatrix;
using Kind = GemmEpilogue::Kind;

constexpr QuantScheme kSchemes[] = {QuantScheme::Int8PerChannel, QuantScheme::Int4Group128};

const std::uint16_t* bits(DeviceBuffer<__half>& b) {
  return reinterpret_cast<const std::uint16_t*>(b.get());
}

/// A weight quantized on the device from fp16 values, with the host reference of the same.
struct DeviceQuantized {
  qg::tensor::QuantizedMatrix host;
  DeviceBuffer<std::uint8_t> data;
  DeviceBuffer<std::uint16_t> scales;
  QuantizedWeight view;

  DeviceQuantized(const HostMatrix& w, QuantScheme scheme)
      : host(qg::tensor::quantize(w.data.data(), w.rows, w.cols, scheme, "test weight")),
        data(qg::tensor::quant_data_bytes(scheme, w.rows, w.cols)),
        scales(qg::tensor::quant_scale_count(scheme, w.rows, w.cols)) {
    DeviceBuffer<__half> dw(w.data.size());
    qg::test::upload_fp16(dw, w);
    view = qg::cuda::quantize_weight(bits(dw), scheme, w.rows, w.cols, data.get(), scales.get(),
                                     "test weight", nullptr);
  }
  HostMatrix dequantized() const { return {host.N, host.K, qg::tensor::dequantize(host)}; }
};

/// fp16-valued [N, K] weight ~ N(0, 1/K) with row 3 all zero; `spread` scales row n by
/// 10^(n % 5 - 2) (for format tests: GEMM tolerances assume rows of one magnitude).
HostMatrix test_weight(std::int64_t N, std::int64_t K, std::uint32_t seed, bool spread = false) {
  HostMatrix w = qg::test::random_matrix(N, K, seed, 1.0f / std::sqrt(static_cast<float>(K)));
  for (std::int64_t n = 0; n < N; ++n) {
    float row_scale = spread ? std::pow(10.0f, static_cast<float>(n % 5 - 2)) : 1.0f;
    if (n == 3) row_scale = 0.0f;
    for (std::int64_t k = 0; k < K; ++k) w.at(n, k) *= row_scale;
  }
  return qg::test::round_to_fp16(w);
}

std::uint16_t half_bits(__half h) {
  std::uint16_t b;
  std::memcpy(&b, &h, sizeof b);
  return b;
}

/// The CPU backend's linear on `w`, then each epilogue in float32.
struct EpilogueRefs {
  HostMatrix plain, bias, gelu, residual;
  EpilogueRefs(qg::model::Backend& cpu, const HostMatrix& x, const HostMatrix& w,
               const HostMatrix& b, const HostMatrix& res, float alpha)
      : plain(qg::test::run_linear(cpu, x, w, nullptr)),
        bias(qg::test::run_linear(cpu, x, w, &b)),
        gelu(qg::test::run_gelu(cpu, bias)),
        residual(qg::test::run_scaled_add(cpu, res, alpha, bias)) {}
  const HostMatrix& of(Kind kind) const {
    return kind == Kind::None ? plain : kind == Kind::Bias ? bias : kind == Kind::BiasGelu ? gelu
                                                                                        : residual;
  }
};

/// Activations, bias and residual of one problem in device fp16, and a poisoned output.
struct DeviceInputs {
  std::int64_t M, N;
  DeviceBuffer<__half> x, bias, residual, scratch;
  DeviceBuffer<float> y;

  DeviceInputs(const HostMatrix& hx, const HostMatrix& hb, const HostMatrix& hr, std::int64_t K)
      : M(hx.rows), N(hb.cols), x(hx.data.size()), bias(hb.data.size()), residual(hr.data.size()),
        scratch(static_cast<std::size_t>(hb.cols * K)), y(hr.data.size()) {
    qg::test::upload_fp16(x, hx);
    qg::test::upload_fp16(bias, hb);
    qg::test::upload_fp16(residual, hr);
  }

  HostMatrix run(const QuantizedWeight& qw, Kind kind, float alpha, bool fp32) {
    QG_CUDA_CHECK(cudaMemset(y.get(), 0xff, y.size() * sizeof(float)));
    const GemmEpilogue e{kind, bits(bias), bits(residual), alpha};
    qg::cuda::quant_gemm(bits(x), qw, y.get(), fp32, M, e, nullptr,
                         reinterpret_cast<std::uint16_t*>(scratch.get()));
    QG_CUDA_CHECK(cudaDeviceSynchronize());
    HostMatrix out{M, N, y.download()};
    if (!fp32) {  // the first M * N halves of the buffer
      std::vector<__half> h(out.data.size());
      QG_CUDA_CHECK(cudaMemcpy(h.data(), y.get(), h.size() * 2, cudaMemcpyDeviceToHost));
      for (std::size_t i = 0; i < h.size(); ++i) out.data[i] = __half2float(h[i]);
    }
    return out;
  }
};

std::size_t count_non_finite(const HostMatrix& m) {
  std::size_t n = 0;
  for (float v : m.data) n += std::isfinite(v) ? 0 : 1;
  return n;
}

/// Tolerance on top of the dequantized reference: fp32 accumulation in another order, the
/// int4 weights rounded to fp16 once (scale * q), and the fp16 output rounding.
double tolerance(bool fp32) { return fp32 ? 2e-3 : 4e-3; }

/// Runs every epilogue and output type of one problem against the CPU reference.
std::size_t check_problem(qg::model::Backend& cpu, std::int64_t M, std::int64_t N,
                          std::int64_t K, QuantScheme scheme, std::uint32_t seed) {
  const float alpha = 1.75f;
  const HostMatrix x = qg::test::round_to_fp16(qg::test::random_matrix(M, K, seed));
  const HostMatrix b = qg::test::round_to_fp16(qg::test::random_matrix(1, N, seed + 1, 0.5f));
  const HostMatrix r = qg::test::round_to_fp16(qg::test::random_matrix(M, N, seed + 2));
  DeviceQuantized qw(test_weight(N, K, seed + 3), scheme);
  const EpilogueRefs refs(cpu, x, qw.dequantized(), b, r, alpha);
  DeviceInputs in(x, b, r, K);
  std::size_t checked = 0;
  for (bool fp32 : {false, true}) {
    for (Kind kind : {Kind::None, Kind::Bias, Kind::BiasGelu, Kind::BiasResidual}) {
      const HostMatrix got = in.run(qw.view, kind, alpha, fp32);
      INFO(qg::tensor::quant_scheme_name(scheme) << " M=" << M << " N=" << N << " K=" << K
                                                 << " kind=" << static_cast<int>(kind)
                                                 << " fp32=" << fp32);
      REQUIRE(count_non_finite(got) == 0);
      REQUIRE(qg::test::tolerance_ratio(got, refs.of(kind), tolerance(fp32), tolerance(fp32)) <=
              1.0);
      ++checked;
    }
  }
  return checked;
}

}  // namespace

TEST_CASE("quantize_weight and dequantize_weight equal the host reference bit for bit",
          "[quant]") {
  for (QuantScheme scheme : kSchemes) {
    const std::vector<std::pair<std::int64_t, std::int64_t>> shapes{
        {37, 128}, {300, 1152}, {64, 4096}, {5, 16}};
    for (const auto& [N, K] : shapes) {
      if (K % qg::tensor::kQuantGroup != 0 && scheme == QuantScheme::Int4Group128) continue;
      HostMatrix w = test_weight(N, K, 7 + static_cast<std::uint32_t>(N), true);
      w.at(0, 1) = qg::half_to_float(0x0001);  // a subnormal
      w.at(1, 0) = 65504.0f;                   // the largest fp16
      w.at(2, K - 1) = -65504.0f;
      DeviceQuantized q(w, scheme);
      INFO(qg::tensor::quant_scheme_name(scheme) << " N=" << N << " K=" << K);
      CHECK(q.data.download() == q.host.data);
      CHECK(q.scales.download() == q.host.scales);
      DeviceBuffer<__half> dq(static_cast<std::size_t>(N * K));
      qg::cuda::dequantize_weight(q.view, reinterpret_cast<std::uint16_t*>(dq.get()), nullptr);
      const std::vector<__half> got = dq.download();
      const std::vector<float> want = qg::tensor::dequantize(q.host);
      std::size_t diff = 0;
      for (std::size_t i = 0; i < want.size(); ++i) {
        diff += half_bits(got[i]) != qg::float_to_half(want[i]);
      }
      CHECK(diff == 0);
    }
  }
}

TEST_CASE("quant_gemm matches the CPU reference on odd shapes, every epilogue and output",
          "[quant]") {
  auto cpu = qg::model::make_cpu_backend();
  std::uint32_t seed = 500;
  std::size_t checked = 0;
  for (QuantScheme scheme : kSchemes) {
    const std::vector<std::int64_t> Ks = scheme == QuantScheme::Int8PerChannel
                                             ? std::vector<std::int64_t>{16, 48, 1152}
                                             : std::vector<std::int64_t>{128, 1152};
    for (std::int64_t M : {1, 2, 5, 16, 17, 33}) {
      for (std::int64_t N : {8, 40, 136, 1000}) {
        for (std::int64_t K : Ks) checked += check_problem(*cpu, M, N, K, scheme, seed += 10);
      }
    }
  }
  CHECK(checked == 6u * 4u * (3u + 2u) * 8u);
}

TEST_CASE("quant_gemm matches the CPU reference at ChatGLM-6B shapes", "[quant][large]") {
  auto cpu = qg::model::make_cpu_backend();
  struct Shape {
    std::int64_t M, N, K;
    QuantScheme scheme;
  };
  // dense, qkv, 4h_to_h, h_to_4h at decode sizes; dense at a prefill size (scratch path).
  for (const Shape s : {Shape{1, 4096, 4096, QuantScheme::Int4Group128},
                        Shape{4, 12288, 4096, QuantScheme::Int8PerChannel},
                        Shape{16, 4096, 16384, QuantScheme::Int4Group128},
                        Shape{3, 16384, 4096, QuantScheme::Int8PerChannel},
                        Shape{64, 4096, 4096, QuantScheme::Int4Group128}}) {
    const HostMatrix x = qg::test::round_to_fp16(qg::test::random_matrix(s.M, s.K, 41));
    const HostMatrix b = qg::test::round_to_fp16(qg::test::random_matrix(1, s.N, 42, 0.5f));
    const HostMatrix r = qg::test::round_to_fp16(qg::test::random_matrix(s.M, s.N, 43));
    DeviceQuantized qw(test_weight(s.N, s.K, 44), s.scheme);
    DeviceInputs in(x, b, r, s.K);
    const HostMatrix ref = qg::test::run_linear(*cpu, x, qw.dequantized(), &b);
    const HostMatrix got = in.run(qw.view, Kind::Bias, 1.0f, false);
    INFO(qg::tensor::quant_scheme_name(s.scheme) << " M=" << s.M << " N=" << s.N << " K=" << s.K);
    REQUIRE(count_non_finite(got) == 0);
    CHECK(qg::test::tolerance_ratio(got, ref, tolerance(false), tolerance(false)) <= 1.0);
  }
}

TEST_CASE("quant_gemm's error against the unquantized weight is within the documented bound",
          "[quant]") {
  // |y_q - y| <= sum_k |x_k| * scale(n, k) / 2 (each weight moves at most half a step), plus
  // the fp32-output tolerance of the kernel itself.
  auto cpu = qg::model::make_cpu_backend();
  const std::int64_t M = 4, N = 96, K = 4096;
  const HostMatrix x = qg::test::round_to_fp16(qg::test::random_matrix(M, K, 61));
  const HostMatrix w = test_weight(N, K, 62);
  const HostMatrix exact = qg::test::run_linear(*cpu, x, w, nullptr);
  for (QuantScheme scheme : kSchemes) {
    DeviceQuantized qw(w, scheme);
    DeviceInputs in(x, HostMatrix{1, N, std::vector<float>(N)}, exact, K);
    const HostMatrix got = in.run(qw.view, Kind::None, 1.0f, true);
    double worst = 0, total_error = 0;
    for (std::int64_t m = 0; m < M; ++m) {
      for (std::int64_t n = 0; n < N; ++n) {
        double bound = 0;
        for (std::int64_t k = 0; k < K; ++k) {
          bound += std::fabs(x.at(m, k)) * qg::tensor::quantized_scale(qw.host, n, k) / 2;
        }
        const double err = std::fabs(got.at(m, n) - exact.at(m, n));
        const double tol = tolerance(true) * (1 + std::fabs(exact.at(m, n)));
        worst = std::max(worst, err / (bound + tol));
        total_error += err;
      }
    }
    INFO(qg::tensor::quant_scheme_name(scheme) << ": mean |y_q - y| = " << total_error / (M * N)
                                               << ", worst error / bound = " << worst);
    CHECK(worst <= 1.0);
  }
}

TEST_CASE("quant_gemm decode: a batch of tokens equals each token alone, bit for bit",
          "[quant]") {
  const std::int64_t M = 16, N = 136, K = 1024;
  const HostMatrix x = qg::test::round_to_fp16(qg::test::random_matrix(M, K, 71));
  const HostMatrix b = qg::test::round_to_fp16(qg::test::random_matrix(1, N, 72, 0.5f));
  const HostMatrix r = qg::test::round_to_fp16(qg::test::random_matrix(M, N, 73));
  for (QuantScheme scheme : kSchemes) {
    DeviceQuantized qw(test_weight(N, K, 74), scheme);
    DeviceInputs batch(x, b, r, K);
    const HostMatrix all = batch.run(qw.view, Kind::BiasResidual, 0.5f, true);
    for (std::int64_t m : {0, 7, 8, 15}) {
      HostMatrix row{1, K,
                     std::vector<float>(x.data.begin() + m * K, x.data.begin() + (m + 1) * K)};
      HostMatrix res{1, N,
                     std::vector<float>(r.data.begin() + m * N, r.data.begin() + (m + 1) * N)};
      DeviceInputs one(row, b, res, K);
      const HostMatrix alone = one.run(qw.view, Kind::BiasResidual, 0.5f, true);
      std::size_t diff = 0;
      for (std::int64_t c = 0; c < N; ++c) diff += alone.at(0, c) != all.at(m, c);
      CHECK(diff == 0);
    }
    // The residual may be the output itself (fp16, updated in place).
    const GemmEpilogue e{Kind::BiasResidual, bits(batch.bias), bits(batch.residual), 0.5f};
    qg::cuda::quant_gemm(bits(batch.x), qw.view, batch.residual.get(), false, M, e, nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(qg::test::tolerance_ratio(qg::test::download_fp16(batch.residual, M, N), all, 4e-3,
                                    4e-3) <= 1.0);
  }
}

TEST_CASE("quantize_weight and quant_gemm reject bad arguments with a message", "[quant]") {
  HostMatrix w = test_weight(8, 256, 81);
  DeviceBuffer<__half> dw(w.data.size());
  qg::test::upload_fp16(dw, w);
  DeviceBuffer<std::uint8_t> data(8 * 256);
  DeviceBuffer<std::uint16_t> scales(8 * 2);
  REQUIRE_THROWS_WITH(qg::cuda::quantize_weight(bits(dw), QuantScheme::Int4Group128, 8, 200,
                                                data.get(), scales.get(), "dense", nullptr),
                      QG_CONTAINS("dense: int4 group-128 quantization needs K"));
  REQUIRE_THROWS_WITH(qg::cuda::quantize_weight(bits(dw), QuantScheme::Int8PerChannel, 8, 40,
                                                data.get(), scales.get(), "dense", nullptr),
                      QG_CONTAINS("dense: quantized weights on the GPU need K (columns) to be a "
                                  "multiple of 16, got K = 40"));
  REQUIRE_THROWS_WITH(qg::cuda::quantize_weight(bits(dw), QuantScheme::Int8PerChannel, 8, 256,
                                                nullptr, scales.get(), "dense", nullptr),
                      QG_CONTAINS("null pointer"));
  w.at(5, 17) = std::nanf("");
  qg::test::upload_fp16(dw, w);
  for (QuantScheme scheme : kSchemes) {
    REQUIRE_THROWS_WITH(qg::cuda::quantize_weight(bits(dw), scheme, 8, 256, data.get(),
                                                  scales.get(), "qkv", nullptr),
                        QG_CONTAINS("qkv: the weight holds a non-finite value"));
  }
  w.at(5, 17) = 0.0f;
  qg::test::upload_fp16(dw, w);
  const QuantizedWeight qw = qg::cuda::quantize_weight(
      bits(dw), QuantScheme::Int8PerChannel, 8, 256, data.get(), scales.get(), "qkv", nullptr);
  DeviceBuffer<__half> x(32 * 256);
  DeviceBuffer<float> y(32 * 8);
  const GemmEpilogue none;
  REQUIRE_THROWS_WITH(qg::cuda::quant_gemm(bits(x), qw, y.get(), true, 17, none, nullptr),
                      QG_CONTAINS("M = 17 > 16 needs an fp16 scratch buffer"));
  REQUIRE_THROWS_WITH(qg::cuda::quant_gemm(bits(x) + 1, qw, y.get(), true, 1, none, nullptr),
                      QG_CONTAINS("16-byte aligned"));
  REQUIRE_THROWS_WITH(qg::cuda::quant_gemm(bits(x), qw, nullptr, true, 1, none, nullptr),
                      QG_CONTAINS("null pointer"));
  REQUIRE_THROWS_WITH(qg::cuda::quant_gemm(bits(x), qw, y.get(), true, 1,
                                           GemmEpilogue{Kind::Bias}, nullptr),
                      QG_CONTAINS("quant_gemm: this epilogue needs a bias pointer"));
  QuantizedWeight odd = qw;
  odd.K = 200;
  REQUIRE_THROWS_WITH(qg::cuda::quant_gemm(bits(x), odd, y.get(), true, 1, none, nullptr),
                      QG_CONTAINS("multiple of 16"));
  qg::cuda::quant_gemm(bits(x), qw, y.get(), true, 0, none, nullptr);  // empty batch: no-op
  QG_CUDA_CHECK(cudaDeviceSynchronize());
}
