// qg-init: write a randomly initialised ChatGLM checkpoint in the HF layout (config.json +
// model.safetensors), for tests, benchmarks and as the start of full-parameter training.
//
//   qg-init --out /tmp/tiny --hidden 64 --layers 2 --heads 4 --vocab 160
//   qg-init --out /tmp/demo --tokenizer data/demo-model --hidden 256 --layers 4 --heads 8
//   qg-init --out /tmp/6b --config chatglm-6b/config.json      (full-size shapes)
#include <cstdio>
#include <filesystem>

#include "cli_app.h"
#include "qinggeng/io/model_config.h"
#include "qinggeng/model/random_init.h"
#include "qinggeng/text/tokenizer.h"

int main(int argc, char** argv) {
  return qg::apps::run_app("qg-init", [&] {
    namespace fs = std::filesystem;
    CLI::App app{"qg-init: write a random ChatGLM checkpoint (config.json + model.safetensors)"};
    std::string out, config_path, tokenizer_dir, dtype = "f16";
    qg::io::ModelConfig c;
    c.hidden_size = 64;
    c.num_layers = 2;
    c.num_attention_heads = 4;
    c.inner_hidden_size = 0;
    c.vocab_size = 160;
    c.bos_token_id = c.eos_token_id = c.mask_token_id = c.gmask_token_id = -1;
    qg::model::RandomModelOptions opts;
    app.add_option("--out,-o", out, "output directory")->required();
    app.add_option("--config", config_path, "take every size from this config.json (or model dir)");
    app.add_option("--tokenizer", tokenizer_dir, "copy ice_text.model + tokenizer_config.json from here; vocab and special ids follow it");
    app.add_option("--hidden", c.hidden_size, "hidden size")->capture_default_str();
    app.add_option("--layers", c.num_layers, "number of layers")->capture_default_str();
    app.add_option("--heads", c.num_attention_heads, "attention heads")->capture_default_str();
    app.add_option("--inner", c.inner_hidden_size, "MLP inner size (0 = 4 x hidden)");
    app.add_option("--vocab", c.vocab_size, "vocabulary size (without --tokenizer)")->capture_default_str();
    app.add_option("--max-seq", c.max_sequence_length, "max_sequence_length")->capture_default_str();
    app.add_option("--bos", c.bos_token_id, "<sop> id (default vocab-4)");
    app.add_option("--eos", c.eos_token_id, "<eop> id (default vocab-3)");
    app.add_option("--mask", c.mask_token_id, "[MASK] id (default vocab-8)");
    app.add_option("--gmask", c.gmask_token_id, "[gMASK] id (default vocab-7)");
    app.add_option("--dtype", dtype, "f32, f16 or bf16")->capture_default_str();
    app.add_option("--seed", opts.seed, "random seed")->capture_default_str();
    app.add_flag("--tie-lm-head", opts.tie_lm_head, "omit lm_head.weight (tied to the embeddings)");
    QG_PARSE_ARGS(app, argc, argv);

    if (!config_path.empty()) {
      c = qg::io::load_model_config(config_path);
    } else {
      if (c.inner_hidden_size == 0) c.inner_hidden_size = 4 * c.hidden_size;
      if (!tokenizer_dir.empty()) {
        const auto tok = qg::text::ChatGlmTokenizer::load(tokenizer_dir);
        c.vocab_size = tok.vocab_size();
        c.bos_token_id = tok.bos_id();
        c.eos_token_id = tok.eos_id();
        c.mask_token_id = tok.mask_id();
        c.gmask_token_id = tok.gmask_id();
        c.pad_token_id = tok.token_id("<pad>");
      }
      const int v = static_cast<int>(c.vocab_size);
      if (c.bos_token_id < 0) c.bos_token_id = v - 4;
      if (c.eos_token_id < 0) c.eos_token_id = v - 3;
      if (c.mask_token_id < 0) c.mask_token_id = v - 8;
      if (c.gmask_token_id < 0) c.gmask_token_id = v - 7;
    }
    opts.dtype = dtype == "f32" ? qg::DType::F32 : dtype == "bf16" ? qg::DType::BF16 : qg::DType::F16;
    QG_CHECK(dtype == "f32" || dtype == "f16" || dtype == "bf16", "--dtype must be f32, f16 or bf16");
    qg::model::write_random_model(out, c, opts);
    if (!tokenizer_dir.empty()) {
      for (const char* name : {"ice_text.model", "tokenizer_config.json"}) {
        const fs::path src = fs::path(tokenizer_dir) / name;
        if (fs::exists(src) && fs::absolute(src) != fs::absolute(fs::path(out) / name)) {
          fs::copy_file(src, fs::path(out) / name, fs::copy_options::overwrite_existing);
        }
      }
    }
    std::printf("wrote %s: vocab %lld, hidden %lld, layers %lld, heads %lld, inner %lld (%s)\n",
                out.c_str(), static_cast<long long>(c.vocab_size), static_cast<long long>(c.hidden_size),
                static_cast<long long>(c.num_layers), static_cast<long long>(c.num_attention_heads),
                static_cast<long long>(c.inner_hidden_size), dtype.c_str());
    return 0;
  });
}
