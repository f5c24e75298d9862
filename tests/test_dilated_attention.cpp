// Dilated attention: the float64 reference against a brute force built
// straight from the definition (docs/dilated-attention.md), the fast CPU path against the
// reference, float64 gradchecks of the op, CUDA against the CPU reference, and
// the op's error messages.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <tuple>
#include <utility>

#include "core/dilated.h"
#include "cpu/dilated_attention.h"
#include "tests/helpers.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/dilated_attention.h"
#include "cuda/runtime.h"
#endif

using namespace minidl;
using minidl::testing::check_close;
using minidl::testing::random_tensor;
using minidl::testing::ScopedEnv;
#if defined(MINIDL_WITH_CUDA)
using minidl::testing::for_each_kernel;
#endif

namespace {

const double kNaN = std::numeric_limits<double>::quiet_NaN();
const double kInf = std::numeric_limits<double>::infinity();

struct Case {
  std::string name;
  int64_t B, N, H, D;
  std::vector<int64_t> segments, dilations;
  bool causal = true;
};

std::string str(const Case& c) {
  std::string s = c.name + (c.causal ? " (causal)" : " (non-causal)") + " B=" +
                  std::to_string(c.B) + " N=" + std::to_string(c.N) + " H=" +
                  std::to_string(c.H) + " D=" + std::to_string(c.D) + " w/r=";
  for (size_t i = 0; i < c.segments.size(); ++i)
    s += " " + std::to_string(c.segments[i]) + "/" + std::to_string(c.dilations[i]);
  return s;
}

Case non_causal(Case c) {
  c.causal = false;
  return c;
}

// Each case, then the same not causal.
std::vector<Case> with_non_causal(const std::vector<Case>& cases) {
  std::vector<Case> all;
  for (const Case& c : cases) {
    all.push_back(c);
    all.push_back(non_causal(c));
  }
  return all;
}

// What the op hands the kernels: segments clamped to N, the scale filled in.
DilatedAttentionConfig kernel_config(const Case& c, double scale = 0) {
  DilatedAttentionConfig config;
  config.causal = c.causal;
  config.scale = scale != 0 ? scale : 1.0 / std::sqrt(static_cast<double>(c.D));
  for (size_t i = 0; i < c.segments.size(); ++i)
    config.branches.push_back({std::min(c.segments[i], c.N), c.dilations[i]});
  return config;
}

// Small configurations covering every clause of the definition.
std::vector<Case> spec_cases() {
  std::vector<Case> base = {
      {"single branch = dense attention", 2, 9, 2, 3, {9}, {1}},
      {"several branches", 1, 16, 4, 3, {4, 8, 16}, {1, 2, 4}},
      {"N not a multiple of any w", 1, 13, 3, 2, {4, 6}, {1, 2}},
      {"w > N clamps to N", 1, 7, 2, 3, {20, 3}, {2, 1}},
      {"w not a multiple of r", 1, 12, 3, 2, {5, 7}, {3, 2}},
      {"r > H", 1, 11, 2, 2, {10, 6}, {3, 5}},
      {"H not a multiple of r", 2, 10, 3, 2, {4, 10}, {2, 2}},
      {"rows kept nowhere", 1, 9, 1, 2, {9}, {2}},
      {"head offset beyond a short last segment", 1, 9, 4, 2, {4}, {4}},
      {"duplicate branches count twice", 1, 8, 2, 2, {4, 4}, {1, 1}},
  };
  return with_non_causal(base);
}

enum class Layout { Contiguous, Packed, HeadMajor, StridedHeadDim };

// q, k, v of shape (B, N, H, D) in the given layout and dtype (values drawn
// in float64, then cast): Packed = views of one (B, N, 3, H, D) projection,
// HeadMajor = (B, H, N, D) permuted, StridedHeadDim = every other element of D.
std::tuple<Tensor, Tensor, Tensor> make_qkv(const Case& c, DType dtype, Layout layout,
                                            Device device = Device::cpu()) {
  auto finish = [&](Tensor t) { return t.to(dtype).to(device); };
  switch (layout) {
    case Layout::Packed: {
      Tensor qkv = finish(random_tensor({c.B, c.N, 3, c.H, c.D}));
      return {qkv.slice(2, 0, 1).squeeze(2), qkv.slice(2, 1, 2).squeeze(2),
              qkv.slice(2, 2, 3).squeeze(2)};
    }
    case Layout::HeadMajor: {
      auto one = [&] { return finish(random_tensor({c.B, c.H, c.N, c.D})).permute({0, 2, 1, 3}); };
      Tensor q = one(), k = one(), v = one();
      return {q, k, v};
    }
    case Layout::StridedHeadDim: {
      auto one = [&] { return finish(random_tensor({c.B, c.N, c.H, 2 * c.D})).slice(3, 0, 2 * c.D, 2); };
      Tensor q = one(), k = one(), v = one();
      return {q, k, v};
    }
    case Layout::Contiguous:
      break;
  }
  Tensor q = finish(random_tensor({c.B, c.N, c.H, c.D})), k = finish(random_tensor({c.B, c.N, c.H, c.D})),
         v = finish(random_tensor({c.B, c.N, c.H, c.D}));
  return {q, k, v};
}

DType lse_dtype(DType dtype) { return dtype == DType::Float64 ? DType::Float64 : DType::Float32; }

Tensor poisoned(const Shape& shape, DType dtype, Device device = Device::cpu()) {
  return ops::full(shape, kNaN, {dtype, device, false});
}

// ---- brute force, straight from the definition ----

// counts[(h * N + p) * N + j] = number of (branch, key) pairs of row p (head
// h) whose key is j: for every branch, every segment's kept positions
// s*w + h%r + t*r, each seeing the kept positions <= itself (causal) or all.
std::vector<int> pair_counts(const Case& c) {
  std::vector<int> counts(static_cast<size_t>(c.H * c.N * c.N), 0);
  for (size_t i = 0; i < c.segments.size(); ++i) {
    int64_t w = std::min(c.segments[i], c.N), r = c.dilations[i];
    for (int64_t h = 0; h < c.H; ++h) {
      for (int64_t start = 0; start < c.N; start += w) {
        std::vector<int64_t> kept;
        for (int64_t p = start + h % r; p < std::min(start + w, c.N); p += r) kept.push_back(p);
        for (int64_t p : kept)
          for (int64_t j : kept)
            if (!c.causal || j <= p) ++counts[static_cast<size_t>((h * c.N + p) * c.N + j)];
      }
    }
  }
  return counts;
}

struct Dense {
  std::vector<double> out, lse;
};

// L_p = log sum_j count_pj exp(s_pj), O_p = sum_j count_pj exp(s_pj - L_p) v_j;
// q, k, v are row-major (B, N, H, D) values.
Dense brute_force(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
                  const std::vector<double>& v, const std::vector<int>& counts, double scale) {
  const int64_t N = c.N, H = c.H, D = c.D;
  Dense r{std::vector<double>(q.size(), 0.0), std::vector<double>(static_cast<size_t>(c.B * N * H), -kInf)};
  auto at = [&](int64_t b, int64_t n, int64_t h) { return static_cast<size_t>(((b * N + n) * H + h) * D); };
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t p = 0; p < N; ++p) {
        std::vector<double> s(static_cast<size_t>(N), 0.0);
        double m = -kInf;
        for (int64_t j = 0; j < N; ++j) {
          if (!counts[static_cast<size_t>((h * N + p) * N + j)]) continue;
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[at(b, p, h) + d] * k[at(b, j, h) + d];
          s[j] = scale * dot;
          m = std::max(m, s[j]);
        }
        if (m == -kInf) continue;  // kept nowhere: out 0, lse -inf
        double z = 0;
        for (int64_t j = 0; j < N; ++j) z += counts[static_cast<size_t>((h * N + p) * N + j)] * std::exp(s[j] - m);
        double lse = m + std::log(z);
        r.lse[static_cast<size_t>((b * N + p) * H + h)] = lse;
        for (int64_t j = 0; j < N; ++j) {
          int n_pairs = counts[static_cast<size_t>((h * N + p) * N + j)];
          if (!n_pairs) continue;
          double w = n_pairs * std::exp(s[j] - lse);
          for (int64_t d = 0; d < D; ++d) r.out[at(b, p, h) + d] += w * v[at(b, j, h) + d];
        }
      }
  return r;
}

// ---- checks ----

// Closeness with an absolute floor relative to the reference's scale:
// |a - b| <= tol (max|b| + |b|).
void check_scaled(const Tensor& a, const Tensor& b, double tol) {
  REQUIRE(a.shape() == b.shape());
  const std::vector<double> y = b.to_vector<double>();
  double peak = 0;
  for (double x : y) peak = std::max(peak, std::abs(x));
  check_close(a.to_vector<double>(), y, tol * std::max(peak, 1e-30), tol);
}

// lse: -inf exactly where the reference has -inf, close elsewhere.
void check_lse(const Tensor& a, const Tensor& b, double tol) {
  REQUIRE(a.shape() == b.shape());
  std::vector<double> x = a.to_vector<double>(), y = b.to_vector<double>();
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    bool ok = std::isinf(y[i]) ? (x[i] == y[i]) : std::abs(x[i] - y[i]) <= tol * (1 + std::abs(y[i]));
    if (!ok && bad++ == 0) first = i;
  }
  INFO("first bad lse element ", first, ": ", x.empty() ? 0.0 : x[first], " vs ",
       y.empty() ? 0.0 : y[first]);
  CHECK(bad == 0);
}

void check_all_finite(const Tensor& t) {
  std::vector<double> x = t.to_vector<double>();
  CHECK(std::all_of(x.begin(), x.end(), [](double e) { return std::isfinite(e); }));
}

struct Forward {
  Tensor out, lse;
  Tensor dropout_bits;  // run_cuda_forward: the mask kept for the backward, if any
};
struct Backward {
  Tensor dq, dk, dv;
};

using ForwardFn = void (*)(const Tensor&, const Tensor&, const Tensor&, const DilatedAttentionConfig&,
                           const Tensor&, const Tensor&);
using BackwardFn = void (*)(const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                            const Tensor&, const Tensor&, const DilatedAttentionConfig&, const Tensor&,
                            const Tensor&, const Tensor&);

// NaN-poisoned outputs for q's problem (unwritten elements show).
Forward poisoned_forward(const Tensor& q) {
  return {poisoned(q.shape(), q.dtype(), q.device()),
          poisoned({q.size(0), q.size(1), q.size(2)}, lse_dtype(q.dtype()), q.device())};
}

// Runs a kernel entry point into poisoned outputs.
Forward run_forward(ForwardFn fn, const Tensor& q, const Tensor& k, const Tensor& v,
                    const DilatedAttentionConfig& config) {
  Forward f = poisoned_forward(q);
  fn(q, k, v, config, f.out, f.lse);
  return f;
}

// NaN-poisoned gradients for q's problem.
Backward poisoned_grads(const Tensor& q) {
  return {poisoned(q.shape(), q.dtype(), q.device()), poisoned(q.shape(), q.dtype(), q.device()),
          poisoned(q.shape(), q.dtype(), q.device())};
}

Backward run_backward(BackwardFn fn, const Tensor& q, const Tensor& k, const Tensor& v,
                      const Forward& f, const Tensor& grad_out, const Tensor& grad_lse,
                      const DilatedAttentionConfig& config) {
  Backward g = poisoned_grads(q);
  fn(q, k, v, f.out, f.lse, grad_out, grad_lse, config, g.dq, g.dk, g.dv);
  return g;
}

#if defined(MINIDL_WITH_CUDA)
// The CUDA entry points as the op calls them when gradients follow: the
// forward may keep attention dropout's mask, and the backward reads it.
Forward run_cuda_forward(const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionConfig& config) {
  Forward f = poisoned_forward(q);
  cuda::dilated_attention_forward(q, k, v, config, f.out, f.lse, &f.dropout_bits);
  return f;
}
Backward run_cuda_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Forward& f,
                           const Tensor& grad_out, const Tensor& grad_lse, const DilatedAttentionConfig& config) {
  Backward g = poisoned_grads(q);
  cuda::dilated_attention_backward(q, k, v, f.out, f.lse, grad_out, grad_lse, config, g.dq, g.dk, g.dv,
                                   f.dropout_bits);
  return g;
}
#endif

// d objective / d values[e] by central differences (step 1e-6), each value
// perturbed in place and restored.
template <typename Objective>
std::vector<double> central_differences(std::vector<double>& values, Objective&& objective) {
  std::vector<double> numeric(values.size());
  for (size_t e = 0; e < values.size(); ++e) {
    const double orig = values[e], eps = 1e-6;
    values[e] = orig + eps;
    double fp = objective();
    values[e] = orig - eps;
    double fm = objective();
    values[e] = orig;
    numeric[e] = (fp - fm) / (2 * eps);
  }
  return numeric;
}

}  // namespace

// ---------------------------------------------------------------------------
// The reference against the definition.

TEST_CASE("reference forward matches the brute force built from the definition") {
  for (const Case& c : spec_cases()) {
    CAPTURE(str(c));
    auto [q, k, v] = make_qkv(c, DType::Float64, Layout::Packed);
    DilatedAttentionConfig config = kernel_config(c);
    Forward f = run_forward(cpu::dilated_attention_forward_reference, q, k, v, config);
    Dense want = brute_force(c, q.to_vector<double>(), k.to_vector<double>(), v.to_vector<double>(),
                             pair_counts(c), config.scale);
    check_close(f.out, from_vector(want.out, q.shape()), 1e-12, 1e-12);
    check_lse(f.lse, from_vector(want.lse, f.lse.shape()), 1e-12);
  }
}

TEST_CASE("reference backward matches finite differences of the brute force") {
  // F = sum(w_out * out) + sum over rows kept somewhere of w_lse * lse; the
  // reference backward with grad_out = w_out, grad_lse = w_lse is dF.
  for (const Case& c : spec_cases()) {
    CAPTURE(str(c));
    auto [q, k, v] = make_qkv(c, DType::Float64, Layout::Contiguous);
    DilatedAttentionConfig config = kernel_config(c);
    Tensor w_out = random_tensor(q.shape()), w_lse = random_tensor({c.B, c.N, c.H});
    Forward f = run_forward(cpu::dilated_attention_forward_reference, q, k, v, config);
    Backward g = run_backward(cpu::dilated_attention_backward_reference, q, k, v, f, w_out, w_lse, config);
    std::vector<int> counts = pair_counts(c);
    std::vector<double> wo = w_out.to_vector<double>(), wl = w_lse.to_vector<double>();
    std::vector<std::vector<double>> x = {q.to_vector<double>(), k.to_vector<double>(), v.to_vector<double>()};
    auto objective = [&] {
      Dense d = brute_force(c, x[0], x[1], x[2], counts, config.scale);
      double s = 0;
      for (size_t i = 0; i < wo.size(); ++i) s += wo[i] * d.out[i];
      for (size_t i = 0; i < wl.size(); ++i)
        if (std::isfinite(d.lse[i])) s += wl[i] * d.lse[i];
      return s;
    };
    const Tensor* analytic[3] = {&g.dq, &g.dk, &g.dv};
    for (int t = 0; t < 3; ++t) {
      std::vector<double> numeric = central_differences(x[t], objective);
      CAPTURE(t);
      check_close(*analytic[t], from_vector(numeric, q.shape()), 1e-7, 1e-6);
    }
  }
}

TEST_CASE("hand-computed values: dense causal rows, a dilated head split, duplicate branches") {
  // N = 2, H = 1, D = 1, scale 1: row 0 sees key 0 only, row 1 sees keys 0, 1.
  Tensor q = from_vector(std::vector<double>{1, 2}, {1, 2, 1, 1});
  Tensor k = from_vector(std::vector<double>{0.5, -1}, {1, 2, 1, 1});
  Tensor v = from_vector(std::vector<double>{3, 5}, {1, 2, 1, 1});
  auto [out, lse] = ops::dilated_attention(q, k, v, {2}, {1}, true, 1.0);
  double z1 = std::exp(1.0) + std::exp(-2.0);
  check_close(out, from_vector(std::vector<double>{3, (3 * std::exp(1.0) + 5 * std::exp(-2.0)) / z1}, {1, 2, 1, 1}), 1e-14, 1e-14);
  check_close(lse, from_vector(std::vector<double>{0.5, std::log(z1)}, {1, 2, 1}), 1e-14, 1e-14);
  // The same branch twice: every pair counts twice, so out is unchanged and lse grows by log 2.
  auto [out2, lse2] = ops::dilated_attention(q, k, v, {2, 2}, {1, 1}, true, 1.0);
  check_close(out2, out, 1e-14, 1e-14);
  check_close(lse2, ops::add(lse, std::log(2.0)), 1e-14, 1e-14);

  // N = 4, H = 2, one segment w = 4, r = 2, non-causal: head 0 keeps 0 and 2,
  // head 1 keeps 1 and 3; rows of the other parity are kept nowhere.
  std::vector<double> qv(8), kv(8), vv(8);
  for (int p = 0; p < 4; ++p)
    for (int h = 0; h < 2; ++h) {
      qv[p * 2 + h] = 0.5 * p - h;
      kv[p * 2 + h] = 1.0 - 0.25 * p + h;
      vv[p * 2 + h] = 10.0 * p + h;
    }
  Tensor q4 = from_vector(qv, {1, 4, 2, 1}), k4 = from_vector(kv, {1, 4, 2, 1}), v4 = from_vector(vv, {1, 4, 2, 1});
  auto [o4, l4] = ops::dilated_attention(q4, k4, v4, {4}, {2}, false, 1.0);
  std::vector<double> want_o(8, 0.0), want_l(8, -kInf);
  for (int h = 0; h < 2; ++h)
    for (int p = h; p < 4; p += 2) {
      double s0 = qv[p * 2 + h] * kv[h * 2 + h], s1 = qv[p * 2 + h] * kv[(h + 2) * 2 + h];
      double z = std::exp(s0) + std::exp(s1);
      want_l[p * 2 + h] = std::log(z);
      want_o[p * 2 + h] = (std::exp(s0) * vv[h * 2 + h] + std::exp(s1) * vv[(h + 2) * 2 + h]) / z;
    }
  check_close(o4, from_vector(want_o, {1, 4, 2, 1}), 1e-13, 1e-13);
  check_lse(l4, from_vector(want_l, {1, 4, 2}), 1e-13);
}

// The plan the ws kernels take where branches nest (core/dilated.h,
// nested_pairs): summed over the branches, the pairs each computes, at their
// weights, are the definition's pair counts, pair for pair.
TEST_CASE("nested branches: each shared pair is computed by one branch, weighted by the branches holding it") {
  const std::vector<Case> nests = {
      {"LongNet's doubling", 1, 64, 8, 1, {8, 16, 32, 64}, {1, 2, 4, 8}},
      {"listed out of order, partial last segments", 1, 70, 8, 1, {32, 8, 16}, {4, 1, 2}},
      {"w > N clamps to N, which 16 does not divide", 1, 50, 3, 1, {8, 100, 16}, {1, 4, 2}},
      {"equal dilations", 1, 48, 2, 1, {8, 16}, {1, 1}},
      {"equal segments: every pair of r = 2 is one of r = 1", 1, 40, 2, 1, {8, 8}, {1, 2}},
      {"duplicate branches", 1, 40, 2, 1, {8, 8}, {1, 1}},
  };
  for (const Case& c : with_non_causal(nests)) {
    CAPTURE(str(c));
    const DilatedAttentionConfig config = kernel_config(c);
    const std::vector<BranchPairs> plan = nested_pairs(config, c.N);
    REQUIRE(plan.size() == c.segments.size());
    std::vector<int> weighted(static_cast<size_t>(c.H * c.N * c.N), 0);
    for (size_t i = 0; i < plan.size(); ++i) {
      const DilatedBranch& b = config.branches[i];
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t segment = 0; segment * b.segment < c.N; ++segment) {
          const KeptRows rows = kept_rows(c.N, b.segment, b.dilation, h, segment);
          for (int64_t tq = 0; tq < rows.count; ++tq)
            for (int64_t tk = 0; tk < (c.causal ? tq + 1 : rows.count); ++tk)
              if (plan[i].keeps(tq, tk))
                weighted[static_cast<size_t>((h * c.N + rows.base + tq * rows.stride) * c.N + rows.base +
                                             tk * rows.stride)] += plan[i].weight(h, tq, tk);
        }
    }
    CHECK(weighted == pair_counts(c));
  }
  const std::vector<Case> apart = {
      {"3 does not divide 8", 1, 48, 4, 1, {8, 16}, {1, 3}},
      {"4 does not divide the smallest segment", 1, 48, 4, 1, {6, 12}, {1, 4}},
      {"8 does not divide 12", 1, 48, 4, 1, {8, 12}, {1, 2}},
      {"no dilation 1", 1, 48, 4, 1, {8, 16}, {2, 4}},
      {"the larger segment's dilation is the smaller", 1, 48, 4, 1, {8, 16}, {2, 1}},
      {"dilations out of the segments' order", 1, 48, 4, 1, {8, 16, 32}, {1, 4, 2}},
      {"one branch", 1, 48, 4, 1, {8}, {1}},
  };
  for (const Case& c : with_non_causal(apart)) {
    CAPTURE(str(c));
    CHECK(nested_pairs(kernel_config(c), c.N).empty());
  }

  // LongNet's 1M-token problem: spans of 1,024 kept rows; head 0 of the
  // dilation-1 branch has rows t = 0 mod 8 kept by all three larger branches,
  // 4 mod 8 by two, 2 and 6 by one; head 3 has 3 mod 8 by three, 7 by two, 1, 5 by one.
  DilatedAttentionConfig longnet;
  longnet.branches = {{2048, 1}, {4096, 2}, {8192, 4}, {16384, 8}};
  const std::vector<BranchPairs> plan = nested_pairs(longnet, int64_t(1) << 20);
  REQUIRE(plan.size() == 4);
  CHECK(plan[0].span == 0);
  CHECK(plan[1].span == 1024);
  CHECK(plan[2].span == 1024);
  CHECK(plan[3].span == 1024);
  CHECK(plan[0].classes[0] == 0x01020103u);
  CHECK(plan[0].classes[3] == 0x20103010u);
  CHECK(plan[0].weight(3, 3, 11) == 4);
  CHECK(plan[0].weight(3, 7, 3) == 3);
  CHECK(plan[0].weight(0, 0, 1) == 1);
  CHECK(plan[3].classes[5] == 0u);
  CHECK(!plan[3].plain());
}

// ---------------------------------------------------------------------------
// The fast CPU path against the reference.

namespace {
std::vector<Case> tiled_cases() {
  // Sizes that cross the fast path's query and key tiles (32 rows each).
  std::vector<Case> base = {
      {"dense", 1, 150, 2, 20, {150}, {1}},
      {"LongNet-like, w > N, r > H, N not a multiple of w", 2, 200, 5, 16, {32, 64, 128, 256}, {1, 2, 4, 8}},
      {"w not a multiple of r", 1, 130, 3, 9, {70, 45}, {3, 4}},
      {"rows kept nowhere", 1, 100, 2, 8, {50}, {3}},
      // Nested branches (nested_pairs), whose spans of a key tile or more
      // the fast path takes (LongNet-like above nests in spans of 16 rows:
      // every pair computed): spans of two tiles, three to a segment, the
      // largest segment clamped to N; spans of 48 rows, across tiles.
      {"nested, spans of whole tiles", 1, 300, 4, 8, {128, 256, 768}, {1, 2, 4}},
      {"nested, spans across tiles", 1, 300, 3, 8, {96, 192}, {1, 2}},
  };
  std::vector<Case> all = with_non_causal(base);
  for (const Case& c : spec_cases()) all.push_back(c);
  return all;
}

double fast_path_tolerance(DType dtype) {
  switch (dtype) {
    case DType::Float64: return 1e-11;
    case DType::Float32: return 2e-5;
    default: return 1e-2;  // bfloat16 outputs: both round to 8 bits
  }
}
}  // namespace

TEST_CASE("fast CPU path matches the reference, forward and backward") {
  for (DType dtype : {DType::Float64, DType::Float32, DType::BFloat16}) {
    const double tol = fast_path_tolerance(dtype);
    for (const Case& c : tiled_cases()) {
      CAPTURE(dtype);
      CAPTURE(str(c));
      auto [q, k, v] = make_qkv(c, dtype, Layout::Packed);
      DilatedAttentionConfig config = kernel_config(c);
      if (c.name.rfind("nested", 0) == 0) REQUIRE(nested_pairs(config, c.N).size() == c.segments.size());
      Forward want = run_forward(cpu::dilated_attention_forward_reference, q, k, v, config);
      Forward got = run_forward(cpu::dilated_attention_forward, q, k, v, config);
      check_scaled(got.out, want.out, tol);
      check_lse(got.lse, want.lse, tol);

      // Same (out, lse) into both backward passes; grad_out strided, grad_lse
      // defined and not.
      Tensor grad_out = random_tensor({c.B, c.H, c.N, c.D}).to(dtype).permute({0, 2, 1, 3});
      Tensor grad_lse = random_tensor({c.B, c.N, c.H}).to(lse_dtype(dtype));
      for (const Tensor& gl : {grad_lse, Tensor()}) {
        CAPTURE(gl.defined());
        Backward gw = run_backward(cpu::dilated_attention_backward_reference, q, k, v, want, grad_out, gl, config);
        Backward gg = run_backward(cpu::dilated_attention_backward, q, k, v, want, grad_out, gl, config);
        check_scaled(gg.dq, gw.dq, tol);
        check_scaled(gg.dk, gw.dk, tol);
        check_scaled(gg.dv, gw.dv, tol);
      }
    }
  }
}

TEST_CASE("rows kept nowhere: out 0, lse -inf, zero gradients and no NaN") {
  // H = 2, r = 3: offsets 0 and 1; positions with (p mod w) mod 3 == 2 are kept
  // by no head; for head 0 also every position with (p mod w) mod 3 == 1.
  Case c{"kept nowhere", 2, 17, 2, 4, {9}, {3}};
  for (bool causal : {true, false}) {
    c.causal = causal;
    CAPTURE(causal);
    Tensor q = random_tensor({c.B, c.N, c.H, c.D}, {DType::Float64, Device::cpu(), true});
    Tensor k = random_tensor({c.B, c.N, c.H, c.D}, {DType::Float64, Device::cpu(), true});
    Tensor v = random_tensor({c.B, c.N, c.H, c.D}, {DType::Float64, Device::cpu(), true});
    auto [out, lse] = ops::dilated_attention(q, k, v, c.segments, c.dilations, c.causal);
    // Seeds for both outputs, nonzero everywhere (also on the -inf rows).
    Tensor seed_out = random_tensor(out.shape()), seed_lse = random_tensor(lse.shape());
    ops::add(ops::sum(ops::mul(out, seed_out)),
             ops::sum(ops::mul(ops::masked_fill(lse, ops::eq(lse, ops::full({}, -kInf, {DType::Float64})), 0.0), seed_lse)))
        .backward();
    std::vector<double> o = out.to_vector<double>(), l = lse.to_vector<double>();
    std::vector<double> gq = q.grad().to_vector<double>(), gk = k.grad().to_vector<double>(),
                        gv = v.grad().to_vector<double>();
    int nowhere = 0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t p = 0; p < c.N; ++p)
        for (int64_t h = 0; h < c.H; ++h) {
          bool kept = (p % 9) % 3 == h;
          size_t row = static_cast<size_t>((b * c.N + p) * c.H + h);
          CHECK(std::isinf(l[row]) == !kept);
          if (kept) continue;
          ++nowhere;
          CHECK(l[row] < 0);
          for (int64_t d = 0; d < c.D; ++d) {
            size_t e = row * c.D + d;
            CHECK(o[e] == 0.0);
            CHECK(gq[e] == 0.0);  // a row kept nowhere is never a query ...
            CHECK(gk[e] == 0.0);  // ... nor a key
            CHECK(gv[e] == 0.0);
          }
        }
    CHECK(nowhere > 0);
    check_all_finite(q.grad());
    check_all_finite(k.grad());
    check_all_finite(v.grad());
  }
}

// ---------------------------------------------------------------------------
// The op: gradchecks, scale, layouts, vanilla attention.

TEST_CASE("dilated_attention gradcheck (float64) through out and lse, strided views") {
  std::vector<Case> cases = {
      {"dense", 1, 6, 2, 3, {6}, {1}},
      {"several branches, w > N, r > H", 2, 11, 3, 2, {4, 6, 20}, {1, 2, 4}},
      {"rows kept nowhere", 1, 9, 2, 2, {5}, {3}},
  };
  const Layout layouts[] = {Layout::Packed, Layout::HeadMajor, Layout::StridedHeadDim};
  int variant = 0;
  for (const Case& base : cases)
    for (bool causal : {true, false}) {
      Case c = base;
      c.causal = causal;
      Layout layout = layouts[variant++ % 3];
      CAPTURE(str(c));
      CAPTURE(static_cast<int>(layout));
      auto [q, k, v] = make_qkv(c, DType::Float64, layout);
      q.requires_grad_(true);
      k.requires_grad_(true);
      v.requires_grad_(true);
      Tensor nowhere;  // rows with lse = -inf, masked out of the lse objective
      {
        NoGradGuard no_grad;
        Tensor lse = ops::dilated_attention(q, k, v, c.segments, c.dilations, c.causal).second;
        nowhere = ops::eq(lse, ops::full({}, -kInf, {DType::Float64}));
      }
      Tensor w_out = random_tensor(q.shape()), w_lse = random_tensor({c.B, c.N, c.H});
      auto attend = [&](const std::vector<Tensor>& x) {
        return ops::dilated_attention(x[0], x[1], x[2], c.segments, c.dilations, c.causal);
      };
      // Both outputs at once (grad_out and grad_lse nonzero) ...
      CHECK(gradcheck(
          [&](const std::vector<Tensor>& x) {
            auto [out, lse] = attend(x);
            return ops::add(ops::sum(ops::mul(out, w_out)),
                            ops::sum(ops::mul(ops::masked_fill(lse, nowhere, 0.0), w_lse)));
          },
          {q, k, v}));
      // ... and each alone (the other output's gradient is zero).
      if (variant <= 2) {
        CHECK(gradcheck([&](const std::vector<Tensor>& x) { return attend(x).first; }, {q, k, v}));
        CHECK(gradcheck(
            [&](const std::vector<Tensor>& x) { return ops::masked_fill(attend(x).second, nowhere, 0.0); },
            {q, k, v}));
      }
    }
}

TEST_CASE("attention is dilated_attention with one branch w = N, r = 1; scale defaults to 1/sqrt(D)") {
  Case c{"dense", 2, 40, 3, 8, {40}, {1}};
  for (bool causal : {true, false}) {
    auto [q, k, v] = make_qkv(c, DType::Float64, Layout::Packed);
    Tensor a = ops::attention(q, k, v, causal);
    Tensor d = ops::dilated_attention(q, k, v, {1000}, {1}, causal, 1.0 / std::sqrt(8.0)).first;
    check_close(a, d, 1e-14, 1e-14);
    // An explicit scale reaches the kernels.
    c.causal = causal;
    Forward want = run_forward(cpu::dilated_attention_forward_reference, q, k, v, kernel_config(c, 0.3));
    check_close(ops::attention(q, k, v, causal, 0.3), want.out, 1e-12, 1e-12);
  }
}

TEST_CASE("dilated_attention op: float32 and bfloat16 on the CPU, lse dtype, non-contiguous D") {
  Case c{"several", 2, 70, 4, 12, {16, 32, 128}, {1, 2, 4}};
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    auto [q, k, v] = make_qkv(c, dtype, Layout::StridedHeadDim);
    auto [out, lse] = ops::dilated_attention(q, k, v, c.segments, c.dilations);
    CHECK(out.dtype() == dtype);
    CHECK(lse.dtype() == DType::Float32);
    CHECK(out.is_contiguous());
    Forward want = run_forward(cpu::dilated_attention_forward_reference, q.contiguous(), k.contiguous(),
                               v.contiguous(), kernel_config(c));
    check_scaled(out, want.out, fast_path_tolerance(dtype));
    check_lse(lse, want.lse, fast_path_tolerance(dtype));
  }
  Tensor q64 = random_tensor({1, 5, 2, 4});
  CHECK(ops::dilated_attention(q64, q64, q64, {2}, {1}).second.dtype() == DType::Float64);
}

TEST_CASE("dilated_attention op: float32 autograd matches the float64 reference backward") {
  Case c{"several", 2, 50, 3, 8, {16, 64}, {1, 2}};
  Tensor q = random_tensor({c.B, c.N, c.H, c.D}, {DType::Float32, Device::cpu(), true});
  Tensor k = random_tensor({c.B, c.N, c.H, c.D}, {DType::Float32, Device::cpu(), true});
  Tensor v = random_tensor({c.B, c.N, c.H, c.D}, {DType::Float32, Device::cpu(), true});
  Tensor seed_out = random_tensor(q.shape(), {DType::Float32}), seed_lse = random_tensor({c.B, c.N, c.H}, {DType::Float32});
  auto [out, lse] = ops::dilated_attention(q, k, v, c.segments, c.dilations);
  ops::add(ops::sum(ops::mul(out, seed_out)), ops::sum(ops::mul(lse, seed_lse))).backward();
  Tensor q64 = q.detach().to(DType::Float64), k64 = k.detach().to(DType::Float64), v64 = v.detach().to(DType::Float64);
  DilatedAttentionConfig config = kernel_config(c);
  Forward f = run_forward(cpu::dilated_attention_forward_reference, q64, k64, v64, config);
  Backward g = run_backward(cpu::dilated_attention_backward_reference, q64, k64, v64, f, seed_out.to(DType::Float64),
                            seed_lse.to(DType::Float64), config);
  check_scaled(q.grad(), g.dq, 1e-4);
  check_scaled(k.grad(), g.dk, 1e-4);
  check_scaled(v.grad(), g.dv, 1e-4);
}

// ---------------------------------------------------------------------------
// Attention dropout (core/dilated.h): the reference and the fast path against a
// brute force of the formulas, the op's gradcheck with a fixed generator state,
// the kept fraction, and dropout 0 leaving everything as it was.

namespace {

// What the op puts in config.dropout for drop probability p (the formulas are
// checked against their definition below).
AttentionDropout dropout_of(double p, uint64_t seed, uint64_t offset) {
  return make_attention_dropout(p, seed, offset);
}

// The mask straight from its definition (core/dilated.h, docs/dilated-attention.md),
// without the header's helpers: the block's 16 bytes in little-endian order,
// key t of its 16-key group at word (t & 7) >> 1, byte ((t >> 3) & 1) * 2 + (t & 1).
int byte_of_key(uint64_t t) {
  const uint64_t u = t & 15;
  return static_cast<int>(4 * ((u & 7) >> 1) + ((u >> 3) & 1) * 2 + (u & 1));
}

bool keep_by_definition(uint64_t seed, uint64_t offset, uint32_t t8, uint64_t row, uint64_t t) {
  const philox::U32x4 b = philox::block<7>(seed, offset, ((row << 32) | t) >> 4);
  const uint32_t words[4] = {b.x, b.y, b.z, b.w};
  uint8_t bytes[16];
  for (int w = 0; w < 4; ++w)
    for (int k = 0; k < 4; ++k) bytes[4 * w + k] = static_cast<uint8_t>(words[w] >> (8 * k));
  return bytes[byte_of_key(t)] >= t8;
}

DilatedAttentionConfig dropout_config(const Case& c, double p, uint64_t seed = 99, uint64_t offset = 7) {
  DilatedAttentionConfig config = kernel_config(c);
  config.dropout = dropout_of(p, seed, offset);
  return config;
}

// One (branch, key) pair of a row: the key's position, the branch's index and
// the key's index t among its segment's kept rows.
struct Pair {
  int64_t key, branch, t;
};

// pairs[h * N + p]: for every branch, every segment's kept positions
// s*w + h%r + t*r, each seeing the kept positions <= itself (causal) or all.
std::vector<std::vector<Pair>> pair_lists(const Case& c) {
  std::vector<std::vector<Pair>> pairs(static_cast<size_t>(c.H * c.N));
  for (size_t i = 0; i < c.segments.size(); ++i) {
    int64_t w = std::min(c.segments[i], c.N), r = c.dilations[i];
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t start = 0; start < c.N; start += w) {
        std::vector<int64_t> kept;
        for (int64_t p = start + h % r; p < std::min(start + w, c.N); p += r) kept.push_back(p);
        for (int64_t p : kept)
          for (size_t t = 0; t < kept.size(); ++t)
            if (!c.causal || kept[t] <= p)
              pairs[static_cast<size_t>(h * c.N + p)].push_back({kept[t], static_cast<int64_t>(i),
                                                                 static_cast<int64_t>(t)});
      }
  }
  return pairs;
}

// Per-pair dropout's owner of pair (p, key) for head h, from the definition:
// the first branch in the order of (segment clamped to N, dilation), ties as
// listed, whose segment holds both positions and keeps both for head h; with
// the key's index among that segment's kept rows.
Pair owner_of(const Case& c, int64_t h, int64_t p, int64_t key) {
  std::vector<size_t> order(c.segments.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  auto w_of = [&](size_t i) { return std::min(c.segments[i], c.N); };
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return std::make_pair(w_of(a), c.dilations[a]) < std::make_pair(w_of(b), c.dilations[b]);
  });
  for (size_t i : order) {
    const int64_t w = w_of(i), r = c.dilations[i], start = p / w * w;
    if (key / w * w == start && (p - start) % r == h % r && (key - start) % r == h % r)
      return {key, static_cast<int64_t>(i), (key - start) / r};
  }
  FAIL("no branch holds the pair");
  return {};
}

// Whether per-pair dropout changes anything for c: the branches nest.
bool nests(const Case& c) { return !nested_pairs(kernel_config(c), c.N).empty(); }

// M_pj = keep_pj * scale for pair j of row (b, h, p): its own branch's
// element, or with per-pair dropout where the branches nest its owner's.
double mask_factor(const Case& c, const AttentionDropout& drop, int64_t b, int64_t h, int64_t p,
                   const Pair& j, bool nesting = false) {
  const Pair at = drop.per_pair && nesting ? owner_of(c, h, p, j.key) : j;
  return attention_keep(drop, at.branch, c.B, b, c.H, h, c.N, p, at.t) ? drop.scale : 0.0;
}

struct Grads {
  std::vector<double> dq, dk, dv;
};

// The formulas, per row (b, h, p) with pairs j: s_pj = scale q_p.k_j,
// L_p = log sum_j exp(s_pj) (undropped), P_pj = exp(s_pj - L_p),
// O_p = sum_j P_pj M_pj v_j (O_p = 0, L_p = -inf where p has no pairs).
Dense brute_force_dropout(const Case& c, const std::vector<double>& q, const std::vector<double>& k,
                          const std::vector<double>& v, const std::vector<std::vector<Pair>>& pairs,
                          double scale, const AttentionDropout& drop) {
  const int64_t N = c.N, H = c.H, D = c.D;
  const bool nesting = nests(c);
  Dense r{std::vector<double>(q.size(), 0.0), std::vector<double>(static_cast<size_t>(c.B * N * H), -kInf)};
  auto at = [&](int64_t b, int64_t n, int64_t h) { return static_cast<size_t>(((b * N + n) * H + h) * D); };
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t p = 0; p < N; ++p) {
        const std::vector<Pair>& row = pairs[static_cast<size_t>(h * N + p)];
        if (row.empty()) continue;
        std::vector<double> s;
        for (const Pair& j : row) {
          double dot = 0;
          for (int64_t d = 0; d < D; ++d) dot += q[at(b, p, h) + d] * k[at(b, j.key, h) + d];
          s.push_back(scale * dot);
        }
        double z = 0;
        for (double x : s) z += std::exp(x);
        const double lse = std::log(z);
        r.lse[static_cast<size_t>((b * N + p) * H + h)] = lse;
        for (size_t j = 0; j < row.size(); ++j) {
          double weight = std::exp(s[j] - lse) * mask_factor(c, drop, b, h, p, row[j], nesting);
          for (int64_t d = 0; d < D; ++d) r.out[at(b, p, h) + d] += weight * v[at(b, row[j].key, h) + d];
        }
      }
  return r;
}

// D_p = dO_p . O_p - dL_p, dV_j += P M dO_p, dP'_pj = dO_p . v_j,
// dS = P (M dP' - D_p), dQ_p += scale dS k_j, dK_j += scale dS q_p.
Grads brute_force_dropout_backward(const Case& c, const std::vector<double>& q,
                                   const std::vector<double>& k, const std::vector<double>& v,
                                   const Dense& f, const std::vector<double>& grad_out,
                                   const std::vector<double>& grad_lse,
                                   const std::vector<std::vector<Pair>>& pairs, double scale,
                                   const AttentionDropout& drop) {
  const int64_t N = c.N, H = c.H, D = c.D;
  const bool nesting = nests(c);
  Grads g{std::vector<double>(q.size(), 0.0), std::vector<double>(q.size(), 0.0),
          std::vector<double>(q.size(), 0.0)};
  auto at = [&](int64_t b, int64_t n, int64_t h) { return static_cast<size_t>(((b * N + n) * H + h) * D); };
  auto dot = [&](const std::vector<double>& x, size_t i, const std::vector<double>& y, size_t j) {
    double s = 0;
    for (int64_t d = 0; d < D; ++d) s += x[i + d] * y[j + d];
    return s;
  };
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t p = 0; p < N; ++p) {
        const std::vector<Pair>& row = pairs[static_cast<size_t>(h * N + p)];
        if (row.empty()) continue;
        const size_t rp = at(b, p, h), ri = static_cast<size_t>((b * N + p) * H + h);
        const double delta = dot(grad_out, rp, f.out, rp) - grad_lse[ri];
        for (const Pair& j : row) {
          const size_t rj = at(b, j.key, h);
          const double prob = std::exp(scale * dot(q, rp, k, rj) - f.lse[ri]);
          const double m = mask_factor(c, drop, b, h, p, j, nesting);
          const double ds = prob * (m * dot(grad_out, rp, v, rj) - delta);
          for (int64_t d = 0; d < D; ++d) {
            g.dv[rj + d] += prob * m * grad_out[rp + d];
            g.dq[rp + d] += scale * ds * k[rj + d];
            g.dk[rj + d] += scale * ds * q[rp + d];
          }
        }
      }
  return g;
}

// dq, dk and dv close with an absolute floor relative to the largest of the
// three: where one is exactly zero in exact arithmetic (a row whose only key
// is kept: P = 1, M dP' = D), its float value is rounding noise of terms the
// size of the others.
void check_gradients(const Backward& got, const Backward& want, double tol) {
  const std::array<std::pair<const Tensor*, const Tensor*>, 3> grads = {
      {{&got.dq, &want.dq}, {&got.dk, &want.dk}, {&got.dv, &want.dv}}};
  std::array<std::vector<double>, 3> wanted;  // each converted once: these hold millions of elements
  double peak = 1e-30;
  for (size_t i = 0; i < 3; ++i) {
    REQUIRE(grads[i].first->shape() == grads[i].second->shape());
    wanted[i] = grads[i].second->to_vector<double>();
    for (double x : wanted[i]) peak = std::max(peak, std::abs(x));
  }
  for (size_t i = 0; i < 3; ++i) check_close(grads[i].first->to_vector<double>(), wanted[i], tol * peak, tol);
}

// A CUDA case's inputs: q, k and v (B, N, H, D) of random values in `dtype`
// on the GPU, q64, k64 and v64 of the same (rounded) values in float64 on the
// CPU, for the reference. Callers bind its fields to references, not
// structured bindings, which lambdas cannot capture before Clang 16.
struct Qkv {
  Tensor q, k, v, q64, k64, v64;
};
// Three tensors of their own.
Qkv random_qkv(const Case& c, DType dtype, const Device& gpu) {
  Qkv in;
  for (auto [t, t64] : {std::pair{&in.q, &in.q64}, std::pair{&in.k, &in.k64}, std::pair{&in.v, &in.v64}}) {
    const Tensor x = random_tensor({c.B, c.N, c.H, c.D}).to(dtype);
    *t = x.to(gpu);
    *t64 = x.to(DType::Float64);
  }
  return in;
}

#if defined(MINIDL_WITH_CUDA)
// The CUDA backward of the forward `got` (q, k, v, grad_out and grad_lse on
// the GPU) against `want`, from the forward's keep bits if it kept any, and
// drawing the mask without them (as past their memory budget).
void check_cuda_backward_with_and_without_bits(const Tensor& q, const Tensor& k, const Tensor& v, const Forward& got,
                                               const Tensor& grad_out, const Tensor& grad_lse,
                                               const DilatedAttentionConfig& config, const Backward& want,
                                               double tol) {
  const Forward no_bits{got.out, got.lse, Tensor()};
  for (const Forward* f : {&got, &no_bits}) {
    if (f == &got && !got.dropout_bits.defined()) continue;  // the same run as the next
    CAPTURE(f->dropout_bits.defined());
    Backward gg = run_cuda_backward(q, k, v, *f, grad_out, grad_lse, config);
    check_gradients({gg.dq.to(Device::cpu()), gg.dk.to(Device::cpu()), gg.dv.to(Device::cpu())}, want, tol);
  }
}

// Strided views of one packed projection (B, N, 3, H, D).
Qkv packed_qkv(const Case& c, DType dtype, const Device& gpu) {
  Tensor qkv = random_tensor({c.B, c.N, 3, c.H, c.D}).to(dtype);
  Tensor qkv64 = qkv.to(DType::Float64), qkv_gpu = qkv.to(gpu);
  auto view = [](const Tensor& t, int64_t i) { return t.slice(2, i, i + 1).squeeze(2); };
  return {view(qkv_gpu, 0), view(qkv_gpu, 1), view(qkv_gpu, 2), view(qkv64, 0), view(qkv64, 1), view(qkv64, 2)};
}

// A CUDA case's float64 reference (q64, k64, v64 and grad_out64 in float64),
// computed once for every kernel version. The backward runs with the lse
// gradient (grad_lse[0], float32) and without one (grad_lse[1], undefined).
struct Reference {
  Forward f;
  std::array<Tensor, 2> grad_lse;
  std::array<Backward, 2> grads;
};
Reference reference_with_and_without_lse_grad(const Tensor& q64, const Tensor& k64, const Tensor& v64,
                                              const Tensor& grad_out64, const Tensor& grad_lse,
                                              const DilatedAttentionConfig& config) {
  Reference r{run_forward(cpu::dilated_attention_forward_reference, q64, k64, v64, config), {grad_lse, Tensor()}, {}};
  for (size_t i = 0; i < 2; ++i)
    r.grads[i] = run_backward(cpu::dilated_attention_backward_reference, q64, k64, v64, r.f, grad_out64,
                              r.grad_lse[i].defined() ? r.grad_lse[i].to(DType::Float64) : Tensor(), config);
  return r;
}
#endif

}  // namespace

TEST_CASE("dropout mask: 8-bit thresholds, 16 keys per Philox block, as core/dilated.h defines it") {
  // T8 = round(p 256) clamped to [1, 255]; 0 (no dropout) only for p = 0.
  const std::pair<double, uint32_t> thresholds[] = {{0.0, 0},    {1e-9, 1},    {0.001, 1},   {0.1, 26},
                                                    {0.2, 51},   {0.35, 90},   {0.5, 128},   {0.9, 230},
                                                    {0.998, 255}, {0.9999, 255}};
  for (auto [p, t8] : thresholds) {
    CAPTURE(p);
    const AttentionDropout d = make_attention_dropout(p, 1, 2);
    CHECK(d.threshold == t8);
    CHECK(d.enabled() == (p > 0));
    // Kept weights scale by 256 / (256 - T8): exact expectation for the rate T8 / 256.
    CHECK(d.scale == (t8 ? static_cast<float>(256.0 / (256 - t8)) : 1.f));
    CHECK(attention_dropout_threshold(p) == t8);
  }
  // The byte layout is a bijection, and matches the tensor-core register
  // layouts: lane l of a quad holds keys {2l, 2l+1, 2l+8, 2l+9} (word l, bytes
  // 0..3), lane 4i + c of the key-major backward keys {i, i+8} (word i/2).
  std::vector<int> seen(16, 0);
  for (uint64_t t = 0; t < 16; ++t) ++seen[static_cast<size_t>(byte_of_key(t))];
  CHECK(std::count(seen.begin(), seen.end(), 1) == 16);
  for (int l = 0; l < 4; ++l) {
    const int keys[4] = {2 * l, 2 * l + 1, 2 * l + 8, 2 * l + 9};
    for (int k = 0; k < 4; ++k) CHECK(byte_of_key(static_cast<uint64_t>(keys[k])) == 4 * l + k);
  }
  for (int i = 0; i < 8; ++i) {
    CHECK(byte_of_key(static_cast<uint64_t>(i)) / 4 == i / 2);
    CHECK(byte_of_key(static_cast<uint64_t>(i + 8)) / 4 == i / 2);
  }
  // keep_bytes (the kernels' four-at-once test) decides as attention_keep_byte,
  // for every threshold and byte value, in every byte, beside any neighbours.
  int64_t mismatches = 0;
  for (uint32_t t8 = 1; t8 < 256; ++t8) {
    const KeepBytesTest test = keep_bytes_test(t8);
    for (uint32_t v = 0; v < 256; ++v) {
      for (int b = 0; b < 4; ++b) {
        for (uint32_t other : {0u, 0xFFFFFFFFu, 0x7F807F80u, (v * 0x9E3779B9u) ^ (t8 << 11)}) {
          const uint32_t word = (other & ~(0xFFu << (8 * b))) | (v << (8 * b));
          const bool fast = keep_bytes_kept(keep_bytes(word, test), b);
          mismatches += fast != attention_keep_byte(word, b, t8);
        }
      }
    }
  }
  CHECK(mismatches == 0);
  // The header's helpers draw exactly the definition, for rows and keys that
  // use the high bits of the counter too.
  int64_t checked = 0, kept = 0;
  for (double p : {0.2, 0.5, 0.9}) {
    const AttentionDropout d = make_attention_dropout(p, 0x1234567890abcdefull, 77);
    for (uint64_t row : {uint64_t(0), uint64_t(1), uint64_t(999), uint64_t(123456789012)}) {
      for (uint64_t t0 : {uint64_t(0), uint64_t(4096), uint64_t(4294967232)}) {
        for (uint64_t t = t0; t < t0 + 64; ++t) {
          const bool want = keep_by_definition(d.seed, d.offset, d.threshold, row, t);
          CHECK(attention_keep(d, row, t) == want);
          CHECK(attention_keep_in_block(attention_dropout_block(d, row, t), t, d.threshold) == want);
          CHECK(((attention_keep_bits(attention_dropout_block(d, row, t), d.threshold) >> (t & 15)) & 1) ==
                static_cast<uint32_t>(want));
          ++checked;
          kept += want;
        }
      }
    }
    // The mask row: ((branch * B + b) * H + h) * N + pos.
    CHECK(attention_keep(d, 2, 3, 1, 5, 4, 100, 37, 19) ==
          keep_by_definition(d.seed, d.offset, d.threshold, ((2 * 3 + 1) * 5 + 4) * 100 + 37, 19));
    // A framed part (one head, rows at a stride): its branch 0, head 0,
    // position 6 is the whole problem's branch 2, head 4, position 19 + 6 * 3.
    AttentionDropout part = d;
    part.frame = {2, 100, 5, 4, 0, 19, 3};
    for (uint64_t t : {uint64_t(0), uint64_t(19), uint64_t(40)})
      CHECK(attention_keep(part, 0, 3, 1, 1, 0, 8, 6, t) == attention_keep(d, 2, 3, 1, 5, 4, 100, 37, t));
    const AttentionMaskLayout whole = attention_mask_layout(d, 2, 3, 5, 100);
    const AttentionMaskLayout framed = attention_mask_layout(part, 0, 3, 1, 8);
    CHECK(framed.rows(1, 0).at(6) == whole.rows(1, 4).at(37));
    // Rows of a framed part whose heads are the whole problem's: heads keep theirs.
    part.frame = {1, 100, 0, 0, 1, 40, 1};
    CHECK(attention_mask_layout(part, 1, 3, 5, 20).rows(2, 3).at(7) == whole.rows(2, 3).at(47));
    // A part of every second head from head 1 (a class h mod 2): its head 1 is head 3.
    part.frame = {2, 100, 5, 1, 2, 19, 3};
    CHECK(attention_mask_layout(part, 0, 3, 2, 8).rows(2, 1).at(6) == whole.rows(2, 3).at(37));
    // A part whose batches are the classes h mod 2 of 4 heads from position
    // 19 (class 1's positions from 20) and whose heads b * 2 + j run over the
    // whole problem's 3 batches: its batch 1, head 2 * 2 + 1 is batch 2's head
    // 1 + 1 * 2 = 3, its position 6 the whole's 20 + 6 * 2.
    part.frame = {2, 100, 4, 0, 2, 19, 2, 3, 1, 1};
    const AttentionMaskLayout whole4 = attention_mask_layout(d, 2, 3, 4, 100);
    CHECK(attention_mask_layout(part, 0, 2, 6, 8).rows(1, 5).at(6) == whole4.rows(2, 3).at(32));
    CHECK(attention_mask_layout(part, 0, 2, 6, 8).rows(0, 2).at(0) == whole4.rows(1, 0).at(19));
  }
  CHECK(kept > 0);
  CHECK(kept < checked);
}

namespace {

// Per-pair dropout (AttentionDropout::per_pair): nesting configs whose pairs
// have up to four copies, spans shorter than and across the fast path's
// tiles, and one that does not nest (per_pair changes nothing there).
std::vector<Case> per_pair_cases() {
  return with_non_causal({
      {"nested, three levels, partial segments", 1, 40, 4, 2, {8, 16, 32}, {1, 2, 4}},
      {"nested, out of order, w > N, every head class", 2, 20, 8, 2, {64, 4, 8}, {4, 1, 2}},
      {"nested, duplicate branches", 1, 8, 2, 2, {4, 4}, {1, 1}},
      {"nested, spans across tiles", 1, 150, 3, 4, {96, 192}, {1, 2}},
      {"not nested (w % r != 0)", 1, 12, 3, 2, {5, 7}, {3, 2}},
  });
}

}  // namespace

TEST_CASE("per-pair dropout: the copies of a pair share their owner's decision; without nesting nothing changes") {
  int nesting = 0;
  for (const Case& c : per_pair_cases()) {
    CAPTURE(str(c));
    DilatedAttentionConfig config = dropout_config(c, 0.35, 4242, 3);
    config.dropout.per_pair = true;
    CHECK(dropout_per_pair(config, c.N) == nests(c));
    const bool nested = nests(c);
    nesting += nested;
    // Owners as core/dilated.h finds them: the definition's.
    const std::vector<size_t> order = nesting_order(config.branches, c.N);
    const std::vector<std::vector<Pair>> pairs = pair_lists(c);
    int64_t shared = 0, wrong_owners = 0, split_copies = 0;
    for (int64_t h = 0; h < c.H; ++h)
      for (int64_t p = 0; p < c.N; ++p)
        for (const Pair& j : pairs[static_cast<size_t>(h * c.N + p)]) {
          const Pair want = owner_of(c, h, p, j.key);
          const PairOwner got = pair_owner(config.branches, order, c.N, h, p, j.key);
          wrong_owners += static_cast<int64_t>(got.branch) != want.branch || got.key_index != want.t;
          // Every copy of (p, key) takes one decision, in every batch.
          for (int64_t b = 0; b < c.B; ++b)
            for (const Pair& other : pairs[static_cast<size_t>(h * c.N + p)])
              if (other.key == j.key && other.branch != j.branch && nested) {
                ++shared;
                split_copies += mask_factor(c, config.dropout, b, h, p, j, true) !=
                                mask_factor(c, config.dropout, b, h, p, other, true);
              }
        }
    CHECK(wrong_owners == 0);
    CHECK(split_copies == 0);
    CHECK((shared > 0) == nested);
    // The reference: another function where pairs are shared, the same one, bit for bit, elsewhere.
    auto [q, k, v] = make_qkv(c, DType::Float64, Layout::Packed);
    DilatedAttentionConfig per_copy = config;
    per_copy.dropout.per_pair = false;
    const Forward a = run_forward(cpu::dilated_attention_forward_reference, q, k, v, config);
    const Forward b = run_forward(cpu::dilated_attention_forward_reference, q, k, v, per_copy);
    CHECK((a.out.to_vector<double>() != b.out.to_vector<double>()) == nested);
    CHECK(a.lse.to_vector<double>() == b.lse.to_vector<double>());
  }
  CHECK(nesting == 8);
  // Owners are the problem's own: a framed part of a larger problem is
  // refused unless it is given its shares (config.pairs), which the
  // reference, looking owners up, does not take.
  const Case c = per_pair_cases().front();
  DilatedAttentionConfig framed = dropout_config(c, 0.35, 4242, 3);
  framed.dropout.per_pair = true;
  framed.dropout.frame.position = 8;
  auto [q, k, v] = make_qkv(c, DType::Float64, Layout::Packed);
  CHECK_THROWS_WITH_AS(run_forward(cpu::dilated_attention_forward_reference, q, k, v, framed),
                       doctest::Contains("needs that problem's shares of its nested pairs"), Error);
  CHECK_THROWS_WITH_AS(run_forward(cpu::dilated_attention_forward, q, k, v, framed),
                       doctest::Contains("needs that problem's shares of its nested pairs"), Error);
  framed.pairs = nested_pairs(framed, c.N);
  CHECK_THROWS_WITH_AS(run_forward(cpu::dilated_attention_forward_reference, q, k, v, framed),
                       doctest::Contains("the reference finds owners itself"), Error);
}

TEST_CASE("dropout: reference forward and backward match the formulas; the backward is the gradient") {
  int64_t kept = 0, dropped = 0, rows_all_dropped = 0;
  std::vector<Case> cases = spec_cases();
  const size_t small = cases.size();  // finite differences on these only
  for (const Case& c : per_pair_cases()) cases.push_back(c);
  for (size_t ci = 0; ci < cases.size(); ++ci) for (bool per_pair : {false, true}) {
    const Case& c = cases[ci];
    CAPTURE(str(c));
    CAPTURE(per_pair);
    auto [q, k, v] = make_qkv(c, DType::Float64, Layout::Packed);
    DilatedAttentionConfig config = dropout_config(c, 0.35);
    config.dropout.per_pair = per_pair;
    const std::vector<std::vector<Pair>> pairs = pair_lists(c);
    std::vector<std::vector<double>> x = {q.to_vector<double>(), k.to_vector<double>(), v.to_vector<double>()};
    Dense want = brute_force_dropout(c, x[0], x[1], x[2], pairs, config.scale, config.dropout);
    Forward f = run_forward(cpu::dilated_attention_forward_reference, q, k, v, config);
    check_close(f.out, from_vector(want.out, q.shape()), 1e-12, 1e-12);
    check_lse(f.lse, from_vector(want.lse, f.lse.shape()), 1e-12);
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t p = 0; p < c.N; ++p) {
          const std::vector<Pair>& row = pairs[static_cast<size_t>(h * c.N + p)];
          int64_t row_kept = 0;
          for (const Pair& j : row) row_kept += mask_factor(c, config.dropout, b, h, p, j, nests(c)) != 0;
          kept += row_kept;
          dropped += static_cast<int64_t>(row.size()) - row_kept;
          rows_all_dropped += !row.empty() && row_kept == 0;
        }

    // Backward: the formulas, the reference, and finite differences of
    // F = sum(w_out * out) + sum over rows with pairs of w_lse * lse.
    Tensor w_out = random_tensor(q.shape()), w_lse = random_tensor({c.B, c.N, c.H});
    std::vector<double> wo = w_out.to_vector<double>(), wl = w_lse.to_vector<double>();
    Grads formulas = brute_force_dropout_backward(c, x[0], x[1], x[2], want, wo, wl, pairs,
                                                  config.scale, config.dropout);
    Backward g = run_backward(cpu::dilated_attention_backward_reference, q, k, v, f, w_out, w_lse, config);
    check_close(g.dq, from_vector(formulas.dq, q.shape()), 1e-12, 1e-11);
    check_close(g.dk, from_vector(formulas.dk, q.shape()), 1e-12, 1e-11);
    check_close(g.dv, from_vector(formulas.dv, q.shape()), 1e-12, 1e-11);
    auto objective = [&] {
      Dense d = brute_force_dropout(c, x[0], x[1], x[2], pairs, config.scale, config.dropout);
      double s = 0;
      for (size_t i = 0; i < wo.size(); ++i) s += wo[i] * d.out[i];
      for (size_t i = 0; i < wl.size(); ++i)
        if (std::isfinite(d.lse[i])) s += wl[i] * d.lse[i];
      return s;
    };
    if (ci >= small) continue;
    const std::vector<double>* analytic[3] = {&formulas.dq, &formulas.dk, &formulas.dv};
    for (int t = 0; t < 3; ++t) {
      std::vector<double> numeric = central_differences(x[t], objective);
      CAPTURE(t);
      check_close(from_vector(*analytic[t], q.shape()), from_vector(numeric, q.shape()), 1e-7, 1e-6);
    }
  }
  // The cases exercise both outcomes, and rows whose every weight is dropped
  // (out 0 with a finite lse).
  CHECK(kept > 0);
  CHECK(dropped > 0);
  CHECK(rows_all_dropped > 0);
}

TEST_CASE("dropout: the fast CPU path matches the reference, forward and backward") {
  std::vector<Case> cases = tiled_cases();
  for (const Case& c : per_pair_cases()) cases.push_back(c);
  for (DType dtype : {DType::Float64, DType::Float32, DType::BFloat16}) {
    const double tol = fast_path_tolerance(dtype);
    for (const Case& c : cases) for (bool per_pair : {false, true}) {
      CAPTURE(dtype);
      CAPTURE(str(c));
      CAPTURE(per_pair);
      auto [q, k, v] = make_qkv(c, dtype, Layout::Packed);
      DilatedAttentionConfig config = dropout_config(c, 0.2, 5, 123456789);
      config.dropout.per_pair = per_pair;
      Forward want = run_forward(cpu::dilated_attention_forward_reference, q, k, v, config);
      Forward got = run_forward(cpu::dilated_attention_forward, q, k, v, config);
      check_scaled(got.out, want.out, tol);
      check_lse(got.lse, want.lse, tol);
      Tensor grad_out = random_tensor({c.B, c.H, c.N, c.D}).to(dtype).permute({0, 2, 1, 3});
      Tensor grad_lse = random_tensor({c.B, c.N, c.H}).to(lse_dtype(dtype));
      for (const Tensor& gl : {grad_lse, Tensor()}) {
        CAPTURE(gl.defined());
        Backward gw = run_backward(cpu::dilated_attention_backward_reference, q, k, v, want, grad_out, gl, config);
        Backward gg = run_backward(cpu::dilated_attention_backward, q, k, v, want, grad_out, gl, config);
        check_gradients(gg, gw, tol);
      }
    }
  }
}

TEST_CASE("dropout: gradcheck (float64) of the op with the generator reset to one state per call") {
  std::vector<Case> cases = {
      {"dense", 1, 6, 2, 3, {6}, {1}},
      {"several branches, w > N, r > H", 2, 11, 3, 2, {4, 6, 20}, {1, 2, 4}},
      {"rows kept nowhere", 1, 9, 2, 2, {5}, {3}},
      // dropout_per_pair: nested branches, each shared pair dropped once.
      {"nested, per pair", 1, 12, 4, 2, {4, 8}, {1, 2}},
  };
  Generator gen;
  for (const Case& base : cases)
    for (bool causal : {true, false}) {
      Case c = base;
      c.causal = causal;
      const bool per_pair = c.name == "nested, per pair";
      CAPTURE(str(c));
      auto [q, k, v] = make_qkv(c, DType::Float64, Layout::Packed);
      q.requires_grad_(true);
      k.requires_grad_(true);
      v.requires_grad_(true);
      // The mask is a function of the generator state: fixed state, fixed function.
      auto attend = [&](const std::vector<Tensor>& x) {
        gen.set_state(4242, 17);
        return ops::dilated_attention(x[0], x[1], x[2], c.segments, c.dilations, c.causal, 0, 0.4, &gen, per_pair);
      };
      Tensor nowhere;
      {
        NoGradGuard no_grad;
        auto [out, lse] = attend({q, k, v});
        CHECK(gen.offset() == 18);  // one offset reserved per call
        nowhere = ops::eq(lse, ops::full({}, -kInf, {DType::Float64}));
        // Dropout is on: the output differs from the op without it, lse does not.
        auto [plain_out, plain_lse] = ops::dilated_attention(q, k, v, c.segments, c.dilations, c.causal);
        CHECK(out.to_vector<double>() != plain_out.to_vector<double>());
        check_lse(lse, plain_lse, 1e-14);
        CHECK(attend({q, k, v}).first.to_vector<double>() == out.to_vector<double>());
        // The op's mask is the definition's: the reference's for the state it reserved.
        DilatedAttentionConfig config = dropout_config(c, 0.4, 4242, 17);
        config.dropout.per_pair = per_pair;
        check_close(out, run_forward(cpu::dilated_attention_forward_reference, q.detach(), k.detach(), v.detach(),
                                     config).out, 1e-12, 1e-12);
      }
      Tensor w_lse = random_tensor({c.B, c.N, c.H});
      CHECK(gradcheck(
          [&](const std::vector<Tensor>& x) {
            auto [out, lse] = attend(x);
            return ops::add(ops::sum(ops::mul(out, out)),
                            ops::sum(ops::mul(ops::masked_fill(lse, nowhere, 0.0), w_lse)));
          },
          {q, k, v}));
    }
  // ops::attention takes the same dropout.
  Case d{"dense", 2, 7, 2, 3, {7}, {1}};
  auto [q, k, v] = make_qkv(d, DType::Float64, Layout::HeadMajor);
  q.requires_grad_(true);
  k.requires_grad_(true);
  v.requires_grad_(true);
  auto attend = [&](const std::vector<Tensor>& x) {
    gen.set_state(3, 0);
    return ops::attention(x[0], x[1], x[2], true, 0, 0.5, &gen);
  };
  CHECK(gradcheck(attend, {q, k, v}));
  {
    NoGradGuard no_grad;
    gen.set_state(3, 0);
    Tensor want = ops::dilated_attention(q, k, v, {7}, {1}, true, 0, 0.5, &gen).first;
    CHECK(attend({q, k, v}).to_vector<double>() == want.to_vector<double>());
  }
}

TEST_CASE("dropout: the kept fraction is 1 - T8/256, and the kernels keep exactly attention_keep's elements") {
  // q = 0 makes every weight 1/n_p for a row with n_p pairs, and v = 1 (D = 1)
  // makes out_p = scale * kept_p / n_p: the kernel's kept count, read back exactly.
  Case c{"two branches", 2, 500, 4, 1, {500, 200}, {1, 3}};
  const std::vector<std::vector<Pair>> pairs = pair_lists(c);
  Tensor q = ops::zeros({c.B, c.N, c.H, c.D}, {DType::Float64});
  Tensor v = ops::ones({c.B, c.N, c.H, c.D}, {DType::Float64});
  Generator gen(2026);
  for (double p : {0.1, 0.5, 0.9}) {
    CAPTURE(p);
    gen.set_state(2026, 40);
    std::vector<double> out = ops::dilated_attention(q, q, v, c.segments, c.dilations, true, 0, p, &gen)
                                  .first.to_vector<double>();
    const AttentionDropout drop = dropout_of(p, 2026, 40);
    int64_t total = 0, kept = 0, mismatches = 0;
    for (int64_t b = 0; b < c.B; ++b)
      for (int64_t h = 0; h < c.H; ++h)
        for (int64_t pos = 0; pos < c.N; ++pos) {
          const std::vector<Pair>& row = pairs[static_cast<size_t>(h * c.N + pos)];
          int64_t want = 0;
          for (const Pair& j : row) want += mask_factor(c, drop, b, h, pos, j) != 0;
          const double got = out[static_cast<size_t>((b * c.N + pos) * c.H + h)] *
                             static_cast<double>(row.size()) / drop.scale;
          mismatches += std::abs(got - static_cast<double>(want)) > 1e-6;
          total += static_cast<int64_t>(row.size());
          kept += want;
        }
    CHECK(mismatches == 0);
    const double fraction = static_cast<double>(kept) / static_cast<double>(total);
    const double rate = drop.threshold / 256.0;  // the effective drop rate T8 / 256
    MESSAGE("p = ", p, " (T8 / 256 = ", rate, "): kept ", kept, " of ", total, " (", fraction, ")");
    CHECK(total > 500000);
    CHECK(std::abs(fraction - (1 - rate)) < 0.005);  // ~7 standard deviations
    CHECK(std::abs(rate - p) <= 1.0 / 512);
  }
}

namespace {

// Reads a kernel's dropout mask back exactly, forward and backward, for one
// branch (mask branch 0). With q = k = 0 every weight of row p is 1/n_p (n_p:
// the keys it sees). v_j = e_{t_j} (one-hot at the key's index among its
// segment's kept rows; D must cover them) makes out_p[t] = M_pt / n_p, and
// dO_p = e_{t_p} makes dV_j[t_p] = M_pj / n_p: nonzero exactly where
// attention_keep keeps, and zero for pairs p does not see.
struct MaskReadback {
  int64_t wrong_out = 0, wrong_dv = 0, kept = 0, pairs = 0;
};

// fwd(q, k, v, config) -> Forward, bwd(q, k, v, forward, grad_out, grad_lse, config) -> Backward.
template <class Fwd, class Bwd>
MaskReadback mask_readback(const Case& c, DType dtype, Device device, Fwd fwd, Bwd bwd, const AttentionDropout& drop) {
  REQUIRE(c.segments.size() == 1);
  const int64_t B = c.B, N = c.N, H = c.H, D = c.D, w = std::min(c.segments[0], c.N), r = c.dilations[0];
  REQUIRE((w + r - 1) / r <= D);
  auto at = [&](int64_t b, int64_t pos, int64_t h) { return static_cast<size_t>(((b * N + pos) * H + h) * D); };
  // index[pos * H + h]: the position's index among its segment's kept rows for head h, -1 if not kept.
  std::vector<int64_t> index(static_cast<size_t>(N * H), -1);
  std::vector<double> onehot(static_cast<size_t>(B * N * H * D), 0.0);
  for (int64_t pos = 0; pos < N; ++pos)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t local = pos % w;
      if (local % r != h % r) continue;
      index[static_cast<size_t>(pos * H + h)] = (local - h % r) / r;
      for (int64_t b = 0; b < B; ++b) onehot[at(b, pos, h) + static_cast<size_t>((local - h % r) / r)] = 1.0;
    }
  DilatedAttentionConfig config = kernel_config(c);
  config.dropout = drop;
  const TensorOptions options{dtype, device, false};
  Tensor zeros = ops::zeros({B, N, H, D}, options);
  Tensor v = from_vector(onehot, {B, N, H, D}).to(dtype).to(device);
  Forward f = fwd(zeros, zeros, v, config);
  Backward g = bwd(zeros, zeros, v, f, v, Tensor(), config);
  const std::vector<double> out = f.out.to_vector<double>(), dv = g.dv.to_vector<double>();
  MaskReadback m;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h)
      for (int64_t pos = 0; pos < N; ++pos) {
        const int64_t tp = index[static_cast<size_t>(pos * H + h)];
        if (tp < 0) continue;
        const KeptRows seg = kept_rows(N, w, r, h, pos / w);
        const int64_t seen = c.causal ? tp + 1 : seg.count;
        for (int64_t t = 0; t < D; ++t) {
          const double got_out = out[at(b, pos, h) + static_cast<size_t>(t)];
          if (t >= seen) {  // keys p does not see: no weight at all
            m.wrong_out += got_out != 0;
            continue;
          }
          const bool keep = attention_keep(drop, 0, B, b, H, h, N, pos, t);
          const double want = keep ? drop.scale / static_cast<double>(seen) : 0.0;
          const double got_dv = dv[at(b, seg.base + t * seg.stride, h) + static_cast<size_t>(tp)];
          m.wrong_out += std::abs(got_out - want) > 1e-2 * want || (got_out != 0) != keep;
          m.wrong_dv += std::abs(got_dv - want) > 1e-2 * want || (got_dv != 0) != keep;
          m.kept += keep;
          ++m.pairs;
        }
      }
  return m;
}

// Single-branch problems whose segments cross the kernels' 16-key groups and
// 64-row tiles (one-hot values need D >= kept rows per segment).
std::vector<Case> readback_cases() {
  std::vector<Case> base = {
      {"dense segments", 2, 256, 4, 64, {64}, {1}},
      {"dilated, partial last segment", 1, 300, 3, 64, {128}, {2}},
      {"two 64-row tiles", 1, 256, 2, 128, {256}, {2}},
      {"D = 32", 1, 100, 2, 32, {32}, {1}},
      // 2048 work items: each persistent ws block takes several, with dropout (the rings across items).
      {"several items per block", 2, 8192, 8, 64, {64}, {1}},
  };
  return with_non_causal(base);
}

void check_readback(const MaskReadback& m) {
  CHECK(m.wrong_out == 0);
  CHECK(m.wrong_dv == 0);
  CHECK(m.kept > 0);
  CHECK(m.kept < m.pairs);
}

}  // namespace

TEST_CASE("dropout: the CPU kernels' masks read back exactly, forward and backward") {
  const AttentionDropout drop = dropout_of(0.3, 8080, 3);
  for (const Case& c : readback_cases()) {
    CAPTURE(str(c));
    auto with = [](ForwardFn fwd, BackwardFn bwd) {
      return std::pair{[fwd](const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionConfig& config) {
                         return run_forward(fwd, q, k, v, config);
                       },
                       [bwd](const Tensor& q, const Tensor& k, const Tensor& v, const Forward& f, const Tensor& grad_out,
                             const Tensor& grad_lse, const DilatedAttentionConfig& config) {
                         return run_backward(bwd, q, k, v, f, grad_out, grad_lse, config);
                       }};
    };
    const auto reference = with(cpu::dilated_attention_forward_reference, cpu::dilated_attention_backward_reference);
    const auto fast = with(cpu::dilated_attention_forward, cpu::dilated_attention_backward);
    check_readback(mask_readback(c, DType::Float64, Device::cpu(), reference.first, reference.second, drop));
    check_readback(mask_readback(c, DType::Float32, Device::cpu(), fast.first, fast.second, drop));
  }
}

TEST_CASE("dropout 0 is the op without dropout, bit for bit, and reserves no generator offset") {
  Case c{"several", 2, 70, 4, 12, {16, 32, 128}, {1, 2, 4}};
  for (DType dtype : {DType::Float64, DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    auto [q0, k0, v0] = make_qkv(c, dtype, Layout::Packed);
    auto run = [&](bool explicit_zero, Generator* gen) {
      Tensor q = q0.detach().requires_grad_(true), k = k0.detach().requires_grad_(true),
             v = v0.detach().requires_grad_(true);
      auto [out, lse] = explicit_zero
                            ? ops::dilated_attention(q, k, v, c.segments, c.dilations, true, 0, 0.0, gen)
                            : ops::dilated_attention(q, k, v, c.segments, c.dilations);
      ops::add(ops::sum(ops::mul(out, out)).to(lse.dtype()), ops::sum(ops::mul(lse, lse))).backward();
      return std::vector<std::vector<double>>{out.to_vector<double>(), lse.to_vector<double>(),
                                              q.grad().to_vector<double>(), k.grad().to_vector<double>(),
                                              v.grad().to_vector<double>()};
    };
    Generator gen(5);
    const uint64_t default_offset = default_generator().offset();
    CHECK(run(true, &gen) == run(false, nullptr));
    CHECK(run(true, nullptr) == run(false, nullptr));
    CHECK(gen.offset() == 0);
    CHECK(default_generator().offset() == default_offset);
    // dropout > 0 without a generator draws from the default one.
    NoGradGuard no_grad;
    ops::dilated_attention(q0, k0, v0, c.segments, c.dilations, true, 0, 0.1);
    CHECK(default_generator().offset() == default_offset + 1);
  }
}

TEST_CASE("dropout: errors name the op and the bad value") {
  Tensor q = random_tensor({1, 8, 2, 4});
  for (double p : {-0.1, 1.0, 2.0, kNaN}) {
    CAPTURE(p);
    CHECK_THROWS_WITH_AS(ops::dilated_attention(q, q, q, {4}, {1}, true, 0, p),
                         doctest::Contains("dilated_attention: dropout must be in [0, 1), got "), Error);
    CHECK_THROWS_WITH_AS(ops::attention(q, q, q, true, 0, p),
                         doctest::Contains("attention: dropout must be in [0, 1), got "), Error);
  }
  CHECK_THROWS_WITH_AS(ops::attention(q, q, q, true, 0, 1.0),
                       doctest::Contains("dropout must be in [0, 1), got 1"), Error);
  // The mask's Philox counter holds a row in 32 bits: 2^32 rows (one branch,
  // B 2^16, N 2^16, H 1; an expanded view, nothing allocated) are refused.
  Tensor big = random_tensor({1, 1, 1, 4}).expand({int64_t(1) << 16, int64_t(1) << 16, 1, 4});
  CHECK_THROWS_WITH_AS(ops::dilated_attention(big, big, big, {64}, {1}, true, 0, 0.1),
                       doctest::Contains("in 32 bits"), Error);
}

TEST_CASE("a head dim of 1 takes any stride there, forward and backward") {
  // (B, N, 1, H) transposed: D = 1 with stride H; still "contiguous" as far
  // as strides go, so the op hands it to the kernels as it is.
  Tensor q0 = random_tensor({2, 5, 1, 3});
  Tensor q = q0.transpose(2, 3);
  q.requires_grad_(true);
  Tensor out = ops::attention(q, q, q);
  Tensor want = ops::attention(ops::contiguous(q0.transpose(2, 3)), ops::contiguous(q0.transpose(2, 3)),
                               ops::contiguous(q0.transpose(2, 3)));
  CHECK(out.to_vector<double>() == want.to_vector<double>());
  Tensor w = random_tensor({2, 5, 1, 3});
  ops::sum(ops::mul(out.transpose(2, 3), w)).backward();  // grad_out arrives with D's stride 3
  CHECK(q.grad().defined());
}

TEST_CASE("a dilation past the segment and the head count keeps what r = max(w, H) keeps, up to INT64_MAX") {
  // Head h keeps position h of each segment (h < w) for any r >= max(w, H):
  // the kept-row count must not overflow computing that.
  Tensor q = random_tensor({1, 16, 2, 4}), k = random_tensor({1, 16, 2, 4}), v = random_tensor({1, 16, 2, 4});
  auto [want_out, want_lse] = ops::dilated_attention(q, k, v, {8}, {8});
  for (int64_t r : {std::numeric_limits<int64_t>::max(), std::numeric_limits<int64_t>::max() - 3, int64_t(1) << 62}) {
    CAPTURE(r);
    auto [out, lse] = ops::dilated_attention(q, k, v, {8}, {r});
    CHECK(out.to_vector<double>() == want_out.to_vector<double>());
    CHECK(lse.to_vector<double>() == want_lse.to_vector<double>());
    DilatedAttentionConfig config;
    config.branches = {{8, r}};
    config.scale = 0.5;
    Forward ref = run_forward(cpu::dilated_attention_forward_reference, q, k, v, config);
    config.branches = {{8, 8}};
    Forward ref8 = run_forward(cpu::dilated_attention_forward_reference, q, k, v, config);
    CHECK(ref.out.to_vector<double>() == ref8.out.to_vector<double>());
    CHECK(ref.lse.to_vector<double>() == ref8.lse.to_vector<double>());
  }
}

// ---------------------------------------------------------------------------
// Errors.

TEST_CASE("dilated_attention errors name the bad value") {
  Tensor q = random_tensor({1, 8, 2, 4});
  auto attend = [&](const std::vector<int64_t>& w, const std::vector<int64_t>& r) {
    return ops::dilated_attention(q, q, q, w, r);
  };
  CHECK_THROWS_WITH_AS(attend({}, {}), doctest::Contains("dilated_attention: segments is empty"), Error);
  CHECK_THROWS_WITH_AS(attend({4, 8}, {1}), doctest::Contains("segments has 2 entries but dilations has 1"), Error);
  CHECK_THROWS_WITH_AS(attend({4, 0}, {1, 1}), doctest::Contains("segment length must be >= 1, got 0 (branch 1)"), Error);
  CHECK_THROWS_WITH_AS(attend({4, -3}, {1, 1}), doctest::Contains("got -3"), Error);
  CHECK_THROWS_WITH_AS(attend({4}, {0}), doctest::Contains("dilation must be >= 1, got 0 (branch 0)"), Error);
  CHECK_THROWS_WITH_AS(ops::dilated_attention(q, q, q, {4}, {1}, true, kNaN),
                       doctest::Contains("scale must be finite"), Error);

  Tensor q3 = random_tensor({8, 2, 4});
  CHECK_THROWS_WITH_AS(ops::dilated_attention(q3, q3, q3, {4}, {1}),
                       doctest::Contains("q must be 4-D (B, N, H, D), got float64 [8, 2, 4]"), Error);
  Tensor other = random_tensor({1, 8, 2, 5});
  CHECK_THROWS_WITH_AS(ops::dilated_attention(q, other, q, {4}, {1}),
                       doctest::Contains("k must have q's shape [1, 8, 2, 4], got float64 [1, 8, 2, 5]"), Error);
  CHECK_THROWS_WITH_AS(ops::dilated_attention(q, q, other, {4}, {1}), doctest::Contains("v must have q's shape"), Error);
  Tensor q32 = q.to(DType::Float32);
  CHECK_THROWS_WITH_AS(ops::dilated_attention(q, q32, q, {4}, {1}), doctest::Contains("dtype mismatch"), Error);
  Tensor qi = ops::zeros({1, 8, 2, 4}, {DType::Int32});
  CHECK_THROWS_WITH_AS(ops::dilated_attention(qi, qi, qi, {4}, {1}), doctest::Contains("unsupported dtype int32"), Error);
  CHECK_THROWS_WITH_AS(ops::dilated_attention(Tensor(), q, q, {4}, {1}),
                       doctest::Contains("q is an undefined tensor"), Error);
  Tensor q0 = random_tensor({1, 8, 2, 0});
  CHECK_THROWS_WITH_AS(ops::dilated_attention(q0, q0, q0, {4}, {1}), doctest::Contains("head dim D must be >= 1"), Error);
  CHECK_THROWS_WITH_AS(ops::attention(q3, q3, q3), doctest::Contains("attention: q must be 4-D"), Error);

  // The kernel entry points check their layout contract too.
  Tensor out = Tensor::empty(q.shape(), q.options());
  Tensor lse32 = Tensor::empty({1, 8, 2}, {DType::Float32});
  CHECK_THROWS_WITH_AS(cpu::dilated_attention_forward(q, q, q, kernel_config({"", 1, 8, 2, 4, {4}, {1}}), out, lse32),
                       doctest::Contains("lse must be a contiguous float64 (B, N, H) tensor"), Error);
}

TEST_CASE("dilated_attention: empty sequence gives empty outputs") {
  Tensor q = random_tensor({2, 0, 3, 4}, {DType::Float64, Device::cpu(), true});
  auto [out, lse] = ops::dilated_attention(q, q, q, {4}, {2});
  CHECK(out.shape() == Shape{2, 0, 3, 4});
  CHECK(lse.shape() == Shape{2, 0, 3});
}

// ---------------------------------------------------------------------------
// CUDA against the float64 CPU reference (run on the H100 by the lead).

namespace {

[[maybe_unused]] std::vector<Case> cuda_cases() {
  // LongNet's language-model branches (w = 2048 ... 32768, r = 1, 2, 4, 6, 12)
  // with every w divided by 64; N = 700 leaves the last segment of every
  // branch partial and the w = 512 branch has one full and one partial segment.
  const std::vector<int64_t> longnet_w = {32, 64, 128, 256, 512}, longnet_r = {1, 2, 4, 6, 12};
  return {
      {"dense", 2, 300, 4, 32, {300}, {1}, true},
      {"dense", 2, 300, 4, 32, {300}, {1}, false},
      {"dense", 1, 257, 3, 64, {257}, {1}, true},
      {"dense", 1, 257, 3, 128, {257}, {1}, false},
      {"dense", 1, 200, 2, 128, {200}, {1}, true},
      // D = 128 on the ws backward: several key blocks and query tiles, a partial last one, B = 2
      {"dense", 2, 520, 2, 128, {520}, {1}, true},
      {"LongNet set / 64 (H = 8: r = 12 > H, H not a multiple of 6)", 1, 700, 8, 64, longnet_w, longnet_r, true},
      {"LongNet set / 64 (H = 12)", 1, 700, 12, 32, longnet_w, longnet_r, true},
      {"LongNet set / 64", 1, 700, 4, 128, longnet_w, longnet_r, true},
      {"LongNet set / 64", 1, 700, 8, 64, longnet_w, longnet_r, false},
      {"N not a multiple of any w", 2, 333, 4, 64, {40, 100}, {1, 3}, true},
      {"r > H (rows kept nowhere)", 1, 200, 2, 64, {64, 96}, {3, 5}, true},
      {"H not a multiple of r, w not a multiple of r", 1, 250, 3, 32, {50, 128}, {2, 3}, true},
      {"w > N", 2, 90, 4, 64, {4096, 32}, {2, 1}, false},
      // The ws kernels run the dilation-1 branch last, finishing every row;
      // the others' rows are not nested (w % r != 0, r 3 and 4).
      {"dilation 1 listed between others", 2, 300, 4, 64, {50, 300, 96}, {3, 1, 4}, true},
      // Many merges before the finishing branch.
      {"9 branches", 1, 130, 2, 64, {16, 24, 32, 40, 48, 56, 64, 72, 130}, {2, 3, 4, 5, 6, 7, 8, 9, 1}, true},
      // charlm's --dp test model (B = 4: tail rows of r = 3 in a later batch
      // than any case above); that run disagreed with one rank on the H200.
      {"B = 4, segments 6, 5, 16, r 1, 3, 2", 4, 16, 2, 32, {6, 5, 16}, {1, 3, 2}, true},
      // Nested branches: the ws kernels compute each shared pair once
      // (nested_pairs; a CPU case checks that they qualify), spans of 128
      // kept rows; the second listed out of order, its largest segment
      // clamped to N (which 1024 does not divide), B = 2.
      {"nested, LongNet's doubling / 8", 1, 1100, 8, 64, {256, 512, 1024}, {1, 2, 4}, true},
      {"nested, r up to 8, out of order, w > N", 2, 1300, 8, 128, {2048, 256, 1024, 512}, {8, 1, 4, 2}, true},
      {"nested, LongNet's doubling / 8", 1, 1100, 8, 64, {256, 512, 1024}, {1, 2, 4}, false},
      {"nested, r up to 8, out of order, w > N", 1, 1300, 8, 128, {2048, 256, 1024, 512}, {8, 1, 4, 2}, false},
      // Three spans a segment: a middle span has spans on both sides.
      {"nested, three spans a segment", 1, 1700, 8, 128, {256, 768}, {1, 2}, true},
      {"nested, three spans a segment", 1, 1700, 8, 128, {256, 768}, {1, 2}, false},
      // head dims the tensor-core path does not take (padded SIMT kernels)
      {"D = 8", 2, 150, 4, 8, {64, 150}, {1, 2}, true},
      {"D = 48", 1, 200, 4, 48, {200}, {1}, true},
      {"D = 96", 1, 130, 2, 96, {64, 128}, {1, 2}, false},
  };
}

// float32 on the tensor cores (sm_80+) rounds the operands of every product,
// P and dS included, to TF32 (10-bit mantissa) as float32 matmuls do: a
// simulation of exactly those roundings on these shapes (uniform [-1, 1]
// inputs, causal or not, D 32-128, with and without dropout) stays below
// 7e-4 in check_scaled's and check_gradients' metric; 3e-3 is 6 TF32 ulps.
// The SIMT kernels compute in fp32. The kernel is the one
// MINIDL_ATTENTION_KERNEL selects now (for_each_kernel sets it).
[[maybe_unused]] double cuda_tolerance(DType dtype, [[maybe_unused]] int64_t d = 64,
                                       [[maybe_unused]] bool dropout = false) {
  if (dtype == DType::BFloat16) return 2e-2;
#if defined(MINIDL_WITH_CUDA)
  for (auto pass : {cuda::AttentionPass::kForward, cuda::AttentionPass::kBackward})
    if (cuda::choose_attention_kernel(dtype, d, pass) != cuda::AttentionKernel::kSimt) return 3e-3;
#endif
  return 2e-3;
}

}  // namespace

// The ws kernels take a nested plan whose spans are whole 128-row tiles
// (ws_nested_pairs), without per-pair dropout only where its finishing branch
// (the first dilation-1 branch listed) computes all its pairs (ws_plan_pairs):
// the CUDA cases named "nested" must have one, or they would test the
// per-branch path twice.
TEST_CASE("nested branches: the CUDA cases named so have a plan the ws kernels take") {
  int nested = 0;
  for (const Case& c : cuda_cases()) {
    if (c.name.rfind("nested", 0) != 0) continue;
    CAPTURE(str(c));
    ++nested;
    const std::vector<BranchPairs> plan = nested_pairs(kernel_config(c), c.N);
    REQUIRE(plan.size() == c.segments.size());
    for (const BranchPairs& p : plan) CHECK(p.span % 128 == 0);
    const auto finishing = std::find(c.dilations.begin(), c.dilations.end(), 1);
    REQUIRE(finishing != c.dilations.end());
    CHECK(plan[static_cast<size_t>(finishing - c.dilations.begin())].span == 0);
  }
  CHECK(nested == 6);
}

TEST_CASE("CUDA dilated attention forward and backward match the float64 CPU reference") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (const Case& c : cuda_cases()) {
      CAPTURE(dtype);
      CAPTURE(str(c));
      const double tol = cuda_tolerance(dtype, c.D);
      const Qkv in = packed_qkv(c, dtype, gpu);
      const Tensor &q = in.q, &k = in.k, &v = in.v, &q64 = in.q64, &k64 = in.k64, &v64 = in.v64;
      const DilatedAttentionConfig config = kernel_config(c);
      Tensor grad_out = random_tensor(q.shape()).to(dtype);
      const Reference want = reference_with_and_without_lse_grad(
          q64, k64, v64, grad_out.to(DType::Float64), random_tensor({c.B, c.N, c.H}).to(DType::Float32), config);
      const Tensor grad_out_gpu = grad_out.to(gpu);
      const std::array<Tensor, 2> grad_lse_gpu = {want.grad_lse[0].to(gpu), Tensor()};  // [1] undefined, as in want
      for_each_kernel(dtype, c.D, [&] {
        Forward got = run_forward(cuda::dilated_attention_forward, q, k, v, config);
        CHECK(got.lse.dtype() == DType::Float32);
        check_scaled(got.out.to(Device::cpu()), want.f.out, tol);
        check_lse(got.lse.to(Device::cpu()), want.f.lse, tol);
        for (size_t i = 0; i < 2; ++i) {
          CAPTURE(want.grad_lse[i].defined());
          Backward gg = run_backward(cuda::dilated_attention_backward, q, k, v, got, grad_out_gpu, grad_lse_gpu[i],
                                     config);
          check_scaled(gg.dq.to(Device::cpu()), want.grads[i].dq, tol);
          check_scaled(gg.dk.to(Device::cpu()), want.grads[i].dk, tol);
          check_scaled(gg.dv.to(Device::cpu()), want.grads[i].dv, tol);
        }
      });
    }
  }
#endif
}

// The ws kernels are persistent: a block takes work items until none are
// left, and only problems with more items than the GPU has SMs give a block a
// second one (buffers and rings that run on across items, the next item's
// loads under this one). cuda_cases() are too small for that: these are not.
// B N % r != 0 puts a tail tile (past the tensor maps) at the end of items.
TEST_CASE("CUDA ws kernels: blocks that take several work items match the float64 CPU reference") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  const ScopedEnv env("MINIDL_ATTENTION_KERNEL", "ws");
  const std::vector<Case> cases = {
      {"several items per block", 2, 4097, 8, 64, {512, 1536}, {1, 3}, true},
      {"several items per block, D = 128", 2, 2049, 8, 128, {512}, {1}, true},
      // Not causal: each key block starts at its own query tile and wraps
      // around (bwd_tile), past a partial last tile, and (r = 3, B N % 3 != 0)
      // past a tail tile beyond the tensor maps.
      {"several items per block", 2, 2049, 8, 64, {2049}, {1}, false},
      {"several items per block, D = 128", 2, 1025, 8, 128, {1025}, {1}, false},
      {"several items per block", 2, 4097, 8, 64, {512, 1536}, {1, 3}, false},
      {"nested branches, several items per block", 2, 4100, 8, 64, {512, 1024, 2048, 4096}, {1, 2, 4, 8}, true},
      {"nested branches, several items per block", 2, 4100, 8, 64, {512, 1024, 2048, 4096}, {1, 2, 4, 8}, false},
      {"nested branches, three spans a segment, several items per block", 2, 4100, 8, 64, {512, 1536}, {1, 2}, true},
      {"nested branches, three spans a segment, several items per block", 2, 4100, 8, 64, {512, 1536}, {1, 2}, false},
  };
  for (const Case& c : cases) {
    CAPTURE(str(c));
    const double tol = cuda_tolerance(DType::BFloat16, c.D);
    const Qkv in = random_qkv(c, DType::BFloat16, gpu);
    const DilatedAttentionConfig config = kernel_config(c);
    if (c.name.rfind("nested", 0) == 0) REQUIRE(!nested_pairs(config, c.N).empty());
    Forward want = run_forward(cpu::dilated_attention_forward_reference, in.q64, in.k64, in.v64, config);
    Forward got = run_forward(cuda::dilated_attention_forward, in.q, in.k, in.v, config);
    check_scaled(got.out.to(Device::cpu()), want.out, tol);
    check_lse(got.lse.to(Device::cpu()), want.lse, tol);
    Tensor grad_out = random_tensor(in.q.shape()).to(DType::BFloat16);
    Backward gw = run_backward(cpu::dilated_attention_backward_reference, in.q64, in.k64, in.v64, want,
                               grad_out.to(DType::Float64), Tensor(), config);
    Backward gg = run_backward(cuda::dilated_attention_backward, in.q, in.k, in.v, got, grad_out.to(gpu), Tensor(),
                               config);
    check_scaled(gg.dq.to(Device::cpu()), gw.dq, tol);
    check_scaled(gg.dk.to(Device::cpu()), gw.dk, tol);
    check_scaled(gg.dv.to(Device::cpu()), gw.dv, tol);
  }
#endif
}

TEST_CASE("CUDA dilated_attention op: autograd gradients match the CPU reference") {
  MINIDL_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  Case c{"LongNet set / 64", 2, 700, 6, 64, {32, 64, 128, 256, 512}, {1, 2, 4, 6, 12}};
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    const double tol = cuda_tolerance(dtype, c.D);
    Qkv in = random_qkv(c, dtype, gpu);
    const Tensor &q = in.q.requires_grad_(true), &k = in.k.requires_grad_(true), &v = in.v.requires_grad_(true);
    Tensor seed_out = random_tensor(q.shape()).to(dtype), seed_lse = random_tensor({c.B, c.N, c.H}).to(DType::Float32);
    auto [out, lse] = ops::dilated_attention(q, k, v, c.segments, c.dilations);
    CHECK(lse.dtype() == DType::Float32);
    Tensor lse_finite = ops::masked_fill(lse, ops::eq(lse, ops::full({}, -kInf, {DType::Float32, gpu})), 0.0);
    ops::add(ops::sum(ops::mul(out, seed_out.to(gpu))).to(DType::Float32),
             ops::sum(ops::mul(lse_finite, seed_lse.to(gpu))))
        .backward();
    DilatedAttentionConfig config = kernel_config(c);
    Forward f = run_forward(cpu::dilated_attention_forward_reference, in.q64, in.k64, in.v64, config);
    Backward g = run_backward(cpu::dilated_attention_backward_reference, in.q64, in.k64, in.v64, f,
                              seed_out.to(DType::Float64), seed_lse.to(DType::Float64), config);
    check_scaled(out.to(Device::cpu()), f.out, tol);
    check_scaled(q.grad().to(Device::cpu()), g.dq, tol);
    check_scaled(k.grad().to(Device::cpu()), g.dk, tol);
    check_scaled(v.grad().to(Device::cpu()), g.dv, tol);
  }
  // Vanilla attention runs the same kernels on the GPU.
  Case d{"dense", 1, 128, 2, 64, {128}, {1}};
  Tensor x = random_tensor({d.B, d.N, d.H, d.D}).to(DType::Float32);
  Forward want = run_forward(cpu::dilated_attention_forward_reference, x.to(DType::Float64), x.to(DType::Float64),
                             x.to(DType::Float64), kernel_config(d));
  Tensor xg = x.to(gpu);
  check_scaled(ops::attention(xg, xg, xg).to(Device::cpu()), want.out, cuda_tolerance(DType::Float32, d.D));
}

TEST_CASE("CUDA attention on the parts of one fused projection: gradients in one buffer, split takes it whole") {
  // q, k, v split from one (B, N, 3C) projection: in bf16 the backward writes
  // their gradients into one packed buffer, which split's backward returns
  // without concatenating (float32 keeps separate ones). Same values as for
  // separate q, k, v: dK and dV to the bit, dQ to its reductions' order.
  MINIDL_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  const int64_t B = 2, N = 300, H = 4, D = 64, C = H * D;
  struct Config {
    std::vector<int64_t> segments, dilations;
    double dropout;
  };
  for (const Config& cfg : {Config{{N}, {1}, 0.0}, Config{{N}, {1}, 0.2}, Config{{64, 128}, {1, 2}, 0.0}})
    for (DType dtype : {DType::BFloat16, DType::Float32}) {
      CAPTURE(dtype);
      CAPTURE(cfg.segments.size());
      CAPTURE(cfg.dropout);
      Tensor x0 = random_tensor({B, N, 3 * C}).to(dtype).to(gpu), seed = random_tensor({B, N, H, D}).to(dtype).to(gpu);
      auto run = [&](bool fused) {
        Tensor x = x0.detach().clone().requires_grad_(true);
        std::vector<Tensor> parts = ops::split(x, C, 2);
        std::vector<Tensor> leaves;
        for (Tensor& p : parts) {
          p = p.view({B, N, H, D});
          if (!fused) {  // separate contiguous leaves, as before the packed path
            leaves.push_back(ops::contiguous(p.detach()).requires_grad_(true));
            p = leaves.back();
          }
        }
        Generator gen(7);
        auto [out, lse] = ops::dilated_attention(parts[0], parts[1], parts[2], cfg.segments, cfg.dilations, true, 0,
                                                 cfg.dropout, &gen);
        ops::sum(ops::mul(out, seed).to(DType::Float32)).backward();
        if (fused) return x.grad();
        return ops::cat({leaves[0].grad().view({B, N, C}), leaves[1].grad().view({B, N, C}),
                         leaves[2].grad().view({B, N, C})}, 2);
      };
      const std::vector<double> fused = run(true).to(DType::Float64).to_vector<double>(),
                                separate = run(false).to(DType::Float64).to_vector<double>();
      // dK and dV are written once per row: the same bits. dQ adds each row's
      // key blocks in fp32 in the order the blocks finish (reductions from
      // several blocks), which the scheduling may change between the two runs
      // (compute-sanitizer's does): the same sums to one rounding of the dtype.
      REQUIRE(fused.size() == separate.size());
      size_t kv_differ = 0, q_differ = 0;
      for (size_t i = 0; i < fused.size(); ++i) {
        if (int64_t(i % (3 * C)) >= C) kv_differ += fused[i] != separate[i];
        else q_differ += std::abs(fused[i] - separate[i]) > 0x1p-7 * std::abs(separate[i]) + 1e-5;
      }
      CHECK(kv_differ == 0);
      CHECK(q_differ == 0);
      CHECK(std::any_of(separate.begin(), separate.end(), [](double g) { return g != 0; }));
    }
}

TEST_CASE("CUDA attention kernel choice: MINIDL_ATTENTION_KERNEL caps the version; unknown names fail") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  using cuda::AttentionKernel;
  using cuda::AttentionPass;
  const ScopedEnv env("MINIDL_ATTENTION_KERNEL", "simt");
  CHECK(cuda::choose_attention_kernel(DType::BFloat16, 64, AttentionPass::kForward) == AttentionKernel::kSimt);
  env.set("mma");
  CHECK(cuda::choose_attention_kernel(DType::BFloat16, 64, AttentionPass::kForward) == AttentionKernel::kMmaSync);
  CHECK(cuda::choose_attention_kernel(DType::BFloat16, 48, AttentionPass::kBackward) == AttentionKernel::kSimt);
  // float32 takes the TF32 tensor cores (mma.sync) on sm_80+, both passes, at
  // head dims 32/64/128; never a Hopper bf16 version.
  const AttentionKernel f32_mma = cuda::compute_capability() >= 80 ? AttentionKernel::kMmaSync : AttentionKernel::kSimt;
  for (const char* cap : {"mma", "wgmma", "ws"}) {
    CAPTURE(cap);
    env.set(cap);
    for (int64_t d : {32, 64, 128})
      for (AttentionPass pass : {AttentionPass::kForward, AttentionPass::kBackward})
        CHECK(cuda::choose_attention_kernel(DType::Float32, d, pass) == f32_mma);
    CHECK(cuda::choose_attention_kernel(DType::Float32, 48, AttentionPass::kForward) == AttentionKernel::kSimt);
  }
  env.set("simt");
  CHECK(cuda::choose_attention_kernel(DType::Float32, 64, AttentionPass::kBackward) == AttentionKernel::kSimt);
  env.set("bogus");
  CHECK_THROWS_WITH_AS(cuda::choose_attention_kernel(DType::BFloat16, 64, AttentionPass::kForward),
                       doctest::Contains("simt, mma, wgmma, ws"), Error);
  env.restore();
  CHECK(cuda::choose_attention_kernel(DType::BFloat16, 64, AttentionPass::kForward) >= AttentionKernel::kMmaSync);
  CHECK(cuda::choose_attention_kernel(DType::Float32, 64, AttentionPass::kBackward) == f32_mma);
#endif
}

TEST_CASE("CUDA float32 on TF32 tensor cores: not SIMT's result but within TF32 rounding of it; unaligned rows run SIMT") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  if (cuda::compute_capability() < 80) {
    MESSAGE("float32 runs SIMT only before sm_80");
    return;
  }
  const Device gpu = Device::cuda(0);
  const Case c{"LongNet set / 64", 1, 700, 4, 64, {32, 64, 128, 256, 512}, {1, 2, 4, 6, 12}, true};
  const DilatedAttentionConfig config = dropout_config(c, 0.2, 5, 6);
  const ScopedEnv env("MINIDL_ATTENTION_KERNEL", nullptr);
  // out, dq, dk, dv and lse of one kernel version, on the CPU.
  auto run = [&](const char* kernel, const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& grad_out) {
    env.set(kernel);
    Forward f = run_forward(cuda::dilated_attention_forward, q, k, v, config);
    Backward g = run_backward(cuda::dilated_attention_backward, q, k, v, f, grad_out, Tensor(), config);
    return std::vector<Tensor>{f.out.to(Device::cpu()), g.dq.to(Device::cpu()), g.dk.to(Device::cpu()),
                               g.dv.to(Device::cpu()), f.lse.to(Device::cpu())};
  };
  Tensor grad_out = random_tensor({c.B, c.N, c.H, c.D}).to(DType::Float32).to(gpu);
  {
    // Views of one packed projection (16-byte aligned rows): the tensor cores.
    Tensor qkv = random_tensor({c.B, c.N, 3, c.H, c.D}).to(DType::Float32).to(gpu);
    auto view = [&](int64_t i) { return qkv.slice(2, i, i + 1).squeeze(2); };
    std::vector<Tensor> simt = run("simt", view(0), view(1), view(2), grad_out);
    std::vector<Tensor> mma = run("mma", view(0), view(1), view(2), grad_out);
    for (size_t i = 0; i < 4; ++i) {
      CAPTURE(i);
      std::vector<double> a = mma[i].to_vector<double>(), b = simt[i].to_vector<double>();
      double peak = 0, diff = 0;
      for (size_t e = 0; e < a.size(); ++e) {
        peak = std::max(peak, std::abs(b[e]));
        diff = std::max(diff, std::abs(a[e] - b[e]));
      }
      // TF32 rounding shows (~1e-4 of the peak; fp32 rounding alone is ~1e-7) and stays small.
      CHECK(diff > 1e-5 * peak);
      CHECK(diff < 3e-3 * peak);
    }
  }
  {
    // Rows of 65 floats, the head dim their last 64: every row starts 4 bytes
    // past a 16-byte boundary, so "mma" runs the SIMT kernels, bit for bit.
    auto unaligned = [&] { return random_tensor({c.B, c.N, c.H, c.D + 1}).to(DType::Float32).to(gpu).slice(3, 1, c.D + 1); };
    Tensor q = unaligned(), k = unaligned(), v = unaligned();
    std::vector<Tensor> simt = run("simt", q, k, v, grad_out), mma = run("mma", q, k, v, grad_out);
    for (size_t i = 0; i < simt.size(); ++i) {
      CAPTURE(i);
      CHECK(mma[i].to_vector<double>() == simt[i].to_vector<double>());
    }
  }
#endif
}

// bfloat16 rows the tensor-core kernels cannot load (16-byte cp.async or
// TMA): views whose rows start 2 bytes past a 16-byte boundary, and an
// upstream gradient that is contiguous but starts there. They run SIMT (a
// misaligned load faulted: a sticky error, reported at a later launch).
TEST_CASE("CUDA bfloat16 attention on rows off 16-byte boundaries matches the float64 CPU reference") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  for (int64_t D : {64, 128}) {
    for (double p : {0.0, 0.2}) {
      for_each_kernel(DType::BFloat16, D, [&] {
        CAPTURE(D);
        CAPTURE(p);
        const Case c{"unaligned", 1, 160, 2, D, {64, 160}, {2, 1}, true};
        const DilatedAttentionConfig config = p > 0 ? dropout_config(c, p) : kernel_config(c);
        const double tol = cuda_tolerance(DType::BFloat16, D, p > 0);
        // Rows of D + 1 elements, the head dim their last D.
        auto shifted = [&] { return random_tensor({c.B, c.N, c.H, D + 1}).to(DType::BFloat16).slice(3, 1, D + 1); };
        auto contiguous_shifted = [&] {  // contiguous, one element past an aligned start
          Tensor buf = random_tensor({c.B * c.N * c.H * D + 1}).to(DType::BFloat16).to(gpu);
          return buf.slice(0, 1, buf.size(0)).view({c.B, c.N, c.H, D});
        };
        Tensor q0 = shifted(), k0 = shifted(), v0 = shifted();
        Tensor qs = q0.to(gpu), ks = k0.to(gpu), vs = v0.to(gpu);  // contiguous: aligned rows
        Tensor qu = random_tensor({c.B, c.N, c.H, D + 1}).to(DType::BFloat16).to(gpu).slice(3, 1, D + 1);
        ops::copy_(qu, qs);
        Tensor ku = random_tensor({c.B, c.N, c.H, D + 1}).to(DType::BFloat16).to(gpu).slice(3, 1, D + 1);
        ops::copy_(ku, ks);
        Tensor vu = random_tensor({c.B, c.N, c.H, D + 1}).to(DType::BFloat16).to(gpu).slice(3, 1, D + 1);
        ops::copy_(vu, vs);
        Tensor q64 = q0.to(DType::Float64), k64 = k0.to(DType::Float64), v64 = v0.to(DType::Float64);
        Forward want = run_forward(cpu::dilated_attention_forward_reference, q64, k64, v64, config);
        Tensor go = contiguous_shifted();
        Backward gw = run_backward(cpu::dilated_attention_backward_reference, q64, k64, v64, want,
                                   go.to(Device::cpu()).to(DType::Float64), Tensor(), config);
        // Unaligned q, k, v (and gradient); then aligned q, k, v with the unaligned gradient.
        for (bool aligned_inputs : {false, true}) {
          CAPTURE(aligned_inputs);
          const Tensor& a = aligned_inputs ? qs : qu;
          const Tensor& b = aligned_inputs ? ks : ku;
          const Tensor& e = aligned_inputs ? vs : vu;
          Forward got = run_cuda_forward(a, b, e, config);
          check_scaled(got.out.to(Device::cpu()), want.out, tol);
          check_lse(got.lse.to(Device::cpu()), want.lse, tol);
          Backward gg = run_cuda_backward(a, b, e, got, go, Tensor(), config);
          check_gradients({gg.dq.to(Device::cpu()), gg.dk.to(Device::cpu()), gg.dv.to(Device::cpu())}, gw, tol);
        }
      });
    }
  }
#endif
}

// Each of B and H in its own grid dimension: B H past 65535 (the limit of
// one) runs, on every kernel version.
TEST_CASE("CUDA attention over more than 65535 batch-heads matches the float64 CPU reference") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  const Case c{"B H = 66000", 33000, 4, 2, 64, {4, 2}, {1, 2}, true};
  const DilatedAttentionConfig config = kernel_config(c);
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    const Qkv in = random_qkv(c, dtype, gpu);
    const Tensor &q = in.q, &k = in.k, &v = in.v;
    Tensor go = random_tensor(q.shape()).to(dtype);
    Forward want = run_forward(cpu::dilated_attention_forward_reference, in.q64, in.k64, in.v64, config);
    Backward gw = run_backward(cpu::dilated_attention_backward_reference, in.q64, in.k64, in.v64, want,
                               go.to(DType::Float64), Tensor(), config);
    const Tensor go_gpu = go.to(gpu);
    for_each_kernel(dtype, c.D, [&] {
      const double tol = cuda_tolerance(dtype, c.D);
      Forward got = run_cuda_forward(q, k, v, config);
      check_scaled(got.out.to(Device::cpu()), want.out, tol);
      check_lse(got.lse.to(Device::cpu()), want.lse, tol);
      Backward gg = run_cuda_backward(q, k, v, got, go_gpu, Tensor(), config);
      check_gradients({gg.dq.to(Device::cpu()), gg.dk.to(Device::cpu()), gg.dv.to(Device::cpu())}, gw, tol);
    });
  }
#endif
}

TEST_CASE("CUDA dilated_attention errors") {
  MINIDL_REQUIRE_CUDA();
  Tensor q = random_tensor({1, 8, 2, 4}).to(DType::Float32);
  Tensor qg = q.to(Device::cuda(0));
  CHECK_THROWS_WITH_AS(ops::dilated_attention(qg, q, qg, {4}, {1}), doctest::Contains("different devices"), Error);
  Tensor q64 = random_tensor({1, 8, 2, 4}, {DType::Float64, Device::cuda(0)});
  CHECK_THROWS_WITH_AS(ops::dilated_attention(q64, q64, q64, {4}, {1}),
                       doctest::Contains("float64 is supported on the CPU only"), Error);
}

TEST_CASE("CUDA attention dropout: forward and backward match the float64 CPU reference") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  std::vector<Case> cases = cuda_cases();
  // The mask is keyed by the branch's index as listed, whatever order a
  // backend runs the branches in (e.g. a dilation-1 branch first).
  cases.push_back({"r = 1 branch listed last", 1, 300, 4, 64, {128, 64}, {2, 1}, true});
  cases.push_back({"r = 1 branch listed last", 2, 200, 2, 32, {200, 50, 100}, {4, 1, 2}, false});
  // 256 work items of up to two key tiles: ws blocks take several.
  cases.push_back({"several items per block", 2, 2048, 8, 64, {256}, {1}, true});
  // Not causal: key blocks that start mid-segment wrap around past a partial tile.
  cases.push_back({"several items per block", 2, 2048, 8, 64, {1000}, {1}, false});
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (const Case& c : cases) {
      CAPTURE(dtype);
      CAPTURE(str(c));
      const double tol = cuda_tolerance(dtype, c.D, true);
      const Qkv in = packed_qkv(c, dtype, gpu);
      const Tensor &q = in.q, &k = in.k, &v = in.v, &q64 = in.q64, &k64 = in.k64, &v64 = in.v64;
      const DilatedAttentionConfig config = dropout_config(c, 0.2, 31337, 12);
      Tensor grad_out = random_tensor(q.shape()).to(dtype);
      const Reference want = reference_with_and_without_lse_grad(
          q64, k64, v64, grad_out.to(DType::Float64), random_tensor({c.B, c.N, c.H}).to(DType::Float32), config);
      const Tensor grad_out_gpu = grad_out.to(gpu);
      const std::array<Tensor, 2> grad_lse_gpu = {want.grad_lse[0].to(gpu), Tensor()};  // [1] undefined, as in want
      for_each_kernel(dtype, c.D, [&] {
        Forward got = run_cuda_forward(q, k, v, config);
        // The ws forward keeps the mask's bits, and the ws backward reads them.
        const bool ws = dtype == DType::BFloat16 &&
                        cuda::choose_attention_kernel(dtype, c.D, cuda::AttentionPass::kForward) ==
                            cuda::AttentionKernel::kWarpSpecialized;
        CHECK(got.dropout_bits.defined() == ws);
        // With no backward to come (no bits asked for) the forward keeps none,
        // and writes the same output bit for bit.
        Forward bare = poisoned_forward(q);
        cuda::dilated_attention_forward(q, k, v, config, bare.out, bare.lse, nullptr);
        CHECK(bare.out.to(Device::cpu()).to_vector<double>() == got.out.to(Device::cpu()).to_vector<double>());
        CHECK(bare.lse.to(Device::cpu()).to_vector<double>() == got.lse.to(Device::cpu()).to_vector<double>());
        check_scaled(got.out.to(Device::cpu()), want.f.out, tol);
        check_lse(got.lse.to(Device::cpu()), want.f.lse, tol);
        for (size_t i = 0; i < 2; ++i) {
          CAPTURE(want.grad_lse[i].defined());
          // Also without the forward's bits (past their memory budget): the ws backward draws the mask.
          check_cuda_backward_with_and_without_bits(q, k, v, got, grad_out_gpu, grad_lse_gpu[i], config,
                                                    want.grads[i], tol);
        }
      });
    }
  }
#endif
}

// Per-pair dropout needs a plan that computes each shared pair once: on CUDA
// every version has one (the ws kernels their own where it takes the
// problem: the cases named "nested"; else the per-branch kernels', where a
// branch's share runs mma.sync under the wgmma and ws settings too).
TEST_CASE("CUDA per-pair attention dropout: every kernel version matches the float64 reference") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  int planned = 0, ws_planned = 0;
  Tensor offset_word = from_vector(std::vector<int32_t>{5, 0}, {2}).to(gpu);  // 64 bits: 5
  std::vector<Case> cases = cuda_cases();
  // 1024 work items in the first branch: each persistent ws block takes several.
  cases.push_back({"nested, several items per block", 2, 4096, 8, 64, {256, 512, 1024}, {1, 2, 4}, true});
  cases.push_back({"nested, several items per block", 2, 4096, 8, 64, {256, 512, 1024}, {1, 2, 4}, false});
  // The finishing branch (the first dilation-1 one listed, w 512) is not the
  // smallest: it has spans of 256 kept rows, so on the ws kernels every
  // branch merges into the accumulators (WsFinish::kMerges), the rows of a
  // causal first span with no pairs of their own there. At N = 768 the w 1024
  // segment is clamped to 768 rows (a partial last span) and the second w 512
  // one is a single span.
  cases.push_back({"nested, the finishing branch not the smallest", 1, 1536, 4, 64, {512, 256, 1024}, {1, 1, 2}, true});
  cases.push_back({"nested, the finishing branch not the smallest", 2, 768, 4, 128, {512, 256, 1024}, {1, 1, 2}, false});
  // Spans of 96 and 48 kept rows: query and key tiles that straddle a span
  // (the ws plan does not take them). In the first the dilation-1 branch
  // that runs first is not the smallest: causal, its first span's rows have
  // no pair of their own.
  cases.push_back({"spans inside tiles", 2, 700, 4, 64, {192, 96, 384}, {1, 1, 2}, true});
  cases.push_back({"spans inside tiles", 1, 700, 4, 32, {384, 96}, {2, 1}, false});
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    for (const Case& c : cases) {
      if (!nests(c)) continue;
      CAPTURE(dtype);
      CAPTURE(str(c));
      const double tol = cuda_tolerance(dtype, c.D, true);
      const Qkv in = packed_qkv(c, dtype, gpu);
      const Tensor &q = in.q, &k = in.k, &v = in.v, &q64 = in.q64, &k64 = in.k64, &v64 = in.v64;
      DilatedAttentionConfig config = dropout_config(c, 0.2, 31337, 12);
      config.dropout.per_pair = true;
      Tensor grad_out = random_tensor(q.shape()).to(dtype);
      Tensor grad_lse = random_tensor({c.B, c.N, c.H}).to(DType::Float32);
      const Forward want = run_forward(cpu::dilated_attention_forward_reference, q64, k64, v64, config);
      const Backward gw = run_backward(cpu::dilated_attention_backward_reference, q64, k64, v64, want,
                                       grad_out.to(DType::Float64), grad_lse.to(DType::Float64), config);
      // The offset read from the device, as a captured graph binds it: 5
      // there plus 6 here, the reference's 11.
      DilatedAttentionConfig on_device = dropout_config(c, 0.2, 31337, 6), at_11 = dropout_config(c, 0.2, 31337, 11);
      on_device.dropout.per_pair = at_11.dropout.per_pair = true;
      on_device.dropout.offset_base = static_cast<const uint64_t*>(offset_word.raw_data());
      const Forward want11 = run_forward(cpu::dilated_attention_forward_reference, q64, k64, v64, at_11);
      const Backward gw11 = run_backward(cpu::dilated_attention_backward_reference, q64, k64, v64, want11,
                                         grad_out.to(DType::Float64), Tensor(), at_11);
      const Tensor grad_out_gpu = grad_out.to(gpu), grad_lse_gpu = grad_lse.to(gpu);
      for_each_kernel(dtype, c.D, [&] {
        const cuda::AttentionKernel kernel = cuda::choose_attention_kernel(dtype, c.D, cuda::AttentionPass::kForward);
        ++planned;
        // The ws forward keeps the mask's bits where the ws plan runs the problem.
        const bool ws_plan = dtype == DType::BFloat16 && kernel == cuda::AttentionKernel::kWarpSpecialized &&
                             c.name.rfind("nested", 0) == 0;
        ws_planned += ws_plan;
        Forward got = run_cuda_forward(q, k, v, config);
        CHECK(got.dropout_bits.defined() == ws_plan);
        check_scaled(got.out.to(Device::cpu()), want.out, tol);
        check_lse(got.lse.to(Device::cpu()), want.lse, tol);
        check_cuda_backward_with_and_without_bits(q, k, v, got, grad_out_gpu, grad_lse_gpu, config, gw, tol);
        Forward got11 = run_cuda_forward(q, k, v, on_device);
        check_scaled(got11.out.to(Device::cpu()), want11.out, tol);
        got11.dropout_bits = Tensor();  // the drawing backward reads the offset itself
        Backward gg11 = run_cuda_backward(q, k, v, got11, grad_out_gpu, Tensor(), on_device);
        check_gradients({gg11.dq.to(Device::cpu()), gg11.dk.to(Device::cpu()), gg11.dv.to(Device::cpu())}, gw11,
                        tol);
      });
    }
  }
  const bool hopper = cuda::choose_attention_kernel(DType::BFloat16, 64, cuda::AttentionPass::kForward) ==
                      cuda::AttentionKernel::kWarpSpecialized;
  CHECK(ws_planned == (hopper ? 10 : 0));
  CHECK(planned > ws_planned);
#endif
}

// The nested plans' edge cases on every version, without dropout and with
// per-pair dropout: a branch whose pairs all belong to a smaller one (the
// second w 128, r 1: not launched), and a dilation-1 branch that runs first
// but is not the smallest (w 192 before 96), so that its first span's rows
// have no pair of their own in that launch.
TEST_CASE("CUDA nested pairs: a branch with none of its own, and rows with none in the first launch") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  const std::vector<Case> cases = {{"a branch with no pairs of its own", 1, 300, 4, 64, {128, 128, 256}, {1, 1, 2}, true},
                                   {"rows with no pairs in the first launch", 2, 400, 4, 32, {192, 96, 384}, {1, 1, 2}, true}};
  for (DType dtype : {DType::Float32, DType::BFloat16})
    for (const Case& c : cases) {
      REQUIRE(nests(c));
      CAPTURE(dtype);
      CAPTURE(str(c));
      const double tol = cuda_tolerance(dtype, c.D, true);
      const Qkv in = random_qkv(c, dtype, gpu);
      const Tensor &q_gpu = in.q, &k_gpu = in.k, &v_gpu = in.v, &q64 = in.q64, &k64 = in.k64, &v64 = in.v64;
      Tensor grad_out = random_tensor(q_gpu.shape()).to(dtype), grad_out_gpu = grad_out.to(gpu);
      DilatedAttentionConfig per_pair = dropout_config(c, 0.2, 77, 3);
      per_pair.dropout.per_pair = true;
      for (const DilatedAttentionConfig& config : {kernel_config(c), per_pair}) {
        CAPTURE(config.dropout.enabled());
        // The float64 reference, shared by every kernel version.
        const Forward want = run_forward(cpu::dilated_attention_forward_reference, q64, k64, v64, config);
        const Backward gw = run_backward(cpu::dilated_attention_backward_reference, q64, k64, v64, want,
                                         grad_out.to(DType::Float64), Tensor(), config);
        for_each_kernel(dtype, c.D, [&] {
          Forward got = run_cuda_forward(q_gpu, k_gpu, v_gpu, config);
          check_scaled(got.out.to(Device::cpu()), want.out, tol);
          check_lse(got.lse.to(Device::cpu()), want.lse, tol);
          Backward gg = run_cuda_backward(q_gpu, k_gpu, v_gpu, got, grad_out_gpu, Tensor(), config);
          check_gradients({gg.dq.to(Device::cpu()), gg.dk.to(Device::cpu()), gg.dv.to(Device::cpu())}, gw, tol);
        });
      }
    }
#endif
}

// A spanning sequence-parallel piece with per-pair dropout hands the kernels
// a lone dilation-1 branch over the segment's kept rows with its branch's
// share of the whole problem's pairs (config.pairs): here the w 2048, r 4
// branch's share of {512/1, 1024/2, 2048/4}, spans of 256 kept rows. On the
// ws kernels (spans of whole tiles) the branch writes over zeroed outputs
// (the rows of a causal first span have no pair of their own) and keeps the
// mask's bits; every version matches the float64 CPU path on the same share.
TEST_CASE("CUDA per-pair dropout: a lone branch's share, as a spanning piece runs it, on every version") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  DilatedAttentionConfig whole{{{512, 1}, {1024, 2}, {2048, 4}}};
  whole.dropout = dropout_of(0.2, 4242, 9);
  whole.dropout.per_pair = true;
  const BranchPairs share = nested_pairs(whole, 2048).back();
  REQUIRE(share.span == 256);
  int ws_runs = 0;
  for (const Case& c : {Case{"piece", 2, 1024, 4, 64, {512}, {1}, true}, Case{"piece", 1, 1280, 4, 128, {512}, {1}, false}})
    for (DType dtype : {DType::Float32, DType::BFloat16}) {
      CAPTURE(dtype);
      CAPTURE(str(c));
      DilatedAttentionConfig config = dropout_config(c, 0.2, 4242, 9);
      config.dropout.per_pair = true;
      config.pairs = {share};
      const double tol = cuda_tolerance(dtype, c.D, true);
      // Inputs and the float64 CPU path's results, shared by every kernel version.
      const Qkv in = random_qkv(c, dtype, gpu);
      const Tensor &q_gpu = in.q, &k_gpu = in.k, &v_gpu = in.v, &q64 = in.q64, &k64 = in.k64, &v64 = in.v64;
      Tensor grad_out = random_tensor(q_gpu.shape()).to(dtype), grad_lse = random_tensor({c.B, c.N, c.H}).to(DType::Float32);
      const Forward want = run_forward(cpu::dilated_attention_forward, q64, k64, v64, config);
      const Backward gw = run_backward(cpu::dilated_attention_backward, q64, k64, v64, want,
                                       grad_out.to(DType::Float64), grad_lse.to(DType::Float64), config);
      const Tensor grad_out_gpu = grad_out.to(gpu), grad_lse_gpu = grad_lse.to(gpu);
      for_each_kernel(dtype, c.D, [&] {
        const bool ws = dtype == DType::BFloat16 && cuda::choose_attention_kernel(dtype, c.D, cuda::AttentionPass::kForward) ==
                                                        cuda::AttentionKernel::kWarpSpecialized;
        ws_runs += ws;
        Forward got = run_cuda_forward(q_gpu, k_gpu, v_gpu, config);
        CHECK(got.dropout_bits.defined() == ws);
        check_scaled(got.out.to(Device::cpu()), want.out, tol);
        check_lse(got.lse.to(Device::cpu()), want.lse, tol);
        check_cuda_backward_with_and_without_bits(q_gpu, k_gpu, v_gpu, got, grad_out_gpu, grad_lse_gpu, config, gw, tol);
      });
    }
  const bool hopper = cuda::choose_attention_kernel(DType::BFloat16, 64, cuda::AttentionPass::kForward) ==
                      cuda::AttentionKernel::kWarpSpecialized;
  CHECK(ws_runs == (hopper ? 2 : 0));
#endif
}

TEST_CASE("CUDA attention dropout: a backward without bits draws a framed mask, and reads a graph's offset from the device") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  const std::vector<Case> cases = {{"two branches", 2, 300, 4, 64, {128, 300}, {2, 1}, true},
                                   {"dense", 1, 200, 2, 128, {200}, {1}, false}};
  // A device word holding the generator's offset, as a captured graph binds
  // it: 64 bits, 5 (two little-endian int32 words).
  Tensor word = from_vector(std::vector<int32_t>{5, 0}, {2}).to(gpu);
  for (const Case& c : cases) {
    CAPTURE(str(c));
    const double tol = cuda_tolerance(DType::BFloat16, c.D, true);
    const Qkv in = random_qkv(c, DType::BFloat16, gpu);
    const Tensor &q = in.q, &k = in.k, &v = in.v, &q64 = in.q64, &k64 = in.k64, &v64 = in.v64;
    Tensor grad_out = random_tensor(q.shape()).to(DType::BFloat16), grad_out_gpu = grad_out.to(gpu);
    // A part of a larger problem (a sequence-parallel piece's frame: mask
    // branches from 1, every second head from head 1, rows at stride 3 from 7).
    DilatedAttentionConfig framed = dropout_config(c, 0.2, 2024, 0);
    framed.dropout.frame = {1, 3 * c.N + 7, 2 * c.H, 1, 2, 7, 3};
    // The offset read from the device: 5 there plus 6 here, the reference's 11.
    DilatedAttentionConfig on_device = dropout_config(c, 0.2, 2024, 6), at_11 = dropout_config(c, 0.2, 2024, 11);
    on_device.dropout.offset_base = static_cast<const uint64_t*>(word.raw_data());
    for (const auto& [gpu_config, cpu_config] : {std::pair{framed, framed}, std::pair{on_device, at_11}}) {
      Forward want = run_forward(cpu::dilated_attention_forward_reference, q64, k64, v64, cpu_config);
      Forward got = run_cuda_forward(q, k, v, gpu_config);
      check_scaled(got.out.to(Device::cpu()), want.out, tol);
      Backward gw = run_backward(cpu::dilated_attention_backward_reference, q64, k64, v64, want,
                                 grad_out.to(DType::Float64), Tensor(), cpu_config);
      for (bool with_bits : {true, false}) {
        CAPTURE(with_bits);
        Forward f = got;
        if (!with_bits) f.dropout_bits = Tensor();
        Backward gg = run_cuda_backward(q, k, v, f, grad_out_gpu, Tensor(), gpu_config);
        check_gradients({gg.dq.to(Device::cpu()), gg.dk.to(Device::cpu()), gg.dv.to(Device::cpu())}, gw, tol);
      }
    }
  }
#endif
}

TEST_CASE("CUDA attention dropout: a forward the ws kernel does not take keeps no bits; the backward checks the bits it is given") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const Device gpu = Device::cuda(0);
  const Case c{"two branches", 2, 200, 2, 64, {64, 128}, {1, 2}};
  const DilatedAttentionConfig config = dropout_config(c, 0.2, 4242, 5);
  const double tol = cuda_tolerance(DType::BFloat16, c.D, true);
  for_each_kernel(DType::BFloat16, c.D, [&] {
    // Rows of a batch 2N apart: the ws kernels need the batch stride to be N
    // row strides, so the forward runs an older kernel and keeps no bits;
    // the backward, on contiguous copies the ws kernel would take, must then
    // draw the mask itself.
    auto batch_view = [&] { return random_tensor({c.B, 2 * c.N, c.H, c.D}).to(DType::BFloat16).to(gpu).slice(1, 0, c.N); };
    Tensor q = batch_view(), k = batch_view(), v = batch_view();
    Tensor q64 = q.to(Device::cpu()).to(DType::Float64), k64 = k.to(Device::cpu()).to(DType::Float64),
           v64 = v.to(Device::cpu()).to(DType::Float64);
    Forward want = run_forward(cpu::dilated_attention_forward_reference, q64, k64, v64, config);
    Forward got = run_cuda_forward(q, k, v, config);
    CHECK_FALSE(got.dropout_bits.defined());
    check_scaled(got.out.to(Device::cpu()), want.out, tol);
    Tensor grad_out = random_tensor(q.shape()).to(DType::BFloat16);
    Backward gw = run_backward(cpu::dilated_attention_backward_reference, q64, k64, v64, want,
                               grad_out.to(DType::Float64), Tensor(), config);
    Backward gg = run_cuda_backward(q.contiguous(), k.contiguous(), v.contiguous(), got, grad_out.to(gpu), Tensor(),
                                    config);
    check_gradients({gg.dq.to(Device::cpu()), gg.dk.to(Device::cpu()), gg.dv.to(Device::cpu())}, gw, tol);

    // Bits that are not this problem's forward's are refused.
    Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    Forward kept = run_cuda_forward(qc, kc, vc, config);
    if (!kept.dropout_bits.defined()) return;  // not the ws kernel
    auto refused = [&](const Tensor& bits, const DilatedAttentionConfig& cfg) {
      Forward f = kept;
      f.dropout_bits = bits;
      CHECK_THROWS_WITH_AS(run_cuda_backward(qc, kc, vc, f, grad_out.to(gpu), Tensor(), cfg),
                           doctest::Contains("dropout_bits are not the forward's"), Error);
    };
    const int64_t words = kept.dropout_bits.numel();
    refused(Tensor::empty({words + 1}, {DType::Int32, gpu, false}), config);
    refused(Tensor::empty({words}, {DType::Float32, gpu, false}), config);
    refused(Tensor::empty({words}, {DType::Int32, Device::cpu(), false}), config);
    refused(kept.dropout_bits, kernel_config(c));  // the same problem without dropout
  });
#endif
}

TEST_CASE("CUDA attention dropout: every kernel version's mask reads back exactly, forward and backward") {
  MINIDL_REQUIRE_CUDA();
#if defined(MINIDL_WITH_CUDA)
  const AttentionDropout drop = dropout_of(0.3, 8080, 3);
  for (DType dtype : {DType::Float32, DType::BFloat16})
    for (const Case& c : readback_cases()) for_each_kernel(dtype, c.D, [&] {
      CAPTURE(dtype);
      CAPTURE(str(c));
      check_readback(mask_readback(c, dtype, Device::cuda(0), run_cuda_forward, run_cuda_backward, drop));
      if (cuda::choose_attention_kernel(dtype, c.D, cuda::AttentionPass::kBackward) !=
          cuda::AttentionKernel::kWarpSpecialized)
        return;
      // The ws backward without the forward's bits draws the same mask.
      auto without_bits = [](const Tensor& q, const Tensor& k, const Tensor& v, Forward f, const Tensor& grad_out,
                             const Tensor& grad_lse, const DilatedAttentionConfig& config) {
        f.dropout_bits = Tensor();
        return run_cuda_backward(q, k, v, f, grad_out, grad_lse, config);
      };
      check_readback(mask_readback(c, dtype, Device::cuda(0), run_cuda_forward, without_bits, drop));
    });
#endif
}

TEST_CASE("CUDA dilated_attention op with dropout: the CPU's mask for the same generator state") {
  MINIDL_REQUIRE_CUDA();
  const Device gpu = Device::cuda(0);
  Case c{"LongNet set / 64", 2, 700, 6, 64, {32, 64, 128, 256, 512}, {1, 2, 4, 6, 12}};
  Generator gen;
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    const double tol = cuda_tolerance(dtype, c.D, true);
    Qkv in = random_qkv(c, dtype, gpu);
    const Tensor &q = in.q.requires_grad_(true), &k = in.k.requires_grad_(true), &v = in.v.requires_grad_(true);
    Tensor seed_out = random_tensor(q.shape()).to(dtype), seed_lse = random_tensor({c.B, c.N, c.H}).to(DType::Float32);
    gen.set_state(99, 1000);
    auto [out, lse] = ops::dilated_attention(q, k, v, c.segments, c.dilations, true, 0, 0.15, &gen);
    CHECK(gen.offset() == 1001);
    Tensor lse_finite = ops::masked_fill(lse, ops::eq(lse, ops::full({}, -kInf, {DType::Float32, gpu})), 0.0);
    ops::add(ops::sum(ops::mul(out, seed_out.to(gpu))).to(DType::Float32),
             ops::sum(ops::mul(lse_finite, seed_lse.to(gpu))))
        .backward();
    DilatedAttentionConfig config = kernel_config(c);
    config.dropout = dropout_of(0.15, 99, 1000);
    Forward f = run_forward(cpu::dilated_attention_forward_reference, in.q64, in.k64, in.v64, config);
    Backward g = run_backward(cpu::dilated_attention_backward_reference, in.q64, in.k64, in.v64, f,
                              seed_out.to(DType::Float64), seed_lse.to(DType::Float64), config);
    check_scaled(out.to(Device::cpu()), f.out, tol);
    check_lse(lse.to(Device::cpu()), f.lse, tol);
    check_gradients({q.grad().to(Device::cpu()), k.grad().to(Device::cpu()), v.grad().to(Device::cpu())}, g, tol);
  }
  // Vanilla attention: the GPU and the CPU op drop the same weights.
  Tensor x = random_tensor({2, 160, 4, 32}).to(DType::Float32);
  gen.set_state(7, 7);
  Tensor on_cpu = ops::attention(x, x, x, true, 0, 0.5, &gen);
  gen.set_state(7, 7);
  Tensor on_gpu = ops::attention(x.to(gpu), x.to(gpu), x.to(gpu), true, 0, 0.5, &gen);
  check_scaled(on_gpu.to(Device::cpu()), on_cpu, cuda_tolerance(DType::Float32, 32, true));
}
