// Test and benchmark hooks of the attention kernels: the prefill / training forward kernel
// (attention_prefill.cu) and the training backward (attention_train_backward.cu). Host-only, so
// that test sources can include it.
#pragma once

namespace qg::cuda {

/// \brief Which tile configuration the prefill kernel runs (attention_prefill and
/// attention_train_forward; attention_prefill.cu describes both). Narrow: 64-query CTAs of 4
/// warps x 16 rows, Q in registers. Wide: 128-query CTAs of 4 warps x 32 rows, Q re-read from
/// shared memory, K and V double-buffered (96 KiB of shared memory at head_dim 128). Auto is
/// Narrow until Wide is timed on a GPU.
enum class AttentionPrefillTiles { Auto, Narrow, Wide };

/// \brief Pins the configuration of later prefill and training forward calls (process-wide).
void force_attention_prefill(AttentionPrefillTiles tiles);

/// \brief Which tile configuration attention_train_backward runs. Auto: 128-key CTAs of 8 warps
/// with 64-query tiles where the device has the shared memory (every head_dim on sm_80 / sm_90,
/// head_dim <= 64 on sm_86 / sm_89), else 64-key CTAs of 4 warps with 32-query tiles; Narrow
/// pins the latter, so that tests and benchmarks on Hopper also cover what an RTX 3090 runs at
/// head_dim 128.
enum class AttentionBackwardTiles { Auto, Narrow };

/// \brief How dq is reduced over the key blocks. TileCounters: the first block to reach a
/// query tile stores its partial dq, the others add with atomics, the last one converts the
/// tile to fp16 (no extra passes over memory). SeparatePass: zeroed fp32 accumulators, atomics
/// from every block and a conversion kernel afterwards.
enum class AttentionBackwardDq { TileCounters, SeparatePass };

/// \brief Pins the configuration of later attention_train_backward calls (process-wide).
void force_attention_train_backward(AttentionBackwardTiles tiles, AttentionBackwardDq dq);

}  // namespace qg::cuda
