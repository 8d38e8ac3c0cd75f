// CPU reference of every op of ChatGLM training: a forward that keeps what the backward needs,
// and the backward, as plain functions on host float32 arrays (row-major, token-major
// activations [tokens, features]). Written to be obviously right, single-threaded, with double
// accumulation in reductions: this is the oracle the CUDA backward kernels are tested against
// and the engine of qg-train --device cpu (see reference_model_grad.h).
//
// Conventions shared by every backward here:
//  - gradients are ADDED into their outputs (callers zero them first), so contributions from
//    several uses of a tensor (residual branches, a tied lm_head) accumulate naturally;
//  - a null gradient pointer means "not wanted" and skips that work (a frozen weight's dW);
//  - sizes are checked and bad input throws qg::Error naming the op and the argument.
#pragma once

#include "qinggeng/model/rotary.h"
#include "qinggeng/train/dataset.h"

#include <cstdint>
#include <vector>

namespace qg::train {

// kIgnoreLabel, the label of a position without a target, comes from dataset.h.

// ---- linear -------------------------------------------------------------------------------

/// \brief y = x W^T (+ bias). x [tokens, in], W [out, in] (PyTorch layout), bias [out] or null,
/// y [tokens, out] (overwritten).
void linear_forward(const float* x, const float* w, const float* bias, std::int64_t tokens,
                    std::int64_t in, std::int64_t out, float* y);

/// \brief Backward of linear_forward: dx += dy W, dw += dy^T x, dbias += column sums of dy.
/// Any of dx, dw, dbias may be null (dW is only formed for trainable weights).
void linear_backward(const float* x, const float* w, const float* dy, std::int64_t tokens,
                     std::int64_t in, std::int64_t out, float* dx, float* dw, float* dbias);

// ---- LayerNorm ----------------------------------------------------------------------------

/// \brief y = (x - mean) * rstd * gamma + beta per row of x [rows, n]; saves mean[rows] and
/// rstd[rows] = 1 / sqrt(var + eps) (population variance) for the backward.
void layer_norm_forward(const float* x, const float* gamma, const float* beta, std::int64_t rows,
                        std::int64_t n, float eps, float* y, float* mean, float* rstd);

/// \brief Backward of layer_norm_forward: dx += ..., dgamma += sum dy * xhat, dbeta += sum dy
/// (any output may be null).
void layer_norm_backward(const float* x, const float* gamma, const float* mean, const float* rstd,
                         const float* dy, std::int64_t rows, std::int64_t n, float* dx,
                         float* dgamma, float* dbeta);

// ---- gelu and the GLM residual ------------------------------------------------------------

/// \brief y = gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), n elements.
void gelu_forward(const float* x, std::int64_t n, float* y);

/// \brief dx += gelu_tanh'(x) * dy (x is the gelu input).
void gelu_backward(const float* x, const float* dy, std::int64_t n, float* dx);

/// \brief out = a * alpha + b: GLM's residual from the normed input (alpha = sqrt(56)).
void scaled_residual_forward(const float* a, float alpha, const float* b, std::int64_t n,
                             float* out);

/// \brief Backward of scaled_residual_forward: da += alpha * dout, db += dout (either null).
void scaled_residual_backward(const float* dout, float alpha, std::int64_t n, float* da, float* db);

// ---- 2-D rotary ---------------------------------------------------------------------------

/// \brief The rotary frequency table (model/rotary.h).
using model::glm_rotary_inv_freq;

/// \brief Rotates q or k [tokens, heads * head_dim] in place, rotate_half style: the first
/// half of each head by positions[t], the second half by block_positions[t] (spec section 1).
void glm_rotary_forward(float* x, std::int64_t tokens, int heads, int head_dim,
                        const int* positions, const int* block_positions);

/// \brief Backward of glm_rotary_forward, in place on the gradient: the rotation is
/// orthogonal, so its backward is the inverse rotation (by the negated angles).
void glm_rotary_backward(float* dx, std::int64_t tokens, int heads, int head_dim,
                         const int* positions, const int* block_positions);

// ---- GLM attention ------------------------------------------------------------------------

/// \brief Geometry of one sequence's attention: `queries` new tokens at the end of `keys`
/// tokens (query i is token keys - queries + i; the earlier keys are past tokens).
struct GlmAttentionShape {
  int heads = 0;
  int head_dim = 0;
  int queries = 0;
  int keys = 0;
  int context_length = 0;  ///< GLM ctx: query i sees key j iff j < ctx or j <= its token index
};

/// \brief out = softmax(q k^T / sqrt(head_dim) + GLM mask) v per head, fp32 softmax with
/// double sums. q/out [queries, heads * head_dim]; k, v [keys, heads * head_dim] (q and k
/// already rotated). Saves lse [queries, heads]: the natural log-sum-exp of each row's scaled,
/// masked scores (the flash-attention statistic the backward recomputes P from).
void glm_attention_forward(const float* q, const float* k, const float* v,
                           const GlmAttentionShape& shape, float* out, float* lse);

/// \brief Backward of glm_attention_forward: with P recomputed from lse and
/// D_i = dout_i . out_i, dS = P (dout v^T - D); dq += dS k / sqrt(d), dk += dS^T q / sqrt(d),
/// dv += P^T dout. Any of dq, dk, dv may be null.
void glm_attention_backward(const float* q, const float* k, const float* v, const float* out,
                            const float* lse, const float* dout, const GlmAttentionShape& shape,
                            float* dq, float* dk, float* dv);

// ---- LoRA with dropout --------------------------------------------------------------------

/// \brief One LoRA-adapted linear of a training step: y += scale * dropout(x) A^T B^T.
struct LoraShape {
  std::int64_t tokens = 0;
  std::int64_t in = 0;
  std::int64_t out = 0;
  std::int64_t rank = 0;
  float scale = 1.0f;      ///< lora_alpha / r
  float dropout = 0.0f;    ///< drop probability p in [0, 1); 0 disables dropout
  std::uint64_t seed = 0;  ///< selects the dropout mask (see dropout_keep)
};

/// \brief Whether element `index` (t * in + i for x [tokens, in]) survives dropout of
/// probability p under `seed`: iff the top 24 of counter_bits32(splitmix64(seed), index)
/// (qinggeng/counter_hash.h), read as a fraction of 2^24, are >= p. A counter-based hash, so
/// the mask is reproducible, needs no state, and a GPU kernel draws the identical mask. Kept
/// elements are scaled by 1 / (1 - p) (inverted dropout).
bool dropout_keep(std::uint64_t seed, std::uint64_t index, float p);

/// \brief y [tokens, out] += scale * dropout(x) A^T B^T with A [rank, in], B [out, rank];
/// writes u [tokens, rank] = dropout(x) A^T (unscaled), which the backward needs for dB.
void lora_forward(const float* x, const float* a, const float* b, const LoraShape& shape, float* y,
                  float* u);

/// \brief Backward of lora_forward (the dropout mask is drawn again from the seed):
/// db += scale * dy^T u, da += scale * (dy B)^T dropout(x), dx += dropout'(scale * dy B A).
/// Any of dx, da, db may be null.
void lora_backward(const float* x, const float* a, const float* b, const float* u, const float* dy,
                   const LoraShape& shape, float* dx, float* da, float* db);

// ---- embedding ----------------------------------------------------------------------------

/// \brief out[t] = table[ids[t]], table [vocab, hidden].
/// \throws qg::Error naming the position of an id outside [0, vocab).
void embedding_forward(const float* table, std::int64_t vocab, std::int64_t hidden, const int* ids,
                       std::int64_t tokens, float* out);

/// \brief Backward of embedding_forward: dtable[ids[t]] += dout[t] (a scatter-add).
void embedding_backward(const int* ids, std::int64_t tokens, const float* dout, std::int64_t vocab,
                        std::int64_t hidden, float* dtable);

// ---- fused cross-entropy over the vocabulary ----------------------------------------------

/// \brief Blocking of fused_cross_entropy.
struct CrossEntropyOptions {
  std::int64_t row_chunk = 32;      ///< hidden rows per block
  std::int64_t vocab_chunk = 2048;  ///< vocabulary columns per block (logits held: rows x this)
  /// Divisor of the summed NLL and its gradient; 0 means the number of labelled rows (the
  /// mean). Gradient accumulation over micro-batches passes the tokens of the whole batch.
  double normalizer = 0;
};

/// \brief Loss of a fused_cross_entropy call.
struct CrossEntropyResult {
  double loss = 0;          ///< summed NLL / normalizer (0 when no row is labelled)
  std::int64_t tokens = 0;  ///< labelled rows
};

/// \brief Cross-entropy of logits = hidden lm_head^T against `targets`, without ever forming
/// the [tokens, vocab] logits: each block of rows is scored in vocabulary blocks with an
/// online log-sum-exp, then the blocks are recomputed for the gradient
/// dlogits = (softmax - onehot) / normalizer.
///
/// \param hidden [tokens, hidden_size] final (normed) hidden states
/// \param lm_head [vocab, hidden_size]
/// \param targets [tokens] target id per row, kIgnoreLabel for rows without a target (the
///        caller applies the next-token shift)
/// \param dhidden if not null, += dLoss/dhidden
/// \param dlm_head if not null, += dLoss/dlm_head
/// \throws qg::Error naming the row of a target outside [0, vocab) and not kIgnoreLabel.
CrossEntropyResult fused_cross_entropy(const float* hidden, const float* lm_head,
                                       const int* targets, std::int64_t tokens,
                                       std::int64_t hidden_size, std::int64_t vocab,
                                       const CrossEntropyOptions& options, float* dhidden,
                                       float* dlm_head);

}  // namespace qg::train
