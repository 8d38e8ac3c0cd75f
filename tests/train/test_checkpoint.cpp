// Resumable training checkpoints: a run saved and resumed takes bit-identical steps to one
// that never stopped; keep-last pruning and leftovers of crashed saves; and every kind of
// damaged or mismatched checkpoint is refused with a message naming the file and field.
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "catch.hpp"
#include "io/error_message.h"
#include "qinggeng/train/checkpoint.h"
#include "scratch_dir.h"

namespace {

namespace fs = std::filesystem;
using qg::train::LrSchedule;
using qg::train::Optimizer;
using qg::train::OptimizerConfig;
using qg::train::ParamRef;
using qg::train::TrainState;

/// Two parameters with owned buffers, and a training step whose gradients come from the run's
/// RNG, so resuming must restore values, moments, step count and generator alike.
struct Run {
  std::vector<float> w = std::vector<float>(37), b = std::vector<float>(5);
  std::vector<float> gw = std::vector<float>(37), gb = std::vector<float>(5);
  std::mt19937_64 rng{1234};
  LrSchedule schedule{1e-2, 2, 20, qg::train::DecayKind::Cosine, 0.1};
  Optimizer opt;
  std::int64_t step = 0;

  explicit Run(OptimizerConfig config, float init = 0.25f)
      : opt(config, {{"layers.0.w", w.data(), gw.data(), w.size(), true},
                     {"layers.0.b", b.data(), gb.data(), b.size(), false}}) {
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = init * static_cast<float>(i % 7) - 0.5f;
    for (std::size_t i = 0; i < b.size(); ++i) b[i] = init * static_cast<float>(i);
  }

  void train(int steps) {
    std::normal_distribution<float> normal(0.0f, 1.0f);
    for (int s = 0; s < steps; ++s) {
      for (std::size_t i = 0; i < w.size(); ++i) gw[i] = normal(rng) + 0.1f * w[i];
      for (std::size_t i = 0; i < b.size(); ++i) gb[i] = normal(rng);
      opt.step(static_cast<float>(schedule.lr(step)));
      ++step;
    }
  }

  TrainState state() const {
    TrainState s;
    s.step = step;
    s.epoch = 2;
    s.data_position = std::string("shard\0\xff\x01 7", 10);
    s.rng = qg::train::rng_to_string(rng);
    s.loss_scaler = {4096.0f, 17, 3};
    s.schedule = schedule;
    s.best_eval_loss = 1.2345678901234567;
    return s;
  }
};

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

std::string replaced(std::string text, const std::string& from, const std::string& to) {
  const auto at = text.find(from);
  REQUIRE(at != std::string::npos);
  return text.replace(at, from.size(), to);
}

}  // namespace

TEST_CASE("A resumed run takes bit-identical steps (Lion and AdamW)") {
  for (const OptimizerConfig& config : {OptimizerConfig::lion(0.1f), OptimizerConfig::adamw()}) {
    INFO(qg::train::optimizer_kind_name(config.kind));
    const fs::path root = qg::test::scratch_dir("train-resume");
    Run uninterrupted(config);
    uninterrupted.train(3);
    const fs::path dir = qg::train::save_checkpoint(root, uninterrupted.state(), uninterrupted.opt);
    CHECK(dir == root / "checkpoint-00000003");
    uninterrupted.train(4);

    Run resumed(config, 9.0f);  // different start values: all must come from the checkpoint
    TrainState s;
    qg::train::load_checkpoint(dir, s, resumed.opt);
    CHECK(s.step == 3);
    CHECK(s.epoch == 2);
    CHECK(s.data_position == std::string("shard\0\xff\x01 7", 10));
    CHECK(s.loss_scaler.scale == 4096.0f);
    CHECK(s.loss_scaler.clean_steps == 17);
    CHECK(s.loss_scaler.skipped_steps == 3);
    CHECK(s.schedule.decay == qg::train::DecayKind::Cosine);
    CHECK(s.schedule.peak_lr == 1e-2);
    CHECK(s.schedule.min_ratio == 0.1);
    CHECK(s.schedule.total_steps == 20);
    CHECK(s.best_eval_loss == 1.2345678901234567);
    CHECK(resumed.opt.steps() == 3);
    resumed.rng = qg::train::rng_from_string(s.rng, "test");
    resumed.step = s.step;
    resumed.train(4);

    CHECK(same_bits(resumed.w, uninterrupted.w));
    CHECK(same_bits(resumed.b, uninterrupted.b));
    auto a = uninterrupted.opt.slots(), b = resumed.opt.slots();
    REQUIRE(a.size() == b.size());
    for (std::size_t i = 0; i < a.size(); ++i) {
      const std::size_t n = uninterrupted.opt.params()[a[i].param].n;
      CHECK(std::memcmp(a[i].data, b[i].data, n * sizeof(float)) == 0);
    }
  }
}

TEST_CASE("Checkpoints: no eval yet, keep-last pruning, replacing a step, crash leftovers") {
  const fs::path root = qg::test::scratch_dir("train-keep");
  CHECK(qg::train::list_checkpoints(root / "absent").empty());
  CHECK_FALSE(qg::train::latest_checkpoint(root).has_value());

  Run run(OptimizerConfig::lion());
  // What crashed saves leave: a temporary directory and a checkpoint without its manifest.
  fs::create_directories(root / ".checkpoint-00000001.tmp.999");
  fs::create_directories(root / "checkpoint-00000099");
  for (int i = 0; i < 5; ++i) {
    run.train(1);
    TrainState s = run.state();
    s.best_eval_loss = std::numeric_limits<double>::infinity();
    qg::train::save_checkpoint(root, s, run.opt, 2);
  }
  const auto kept = qg::train::list_checkpoints(root);
  REQUIRE(kept.size() == 2);
  CHECK(kept[0].filename() == "checkpoint-00000004");
  CHECK(kept[1].filename() == "checkpoint-00000005");
  CHECK(*qg::train::latest_checkpoint(root) == kept[1]);
  CHECK_FALSE(fs::exists(root / ".checkpoint-00000001.tmp.999"));

  // Saving step 5 again replaces it.
  run.w[0] = 42.0f;
  qg::train::save_checkpoint(root, run.state(), run.opt, 2);
  Run other(OptimizerConfig::lion());
  TrainState s;
  qg::train::load_checkpoint(kept[1], s, other.opt);
  CHECK(other.w[0] == 42.0f);
  CHECK(s.best_eval_loss == 1.2345678901234567);
  for (const auto& entry : fs::directory_iterator(root)) {
    CHECK(entry.path().filename().string().rfind(".checkpoint-", 0) == std::string::npos);
  }

  TrainState no_eval;
  qg::train::save_checkpoint(root, no_eval, run.opt);
  qg::train::load_checkpoint(root / "checkpoint-00000000", s, other.opt);
  CHECK(std::isinf(s.best_eval_loss));
}

TEST_CASE("A damaged or mismatched checkpoint is refused, naming the file and field") {
  using qg::test::check_mentions;
  using qg::test::error_message;
  const fs::path root = qg::test::scratch_dir("train-corrupt");
  Run saved(OptimizerConfig::adamw());
  saved.train(2);
  const fs::path dir = qg::train::save_checkpoint(root, saved.state(), saved.opt);
  const fs::path tensors = dir / "train_state.safetensors", manifest = dir / "train_state.json";
  const std::string tensor_bytes = qg::test::read_bytes(tensors);
  const std::string manifest_text = qg::test::read_bytes(manifest);

  Run target(OptimizerConfig::adamw(), 3.0f);
  const std::vector<float> before = target.w;
  TrainState s;
  s.step = -7;
  const auto load = [&] {
    return error_message([&] { qg::train::load_checkpoint(dir, s, target.opt); });
  };

  SECTION("truncated tensor file") {
    qg::test::write_bytes(tensors, tensor_bytes.substr(0, tensor_bytes.size() - 9));
    check_mentions(load(), {"train_state.safetensors", "truncated", "\"bytes\""});
  }
  SECTION("a flipped byte in the tensor data") {
    std::string bad = tensor_bytes;
    bad[bad.size() - 3] ^= 0x10;
    qg::test::write_bytes(tensors, bad);
    check_mentions(load(), {"train_state.safetensors", "fnv1a64", "corrupt"});
  }
  SECTION("missing tensor file") {
    fs::remove(tensors);
    check_mentions(load(), {"train_state.safetensors", "missing"});
  }
  SECTION("truncated manifest") {
    qg::test::write_bytes(manifest, manifest_text.substr(0, manifest_text.size() / 2));
    check_mentions(load(), {"train_state.json", "invalid JSON"});
  }
  SECTION("missing manifest") {
    fs::remove(manifest);
    check_mentions(load(), {"train_state.json", "not a complete checkpoint"});
  }
  SECTION("manifest fields") {
    qg::test::write_bytes(manifest, replaced(manifest_text, "\"version\": 1", "\"version\": 2"));
    check_mentions(load(), {"train_state.json", "\"version\" is 2"});
    qg::test::write_bytes(manifest, replaced(manifest_text, "\"clean_steps\"", "\"clean\""));
    check_mentions(load(), {"train_state.json [loss_scaler]", "\"clean_steps\""});
    qg::test::write_bytes(manifest,
                          replaced(manifest_text, "\"decay\": \"cosine\"", "\"decay\": \"step\""));
    check_mentions(load(), {"[schedule]", "decay", "\"step\""});
    qg::test::write_bytes(manifest, replaced(manifest_text, "\"rng\": \"", "\"rng\": \"x"));
    check_mentions(load(), {"train_state.json", "\"rng\""});
    qg::test::write_bytes(
        manifest, replaced(manifest_text, "\"data_position\": \"", "\"data_position\": \"zz"));
    check_mentions(load(), {"train_state.json", "\"data_position\""});
  }
  SECTION("parameters or optimizer of another run") {
    qg::test::write_bytes(manifest, replaced(manifest_text, "\"layers.0.b\"", "\"layers.0.c\""));
    check_mentions(load(), {"[params 1]", "layers.0.c", "layers.0.b"});
    qg::test::write_bytes(manifest, manifest_text);
    Run lion(OptimizerConfig::lion());
    check_mentions(error_message([&] { qg::train::load_checkpoint(dir, s, lion.opt); }),
                   {"[optimizer]", "\"kind\" is \"adamw\"", "lion"});
    std::vector<float> w(36), gw(36);
    Optimizer smaller(OptimizerConfig::adamw(), {{"layers.0.w", w.data(), gw.data(), 36, true},
                                                 {"layers.0.b", w.data(), gw.data(), 5, false}});
    check_mentions(error_message([&] { qg::train::load_checkpoint(dir, s, smaller); }),
                   {"[params 0]", "layers.0.w", "37 elements saved but 36"});
  }
  // Nothing was modified by a failed load.
  CHECK(s.step == -7);
  CHECK(target.w == before);
  CHECK(target.opt.steps() == 0);
}

TEST_CASE("rng_to_string round-trips a generator; bad text is refused") {
  std::mt19937_64 rng(77);
  rng.discard(1000);
  std::mt19937_64 copy = qg::train::rng_from_string(qg::train::rng_to_string(rng), "state");
  CHECK(copy == rng);
  CHECK(copy() == rng());
  CHECK_THAT(qg::test::error_message([] { qg::train::rng_from_string("1 2 3", "state.json"); }),
             QG_CONTAINS("state.json: field \"rng\""));
  CHECK(qg::train::checkpoint_dir_name(123) == "checkpoint-00000123");
}
