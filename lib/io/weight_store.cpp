// WeightStore: opens a checkpoint (single file or sharded directory with an index), maps each
// file once and indexes every tensor by name (see weight_store.h).
#include "qinggeng/io/weight_store.h"

#include <algorithm>
#include <map>
#include <sstream>

#include "io/checkpoint_formats.h"
#include "io/json.h"
#include "io/mapped_file.h"
#include "qinggeng/error.h"

namespace qg::io {

namespace fs = std::filesystem;

namespace {

// Beyond 2^62 elements numel * dtype_size could overflow; no real tensor comes close.
constexpr std::uint64_t kMaxNumel = std::uint64_t{1} << 56;

std::string render_shape(const std::vector<std::int64_t>& shape) {
  std::ostringstream out;
  out << '[';
  for (std::size_t i = 0; i < shape.size(); ++i) out << (i ? ", " : "") << shape[i];
  out << ']';
  return out.str();
}

bool ends_with(const std::string& s, std::string_view suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

}  // namespace

std::size_t checked_numel(const std::vector<std::int64_t>& shape, const std::string& context) {
  std::uint64_t n = 1;
  for (std::int64_t d : shape) {
    QG_CHECK(d >= 0, context, ": negative dimension ", d, " in shape ", render_shape(shape));
    QG_CHECK(d == 0 || n <= kMaxNumel / static_cast<std::uint64_t>(d), context, ": shape ",
             render_shape(shape), " has too many elements");
    n *= static_cast<std::uint64_t>(d);
  }
  return static_cast<std::size_t>(n);
}

std::int64_t TensorView::numel() const {
  std::int64_t n = 1;
  for (std::int64_t d : shape) n *= d;
  return n;
}

std::string TensorView::shape_string() const { return render_shape(shape); }

struct WeightStore::Impl {
  fs::path path;
  std::vector<MappedFile> files;
  std::vector<std::vector<std::byte>> owned;
  std::map<std::string, TensorView, std::less<>> tensors;

  // Maps `file` and adds its tensors (a name already stored from another file is an error).
  void load(const fs::path& file) {
    MappedFile mapped = MappedFile::open(file);
    ParsedCheckpoint parsed =
        looks_like_torch_checkpoint(mapped.data(), mapped.size())
            ? parse_torch_checkpoint(mapped.data(), mapped.size(), mapped.name())
            : parse_safetensors(mapped.data(), mapped.size(), mapped.name());
    for (TensorView& view : parsed.tensors) {
      auto it = tensors.find(view.name);
      QG_CHECK(it == tensors.end(), "tensor '", view.name, "' is stored twice: in ",
               it->second.source, " and in ", view.source);
      tensors.emplace(view.name, std::move(view));
    }
    for (auto& buffer : parsed.owned) owned.push_back(std::move(buffer));
    files.push_back(std::move(mapped));
  }

  void load_index(const fs::path& index_file) {
    const auto doc = json::Document::load(index_file);
    const std::string origin = index_file.string();
    const auto root = json::as_object(doc.root(), origin, "the index");
    simdjson::dom::element map_element;
    QG_CHECK(!root["weight_map"].get(map_element), origin, ": missing field \"weight_map\"");
    const auto weight_map = json::as_object(map_element, origin, "\"weight_map\"");

    std::map<std::string, std::vector<std::string>> by_file;  // shard -> names it must hold
    for (auto [name, value] : weight_map) {
      std::string_view shard;
      QG_CHECK(!value.get(shard), origin, ": weight_map entry for '", name,
               "' must be a file name");
      const fs::path rel(shard);
      QG_CHECK(
          !shard.empty() && rel.is_relative() &&
              std::none_of(rel.begin(), rel.end(), [](const fs::path& p) { return p == ".."; }),
          origin, ": weight_map entry for '", name, "' names \"", shard,
          "\", expected a file beside the index");
      by_file[std::string(shard)].emplace_back(name);
    }
    QG_CHECK(!by_file.empty(), origin, ": weight_map lists no tensors");
    const fs::path dir = index_file.parent_path();
    for (const auto& [shard, expected] : by_file) {
      const fs::path shard_path = dir / shard;
      QG_CHECK(fs::is_regular_file(shard_path), origin, ": shard ", shard_path.string(),
               " (holding '", expected.front(), "') does not exist");
      load(shard_path);
      for (const std::string& name : expected) {
        auto it = tensors.find(name);
        QG_CHECK(it != tensors.end() && it->second.source == shard_path.string(), origin,
                 ": tensor '", name, "' is listed in ", shard, " but not stored there");
      }
    }
  }
};

WeightStore WeightStore::open(const fs::path& path) {
  auto impl = std::make_unique<Impl>();
  impl->path = path;
  std::error_code ec;
  const auto status = fs::status(path, ec);
  QG_CHECK(fs::exists(status), path.string(), ": no such file or directory");
  fs::path file = path;
  if (fs::is_directory(status)) {
    file.clear();
    for (const char* candidate : {"model.safetensors.index.json", "model.safetensors",
                                  "pytorch_model.bin.index.json", "pytorch_model.bin"}) {
      if (fs::exists(path / candidate)) {
        file = path / candidate;
        break;
      }
    }
    QG_CHECK(!file.empty(), path.string(),
             ": no checkpoint found (looked for model.safetensors.index.json, "
             "model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin)");
  }
  if (ends_with(file.filename().string(), ".index.json")) {
    impl->load_index(file);
  } else {
    impl->load(file);
  }
  return WeightStore(std::move(impl));
}

WeightStore::WeightStore(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
WeightStore::WeightStore(WeightStore&&) noexcept = default;
WeightStore& WeightStore::operator=(WeightStore&&) noexcept = default;
WeightStore::~WeightStore() = default;

bool WeightStore::contains(std::string_view name) const {
  return impl_->tensors.find(name) != impl_->tensors.end();
}

const TensorView& WeightStore::get(std::string_view name) const {
  auto it = impl_->tensors.find(name);
  QG_CHECK(it != impl_->tensors.end(), "tensor '", name, "' not found in ", impl_->path.string(),
           " (", impl_->tensors.size(), " tensors stored)");
  return it->second;
}

const TensorView& WeightStore::get(std::string_view name,
                                   const std::vector<std::int64_t>& shape) const {
  const TensorView& view = get(name);
  QG_CHECK(view.shape == shape, view.source, ": tensor '", name, "' has shape ",
           view.shape_string(), ", expected ", render_shape(shape));
  return view;
}

std::vector<float> WeightStore::read_f32(std::string_view name,
                                         const std::vector<std::int64_t>& shape) const {
  const TensorView& view = get(name, shape);
  QG_CHECK(is_floating(view.dtype), view.source, ": tensor '", name, "' has dtype ",
           dtype_name(view.dtype), ", expected a floating type");
  std::vector<float> out(static_cast<std::size_t>(view.numel()));
  convert_to_f32(view.dtype, view.data, out.data(), out.size());
  return out;
}

std::vector<std::string> WeightStore::names() const {
  std::vector<std::string> out;
  out.reserve(impl_->tensors.size());
  for (const auto& entry : impl_->tensors) out.push_back(entry.first);
  return out;
}

const fs::path& WeightStore::path() const { return impl_->path; }

}  // namespace qg::io
