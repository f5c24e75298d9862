#include "cpu/optim.h"

#include <algorithm>
#include <cmath>

#include "core/scalar_math.h"
#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {

// One parameter: a single pass over p, g, m, v (and the copy).
template <typename P, typename G>
void adamw_one(const AdamWTensors& t, const AdamWScalars& s, const AdamWHyper& h) {
  using C = compute_t<P>;
  P* p = static_cast<P*>(t.param.raw_data());
  const G* g = static_cast<const G*>(t.grad.raw_data());
  P* m = static_cast<P*>(t.exp_avg.raw_data());
  P* v = static_cast<P*>(t.exp_avg_sq.raw_data());
  BFloat16* copy = t.copy.defined() ? static_cast<BFloat16*>(t.copy.raw_data()) : nullptr;
  const C decay = C(s.decay), b1 = C(h.beta1), b2 = C(h.beta2), step = C(s.step_size);
  const C inv_sqrt_bc2 = C(s.inv_sqrt_bc2), eps = C(h.eps);
  parallel_for(t.param.numel(), kParallelGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      C gi = C(g[i]);
      C mi = b1 * C(m[i]) + (C(1) - b1) * gi;
      C vi = b2 * C(v[i]) + (C(1) - b2) * gi * gi;
      m[i] = P(mi);
      v[i] = P(vi);
      C pi = C(p[i]) * decay - step * mi / (std::sqrt(vi) * inv_sqrt_bc2 + eps);
      p[i] = P(pi);
      if (copy) copy[i] = BFloat16(float(pi));
    }
  });
}

// Calls f with a tag of the C++ type of a floating dtype (ops/ rejects int32).
template <typename F> void visit_floating(DType dtype, F&& f) {
  visit_dtype(dtype, [&](auto tag) {
    if constexpr (!std::is_same_v<decltype(tag), int32_t>) f(tag);
  });
}

// Sum of squares of one tensor in float64, over fixed blocks added in order,
// so the result does not depend on the thread count.
template <typename S> double sum_squares(const Tensor& t) {
  const S* x = static_cast<const S*>(t.raw_data());
  const int64_t n = t.numel(), blocks = (n + kParallelGrain - 1) / kParallelGrain;
  std::vector<double> partial(static_cast<size_t>(blocks), 0.0);
  parallel_for(blocks, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      double acc = 0;
      for (int64_t i = b * kParallelGrain, e = std::min(n, i + kParallelGrain); i < e; ++i) {
        double xi = double(x[i]);
        acc += xi * xi;
      }
      partial[static_cast<size_t>(b)] = acc;
    }
  });
  double total = 0;
  for (double p : partial) total += p;
  return total;
}

}  // namespace

void adamw_step(const std::vector<AdamWTensors>& params, const Tensor& lr, const Tensor& step,
                const AdamWHyper& h) {
  double* t = static_cast<double*>(step.raw_data());
  *t += 1;
  const double rate = *static_cast<const double*>(lr.raw_data());
  for (const AdamWTensors& p : params) {
    const AdamWScalars s = adamw_scalars(rate, *t, h.beta1, h.beta2, p.weight_decay);
    visit_floating(p.param.dtype(), [&](auto ptag) {
      visit_floating(p.grad.dtype(), [&](auto gtag) {
        adamw_one<decltype(ptag), decltype(gtag)>(p, s, h);
      });
    });
  }
}

void clip_by_global_norm(const std::vector<Tensor>& grads, double max_norm, const Tensor& norm) {
  double total = 0;
  for (const Tensor& g : grads)
    visit_floating(g.dtype(), [&](auto tag) { total += sum_squares<decltype(tag)>(g); });
  const auto clip = [&](auto atag) {
    using A = decltype(atag);  // the accumulation type, as on the GPU
    const A n = A(std::sqrt(total));
    const A coef = clip_coefficient(n, A(max_norm));
    *static_cast<A*>(norm.raw_data()) = n;
    if (coef == A(1)) return;  // under the limit: untouched
    for (const Tensor& g : grads)
      visit_floating(g.dtype(), [&](auto tag) {
        using S = decltype(tag);
        using C = compute_t<S>;
        S* x = static_cast<S*>(g.raw_data());
        parallel_for(g.numel(), kParallelGrain, [&](int64_t lo, int64_t hi) {
          for (int64_t i = lo; i < hi; ++i) x[i] = S(C(x[i]) * C(coef));
        });
      });
  };
  if (norm.dtype() == DType::Float64) clip(double{});
  else clip(float{});
}

}  // namespace minidl::cpu
