// Native batch front-end of the grounded-output parser.
//
// visioncoach/grounding.py is the specification: its module docstring fixes the grammar and
// `parse` is the reference this file must reproduce exactly (same claims, same float32
// numbers, same error count). Two ops:
//
//   parse_grounding(str[] texts)  the whole batch -> grounding.ClaimBatch's tensors plus, per
//                                 text, the think/answer spans and the malformation count, so
//                                 the Python side does no per-claim work.
//   identity_match(str[] pred, str[] gt, int mode)  I(o_m, o) of eq. 7 for every name pair.
//
// Texts arrive as UTF-8 (the dispatcher encodes each Python str). Every token of the grammar
// is ASCII and UTF-8 is self-synchronising, so searching bytes finds exactly the positions
// Python finds in code points; only whitespace needs decoding, since Python's (str.isspace,
// re's \s, str.split) is Unicode. Offsets handed back to Python are converted to code points.
// A str that is not valid Unicode (lone surrogates) does not encode: the call fails before
// reaching this file, and grounding.parse_texts falls back to Python.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/stack.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <charconv>
#include <cmath>
#include <cstring>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace visioncoach {
namespace {

using std::string_view;
using Box = std::array<float, 4>;

constexpr int64_t kAbsent = -1;  // offset of a block the text does not have

inline bool is_digit(char c) { return c >= '0' && c <= '9'; }

// s[pos:] starts with the literal: a fixed-size compare the compiler inlines (no memcmp call).
template <size_t N>
inline bool has_at(string_view s, size_t pos, const char (&lit)[N]) {
  return pos + (N - 1) <= s.size() && std::memcmp(s.data() + pos, lit, N - 1) == 0;
}

inline bool is_continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

// Byte length of the Python whitespace character (Py_UNICODE_ISSPACE) starting at s[i], or 0.
// The set: U+0009-000D, U+001C-0020, U+0085, U+00A0, U+1680, U+2000-200A, U+2028, U+2029,
// U+202F, U+205F, U+3000 (tests/test_grounding_native.py checks it against Python).
inline size_t space_at(string_view s, size_t i) {
  const auto c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) return ((c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20)) ? 1 : 0;
  const size_t n = s.size() - i;
  auto b = [&](size_t k) { return static_cast<unsigned char>(s[i + k]); };
  if (c == 0xC2) return n >= 2 && (b(1) == 0x85 || b(1) == 0xA0) ? 2 : 0;
  if (n < 3) return 0;
  if (c == 0xE1) return b(1) == 0x9A && b(2) == 0x80 ? 3 : 0;
  if (c == 0xE2) {
    if (b(1) == 0x80) {
      const auto t = b(2);
      return (t >= 0x80 && t <= 0x8A) || t == 0xA8 || t == 0xA9 || t == 0xAF ? 3 : 0;
    }
    return b(1) == 0x81 && b(2) == 0x9F ? 3 : 0;
  }
  if (c == 0xE3) return b(1) == 0x80 && b(2) == 0x80 ? 3 : 0;
  return 0;
}

// Byte length of the Python whitespace character ending at s[end - 1], or 0.
inline size_t space_before(string_view s, size_t end) {
  if (static_cast<unsigned char>(s[end - 1]) < 0x80) return space_at(s, end - 1);
  if (end >= 2 && static_cast<unsigned char>(s[end - 2]) == 0xC2) return space_at(s, end - 2);
  return end >= 3 && space_at(s, end - 3) == 3 ? 3 : 0;
}

// str.strip() with no argument.
string_view strip(string_view s) {
  size_t a = 0, k;
  while (a < s.size() && (k = space_at(s, a)) != 0) a += k;
  s.remove_prefix(a);
  size_t b = s.size();
  while (b > 0 && (k = space_before(s, b)) != 0) b -= k;
  return s.substr(0, b);
}

// Empty or all whitespace: `not s.strip()`, and grounding._is_blank.
inline bool is_blank(string_view s) { return strip(s).empty(); }

// Decimal digits -> nearest double, exactly as a correctly rounded strtod would. Clinger's
// fast path covers the numbers models write (<= 19 significant digits, <= 22 fraction
// digits): the integer w <= 2^53 and 10^e are exact doubles, so one IEEE multiply or divide
// rounds once, correctly. Anything else goes to std::from_chars (also correctly rounded).
// `digits` is the number without its sign; returns false only on a value out of double range.
constexpr double kPow10[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                             1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                             1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

bool decimal_to_double(string_view digits, size_t int_len, double* out) {
  uint64_t w = 0;
  int significant = 0, frac = 0;
  for (size_t k = 0; k < digits.size(); ++k) {
    const char c = digits[k];
    if (c == '.') continue;
    if (k > int_len) ++frac;
    if (significant > 0 || c != '0') ++significant;
    w = w * 10 + static_cast<uint64_t>(c - '0');  // wraps only when significant > 19: unused
  }
  if (significant <= 19 && w <= (uint64_t{1} << 53) && frac <= 22) {
    *out = frac == 0 ? static_cast<double>(w) : static_cast<double>(w) / kPow10[frac];
    return true;
  }
  const auto res = std::from_chars(digits.data(), digits.data() + digits.size(), *out,
                                   std::chars_format::fixed);
  return res.ec == std::errc() && res.ptr == digits.data() + digits.size();
}

// grounding.parse_number: ws* [-+]?(\d+(\.\d*)?|\.\d+) ws*, as float32. Python rounds the
// decimal to the nearest double (float()) and that double to float32 (struct "<f"), refusing
// what is not finite; the same two roundings happen here.
bool parse_number(string_view s, float* out) {
  // Fast path for the form models write (no whitespace, at most 19 digits and a dot): one
  // pass reads the digits into w, and Clinger's exact case (w <= 2^53, 10^frac exact) rounds
  // once, as decimal_to_double does. Anything else takes the general path below.
  {
    const char* p = s.data();
    const char* const e = p + s.size();
    const bool neg = p != e && *p == '-';
    p += p != e && (*p == '-' || *p == '+');
    bool plain = e - p >= 1 && e - p <= 19, dot = false;
    uint64_t w = 0;
    int n_digits = 0, frac = 0;
    for (; plain && p != e; ++p) {
      const char c = *p;
      if (is_digit(c)) {
        w = w * 10 + static_cast<uint64_t>(c - '0');
        ++n_digits;
        frac += dot;
      } else if (c == '.' && !dot) {
        dot = true;
      } else {
        plain = false;
      }
    }
    if (plain && n_digits > 0 && w <= (uint64_t{1} << 53)) {
      const double d = frac == 0 ? static_cast<double>(w) : static_cast<double>(w) / kPow10[frac];
      *out = static_cast<float>(neg ? -d : d);  // |d| <= 2^53: finite in float32
      return true;
    }
  }
  s = strip(s);
  const size_t n = s.size();
  size_t i = 0;
  if (i < n && (s[i] == '+' || s[i] == '-')) ++i;
  const size_t int_begin = i;
  while (i < n && is_digit(s[i])) ++i;
  const size_t int_end = i;
  size_t frac_digits = 0;
  if (i < n && s[i] == '.') {
    const size_t frac_begin = ++i;
    while (i < n && is_digit(s[i])) ++i;
    frac_digits = i - frac_begin;
  }
  if (i != n || (int_end == int_begin && frac_digits == 0)) return false;

  double d;
  if (!decimal_to_double(s.substr(int_begin), int_end - int_begin, &d)) {
    // Out of double range (from_chars leaves the value unset): a number with a non-zero
    // integer digit overflowed (inf, refused below), any other underflowed to a double that
    // float32 rounds to +-0.
    bool big = false;
    for (size_t k = int_begin; k < int_end && !big; ++k) big = s[k] != '0';
    d = big ? HUGE_VAL : 0.0;
  }
  if (s[0] == '-') d = -d;
  const float f = static_cast<float>(d);
  if (!std::isfinite(f)) return false;
  *out = f;
  return true;
}

// grounding.parse_box: the stripped content is "[" four numbers separated by "," "]".
bool parse_box(string_view s, Box* out) {
  s = strip(s);
  if (s.size() < 2 || s.front() != '[' || s.back() != ']') return false;
  s = s.substr(1, s.size() - 2);
  Box v{};
  size_t start = 0;
  for (int k = 0;; ++k) {
    const size_t comma = s.find(',', start);
    // More than 4 parts: stop here, so "[1,1,1,..." of 100 kB costs 5 parts, not all of them.
    if (k == 4) return false;
    const size_t len = comma == string_view::npos ? string_view::npos : comma - start;
    if (!parse_number(s.substr(start, len), &v[k])) return false;
    if (comma == string_view::npos) {
      if (k != 3) return false;
      break;
    }
    start = comma + 1;
  }
  if (v[2] < v[0]) std::swap(v[0], v[2]);
  if (v[3] < v[1]) std::swap(v[1], v[3]);
  *out = v;
  return true;
}

// Byte offset -> code-point offset of one UTF-8 text. Requests come in increasing order for
// a well-formed text (think start, claim names, think end, answer), so a cursor walks
// forward between them; ASCII texts (most) skip the walk.
class CharIndex {
 public:
  explicit CharIndex(string_view s) : s_(s) {
    unsigned char any = 0;  // a local OR-reduction vectorises; a per-byte branch does not
    for (char c : s) any |= static_cast<unsigned char>(c);
    ascii_ = any < 0x80;
  }
  int64_t operator()(size_t byte) {
    if (ascii_) return static_cast<int64_t>(byte);
    for (; pos_ < byte; ++pos_) chars_ += !is_continuation(s_[pos_]);
    while (pos_ > byte) chars_ -= !is_continuation(s_[--pos_]);
    return chars_;
  }

 private:
  string_view s_;
  bool ascii_;
  size_t pos_ = 0;
  int64_t chars_ = 0;  // code points in s_[0, pos_)
};

enum class Kind : uint8_t { kObj, kBox, kT };

// One well-closed grounding tag of think (grounding._Element); offsets are text bytes.
struct Element {
  Kind kind;
  bool valid;
  size_t start;  // '<' of the opening tag
  size_t end;    // just past the closing tag
  size_t content_begin, content_end;
  float t;
  Box box;
};

struct ClaimOut {
  int64_t text;
  size_t name_begin, name_end;     // bytes of the text
  int64_t name_cbegin, name_cend;  // the same in code points
  float t;
  size_t box_begin, box_count;     // into ChunkOut::boxes
};

// Claims and times of a contiguous range of texts (one parallel task), in text order, so
// concatenating the chunks in order gives the batch order without sorting.
struct ChunkOut {
  std::vector<ClaimOut> claims;
  std::vector<Box> boxes;
  std::vector<float> times;
  std::vector<int64_t> time_text;
  // Scratch reused from text to text (no allocation per text once warm).
  std::vector<size_t> lt;  // positions of every '<' of the current text
  std::vector<Element> elements;
};

// The block tags, from one pass over the '<' positions: grounding._block's spans (content of
// the first <name>, up to the first </name> after it; npos when absent) and the counts
// grounding._check_structure needs.
struct Blocks {
  size_t think_begin = string_view::npos, think_end = string_view::npos;
  size_t answer_begin = string_view::npos, answer_end = string_view::npos;
  int64_t counts[4] = {0, 0, 0, 0};  // <think>, </think>, <answer>, </answer>
  bool has_think() const { return think_end != string_view::npos; }
  bool has_answer() const { return answer_end != string_view::npos; }
};

Blocks find_blocks(string_view text, const std::vector<size_t>& lt) {
  Blocks b;
  size_t think_open = string_view::npos, answer_open = string_view::npos;
  for (size_t i : lt) {
    // None of the four tags can overlap itself or another, so counting at every '<' is
    // str.count's non-overlapping count.
    if (has_at(text, i, "<think>")) {
      ++b.counts[0];
      if (think_open == string_view::npos) think_open = i;
    } else if (has_at(text, i, "</think>")) {
      ++b.counts[1];
      // A closing tag seen after the first opening one lies past its end: no overlap.
      if (think_open != string_view::npos && b.think_end == string_view::npos) {
        b.think_begin = think_open + 7;
        b.think_end = i;
      }
    } else if (has_at(text, i, "<answer>")) {
      ++b.counts[2];
      if (answer_open == string_view::npos) answer_open = i;
    } else if (has_at(text, i, "</answer>")) {
      ++b.counts[3];
      if (answer_open != string_view::npos && b.answer_end == string_view::npos) {
        b.answer_begin = answer_open + 8;
        b.answer_end = i;
      }
    }
  }
  return b;
}

// grounding._check_structure, counting instead of writing messages.
int64_t structure_errors(string_view text, const Blocks& b) {
  int64_t errors = 0;
  for (int64_t c : b.counts) errors += c != 1;
  errors += !b.has_think();
  errors += !b.has_answer();
  if (!b.has_think() || !b.has_answer()) return errors;
  const size_t think_open = b.think_begin - 7, think_close_end = b.think_end + 8;
  const size_t answer_open = b.answer_begin - 8, answer_close_end = b.answer_end + 9;
  if (think_close_end > answer_open) return errors + 1;  // answer does not follow think
  errors += !is_blank(text.substr(0, think_open)) ||
            !is_blank(text.substr(think_close_end, answer_open - think_close_end)) ||
            !is_blank(text.substr(answer_close_end));
  errors += is_blank(text.substr(b.think_begin, b.think_end - b.think_begin));
  errors += is_blank(text.substr(b.answer_begin, b.answer_end - b.answer_begin));
  return errors;
}

// grounding._scan_think over think = text[begin, end): the well-closed <obj>/<box>/<t> tags,
// in order. A tag's content runs to the next '<', which must begin its own closing tag; the
// '<' of "</think>" at `end` counts as "no '<' in think" (Python searches think alone).
void scan_think(string_view text, size_t begin, size_t end, const std::vector<size_t>& lt,
                std::vector<Element>& out, int64_t* errors) {
  out.clear();
  // Index (from from_k on) of the first '<' at or after `pos` inside think, or lt.size().
  auto next_lt = [&](size_t from_k, size_t pos) {
    while (from_k < lt.size() && lt[from_k] < pos) ++from_k;
    return from_k < lt.size() && lt[from_k] < end ? from_k : lt.size();
  };
  const size_t first = std::lower_bound(lt.begin(), lt.end(), begin) - lt.begin();
  for (size_t k = next_lt(first, begin); k < lt.size();) {
    const size_t at = lt[k];
    const bool closing = has_at(text, at + 1, "/");
    const size_t name_at = at + 1 + closing;
    Kind kind;
    size_t name_len;  // "obj>" / "box>" / "t>"
    // has_at checks against the text, not think: a tag crossing `end` would overlap the
    // "</think>" that starts there, which is impossible.
    if (has_at(text, name_at, "obj>")) {
      kind = Kind::kObj, name_len = 4;
    } else if (has_at(text, name_at, "box>")) {
      kind = Kind::kBox, name_len = 4;
    } else if (has_at(text, name_at, "t>")) {
      kind = Kind::kT, name_len = 2;
    } else {
      k = next_lt(k + 1, at + 1);  // a '<' that starts no grounding tag
      continue;
    }
    const size_t tag_end = name_at + name_len;
    if (closing) {
      ++*errors;  // stray closing tag
      k = next_lt(k + 1, tag_end);
      continue;
    }
    const size_t close_k = next_lt(k + 1, tag_end);
    const size_t close_at = close_k < lt.size() ? lt[close_k] : end;
    // The '<' must begin "</" + the same name ("obj>" etc.), inside think.
    if (close_k == lt.size() || !has_at(text, close_at + 1, "/") ||
        close_at + 2 + name_len > end ||
        (name_len == 4 ? std::memcmp(text.data() + close_at + 2, text.data() + name_at, 4)
                       : std::memcmp(text.data() + close_at + 2, text.data() + name_at, 2)) != 0) {
      ++*errors;  // unclosed: nested tag, another '<', or the end of think
      k = next_lt(k + 1, tag_end);
      continue;
    }
    // Built in place: a stack Element copied in after its byte-sized `valid` was written
    // stalls on store forwarding (measured: ~5% of the op).
    out.push_back({kind, false, at, close_at + 2 + name_len, tag_end, close_at, 0.0f, {}});
    Element& el = out.back();
    const string_view content = text.substr(tag_end, close_at - tag_end);
    if (kind == Kind::kObj) {
      el.valid = !is_blank(content);
    } else if (kind == Kind::kBox) {
      el.valid = parse_box(content, &el.box);
    } else {
      el.valid = parse_number(content, &el.t);
    }
    *errors += !el.valid;
    k = next_lt(close_k + 1, el.end);
  }
}

// grounding._scan_think + grounding._claims for text `r`: claims and times appended to `out`.
void parse_think(string_view text, const Blocks& b, int64_t r, ChunkOut& out, CharIndex& chars,
                 int64_t* n_errors) {
  if (!b.has_think()) return;

  std::vector<Element>& els = out.elements;
  scan_think(text, b.think_begin, b.think_end, out.lt, els, n_errors);
  // grounding._claims: a valid <obj>, <box> tags separated by whitespace only, then
  // whitespace "at" whitespace and a valid <t>; the claim keeps its valid boxes (>= 1).
  const size_t n = els.size();
  for (size_t i = 0; i < n; ++i) {
    if (els[i].kind != Kind::kObj || !els[i].valid) continue;
    size_t j = i + 1, prev_end = els[i].end, n_box_tags = 0;
    const size_t box_begin = out.boxes.size();
    while (j < n && els[j].kind == Kind::kBox &&
           is_blank(text.substr(prev_end, els[j].start - prev_end))) {
      if (els[j].valid) out.boxes.push_back(els[j].box);
      ++n_box_tags;
      prev_end = els[j].end;
      ++j;
    }
    const size_t box_count = out.boxes.size() - box_begin;
    const bool ok = n_box_tags > 0 && j < n && els[j].kind == Kind::kT && els[j].valid &&
                    box_count > 0 &&
                    strip(text.substr(prev_end, els[j].start - prev_end)) == string_view("at");
    if (!ok) {
      out.boxes.resize(box_begin);
      continue;
    }
    const size_t a = els[i].content_begin, e = els[i].content_end;
    out.claims.push_back({r, a, e, chars(a), chars(e), els[j].t, box_begin, box_count});
  }
  for (const Element& el : els) {
    if (el.kind == Kind::kT && el.valid) {
      out.times.push_back(el.t);
      out.time_text.push_back(r);
    }
  }
}

// grounding.parse for text `r`: its claims and times appended to `out`, its block spans
// (code points) and error count written to `blocks` [4] and `n_errors`.
void parse_one(string_view text, int64_t r, ChunkOut& out, int64_t* blocks, int64_t* n_errors) {
  out.lt.clear();
  for (const char *p = text.data(), *end = p + text.size();
       (p = static_cast<const char*>(std::memchr(p, '<', end - p))) != nullptr; ++p) {
    out.lt.push_back(p - text.data());
  }
  const Blocks b = find_blocks(text, out.lt);
  *n_errors = structure_errors(text, b);
  CharIndex chars(text);  // offsets requested in text order: think start, names, think end, ...
  blocks[0] = blocks[1] = blocks[2] = blocks[3] = kAbsent;
  if (b.has_think()) blocks[0] = chars(b.think_begin);
  parse_think(text, b, r, out, chars, n_errors);
  if (b.has_think()) blocks[1] = chars(b.think_end);
  if (b.has_answer()) {
    blocks[2] = chars(b.answer_begin);
    blocks[3] = chars(b.answer_end);
  }
}

// See the schema in TORCH_LIBRARY_FRAGMENT below for the outputs.
std::vector<at::Tensor> parse_grounding(const std::vector<string_view>& texts) {
  const int64_t n = static_cast<int64_t>(texts.size());
  const auto i64 = at::TensorOptions().dtype(at::kLong);
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor blocks = at::empty({n, 4}, i64);
  at::Tensor n_errors = at::empty({n}, i64);
  int64_t* p_blocks = blocks.data_ptr<int64_t>();
  int64_t* p_errors = n_errors.data_ptr<int64_t>();

  // Texts are independent: contiguous chunks of them run in parallel (a few per thread for
  // balance, none smaller than 32 texts so a hand-off costs less than the work it carries).
  const int64_t threads = at::get_num_threads();
  const int64_t n_chunks =
      std::max<int64_t>(1, std::min<int64_t>(threads == 1 ? 1 : 4 * threads, n / 32));
  std::vector<ChunkOut> chunks(n_chunks);
  at::parallel_for(0, n_chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      for (int64_t r = c * n / n_chunks, stop = (c + 1) * n / n_chunks; r < stop; ++r) {
        parse_one(texts[r], r, chunks[c], p_blocks + 4 * r, p_errors + r);
      }
    }
  });

  int64_t n_claims = 0, n_times = 0, b_max = 1;
  for (const ChunkOut& ch : chunks) {
    n_claims += static_cast<int64_t>(ch.claims.size());
    n_times += static_cast<int64_t>(ch.times.size());
    for (const ClaimOut& cl : ch.claims) b_max = std::max<int64_t>(b_max, cl.box_count);
  }
  at::Tensor claim_rollout = at::empty({n_claims}, i64);
  at::Tensor claim_t = at::empty({n_claims}, f32);
  at::Tensor boxes = at::zeros({n_claims, b_max, 4}, f32);
  at::Tensor box_count = at::empty({n_claims}, i64);
  at::Tensor claim_name = at::empty({n_claims}, i64);
  at::Tensor time_rollout = at::empty({n_times}, i64);
  at::Tensor times = at::empty({n_times}, f32);
  int64_t* p_rollout = claim_rollout.data_ptr<int64_t>();
  float* p_t = claim_t.data_ptr<float>();
  float* p_boxes = boxes.data_ptr<float>();
  int64_t* p_count = box_count.data_ptr<int64_t>();
  int64_t* p_name = claim_name.data_ptr<int64_t>();
  int64_t* p_time_rollout = time_rollout.data_ptr<int64_t>();
  float* p_times = times.data_ptr<float>();

  // Distinct names as written, numbered by first appearance (text, then position): the
  // order grounding.claim_batch's dict has, so normalising them in this order in Python
  // reproduces ClaimBatch.names.
  std::unordered_map<string_view, int64_t> name_ids;
  std::vector<int64_t> name_ref;  // flat [U, 3]: text, code-point start, end
  int64_t c = 0, m = 0;
  for (const ChunkOut& ch : chunks) {
    for (const ClaimOut& cl : ch.claims) {
      const string_view name = texts[cl.text].substr(cl.name_begin, cl.name_end - cl.name_begin);
      const auto [it, fresh] = name_ids.emplace(name, static_cast<int64_t>(name_ids.size()));
      if (fresh) name_ref.insert(name_ref.end(), {cl.text, cl.name_cbegin, cl.name_cend});
      p_rollout[c] = cl.text;
      p_t[c] = cl.t;
      p_count[c] = static_cast<int64_t>(cl.box_count);
      p_name[c] = it->second;
      std::memcpy(p_boxes + c * b_max * 4, ch.boxes.data() + cl.box_begin, cl.box_count * sizeof(Box));
      ++c;
    }
    std::copy(ch.times.begin(), ch.times.end(), p_times + m);
    std::copy(ch.time_text.begin(), ch.time_text.end(), p_time_rollout + m);
    m += static_cast<int64_t>(ch.times.size());
  }
  const int64_t n_names = static_cast<int64_t>(name_ids.size());
  at::Tensor name_spans = at::empty({n_names, 3}, i64);
  std::copy(name_ref.begin(), name_ref.end(), name_spans.data_ptr<int64_t>());
  return {claim_rollout, claim_t, boxes, box_count, claim_name, name_spans,
          time_rollout, times, blocks, n_errors};
}

// Boxed kernel: reads the texts in place from the IValue list the dispatcher built from the
// Python strs (an unboxed std::vector<std::string> argument would copy all of them again).
void parse_grounding_boxed(const c10::OperatorHandle&, torch::jit::Stack* stack) {
  std::vector<at::Tensor> outs;
  {
    const c10::IValue arg = torch::jit::pop(*stack);
    const c10::ArrayRef<c10::IValue> list = arg.toListRef();
    std::vector<string_view> texts;
    texts.reserve(list.size());
    for (const c10::IValue& v : list) texts.push_back(v.toStringView());
    outs = parse_grounding(texts);
  }
  for (at::Tensor& t : outs) torch::jit::push(*stack, std::move(t));
}

// reference.identity_match on names already normalised (grounding.normalize_name).
// mode 0 exact, 1 soft (equal, or one contains the other), 2 none (always). An empty name
// matches nothing except under "none". Substring search on UTF-8 bytes equals it on code
// points: a match of a valid UTF-8 needle can only start at a character boundary.
at::Tensor identity_match(const std::vector<std::string>& pred, const std::vector<std::string>& gt,
                          int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 2,
              "identity_match: mode must be 0 (exact), 1 (soft) or 2 (none), got ", mode);
  const int64_t p = static_cast<int64_t>(pred.size()), g = static_cast<int64_t>(gt.size());
  at::Tensor out = at::empty({p, g}, at::TensorOptions().dtype(at::kBool));
  bool* o = out.data_ptr<bool>();
  for (int64_t i = 0; i < p; ++i) {
    const string_view a = pred[i];
    for (int64_t j = 0; j < g; ++j) {
      const string_view b = gt[j];
      bool match;
      if (mode == 2) {
        match = true;
      } else if (a.empty() || b.empty()) {
        match = false;
      } else if (mode == 0 || a.size() == b.size()) {
        match = a == b;
      } else {
        match = a.size() < b.size() ? b.find(a) != string_view::npos : a.find(b) != string_view::npos;
      }
      o[i * g + j] = match;
    }
  }
  return out;
}

}  // namespace
}  // namespace visioncoach

TORCH_LIBRARY_FRAGMENT(visioncoach, m) {
  // C claims, Bmax = max(1, most boxes in one claim), M predicted times, U distinct names as
  // written, N texts. Claims and times ordered by text, then position. Offsets are code
  // points of the Python str (-1: block absent).
  m.def(
      "parse_grounding(str[] texts) -> ("
      "Tensor claim_rollout, "  // [C] int64
      "Tensor claim_t, "        // [C] float32
      "Tensor boxes, "          // [C, Bmax, 4] float32, x1 <= x2, y1 <= y2, 0 past box_count
      "Tensor box_count, "      // [C] int64 >= 1
      "Tensor claim_name, "     // [C] int64 index into the U distinct names as written
      "Tensor name_spans, "     // [U, 3] int64 (text, start, end) of each name's first occurrence
      "Tensor time_rollout, "   // [M] int64
      "Tensor times, "          // [M] float32
      "Tensor blocks, "         // [N, 4] int64 think start, end, answer start, end (content)
      "Tensor n_errors)");      // [N] int64 malformations (uncapped count)
  m.def("identity_match(str[] pred_names, str[] gt_names, int mode) -> Tensor");
}

// No tensor inputs, so no backend to dispatch on: a CompositeExplicitAutograd kernel is the
// one every call reaches (fake-tensor mode still routes to the Python fakes in ops.py).
TORCH_LIBRARY_IMPL(visioncoach, CompositeExplicitAutograd, m) {
  m.impl("parse_grounding",
         torch::CppFunction::makeFromBoxedFunction<&visioncoach::parse_grounding_boxed>());
  m.impl("identity_match", &visioncoach::identity_match);
}
