#pragma once
// OpenMP helpers for CPU kernels: small loops stay serial.
#include <omp.h>

#include <cstdint>

namespace minidl::cpu {

constexpr int64_t kParallelGrain = 32768;  // elements below which threads cost more than they save

// Calls f(begin, end) over [0, n) in contiguous chunks, one per thread.
template <typename F>
void parallel_for(int64_t n, int64_t grain, F&& f) {
  if (n <= grain) {
    if (n > 0) f(int64_t{0}, n);
    return;
  }
#pragma omp parallel
  {
    int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t chunk = (n + threads - 1) / threads;
    int64_t begin = t * chunk, end = begin + chunk < n ? begin + chunk : n;
    if (begin < end) f(begin, end);
  }
}

}  // namespace minidl::cpu
