// Example: load a ChatGLM model directory and print the most likely next token after each
// position of a fixed id sequence — the smallest use of the public API (no tokenizer needed).
//
//   score_ids /path/to/model-dir
#include <cstdio>
#include <vector>

#include <qinggeng/engine/generator.h>
#include <qinggeng/error.h>
#include <qinggeng/model/glm_model.h>

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s MODEL_DIR\n", argv[0]);
    return 2;
  }
  try {
    auto model = qg::model::GlmModel::load(argv[1], qg::model::make_cpu_backend());
    const auto& cfg = model.config();
    // "some context" [gMASK] <sop>: a GLM prompt in ids.
    const std::vector<int> ids = {5, 6, 7, cfg.gmask_token_id, cfg.bos_token_id};
    const auto logits = qg::engine::score_logits(model, ids);
    const auto vocab = static_cast<std::size_t>(cfg.vocab_size);
    for (std::size_t t = 0; t < ids.size(); ++t) {
      const int next = qg::engine::argmax(logits.data() + t * vocab, vocab);
      std::printf("position %zu: token %d -> most likely next %d\n", t, ids[t], next);
    }
  } catch (const qg::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
