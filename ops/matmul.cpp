// matmul with NumPy semantics: (..., M, K) @ (..., K, N) with broadcast
// batch dims; a 1-D operand becomes a row (left) or column (right) vector
// whose unit dim is dropped from the result.
//
// Forward hands the GEMM backends (cpu::matmul, cuda::matmul) views, never
// copies, wherever a layout allows: a matrix whose column stride is 1 is read
// row-major, one whose row stride is 1 (a transpose view, as backward makes)
// with a transpose flag, and broadcast batch dims have stride 0. Only
// irregular matrices (both strides > 1, broadcast rows) are made contiguous.
//
// Backward: dA = dC @ Bᵀ and dB = Aᵀ @ dC, summed over broadcast batch dims.
// A 2-D operand that is a transpose view (x @ W.transpose(0, 1)) gets its
// gradient computed transposed, i.e. in the layout of the matrix it views,
// so the transpose's backward hands the leaf a contiguous gradient (no copy).
#include <optional>

#include "autograd/tape.h"
#include "cpu/gemm.h"
#include "cuda/matmul.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

// How a GEMM reads a matrix: row-major with leading dim `ld`, or (when
// `transposed`) as the row-major storage of its transpose.
struct MatrixLayout {
  bool transposed;
  int64_t ld;
};

// The GEMM layout of a rows x cols matrix with the given element strides,
// or nullopt when the GEMM cannot read it in place. A unit dim's stride is
// meaningless, so it never disqualifies a layout.
std::optional<MatrixLayout> gemm_layout(int64_t rows, int64_t cols, int64_t row_stride,
                                        int64_t col_stride) {
  if (cols == 1 || col_stride == 1) {
    int64_t ld = rows == 1 ? cols : row_stride;
    if (ld >= cols) return MatrixLayout{false, ld};
  }
  if (rows == 1 || row_stride == 1) {
    int64_t ld = cols == 1 ? rows : col_stride;
    if (ld >= rows) return MatrixLayout{true, ld};
  }
  return std::nullopt;
}

Shape batch_of(const Tensor& t) { return Shape(t.shape().begin(), t.shape().end() - 2); }

// Strides of `t`'s batch dims broadcast (right-aligned) to `batch`: 0 where
// t has no such dim or size 1.
Shape broadcast_batch_strides(const Tensor& t, const Shape& batch) {
  Shape strides(batch.size(), 0);
  int64_t own = t.dim() - 2, lead = static_cast<int64_t>(batch.size()) - own;
  for (int64_t d = 0; d < own; ++d)
    if (t.shape()[d] != 1) strides[lead + d] = t.strides()[d];
  return strides;
}

// Batch dims merged where all three operands allow it (size-1 dims dropped),
// so the backends see as few batch dims as possible (cuBLAS takes one).
struct BatchGeometry {
  Shape sizes, a, b, out;
};

BatchGeometry merge_batch_dims(const Shape& batch, const Shape& sa, const Shape& sb,
                               const Shape& so) {
  BatchGeometry g;
  for (size_t d = 0; d < batch.size(); ++d) {
    int64_t n = batch[d];
    if (n == 1) continue;
    if (!g.sizes.empty() && g.a.back() == sa[d] * n && g.b.back() == sb[d] * n &&
        g.out.back() == so[d] * n) {
      g.sizes.back() *= n;
      g.a.back() = sa[d];
      g.b.back() = sb[d];
      g.out.back() = so[d];
      continue;
    }
    g.sizes.push_back(n);
    g.a.push_back(sa[d]);
    g.b.push_back(sb[d]);
    g.out.push_back(so[d]);
  }
  return g;
}

Shape append(Shape s, std::initializer_list<int64_t> tail) {
  s.insert(s.end(), tail);
  return s;
}

// out (contiguous, batch + [M, N]) = a @ b, a and b at least 2-D with batch
// dims that broadcast to out's. No autograd.
void gemm_into(Tensor a, Tensor b, const Tensor& out) {
  NoGradGuard no_grad;
  int64_t m = a.size(-2), k = a.size(-1), n = b.size(-1);
  if (out.numel() == 0) return;
  if (k == 0) {  // empty sum
    zero_(out);
    return;
  }
  auto layout_a = gemm_layout(m, k, a.stride(-2), a.stride(-1));
  if (!layout_a) {
    a = contiguous(a);
    layout_a = gemm_layout(m, k, a.stride(-2), a.stride(-1));
  }
  auto layout_b = gemm_layout(k, n, b.stride(-2), b.stride(-1));
  if (!layout_b) {
    b = contiguous(b);
    layout_b = gemm_layout(k, n, b.stride(-2), b.stride(-1));
  }
  Shape batch = batch_of(out);
  BatchGeometry g = merge_batch_dims(batch, broadcast_batch_strides(a, batch),
                                     broadcast_batch_strides(b, batch),
                                     Shape(out.strides().begin(), out.strides().end() - 2));

  // One B for every batch entry and A's matrices stacked at a constant row
  // pitch (x @ W with x (B, T, C)): a single GEMM over batch * M rows, which
  // blocks and parallelises better than many small ones.
  if (g.sizes.size() == 1 && g.b[0] == 0 && !layout_a->transposed &&
      (m == 1 ? g.a[0] >= k : g.a[0] == m * layout_a->ld)) {
    int64_t rows = g.sizes[0] * m, lda = m == 1 ? g.a[0] : layout_a->ld;
    MINIDL_DISPATCH(out.device(), matmul, a.as_strided({rows, k}, {lda, 1}, a.offset()), false,
                    lda, b.as_strided({k, n}, {b.stride(-2), b.stride(-1)}, b.offset()),
                    layout_b->transposed, layout_b->ld,
                    out.as_strided({rows, n}, {n, 1}, out.offset()));
    return;
  }

  Tensor av = a.as_strided(append(g.sizes, {m, k}), append(g.a, {a.stride(-2), a.stride(-1)}),
                           a.offset());
  Tensor bv = b.as_strided(append(g.sizes, {k, n}), append(g.b, {b.stride(-2), b.stride(-1)}),
                           b.offset());
  Tensor ov = out.as_strided(append(g.sizes, {m, n}), append(g.out, {n, 1}), out.offset());
  MINIDL_DISPATCH(out.device(), matmul, av, layout_a->transposed, layout_a->ld, bv,
                  layout_b->transposed, layout_b->ld, ov);
}

Shape broadcast_batch(const Tensor& a, const Tensor& b) {
  Shape ba = batch_of(a), bb = batch_of(b);
  size_t n = std::max(ba.size(), bb.size());
  Shape out(n);
  for (size_t i = 0; i < n; ++i) {
    int64_t x = i < n - ba.size() ? 1 : ba[i - (n - ba.size())];
    int64_t y = i < n - bb.size() ? 1 : bb[i - (n - bb.size())];
    MINIDL_CHECK(x == y || x == 1 || y == 1, "matmul: batch dims ", shape_str(ba), " of a (",
                 detail::describe(a), ") and ", shape_str(bb), " of b (", detail::describe(b),
                 ") do not broadcast");
    out[i] = x == 1 ? y : x;
  }
  return out;
}

Tensor matmul_nd(const Tensor& a, const Tensor& b);

// True for a 2-D view that transposes a contiguous matrix.
bool is_transposed_matrix(const Tensor& t) {
  return t.dim() == 2 && t.size(0) > 1 && t.size(1) > 1 && t.stride(0) == 1 &&
         t.stride(1) == t.size(0);
}

// dB for b of shape `b_shape` given a and the output gradient g; transposed
// (contiguous Bᵀ, viewed back) when b was a transposed matrix.
Tensor grad_b_of(const Tensor& a, const Tensor& g, const Shape& b_shape, bool b_transposed) {
  int64_t k = a.size(-1), n = g.size(-1);
  int64_t g_batch = numel(batch_of(g));
  if (b_transposed) {  // dBᵀ = dCᵀ A over all rows of the batch
    Tensor a_rows = reshape(a, {-1, k}), g_rows = reshape(g, {-1, n});
    return transpose(matmul_nd(transpose(g_rows, 0, 1), a_rows), 0, 1);
  }
  // b shared by every batch entry (a Linear weight): one GEMM with the batch
  // folded into K, instead of a batched GEMM writing batch x K x N partial
  // products and a reduction.
  if (numel(Shape(b_shape.begin(), b_shape.end() - 2)) == 1 && g_batch > 1 &&
      numel(batch_of(a)) == g_batch) {
    Tensor a_rows = reshape(a, {-1, k}), g_rows = reshape(g, {-1, n});
    return reshape(matmul_nd(transpose(a_rows, 0, 1), g_rows), b_shape);
  }
  return sum_to(matmul_nd(transpose(a, -1, -2), g), b_shape);
}

// matmul for operands of at least 2 dims (checked by the caller).
Tensor matmul_nd(const Tensor& a, const Tensor& b) {
  Shape out_shape = broadcast_batch(a, b);
  out_shape.push_back(a.size(-2));
  out_shape.push_back(b.size(-1));
  Tensor out = Tensor::empty(out_shape, a.options());
  gemm_into(a, b, out);
  bool grad_a = autograd::needs_grad({a}), grad_b = autograd::needs_grad({b});
  if (grad_a || grad_b) {
    // Each gradient needs only the other operand.
    autograd::record("matmul", {a, b}, {out},
                     [sa = grad_b ? SavedTensor(a, "matmul") : SavedTensor(),
                      sb = grad_a ? SavedTensor(b, "matmul") : SavedTensor(), a_shape = a.shape(),
                      b_shape = b.shape(), a_t = is_transposed_matrix(a) && b.dim() == 2,
                      b_t = is_transposed_matrix(b)](const Grads& g) {
                       Tensor da, db;
                       if (sb.defined()) {
                         Tensor bv = sb.get();
                         da = a_t ? transpose(matmul_nd(bv, transpose(g[0], 0, 1)), 0, 1)  // dAᵀ = B dCᵀ
                                  : sum_to(matmul_nd(g[0], transpose(bv, -1, -2)), a_shape);
                       }
                       if (sa.defined()) db = grad_b_of(sa.get(), g[0], b_shape, b_t);
                       return Grads{da, db};
                     });
  }
  return out;
}

}  // namespace

Tensor matmul(const Tensor& a, const Tensor& b) {
  const char* name = "matmul";
  detail::check_defined(name, a, "first input");
  detail::check_defined(name, b, "second input");
  MINIDL_CHECK(a.dim() >= 1 && b.dim() >= 1, "matmul: operands need at least 1 dim, got a ",
               detail::describe(a), " and b ", detail::describe(b));
  detail::check_same_device(name, a, b);
  detail::check_same_dtype(name, a, b);
  detail::check_floating(name, a);
  int64_t k_b = b.dim() == 1 ? b.size(0) : b.size(-2);
  MINIDL_CHECK(a.size(-1) == k_b, "matmul: inner dims differ: a is ", detail::describe(a),
               ", b is ", detail::describe(b), "; a's last dim (", a.size(-1), ") must equal b's ",
               b.dim() == 1 ? "only" : "second-to-last", " dim (", k_b, ")");
  if (a.dim() >= 2 && b.dim() >= 2) return matmul_nd(a, b);
  // NumPy's 1-D rules through (differentiable) unit-dim views.
  Tensor y = matmul_nd(a.dim() == 1 ? unsqueeze(a, 0) : a, b.dim() == 1 ? unsqueeze(b, -1) : b);
  if (b.dim() == 1) y = squeeze(y, -1);
  if (a.dim() == 1) y = squeeze(y, b.dim() == 1 ? -1 : -2);
  return y;
}

}  // namespace minidl::ops
