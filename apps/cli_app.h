// Scaffolding shared by the model apps: a main() wrapper that prints qg::Error (and any other
// exception) as one readable line, and the common model options (--model, --device, --threads).
#pragma once

#include <CLI/CLI.hpp>

#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <string>

#include "qinggeng/error.h"
#include "qinggeng/model/glm_model.h"

namespace qg::apps {

/// Options every model app takes.
struct ModelOptions {
  std::string model_dir;
  std::string device = "auto";
  std::string quant = "f16";
  int threads = 0;

  void add_to(CLI::App& app, bool model_required) {
    auto* opt = app.add_option("--model,-m", model_dir, "model directory (HF layout: config.json + weights)");
    if (model_required) opt->required();
    app.add_option("--device", device, "cpu, cuda, cuda:N or auto")->capture_default_str();
    app.add_option("--threads", threads, "CPU threads (0 = all cores)")->capture_default_str();
    app.add_option("--quant", quant, "weights on the GPU: f16, int8 (per channel) or int4 (groups of 128)")
        ->capture_default_str();
  }

  /// Loads the model and prints where it runs (and the GPU memory plan) on stderr.
  model::GlmModel load() const {
    QG_CHECK(std::filesystem::exists(model_dir), model_dir, ": model directory not found");
    auto model = model::GlmModel::load(model_dir, model::make_backend(device, threads, quant));
    const std::string plan = model.backend().memory_report();
    if (!plan.empty()) std::fprintf(stderr, "memory plan: %s\n", plan.c_str());
    return model;
  }
};

/// Runs `body` and turns exceptions into "name: error: message" on stderr and exit code 1.
inline int run_app(const char* name, const std::function<int()>& body) {
  try {
    return body();
  } catch (const qg::Error& e) {
    std::fprintf(stderr, "%s: error: %s\n", name, e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s: unexpected error: %s\n", name, e.what());
  }
  return 1;
}

}  // namespace qg::apps

/// Parses the command line the CLI11 way inside run_app's error handling.
#define QG_PARSE_ARGS(app, argc, argv) \
  do {                                 \
    try {                              \
      (app).parse((argc), (argv));     \
    } catch (const CLI::ParseError& e) { \
      return (app).exit(e);            \
    }                                  \
  } while (0)
