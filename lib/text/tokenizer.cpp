// The ChatGLM v1 tokenizer: GLM's whitespace/newline rules around a sentencepiece model, and
// the loader that completes a first-release ice_text.model with the pieces it lacks.
#include "qinggeng/text/tokenizer.h"

#include <sentencepiece_processor.h>

#include <array>
#include <fstream>
#include <sstream>
#include <system_error>

#include "io/json.h"
#include "qinggeng/error.h"
#include "text/glm_text_rules.h"
#include "text/sentencepiece_proto.h"

namespace qg::text {
namespace fs = std::filesystem;

namespace {

// The HF ChatGLMTokenizer's default when tokenizer_config.json does not say.
constexpr int kDefaultImageTokens = 20000;
constexpr std::string_view kImagePrefix = "<image_";
constexpr std::array<std::string_view, 8> kSpecialPieces = {
    "[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"};

std::string read_model_file(const fs::path& file) {
  std::error_code ec;
  QG_CHECK(fs::exists(file, ec), "tokenizer model ", file.string(), " not found");
  QG_CHECK(fs::is_regular_file(file, ec), "tokenizer model ", file.string(), " is not a file");
  std::ifstream in(file, std::ios::binary);
  QG_CHECK(in, "cannot open tokenizer model ", file.string());
  std::ostringstream bytes;
  bytes << in.rdbuf();
  QG_CHECK(!in.bad(), "cannot read tokenizer model ", file.string());
  return bytes.str();
}

std::unique_ptr<sentencepiece::SentencePieceProcessor> parse_model(const std::string& bytes,
                                                                   const fs::path& file) {
  QG_CHECK(proto::has_top_level_field(bytes, proto::kModelNormalizerSpec), file.string(),
           ": not a complete sentencepiece model (truncated, or no normalizer_spec)");
  auto sp = std::make_unique<sentencepiece::SentencePieceProcessor>();
  const auto status = sp->LoadFromSerializedProto(bytes);
  QG_CHECK(status.ok(), file.string(), ": not a sentencepiece model (", status.ToString(), ")");
  QG_CHECK(sp->GetPieceSize() > 0, file.string(), ": sentencepiece model has no pieces");
  return sp;
}

bool has_piece(const sentencepiece::SentencePieceProcessor& sp, std::string_view piece) {
  const int id = sp.PieceToId(piece);
  return id >= 0 && sp.IdToPiece(id) == piece;
}

// Appends what a first-release model lacks, in the release's order (see the header), and
// reports whether anything was appended.
bool complete_model(const sentencepiece::SentencePieceProcessor& sp, std::string& model) {
  using proto::PieceType;
  const std::size_t original_size = model.size();
  auto append_missing = [&](std::string_view piece, PieceType type) {
    if (!has_piece(sp, piece)) proto::append_piece(model, piece, type);
  };
  for (std::string_view special : kSpecialPieces) append_missing(special, PieceType::kControl);
  append_missing(kTabPiece, PieceType::kUserDefined);
  for (int k = 2; k <= kMaxBlank; ++k) append_missing(blank_piece(k), PieceType::kUserDefined);
  bool bytes_appended = false;
  for (int b = 0; b < 256; ++b) {
    const std::string name = proto::byte_piece_name(static_cast<unsigned char>(b));
    if (!has_piece(sp, name)) {
      proto::append_piece(model, name, PieceType::kByte);
      bytes_appended = true;
    }
  }
  if (bytes_appended) proto::append_byte_fallback(model);
  append_missing(kNewlinePiece, PieceType::kUserDefined);
  return model.size() != original_size;
}

int read_num_image_tokens(const fs::path& config_file) {
  if (!fs::exists(config_file)) return kDefaultImageTokens;
  const auto doc = json::Document::load(config_file);
  const auto root = json::as_object(doc.root(), doc.origin(), "tokenizer config");
  const auto value = json::optional_int(root, "num_image_tokens", doc.origin());
  if (!value) return kDefaultImageTokens;
  QG_CHECK(*value >= 0 && *value <= (1 << 30), doc.origin(),
           ": num_image_tokens must be in [0, 2^30], got ", *value);
  return static_cast<int>(*value);
}

}  // namespace

struct ChatGlmTokenizer::Impl {
  std::unique_ptr<sentencepiece::SentencePieceProcessor> sp;
  int num_image_tokens = 0;
  int appended_pieces = 0;
};

ChatGlmTokenizer::ChatGlmTokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
ChatGlmTokenizer::ChatGlmTokenizer(ChatGlmTokenizer&&) noexcept = default;
ChatGlmTokenizer& ChatGlmTokenizer::operator=(ChatGlmTokenizer&&) noexcept = default;
ChatGlmTokenizer::~ChatGlmTokenizer() = default;

ChatGlmTokenizer ChatGlmTokenizer::load(const fs::path& dir_or_model_file) {
  const bool is_dir = fs::is_directory(dir_or_model_file);
  const fs::path model_file = is_dir ? dir_or_model_file / "ice_text.model" : dir_or_model_file;
  const fs::path config_dir = is_dir ? dir_or_model_file : dir_or_model_file.parent_path();
  // Read the model first so a wrong path is reported as a missing model, not a config issue.
  std::string model = read_model_file(model_file);
  const int offset = read_num_image_tokens(config_dir / "tokenizer_config.json");
  return from_model_bytes(std::move(model), model_file, offset);
}

ChatGlmTokenizer ChatGlmTokenizer::load(const fs::path& model_file, int num_image_tokens) {
  QG_CHECK(num_image_tokens >= 0, "num_image_tokens must be >= 0, got ", num_image_tokens);
  return from_model_bytes(read_model_file(model_file), model_file, num_image_tokens);
}

ChatGlmTokenizer ChatGlmTokenizer::from_model_bytes(std::string model, const fs::path& origin,
                                                    int num_image_tokens) {
  auto impl = std::make_unique<Impl>();
  impl->num_image_tokens = num_image_tokens;
  impl->sp = parse_model(model, origin);
  const int original_pieces = impl->sp->GetPieceSize();
  if (complete_model(*impl->sp, model)) impl->sp = parse_model(model, origin);
  impl->appended_pieces = impl->sp->GetPieceSize() - original_pieces;
  return ChatGlmTokenizer(std::move(impl));
}

std::vector<int> ChatGlmTokenizer::encode(std::string_view text) const {
  std::vector<int> ids;
  const auto status = impl_->sp->Encode(glm_preprocess(text), &ids);
  QG_CHECK(status.ok(), "tokenizer: sentencepiece encode failed (", status.ToString(), ")");
  for (int& id : ids) id += impl_->num_image_tokens;
  return ids;
}

std::string ChatGlmTokenizer::decode(const std::vector<int>& ids) const {
  std::vector<int> text_ids;
  text_ids.reserve(ids.size());
  const int pieces = impl_->sp->GetPieceSize();
  for (int id : ids) {
    const int text_id = id - impl_->num_image_tokens;
    if (text_id < 0) continue;  // image tokens and negative ids, dropped as the HF tokenizer does
    QG_CHECK(text_id < pieces, "tokenizer: token id ", id, " is out of range (vocab size ",
             vocab_size(), ")");
    text_ids.push_back(text_id);
  }
  std::string text;
  const auto status = impl_->sp->Decode(text_ids, &text);
  QG_CHECK(status.ok(), "tokenizer: sentencepiece decode failed (", status.ToString(), ")");
  return glm_postprocess(text);
}

int ChatGlmTokenizer::token_id(std::string_view piece) const {
  // "<image_N>" names image token N, as in the HF tokenizer.
  if (piece.size() > kImagePrefix.size() + 1 &&
      piece.substr(0, kImagePrefix.size()) == kImagePrefix && piece.back() == '>') {
    const std::string_view digits =
        piece.substr(kImagePrefix.size(), piece.size() - kImagePrefix.size() - 1);
    if (digits.size() <= 9 && digits.find_first_not_of("0123456789") == std::string_view::npos) {
      const int n = std::stoi(std::string(digits));
      QG_CHECK(n < impl_->num_image_tokens, "tokenizer: no piece ", piece, " (",
               impl_->num_image_tokens, " image tokens)");
      return n;
    }
  }
  QG_CHECK(has_piece(*impl_->sp, piece), "tokenizer: no piece \"", piece, "\" in the vocabulary");
  return impl_->sp->PieceToId(piece) + impl_->num_image_tokens;
}

std::string ChatGlmTokenizer::piece(int id) const {
  QG_CHECK(id >= 0 && id < vocab_size(), "tokenizer: token id ", id,
           " is out of range (vocab size ", vocab_size(), ")");
  if (id < impl_->num_image_tokens) return std::string(kImagePrefix) + std::to_string(id) + ">";
  return impl_->sp->IdToPiece(id - impl_->num_image_tokens);
}

int ChatGlmTokenizer::vocab_size() const {
  return impl_->num_image_tokens + impl_->sp->GetPieceSize();
}

int ChatGlmTokenizer::num_image_tokens() const { return impl_->num_image_tokens; }

int ChatGlmTokenizer::appended_pieces() const { return impl_->appended_pieces; }

}  // namespace qg::text
