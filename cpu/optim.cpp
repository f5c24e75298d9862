#include "cpu/optim.h"

#include <cmath>

#include "core/scalar_math.h"
#include "cpu/parallel.h"

namespace minidl::cpu {

void adamw_step(const Tensor& param, const Tensor& grad, const Tensor& exp_avg,
                const Tensor& exp_avg_sq, const AdamWHyper& h) {
  visit_dtype(param.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    S* p = static_cast<S*>(param.raw_data());
    const S* g = static_cast<const S*>(grad.raw_data());
    S* m = static_cast<S*>(exp_avg.raw_data());
    S* v = static_cast<S*>(exp_avg_sq.raw_data());
    const C decay = C(1 - h.lr * h.weight_decay), b1 = C(h.beta1), b2 = C(h.beta2);
    const C step = C(h.lr / h.bias_correction1), inv_sqrt_bc2 = C(1 / std::sqrt(h.bias_correction2));
    const C eps = C(h.eps);
    parallel_for(param.numel(), kParallelGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) {
        C gi = C(g[i]);
        C mi = b1 * C(m[i]) + (1 - b1) * gi;
        C vi = b2 * C(v[i]) + (1 - b2) * gi * gi;
        m[i] = S(mi);
        v[i] = S(vi);
        p[i] = S(C(p[i]) * decay - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps));
      }
    });
  });
}

}  // namespace minidl::cpu
