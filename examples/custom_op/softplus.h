#pragma once
// A user-defined op, written outside the library: softplus(x) = log(1 + e^x).
// docs/extending.md walks through these files.
#include "minidl.h"

namespace myops {

// Forward and backward kernels, one per backend (softplus.cpp, softplus.cu).
void softplus_cpu(const minidl::Tensor& x, minidl::Tensor& y);
void softplus_grad_cpu(const minidl::Tensor& x, const minidl::Tensor& g, minidl::Tensor& dx);
#if defined(MINIDL_WITH_CUDA)
void softplus_cuda(const minidl::Tensor& x, minidl::Tensor& y);
void softplus_grad_cuda(const minidl::Tensor& x, const minidl::Tensor& g, minidl::Tensor& dx);
#endif

// The differentiable op.
minidl::Tensor softplus(const minidl::Tensor& x);

}  // namespace myops
