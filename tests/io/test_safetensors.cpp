// Tests of the safetensors writer and reader: round trips of every dtype (0-d and empty tensors
// included), the reference layout (8-byte padded header, dtype-then-name order, aligned data),
// sharding with an index, and rejection of malformed headers.
#include <cstring>
#include <numeric>

#include "catch.hpp"
#include "error_message.h"
#include "io/checkpoint_formats.h"
#include "io/mapped_file.h"
#include "qinggeng/io/safetensors.h"
#include "qinggeng/io/weight_store.h"
#include "scratch_dir.h"

using qg::DType;
using qg::io::TensorToWrite;
using qg::io::WeightStore;
using namespace qg::test;

namespace {

// Deterministic bytes for a tensor of `n` bytes.
std::vector<unsigned char> pattern(std::size_t n, unsigned seed) {
  std::vector<unsigned char> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<unsigned char>(i * 31 + seed * 7 + 1);
  return v;
}

struct Sample {
  std::vector<TensorToWrite> tensors;
  std::vector<std::vector<unsigned char>> storage;
};

// One tensor of every dtype, plus a 0-d scalar and an empty tensor.
Sample every_dtype() {
  Sample s;
  const std::vector<std::pair<DType, std::vector<std::int64_t>>> specs = {
      {DType::F32, {3, 5}}, {DType::F16, {7}},    {DType::BF16, {2, 2, 3}}, {DType::F64, {3}},
      {DType::I64, {2}},    {DType::I32, {1, 4}}, {DType::I16, {5}},        {DType::I8, {9}},
      {DType::U8, {3, 3}},  {DType::Bool, {6}},   {DType::F32, {}},         {DType::F16, {0, 4}}};
  s.storage.reserve(specs.size());
  unsigned seed = 0;
  for (const auto& [dtype, shape] : specs) {
    const std::size_t numel =
        std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
    s.storage.push_back(pattern(numel * qg::dtype_size(dtype), ++seed));
    if (dtype == DType::Bool) {
      for (auto& b : s.storage.back()) b &= 1;
    }
    const std::string name = std::string("t_") + std::string(qg::dtype_name(dtype)) +
                             (shape.empty() ? "_scalar" : "") + (numel == 0 ? "_empty" : "");
    s.tensors.push_back({name, dtype, shape, s.storage.back().data()});
  }
  return s;
}

void require_same(const WeightStore& store, const Sample& s) {
  REQUIRE(store.names().size() == s.tensors.size());
  for (std::size_t i = 0; i < s.tensors.size(); ++i) {
    const auto& t = s.tensors[i];
    INFO(t.name);
    const auto& view = store.get(t.name, t.shape);
    CHECK(view.dtype == t.dtype);
    REQUIRE(view.nbytes == s.storage[i].size());
    CHECK((view.nbytes == 0 || std::memcmp(view.data, s.storage[i].data(), view.nbytes) == 0));
  }
}

std::uint64_t header_length(const std::string& bytes) {
  std::uint64_t n = 0;
  for (int i = 0; i < 8; ++i) n |= std::uint64_t(static_cast<unsigned char>(bytes[i])) << (8 * i);
  return n;
}

// A safetensors file with the given header text (padded) and `data_bytes` zero bytes of data.
std::string raw_file(const std::string& header, std::size_t data_bytes) {
  std::string out;
  for (int i = 0; i < 8; ++i) out += static_cast<char>((header.size() >> (8 * i)) & 0xff);
  return out + header + std::string(data_bytes, '\0');
}

}  // namespace

TEST_CASE("safetensors round trip of every dtype, with metadata") {
  const auto dir = scratch_dir("st_roundtrip");
  const Sample s = every_dtype();
  const auto path = dir / "model.safetensors";
  qg::io::write_safetensors(path, s.tensors, {{"format", "pt"}, {"note", "quote \" and \\"}});
  require_same(WeightStore::open(path), s);
  require_same(WeightStore::open(dir), s);

  const auto mapped = qg::io::MappedFile::open(path);
  const auto parsed = qg::io::parse_safetensors(mapped.data(), mapped.size(), mapped.name());
  CHECK(parsed.metadata.at("format") == "pt");
  CHECK(parsed.metadata.at("note") == "quote \" and \\");

  SECTION("layout follows the reference writer") {
    const std::string bytes = read_bytes(path);
    const std::uint64_t n = header_length(bytes);
    CHECK(n % 8 == 0);
    CHECK(bytes.substr(8, 16) == "{\"__metadata__\":");
    CHECK(bytes[8 + n - 1] != '\0');
    // Data follows in descending dtype order: 8-byte types first, then by name.
    std::vector<std::pair<std::size_t, DType>> order;
    for (const auto& v : parsed.tensors) {
      order.emplace_back(static_cast<std::size_t>(v.data - mapped.data()), v.dtype);
      CHECK((v.data - mapped.data()) % qg::dtype_size(v.dtype) == 0);  // aligned
    }
    std::sort(order.begin(), order.end());
    CHECK(order.front().second == DType::I64);
    CHECK(order.back().second == DType::Bool);
    for (std::size_t i = 1; i < order.size(); ++i) {
      CHECK(qg::dtype_size(order[i - 1].second) >= qg::dtype_size(order[i].second));
    }
  }
}

TEST_CASE("sharded safetensors: shards plus index, or one file when it fits") {
  const auto dir = scratch_dir("st_sharded");
  const Sample s = every_dtype();

  const auto files = qg::io::write_safetensors_sharded(dir, s.tensors, 40);
  REQUIRE(files.size() > 2);
  CHECK(files.back().filename() == "model.safetensors.index.json");
  CHECK(files.front().filename() ==
        "model-00001-of-" + std::string(5 - std::to_string(files.size() - 1).size(), '0') +
            std::to_string(files.size() - 1) + ".safetensors");
  require_same(WeightStore::open(dir), s);
  const std::string index = read_bytes(dir / "model.safetensors.index.json");
  CHECK(mentions(index, "\"total_size\": 192"));
  CHECK(mentions(index, "\"t_F32\": \"model-00001-of-"));

  // Rewriting into the same directory as one file drops the stale index.
  qg::io::write_safetensors_sharded(dir, s.tensors, 1'000'000);
  CHECK_FALSE(std::filesystem::exists(dir / "model.safetensors.index.json"));
  require_same(WeightStore::open(dir), s);
}

TEST_CASE("shard planning keeps order, isolates oversized tensors, names files") {
  const auto shards = qg::io::plan_safetensors_shards({10, 10, 25, 5, 5, 1}, 20);
  REQUIRE(shards.size() == 3);
  CHECK(shards[0].tensors == std::vector<std::size_t>{0, 1});
  CHECK(shards[1].tensors == std::vector<std::size_t>{2});
  CHECK(shards[2].tensors == std::vector<std::size_t>{3, 4, 5});
  CHECK(shards[2].nbytes == 11);
  CHECK(shards[1].file == "model-00002-of-00003.safetensors");
  CHECK(qg::io::plan_safetensors_shards({1, 2}, 100).at(0).file == "model.safetensors");
  CHECK_THROWS_AS(qg::io::plan_safetensors_shards({1}, 0), qg::Error);
}

TEST_CASE("safetensors writer rejects bad input") {
  const auto dir = scratch_dir("st_write_errors");
  const float x[2] = {1, 2};
  const auto path = dir / "x.safetensors";
  CHECK(mentions(
      error_message([&] {
        qg::io::write_safetensors(path, {{"a", DType::F32, {2}, x}, {"a", DType::F32, {2}, x}});
      }),
      "'a'"));
  CHECK(mentions(error_message([&] {
                   qg::io::write_safetensors(path, {{"a", DType::F32, {-2}, x}});
                 }),
                 "negative"));
  CHECK(mentions(error_message([&] {
                   qg::io::write_safetensors(path, {{"a", DType::F32, {2}, nullptr}});
                 }),
                 "no data"));
  CHECK_FALSE(std::filesystem::exists(path));
  CHECK(std::distance(std::filesystem::directory_iterator(dir),
                      std::filesystem::directory_iterator()) == 0);  // no temp files left
}

TEST_CASE("safetensors reader rejects malformed headers with the file and tensor named") {
  const auto dir = scratch_dir("st_read_errors");
  auto error_for = [&](const std::string& bytes) {
    write_bytes(dir / "model.safetensors", bytes);
    return error_message([&] { WeightStore::open(dir); });
  };
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  REQUIRE(error_for(raw_file(ok, 8)) == "<no qg::Error thrown>");

  SECTION("unknown dtype") {
    check_mentions(
        error_for(raw_file(R"({"w":{"dtype":"F8_E4M3","shape":[2],"data_offsets":[0,2]}})", 2)),
        {"model.safetensors: tensor 'w'", "F8_E4M3"});
  }
  SECTION("header length larger than the file") {
    std::string bytes = raw_file(ok, 8);
    bytes[0] = '\xff';
    bytes[3] = '\x01';
    check_mentions(error_for(bytes), {"header length", "model.safetensors"});
  }
  SECTION("file shorter than the length prefix") { CHECK(mentions(error_for("abc"), "too small")); }
  SECTION("offsets past the data region") {
    CHECK(mentions(error_for(raw_file(ok, 4)), "data_offsets"));
  }
  SECTION("byte count disagreeing with the shape") {
    check_mentions(
        error_for(raw_file(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)),
        {"tensor 'w'", "[3]"});
  }
  SECTION("negative dimension") {
    CHECK(mentions(
        error_for(raw_file(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8)),
        "negative"));
  }
  SECTION("offsets out of order") {
    CHECK(mentions(
        error_for(raw_file(R"({"w":{"dtype":"F32","shape":[0],"data_offsets":[8,0]}})", 8)),
        "data_offsets"));
  }
  SECTION("missing field, wrong types, invalid JSON") {
    CHECK(mentions(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[2]}})", 8)), "data_offsets"));
    CHECK(mentions(error_for(raw_file(R"({"w":{"dtype":7,"shape":[2],"data_offsets":[0,8]}})", 8)),
                   "dtype"));
    CHECK(mentions(error_for(raw_file(R"({"w":[1,2]})", 8)), "tensor 'w'"));
    CHECK(mentions(error_for(raw_file(R"({"w":{)", 8)), "invalid JSON"));
    CHECK(mentions(error_for(raw_file(R"([1])", 8)), "object"));
    CHECK(mentions(error_for(raw_file(R"({"__metadata__":{"a":1}})", 8)), "__metadata__"));
  }
  SECTION("tensor listed twice") {
    CHECK(mentions(error_for(raw_file(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                      8)),
                   "twice"));
  }
}
