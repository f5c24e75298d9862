// linear and mlp: GEMMs with fused epilogues (cpu/linear, cuda/linear).
//
// Leading dims of x are flattened, so the forward and every backward product
// is one 2-D GEMM: y (M, N) = x (M, K) W^T (N, K) + b. Backward, with dz the
// gradient of the pre-activation:
//   dW = dz^T x  (N, K), straight in the weight's layout: no transposed copy;
//   db = column sums of dz, folded into the dW GEMM (cuBLASLt BGRADB), or,
//        when the weight gradients are batched (below), into the batch;
//   dx = dz W    (M, K).
// A GELU's derivative needs the GEMM that produces the gradient of its
// output; for a lone linear that is the caller's, so linear's backward applies
// it as one elementwise pass, while mlp folds it into its own hidden-gradient
// GEMM (DGELU; with the hidden bias's gradient, DGELU_BGRAD, when unbatched).
#include <cstdlib>
#include <string_view>
#include <vector>

#include "autograd/tape.h"
#include "cpu/elementwise.h"
#include "cpu/linear.h"
#include "cuda/elementwise.h"
#include "cuda/linear.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

// t as a contiguous (numel / cols, cols) matrix; no autograd.
Tensor rows_of(const Tensor& t, int64_t cols) {
  NoGradGuard no_grad;
  Tensor c = contiguous(t);
  return c.as_strided({c.numel() / cols, cols}, {cols, 1}, c.offset());
}

// A contiguous copy of a parameter when it is not contiguous already.
Tensor dense(const Tensor& t) {
  if (!t.defined()) return t;
  NoGradGuard no_grad;
  return contiguous(t);
}

Tensor empty_if(bool wanted, const Shape& shape, TensorOptions options) {
  return wanted ? Tensor::empty(shape, options) : Tensor();
}

// weight (out, in) non-empty with in == in_features, bias (out) or undefined,
// both of like's device and dtype.
void check_layer(const char* op, const Tensor& like, int64_t in_features, const Tensor& weight,
                 const Tensor& bias, const char* weight_name, const char* bias_name) {
  detail::check_defined(op, weight, weight_name);
  detail::check_same_device(op, like, weight);
  detail::check_same_dtype(op, like, weight);
  MINIDL_CHECK(weight.dim() == 2 && weight.size(0) > 0 && weight.size(1) > 0 &&
                   weight.size(1) == in_features,
               op, ": ", weight_name, " ", detail::describe(weight),
               " must be a non-empty (out, in) matrix with in = ", in_features);
  if (bias.defined()) {
    detail::check_same_device(op, weight, bias);
    detail::check_same_dtype(op, weight, bias);
    MINIDL_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), op, ": ", bias_name, " ",
                 detail::describe(bias), " does not match ", weight_name, " ",
                 detail::describe(weight), " (expected (out))");
  }
}

void check_input(const char* op, const Tensor& x) {
  detail::check_defined(op, x, "input");
  detail::check_floating(op, x);
  MINIDL_CHECK(x.dim() >= 1, op, ": input ", detail::describe(x), " must have at least 1 dim");
}

Shape with_last(Shape shape, int64_t last) {
  shape.back() = last;
  return shape;
}

// ---- weight gradients batched across a backward pass ----
// On CUDA (MINIDL_BATCH_WEIGHT_GRADS=0 turns it off, =1 turns it on for
// every device; read at each backward closure) the closures queue their
// weight and bias gradients here instead of computing them
// (autograd::defer), and the pass runs the queue at once: same-shaped
// problems (every layer of a model) grouped, so that a backend can run a
// group as one batched launch (cuda::linear_weight_grads) instead of one
// GEMM, and its split-K and bias-gradient kernels, per layer. The queue keeps
// dz and x until then.
struct WeightGradJob {
  Tensor dz, x, dw, db;
  uint64_t dz_version, x_version;  // an in-place change before the batch runs is an error
};
thread_local std::vector<WeightGradJob> g_weight_grad_jobs;

bool batching_weight_grads(Device device) {
  if (!autograd::in_backward()) return false;
  const char* e = std::getenv("MINIDL_BATCH_WEIGHT_GRADS");
  const std::string_view v = e ? e : "";
  MINIDL_CHECK(v.empty() || v == "0" || v == "1", "MINIDL_BATCH_WEIGHT_GRADS='", v,
               "': expected 0 (off), 1 (on, also on the CPU) or unset (on for CUDA)");
  return v == "1" || (v.empty() && device.is_cuda());
}

void run_weight_grad_jobs() {
  std::vector<WeightGradJob> jobs = std::move(g_weight_grad_jobs);
  g_weight_grad_jobs.clear();
  for (const WeightGradJob& job : jobs)
    MINIDL_CHECK(job.dz.version() == job.dz_version && (!job.x.defined() || job.x.version() == job.x_version),
                 "linear backward: a gradient or input queued for the batched weight gradients "
                 "(MINIDL_BATCH_WEIGHT_GRADS) was modified in place before the batch ran");
  // Groups of one device, dtype and shape, in queue order.
  std::vector<bool> done(jobs.size(), false);
  for (size_t i = 0; i < jobs.size(); ++i) {
    if (done[i]) continue;
    std::vector<const WeightGradJob*> group;
    for (size_t j = i; j < jobs.size(); ++j) {
      const WeightGradJob& a = jobs[i];
      const WeightGradJob& b = jobs[j];
      if (done[j] || a.dz.device() != b.dz.device() || a.dz.dtype() != b.dz.dtype() || a.dz.shape() != b.dz.shape() ||
          a.x.defined() != b.x.defined() || (a.x.defined() && a.x.shape() != b.x.shape()) ||
          a.dw.defined() != b.dw.defined() || a.db.defined() != b.db.defined())
        continue;
      group.push_back(&b);
      done[j] = true;
    }
    bool batched = false;
#if defined(MINIDL_WITH_CUDA)
    if (group.front()->dz.is_cuda() && group.size() > 1) {
      std::vector<cuda::WeightGradProblem> problems;
      for (const WeightGradJob* job : group) problems.push_back({job->dz, job->x, job->dw, job->db});
      backend::DeviceScope scope(group.front()->dz.device());
      batched = cuda::linear_weight_grads(problems);
    }
#endif
    if (!batched)
      for (const WeightGradJob* job : group)
        MINIDL_DISPATCH(job->dz.device(), linear_weight_grad, job->dz, job->x, job->dw, job->db);
  }
}

// dw (defined or not) and db (defined or not) of y = x W^T + b from dz, now or
// queued for the pass's batch.
void weight_grad(const Tensor& dz, const Tensor& x, const Tensor& dw, const Tensor& db) {
  if (!dw.defined() && !db.defined()) return;
  if (batching_weight_grads(dz.device())) {
    if (!autograd::deferred(&g_weight_grad_jobs)) g_weight_grad_jobs.clear();  // left by a pass that threw
    g_weight_grad_jobs.push_back({dz, x, dw, db, dz.version(), x.defined() ? x.version() : 0});
    autograd::defer({dw, db}, &g_weight_grad_jobs, run_weight_grad_jobs);
    return;
  }
  MINIDL_DISPATCH(dz.device(), linear_weight_grad, dz, x, dw, db);
}

}  // namespace

Tensor linear(const Tensor& x, const Tensor& weight, const Tensor& bias, Activation activation) {
  const char* name = "linear";
  check_input(name, x);
  check_layer(name, x, x.size(-1), weight, bias, "weight", "bias");
  const int64_t k = weight.size(1), n = weight.size(0);
  const bool gelu = activation == Activation::Gelu;
  Tensor x2 = rows_of(x, k), w = dense(weight), b = dense(bias);
  const int64_t m = x2.size(0);
  Tensor y = Tensor::empty(with_last(x.shape(), n), x.options());
  Tensor y2 = y.as_strided({m, n}, {n, 1}, 0);
  Tensor pre = empty_if(gelu, {m, n}, x.options());
  if (m > 0) MINIDL_DISPATCH(x.device(), linear_forward, x2, w, b, pre, y2);

  bool grad_x = autograd::needs_grad({x}), grad_w = autograd::needs_grad({weight}),
       grad_b = autograd::needs_grad({bias});
  if (grad_x || grad_w || grad_b) {
    // Each gradient needs only the other operand (and the GELU input).
    autograd::record(
        name, {x, weight, bias}, {y},
        [sx = grad_w ? SavedTensor(x2, name) : SavedTensor(),
         sw = grad_x ? SavedTensor(w, name) : SavedTensor(), spre = SavedTensor(pre, name),
         x_shape = x.shape(), grad_x, grad_w, grad_b, m, n, k](const Grads& g) {
          TensorOptions opts = g[0].options();
          Tensor dz = rows_of(g[0], n);
          if (spre.defined()) {  // through the GELU: dz = g * gelu'(pre)
            Tensor through = Tensor::empty({m, n}, opts);
            if (m > 0)
              MINIDL_DISPATCH(through.device(), binary, BinaryOp::GeluBackward, dz, spre.get(),
                              through);
            dz = through;
          }
          Tensor dx = empty_if(grad_x, x_shape, opts);
          Tensor dw = empty_if(grad_w, {n, k}, opts), db = empty_if(grad_b, {n}, opts);
          if (m == 0) {  // empty batch: the parameters' gradients are sums of nothing
            if (dw.defined()) zero_(dw);
            if (db.defined()) zero_(db);
            return Grads{dx, dw, db};
          }
          weight_grad(dz, grad_w ? sx.get() : Tensor(), dw, db);
          if (grad_x)
            MINIDL_DISPATCH(dz.device(), linear_input_grad, dz, sw.get(), Tensor(),
                            dx.as_strided({m, k}, {k, 1}, 0), Tensor());
          return Grads{dx, dw, db};
        });
  }
  return y;
}

Tensor mlp(const Tensor& x, const Tensor& fc_weight, const Tensor& fc_bias,
           const Tensor& proj_weight, const Tensor& proj_bias) {
  const char* name = "mlp";
  check_input(name, x);
  check_layer(name, x, x.size(-1), fc_weight, fc_bias, "fc_weight", "fc_bias");
  check_layer(name, x, fc_weight.size(0), proj_weight, proj_bias, "proj_weight", "proj_bias");
  const int64_t k = fc_weight.size(1), h = fc_weight.size(0), n = proj_weight.size(0);
  Tensor x2 = rows_of(x, k), w1 = dense(fc_weight), b1 = dense(fc_bias), w2 = dense(proj_weight),
         b2 = dense(proj_bias);
  const int64_t m = x2.size(0);
  Tensor pre = Tensor::empty({m, h}, x.options()), hid = Tensor::empty({m, h}, x.options());
  Tensor y = Tensor::empty(with_last(x.shape(), n), x.options());
  if (m > 0) {
    MINIDL_DISPATCH(x.device(), linear_forward, x2, w1, b1, pre, hid);
    MINIDL_DISPATCH(x.device(), linear_forward, hid, w2, b2, Tensor(),
                    y.as_strided({m, n}, {n, 1}, 0));
  }

  bool grad_x = autograd::needs_grad({x}), grad_w1 = autograd::needs_grad({fc_weight}),
       grad_b1 = autograd::needs_grad({fc_bias}), grad_w2 = autograd::needs_grad({proj_weight}),
       grad_b2 = autograd::needs_grad({proj_bias});
  if (grad_x || grad_w1 || grad_b1 || grad_w2 || grad_b2) {
    autograd::record(
        name, {x, fc_weight, fc_bias, proj_weight, proj_bias}, {y},
        [sx = SavedTensor(x2, name), sw1 = SavedTensor(w1, name), sw2 = SavedTensor(w2, name),
         spre = SavedTensor(pre, name), shid = SavedTensor(hid, name), x_shape = x.shape(),
         grad_x, grad_w1, grad_b1, grad_w2, grad_b2, m, n, h, k](const Grads& g) {
          TensorOptions opts = g[0].options();
          Tensor dy = rows_of(g[0], n);
          Tensor dx = empty_if(grad_x, x_shape, opts);
          Tensor dw1 = empty_if(grad_w1, {h, k}, opts), db1 = empty_if(grad_b1, {h}, opts);
          Tensor dw2 = empty_if(grad_w2, {n, h}, opts), db2 = empty_if(grad_b2, {n}, opts);
          if (m == 0) {
            for (const Tensor& t : {dw1, db1, dw2, db2})
              if (t.defined()) zero_(t);
            return Grads{dx, dw1, db1, dw2, db2};
          }
          Device device = dy.device();
          weight_grad(dy, grad_w2 ? shid.get() : Tensor(), dw2, db2);
          if (grad_x || grad_w1 || grad_b1) {
            // Gradient of the GELU input, with b1's gradient, in one GEMM;
            // when the weight gradients are batched, b1's goes with them (the
            // bias-gradient epilogue costs cuBLASLt extra kernels per layer).
            const bool batched = batching_weight_grads(device);
            Tensor dpre = Tensor::empty({m, h}, opts);
            MINIDL_DISPATCH(device, linear_input_grad, dy, sw2.get(), spre.get(), dpre, batched ? Tensor() : db1);
            if (grad_w1 || (batched && grad_b1))
              weight_grad(dpre, grad_w1 ? sx.get() : Tensor(), dw1, batched ? db1 : Tensor());
            if (grad_x)
              MINIDL_DISPATCH(device, linear_input_grad, dpre, sw1.get(), Tensor(),
                              dx.as_strided({m, k}, {k, 1}, 0), Tensor());
          }
          return Grads{dx, dw1, db1, dw2, db2};
        });
  }
  return y;
}

}  // namespace minidl::ops
