#pragma once
// A communicator for tests of algorithms built on the async collectives
// (dist::Communicator::all_gather_async and the others): it wraps a rank's
// communicator (and those split from it) and runs each async collective only
// when its Work (or a later one's) is waited for, the latest a backend may
// complete it. The rank's collectives run in the order it started them,
// over all its communicators, as on NCCL's one communication stream: waiting
// for one first runs those started before it, and a plain collective first
// runs every one started. An algorithm that reads an output before wait(),
// or writes an input before it, then gives results that differ from the
// plain collectives'. It counts the async collectives in flight (started,
// not run) at most.
#include <algorithm>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>

#include "dist/communicator.h"

namespace minidl::testing {

class DeferredComm final : public dist::Communicator {
 public:
  explicit DeferredComm(dist::Communicator& inner) : inner_(inner), counts_(std::make_shared<Counts>()) {}

  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void all_gather(const Tensor& input, const Tensor& output) override {
    counts_->run_all();
    inner_.all_gather(input, output);
  }
  void reduce_scatter(const Tensor& input, const Tensor& output) override {
    counts_->run_all();
    inner_.reduce_scatter(input, output);
  }
  void all_reduce(const Tensor& tensor) override {
    counts_->run_all();
    inner_.all_reduce(tensor);
  }
  void broadcast(const Tensor& tensor, int root) override {
    counts_->run_all();
    inner_.broadcast(tensor, root);
  }
  void barrier() override {
    counts_->run_all();
    inner_.barrier();
  }
  std::unique_ptr<dist::Communicator> split(int color, int key) override {
    counts_->run_all();
    std::unique_ptr<dist::Communicator> sub = inner_.split(color, key);
    if (!sub) return nullptr;  // kNoColor
    return std::unique_ptr<dist::Communicator>(new DeferredComm(std::move(sub), counts_));
  }

  dist::Work all_gather_async(const Tensor& input, const Tensor& output) override {
    return defer([this, input, output] { inner_.all_gather(input, output); });
  }
  dist::Work reduce_scatter_async(const Tensor& input, const Tensor& output) override {
    return defer([this, input, output] { inner_.reduce_scatter(input, output); });
  }
  dist::Work all_reduce_async(const Tensor& tensor) override {
    return defer([this, tensor] { inner_.all_reduce(tensor); });
  }

  // Over this communicator and those split from it (one rank's thread).
  int started() const { return counts_->started; }
  int most_in_flight() const { return counts_->most; }

 private:
  // The rank's collectives started and not run yet, in start order (shared
  // by the communicators split from one).
  struct Counts {
    int started = 0, in_flight = 0, most = 0;
    int64_t ran = 0;  // collectives with a smaller number have run
    std::deque<std::function<void()>> pending;
    void run_through(int64_t id) {
      while (ran <= id && !pending.empty()) {
        std::function<void()> run = std::move(pending.front());
        pending.pop_front();
        ++ran;
        --in_flight;
        run();
      }
    }
    void run_all() { run_through(ran + static_cast<int64_t>(pending.size()) - 1); }
  };
  DeferredComm(std::unique_ptr<dist::Communicator> owned, std::shared_ptr<Counts> counts)
      : owned_(std::move(owned)), inner_(*owned_), counts_(std::move(counts)) {}

  template <typename Run>
  dist::Work defer(Run run) {
    const int64_t id = counts_->ran + static_cast<int64_t>(counts_->pending.size());
    ++counts_->started;
    counts_->most = std::max(counts_->most, ++counts_->in_flight);
    counts_->pending.push_back(std::move(run));
    return dist::Work([counts = counts_, id] { counts->run_through(id); });
  }

  std::unique_ptr<dist::Communicator> owned_;  // a split's own communicator
  dist::Communicator& inner_;
  std::shared_ptr<Counts> counts_;
};

}  // namespace minidl::testing
