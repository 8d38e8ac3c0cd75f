// ChatGlmTokenizer: the ChatGLM-6B (v1) tokenizer, a sentencepiece model ("ice_text.model")
// plus the GLM text rules (spec section 3):
//   encode: "\n" -> <n>, "\t" -> <|tab|>, runs of 2..80 spaces -> <|blank_k|> (longest first),
//           sentencepiece, then + num_image_tokens on every id;
//   decode: - num_image_tokens (negative ids dropped), sentencepiece, then the reverse map.
// Works with the first-release model file (which lacks the special pieces: they are appended,
// in the release's order, before loading) and with the updated one (num_image_tokens 0).
#pragma once

#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace qg::text {

/// \brief The ChatGLM v1 tokenizer.
class ChatGlmTokenizer {
 public:
  /// \brief Loads `dir/ice_text.model` (and `dir/tokenizer_config.json` when present, for
  /// num_image_tokens; 20000 when absent, as in the HF tokenizer) — or a .model file directly
  /// with the given offset.
  /// \throws qg::Error naming the file when it is missing or not a sentencepiece model.
  static ChatGlmTokenizer load(const std::filesystem::path& dir_or_model_file);
  static ChatGlmTokenizer load(const std::filesystem::path& model_file, int num_image_tokens);

  ChatGlmTokenizer(ChatGlmTokenizer&&) noexcept;
  ChatGlmTokenizer& operator=(ChatGlmTokenizer&&) noexcept;
  ~ChatGlmTokenizer();

  /// \brief Token ids of `text` (no special tokens added).
  std::vector<int> encode(std::string_view text) const;
  /// \brief Text of `ids`; special control tokens decode to nothing.
  std::string decode(const std::vector<int>& ids) const;

  /// \brief Id of a piece by name ("[gMASK]", "<sop>", "<eop>", "<|blank_4|>", ...).
  /// \throws qg::Error naming the piece if the vocabulary lacks it.
  int token_id(std::string_view piece) const;
  /// \brief Piece text of an id (for debugging output).
  std::string piece(int id) const;

  /// \brief Total ids including the image-token offset (what config.json's vocab_size holds).
  int vocab_size() const;
  /// \brief The id offset added to every sentencepiece id (20000 first release, 0 updated).
  int num_image_tokens() const;

  int mask_id() const { return token_id("[MASK]"); }
  int gmask_id() const { return token_id("[gMASK]"); }
  int bos_id() const { return token_id("<sop>"); }
  int eos_id() const { return token_id("<eop>"); }

 private:
  struct Impl;
  explicit ChatGlmTokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qg::text
