// qg::cuda::cross_entropy_train against the float32 CPU reference fused_cross_entropy
// (reference_backward.h) on fp16-rounded hidden states and lm_head: ignored rows, vocabularies
// that are not multiples of 8 (the backward's tail columns), rows in several chunks, a loss
// scale != 1 and a normalizer that is not the labelled-row count; per-row NLL, dhidden and the
// accumulated dlm_head; loss only; and the argument checks. Tag [cross-entropy].
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/cross_entropy.h"
#include "qinggeng/error.h"
#include "qinggeng/train/reference_backward.h"

namespace {

using qg::test::DeviceBuffer;
using qg::test::HostMatrix;
using qg::test::relative_l2;

struct CeShape {
  std::int64_t rows, hidden, vocab, row_chunk;
  float grad_scale;
  double normalizer;  ///< 0: the labelled rows
};

}  // namespace

TEST_CASE("GPU fused cross-entropy matches the CPU reference", "[cross-entropy]") {
  for (const CeShape s : {CeShape{5, 8, 13, 512, 1.0f, 0}, CeShape{3, 16, 7, 2, 4.0f, 10},
                          CeShape{70, 64, 1001, 32, 256.0f, 0}, CeShape{40, 128, 2052, 16, 8.0f, 100},
                          CeShape{33, 64, 3000, 8, 1.0f, 0}, CeShape{24, 512, 32000, 16, 1024.0f, 0}}) {
    INFO("rows " << s.rows << ", hidden " << s.hidden << ", vocab " << s.vocab << ", chunk "
                 << s.row_chunk << ", grad_scale " << s.grad_scale);
    const HostMatrix hidden = qg::test::round_to_fp16(qg::test::random_matrix(s.rows, s.hidden, 1));
    const HostMatrix lm_head = qg::test::round_to_fp16(
        qg::test::random_matrix(s.vocab, s.hidden, 2, 2.0f / std::sqrt(static_cast<float>(s.hidden))));
    std::vector<int> targets(static_cast<std::size_t>(s.rows));
    std::int64_t labelled = 0;
    for (std::int64_t r = 0; r < s.rows; ++r) {
      const bool ignore = r % 3 == 1;  // includes the first row of later chunks at times
      targets[r] = ignore ? qg::train::kIgnoreLabel : static_cast<int>((r * 7919 + 13) % s.vocab);
      labelled += ignore ? 0 : 1;
    }
    const double normalizer = s.normalizer > 0 ? s.normalizer : static_cast<double>(labelled);

    // CPU: the total and its gradients, and each row's NLL (that row alone labelled, normalizer 1).
    qg::train::CrossEntropyOptions ref_options;
    ref_options.normalizer = normalizer;
    std::vector<float> want_dhidden(hidden.data.size(), 0.0f), want_dlm(lm_head.data.size(), 0.0f);
    const auto total = qg::train::fused_cross_entropy(hidden.data.data(), lm_head.data.data(),
                                                      targets.data(), s.rows, s.hidden, s.vocab,
                                                      ref_options, want_dhidden.data(), want_dlm.data());
    std::vector<float> want_nll(static_cast<std::size_t>(s.rows), 0.0f);
    if (s.rows * s.vocab * s.hidden < 50'000'000) {
      for (std::int64_t r = 0; r < s.rows; ++r) {
        if (targets[r] == qg::train::kIgnoreLabel) continue;
        std::vector<int> one(targets.size(), qg::train::kIgnoreLabel);
        one[r] = targets[r];
        qg::train::CrossEntropyOptions o;
        o.normalizer = 1.0;
        want_nll[r] = static_cast<float>(qg::train::fused_cross_entropy(
                                             hidden.data.data(), lm_head.data.data(), one.data(),
                                             s.rows, s.hidden, s.vocab, o, nullptr, nullptr)
                                             .loss);
      }
    }

    // GPU.
    qg::cuda::CrossEntropyTrainOptions options;
    options.row_chunk = s.row_chunk;
    options.normalizer = normalizer;
    options.grad_scale = s.grad_scale;
    const std::size_t bytes = qg::cuda::cross_entropy_train_workspace_bytes(s.rows, s.vocab, options);
    DeviceBuffer<char> workspace(bytes);
    DeviceBuffer<__half> d_hidden(hidden.data.size()), d_lm(lm_head.data.size()),
        d_dhidden(hidden.data.size());
    qg::test::upload_fp16(d_hidden, hidden);
    qg::test::upload_fp16(d_lm, lm_head);
    DeviceBuffer<int> d_targets(targets.size());
    d_targets.upload(targets);
    DeviceBuffer<float> d_nll(targets.size()), d_dlm(lm_head.data.size());
    d_dlm.upload(std::vector<float>(lm_head.data.size(), 0.25f));  // accumulated into
    qg::cuda::cross_entropy_train(d_hidden.get(), d_lm.get(), d_targets.get(), s.rows, s.hidden,
                                  s.vocab, options, d_nll.get(), d_dhidden.get(), d_dlm.get(),
                                  workspace.get(), bytes, nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());

    const std::vector<float> nll = d_nll.download();
    double sum = 0;
    for (std::int64_t r = 0; r < s.rows; ++r) {
      sum += nll[r];
      if (targets[r] == qg::train::kIgnoreLabel) CHECK(nll[r] == 0.0f);
      if (want_nll[r] != 0.0f) CHECK(std::abs(nll[r] - want_nll[r]) <= 2e-4 * std::max(1.0f, want_nll[r]));
    }
    CHECK(std::abs(sum / normalizer - total.loss) <= 2e-4 * std::max(1.0, total.loss));

    HostMatrix dhidden = qg::test::download_fp16(d_dhidden, s.rows, s.hidden);
    for (auto& v : dhidden.data) v /= s.grad_scale;
    CHECK(relative_l2(dhidden.data, want_dhidden) < 1e-2);
    HostMatrix dlm{s.vocab, s.hidden, d_dlm.download()};
    for (auto& v : dlm.data) v = (v - 0.25f) / s.grad_scale;
    CHECK(relative_l2(dlm.data, want_dlm) < 1e-2);

    // Loss only: the same NLL, no gradient written.
    d_nll.upload(std::vector<float>(targets.size(), -1.0f));
    qg::cuda::cross_entropy_train(d_hidden.get(), d_lm.get(), d_targets.get(), s.rows, s.hidden,
                                  s.vocab, options, d_nll.get(), nullptr, nullptr, workspace.get(),
                                  bytes, nullptr);
    QG_CUDA_CHECK(cudaDeviceSynchronize());
    CHECK(d_nll.download() == nll);
  }
}

TEST_CASE("GPU fused cross-entropy rejects bad arguments", "[cross-entropy]") {
  qg::cuda::CrossEntropyTrainOptions options;
  const std::size_t bytes = qg::cuda::cross_entropy_train_workspace_bytes(4, 16, options);
  DeviceBuffer<char> ws(bytes);
  DeviceBuffer<__half> hidden(64), lm(256), dhidden(64);
  DeviceBuffer<int> targets(4);
  DeviceBuffer<float> nll(4);
  auto call = [&](std::int64_t hidden_size, const qg::cuda::CrossEntropyTrainOptions& o,
                  std::size_t ws_bytes) {
    qg::cuda::cross_entropy_train(hidden.get(), lm.get(), targets.get(), 4, hidden_size, 16, o,
                                  nll.get(), dhidden.get(), nullptr, ws.get(), ws_bytes, nullptr);
  };
  REQUIRE_THROWS_WITH(call(12, options, bytes), QG_CONTAINS("multiple of 8"));
  REQUIRE_THROWS_WITH(call(16, options, bytes - 1), QG_CONTAINS("workspace"));
  auto bad = options;
  bad.normalizer = 0;
  REQUIRE_THROWS_WITH(call(16, bad, bytes), QG_CONTAINS("normalizer"));
  bad = options;
  bad.row_chunk = 0;
  REQUIRE_THROWS_WITH(call(16, bad, bytes), QG_CONTAINS("row_chunk"));
  REQUIRE_THROWS_WITH(qg::cuda::cross_entropy_train(hidden.get(), lm.get(), nullptr, 4, 16, 16,
                                                    options, nll.get(), nullptr, nullptr, ws.get(),
                                                    bytes, nullptr),
                      QG_CONTAINS("null pointer"));
}
