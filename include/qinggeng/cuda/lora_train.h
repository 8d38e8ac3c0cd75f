// LoRA of a training step on the GPU: the adapted linear's extra term with inverted dropout,
// y += scale * dropout(x) A^T B^T, and its backward into dx, dA and dB. The factors are the
// fp32 master copies the optimizer updates (tiny: rank x in, out x rank), read directly by the
// kernels; activations are fp16 with fp32 accumulation; nothing larger than [tokens, rank] is
// formed. The dropout mask is the counter-based one of reference_backward.h (dropout_keep:
// a hash of the seed and the element index t * in + i, qinggeng/counter_hash.h), so CPU and
// GPU draw the same mask and the backward redraws it instead of storing it.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace qg::cuda {

/// \brief Which kernels run the passes over the activations.
enum class LoraTrainKernels {
  Auto,  ///< the default: Simt, until the tensor-core passes are timed on a GPU
  Simt,  ///< fp32 FMAs, a few columns a thread (every rank)
  /// mma.sync over shared-memory tiles (sm_80+), the fp32 factors and [tokens, rank] sums split
  /// into two fp16 halves, so results stay within fp32 rounding; ranks up to 16 (larger ranks
  /// run Simt).
  TensorCores,
};

/// \brief One adapted linear of a training step.
struct LoraTrainShape {
  std::int64_t tokens = 0;
  std::int64_t in = 0;     ///< multiple of 8
  std::int64_t out = 0;    ///< multiple of 8
  std::int64_t rank = 0;   ///< 1..64
  float scale = 1.0f;      ///< lora_alpha / r
  float dropout = 0.0f;    ///< drop probability in [0, 1); 0 disables dropout
  std::uint64_t seed = 0;  ///< the mask (reference_backward.h's LoraShape::seed)
  /// Packed examples in one call (both null: one example, row t draws with `seed`). When set,
  /// device arrays [tokens]: row t draws its mask as its own example would, with seed
  /// `seed + row_seed[t]` (wrapping) and element index `row_position[t] * in + i`, where
  /// row_position[t] is t's row within its example.
  const std::uint64_t* row_seed = nullptr;
  const std::int32_t* row_position = nullptr;
  LoraTrainKernels kernels = LoraTrainKernels::Auto;
};

/// \brief Scratch bytes lora_train_forward / lora_train_backward need for `shape` (partial
/// sums over column and token blocks, reduced in a fixed order: results are deterministic).
/// Never decreases with shape.tokens, so a workspace sized for the largest call of a layer
/// serves the smaller ones.
std::size_t lora_train_workspace_bytes(const LoraTrainShape& shape);

/// \brief u = dropout(x) A^T (fp32, unscaled, kept for the backward), then
/// y += scale * u B^T (fp16, rounded once).
/// \param x fp16 [tokens, in];  a float [rank, in];  b float [out, rank]
/// \param y fp16 [tokens, out], updated in place;  u float [tokens, rank], overwritten
/// \throws qg::Error for bad sizes, null pointers or a short workspace.
void lora_train_forward(const __half* x, const float* a, const float* b,
                        const LoraTrainShape& shape, __half* y, float* u, void* workspace,
                        std::size_t workspace_bytes, cudaStream_t stream);

/// \brief Columns of the fp16 low-rank operands of lora_train_shrink: rank rounded up to 8.
std::int64_t lora_train_low_rank_width(std::int64_t rank);

/// \brief The forward without its expand, for a base GEMM that adds the term itself (gemm_f16
/// with GemmLowRank{u16, v16, lora_train_low_rank_width(rank)}, so y is rounded once): u as
/// lora_train_forward computes it, plus the GEMM's operands u16 = fp16(u) and
/// v16 = fp16(scale * B), zero beyond `rank` columns.
/// \param u float [tokens, rank], overwritten (kept for the backward)
/// \param u16 fp16 [tokens, width], v16 fp16 [out, width], overwritten; 16-byte aligned
/// \throws qg::Error as lora_train_forward, or for misaligned u16 / v16.
void lora_train_shrink(const __half* x, const float* a, const float* b, const LoraTrainShape& shape,
                       float* u, __half* u16, __half* v16, void* workspace,
                       std::size_t workspace_bytes, cudaStream_t stream);

/// \brief Backward with v = dy B (fp32 [tokens, rank]):
///   db += scale * dy^T u;  da += scale * v^T dropout(x);  dx += dropout'(scale * v A)
/// where dropout' zeroes dropped elements and scales kept ones by 1 / (1 - p).
/// \param dx fp16 [tokens, in] updated in place, or null;  da [rank, in], db [out, rank]
///        float, accumulated, either may be null
void lora_train_backward(const __half* x, const float* a, const float* b, const float* u,
                         const __half* dy, const LoraTrainShape& shape, __half* dx, float* da,
                         float* db, void* workspace, std::size_t workspace_bytes,
                         cudaStream_t stream);

}  // namespace qg::cuda
