// Logits processing and token sampling on the GPU: the repetition penalty, temperature, top-k,
// top-p and the random draw of qg::engine::Sampler, for a whole batch in one launch, so only
// token ids cross PCIe. Same kept set and distribution as the CPU Sampler; greedy is exactly
// its argmax.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "qinggeng/engine/sampler.h"

namespace qg::cuda {

/// \brief Largest vocabulary the sampling kernel takes (its seen-token bitmap lives in shared
/// memory, which must also fit an RTX 3090's 99 KB per block).
constexpr int kMaxSamplingVocab = 262144;

/// \brief One row's settings as the kernel reads them (device memory). Built by GpuSampler;
/// exposed for callers that keep the rows on the device themselves (e.g. inside a CUDA graph).
struct SamplingRow {
  float temperature = 1.0f;         ///< > 0 (ignored when do_sample is 0)
  float top_p = 1.0f;               ///< in (0, 1]
  float repetition_penalty = 1.0f;  ///< > 0; 1 = off
  int top_k = 0;                    ///< 0 = off
  int do_sample = 0;                ///< 0: greedy argmax
  int history_begin = 0;            ///< the row's seen tokens: history[begin, begin + length)
  int history_length = 0;
  int append_at = -1;      ///< >= 0: the kernel also writes the picked id to history[append_at]
  std::uint64_t seed = 0;  ///< the draw is a hash of (seed, step): no generator state
  std::uint64_t step = 0;
};

/// \brief Picks one token per row of `logits` on `stream` (no host synchronisation), one
/// 512-thread block per row (no workspace; the slow form when rows are few, kept as the
/// reference the split form is tested against).
///
/// The row is read once for the maximum (greedy stops there); sampling rows read it once more
/// for a 2048-bucket histogram of counts and fixed-point probability mass over the distance to
/// the maximum, then locate the top-k cut, the top-p cut and the drawn token in that
/// histogram: the bucket each one falls in (refined by radix passes in the rare case it holds
/// more than 2048 tokens) is gathered into shared memory and ranked exactly (by logit, then by
/// lower index, as the CPU's sort). Deterministic: the same inputs, seeds and steps give the
/// same ids.
/// \param logits [num_rows, vocab] fp32 on the device (not modified)
/// \param rows [num_rows] SamplingRow on the device
/// \param history seen token ids on the device (rows index into it; ids outside [0, vocab)
///        are ignored, repeats are penalised once); may be null when every row's length is 0
///        and no row appends
/// \param out [num_rows] picked token ids on the device
/// \param any_penalty true when some row has repetition_penalty != 1 (sizes shared memory)
/// \throws qg::Error for null pointers or sizes out of range (the rows are not checked here).
void sample_tokens(const float* logits, int num_rows, int vocab, const SamplingRow* rows,
                   int* history, bool any_penalty, int* out, cudaStream_t stream);

/// \brief Bytes of device workspace the split form of sample_tokens needs for `num_rows` rows
/// (about 60 KB a row, independent of the vocabulary).
std::size_t sampling_workspace_bytes(int num_rows);

/// \brief sample_tokens split over several blocks per row: the same ids as the one-block form
/// (bit for bit), much sooner when rows are fewer than the multiprocessors.
///
/// Three launches over a grid of (chunks, rows): each chunk's maximum; each chunk's histogram,
/// summed into the row's with global atomics, after which the row's last block predicts the
/// buckets the searches will land in; each chunk's tokens in those buckets, gathered into a
/// candidate list, after which the row's last block runs the searches on the row's histogram
/// and candidates (a bucket the prediction missed, or one of more than 2048 tokens, is read
/// from the row by that block). No host synchronisation, no allocation: capturable in a CUDA
/// graph (the grid depends only on num_rows, vocab and num_sms).
/// \param workspace device memory of at least sampling_workspace_bytes(num_rows) bytes,
///        16-byte aligned; its contents need no initialisation and carry nothing between calls
///        (calls sharing one workspace must be ordered on one stream)
/// \param num_sms multiprocessors of the device (sizes the chunks: about num_sms blocks in
///        all, chunks of at least 1024 tokens, at most 256 per row; cache it per device)
/// \throws qg::Error as the one-block form, and for a missing or short workspace or more than
/// 65535 rows.
void sample_tokens(const float* logits, int num_rows, int vocab, const SamplingRow* rows,
                   int* history, bool any_penalty, int* out, void* workspace,
                   std::size_t workspace_bytes, int num_sms, cudaStream_t stream);

/// \brief A batched GPU sampler owning its device buffers: per-sequence token histories for
/// the repetition penalty (kept on the device and appended to by the kernel itself) and the
/// per-row settings uploaded each step (about 48 bytes a row), and the split form's workspace
/// (sized for `slots` rows up front, so the slot form never allocates).
///
/// Typical decode loop: `reset_history(slot, prompt_ids)` when a sequence joins, then each
/// step `sample(logits, n, vocab, configs, slots, steps, d_out, stream)`; the picked token of
/// every row is appended to its slot's history on the device, so no history crosses PCIe
/// after the prompt. Not thread-safe; all calls are stream-ordered on the streams given.
class GpuSampler {
 public:
  /// \brief Room for `slots` sequences of up to `history_capacity` tokens each (prompt plus
  /// generated). \throws qg::Error for non-positive sizes.
  GpuSampler(int slots, int history_capacity);
  ~GpuSampler();
  GpuSampler(const GpuSampler&) = delete;
  GpuSampler& operator=(const GpuSampler&) = delete;

  /// \brief Replaces slot `slot`'s history with `tokens` (e.g. the prompt). \throws qg::Error
  /// for a bad slot or more tokens than the capacity.
  void reset_history(int slot, const std::vector<int>& tokens, cudaStream_t stream);

  /// \brief Tokens currently held for `slot` (host-side count; the ids stay on the device).
  int history_length(int slot) const;

  /// \brief Picks the next token of every row and appends it to the row's slot history.
  /// Row r reads `logits + r * vocab`, uses `configs[r]`, slot `slots[r]` (distinct) and
  /// random stream position `steps[r]` (e.g. the number of tokens generated so far).
  /// \param d_logits [num_rows, vocab] fp32 on the device;  d_out [num_rows] int32 on the device
  /// \throws qg::Error naming the row and field for invalid configs, sizes, slots, null
  /// pointers, or a full history.
  void sample(const float* d_logits, int num_rows, int vocab,
              const std::vector<engine::SamplingConfig>& configs, const std::vector<int>& slots,
              const std::vector<std::uint64_t>& steps, int* d_out, cudaStream_t stream);

  /// \brief Stateless form: row r's seen tokens are `histories[r]` (uploaded on each call;
  /// slot histories are neither read nor changed).
  void sample(const float* d_logits, int num_rows, int vocab,
              const std::vector<engine::SamplingConfig>& configs,
              const std::vector<std::vector<int>>& histories,
              const std::vector<std::uint64_t>& steps, int* d_out, cudaStream_t stream);

  /// \brief sample() with explicit histories, then copies the ids to the host (synchronises
  /// `stream`).
  std::vector<int> sample_to_host(const float* d_logits, int num_rows, int vocab,
                                  const std::vector<engine::SamplingConfig>& configs,
                                  const std::vector<std::vector<int>>& histories,
                                  const std::vector<std::uint64_t>& steps, cudaStream_t stream);

 private:
  struct Buffers;
  void launch(const float* d_logits, int num_rows, int vocab,
              const std::vector<engine::SamplingConfig>& configs,
              const std::vector<std::uint64_t>& steps, std::vector<SamplingRow>& rows, int* history,
              int* d_out, cudaStream_t stream);

  int slots_, capacity_;
  int num_sms_;  // of the device current at construction
  std::vector<int> lengths_;
  std::unique_ptr<Buffers> buffers_;
};

}  // namespace qg::cuda
