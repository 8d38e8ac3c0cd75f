// Test support: runs a callable that must throw qg::Error and returns the message, so tests can
// check what it names with plain string searches (portable across Catch2 v2 and v3).
#pragma once

#include <initializer_list>
#include <string>

#include "catch.hpp"
#include "qinggeng/error.h"

namespace qg::test {

/// The qg::Error message thrown by `f`, or "<no qg::Error thrown>" if it returned normally.
template <typename F>
std::string error_message(F&& f) {
  try {
    f();
  } catch (const qg::Error& e) {
    return e.what();
  }
  return "<no qg::Error thrown>";
}

/// True when `text` contains `part`.
inline bool mentions(const std::string& text, const std::string& part) {
  return text.find(part) != std::string::npos;
}

/// Checks that `message` contains each of `parts`; a failure shows the whole message.
inline void check_mentions(const std::string& message, std::initializer_list<std::string> parts) {
  for (const std::string& part : parts) {
    INFO("message: " << message << "\nshould mention: " << part);
    CHECK(mentions(message, part));
  }
}

}  // namespace qg::test
