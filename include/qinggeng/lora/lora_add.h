// The LoRA update y += scale * (x A^T) B^T on host float32 data, for a batch whose rows each
// pick their own adapter (or none). This is the reference the CUDA kernels (cuda/lora.h) are
// tested against; it never forms B A or a [tokens, out] delta, only one [r] vector per row.
#pragma once

#include <cstdint>
#include <vector>

namespace qg::lora {

/// \brief One adapter's factors for one linear layer, borrowed (not owned).
///
/// A is [rank, in] and B is [out, rank], row-major, as PEFT stores lora_A / lora_B. An entry
/// with rank 0 stands for "this adapter does not touch this layer": its rows are left as is.
struct LoraFactors {
  const float* a = nullptr;  ///< [rank, in]
  const float* b = nullptr;  ///< [out, rank]
  std::int64_t rank = 0;
  float scale = 0.0f;        ///< lora_alpha / r (or lora_alpha / sqrt(r) with rsLoRA)
};

/// \brief y[t] += adapters[a].scale * (x[t] A_a^T) B_a^T for every row t with
/// a = adapter_of_row[t] >= 0; rows with -1 are untouched.
///
/// \param x [tokens, in] row-major
/// \param y [tokens, out] row-major, updated in place
/// \param adapters factors indexed by adapter id; every non-empty entry must have its A and B
/// \param adapter_of_row [tokens] adapter id per row, -1 for none
/// \throws qg::Error naming the row for an id outside [-1, adapters.size()), or naming the
///         adapter when its factors are missing.
void lora_add(const float* x, std::int64_t tokens, std::int64_t in, float* y, std::int64_t out,
              const std::vector<LoraFactors>& adapters, const std::int32_t* adapter_of_row);

}  // namespace qg::lora
