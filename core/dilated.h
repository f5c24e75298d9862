#pragma once
// Dilated-attention configuration shared by the CPU and CUDA kernels and the
// op (see docs/dilated-attention.md).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "core/error.h"
#include "core/generator.h"
#include "core/macros.h"
#include "core/philox.h"

namespace minidl {

// One branch: segment length w >= 1 and dilation r >= 1. For head h the
// kept offset inside each segment is h mod r.
struct DilatedBranch {
  int64_t segment = 0;
  int64_t dilation = 1;
};

// Dropout on the attention probabilities (training only): the one statement of
// the mask, which the CPU and CUDA kernels all draw.
//
// Element (branch i, batch b, head h, query position p, key t), where t is the
// key's index among the kept rows of its segment, belongs to mask row
//   row = ((i * B + b) * H + h) * N + p.
// Keys come in 16-key groups (t >> 4) that share one Philox-4x32-7 block:
//   block = philox::block<7>(seed, offset, ((row << 32) | t) >> 4),
// whose 16 bytes (words x, y, z, w; little-endian bytes) hold one 8-bit
// uniform per key: key t uses word (t & 7) >> 1, byte ((t >> 3) & 1) * 2 + (t & 1).
// The key is kept iff that byte >= threshold (T8 = round(p_drop * 256) clamped
// to [1, 255]), and kept probabilities are scaled by 256 / (256 - T8): the
// expectation is exact for the effective rate T8 / 256. The log-sum-exp is
// that of the undropped scores.
//
// Why this layout: in the mma.m16n8k16 / wgmma accumulator layout a lane holds,
// for one row, keys {2l, 2l+1, 2l+8, 2l+9} of a 16-key group (l = lane % 4):
// exactly word l. In the key-major backward (S^T, rows = keys) a lane holds
// keys {i, i+8} (i = lane / 4) of a group for one query: bytes of word i / 2.
// So one Philox call serves 16 decisions, and lanes share blocks by shuffles.
//
// The Philox offset is offset_now(): `offset`, plus the device word at
// offset_base when set (a captured CUDA graph; see PhiloxOffset).
//
// A problem that is a part of a larger one (a sequence-parallel piece,
// ops/seq_parallel_attention.cpp) draws the larger problem's mask through its
// `frame`: its branch i is mask branch frame.branch + i, its head h is mask
// head frame.head + h * frame.head_step, its row position p is mask position
// frame.position + p * frame.stride, in a mask of frame.n positions,
// frame.heads heads and frame.batches batches (0: the problem's own). Its
// batch b is mask batch b, or, with batch_step > 0, b moves batch_step heads
// and batch_shift positions instead: a piece whose batches are classes of
// heads h mod r (each a run of heads c, c + r, ... and of positions from c)
// and whose heads run over the larger problem's batches too (head b J + j of
// the piece is mask batch b's head c + j r when J * head_step = frame.heads:
// J heads a class at step r, or one at step H). Key indices are the larger
// problem's already. The default frame is the problem itself.
struct AttentionMaskFrame {
  int64_t branch = 0, n = 0, heads = 0, head = 0, head_step = 1, position = 0, stride = 1;
  int64_t batches = 0, batch_step = 0, batch_shift = 0;
  bool operator==(const AttentionMaskFrame&) const = default;
};

struct AttentionDropout {
  uint32_t threshold = 0;  // T8 in [1, 255]; 0: no dropout
  float scale = 1;         // 256 / (256 - T8)
  uint64_t seed = 0, offset = 0;
  const uint64_t* offset_base = nullptr;  // device address, or null
  AttentionMaskFrame frame;
  // Where the branches nest (nested_pairs): true keeps or drops a pair that
  // several branches hold once, for all its copies, at its owner's element
  // (pair_owner): the dropout of one attention over the branches' union.
  // false (the default): each branch's copy has its own element, as when each
  // branch runs its own attention with dropout. Nothing changes elsewhere.
  bool per_pair = false;
  MINIDL_HD bool enabled() const { return threshold != 0; }
  MINIDL_HD MINIDL_FORCEINLINE uint64_t offset_now() const { return PhiloxOffset{offset_base, offset}.value(); }
};

// T8 for drop probability p in [0, 1): 0 (no dropout) for p == 0.
inline uint32_t attention_dropout_threshold(double p) {
  if (!(p > 0)) return 0;
  const double t = std::floor(p * 256.0 + 0.5);
  return static_cast<uint32_t>(t < 1 ? 1 : t > 255 ? 255 : t);
}

// The mask parameters for drop probability p and one generator (seed, offset).
inline AttentionDropout make_attention_dropout(double p, uint64_t seed, PhiloxOffset offset) {
  AttentionDropout d;
  d.threshold = attention_dropout_threshold(p);
  d.scale = d.threshold ? static_cast<float>(256.0 / (256.0 - d.threshold)) : 1.f;
  d.seed = seed;
  d.offset = offset.delta;
  d.offset_base = offset.base;
  return d;
}
inline AttentionDropout make_attention_dropout(double p, uint64_t seed, uint64_t offset) {
  return make_attention_dropout(p, seed, PhiloxOffset{nullptr, offset});
}

// The mask rows of one (branch, batch b, head h): position p is mask row
// at(p) = first + p * step.
struct AttentionMaskRows {
  uint64_t first = 0, step = 1;
  MINIDL_HD MINIDL_FORCEINLINE uint64_t at(uint64_t p) const { return first + p * step; }
};

// The mask rows of one branch of a problem of B batches, H heads and n
// positions, the frame applied: (b, h) starts at first + b * per_batch +
// h * per_head. Linear, so kernels resolve it once on the host.
struct AttentionMaskLayout {
  uint64_t first = 0, per_batch = 0, per_head = 0, step = 1;
  MINIDL_HD MINIDL_FORCEINLINE AttentionMaskRows rows(uint64_t b, uint64_t h) const {
    return {first + b * per_batch + h * per_head, step};
  }
};

MINIDL_HD inline AttentionMaskLayout attention_mask_layout(const AttentionDropout& d, int64_t branch, int64_t B,
                                                           int64_t H, int64_t n) {
  const AttentionMaskFrame& f = d.frame;
  const auto heads = static_cast<uint64_t>(f.heads > 0 ? f.heads : H);
  const auto batches = static_cast<uint64_t>(f.batches > 0 ? f.batches : B);
  const auto positions = static_cast<uint64_t>(f.n > 0 ? f.n : n);
  AttentionMaskLayout layout;
  layout.first = (static_cast<uint64_t>(branch + f.branch) * batches * heads + static_cast<uint64_t>(f.head)) *
                     positions +
                 static_cast<uint64_t>(f.position);
  layout.per_batch = f.batch_step > 0
                         ? static_cast<uint64_t>(f.batch_step) * positions + static_cast<uint64_t>(f.batch_shift)
                         : heads * positions;
  layout.per_head = static_cast<uint64_t>(f.head_step) * positions;
  layout.step = static_cast<uint64_t>(f.stride);
  return layout;
}

// Rounds of the mask's Philox (core/philox.h says why 7, not 10).
constexpr int kAttentionPhiloxRounds = 7;

// The Philox block of the 16-key group holding key t of mask row `row`.
MINIDL_HD MINIDL_FORCEINLINE philox::U32x4 attention_dropout_block(const AttentionDropout& d,
                                                                  uint64_t row, uint64_t t) {
  return philox::block<kAttentionPhiloxRounds>(d.seed, d.offset_now(), ((row << 32) | t) >> 4);
}

// Keep decision of byte `byte` (0..3) of a block word.
MINIDL_HD MINIDL_FORCEINLINE bool attention_keep_byte(uint32_t word, int byte, uint32_t threshold) {
  // byte >= T8 compared in place: one AND and one compare when `byte` is a constant.
  return (word & (0xFFu << (8 * byte))) >= (threshold << (8 * byte));
}

// The four keep decisions of a word at once (attention_keep_byte for bytes
// 0..3, in three operations): byte b of keep_bytes(word, test) has its top bit
// set iff byte b of `word` >= T8. The low seven bits of each byte are compared
// by a carry-free add (x' + 128 - T8' is in [1, 255]); the top bits decide the
// rest: with T8 < 128 a set top bit keeps, with T8 >= 128 it is needed.
struct KeepBytesTest {
  uint32_t add;  // 128 - (T8 & 127) in each byte
  uint32_t top;  // 0x80 in each byte when T8 < 128, else 0
};
MINIDL_HD MINIDL_FORCEINLINE KeepBytesTest keep_bytes_test(uint32_t threshold) {
  return {(128u - (threshold & 127u)) * 0x01010101u, threshold < 128 ? 0x80808080u : 0u};
}
MINIDL_HD MINIDL_FORCEINLINE uint32_t keep_bytes(uint32_t word, KeepBytesTest test) {
  const uint32_t low = (word & 0x7F7F7F7Fu) + test.add;
  return (word & low) | ((word | low) & test.top);
}
// Byte `byte`'s decision in a keep_bytes result.
MINIDL_HD MINIDL_FORCEINLINE bool keep_bytes_kept(uint32_t kept, int byte) { return (kept >> (8 * byte + 7)) & 1; }

// Keep decision of key t of a group (any t: t & 15 is its place) from the group's block.
MINIDL_HD MINIDL_FORCEINLINE bool attention_keep_in_block(const philox::U32x4& block, uint64_t t,
                                                          uint32_t threshold) {
  return attention_keep_byte(philox::lane(block, static_cast<int>((t & 7) >> 1)),
                             static_cast<int>(((t >> 3) & 1) * 2 + (t & 1)), threshold);
}

// The 16 decisions of a group: bit k is key 16 * group + k.
MINIDL_HD MINIDL_FORCEINLINE uint32_t attention_keep_bits(const philox::U32x4& block, uint32_t threshold) {
  uint32_t bits = 0;
  for (int k = 0; k < 16; ++k) bits |= static_cast<uint32_t>(attention_keep_in_block(block, k, threshold)) << k;
  return bits;
}

// One element (references; kernels draw a group's block once).
MINIDL_HD MINIDL_FORCEINLINE bool attention_keep(const AttentionDropout& d, uint64_t row, uint64_t t) {
  return attention_keep_in_block(attention_dropout_block(d, row, t), t, d.threshold);
}

MINIDL_HD MINIDL_FORCEINLINE bool attention_keep(const AttentionDropout& d, uint64_t branch,
                                                 uint64_t batch_size, uint64_t b, uint64_t heads,
                                                 uint64_t h, uint64_t n, uint64_t pos,
                                                 uint64_t key_index) {
  const AttentionMaskLayout layout =
      attention_mask_layout(d, static_cast<int64_t>(branch), static_cast<int64_t>(batch_size),
                            static_cast<int64_t>(heads), static_cast<int64_t>(n));
  return attention_keep(d, layout.rows(b, h).at(pos), key_index);
}

// The kept positions of branch (w, r) for `head` in segment `segment` of a
// sequence of length n (w already clamped to n): base + t * stride for t in
// [0, count). The one statement of the geometry; every backend and bench uses it.
struct KeptRows {
  int64_t base, stride, count;
};

MINIDL_HD MINIDL_FORCEINLINE KeptRows kept_rows(int64_t n, int64_t w, int64_t r, int64_t head,
                                                int64_t segment) {
  int64_t start = segment * w;
  int64_t end = start + w < n ? start + w : n;
  int64_t first = start + head % r;
  // ceil((end - first) / r), written so that no r (up to INT64_MAX) overflows it
  return {first, r, first < end ? (end - first - 1) / r + 1 : 0};
}

// The most rows a segment of length w keeps at dilation r (head 0's:
// ceil(w / r)), for sizing tiles and grids.
MINIDL_HD MINIDL_FORCEINLINE int64_t max_kept_rows(int64_t w, int64_t r) { return w > 0 ? (w - 1) / r + 1 : 0; }

// ---- Pairs that nested branches share (docs/dilated-attention.md) ----
//
// Branches nest when, sorted by (segment, dilation), each segment (clamped to
// n) divides the next or is n, each dilation divides the next, the smallest
// dilation is 1, and the largest divides 8 and the smallest segment (unless
// that is n). Then a pair of a branch is also a pair of every larger branch
// that keeps both its rows, with the same score and value, so the multiset
// softmax counts it once per branch holding it: the same as counting it once
// with that number as its weight (its score plus the weight's log). Each pair
// then belongs to the smallest branch holding it. Branch i of the sorted order
// (i > 0) keeps only the pairs across the segments of branch i - 1: a query in
// span b of its segment (spans of w_{i-1} / r_i kept rows) attends the keys of
// the other spans, all of them (causal: those before b). A pair of kept rows
// (tq, tk) weighs 1 + min(c(tq), c(tk)), c(t) the number of larger branches
// keeping row t, which depends on t mod 8 and the head mod 8 only.
struct BranchPairs {
  int64_t span = 0;          // > 0: pairs only across spans of this many kept rows
  uint32_t classes[8] = {};  // [head % 8], bits 4 (t % 8) + 0..3: c(t) of kept row t
  MINIDL_HD int row_class(int64_t head, int64_t t) const {
    return static_cast<int>((classes[head % 8] >> (4 * (t % 8))) & 15u);
  }
  MINIDL_HD int weight(int64_t head, int64_t tq, int64_t tk) const {
    const int cq = row_class(head, tq), ck = row_class(head, tk);
    return 1 + (cq < ck ? cq : ck);
  }
  // The first kept row of row t's span (span > 0).
  MINIDL_HD int64_t span_start(int64_t t) const { return t / span * span; }
  // Whether the branch's pair (tq, tk) is its own: not inside one span.
  MINIDL_HD bool keeps(int64_t tq, int64_t tk) const { return span == 0 || span_start(tq) != span_start(tk); }
  // Not causal, a block of rows in the span starting at kept row `start`
  // (start < count) pairs with the branch's other kept rows (`count` in all):
  // as one list, its length and its i-th row.
  MINIDL_HD int64_t rows_outside_span(int64_t start, int64_t count) const {
    const int64_t end = start + span < count ? start + span : count;
    return count - (end - start);
  }
  MINIDL_HD int64_t row_outside_span(int64_t start, int64_t i) const { return i < start ? i : i + span; }
  // Whether every pair of a branch whose segments keep at most max_rows rows
  // belongs to a smaller branch (its span holds them all): nothing of its own.
  MINIDL_HD bool shares_all(int64_t max_rows) const { return span >= max_rows; }
  // All of the branch's pairs, each of weight 1.
  bool plain() const {
    if (span != 0) return false;
    for (uint32_t c : classes)
      if (c != 0) return false;
    return true;
  }
};

struct DilatedAttentionConfig {
  std::vector<DilatedBranch> branches;
  bool causal = true;
  double scale = 0;  // softmax scale; the op fills in 1/sqrt(D) when 0
  AttentionDropout dropout;
  // A framed part of a larger problem with per-pair dropout (a
  // sequence-parallel piece; dropout.frame): each branch's share of that
  // problem's nested pairs, rows and heads as this problem numbers them
  // (sharing_pairs). Empty: the config's own (nested_pairs). Read only with
  // per-pair dropout: without dropout a part's own nesting is exact.
  std::vector<BranchPairs> pairs;
};

// A segment as n positions see it (w > n covers them all).
inline int64_t clamped_segment(const DilatedBranch& b, int64_t n) { return b.segment < n ? b.segment : n; }

// The branches' indices sorted by (segment clamped to n, dilation), ties in
// config order: smaller branches first.
inline std::vector<size_t> nesting_order(const std::vector<DilatedBranch>& br, int64_t n) {
  auto w_of = [&](size_t i) { return clamped_segment(br[i], n); };
  std::vector<size_t> order(br.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return w_of(a) != w_of(b) ? w_of(a) < w_of(b) : br[a].dilation < br[b].dilation;
  });
  return order;
}

// Each branch's share of the pairs (config order) over n positions, or empty
// when the branches do not nest (then each branch computes all its pairs).
inline std::vector<BranchPairs> nested_pairs(const DilatedAttentionConfig& config, int64_t n) {
  const std::vector<DilatedBranch>& br = config.branches;
  const size_t k = br.size();
  if (k < 2 || k > 15 || n <= 0) return {};
  for (const DilatedBranch& b : br)
    if (b.segment < 1 || b.dilation < 1) return {};
  auto w_of = [&](size_t i) { return clamped_segment(br[i], n); };
  const std::vector<size_t> order = nesting_order(br, n);
  const int64_t w0 = w_of(order[0]), r_max = br[order[k - 1]].dilation;
  if (br[order[0]].dilation != 1 || 8 % r_max != 0 || (w0 < n && w0 % r_max != 0)) return {};
  for (size_t a = 0; a + 1 < k; ++a) {
    const int64_t w = w_of(order[a]), w_next = w_of(order[a + 1]);
    if ((w_next % w != 0 && w_next != n) || br[order[a + 1]].dilation % br[order[a]].dilation != 0) return {};
  }
  std::vector<BranchPairs> pairs(k);
  for (size_t a = 0; a < k; ++a) {
    BranchPairs& p = pairs[order[a]];
    const int64_t r = br[order[a]].dilation;
    if (a > 0) p.span = max_kept_rows(w_of(order[a - 1]), r);
    // Kept row t of head h sits at offset h % r + t r of its segment, whose
    // start every dilation divides; branch b keeps it iff that is h % r_b mod r_b.
    for (int64_t h = 0; h < 8; ++h)
      for (int64_t t = 0; t < 8; ++t) {
        uint32_t c = 0;
        for (size_t b = a + 1; b < k; ++b) {
          const int64_t rb = br[order[b]].dilation;
          c += (h % r + t * r) % rb == h % rb;
        }
        p.classes[h] |= c << (4 * t);
      }
  }
  return pairs;
}

// The pairs each branch may compute once for all branches given config's
// dropout: nested_pairs where dropout is off or per pair; empty with
// per-copy dropout, whose every branch needs its own copy of each pair. With
// dropout, a non-empty result means per-pair decisions (dropout_per_pair).
// A framed part of a larger problem (a sequence-parallel piece) takes per-pair
// dropout only with its shares given (config.pairs): its own positions do not
// tell which branch owns a pair.
inline std::vector<BranchPairs> sharing_pairs(const DilatedAttentionConfig& config, int64_t n) {
  if (!config.dropout.enabled()) return nested_pairs(config, n);
  if (!config.dropout.per_pair) return {};
  if (!config.pairs.empty()) {
    MINIDL_CHECK(config.pairs.size() == config.branches.size(), "dilated attention: ", config.pairs.size(),
                 " given shares of nested pairs for ", config.branches.size(), " branches");
    return config.pairs;
  }
  MINIDL_CHECK(config.dropout.frame == AttentionMaskFrame{},
               "dilated attention: per-pair dropout on a framed part of a larger problem needs that problem's "
               "shares of its nested pairs (config.pairs)");
  return nested_pairs(config, n);
}

// Whether config's dropout decides once per distinct pair on n positions:
// per_pair asked for, and the branches nest.
inline bool dropout_per_pair(const DilatedAttentionConfig& config, int64_t n) {
  return config.dropout.enabled() && !sharing_pairs(config, n).empty();
}

// The owner of a pair that some branch holds (dropout_per_pair): the first
// branch in nesting order (`order`, nesting_order's) whose segment holds
// query position p and key position k and keeps both for head h. It is the
// branch whose share of the pairs (nested_pairs) holds the pair, so a plan
// that computes each pair once draws its own mask there. Returns the owner's
// index in config order and the key's index among its segment's kept rows.
struct PairOwner {
  size_t branch;
  int64_t key_index;
};
inline PairOwner pair_owner(const std::vector<DilatedBranch>& branches, const std::vector<size_t>& order,
                            int64_t n, int64_t h, int64_t p, int64_t k) {
  for (size_t i : order) {
    const int64_t w = clamped_segment(branches[i], n), r = branches[i].dilation;
    if (p / w == k / w && (p % w) % r == h % r && (k % w) % r == h % r) return {i, (k % w) / r};
  }
  MINIDL_FAIL("pair_owner: no branch holds the pair (", p, ", ", k, ") of head ", h);
}

}  // namespace minidl

namespace minidl {

// Attended (query, key) pairs of one sequence over `heads` heads, summed over
// branches (a key two branches share counts twice, as the kernels do the
// work twice): what benchmarks turn into FLOPs.
inline double attended_pairs(int64_t n, int64_t heads, const DilatedAttentionConfig& config) {
  double pairs = 0;
  for (const DilatedBranch& br : config.branches) {
    const int64_t w = br.segment < n ? br.segment : n;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t s = 0; s * w < n; ++s) {
        const double m = static_cast<double>(kept_rows(n, w, br.dilation, h, s).count);
        pairs += config.causal ? m * (m + 1) / 2 : m * m;
      }
  }
  return pairs;
}

}  // namespace minidl
