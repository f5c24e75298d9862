#pragma once
// Shared test helpers: random inputs, closeness checks, CUDA skipping.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "autograd/tape.h"
#include "dist/nccl.h"
#include "minidl.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/dilated_attention.h"
#endif

namespace minidl::testing {

// Skips the rest of a CUDA test case, visibly, when no GPU is present.
#define MINIDL_REQUIRE_CUDA()                                                           \
  do {                                                                                  \
    if (!::minidl::cuda_is_available()) {                                               \
      MESSAGE("skipped: no CUDA device");                                               \
      return;                                                                           \
    }                                                                                   \
  } while (0)

// Skips the rest of a multi-GPU NCCL test case, visibly, unless this build
// has NCCL and at least two GPUs are visible.
#define MINIDL_REQUIRE_NCCL_GPUS()                                                                      \
  do {                                                                                                  \
    MINIDL_REQUIRE_CUDA();                                                                              \
    const int minidl_gpus_ = ::minidl::cuda_device_count();                                             \
    if (!::minidl::dist::nccl_available() || minidl_gpus_ < 2) {                                        \
      MESSAGE("skipped: needs NCCL and 2 or more GPUs (", minidl_gpus_, " visible)");                  \
      return;                                                                                           \
    }                                                                                                   \
  } while (0)

// Sets an environment variable (nullptr: unsets it) until the end of the
// scope, then restores what it was, also when a REQUIRE leaves the case early.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    set(value);
  }
  ~ScopedEnv() { restore(); }
  ScopedEnv(const ScopedEnv&) = delete;
  ScopedEnv& operator=(const ScopedEnv&) = delete;
  void set(const char* value) const {
    if (value) setenv(name_.c_str(), value, 1);
    else unsetenv(name_.c_str());
  }
  void restore() const { set(old_ ? old_->c_str() : nullptr); }

 private:
  std::string name_;
  std::optional<std::string> old_;
};

// Fresh random values in [-1, 1) (never zeros), float64 on the CPU by default.
inline Tensor random_tensor(const Shape& shape, TensorOptions options = {DType::Float64}) {
  static Generator gen(20261126);
  Tensor u = ops::rand(shape, {options.dtype, Device::cpu(), false}, &gen);
  Tensor t = ops::add(ops::mul(u, 2.0), -1.0).to(options.device);
  if (options.requires_grad) t.requires_grad_(true);
  return t;
}

// Max |x - y| / (atol + rtol |y|) <= 1, elementwise; reports the worst
// element on failure.
inline void check_close(const std::vector<double>& x, const std::vector<double>& y, double atol, double rtol) {
  REQUIRE(x.size() == y.size());
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double diff = std::abs(x[i] - y[i]);
    double r = diff == 0 ? 0 : diff / (atol + rtol * std::abs(y[i]));  // 0/0 with zero tolerances
    if (!(r <= worst)) {
      worst = r;
      at = i;
    }
  }
  INFO("worst element ", at, ": ", x.empty() ? 0.0 : x[at], " vs ", y.empty() ? 0.0 : y[at]);
  CHECK(worst <= 1.0);
}

// The same for two tensors of one shape, after moving both to float64 on
// the CPU.
inline void check_close(const Tensor& a, const Tensor& b, double atol, double rtol) {
  REQUIRE(a.shape() == b.shape());
  check_close(a.to_vector<double>(), b.to_vector<double>(), atol, rtol);
}

// Float64 gradcheck of forward() over x (first, when defined) and every
// parameter of `module`.
template <typename F>
void check_module_grads(const nn::Module& module, const Tensor& x, F forward,
                        GradcheckOptions options = {}) {
  std::vector<Tensor> inputs;
  if (x.defined()) inputs.push_back(x);
  for (const Tensor& p : module.parameters()) inputs.push_back(p);
  CHECK(gradcheck([&](const std::vector<Tensor>&) { return forward(); }, inputs, options));
}

// Causality of a sequence module (B = 1, T tokens of width C, float64):
// changing the last token leaves the outputs before it as they were (to
// `tol`) and changes the last one.
template <typename M>
void check_causal(M& module, int64_t T, int64_t C, double tol) {
  Tensor x = random_tensor({1, T, C});
  Tensor x2 = ops::clone(x);
  {
    NoGradGuard no_grad;
    ops::copy_(x2.narrow(1, T - 1, 1), random_tensor({1, 1, C}));
  }
  Tensor y = module.forward(x), y2 = module.forward(x2);
  check_close(y.narrow(1, 0, T - 1), y2.narrow(1, 0, T - 1), tol, tol);
  CHECK(y.narrow(1, T - 1, 1).to_vector<double>() != y2.narrow(1, T - 1, 1).to_vector<double>());
}

// y = 2x whose backward defers x's gradient under `key` (autograd::defer),
// as ops::linear's weight gradients on CUDA; the flush throws while *fail.
inline Tensor deferring_double(const Tensor& x, const int* key, const bool* fail = nullptr) {
  Tensor y = ops::mul(x, 2.0).detach();
  autograd::record("deferring_double", {x}, {y}, [key, fail](const std::vector<Tensor>& g) -> std::vector<Tensor> {
    Tensor dx = Tensor::empty(g[0].shape(), g[0].options()), up = g[0];
    autograd::defer({dx}, key, [dx, up, fail] {
      if (fail && *fail) throw std::runtime_error("deferring_double: the flush failed on purpose");
      NoGradGuard no_grad;
      ops::copy_(dx, ops::mul(up, 2.0));
    });
    return {dx};
  });
  return y;
}

#if defined(MINIDL_WITH_CUDA)
// Runs body() once per attention kernel version (MINIDL_ATTENTION_KERNEL) that
// would run the forward or the backward of a problem of this dtype and head
// dim, so every version meets the reference; restores the variable after.
template <typename F>
void for_each_kernel(DType dtype, int64_t d, F&& body) {
  const ScopedEnv env("MINIDL_ATTENTION_KERNEL", nullptr);
  for (auto kernel : {cuda::AttentionKernel::kSimt, cuda::AttentionKernel::kMmaSync,
                      cuda::AttentionKernel::kWgmma, cuda::AttentionKernel::kWarpSpecialized}) {
    const char* name = cuda::attention_kernel_name(kernel);
    env.set(name);
    if (cuda::choose_attention_kernel(dtype, d, cuda::AttentionPass::kForward) != kernel &&
        cuda::choose_attention_kernel(dtype, d, cuda::AttentionPass::kBackward) != kernel)
      continue;  // this version does not take the problem: the ones below it cover it
    CAPTURE(name);
    body();
  }
}
#else
// Without CUDA (its cases return before calling it): the one version there is.
template <typename F>
void for_each_kernel(DType, int64_t, F&& body) {
  body();
}
#endif

}  // namespace minidl::testing
