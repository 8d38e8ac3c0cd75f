// Sampler (see include/qinggeng/engine/sampler.h).
#include "qinggeng/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_set>

#include "qinggeng/error.h"

namespace qg::engine {

void SamplingConfig::validate() const {
  QG_CHECK(temperature > 0.0f && std::isfinite(temperature), "sampling: temperature must be > 0, got ",
           temperature);
  QG_CHECK(top_p > 0.0f && top_p <= 1.0f, "sampling: top_p must be in (0, 1], got ", top_p);
  QG_CHECK(top_k >= 0, "sampling: top_k must be >= 0, got ", top_k);
  QG_CHECK(repetition_penalty > 0.0f && std::isfinite(repetition_penalty),
           "sampling: repetition_penalty must be > 0, got ", repetition_penalty);
}

Sampler::Sampler(const SamplingConfig& config) : config_(config), rng_(config.seed) {
  config_.validate();
}

int argmax(const float* values, std::size_t n) {
  return static_cast<int>(std::max_element(values, values + n) - values);
}

int Sampler::sample(std::vector<float>& logits, const std::vector<int>& history) {
  QG_CHECK(!logits.empty(), "sampler: empty logits");
  const std::size_t V = logits.size();
  // ChatGLM's InvalidScoreLogitsProcessor: NaN/inf scores -> all zero except token 5.
  if (std::any_of(logits.begin(), logits.end(), [](float x) { return !std::isfinite(x); })) {
    std::fill(logits.begin(), logits.end(), 0.0f);
    if (V > 5) logits[5] = 5e4f;
  }
  if (config_.repetition_penalty != 1.0f) {
    std::unordered_set<int> seen;
    for (int t : history) {
      if (t < 0 || static_cast<std::size_t>(t) >= V || !seen.insert(t).second) continue;
      float& x = logits[static_cast<std::size_t>(t)];
      x = x < 0 ? x * config_.repetition_penalty : x / config_.repetition_penalty;
    }
  }
  if (!config_.do_sample) return argmax(logits.data(), V);

  for (float& x : logits) x /= config_.temperature;
  // Candidates sorted by score, descending (stable on index for reproducibility).
  std::vector<int> order(V);
  std::iota(order.begin(), order.end(), 0);
  std::size_t keep = V;
  if (config_.top_k > 0) keep = std::min<std::size_t>(keep, static_cast<std::size_t>(config_.top_k));
  auto by_score = [&](int a, int b) {
    return logits[static_cast<std::size_t>(a)] > logits[static_cast<std::size_t>(b)] ||
           (logits[static_cast<std::size_t>(a)] == logits[static_cast<std::size_t>(b)] && a < b);
  };
  std::sort(order.begin(), order.end(), by_score);
  order.resize(keep);

  const float max_logit = logits[static_cast<std::size_t>(order[0])];
  std::vector<double> probs(order.size());
  double total = 0;
  for (std::size_t i = 0; i < order.size(); ++i) {
    probs[i] = std::exp(static_cast<double>(logits[static_cast<std::size_t>(order[i])] - max_logit));
    total += probs[i];
  }
  if (config_.top_p < 1.0f) {
    // Keep the smallest prefix whose mass reaches top_p (always at least one token).
    double mass = 0;
    std::size_t cut = order.size();
    for (std::size_t i = 0; i < order.size(); ++i) {
      mass += probs[i] / total;
      if (mass >= config_.top_p) {
        cut = i + 1;
        break;
      }
    }
    order.resize(cut);
    probs.resize(cut);
  }
  std::discrete_distribution<std::size_t> pick(probs.begin(), probs.end());
  return order[pick(rng_)];
}

}  // namespace qg::engine
