// Main of the GPU test suite: with no CUDA device it says so and exits 77, which ctest
// reports as "skipped"; otherwise it runs the Catch2 session.
#if defined(QG_CATCH3)
#include <catch2/catch_session.hpp>
#else
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#endif

#include <cstdio>

#include "qinggeng/cuda/device.h"

int main(int argc, char** argv) {
  if (qg::cuda::device_count() == 0) {
    std::printf("qg_cuda_tests: no CUDA device present: GPU tests skipped\n");
    return 77;
  }
  std::printf("qg_cuda_tests on %s\n", qg::cuda::device_description(0).c_str());
  return Catch::Session().run(argc, argv);
}
