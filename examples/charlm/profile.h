#pragma once
// `charlm train --profile N`: where the time of a training step goes.
//
// A StepProfiler times the phases of consecutive steps. On the CPU it reads
// the wall clock. On CUDA it also records CUDA events on minidl's stream, in
// one of two modes:
//   - Issue: the steps run as in training. Per phase: the host's time to
//     issue it, and its span on the stream (which includes the time the GPU
//     waits for the host inside the phase). The host time is the host's
//     work alone only when each step starts on an idle device (the caller
//     synchronises before begin_step); back to back, the host waits for the
//     GPU once the launch queue is full.
//   - DeviceOnly: each phase is held back on the stream (a host function
//     that waits for a release) until the host has issued all of its work,
//     so the events time the phase's kernels alone, without launch gaps.
// Nothing in the profiled steps waits for the device; finish() does, once.
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "minidl.h"

namespace charlm {

// The phases of a training step, in order.
enum class Phase : int { Data, Forward, Backward, Optimizer };
constexpr int kPhases = 4;
const char* phase_name(Phase phase);

struct PhaseTimes {
  double ms[kPhases] = {};  // mean per step
  double total() const;
};

class StepProfiler {
 public:
  enum class Mode { Issue, DeviceOnly };
  // Room for `steps` steps on `device` (events are made here, not in the steps).
  StepProfiler(minidl::Device device, int64_t steps, Mode mode);
  ~StepProfiler();
  StepProfiler(const StepProfiler&) = delete;
  StepProfiler& operator=(const StepProfiler&) = delete;

  void begin_step();
  // After the host issued the work of `phase` (phases end in order).
  void end_phase(Phase phase);

  // Waits for the device. The host's issue time per phase, and on CUDA the
  // events' time per phase (Issue: span on the stream; DeviceOnly: the
  // kernels alone), means over the steps.
  struct Result {
    PhaseTimes host, device;
    bool device_valid = false;  // false on the CPU, or when a held phase was released by the timeout
  };
  Result finish();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// Host synchronisations so far (minidl::cuda::host_sync_count(); 0 without CUDA).
uint64_t host_syncs();

// Kernels and other nodes of one step, from a CUDA graph capture of `step`
// (nn::CudaGraph, drawing from `generators`); the captured graph is then
// launched once, so the step takes effect. `error` says why a step could not
// be captured (for example a host synchronisation inside it).
struct StepGraphCounts {
  bool captured = false;
  int64_t kernels = 0, memsets = 0, copies = 0, other = 0;
  // The kernel nodes by kernel name, most launches first (memsets and copies
  // are only counted above: they have no kernel).
  std::vector<std::pair<std::string, int64_t>> kernels_by_name;
  std::string error;
};
StepGraphCounts count_step_graph_nodes(const std::function<void()>& step,
                                       const std::vector<minidl::Generator*>& generators);

// Prints counts.kernels_by_name as a table (count, name), names cut to
// `width` characters.
void print_kernels_by_name(const StepGraphCounts& counts, size_t width = 100);

// The host's time to issue `step` on an idle device, ms per step, the mean of
// `steps` calls: the device is synchronised before each call (not timed), so
// the figure is the host's work alone. Back-to-back calls would instead wait
// for the device once its launch queue is full, and tend to the GPU time.
double host_issue_ms(minidl::Device device, int64_t steps, const std::function<void()>& step);

}  // namespace charlm
