#include "cpu/rope.h"

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {

constexpr double kTwoPi = 6.283185307179586;

// cos and sin of theta = pos * inv_freq in the compute type C (see rope.h).
template <typename C>
void cos_sin(double pos, double inv_freq, C* c, C* s) {
  double theta = pos * inv_freq;
  if constexpr (std::is_same_v<C, double>) {
    *c = std::cos(theta);
    *s = std::sin(theta);
  } else {
    // Reduce in double first: sinf of a float theta near 1e6 would be wrong in
    // the second decimal. The fma keeps k * 2 pi exact before the subtraction.
    double k = std::nearbyint(theta * (1.0 / kTwoPi));
    float r = static_cast<float>(std::fma(-k, kTwoPi, theta));
    *c = std::cos(r);
    *s = std::sin(r);
  }
}

template <typename S>
void rope_typed(const Tensor& x, int64_t position_offset, double base, bool inverse,
                const Tensor& out) {
  using C = std::conditional_t<std::is_same_v<S, double>, double, float>;
  const int64_t B = x.size(0), N = x.size(1), H = x.size(2), D = x.size(3), half = D / 2;
  const int64_t xsb = x.stride(0), xsn = x.stride(1), xsh = x.stride(2);
  const S* xp = static_cast<const S*>(x.raw_data());
  S* op = static_cast<S*>(out.raw_data());

  std::vector<double> inv_freq(half);
  const double log2_base = std::log2(base);
  for (int64_t i = 0; i < half; ++i)
    inv_freq[i] = std::exp2(-(static_cast<double>(2 * i) / static_cast<double>(D)) * log2_base);

  // One sequence index per step: its D/2 angles serve every batch row and head.
  const int64_t grain = std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(1, B * H * D));
  parallel_for(N, grain, [&](int64_t lo, int64_t hi) {
    std::vector<C> cs(half), sn(half);
    for (int64_t n = lo; n < hi; ++n) {
      const double pos = static_cast<double>(position_offset + n);
      for (int64_t i = 0; i < half; ++i) {
        cos_sin<C>(pos, inv_freq[i], &cs[i], &sn[i]);
        if (inverse) sn[i] = -sn[i];
      }
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const S* src = xp + b * xsb + n * xsn + h * xsh;
          S* dst = op + ((b * N + n) * H + h) * D;
          for (int64_t i = 0; i < half; ++i) {
            C x0 = static_cast<C>(src[2 * i]), x1 = static_cast<C>(src[2 * i + 1]);
            dst[2 * i] = static_cast<S>(x0 * cs[i] - x1 * sn[i]);
            dst[2 * i + 1] = static_cast<S>(x0 * sn[i] + x1 * cs[i]);
          }
        }
    }
  });
}

}  // namespace

void rope(const Tensor& x, int64_t position_offset, double base, bool inverse, const Tensor& out) {
  MINIDL_CHECK(x.dim() == 4 && x.size(3) % 2 == 0 && (x.size(3) <= 1 || x.stride(3) == 1) &&
                   out.is_contiguous() && out.shape() == x.shape() && out.dtype() == x.dtype(),
               "cpu::rope: expects x (B, N, H, D) with even, contiguous D and a contiguous out "
               "of its shape and dtype; got x ",
               x.dtype(), " ", shape_str(x.shape()), " strides ", shape_str(x.strides()), ", out ",
               out.dtype(), " ", shape_str(out.shape()));
  if (out.numel() == 0) return;
  switch (x.dtype()) {
    case DType::Float32: return rope_typed<float>(x, position_offset, base, inverse, out);
    case DType::Float64: return rope_typed<double>(x, position_offset, base, inverse, out);
    case DType::BFloat16: return rope_typed<BFloat16>(x, position_offset, base, inverse, out);
    default: MINIDL_FAIL("cpu::rope: unsupported dtype ", x.dtype());
  }
}

}  // namespace minidl::cpu
