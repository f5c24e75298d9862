#pragma once
// Philox-4x32 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3",
// SC'11): a counter-based generator. Element i of a random op is a pure
// function of (seed, op offset, i), so CPU and CUDA kernels produce the same
// stream for a seed regardless of how the work is split. Random ops use 10
// rounds (the paper's recommendation, cuRAND's choice); the attention-dropout
// mask uses 7 (core/dilated.h), the fewest with which the paper finds Philox-4x32
// passing TestU01's BigCrush, because its draw sits in the attention
// kernels' inner loop.
#include <math.h>

#include <cstdint>

#include "core/macros.h"

namespace minidl::philox {

struct U32x4 {
  uint32_t x, y, z, w;
};

MINIDL_HD MINIDL_FORCEINLINE uint32_t mulhilo(uint32_t a, uint32_t b, uint32_t* hi) {
#if defined(__CUDA_ARCH__)
  // The 64-bit product, written as such, makes ptxas add a zero to its high
  // word in every round (a VIADD beside each IMAD.WIDE when the key is a
  // 64-bit kernel parameter); __umulhi gives the same bits without it.
  *hi = __umulhi(a, b);
  return a * b;
#else
  uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
#endif
}

template <int kRounds = 10>
MINIDL_HD inline U32x4 philox4x32(U32x4 ctr, uint64_t key64) {
  uint32_t k0 = static_cast<uint32_t>(key64), k1 = static_cast<uint32_t>(key64 >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < kRounds; ++round) {
    uint32_t hi0, hi1;
    uint32_t lo0 = mulhilo(0xD2511F53u, ctr.x, &hi0);
    uint32_t lo1 = mulhilo(0xCD9E8D57u, ctr.z, &hi1);
    ctr = {hi1 ^ ctr.y ^ k0, lo1, hi0 ^ ctr.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return ctr;
}

// The four 32-bit words for block `block` of the op at `offset`.
template <int kRounds = 10>
MINIDL_HD MINIDL_FORCEINLINE U32x4 block(uint64_t seed, uint64_t offset, uint64_t block) {
  return philox4x32<kRounds>({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                              static_cast<uint32_t>(offset), static_cast<uint32_t>(offset >> 32)},
                             seed);
}

MINIDL_HD MINIDL_FORCEINLINE uint32_t lane(const U32x4& b, int i) {
  return i == 0 ? b.x : i == 1 ? b.y : i == 2 ? b.z : b.w;
}

// Uniform in [0, 1) with 24 random bits: exactly representable in float.
MINIDL_HD MINIDL_FORCEINLINE float to_unit_float(uint32_t bits) {
  return static_cast<float>(bits >> 8) * (1.0f / 16777216.0f);
}

// Element i of a uniform stream: block i/4, lane i%4.
MINIDL_HD MINIDL_FORCEINLINE float uniform(uint64_t seed, uint64_t offset, uint64_t i) {
  return to_unit_float(lane(block(seed, offset, i >> 2), static_cast<int>(i & 3)));
}

// Element i of a stream of integers uniform in [0, n), n <= 2^32: the
// 32-bit word i (block i/4, lane i%4) scaled by a multiply-shift, which is
// unbiased up to n / 2^32.
MINIDL_HD MINIDL_FORCEINLINE uint64_t uniform_below(uint64_t seed, uint64_t offset, uint64_t i, uint64_t n) {
  return (static_cast<uint64_t>(lane(block(seed, offset, i >> 2), static_cast<int>(i & 3))) * n) >> 32;
}

// Element i of a standard-normal stream (Box-Muller on the block i/2: even
// i takes the cosine branch, odd i the sine branch).
MINIDL_HD inline float normal(uint64_t seed, uint64_t offset, uint64_t i) {
  U32x4 b = block(seed, offset, i >> 1);
  float u1 = static_cast<float>((b.x >> 8) + 1) * (1.0f / 16777216.0f);  // (0, 1]
  float u2 = to_unit_float(b.y);
  float r = sqrtf(-2.0f * logf(u1));
  float theta = 6.283185307179586f * u2;
  return (i & 1) ? r * sinf(theta) : r * cosf(theta);
}

}  // namespace minidl::philox
