// RoPE on the GPU: one thread per (batch row b, sequence index n, pair i).
// The thread computes its angle once and applies it to that pair in every
// head, so the double-precision angle and the sincosf are paid once per H
// pairs; with B in the grid, short training sequences (B = 64, T = 256) still
// fill the GPU. The kernel is bound by memory traffic (one read, one write).
// Adjacent threads take adjacent pairs of a row, so loads and stores coalesce.
#include "cuda/rope.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

constexpr int kThreads = 256;
constexpr double kTwoPi = 6.283185307179586;

template <typename S>
__global__ void rope_kernel(const S* __restrict__ x, S* __restrict__ out, int64_t B, int64_t N,
                            int64_t H, int64_t half, int64_t xsb, int64_t xsn, int64_t xsh,
                            int64_t position_offset, double log2_base, float sign) {
  const int64_t D = 2 * half, pairs = B * N * half;
  for (int64_t j = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; j < pairs;
       j += int64_t(gridDim.x) * blockDim.x) {
    const int64_t bn = j / half, i = j - bn * half;
    const int64_t b = bn / N, n = bn - b * N;
    // As cpu/rope.cpp: inv_freq and theta in double, reduced mod 2 pi in
    // double (fma: k * 2 pi is exact before the subtraction), then sincosf on
    // the small angle, so float32 stays accurate at positions near 2^20.
    const double inv_freq = exp2(-(static_cast<double>(2 * i) / static_cast<double>(D)) * log2_base);
    const double theta = static_cast<double>(position_offset + n) * inv_freq;
    const double k = rint(theta * (1.0 / kTwoPi));
    float s, c;
    sincosf(static_cast<float>(fma(-k, kTwoPi, theta)), &s, &c);
    s *= sign;
    const S* src = x + b * xsb + n * xsn + 2 * i;
    S* dst = out + bn * H * D + 2 * i;
    for (int64_t h = 0; h < H; ++h) {
      const float x0 = static_cast<float>(src[h * xsh]), x1 = static_cast<float>(src[h * xsh + 1]);
      dst[h * D] = static_cast<S>(x0 * c - x1 * s);
      dst[h * D + 1] = static_cast<S>(x0 * s + x1 * c);
    }
  }
}

template <typename S>
void launch(const Tensor& x, int64_t position_offset, double base, bool inverse, const Tensor& out) {
  const int64_t B = x.size(0), N = x.size(1), H = x.size(2), half = x.size(3) / 2;
  const int64_t pairs = B * N * half;
  rope_kernel<S><<<grid_for(pairs, kThreads), kThreads, 0, stream()>>>(
      static_cast<const S*>(x.raw_data()), static_cast<S*>(out.raw_data()), B, N, H, half,
      x.stride(0), x.stride(1), x.stride(2), position_offset, std::log2(base),
      inverse ? -1.0f : 1.0f);
  MINIDL_CUDA_LAUNCH_CHECK();
}

}  // namespace

void rope(const Tensor& x, int64_t position_offset, double base, bool inverse, const Tensor& out) {
  MINIDL_CHECK(x.is_cuda() && out.is_cuda() && x.dim() == 4 && x.size(3) % 2 == 0 &&
                   (x.size(3) <= 1 || x.stride(3) == 1) && out.is_contiguous() &&
                   out.shape() == x.shape() && out.dtype() == x.dtype(),
               "cuda::rope: expects CUDA x (B, N, H, D) with even, contiguous D and a contiguous "
               "out of its shape and dtype; got x ",
               x.dtype(), " ", shape_str(x.shape()), " strides ", shape_str(x.strides()), ", out ",
               out.dtype(), " ", shape_str(out.shape()));
  if (out.numel() == 0) return;
  switch (x.dtype()) {
    case DType::Float32: return launch<float>(x, position_offset, base, inverse, out);
    case DType::BFloat16: return launch<BFloat16>(x, position_offset, base, inverse, out);
    default:
      MINIDL_FAIL("cuda::rope: unsupported dtype ", x.dtype(), " (float32 or bfloat16 on CUDA)");
  }
}

}  // namespace minidl::cuda
