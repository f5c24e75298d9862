// Kernels behind the batched weight gradients (cuda/linear_batch.h).
#include "cuda/linear_batch.h"

#include <algorithm>

#include "cuda/launch.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

struct PointerList {
  const void* p[3 * kMaxLinearBatch];
  int n;
};

template <typename T>
struct ColumnSumsArgs {
  const T* in[kMaxLinearBatch];
  T* out[kMaxLinearBatch];
};

constexpr int kTileCols = 32, kTileRows = 16;

// Block (0, 0) writes the pointer array. Block (x, p) with p < problems:
// columns [32x, 32x + 32) of matrix p; each of 16 row lanes sums every 16th
// row, then lane 0 adds the 16 partials in order.
template <typename T>
__global__ void prepare_kernel(PointerList list, const void** pointers, ColumnSumsArgs<T> args, int problems,
                               int64_t rows, int64_t cols) {
  const int tx = threadIdx.x, ty = threadIdx.y;
  if (blockIdx.x == 0 && blockIdx.y == 0) {
    const int t = ty * kTileCols + tx;
    if (t < list.n) pointers[t] = list.p[t];
  }
  if (static_cast<int>(blockIdx.y) >= problems) return;
  __shared__ float partial[kTileRows][kTileCols + 1];
  const int64_t c = int64_t(blockIdx.x) * kTileCols + tx;
  const T* in = args.in[blockIdx.y];
  float acc = 0.f;
  if (c < cols)
    for (int64_t r = ty; r < rows; r += kTileRows) acc += static_cast<float>(in[r * cols + c]);
  partial[ty][tx] = acc;
  __syncthreads();
  if (ty == 0 && c < cols) {
    for (int k = 1; k < kTileRows; ++k) acc += partial[k][tx];
    args.out[blockIdx.y][c] = static_cast<T>(acc);
  }
}

static_assert(3 * kMaxLinearBatch <= kTileCols * kTileRows, "block (0, 0) writes every pointer");

}  // namespace

Tensor prepare_weight_grads(const std::vector<const void*>& ptrs, const std::vector<Tensor>& grads, int64_t rows,
                            int64_t cols, const std::vector<Tensor>& sums) {
  MINIDL_CHECK(!grads.empty() && ptrs.size() <= static_cast<size_t>(3 * kMaxLinearBatch) &&
                   grads.size() <= static_cast<size_t>(kMaxLinearBatch) &&
                   (sums.empty() || sums.size() == grads.size()),
               "cuda::prepare_weight_grads: ", ptrs.size(), " pointers (at most ", 3 * kMaxLinearBatch, "), ",
               grads.size(), " gradients (1 to ", kMaxLinearBatch, "), ", sums.size(), " sums (none or as many)");
  const DType dtype = grads.front().dtype();
  MINIDL_CHECK(dtype == DType::Float32 || dtype == DType::BFloat16, "cuda::prepare_weight_grads: dtype ", dtype,
               "; expected float32 or bfloat16");
  const Device device = grads.front().device();
  // Two int32 elements per pointer (8 bytes; the allocator aligns to more).
  Tensor out = Tensor::empty({2 * static_cast<int64_t>(ptrs.size())}, {DType::Int32, device, false});
  PointerList list{};
  for (size_t i = 0; i < ptrs.size(); ++i) list.p[i] = ptrs[i];
  list.n = static_cast<int>(ptrs.size());
  const int problems = cols > 0 ? static_cast<int>(sums.size()) : 0;
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    ColumnSumsArgs<T> args{};
    for (int p = 0; p < problems; ++p) {
      args.in[p] = static_cast<const T*>(grads[p].raw_data());
      args.out[p] = static_cast<T*>(sums[p].raw_data());
    }
    const dim3 grid(problems > 0 ? static_cast<unsigned>((cols + kTileCols - 1) / kTileCols) : 1u,
                    static_cast<unsigned>(std::max(problems, 1)));
    prepare_kernel<T><<<grid, dim3(kTileCols, kTileRows), 0, stream()>>>(
        list, static_cast<const void**>(out.raw_data()), args, problems, rows, cols);
    MINIDL_CUDA_LAUNCH_CHECK();
  };
  if (dtype == DType::Float32) launch(float{});
  else launch(BFloat16{});
  return out;
}

}  // namespace minidl::cuda
