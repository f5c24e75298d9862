#pragma once
// The ranks of `charlm train --dp N --sp M`: this rank's share of a batch and
// its collectives (Ranks), what every rank trains (Replica), and the ranks
// besides train_run's own (rank 0): threads of this process (OtherRanks,
// follow_rank0) or processes joined through NCCL (join_process_ranks, StartVote).
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>

#include "dist/communicator.h"
#include "minidl.h"
#include "nn/data_parallel.h"
#include "options.h"
#include "train_internal.h"

namespace charlm {

// This rank's part in data parallelism (--dp N) and sequence parallelism
// (--sp M), over a world of N * M ranks (world rank = dp index * M + sp
// index): every rank draws the same global batch and computes on its block
// of it: batch / N rows (its dp index), and of each row context / M
// consecutive positions (its sp index), which the model runs at their global
// positions with attention across the M ranks of its sp group
// (nn::TransformerLM::set_sequence_parallel). DataParallel averages the
// gradients over all N * M ranks (each rank's gradient holds what its chunk's
// keys and values did for the other chunks' losses, returned by the
// attention's backward, so the average is that of the global mean loss), and
// losses are averaged over the ranks (blocks of equal size), so the run
// equals one rank on the global batch up to float rounding (dropout masks are
// each rank's own). Without a communicator (one rank) everything is a no-op.
// `messages`: where rank 0's commands travel (the CPU for the in-process
// backend; the rank's GPU for NCCL, which moves device memory only).
class Ranks {
 public:
  enum class Command { Steps, EvalBegin, EvalBatch, EvalEnd, Stop };
  // What rank 0 does next. Steps: `count` training steps from step `first`
  // (to NCCL ranks the steps up to the next log row, which they then run
  // without a host wait; to in-process ranks, which meet on the host in
  // every collective anyway, one step).
  struct Order {
    Command command = Command::Stop;
    int64_t first = 0, count = 0;
  };

  // Collective when comm is given (the sp split): every rank constructs one.
  Ranks(minidl::dist::Communicator* comm, int64_t sp = 1, minidl::Device messages = minidl::Device::cpu());
  // Once the model holds its initial (or restored) weights, on every rank:
  // averages its gradients from now on (with mixed precision the compute
  // model's, during backward, before they go to the masters: call
  // all_reduce_gradients() first); rank 0's weights everywhere (equal
  // already: same seed or same checkpoint); ranks > 0 draw their own dropout;
  // with --sp, the model runs this rank's chunk across its sp group.
  void attach(TrainModel& model);
  // This rank's block of a global batch (B, T): its rows, and with --sp its
  // chunk of their positions.
  minidl::Tensor rows(const minidl::Tensor& t) const;
  // The mean over ranks of a per-rank mean loss.
  minidl::Tensor mean(const minidl::Tensor& loss) const;
  void all_reduce_gradients() {
    if (dp_) dp_->all_reduce_gradients();
  }
  // Rank 0 tells the other ranks what it does next (follow_rank0), which
  // hear it through listen(). A host wait on every rank (rank 0's too, on
  // NCCL: the order travels in device memory).
  Order command(const Order& order) const;
  Order listen() const { return command({}); }

 private:
  minidl::dist::Communicator* comm_;
  int64_t sp_;
  minidl::Device messages_;
  std::unique_ptr<minidl::dist::Communicator> sp_comm_;  // this rank's sp group (--sp > 1)
  std::unique_ptr<minidl::nn::DataParallel> dp_;
};

// What each rank trains: the model, its optimizer and the batch streams
// (with --dp every rank draws the global batches).
struct Replica {
  Replica(const TrainOptions& o, const minidl::nn::TransformerLMConfig& config, const minidl::nn::TrainValSplit& split,
          minidl::Device device);

  // Everything a resumed run needs, saved and restored as one train state.
  minidl::nn::TrainState train_state(const minidl::Tensor& loss_sum, minidl::nn::Metadata meta);

  // An evaluation: the same validation batches every time (the stream
  // restarts), so evaluations are comparable and need no saved state.
  void eval_begin();
  // The mean loss of the next validation batch (over the ranks).
  minidl::Tensor val_loss(const Ranks& ranks);
  void eval_end() { model.compute().train(); }

  uint64_t seed;
  TrainModel model;
  minidl::nn::AdamW optimizer;
  minidl::nn::BatchSampler train_batches, val_batches;
};

// Several processes: every rank votes once, before the run's first
// collectives, whether it can train (rank 0: the run's directory and
// checkpoint checked, its model built; the others: their data read, their
// model built and restored); all go on only if all can. Destroyed without a
// vote (its rank threw first), it votes no, so that the others stop instead
// of waiting in a collective for ever.
class StartVote {
 public:
  StartVote(minidl::dist::Communicator& comm, minidl::Device device) : comm_(comm), device_(device) {}
  ~StartVote();
  StartVote(const StartVote&) = delete;
  StartVote& operator=(const StartVote&) = delete;
  // This rank can train: whether every rank can.
  bool cast();

 private:
  double exchange(double ok);
  minidl::dist::Communicator& comm_;
  minidl::Device device_;
  bool cast_ = false;
};

// Ranks 1..N-1 of --dp N: a replica each, doing what rank 0 announces.
// `device`: this rank's (with NCCL, its own GPU); `messages`: see Ranks;
// `graph`: its steps replay a CUDA graph (StepRunner), as rank 0's do;
// `vote`: several processes' start vote (StartVote), cast once the replica is built.
void follow_rank0(const TrainOptions& o, const minidl::nn::TransformerLMConfig& config,
                  const minidl::nn::TrainValSplit& split, minidl::Device device, minidl::Device messages, bool graph,
                  const minidl::nn::Checkpoint* resume, minidl::dist::Communicator& comm, StartVote* vote = nullptr);

// The other ranks of --dp N --sp M (N * M > 1), on threads of their own
// until destroyed. train_run's thread is rank 0: it uses the communicator of
// the backend's rank 0, whose function only waits for this object's
// destruction. The backend: NCCL, one GPU per rank (GPUs 0..N*M-1), when
// `nccl`; else in-process (CPU ranks, or virtual ranks sharing one GPU). A
// rank's failure reaches rank 0 through its next collective (in-process; an
// NCCL collective cannot be abandoned, so there a failure may hang the
// others); rank 0's failure (destruction during an exception) ends the others'.
// A failure before rank 0 runs (the backend's set-up, e.g. NCCL's init) is
// thrown by the constructor.
class OtherRanks {
 public:
  OtherRanks(int64_t n, bool nccl, std::function<void(minidl::dist::Communicator&)> follow);
  ~OtherRanks();
  OtherRanks(const OtherRanks&) = delete;
  OtherRanks& operator=(const OtherRanks&) = delete;

  minidl::dist::Communicator& rank0() { return *rank0_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  minidl::dist::Communicator* rank0_ = nullptr;
  bool released_ = false, failed_ = false;
  bool ended_ = false;              // the ranks' thread is done
  std::exception_ptr start_error_;  // why the ranks failed before rank 0 ran
  const int exceptions_ = std::uncaught_exceptions();
  std::thread thread_;
};

// Launched as one of several processes (WORLD_SIZE > 1 in the environment):
// this process is rank RANK of the --dp x --sp ranks, on its node's GPU
// LOCAL_RANK, joined to the others through NCCL (the unique id through the
// file $MINIDL_NCCL_ID_FILE). Null when launched alone.
std::unique_ptr<minidl::dist::Communicator> join_process_ranks(const TrainOptions& o, minidl::Device* device);

}  // namespace charlm
