// qg-gen-bookqa: passage-grounded medical QA data ({passage_id, passage, question, answer,
// model} JSONL) from book passages via an OpenAI-compatible API. Resumable: rerun with the same
// --output to continue.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <algorithm>

#include "qinggeng/gen/app_support.h"
#include "qinggeng/gen/book_qa.h"

int main(int argc, char** argv) {
  using namespace qg::gen;
  CLI::App app{"Generate passage-grounded medical QA pairs from books (JSONL, resumable)."};
  ClientFlags client_flags;
  client_flags.temperature = 0.7;
  add_client_flags(app, client_flags);
  BookQaOptions o;
  SplitOptions split;
  std::filesystem::path passages_path, question_file, answer_file, support_file;
  std::string text_field = "text";
  app.add_option("--passages", passages_path,
                 "JSON array of strings, JSONL with a text field, a .txt book, or a directory "
                 "of .txt books")
      ->required();
  app.add_option("--output", o.output, "output JSONL (appended; an existing file is resumed)")
      ->required();
  app.add_option("--target", o.target, "stop at this many QA pairs (0: all passages)")
      ->capture_default_str();
  app.add_option("--questions", o.questions_per_passage, "questions asked per passage")
      ->capture_default_str();
  app.add_flag("--support-check", o.support_check,
               "ask whether the passage supports each answer; drop unsupported ones");
  app.add_option("--passage-threshold", o.passage_threshold,
                 "ROUGE-L dedup threshold among one passage's questions")
      ->capture_default_str();
  app.add_option("--global-threshold", o.global_threshold,
                 "ROUGE-L dedup threshold against all questions so far")
      ->capture_default_str();
  app.add_option("--unanswerable-marker", o.unanswerable_marker,
                 "answers containing this text are dropped")
      ->capture_default_str();
  app.add_option("--text-field", text_field, "passage field in JSON/JSONL input")
      ->capture_default_str();
  app.add_option("--passage-chars", split.target_chars, "target passage length for .txt books")
      ->capture_default_str();
  app.add_option("--max-passage-chars", split.max_chars, "hard passage length limit")
      ->capture_default_str();
  app.add_option("--question-template", question_file, "template with {passage} {count}");
  app.add_option("--answer-template", answer_file, "template with {passage} {question}");
  app.add_option("--support-template", support_file,
                 "template with {passage} {question} {answer}");
  if (int code = parse_command_line<CLI::ParseError>(app, argc, argv); code >= 0) return code;

  try {
    o.workers = client_flags.workers;
    o.max_consecutive_errors = client_flags.max_consecutive_errors;
    o.question_prompt = TemplateSource::from_file(question_file);
    o.answer_prompt = TemplateSource::from_file(answer_file);
    o.support_prompt = TemplateSource::from_file(support_file);
    split.min_chars = std::min(split.min_chars, split.target_chars / 2);
    Cancellation cancel;
    stop_on_interrupt(cancel);
    ChatClient client(client_options(client_flags), &cancel);
    BookQaGenerator generator(client, load_passages(passages_path, split, text_field), o);
    return run_generation([&] { return generator.run(cancel); }, generator.stats(), client,
                          cancel, client_flags.quiet, o.output);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
