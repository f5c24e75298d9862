// dist/: the in-process backend's collectives for P = 1..4 on odd sizes,
// plain and async, split, error propagation; the same on CUDA tensors
// (virtual ranks on one GPU); dist::Work; the NCCL backend with world size 1,
// its async collectives included (many in flight, split, in a CUDA graph).
#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <string>
#include <unistd.h>

#include "dist/communicator.h"
#include "dist/launch.h"
#include "dist/nccl.h"
#include "helpers.h"
#include "nn/cuda_graph.h"

using namespace minidl;
using minidl::testing::random_tensor;
using minidl::testing::ScopedEnv;

namespace {

// Fresh random float64 inputs, one per rank, made before the ranks start
// (the test RNG is not shared across threads).
std::vector<Tensor> inputs_per_rank(int P, int64_t n) {
  std::vector<Tensor> xs;
  for (int r = 0; r < P; ++r) xs.push_back(random_tensor({n}));
  return xs;
}

// The sum over ranks in rank order, as the backend promises (bitwise).
std::vector<double> rank_order_sum(const std::vector<Tensor>& xs) {
  std::vector<double> sum = xs[0].to_vector<double>();
  for (size_t r = 1; r < xs.size(); ++r) {
    std::vector<double> x = xs[r].to_vector<double>();
    for (size_t i = 0; i < sum.size(); ++i) sum[i] += x[i];
  }
  return sum;
}

// Every collective on one device, checked exactly against host arithmetic;
// `async`: all_gather, all_reduce and reduce_scatter through their async
// forms, all three in flight at once.
void check_collectives(int P, int64_t n, Device device, bool async = false) {
  std::vector<Tensor> xs = inputs_per_rank(P, n);
  std::vector<Tensor> scatter_in = inputs_per_rank(P, n * P);
  const std::vector<double> sum = rank_order_sum(xs);
  const std::vector<double> scatter_sum = rank_order_sum(scatter_in);
  std::mutex mu;  // doctest's assertions are not thread-safe
  std::vector<std::vector<double>> gathered(P), reduced(P), scattered(P), broadcast(P);
  dist::run_in_process(P, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    MINIDL_CHECK(comm.size() == P, "size ", comm.size());
    Tensor x = xs[r].to(device);

    Tensor all = Tensor::empty({n * P}, {DType::Float64, device});
    Tensor acc = x.clone();
    Tensor out = Tensor::empty({n}, {DType::Float64, device});
    const Tensor to_scatter = scatter_in[r].to(device);
    if (async) {
      dist::Work gather = comm.all_gather_async(x, all);
      dist::Work reduce = comm.all_reduce_async(acc);
      dist::Work scatter = comm.reduce_scatter_async(to_scatter, out);
      scatter.wait();  // in any order
      gather.wait();
      reduce.wait();
    } else {
      comm.all_gather(x, all);
      comm.all_reduce(acc);
      comm.reduce_scatter(to_scatter, out);
    }

    Tensor b = x.clone();
    comm.broadcast(b, P - 1);
    comm.barrier();

    std::lock_guard<std::mutex> lock(mu);
    gathered[r] = all.to_vector<double>();
    reduced[r] = acc.to_vector<double>();
    scattered[r] = out.to_vector<double>();
    broadcast[r] = b.to_vector<double>();
  });
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    for (int q = 0; q < P; ++q) {
      const std::vector<double> x = xs[q].to_vector<double>();
      CHECK(std::vector<double>(gathered[r].begin() + q * n, gathered[r].begin() + (q + 1) * n) == x);
    }
    CHECK(reduced[r] == sum);
    CHECK(scattered[r] == std::vector<double>(scatter_sum.begin() + r * n, scatter_sum.begin() + (r + 1) * n));
    CHECK(broadcast[r] == xs[P - 1].to_vector<double>());
  }
}

}  // namespace

TEST_CASE("in-process collectives, P = 1..4, odd sizes: exact rank-order results") {
  for (int P = 1; P <= 4; ++P)
    for (int64_t n : {1, 3, 7, 1001}) {
      CAPTURE(P);
      CAPTURE(n);
      check_collectives(P, n, Device::cpu());
    }
}

TEST_CASE("in-process async collectives equal the plain ones, P = 1..4, odd sizes") {
  for (int P = 1; P <= 4; ++P)
    for (int64_t n : {1, 7, 1001}) {
      CAPTURE(P);
      CAPTURE(n);
      check_collectives(P, n, Device::cpu(), /*async=*/true);
    }
}

TEST_CASE("dist::Work: wait runs the backend's finish once; moving, reassigning and destroying wait") {
  int finished = 0;
  auto counting = [&finished] { return dist::Work([&finished] { ++finished; }); };
  dist::Work().wait();  // complete already
  {
    dist::Work w = counting();
    CHECK(finished == 0);
    w.wait();
    w.wait();
    CHECK(finished == 1);
  }
  CHECK(finished == 1);
  {
    dist::Work a = counting();
    dist::Work b = std::move(a);
    a.wait();  // moved from: nothing to wait for
    CHECK(finished == 1);
    b = counting();  // waits for what b held
    CHECK(finished == 2);
  }  // b's destructor waits for the second
  CHECK(finished == 3);
}

TEST_CASE("in-process all_reduce: float32, bfloat16 and int32, fewer elements than ranks") {
  for (DType dtype : {DType::Float32, DType::BFloat16, DType::Int32}) {
    CAPTURE(dtype);
    std::vector<std::vector<double>> got(3);
    std::mutex mu;
    dist::run_in_process(3, [&](dist::Communicator& comm) {
      // Ranks r = 0, 1, 2 hold {r + 1, 10 (r + 1)}: sums 6 and 60, exact in every dtype.
      const double v = comm.rank() + 1;
      Tensor t = from_vector<double>({v, 10 * v}, {2}, {dtype});
      comm.all_reduce(t);
      std::lock_guard<std::mutex> lock(mu);
      got[comm.rank()] = t.to_vector<double>();
    });
    for (const auto& g : got) CHECK(g == std::vector<double>{6, 60});
  }
}

TEST_CASE("in-process split: groups by color, ranks ordered by key then rank") {
  const int P = 4;
  std::vector<std::vector<double>> got(P);
  std::vector<int> sub_rank(P), sub_size(P);
  std::mutex mu;
  dist::run_in_process(P, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    // Colors {0, 1, 0, 1}; keys reverse the order within each color.
    std::unique_ptr<dist::Communicator> sub = comm.split(r % 2, -r);
    Tensor t = from_vector<double>({double(1 << r)}, {1});
    sub->all_reduce(t);
    Tensor all = Tensor::empty({sub->size()}, {DType::Float64});
    sub->all_gather(from_vector<double>({double(r)}, {1}), all);
    // The world is still usable after the split, and a split of the split too.
    comm.barrier();
    std::unique_ptr<dist::Communicator> single = sub->split(sub->rank(), 0);
    MINIDL_CHECK(single->size() == 1, "size ", single->size());
    single->all_reduce(t);
    std::lock_guard<std::mutex> lock(mu);
    got[r] = {t.item<double>()};
    for (double g : all.to_vector<double>()) got[r].push_back(g);
    sub_rank[r] = sub->rank();
    sub_size[r] = sub->size();
  });
  // Color 0 = world ranks {0, 2} ordered by key -r: {2, 0}; color 1: {3, 1}.
  CHECK(got[0] == std::vector<double>{1 + 4, 2, 0});
  CHECK(got[2] == std::vector<double>{1 + 4, 2, 0});
  CHECK(got[1] == std::vector<double>{2 + 8, 3, 1});
  CHECK(got[3] == std::vector<double>{2 + 8, 3, 1});
  CHECK(sub_rank == std::vector<int>{1, 1, 0, 0});
  CHECK(sub_size == std::vector<int>{2, 2, 2, 2});
}

TEST_CASE("in-process split: a rank passing kNoColor joins no group and gets null") {
  const int P = 3;
  std::vector<double> got(P, -1);
  std::vector<int> null_sub(P, -1);
  std::mutex mu;
  dist::run_in_process(P, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    std::unique_ptr<dist::Communicator> sub = comm.split(r == 1 ? dist::Communicator::kNoColor : 0, r);
    Tensor t = from_vector<double>({double(1 << r)}, {1});
    if (sub) {
      CHECK(sub->size() == 2);
      sub->all_reduce(t);
    }
    comm.barrier();  // the world still works for every rank
    std::lock_guard<std::mutex> lock(mu);
    got[r] = t.item<double>();
    null_sub[r] = sub ? 0 : 1;
  });
  CHECK(got == std::vector<double>{1 + 4, 2, 1 + 4});
  CHECK(null_sub == std::vector<int>{0, 1, 0});
  CHECK_THROWS_WITH_AS(dist::run_in_process(2, [](dist::Communicator& comm) { comm.split(-2, 0); }),
                       doctest::Contains("color must be >= 0 or kNoColor, got -2"), Error);
}

TEST_CASE("in-process: an exception on one rank ends the others' collectives and is rethrown") {
  for (int P : {2, 3, 4}) {
    CAPTURE(P);
    std::atomic<int> abandoned{0};
    auto run = [&] {
      dist::run_in_process(P, [&](dist::Communicator& comm) {
        Tensor t = from_vector<double>({1.0}, {1});
        comm.all_reduce(t);  // one collective completes first
        if (comm.rank() == P - 1) throw std::runtime_error("rank failed on purpose");
        try {
          comm.all_reduce(t);  // would wait forever for the failed rank
        } catch (const Error& e) {
          CHECK(std::string(e.what()).find("abandoned because rank " + std::to_string(P - 1) +
                                           " failed: rank failed on purpose") != std::string::npos);
          ++abandoned;
          throw;
        }
      });
    };
    CHECK_THROWS_WITH_AS(run(), "rank failed on purpose", std::runtime_error);
    CHECK(abandoned == P - 1);
  }
}

TEST_CASE("in-process: mismatched collectives and sizes are errors, not hangs") {
  CHECK_THROWS_WITH_AS(dist::run_in_process(2,
                                            [](dist::Communicator& comm) {
                                              Tensor t = from_vector<double>({1.0}, {1});
                                              if (comm.rank() == 0) comm.all_reduce(t);
                                              else comm.broadcast(t, 0);
                                            }),
                       doctest::Contains("every rank must call the same collectives"), Error);
  CHECK_THROWS_WITH_AS(dist::run_in_process(2,
                                            [](dist::Communicator& comm) {
                                              Tensor t = Tensor::empty({comm.rank() + 1}, {DType::Float64});
                                              comm.all_reduce(t);
                                            }),
                       doctest::Contains("expected the same on every rank"), Error);
  // Rank 1 returns while rank 0 waits in a barrier.
  CHECK_THROWS_WITH_AS(dist::run_in_process(2,
                                            [](dist::Communicator& comm) {
                                              if (comm.rank() == 0) comm.barrier();
                                            }),
                       doctest::Contains("rank 1 returned from run_in_process without joining it"), Error);
  CHECK_THROWS_WITH_AS(dist::run_in_process(2,
                                            [](dist::Communicator& comm) {
                                              Tensor in = Tensor::empty({3}, {DType::Float64});
                                              Tensor out = Tensor::empty({3}, {DType::Float64});
                                              comm.all_gather(in, out);
                                            }),
                       doctest::Contains("expected size() * input.numel() = 6"), Error);
  CHECK_THROWS_WITH_AS(dist::run_in_process(0, [](dist::Communicator&) {}),
                       doctest::Contains("world_size must be >= 1"), Error);
}

TEST_CASE("in-process collectives on CUDA tensors (virtual ranks on one GPU)") {
  MINIDL_REQUIRE_CUDA();
  for (int P = 1; P <= 4; ++P)
    for (int64_t n : {1, 7, 100003}) {
      CAPTURE(P);
      CAPTURE(n);
      check_collectives(P, n, Device::cuda());
      check_collectives(P, n, Device::cuda(), /*async=*/true);
    }
}

TEST_CASE("process_rank_from_env: alone without WORLD_SIZE; RANK, LOCAL_RANK and errors that name the variable") {
  const ScopedEnv world("WORLD_SIZE", nullptr), rank("RANK", nullptr), local("LOCAL_RANK", nullptr);
  dist::ProcessRank p = dist::process_rank_from_env();
  CHECK(p.rank == 0);
  CHECK(p.world == 1);
  CHECK(p.local == 0);
  world.set("1");  // one process: RANK may be left out
  CHECK(dist::process_rank_from_env().world == 1);
  world.set("8");
  rank.set("5");
  local.set("1");
  p = dist::process_rank_from_env();
  CHECK(p.rank == 5);
  CHECK(p.world == 8);
  CHECK(p.local == 1);
  rank.set(nullptr);
  CHECK_THROWS_WITH_AS(dist::process_rank_from_env(), doctest::Contains("RANK is not set"), Error);
  rank.set("8");
  CHECK_THROWS_WITH_AS(dist::process_rank_from_env(), doctest::Contains("RANK=8 is not a rank of WORLD_SIZE=8"), Error);
  rank.set("2x");
  CHECK_THROWS_WITH_AS(dist::process_rank_from_env(), doctest::Contains("RANK='2x' is not a non-negative integer"),
                       Error);
}

TEST_CASE("NCCL backend: absent builds say so") {
  if (dist::nccl_available()) return;
  CHECK_THROWS_WITH_AS(dist::run_nccl(1, [](dist::Communicator&) {}), doctest::Contains("built without NCCL"), Error);
}

TEST_CASE("NCCL backend, world size 1: run_nccl and nccl_from_env") {
  MINIDL_REQUIRE_CUDA();
  if (!dist::nccl_available()) {
    MESSAGE("skipped: minidl was built without NCCL");
    return;
  }
  auto exercise = [](dist::Communicator& comm) {
    REQUIRE(comm.rank() == 0);
    REQUIRE(comm.size() == 1);
    Tensor x = random_tensor({1001}, {DType::Float32, Device::cuda()});
    const std::vector<float> want = x.to_vector<float>();
    Tensor acc = x.clone();
    comm.all_reduce(acc);
    Tensor all = Tensor::empty({1001}, {DType::Float32, Device::cuda()});
    comm.all_gather(x, all);
    Tensor out = Tensor::empty({1001}, {DType::Float32, Device::cuda()});
    comm.reduce_scatter(x, out);
    Tensor b = x.clone();
    comm.broadcast(b, 0);
    comm.barrier();
    CHECK(acc.to_vector<float>() == want);
    CHECK(all.to_vector<float>() == want);
    CHECK(out.to_vector<float>() == want);
    CHECK(b.to_vector<float>() == want);
    std::unique_ptr<dist::Communicator> sub = comm.split(0, 0);
    CHECK(sub->size() == 1);
    sub->all_reduce(acc);
    CHECK(acc.to_vector<float>() == want);

    // The async forms, on the communication stream: the inputs as written
    // just before the call, the outputs ready for the work after wait().
    Tensor acc2 = ops::mul(x, 2.0), all2 = Tensor::empty({1001}, {DType::Float32, Device::cuda()}),
           out2 = Tensor::empty({1001}, {DType::Float32, Device::cuda()});
    dist::Work reduce = comm.all_reduce_async(acc2);
    dist::Work gather = comm.all_gather_async(x, all2);
    dist::Work scatter = sub->reduce_scatter_async(x, out2);  // a split shares the stream
    scatter.wait();
    gather.wait();
    reduce.wait();
    Tensor doubled = ops::mul(acc2, 0.5);  // enqueued after wait(): sees the reduced values
    CHECK(doubled.to_vector<float>() == want);
    CHECK(all2.to_vector<float>() == want);
    CHECK(out2.to_vector<float>() == want);

    // More in flight than any event pool holds at first, waited for in reverse.
    std::vector<Tensor> many;
    std::vector<dist::Work> works;
    for (int i = 0; i < 40; ++i) {
      many.push_back(ops::mul(x, static_cast<double>(i)));
      works.push_back(comm.all_reduce_async(many.back()));
    }
    for (int i = 39; i >= 0; --i) works[static_cast<size_t>(i)].wait();
    for (int i = 0; i < 40; ++i) {
      CAPTURE(i);
      CHECK(many[static_cast<size_t>(i)].to_vector<float>() == ops::mul(x, static_cast<double>(i)).to_vector<float>());
    }
  };
  dist::run_nccl(1, exercise);
  CHECK(std::string(std::getenv("NCCL_NVLS_ENABLE")) == "0");

  const std::string id_file =
      (std::filesystem::temp_directory_path() / ("minidl_nccl_id_" + std::to_string(getpid()))).string();
  const ScopedEnv rank("RANK", "0"), world("WORLD_SIZE", "1");
  std::unique_ptr<dist::Communicator> comm = dist::nccl_from_env(id_file);
  exercise(*comm);
  CHECK_FALSE(std::filesystem::exists(id_file));  // removed once every rank joined

  // A file an earlier job left is refused by rank 0, and stays for the user to remove.
  { std::ofstream(id_file) << "stale"; }
  CHECK_THROWS_WITH_AS(dist::nccl_from_env(id_file), doctest::Contains("already exists"), Error);
  CHECK(std::filesystem::exists(id_file));
  std::filesystem::remove(id_file);
}

TEST_CASE("NCCL backend, world size 1: async collectives captured in a CUDA graph and replayed") {
  MINIDL_REQUIRE_CUDA();
  if (!dist::nccl_available()) {
    MESSAGE("skipped: minidl was built without NCCL");
    return;
  }
  dist::run_nccl(1, [](dist::Communicator& comm) {
    const TensorOptions gpu{DType::Float32, Device::cuda(), false};
    Tensor x = random_tensor({4099}, gpu), acc = Tensor::empty({4099}, gpu), all = Tensor::empty({4099}, gpu);
    // The fork to the communication stream and the join back become graph
    // edges; the capture fails if the join is missing.
    auto step = [&] {
      ops::copy_(acc, x);
      dist::Work reduce = comm.all_reduce_async(acc);
      dist::Work gather = comm.all_gather_async(x, all);
      gather.wait();
      reduce.wait();
      ops::mul_(acc, 3.0);
    };
    step();  // eagerly first: NCCL's and minidl's lazy setup
    nn::CudaGraph graph;
    graph.capture(step);
    for (int replay = 0; replay < 3; ++replay) {
      CAPTURE(replay);
      const Tensor fresh = random_tensor({4099}, gpu);
      ops::copy_(x, fresh);
      graph.replay();
      CHECK(acc.to_vector<float>() == ops::mul(fresh, 3.0).to_vector<float>());
      CHECK(all.to_vector<float>() == fresh.to_vector<float>());
    }
  });
}

TEST_CASE("NCCL backend on every visible GPU (2 or more): plain and async collectives, exact") {
  MINIDL_REQUIRE_NCCL_GPUS();
  const int P = cuda_device_count();
  // Integer values: the sums are exact in any order NCCL adds them.
  const int64_t n = 1003;
  auto value = [](int r, int64_t i) { return static_cast<float>((i * 7 + r * 13) % 101 - 50); };
  std::mutex mu;
  std::vector<std::string> failures;
  dist::run_nccl(P, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    const Device gpu = Device::cuda(r);
    auto filled = [&](int rank, int64_t count) {
      std::vector<float> v(static_cast<size_t>(count));
      for (int64_t i = 0; i < count; ++i) v[static_cast<size_t>(i)] = value(rank, i);
      return from_vector<float>(v, {count}).to(gpu);
    };
    std::vector<float> sum(static_cast<size_t>(n * P), 0.0f), gathered;
    for (int q = 0; q < P; ++q)
      for (int64_t i = 0; i < n * P; ++i) sum[static_cast<size_t>(i)] += value(q, i);
    for (int q = 0; q < P; ++q)
      for (int64_t i = 0; i < n; ++i) gathered.push_back(value(q, i));
    const std::vector<float> my_chunk(sum.begin() + r * n, sum.begin() + (r + 1) * n);
    const std::vector<float> sum_n(sum.begin(), sum.begin() + n);
    for (bool async : {false, true}) {
      Tensor x = filled(r, n), acc = filled(r, n), big = filled(r, n * P);
      Tensor all = Tensor::empty({n * P}, {DType::Float32, gpu}), out = Tensor::empty({n}, {DType::Float32, gpu});
      if (async) {
        dist::Work a = comm.all_gather_async(x, all), b = comm.all_reduce_async(acc),
                   c = comm.reduce_scatter_async(big, out);
        c.wait();
        a.wait();
        b.wait();
      } else {
        comm.all_gather(x, all);
        comm.all_reduce(acc);
        comm.reduce_scatter(big, out);
      }
      const bool ok = all.to_vector<float>() == gathered && acc.to_vector<float>() == sum_n &&
                      out.to_vector<float>() == my_chunk;
      std::lock_guard<std::mutex> lock(mu);
      if (!ok) failures.push_back("rank " + std::to_string(r) + (async ? " async" : " plain"));
    }
  });
  CHECK(failures.empty());
  for (const std::string& f : failures) MESSAGE(f);
}

TEST_CASE("NCCL backend on every visible GPU (2 or more): a rank's exception is rethrown, the others return") {
  MINIDL_REQUIRE_NCCL_GPUS();
  const int P = cuda_device_count();
  // The last rank fails before any collective; the others join no collective
  // it would miss, so every rank returns and run_nccl rethrows its error.
  std::atomic<int> returned{0};
  CHECK_THROWS_WITH_AS(dist::run_nccl(P,
                                      [&](dist::Communicator& comm) {
                                        if (comm.rank() == comm.size() - 1)
                                          MINIDL_FAIL("rank ", comm.rank(), " fails on purpose");
                                        ++returned;
                                      }),
                       doctest::Contains(("rank " + std::to_string(P - 1) + " fails on purpose").c_str()), Error);
  CHECK(returned == P - 1);
}
