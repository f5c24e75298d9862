#pragma once
// Finite-difference gradient check for ops and modules, in float64 on the CPU
// (flashlight's jacobian test, with a random projection of the output so one
// backward checks the whole Jacobian-vector product).
#include <functional>
#include <vector>

#include "core/tensor.h"

namespace minidl::autograd {

struct GradcheckOptions {
  double eps = 1e-6;   // central-difference step
  double atol = 1e-5;
  double rtol = 1e-4;
  uint64_t seed = 1234;  // for the output projection
};

// For each input that requires grad (float64, CPU), compares the analytic
// gradient of sum(fn(inputs) * w), w random and fixed, with central
// differences element by element. Throws minidl::Error naming the input, the
// element and both values at the first mismatch; returns true otherwise.
bool gradcheck(const std::function<Tensor(const std::vector<Tensor>&)>& fn,
               const std::vector<Tensor>& inputs, GradcheckOptions options = {});

}  // namespace minidl::autograd

namespace minidl {
using autograd::gradcheck;
using autograd::GradcheckOptions;
}
