// Reading JSON Lines files whose lines are objects, with errors naming file and line.
#pragma once

#include <simdjson.h>

#include <cstddef>
#include <filesystem>
#include <functional>
#include <string>

namespace qg::gen {

/// Calls `fn(object, origin)` for each non-blank line of `path`, where origin is "path:line".
/// Throws qg::Error naming file and line for a line that is not a JSON object.
void for_each_jsonl_object(
    const std::filesystem::path& path,
    const std::function<void(simdjson::dom::object, const std::string& origin)>& fn);

}  // namespace qg::gen
