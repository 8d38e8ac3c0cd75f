// GPU f32 <-> f16 conversion kernels against the host converters, bit for bit.
#include <cuda_runtime.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "catch.hpp"
#include "qinggeng/cuda/convert.h"
#include "qinggeng/tensor/dtype.h"

TEST_CASE("f32_to_f16 and f16_to_f32 match the host converters bit for bit") {
  std::mt19937 rng(7);
  std::vector<float> src;
  for (int e = -30; e <= 17; ++e) {  // every binade from fp16 subnormals to overflow
    std::uniform_real_distribution<float> mant(1.0f, 2.0f);
    for (int i = 0; i < 500; ++i) src.push_back(std::ldexp(mant(rng), e) * (i % 2 ? -1.0f : 1.0f));
  }
  src.push_back(0.0f);
  src.push_back(65504.0f);
  src.push_back(65520.0f);  // rounds to inf
  const std::size_t n = src.size();
  float* d_src = nullptr;
  std::uint16_t* d_half = nullptr;
  float* d_back = nullptr;
  REQUIRE(cudaMalloc(&d_src, n * sizeof(float)) == cudaSuccess);
  REQUIRE(cudaMalloc(&d_half, n * sizeof(std::uint16_t)) == cudaSuccess);
  REQUIRE(cudaMalloc(&d_back, n * sizeof(float)) == cudaSuccess);
  cudaMemcpy(d_src, src.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  qg::cuda::f32_to_f16(d_src, d_half, n, nullptr);
  qg::cuda::f16_to_f32(d_half, d_back, n, nullptr);
  std::vector<std::uint16_t> half(n);
  std::vector<float> back(n);
  cudaMemcpy(half.data(), d_half, n * sizeof(std::uint16_t), cudaMemcpyDeviceToHost);
  cudaMemcpy(back.data(), d_back, n * sizeof(float), cudaMemcpyDeviceToHost);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  std::size_t mismatches = 0;
  for (std::size_t i = 0; i < n; ++i) {
    if (half[i] != qg::float_to_half(src[i])) ++mismatches;
    const float expect = qg::half_to_float(half[i]);
    if (!(back[i] == expect || (std::isnan(back[i]) && std::isnan(expect)))) ++mismatches;
  }
  CHECK(mismatches == 0);
  cudaFree(d_src);
  cudaFree(d_half);
  cudaFree(d_back);
}
