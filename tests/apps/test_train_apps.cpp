// qg-train and qg-merge end to end on a tiny model with the demo tokenizer, run as a user would
// (binaries from build/bin): LoRA training, merging, full-parameter training, Ctrl-C + resume,
// and the messages of bad flags and data.
#include <filesystem>
#include <fstream>
#include <string>

#include "app_runner.h"
#include "catch.hpp"
#if defined(QG_WITH_CUDA)
#include "qinggeng/cuda/device.h"
#endif
#include "qinggeng/io/model_config.h"
#include "qinggeng/lora/lora_adapter.h"
#include "scratch_dir.h"

namespace fs = std::filesystem;

namespace {

using qg::test::run_app;
const auto q = qg::test::quoted;

// A tiny model with the demo tokenizer, and a small question/answer file.
fs::path make_tiny(const fs::path& dir) {
  const fs::path demo = fs::path(QG_SOURCE_DIR) / "data" / "demo-model";
  const auto r = run_app("qg-init --out " + q(dir / "model") + " --tokenizer " + q(demo) +
                         " --hidden 32 --layers 1 --heads 2 --max-seq 96 --seed 5");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  std::ofstream(dir / "data.jsonl")
      << "{\"question\": \"感冒了怎么办？\", \"answer\": \"多休息，多喝水。\"}\n"
      << "{\"question\": \"血压多少算高？\", \"answer\": \"收缩压不低于140。\"}\n"
      << "{\"instruction\": \"解释\", \"input\": \"血压\", \"output\": \"血液对血管壁的压力。\"}\n";
  return dir / "model";
}

}  // namespace

namespace {

bool gpu_present() {
#if defined(QG_WITH_CUDA)
  return qg::cuda::device_count() > 0;
#else
  return false;
#endif
}

}  // namespace

TEST_CASE("qg-train writes a LoRA adapter that qg-merge folds into a model qg-chat runs",
          "[apps][train]") {
  const fs::path dir = qg::test::scratch_dir("train-app-lora");
  const fs::path model = make_tiny(dir);
  auto r = run_app("qg-train --model " + q(model) + " --data " + q(dir / "data.jsonl") +
                   " --eval-data " + q(dir / "data.jsonl") + " --output " + q(dir / "lora") +
                   " --mode lora --lora-targets query_key_value,dense --lora-r 4 --optimizer adamw"
                   " --lr 1e-2 --max-steps 6 --batch-size 2 --eval-every 3 --save-every 2 --keep 2"
                   " --dtype f32 --seed 7 --device cpu");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(r.output.find("step 6/6") != std::string::npos);
  CHECK(r.output.find("tok/s") != std::string::npos);
  CHECK(r.output.find("ETA") != std::string::npos);
  CHECK(r.output.find("eval loss") != std::string::npos);
  const auto adapter = qg::lora::LoraAdapter::load(dir / "lora", qg::io::load_model_config(model));
  CHECK(adapter.rank() == 4);
  CHECK(adapter.has(0, qg::lora::LoraTarget::Dense));
  CHECK(fs::exists(dir / "lora" / "metrics.jsonl"));
  // Checkpoints at steps 2 and 4 (the last step writes the adapter instead), both kept.
  CHECK(fs::exists(dir / "lora" / "checkpoints" / "checkpoint-00000004"));

  r = run_app("qg-merge --model " + q(model) + " --adapter " + q(dir / "lora") + " --output " +
              q(dir / "merged"));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(fs::exists(dir / "merged" / "model.safetensors"));
  CHECK(fs::exists(dir / "merged" / "ice_text.model"));
  r = run_app("qg-chat --model " + q(dir / "merged") +
              " --device cpu --max-new-tokens 4 --prompt '你好'");
  INFO(r.output);
  CHECK(r.exit_code == 0);

  r = run_app("qg-merge --model " + q(model) + " --adapter " + q(dir / "nothing") + " --output " +
              q(dir / "m2"));
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("nothing: adapter directory not found") != std::string::npos);
  r = run_app("qg-merge --model " + q(model) + " --adapter " + q(dir / "lora") + " --output " +
              q(model));
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("is the base model directory") != std::string::npos);
}

TEST_CASE("qg-train full-parameter: Ctrl-C saves a checkpoint and exits 130, --resume finishes",
          "[apps][train]") {
  const fs::path dir = qg::test::scratch_dir("train-app-full");
  const fs::path model = make_tiny(dir);
  const std::string base = "qg-train --model " + q(model) + " --data " + q(dir / "data.jsonl") +
                           " --output " + q(dir / "full") +
                           " --mode full --lr 1e-3 --warmup 0"
                           " --batch-size 1 --threads 1 --seed 3";
  // A run far too long to finish, interrupted after a second.
  auto r = run_app(base + " --max-steps 1000000", "timeout --preserve-status -s INT 1 ");
  INFO(r.output);
  REQUIRE(r.exit_code == 130);
  CHECK(r.output.find("checkpoint saved") != std::string::npos);
  CHECK(r.output.find("--resume") != std::string::npos);
  REQUIRE_FALSE(fs::is_empty(dir / "full" / "checkpoints"));
  CHECK_FALSE(fs::exists(dir / "full" / "model.safetensors"));

  // Resuming past the steps already done (the schedule follows the new length).
  r = run_app(base + " --max-steps 1000000 --schedule constant --resume",
              "timeout --preserve-status -s INT 1 ");
  INFO(r.output);
  CHECK(r.output.find("resuming at step") != std::string::npos);
  // A run already past its length just writes its output.
  r = run_app(base + " --epochs 1 --resume");
  INFO(r.output);
  CHECK(r.exit_code == 0);
  CHECK(fs::exists(dir / "full" / "model.safetensors"));

  r = run_app("qg-train --model " + q(model) + " --data " + q(dir / "data.jsonl") + " --output " +
              q(dir / "full2") + " --mode full --max-steps 2 --warmup 0 --dtype f16");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(fs::exists(dir / "full2" / "model.safetensors"));
  CHECK(fs::exists(dir / "full2" / "config.json"));
  CHECK(fs::exists(dir / "full2" / "tokenizer_config.json"));
  r = run_app("qg-eval --model " + q(dir / "full2") + " --device cpu --text '多喝水'");
  INFO(r.output);
  CHECK(r.exit_code == 0);
}

TEST_CASE("qg-train reports bad flags and data clearly", "[apps][train]") {
  const fs::path dir = qg::test::scratch_dir("train-app-bad");
  const fs::path model = make_tiny(dir);
  const std::string base = "qg-train --model " + q(model) + " --output " + q(dir / "out");
  const auto expect = [&](const std::string& args, const std::string& message) {
    const auto r = run_app(base + " " + args);
    INFO(args << "\n" << r.output);
    CHECK(r.exit_code != 0);
    CHECK(r.output.find(message) != std::string::npos);
  };
  const std::string data = " --data " + q(dir / "data.jsonl");
  expect(data + " --device cuda --mode full", "full-parameter training runs on the CPU only");
  expect(data + " --device tpu", "unknown device 'tpu'");
  if (!gpu_present()) expect(data + " --device cuda", "CUDA");  // no GPU or no CUDA build
  expect(data + " --mode half", "unknown training mode 'half'");
  expect(data + " --lora-targets qkv", "unknown LoRA target 'qkv'");
  expect(data + " --optimizer sgd", "sgd");
  expect(data + " --schedule step", "step");
  expect(data + " --lora-r 0", "lora_r");
  expect(data + " --max-steps 10 --warmup 20", "warmup");
  expect(data + " --eval-fraction 0.5 --eval-data x.jsonl", "not both");
  expect(" --data " + q(dir / "missing.jsonl"), "missing.jsonl");
  std::ofstream(dir / "bad.jsonl") << "{\"question\": \"q\"}\n";
  expect(" --data " + q(dir / "bad.jsonl"), "answer");
  expect("", "--data is required");
}
