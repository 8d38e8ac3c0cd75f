// Client for OpenAI-compatible chat-completion servers (OpenAI, vLLM, our qg-serve) over
// libcurl: key rotation, retries with backoff that honour Retry-After, optional SSE streaming,
// a requests/tokens-per-minute limiter, and usage/cost accounting. One client is shared by all
// worker threads.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "qinggeng/error.h"
#include "qinggeng/gen/cancellation.h"

namespace qg::gen {

/// \brief An API failure. `transient` failures (408/409/429/5xx, connection errors, timeouts,
/// malformed replies) were retried until the retry budget ran out; the others (other 4xx,
/// `insufficient_quota`) are never retried. The message names the status and the server's
/// error message.
class ApiError : public Error {
 public:
  ApiError(const std::string& message, int status, std::string code, bool transient)
      : Error(message), status_(status), code_(std::move(code)), transient_(transient) {}
  /// \brief HTTP status, 0 when no response was received.
  int status() const { return status_; }
  /// \brief The server's error `code` (or `type`), e.g. "insufficient_quota"; may be empty.
  const std::string& code() const { return code_; }
  /// \brief True when the failure was of a retryable kind.
  bool transient() const { return transient_; }

 private:
  int status_;
  std::string code_;
  bool transient_;
};

/// \brief Thrown when a request is abandoned because cancellation was requested.
class Cancelled : public Error {
 public:
  Cancelled() : Error("cancelled") {}
};

/// \brief One chat message.
struct ChatMessage {
  std::string role;  ///< "system", "user" or "assistant"
  std::string content;
};

/// \brief Token counts of one or many requests.
struct TokenUsage {
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
};

/// \brief The reply to one chat request.
struct ChatResult {
  std::string content;        ///< the assistant message (concatenated deltas when streaming)
  std::string finish_reason;  ///< "stop", "length", ... ("" if the server sent none)
  std::string id;             ///< the completion id, else the x-request-id header
  TokenUsage usage;           ///< as reported by the server, else estimated from text length
  int attempts = 1;           ///< HTTP attempts made (1 = no retry)
};

/// \brief Thread-safe running totals over every request made by a client.
struct UsageTotals {
  std::int64_t requests = 0;  ///< successful requests
  std::int64_t attempts = 0;  ///< HTTP attempts including retries
  std::int64_t retries = 0;
  std::int64_t failures = 0;  ///< requests that ended in an ApiError
  std::int64_t prompt_tokens = 0;
  std::int64_t completion_tokens = 0;
  double cost = 0.0;  ///< estimated from the per-1k-token prices
};

/// \brief Settings of a ChatClient. Sampling fields are defaults a request may override.
struct ChatClientOptions {
  std::string base_url = "https://api.openai.com/v1";  ///< ".../v1"; "/chat/completions" added
  std::vector<std::string> api_keys;  ///< rotated per request; empty: no Authorization header
  std::string model;
  double temperature = 1.0;
  double top_p = 1.0;
  int max_tokens = 1024;
  std::vector<std::string> stop;
  bool stream = false;           ///< use SSE streaming
  double timeout_s = 120.0;      ///< whole request
  double connect_timeout_s = 10.0;
  int max_retries = 6;           ///< retries after the first attempt
  double backoff_initial_s = 1.0;
  double backoff_max_s = 60.0;   ///< cap of the exponential backoff
  double retry_after_max_s = 600.0;  ///< cap on a server-requested wait
  double price_prompt_per_1k = 0.0;      ///< currency units per 1000 prompt tokens
  double price_completion_per_1k = 0.0;  ///< per 1000 completion tokens
  double requests_per_minute = 0.0;      ///< 0: unlimited
  double tokens_per_minute = 0.0;        ///< 0: unlimited
  /// Waits between retries; defaults to an interruptible sleep. Tests replace it to record the
  /// requested delays instead of sleeping. Returns false to abandon (cancelled).
  std::function<bool(double seconds)> sleep;
};

/// \brief Per-request overrides of the client's sampling defaults.
struct ChatRequest {
  std::vector<ChatMessage> messages;
  std::optional<double> temperature;
  std::optional<double> top_p;
  std::optional<int> max_tokens;
  std::optional<std::vector<std::string>> stop;
};

/// \brief API keys from a file (one per line; blank lines and '#' comments ignored) when `file`
/// is non-empty, else from environment variable `env_var` (comma- or space-separated). Throws
/// qg::Error naming the file when it cannot be read or holds no key.
std::vector<std::string> load_api_keys(const std::filesystem::path& file,
                                       const std::string& env_var = "OPENAI_API_KEY");

/// \brief A rough token count for text (CJK characters count one each, other text one per
/// four bytes), used for rate limiting and when a server reports no usage.
std::int64_t estimate_tokens(const std::string& text);

/// \brief OpenAI-compatible /v1/chat/completions client. complete() may be called from many
/// threads at once.
class ChatClient {
 public:
  /// \brief A client; `cancel` (optional, must outlive the client) aborts in-flight requests
  /// and retry waits.
  explicit ChatClient(ChatClientOptions options, const Cancellation* cancel = nullptr);
  ~ChatClient();
  ChatClient(const ChatClient&) = delete;
  ChatClient& operator=(const ChatClient&) = delete;

  /// \brief Sends one chat request, retrying transient failures. Throws ApiError when it fails
  /// for good, Cancelled when cancellation was requested.
  ChatResult complete(const ChatRequest& request);

  /// \brief Totals over all requests so far.
  UsageTotals usage() const;

  /// \brief The options in use.
  const ChatClientOptions& options() const { return options_; }

  /// \brief The JSON request body complete() sends for `request` (exposed for tests).
  std::string request_body(const ChatRequest& request) const;

 private:
  struct Impl;
  ChatClientOptions options_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace qg::gen
