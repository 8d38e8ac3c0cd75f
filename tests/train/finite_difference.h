// Finite-difference gradient checks shared by the training tests: central differences on
// float32 parameters, compared with an analytic gradient by norm-wise relative error.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <functional>
#include <vector>

namespace qg::test {

/// d loss / d value by central differences; the step is what float32 actually represents.
inline double central_difference(float& value, const std::function<double()>& loss, float eps) {
  const float saved = value;
  value = saved + eps;
  const float up = value;
  const double loss_up = loss();
  value = saved - eps;
  const float down = value;
  const double loss_down = loss();
  value = saved;
  return (loss_up - loss_down) / (static_cast<double>(up) - static_cast<double>(down));
}

/// ||numeric - analytic|| / max(||numeric||, ||analytic||) over the coordinates `indices` of
/// `values` (every coordinate when empty).
inline double gradient_error(std::vector<float>& values, const float* analytic,
                             const std::function<double()>& loss, float eps = 1e-3f,
                             std::vector<std::size_t> indices = {}) {
  if (indices.empty()) {
    for (std::size_t i = 0; i < values.size(); ++i) indices.push_back(i);
  }
  double diff = 0, norm_numeric = 0, norm_analytic = 0;
  for (std::size_t i : indices) {
    const double numeric = central_difference(values[i], loss, eps);
    diff += (numeric - analytic[i]) * (numeric - analytic[i]);
    norm_numeric += numeric * numeric;
    norm_analytic += static_cast<double>(analytic[i]) * analytic[i];
  }
  const double scale = std::sqrt(std::max(norm_numeric, norm_analytic));
  return scale == 0 ? 0 : std::sqrt(diff) / scale;
}

}  // namespace qg::test
