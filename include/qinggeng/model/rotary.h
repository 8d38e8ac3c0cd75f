// The GLM 2-D rotary embedding's frequency table, shared by every implementation of the
// forward and backward passes (CPU reference, training reference).
#pragma once

#include <vector>

namespace qg::model {

/// \brief inv_freq[j] = 10000^(-2j / rot_dim) for j < rot_dim / 2, rounded through fp16 as the
/// released model's half-precision buffer holds it (THUDM's code builds it with .half()).
/// \throws qg::Error unless rot_dim is positive and even.
std::vector<float> glm_rotary_inv_freq(int rot_dim);

}  // namespace qg::model
