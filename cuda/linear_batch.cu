// Kernels behind the batched weight gradients (cuda/linear_batch.h).
#include "cuda/linear_batch.h"

#include "cuda/launch.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

struct PointerList {
  const void* p[3 * kMaxLinearBatch];
  int n;
};

__global__ void write_pointers(PointerList list, const void** out) {
  if (threadIdx.x < list.n) out[threadIdx.x] = list.p[threadIdx.x];
}

template <typename T>
struct ColumnSumsArgs {
  const T* in[kMaxLinearBatch];
  T* out[kMaxLinearBatch];
};

constexpr int kTileCols = 32, kTileRows = 16;

// Block (x, p): columns [32x, 32x + 32) of matrix p; each of 16 row lanes sums
// every 16th row, then lane 0 adds the 16 partials in order.
template <typename T>
__global__ void column_sums(ColumnSumsArgs<T> args, int64_t rows, int64_t cols) {
  __shared__ float partial[kTileRows][kTileCols + 1];
  const int tx = threadIdx.x, ty = threadIdx.y;
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

}  // namespace

Tensor device_pointer_array(const std::vector<const void*>& ptrs, Device device) {
  MINIDL_CHECK(ptrs.size() <= static_cast<size_t>(3 * kMaxLinearBatch), "cuda::device_pointer_array: ",
               ptrs.size(), " pointers, at most ", 3 * kMaxLinearBatch);
  // Two int32 elements per pointer (8 bytes; the allocator aligns to more).
  Tensor out = Tensor::empty({2 * static_cast<int64_t>(ptrs.size())}, {DType::Int32, device, false});
  PointerList list{};
  for (size_t i = 0; i < ptrs.size(); ++i) list.p[i] = ptrs[i];
  list.n = static_cast<int>(ptrs.size());
  write_pointers<<<1, 3 * kMaxLinearBatch, 0, stream()>>>(list, static_cast<const void**>(out.raw_data()));
  MINIDL_CUDA_LAUNCH_CHECK();
  return out;
}

void sum_columns_batched(const std::vector<Tensor>& in, int64_t rows, int64_t cols, const std::vector<Tensor>& out) {
  MINIDL_CHECK(!in.empty() && in.size() == out.size() && in.size() <= static_cast<size_t>(kMaxLinearBatch),
               "cuda::sum_columns_batched: ", in.size(), " inputs, ", out.size(), " outputs (1 to ", kMaxLinearBatch,
               ", as many outputs)");
  if (cols == 0) return;
  const DType dtype = in.front().dtype();
  MINIDL_CHECK(dtype == DType::Float32 || dtype == DType::BFloat16, "cuda::sum_columns_batched: dtype ", dtype,
               "; expected float32 or bfloat16");
  auto launch = [&](auto tag) {
    using T = decltype(tag);
    ColumnSumsArgs<T> args{};
    for (size_t p = 0; p < in.size(); ++p) {
      args.in[p] = static_cast<const T*>(in[p].raw_data());
      args.out[p] = static_cast<T*>(out[p].raw_data());
    }
    const dim3 grid(static_cast<unsigned>((cols + kTileCols - 1) / kTileCols), static_cast<unsigned>(in.size()));
    column_sums<T><<<grid, dim3(kTileCols, kTileRows), 0, stream()>>>(args, rows, cols);
    MINIDL_CUDA_LAUNCH_CHECK();
  };
  if (dtype == DType::Float32) launch(float{});
  else launch(BFloat16{});
}

}  // namespace minidl::cuda
