// Prompt template rendering and the built-in Chinese prompts (see prompt_template.h).
#include "qinggeng/gen/prompt_template.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "gen/utf8.h"
#include "qinggeng/error.h"

namespace qg::gen {

namespace {

// Walks `text`, calling literal(piece) for plain text and placeholder(name) for {name}.
// Throws for an unclosed '{'.
template <typename Literal, typename Placeholder>
void scan(const std::string& text, const std::string& origin, Literal literal,
          Placeholder placeholder) {
  std::size_t i = 0;
  while (i < text.size()) {
    std::size_t open = text.find_first_of("{}", i);
    if (open == std::string::npos) {
      literal(std::string_view(text).substr(i));
      return;
    }
    literal(std::string_view(text).substr(i, open - i));
    if (open + 1 < text.size() && text[open + 1] == text[open]) {  // "{{" or "}}"
      literal(std::string_view(text).substr(open, 1));
      i = open + 2;
      continue;
    }
    if (text[open] == '}') {
      literal("}");
      i = open + 1;
      continue;
    }
    std::size_t close = text.find('}', open);
    QG_CHECK(close != std::string::npos, origin, ": unclosed '{' in prompt template");
    placeholder(text.substr(open + 1, close - open - 1));
    i = close + 1;
  }
}

}  // namespace

PromptTemplate::PromptTemplate(std::string text, std::string origin,
                               const std::vector<std::string>& allowed,
                               const std::vector<std::string>& required)
    : text_(std::move(text)), origin_(std::move(origin)) {
  std::size_t bad = utf8::first_invalid(text_);
  QG_CHECK(bad == std::string::npos, origin_, ": prompt template is not valid UTF-8 (byte ", bad,
           ")");
  std::vector<std::string> seen;
  scan(
      text_, origin_, [](std::string_view) {},
      [&](const std::string& name) {
        QG_CHECK(std::find(allowed.begin(), allowed.end(), name) != allowed.end(), origin_,
                 ": unknown placeholder {", name, "} in prompt template (write {{ for a brace)");
        seen.push_back(name);
      });
  for (const auto& name : required) {
    QG_CHECK(std::find(seen.begin(), seen.end(), name) != seen.end(), origin_,
             ": prompt template must contain {", name, "}");
  }
}

PromptTemplate PromptTemplate::load(const std::filesystem::path& file,
                                    const std::vector<std::string>& allowed,
                                    const std::vector<std::string>& required) {
  TemplateSource source = TemplateSource::from_file(file);
  return PromptTemplate(source.text, source.origin, allowed, required);
}

TemplateSource TemplateSource::from_file(const std::filesystem::path& file) {
  if (file.empty()) return {};
  std::ifstream in(file, std::ios::binary);
  QG_CHECK(in, file.string(), ": cannot open prompt template");
  std::ostringstream buf;
  buf << in.rdbuf();
  return {buf.str(), file.string()};
}

std::string PromptTemplate::render(const std::map<std::string, std::string>& values) const {
  std::string out;
  scan(
      text_, origin_, [&](std::string_view piece) { out += piece; },
      [&](const std::string& name) {
        auto it = values.find(name);
        QG_CHECK(it != values.end(), origin_, ": no value for placeholder {", name, "}");
        out += it->second;
      });
  return out;
}

std::string_view default_self_instruct_template() {
  return R"(你是一名资深的医学教育专家，正在为医疗健康问答模型编写高质量的训练任务。请参考下面的示例，再写出{count}个新的任务，它们的类别都是“{category}”。

要求：
1. 每个任务由“指令”“输入”“输出”三部分组成。指令是用户的请求或问题；输入是补充信息（如年龄、症状、病史、检查结果、用药情况），不需要时写“<无输入>”；输出是专业、准确、通俗易懂的回答。
2. 新任务彼此之间、与示例之间都要明显不同：换用不同的疾病、人群、场景和提问方式，不要改写示例。
3. 内容必须符合医学常识；涉及诊断和用药时提醒及时就医或遵医嘱，不要编造药物、剂量或数据。
4. 不要涉及图片、音频、视频、链接或文件，模型只能处理文字。
5. 全部使用简体中文，每个输出一般不超过300字。
6. 严格按照示例的格式书写，从编号{first}开始依次编号，任务之间用“###”分隔。

{examples}
###
)";
}

std::string_view default_question_template() {
  return R"(下面是一段医学书籍的节选。请根据这段内容提出{count}个有价值的问题，要求：
1. 每个问题的答案都能在这段内容中找到；
2. 问题之间不要重复，尽量覆盖段落中的不同要点；
3. 问题要完整、独立，不看段落也能明白问的是什么，不要出现“本段”“上文”“作者”之类的说法；
4. 每行只写一个问题，不要写答案，也不要写其他说明。

段落：
{passage}
)";
}

std::string_view default_answer_template() {
  return R"(请仅依据下面的参考资料回答问题。回答要准确、完整、条理清楚，使用简体中文，保留资料中的数值和单位，不要补充资料以外的内容。如果参考资料中没有相关信息，请只回答“资料未提及”。

参考资料：
{passage}

问题：{question}
)";
}

std::string_view default_support_template() {
  return R"(请判断下面的回答是否完全得到参考资料的支持：回答中的内容都能在资料中找到依据，且没有与资料矛盾的地方。只回答“是”或“否”。

参考资料：
{passage}

问题：{question}

回答：{answer}
)";
}

}  // namespace qg::gen
