// Host float32 reference of the batched multi-adapter LoRA update (see lora/lora_add.h).
#include "qinggeng/lora/lora_add.h"

#include "qinggeng/error.h"

namespace qg::lora {

void lora_add(const float* x, std::int64_t tokens, std::int64_t in, float* y, std::int64_t out,
              const std::vector<LoraFactors>& adapters, const std::int32_t* adapter_of_row) {
  QG_CHECK(tokens >= 0 && in > 0 && out > 0, "lora_add: bad sizes tokens=", tokens, " in=", in,
           " out=", out);
  const auto count = static_cast<std::int64_t>(adapters.size());
  for (std::int64_t i = 0; i < count; ++i) {
    const LoraFactors& f = adapters[static_cast<std::size_t>(i)];
    QG_CHECK(f.rank >= 0, "lora_add: adapter ", i, " has negative rank ", f.rank);
    QG_CHECK(f.rank == 0 || (f.a && f.b), "lora_add: adapter ", i, " has no A/B factors");
  }
  std::vector<double> u;
  for (std::int64_t t = 0; t < tokens; ++t) {
    const std::int32_t id = adapter_of_row[t];
    QG_CHECK(id >= -1 && id < count, "lora_add: row ", t, " selects adapter ", id, " but ",
             count, " adapters are given");
    if (id < 0) continue;
    const LoraFactors& f = adapters[static_cast<std::size_t>(id)];
    if (f.rank == 0) continue;
    const float* xr = x + t * in;
    u.assign(static_cast<std::size_t>(f.rank), 0.0);
    for (std::int64_t k = 0; k < f.rank; ++k) {
      const float* ar = f.a + k * in;
      double acc = 0;
      for (std::int64_t i = 0; i < in; ++i) acc += static_cast<double>(xr[i]) * ar[i];
      u[static_cast<std::size_t>(k)] = acc * f.scale;
    }
    float* yr = y + t * out;
    for (std::int64_t o = 0; o < out; ++o) {
      const float* br = f.b + o * f.rank;
      double acc = 0;
      for (std::int64_t k = 0; k < f.rank; ++k) acc += u[static_cast<std::size_t>(k)] * br[k];
      yr[o] = static_cast<float>(yr[o] + acc);
    }
  }
}

}  // namespace qg::lora
