// Test and benchmark hook of the backward GEMMs (gemm_backward.cu), host-only so that test
// sources can include it.
#pragma once

namespace qg::cuda {

/// \brief Which family gemm_f16_nn runs: Auto (wgmma where it can, else mma.sync), or mma.sync
/// pinned, so tests and benchmarks on Hopper also cover what A100 / RTX 3090 run.
enum class GemmBackwardPath { Auto, MmaSync };

/// \brief Pins the family of later gemm_f16_nn calls (process-wide).
void force_gemm_backward_path(GemmBackwardPath path);

}  // namespace qg::cuda
