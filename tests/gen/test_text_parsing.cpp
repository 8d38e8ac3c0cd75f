// Parsers of model replies: numbered task blocks (messy formatting, truncation), question lines
// (numbering stripped, digits in the text kept), whitespace normalisation, support verdicts,
// filters, seed loading and prompt templates.
#include <fstream>
#include <set>

#include "catch.hpp"
#include "qinggeng/gen/book_qa.h"
#include "qinggeng/gen/prompt_template.h"
#include "qinggeng/gen/self_instruct.h"
#include "qinggeng/gen/text_cleanup.h"

using namespace qg::gen;

TEST_CASE("strip_list_marker removes numbering but keeps digits of the text", "[gen][parse]") {
  CHECK(strip_list_marker("1. 什么是高血压？") == "什么是高血压？");
  CHECK(strip_list_marker("2、糖尿病有哪些并发症？") == "糖尿病有哪些并发症？");
  CHECK(strip_list_marker("（3）孕妇每天需要补充多少叶酸？") == "孕妇每天需要补充多少叶酸？");
  CHECK(strip_list_marker("(4) 如何预防流感？") == "如何预防流感？");
  CHECK(strip_list_marker("Q5: 儿童发热怎么处理？") == "儿童发热怎么处理？");
  CHECK(strip_list_marker("问题6：哮喘如何控制？") == "哮喘如何控制？");
  CHECK(strip_list_marker("第7题：骨折后多久能负重？") == "骨折后多久能负重？");
  CHECK(strip_list_marker("十、中医如何看待失眠？") == "中医如何看待失眠？");
  CHECK(strip_list_marker("- **8.** 什么是贫血？") == "什么是贫血？");
  CHECK(strip_list_marker("10.维生素D有什么作用？") == "维生素D有什么作用？");
  // Digits that belong to the question.
  CHECK(strip_list_marker("血压120/80mmHg正常吗？") == "血压120/80mmHg正常吗？");
  CHECK(strip_list_marker("120/80mmHg算高血压吗？") == "120/80mmHg算高血压吗？");
  CHECK(strip_list_marker("1.5岁的孩子发烧怎么办？") == "1.5岁的孩子发烧怎么办？");
  CHECK(strip_list_marker("3. 1.5岁的孩子发烧怎么办？") == "1.5岁的孩子发烧怎么办？");
  CHECK(strip_list_marker("2023年新版指南有哪些变化？") == "2023年新版指南有哪些变化？");
  CHECK(strip_list_marker("3:1的比例是什么意思？") == "3:1的比例是什么意思？");
  CHECK(strip_list_marker("5毫克的剂量安全吗？") == "5毫克的剂量安全吗？");
  CHECK(strip_list_marker("十二指肠溃疡怎么治？") == "十二指肠溃疡怎么治？");
  CHECK(strip_list_marker("问诊时要注意什么？") == "问诊时要注意什么？");
  CHECK(strip_list_marker("QT间期延长有什么危险？") == "QT间期延长有什么危险？");
}

TEST_CASE("parse_questions: one per line, headers and non-questions skipped", "[gen][parse]") {
  auto qs = parse_questions(
      "以下是根据段落提出的问题：\n\n1. 成人正常血压的范围是多少？\n2、血压140/90mmHg意味着什么？\n"
      "（3）“高血压患者每天食盐应控制在多少克以内？”\n   \n4. 1.5岁的孩子能吃降压药吗？\n"
      "Note: these are questions\n2、血压140/90mmHg意味着什么？\n");
  REQUIRE(qs.size() == 4);
  CHECK(qs[0] == "成人正常血压的范围是多少？");
  CHECK(qs[1] == "血压140/90mmHg意味着什么？");
  CHECK(qs[2] == "高血压患者每天食盐应控制在多少克以内？");
  CHECK(qs[3] == "1.5岁的孩子能吃降压药吗？");
}

TEST_CASE("parse_task_blocks: all blocks of a messy reply", "[gen][parse]") {
  std::string reply =
      "好的，以下是新的任务：\n"
      "7. 类别：诊断\n指令：根据症状判断可能的疾病。\n输入：男，45岁，胸口压榨样疼痛20分钟。\n"
      "输出：可能是急性冠脉综合征，\n   需要立即拨打120。\n###\n"
      "8.\n**指令**: 解释血常规中白细胞升高的意义\n**输入**：<无输入>\n**输出**：白细胞升高常见于细菌感染。\n"
      "1. 保持休息\n2. 多喝水\n\n"
      "###\n9. 类别：饮食\n指令：痛风患者能喝啤酒吗？\n输入：无\n输出：不建议，啤酒嘌呤含量高。\n"
      "10. 类别：护理\n指令：如何护理卧床老人\n";
  auto tasks = parse_task_blocks(reply, false);
  REQUIRE(tasks.size() == 3);
  CHECK(tasks[0].category == "诊断");
  CHECK(tasks[0].instruction == "根据症状判断可能的疾病。");
  CHECK(tasks[0].input == "男，45岁，胸口压榨样疼痛20分钟。");
  CHECK(tasks[0].output == "可能是急性冠脉综合征，\n需要立即拨打120。");
  CHECK(tasks[1].instruction == "解释血常规中白细胞升高的意义");
  CHECK(tasks[1].input.empty());
  CHECK(tasks[1].output == "白细胞升高常见于细菌感染。\n1. 保持休息\n2. 多喝水");
  CHECK(tasks[2].category == "饮食");
  CHECK(tasks[2].input.empty());
  CHECK(tasks[2].output == "不建议，啤酒嘌呤含量高。");

  SECTION("finish_reason length drops the last block even when it looks complete") {
    std::string cut = "1. 指令：甲问题是什么\n输入：\n输出：甲答案\n###\n2. 指令：乙问题是什么\n输出：乙答";
    CHECK(parse_task_blocks(cut, false).size() == 2);
    auto kept = parse_task_blocks(cut, true);
    REQUIRE(kept.size() == 1);
    CHECK(kept[0].instruction == "甲问题是什么");
  }
  CHECK(parse_task_blocks("没有任何任务", false).empty());
}

TEST_CASE("normalize_whitespace and support verdicts", "[gen][parse]") {
  CHECK(normalize_whitespace("  a \t b\r\n\n\u3000中  文 \n") == "a b\n中 文");
  CHECK(parse_support_verdict("是"));
  CHECK(parse_support_verdict("是的，回答有依据。"));
  CHECK(parse_support_verdict("Yes."));
  CHECK_FALSE(parse_support_verdict("否"));
  CHECK_FALSE(parse_support_verdict("不完全支持"));
  CHECK_FALSE(parse_support_verdict(""));
}

TEST_CASE("check_task filters", "[gen][parse]") {
  TaskFilter f;
  SeedTask ok{"诊断", "请根据以下症状给出可能的诊断", "", "可能是普通感冒，注意休息。"};
  CHECK(check_task(ok, f).empty());
  SeedTask t = ok;
  t.instruction = "诊断";
  CHECK(check_task(t, f) == "instruction too short");
  t = ok;
  t.output = "请看这张图片中的皮疹，判断类型";
  CHECK(check_task(t, f) == "blacklisted: 图片");
  t = ok;
  t.output = "As an AI, I cannot give advice.";
  CHECK(check_task(t, f) == "not Chinese");
  t.output = "抱歉，As an AI language model 我不能回答";
  CHECK(check_task(t, f).rfind("blacklisted", 0) == 0);
  t = ok;
  t.instruction = "What is the normal blood pressure";
  CHECK(check_task(t, f) == "not Chinese");
}

TEST_CASE("seed tasks: the shipped file and bad files", "[gen][parse]") {
  auto seeds = load_seed_tasks(std::string(QG_SOURCE_DIR) + "/data/gen/seed_tasks.jsonl");
  CHECK(seeds.size() >= 100);
  std::set<std::string> categories;
  for (const auto& s : seeds) {
    categories.insert(s.category);
    CHECK(check_task(s, TaskFilter{}).empty());
  }
  CHECK(categories.size() == 16);

  auto bad = std::filesystem::path(QG_BINARY_DIR) / "gen_bad_seeds.jsonl";
  std::ofstream(bad) << R"({"category":"诊断","instruction":"甲","output":"乙"})" << "\n"
                     << R"({"category":"诊断","output":"乙"})" << "\n";
  REQUIRE_THROWS_WITH(load_seed_tasks(bad), QG_CONTAINS("gen_bad_seeds.jsonl:2") &&
                                                QG_CONTAINS("instruction"));
  std::ofstream(bad) << "{not json\n";
  REQUIRE_THROWS_WITH(load_seed_tasks(bad), QG_CONTAINS("invalid JSON"));
  std::ofstream(bad) << "\n";
  REQUIRE_THROWS_WITH(load_seed_tasks(bad), QG_CONTAINS("no seed tasks"));
  REQUIRE_THROWS_WITH(load_seed_tasks(bad.string() + ".missing"),
                      QG_CONTAINS("cannot open"));
  std::filesystem::remove(bad);
}

TEST_CASE("prompt templates: render, validation, shipped copies", "[gen][parse]") {
  PromptTemplate t("问{question}，{{字面}}，资料：{passage}", "t.txt", {"passage", "question"},
                   {"passage"});
  CHECK(t.render({{"question", "甲"}, {"passage", "乙"}}) == "问甲，{字面}，资料：乙");
  REQUIRE_THROWS_WITH(PromptTemplate("{pasage}", "t.txt", {"passage"}, {}),
                      QG_CONTAINS("t.txt") &&
                          QG_CONTAINS("unknown placeholder {pasage}"));
  REQUIRE_THROWS_WITH(PromptTemplate("no placeholder", "t.txt", {"passage"}, {"passage"}),
                      QG_CONTAINS("must contain {passage}"));
  REQUIRE_THROWS_WITH(PromptTemplate("{passage", "t.txt", {"passage"}, {}),
                      QG_CONTAINS("unclosed"));
  // data/gen/prompts/ holds the built-in templates verbatim, as starting points for overrides.
  auto dir = std::string(QG_SOURCE_DIR) + "/data/gen/prompts/";
  auto read = [&](const std::string& name) {
    return PromptTemplate::load(dir + name, {"category", "examples", "count", "first", "passage",
                                             "question", "answer"}, {}).text();
  };
  CHECK(read("self_instruct.txt") == default_self_instruct_template());
  CHECK(read("book_question.txt") == default_question_template());
  CHECK(read("book_answer.txt") == default_answer_template());
  CHECK(read("book_support.txt") == default_support_template());
}
