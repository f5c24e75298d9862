// CPU GEMM, Goto/BLIS style (see gemm.h for the contract).
//
// Loop nest for one C = alpha op(A) op(B) + beta C on one thread:
//   jc over N by NC      op(B) panel KC x NC packed (L3)
//     pc over K by KC    (beta applies to the first K block only)
//       ic over M by MC  op(A) block MC x KC packed (L2)
//         jr by NR       one B sliver, KC x NR, stays in L1
//           ir by MR     micro-kernel: MR x NR accumulators in registers
// Packing lays each sliver out in the order the micro-kernel reads it and
// zero-pads ragged edges, so the kernel never branches; edge tiles go
// through a small buffer. Threads split C into independent blocks (see
// "threading" below).
#include "cpu/gemm.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "core/strided.h"

namespace minidl::cpu {
namespace {

// ---- micro-kernels ---------------------------------------------------------
// C[MR x NR] = alpha * (packed A sliver) (packed B sliver) + beta * C, where
// the A sliver holds kc steps of MR values and the B sliver kc steps of NR.
// C is read only when beta != 0. The kernels prefetch their C tile first:
// its rows are far apart (often 4 KiB, the same L1 set) and not in cache, and
// the load latency at the end would otherwise stall every tile.

// Prefetches `rows` rows of `cols` elements, ldc apart.
template <typename T>
MINIDL_FORCEINLINE void prefetch_tile(const T* c, int64_t ldc, int rows, int cols) {
  for (int i = 0; i < rows; ++i) {
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + cols - 1), _MM_HINT_T0);
  }
}

// One AVX2 register of T, the operations the micro-kernel uses.
template <typename T> struct Avx2;
template <> struct Avx2<float> {
  using V = __m256;
  static constexpr int kLanes = 8;
  static V zero() { return _mm256_setzero_ps(); }
  static V set1(float x) { return _mm256_set1_ps(x); }
  static V broadcast(const float* p) { return _mm256_broadcast_ss(p); }
  static V load(const float* p) { return _mm256_load_ps(p); }
  static V loadu(const float* p) { return _mm256_loadu_ps(p); }
  static void storeu(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V mul(V x, V y) { return _mm256_mul_ps(x, y); }
  static V fmadd(V x, V y, V z) { return _mm256_fmadd_ps(x, y, z); }
};
template <> struct Avx2<double> {
  using V = __m256d;
  static constexpr int kLanes = 4;
  static V zero() { return _mm256_setzero_pd(); }
  static V set1(double x) { return _mm256_set1_pd(x); }
  static V broadcast(const double* p) { return _mm256_broadcast_sd(p); }
  static V load(const double* p) { return _mm256_load_pd(p); }
  static V loadu(const double* p) { return _mm256_loadu_pd(p); }
  static void storeu(double* p, V v) { _mm256_storeu_pd(p, v); }
  static V mul(V x, V y) { return _mm256_mul_pd(x, y); }
  static V fmadd(V x, V y, V z) { return _mm256_fmadd_pd(x, y, z); }
};

// 6 rows x 2 registers (6 x 16 float32, 6 x 8 float64): 12 accumulators, 2
// for the B row, 1 for the A broadcast. The loops over rows unroll fully, so
// the accumulator array lives in registers.
template <typename T>
void kernel_6x2v(int64_t kc, const T* __restrict a, const T* __restrict b, T* __restrict c, int64_t ldc,
                 T alpha, T beta) {
  using S = Avx2<T>;
  using V = typename S::V;
  constexpr int L = S::kLanes;
  V acc[6][2];
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) acc[i][0] = acc[i][1] = S::zero();
  prefetch_tile(c, ldc, 6, 2 * L);
#pragma GCC unroll 4
  for (int64_t p = 0; p < kc; ++p) {
    const V b0 = S::load(b), b1 = S::load(b + L);
#pragma GCC unroll 6
    for (int i = 0; i < 6; ++i) {
      const V ai = S::broadcast(a + i);
      acc[i][0] = S::fmadd(ai, b0, acc[i][0]);
      acc[i][1] = S::fmadd(ai, b1, acc[i][1]);
    }
    a += 6;
    b += 2 * L;
  }
  const V va = S::set1(alpha), vb = S::set1(beta);
#pragma GCC unroll 6
  for (int i = 0; i < 6; ++i) {
    T* row = c + i * ldc;
    V r0 = S::mul(va, acc[i][0]), r1 = S::mul(va, acc[i][1]);
    if (beta != T(0)) {
      r0 = S::fmadd(vb, S::loadu(row), r0);
      r1 = S::fmadd(vb, S::loadu(row + L), r1);
    }
    S::storeu(row, r0);
    S::storeu(row + L, r1);
  }
}

// Block sizes per accumulation type. float32 on Zen 3 (32 KiB L1d, 512 KiB
// L2, shared L3): a B sliver KC x NR = 16 KiB sits in L1, an A block
// MC x KC = 144 KiB in L2, a B panel KC x NC = 3 MiB in L3.
template <typename Acc> struct Blocking;
// MR x NR is the micro-kernel's block (kernel_6x2v).
template <> struct Blocking<float> {
  static constexpr int64_t MR = 6, NR = 2 * Avx2<float>::kLanes, MC = 144, KC = 256, NC = 3072;
};
template <> struct Blocking<double> {
  static constexpr int64_t MR = 6, NR = 2 * Avx2<double>::kLanes, MC = 72, KC = 256, NC = 2048;
};

// ---- scratch memory ----------------------------------------------------------

// A growable, 64-byte aligned buffer. One per thread and purpose, kept for
// the thread's life: packing buffers are hundreds of KiB, and fresh pages on
// every call would cost more than a small GEMM.
class Scratch {
 public:
  ~Scratch() { std::free(data_); }
  template <typename T> T* get(int64_t count) {
    size_t need = static_cast<size_t>(count) * sizeof(T);
    if (need > bytes_) {
      std::free(data_);
      bytes_ = (need + 63) / 64 * 64;
      data_ = std::aligned_alloc(64, bytes_);
      MINIDL_CHECK(data_ != nullptr, "gemm: out of memory allocating ", bytes_, " bytes of scratch");
    }
    return static_cast<T*>(data_);
  }

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
};

thread_local Scratch tl_pack_a, tl_pack_b, tl_c_work;

// ---- packing -----------------------------------------------------------------

template <typename Acc, typename S> inline Acc widen(S x) { return static_cast<Acc>(x); }

// Packs the mc x kc block of op(A) whose first element is `a` into MR-row
// slivers: sliver s holds, for each p, op(A)(s*MR + r, p) for r < MR.
template <typename S, typename Acc>
void pack_a(const S* a, int64_t lda, bool trans, int64_t mc, int64_t kc, Acc* dst) {
  constexpr int64_t MR = Blocking<Acc>::MR;
  for (int64_t i0 = 0; i0 < mc; i0 += MR, dst += MR * kc) {
    int64_t mr = std::min(MR, mc - i0);
    if (trans) {  // op(A)(i, p) = a[p * lda + i]: each p reads mr contiguous values
      for (int64_t p = 0; p < kc; ++p) {
        const S* src = a + p * lda + i0;
        Acc* d = dst + p * MR;
        if (mr == MR) {
          for (int64_t r = 0; r < MR; ++r) d[r] = widen<Acc>(src[r]);
        } else {
          for (int64_t r = 0; r < MR; ++r) d[r] = r < mr ? widen<Acc>(src[r]) : Acc(0);
        }
      }
    } else {  // op(A)(i, p) = a[i * lda + p]: mr rows, each read along p
      for (int64_t r = 0; r < MR; ++r) {
        if (r < mr) {
          const S* src = a + (i0 + r) * lda;
          for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = widen<Acc>(src[p]);
        } else {
          for (int64_t p = 0; p < kc; ++p) dst[p * MR + r] = Acc(0);
        }
      }
    }
  }
}

// Packs one kc x nr sliver of op(B) (nr <= NR) whose first element is `b`:
// for each p, NR values op(B)(p, c), zero beyond nr.
template <typename S, typename Acc>
void pack_b_sliver(const S* b, int64_t ldb, bool trans, int64_t kc, int64_t nr, Acc* dst) {
  constexpr int64_t NR = Blocking<Acc>::NR;
  if (!trans) {  // op(B)(p, c) = b[p * ldb + c]: a contiguous run per p
    for (int64_t p = 0; p < kc; ++p) {
      const S* src = b + p * ldb;
      Acc* d = dst + p * NR;
      if constexpr (std::is_same_v<S, Acc>) {
        if (nr == NR) {
          std::memcpy(d, src, sizeof(Acc) * NR);
          continue;
        }
      }
      for (int64_t c = 0; c < NR; ++c) d[c] = c < nr ? widen<Acc>(src[c]) : Acc(0);
    }
  } else {  // op(B)(p, c) = b[c * ldb + p]: column c is a contiguous run along p
    for (int64_t c = 0; c < NR; ++c) {
      if (c < nr) {
        const S* src = b + c * ldb;
        for (int64_t p = 0; p < kc; ++p) dst[p * NR + c] = widen<Acc>(src[p]);
      } else {
        for (int64_t p = 0; p < kc; ++p) dst[p * NR + c] = Acc(0);
      }
    }
  }
}

// ---- one GEMM on one thread ---------------------------------------------------

// C = alpha op(A) op(B) + beta C with C in the accumulation type.
template <typename S, typename Acc>
void blocked_gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, Acc alpha,
                  const S* a, int64_t lda, const S* b, int64_t ldb, Acc beta, Acc* c,
                  int64_t ldc) {
  using B = Blocking<Acc>;
  constexpr int64_t MR = B::MR, NR = B::NR, MC = B::MC, KC = B::KC, NC = B::NC;
  Acc* a_block = tl_pack_a.get<Acc>(MC * KC);
  Acc* b_panel = tl_pack_b.get<Acc>(KC * std::min(NC, (n + NR - 1) / NR * NR));
  alignas(64) Acc tile[MR * NR];
  auto a_at = [&](int64_t i, int64_t p) { return trans_a ? a + p * lda + i : a + i * lda + p; };
  auto b_at = [&](int64_t p, int64_t j) { return trans_b ? b + j * ldb + p : b + p * ldb + j; };

  for (int64_t jc = 0; jc < n; jc += NC) {
    int64_t nc = std::min(NC, n - jc);
    for (int64_t pc = 0; pc < k; pc += KC) {
      int64_t kc = std::min(KC, k - pc);
      Acc beta_k = pc == 0 ? beta : Acc(1);
      for (int64_t j0 = 0; j0 < nc; j0 += NR)
        pack_b_sliver(b_at(pc, jc + j0), ldb, trans_b, kc, std::min(NR, nc - j0),
                      b_panel + j0 * kc);
      for (int64_t ic = 0; ic < m; ic += MC) {
        int64_t mc = std::min(MC, m - ic);
        pack_a(a_at(ic, pc), lda, trans_a, mc, kc, a_block);
        for (int64_t j0 = 0; j0 < nc; j0 += NR) {
          int64_t nr = std::min(NR, nc - j0);
          const Acc* bs = b_panel + j0 * kc;
          for (int64_t i0 = 0; i0 < mc; i0 += MR) {
            int64_t mr = std::min(MR, mc - i0);
            const Acc* as = a_block + i0 * kc;
            Acc* ct = c + (ic + i0) * ldc + jc + j0;
            if (mr == MR && nr == NR) {
              kernel_6x2v<Acc>(kc, as, bs, ct, ldc, alpha, beta_k);
              continue;
            }
            kernel_6x2v<Acc>(kc, as, bs, tile, NR, Acc(1), Acc(0));
            for (int64_t i = 0; i < mr; ++i)
              for (int64_t j = 0; j < nr; ++j) {
                Acc v = alpha * tile[i * NR + j];
                ct[i * ldc + j] = beta_k == Acc(0) ? v : v + beta_k * ct[i * ldc + j];
              }
          }
        }
      }
    }
  }
}

// One GEMM with C in storage type S, on the calling thread.
template <typename S>
void gemm_serial(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, compute_t<S> alpha,
                 const S* a, int64_t lda, const S* b, int64_t ldb, compute_t<S> beta, S* c,
                 int64_t ldc) {
  using Acc = compute_t<S>;
  if (m <= 0 || n <= 0) return;
  if (k == 0) {  // op(A) op(B) is the zero matrix: C = beta C
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j)
        c[i * ldc + j] = beta == Acc(0) ? S(Acc(0)) : S(beta * static_cast<Acc>(c[i * ldc + j]));
    return;
  }
  if constexpr (std::is_same_v<S, Acc>) {
    blocked_gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  } else {
    // bfloat16 C: accumulate all of K in float32, round once.
    Acc* work = tl_c_work.get<Acc>(m * n);
    blocked_gemm(trans_a, trans_b, m, n, k, Acc(1), a, lda, b, ldb, Acc(0), work, n);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t j = 0; j < n; ++j) {
        Acc v = alpha * work[i * n + j];
        if (beta != Acc(0)) v += beta * static_cast<Acc>(c[i * ldc + j]);
        c[i * ldc + j] = S(v);
      }
  }
}

// ---- threading -------------------------------------------------------------------
//
// Threads never wait for each other inside a GEMM: each computes a disjoint
// block of C as an independent GEMM (packing its own copies of the operand
// slivers it needs), so the only synchronisation is the join at the end.
// That costs some redundant packing, small next to the multiply, and keeps
// the GEMM fast when the cores are shared with other work (a thread that is
// descheduled holds nobody up at a barrier).

struct Range {
  int64_t begin, end;
};
// Part `idx` of `parts` near-equal parts of [0, total).
inline Range split(int64_t total, int64_t parts, int64_t idx) {
  return {total * idx / parts, total * (idx + 1) / parts};
}

// A tm x tn grid of C blocks for `threads` threads, picked by an estimate of
// the slowest thread's cycles: its multiply (32 flops/cycle on AVX2) plus
// packing its A rows once per NC panel and its B columns once.
template <typename Acc>
void choose_grid(int64_t m, int64_t n, int64_t k, int threads, int* tm, int* tn) {
  using B = Blocking<Acc>;
  int64_t m_slivers = (m + B::MR - 1) / B::MR, n_slivers = (n + B::NR - 1) / B::NR;
  double best = -1;
  for (int rows = 1; rows <= threads; ++rows) {
    if (threads % rows) continue;
    int cols = threads / rows;
    double mb = double((m_slivers + rows - 1) / rows * B::MR);
    double nb = double((n_slivers + cols - 1) / cols * B::NR);
    double panels = std::ceil(nb / double(B::NC));
    double cycles = mb * nb * double(k) / 16.0 + (mb * panels + nb) * double(k);
    if (best < 0 || cycles < best) {
      best = cycles;
      *tm = rows;
      *tn = cols;
    }
  }
}

// Below this many multiply-adds in all, threads cost more than they save.
constexpr double kSerialWork = 64.0 * 64 * 64;
// Batches of GEMMs at most this big run one GEMM per thread.
constexpr double kSmallGemm = 128.0 * 128 * 128;

// `batch` GEMMs of one shape; ptrs(i) gives {a, b, c} of matrix i.
template <typename S, typename Ptrs>
void run_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, compute_t<S> alpha,
                 int64_t lda, int64_t ldb, compute_t<S> beta, int64_t ldc, int64_t batch,
                 Ptrs ptrs) {
  if (m <= 0 || n <= 0 || batch <= 0) return;
  double work = double(m) * double(n) * double(std::max<int64_t>(k, 1));
  int threads = work * double(batch) < kSerialWork ? 1 : omp_get_max_threads();
  if (threads == 1) {
    for (int64_t i = 0; i < batch; ++i) {
      auto [a, b, c] = ptrs(i);
      gemm_serial<S>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    return;
  }
  // Whole matrices per thread when the batch divides well or they are small.
  if (batch >= threads && (batch % threads == 0 || batch >= 4 * threads || work <= kSmallGemm)) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < batch; ++i) {
      auto [a, b, c] = ptrs(i);
      gemm_serial<S>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    }
    return;
  }
  // Otherwise every matrix is cut into a grid of C blocks, one per thread.
  int tm = 1, tn = 1;
  choose_grid<compute_t<S>>(m, n, k, threads, &tm, &tn);
  constexpr int64_t MR = Blocking<compute_t<S>>::MR, NR = Blocking<compute_t<S>>::NR;
  int64_t m_slivers = (m + MR - 1) / MR, n_slivers = (n + NR - 1) / NR;
#pragma omp parallel num_threads(tm * tn)
  {
    int tid = omp_get_thread_num(), nt = omp_get_num_threads();
    // A smaller team than asked for (nested parallelism) takes whole rows.
    int rows = nt == tm * tn ? tm : nt, ti = nt == tm * tn ? tid / tn : tid;
    int cols = nt == tm * tn ? tn : 1, tj = nt == tm * tn ? tid % tn : 0;
    Range rs = split(m_slivers, rows, ti), cs = split(n_slivers, cols, tj);
    int64_t i0 = rs.begin * MR, i1 = std::min(rs.end * MR, m);
    int64_t j0 = cs.begin * NR, j1 = std::min(cs.end * NR, n);
    if (i0 < i1 && j0 < j1) {
      for (int64_t i = 0; i < batch; ++i) {
        auto [a, b, c] = ptrs(i);
        const S* a_rows = trans_a ? a + i0 : a + i0 * lda;
        const S* b_cols = trans_b ? b + j0 * ldb : b + j0;
        gemm_serial<S>(trans_a, trans_b, i1 - i0, j1 - j0, k, alpha, a_rows, lda, b_cols, ldb,
                       beta, c + i0 * ldc + j0, ldc);
      }
    }
  }
}

template <typename S> struct Ptrs3 {
  const S* a;
  const S* b;
  S* c;
};

void check_gemm_args(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, int64_t lda,
                     int64_t ldb, int64_t ldc) {
  MINIDL_CHECK(m >= 0 && n >= 0 && k >= 0, "gemm: negative size m=", m, " n=", n, " k=", k);
  int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
  MINIDL_CHECK(lda >= a_cols || m == 0 || k == 0, "gemm: lda ", lda, " < ", a_cols,
               " (the stored row length of A", trans_a ? ", transposed" : "", ")");
  MINIDL_CHECK(ldb >= b_cols || n == 0 || k == 0, "gemm: ldb ", ldb, " < ", b_cols,
               " (the stored row length of B", trans_b ? ", transposed" : "", ")");
  MINIDL_CHECK(ldc >= n || m == 0, "gemm: ldc ", ldc, " < n = ", n);
}

}  // namespace

template <typename T>
void gemm_strided_batched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                          compute_t<T> alpha, const T* a, int64_t lda, int64_t stride_a,
                          const T* b, int64_t ldb, int64_t stride_b, compute_t<T> beta, T* c,
                          int64_t ldc, int64_t stride_c, int64_t batch) {
  check_gemm_args(trans_a, trans_b, m, n, k, lda, ldb, ldc);
  run_batched<T>(trans_a, trans_b, m, n, k, alpha, lda, ldb, beta, ldc, batch, [&](int64_t i) {
    return Ptrs3<T>{a + i * stride_a, b + i * stride_b, c + i * stride_c};
  });
}

template <typename T>
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, compute_t<T> alpha,
          const T* a, int64_t lda, const T* b, int64_t ldb, compute_t<T> beta, T* c, int64_t ldc) {
  gemm_strided_batched<T>(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0,
                          1);
}

#define MINIDL_INSTANTIATE_GEMM(T)                                                           \
  template void gemm<T>(bool, bool, int64_t, int64_t, int64_t, compute_t<T>, const T*, int64_t, \
                        const T*, int64_t, compute_t<T>, T*, int64_t);                        \
  template void gemm_strided_batched<T>(bool, bool, int64_t, int64_t, int64_t, compute_t<T>,  \
                                        const T*, int64_t, int64_t, const T*, int64_t, int64_t, \
                                        compute_t<T>, T*, int64_t, int64_t, int64_t);
MINIDL_INSTANTIATE_GEMM(float)
MINIDL_INSTANTIATE_GEMM(double)
MINIDL_INSTANTIATE_GEMM(BFloat16)
#undef MINIDL_INSTANTIATE_GEMM

void matmul(const Tensor& a, bool trans_a, int64_t lda, const Tensor& b, bool trans_b,
            int64_t ldb, const Tensor& out) {
  int64_t nd = out.dim();
  MINIDL_CHECK(nd >= 2 && a.dim() == nd && b.dim() == nd, "cpu::matmul: expected operands of ",
               nd, " dims, got a ", shape_str(a.shape()), ", b ", shape_str(b.shape()), ", out ",
               shape_str(out.shape()));
  int64_t m = out.shape()[nd - 2], n = out.shape()[nd - 1], k = a.shape()[nd - 1];
  Shape batch(out.shape().begin(), out.shape().end() - 2);
  auto batch_index = [&](const Tensor& t) {
    return make_strided_index(batch, Shape(t.strides().begin(), t.strides().end() - 2));
  };
  StridedIndex ai = batch_index(a), bi = batch_index(b), ci = batch_index(out);
  check_gemm_args(trans_a, trans_b, m, n, k, lda, ldb, n);
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    if constexpr (std::is_same_v<S, int32_t>) {
      MINIDL_FAIL("cpu::matmul: int32 is not supported");
    } else {
      const S* ap = static_cast<const S*>(a.raw_data());
      const S* bp = static_cast<const S*>(b.raw_data());
      S* cp = static_cast<S*>(out.raw_data());
      run_batched<S>(trans_a, trans_b, m, n, k, compute_t<S>(1), lda, ldb, compute_t<S>(0), n,
                     numel(batch), [&](int64_t i) {
                       return Ptrs3<S>{ap + ai(i), bp + bi(i), cp + ci(i)};
                     });
    }
  });
}

}  // namespace minidl::cpu
