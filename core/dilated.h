#pragma once
// Dilated-attention configuration shared by the CPU and CUDA kernels and the
// op (see DESIGN.md, "Dilated attention: the exact semantics").
#include <cstdint>
#include <vector>

namespace minidl {

// One branch: segment length w >= 1 and dilation r >= 1. For head h the
// kept offset inside each segment is h mod r.
struct DilatedBranch {
  int64_t segment = 0;
  int64_t dilation = 1;
};

struct DilatedAttentionConfig {
  std::vector<DilatedBranch> branches;
  bool causal = true;
  double scale = 0;  // softmax scale; the op fills in 1/sqrt(D) when 0
};

}  // namespace minidl
