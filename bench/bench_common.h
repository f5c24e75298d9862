#pragma once
// What the attention benchmarks share: LongNet's dilated configuration and
// which of Google Benchmark's runs a summary reports.
#include <benchmark/benchmark.h>

#include <cstdint>

#include "core/dilated.h"

namespace minidl::bench {

// LongNet's branches as the benchmarks run them: w = 2048, 4096, 8192, 16384
// with r = 1, 2, 4, 8; `whole`: the same family (w and r doubling) continued
// until one segment covers a sequence of n tokens.
inline DilatedAttentionConfig longnet_config(int64_t n = 0, bool whole = false) {
  DilatedAttentionConfig config;
  for (int64_t w = 2048, r = 1; whole ? config.branches.empty() || config.branches.back().segment < n : w <= 16384;
       w *= 2, r *= 2)
    config.branches.push_back({w, r});
  return config;
}

// The run a summary reports for a benchmark: the median of its repetitions
// when there are several (--benchmark_repetitions), else its one run.
inline bool reported_run(const benchmark::BenchmarkReporter::Run& run) {
  using Run = benchmark::BenchmarkReporter::Run;
  if (run.error_occurred) return false;
  const bool median = run.run_type == Run::RT_Aggregate && run.aggregate_name == "median";
  if (run.run_type != Run::RT_Iteration && !median) return false;
  return median || run.repetitions <= 1;
}

}  // namespace minidl::bench
