// Example: one chat turn with streaming output, the way an application embeds the model.
//
//   chat_once /path/to/model-dir "高血压患者饮食要注意什么？"
#include <cstdio>
#include <string_view>

#include <qinggeng/engine/chat_session.h>
#include <qinggeng/error.h>

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s MODEL_DIR QUESTION\n", argv[0]);
    return 2;
  }
  try {
    auto model = qg::model::GlmModel::load(argv[1], qg::model::make_backend("auto"));
    auto tokenizer = qg::text::ChatGlmTokenizer::load(argv[1]);
    qg::engine::ChatOptions options;
    options.generation.max_new_tokens = 128;
    qg::engine::ChatSession chat(model, tokenizer, options);
    chat.reply(argv[2], [](std::string_view piece) {
      std::fwrite(piece.data(), 1, piece.size(), stdout);
      std::fflush(stdout);
      return true;  // keep generating
    });
    std::printf("\n");
  } catch (const qg::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
