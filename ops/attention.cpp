// Dilated attention (LongNet) and vanilla attention: one op, one kernel
// family (cpu/dilated_attention, cuda/dilated_attention). Vanilla attention is
// the single branch w = N, r = 1. Semantics: docs/dilated-attention.md;
// dropout on the attention probabilities: core/dilated.h.
#include <cmath>

#include "autograd/tape.h"
#include "core/dilated.h"
#include "cpu/dilated_attention.h"
#include "cuda/dilated_attention.h"
#include "ops/dispatch.h"
#include "ops/ops.h"
#include "ops/seq_parallel.h"

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

// lse is float32, except float64 for float64 inputs (CPU gradchecks).
DType lse_dtype_for(DType dtype) { return dtype == DType::Float64 ? DType::Float64 : DType::Float32; }

// The kernels need the D dim contiguous (other strides are free); a view
// whose D dim is strided is copied once here rather than rejected.
Tensor with_contiguous_head_dim(const Tensor& t) {
  if (t.size(3) == 1 || t.stride(3) == 1) return t;
  NoGradGuard no_grad;
  return contiguous(t);
}

void check_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  detail::check_defined(op, q, "q");
  detail::check_defined(op, k, "k");
  detail::check_defined(op, v, "v");
  MINIDL_CHECK(q.dim() == 4, op, ": q must be 4-D (B, N, H, D), got ", detail::describe(q));
  MINIDL_CHECK(k.shape() == q.shape(), op, ": k must have q's shape ", shape_str(q.shape()),
               ", got ", detail::describe(k));
  MINIDL_CHECK(v.shape() == q.shape(), op, ": v must have q's shape ", shape_str(q.shape()),
               ", got ", detail::describe(v));
  detail::check_same_device(op, q, k);
  detail::check_same_device(op, q, v);
  detail::check_same_dtype(op, q, k);
  detail::check_same_dtype(op, q, v);
  DType dt = q.dtype();
  MINIDL_CHECK(dt == DType::Float32 || dt == DType::BFloat16 || dt == DType::Float64, op,
               ": unsupported dtype ", dt, " (q is ", detail::describe(q),
               "); expected float32, bfloat16 or float64");
  MINIDL_CHECK(!(dt == DType::Float64 && q.is_cuda()), op,
               ": float64 is supported on the CPU only (q is ", detail::describe(q),
               "); use float32 or bfloat16 on CUDA");
  MINIDL_CHECK(q.size(3) >= 1, op, ": head dim D must be >= 1, got q ", detail::describe(q));
}

DilatedAttentionConfig make_config(const char* op, int64_t n, const std::vector<int64_t>& segments,
                                   const std::vector<int64_t>& dilations, bool causal,
                                   double scale, int64_t head_dim) {
  MINIDL_CHECK(!segments.empty(), op,
               ": segments is empty; give at least one branch (segment length w, dilation r)");
  MINIDL_CHECK(segments.size() == dilations.size(), op, ": segments has ", segments.size(),
               " entries but dilations has ", dilations.size(), "; give one dilation per segment");
  MINIDL_CHECK(std::isfinite(scale), op, ": scale must be finite, got ", scale);
  DilatedAttentionConfig config;
  config.causal = causal;
  config.scale = scale != 0 ? scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
  for (size_t i = 0; i < segments.size(); ++i) {
    MINIDL_CHECK(segments[i] >= 1, op, ": segment length must be >= 1, got ", segments[i],
                 " (branch ", i, ")");
    MINIDL_CHECK(dilations[i] >= 1, op, ": dilation must be >= 1, got ", dilations[i],
                 " (branch ", i, ")");
    // w > N covers the whole sequence: clamp, as the kernels expect.
    config.branches.push_back({std::max<int64_t>(1, std::min(segments[i], n)), dilations[i]});
  }
  return config;
}

AttentionDropout dropout_of(const char* op, double p, Generator* gen, const Tensor& q) {
  MINIDL_CHECK(p >= 0.0 && p < 1.0, op, ": dropout must be in [0, 1), got ", p);
  if (p == 0.0) return {};
  Generator& g = gen ? *gen : default_generator();
  MINIDL_CHECK(!g.device_offset() || q.is_cuda(), op, ": the dropout generator is bound to a device offset "
               "(CUDA graph capture) but q is ", detail::describe(q), "; device offsets are for CUDA only");
  // 8-bit thresholds (core/dilated.h): the effective rate is T8 / 256 = round(p 256) / 256.
  const uint64_t seed = g.seed();
  return make_attention_dropout(p, seed, g.next_philox_offset());
}

// Fills config.dropout for drop probability p, reserving one generator offset
// (like ops::dropout) when p > 0; p == 0 leaves it disabled and reserves nothing.
void set_dropout(const char* op, double p, Generator* gen, const Tensor& q, DilatedAttentionConfig& config) {
  if (p != 0.0) detail::check_attention_mask_rows(op, config.branches.size(), q.size(0), q.size(2), q.size(1));
  config.dropout = dropout_of(op, p, gen, q);
}

// q, k, v as the three parts of one fused projection, (B, N, 3, H, D) or its
// (B, N, 3C) view split three ways: the gradients can then go to one buffer in
// that layout, which the split that made q, k, v takes back without a
// concatenation (ops::split).
bool parts_of_one_projection(const Tensor& q, const Tensor& k, const Tensor& v) {
  if (q.storage() != k.storage() || q.storage() != v.storage() || q.shape() != k.shape() ||
      q.shape() != v.shape() || q.strides() != k.strides() || q.strides() != v.strides())
    return false;
  const int64_t N = q.size(1), HD = q.size(2) * q.size(3);
  const Shape& st = q.strides();
  return st[3] == 1 && st[2] == q.size(3) && st[1] == 3 * HD && st[0] == N * st[1] &&
         k.offset() == q.offset() + HD && v.offset() == k.offset() + HD;
}

std::pair<Tensor, Tensor> attention_forward(const char* op, const Tensor& q_in, const Tensor& k_in,
                                            const Tensor& v_in, const DilatedAttentionConfig& config) {
  Tensor q = with_contiguous_head_dim(q_in), k = with_contiguous_head_dim(k_in),
         v = with_contiguous_head_dim(v_in);
  const int64_t B = q.size(0), N = q.size(1), H = q.size(2);
  Tensor out = Tensor::empty(q.shape(), q.options());
  Tensor lse = Tensor::empty({B, N, H}, {lse_dtype_for(q.dtype()), q.device(), false});
  const bool grad = autograd::needs_grad({q_in, k_in, v_in});
  // With gradients to come, the backend may keep dropout's mask for the
  // backward (CUDA's ws kernels: then it draws no random numbers).
  Tensor dropout_bits;
  if (q.numel() > 0)
    MINIDL_DISPATCH(q.device(), dilated_attention_forward, q, k, v, config, out, lse, grad ? &dropout_bits : nullptr);
  if (grad) {
    // bf16 on CUDA: a fused projection's parts get their gradients in one
    // packed buffer (the warp-specialised backward writes dK and dV straight
    // into it). float32 keeps contiguous gradients: its kernels accumulate in
    // place, and strided parts would cost a buffer and a copy each (measured:
    // 18 copies per step against split's 6 concatenations).
    const bool packed = q.device().is_cuda() && q.dtype() == DType::BFloat16 && parts_of_one_projection(q_in, k_in, v_in);
    autograd::record(
        op, {q_in, k_in, v_in}, {out, lse},
        [sq = SavedTensor(q, op), sk = SavedTensor(k, op), sv = SavedTensor(v, op),
         so = SavedTensor(out, op), sl = SavedTensor(lse, op), dropout_bits, config, packed, op](const Grads& g) {
          Tensor q = sq.get(), k = sk.get(), v = sv.get(), out = so.get(), lse = sl.get();
          Tensor dq, dk, dv;
          if (packed) {
            const int64_t B = q.size(0), N = q.size(1), H = q.size(2), D = q.size(3);
            Tensor qkv = Tensor::empty({B, N, 3, H, D}, q.options());
            const Shape strides = {N * 3 * H * D, 3 * H * D, D, 1};
            dq = qkv.as_strided(q.shape(), strides, 0, op);
            dk = qkv.as_strided(q.shape(), strides, H * D, op);
            dv = qkv.as_strided(q.shape(), strides, 2 * H * D, op);
          } else {
            dq = Tensor::empty(q.shape(), q.options());
            dk = Tensor::empty(q.shape(), q.options());
            dv = Tensor::empty(q.shape(), q.options());
          }
          if (q.numel() == 0) return Grads{dq, dk, dv};
          // config carries the dropout seed and offset: the same mask as forward.
          // Upstream gradients may be broadcast or permuted views: the kernels
          // get contiguous ones (the CUDA backward requires it; usually no copy).
          // An output that got no gradient arrives undefined (MissingGrad::
          // Undefined): the kernels take an undefined grad_lse as zeros, which
          // saves filling one in every step (ops::attention drops lse).
          Tensor grad_out = g[0].defined() ? g[0] : zeros(out.shape(), out.options());
          if (grad_out.dtype() != q.dtype()) grad_out = to(grad_out, q.dtype());
          if (!grad_out.is_contiguous()) grad_out = contiguous(grad_out);
          Tensor grad_lse = g[1];
          if (grad_lse.defined()) {
            if (grad_lse.dtype() != lse.dtype()) grad_lse = to(grad_lse, lse.dtype());
            grad_lse = contiguous(grad_lse);
          }
          MINIDL_DISPATCH(q.device(), dilated_attention_backward, q, k, v, out, lse, grad_out,
                          grad_lse, config, dq, dk, dv, dropout_bits);
          return Grads{dq, dk, dv};
        },
        autograd::MissingGrad::Undefined);
  }
  return {out, lse};
}

}  // namespace

namespace detail {
void check_attention_mask_rows(const char* op, size_t branches, int64_t B, int64_t H, int64_t N) {
  // The mask's Philox counter holds a mask row in 32 bits (attention_dropout_block).
  const double rows = static_cast<double>(branches) * static_cast<double>(B) * static_cast<double>(H) *
                      static_cast<double>(N);
  MINIDL_CHECK(rows < 4294967296.0, op, ": attention dropout numbers its mask rows (branches x B x H x N = ", rows,
               ") in 32 bits; this problem has too many for dropout");
}
}  // namespace detail

AttentionDropout attention_dropout(double p, Generator* gen, const Tensor& q) {
  return dropout_of("attention_dropout", p, gen, q);
}

std::pair<Tensor, Tensor> dilated_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const std::vector<int64_t>& segments,
                                            const std::vector<int64_t>& dilations, bool causal,
                                            double scale, double dropout, Generator* gen,
                                            bool dropout_per_pair) {
  const char* op = "dilated_attention";
  check_inputs(op, q, k, v);
  DilatedAttentionConfig config =
      make_config(op, q.size(1), segments, dilations, causal, scale, q.size(3));
  set_dropout(op, dropout, gen, q, config);
  config.dropout.per_pair = dropout_per_pair;
  return attention_forward(op, q, k, v, config);
}

Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal, double scale,
                 double dropout, Generator* gen) {
  const char* op = "attention";
  check_inputs(op, q, k, v);
  const int64_t n = std::max<int64_t>(1, q.size(1));
  DilatedAttentionConfig config = make_config(op, n, {n}, {1}, causal, scale, q.size(3));
  set_dropout(op, dropout, gen, q, config);
  return attention_forward(op, q, k, v, config).first;
}

}  // namespace minidl::ops
