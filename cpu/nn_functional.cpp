#include "cpu/nn_functional.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "core/scalar_math.h"
#include "cpu/parallel.h"

namespace minidl::cpu {
namespace {

using math::exp_;
using math::log_;
using math::sqrt_;

// Calls f with a tag of the storage type; the ops have checked the dtype.
template <typename F> void visit_floating(DType dtype, F&& f) {
  switch (dtype) {
    case DType::Float32: f(float{}); return;
    case DType::Float64: f(double{}); return;
    case DType::BFloat16: f(BFloat16{}); return;
    default: MINIDL_FAIL("nn_functional (cpu): expected a floating dtype, got ", dtype);
  }
}

int64_t row_grain(int64_t cols) { return std::max<int64_t>(1, kParallelGrain / std::max<int64_t>(cols, 1)); }

template <typename S> const S* in(const Tensor& t) { return static_cast<const S*>(t.raw_data()); }
template <typename S> S* out(const Tensor& t) { return t.defined() ? static_cast<S*>(t.raw_data()) : nullptr; }

template <typename C, typename S> C row_max(const S* row, int64_t cols) {
  C m = -std::numeric_limits<C>::infinity();
  for (int64_t c = 0; c < cols; ++c) m = std::max(m, static_cast<C>(row[c]));
  return m;
}

}  // namespace

void softmax_forward(const Tensor& x, int64_t rows, int64_t cols, bool log, const Tensor& y) {
  visit_floating(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* xp = in<S>(x);
    S* yp = out<S>(y);
    parallel_for(rows, row_grain(cols), [&](int64_t lo, int64_t hi) {
      std::vector<C> e(static_cast<size_t>(cols));
      for (int64_t m = lo; m < hi; ++m) {
        const S* xr = xp + m * cols;
        S* yr = yp + m * cols;
        C mx = row_max<C>(xr, cols);
        C sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += e[c] = exp_(static_cast<C>(xr[c]) - mx);
        if (log) {
          C lse = mx + log_(sum);
          for (int64_t c = 0; c < cols; ++c) yr[c] = static_cast<S>(static_cast<C>(xr[c]) - lse);
        } else {
          C inv = C(1) / sum;
          for (int64_t c = 0; c < cols; ++c) yr[c] = static_cast<S>(e[c] * inv);
        }
      }
    });
  });
}

void softmax_backward(const Tensor& y, const Tensor& dy, int64_t rows, int64_t cols, bool log,
                      const Tensor& dx) {
  visit_floating(y.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* yp = in<S>(y);
    const S* gp = in<S>(dy);
    S* dp = out<S>(dx);
    parallel_for(rows, row_grain(cols), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        const S* yr = yp + m * cols;
        const S* gr = gp + m * cols;
        S* dr = dp + m * cols;
        C acc = 0;
        if (log) {
          for (int64_t c = 0; c < cols; ++c) acc += static_cast<C>(gr[c]);
          for (int64_t c = 0; c < cols; ++c)
            dr[c] = static_cast<S>(static_cast<C>(gr[c]) - exp_(static_cast<C>(yr[c])) * acc);
        } else {
          for (int64_t c = 0; c < cols; ++c) acc += static_cast<C>(gr[c]) * static_cast<C>(yr[c]);
          for (int64_t c = 0; c < cols; ++c)
            dr[c] = static_cast<S>(static_cast<C>(yr[c]) * (static_cast<C>(gr[c]) - acc));
        }
      }
    });
  });
}

void cross_entropy_forward(const Tensor& logits, const Tensor& targets, int64_t rows, int64_t cols,
                           int64_t ignore_index, const Tensor& loss, const Tensor& lse,
                           const Tensor& count) {
  const int32_t* tp = in<int32_t>(targets);
  for (int64_t m = 0; m < rows; ++m)  // before any thread starts: errors cannot leave an OpenMP region
    MINIDL_CHECK(tp[m] == ignore_index || (tp[m] >= 0 && tp[m] < cols), "cross_entropy: target ",
                 tp[m], " at row ", m, " is out of range for ", cols, " classes (ignore_index ",
                 ignore_index, ")");
  visit_floating(logits.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* xp = in<S>(logits);
    C* lp = out<C>(lse);
    std::vector<C> row_loss(static_cast<size_t>(rows));
    parallel_for(rows, row_grain(cols), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        const S* xr = xp + m * cols;
        C mx = row_max<C>(xr, cols);
        C sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += exp_(static_cast<C>(xr[c]) - mx);
        C l = mx + log_(sum);
        lp[m] = l;
        row_loss[static_cast<size_t>(m)] = tp[m] == ignore_index ? C(0) : l - static_cast<C>(xr[tp[m]]);
      }
    });
    // Rows summed in order: the loss does not depend on the thread count.
    double total = 0;
    int64_t n = 0;
    for (int64_t m = 0; m < rows; ++m) {
      total += static_cast<double>(row_loss[static_cast<size_t>(m)]);
      n += tp[m] != ignore_index;
    }
    out<S>(loss)[0] = static_cast<S>(static_cast<C>(n > 0 ? total / static_cast<double>(n) : 0.0));
    out<C>(count)[0] = static_cast<C>(n);
  });
}

void cross_entropy_backward(const Tensor& grad, const Tensor& logits, const Tensor& targets,
                            const Tensor& lse, const Tensor& count, int64_t rows, int64_t cols,
                            int64_t ignore_index, const Tensor& dlogits) {
  visit_floating(logits.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* xp = in<S>(logits);
    const int32_t* tp = in<int32_t>(targets);
    const C* lp = in<C>(lse);
    S* dp = out<S>(dlogits);
    C n = in<C>(count)[0];
    C scale = n > 0 ? static_cast<C>(in<S>(grad)[0]) / n : C(0);
    parallel_for(rows, row_grain(cols), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        const S* xr = xp + m * cols;
        S* dr = dp + m * cols;
        if (tp[m] == ignore_index) {
          std::fill(dr, dr + cols, static_cast<S>(C(0)));
          continue;
        }
        for (int64_t c = 0; c < cols; ++c) {
          C p = exp_(static_cast<C>(xr[c]) - lp[m]);
          dr[c] = static_cast<S>(scale * (c == tp[m] ? p - C(1) : p));
        }
      }
    });
  });
}

void layer_norm_forward(const Tensor& x, const Tensor& weight, const Tensor& bias, int64_t rows,
                        int64_t cols, double eps, const Tensor& y, const Tensor& mean,
                        const Tensor& rstd) {
  visit_floating(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* xp = in<S>(x);
    const S* wp = weight.defined() ? in<S>(weight) : nullptr;
    const S* bp = bias.defined() ? in<S>(bias) : nullptr;
    S* yp = out<S>(y);
    C* mp = out<C>(mean);
    C* rp = out<C>(rstd);
    parallel_for(rows, row_grain(cols), [&](int64_t lo, int64_t hi) {
      for (int64_t m = lo; m < hi; ++m) {
        const S* xr = xp + m * cols;
        S* yr = yp + m * cols;
        C sum = 0;
        for (int64_t c = 0; c < cols; ++c) sum += static_cast<C>(xr[c]);
        C mu = sum / static_cast<C>(cols);
        C var = 0;  // two passes: no cancellation for rows with a large mean
        for (int64_t c = 0; c < cols; ++c) {
          C d = static_cast<C>(xr[c]) - mu;
          var += d * d;
        }
        C rs = C(1) / sqrt_(var / static_cast<C>(cols) + static_cast<C>(eps));
        for (int64_t c = 0; c < cols; ++c) {
          C v = (static_cast<C>(xr[c]) - mu) * rs;
          if (wp) v *= static_cast<C>(wp[c]);
          if (bp) v += static_cast<C>(bp[c]);
          yr[c] = static_cast<S>(v);
        }
        mp[m] = mu;
        rp[m] = rs;
      }
    });
  });
}

void layer_norm_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                         const Tensor& mean, const Tensor& rstd, int64_t rows, int64_t cols,
                         const Tensor& dx, const Tensor& dweight, const Tensor& dbias) {
  visit_floating(x.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* gp = in<S>(dy);
    const S* xp = in<S>(x);
    const S* wp = weight.defined() ? in<S>(weight) : nullptr;
    const C* mp = in<C>(mean);
    const C* rp = in<C>(rstd);
    S* dxp = out<S>(dx);
    bool params = dweight.defined() || dbias.defined();
    // Chunks of rows, each with its own partial dweight/dbias row, added in
    // chunk order afterwards (deterministic for any thread count). At most
    // kMaxChunks of them (a fixed count, not the threads'): wide rows made
    // one-row chunks, whose partials took 16 bytes per input element.
    constexpr int64_t kMaxChunks = 128;
    int64_t chunk_rows = std::max(row_grain(cols), (rows + kMaxChunks - 1) / kMaxChunks);
    int64_t chunks = std::max<int64_t>(1, (rows + chunk_rows - 1) / chunk_rows);
    std::vector<double> pw(params ? static_cast<size_t>(chunks * cols) : 0, 0.0);
    std::vector<double> pb(params ? static_cast<size_t>(chunks * cols) : 0, 0.0);
    parallel_for(chunks, 1, [&](int64_t klo, int64_t khi) {
      for (int64_t k = klo; k < khi; ++k) {
        int64_t r_end = std::min(rows, (k + 1) * chunk_rows);
        for (int64_t m = k * chunk_rows; m < r_end; ++m) {
          const S* gr = gp + m * cols;
          const S* xr = xp + m * cols;
          C mu = mp[m], rs = rp[m];
          if (params) {
            double* wk = pw.data() + k * cols;
            double* bk = pb.data() + k * cols;
            for (int64_t c = 0; c < cols; ++c) {
              C g = static_cast<C>(gr[c]);
              wk[c] += static_cast<double>(g * (static_cast<C>(xr[c]) - mu) * rs);
              bk[c] += static_cast<double>(g);
            }
          }
          if (!dxp) continue;
          // dx = rstd (g - mean(g) - xhat mean(g xhat)), g = dy * weight.
          C sum_g = 0, sum_gx = 0;
          for (int64_t c = 0; c < cols; ++c) {
            C g = static_cast<C>(gr[c]) * (wp ? static_cast<C>(wp[c]) : C(1));
            sum_g += g;
            sum_gx += g * (static_cast<C>(xr[c]) - mu) * rs;
          }
          C mean_g = sum_g / static_cast<C>(cols), mean_gx = sum_gx / static_cast<C>(cols);
          S* dr = dxp + m * cols;
          for (int64_t c = 0; c < cols; ++c) {
            C g = static_cast<C>(gr[c]) * (wp ? static_cast<C>(wp[c]) : C(1));
            C xhat = (static_cast<C>(xr[c]) - mu) * rs;
            dr[c] = static_cast<S>(rs * (g - mean_g - xhat * mean_gx));
          }
        }
      }
    });
    if (!params) return;
    S* dwp = out<S>(dweight);
    S* dbp = out<S>(dbias);
    for (int64_t c = 0; c < cols; ++c) {
      double w = 0, b = 0;
      for (int64_t k = 0; k < chunks; ++k) {
        w += pw[static_cast<size_t>(k * cols + c)];
        b += pb[static_cast<size_t>(k * cols + c)];
      }
      if (dwp) dwp[c] = static_cast<S>(static_cast<C>(w));
      if (dbp) dbp[c] = static_cast<S>(static_cast<C>(b));
    }
  });
}

}  // namespace minidl::cpu
