// Tests of WeightStore's directory resolution, index handling and its error messages (missing
// paths, missing shards, duplicate tensors, wrong shapes, absent names, non-float reads).
#include <filesystem>

#include "catch.hpp"
#include "error_message.h"
#include "qinggeng/io/safetensors.h"
#include "qinggeng/io/weight_store.h"
#include "scratch_dir.h"

using qg::DType;
using qg::io::WeightStore;
using namespace qg::test;
namespace fs = std::filesystem;

namespace {
const float kValues[4] = {1.0f, -2.0f, 0.5f, 3.0f};

void write_one(const fs::path& file, const std::string& name) {
  qg::io::write_safetensors(file, {{name, DType::F32, {2, 2}, kValues}});
}
}  // namespace

TEST_CASE("missing paths and directories without a checkpoint") {
  const auto dir = scratch_dir("ws_missing");
  check_mentions(error_message([&] { WeightStore::open(dir / "nope"); }),
                 {(dir / "nope").string(), "no such file"});

  check_mentions(error_message([&] { WeightStore::open(dir); }),
                 {dir.string(), "pytorch_model.bin"});

  write_bytes(dir / "empty.bin", "");
  CHECK(mentions(error_message([&] { WeightStore::open(dir / "empty.bin"); }), "empty.bin"));
}

TEST_CASE("directory resolution prefers the safetensors index") {
  const auto dir = scratch_dir("ws_priority");
  write_one(dir / "model.safetensors", "single");
  CHECK(WeightStore::open(dir).contains("single"));
  fs::copy_file(fixture("torch_tiny_bf16/pytorch_model.bin"), dir / "pytorch_model.bin");
  CHECK(WeightStore::open(dir).contains("single"));  // safetensors first
  write_one(dir / "a.safetensors", "sharded");
  write_bytes(dir / "model.safetensors.index.json",
              R"({"metadata": {}, "weight_map": {"sharded": "a.safetensors"}})");
  const auto store = WeightStore::open(dir);
  CHECK(store.contains("sharded"));
  CHECK_FALSE(store.contains("single"));
  // A file path opens just that file.
  CHECK(
      WeightStore::open(dir / "pytorch_model.bin").contains("transformer.word_embeddings.weight"));
}

TEST_CASE("index errors name the index, the shard and the tensor") {
  const auto dir = scratch_dir("ws_index");
  const auto index = dir / "model.safetensors.index.json";
  write_one(dir / "a.safetensors", "x");
  write_one(dir / "b.safetensors", "x");

  SECTION("shard missing") {
    write_bytes(index, R"({"weight_map": {"x": "a.safetensors", "y": "gone.safetensors"}})");
    check_mentions(error_message([&] { WeightStore::open(dir); }), {"gone.safetensors", "'y'"});
  }
  SECTION("same tensor in two shards") {
    write_bytes(index, R"({"weight_map": {"x": "a.safetensors", "z": "b.safetensors"}})");
    check_mentions(error_message([&] { WeightStore::open(dir); }),
                   {"'x'", "twice", "a.safetensors", "b.safetensors"});
  }
  SECTION("tensor not in the shard the index names") {
    write_bytes(index, R"({"weight_map": {"x": "a.safetensors", "w": "a.safetensors"}})");
    check_mentions(error_message([&] { WeightStore::open(dir); }), {"'w'"});
  }
  SECTION("malformed index") {
    write_bytes(index, R"({"weight_map": {"x": 3}})");
    CHECK(mentions(error_message([&] { WeightStore::open(dir); }), "'x'"));
    write_bytes(index, R"({"metadata": {}})");
    CHECK(mentions(error_message([&] { WeightStore::open(dir); }), "weight_map"));
    write_bytes(index, R"({"weight_map": {"x": "../a.safetensors"}})");
    CHECK(mentions(error_message([&] { WeightStore::open(dir); }), "../a.safetensors"));
    write_bytes(index, R"({"weight_map": {}})");
    CHECK(mentions(error_message([&] { WeightStore::open(dir); }), "no tensors"));
    write_bytes(index, "not json");
    CHECK(mentions(error_message([&] { WeightStore::open(dir); }), index.string()));
  }
}

TEST_CASE("lookups: shape checks, missing names, float conversion") {
  const auto dir = scratch_dir("ws_lookup");
  const std::int64_t ints[2] = {5, 6};
  qg::io::write_safetensors(dir / "model.safetensors",
                            {{"w", DType::F32, {2, 2}, kValues}, {"ids", DType::I64, {2}, ints}});
  auto store = WeightStore::open(dir);
  CHECK(store.names() == std::vector<std::string>{"ids", "w"});
  CHECK(store.read_f32("w", {2, 2}) == std::vector<float>(kValues, kValues + 4));
  CHECK(store.get("w").shape_string() == "[2, 2]");

  CHECK(error_message([&] {
          store.get("w", {4, 1});
        }) ==
        (dir / "model.safetensors").string() + ": tensor 'w' has shape [2, 2], expected [4, 1]");
  CHECK(error_message([&] { store.get("nope"); }) ==
        "tensor 'nope' not found in " + dir.string() + " (2 tensors stored)");
  check_mentions(error_message([&] { store.read_f32("ids", {2}); }), {"'ids'", "I64"});

  // The store stays usable after a move.
  WeightStore moved = std::move(store);
  CHECK(moved.contains("w"));
}
