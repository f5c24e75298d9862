// The in-process backend: ranks are threads of this process that share
// memory. A collective is a rendezvous of the group's threads: each posts its
// tensors, waits for the others, does its part of the work reading the
// others' tensors directly, and waits again so that no rank reuses (or frees)
// what it posted while another still reads it. Sums add the ranks' values in
// rank order (0 + 1 + ...), so results do not depend on thread timing.
//
// CUDA tensors: every rank's tensors must be on the same device; the work
// (device-to-device copies, additions) is queued on minidl's stream of that
// device, which all ranks share, after the work each rank queued before the
// collective (the rendezvous orders the host calls that queue it).
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <numeric>
#include <string>
#include <thread>
#include <vector>

#include "core/allocator.h"
#include "core/scalar_math.h"
#include "cpu/elementwise.h"
#include "dist/communicator.h"
#if MINIDL_WITH_CUDA
#include "cuda/elementwise.h"
#endif

namespace minidl::dist {
namespace {

struct Group;

// What one run_in_process shares between all its groups: whether a rank
// failed (then every pending and later collective throws) and which ranks
// have returned (a collective waiting for one of them can never complete).
struct World {
  explicit World(int size) : done(new std::atomic<bool>[size]) {
    for (int r = 0; r < size; ++r) done[r] = false;
  }
  std::unique_ptr<std::atomic<bool>[]> done;
  std::atomic<bool> aborted{false};
  std::mutex mu;  // guards the members below
  std::vector<std::weak_ptr<Group>> groups;
  int failed_rank = -1;
  std::string reason;

  std::shared_ptr<Group> make_group(std::vector<int> world_ranks, std::shared_ptr<World> self);
  void wake_all();
  // The first failure wins: its rank's exception is what run_in_process rethrows.
  void abort(int world_rank, const std::string& why) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (failed_rank < 0) {
        failed_rank = world_rank;
        reason = why;
      }
    }
    aborted = true;
    wake_all();
  }
  void finish(int world_rank) {
    done[world_rank] = true;
    wake_all();
  }
};

// One rank's arguments to the collective under way.
struct Post {
  const char* op = nullptr;
  Tensor a, b;  // input / output (or the tensor in place); b: all_reduce's partial sum
  int root = 0, color = 0, key = 0;
  std::shared_ptr<Group> group;  // split: the new group, posted by its first rank

  static Post of(const char* op, Tensor a = {}, Tensor b = {}, int root = 0) {
    Post p;
    p.op = op;
    p.a = std::move(a);
    p.b = std::move(b);
    p.root = root;
    return p;
  }
};

struct Group {
  Group(std::vector<int> ranks, std::shared_ptr<World> w)
      : world_ranks(std::move(ranks)), world(std::move(w)), posts(world_ranks.size()) {}
  const std::vector<int> world_ranks;  // group rank -> world rank
  const std::shared_ptr<World> world;
  std::mutex mu;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;  // bumped when the last rank arrives
  std::vector<Post> posts;  // by group rank; each rank writes only its own

  int size() const { return static_cast<int>(world_ranks.size()); }

  // Returns once every rank of the group has called it (the same number of
  // times); throws when a rank failed or returned meanwhile.
  void rendezvous(int rank, const char* op) {
    std::unique_lock<std::mutex> lock(mu);
    const uint64_t gen = generation;
    auto gone = [&]() -> int {
      for (int r : world_ranks)
        if (world->done[r]) return r;
      return -1;
    };
    if (!world->aborted && ++arrived == size()) {
      arrived = 0;
      ++generation;
      cv.notify_all();
      return;
    }
    cv.wait(lock, [&] { return generation != gen || world->aborted || gone() >= 0; });
    if (generation != gen) return;
    const int missing = gone();
    lock.unlock();
    if (world->aborted) {
      std::lock_guard<std::mutex> wl(world->mu);
      MINIDL_FAIL("dist::", op, " (in-process, rank ", rank, " of ", size(), "): abandoned because rank ",
                  world->failed_rank, " failed: ", world->reason);
    }
    MINIDL_FAIL("dist::", op, " (in-process, rank ", rank, " of ", size(), "): rank ", missing,
                " returned from run_in_process without joining it (the ranks called different collectives)");
  }
};

std::shared_ptr<Group> World::make_group(std::vector<int> world_ranks, std::shared_ptr<World> self) {
  auto g = std::make_shared<Group>(std::move(world_ranks), std::move(self));
  std::lock_guard<std::mutex> lock(mu);
  groups.push_back(g);
  return g;
}

void World::wake_all() {
  std::vector<std::shared_ptr<Group>> live;
  {
    std::lock_guard<std::mutex> lock(mu);
    for (auto& w : groups)
      if (auto g = w.lock()) live.push_back(g);
  }
  // Taking each group's mutex orders the wake-up after a waiter's predicate check.
  for (auto& g : live) {
    { std::lock_guard<std::mutex> lock(g->mu); }
    g->cv.notify_all();
  }
}

// Elements [begin, begin + count) of a contiguous tensor, as a 1-D view.
Tensor span(const Tensor& t, int64_t begin, int64_t count) {
  return t.as_strided({count}, {1}, t.offset() + begin, "dist (in-process)");
}

// First element of chunk c when n elements are cut into `parts` chunks.
int64_t chunk_begin(int64_t n, int parts, int c) { return n * c / parts; }

void copy_into(const Tensor& dst, const Tensor& src) {
  backend::copy_bytes(dst.raw_data(), dst.device(), src.raw_data(), src.device(), dst.nbytes());
}

void add_into(const Tensor& acc, const Tensor& x) {
  if (acc.is_cuda()) {
#if MINIDL_WITH_CUDA
    backend::DeviceScope scope(acc.device());
    cuda::binary(BinaryOp::Add, acc, x, acc);
#else
    MINIDL_FAIL("dist (in-process): a CUDA tensor in a build without CUDA");
#endif
  } else {
    cpu::binary(BinaryOp::Add, acc, x, acc);
  }
}

// out = the sum over the group's posted `a` tensors of elements [begin, begin + out.numel()), in rank order.
void sum_chunk(const std::vector<Post>& posts, int64_t begin, const Tensor& out) {
  const int64_t count = out.numel();
  if (count == 0) return;
  copy_into(out, span(posts[0].a, begin, count));
  for (size_t q = 1; q < posts.size(); ++q) add_into(out, span(posts[q].a, begin, count));
}

class InProcessCommunicator final : public Communicator {
 public:
  InProcessCommunicator(std::shared_ptr<Group> group, int rank) : group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }

  void all_gather(const Tensor& input, const Tensor& output) override {
    check_tensor("all_gather", "input", input);
    check_tensor("all_gather", "output", output);
    check_pair("all_gather", input, output, input.numel() * size(), "size() * input.numel()");
    run(Post::of("all_gather", input, output), [&](const std::vector<Post>& posts) {
      const int64_t m = input.numel();
      for (int q = 0; q < size(); ++q)
        if (m > 0) copy_into(span(output, q * m, m), posts[static_cast<size_t>(q)].a);
    });
  }

  void reduce_scatter(const Tensor& input, const Tensor& output) override {
    check_tensor("reduce_scatter", "input", input);
    check_tensor("reduce_scatter", "output", output);
    check_pair("reduce_scatter", input, output, input.numel() / size(), "input.numel() / size()");
    MINIDL_CHECK(input.numel() % size() == 0, "dist::reduce_scatter: input has ", input.numel(),
                 " elements, not a multiple of the communicator size ", size());
    run(Post::of("reduce_scatter", input, output), [&](const std::vector<Post>& posts) {
      sum_chunk(posts, rank_ * output.numel(), output);
    });
  }

  void all_reduce(const Tensor& tensor) override {
    check_tensor("all_reduce", "tensor", tensor);
    if (size() == 1) return;
    const int64_t n = tensor.numel();
    // Rank r sums chunk r into a partial; then every rank copies all partials.
    const int64_t begin = chunk_begin(n, size(), rank_), end = chunk_begin(n, size(), rank_ + 1);
    Tensor partial = Tensor::empty({end - begin}, tensor.options());
    run(Post::of("all_reduce", tensor, partial), [&](const std::vector<Post>& posts) {
      sum_chunk(posts, begin, partial);
      group_->rendezvous(rank_, "all_reduce");
      for (int q = 0; q < size(); ++q) {
        const Tensor& part = posts[static_cast<size_t>(q)].b;
        if (part.numel() > 0) copy_into(span(tensor, chunk_begin(n, size(), q), part.numel()), part);
      }
    });
  }

  void broadcast(const Tensor& tensor, int root) override {
    check_tensor("broadcast", "tensor", tensor);
    MINIDL_CHECK(root >= 0 && root < size(), "dist::broadcast: root ", root, " is not a rank of a communicator of size ",
                 size());
    run(Post::of("broadcast", tensor, {}, root), [&](const std::vector<Post>& posts) {
      if (rank_ != root && tensor.numel() > 0) copy_into(tensor, posts[static_cast<size_t>(root)].a);
    });
  }

  void barrier() override {
    run(Post::of("barrier"), [](const std::vector<Post>&) {});
  }

  std::unique_ptr<Communicator> split(int color, int key) override {
    MINIDL_CHECK(color >= 0 || color == kNoColor, "dist::split (in-process): color must be >= 0 or kNoColor, got ",
                 color);
    std::unique_ptr<Communicator> result;
    Post post = Post::of("split");
    post.color = color;
    post.key = key;
    run(std::move(post), [&](const std::vector<Post>& posts) {
      if (color == kNoColor) {  // in no group; the others' leaders post theirs
        group_->rendezvous(rank_, "split");
        return;
      }
      // Members of my color, ordered by (key, rank).
      std::vector<int> members;
      for (int q = 0; q < size(); ++q)
        if (posts[static_cast<size_t>(q)].color == color) members.push_back(q);
      std::stable_sort(members.begin(), members.end(),
                       [&](int x, int y) { return posts[static_cast<size_t>(x)].key < posts[static_cast<size_t>(y)].key; });
      const int leader = members.front();
      if (leader == rank_) {
        std::vector<int> world_ranks;
        for (int q : members) world_ranks.push_back(group_->world_ranks[static_cast<size_t>(q)]);
        group_->posts[static_cast<size_t>(rank_)].group = group_->world->make_group(world_ranks, group_->world);
      }
      group_->rendezvous(rank_, "split");
      const int new_rank = static_cast<int>(std::find(members.begin(), members.end(), rank_) - members.begin());
      result = std::make_unique<InProcessCommunicator>(posts[static_cast<size_t>(leader)].group, new_rank);
    });
    return result;
  }

 private:
  void check_tensor(const char* op, const char* name, const Tensor& t) const {
    MINIDL_CHECK(t.defined(), "dist::", op, ": ", name, " is undefined");
    MINIDL_CHECK(t.is_contiguous(), "dist::", op, ": ", name, " ", shape_str(t.shape()), " must be contiguous");
  }
  void check_pair(const char* op, const Tensor& input, const Tensor& output, int64_t want, const char* rule) const {
    MINIDL_CHECK(input.dtype() == output.dtype() && input.device() == output.device(), "dist::", op, ": input is ",
                 input.dtype(), " on ", input.device(), ", output is ", output.dtype(), " on ", output.device(),
                 "; expected the same dtype and device");
    MINIDL_CHECK(output.numel() == want, "dist::", op, ": output ", shape_str(output.shape()), " has ", output.numel(),
                 " elements, expected ", rule, " = ", want, " (input ", shape_str(input.shape()), ", ", size(), " ranks)");
  }

  // Posts, waits for all ranks, checks that they called the same collective
  // on matching tensors, runs `work`, and waits again before the posted
  // tensors may change.
  template <typename Work>
  void run(Post post, Work&& work) {
    auto& posts = group_->posts;
    const char* op = post.op;
    posts[static_cast<size_t>(rank_)] = std::move(post);
    group_->rendezvous(rank_, op);
    const Post& mine = posts[static_cast<size_t>(rank_)];
    for (int q = 0; q < size(); ++q) {
      const Post& p = posts[static_cast<size_t>(q)];
      MINIDL_CHECK(std::string(p.op) == op, "dist (in-process): rank ", rank_, " called ", op, " while rank ", q,
                   " called ", p.op, "; every rank must call the same collectives in the same order");
      if (!mine.a.defined()) continue;
      MINIDL_CHECK(p.a.numel() == mine.a.numel() && p.a.dtype() == mine.a.dtype() && p.a.device() == mine.a.device(),
                   "dist::", op, ": rank ", rank_, " passed ", mine.a.numel(), " elements of ", mine.a.dtype(), " on ",
                   mine.a.device(), ", rank ", q, " ", p.a.numel(), " of ", p.a.dtype(), " on ", p.a.device(),
                   "; expected the same on every rank");
      MINIDL_CHECK(p.root == mine.root, "dist::", op, ": rank ", rank_, " names root ", mine.root, ", rank ", q,
                   " root ", p.root);
    }
    work(posts);
    group_->rendezvous(rank_, op);
    posts[static_cast<size_t>(rank_)] = Post::of(op);  // drops the references
  }

  std::shared_ptr<Group> group_;
  int rank_;
};

}  // namespace

void run_in_process(int world_size, const std::function<void(Communicator&)>& fn) {
  MINIDL_CHECK(world_size >= 1, "dist::run_in_process: world_size must be >= 1, got ", world_size);
  auto world = std::make_shared<World>(world_size);
  std::vector<int> ranks(static_cast<size_t>(world_size));
  std::iota(ranks.begin(), ranks.end(), 0);
  std::shared_ptr<Group> group = world->make_group(ranks, world);
  std::vector<std::exception_ptr> errors(static_cast<size_t>(world_size));
  auto body = [&](int r) {
    try {
      InProcessCommunicator comm(group, r);
      fn(comm);
      world->finish(r);
    } catch (...) {
      errors[static_cast<size_t>(r)] = std::current_exception();
      world->abort(r, detail::exception_message(errors[static_cast<size_t>(r)]));
    }
  };
  std::vector<std::thread> threads;
  for (int r = 1; r < world_size; ++r) threads.emplace_back(body, r);
  body(0);  // rank 0 runs on the calling thread (its thread-local settings apply)
  for (auto& t : threads) t.join();
  if (world->failed_rank >= 0) std::rethrow_exception(errors[static_cast<size_t>(world->failed_rank)]);
}

}  // namespace minidl::dist
