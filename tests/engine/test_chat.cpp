// Chat: the v1 prompt templates, streamed UTF-8 text, and a ChatSession end to end on a small
// random model with the bundled demo tokenizer.
#include <filesystem>
#include <string>
#include <vector>

#include "catch.hpp"
#include "model_fixtures.h"
#include "qinggeng/engine/chat_session.h"
#include "qinggeng/error.h"

using namespace qg;

namespace {

std::filesystem::path demo_dir() { return std::filesystem::path(QG_SOURCE_DIR) / "data" / "demo-model"; }

// A random model sized to the demo tokenizer's vocabulary and special ids.
std::filesystem::path model_for_demo_tokenizer(const text::ChatGlmTokenizer& tok) {
  auto c = test::tiny_config();
  c.vocab_size = tok.vocab_size();
  c.bos_token_id = tok.bos_id();
  c.eos_token_id = tok.eos_id();
  c.mask_token_id = tok.mask_id();
  c.gmask_token_id = tok.gmask_id();
  c.max_sequence_length = 128;
  return test::tiny_model_dir("chat", 21, c);
}

}  // namespace

TEST_CASE("chat prompt templates match the ChatGLM-6B v1 layouts") {
  using text::ChatTemplate;
  CHECK(text::build_chat_prompt({}, "你好", ChatTemplate::Round0) == "你好");
  CHECK(text::build_chat_prompt({}, "你好", ChatTemplate::Round1) == "你好");
  const std::vector<text::ChatTurn> history = {{"q0", "r0"}, {"q1", "r1"}};
  CHECK(text::build_chat_prompt(history, "q2", ChatTemplate::Round0) ==
        "[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答：r1\n[Round 2]\n问：q2\n答：");
  CHECK(text::build_chat_prompt(history, "q2", ChatTemplate::Round1) ==
        "[Round 1]\n\n问：q0\n\n答：r0\n\n[Round 2]\n\n问：q1\n\n答：r1\n\n[Round 3]\n\n问：q2\n\n答：");
  CHECK(text::parse_chat_template("round1") == ChatTemplate::Round1);
  REQUIRE_THROWS_WITH(text::parse_chat_template("v9"), QG_CONTAINS("round0"));
}

TEST_CASE("the text streamer emits whole UTF-8 characters and the full text in order") {
  const auto tok = text::ChatGlmTokenizer::load(demo_dir());
  const std::string text = "高血压患者每天食盐应少于5克。Take 2 tablets.\n多喝水！";
  const auto ids = tok.encode(text);
  engine::TextStreamer streamer(tok);
  std::string streamed;
  for (int id : ids) {
    const std::string piece = streamer.push(id);
    // Every emitted piece ends on a character boundary.
    if (!piece.empty()) CHECK((static_cast<unsigned char>(piece.back()) & 0xC0) != 0xC0);
    streamed += piece;
  }
  streamed += streamer.finish();
  CHECK(streamed == tok.decode(ids));
}

TEST_CASE("a chat session streams replies, keeps history and trims it to fit") {
  const auto tok = text::ChatGlmTokenizer::load(demo_dir());
  const auto model = model::GlmModel::load(model_for_demo_tokenizer(tok), model::make_cpu_backend(2));
  engine::ChatOptions options;
  options.generation.max_new_tokens = 6;
  options.generation.sampling.seed = 5;
  options.min_answer_tokens = 8;
  engine::ChatSession chat(model, tok, options);
  std::string streamed;
  const std::string reply = chat.reply("头痛怎么办？", [&](std::string_view piece) {
    streamed += piece;
    return true;
  });
  CHECK(chat.history().size() == 1);
  CHECK(chat.history()[0].first == "头痛怎么办？");
  CHECK(chat.history()[0].second == reply);
  CHECK(reply.find_first_not_of(" \n") == 0);  // trimmed

  // The second prompt carries the first round in the Round0 template.
  const auto ids = chat.prompt_ids("还有呢？");
  CHECK(tok.decode(ids).find("[Round 1]") != std::string::npos);

  // Fill the history until the oldest rounds must be dropped to fit max_length 128.
  for (int i = 0; i < 12; ++i) chat.reply("请详细介绍一下高血压的饮食注意事项和运动建议。");
  CHECK(static_cast<int>(chat.prompt_ids("再说说").size()) + 8 <= 128);
  CHECK(chat.history().size() < 13);

  chat.reset();
  CHECK(chat.history().empty());
  std::string very_long;
  for (int i = 0; i < 60; ++i) very_long += "患者应定期复查血压并遵医嘱服药。";
  REQUIRE_THROWS_WITH(chat.reply(very_long), QG_CONTAINS("no room"));
}
