// CUDA elementwise kernels. Fast paths for a contiguous output:
//   - every operand contiguous: a flat loop over 16-byte vectors (a scalar
//     tail), or over single elements when a pointer is not 16-byte aligned;
//   - each input contiguous, a row vector broadcast over the rows of the
//     output's (rows, last dim) matrix (a bias), a per-row scalar (a column
//     broadcast along the last dim) or a single scalar: a walk over (row,
//     column) pairs that advances by addition, never by division, with
//     16-byte vectors when the last dim and the pointers allow.
// Everything else (transposes, strided outputs, other broadcasts) takes the
// general strided loop, which divides per element and dimension.
#include <algorithm>
#include <optional>
#include <type_traits>

#include "core/strided.h"
#include "cuda/elementwise.h"
#include "cuda/runtime.h"
#include "cuda/vec.cuh"

namespace minidl::cuda {
namespace {

constexpr int kThreads = 256;

StridedIndex index_of(const Tensor& t) { return make_strided_index(t.shape(), t.strides()); }

// How a fast-path input is read, relative to the contiguous output viewed as
// (rows, cols), cols its last dim.
enum Access : int {
  kFull,    // same layout as the output
  kRow,     // one row of cols elements, broadcast over the rows
  kCol,     // one element per row, broadcast along the row
  kScalar,  // one element
};

// The access of `t` (already expanded to the output's shape), or nullopt.
std::optional<Access> access_of(const Tensor& t) {
  if (t.is_contiguous()) return kFull;
  const Shape &shape = t.shape(), &strides = t.strides();
  const int64_t last = t.dim() - 1;
  const bool last_unit = shape[last] == 1 || strides[last] == 1;
  const bool last_zero = shape[last] == 1 || strides[last] == 0;
  bool lead_zero = true, lead_rows = true;
  int64_t row_stride = 1;  // a per-row operand's stride for this dim
  for (int64_t d = last - 1; d >= 0; --d) {
    if (shape[d] == 1) continue;
    lead_zero = lead_zero && strides[d] == 0;
    lead_rows = lead_rows && strides[d] == row_stride;
    row_stride *= shape[d];
  }
  if (lead_zero && last_zero) return kScalar;
  if (lead_zero && last_unit) return kRow;
  if (lead_rows && last_zero) return kCol;
  return std::nullopt;
}

bool aligned_to(const void* p, size_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// V elements of an operand at (row, col), col a multiple of V; `flat` =
// row * cols + col.
template <typename S, typename C, int V>
__device__ __forceinline__ void load_operand(const S* p, int access, int64_t flat, int64_t row,
                                             int64_t col, C (&v)[V]) {
  if (access == kFull) {
    load_vec<S, C, V>(p + flat, v);
  } else if (access == kRow) {
    load_vec<S, C, V>(p + col, v);
  } else {
    C s = static_cast<C>(p[access == kCol ? row : 0]);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = s;
  }
}

// Thread t of T visits vectors t, t + T, ... of a rows x vcols grid, moving
// (row, vcol) by (step_rows, step_cols) with one carry: one division per
// thread, none per element.
struct RowWalk {
  int64_t rows, vcols, step_rows, step_cols;
};

template <int V> RowWalk row_walk(int64_t rows, int64_t cols, unsigned grid) {
  int64_t vcols = cols / V, threads = int64_t(grid) * kThreads;
  return {rows, vcols, threads / vcols, threads % vcols};
}

// body(flat, row, col) for this thread's vectors.
template <int V, typename Body>
__device__ __forceinline__ void for_each_vector(const RowWalk& w, Body body) {
  const int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int64_t row = t / w.vcols, vcol = t - row * w.vcols;
  while (row < w.rows) {
    body((row * w.vcols + vcol) * V, row, vcol * V);
    vcol += w.step_cols;
    row += w.step_rows;
    if (vcol >= w.vcols) {
      vcol -= w.vcols;
      ++row;
    }
  }
}

// ---- unary ----

template <typename S, typename C, int V, typename Fn>
__global__ void unary_flat(const S* x, S* out, C p, int64_t n, Fn fn) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t i = t; i < n / V; i += stride) {
    C v[V];
    load_vec<S, C, V>(x + i * V, v);
#pragma unroll
    for (int j = 0; j < V; ++j) v[j] = fn(v[j], p);
    store_vec<S, C, V>(out + i * V, v);
  }
  if (int64_t i = n / V * V + t; i < n) out[i] = from_compute<S>(fn(static_cast<C>(x[i]), p));
}

template <typename S, typename C, typename Fn>
__global__ void unary_strided(const S* x, S* out, C p, int64_t n, StridedIndex xi, StridedIndex oi,
                              Fn fn) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[oi(i)] = from_compute<S>(fn(static_cast<C>(x[xi(i)]), p));
}

// ---- binary ----

template <typename S, typename C, int V, typename Fn>
__global__ void binary_flat(const S* a, const S* b, S* out, int64_t n, Fn fn) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t i = t; i < n / V; i += stride) {
    C av[V], bv[V];
    load_vec<S, C, V>(a + i * V, av);
    load_vec<S, C, V>(b + i * V, bv);
#pragma unroll
    for (int j = 0; j < V; ++j) av[j] = fn(av[j], bv[j]);
    store_vec<S, C, V>(out + i * V, av);
  }
  if (int64_t i = n / V * V + t; i < n)
    out[i] = from_compute<S>(fn(static_cast<C>(a[i]), static_cast<C>(b[i])));
}

template <typename S, typename C, int V, typename Fn>
__global__ void binary_rows(const S* a, int a_access, const S* b, int b_access, S* out, RowWalk w,
                            Fn fn) {
  for_each_vector<V>(w, [&](int64_t flat, int64_t row, int64_t col) {
    C av[V], bv[V];
    load_operand<S, C, V>(a, a_access, flat, row, col, av);
    load_operand<S, C, V>(b, b_access, flat, row, col, bv);
#pragma unroll
    for (int j = 0; j < V; ++j) av[j] = fn(av[j], bv[j]);
    store_vec<S, C, V>(out + flat, av);
  });
}

template <typename S, typename C, typename Fn>
__global__ void binary_strided(const S* a, const S* b, S* out, int64_t n, StridedIndex ai,
                               StridedIndex bi, StridedIndex oi, Fn fn) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[oi(i)] = from_compute<S>(fn(static_cast<C>(a[ai(i)]), static_cast<C>(b[bi(i)])));
}

// ---- where ----

template <typename CS, typename S>
__global__ void where_kernel(const CS* c, const S* a, const S* b, S* out, int64_t n,
                             StridedIndex ci, StridedIndex ai, StridedIndex bi, StridedIndex oi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[oi(i)] = static_cast<float>(c[ci(i)]) != 0.0f ? a[ai(i)] : b[bi(i)];
}

// ---- copy (with dtype conversion through C) ----

template <typename SS, typename DS, typename C, int V>
__global__ void copy_flat(const SS* src, DS* out, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t i = t; i < n / V; i += stride) {
    C v[V];
    load_vec<SS, C, V>(src + i * V, v);
    store_vec<DS, C, V>(out + i * V, v);
  }
  if (int64_t i = n / V * V + t; i < n) out[i] = static_cast<DS>(static_cast<C>(src[i]));
}

template <typename SS, typename DS, typename C, int V>
__global__ void copy_rows(const SS* src, int access, DS* out, RowWalk w) {
  for_each_vector<V>(w, [&](int64_t flat, int64_t row, int64_t col) {
    C v[V];
    load_operand<SS, C, V>(src, access, flat, row, col, v);
    store_vec<DS, C, V>(out + flat, v);
  });
}

template <typename SS, typename DS, typename C>
__global__ void copy_strided(const SS* src, DS* out, int64_t n, StridedIndex si, StridedIndex oi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[oi(i)] = static_cast<DS>(static_cast<C>(src[si(i)]));
}

// The row-walk launch for `out` (contiguous) and inputs `ins` with the given
// accesses: calls launch(Int<V>, grid, walk) with 16-byte vectors when the
// last dim is a multiple of V and the vector-read operands are aligned,
// else V = 1.
template <int V, typename Launch>
void launch_rows(const Tensor& out, std::initializer_list<std::pair<const Tensor*, Access>> ins,
                 size_t in_vec_bytes, size_t out_vec_bytes, Launch launch) {
  const int64_t n = out.numel(), cols = out.dim() == 0 ? 1 : out.size(-1), rows = n / cols;
  bool vec = V > 1 && cols % V == 0 && aligned_to(out.raw_data(), out_vec_bytes);
  for (const auto& [t, access] : ins)
    vec = vec && (access == kCol || access == kScalar || aligned_to(t->raw_data(), in_vec_bytes));
  if (vec) {
    unsigned grid = grid_for(n / V, kThreads);
    launch(Int<V>{}, grid, row_walk<V>(rows, cols, grid));
  } else {
    unsigned grid = grid_for(n, kThreads);
    launch(Int<1>{}, grid, row_walk<1>(rows, cols, grid));
  }
}

}  // namespace

void unary(UnaryOp op, const Tensor& x, double p, const Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    constexpr int V = kVec<S>;
    visit_unary(op, [&](auto fn) {
      const S* xp = static_cast<const S*>(x.raw_data());
      S* op_ = static_cast<S*>(out.raw_data());
      if (x.is_contiguous() && out.is_contiguous()) {
        if (aligned_to(xp, 16) && aligned_to(op_, 16))
          unary_flat<S, C, V><<<grid_for(n / V + 1, kThreads), kThreads, 0, stream()>>>(xp, op_, C(p), n, fn);
        else
          unary_flat<S, C, 1><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(xp, op_, C(p), n, fn);
      } else {
        unary_strided<S, C><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
            xp, op_, C(p), n, index_of(x), index_of(out), fn);
      }
      MINIDL_CUDA_LAUNCH_CHECK();
    });
  });
}

void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  std::optional<Access> aa, ba;
  if (out.is_contiguous()) {
    aa = access_of(a);
    ba = access_of(b);
  }
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    constexpr int V = kVec<S>;
    visit_binary(op, [&](auto fn) {
      const S* ap = static_cast<const S*>(a.raw_data());
      const S* bp = static_cast<const S*>(b.raw_data());
      S* op_ = static_cast<S*>(out.raw_data());
      if (aa && ba && *aa == kFull && *ba == kFull && aligned_to(ap, 16) && aligned_to(bp, 16) &&
          aligned_to(op_, 16)) {
        binary_flat<S, C, V><<<grid_for(n / V + 1, kThreads), kThreads, 0, stream()>>>(ap, bp, op_, n, fn);
      } else if (aa && ba) {
        launch_rows<V>(out, {{&a, *aa}, {&b, *ba}}, 16, 16, [&](auto vec, unsigned grid, RowWalk w) {
          binary_rows<S, C, decltype(vec)::value><<<grid, kThreads, 0, stream()>>>(ap, *aa, bp, *ba, op_, w, fn);
        });
      } else {
        binary_strided<S, C><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
            ap, bp, op_, n, index_of(a), index_of(b), index_of(out), fn);
      }
      MINIDL_CUDA_LAUNCH_CHECK();
    });
  });
}

void where(const Tensor& cond, const Tensor& a, const Tensor& b, const Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  visit_dtype(cond.dtype(), [&](auto ctag) {
    using CS = decltype(ctag);
    visit_dtype(out.dtype(), [&](auto tag) {
      using S = decltype(tag);
      where_kernel<CS, S><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
          static_cast<const CS*>(cond.raw_data()), static_cast<const S*>(a.raw_data()),
          static_cast<const S*>(b.raw_data()), static_cast<S*>(out.raw_data()), n,
          index_of(cond), index_of(a), index_of(b), index_of(out));
      MINIDL_CUDA_LAUNCH_CHECK();
    });
  });
}

void copy(const Tensor& src, const Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  std::optional<Access> sa;
  if (out.is_contiguous()) sa = access_of(src);
  visit_dtype(src.dtype(), [&](auto stag) {
    using SS = decltype(stag);
    visit_dtype(out.dtype(), [&](auto dtag) {
      using DS = decltype(dtag);
      using C = std::conditional_t<std::is_same_v<SS, double> || std::is_same_v<DS, double> ||
                                       std::is_same_v<SS, int32_t> || std::is_same_v<DS, int32_t>,
                                   double, float>;
      // 16 bytes of the wider type per vector.
      constexpr int V = std::min(kVec<SS>, kVec<DS>);
      constexpr size_t in_bytes = sizeof(SS) * V, out_bytes = sizeof(DS) * V;
      const SS* sp = static_cast<const SS*>(src.raw_data());
      DS* dp = static_cast<DS*>(out.raw_data());
      if (sa && *sa == kFull && aligned_to(sp, in_bytes) && aligned_to(dp, out_bytes)) {
        copy_flat<SS, DS, C, V><<<grid_for(n / V + 1, kThreads), kThreads, 0, stream()>>>(sp, dp, n);
      } else if (sa) {
        launch_rows<V>(out, {{&src, *sa}}, in_bytes, out_bytes, [&](auto vec, unsigned grid, RowWalk w) {
          copy_rows<SS, DS, C, decltype(vec)::value><<<grid, kThreads, 0, stream()>>>(sp, *sa, dp, w);
        });
      } else {
        copy_strided<SS, DS, C><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
            sp, dp, n, index_of(src), index_of(out));
      }
      MINIDL_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace minidl::cuda
