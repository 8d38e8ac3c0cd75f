// qg-train: fine-tune a ChatGLM model on question/answer data, with LoRA (a PEFT adapter) or
// full-parameter (small models), on the CPU reference. Ctrl-C saves a checkpoint; running the
// same command with --resume continues where it stopped.
//
//   qg-train --model chatglm-6b --data train.jsonl --output out/lora --mode lora --max-steps 100
//   qg-train --model /tmp/tiny --data data/train/sample.jsonl --output /tmp/full --mode full
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <string>

#include "cli_app.h"
#include "qinggeng/io/model_config.h"
#include "qinggeng/text/tokenizer.h"
#include "qinggeng/train/dataset.h"
#include "qinggeng/train/trainer.h"

namespace {

namespace fs = std::filesystem;
namespace train = qg::train;

std::atomic<bool> g_stop{false};

extern "C" void on_sigint(int) { g_stop = true; }

std::string duration(double seconds) {
  const long s = std::lround(std::max(seconds, 0.0));
  char buf[32];
  std::snprintf(buf, sizeof buf, "%ld:%02ld:%02ld", s / 3600, s / 60 % 60, s % 60);
  return buf;
}

std::vector<train::TrainingExample> lay_out(const std::vector<train::TextExample>& texts,
                                            const std::vector<std::size_t>& indices,
                                            const qg::text::ChatGlmTokenizer& tokenizer,
                                            const qg::io::ModelConfig& config,
                                            const train::LayoutOptions& layout) {
  std::vector<train::TrainingExample> out;
  out.reserve(indices.size());
  for (std::size_t i : indices) {
    out.push_back(train::make_training_example(texts[i], tokenizer, config, layout));
  }
  return out;
}

std::vector<std::size_t> all_indices(std::size_t n) {
  std::vector<std::size_t> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = i;
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  return qg::apps::run_app("qg-train", [&] {
    CLI::App app{"qg-train: fine-tune a ChatGLM model (LoRA adapter or full-parameter)"};
    std::string model_dir, data, eval_data, output, mode = "lora", targets = "query_key_value";
    std::string optimizer = "lion", schedule = "linear", device = "cpu", dtype = "f16";
    double eval_fraction = 0;
    std::int64_t warmup = -1;
    int max_length = 512;
    bool resume = false;
    train::TrainerConfig c;
    app.add_option("--model,-m", model_dir, "base model directory (config.json + weights + tokenizer)")->required();
    app.add_option("--data", data, "training data: .json or .jsonl of {question, answer} or {instruction, input, output}")->required();
    app.add_option("--eval-data", eval_data, "held-out data for evaluation");
    app.add_option("--eval-fraction", eval_fraction, "hold out this fraction of --data instead (seeded, by content)");
    app.add_option("--output,-o", output, "output directory (adapter or model, checkpoints, metrics)")->required();
    app.add_option("--mode", mode, "lora or full")->capture_default_str();
    app.add_option("--lora-targets", targets, "comma-separated: query_key_value, dense, dense_h_to_4h, dense_4h_to_h")->capture_default_str();
    app.add_option("--lora-r", c.lora_r, "LoRA rank")->capture_default_str();
    app.add_option("--lora-alpha", c.lora_alpha, "LoRA alpha (scale alpha / r)")->capture_default_str();
    app.add_option("--lora-dropout", c.lora_dropout, "LoRA dropout")->capture_default_str();
    app.add_option("--optimizer", optimizer, "lion or adamw")->capture_default_str();
    app.add_option("--lr", c.lr, "peak learning rate")->capture_default_str();
    app.add_option("--weight-decay", c.weight_decay, "decoupled weight decay")->capture_default_str();
    app.add_option("--warmup", warmup, "warmup steps (default 5000, or a tenth of a shorter run)");
    app.add_option("--schedule", schedule, "decay after warmup: linear, cosine or constant")->capture_default_str();
    auto* steps_opt = app.add_option("--max-steps", c.max_steps, "optimizer steps (wins over --epochs)");
    app.add_option("--epochs", c.epochs, "passes over the training data")->capture_default_str()->excludes(steps_opt);
    app.add_option("--batch-size", c.batch_size, "examples per micro-batch")->capture_default_str();
    app.add_option("--max-tokens", c.max_tokens, "padded-token budget per micro-batch (0 = none)")->capture_default_str();
    app.add_option("--grad-accum", c.grad_accum, "micro-batches per optimizer step")->capture_default_str();
    app.add_option("--max-length", max_length, "tokens per example, at most (longer ones are truncated)")->capture_default_str();
    app.add_option("--clip", c.clip, "global gradient-norm clip (0 = off)")->capture_default_str();
    app.add_option("--eval-every", c.eval_every, "steps between evaluations (0 = at the end)")->capture_default_str();
    app.add_option("--save-every", c.save_every, "steps between checkpoints (0 = on Ctrl-C only)")->capture_default_str();
    app.add_option("--keep", c.keep_checkpoints, "checkpoints kept")->capture_default_str();
    app.add_option("--seed", c.seed, "seed of data order, LoRA init and dropout")->capture_default_str();
    app.add_option("--dtype", dtype, "dtype of the written weights: f32, f16 or bf16")->capture_default_str();
    app.add_option("--threads", c.threads, "examples computed in parallel (0 = all cores)")->capture_default_str();
    app.add_flag("--checkpoint-layers", c.checkpoint_layers, "recompute each layer in the backward (less memory)");
    app.add_flag("--resume", resume, "continue from the newest checkpoint in --output");
    app.add_option("--device", device, "cpu (float32 reference, LoRA or full) or cuda / cuda:N (fp16, LoRA)")
        ->capture_default_str();
    QG_PARSE_ARGS(app, argc, argv);

    c.device = device;
    c.mode = train::parse_train_mode(mode, "--mode");
    if (c.mode == train::TrainMode::kLora) c.lora_targets = train::parse_lora_targets(targets, "--lora-targets");
    c.optimizer = train::parse_optimizer_kind(optimizer, "--optimizer");
    c.decay = train::parse_decay_kind(schedule, "--schedule");
    QG_CHECK(dtype == "f32" || dtype == "f16" || dtype == "bf16", "--dtype must be f32, f16 or bf16, got ", dtype);
    c.output_dtype = dtype == "f32" ? qg::DType::F32 : dtype == "bf16" ? qg::DType::BF16 : qg::DType::F16;
    QG_CHECK(eval_data.empty() || eval_fraction == 0, "give --eval-data or --eval-fraction, not both");
    QG_CHECK(fs::exists(model_dir), model_dir, ": model directory not found");

    const auto config = qg::io::load_model_config(model_dir);
    const auto tokenizer = qg::text::ChatGlmTokenizer::load(model_dir);
    train::LayoutOptions layout;
    layout.max_length = std::min<int>(max_length, static_cast<int>(config.max_sequence_length));
    const auto texts = train::load_text_examples(data);
    std::vector<train::TrainingExample> train_set, eval_set;
    if (!eval_data.empty()) {
      train_set = lay_out(texts, all_indices(texts.size()), tokenizer, config, layout);
      const auto eval_texts = train::load_text_examples(eval_data);
      eval_set = lay_out(eval_texts, all_indices(eval_texts.size()), tokenizer, config, layout);
    } else {
      train::SplitOptions split_options;
      split_options.fraction = eval_fraction;
      split_options.seed = c.seed;
      const auto split = train::split_examples(texts, split_options);
      train_set = lay_out(texts, split.train, tokenizer, config, layout);
      eval_set = lay_out(texts, split.held_out, tokenizer, config, layout);
    }

    c.warmup_steps = warmup;
    train::Trainer trainer(model_dir, std::move(train_set), std::move(eval_set), c, output);
    if (resume) {
      const auto step = trainer.resume();
      std::fprintf(stderr, step ? "resuming at step %lld\n" : "no checkpoint in the output directory; starting at step 0\n",
                   static_cast<long long>(step.value_or(0)));
    }
    std::fprintf(stderr, "device %s\n", trainer.device_name().c_str());
    if (!trainer.memory_plan().empty()) std::fprintf(stderr, "memory plan: %s\n", trainer.memory_plan().c_str());
    std::fprintf(stderr, "training %s: %zu parameter tensors, %lld steps, warmup %lld, %s lr %g\n",
                 mode.c_str(), trainer.trainable().size(), static_cast<long long>(trainer.total_steps()),
                 static_cast<long long>(trainer.warmup_steps()), optimizer.c_str(), c.lr);

    std::signal(SIGINT, on_sigint);
    const std::int64_t first = trainer.step();
    const auto result = trainer.run(&g_stop, [&](const train::StepReport& r) {
      const double rate = (r.step - first) / std::max(r.seconds, 1e-9);
      std::fprintf(stderr, "\rstep %lld/%lld  loss %.4f  lr %.3g  %.0f tok/s  ETA %s%s",
                   static_cast<long long>(r.step), static_cast<long long>(r.total_steps), r.loss, r.lr,
                   r.tokens_per_second, duration((r.total_steps - r.step) / rate).c_str(),
                   r.eval_loss ? "" : "   ");
      if (r.eval_loss) std::fprintf(stderr, "  eval loss %.4f ppl %.2f\n", *r.eval_loss, std::exp(*r.eval_loss));
    });
    std::fprintf(stderr, "\n");
    if (result.stopped) {
      std::fprintf(stderr, "interrupted at step %lld: checkpoint saved in %s; rerun with --resume to continue\n",
                   static_cast<long long>(result.steps), (fs::path(output) / "checkpoints").string().c_str());
      return 130;
    }
    if (result.final_eval) {
      std::printf("eval loss %.4f  perplexity %.3f  (%lld tokens)\n", result.final_eval->loss,
                  result.final_eval->perplexity, static_cast<long long>(result.final_eval->tokens));
    }
    std::printf("wrote %s %s after %lld steps\n", c.mode == train::TrainMode::kLora ? "adapter" : "model",
                output.c_str(), static_cast<long long>(result.steps));
    return 0;
  });
}
