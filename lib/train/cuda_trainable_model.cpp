// make_cuda_trainable_model (trainable_model.h): the TrainableModel face of CudaModelGrad.
// The fp32 masters of the LoRA factors live here on the host (the optimizer's), copied to the
// device after each update; gradients come back per micro-batch, already unscaled.
#include "qinggeng/error.h"
#include "qinggeng/train/trainable_model.h"

#if defined(QG_WITH_CUDA)
#include "qinggeng/train/cuda_model_grad.h"
#endif

namespace qg::train {

#if defined(QG_WITH_CUDA)
namespace {

/// Evaluation batches are cut to about this many tokens until reserve() sets the training
/// micro-batch size (the activations are already sized for that).
constexpr std::int64_t kDefaultEvalTokens = 2048;

class CudaTrainableModel final : public TrainableModel {
 public:
  CudaTrainableModel(const io::ModelConfig& config, const io::WeightStore& store,
                     const lora::LoraAdapter& adapter, const TrainableModelOptions& options,
                     int device)
      : config_(config),
        grad_(config,
              [&store](const std::string& name,
                       const std::vector<std::int64_t>& shape) -> const io::TensorView* {
                return store.contains(name) ? &store.get(name, shape) : nullptr;
              },
              adapter, device, grad_options(options)) {
    for (int l = 0; l < config.num_layers; ++l) {
      for (lora::LoraTarget t : lora::kLoraTargets) {
        if (!adapter.has(l, t)) continue;
        const lora::LoraFactors f = adapter.factors(l, t);
        const auto [in, out] = lora::target_features(t, config);
        masters_[lora_parameter_name(l, t, 'A')].assign(f.a, f.a + f.rank * in);
        masters_[lora_parameter_name(l, t, 'B')].assign(f.b, f.b + out * f.rank);
      }
    }
  }

  std::string device_name() const override { return grad_.device_name(); }
  const std::vector<std::string>& trainable() const override { return grad_.trainable(); }
  std::vector<float>& parameter(const std::string& name) override {
    const auto it = masters_.find(name);
    QG_CHECK(it != masters_.end(), "CUDA training: no parameter named '", name, "'");
    return it->second;
  }
  void parameters_updated() override {
    grad_.set_parameters(masters_);
  }
  lora::LoraAdapter adapter() const override {
    lora::LoraAdapter out(grad_.lora_config(), config_);
    for (int l = 0; l < config_.num_layers; ++l) {
      for (lora::LoraTarget t : lora::kLoraTargets) {
        const auto a = masters_.find(lora_parameter_name(l, t, 'A'));
        if (a == masters_.end()) continue;
        out.set(l, t, a->second, masters_.at(lora_parameter_name(l, t, 'B')));
      }
    }
    return out;
  }
  bool uses_loss_scaling() const override { return true; }

  MicroBatchLoss add_gradients(const std::vector<const TrainingExample*>& batch,
                               const std::vector<std::uint64_t>& dropout_seeds,
                               double normalizer, float loss_scale,
                               std::map<std::string, std::vector<float>>& grads) override {
    const LossAndGrad r = grad_.loss_and_grad(batch, dropout_seeds, normalizer, loss_scale);
    for (const auto& [name, g] : r.grads) {
      std::vector<float>& sum = grads.at(name);
      for (std::size_t j = 0; j < g.size(); ++j) sum[j] += g[j];
    }
    MicroBatchLoss out;
    out.loss = r.loss;
    for (const TrainingExample* e : batch) out.tokens += e->size();
    return out;
  }

  std::vector<double> summed_nll(const std::vector<const TrainingExample*>& batch) override {
    std::vector<double> out;
    std::vector<const TrainingExample*> part;
    std::int64_t tokens = 0;
    auto flush = [&] {
      if (part.empty()) return;
      const std::vector<double> nll = grad_.summed_nll(part);
      out.insert(out.end(), nll.begin(), nll.end());
      part.clear();
      tokens = 0;
    };
    for (const TrainingExample* e : batch) {
      if (tokens + e->size() > eval_tokens_) flush();
      part.push_back(e);
      tokens += e->size();
    }
    flush();
    return out;
  }

  std::string reserve(std::int64_t tokens) override {
    grad_.reserve(tokens);
    eval_tokens_ = tokens;
    return grad_.memory_plan(tokens).to_string();
  }

 private:
  static CudaGradOptions grad_options(const TrainableModelOptions& options) {
    QG_CHECK(!options.full_parameter,
             "CUDA training: full-parameter training runs on the CPU only (--device cpu)");
    CudaGradOptions o;
    o.checkpoint_layers = options.checkpoint_layers;
    return o;
  }

  io::ModelConfig config_;
  CudaModelGrad grad_;
  std::map<std::string, std::vector<float>> masters_;
  std::int64_t eval_tokens_ = kDefaultEvalTokens;
};

}  // namespace
#endif

std::unique_ptr<TrainableModel> make_cuda_trainable_model(const io::ModelConfig& config,
                                                          const io::WeightStore& store,
                                                          const lora::LoraAdapter& adapter,
                                                          const TrainableModelOptions& options,
                                                          int device) {
#if defined(QG_WITH_CUDA)
  return std::make_unique<CudaTrainableModel>(config, store, adapter, options, device);
#else
  (void)config, (void)store, (void)adapter, (void)options, (void)device;
  fail("--device cuda: this build was configured without CUDA (QG_WITH_CUDA=OFF)");
#endif
}

}  // namespace qg::train
