// safetensors reading (validation and indexing of a mapped file) and writing (single file,
// shard planning, index). Format: u64 LE header length N, N bytes of JSON, then the data.
#include "qinggeng/io/safetensors.h"

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <set>

#include "io/atomic_file.h"
#include "io/checkpoint_formats.h"
#include "io/json.h"
#include "qinggeng/error.h"

namespace qg::io {

namespace {

// The reference reader refuses headers above 100 MB; so do we (a corrupt length must not make
// us parse gigabytes of tensor data as JSON).
constexpr std::uint64_t kMaxHeaderBytes = 100'000'000;
constexpr const char* kIndexFile = "model.safetensors.index.json";
constexpr const char* kSingleFile = "model.safetensors";

std::vector<std::int64_t> parse_shape(simdjson::dom::element e, const std::string& context) {
  simdjson::dom::array dims;
  QG_CHECK(!e.get(dims), context, ": \"shape\" must be an array of integers");
  std::vector<std::int64_t> shape;
  for (simdjson::dom::element d : dims) {
    std::int64_t v;
    QG_CHECK(!d.get(v), context, ": \"shape\" must be an array of integers");
    QG_CHECK(v >= 0, context, ": negative dimension ", v, " in \"shape\"");
    shape.push_back(v);
  }
  return shape;
}

std::pair<std::uint64_t, std::uint64_t> parse_offsets(simdjson::dom::element e,
                                                      const std::string& context) {
  simdjson::dom::array arr;
  QG_CHECK(!e.get(arr) && arr.size() == 2, context,
           ": \"data_offsets\" must be an array of two non-negative integers");
  std::uint64_t v[2];
  for (std::size_t i = 0; i < 2; ++i) {
    QG_CHECK(!arr.at(i).get(v[i]), context,
             ": \"data_offsets\" must be an array of two non-negative integers");
  }
  return {v[0], v[1]};
}

simdjson::dom::element required(simdjson::dom::object o, std::string_view key,
                                const std::string& context) {
  simdjson::dom::element e;
  QG_CHECK(!o[key].get(e), context, ": missing field \"", key, "\"");
  return e;
}

// Order of the reference writer: descending dtype rank, then name. The rank follows the
// reference crate's Dtype declaration order, which puts wider types later.
int dtype_rank(DType t) {
  switch (t) {
    case DType::Bool: return 0;
    case DType::U8: return 1;
    case DType::I8: return 2;
    case DType::I16: return 3;
    case DType::F16: return 4;
    case DType::BF16: return 5;
    case DType::I32: return 6;
    case DType::F32: return 7;
    case DType::F64: return 8;
    case DType::I64: return 9;
  }
  return 0;
}

}  // namespace

// ---- reading ---------------------------------------------------------------------------------

ParsedCheckpoint parse_safetensors(const std::byte* data, std::size_t size,
                                   const std::string& fname) {
  QG_CHECK(size >= 8, fname, ": too small for a safetensors file (", size, " bytes)");
  std::uint64_t header_len = 0;
  for (int i = 0; i < 8; ++i) header_len |= static_cast<std::uint64_t>(data[i]) << (8 * i);
  QG_CHECK(header_len <= size - 8, fname, ": header length ", header_len,
           " exceeds the file size (", size, " bytes)");
  QG_CHECK(header_len <= kMaxHeaderBytes, fname, ": header length ", header_len,
           " is implausibly large");
  const auto* header = reinterpret_cast<const char*>(data + 8);
  const std::size_t data_start = 8 + static_cast<std::size_t>(header_len);
  const std::uint64_t data_size = size - data_start;

  const auto doc = json::Document::parse(std::string_view(header, header_len), fname);
  const auto root = json::as_object(doc.root(), fname, "the header");

  ParsedCheckpoint out;
  std::set<std::string_view> seen;
  for (auto [key, value] : root) {
    const std::string name(key);
    QG_CHECK(seen.insert(key).second, fname, ": tensor '", name, "' is listed twice");
    if (key == "__metadata__") {
      const auto meta = json::as_object(value, fname, "\"__metadata__\"");
      for (auto [mkey, mvalue] : meta) {
        std::string_view s;
        QG_CHECK(!mvalue.get(s), fname, ": __metadata__ value of \"", mkey, "\" must be a string");
        out.metadata.emplace(std::string(mkey), std::string(s));
      }
      continue;
    }
    const std::string context = fname + ": tensor '" + name + "'";
    simdjson::dom::object entry;
    QG_CHECK(!value.get(entry), context, ": entry must be a JSON object");
    std::string_view dtype_str;
    QG_CHECK(!required(entry, "dtype", context).get(dtype_str), context,
             ": \"dtype\" must be a string");
    TensorView view;
    view.name = name;
    view.source = fname;
    view.dtype = parse_dtype(dtype_str, context);
    view.shape = parse_shape(required(entry, "shape", context), context);
    const auto [begin, end] = parse_offsets(required(entry, "data_offsets", context), context);
    QG_CHECK(begin <= end && end <= data_size, context, ": data_offsets [", begin, ", ", end,
             "] fall outside the data region (", data_size, " bytes)");
    const std::size_t numel = checked_numel(view.shape, context);
    view.nbytes = numel * dtype_size(view.dtype);
    QG_CHECK(end - begin == view.nbytes, context, ": data_offsets span ", end - begin,
             " bytes but shape ", view.shape_string(), " of ", dtype_name(view.dtype), " needs ",
             view.nbytes);
    view.data = data + data_start + begin;
    out.tensors.push_back(std::move(view));
  }
  return out;
}

// ---- writing ---------------------------------------------------------------------------------

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  const std::string fname = path.string();
  std::vector<std::size_t> order(tensors.size());
  std::iota(order.begin(), order.end(), std::size_t{0});
  std::sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) {
    const int ra = dtype_rank(tensors[a].dtype), rb = dtype_rank(tensors[b].dtype);
    return ra != rb ? ra > rb : tensors[a].name < tensors[b].name;
  });

  std::string header = "{";
  if (!metadata.empty()) {
    header += "\"__metadata__\":{";
    bool first = true;
    for (const auto& [k, v] : metadata) {
      if (!first) header += ',';
      first = false;
      header += json::quote(k) + ':' + json::quote(v);
    }
    header += '}';
  }
  std::set<std::string_view> names;
  std::vector<std::size_t> nbytes(tensors.size());
  std::uint64_t offset = 0;
  for (std::size_t i : order) {
    const TensorToWrite& t = tensors[i];
    const std::string context = fname + ": tensor '" + t.name + "'";
    QG_CHECK(!t.name.empty() && t.name != "__metadata__", fname, ": invalid tensor name '", t.name,
             "'");
    QG_CHECK(names.insert(t.name).second, context, ": name given twice");
    nbytes[i] = checked_numel(t.shape, context) * dtype_size(t.dtype);
    QG_CHECK(t.data != nullptr || nbytes[i] == 0, context, ": no data");
    if (header.size() > 1) header += ',';
    header += json::quote(t.name) + ":{\"dtype\":\"" + std::string(dtype_name(t.dtype)) +
              "\",\"shape\":[";
    for (std::size_t d = 0; d < t.shape.size(); ++d) {
      if (d != 0) header += ',';
      header += std::to_string(t.shape[d]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + ',' +
              std::to_string(offset + nbytes[i]) + "]}";
    offset += nbytes[i];
  }
  header += '}';
  header.append((8 - header.size() % 8) % 8, ' ');

  unsigned char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<unsigned char>(header.size() >> (8 * i));
  AtomicFileWriter out(path);
  out.write(len_bytes, sizeof len_bytes);
  out.write(header);
  for (std::size_t i : order) out.write(tensors[i].data, nbytes[i]);
  out.commit();
}

std::vector<SafetensorsShard> plan_safetensors_shards(
    const std::vector<std::uint64_t>& tensor_bytes, std::uint64_t max_shard_bytes) {
  QG_CHECK(max_shard_bytes > 0, "safetensors shard size must be positive");
  std::vector<SafetensorsShard> shards;
  for (std::size_t i = 0; i < tensor_bytes.size(); ++i) {
    if (shards.empty() || (!shards.back().tensors.empty() &&
                           shards.back().nbytes + tensor_bytes[i] > max_shard_bytes)) {
      shards.emplace_back();
    }
    shards.back().tensors.push_back(i);
    shards.back().nbytes += tensor_bytes[i];
  }
  if (shards.empty()) shards.emplace_back();  // no tensors: still one (empty) file
  if (shards.size() == 1) {
    shards[0].file = kSingleFile;
  } else {
    for (std::size_t s = 0; s < shards.size(); ++s) {
      char name[64];
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
      shards[s].file = name;
    }
  }
  return shards;
}

void write_safetensors_index(const std::filesystem::path& dir,
                             const std::vector<SafetensorsShard>& shards,
                             const std::vector<std::string>& names) {
  std::error_code ignored;
  if (shards.size() <= 1) {
    std::filesystem::remove(dir / kIndexFile, ignored);
    return;
  }
  std::uint64_t total = 0;
  std::map<std::string_view, std::string_view> weight_map;  // sorted, like the HF writer
  for (const SafetensorsShard& shard : shards) {
    total += shard.nbytes;
    for (std::size_t i : shard.tensors) {
      QG_CHECK(i < names.size(), (dir / kIndexFile).string(), ": shard plan names tensor ", i,
               " of ", names.size());
      QG_CHECK(weight_map.emplace(names[i], shard.file).second, (dir / kIndexFile).string(),
               ": tensor '", names[i], "' is planned twice");
    }
  }
  std::string text = "{\n  \"metadata\": {\n    \"total_size\": " + std::to_string(total) +
                     "\n  },\n  \"weight_map\": {";
  bool first = true;
  for (const auto& [name, file] : weight_map) {
    text += first ? "\n    " : ",\n    ";
    first = false;
    text += json::quote(name) + ": " + json::quote(file);
  }
  text += "\n  }\n}\n";
  write_file_atomic(dir / kIndexFile, text);
  std::filesystem::remove(dir / kSingleFile, ignored);
}

std::vector<std::filesystem::path> write_safetensors_sharded(
    const std::filesystem::path& dir, const std::vector<TensorToWrite>& tensors,
    std::uint64_t max_shard_bytes, const std::map<std::string, std::string>& metadata) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  QG_CHECK(!ec, dir.string(), ": cannot create directory (", ec.message(), ")");
  std::vector<std::uint64_t> sizes;
  std::vector<std::string> names;
  std::set<std::string_view> unique;
  for (const TensorToWrite& t : tensors) {
    QG_CHECK(unique.insert(t.name).second, dir.string(), ": tensor '", t.name, "' given twice");
    sizes.push_back(checked_numel(t.shape, "tensor '" + t.name + "'") * dtype_size(t.dtype));
    names.push_back(t.name);
  }
  const auto shards = plan_safetensors_shards(sizes, max_shard_bytes);
  std::vector<std::filesystem::path> written;
  for (const SafetensorsShard& shard : shards) {
    std::vector<TensorToWrite> part;
    for (std::size_t i : shard.tensors) part.push_back(tensors[i]);
    write_safetensors(dir / shard.file, part, metadata);
    written.push_back(dir / shard.file);
  }
  write_safetensors_index(dir, shards, names);
  if (shards.size() > 1) written.push_back(dir / kIndexFile);
  return written;
}

}  // namespace qg::io
