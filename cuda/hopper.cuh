#pragma once
// Hopper (sm_90a) asynchronous primitives for warp-specialised kernels: shared-
// memory mbarriers, TMA tile loads (cp.async.bulk.tensor) that complete on an
// mbarrier, register reallocation between warpgroups (setmaxnreg) and named
// barriers. Only translation units built for sm_90a (cuda/sm90a/) include
// this. Semantics follow the PTX ISA; the host side (tensor maps) is in
// cuda/tensor_map.h.
#include <cuda.h>

#include <cstdint>

#include "cuda/mma.cuh"

namespace minidl::cuda::hopper {

// ---- mbarrier (one 8-byte word of shared memory) ----

__device__ __forceinline__ void mbar_init(uint64_t* bar, uint32_t arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(mma::smem_addr(bar)), "r"(arrivals));
}
// Makes initialised barriers visible to the async proxy (TMA) before use.
__device__ __forceinline__ void mbar_fence_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(mma::smem_addr(bar)) : "memory");
}
// One arrival that also expects `bytes` of TMA traffic before the phase completes.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(mma::smem_addr(bar)),
               "r"(bytes)
               : "memory");
}
// Waits until the phase of parity `parity` has completed. A fresh barrier is
// in phase 0, so waiting on parity 1 returns at once (the "previous" phase).
__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT_%=;\n}\n" ::"r"(mma::smem_addr(bar)),
      "r"(parity)
      : "memory");
}

// ---- TMA ----

// Loads the box at coordinates (c0, c1, c2, c3) of a 4-d tensor map into
// shared memory; completion is counted in bytes on `bar`.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* map, uint64_t* bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(mma::smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(mma::smem_addr(bar)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Adds a shared-memory tile into global memory through a tensor map (fp32
// element-wise atomic add), tracked by the issuing thread's bulk group.
// The writers of `src` must have run fence.proxy.async before it is issued.
__device__ __forceinline__ void tma_reduce_add_4d(const CUtensorMap* map, const void* src, int c0, int c1, int c2,
                                                  int c3) {
  asm volatile(
      "cp.reduce.async.bulk.tensor.4d.global.shared::cta.add.tile.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(map)),
      "r"(mma::smem_addr(src)), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}
// Stores a shared-memory tile into global memory through a 3-d tensor map,
// tracked by the issuing thread's bulk group (the writers of `src` must have
// run fence.proxy.async before it is issued).
__device__ __forceinline__ void tma_store_3d(const CUtensorMap* map, const void* src, int c0, int c1, int c2) {
  asm volatile("cp.async.bulk.tensor.3d.global.shared::cta.tile.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::"l"(
                   reinterpret_cast<uint64_t>(map)),
               "r"(mma::smem_addr(src)), "r"(c0), "r"(c1), "r"(c2)
               : "memory");
}
__device__ __forceinline__ void bulk_commit() { asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"); }
// Waits until at most N of this thread's bulk groups still read their source.
template <int N>
__device__ __forceinline__ void bulk_wait_read() {
  asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
}
// Waits until all of this thread's bulk groups are complete.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }

__device__ __forceinline__ void tma_prefetch_descriptor(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// ---- shared-memory stores of accumulator fragments ----

// Stores four 8x8 bf16 matrices held in the accumulator layout (lane l: row
// l / 4, columns 2 (l % 4) and + 1 of each, packed in r[i]); lane l gives the
// address of row l % 8 of matrix l / 8. One instruction for four per-lane stores,
// without the bank conflicts of per-lane stores into a swizzled tile.
__device__ __forceinline__ void stmatrix_x4(void* row_addr, uint32_t r0, uint32_t r1, uint32_t r2, uint32_t r3) {
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(mma::smem_addr(row_addr)),
               "r"(r0), "r"(r1), "r"(r2), "r"(r3)
               : "memory");
}

// ---- registers and barriers between warpgroups ----

// Every warp of a warpgroup runs the same one; needs a register cap at entry
// (__launch_bounds__(threads, 1)). setmaxnreg moves registers inside one pool
// per block, which holds what the block was launched with (PTX ISA): a split
// that asks for more than that makes setmaxnreg.inc wait forever, a hang and
// not an error. Kernels check their split with the two functions below.
template <int kRegs>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

// The most registers a thread gets at launch under __launch_bounds__(threads,
// 1): the 64K register file in ptxas's 8-register steps (168 at 384 threads).
constexpr int max_launch_regs(int threads) { return 65536 / threads / 8 * 8; }
// The registers a thread needs at launch for one producer warpgroup at
// `producer` registers and the other warpgroups at `consumer`.
constexpr int split_launch_regs(int threads, int producer, int consumer) {
  return (128 * producer + (threads - 128) * consumer + threads - 1) / threads;
}
// Whether that split fits the pool a launch gives the block.
constexpr bool split_fits(int threads, int producer, int consumer) {
  return split_launch_regs(threads, producer, consumer) <= max_launch_regs(threads);
}
static_assert(split_launch_regs(384, 56, 224) == max_launch_regs(384), "the ws kernels' split fills the pool exactly");
static_assert(!split_fits(384, 96, 208), "the split that hung (session 40) is refused");

// Named barrier `id` (1..15; 0 is __syncthreads) over `threads` threads.
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace minidl::cuda::hopper
