// What qg-gen-dialogue and qg-gen-bookqa share: the API/client flags (registered on any
// CLI11-like App, so this header needs no CLI11), Ctrl-C handling, and running a generator
// with a progress line and a usage summary.
#pragma once

#include <cstdio>
#include <exception>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

#include "qinggeng/gen/cancellation.h"
#include "qinggeng/gen/chat_client.h"
#include "qinggeng/gen/progress.h"

namespace qg::gen {

/// \brief Command-line settings of the chat client common to both apps.
struct ClientFlags {
  std::string base_url = "https://api.openai.com/v1";
  std::filesystem::path api_key_file;
  std::string api_key_env = "OPENAI_API_KEY";
  std::string model;
  double temperature = 1.0;
  double top_p = 1.0;
  int max_tokens = 1024;
  std::vector<std::string> stop;
  bool stream = false;
  double timeout_s = 120.0;
  int max_retries = 6;
  double requests_per_minute = 0;
  double tokens_per_minute = 0;
  double price_prompt_per_1k = 0;
  double price_completion_per_1k = 0;
  int workers = 4;
  int max_consecutive_errors = 10;
  bool quiet = false;
  std::filesystem::path dump_templates;  ///< only documents --dump-templates in --help
};

/// \brief Registers the client flags on a CLI11 `CLI::App` (any type with the same add_option
/// / add_flag interface).
template <typename App>
void add_client_flags(App& app, ClientFlags& f) {
  app.add_option("--base-url", f.base_url,
                 "OpenAI-compatible API base URL ending in /v1 (OpenAI, vLLM, qg-serve)")
      ->capture_default_str();
  app.add_option("--api-key-file", f.api_key_file,
                 "file with API keys, one per line, rotated per request (default: $" +
                     f.api_key_env + ", comma-separated; none for local servers)");
  app.add_option("--api-key-env", f.api_key_env, "environment variable holding API keys")
      ->capture_default_str();
  app.add_option("--model", f.model, "model name sent to the server")->required();
  app.add_option("--temperature", f.temperature, "sampling temperature")->capture_default_str();
  app.add_option("--top-p", f.top_p, "nucleus sampling top_p")->capture_default_str();
  app.add_option("--max-tokens", f.max_tokens, "max tokens per reply")->capture_default_str();
  app.add_option("--stop", f.stop, "stop sequence (repeatable)");
  app.add_flag("--stream", f.stream, "use SSE streaming");
  app.add_option("--timeout", f.timeout_s, "seconds per request before it is retried")
      ->capture_default_str();
  app.add_option("--max-retries", f.max_retries,
                 "retries of 408/409/429/5xx/connection errors/timeouts")
      ->capture_default_str();
  app.add_option("--rpm", f.requests_per_minute, "requests per minute limit (0: none)")
      ->capture_default_str();
  app.add_option("--tpm", f.tokens_per_minute, "tokens per minute limit (0: none)")
      ->capture_default_str();
  app.add_option("--price-prompt", f.price_prompt_per_1k,
                 "price per 1000 prompt tokens, for the cost estimate")
      ->capture_default_str();
  app.add_option("--price-completion", f.price_completion_per_1k,
                 "price per 1000 completion tokens, for the cost estimate")
      ->capture_default_str();
  app.add_option("--workers", f.workers, "concurrent requests")->capture_default_str();
  app.add_option("--max-consecutive-errors", f.max_consecutive_errors,
                 "stop after this many failed requests in a row")
      ->capture_default_str();
  app.add_flag("--quiet", f.quiet, "no progress line");
  app.add_option("--dump-templates", f.dump_templates,
                 "write the built-in prompt templates to this directory and exit");
}

/// \brief If the arguments contain `--dump-templates DIR` (or `=DIR`), writes the built-in
/// prompt templates into DIR (to edit and pass back by flag) and returns true.
bool dump_templates_if_asked(int argc, char** argv);

/// \brief Parses the command line into `app` (a CLI::App; `ParseError` = CLI::ParseError),
/// handling --dump-templates first since it needs none of the required flags. Returns -1 to
/// go on, else the exit code (0 after --help or --dump-templates).
template <typename ParseError, typename App>
int parse_command_line(App& app, int argc, char** argv) {
  try {
    if (dump_templates_if_asked(argc, argv)) return 0;
    app.parse(argc, argv);
  } catch (const ParseError& e) {
    return app.exit(e);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return -1;
}

/// \brief The ChatClientOptions the flags describe (API keys loaded from file or environment).
ChatClientOptions client_options(const ClientFlags& flags);

/// \brief Makes SIGINT/SIGTERM raise `cancel` (finish cleanly, keep written records); a
/// second signal exits immediately. `cancel` must live until the program ends.
void stop_on_interrupt(Cancellation& cancel);

/// \brief Runs `generate` with a progress line on stderr (unless `quiet`), then prints the
/// result and usage summary. Returns the process exit code: 0 done, 130 interrupted, 1 failed
/// (the error is printed).
int run_generation(const std::function<std::size_t()>& generate, const GenStats& stats,
                   const ChatClient& client, const Cancellation& cancel, bool quiet,
                   const std::filesystem::path& output);

}  // namespace qg::gen
