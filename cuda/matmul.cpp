// cuBLAS is column-major; a row-major matrix is the column-major storage of
// its transpose. So C = op(A) op(B) (row-major) is computed as
// Cᵀ = op(B)ᵀ op(A)ᵀ (column-major): B goes first, A second, and the
// transpose flags carry over unchanged.
#include "cuda/matmul.h"

#include <algorithm>
#include <climits>

#include "core/strided.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

// cuBLAS caps strided-batch counts at the grid's z dimension on some paths.
constexpr int64_t kMaxBatchPerCall = 65535;

struct GemmTypes {
  cudaDataType_t data;
  cublasComputeType_t compute;
};

GemmTypes gemm_types(DType dtype) {
  switch (dtype) {
    case DType::Float32: return {CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_TF32};
    case DType::BFloat16: return {CUDA_R_16BF, CUBLAS_COMPUTE_32F};
    case DType::Float64: return {CUDA_R_64F, CUBLAS_COMPUTE_64F};
    default: break;
  }
  MINIDL_FAIL("cuda::matmul: unsupported dtype ", dtype, " (float32, bfloat16 or float64)");
}

int as_int(int64_t v, const char* what) {
  MINIDL_CHECK(v >= 0 && v <= INT_MAX, "cuda::matmul: ", what, " = ", v,
               " does not fit cuBLAS's 32-bit int");
  return static_cast<int>(v);
}

}  // namespace

void matmul(const Tensor& a, bool trans_a, int64_t lda, const Tensor& b, bool trans_b,
            int64_t ldb, const Tensor& out) {
  int64_t nd = out.dim();
  MINIDL_CHECK(nd >= 2 && a.dim() == nd && b.dim() == nd, "cuda::matmul: expected operands of ",
               nd, " dims, got a ", shape_str(a.shape()), ", b ", shape_str(b.shape()), ", out ",
               shape_str(out.shape()));
  int64_t m64 = out.shape()[nd - 2], n64 = out.shape()[nd - 1], k64 = a.shape()[nd - 1];
  if (out.numel() == 0) return;
  int m = as_int(m64, "M"), n = as_int(n64, "N"), k = as_int(k64, "K");
  int lda_i = as_int(lda, "lda"), ldb_i = as_int(ldb, "ldb");
  GemmTypes types = gemm_types(out.dtype());
  size_t esize = element_size(out.dtype());

  // The innermost batch dim is cuBLAS's strided batch; outer ones (left when
  // ops::matmul could not merge them) are a host loop of launches.
  Shape batch(out.shape().begin(), out.shape().end() - 2);
  int64_t inner = batch.empty() ? 1 : batch.back();
  auto inner_stride = [&](const Tensor& t) { return batch.empty() ? 0 : t.strides()[nd - 3]; };
  long long stride_a = inner_stride(a), stride_b = inner_stride(b), stride_c = inner_stride(out);
  Shape outer = batch.empty() ? Shape{} : Shape(batch.begin(), batch.end() - 1);
  auto outer_index = [&](const Tensor& t) {
    return make_strided_index(outer, Shape(t.strides().begin(), t.strides().begin() + outer.size()));
  };
  StridedIndex ai = outer_index(a), bi = outer_index(b), ci = outer_index(out);

  float one_f = 1.0f, zero_f = 0.0f;
  double one_d = 1.0, zero_d = 0.0;
  bool f64 = out.dtype() == DType::Float64;
  const void* alpha = f64 ? static_cast<const void*>(&one_d) : &one_f;
  const void* beta = f64 ? static_cast<const void*>(&zero_d) : &zero_f;
  cublasOperation_t op_a = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  cublasOperation_t op_b = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;

  cublasHandle_t handle = cublas_handle();
  // cuBLAS may split a product into kernels that meet in its workspace.
  const std::unique_lock<std::mutex> queue = lock_device_queue();
  const char* a_base = static_cast<const char*>(a.raw_data());
  const char* b_base = static_cast<const char*>(b.raw_data());
  char* c_base = static_cast<char*>(out.raw_data());
  for (int64_t o = 0, outer_n = numel(outer); o < outer_n; ++o) {
    for (int64_t start = 0; start < inner; start += kMaxBatchPerCall) {
      int count = static_cast<int>(std::min(kMaxBatchPerCall, inner - start));
      const char* pa = a_base + (ai(o) + start * stride_a) * static_cast<int64_t>(esize);
      const char* pb = b_base + (bi(o) + start * stride_b) * static_cast<int64_t>(esize);
      char* pc = c_base + (ci(o) + start * stride_c) * static_cast<int64_t>(esize);
      MINIDL_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
          handle, op_b, op_a, n, m, k, alpha, pb, types.data, ldb_i, stride_b, pa, types.data,
          lda_i, stride_a, beta, pc, types.data, n, stride_c, count, types.compute,
          CUBLAS_GEMM_DEFAULT));
    }
  }
}

}  // namespace minidl::cuda
