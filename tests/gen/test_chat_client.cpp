// ChatClient against the loopback mock server: replies, streaming, retries and their waits,
// errors that must not be retried, timeouts, key rotation, rate limiting and usage accounting.
#include <atomic>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <mutex>

#include "catch.hpp"
#include "gen/sse.h"
#include "mock_server.h"
#include "qinggeng/gen/chat_client.h"
#include "qinggeng/gen/rate_limiter.h"

#if defined(QG_CATCH3)
using Catch::Approx;
#endif

using namespace qg::gen;
using namespace qg::gen::test;

namespace {

// Options for a test client: no real sleeping (waits are recorded), short timeouts.
struct Harness {
  std::mutex mutex;
  std::vector<double> waits;
  ChatClientOptions options(const std::string& base_url, bool stream = false) {
    ChatClientOptions o;
    o.stream = stream;
    o.base_url = base_url;
    o.model = "test-model";
    o.api_keys = {"key-a"};
    o.max_retries = 3;
    o.timeout_s = 5;
    o.sleep = [this](double s) {
      std::lock_guard<std::mutex> lock(mutex);
      waits.push_back(s);
      return true;
    };
    return o;
  }
};

ChatRequest ask(const std::string& text) {
  ChatRequest r;
  r.messages = {{"user", text}};
  return r;
}

std::string sse_event(const std::string& json) { return "data: " + json + "\n\n"; }

std::string delta(const std::string& content) {
  return R"({"id":"chatcmpl-s","choices":[{"index":0,"delta":{"content":")" + content +
         R"("},"finish_reason":null}]})";
}

}  // namespace

TEST_CASE("chat client: a plain reply, the request it sends, and usage", "[gen][chat]") {
  MockServer server([](const MockRequest&) { return reply(200, completion_json("你好", "stop", 12, 3)); });
  Harness h;
  auto o = h.options(server.base_url());
  o.temperature = 0.5;
  o.stop = {"###"};
  o.price_prompt_per_1k = 2.0;
  o.price_completion_per_1k = 4.0;
  ChatClient client(o);
  ChatResult r = client.complete(ask("介绍一下高血压"));
  CHECK(r.content == "你好");
  CHECK(r.finish_reason == "stop");
  CHECK(r.id == "chatcmpl-test");
  CHECK(r.usage.prompt_tokens == 12);
  CHECK(r.usage.completion_tokens == 3);
  CHECK(r.attempts == 1);

  auto reqs = server.requests();
  REQUIRE(reqs.size() == 1);
  CHECK(reqs[0].method == "POST");
  CHECK(reqs[0].path == "/v1/chat/completions");
  CHECK(reqs[0].header("authorization") == "Bearer key-a");
  CHECK(reqs[0].body.find(R"("model":"test-model")") != std::string::npos);
  CHECK(reqs[0].body.find(R"("temperature":0.5)") != std::string::npos);
  CHECK(reqs[0].body.find(R"("stop":["###"])") != std::string::npos);
  CHECK(reqs[0].body.find("介绍一下高血压") != std::string::npos);
  CHECK(reqs[0].body.find("stream") == std::string::npos);

  client.complete(ask("再来一次"));
  UsageTotals u = client.usage();
  CHECK(u.requests == 2);
  CHECK(u.attempts == 2);
  CHECK(u.retries == 0);
  CHECK(u.prompt_tokens == 24);
  CHECK(u.completion_tokens == 6);
  CHECK(u.cost == Approx(24 * 2.0 / 1000 + 6 * 4.0 / 1000));
}

TEST_CASE("chat client: SSE stream split at odd byte boundaries", "[gen][chat]") {
  std::string stream = sse_event(delta("高血")) + ": keep-alive comment\n\n" +
                       sse_event(delta("压是")) + sse_event(delta("一种慢性病。")) +
                       sse_event(R"({"id":"chatcmpl-s","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]})") +
                       sse_event(R"({"id":"chatcmpl-s","choices":[],"usage":{"prompt_tokens":7,"completion_tokens":9}})") +
                       "data: [DONE]\n\n";
  // Pieces of 1, 2, 3, ... bytes: boundaries fall inside "data:", inside JSON and inside
  // multi-byte UTF-8 characters.
  std::vector<std::string> pieces;
  for (std::size_t pos = 0, n = 1; pos < stream.size(); pos += n, n = n % 7 + 1) {
    pieces.push_back(stream.substr(pos, n));
  }
  MockServer server([&](const MockRequest&) { return stream_reply(pieces); });
  Harness h;
  ChatClient client(h.options(server.base_url(), true));
  ChatResult r = client.complete(ask("什么是高血压"));
  CHECK(r.content == "高血压是一种慢性病。");
  CHECK(r.finish_reason == "stop");
  CHECK(r.usage.prompt_tokens == 7);
  CHECK(r.usage.completion_tokens == 9);
  auto reqs = server.requests();
  REQUIRE(reqs.size() == 1);
  CHECK(reqs[0].body.find(R"("stream":true)") != std::string::npos);
  CHECK(reqs[0].header("accept") == "text/event-stream");
}

TEST_CASE("sse splitter: events, CRLF, comments, multi-line data, unterminated tail", "[gen][chat]") {
  SseSplitter s;
  std::string text = "data: a\r\n\r\n: comment\n\nevent: x\ndata: b1\ndata:b2\n\ndata: tail";
  std::vector<std::string> all;
  for (char c : text) {
    for (auto& e : s.feed(std::string(1, c))) all.push_back(e);
  }
  for (auto& e : s.finish()) all.push_back(e);
  REQUIRE(all.size() == 3);
  CHECK(all[0] == "a");
  CHECK(all[1] == "b1\nb2");
  CHECK(all[2] == "tail");
}

TEST_CASE("chat client: stream cut before completion is retried", "[gen][chat]") {
  std::atomic<int> calls{0};
  MockServer server([&](const MockRequest&) {
    if (calls++ == 0) return stream_reply({sse_event(delta("半"))});
    return stream_reply({sse_event(delta("完整")), "data: [DONE]\n\n"});
  });
  Harness h;
  ChatClient client(h.options(server.base_url(), true));
  ChatResult r = client.complete(ask("x"));
  CHECK(r.content == "完整");
  CHECK(r.attempts == 2);
  // No usage in the stream: estimated from the text.
  CHECK(r.usage.completion_tokens == 2);
}

TEST_CASE("chat client: 429 with Retry-After is retried after the requested wait", "[gen][chat]") {
  std::atomic<int> calls{0};
  MockServer server([&](const MockRequest&) {
    int n = calls++;
    if (n == 0) return reply(429, error_json("slow down", "rate_limit_exceeded"), {{"Retry-After", "7"}});
    if (n == 1) return reply(429, error_json("slow down", "rate_limit_exceeded"), {{"retry-after-ms", "1500"}});
    return reply(200, completion_json("好"));
  });
  Harness h;
  ChatClient client(h.options(server.base_url()));
  ChatResult r = client.complete(ask("x"));
  CHECK(r.content == "好");
  CHECK(r.attempts == 3);
  REQUIRE(h.waits.size() == 2);
  CHECK(h.waits[0] == Approx(7.0));
  CHECK(h.waits[1] == Approx(1.5));
  CHECK(client.usage().retries == 2);
}

TEST_CASE("chat client: Retry-After as an HTTP date", "[gen][chat]") {
  std::atomic<int> calls{0};
  std::time_t when = std::time(nullptr) + 30;
  char date[64];
  std::strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S GMT", std::gmtime(&when));
  MockServer server([&](const MockRequest&) {
    if (calls++ == 0) return reply(503, "busy", {{"Retry-After", date}});
    return reply(200, completion_json("好"));
  });
  Harness h;
  ChatClient client(h.options(server.base_url()));
  client.complete(ask("x"));
  REQUIRE(h.waits.size() == 1);
  CHECK(h.waits[0] > 25.0);
  CHECK(h.waits[0] <= 31.0);
}

TEST_CASE("chat client: 500 then success uses capped exponential backoff", "[gen][chat]") {
  std::atomic<int> calls{0};
  MockServer server([&](const MockRequest&) {
    if (calls++ < 3) return reply(500, error_json("internal", "server_error"));
    return reply(200, completion_json("好"));
  });
  Harness h;
  auto o = h.options(server.base_url());
  o.backoff_initial_s = 2.0;
  o.backoff_max_s = 5.0;
  ChatClient client(o);
  CHECK(client.complete(ask("x")).attempts == 4);
  REQUIRE(h.waits.size() == 3);
  // Equal jitter: attempt k waits in [cap/2, cap] with cap = min(5, 2 * 2^k).
  CHECK(h.waits[0] >= 1.0);
  CHECK(h.waits[0] <= 2.0);
  CHECK(h.waits[1] >= 2.0);
  CHECK(h.waits[1] <= 4.0);
  CHECK(h.waits[2] >= 2.5);
  CHECK(h.waits[2] <= 5.0);
}

TEST_CASE("chat client: malformed JSON reply is retried, then reported", "[gen][chat]") {
  MockServer server([](const MockRequest&) { return reply(200, "{\"choices\": [oops"); });
  Harness h;
  auto o = h.options(server.base_url());
  o.max_retries = 2;
  ChatClient client(o);
  REQUIRE_THROWS_WITH(client.complete(ask("x")),
                      QG_CONTAINS("after 3 attempts") &&
                          QG_CONTAINS("malformed JSON"));
  CHECK(server.request_count() == 3);
  CHECK(client.usage().failures == 1);
}

TEST_CASE("chat client: 400 is not retried and the error names status and message", "[gen][chat]") {
  MockServer server([](const MockRequest&) {
    return reply(400, error_json("max_tokens is too large", "invalid_request_error"));
  });
  Harness h;
  ChatClient client(h.options(server.base_url()));
  try {
    client.complete(ask("x"));
    FAIL("expected ApiError");
  } catch (const ApiError& e) {
    CHECK(e.status() == 400);
    CHECK_FALSE(e.transient());
    CHECK(std::string(e.what()).find("HTTP 400") != std::string::npos);
    CHECK(std::string(e.what()).find("max_tokens is too large") != std::string::npos);
  }
  CHECK(server.request_count() == 1);
  CHECK(h.waits.empty());
}

TEST_CASE("chat client: insufficient_quota (sent as 429) is not retried", "[gen][chat]") {
  MockServer server([](const MockRequest&) {
    return reply(429, error_json("You exceeded your current quota", "insufficient_quota"), {{"Retry-After", "1"}});
  });
  Harness h;
  ChatClient client(h.options(server.base_url()));
  try {
    client.complete(ask("x"));
    FAIL("expected ApiError");
  } catch (const ApiError& e) {
    CHECK(e.code() == "insufficient_quota");
    CHECK_FALSE(e.transient());
    CHECK(std::string(e.what()).find("exceeded your current quota") != std::string::npos);
  }
  CHECK(server.request_count() == 1);
}

TEST_CASE("chat client: connection refused is retried, then a clear error", "[gen][chat]") {
  Harness h;
  auto o = h.options("http://127.0.0.1:" + std::to_string(unused_port()) + "/v1");
  o.max_retries = 2;
  ChatClient client(o);
  try {
    client.complete(ask("x"));
    FAIL("expected ApiError");
  } catch (const ApiError& e) {
    CHECK(e.transient());
    CHECK(e.status() == 0);
    CHECK(std::string(e.what()).find("connection error") != std::string::npos);
    CHECK(std::string(e.what()).find("after 3 attempts") != std::string::npos);
  }
  CHECK(h.waits.size() == 2);
}

TEST_CASE("chat client: a slow reply times out and is retried", "[gen][chat]") {
  std::atomic<int> calls{0};
  MockServer server([&](const MockRequest&) {
    MockReply r = reply(200, completion_json("迟到"));
    if (calls++ == 0) r.delay_s = 3.0;
    return r;
  });
  Harness h;
  auto o = h.options(server.base_url());
  o.timeout_s = 0.3;
  ChatClient client(o);
  ChatResult r = client.complete(ask("x"));
  CHECK(r.content == "迟到");
  CHECK(r.attempts == 2);

  o.max_retries = 0;
  calls = 0;
  ChatClient strict(o);
  REQUIRE_THROWS_WITH(strict.complete(ask("x")), QG_CONTAINS("timed out"));
}

TEST_CASE("chat client: keys are rotated across requests", "[gen][chat]") {
  MockServer server([](const MockRequest&) { return reply(200, completion_json("好")); });
  Harness h;
  auto o = h.options(server.base_url());
  o.api_keys = {"k1", "k2", "k3"};
  ChatClient client(o);
  for (int i = 0; i < 4; ++i) client.complete(ask("x"));
  auto reqs = server.requests();
  REQUIRE(reqs.size() == 4);
  CHECK(reqs[0].header("authorization") == "Bearer k1");
  CHECK(reqs[1].header("authorization") == "Bearer k2");
  CHECK(reqs[2].header("authorization") == "Bearer k3");
  CHECK(reqs[3].header("authorization") == "Bearer k1");

  o.api_keys.clear();
  ChatClient keyless(o);
  keyless.complete(ask("x"));
  CHECK(server.requests().back().header("authorization").empty());
}

TEST_CASE("chat client: API keys from a file or the environment", "[gen][chat]") {
  auto file = std::filesystem::path(QG_BINARY_DIR) / "gen_test_keys.txt";
  std::ofstream(file) << "# keys\nsk-one\n\n  sk-two  \n";
  CHECK(load_api_keys(file) == std::vector<std::string>{"sk-one", "sk-two"});
  std::ofstream(file) << "# none\n";
  REQUIRE_THROWS_WITH(load_api_keys(file), QG_CONTAINS("holds no key"));
  REQUIRE_THROWS_WITH(load_api_keys(file.string() + ".missing"),
                      QG_CONTAINS(".missing"));
  ::setenv("QG_TEST_KEYS", "a1, b2 c3", 1);
  CHECK(load_api_keys("", "QG_TEST_KEYS") == std::vector<std::string>{"a1", "b2", "c3"});
  std::filesystem::remove(file);
}

TEST_CASE("chat client: invalid options are rejected", "[gen][chat]") {
  ChatClientOptions o;
  o.base_url = "http://127.0.0.1:1/v1";
  REQUIRE_THROWS_WITH(ChatClient(o), QG_CONTAINS("model"));
  o.model = "m";
  o.base_url = "127.0.0.1:1/v1";
  REQUIRE_THROWS_WITH(ChatClient(o), QG_CONTAINS("http://"));
}

TEST_CASE("rate limiter: request and token buckets on a virtual clock", "[gen][chat]") {
  SECTION("requests per minute") {
    RateLimiter rl(60, 0);  // one per second, burst of 60
    for (int i = 0; i < 60; ++i) REQUIRE(rl.try_acquire(0.0, 0) == 0.0);
    CHECK(rl.try_acquire(0.0, 0) == Approx(1.0));
    CHECK(rl.try_acquire(0.5, 0) == Approx(0.5));
    CHECK(rl.try_acquire(1.0, 0) == 0.0);
    CHECK(rl.try_acquire(1.0, 0) > 0.0);
  }
  SECTION("tokens per minute, with settlement of the real usage") {
    RateLimiter rl(0, 600);  // 10 tokens per second
    CHECK(rl.try_acquire(0.0, 500) == 0.0);
    CHECK(rl.try_acquire(0.0, 200) == Approx(10.0));  // needs 100 more tokens
    rl.settle(500, 300);                               // it really used 300: 200 back
    CHECK(rl.try_acquire(0.0, 200) == 0.0);
    rl.settle(200, 400);                               // used 200 more than reserved
    CHECK(rl.try_acquire(0.0, 100) == Approx(20.0));   // level -100: 200 tokens to refill
    // A request larger than the whole minute's allowance waits for a full bucket, not forever.
    CHECK(rl.try_acquire(100.0, 5000) == 0.0);
  }
  SECTION("unlimited") {
    RateLimiter rl(0, 0);
    for (int i = 0; i < 1000; ++i) REQUIRE(rl.try_acquire(0.0, 1e6) == 0.0);
  }
  REQUIRE_THROWS_WITH(RateLimiter(-1, 0), QG_CONTAINS("negative"));
}

TEST_CASE("chat client: cancellation stops retry waits", "[gen][chat]") {
  MockServer server([](const MockRequest&) { return reply(503, "busy", {{"Retry-After", "100"}}); });
  Cancellation cancel;
  ChatClientOptions o;
  o.base_url = server.base_url();
  o.model = "m";
  o.sleep = [&](double) {
    cancel.request();
    return false;
  };
  ChatClient client(o, &cancel);
  REQUIRE_THROWS_AS(client.complete(ask("x")), Cancelled);
}

TEST_CASE("token estimate counts CJK characters and ASCII bytes", "[gen][chat]") {
  CHECK(estimate_tokens("") == 0);
  CHECK(estimate_tokens("高血压") == 3);
  CHECK(estimate_tokens("abcdefgh") == 2);
  CHECK(estimate_tokens("血压120/80") == 2 + 2);
}
