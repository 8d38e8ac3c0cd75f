// The two GEMM kernel families behind qg::cuda::gemm_f16 (gemm.cu validates and dispatches;
// gemm_tiled.cu and gemm_skinny.cu launch). Arguments are already checked when these run.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/mma_tiles.cuh"

namespace qg::cuda {

/// \brief Block-tiled multi-stage tensor-core GEMM, any M; picks a tile shape for the size.
void launch_gemm_tiled(const __half* x, const __half* w, const tiles::Epilogue& e,
                       std::int64_t K, cudaStream_t stream);

/// \brief Decode GEMM for M <= 16: every weight byte is read once for all M rows of x.
void launch_gemm_skinny(const __half* x, const __half* w, const tiles::Epilogue& e,
                        std::int64_t K, cudaStream_t stream);

}  // namespace qg::cuda
