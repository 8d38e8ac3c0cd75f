// Test support: builds torch.save-style archives byte by byte (a stored ZIP, optionally with
// ZIP64 records or a compressed-method entry, holding a hand-assembled pickle and raw
// storages), so the reader's handling of layouts and malformed input can be tested without
// PyTorch.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace qg::test {

inline void put_le(std::string& out, std::uint64_t v, int bytes) {
  for (int i = 0; i < bytes; ++i) out += static_cast<char>((v >> (8 * i)) & 0xff);
}

/// A stored (uncompressed) ZIP archive assembled in memory.
struct ZipBuilder {
  struct Item {
    std::string name, data;
    std::uint16_t method = 0;
  };
  std::vector<Item> items;
  bool zip64 = false;  ///< write ZIP64 extra fields and end records for every entry

  void add(std::string name, std::string data, std::uint16_t method = 0) {
    items.push_back({std::move(name), std::move(data), method});
  }

  std::string build() const {
    std::string out, central;
    for (const Item& it : items) {
      const std::uint64_t local = out.size();
      put_le(out, 0x04034b50, 4);
      put_le(out, 20, 2);
      put_le(out, 0, 2);
      put_le(out, it.method, 2);
      put_le(out, 0, 4);  // time, date
      put_le(out, 0, 4);  // crc (not checked)
      put_le(out, it.data.size(), 4);
      put_le(out, it.data.size(), 4);
      put_le(out, it.name.size(), 2);
      put_le(out, 0, 2);
      out += it.name;
      out += it.data;

      put_le(central, 0x02014b50, 4);
      put_le(central, 45, 2);
      put_le(central, 45, 2);
      put_le(central, 0, 2);
      put_le(central, it.method, 2);
      put_le(central, 0, 4);
      put_le(central, 0, 4);
      put_le(central, zip64 ? 0xffffffffu : it.data.size(), 4);
      put_le(central, zip64 ? 0xffffffffu : it.data.size(), 4);
      put_le(central, it.name.size(), 2);
      put_le(central, zip64 ? 4 + 24 : 0, 2);
      put_le(central, 0, 2);  // comment
      put_le(central, 0, 2);  // disk
      put_le(central, 0, 2);
      put_le(central, 0, 4);
      put_le(central, zip64 ? 0xffffffffu : local, 4);
      central += it.name;
      if (zip64) {
        put_le(central, 0x0001, 2);
        put_le(central, 24, 2);
        put_le(central, it.data.size(), 8);
        put_le(central, it.data.size(), 8);
        put_le(central, local, 8);
      }
    }
    const std::uint64_t cd_offset = out.size();
    out += central;
    if (zip64) {
      const std::uint64_t eocd64 = out.size();
      put_le(out, 0x06064b50, 4);
      put_le(out, 44, 8);
      put_le(out, 45, 2);
      put_le(out, 45, 2);
      put_le(out, 0, 4);
      put_le(out, 0, 4);
      put_le(out, items.size(), 8);
      put_le(out, items.size(), 8);
      put_le(out, central.size(), 8);
      put_le(out, cd_offset, 8);
      put_le(out, 0x07064b50, 4);
      put_le(out, 0, 4);
      put_le(out, eocd64, 8);
      put_le(out, 1, 4);
    }
    put_le(out, 0x06054b50, 4);
    put_le(out, 0, 2);
    put_le(out, 0, 2);
    put_le(out, zip64 ? 0xffff : items.size(), 2);
    put_le(out, zip64 ? 0xffff : items.size(), 2);
    put_le(out, zip64 ? 0xffffffffu : central.size(), 4);
    put_le(out, zip64 ? 0xffffffffu : cd_offset, 4);
    put_le(out, 0, 2);
    return out;
  }
};

/// Emits pickle opcodes (protocol 2) the way torch.save does for a state dict.
struct PickleWriter {
  std::string out = "\x80\x02";

  PickleWriter& op(char c) {
    out += c;
    return *this;
  }
  PickleWriter& mark() { return op('('); }
  PickleWriter& str(const std::string& s) {
    op('X');
    put_le(out, s.size(), 4);
    out += s;
    return *this;
  }
  PickleWriter& global(const std::string& module, const std::string& name) {
    op('c');
    out += module + "\n" + name + "\n";
    return *this;
  }
  PickleWriter& integer(std::int64_t v) {
    if (v >= 0 && v < 256) {
      op('K');
      put_le(out, static_cast<std::uint64_t>(v), 1);
    } else {
      out += '\x8a';
      out += '\x08';
      put_le(out, static_cast<std::uint64_t>(v), 8);
    }
    return *this;
  }
  PickleWriter& int_tuple(const std::vector<std::int64_t>& v) {
    mark();
    for (std::int64_t x : v) integer(x);
    return op('t');
  }
  /// Pushes torch._utils._rebuild_tensor_v2(<storage>, offset, size, stride, False, {}).
  PickleWriter& tensor(const std::string& storage_type, const std::string& key,
                       std::int64_t storage_numel, std::int64_t offset,
                       const std::vector<std::int64_t>& size,
                       const std::vector<std::int64_t>& stride) {
    global("torch._utils", "_rebuild_tensor_v2");
    mark();
    mark().str("storage").global("torch", storage_type).str(key).str("cpu");
    integer(storage_numel).op('t').op('Q');
    integer(offset).int_tuple(size).int_tuple(stride).op('\x89');
    global("collections", "OrderedDict").op(')').op('R');
    return op('t').op('R');
  }
  std::string finish() { return out + "."; }
};

/// One storage and one tensor view of it, for torch_archive().
struct FakeTensor {
  std::string name, storage_type, key;
  std::string bytes;  ///< storage contents
  std::int64_t storage_numel;
  std::int64_t offset;
  std::vector<std::int64_t> size, stride;
};

/// A torch.save archive named `archive` holding an OrderedDict of `tensors`.
inline std::string torch_archive(const std::vector<FakeTensor>& tensors, bool zip64 = false,
                                 const std::string& archive = "archive") {
  PickleWriter p;
  p.global("collections", "OrderedDict").op(')').op('R').mark();
  for (const FakeTensor& t : tensors) {
    p.str(t.name).tensor(t.storage_type, t.key, t.storage_numel, t.offset, t.size, t.stride);
  }
  p.op('u');
  ZipBuilder zip;
  zip.zip64 = zip64;
  zip.add(archive + "/data.pkl", p.finish());
  for (const FakeTensor& t : tensors) zip.add(archive + "/data/" + t.key, t.bytes);
  zip.add(archive + "/version", "3\n");
  return zip.build();
}

}  // namespace qg::test
