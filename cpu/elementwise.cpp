#include "cpu/elementwise.h"

#include <algorithm>

#include "core/strided.h"
#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {

bool all_contiguous(std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (!t->is_contiguous()) return false;
  return true;
}

StridedIndex index_of(const Tensor& t) { return make_strided_index(t.shape(), t.strides()); }

// Runs body(ox, ...) over every element with the operands' element offsets
// (operands have the output's shape, broadcast dims with stride 0). All
// contiguous: one flat loop. Otherwise row by row over the last dim: one index
// computation per row, then constant strides, which the compiler vectorises
// when they are 1 (or 0, for a broadcast operand).
template <typename Body>
void for_each2(const Tensor& x, const Tensor& out, Body body) {
  const int64_t n = out.numel();
  if (all_contiguous({&x, &out})) {
    parallel_for(n, kParallelGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) body(i, i);
    });
    return;
  }
  if (n == 0) return;
  const int64_t inner = out.shape().back(), xs = x.strides().back(), os = out.strides().back();
  StridedIndex xi = index_of(x), oi = index_of(out);
  parallel_for(n / inner, std::max<int64_t>(1, kParallelGrain / inner), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t x0 = xi(r * inner), o0 = oi(r * inner);
      if (xs == 1 && os == 1) {
        for (int64_t j = 0; j < inner; ++j) body(x0 + j, o0 + j);
      } else {
        for (int64_t j = 0; j < inner; ++j) body(x0 + j * xs, o0 + j * os);
      }
    }
  });
}

template <typename Body>
void for_each3(const Tensor& a, const Tensor& b, const Tensor& out, Body body) {
  const int64_t n = out.numel();
  if (all_contiguous({&a, &b, &out})) {
    parallel_for(n, kParallelGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) body(i, i, i);
    });
    return;
  }
  if (n == 0) return;
  const int64_t inner = out.shape().back();
  const int64_t as = a.strides().back(), bs = b.strides().back(), os = out.strides().back();
  StridedIndex ai = index_of(a), bi = index_of(b), oi = index_of(out);
  parallel_for(n / inner, std::max<int64_t>(1, kParallelGrain / inner), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t a0 = ai(r * inner), b0 = bi(r * inner), o0 = oi(r * inner);
      if (os == 1 && as == 1 && bs == 1) {
        for (int64_t j = 0; j < inner; ++j) body(a0 + j, b0 + j, o0 + j);
      } else if (os == 1 && as == 1 && bs == 0) {  // b broadcast along the row (a bias)
        for (int64_t j = 0; j < inner; ++j) body(a0 + j, b0, o0 + j);
      } else if (os == 1 && as == 0 && bs == 1) {
        for (int64_t j = 0; j < inner; ++j) body(a0, b0 + j, o0 + j);
      } else {
        for (int64_t j = 0; j < inner; ++j) body(a0 + j * as, b0 + j * bs, o0 + j * os);
      }
    }
  });
}

}  // namespace

void unary(UnaryOp op, const Tensor& x, double p, const Tensor& out) {
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    visit_unary(op, [&](auto fn) {
      const S* xp = static_cast<const S*>(x.raw_data());
      S* op_ = static_cast<S*>(out.raw_data());
      C pc = static_cast<C>(p);
      for_each2(x, out, [&](int64_t xo, int64_t oo) {
        op_[oo] = from_compute<S>(fn(static_cast<C>(xp[xo]), pc));
      });
    });
  });
}

void binary(BinaryOp op, const Tensor& a, const Tensor& b, const Tensor& out) {
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    visit_binary(op, [&](auto fn) {
      const S* ap = static_cast<const S*>(a.raw_data());
      const S* bp = static_cast<const S*>(b.raw_data());
      S* op_ = static_cast<S*>(out.raw_data());
      for_each3(a, b, out, [&](int64_t ao, int64_t bo, int64_t oo) {
        op_[oo] = from_compute<S>(fn(static_cast<C>(ap[ao]), static_cast<C>(bp[bo])));
      });
    });
  });
}

void where(const Tensor& cond, const Tensor& a, const Tensor& b, const Tensor& out) {
  visit_dtype(cond.dtype(), [&](auto ctag) {
    using CS = decltype(ctag);
    visit_dtype(out.dtype(), [&](auto tag) {
      using S = decltype(tag);
      const CS* cp = static_cast<const CS*>(cond.raw_data());
      const S* ap = static_cast<const S*>(a.raw_data());
      const S* bp = static_cast<const S*>(b.raw_data());
      S* op_ = static_cast<S*>(out.raw_data());
      StridedIndex ci = index_of(cond), ai = index_of(a), bi = index_of(b), oi = index_of(out);
      parallel_for(out.numel(), kParallelGrain, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i)
          op_[oi(i)] = static_cast<float>(cp[ci(i)]) != 0.0f ? ap[ai(i)] : bp[bi(i)];
      });
    });
  });
}

void copy(const Tensor& src, const Tensor& out) {
  visit_dtype(src.dtype(), [&](auto stag) {
    using SS = decltype(stag);
    visit_dtype(out.dtype(), [&](auto dtag) {
      using DS = decltype(dtag);
      using C = std::conditional_t<std::is_same_v<SS, double> || std::is_same_v<DS, double> ||
                                       std::is_same_v<SS, int32_t> || std::is_same_v<DS, int32_t>,
                                   double, float>;
      const SS* sp = static_cast<const SS*>(src.raw_data());
      DS* dp = static_cast<DS*>(out.raw_data());
      for_each2(src, out, [&](int64_t so, int64_t oo) {
        dp[oo] = static_cast<DS>(static_cast<C>(sp[so]));
      });
    });
  });
}

}  // namespace minidl::cpu
