// Sequence-parallel dilated attention (LongNet): forward and backward side by
// side. The algorithm and what it communicates: docs/dilated-attention.md,
// "Sequence parallel", and docs/scaling.md. Every piece of attention runs on
// the device's dilated-attention kernels (cpu/ or cuda/dilated_attention.h) on
// row sets assembled here; pieces merge by the log-sum-exp rule into one
// softmax per row, and the backward runs each piece with the global
// (O, L, dO, dL), as the single-device op does.
//
// A spanning piece is a dense causal problem the existing kernels take as is:
// its keys are the segment's gathered kept rows in kept order (t = 0..M-1),
// and this rank's queries sit at their kept index t (other rows zero, their
// results dropped, their zero dO and dL giving exactly zero gradients), so
// the kernel's causal mask (key t' <= query t) is the exact global one.
// Attention dropout: each kernel call carries a mask frame (core/dilated.h)
// mapping its branches, heads and rows to the whole problem's, so every
// piece draws the single-device op's decisions for its pairs; the mask the
// forward's kernels keep (CUDA's ws bits) goes to the same call's backward.
//
// On the CPU everything runs in float64; on CUDA the kernels run in the
// inputs' dtype (bfloat16 or float32) and the merged (O, L) and every
// gradient sum are float32. The data movement is one set of row maps (built
// with the plan, uploaded once on CUDA) that both devices walk.
#include "ops/seq_parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <set>
#include <utility>
#include <vector>

#include "autograd/grad_mode.h"
#include "autograd/tape.h"
#include "cpu/dilated_attention.h"
#include "ops/dispatch.h"
#include "ops/ops.h"
#if defined(MINIDL_WITH_CUDA)
#include "cuda/dilated_attention.h"
#include "cuda/runtime.h"
#include "cuda/seq_parallel.h"
#endif

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

constexpr const char* kOp = "seq_parallel_dilated_attention";
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
// The most heads a piece laid out by class gives one kernel call: CUDA's
// launches take at most 65535 heads (grid y; cuda/dilated_attention_common.cuh).
constexpr int64_t kMaxPieceHeads = 65535;

// Whether a piece of classes with J heads each, laid out by class (Piece),
// has a linear mask frame: its head b J + j is mask head b H + c + j r.
bool class_frame_linear(int64_t J, int64_t r, int64_t H, int64_t B) { return J * r == H || J == 1 || B == 1; }

// Row pairs (dst row, src row) of one data movement, built with the plan on
// the host; on CUDA also uploaded once as int32 device arrays.
struct RowMap {
  std::vector<int32_t> dst, src;
  Tensor dst_dev, src_dev;
  int64_t largest = 0;  // the largest index added: make_plan checks it, on every rank at once
  int64_t size() const { return static_cast<int64_t>(dst.size()); }
  void add(int64_t d, int64_t s) {
    largest = std::max(largest, std::max(d, s));
    dst.push_back(static_cast<int32_t>(d));
    src.push_back(static_cast<int32_t>(s));
  }
  void upload(Device device) {
    if (!device.is_cuda() || dst.empty()) return;
    dst_dev = from_vector<int32_t>(dst, {size()}).to(device);
    src_dev = from_vector<int32_t>(src, {size()}).to(device);
  }
};

// One head's kept rows of one spanning segment that one rank owns: positions
// x0 + j·r (global), j < count, stored at rows [offset, offset + count) of
// that rank's packed k/v rows.
struct Block {
  int64_t h, x0, r, count, offset;
};

// One head of a spanning piece: its kept rows t in [t0, t1) are this rank's
// queries (global position base + t·r); keys[t] (t < M, the assembled length)
// names where kept row t lies: (rank within the exchange, packed row of that
// rank).
struct PieceHead {
  int64_t h, base, t0, t1;
  std::vector<std::pair<int, int64_t>> keys;
};

// The heads of one spanning (branch, segment) that share an assembled length
// M: one dense attention problem (batches, M, heads, D) for the kernels,
// whose keys come from exchange `ex`. A head's kept rows depend on its class
// h mod r only, so a piece holds whole classes. Laid out two ways:
// - by batch: (B, M, heads) in head order. Without attention dropout it
//   holds every head of one M; with dropout one class only (heads c, c + r,
//   ..., which one mask frame maps);
// - by class, with attention dropout: a run of classes c0, c0 + 1, ... with
//   one M and J heads each as the problem's batches, and as its heads
//   b J + j the batches b and the class's heads c + j r: mask head
//   b H + c + j r. Its mask frame (kernel_config) is linear in b J + j when
//   J r = H (step r), J = 1 (step H) or B = 1 (step r), so one call draws
//   the mask of every class of the run; make_plan lays a run out so where
//   that holds and its B J heads fit one launch (kMaxPieceHeads).
struct Piece {
  int64_t branch, r, M;  // branch: its index in the config
  size_t ex;
  bool by_class;
  int64_t batches, per_batch;  // the problem's batches and heads
  std::vector<PieceHead> heads;  // in head order
  // Rows of the piece's problem: `queries` from this rank's (B, n, H) rows
  // (its queries only), `keys` from the exchange's gathered (size, 2, B, R)
  // rows (the k half; the v half is B * R rows further).
  RowMap queries, keys;

  // The problem's row of batch b's head heads[g], kept index t.
  int64_t row(int64_t b, int64_t t, size_t g) const {
    if (!by_class) return (b * M + t) * per_batch + static_cast<int64_t>(g);
    // Class h % r is batch h % r - c0 (heads[0] is head c0), head j = h / r of its J.
    const int64_t h = heads[g].h, J = static_cast<int64_t>(heads.size()) / batches;
    return ((h % r - heads[0].h) * M + t) * per_batch + b * J + h / r;
  }
  Shape shape(int64_t W) const {  // W = 0: an lse's
    return W ? Shape{batches, M, per_batch, W} : Shape{batches, M, per_batch};
  }
};

// One spanning segment this rank takes part in: its ranks [first, first +
// comm->size()) (a sub-communicator of exactly them, shared with the other
// spanning segments of those ranks: SubComms) all-gather their kept rows of
// it, R packed rows each (the maximum over those ranks), and reduce-scatter
// the rows' gradients back.
struct Exchange {
  std::shared_ptr<dist::Communicator> comm;
  int first = 0;
  int64_t R = 0;
  std::vector<Block> own_blocks;  // this rank's packed rows, in packing order
  RowMap pack;  // this rank's (B, R) packed rows from its (B, n, H) rows
};

// Branches whose segments lie wholly inside this chunk over the same global
// positions [a, b): one kernel call on the local rows. With attention
// dropout, the branches are consecutive in the config, from `first_branch`:
// the mask frame numbers the kernel's branches from there.
struct LocalGroup {
  int64_t a, b;
  std::vector<DilatedBranch> branches;
  int64_t first_branch = 0;
};

// Everything both passes need; the same on every rank except the parts that
// name this rank.
struct Plan {
  int64_t B = 0, H = 0, D = 0, N = 0;
  int P = 1, rank = 0;
  std::vector<int64_t> starts;  // P + 1 chunk boundaries
  bool causal = true;
  double scale = 1;
  std::vector<LocalGroup> local;
  std::vector<Piece> pieces;
  std::vector<Exchange> exchanges;  // in (branch, segment) order on every rank
  std::vector<std::pair<int, int>> spans;  // every spanning segment's ranks [first, last], this rank's or not
  // Per-pair dropout where the branches nest over the whole sequence: each
  // branch's share of the whole problem's nested pairs (nested_pairs, config
  // order), which its calls compute; empty otherwise (every call then drops
  // per copy, as the op does).
  std::vector<BranchPairs> shares;
  int64_t c0() const { return starts[rank]; }
  int64_t c1() const { return starts[rank + 1]; }
  int64_t n() const { return c1() - c0(); }
  int owner(int64_t x) const {
    return static_cast<int>(std::upper_bound(starts.begin(), starts.end(), x) - starts.begin()) - 1;
  }
};

int64_t ceil_div_pos(int64_t a, int64_t r) { return a <= 0 ? 0 : (a - 1) / r + 1; }  // no overflow at any r

// The chunk boundaries of a layout.
std::vector<int64_t> starts_of(const SequenceLayout& layout) {
  std::vector<int64_t> starts{0};
  for (int64_t n : layout.chunk_sizes) starts.push_back(starts.back() + n);
  return starts;
}

// This rank's checks of a given layout (no communication): one size >= 0 per
// rank, its own q's length. Run on the calls that reuse a plan; the call that
// builds one checks the same across ranks in exchange_starts, so that a rank
// whose layout is wrong does not throw while the others enter a collective.
void check_layout(const Tensor& q, const SequenceLayout& layout, const dist::Communicator& comm) {
  const std::vector<int64_t>& sizes = layout.chunk_sizes;
  MINIDL_CHECK(static_cast<int64_t>(sizes.size()) == comm.size(), kOp, ": layout has ", sizes.size(),
               " chunk sizes ", shape_str(sizes), " for a communicator of ", comm.size(),
               " ranks; expected one per rank");
  for (size_t p = 0; p < sizes.size(); ++p)
    MINIDL_CHECK(sizes[p] >= 0, kOp, ": layout gives rank ", p, " chunk size ", sizes[p], " (chunk sizes ",
                 shape_str(sizes), "); sizes must be >= 0");
  MINIDL_CHECK(sizes[static_cast<size_t>(comm.rank())] == q.size(1), kOp, ": layout gives rank ", comm.rank(),
               " chunk size ", sizes[static_cast<size_t>(comm.rank())], " (chunk sizes ", shape_str(sizes),
               ") but its q ", detail::describe(q), " has ", q.size(1), " rows");
}

// The chunk boundaries of every rank, from one all-gather of the ranks' q
// shapes (which must agree but for the chunk length) and, when given, of the
// layouts the ranks were given, which must all be the one the shapes make.
// Every rank checks every rank's part, so all ranks throw or none.
std::vector<int64_t> exchange_starts(const Tensor& q, dist::Communicator& comm, const SequenceLayout* layout) {
  const int P = comm.size();
  const int64_t B = q.size(0), H = q.size(2), D = q.size(3), W = 4 + (layout ? 1 + P : 0);
  std::vector<double> message{static_cast<double>(q.size(1)), static_cast<double>(B), static_cast<double>(H),
                              static_cast<double>(D)};
  if (layout) {  // how many sizes it gives, then P of them (padded): every rank sends W numbers
    const std::vector<int64_t>& sizes = layout->chunk_sizes;
    message.push_back(static_cast<double>(sizes.size()));
    for (int i = 0; i < P; ++i)
      message.push_back(i < static_cast<int>(sizes.size()) ? static_cast<double>(sizes[static_cast<size_t>(i)]) : -1.0);
  }
  // On q's device: NCCL moves device memory only. (On CUDA, reading the
  // result back is a host wait.)
  Tensor mine = from_vector<double>(message, {W}).to(q.device());
  Tensor all = Tensor::empty({P, W}, {DType::Float64, q.device()});
  comm.all_gather(mine, all);
  const std::vector<double> dims = all.to_vector<double>();
  auto at = [&](int p, int64_t i) { return dims[static_cast<size_t>(W * p + i)]; };
  std::vector<int64_t> starts{0}, sizes;
  for (int p = 0; p < P; ++p) {
    MINIDL_CHECK(at(p, 1) == B && at(p, 2) == H && at(p, 3) == D, kOp,
                 ": every rank must pass q of one (B, *, H, D); rank ", comm.rank(), " has q ", detail::describe(q),
                 " but rank ", p, " has B ", at(p, 1), ", H ", at(p, 2), ", D ", at(p, 3));
    sizes.push_back(static_cast<int64_t>(at(p, 0)));
    starts.push_back(starts.back() + sizes.back());
  }
  if (layout)
    for (int p = 0; p < P; ++p) {
      MINIDL_CHECK(at(p, 4) == P, kOp, ": rank ", p, "'s layout has ", at(p, 4), " chunk sizes for a communicator of ",
                   P, " ranks; expected one per rank");
      std::vector<int64_t> given;
      for (int i = 0; i < P; ++i) given.push_back(static_cast<int64_t>(at(p, 5 + i)));
      MINIDL_CHECK(given == sizes, kOp, ": every rank must pass the same layout, the chunk sizes of its q: rank ",
                   p, " passed chunk sizes ", shape_str(given), " but the ranks' q have ", shape_str(sizes), " rows");
    }
  return starts;
}

// The sub-communicators split from a communicator for spanning segments, by
// their ranks [first, last] (contiguous), kept with it for every plan whose
// segments have those ranks (with NCCL a split is an ncclCommSplit: costly,
// and each communicator holds device buffers). A rank outside a range holds
// null for it: every rank holds the same ranges, so all decide alike whether
// a split is needed (a split is collective).
using SubComms = std::map<std::pair<int, int>, std::shared_ptr<dist::Communicator>>;

// The geometry of the chunks `starts`, and the sub-communicator of every
// spanning segment this rank takes part in, from `subs` or split from comm
// (collective: every rank builds its plan).
Plan make_plan(const Tensor& q, const DilatedAttentionConfig& config, dist::Communicator& comm,
               std::vector<int64_t> starts, SubComms& subs) {
  Plan plan;
  plan.P = comm.size();
  plan.rank = comm.rank();
  plan.B = q.size(0);
  plan.H = q.size(2);
  plan.D = q.size(3);
  plan.starts = std::move(starts);
  plan.N = plan.starts.back();
  plan.causal = config.causal;
  plan.scale = config.scale != 0 ? config.scale : 1.0 / std::sqrt(static_cast<double>(plan.D));
  if (plan.N == 0) return plan;

  const int64_t c0 = plan.c0(), c1 = plan.c1();
  const bool dropout = config.dropout.enabled();
  if (dropout) plan.shares = sharing_pairs(config, plan.N);  // none per copy
  const bool per_pair = !plan.shares.empty();
  for (size_t branch = 0; branch < config.branches.size(); ++branch) {
    const DilatedBranch& given = config.branches[branch];
    const int64_t w = std::max<int64_t>(1, std::min(given.segment, plan.N)), r = given.dilation;
    // Segments wholly inside [c0, c1): from the first boundary at or after c0
    // to the last boundary at or before c1 (or N).
    const int64_t a = ceil_div_pos(c0, w) * w, b = c1 == plan.N ? plan.N : c1 / w * w;
    if (a < b) {
      auto it = std::find_if(plan.local.begin(), plan.local.end(), [&](const LocalGroup& g) {
        const bool next = g.first_branch + static_cast<int64_t>(g.branches.size()) == static_cast<int64_t>(branch);
        return g.a == a && g.b == b && (!dropout || next);
      });
      if (it == plan.local.end()) it = plan.local.insert(plan.local.end(), {a, b, {}, static_cast<int64_t>(branch)});
      it->branches.push_back({w, r});
    }
    // Spanning segments (those holding a chunk boundary), in order. The i-th
    // and the (i+2)-th never share a rank: a rank in both would hold all of
    // the (i+1)-th between them, which holds a boundary. So two splits, by
    // the parity of i, give every spanning segment its own communicator.
    const int64_t segments = ceil_div_pos(plan.N, w);
    int64_t my_segment[2] = {-1, -1};  // by parity
    size_t my_exchange[2] = {0, 0};
    std::vector<std::pair<int64_t, std::pair<int, int>>> by_parity[2];  // (segment, its ranks)
    int64_t spanning = 0;
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t lo = s * w, hi = std::min(lo + w, plan.N);
      const int first = plan.owner(lo), last = plan.owner(hi - 1);
      if (first == last) continue;  // local to one rank
      const int64_t parity = spanning++ % 2;
      by_parity[parity].push_back({s, {first, last}});
      plan.spans.push_back({first, last});
      if (plan.rank < first || plan.rank > last) continue;
      MINIDL_CHECK(my_segment[parity] < 0, kOp, ": internal: rank ", plan.rank,
                   " in two spanning segments of one parity (w ", w, ")");
      my_segment[parity] = s;
      my_exchange[parity] = plan.exchanges.size();
      Exchange ex;
      ex.first = first;
      const bool has_rows = c0 < c1;
      std::vector<std::pair<int64_t, PieceHead>> found;  // (M, head) of the heads with queries here, in head order
      std::vector<int64_t> packed(static_cast<size_t>(last - first + 1), 0);
      for (int64_t h = 0; h < plan.H; ++h) {
        const KeptRows kr = kept_rows(plan.N, w, r, h, s);
        PieceHead head{h, kr.base, 0, 0, {}};
        for (int p = first; p <= last; ++p) {
          int64_t& at = packed[static_cast<size_t>(p - first)];
          const int64_t t0 = std::min(kr.count, ceil_div_pos(plan.starts[p] - kr.base, r));
          const int64_t t1 = std::min(kr.count, ceil_div_pos(plan.starts[p + 1] - kr.base, r));
          if (t0 >= t1) continue;
          if (p == plan.rank) {
            ex.own_blocks.push_back({h, kr.base + t0 * r, r, t1 - t0, at});
            head.t0 = t0;
            head.t1 = t1;
          }
          if (has_rows)
            for (int64_t j = 0; j < t1 - t0; ++j) head.keys.push_back({p - first, at + j});
          at += t1 - t0;
        }
        if (!has_rows || head.t0 == head.t1) continue;
        // Causal queries see kept rows up to themselves: those of lower ranks
        // and their own; non-causal ones see the whole segment.
        const int64_t M = plan.causal ? head.t1 : kr.count;
        head.keys.resize(static_cast<size_t>(M));
        found.push_back({M, std::move(head)});
      }
      // Pieces (Piece). Without dropout, by batch: the heads of one M. With
      // per-pair dropout, by batch, one class a piece (piece_share). With
      // dropout per copy, by class where the frame is linear (kernel_config): runs of
      // consecutive classes with one M and one head count J (classes with
      // queries here and one M need not be consecutive where they wrap
      // around r); by batch otherwise, one class a piece. A piece's key:
      // (M, the first class of its run, or its class; -1 without dropout).
      struct Class {
        int64_t M, J = 0, first;  // first: its piece's first class
        bool by_class = false;
      };
      std::map<int64_t, Class> classes;  // h mod r of the heads with queries here
      for (const auto& [M, head] : found) {
        const int64_t c = head.h % r;
        ++classes.try_emplace(c, Class{M, 0, c}).first->second.J;
      }
      for (auto it = classes.begin(); it != classes.end();) {
        auto end = std::next(it);
        while (end != classes.end() && end->first == std::prev(end)->first + 1 && end->second.M == it->second.M &&
               end->second.J == it->second.J)
          ++end;
        const int64_t J = it->second.J;
        if (dropout && !per_pair && class_frame_linear(J, r, plan.H, plan.B) && plan.B * J <= kMaxPieceHeads)
          for (auto c = it; c != end; ++c) {
            c->second.first = it->first;
            c->second.by_class = true;
          }
        it = end;
      }
      std::map<std::pair<int64_t, int64_t>, Piece> by_length;  // (M, first class or -1)
      for (auto& [M, head] : found) {
        const Class& c = classes.at(head.h % r);
        Piece& piece = by_length[{M, dropout ? c.first : -1}];
        piece.branch = static_cast<int64_t>(branch);
        piece.r = r;
        piece.M = M;
        piece.ex = plan.exchanges.size();
        piece.by_class = c.by_class;
        piece.heads.push_back(std::move(head));
      }
      ex.R = *std::max_element(packed.begin(), packed.end());
      const int64_t n = plan.n(), B = plan.B, H = plan.H;
      for (const Block& blk : ex.own_blocks)
        for (int64_t b = 0; b < B; ++b)
          for (int64_t j = 0; j < blk.count; ++j)
            ex.pack.add(b * ex.R + blk.offset + j, (b * n + blk.x0 + j * blk.r - c0) * H + blk.h);
      for (auto& [length, piece] : by_length) {
        const int64_t M = piece.M, G = static_cast<int64_t>(piece.heads.size());
        const int64_t J = piece.by_class ? classes.at(piece.heads[0].h % r).J : 0;
        piece.batches = piece.by_class ? G / J : B;
        piece.per_batch = piece.by_class ? B * J : G;
        for (int64_t b = 0; b < B; ++b)
          for (size_t g = 0; g < piece.heads.size(); ++g) {
            const PieceHead& ph = piece.heads[g];
            for (int64_t t = ph.t0; t < ph.t1; ++t)
              piece.queries.add(piece.row(b, t, g), (b * n + ph.base + t * r - c0) * H + ph.h);
            for (int64_t t = 0; t < M; ++t) {
              const auto [rank, j] = ph.keys[static_cast<size_t>(t)];
              piece.keys.add(piece.row(b, t, g), (rank * 2 * B + b) * ex.R + j);
            }
          }
        plan.pieces.push_back(std::move(piece));
      }
      plan.exchanges.push_back(std::move(ex));
    }
    // The row maps' indices must fit int32. Whether they do depends on this
    // rank's rows, so the ranks agree (a sum of flags) before the splits:
    // all throw or none, and none waits in a split for a rank that threw.
    if (spanning > 0) {
      int64_t largest = 0;
      for (const Exchange& ex : plan.exchanges) largest = std::max(largest, ex.pack.largest);
      for (const Piece& piece : plan.pieces)
        largest = std::max({largest, piece.queries.largest, piece.keys.largest});
      Tensor flag = from_vector<double>({largest > INT32_MAX ? 1.0 : 0.0}, {1}).to(q.device());
      comm.all_reduce(flag);
      const double over = flag.to_vector<double>()[0];
      MINIDL_CHECK(over == 0, kOp, ": the row maps of ", over, " rank(s) do not fit int32 (this rank's largest row ",
                   largest, "): too many rows per rank (B ", plan.B, ", rows ", plan.n(), ", H ", plan.H, ")");
    }
    // Collective: every rank splits for each parity that has a segment whose
    // ranks have no sub-communicator yet (the same decision on every rank:
    // the segments' ranks come from the layout and `subs` holds the same
    // ranges everywhere). The ranks of such a segment take its color; every
    // other rank (in none of them, or in one whose communicator is kept)
    // joins none (kNoColor: no communicator is built for it).
    for (int parity = 0; parity < 2; ++parity) {
      const int64_t mine = my_segment[parity];
      bool split = false, join = false;
      for (const auto& [s, ranks] : by_parity[parity])
        if (!subs.count(ranks)) {
          split = true;
          join = join || s == mine;
        }
      if (split) {
        std::shared_ptr<dist::Communicator> sub =
            comm.split(join ? static_cast<int>(mine) : dist::Communicator::kNoColor, plan.rank);
        for (const auto& [s, ranks] : by_parity[parity])
          if (!subs.count(ranks)) subs[ranks] = s == mine ? sub : nullptr;
      }
      for (const auto& [s, ranks] : by_parity[parity])
        if (s == mine) plan.exchanges[my_exchange[parity]].comm = subs.at(ranks);
    }
  }
  for (Exchange& ex : plan.exchanges) ex.pack.upload(q.device());
  for (Piece& piece : plan.pieces) {
    piece.queries.upload(q.device());
    piece.keys.upload(q.device());
  }
  return plan;
}

// Plans by layout, kept with the communicator (Communicator::attachment).
// Building one splits the communicator for the spanning segments whose ranks
// no kept plan's segments have (a collective; SubComms) and uploads the row
// maps; a call with a layout seen before reuses its plan. Every rank has the
// same layout each call (exchanged, or given alike) and finds it in its own
// communicator's list, so all ranks find or all build, in step. The last
// kPlans layouts are kept, and every plan a CUDA graph capture used: the
// graph replays its row maps and sub-communicators. A sub-communicator is
// kept while a kept plan has a segment of its ranks (and lives on with any
// plan holding it, e.g. one a pending backward holds).
constexpr size_t kPlans = 8;

// Whether minidl's stream on `device` is being captured into a CUDA graph.
bool capturing(Device device) {
#if defined(MINIDL_WITH_CUDA)
  return device.is_cuda() && cuda::stream_capturing();
#else
  (void)device;
  return false;
#endif
}

struct PlanKey {
  std::vector<int64_t> starts;
  int64_t B, H, D;
  std::vector<std::pair<int64_t, int64_t>> branches;
  bool causal;
  double scale;
  bool dropout;  // dropout plans lay pieces out by class (or one class a piece), local groups by consecutive branches
  bool per_pair;  // per-pair dropout plans hold the branches' shares and lay pieces out one class each
  Device device;
  bool operator==(const PlanKey&) const = default;
};

// What a communicator keeps (Communicator::attachment): the same on every rank
// but for the parts that name its rank.
struct Kept {
  PlanKey key;
  std::shared_ptr<const Plan> plan;
  bool pinned = false;  // used by a graph capture: never evicted
};
struct Cache {
  std::vector<Kept> plans;  // newest first
  SubComms subs;
};

// layout null: exchanged on this call.
std::shared_ptr<const Plan> cached_plan(const Tensor& q, const DilatedAttentionConfig& config,
                                        dist::Communicator& comm, const SequenceLayout* layout) {
  std::shared_ptr<void>& slot = comm.attachment("ops::seq_parallel_dilated_attention plans");
  if (!slot) slot = std::make_shared<Cache>();
  Cache& cache = *static_cast<Cache*>(slot.get());
  std::vector<Kept>& plans = cache.plans;
  std::vector<int64_t> starts = layout ? starts_of(*layout) : exchange_starts(q, comm, nullptr);
  PlanKey key{starts, q.size(0), q.size(2), q.size(3), {}, config.causal, config.scale, config.dropout.enabled(),
              config.dropout.enabled() && config.dropout.per_pair, q.device()};
  for (const DilatedBranch& b : config.branches) key.branches.push_back({b.segment, b.dilation});
  const bool pin = capturing(q.device());
  for (size_t i = 0; i < plans.size(); ++i)
    if (plans[i].key == key) {
      if (layout) check_layout(q, *layout, comm);
      std::rotate(plans.begin(), plans.begin() + static_cast<std::ptrdiff_t>(i),
                  plans.begin() + static_cast<std::ptrdiff_t>(i) + 1);
      plans.front().pinned = plans.front().pinned || pin;
      return plans.front().plan;
    }
  // A given layout is checked against every rank's once, when its plan is
  // built (which communicates anyway), not on the calls that reuse it.
  if (layout) exchange_starts(q, comm, layout);
  auto plan = std::make_shared<const Plan>(make_plan(q, config, comm, std::move(starts), cache.subs));
  plans.insert(plans.begin(), Kept{std::move(key), plan, pin});
  // Evict the oldest unpinned plan past kPlans unpinned ones, and the
  // sub-communicators of the ranks no kept plan's segments have (the same
  // ones on every rank).
  size_t unpinned = 0;
  for (size_t i = 0; i < plans.size(); ++i)
    if (!plans[i].pinned && ++unpinned > kPlans) {
      plans.erase(plans.begin() + static_cast<std::ptrdiff_t>(i));
      std::set<std::pair<int, int>> used;
      for (const Kept& kept : plans) used.insert(kept.plan->spans.begin(), kept.plan->spans.end());
      std::erase_if(cache.subs, [&](const auto& sub) { return !used.count(sub.first); });
      break;
    }
  return plan;
}

// Which rows one call moves: a map's pairs (reversed: from its dst rows to
// its src rows), or `count` affine pairs, src row i to dst row
// (i / per) * dst_stride + dst_offset + i % per (a local group's run of rows
// per batch inside this rank's rows).
struct Pairs {
  const RowMap* map = nullptr;
  bool reverse = false;
  int64_t count = 0, per = 1, dst_stride = 0, dst_offset = 0;

  static Pairs along(const RowMap& m) { return {&m, false, m.size()}; }
  static Pairs against(const RowMap& m) { return {&m, true, m.size()}; }
  static Pairs affine(int64_t count, int64_t per, int64_t dst_stride, int64_t dst_offset) {
    return {nullptr, false, count, per, dst_stride, dst_offset};
  }
  std::pair<int64_t, int64_t> at(int64_t i) const {  // (dst row, src row)
    if (!map) return {i / per * dst_stride + dst_offset + i % per, i};
    const int64_t d = map->dst[static_cast<size_t>(i)], s = map->src[static_cast<size_t>(i)];
    return reverse ? std::pair{s, d} : std::pair{d, s};
  }
#if defined(MINIDL_WITH_CUDA)
  cuda::RowPairs device() const {
    cuda::RowPairs p;
    p.count = count;
    if (map && count > 0) {
      p.dst = (reverse ? map->src_dev : map->dst_dev).data_ptr<int32_t>();
      p.src = (reverse ? map->dst_dev : map->src_dev).data_ptr<int32_t>();
    }
    p.per = per;
    p.dst_stride = dst_stride;
    p.dst_offset = dst_offset;
    return p;
  }
#endif
};

// The rows of contiguous t from row `first` on (rows of W elements): where the
// v half of a (size, 2, B, R, D) buffer starts for the keys' maps.
Tensor from_row(const Tensor& t, int64_t first, int64_t W) {
  return t.as_strided({t.numel() - first * W}, {1}, t.offset() + first * W, kOp);
}

// The three movements; on the CPU float64 throughout, on CUDA float32 or
// bf16 (cuda/seq_parallel.h). Tensors contiguous.
void copy_rows(const Tensor& dst, const Tensor& src, int64_t W, const Pairs& p) {
  if (dst.is_cuda()) {
#if defined(MINIDL_WITH_CUDA)
    backend::DeviceScope scope(dst.device());
    return cuda::copy_rows(dst, src, W, p.device());
#endif
  }
  double* d = dst.data_ptr<double>();
  const double* s = src.data_ptr<double>();
  for (int64_t i = 0; i < p.count; ++i) {
    const auto [to, from] = p.at(i);
    std::copy(s + from * W, s + (from + 1) * W, d + to * W);
  }
}

void add_rows(const Tensor& dst, const Tensor& src, int64_t W, const Pairs& p) {
  if (dst.is_cuda()) {
#if defined(MINIDL_WITH_CUDA)
    backend::DeviceScope scope(dst.device());
    return cuda::add_rows(dst, src, W, p.device());
#endif
  }
  double* d = dst.data_ptr<double>();
  const double* s = src.data_ptr<double>();
  for (int64_t i = 0; i < p.count; ++i) {
    const auto [to, from] = p.at(i);
    for (int64_t e = 0; e < W; ++e) d[to * W + e] += s[from * W + e];
  }
}

// The union softmax (docs/dilated-attention.md): merges a partial (o, l) of
// one row into the accumulated (O, L); the first partial is copied exactly.
void merge_row(double* O, double& L, const double* o, double l, int64_t D) {
  if (l == kNegInf) return;
  if (L == kNegInf) {
    std::copy(o, o + D, O);
    L = l;
    return;
  }
  const double m = std::max(L, l), merged = m + std::log(std::exp(L - m) + std::exp(l - m));
  const double a = std::exp(L - merged), c = std::exp(l - merged);
  for (int64_t d = 0; d < D; ++d) O[d] = a * O[d] + c * o[d];
  L = merged;
}

void merge_rows(const Tensor& O, const Tensor& L, const Tensor& o, const Tensor& l, int64_t D, const Pairs& p) {
  if (O.is_cuda()) {
#if defined(MINIDL_WITH_CUDA)
    backend::DeviceScope scope(O.device());
    return cuda::merge_rows(O, L, o, l, D, p.device());
#endif
  }
  double *pO = O.data_ptr<double>(), *pL = L.data_ptr<double>();
  const double *po = o.data_ptr<double>(), *pl = l.data_ptr<double>();
  for (int64_t i = 0; i < p.count; ++i) {
    const auto [to, from] = p.at(i);
    merge_row(pO + to * D, pL[to], po + from * D, pl[from], D);
  }
}

// The kernel calls' configs. With attention dropout, each carries the mask
// frame that puts its rows where they are in the whole problem
// (core/dilated.h), so the pieces drop exactly what the single-device op does.
// With per-pair dropout (Plan::shares) each also carries its branches' shares
// of the whole problem's pairs: a call computes only the pairs its branches
// own, so each draws its owner's decisions through its own frame.
DilatedAttentionConfig kernel_config(const Plan& plan, const AttentionDropout& dropout,
                                     std::vector<DilatedBranch> branches, const AttentionMaskFrame& frame,
                                     std::vector<BranchPairs> shares) {
  DilatedAttentionConfig c;
  c.branches = std::move(branches);
  c.causal = plan.causal;
  c.scale = plan.scale;
  c.dropout = dropout;
  c.dropout.frame = frame;
  c.dropout.per_pair = !plan.shares.empty();  // per copy where the branches do not nest, as the op
  c.pairs = std::move(shares);
  return c;
}

// A local group's rows [a, b) are positions a.. of the whole sequence; a is
// a multiple of its branches' segments, so its kept indices are the whole
// problem's, and so are its heads: its shares are its branches'.
DilatedAttentionConfig kernel_config(const Plan& plan, const AttentionDropout& dropout, const LocalGroup& group) {
  AttentionMaskFrame frame;
  frame.branch = group.first_branch;
  frame.n = plan.N;
  frame.position = group.a;
  std::vector<BranchPairs> shares;
  if (!plan.shares.empty()) {
    const auto first = plan.shares.begin() + group.first_branch;
    shares.assign(first, first + static_cast<std::ptrdiff_t>(group.branches.size()));
  }
  return kernel_config(plan, dropout, group.branches, frame, std::move(shares));
}

// A piece's share of its branch's pairs (Plan::shares). Its rows are kept
// indices already; per-pair plans lay it out by batch, one class c, so its
// head g is head c + g r, whose classes are the branch's classes[(c + g r) %
// 8] (periodic in g mod 8: r divides 8 where the branches nest).
BranchPairs piece_share(const Plan& plan, const Piece& piece) {
  const BranchPairs& share = plan.shares[static_cast<size_t>(piece.branch)];
  MINIDL_CHECK(!piece.by_class, kOp, ": internal: a per-pair piece laid out by class");
  BranchPairs p = share;
  const int64_t c = piece.heads[0].h;
  for (int64_t g = 0; g < 8; ++g) p.classes[g] = share.classes[(c + g * piece.r) % 8];
  return p;
}

// A piece's row t (a kept index) is position base + t r of its head. By
// batch (one class c): its head g is head c + g r, all sharing base. By
// class (classes c0, c0 + 1, ... of J heads): its batch i is class c0 + i,
// whose base is c0's plus i, and its head b J + j is batch b's head c + j r,
// mask head b H + c + j r: a step of r when J r = H or B = 1, of H when
// J = 1 (make_plan lays a piece out by class only then). The frame is
// unused without dropout.
DilatedAttentionConfig kernel_config(const Plan& plan, const AttentionDropout& dropout, const Piece& piece) {
  AttentionMaskFrame frame;
  if (dropout.enabled()) {
    const PieceHead& first = piece.heads[0];
    const int64_t c0 = first.h % piece.r, J = static_cast<int64_t>(piece.heads.size()) / piece.batches;
    for (size_t g = 0; g < piece.heads.size(); ++g) {
      const PieceHead& ph = piece.heads[g];
      const int64_t i = piece.by_class ? ph.h % piece.r - c0 : 0;
      const bool framed = piece.by_class ? ph.h == c0 + i + static_cast<int64_t>(g) / piece.batches * piece.r &&
                                               i < piece.batches && class_frame_linear(J, piece.r, plan.H, plan.B)
                                         : ph.h == first.h + static_cast<int64_t>(g) * piece.r;
      MINIDL_CHECK(framed && ph.base == first.base + i, kOp, ": internal: head ", ph.h, " (base ", ph.base,
                   ") of a dropout piece from head ", first.h, " (base ", first.base, ") at r ", piece.r,
                   " is not where its frame puts it");
    }
    frame.branch = piece.branch;
    frame.n = plan.N;
    frame.heads = plan.H;
    frame.head = first.h;
    frame.head_step = piece.by_class && J == 1 ? plan.H : piece.r;
    frame.position = first.base;
    frame.stride = piece.r;
    if (piece.by_class) {
      frame.batches = plan.B;
      frame.batch_step = 1;
      frame.batch_shift = 1;
    }
  }
  std::vector<BranchPairs> shares;
  if (!plan.shares.empty()) shares.push_back(piece_share(plan, piece));
  return kernel_config(plan, dropout, {{piece.M, 1}}, frame, std::move(shares));
}

// The dtypes of one call: the kernels' operands (`compute`: float64 on the
// CPU, the inputs' dtype on CUDA), their lse, and the sums (`acc`).
struct Types {
  DType compute, lse, acc;
  Device device;
  TensorOptions of(DType t) const { return {t, device, false}; }
};

Types types_of(const Tensor& q) {
  if (!q.is_cuda()) return {DType::Float64, DType::Float64, DType::Float64, q.device()};
  return {q.dtype(), DType::Float32, DType::Float32, q.device()};
}

// bits: where the backend hands out attention dropout's mask for the
// backward (CUDA's ws forward keeps it; null when no backward follows), which
// attend_backward passes back (undefined: the backward draws the mask again).
void attend_forward(const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionConfig& config,
                    const Tensor& o, const Tensor& l, Tensor* bits) {
  MINIDL_DISPATCH(q.device(), dilated_attention_forward, q, k, v, config, o, l, bits);
}

void attend_backward(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& O, const Tensor& L,
                     const Tensor& dO, const Tensor& dL, const DilatedAttentionConfig& config, const Tensor& dq,
                     const Tensor& dk, const Tensor& dv, const Tensor& bits) {
  MINIDL_DISPATCH(q.device(), dilated_attention_backward, q, k, v, O, L, dO, dL, config, dq, dk, dv, bits);
}

// A piece's operand of rows of W (W = 0: an lse; Piece::shape): this rank's
// query rows of `local` at their kept index, zeros elsewhere.
Tensor piece_queries(const Piece& piece, const Tensor& local, int64_t W) {
  Tensor out = zeros(piece.shape(W), local.options());
  copy_rows(out, local, std::max<int64_t>(W, 1), Pairs::along(piece.queries));
  return out;
}

// A piece's keys (kv = 0) or values (kv = 1) from its exchange's gathered rows.
Tensor piece_keys(const Plan& plan, const Piece& piece, const Tensor& gathered, int kv) {
  Tensor out = Tensor::empty(piece.shape(plan.D), gathered.options());
  copy_rows(out, from_row(gathered, kv * plan.B * plan.exchanges[piece.ex].R, plan.D), plan.D,
            Pairs::along(piece.keys));
  return out;
}

// The rows [x0, x0 + len) of a local group, as affine pairs into this rank's rows.
Pairs local_rows(const Plan& plan, int64_t x0, int64_t len) {
  return Pairs::affine(plan.B * len * plan.H, len * plan.H, plan.n() * plan.H, x0 * plan.H);
}

Tensor rows_of(const Tensor& t, int64_t x0, int64_t len) { return contiguous(t.narrow(1, x0, len)); }

struct Forward {
  Tensor O, L;                   // (B, n, H, D) and (B, n, H): acc dtype, or compute and lse (whole_chunk)
  std::vector<Tensor> gathered;  // compute dtype, per exchange: (its size, 2, B, R, D)
  // Attention dropout's mask as the kernels kept it, per local group (the
  // whole chunk's: one) and per piece; undefined where none was kept.
  std::vector<Tensor> local_bits, piece_bits;
};

// The local group, if it is the only one and its rows are the whole chunk
// (P = 1, or chunks whose bounds every local branch's segments divide). Its
// kernels' results are then the base both passes build on, in the compute
// dtype: the spanning pieces merge (forward) and add (backward) into their
// own rows of it, which are few (n/r rows of branches with r >= the chunk's
// segments), instead of the whole chunk going through acc-dtype buffers,
// merges and casts (12.1 ms of 61.9 at 1M tokens, H 8, P = 1, before; 48.9
// after, the kernels' own time: scaling.md). The same bits where a row takes one piece (a merge copies its
// first partial exactly, a gradient added once to zeros is itself); a bf16
// row that several pieces reach rounds after each.
const LocalGroup* whole_chunk(const Plan& plan) {
  return plan.local.size() == 1 && plan.local[0].a == plan.c0() && plan.local[0].b == plan.c1() ? &plan.local[0]
                                                                                                : nullptr;
}

// q, k, v: contiguous, in the compute dtype.
// keep_bits: a backward follows (attend_forward's bits).
Forward forward(const Plan& plan, const Types& ty, const AttentionDropout& dropout, const Tensor& q, const Tensor& k,
                const Tensor& v, bool keep_bits) {
  Forward f;
  auto bits = [&](std::vector<Tensor>& kept) { return keep_bits ? &kept.emplace_back() : nullptr; };
  // Start shipping this rank's kept rows of spanning segments first, async:
  // the local branches below need nothing from other ranks, so on NCCL the
  // gathers run beside them (docs/scaling.md); each is waited for just before
  // the first piece that reads it.
  std::vector<Tensor> sends;  // alive until the gathers are waited for
  std::vector<dist::Work> gathers;
  for (const Exchange& ex : plan.exchanges) {
    Tensor& send = sends.emplace_back(zeros({2, plan.B, ex.R, plan.D}, ty.of(ty.compute)));
    copy_rows(send, k, plan.D, Pairs::along(ex.pack));
    copy_rows(from_row(send, plan.B * ex.R, plan.D), v, plan.D, Pairs::along(ex.pack));
    f.gathered.push_back(Tensor::empty({ex.comm->size(), 2, plan.B, ex.R, plan.D}, ty.of(ty.compute)));
    gathers.push_back(ex.comm->all_gather_async(send, f.gathered.back()));
  }
  if (const LocalGroup* whole = whole_chunk(plan)) {
    f.O = Tensor::empty(q.shape(), ty.of(ty.compute));
    f.L = Tensor::empty({plan.B, plan.n(), plan.H}, ty.of(ty.lse));
    attend_forward(q, k, v, kernel_config(plan, dropout, *whole), f.O, f.L, bits(f.local_bits));
  } else {
    f.O = zeros({plan.B, plan.n(), plan.H, plan.D}, ty.of(ty.acc));
    f.L = full({plan.B, plan.n(), plan.H}, kNegInf, ty.of(ty.acc));
    for (const LocalGroup& group : plan.local) {
      const int64_t x0 = group.a - plan.c0(), len = group.b - group.a;
      Tensor o = Tensor::empty({plan.B, len, plan.H, plan.D}, ty.of(ty.compute));
      Tensor l = Tensor::empty({plan.B, len, plan.H}, ty.of(ty.lse));
      attend_forward(q.narrow(1, x0, len), k.narrow(1, x0, len), v.narrow(1, x0, len),
                     kernel_config(plan, dropout, group), o, l, bits(f.local_bits));
      merge_rows(f.O, f.L, o, l, plan.D, local_rows(plan, x0, len));
    }
  }
  for (const Piece& piece : plan.pieces) {
    Tensor o = Tensor::empty(piece.shape(plan.D), ty.of(ty.compute));
    Tensor l = Tensor::empty(piece.shape(0), ty.of(ty.lse));
    gathers[piece.ex].wait();
    const Tensor& gathered = f.gathered[piece.ex];
    attend_forward(piece_queries(piece, q, plan.D), piece_keys(plan, piece, gathered, 0),
                   piece_keys(plan, piece, gathered, 1), kernel_config(plan, dropout, piece), o, l,
                   bits(f.piece_bits));
    merge_rows(f.O, f.L, o, l, plan.D, Pairs::against(piece.queries));
  }
  for (dist::Work& w : gathers) w.wait();  // those no piece of this rank read: the backward reads them all
  return f;
}

// dq, dk, dv of this rank's rows: acc dtype, or compute (whole_chunk). q, k,
// v, O, dO contiguous in the compute dtype; L and dL (may be undefined) in
// the lse dtype; f: the forward's gathered rows and dropout bits, one per
// kernel call (forward with keep_bits; its O and L are not read).
std::vector<Tensor> backward(const Plan& plan, const Types& ty, const AttentionDropout& dropout, const Forward& f,
                             const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& O, const Tensor& L,
                             const Tensor& dO, const Tensor& dL) {
  const std::vector<Tensor>& gathered = f.gathered;
  const LocalGroup* whole = whole_chunk(plan);
  // The whole-chunk kernels write every row; the local groups' sums need zeros.
  auto grad_buffer = [&] {
    return whole ? Tensor::empty(q.shape(), ty.of(ty.compute)) : zeros(q.shape(), ty.of(ty.acc));
  };
  Tensor dq = grad_buffer(), dk = grad_buffer(), dv = grad_buffer();
  // The spanning pieces first, so that the reduce-scatters returning their
  // key and value gradients run (async; on NCCL beside them) while the local
  // branches do. The sums keep the order they had with the pieces last, so
  // the results are bitwise those of that order: into dq the local
  // branches' gradients, then the pieces' (held until then); into dk and dv
  // the local branches', then the reduce-scatters'.
  //
  // Gradients of every gathered row, laid out as the gathered buffers: summed
  // over an exchange's ranks, each rank receives those of the rows it owns.
  std::vector<Tensor> send;
  for (const Tensor& g : gathered) send.push_back(zeros(g.shape(), ty.of(ty.acc)));
  std::vector<Tensor> piece_dq;
  for (size_t i = 0; i < plan.pieces.size(); ++i) {
    const Piece& piece = plan.pieces[i];
    const Shape shape = piece.shape(plan.D);
    Tensor gq = Tensor::empty(shape, ty.of(ty.compute)), gk = Tensor::empty(shape, ty.of(ty.compute)),
           gv = Tensor::empty(shape, ty.of(ty.compute));
    const Tensor& g = gathered[piece.ex];
    attend_backward(piece_queries(piece, q, plan.D), piece_keys(plan, piece, g, 0),
                    piece_keys(plan, piece, g, 1), piece_queries(piece, O, plan.D),
                    piece_queries(piece, L, 0), piece_queries(piece, dO, plan.D),
                    dL.defined() ? piece_queries(piece, dL, 0) : Tensor(), kernel_config(plan, dropout, piece),
                    gq, gk, gv, f.piece_bits[i]);
    piece_dq.push_back(gq);
    const Tensor& s = send[piece.ex];
    add_rows(s, gk, plan.D, Pairs::against(piece.keys));
    add_rows(from_row(s, plan.B * plan.exchanges[piece.ex].R, plan.D), gv, plan.D, Pairs::against(piece.keys));
  }
  std::vector<Tensor> mine;  // this rank's rows' gradients, per exchange
  std::vector<dist::Work> scatters;
  for (size_t e = 0; e < plan.exchanges.size(); ++e) {
    const Exchange& ex = plan.exchanges[e];
    mine.push_back(Tensor::empty({2, plan.B, ex.R, plan.D}, ty.of(ty.acc)));
    scatters.push_back(ex.comm->reduce_scatter_async(send[e], mine.back()));
  }
  if (whole) {
    attend_backward(q, k, v, O, L, dO, dL, kernel_config(plan, dropout, *whole), dq, dk, dv, f.local_bits[0]);
  } else {
    for (size_t i = 0; i < plan.local.size(); ++i) {
      const LocalGroup& group = plan.local[i];
      const int64_t x0 = group.a - plan.c0(), len = group.b - group.a;
      const Shape shape{plan.B, len, plan.H, plan.D};
      Tensor gq = Tensor::empty(shape, ty.of(ty.compute)), gk = Tensor::empty(shape, ty.of(ty.compute)),
             gv = Tensor::empty(shape, ty.of(ty.compute));
      attend_backward(q.narrow(1, x0, len), k.narrow(1, x0, len), v.narrow(1, x0, len), rows_of(O, x0, len),
                      rows_of(L, x0, len), rows_of(dO, x0, len), dL.defined() ? rows_of(dL, x0, len) : Tensor(),
                      kernel_config(plan, dropout, group), gq, gk, gv, f.local_bits[i]);
      const Pairs rows = local_rows(plan, x0, len);
      add_rows(dq, gq, plan.D, rows);
      add_rows(dk, gk, plan.D, rows);
      add_rows(dv, gv, plan.D, rows);
    }
  }
  for (size_t i = 0; i < plan.pieces.size(); ++i)
    add_rows(dq, piece_dq[i], plan.D, Pairs::against(plan.pieces[i].queries));
  for (size_t e = 0; e < plan.exchanges.size(); ++e) {
    const Exchange& ex = plan.exchanges[e];
    scatters[e].wait();
    add_rows(dk, mine[e], plan.D, Pairs::against(ex.pack));
    add_rows(dv, from_row(mine[e], plan.B * ex.R, plan.D), plan.D, Pairs::against(ex.pack));
  }
  return {dq, dk, dv};
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const DilatedAttentionConfig& config) {
  detail::check_defined(kOp, q, "q");
  detail::check_defined(kOp, k, "k");
  detail::check_defined(kOp, v, "v");
  MINIDL_CHECK(q.dim() == 4, kOp, ": q must be 4-D (B, N/P, H, D), got ", detail::describe(q));
  MINIDL_CHECK(k.shape() == q.shape() && v.shape() == q.shape(), kOp,
               ": k and v must have q's shape ", shape_str(q.shape()), ", got k ",
               detail::describe(k), ", v ", detail::describe(v));
  MINIDL_CHECK(q.size(3) >= 1, kOp, ": head dim D must be >= 1, got ", detail::describe(q));
  detail::check_same_dtype(kOp, q, k);
  detail::check_same_dtype(kOp, q, v);
  detail::check_same_device(kOp, q, k);
  detail::check_same_device(kOp, q, v);
  const DType dt = q.dtype();
  if (q.is_cuda())
    MINIDL_CHECK(dt == DType::Float32 || dt == DType::BFloat16, kOp, ": unsupported dtype ", dt, " (q is ",
                 detail::describe(q), "); expected float32 or bfloat16 on CUDA");
  else
    MINIDL_CHECK(dt == DType::Float32 || dt == DType::BFloat16 || dt == DType::Float64, kOp,
                 ": unsupported dtype ", dt, " (q is ", detail::describe(q),
                 "); expected float32, bfloat16 or float64");
  MINIDL_CHECK(!config.branches.empty(), kOp,
               ": config has no branches; give at least one (segment length w, dilation r)");
  for (size_t i = 0; i < config.branches.size(); ++i)
    MINIDL_CHECK(config.branches[i].segment >= 1 && config.branches[i].dilation >= 1, kOp,
                 ": branch ", i, " has segment ", config.branches[i].segment, " and dilation ",
                 config.branches[i].dilation, "; both must be >= 1");
  MINIDL_CHECK(std::isfinite(config.scale), kOp, ": scale must be finite, got ", config.scale);
  MINIDL_CHECK(config.dropout.frame == AttentionMaskFrame{}, kOp,
               ": config.dropout.frame must be the default (the op frames its pieces itself)");
  MINIDL_CHECK(config.pairs.empty(), kOp, ": config.pairs must be empty (the op gives its pieces their shares)");
  MINIDL_CHECK(config.dropout.threshold <= 255, kOp, ": config.dropout.threshold ", config.dropout.threshold,
               " is past 255 (make_attention_dropout gives T8 in [1, 255])");
  MINIDL_CHECK(!config.dropout.offset_base || q.is_cuda(), kOp, ": config.dropout reads its offset from a device "
               "word (CUDA graph capture) but q is ", detail::describe(q), "; device offsets are for CUDA only");
}

// Both forms of the op; layout null: exchanged.
std::pair<Tensor, Tensor> seq_parallel(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in,
                                       const DilatedAttentionConfig& config, dist::Communicator& comm,
                                       const SequenceLayout* layout) {
  check_inputs(q_in, k_in, v_in, config);
  const DType dtype = q_in.dtype();
  const Types ty = types_of(q_in);
  std::shared_ptr<const Plan> plan = cached_plan(q_in, config, comm, layout);
  // The whole sequence's mask rows (every rank has the same N: all throw or none).
  if (config.dropout.enabled())
    detail::check_attention_mask_rows(kOp, config.branches.size(), plan->B, plan->H, plan->N);
  const AttentionDropout dropout = config.dropout;
  // Inputs in the compute dtype, contiguous (no copy when they already are).
  auto prepare = [&](const Tensor& t) { return contiguous(to(t.detach(), ty.compute)); };
  const bool grad = autograd::needs_grad({q_in, k_in, v_in});
  Tensor q, k, v, O, L;
  Forward f;
  {
    NoGradGuard no_grad;
    q = prepare(q_in);
    k = prepare(k_in);
    v = prepare(v_in);
    f = forward(*plan, ty, dropout, q, k, v, grad);
    O = to(f.O, ty.compute);  // what the backward's D = dO . O reads, as the single-device op
    L = f.L;
    f.O = f.L = Tensor();  // the backward keeps the gathered rows and dropout bits only
  }
  const DType lse_dtype = dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  Tensor out = to(O, dtype), lse = to(L, lse_dtype);
  if (grad) {
    autograd::record(
        kOp, {q_in, k_in, v_in}, {out, lse},
        [plan, ty, dtype, dropout, sq = SavedTensor(q, kOp), sk = SavedTensor(k, kOp), sv = SavedTensor(v, kOp),
         so = SavedTensor(O, kOp), sl = SavedTensor(L, kOp), kept = std::move(f)](const Grads& g) {
          NoGradGuard no_grad;
          Tensor q = sq.get();
          Tensor dO = g[0].defined() ? contiguous(to(g[0], ty.compute)) : zeros(q.shape(), ty.of(ty.compute));
          Tensor dL = g[1].defined() ? contiguous(to(g[1], ty.lse)) : Tensor();
          std::vector<Tensor> grads =
              backward(*plan, ty, dropout, kept, q, sk.get(), sv.get(), so.get(), sl.get(), dO, dL);
          for (Tensor& t : grads) t = to(t, dtype);
          return grads;
        },
        autograd::MissingGrad::Undefined);
  }
  return {out, lse};
}

}  // namespace

SequenceLayout SequenceLayout::even(int64_t n, int ranks) {
  MINIDL_CHECK(n >= 0 && ranks >= 1, "SequenceLayout::even: ", n, " tokens over ", ranks,
               " ranks; expected n >= 0 and ranks >= 1");
  // floor(p·n/ranks) without forming p·n: p·(n / ranks) + floor(p·(n % ranks) / ranks).
  const int64_t q = n / ranks, r = n % ranks;
  auto floor_at = [&](int64_t p) { return p * q + p * r / ranks; };
  SequenceLayout layout;
  for (int p = 0; p < ranks; ++p) layout.chunk_sizes.push_back(floor_at(p + 1) - floor_at(p));
  return layout;
}

int64_t SequenceLayout::start(int p) const {
  MINIDL_CHECK(p >= 0 && static_cast<size_t>(p) <= chunk_sizes.size(), "SequenceLayout::start: rank ", p,
               " of a layout of ", chunk_sizes.size(), " ranks");
  int64_t sum = 0;
  for (int i = 0; i < p; ++i) sum += chunk_sizes[static_cast<size_t>(i)];
  return sum;
}

std::pair<Tensor, Tensor> seq_parallel_dilated_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const DilatedAttentionConfig& config,
                                                         dist::Communicator& comm) {
  return seq_parallel(q, k, v, config, comm, nullptr);
}

std::pair<Tensor, Tensor> seq_parallel_dilated_attention(const Tensor& q, const Tensor& k, const Tensor& v,
                                                         const DilatedAttentionConfig& config,
                                                         dist::Communicator& comm, const SequenceLayout& layout) {
  return seq_parallel(q, k, v, config, comm, &layout);
}

}  // namespace minidl::ops
