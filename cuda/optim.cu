// Multi-tensor optimizer kernels. A launch covers up to kMaxTensors tensors:
// block b handles one kChunk-element chunk of one tensor, found by a binary
// search over the table's first-chunk indices. The table travels as a
// by-value __grid_constant__ kernel parameter (CUDA 12.1+ allows 32 KB on
// Volta and later), so a launch needs no upload and no host sync, and a
// captured graph replays it as recorded. Scalars that change between steps
// (lr, the step counter, the clip coefficient) are read from device memory.
#include "core/scalar_math.h"
#include "cuda/optim.h"
#include "cuda/reductions.cuh"
#include "cuda/runtime.h"

namespace minidl::cuda {
namespace {

constexpr int64_t kChunk = 8192;  // elements per block
constexpr int kThreads = 256;
constexpr int kMaxTensors = 192;  // per launch: 12 KB of AdamW table

enum DTypeCode : uint8_t { kFloat32, kFloat64, kBFloat16 };

uint8_t dtype_code(DType d) {
  switch (d) {
    case DType::Float32: return kFloat32;
    case DType::Float64: return kFloat64;
    case DType::BFloat16: return kBFloat16;
    default: MINIDL_FAIL("cuda optimizer kernels: unsupported dtype ", d);
  }
}

int32_t chunks_of(int64_t numel) { return static_cast<int32_t>((numel + kChunk - 1) / kChunk); }

// Calls f with a tag of the C++ type behind a dtype code.
template <typename F> __device__ __forceinline__ void visit_code(uint8_t code, F&& f) {
  switch (code) {
    case kFloat32: f(float{}); break;
    case kFloat64: f(double{}); break;
    default: f(BFloat16{}); break;
  }
}

template <typename E> struct Table {
  E entries[kMaxTensors];
  int32_t count = 0;
  int32_t chunks = 0;  // blocks of this launch
};

// The entry whose chunks contain blockIdx.x (entries sorted by chunk_begin).
template <typename E> __device__ __forceinline__ const E& entry_of_block(const Table<E>& t) {
  int lo = 0, hi = t.count - 1;
  const int32_t b = static_cast<int32_t>(blockIdx.x);
  while (lo < hi) {
    int mid = (lo + hi + 1) / 2;
    if (t.entries[mid].chunk_begin <= b) lo = mid;
    else hi = mid - 1;
  }
  return t.entries[lo];
}

// Adds tensors to tables of at most kMaxTensors, launching each full one.
template <typename E, typename Launch>
void for_each_table(const std::vector<E>& entries, const std::vector<int64_t>& numels, Launch&& launch) {
  Table<E> table;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (numels[i] == 0) continue;
    if (table.count == kMaxTensors) {
      launch(table);
      table = Table<E>();
    }
    E e = entries[i];
    e.chunk_begin = table.chunks;
    table.entries[table.count++] = e;
    table.chunks += chunks_of(numels[i]);
  }
  if (table.count > 0) launch(table);
}

// ---- AdamW ----

struct AdamWEntry {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  BFloat16* copy;  // null without a compute copy
  int64_t numel;
  double weight_decay;
  int32_t chunk_begin;
  uint8_t grad_dtype;
};

template <typename P, typename G>
__device__ __forceinline__ void adamw_chunk(const AdamWEntry& e, int64_t begin, int64_t end,
                                            const AdamWScalars& s, double beta1, double beta2,
                                            double epsilon) {
  using C = compute_t<P>;
  P* __restrict__ p = static_cast<P*>(e.param);
  const G* __restrict__ g = static_cast<const G*>(e.grad);
  P* __restrict__ m = static_cast<P*>(e.exp_avg);
  P* __restrict__ v = static_cast<P*>(e.exp_avg_sq);
  BFloat16* __restrict__ copy = e.copy;
  const C decay = C(s.decay), b1 = C(beta1), b2 = C(beta2), step = C(s.step_size);
  const C inv_sqrt_bc2 = C(s.inv_sqrt_bc2), eps = C(epsilon);
  for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
    C gi = C(g[i]);
    C mi = b1 * C(m[i]) + (C(1) - b1) * gi;
    C vi = b2 * C(v[i]) + (C(1) - b2) * gi * gi;
    m[i] = P(mi);
    v[i] = P(vi);
    C pi = C(p[i]) * decay - step * mi / (sqrt(vi) * inv_sqrt_bc2 + eps);
    p[i] = P(pi);
    if (copy) copy[i] = BFloat16(float(pi));
  }
}

// Counts the blocks of a step's AdamW launches (last_block_to_arrive).
__device__ unsigned int g_adamw_arrivals;

// Updates with the step counter's next value; the last of the step's
// `blocks` blocks (over all its launches, which run in order) stores it.
template <typename P>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const __grid_constant__ Table<AdamWEntry> table, const double* __restrict__ lr,
                 double* __restrict__ step, double beta1, double beta2, double eps, unsigned blocks) {
  const AdamWEntry& e = entry_of_block(table);
  const int64_t begin = int64_t(blockIdx.x - e.chunk_begin) * kChunk;
  const int64_t end = begin + kChunk < e.numel ? begin + kChunk : e.numel;
  const double next = *step + 1;
  const AdamWScalars s = adamw_scalars(*lr, next, beta1, beta2, e.weight_decay);
  visit_code(e.grad_dtype, [&](auto gtag) {
    adamw_chunk<P, decltype(gtag)>(e, begin, end, s, beta1, beta2, eps);
  });
  // Every block has read the counter before the last one arrives.
  if (last_block_to_arrive(&g_adamw_arrivals, blocks) && threadIdx.x == 0) *step = next;
}

__global__ void advance_step_kernel(double* step) { *step += 1; }

// ---- global norm and clipping ----

struct NormEntry {
  void* data;
  int64_t numel;
  int32_t chunk_begin;
  uint8_t dtype;
};

// Counts the blocks of a norm's sum_squares launches (last_block_to_arrive).
__device__ unsigned int g_norm_arrivals;

// The norm and the clip coefficient from the partials, in a fixed order
// (that of the 1024-thread finalizing launch this replaces: the same bits).
template <typename A>
__device__ void finalize_norm(const A* __restrict__ partials, int64_t n, A max_norm, A* __restrict__ norm,
                              A* __restrict__ coef) {
  A acc[1];
  strided_sums_as<1024>(n, [&](int64_t i, A (&v)[1]) { v[0] = __ldcg(partials + i); }, acc);
  if (threadIdx.x == 0) {
    A total = sqrt(acc[0]);
    *norm = total;
    *coef = clip_coefficient(total, max_norm);
  }
}

// The empty case (no sum_squares blocks): one block finalizes nothing.
template <typename A>
__global__ void finalize_norm_kernel(const A* __restrict__ partials, int64_t n, A max_norm, A* __restrict__ norm,
                                     A* __restrict__ coef) {
  finalize_norm(partials, n, max_norm, norm, coef);
}

// One partial sum of squares per block, written at partial_base + block; the
// last of the norm's `blocks` blocks (over all its launches, which run in
// order) finalizes the norm.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    sum_squares_kernel(const __grid_constant__ Table<NormEntry> table, A* __restrict__ partials,
                       int64_t partial_base, unsigned blocks, A max_norm, A* __restrict__ norm,
                       A* __restrict__ coef) {
  const NormEntry& e = entry_of_block(table);
  const int64_t begin = int64_t(blockIdx.x - e.chunk_begin) * kChunk;
  const int64_t end = begin + kChunk < e.numel ? begin + kChunk : e.numel;
  A acc = 0;
  visit_code(e.dtype, [&](auto tag) {
    using S = decltype(tag);
    const S* __restrict__ x = static_cast<const S*>(e.data);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) {
      A xi = A(x[i]);
      acc += xi * xi;
    }
  });
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[partial_base + blockIdx.x] = acc;
  if (last_block_to_arrive(&g_norm_arrivals, blocks)) finalize_norm(partials, blocks, max_norm, norm, coef);
}

template <typename A>
__global__ void __launch_bounds__(kThreads)
    scale_kernel(const __grid_constant__ Table<NormEntry> table, const A* __restrict__ coef) {
  const A c = *coef;
  if (c == A(1)) return;  // under the limit: nothing to write
  const NormEntry& e = entry_of_block(table);
  const int64_t begin = int64_t(blockIdx.x - e.chunk_begin) * kChunk;
  const int64_t end = begin + kChunk < e.numel ? begin + kChunk : e.numel;
  visit_code(e.dtype, [&](auto tag) {
    using S = decltype(tag);
    using C = compute_t<S>;
    S* __restrict__ x = static_cast<S*>(e.data);
    for (int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) x[i] = S(C(x[i]) * C(c));
  });
}

}  // namespace

void adamw_step(const std::vector<AdamWTensors>& params, const Tensor& lr, const Tensor& step,
                const AdamWHyper& h) {
  cudaStream_t s = stream();
  int64_t blocks = 0;
  for (const AdamWTensors& t : params) blocks += chunks_of(t.param.numel());
  if (blocks == 0) {  // nothing to update: the counter still advances
    advance_step_kernel<<<1, 1, 0, s>>>(static_cast<double*>(step.raw_data()));
    MINIDL_CUDA_LAUNCH_CHECK();
    return;
  }
  MINIDL_CHECK(blocks <= INT32_MAX, "adamw_step (cuda): ", blocks, " blocks of ", kChunk, " elements; at most 2^31 - 1");
  // The launches below count their blocks together in g_adamw_arrivals.
  const std::unique_lock<std::mutex> queue = lock_device_queue();
  // One kernel per parameter dtype (all float32 masters in mixed precision).
  for (DType dtype : {DType::Float32, DType::Float64, DType::BFloat16}) {
    std::vector<AdamWEntry> entries;
    std::vector<int64_t> numels;
    for (const AdamWTensors& t : params) {
      if (t.param.dtype() != dtype) continue;
      entries.push_back({t.param.raw_data(), t.grad.raw_data(), t.exp_avg.raw_data(),
                         t.exp_avg_sq.raw_data(),
                         t.copy.defined() ? static_cast<BFloat16*>(t.copy.raw_data()) : nullptr,
                         t.param.numel(), t.weight_decay, 0, dtype_code(t.grad.dtype())});
      numels.push_back(t.param.numel());
    }
    visit_dtype(dtype, [&](auto tag) {
      using P = decltype(tag);
      if constexpr (!std::is_same_v<P, int32_t>) {
        for_each_table(entries, numels, [&](const Table<AdamWEntry>& table) {
          adamw_kernel<P><<<table.chunks, kThreads, 0, s>>>(
              table, static_cast<const double*>(lr.raw_data()), static_cast<double*>(step.raw_data()), h.beta1,
              h.beta2, h.eps, static_cast<unsigned>(blocks));
          MINIDL_CUDA_LAUNCH_CHECK();
        });
      }
    });
  }
}

void clip_by_global_norm(const std::vector<Tensor>& grads, double max_norm, const Tensor& norm) {
  std::vector<NormEntry> entries;
  std::vector<int64_t> numels;
  int64_t total_chunks = 0;
  for (const Tensor& g : grads) {
    entries.push_back({g.raw_data(), g.numel(), 0, dtype_code(g.dtype())});
    numels.push_back(g.numel());
    total_chunks += chunks_of(g.numel());
  }
  cudaStream_t s = stream();
  // Freed at return: later work on the one stream is ordered after these kernels.
  Tensor partials = Tensor::empty({std::max<int64_t>(total_chunks, 1)}, norm.options());
  Tensor coef = Tensor::empty({}, norm.options());
  // The sum-of-squares launches count their blocks together in g_norm_arrivals.
  const std::unique_lock<std::mutex> queue = lock_device_queue();
  visit_dtype(norm.dtype(), [&](auto tag) {
    using A = decltype(tag);
    if constexpr (std::is_same_v<A, float> || std::is_same_v<A, double>) {
      A* p = static_cast<A*>(partials.raw_data());
      A* c = static_cast<A*>(coef.raw_data());
      A* nrm = static_cast<A*>(norm.raw_data());
      int64_t base = 0;
      for_each_table(entries, numels, [&](const Table<NormEntry>& table) {
        sum_squares_kernel<A><<<table.chunks, kThreads, 0, s>>>(table, p, base, static_cast<unsigned>(total_chunks),
                                                                A(max_norm), nrm, c);
        MINIDL_CUDA_LAUNCH_CHECK();
        base += table.chunks;
      });
      if (total_chunks == 0) {  // no elements: the norm is 0
        finalize_norm_kernel<A><<<1, kThreads, 0, s>>>(p, 0, A(max_norm), nrm, c);
        MINIDL_CUDA_LAUNCH_CHECK();
      }
      for_each_table(entries, numels, [&](const Table<NormEntry>& table) {
        scale_kernel<A><<<table.chunks, kThreads, 0, s>>>(table, c);
        MINIDL_CUDA_LAUNCH_CHECK();
      });
    }
  });
}

}  // namespace minidl::cuda
