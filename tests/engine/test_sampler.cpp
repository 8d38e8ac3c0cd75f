// Sampler: greedy, repetition penalty, temperature, top-k, top-p, seeding, invalid scores.
#include <cmath>
#include <map>
#include <set>
#include <vector>

#include "catch.hpp"
#include "qinggeng/engine/sampler.h"
#include "qinggeng/error.h"

using namespace qg::engine;

TEST_CASE("greedy picks the argmax, first on ties") {
  SamplingConfig c;
  c.do_sample = false;
  Sampler s(c);
  std::vector<float> logits = {0.1f, 2.0f, -1.0f, 2.0f};
  CHECK(s.sample(logits, {}) == 1);
}

TEST_CASE("repetition penalty divides positive and multiplies negative scores of seen tokens") {
  SamplingConfig c;
  c.do_sample = false;
  c.repetition_penalty = 2.0f;
  Sampler s(c);
  // token 0: 3.0 -> 1.5 (seen); token 1: 2.0 (unseen) wins; token 2: -1 -> -2 (seen).
  std::vector<float> logits = {3.0f, 2.0f, -1.0f};
  CHECK(s.sample(logits, {0, 2, 0}) == 1);
  CHECK(logits[0] == 1.5f);
  CHECK(logits[2] == -2.0f);
}

TEST_CASE("top-k 1 and tiny top-p are greedy, top-k limits the candidates") {
  std::vector<float> base = {1.0f, 3.0f, 2.5f, 0.5f, 2.9f};
  auto always_picks_argmax = [&](const SamplingConfig& config) {
    Sampler s(config);
    for (int i = 0; i < 20; ++i) {
      auto l = base;
      CHECK(s.sample(l, {}) == 1);
    }
  };
  SamplingConfig c;
  c.top_k = 1;
  c.top_p = 1.0f;
  always_picks_argmax(c);
  c.top_k = 0;
  c.top_p = 0.01f;
  always_picks_argmax(c);
  c.top_k = 3;
  c.top_p = 1.0f;
  c.temperature = 5.0f;  // flat: every kept token shows up
  Sampler k3(c);
  std::set<int> seen;
  for (int i = 0; i < 400; ++i) {
    auto l = base;
    seen.insert(k3.sample(l, {}));
  }
  CHECK(seen == std::set<int>{1, 2, 4});
}

TEST_CASE("top-p keeps the smallest set reaching the mass") {
  // Probabilities 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps {0, 1}; 0.85 keeps {0, 1, 2}.
  const std::vector<float> base = {std::log(0.5f), std::log(0.3f), std::log(0.15f), std::log(0.05f)};
  for (auto [top_p, expect] : std::vector<std::pair<float, std::set<int>>>{{0.7f, {0, 1}}, {0.85f, {0, 1, 2}}}) {
    SamplingConfig c;
    c.temperature = 1.0f;
    c.top_p = top_p;
    c.seed = 3;
    Sampler s(c);
    std::map<int, int> counts;
    for (int i = 0; i < 2000; ++i) {
      auto l = base;
      counts[s.sample(l, {})]++;
    }
    std::set<int> keys;
    for (auto& kv : counts) keys.insert(kv.first);
    CHECK(keys == expect);
    if (top_p == 0.7f) CHECK(std::abs(counts[0] / 2000.0 - 0.5 / 0.8) < 0.05);  // renormalised
  }
}

TEST_CASE("the same seed gives the same draws and non-finite logits fall back as in ChatGLM") {
  SamplingConfig c;
  c.top_p = 1.0f;
  c.temperature = 1.0f;
  c.seed = 42;
  Sampler a(c), b(c);
  std::vector<float> base(50);
  for (int i = 0; i < 50; ++i) base[i] = static_cast<float>(i % 7) * 0.3f;
  for (int i = 0; i < 30; ++i) {
    auto la = base, lb = base;
    REQUIRE(a.sample(la, {}) == b.sample(lb, {}));
  }
  std::vector<float> bad(10, 0.0f);
  bad[2] = NAN;
  CHECK(a.sample(bad, {}) == 5);
}

TEST_CASE("sampling settings are validated") {
  SamplingConfig c;
  c.temperature = 0.0f;
  REQUIRE_THROWS_AS(Sampler(c), qg::Error);
  c = {};
  c.top_p = 1.5f;
  REQUIRE_THROWS_WITH(Sampler(c), QG_CONTAINS("top_p"));
  c = {};
  c.top_k = -1;
  REQUIRE_THROWS_AS(Sampler(c), qg::Error);
  c = {};
  c.repetition_penalty = 0.0f;
  REQUIRE_THROWS_AS(Sampler(c), qg::Error);
}
