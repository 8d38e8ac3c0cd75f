// Passage loading and sentence-boundary splitting (see passages.h).
#include "qinggeng/gen/passages.h"

#include <algorithm>
#include <fstream>
#include <sstream>

#include "gen/jsonl_reader.h"
#include "gen/utf8.h"
#include "io/json.h"
#include "qinggeng/error.h"
#include "qinggeng/gen/text_cleanup.h"

namespace qg::gen {

namespace {

bool is_terminator(char32_t c) {
  return c == U'。' || c == U'！' || c == U'？' || c == U'；' || c == U'…' || c == '\n';
}

bool is_closer(char32_t c) {
  static const std::u32string closers = U"”’」』）)]】\"'";
  return closers.find(c) != std::u32string::npos;
}

bool is_ascii_alnum(char32_t c) {
  return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z');
}

// Characters of a number-with-unit run ("3.5mg", "120/80mmHg", "37.5℃", "10%"): a cut between
// two of them, or right after a digit ("5|毫克"), would damage a value.
bool in_value_run(char32_t c) {
  static const std::u32string extra = U"./%‰°℃μ×·~-+:_,";
  return is_ascii_alnum(c) || extra.find(c) != std::u32string::npos;
}

bool is_digit(char32_t c) { return c >= '0' && c <= '9'; }

bool is_space(char32_t c) { return c == ' ' || c == '\t' || c == '\r' || c == 0x3000; }

// End offsets (exclusive) of the sentences of `t`.
std::vector<std::size_t> sentence_ends(const std::u32string& t) {
  std::vector<std::size_t> ends;
  for (std::size_t i = 0; i < t.size(); ++i) {
    char32_t c = t[i];
    bool end = is_terminator(c);
    if (c == '.' || c == '!' || c == '?') {
      // ASCII: only before whitespace, the end, or CJK text ("3.5" and "e.g" are not ends).
      end = i + 1 == t.size() || is_space(t[i + 1]) || t[i + 1] == '\n' ||
            utf8::is_cjk_ideograph(t[i + 1]);
    }
    if (!end) continue;
    while (i + 1 < t.size() && (t[i + 1] == c || is_closer(t[i + 1]))) ++i;  // "……", "。”"
    ends.push_back(i + 1);
  }
  if (ends.empty() || ends.back() != t.size()) ends.push_back(t.size());
  return ends;
}

// Visible length: code points that are not whitespace.
std::size_t visible_length(std::u32string_view s) {
  return static_cast<std::size_t>(std::count_if(s.begin(), s.end(), [](char32_t c) {
    return !is_space(c) && c != '\n';
  }));
}

// Cuts an over-long sentence into pieces of at most `limit` code points at safe points.
std::vector<std::u32string_view> hard_split(std::u32string_view s, std::size_t limit) {
  std::vector<std::u32string_view> pieces;
  while (s.size() > limit) {
    std::size_t cut = 0, soft = 0;
    for (std::size_t i = 1; i <= limit; ++i) {
      char32_t a = s[i - 1], b = s[i];
      bool safe = !is_digit(a) && !(in_value_run(a) && in_value_run(b));
      if (!safe) continue;
      cut = i;
      static const std::u32string soft_breaks = U"，、：,: \t";
      if (i >= limit / 2 && soft_breaks.find(a) != std::u32string::npos) soft = i;
    }
    std::size_t at = soft ? soft : (cut ? cut : limit);
    pieces.push_back(s.substr(0, at));
    s.remove_prefix(at);
  }
  if (!s.empty()) pieces.push_back(s);
  return pieces;
}

std::string read_text_file(const std::filesystem::path& file) {
  std::ifstream in(file, std::ios::binary);
  QG_CHECK(in, file.string(), ": cannot open file");
  std::ostringstream buf;
  buf << in.rdbuf();
  std::string text = buf.str();
  if (text.compare(0, 3, "\xEF\xBB\xBF") == 0) text.erase(0, 3);
  std::size_t bad = utf8::first_invalid(text);
  QG_CHECK(bad == std::string::npos, file.string(), ": not valid UTF-8 (first bad byte at offset ",
           bad, "); convert the file to UTF-8 first");
  return text;
}

void add_passage(std::vector<Passage>& out, const std::string& source, std::size_t index,
                 std::string_view text, const std::string& origin) {
  std::size_t bad = utf8::first_invalid(text);
  QG_CHECK(bad == std::string::npos, origin, ": passage text is not valid UTF-8");
  std::string clean = normalize_whitespace(text);
  if (!clean.empty()) out.push_back({source + "#" + std::to_string(index), std::move(clean)});
}

}  // namespace

std::vector<std::string> split_passages(std::string_view text, const SplitOptions& o) {
  QG_CHECK(o.target_chars >= 1 && o.max_chars >= o.target_chars,
           "passage splitting: need 1 <= target (", o.target_chars, ") <= max (", o.max_chars,
           ")");
  std::u32string t = utf8::decode_all(text);
  std::vector<std::string> passages;
  std::vector<std::size_t> lengths;
  std::u32string current;
  std::size_t current_len = 0;
  auto flush = [&] {
    std::string p = normalize_whitespace(utf8::encode_all(current));
    if (!p.empty()) {
      passages.push_back(std::move(p));
      lengths.push_back(current_len);
    }
    current.clear();
    current_len = 0;
  };
  auto add = [&](std::u32string_view sentence) {
    std::size_t len = visible_length(sentence);
    if (len == 0) {
      current += sentence;
      return;
    }
    bool over_target = current_len + len > o.target_chars && current_len >= o.min_chars;
    bool over_max = current_len + len > o.max_chars;
    if (current_len > 0 && (over_target || over_max)) flush();
    current += sentence;
    current_len += len;
  };
  std::size_t begin = 0;
  for (std::size_t end : sentence_ends(t)) {
    std::u32string_view sentence(t.data() + begin, end - begin);
    begin = end;
    if (visible_length(sentence) > o.max_chars) {
      for (auto piece : hard_split(sentence, o.target_chars)) add(piece);
    } else {
      add(sentence);
    }
  }
  // A short tail joins the previous passage when that stays within the hard limit.
  if (current_len > 0 && current_len < o.min_chars && !passages.empty() &&
      lengths.back() + current_len <= o.max_chars) {
    std::string tail = normalize_whitespace(utf8::encode_all(current));
    passages.back() += (passages.back().empty() ? "" : "\n") + tail;
    current.clear();
    current_len = 0;
  }
  flush();
  return passages;
}

std::vector<Passage> load_passages(const std::filesystem::path& path, const SplitOptions& o,
                                   const std::string& text_field) {
  namespace fs = std::filesystem;
  std::vector<Passage> out;
  auto split_file = [&](const fs::path& file, const std::string& source) {
    std::string text = read_text_file(file);
    auto pieces = split_passages(text, o);
    for (std::size_t i = 0; i < pieces.size(); ++i) add_passage(out, source, i, pieces[i], source);
  };
  std::error_code ec;
  QG_CHECK(fs::exists(path, ec), path.string(), ": passages path does not exist");
  if (fs::is_directory(path)) {
    std::vector<fs::path> files;
    for (const auto& e : fs::recursive_directory_iterator(path)) {
      if (e.is_regular_file() && e.path().extension() == ".txt") files.push_back(e.path());
    }
    std::sort(files.begin(), files.end());
    QG_CHECK(!files.empty(), path.string(), ": directory holds no .txt file");
    for (const auto& f : files) split_file(f, fs::relative(f, path).generic_string());
  } else if (path.extension() == ".txt") {
    split_file(path, path.filename().string());
  } else if (path.extension() == ".jsonl") {
    std::size_t index = 0;
    std::string source = path.filename().string();
    for_each_jsonl_object(path, [&](simdjson::dom::object obj, const std::string& origin) {
      add_passage(out, source, index++, json::get_string(obj, text_field, origin), origin);
    });
  } else {
    json::Document doc = json::Document::load(path);
    simdjson::dom::array items;
    QG_CHECK(!doc.root().get(items), path.string(),
             ": passages must be a JSON array of strings (or use .jsonl / .txt)");
    std::size_t index = 0;
    std::string source = path.filename().string();
    for (simdjson::dom::element e : items) {
      std::string origin = path.string() + ": element " + std::to_string(index);
      std::string_view direct;
      std::string text = e.get(direct) ? json::get_string(json::as_object(e, origin, "element"),
                                                          text_field, origin)
                                       : std::string(direct);
      add_passage(out, source, index++, text, origin);
    }
  }
  QG_CHECK(!out.empty(), path.string(), ": no passages (all entries are empty)");
  return out;
}

}  // namespace qg::gen
