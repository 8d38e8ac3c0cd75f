// Merging a LoRA adapter into a base checkpoint and writing it as safetensors, shard by shard
// (see lora/merge.h).
#include "qinggeng/lora/merge.h"

#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "qinggeng/error.h"
#include "qinggeng/io/safetensors.h"

namespace qg::lora {
namespace {

struct MergeTarget {
  int layer;
  LoraTarget target;
};

/// Merged weight in the stored dtype of `view`.
std::vector<std::byte> merged_weight(const io::WeightStore& base, const io::TensorView& view,
                                     const LoraAdapter& adapter, const MergeTarget& m) {
  const auto [in, out] = adapter.features(m.target);
  QG_CHECK(is_floating(view.dtype), base.path().string(), ": ", view.name, " has dtype ",
           dtype_name(view.dtype), "; only floating weights can take a LoRA merge");
  std::vector<float> w = base.read_f32(view.name, {out, in});
  merge_factors(w.data(), out, in, adapter.factors(m.layer, m.target));
  std::vector<std::byte> bytes(view.nbytes);
  for (std::size_t i = 0; i < w.size(); ++i) {
    switch (view.dtype) {
      case DType::F16: {
        const std::uint16_t h = float_to_half(w[i]);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
        break;
      }
      case DType::BF16: {
        const std::uint16_t h = float_to_bf16(w[i]);
        std::memcpy(bytes.data() + 2 * i, &h, 2);
        break;
      }
      case DType::F64: {
        const double d = w[i];
        std::memcpy(bytes.data() + 8 * i, &d, 8);
        break;
      }
      default: std::memcpy(bytes.data() + 4 * i, &w[i], 4); break;
    }
  }
  return bytes;
}

bool is_checkpoint_file(const std::filesystem::path& file) {
  const std::string name = file.filename().string();
  const std::string ext = file.extension().string();
  return ext == ".bin" || ext == ".safetensors" ||
         (name.size() > 11 && name.compare(name.size() - 11, 11, ".index.json") == 0);
}

}  // namespace

void merge_factors(float* w, std::int64_t out, std::int64_t in, const LoraFactors& f) {
  if (f.rank == 0) return;
  QG_CHECK(f.a && f.b, "merge_factors: factors without A/B");
  for (std::int64_t o = 0; o < out; ++o) {
    float* row = w + o * in;
    for (std::int64_t k = 0; k < f.rank; ++k) {
      const float coeff = f.scale * f.b[o * f.rank + k];
      const float* a = f.a + k * in;
      for (std::int64_t i = 0; i < in; ++i) row[i] += coeff * a[i];
    }
  }
}

std::vector<std::filesystem::path> merge_lora(const io::WeightStore& base,
                                              const LoraAdapter& adapter,
                                              const std::filesystem::path& out_dir,
                                              const MergeOptions& options) {
  namespace fs = std::filesystem;
  const fs::path& base_path = base.path();
  QG_CHECK(!(fs::exists(out_dir) && fs::exists(base_path) && fs::equivalent(out_dir, base_path)),
           out_dir.string(), ": the merged model must not overwrite the base checkpoint");

  std::map<std::string, MergeTarget> targets;
  for (int layer = 0; layer < adapter.num_layers(); ++layer) {
    for (LoraTarget t : kLoraTargets) {
      if (!adapter.has(layer, t)) continue;
      const std::string name = base_weight_name(layer, t);
      QG_CHECK(base.contains(name), base_path.string(), ": the adapter targets ", name,
               " but the base checkpoint has no such tensor");
      targets.emplace(name, MergeTarget{layer, t});
    }
  }

  const std::vector<std::string> names = base.names();
  std::vector<std::uint64_t> sizes;
  for (const std::string& name : names) sizes.push_back(base.get(name).nbytes);
  const auto shards = io::plan_safetensors_shards(sizes, options.max_shard_bytes);
  fs::create_directories(out_dir);
  const std::map<std::string, std::string> metadata{{"format", "pt"}};
  std::vector<fs::path> written;
  for (const io::SafetensorsShard& shard : shards) {
    std::vector<std::unique_ptr<std::vector<std::byte>>> merged;  // alive until written
    std::vector<io::TensorToWrite> tensors;
    for (std::size_t index : shard.tensors) {
      const io::TensorView& view = base.get(names[index]);
      io::TensorToWrite t{view.name, view.dtype, view.shape, view.data};
      const auto target = targets.find(view.name);
      if (target != targets.end()) {
        merged.push_back(std::make_unique<std::vector<std::byte>>(
            merged_weight(base, view, adapter, target->second)));
        t.data = merged.back()->data();
      }
      tensors.push_back(std::move(t));
    }
    written.push_back(out_dir / shard.file);
    io::write_safetensors(written.back(), tensors, metadata);
  }
  io::write_safetensors_index(out_dir, shards, names);
  if (shards.size() > 1) written.push_back(out_dir / "model.safetensors.index.json");

  if (options.copy_other_files && fs::is_directory(base_path)) {
    for (const fs::directory_entry& entry : fs::directory_iterator(base_path)) {
      if (!entry.is_regular_file() || is_checkpoint_file(entry.path())) continue;
      fs::copy_file(entry.path(), out_dir / entry.path().filename(),
                    fs::copy_options::overwrite_existing);
    }
  }
  return written;
}

}  // namespace qg::lora
