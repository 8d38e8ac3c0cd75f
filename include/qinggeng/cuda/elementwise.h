// Small memory-bound fp16 ops of the GLM forward pass (fp32 math inside): embedding gather,
// gelu_tanh in place, GLM's scaled residual add, row gathers and scatters. Each is one grid-stride
// kernel with 16-byte accesses when sizes and pointers allow, scalar otherwise.
#pragma once

#include <cstdint>

#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace qg::cuda {

/// \brief out[i] = table[ids[i]] for i < n (ids on the device, so a sampled token can feed the
/// next step without a host round trip).
///
/// ids are validated by the caller (backend.h); an id outside [0, vocab) yields a zero row
/// rather than an out-of-bounds read.
/// \param table [vocab, cols] fp16;  ids [n] int32 (device);  out [n, cols] fp16
void embedding(const __half* table, std::int64_t vocab, std::int64_t cols, const int* ids,
               std::int64_t n, __half* out, cudaStream_t stream);

/// \brief x = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) over `count` values, in place.
void gelu_tanh(__half* x, std::int64_t count, cudaStream_t stream);

/// \brief out = a * alpha + b over `count` values (GLM's residual); out may alias a or b.
void scaled_add(const __half* a, float alpha, const __half* b, std::int64_t count, __half* out,
                cudaStream_t stream);

/// \brief out[i] = x[rows[i]] for i < n, rows of `cols` values; rows on the device and
/// validated by the caller (an index outside [0, x_rows) yields a zero row).
void gather_rows(const __half* x, std::int64_t x_rows, std::int64_t cols,
                 const std::int64_t* rows, std::int64_t n, __half* out, cudaStream_t stream);

/// \brief out[rows[i]] = x[i] for i < n, rows of `cols` values (the inverse of gather_rows);
/// other rows of out are left as they are. rows on the device, distinct, validated by the
/// caller (an index outside [0, out_rows) is skipped).
void scatter_rows(const __half* x, std::int64_t n, std::int64_t cols, const std::int64_t* rows,
                  __half* out, std::int64_t out_rows, cudaStream_t stream);

/// \brief out = gelu_tanh(x) over `count` values (the training forward keeps x for the
/// backward, so the result goes elsewhere).
void gelu_tanh_out(const __half* x, std::int64_t count, __half* out, cudaStream_t stream);

/// \brief dx = gelu_tanh'(x) * dy over `count` values; x is the gelu input. dx may alias dy.
void gelu_tanh_backward(const __half* x, const __half* dy, std::int64_t count, __half* dx,
                        cudaStream_t stream);

/// \brief Backward of `embedding`: dtable[ids[i]] += dout[i] (fp32 atomics), i < n.
/// ids outside [0, vocab) are skipped. \param dtable float [vocab, cols]
void embedding_backward(const int* ids, std::int64_t n, const __half* dout, std::int64_t vocab,
                        std::int64_t cols, float* dtable, cudaStream_t stream);

}  // namespace qg::cuda
