// nn::DataParallel over the in-process backend: averaged gradients of the
// ranks' shares equal one rank's gradients on the whole batch (float64), in
// one bucket or many, reduced during backward in bucket order, async (in
// flight until finish(), bitwise the plain results); gradient accumulation;
// rank 0's parameters reach every rank. On CUDA: virtual
// ranks sharing one GPU (in-process backend) and NCCL with world size 1.
#include <functional>
#include <mutex>
#include <string>

#include "autograd/tape.h"
#include "deferred_comm.h"
#include "dist/communicator.h"
#include "dist/nccl.h"
#include "helpers.h"
#include "nn/data_parallel.h"

using namespace minidl;
using minidl::testing::random_tensor;
using minidl::testing::ScopedEnv;

namespace {

// A two-layer network's parameters plus one the loss never uses.
struct Params {
  Tensor w1, b1, w2, unused;
  std::vector<Tensor> list() const { return {w1, b1, w2, unused}; }
};

Params fresh_copy(const Params& p) {
  Params c{p.w1.clone(), p.b1.clone(), p.w2.clone(), p.unused.clone()};
  for (Tensor* t : {&c.w1, &c.b1, &c.w2, &c.unused}) t->requires_grad_(true);
  return c;
}

// Mean over rows of sum_j (tanh(x W1 + b1) W2)_j^2.
Tensor loss_of(const Params& p, const Tensor& x) {
  Tensor h = ops::tanh(ops::add(ops::matmul(x, p.w1), p.b1));
  Tensor y = ops::matmul(h, p.w2);
  return ops::mean(ops::sum(ops::mul(y, y), {1}));
}

}  // namespace

TEST_CASE("DataParallel: averaged gradients equal one rank's on the concatenated batch (float64)") {
  const int64_t B = 12;
  const Params init{random_tensor({5, 7}), random_tensor({7}), random_tensor({7, 3}), random_tensor({4})};
  const Tensor x = random_tensor({B, 5});

  Params single = fresh_copy(init);
  loss_of(single, x).backward();
  CHECK_FALSE(single.unused.grad().defined());

  for (int P : {1, 2, 3, 4})
    for (size_t bucket_bytes : {size_t{1} << 20, size_t{64}}) {
      CAPTURE(P);
      CAPTURE(bucket_bytes);
      // Ranks other than 0 start from other weights: broadcast_parameters fixes that.
      std::vector<Params> replicas;
      for (int r = 0; r < P; ++r) {
        Params p = fresh_copy(init);
        if (r > 0)
          for (const Tensor& t : p.list()) ops::add_(t.detach(), random_tensor(t.shape()));
        replicas.push_back(p);
      }
      std::vector<size_t> buckets(P);
      std::mutex mu;
      dist::run_in_process(P, [&](dist::Communicator& comm) {
        const int r = comm.rank();
        const Params& p = replicas[r];
        nn::DataParallel dp(p.list(), comm, {.bucket_bytes = bucket_bytes});
        dp.broadcast_parameters();
        const int64_t rows = B / P;
        loss_of(p, x.narrow(0, r * rows, rows)).backward();
        dp.all_reduce_gradients();
        std::lock_guard<std::mutex> lock(mu);
        buckets[r] = dp.num_buckets();
      });
      CHECK(buckets[0] == (bucket_bytes == 64 ? 4u : 1u));  // w1 (280 B) and w2 (168 B) exceed 64 B alone
      for (int r = 0; r < P; ++r) {
        CAPTURE(r);
        for (size_t k = 0; k < 3; ++k) {
          testing::check_close(replicas[r].list()[k], init.list()[k], 0, 0);
          testing::check_close(replicas[r].list()[k].grad(), single.list()[k].grad(), 1e-15, 1e-12);
        }
        // Unused on every rank: a zero gradient, set on every rank alike.
        REQUIRE(replicas[r].unused.grad().defined());
        CHECK(replicas[r].unused.grad().to_vector<double>() == std::vector<double>(4, 0.0));
      }
    }
}

TEST_CASE("DataParallel: buckets are reduced during backward, in bucket order") {
  // No unused parameter: with 64-byte buckets w2, b1 and w1 each fill one
  // (reverse order), and each is issued as backward finishes its gradient.
  const Params init{random_tensor({5, 7}), random_tensor({7}), random_tensor({7, 3}), random_tensor({4})};
  const Tensor x = random_tensor({6, 5});
  Params single = fresh_copy(init);
  loss_of(single, x).backward();
  std::vector<Params> replicas = {fresh_copy(init), fresh_copy(init)};
  std::vector<std::vector<size_t>> issued_at_hook(2);  // dp.issued_buckets() when w2's, b1's, w1's hook ran
  std::vector<size_t> issued_after_backward(2);
  dist::run_in_process(2, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    const Params& p = replicas[r];
    nn::DataParallel dp({p.w1, p.b1, p.w2}, comm, {.bucket_bytes = 64});
    REQUIRE(dp.num_buckets() == 3);
    std::vector<uint64_t> ids;
    for (const Tensor& t : {p.w2, p.b1, p.w1})  // after dp's own hooks, so they see its bucket issued
      ids.push_back(autograd::register_post_accumulate_grad_hook(
          t, [&, r](const Tensor&) { issued_at_hook[r].push_back(dp.issued_buckets()); }));
    for (int step = 0; step < 2; ++step) {  // marks reset between steps
      issued_at_hook[r].clear();
      for (const Tensor& t : p.list()) t.zero_grad();
      loss_of(p, x.narrow(0, 3 * r, 3)).backward();
      issued_after_backward[r] = dp.issued_buckets();
      dp.all_reduce_gradients();
    }
    for (size_t i = 0; i < ids.size(); ++i) autograd::remove_post_accumulate_grad_hook(std::vector{p.w2, p.b1, p.w1}[i], ids[i]);
  });
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK(issued_at_hook[r] == std::vector<size_t>{1, 2, 3});
    CHECK(issued_after_backward[r] == 3);
    for (size_t k = 0; k < 3; ++k)
      testing::check_close(replicas[r].list()[k].grad(), single.list()[k].grad(), 1e-15, 1e-12);
  }
}

TEST_CASE("DataParallel: async bucket all-reduces, in flight until finish(), equal the plain ones bit for bit") {
  // testing::DeferredComm completes an async collective only when it is
  // waited for: every bucket started during backward is still in flight when
  // finish() begins, which must wait for each before reading it.
  const Params init{random_tensor({5, 7}), random_tensor({7}), random_tensor({7, 3}), random_tensor({4})};
  const Tensor x = random_tensor({12, 5});
  for (int P : {2, 3})
    for (size_t bucket_bytes : {size_t{1} << 20, size_t{64}}) {
      CAPTURE(P);
      CAPTURE(bucket_bytes);
      std::vector<Params> plain, deferred;
      for (int r = 0; r < P; ++r) {
        plain.push_back(fresh_copy(init));
        deferred.push_back(fresh_copy(init));
      }
      std::vector<int> started_in_backward(P), most_in_flight(P);
      std::vector<size_t> buckets(P);
      dist::run_in_process(P, [&](dist::Communicator& comm) {
        const int r = comm.rank();
        const int64_t rows = 12 / P;
        const Tensor mine = x.narrow(0, r * rows, rows);
        {
          const Params& p = plain[r];
          nn::DataParallel dp({p.w1, p.b1, p.w2}, comm, {.bucket_bytes = bucket_bytes});
          loss_of(p, mine).backward();
          dp.all_reduce_gradients();
        }
        const Params& p = deferred[r];
        testing::DeferredComm deferring(comm);
        nn::DataParallel dp({p.w1, p.b1, p.w2}, deferring, {.bucket_bytes = bucket_bytes});
        loss_of(p, mine).backward();
        started_in_backward[r] = deferring.started();
        dp.all_reduce_gradients();
        most_in_flight[r] = deferring.most_in_flight();
        buckets[r] = dp.num_buckets();
      });
      for (int r = 0; r < P; ++r) {
        CAPTURE(r);
        CHECK(buckets[r] == (bucket_bytes == 64 ? 3u : 1u));
        CHECK(started_in_backward[r] == static_cast<int>(buckets[r]));
        CHECK(most_in_flight[r] == static_cast<int>(buckets[r]));
        for (size_t k = 0; k < 3; ++k) {
          CHECK(deferred[r].list()[k].grad().to_vector<double>() == plain[r].list()[k].grad().to_vector<double>());
          CHECK(deferred[r].list()[k].grad().to_vector<double>() == deferred[0].list()[k].grad().to_vector<double>());
        }
      }
    }
}

TEST_CASE("DataParallel of a bfloat16 compute model, reduced in float32 during backward, equals reducing its masters after") {
  // nn::MixedPrecision with ranks: the compute model's bfloat16 gradients
  // reduced as they finish, in float32 (reduce_dtype), then handed to the
  // masters, give the masters bit for bit the gradients of handing them over
  // first and reducing the masters' after backward (the same float32 sums).
  const nn::TransformerLMConfig config{.vocab_size = 11, .n_layer = 2, .n_head = 2, .n_embd = 16, .block_size = 8};
  auto mixed = [&] {
    auto master = std::make_shared<nn::TransformerLM>(config, 3);
    return std::make_unique<nn::MixedPrecision>(master, std::make_shared<nn::TransformerLM>(config, 3));
  };
  // P = 3: a mean of three bfloat16 gradients summed in bfloat16 would round
  // differently (halving a two-rank sum is exact either way). The weight
  // gradients batched across the pass (MINIDL_BATCH_WEIGHT_GRADS=1, as on
  // CUDA) or not: the hooks leave them queued until a bucket is packed.
  const ScopedEnv env("MINIDL_BATCH_WEIGHT_GRADS", nullptr);
  for (const std::string batched : {"0", "1"})
  for (int P : {2, 3})
    for (size_t bucket_bytes : {size_t{1} << 20, size_t{256}}) {
      CAPTURE(batched);
      CAPTURE(P);
      CAPTURE(bucket_bytes);
      env.set(batched.c_str());
      std::mutex mu;
      dist::run_in_process(P, [&](dist::Communicator& comm) {
        std::vector<int32_t> ids(16);
        for (size_t i = 0; i < ids.size(); ++i) ids[i] = static_cast<int32_t>((i * 7 + 3 * comm.rank()) % 11);
        const Tensor x = from_vector(ids, {2, 8});
        auto loss_of = [&](const nn::MixedPrecision& mp) {
          Tensor logits = ops::to(static_cast<nn::TransformerLM&>(mp.compute()).forward(x), DType::Float32);
          return ops::cross_entropy(logits.reshape({16, 11}), x.reshape({16}));
        };

        auto during = mixed();
        nn::DataParallel dp(during->compute().parameters(), comm,
                            {.bucket_bytes = bucket_bytes, .reduce_dtype = DType::Float32});
        loss_of(*during).backward();
        const size_t issued = dp.issued_buckets();
        dp.all_reduce_gradients();
        during->gradients_to_masters();

        auto after = mixed();
        nn::DataParallel dp_after(after->parameters(), comm, {.bucket_bytes = bucket_bytes});
        loss_of(*after).backward();
        after->gradients_to_masters();
        const size_t issued_after = dp_after.issued_buckets();
        dp_after.all_reduce_gradients();

        // The other order hands the gradients to the masters while their
        // buckets are reduced: an error, not a silent local update.
        auto wrong = mixed();
        nn::DataParallel dp_wrong(wrong->compute().parameters(), comm,
                                  {.bucket_bytes = bucket_bytes, .reduce_dtype = DType::Float32});
        loss_of(*wrong).backward();
        wrong->gradients_to_masters();
        std::string wrong_error;
        try {
          dp_wrong.all_reduce_gradients();
        } catch (const Error& e) {
          wrong_error = e.what();
        }

        std::lock_guard<std::mutex> lock(mu);
        CHECK(dp.num_buckets() == dp_after.num_buckets());
        CHECK(issued == dp.num_buckets());  // every gradient finished in backward
        CHECK(issued_after == 0);           // set after backward
        CHECK(wrong_error.find("before gradients_to_masters") != std::string::npos);
        for (size_t i = 0; i < during->parameters().size(); ++i) {
          const Tensor g = during->parameters()[i].grad(), want = after->parameters()[i].grad();
          REQUIRE(g.defined());
          CHECK(g.dtype() == DType::BFloat16);
          CHECK(g.to_vector<float>() == want.to_vector<float>());
        }
      });
    }
}

TEST_CASE("DataParallel: gradient accumulation with set_reduce_in_backward(false); a second pass otherwise throws") {
  const Params init{random_tensor({5, 7}), random_tensor({7}), random_tensor({7, 3}), random_tensor({4})};
  const Tensor x = random_tensor({6, 5});
  Params single = fresh_copy(init);
  loss_of(single, x).backward();  // twice the batch's mean loss: twice these gradients
  std::vector<Params> replicas = {fresh_copy(init), fresh_copy(init)};
  std::vector<std::string> errors(2), taken(2);
  std::vector<std::vector<Tensor>> accumulated(2), after_error(2);
  dist::run_in_process(2, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    const Params& p = replicas[r];
    nn::DataParallel dp(p.list(), comm, {.bucket_bytes = 64});
    dp.set_reduce_in_backward(false);
    loss_of(p, x.narrow(0, 3 * r, 3)).backward();
    dp.set_reduce_in_backward(true);
    loss_of(p, x.narrow(0, 3 * r, 3)).backward();
    dp.all_reduce_gradients();
    for (size_t k = 0; k < 3; ++k) accumulated[r].push_back(p.list()[k].grad().clone());
    // Two passes that both reduce: the second finds gradients already reduced.
    try {
      loss_of(p, x.narrow(0, 3 * r, 3)).backward();
      loss_of(p, x.narrow(0, 3 * r, 3)).backward();
    } catch (const Error& e) {
      errors[r] = e.what();
    }
    dp.set_reduce_in_backward(false);
    dp.all_reduce_gradients();  // the ranks meet again (a thrown pass issued part of a step)
    // A gradient a pass gave, taken away before the reduction (as handing
    // bfloat16 gradients to masters too early would): an error, and the next
    // step starts clean.
    for (const Tensor& t : p.list()) t.zero_grad();
    loss_of(p, x.narrow(0, 3 * r, 3)).backward();
    p.w1.zero_grad();
    try {
      dp.all_reduce_gradients();
    } catch (const Error& e) {
      taken[r] = e.what();
    }
    for (const Tensor& t : p.list()) t.zero_grad();
    dp.set_reduce_in_backward(true);
    loss_of(p, x.narrow(0, 3 * r, 3)).backward();
    dp.all_reduce_gradients();
    for (size_t k = 0; k < 3; ++k) after_error[r].push_back(p.list()[k].grad().clone());
  });
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r);
    for (size_t k = 0; k < 3; ++k) {
      testing::check_close(accumulated[r][k], ops::mul(single.list()[k].grad(), 2.0), 1e-15, 1e-12);
      testing::check_close(after_error[r][k], single.list()[k].grad(), 1e-15, 1e-12);
    }
    CHECK(errors[r].find("set_reduce_in_backward(false)") != std::string::npos);
    CHECK(taken[r].find("parameter 0's gradient was taken away before it was reduced") != std::string::npos);
  }
}

TEST_CASE("DataParallel's hooks leave the pass's deferred gradients queued until a bucket is packed") {
  // u, v, w in one bucket, packed once u (read first) is final; w's gradient
  // is deferred (as the batched weight gradients on CUDA). A hook on v that
  // does not read gradients runs after DataParallel's hooks on w and v: the
  // work is still queued then, so they did not write it.
  static const int key = 0;
  std::vector<std::vector<double>> grads(2);
  std::vector<int> queued(2, -1);
  dist::run_in_process(2, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    Tensor u = ops::full({2}, 1.0, {DType::Float64}).requires_grad_(), v = u.detach().clone().requires_grad_(),
           w = u.detach().clone().requires_grad_();
    nn::DataParallel dp({u, v, w}, comm);
    const uint64_t hook = autograd::register_post_accumulate_grad_hook(
        v, [&](const Tensor&) { queued[r] = autograd::deferred(&key); }, /*reads_gradient=*/false);
    const double s = r + 1;  // the ranks' losses differ: their mean is 1.5 times rank 0's
    Tensor z0 = ops::mul(u, 3.0 * s), z1 = ops::mul(v, 2.0 * s), z2 = ops::mul(testing::deferring_double(w, &key), s);
    ops::sum(ops::add(ops::add(z0, z1), z2)).backward();
    dp.all_reduce_gradients();
    autograd::remove_post_accumulate_grad_hook(v, hook);
    for (const Tensor& t : {u, v, w}) grads[r].push_back(t.grad().to_vector<double>()[0]);
  });
  for (int r = 0; r < 2; ++r) {
    CAPTURE(r);
    CHECK(queued[r] == 1);
    CHECK(grads[r] == std::vector<double>{4.5, 3, 3});
  }
}

namespace {

// float32 on the GPU: the ranks' averaged gradients against one rank's on the
// whole batch (both on the GPU; sums in another order, and float32 matmuls
// round their inputs to TF32 in the kernels cuBLAS picks for some shapes and
// not others: measured up to 6e-3 relative on an H200; wrong averaging would
// be off by a factor of P).
// with_unused: the unused parameter holds every bucket back to
// all_reduce_gradients(); without it the buckets go during backward.
// gpu_per_rank: rank r's replica on cuda:r (NCCL), else all on cuda:0.
void check_cuda_data_parallel(int P, const std::function<void(int, const std::function<void(dist::Communicator&)>&)>& run,
                              bool with_unused, bool gpu_per_rank = false) {
  const TensorOptions gpu{DType::Float32, Device::cuda(), false};
  const int64_t B = 12;
  const Params init{random_tensor({5, 7}, gpu), random_tensor({7}, gpu), random_tensor({7, 3}, gpu),
                    random_tensor({4}, gpu)};
  const Tensor x = random_tensor({B, 5}, gpu);
  Params single = fresh_copy(init);
  loss_of(single, x).backward();
  // Made on the CPU here, moved to the rank's device by its thread (ops run
  // on the calling thread's current device).
  std::vector<Params> start;
  for (int r = 0; r < P; ++r) {
    Params p{init.w1.to(Device::cpu()), init.b1.to(Device::cpu()), init.w2.to(Device::cpu()),
             init.unused.to(Device::cpu())};
    if (r > 0)
      for (Tensor* t : {&p.w1, &p.b1, &p.w2, &p.unused})
        *t = ops::add(*t, random_tensor(t->shape(), {DType::Float32, Device::cpu(), false}));
    start.push_back(p);
  }
  const Tensor x_cpu = x.to(Device::cpu());
  // What each rank ends with, copied to the CPU by its thread: parameters
  // and gradients (w1, b1, w2, unused).
  std::vector<std::vector<Tensor>> values(static_cast<size_t>(P)), grads(static_cast<size_t>(P));
  std::vector<size_t> issued_in_backward(static_cast<size_t>(P));
  run(P, [&](dist::Communicator& comm) {
    const int r = comm.rank();
    const Device d = Device::cuda(gpu_per_rank ? r : 0);
    const Params& s0 = start[static_cast<size_t>(r)];
    const Params p = fresh_copy({s0.w1.to(d), s0.b1.to(d), s0.w2.to(d), s0.unused.to(d)});
    nn::DataParallel dp(with_unused ? p.list() : std::vector<Tensor>{p.w1, p.b1, p.w2}, comm, {.bucket_bytes = 64});
    dp.broadcast_parameters();
    const int64_t rows = B / P;
    loss_of(p, x_cpu.narrow(0, r * rows, rows).to(d)).backward();
    issued_in_backward[static_cast<size_t>(r)] = dp.issued_buckets();
    dp.all_reduce_gradients();
    for (const Tensor& t : p.list()) {
      values[static_cast<size_t>(r)].push_back(t.detach().to(Device::cpu()));
      grads[static_cast<size_t>(r)].push_back(t.grad().defined() ? t.grad().to(Device::cpu()) : Tensor());
    }
  });
  for (int r = 0; r < P; ++r) {
    CAPTURE(r);
    CHECK(issued_in_backward[static_cast<size_t>(r)] == (with_unused ? 0u : 3u));
    for (size_t k = 0; k < 3; ++k) {
      testing::check_close(values[r][k], init.list()[k], 0, 0);
      testing::check_close(grads[r][k], single.list()[k].grad(), 1e-3, 1e-2);
    }
    if (!with_unused) continue;
    REQUIRE(grads[r][3].defined());
    CHECK(grads[r][3].to_vector<float>() == std::vector<float>(4, 0.0f));
  }
}

}  // namespace

TEST_CASE("DataParallel on CUDA: virtual ranks on one GPU equal one rank (float32)") {
  MINIDL_REQUIRE_CUDA();
  for (int P : {1, 2, 3})
    for (bool with_unused : {true, false}) {
      CAPTURE(P);
      CAPTURE(with_unused);
      check_cuda_data_parallel(
          P, [](int n, const std::function<void(dist::Communicator&)>& fn) { dist::run_in_process(n, fn); },
          with_unused);
    }
}

TEST_CASE("DataParallel on CUDA over NCCL, world size 1") {
  MINIDL_REQUIRE_CUDA();
  if (!dist::nccl_available()) {
    MESSAGE("skipped: minidl was built without NCCL");
    return;
  }
  for (bool with_unused : {true, false}) {
    CAPTURE(with_unused);
    check_cuda_data_parallel(
        1, [](int n, const std::function<void(dist::Communicator&)>& fn) { dist::run_nccl(n, fn); }, with_unused);
  }
}

TEST_CASE("DataParallel over NCCL on 2 or 3 GPUs: async buckets beside the backward equal one rank") {
  MINIDL_REQUIRE_NCCL_GPUS();
  const int gpus = cuda_device_count();
  for (int P : {2, 3}) {
    if (P > gpus) continue;
    for (bool with_unused : {true, false}) {
      CAPTURE(P);
      CAPTURE(with_unused);
      check_cuda_data_parallel(
          P, [](int n, const std::function<void(dist::Communicator&)>& fn) { dist::run_nccl(n, fn); }, with_unused,
          /*gpu_per_rank=*/true);
    }
  }
}
