// Counter-based hashing: functions of (key, counter) with no state, behind every reproducible
// random stream of the library (random weights, dataset shuffles, the LoRA dropout masks).
// Host and device code share these definitions, so a CUDA kernel draws the CPU's bits exactly.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define QG_HOST_DEVICE __host__ __device__ inline
#else
#define QG_HOST_DEVICE inline
#endif

namespace qg {

/// \brief splitmix64: z plus the golden-ratio increment, then its finaliser (a bijection of
/// 64-bit words with full avalanche). splitmix64(state) with state += 0x9E3779B97F4A7C15 after
/// each call is Vigna's SplitMix64 generator.
QG_HOST_DEVICE std::uint64_t splitmix64(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// \brief A 32-bit integer mixer: xor-shift-multiply with the constants of Wellons's
/// "lowbias32" (low avalanche bias, two 32-bit multiplies: cheap on a GPU, which emulates
/// 64-bit multiplies).
QG_HOST_DEVICE std::uint32_t mix32(std::uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

/// \brief 32 uniform bits for counter `index` of the stream keyed `key` (a key made with
/// splitmix64 from a seed): two mix32 rounds, the low words of index and key in the first, the
/// high words in the second.
QG_HOST_DEVICE std::uint32_t counter_bits32(std::uint64_t key, std::uint64_t index) {
  const std::uint32_t h =
      mix32(static_cast<std::uint32_t>(index) ^ static_cast<std::uint32_t>(key));
  return mix32(h ^ static_cast<std::uint32_t>(index >> 32) ^ static_cast<std::uint32_t>(key >> 32));
}

}  // namespace qg
