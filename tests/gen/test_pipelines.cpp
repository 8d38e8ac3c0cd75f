// Both pipelines end to end against the mock server: JSONL output, filters and dedup,
// truncated replies, resume after cancellation, and kill -9 in the middle of a run.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "catch.hpp"
#include "gen/jsonl_reader.h"
#include "gen/utf8.h"
#include "io/json.h"
#include "mock_server.h"
#include "qinggeng/gen/book_qa.h"
#include "qinggeng/gen/self_instruct.h"

using namespace qg::gen;
using namespace qg::gen::test;
namespace fs = std::filesystem;

namespace {

std::vector<std::map<std::string, std::string>> read_records(const fs::path& file) {
  std::vector<std::map<std::string, std::string>> out;
  for_each_jsonl_object(file, [&](simdjson::dom::object o, const std::string&) {
    std::map<std::string, std::string> rec;
    for (auto field : o) {
      std::string_view s;
      if (!field.value.get(s)) rec[std::string(field.key)] = std::string(s);
    }
    out.push_back(rec);
  });
  return out;
}

// Random Chinese text: pairs of such strings have low ROUGE-L, so they pass dedup.
std::string random_chinese(std::mt19937& rng, int n) {
  std::uniform_int_distribution<int> pick(0x4E00, 0x4E00 + 3000);
  std::string s;
  for (int i = 0; i < n; ++i) utf8::append(s, static_cast<char32_t>(pick(rng)));
  return s;
}

ChatClientOptions client_options(const MockServer& server) {
  ChatClientOptions o;
  o.base_url = server.base_url();
  o.model = "mock-model";
  o.max_retries = 2;
  o.timeout_s = 10;
  o.sleep = [](double) { return true; };
  return o;
}

std::vector<SeedTask> test_seeds() {
  return {{"诊断", "根据患者描述的症状判断最可能的疾病", "女，30岁，咽痛发热两天。", "可能是急性扁桃体炎，建议就医。"},
          {"饮食", "高血压患者日常饮食需要注意什么", "", "少盐少油，多吃蔬菜水果，控制体重。"},
          {"护理", "如何护理术后卧床的老年患者", "", "定时翻身，保持皮肤清洁干燥，预防压疮。"}};
}

// Replies to self-instruct prompts: `per_reply` new random tasks, plus one copy of a seed
// (rejected as similar) and one blacklisted task; every third reply is cut off ("length").
MockServer::Handler dialogue_handler(std::atomic<int>& counter, int per_reply, double delay) {
  return [&counter, per_reply, delay](const MockRequest&) {
    int n = counter++;
    std::mt19937 rng(static_cast<unsigned>(n) * 7919u + 1);
    std::string text = "好的，以下是新的任务：\n";
    int index = 4;
    text += std::to_string(index++) + ". 类别：饮食\n指令：高血压患者日常饮食需要注意什么\n输入：<无输入>\n输出：少盐少油，多吃蔬菜。\n###\n";
    text += std::to_string(index++) + ". 指令：请描述这张图片里的皮疹\n输入：无\n输出：图片显示红色斑丘疹。\n###\n";
    for (int i = 0; i < per_reply; ++i) {
      text += std::to_string(index++) + ". 类别：诊断\n指令：" + random_chinese(rng, 16) + "\n输入：" +
              random_chinese(rng, 10) + "\n输出：" + random_chinese(rng, 30) + "\n###\n";
    }
    bool cut = n % 3 == 2;
    if (cut) text += std::to_string(index) + ". 指令：" + random_chinese(rng, 16) + "\n输出：半截";
    MockReply r = reply(200, completion_json(text, cut ? "length" : "stop", 300, 200));
    r.delay_s = delay;
    return r;
  };
}

SelfInstructOptions dialogue_options(const fs::path& output, std::size_t target) {
  SelfInstructOptions o;
  o.output = output;
  o.target = target;
  o.workers = 2;
  o.examples_per_prompt = 3;
  o.tasks_per_request = 4;
  o.similarity_report_floor = 0.0;  // exact "most_similar" metadata
  return o;
}

void check_dialogue_output(const fs::path& output, std::size_t target) {
  auto recs = read_records(output);
  REQUIRE(recs.size() == target);
  std::set<std::string> instructions;
  for (const auto& r : recs) {
    CHECK(instructions.insert(r.at("instruction")).second);
    CHECK(r.at("output") != "半截");
    CHECK(r.at("instruction").find("图片") == std::string::npos);
    CHECK(r.at("model") == "mock-model");
    CHECK(r.at("request_id") == "chatcmpl-test");
    CHECK(r.count("input"));
    CHECK(r.count("category"));
  }
}

}  // namespace

TEST_CASE("self-instruct end to end: filters, dedup, truncation, target, resume", "[gen][e2e]") {
  fs::path dir = scratch_dir("dialogue");
  fs::path output = dir / "dialogue.jsonl";
  std::atomic<int> counter{0};
  MockServer server(dialogue_handler(counter, 3, 0));
  ChatClient client(client_options(server));
  Cancellation cancel;

  // One worker: with several, which category's reply lands first decides the mix of the
  // first records, so exact balance is only deterministic sequentially.
  auto options = dialogue_options(output, 10);
  options.workers = 1;
  SelfInstructGenerator gen(client, test_seeds(), options);
  CHECK(gen.run(cancel) == 10);
  check_dialogue_output(output, 10);
  CHECK(gen.stats().rejected >= 2);

  auto recs = read_records(output);
  // Categories are balanced over the seed categories; metadata names the closest item.
  std::map<std::string, int> per_category;
  for (const auto& r : recs) ++per_category[r.at("category")];
  CHECK(per_category.size() == 3);
  bool any_similar = false;
  for (const auto& r : recs) any_similar = any_similar || !r.at("most_similar").empty();
  CHECK(any_similar);

  // The prompts carried k examples, numbered, ending with the continuation cue.
  auto reqs = server.requests();
  REQUIRE(!reqs.empty());
  CHECK(reqs[0].body.find("指令：") != std::string::npos);
  CHECK(reqs[0].body.find("从编号4开始") != std::string::npos);

  // Resume: a rerun with a higher target continues from the 10 records.
  std::size_t before = server.request_count();
  SelfInstructGenerator more(client, test_seeds(), dialogue_options(output, 16));
  CHECK(more.run(cancel) == 16);
  CHECK(more.stats().resumed == 10);
  check_dialogue_output(output, 16);
  // A rerun at the target asks nothing.
  SelfInstructGenerator done(client, test_seeds(), dialogue_options(output, 16));
  std::size_t asked = server.request_count();
  CHECK(done.run(cancel) == 16);
  CHECK(server.request_count() == asked);
  CHECK(asked > before);
}

TEST_CASE("self-instruct: a fatal API error stops the run and keeps finished work", "[gen][e2e]") {
  fs::path output = scratch_dir("dialogue_fatal") / "out.jsonl";
  std::atomic<int> counter{0};
  auto inner = dialogue_handler(counter, 3, 0);
  MockServer server([&](const MockRequest& r) {
    if (counter >= 2) return reply(401, error_json("Incorrect API key provided", "invalid_api_key"));
    return inner(r);
  });
  ChatClient client(client_options(server));
  Cancellation cancel;
  auto o = dialogue_options(output, 100);
  o.workers = 1;
  SelfInstructGenerator gen(client, test_seeds(), o);
  REQUIRE_THROWS_WITH(gen.run(cancel), QG_CONTAINS("HTTP 401") &&
                                           QG_CONTAINS("Incorrect API key"));
  CHECK(read_records(output).size() == static_cast<std::size_t>(gen.stats().done));
  CHECK(gen.stats().done > 0);
}

TEST_CASE("self-instruct: kill -9 mid-run, then resume gives exactly the target", "[gen][e2e]") {
  fs::path output = scratch_dir("dialogue_kill") / "out.jsonl";
  std::atomic<int> counter{0};
  MockServer server(dialogue_handler(counter, 3, 0.03));
  const std::size_t target = 40;

  pid_t child = ::fork();
  REQUIRE(child >= 0);
  if (child == 0) {
    try {
      ChatClient client(client_options(server));
      Cancellation cancel;
      SelfInstructGenerator gen(client, test_seeds(), dialogue_options(output, target));
      gen.run(cancel);
    } catch (...) {
    }
    ::_exit(0);
  }
  // Kill once some, but not all, records are written (bounded wait).
  auto lines = [&] {
    std::ifstream in(output);
    return std::count(std::istreambuf_iterator<char>(in), {}, '\n');
  };
  for (int i = 0; i < 500 && lines() < 8; ++i) std::this_thread::sleep_for(std::chrono::milliseconds(10));
  ::kill(child, SIGKILL);
  int status = 0;
  ::waitpid(child, &status, 0);
  auto written = lines();
  CHECK(written >= 8);
  CHECK(written < static_cast<long>(target));
  // Simulate the torn write a kill can leave behind.
  std::ofstream(output, std::ios::app) << R"({"instruction":"被截断的)";

  ChatClient client(client_options(server));
  Cancellation cancel;
  SelfInstructGenerator gen(client, test_seeds(), dialogue_options(output, target));
  CHECK(gen.run(cancel) == target);
  CHECK(gen.stats().resumed == written);
  check_dialogue_output(output, target);
}

namespace {

// Book QA replies: questions (three per passage, one a near-duplicate, one unanswerable),
// grounded answers that echo the question, and support verdicts ("否" for one question).
MockServer::Handler book_handler(std::atomic<int>& question_requests) {
  return [&question_requests](const MockRequest& req) {
    std::string body = req.body;
    if (body.find("提出") != std::string::npos) {
      ++question_requests;
      // The passage text is unique per passage: derive questions from its hash.
      std::mt19937 rng(static_cast<unsigned>(std::hash<std::string>()(body)));
      std::string base = random_chinese(rng, 12);
      std::string text = "以下是问题：\n1. " + base + "是什么？\n2. " + base + "是什么呢？\n3、" +
                         random_chinese(rng, 12) + "的剂量是120/80mmHg吗？\n4. 无关" +
                         random_chinese(rng, 10) + "？\n5. 否定" + random_chinese(rng, 10) + "？";
      return reply(200, completion_json(text));
    }
    if (body.find("是否完全得到参考资料的支持") != std::string::npos) {
      return reply(200, completion_json(body.find("否定") != std::string::npos ? "否" : "是"));
    }
    if (body.find("问题：无关") != std::string::npos) return reply(200, completion_json("资料未提及"));
    return reply(200, completion_json("根据资料，答案是：甲乙丙。"));
  };
}

std::vector<Passage> test_passages(int n) {
  std::vector<Passage> out;
  for (int i = 0; i < n; ++i) {
    out.push_back({"book#" + std::to_string(i), "第" + std::to_string(i) + "段：高血压的诊断标准是收缩压不低于140mmHg。"});
  }
  return out;
}

BookQaOptions book_options(const fs::path& output) {
  BookQaOptions o;
  o.output = output;
  o.workers = 2;
  o.questions_per_passage = 5;
  o.support_check = true;
  return o;
}

}  // namespace

TEST_CASE("book QA end to end: grounded answers, dedup, support check, resume", "[gen][e2e]") {
  fs::path output = scratch_dir("bookqa") / "qa.jsonl";
  std::atomic<int> question_requests{0};
  MockServer server(book_handler(question_requests));
  ChatClient client(client_options(server));

  // First run stops at a target part-way through.
  {
    Cancellation cancel;
    auto o = book_options(output);
    o.target = 5;
    BookQaGenerator gen(client, test_passages(6), o);
    CHECK(gen.run(cancel) == 5);
  }
  int asked_first = question_requests;
  // Resume with no target: every passage completes, nothing is asked twice.
  Cancellation cancel;
  BookQaGenerator gen(client, test_passages(6), book_options(output));
  CHECK(gen.run(cancel) == 12);  // 6 passages x 2 kept questions
  CHECK(gen.stats().resumed == 5);
  CHECK(question_requests == 6);
  CHECK(asked_first <= 6);

  auto recs = read_records(output);
  REQUIRE(recs.size() == 12);
  std::set<std::pair<std::string, std::string>> seen;
  for (const auto& r : recs) {
    CHECK(seen.insert({r.at("passage_id"), r.at("question")}).second);
    CHECK(r.at("answer") == "根据资料，答案是：甲乙丙。");
    CHECK(r.at("model") == "mock-model");
    CHECK(r.at("passage").find("高血压的诊断标准") != std::string::npos);
    CHECK(r.at("question").find("无关") == std::string::npos);
    CHECK(r.at("question").find("否定") == std::string::npos);
  }
  // Digits inside the question survive numbering removal.
  bool has_value = false;
  for (const auto& r : recs) has_value = has_value || r.at("question").find("120/80mmHg") != std::string::npos;
  CHECK(has_value);

  // Every answer prompt carried the passage as grounding.
  for (const auto& req : server.requests()) {
    if (req.body.find("请仅依据") != std::string::npos) {
      CHECK(req.body.find("高血压的诊断标准") != std::string::npos);
    }
  }
  // A third run finds everything done and sends no request.
  std::size_t before = server.request_count();
  BookQaGenerator again(client, test_passages(6), book_options(output));
  CHECK(again.run(cancel) == 12);
  CHECK(server.request_count() == before);
  CHECK(fs::exists(BookQaGenerator::state_path(output)));
}

TEST_CASE("book QA: global dedup across passages", "[gen][e2e]") {
  fs::path output = scratch_dir("bookqa_global") / "qa.jsonl";
  MockServer server([](const MockRequest& req) {
    if (req.body.find("提出") != std::string::npos) {
      return reply(200, completion_json("1. 高血压的诊断标准是什么？\n2. 高血压如何分级？"));
    }
    return reply(200, completion_json("答案。"));
  });
  ChatClient client(client_options(server));
  Cancellation cancel;
  auto o = book_options(output);
  o.support_check = false;
  o.workers = 1;
  BookQaGenerator gen(client, test_passages(3), o);
  CHECK(gen.run(cancel) == 2);  // the same two questions from passages 2 and 3 are duplicates
  CHECK(gen.stats().rejected == 4);
}
