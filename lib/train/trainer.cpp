// The training loop (include/qinggeng/train/trainer.h) over a TrainableModel: the CPU
// reference or the CUDA engine (trainable_model.h). Both give gradients that do not depend on
// thread counts or timing, so a resumed run repeats an uninterrupted one.
#include "qinggeng/train/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <exception>
#include <map>
#include <mutex>
#include <random>
#include <sstream>

#include "qinggeng/error.h"
#include "qinggeng/io/model_config.h"
#include "qinggeng/io/safetensors.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/adapter_writer.h"
#include "qinggeng/train/checkpoint.h"
#include "qinggeng/train/metrics.h"
#include "qinggeng/train/loss_scaler.h"
#include "qinggeng/train/trainable_model.h"

namespace qg::train {

namespace fs = std::filesystem;

namespace {

// "cpu" -> -1, "cuda" -> 0, "cuda:N" -> N.
int parse_train_device(const std::string& device, const char* origin) {
  if (device == "cpu") return -1;
  if (device == "cuda") return 0;
  if (device.rfind("cuda:", 0) == 0) {
    const std::string n = device.substr(5);
    if (!n.empty() && n.size() < 4 &&
        n.find_first_not_of("0123456789") == std::string::npos) {
      return std::stoi(n);
    }
  }
  fail(origin, ": unknown device '", device, "' (expected cpu, cuda or cuda:N)");
}

}  // namespace

TrainMode parse_train_mode(const std::string& name, const std::string& origin) {
  if (name == "lora") return TrainMode::kLora;
  if (name == "full") return TrainMode::kFull;
  fail(origin, ": unknown training mode '", name, "' (expected lora or full)");
}

std::vector<lora::LoraTarget> parse_lora_targets(const std::string& list,
                                                 const std::string& origin) {
  std::vector<lora::LoraTarget> targets;
  std::stringstream in(list);
  std::string name;
  while (std::getline(in, name, ',')) {
    if (name.empty()) continue;
    bool found = false;
    for (lora::LoraTarget t : lora::kLoraTargets) {
      const std::string_view module = lora::target_module(t);
      // "attention.query_key_value" is also accepted as "query_key_value".
      const std::string_view leaf = module.substr(module.find('.') + 1);
      if (name == module || name == leaf) {
        if (std::find(targets.begin(), targets.end(), t) == targets.end()) targets.push_back(t);
        found = true;
      }
    }
    QG_CHECK(found, origin, ": unknown LoRA target '", name,
             "' (expected query_key_value, dense, dense_h_to_4h or dense_4h_to_h)");
  }
  QG_CHECK(!targets.empty(), origin, ": no LoRA target given");
  return targets;
}

void TrainerConfig::validate() const {
  const char* o = "TrainerConfig";
  if (mode == TrainMode::kLora) {
    QG_CHECK(!lora_targets.empty(), o, ": lora_targets is empty");
    QG_CHECK(lora_r >= 1, o, ": lora_r must be >= 1, got ", lora_r);
    QG_CHECK(lora_alpha > 0, o, ": lora_alpha must be > 0, got ", lora_alpha);
    QG_CHECK(lora_dropout >= 0 && lora_dropout < 1, o, ": lora_dropout must be in [0, 1), got ",
             lora_dropout);
  }
  QG_CHECK(lr > 0 && std::isfinite(lr), o, ": lr must be > 0, got ", lr);
  QG_CHECK(weight_decay >= 0, o, ": weight_decay must be >= 0, got ", weight_decay);
  QG_CHECK(grad_accum >= 1, o, ": grad_accum must be >= 1, got ", grad_accum);
  QG_CHECK(batch_size > 0 || max_tokens > 0, o, ": batch_size and max_tokens are both 0");
  QG_CHECK(max_steps >= 0, o, ": max_steps must be >= 0, got ", max_steps);
  QG_CHECK(max_steps > 0 || epochs >= 1, o, ": epochs must be >= 1 when max_steps is 0");
  QG_CHECK(eval_every >= 0 && save_every >= 0, o, ": eval_every and save_every must be >= 0");
  QG_CHECK(keep_checkpoints >= 0, o, ": keep_checkpoints must be >= 0");
  QG_CHECK(output_dtype == DType::F32 || output_dtype == DType::F16 || output_dtype == DType::BF16,
           o, ": output_dtype must be F32, F16 or BF16");
  QG_CHECK(threads >= 0, o, ": threads must be >= 0");
  const int gpu = parse_train_device(device, o);
  QG_CHECK(gpu < 0 || mode == TrainMode::kLora, o,
           ": full-parameter training runs on the CPU only (--device cpu); the GPU engine "
           "trains LoRA adapters");
}

namespace {

// Weight decay skips biases and LayerNorm parameters (as the usual "no_decay" lists do).
bool decays(const std::string& name) {
  const bool bias = name.size() >= 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
  return !bias && name.find("layernorm") == std::string::npos;
}

// PEFT's initialisation: A ~ Kaiming-uniform(a = sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0,
// so training starts from the base model's outputs.
lora::LoraAdapter initial_adapter(const TrainerConfig& c, const io::ModelConfig& model,
                                  const fs::path& model_dir) {
  lora::LoraConfig lc;
  lc.r = c.lora_r;
  lc.lora_alpha = c.lora_alpha;
  lc.lora_dropout = c.lora_dropout;
  lc.targets = c.lora_targets;
  lc.base_model_name_or_path = model_dir.string();
  lora::LoraAdapter adapter(lc, model);
  std::mt19937_64 rng(c.seed ^ 0x4c6f5241ull);
  for (int layer = 0; layer < model.num_layers; ++layer) {
    for (lora::LoraTarget t : c.lora_targets) {
      const auto [in, out] = lora::target_features(t, model);
      const float bound = 1.0f / std::sqrt(static_cast<float>(in));
      std::uniform_real_distribution<float> uniform(-bound, bound);
      std::vector<float> a(static_cast<std::size_t>(c.lora_r * in));
      for (float& v : a) v = uniform(rng);
      adapter.set(layer, t, std::move(a),
                  std::vector<float>(static_cast<std::size_t>(out * c.lora_r)));
    }
  }
  return adapter;
}

bool is_weight_file(const fs::path& p) {
  const std::string name = p.filename().string();
  const auto ends = [&](const std::string& s) {
    return name.size() >= s.size() && name.compare(name.size() - s.size(), s.size(), s) == 0;
  };
  return ends(".safetensors") || ends(".bin") || ends(".index.json") || ends(".pt");
}

}  // namespace

struct Trainer::Impl {
  TrainerConfig config;
  fs::path model_dir, output_dir;
  io::ModelConfig model_config;
  io::WeightStore store;
  std::unique_ptr<TrainableModel> model;
  std::vector<TrainingExample> train, eval;
  BatchPlanner planner;
  std::map<std::string, std::vector<float>> grads;
  std::vector<ParamRef> params;
  std::unique_ptr<Optimizer> optimizer;
  LossScaler scaler;
  TrainState state;
  DataPosition position;
  std::mt19937_64 rng;
  std::int64_t total = 0;
  std::string memory_plan;

  Impl(const fs::path& model_dir_, std::vector<TrainingExample> train_,
       std::vector<TrainingExample> eval_, const TrainerConfig& config_,
       const fs::path& output_dir_, io::ModelConfig mc, io::WeightStore store_,
       std::unique_ptr<TrainableModel> model_, BatchPlanner planner_)
      : config(config_),
        model_dir(model_dir_),
        output_dir(output_dir_),
        model_config(std::move(mc)),
        store(std::move(store_)),
        model(std::move(model_)),
        train(std::move(train_)),
        eval(std::move(eval_)),
        planner(std::move(planner_)),
        scaler(scaler_config(*model)),
        rng(config_.seed) {}

  static LossScalerConfig scaler_config(const TrainableModel& m) {
    LossScalerConfig c;
    c.enabled = m.uses_loss_scaling();
    return c;
  }

  fs::path checkpoint_root() const { return output_dir / "checkpoints"; }

  // Adds the gradient of one micro-batch (loss normalised over its scored tokens) into the
  // parameter gradients; returns its loss and token count.
  MicroBatchLoss micro_batch(const std::vector<std::size_t>& batch) {
    double scored = 0;
    std::vector<const TrainingExample*> examples;
    for (std::size_t i : batch) {
      scored += train[i].scored_tokens();
      examples.push_back(&train[i]);
    }
    std::vector<std::uint64_t> seeds(batch.size());
    for (auto& s : seeds) s = rng();
    return model->add_gradients(examples, seeds, std::max(scored, 1.0), scaler.scale(), grads);
  }

  void write_output() {
    fs::create_directories(output_dir);
    if (config.mode == TrainMode::kLora) {
      lora::save_adapter(model->adapter(), output_dir, config.output_dtype);
      return;
    }
    std::vector<std::vector<std::uint16_t>> halves;
    std::vector<io::TensorToWrite> tensors;
    for (const std::string& name : model->trainable()) {
      const std::vector<float>& v = model->parameter(name);
      io::TensorToWrite t;
      t.name = name;
      t.shape = store.get(name).shape;
      t.dtype = config.output_dtype;
      if (config.output_dtype == DType::F32) {
        t.data = v.data();
      } else {
        halves.emplace_back(v.size());
        for (std::size_t i = 0; i < v.size(); ++i) {
          halves.back()[i] =
              config.output_dtype == DType::F16 ? float_to_half(v[i]) : float_to_bf16(v[i]);
        }
        t.data = halves.back().data();
      }
      tensors.push_back(std::move(t));
    }
    io::write_safetensors(output_dir / "model.safetensors", tensors, {{"format", "pt"}});
    // config.json and tokenizer files follow the weights, so a complete-looking directory
    // always has complete weights.
    for (const fs::directory_entry& entry : fs::directory_iterator(model_dir)) {
      if (!entry.is_regular_file() || is_weight_file(entry.path())) continue;
      const fs::path tmp = output_dir / (entry.path().filename().string() + ".tmp");
      fs::copy_file(entry.path(), tmp, fs::copy_options::overwrite_existing);
      fs::rename(tmp, output_dir / entry.path().filename());
    }
  }
};

Trainer::Trainer(const fs::path& model_dir, std::vector<TrainingExample> train,
                 std::vector<TrainingExample> eval, const TrainerConfig& config,
                 const fs::path& output_dir) {
  config.validate();
  QG_CHECK(!train.empty(), "Trainer: no training examples");
  std::error_code ec;
  QG_CHECK(!fs::equivalent(model_dir, output_dir, ec), "Trainer: the output directory ",
           output_dir.string(), " is the model directory; choose another");
  io::ModelConfig mc = io::load_model_config(model_dir);
  io::WeightStore store = io::WeightStore::open(model_dir);
  for (const auto* set : {&train, &eval}) {
    for (const TrainingExample& e : *set) {
      QG_CHECK(e.size() <= mc.max_sequence_length, "Trainer: an example has ", e.size(),
               " tokens, more than the model's max_sequence_length ", mc.max_sequence_length,
               " (lower --max-length)");
    }
  }
  TrainableModelOptions engine;
  engine.full_parameter = config.mode == TrainMode::kFull;
  engine.checkpoint_layers = config.checkpoint_layers;
  engine.threads = config.threads;
  const lora::LoraAdapter adapter = initial_adapter(config, mc, model_dir);
  const int cuda_device = parse_train_device(config.device, "TrainerConfig: device");
  std::unique_ptr<TrainableModel> model =
      cuda_device < 0 ? make_cpu_trainable_model(mc, store, adapter, engine)
                      : make_cuda_trainable_model(mc, store, adapter, engine, cuda_device);
  std::vector<int> lengths;
  for (const TrainingExample& e : train) lengths.push_back(e.size());
  BatchPlanOptions plan;
  plan.batch_size = config.batch_size;
  plan.max_tokens = config.max_tokens;
  plan.seed = config.seed;
  BatchPlanner planner(std::move(lengths), plan);
  impl_ =
      std::make_unique<Impl>(model_dir, std::move(train), std::move(eval), config, output_dir,
                             std::move(mc), std::move(store), std::move(model), std::move(planner));
  Impl& s = *impl_;

  for (const std::string& name : s.model->trainable()) {
    std::vector<float>& value = s.model->parameter(name);
    std::vector<float>& grad = s.grads[name];
    grad.assign(value.size(), 0.0f);
    s.params.push_back({name, value.data(), grad.data(), value.size(), decays(name)});
  }
  OptimizerConfig oc = config.optimizer == OptimizerKind::Lion
                           ? OptimizerConfig::lion(static_cast<float>(config.weight_decay))
                           : OptimizerConfig::adamw(static_cast<float>(config.weight_decay));
  s.optimizer = std::make_unique<Optimizer>(oc, s.params);

  // The largest micro-batch the planner can form bounds what the engine must hold.
  std::int64_t longest = 0;
  for (const auto* set : {&s.train, &s.eval}) {
    for (const TrainingExample& e : *set) longest = std::max<std::int64_t>(longest, e.size());
  }
  std::int64_t bound = config.batch_size > 0
                           ? static_cast<std::int64_t>(config.batch_size) * longest
                           : static_cast<std::int64_t>(s.train.size()) * longest;
  if (config.max_tokens > 0) {
    bound = std::min(bound, std::max(static_cast<std::int64_t>(config.max_tokens), longest));
  }
  s.memory_plan = s.model->reserve(bound);

  const auto batches = static_cast<std::int64_t>(s.planner.epoch_batches(0).size());
  s.total = config.max_steps > 0
                ? config.max_steps
                : (config.epochs * batches + config.grad_accum - 1) / config.grad_accum;
  s.state.schedule.peak_lr = config.lr;
  s.state.schedule.warmup_steps =
      config.warmup_steps >= 0 ? config.warmup_steps : std::min<std::int64_t>(5000, s.total / 10);
  s.state.schedule.total_steps = s.total;
  s.state.schedule.decay = config.decay;
  try {
    s.state.schedule.validate();
  } catch (const Error& e) {
    fail("Trainer: the run has ", s.total, " steps and ", s.state.schedule.warmup_steps,
         " warmup steps: ", e.what());
  }
  s.position = s.planner.start();
}

Trainer::~Trainer() = default;

std::int64_t Trainer::total_steps() const { return impl_->total; }
std::int64_t Trainer::warmup_steps() const { return impl_->state.schedule.warmup_steps; }
std::int64_t Trainer::step() const { return impl_->state.step; }
const std::vector<std::string>& Trainer::trainable() const { return impl_->model->trainable(); }
std::string Trainer::device_name() const { return impl_->model->device_name(); }
const std::string& Trainer::memory_plan() const { return impl_->memory_plan; }

std::optional<std::int64_t> Trainer::resume() {
  Impl& s = *impl_;
  const auto dir = latest_checkpoint(s.checkpoint_root());
  if (!dir) return std::nullopt;
  TrainState state;
  load_checkpoint(*dir, state, *s.optimizer);
  s.model->parameters_updated();  // the restored masters go to the engine's device copy
  const std::string origin = (*dir / "train_state.json").string();
  s.position = DataPosition::from_json(state.data_position, origin);
  QG_CHECK(s.position.fingerprint == s.planner.fingerprint(), origin,
           ": the checkpoint was made with other training data or batch options");
  s.rng = rng_from_string(state.rng, origin);
  // The schedule follows this run's settings (a resumed run may extend max_steps).
  state.schedule = s.state.schedule;
  s.state = state;
  s.scaler.set_state(state.loss_scaler);
  return state.step;
}

EvalReport Trainer::evaluate() const {
  Impl& s = *impl_;
  QG_CHECK(!s.eval.empty(), "Trainer: no eval examples to evaluate on");
  std::vector<const TrainingExample*> examples;
  for (const TrainingExample& e : s.eval) examples.push_back(&e);
  const std::vector<double> nll = s.model->summed_nll(examples);
  EvalReport r;
  double sum = 0;
  for (std::size_t i = 0; i < nll.size(); ++i) {
    sum += nll[i];
    r.tokens += s.eval[i].scored_tokens();
  }
  r.loss = r.tokens > 0 ? sum / static_cast<double>(r.tokens) : 0.0;
  r.perplexity = std::exp(r.loss);
  return r;
}

TrainResult Trainer::run(const std::atomic<bool>* stop,
                         const std::function<void(const StepReport&)>& on_step) {
  Impl& s = *impl_;
  fs::create_directories(s.output_dir);
  JsonlMetricsWriter jsonl(s.output_dir / "metrics.jsonl");
  TensorBoardWriter tensorboard(s.output_dir / "tensorboard");
  const auto record = [&](std::int64_t step, const std::vector<Scalar>& scalars) {
    jsonl.write(step, scalars);
    tensorboard.write(step, scalars);
  };
  const auto save = [&] {
    s.state.epoch = static_cast<std::int64_t>(s.position.epoch);
    s.state.data_position = s.position.to_json();
    s.state.rng = rng_to_string(s.rng);
    s.state.loss_scaler = s.scaler.state();
    save_checkpoint(s.checkpoint_root(), s.state, *s.optimizer, s.config.keep_checkpoints);
  };
  const auto run_eval = [&](std::int64_t step) {
    const EvalReport e = evaluate();
    s.state.best_eval_loss = std::min(s.state.best_eval_loss, e.loss);
    record(step, {{"eval/loss", e.loss}, {"eval/perplexity", e.perplexity}});
    return e;
  };

  TrainResult result;
  GradAccumulator accumulate(s.config.grad_accum);
  const auto start = std::chrono::steady_clock::now();
  std::int64_t run_tokens = 0;
  while (s.state.step < s.total) {
    if (stop != nullptr && stop->load()) {
      save();
      result.stopped = true;
      result.steps = s.state.step;
      return result;
    }
    double loss = 0;
    std::int64_t tokens = 0;
    for (int k = 0; k < s.config.grad_accum; ++k) {
      const MicroBatchLoss m = s.micro_batch(s.planner.next(s.position));
      loss += m.loss;
      tokens += m.tokens;
      accumulate.add(s.params);
    }
    loss /= s.config.grad_accum;
    const ClipResult clip = clip_grad_norm(s.params, s.config.clip);
    const double lr = s.state.schedule.lr(s.state.step);
    // A non-finite gradient would wreck every parameter: the step is skipped, and an fp16
    // engine's loss scale backs off (as torch.cuda.amp.GradScaler does).
    if (s.scaler.update(clip.finite)) {
      s.optimizer->step(static_cast<float>(lr));
      s.model->parameters_updated();
    }
    zero_grads(s.params);
    ++s.state.step;
    run_tokens += tokens;
    result.losses.push_back(loss);

    StepReport report;
    report.step = s.state.step;
    report.total_steps = s.total;
    report.loss = loss;
    report.lr = lr;
    report.grad_norm = clip.norm;
    report.tokens = tokens;
    report.seconds =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    report.tokens_per_second = report.seconds > 0 ? run_tokens / report.seconds : 0.0;
    record(s.state.step, {{"train/loss", loss},
                          {"train/lr", lr},
                          {"train/grad_norm", clip.norm},
                          {"train/tokens_per_second", report.tokens_per_second}});
    const bool last = s.state.step == s.total;
    if (!s.eval.empty() && !last && s.config.eval_every > 0 &&
        s.state.step % s.config.eval_every == 0) {
      report.eval_loss = run_eval(s.state.step).loss;
    }
    if (!last && s.config.save_every > 0 && s.state.step % s.config.save_every == 0) save();
    if (on_step) on_step(report);
  }
  if (!s.eval.empty()) result.final_eval = run_eval(s.state.step);
  s.write_output();
  result.steps = s.state.step;
  result.output = s.output_dir;
  return result;
}

}  // namespace qg::train
