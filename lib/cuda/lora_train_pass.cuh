// What the two implementations of the LoRA training passes share (lora_train.cu: the SIMT
// passes and the entry points; lora_train_mma.cu: the tensor-core passes): the arguments of
// one pass over a [tokens, width] fp16 matrix, its launch shape, and the dropout mask drawn on
// the device (reference_backward.h's dropout_keep, bit for bit). lora_train.cu's file comment
// describes the passes.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qinggeng/counter_hash.h"

namespace qg::cuda::lora_pass {

/// The dropout of one call (threshold 0: none).
struct Dropout {
  std::uint64_t seed = 0;
  std::uint32_t threshold = 0;                 ///< keep iff the top 24 hash bits >= threshold
  float keep_scale = 1.0f;                     ///< 1 / (1 - p), computed in float as the CPU does
  const std::uint64_t* row_seed = nullptr;     ///< [tokens] added to seed, or null
  const std::int32_t* row_position = nullptr;  ///< [tokens] row within its example, or null
};

/// Everything one pass reads and writes: any of shrink, outer and expand over `in` / `out`.
struct PassArgs {
  const __half* in = nullptr;  ///< [tokens, width] (shrink, outer)
  __half* out = nullptr;       ///< [tokens, width] updated in place (expand)
  std::int64_t tokens = 0, width = 0;
  const float* w = nullptr;  ///< the factor: W(j, r) = w[r * w_r + j * w_j]
  std::int64_t w_r = 0, w_j = 0;
  bool w_vec4 = false;  ///< w is 16-byte aligned and its contiguous runs hold whole float4s
  int rank = 0;
  Dropout drop;                  ///< applies to in and to expand's update (index t * width + j)
  const float* s = nullptr;      ///< [tokens][rank] (outer, expand)
  float* shrink_part = nullptr;  ///< [shrink parts][tokens][rank] (shrink)
  float* outer_part = nullptr;   ///< [token blocks][width][rank] (outer)
  std::int64_t tokens_per_block = 0;
  float scale = 1.0f;  ///< expand
};

/// The launch shape of a pass over `width` columns: fixed by the sizes alone, so every GPU
/// adds the same partials in the same order.
struct PassGrid {
  std::int64_t col_blocks = 0, token_blocks = 0, tokens_per_block = 0;
  std::int64_t parts_per_col_block = 1;  ///< shrink partials each column block writes
  std::int64_t shrink_parts() const { return col_blocks * parts_per_col_block; }
};

// ---- the tensor-core passes (lora_train_mma.cu) ----

/// Largest rank the tensor-core passes take.
constexpr int kMmaMaxRank = 16;

/// Their launch shape for `tokens` x `width`.
PassGrid mma_pass_grid(std::int64_t tokens, std::int64_t width);

/// An upper bound of mma_pass_grid(...).token_blocks that never decreases with tokens.
std::int64_t mma_token_blocks_bound(std::int64_t tokens, std::int64_t width);

/// Runs one tensor-core pass (args.rank <= kMmaMaxRank; args.tokens_per_block from `grid`).
void launch_mma_pass(const PassArgs& args, const PassGrid& grid, bool shrink, bool outer,
                     bool expand, cudaStream_t stream);

// ---- the dropout mask on the device ----

/// The mask of one row: its stream key and the index of its first element.
struct RowMask {
  std::uint64_t key = 0, base = 0;
};

__device__ __forceinline__ RowMask row_mask(const Dropout& d, std::int64_t t, std::int64_t width) {
  RowMask m;
  if (d.threshold == 0) return m;
  m.key = splitmix64(d.seed + (d.row_seed != nullptr ? d.row_seed[t] : 0));
  const std::int64_t row = d.row_position != nullptr ? d.row_position[t] : t;
  m.base = static_cast<std::uint64_t>(row * width);
  return m;
}

/// What dropout multiplies element j of a row by: 0 or keep_scale (1 without dropout).
__device__ __forceinline__ float dropout_factor(const Dropout& d, const RowMask& m,
                                                std::int64_t j) {
  if (d.threshold == 0) return 1.0f;
  const std::uint32_t bits = counter_bits32(m.key, m.base + static_cast<std::uint64_t>(j)) >> 8;
  return bits >= d.threshold ? d.keep_scale : 0.0f;
}

}  // namespace qg::cuda::lora_pass
