// GLM self-attention on the GPU over the paged KV cache (kv_pool.h), fp16 in and out with
// fp32 softmax and accumulation. One call handles a batch of sequences, each with `past`
// cached tokens and `n` new ones whose q/k/v come from the qkv projection rows:
//
//   1. attention_append: 2-D rotary on q and k of every new token (first half of each head by
//      position, second half by block position, rotate_half within each half), rotated k and
//      v written into the cache, rotated q written to `out` (the kernels below read it there
//      and overwrite it with the result; every output tile is read before it is written by the
//      same thread block, so no scratch buffer is needed).
//   2. attention_prefill: FlashAttention-2 style kernel (mma.sync m16n8k16, online softmax) for
//      any n; the GLM mask lets query i see key j iff j < context_length or j <= i
//      (bidirectional prefix, causal tail); key tiles every query of a tile masks are skipped.
//   3. attention_decode: split-KV flash-decoding for n == 1 per sequence: every (sequence, head)
//      is cut into splits that each produce a partial softmax, then a combine kernel merges
//      them, so batch 1 still fills the GPU.
//
// attention_forward picks 2 or 3 after 1. head_dim must be 16, 32, 64 or 128 (compile-time
// tile shapes; ChatGLM-6B uses 128).
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "qinggeng/cuda/kv_pool.h"

namespace qg::cuda {

/// \brief Device-side description of one batched attention call (all pointers are device
/// memory, int32). Build it with AttentionMetadata.
struct AttentionBatch {
  int num_seqs = 0;
  int total_tokens = 0;     ///< rows of qkv and out: the new tokens of every sequence in order
  int max_new_tokens = 0;   ///< largest n of any sequence (1 for a decode step)
  int max_kv_len = 0;       ///< largest past + n of any sequence
  int max_blocks = 0;       ///< row length of block_tables
  const int* row_start = nullptr;        ///< [num_seqs + 1] first row of each sequence
  const int* past = nullptr;             ///< [num_seqs] tokens already cached
  const int* context_length = nullptr;   ///< [num_seqs] GLM prefix length
  const int* positions = nullptr;        ///< [total_tokens] first rotary position
  const int* block_positions = nullptr;  ///< [total_tokens] second rotary position
  const int* block_tables = nullptr;     ///< [num_seqs, max_blocks] block ids, -1 padded
  /// [1] optional, for replayable launches (CUDA graphs): when set, attention_decode splits
  /// the keys by this device value, and max_kv_len (on the host) is only an upper bound that
  /// sizes the grid; surplus split blocks exit at once. The split of a given length is the
  /// same either way, so results are bit-identical to a launch with the exact max_kv_len.
  const int* max_kv_len_on_device = nullptr;
};

/// \brief One sequence's part of a batched attention call, on the host.
struct AttentionSequence {
  int past = 0;                           ///< tokens already in the cache
  int context_length = 0;                 ///< GLM prefix length (>= 0)
  std::vector<int> positions;             ///< n first rotary positions (n = new tokens)
  std::vector<int> block_positions;       ///< n second rotary positions
  const std::vector<int>* block_table = nullptr;  ///< must cover past + n tokens
};

/// \brief Validates host sequence descriptions and uploads them as one packed int32 buffer
/// (one cudaMemcpyAsync from a pinned staging buffer).
///
/// The staging buffer is reused by the next build(), which first waits for the previous
/// upload to finish, so the returned batch's arrays stay valid until then.
class AttentionMetadata {
 public:
  AttentionMetadata() = default;
  ~AttentionMetadata();
  AttentionMetadata(const AttentionMetadata&) = delete;
  AttentionMetadata& operator=(const AttentionMetadata&) = delete;

  /// \brief Packs and uploads `seqs` on `stream`.
  /// \param block_size tokens per cache block (to check each table covers its sequence)
  /// \throws qg::Error naming the sequence and field for an empty batch, a sequence with no
  /// new tokens, mismatched position counts, negative past/context, or a block table that
  /// is missing or too short.
  AttentionBatch build(const std::vector<AttentionSequence>& seqs, int block_size,
                       cudaStream_t stream);

 private:
  void reserve(std::size_t ints);
  int* device_ = nullptr;
  int* pinned_ = nullptr;
  std::size_t capacity_ = 0;
  cudaEvent_t uploaded_ = nullptr;
};

/// \brief Step 1 (see the file comment): rotary on q and k, cache append of k and v, rotated q
/// into `out`.
/// \param qkv [total_tokens, 3 * num_heads * head_dim] fp16, per head (q, k, v) slices
/// \param out [total_tokens, num_heads * head_dim] fp16; receives rotated q
/// \throws qg::Error for a head_dim the kernels do not support or a pool of another shape.
void attention_append(const __half* qkv, const AttentionBatch& batch, const PagedKvLayer& kv,
                      __half* out, cudaStream_t stream);

/// \brief Step 2: prefill/varlen attention; `out` holds rotated q on entry (attention_append)
/// and softmax(q k^T / sqrt(head_dim) + GLM mask) v on return.
void attention_prefill(const AttentionBatch& batch, const PagedKvLayer& kv, __half* out,
                       cudaStream_t stream);

/// \brief Float count of the workspace attention_decode needs for `num_seqs` sequences.
std::size_t attention_decode_workspace_floats(int num_seqs, int num_heads, int head_dim);

/// \brief Step 3: one new token per sequence (batch.max_new_tokens must be 1), split-KV.
/// \param workspace device floats, attention_decode_workspace_floats(...) of them
/// \param num_sms multiprocessors of the device (sizes the splits; cache it per device)
/// The grid depends only on num_seqs, the heads and max_kv_len, so with
/// batch.max_kv_len_on_device set to a fixed buffer and max_kv_len to a capacity, one launch
/// can be captured in a CUDA graph and replayed for any length up to that capacity.
void attention_decode(const AttentionBatch& batch, const PagedKvLayer& kv, __half* out,
                      float* workspace, int num_sms, cudaStream_t stream);

/// \brief The whole attention of one layer: attention_append, then attention_decode when every
/// sequence has one new token (and `workspace` is given), else attention_prefill.
void attention_forward(const __half* qkv, const AttentionBatch& batch, const PagedKvLayer& kv,
                       __half* out, float* workspace, int num_sms, cudaStream_t stream);

}  // namespace qg::cuda
