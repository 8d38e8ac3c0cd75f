// Factory of the CUDA backend (implemented in cuda_backend.cpp); make_backend("cuda:N")
// in lib/model/backend.cpp is its only caller.
#pragma once

#include <cstddef>
#include <memory>

#include "qinggeng/model/backend.h"
#include "qinggeng/tensor/quantize.h"

namespace qg::model {

/// Sizing of the CUDA backend's KV cache.
struct CudaBackendOptions {
  int kv_block_size = 16;          ///< tokens per KV block
  std::size_t kv_cache_bytes = 0;  ///< 0: free memory less a reserve, up to max_kv_blocks
  int max_kv_blocks = 64 * 2048 / 16;  ///< default cap: 64 sequences of 2048 tokens
  int max_adapters = 8;            ///< runtime LoRA adapter ids [0, max_adapters)
  bool quantize = false;           ///< store the layers' four linear weights quantized
  tensor::QuantScheme quant_scheme = tensor::QuantScheme::Int8PerChannel;
  /// Replay decode steps (every sequence one new token) of up to max_graph_rows sequences from
  /// CUDA graphs captured per batch size; the environment variable QG_CUDA_GRAPHS=0 turns it
  /// off, as does QG_CUDA_PROFILE (per-op timing needs the ops launched one by one).
  bool decode_graphs = true;
  int max_graph_rows = 64;
  /// Fuse a LayerNorm into the linear that follows it for up to 16 rows (decode;
  /// cuda::gemm_f16_layer_norm: one launch instead of two, the same bits); the environment
  /// variable QG_CUDA_FUSE_LN=1 turns it on too. Off by default until it is timed on a GPU.
  bool fuse_layer_norm = false;
};

std::unique_ptr<Backend> make_cuda_backend(int device, const CudaBackendOptions& options = {});

}  // namespace qg::model
