// GEMM throughput. CPU: our blocked AVX2 GEMM (cpu::gemm) float32, square
// n = 256, 512, 1024, raw and through ops::matmul (output allocation
// included), plus the transposed-operand case backward uses. CUDA: cuBLAS
// through ops::matmul at 4096³ and 8192³, float32 (TF32 tensor cores) and
// bfloat16. Each timed iteration on the GPU ends with synchronize(device);
// CUDA benchmarks skip without a GPU. Counters are rates of 2 m n k flops:
// "GFLOP=150/s" reads 150 GFLOP/s.
// Linear layers on the char-LM's shapes (x (16384, 384), hidden 1536),
// forward + backward: the fused ops::mlp (cuBLASLt epilogues) against the
// unfused matmul + bias add + gelu composition it replaced, bfloat16 and
// float32 on CUDA, float32 on the CPU at a smaller batch.
#include <benchmark/benchmark.h>

#include <vector>

#include "cpu/gemm.h"
#include "minidl.h"

using namespace minidl;

namespace {

void report_flops(benchmark::State& state, double flops_per_iteration, const char* unit,
                  double scale) {
  state.counters[unit] = benchmark::Counter(
      flops_per_iteration * static_cast<double>(state.iterations()) / scale,
      benchmark::Counter::kIsRate);
}

std::vector<float> random_floats(int64_t count, uint64_t seed) {
  Generator gen(seed);
  return ops::rand({count}, {DType::Float32}, &gen).to_vector<float>();
}

// cpu::gemm directly: C = op(A) op(B), n x n x n (float64: the CPU's
// gradchecks and attention reference run on it).
template <typename T>
void BM_CpuGemm(benchmark::State& state, bool trans_a, bool trans_b) {
  int64_t n = state.range(0);
  const std::vector<float> fa = random_floats(n * n, 1), fb = random_floats(n * n, 2);
  const std::vector<T> a(fa.begin(), fa.end()), b(fb.begin(), fb.end());
  std::vector<T> c(n * n);
  for (auto _ : state) {
    cpu::gemm<T>(trans_a, trans_b, n, n, n, T(1), a.data(), n, b.data(), n, T(0), c.data(), n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, 2.0 * n * n * n, "GFLOP", 1e9);
}
void BM_CpuGemmF32(benchmark::State& state, bool trans_a, bool trans_b) { BM_CpuGemm<float>(state, trans_a, trans_b); }
void BM_CpuGemmF64(benchmark::State& state, bool trans_a, bool trans_b) { BM_CpuGemm<double>(state, trans_a, trans_b); }

void BM_Matmul(benchmark::State& state, Device device, DType dtype) {
  if (device.is_cuda() && !cuda_is_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  int64_t n = state.range(0);
  Generator gen(3);
  Tensor a = ops::randn({n, n}, {dtype, device}, &gen), b = ops::randn({n, n}, {dtype, device}, &gen);
  NoGradGuard no_grad;
  Tensor warm = ops::matmul(a, b);  // cuBLAS heuristics, allocator cache
  synchronize(device);
  for (auto _ : state) {
    Tensor c = ops::matmul(a, b);
    synchronize(device);
    benchmark::DoNotOptimize(c.raw_data());
  }
  bool gpu = device.is_cuda();
  report_flops(state, 2.0 * n * n * n, gpu ? "TFLOP" : "GFLOP", gpu ? 1e12 : 1e9);
}

// Forward + backward of the feed-forward block, fused or composed.
void BM_Mlp(benchmark::State& state, Device device, DType dtype, bool fused) {
  if (device.is_cuda() && !cuda_is_available()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const int64_t m = state.range(0), c = 384, h = 4 * c;
  Generator gen(4);
  auto param = [&](const Shape& s) {
    Tensor t = ops::mul(ops::randn(s, {dtype, device}, &gen), 0.02);
    return t.detach().requires_grad_(true);
  };
  Tensor x = param({m, c}), w1 = param({h, c}), b1 = param({h}), w2 = param({c, h}), b2 = param({c});
  Tensor seed = ops::randn({m, c}, {dtype, device}, &gen);
  auto step = [&] {
    Tensor y = fused ? ops::mlp(x, w1, b1, w2, b2)
                     : ops::add(ops::matmul(ops::gelu(ops::add(ops::matmul(x, w1.transpose(0, 1)), b1)),
                                            w2.transpose(0, 1)),
                                b2);
    y.backward(seed);
    for (const Tensor& t : {x, w1, b1, w2, b2}) t.zero_grad();
  };
  step();  // cuBLASLt heuristics, allocator cache
  synchronize(device);
  for (auto _ : state) {
    step();
    synchronize(device);
  }
  // Forward 2 GEMMs, backward 4, each 2 m c h flops.
  bool gpu = device.is_cuda();
  report_flops(state, 12.0 * m * c * h, gpu ? "TFLOP" : "GFLOP", gpu ? 1e12 : 1e9);
}

}  // namespace

BENCHMARK_CAPTURE(BM_Mlp, cuda_bf16_fused, Device::cuda(), DType::BFloat16, true)->Arg(16384)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Mlp, cuda_bf16_unfused, Device::cuda(), DType::BFloat16, false)->Arg(16384)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Mlp, cuda_f32_fused, Device::cuda(), DType::Float32, true)->Arg(16384)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Mlp, cuda_f32_unfused, Device::cuda(), DType::Float32, false)->Arg(16384)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Mlp, cpu_f32_fused, Device::cpu(), DType::Float32, true)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Mlp, cpu_f32_unfused, Device::cpu(), DType::Float32, false)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_CpuGemmF32, nn, false, false)->Arg(256)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_CpuGemmF32, tn, true, false)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_CpuGemmF32, nt, false, true)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_CpuGemmF64, nn, false, false)->Arg(256)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, cpu_f32, Device::cpu(), DType::Float32)
    ->Arg(256)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, cuda_f32_tf32, Device::cuda(), DType::Float32)
    ->Arg(4096)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, cuda_bf16, Device::cuda(), DType::BFloat16)
    ->Arg(4096)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
