// qg-convert: rewrites a ChatGLM checkpoint (PyTorch .bin shards or safetensors) as safetensors,
// optionally casting to f16/bf16/f32. Thin wrapper over qg::io::convert_checkpoint.
#include <CLI/CLI.hpp>
#include <cstdio>
#include <string>

#include "qinggeng/error.h"
#include "qinggeng/io/convert.h"

int main(int argc, char** argv) {
  CLI::App app{"Convert a ChatGLM checkpoint (pytorch_model*.bin or *.safetensors) to safetensors"};
  std::string input, output, dtype = "keep", shard_size = "2GB";
  bool keep_buffers = false, quiet = false;
  app.add_option("--in", input, "model directory or checkpoint file")->required();
  app.add_option("--out", output, "output directory (created if missing)")->required();
  app.add_option("--dtype", dtype, "floating tensor type: f16, bf16, f32 or keep")
      ->capture_default_str();
  app.add_option("--shard-size", shard_size, "largest shard, e.g. 2GB, 500MB, 1GiB")
      ->capture_default_str();
  app.add_flag("--keep-buffers", keep_buffers,
               "keep the *.rotary_emb.inv_freq buffers (recomputed by the model otherwise)");
  app.add_flag("-q,--quiet", quiet, "no progress line");
  CLI11_PARSE(app, argc, argv);

  try {
    qg::io::ConvertOptions options;
    options.dtype = qg::io::parse_convert_dtype(dtype);
    options.max_shard_bytes = qg::io::parse_byte_size(shard_size);
    options.keep_buffers = keep_buffers;
    if (!quiet) {
      options.on_progress = [](const qg::io::ConvertProgress& p) {
        std::fprintf(stderr, "\r[%zu/%zu] %.1f MB  %-60.60s", p.done, p.total,
                     static_cast<double>(p.bytes) / 1e6, std::string(p.tensor).c_str());
        if (p.done == p.total) std::fputc('\n', stderr);
      };
    }
    const auto report = qg::io::convert_checkpoint(input, output, options);
    std::printf("wrote %zu tensors (%.1f MB) to %s in %zu files", report.tensors_written,
                static_cast<double>(report.tensor_bytes) / 1e6, output.c_str(),
                report.files.size());
    if (report.tensors_dropped != 0) {
      std::printf("; dropped %zu rotary_emb.inv_freq buffers", report.tensors_dropped);
    }
    std::printf("\n");
  } catch (const qg::Error& e) {
    std::fprintf(stderr, "\nqg-convert: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "\nqg-convert: unexpected error: %s\n", e.what());
    return 1;
  }
  return 0;
}
