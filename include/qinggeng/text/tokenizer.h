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
///
/// Loading completes a first-release model. Every piece below that the model file lacks is
/// appended, in this order, so that sentencepiece ids of a first-release model are
/// `pieces_in_file + offset`:
///   - offsets 0..7: `[MASK] [gMASK] [sMASK] <unused_0> <sop> <eop> <ENC> <dBLOCK>` (control:
///     never produced by encode, decoded to nothing);
///   - offsets 8..87: `<|tab|>`, `<|blank_2|>` .. `<|blank_80|>` (user-defined);
///   - offsets 88..343: byte pieces `<0x00>` .. `<0xFF>`, with byte fallback switched on, so
///     characters outside the vocabulary encode as their UTF-8 bytes;
///   - last: `<n>` (user-defined). The released file already holds it; it comes after the
///     release's own pieces so that their ids do not depend on whether it was present.
/// Pieces already present (an updated model, trained with them) are left where they are, and a
/// model holding byte pieces keeps its own byte-fallback setting.
///
/// Text goes through the model's own normalizer (dummy prefix, whitespace handling as the
/// model was trained), exactly as sentencepiece does for the HF tokenizer.
class ChatGlmTokenizer {
 public:
  /// \brief Loads `dir/ice_text.model` (and `dir/tokenizer_config.json` when present, for
  /// num_image_tokens; 20000 when the file or key is absent, as in the HF tokenizer). Given a
  /// .model file instead of a directory, the tokenizer_config.json next to it is used.
  /// \throws qg::Error naming the file when it is missing or not a sentencepiece model, or when
  /// the config is invalid JSON or holds a bad num_image_tokens.
  static ChatGlmTokenizer load(const std::filesystem::path& dir_or_model_file);
  /// \brief Loads a .model file with the given id offset (no tokenizer_config.json is read).
  /// \throws qg::Error naming the file when it is missing or not a sentencepiece model.
  static ChatGlmTokenizer load(const std::filesystem::path& model_file, int num_image_tokens);

  ChatGlmTokenizer(ChatGlmTokenizer&&) noexcept;
  ChatGlmTokenizer& operator=(ChatGlmTokenizer&&) noexcept;
  ~ChatGlmTokenizer();

  /// \brief Token ids of `text` (no special tokens added); empty text gives no ids.
  std::vector<int> encode(std::string_view text) const;
  /// \brief Text of `ids`; control tokens decode to nothing, ids below num_image_tokens
  /// (image tokens, negative ids) are dropped.
  /// \throws qg::Error when an id is >= vocab_size().
  std::string decode(const std::vector<int>& ids) const;

  /// \brief Id of a piece by name ("[gMASK]", "<sop>", "<eop>", "<|blank_4|>", ...);
  /// "<image_N>" names image token N.
  /// \throws qg::Error naming the piece if the vocabulary lacks it.
  int token_id(std::string_view piece) const;
  /// \brief Piece text of an id (for debugging output); "<image_N>" below num_image_tokens.
  /// \throws qg::Error when the id is outside [0, vocab_size()).
  std::string piece(int id) const;

  /// \brief Total ids including the image-token offset (what config.json's vocab_size holds).
  int vocab_size() const;
  /// \brief The id offset added to every sentencepiece id (20000 first release, 0 updated).
  int num_image_tokens() const;
  /// \brief How many pieces loading appended to the model file (0 for an updated model).
  int appended_pieces() const;

  int mask_id() const { return token_id("[MASK]"); }
  int gmask_id() const { return token_id("[gMASK]"); }
  int bos_id() const { return token_id("<sop>"); }
  int eos_id() const { return token_id("<eop>"); }

 private:
  struct Impl;
  explicit ChatGlmTokenizer(std::unique_ptr<Impl> impl);
  static ChatGlmTokenizer from_model_bytes(std::string model, const std::filesystem::path& origin,
                                           int num_image_tokens);
  std::unique_ptr<Impl> impl_;
};

}  // namespace qg::text
