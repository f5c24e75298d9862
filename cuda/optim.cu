#include "core/scalar_math.h"
#include "cuda/optim.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

template <typename S, typename C>
__global__ void adamw_kernel(S* __restrict__ p, const S* __restrict__ g, S* __restrict__ m,
                             S* __restrict__ v, int64_t n, C decay, C b1, C b2, C step,
                             C inv_sqrt_bc2, C eps) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    C gi = C(g[i]);
    C mi = b1 * C(m[i]) + (C(1) - b1) * gi;
    C vi = b2 * C(v[i]) + (C(1) - b2) * gi * gi;
    m[i] = S(mi);
    v[i] = S(vi);
    p[i] = S(C(p[i]) * decay - step * mi / (sqrt(vi) * inv_sqrt_bc2 + eps));
  }
}

}  // namespace

void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg,
                const Tensor& exp_avg_sq, const AdamWHyper& h) {
  int64_t n = param.numel();
  if (n == 0) return;
  visit_dtype(param.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    adamw_kernel<S, C><<<grid_for(n, 256), 256, 0, stream()>>>(
        static_cast<S*>(param.raw_data()), static_cast<const S*>(grad.raw_data()),
        static_cast<S*>(exp_avg.raw_data()), static_cast<S*>(exp_avg_sq.raw_data()), n,
        C(1 - h.lr * h.weight_decay), C(h.beta1), C(h.beta2), C(h.lr / h.bias_correction1),
        C(1 / std::sqrt(h.bias_correction2)), C(h.eps));
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace minidl::cuda
