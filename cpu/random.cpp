#include "cpu/random.h"

#include "core/philox.h"
#include "core/scalar_math.h"
#include "core/strided.h"
#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {
template <typename Gen>
void fill(const Tensor& out, Gen gen) {
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    S* p = static_cast<S*>(out.raw_data());
    parallel_for(out.numel(), kParallelGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) p[i] = static_cast<S>(gen(static_cast<uint64_t>(i)));
    });
  });
}
}  // namespace

void fill_uniform(const Tensor& out, uint64_t seed, uint64_t offset) {
  fill(out, [=](uint64_t i) { return philox::uniform(seed, offset, i); });
}

void fill_normal(const Tensor& out, uint64_t seed, uint64_t offset) {
  fill(out, [=](uint64_t i) { return philox::normal(seed, offset, i); });
}

void dropout(const Tensor& x, uint64_t seed, uint64_t offset, float keep_threshold, double scale,
             const Tensor& out) {
  int64_t n = out.numel();
  bool flat = x.is_contiguous();
  StridedIndex xi = make_strided_index(x.shape(), x.strides());
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* xp = static_cast<const S*>(x.raw_data());
    S* op = static_cast<S*>(out.raw_data());
    C s = static_cast<C>(scale);
    // One Philox block gives the uniforms of 4 consecutive elements
    // (philox::uniform(seed, offset, i) is lane i % 4 of block i / 4).
    int64_t blocks = (n + 3) / 4;
    parallel_for(blocks, kParallelGrain / 4, [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        philox::U32x4 r = philox::block(seed, offset, static_cast<uint64_t>(b));
        for (int lane = 0; lane < 4; ++lane) {
          int64_t i = 4 * b + lane;
          if (i >= n) break;
          bool keep = philox::to_unit_float(philox::lane(r, lane)) >= keep_threshold;
          C v = static_cast<C>(xp[flat ? i : xi(i)]);
          op[i] = static_cast<S>(keep ? v * s : C(0));
        }
      }
    });
  });
}

}  // namespace minidl::cpu
