// ChatTemplate: how ChatGLM-6B (v1) turns a conversation into prompt text (spec section 2).
//
//   Round0 (first release):  "[Round 0]\n问：q0\n答：r0\n[Round 1]\n问：q1\n答："
//   Round1 (later revision): "[Round 1]\n\n问：q0\n\n答：r0\n\n[Round 2]\n\n问：q1\n\n答："
// With no history both use the query alone. The prompt's token ids are then
// encode(prompt) + [gMASK] + <sop>.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qg::text {

/// \brief One finished exchange: (query, response).
using ChatTurn = std::pair<std::string, std::string>;

/// \brief The v1 history template variants.
enum class ChatTemplate { Round0, Round1 };

/// \brief Parses "round0" / "round1" (also "v1" = round0, "v1.1" = round1).
/// \throws qg::Error listing the accepted names.
ChatTemplate parse_chat_template(std::string_view name);

/// \brief The prompt text for `query` after `history`.
std::string build_chat_prompt(const std::vector<ChatTurn>& history, std::string_view query,
                              ChatTemplate style = ChatTemplate::Round0);

}  // namespace qg::text
