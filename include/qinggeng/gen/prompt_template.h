// Prompt templates: text with {name} placeholders, overridable from a file. The built-in
// defaults are Chinese; data/gen/prompts/ holds copies to start an override from.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace qg::gen {

/// \brief A prompt template. `{name}` is replaced by a value; `{{` and `}}` are literal braces.
class PromptTemplate {
 public:
  /// \brief Checks that `text` uses only `allowed` placeholders and every one of `required`;
  /// `origin` (a file name or "built-in ...") is named in errors.
  PromptTemplate(std::string text, std::string origin, const std::vector<std::string>& allowed,
                 const std::vector<std::string>& required);
  /// \brief Reads the template from `file` (UTF-8), validated as above.
  static PromptTemplate load(const std::filesystem::path& file,
                             const std::vector<std::string>& allowed,
                             const std::vector<std::string>& required);
  /// \brief The text with every placeholder replaced from `values`.
  std::string render(const std::map<std::string, std::string>& values) const;
  const std::string& text() const { return text_; }

 private:
  std::string text_;
  std::string origin_;
};

/// \brief A user's template text and where it came from (for error messages). Empty text
/// means "use the built-in default".
struct TemplateSource {
  std::string text;
  std::string origin;
  /// \brief Reads `file` (empty path: an empty source). Throws qg::Error naming the file.
  static TemplateSource from_file(const std::filesystem::path& file);
};

/// \brief Built-in self-instruct prompt; placeholders {category} {examples} {count} {first}.
std::string_view default_self_instruct_template();
/// \brief Built-in question prompt for book QA; placeholders {passage} {count}.
std::string_view default_question_template();
/// \brief Built-in grounded answer prompt; placeholders {passage} {question}.
std::string_view default_answer_template();
/// \brief Built-in support check prompt; placeholders {passage} {question} {answer}.
std::string_view default_support_template();

}  // namespace qg::gen
