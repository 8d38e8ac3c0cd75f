// LoRA on the host: the batched multi-adapter reference lora_add against a dense
// (W + scale B A) x; PEFT adapter loading from safetensors and torch .bin files written here,
// with its error cases; and merge_lora against the runtime add.
#include <cmath>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "io/error_message.h"
#include "io/torch_zip_builder.h"
#include "model_fixtures.h"
#include "qinggeng/io/safetensors.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/lora_add.h"
#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/lora/merge.h"

namespace {

using qg::lora::LoraAdapter;
using qg::lora::LoraFactors;
using qg::lora::LoraTarget;

std::vector<float> random_values(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = normal(rng);
  return v;
}

/// y = x w^T for row-major x [T, in], w [out, in].
std::vector<float> matmul_t(const std::vector<float>& x, const std::vector<float>& w,
                            std::int64_t T, std::int64_t in, std::int64_t out) {
  std::vector<float> y(static_cast<std::size_t>(T * out));
  for (std::int64_t t = 0; t < T; ++t)
    for (std::int64_t o = 0; o < out; ++o) {
      double acc = 0;
      for (std::int64_t i = 0; i < in; ++i) acc += static_cast<double>(x[t * in + i]) * w[o * in + i];
      y[static_cast<std::size_t>(t * out + o)] = static_cast<float>(acc);
    }
  return y;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  REQUIRE(a.size() == b.size());
  double worst = 0;
  for (std::size_t i = 0; i < a.size(); ++i) worst = std::max(worst, std::abs(double(a[i]) - b[i]));
  return worst;
}

/// The model tests' tiny shape: hidden 64, ffn 256, 2 layers (qkv out 192).
qg::io::ModelConfig tiny_model() { return qg::test::tiny_config(); }

std::string peft_key(int layer, const std::string& module, char which) {
  return "base_model.model.transformer.layers." + std::to_string(layer) + "." + module + ".lora_" +
         which + ".weight";
}

std::string config_json(int r, const std::string& extra = "",
                        const std::string& targets = R"(["query_key_value", "dense"])") {
  return R"({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": )" + std::to_string(r) +
         R"(, "lora_alpha": 16, "lora_dropout": 0.1, "bias": "none", "fan_in_fan_out": false, )"
         R"("base_model_name_or_path": "THUDM/chatglm-6b", "target_modules": )" +
         targets + extra + "}";
}

/// `json` with the first `from` replaced by `to`.
std::string replaced(std::string json, const std::string& from, const std::string& to) {
  const auto at = json.find(from);
  REQUIRE(at != std::string::npos);
  return json.replace(at, from.size(), to);
}

void write_text(const std::filesystem::path& file, const std::string& text) {
  std::ofstream(file, std::ios::binary) << text;
}

/// A PEFT adapter directory: r 4, alpha 16, query_key_value and attention.dense on both layers
/// (which targets "dense" matches: attention.dense only, not the mlp's dense_* layers).
struct PeftFixture {
  std::filesystem::path dir;
  std::map<std::string, std::vector<float>> tensors;
  std::map<std::string, std::vector<std::int64_t>> shapes;

  explicit PeftFixture(const std::string& name) : dir(qg::test::scratch_dir(name)) {
    std::uint32_t seed = 7;
    for (int layer = 0; layer < 2; ++layer) {
      for (auto [module, out] : {std::pair<std::string, std::int64_t>{"attention.query_key_value", 192},
                                 {"attention.dense", 64}}) {
        add(peft_key(layer, module, 'A'), {4, 64}, seed++);
        add(peft_key(layer, module, 'B'), {out, 4}, seed++);
      }
    }
    write_text(dir / "adapter_config.json", config_json(4));
  }
  void add(const std::string& key, std::vector<std::int64_t> shape, std::uint32_t seed) {
    tensors[key] = random_values(static_cast<std::size_t>(shape[0] * shape[1]), seed, 0.5f);
    shapes[key] = std::move(shape);
  }
  /// Writes adapter_model.safetensors as F16 (values rounded accordingly).
  void write() {
    std::vector<std::vector<std::uint16_t>> halves;
    std::vector<qg::io::TensorToWrite> out;
    for (auto& [key, values] : tensors) {
      halves.emplace_back();
      for (float& v : values) {
        halves.back().push_back(qg::float_to_half(v));
        v = qg::half_to_float(halves.back().back());
      }
      out.push_back({key, qg::DType::F16, shapes[key], halves.back().data()});
    }
    qg::io::write_safetensors(dir / "adapter_model.safetensors", out);
  }
  std::string load_error() {
    return qg::test::error_message([&] { LoraAdapter::load(dir, tiny_model()); });
  }
};

}  // namespace

TEST_CASE("lora_add equals a dense (W + scale B A) x per row, rows picking their adapter") {
  const std::int64_t T = 9, in = 24, out = 40;
  const std::vector<std::int64_t> ranks = {1, 3, 8};
  const std::vector<float> scales = {2.0f, 0.5f, -1.25f};
  std::vector<std::vector<float>> as, bs;
  std::vector<LoraFactors> factors;
  for (std::size_t i = 0; i < ranks.size(); ++i) {
    as.push_back(random_values(static_cast<std::size_t>(ranks[i] * in), 10 + i));
    bs.push_back(random_values(static_cast<std::size_t>(out * ranks[i]), 20 + i));
  }
  for (std::size_t i = 0; i < ranks.size(); ++i)
    factors.push_back({as[i].data(), bs[i].data(), ranks[i], scales[i]});
  factors.push_back({});  // an adapter that does not touch this layer
  const std::vector<std::int32_t> ids = {0, -1, 2, 1, 1, 3, 0, -1, 2};
  const auto x = random_values(static_cast<std::size_t>(T * in), 1);
  const auto w = random_values(static_cast<std::size_t>(out * in), 2);

  std::vector<float> y = matmul_t(x, w, T, in, out);
  qg::lora::lora_add(x.data(), T, in, y.data(), out, factors, ids.data());

  for (std::int64_t t = 0; t < T; ++t) {
    std::vector<float> merged = w;
    const int id = ids[static_cast<std::size_t>(t)];
    if (id >= 0) qg::lora::merge_factors(merged.data(), out, in, factors[static_cast<std::size_t>(id)]);
    const std::vector<float> row(x.begin() + t * in, x.begin() + (t + 1) * in);
    const auto expected = matmul_t(row, merged, 1, in, out);
    const std::vector<float> got(y.begin() + t * out, y.begin() + (t + 1) * out);
    INFO("row " << t << " adapter " << id);
    CHECK(max_abs_diff(got, expected) < 1e-3);
  }
}

TEST_CASE("lora_add rejects adapter ids it was not given") {
  std::vector<float> x(8, 1.0f), y(8, 0.0f), a(8, 1.0f), b(8, 1.0f);
  const std::vector<LoraFactors> factors = {{a.data(), b.data(), 1, 1.0f}};
  const std::vector<std::int32_t> ids = {0, 1};
  const std::string msg = qg::test::error_message(
      [&] { qg::lora::lora_add(x.data(), 2, 4, y.data(), 4, factors, ids.data()); });
  qg::test::check_mentions(msg, {"row 1", "adapter 1"});
  const std::vector<LoraFactors> broken = {{nullptr, nullptr, 2, 1.0f}};
  const std::vector<std::int32_t> zero = {0, 0};
  qg::test::check_mentions(qg::test::error_message([&] {
    qg::lora::lora_add(x.data(), 2, 4, y.data(), 4, broken, zero.data());
  }), {"adapter 0"});
}

TEST_CASE("LoraAdapter loads a PEFT safetensors adapter") {
  PeftFixture f("lora-load");
  f.write();
  const LoraAdapter adapter = LoraAdapter::load(f.dir, tiny_model());
  CHECK(adapter.rank() == 4);
  CHECK(adapter.scale() == 4.0f);
  CHECK(adapter.config().base_model_name_or_path == "THUDM/chatglm-6b");
  CHECK(adapter.config().lora_dropout == Approx(0.1));
  for (int layer = 0; layer < 2; ++layer) {
    CHECK(adapter.has(layer, LoraTarget::QueryKeyValue));
    CHECK(adapter.has(layer, LoraTarget::Dense));
    CHECK_FALSE(adapter.has(layer, LoraTarget::DenseHTo4H));
    CHECK(adapter.factors(layer, LoraTarget::Dense4HToH).rank == 0);
    const LoraFactors qkv = adapter.factors(layer, LoraTarget::QueryKeyValue);
    REQUIRE(qkv.rank == 4);
    const auto& a = f.tensors[peft_key(layer, "attention.query_key_value", 'A')];
    const auto& b = f.tensors[peft_key(layer, "attention.query_key_value", 'B')];
    CHECK(std::vector<float>(qkv.a, qkv.a + a.size()) == a);
    CHECK(std::vector<float>(qkv.b, qkv.b + b.size()) == b);
  }
}

TEST_CASE("LoraAdapter loads adapter_model.bin and honours layers_to_transform and rsLoRA") {
  auto dir = qg::test::scratch_dir("lora-bin");
  write_text(dir / "adapter_config.json",
             config_json(2, R"(, "layers_to_transform": [1], "use_rslora": true)",
                         R"(["mlp.dense_4h_to_h"])"));
  const auto a = random_values(2 * 256, 3), b = random_values(64 * 2, 4);
  auto bytes = [](const std::vector<float>& v) {
    return std::string(reinterpret_cast<const char*>(v.data()), v.size() * 4);
  };
  const std::string module = "mlp.dense_4h_to_h";
  write_text(
      dir / "adapter_model.bin",
      qg::test::torch_archive({{peft_key(1, module, 'A'), "FloatStorage", "0", bytes(a), 512, 0, {2, 256}, {256, 1}},
                               {peft_key(1, module, 'B'), "FloatStorage", "1", bytes(b), 128, 0, {64, 2}, {2, 1}}}));
  const LoraAdapter adapter = LoraAdapter::load(dir, tiny_model());
  CHECK(adapter.scale() == Approx(16.0 / std::sqrt(2.0)));
  CHECK_FALSE(adapter.has(0, LoraTarget::Dense4HToH));
  REQUIRE(adapter.has(1, LoraTarget::Dense4HToH));
  const LoraFactors fa = adapter.factors(1, LoraTarget::Dense4HToH);
  CHECK(std::vector<float>(fa.a, fa.a + a.size()) == a);
  CHECK(std::vector<float>(fa.b, fa.b + b.size()) == b);
}

TEST_CASE("LoraAdapter::load names the file and key of what is wrong") {
  const std::string qkv_a0 = peft_key(0, "attention.query_key_value", 'A');
  SECTION("missing key") {
    PeftFixture f("lora-missing");
    f.tensors.erase(qkv_a0);
    f.write();
    qg::test::check_mentions(f.load_error(), {"adapter_model.safetensors", "missing", qkv_a0});
  }
  SECTION("wrong shape") {
    PeftFixture f("lora-shape");
    f.add(qkv_a0, {4, 12}, 99);
    f.write();
    qg::test::check_mentions(f.load_error(), {"adapter_model.safetensors", qkv_a0, "[4, 12]"});
  }
  SECTION("rank differs from the config") {
    PeftFixture f("lora-rank");
    f.add(qkv_a0, {8, 64}, 99);
    f.write();
    qg::test::check_mentions(f.load_error(), {qkv_a0, "rank 8", "r = 4"});
  }
  SECTION("a tensor the config does not target") {
    PeftFixture f("lora-extra");
    f.add(peft_key(0, "mlp.dense_h_to_4h", 'A'), {4, 64}, 99);
    f.write();
    qg::test::check_mentions(f.load_error(), {"unexpected tensor", "mlp.dense_h_to_4h"});
  }
  SECTION("no weights file") {
    PeftFixture f("lora-noweights");
    qg::test::check_mentions(f.load_error(), {"adapter_model.safetensors", "adapter_model.bin"});
  }
  SECTION("no config") {
    auto dir = qg::test::scratch_dir("lora-noconfig");
    qg::test::check_mentions(
        qg::test::error_message([&] { LoraAdapter::load(dir, tiny_model()); }),
        {"adapter_config.json"});
  }
  SECTION("unsupported settings") {
    const std::vector<std::pair<std::string, std::string>> cases = {
        {replaced(config_json(4), "false", "true"), "fan_in_fan_out"},
        {replaced(config_json(4), "\"none\"", "\"all\""), "bias"},
        {config_json(4, R"(, "use_dora": true)"), "use_dora"},
        {config_json(4, R"(, "rank_pattern": {"dense": 2})"), "rank_pattern"},
        {config_json(4, R"(, "modules_to_save": ["lm_head"])"), "modules_to_save"},
        {config_json(4, "", R"(["q_proj", "v_proj"])"), "q_proj"},
        {config_json(0), "r must be at least 1"},
        {R"({"peft_type": "PREFIX_TUNING", "r": 4, "target_modules": ["dense"]})", "PREFIX_TUNING"},
        {R"({"peft_type": "LORA", "target_modules": ["dense"]})", "\"r\""},
        {config_json(4, R"(, "layers_to_transform": [5])"), "layer 5"},
    };
    for (const auto& [json, expected] : cases) {
      PeftFixture f("lora-config");
      f.write();
      write_text(f.dir / "adapter_config.json", json);
      qg::test::check_mentions(f.load_error(), {"adapter_config.json", expected});
    }
  }
}

TEST_CASE("merge_lora writes base + scale B A; the merged model equals the runtime add") {
  const qg::io::ModelConfig model = tiny_model();
  PeftFixture f("lora-merge-adapter");
  f.write();
  const LoraAdapter adapter = LoraAdapter::load(f.dir, model);

  // A base checkpoint: F32 qkv weights, F16 dense weights, one untouched extra tensor.
  const auto base_dir = qg::test::scratch_dir("lora-merge-base");
  std::vector<std::vector<float>> f32;
  std::vector<std::vector<std::uint16_t>> f16;
  std::vector<qg::io::TensorToWrite> tensors;
  for (int layer = 0; layer < 2; ++layer) {
    f32.push_back(random_values(192 * 64, 100 + layer));
    tensors.push_back({qg::lora::base_weight_name(layer, LoraTarget::QueryKeyValue),
                       qg::DType::F32, {192, 64}, f32.back().data()});
    f16.emplace_back();
    for (float v : random_values(64 * 64, 200 + layer)) f16.back().push_back(qg::float_to_half(v));
    tensors.push_back({qg::lora::base_weight_name(layer, LoraTarget::Dense), qg::DType::F16,
                       {64, 64}, f16.back().data()});
  }
  f32.push_back(random_values(64, 300));
  tensors.push_back({"transformer.final_layernorm.weight", qg::DType::F32, {64}, f32.back().data()});
  qg::io::write_safetensors(base_dir / "model.safetensors", tensors);
  write_text(base_dir / "config.json", model.to_json());
  const auto base = qg::io::WeightStore::open(base_dir);

  SECTION("one shard") {
    const auto out_dir = qg::test::scratch_dir("lora-merge-out");
    const auto files = qg::lora::merge_lora(base, adapter, out_dir);
    REQUIRE(files.size() == 1);
    CHECK(std::filesystem::exists(out_dir / "config.json"));
    const auto merged = qg::io::WeightStore::open(out_dir);
    CHECK(merged.names() == base.names());
    CHECK(merged.read_f32("transformer.final_layernorm.weight", {64}) == f32.back());
    CHECK(merged.get(qg::lora::base_weight_name(1, LoraTarget::Dense)).dtype == qg::DType::F16);

    // x W_merged^T == x W^T + lora_add, for every adapted weight.
    const std::int64_t T = 5;
    const auto x = random_values(static_cast<std::size_t>(T * 64), 5);
    const std::vector<std::int32_t> all_rows(T, 0);
    for (int layer = 0; layer < 2; ++layer) {
      for (auto [target, out] : {std::pair{LoraTarget::QueryKeyValue, std::int64_t{192}},
                                 std::pair{LoraTarget::Dense, std::int64_t{64}}}) {
        const std::string name = qg::lora::base_weight_name(layer, target);
        const auto w = base.read_f32(name, {out, 64});
        std::vector<float> runtime = matmul_t(x, w, T, 64, out);
        qg::lora::lora_add(x.data(), T, 64, runtime.data(), out, {adapter.factors(layer, target)},
                           all_rows.data());
        const auto from_merged = matmul_t(x, merged.read_f32(name, {out, 64}), T, 64, out);
        INFO(name);
        // F16 storage of the merged dense weight rounds each entry (|w| <= ~8) by <= 2^-8.
        CHECK(max_abs_diff(from_merged, runtime) < (target == LoraTarget::Dense ? 0.2 : 1e-3));
      }
    }
  }
  SECTION("several shards with an index") {
    const auto out_dir = qg::test::scratch_dir("lora-merge-sharded");
    qg::lora::MergeOptions options;
    options.max_shard_bytes = 1024;
    const auto files = qg::lora::merge_lora(base, adapter, out_dir, options);
    CHECK(files.size() > 2);
    CHECK(files.back().filename() == "model.safetensors.index.json");
    const auto merged = qg::io::WeightStore::open(out_dir);
    std::vector<float> expected = f32[0];
    qg::lora::merge_factors(expected.data(), 192, 64,
                            adapter.factors(0, LoraTarget::QueryKeyValue));
    CHECK(merged.read_f32(qg::lora::base_weight_name(0, LoraTarget::QueryKeyValue), {192, 64}) ==
          expected);
  }
  SECTION("a base without the targeted weight") {
    const auto only = qg::test::scratch_dir("lora-merge-partial");
    qg::io::write_safetensors(only / "model.safetensors", {tensors.back()});
    const auto partial = qg::io::WeightStore::open(only);
    const auto out_dir = qg::test::scratch_dir("lora-merge-fail");
    qg::test::check_mentions(
        qg::test::error_message([&] { qg::lora::merge_lora(partial, adapter, out_dir); }),
        {"transformer.layers.0.attention.query_key_value.weight"});
    qg::test::check_mentions(
        qg::test::error_message([&] { qg::lora::merge_lora(base, adapter, base_dir); }),
        {"must not overwrite"});
  }
}
