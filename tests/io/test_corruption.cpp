// Robustness of the checkpoint readers against damaged files: every fixture (PyTorch zips and a
// safetensors file) is truncated at many offsets (opened as files) and has its header bytes
// flipped (parsed in memory, thousands of cases). Each case must either throw qg::Error or load
// tensors whose bytes can all be read; nothing may crash or throw another exception type.
#include <cstring>
#include <random>

#include "catch.hpp"
#include "io/checkpoint_formats.h"
#include "qinggeng/error.h"
#include "qinggeng/io/safetensors.h"
#include "qinggeng/io/weight_store.h"
#include "scratch_dir.h"

using qg::io::WeightStore;
using namespace qg::test;
namespace fs = std::filesystem;

namespace {

enum class Outcome { Loaded, QgError, OtherException };

volatile unsigned g_sink;  // keeps the byte sums below from being optimised away

// Reads every byte of a loaded tensor (an out-of-bounds view would fault or trip ASan).
void touch(const qg::io::TensorView& view) {
  unsigned sum = 0;
  for (std::size_t i = 0; i < view.nbytes; ++i) sum += static_cast<unsigned>(view.data[i]);
  g_sink = g_sink + sum;
}

template <typename Load>
Outcome classify(Load&& load) {
  try {
    load();
    return Outcome::Loaded;
  } catch (const qg::Error&) {
    return Outcome::QgError;
  } catch (...) {
    return Outcome::OtherException;
  }
}

// Writes `bytes` as `file`, opens it through WeightStore and reads every tensor.
Outcome try_open(const fs::path& file, const std::string& bytes) {
  write_bytes(file, bytes);
  return classify([&] {
    const auto store = WeightStore::open(file);
    for (const auto& name : store.names()) touch(store.get(name));
  });
}

// Parses `bytes` in memory the way WeightStore dispatches a file and reads every tensor. The
// copy is exactly bytes.size() long, so an over-read leaves the allocation.
Outcome try_parse(const std::string& bytes) {
  std::vector<std::byte> copy(bytes.size());
  std::memcpy(copy.data(), bytes.data(), bytes.size());
  return classify([&] {
    const auto parsed = qg::io::looks_like_torch_checkpoint(copy.data(), copy.size())
                            ? qg::io::parse_torch_checkpoint(copy.data(), copy.size(), "x.bin")
                            : qg::io::parse_safetensors(copy.data(), copy.size(), "x.bin");
    for (const auto& view : parsed.tensors) touch(view);
  });
}

// A safetensors version of torch_misc, written by our writer.
std::string safetensors_fixture(const fs::path& dir) {
  const auto misc = WeightStore::open(fixture("torch_misc.bin"));
  std::vector<qg::io::TensorToWrite> tensors;
  for (const auto& name : misc.names()) {
    const auto& v = misc.get(name);
    tensors.push_back({name, v.dtype, v.shape, v.data});
  }
  qg::io::write_safetensors(dir / "misc.safetensors", tensors, {{"format", "pt"}});
  return read_bytes(dir / "misc.safetensors");
}

std::uint64_t safetensors_header_end(const std::string& bytes) {
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= std::uint64_t(static_cast<unsigned char>(bytes[i])) << (8 * i);
  return 8 + n;
}

}  // namespace

TEST_CASE("truncated checkpoints always give qg::Error") {
  const auto dir = scratch_dir("corrupt_truncate");
  const std::vector<std::pair<std::string, std::string>> files = {
      {"torch_misc.bin", read_bytes(fixture("torch_misc.bin"))},
      {"shard.bin", read_bytes(fixture("torch_tiny/pytorch_model-00001-of-00002.bin"))},
      {"bf16.bin", read_bytes(fixture("torch_tiny_bf16/pytorch_model.bin"))},
      {"misc.safetensors", safetensors_fixture(dir)}};
  std::mt19937 rng(1234);
  for (const auto& [name, bytes] : files) {
    REQUIRE(try_open(dir / name, bytes) == Outcome::Loaded);
    std::vector<std::size_t> cuts;
    for (std::size_t c = 0; c < 64; ++c) cuts.push_back(c);
    std::uniform_int_distribution<std::size_t> pick(64, bytes.size() - 1);
    for (int i = 0; i < 40; ++i) cuts.push_back(pick(rng));
    cuts.push_back(bytes.size() - 1);
    for (std::size_t cut : cuts) {
      INFO(name << " truncated to " << cut << " of " << bytes.size() << " bytes");
      REQUIRE(try_open(dir / name, bytes.substr(0, cut)) == Outcome::QgError);
    }
  }
}

TEST_CASE("flipped header bytes give qg::Error or a readable store, never a crash") {
  const auto dir = scratch_dir("corrupt_flip");
  struct Target {
    std::string name, bytes;
    std::size_t begin, end;  // byte range to damage
  };
  const std::string misc = read_bytes(fixture("torch_misc.bin"));
  const std::string shard = read_bytes(fixture("torch_tiny/pytorch_model-00002-of-00002.bin"));
  const std::string st = safetensors_fixture(dir);
  const std::vector<Target> targets = {
      {"torch_misc.bin", misc, 0, misc.size()},                 // every byte: pickle, zip records
      {"shard.bin", shard, 0, 1900},                            // local header + data.pkl
      {"shard.bin", shard, shard.size() - 1600, shard.size()},  // central directory + EOCD
      {"misc.safetensors", st, 0, static_cast<std::size_t>(safetensors_header_end(st))}};
  std::size_t loaded = 0, errors = 0;
  for (const Target& t : targets) {
    std::string damaged = t.bytes;
    for (std::size_t pos = t.begin; pos < t.end; ++pos) {
      for (unsigned char mask : {0xffu, 0x01u, 0x20u}) {
        damaged[pos] = static_cast<char>(t.bytes[pos] ^ mask);
        const Outcome outcome = try_parse(damaged);
        damaged[pos] = t.bytes[pos];
        if (outcome == Outcome::OtherException) {
          FAIL(t.name << ": flipping byte " << pos << " with mask " << int(mask)
                      << " threw something other than qg::Error");
        }
        (outcome == Outcome::Loaded ? loaded : errors)++;
      }
    }
  }
  CHECK(errors > 0);
  CHECK(loaded > 0);  // e.g. flips inside tensor names or CRC fields are benign
}
