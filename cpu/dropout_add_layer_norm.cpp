// CPU dropout + residual add + layer norm: the sum in one pass (the mask
// drawn as in cpu::dropout, one Philox block per 4 elements), then the layer
// norm kernels of cpu/nn_functional; backward the layer-norm backward, then
// one pass that adds the sum's other gradient and masks it for h.
#include "cpu/dropout_add_layer_norm.h"

#include "core/philox.h"
#include "core/scalar_math.h"
#include "cpu/nn_functional.h"
#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {

template <typename F> void visit_floating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    case DType::BFloat16: f(BFloat16{}); return;
    default: MINIDL_FAIL("dropout_add_layer_norm (cpu): expected a floating dtype, got ", dtype);
  }
}

// The value a tensor of type S would hold (the unfused ops store there).
template <typename S, typename C> C round_to(C v) { return static_cast<C>(static_cast<S>(v)); }

// Calls f(i, keep) for every element i < n, in blocks of 4 elements (one
// Philox block each; keep_threshold <= 0 keeps all and draws nothing).
template <typename F>
void for_each_kept(int64_t n, uint64_t seed, PhiloxOffset offset, float keep_threshold, F&& f) {
  int64_t blocks = (n + 3) / 4;
  parallel_for(blocks, kParallelGrain / 4, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      philox::U32x4 r{};
      if (keep_threshold > 0) r = philox::block(seed, offset.delta, static_cast<uint64_t>(b));  // host offset
      for (int lane = 0; lane < 4; ++lane) {
        int64_t i = 4 * b + lane;
        if (i >= n) break;
        f(i, keep_threshold <= 0 || philox::to_unit_float(philox::lane(r, lane)) >= keep_threshold);
      }
    }
  });
}

}  // namespace

void dropout_add_layer_norm_forward(const Tensor& h, const Tensor& residual, uint64_t seed,
                                    PhiloxOffset offset, float keep_threshold, double scale,
                                    const Tensor& weight, const Tensor& bias, int64_t rows,
                                    int64_t cols, double eps, const Tensor& sum, const Tensor& z,
                                    const Tensor& mean, const Tensor& rstd) {
  visit_floating(sum.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* hp = static_cast<const S*>(h.raw_data());
    const S* rp = static_cast<const S*>(residual.raw_data());
    S* sp = static_cast<S*>(sum.raw_data());
    C s = static_cast<C>(scale);
    for_each_kept(rows * cols, seed, offset, keep_threshold, [&](int64_t i, bool keep) {
      C d = keep ? round_to<S>(static_cast<C>(hp[i]) * s) : C(0);
      sp[i] = static_cast<S>(static_cast<C>(rp[i]) + d);
    });
  });
  layer_norm_forward(sum, weight, bias, rows, cols, eps, z, mean, rstd);
}

void dropout_add_layer_norm_backward(const Tensor& dz, const Tensor& dsum, const Tensor& sum,
                                     const Tensor& weight, const Tensor& mean, const Tensor& rstd,
                                     uint64_t seed, PhiloxOffset offset, float keep_threshold,
                                     double scale, int64_t rows, int64_t cols,
                                     const Tensor& dresidual, const Tensor& dh,
                                     const Tensor& dweight, const Tensor& dbias) {
  layer_norm_backward(dz, sum, weight, mean, rstd, rows, cols, dresidual, dweight, dbias);
  if (!dresidual.defined() || (!dsum.defined() && !dh.defined())) return;
  visit_floating(sum.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* gp = dsum.defined() ? static_cast<const S*>(dsum.raw_data()) : nullptr;
    S* dp = static_cast<S*>(dresidual.raw_data());
    S* hp = dh.defined() ? static_cast<S*>(dh.raw_data()) : nullptr;
    C s = static_cast<C>(scale);
    for_each_kept(rows * cols, seed, offset, hp ? keep_threshold : 0.0f, [&](int64_t i, bool keep) {
      C g = static_cast<C>(dp[i]);
      if (gp) dp[i] = static_cast<S>(g = round_to<S>(g + static_cast<C>(gp[i])));
      if (hp) hp[i] = static_cast<S>(keep ? g * s : C(0));
    });
  });
}

}  // namespace minidl::cpu
