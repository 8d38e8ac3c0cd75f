// The CPU Trainer end to end on a tiny random model: overfitting in LoRA and full mode,
// resume == uninterrupted, metrics, and outputs that the inference side loads.
#include <atomic>
#include <cmath>
#include <filesystem>
#include <string>
#include <vector>

#include "catch.hpp"
#include "model_fixtures.h"
#include "qinggeng/engine/generator.h"
#include "qinggeng/io/model_config.h"
#include "qinggeng/lora/lora_adapter.h"
#include "qinggeng/model/backend.h"
#include "qinggeng/model/glm_model.h"
#include "qinggeng/train/trainer.h"

namespace fs = std::filesystem;
using namespace qg;
using train::Trainer;
using train::TrainerConfig;
using train::TrainingExample;

namespace {

std::vector<TrainingExample> tiny_examples(const io::ModelConfig& c) {
  const std::vector<std::vector<int>> prompts = {{10, 11, 12}, {30, 31}, {50, 51, 52, 53}};
  const std::vector<std::vector<int>> answers = {{20, 21, 22, 23}, {40, 41, 42}, {60, 61, 62}};
  train::LayoutOptions layout;
  layout.max_length = 16;
  std::vector<TrainingExample> out;
  for (std::size_t i = 0; i < prompts.size(); ++i) {
    out.push_back(train::layout_example(prompts[i], answers[i], c, layout));
  }
  return out;
}

TrainerConfig lora_config() {
  TrainerConfig c;
  c.mode = train::TrainMode::kLora;
  c.lora_targets = {lora::LoraTarget::QueryKeyValue, lora::LoraTarget::Dense4HToH};
  c.lora_r = 4;
  c.lora_alpha = 8;
  c.lora_dropout = 0.0;
  c.lr = 1e-2;
  c.warmup_steps = 2;
  c.decay = train::DecayKind::Constant;
  c.optimizer = train::OptimizerKind::AdamW;
  c.batch_size = 3;
  c.max_steps = 150;
  c.threads = 2;
  c.output_dtype = DType::F32;
  return c;
}

TrainerConfig full_config() {
  TrainerConfig c = lora_config();
  c.mode = train::TrainMode::kFull;
  c.optimizer = train::OptimizerKind::Lion;
  c.lr = 5e-3;
  c.max_steps = 40;
  return c;
}

// Greedy continuation of example `e`'s prompt (up to and including <sop>).
std::vector<int> greedy(const model::GlmModel& m, const TrainingExample& e, int adapter) {
  engine::GenerationConfig g;
  g.max_new_tokens = 6;
  g.adapter = adapter;
  const std::vector<int> prompt(e.input_ids.begin(), e.input_ids.begin() + e.context_length + 1);
  return engine::generate(m, prompt, g).tokens;
}

std::vector<int> answer_of(const TrainingExample& e) {
  // input_ids = prompt [gMASK] <sop> answer <eop>
  return {e.input_ids.begin() + e.context_length + 1, e.input_ids.end() - 1};
}

}  // namespace

TEST_CASE("Trainer overfits three examples with LoRA; the adapter loads and answers", "[train]") {
  const auto model_dir = test::tiny_model_dir("trainer-lora", 11);
  const auto config = io::load_model_config(model_dir);
  const auto examples = tiny_examples(config);
  const fs::path out = test::scratch_dir("trainer-lora-out");
  Trainer trainer(model_dir, examples, examples, lora_config(), out);
  CHECK(trainer.total_steps() == 150);
  const auto first_eval = trainer.evaluate();
  const auto result = trainer.run();
  REQUIRE(result.losses.size() == 150);
  CHECK(result.losses.front() == Approx(first_eval.loss).epsilon(1e-6));
  // The frozen final LayerNorm and random lm_head bound the logit margin LoRA can reach, so
  // the floor is ~0.1 nats here (from ~5.3): what matters is that every answer is learnt.
  CHECK(result.losses.back() < 0.2);
  REQUIRE(result.final_eval);
  CHECK(result.final_eval->loss < 0.2);
  CHECK(result.final_eval->perplexity == Approx(std::exp(result.final_eval->loss)));

  const auto adapter = lora::LoraAdapter::load(out, config);
  CHECK(adapter.rank() == 4);
  CHECK(adapter.has(0, lora::LoraTarget::Dense4HToH));
  CHECK_FALSE(adapter.has(0, lora::LoraTarget::Dense));
  auto m = model::GlmModel::load(model_dir, model::make_backend("cpu", 1));
  m.load_adapter(1, out);
  for (const auto& e : examples) {
    const auto tuned = greedy(m, e, 1);
    CHECK(tuned == answer_of(e));
    CHECK(greedy(m, e, -1) != tuned);
  }
}

TEST_CASE("Trainer overfits three examples in full-parameter mode; the model loads", "[train]") {
  const auto model_dir = test::tiny_model_dir("trainer-full", 12);
  const auto config = io::load_model_config(model_dir);
  const auto examples = tiny_examples(config);
  const fs::path out = test::scratch_dir("trainer-full-out");
  Trainer trainer(model_dir, examples, {}, full_config(), out);
  const auto result = trainer.run();
  CHECK(result.losses.back() < 0.05);
  CHECK_FALSE(result.final_eval);
  REQUIRE(fs::exists(out / "model.safetensors"));
  REQUIRE(fs::exists(out / "config.json"));
  auto m = model::GlmModel::load(out, model::make_backend("cpu", 1));
  for (const auto& e : examples) CHECK(greedy(m, e, -1) == answer_of(e));
}

TEST_CASE("Trainer: stop, resume from the checkpoint, and the loss curve is unchanged", "[train]") {
  const auto model_dir = test::tiny_model_dir("trainer-resume", 13);
  const auto config = io::load_model_config(model_dir);
  const auto examples = tiny_examples(config);
  TrainerConfig c = lora_config();
  c.lora_dropout = 0.1;  // the dropout stream must resume too
  c.optimizer = train::OptimizerKind::AdamW;
  c.batch_size = 2;  // several batches per epoch: the data position must resume
  c.grad_accum = 2;
  c.max_steps = 8;
  c.decay = train::DecayKind::Linear;
  c.eval_every = 3;

  const fs::path straight_dir = test::scratch_dir("trainer-straight");
  const auto straight = Trainer(model_dir, examples, examples, c, straight_dir).run();
  REQUIRE(straight.losses.size() == 8);

  const fs::path split_dir = test::scratch_dir("trainer-split");
  std::atomic<bool> stop{false};
  std::vector<double> losses;
  {
    Trainer first(model_dir, examples, examples, c, split_dir);
    CHECK_FALSE(first.resume());
    const auto r = first.run(&stop, [&](const train::StepReport& s) {
      if (s.step == 4) stop = true;
    });
    CHECK(r.stopped);
    CHECK(r.steps == 4);
    CHECK(r.output.empty());
    CHECK_FALSE(fs::exists(split_dir / "adapter_config.json"));
    losses = r.losses;
  }
  Trainer second(model_dir, examples, examples, c, split_dir);
  REQUIRE(second.resume() == std::int64_t{4});
  const auto r = second.run();
  CHECK_FALSE(r.stopped);
  losses.insert(losses.end(), r.losses.begin(), r.losses.end());
  REQUIRE(losses.size() == straight.losses.size());
  for (std::size_t i = 0; i < losses.size(); ++i) CHECK(losses[i] == straight.losses[i]);
  REQUIRE(r.final_eval);
  CHECK(r.final_eval->loss == straight.final_eval->loss);

  // Metrics: a line per step and the evaluations, plus a TensorBoard event file.
  const std::string jsonl = test::read_bytes(straight_dir / "metrics.jsonl");
  CHECK(jsonl.find("\"train/loss\"") != std::string::npos);
  CHECK(jsonl.find("\"eval/perplexity\"") != std::string::npos);
  bool events = false;
  for (const auto& entry : fs::directory_iterator(straight_dir / "tensorboard")) {
    events = events || entry.path().filename().string().rfind("events.out.tfevents.", 0) == 0;
  }
  CHECK(events);

  // Other data does not resume from this checkpoint.
  auto fewer = examples;
  fewer.pop_back();
  Trainer other(model_dir, fewer, {}, c, split_dir);
  REQUIRE_THROWS_WITH(other.resume(), QG_CONTAINS("other training data"));
}

TEST_CASE("Trainer refuses bad settings and data with clear messages", "[train]") {
  const auto model_dir = test::tiny_model_dir("trainer-bad", 14);
  const auto config = io::load_model_config(model_dir);
  const auto examples = tiny_examples(config);
  const fs::path out = test::scratch_dir("trainer-bad-out");
  TrainerConfig c = lora_config();
  c.lora_r = 0;
  REQUIRE_THROWS_WITH(Trainer(model_dir, examples, {}, c, out), QG_CONTAINS("lora_r"));
  c = lora_config();
  c.warmup_steps = 500;
  c.decay = train::DecayKind::Linear;
  REQUIRE_THROWS_WITH(Trainer(model_dir, examples, {}, c, out), QG_CONTAINS("warmup"));
  REQUIRE_THROWS_WITH(Trainer(model_dir, {}, {}, lora_config(), out),
                      QG_CONTAINS("no training examples"));
  REQUIRE_THROWS_WITH(Trainer(model_dir, examples, {}, lora_config(), model_dir),
                      QG_CONTAINS("is the model directory"));
  auto long_example = examples;
  long_example[0].input_ids.resize(100, 1);
  long_example[0].labels.resize(100, 1);
  REQUIRE_THROWS_WITH(Trainer(model_dir, long_example, {}, lora_config(), out),
                      QG_CONTAINS("max_sequence_length"));
  REQUIRE_THROWS_WITH(train::parse_lora_targets("query_key_value,wq", "--lora-targets"),
                      QG_CONTAINS("unknown LoRA target 'wq'"));
  CHECK(train::parse_lora_targets("dense,mlp.dense_4h_to_h", "t") ==
        std::vector<lora::LoraTarget>{lora::LoraTarget::Dense, lora::LoraTarget::Dense4HToH});
  REQUIRE_THROWS_WITH(train::parse_train_mode("half", "--mode"), QG_CONTAINS("'half'"));
}
