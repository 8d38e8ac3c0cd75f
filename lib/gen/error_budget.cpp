// Failure policy of generator workers (see error_budget.h).
#include "gen/error_budget.h"

namespace qg::gen {

std::optional<ChatResult> ErrorBudget::complete(ChatClient& client, const ChatRequest& request) {
  try {
    ChatResult r = client.complete(request);
    consecutive_ = 0;
    return r;
  } catch (const Cancelled&) {
    return std::nullopt;
  } catch (const ApiError& e) {
    if (!e.transient()) throw;
    ++stats_.errors;
    if (++consecutive_ >= max_) throw;
    return std::nullopt;
  }
}

}  // namespace qg::gen
