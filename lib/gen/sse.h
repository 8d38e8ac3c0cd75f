// Incremental splitter for server-sent events (text/event-stream): bytes arrive in arbitrary
// pieces (mid-line, mid-UTF-8 character); complete events come out as their data payloads.
#pragma once

#include <string>
#include <string_view>
#include <vector>

namespace qg::gen {

/// Splits an SSE byte stream into events. Only `data:` fields matter for chat completions;
/// comments (":...") and other fields are ignored, multi-line data is joined with '\n'.
class SseSplitter {
 public:
  /// Consumes `bytes` and returns the data of every event completed by them.
  std::vector<std::string> feed(std::string_view bytes);
  /// Ends the stream: returns the last event if the stream stopped without a blank line.
  std::vector<std::string> finish();

 private:
  void line(std::string_view text, std::vector<std::string>& out);
  std::string pending_;  // bytes of an unfinished line
  std::string data_;     // data of the event being assembled
  bool has_data_ = false;
};

}  // namespace qg::gen
