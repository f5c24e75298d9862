#pragma once
// Kernels behind cuda::linear_weight_grads (cuda/linear.cpp): what one
// batched cuBLASLt call needs beside the GEMM. Internal to cuda/.
#include <vector>

#include "core/tensor.h"

namespace minidl::cuda {

// The most problems one batched call takes (the pointers travel as one
// kernel parameter).
constexpr int kMaxLinearBatch = 32;

// A device array of `ptrs` (8 bytes each), written by one kernel that gets
// them as its parameter: no host copy, so a CUDA graph captures it (the
// addresses are the graph's own, fixed across replays). At most
// 3 * kMaxLinearBatch pointers.
Tensor device_pointer_array(const std::vector<const void*>& ptrs, Device device);

// out[p][c] = sum over r of in[p][r][c] for each of the (rows, cols)
// contiguous matrices in[p] (one dtype, float32 or bfloat16), summed in
// float32 in a fixed order (deterministic), into out[p] (cols, same dtype):
// one launch for all of them.
void sum_columns_batched(const std::vector<Tensor>& in, int64_t rows, int64_t cols, const std::vector<Tensor>& out);

}  // namespace minidl::cuda
