// Elementwise throughput: add (2 reads, 1 write) and gelu (1 read, 1 write)
// on 16M float32 elements, CPU and CUDA, as GB/s of bytes read + written.
// CUDA fast paths on the char-LM's shapes: a bias added to (16384, 1536)
// rows, a per-row scale, float32 <-> bfloat16 casts, and the same add on a
// view one element off 16-byte alignment (the unvectorised path) and with a
// broadcast the fast paths do not cover (the strided path), for contrast.
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

constexpr int64_t kRows = 16384, kCols = 1536;  // B x T and 4 n_embd of the nanoGPT recipe

Tensor matrix(const Shape& shape, DType dtype, Device device, uint64_t seed) {
  Generator gen(seed);
  return ops::rand(shape, {dtype, device}, &gen);
}

// y = a (kRows, kCols) op b, b of shape `b_shape` (broadcast); bytes = a + y
// (+ b, read once).
void BM_Broadcast(benchmark::State& state, DType dtype, Shape b_shape, bool mul) {
  Device device = Device::cuda();
  if (skip_without_device(state, device)) return;
  Tensor a = matrix({kRows, kCols}, dtype, device, 4), b = matrix(b_shape, dtype, device, 5);
  auto op = [&] { return mul ? ops::mul(a, b) : ops::add(a, b); };
  Tensor warm = op();
  synchronize(device);
  int64_t bytes = (2 * a.numel() + b.numel()) * static_cast<int64_t>(element_size(dtype));
  run_and_report(state, bytes, [&] {
    Tensor y = op();
    synchronize(device);
    benchmark::DoNotOptimize(y.raw_data());
  });
}

// a + b with a one element into its storage (no 16-byte vectors), or with b
// broadcast along a middle dim (the strided kernel), float32.
void BM_AddSlowPath(benchmark::State& state, bool misaligned) {
  Device device = Device::cuda();
  if (skip_without_device(state, device)) return;
  Tensor base = matrix({kRows * kCols + 1}, DType::Float32, device, 6);
  Tensor a = misaligned ? base.narrow(0, 1, kRows * kCols).view({kRows, kCols})
                        : base.narrow(0, 0, kRows * kCols).view({128, kRows / 128, kCols});
  Tensor b = misaligned ? matrix({kRows, kCols}, DType::Float32, device, 7)
                        : matrix({128, 1, kCols}, DType::Float32, device, 7);
  Tensor warm = ops::add(a, b);
  synchronize(device);
  int64_t bytes = (2 * a.numel() + b.numel()) * static_cast<int64_t>(sizeof(float));
  run_and_report(state, bytes, [&] {
    Tensor y = ops::add(a, b);
    synchronize(device);
    benchmark::DoNotOptimize(y.raw_data());
  });
}

void BM_Cast(benchmark::State& state, DType from, DType to) {
  Device device = Device::cuda();
  if (skip_without_device(state, device)) return;
  Tensor x = matrix({kElements}, from, device, 8);
  Tensor warm = x.to(to);
  synchronize(device);
  int64_t bytes = kElements * static_cast<int64_t>(element_size(from) + element_size(to));
  run_and_report(state, bytes, [&] {
    Tensor y = x.to(to);
    synchronize(device);
    benchmark::DoNotOptimize(y.raw_data());
  });
}

}  // namespace

BENCHMARK_CAPTURE(BM_Broadcast, bias_bf16, DType::BFloat16, Shape{kCols}, false)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Broadcast, bias_f32, DType::Float32, Shape{kCols}, false)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Broadcast, row_scale_bf16, DType::BFloat16, Shape{kRows, 1}, true)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Broadcast, same_shape_bf16, DType::BFloat16, Shape{kRows, kCols}, false)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_AddSlowPath, misaligned_f32, true)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_AddSlowPath, strided_f32, false)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Cast, f32_to_bf16, DType::Float32, DType::BFloat16)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Cast, bf16_to_f32, DType::BFloat16, DType::Float32)->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Add, cpu, Device::cpu())->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Add, cuda, Device::cuda())->Unit(benchmark::kMicrosecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Gelu, cpu, Device::cpu())->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK_CAPTURE(BM_Gelu, cuda, Device::cuda())->Unit(benchmark::kMicrosecond)->UseRealTime();

BENCHMARK_MAIN();
