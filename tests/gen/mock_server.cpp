// Scripted loopback HTTP server for the generator tests (see mock_server.h).
#include "mock_server.h"

#include "scratch_dir.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cctype>
#include <chrono>
#include <cstdlib>
#include <stdexcept>

#include "io/json.h"

namespace qg::gen::test {

namespace {
std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool send_all(int fd, const std::string& data) {
  std::size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::send(fd, data.data() + done, data.size() - done, MSG_NOSIGNAL);
    if (n <= 0) return false;
    done += static_cast<std::size_t>(n);
  }
  return true;
}

const char* reason(int status) {
  switch (status) {
    case 200: return "OK";
    case 400: return "Bad Request";
    case 401: return "Unauthorized";
    case 408: return "Request Timeout";
    case 429: return "Too Many Requests";
    case 500: return "Internal Server Error";
    case 503: return "Service Unavailable";
    default: return "Status";
  }
}
}  // namespace

std::string MockRequest::header(const std::string& name) const {
  for (const auto& [k, v] : headers) {
    if (k == lower(name)) return v;
  }
  return {};
}

MockServer::MockServer(Handler handler) : handler_(std::move(handler)) {
  // Loopback requests must never go through a proxy configured in the environment.
  ::setenv("NO_PROXY", "127.0.0.1,localhost", 1);
  ::setenv("no_proxy", "127.0.0.1,localhost", 1);
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM, 0);
  if (listen_fd_ < 0) throw std::runtime_error("mock server: socket failed");
  int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = 0;
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0 ||
      ::listen(listen_fd_, 64) != 0) {
    throw std::runtime_error("mock server: bind/listen failed");
  }
  socklen_t len = sizeof addr;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  acceptor_ = std::thread([this] { serve(); });
}

MockServer::~MockServer() {
  stop_ = true;
  acceptor_.join();
  for (auto& t : connections_) t.join();
  ::close(listen_fd_);
}

std::vector<MockRequest> MockServer::requests() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return requests_;
}

std::size_t MockServer::request_count() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return requests_.size();
}

bool MockServer::pause(double seconds) const {
  auto until = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (std::chrono::steady_clock::now() < until) {
    if (stop_) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return !stop_;
}

void MockServer::serve() {
  while (!stop_) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 20) <= 0) continue;
    int fd = ::accept(listen_fd_, nullptr, nullptr);
    if (fd < 0) continue;
    std::lock_guard<std::mutex> lock(mutex_);
    connections_.emplace_back([this, fd] {
      handle(fd);
      ::close(fd);
    });
  }
}

void MockServer::handle(int fd) {
  std::string data;
  char buf[4096];
  std::size_t header_end = std::string::npos;
  std::size_t content_length = 0;
  MockRequest req;
  auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(5);
  for (;;) {
    if (stop_ || std::chrono::steady_clock::now() > deadline) return;
    if (header_end != std::string::npos && data.size() >= header_end + 4 + content_length) break;
    pollfd p{fd, POLLIN, 0};
    if (::poll(&p, 1, 20) <= 0) continue;
    ssize_t n = ::recv(fd, buf, sizeof buf, 0);
    if (n <= 0) return;
    data.append(buf, static_cast<std::size_t>(n));
    if (header_end == std::string::npos && (header_end = data.find("\r\n\r\n")) != std::string::npos) {
      std::size_t line_end = data.find("\r\n");
      std::string first = data.substr(0, line_end);
      req.method = first.substr(0, first.find(' '));
      std::size_t p1 = first.find(' ') + 1;
      req.path = first.substr(p1, first.find(' ', p1) - p1);
      std::size_t pos = line_end + 2;
      while (pos < header_end) {
        std::size_t e = data.find("\r\n", pos);
        std::string line = data.substr(pos, e - pos);
        std::size_t colon = line.find(':');
        std::string value = line.substr(colon + 1);
        value.erase(0, value.find_first_not_of(' '));
        req.headers.emplace_back(lower(line.substr(0, colon)), value);
        pos = e + 2;
      }
      std::string cl = req.header("content-length");
      content_length = cl.empty() ? 0 : std::stoul(cl);
    }
  }
  req.body = data.substr(header_end + 4, content_length);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    requests_.push_back(req);
  }
  MockReply reply = handler_(req);
  if (reply.delay_s > 0 && !pause(reply.delay_s)) return;
  if (reply.drop) return;
  std::string head = "HTTP/1.1 " + std::to_string(reply.status) + " " + reason(reply.status) +
                     "\r\nConnection: close\r\n";
  for (const auto& [k, v] : reply.headers) head += k + ": " + v + "\r\n";
  if (reply.pieces.empty()) {
    bool has_type = false;
    for (const auto& h : reply.headers) has_type = has_type || lower(h.first) == "content-type";
    if (!has_type) head += "Content-Type: application/json\r\n";
    head += "Content-Length: " + std::to_string(reply.body.size()) + "\r\n\r\n";
    send_all(fd, head + reply.body);
    return;
  }
  head += "Content-Type: text/event-stream\r\n\r\n";
  if (!send_all(fd, head)) return;
  for (const auto& piece : reply.pieces) {
    if (reply.piece_delay_s > 0 && !pause(reply.piece_delay_s)) return;
    if (!send_all(fd, piece)) return;
  }
}

std::filesystem::path scratch_dir(const std::string& name) {
  return qg::test::scratch_dir("gen/" + name);
}

int unused_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  socklen_t len = sizeof addr;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
  ::close(fd);
  return ntohs(addr.sin_port);
}

std::string completion_json(const std::string& content, const std::string& finish_reason,
                            int prompt_tokens, int completion_tokens) {
  return R"({"id":"chatcmpl-test","object":"chat.completion","choices":[{"index":0,)"
         R"("message":{"role":"assistant","content":)" +
         json::quote(content) + R"(},"finish_reason":)" + json::quote(finish_reason) +
         R"(}],"usage":{"prompt_tokens":)" + std::to_string(prompt_tokens) +
         R"(,"completion_tokens":)" + std::to_string(completion_tokens) + "}}";
}

std::string error_json(const std::string& message, const std::string& code) {
  return R"({"error":{"message":)" + json::quote(message) + R"(,"type":"error","code":)" +
         json::quote(code) + "}}";
}

}  // namespace qg::gen::test
