// Softmax forward over the last dim on CPU and CUDA, plus the char-LM's fused
// cross_entropy and layer_norm (forward + backward) on CUDA. Reports GB/s of
// compulsory traffic (each input read once, each output written once), so
// numbers compare directly with the GPU's memory bandwidth. CUDA timings
// synchronise the device before each iteration ends.
//
//   ./bench_softmax --benchmark_filter=CUDA
#include <benchmark/benchmark.h>

#include "minidl.h"

using namespace minidl;

namespace {

void set_rate(benchmark::State& state, double bytes_per_iteration) {
  state.counters["GB/s"] = benchmark::Counter(bytes_per_iteration * static_cast<double>(state.iterations()) / 1e9,
                                              benchmark::Counter::kIsRate);
}

bool skip_without_cuda(benchmark::State& state) {
  if (cuda_is_available()) return false;
  state.SkipWithError("no CUDA device");
  return true;
}

Tensor random_input(const Shape& shape, DType dtype, Device device) {
  Generator gen(7);
  return ops::add(ops::mul(ops::rand(shape, {DType::Float32}, &gen), 8.0), -4.0).to(dtype).to(device);
}

template <DType dtype>
void BM_softmax_forward(benchmark::State& state, Device device) {
  if (device.is_cuda() && skip_without_cuda(state)) return;
  NoGradGuard no_grad;
  int64_t rows = state.range(0), cols = state.range(1);
  Tensor x = random_input({rows, cols}, dtype, device);
  ops::softmax(x);  // warm-up: allocator cache, lazy CUDA init
  synchronize(device);
  for (auto _ : state) {
    Tensor y = ops::softmax(x);
    benchmark::DoNotOptimize(y.raw_data());
    synchronize(device);
  }
  set_rate(state, 2.0 * static_cast<double>(x.nbytes()));
}

void BM_softmax_forward_cpu_f32(benchmark::State& s) { BM_softmax_forward<DType::Float32>(s, Device::cpu()); }
void BM_softmax_forward_CUDA_f32(benchmark::State& s) { BM_softmax_forward<DType::Float32>(s, Device::cuda()); }
void BM_softmax_forward_CUDA_bf16(benchmark::State& s) { BM_softmax_forward<DType::BFloat16>(s, Device::cuda()); }

// cross_entropy forward + backward: reads logits twice (forward, backward),
// writes dlogits once.
void BM_cross_entropy_fwd_bwd_CUDA_bf16(benchmark::State& state) {
  if (skip_without_cuda(state)) return;
  int64_t rows = state.range(0), cols = state.range(1);
  Tensor logits = random_input({rows, cols}, DType::BFloat16, Device::cuda());
  logits.requires_grad_(true);
  std::vector<int32_t> t(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) t[static_cast<size_t>(i)] = static_cast<int32_t>((i * 31) % cols);
  Tensor targets = from_vector(t, {rows}, {DType::Int32, Device::cuda(), false});
  auto step = [&] {
    ops::cross_entropy(logits, targets).backward();
    logits.zero_grad();
  };
  step();
  synchronize(Device::cuda());
  for (auto _ : state) {
    step();
    synchronize(Device::cuda());
  }
  set_rate(state, 3.0 * static_cast<double>(logits.nbytes()));
}

// layer_norm forward + backward with affine parameters: x read twice, y
// written, dy read, dx written.
void BM_layer_norm_fwd_bwd_CUDA_bf16(benchmark::State& state) {
  if (skip_without_cuda(state)) return;
  int64_t rows = state.range(0), cols = state.range(1);
  Tensor x = random_input({rows, cols}, DType::BFloat16, Device::cuda());
  Tensor w = ops::ones({cols}, {DType::BFloat16, Device::cuda(), true});
  Tensor b = ops::zeros({cols}, {DType::BFloat16, Device::cuda(), true});
  Tensor dy = random_input({rows, cols}, DType::BFloat16, Device::cuda());
  x.requires_grad_(true);
  auto step = [&] {
    ops::layer_norm(x, w, b).backward(dy);
    x.zero_grad();
    w.zero_grad();
    b.zero_grad();
  };
  step();
  synchronize(Device::cuda());
  for (auto _ : state) {
    step();
    synchronize(Device::cuda());
  }
  set_rate(state, 5.0 * static_cast<double>(x.nbytes()));
}

void softmax_sizes(benchmark::internal::Benchmark* b) {
  b->Args({4096, 4096})->Args({65536, 65})->Args({16384, 384})->UseRealTime()->Unit(benchmark::kMicrosecond);
}
void charlm_sizes(benchmark::internal::Benchmark* b) {
  b->Args({16384, 65})->Args({16384, 384})->UseRealTime()->Unit(benchmark::kMicrosecond);
}

}  // namespace

BENCHMARK(BM_softmax_forward_cpu_f32)->Apply(softmax_sizes);
BENCHMARK(BM_softmax_forward_CUDA_f32)->Apply(softmax_sizes);
BENCHMARK(BM_softmax_forward_CUDA_bf16)->Apply(softmax_sizes);
BENCHMARK(BM_cross_entropy_fwd_bwd_CUDA_bf16)->Apply(charlm_sizes);
BENCHMARK(BM_layer_norm_fwd_bwd_CUDA_bf16)->Apply(charlm_sizes);

BENCHMARK_MAIN();
