#include "core/scalar_math.h"
#include "cuda/reduce.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

// One block per row; fp32 (fp64 for double) accumulation with a warp-shuffle tree.
template <typename S, typename A>
__global__ void sum_last_kernel(const S* x, S* y, int64_t cols, A scale) {
  const S* row = x + blockIdx.x * cols;
  A acc = 0;
  for (int64_t r = threadIdx.x; r < cols; r += blockDim.x) acc += static_cast<A>(row[r]);
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  __shared__ A warp_sums[32];
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_sums[warp] = acc;
  __syncthreads();
  if (warp == 0) {
    acc = lane < (blockDim.x + 31) / 32 ? warp_sums[lane] : A(0);
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) y[blockIdx.x] = static_cast<S>(acc * scale);
  }
}

}  // namespace

void sum_last(const Tensor& in, int64_t rows, int64_t cols, double scale, const Tensor& out) {
  if (rows == 0) return;
  visit_dtype(in.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using A = compute_t<S>;
    int threads = cols >= 1024 ? 1024 : cols >= 256 ? 256 : 64;
    sum_last_kernel<S, A><<<static_cast<unsigned>(rows), threads, 0, stream()>>>(
        static_cast<const S*>(in.raw_data()), static_cast<S*>(out.raw_data()), cols, A(scale));
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace minidl::cuda
