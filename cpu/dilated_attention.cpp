#include "cpu/dilated_attention.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "core/scalar_math.h"
#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {

// ---------------------------------------------------------------------------
// Geometry shared by both implementations.

// A (B, N, H, D) operand with the D dim contiguous; other strides free.
template <typename T>
struct Rows {
  T* ptr;
  int64_t sb, sn, sh;
  T* row(int64_t b, int64_t pos, int64_t h) const { return ptr + b * sb + pos * sn + h * sh; }
};

template <typename T>
Rows<T> rows_of(const Tensor& t) {
  return {static_cast<T*>(t.raw_data()), t.stride(0), t.stride(1), t.stride(2)};
}

struct Branch {
  int64_t w, r;  // segment clamped to N, dilation
};

std::vector<Branch> clamped_branches(const DilatedAttentionConfig& config, int64_t n) {
  std::vector<Branch> out;
  for (const DilatedBranch& b : config.branches)
    out.push_back({std::max<int64_t>(1, std::min(b.segment, n)), b.dilation});
  return out;
}

double resolved_scale(const DilatedAttentionConfig& config, int64_t d) {
  return config.scale != 0 ? config.scale : 1.0 / std::sqrt(static_cast<double>(d));
}

// The kept positions of (branch, head h, segment s): core/dilated.h.
using RowSet = KeptRows;

RowSet kept_rows(int64_t n, const Branch& br, int64_t h, int64_t s) { return minidl::kept_rows(n, br.w, br.r, h, s); }

// Internal-contract checks (the op has already validated user input; these
// catch direct callers that break the layout contract).
void check_layout(const char* fn, const Tensor& q, const Tensor& k, const Tensor& v,
                  const Tensor& out, const Tensor& lse, const DilatedAttentionConfig& config) {
  MINIDL_CHECK(q.defined() && k.defined() && v.defined() && out.defined() && lse.defined(), fn,
               ": undefined tensor argument");
  MINIDL_CHECK(q.dim() == 4 && k.shape() == q.shape() && v.shape() == q.shape() &&
                   out.shape() == q.shape(),
               fn, ": q, k, v, out must share one (B, N, H, D) shape, got q ",
               shape_str(q.shape()), ", k ", shape_str(k.shape()), ", v ", shape_str(v.shape()),
               ", out ", shape_str(out.shape()));
  MINIDL_CHECK(k.dtype() == q.dtype() && v.dtype() == q.dtype() && out.dtype() == q.dtype(), fn,
               ": q, k, v, out must share a dtype");
  MINIDL_CHECK(q.dtype() != DType::Int32, fn, ": int32 inputs are not supported");
  // (a D of 1 has no stride to speak of: a contiguous tensor may carry any there)
  MINIDL_CHECK(q.size(3) == 1 || (q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1), fn,
               ": the D dim of q, k, v must be contiguous");
  MINIDL_CHECK(out.is_contiguous(), fn, ": out must be contiguous");
  DType lse_dtype = q.dtype() == DType::Float64 ? DType::Float64 : DType::Float32;
  MINIDL_CHECK(lse.dtype() == lse_dtype && lse.is_contiguous() &&
                   lse.shape() == Shape({q.size(0), q.size(1), q.size(2)}),
               fn, ": lse must be a contiguous ", lse_dtype, " (B, N, H) tensor, got ", lse.dtype(),
               " ", shape_str(lse.shape()));
  MINIDL_CHECK(!q.device().is_cuda(), fn, ": tensors must be on the CPU");
  MINIDL_CHECK(!config.branches.empty(), fn, ": no branches");
  for (const DilatedBranch& b : config.branches)
    MINIDL_CHECK(b.segment >= 1 && b.dilation >= 1, fn, ": invalid branch (segment ", b.segment,
                 ", dilation ", b.dilation, ")");
}

void check_backward_layout(const char* fn, const Tensor& q, const Tensor& grad_out,
                           const Tensor& grad_lse, const Tensor& lse, const Tensor& dq,
                           const Tensor& dk, const Tensor& dv) {
  MINIDL_CHECK(grad_out.defined() && grad_out.shape() == q.shape() &&
                   grad_out.dtype() == q.dtype() && (q.size(3) == 1 || grad_out.stride(3) == 1),
               fn, ": grad_out must be a ", q.dtype(), " ", shape_str(q.shape()),
               " tensor with a contiguous D dim");
  MINIDL_CHECK(!grad_lse.defined() ||
                   (grad_lse.shape() == lse.shape() && grad_lse.dtype() == lse.dtype()),
               fn, ": grad_lse must match lse (", lse.dtype(), " ", shape_str(lse.shape()), ")");
  for (const Tensor* t : {&dq, &dk, &dv})
    MINIDL_CHECK(t->defined() && t->shape() == q.shape() && t->dtype() == q.dtype() &&
                     t->is_contiguous(),
                 fn, ": dq, dk, dv must be contiguous ", q.dtype(), " ", shape_str(q.shape()));
}

// Reads element i of a (B, N, H) tensor through its strides (grad_lse).
template <typename C>
struct RowScalars {
  const C* ptr = nullptr;
  int64_t sb = 0, sn = 0, sh = 0;
  C at(int64_t b, int64_t pos, int64_t h) const { return ptr ? ptr[b * sb + pos * sn + h * sh] : C(0); }
};

template <typename C>
RowScalars<C> row_scalars(const Tensor& t) {
  if (!t.defined()) return {};
  return {static_cast<const C*>(t.raw_data()), t.stride(0), t.stride(1), t.stride(2)};
}

template <typename C, typename T>
C to_compute(T x) {
  if constexpr (std::is_same_v<T, BFloat16>) return static_cast<C>(static_cast<float>(x));
  else return static_cast<C>(x);
}

template <typename T, typename C>
T from_compute(C x) {
  if constexpr (std::is_same_v<T, BFloat16>) return BFloat16(static_cast<float>(x));
  else return static_cast<T>(x);
}

// ---------------------------------------------------------------------------
// Attention dropout (core/dilated.h): the mask is a pure function of
// (branch, b, h, query position, key index), so the backward regenerates it.

// One (branch, b, h)'s mask rows: query position p is row rows.at(p).
struct DropoutRows {
  const AttentionDropout* d = nullptr;  // null: no dropout
  AttentionMaskRows rows;
  bool enabled() const { return d != nullptr; }
};

DropoutRows dropout_rows(const DilatedAttentionConfig& config, size_t branch, int64_t B, int64_t b,
                         int64_t H, int64_t h, int64_t N) {
  if (!config.dropout.enabled()) return {};
  const AttentionMaskLayout layout = attention_mask_layout(config.dropout, static_cast<int64_t>(branch), B, H, N);
  return {&config.dropout, layout.rows(static_cast<uint64_t>(b), static_cast<uint64_t>(h))};
}

// factor[j] = keep * scale for keys key0 + j, j < n, of mask row `row`: the
// elements attention_keep() tests, drawn one Philox block (a 16-key group) at
// a time.
template <typename C>
void dropout_factors(const AttentionDropout& d, uint64_t row, int64_t key0, int64_t n, C* factor) {
  const C scale = static_cast<C>(d.scale);
  for (int64_t j = 0; j < n;) {
    const uint64_t t = static_cast<uint64_t>(key0 + j);
    const uint32_t keep = attention_keep_bits(attention_dropout_block(d, row, t), d.threshold);
    for (uint64_t k = t & 15; k < 16 && j < n; ++k, ++j) factor[j] = (keep >> k) & 1 ? scale : C(0);
  }
}

// ---------------------------------------------------------------------------
// Reference: per (b, h, p), the multiset of (branch, key) pairs, in double.

// One (branch, key) pair of a row: the key's position and its dropout factor
// (keep * scale; 1 without dropout).
struct KeyPair {
  int64_t key;
  double factor;
};

// With per-pair dropout (dropout_per_pair), the nesting order the owners
// are looked up in (pair_owner); empty otherwise.
std::vector<size_t> owner_order(const DilatedAttentionConfig& config, int64_t n) {
  MINIDL_CHECK(config.pairs.empty() || !config.dropout.enabled() || !config.dropout.per_pair,
               "dilated attention (cpu reference): given shares of nested pairs (config.pairs) with per-pair "
               "dropout; the reference finds owners itself, in the problem's own positions");
  return dropout_per_pair(config, n) ? nesting_order(config.branches, n) : std::vector<size_t>{};
}

// Appends the pairs row p of head h (batch b) sees in every branch where it
// is kept (a key seen by two branches appears twice: the union is a multiset).
// `owners`: owner_order's.
void union_keys(int64_t b, int64_t p, int64_t h, int64_t B, int64_t H, int64_t n,
                const std::vector<Branch>& branches, const DilatedAttentionConfig& config,
                const std::vector<size_t>& owners, std::vector<KeyPair>& keys) {
  keys.clear();
  const AttentionDropout& drop = config.dropout;
  // A pair's element under per-pair dropout: its owner's row and key index.
  auto owner_keep = [&](int64_t key) {
    const PairOwner o = pair_owner(config.branches, owners, n, h, p, key);
    const DropoutRows mask = dropout_rows(config, o.branch, B, b, H, h, n);
    return attention_keep(drop, mask.rows.at(static_cast<uint64_t>(p)), static_cast<uint64_t>(o.key_index));
  };
  for (size_t i = 0; i < branches.size(); ++i) {
    const Branch& br = branches[i];
    int64_t offset = h % br.r, local = p % br.w;
    if (local % br.r != offset) continue;  // p is not kept by this branch for head h
    const DropoutRows mask = dropout_rows(config, i, B, b, H, h, n);
    const uint64_t mask_row = mask.enabled() ? mask.rows.at(static_cast<uint64_t>(p)) : 0;
    int64_t seg_start = p - local, seg_end = std::min(seg_start + br.w, n);
    int64_t last = config.causal ? p : seg_end - 1;
    // t: the key's index among the segment's kept rows
    for (int64_t j = seg_start + offset, t = 0; j <= last; ++t) {
      double factor = 1;
      if (drop.enabled()) {
        const bool keep = owners.empty() ? attention_keep(drop, mask_row, static_cast<uint64_t>(t)) : owner_keep(j);
        factor = keep ? static_cast<double>(drop.scale) : 0.0;
      }
      keys.push_back({j, factor});
      if (last - j < br.r) break;  // the next kept row is past `last` (j + r could overflow)
      j += br.r;
    }
  }
}

// (b, h) pairs per thread chunk: all of them (serial) when the whole problem is small.
int64_t reference_grain(int64_t B, int64_t H, int64_t N, int64_t D,
                        const std::vector<Branch>& branches, bool causal) {
  double pairs = 0;
  for (const Branch& br : branches)
    pairs += static_cast<double>(N) / br.r * static_cast<double>(max_kept_rows(br.w, br.r)) * (causal ? 0.5 : 1.0);
  return pairs * static_cast<double>(B * H * D) * 4.0 < 1e6 ? B * H : 1;
}

template <typename T, typename A = double>
A dot(const T* a, const T* b, int64_t d) {
  A s = 0;
  for (int64_t i = 0; i < d; ++i) s += to_compute<A>(a[i]) * to_compute<A>(b[i]);
  return s;
}

template <typename T>
void reference_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                       const DilatedAttentionConfig& config, const Tensor& out, const Tensor& lse) {
  using L = compute_t<T>;  // lse dtype: double for float64, else float
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const std::vector<Branch> branches = clamped_branches(config, N);
  const double scale = resolved_scale(config, D);
  Rows<const T> Q = rows_of<const T>(q), K = rows_of<const T>(k), V = rows_of<const T>(v);
  T* o = static_cast<T*>(out.raw_data());
  L* lse_ptr = static_cast<L*>(lse.raw_data());
  const std::vector<size_t> owners = owner_order(config, N);
  parallel_for(B * H, reference_grain(B, H, N, D, branches, config.causal), [&](int64_t lo, int64_t hi) {
    std::vector<KeyPair> keys;
    std::vector<double> scores, acc(static_cast<size_t>(D));
    for (int64_t bh = lo; bh < hi; ++bh) {
      int64_t b = bh / H, h = bh % H;
      for (int64_t p = 0; p < N; ++p) {
        union_keys(b, p, h, B, H, N, branches, config, owners, keys);
        int64_t row = (b * N + p) * H + h;
        T* o_row = o + row * D;
        if (keys.empty()) {
          for (int64_t d = 0; d < D; ++d) o_row[d] = from_compute<T>(0.0);
          lse_ptr[row] = -std::numeric_limits<L>::infinity();
          continue;
        }
        scores.resize(keys.size());
        double m = -std::numeric_limits<double>::infinity();
        for (size_t j = 0; j < keys.size(); ++j) {
          scores[j] = scale * dot(Q.row(b, p, h), K.row(b, keys[j].key, h), D);
          m = std::max(m, scores[j]);
        }
        double sum = 0;
        for (double s : scores) sum += std::exp(s - m);
        double lse_p = m + std::log(sum);
        std::fill(acc.begin(), acc.end(), 0.0);
        for (size_t j = 0; j < keys.size(); ++j) {
          // L is that of the undropped scores; the mask scales the weights only.
          double pj = std::exp(scores[j] - lse_p) * keys[j].factor;
          const T* v_row = V.row(b, keys[j].key, h);
          for (int64_t d = 0; d < D; ++d) acc[d] += pj * to_compute<double>(v_row[d]);
        }
        for (int64_t d = 0; d < D; ++d) o_row[d] = from_compute<T>(acc[d]);
        lse_ptr[row] = static_cast<L>(lse_p);
      }
    }
  });
}

template <typename T>
void reference_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                        const Tensor& lse, const Tensor& grad_out, const Tensor& grad_lse,
                        const DilatedAttentionConfig& config, const Tensor& dq, const Tensor& dk,
                        const Tensor& dv) {
  using L = compute_t<T>;
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const std::vector<Branch> branches = clamped_branches(config, N);
  const double scale = resolved_scale(config, D);
  Rows<const T> Q = rows_of<const T>(q), K = rows_of<const T>(k), V = rows_of<const T>(v);
  Rows<const T> dO = rows_of<const T>(grad_out);
  const T* o = static_cast<const T*>(out.raw_data());
  const L* lse_ptr = static_cast<const L*>(lse.raw_data());
  RowScalars<L> g = row_scalars<L>(grad_lse);
  T *dq_ptr = static_cast<T*>(dq.raw_data()), *dk_ptr = static_cast<T*>(dk.raw_data()),
    *dv_ptr = static_cast<T*>(dv.raw_data());
  // Gradients of one (b, h) only touch rows of that (b, h): parallel over them.
  const std::vector<size_t> owners = owner_order(config, N);
  parallel_for(B * H, reference_grain(B, H, N, D, branches, config.causal), [&](int64_t lo, int64_t hi) {
    std::vector<KeyPair> keys;
    std::vector<double> gq(static_cast<size_t>(N * D)), gk(gq.size()), gv(gq.size());
    for (int64_t bh = lo; bh < hi; ++bh) {
      int64_t b = bh / H, h = bh % H;
      std::fill(gq.begin(), gq.end(), 0.0);
      std::fill(gk.begin(), gk.end(), 0.0);
      std::fill(gv.begin(), gv.end(), 0.0);
      for (int64_t p = 0; p < N; ++p) {
        union_keys(b, p, h, B, H, N, branches, config, owners, keys);
        if (keys.empty()) continue;
        int64_t row = (b * N + p) * H + h;
        const T* q_row = Q.row(b, p, h);
        const T* do_row = dO.row(b, p, h);
        double lse_p = static_cast<double>(lse_ptr[row]);
        double d_p = dot(do_row, o + row * D, D);  // D_p = dO_p . O_p (O dropped)
        double g_p = static_cast<double>(g.at(b, p, h));
        for (const KeyPair& pair : keys) {
          const int64_t j = pair.key;
          const T* k_row = K.row(b, j, h);
          const T* v_row = V.row(b, j, h);
          double pj = std::exp(scale * dot(q_row, k_row, D) - lse_p);
          // dS = P (M dP' - D_p), dV += P M dO (M: the dropout factor).
          double ds = pj * (pair.factor * dot(do_row, v_row, D) - (d_p - g_p));
          double pm = pj * pair.factor;
          for (int64_t d = 0; d < D; ++d) {
            gv[j * D + d] += pm * to_compute<double>(do_row[d]);
            gq[p * D + d] += scale * ds * to_compute<double>(k_row[d]);
            gk[j * D + d] += scale * ds * to_compute<double>(q_row[d]);
          }
        }
      }
      for (int64_t p = 0; p < N; ++p) {
        int64_t base = ((b * N + p) * H + h) * D;
        for (int64_t d = 0; d < D; ++d) {
          dq_ptr[base + d] = from_compute<T>(gq[p * D + d]);
          dk_ptr[base + d] = from_compute<T>(gk[p * D + d]);
          dv_ptr[base + d] = from_compute<T>(gv[p * D + d]);
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------
// Fast path: tiled dense attention per (branch, b, h, segment) over the kept
// rows, addressed in place (only small cache tiles are copied). Nested
// branches compute only their own pairs, weighted (shared_pairs).

constexpr int64_t kTileQ = 32;  // query rows per tile
constexpr int64_t kTileK = 32;  // key rows per tile (inner, vectorised dim of the score loops)

// ---- SIMD building blocks ----
// GCC/Clang vector extensions (32 bytes: 8 floats or 4 doubles). Plain loops
// over small local arrays get spilled to the stack by GCC; these stay in
// registers, and compile to SSE/NEON or scalar code on other targets.
typedef float f32x8 __attribute__((vector_size(32)));
typedef double f64x4 __attribute__((vector_size(32)));
typedef int32_t i32x8 __attribute__((vector_size(32)));
template <typename C> struct VecOf;
template <> struct VecOf<float> { using type = f32x8; };
template <> struct VecOf<double> { using type = f64x4; };

template <typename C>
struct Simd {
  using V = typename VecOf<C>::type;
  static constexpr int64_t kLanes = 32 / sizeof(C);
  static V load(const C* p) {
    V v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(C* p, V v) { std::memcpy(p, &v, sizeof v); }
  static V splat(C x) { return V{} + x; }
};

// exp(x) on 8 floats for softmax arguments (x <= ~0): x = n ln2 + f with
// |f| <= ln2/2, e^f by a degree-6 polynomial (relative error ~2e-7), 2^n built
// in the exponent bits; -87 > x > -inf gives ~1e-38 instead of 0, -inf (a
// pair left out) 0.
inline f32x8 exp8(f32x8 x) {
  const f32x8 lo = Simd<float>::splat(-87.0f), hi = Simd<float>::splat(88.0f);
  const auto out = x == -std::numeric_limits<float>::infinity();
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x8 magic = Simd<float>::splat(12582912.0f);  // 1.5 * 2^23: rounds to an integer
  f32x8 n = (x * 1.44269504088896341f + magic) - magic;
  f32x8 f = x - n * 0.693145751953125f;  // ln2 in two parts: the first product is exact
  f = f - n * 1.428606765330187e-06f;
  f32x8 p = Simd<float>::splat(1.0f / 720);
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  i32x8 bits = (__builtin_convertvector(n, i32x8) + 127) << 23;
  return out ? Simd<float>::splat(0.0f) : p * std::bit_cast<f32x8>(bits);
}

// s[j] = exp(s[j] - shift) for j < valid, 0 for valid <= j < kTileK; returns
// the sum. float: vectorised over whole blocks (the padded tail is finite and
// zeroed after); double (tests): std::exp, exact.
template <typename C>
inline C exp_shifted(C* s, int64_t valid, C shift) {
  C sum = 0;
  if constexpr (std::is_same_v<C, float>) {
    using S = Simd<float>;
    f32x8 total{};
    const f32x8 sh = S::splat(shift);
    for (int64_t j = 0; j < valid; j += S::kLanes) S::store(s + j, exp8(S::load(s + j) - sh));
    for (int64_t j = valid; j < kTileK; ++j) s[j] = 0;
    for (int64_t j = 0; j < valid; j += S::kLanes) total += S::load(s + j);
    for (int64_t l = 0; l < S::kLanes; ++l) sum += total[l];
  } else {
    for (int64_t j = 0; j < valid; ++j) sum += (s[j] = std::exp(s[j] - shift));
    for (int64_t j = valid; j < kTileK; ++j) s[j] = 0;
  }
  return sum;
}

template <typename C>
inline C row_max(const C* s, int64_t valid) {
  C m = s[0];
  for (int64_t j = 1; j < valid; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

// s[0..kTileK) = sum_d a[d] * bt[d][0..kTileK): one row of a tile product with
// the key tile transposed; the kTileK-wide accumulator lives in registers.
template <typename C>
inline void row_times_tile(const C* a, const C* bt, int64_t D, C* s) {
  using S = Simd<C>;
  using V = typename S::V;
  constexpr int64_t kVecs = kTileK / S::kLanes;
  V acc[kVecs];
#pragma GCC unroll 16
  for (int64_t v = 0; v < kVecs; ++v) acc[v] = V{};
  for (int64_t d = 0; d < D; ++d) {
    const V ad = S::splat(a[d]);
    const C* bd = bt + d * kTileK;
#pragma GCC unroll 16
    for (int64_t v = 0; v < kVecs; ++v) acc[v] += ad * S::load(bd + v * S::kLanes);
  }
#pragma GCC unroll 16
  for (int64_t v = 0; v < kVecs; ++v) S::store(s + v * S::kLanes, acc[v]);
}

// out[0..D) += sum_{t < n} coef[t * coef_stride] * rows[t * row_stride + 0..D).
// Blocks of D stay in registers while t streams, so the loop is bound by
// loads and FMAs rather than by stores to out.
template <typename C>
inline void accumulate_rows(const C* coef, int64_t coef_stride, const C* rows, int64_t row_stride,
                            int64_t n, int64_t D, C* out) {
  using S = Simd<C>;
  using V = typename S::V;
  constexpr int64_t L = S::kLanes;
  int64_t d0 = 0;
  for (; d0 + 4 * L <= D; d0 += 4 * L) {
    V a0 = S::load(out + d0), a1 = S::load(out + d0 + L), a2 = S::load(out + d0 + 2 * L),
      a3 = S::load(out + d0 + 3 * L);
    for (int64_t t = 0; t < n; ++t) {
      const V c = S::splat(coef[t * coef_stride]);
      const C* r = rows + t * row_stride + d0;
      a0 += c * S::load(r);
      a1 += c * S::load(r + L);
      a2 += c * S::load(r + 2 * L);
      a3 += c * S::load(r + 3 * L);
    }
    S::store(out + d0, a0);
    S::store(out + d0 + L, a1);
    S::store(out + d0 + 2 * L, a2);
    S::store(out + d0 + 3 * L, a3);
  }
  for (; d0 + L <= D; d0 += L) {
    V a = S::load(out + d0);
    for (int64_t t = 0; t < n; ++t)
      a += S::splat(coef[t * coef_stride]) * S::load(rows + t * row_stride + d0);
    S::store(out + d0, a);
  }
  for (; d0 < D; ++d0) {
    C a = out[d0];
    for (int64_t t = 0; t < n; ++t) a += coef[t * coef_stride] * rows[t * row_stride + d0];
    out[d0] = a;
  }
}

// How one row sees a nested branch's pairs: the keys of its own span (a
// smaller branch computes those pairs) and its pairs' log weights by key row
// mod 8 (row classes repeat every 8 kept rows). Made once per row.
template <typename C>
struct RowPairs {
  int64_t own = 0, own_end = 0;
  C log_weight[8] = {};
};

template <typename C>
RowPairs<C> row_pairs(const BranchPairs& pairs, int64_t h, int64_t qi) {
  RowPairs<C> row;
  for (int x = 0; x < 8; ++x) row.log_weight[x] = static_cast<C>(std::log(double(pairs.weight(h, qi, x))));
  if (pairs.span > 0) {
    row.own = pairs.span_start(qi);
    row.own_end = row.own + pairs.span;
  }
  return row;
}

// A nested branch's scores of a row against keys j0 + j, j < valid: plus the
// log of the pair's weight, or -inf for a key in the row's own span.
template <typename C>
void weigh_pairs(const RowPairs<C>& row, int64_t j0, int64_t valid, C* s) {
  for (int64_t j = 0; j < valid; ++j) {
    const int64_t tk = j0 + j;
    s[j] = tk >= row.own && tk < row.own_end ? -std::numeric_limits<C>::infinity() : s[j] + row.log_weight[tk & 7];
  }
}

// Per-thread tiles, sized once per parallel region.
template <typename C>
struct Scratch {
  // Tiles: q (scaled queries), kt/vt (transposed keys/values), kr/vr (row-major),
  // acc (forward output rows; backward dO rows), s (one score row), pbuf/dsbuf
  // (backward P and dS of a tile), dk/dv (backward key-tile gradients), m/l
  // (online-softmax max and sum), lrow/drow (backward L and D - grad_lse per row),
  // mask (the dropout factors of one score row), row_pairs (backward: each
  // row's view of a nested branch's pairs).
  std::vector<C> q, kt, kr, vr, vt, acc, s, pbuf, dsbuf, dk, dv, m, l, lrow, drow, mask;
  std::vector<RowPairs<C>> row_pairs;
  explicit Scratch(int64_t D, int64_t max_rows = 0)
      : q(kTileQ * D), kt(D * kTileK), kr(kTileK * D), vr(kTileK * D), vt(D * kTileK),
        acc(kTileQ * D), s(kTileK), pbuf(kTileQ * kTileK), dsbuf(kTileQ * kTileK),
        dk(kTileK * D), dv(kTileK * D), m(kTileQ), l(kTileQ), lrow(max_rows), drow(max_rows),
        mask(kTileK) {}
};

// Below this many flops a branch runs on one thread: waking the OpenMP team
// costs more than it saves (and much more on a loaded machine).
constexpr double kParallelFlops = 4e6;

// Estimated flops of one branch: B*H*segments blocks of kept rows, each row
// seeing about half (causal) or all of its block.
double branch_flops(int64_t B, int64_t H, int64_t N, int64_t D, const Branch& br, bool causal) {
  double rows = static_cast<double>(B * H) * static_cast<double>(N) / static_cast<double>(br.r);
  double keys = static_cast<double>(max_kept_rows(br.w, br.r)) * (causal ? 0.5 : 1.0);
  return rows * keys * 4.0 * static_cast<double>(D);
}

// Runs body(thread_scratch, unit) for unit in [0, units), dynamically
// scheduled: units differ in cost (causal tiles, partial last segments).
template <typename MakeScratch, typename Body>
void parallel_units(int64_t units, bool parallel, MakeScratch make_scratch, Body body) {
  if (units <= 0) return;
#pragma omp parallel if (parallel && units > 1)
  {
    auto scratch = make_scratch();
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; ++u) body(scratch, u);
  }
}

// Nested branches compute each pair they share once, at its weight
// (core/dilated.h, nested_pairs), where their spans hold a key tile or more:
// the tiles inside one span are what they skip (shorter spans would only add
// the masking). With dropout each branch's copy of a pair has its own mask
// decision, so every branch computes all its pairs; with per-pair dropout
// (dropout_per_pair) a pair's decision is its owner's, the branch computing
// it here, so this plan is taken whatever the spans.
std::vector<BranchPairs> shared_pairs(const DilatedAttentionConfig& config, int64_t n) {
  std::vector<BranchPairs> pairs = sharing_pairs(config, n);
  const bool per_pair = config.dropout.enabled() && !pairs.empty();
  if (!per_pair &&
      std::any_of(pairs.begin(), pairs.end(), [](const BranchPairs& p) { return p.span > 0 && p.span < kTileK; }))
    pairs.clear();
  if (pairs.empty()) pairs.resize(config.branches.size());
  return pairs;
}

// Whether rows [a, a + na) and [b, b + nb) all lie in one span of a nested
// branch: every pair between them belongs to a smaller branch.
bool in_one_span(const BranchPairs& pairs, int64_t a, int64_t na, int64_t b, int64_t nb) {
  if (pairs.span == 0) return false;
  const int64_t s = pairs.span_start(a);
  return pairs.span_start(a + na - 1) == s && pairs.span_start(b) == s && pairs.span_start(b + nb - 1) == s;
}

// Loads keys [j0, j0 + nk) of a row set into a transposed tile (zero-padded
// to kTileK) and optionally a row-major tile.
template <typename T, typename C>
void load_keys(const Rows<const T>& X, int64_t b, int64_t h, const RowSet& rs, int64_t j0,
               int64_t nk, int64_t D, C* transposed, C* row_major) {
  for (int64_t jj = 0; jj < kTileK; ++jj) {
    if (jj < nk) {
      const T* src = X.row(b, rs.base + (j0 + jj) * rs.stride, h);
      for (int64_t d = 0; d < D; ++d) {
        C x = to_compute<C>(src[d]);
        if (transposed) transposed[d * kTileK + jj] = x;
        if (row_major) row_major[jj * D + d] = x;
      }
    } else if (transposed) {
      for (int64_t d = 0; d < D; ++d) transposed[d * kTileK + jj] = 0;
    }
  }
}

template <typename T, typename C>
void load_rows(const Rows<const T>& X, int64_t b, int64_t h, const RowSet& rs, int64_t i0,
               int64_t nq, int64_t D, C factor, C* dst) {
  for (int64_t i = 0; i < nq; ++i) {
    const T* src = X.row(b, rs.base + (i0 + i) * rs.stride, h);
    for (int64_t d = 0; d < D; ++d) dst[i * D + d] = factor * to_compute<C>(src[d]);
  }
}

// One query tile [i0, i0 + nq) of one (branch, b, h, segment): online softmax
// over its keys, then merge the branch result (O_i, L_i) into (O, L). With
// dropout, the softmax sum (hence L) is that of the undropped weights, while
// the output accumulates the masked ones. `pairs`: the branch's share of the
// pairs nested branches share (a row may have none).
template <typename T, typename C>
void forward_tile(const Rows<const T>& Q, const Rows<const T>& K, const Rows<const T>& V,
                  int64_t b, int64_t h, const RowSet& rs, int64_t i0, int64_t N, int64_t H,
                  int64_t D, bool causal, C scale, const DropoutRows& drop, const BranchPairs& pairs,
                  C* O, C* L, Scratch<C>& sc) {
  const C neg_inf = -std::numeric_limits<C>::infinity();
  const int64_t nq = std::min(kTileQ, rs.count - i0);
  load_rows(Q, b, h, rs, i0, nq, D, scale, sc.q.data());
  std::fill(sc.acc.begin(), sc.acc.end(), C(0));
  std::fill(sc.m.begin(), sc.m.end(), neg_inf);
  std::fill(sc.l.begin(), sc.l.end(), C(0));
  const bool nested = !pairs.plain();
  RowPairs<C> row_views[kTileQ];
  if (nested)
    for (int64_t i = 0; i < nq; ++i) row_views[i] = row_pairs<C>(pairs, h, i0 + i);
  // Causal, a nested branch's row sees only the spans before its own.
  const int64_t key_end = !causal ? rs.count : pairs.span > 0 ? pairs.span_start(i0 + nq - 1) : i0 + nq;
  for (int64_t j0 = 0; j0 < key_end; j0 += kTileK) {
    const int64_t nk = std::min(kTileK, key_end - j0);
    if (in_one_span(pairs, i0, nq, j0, nk)) continue;
    load_keys(K, b, h, rs, j0, nk, D, sc.kt.data(), static_cast<C*>(nullptr));
    load_keys(V, b, h, rs, j0, nk, D, static_cast<C*>(nullptr), sc.vr.data());
    for (int64_t i = 0; i < nq; ++i) {
      const int64_t valid = causal ? std::min(nk, i0 + i - j0 + 1) : nk;
      if (valid <= 0) continue;
      C* s = sc.s.data();
      row_times_tile(sc.q.data() + i * D, sc.kt.data(), D, s);
      if (nested) weigh_pairs(row_views[i], j0, valid, s);
      const C m_old = sc.m[i], m_new = std::max(m_old, row_max(s, valid));
      if (m_new == neg_inf) continue;  // no pair of its own yet
      const C sum = exp_shifted(s, valid, m_new);
      C* acc = sc.acc.data() + i * D;
      if (m_old != m_new) {
        const C alpha = m_old == neg_inf ? C(0) : std::exp(m_old - m_new);
        sc.l[i] *= alpha;
        for (int64_t d = 0; d < D; ++d) acc[d] *= alpha;
      }
      sc.l[i] += sum;
      sc.m[i] = m_new;
      if (drop.enabled()) {  // keys j0 + j are the kept rows' indices t
        dropout_factors(*drop.d, drop.rows.at(rs.base + (i0 + i) * rs.stride), j0, valid,
                        sc.mask.data());
        for (int64_t j = 0; j < valid; ++j) s[j] *= sc.mask[j];
      }
      accumulate_rows(s, 1, sc.vr.data(), D, valid, D, acc);
    }
  }
  // Merge: rows of one branch are disjoint, branches run one after another.
  for (int64_t i = 0; i < nq; ++i) {
    if (sc.l[i] == 0) continue;  // a nested branch's row with no pairs of its own
    const int64_t pos = rs.base + (i0 + i) * rs.stride;
    const int64_t row = (b * N + pos) * H + h;
    const C l_branch = sc.m[i] + std::log(sc.l[i]);
    const C inv_l = C(1) / sc.l[i];
    const C* acc = sc.acc.data() + i * D;
    C* o = O + row * D;
    const C l_old = L[row];
    if (l_old == neg_inf) {
      for (int64_t d = 0; d < D; ++d) o[d] = acc[d] * inv_l;
      L[row] = l_branch;
    } else {
      const C hi = std::max(l_old, l_branch), lo = std::min(l_old, l_branch);
      const C l_new = hi + std::log1p(std::exp(lo - hi));
      const C w_old = std::exp(l_old - l_new), w_branch = std::exp(l_branch - l_new) * inv_l;
      for (int64_t d = 0; d < D; ++d) o[d] = w_old * o[d] + w_branch * acc[d];
      L[row] = l_new;
    }
  }
}

// Accumulator buffers in the compute type: the destination itself when its
// dtype is the compute type, else a temporary converted at the end.
template <typename T, typename C>
struct Accumulator {
  std::vector<C> buffer;
  C* ptr;
  Accumulator(const Tensor& dst) {
    if constexpr (std::is_same_v<T, C>) {
      ptr = static_cast<C*>(dst.raw_data());
    } else {
      buffer.resize(static_cast<size_t>(dst.numel()));
      ptr = buffer.data();
    }
  }
  void write_to(const Tensor& dst, C factor = C(1)) {
    T* out = static_cast<T*>(dst.raw_data());
    C* src = ptr;
    parallel_for(dst.numel(), kParallelGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) out[i] = from_compute<T>(factor * src[i]);
    });
  }
};

template <typename T>
void fast_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                  const DilatedAttentionConfig& config, const Tensor& out, const Tensor& lse) {
  using C = compute_t<T>;
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const std::vector<Branch> branches = clamped_branches(config, N);
  const std::vector<BranchPairs> pairs = shared_pairs(config, N);
  const C scale = static_cast<C>(resolved_scale(config, D));
  Rows<const T> Q = rows_of<const T>(q), K = rows_of<const T>(k), V = rows_of<const T>(v);
  Accumulator<T, C> O(out);
  C* L = static_cast<C*>(lse.raw_data());
  const int64_t rows = B * N * H;
  parallel_for(rows, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D, 1)),
               [&](int64_t lo, int64_t hi) {
                 for (int64_t r = lo; r < hi; ++r) {
                   L[r] = -std::numeric_limits<C>::infinity();
                   std::fill(O.ptr + r * D, O.ptr + (r + 1) * D, C(0));
                 }
               });
  for (size_t bi = 0; bi < branches.size(); ++bi) {
    const Branch& br = branches[bi];
    const int64_t segments = (N + br.w - 1) / br.w;
    const int64_t max_rows = max_kept_rows(br.w, br.r);
    if (pairs[bi].shares_all(max_rows)) continue;
    const int64_t tiles = (max_rows + kTileQ - 1) / kTileQ;
    // Units in (b, h, segment, tile) order; within a branch they write disjoint rows.
    parallel_units(
        B * H * segments * tiles, branch_flops(B, H, N, D, br, config.causal) > kParallelFlops,
        [&] { return Scratch<C>(D); },
        [&](Scratch<C>& sc, int64_t u) {
          const int64_t tile = u % tiles, s = (u / tiles) % segments, bh = u / (tiles * segments);
          const int64_t b = bh / H, h = bh % H;
          const RowSet rs = kept_rows(N, br, h, s);
          if (tile * kTileQ >= rs.count) return;
          forward_tile<T, C>(Q, K, V, b, h, rs, tile * kTileQ, N, H, D, config.causal, scale,
                             dropout_rows(config, bi, B, b, H, h, N), pairs[bi], O.ptr, L, sc);
        });
  }
  if constexpr (!std::is_same_v<T, C>) O.write_to(out);
}

// One (branch, b, h, segment), FlashAttention-2 style: per key tile, dK and dV
// accumulate in the tile while the query tiles stream past; dQ (unscaled)
// accumulates in place. Uses the global L and Dg = D - grad_lse per row. With
// dropout (factors M): dS = P (M dP' - Dg), dV += (P M)^T dO. A nested
// branch's P is weighted (forward_tile).
template <typename T, typename C>
void backward_item(const Rows<const T>& Q, const Rows<const T>& K, const Rows<const T>& V,
                   const Rows<const T>& dO, const C* L, const C* Dg, int64_t b, int64_t h,
                   const RowSet& rs, int64_t N, int64_t H, int64_t D, bool causal, C scale,
                   const DropoutRows& drop, const BranchPairs& pairs, C* dQ, C* dK, C* dV,
                   Scratch<C>& sc) {
  const bool nested = !pairs.plain();
  const int64_t n = rs.count;
  sc.lrow.resize(n);
  sc.drow.resize(n);
  if (nested) {
    sc.row_pairs.resize(n);
    for (int64_t t = 0; t < n; ++t) sc.row_pairs[t] = row_pairs<C>(pairs, h, t);
  }
  for (int64_t t = 0; t < n; ++t) {
    const int64_t row = (b * N + rs.base + t * rs.stride) * H + h;
    sc.lrow[t] = L[row];
    sc.drow[t] = Dg[row];
  }
  for (int64_t j0 = 0; j0 < n; j0 += kTileK) {
    const int64_t nk = std::min(kTileK, n - j0);
    load_keys(K, b, h, rs, j0, nk, D, sc.kt.data(), sc.kr.data());
    load_keys(V, b, h, rs, j0, nk, D, sc.vt.data(), static_cast<C*>(nullptr));
    std::fill(sc.dk.begin(), sc.dk.end(), C(0));
    std::fill(sc.dv.begin(), sc.dv.end(), C(0));
    for (int64_t i0 = causal ? j0 : 0; i0 < n; i0 += kTileQ) {
      const int64_t nq = std::min(kTileQ, n - i0);
      if (in_one_span(pairs, i0, nq, j0, nk)) continue;
      load_rows(Q, b, h, rs, i0, nq, D, scale, sc.q.data());
      load_rows(dO, b, h, rs, i0, nq, D, C(1), sc.acc.data());  // sc.acc holds the dO tile
      const C* dot = sc.acc.data();
      for (int64_t i = 0; i < nq; ++i) {
        const int64_t qi = i0 + i;
        const int64_t valid = causal ? std::min(nk, qi - j0 + 1) : nk;
        C* p = sc.pbuf.data() + i * kTileK;
        C* ds = sc.dsbuf.data() + i * kTileK;
        if (valid <= 0) {
          std::fill(p, p + kTileK, C(0));
          std::fill(ds, ds + kTileK, C(0));
          continue;
        }
        row_times_tile(sc.q.data() + i * D, sc.kt.data(), D, p);
        row_times_tile(dot + i * D, sc.vt.data(), D, ds);
        const C l = sc.lrow[qi], dg = sc.drow[qi];
        if (nested) weigh_pairs(sc.row_pairs[qi], j0, valid, p);
        exp_shifted(p, valid, l);
        if (drop.enabled()) {
          C* mask = sc.mask.data();
          dropout_factors(*drop.d, drop.rows.at(rs.base + qi * rs.stride), j0, valid, mask);
          for (int64_t j = 0; j < valid; ++j) {
            ds[j] = p[j] * (mask[j] * ds[j] - dg);
            p[j] *= mask[j];
          }
          for (int64_t j = valid; j < kTileK; ++j) ds[j] = 0;  // p is 0 there already
        } else {
          for (int64_t j = 0; j < kTileK; ++j) ds[j] = p[j] * (ds[j] - dg);  // 0 where masked
        }
        C* dq = dQ + ((b * N + rs.base + qi * rs.stride) * H + h) * D;
        accumulate_rows(ds, 1, sc.kr.data(), D, valid, D, dq);
      }
      // dV += P^T dO, dK += dS^T (scale Q); P and dS are 0 where masked.
      for (int64_t j = 0; j < nk; ++j) {
        accumulate_rows(sc.pbuf.data() + j, kTileK, dot, D, nq, D, sc.dv.data() + j * D);
        accumulate_rows(sc.dsbuf.data() + j, kTileK, sc.q.data(), D, nq, D, sc.dk.data() + j * D);
      }
    }
    for (int64_t j = 0; j < nk; ++j) {
      const int64_t row = (b * N + rs.base + (j0 + j) * rs.stride) * H + h;
      C* dk = dK + row * D;
      C* dv = dV + row * D;
      const C* tk = sc.dk.data() + j * D;
      const C* tv = sc.dv.data() + j * D;
      for (int64_t d = 0; d < D; ++d) {
        dk[d] += tk[d];
        dv[d] += tv[d];
      }
    }
  }
}

template <typename T>
void fast_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& out,
                   const Tensor& lse, const Tensor& grad_out, const Tensor& grad_lse,
                   const DilatedAttentionConfig& config, const Tensor& dq, const Tensor& dk,
                   const Tensor& dv) {
  using C = compute_t<T>;
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
  const std::vector<Branch> branches = clamped_branches(config, N);
  const std::vector<BranchPairs> pairs = shared_pairs(config, N);
  const C scale = static_cast<C>(resolved_scale(config, D));
  Rows<const T> Q = rows_of<const T>(q), K = rows_of<const T>(k), V = rows_of<const T>(v);
  Rows<const T> dO = rows_of<const T>(grad_out);
  const T* o = static_cast<const T*>(out.raw_data());
  const C* L = static_cast<const C*>(lse.raw_data());
  RowScalars<C> g = row_scalars<C>(grad_lse);
  Accumulator<T, C> dQ(dq), dK(dk), dV(dv);
  // Dg_p = dO_p . O_p - grad_lse_p; zero the accumulators.
  std::vector<C> Dg(static_cast<size_t>(B * N * H));
  parallel_for(B * N * H, std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(D, 1)),
               [&](int64_t lo, int64_t hi) {
                 for (int64_t r = lo; r < hi; ++r) {
                   const int64_t h = r % H, pos = (r / H) % N, b = r / (H * N);
                   const T* do_row = dO.row(b, pos, h);
                   const T* o_row = o + r * D;
                   C acc = 0;
                   for (int64_t d = 0; d < D; ++d)
                     acc += to_compute<C>(do_row[d]) * to_compute<C>(o_row[d]);
                   Dg[r] = acc - g.at(b, pos, h);
                   std::fill(dQ.ptr + r * D, dQ.ptr + (r + 1) * D, C(0));
                   std::fill(dK.ptr + r * D, dK.ptr + (r + 1) * D, C(0));
                   std::fill(dV.ptr + r * D, dV.ptr + (r + 1) * D, C(0));
                 }
               });
  for (size_t bi = 0; bi < branches.size(); ++bi) {
    const Branch& br = branches[bi];
    const int64_t segments = (N + br.w - 1) / br.w;
    const int64_t max_rows = max_kept_rows(br.w, br.r);
    if (pairs[bi].shares_all(max_rows)) continue;
    parallel_units(
        B * H * segments, 2.5 * branch_flops(B, H, N, D, br, config.causal) > kParallelFlops,
        [&] { return Scratch<C>(D, max_rows); },
        [&](Scratch<C>& sc, int64_t u) {
          const int64_t s = u % segments, bh = u / segments, b = bh / H, h = bh % H;
          const RowSet rs = kept_rows(N, br, h, s);
          if (rs.count == 0) return;
          backward_item<T, C>(Q, K, V, dO, L, Dg.data(), b, h, rs, N, H, D, config.causal, scale,
                              dropout_rows(config, bi, B, b, H, h, N), pairs[bi], dQ.ptr, dK.ptr,
                              dV.ptr, sc);
        });
  }
  // dQ = scale * dS K: the scale is applied once here.
  if constexpr (std::is_same_v<T, C>) {
    C* p = dQ.ptr;
    parallel_for(dq.numel(), kParallelGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) p[i] *= scale;
    });
  } else {
    dQ.write_to(dq, scale);
    dK.write_to(dk);
    dV.write_to(dv);
  }
}

template <typename F>
void visit_float_dtype(const char* fn, DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: return f(float{});
    case DType::Float64: return f(double{});
    case DType::BFloat16: return f(BFloat16{});
    default: MINIDL_FAIL(fn, ": unsupported dtype ", dtype, "; expected float32, float64 or bfloat16");
  }
}

}  // namespace

void dilated_attention_forward(const Tensor& q, const Tensor& k, const Tensor& v,
                               const DilatedAttentionConfig& config, const Tensor& out,
                               const Tensor& lse) {
  const char* fn = "cpu::dilated_attention_forward";
  check_layout(fn, q, k, v, out, lse, config);
  visit_float_dtype(fn, q.dtype(), [&](auto tag) {
    fast_forward<decltype(tag)>(q, k, v, config, out, lse);
  });
}

void dilated_attention_backward(const Tensor& q, const Tensor& k, const Tensor& v,
                                const Tensor& out, const Tensor& lse, const Tensor& grad_out,
                                const Tensor& grad_lse, const DilatedAttentionConfig& config,
                                const Tensor& dq, const Tensor& dk, const Tensor& dv) {
  const char* fn = "cpu::dilated_attention_backward";
  check_layout(fn, q, k, v, out, lse, config);
  check_backward_layout(fn, q, grad_out, grad_lse, lse, dq, dk, dv);
  visit_float_dtype(fn, q.dtype(), [&](auto tag) {
    fast_backward<decltype(tag)>(q, k, v, out, lse, grad_out, grad_lse, config, dq, dk, dv);
  });
}

void dilated_attention_forward_reference(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const DilatedAttentionConfig& config, const Tensor& out,
                                         const Tensor& lse) {
  const char* fn = "cpu::dilated_attention_forward_reference";
  check_layout(fn, q, k, v, out, lse, config);
  visit_float_dtype(fn, q.dtype(), [&](auto tag) {
    reference_forward<decltype(tag)>(q, k, v, config, out, lse);
  });
}

void dilated_attention_backward_reference(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const Tensor& out, const Tensor& lse,
                                          const Tensor& grad_out, const Tensor& grad_lse,
                                          const DilatedAttentionConfig& config, const Tensor& dq,
                                          const Tensor& dk, const Tensor& dv) {
  const char* fn = "cpu::dilated_attention_backward_reference";
  check_layout(fn, q, k, v, out, lse, config);
  check_backward_layout(fn, q, grad_out, grad_lse, lse, dq, dk, dv);
  visit_float_dtype(fn, q.dtype(), [&](auto tag) {
    reference_backward<decltype(tag)>(q, k, v, out, lse, grad_out, grad_lse, config, dq, dk, dv);
  });
}

}  // namespace minidl::cpu
