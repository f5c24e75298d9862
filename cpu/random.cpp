#include "cpu/random.h"

#include "core/philox.h"
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

}  // namespace minidl::cpu
