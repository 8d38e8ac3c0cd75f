// qg::cuda::lora_train_forward / lora_train_backward against the float32 CPU reference
// (reference_backward.h's lora_forward / lora_backward) on fp16-rounded activations and fp32
// factors: odd and ChatGLM-sized shapes, ranks 1..64, dropout 0 and > 0. The dropout mask must
// be the CPU's bit for bit: with dx starting at zero, exactly the elements the CPU drops stay
// zero. Packed examples (row_seed / row_position) match the reference run example by example.
// Also: the gradients when only some of dx / dA / dB are wanted, bitwise repeatability,
// a workspace size that never shrinks with more tokens, lora_train_shrink's fp16 operands
// adding the term inside gemm_f16 (GemmLowRank), and the argument checks. Every check of
// the results runs on both kernels (LoraTrainKernels: SIMT and tensor cores), and the
// tensor-core passes also over factors from 1e-7 to 1e4 in size and a non-finite dy.
// Tag [lora-train].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/gemm.h"
#include "qinggeng/cuda/lora_train.h"
#include "qinggeng/error.h"
#include "qinggeng/train/reference_backward.h"

namespace {

using qg::test::DeviceBuffer;
using qg::test::HostMatrix;
using qg::test::relative_l2;

/// Host inputs of one adapted linear and the CPU reference's outputs.
struct Case {
  qg::cuda::LoraTrainShape shape;
  HostMatrix x, a, b, y0, dy, dx0;
  std::vector<float> y, u, dx, da, db;  // reference: y0 + lora, u, dx0 + ..., dA, dB (from 0)

  /// Factors A and B of magnitude a_size / sqrt(in) and b_size / sqrt(rank).
  explicit Case(const qg::cuda::LoraTrainShape& s, float a_size = 1.0f, float b_size = 1.0f)
      : shape(s) {
    const auto T = s.tokens, I = s.in, O = s.out, R = s.rank;
    x = qg::test::round_to_fp16(qg::test::random_matrix(T, I, 1));
    a = qg::test::random_matrix(R, I, 2, a_size / std::sqrt(static_cast<float>(I)));
    b = qg::test::random_matrix(O, R, 3, b_size / std::sqrt(static_cast<float>(R)));
    y0 = qg::test::round_to_fp16(qg::test::random_matrix(T, O, 4));
    dy = qg::test::round_to_fp16(qg::test::random_matrix(T, O, 5));
    dx0 = qg::test::round_to_fp16(qg::test::random_matrix(T, I, 6, 0.1f));
    qg::train::LoraShape ref{T, I, O, R, s.scale, s.dropout, s.seed};
    y = y0.data;
    u.assign(static_cast<std::size_t>(T * R), 0.0f);
    qg::train::lora_forward(x.data.data(), a.data.data(), b.data.data(), ref, y.data(), u.data());
    dx = dx0.data;
    da.assign(static_cast<std::size_t>(R * I), 0.0f);
    db.assign(static_cast<std::size_t>(O * R), 0.0f);
    qg::train::lora_backward(x.data.data(), a.data.data(), b.data.data(), u.data(), dy.data.data(),
                             ref, dx.data(), da.data(), db.data());
  }
};

qg::cuda::LoraTrainShape with_kernels(qg::cuda::LoraTrainShape s,
                                      qg::cuda::LoraTrainKernels kernels) {
  s.kernels = kernels;
  return s;
}

constexpr qg::cuda::LoraTrainKernels kBothKernels[] = {qg::cuda::LoraTrainKernels::Simt,
                                                       qg::cuda::LoraTrainKernels::TensorCores};

const char* kernels_name(qg::cuda::LoraTrainKernels k) {
  return k == qg::cuda::LoraTrainKernels::TensorCores ? "tensor cores" : "SIMT";
}

/// Device copies of a Case's inputs and the outputs of the GPU calls on `kernels`.
struct DeviceCase {
  const Case& c;
  qg::cuda::LoraTrainShape shape;  // c.shape on the kernels asked for
  DeviceBuffer<__half> x, y, dy, dx;
  DeviceBuffer<float> a, b, u, da, db;
  DeviceBuffer<char> workspace;
  std::size_t workspace_bytes;

  explicit DeviceCase(const Case& cs,
                      qg::cuda::LoraTrainKernels kernels = qg::cuda::LoraTrainKernels::Auto)
      : c(cs),
        shape(with_kernels(cs.shape, kernels)),
        x(cs.x.data.size()),
        y(cs.y0.data.size()),
        dy(cs.dy.data.size()),
        dx(cs.dx0.data.size()),
        a(cs.a.data.size()),
        b(cs.b.data.size()),
        u(cs.u.size()),
        da(cs.da.size()),
        db(cs.db.size()),
        workspace(qg::cuda::lora_train_workspace_bytes(cs.shape)),
        workspace_bytes(qg::cuda::lora_train_workspace_bytes(cs.shape)) {
    qg::test::upload_fp16(x, cs.x);
    qg::test::upload_fp16(y, cs.y0);
    qg::test::upload_fp16(dy, cs.dy);
    qg::test::upload_fp16(dx, cs.dx0);
    a.upload(cs.a.data);
    b.upload(cs.b.data);
  }
  void forward() {
    qg::cuda::lora_train_forward(x.get(), a.get(), b.get(), shape, y.get(), u.get(),
                                 workspace.get(), workspace_bytes, nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());
  }
  /// Backward from dx = dx0 (or zero), dA = dB = 0 into the outputs asked for.
  void backward(bool want_dx, bool want_da, bool want_db, bool dx_from_zero = false) {
    if (dx_from_zero) {
      QG_CUDA_CHECK(cudaMemset(dx.get(), 0, dx.size() * sizeof(__half)));
    } else {
      qg::test::upload_fp16(dx, c.dx0);
    }
    QG_CUDA_CHECK(cudaMemset(da.get(), 0, da.size() * sizeof(float)));
    QG_CUDA_CHECK(cudaMemset(db.get(), 0, db.size() * sizeof(float)));
    qg::cuda::lora_train_backward(x.get(), a.get(), b.get(), u.get(), dy.get(), shape,
                                  want_dx ? dx.get() : nullptr, want_da ? da.get() : nullptr,
                                  want_db ? db.get() : nullptr, workspace.get(), workspace_bytes,
                                  nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());
  }
};

qg::cuda::LoraTrainShape shape_of(std::int64_t tokens, std::int64_t in, std::int64_t out,
                                  std::int64_t rank, float dropout) {
  qg::cuda::LoraTrainShape s;
  s.tokens = tokens;
  s.in = in;
  s.out = out;
  s.rank = rank;
  s.scale = 16.0f / static_cast<float>(rank);
  s.dropout = dropout;
  s.seed = 0x5eed0000u + static_cast<std::uint64_t>(tokens * 31 + rank);
  return s;
}

}  // namespace

TEST_CASE("GPU LoRA training forward and backward match the CPU reference", "[lora-train]") {
  const std::vector<qg::cuda::LoraTrainShape> shapes = {
      shape_of(1, 8, 8, 1, 0.0f),          shape_of(37, 40, 24, 3, 0.1f),
      shape_of(100, 1032, 264, 8, 0.1f),   shape_of(300, 256, 2056, 16, 0.25f),
      shape_of(129, 1032, 200, 12, 0.1f),  shape_of(64, 128, 96, 33, 0.1f),
      shape_of(129, 64, 80, 64, 0.0f),     shape_of(2048, 4096, 12288, 8, 0.0f),
      shape_of(2048, 4096, 12288, 8, 0.1f)};
  for (const auto& s : shapes) {
    INFO("tokens " << s.tokens << ", in " << s.in << ", out " << s.out << ", rank " << s.rank
                   << ", dropout " << s.dropout);
    const Case c(s);
    for (const auto kernels : kBothKernels) {
      INFO(kernels_name(kernels));
      DeviceCase d(c, kernels);
      d.forward();
      CHECK(relative_l2(d.u.download(), c.u) < 1e-5);
      CHECK(relative_l2(qg::test::download_fp16(d.y, s.tokens, s.out).data, c.y) < 2e-3);

      d.backward(true, true, true);
      const HostMatrix dx = qg::test::download_fp16(d.dx, s.tokens, s.in);
      const std::vector<float> da = d.da.download(), db = d.db.download();
      CHECK(relative_l2(dx.data, c.dx) < 2e-3);
      CHECK(relative_l2(da, c.da) < 1e-5);
      CHECK(relative_l2(db, c.db) < 1e-5);

      // Bitwise repeatable (fixed reduction order), and each gradient alone equals the full run.
      d.backward(true, true, true);
      CHECK(qg::test::download_fp16(d.dx, s.tokens, s.in).data == dx.data);
      CHECK(d.da.download() == da);
      CHECK(d.db.download() == db);
      d.backward(false, false, true);
      CHECK(relative_l2(d.db.download(), db) < 1e-6);
      d.backward(false, true, false);
      CHECK(relative_l2(d.da.download(), da) < 1e-6);
      CHECK(d.db.download() == std::vector<float>(db.size(), 0.0f));

      // The mask: from dx = 0, exactly the elements the CPU drops stay zero.
      d.backward(true, false, false, true);
      const HostMatrix masked = qg::test::download_fp16(d.dx, s.tokens, s.in);
      std::int64_t mismatches = 0, dropped = 0;
      for (std::int64_t t = 0; t < s.tokens; ++t) {
        for (std::int64_t i = 0; i < s.in; ++i) {
          const auto index = static_cast<std::uint64_t>(t * s.in + i);
          const bool keep = qg::train::dropout_keep(s.seed, index, s.dropout);
          dropped += keep ? 0 : 1;
          const float v = masked.at(t, i);
          // A kept element may underflow to zero only if its value is tiny.
          if (!keep && v != 0.0f) ++mismatches;
          if (keep && v == 0.0f && std::abs(c.dx[index] - c.dx0.data[index]) > 1e-6f) ++mismatches;
        }
      }
      CHECK(mismatches == 0);
      if (s.dropout > 0 && s.tokens * s.in >= 1000) {
        const double rate = static_cast<double>(dropped) / static_cast<double>(s.tokens * s.in);
        CHECK(std::abs(rate - s.dropout) < 0.05);
      }
    }
  }
}

TEST_CASE("GPU LoRA training over packed examples draws each example's own mask", "[lora-train]") {
  const std::vector<std::int64_t> lengths = {37, 100, 5, 64};
  std::int64_t T = 0;
  for (const std::int64_t n : lengths) T += n;
  Case c(shape_of(T, 1032, 264, 8, 0.1f));  // the packed rows' data (its reference is unused)
  const auto I = c.shape.in, O = c.shape.out, R = c.shape.rank;
  // The CPU reference, example by example, each with its own seed and row indices from 0.
  std::vector<std::uint64_t> row_seed;
  std::vector<std::int32_t> row_position;
  std::vector<float> y = c.y0.data, u(static_cast<std::size_t>(T * R)), dx = c.dx0.data;
  std::vector<float> da(static_cast<std::size_t>(R * I), 0.0f);
  std::vector<float> db(static_cast<std::size_t>(O * R), 0.0f);
  std::vector<std::uint64_t> example_seed;
  std::int64_t t0 = 0;
  for (std::size_t e = 0; e < lengths.size(); ++e) {
    const std::uint64_t base = (e + 1) * 0x9E3779B97F4A7C15ull;
    const qg::train::LoraShape ref{lengths[e], I, O, R, c.shape.scale, c.shape.dropout,
                                   c.shape.seed + base};
    qg::train::lora_forward(c.x.data.data() + t0 * I, c.a.data.data(), c.b.data.data(), ref,
                            y.data() + t0 * O, u.data() + t0 * R);
    qg::train::lora_backward(c.x.data.data() + t0 * I, c.a.data.data(), c.b.data.data(),
                             u.data() + t0 * R, c.dy.data.data() + t0 * O, ref, dx.data() + t0 * I,
                             da.data(), db.data());
    for (std::int64_t r = 0; r < lengths[e]; ++r) {
      row_seed.push_back(base);
      row_position.push_back(static_cast<std::int32_t>(r));
      example_seed.push_back(ref.seed);
    }
    t0 += lengths[e];
  }
  DeviceBuffer<std::uint64_t> d_row_seed(row_seed.size());
  DeviceBuffer<std::int32_t> d_row_position(row_position.size());
  d_row_seed.upload(row_seed);
  d_row_position.upload(row_position);
  c.shape.row_seed = d_row_seed.get();
  c.shape.row_position = d_row_position.get();

  for (const auto kernels : kBothKernels) {
    INFO(kernels_name(kernels));
    DeviceCase d(c, kernels);
    d.forward();
    CHECK(relative_l2(d.u.download(), u) < 1e-5);
    CHECK(relative_l2(qg::test::download_fp16(d.y, T, O).data, y) < 2e-3);
    d.backward(true, true, true);
    CHECK(relative_l2(qg::test::download_fp16(d.dx, T, I).data, dx) < 2e-3);
    CHECK(relative_l2(d.da.download(), da) < 1e-5);
    CHECK(relative_l2(d.db.download(), db) < 1e-5);

    // From dx = 0, a dropped element of row t stays zero: the mask of t's own example.
    d.backward(true, false, false, true);
    const HostMatrix masked = qg::test::download_fp16(d.dx, T, I);
    std::int64_t mismatches = 0;
    for (std::int64_t t = 0; t < T; ++t) {
      for (std::int64_t i = 0; i < I; ++i) {
        const std::int64_t row = row_position[static_cast<std::size_t>(t)];
        const auto index = static_cast<std::uint64_t>(row * I + i);
        const bool keep = qg::train::dropout_keep(example_seed[static_cast<std::size_t>(t)], index,
                                                  c.shape.dropout);
        if (!keep && masked.at(t, i) != 0.0f) ++mismatches;
      }
    }
    CHECK(mismatches == 0);
  }

  DeviceCase d(c);
  auto half_set = c.shape;
  half_set.row_position = nullptr;
  REQUIRE_THROWS_WITH(qg::cuda::lora_train_forward(d.x.get(), d.a.get(), d.b.get(), half_set,
                                                   d.y.get(), d.u.get(), d.workspace.get(),
                                                   d.workspace_bytes, nullptr),
                      QG_CONTAINS("row_position"));
}

TEST_CASE("lora_train_shrink's operands add the LoRA term inside gemm_f16", "[lora-train]") {
  for (const auto& s : {shape_of(100, 1032, 264, 8, 0.1f), shape_of(37, 40, 24, 3, 0.1f),
                        shape_of(64, 128, 96, 33, 0.0f), shape_of(130, 256, 2056, 64, 0.25f)}) {
    INFO("tokens " << s.tokens << ", in " << s.in << ", out " << s.out << ", rank " << s.rank);
    const Case c(s);
    DeviceCase d(c);
    const std::int64_t width = qg::cuda::lora_train_low_rank_width(s.rank);
    CHECK(width % 8 == 0);
    CHECK(width >= s.rank);
    CHECK(width < s.rank + 8);
    DeviceBuffer<__half> u16(static_cast<std::size_t>(s.tokens * width)),
        v16(static_cast<std::size_t>(s.out * width));
    qg::cuda::lora_train_shrink(d.x.get(), d.a.get(), d.b.get(), s, d.u.get(), u16.get(), v16.get(),
                                d.workspace.get(), d.workspace_bytes, nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());
    const std::vector<float> u = d.u.download();
    CHECK(relative_l2(u, c.u) < 1e-5);
    // The fp16 operands: u and scale * B rounded once, zero past the rank.
    const HostMatrix hu = qg::test::download_fp16(u16, s.tokens, width);
    const HostMatrix hv = qg::test::download_fp16(v16, s.out, width);
    std::int64_t wrong = 0;
    for (std::int64_t t = 0; t < s.tokens; ++t) {
      for (std::int64_t r = 0; r < width; ++r) {
        const float want = r < s.rank ? __half2float(__float2half_rn(u[t * s.rank + r])) : 0.0f;
        wrong += hu.at(t, r) != want;
      }
    }
    for (std::int64_t j = 0; j < s.out; ++j) {
      for (std::int64_t r = 0; r < width; ++r) {
        const float want =
            r < s.rank ? __half2float(__float2half_rn(s.scale * c.b.at(j, r))) : 0.0f;
        wrong += hv.at(j, r) != want;
      }
    }
    CHECK(wrong == 0);
    // y = y0 residual + x W^T (W = 0) + the low-rank term: the CPU reference's y.
    DeviceBuffer<__half> zero_w(static_cast<std::size_t>(s.out * s.in)), bias(s.out);
    QG_CUDA_CHECK(cudaMemset(zero_w.get(), 0, zero_w.size() * sizeof(__half)));
    QG_CUDA_CHECK(cudaMemset(bias.get(), 0, bias.size() * sizeof(__half)));
    qg::cuda::GemmEpilogue e;
    e.kind = qg::cuda::GemmEpilogue::Kind::BiasResidual;
    e.bias = reinterpret_cast<const std::uint16_t*>(bias.get());
    e.residual = reinterpret_cast<const std::uint16_t*>(d.y.get());
    qg::cuda::gemm_f16(reinterpret_cast<const std::uint16_t*>(d.x.get()),
                       reinterpret_cast<const std::uint16_t*>(zero_w.get()), d.y.get(), false,
                       s.tokens, s.out, s.in, e,
                       {reinterpret_cast<const std::uint16_t*>(u16.get()),
                        reinterpret_cast<const std::uint16_t*>(v16.get()), width},
                       nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(relative_l2(qg::test::download_fp16(d.y, s.tokens, s.out).data, c.y) < 2e-3);

    // The tensor-core shrink: the same u within fp32 rounding (ranks above 16 run SIMT).
    qg::cuda::lora_train_shrink(
        d.x.get(), d.a.get(), d.b.get(), with_kernels(s, qg::cuda::LoraTrainKernels::TensorCores),
        d.u.get(), u16.get(), v16.get(), d.workspace.get(), d.workspace_bytes, nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(relative_l2(d.u.download(), c.u) < 1e-5);
  }
}

TEST_CASE("GPU LoRA tensor-core passes keep fp32 accuracy at any factor size", "[lora-train]") {
  // They split the fp32 factor and [tokens, rank] sums into two fp16 halves under a power of
  // 2 per rank column: LoRA's B starts at zero and grows slowly, and A, u and v span orders
  // of magnitude, none of which may fall into fp16's subnormals or overflow it.
  struct Sizes {
    float a, b;
  };
  for (const auto& [a_size, b_size] :
       {Sizes{1.0f, 0.0f}, Sizes{1e-6f, 1e-7f}, Sizes{1e4f, 1e-3f}, Sizes{3e-5f, 2e3f}}) {
    INFO("A x " << a_size << ", B x " << b_size);
    const Case c(shape_of(300, 1032, 2056, a_size > 1.0f ? 13 : 8, 0.1f), a_size, b_size);
    for (const auto kernels : kBothKernels) {
      INFO(kernels_name(kernels));
      DeviceCase d(c, kernels);
      d.forward();
      CHECK(relative_l2(d.u.download(), c.u) < 1e-5);
      d.backward(true, true, true);
      CHECK(relative_l2(qg::test::download_fp16(d.dx, 300, 1032).data, c.dx) < 2e-3);
      CHECK(relative_l2(d.da.download(), c.da) < 1e-5);
      CHECK(relative_l2(d.db.download(), c.db) < 1e-5);
    }
  }

  // A non-finite dy (an fp16 overflow under loss scaling) makes dA and dB non-finite, so the
  // loss scaler sees it.
  Case c(shape_of(100, 1032, 264, 8, 0.1f));
  c.dy.data[5 * 264 + 7] = std::numeric_limits<float>::infinity();
  auto finite = [](const std::vector<float>& v) {
    return std::all_of(v.begin(), v.end(), [](float f) { return std::isfinite(f); });
  };
  for (const auto kernels : kBothKernels) {
    INFO(kernels_name(kernels));
    DeviceCase d(c, kernels);
    d.forward();
    d.backward(true, true, true);
    CHECK(!finite(d.da.download()));
    CHECK(!finite(d.db.download()));
  }
}

TEST_CASE("GPU LoRA training workspace never shrinks with more tokens", "[lora-train]") {
  for (const std::int64_t out : {std::int64_t{4096}, std::int64_t{12288}, std::int64_t{16384}}) {
    std::size_t previous = 0;
    for (std::int64_t tokens = 0; tokens <= 4096; ++tokens) {
      qg::cuda::LoraTrainShape s = shape_of(tokens, 4096, out, 8, 0.1f);
      const std::size_t bytes = qg::cuda::lora_train_workspace_bytes(s);
      INFO("tokens " << tokens << ", out " << out);
      REQUIRE(bytes >= previous);
      previous = bytes;
    }
  }
}

TEST_CASE("GPU LoRA training entry points reject bad arguments", "[lora-train]") {
  const qg::cuda::LoraTrainShape good = shape_of(4, 16, 8, 2, 0.1f);
  const std::size_t bytes = qg::cuda::lora_train_workspace_bytes(good);
  DeviceBuffer<__half> x(64), y(32);
  DeviceBuffer<float> a(32), b(16), u(8);
  DeviceBuffer<char> ws(bytes);
  auto forward = [&](const qg::cuda::LoraTrainShape& s, std::size_t ws_bytes) {
    qg::cuda::lora_train_forward(x.get(), a.get(), b.get(), s, y.get(), u.get(), ws.get(), ws_bytes,
                                 nullptr);
  };
  REQUIRE_NOTHROW(forward(good, bytes));
  auto bad = good;
  bad.rank = 0;
  REQUIRE_THROWS_WITH(forward(bad, bytes), QG_CONTAINS("rank"));
  bad = good;
  bad.rank = 65;
  REQUIRE_THROWS_WITH(forward(bad, bytes), QG_CONTAINS("rank"));
  bad = good;
  bad.in = 12;
  REQUIRE_THROWS_WITH(forward(bad, bytes), QG_CONTAINS("multiples of 8"));
  bad = good;
  bad.dropout = 1.0f;
  REQUIRE_THROWS_WITH(forward(bad, bytes), QG_CONTAINS("dropout"));
  REQUIRE_THROWS_WITH(forward(good, bytes - 1), QG_CONTAINS("workspace"));
  REQUIRE_THROWS_WITH(qg::cuda::lora_train_forward(nullptr, a.get(), b.get(), good, y.get(), u.get(),
                                                   ws.get(), bytes, nullptr),
                      QG_CONTAINS("null pointer"));
  REQUIRE_THROWS_WITH(qg::cuda::lora_train_backward(x.get(), a.get(), b.get(), nullptr, y.get(), good,
                                                    x.get(), nullptr, nullptr, ws.get(), bytes,
                                                    nullptr),
                      QG_CONTAINS("null pointer"));
  REQUIRE_THROWS_WITH(qg::cuda::lora_train_backward(x.get(), a.get(), b.get(), u.get(), y.get(), good,
                                                    x.get(), nullptr, nullptr, nullptr, bytes,
                                                    nullptr),
                      QG_CONTAINS("workspace"));
  QG_CUDA_CHECK(cudaDeviceSynchronize());
}
