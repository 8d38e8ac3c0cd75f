// qg-eval: perplexity of text / JSONL under a ChatGLM model, and raw logits of given ids.
//
//   qg-eval --model DIR --ids 0,1,2,3,4 --logits-out logits.npy     (no tokenizer needed)
//   qg-eval --model DIR --text "高血压患者应当..."
//   qg-eval --model DIR --file notes.txt | --jsonl data.jsonl
#include <chrono>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli_app.h"
#include "qinggeng/engine/generator.h"
#include "qinggeng/engine/perplexity.h"
#include "qinggeng/io/npy.h"
#include "qinggeng/text/tokenizer.h"

namespace {

std::vector<int> parse_ids(const std::string& list) {
  std::vector<int> ids;
  std::stringstream ss(list);
  std::string item;
  while (std::getline(ss, item, ',')) {
    QG_CHECK(!item.empty(), "--ids: empty entry in \"", list, "\"");
    std::size_t used = 0;
    int value = 0;
    try {
      value = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    QG_CHECK(used == item.size(), "--ids: \"", item, "\" is not an integer");
    ids.push_back(value);
  }
  QG_CHECK(!ids.empty(), "--ids: no ids given");
  return ids;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  QG_CHECK(in, path, ": cannot open file");
  std::ostringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

void report(const qg::engine::LogLikelihood& ll) {
  std::printf("tokens %lld  mean NLL %.6f  perplexity %.4f\n", ll.tokens,
              ll.tokens ? -ll.total_logprob / static_cast<double>(ll.tokens) : 0.0, ll.perplexity());
}

}  // namespace

int main(int argc, char** argv) {
  return qg::apps::run_app("qg-eval", [&] {
    CLI::App app{"qg-eval: perplexity of text or JSONL, or the logits of given token ids"};
    qg::apps::ModelOptions model_opts;
    model_opts.add_to(app, true);
    std::string ids, logits_out, text, file, jsonl;
    auto* ids_opt = app.add_option("--ids", ids, "comma-separated token ids to score (GLM layout from the config's special ids)");
    app.add_option("--logits-out", logits_out, "with --ids: write float32 logits [n, vocab] as .npy")->needs(ids_opt);
    auto* text_opt = app.add_option("--text", text, "text whose perplexity to compute");
    auto* file_opt = app.add_option("--file", file, "UTF-8 text file whose perplexity to compute");
    auto* jsonl_opt = app.add_option("--jsonl", jsonl, "JSONL of {text} / {question, answer} / {instruction, input, output}");
    ids_opt->excludes(text_opt, file_opt, jsonl_opt);
    text_opt->excludes(file_opt, jsonl_opt);
    file_opt->excludes(jsonl_opt);
    QG_PARSE_ARGS(app, argc, argv);
    QG_CHECK(!ids.empty() || !text.empty() || !file.empty() || !jsonl.empty(),
             "nothing to evaluate: give --ids, --text, --file or --jsonl");

    const auto t0 = std::chrono::steady_clock::now();
    const auto model = model_opts.load();
    std::fprintf(stderr, "loaded %s on %s in %.2f s\n", model_opts.model_dir.c_str(),
                 model.backend().name().c_str(),
                 std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());

    if (!ids.empty()) {
      const auto token_ids = parse_ids(ids);
      const auto logits = qg::engine::score_logits(model, token_ids);
      const std::int64_t n = static_cast<std::int64_t>(token_ids.size());
      if (!logits_out.empty()) {
        qg::io::write_npy_f32(logits_out, logits.data(), {n, model.config().vocab_size});
        std::printf("wrote logits [%lld, %lld] to %s\n", static_cast<long long>(n),
                    static_cast<long long>(model.config().vocab_size), logits_out.c_str());
      }
      if (n > 1) report(qg::engine::log_likelihood(model, token_ids, 1));
      return 0;
    }
    const auto tokenizer = qg::text::ChatGlmTokenizer::load(model_opts.model_dir);
    if (!jsonl.empty()) {
      const auto ll = qg::engine::jsonl_log_likelihood(
          model, tokenizer, jsonl, [](long long records, const qg::engine::LogLikelihood& so_far) {
            std::fprintf(stderr, "\r%lld records, perplexity so far %.4f", records, so_far.perplexity());
          });
      std::fprintf(stderr, "\n");
      report(ll);
      return 0;
    }
    report(qg::engine::text_log_likelihood(model, tokenizer, text.empty() ? read_file(file) : text));
    return 0;
  });
}
