// The small training ops of the CUDA backend against the float32 CPU reference of
// reference_backward.h, on fp16-rounded inputs: layer_norm_forward_stats and
// layer_norm_backward (dgamma / dbeta summed over rows through the shared-memory partials,
// dx aliasing dy), gelu_tanh_out and gelu_tanh_backward, and embedding_backward (repeated and
// out-of-range ids). Widths take the 16-byte vector path (multiples of 8) and the scalar one.
// Tag [train-ops].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/elementwise.h"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/error.h"
#include "qinggeng/train/reference_backward.h"

namespace {

using qg::test::DeviceBuffer;
using qg::test::HostMatrix;
using qg::test::random_fp16;
using qg::test::relative_l2;

HostMatrix as_matrix(std::vector<float> v, std::int64_t rows, std::int64_t cols) {
  return HostMatrix{rows, cols, std::move(v)};
}

struct LnShape {
  std::int64_t rows, cols;
};

}  // namespace

TEST_CASE("GPU layer_norm forward with stats and backward match the CPU reference", "[train-ops]") {
  // Rows held in registers between passes (2 or 4 vectors a thread; the widths at and past
  // each limit, 16-byte and scalar) and rows read again; more rows than the dgamma / dbeta grid
  // (2 blocks an SM) make blocks take several rows; 30000 columns of dgamma and dbeta partials
  // exceed shared memory (accumulated in global memory instead).
  for (const LnShape s :
       {LnShape{1, 8}, LnShape{7, 100}, LnShape{5, 4099}, LnShape{300, 1024}, LnShape{2048, 4096},
        LnShape{9, 777}, LnShape{33, 6000}, LnShape{4, 10000}, LnShape{600, 6000},
        LnShape{600, 777}, LnShape{5, 4104}, LnShape{5, 8192}, LnShape{5, 8200}, LnShape{9, 512},
        LnShape{9, 513}, LnShape{9, 1025}, LnShape{3, 30000}, LnShape{3, 30001}}) {
    INFO("rows " << s.rows << ", cols " << s.cols);
    const HostMatrix x = random_fp16(s.rows, s.cols, 1, 2.0f, 5.0f);
    const HostMatrix gamma = random_fp16(1, s.cols, 2, 0.5f, 1.0f), beta = random_fp16(1, s.cols, 3);
    const HostMatrix dy = random_fp16(s.rows, s.cols, 4);
    const auto n = static_cast<std::size_t>(s.rows * s.cols);
    std::vector<float> y(n), mean(s.rows), rstd(s.rows), dx(n, 0.0f), dgamma(s.cols, 0.0f),
        dbeta(s.cols, 0.0f);
    qg::train::layer_norm_forward(x.data.data(), gamma.data.data(), beta.data.data(), s.rows,
                                  s.cols, 1e-5f, y.data(), mean.data(), rstd.data());
    qg::train::layer_norm_backward(x.data.data(), gamma.data.data(), mean.data(), rstd.data(),
                                   dy.data.data(), s.rows, s.cols, dx.data(), dgamma.data(),
                                   dbeta.data());

    DeviceBuffer<__half> d_x(n), d_gamma(s.cols), d_beta(s.cols), d_y(n), d_dy(n), d_dx(n);
    qg::test::upload_fp16(d_x, x);
    qg::test::upload_fp16(d_gamma, gamma);
    qg::test::upload_fp16(d_beta, beta);
    qg::test::upload_fp16(d_dy, dy);
    DeviceBuffer<float> d_mean(s.rows), d_rstd(s.rows), d_dgamma(s.cols), d_dbeta(s.cols);
    qg::cuda::layer_norm_forward_stats(d_x.get(), d_gamma.get(), d_beta.get(), 1e-5f, s.rows,
                                       s.cols, d_y.get(), d_mean.get(), d_rstd.get(), nullptr);
    CHECK(relative_l2(qg::test::download_fp16(d_y, s.rows, s.cols).data, y) < 2e-3);
    CHECK(relative_l2(d_mean.download(), mean) < 1e-5);
    CHECK(relative_l2(d_rstd.download(), rstd) < 1e-5);

    // dgamma / dbeta accumulate: start from a known value and expect it added to.
    d_dgamma.upload(std::vector<float>(s.cols, 1.0f));
    d_dbeta.upload(std::vector<float>(s.cols, -1.0f));
    qg::cuda::layer_norm_backward(d_x.get(), d_gamma.get(), d_mean.get(), d_rstd.get(), d_dy.get(),
                                  s.rows, s.cols, d_dx.get(), d_dgamma.get(), d_dbeta.get(),
                                  nullptr);
    CHECK(relative_l2(qg::test::download_fp16(d_dx, s.rows, s.cols).data, dx) < 5e-3);
    std::vector<float> got_dgamma = d_dgamma.download(), got_dbeta = d_dbeta.download();
    for (auto& v : got_dgamma) v -= 1.0f;
    for (auto& v : got_dbeta) v += 1.0f;
    CHECK(relative_l2(got_dgamma, dgamma) < 1e-4);
    CHECK(relative_l2(got_dbeta, dbeta) < 1e-4);

    // dx aliasing dy with dgamma alone, a frozen norm (no dgamma / dbeta), and dbeta alone.
    d_dgamma.upload(std::vector<float>(s.cols, 0.0f));
    qg::cuda::layer_norm_backward(d_x.get(), d_gamma.get(), d_mean.get(), d_rstd.get(), d_dy.get(),
                                  s.rows, s.cols, d_dy.get(), d_dgamma.get(), nullptr, nullptr);
    CHECK(relative_l2(qg::test::download_fp16(d_dy, s.rows, s.cols).data, dx) < 5e-3);
    CHECK(relative_l2(d_dgamma.download(), dgamma) < 1e-4);
    qg::test::upload_fp16(d_dy, dy);
    qg::cuda::layer_norm_backward(d_x.get(), d_gamma.get(), d_mean.get(), d_rstd.get(), d_dy.get(),
                                  s.rows, s.cols, d_dx.get(), nullptr, nullptr, nullptr);
    CHECK(relative_l2(qg::test::download_fp16(d_dx, s.rows, s.cols).data, dx) < 5e-3);
    d_dbeta.upload(std::vector<float>(s.cols, 0.0f));
    qg::cuda::layer_norm_backward(d_x.get(), d_gamma.get(), d_mean.get(), d_rstd.get(), d_dy.get(),
                                  s.rows, s.cols, d_dx.get(), nullptr, d_dbeta.get(), nullptr);
    CHECK(relative_l2(d_dbeta.download(), dbeta) < 1e-4);
  }
}

TEST_CASE("GPU layer_norm with rows not 16-byte aligned (scalar path) matches the aligned one",
          "[train-ops]") {
  // 4096 columns would take 16-byte vectors; x, y, dy and dx one element into their buffers
  // take the scalar path, which must give the aligned path's values.
  const std::int64_t rows = 3, cols = 4096;
  const auto n = static_cast<std::size_t>(rows * cols);
  const HostMatrix x = random_fp16(rows, cols, 11, 2.0f, 5.0f), dy = random_fp16(rows, cols, 12);
  const HostMatrix gamma = random_fp16(1, cols, 13, 0.5f, 1.0f), beta = random_fp16(1, cols, 14);
  DeviceBuffer<__half> d_gamma(cols), d_beta(cols);
  qg::test::upload_fp16(d_gamma, gamma);
  qg::test::upload_fp16(d_beta, beta);
  struct Run {
    HostMatrix y, dx;
    std::vector<float> dgamma;
  };
  const auto run = [&](std::size_t offset) {
    DeviceBuffer<__half> packed_x(n), packed_dy(n), d_x(n + 1), d_y(n + 1), d_dy(n + 1),
        d_dx(n + 1);
    qg::test::upload_fp16(packed_x, x);
    qg::test::upload_fp16(packed_dy, dy);
    REQUIRE(cudaMemcpy(d_x.get() + offset, packed_x.get(), n * 2, cudaMemcpyDeviceToDevice) ==
            cudaSuccess);
    REQUIRE(cudaMemcpy(d_dy.get() + offset, packed_dy.get(), n * 2, cudaMemcpyDeviceToDevice) ==
            cudaSuccess);
    DeviceBuffer<float> d_mean(rows), d_rstd(rows), d_dgamma(cols);
    d_dgamma.upload(std::vector<float>(cols, 0.0f));
    qg::cuda::layer_norm_forward_stats(d_x.get() + offset, d_gamma.get(), d_beta.get(), 1e-5f, rows,
                                       cols, d_y.get() + offset, d_mean.get(), d_rstd.get(),
                                       nullptr);
    qg::cuda::layer_norm_backward(d_x.get() + offset, d_gamma.get(), d_mean.get(), d_rstd.get(),
                                  d_dy.get() + offset, rows, cols, d_dx.get() + offset,
                                  d_dgamma.get(), nullptr, nullptr);
    const auto host = [&](DeviceBuffer<__half>& buf) {
      REQUIRE(cudaMemcpy(packed_x.get(), buf.get() + offset, n * 2, cudaMemcpyDeviceToDevice) ==
              cudaSuccess);
      return qg::test::download_fp16(packed_x, rows, cols);
    };
    return Run{host(d_y), host(d_dx), d_dgamma.download()};
  };
  const Run aligned = run(0), scalar = run(1);
  CHECK(qg::test::tolerance_ratio(scalar.y, aligned.y, 1e-3, 1e-3) <= 1.0);
  CHECK(qg::test::tolerance_ratio(scalar.dx, aligned.dx, 1e-3, 2e-3) <= 1.0);
  CHECK(relative_l2(scalar.dgamma, aligned.dgamma) < 1e-5);
}

TEST_CASE("GPU layer_norm training entry points reject bad arguments", "[train-ops]") {
  DeviceBuffer<__half> x(64), out(64), g(8);
  DeviceBuffer<float> stats(8);
  REQUIRE_THROWS_WITH(qg::cuda::layer_norm_forward_stats(x.get(), g.get(), g.get(), 1e-5f, 8, 8,
                                                         x.get(), stats.get(), stats.get(), nullptr),
                      QG_CONTAINS("alias"));
  REQUIRE_THROWS_WITH(qg::cuda::layer_norm_forward_stats(x.get(), g.get(), g.get(), 1e-5f, 8, 8,
                                                         out.get(), nullptr, stats.get(), nullptr),
                      QG_CONTAINS("null pointer"));
  REQUIRE_THROWS_WITH(qg::cuda::layer_norm_backward(x.get(), g.get(), stats.get(), stats.get(),
                                                    out.get(), 8, 0, x.get(), nullptr, nullptr,
                                                    nullptr),
                      QG_CONTAINS("cols 0"));
  REQUIRE_THROWS_WITH(qg::cuda::layer_norm_backward(x.get(), g.get(), stats.get(), nullptr,
                                                    out.get(), 8, 8, x.get(), nullptr, nullptr,
                                                    nullptr),
                      QG_CONTAINS("null pointer"));
}

TEST_CASE("GPU gelu_tanh_out and gelu_tanh_backward match the CPU reference", "[train-ops]") {
  // Random values, and (count 0 below) the tails where the GPU's sigmoid form saturates.
  const std::vector<float> tails = {-65504.0f, -60000.0f, -200.0f, -50.0f,   -12.0f,   -9.0f, -7.0f,
                                    -3.0f,     -0.75f,    -0.5f,   0.0f,     0.5f,     3.0f,  7.0f,
                                    12.0f,     50.0f,     200.0f,  60000.0f, 65504.0f, 1e-4f};
  for (const std::int64_t count :
       {std::int64_t{0}, std::int64_t{8}, std::int64_t{1001}, std::int64_t{4096 * 33}}) {
    INFO("count " << count);
    HostMatrix x = random_fp16(1, count, 5, 3.0f), dy = random_fp16(1, count, 6);
    if (count == 0) {
      x = qg::test::round_to_fp16(HostMatrix{1, static_cast<std::int64_t>(tails.size()), tails});
      dy = random_fp16(1, x.cols, 6);
    }
    const std::int64_t n = x.cols;
    std::vector<float> y(n), dx(n, 0.0f);
    qg::train::gelu_forward(x.data.data(), n, y.data());
    qg::train::gelu_backward(x.data.data(), dy.data.data(), n, dx.data());
    DeviceBuffer<__half> d_x(n), d_y(n), d_dy(n);
    qg::test::upload_fp16(d_x, x);
    qg::test::upload_fp16(d_dy, dy);
    qg::cuda::gelu_tanh_out(d_x.get(), n, d_y.get(), nullptr);
    CHECK(qg::test::tolerance_ratio(qg::test::download_fp16(d_y, 1, n), as_matrix(y, 1, n), 1e-3,
                                    2e-3) <= 1.0);
    CHECK(qg::test::tolerance_ratio(qg::test::download_fp16(d_x, 1, n), x, 0, 0) <= 1.0);
    qg::cuda::gelu_tanh_backward(d_x.get(), d_dy.get(), n, d_dy.get(), nullptr);  // dx = dy
    CHECK(qg::test::tolerance_ratio(qg::test::download_fp16(d_dy, 1, n), as_matrix(dx, 1, n), 1e-3,
                                    2e-3) <= 1.0);
  }
  DeviceBuffer<__half> buf(8);
  REQUIRE_THROWS_WITH(qg::cuda::gelu_tanh_out(nullptr, 8, buf.get(), nullptr), QG_CONTAINS("gelu_tanh_out"));
  REQUIRE_THROWS_WITH(qg::cuda::gelu_tanh_backward(buf.get(), nullptr, 8, buf.get(), nullptr),
                      QG_CONTAINS("gelu_tanh_backward"));
  REQUIRE_THROWS_WITH(qg::cuda::gelu_tanh_out(buf.get(), -1, buf.get(), nullptr), QG_CONTAINS("negative"));
}

TEST_CASE("GPU embedding_backward scatter-adds like the CPU reference", "[train-ops]") {
  for (const std::int64_t cols : {std::int64_t{8}, std::int64_t{100}, std::int64_t{4096}}) {
    INFO("cols " << cols);
    const std::int64_t vocab = 50;
    // Repeats accumulate; -1 and 50 (out of range) are skipped on the GPU, left out on the CPU.
    const std::vector<int> ids = {3, 0, 49, 3, 17, -1, 3, 50, 0};
    const auto n = static_cast<std::int64_t>(ids.size());
    const HostMatrix dout = random_fp16(n, cols, 7);
    std::vector<int> valid_ids;
    HostMatrix valid_dout{0, cols, {}};
    for (std::int64_t i = 0; i < n; ++i) {
      if (ids[i] < 0 || ids[i] >= vocab) continue;
      valid_ids.push_back(ids[i]);
      valid_dout.data.insert(valid_dout.data.end(), dout.data.begin() + i * cols,
                             dout.data.begin() + (i + 1) * cols);
    }
    std::vector<float> table(static_cast<std::size_t>(vocab * cols), 0.5f);
    qg::train::embedding_backward(valid_ids.data(), static_cast<std::int64_t>(valid_ids.size()),
                                  valid_dout.data.data(), vocab, cols, table.data());
    DeviceBuffer<int> d_ids(ids.size());
    d_ids.upload(ids);
    DeviceBuffer<__half> d_dout(static_cast<std::size_t>(n * cols));
    qg::test::upload_fp16(d_dout, dout);
    DeviceBuffer<float> d_table(table.size());
    d_table.upload(std::vector<float>(table.size(), 0.5f));
    qg::cuda::embedding_backward(d_ids.get(), n, d_dout.get(), vocab, cols, d_table.get(), nullptr);
    CHECK(qg::test::tolerance_ratio(as_matrix(d_table.download(), vocab, cols),
                                    as_matrix(table, vocab, cols), 1e-6, 1e-6) <= 1.0);
  }
  DeviceBuffer<int> ids(1);
  DeviceBuffer<__half> dout(8);
  DeviceBuffer<float> table(8);
  REQUIRE_THROWS_WITH(qg::cuda::embedding_backward(ids.get(), 1, dout.get(), 0, 8, table.get(), nullptr),
                      QG_CONTAINS("embedding_backward"));
  REQUIRE_THROWS_WITH(qg::cuda::embedding_backward(nullptr, 1, dout.get(), 1, 8, table.get(), nullptr),
                      QG_CONTAINS("null pointer"));
}
