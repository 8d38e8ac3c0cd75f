// QG_CUDA_CHECK: turns a failed CUDA runtime call into a qg::Error naming the call and place.
#pragma once

#include <cuda_runtime.h>

#include "qinggeng/error.h"

#define QG_CUDA_CHECK(call)                                                                  \
  do {                                                                                       \
    const cudaError_t qg_cuda_status = (call);                                               \
    if (qg_cuda_status != cudaSuccess) {                                                     \
      ::qg::fail(#call, " failed: ", cudaGetErrorString(qg_cuda_status), " (", __FILE__, ":", \
                 __LINE__, ")");                                                             \
    }                                                                                        \
  } while (0)
