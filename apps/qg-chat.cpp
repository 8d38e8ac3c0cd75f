// qg-chat: talk to a ChatGLM model in the terminal, replies streamed as they are generated.
//
//   qg-chat                          the tiny bundled demo model (data/demo-model)
//   qg-chat --model /path/to/chatglm-6b
//   qg-chat --model DIR --prompt "头痛怎么办？" [--prompt "..."]   scripted, prints replies only
#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <string>
#include <vector>

#include "cli_app.h"
#include "qinggeng/engine/chat_session.h"

namespace {

std::atomic<bool> g_interrupted{false};

void on_sigint(int) { g_interrupted = true; }

// The bundled demo model: $QG_DEMO_MODEL, then the installed share dir, then the source tree.
std::string find_demo_model(const char* argv0) {
  namespace fs = std::filesystem;
  if (const char* env = std::getenv("QG_DEMO_MODEL")) return env;
  std::error_code ec;
  const fs::path exe = fs::canonical(fs::path(argv0), ec);
  if (!ec) {
    const fs::path installed = exe.parent_path().parent_path() / "share" / "qinggeng" / "demo-model";
    if (fs::exists(installed / "config.json")) return installed.string();
  }
  return (fs::path(QG_SOURCE_DIR) / "data" / "demo-model").string();
}

bool stream_piece(std::string_view piece) {
  std::fwrite(piece.data(), 1, piece.size(), stdout);
  std::fflush(stdout);
  return !g_interrupted;
}

}  // namespace

int main(int argc, char** argv) {
  return qg::apps::run_app("qg-chat", [&] {
    CLI::App app{"qg-chat: chat with a ChatGLM model (the tiny bundled demo model by default)"};
    qg::apps::ModelOptions model_opts;
    model_opts.add_to(app, false);
    qg::engine::ChatOptions chat;
    auto& gen = chat.generation;
    auto& s = gen.sampling;
    std::vector<std::string> prompts;
    std::string style = "round0", lora_dir;
    bool greedy = false;
    app.add_option("--prompt,-p", prompts, "non-interactive: answer these questions in order (one conversation) and exit");
    app.add_option("--max-length", gen.max_length, "prompt + reply tokens at most")->capture_default_str();
    app.add_option("--max-new-tokens", gen.max_new_tokens, "reply tokens at most (0 = no limit but max-length)")->capture_default_str();
    app.add_option("--temperature", s.temperature, "sampling temperature")->capture_default_str();
    app.add_option("--top-p", s.top_p, "nucleus sampling mass")->capture_default_str();
    app.add_option("--top-k", s.top_k, "keep the k most likely tokens (0 = off)")->capture_default_str();
    app.add_option("--repetition-penalty", s.repetition_penalty, "penalty on repeated tokens (1 = off)")->capture_default_str();
    app.add_option("--seed", s.seed, "random seed")->capture_default_str();
    app.add_flag("--greedy", greedy, "greedy decoding instead of sampling");
    app.add_option("--lora", lora_dir, "apply this PEFT LoRA adapter directory at run time (no merge)");
    app.add_option("--template", style, "history template: round0 (first release) or round1")->capture_default_str();
    QG_PARSE_ARGS(app, argc, argv);
    s.do_sample = !greedy;
    s.validate();
    chat.style = qg::text::parse_chat_template(style);

    const bool demo = model_opts.model_dir.empty();
    if (demo) {
      model_opts.model_dir = find_demo_model(argv[0]);
      std::fprintf(stderr,
                   "Note: no --model given, so this is the tiny bundled demo model (%s): a few MB of "
                   "weights trained on our small health-education corpus (scripts/train_demo_model.sh); it "
                   "writes health-text-like Chinese and is not for medical advice.\n"
                   "Point it at ChatGLM-6B with: qg-chat --model /path/to/chatglm-6b\n",
                   model_opts.model_dir.c_str());
    }
    auto model = model_opts.load();
    if (!lora_dir.empty()) {
      model.load_adapter(0, lora_dir);
      chat.generation.adapter = 0;
      std::fprintf(stderr, "LoRA adapter %s applied at run time\n", lora_dir.c_str());
    }
    const auto tokenizer = qg::text::ChatGlmTokenizer::load(model_opts.model_dir);
    qg::engine::ChatSession session(model, tokenizer, chat);
    std::signal(SIGINT, on_sigint);

    if (!prompts.empty()) {
      for (const auto& q : prompts) {
        session.reply(q, stream_piece);
        std::printf("\n");
        if (g_interrupted) break;
      }
      return 0;
    }
    std::fprintf(stderr, "Model %s on %s. Type a question; /reset clears the history, /exit quits.\n",
                 model_opts.model_dir.c_str(), model.backend().name().c_str());
    std::string line;
    for (;;) {
      g_interrupted = false;
      std::printf("\n用户> ");
      std::fflush(stdout);
      if (!std::getline(std::cin, line)) break;
      if (line == "/exit" || line == "/quit") break;
      if (line == "/reset") {
        session.reset();
        std::printf("(history cleared)\n");
        continue;
      }
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      std::printf("青庚> ");
      session.reply(line, stream_piece);
      if (g_interrupted) std::printf(" [stopped]");
      std::printf("\n");
    }
    return 0;
  });
}
