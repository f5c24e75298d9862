#include "profile.h"

#include <condition_variable>
#include <cstdio>
#include <mutex>

#if defined(MINIDL_WITH_CUDA)
#include "cuda/runtime.h"
#endif

namespace charlm {

using Clock = std::chrono::steady_clock;

const char* phase_name(Phase phase) {
  static const char* const names[kPhases] = {"data", "forward", "backward", "optimizer"};
  return names[static_cast<int>(phase)];
}

double PhaseTimes::total() const {
  double sum = 0;
  for (double v : ms) sum += v;
  return sum;
}

#if defined(MINIDL_WITH_CUDA)
namespace {

// Holds minidl's stream until the host releases it. The timeout keeps a
// phase that cannot be issued while its start is held (more launches than
// the stream's queue takes, or a host sync inside it) from hanging the
// profile; the measurement is then flagged instead.
constexpr auto kGateTimeout = std::chrono::seconds(5);

struct Gate {
  std::mutex mutex;
  std::condition_variable cv;
  bool open = false, timed_out = false;

  static void CUDART_CB wait(void* self) {
    auto* g = static_cast<Gate*>(self);
    std::unique_lock<std::mutex> lock(g->mutex);
    if (!g->cv.wait_for(lock, kGateTimeout, [g] { return g->open; })) g->timed_out = true;
  }
  void release() {
    {
      std::lock_guard<std::mutex> lock(mutex);
      open = true;
    }
    cv.notify_all();
  }
};

}  // namespace
#endif

struct StepProfiler::Impl {
  minidl::Device device;
  int64_t capacity;
  Mode mode;
  int64_t step = -1;
  int next_phase = kPhases;  // the phase whose end comes next; kPhases between steps
  Clock::time_point mark;
  double host_ms[kPhases] = {};
#if defined(MINIDL_WITH_CUDA)
  // Issue: per step the start, then the end of each phase. DeviceOnly: per
  // phase its start and end.
  int stride = 0;
  std::vector<cudaEvent_t> events;
  std::vector<std::unique_ptr<Gate>> gates;
  Gate* held = nullptr;

  cudaEvent_t event(int64_t s, int k) const { return events[static_cast<size_t>(s * stride + k)]; }
  void record(int64_t s, int k) const { MINIDL_CUDA_CHECK(cudaEventRecord(event(s, k), minidl::cuda::stream())); }
  void hold() {
    gates.push_back(std::make_unique<Gate>());
    held = gates.back().get();
    MINIDL_CUDA_CHECK(cudaLaunchHostFunc(minidl::cuda::stream(), Gate::wait, held));
  }
  void release() {
    if (held) held->release();
    held = nullptr;
  }
#endif
  bool timed() const { return device.is_cuda(); }
};

StepProfiler::StepProfiler(minidl::Device device, int64_t steps, Mode mode)
    : impl_(std::make_unique<Impl>(Impl{.device = device, .capacity = steps, .mode = mode})) {
  MINIDL_CHECK(steps > 0, "StepProfiler: steps must be positive, got ", steps);
#if defined(MINIDL_WITH_CUDA)
  if (impl_->timed()) {
    impl_->stride = mode == Mode::Issue ? kPhases + 1 : 2 * kPhases;
    impl_->events.resize(static_cast<size_t>(steps * impl_->stride));
    for (cudaEvent_t& e : impl_->events) MINIDL_CUDA_CHECK(cudaEventCreate(&e));
  }
#endif
}

StepProfiler::~StepProfiler() {
#if defined(MINIDL_WITH_CUDA)
  if (!impl_->timed()) return;
  // A step that threw may have left the stream held: let it go and wait
  // before the gates and events go away.
  impl_->release();
  try {
    minidl::synchronize(impl_->device);
  } catch (...) {
  }
  for (cudaEvent_t e : impl_->events)
    if (e) cudaEventDestroy(e);
#endif
}

void StepProfiler::begin_step() {
  Impl& m = *impl_;
  MINIDL_CHECK(m.next_phase == kPhases, "StepProfiler: a step began before the previous one ended");
  MINIDL_CHECK(m.step + 1 < m.capacity, "StepProfiler: more than the ", m.capacity, " steps it was made for");
  ++m.step;
  m.next_phase = 0;
#if defined(MINIDL_WITH_CUDA)
  if (m.timed()) {
    if (m.mode == Mode::DeviceOnly) m.hold();
    m.record(m.step, 0);
  }
#endif
  m.mark = Clock::now();
}

void StepProfiler::end_phase(Phase phase) {
  Impl& m = *impl_;
  const int p = static_cast<int>(phase);
  MINIDL_CHECK(p == m.next_phase, "StepProfiler: phase ", phase_name(phase), " ended out of order");
  m.host_ms[p] += std::chrono::duration<double, std::milli>(Clock::now() - m.mark).count();
#if defined(MINIDL_WITH_CUDA)
  if (m.timed()) {
    if (m.mode == Mode::Issue) {
      m.record(m.step, p + 1);
    } else {
      m.record(m.step, 2 * p + 1);
      m.release();
      if (p + 1 < kPhases) {
        m.hold();
        m.record(m.step, 2 * (p + 1));
      }
    }
  }
#endif
  ++m.next_phase;
  m.mark = Clock::now();
}

StepProfiler::Result StepProfiler::finish() {
  Impl& m = *impl_;
  MINIDL_CHECK(m.step >= 0 && m.next_phase == kPhases, "StepProfiler::finish: no complete step");
  const auto n = static_cast<double>(m.step + 1);
  Result r;
  for (int p = 0; p < kPhases; ++p) r.host.ms[p] = m.host_ms[p] / n;
#if defined(MINIDL_WITH_CUDA)
  if (m.timed()) {
    minidl::synchronize(m.device);
    for (int64_t s = 0; s <= m.step; ++s)
      for (int p = 0; p < kPhases; ++p) {
        float ms = 0;
        const bool issue = m.mode == Mode::Issue;
        MINIDL_CUDA_CHECK(cudaEventElapsedTime(&ms, m.event(s, issue ? p : 2 * p), m.event(s, issue ? p + 1 : 2 * p + 1)));
        r.device.ms[p] += ms / n;
      }
    r.device_valid = true;
    for (const auto& g : m.gates) r.device_valid &= !g->timed_out;
  }
#endif
  return r;
}

uint64_t host_syncs() {
#if defined(MINIDL_WITH_CUDA)
  return minidl::cuda::host_sync_count();
#else
  return 0;
#endif
}

StepGraphCounts count_step_graph_nodes(const std::function<void()>& step,
                                       const std::vector<minidl::Generator*>& generators) {
  StepGraphCounts counts;
  try {
    minidl::nn::CudaGraph graph(generators);
    graph.capture(step);
    const minidl::nn::CudaGraph::NodeCounts n = graph.node_counts();
    counts = {.captured = true,
              .kernels = n.kernels,
              .memsets = n.memsets,
              .copies = n.copies,
              .other = n.other,
              .kernels_by_name = graph.kernel_names()};
    graph.replay();  // the capture only recorded the step: run it once
  } catch (const std::exception& e) {
    counts.captured = false;
    counts.error = e.what();
  }
  return counts;
}

void print_kernels_by_name(const StepGraphCounts& counts, size_t width) {
  for (const auto& [name, n] : counts.kernels_by_name) {
    const std::string shown = name.size() > width ? name.substr(0, width - 3) + "..." : name;
    std::printf("  %5lld  %s\n", static_cast<long long>(n), shown.c_str());
  }
}

double host_issue_ms(minidl::Device device, int64_t steps, const std::function<void()>& step) {
  MINIDL_CHECK(steps > 0, "host_issue_ms: steps must be positive, got ", steps);
  double total = 0;
  for (int64_t i = 0; i < steps; ++i) {
    minidl::synchronize(device);
    const Clock::time_point start = Clock::now();
    step();
    total += std::chrono::duration<double, std::milli>(Clock::now() - start).count();
  }
  minidl::synchronize(device);
  return total / static_cast<double>(steps);
}

}  // namespace charlm
