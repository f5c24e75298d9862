#pragma once
// minidl::ops — the differentiable operations. Each op checks its inputs
// (errors name the op, shapes, dtypes and devices), runs the CPU kernel
// (cpu/) or the CUDA launcher (cuda/) for the inputs' device, and records
// its backward on the tape when an input requires grad.
//
// Conventions: no implicit dtype promotion (inputs of a binary op share a
// dtype; use to(dtype)); inputs share a device (copy_ copies across them);
// outputs are contiguous unless the op is a view (reshape/view, permute,
// transpose, slice, narrow, expand, squeeze/unsqueeze, split), which share
// storage with their input. An op with nothing to do returns its input itself
// (contiguous of a contiguous tensor, to() the same dtype or device, expand to
// the same shape, sum_to the same shape, squeeze of a dim whose size is not 1,
// dropout when not training or p = 0).
#include <optional>
#include <utility>
#include <vector>

#include "core/generator.h"
#include "core/tensor.h"

namespace minidl::ops {

// ---- factories (options.requires_grad makes a leaf) ----
Tensor empty(const Shape& shape, TensorOptions options = {});
Tensor zeros(const Shape& shape, TensorOptions options = {});
Tensor ones(const Shape& shape, TensorOptions options = {});
Tensor full(const Shape& shape, double value, TensorOptions options = {});
Tensor zeros_like(const Tensor& t);
Tensor ones_like(const Tensor& t);
Tensor arange(int64_t end, TensorOptions options = {});
Tensor arange(double start, double end, double step, TensorOptions options = {});
// Uniform [0, 1) and standard normal from the Philox stream of `gen`
// (default_generator() when null): the same values on CPU and CUDA. The
// values are drawn in float32 and rounded to the output dtype: in bfloat16
// uniform draws within 2^-9 of 1 round to 1.
Tensor rand(const Shape& shape, TensorOptions options = {}, Generator* gen = nullptr);
Tensor randn(const Shape& shape, TensorOptions options = {}, Generator* gen = nullptr);
// Random windows of a token sequence (a language model's batches): row b
// starts at s_b = philox::uniform_below(seed, offset, b, n - length), one
// offset of `gen` per call, and x[b] = tokens[s_b, s_b + length),
// y[b] = tokens[s_b + 1, s_b + length + 1). tokens: 1-D int32 with
// n >= length + 1 and n - length <= 2^32. x, y: (batch, length) on the
// tokens' device, the same on CPU and CUDA; on CUDA one kernel gathers them
// and nothing waits for the device.
std::pair<Tensor, Tensor> random_windows(const Tensor& tokens, int64_t batch, int64_t length,
                                         Generator* gen = nullptr);

// ---- elementwise, NumPy broadcasting ----
Tensor add(const Tensor& a, const Tensor& b);
Tensor sub(const Tensor& a, const Tensor& b);
Tensor mul(const Tensor& a, const Tensor& b);
Tensor div(const Tensor& a, const Tensor& b);
Tensor add(const Tensor& a, double s);
Tensor mul(const Tensor& a, double s);
Tensor pow(const Tensor& a, double exponent);
Tensor neg(const Tensor& a);
Tensor exp(const Tensor& a);
Tensor log(const Tensor& a);
Tensor tanh(const Tensor& a);
Tensor sqrt(const Tensor& a);
Tensor relu(const Tensor& a);  // NaN stays NaN (its gradient passes), as in PyTorch
Tensor gelu(const Tensor& a);  // tanh approximation
Tensor sigmoid(const Tensor& a);
// Comparisons give 1 or 0 in the inputs' dtype; not differentiable.
Tensor gt(const Tensor& a, const Tensor& b);
Tensor lt(const Tensor& a, const Tensor& b);
Tensor eq(const Tensor& a, const Tensor& b);
// cond != 0 ? a : b, broadcasting all three; cond may have any dtype (it is
// read as float32: a float64 cond below float32's smallest subnormal counts as 0).
Tensor where(const Tensor& cond, const Tensor& a, const Tensor& b);
// value where mask != 0, else x.
Tensor masked_fill(const Tensor& x, const Tensor& mask, double value);

// ---- reductions ----
// An int32 sum wraps around past the int32 range, as int32 arithmetic does
// (PyTorch's sum promotes to int64; minidl has no int64).
Tensor sum(const Tensor& x);  // all elements -> scalar (shape [])
Tensor sum(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim = false);
// Floating-point tensors only. The mean over zero elements is 0 (PyTorch gives NaN).
Tensor mean(const Tensor& x);
Tensor mean(const Tensor& x, const std::vector<int64_t>& dims, bool keepdim = false);
// Max over one dim: {values, indices (int32)}; gradient flows to the argmax.
std::pair<Tensor, Tensor> max(const Tensor& x, int64_t dim, bool keepdim = false);
Tensor max(const Tensor& x);  // global max -> scalar
Tensor argmax(const Tensor& x, int64_t dim, bool keepdim = false);
// Sums `x` down to `shape` (undoes broadcasting); used by backward passes.
Tensor sum_to(const Tensor& x, const Shape& shape);

// ---- linear algebra ----
// (..., M, K) @ (..., K, N) with broadcast batch dims; 1-D operands are
// promoted as in NumPy. CUDA: cuBLAS (TF32 for float32; bfloat16 with fp32
// accumulation). CPU: blocked, vectorised, OpenMP-threaded GEMM.
Tensor matmul(const Tensor& a, const Tensor& b);
// The activation a linear layer may apply to its output; Gelu is the tanh
// approximation, as gelu() (and cuBLASLt's GELU epilogue).
enum class Activation { None, Gelu };
// activation(x weight^T + bias) over the last dim: x (..., in), weight
// (out, in), bias (out) or undefined -> (..., out). Gradients come out in the
// parameters' own layouts (weight's is (out, in), contiguous). CUDA
// float32/bfloat16: one cuBLASLt GEMM whose epilogue adds the bias and applies
// the GELU (saving its input for backward); backward folds the bias gradient
// into the weight-gradient GEMM, unless the pass batches weight gradients
// (the CUDA default, MINIDL_BATCH_WEIGHT_GRADS; README), where one column-sum
// kernel computes the bias gradients. Elsewhere the GEMM and the epilogue are
// separate kernels.
Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias = Tensor(),
              Activation activation = Activation::None);
// The transformer feed-forward linear(linear(x, fc_weight, fc_bias, Gelu),
// proj_weight, proj_bias) as one op: its backward also folds the GELU
// derivative (and, when weight gradients are not batched, fc_bias's gradient)
// into the GEMM that computes the hidden gradient (cuBLASLt's DGELU or
// DGELU_BGRAD epilogue), which separate linear ops cannot do. fc_weight (hidden, in), proj_weight (out, hidden); biases may be
// undefined.
Tensor mlp(const Tensor& x, const Tensor& fc_weight, const Tensor& fc_bias,
           const Tensor& proj_weight, const Tensor& proj_bias);

// ---- neural-network functions ----
Tensor softmax(const Tensor& x);      // over the last dim
Tensor log_softmax(const Tensor& x);  // over the last dim
// Mean cross-entropy of logits (N, C) against int32 targets (N), skipping
// targets equal to ignore_index; fused log-softmax + NLL.
Tensor cross_entropy(const Tensor& logits, const Tensor& targets, int64_t ignore_index = -100);
// Over the last dim; weight/bias (C) may be undefined (no affine).
Tensor layer_norm(const Tensor& x, const Tensor& weight, const Tensor& bias, double eps = 1e-5);
// The transformer's residual "add and norm" as one op: returns
// {sum = residual + dropout(h, p, training, gen), layer_norm(sum, weight,
// bias, eps)}. h and residual share shape, dtype and device (no
// broadcasting). The mask is ops::dropout's for the same generator state
// (one offset reserved when training and p > 0), and the values are those
// of dropout, add and layer_norm composed, up to float rounding (rounded to
// the dtype where they would store). Differentiable in every input through both outputs. One
// kernel forward; one kernel and the parameter-gradient reduction backward.
std::pair<Tensor, Tensor> dropout_add_layer_norm(const Tensor& h, const Tensor& residual,
                                                 const Tensor& weight, const Tensor& bias, double p,
                                                 bool training, Generator* gen = nullptr,
                                                 double eps = 1e-5);
// weight (V, C), indices int32 of any shape -> (*indices.shape, C).
Tensor embedding(const Tensor& weight, const Tensor& indices);
// dropout(embedding(weight, indices) + positions, p, training, gen): a
// language model's input as one op (one kernel forward on CUDA, with the bits
// and the mask of the three ops). positions (T, C), T the last dim of
// indices, broadcast over the others; undefined for none.
Tensor embedding_dropout(const Tensor& weight, const Tensor& indices, const Tensor& positions, double p,
                         bool training, Generator* gen = nullptr);
// Zeroes each element with probability p and scales the rest by 1/(1-p);
// identity when !training or p == 0. The mask comes from the Philox stream,
// so CPU and CUDA drop the same elements for the same generator state.
Tensor dropout(const Tensor& x, double p, bool training, Generator* gen = nullptr);
// LongNet dilated attention, exact (docs/dilated-attention.md). q, k, v: (B, N, H, D), any strides (a strided D dim is copied
// once); branch i is (segments[i], dilations[i]) with w >= 1, r >= 1 (w > N
// clamps to N); head h keeps offset h mod r. Returns {out (B, N, H, D),
// lse (B, N, H)}: lse is float32 (float64 for float64 inputs), -inf and out 0
// where a row is kept by no branch. Differentiable in q, k, v through both
// outputs. scale 0 means 1/sqrt(D). float32/bfloat16 (fp32 accumulation);
// float64 on the CPU only.
// dropout in [0, 1) drops attention probabilities (pass it while training
// only): each (branch, key) weight exp(s - lse) of a row is zeroed with
// probability T8/256, T8 = round(256 dropout) in [1, 255] (8-bit decisions),
// and the rest scaled by 256/(256 - T8); lse stays that of the undropped scores. The mask (core/dilated.h, attention_keep) comes from
// the Philox stream at one offset reserved from gen (default_generator() when
// null), so the backward regenerates it and CPU and CUDA drop the same
// weights. dropout 0 reserves nothing and is exactly the op without dropout.
// dropout_per_pair: where the branches nest, a pair that several branches
// hold is dropped or kept once for all its copies (its owner's decision;
// AttentionDropout::per_pair, docs/dilated-attention.md), on every backend
// and kernel version, and sequence parallel (seq_parallel_attention).
std::pair<Tensor, Tensor> dilated_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                            const std::vector<int64_t>& segments,
                                            const std::vector<int64_t>& dilations,
                                            bool causal = true, double scale = 0,
                                            double dropout = 0, Generator* gen = nullptr,
                                            bool dropout_per_pair = false);
// Vanilla attention: dilated_attention with one branch w = N, r = 1 (same
// kernels, same dropout).
Tensor attention(const Tensor& q, const Tensor& k, const Tensor& v, bool causal = true,
                 double scale = 0, double dropout = 0, Generator* gen = nullptr);
// Rotary position embedding (RoFormer's interleaved pairs): x (B, N, H, D),
// D even, any strides (a strided D dim is copied once); each pair
// (x[2i], x[2i+1]) at sequence index n turns by the angle
// (position_offset + n) * base^(-2i/D). Returns a contiguous tensor of x's
// dtype; the gradient turns back by the negative angle. float32/bfloat16
// (angles in double, reduced mod 2 pi, then fp32 sin/cos: accurate at
// positions of 2^20 and beyond); float64 on the CPU only.
Tensor rope(const Tensor& x, int64_t position_offset = 0, double base = 10000.0);

// ---- shape and data movement ----
Tensor reshape(const Tensor& x, const Shape& shape);  // one dim may be -1
Tensor view(const Tensor& x, const Shape& shape);
Tensor permute(const Tensor& x, const std::vector<int64_t>& dims);
Tensor transpose(const Tensor& x, int64_t dim0, int64_t dim1);
Tensor slice(const Tensor& x, int64_t dim, int64_t start, int64_t end, int64_t step = 1);
Tensor narrow(const Tensor& x, int64_t dim, int64_t start, int64_t length);
Tensor expand(const Tensor& x, const Shape& shape);
Tensor unsqueeze(const Tensor& x, int64_t dim);
Tensor squeeze(const Tensor& x, int64_t dim);
Tensor contiguous(const Tensor& x);
Tensor clone(const Tensor& x);
Tensor to(const Tensor& x, Device device);
Tensor to(const Tensor& x, DType dtype);
Tensor cat(const std::vector<Tensor>& tensors, int64_t dim);
Tensor stack(const std::vector<Tensor>& tensors, int64_t dim);
std::vector<Tensor> split(const Tensor& x, int64_t split_size, int64_t dim);
std::vector<Tensor> split(const Tensor& x, const std::vector<int64_t>& sizes, int64_t dim);
// Rows of x along dim picked by int32 indices (1-D).
Tensor index_select(const Tensor& x, int64_t dim, const Tensor& indices);

// ---- in-place (never recorded; for optimizers and initialisation) ----
// Each bumps the storage version, so a tensor saved for backward and then
// changed in place makes backward throw.
void copy_(const Tensor& dst, const Tensor& src);  // broadcasts src; casts dtype; copies across devices
void fill_(const Tensor& dst, double value);
void zero_(const Tensor& dst);
void add_(const Tensor& dst, const Tensor& src, double alpha = 1.0);  // dst += alpha * src
void mul_(const Tensor& dst, double s);

// ---- multi-tensor optimizer steps (ops/optim.cpp; never recorded) ----
// Both run as a few kernels whatever the number of tensors, with no host
// synchronisation: what changes between steps is read from device memory.

// One AdamW step (decoupled weight decay, bias-corrected) over every
// parameter: advances the float64 scalar `step` by one, then for each i
//   p = p (1 - lr wd_i);  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2
//   p -= lr / (1 - b1^step) * m / (sqrt(v) / sqrt(1 - b2^step) + eps)
// with lr read from the float64 scalar `lr`; and, when copies[i] is defined,
// writes the new p into it (the bfloat16 compute copy of mixed precision).
// params, exp_avgs, exp_avg_sqs: one dtype per i (float32, float64 or
// bfloat16); grads: the param's dtype, bfloat16 or float32; copies: empty or
// one entry per parameter. Everything on one device; lr and step there too.
void adamw_step_(const std::vector<Tensor>& params, const std::vector<Tensor>& grads,
                 const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& exp_avg_sqs,
                 const std::vector<Tensor>& copies, const std::vector<double>& weight_decays,
                 const Tensor& lr, const Tensor& step, double beta1, double beta2, double eps);
// Scales contiguous `grads` in place so that their global L2 norm is at most
// max_norm, by min(1, max_norm / (norm + 1e-6)) computed on their device, and
// returns the norm before clipping: a scalar on that device, float32 (float64
// when a gradient is float64). An empty list gives a float32 zero on the CPU.
Tensor clip_by_global_norm_(const std::vector<Tensor>& grads, double max_norm);

}  // namespace minidl::ops

namespace minidl {
// Operators for the common elementwise ops.
inline Tensor operator+(const Tensor& a, const Tensor& b) { return ops::add(a, b); }
inline Tensor operator-(const Tensor& a, const Tensor& b) { return ops::sub(a, b); }
inline Tensor operator*(const Tensor& a, const Tensor& b) { return ops::mul(a, b); }
inline Tensor operator/(const Tensor& a, const Tensor& b) { return ops::div(a, b); }
inline Tensor operator-(const Tensor& a) { return ops::neg(a); }
inline Tensor operator+(const Tensor& a, double s) { return ops::add(a, s); }
inline Tensor operator+(double s, const Tensor& a) { return ops::add(a, s); }
inline Tensor operator-(const Tensor& a, double s) { return ops::add(a, -s); }
inline Tensor operator-(double s, const Tensor& a) { return ops::add(ops::neg(a), s); }
inline Tensor operator*(const Tensor& a, double s) { return ops::mul(a, s); }
inline Tensor operator*(double s, const Tensor& a) { return ops::mul(a, s); }
inline Tensor operator/(const Tensor& a, double s) { return ops::mul(a, 1.0 / s); }
}  // namespace minidl
