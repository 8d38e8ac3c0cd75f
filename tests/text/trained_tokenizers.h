// Small sentencepiece models trained at test time on our own corpus (data/text/), standing in
// for the two ChatGLM-6B releases of ice_text.model. Training runs once per build tree: the
// result is cached under QG_BINARY_DIR, keyed by the training arguments and the corpus text.
#pragma once

#include <filesystem>

namespace qg::test {

/// A directory holding only ice_text.model, trained like the first release: no GLM pieces, no
/// byte fallback, no tokenizer_config.json (so the offset defaults to 20000).
std::filesystem::path first_release_tokenizer_dir();

/// A directory holding ice_text.model trained with every GLM piece built in (control specials,
/// <n>, <|tab|>, blanks, byte fallback) and a tokenizer_config.json with num_image_tokens 0.
std::filesystem::path updated_tokenizer_dir();

/// The GLM special pieces, in the release's order.
inline constexpr const char* kSpecialPieces[] = {
    "[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"};

}  // namespace qg::test
