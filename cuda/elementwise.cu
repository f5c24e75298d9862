#include "core/strided.h"
#include "cuda/elementwise.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

constexpr int kThreads = 256;

StridedIndex index_of(const Tensor& t) { return make_strided_index(t.shape(), t.strides()); }

// Contiguous operands take the flat path (no index arithmetic).
template <typename S, typename C, typename Fn>
__global__ void unary_flat(const S* x, S* out, C p, int64_t n, Fn fn) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<S>(fn(static_cast<C>(x[i]), p));
}

template <typename S, typename C, typename Fn>
__global__ void unary_strided(const S* x, S* out, C p, int64_t n, StridedIndex xi, StridedIndex oi,
                              Fn fn) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[oi(i)] = static_cast<S>(fn(static_cast<C>(x[xi(i)]), p));
}

template <typename S, typename C, typename Fn>
__global__ void binary_flat(const S* a, const S* b, S* out, int64_t n, Fn fn) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[i] = static_cast<S>(fn(static_cast<C>(a[i]), static_cast<C>(b[i])));
}

template <typename S, typename C, typename Fn>
__global__ void binary_strided(const S* a, const S* b, S* out, int64_t n, StridedIndex ai,
                               StridedIndex bi, StridedIndex oi, Fn fn) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[oi(i)] = static_cast<S>(fn(static_cast<C>(a[ai(i)]), static_cast<C>(b[bi(i)])));
}

template <typename CS, typename S>
__global__ void where_kernel(const CS* c, const S* a, const S* b, S* out, int64_t n,
                             StridedIndex ci, StridedIndex ai, StridedIndex bi, StridedIndex oi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[oi(i)] = static_cast<float>(c[ci(i)]) != 0.0f ? a[ai(i)] : b[bi(i)];
}

template <typename SS, typename DS, typename C>
__global__ void copy_kernel(const SS* src, DS* out, int64_t n, StridedIndex si, StridedIndex oi) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x)
    out[oi(i)] = static_cast<DS>(static_cast<C>(src[si(i)]));
}

}  // namespace

void unary(UnaryOp op, const Tensor& x, double p, const Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    visit_unary(op, [&](auto fn) {
      const S* xp = static_cast<const S*>(x.raw_data());
      S* op_ = static_cast<S*>(out.raw_data());
      if (x.is_contiguous() && out.is_contiguous())
        unary_flat<S, C><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(xp, op_, C(p), n, fn);
      else
        unary_strided<S, C><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
            xp, op_, C(p), n, index_of(x), index_of(out), fn);
      MINIDL_CUDA_LAUNCH_CHECK();
    });
  });
}

void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    visit_binary(op, [&](auto fn) {
      const S* ap = static_cast<const S*>(a.raw_data());
      const S* bp = static_cast<const S*>(b.raw_data());
      S* op_ = static_cast<S*>(out.raw_data());
      if (a.is_contiguous() && b.is_contiguous() && out.is_contiguous())
        binary_flat<S, C><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(ap, bp, op_, n, fn);
      else
        binary_strided<S, C><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
            ap, bp, op_, n, index_of(a), index_of(b), index_of(out), fn);
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
  visit_dtype(src.dtype(), [&](auto stag) {
    using SS = decltype(stag);
    visit_dtype(out.dtype(), [&](auto dtag) {
      using DS = decltype(dtag);
      using C = std::conditional_t<std::is_same_v<SS, double> || std::is_same_v<DS, double> ||
                                       std::is_same_v<SS, int32_t> || std::is_same_v<DS, int32_t>,
                                   double, float>;
      copy_kernel<SS, DS, C><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
          static_cast<const SS*>(src.raw_data()), static_cast<DS*>(out.raw_data()), n,
          index_of(src), index_of(out));
      MINIDL_CUDA_LAUNCH_CHECK();
    });
  });
}

}  // namespace minidl::cuda
