// Sequence-parallel dilated attention (LongNet): forward and backward side by
// side. The algorithm and what it communicates: docs/dilated-attention.md,
// "Sequence parallel". Every piece of attention runs on the CPU kernels
// (cpu/dilated_attention.h), in float64, on row sets assembled here; pieces
// merge by the log-sum-exp rule into one softmax per row, and the backward
// runs each piece with the global (O, L, dO, dL), as the single-device op does.
#include "ops/seq_parallel.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <vector>

#include "autograd/grad_mode.h"
#include "autograd/tape.h"
#include "cpu/dilated_attention.h"
#include "ops/dispatch.h"
#include "ops/ops.h"

namespace minidl::ops {
namespace {

using autograd::SavedTensor;
using Grads = std::vector<Tensor>;

constexpr const char* kOp = "seq_parallel_dilated_attention";
constexpr double kNegInf = -std::numeric_limits<double>::infinity();
const TensorOptions kF64{DType::Float64, Device::cpu(), false};

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
// M: one dense attention problem (B, M, heads, D) for the CPU kernel, whose
// keys come from exchange `ex`.
struct Piece {
  int64_t r, M;
  size_t ex;
  std::vector<PieceHead> heads;
};

// One spanning segment this rank takes part in: its ranks [first, first +
// comm->size()) (a sub-communicator of exactly them) all-gather their kept
// rows of it, R packed rows each (the maximum over those ranks), and
// reduce-scatter the rows' gradients back.
struct Exchange {
  std::shared_ptr<dist::Communicator> comm;
  int first = 0;
  int64_t R = 0;
  std::vector<Block> own_blocks;  // this rank's packed rows, in packing order
};

// Branches whose segments lie wholly inside this chunk over the same global
// positions [a, b): one kernel call on the local rows.
struct LocalGroup {
  int64_t a, b;
  std::vector<DilatedBranch> branches;
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
  int64_t c0() const { return starts[rank]; }
  int64_t c1() const { return starts[rank + 1]; }
  int64_t n() const { return c1() - c0(); }
  int owner(int64_t x) const {
    return static_cast<int>(std::upper_bound(starts.begin(), starts.end(), x) - starts.begin()) - 1;
  }
};

int64_t ceil_div_pos(int64_t a, int64_t r) { return a <= 0 ? 0 : (a + r - 1) / r; }

// Chunk sizes and shapes of every rank (one all-gather), then the geometry,
// and one sub-communicator per spanning segment this rank takes part in.
Plan make_plan(const Tensor& q, const DilatedAttentionConfig& config, dist::Communicator& comm) {
  Plan plan;
  plan.P = comm.size();
  plan.rank = comm.rank();
  plan.B = q.size(0);
  plan.H = q.size(2);
  plan.D = q.size(3);
  Tensor mine = from_vector<double>({static_cast<double>(q.size(1)), static_cast<double>(plan.B),
                                     static_cast<double>(plan.H), static_cast<double>(plan.D)},
                                    {4});
  Tensor all = Tensor::empty({plan.P, 4}, kF64);
  comm.all_gather(mine, all);
  const std::vector<double> dims = all.to_vector<double>();
  plan.starts.assign(1, 0);
  for (int p = 0; p < plan.P; ++p) {
    MINIDL_CHECK(dims[4 * p + 1] == plan.B && dims[4 * p + 2] == plan.H && dims[4 * p + 3] == plan.D,
                 kOp, ": every rank must pass q of one (B, *, H, D); rank ", plan.rank, " has q ",
                 detail::describe(q), " but rank ", p, " has B ", dims[4 * p + 1], ", H ",
                 dims[4 * p + 2], ", D ", dims[4 * p + 3]);
    plan.starts.push_back(plan.starts.back() + static_cast<int64_t>(dims[4 * p]));
  }
  plan.N = plan.starts.back();
  plan.causal = config.causal;
  plan.scale = config.scale != 0 ? config.scale : 1.0 / std::sqrt(static_cast<double>(plan.D));
  if (plan.N == 0) return plan;

  const int64_t c0 = plan.c0(), c1 = plan.c1();
  for (const DilatedBranch& given : config.branches) {
    const int64_t w = std::max<int64_t>(1, std::min(given.segment, plan.N)), r = given.dilation;
    // Segments wholly inside [c0, c1): from the first boundary at or after c0
    // to the last boundary at or before c1 (or N).
    const int64_t a = ceil_div_pos(c0, w) * w, b = c1 == plan.N ? plan.N : c1 / w * w;
    if (a < b) {
      auto it = std::find_if(plan.local.begin(), plan.local.end(),
                             [&](const LocalGroup& g) { return g.a == a && g.b == b; });
      if (it == plan.local.end()) it = plan.local.insert(plan.local.end(), {a, b, {}});
      it->branches.push_back({w, r});
    }
    // Spanning segments (those holding a chunk boundary), in order. The i-th
    // and the (i+2)-th never share a rank: a rank in both would hold all of
    // the (i+1)-th between them, which holds a boundary. So two splits, by
    // the parity of i, give every spanning segment its own communicator.
    const int64_t segments = ceil_div_pos(plan.N, w);
    int64_t my_segment[2] = {-1, -1};  // by parity
    size_t my_exchange[2] = {0, 0};
    int64_t spanning = 0;
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t lo = s * w, hi = std::min(lo + w, plan.N);
      const int first = plan.owner(lo), last = plan.owner(hi - 1);
      if (first == last) continue;  // local to one rank
      const int64_t parity = spanning++ % 2;
      if (plan.rank < first || plan.rank > last) continue;
      MINIDL_CHECK(my_segment[parity] < 0, kOp, ": internal: rank ", plan.rank,
                   " in two spanning segments of one parity (w ", w, ")");
      my_segment[parity] = s;
      my_exchange[parity] = plan.exchanges.size();
      Exchange ex;
      ex.first = first;
      const bool has_rows = c0 < c1;
      std::map<int64_t, Piece> by_length;
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
        Piece& piece = by_length[M];
        piece.r = r;
        piece.M = M;
        piece.ex = plan.exchanges.size();
        piece.heads.push_back(std::move(head));
      }
      ex.R = *std::max_element(packed.begin(), packed.end());
      for (auto& [M, piece] : by_length) plan.pieces.push_back(std::move(piece));
      plan.exchanges.push_back(std::move(ex));
    }
    // Collective: every rank splits for each parity that has a segment; a
    // rank in none of that parity's segments gets a color of its own.
    for (int64_t parity = 0; parity < std::min<int64_t>(2, spanning); ++parity) {
      const int64_t s = my_segment[parity];
      std::unique_ptr<dist::Communicator> sub =
          comm.split(static_cast<int>(s >= 0 ? s : segments + plan.rank), plan.rank);
      if (s >= 0) plan.exchanges[my_exchange[parity]].comm = std::move(sub);
    }
  }
  return plan;
}

// Row (b, x, h) of a contiguous float64 (B, n, H, W) tensor (W = 1 for lse).
struct Rows {
  double* p;
  int64_t n, H, W;
  Rows(const Tensor& t, int64_t W) : p(t.data_ptr<double>()), n(t.size(1)), H(t.size(2)), W(W) {}
  double* row(int64_t b, int64_t x, int64_t h) const { return p + ((b * n + x) * H + h) * W; }
};

// Packed row j of exchange rank g's k (kv = 0) or v (kv = 1) in a
// (size, 2, B, R, D) buffer of exchange `ex`.
double* packed_row(const Tensor& buf, const Plan& plan, const Exchange& ex, int64_t g, int kv, int64_t b, int64_t j) {
  return buf.data_ptr<double>() + (((g * 2 + kv) * plan.B + b) * ex.R + j) * plan.D;
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

DilatedAttentionConfig kernel_config(const Plan& plan, std::vector<DilatedBranch> branches) {
  DilatedAttentionConfig c;
  c.branches = std::move(branches);
  c.causal = plan.causal;
  c.scale = plan.scale;
  return c;
}

// A piece's (B, M, heads, W) operand: this rank's query rows of `local`
// ((B, n, H, W), or (B, n, H) for W = 1 with lse_shape) at their kept index,
// zeros elsewhere (rows of other ranks' queries, whose results are dropped
// and whose zero dO and dL make their backward contributions exactly zero).
Tensor to_piece(const Plan& plan, const Piece& piece, const Tensor& local, int64_t W, bool lse_shape) {
  const int64_t G = static_cast<int64_t>(piece.heads.size());
  Tensor out = zeros(lse_shape ? Shape{plan.B, piece.M, G} : Shape{plan.B, piece.M, G, W}, kF64);
  Rows src(local, W), dst(out, W);
  for (int64_t b = 0; b < plan.B; ++b)
    for (int64_t g = 0; g < G; ++g) {
      const PieceHead& ph = piece.heads[g];
      for (int64_t t = ph.t0; t < ph.t1; ++t) {
        const double* from = src.row(b, ph.base + t * piece.r - plan.c0(), ph.h);
        std::copy(from, from + W, dst.row(b, t, g));
      }
    }
  return out;
}

// A piece's keys (kv = 0) or values (kv = 1) from the gathered kept rows.
Tensor piece_keys(const Plan& plan, const Piece& piece, const std::vector<Tensor>& gathered, int kv) {
  const int64_t G = static_cast<int64_t>(piece.heads.size());
  Tensor out = Tensor::empty({plan.B, piece.M, G, plan.D}, kF64);
  Rows dst(out, plan.D);
  for (int64_t b = 0; b < plan.B; ++b)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t t = 0; t < piece.M; ++t) {
        const auto [rank, j] = piece.heads[g].keys[t];
        const double* from = packed_row(gathered[piece.ex], plan, plan.exchanges[piece.ex], rank, kv, b, j);
        std::copy(from, from + plan.D, dst.row(b, t, g));
      }
  return out;
}

// dst[:, x0 : x0 + len] += src, both float64 (B, *, H, D), dst contiguous.
void add_rows(const Tensor& dst, int64_t x0, const Tensor& src) {
  Rows d(dst, dst.size(3)), s(src, src.size(3));
  for (int64_t b = 0; b < src.size(0); ++b)
    for (int64_t x = 0; x < src.size(1); ++x)
      for (int64_t h = 0; h < src.size(2); ++h) {
        double* to = d.row(b, x0 + x, h);
        const double* from = s.row(b, x, h);
        for (int64_t i = 0; i < d.W; ++i) to[i] += from[i];
      }
}

Tensor f64(const Tensor& t) { return contiguous(to(t, DType::Float64)); }
Tensor rows_of(const Tensor& t, int64_t x0, int64_t len) { return contiguous(t.narrow(1, x0, len)); }

struct Forward {
  Tensor out, lse;
  std::vector<Tensor> gathered;  // float64, per exchange: (its size, 2, B, R, D)
};

Forward forward(const Plan& plan, const Tensor& q, const Tensor& k, const Tensor& v) {
  Forward f;
  // Ship this rank's kept rows of spanning segments first: the local branches
  // below need nothing from other ranks (a backend that returns before the
  // data lands can overlap them; see the docs for what overlaps today).
  for (const Exchange& ex : plan.exchanges) {
    Tensor send = zeros({2, plan.B, ex.R, plan.D}, kF64);
    Rows kr(k, plan.D), vr(v, plan.D);
    for (const Block& blk : ex.own_blocks)
      for (int64_t b = 0; b < plan.B; ++b)
        for (int64_t j = 0; j < blk.count; ++j) {
          const int64_t x = blk.x0 + j * blk.r - plan.c0();
          std::copy(kr.row(b, x, blk.h), kr.row(b, x, blk.h) + plan.D, packed_row(send, plan, ex, 0, 0, b, blk.offset + j));
          std::copy(vr.row(b, x, blk.h), vr.row(b, x, blk.h) + plan.D, packed_row(send, plan, ex, 0, 1, b, blk.offset + j));
        }
    f.gathered.push_back(Tensor::empty({ex.comm->size(), 2, plan.B, ex.R, plan.D}, kF64));
    ex.comm->all_gather(send, f.gathered.back());
  }
  f.out = zeros({plan.B, plan.n(), plan.H, plan.D}, kF64);
  f.lse = full({plan.B, plan.n(), plan.H}, kNegInf, kF64);
  Rows O(f.out, plan.D), L(f.lse, 1);
  for (const LocalGroup& group : plan.local) {
    const int64_t x0 = group.a - plan.c0(), len = group.b - group.a;
    Tensor o = Tensor::empty({plan.B, len, plan.H, plan.D}, kF64);
    Tensor l = Tensor::empty({plan.B, len, plan.H}, kF64);
    cpu::dilated_attention_forward(q.narrow(1, x0, len), k.narrow(1, x0, len), v.narrow(1, x0, len),
                                   kernel_config(plan, group.branches), o, l);
    Rows ro(o, plan.D), rl(l, 1);
    for (int64_t b = 0; b < plan.B; ++b)
      for (int64_t x = 0; x < len; ++x)
        for (int64_t h = 0; h < plan.H; ++h)
          merge_row(O.row(b, x0 + x, h), *L.row(b, x0 + x, h), ro.row(b, x, h), *rl.row(b, x, h), plan.D);
  }
  for (const Piece& piece : plan.pieces) {
    const int64_t G = static_cast<int64_t>(piece.heads.size());
    Tensor o = Tensor::empty({plan.B, piece.M, G, plan.D}, kF64);
    Tensor l = Tensor::empty({plan.B, piece.M, G}, kF64);
    cpu::dilated_attention_forward(to_piece(plan, piece, q, plan.D, false),
                                   piece_keys(plan, piece, f.gathered, 0),
                                   piece_keys(plan, piece, f.gathered, 1),
                                   kernel_config(plan, {{piece.M, 1}}), o, l);
    Rows ro(o, plan.D), rl(l, 1);
    for (int64_t b = 0; b < plan.B; ++b)
      for (int64_t g = 0; g < G; ++g) {
        const PieceHead& ph = piece.heads[g];
        for (int64_t t = ph.t0; t < ph.t1; ++t) {
          const int64_t x = ph.base + t * piece.r - plan.c0();
          merge_row(O.row(b, x, ph.h), *L.row(b, x, ph.h), ro.row(b, t, g), *rl.row(b, t, g), plan.D);
        }
      }
  }
  return f;
}

// dq, dk, dv (float64) of this rank's rows; dO float64, dL float64 or undefined.
std::vector<Tensor> backward(const Plan& plan, const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& O, const Tensor& L, const std::vector<Tensor>& gathered,
                             const Tensor& dO, const Tensor& dL) {
  Tensor dq = zeros(q.shape(), kF64), dk = zeros(q.shape(), kF64), dv = zeros(q.shape(), kF64);
  for (const LocalGroup& group : plan.local) {
    const int64_t x0 = group.a - plan.c0(), len = group.b - group.a;
    const Shape shape{plan.B, len, plan.H, plan.D};
    Tensor gq = Tensor::empty(shape, kF64), gk = Tensor::empty(shape, kF64), gv = Tensor::empty(shape, kF64);
    cpu::dilated_attention_backward(q.narrow(1, x0, len), k.narrow(1, x0, len), v.narrow(1, x0, len),
                                    rows_of(O, x0, len), rows_of(L, x0, len), rows_of(dO, x0, len),
                                    dL.defined() ? rows_of(dL, x0, len) : Tensor(),
                                    kernel_config(plan, group.branches), gq, gk, gv);
    add_rows(dq, x0, gq);
    add_rows(dk, x0, gk);
    add_rows(dv, x0, gv);
  }
  // Gradients of every gathered row, laid out as the gathered buffers: summed
  // over an exchange's ranks, each rank receives those of the rows it owns.
  std::vector<Tensor> send;
  for (const Tensor& g : gathered) send.push_back(zeros(g.shape(), kF64));
  Rows dQ(dq, plan.D);
  for (const Piece& piece : plan.pieces) {
    const int64_t G = static_cast<int64_t>(piece.heads.size());
    const Shape shape{plan.B, piece.M, G, plan.D};
    Tensor gq = Tensor::empty(shape, kF64), gk = Tensor::empty(shape, kF64), gv = Tensor::empty(shape, kF64);
    cpu::dilated_attention_backward(
        to_piece(plan, piece, q, plan.D, false), piece_keys(plan, piece, gathered, 0),
        piece_keys(plan, piece, gathered, 1), to_piece(plan, piece, O, plan.D, false),
        to_piece(plan, piece, L, 1, true), to_piece(plan, piece, dO, plan.D, false),
        dL.defined() ? to_piece(plan, piece, dL, 1, true) : Tensor(),
        kernel_config(plan, {{piece.M, 1}}), gq, gk, gv);
    Rows rq(gq, plan.D), rk(gk, plan.D), rv(gv, plan.D);
    for (int64_t b = 0; b < plan.B; ++b)
      for (int64_t g = 0; g < G; ++g) {
        const PieceHead& ph = piece.heads[g];
        for (int64_t t = ph.t0; t < ph.t1; ++t) {
          double* to = dQ.row(b, ph.base + t * piece.r - plan.c0(), ph.h);
          for (int64_t d = 0; d < plan.D; ++d) to[d] += rq.row(b, t, g)[d];
        }
        for (int64_t t = 0; t < piece.M; ++t) {
          const auto [rank, j] = ph.keys[t];
          const Exchange& ex = plan.exchanges[piece.ex];
          double* tk = packed_row(send[piece.ex], plan, ex, rank, 0, b, j);
          double* tv = packed_row(send[piece.ex], plan, ex, rank, 1, b, j);
          for (int64_t d = 0; d < plan.D; ++d) {
            tk[d] += rk.row(b, t, g)[d];
            tv[d] += rv.row(b, t, g)[d];
          }
        }
      }
  }
  Rows dK(dk, plan.D), dV(dv, plan.D);
  for (size_t e = 0; e < plan.exchanges.size(); ++e) {
    const Exchange& ex = plan.exchanges[e];
    Tensor mine = Tensor::empty({2, plan.B, ex.R, plan.D}, kF64);
    ex.comm->reduce_scatter(send[e], mine);
    for (const Block& blk : ex.own_blocks)
      for (int64_t b = 0; b < plan.B; ++b)
        for (int64_t j = 0; j < blk.count; ++j) {
          const int64_t x = blk.x0 + j * blk.r - plan.c0();
          const double* gk = packed_row(mine, plan, ex, 0, 0, b, blk.offset + j);
          const double* gv = packed_row(mine, plan, ex, 0, 1, b, blk.offset + j);
          double *tk = dK.row(b, x, blk.h), *tv = dV.row(b, x, blk.h);
          for (int64_t d = 0; d < plan.D; ++d) {
            tk[d] += gk[d];
            tv[d] += gv[d];
          }
        }
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
  detail::check_same_dtype(kOp, q, k);
  detail::check_same_dtype(kOp, q, v);
  for (const Tensor* t : {&q, &k, &v})
    MINIDL_CHECK(!t->is_cuda(), kOp, ": CPU tensors only for now, got ", detail::describe(*t));
  const DType dt = q.dtype();
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
  MINIDL_CHECK(!config.dropout.enabled(), kOp,
               ": attention dropout is not supported (its mask is keyed by global positions)");
}

}  // namespace

std::pair<Tensor, Tensor> seq_parallel_dilated_attention(const Tensor& q_in, const Tensor& k_in,
                                                         const Tensor& v_in,
                                                         const DilatedAttentionConfig& config,
                                                         dist::Communicator& comm) {
  check_inputs(q_in, k_in, v_in, config);
  const DType dtype = q_in.dtype(), lse_dtype = dtype == DType::Float64 ? DType::Float64 : DType::Float32;
  auto plan = std::make_shared<const Plan>(make_plan(q_in, config, comm));
  Tensor q, k, v;
  Forward f;
  {
    NoGradGuard no_grad;
    q = f64(q_in.detach());
    k = f64(k_in.detach());
    v = f64(v_in.detach());
    f = forward(*plan, q, k, v);
  }
  Tensor out = dtype == DType::Float64 ? f.out : to(f.out, dtype);
  Tensor lse = lse_dtype == DType::Float64 ? f.lse : to(f.lse, lse_dtype);
  if (autograd::needs_grad({q_in, k_in, v_in})) {
    autograd::record(
        kOp, {q_in, k_in, v_in}, {out, lse},
        [plan, dtype, sq = SavedTensor(q, kOp), sk = SavedTensor(k, kOp),
         sv = SavedTensor(v, kOp), so = SavedTensor(f.out, kOp), sl = SavedTensor(f.lse, kOp),
         gathered = f.gathered](const Grads& g) {
          NoGradGuard no_grad;
          Tensor q = sq.get();
          Tensor dO = g[0].defined() ? f64(g[0]) : zeros(q.shape(), kF64);
          Tensor dL = g[1].defined() ? f64(g[1]) : Tensor();
          std::vector<Tensor> grads =
              backward(*plan, q, sk.get(), sv.get(), so.get(), sl.get(), gathered, dO, dL);
          if (dtype != DType::Float64)
            for (Tensor& t : grads) t = to(t, dtype);
          return grads;
        },
        autograd::MissingGrad::Undefined);
  }
  return {out, lse};
}

}  // namespace minidl::ops
