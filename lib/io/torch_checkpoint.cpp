// Reading torch.save archives without Python: the ZIP index gives `<archive>/data.pkl` and the
// raw storages `<archive>/data/<key>`; the pickle describes each tensor as
//   torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
//                                   backward_hooks[, metadata])
// where `storage` is the persistent id ('storage', torch.<Type>Storage, key, location, numel).
// Contiguous tensors point into the mapping; strided ones are copied once into owned memory.
#include <algorithm>
#include <cstring>
#include <map>
#include <set>

#include "io/checkpoint_formats.h"
#include "io/pickle.h"
#include "io/zip_archive.h"
#include "qinggeng/error.h"

namespace qg::io {

namespace {

using pickle::Program;
using pickle::Value;
using pickle::ValueId;
using Kind = Value::Kind;

constexpr const char kZipMagic[] = "PK\x03\x04";
// Pre-1.6 torch.save files are a bare pickle starting with a 10-byte LONG1 magic number.
constexpr const char kLegacyMagic[] = "\x80\x02\x8a\x0a";

struct StorageType {
  std::string_view global;
  DType dtype;
};
constexpr StorageType kStorageTypes[] = {
    {"torch.HalfStorage", DType::F16},      {"torch.FloatStorage", DType::F32},
    {"torch.BFloat16Storage", DType::BF16}, {"torch.DoubleStorage", DType::F64},
    {"torch.LongStorage", DType::I64},      {"torch.IntStorage", DType::I32},
    {"torch.ShortStorage", DType::I16},     {"torch.CharStorage", DType::I8},
    {"torch.ByteStorage", DType::U8},       {"torch.BoolStorage", DType::Bool},
};

struct Storage {
  DType dtype;
  const std::byte* data;
  std::uint64_t numel;
};

class TorchReader {
 public:
  TorchReader(std::string fname, const ZipArchive& zip, const Program& prog, std::string prefix)
      : fname_(std::move(fname)), zip_(zip), prog_(prog), prefix_(std::move(prefix)) {}

  ParsedCheckpoint read() {
    ParsedCheckpoint out;
    const Value& dict = prog_.at(select_state_dict());
    std::set<std::string> names;
    for (std::size_t k = 0; k + 1 < dict.items.size(); k += 2) {
      const std::string name = prog_.at(dict.items[k]).s;
      QG_CHECK(names.insert(name).second, fname_, ": tensor '", name, "' is stored twice");
      out.tensors.push_back(rebuild(name, dict.items[k + 1], out.owned));
    }
    return out;
  }

 private:
  const Value& expect(ValueId id, Kind kind, const std::string& context, const char* what) const {
    const Value& v = prog_.at(id);
    QG_CHECK(v.kind == kind, context, ": ", what, " is a ", pickle::kind_name(v.kind),
             ", expected a ", pickle::kind_name(kind));
    return v;
  }

  // A dict whose keys are strings and whose values are all tensor records.
  bool is_state_dict(const Value& v) const {
    if (v.kind != Kind::Dict) return false;
    for (std::size_t k = 0; k + 1 < v.items.size(); k += 2) {
      if (prog_.at(v.items[k]).kind != Kind::String) return false;
      if (prog_.at(v.items[k + 1]).kind != Kind::Reduce) return false;
    }
    return true;
  }

  ValueId select_state_dict() const {
    const Value& root = expect(prog_.root, Kind::Dict, fname_, "the pickled object");
    if (is_state_dict(root)) return prog_.root;
    for (std::string_view wrapper : {"state_dict", "model"}) {
      for (std::size_t k = 0; k + 1 < root.items.size(); k += 2) {
        const Value& key = prog_.at(root.items[k]);
        if (key.kind == Kind::String && key.s == wrapper &&
            is_state_dict(prog_.at(root.items[k + 1]))) {
          return root.items[k + 1];
        }
      }
    }
    for (std::size_t k = 0; k + 1 < root.items.size(); k += 2) {
      const Value& key = prog_.at(root.items[k]);
      QG_CHECK(key.kind == Kind::String, fname_, ": state dict key is a ",
               pickle::kind_name(key.kind), ", expected a str");
      const Value& value = prog_.at(root.items[k + 1]);
      QG_CHECK(value.kind == Kind::Reduce, fname_, ": entry '", key.s, "' is a ",
               pickle::kind_name(value.kind),
               ", not a tensor; expected a state dict of tensors (optionally under "
               "\"state_dict\" or \"model\")");
    }
    fail(fname_, ": no state dict of tensors found");
  }

  std::int64_t as_int(ValueId id, const std::string& context, const char* what) const {
    return expect(id, Kind::Int, context, what).i;
  }

  std::vector<std::int64_t> int_tuple(ValueId id, const std::string& context,
                                      const char* what) const {
    std::vector<std::int64_t> out;
    for (ValueId item : expect(id, Kind::Tuple, context, what).items) {
      out.push_back(as_int(item, context, what));
    }
    return out;
  }

  Storage storage(ValueId pid_id, const std::string& context) {
    const Value& pid = prog_.at(expect(pid_id, Kind::PersistentId, context, "storage").items[0]);
    QG_CHECK(pid.kind == Kind::Tuple && pid.items.size() == 5 &&
                 prog_.at(pid.items[0]).kind == Kind::String &&
                 prog_.at(pid.items[0]).s == "storage",
             context, ": storage reference is not ('storage', type, key, location, numel)");
    const Value& type = expect(pid.items[1], Kind::Global, context, "storage type");
    const std::string& key = expect(pid.items[2], Kind::String, context, "storage key").s;
    const std::int64_t numel = as_int(pid.items[4], context, "storage size");
    QG_CHECK(numel >= 0, context, ": negative storage size ", numel);
    auto known = std::find_if(std::begin(kStorageTypes), std::end(kStorageTypes),
                              [&](const StorageType& t) { return t.global == type.s; });
    QG_CHECK(known != std::end(kStorageTypes), context, ": unsupported storage type ", type.s);

    const std::string entry_name = prefix_ + "/data/" + key;
    const ZipArchive::Entry* entry = zip_.find(entry_name);
    QG_CHECK(entry != nullptr, context, ": storage '", entry_name, "' is missing from the archive");
    const std::size_t elem = dtype_size(known->dtype);
    QG_CHECK(static_cast<std::uint64_t>(numel) <= entry->size / elem, context, ": storage '",
             entry_name, "' holds ", entry->size, " bytes, too few for ", numel, " ",
             dtype_name(known->dtype), " elements");
    auto [it, inserted] = storages_.emplace(
        key, Storage{known->dtype, zip_.bytes(*entry), static_cast<std::uint64_t>(numel)});
    QG_CHECK(it->second.dtype == known->dtype, context, ": storage '", key, "' is used both as ",
             dtype_name(it->second.dtype), " and ", dtype_name(known->dtype));
    if (!inserted) it->second.numel = std::min(it->second.numel, static_cast<std::uint64_t>(numel));
    return it->second;
  }

  TensorView rebuild(const std::string& name, ValueId id,
                     std::vector<std::vector<std::byte>>& owned) {
    const std::string context = fname_ + ": tensor '" + name + "'";
    const Value* call = &expect(id, Kind::Reduce, context, "value");
    if (prog_.at(call->items[0]).kind == Kind::Global &&
        prog_.at(call->items[0]).s == "torch._utils._rebuild_parameter") {
      const Value& args = prog_.at(call->items[1]);
      QG_CHECK(!args.items.empty(), context, ": _rebuild_parameter without arguments");
      call = &expect(args.items[0], Kind::Reduce, context, "parameter data");
    }
    const Value& fn = expect(call->items[0], Kind::Global, context, "rebuild function");
    QG_CHECK(fn.s == "torch._utils._rebuild_tensor_v2" || fn.s == "torch._utils._rebuild_tensor",
             context, ": built by ", fn.s, ", expected torch._utils._rebuild_tensor_v2");
    const Value& args = prog_.at(call->items[1]);
    QG_CHECK(args.items.size() >= 4, context, ": ", fn.s, " needs at least 4 arguments, got ",
             args.items.size());

    const Storage st = storage(args.items[0], context);
    const std::int64_t offset = as_int(args.items[1], context, "storage offset");
    const auto shape = int_tuple(args.items[2], context, "size");
    const auto stride = int_tuple(args.items[3], context, "stride");
    QG_CHECK(offset >= 0, context, ": negative storage offset ", offset);
    QG_CHECK(shape.size() == stride.size(), context, ": size has ", shape.size(),
             " dimensions but stride has ", stride.size());

    TensorView view;
    view.name = name;
    view.source = fname_;
    view.dtype = st.dtype;
    view.shape = shape;
    const std::size_t numel = checked_numel(shape, context);
    const std::size_t elem = dtype_size(st.dtype);
    view.nbytes = numel * elem;
    if (numel == 0) {
      view.data = st.data;
      return view;
    }

    // Largest element index the view touches; every term is checked against the storage.
    std::uint64_t last = static_cast<std::uint64_t>(offset);
    bool contiguous = true;
    std::int64_t expected_stride = 1;
    for (std::size_t d = shape.size(); d-- > 0;) {
      QG_CHECK(stride[d] >= 0, context, ": negative stride ", stride[d]);
      const auto span =
          static_cast<unsigned __int128>(shape[d] - 1) * static_cast<std::uint64_t>(stride[d]);
      QG_CHECK(span < st.numel && last + static_cast<std::uint64_t>(span) >= last, context,
               ": strides reach past the storage");
      last += static_cast<std::uint64_t>(span);
      if (shape[d] != 1 && stride[d] != expected_stride) contiguous = false;
      expected_stride *= shape[d];
    }
    QG_CHECK(last < st.numel, context, ": elements up to index ", last,
             " lie outside its storage of ", st.numel, " elements");

    if (contiguous) {
      view.data = st.data + static_cast<std::size_t>(offset) * elem;
      return view;
    }
    // A strided view is copied; refusing views with more elements than their storage (zero
    // or overlapping strides) bounds that copy by the file size.
    QG_CHECK(numel <= st.numel, context, ": strided view of ", numel,
             " elements over a storage of ", st.numel,
             " (broadcast or overlapping strides); save tensor.contiguous() instead");
    std::vector<std::byte> copy(view.nbytes);
    std::vector<std::int64_t> index(shape.size(), 0);
    std::uint64_t src = static_cast<std::uint64_t>(offset);
    for (std::size_t i = 0; i < numel; ++i) {
      std::memcpy(copy.data() + i * elem, st.data + src * elem, elem);
      for (std::size_t d = shape.size(); d-- > 0;) {  // odometer step, last dim fastest
        src += static_cast<std::uint64_t>(stride[d]);
        if (++index[d] < shape[d]) break;
        src -= static_cast<std::uint64_t>(stride[d] * shape[d]);
        index[d] = 0;
      }
    }
    owned.push_back(std::move(copy));
    view.data = owned.back().data();
    return view;
  }

  std::string fname_;
  const ZipArchive& zip_;
  const Program& prog_;
  std::string prefix_;
  std::map<std::string, Storage> storages_;
};

}  // namespace

bool looks_like_torch_checkpoint(const std::byte* data, std::size_t size) {
  return size >= 4 &&
         (std::memcmp(data, kZipMagic, 4) == 0 || std::memcmp(data, kLegacyMagic, 4) == 0);
}

ParsedCheckpoint parse_torch_checkpoint(const std::byte* data, std::size_t size,
                                        const std::string& fname) {
  QG_CHECK(!(size >= 4 && std::memcmp(data, kLegacyMagic, 4) == 0), fname,
           ": legacy (pre-1.6) torch.save format is not supported; re-save it with a newer "
           "PyTorch or convert it to safetensors");
  const ZipArchive zip(data, size, fname);
  const ZipArchive::Entry* pkl = nullptr;
  std::string prefix;
  for (const auto& e : zip.entries()) {
    const auto slash = e.name.find('/');
    if (slash != std::string::npos && e.name.compare(slash, std::string::npos, "/data.pkl") == 0) {
      pkl = &e;
      prefix = e.name.substr(0, slash);
      break;
    }
  }
  QG_CHECK(pkl != nullptr, fname, ": no <archive>/data.pkl entry; not a torch.save checkpoint");
  const Program prog = pickle::run(zip.bytes(*pkl), static_cast<std::size_t>(pkl->size), fname);
  return TorchReader(fname, zip, prog, prefix).read();
}

}  // namespace qg::io
