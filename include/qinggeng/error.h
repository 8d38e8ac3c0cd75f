// The one error type of qinggeng. Every failure a user can cause (a missing file, a corrupt
// header, a wrong tensor shape, a bad flag) is reported by throwing qg::Error with a message
// that names the file, tensor or field involved. Internal invariants use the same type.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace qg {

/// \brief Exception carrying a human-readable message (file / tensor / field named in it).
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {
template <typename... Parts>
std::string concat(Parts&&... parts) {
  std::ostringstream out;
  (out << ... << std::forward<Parts>(parts));
  return out.str();
}
}  // namespace detail

/// \brief Throws qg::Error whose message is the concatenation of `parts` (streamed).
template <typename... Parts>
[[noreturn]] void fail(Parts&&... parts) {
  throw Error(detail::concat(std::forward<Parts>(parts)...));
}

}  // namespace qg

/// Throws qg::Error with the streamed message parts when `cond` is false.
#define QG_CHECK(cond, ...)                  \
  do {                                       \
    if (!(cond)) ::qg::fail(__VA_ARGS__);    \
  } while (0)
