// Book QA generation: question parsing, dedup, grounded answers, support checks, resume state
// (see book_qa.h).
#include "qinggeng/gen/book_qa.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <set>

#include "gen/error_budget.h"
#include "gen/jsonl_reader.h"
#include "gen/utf8.h"
#include "io/json.h"
#include "qinggeng/error.h"
#include "qinggeng/gen/jsonl.h"
#include "qinggeng/gen/prompt_template.h"
#include "qinggeng/gen/rouge.h"
#include "qinggeng/gen/text_cleanup.h"
#include "qinggeng/gen/worker_pool.h"

namespace qg::gen {

namespace {

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

// Strips quotes a model sometimes puts around a whole question.
std::string unquote(std::string s) {
  for (auto [open, close] : {std::pair{"“", "”"}, std::pair{"\"", "\""}, std::pair{"「", "」"}}) {
    std::string_view o(open), c(close);
    if (s.size() > o.size() + c.size() && s.compare(0, o.size(), o) == 0 && ends_with(s, c)) {
      return s.substr(o.size(), s.size() - o.size() - c.size());
    }
  }
  return s;
}

std::string json_array(const std::vector<std::string>& items) {
  std::string out = "[";
  for (const auto& s : items) out += (out.size() > 1 ? "," : "") + json::quote(s);
  return out + "]";
}

}  // namespace

std::vector<std::string> parse_questions(std::string_view reply) {
  std::vector<std::string> out;
  std::string text = normalize_whitespace(reply);
  std::size_t start = 0;
  while (start < text.size()) {
    std::size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string q = unquote(strip_list_marker(std::string_view(text).substr(start, end - start)));
    start = end + 1;
    if (q.empty() || !utf8::has_cjk(q) || utf8::length(q) < 4) continue;
    if (ends_with(q, "：") || ends_with(q, ":")) continue;  // "以下是问题："
    if (std::find(out.begin(), out.end(), q) == out.end()) out.push_back(std::move(q));
  }
  return out;
}

bool parse_support_verdict(std::string_view reply) {
  std::string s = strip_list_marker(normalize_whitespace(reply));
  if (s.compare(0, 3, "是") == 0) return true;
  std::string head = s.substr(0, 3);
  for (auto& c : head) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return head == "yes";
}

// ---- generator -------------------------------------------------------------------------------

struct BookQaGenerator::State {
  std::vector<Passage> passages;
  std::unique_ptr<PromptTemplate> question_prompt, answer_prompt, support_prompt;
  // Resume state, keyed by passage id.
  std::map<std::string, std::vector<std::string>> questions;
  std::map<std::string, std::set<std::string>> finished;  // written or dropped
  RougeIndex global;
  std::size_t next = 0;
  std::mutex mutex;
};

std::filesystem::path BookQaGenerator::state_path(const std::filesystem::path& output) {
  return std::filesystem::path(output.string() + ".state.jsonl");
}

BookQaGenerator::BookQaGenerator(ChatClient& client, std::vector<Passage> passages,
                                 BookQaOptions options)
    : client_(client), options_(std::move(options)), state_(std::make_unique<State>()) {
  const auto& o = options_;
  QG_CHECK(!passages.empty(), "book QA: no passages");
  QG_CHECK(!o.output.empty(), "book QA: no output file given");
  QG_CHECK(o.questions_per_passage >= 1, "book QA: questions per passage must be >= 1");
  State& s = *state_;
  s.passages = std::move(passages);
  auto make = [&](const TemplateSource& source, std::string_view fallback,
                  std::vector<std::string> allowed, std::vector<std::string> required) {
    bool custom = !source.text.empty();
    return std::make_unique<PromptTemplate>(
        custom ? source.text : std::string(fallback),
        custom ? source.origin : std::string("built-in book QA template"), allowed, required);
  };
  s.question_prompt = make(o.question_prompt, default_question_template(),
                           {"passage", "count"}, {"passage"});
  s.answer_prompt = make(o.answer_prompt, default_answer_template(), {"passage", "question"},
                         {"passage", "question"});
  s.support_prompt = make(o.support_prompt, default_support_template(),
                          {"passage", "question", "answer"}, {"passage", "answer"});
}

BookQaGenerator::~BookQaGenerator() = default;

std::size_t BookQaGenerator::run(Cancellation& cancel) {
  State& s = *state_;
  const auto& o = options_;
  JsonlWriter output(o.output);
  JsonlWriter journal(state_path(o.output));
  std::size_t existing = 0;
  for_each_jsonl_object(journal.path(), [&](simdjson::dom::object obj, const std::string& origin) {
    std::string id = json::get_string(obj, "passage_id", origin);
    simdjson::dom::array list;
    if (!obj["questions"].get(list)) {
      auto& qs = s.questions[id];
      for (simdjson::dom::element e : list) {
        std::string_view q;
        QG_CHECK(!e.get(q), origin, ": field \"questions\" must hold strings");
        qs.emplace_back(q);
        s.global.add(q);
      }
    } else {
      s.finished[id].insert(json::get_string(obj, "question", origin));
    }
  });
  for_each_jsonl_object(o.output, [&](simdjson::dom::object obj, const std::string& origin) {
    s.finished[json::get_string(obj, "passage_id", origin)].insert(
        json::get_string(obj, "question", origin));
    ++existing;
  });
  stats_.target = static_cast<std::int64_t>(o.target);
  stats_.done = stats_.resumed = static_cast<std::int64_t>(existing);
  auto target_reached = [&] {
    return o.target > 0 && static_cast<std::size_t>(stats_.done) >= o.target;
  };
  if (target_reached()) return existing;

  ErrorBudget budget(stats_, o.max_consecutive_errors);
  auto ask = [&](const std::string& prompt) {
    ChatRequest r;
    r.messages = {{"user", prompt}};
    return budget.complete(client_, r);
  };
  auto drop = [&](const Passage& p, const std::string& q, const char* why) {
    ++stats_.rejected;
    std::lock_guard<std::mutex> lock(s.mutex);
    journal.append(JsonObject().add_string("passage_id", p.id).add_string("question", q)
                       .add_string("dropped", why).str());
    s.finished[p.id].insert(q);
  };

  // Asks for a passage's questions and keeps those that are new; false if the request failed.
  auto new_questions = [&](const Passage& p, std::vector<std::string>& kept) {
    auto reply = ask(s.question_prompt->render(
        {{"passage", p.text}, {"count", std::to_string(o.questions_per_passage)}}));
    if (!reply) return false;
    RougeIndex local;
    std::vector<std::string> candidates;
    for (auto& q : parse_questions(reply->content)) {
      if (local.best_match(q, o.passage_threshold).score >= o.passage_threshold) {
        ++stats_.rejected;
        continue;
      }
      local.add(q);
      candidates.push_back(std::move(q));
    }
    std::lock_guard<std::mutex> lock(s.mutex);
    for (auto& q : candidates) {
      if (s.global.best_match(q, o.global_threshold).score >= o.global_threshold) {
        ++stats_.rejected;
        continue;
      }
      s.global.add(q);
      kept.push_back(std::move(q));
    }
    // Recorded even when empty, so a rerun does not ask this passage again.
    journal.append(
        JsonObject().add_string("passage_id", p.id).add_raw("questions", json_array(kept)).str());
    s.questions[p.id] = kept;
    return true;
  };

  auto worker = [&](int) {
    while (!cancel.requested()) {
      const Passage* p = nullptr;
      std::vector<std::string> questions;
      bool known = false;
      {
        std::lock_guard<std::mutex> lock(s.mutex);
        if (target_reached() || s.next >= s.passages.size()) return;
        p = &s.passages[s.next++];
        auto it = s.questions.find(p->id);
        if ((known = it != s.questions.end())) questions = it->second;
      }
      if (!known && !new_questions(*p, questions)) continue;
      for (const auto& q : questions) {
        {
          std::lock_guard<std::mutex> lock(s.mutex);
          if (s.finished[p->id].count(q)) continue;
        }
        if (cancel.requested() || target_reached()) return;
        auto answer = ask(s.answer_prompt->render({{"passage", p->text}, {"question", q}}));
        if (!answer) continue;
        std::string a = normalize_whitespace(answer->content);
        if (a.empty() || a.find(o.unanswerable_marker) != std::string::npos) {
          drop(*p, q, "unanswerable");
          continue;
        }
        if (answer->finish_reason == "length") {
          drop(*p, q, "truncated");
          continue;
        }
        if (o.support_check) {
          auto verdict = ask(s.support_prompt->render(
              {{"passage", p->text}, {"question", q}, {"answer", a}}));
          if (!verdict) continue;
          if (!parse_support_verdict(verdict->content)) {
            drop(*p, q, "unsupported");
            continue;
          }
        }
        std::lock_guard<std::mutex> lock(s.mutex);
        if (target_reached() || cancel.requested()) return;
        output.append(JsonObject()
                          .add_string("passage_id", p->id)
                          .add_string("passage", p->text)
                          .add_string("question", q)
                          .add_string("answer", a)
                          .add_string("model", client_.options().model)
                          .str());
        s.finished[p->id].insert(q);
        ++stats_.done;
      }
    }
  };
  run_workers(o.workers, worker, cancel);
  return static_cast<std::size_t>(stats_.done);
}

}  // namespace qg::gen
