// Backend selection and the shared parts of KvCache (see include/qinggeng/model/backend.h).
#include "qinggeng/model/backend.h"

#include "qinggeng/error.h"

#if defined(QG_WITH_CUDA)
#include "cuda/cuda_backend.h"
#include "qinggeng/cuda/device.h"
#endif

namespace qg::model {

void KvCache::truncate(int n) {
  QG_CHECK(n >= 0 && n <= length_, "KvCache::truncate(", n, ") with ", length_, " tokens stored");
  length_ = n;
}

void KvCache::advance(int n) {
  QG_CHECK(n >= 0 && length_ + n <= capacity_, "KV cache overflow: ", length_, " + ", n,
           " tokens exceed its capacity of ", capacity_);
  length_ += n;
}

bool cuda_available() {
#if defined(QG_WITH_CUDA)
  return cuda::device_count() > 0;
#else
  return false;
#endif
}

std::unique_ptr<Backend> make_backend(const std::string& device, int cpu_threads,
                                      const std::string& weights) {
  QG_CHECK(weights == "f16" || weights == "int8" || weights == "int4", "unknown weight format '",
           weights, "' (expected f16, int8 or int4)");
  const bool quantized = weights != "f16";
  if (device == "cpu") {
    QG_CHECK(!quantized, "--quant ", weights, " needs the CUDA backend (the CPU reference keeps float32)");
    return make_cpu_backend(cpu_threads);
  }
  if (device == "auto") {
    return cuda_available() ? make_backend("cuda", cpu_threads, weights)
                            : make_backend("cpu", cpu_threads, weights);
  }
  if (device == "cuda" || device.rfind("cuda:", 0) == 0) {
#if defined(QG_WITH_CUDA)
    QG_CHECK(cuda_available(), "--device ", device, ": no CUDA device is present");
    int index = 0;
    if (device.size() > 5) {
      const std::string digits = device.substr(5);
      QG_CHECK(digits.find_first_not_of("0123456789") == std::string::npos && !digits.empty(),
               "--device ", device, ": expected cuda:N with N a device number");
      index = std::stoi(digits);
    }
    CudaBackendOptions options;
    options.quantize = quantized;
    options.quant_scheme = weights == "int4" ? tensor::QuantScheme::Int4Group128
                                             : tensor::QuantScheme::Int8PerChannel;
    return make_cuda_backend(index, options);
#else
    fail("--device ", device, ": this build was configured without CUDA (QG_WITH_CUDA=OFF)");
#endif
  }
  fail("unknown device '", device, "' (expected cpu, cuda, cuda:N or auto)");
}

}  // namespace qg::model
