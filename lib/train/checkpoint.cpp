// Resumable training checkpoints: tensors through io::write_safetensors / WeightStore, a JSON
// manifest, and directory-level write-then-rename (checkpoint.h).
#include "qinggeng/train/checkpoint.h"

#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "io/atomic_file.h"
#include "io/json.h"
#include "qinggeng/error.h"
#include "qinggeng/io/safetensors.h"
#include "qinggeng/io/weight_store.h"

namespace qg::train {
namespace fs = std::filesystem;
namespace {

constexpr const char* kFormat = "qinggeng-train-state";
constexpr std::int64_t kVersion = 1;
constexpr const char* kManifest = "train_state.json";
constexpr const char* kTensors = "train_state.safetensors";
constexpr const char* kDirPrefix = "checkpoint-";
// Temporary and replaced directories start with this, so listing never mistakes them for
// checkpoints and the next save can delete what a crash left behind.
constexpr const char* kScratchPrefix = ".checkpoint-";

/// FNV-1a 64 of a file's bytes: cheap, and catches bit rot the size check cannot.
std::uint64_t file_hash(const fs::path& file) {
  std::ifstream in(file, std::ios::binary);
  QG_CHECK(in, file.string(), ": cannot open file");
  std::uint64_t h = 0xcbf29ce484222325ull;
  std::vector<char> buf(1 << 16);
  while (in) {
    in.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    for (std::streamsize i = 0; i < in.gcount(); ++i) {
      h ^= static_cast<unsigned char>(buf[static_cast<std::size_t>(i)]);
      h *= 0x100000001b3ull;
    }
  }
  return h;
}

std::string to_hex(const std::string& bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char c : bytes) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

std::string from_hex(const std::string& hex, const std::string& origin) {
  const auto nibble = [&](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    fail(origin, ": field \"data_position\" is not lower-case hex");
  };
  QG_CHECK(hex.size() % 2 == 0, origin, ": field \"data_position\" has an odd number of digits");
  std::string out(hex.size() / 2, '\0');
  for (std::size_t i = 0; i < out.size(); ++i) {
    out[i] = static_cast<char>(nibble(hex[2 * i]) * 16 + nibble(hex[2 * i + 1]));
  }
  return out;
}

std::string u64_hex(std::uint64_t v) {
  char buf[20];
  std::snprintf(buf, sizeof buf, "%016llx", static_cast<unsigned long long>(v));
  return buf;
}

std::string manifest_json(const TrainState& s, const Optimizer& opt, std::uint64_t tensor_bytes,
                          std::uint64_t tensor_hash) {
  const OptimizerConfig& c = opt.config();
  std::ostringstream o;
  o << "{\n  \"format\": " << json::quote(kFormat) << ",\n  \"version\": " << kVersion
    << ",\n  \"step\": " << s.step << ",\n  \"epoch\": " << s.epoch
    << ",\n  \"data_position\": " << json::quote(to_hex(s.data_position))
    << ",\n  \"rng\": " << json::quote(s.rng)
    << ",\n  \"best_eval_loss\": " << json::number(s.best_eval_loss)
    << ",\n  \"loss_scaler\": {\"scale\": " << json::number(s.loss_scaler.scale)
    << ", \"clean_steps\": " << s.loss_scaler.clean_steps
    << ", \"skipped_steps\": " << s.loss_scaler.skipped_steps << "}"
    << ",\n  \"schedule\": {\"peak_lr\": " << json::number(s.schedule.peak_lr)
    << ", \"warmup_steps\": " << s.schedule.warmup_steps
    << ", \"total_steps\": " << s.schedule.total_steps
    << ", \"decay\": " << json::quote(decay_kind_name(s.schedule.decay))
    << ", \"min_ratio\": " << json::number(s.schedule.min_ratio) << "}"
    << ",\n  \"optimizer\": {\"kind\": " << json::quote(optimizer_kind_name(c.kind))
    << ", \"steps\": " << opt.steps() << ", \"beta1\": " << json::number(c.beta1)
    << ", \"beta2\": " << json::number(c.beta2) << ", \"eps\": " << json::number(c.eps)
    << ", \"weight_decay\": " << json::number(c.weight_decay) << "}"
    << ",\n  \"tensors\": {\"file\": " << json::quote(kTensors) << ", \"bytes\": " << tensor_bytes
    << ", \"fnv1a64\": " << json::quote(u64_hex(tensor_hash)) << "}"
    << ",\n  \"params\": [";
  for (std::size_t i = 0; i < opt.params().size(); ++i) {
    const ParamRef& p = opt.params()[i];
    o << (i ? ",\n    " : "\n    ") << "{\"name\": " << json::quote(p.name)
      << ", \"numel\": " << p.n << ", \"decay\": " << (p.decay ? "true" : "false") << "}";
  }
  o << "\n  ]\n}\n";
  return o.str();
}

/// The object under `key` of `o`; `origin` names the file in errors.
simdjson::dom::object sub_object(simdjson::dom::object o, const char* key,
                                 const std::string& origin) {
  simdjson::dom::element e;
  QG_CHECK(!o[key].get(e), origin, ": missing field \"", key, "\"");
  return json::as_object(e, origin, std::string("field \"") + key + "\"");
}

/// The step of a "checkpoint-<digits>" name, or -1.
std::int64_t step_of(const std::string& name) {
  const std::string prefix = kDirPrefix;
  if (name.size() <= prefix.size() || name.compare(0, prefix.size(), prefix) != 0) return -1;
  const std::string digits = name.substr(prefix.size());
  if (digits.size() > 18 || !std::all_of(digits.begin(), digits.end(),
                                         [](unsigned char c) { return std::isdigit(c) != 0; }))
    return -1;
  return std::stoll(digits);
}

void remove_scratch_dirs(const fs::path& root) {
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    if (entry.path().filename().string().rfind(kScratchPrefix, 0) == 0) {
      fs::remove_all(entry.path(), ec);
    }
  }
}

void check_fs(const std::error_code& ec, const fs::path& path, const char* what) {
  if (ec) fail(path.string(), ": cannot ", what, " (", ec.message(), ")");
}

}  // namespace

std::string rng_to_string(const std::mt19937_64& rng) {
  std::ostringstream out;
  out << rng;
  return out.str();
}

std::mt19937_64 rng_from_string(const std::string& text, const std::string& origin) {
  std::istringstream in(text);
  std::mt19937_64 rng;
  in >> rng;
  QG_CHECK(!in.fail(), origin, ": field \"rng\" is not a complete mt19937_64 state");
  in >> std::ws;
  QG_CHECK(in.eof(), origin, ": field \"rng\" has trailing text after the generator state");
  return rng;
}

std::string checkpoint_dir_name(std::int64_t step) {
  char buf[40];
  std::snprintf(buf, sizeof buf, "%s%08lld", kDirPrefix, static_cast<long long>(step));
  return buf;
}

fs::path save_checkpoint(const fs::path& root, const TrainState& state, Optimizer& optimizer,
                         int keep_last) {
  QG_CHECK(state.step >= 0, root.string(), ": cannot save a checkpoint of step ", state.step);
  std::error_code ec;
  fs::create_directories(root, ec);
  check_fs(ec, root, "create the checkpoint directory");
  const std::string name = checkpoint_dir_name(state.step);
  const std::string pid = std::to_string(::getpid());
  const fs::path tmp =
      root / (kScratchPrefix + name.substr(std::strlen(kDirPrefix)) + ".tmp." + pid);
  fs::remove_all(tmp, ec);
  fs::create_directory(tmp, ec);
  check_fs(ec, tmp, "create the temporary checkpoint directory");

  std::vector<io::TensorToWrite> tensors;
  for (const ParamRef& p : optimizer.params()) {
    tensors.push_back({p.name, DType::F32, {static_cast<std::int64_t>(p.n)}, p.value});
  }
  for (const OptimizerSlot& s : optimizer.slots()) {
    const auto n = static_cast<std::int64_t>(optimizer.params()[s.param].n);
    tensors.push_back({s.name, DType::F32, {n}, s.data});
  }
  const fs::path tensor_file = tmp / kTensors;
  io::write_safetensors(tensor_file, tensors, {{"format", "pt"}});
  const std::uint64_t bytes = fs::file_size(tensor_file);
  io::write_file_atomic(tmp / kManifest,
                        manifest_json(state, optimizer, bytes, file_hash(tensor_file)));

  // Swap the finished directory in; an existing one of the same step is moved aside first
  // because rename cannot replace a non-empty directory.
  const fs::path final_dir = root / name;
  const fs::path old =
      root / (kScratchPrefix + name.substr(std::strlen(kDirPrefix)) + ".old." + pid);
  if (fs::exists(final_dir)) {
    fs::remove_all(old, ec);
    fs::rename(final_dir, old, ec);
    check_fs(ec, final_dir, "move the previous checkpoint of this step aside");
  }
  fs::rename(tmp, final_dir, ec);
  if (ec) {
    std::error_code ignored;
    if (fs::exists(old, ignored)) fs::rename(old, final_dir, ignored);
    check_fs(ec, final_dir, "rename the finished checkpoint into place");
  }
  remove_scratch_dirs(root);

  if (keep_last > 0) {
    auto all = list_checkpoints(root);
    for (std::size_t i = 0; i + static_cast<std::size_t>(keep_last) < all.size(); ++i) {
      fs::remove_all(all[i], ec);
    }
  }
  return final_dir;
}

void load_checkpoint(const fs::path& dir, TrainState& state, Optimizer& optimizer) {
  const fs::path manifest = dir / kManifest;
  QG_CHECK(fs::is_regular_file(manifest), manifest.string(),
           ": no training-state manifest (not a complete checkpoint)");
  const std::string origin = manifest.string();
  const auto doc = json::Document::load(manifest);
  const auto o = json::as_object(doc.root(), origin, "the manifest");
  const std::string format = json::get_string(o, "format", origin);
  QG_CHECK(format == kFormat, origin, ": field \"format\" is \"", format, "\", expected \"",
           kFormat, "\"");
  const std::int64_t version = json::get_int(o, "version", origin);
  QG_CHECK(version == kVersion, origin, ": field \"version\" is ", version,
           "; this build reads version ", kVersion);

  TrainState s;
  s.step = json::get_int(o, "step", origin);
  s.epoch = json::get_int(o, "epoch", origin);
  s.data_position = from_hex(json::get_string(o, "data_position", origin), origin);
  s.rng = json::get_string(o, "rng", origin);
  if (!s.rng.empty()) rng_from_string(s.rng, origin);
  s.best_eval_loss = json::optional_number(o, "best_eval_loss", origin)
                         .value_or(std::numeric_limits<double>::infinity());

  const std::string scaler_origin = origin + " [loss_scaler]";
  const auto ls = sub_object(o, "loss_scaler", origin);
  s.loss_scaler.scale = static_cast<float>(json::get_number(ls, "scale", scaler_origin));
  s.loss_scaler.clean_steps = json::get_int(ls, "clean_steps", scaler_origin);
  s.loss_scaler.skipped_steps = json::get_int(ls, "skipped_steps", scaler_origin);
  QG_CHECK(s.loss_scaler.scale > 0, scaler_origin, ": field \"scale\" must be positive");

  const std::string schedule_origin = origin + " [schedule]";
  const auto sc = sub_object(o, "schedule", origin);
  s.schedule.peak_lr = json::get_number(sc, "peak_lr", schedule_origin);
  s.schedule.warmup_steps = json::get_int(sc, "warmup_steps", schedule_origin);
  s.schedule.total_steps = json::get_int(sc, "total_steps", schedule_origin);
  s.schedule.decay = parse_decay_kind(json::get_string(sc, "decay", schedule_origin),
                                      schedule_origin + " field \"decay\"");
  s.schedule.min_ratio = json::get_number(sc, "min_ratio", schedule_origin);

  const std::string opt_origin = origin + " [optimizer]";
  const auto op = sub_object(o, "optimizer", origin);
  const OptimizerKind kind = parse_optimizer_kind(json::get_string(op, "kind", opt_origin),
                                                  opt_origin + " field \"kind\"");
  QG_CHECK(kind == optimizer.config().kind, opt_origin, ": field \"kind\" is \"",
           optimizer_kind_name(kind), "\" but the run uses ",
           optimizer_kind_name(optimizer.config().kind));
  const std::int64_t opt_steps = json::get_int(op, "steps", opt_origin);
  QG_CHECK(opt_steps >= 0, opt_origin, ": field \"steps\" must be >= 0");

  // The parameter list must be the run's, in order.
  simdjson::dom::element e;
  simdjson::dom::array list;
  QG_CHECK(!o["params"].get(e) && !e.get(list), origin, ": field \"params\" must be a list");
  const auto& params = optimizer.params();
  QG_CHECK(list.size() == params.size(), origin, ": field \"params\" lists ", list.size(),
           " parameters but the run trains ", params.size());
  std::size_t i = 0;
  for (simdjson::dom::element item : list) {
    const std::string where = origin + " [params " + std::to_string(i) + "]";
    const auto p = json::as_object(item, where, "a parameter entry");
    const std::string name = json::get_string(p, "name", where);
    const std::int64_t numel = json::get_int(p, "numel", where);
    QG_CHECK(name == params[i].name, where, ": saved parameter ", name, " but the run's is ",
             params[i].name);
    QG_CHECK(numel == static_cast<std::int64_t>(params[i].n), where, ": parameter ", name, " has ",
             numel, " elements saved but ", params[i].n, " in the run");
    ++i;
  }

  // The tensor file must be the one the manifest was written for.
  const std::string tensor_origin = origin + " [tensors]";
  const auto te = sub_object(o, "tensors", origin);
  const fs::path tensor_file = dir / json::get_string(te, "file", tensor_origin);
  QG_CHECK(fs::is_regular_file(tensor_file), tensor_file.string(), ": missing tensor file");
  const auto bytes = static_cast<std::uintmax_t>(json::get_int(te, "bytes", tensor_origin));
  const std::uintmax_t actual = fs::file_size(tensor_file);
  QG_CHECK(actual == bytes, tensor_file.string(), ": ", actual,
           " bytes but the manifest's field \"bytes\" says ", bytes, " (truncated or replaced)");
  const std::string hash = json::get_string(te, "fnv1a64", tensor_origin);
  QG_CHECK(u64_hex(file_hash(tensor_file)) == hash, tensor_file.string(),
           ": content does not match the manifest's field \"fnv1a64\" (corrupt file)");

  const io::WeightStore store = io::WeightStore::open(tensor_file);
  std::vector<std::vector<float>> values;
  for (const ParamRef& p : params) {
    values.push_back(store.read_f32(p.name, {static_cast<std::int64_t>(p.n)}));
  }
  auto slots = optimizer.slots();
  std::vector<std::vector<float>> moments;
  for (const OptimizerSlot& slot : slots) {
    moments.push_back(store.read_f32(slot.name, {static_cast<std::int64_t>(params[slot.param].n)}));
  }
  QG_CHECK(store.names().size() == values.size() + moments.size(), tensor_file.string(), ": holds ",
           store.names().size(), " tensors, expected ", values.size() + moments.size(), " for ",
           optimizer_kind_name(kind));

  // Everything validated: commit.
  for (std::size_t k = 0; k < params.size(); ++k) {
    std::copy(values[k].begin(), values[k].end(), params[k].value);
  }
  for (std::size_t k = 0; k < slots.size(); ++k) {
    std::copy(moments[k].begin(), moments[k].end(), slots[k].data);
  }
  optimizer.set_steps(opt_steps);
  state = std::move(s);
}

std::vector<fs::path> list_checkpoints(const fs::path& root) {
  std::vector<std::pair<std::int64_t, fs::path>> found;
  std::error_code ec;
  for (const auto& entry : fs::directory_iterator(root, ec)) {
    const std::int64_t step = step_of(entry.path().filename().string());
    if (step >= 0 && fs::is_regular_file(entry.path() / kManifest)) {
      found.emplace_back(step, entry.path());
    }
  }
  std::sort(found.begin(), found.end());
  std::vector<fs::path> out;
  for (auto& [step, path] : found) out.push_back(std::move(path));
  return out;
}

std::optional<fs::path> latest_checkpoint(const fs::path& root) {
  auto all = list_checkpoints(root);
  if (all.empty()) return std::nullopt;
  return all.back();
}

}  // namespace qg::train
