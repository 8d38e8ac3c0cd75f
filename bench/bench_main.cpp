// qg_bench entry point and the shared helpers of bench_report.h. Kernel families register
// their benchmarks from their own files; this runs them, then prints the measured reference
// peaks and every family's Markdown table (also written to --qg_markdown=FILE if given).
#include <benchmark/benchmark.h>
#include <cublas_v2.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <random>
#include <sstream>

#include "bench_report.h"
#include "qinggeng/cuda/device.h"
#include "qinggeng/error.h"
#include "qinggeng/tensor/dtype.h"

namespace qg::bench {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) fail(what, " failed: ", cudaGetErrorString(status));
}

RandomHalfBuffer::RandomHalfBuffer(std::size_t elements, float scale) : elements_(elements) {
  check_cuda(cudaMalloc(&data_, elements * 2), "cudaMalloc");
  // A 4 MiB random pattern, copied at a shifting offset so buffers are not periodic in a
  // way the benchmarked kernels could notice.
  constexpr std::size_t kPattern = 2u << 20;
  std::vector<std::uint16_t> pattern(kPattern);
  std::mt19937 rng(static_cast<std::uint32_t>(elements));
  std::uniform_real_distribution<float> dist(-scale, scale);
  for (auto& v : pattern) v = float_to_half(dist(rng));
  std::size_t at = 0, shift = 0;
  while (at < elements) {
    const std::size_t n = std::min(kPattern - shift, elements - at);
    check_cuda(cudaMemcpy(data_ + at, pattern.data() + shift, n * 2, cudaMemcpyHostToDevice),
               "cudaMemcpy");
    at += n;
    shift = (shift + 4099) % 1024;
  }
}

RandomHalfBuffer::~RandomHalfBuffer() { cudaFree(data_); }

double time_ms(const std::function<void(int)>& fn, int reps, cudaStream_t stream) {
  cudaEvent_t start, stop;
  check_cuda(cudaEventCreate(&start), "cudaEventCreate");
  check_cuda(cudaEventCreate(&stop), "cudaEventCreate");
  check_cuda(cudaEventRecord(start, stream), "cudaEventRecord");
  for (int i = 0; i < reps; ++i) fn(i);
  check_cuda(cudaEventRecord(stop, stream), "cudaEventRecord");
  check_cuda(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0;
  check_cuda(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return static_cast<double>(ms) / reps;
}

double median(std::vector<double>& values) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const std::size_t n = values.size();
  return n % 2 ? values[n / 2] : 0.5 * (values[n / 2 - 1] + values[n / 2]);
}

cublasHandle_t cublas() {
  static cublasHandle_t handle = [] {
    cublasHandle_t h = nullptr;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) fail("cublasCreate failed");
    return h;
  }();
  return handle;
}

namespace {

double measure_copy_gbps() {
  const std::size_t bytes = std::size_t{1} << 30;
  void *src = nullptr, *dst = nullptr;
  check_cuda(cudaMalloc(&src, bytes), "cudaMalloc");
  check_cuda(cudaMalloc(&dst, bytes), "cudaMalloc");
  check_cuda(cudaMemset(src, 0x3c, bytes), "cudaMemset");
  auto copy = [&](int) {
    check_cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice), "copy");
  };
  time_ms(copy, 2, nullptr);  // warm-up
  std::vector<double> ms;
  for (int i = 0; i < 10; ++i) ms.push_back(time_ms(copy, 1, nullptr));
  cudaFree(src);
  cudaFree(dst);
  return 2.0 * static_cast<double>(bytes) / (median(ms) * 1e-3) / 1e9;
}

double measure_cublas_tflops() {
  const int n = 8192;
  const std::size_t elements = std::size_t{n} * n;
  RandomHalfBuffer a(elements, 1.0f), b(elements, 1.0f), c(elements, 1.0f);
  cublasHandle_t handle = cublas();
  const float one = 1.0f, zero = 0.0f;
  auto gemm = [&](int) {
    cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &one, a.data(), CUDA_R_16F, n,
                 b.data(), CUDA_R_16F, n, &zero, c.data(), CUDA_R_16F, n, CUBLAS_COMPUTE_32F,
                 CUBLAS_GEMM_DEFAULT);
  };
  time_ms(gemm, 3, nullptr);
  std::vector<double> ms;
  for (int i = 0; i < 10; ++i) ms.push_back(time_ms(gemm, 1, nullptr));
  return 2.0 * n * n * static_cast<double>(n) / (median(ms) * 1e-3) / 1e12;
}

struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
};

std::vector<std::pair<std::string, Table>>& tables() {
  static std::vector<std::pair<std::string, Table>> all;
  return all;
}

}  // namespace

const Peaks& peaks() {
  static const Peaks measured = [] {
    Peaks p;
    p.copy_gbps = measure_copy_gbps();
    p.cublas_tflops = measure_cublas_tflops();
    return p;
  }();
  return measured;
}

void table_row(const std::string& table, const std::vector<std::string>& header,
               const std::vector<std::string>& row) {
  auto& all = tables();
  auto it = std::find_if(all.begin(), all.end(), [&](const auto& t) { return t.first == table; });
  if (it == all.end()) {
    all.push_back({table, Table{header, {}}});
    it = all.end() - 1;
  }
  auto& rows = it->second.rows;
  auto same = std::find_if(rows.begin(), rows.end(), [&](const auto& r) { return r[0] == row[0]; });
  if (same != rows.end()) {
    *same = row;
  } else {
    rows.push_back(row);
  }
}

std::string cell(double value, int decimals) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*f", decimals, value);
  return buf;
}

std::string markdown_tables() {
  std::ostringstream out;
  const Peaks& p = peaks();
  out << "\n## Reference peaks on " << cuda::device_description(0) << "\n\n"
      << "| peak | value |\n| --- | --- |\n"
      << "| device-to-device copy (read + write) | " << cell(p.copy_gbps, 0) << " GB/s |\n"
      << "| cuBLAS fp16 GEMM 8192^3 | " << cell(p.cublas_tflops, 1) << " TFLOP/s |\n";
  for (const auto& [name, table] : tables()) {
    out << "\n## " << name << "\n\n|";
    for (const auto& h : table.header) out << ' ' << h << " |";
    out << "\n|";
    for (std::size_t i = 0; i < table.header.size(); ++i) out << " --- |";
    out << '\n';
    for (const auto& row : table.rows) {
      out << '|';
      for (const auto& c : row) out << ' ' << c << " |";
      out << '\n';
    }
  }
  return out.str();
}

}  // namespace qg::bench

int main(int argc, char** argv) {
  // Our own flag first: --qg_markdown=FILE (Google Benchmark rejects unknown flags).
  std::string markdown_file;
  int kept = 1;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--qg_markdown=", 14) == 0) {
      markdown_file = argv[i] + 14;
    } else {
      argv[kept++] = argv[i];
    }
  }
  argc = kept;
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  if (qg::cuda::device_count() == 0) {
    std::printf("qg_bench: no CUDA device present, nothing to measure\n");
    return 0;
  }
  try {
    benchmark::RunSpecifiedBenchmarks();
    const std::string tables = qg::bench::markdown_tables();
    std::printf("%s", tables.c_str());
    if (!markdown_file.empty()) {
      const std::string tmp = markdown_file + ".tmp";
      std::ofstream(tmp) << tables;
      std::rename(tmp.c_str(), markdown_file.c_str());
    }
  } catch (const qg::Error& e) {
    std::fprintf(stderr, "qg_bench: %s\n", e.what());
    return 1;
  }
  benchmark::Shutdown();
  return 0;
}
