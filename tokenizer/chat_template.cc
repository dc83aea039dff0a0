// tokenizer/chat_template.cc: renders Hugging Face chat templates the way the
// JavaScript reference renders them: @huggingface/jinja 0.2.2, the Jinja
// engine inside transformers.js and @lenml/tokenizers (chat_template_test.cc
// compares the two byte for byte).
//
// Pipeline: Preprocess (the reference's textual whitespace handling) -> Lex ->
// Parse (recursive descent with the reference's precedence) -> Render (a tree
// walk over values typed as the reference types them).
//
// Which behaviour wins, in order:
//  1. What the reference supports behaves as in the reference, quirks
//     included: `not []` is false, `'1' == 1` is true (JavaScript `==`),
//     `'a' + 1` is "a1", `{{ true }}` prints "true", a conditional expression
//     (`a if c else b`) always yields a string, `none`/`None` are plain
//     (undefined) names, `{#- -#}` does not strip whitespace, string lengths
//     and indexes count UTF-16 units.
//  2. What it lacks but chat templates use follows Python Jinja2 as
//     transformers configures it: str.split/lstrip/rstrip/startswith/
//     endswith/replace, `~`, the filters string/tojson/join/replace/default,
//     the tests string/mapping, float literals, member access after a call
//     (`x.split('a')[-1]`).
//  3. Where the reference would print JavaScript internals ("[object Map]",
//     "undefined") or where no single answer is right, Render fails with
//     INVALID_ARGUMENT instead of guessing.
#include "tokenizer/chat_template.h"

#include <locale.h>
#include <wctype.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "base/status_macros.h"

namespace dserve::tokenizer {
namespace {

// ---------------------------------------------------------------------------
// Text helpers. Templates and values are UTF-8; the reference works on UTF-16.

constexpr char32_t kReplacementChar = 0xFFFD;

// DecodeUtf8 returns the code point starting at s[*i] and advances *i past it.
// A malformed sequence decodes as U+FFFD and advances one byte.
char32_t DecodeUtf8(absl::string_view s, size_t* i) {
  const auto b0 = static_cast<unsigned char>(s[*i]);
  if (b0 < 0x80) {
    ++*i;
    return b0;
  }
  size_t len = 0;
  char32_t cp = 0;
  if ((b0 & 0xE0) == 0xC0) {
    len = 2;
    cp = b0 & 0x1F;
  } else if ((b0 & 0xF0) == 0xE0) {
    len = 3;
    cp = b0 & 0x0F;
  } else if ((b0 & 0xF8) == 0xF0) {
    len = 4;
    cp = b0 & 0x07;
  } else {
    ++*i;
    return kReplacementChar;
  }
  if (*i + len > s.size()) {
    ++*i;
    return kReplacementChar;
  }
  for (size_t k = 1; k < len; ++k) {
    const auto b = static_cast<unsigned char>(s[*i + k]);
    if ((b & 0xC0) != 0x80) {
      ++*i;
      return kReplacementChar;
    }
    cp = (cp << 6) | (b & 0x3F);
  }
  static constexpr char32_t kMinForLength[] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < kMinForLength[len] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) {
    ++*i;
    return kReplacementChar;
  }
  *i += len;
  return cp;
}

void AppendUtf8(char32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

std::vector<char32_t> CodePoints(absl::string_view s) {
  std::vector<char32_t> cps;
  for (size_t i = 0; i < s.size();) cps.push_back(DecodeUtf8(s, &i));
  return cps;
}

std::string FromCodePoints(const std::vector<char32_t>& cps, size_t begin, size_t end) {
  std::string out;
  for (size_t i = begin; i < end; ++i) AppendUtf8(cps[i], &out);
  return out;
}

// IsJsSpace: JavaScript's \s (and String.prototype.trim's set).
bool IsJsSpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || c == 0x20 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F ||
         c == 0x3000 || c == 0xFEFF;
}

// IsPySpace: Python's str.isspace, used by the Python-only string methods.
bool IsPySpace(char32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 ||
         c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F ||
         c == 0x205F || c == 0x3000;
}

size_t Utf16Length(absl::string_view s) {
  size_t n = 0;
  for (size_t i = 0; i < s.size();) n += DecodeUtf8(s, &i) >= 0x10000 ? 2 : 1;
  return n;
}

std::string CodePointName(char32_t c) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  std::string hex;
  for (int shift = c > 0xFFFF ? 20 : 12; shift >= 0; shift -= 4)
    hex.push_back(kHex[(c >> shift) & 0xF]);
  return absl::StrCat("U+", hex);
}

// Case mapping. JavaScript maps the whole of Unicode, with one-to-many
// mappings (ß -> SS) and context (final sigma); only ASCII is mapped here and
// any other cased letter is refused rather than left unmapped.
locale_t CaseLocale() {
  static const locale_t locale =
      newlocale(LC_CTYPE_MASK, "C.UTF-8", static_cast<locale_t>(nullptr));
  return locale;
}

bool HasCase(char32_t c) {
  if (c < 0x80) return (c | 0x20) >= 'a' && (c | 0x20) <= 'z';
  // Letters whose JavaScript mapping is one-to-many, which towupper misses.
  if (c == 0xDF || c == 0x149 || c == 0x1F0 || c == 0x390 || c == 0x3B0 || c == 0x587 ||
      (c >= 0x1E96 && c <= 0x1E9A) || (c >= 0x1F50 && c <= 0x1F57) ||
      (c >= 0x1F80 && c <= 0x1FFF) || (c >= 0xFB00 && c <= 0xFB17)) {
    return true;
  }
  const locale_t locale = CaseLocale();
  if (locale == static_cast<locale_t>(nullptr)) return true;  // Unknown: treat as cased.
  const auto w = static_cast<wint_t>(c);
  return towupper_l(w, locale) != w || towlower_l(w, locale) != w;
}

absl::Status CaseError(char32_t c) {
  return absl::InvalidArgumentError(
      absl::StrCat("case mapping of the non-ASCII letter ", CodePointName(c),
                   " is not supported (the reference applies full Unicode case mapping)"));
}

// JsCaseMap: String.prototype.toUpperCase / toLowerCase, for text whose cased
// letters are ASCII.
absl::StatusOr<std::string> JsCaseMap(absl::string_view s, bool upper) {
  std::string out;
  out.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const size_t start = i;
    const char32_t c = DecodeUtf8(s, &i);
    if (c < 0x80) {
      char ch = static_cast<char>(c);
      if (upper && ch >= 'a' && ch <= 'z') ch = static_cast<char>(ch - 'a' + 'A');
      if (!upper && ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch - 'A' + 'a');
      out.push_back(ch);
    } else if (HasCase(c)) {
      return CaseError(c);
    } else {
      out.append(s.data() + start, i - start);
    }
  }
  return out;
}

// ---------------------------------------------------------------------------
// Numbers as text.

struct ShortestDigits {
  std::string digits;  // No leading or trailing zeros, at least one digit.
  int point = 0;       // Value = 0.digits * 10^point.
};

// Shortest decimal digits that round-trip `v` (finite, > 0), as both
// Number.prototype.toString and Python's repr choose them.
ShortestDigits Shortest(double v) {
  char buf[64];
  const auto result = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::scientific);
  const absl::string_view text(buf, static_cast<size_t>(result.ptr - buf));
  const size_t e = text.find('e');
  ShortestDigits out;
  for (const char c : text.substr(0, e)) {
    if (c != '.') out.digits.push_back(c);
  }
  while (out.digits.size() > 1 && out.digits.back() == '0') out.digits.pop_back();
  int exponent = 0;
  std::from_chars(text.data() + e + (text[e + 1] == '+' ? 2 : 1), text.data() + text.size(),
                  exponent);
  out.point = exponent + 1;
  return out;
}

// JsNumberToString: Number.prototype.toString() (ECMA-262 Number::toString).
std::string JsNumberToString(double v) {
  if (std::isnan(v)) return "NaN";
  if (v == 0) return "0";
  if (std::isinf(v)) return v < 0 ? "-Infinity" : "Infinity";
  const std::string sign = v < 0 ? "-" : "";
  const ShortestDigits d = Shortest(std::fabs(v));
  const int k = static_cast<int>(d.digits.size());
  const int n = d.point;
  if (k <= n && n <= 21) return absl::StrCat(sign, d.digits, std::string(n - k, '0'));
  if (0 < n && n <= 21) return absl::StrCat(sign, d.digits.substr(0, n), ".", d.digits.substr(n));
  if (-6 < n && n <= 0) return absl::StrCat(sign, "0.", std::string(-n, '0'), d.digits);
  std::string mantissa = d.digits.substr(0, 1);
  if (k > 1) absl::StrAppend(&mantissa, ".", d.digits.substr(1));
  return absl::StrCat(sign, mantissa, "e", n - 1 >= 0 ? "+" : "-", std::abs(n - 1));
}

// PyFloatRepr: Python's repr(float), as json.dumps prints floats.
std::string PyFloatRepr(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v < 0 ? "-Infinity" : "Infinity";
  if (v == 0) return std::signbit(v) ? "-0.0" : "0.0";
  const std::string sign = v < 0 ? "-" : "";
  const ShortestDigits d = Shortest(std::fabs(v));
  const int k = static_cast<int>(d.digits.size());
  const int exponent = d.point - 1;
  if (exponent >= -4 && exponent < 16) {
    if (d.point <= 0) return absl::StrCat(sign, "0.", std::string(-d.point, '0'), d.digits);
    if (d.point >= k) return absl::StrCat(sign, d.digits, std::string(d.point - k, '0'), ".0");
    return absl::StrCat(sign, d.digits.substr(0, d.point), ".", d.digits.substr(d.point));
  }
  std::string mantissa = d.digits.substr(0, 1);
  if (k > 1) absl::StrAppend(&mantissa, ".", d.digits.substr(1));
  const std::string exp_digits = absl::StrCat(std::abs(exponent));
  return absl::StrCat(sign, mantissa, "e", exponent < 0 ? "-" : "+",
                      exp_digits.size() < 2 ? "0" : "", exp_digits);
}

// PyIntString: an integral double printed as Python prints an int.
std::string PyIntString(double v) {
  char buf[400];
  const auto result = std::to_chars(buf, buf + sizeof(buf), v, std::chars_format::fixed, 0);
  return std::string(buf, result.ptr);
}

// JsStringToNumber: the ToNumber conversion JavaScript's == applies to a
// string compared with a number.
double JsStringToNumber(absl::string_view s) {
  const std::vector<char32_t> cps = CodePoints(s);
  size_t begin = 0;
  size_t end = cps.size();
  while (begin < end && IsJsSpace(cps[begin])) ++begin;
  while (end > begin && IsJsSpace(cps[end - 1])) --end;
  std::string t;
  for (size_t i = begin; i < end; ++i) {
    if (cps[i] >= 0x80) return NAN;
    t.push_back(static_cast<char>(cps[i]));
  }
  if (t.empty()) return 0;
  if (t.size() > 2 && t[0] == '0') {
    int base = 0;
    const char p = static_cast<char>(t[1] | 0x20);
    if (p == 'x') base = 16;
    if (p == 'o') base = 8;
    if (p == 'b') base = 2;
    if (base != 0) {
      double value = 0;
      for (size_t i = 2; i < t.size(); ++i) {
        const char c = static_cast<char>(t[i] | 0x20);
        int digit = -1;
        if (c >= '0' && c <= '9') digit = c - '0';
        if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
        if (digit < 0 || digit >= base) return NAN;
        value = value * base + digit;
      }
      return value;
    }
  }
  size_t i = 0;
  bool negative = false;
  if (t[0] == '+' || t[0] == '-') {
    negative = t[0] == '-';
    i = 1;
  }
  const absl::string_view body = absl::string_view(t).substr(i);
  if (body == "Infinity") return negative ? -INFINITY : INFINITY;
  // StrDecimalLiteral: digits [. digits] [e sign digits], or . digits ...
  size_t j = 0;
  size_t int_digits = 0;
  size_t frac_digits = 0;
  while (j < body.size() && body[j] >= '0' && body[j] <= '9') ++j, ++int_digits;
  if (j < body.size() && body[j] == '.') {
    ++j;
    while (j < body.size() && body[j] >= '0' && body[j] <= '9') ++j, ++frac_digits;
  }
  if (int_digits + frac_digits == 0) return NAN;
  if (j < body.size() && (body[j] | 0x20) == 'e') {
    ++j;
    if (j < body.size() && (body[j] == '+' || body[j] == '-')) ++j;
    size_t exp_digits = 0;
    while (j < body.size() && body[j] >= '0' && body[j] <= '9') ++j, ++exp_digits;
    if (exp_digits == 0) return NAN;
  }
  if (j != body.size()) return NAN;
  std::string normalized(body);
  if (normalized.front() == '.') normalized = absl::StrCat("0", normalized);
  if (normalized.back() == '.') normalized.push_back('0');
  double value = 0;
  std::from_chars(normalized.data(), normalized.data() + normalized.size(), value);
  return negative ? -value : value;
}

// ---------------------------------------------------------------------------
// Values, typed as the reference types them.

struct ArrayData;
struct ObjectData;
struct FunctionData;

struct Value {
  enum class Kind : uint8_t {
    kUndefined,
    kNull,
    kBool,
    kNumber,
    kString,
    kArray,
    kObject,
    kFunction
  };

  Kind kind = Kind::kUndefined;
  bool boolean = false;
  // is_float: the number is a Python float (a JSON float, a float literal or
  // float arithmetic); only the Python-only constructs print it differently.
  bool is_float = false;
  bool is_tuple = false;  // An array made by a parenthesised tuple literal.
  double number = 0;
  // Strings are immutable and shared; arrays and objects are shared by
  // reference (the reference's `set ns.x` mutates the one object, and its
  // `==` compares them by identity).
  std::shared_ptr<const std::string> str;
  std::shared_ptr<ArrayData> array;
  std::shared_ptr<ObjectData> object;
  std::shared_ptr<const FunctionData> function;

  static Value Undefined() { return Value(); }
  static Value Null() {
    Value v;
    v.kind = Kind::kNull;
    return v;
  }
  static Value Bool(bool b) {
    Value v;
    v.kind = Kind::kBool;
    v.boolean = b;
    return v;
  }
  static Value Number(double d, bool is_float) {
    Value v;
    v.kind = Kind::kNumber;
    v.number = d;
    v.is_float = is_float;
    return v;
  }
  static Value String(std::string s) {
    Value v;
    v.kind = Kind::kString;
    v.str = std::make_shared<const std::string>(std::move(s));
    return v;
  }
  static Value Array(std::vector<Value> items, bool is_tuple = false);
  static Value Object(std::shared_ptr<ObjectData> object) {
    Value v;
    v.kind = Kind::kObject;
    v.object = std::move(object);
    return v;
  }

  bool is_undefined() const { return kind == Kind::kUndefined; }
  bool is_null() const { return kind == Kind::kNull; }
  bool is_string() const { return kind == Kind::kString; }
  bool is_number() const { return kind == Kind::kNumber; }
  bool is_array() const { return kind == Kind::kArray; }
  bool is_object() const { return kind == Kind::kObject; }
};

using Kind = Value::Kind;

struct ArrayData {
  std::vector<Value> items;
};

Value Value::Array(std::vector<Value> items, bool is_tuple) {
  Value v;
  v.kind = Kind::kArray;
  v.is_tuple = is_tuple;
  v.array = std::make_shared<ArrayData>();
  v.array->items = std::move(items);
  return v;
}

// ObjectData: an insertion-ordered map, as the reference's Map.
struct ObjectData {
  std::vector<std::pair<std::string, Value>> entries;

  const Value* Find(absl::string_view key) const {
    for (const auto& [k, v] : entries) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  void Set(absl::string_view key, Value value) {
    for (auto& [k, v] : entries) {
      if (k == key) {
        v = std::move(value);
        return;
      }
    }
    entries.emplace_back(std::string(key), std::move(value));
  }
};

// The functions a template can call: three globals and the methods of
// strings and dicts.
enum class Builtin : uint8_t {
  kNamespace,
  kRaiseException,
  kRange,
  kStrUpper,
  kStrLower,
  kStrStrip,
  kStrTitle,
  kStrLstrip,
  kStrRstrip,
  kStrSplit,
  kStrStartswith,
  kStrEndswith,
  kStrReplace,
  kDictGet,
  kDictItems,
  kDictKeys,
  kDictValues,
};

struct FunctionData {
  Builtin id;
  Value receiver;  // The string or dict a method is bound to.
};

Value FunctionValue(Builtin id, Value receiver = Value()) {
  Value v;
  v.kind = Kind::kFunction;
  v.function = std::make_shared<const FunctionData>(FunctionData{id, std::move(receiver)});
  return v;
}

std::optional<Builtin> StringMethod(absl::string_view name) {
  if (name == "upper") return Builtin::kStrUpper;
  if (name == "lower") return Builtin::kStrLower;
  if (name == "strip") return Builtin::kStrStrip;
  if (name == "title") return Builtin::kStrTitle;
  if (name == "lstrip") return Builtin::kStrLstrip;
  if (name == "rstrip") return Builtin::kStrRstrip;
  if (name == "split") return Builtin::kStrSplit;
  if (name == "startswith") return Builtin::kStrStartswith;
  if (name == "endswith") return Builtin::kStrEndswith;
  if (name == "replace") return Builtin::kStrReplace;
  return std::nullopt;
}

std::optional<Builtin> DictMethod(absl::string_view name) {
  if (name == "get") return Builtin::kDictGet;
  if (name == "items") return Builtin::kDictItems;
  if (name == "keys") return Builtin::kDictKeys;
  if (name == "values") return Builtin::kDictValues;
  return std::nullopt;
}

std::optional<Builtin> GlobalFunction(absl::string_view name) {
  if (name == "namespace") return Builtin::kNamespace;
  if (name == "raise_exception") return Builtin::kRaiseException;
  if (name == "range") return Builtin::kRange;
  return std::nullopt;
}

bool IsKnownFilter(absl::string_view name) {
  static constexpr absl::string_view kFilters[] = {
      "length", "count",      "first",   "last", "list",  "upper",  "lower",
      "title",  "capitalize", "trim",    "abs",  "items", "string", "tojson",
      "join",   "replace",    "default", "d",    "safe"};
  for (const absl::string_view f : kFilters) {
    if (f == name) return true;
  }
  return false;
}

bool IsKnownTest(absl::string_view name) {
  static constexpr absl::string_view kTests[] = {
      "defined",  "undefined", "none", "boolean", "true",  "false", "number", "integer",
      "iterable", "callable",  "odd",  "even",    "lower", "upper", "string", "mapping"};
  for (const absl::string_view t : kTests) {
    if (t == name) return true;
  }
  return false;
}

std::string KindName(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
      return "undefined";
    case Kind::kNull:
      return "none";
    case Kind::kBool:
      return "boolean";
    case Kind::kNumber:
      return "number";
    case Kind::kString:
      return "string";
    case Kind::kArray:
      return v.is_tuple ? "tuple" : "list";
    case Kind::kObject:
      return "dict";
    case Kind::kFunction:
      return "function";
  }
  return "value";
}

// Truthy: the reference's __bool__ (if, and, or, ternary tests): empty lists
// and dicts are false.
bool Truthy(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
    case Kind::kNull:
      return false;
    case Kind::kBool:
      return v.boolean;
    case Kind::kNumber:
      return v.number != 0 && !std::isnan(v.number);
    case Kind::kString:
      return !v.str->empty();
    case Kind::kArray:
      return !v.array->items.empty();
    case Kind::kObject:
      return !v.object->entries.empty();
    case Kind::kFunction:
      return true;
  }
  return false;
}

// JsNot: the reference's `not`, which is JavaScript's `!` on the raw value:
// lists and dicts (JavaScript objects) are truthy even when empty.
bool JsNot(const Value& v) {
  switch (v.kind) {
    case Kind::kArray:
    case Kind::kObject:
    case Kind::kFunction:
      return false;
    default:
      return !Truthy(v);
  }
}

// JsToString: how the reference turns a value into output text (`{{ }}`,
// string `+`, conditional expressions). Lists, dicts and functions would print
// as JavaScript internals ("[object Map]"), so they are refused.
absl::StatusOr<std::string> JsToString(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
    case Kind::kNull:
      return std::string();
    case Kind::kBool:
      return std::string(v.boolean ? "true" : "false");
    case Kind::kNumber:
      return JsNumberToString(v.number);
    case Kind::kString:
      return *v.str;
    default:
      return absl::InvalidArgumentError(absl::StrCat(
          "cannot turn a ", KindName(v), " into text (the reference would print '[object ...]')"));
  }
}

// PyStr: Python's str(), for the constructs only Python Jinja2 has (`~`,
// |string, |join).
absl::StatusOr<std::string> PyStr(const Value& v) {
  switch (v.kind) {
    case Kind::kUndefined:
      return std::string();
    case Kind::kNull:
      return std::string("None");
    case Kind::kBool:
      return std::string(v.boolean ? "True" : "False");
    case Kind::kNumber:
      if (!v.is_float && std::isfinite(v.number) && v.number == std::trunc(v.number)) {
        return PyIntString(v.number);
      }
      return PyFloatRepr(v.number);
    case Kind::kString:
      return *v.str;
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("cannot turn a ", KindName(v), " into text with str()"));
  }
}

// JsPrimitiveString: ToPrimitive of a JavaScript object for ==, only for the
// cases whose text is predictable.
std::optional<std::string> JsPrimitiveString(const Value& v) {
  if (v.kind == Kind::kArray) {
    std::string s;
    for (size_t i = 0; i < v.array->items.size(); ++i) {
      absl::StrAppend(&s, i == 0 ? "" : ",", "[object Object]");
    }
    return s;
  }
  if (v.kind == Kind::kObject) return std::string("[object Map]");
  return std::nullopt;
}

// LooseEquals: JavaScript's == on the reference's values, which is what its
// `==` and `!=` do.
absl::StatusOr<bool> LooseEquals(const Value& a, const Value& b) {
  const bool a_nullish = a.is_undefined() || a.is_null();
  const bool b_nullish = b.is_undefined() || b.is_null();
  if (a_nullish || b_nullish) return a_nullish && b_nullish;
  if (a.kind == b.kind) {
    switch (a.kind) {
      case Kind::kBool:
        return a.boolean == b.boolean;
      case Kind::kNumber:
        return a.number == b.number;
      case Kind::kString:
        return *a.str == *b.str;
      case Kind::kArray:
        return a.array == b.array;
      case Kind::kObject:
        return a.object == b.object;
      case Kind::kFunction:
        return a.function == b.function;
      default:
        return true;
    }
  }
  const bool a_object = a.is_array() || a.is_object() || a.kind == Kind::kFunction;
  const bool b_object = b.is_array() || b.is_object() || b.kind == Kind::kFunction;
  if (a_object && b_object) return false;  // Different kinds of object.
  if (a.kind == Kind::kBool) return LooseEquals(Value::Number(a.boolean ? 1 : 0, false), b);
  if (b.kind == Kind::kBool) return LooseEquals(a, Value::Number(b.boolean ? 1 : 0, false));
  if (a_object || b_object) {
    const Value& object = a_object ? a : b;
    const Value& primitive = a_object ? b : a;
    const std::optional<std::string> text = JsPrimitiveString(object);
    if (!text.has_value()) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot compare a ", KindName(object), " with a ", KindName(primitive)));
    }
    return LooseEquals(Value::String(*text), primitive);
  }
  // One number, one string.
  const Value& number = a.is_number() ? a : b;
  const Value& text = a.is_number() ? b : a;
  return number.number == JsStringToNumber(*text.str);
}

// StrictEquals: JavaScript's === on the reference's values (the `in` test of
// list membership).
bool StrictEquals(const Value& a, const Value& b) {
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Kind::kUndefined:
    case Kind::kNull:
      return true;
    case Kind::kBool:
      return a.boolean == b.boolean;
    case Kind::kNumber:
      return a.number == b.number;
    case Kind::kString:
      return *a.str == *b.str;
    case Kind::kArray:
      return a.array == b.array;
    case Kind::kObject:
      return a.object == b.object;
    case Kind::kFunction:
      return a.function == b.function;
  }
  return false;
}

// ---------------------------------------------------------------------------
// Error positions.

std::string Where(absl::string_view source, uint32_t offset) {
  int line = 1;
  int column = 1;
  for (size_t i = 0; i < offset && i < source.size();) {
    if (source[i] == '\n') {
      ++line;
      column = 1;
      ++i;
    } else {
      DecodeUtf8(source, &i);
      ++column;
    }
  }
  return absl::StrCat("line ", line, ", column ", column);
}

absl::Status ErrorAt(absl::string_view source, uint32_t offset, absl::string_view message) {
  return absl::InvalidArgumentError(
      absl::StrCat("chat template ", Where(source, offset), ": ", message));
}

// ---------------------------------------------------------------------------
// Preprocess: the reference rewrites the template text before lexing it:
//   1. one trailing "\n" is dropped;
//   2. comments {# ... #} are removed (the '-' of {#- -#} strips nothing);
//   3. lstrip_blocks: spaces and tabs before a {% or {# that starts a line;
//   4. trim_blocks: the "\n" right after a %} or #};
//   5. -%} and }}- eat the whitespace after them, {%- and {{- the
//      whitespace before them (JavaScript \s, newlines included).
// SourceText keeps, for every byte, where it came from in the source.

struct SourceText {
  std::string text;
  std::vector<uint32_t> origin;

  void AppendFrom(const SourceText& from, size_t i) {
    text.push_back(from.text[i]);
    origin.push_back(from.origin[i]);
  }
  void AppendLiteral(absl::string_view s, uint32_t at) {
    text.append(s.data(), s.size());
    origin.insert(origin.end(), s.size(), at);
  }
  bool At(size_t i, absl::string_view pattern) const {
    return text.size() >= i + pattern.size() &&
           text.compare(i, pattern.size(), pattern.data(), pattern.size()) == 0;
  }
};

SourceText ReplaceComments(const SourceText& in) {
  SourceText out;
  const size_t n = in.text.size();
  bool closers_left = true;
  for (size_t i = 0; i < n;) {
    if (closers_left && in.At(i, "{#")) {
      const size_t close = in.text.find("#}", i + 2);
      closers_left = close != std::string::npos;
      if (closers_left) {
        out.AppendLiteral("{##}", in.origin[i]);
        i = close + 2;
        continue;
      }
    }
    out.AppendFrom(in, i++);
  }
  return out;
}

bool IsLineStart(const std::string& t, size_t i) {
  if (i == 0) return true;
  if (t[i - 1] == '\n' || t[i - 1] == '\r') return true;
  // U+2028 and U+2029 end lines for JavaScript's multiline ^.
  return i >= 3 && t[i - 3] == '\xE2' && t[i - 2] == '\x80' &&
         (t[i - 1] == '\xA8' || t[i - 1] == '\xA9');
}

SourceText LstripBlocks(const SourceText& in) {
  SourceText out;
  const size_t n = in.text.size();
  for (size_t i = 0; i < n;) {
    if (IsLineStart(in.text, i)) {
      size_t j = i;
      while (j < n && (in.text[j] == ' ' || in.text[j] == '\t')) ++j;
      if (in.At(j, "{%") || in.At(j, "{#")) i = j;
    }
    out.AppendFrom(in, i++);
  }
  return out;
}

SourceText TrimBlocks(const SourceText& in) {
  SourceText out;
  const size_t n = in.text.size();
  for (size_t i = 0; i < n;) {
    if ((in.At(i, "%}\n") || in.At(i, "#}\n"))) {
      out.AppendFrom(in, i);
      out.AppendFrom(in, i + 1);
      i += 3;
      continue;
    }
    out.AppendFrom(in, i++);
  }
  return out;
}

SourceText RemoveAll(const SourceText& in, absl::string_view pattern) {
  SourceText out;
  const size_t n = in.text.size();
  for (size_t i = 0; i < n;) {
    if (in.At(i, pattern)) {
      i += pattern.size();
      continue;
    }
    out.AppendFrom(in, i++);
  }
  return out;
}

// StripAfter: `pattern` followed by whitespace becomes `replacement`.
SourceText StripAfter(const SourceText& in, absl::string_view pattern,
                      absl::string_view replacement) {
  SourceText out;
  const size_t n = in.text.size();
  for (size_t i = 0; i < n;) {
    if (in.At(i, pattern)) {
      out.AppendLiteral(replacement, in.origin[i + 1]);
      i += pattern.size();
      while (i < n) {
        size_t j = i;
        if (!IsJsSpace(DecodeUtf8(in.text, &j))) break;
        i = j;
      }
      continue;
    }
    out.AppendFrom(in, i++);
  }
  return out;
}

// StripBefore: whitespace followed by `pattern` becomes `replacement`.
SourceText StripBefore(const SourceText& in, absl::string_view pattern,
                       absl::string_view replacement) {
  SourceText out;
  const size_t n = in.text.size();
  size_t floor = 0;  // Output before this belongs to an earlier match.
  for (size_t i = 0; i < n;) {
    if (in.At(i, pattern)) {
      while (out.text.size() > floor) {
        size_t start = out.text.size() - 1;
        while (start > floor && (static_cast<unsigned char>(out.text[start]) & 0xC0) == 0x80) {
          --start;
        }
        size_t j = start;
        if (!IsJsSpace(DecodeUtf8(out.text, &j))) break;
        out.text.resize(start);
        out.origin.resize(start);
      }
      out.AppendLiteral(replacement, in.origin[i]);
      i += pattern.size();
      floor = out.text.size();
      continue;
    }
    out.AppendFrom(in, i++);
  }
  return out;
}

SourceText Preprocess(absl::string_view source) {
  SourceText t;
  t.text = std::string(source);
  t.origin.resize(source.size());
  for (size_t i = 0; i < source.size(); ++i) t.origin[i] = static_cast<uint32_t>(i);
  if (!t.text.empty() && t.text.back() == '\n') {
    t.text.pop_back();
    t.origin.pop_back();
  }
  t = ReplaceComments(t);
  t = LstripBlocks(t);
  t = TrimBlocks(t);
  t = RemoveAll(t, "{##}");
  t = StripAfter(t, "-%}", "%}");
  t = StripBefore(t, "{%-", "{%");
  t = StripAfter(t, "-}}", "}}");
  t = StripBefore(t, "{{-", "{{");
  return t;
}

// ---------------------------------------------------------------------------
// Lexer: the reference's tokenizer, plus `~` and float literals.

enum class Tok : uint8_t {
  kText,
  kNumber,
  kString,
  kBool,
  kIdent,
  kEquals,
  kLParen,
  kRParen,
  kOpenStmt,
  kCloseStmt,
  kOpenExpr,
  kCloseExpr,
  kLBracket,
  kRBracket,
  kLBrace,
  kRBrace,
  kComma,
  kDot,
  kColon,
  kPipe,
  kTilde,
  kAdditive,
  kMultiplicative,
  kComparison,
  kUnary,  // A prefix '-' or '+' that does not start a number.
  kNot,
  kSet,
  kIf,
  kFor,
  kIn,
  kIs,
  kNotIn,
  kElse,
  kEndIf,
  kElif,
  kEndFor,
  kAnd,
  kOr,
};

struct Token {
  Tok type;
  std::string value;
  uint32_t pos;  // Offset in the template source.
};

std::string Describe(const Token& t) {
  switch (t.type) {
    case Tok::kText:
      return "text";
    case Tok::kString:
      return "a string";
    case Tok::kNumber:
      return absl::StrCat("the number ", t.value);
    default:
      return absl::StrCat("'", t.value, "'");
  }
}

bool IsWordChar(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_';
}
bool IsDigit(char c) { return c >= '0' && c <= '9'; }

absl::StatusOr<std::vector<Token>> Lex(absl::string_view source, const SourceText& in) {
  static constexpr std::pair<absl::string_view, Tok> kSymbols[] = {
      {"{%", Tok::kOpenStmt},      {"%}", Tok::kCloseStmt},     {"{{", Tok::kOpenExpr},
      {"}}", Tok::kCloseExpr},     {"(", Tok::kLParen},         {")", Tok::kRParen},
      {"{", Tok::kLBrace},         {"}", Tok::kRBrace},         {"[", Tok::kLBracket},
      {"]", Tok::kRBracket},       {",", Tok::kComma},          {".", Tok::kDot},
      {":", Tok::kColon},          {"|", Tok::kPipe},           {"<=", Tok::kComparison},
      {">=", Tok::kComparison},    {"==", Tok::kComparison},    {"!=", Tok::kComparison},
      {"<", Tok::kComparison},     {">", Tok::kComparison},     {"+", Tok::kAdditive},
      {"-", Tok::kAdditive},       {"*", Tok::kMultiplicative}, {"/", Tok::kMultiplicative},
      {"%", Tok::kMultiplicative}, {"=", Tok::kEquals},         {"~", Tok::kTilde},
  };
  const std::string& s = in.text;
  const size_t n = s.size();
  auto origin = [&](size_t i) {
    return i < n ? in.origin[i] : static_cast<uint32_t>(source.size());
  };
  std::vector<Token> tokens;
  size_t i = 0;
  while (i < n) {
    const Tok last = tokens.empty() ? Tok::kCloseExpr : tokens.back().type;
    if (tokens.empty() || last == Tok::kCloseStmt || last == Tok::kCloseExpr) {
      size_t j = i;
      while (j < n && !(s[j] == '{' && j + 1 < n && (s[j + 1] == '%' || s[j + 1] == '{'))) ++j;
      if (j > i) {
        tokens.push_back({Tok::kText, s.substr(i, j - i), origin(i)});
        i = j;
        continue;
      }
    }
    while (i < n) {
      size_t j = i;
      if (!IsJsSpace(DecodeUtf8(s, &j))) break;
      i = j;
    }
    if (i >= n) return ErrorAt(source, origin(i), "unexpected end of the template inside a tag");
    const char c = s[i];
    const uint32_t pos = origin(i);
    if (c == '-' || c == '+') {
      if (tokens.empty() || last == Tok::kText) {
        return ErrorAt(source, pos, absl::StrCat("unexpected character '", std::string(1, c), "'"));
      }
      const bool binary = last == Tok::kIdent || last == Tok::kNumber || last == Tok::kBool ||
                          last == Tok::kString || last == Tok::kRParen || last == Tok::kRBracket;
      if (!binary) {
        size_t j = i + 1;
        while (j < n && IsDigit(s[j])) ++j;
        if (j > i + 1) {
          if (j + 1 < n && s[j] == '.' && IsDigit(s[j + 1])) {
            ++j;
            while (j < n && IsDigit(s[j])) ++j;
          }
          tokens.push_back({Tok::kNumber, s.substr(i, j - i), pos});
        } else {
          tokens.push_back({Tok::kUnary, std::string(1, c), pos});
        }
        i = j;
        continue;
      }
    }
    bool matched = false;
    for (const auto& [text, type] : kSymbols) {
      if (in.At(i, text)) {
        tokens.push_back({type, std::string(text), pos});
        i += text.size();
        matched = true;
        break;
      }
    }
    if (matched) continue;
    if (c == '\'' || c == '"') {
      std::string value;
      size_t j = i + 1;
      while (j < n && s[j] != c) {
        if (s[j] == '\\') {
          if (j + 1 >= n) break;
          const char e = s[j + 1];
          switch (e) {
            case 'n':
              value.push_back('\n');
              break;
            case 't':
              value.push_back('\t');
              break;
            case 'r':
              value.push_back('\r');
              break;
            case 'b':
              value.push_back('\b');
              break;
            case 'f':
              value.push_back('\f');
              break;
            case 'v':
              value.push_back('\v');
              break;
            case '\'':
            case '"':
            case '\\':
              value.push_back(e);
              break;
            default:
              return ErrorAt(source, origin(j), "unsupported escape sequence in a string literal");
          }
          j += 2;
          continue;
        }
        value.push_back(s[j++]);
      }
      if (j >= n) return ErrorAt(source, pos, "unterminated string literal");
      tokens.push_back({Tok::kString, std::move(value), pos});
      i = j + 1;
      continue;
    }
    if (IsDigit(c)) {
      size_t j = i;
      while (j < n && IsDigit(s[j])) ++j;
      if (j + 1 < n && s[j] == '.' && IsDigit(s[j + 1])) {
        ++j;
        while (j < n && IsDigit(s[j])) ++j;
      }
      tokens.push_back({Tok::kNumber, s.substr(i, j - i), pos});
      i = j;
      continue;
    }
    if (IsWordChar(c)) {
      size_t j = i;
      while (j < n && IsWordChar(s[j])) ++j;
      std::string word = s.substr(i, j - i);
      i = j;
      static constexpr std::pair<absl::string_view, Tok> kKeywords[] = {
          {"set", Tok::kSet},     {"for", Tok::kFor},    {"in", Tok::kIn},
          {"is", Tok::kIs},       {"if", Tok::kIf},      {"else", Tok::kElse},
          {"endif", Tok::kEndIf}, {"elif", Tok::kElif},  {"endfor", Tok::kEndFor},
          {"and", Tok::kAnd},     {"or", Tok::kOr},      {"not", Tok::kNot},
          {"true", Tok::kBool},   {"false", Tok::kBool},
      };
      Tok type = Tok::kIdent;
      for (const auto& [keyword, keyword_type] : kKeywords) {
        if (word == keyword) type = keyword_type;
      }
      if (type == Tok::kIn && !tokens.empty() && tokens.back().type == Tok::kNot) {
        tokens.back() = {Tok::kNotIn, "not in", tokens.back().pos};
        continue;
      }
      tokens.push_back({type, std::move(word), pos});
      continue;
    }
    size_t j = i;
    const char32_t cp = DecodeUtf8(s, &j);
    std::string shown;
    AppendUtf8(cp, &shown);
    return ErrorAt(source, pos, absl::StrCat("unexpected character '", shown, "'"));
  }
  return tokens;
}

// ---------------------------------------------------------------------------
// Syntax tree.

enum class ExprKind : uint8_t {
  kLiteral,  // literal
  kName,     // name
  kList,     // items
  kTuple,    // items
  kDict,     // items: key, value, key, value, ...
  kAttr,     // a.name
  kIndex,    // a[b]
  kSlice,    // a[items[0]:items[1]:items[2]], absent parts null
  kCall,     // a(items, kwargs): a is a kName or a kAttr
  kNot,      // not a
  kNegate,   // -a
  kPlus,     // +a
  kBinary,   // a op b
  kTernary,  // a if b else c
  kFilter,   // a | name(items, kwargs)
  kTest,     // a is [not] name
};

enum class BinaryOp : uint8_t {
  kOr,
  kAnd,
  kEq,
  kNe,
  kLt,
  kGt,
  kLe,
  kGe,
  kIn,
  kNotIn,
  kAdd,
  kSub,
  kMul,
  kDiv,
  kMod,
  kConcat,
};

struct Expr;
using ExprPtr = std::unique_ptr<Expr>;

struct Expr {
  ExprKind kind;
  uint32_t pos = 0;
  Value literal;
  std::string name;
  BinaryOp op = BinaryOp::kAdd;
  bool negate = false;
  ExprPtr a, b, c;
  std::vector<ExprPtr> items;
  std::vector<std::pair<std::string, ExprPtr>> kwargs;
};

ExprPtr MakeExpr(ExprKind kind, uint32_t pos) {
  auto e = std::make_unique<Expr>();
  e->kind = kind;
  e->pos = pos;
  return e;
}

enum class StmtKind : uint8_t { kText, kOutput, kIf, kFor, kSet };

struct Stmt {
  StmtKind kind;
  uint32_t pos = 0;
  std::string text;                    // kText
  ExprPtr expr;                        // kOutput value, kIf test, kFor iterable, kSet value
  ExprPtr target;                      // kSet: the object of `set obj.name = ...`, else null
  std::string name;                    // kSet: the variable or attribute assigned
  std::vector<std::string> loop_vars;  // kFor
  bool unpack = false;                 // kFor: `for a, b in ...`
  std::vector<Stmt> body;              // kIf then-branch, kFor body
  std::vector<Stmt> orelse;            // kIf else-branch
};

// ---------------------------------------------------------------------------
// Parser: the reference's grammar. Lowest to highest precedence:
//   a if b else c;  or;  and;  not;  == != < > <= >= in, not in;  + -;  ~;
//   * / %;  is [not] test;  | filter;  unary - +;  .attr [index] (call);
//   literals, names, (...), [...], {...}.
// Beyond the reference: `~`, unary minus, float literals, and member access or
// calls after a call.

constexpr int kMaxNesting = 200;

class Parser {
 public:
  Parser(absl::string_view source, std::vector<Token> tokens)
      : source_(source), tokens_(std::move(tokens)) {}

  absl::StatusOr<std::vector<Stmt>> ParseTemplate() {
    std::vector<Stmt> body;
    while (cur_ < tokens_.size()) {
      DSERVE_ASSIGN_OR_RETURN(Stmt s, ParseAny());
      body.push_back(std::move(s));
    }
    return body;
  }

 private:
  class DepthGuard {
   public:
    explicit DepthGuard(int* depth) : depth_(depth) { ++*depth_; }
    ~DepthGuard() { --*depth_; }
    DepthGuard(const DepthGuard&) = delete;
    DepthGuard& operator=(const DepthGuard&) = delete;

   private:
    int* depth_;
  };

  bool Is(Tok t, size_t ahead = 0) const {
    return cur_ + ahead < tokens_.size() && tokens_[cur_ + ahead].type == t;
  }
  bool AtEnd() const { return cur_ >= tokens_.size(); }
  uint32_t Pos() const {
    return AtEnd() ? static_cast<uint32_t>(source_.size()) : tokens_[cur_].pos;
  }
  absl::Status Error(absl::string_view message) const { return ErrorAt(source_, Pos(), message); }
  absl::Status Unexpected(absl::string_view wanted) const {
    if (AtEnd()) return Error(absl::StrCat("expected ", wanted, ", found the end of the template"));
    return Error(absl::StrCat("expected ", wanted, ", found ", Describe(tokens_[cur_])));
  }
  absl::Status Expect(Tok t, absl::string_view wanted) {
    if (!Is(t)) return Unexpected(wanted);
    ++cur_;
    return absl::OkStatus();
  }
  absl::Status CheckDepth() const {
    if (depth_ > kMaxNesting) return Error("the template nests too deeply");
    return absl::OkStatus();
  }

  absl::StatusOr<Stmt> ParseAny() {
    DepthGuard guard(&depth_);
    DSERVE_RETURN_IF_ERROR(CheckDepth());
    const Token& t = tokens_[cur_];
    if (t.type == Tok::kText) {
      ++cur_;
      Stmt s;
      s.kind = StmtKind::kText;
      s.pos = t.pos;
      s.text = t.value;
      return s;
    }
    if (t.type == Tok::kOpenExpr) {
      ++cur_;
      Stmt s;
      s.kind = StmtKind::kOutput;
      s.pos = t.pos;
      DSERVE_ASSIGN_OR_RETURN(s.expr, ParseExpression());
      DSERVE_RETURN_IF_ERROR(Expect(Tok::kCloseExpr, "'}}'"));
      return s;
    }
    if (t.type == Tok::kOpenStmt) {
      ++cur_;
      return ParseStatement(t.pos);
    }
    return Error(absl::StrCat("unexpected ", Describe(t)));
  }

  absl::StatusOr<Stmt> ParseStatement(uint32_t pos) {
    if (AtEnd()) return Unexpected("a tag name after '{%'");
    const Token& t = tokens_[cur_];
    switch (t.type) {
      case Tok::kSet:
        ++cur_;
        return ParseSet(pos);
      case Tok::kIf: {
        ++cur_;
        DSERVE_ASSIGN_OR_RETURN(Stmt s, ParseIf(pos));
        DSERVE_RETURN_IF_ERROR(Expect(Tok::kOpenStmt, "'{% endif %}'"));
        DSERVE_RETURN_IF_ERROR(Expect(Tok::kEndIf, "'endif'"));
        DSERVE_RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
        return s;
      }
      case Tok::kFor:
        ++cur_;
        return ParseFor(pos);
      case Tok::kIdent:
        return Error(absl::StrCat("unsupported tag '{% ", t.value, " %}'"));
      case Tok::kElse:
      case Tok::kElif:
      case Tok::kEndIf:
      case Tok::kEndFor:
        return Error(absl::StrCat("unexpected '{% ", t.value, " %}'",
                                  t.type == Tok::kElse ? " (for-else is not supported)" : ""));
      default:
        return Unexpected("a tag name after '{%'");
    }
  }

  absl::StatusOr<Stmt> ParseSet(uint32_t pos) {
    Stmt s;
    s.kind = StmtKind::kSet;
    s.pos = pos;
    DSERVE_ASSIGN_OR_RETURN(ExprPtr target, ParseExpression());
    if (target->kind == ExprKind::kName) {
      s.name = target->name;
    } else if (target->kind == ExprKind::kAttr) {
      s.name = target->name;
      s.target = std::move(target->a);
    } else {
      return ErrorAt(source_, target->pos,
                     "unsupported assignment target (only `name` and `name.attr`)");
    }
    if (!Is(Tok::kEquals)) {
      return Error("expected '=' ({% set %}...{% endset %} blocks are not supported)");
    }
    ++cur_;
    DSERVE_ASSIGN_OR_RETURN(s.expr, ParseExpression());
    if (Is(Tok::kEquals)) return Error("chained assignment is not supported");
    DSERVE_RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
    return s;
  }

  bool AtTag(Tok t) const { return Is(Tok::kOpenStmt) && Is(t, 1); }

  // ParseIf: after `if`; stops before the `{%` of the closing endif, which
  // the outermost if of an elif chain consumes.
  absl::StatusOr<Stmt> ParseIf(uint32_t pos) {
    DepthGuard guard(&depth_);
    DSERVE_RETURN_IF_ERROR(CheckDepth());
    Stmt s;
    s.kind = StmtKind::kIf;
    s.pos = pos;
    DSERVE_ASSIGN_OR_RETURN(s.expr, ParseExpression());
    DSERVE_RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
    while (!(AtTag(Tok::kElif) || AtTag(Tok::kElse) || AtTag(Tok::kEndIf))) {
      if (AtEnd()) return ErrorAt(source_, pos, "{% if %} without {% endif %}");
      DSERVE_ASSIGN_OR_RETURN(Stmt child, ParseAny());
      s.body.push_back(std::move(child));
    }
    if (!AtTag(Tok::kEndIf)) {
      ++cur_;  // {%
      if (Is(Tok::kElif)) {
        const uint32_t elif_pos = Pos();
        ++cur_;
        DSERVE_ASSIGN_OR_RETURN(Stmt elif, ParseIf(elif_pos));
        s.orelse.push_back(std::move(elif));
      } else {
        ++cur_;  // else
        DSERVE_RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
        while (!AtTag(Tok::kEndIf)) {
          if (AtEnd()) return ErrorAt(source_, pos, "{% if %} without {% endif %}");
          DSERVE_ASSIGN_OR_RETURN(Stmt child, ParseAny());
          s.orelse.push_back(std::move(child));
        }
      }
    }
    return s;
  }

  absl::StatusOr<Stmt> ParseFor(uint32_t pos) {
    Stmt s;
    s.kind = StmtKind::kFor;
    s.pos = pos;
    while (true) {
      if (!Is(Tok::kIdent)) return Unexpected("a loop variable name");
      s.loop_vars.push_back(tokens_[cur_++].value);
      if (!Is(Tok::kComma)) break;
      ++cur_;
      s.unpack = true;
    }
    DSERVE_RETURN_IF_ERROR(Expect(Tok::kIn, "'in'"));
    DSERVE_ASSIGN_OR_RETURN(s.expr, ParseOr());
    if (Is(Tok::kIf)) {
      return Error("loop filters ({% for x in xs if cond %}) are not supported");
    }
    DSERVE_RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
    while (!AtTag(Tok::kEndFor)) {
      if (AtEnd()) return ErrorAt(source_, pos, "{% for %} without {% endfor %}");
      DSERVE_ASSIGN_OR_RETURN(Stmt child, ParseAny());
      s.body.push_back(std::move(child));
    }
    cur_ += 2;  // {% endfor
    DSERVE_RETURN_IF_ERROR(Expect(Tok::kCloseStmt, "'%}'"));
    return s;
  }

  absl::StatusOr<ExprPtr> ParseExpression() {
    DepthGuard guard(&depth_);
    DSERVE_RETURN_IF_ERROR(CheckDepth());
    DSERVE_ASSIGN_OR_RETURN(ExprPtr a, ParseOr());
    if (!Is(Tok::kIf)) return a;
    auto e = MakeExpr(ExprKind::kTernary, Pos());
    ++cur_;
    DSERVE_ASSIGN_OR_RETURN(e->b, ParseOr());
    if (!Is(Tok::kElse)) {
      return Unexpected("'else' (conditional expressions need an else branch)");
    }
    ++cur_;
    DSERVE_ASSIGN_OR_RETURN(e->c, ParseOr());
    e->a = std::move(a);
    return e;
  }

  absl::StatusOr<ExprPtr> MakeBinary(BinaryOp op, uint32_t pos, ExprPtr a, ExprPtr b) {
    auto e = MakeExpr(ExprKind::kBinary, pos);
    e->op = op;
    e->a = std::move(a);
    e->b = std::move(b);
    return e;
  }

  // ParseBinaryLevel parses `operand (op operand)*` into a left-leaning tree,
  // where `op_of` names the operator of the current token at this precedence
  // level (nullopt: not one of this level's operators).
  using OperandParser = absl::StatusOr<ExprPtr> (Parser::*)();
  absl::StatusOr<ExprPtr> ParseBinaryLevel(OperandParser operand,
                                           std::optional<BinaryOp> (*op_of)(const Token&)) {
    DSERVE_ASSIGN_OR_RETURN(ExprPtr left, (this->*operand)());
    while (!AtEnd()) {
      const std::optional<BinaryOp> op = op_of(tokens_[cur_]);
      if (!op.has_value()) break;
      const uint32_t pos = tokens_[cur_++].pos;
      DSERVE_ASSIGN_OR_RETURN(ExprPtr right, (this->*operand)());
      DSERVE_ASSIGN_OR_RETURN(left, MakeBinary(*op, pos, std::move(left), std::move(right)));
    }
    return left;
  }

  absl::StatusOr<ExprPtr> ParseOr() {
    return ParseBinaryLevel(&Parser::ParseAnd, [](const Token& t) -> std::optional<BinaryOp> {
      if (t.type == Tok::kOr) return BinaryOp::kOr;
      return std::nullopt;
    });
  }

  absl::StatusOr<ExprPtr> ParseAnd() {
    return ParseBinaryLevel(&Parser::ParseNot, [](const Token& t) -> std::optional<BinaryOp> {
      if (t.type == Tok::kAnd) return BinaryOp::kAnd;
      return std::nullopt;
    });
  }

  absl::StatusOr<ExprPtr> ParseNot() {
    if (!Is(Tok::kNot)) return ParseComparison();
    DepthGuard guard(&depth_);
    DSERVE_RETURN_IF_ERROR(CheckDepth());
    auto e = MakeExpr(ExprKind::kNot, Pos());
    ++cur_;
    DSERVE_ASSIGN_OR_RETURN(e->a, ParseNot());
    return e;
  }

  absl::StatusOr<ExprPtr> ParseComparison() {
    return ParseBinaryLevel(&Parser::ParseAdditive, [](const Token& t) -> std::optional<BinaryOp> {
      if (t.type == Tok::kIn) return BinaryOp::kIn;
      if (t.type == Tok::kNotIn) return BinaryOp::kNotIn;
      if (t.type != Tok::kComparison) return std::nullopt;
      if (t.value == "==") return BinaryOp::kEq;
      if (t.value == "!=") return BinaryOp::kNe;
      if (t.value == "<") return BinaryOp::kLt;
      if (t.value == ">") return BinaryOp::kGt;
      if (t.value == "<=") return BinaryOp::kLe;
      if (t.value == ">=") return BinaryOp::kGe;
      return std::nullopt;
    });
  }

  absl::StatusOr<ExprPtr> ParseAdditive() {
    return ParseBinaryLevel(&Parser::ParseConcat, [](const Token& t) -> std::optional<BinaryOp> {
      if (t.type != Tok::kAdditive) return std::nullopt;
      return t.value == "+" ? BinaryOp::kAdd : BinaryOp::kSub;
    });
  }

  absl::StatusOr<ExprPtr> ParseConcat() {
    return ParseBinaryLevel(&Parser::ParseMultiplicative,
                            [](const Token& t) -> std::optional<BinaryOp> {
                              if (t.type == Tok::kTilde) return BinaryOp::kConcat;
                              return std::nullopt;
                            });
  }

  absl::StatusOr<ExprPtr> ParseMultiplicative() {
    return ParseBinaryLevel(&Parser::ParseTest, [](const Token& t) -> std::optional<BinaryOp> {
      if (t.type != Tok::kMultiplicative) return std::nullopt;
      if (t.value == "*") return BinaryOp::kMul;
      return t.value == "/" ? BinaryOp::kDiv : BinaryOp::kMod;
    });
  }

  absl::StatusOr<ExprPtr> ParseTest() {
    DSERVE_ASSIGN_OR_RETURN(ExprPtr operand, ParseFilter());
    while (Is(Tok::kIs)) {
      auto e = MakeExpr(ExprKind::kTest, Pos());
      ++cur_;
      if (Is(Tok::kNot)) {
        e->negate = true;
        ++cur_;
      }
      if (!Is(Tok::kIdent) && !Is(Tok::kBool)) return Unexpected("a test name after 'is'");
      e->name = tokens_[cur_].value;
      if (!IsKnownTest(e->name)) return Error(absl::StrCat("unsupported test '", e->name, "'"));
      ++cur_;
      if (Is(Tok::kLParen)) return Error("tests with arguments are not supported");
      e->a = std::move(operand);
      operand = std::move(e);
    }
    return operand;
  }

  absl::StatusOr<ExprPtr> ParseFilter() {
    DSERVE_ASSIGN_OR_RETURN(ExprPtr operand, ParseUnary());
    while (Is(Tok::kPipe)) {
      ++cur_;
      if (!Is(Tok::kIdent)) return Unexpected("a filter name after '|'");
      auto e = MakeExpr(ExprKind::kFilter, Pos());
      e->name = tokens_[cur_].value;
      if (!IsKnownFilter(e->name)) {
        return Error(absl::StrCat("unsupported filter '", e->name, "'"));
      }
      ++cur_;
      if (Is(Tok::kLParen)) DSERVE_RETURN_IF_ERROR(ParseArgs(e.get()));
      e->a = std::move(operand);
      operand = std::move(e);
    }
    return operand;
  }

  absl::StatusOr<ExprPtr> ParseUnary() {
    if (!Is(Tok::kUnary)) return ParsePostfix();
    DepthGuard guard(&depth_);
    DSERVE_RETURN_IF_ERROR(CheckDepth());
    auto e = MakeExpr(tokens_[cur_].value == "-" ? ExprKind::kNegate : ExprKind::kPlus, Pos());
    ++cur_;
    DSERVE_ASSIGN_OR_RETURN(e->a, ParseUnary());
    return e;
  }

  absl::StatusOr<ExprPtr> ParsePostfix() {
    DSERVE_ASSIGN_OR_RETURN(ExprPtr e, ParsePrimary());
    while (true) {
      if (Is(Tok::kDot)) {
        ++cur_;
        if (!Is(Tok::kIdent)) return Unexpected("an attribute name after '.'");
        auto attr = MakeExpr(ExprKind::kAttr, tokens_[cur_].pos);
        attr->name = tokens_[cur_].value;
        ++cur_;
        attr->a = std::move(e);
        e = std::move(attr);
      } else if (Is(Tok::kLBracket)) {
        DSERVE_ASSIGN_OR_RETURN(e, ParseSubscript(std::move(e)));
      } else if (Is(Tok::kLParen)) {
        auto call = MakeExpr(ExprKind::kCall, Pos());
        if (e->kind == ExprKind::kName) {
          if (!GlobalFunction(e->name)) {
            return ErrorAt(source_, e->pos, absl::StrCat("unsupported function '", e->name, "'"));
          }
        } else if (e->kind == ExprKind::kAttr) {
          if (!StringMethod(e->name) && !DictMethod(e->name)) {
            return ErrorAt(source_, e->pos, absl::StrCat("unsupported method '", e->name, "'"));
          }
        } else {
          return Error("only functions and methods can be called");
        }
        DSERVE_RETURN_IF_ERROR(ParseArgs(call.get()));
        call->a = std::move(e);
        e = std::move(call);
      } else {
        return e;
      }
    }
  }

  // ParseArgs: (a, b, name=c); like the reference, commas are optional.
  absl::Status ParseArgs(Expr* e) {
    ++cur_;  // (
    while (!Is(Tok::kRParen)) {
      if (AtEnd()) return Unexpected("')'");
      DSERVE_ASSIGN_OR_RETURN(ExprPtr arg, ParseExpression());
      if (Is(Tok::kEquals)) {
        if (arg->kind != ExprKind::kName) return Error("expected a name before '='");
        ++cur_;
        DSERVE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
        e->kwargs.emplace_back(arg->name, std::move(value));
      } else {
        e->items.push_back(std::move(arg));
      }
      if (Is(Tok::kComma)) ++cur_;
    }
    ++cur_;  // )
    return absl::OkStatus();
  }

  absl::StatusOr<ExprPtr> ParseSubscript(ExprPtr object) {
    const uint32_t pos = Pos();
    ++cur_;  // [
    std::vector<ExprPtr> parts;
    bool is_slice = false;
    while (!Is(Tok::kRBracket)) {
      if (AtEnd()) return Unexpected("']'");
      if (Is(Tok::kColon)) {
        parts.push_back(nullptr);
        ++cur_;
        is_slice = true;
      } else {
        DSERVE_ASSIGN_OR_RETURN(ExprPtr part, ParseExpression());
        parts.push_back(std::move(part));
        if (Is(Tok::kColon)) {
          ++cur_;
          is_slice = true;
        }
      }
    }
    ++cur_;  // ]
    if (parts.empty()) return ErrorAt(source_, pos, "empty subscript");
    ExprPtr e;
    if (is_slice) {
      if (parts.size() > 3) return ErrorAt(source_, pos, "a slice has at most 3 parts");
      e = MakeExpr(ExprKind::kSlice, pos);
      parts.resize(3);
      e->items = std::move(parts);
    } else {
      if (parts.size() > 1) return ErrorAt(source_, pos, "expected one index");
      e = MakeExpr(ExprKind::kIndex, pos);
      e->b = std::move(parts[0]);
    }
    e->a = std::move(object);
    return e;
  }

  absl::StatusOr<ExprPtr> ParsePrimary() {
    if (AtEnd()) return Unexpected("an expression");
    const Token& t = tokens_[cur_];
    switch (t.type) {
      case Tok::kNumber: {
        ++cur_;
        auto e = MakeExpr(ExprKind::kLiteral, t.pos);
        absl::string_view digits = t.value;
        bool negative = false;
        if (digits[0] == '-' || digits[0] == '+') {
          negative = digits[0] == '-';
          digits.remove_prefix(1);
        }
        double value = 0;
        std::from_chars(digits.data(), digits.data() + digits.size(), value);
        const bool is_float = digits.find('.') != absl::string_view::npos;
        e->literal = Value::Number(negative ? -value : value, is_float);
        return e;
      }
      case Tok::kString: {
        ++cur_;
        auto e = MakeExpr(ExprKind::kLiteral, t.pos);
        e->literal = Value::String(t.value);
        return e;
      }
      case Tok::kBool: {
        ++cur_;
        auto e = MakeExpr(ExprKind::kLiteral, t.pos);
        e->literal = Value::Bool(t.value == "true");
        return e;
      }
      case Tok::kIdent: {
        ++cur_;
        auto e = MakeExpr(ExprKind::kName, t.pos);
        e->name = t.value;
        return e;
      }
      case Tok::kLParen: {
        ++cur_;
        DSERVE_ASSIGN_OR_RETURN(ExprPtr first, ParseExpression());
        if (!Is(Tok::kComma)) {
          DSERVE_RETURN_IF_ERROR(Expect(Tok::kRParen, "')'"));
          return first;
        }
        auto tuple = MakeExpr(ExprKind::kTuple, t.pos);
        tuple->items.push_back(std::move(first));
        while (Is(Tok::kComma)) {
          ++cur_;
          DSERVE_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression());
          tuple->items.push_back(std::move(item));
        }
        DSERVE_RETURN_IF_ERROR(Expect(Tok::kRParen, "')'"));
        return tuple;
      }
      case Tok::kLBracket: {
        ++cur_;
        auto list = MakeExpr(ExprKind::kList, t.pos);
        while (!Is(Tok::kRBracket)) {
          if (AtEnd()) return Unexpected("']'");
          DSERVE_ASSIGN_OR_RETURN(ExprPtr item, ParseExpression());
          list->items.push_back(std::move(item));
          if (Is(Tok::kComma)) ++cur_;
        }
        ++cur_;
        return list;
      }
      case Tok::kLBrace: {
        ++cur_;
        auto dict = MakeExpr(ExprKind::kDict, t.pos);
        while (!Is(Tok::kRBrace)) {
          if (AtEnd()) return Unexpected("'}'");
          DSERVE_ASSIGN_OR_RETURN(ExprPtr key, ParseExpression());
          DSERVE_RETURN_IF_ERROR(Expect(Tok::kColon, "':'"));
          DSERVE_ASSIGN_OR_RETURN(ExprPtr value, ParseExpression());
          dict->items.push_back(std::move(key));
          dict->items.push_back(std::move(value));
          if (Is(Tok::kComma)) ++cur_;
        }
        ++cur_;
        return dict;
      }
      default:
        return Unexpected("an expression");
    }
  }

  absl::string_view source_;
  std::vector<Token> tokens_;
  size_t cur_ = 0;
  int depth_ = 0;
};

// ---------------------------------------------------------------------------
// Rendering.

// Scope: the variables of the template's top level or of one for loop (the
// reference gives each loop one scope for all its iterations; if blocks share
// their parent's).
class Scope {
 public:
  explicit Scope(const Scope* parent) : parent_(parent) {}

  const Value* Lookup(absl::string_view name) const {
    for (const Scope* s = this; s != nullptr; s = s->parent_) {
      for (const auto& [k, v] : s->vars_) {
        if (k == name) return &v;
      }
    }
    return nullptr;
  }
  void Set(absl::string_view name, Value value) {
    for (auto& [k, v] : vars_) {
      if (k == name) {
        v = std::move(value);
        return;
      }
    }
    vars_.emplace_back(std::string(name), std::move(value));
  }

 private:
  const Scope* parent_;
  std::vector<std::pair<std::string, Value>> vars_;
};

constexpr size_t kMaxRangeLength = size_t{1} << 20;
constexpr int kMaxJsonDepth = 512;

// Integer: `v` as an integer index or count, if it is one.
std::optional<int64_t> Integer(const Value& v) {
  if (!v.is_number() || !std::isfinite(v.number) || v.number != std::trunc(v.number) ||
      std::fabs(v.number) > 9e15) {
    return std::nullopt;
  }
  return static_cast<int64_t>(v.number);
}

// JSON text of a string as Python's json.dumps(ensure_ascii=False) writes it.
void AppendPyJsonString(absl::string_view s, std::string* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  out->push_back('"');
  for (const char ch : s) {
    const auto c = static_cast<unsigned char>(ch);
    switch (c) {
      case '"':
        out->append("\\\"");
        break;
      case '\\':
        out->append("\\\\");
        break;
      case '\n':
        out->append("\\n");
        break;
      case '\r':
        out->append("\\r");
        break;
      case '\t':
        out->append("\\t");
        break;
      case '\b':
        out->append("\\b");
        break;
      case '\f':
        out->append("\\f");
        break;
      default:
        if (c < 0x20) {
          out->append("\\u00");
          out->push_back(kHex[c >> 4]);
          out->push_back(kHex[c & 0xF]);
        } else {
          out->push_back(ch);
        }
    }
  }
  out->push_back('"');
}

// ToPyJson: transformers' tojson filter, json.dumps(value, ensure_ascii=False,
// indent=indent): ", " and ": " separators, keys in the dict's order.
absl::Status ToPyJson(const Value& v, std::optional<int64_t> indent, int level, std::string* out) {
  if (level > kMaxJsonDepth) return absl::InvalidArgumentError("tojson: value nests too deeply");
  auto newline = [&](int at) {
    out->push_back('\n');
    out->append(static_cast<size_t>(*indent) * at, ' ');
  };
  switch (v.kind) {
    case Kind::kNull:
      out->append("null");
      return absl::OkStatus();
    case Kind::kBool:
      out->append(v.boolean ? "true" : "false");
      return absl::OkStatus();
    case Kind::kNumber: {
      DSERVE_ASSIGN_OR_RETURN(std::string text, PyStr(v));
      out->append(text);
      return absl::OkStatus();
    }
    case Kind::kString:
      AppendPyJsonString(*v.str, out);
      return absl::OkStatus();
    case Kind::kArray: {
      const auto& items = v.array->items;
      if (items.empty()) {
        out->append("[]");
        return absl::OkStatus();
      }
      out->push_back('[');
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) out->append(indent ? "," : ", ");
        if (indent) newline(level + 1);
        DSERVE_RETURN_IF_ERROR(ToPyJson(items[i], indent, level + 1, out));
      }
      if (indent) newline(level);
      out->push_back(']');
      return absl::OkStatus();
    }
    case Kind::kObject: {
      const auto& entries = v.object->entries;
      if (entries.empty()) {
        out->append("{}");
        return absl::OkStatus();
      }
      out->push_back('{');
      for (size_t i = 0; i < entries.size(); ++i) {
        if (i > 0) out->append(indent ? "," : ", ");
        if (indent) newline(level + 1);
        AppendPyJsonString(entries[i].first, out);
        out->append(": ");
        DSERVE_RETURN_IF_ERROR(ToPyJson(entries[i].second, indent, level + 1, out));
      }
      if (indent) newline(level);
      out->push_back('}');
      return absl::OkStatus();
    }
    default:
      return absl::InvalidArgumentError(absl::StrCat("tojson: cannot serialize a ", KindName(v)));
  }
}

absl::StatusOr<Value> FromJson(const nlohmann::json& j, int depth) {
  if (depth > kMaxJsonDepth) return absl::InvalidArgumentError("context nests too deeply");
  switch (j.type()) {
    case nlohmann::json::value_t::null:
      return Value::Null();
    case nlohmann::json::value_t::boolean:
      return Value::Bool(j.get<bool>());
    case nlohmann::json::value_t::number_integer:
      return Value::Number(static_cast<double>(j.get<int64_t>()), false);
    case nlohmann::json::value_t::number_unsigned:
      return Value::Number(static_cast<double>(j.get<uint64_t>()), false);
    case nlohmann::json::value_t::number_float:
      return Value::Number(j.get<double>(), true);
    case nlohmann::json::value_t::string:
      return Value::String(j.get<std::string>());
    case nlohmann::json::value_t::array: {
      std::vector<Value> items;
      items.reserve(j.size());
      for (const auto& item : j) {
        DSERVE_ASSIGN_OR_RETURN(Value v, FromJson(item, depth + 1));
        items.push_back(std::move(v));
      }
      return Value::Array(std::move(items));
    }
    case nlohmann::json::value_t::object: {
      auto object = std::make_shared<ObjectData>();
      for (const auto& [key, item] : j.items()) {
        DSERVE_ASSIGN_OR_RETURN(Value v, FromJson(item, depth + 1));
        object->entries.emplace_back(key, std::move(v));
      }
      return Value::Object(std::move(object));
    }
    default:
      return absl::InvalidArgumentError("context holds a binary or discarded JSON value");
  }
}

struct CallArgs {
  std::vector<Value> positional;
  std::vector<std::pair<std::string, Value>> keyword;
};

class Interpreter {
 public:
  explicit Interpreter(absl::string_view source) : source_(source) {}

  absl::Status Exec(const std::vector<Stmt>& body, Scope* scope, std::string* out) {
    for (const Stmt& s : body) DSERVE_RETURN_IF_ERROR(ExecOne(s, scope, out));
    return absl::OkStatus();
  }

 private:
  absl::Status Error(uint32_t pos, absl::string_view message) const {
    return ErrorAt(source_, pos, message);
  }
  // At: re-anchors an error from a helper at a template position.
  absl::Status At(uint32_t pos, const absl::Status& s) const {
    return s.ok() ? s : ErrorAt(source_, pos, s.message());
  }

  absl::Status ExecOne(const Stmt& s, Scope* scope, std::string* out) {
    switch (s.kind) {
      case StmtKind::kText:
        out->append(s.text);
        return absl::OkStatus();
      case StmtKind::kOutput: {
        DSERVE_ASSIGN_OR_RETURN(Value v, Eval(*s.expr, scope));
        auto text = JsToString(v);
        if (!text.ok()) return At(s.expr->pos, text.status());
        out->append(*text);
        return absl::OkStatus();
      }
      case StmtKind::kIf: {
        DSERVE_ASSIGN_OR_RETURN(Value test, Eval(*s.expr, scope));
        return Exec(Truthy(test) ? s.body : s.orelse, scope, out);
      }
      case StmtKind::kFor:
        return ExecFor(s, scope, out);
      case StmtKind::kSet: {
        DSERVE_ASSIGN_OR_RETURN(Value value, Eval(*s.expr, scope));
        if (s.target == nullptr) {
          scope->Set(s.name, std::move(value));
          return absl::OkStatus();
        }
        DSERVE_ASSIGN_OR_RETURN(Value object, Eval(*s.target, scope));
        if (!object.is_object()) {
          return Error(s.pos, absl::StrCat("cannot set attribute '", s.name, "' of a ",
                                           KindName(object), " (only of a namespace or dict)"));
        }
        object.object->Set(s.name, std::move(value));
        return absl::OkStatus();
      }
    }
    return absl::OkStatus();
  }

  absl::Status ExecFor(const Stmt& s, Scope* scope, std::string* out) {
    Scope loop_scope(scope);
    DSERVE_ASSIGN_OR_RETURN(Value iterable, Eval(*s.expr, &loop_scope));
    if (!iterable.is_array()) {
      return Error(s.expr->pos,
                   absl::StrCat("cannot loop over a ", KindName(iterable), " (only over a list)"));
    }
    const std::shared_ptr<ArrayData> items = iterable.array;
    const size_t n = items->items.size();
    for (size_t i = 0; i < n; ++i) {
      auto loop = std::make_shared<ObjectData>();
      const double length = static_cast<double>(n);
      const double index = static_cast<double>(i);
      loop->entries = {
          {"index", Value::Number(index + 1, false)},
          {"index0", Value::Number(index, false)},
          {"revindex", Value::Number(length - index, false)},
          {"revindex0", Value::Number(length - index - 1, false)},
          {"first", Value::Bool(i == 0)},
          {"last", Value::Bool(i + 1 == n)},
          {"length", Value::Number(length, false)},
          {"previtem", i > 0 ? items->items[i - 1] : Value::Undefined()},
          {"nextitem", i + 1 < n ? items->items[i + 1] : Value::Undefined()},
      };
      loop_scope.Set("loop", Value::Object(std::move(loop)));
      const Value& item = items->items[i];
      if (!s.unpack) {
        loop_scope.Set(s.loop_vars[0], item);
      } else {
        if (!item.is_array() || item.is_tuple) {
          return Error(s.pos, absl::StrCat("cannot unpack a ", KindName(item)));
        }
        if (item.array->items.size() != s.loop_vars.size()) {
          return Error(s.pos, absl::StrCat("cannot unpack ", item.array->items.size(),
                                           " items into ", s.loop_vars.size(), " names"));
        }
        for (size_t k = 0; k < s.loop_vars.size(); ++k) {
          loop_scope.Set(s.loop_vars[k], item.array->items[k]);
        }
      }
      DSERVE_RETURN_IF_ERROR(Exec(s.body, &loop_scope, out));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<Value> Eval(const Expr& e, Scope* scope) {
    switch (e.kind) {
      case ExprKind::kLiteral:
        return e.literal;
      case ExprKind::kName: {
        const Value* v = scope->Lookup(e.name);
        return v != nullptr ? *v : Value::Undefined();
      }
      case ExprKind::kList:
      case ExprKind::kTuple: {
        std::vector<Value> items;
        items.reserve(e.items.size());
        for (const ExprPtr& item : e.items) {
          DSERVE_ASSIGN_OR_RETURN(Value v, Eval(*item, scope));
          items.push_back(std::move(v));
        }
        return Value::Array(std::move(items), e.kind == ExprKind::kTuple);
      }
      case ExprKind::kDict: {
        auto object = std::make_shared<ObjectData>();
        for (size_t i = 0; i + 1 < e.items.size(); i += 2) {
          DSERVE_ASSIGN_OR_RETURN(Value key, Eval(*e.items[i], scope));
          if (!key.is_string()) {
            return Error(e.items[i]->pos,
                         absl::StrCat("a dict key must be a string, not a ", KindName(key)));
          }
          DSERVE_ASSIGN_OR_RETURN(Value value, Eval(*e.items[i + 1], scope));
          object->Set(*key.str, std::move(value));
        }
        return Value::Object(std::move(object));
      }
      case ExprKind::kAttr: {
        DSERVE_ASSIGN_OR_RETURN(Value object, Eval(*e.a, scope));
        return GetMember(object, Value::String(e.name), e.pos);
      }
      case ExprKind::kIndex: {
        DSERVE_ASSIGN_OR_RETURN(Value object, Eval(*e.a, scope));
        DSERVE_ASSIGN_OR_RETURN(Value key, Eval(*e.b, scope));
        return GetMember(object, key, e.pos);
      }
      case ExprKind::kSlice:
        return EvalSlice(e, scope);
      case ExprKind::kCall:
        return EvalCall(e, scope);
      case ExprKind::kNot: {
        DSERVE_ASSIGN_OR_RETURN(Value v, Eval(*e.a, scope));
        return Value::Bool(JsNot(v));
      }
      case ExprKind::kNegate:
      case ExprKind::kPlus: {
        DSERVE_ASSIGN_OR_RETURN(Value v, Eval(*e.a, scope));
        if (!v.is_number()) {
          return Error(e.pos, absl::StrCat("unary ", e.kind == ExprKind::kNegate ? "-" : "+",
                                           " needs a number, not a ", KindName(v)));
        }
        if (e.kind == ExprKind::kNegate) v.number = -v.number;
        return v;
      }
      case ExprKind::kBinary:
        return EvalBinary(e, scope);
      case ExprKind::kTernary: {
        DSERVE_ASSIGN_OR_RETURN(Value test, Eval(*e.b, scope));
        const Expr& chosen = Truthy(test) ? *e.a : *e.c;
        DSERVE_ASSIGN_OR_RETURN(Value v, Eval(chosen, scope));
        // The reference renders the chosen branch like a block: always text.
        auto text = JsToString(v);
        if (!text.ok()) return At(chosen.pos, text.status());
        return Value::String(*std::move(text));
      }
      case ExprKind::kFilter:
        return EvalFilter(e, scope);
      case ExprKind::kTest:
        return EvalTest(e, scope);
    }
    return Error(e.pos, "unknown expression");
  }

  absl::StatusOr<Value> GetMember(const Value& object, const Value& key, uint32_t pos) {
    switch (object.kind) {
      case Kind::kObject: {
        if (!key.is_string()) {
          return Error(pos, absl::StrCat("cannot index a dict with a ", KindName(key)));
        }
        if (const Value* v = object.object->Find(*key.str)) return *v;
        if (const std::optional<Builtin> method = DictMethod(*key.str)) {
          return FunctionValue(*method, object);
        }
        return Value::Undefined();
      }
      case Kind::kArray:
      case Kind::kString: {
        if (key.is_number()) {
          double index = std::isnan(key.number) ? 0 : std::trunc(key.number);
          if (object.is_array()) {
            const double n = static_cast<double>(object.array->items.size());
            if (index < 0) index += n;
            if (index < 0 || index >= n) return Value::Undefined();
            return object.array->items[static_cast<size_t>(index)];
          }
          // JavaScript indexes strings by UTF-16 unit.
          const double n = static_cast<double>(Utf16Length(*object.str));
          if (index < 0) index += n;
          if (index < 0 || index >= n) return Error(pos, "string index out of range");
          const auto target = static_cast<size_t>(index);
          size_t unit = 0;
          for (size_t i = 0; i < object.str->size();) {
            const size_t start = i;
            const char32_t c = DecodeUtf8(*object.str, &i);
            const size_t width = c >= 0x10000 ? 2 : 1;
            if (target < unit + width) {
              if (width == 2) {
                return Error(pos, "string index falls inside a character outside the BMP");
              }
              return Value::String(object.str->substr(start, i - start));
            }
            unit += width;
          }
          return Error(pos, "string index out of range");
        }
        if (key.is_string()) {
          if (*key.str == "length") {
            return Value::Number(static_cast<double>(object.is_array() ? object.array->items.size()
                                                                       : Utf16Length(*object.str)),
                                 false);
          }
          if (object.is_string()) {
            if (const std::optional<Builtin> method = StringMethod(*key.str)) {
              return FunctionValue(*method, object);
            }
          }
          return Value::Undefined();
        }
        return Error(pos,
                     absl::StrCat("cannot index a ", KindName(object), " with a ", KindName(key)));
      }
      default:
        if (!key.is_string()) {
          return Error(
              pos, absl::StrCat("cannot index a ", KindName(object), " with a ", KindName(key)));
        }
        return Value::Undefined();
    }
  }

  absl::StatusOr<Value> EvalSlice(const Expr& e, Scope* scope) {
    DSERVE_ASSIGN_OR_RETURN(Value object, Eval(*e.a, scope));
    if (!object.is_array() && !object.is_string()) {
      return Error(e.pos, absl::StrCat("cannot slice a ", KindName(object)));
    }
    std::optional<int64_t> parts[3];
    for (int k = 0; k < 3; ++k) {
      if (e.items[k] == nullptr) continue;
      DSERVE_ASSIGN_OR_RETURN(Value v, Eval(*e.items[k], scope));
      if (v.is_undefined()) continue;
      parts[k] = Integer(v);
      if (!parts[k].has_value()) {
        return Error(e.items[k]->pos, "slice bounds must be integers");
      }
    }
    const int64_t step = parts[2].value_or(1);
    if (step == 0) return Error(e.pos, "slice step cannot be zero");
    std::vector<char32_t> cps;
    if (object.is_string()) cps = CodePoints(*object.str);
    const auto length =
        static_cast<int64_t>(object.is_array() ? object.array->items.size() : cps.size());
    // The reference's slice(): Python's rules except for a negative step's
    // explicit stop of -1, which it reads as "through the first item".
    int64_t start = 0;
    int64_t stop = 0;
    if (step > 0) {
      start = parts[0].value_or(0);
      start = start < 0 ? std::max<int64_t>(length + start, 0) : std::min(start, length);
      stop = parts[1].value_or(length);
      stop = stop < 0 ? std::max<int64_t>(length + stop, 0) : std::min(stop, length);
    } else {
      start = parts[0].value_or(length - 1);
      start = start < 0 ? std::max<int64_t>(length + start, -1) : std::min(start, length - 1);
      stop = parts[1].value_or(-1);
      stop = stop < -1 ? std::max<int64_t>(length + stop, -1) : std::min(stop, length - 1);
    }
    std::vector<Value> items;
    std::string text;
    for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
      if (object.is_array()) {
        items.push_back(object.array->items[static_cast<size_t>(i)]);
      } else {
        AppendUtf8(cps[static_cast<size_t>(i)], &text);
      }
    }
    if (object.is_array()) return Value::Array(std::move(items));
    return Value::String(std::move(text));
  }

  absl::StatusOr<CallArgs> EvalArgs(const Expr& e, Scope* scope) {
    CallArgs args;
    for (const ExprPtr& item : e.items) {
      DSERVE_ASSIGN_OR_RETURN(Value v, Eval(*item, scope));
      args.positional.push_back(std::move(v));
    }
    for (const auto& [name, item] : e.kwargs) {
      DSERVE_ASSIGN_OR_RETURN(Value v, Eval(*item, scope));
      args.keyword.emplace_back(name, std::move(v));
    }
    return args;
  }

  absl::StatusOr<Value> EvalCall(const Expr& e, Scope* scope) {
    DSERVE_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(e, scope));
    DSERVE_ASSIGN_OR_RETURN(Value callee, Eval(*e.a, scope));
    if (callee.kind != Kind::kFunction) {
      const std::string what = e.a->kind == ExprKind::kAttr ? "." + e.a->name : e.a->name;
      return Error(e.pos, absl::StrCat("cannot call '", what, "': it is a ", KindName(callee)));
    }
    absl::StatusOr<Value> result = Call(*callee.function, args);
    if (!result.ok()) return At(e.pos, result.status());
    return result;
  }

  absl::StatusOr<Value> EvalBinary(const Expr& e, Scope* scope) {
    DSERVE_ASSIGN_OR_RETURN(Value left, Eval(*e.a, scope));
    if (e.op == BinaryOp::kAnd) return Truthy(left) ? Eval(*e.b, scope) : left;
    if (e.op == BinaryOp::kOr) return Truthy(left) ? left : Eval(*e.b, scope);
    DSERVE_ASSIGN_OR_RETURN(Value right, Eval(*e.b, scope));
    absl::StatusOr<Value> result = Binary(e.op, left, right);
    if (!result.ok()) return At(e.pos, result.status());
    return result;
  }

  static absl::StatusOr<Value> Binary(BinaryOp op, const Value& left, const Value& right) {
    if (op == BinaryOp::kEq || op == BinaryOp::kNe) {
      DSERVE_ASSIGN_OR_RETURN(const bool equal, LooseEquals(left, right));
      return Value::Bool(equal == (op == BinaryOp::kEq));
    }
    if (op == BinaryOp::kConcat) {
      DSERVE_ASSIGN_OR_RETURN(std::string a, PyStr(left));
      DSERVE_ASSIGN_OR_RETURN(std::string b, PyStr(right));
      return Value::String(a + b);
    }
    static constexpr absl::string_view kOpNames[] = {"or", "and", "==", "!=",     "<", ">",
                                                     "<=", ">=",  "in", "not in", "+", "-",
                                                     "*",  "/",   "%",  "~"};
    const absl::string_view op_name = kOpNames[static_cast<int>(op)];
    if (left.is_undefined() || right.is_undefined()) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot apply '", op_name, "' to an undefined value"));
    }
    if (left.is_null() || right.is_null()) {
      return absl::InvalidArgumentError(absl::StrCat("cannot apply '", op_name, "' to none"));
    }
    if (left.is_number() && right.is_number()) {
      const double a = left.number;
      const double b = right.number;
      const bool is_float = left.is_float || right.is_float;
      switch (op) {
        case BinaryOp::kAdd:
          return Value::Number(a + b, is_float);
        case BinaryOp::kSub:
          return Value::Number(a - b, is_float);
        case BinaryOp::kMul:
          return Value::Number(a * b, is_float);
        case BinaryOp::kDiv:
          return Value::Number(a / b, true);
        case BinaryOp::kMod:
          return Value::Number(std::fmod(a, b), is_float);
        case BinaryOp::kLt:
          return Value::Bool(a < b);
        case BinaryOp::kGt:
          return Value::Bool(a > b);
        case BinaryOp::kLe:
          return Value::Bool(a <= b);
        case BinaryOp::kGe:
          return Value::Bool(a >= b);
        default:
          break;
      }
    } else if (left.is_array() && right.is_array()) {
      if (op == BinaryOp::kAdd) {
        std::vector<Value> items = left.array->items;
        items.insert(items.end(), right.array->items.begin(), right.array->items.end());
        return Value::Array(std::move(items));
      }
    } else if (right.is_array()) {
      if (op == BinaryOp::kIn || op == BinaryOp::kNotIn) {
        bool found = false;
        for (const Value& item : right.array->items) found = found || StrictEquals(item, left);
        return Value::Bool(found == (op == BinaryOp::kIn));
      }
    }
    if (op == BinaryOp::kAdd && (left.is_string() || right.is_string())) {
      DSERVE_ASSIGN_OR_RETURN(std::string a, JsToString(left));
      DSERVE_ASSIGN_OR_RETURN(std::string b, JsToString(right));
      return Value::String(a + b);
    }
    if (left.is_string() && right.is_string()) {
      const std::string& a = *left.str;
      const std::string& b = *right.str;
      switch (op) {
        case BinaryOp::kIn:
          return Value::Bool(b.find(a) != std::string::npos);
        case BinaryOp::kNotIn:
          return Value::Bool(b.find(a) == std::string::npos);
        // Not in the reference: Python compares by code point, which is the
        // byte order of UTF-8.
        case BinaryOp::kLt:
          return Value::Bool(a < b);
        case BinaryOp::kGt:
          return Value::Bool(a > b);
        case BinaryOp::kLe:
          return Value::Bool(a <= b);
        case BinaryOp::kGe:
          return Value::Bool(a >= b);
        default:
          break;
      }
    }
    if (left.is_string() && right.is_object()) {
      if (op == BinaryOp::kIn || op == BinaryOp::kNotIn) {
        const bool found = right.object->Find(*left.str) != nullptr;
        return Value::Bool(found == (op == BinaryOp::kIn));
      }
    }
    return absl::InvalidArgumentError(absl::StrCat("unsupported operand types for '", op_name,
                                                   "': ", KindName(left), " and ",
                                                   KindName(right)));
  }

  absl::StatusOr<Value> EvalTest(const Expr& e, Scope* scope) {
    DSERVE_ASSIGN_OR_RETURN(Value v, Eval(*e.a, scope));
    bool result = false;
    const absl::string_view name = e.name;
    if (name == "defined") {
      result = !v.is_undefined();
    } else if (name == "undefined") {
      result = v.is_undefined();
    } else if (name == "none") {
      result = v.is_null();
    } else if (name == "boolean") {
      result = v.kind == Kind::kBool;
    } else if (name == "true") {
      result = v.kind == Kind::kBool && v.boolean;
    } else if (name == "false") {
      result = v.kind == Kind::kBool && !v.boolean;
    } else if (name == "number") {
      result = v.is_number();
    } else if (name == "integer") {
      result = v.is_number() && std::isfinite(v.number) && v.number == std::trunc(v.number);
    } else if (name == "iterable") {
      result = v.is_array() || v.is_string();
    } else if (name == "callable") {
      result = v.kind == Kind::kFunction;
    } else if (name == "odd" || name == "even") {
      if (!v.is_number()) {
        return Error(e.pos, absl::StrCat("test '", name, "' needs a number, not a ", KindName(v)));
      }
      const double remainder = std::fmod(v.number, 2);
      result = name == "odd" ? remainder != 0 : remainder == 0;
    } else if (name == "lower" || name == "upper") {
      if (v.is_string()) {
        absl::StatusOr<std::string> mapped = JsCaseMap(*v.str, name == "upper");
        if (!mapped.ok()) return At(e.pos, mapped.status());
        result = *mapped == *v.str;
      }
    } else if (name == "string") {
      result = v.is_string();
    } else if (name == "mapping") {
      result = v.is_object();
    } else {
      return Error(e.pos, absl::StrCat("unsupported test '", name, "'"));
    }
    return Value::Bool(result != e.negate);
  }

  absl::StatusOr<Value> EvalFilter(const Expr& e, Scope* scope) {
    DSERVE_ASSIGN_OR_RETURN(Value operand, Eval(*e.a, scope));
    DSERVE_ASSIGN_OR_RETURN(CallArgs args, EvalArgs(e, scope));
    absl::StatusOr<Value> result = Filter(e.name, operand, args);
    if (!result.ok()) return At(e.pos, result.status());
    return result;
  }

  // Arg: positional `index`, else keyword `name`, else nullopt.
  static std::optional<Value> Arg(const CallArgs& args, size_t index, absl::string_view name) {
    if (index < args.positional.size()) return args.positional[index];
    for (const auto& [k, v] : args.keyword) {
      if (k == name) return v;
    }
    return std::nullopt;
  }

  // CheckArgs: at most `max_positional` positional arguments and only the
  // listed keywords.
  static absl::Status CheckArgs(absl::string_view what, const CallArgs& args, size_t max_positional,
                                std::initializer_list<absl::string_view> keywords) {
    if (args.positional.size() > max_positional) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " takes at most ", max_positional, " positional arguments"));
    }
    for (const auto& [k, v] : args.keyword) {
      bool known = false;
      for (const absl::string_view keyword : keywords) known = known || keyword == k;
      if (!known) {
        return absl::InvalidArgumentError(absl::StrCat(what, " has no argument named '", k, "'"));
      }
    }
    return absl::OkStatus();
  }

  static absl::Status TypeError(absl::string_view what, const Value& v) {
    return absl::InvalidArgumentError(absl::StrCat(what, " cannot be applied to a ", KindName(v)));
  }

  static absl::StatusOr<std::string> StringArg(absl::string_view what,
                                               const std::optional<Value>& v) {
    if (!v.has_value() || !v->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(what, " needs a string argument"));
    }
    return *v->str;
  }

  static absl::StatusOr<Value> Filter(absl::string_view name, const Value& v,
                                      const CallArgs& args) {
    const std::string what = absl::StrCat("filter '", name, "'");
    if (name == "default" || name == "d") {
      DSERVE_RETURN_IF_ERROR(CheckArgs(what, args, 2, {"default_value", "boolean"}));
      const Value fallback = Arg(args, 0, "default_value").value_or(Value::String(""));
      const bool boolean = Truthy(Arg(args, 1, "boolean").value_or(Value::Bool(false)));
      return (v.is_undefined() || (boolean && !Truthy(v))) ? fallback : v;
    }
    if (name == "tojson") {
      DSERVE_RETURN_IF_ERROR(CheckArgs(what, args, 0, {"indent"}));
      std::optional<int64_t> indent;
      const std::optional<Value> indent_arg = Arg(args, 99, "indent");
      if (indent_arg.has_value() && !indent_arg->is_null()) {
        indent = Integer(*indent_arg);
        if (!indent.has_value() || *indent < 0 || *indent > 64) {
          return absl::InvalidArgumentError("tojson: indent must be an integer in [0, 64]");
        }
      }
      std::string text;
      DSERVE_RETURN_IF_ERROR(ToPyJson(v, indent, 0, &text));
      return Value::String(std::move(text));
    }
    if (name == "join") {
      DSERVE_RETURN_IF_ERROR(CheckArgs(what, args, 1, {"d"}));
      const std::optional<Value> sep_arg = Arg(args, 0, "d");
      std::string sep;
      if (sep_arg.has_value()) {
        DSERVE_ASSIGN_OR_RETURN(sep, PyStr(*sep_arg));
      }
      if (!v.is_array()) return TypeError(what, v);
      std::string out;
      for (size_t i = 0; i < v.array->items.size(); ++i) {
        DSERVE_ASSIGN_OR_RETURN(std::string item, PyStr(v.array->items[i]));
        absl::StrAppend(&out, i == 0 ? "" : sep, item);
      }
      return Value::String(std::move(out));
    }
    if (name == "replace") {
      DSERVE_RETURN_IF_ERROR(CheckArgs(what, args, 3, {"old", "new", "count"}));
      if (!v.is_string()) return TypeError(what, v);
      return Replace(what, *v.str, Arg(args, 0, "old"), Arg(args, 1, "new"), Arg(args, 2, "count"));
    }
    DSERVE_RETURN_IF_ERROR(CheckArgs(what, args, 0, {}));
    if (name == "safe") return v;
    if (name == "string") {
      DSERVE_ASSIGN_OR_RETURN(std::string text, PyStr(v));
      return Value::String(std::move(text));
    }
    switch (v.kind) {
      case Kind::kArray: {
        const auto& items = v.array->items;
        if (name == "list") return v;
        if (name == "length" || name == "count") {
          return Value::Number(static_cast<double>(items.size()), false);
        }
        if (name == "first" || name == "last") {
          if (items.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": empty list"));
          return name == "first" ? items.front() : items.back();
        }
        break;
      }
      case Kind::kString: {
        const std::string& s = *v.str;
        if (name == "length" || name == "count") {
          return Value::Number(static_cast<double>(Utf16Length(s)), false);
        }
        if (name == "upper" || name == "lower") {
          DSERVE_ASSIGN_OR_RETURN(std::string mapped, JsCaseMap(s, name == "upper"));
          return Value::String(std::move(mapped));
        }
        if (name == "title") return Value::String(JsTitle(s));
        if (name == "capitalize") {
          DSERVE_ASSIGN_OR_RETURN(std::string text, JsCapitalize(s));
          return Value::String(std::move(text));
        }
        if (name == "trim") return Value::String(Strip(s, std::nullopt, true, true, true));
        if (name == "first" || name == "last") {
          const std::vector<char32_t> cps = CodePoints(s);
          if (cps.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": empty string"));
          std::string c;
          AppendUtf8(name == "first" ? cps.front() : cps.back(), &c);
          return Value::String(std::move(c));
        }
        break;
      }
      case Kind::kObject:
        if (name == "length" || name == "count") {
          return Value::Number(static_cast<double>(v.object->entries.size()), false);
        }
        if (name == "items") return Items(v);
        break;
      case Kind::kNumber:
        if (name == "abs") return Value::Number(std::fabs(v.number), v.is_float);
        break;
      default:
        break;
    }
    return TypeError(what, v);
  }

  static Value Items(const Value& object) {
    std::vector<Value> pairs;
    for (const auto& [k, item] : object.object->entries) {
      pairs.push_back(Value::Array({Value::String(k), item}));
    }
    return Value::Array(std::move(pairs));
  }

  // JsTitle: the reference's title(): an ASCII word character after a non-word
  // character (or at the start) is uppercased; nothing is lowercased.
  static std::string JsTitle(absl::string_view s) {
    std::string out(s);
    for (size_t i = 0; i < out.size(); ++i) {
      const bool boundary = i == 0 || !IsWordChar(out[i - 1]);
      if (boundary && out[i] >= 'a' && out[i] <= 'z') out[i] = static_cast<char>(out[i] - 32);
    }
    return out;
  }

  // JsCapitalize: the reference's capitalize: the first UTF-16 unit
  // uppercased, the rest unchanged.
  static absl::StatusOr<std::string> JsCapitalize(absl::string_view s) {
    if (s.empty()) return std::string();
    size_t i = 0;
    const char32_t first = DecodeUtf8(s, &i);
    if (first >= 0x10000) return std::string(s);  // A lone surrogate has no case.
    std::string head;
    AppendUtf8(first, &head);
    DSERVE_ASSIGN_OR_RETURN(std::string upper, JsCaseMap(head, true));
    return absl::StrCat(upper, s.substr(i));
  }

  // Strip: removes `chars` (any of its code points) or, without chars,
  // whitespace (JavaScript's set when js_space, else Python's) from the ends.
  static std::string Strip(absl::string_view s, const std::optional<std::string>& chars,
                           bool js_space, bool left, bool right) {
    const std::vector<char32_t> cps = CodePoints(s);
    std::vector<char32_t> strip_set;
    if (chars.has_value()) strip_set = CodePoints(*chars);
    auto strip = [&](char32_t c) {
      if (!chars.has_value()) return js_space ? IsJsSpace(c) : IsPySpace(c);
      for (const char32_t x : strip_set) {
        if (x == c) return true;
      }
      return false;
    };
    size_t begin = 0;
    size_t end = cps.size();
    if (left) {
      while (begin < end && strip(cps[begin])) ++begin;
    }
    if (right) {
      while (end > begin && strip(cps[end - 1])) --end;
    }
    return FromCodePoints(cps, begin, end);
  }

  // Replace: Python's str.replace(old, new[, count]).
  static absl::StatusOr<Value> Replace(absl::string_view what, const std::string& s,
                                       const std::optional<Value>& old_arg,
                                       const std::optional<Value>& new_arg,
                                       const std::optional<Value>& count_arg) {
    DSERVE_ASSIGN_OR_RETURN(const std::string old_text, StringArg(what, old_arg));
    DSERVE_ASSIGN_OR_RETURN(const std::string new_text, StringArg(what, new_arg));
    int64_t count = -1;
    if (count_arg.has_value() && !count_arg->is_null()) {
      const std::optional<int64_t> c = Integer(*count_arg);
      if (!c.has_value())
        return absl::InvalidArgumentError(absl::StrCat(what, ": count must be an integer"));
      count = *c;
    }
    std::string out;
    if (old_text.empty()) {
      // Python inserts `new` before every code point and at the end.
      const std::vector<char32_t> cps = CodePoints(s);
      int64_t done = 0;
      for (size_t i = 0; i <= cps.size(); ++i) {
        if (count < 0 || done < count) {
          out.append(new_text);
          ++done;
        }
        if (i < cps.size()) AppendUtf8(cps[i], &out);
      }
      return Value::String(std::move(out));
    }
    size_t at = 0;
    int64_t done = 0;
    while (count < 0 || done < count) {
      const size_t found = s.find(old_text, at);
      if (found == std::string::npos) break;
      out.append(s, at, found - at);
      out.append(new_text);
      at = found + old_text.size();
      ++done;
    }
    out.append(s, at, std::string::npos);
    return Value::String(std::move(out));
  }

  // Split: Python's str.split(sep=None, maxsplit=-1).
  static absl::StatusOr<Value> Split(const std::string& s, const std::optional<Value>& sep_arg,
                                     const std::optional<Value>& maxsplit_arg) {
    int64_t maxsplit = -1;
    if (maxsplit_arg.has_value()) {
      const std::optional<int64_t> m = Integer(*maxsplit_arg);
      if (!m.has_value()) return absl::InvalidArgumentError("split: maxsplit must be an integer");
      maxsplit = *m;
    }
    std::vector<Value> parts;
    if (!sep_arg.has_value() || sep_arg->is_null()) {
      const std::vector<char32_t> cps = CodePoints(s);
      size_t i = 0;
      while (i < cps.size() && IsPySpace(cps[i])) ++i;
      while (i < cps.size()) {
        if (maxsplit >= 0 && static_cast<int64_t>(parts.size()) == maxsplit) {
          parts.push_back(Value::String(FromCodePoints(cps, i, cps.size())));
          break;
        }
        size_t j = i;
        while (j < cps.size() && !IsPySpace(cps[j])) ++j;
        parts.push_back(Value::String(FromCodePoints(cps, i, j)));
        i = j;
        while (i < cps.size() && IsPySpace(cps[i])) ++i;
      }
      return Value::Array(std::move(parts));
    }
    if (!sep_arg->is_string()) return absl::InvalidArgumentError("split: sep must be a string");
    const std::string& sep = *sep_arg->str;
    if (sep.empty()) return absl::InvalidArgumentError("split: empty separator");
    size_t at = 0;
    while (maxsplit < 0 || static_cast<int64_t>(parts.size()) < maxsplit) {
      const size_t found = s.find(sep, at);
      if (found == std::string::npos) break;
      parts.push_back(Value::String(s.substr(at, found - at)));
      at = found + sep.size();
    }
    parts.push_back(Value::String(s.substr(at)));
    return Value::Array(std::move(parts));
  }

  static absl::StatusOr<Value> AffixTest(absl::string_view what, const std::string& s,
                                         const std::optional<Value>& arg, bool prefix) {
    std::vector<std::string> candidates;
    if (arg.has_value() && arg->is_string()) {
      candidates.push_back(*arg->str);
    } else if (arg.has_value() && arg->is_array()) {
      for (const Value& item : arg->array->items) {
        if (!item.is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(what, " needs strings"));
        }
        candidates.push_back(*item.str);
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(what, " needs a string or a tuple of strings"));
    }
    for (const std::string& c : candidates) {
      if (c.size() <= s.size() && s.compare(prefix ? 0 : s.size() - c.size(), c.size(), c) == 0) {
        return Value::Bool(true);
      }
    }
    return Value::Bool(false);
  }

  static absl::StatusOr<Value> Call(const FunctionData& f, const CallArgs& args) {
    const Value& self = f.receiver;
    switch (f.id) {
      case Builtin::kNamespace: {
        if (args.positional.empty()) {
          auto object = std::make_shared<ObjectData>();
          for (const auto& [k, v] : args.keyword) object->Set(k, v);
          return Value::Object(std::move(object));
        }
        if (args.positional.size() == 1 && args.keyword.empty() && args.positional[0].is_object()) {
          return args.positional[0];  // The reference returns the dict itself.
        }
        return absl::InvalidArgumentError("namespace() takes keyword arguments or a single dict");
      }
      case Builtin::kRaiseException: {
        std::string message;
        if (!args.positional.empty()) {
          absl::StatusOr<std::string> text = JsToString(args.positional[0]);
          message = text.ok() ? *text : "(non-text message)";
        }
        return absl::InvalidArgumentError(absl::StrCat("raise_exception: ", message));
      }
      case Builtin::kRange: {
        DSERVE_RETURN_IF_ERROR(CheckArgs("range()", args, 3, {}));
        if (args.positional.empty()) {
          return absl::InvalidArgumentError("range() needs at least one argument");
        }
        int64_t bounds[3] = {0, 0, 1};
        for (size_t k = 0; k < args.positional.size(); ++k) {
          const std::optional<int64_t> b = Integer(args.positional[k]);
          if (!b.has_value()) return absl::InvalidArgumentError("range() needs integers");
          bounds[args.positional.size() == 1 ? 1 : k] = *b;
        }
        const auto [start, stop, step] = bounds;
        if (step <= 0) {
          return absl::InvalidArgumentError(
              "range() with a step below 1 is not supported (the reference returns no items)");
        }
        std::vector<Value> items;
        for (int64_t i = start; i < stop; i += step) {
          if (items.size() >= kMaxRangeLength) {
            return absl::InvalidArgumentError("range() is too long");
          }
          items.push_back(Value::Number(static_cast<double>(i), false));
        }
        return Value::Array(std::move(items));
      }
      case Builtin::kStrUpper:
      case Builtin::kStrLower: {
        DSERVE_RETURN_IF_ERROR(CheckArgs("str.upper/lower()", args, 0, {}));
        DSERVE_ASSIGN_OR_RETURN(std::string mapped,
                                JsCaseMap(*self.str, f.id == Builtin::kStrUpper));
        return Value::String(std::move(mapped));
      }
      case Builtin::kStrTitle:
        DSERVE_RETURN_IF_ERROR(CheckArgs("str.title()", args, 0, {}));
        return Value::String(JsTitle(*self.str));
      case Builtin::kStrStrip:
      case Builtin::kStrLstrip:
      case Builtin::kStrRstrip: {
        DSERVE_RETURN_IF_ERROR(CheckArgs("str.strip()", args, 1, {"chars"}));
        const std::optional<Value> chars_arg = Arg(args, 0, "chars");
        std::optional<std::string> chars;
        if (chars_arg.has_value() && !chars_arg->is_null()) {
          DSERVE_ASSIGN_OR_RETURN(chars, StringArg("str.strip()", chars_arg));
        }
        // strip() is the reference's (JavaScript trim); lstrip/rstrip are
        // Python's.
        const bool js = f.id == Builtin::kStrStrip;
        return Value::String(
            Strip(*self.str, chars, js, f.id != Builtin::kStrRstrip, f.id != Builtin::kStrLstrip));
      }
      case Builtin::kStrSplit:
        DSERVE_RETURN_IF_ERROR(CheckArgs("str.split()", args, 2, {"sep", "maxsplit"}));
        return Split(*self.str, Arg(args, 0, "sep"), Arg(args, 1, "maxsplit"));
      case Builtin::kStrStartswith:
      case Builtin::kStrEndswith: {
        const bool prefix = f.id == Builtin::kStrStartswith;
        const absl::string_view what = prefix ? "str.startswith()" : "str.endswith()";
        DSERVE_RETURN_IF_ERROR(CheckArgs(what, args, 1, {}));
        return AffixTest(what, *self.str, Arg(args, 0, ""), prefix);
      }
      case Builtin::kStrReplace:
        DSERVE_RETURN_IF_ERROR(CheckArgs("str.replace()", args, 3, {"count"}));
        return Replace("str.replace()", *self.str, Arg(args, 0, ""), Arg(args, 1, ""),
                       Arg(args, 2, "count"));
      case Builtin::kDictGet: {
        DSERVE_RETURN_IF_ERROR(CheckArgs("dict.get()", args, 2, {}));
        const std::optional<Value> key = Arg(args, 0, "");
        if (!key.has_value() || !key->is_string()) {
          return absl::InvalidArgumentError("dict.get() needs a string key");
        }
        if (const Value* v = self.object->Find(*key->str)) return *v;
        return Arg(args, 1, "").value_or(Value::Null());
      }
      case Builtin::kDictItems:
        DSERVE_RETURN_IF_ERROR(CheckArgs("dict.items()", args, 0, {}));
        return Items(self);
      case Builtin::kDictKeys:
      case Builtin::kDictValues: {
        DSERVE_RETURN_IF_ERROR(CheckArgs("dict.keys/values()", args, 0, {}));
        std::vector<Value> items;
        for (const auto& [k, v] : self.object->entries) {
          items.push_back(f.id == Builtin::kDictKeys ? Value::String(k) : v);
        }
        return Value::Array(std::move(items));
      }
    }
    return absl::InvalidArgumentError("unknown function");
  }

  absl::string_view source_;
};

class ParsedChatTemplate final : public ChatTemplate {
 public:
  ParsedChatTemplate(std::string source, std::vector<Stmt> body)
      : source_(std::move(source)), body_(std::move(body)) {}

  absl::StatusOr<std::string> Render(const nlohmann::json& context) const override {
    if (!context.is_object()) {
      return absl::InvalidArgumentError("chat template context must be a JSON object");
    }
    Scope globals(nullptr);
    globals.Set("namespace", FunctionValue(Builtin::kNamespace));
    globals.Set("raise_exception", FunctionValue(Builtin::kRaiseException));
    globals.Set("range", FunctionValue(Builtin::kRange));
    for (const auto& [key, item] : context.items()) {
      if (key == "namespace" || key == "raise_exception" || key == "range" || key == "true" ||
          key == "false") {
        return absl::InvalidArgumentError(
            absl::StrCat("chat template context key '", key, "' collides with a builtin"));
      }
      DSERVE_ASSIGN_OR_RETURN(Value value, FromJson(item, 0));
      globals.Set(key, std::move(value));
    }
    Interpreter interpreter(source_);
    std::string out;
    DSERVE_RETURN_IF_ERROR(interpreter.Exec(body_, &globals, &out));
    return out;
  }

 private:
  const std::string source_;
  const std::vector<Stmt> body_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Parse(absl::string_view source) {
  if (source.size() > std::numeric_limits<uint32_t>::max() / 2) {
    return absl::InvalidArgumentError("chat template is too large");
  }
  const SourceText text = Preprocess(source);
  DSERVE_ASSIGN_OR_RETURN(std::vector<Token> tokens, Lex(source, text));
  Parser parser(source, std::move(tokens));
  DSERVE_ASSIGN_OR_RETURN(std::vector<Stmt> body, parser.ParseTemplate());
  return std::make_unique<ParsedChatTemplate>(std::string(source), std::move(body));
}

}  // namespace dserve::tokenizer
