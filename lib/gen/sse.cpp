// Server-sent-event splitting (see sse.h).
#include "gen/sse.h"

namespace qg::gen {

void SseSplitter::line(std::string_view text, std::vector<std::string>& out) {
  if (!text.empty() && text.back() == '\r') text.remove_suffix(1);
  if (text.empty()) {
    if (has_data_) out.push_back(std::move(data_));
    data_.clear();
    has_data_ = false;
    return;
  }
  if (text.front() == ':') return;
  std::string_view field = text.substr(0, text.find(':'));
  if (field != "data") return;
  std::string_view value = text.size() > 4 ? text.substr(5) : std::string_view();
  if (!value.empty() && value.front() == ' ') value.remove_prefix(1);
  if (has_data_) data_.push_back('\n');
  data_ += value;
  has_data_ = true;
}

std::vector<std::string> SseSplitter::feed(std::string_view bytes) {
  std::vector<std::string> out;
  pending_ += bytes;
  std::size_t start = 0;
  for (std::size_t nl; (nl = pending_.find('\n', start)) != std::string::npos; start = nl + 1) {
    line(std::string_view(pending_).substr(start, nl - start), out);
  }
  pending_.erase(0, start);
  return out;
}

std::vector<std::string> SseSplitter::finish() {
  std::vector<std::string> out;
  if (!pending_.empty()) line(pending_, out);
  pending_.clear();
  line("", out);
  return out;
}

}  // namespace qg::gen
