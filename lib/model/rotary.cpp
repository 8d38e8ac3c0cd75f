// glm_rotary_inv_freq (see include/qinggeng/model/rotary.h).
#include "qinggeng/model/rotary.h"

#include <cmath>

#include "qinggeng/error.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::model {

std::vector<float> glm_rotary_inv_freq(int rot_dim) {
  QG_CHECK(rot_dim > 0 && rot_dim % 2 == 0, "glm_rotary_inv_freq: rot_dim ", rot_dim,
           " must be positive and even");
  std::vector<float> f(static_cast<std::size_t>(rot_dim / 2));
  for (int j = 0; j < rot_dim / 2; ++j) {
    const double exact = std::pow(10000.0, -2.0 * j / rot_dim);
    f[static_cast<std::size_t>(j)] = half_to_float(float_to_half(static_cast<float>(exact)));
  }
  return f;
}

}  // namespace qg::model
