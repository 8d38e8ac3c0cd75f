// The pickle interpreter (see pickle.h). Opcode values and semantics follow CPython's
// Lib/pickletools.py; only the subset torch.save produces is implemented.
#include "io/pickle.h"

#include <cstdio>
#include <cstring>
#include <unordered_map>

#include "io/byte_reader.h"
#include "qinggeng/error.h"

namespace qg::io::pickle {

namespace {

using Kind = Value::Kind;

class Machine {
 public:
  Machine(const std::byte* data, std::size_t size, const std::string& origin)
      : in_(data, size, origin + ": data.pkl") {}

  Program run() {
    while (true) {
      QG_CHECK(!in_.at_end(), in_.origin(), ": pickle stream ends without STOP");
      op_pos_ = in_.pos();
      const std::uint8_t op = in_.u8();
      if (op == '.') break;
      step(op);
    }
    QG_CHECK(stack_.size() == 1 && marks_.empty(), in_.origin(), ": STOP with ", stack_.size(),
             " values on the stack (expected 1)");
    prog_.root = stack_.back();
    return std::move(prog_);
  }

 private:
  [[noreturn]] void bad(const std::string& what) const {
    fail(in_.origin(), ": ", what, " at offset ", op_pos_);
  }

  ValueId make(Value v) {
    if (prog_.values.size() >= 0xffffffffu) bad("too many pickle values");
    prog_.values.push_back(std::move(v));
    return static_cast<ValueId>(prog_.values.size() - 1);
  }
  ValueId make(Kind kind) {
    Value v;
    v.kind = kind;
    return make(std::move(v));
  }
  void push(ValueId id) { stack_.push_back(id); }
  void push_new(Kind kind) { push(make(kind)); }

  std::size_t floor() const { return marks_.empty() ? 0 : marks_.back(); }
  ValueId top() const {
    if (stack_.size() <= floor()) bad("pickle stack underflow");
    return stack_.back();
  }
  ValueId pop() {
    const ValueId id = top();
    stack_.pop_back();
    return id;
  }
  // Removes everything above the latest MARK (and the mark) and returns it in order.
  std::vector<ValueId> pop_mark() {
    if (marks_.empty()) bad("pickle opcode needs a MARK but none is set");
    const std::size_t start = marks_.back();
    marks_.pop_back();
    std::vector<ValueId> items(stack_.begin() + static_cast<std::ptrdiff_t>(start), stack_.end());
    stack_.resize(start);
    return items;
  }
  Value& container(ValueId id, Kind expected, const char* op) {
    Value& v = prog_.values[id];
    if (v.kind != expected) {
      bad(std::string(op) + " applied to a " + kind_name(v.kind) + ", expected a " +
          kind_name(expected));
    }
    return v;
  }

  void push_string(Kind kind, std::uint64_t len) {
    Value v;
    v.kind = kind;
    v.s = std::string(in_.take_string(len));
    push(make(std::move(v)));
  }
  void push_int(std::int64_t i) {
    Value v;
    v.kind = Kind::Int;
    v.i = i;
    push(make(std::move(v)));
  }
  void push_tuple(std::vector<ValueId> items) {
    Value v;
    v.kind = Kind::Tuple;
    v.items = std::move(items);
    push(make(std::move(v)));
  }
  void push_global(std::string module, std::string name) {
    Value v;
    v.kind = Kind::Global;
    v.s = module + "." + name;
    push(make(std::move(v)));
  }
  std::string read_line() {
    std::string line;
    while (true) {
      const char c = static_cast<char>(in_.u8());
      if (c == '\n') return line;
      line += c;
    }
  }
  void memo_put(std::uint64_t index) {
    const ValueId id = top();
    memo_[index] = id;
  }
  void memo_get(std::uint64_t index) {
    auto it = memo_.find(index);
    if (it == memo_.end()) bad("pickle memo index " + std::to_string(index) + " was never set");
    push(it->second);
  }
  void set_items(ValueId dict, const std::vector<ValueId>& kv, const char* op) {
    if (kv.size() % 2 != 0) bad(std::string(op) + " with an odd number of items");
    Value& d = container(dict, Kind::Dict, op);
    d.items.insert(d.items.end(), kv.begin(), kv.end());
  }

  void step(std::uint8_t op) {
    switch (op) {
      case 0x80: {  // PROTO
        const std::uint8_t version = in_.u8();
        if (version > 5) bad("unsupported pickle protocol " + std::to_string(version));
        return;
      }
      case 0x95: in_.skip(8); return;           // FRAME: a length hint only
      case '}': push_new(Kind::Dict); return;   // EMPTY_DICT
      case ']': push_new(Kind::List); return;   // EMPTY_LIST
      case ')': push_new(Kind::Tuple); return;  // EMPTY_TUPLE
      case 'N': push_new(Kind::None); return;
      case 0x88:
      case 0x89: {  // NEWTRUE / NEWFALSE
        Value v;
        v.kind = Kind::Bool;
        v.i = op == 0x88 ? 1 : 0;
        push(make(std::move(v)));
        return;
      }
      case '(': marks_.push_back(stack_.size()); return;        // MARK
      case 'X': push_string(Kind::String, in_.u32()); return;   // BINUNICODE
      case 0x8c: push_string(Kind::String, in_.u8()); return;   // SHORT_BINUNICODE
      case 0x8d: push_string(Kind::String, in_.u64()); return;  // BINUNICODE8
      case 'T': push_string(Kind::String, in_.u32()); return;   // BINSTRING
      case 'U': push_string(Kind::String, in_.u8()); return;    // SHORT_BINSTRING
      case 'B': push_string(Kind::Bytes, in_.u32()); return;    // BINBYTES
      case 'C': push_string(Kind::Bytes, in_.u8()); return;     // SHORT_BINBYTES
      case 0x8e: push_string(Kind::Bytes, in_.u64()); return;   // BINBYTES8
      case 'q': memo_put(in_.u8()); return;                     // BINPUT
      case 'r': memo_put(in_.u32()); return;                    // LONG_BINPUT
      case 0x94: memo_put(memo_.size()); return;                // MEMOIZE
      case 'h': memo_get(in_.u8()); return;                     // BINGET
      case 'j': memo_get(in_.u32()); return;                    // LONG_BINGET
      case 'c': {                                               // GLOBAL
        std::string module = read_line();
        push_global(std::move(module), read_line());
        return;
      }
      case 0x93: {  // STACK_GLOBAL
        const ValueId name = pop(), module = pop();
        if (prog_.at(name).kind != Kind::String || prog_.at(module).kind != Kind::String) {
          bad("STACK_GLOBAL needs two strings");
        }
        push_global(prog_.at(module).s, prog_.at(name).s);
        return;
      }
      case 'J': push_int(static_cast<std::int32_t>(in_.u32())); return;  // BININT
      case 'K': push_int(in_.u8()); return;                              // BININT1
      case 'M': push_int(in_.u16()); return;                             // BININT2
      case 0x8a: {  // LONG1: little-endian two's complement of n bytes
        const std::uint8_t n = in_.u8();
        if (n > 8) bad("integer of " + std::to_string(n) + " bytes is too large");
        const std::byte* p = in_.take(n);
        std::uint64_t u = 0;
        for (std::uint8_t k = 0; k < n; ++k) u |= static_cast<std::uint64_t>(p[k]) << (8 * k);
        if (n > 0 && n < 8 && (static_cast<std::uint8_t>(p[n - 1]) & 0x80u)) {
          u |= ~std::uint64_t{0} << (8 * n);  // sign-extend
        }
        push_int(static_cast<std::int64_t>(u));
        return;
      }
      case 'G': {  // BINFLOAT: big-endian IEEE double
        const std::byte* p = in_.take(8);
        std::uint64_t bits = 0;
        for (int k = 0; k < 8; ++k) bits = (bits << 8) | static_cast<std::uint64_t>(p[k]);
        Value v;
        v.kind = Kind::Float;
        std::memcpy(&v.f, &bits, sizeof v.f);
        push(make(std::move(v)));
        return;
      }
      case 't': push_tuple(pop_mark()); return;  // TUPLE
      case 0x85: push_tuple({pop()}); return;    // TUPLE1
      case 0x86: {                               // TUPLE2
        const ValueId b = pop(), a = pop();
        push_tuple({a, b});
        return;
      }
      case 0x87: {  // TUPLE3
        const ValueId c = pop(), b = pop(), a = pop();
        push_tuple({a, b, c});
        return;
      }
      case 'l': {  // LIST
        Value v;
        v.kind = Kind::List;
        v.items = pop_mark();
        push(make(std::move(v)));
        return;
      }
      case 'd': {  // DICT
        const auto kv = pop_mark();
        push_new(Kind::Dict);
        set_items(stack_.back(), kv, "DICT");
        return;
      }
      case 'R': {  // REDUCE: record the call; OrderedDict() becomes a plain dict
        const ValueId args = pop(), callable = pop();
        if (prog_.at(args).kind != Kind::Tuple) bad("REDUCE arguments must be a tuple");
        if (prog_.at(callable).kind == Kind::Global &&
            prog_.at(callable).s == "collections.OrderedDict" && prog_.at(args).items.empty()) {
          push_new(Kind::Dict);
          return;
        }
        Value v;
        v.kind = Kind::Reduce;
        v.items = {callable, args};
        push(make(std::move(v)));
        return;
      }
      case 'Q': {  // BINPERSID
        Value v;
        v.kind = Kind::PersistentId;
        v.items = {pop()};
        push(make(std::move(v)));
        return;
      }
      case 'b':
        pop();
        top();
        return;    // BUILD: object state (e.g. _metadata) is not needed
      case 's': {  // SETITEM
        const ValueId value = pop(), key = pop();
        set_items(top(), {key, value}, "SETITEM");
        return;
      }
      case 'u': {  // SETITEMS
        const auto kv = pop_mark();
        set_items(top(), kv, "SETITEMS");
        return;
      }
      case 'a': {  // APPEND
        const ValueId value = pop();
        container(top(), Kind::List, "APPEND").items.push_back(value);
        return;
      }
      case 'e': {  // APPENDS
        const auto values = pop_mark();
        Value& list = container(top(), Kind::List, "APPENDS");
        list.items.insert(list.items.end(), values.begin(), values.end());
        return;
      }
      case '0':  // POP (of the value, or of an empty MARK)
        if (!marks_.empty() && marks_.back() == stack_.size()) {
          marks_.pop_back();
        } else {
          pop();
        }
        return;
      case '1': pop_mark(); return;   // POP_MARK
      case '2': push(top()); return;  // DUP
      default: {
        char hex[8];
        std::snprintf(hex, sizeof hex, "0x%02x", op);
        bad(std::string("unsupported pickle opcode ") + hex +
            " (not produced by torch.save of a state dict)");
      }
    }
  }

  ByteReader in_;
  std::size_t op_pos_ = 0;
  Program prog_;
  std::vector<ValueId> stack_;
  std::vector<std::size_t> marks_;
  std::unordered_map<std::uint64_t, ValueId> memo_;
};

}  // namespace

Program run(const std::byte* data, std::size_t size, const std::string& origin) {
  return Machine(data, size, origin).run();
}

const char* kind_name(Value::Kind kind) {
  switch (kind) {
    case Kind::None: return "None";
    case Kind::Bool: return "bool";
    case Kind::Int: return "int";
    case Kind::Float: return "float";
    case Kind::String: return "str";
    case Kind::Bytes: return "bytes";
    case Kind::Tuple: return "tuple";
    case Kind::List: return "list";
    case Kind::Dict: return "dict";
    case Kind::Global: return "global";
    case Kind::Reduce: return "object";
    case Kind::PersistentId: return "persistent id";
  }
  return "?";
}

}  // namespace qg::io::pickle
