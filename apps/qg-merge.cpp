// qg-merge: fold a PEFT LoRA adapter into the base weights (W += scale * B A), writing a
// complete model directory that runs without the adapter.
//
//   qg-merge --model chatglm-6b --adapter out/lora --output chatglm-6b-medical
#include <cstdio>
#include <filesystem>
#include <string>

#include "cli_app.h"
#include "qinggeng/io/model_config.h"
#include "qinggeng/io/weight_store.h"
#include "qinggeng/lora/merge.h"

int main(int argc, char** argv) {
  return qg::apps::run_app("qg-merge", [&] {
    namespace fs = std::filesystem;
    CLI::App app{"qg-merge: merge a LoRA adapter into a ChatGLM model"};
    std::string model_dir, adapter_dir, output;
    app.add_option("--model,-m", model_dir, "base model directory")->required();
    app.add_option("--adapter", adapter_dir, "PEFT adapter directory (adapter_config.json + weights)")->required();
    app.add_option("--output,-o", output, "output model directory")->required();
    QG_PARSE_ARGS(app, argc, argv);

    QG_CHECK(fs::exists(model_dir), model_dir, ": model directory not found");
    QG_CHECK(fs::exists(adapter_dir), adapter_dir, ": adapter directory not found");
    std::error_code ec;
    QG_CHECK(!fs::equivalent(model_dir, output, ec), "--output ", output,
             " is the base model directory; choose another");
    const auto config = qg::io::load_model_config(model_dir);
    const auto store = qg::io::WeightStore::open(model_dir);
    const auto adapter = qg::lora::LoraAdapter::load(adapter_dir, config);
    const auto files = qg::lora::merge_lora(store, adapter, output);
    std::printf("merged %s into %s: %zu weight file(s) in %s\n", adapter_dir.c_str(),
                model_dir.c_str(), files.size(), output.c_str());
    return 0;
  });
}
