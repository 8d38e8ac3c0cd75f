// GPU sampling (qg::cuda::GpuSampler) against the CPU Sampler: greedy picks must be identical
// (ties, non-finite rows, repetition penalty), single-token kept sets must give the CPU's token,
// and sampled tokens must stay inside the CPU's kept set with the CPU's frequencies (fixed
// seeds, so the frequency checks are deterministic). The split form of sample_tokens (several
// blocks per row, what GpuSampler runs) must give the one-block form's ids bit for bit, also
// when replayed from a CUDA graph.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "catch.hpp"
#include "fp16_device.h"
#include "qinggeng/cuda/sampling.h"
#include "qinggeng/engine/sampler.h"
#include "qinggeng/error.h"

namespace {

using qg::cuda::SamplingRow;
using qg::engine::SamplingConfig;
using qg::test::DeviceBuffer;
using Rows = std::vector<std::vector<float>>;
using Histories = std::vector<std::vector<int>>;

SamplingConfig greedy(float penalty = 1.0f) {
  SamplingConfig c;
  c.do_sample = false;
  c.repetition_penalty = penalty;
  return c;
}

SamplingConfig sampling(float temperature, float top_p, int top_k, float penalty = 1.0f,
                        std::uint64_t seed = 7) {
  SamplingConfig c;
  c.temperature = temperature;
  c.top_p = top_p;
  c.top_k = top_k;
  c.repetition_penalty = penalty;
  c.seed = seed;
  return c;
}

/// Normal logits times `scale`; with quantum > 0 rounded to its multiples (many exact ties).
std::vector<float> random_logits(int vocab, std::uint32_t seed, float scale, float quantum = 0) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(static_cast<std::size_t>(vocab));
  for (float& x : v) x = quantum > 0 ? std::round(dist(rng) / quantum) * quantum : dist(rng);
  return v;
}

std::vector<int> random_history(int vocab, std::uint32_t seed, int length) {
  std::mt19937 rng(seed);
  // Out-of-range ids must be ignored; a narrow range gives repeats.
  std::uniform_int_distribution<int> id(-2, std::min(vocab + 2, 60));
  std::vector<int> h(static_cast<std::size_t>(length));
  for (int& t : h) t = id(rng);
  return h;
}

/// One GPU call over all rows (stateless histories); steps default to 0.
std::vector<int> gpu_pick(const Rows& rows, const std::vector<SamplingConfig>& configs,
                          const Histories& histories, std::vector<std::uint64_t> steps = {}) {
  const int vocab = static_cast<int>(rows.at(0).size());
  std::vector<float> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  DeviceBuffer<float> d(flat.size());
  d.upload(flat);
  if (steps.empty()) steps.assign(rows.size(), 0);
  qg::cuda::GpuSampler sampler(1, 1);
  return sampler.sample_to_host(d.get(), static_cast<int>(rows.size()), vocab, configs, histories,
                                steps, nullptr);
}

/// `count` draws from one row with steps 0..count-1: one batch of copies of a small row, or
/// one call per draw on a large row uploaded once.
std::vector<int> gpu_draws(const std::vector<float>& row, const SamplingConfig& config,
                           const std::vector<int>& history, int count) {
  const auto n = static_cast<std::size_t>(count);
  std::vector<std::uint64_t> steps(n);
  for (std::size_t i = 0; i < n; ++i) steps[i] = i;
  if (row.size() * n <= (std::size_t{1} << 22)) {
    return gpu_pick(Rows(n, row), std::vector<SamplingConfig>(n, config), Histories(n, history),
                    steps);
  }
  DeviceBuffer<float> d(row.size());
  d.upload(row);
  DeviceBuffer<int> out(n);
  qg::cuda::GpuSampler sampler(1, 1);
  for (std::size_t i = 0; i < n; ++i) {
    sampler.sample(d.get(), 1, static_cast<int>(row.size()), {config}, Histories{history},
                   {steps[i]}, out.get() + i, nullptr);
  }
  return out.download();
}

int cpu_pick(std::vector<float> row, const SamplingConfig& config,
             const std::vector<int>& history) {
  qg::engine::Sampler sampler(config);
  return sampler.sample(row, history);
}

/// The probabilities the CPU Sampler draws from (0 outside its kept set), written out here
/// independently as the test oracle.
std::vector<double> kept_distribution(std::vector<float> logits, const SamplingConfig& c,
                                      const std::vector<int>& history) {
  const std::size_t n = logits.size();
  if (!std::all_of(logits.begin(), logits.end(), [](float x) { return std::isfinite(x); })) {
    for (std::size_t i = 0; i < n; ++i) logits[i] = i == 5 ? 5e4f : 0.0f;
  }
  std::vector<bool> penalised(n, false);
  for (int t : history) {
    if (t < 0 || static_cast<std::size_t>(t) >= n || penalised[static_cast<std::size_t>(t)])
      continue;
    penalised[static_cast<std::size_t>(t)] = true;
    float& x = logits[static_cast<std::size_t>(t)];
    x = x < 0 ? x * c.repetition_penalty : x / c.repetition_penalty;
  }
  std::vector<std::pair<float, int>> ranked(n);
  for (std::size_t i = 0; i < n; ++i) ranked[i] = {logits[i] / c.temperature, static_cast<int>(i)};
  std::sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::size_t kept = c.top_k > 0 ? std::min<std::size_t>(n, static_cast<std::size_t>(c.top_k)) : n;
  std::vector<double> w(kept);
  double z = 0;
  for (std::size_t j = 0; j < kept; ++j)
    z += w[j] = std::exp(double(ranked[j].first - ranked[0].first));
  if (c.top_p < 1.0f) {
    double cum = 0;
    for (std::size_t j = 0; j < kept; ++j) {
      cum += w[j] / z;
      if (cum >= c.top_p) {
        kept = j + 1;
        break;
      }
    }
  }
  double kept_z = 0;
  for (std::size_t j = 0; j < kept; ++j) kept_z += w[j];
  std::vector<double> p(n, 0.0);
  for (std::size_t j = 0; j < kept; ++j)
    p[static_cast<std::size_t>(ranked[j].second)] = w[j] / kept_z;
  return p;
}

/// Every draw is inside the kept set, and (when check_frequencies) the counts pass a
/// chi-square test against the kept distribution with a generous bound.
void check_draws(const std::vector<int>& draws, const std::vector<double>& p,
                 bool check_frequencies) {
  std::vector<int> counts(p.size(), 0);
  for (int t : draws) {
    REQUIRE(t >= 0);
    REQUIRE(static_cast<std::size_t>(t) < p.size());
    INFO("token " << t);
    REQUIRE(p[static_cast<std::size_t>(t)] > 0);
    ++counts[static_cast<std::size_t>(t)];
  }
  if (!check_frequencies) return;
  // Tokens expected fewer than 5 times are pooled into one cell, as chi-square wants.
  const double n = static_cast<double>(draws.size());
  double chi2 = 0, pooled_expect = 0, pooled_count = 0;
  int df = -1;
  for (std::size_t i = 0; i < p.size(); ++i) {
    const double expect = n * p[i];
    if (expect <= 0) continue;
    if (expect < 5) {
      pooled_expect += expect;
      pooled_count += counts[i];
      continue;
    }
    chi2 += (counts[i] - expect) * (counts[i] - expect) / expect;
    ++df;
  }
  if (pooled_expect > 0) {
    chi2 += (pooled_count - pooled_expect) * (pooled_count - pooled_expect) / pooled_expect;
    ++df;
  }
  INFO("chi-square " << chi2 << " with " << df << " degrees of freedom");
  CHECK(chi2 <= df + 10.0 * std::sqrt(2.0 * std::max(df, 1)) + 10.0);
}

/// A SamplingRow for sample_tokens: `config` at random stream position `step`, seen tokens
/// history[begin, begin + length).
SamplingRow device_row(const SamplingConfig& c, std::uint64_t step, int begin, int length) {
  SamplingRow r;
  r.temperature = c.temperature;
  r.top_p = c.top_p;
  r.repetition_penalty = c.repetition_penalty;
  r.top_k = c.top_k;
  r.do_sample = c.do_sample ? 1 : 0;
  r.history_begin = begin;
  r.history_length = length;
  r.seed = c.seed;
  r.step = step;
  return r;
}

/// Rows, settings and seen tokens for the raw launches, all on the device.
struct DeviceBatch {
  int vocab;
  std::vector<SamplingRow> rows;
  DeviceBuffer<float> logits;
  DeviceBuffer<SamplingRow> d_rows;
  DeviceBuffer<int> history;
  bool any_penalty = false;

  DeviceBatch(const std::vector<float>& flat, int vocab_, std::vector<SamplingRow> rows_,
              const std::vector<int>& flat_history)
      : vocab(vocab_),
        rows(std::move(rows_)),
        logits(flat.size()),
        d_rows(rows.size()),
        history(std::max<std::size_t>(flat_history.size(), 1)) {
    logits.upload(flat);
    d_rows.upload(rows);
    if (!flat_history.empty()) history.upload(flat_history);
    for (const SamplingRow& r : rows) any_penalty = any_penalty || r.repetition_penalty != 1.0f;
  }
  int size() const { return static_cast<int>(rows.size()); }

  std::vector<int> one_block() {
    DeviceBuffer<int> out(rows.size());
    qg::cuda::sample_tokens(logits.get(), size(), vocab, d_rows.get(), history.get(), any_penalty,
                            out.get(), nullptr);
    return out.download();
  }
  std::vector<int> split(int num_sms) {
    DeviceBuffer<int> out(rows.size());
    const std::size_t bytes = qg::cuda::sampling_workspace_bytes(size());
    DeviceBuffer<unsigned char> workspace(bytes);
    qg::cuda::sample_tokens(logits.get(), size(), vocab, d_rows.get(), history.get(), any_penalty,
                            out.get(), workspace.get(), bytes, num_sms, nullptr);
    return out.download();
  }
};

}  // namespace

TEST_CASE("GPU greedy sampling equals the CPU argmax", "[sampling]") {
  for (const int vocab : {1, 7, 1000, 130528, 150528}) {
    INFO("vocab " << vocab);
    Rows rows;
    std::vector<SamplingConfig> configs;
    Histories histories;
    auto add = [&](std::vector<float> row, SamplingConfig c, std::vector<int> h) {
      rows.push_back(std::move(row));
      configs.push_back(c);
      histories.push_back(std::move(h));
    };
    const auto u = static_cast<std::uint32_t>(vocab);
    add(random_logits(vocab, u, 3.0f), greedy(), {});
    add(random_logits(vocab, u + 1, 2.0f, 0.5f), greedy(), {});  // ties, also at the maximum
    add(std::vector<float>(static_cast<std::size_t>(vocab), -1.5f), greedy(), {});
    std::vector<float> zeros(static_cast<std::size_t>(vocab), 0.0f);
    zeros[static_cast<std::size_t>(vocab / 2)] = -0.0f;  // -0 ties with +0
    add(zeros, greedy(), {});
    const float specials[] = {std::numeric_limits<float>::quiet_NaN(),
                              std::numeric_limits<float>::infinity(),
                              -std::numeric_limits<float>::infinity()};
    for (const float special : specials) {
      auto row = random_logits(vocab, u + 2, 1.0f);
      row[static_cast<std::size_t>(vocab - 1) * 2 / 3] = special;
      add(row, greedy(), {});
      add(row, greedy(1.3f), {5, 2});
    }
    add(random_logits(vocab, u + 3, 2.0f, 0.25f), greedy(1.3f), random_history(vocab, u, 40));
    add(random_logits(vocab, u + 4, 2.0f, 0.25f), greedy(0.7f), random_history(vocab, u + 1, 40));
    const std::vector<int> got = gpu_pick(rows, configs, histories);
    for (std::size_t r = 0; r < rows.size(); ++r) {
      INFO("row " << r);
      CHECK(got[r] == cpu_pick(rows[r], configs[r], histories[r]));
    }
  }
}

TEST_CASE("GPU greedy with the repetition penalty equals the CPU on many cases", "[sampling]") {
  const int vocab = 1000;
  Rows rows;
  std::vector<SamplingConfig> configs;
  Histories histories;
  const float penalties[] = {1.05f, 1.2f, 2.0f, 0.8f};
  for (std::uint32_t i = 0; i < 200; ++i) {
    rows.push_back(random_logits(vocab, 100 + i, 2.0f, i % 2 ? 0.25f : 0.0f));
    configs.push_back(greedy(penalties[i % 4]));
    histories.push_back(random_history(vocab, 500 + i, static_cast<int>(i % 51)));
  }
  const std::vector<int> got = gpu_pick(rows, configs, histories);
  for (std::size_t r = 0; r < rows.size(); ++r) {
    INFO("row " << r);
    CHECK(got[r] == cpu_pick(rows[r], configs[r], histories[r]));
  }
}

TEST_CASE("GPU top_k = 1 and a tiny top_p give the CPU's single kept token", "[sampling]") {
  for (const int vocab : {1, 7, 1000, 130528}) {
    INFO("vocab " << vocab);
    Rows rows;
    std::vector<SamplingConfig> configs;
    Histories histories;
    for (std::uint32_t i = 0; i < 6; ++i) {
      rows.push_back(random_logits(vocab, 40 + i, 2.0f, i < 3 ? 0.5f : 0.0f));
      configs.push_back(i % 2 ? sampling(0.7f, 1.0f, 1, 1.2f, i)
                              : sampling(1.3f, 1e-6f, 0, 1.0f, i));
      histories.push_back(random_history(vocab, 60 + i, 30));
    }
    rows.push_back(rows[0]);
    rows.back()[0] = std::numeric_limits<float>::quiet_NaN();
    configs.push_back(sampling(0.95f, 0.7f, 0));
    histories.push_back({});
    const std::vector<int> got = gpu_pick(rows, configs, histories);
    for (std::size_t r = 0; r < rows.size(); ++r) {
      INFO("row " << r);
      CHECK(got[r] == cpu_pick(rows[r], configs[r], histories[r]));
    }
  }
}

TEST_CASE("GPU draws follow the CPU's kept set and distribution", "[sampling]") {
  const int vocab = 40;
  const std::vector<float> row = random_logits(vocab, 11, 1.5f, 0.125f);
  const std::vector<int> history = {3, 3, 17, 25, -1, 99};
  const std::vector<SamplingConfig> configs = {
      sampling(1.0f, 1.0f, 0), sampling(0.95f, 0.7f, 0), sampling(1.3f, 1.0f, 8),
      sampling(0.8f, 0.9f, 12, 1.2f), sampling(2.0f, 0.5f, 0, 1.5f, 99)};
  for (const SamplingConfig& c : configs) {
    INFO("temperature " << c.temperature << " top_p " << c.top_p << " top_k " << c.top_k);
    const std::vector<double> p = kept_distribution(row, c, history);
    // The oracle agrees with the CPU Sampler's own draws.
    for (std::uint64_t seed = 0; seed < 300; ++seed) {
      SamplingConfig cs = c;
      cs.seed = seed;
      CHECK(p[static_cast<std::size_t>(cpu_pick(row, cs, history))] > 0);
    }
    check_draws(gpu_draws(row, c, history, 8192), p, true);
  }
}

TEST_CASE("GPU draws on a full vocabulary, flat rows and exact ties", "[sampling]") {
  const int vocab = 130528;
  SECTION("ChatGLM-like settings with a 100-token history") {
    const std::vector<float> row = random_logits(vocab, 5, 2.5f);
    const std::vector<int> history = random_history(vocab, 6, 100);
    const SamplingConfig c = sampling(0.95f, 0.7f, 0, 1.1f);
    check_draws(gpu_draws(row, c, history, 512), kept_distribution(row, c, history), false);
  }
  SECTION("a flat row cut by top_p (radix narrowing by mass, ties by lower index)") {
    const std::vector<float> row(static_cast<std::size_t>(vocab), 0.25f);
    const SamplingConfig c = sampling(1.0f, 0.3049f, 0);
    const std::vector<double> p = kept_distribution(row, c, {});
    const auto kept =
        static_cast<int>(std::count_if(p.begin(), p.end(), [](double x) { return x > 0; }));
    const std::vector<int> draws = gpu_draws(row, c, {}, 256);
    check_draws(draws, p, false);
    CHECK(*std::max_element(draws.begin(), draws.end()) > kept * 9 / 10);
    CHECK(*std::min_element(draws.begin(), draws.end()) < kept / 10);
  }
  SECTION("a flat row cut by top_k (radix narrowing by count)") {
    const std::vector<float> row(static_cast<std::size_t>(vocab), -3.0f);
    const SamplingConfig c = sampling(0.5f, 1.0f, 5000);
    const std::vector<int> draws = gpu_draws(row, c, {}, 256);
    check_draws(draws, kept_distribution(row, c, {}), false);
    CHECK(*std::max_element(draws.begin(), draws.end()) > 4500);
  }
  SECTION("fp16-like quantised logits at vocab 150528 with top_k and top_p") {
    const std::vector<float> row = random_logits(150528, 8, 2.0f, 1.0f / 64);
    const SamplingConfig c = sampling(0.9f, 0.8f, 50);
    check_draws(gpu_draws(row, c, {}, 256), kept_distribution(row, c, {}), false);
  }
}

TEST_CASE("GPU sampling is reproducible and batches equal rows alone", "[sampling]") {
  for (const int vocab : {1000, 130528}) {
    INFO("vocab " << vocab);
    Rows rows;
    for (std::uint32_t i = 0; i < 6; ++i) rows.push_back(random_logits(vocab, 70 + i, 1.0f));
    const std::vector<SamplingConfig> configs = {greedy(),
                                                 sampling(0.95f, 0.7f, 0, 1.1f, 1),
                                                 sampling(1.0f, 1.0f, 0, 1.0f, 2),
                                                 sampling(1.5f, 0.9f, 40, 1.0f, 3),
                                                 greedy(1.2f),
                                                 sampling(0.6f, 1.0f, 3, 1.3f, 4)};
    Histories histories;
    for (std::uint32_t i = 0; i < 6; ++i) histories.push_back(random_history(vocab, 80 + i, 20));
    const std::vector<std::uint64_t> steps = {0, 1, 2, 3, 4, 5};
    const std::vector<int> batch = gpu_pick(rows, configs, histories, steps);
    CHECK(gpu_pick(rows, configs, histories, steps) == batch);
    for (std::size_t r = 0; r < rows.size(); ++r) {
      INFO("row " << r);
      CHECK(gpu_pick({rows[r]}, {configs[r]}, {histories[r]}, {steps[r]})[0] == batch[r]);
    }
    // Steps move the random stream: a flat-ish distribution gives varied tokens.
    const std::vector<int> draws = gpu_draws(rows[2], configs[2], {}, 64);
    CHECK(std::count(draws.begin(), draws.end(), draws[0]) < 64);
  }
}

TEST_CASE("GPU slot histories appended on the device equal explicit histories", "[sampling]") {
  const int vocab = 1000;
  const Rows rows = {random_logits(vocab, 90, 1.0f, 0.25f), random_logits(vocab, 91, 1.0f),
                     random_logits(vocab, 92, 2.0f)};
  std::vector<float> flat;
  for (const auto& r : rows) flat.insert(flat.end(), r.begin(), r.end());
  DeviceBuffer<float> d_logits(flat.size());
  d_logits.upload(flat);
  DeviceBuffer<int> d_out(3);
  const std::vector<SamplingConfig> configs = {greedy(1.5f), sampling(0.95f, 0.7f, 0, 1.3f, 5),
                                               sampling(1.0f, 0.9f, 20, 2.0f, 6)};
  Histories histories = {{1, 2, 3}, {}, random_history(vocab, 93, 10)};
  // Rows use slots 2, 0, 1.
  const std::vector<int> slots = {2, 0, 1};
  qg::cuda::GpuSampler sampler(3, 10 + 25);
  qg::cuda::GpuSampler reference(1, 1);
  for (std::size_t r = 0; r < 3; ++r) sampler.reset_history(slots[r], histories[r], nullptr);
  for (std::uint64_t step = 0; step < 25; ++step) {
    INFO("step " << step);
    const std::vector<std::uint64_t> steps(3, step);
    sampler.sample(d_logits.get(), 3, vocab, configs, slots, steps, d_out.get(), nullptr);
    const std::vector<int> got = d_out.download();
    const std::vector<int> expect =
        reference.sample_to_host(d_logits.get(), 3, vocab, configs, histories, steps, nullptr);
    REQUIRE(got == expect);
    CHECK(got[0] == cpu_pick(rows[0], configs[0], histories[0]));
    for (std::size_t r = 0; r < 3; ++r) histories[r].push_back(got[r]);
  }
  CHECK(sampler.history_length(2) == 28);
  CHECK(sampler.history_length(1) == 35);
  REQUIRE_THROWS_WITH(sampler.sample(d_logits.get(), 3, vocab, configs, slots,
                                     std::vector<std::uint64_t>(3, 0), d_out.get(), nullptr),
                      QG_CONTAINS("history is full"));
}

TEST_CASE("GPU sampler rejects bad input", "[sampling]") {
  DeviceBuffer<float> d_logits(20);
  d_logits.upload(std::vector<float>(20, 0.0f));
  DeviceBuffer<int> d_out(2);
  qg::cuda::GpuSampler sampler(2, 8);
  auto run = [&](SamplingConfig c) {
    sampler.sample(d_logits.get(), 1, 20, {c}, Histories{{}}, {0}, d_out.get(), nullptr);
  };
  SamplingConfig c;
  c.temperature = 0.0f;
  REQUIRE_THROWS_WITH(run(c), QG_CONTAINS("row 0") && QG_CONTAINS("temperature"));
  c = SamplingConfig{};
  c.top_p = 0.0f;
  REQUIRE_THROWS_WITH(run(c), QG_CONTAINS("top_p"));
  c.top_p = 1.5f;
  REQUIRE_THROWS_WITH(run(c), QG_CONTAINS("top_p"));
  c = SamplingConfig{};
  c.top_k = -1;
  REQUIRE_THROWS_WITH(run(c), QG_CONTAINS("top_k"));
  c = SamplingConfig{};
  c.repetition_penalty = 0.0f;
  REQUIRE_THROWS_WITH(run(c), QG_CONTAINS("repetition_penalty"));

  const std::vector<SamplingConfig> one(1);
  REQUIRE_THROWS_WITH(sampler.sample(nullptr, 1, 20, one, Histories{{}}, {0}, d_out.get(), nullptr),
                      QG_CONTAINS("null pointer"));
  REQUIRE_THROWS_WITH(
      sampler.sample(d_logits.get(), 1, 20, one, Histories{{}}, {0}, nullptr, nullptr),
      QG_CONTAINS("null pointer"));
  REQUIRE_THROWS_WITH(
      sampler.sample(d_logits.get(), 2, 10, one, Histories{{}}, {0}, d_out.get(), nullptr),
      QG_CONTAINS("2 rows but 1 configs"));
  REQUIRE_THROWS_WITH(
      sampler.sample(d_logits.get(), 1, 0, one, Histories{{}}, {0}, d_out.get(), nullptr),
      QG_CONTAINS("vocab"));
  REQUIRE_THROWS_WITH(
      sampler.sample(d_logits.get(), 1, 20, one, std::vector<int>{5}, {0}, d_out.get(), nullptr),
      QG_CONTAINS("slot 5 out of range"));
  c = SamplingConfig{};
  REQUIRE_THROWS_WITH(sampler.sample(d_logits.get(), 2, 10, {c, c}, std::vector<int>{1, 1}, {0, 0},
                                     d_out.get(), nullptr),
                      QG_CONTAINS("used by two rows"));
  REQUIRE_THROWS_WITH(sampler.reset_history(0, std::vector<int>(9, 1), nullptr),
                      QG_CONTAINS("capacity"));
  REQUIRE_THROWS_WITH(qg::cuda::GpuSampler(0, 4), QG_CONTAINS("slots"));
  REQUIRE_THROWS_WITH(
      qg::cuda::sample_tokens(d_logits.get(), 1, 20, nullptr, nullptr, false, d_out.get(), nullptr),
      QG_CONTAINS("null pointer"));
  const std::vector<SamplingRow> one_row = {device_row(SamplingConfig{}, 0, 0, 0)};
  DeviceBuffer<SamplingRow> d_row(1);
  d_row.upload(one_row);
  DeviceBuffer<unsigned char> workspace(qg::cuda::sampling_workspace_bytes(2));
  REQUIRE_THROWS_WITH(qg::cuda::sample_tokens(d_logits.get(), 2, 10, d_row.get(), nullptr, false,
                                              d_out.get(), nullptr, 0, 132, nullptr),
                      QG_CONTAINS("workspace"));
  REQUIRE_THROWS_WITH(qg::cuda::sample_tokens(
                          d_logits.get(), 2, 10, d_row.get(), nullptr, false, d_out.get(),
                          workspace.get(), qg::cuda::sampling_workspace_bytes(2) - 1, 132, nullptr),
                      QG_CONTAINS("sampling_workspace_bytes(2)"));
  // After the errors the sampler still works.
  CHECK(sampler.sample_to_host(d_logits.get(), 1, 20, one, Histories{{}}, {0}, nullptr)[0] >= 0);
}

TEST_CASE("GPU split sampling equals one block per row and the CPU's kept set", "[sampling]") {
  // 1: one block per row; 132: an H100's grid (128 blocks for one row of 130528); 100000: as
  // many blocks per row as the chunk limits allow, whatever the batch.
  const int sms_choices[] = {1, 132, 100000};
  for (const int vocab : {1, 7, 1000, 4099, 100003, 130528}) {
    INFO("vocab " << vocab);
    const auto u = static_cast<std::uint32_t>(vocab);
    // Normal (bench-like), quantised (exact ties, also at the maximum), sharp, flat, NaN.
    std::vector<std::vector<float>> kinds = {
        random_logits(vocab, u + 1, 2.5f), random_logits(vocab, u + 2, 2.0f, 0.25f),
        random_logits(vocab, u + 3, 8.0f),
        std::vector<float>(static_cast<std::size_t>(vocab), 0.5f),
        random_logits(vocab, u + 4, 1.0f)};
    kinds.back()[static_cast<std::size_t>(vocab) / 3] = std::numeric_limits<float>::quiet_NaN();
    const int big_k = std::max(1, std::min(5000, vocab - 1));
    const std::vector<SamplingConfig> configs = {
        sampling(0.95f, 0.7f, 0, 1.1f, 1),
        sampling(1.0f, 1.0f, 0, 1.0f, 2),
        sampling(0.5f, 0.01f, 0, 1.0f, 3),
        sampling(1.5f, 0.7f, 40, 1.2f, 4),
        sampling(1.0f, 1.0f, 1, 1.0f, 5),
        sampling(0.8f, 0.9f, big_k, 1.0f, 6),
        sampling(1.0f, 1.0f, 40, 0.8f, 7),
        sampling(2.0f, 0.99f, 0, 1.0f, 8),
        sampling(0.7f, 1.0f, vocab > 1 ? vocab - 1 : 0, 1.0f, 9),
        greedy(1.3f),
        greedy()};
    constexpr int kSteps = 4;
    // Seen tokens: 100 ids over the whole range (and a few outside it) plus each row's top 5.
    std::vector<float> flat;
    std::vector<int> flat_history;
    std::vector<SamplingRow> rows;
    std::vector<std::size_t> kind_of, config_of;
    std::vector<std::vector<int>> kind_history;
    for (std::size_t k = 0; k < kinds.size(); ++k) {
      std::mt19937 rng(static_cast<std::uint32_t>(k) + u);
      std::uniform_int_distribution<int> id(-2, vocab + 1);
      std::vector<int> h(100);
      for (int& t : h) t = id(rng);
      std::vector<int> order(static_cast<std::size_t>(vocab));
      for (int i = 0; i < vocab; ++i) order[static_cast<std::size_t>(i)] = i;
      const auto& row = kinds[k];
      const std::size_t top = std::min<std::size_t>(5, order.size());
      std::partial_sort(order.begin(), order.begin() + static_cast<std::ptrdiff_t>(top),
                        order.end(), [&](int a, int b) {
                          return row[static_cast<std::size_t>(a)] >
                                 row[static_cast<std::size_t>(b)];
                        });
      h.insert(h.end(), order.begin(), order.begin() + static_cast<std::ptrdiff_t>(top));
      kind_history.push_back(h);
    }
    for (std::size_t k = 0; k < kinds.size(); ++k) {
      for (std::size_t c = 0; c < configs.size(); ++c) {
        const auto& h = kind_history[k];
        const int begin = static_cast<int>(flat_history.size());
        flat_history.insert(flat_history.end(), h.begin(), h.end());
        for (int step = 0; step < kSteps; ++step) {
          flat.insert(flat.end(), kinds[k].begin(), kinds[k].end());
          rows.push_back(device_row(configs[c], static_cast<std::uint64_t>(step), begin,
                                    static_cast<int>(h.size())));
          kind_of.push_back(k);
          config_of.push_back(c);
        }
      }
    }
    DeviceBatch batch(flat, vocab, rows, flat_history);
    const std::vector<int> reference = batch.one_block();
    for (const int sms : sms_choices) {
      INFO("num_sms " << sms << ", " << rows.size() << " rows");
      CHECK(batch.split(sms) == reference);
    }
    // Batches of 1 and 3 with an H100's grid: many blocks per row.
    for (std::size_t r = 0; r + 3 <= rows.size(); r += 13) {
      INFO("rows from " << r);
      const auto at = static_cast<std::ptrdiff_t>(r);
      const auto v = static_cast<std::ptrdiff_t>(vocab);
      for (const std::size_t n : {std::size_t{1}, std::size_t{3}}) {
        DeviceBatch part(
            std::vector<float>(flat.begin() + at * v,
                               flat.begin() + (at + static_cast<std::ptrdiff_t>(n)) * v),
            vocab,
            std::vector<SamplingRow>(rows.begin() + at,
                                     rows.begin() + at + static_cast<std::ptrdiff_t>(n)),
            flat_history);
        const std::vector<int> got = part.split(132);
        CHECK(got == std::vector<int>(reference.begin() + at,
                                      reference.begin() + at + static_cast<std::ptrdiff_t>(n)));
      }
    }
    // Against the CPU: greedy and top_k = 1 exactly, every draw inside the kept set.
    for (std::size_t k = 0; k < kinds.size(); ++k) {
      for (std::size_t c = 0; c < configs.size(); ++c) {
        INFO("row kind " << k << ", config " << c);
        const std::vector<double> p = kept_distribution(kinds[k], configs[c], kind_history[k]);
        const int cpu = cpu_pick(kinds[k], configs[c], kind_history[k]);
        for (std::size_t r = 0; r < rows.size(); ++r) {
          if (kind_of[r] != k || config_of[r] != c) continue;
          const int t = reference[r];
          REQUIRE(t >= 0);
          REQUIRE(t < vocab);
          if (!configs[c].do_sample || configs[c].top_k == 1) {
            CHECK(t == cpu);
          } else {
            CHECK(p[static_cast<std::size_t>(t)] > 0);
          }
        }
      }
    }
  }
}

TEST_CASE("GPU split sampling replays from a CUDA graph", "[sampling]") {
  const int vocab = 130528;
  const std::vector<float> row = random_logits(vocab, 123, 2.5f);
  std::vector<float> flat;
  std::vector<SamplingRow> rows;
  const std::vector<int> history = random_history(vocab, 124, 100);
  for (int r = 0; r < 3; ++r) {
    flat.insert(flat.end(), row.begin(), row.end());
    rows.push_back(device_row(r == 2 ? greedy(1.1f) : sampling(0.95f, 0.7f, 40 * r, 1.1f, 3),
                              static_cast<std::uint64_t>(r), 0, 100));
  }
  DeviceBatch batch(flat, vocab, rows, history);
  const std::vector<int> expect = batch.one_block();
  const std::size_t bytes = qg::cuda::sampling_workspace_bytes(3);
  DeviceBuffer<unsigned char> workspace(bytes);
  DeviceBuffer<int> out(3);
  cudaStream_t stream;
  QG_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  cudaGraph_t graph;
  QG_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
  qg::cuda::sample_tokens(batch.logits.get(), 3, vocab, batch.d_rows.get(), batch.history.get(),
                          true, out.get(), workspace.get(), bytes, 132, stream);
  QG_CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec;
  QG_CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  for (int replay = 0; replay < 3; ++replay) {
    QG_CUDA_CHECK(cudaMemsetAsync(out.get(), 0xff, 3 * sizeof(int), stream));
    QG_CUDA_CHECK(cudaGraphLaunch(exec, stream));
    QG_CUDA_CHECK(cudaStreamSynchronize(stream));
    CHECK(out.download() == expect);
  }
  cudaGraphExecDestroy(exec);
  cudaGraphDestroy(graph);
  cudaStreamDestroy(stream);
}
