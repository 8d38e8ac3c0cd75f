// OpenAI-compatible chat client over libcurl (see chat_client.h). Each attempt uses its own
// easy handle, so the client is shared freely between worker threads.
#include "qinggeng/gen/chat_client.h"

#include <curl/curl.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <ctime>
#include <fstream>
#include <mutex>
#include <random>
#include <sstream>

#include "gen/sse.h"
#include "gen/utf8.h"
#include "io/json.h"
#include "qinggeng/gen/jsonl.h"
#include "qinggeng/gen/rate_limiter.h"

namespace qg::gen {

namespace {

std::string trim(std::string_view s) {
  std::size_t b = s.find_first_not_of(" \t\r\n");
  if (b == std::string_view::npos) return {};
  std::size_t e = s.find_last_not_of(" \t\r\n");
  return std::string(s.substr(b, e - b + 1));
}

std::string lower(std::string s) {
  for (auto& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

void curl_global() {
  static std::once_flag once;
  std::call_once(once, [] { curl_global_init(CURL_GLOBAL_DEFAULT); });
}

// What one HTTP attempt produced.
struct Attempt {
  CURLcode curl = CURLE_OK;
  std::string curl_message;
  long status = 0;
  std::string body;
  std::string retry_after;
  std::string retry_after_ms;
  std::string request_id;
  // Streaming state (used when the request streams and the status is 200).
  bool stream = false;
  SseSplitter sse;
  std::vector<std::string> events;
  CURL* handle = nullptr;
  const Cancellation* cancel = nullptr;
};

std::size_t on_body(char* data, std::size_t size, std::size_t n, void* user) {
  auto* a = static_cast<Attempt*>(user);
  std::string_view bytes(data, size * n);
  long status = 0;
  curl_easy_getinfo(a->handle, CURLINFO_RESPONSE_CODE, &status);
  if (a->stream && status == 200) {
    for (auto& e : a->sse.feed(bytes)) a->events.push_back(std::move(e));
  } else {
    a->body.append(bytes);
  }
  return size * n;
}

std::size_t on_header(char* data, std::size_t size, std::size_t n, void* user) {
  auto* a = static_cast<Attempt*>(user);
  std::string_view line(data, size * n);
  if (line.rfind("HTTP/", 0) == 0) {  // a new response (e.g. after 100 Continue)
    a->retry_after.clear();
    a->retry_after_ms.clear();
    return size * n;
  }
  std::size_t colon = line.find(':');
  if (colon == std::string_view::npos) return size * n;
  std::string name = lower(std::string(line.substr(0, colon)));
  std::string value = trim(line.substr(colon + 1));
  if (name == "retry-after") a->retry_after = value;
  if (name == "retry-after-ms") a->retry_after_ms = value;
  if (name == "x-request-id") a->request_id = value;
  return size * n;
}

int on_progress(void* user, curl_off_t, curl_off_t, curl_off_t, curl_off_t) {
  auto* a = static_cast<Attempt*>(user);
  return a->cancel != nullptr && a->cancel->requested() ? 1 : 0;
}

// The server's error message and code from an error body (OpenAI {"error":{...}}, vLLM
// {"message":..}, FastAPI {"detail":..}); the raw body (shortened) if it is not JSON.
struct ServerError {
  std::string message;
  std::string code;
};

ServerError parse_server_error(simdjson::dom::element root) {
  ServerError e;
  simdjson::dom::element err = root;
  simdjson::dom::element inner;
  if (!root["error"].get(inner)) err = inner;
  std::string_view s;
  if (!err.get(s)) {
    e.message = std::string(s);
    return e;
  }
  for (const char* key : {"message", "detail"}) {
    if (!err[key].get(s)) {
      e.message = std::string(s);
      break;
    }
  }
  if (e.message.empty() && !root["detail"].get(s)) e.message = std::string(s);
  if (!err["code"].get(s) && !s.empty()) {
    e.code = std::string(s);
  } else if (!err["type"].get(s)) {
    e.code = std::string(s);
  }
  return e;
}

ServerError parse_server_error(const std::string& body) {
  simdjson::dom::parser parser;
  simdjson::dom::element root;
  if (!parser.parse(simdjson::padded_string(body)).get(root)) {
    ServerError e = parse_server_error(root);
    if (!e.message.empty() || !e.code.empty()) return e;
  }
  ServerError e;
  e.message = trim(body.substr(0, 300));
  return e;
}

// Parses the usage object of a reply into `usage`; false when absent.
bool read_usage(simdjson::dom::element root, TokenUsage& usage) {
  simdjson::dom::object u;
  if (root["usage"].get(u)) return false;
  std::int64_t p = 0, c = 0;
  bool any = false;
  if (!u["prompt_tokens"].get(p)) {
    usage.prompt_tokens = p;
    any = true;
  }
  if (!u["completion_tokens"].get(c)) {
    usage.completion_tokens = c;
    any = true;
  }
  return any;
}

double parse_retry_after(const Attempt& a) {
  if (!a.retry_after_ms.empty()) {
    char* end = nullptr;
    double ms = std::strtod(a.retry_after_ms.c_str(), &end);
    if (end != a.retry_after_ms.c_str() && ms >= 0) return ms / 1000.0;
  }
  if (!a.retry_after.empty()) {
    char* end = nullptr;
    double s = std::strtod(a.retry_after.c_str(), &end);
    if (end != a.retry_after.c_str() && *end == '\0' && s >= 0) return s;
    std::time_t when = curl_getdate(a.retry_after.c_str(), nullptr);
    if (when != -1) return std::max(0.0, std::difftime(when, std::time(nullptr)));
  }
  return -1;
}

bool retryable_status(long status) {
  return status == 408 || status == 409 || status == 429 || status >= 500;
}

// The outcome of one attempt, after classification.
struct Outcome {
  enum Kind { kOk, kTransient, kFatal } kind = kOk;
  std::string message;
  std::string code;
  ChatResult result;
};

}  // namespace

std::vector<std::string> load_api_keys(const std::filesystem::path& file,
                                       const std::string& env_var) {
  std::vector<std::string> keys;
  if (!file.empty()) {
    std::ifstream in(file);
    QG_CHECK(in, file.string(), ": cannot open API key file");
    for (std::string line; std::getline(in, line);) {
      line = trim(line);
      if (!line.empty() && line[0] != '#') keys.push_back(line);
    }
    QG_CHECK(!keys.empty(), file.string(), ": API key file holds no key");
    return keys;
  }
  if (const char* env = std::getenv(env_var.c_str())) {
    std::string value = env;
    std::replace(value.begin(), value.end(), ',', ' ');
    std::istringstream in(value);
    for (std::string key; in >> key;) keys.push_back(key);
  }
  return keys;
}

std::int64_t estimate_tokens(const std::string& text) {
  std::int64_t cjk = 0, other_bytes = 0;
  for (std::size_t i = 0; i < text.size();) {
    std::size_t start = i;
    char32_t c = utf8::next(text, i);
    if (utf8::is_cjk_ideograph(c)) {
      ++cjk;
    } else {
      other_bytes += static_cast<std::int64_t>(i - start);
    }
  }
  return cjk + (other_bytes + 3) / 4;
}

struct ChatClient::Impl {
  Impl(const ChatClientOptions& o) : limiter(o.requests_per_minute, o.tokens_per_minute) {}
  RateLimiter limiter;
  std::string url;
  const Cancellation* cancel = nullptr;
  Cancellation never;  // stands in when the caller gave none
  std::atomic<std::size_t> next_key{0};
  mutable std::mutex mutex;  // guards totals and rng
  UsageTotals totals;
  std::mt19937_64 rng{std::random_device{}()};

  Attempt perform(const ChatClientOptions& o, const std::string& body, const std::string& key);
  Outcome classify(const ChatClientOptions& o, Attempt& a, const ChatRequest& request);
  double backoff(const ChatClientOptions& o, int attempt);
  void record(const ChatResult* ok, int attempts);
};

ChatClient::ChatClient(ChatClientOptions options, const Cancellation* cancel)
    : options_(std::move(options)), impl_(std::make_unique<Impl>(options_)) {
  QG_CHECK(!options_.model.empty(), "chat client: model name is empty (--model)");
  const std::string& base = options_.base_url;
  QG_CHECK(base.rfind("http://", 0) == 0 || base.rfind("https://", 0) == 0,
           "chat client: base URL must start with http:// or https:// (got \"", base, "\")");
  QG_CHECK(options_.max_retries >= 0, "chat client: max_retries must be >= 0");
  QG_CHECK(options_.timeout_s > 0, "chat client: timeout must be positive");
  std::string url = base;
  while (!url.empty() && url.back() == '/') url.pop_back();
  const std::string suffix = "/chat/completions";
  if (url.size() < suffix.size() || url.compare(url.size() - suffix.size(), suffix.size(),
                                                suffix) != 0) {
    url += suffix;
  }
  impl_->url = url;
  impl_->cancel = cancel != nullptr ? cancel : &impl_->never;
  if (!options_.sleep) {
    const Cancellation* c = impl_->cancel;
    options_.sleep = [c](double s) { return c->sleep_for(s); };
  }
  curl_global();
}

ChatClient::~ChatClient() = default;

std::string ChatClient::request_body(const ChatRequest& r) const {
  std::string messages = "[";
  for (const auto& m : r.messages) {
    if (messages.size() > 1) messages.push_back(',');
    messages += JsonObject().add_string("role", m.role).add_string("content", m.content).str();
  }
  messages += "]";
  JsonObject body;
  body.add_string("model", options_.model).add_raw("messages", messages);
  body.add_number("temperature", r.temperature.value_or(options_.temperature));
  body.add_number("top_p", r.top_p.value_or(options_.top_p));
  body.add_int("max_tokens", r.max_tokens.value_or(options_.max_tokens));
  const auto& stop = r.stop ? *r.stop : options_.stop;
  if (!stop.empty()) {
    std::string list = "[";
    for (const auto& s : stop) list += (list.size() > 1 ? "," : "") + json::quote(s);
    body.add_raw("stop", list + "]");
  }
  if (options_.stream) {
    body.add_bool("stream", true).add_raw("stream_options", R"({"include_usage":true})");
  }
  return body.str();
}

Attempt ChatClient::Impl::perform(const ChatClientOptions& o, const std::string& body,
                                  const std::string& key) {
  Attempt a;
  a.stream = o.stream;
  a.cancel = cancel;
  CURL* h = curl_easy_init();
  QG_CHECK(h != nullptr, "chat client: curl_easy_init failed");
  a.handle = h;
  curl_slist* headers = nullptr;
  headers = curl_slist_append(headers, "Content-Type: application/json");
  headers = curl_slist_append(headers, "Expect:");  // no 100-continue round trip
  if (o.stream) headers = curl_slist_append(headers, "Accept: text/event-stream");
  std::string auth = "Authorization: Bearer " + key;
  if (!key.empty()) headers = curl_slist_append(headers, auth.c_str());
  char error[CURL_ERROR_SIZE] = {0};
  curl_easy_setopt(h, CURLOPT_URL, url.c_str());
  curl_easy_setopt(h, CURLOPT_HTTPHEADER, headers);
  curl_easy_setopt(h, CURLOPT_POSTFIELDS, body.c_str());
  curl_easy_setopt(h, CURLOPT_POSTFIELDSIZE_LARGE, static_cast<curl_off_t>(body.size()));
  curl_easy_setopt(h, CURLOPT_WRITEFUNCTION, on_body);
  curl_easy_setopt(h, CURLOPT_WRITEDATA, &a);
  curl_easy_setopt(h, CURLOPT_HEADERFUNCTION, on_header);
  curl_easy_setopt(h, CURLOPT_HEADERDATA, &a);
  curl_easy_setopt(h, CURLOPT_XFERINFOFUNCTION, on_progress);
  curl_easy_setopt(h, CURLOPT_XFERINFODATA, &a);
  curl_easy_setopt(h, CURLOPT_NOPROGRESS, 0L);
  curl_easy_setopt(h, CURLOPT_NOSIGNAL, 1L);
  curl_easy_setopt(h, CURLOPT_TIMEOUT_MS, static_cast<long>(o.timeout_s * 1000));
  curl_easy_setopt(h, CURLOPT_CONNECTTIMEOUT_MS, static_cast<long>(o.connect_timeout_s * 1000));
  curl_easy_setopt(h, CURLOPT_ACCEPT_ENCODING, "");
  curl_easy_setopt(h, CURLOPT_ERRORBUFFER, error);
  a.curl = curl_easy_perform(h);
  curl_easy_getinfo(h, CURLINFO_RESPONSE_CODE, &a.status);
  if (a.curl != CURLE_OK) a.curl_message = error[0] ? error : curl_easy_strerror(a.curl);
  if (a.stream && a.status == 200) {
    for (auto& e : a.sse.finish()) a.events.push_back(std::move(e));
  }
  curl_slist_free_all(headers);
  curl_easy_cleanup(h);
  a.handle = nullptr;
  return a;
}

Outcome ChatClient::Impl::classify(const ChatClientOptions& o, Attempt& a,
                                   const ChatRequest& request) {
  Outcome out;
  auto transient = [&](std::string message) {
    out.kind = Outcome::kTransient;
    out.message = std::move(message);
    return out;
  };
  if (a.curl == CURLE_ABORTED_BY_CALLBACK) throw Cancelled();
  if (a.curl == CURLE_OPERATION_TIMEDOUT) {
    return transient("timed out after " + std::to_string(o.timeout_s) + " s");
  }
  if (a.curl != CURLE_OK) return transient("connection error: " + a.curl_message);
  if (a.status != 200) {
    ServerError e = parse_server_error(a.body);
    out.code = e.code;
    std::string message = "HTTP " + std::to_string(a.status) +
                          (e.code.empty() ? "" : " " + e.code) + ": " + e.message;
    if (e.code == "insufficient_quota") {
      out.kind = Outcome::kFatal;
      out.message = message + " (quota exhausted; not retried)";
      return out;
    }
    if (retryable_status(a.status)) return transient(message);
    out.kind = Outcome::kFatal;
    out.message = message;
    return out;
  }

  ChatResult& r = out.result;
  r.id = a.request_id;
  bool have_usage = false;
  simdjson::dom::parser parser;
  auto take_id = [&](simdjson::dom::element root) {
    std::string_view id;
    if (!root["id"].get(id) && !id.empty()) r.id = std::string(id);
  };
  auto take_choice = [&](simdjson::dom::element choice, const char* message_key) {
    std::string_view s;
    if (!choice[message_key]["content"].get(s)) r.content += s;
    if (!choice["finish_reason"].get(s)) r.finish_reason = std::string(s);
  };
  if (a.stream) {
    bool done = false;
    for (const auto& data : a.events) {
      if (trim(data) == "[DONE]") {
        done = true;
        continue;
      }
      simdjson::dom::element root;
      if (parser.parse(simdjson::padded_string(data)).get(root)) {
        return transient("malformed JSON in stream event: " + data.substr(0, 200));
      }
      simdjson::dom::element err;
      if (!root["error"].get(err) && !err.is_null()) {
        ServerError e = parse_server_error(root);
        out.code = e.code;
        if (e.code == "insufficient_quota") {
          out.kind = Outcome::kFatal;
          out.message = "stream error insufficient_quota: " + e.message + " (not retried)";
          return out;
        }
        return transient("stream error: " + e.message);
      }
      take_id(root);
      have_usage = read_usage(root, r.usage) || have_usage;
      simdjson::dom::array choices;
      if (!root["choices"].get(choices) && choices.size() > 0) {
        take_choice(choices.at(0).value_unsafe(), "delta");
      }
    }
    if (!done && r.finish_reason.empty()) return transient("stream ended before completion");
  } else {
    simdjson::dom::element root;
    if (parser.parse(simdjson::padded_string(a.body)).get(root)) {
      return transient("malformed JSON reply: " + trim(a.body.substr(0, 200)));
    }
    simdjson::dom::array choices;
    if (root["choices"].get(choices) || choices.size() == 0) {
      return transient("reply has no choices: " + trim(a.body.substr(0, 200)));
    }
    take_id(root);
    take_choice(choices.at(0).value_unsafe(), "message");
    have_usage = read_usage(root, r.usage);
  }
  if (!have_usage) {
    for (const auto& m : request.messages) r.usage.prompt_tokens += estimate_tokens(m.content);
    r.usage.completion_tokens = estimate_tokens(r.content);
  }
  return out;
}

double ChatClient::Impl::backoff(const ChatClientOptions& o, int attempt) {
  double cap = std::min(o.backoff_max_s, o.backoff_initial_s * std::pow(2.0, attempt));
  std::lock_guard<std::mutex> lock(mutex);
  // "Equal jitter": half fixed so waits always grow, half random so workers spread out.
  return cap * std::uniform_real_distribution<double>(0.5, 1.0)(rng);
}

void ChatClient::Impl::record(const ChatResult* ok, int attempts) {
  std::lock_guard<std::mutex> lock(mutex);
  totals.attempts += attempts;
  totals.retries += attempts - 1;
  if (ok == nullptr) {
    ++totals.failures;
    return;
  }
  ++totals.requests;
  totals.prompt_tokens += ok->usage.prompt_tokens;
  totals.completion_tokens += ok->usage.completion_tokens;
}

ChatResult ChatClient::complete(const ChatRequest& request) {
  QG_CHECK(!request.messages.empty(), "chat request has no messages");
  const ChatClientOptions& o = options_;
  std::string body = request_body(request);
  double reserve = static_cast<double>(request.max_tokens.value_or(o.max_tokens));
  for (const auto& m : request.messages) reserve += static_cast<double>(estimate_tokens(m.content));

  std::string last_error;
  for (int attempt = 0; attempt <= o.max_retries; ++attempt) {
    if (!impl_->limiter.acquire(reserve, *impl_->cancel)) throw Cancelled();
    std::string key;
    if (!o.api_keys.empty()) key = o.api_keys[impl_->next_key++ % o.api_keys.size()];
    Attempt a = impl_->perform(o, body, key);
    Outcome out = impl_->classify(o, a, request);
    if (out.kind == Outcome::kOk) {
      out.result.attempts = attempt + 1;
      impl_->limiter.settle(
          reserve,
          static_cast<double>(out.result.usage.prompt_tokens + out.result.usage.completion_tokens));
      impl_->record(&out.result, attempt + 1);
      return out.result;
    }
    impl_->limiter.settle(reserve, 0);
    if (out.kind == Outcome::kFatal) {
      impl_->record(nullptr, attempt + 1);
      throw ApiError("chat request to " + impl_->url + " failed: " + out.message,
                     static_cast<int>(a.status), out.code, false);
    }
    last_error = out.message;
    if (attempt == o.max_retries) {
      impl_->record(nullptr, attempt + 1);
      throw ApiError("chat request to " + impl_->url + " failed after " +
                         std::to_string(attempt + 1) + " attempts: " + last_error,
                     static_cast<int>(a.status), out.code, true);
    }
    double wait = parse_retry_after(a);
    wait = wait >= 0 ? std::min(wait, o.retry_after_max_s) : impl_->backoff(o, attempt);
    if (!o.sleep(wait)) throw Cancelled();
  }
  throw Cancelled();  // unreachable: the loop returns or throws
}

UsageTotals ChatClient::usage() const {
  std::lock_guard<std::mutex> lock(impl_->mutex);
  UsageTotals t = impl_->totals;
  t.cost = static_cast<double>(t.prompt_tokens) / 1000.0 * options_.price_prompt_per_1k +
           static_cast<double>(t.completion_tokens) / 1000.0 * options_.price_completion_per_1k;
  return t;
}

}  // namespace qg::gen
