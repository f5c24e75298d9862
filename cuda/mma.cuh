#pragma once
// Thin wrappers over the sm_80+ warp-level instructions the tensor-core
// attention kernels use: ldmatrix, mma.sync m16n8k16 (bf16 -> fp32) and
// m16n8k8 (tf32 -> fp32), and cp.async. Fragment layouts follow the PTX ISA
// ("Matrix fragments for mma.m16n8k16 / m16n8k8"): for an accumulator, lane l
// holds rows l/4 and l/4 + 8, columns 2*(l%4) and 2*(l%4) + 1.
#include <cuda_bf16.h>

#include <cstdint>

namespace minidl::cuda::mma {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(p)));
}

// 2^x in one MUFU instruction, results below 2^-126 flushed to zero (exp2f
// without -ftz wraps the same instruction in a range check and two multiplies:
// four issue slots for every softmax weight). 2^-inf = +0.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// d += a * b for a 16x16 (row) by 16x8 (col) bf16 tile, fp32 accumulation.
__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// d += a * b for a 16x8 (row) by 8x8 (col) tf32 tile, fp32 accumulation
// (mma.m16n8k8): lane l holds a = {A[l/4][l%4], A[l/4+8][l%4], A[l/4][l%4+4],
// A[l/4+8][l%4+4]} and b = {B[l%4][l/4], B[l%4+4][l/4]}; the accumulator
// layout is that of m16n8k16.
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// fp32 -> tf32 (10-bit mantissa), rounded to nearest, ties away from zero.
__device__ __forceinline__ uint32_t to_tf32(float x) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// 16-byte global->shared copy; zero-fills when !valid (src must still be a
// mapped address).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// *p += {a, b} as one vector reduction (sm_90; two scalar ones before it);
// p must be 8-byte aligned.
__device__ __forceinline__ void red_add_v2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// A tile of `Rows` rows of D bf16 in shared memory, stored in 16-byte chunks
// whose index is XOR-swizzled by the row so that ldmatrix over 8 rows of one
// chunk column touches 8 different bank groups.
template <int Rows, int D>
struct SmemTile {
  static constexpr int kChunks = D / 8;
  static constexpr int kBytes = Rows * D * 2;
  static __device__ __forceinline__ int swizzle(int row, int chunk) {
    if constexpr (kChunks >= 8) return chunk ^ (row & 7);
    else return chunk ^ ((row >> 1) & (kChunks - 1));
  }
  static __device__ __forceinline__ char* at(char* base, int row, int chunk) {
    return base + row * (D * 2) + swizzle(row, chunk) * 16;
  }
};

}  // namespace minidl::cuda::mma
