// Row kernels of sequence-parallel dilated attention (cuda/seq_parallel.h).
// One warp per row pair (threadIdx.y picks it, the lanes stride along the
// row), so the pair's indices are read once and the row accesses coalesce.
#include <cmath>
#include <type_traits>

#include "cuda/runtime.h"
#include "cuda/seq_parallel.h"

namespace minidl::cuda {
namespace {

constexpr int kRowsPerBlock = 8;

__device__ __forceinline__ void pair_rows(const RowPairs& p, int64_t i, int64_t& dst, int64_t& src) {
  if (p.dst) {
    dst = p.dst[i];
    src = p.src[i];
  } else {
    dst = i / p.per * p.dst_stride + p.dst_offset + i % p.per;
    src = i;
  }
}

#define MINIDL_FOR_EACH_PAIR(p)                                                                    \
  for (int64_t i = blockIdx.x * int64_t(kRowsPerBlock) + threadIdx.y; i < (p).count;              \
       i += int64_t(gridDim.x) * kRowsPerBlock)

template <typename T>
__global__ void copy_rows_kernel(T* dst, const T* src, int64_t width, RowPairs p) {
  MINIDL_FOR_EACH_PAIR(p) {
    int64_t d, s;
    pair_rows(p, i, d, s);
    for (int64_t e = threadIdx.x; e < width; e += 32) dst[d * width + e] = src[s * width + e];
  }
}

// Sums in float32, stored in D (a bf16 dst rounds once per call).
template <typename D, typename S>
__global__ void add_rows_kernel(D* dst, const S* src, int64_t width, RowPairs p) {
  MINIDL_FOR_EACH_PAIR(p) {
    int64_t d, s;
    pair_rows(p, i, d, s);
    for (int64_t e = threadIdx.x; e < width; e += 32) {
      D& x = dst[d * width + e];
      x = static_cast<D>(static_cast<float>(x) + static_cast<float>(src[s * width + e]));
    }
  }
}

template <typename T, typename S>
__global__ void merge_rows_kernel(T* O, float* L, const S* o, const float* l, int64_t width, RowPairs p) {
  MINIDL_FOR_EACH_PAIR(p) {
    int64_t d, s;
    pair_rows(p, i, d, s);
    const float lo = l[s], Lo = L[d];
    if (lo == -INFINITY) continue;  // the whole warp skips together
    float a = 0.f, c = 1.f, merged = lo;  // the first partial is copied exactly
    if (Lo != -INFINITY) {
      const float m = fmaxf(Lo, lo);
      merged = m + logf(expf(Lo - m) + expf(lo - m));
      a = expf(Lo - merged);
      c = expf(lo - merged);
    }
    for (int64_t e = threadIdx.x; e < width; e += 32) {
      T& acc = O[d * width + e];
      const float x = static_cast<float>(o[s * width + e]);
      acc = static_cast<T>(Lo == -INFINITY ? x : a * static_cast<float>(acc) + c * x);
    }
    __syncwarp();  // every lane has read L[d]
    if (threadIdx.x == 0) L[d] = merged;
  }
}

dim3 grid_of(int64_t count) {
  const int64_t blocks = (count + kRowsPerBlock - 1) / kRowsPerBlock;
  return dim3(static_cast<unsigned>(blocks < 65535LL * 32 ? blocks : 65535LL * 32));
}
const dim3 kBlock(32, kRowsPerBlock);

bool float_or_bf16(DType t) { return t == DType::Float32 || t == DType::BFloat16; }

// Calls f with (T*, S*) for the float32 / bfloat16 tensors a and b.
template <typename F> void visit_two(const Tensor& a, const Tensor& b, F&& f) {
  auto with_b = [&](auto* pa) {
    if (b.dtype() == DType::Float32) f(pa, static_cast<const float*>(b.raw_data()));
    else f(pa, static_cast<const BFloat16*>(b.raw_data()));
  };
  if (a.dtype() == DType::Float32) with_b(static_cast<float*>(a.raw_data()));
  else with_b(static_cast<BFloat16*>(a.raw_data()));
}

}  // namespace

void copy_rows(const Tensor& dst, const Tensor& src, int64_t width, const RowPairs& rows) {
  MINIDL_CHECK(dst.dtype() == src.dtype() && dst.is_cuda() && src.is_cuda(), "cuda::copy_rows: dst ", dst.dtype(),
               " on ", dst.device(), ", src ", src.dtype(), " on ", src.device(), "; expected one dtype on CUDA");
  if (rows.count == 0) return;
  visit_dtype(dst.dtype(), [&](auto tag) {
    using T = decltype(tag);
    copy_rows_kernel<T><<<grid_of(rows.count), kBlock, 0, stream()>>>(static_cast<T*>(dst.raw_data()),
                                                                       static_cast<const T*>(src.raw_data()), width, rows);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void add_rows(const Tensor& dst, const Tensor& src, int64_t width, const RowPairs& rows) {
  MINIDL_CHECK(float_or_bf16(dst.dtype()) && float_or_bf16(src.dtype()), "cuda::add_rows: dst ", dst.dtype(),
               ", src ", src.dtype(), "; expected float32 or bfloat16 for both");
  if (rows.count == 0) return;
  visit_two(dst, src, [&](auto* d, auto* s) {
    add_rows_kernel<<<grid_of(rows.count), kBlock, 0, stream()>>>(d, s, width, rows);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

void merge_rows(const Tensor& O, const Tensor& L, const Tensor& o, const Tensor& l, int64_t width,
                const RowPairs& rows) {
  MINIDL_CHECK(float_or_bf16(O.dtype()) && L.dtype() == DType::Float32 && l.dtype() == DType::Float32 &&
                   float_or_bf16(o.dtype()),
               "cuda::merge_rows: O ", O.dtype(), ", L ", L.dtype(), ", o ", o.dtype(), ", l ", l.dtype(),
               "; expected float32 L and l, float32 or bfloat16 O and o");
  if (rows.count == 0) return;
  visit_two(O, o, [&](auto* pO, auto* po) {
    merge_rows_kernel<<<grid_of(rows.count), kBlock, 0, stream()>>>(pO, L.data_ptr<float>(), po,
                                                                     l.data_ptr<float>(), width, rows);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace minidl::cuda
