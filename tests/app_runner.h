// Test support for the app tests: runs a binary from build/bin as a user would and captures
// what it prints and how it exits.
#pragma once

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <filesystem>
#include <string>

#include "catch.hpp"

namespace qg::test {

struct RunResult {
  int exit_code = -1;
  std::string output;  // stdout and stderr together
};

/// Runs `prefix` + build/bin/`args` through the shell (stderr merged into stdout).
inline RunResult run_app(const std::string& args, const std::string& prefix = "") {
  const std::string cmd = prefix + std::string(QG_BINARY_DIR) + "/bin/" + args + " 2>&1";
  RunResult r;
  FILE* pipe = popen(cmd.c_str(), "r");
  REQUIRE(pipe != nullptr);
  std::array<char, 4096> buf;
  while (std::fgets(buf.data(), static_cast<int>(buf.size()), pipe)) r.output += buf.data();
  const int status = pclose(pipe);
  r.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

/// A path quoted for the shell.
inline std::string quoted(const std::filesystem::path& p) { return "'" + p.string() + "'"; }

}  // namespace qg::test
