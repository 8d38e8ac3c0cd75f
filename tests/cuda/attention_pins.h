// Scoped pins of the attention kernels' tile configurations (lib/cuda/attention_paths.h) for
// tests: the configuration holds while the pin lives, and Auto is back afterwards, also when a
// check throws.
#pragma once

#include "cuda/attention_paths.h"

namespace qg::test {

struct PinnedAttentionPrefill {
  explicit PinnedAttentionPrefill(cuda::AttentionPrefillTiles tiles) {
    cuda::force_attention_prefill(tiles);
  }
  ~PinnedAttentionPrefill() { cuda::force_attention_prefill(cuda::AttentionPrefillTiles::Auto); }
  PinnedAttentionPrefill(const PinnedAttentionPrefill&) = delete;
  PinnedAttentionPrefill& operator=(const PinnedAttentionPrefill&) = delete;
};

struct PinnedAttentionBackward {
  PinnedAttentionBackward(cuda::AttentionBackwardTiles tiles, cuda::AttentionBackwardDq dq) {
    cuda::force_attention_train_backward(tiles, dq);
  }
  ~PinnedAttentionBackward() {
    cuda::force_attention_train_backward(cuda::AttentionBackwardTiles::Auto,
                                         cuda::AttentionBackwardDq::TileCounters);
  }
  PinnedAttentionBackward(const PinnedAttentionBackward&) = delete;
  PinnedAttentionBackward& operator=(const PinnedAttentionBackward&) = delete;
};

/// The prefill configurations every prefill test runs.
inline constexpr cuda::AttentionPrefillTiles kPrefillTiles[] = {cuda::AttentionPrefillTiles::Narrow,
                                                                cuda::AttentionPrefillTiles::Wide};

inline const char* prefill_tiles_name(cuda::AttentionPrefillTiles tiles) {
  return tiles == cuda::AttentionPrefillTiles::Wide ? "wide" : "narrow";
}

}  // namespace qg::test
