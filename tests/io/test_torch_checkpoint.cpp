// Tests of the torch.save (zip + pickle) reader: the committed PyTorch-made fixtures (dtypes,
// views sharing a storage, 0-d and transposed tensors, sharded and bf16 checkpoints) and
// hand-built archives for ZIP64, compression, nesting and malformed tensor records.
#include <cmath>
#include <cstring>
#include <map>

#include "catch.hpp"
#include "error_message.h"
#include "io/json.h"
#include "qinggeng/io/weight_store.h"
#include "scratch_dir.h"
#include "torch_zip_builder.h"

using qg::DType;
using qg::io::WeightStore;
using namespace qg::test;

namespace {

std::string f32_bytes(const std::vector<float>& v) {
  return std::string(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
}

// Writes `bytes` as a checkpoint file and opens it.
WeightStore open_bytes(const std::string& dir, const std::string& bytes) {
  const auto path = scratch_dir(dir) / "pytorch_model.bin";
  write_bytes(path, bytes);
  return WeightStore::open(path);
}

std::map<std::string, std::vector<std::int64_t>> tiny_shapes(bool with_lm_head) {
  std::map<std::string, std::vector<std::int64_t>> s;
  s["transformer.word_embeddings.weight"] = {160, 64};
  s["transformer.final_layernorm.weight"] = {64};
  s["transformer.final_layernorm.bias"] = {64};
  if (with_lm_head) s["lm_head.weight"] = {160, 64};
  for (int l = 0; l < 2; ++l) {
    const std::string p = "transformer.layers." + std::to_string(l) + ".";
    for (const char* norm : {"input_layernorm", "post_attention_layernorm"}) {
      s[p + norm + ".weight"] = {64};
      s[p + norm + ".bias"] = {64};
    }
    s[p + "attention.query_key_value.weight"] = {192, 64};
    s[p + "attention.query_key_value.bias"] = {192};
    s[p + "attention.dense.weight"] = {64, 64};
    s[p + "attention.dense.bias"] = {64};
    s[p + "mlp.dense_h_to_4h.weight"] = {256, 64};
    s[p + "mlp.dense_h_to_4h.bias"] = {256};
    s[p + "mlp.dense_4h_to_h.weight"] = {64, 256};
    s[p + "mlp.dense_4h_to_h.bias"] = {64};
  }
  return s;
}

}  // namespace

TEST_CASE("torch_misc.bin: every tensor matches torch_misc.json") {
  const auto store = WeightStore::open(fixture("torch_misc.bin"));
  const auto doc = qg::json::Document::load(fixture("torch_misc.json"));
  const std::map<std::string, DType> dtypes = {{"float32", DType::F32},
                                               {"float16", DType::F16},
                                               {"bfloat16", DType::BF16},
                                               {"int64", DType::I64}};
  std::size_t checked = 0;
  for (auto [key, value] : qg::json::as_object(doc.root(), "torch_misc.json", "root")) {
    const std::string name(key);
    INFO("tensor " << name);
    simdjson::dom::object expect = value;
    const auto& view = store.get(name);
    CHECK(view.dtype == dtypes.at(std::string(std::string_view(expect["dtype"]))));
    std::vector<std::int64_t> shape;
    for (auto d : simdjson::dom::array(expect["shape"])) shape.push_back(std::int64_t(d));
    REQUIRE(view.shape == shape);
    simdjson::dom::array values = expect["values"];
    REQUIRE(static_cast<std::size_t>(view.numel()) == values.size());
    REQUIRE(view.nbytes == values.size() * qg::dtype_size(view.dtype));
    if (view.dtype == DType::I64) {
      std::size_t i = 0;
      for (auto v : values) {
        std::int64_t stored;
        std::memcpy(&stored, view.data + 8 * i++, 8);
        CHECK(stored == std::int64_t(v));
      }
    } else {
      const auto got = store.read_f32(name, shape);
      std::size_t i = 0;
      for (auto v : values) CHECK(got[i++] == static_cast<float>(double(v)));
    }
    ++checked;
  }
  CHECK(checked == 8);
  CHECK(store.names().size() == 8);

  SECTION("views of one storage share the mapping; the transposed view is a copy") {
    const auto& a = store.get("shared_a");
    const auto& row2 = store.get("shared_row2");
    CHECK(row2.data == a.data + 12 * sizeof(float));
    const auto& t = store.get("transposed");
    CHECK((t.data < a.data || t.data >= a.data + a.nbytes));
    CHECK(store.get("scalar").shape.empty());
    CHECK(store.get("scalar").numel() == 1);
  }
}

TEST_CASE("torch_tiny opens through pytorch_model.bin.index.json with every tensor") {
  const auto dir = fixture("torch_tiny");
  const auto store = WeightStore::open(dir);
  auto expected = tiny_shapes(true);
  expected["transformer.layers.0.attention.rotary_emb.inv_freq"] = {4};
  expected["transformer.layers.1.attention.rotary_emb.inv_freq"] = {4};
  REQUIRE(store.names().size() == expected.size());
  for (const auto& [name, shape] : expected) {
    INFO(name);
    const auto& view = store.get(name, shape);
    CHECK(view.dtype == DType::F16);
  }
  // Each tensor comes from the shard the index names.
  const auto index = qg::json::Document::load(dir / "pytorch_model.bin.index.json");
  for (auto [name, file] : simdjson::dom::object(index.root()["weight_map"])) {
    CHECK(store.get(name).source == (dir / std::string(std::string_view(file))).string());
  }
  const auto inv = store.read_f32("transformer.layers.1.attention.rotary_emb.inv_freq", {4});
  CHECK(inv[0] == 1.0f);
  CHECK(inv[1] == qg::half_to_float(qg::float_to_half(0.1f)));  // 10000^(-2/8), in fp16
  CHECK(store.path() == dir);
}

TEST_CASE("torch_tiny_bf16: a single bf16 pytorch_model.bin with a tied head") {
  const auto store = WeightStore::open(fixture("torch_tiny_bf16"));
  const auto expected = tiny_shapes(false);
  CHECK(store.names().size() == expected.size());
  CHECK_FALSE(store.contains("lm_head.weight"));
  for (const auto& [name, shape] : expected) {
    INFO(name);
    CHECK(store.get(name, shape).dtype == DType::BF16);
  }
  const auto ln = store.read_f32("transformer.final_layernorm.weight", {64});
  for (float v : ln) CHECK(std::isfinite(v));
}

TEST_CASE("hand-built archives: layouts torch can produce") {
  const std::vector<float> base = {0, 1, 2, 3, 4, 5};
  const FakeTensor matrix{"m", "FloatStorage", "0", f32_bytes(base), 6, 0, {2, 3}, {3, 1}};
  const FakeTensor column{"col", "FloatStorage", "0", f32_bytes(base), 6, 1, {2}, {3}};
  const FakeTensor empty{"e", "HalfStorage", "1", "", 0, 0, {0, 5}, {5, 1}};

  SECTION("ZIP64 records") {
    const auto store = open_bytes("torch_zip64", torch_archive({matrix, column, empty}, true));
    CHECK(store.read_f32("m", {2, 3}) == base);
    CHECK(store.read_f32("col", {2}) == std::vector<float>{1, 4});
    CHECK(store.get("e", {0, 5}).nbytes == 0);
  }
  SECTION("any archive name") {
    const auto store = open_bytes("torch_name", torch_archive({matrix}, false, "my_ckpt"));
    CHECK(store.read_f32("m", {2, 3}) == base);
  }
  SECTION("state dict nested under \"state_dict\", with other entries beside it") {
    PickleWriter p;
    p.op('}').mark().str("epoch").integer(3).str("state_dict");
    p.global("collections", "OrderedDict").op(')').op('R').mark().str("m");
    p.tensor("FloatStorage", "0", 6, 0, {2, 3}, {3, 1}).op('u').op('u');
    ZipBuilder zip;
    zip.add("archive/data.pkl", p.finish());
    zip.add("archive/data/0", f32_bytes(base));
    const auto store = open_bytes("torch_nested", zip.build());
    CHECK(store.names() == std::vector<std::string>{"m"});
  }
  SECTION("nn.Parameter entries (_rebuild_parameter)") {
    PickleWriter p;
    p.op('}').mark().str("w").global("torch._utils", "_rebuild_parameter").mark();
    p.tensor("FloatStorage", "0", 6, 0, {6}, {1}).op('\x88').global("collections", "OrderedDict");
    p.op(')').op('R').op('t').op('R').op('u');
    ZipBuilder zip;
    zip.add("archive/data.pkl", p.finish());
    zip.add("archive/data/0", f32_bytes(base));
    CHECK(open_bytes("torch_param", zip.build()).read_f32("w", {6}) == base);
  }
}

TEST_CASE("hand-built archives: malformed or unsupported content is a clear qg::Error") {
  const std::vector<float> base = {0, 1, 2, 3, 4, 5};
  auto error_for = [](const std::string& bytes) {
    return error_message([&] { open_bytes("torch_bad", bytes); });
  };
  auto tensor_error = [&](const FakeTensor& t) { return error_for(torch_archive({t})); };

  SECTION("compressed entry") {
    ZipBuilder zip;
    zip.add("archive/data.pkl", PickleWriter().op('}').finish(), 8);
    check_mentions(error_for(zip.build()), {"archive/data.pkl", "compressed"});
  }
  SECTION("no data.pkl") {
    ZipBuilder zip;
    zip.add("archive/other", "x");
    CHECK(mentions(error_for(zip.build()), "data.pkl"));
  }
  SECTION("legacy non-zip torch format") {
    // A bare pickle starting with torch's magic number (a 10-byte LONG1).
    const std::string legacy = std::string("\x80\x02\x8a\x0a", 4) + std::string(10, '\x11') + "}.";
    CHECK(mentions(error_for(legacy), "legacy"));
  }
  SECTION("an entry that is not a tensor") {
    PickleWriter p;
    p.op('}').mark().str("step").integer(7).op('u');
    ZipBuilder zip;
    zip.add("archive/data.pkl", p.finish());
    check_mentions(error_for(zip.build()), {"'step'", "not a tensor"});
  }
  SECTION("unsupported pickle opcode") {
    ZipBuilder zip;
    zip.add("archive/data.pkl", std::string("\x80\x02}") + "\x81" + ".");  // NEWOBJ
    check_mentions(error_for(zip.build()), {"opcode 0x81"});
  }
  SECTION("strides reaching past the storage") {
    check_mentions(tensor_error({"m", "FloatStorage", "0", f32_bytes(base), 6, 1, {2, 3}, {3, 1}}),
                   {"tensor 'm'", "storage"});
  }
  SECTION("storage entry shorter than its declared size") {
    check_mentions(tensor_error({"m", "FloatStorage", "0", f32_bytes(base), 7, 0, {7}, {1}}),
                   {"too few"});
  }
  SECTION("broadcast (zero-stride) view") {
    check_mentions(
        tensor_error({"m", "FloatStorage", "0", f32_bytes(base), 6, 0, {100, 6}, {0, 1}}),
        {"contiguous"});
  }
  SECTION("unknown storage type") {
    check_mentions(tensor_error({"m", "ComplexFloatStorage", "0", f32_bytes(base), 3, 0, {3}, {1}}),
                   {"ComplexFloatStorage"});
  }
  SECTION("missing storage entry") {
    PickleWriter p;
    p.op('}').mark().str("m").tensor("FloatStorage", "9", 6, 0, {6}, {1}).op('u');
    ZipBuilder zip;
    zip.add("archive/data.pkl", p.finish());
    CHECK(mentions(error_for(zip.build()), "archive/data/9"));
  }
  SECTION("negative dimension") {
    CHECK(mentions(tensor_error({"m", "FloatStorage", "0", f32_bytes(base), 6, 0, {-1}, {1}}),
                   "negative"));
  }
}
