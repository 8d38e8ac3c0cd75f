// Self-instruct generation: seed loading, reply parsing, filters and the worker loop (see
// self_instruct.h).
#include "qinggeng/gen/self_instruct.h"

#include <algorithm>
#include <map>
#include <mutex>
#include <random>

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

enum Field { kCategory, kInstruction, kInput, kOutput, kFieldCount };

// Recognises "指令：..." (after list markers and bold) and returns the field, with `rest` set to
// the text after the colon; kFieldCount when the line starts no field.
Field field_of(std::string_view line, std::string& rest) {
  static const std::vector<std::pair<std::string, Field>> keys = {
      {"类别", kCategory},    {"类型", kCategory},      {"指令", kInstruction},
      {"输入", kInput},       {"输出", kOutput},        {"instruction", kInstruction},
      {"Instruction", kInstruction}, {"input", kInput}, {"Input", kInput},
      {"output", kOutput},    {"Output", kOutput}};
  std::string s = strip_list_marker(line);
  for (const auto& [key, field] : keys) {
    if (s.compare(0, key.size(), key) != 0) continue;
    std::string_view tail = std::string_view(s).substr(key.size());
    while (!tail.empty() && (tail.front() == '*' || tail.front() == ' ')) tail.remove_prefix(1);
    for (std::string_view colon : {":", "："}) {
      if (tail.substr(0, colon.size()) == colon) {
        tail.remove_prefix(colon.size());
        while (!tail.empty() && (tail.front() == '*' || tail.front() == ' ')) tail.remove_prefix(1);
        rest = std::string(tail);
        return field;
      }
    }
  }
  return kFieldCount;
}

// A line that separates blocks: "###", "---", or a bare number/marker with nothing after it.
bool is_separator_line(std::string_view line) {
  std::string s = normalize_whitespace(line);
  if (s.empty()) return false;
  if (s.find_first_not_of("#-*=_ ") == std::string::npos) return true;
  return strip_list_marker(s).empty();
}

bool means_no_input(const std::string& s) {
  static const std::vector<std::string> empty = {"无", "无。", "<无输入>", "＜无输入＞", "无输入",
                                                 "（无）", "(无)", "空", "<noinput>", "none",
                                                 "None", "N/A", "不需要输入", "<无>"};
  return std::find(empty.begin(), empty.end(), s) != empty.end();
}

std::string lower_ascii(std::string s) {
  for (auto& c : s) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
  }
  return s;
}

std::string pool_key(const SeedTask& t) {
  return t.input.empty() ? t.instruction : t.instruction + "\n" + t.input;
}

}  // namespace

std::vector<SeedTask> load_seed_tasks(const std::filesystem::path& file) {
  std::vector<SeedTask> seeds;
  for_each_jsonl_object(file, [&](simdjson::dom::object o, const std::string& origin) {
    SeedTask t;
    t.category = json::get_string(o, "category", origin);
    t.instruction = json::get_string(o, "instruction", origin);
    t.input = json::optional_string(o, "input", origin).value_or("");
    t.output = json::get_string(o, "output", origin);
    QG_CHECK(!normalize_whitespace(t.instruction).empty(), origin,
             ": field \"instruction\" is empty");
    QG_CHECK(!normalize_whitespace(t.output).empty(), origin, ": field \"output\" is empty");
    QG_CHECK(!t.category.empty(), origin, ": field \"category\" is empty");
    for (const std::string* s : {&t.category, &t.instruction, &t.input, &t.output}) {
      QG_CHECK(utf8::first_invalid(*s) == std::string::npos, origin, ": text is not valid UTF-8");
    }
    seeds.push_back(std::move(t));
  });
  QG_CHECK(!seeds.empty(), file.string(), ": no seed tasks in file");
  return seeds;
}

std::vector<SeedTask> parse_task_blocks(std::string_view reply, bool truncated) {
  struct Block {
    std::string text[kFieldCount];
    bool has[kFieldCount] = {false, false, false, false};
    int current = -1;
  };
  std::vector<Block> blocks(1);
  std::size_t start = 0;
  while (start <= reply.size()) {
    std::size_t end = reply.find('\n', start);
    if (end == std::string_view::npos) end = reply.size();
    std::string_view line = reply.substr(start, end - start);
    start = end + 1;
    std::string rest;
    Field f = field_of(line, rest);
    Block* b = &blocks.back();
    if (f != kFieldCount) {
      bool starts_new = b->has[f] || ((f == kCategory || f == kInstruction) && b->has[kInstruction]) ||
                        (f == kCategory && b->has[kOutput]);
      if (starts_new) {
        blocks.emplace_back();
        b = &blocks.back();
      }
      b->has[f] = true;
      b->text[f] = rest;
      b->current = f;
    } else if (is_separator_line(line)) {
      b->current = -1;
    } else if (b->current >= 0) {
      b->text[b->current] += "\n";
      b->text[b->current] += line;
    }
  }
  blocks.erase(std::remove_if(blocks.begin(), blocks.end(),
                              [](const Block& b) {
                                return !b.has[kCategory] && !b.has[kInstruction] &&
                                       !b.has[kInput] && !b.has[kOutput];
                              }),
               blocks.end());
  if (truncated && !blocks.empty()) blocks.pop_back();

  std::vector<SeedTask> tasks;
  for (const auto& b : blocks) {
    SeedTask t;
    t.category = normalize_whitespace(b.text[kCategory]);
    t.instruction = normalize_whitespace(b.text[kInstruction]);
    t.input = normalize_whitespace(b.text[kInput]);
    t.output = normalize_whitespace(b.text[kOutput]);
    if (means_no_input(t.input)) t.input.clear();
    if (t.instruction.empty() || t.output.empty()) continue;
    tasks.push_back(std::move(t));
  }
  return tasks;
}

std::string check_task(const SeedTask& t, const TaskFilter& f) {
  std::size_t ni = utf8::length(t.instruction), no = utf8::length(t.output);
  if (ni < f.min_instruction_chars) return "instruction too short";
  if (ni > f.max_instruction_chars) return "instruction too long";
  if (utf8::length(t.input) > f.max_input_chars) return "input too long";
  if (no < f.min_output_chars) return "output too short";
  if (no > f.max_output_chars) return "output too long";
  if (!utf8::has_cjk(t.instruction) || !utf8::has_cjk(t.output)) return "not Chinese";
  std::string all = lower_ascii(t.instruction + "\n" + t.input + "\n" + t.output);
  for (const auto& word : f.blacklist) {
    if (!word.empty() && all.find(lower_ascii(word)) != std::string::npos) {
      return "blacklisted: " + word;
    }
  }
  return {};
}

// ---- generator -------------------------------------------------------------------------------

struct SelfInstructGenerator::State {
  std::vector<SeedTask> seeds;
  std::vector<SeedTask> generated;
  RougeIndex pool;
  std::map<std::string, std::size_t> per_category;
  std::map<std::string, std::size_t> in_flight;  // requests under way per category
  std::unique_ptr<PromptTemplate> prompt;
  std::mt19937_64 rng;
  std::mutex mutex;
};

SelfInstructGenerator::SelfInstructGenerator(ChatClient& client, std::vector<SeedTask> seeds,
                                             SelfInstructOptions options)
    : client_(client), options_(std::move(options)), state_(std::make_unique<State>()) {
  const auto& o = options_;
  QG_CHECK(!seeds.empty(), "self-instruct: no seed tasks");
  QG_CHECK(!o.output.empty(), "self-instruct: no output file given");
  QG_CHECK(o.examples_per_prompt >= 1, "self-instruct: examples per prompt must be >= 1");
  QG_CHECK(o.tasks_per_request >= 1, "self-instruct: tasks per request must be >= 1");
  QG_CHECK(o.machine_ratio >= 0 && o.machine_ratio <= 1,
           "self-instruct: machine ratio must be in [0, 1] (got ", o.machine_ratio, ")");
  QG_CHECK(o.similarity_threshold > 0 && o.similarity_threshold <= 1,
           "self-instruct: similarity threshold must be in (0, 1]");
  State& s = *state_;
  s.seeds = std::move(seeds);
  s.rng.seed(o.random_seed);
  bool custom = !o.prompt.text.empty();
  s.prompt = std::make_unique<PromptTemplate>(
      custom ? o.prompt.text : std::string(default_self_instruct_template()),
      custom ? o.prompt.origin : std::string("built-in self-instruct template"),
                                              std::vector<std::string>{"category", "examples",
                                                                       "count", "first"},
                                              std::vector<std::string>{"examples"});
  if (options_.categories.empty()) {
    for (const auto& t : s.seeds) {
      auto& c = options_.categories;
      if (std::find(c.begin(), c.end(), t.category) == c.end()) c.push_back(t.category);
    }
  }
  for (const auto& c : options_.categories) s.per_category[c] = 0;
  for (const auto& t : s.seeds) s.pool.add(pool_key(t));
}

SelfInstructGenerator::~SelfInstructGenerator() = default;

std::string SelfInstructGenerator::build_prompt(const std::vector<SeedTask>& examples,
                                                const std::string& category) const {
  std::string text;
  for (std::size_t i = 0; i < examples.size(); ++i) {
    const SeedTask& t = examples[i];
    if (i > 0) text += "###\n";
    text += std::to_string(i + 1) + ". 类别：" + t.category + "\n指令：" + t.instruction +
            "\n输入：" + (t.input.empty() ? "<无输入>" : t.input) + "\n输出：" + t.output + "\n";
  }
  if (!text.empty() && text.back() == '\n') text.pop_back();
  return state_->prompt->render({{"category", category},
                                 {"examples", text},
                                 {"count", std::to_string(options_.tasks_per_request)},
                                 {"first", std::to_string(examples.size() + 1)}});
}

std::size_t SelfInstructGenerator::run(Cancellation& cancel) {
  State& s = *state_;
  const auto& o = options_;
  JsonlWriter writer(o.output);
  // Resume: every record already written counts and joins the pool.
  std::size_t existing = 0;
  if (std::filesystem::exists(o.output)) {
    for_each_jsonl_object(o.output, [&](simdjson::dom::object obj, const std::string& origin) {
      SeedTask t;
      t.instruction = json::get_string(obj, "instruction", origin);
      t.input = json::optional_string(obj, "input", origin).value_or("");
      t.output = json::get_string(obj, "output", origin);
      t.category = json::optional_string(obj, "category", origin).value_or("");
      s.pool.add(pool_key(t));
      ++s.per_category[t.category];
      s.generated.push_back(std::move(t));
      ++existing;
    });
  }
  stats_.target = static_cast<std::int64_t>(o.target);
  stats_.done = static_cast<std::int64_t>(existing);
  stats_.resumed = static_cast<std::int64_t>(existing);
  if (existing >= o.target) return existing;

  ErrorBudget budget(stats_, o.max_consecutive_errors);
  auto worker = [&](int) {
    while (!cancel.requested()) {
      std::string category;
      std::vector<SeedTask> examples;
      {
        std::lock_guard<std::mutex> lock(s.mutex);
        if (static_cast<std::size_t>(stats_.done) >= o.target) return;
        // The least-filled category keeps the dataset balanced; requests in flight count as
        // the tasks they will probably add, so concurrent workers pick different categories.
        std::size_t fewest = SIZE_MAX;
        for (const auto& c : o.categories) {
          std::size_t expected = s.per_category[c] + s.in_flight[c] * static_cast<std::size_t>(o.tasks_per_request);
          if (expected < fewest) {
            fewest = expected;
            category = c;
          }
        }
        ++s.in_flight[category];
        auto k = static_cast<std::size_t>(o.examples_per_prompt);
        std::size_t machine = std::min(
            s.generated.size(), static_cast<std::size_t>(o.machine_ratio * static_cast<double>(k)));
        std::size_t human = std::min(s.seeds.size(), k - machine);
        std::sample(s.seeds.begin(), s.seeds.end(), std::back_inserter(examples), human, s.rng);
        std::sample(s.generated.begin(), s.generated.end(), std::back_inserter(examples), machine,
                    s.rng);
        std::shuffle(examples.begin(), examples.end(), s.rng);
      }
      // The request stays counted as in flight until its tasks are in per_category, so no
      // other worker sees its category as empty in between.
      struct InFlight {
        State& s;
        const std::string& category;
        ~InFlight() {
          std::lock_guard<std::mutex> lock(s.mutex);
          --s.in_flight[category];
        }
      } in_flight{s, category};
      ChatRequest request;
      request.messages = {{"user", build_prompt(examples, category)}};
      std::optional<ChatResult> got = budget.complete(client_, request);
      if (!got) continue;
      const ChatResult& reply = *got;
      for (SeedTask& t : parse_task_blocks(reply.content, reply.finish_reason == "length")) {
        t.category = category;
        if (!check_task(t, o.filter).empty()) {
          ++stats_.rejected;
          continue;
        }
        std::string key = pool_key(t);
        std::lock_guard<std::mutex> lock(s.mutex);
        if (static_cast<std::size_t>(stats_.done) >= o.target || cancel.requested()) return;
        RougeMatch best =
            s.pool.best_match(key, std::min(o.similarity_report_floor, o.similarity_threshold));
        if (best.score >= o.similarity_threshold) {
          ++stats_.rejected;
          continue;
        }
        JsonObject record;
        record.add_string("instruction", t.instruction)
            .add_string("input", t.input)
            .add_string("output", t.output)
            .add_string("category", t.category)
            .add_string("most_similar", best.index >= 0 ? s.pool.text(best.index) : "")
            .add_number("similarity", best.score)
            .add_string("request_id", reply.id)
            .add_string("model", client_.options().model);
        writer.append(record.str());
        s.pool.add(key);
        ++s.per_category[t.category];
        s.generated.push_back(std::move(t));
        ++stats_.done;
      }
    }
  };
  run_workers(o.workers, worker, cancel);
  return static_cast<std::size_t>(stats_.done);
}

}  // namespace qg::gen
