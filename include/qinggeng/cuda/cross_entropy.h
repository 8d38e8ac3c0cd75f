// Fused vocabulary cross-entropy of a training step on the GPU: the loss of
// logits = hidden lm_head^T against next-token targets and its gradient, without the
// [tokens, vocab] fp32 logits of the whole batch ever existing. Rows are processed in chunks:
// for a chunk, logits = hidden_c lm_head^T (gemm_f16, fp32 out), one row kernel takes the
// log-sum-exp, the NLL and dlogits = (softmax - onehot) * grad_scale / normalizer (fp16), then
// dhidden_c = dlogits lm_head (gemm_f16_nn) and, in full-parameter training,
// dlm_head += dlogits^T hidden_c (gemm_f16_tn).
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace qg::cuda {

/// \brief Blocking and scaling of cross_entropy_train.
struct CrossEntropyTrainOptions {
  std::int64_t row_chunk = 512;  ///< rows whose logits are held at once (fp32 + fp16 copy)
  double normalizer = 1.0;       ///< the loss gradient is divided by this (scored tokens)
  float grad_scale = 1.0f;       ///< and multiplied by this (the fp16 loss scale)
};

/// \brief Device scratch bytes cross_entropy_train needs.
std::size_t cross_entropy_train_workspace_bytes(std::int64_t rows, std::int64_t vocab,
                                                const CrossEntropyTrainOptions& options);

/// \brief NLL per row and, when asked, the gradients.
/// \param hidden fp16 [rows, hidden_size] final normed hidden states
/// \param lm_head fp16 [vocab, hidden_size]
/// \param targets device int32 [rows]: target id, or -100 (kIgnoreLabel) for no target
/// \param row_nll float [rows] out: -log softmax(logits)[target], 0 for ignored rows
/// \param dhidden fp16 [rows, hidden_size] overwritten with the scaled gradient, or null
///        (loss only: no backward work at all)
/// \param dlm_head float [vocab, hidden_size] accumulated, or null
/// \throws qg::Error for bad sizes, null pointers or a short workspace. A target outside
/// [0, vocab) that is not -100 gives a NaN row_nll (the caller validates targets).
void cross_entropy_train(const __half* hidden, const __half* lm_head, const int* targets,
                         std::int64_t rows, std::int64_t hidden_size, std::int64_t vocab,
                         const CrossEntropyTrainOptions& options, float* row_nll,
                         __half* dhidden, float* dlm_head, void* workspace,
                         std::size_t workspace_bytes, cudaStream_t stream);

}  // namespace qg::cuda
