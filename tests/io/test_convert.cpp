// Tests of checkpoint conversion (the library side of qg-convert): torch_tiny to f16
// safetensors compared tensor by tensor, dtype casts, sharding, side files, buffers, and the
// option parsers.
#include <cstring>

#include "catch.hpp"
#include "error_message.h"
#include "qinggeng/io/convert.h"
#include "qinggeng/io/weight_store.h"
#include "scratch_dir.h"

using qg::DType;
using qg::io::WeightStore;
using namespace qg::test;
namespace fs = std::filesystem;

namespace {
bool is_buffer(const std::string& name) {
  return name.find("rotary_emb.inv_freq") != std::string::npos;
}
}  // namespace

TEST_CASE("torch_tiny converts to f16 safetensors with identical tensors") {
  const auto out = scratch_dir("convert_f16");
  const auto in = fixture("torch_tiny");
  qg::io::ConvertOptions options;
  options.dtype = DType::F16;
  std::size_t calls = 0, last_done = 0;
  options.on_progress = [&](const qg::io::ConvertProgress& p) {
    ++calls;
    CHECK(p.done == last_done + 1);
    CHECK(p.total == 28);
    last_done = p.done;
  };
  const auto report = qg::io::convert_checkpoint(in, out, options);
  CHECK(calls == 28);
  CHECK(report.tensors_written == 28);
  CHECK(report.tensors_dropped == 2);
  CHECK(fs::exists(out / "model.safetensors"));
  CHECK_FALSE(fs::exists(out / "model.safetensors.index.json"));
  CHECK(read_bytes(out / "config.json") == read_bytes(in / "config.json"));

  const auto src = WeightStore::open(in);
  const auto dst = WeightStore::open(out);
  std::size_t compared = 0;
  for (const auto& name : src.names()) {
    INFO(name);
    if (is_buffer(name)) {
      CHECK_FALSE(dst.contains(name));
      continue;
    }
    const auto& a = src.get(name);
    const auto& b = dst.get(name, a.shape);
    CHECK(b.dtype == DType::F16);
    REQUIRE(a.nbytes == b.nbytes);
    CHECK(std::memcmp(a.data, b.data, a.nbytes) == 0);
    ++compared;
  }
  CHECK(compared == 28);
  CHECK(report.tensor_bytes == 241152);  // the index's total_size excludes the buffers
}

TEST_CASE("conversion casts, shards and keeps buffers on request") {
  const auto in = fixture("torch_tiny_bf16");
  const auto src = WeightStore::open(in);

  SECTION("bf16 -> f32 is exact, sharded with an index") {
    const auto out = scratch_dir("convert_f32_sharded");
    qg::io::ConvertOptions options;
    options.dtype = DType::F32;
    options.max_shard_bytes = 100'000;
    const auto report = qg::io::convert_checkpoint(in / "pytorch_model.bin", out, options);
    CHECK(fs::exists(out / "model.safetensors.index.json"));
    std::size_t shards = 0;
    for (const auto& entry : fs::directory_iterator(out)) {
      shards += entry.path().filename().string().rfind("model-0000", 0) == 0;
    }
    CHECK(shards > 1);
    CHECK(report.files.size() == shards + 1 + 1);  // shards, index, config.json
    const auto dst = WeightStore::open(out);
    CHECK(dst.names() == src.names());
    for (const auto& name : src.names()) {
      const auto& a = src.get(name);
      CHECK(dst.get(name).dtype == DType::F32);
      CHECK(dst.read_f32(name, a.shape) == src.read_f32(name, a.shape));
    }
  }
  SECTION("keep: stored dtypes unchanged; buffers kept on request") {
    const auto out = scratch_dir("convert_keep");
    qg::io::ConvertOptions options;
    options.keep_buffers = true;
    qg::io::convert_checkpoint(fixture("torch_tiny"), out, options);
    const auto dst = WeightStore::open(out);
    CHECK(dst.names().size() == 30);
    CHECK(dst.get("transformer.layers.0.attention.rotary_emb.inv_freq", {4}).dtype == DType::F16);
  }
  SECTION("integer tensors are never cast") {
    const auto out = scratch_dir("convert_ints");
    qg::io::ConvertOptions options;
    options.dtype = DType::BF16;
    qg::io::convert_checkpoint(fixture("torch_misc.bin"), out, options);
    const auto dst = WeightStore::open(out);
    CHECK(dst.get("i64", {3}).dtype == DType::I64);
    CHECK(dst.get("f32", {2, 3}).dtype == DType::BF16);
    CHECK(dst.read_f32("transposed", {6, 4}) ==
          WeightStore::open(fixture("torch_misc.bin")).read_f32("transposed", {6, 4}));
  }
  SECTION("errors") {
    CHECK(mentions(error_message([&] { qg::io::convert_checkpoint(in, in, {}); }), "differ"));
    CHECK(mentions(error_message([&] {
                     qg::io::convert_checkpoint(in / "missing", scratch_dir("convert_err"), {});
                   }),
                   "missing"));
  }
}

TEST_CASE("qg-convert option parsers") {
  CHECK(qg::io::parse_byte_size("2GB") == 2'000'000'000u);
  CHECK(qg::io::parse_byte_size("2gb") == 2'000'000'000u);
  CHECK(qg::io::parse_byte_size("1GiB") == 1u << 30);
  CHECK(qg::io::parse_byte_size("500MB") == 500'000'000u);
  CHECK(qg::io::parse_byte_size("1.5GB") == 1'500'000'000u);
  CHECK(qg::io::parse_byte_size("64KiB") == 65536u);
  CHECK(qg::io::parse_byte_size("123") == 123u);
  for (const char* bad : {"", "GB", "2XB", "-1GB", "0", "1..2GB", "0.1"}) {
    INFO(bad);
    CHECK_THROWS_AS(qg::io::parse_byte_size(bad), qg::Error);
  }
  CHECK(qg::io::parse_convert_dtype("f16") == DType::F16);
  CHECK(qg::io::parse_convert_dtype("bf16") == DType::BF16);
  CHECK(qg::io::parse_convert_dtype("f32") == DType::F32);
  CHECK_FALSE(qg::io::parse_convert_dtype("keep").has_value());
  CHECK(mentions(error_message([] { qg::io::parse_convert_dtype("int8"); }), "int8"));
}
