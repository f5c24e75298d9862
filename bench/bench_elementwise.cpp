// Elementwise throughput: add (2 reads, 1 write) and gelu (1 read, 1 write)
// on 16M float32 elements, CPU and CUDA, as GB/s of bytes read + written.
// Each timed iteration ends with synchronize(device), so CUDA numbers are
// kernel completion, not launch. CUDA benchmarks skip without a GPU.
#include <benchmark/benchmark.h>

#include <chrono>

#include "minidl.h"

using namespace minidl;

namespace {

constexpr int64_t kElements = int64_t{16} << 20;

bool skip_without_device(benchmark::State& state, Device device) {
  if (device.is_cuda() && !cuda_is_available()) {
    state.SkipWithError("no CUDA device");
    return true;
  }
  return false;
}

// Runs `body` (one op followed by synchronize) as the timed loop and reports
// GB/s over the loop's wall time, the same clock as UseRealTime().
template <typename Body>
void run_and_report(benchmark::State& state, int64_t bytes_per_iteration, Body body) {
  auto start = std::chrono::steady_clock::now();
  for (auto _ : state) body();
  double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  double bytes = static_cast<double>(bytes_per_iteration) * static_cast<double>(state.iterations());
  state.counters["GB/s"] = seconds > 0 ? bytes / seconds / 1e9 : 0.0;
}

Tensor input(Device device, uint64_t seed) {
  Generator gen(seed);
  return ops::rand({kElements}, {DType::Float32, device}, &gen);
}

void BM_Add(benchmark::State& state, Device device) {
  if (skip_without_device(state, device)) return;
  Tensor a = input(device, 1), b = input(device, 2);
  Tensor warm = ops::add(a, b);  // first call allocates; the caching allocator reuses it
  synchronize(device);
  run_and_report(state, 3 * kElements * static_cast<int64_t>(sizeof(float)), [&] {
    Tensor c = ops::add(a, b);
    synchronize(device);
    benchmark::DoNotOptimize(c.raw_data());
  });
}

void BM_Gelu(benchmark::State& state, Device device) {
  if (skip_without_device(state, device)) return;
  Tensor x = input(device, 3);
  Tensor warm = ops::gelu(x);
  synchronize(device);
  run_and_report(state, 2 * kElements * static_cast<int64_t>(sizeof(float)), [&] {
    Tensor y = ops::gelu(x);
    synchronize(device);
    benchmark::DoNotOptimize(y.raw_data());
  });
}

}  // namespace

BENCHMARK_CAPTURE(BM_Add, cpu, Device::cpu())->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Add, cuda, Device::cuda())->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Gelu, cpu, Device::cpu())->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Gelu, cuda, Device::cuda())->Unit(benchmark::kMicrosecond)->UseRealTime();

BENCHMARK_MAIN();
