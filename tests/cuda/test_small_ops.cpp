// GPU small ops (LayerNorm, embedding gather, gelu_tanh, scaled add, gather rows) against the
// CPU backend through tests/backend_ops.h, on fp16-rounded inputs, for widths that take the
// 16-byte vector path (multiples of 8) and widths that take the scalar path.
#include <algorithm>
#include <cstdint>
#include <vector>

#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/elementwise.h"
#include "qinggeng/cuda/layer_norm.h"
#include "qinggeng/error.h"

namespace {

using qg::test::DeviceBuffer;
using qg::test::HostMatrix;

using qg::test::DeviceMatrix;
using qg::test::random_fp16;

// LayerNorm holds rows of up to 2 or 4 vectors a thread in registers (8-wide vectors where
// cols % 8 == 0, else single values): 8, 100 and 4096 take 2, 777 and 6000 take 4, 4099 and
// 10000 are read again for each pass.
const std::vector<std::int64_t> kWidths = {8, 100, 777, 4096, 4099, 6000, 10000};

}  // namespace

TEST_CASE("GPU layer_norm matches the CPU backend") {
  auto cpu = qg::model::make_cpu_backend(2);
  for (const std::int64_t cols : kWidths) {
    INFO("cols " << cols);
    // A large mean checks that the variance is taken about the mean (two passes).
    const HostMatrix x = random_fp16(5, cols, 1, 2.0f, 30.0f);
    const HostMatrix gamma = random_fp16(1, cols, 2), beta = random_fp16(1, cols, 3);
    const HostMatrix expect = qg::test::run_layer_norm(*cpu, x, gamma, beta, 1e-5f);
    DeviceMatrix dx(x), dg(gamma), db(beta), out(x.rows, cols);
    qg::cuda::layer_norm(dx.buf.get(), dg.buf.get(), db.buf.get(), 1e-5f, x.rows, cols,
                         out.buf.get(), nullptr);
    CHECK(qg::test::tolerance_ratio(out.host(), expect, 2e-2, 4e-3) <= 1.0);
    // In place (out aliases x) gives the same result.
    qg::cuda::layer_norm(dx.buf.get(), dg.buf.get(), db.buf.get(), 1e-5f, x.rows, cols,
                         dx.buf.get(), nullptr);
    CHECK(qg::test::tolerance_ratio(dx.host(), expect, 2e-2, 4e-3) <= 1.0);
  }
  REQUIRE_THROWS_WITH(qg::cuda::layer_norm(nullptr, nullptr, nullptr, 1e-5f, 1, 8, nullptr, nullptr),
                      QG_CONTAINS("null pointer"));
}

TEST_CASE("GPU gelu, scaled_add, embedding, gather_rows and scatter_rows match the CPU backend") {
  auto cpu = qg::model::make_cpu_backend(2);
  for (const std::int64_t cols : kWidths) {
    INFO("cols " << cols);
    const HostMatrix a = random_fp16(3, cols, 10, 3.0f), b = random_fp16(3, cols, 11);

    DeviceMatrix g(a);
    qg::cuda::gelu_tanh(g.buf.get(), a.rows * cols, nullptr);
    CHECK(qg::test::tolerance_ratio(g.host(), qg::test::run_gelu(*cpu, a), 1e-3, 2e-3) <= 1.0);

    DeviceMatrix da(a), db(b), out(a.rows, cols);
    qg::cuda::scaled_add(da.buf.get(), 1.7f, db.buf.get(), a.rows * cols, out.buf.get(), nullptr);
    const HostMatrix sum = qg::test::run_scaled_add(*cpu, a, 1.7f, b);
    CHECK(qg::test::tolerance_ratio(out.host(), sum, 2e-3, 2e-3) <= 1.0);
    qg::cuda::scaled_add(da.buf.get(), 1.7f, db.buf.get(), a.rows * cols, db.buf.get(), nullptr);
    CHECK(qg::test::tolerance_ratio(db.host(), sum, 2e-3, 2e-3) <= 1.0);  // out aliases b

    const HostMatrix table = random_fp16(50, cols, 12);
    const std::vector<int> ids = {3, 0, 49, 3, 17};
    DeviceMatrix dt(table), emb(static_cast<std::int64_t>(ids.size()), cols);
    DeviceBuffer<int> d_ids(ids.size());
    d_ids.upload(ids);
    qg::cuda::embedding(dt.buf.get(), table.rows, cols, d_ids.get(),
                        static_cast<std::int64_t>(ids.size()), emb.buf.get(), nullptr);
    CHECK(qg::test::tolerance_ratio(emb.host(), qg::test::run_embedding(*cpu, table, ids), 1e-6, 0) <= 1.0);

    const std::vector<std::int64_t> rows = {49, 1, 1, 0};
    DeviceBuffer<std::int64_t> d_rows(rows.size());
    d_rows.upload(rows);
    DeviceMatrix picked(static_cast<std::int64_t>(rows.size()), cols);
    qg::cuda::gather_rows(dt.buf.get(), table.rows, cols, d_rows.get(),
                          static_cast<std::int64_t>(rows.size()), picked.buf.get(), nullptr);
    CHECK(qg::test::tolerance_ratio(picked.host(), qg::test::run_gather_rows(*cpu, table, rows), 1e-6,
                                    0) <= 1.0);

    // scatter_rows puts rows back where they came from and leaves the others alone; an index
    // outside the output is skipped.
    const std::vector<std::int64_t> targets = {7, 2, 50, 0};
    DeviceBuffer<std::int64_t> d_targets(targets.size());
    d_targets.upload(targets);
    DeviceMatrix scattered(table);
    qg::cuda::scatter_rows(picked.buf.get(), static_cast<std::int64_t>(targets.size()), cols,
                           d_targets.get(), scattered.buf.get(), table.rows, nullptr);
    const HostMatrix got = scattered.host(), from = picked.host();
    std::int64_t wrong = 0;
    for (std::int64_t r = 0; r < table.rows; ++r) {
      const auto it = std::find(targets.begin(), targets.end(), r);
      const std::int64_t src = it == targets.end() ? -1 : it - targets.begin();
      for (std::int64_t c = 0; c < cols; ++c) {
        const float want = src < 0 ? table.at(r, c) : from.at(src, c);
        wrong += got.at(r, c) == want ? 0 : 1;
      }
    }
    CHECK(wrong == 0);
  }
}

TEST_CASE("GPU gathers give zero rows for out-of-range indices and reject null pointers") {
  const HostMatrix table = random_fp16(4, 16, 20);
  DeviceMatrix dt(table), out(2, 16);
  DeviceBuffer<int> ids(2);
  ids.upload({-1, 4});
  qg::cuda::embedding(dt.buf.get(), 4, 16, ids.get(), 2, out.buf.get(), nullptr);
  for (float v : out.host().data) CHECK(v == 0.0f);
  REQUIRE_THROWS_WITH(qg::cuda::embedding(nullptr, 4, 16, ids.get(), 2, out.buf.get(), nullptr),
                      QG_CONTAINS("embedding"));
  REQUIRE_THROWS_WITH(qg::cuda::gelu_tanh(nullptr, 4, nullptr), QG_CONTAINS("gelu_tanh"));
  REQUIRE_THROWS_WITH(qg::cuda::scaled_add(nullptr, 1.0f, nullptr, 4, nullptr, nullptr),
                      QG_CONTAINS("scaled_add"));
}
