// Support for the generation apps: client flags, interrupts, progress and summary (see
// app_support.h).
#include "qinggeng/gen/app_support.h"

#include <csignal>
#include <cstdio>
#include <fstream>
#include <optional>

#include "qinggeng/error.h"
#include "qinggeng/gen/prompt_template.h"

namespace qg::gen {

namespace {
Cancellation* g_cancel = nullptr;

extern "C" void on_signal(int sig) {
  if (g_cancel == nullptr || g_cancel->requested()) {
    std::signal(sig, SIG_DFL);
    std::raise(sig);
    return;
  }
  g_cancel->request();
}
}  // namespace

ChatClientOptions client_options(const ClientFlags& f) {
  ChatClientOptions o;
  o.base_url = f.base_url;
  o.api_keys = load_api_keys(f.api_key_file, f.api_key_env);
  o.model = f.model;
  o.temperature = f.temperature;
  o.top_p = f.top_p;
  o.max_tokens = f.max_tokens;
  o.stop = f.stop;
  o.stream = f.stream;
  o.timeout_s = f.timeout_s;
  o.max_retries = f.max_retries;
  o.requests_per_minute = f.requests_per_minute;
  o.tokens_per_minute = f.tokens_per_minute;
  o.price_prompt_per_1k = f.price_prompt_per_1k;
  o.price_completion_per_1k = f.price_completion_per_1k;
  QG_CHECK(f.workers >= 1, "--workers must be at least 1");
  return o;
}

void stop_on_interrupt(Cancellation& cancel) {
  g_cancel = &cancel;
  std::signal(SIGINT, on_signal);
  std::signal(SIGTERM, on_signal);
}

int run_generation(const std::function<std::size_t()>& generate, const GenStats& stats,
                   const ChatClient& client, const Cancellation& cancel, bool quiet,
                   const std::filesystem::path& output) {
  int code = 0;
  std::size_t total = 0;
  {
    std::optional<ProgressReporter> progress;
    if (!quiet) progress.emplace(stats, client, stderr);
    try {
      total = generate();
    } catch (const std::exception& e) {
      progress.reset();
      std::fprintf(stderr, "error: %s\n", e.what());
      code = 1;
    }
  }
  if (code == 0 && cancel.requested()) {
    std::fprintf(stderr, "interrupted: finished records are kept; rerun to resume\n");
    code = 130;
  }
  std::fprintf(stderr, "%s: %lld records (%lld new, %lld rejected, %lld failed requests)\n%s",
               output.string().c_str(), static_cast<long long>(code == 1 ? stats.done.load() : total),
               static_cast<long long>(stats.done - stats.resumed),
               static_cast<long long>(stats.rejected.load()),
               static_cast<long long>(stats.errors.load()), usage_summary(client.usage()).c_str());
  return code;
}

bool dump_templates_if_asked(int argc, char** argv) {
  const std::string flag = "--dump-templates";
  std::filesystem::path dir;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == flag && i + 1 < argc) dir = argv[i + 1];
    if (arg.rfind(flag + "=", 0) == 0) dir = arg.substr(flag.size() + 1);
  }
  if (dir.empty()) return false;
  std::filesystem::create_directories(dir);
  const std::pair<const char*, std::string_view> files[] = {
      {"self_instruct.txt", default_self_instruct_template()},
      {"book_question.txt", default_question_template()},
      {"book_answer.txt", default_answer_template()},
      {"book_support.txt", default_support_template()}};
  for (const auto& [name, text] : files) {
    std::ofstream out(dir / name, std::ios::binary);
    QG_CHECK(out, (dir / name).string(), ": cannot write");
    out << text;
  }
  std::printf("templates written to %s\n", dir.string().c_str());
  return true;
}

}  // namespace qg::gen
