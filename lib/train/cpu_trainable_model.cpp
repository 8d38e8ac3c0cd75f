// The CPU reference TrainableModel (trainable_model.h): ModelGrad in float32, the examples of
// a micro-batch computed in parallel, each into its own gradient, and summed in example order
// so the numbers do not depend on the thread count (a resumed run repeats an uninterrupted
// one exactly).
#include <exception>
#include <mutex>

#include "cpu/thread_pool.h"
#include "qinggeng/error.h"
#include "qinggeng/train/reference_model_grad.h"
#include "qinggeng/train/trainable_model.h"

namespace qg::train {
namespace {

class CpuTrainableModel final : public TrainableModel {
 public:
  CpuTrainableModel(ModelGrad model, const TrainableModelOptions& options)
      : model_(std::move(model)), options_(options), pool_(options.threads) {}

  std::string device_name() const override { return "cpu"; }
  const std::vector<std::string>& trainable() const override { return model_.trainable(); }
  std::vector<float>& parameter(const std::string& name) override {
    return model_.parameter(name);
  }
  void parameters_updated() override {}  // ModelGrad reads the masters directly
  lora::LoraAdapter adapter() const override { return model_.adapter(); }
  bool uses_loss_scaling() const override { return false; }

  MicroBatchLoss add_gradients(const std::vector<const TrainingExample*>& batch,
                               const std::vector<std::uint64_t>& dropout_seeds,
                               double normalizer, float /*loss_scale*/,
                               std::map<std::string, std::vector<float>>& grads) override {
    QG_CHECK(dropout_seeds.size() == batch.size(), "add_gradients: ", dropout_seeds.size(),
             " dropout seeds for ", batch.size(), " examples");
    std::vector<LossAndGrad> results(batch.size());
    parallel(batch.size(), [&](std::size_t k) {
      GradOptions options;
      options.checkpoint_layers = options_.checkpoint_layers;
      options.lora_dropout = true;
      options.dropout_seed = dropout_seeds[k];
      options.cross_entropy.normalizer = normalizer;
      results[k] = model_.loss_and_grad(*batch[k], options);
    });
    MicroBatchLoss out;
    for (std::size_t k = 0; k < batch.size(); ++k) {
      out.loss += results[k].loss;
      out.tokens += batch[k]->size();
      for (auto& [name, g] : results[k].grads) {
        std::vector<float>& sum = grads.at(name);
        for (std::size_t j = 0; j < g.size(); ++j) sum[j] += g[j];
      }
    }
    return out;
  }

  std::vector<double> summed_nll(const std::vector<const TrainingExample*>& batch) override {
    std::vector<double> nll(batch.size());
    parallel(batch.size(), [&](std::size_t k) {
      GradOptions options;
      options.lora_dropout = false;
      options.cross_entropy.normalizer = 1.0;  // summed NLL
      nll[k] = model_.loss(*batch[k], options);
    });
    return nll;
  }

 private:
  // Runs `fn(i)` for every i in [0, n) on the pool; rethrows the first error.
  void parallel(std::size_t n, const std::function<void(std::size_t)>& fn) {
    std::mutex mutex;
    std::exception_ptr error;
    pool_.parallel_for(static_cast<std::int64_t>(n), 1, [&](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) {
        try {
          fn(static_cast<std::size_t>(i));
        } catch (...) {
          std::lock_guard<std::mutex> lock(mutex);
          if (!error) error = std::current_exception();
        }
      }
    });
    if (error) std::rethrow_exception(error);
  }

  ModelGrad model_;
  TrainableModelOptions options_;
  cpu::ThreadPool pool_;
};

}  // namespace

std::unique_ptr<TrainableModel> make_cpu_trainable_model(const io::ModelConfig& config,
                                                         const io::WeightStore& store,
                                                         const lora::LoraAdapter& adapter,
                                                         const TrainableModelOptions& options) {
  ModelGrad model = options.full_parameter ? ModelGrad::full_parameter(config, store)
                                           : ModelGrad::lora(config, store, adapter);
  return std::make_unique<CpuTrainableModel>(std::move(model), options);
}

}  // namespace qg::train
