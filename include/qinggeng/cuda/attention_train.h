// GLM self-attention of a training step on the GPU: a batch of whole sequences packed row
// after row (no KV cache), forward that keeps the log-sum-exp the backward needs, and the
// FlashAttention-2 style backward. The mask is GLM's: query i of a sequence sees key j of the
// same sequence iff j < context_length or j <= i (bidirectional prefix, causal tail).
//
// Activations use the fused projection layout of ChatGLM: qkv rows are [T, 3 * heads *
// head_dim] with, per head, consecutive q, k and v slices of head_dim; out and its gradient are
// [T, heads * head_dim]. The 2-D rotary is its own in-place kernel (glm_rotary_qkv): the
// forward rotates q and k of qkv before attention_train_forward; the backward rotates dq and dk
// of dqkv back (the inverse rotation) after attention_train_backward, or lets
// attention_train_backward hand them back inverse-rotated (the same bits, one pass less).
// fp16 storage, fp32 softmax statistics and accumulation; head_dim 16, 32, 64 or 128.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace qg::cuda {

/// \brief A packed batch of training sequences (device int32 arrays).
struct TrainAttentionBatch {
  int num_seqs = 0;
  int total_tokens = 0;                 ///< rows of qkv / out: every sequence's tokens in order
  int max_seq_len = 0;                  ///< longest sequence (sizes the grid)
  const int* row_start = nullptr;       ///< [num_seqs + 1] first row of each sequence, then T
  const int* context_length = nullptr;  ///< [num_seqs] GLM prefix length, in [0, length]
};

/// \brief Each row's rotary positions (device int32 [total_tokens] each): the first half of a
/// head turns by positions[t], the second by block_positions[t].
struct TrainRotaryPositions {
  const int* positions = nullptr;
  const int* block_positions = nullptr;
};

/// \brief Rotates q and k of every row of `qkv` in place, rotate_half style within each half
/// of a head: the first half of each head by positions[t], the second half by
/// block_positions[t], with the frequencies of model/rotary.h (glm_rotary_inv_freq, the
/// fp16-rounded table of the release). `inverse` rotates by the negated angles: the backward
/// of the rotation applied to the dq, dk slices of a dqkv gradient. v slices are untouched.
/// \param positions, block_positions device int32 [tokens]
/// \throws qg::Error for null pointers, non-positive sizes or an odd/unsupported head_dim.
void glm_rotary_qkv(__half* qkv, std::int64_t tokens, int heads, int head_dim,
                    const int* positions, const int* block_positions, bool inverse,
                    cudaStream_t stream);

/// \brief out = softmax(q k^T / sqrt(head_dim) + GLM mask) v for every sequence and head.
/// \param qkv [total_tokens, 3 * heads * head_dim] fp16 (q and k already rotated)
/// \param out [total_tokens, heads * head_dim] fp16
/// \param lse [total_tokens, heads] float: natural log-sum-exp of each row's scaled, masked
///        scores (as reference_backward.h's glm_attention_forward)
/// \throws qg::Error for an unsupported head_dim, null pointers or an empty batch.
void attention_train_forward(const __half* qkv, const TrainAttentionBatch& batch, int heads,
                             int head_dim, __half* out, float* lse, cudaStream_t stream);

/// \brief Bytes of scratch attention_train_backward needs: fp32 dq accumulators, the per-row
/// D = dout . out, and the dq reduction's counters (16 bytes per (row, head); only each query
/// tile's first row is used, which keeps the indexing simple).
std::size_t attention_train_backward_workspace_bytes(int total_tokens, int heads, int head_dim);

/// \brief Backward of attention_train_forward: writes dq, dk, dv of every row into `dqkv`
/// (overwritten, the qkv layout), with P recomputed from lse.
/// \param dout [total_tokens, heads * head_dim] fp16 gradient of `out`
/// \param workspace device memory of attention_train_backward_workspace_bytes(...)
/// \param inverse_rotary when its positions are set, dq and dk come out turned back by the
///        rotary of those positions: bit for bit what glm_rotary_qkv(dqkv, ..., inverse = true)
///        would make of the unrotated result (both positions or neither).
void attention_train_backward(const __half* qkv, const __half* out, const float* lse,
                              const __half* dout, const TrainAttentionBatch& batch, int heads,
                              int head_dim, __half* dqkv, void* workspace,
                              std::size_t workspace_bytes, cudaStream_t stream,
                              const TrainRotaryPositions& inverse_rotary = {});

}  // namespace qg::cuda
