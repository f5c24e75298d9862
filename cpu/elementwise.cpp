#include "cpu/elementwise.h"

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

// Runs body(i, ox, ...) over every element with the operands' element
// offsets, taking a flat loop when everything is contiguous.
template <typename Body>
void for_each2(const Tensor& x, const Tensor& out, Body body) {
  int64_t n = out.numel();
  if (all_contiguous({&x, &out})) {
    parallel_for(n, kParallelGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) body(i, i);
    });
    return;
  }
  StridedIndex xi = index_of(x), oi = index_of(out);
  parallel_for(n, kParallelGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) body(xi(i), oi(i));
  });
}

template <typename Body>
void for_each3(const Tensor& a, const Tensor& b, const Tensor& out, Body body) {
  int64_t n = out.numel();
  if (all_contiguous({&a, &b, &out})) {
    parallel_for(n, kParallelGrain, [&](int64_t lo, int64_t hi) {
      for (int64_t i = lo; i < hi; ++i) body(i, i, i);
    });
    return;
  }
  StridedIndex ai = index_of(a), bi = index_of(b), oi = index_of(out);
  parallel_for(n, kParallelGrain, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) body(ai(i), bi(i), oi(i));
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
        op_[oo] = static_cast<S>(fn(static_cast<C>(xp[xo]), pc));
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
        op_[oo] = static_cast<S>(fn(static_cast<C>(ap[ao]), static_cast<C>(bp[bo])));
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
