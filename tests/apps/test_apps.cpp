// The command-line apps end to end, run as a user would (binaries from build/bin).
#include <array>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "app_runner.h"
#include "catch.hpp"
#include "model_fixtures.h"
#include "qinggeng/io/npy.h"

namespace fs = std::filesystem;

namespace {

using qg::test::quoted;
using qg::test::RunResult;

RunResult run(const std::string& args) { return qg::test::run_app(args); }

}  // namespace

TEST_CASE("qg-eval --ids writes the logits of every position as .npy") {
  const fs::path model = fs::path(QG_TEST_FIXTURES) / "torch_tiny";
  const fs::path out = qg::test::scratch_dir("eval-ids") / "logits.npy";
  const auto r = run("qg-eval --model " + quoted(model) + " --device cpu --ids 5,17,33,2,151,154 --logits-out " + quoted(out));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto got = qg::io::read_npy_f32(out);
  const auto golden = qg::io::read_npy_f32(model / "golden_prompt.npy");
  REQUIRE(got.shape == golden.shape);
  for (std::size_t i = 0; i < got.data.size(); ++i) REQUIRE(got.data[i] == Approx(golden.data[i]).margin(2e-4));
}

TEST_CASE("qg-eval reports bad input with a message and a non-zero exit") {
  const fs::path model = fs::path(QG_TEST_FIXTURES) / "torch_tiny";
  auto r = run("qg-eval --model /nonexistent/model --ids 1,2");
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("/nonexistent/model") != std::string::npos);
  r = run("qg-eval --model " + quoted(model) + " --ids 1,x,3");
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("\"x\" is not an integer") != std::string::npos);
  r = run("qg-eval --model " + quoted(model) + " --ids 1,999");
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("outside the vocabulary") != std::string::npos);
  r = run("qg-eval --model " + quoted(model));
  CHECK(r.exit_code != 0);
}

TEST_CASE("qg-init, qg-eval perplexity and qg-chat --prompt on a random model with a tokenizer") {
  const fs::path dir = qg::test::scratch_dir("apps-model");
  const fs::path demo = fs::path(QG_SOURCE_DIR) / "data" / "demo-model";
  auto r = run("qg-init --out " + quoted(dir) + " --tokenizer " + quoted(demo) +
               " --hidden 32 --layers 1 --heads 2 --max-seq 96 --seed 3");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  REQUIRE(fs::exists(dir / "ice_text.model"));

  r = run("qg-eval --model " + quoted(dir) + " --device cpu --text '高血压患者应当低盐饮食。'");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(r.output.find("perplexity") != std::string::npos);

  const fs::path jsonl = dir / "eval.jsonl";
  std::ofstream(jsonl) << "{\"question\": \"感冒了怎么办？\", \"answer\": \"多休息，多喝水。\"}\n\n"
                       << "{\"instruction\": \"解释\", \"input\": \"血压\", \"output\": \"血液对血管壁的压力。\"}\n"
                       << "{\"text\": \"糖尿病需要控制饮食。\"}\n";
  r = run("qg-eval --model " + quoted(dir) + " --device cpu --jsonl " + quoted(jsonl));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  CHECK(r.output.find("3 records") != std::string::npos);

  std::ofstream(jsonl) << "{\"question\": \"缺少答案\"}\n";
  r = run("qg-eval --model " + quoted(dir) + " --device cpu --jsonl " + quoted(jsonl));
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("eval.jsonl:1") != std::string::npos);

  r = run("qg-chat --model " + quoted(dir) + " --device cpu --prompt '你好' --prompt '头痛怎么办？' --max-new-tokens 5 --seed 1");
  INFO(r.output);
  CHECK(r.exit_code == 0);
  r = run("qg-chat --model " + quoted(dir) + " --top-p 2 --prompt x");
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("top_p") != std::string::npos);
}

TEST_CASE("qg-convert rewrites torch .bin shards as f16 safetensors that score the same") {
  const fs::path model = fs::path(QG_TEST_FIXTURES) / "torch_tiny";
  const fs::path out = qg::test::scratch_dir("convert-app");
  auto r = run("qg-convert --in " + quoted(model) + " --out " + quoted(out) + " --dtype f16");
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  REQUIRE(fs::exists(out / "model.safetensors"));
  REQUIRE(fs::exists(out / "config.json"));
  r = run("qg-eval --model " + quoted(out) + " --device cpu --ids 5,17,33,2,151,154 --logits-out " + quoted(out / "l.npy"));
  INFO(r.output);
  REQUIRE(r.exit_code == 0);
  const auto got = qg::io::read_npy_f32(out / "l.npy");
  const auto golden = qg::io::read_npy_f32(model / "golden_prompt.npy");
  for (std::size_t i = 0; i < got.data.size(); ++i) REQUIRE(got.data[i] == Approx(golden.data[i]).margin(2e-4));
  r = run("qg-convert --in /nonexistent --out " + quoted(out / "x"));
  CHECK(r.exit_code != 0);
  CHECK(r.output.find("/nonexistent") != std::string::npos);
}

TEST_CASE("qg-chat with no --model runs the bundled demo model and says so") {
  const auto r = run("qg-chat --device cpu --prompt '你好' --max-new-tokens 4");
  INFO(r.output);
  CHECK(r.exit_code == 0);
  CHECK(r.output.find("tiny bundled demo model") != std::string::npos);
  CHECK(r.output.find("--model /path/to/chatglm-6b") != std::string::npos);
}

TEST_CASE("qg-chat interactive mode: /reset and /exit") {
  const fs::path input = qg::test::scratch_dir("chat-stdin") / "in.txt";
  std::ofstream(input) << "你好\n/reset\n\n/exit\n";
  const auto r = run("qg-chat --device cpu --max-new-tokens 3 < " + quoted(input));
  INFO(r.output);
  CHECK(r.exit_code == 0);
  CHECK(r.output.find("(history cleared)") != std::string::npos);
}
