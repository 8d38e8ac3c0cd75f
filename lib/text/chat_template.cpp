// ChatGLM v1 chat prompt templates (see include/qinggeng/text/chat_template.h).
#include "qinggeng/text/chat_template.h"

#include "qinggeng/error.h"

namespace qg::text {

ChatTemplate parse_chat_template(std::string_view name) {
  if (name == "round0" || name == "v1") return ChatTemplate::Round0;
  if (name == "round1" || name == "v1.1") return ChatTemplate::Round1;
  fail("unknown chat template '", name, "' (expected round0 or round1)");
}

std::string build_chat_prompt(const std::vector<ChatTurn>& history, std::string_view query,
                              ChatTemplate style) {
  if (history.empty()) return std::string(query);
  const bool round1 = style == ChatTemplate::Round1;
  const int first = round1 ? 1 : 0;
  const char* sep = round1 ? "\n\n" : "\n";
  std::string prompt;
  for (std::size_t i = 0; i < history.size(); ++i) {
    prompt += "[Round " + std::to_string(first + static_cast<int>(i)) + "]" + sep;
    prompt += "问：" + history[i].first + sep;
    prompt += "答：" + history[i].second + sep;
  }
  prompt += "[Round " + std::to_string(first + static_cast<int>(history.size())) + "]" + sep;
  prompt += "问：" + std::string(query) + sep + "答：";
  return prompt;
}

}  // namespace qg::text
