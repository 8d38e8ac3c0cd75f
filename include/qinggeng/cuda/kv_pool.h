// The paged KV cache of the CUDA backend: one device allocation per layer for keys and one for
// values, cut into fixed-size blocks of tokens, plus a host-side free list that hands blocks to
// sequences. A sequence owns a block table (block ids in token order), so growing a sequence
// never moves or reallocates what it already stored, and finished sequences give their blocks
// back for the next ones (continuous batching).
//
// Device layout of one layer's key (and, identically, value) pool, fp16:
//
//     [num_blocks][num_heads][block_size][head_dim]
//
// Token t of a sequence lives in block table[t / block_size] at slot t % block_size. Heads are
// outside the slot index so that one (block, head) is a contiguous block_size x head_dim tile:
// the attention kernels load a head's keys for consecutive tokens as whole contiguous rows of
// head_dim * 2 bytes (16-byte vector loads, no gather inside a tile), and the decode kernel
// streams a head's cache block by block.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include <cuda_fp16.h>

namespace qg::cuda {

/// \brief Geometry of a paged KV pool.
struct KvPoolShape {
  int num_layers = 0;
  int num_heads = 0;
  int head_dim = 0;
  int block_size = 16;  ///< tokens per block, a power of two (kernels shift and mask)
};

/// \brief One layer's view of the pool, passed to the attention kernels by value.
struct PagedKvLayer {
  __half* keys = nullptr;    ///< [num_blocks][num_heads][block_size][head_dim]
  __half* values = nullptr;  ///< same layout as keys
  int num_blocks = 0;
  int num_heads = 0;
  int head_dim = 0;
  int block_size = 0;
  int block_shift = 0;  ///< log2(block_size)
};

/// \brief Device KV storage for every layer and the host-side allocator of its blocks.
///
/// Not thread-safe: one engine thread owns the pool. Move-only; the destructor frees the
/// device memory.
class KvBlockPool {
 public:
  /// \brief Allocates `num_blocks` blocks for every layer on the current device.
  /// \throws qg::Error for a non-positive dimension, a block_size that is not a power of two,
  /// or when cudaMalloc fails (the message gives the bytes asked for).
  KvBlockPool(const KvPoolShape& shape, int num_blocks);
  ~KvBlockPool();
  KvBlockPool(KvBlockPool&& other) noexcept;
  KvBlockPool& operator=(KvBlockPool&& other) noexcept;
  KvBlockPool(const KvBlockPool&) = delete;
  KvBlockPool& operator=(const KvBlockPool&) = delete;

  /// \brief Device bytes one block takes over all layers (keys and values).
  static std::size_t bytes_per_block(const KvPoolShape& shape);

  const KvPoolShape& shape() const { return shape_; }
  int num_blocks() const { return num_blocks_; }
  int free_blocks() const { return static_cast<int>(free_.size()); }
  /// \brief Blocks needed to hold `tokens` tokens.
  int blocks_for(int tokens) const { return (tokens + shape_.block_size - 1) / shape_.block_size; }

  /// \brief The pools of layer `layer` (0 <= layer < num_layers).
  PagedKvLayer layer(int layer) const;

  /// \brief Appends blocks to `table` until it covers `tokens` tokens (no-op if it does).
  /// \throws qg::Error when the pool has too few free blocks; `table` is then unchanged.
  void reserve(std::vector<int>& table, int tokens);
  /// \brief Keeps the blocks covering the first `tokens` tokens and frees the rest.
  void shrink(std::vector<int>& table, int tokens);
  /// \brief Returns every block of `table` to the pool and clears it.
  void release(std::vector<int>& table) { shrink(table, 0); }

 private:
  void free_device() noexcept;

  KvPoolShape shape_;
  int num_blocks_ = 0;
  std::vector<__half*> keys_, values_;  // per layer
  std::vector<int> free_;               // free block ids; the back is handed out next
};

}  // namespace qg::cuda
