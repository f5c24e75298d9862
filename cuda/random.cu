#include "core/philox.h"
#include "core/strided.h"
#include "core/scalar_math.h"
#include "cuda/random.h"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

constexpr int kThreads = 256;

template <typename S, bool kNormal>
__global__ void fill_kernel(S* out, int64_t n, uint64_t seed, uint64_t offset) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float v = kNormal ? philox::normal(seed, offset, i) : philox::uniform(seed, offset, i);
    out[i] = static_cast<S>(v);
  }
}

template <bool kNormal>
void fill(const Tensor& out, uint64_t seed, uint64_t offset) {
  int64_t n = out.numel();
  if (n == 0) return;
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    fill_kernel<S, kNormal><<<grid_for(n, kThreads), kThreads, 0, stream()>>>(
        static_cast<S*>(out.raw_data()), n, seed, offset);
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

// One thread per Philox block, i.e. per 4 consecutive elements: the block's
// four words are the uniforms of elements 4b .. 4b+3, as in philox::uniform.
template <typename S, typename C, bool kFlat>
__global__ void dropout_kernel(const S* x, S* out, int64_t n, StridedIndex xi, uint64_t seed,
                               PhiloxOffset philox_offset, float keep_threshold, C scale) {
  const uint64_t offset = philox_offset.value();
  int64_t blocks = (n + 3) / 4;
  for (int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; b < blocks;
       b += int64_t(gridDim.x) * blockDim.x) {
    philox::U32x4 r = philox::block(seed, offset, static_cast<uint64_t>(b));
#pragma unroll
    for (int lane = 0; lane < 4; ++lane) {
      int64_t i = 4 * b + lane;
      if (i < n) {
        bool keep = philox::to_unit_float(philox::lane(r, lane)) >= keep_threshold;
        C v = static_cast<C>(x[kFlat ? i : xi(i)]);
        out[i] = static_cast<S>(keep ? v * scale : C(0));
      }
    }
  }
}

__global__ void offset_word_kernel(uint64_t* word, uint64_t value, bool add) {
  *word = add ? *word + value : value;
}

void offset_word(uint64_t* word, uint64_t value, bool add) {
  MINIDL_CHECK(word != nullptr, "cuda offset word: null address");
  offset_word_kernel<<<1, 1, 0, stream()>>>(word, value, add);
  MINIDL_CUDA_LAUNCH_CHECK();
}

}  // namespace

void set_offset_word(uint64_t* word, uint64_t value) { offset_word(word, value, false); }
void advance_offset_word(uint64_t* word, uint64_t n) { offset_word(word, n, true); }

void fill_uniform(const Tensor& out, uint64_t seed, uint64_t offset) { fill<false>(out, seed, offset); }
void fill_normal(const Tensor& out, uint64_t seed, uint64_t offset) { fill<true>(out, seed, offset); }

void dropout(const Tensor& x, uint64_t seed, PhiloxOffset offset, float keep_threshold, double scale,
             const Tensor& out) {
  int64_t n = out.numel();
  if (n == 0) return;
  StridedIndex xi = make_strided_index(x.shape(), x.strides());
  unsigned grid = grid_for((n + 3) / 4, kThreads);
  visit_dtype(out.dtype(), [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    const S* xp = static_cast<const S*>(x.raw_data());
    S* op = static_cast<S*>(out.raw_data());
    if (x.is_contiguous())
      dropout_kernel<S, C, true><<<grid, kThreads, 0, stream()>>>(xp, op, n, xi, seed, offset,
                                                                  keep_threshold, C(scale));
    else
      dropout_kernel<S, C, false><<<grid, kThreads, 0, stream()>>>(xp, op, n, xi, seed, offset,
                                                                   keep_threshold, C(scale));
    MINIDL_CUDA_LAUNCH_CHECK();
  });
}

}  // namespace minidl::cuda
