// Sequence-parallel dilated attention (ops/seq_parallel.h) against the
// single-device op, in float64, with ranks as threads; on CUDA (virtual ranks
// sharing one GPU, and NCCL with one rank) in float32 and bfloat16 against
// the float64 op on the same rounded inputs.
#include <array>
#include <atomic>
#include <functional>
#include <limits>
#include <mutex>

#include "dist/communicator.h"
#include "deferred_comm.h"
#include "dist/nccl.h"
#include "helpers.h"
#include "nn/cuda_graph.h"
#include "nn/transformer.h"
#include "ops/seq_parallel.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/runtime.h"
#endif

using namespace minidl;
using minidl::testing::random_tensor;

namespace {

// Wraps a rank's communicator (and the sub-communicators split from it) and
// records, per all_gather, (input elements, communicator size): what this
// rank sent and, times the size, what it received.
class CountingComm final : public dist::Communicator {
 public:
  using Log = std::vector<std::pair<int64_t, int>>;
  static inline std::atomic<int64_t> splits{0};  // by every CountingComm of the process
  CountingComm(std::unique_ptr<dist::Communicator> owned, dist::Communicator& inner, Log& log)
      : owned_(std::move(owned)), inner_(inner), log_(log) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  void all_gather(const Tensor& input, const Tensor& output) override {
    log_.push_back({input.numel(), size()});
    inner_.all_gather(input, output);
  }
  void reduce_scatter(const Tensor& input, const Tensor& output) override { inner_.reduce_scatter(input, output); }
  void all_reduce(const Tensor& tensor) override { inner_.all_reduce(tensor); }
  void broadcast(const Tensor& tensor, int root) override { inner_.broadcast(tensor, root); }
  void barrier() override { inner_.barrier(); }
  std::unique_ptr<dist::Communicator> split(int color, int key) override {
    ++splits;
    std::unique_ptr<dist::Communicator> sub = inner_.split(color, key);
    if (!sub) return nullptr;  // kNoColor
    dist::Communicator& ref = *sub;
    return std::make_unique<CountingComm>(std::move(sub), ref, log_);
  }

 private:
  std::unique_ptr<dist::Communicator> owned_;
  dist::Communicator& inner_;
  Log& log_;
};

// Runs fn on `world` in-process ranks; returns each rank's all_gather log.
std::vector<CountingComm::Log> run_ranks(int world, const std::function<void(dist::Communicator&)>& fn) {
  std::vector<CountingComm::Log> logs(world);
  dist::run_in_process(world, [&](dist::Communicator& comm) {
    CountingComm counting(nullptr, comm, logs[comm.rank()]);
    fn(counting);
  });
  return logs;
}

struct Case {
  int64_t B, N, H, D;
  std::vector<DilatedBranch> branches;
  bool causal;
  double dropout = 0;  // attention dropout, drawn at (kDropoutSeed, offset 0)
  bool per_pair = false;  // AttentionDropout::per_pair
};

constexpr uint64_t kDropoutSeed = 0xd209;

struct Result {
  Tensor out, lse, dq, dk, dv;
};

// Rows kept by no branch have lse = -inf: the loss reads lse through a mask
// so that it stays finite (and those rows get no lse gradient).
// (On CUDA the weights are float32 and a bfloat16 out is read in float32.)
Tensor loss_of(const Tensor& out, const Tensor& lse, const Tensor& w_out, const Tensor& w_lse) {
  Tensor nowhere = ops::lt(lse.detach(), ops::full(lse.shape(), -1e30, lse.options()));
  return ops::add(ops::sum(ops::mul(ops::to(out, w_out.dtype()), w_out)),
                  ops::sum(ops::mul(ops::masked_fill(lse, nowhere, 0.0), w_lse)));
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
  Generator gen(kDropoutSeed);
  auto [out, lse] = ops::dilated_attention(q, k, v, segments, dilations, c.causal, 0, c.dropout, &gen, c.per_pair);
  loss_of(out, lse, in.w_out, in.w_lse).backward();
  return {out.detach(), lse.detach(), q.grad(), k.grad(), v.grad()};
}

// How sequence_parallel runs the ranks: in-process threads on the inputs'
// device, optionally through testing::DeferredComm (async collectives
// complete only when waited for; `in_flight` then receives per rank how many
// were in flight at most), or over NCCL with rank p on cuda:p (results
// copied to the CPU by the rank's thread); with `layout`, each rank passes
// the chunk sizes (ops::SequenceLayout) instead of having them exchanged.
struct How {
  std::vector<int>* in_flight = nullptr;
  bool nccl = false;
  bool layout = false;
};

// The ranks' results, their rows concatenated in rank order.
Result cat_ranks(const std::vector<Result>& parts) {
  auto cat = [&](Tensor Result::*field) {
    std::vector<Tensor> ts;
    for (const Result& r : parts) ts.push_back(r.*field);
    return ops::cat(ts, 1);
  };
  return {cat(&Result::out), cat(&Result::lse), cat(&Result::dq), cat(&Result::dk), cat(&Result::dv)};
}

// Rank p holds rows [starts[p], starts[p + 1]); results concatenated over ranks.
Result sequence_parallel(const Case& c, const Inputs& in, const std::vector<int64_t>& sizes, How how = {}) {
  const int P = static_cast<int>(sizes.size());
  std::vector<int64_t> starts{0};
  for (int64_t n : sizes) starts.push_back(starts.back() + n);
  REQUIRE(starts.back() == c.N);
  std::vector<Result> parts(P);
  DilatedAttentionConfig config;
  config.branches = c.branches;
  config.causal = c.causal;
  config.dropout = make_attention_dropout(c.dropout, kDropoutSeed, 0);
  config.dropout.per_pair = c.per_pair;
  auto cpu = [](const Tensor& t) { return t.to(Device::cpu()); };
  // NCCL ranks take their rows from the CPU (ops run on the thread's device).
  const Inputs src = how.nccl ? Inputs{cpu(in.q), cpu(in.k), cpu(in.v), cpu(in.w_out), cpu(in.w_lse)} : in;
  auto body = [&](dist::Communicator& comm) {
    const int p = comm.rank();
    const Device device = how.nccl ? Device::cuda(p) : in.q.device();
    auto rows = [&](const Tensor& t) { return t.narrow(1, starts[p], sizes[p]).contiguous().to(device); };
    Tensor q = rows(src.q).requires_grad_(), k = rows(src.k).requires_grad_(),
           v = rows(src.v).requires_grad_();
    std::unique_ptr<testing::DeferredComm> deferred;
    if (how.in_flight) deferred = std::make_unique<testing::DeferredComm>(comm);
    dist::Communicator& used = deferred ? *deferred : comm;
    auto [out, lse] = how.layout ? ops::seq_parallel_dilated_attention(q, k, v, config, used, {sizes})
                                 : ops::seq_parallel_dilated_attention(q, k, v, config, used);
    loss_of(out, lse, rows(src.w_out), rows(src.w_lse)).backward();
    parts[p] = {out.detach(), lse.detach(), q.grad(), k.grad(), v.grad()};
    if (how.nccl) parts[p] = {cpu(parts[p].out), cpu(parts[p].lse), cpu(parts[p].dq), cpu(parts[p].dk), cpu(parts[p].dv)};
    if (how.in_flight) (*how.in_flight)[static_cast<size_t>(p)] = deferred->most_in_flight();
  };
  if (how.nccl) dist::run_nccl(P, body);
  else run_ranks(P, body);
  return cat_ranks(parts);
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
      check_case(c, ops::SequenceLayout::even(c.N, P).chunk_sizes);
    }
}

TEST_CASE("seq_parallel_dilated_attention: uneven and empty chunks, rows kept by no branch") {
  // No dilation-1 branch and r > H: some rows are kept nowhere (lse = -inf).
  const Case sparse{1, 41, 2, 3, {{6, 4}, {15, 7}, {23, 3}}, true};
  check_case(sparse, {5, 0, 20, 16});
  check_case(sparse, ops::SequenceLayout::even(sparse.N, 3).chunk_sizes);
  Case non_causal = sparse;
  non_causal.causal = false;
  check_case(non_causal, {13, 1, 27});
}

TEST_CASE("seq_parallel_dilated_attention: chunks holding many local segments and a straddling one") {
  const Case many{2, 50, 2, 5, {{4, 1}, {7, 2}, {30, 3}}, true};
  check_case(many, ops::SequenceLayout::even(many.N, 2).chunk_sizes);
  check_case(many, {17, 33});
}

TEST_CASE("seq_parallel_dilated_attention: chunks holding whole segments of every branch equal the op bit for bit") {
  // Nothing spans and one local group covers each chunk: each rank runs the
  // op on its rows, with no merges or accumulation buffers around it.
  const Case aligned{2, 32, 3, 4, {{4, 1}, {8, 2}, {16, 3}}, true};
  check_case(aligned, {16, 16}, 0.0);
  check_case(aligned, {16, 0, 16}, 0.0);
  Case non_causal = aligned;
  non_causal.causal = false;
  check_case(non_causal, {16, 16}, 0.0);
}

TEST_CASE("seq_parallel_dilated_attention: spanning pieces merged into a whole-chunk local group") {
  // The local branches' segments divide the chunks (one local group over the
  // whole chunk, its results the base) and one or two branches span ranks.
  const Case spanning{2, 32, 3, 4, {{4, 1}, {8, 2}, {32, 3}, {64, 5}}, true};
  for (int P : {2, 4}) {
    CAPTURE(P);
    check_case(spanning, ops::SequenceLayout::even(spanning.N, P).chunk_sizes);
  }
  Case non_causal = spanning;
  non_causal.causal = false;
  check_case(non_causal, {16, 16});
}

TEST_CASE("seq_parallel_dilated_attention with attention dropout drops what the op drops: P = 1 to 4") {
  // Every kernel call draws the whole problem's mask through its frame
  // (core/dilated.h): local groups (their branches, rows and positions),
  // spanning pieces (classes of heads h mod r, kept index t at position
  // base + t r).
  for (bool causal : {true, false}) {
    CAPTURE(causal);
    Case c = kOdd;
    c.causal = causal;
    c.dropout = 0.3;
    check_case(c, {c.N}, 0.0);
    for (int P : {2, 3, 4}) {
      CAPTURE(P);
      check_case(c, ops::SequenceLayout::even(c.N, P).chunk_sizes);
    }
    check_case(c, {13, 1, 0, 23});
  }
  // Rows kept by no branch; many local segments and a straddling one.
  check_case({1, 41, 2, 3, {{6, 4}, {15, 7}, {23, 3}}, true, 0.2}, {5, 0, 20, 16});
  check_case({2, 50, 2, 5, {{4, 1}, {7, 2}, {30, 3}}, true, 0.5}, {17, 33});
  // A whole-chunk local group (bit for bit when nothing spans), with
  // spanning pieces merged into it.
  check_case({2, 32, 3, 4, {{4, 1}, {8, 2}, {16, 3}}, true, 0.3}, {16, 16}, 0.0);
  check_case({2, 32, 3, 4, {{4, 1}, {8, 2}, {32, 3}, {64, 5}}, true, 0.3}, {8, 8, 8, 8});
  // Local branches not consecutive in the config (0 and 2): two calls, each
  // framed from its own first branch.
  check_case({2, 32, 3, 4, {{4, 1}, {32, 3}, {8, 2}}, true, 0.3}, {16, 16});
  // Heads a multiple of the spanning dilations: a piece holds a run of
  // classes h mod r with one M as its batches, and the batches' heads as its
  // heads, framed together; where a rank's classes wrap around r, classes
  // of one M need not be consecutive (w 7, r 4, rank 1: classes 2, 3, 0).
  check_case({2, 32, 6, 4, {{4, 1}, {8, 2}, {32, 3}, {64, 2}}, true, 0.3}, {8, 8, 8, 8});
  for (bool causal : {true, false}) {
    CAPTURE(causal);
    check_case({2, 21, 4, 3, {{7, 4}, {21, 2}, {3, 1}}, causal, 0.3}, {2, 3, 9, 7});
  }
  // Heads not a multiple, B = 2: classes of one head (r 4: classes 2, 3 of
  // 6 heads; r 8, more than the heads: every class) run together, the mask
  // head stepping by H; classes of two heads (r 4: classes 0, 1) one a piece.
  check_case({2, 32, 6, 4, {{4, 1}, {32, 4}, {64, 8}}, true, 0.3}, {8, 8, 8, 8});
  // B = 1: runs of classes with one head count (r 3 of 7 heads: class 0 of
  // three heads, classes 1, 2 of two).
  check_case({1, 45, 7, 3, {{45, 3}, {20, 2}}, false, 0.3}, {11, 20, 14});
  // No heads, a dilation of 2^40: nothing sized by r.
  check_case({1, 8, 0, 2, {{8, int64_t(1) << 40}}, true, 0.3}, {4, 4});
  // Vanilla attention (one r = 1 branch over the sequence): its pieces keep
  // every head, framed together.
  for (bool causal : {true, false}) {
    CAPTURE(causal);
    check_case({2, 30, 3, 4, {{30, 1}}, causal, 0.25}, ops::SequenceLayout::even(30, 3).chunk_sizes);
  }
}

TEST_CASE("seq_parallel_dilated_attention: only kept rows travel") {
  // One segment over 4 ranks of 16 tokens, r = 4, 2 heads: each rank ships
  // its 4 kept rows per head of k and v (not its 16 dense rows): after the
  // shape exchange (4 numbers over all ranks), one all-gather of
  // 2 * B * (4 * 2) * D over the segment's 4 ranks.
  const Case c{1, 64, 2, 3, {{64, 4}}, true};
  const Inputs in = make_inputs(c);
  DilatedAttentionConfig config;
  config.branches = c.branches;
  const std::vector<CountingComm::Log> logs = run_ranks(4, [&](dist::Communicator& comm) {
    const Tensor q = in.q.narrow(1, 16 * comm.rank(), 16).contiguous();
    ops::seq_parallel_dilated_attention(q, q, q, config, comm);
  });
  for (const CountingComm::Log& log : logs) CHECK(log == CountingComm::Log{{4, 4}, {2 * 1 * 8 * 3, 4}});
}

namespace {

// Each rank's collectives for one forward of case c over P chunks of n tokens (q = k = v).
std::vector<CountingComm::Log> communication_logs(const Case& c, int64_t n, int P) {
  const Inputs in = make_inputs(c);
  DilatedAttentionConfig config;
  config.branches = c.branches;
  return run_ranks(P, [&](dist::Communicator& comm) {
    const Tensor q = in.q.narrow(1, n * comm.rank(), n).contiguous();
    ops::seq_parallel_dilated_attention(q, q, q, config, comm);
  });
}

}  // namespace

TEST_CASE("seq_parallel_dilated_attention: per-rank communication is constant in P at fixed N/P") {
  // Chunks of n = 12 tokens, B = 1, H = 2, D = 3. Branch (24, 2): segment s
  // covers chunks 2s and 2s + 1, so each rank gathers within its own pair
  // only: 2 ranks x 2 (k, v) x B x (2 heads x 6 kept rows) x D. Branch (18, 3)
  // straddles at odd offsets: segment s spans chunks, and a chunk meets at most
  // two spanning segments (one per parity): each exchange is the segment's
  // 2 ranks and the larger of their kept-row counts, whatever P is.
  const int64_t n = 12, B = 1, H = 2, D = 3;
  for (int P : {2, 4, 6}) {
    CAPTURE(P);
    const Case c{B, n * P, H, D, {{24, 2}}, true};
    const std::vector<CountingComm::Log> logs = communication_logs(c, n, P);
    for (const CountingComm::Log& log : logs) CHECK(log == CountingComm::Log{{4, P}, {2 * B * (H * 6) * D, 2}});
    check_case(c, ops::SequenceLayout::even(c.N, P).chunk_sizes);
  }
  for (int P : {3, 6}) {
    CAPTURE(P);
    // w = 18 over chunks of 12: segments [0,18) ranks 0-1, [18,36) ranks 1-2,
    // [36,54) ranks 3-4, [54,72) ranks 4-5: a pattern of period 3 ranks.
    // Kept rows (r = 3, offsets h mod 3 = 0, 1) per head: 6 per segment,
    // 4 + 2 or 2 + 4 split between the two ranks, so R = 2 heads x 4.
    const Case c{B, n * P, H, D, {{18, 3}}, true};
    const std::vector<CountingComm::Log> logs = communication_logs(c, n, P);
    for (int p = 0; p < P; ++p) {
      CAPTURE(p);
      // Ranks 3k and 3k + 2 take part in one segment, 3k + 1 in two.
      CountingComm::Log want{{4, P}, {2 * B * (H * 4) * D, 2}};
      if (p % 3 == 1) want.push_back({2 * B * (H * 4) * D, 2});
      CHECK(logs[p] == want);
    }
    check_case(c, ops::SequenceLayout::even(c.N, P).chunk_sizes);
  }
}

namespace {

// One call of in_one_world: the forward and backward of c on `in`, rank p
// holding chunk_sizes[p] rows, given as the layout.
struct Call {
  Case c;
  Inputs in;
  std::vector<int64_t> sizes;
};

struct WorldCalls {
  std::vector<Result> results;  // per call
  std::vector<int64_t> splits;  // CountingComm::splits after each call, counted from the first
};

// The calls in order on one world of in-process ranks (every call with as
// many chunks), on the same communicator, so that plans and sub-communicators
// carry over from call to call.
WorldCalls in_one_world(const std::vector<Call>& calls) {
  const int P = static_cast<int>(calls.at(0).sizes.size());
  std::vector<std::vector<Result>> parts(calls.size(), std::vector<Result>(P));
  WorldCalls got{{}, std::vector<int64_t>(calls.size())};
  const int64_t before = CountingComm::splits.load();
  run_ranks(P, [&](dist::Communicator& comm) {
    const int p = comm.rank();
    for (size_t i = 0; i < calls.size(); ++i) {
      const Call& call = calls[i];
      REQUIRE(static_cast<int>(call.sizes.size()) == P);
      const ops::SequenceLayout layout{call.sizes};
      auto rows = [&](const Tensor& t) { return t.narrow(1, layout.start(p), call.sizes[p]).contiguous(); };
      Tensor q = rows(call.in.q).requires_grad_(), k = rows(call.in.k).requires_grad_(),
             v = rows(call.in.v).requires_grad_();
      DilatedAttentionConfig config;
      config.branches = call.c.branches;
      config.causal = call.c.causal;
      auto [out, lse] = ops::seq_parallel_dilated_attention(q, k, v, config, comm, layout);
      loss_of(out, lse, rows(call.in.w_out), rows(call.in.w_lse)).backward();
      parts[i][static_cast<size_t>(p)] = {out.detach(), lse.detach(), q.grad(), k.grad(), v.grad()};
      comm.barrier();  // every rank's splits of this call are counted
      if (p == 0) got.splits[i] = CountingComm::splits.load() - before;
      comm.barrier();
    }
  });
  for (const std::vector<Result>& ranks : parts) got.results.push_back(cat_ranks(ranks));
  return got;
}

void check_results(const Result& got, const Result& want, double tol) {
  check_equal("out", got.out, want.out, tol);
  check_equal("lse", got.lse, want.lse, tol);
  check_equal("dq", got.dq, want.dq, tol);
  check_equal("dk", got.dk, want.dk, tol);
  check_equal("dv", got.dv, want.dv, tol);
}

}  // namespace

TEST_CASE("seq_parallel_dilated_attention: a layout seen before reuses its plan, another its sub-communicators") {
  // Spanning segments at P = 3 (splits); the same layout again (its plan);
  // other chunk sizes whose spanning segments have the ranks the first
  // layout's have (a plan of its own, sharing the first one's
  // sub-communicators: no split); the first layout again (its plan kept).
  const Case c = kOdd;
  const Inputs in = make_inputs(c);
  const std::vector<int64_t> a = ops::SequenceLayout::even(c.N, 3).chunk_sizes, b = {5, 20, 12};
  const WorldCalls got = in_one_world({{c, in, a}, {c, in, a}, {c, in, b}, {c, in, a}});
  CHECK(got.splits[0] > 0);
  CHECK(got.splits == std::vector<int64_t>(4, got.splits[0]));
  const Result want = single_device(c, in);
  check_results(got.results[0], want, 1e-10);
  check_results(got.results[1], got.results[0], 0);
  check_results(got.results[2], want, 1e-10);
  check_results(got.results[3], got.results[0], 0);
}

TEST_CASE("seq_parallel_dilated_attention: one split per rank range, shared by plans and branches, P = 4") {
  // kOdd's branches over three layouts on one world (a split counts once per
  // rank: 4 a split). A {4, 7, 4, 22}: spanning segments of ranks (0, 1) in
  // branches 0 and 1 (the even ones by segment order), (1, 3) in branches 0
  // and 1 (the odd ones), (0, 3) in branches 2 and 3: three splits, each
  // shared by two branches. B {6, 5, 4, 22}: other chunks, the same ranks:
  // no split. C {4, 5, 8, 20}: branch 0's even segments are of (0, 1), kept,
  // and (2, 3), new (one split, whose (0, 1) ranks take colors of their own),
  // its odd one of (1, 2) (a split); branches 1 and 2 (0, 2) (a split) and
  // (2, 3) (kept now); branch 3 (0, 3): three splits.
  for (bool causal : {true, false}) {
    CAPTURE(causal);
    Case c = kOdd;
    c.causal = causal;
    const Inputs in = make_inputs(c);
    const std::vector<int64_t> A = {4, 7, 4, 22}, B = {6, 5, 4, 22}, C = {4, 5, 8, 20};
    std::vector<Call> calls{{c, in, A}, {c, in, B}, {c, in, C}};
    // Then 8 plans of other batch sizes over ranks (0, 1), (1, 2), (2, 3)
    // (segments of 4 over chunks of 9, 9, 9, 10): no split, and A's plan
    // and those of B and C go (the last 8 layouts are kept), and with them
    // the sub-communicators of (1, 3), (0, 3) and (0, 2), which no kept
    // plan uses: A again splits for (1, 3) and (0, 3).
    for (int64_t batch = 3; batch <= 10; ++batch) {
      const Case filler{batch, c.N, c.H, c.D, {{4, 1}}, causal};
      calls.push_back({filler, make_inputs(filler), {9, 9, 9, 10}});
    }
    calls.push_back({c, in, A});
    const WorldCalls got = in_one_world(calls);
    CHECK(got.splits[0] == 3 * 4);
    CHECK(got.splits[1] == 3 * 4);
    CHECK(got.splits[2] == 6 * 4);
    CHECK(got.splits[10] == 6 * 4);
    CHECK(got.splits[11] == 8 * 4);
    const Result want = single_device(c, in);
    for (size_t i : {0, 1, 2}) {
      CAPTURE(i);
      check_results(got.results[i], want, 1e-10);
    }
    check_results(got.results[11], got.results[0], 0);
    check_results(got.results[10], single_device(calls[10].c, calls[10].in), 1e-10);
  }
}

TEST_CASE("seq_parallel_dilated_attention: async gathers and reduce-scatters give the plain results bit for bit") {
  // Collectives that complete only when waited for (the latest a backend may)
  // give what the in-process backend's immediate ones give, so the op waits
  // before it reads what they deliver; the middle rank of kOdd at P = 3 has
  // several spanning segments' exchanges in flight at once (all started
  // before the local branches).
  for (bool causal : {true, false}) {
    CAPTURE(causal);
    Case c = kOdd;
    c.causal = causal;
    const Inputs in = make_inputs(c);
    const std::vector<int64_t> sizes = ops::SequenceLayout::even(c.N, 3).chunk_sizes;
    std::vector<int> in_flight(3);
    const Result plain = sequence_parallel(c, in, sizes), deferred = sequence_parallel(c, in, sizes, {&in_flight});
    check_equal("out", deferred.out, plain.out, 0);
    check_equal("lse", deferred.lse, plain.lse, 0);
    check_equal("dq", deferred.dq, plain.dq, 0);
    check_equal("dk", deferred.dk, plain.dk, 0);
    check_equal("dv", deferred.dv, plain.dv, 0);
    CHECK(in_flight[1] >= 2);
  }
  // A rank in two exchanges whose pieces read only the later one's gather
  // waits for them out of start order (a review's case: it hung when each
  // deferred collective ran only at its own wait).
  const Case two{1, 8, 1, 3, {{8, 4}, {8, 1}}, true};
  const Inputs in = make_inputs(two);
  for (bool layout : {false, true}) {
    CAPTURE(layout);
    std::vector<int> in_flight(2);
    const Result plain = sequence_parallel(two, in, {6, 2}, {nullptr, false, layout}),
                 deferred = sequence_parallel(two, in, {6, 2}, {&in_flight, false, layout});
    check_equal("out", deferred.out, plain.out, 0);
    check_equal("dk", deferred.dk, plain.dk, 0);
    check_equal("dv", deferred.dv, plain.dv, 0);
  }
}

TEST_CASE("seq_parallel_dilated_attention: float32 inputs match the float32 op") {
  Case c = kOdd;
  const Inputs in64 = make_inputs(c);
  auto f32 = [](const Tensor& t) { return t.to(DType::Float32); };
  const Inputs in{f32(in64.q), f32(in64.k), f32(in64.v), f32(in64.w_out), f32(in64.w_lse)};
  const Result want = single_device(c, in),
               got = sequence_parallel(c, in, ops::SequenceLayout::even(c.N, 3).chunk_sizes);
  CHECK(got.out.dtype() == DType::Float32);
  CHECK(got.lse.dtype() == DType::Float32);
  CHECK(got.dq.dtype() == DType::Float32);
  minidl::testing::check_close(got.out, want.out, 1e-5, 1e-4);
  minidl::testing::check_close(got.lse, want.lse, 1e-5, 1e-4);
  minidl::testing::check_close(got.dq, want.dq, 1e-5, 1e-4);
  minidl::testing::check_close(got.dk, want.dk, 1e-5, 1e-4);
  minidl::testing::check_close(got.dv, want.dv, 1e-5, 1e-4);
}

TEST_CASE("seq_parallel_dilated_attention with per-pair dropout drops what the op drops: P = 1 to 4") {
  // Every call computes its branches' shares of the whole problem's nested
  // pairs (a local group's branches as they are; a spanning piece's with its
  // head classes), so each pair is drawn once, by its owner, through the
  // call's frame. Spans of the nested branches straddle the chunks; chunks
  // hold whole segments of the small branches only; the branches listed out
  // of order; heads past 8 (the classes repeat).
  const std::vector<Case> cases{
      {2, 40, 4, 3, {{4, 1}, {8, 2}, {16, 4}}, true, 0.3, true},
      {1, 40, 10, 3, {{16, 4}, {4, 1}, {8, 2}}, true, 0.3, true},
      {2, 37, 3, 4, {{8, 1}, {16, 2}, {64, 8}}, true, 0.4, true},
      {1, 48, 9, 2, {{4, 1}, {8, 1}, {24, 2}, {48, 4}}, true, 0.3, true},
  };
  {  // (The cases nest: per pair drops otherwise than per copy.)
    Case copy = cases[0];
    copy.per_pair = false;
    const Inputs in = make_inputs(copy);
    CHECK(single_device(cases[0], in).out.to_vector<double>() != single_device(copy, in).out.to_vector<double>());
  }
  for (bool causal : {true, false})
    for (Case c : cases) {
      c.causal = causal;
      CAPTURE(causal);
      CAPTURE(c.N);
      check_case(c, {c.N}, 0.0);
      for (int P : {2, 3, 4}) {
        CAPTURE(P);
        check_case(c, ops::SequenceLayout::even(c.N, P).chunk_sizes);
      }
      check_case(c, {13, 1, 0, c.N - 14});
    }
  // A whole-chunk local group: bit for bit when nothing spans, and with
  // pieces merged into it; a config that does not nest (per pair then drops
  // per copy, as the op does).
  check_case({2, 32, 3, 4, {{4, 1}, {8, 2}, {16, 4}}, true, 0.3, true}, {16, 16}, 0.0);
  check_case({2, 32, 3, 4, {{4, 1}, {8, 2}, {32, 4}}, true, 0.3, true}, {8, 8, 8, 8});
  check_case({2, 37, 3, 4, {{8, 1}, {10, 3}, {16, 5}}, true, 0.3, true}, {13, 1, 23});
}

TEST_CASE("seq_parallel_dilated_attention: rejects a framed dropout mask and mismatched ranks") {
  DilatedAttentionConfig config;
  config.branches = {{4, 1}};
  config.dropout = make_attention_dropout(0.1, 1, 0);
  config.dropout.frame.position = 8;
  // (random_tensor's generator is not for threads: inputs are drawn here.)
  const Tensor q0 = random_tensor({1, 8, 2, 4}), q1 = random_tensor({1, 8, 3, 4});
  run_ranks(1, [&](dist::Communicator& comm) {
    const Tensor& q = q0;
    CHECK_THROWS_WITH_AS(ops::seq_parallel_dilated_attention(q, q, q, config, comm),
                         doctest::Contains("config.dropout.frame must be the default"), Error);
    DilatedAttentionConfig shares = config;
    shares.dropout.frame = {};
    shares.pairs.resize(1);
    CHECK_THROWS_WITH_AS(ops::seq_parallel_dilated_attention(q, q, q, shares, comm),
                         doctest::Contains("config.pairs must be empty"), Error);
    DilatedAttentionConfig bad = config;
    bad.dropout.frame = {};
    bad.dropout.threshold = 300;
    CHECK_THROWS_WITH_AS(ops::seq_parallel_dilated_attention(q, q, q, bad, comm),
                         doctest::Contains("threshold 300 is past 255"), Error);
    const uint64_t word = 0;
    bad.dropout = make_attention_dropout(0.1, 1, PhiloxOffset{&word, 0});
    CHECK_THROWS_WITH_AS(ops::seq_parallel_dilated_attention(q, q, q, bad, comm),
                         doctest::Contains("device offsets are for CUDA only"), Error);
  });
  config.dropout = {};
  CHECK_THROWS_WITH_AS(run_ranks(2,
                                   [&](dist::Communicator& comm) {
                                     const Tensor& q = comm.rank() == 0 ? q0 : q1;
                                     ops::seq_parallel_dilated_attention(q, q, q, config, comm);
                                   }),
                       doctest::Contains("every rank must pass"), Error);
  // Empty problems: batch or heads of 0 give empty outputs as the op does
  // (a tensor with no elements is contiguous, whatever its strides); a head
  // dim of 0 is refused with the op's message.
  const Tensor b0 = random_tensor({0, 8, 2, 4}), h0 = random_tensor({1, 8, 0, 4}), d0 = random_tensor({1, 8, 2, 0});
  run_ranks(2, [&](dist::Communicator& comm) {
    for (const Tensor* t : {&b0, &h0}) {
      const Tensor q = t->slice(1, 4 * comm.rank(), 4 * comm.rank() + 4);
      auto [out, lse] = ops::seq_parallel_dilated_attention(q, q, q, config, comm);
      CHECK(out.shape() == q.shape());
      CHECK(lse.numel() == 0);
    }
    const Tensor q = d0.slice(1, 4 * comm.rank(), 4 * comm.rank() + 4);
    CHECK_THROWS_WITH_AS(ops::seq_parallel_dilated_attention(q, q, q, config, comm),
                         doctest::Contains("head dim D must be >= 1"), Error);
  });
}

TEST_CASE("SequenceLayout::even: floor((p+1)N/P) - floor(pN/P), starts") {
  CHECK(ops::SequenceLayout::even(37, 4).chunk_sizes == std::vector<int64_t>{9, 9, 9, 10});
  CHECK(ops::SequenceLayout::even(5, 3).chunk_sizes == std::vector<int64_t>{1, 2, 2});
  CHECK(ops::SequenceLayout::even(2, 4).chunk_sizes == std::vector<int64_t>{0, 1, 0, 1});
  CHECK(ops::SequenceLayout::even(0, 2).chunk_sizes == std::vector<int64_t>{0, 0});
  CHECK(ops::SequenceLayout::even(12, 1).chunk_sizes == std::vector<int64_t>{12});
  // No overflow where p * N would not fit.
  const int64_t big = std::numeric_limits<int64_t>::max();
  const ops::SequenceLayout huge = ops::SequenceLayout::even(big, 3);
  CHECK(huge.chunk_sizes == std::vector<int64_t>{big / 3, big / 3, big / 3 + 1});
  CHECK(huge.start(3) == big);
  const ops::SequenceLayout layout{{5, 0, 20, 12}};
  CHECK(layout.start(0) == 0);
  CHECK(layout.start(2) == 5);
  CHECK(layout.start(4) == 37);
  CHECK_THROWS_WITH_AS(layout.start(5), doctest::Contains("SequenceLayout::start: rank 5"), Error);
  CHECK_THROWS_WITH_AS(ops::SequenceLayout::even(4, 0), doctest::Contains("SequenceLayout::even"), Error);
}

TEST_CASE("seq_parallel_dilated_attention with a layout equals the exchanging call bit for bit, P = 2, 3, 4") {
  // Each run_ranks is a fresh world: the layout call builds its own plan.
  for (bool causal : {true, false})
    for (const std::vector<int64_t>& sizes : std::vector<std::vector<int64_t>>{
             {18, 19}, {12, 12, 13}, {9, 9, 9, 10}, {5, 0, 20, 12}, {13, 1, 23}}) {
      CAPTURE(causal);
      CAPTURE(sizes.size());
      CAPTURE(sizes[0]);
      Case c = kOdd;
      c.causal = causal;
      const Inputs in = make_inputs(c);
      const Result exchanged = sequence_parallel(c, in, sizes);
      const Result given = sequence_parallel(c, in, sizes, {.layout = true});
      check_equal("out", given.out, exchanged.out, 0);
      check_equal("lse", given.lse, exchanged.lse, 0);
      check_equal("dq", given.dq, exchanged.dq, 0);
      check_equal("dk", given.dk, exchanged.dk, 0);
      check_equal("dv", given.dv, exchanged.dv, 0);
    }
}

TEST_CASE("seq_parallel_dilated_attention with a layout exchanges no sizes once its plan is built") {
  // Forward and backward, three times per rank with the layout: the first
  // call builds the plan and checks the layout once (one all-gather over all
  // ranks of 4 + P numbers per rank: its q's shape and the layout it was
  // given), later ones gather only kept rows, over the spanning segments'
  // sub-communicators. The exchanging call's all-gathers are the same plus
  // the size exchange (4 numbers over all ranks) on every call.
  for (int P : {2, 3, 4}) {
    CAPTURE(P);
    const Case c = kOdd;
    const Inputs in = make_inputs(c);
    const ops::SequenceLayout layout = ops::SequenceLayout::even(c.N, P);
    DilatedAttentionConfig config;
    config.branches = c.branches;
    auto run = [&](bool given) {
      return run_ranks(P, [&](dist::Communicator& comm) {
        const int p = comm.rank();
        auto rows = [&](const Tensor& t) { return t.narrow(1, layout.start(p), layout.chunk_sizes[p]).contiguous(); };
        for (int call = 0; call < 3; ++call) {
          Tensor q = rows(in.q).requires_grad_(), k = rows(in.k).requires_grad_(), v = rows(in.v).requires_grad_();
          auto [out, lse] = given ? ops::seq_parallel_dilated_attention(q, k, v, config, comm, layout)
                                  : ops::seq_parallel_dilated_attention(q, k, v, config, comm);
          loss_of(out, lse, rows(in.w_out), rows(in.w_lse)).backward();
        }
      });
    };
    // (A log holds every all_gather of a rank, in order; in the exchanging
    // run each call's begins with {4, P}.)
    const std::vector<CountingComm::Log> exchanged = run(false), given = run(true);
    for (int p = 0; p < P; ++p) {
      CAPTURE(p);
      const CountingComm::Log& ex = exchanged[static_cast<size_t>(p)];
      const CountingComm::Log& gv = given[static_cast<size_t>(p)];
      std::vector<size_t> starts;  // where each exchanging call's log begins
      for (size_t i = 0; i < ex.size(); ++i)
        if (ex[i] == std::pair<int64_t, int>{4, P}) starts.push_back(i);
      REQUIRE(starts.size() == 3);
      // The first call: the layout check instead of the size exchange, then the same.
      REQUIRE(gv.size() == ex.size() - 2);
      CHECK(gv[0] == std::pair<int64_t, int>{5 + P, P});
      CountingComm::Log want;
      for (size_t i = 0; i < ex.size(); ++i)
        if (ex[i] != std::pair<int64_t, int>{4, P}) want.push_back(ex[i]);
      want.insert(want.begin(), {5 + P, P});
      CHECK(gv == want);
      // Later calls: nothing over all P ranks (only the segments' own exchanges).
      for (size_t i = 1; i < gv.size(); ++i) CHECK(gv[i].first != 5 + P);
      CHECK(ex.size() - starts[1] > 1);  // the later calls do gather kept rows
    }
  }
}

TEST_CASE("seq_parallel_dilated_attention rejects a wrong layout clearly") {
  DilatedAttentionConfig config;
  config.branches = {{4, 1}, {8, 2}};
  const Tensor q4 = random_tensor({1, 4, 2, 3}), q5 = random_tensor({1, 5, 2, 3});
  auto on_two = [&](const std::function<void(dist::Communicator&)>& fn) { run_ranks(2, fn); };
  // A wrong layout is caught on the call that builds the plan, by every rank
  // from every rank's part of one all-gather, so that no rank throws while
  // the others wait in a collective (NCCL would hang). Every rank throws:
  // run_ranks rethrows the first, and a rank that did not throw would fail
  // the test by finishing.
  auto all_throw = [&](const ops::SequenceLayout& l0, const ops::SequenceLayout& l1, const Tensor& q0,
                       const Tensor& q1) {
    std::atomic<int> threw{0};
    CHECK_THROWS_AS(on_two([&](dist::Communicator& comm) {
                      const bool r0 = comm.rank() == 0;
                      try {
                        ops::seq_parallel_dilated_attention(r0 ? q0 : q1, r0 ? q0 : q1, r0 ? q0 : q1, config, comm,
                                                            r0 ? l0 : l1);
                      } catch (const Error&) {
                        ++threw;
                        throw;
                      }
                    }),
                    Error);
    CHECK(threw == 2);
  };
  // Rank 0's size is not its q's length.
  CHECK_THROWS_WITH_AS(on_two([&](dist::Communicator& comm) {
                         const Tensor& q = comm.rank() == 0 ? q4 : q5;
                         ops::seq_parallel_dilated_attention(q, q, q, config, comm, {{3, 5}});
                       }),
                       doctest::Contains("every rank must pass the same layout, the chunk sizes of its q: rank 0 "
                                         "passed chunk sizes [3, 5] but the ranks' q have [4, 5] rows"),
                       Error);
  all_throw({{3, 5}}, {{3, 5}}, q4, q5);
  CHECK_THROWS_WITH_AS(on_two([&](dist::Communicator& comm) {
                         ops::seq_parallel_dilated_attention(q4, q4, q4, config, comm, {{4, 4, 0}});
                       }),
                       doctest::Contains("rank 0's layout has 3 chunk sizes for a communicator of 2 ranks"), Error);
  all_throw({{4, 4, 0}}, {{4, 4}}, q4, q4);  // only rank 0's is wrong
  CHECK_THROWS_WITH_AS(on_two([&](dist::Communicator& comm) {
                         ops::seq_parallel_dilated_attention(q4, q4, q4, config, comm, {{4, -1}});
                       }),
                       doctest::Contains("rank 0 passed chunk sizes [4, -1] but the ranks' q have [4, 4] rows"),
                       Error);
  // Rank 1's q has 5 rows but rank 0 was told 4: caught when the plan is
  // built, on every rank.
  CHECK_THROWS_WITH_AS(on_two([&](dist::Communicator& comm) {
                         const Tensor& q = comm.rank() == 0 ? q4 : q5;
                         const ops::SequenceLayout layout{{4, comm.rank() == 0 ? 4 : 5}};
                         ops::seq_parallel_dilated_attention(q, q, q, config, comm, layout);
                       }),
                       doctest::Contains("every rank must pass the same layout, the chunk sizes of its q: rank 0 "
                                         "passed chunk sizes [4, 4] but the ranks' q have [4, 5] rows"),
                       Error);
}

TEST_CASE("TransformerLM with set_sequence_parallel equals one rank") {
  // Each of P ranks runs its chunk of every row at global positions; the sum
  // over ranks of (chunk length / T) x the chunk's mean loss is the whole
  // mean loss, and so are its parameter gradients (keys' and values'
  // gradients for other ranks' losses come back through the attention's
  // backward). Uneven chunks, so that a chunk's start is not rank x length.
  const TensorOptions f64{DType::Float64, Device::cpu(), false};
  const int64_t B = 2, T = 12, V = 11;
  std::vector<int32_t> ids, next;
  for (int64_t i = 0; i < B * T; ++i) {
    ids.push_back(static_cast<int32_t>((i * 7 + 3) % V));
    next.push_back(static_cast<int32_t>((i * 5 + 1) % V));
  }
  const Tensor idx = from_vector(ids, {B, T}), targets = from_vector(next, {B, T});
  for (const char* attention : {"causal", "dilated"})
    for (const char* pos : {"learned", "rope"}) {
      CAPTURE(attention);
      CAPTURE(pos);
      nn::TransformerLMConfig config;
      config.vocab_size = V;
      config.n_layer = 2;
      config.n_head = 2;
      config.n_embd = 8;
      config.block_size = T;
      config.dropout = 0;
      config.attention = attention;
      config.position_embedding = pos;
      if (std::string(attention) == "dilated") config.attention_options = {{"segments", "5,12"}, {"dilations", "1,3"}};
      nn::TransformerLM one(config, 7, f64);
      const Tensor want_loss = one.loss(idx, targets);
      want_loss.backward();
      for (const ops::SequenceLayout& layout : {ops::SequenceLayout{{5, 7}}, ops::SequenceLayout{{3, 6, 3}}})
        for (bool given : {false, true}) {  // the layout exchanged (an offset given), or given
          const int P = static_cast<int>(layout.chunk_sizes.size());
          CAPTURE(P);
          CAPTURE(given);
          std::vector<std::vector<Tensor>> grads(P);
          std::vector<double> losses(P);
          dist::run_in_process(P, [&](dist::Communicator& comm) {
            nn::TransformerLM model(config, 7, f64);
            const int64_t start = layout.start(comm.rank()), n = layout.chunk_sizes[comm.rank()];
            model.set_sequence_parallel(given ? nn::SequenceParallel(comm, layout) : nn::SequenceParallel(comm, start));
            auto chunk = [&](const Tensor& t) { return t.narrow(1, start, n).contiguous(); };
            Tensor loss = ops::mul(model.loss(chunk(idx), chunk(targets)), static_cast<double>(n) / T);
            loss.backward();
            losses[comm.rank()] = loss.item<double>();
            for (const Tensor& p : model.parameters()) grads[comm.rank()].push_back(p.grad());
          });
          double total = 0;
          for (double l : losses) total += l;
          CHECK(std::abs(total - want_loss.item<double>()) <= 1e-12);
          const std::vector<Tensor> want = one.parameters();
          for (size_t i = 0; i < want.size(); ++i) {
            Tensor sum = grads[0][i];
            for (int p = 1; p < P; ++p) sum = ops::add(sum, grads[p][i]);
            check_equal("grad", sum, want[i].grad(), 1e-10);
          }
        }
    }
}

TEST_CASE("TransformerLM::set_sequence_parallel refuses a layout with an empty chunk or past block_size") {
  // On every rank alike, before any collective (forward's own length check
  // would throw on one rank only).
  nn::TransformerLMConfig config;
  config.vocab_size = 11;
  config.n_layer = 1;
  config.n_head = 2;
  config.n_embd = 8;
  config.block_size = 12;
  config.dropout = 0;
  std::atomic<int> accepted{0};
  dist::run_in_process(3, [&](dist::Communicator& comm) {
    nn::TransformerLM model(config, 7, {DType::Float64, Device::cpu(), false});
    CHECK_THROWS_WITH_AS(model.set_sequence_parallel(nn::SequenceParallel(comm, ops::SequenceLayout{{5, 0, 7}})),
                         doctest::Contains("layout [5, 0, 7] has an empty chunk"), Error);
    CHECK_THROWS_WITH_AS(model.set_sequence_parallel(nn::SequenceParallel(comm, ops::SequenceLayout{{5, 4, 4}})),
                         doctest::Contains("covers 13 positions, more than block_size = 12"), Error);
    model.set_sequence_parallel(nn::SequenceParallel(comm, ops::SequenceLayout{{5, 4, 3}}));
    ++accepted;
  });
  CHECK(accepted == 3);
}

TEST_CASE("nn::SequenceParallel: the offset comes from the layout, or is given; bad ones are refused") {
  const ops::SequenceLayout layout{{5, 0, 7}};
  std::vector<int64_t> offsets(3, -1);
  dist::run_in_process(3, [&](dist::Communicator& comm) {
    const nn::SequenceParallel sp(comm, layout);
    offsets[static_cast<size_t>(comm.rank())] = sp.offset();
    CHECK(sp.comm() == &comm);
    REQUIRE(sp.layout().has_value());
    CHECK(sp.layout()->chunk_sizes == layout.chunk_sizes);
    const nn::SequenceParallel given(comm, 4);
    CHECK(given.offset() == 4);
    CHECK_FALSE(given.layout().has_value());
    // Every rank throws alike (the same layout on every rank, no collective).
    CHECK_THROWS_WITH_AS(nn::SequenceParallel(comm, ops::SequenceLayout{{6, 6}}),
                         doctest::Contains("SequenceParallel: layout has 2 chunk sizes [6, 6] for a communicator "
                                           "of 3 ranks"),
                         Error);
    CHECK_THROWS_WITH_AS(nn::SequenceParallel(comm, ops::SequenceLayout{{6, -1, 7}}),
                         doctest::Contains("sizes must be >= 0"), Error);
    CHECK_THROWS_WITH_AS(nn::SequenceParallel(comm, int64_t{-1}), doctest::Contains("offset -1 must be >= 0"),
                         Error);
  });
  CHECK(offsets == std::vector<int64_t>{0, 5, 5});
  const nn::SequenceParallel off;
  CHECK(off.comm() == nullptr);
  CHECK(off.offset() == 0);
}

// ---- CUDA: virtual ranks on one GPU (in-process backend), NCCL world size 1 ----

namespace {

// The CUDA tests' inputs: the float64 inputs rounded to `dtype`, on the GPU
// (loss weights float32), and the same rounded values in float64 on the CPU
// for the reference.
struct CudaInputs {
  Inputs gpu, ref;
};

CudaInputs cuda_inputs(const Case& c, DType dtype) {
  const Inputs in = make_inputs(c);
  auto round = [&](const Tensor& t) { return t.to(dtype).to(DType::Float64); };
  const Inputs ref{round(in.q), round(in.k), round(in.v), in.w_out.to(DType::Float32).to(DType::Float64),
                   in.w_lse.to(DType::Float32).to(DType::Float64)};
  auto gpu = [&](const Tensor& t, DType d) { return t.to(d).to(Device::cuda()); };
  return {{gpu(ref.q, dtype), gpu(ref.k, dtype), gpu(ref.v, dtype), gpu(ref.w_out, DType::Float32),
           gpu(ref.w_lse, DType::Float32)},
          ref};
}

Result on_cpu(const Result& r) {
  auto cpu = [](const Tensor& t) { return t.to(Device::cpu()); };
  return {cpu(r.out), cpu(r.lse), cpu(r.dq), cpu(r.dk), cpu(r.dv)};
}

double cuda_tolerance(DType dtype) { return dtype == DType::BFloat16 ? 2e-2 : 2e-3; }

// |a - b| <= tol * max|b| elementwise (lse: -inf exactly where b has it,
// |a - b| <= tol (1 + |b|) elsewhere): the CUDA attention tests' measure.
void check_scaled(const char* what, const Tensor& a, const Tensor& b, double tol) {
  CAPTURE(what);
  const std::vector<double> y = b.to_vector<double>();
  double peak = 1e-30;
  for (double x : y) peak = std::max(peak, std::abs(x));
  minidl::testing::check_close(a, b, tol * peak, tol);
}

void check_lse(const Tensor& a, const Tensor& b, double tol) {
  REQUIRE(a.shape() == b.shape());
  const std::vector<double> x = a.to_vector<double>(), y = b.to_vector<double>();
  size_t bad = 0, first = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    const bool ok = std::isinf(y[i]) ? x[i] == y[i] : std::abs(x[i] - y[i]) <= tol * (1 + std::abs(y[i]));
    if (!ok && bad++ == 0) first = i;
  }
  INFO("lse: first bad element ", first, ": ", x.empty() ? 0.0 : x[first], " vs ", y.empty() ? 0.0 : y[first]);
  CHECK(bad == 0);
}

void check_result(const Result& got, const Result& want, double tol) {
  check_scaled("out", got.out.to(DType::Float64), want.out.to(DType::Float64), tol);
  check_lse(got.lse, want.lse, tol);
  check_scaled("dq", got.dq.to(DType::Float64), want.dq.to(DType::Float64), tol);
  check_scaled("dk", got.dk.to(DType::Float64), want.dk.to(DType::Float64), tol);
  check_scaled("dv", got.dv.to(DType::Float64), want.dv.to(DType::Float64), tol);
}

// The odd geometry of kOdd at head dims the CUDA kernels take in both dtypes.
const Case kOddCuda{2, 37, 3, 32, {{8, 1}, {10, 3}, {16, 5}, {64, 2}}, true};

}  // namespace

TEST_CASE("CUDA seq_parallel_dilated_attention (virtual ranks) equals the op: float32, bfloat16, P = 2, 3") {
  MINIDL_REQUIRE_CUDA();
  // Odd geometry (N/P not a multiple of w, odd straddles, w % r != 0, r > H,
  // w > N), an uneven split with a one-row chunk, and a larger problem on the
  // tensor-core kernels (D = 64; chunks of 100 with w = 64, 128, 256).
  struct Split {
    Case c;
    std::vector<int64_t> sizes;
  };
  std::vector<Split> splits;
  for (bool causal : {true, false}) {
    Case c = kOddCuda;
    c.causal = causal;
    splits.push_back({c, ops::SequenceLayout::even(c.N, 2).chunk_sizes});
    splits.push_back({c, ops::SequenceLayout::even(c.N, 3).chunk_sizes});
    splits.push_back({c, {13, 1, 23}});
  }
  splits.push_back(
      {{1, 300, 4, 64, {{64, 1}, {128, 2}, {256, 4}}, true}, ops::SequenceLayout::even(300, 3).chunk_sizes});
  for (DType dtype : {DType::Float32, DType::BFloat16})
    for (const Split& sp : splits) {
      CAPTURE(dtype);
      CAPTURE(sp.c.N);
      CAPTURE(sp.c.D);
      CAPTURE(sp.c.causal);
      CAPTURE(sp.sizes.size());
      CAPTURE(sp.sizes[0]);
      const CudaInputs in = cuda_inputs(sp.c, dtype);
      const Result want = single_device(sp.c, in.ref);
      const Result one = on_cpu(single_device(sp.c, in.gpu));
      const Result got = on_cpu(sequence_parallel(sp.c, in.gpu, sp.sizes));
      CHECK(got.out.dtype() == dtype);
      CHECK(got.lse.dtype() == DType::Float32);
      CHECK(got.dq.dtype() == dtype);
      // Both within the CUDA kernels' tolerance of the float64 op, and of each other.
      check_result(one, want, cuda_tolerance(dtype));
      check_result(got, want, cuda_tolerance(dtype));
      check_result(got, one, cuda_tolerance(dtype));
    }
}

TEST_CASE("CUDA seq_parallel_dilated_attention with attention dropout (virtual ranks) equals the op: float32, bfloat16") {
  MINIDL_REQUIRE_CUDA();
  // The kernels draw the whole problem's mask through each call's frame,
  // every version (MINIDL_ATTENTION_KERNEL): SIMT, mma.sync and TF32 (odd
  // geometry, D = 32), wgmma and ws (D = 64; the ws forward keeps the mask's
  // bits for each call's backward).
  struct Split {
    Case c;
    std::vector<int64_t> sizes;
  };
  Case odd = kOddCuda;
  odd.dropout = 0.3;
  // Per pair, over branches that nest: each call computes its branches'
  // shares of the whole problem's pairs (local groups' shares as they are,
  // spanning pieces as lone branches with a share, whose kernels run the
  // accumulating path). The last config's spans are whole ws blocks: the ws
  // plan with shares in a local group, and a piece of its smallest branch
  // (weights only, no span of its own). The odd geometry does not nest:
  // per pair is per copy there.
  Case odd_pair = odd;
  odd_pair.per_pair = true;
  const Case nested{1, 300, 4, 64, {{64, 1}, {128, 2}, {256, 4}}, true, 0.2, true};
  Case nested_copy = nested;
  nested_copy.per_pair = false;
  const Case listed{2, 256, 9, 32, {{128, 2}, {64, 1}, {256, 4}}, false, 0.2, true};
  const Case blocks{1, 2048, 4, 64, {{512, 1}, {1024, 2}, {2048, 4}}, true, 0.2, true};
  const std::vector<Split> splits{
      {odd, ops::SequenceLayout::even(odd.N, 2).chunk_sizes},
      {odd, {13, 1, 23}},
      {nested_copy, ops::SequenceLayout::even(nested.N, 3).chunk_sizes},
      {{2, 256, 4, 64, {{64, 1}, {256, 2}, {128, 4}}, true, 0.2}, {128, 128}},
      {odd_pair, {13, 1, 23}},
      {nested, ops::SequenceLayout::even(nested.N, 3).chunk_sizes},
      {listed, {100, 156}},
      {blocks, {1024, 1024}},
      {blocks, ops::SequenceLayout::even(blocks.N, 3).chunk_sizes}};
  for (DType dtype : {DType::Float32, DType::BFloat16})
    for (const Split& sp : splits) {
      CAPTURE(dtype);
      CAPTURE(sp.c.N);
      CAPTURE(sp.c.per_pair);
      CAPTURE(sp.sizes.size());
      const CudaInputs in = cuda_inputs(sp.c, dtype);
      const Result want = single_device(sp.c, in.ref);
      minidl::testing::for_each_kernel(dtype, sp.c.D, [&] {
        const Result one = on_cpu(single_device(sp.c, in.gpu));
        const Result got = on_cpu(sequence_parallel(sp.c, in.gpu, sp.sizes));
        check_result(one, want, cuda_tolerance(dtype));
        check_result(got, want, cuda_tolerance(dtype));
        check_result(got, one, cuda_tolerance(dtype));
      });
    }
}

TEST_CASE("CUDA seq_parallel_dilated_attention: one rank equals the CUDA op (in-process and NCCL)") {
  MINIDL_REQUIRE_CUDA();
  // One rank runs all branches in one call of the op's kernels on its rows
  // (nothing spans: no merges): the forward is the op's bit for bit; the
  // backward equals the op's up to the kernels' own run-to-run variation (dq
  // sums by atomics).
  for (DType dtype : {DType::Float32, DType::BFloat16}) {
    CAPTURE(dtype);
    const CudaInputs in = cuda_inputs(kOddCuda, dtype);
    const Result want = on_cpu(single_device(kOddCuda, in.gpu));
    auto check_one = [&](const Result& got) {
      check_equal("out", got.out, want.out, 0.0);
      check_equal("lse", got.lse, want.lse, 0.0);
      check_scaled("dq", got.dq.to(DType::Float64), want.dq.to(DType::Float64), cuda_tolerance(dtype) / 4);
      check_scaled("dk", got.dk.to(DType::Float64), want.dk.to(DType::Float64), cuda_tolerance(dtype) / 4);
      check_scaled("dv", got.dv.to(DType::Float64), want.dv.to(DType::Float64), cuda_tolerance(dtype) / 4);
    };
    check_one(on_cpu(sequence_parallel(kOddCuda, in.gpu, {kOddCuda.N})));
    if (!dist::nccl_available()) {
      MESSAGE("NCCL part skipped: minidl was built without NCCL");
      continue;
    }
    DilatedAttentionConfig config;
    config.branches = kOddCuda.branches;
    Result got;
    dist::run_nccl(1, [&](dist::Communicator& comm) {
      Tensor q = in.gpu.q.clone().requires_grad_(), k = in.gpu.k.clone().requires_grad_(),
             v = in.gpu.v.clone().requires_grad_();
      auto [out, lse] = ops::seq_parallel_dilated_attention(q, k, v, config, comm);
      loss_of(out, lse, in.gpu.w_out, in.gpu.w_lse).backward();
      got = on_cpu({out.detach(), lse.detach(), q.grad(), k.grad(), v.grad()});
    });
    check_one(got);
  }
}

TEST_CASE("CUDA seq_parallel_dilated_attention over NCCL on 2 or 3 GPUs equals the op: float32, bfloat16") {
  MINIDL_REQUIRE_NCCL_GPUS();
  const int gpus = cuda_device_count();
  // The real async path: gathers on the communication stream beside the
  // local branches, reduce-scatters beside the local backward.
  for (DType dtype : {DType::Float32, DType::BFloat16})
    for (bool causal : {true, false})
      for (int P : {2, 3}) {
        if (P > gpus) continue;
        CAPTURE(dtype);
        CAPTURE(causal);
        CAPTURE(P);
        Case c = kOddCuda;
        c.causal = causal;
        const CudaInputs in = cuda_inputs(c, dtype);
        const Result want = single_device(c, in.ref);
        const std::vector<int64_t> sizes = ops::SequenceLayout::even(c.N, P).chunk_sizes;
        const Result got = sequence_parallel(c, in.gpu, sizes, {.nccl = true});
        CHECK(got.out.dtype() == dtype);
        check_result(got, want, cuda_tolerance(dtype));
        // The same against the virtual ranks on one GPU (synchronous collectives).
        check_result(got, on_cpu(sequence_parallel(c, in.gpu, sizes)), cuda_tolerance(dtype));
      }
}

TEST_CASE("CUDA seq_parallel_dilated_attention: CUDA tensors need float32 or bfloat16 and one device") {
  MINIDL_REQUIRE_CUDA();
  DilatedAttentionConfig config;
  config.branches = {{4, 1}};
  const Tensor q64 = random_tensor({1, 8, 2, 32}, {DType::Float64, Device::cuda()});
  const Tensor q = random_tensor({1, 8, 2, 32}, {DType::Float32, Device::cuda()});
  const Tensor cpu = random_tensor({1, 8, 2, 32}, {DType::Float32});
  run_ranks(1, [&](dist::Communicator& comm) {
    CHECK_THROWS_WITH_AS(ops::seq_parallel_dilated_attention(q64, q64, q64, config, comm),
                         doctest::Contains("expected float32 or bfloat16 on CUDA"), Error);
    CHECK_THROWS_AS(ops::seq_parallel_dilated_attention(q, cpu, q, config, comm), Error);
  });
}

namespace {

uint64_t host_syncs() {
#if defined(MINIDL_WITH_CUDA)
  return cuda::host_sync_count();
#else
  return 0;
#endif
}

// Rank p's rows of a CudaInputs reference tensor under `layout`, in float32 on `device`.
Tensor rank_rows(const Tensor& ref, const ops::SequenceLayout& layout, int p, Device device) {
  return ref.narrow(1, layout.start(p), layout.chunk_sizes[static_cast<size_t>(p)])
      .contiguous()
      .to(DType::Float32)
      .to(device);
}

}  // namespace

TEST_CASE("CUDA seq_parallel_dilated_attention with a layout and a kept plan makes no host waits") {
  MINIDL_REQUIRE_CUDA();
  // Forward and backward of every rank, counted by cuda::host_sync_count
  // (process-wide): virtual ranks on one GPU at P = 2, 3 (their collectives
  // are device copies; the in-process barrier waits on the host only), and
  // NCCL with one rank. The first call builds the plan (host waits: the
  // layout check, the row maps' uploads); a call that exchanges the sizes
  // waits for them.
  const CudaInputs in = cuda_inputs(kOddCuda, DType::Float32);
  DilatedAttentionConfig config;
  config.branches = kOddCuda.branches;
  struct Counts {
    uint64_t given = 0, exchanged = 0;
  };
  auto count = [&](int P, bool nccl) {
    const ops::SequenceLayout layout = ops::SequenceLayout::even(kOddCuda.N, P);
    uint64_t marks[3] = {};
    auto body = [&](dist::Communicator& comm) {
      const int p = comm.rank();
      auto rows = [&](const Tensor& t) { return rank_rows(t, layout, p, nccl ? Device::cuda(p) : Device::cuda()); };
      // Uploaded before counting (host waits); gradients accumulate over the calls.
      const Tensor q = rows(in.ref.q).requires_grad_(), k = rows(in.ref.k).requires_grad_(),
                   v = rows(in.ref.v).requires_grad_(), w_out = rows(in.ref.w_out), w_lse = rows(in.ref.w_lse);
      auto call = [&](bool given) {
        auto [out, lse] = given ? ops::seq_parallel_dilated_attention(q, k, v, config, comm, layout)
                                : ops::seq_parallel_dilated_attention(q, k, v, config, comm);
        loss_of(out, lse, w_out, w_lse).backward();
      };
      auto mark = [&](int i) {
        if (comm.size() > 1) comm.barrier();  // (in-process: on the host only; NCCL's would wait)
        if (p == 0) marks[i] = host_syncs();
        if (comm.size() > 1) comm.barrier();
      };
      call(true);  // builds the plan
      mark(0);
      call(true);
      call(true);
      mark(1);
      call(false);
      mark(2);
    };
    if (nccl) dist::run_nccl(P, body);
    else run_ranks(P, body);
    return Counts{marks[1] - marks[0], marks[2] - marks[1]};
  };
  for (int P : {2, 3}) {
    CAPTURE(P);
    const Counts n = count(P, false);
    CHECK(n.given == 0);
    CHECK(n.exchanged > 0);
  }
  if (!dist::nccl_available()) {
    MESSAGE("NCCL part skipped: minidl was built without NCCL");
    return;
  }
  const Counts n = count(1, true);
  CHECK(n.given == 0);
  CHECK(n.exchanged > 0);
}

TEST_CASE("CUDA seq_parallel_dilated_attention with a layout: forward and backward replayed from a CUDA graph") {
  MINIDL_REQUIRE_CUDA();
  if (!dist::nccl_available()) {
    MESSAGE("skipped: minidl was built without NCCL");
    return;
  }
  // NCCL, one GPU per rank (virtual ranks share one stream, so they cannot
  // each capture): one rank, and two where two GPUs are visible (then the
  // gathers and reduce-scatters are captured too). After an eager call (the
  // plan is built), each rank captures the call and its backward, replays it
  // on the same inputs and on new ones copied in place, and compares with
  // eager calls: (out, lse) bit for bit, the gradients to the kernels'
  // run-to-run variation (dq sums by atomics).
  const int gpus = cuda_device_count();
  DilatedAttentionConfig config;
  config.branches = kOddCuda.branches;
  const CudaInputs first = cuda_inputs(kOddCuda, DType::Float32), second = cuda_inputs(kOddCuda, DType::Float32);
  for (int P : {1, 2}) {
    if (P > gpus) {
      MESSAGE("P = ", P, " skipped: ", gpus, " GPU(s) visible");
      continue;
    }
    CAPTURE(P);
    const ops::SequenceLayout layout = ops::SequenceLayout::even(kOddCuda.N, P);
    // Per rank: eager and replayed, on the first inputs and on the second.
    std::vector<std::array<Result, 4>> results(static_cast<size_t>(P));
    dist::run_nccl(P, [&](dist::Communicator& comm) {
      const int p = comm.rank();
      auto rows = [&](const Tensor& t) { return rank_rows(t, layout, p, Device::cuda(p)); };
      Tensor q = rows(first.ref.q).requires_grad_(), k = rows(first.ref.k).requires_grad_(),
             v = rows(first.ref.v).requires_grad_(), w_out = rows(first.ref.w_out), w_lse = rows(first.ref.w_lse);
      Result r;
      auto step = [&] {
        for (const Tensor& t : {q, k, v}) t.zero_grad();  // backward writes fresh gradients
        auto [out, lse] = ops::seq_parallel_dilated_attention(q, k, v, config, comm, layout);
        loss_of(out, lse, w_out, w_lse).backward();
        r = {out.detach(), lse.detach(), q.grad(), k.grad(), v.grad()};
      };
      auto refill = [&](const Inputs& ref) {
        NoGradGuard no_grad;
        ops::copy_(q, rows(ref.q));
        ops::copy_(k, rows(ref.k));
        ops::copy_(v, rows(ref.v));
        ops::copy_(w_out, rows(ref.w_out));
        ops::copy_(w_lse, rows(ref.w_lse));
      };
      std::array<Result, 4>& mine = results[static_cast<size_t>(p)];
      step();
      mine[0] = on_cpu(r);
      nn::CudaGraph graph;
      graph.capture(step);
      graph.replay();
      mine[1] = on_cpu(r);
      refill(second.ref);
      graph.replay();
      mine[3] = on_cpu(r);
      step();
      mine[2] = on_cpu(r);
    });
    for (int p = 0; p < P; ++p)
      for (int i : {0, 2}) {
        CAPTURE(p);
        CAPTURE(i);
        const Result& eager = results[static_cast<size_t>(p)][static_cast<size_t>(i)];
        const Result& replayed = results[static_cast<size_t>(p)][static_cast<size_t>(i + 1)];
        check_equal("out", replayed.out, eager.out, 0.0);
        check_equal("lse", replayed.lse, eager.lse, 0.0);
        const double tol = cuda_tolerance(DType::Float32) / 4;
        check_scaled("dq", replayed.dq.to(DType::Float64), eager.dq.to(DType::Float64), tol);
        check_scaled("dk", replayed.dk.to(DType::Float64), eager.dk.to(DType::Float64), tol);
        check_scaled("dv", replayed.dv.to(DType::Float64), eager.dv.to(DType::Float64), tol);
      }
    // The second inputs gave other results (the replay read the refilled buffers).
    CHECK(results[0][3].out.to_vector<double>() != results[0][1].out.to_vector<double>());
  }
}
