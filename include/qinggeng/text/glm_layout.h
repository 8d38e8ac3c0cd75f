// GlmLayout: where a token sits in the GLM blank-infilling layout (spec section 2).
//
//   ids:        q0 q1 q2 [gMASK] <sop> a0 a1 ...
//   position:    0  1  2    3      3    3  3      (t for t < ctx, the mask index after)
//   block:       0  0  0    0      1    2  3      (0 before ctx, t - ctx + 1 after)
//   attention:  tokens < ctx see all tokens < ctx; tokens >= ctx also see earlier-or-same
//               tokens (causal tail). ctx = index of the first <sop>.
#pragma once

#include <vector>

namespace qg::text {

/// \brief Context length and mask position of one sequence, and the 2-D positions they imply.
struct GlmLayout {
  int context_length = 0;  ///< index of the first <sop>; all tokens before it are context
  int mask_position = 0;   ///< index of the [gMASK] (or [MASK]) the answer fills

  /// \brief Layout of `ids` as the HF model derives it: ctx = first `bos_id`; mask = first
  /// `gmask_id` if present, else first `mask_id`. Without a `bos_id` the whole sequence is
  /// context (bidirectional, block positions 0); with a bos but no mask token the mask
  /// position is taken as ctx - 1 (the token before <sop>).
  static GlmLayout from_ids(const std::vector<int>& ids, int bos_id, int mask_id, int gmask_id);

  /// \brief First position id (rotates the first half of each head) of token index t.
  int position(int t) const { return t < context_length ? t : mask_position; }
  /// \brief Second position id (rotates the second half) of token index t.
  int block_position(int t) const { return t < context_length ? 0 : t - context_length + 1; }
  /// \brief Whether token `query` may attend to token `key`.
  bool attends(int query, int key) const { return key < context_length || key <= query; }
};

}  // namespace qg::text
