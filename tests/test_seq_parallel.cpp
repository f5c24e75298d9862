// Sequence-parallel dilated attention (ops/seq_parallel.h) against the
// single-device op, in float64, with ranks as threads.
#include <condition_variable>
#include <cstring>
#include <exception>
#include <mutex>
#include <thread>

#include "dist/communicator.h"
#include "helpers.h"
#include "ops/seq_parallel.h"

using namespace minidl;
using minidl::testing::random_tensor;

namespace {

// A minimal in-process communicator for these tests (ranks are threads, CPU
// float64 tensors): every collective deposits its tensor, meets the others at
// a barrier, reads what it needs and meets them again before anyone reuses
// a buffer. A rank that throws aborts the others' waits. (The project's
// backend is dist::run_in_process; this one keeps the tests independent of it.)
struct Rendezvous {
  explicit Rendezvous(int size) : size(size), slots(size) {}
  const int size;
  std::vector<const Tensor*> slots;
  std::mutex mutex;
  std::condition_variable cv;
  int arrived = 0;
  uint64_t generation = 0;
  bool aborted = false;
  std::vector<int64_t> gathered;  // rank 0's all_gather input sizes, in order

  void arrive() {
    std::unique_lock<std::mutex> lock(mutex);
    MINIDL_CHECK(!aborted, "test communicator: another rank failed");
    const uint64_t gen = generation;
    if (++arrived == size) {
      arrived = 0;
      ++generation;
      cv.notify_all();
    } else {
      cv.wait(lock, [&] { return generation != gen || aborted; });
    }
    MINIDL_CHECK(!aborted, "test communicator: another rank failed");
  }
  void abort() {
    std::lock_guard<std::mutex> lock(mutex);
    aborted = true;
    cv.notify_all();
  }
};

class ThreadComm final : public dist::Communicator {
 public:
  ThreadComm(int rank, Rendezvous& rv) : rank_(rank), rv_(rv) {}
  int rank() const override { return rank_; }
  int size() const override { return rv_.size; }

  void all_gather(const Tensor& input, const Tensor& output) override {
    check(input);
    check(output);
    MINIDL_CHECK(output.numel() == input.numel() * size(), "all_gather: sizes");
    if (rank_ == 0) rv_.gathered.push_back(input.numel());
    deposit(input);
    const int64_t n = input.numel();
    for (int p = 0; p < size(); ++p)
      std::memcpy(output.data_ptr<double>() + p * n, rv_.slots[p]->data_ptr<double>(), n * sizeof(double));
    rv_.arrive();
  }
  void reduce_scatter(const Tensor& input, const Tensor& output) override {
    check(input);
    check(output);
    MINIDL_CHECK(input.numel() == output.numel() * size(), "reduce_scatter: sizes");
    deposit(input);
    const int64_t n = output.numel();
    double* out = output.data_ptr<double>();
    for (int64_t i = 0; i < n; ++i) {
      double sum = 0;
      for (int p = 0; p < size(); ++p) sum += rv_.slots[p]->data_ptr<double>()[rank_ * n + i];
      out[i] = sum;
    }
    rv_.arrive();
  }
  void all_reduce(const Tensor& tensor) override {
    check(tensor);
    deposit(tensor);
    std::vector<double> sum(static_cast<size_t>(tensor.numel()), 0.0);
    for (int p = 0; p < size(); ++p)
      for (size_t i = 0; i < sum.size(); ++i) sum[i] += rv_.slots[p]->data_ptr<double>()[i];
    rv_.arrive();
    std::copy(sum.begin(), sum.end(), tensor.data_ptr<double>());
  }
  void broadcast(const Tensor& tensor, int root) override {
    check(tensor);
    deposit(tensor);
    if (rank_ != root)
      std::memcpy(tensor.data_ptr<double>(), rv_.slots[root]->data_ptr<double>(), tensor.nbytes());
    rv_.arrive();
  }
  void barrier() override { rv_.arrive(); }
  std::unique_ptr<dist::Communicator> split(int, int) override {
    MINIDL_FAIL("test communicator: split is not implemented");
  }

 private:
  static void check(const Tensor& t) {
    MINIDL_CHECK(t.dtype() == DType::Float64 && !t.is_cuda() && t.is_contiguous(),
                 "test communicator: contiguous CPU float64 tensors only, got ", t.dtype());
  }
  void deposit(const Tensor& t) {
    rv_.slots[rank_] = &t;
    rv_.arrive();
  }
  int rank_;
  Rendezvous& rv_;
};

// Returns rank 0's all_gather input sizes.
std::vector<int64_t> run_threads(int world, const std::function<void(dist::Communicator&)>& fn) {
  Rendezvous rv(world);
  std::vector<std::exception_ptr> errors(world);
  std::vector<std::thread> threads;
  for (int p = 0; p < world; ++p)
    threads.emplace_back([&, p] {
      ThreadComm comm(p, rv);
      try {
        fn(comm);
      } catch (...) {
        errors[p] = std::current_exception();
        rv.abort();
      }
    });
  for (std::thread& t : threads) t.join();
  for (const std::exception_ptr& e : errors)
    if (e) std::rethrow_exception(e);
  return rv.gathered;
}

struct Case {
  int64_t B, N, H, D;
  std::vector<DilatedBranch> branches;
  bool causal;
};

struct Result {
  Tensor out, lse, dq, dk, dv;
};

// Rows kept by no branch have lse = -inf: the loss reads lse through a mask
// so that it stays finite (and those rows get no lse gradient).
Tensor loss_of(const Tensor& out, const Tensor& lse, const Tensor& w_out, const Tensor& w_lse) {
  Tensor nowhere = ops::lt(lse.detach(), ops::full(lse.shape(), -1e30, lse.options()));
  return ops::add(ops::sum(ops::mul(out, w_out)), ops::sum(ops::mul(ops::masked_fill(lse, nowhere, 0.0), w_lse)));
}

struct Inputs {
  Tensor q, k, v, w_out, w_lse;
};

Inputs make_inputs(const Case& c) {
  return {random_tensor({c.B, c.N, c.H, c.D}), random_tensor({c.B, c.N, c.H, c.D}),
          random_tensor({c.B, c.N, c.H, c.D}), random_tensor({c.B, c.N, c.H, c.D}),
          random_tensor({c.B, c.N, c.H})};
}

Result single_device(const Case& c, const Inputs& in) {
  Tensor q = in.q.clone().requires_grad_(), k = in.k.clone().requires_grad_(),
         v = in.v.clone().requires_grad_();
  std::vector<int64_t> segments, dilations;
  for (const DilatedBranch& b : c.branches) {
    segments.push_back(b.segment);
    dilations.push_back(b.dilation);
  }
  auto [out, lse] = ops::dilated_attention(q, k, v, segments, dilations, c.causal);
  loss_of(out, lse, in.w_out, in.w_lse).backward();
  return {out.detach(), lse.detach(), q.grad(), k.grad(), v.grad()};
}

// Rank p holds rows [starts[p], starts[p + 1]); results concatenated over ranks.
Result sequence_parallel(const Case& c, const Inputs& in, const std::vector<int64_t>& sizes) {
  const int P = static_cast<int>(sizes.size());
  std::vector<int64_t> starts{0};
  for (int64_t n : sizes) starts.push_back(starts.back() + n);
  REQUIRE(starts.back() == c.N);
  std::vector<Result> parts(P);
  DilatedAttentionConfig config;
  config.branches = c.branches;
  config.causal = c.causal;
  run_threads(P, [&](dist::Communicator& comm) {
    const int p = comm.rank();
    auto rows = [&](const Tensor& t) { return t.narrow(1, starts[p], sizes[p]).contiguous(); };
    Tensor q = rows(in.q).requires_grad_(), k = rows(in.k).requires_grad_(),
           v = rows(in.v).requires_grad_();
    auto [out, lse] = ops::seq_parallel_dilated_attention(q, k, v, config, comm);
    loss_of(out, lse, rows(in.w_out), rows(in.w_lse)).backward();
    parts[p] = {out.detach(), lse.detach(), q.grad(), k.grad(), v.grad()};
  });
  auto cat = [&](Tensor Result::*field) {
    std::vector<Tensor> ts;
    for (const Result& r : parts) ts.push_back(r.*field);
    return ops::cat(ts, 1);
  };
  return {cat(&Result::out), cat(&Result::lse), cat(&Result::dq), cat(&Result::dk), cat(&Result::dv)};
}

std::vector<int64_t> even_chunks(int64_t n, int P) {
  std::vector<int64_t> sizes;
  for (int p = 0; p < P; ++p) sizes.push_back((p + 1) * n / P - p * n / P);
  return sizes;
}

// |a - b| <= tol elementwise, equal infinities equal; tol 0 means bit-equal.
void check_equal(const char* what, const Tensor& a, const Tensor& b, double tol) {
  REQUIRE(a.shape() == b.shape());
  const std::vector<double> x = a.to_vector<double>(), y = b.to_vector<double>();
  double worst = 0;
  size_t at = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const double diff = x[i] == y[i] ? 0 : std::abs(x[i] - y[i]);
    if (!(diff <= worst)) {
      worst = diff;
      at = i;
    }
  }
  INFO(std::string(what), ": worst element ", at, ": ", x.empty() ? 0.0 : x[at], " vs ", y.empty() ? 0.0 : y[at]);
  CHECK(worst <= tol);
}

void check_case(const Case& c, const std::vector<int64_t>& sizes, double tol = 1e-10) {
  const Inputs in = make_inputs(c);
  const Result want = single_device(c, in), got = sequence_parallel(c, in, sizes);
  check_equal("out", got.out, want.out, tol);
  check_equal("lse", got.lse, want.lse, tol);
  check_equal("dq", got.dq, want.dq, tol);
  check_equal("dk", got.dk, want.dk, tol);
  check_equal("dv", got.dv, want.dv, tol);
}

// Odd geometry: N/P not a multiple of any w, segments straddling rank
// boundaries at odd offsets, w % r != 0, r > H, w > N (one segment over all
// ranks), several branches.
const Case kOdd{2, 37, 3, 4, {{8, 1}, {10, 3}, {16, 5}, {64, 2}}, true};

}  // namespace

TEST_CASE("seq_parallel_dilated_attention: one rank equals the op exactly") {
  check_case(kOdd, {kOdd.N}, 0.0);
  Case non_causal = kOdd;
  non_causal.causal = false;
  check_case(non_causal, {kOdd.N}, 0.0);
}

TEST_CASE("seq_parallel_dilated_attention: P = 2, 3, 4 equal the op, causal and not") {
  for (bool causal : {true, false})
    for (int P : {2, 3, 4}) {
      CAPTURE(causal);
      CAPTURE(P);
      Case c = kOdd;
      c.causal = causal;
      check_case(c, even_chunks(c.N, P));
    }
}

TEST_CASE("seq_parallel_dilated_attention: uneven and empty chunks, rows kept by no branch") {
  // No dilation-1 branch and r > H: some rows are kept nowhere (lse = -inf).
  const Case sparse{1, 41, 2, 3, {{6, 4}, {15, 7}, {23, 3}}, true};
  check_case(sparse, {5, 0, 20, 16});
  check_case(sparse, even_chunks(sparse.N, 3));
  Case non_causal = sparse;
  non_causal.causal = false;
  check_case(non_causal, {13, 1, 27});
}

TEST_CASE("seq_parallel_dilated_attention: chunks holding many local segments and a straddling one") {
  const Case many{2, 50, 2, 5, {{4, 1}, {7, 2}, {30, 3}}, true};
  check_case(many, even_chunks(many.N, 2));
  check_case(many, {17, 33});
}

TEST_CASE("seq_parallel_dilated_attention: only kept rows travel") {
  // One segment over 4 ranks of 16 tokens, r = 4, 2 heads: each rank ships
  // its 4 kept rows per head of k and v (not its 16 dense rows): after the
  // shape exchange (4 numbers), one all-gather of 2 * B * (4 * 2) * D.
  const Case c{1, 64, 2, 3, {{64, 4}}, true};
  const Inputs in = make_inputs(c);
  DilatedAttentionConfig config;
  config.branches = c.branches;
  const std::vector<int64_t> sizes = run_threads(4, [&](dist::Communicator& comm) {
    const Tensor q = in.q.narrow(1, 16 * comm.rank(), 16).contiguous();
    ops::seq_parallel_dilated_attention(q, q, q, config, comm);
  });
  CHECK(sizes == std::vector<int64_t>{4, 2 * 1 * 8 * 3});
}

TEST_CASE("seq_parallel_dilated_attention: float32 inputs match the float32 op") {
  Case c = kOdd;
  const Inputs in64 = make_inputs(c);
  auto f32 = [](const Tensor& t) { return t.to(DType::Float32); };
  const Inputs in{f32(in64.q), f32(in64.k), f32(in64.v), f32(in64.w_out), f32(in64.w_lse)};
  const Result want = single_device(c, in), got = sequence_parallel(c, in, even_chunks(c.N, 3));
  CHECK(got.out.dtype() == DType::Float32);
  CHECK(got.lse.dtype() == DType::Float32);
  CHECK(got.dq.dtype() == DType::Float32);
  minidl::testing::check_close(got.out, want.out, 1e-5, 1e-4);
  minidl::testing::check_close(got.lse, want.lse, 1e-5, 1e-4);
  minidl::testing::check_close(got.dq, want.dq, 1e-5, 1e-4);
  minidl::testing::check_close(got.dk, want.dk, 1e-5, 1e-4);
  minidl::testing::check_close(got.dv, want.dv, 1e-5, 1e-4);
}

TEST_CASE("seq_parallel_dilated_attention: rejects dropout and mismatched ranks") {
  DilatedAttentionConfig config;
  config.branches = {{4, 1}};
  config.dropout = make_attention_dropout(0.1, 1, 0);
  // (random_tensor's generator is not for threads: inputs are drawn here.)
  const Tensor q0 = random_tensor({1, 8, 2, 4}), q1 = random_tensor({1, 8, 3, 4});
  run_threads(1, [&](dist::Communicator& comm) {
    const Tensor& q = q0;
    CHECK_THROWS_WITH_AS(ops::seq_parallel_dilated_attention(q, q, q, config, comm),
                         doctest::Contains("dropout"), Error);
  });
  config.dropout = {};
  CHECK_THROWS_WITH_AS(run_threads(2,
                                   [&](dist::Communicator& comm) {
                                     const Tensor& q = comm.rank() == 0 ? q0 : q1;
                                     ops::seq_parallel_dilated_attention(q, q, q, config, comm);
                                   }),
                       doctest::Contains("every rank must pass"), Error);
}
