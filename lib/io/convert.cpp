// Checkpoint conversion to safetensors (see convert.h): plan shards by output size, then
// convert and write one shard at a time so memory stays bounded by the shard size.
#include "qinggeng/io/convert.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "io/atomic_file.h"
#include "qinggeng/error.h"
#include "qinggeng/io/safetensors.h"
#include "qinggeng/io/weight_store.h"

namespace qg::io {

namespace fs = std::filesystem;

namespace {

constexpr const char* kSideFiles[] = {"config.json",           "generation_config.json",
                                      "tokenizer_config.json", "special_tokens_map.json",
                                      "ice_text.model",        "tokenizer.model"};
constexpr std::string_view kBufferSuffix = ".rotary_emb.inv_freq";

bool is_dropped_buffer(const std::string& name) {
  return name.size() >= kBufferSuffix.size() &&
         name.compare(name.size() - kBufferSuffix.size(), kBufferSuffix.size(), kBufferSuffix) == 0;
}

// Casts a floating tensor to `target`, a block of elements at a time through float32.
std::vector<std::byte> cast_tensor(const TensorView& view, DType target) {
  const auto numel = static_cast<std::size_t>(view.numel());
  std::vector<std::byte> out(numel * dtype_size(target));
  constexpr std::size_t kBlock = 1 << 16;
  std::vector<float> block(std::min(numel, kBlock));
  const std::size_t src_elem = dtype_size(view.dtype);
  for (std::size_t start = 0; start < numel; start += kBlock) {
    const std::size_t n = std::min(kBlock, numel - start);
    convert_to_f32(view.dtype, view.data + start * src_elem, block.data(), n);
    std::byte* dst = out.data() + start * dtype_size(target);
    for (std::size_t i = 0; i < n; ++i) {
      switch (target) {
        case DType::F16: {
          const std::uint16_t h = float_to_half(block[i]);
          std::memcpy(dst + 2 * i, &h, 2);
          break;
        }
        case DType::BF16: {
          const std::uint16_t b = float_to_bf16(block[i]);
          std::memcpy(dst + 2 * i, &b, 2);
          break;
        }
        case DType::F64: {
          const double d = block[i];
          std::memcpy(dst + 8 * i, &d, 8);
          break;
        }
        default: std::memcpy(dst + 4 * i, &block[i], 4); break;
      }
    }
  }
  return out;
}

void copy_file_atomic(const fs::path& from, const fs::path& to) {
  std::ifstream in(from, std::ios::binary);
  QG_CHECK(in, from.string(), ": cannot open file");
  std::ostringstream content;
  content << in.rdbuf();
  QG_CHECK(!in.bad(), from.string(), ": read failed");
  write_file_atomic(to, content.str());
}

}  // namespace

ConvertReport convert_checkpoint(const fs::path& input, const fs::path& out_dir,
                                 const ConvertOptions& options) {
  QG_CHECK(!options.dtype || is_floating(*options.dtype), "qg-convert: target dtype ",
           dtype_name(*options.dtype), " is not a floating type");
  const WeightStore store = WeightStore::open(input);
  const fs::path in_dir = fs::is_directory(input) ? input : input.parent_path();
  std::error_code ec;
  fs::create_directories(out_dir, ec);
  QG_CHECK(!ec, out_dir.string(), ": cannot create directory (", ec.message(), ")");
  QG_CHECK(!fs::equivalent(in_dir.empty() ? fs::path(".") : in_dir, out_dir, ec), out_dir.string(),
           ": output directory must differ from the input directory");

  ConvertReport report;
  std::vector<const TensorView*> views;
  std::vector<std::string> names;
  std::vector<DType> targets;
  std::vector<std::uint64_t> sizes;
  for (const std::string& name : store.names()) {
    if (!options.keep_buffers && is_dropped_buffer(name)) {
      ++report.tensors_dropped;
      continue;
    }
    const TensorView& view = store.get(name);
    const DType target = options.dtype && is_floating(view.dtype) ? *options.dtype : view.dtype;
    views.push_back(&view);
    names.push_back(name);
    targets.push_back(target);
    sizes.push_back(static_cast<std::uint64_t>(view.numel()) * dtype_size(target));
  }

  const auto shards = plan_safetensors_shards(sizes, options.max_shard_bytes);
  ConvertProgress progress;
  progress.total = views.size();
  for (const SafetensorsShard& shard : shards) {
    std::vector<std::vector<std::byte>> staged;  // cast copies for this shard only
    std::vector<TensorToWrite> part;
    for (std::size_t i : shard.tensors) {
      const TensorView& view = *views[i];
      const void* data = view.data;
      if (targets[i] != view.dtype) {
        staged.push_back(cast_tensor(view, targets[i]));
        data = staged.back().data();
      }
      part.push_back({names[i], targets[i], view.shape, data});
      ++progress.done;
      progress.bytes += sizes[i];
      progress.tensor = names[i];
      if (options.on_progress) options.on_progress(progress);
    }
    write_safetensors(out_dir / shard.file, part, {{"format", "pt"}});
    report.files.push_back(out_dir / shard.file);
  }
  write_safetensors_index(out_dir, shards, names);
  if (shards.size() > 1) report.files.push_back(out_dir / "model.safetensors.index.json");

  for (const char* side : kSideFiles) {
    if (fs::is_regular_file(in_dir / side)) {
      copy_file_atomic(in_dir / side, out_dir / side);
      report.files.push_back(out_dir / side);
    }
  }
  report.tensors_written = views.size();
  report.tensor_bytes = progress.bytes;
  return report;
}

std::optional<DType> parse_convert_dtype(std::string_view text) {
  if (text == "keep") return std::nullopt;
  if (text == "f16" || text == "fp16" || text == "float16") return DType::F16;
  if (text == "bf16" || text == "bfloat16") return DType::BF16;
  if (text == "f32" || text == "fp32" || text == "float32") return DType::F32;
  fail("unknown dtype \"", text, "\" (expected f16, bf16, f32 or keep)");
}

std::uint64_t parse_byte_size(std::string_view text) {
  std::size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) {
    ++i;
  }
  std::string unit(text.substr(i));
  std::transform(unit.begin(), unit.end(), unit.begin(),
                 [](unsigned char c) { return static_cast<char>(std::toupper(c)); });
  struct Unit {
    const char* name;
    double scale;
  };
  constexpr Unit kUnits[] = {{"", 1},
                             {"B", 1},
                             {"KB", 1e3},
                             {"MB", 1e6},
                             {"GB", 1e9},
                             {"TB", 1e12},
                             {"KIB", 1024.0},
                             {"MIB", 1048576.0},
                             {"GIB", 1073741824.0},
                             {"TIB", 1099511627776.0}};
  const Unit* found = nullptr;
  for (const Unit& u : kUnits) {
    if (unit == u.name) found = &u;
  }
  double number = 0;
  std::istringstream parse{std::string(text.substr(0, i))};
  const bool numeric = i > 0 && (parse >> number) && parse.peek() == EOF;
  QG_CHECK(found != nullptr && numeric && std::isfinite(number), "invalid size \"", text,
           "\" (examples: 2GB, 500MB, 1GiB, 1048576)");
  const double bytes = std::floor(number * found->scale);
  QG_CHECK(bytes >= 1 && bytes < 1.8e19, "invalid size \"", text, "\": must be at least 1 byte");
  return static_cast<std::uint64_t>(bytes);
}

}  // namespace qg::io
