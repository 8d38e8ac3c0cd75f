// ZIP central-directory parsing for torch.save archives (see zip_archive.h). Record layouts
// follow PKWARE's APPNOTE: end of central directory (EOCD), ZIP64 EOCD locator and record,
// central directory file headers, local file headers.
#include "io/zip_archive.h"

#include <algorithm>

#include "io/byte_reader.h"
#include "qinggeng/error.h"

namespace qg::io {

namespace {
constexpr std::uint32_t kEocdSig = 0x06054b50;
constexpr std::uint32_t kZip64LocatorSig = 0x07064b50;
constexpr std::uint32_t kZip64EocdSig = 0x06064b50;
constexpr std::uint32_t kCentralSig = 0x02014b50;
constexpr std::uint32_t kLocalSig = 0x04034b50;
constexpr std::size_t kEocdSize = 22;
constexpr std::size_t kZip64LocatorSize = 20;
constexpr std::uint16_t kZip64ExtraId = 0x0001;

struct Directory {
  std::uint64_t entries = 0;
  std::uint64_t size = 0;
  std::uint64_t offset = 0;
};

// The EOCD sits at the end, followed only by a comment of at most 64 KiB: scan backwards.
std::size_t find_eocd(ByteReader& r) {
  QG_CHECK(r.size() >= kEocdSize, r.origin(), ": not a ZIP archive (", r.size(), " bytes)");
  const std::size_t last = r.size() - kEocdSize;
  const std::size_t first = last > 0xffff ? last - 0xffff : 0;
  for (std::size_t pos = last + 1; pos-- > first;) {
    r.seek(pos);
    if (r.u32() == kEocdSig) return pos;
  }
  fail(r.origin(), ": not a ZIP archive (no end-of-central-directory record)");
}

Directory read_directory(ByteReader& r) {
  const std::size_t eocd = find_eocd(r);
  r.seek(eocd + 4);
  const std::uint16_t disk = r.u16();
  const std::uint16_t cd_disk = r.u16();
  r.skip(2);  // entries on this disk
  Directory dir;
  dir.entries = r.u16();
  dir.size = r.u32();
  dir.offset = r.u32();
  const bool zip64 = dir.entries == 0xffff || dir.size == 0xffffffffu || dir.offset == 0xffffffffu;
  if (eocd >= kZip64LocatorSize) {
    r.seek(eocd - kZip64LocatorSize);
    if (r.u32() == kZip64LocatorSig) {
      r.skip(4);  // disk with the ZIP64 EOCD
      r.seek(r.u64());
      QG_CHECK(r.u32() == kZip64EocdSig, r.origin(), ": corrupt ZIP64 end-of-central-directory");
      r.skip(8 + 2 + 2);  // record size, versions
      const std::uint32_t disk64 = r.u32();
      const std::uint32_t cd_disk64 = r.u32();
      QG_CHECK(disk64 == 0 && cd_disk64 == 0, r.origin(), ": multi-volume ZIP not supported");
      r.skip(8);  // entries on this disk
      dir.entries = r.u64();
      dir.size = r.u64();
      dir.offset = r.u64();
      return dir;
    }
  }
  QG_CHECK(!zip64, r.origin(), ": ZIP64 archive without a ZIP64 end-of-central-directory");
  QG_CHECK(disk == 0 && cd_disk == 0, r.origin(), ": multi-volume ZIP not supported");
  return dir;
}

// Replaces the 0xffffffff placeholders of a central header from its ZIP64 extra field.
void apply_zip64_extra(ByteReader extra, std::uint64_t& usize, std::uint64_t& csize,
                       std::uint64_t& local, const std::string& what) {
  while (extra.remaining() >= 4) {
    const std::uint16_t id = extra.u16();
    const std::uint16_t len = extra.u16();
    if (id != kZip64ExtraId) {
      extra.skip(len);
      continue;
    }
    ByteReader field(extra.take(len), len, what + " ZIP64 extra field");
    if (usize == 0xffffffffu) usize = field.u64();
    if (csize == 0xffffffffu) csize = field.u64();
    if (local == 0xffffffffu) local = field.u64();
    return;
  }
  QG_CHECK(usize != 0xffffffffu && csize != 0xffffffffu && local != 0xffffffffu, what,
           ": ZIP64 sizes without a ZIP64 extra field");
}
}  // namespace

ZipArchive::ZipArchive(const std::byte* data, std::size_t size, std::string origin)
    : data_(data), size_(size), origin_(std::move(origin)) {
  ByteReader r(data_, size_, origin_);
  const Directory dir = read_directory(r);
  QG_CHECK(dir.offset <= size_ && dir.size <= size_ - dir.offset, origin_,
           ": central directory lies outside the file");
  // Each central header is at least 46 bytes, which bounds a corrupt entry count.
  QG_CHECK(dir.entries <= dir.size / 46, origin_, ": central directory claims ", dir.entries,
           " entries in ", dir.size, " bytes");
  ByteReader cd(data_ + dir.offset, static_cast<std::size_t>(dir.size),
                origin_ + ": central directory");
  for (std::uint64_t i = 0; i < dir.entries; ++i) {
    QG_CHECK(cd.u32() == kCentralSig, origin_, ": corrupt central directory entry ", i);
    cd.skip(4);  // versions
    const std::uint16_t flags = cd.u16();
    const std::uint16_t method = cd.u16();
    cd.skip(4 + 4);  // time, date, crc
    std::uint64_t csize = cd.u32();
    std::uint64_t usize = cd.u32();
    const std::uint16_t name_len = cd.u16();
    const std::uint16_t extra_len = cd.u16();
    const std::uint16_t comment_len = cd.u16();
    cd.skip(2 + 2 + 4);  // disk, internal and external attributes
    std::uint64_t local = cd.u32();
    Entry entry;
    entry.name = std::string(cd.take_string(name_len));
    const std::string what = origin_ + ": entry '" + entry.name + "'";
    apply_zip64_extra(ByteReader(cd.take(extra_len), extra_len, what), usize, csize, local, what);
    cd.skip(comment_len);
    QG_CHECK((flags & 1u) == 0, what, " is encrypted");
    QG_CHECK(method == 0, what, " is compressed (method ", method,
             "); only uncompressed (stored) archives as torch.save writes them are supported");
    QG_CHECK(csize == usize, what, ": stored entry with different compressed (", csize,
             ") and uncompressed (", usize, ") sizes");

    // The entry's bytes follow its local header, whose name and extra lengths may differ
    // from the central copy (torch pads the local extra field to align tensor data).
    r.seek(local);
    QG_CHECK(r.u32() == kLocalSig, what, ": bad local header at offset ", local);
    r.skip(22);
    const std::uint16_t local_name = r.u16();
    const std::uint16_t local_extra = r.u16();
    r.skip(std::uint64_t{local_name} + local_extra);
    entry.offset = r.pos();
    QG_CHECK(usize <= size_ - entry.offset, what, ": data (", usize, " bytes at offset ",
             entry.offset, ") runs past the end of the file (", size_, " bytes)");
    entry.size = usize;
    entries_.push_back(std::move(entry));
  }
}

const ZipArchive::Entry* ZipArchive::find(std::string_view name) const {
  auto it = std::find_if(entries_.begin(), entries_.end(),
                         [&](const Entry& e) { return e.name == name; });
  return it == entries_.end() ? nullptr : &*it;
}

}  // namespace qg::io
