// Tests of .npy reading and writing: round trips, byte-identical output to numpy's own files
// (the committed golden logits), format versions 1 and 2, and malformed files.
#include "catch.hpp"
#include "error_message.h"
#include "qinggeng/io/npy.h"
#include "scratch_dir.h"

using namespace qg::test;

namespace {
// A .npy file with the given version and header dict text followed by `data`.
std::string npy_file(int major, std::string dict, const std::string& data) {
  const std::size_t len_bytes = major == 1 ? 2 : 4;
  while ((6 + 2 + len_bytes + dict.size() + 1) % 64 != 0) dict += ' ';
  dict += '\n';
  std::string out = "\x93NUMPY";
  out += static_cast<char>(major);
  out += '\0';
  for (std::size_t i = 0; i < len_bytes; ++i)
    out += static_cast<char>((dict.size() >> (8 * i)) & 0xff);
  return out + dict + data;
}
}  // namespace

TEST_CASE("npy round trip for several ranks") {
  const auto dir = scratch_dir("npy_roundtrip");
  const std::vector<std::vector<std::int64_t>> shapes = {{2, 3}, {5}, {}, {0, 4}, {1, 2, 1, 3}};
  for (const auto& shape : shapes) {
    std::size_t n = 1;
    for (auto d : shape) n *= static_cast<std::size_t>(d);
    std::vector<float> data(n);
    for (std::size_t i = 0; i < n; ++i) data[i] = 0.25f * static_cast<float>(i) - 1.0f;
    const auto path = dir / "a.npy";
    qg::io::write_npy_f32(path, data.data(), shape);
    const std::string bytes = read_bytes(path);
    CHECK((bytes.size() - n * 4) % 64 == 0);
    CHECK(bytes[bytes.size() - n * 4 - 1] == '\n');
    const auto back = qg::io::read_npy_f32(path);
    CHECK(back.shape == shape);
    CHECK(back.data == data);
  }
  CHECK(mentions(read_bytes(dir / "a.npy"), "'shape': (1, 2, 1, 3), }"));
  qg::io::write_npy_f32(dir / "b.npy", nullptr, {0});
  CHECK(mentions(read_bytes(dir / "b.npy"), "'shape': (0,), }"));
}

TEST_CASE("golden .npy files made by numpy read with the expected shapes") {
  const std::vector<std::pair<std::string, std::vector<std::int64_t>>> golden = {
      {"torch_tiny/golden_answer.npy", {10, 160}},
      {"torch_tiny/golden_prompt.npy", {6, 160}},
      {"torch_tiny/golden_mask.npy", {7, 160}},
      {"torch_tiny/golden_plain.npy", {5, 160}},
      {"torch_tiny_bf16/golden_answer.npy", {10, 160}}};
  const auto dir = scratch_dir("npy_golden");
  for (const auto& [file, shape] : golden) {
    INFO(file);
    const auto array = qg::io::read_npy_f32(fixture(file));
    CHECK(array.shape == shape);
    REQUIRE(array.data.size() == static_cast<std::size_t>(shape[0] * shape[1]));
    // Our writer reproduces numpy's bytes exactly.
    qg::io::write_npy_f32(dir / "copy.npy", array.data.data(), array.shape);
    CHECK(read_bytes(dir / "copy.npy") == read_bytes(fixture(file)));
  }
}

TEST_CASE("npy reader: versions and malformed files") {
  const auto dir = scratch_dir("npy_errors");
  const auto path = dir / "x.npy";
  const std::string two(8, '\0');
  auto error_for = [&](const std::string& bytes) {
    write_bytes(path, bytes);
    return error_message([&] { qg::io::read_npy_f32(path); });
  };
  const std::string dict = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";

  write_bytes(path, npy_file(2, dict, two));
  CHECK(qg::io::read_npy_f32(path).shape == std::vector<std::int64_t>{2});
  write_bytes(path, npy_file(1, "{'shape': (1, 2), 'fortran_order': False, 'descr': '<f4'}", two));
  CHECK(qg::io::read_npy_f32(path).shape == std::vector<std::int64_t>{1, 2});

  CHECK(mentions(error_for("PK\x03\x04 not npy at all"), "magic"));
  CHECK(mentions(
      error_for(npy_file(1, "{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", two)),
      "'<f8'"));
  CHECK(mentions(
      error_for(npy_file(1, "{'descr': '<f4', 'fortran_order': True, 'shape': (2,), }", two)),
      "Fortran"));
  CHECK(mentions(error_for(npy_file(1, dict, two.substr(0, 7))), "bytes"));
  CHECK(
      mentions(error_for(npy_file(1, "{'descr': '<f4', 'fortran_order': False}", two)), "'shape'"));
  CHECK(mentions(
      error_for(npy_file(1, "{'descr': '<f4', 'fortran_order': False, 'shape': (a,)}", two)),
      "shape"));
  CHECK(mentions(error_for(npy_file(7, dict, two)), "version"));
  const std::string full = npy_file(1, dict, two);
  for (std::size_t cut = 0; cut < full.size(); ++cut) {
    INFO("truncated at " << cut);
    CHECK(mentions(error_for(full.substr(0, cut)), path.string()));
  }
  CHECK(mentions(error_message([&] { qg::io::read_npy_f32(dir / "missing.npy"); }), "missing.npy"));
}
