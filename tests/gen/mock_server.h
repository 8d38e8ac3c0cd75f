// A scripted HTTP/1.1 server on 127.0.0.1 for the generator tests: each request is answered by
// a handler with a status, headers and a body that may be sent in pieces with delays (for SSE
// split at odd byte boundaries and slow replies). One connection per request.
#pragma once

#include <atomic>
#include <filesystem>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace qg::gen::test {

struct MockRequest {
  std::string method;
  std::string path;
  std::vector<std::pair<std::string, std::string>> headers;  // names lower-cased
  std::string body;
  std::string header(const std::string& name) const;
};

struct MockReply {
  int status = 200;
  std::vector<std::pair<std::string, std::string>> headers;
  std::string body;                 // sent with Content-Length unless `pieces` is non-empty
  std::vector<std::string> pieces;  // sent one write each, then the connection is closed
  double delay_s = 0;               // before the status line
  double piece_delay_s = 0;         // between pieces
  bool drop = false;                // close the connection without answering
};

/// A reply with a status, a body and optional headers.
inline MockReply reply(int status, std::string body,
                       std::vector<std::pair<std::string, std::string>> headers = {}) {
  MockReply r;
  r.status = status;
  r.body = std::move(body);
  r.headers = std::move(headers);
  return r;
}

/// A reply sent as raw pieces (for SSE), then the connection is closed.
inline MockReply stream_reply(std::vector<std::string> pieces) {
  MockReply r;
  r.pieces = std::move(pieces);
  return r;
}

class MockServer {
 public:
  using Handler = std::function<MockReply(const MockRequest&)>;
  explicit MockServer(Handler handler);
  ~MockServer();
  MockServer(const MockServer&) = delete;
  MockServer& operator=(const MockServer&) = delete;

  int port() const { return port_; }
  std::string base_url() const { return "http://127.0.0.1:" + std::to_string(port_) + "/v1"; }
  std::vector<MockRequest> requests() const;
  std::size_t request_count() const;

 private:
  void serve();
  void handle(int fd);
  bool pause(double seconds) const;

  Handler handler_;
  int listen_fd_ = -1;
  int port_ = 0;
  std::atomic<bool> stop_{false};
  mutable std::mutex mutex_;
  std::vector<MockRequest> requests_;
  std::vector<std::thread> connections_;
  std::thread acceptor_;
};

/// An empty directory QG_BINARY_DIR/gen_test_scratch/<name> (removed first if present).
std::filesystem::path scratch_dir(const std::string& name);

/// A port on 127.0.0.1 with nothing listening (bound, then closed).
int unused_port();

/// A JSON chat-completion reply body.
std::string completion_json(const std::string& content, const std::string& finish_reason = "stop",
                            int prompt_tokens = 10, int completion_tokens = 5);

/// A JSON error body {"error":{"message","type","code"}}.
std::string error_json(const std::string& message, const std::string& code);

}  // namespace qg::gen::test
