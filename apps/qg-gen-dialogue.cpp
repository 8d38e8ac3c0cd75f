// qg-gen-dialogue: self-instruct generation of Chinese medical instruction data
// ({instruction, input, output, category, ...} JSONL) from seed tasks via an OpenAI-compatible
// API. Resumable: rerun with the same --output to continue.
#include <CLI/CLI.hpp>

#include <cstdio>

#include "qinggeng/gen/app_support.h"
#include "qinggeng/gen/self_instruct.h"

int main(int argc, char** argv) {
  using namespace qg::gen;
  CLI::App app{"Generate Chinese medical instruction data by self-instruct (JSONL, resumable)."};
  ClientFlags client_flags;
  client_flags.max_tokens = 3072;
  client_flags.temperature = 0.9;
  add_client_flags(app, client_flags);
  SelfInstructOptions o;
  std::filesystem::path seeds_file, template_file;
  std::vector<std::string> extra_blacklist;
  app.add_option("--seeds", seeds_file, "seed tasks JSONL {category, instruction, input, output}")
      ->required();
  app.add_option("--output", o.output, "output JSONL (appended; an existing file is resumed)")
      ->required();
  app.add_option("--target", o.target, "stop when the output holds this many tasks")
      ->capture_default_str();
  app.add_option("--examples", o.examples_per_prompt, "examples shown per request (k)")
      ->capture_default_str();
  app.add_option("--machine-ratio", o.machine_ratio,
                 "share of the examples taken from generated tasks")
      ->capture_default_str();
  app.add_option("--tasks-per-request", o.tasks_per_request, "new tasks asked for per request")
      ->capture_default_str();
  app.add_option("--similarity", o.similarity_threshold,
                 "reject a task whose ROUGE-L against the pool reaches this")
      ->capture_default_str();
  app.add_option("--report-floor", o.similarity_report_floor,
                 "most_similar metadata is exact down to this ROUGE-L (lower: slower)")
      ->capture_default_str();
  app.add_option("--categories", o.categories,
                 "categories to generate (default: those of the seed tasks)");
  app.add_option("--template", template_file,
                 "prompt template file with {examples} {category} {count} {first}");
  app.add_option("--min-instruction", o.filter.min_instruction_chars, "instruction length bounds (characters)")
      ->capture_default_str();
  app.add_option("--max-instruction", o.filter.max_instruction_chars, "instruction length bounds (characters)")
      ->capture_default_str();
  app.add_option("--max-input", o.filter.max_input_chars, "input length bound (characters)")
      ->capture_default_str();
  app.add_option("--min-output", o.filter.min_output_chars, "output length bounds (characters)")
      ->capture_default_str();
  app.add_option("--max-output", o.filter.max_output_chars, "output length bounds (characters)")
      ->capture_default_str();
  app.add_option("--blacklist", extra_blacklist, "extra blacklisted substring (repeatable)");
  app.add_option("--random-seed", o.random_seed, "seed of example sampling")
      ->capture_default_str();
  if (int code = parse_command_line<CLI::ParseError>(app, argc, argv); code >= 0) return code;

  try {
    o.workers = client_flags.workers;
    o.max_consecutive_errors = client_flags.max_consecutive_errors;
    o.filter.blacklist.insert(o.filter.blacklist.end(), extra_blacklist.begin(),
                              extra_blacklist.end());
    o.prompt = TemplateSource::from_file(template_file);
    Cancellation cancel;
    stop_on_interrupt(cancel);
    ChatClient client(client_options(client_flags), &cancel);
    SelfInstructGenerator generator(client, load_seed_tasks(seeds_file), o);
    return run_generation([&] { return generator.run(cancel); }, generator.stats(), client,
                          cancel, client_flags.quiet, o.output);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}
