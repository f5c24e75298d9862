// GEMM throughput. CPU: our blocked AVX2 GEMM (cpu::gemm) float32, square
// n = 256, 512, 1024, raw and through ops::matmul (output allocation
// included), plus the transposed-operand case backward uses. CUDA: cuBLAS
// through ops::matmul at 4096³ and 8192³, float32 (TF32 tensor cores) and
// bfloat16. Each timed iteration on the GPU ends with synchronize(device);
// CUDA benchmarks skip without a GPU. Counters are rates of 2 m n k flops:
// "GFLOP=150/s" reads 150 GFLOP/s.
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

// cpu::gemm directly: C = op(A) op(B), n x n x n.
void BM_CpuGemmF32(benchmark::State& state, bool trans_a, bool trans_b) {
  int64_t n = state.range(0);
  std::vector<float> a = random_floats(n * n, 1), b = random_floats(n * n, 2), c(n * n);
  for (auto _ : state) {
    cpu::gemm<float>(trans_a, trans_b, n, n, n, 1.0f, a.data(), n, b.data(), n, 0.0f, c.data(), n);
    benchmark::DoNotOptimize(c.data());
    benchmark::ClobberMemory();
  }
  report_flops(state, 2.0 * n * n * n, "GFLOP", 1e9);
}

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

}  // namespace

BENCHMARK_CAPTURE(BM_CpuGemmF32, nn, false, false)->Arg(256)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_CpuGemmF32, tn, true, false)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_CpuGemmF32, nt, false, true)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, cpu_f32, Device::cpu(), DType::Float32)
    ->Arg(256)->Arg(512)->Arg(1024)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, cuda_f32_tf32, Device::cuda(), DType::Float32)
    ->Arg(4096)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Matmul, cuda_bf16, Device::cuda(), DType::BFloat16)
    ->Arg(4096)->Arg(8192)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
