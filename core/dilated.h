#pragma once
// Dilated-attention configuration shared by the CPU and CUDA kernels and the
// op (see docs/dilated-attention.md).
#include <cstdint>
#include <vector>

#include "core/macros.h"
#include "core/philox.h"

namespace minidl {

// One branch: segment length w >= 1 and dilation r >= 1. For head h the
// kept offset inside each segment is h mod r.
struct DilatedBranch {
  int64_t segment = 0;
  int64_t dilation = 1;
};

// Dropout on the attention probabilities (training only). Element (branch i,
// batch b, head h, query position p, key t), where t is the key's index among
// the kept rows of its segment, is kept iff
//   philox::uniform(seed, offset, (row << 32) | t) >= keep_threshold,
//   row = ((i * B + b) * H + h) * N + p,
// and kept probabilities are scaled by 1 / (1 - p_drop). The log-sum-exp is
// that of the undropped scores. keep_threshold = ceil(p_drop 2^24) / 2^24 makes
// the float comparison exact (uniforms lie on the 2^-24 grid).
struct AttentionDropout {
  float keep_threshold = 0;  // 0: no dropout
  float scale = 1;
  uint64_t seed = 0, offset = 0;
  MINIDL_HD bool enabled() const { return keep_threshold > 0; }
};

MINIDL_HD MINIDL_FORCEINLINE bool attention_keep(const AttentionDropout& d, uint64_t branch,
                                                 uint64_t batch_size, uint64_t b, uint64_t heads,
                                                 uint64_t h, uint64_t n, uint64_t pos,
                                                 uint64_t key_index) {
  uint64_t row = ((branch * batch_size + b) * heads + h) * n + pos;
  return philox::uniform(d.seed, d.offset, (row << 32) | key_index) >= d.keep_threshold;
}

// The kept positions of branch (w, r) for `head` in segment `segment` of a
// sequence of length n (w already clamped to n): base + t * stride for t in
// [0, count). The one statement of the geometry; every backend and bench uses it.
struct KeptRows {
  int64_t base, stride, count;
};

MINIDL_HD MINIDL_FORCEINLINE KeptRows kept_rows(int64_t n, int64_t w, int64_t r, int64_t head,
                                                int64_t segment) {
  int64_t start = segment * w;
  int64_t end = start + w < n ? start + w : n;
  int64_t first = start + head % r;
  return {first, r, first < end ? (end - first + r - 1) / r : 0};
}

struct DilatedAttentionConfig {
  std::vector<DilatedBranch> branches;
  bool causal = true;
  double scale = 0;  // softmax scale; the op fills in 1/sqrt(D) when 0
  AttentionDropout dropout;
};

}  // namespace minidl

namespace minidl {

// Attended (query, key) pairs of one sequence over `heads` heads, summed over
// branches (a key two branches share counts twice, as the kernels do the
// work twice): what benchmarks turn into FLOPs.
inline double attended_pairs(int64_t n, int64_t heads, const DilatedAttentionConfig& config) {
  double pairs = 0;
  for (const DilatedBranch& br : config.branches) {
    const int64_t w = br.segment < n ? br.segment : n;
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t s = 0; s * w < n; ++s) {
        const double m = static_cast<double>(kept_rows(n, w, br.dilation, h, s).count);
        pairs += config.causal ? m * (m + 1) / 2 : m * m;
      }
  }
  return pairs;
}

}  // namespace minidl
