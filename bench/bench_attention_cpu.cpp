// The fast CPU dilated-attention path at char-LM size, forward and
// forward+backward, in effective GFLOP/s: only useful work counts, 4 D flops
// per attended (branch, key) pair of every row forward, 2.5 times that
// backward (as FlashAttention counts it); the GFLOP counter is shown per second. Kernels are called directly into
// preallocated buffers, so allocation and autograd are not timed.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dilated.h"
#include "cpu/dilated_attention.h"
#include "minidl.h"

using namespace minidl;

namespace {


struct Problem {
  int64_t B, N, H, D;
  DilatedAttentionConfig config;
  Tensor q, k, v, out, lse, grad_out, dq, dk, dv;

  Problem(int64_t b, int64_t n, int64_t h, int64_t d, std::vector<int64_t> w,
          std::vector<int64_t> r)
      : B(b), N(n), H(h), D(d) {
    config.causal = true;
    config.scale = 1.0 / std::sqrt(static_cast<double>(D));
    for (size_t i = 0; i < w.size(); ++i) config.branches.push_back({std::min(w[i], N), r[i]});
    Generator gen(7);
    TensorOptions f32{DType::Float32};
    // One packed projection, as the attention layer produces it.
    Tensor qkv = ops::randn({B, N, 3, H, D}, f32, &gen);
    q = qkv.slice(2, 0, 1).squeeze(2);
    k = qkv.slice(2, 1, 2).squeeze(2);
    v = qkv.slice(2, 2, 3).squeeze(2);
    out = Tensor::empty({B, N, H, D}, f32);
    lse = Tensor::empty({B, N, H}, f32);
    grad_out = ops::randn({B, N, H, D}, f32, &gen);
    dq = Tensor::empty({B, N, H, D}, f32);
    dk = Tensor::empty({B, N, H, D}, f32);
    dv = Tensor::empty({B, N, H, D}, f32);
  }
  double forward_flops() const { return 4.0 * D * B * attended_pairs(N, H, config); }
};

void forward(benchmark::State& state, Problem& p) {
  for (auto _ : state) {
    cpu::dilated_attention_forward(p.q, p.k, p.v, p.config, p.out, p.lse);
    benchmark::DoNotOptimize(p.out.raw_data());
  }
  state.counters["GFLOP"] =
      benchmark::Counter(p.forward_flops() * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

void forward_backward(benchmark::State& state, Problem& p) {
  for (auto _ : state) {
    cpu::dilated_attention_forward(p.q, p.k, p.v, p.config, p.out, p.lse);
    cpu::dilated_attention_backward(p.q, p.k, p.v, p.out, p.lse, p.grad_out, Tensor(), p.config,
                                    p.dq, p.dk, p.dv);
    benchmark::DoNotOptimize(p.dq.raw_data());
  }
  state.counters["GFLOP"] = benchmark::Counter(3.5 * p.forward_flops() * 1e-9,
                                                 benchmark::Counter::kIsIterationInvariantRate);
}

// Char-LM size: B = 16, N = 256, H = 4, D = 48.
Problem& dense() {
  static Problem p(16, 256, 4, 48, {256}, {1});
  return p;
}
Problem& dilated() {
  static Problem p(16, 256, 4, 48, {64, 128, 256}, {1, 2, 4});
  return p;
}
// Longer sequences: dilated cost grows linearly in N, dense quadratically.
Problem& dense_long() {
  static Problem p(1, 4096, 4, 48, {4096}, {1});
  return p;
}
Problem& dilated_long() {
  static Problem p(1, 4096, 4, 48, {256, 512, 1024, 2048, 4096}, {1, 2, 4, 8, 16});
  return p;
}

void BM_dense_causal_forward(benchmark::State& s) { forward(s, dense()); }
void BM_dense_causal_forward_backward(benchmark::State& s) { forward_backward(s, dense()); }
void BM_dilated_forward(benchmark::State& s) { forward(s, dilated()); }
void BM_dilated_forward_backward(benchmark::State& s) { forward_backward(s, dilated()); }
void BM_dense_causal_N4096_forward_backward(benchmark::State& s) { forward_backward(s, dense_long()); }
void BM_dilated_N4096_forward_backward(benchmark::State& s) { forward_backward(s, dilated_long()); }

}  // namespace

BENCHMARK(BM_dense_causal_forward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_dense_causal_forward_backward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_dilated_forward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_dilated_forward_backward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_dense_causal_N4096_forward_backward)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_dilated_N4096_forward_backward)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
