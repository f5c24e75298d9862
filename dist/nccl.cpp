// The NCCL backend (dist/nccl.h): a Communicator over one ncclComm_t whose
// collectives run on a communication stream of the communicator's device,
// forked from and joined back to minidl's stream with events (the plain
// collectives join at once, the async ones at Work::wait()).
//
// Why the async path is safe with the caching allocator (cuda/allocator.cpp),
// which hands a freed block to the next kernel without an event because all
// work of a device runs on one stream: the blocks the communication stream
// touches are those of the collective's tensors, which the caller (and the
// Work, which holds references) keeps alive until wait(); wait() orders
// minidl's stream behind the collective, so a block freed after it is reused
// only by work that runs after the collective. Blocks other work frees
// meanwhile are never touched by the communication stream.
#include "dist/nccl.h"

#include <nccl.h>
#include <unistd.h>

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <filesystem>
#include <fstream>
#include <string>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "cuda/launch.h"
#include "cuda/runtime.h"
#include "dist/launch.h"

namespace minidl::dist {
namespace {

#define MINIDL_NCCL_CHECK(expr)                                                                   \
  do {                                                                                            \
    ncclResult_t minidl_nccl_ = (expr);                                                           \
    if (minidl_nccl_ != ncclSuccess)                                                              \
      MINIDL_FAIL("NCCL call ", #expr, " failed: ", ncclGetErrorString(minidl_nccl_), " (", __FILE__, \
                  ":", __LINE__, ")");                                                            \
  } while (0)

// NVLink multicast (NVLS) stays off unless the user's environment says otherwise.
void disable_nvls_unless_set() { setenv("NCCL_NVLS_ENABLE", "0", /*overwrite=*/0); }

ncclDataType_t nccl_type(DType dtype) {
  switch (dtype) {
    case DType::Float32: return ncclFloat32;
    case DType::Float64: return ncclFloat64;
    case DType::BFloat16: return ncclBfloat16;
    case DType::Int32: return ncclInt32;
  }
  MINIDL_FAIL("dist (NCCL): no NCCL type for ", dtype);
}

// The communication stream of one rank's communicators: the one a rank was
// given and every communicator split from it share it, so that the rank's
// async collectives run in the order it starts them, as the plain ones do on
// minidl's stream. (NCCL kernels block until every rank has joined; the
// collectives of several communicators on several streams may deadlock:
// NCCL's user guide, "Using multiple NCCL communicators concurrently".)
// Non-blocking (not ordered with the legacy default stream) and of the
// highest priority, so that its kernels are scheduled ahead of the compute
// work they run beside. Events come from a pool: one fork event, reused
// (cudaStreamWaitEvent reads an event's state when it is called), and done
// events, lent to a Work until it waits.
class CommStream {
 public:
  explicit CommStream(int device) {
    const int prev = cuda::current_device();
    MINIDL_CUDA_CHECK(cudaSetDevice(device));
    int least = 0, greatest = 0;
    MINIDL_CUDA_CHECK(cudaDeviceGetStreamPriorityRange(&least, &greatest));
    MINIDL_CUDA_CHECK(cudaStreamCreateWithPriority(&stream_, cudaStreamNonBlocking, greatest));
    MINIDL_CUDA_CHECK(cudaEventCreateWithFlags(&fork_, cudaEventDisableTiming));
    MINIDL_CUDA_CHECK(cudaSetDevice(prev));
  }
  ~CommStream() {
    for (cudaEvent_t e : free_) cudaEventDestroy(e);
    cudaEventDestroy(fork_);
    cudaStreamDestroy(stream_);  // returns at once; queued work still completes
  }
  CommStream(const CommStream&) = delete;
  CommStream& operator=(const CommStream&) = delete;

  cudaStream_t stream() const { return stream_; }
  // Makes this stream wait for the work queued on `compute` so far.
  void fork_from(cudaStream_t compute) {
    std::lock_guard<std::mutex> lock(mu_);
    MINIDL_CUDA_CHECK(cudaEventRecord(fork_, compute));
    MINIDL_CUDA_CHECK(cudaStreamWaitEvent(stream_, fork_, 0));
  }
  // A done event from the pool (taken before a collective is queued, so that
  // failing to get one queues nothing).
  cudaEvent_t take_event() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        cudaEvent_t e = free_.back();
        free_.pop_back();
        return e;
      }
    }
    cudaEvent_t e = nullptr;
    MINIDL_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    return e;
  }
  // Records `done` on this stream now (after the collective just queued). If
  // that fails, waits for the stream on the host before throwing: the
  // collective's tensors may be freed once the caller unwinds.
  void record_done(cudaEvent_t done) {
    const cudaError_t err = cudaEventRecord(done, stream_);
    if (err != cudaSuccess) {
      cudaStreamSynchronize(stream_);
      give_back(done);
    }
    MINIDL_CUDA_CHECK(err);
  }
  void give_back(cudaEvent_t e) {
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(e);
  }

 private:
  std::mutex mu_;  // guards free_ and the fork event's record-then-wait
  cudaStream_t stream_ = nullptr;
  cudaEvent_t fork_ = nullptr;
  std::vector<cudaEvent_t> free_;
};

class NcclCommunicator final : public Communicator {
 public:
  // Takes ownership of `comm`, a communicator on CUDA device `device`;
  // `stream`: the communication stream of the communicator it was split
  // from (null: a new one).
  NcclCommunicator(ncclComm_t comm, int device, std::shared_ptr<CommStream> stream = nullptr)
      : comm_(comm), device_(device), comm_stream_(stream ? std::move(stream) : std::make_shared<CommStream>(device)) {
    MINIDL_NCCL_CHECK(ncclCommUserRank(comm_, &rank_));
    MINIDL_NCCL_CHECK(ncclCommCount(comm_, &size_));
  }
  ~NcclCommunicator() override {
    // Unwinding an error: abort (finalize would wait for the other ranks,
    // which may be waiting in a collective this rank will never join).
    // Else wait for the communicator's queued work. Errors cannot be thrown here.
    if (std::uncaught_exceptions() > 0) {
      ncclCommAbort(comm_);
      return;
    }
    ncclCommFinalize(comm_);
    ncclCommDestroy(comm_);
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  // The plain collectives are the async ones waited at once: every NCCL
  // call of a rank then runs on its one communication stream, in the order
  // the rank makes them, never beside another of its collectives on
  // minidl's stream (collectives of several communicators on several
  // streams may deadlock). wait() enqueues no host wait.
  void all_gather(const Tensor& input, const Tensor& output) override { all_gather_async(input, output).wait(); }
  void reduce_scatter(const Tensor& input, const Tensor& output) override {
    reduce_scatter_async(input, output).wait();
  }
  void all_reduce(const Tensor& tensor) override { all_reduce_async(tensor).wait(); }

  Work all_gather_async(const Tensor& input, const Tensor& output) override {
    return start({input, output}, [&](cudaStream_t s) { launch_all_gather(input, output, s); });
  }
  Work reduce_scatter_async(const Tensor& input, const Tensor& output) override {
    return start({input, output}, [&](cudaStream_t s) { launch_reduce_scatter(input, output, s); });
  }
  Work all_reduce_async(const Tensor& tensor) override {
    return start({tensor}, [&](cudaStream_t s) { launch_all_reduce(tensor, s); });
  }

  void broadcast(const Tensor& tensor, int root) override {
    check("broadcast", tensor);
    MINIDL_CHECK(root >= 0 && root < size_, "dist::broadcast: root ", root, " is not a rank of a communicator of size ",
                 size_);
    start({tensor}, [&](cudaStream_t s) {
      MINIDL_NCCL_CHECK(ncclBroadcast(tensor.raw_data(), tensor.raw_data(), static_cast<size_t>(tensor.numel()),
                                      nccl_type(tensor.dtype()), root, comm_, s));
    }).wait();
  }

  // NCCL has no host barrier: an all-reduce of one element, waited for. So,
  // unlike the in-process backend, it also waits for this rank's queued work.
  void barrier() override {
    ensure_device();
    if (!token_.defined()) token_ = Tensor::empty({1}, {DType::Int32, Device::cuda(device_)});
    all_reduce(token_);
    cuda::synchronize();
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MINIDL_CHECK(color >= 0 || color == kNoColor, "dist::split (NCCL): color must be >= 0 or kNoColor, got ", color);
    ensure_device();
    ncclComm_t sub = nullptr;
    MINIDL_NCCL_CHECK(ncclCommSplit(comm_, color == kNoColor ? NCCL_SPLIT_NOCOLOR : color, key, &sub, nullptr));
    if (color == kNoColor) return nullptr;
    return std::make_unique<NcclCommunicator>(sub, device_, comm_stream_);
  }

 private:
  void launch_all_gather(const Tensor& input, const Tensor& output, cudaStream_t stream) {
    check("all_gather", input);
    check("all_gather", output);
    check_pair("all_gather", input, output, input.numel() * size_);
    MINIDL_NCCL_CHECK(ncclAllGather(input.raw_data(), output.raw_data(), static_cast<size_t>(input.numel()),
                                    nccl_type(input.dtype()), comm_, stream));
  }
  void launch_reduce_scatter(const Tensor& input, const Tensor& output, cudaStream_t stream) {
    check("reduce_scatter", input);
    check("reduce_scatter", output);
    MINIDL_CHECK(input.numel() % size_ == 0, "dist::reduce_scatter: input has ", input.numel(),
                 " elements, not a multiple of the communicator size ", size_);
    check_pair("reduce_scatter", input, output, input.numel() / size_);
    MINIDL_NCCL_CHECK(ncclReduceScatter(input.raw_data(), output.raw_data(), static_cast<size_t>(output.numel()),
                                        nccl_type(input.dtype()), ncclSum, comm_, stream));
  }
  void launch_all_reduce(const Tensor& tensor, cudaStream_t stream) {
    check("all_reduce", tensor);
    MINIDL_NCCL_CHECK(ncclAllReduce(tensor.raw_data(), tensor.raw_data(), static_cast<size_t>(tensor.numel()),
                                    nccl_type(tensor.dtype()), ncclSum, comm_, stream));
  }

  // An async collective: the communication stream waits for minidl's stream
  // (the input as of now), runs `launch`, and records a done event that
  // wait() makes minidl's stream wait for; the host never waits. A fork and
  // join by events, which a CUDA graph capture records as graph edges: the
  // communication stream joins the capture at the fork and leaves it at the
  // join, so the same path serves while capturing (provided wait() comes
  // before the capture ends, as the interface requires). The Work holds
  // `keep` (the collective's tensors) until it waits.
  template <typename Launch>
  Work start(std::vector<Tensor> keep, Launch&& launch) {
    ensure_device();
    const cudaStream_t compute = cuda::stream();
    const cudaEvent_t done = comm_stream_->take_event();
    try {
      comm_stream_->fork_from(compute);
      launch(comm_stream_->stream());  // a check failing here queues nothing
    } catch (...) {
      comm_stream_->give_back(done);
      throw;
    }
    comm_stream_->record_done(done);
    // A collective started outside a capture and joined inside it (or the
    // reverse) would invalidate the capture: say so plainly instead.
    const bool started_capturing = cuda::stream_capturing();
    return Work([cs = comm_stream_, compute, done, started_capturing, keep = std::move(keep)] {
      if (cuda::stream_capturing() != started_capturing) {  // on the rank's thread: compute is its stream
        cudaStreamSynchronize(cs->stream());  // the collective's tensors may be freed once this throws
        cs->give_back(done);
        MINIDL_FAIL("dist (NCCL): an async collective started ", started_capturing ? "inside" : "outside",
                    " a CUDA graph capture was waited for ", started_capturing ? "outside" : "inside",
                    " it; start and wait for it in the same one (for DataParallel: capture the backward and "
                    "all_reduce_gradients() together)");
      }
      const cudaError_t err = cudaStreamWaitEvent(compute, done, 0);
      cs->give_back(done);
      MINIDL_CUDA_CHECK(err);
    });
  }

  void ensure_device() const {
    MINIDL_CHECK(cuda::current_device() == device_, "dist (NCCL): rank ", rank_, "'s communicator is on cuda:", device_,
                 " but the calling thread's current device is cuda:", cuda::current_device());
  }
  void check(const char* op, const Tensor& t) const {
    MINIDL_CHECK(t.defined(), "dist::", op, " (NCCL): undefined tensor");
    MINIDL_CHECK(t.is_cuda() && t.device().index == device_, "dist::", op, " (NCCL): tensor ", shape_str(t.shape()), " is on ",
                 t.device(), ", expected cuda:", device_, " (the rank's device)");
    MINIDL_CHECK(t.is_contiguous(), "dist::", op, " (NCCL): tensor ", shape_str(t.shape()), " must be contiguous");
    ensure_device();
  }
  void check_pair(const char* op, const Tensor& input, const Tensor& output, int64_t want) const {
    MINIDL_CHECK(input.dtype() == output.dtype(), "dist::", op, " (NCCL): input is ", input.dtype(), ", output ",
                 output.dtype(), "; expected the same dtype");
    MINIDL_CHECK(output.numel() == want, "dist::", op, " (NCCL): output ", shape_str(output.shape()), " has ", output.numel(),
                 " elements, expected ", want, " (input ", shape_str(input.shape()), ", ", size_, " ranks)");
  }

  ncclComm_t comm_;
  int device_;
  std::shared_ptr<CommStream> comm_stream_;  // shared with the communicators split from this one
  int rank_ = 0, size_ = 1;
  Tensor token_;  // barrier's one element
};

}  // namespace

bool nccl_available() { return true; }

void run_nccl(int num_gpus, const std::function<void(Communicator&)>& fn) {
  const int visible = minidl::cuda_device_count();
  MINIDL_CHECK(num_gpus >= 1 && num_gpus <= visible, "dist::run_nccl: asked for ", num_gpus, " GPUs, ", visible,
               " visible");
  disable_nvls_unless_set();
  std::vector<ncclComm_t> comms(static_cast<size_t>(num_gpus));
  std::vector<int> devices(static_cast<size_t>(num_gpus));
  for (int i = 0; i < num_gpus; ++i) devices[static_cast<size_t>(i)] = i;
  MINIDL_NCCL_CHECK(ncclCommInitAll(comms.data(), num_gpus, devices.data()));
  std::vector<std::exception_ptr> errors(static_cast<size_t>(num_gpus));
  std::mutex mu;
  std::condition_variable cv;
  int returned = 0, first_failed = -1;  // guarded by mu
  auto body = [&](int i) {
    std::exception_ptr error;
    try {
      MINIDL_CUDA_CHECK(cudaSetDevice(i));
      NcclCommunicator comm(comms[static_cast<size_t>(i)], i);
      fn(comm);
    } catch (...) {
      error = std::current_exception();
    }
    std::lock_guard<std::mutex> lock(mu);
    errors[static_cast<size_t>(i)] = error;
    if (error && first_failed < 0) first_failed = i;
    ++returned;
    cv.notify_all();
  };
  std::vector<std::thread> threads;
  for (int i = 0; i < num_gpus; ++i) threads.emplace_back(body, i);
  {
    // Once a rank has failed, the others may wait for it in a collective
    // forever, and then this never returns: say why, unless they return soon.
    std::unique_lock<std::mutex> lock(mu);
    cv.wait(lock, [&] { return returned == num_gpus || first_failed >= 0; });
    constexpr int kGraceSeconds = 10;
    if (!cv.wait_for(lock, std::chrono::seconds(kGraceSeconds), [&] { return returned == num_gpus; }))
      std::fprintf(stderr,
                   "[minidl] dist::run_nccl: rank %d of %d failed: %s\n"
                   "[minidl] %d rank(s) have not returned %d s later: they may wait for it in a collective that "
                   "cannot complete; if the program does not end, end it\n",
                   first_failed, num_gpus, detail::exception_message(errors[static_cast<size_t>(first_failed)]).c_str(),
                   num_gpus - returned, kGraceSeconds);
  }
  for (auto& t : threads) t.join();
  // The first failure is the cause; later ones may be its consequences.
  if (first_failed >= 0) std::rethrow_exception(errors[static_cast<size_t>(first_failed)]);
}

std::unique_ptr<Communicator> nccl_from_env(const std::string& id_file_arg) {
  namespace fs = std::filesystem;
  MINIDL_CHECK(std::getenv("WORLD_SIZE"), "dist::nccl_from_env: the environment variable WORLD_SIZE is not set");
  const ProcessRank me = process_rank_from_env();
  const int world = me.world, rank = me.rank, device = me.local;
  const int visible = minidl::cuda_device_count();
  MINIDL_CHECK(visible > 0, "dist::nccl_from_env: no CUDA device is visible");
  MINIDL_CHECK(device < visible, "dist::nccl_from_env: LOCAL_RANK=", device, " but only ", visible,
               " GPUs are visible");
  std::string id_file = id_file_arg;
  if (id_file.empty()) {
    const char* v = std::getenv("MINIDL_NCCL_ID_FILE");
    id_file = v ? v : "";
  }
  MINIDL_CHECK(!id_file.empty(), "dist::nccl_from_env: no id file (pass a path on a shared filesystem, or set "
                                 "MINIDL_NCCL_ID_FILE)");
  MINIDL_CUDA_CHECK(cudaSetDevice(device));
  disable_nvls_unless_set();

  ncclUniqueId id;
  if (rank == 0) {
    // A file left by an earlier job (one that failed before every rank
    // joined) may already have been read by this job's other ranks as theirs.
    std::error_code ec;
    MINIDL_CHECK(!fs::exists(id_file, ec), "dist::nccl_from_env: ", id_file,
                 " already exists, perhaps left by an earlier job that failed before every rank joined; "
                 "the other ranks may have read it as this job's id: stop them, remove the file (or use a "
                 "fresh path) and start again");
    MINIDL_NCCL_CHECK(ncclGetUniqueId(&id));
    // Written whole under a temporary name, then renamed: readers never see half an id.
    const std::string tmp = id_file + ".tmp." + std::to_string(getpid());
    {
      std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
      out.write(id.internal, sizeof id.internal);
      MINIDL_CHECK(out.good(), "dist::nccl_from_env: cannot write ", tmp, ": ", std::strerror(errno));
    }
    fs::rename(tmp, id_file);
  } else {
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(10);
    for (;;) {
      std::ifstream in(id_file, std::ios::binary);
      if (in.good() && in.read(id.internal, sizeof id.internal) && in.gcount() == sizeof id.internal) break;
      MINIDL_CHECK(std::chrono::steady_clock::now() < deadline, "dist::nccl_from_env: rank ", rank,
                   " waited 10 minutes for rank 0 to write ", id_file);
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  }
  ncclComm_t comm = nullptr;
  MINIDL_NCCL_CHECK(ncclCommInitRank(&comm, world, id, rank));
  auto result = std::make_unique<NcclCommunicator>(comm, device);
  // Every rank has joined once a collective completes: the id file is no longer needed.
  result->barrier();
  if (rank == 0) {
    std::error_code ec;
    fs::remove(id_file, ec);
  }
  return result;
}

}  // namespace minidl::dist
