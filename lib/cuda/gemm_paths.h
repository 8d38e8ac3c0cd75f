// The GEMM kernel families behind qg::cuda::gemm_f16 and the plumbing they share. gemm.cu
// validates arguments and picks a family and tile shape; gemm_tiled.cu (mma.sync, sm_80+),
// gemm_wgmma.cu (wgmma, sm_90a) and gemm_skinny.cu (decode) launch. Arguments are already
// checked when these run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <vector>

#include "cuda/mma_tiles.cuh"
#include "qinggeng/cuda/gemm.h"

namespace qg::cuda {

using GemmLauncher = void (*)(const __half* x, const __half* w, const tiles::Epilogue& e,
                              std::int64_t K, cudaStream_t stream);

/// \brief One block-tile configuration of a tiled family, for the shape chooser.
struct TileChoice {
  int bm = 0, bn = 0;
  double efficiency = 1.0;  ///< relative tensor-core throughput per CTA tile area
  GemmLauncher launch = nullptr;
};

/// \brief The mma.sync tile configurations (every supported GPU).
void append_mma_sync_tiles(std::vector<TileChoice>& out);
/// \brief The wgmma tile configurations; appends nothing unless the current device is sm_90
/// and this build carries the sm_90a kernels.
void append_wgmma_tiles(std::vector<TileChoice>& out);

/// \brief dX = dY W on the wgmma pipeline (W [K, N] read MN-major); returns false, launching
/// nothing, when this device or build has no sm_90a path or N is not a multiple of 64.
bool launch_wgmma_nn(const __half* x, const __half* w, const tiles::Epilogue& e, std::int64_t K,
                     cudaStream_t stream);

/// \brief Decode GEMM for M <= kGemmSkinnyMaxM: every weight byte is read once for all M
/// rows of x.
void launch_gemm_skinny(const __half* x, const __half* w, const tiles::Epilogue& e,
                        std::int64_t K, cudaStream_t stream);

/// \brief The decode GEMM of LayerNorm(x) for M <= kGemmDecodeMaxM, writing the normalised
/// rows to `normed` too (gemm_f16_layer_norm; arguments already checked).
void launch_gemm_skinny_layer_norm(const __half* x, const __half* gamma, const __half* beta,
                                   float eps, __half* normed, const __half* w,
                                   const tiles::Epilogue& e, std::int64_t K, cudaStream_t stream);

/// \brief Checks the output pointer and `epilogue` of an [M, N] product (bias and residual
/// present and aligned) and returns the device form; `op` names the caller in errors.
tiles::Epilogue device_epilogue(const GemmEpilogue& epilogue, void* y, bool y_fp32,
                                std::int64_t M, std::int64_t N, const char* op);

/// \brief Streaming multiprocessors of the current device (cached per device).
int multiprocessor_count();

/// \brief Lets `kernel` use `bytes` of dynamic shared memory (needed above 48 KiB), once per
/// kernel and device.
void opt_in_shared_memory(const void* kernel, int bytes);

/// \brief A grid of m-tiles (x, fastest) by n-tiles (y) for a bm x bn tiling of e's output.
/// M tiles vary fastest so that one wave of CTAs shares few W tiles: W (the big operand for
/// this model) is then read from DRAM about once while X tiles are re-read from L2.
dim3 tile_grid(const tiles::Epilogue& e, int bm, int bn);

}  // namespace qg::cuda
