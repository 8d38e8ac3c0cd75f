// The paged KV pool (see include/qinggeng/cuda/kv_pool.h): per-layer device allocations and the
// host free list of blocks.
#include "qinggeng/cuda/kv_pool.h"

#include <utility>

#include "cuda/check.h"
#include "qinggeng/error.h"

namespace qg::cuda {

std::size_t KvBlockPool::bytes_per_block(const KvPoolShape& s) {
  return 2 * static_cast<std::size_t>(s.num_layers) * s.num_heads * s.block_size * s.head_dim *
         sizeof(__half);
}

KvBlockPool::KvBlockPool(const KvPoolShape& shape, int num_blocks)
    : shape_(shape), num_blocks_(num_blocks) {
  QG_CHECK(shape.num_layers > 0 && shape.num_heads > 0 && shape.head_dim > 0 &&
               shape.block_size > 0 && num_blocks > 0,
           "KV pool: layers ", shape.num_layers, ", heads ", shape.num_heads, ", head_dim ",
           shape.head_dim, ", block_size ", shape.block_size, ", blocks ", num_blocks,
           " must all be positive");
  QG_CHECK((shape.block_size & (shape.block_size - 1)) == 0, "KV pool: block_size ",
           shape.block_size, " is not a power of two");
  const std::size_t layer_bytes = bytes_per_block(shape) / (2 * shape.num_layers) * num_blocks;
  keys_.assign(static_cast<std::size_t>(shape.num_layers), nullptr);
  values_.assign(static_cast<std::size_t>(shape.num_layers), nullptr);
  for (int l = 0; l < shape.num_layers; ++l) {
    for (__half** p : {&keys_[static_cast<std::size_t>(l)], &values_[static_cast<std::size_t>(l)]}) {
      const cudaError_t status = cudaMalloc(reinterpret_cast<void**>(p), layer_bytes);
      if (status != cudaSuccess) {
        free_device();
        fail("KV pool: cudaMalloc of ", layer_bytes, " bytes (layer ", l, " of ",
             shape.num_layers, ", ", num_blocks, " blocks of ", shape.block_size,
             " tokens) failed: ", cudaGetErrorString(status));
      }
    }
  }
  free_.reserve(static_cast<std::size_t>(num_blocks));
  for (int b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // hand out 0, 1, 2, ... first
}

KvBlockPool::~KvBlockPool() { free_device(); }

KvBlockPool::KvBlockPool(KvBlockPool&& other) noexcept
    : shape_(other.shape_), num_blocks_(other.num_blocks_), keys_(std::move(other.keys_)),
      values_(std::move(other.values_)), free_(std::move(other.free_)) {
  other.keys_.clear();
  other.values_.clear();
  other.num_blocks_ = 0;
}

KvBlockPool& KvBlockPool::operator=(KvBlockPool&& other) noexcept {
  if (this != &other) {
    free_device();
    shape_ = other.shape_;
    num_blocks_ = other.num_blocks_;
    keys_ = std::move(other.keys_);
    values_ = std::move(other.values_);
    free_ = std::move(other.free_);
    other.keys_.clear();
    other.values_.clear();
    other.num_blocks_ = 0;
  }
  return *this;
}

void KvBlockPool::free_device() noexcept {
  for (auto* list : {&keys_, &values_}) {
    for (__half* p : *list) {
      if (p) cudaFree(p);
    }
    list->clear();
  }
}

PagedKvLayer KvBlockPool::layer(int layer) const {
  QG_CHECK(layer >= 0 && layer < shape_.num_layers, "KV pool: layer ", layer, " outside [0, ",
           shape_.num_layers, ")");
  const auto l = static_cast<std::size_t>(layer);
  int shift = 0;
  while ((1 << shift) < shape_.block_size) ++shift;
  return PagedKvLayer{keys_[l], values_[l], num_blocks_, shape_.num_heads, shape_.head_dim,
                      shape_.block_size, shift};
}

void KvBlockPool::reserve(std::vector<int>& table, int tokens) {
  const int need = blocks_for(tokens) - static_cast<int>(table.size());
  if (need <= 0) return;
  QG_CHECK(need <= free_blocks(), "KV pool exhausted: a sequence of ", tokens, " tokens needs ",
           need, " more blocks of ", shape_.block_size, " tokens, ", free_blocks(), " of ",
           num_blocks_, " are free");
  for (int i = 0; i < need; ++i) {
    table.push_back(free_.back());
    free_.pop_back();
  }
}

void KvBlockPool::shrink(std::vector<int>& table, int tokens) {
  const auto keep = static_cast<std::size_t>(blocks_for(tokens < 0 ? 0 : tokens));
  while (table.size() > keep) {
    free_.push_back(table.back());
    table.pop_back();
  }
}

}  // namespace qg::cuda
