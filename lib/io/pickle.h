// A minimal, safe pickle interpreter for the data.pkl of torch.save archives. It builds a tree
// of plain values and never calls anything: GLOBAL yields a name, REDUCE a (callable, args)
// record and BINPERSID a persistent-id record, which the torch reader then interprets. Only
// the opcodes torch emits (protocols 2-4) are accepted; any other opcode, a malformed stream or
// an out-of-range memo index is a qg::Error. Internal to the library.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qg::io::pickle {

/// Index of a value in a Program's value table.
using ValueId = std::uint32_t;

/// One pickled value; what the fields mean depends on `kind`.
struct Value {
  enum class Kind {
    None,
    Bool,
    Int,
    Float,
    String,
    Bytes,
    Tuple,
    List,
    Dict,
    Global,
    Reduce,
    PersistentId
  };
  Kind kind = Kind::None;
  std::int64_t i = 0;          ///< Int, Bool (0/1)
  double f = 0;                ///< Float
  std::string s;               ///< String, Bytes; Global: "module.name"
  std::vector<ValueId> items;  ///< Tuple, List; Dict: key, value, key, value, ...
                               ///< Reduce: callable, args; PersistentId: the pid
};

/// The values built by one pickle stream; all references are indices into `values`, so
/// self-referencing input cannot create ownership cycles.
struct Program {
  std::vector<Value> values;
  ValueId root = 0;

  const Value& at(ValueId id) const { return values[id]; }
};

/// Runs the pickle stream [data, data + size); `origin` names it in errors.
Program run(const std::byte* data, std::size_t size, const std::string& origin);

/// Human-readable kind name ("dict", "tuple", ...) for error messages.
const char* kind_name(Value::Kind kind);

}  // namespace qg::io::pickle
