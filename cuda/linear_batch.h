#pragma once
// Kernels behind cuda::linear_weight_grads (cuda/linear.cpp): what one
// batched cuBLASLt call needs beside the GEMM. Internal to cuda/.
#include <vector>

#include "core/tensor.h"

namespace minidl::cuda {

// The most problems one batched call takes (the pointers travel as one
// kernel parameter).
constexpr int kMaxLinearBatch = 32;

// One launch before a batched weight-gradient GEMM. It returns a device
// array of `ptrs` (8 bytes each; at most 3 * kMaxLinearBatch), written by the
// kernel from its parameters: no host copy, so a CUDA graph captures it (the
// addresses are the graph's own, fixed across replays). When `sums` is not
// empty it also writes the bias gradients: sums[p][c] = sum over r of
// grads[p][r][c] for the (rows, cols) contiguous matrices grads[p] (one dtype,
// float32 or bfloat16), summed in float32 in a fixed order (deterministic),
// into sums[p] (cols, same dtype).
Tensor prepare_weight_grads(const std::vector<const void*>& ptrs, const std::vector<Tensor>& grads, int64_t rows,
                            int64_t cols, const std::vector<Tensor>& sums);

}  // namespace minidl::cuda
