// Tensor-core forward for one dilated-attention branch, FlashAttention-2
// style: a block owns 64 or 128 kept query rows of one (batch, head,
// segment) (16 or 32 per warp), streams 64-key tiles of K and V through double-buffered shared
// memory with cp.async, computes S = Q K^T and O += P V with mma.sync bf16
// (fp32 accumulation) and keeps the online softmax in registers. Rows are a
// strided set (base + t * dilation), gathered by address arithmetic.
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/dilated_attention_mma_backward.cuh"
#include "cuda/dilated_attention_tiles.cuh"
#include "cuda/mma.cuh"
#include "cuda/runtime.h"

namespace minidl::cuda::attn {
namespace {

using namespace mma;

constexpr int kWarps = kMmaWarps;
constexpr int kThreads = kWarps * 32;

// Forward tile shape: each warp owns kM m-tiles of 16 query rows (so a K/V
// fragment loaded from shared memory feeds kM mma instructions); a block owns
// kWarps * 16 * kM rows and streams kBc-key tiles.
template <int D, int kM, int kBc>
struct FwdShape {
  static constexpr int kBr = kWarps * 16 * kM;
  using QTile = SmemTile<kBr, D>;
  using KTile = SmemTile<kBc, D>;
  static constexpr int kQ = 0;
  static constexpr int kK = QTile::kBytes;           // two buffers
  static constexpr int kV = kK + 2 * KTile::kBytes;  // two buffers
  static constexpr int kSmem = kV + 2 * KTile::kBytes;
};

// kNested: `pairs` is a share of nested pairs (a separate instantiation: its
// spans and weights would cost the plain kernel registers).
template <int D, int kM, int kBc, bool kCausal, MergeMode kMode, bool kDropout, bool kNested>
__global__ __launch_bounds__(kThreads) void forward_mma_kernel(Operand<BFloat16> q, Operand<BFloat16> k,
                                                               Operand<BFloat16> v, BranchGrid g,
                                                               float scale_log2, BranchDropout drop,
                                                               BranchPairs pairs, float* o_acc, float* lse,
                                                               BFloat16* out) {
  using F = FwdShape<D, kM, kBc>;
  using QT = typename F::QTile;
  using KT = typename F::KTile;
  constexpr int kBr = F::kBr;
  constexpr int kSteps = D / 16;  // k-steps of Q K^T
  constexpr int kDTiles = D / 8;  // n-tiles of the output
  constexpr int kNTiles = kBc / 8;
  extern __shared__ __align__(128) char smem[];
  drop.mask = resolved_dropout<kDropout>(drop.mask);  // the graph offset read once

  const BlockRows block = block_rows<true>(g, kBr);
  const int64_t batch = block.batch, head = block.head, t0 = block.t0;
  const RowSet rows = block.rows;
  if (t0 >= rows.count) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const SpanWalk<kBc> walk = key_walk<kBr, kBc, kCausal, kNested>(pairs, t0, rows.count);
  const int n_tiles = walk.n;

  if (!kNested || n_tiles > 0) {
    load_tile_async<kBr, D, kThreads>(smem + F::kQ, q, batch, head, rows, t0);
    load_tile_async<kBc, D, kThreads>(smem + F::kK, k, batch, head, rows, walk.row(0));
    load_tile_async<kBc, D, kThreads>(smem + F::kV, v, batch, head, rows, walk.row(0));
    cp_async_commit();
  }

  uint32_t qf[kM][kSteps][4];
  float o[kM][kDTiles][4];
  // Row maxima are kept in raw score units; scale_log2 is applied inside the
  // exponent with one FFMA: p = exp2(s * scale_log2 - m * scale_log2).
  float m_row[kM][2], l_row[kM][2];
#pragma unroll
  for (int mt = 0; mt < kM; ++mt) {
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0.f;
    m_row[mt][0] = m_row[mt][1] = -INFINITY;
    l_row[mt][0] = l_row[mt][1] = 0.f;
  }
  // This lane's rows: q_row0 + mt * 16 + {0, 8}.
  const int64_t q_row0 = t0 + warp * 16 * kM + lane / 4;
  // Dropout: mask row of kept row tq is drop_rows.at(tq) (core/dilated.h).
  const AttentionMaskRows drop_rows = kDropout ? dropout_kept_rows(drop, batch, head, rows) : AttentionMaskRows{};
  static_assert(!kDropout || kBc == 64, "the dropout words cover 4 16-key groups per tile");
  // Nested pairs: the lane's log2 pair weights.
  float bias[2] = {0.f, 0.f};
  if constexpr (kNested) pair_log2_weights(pairs, head, lane, bias);

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {  // prefetch the next tile into the other buffer
      load_tile_async<kBc, D, kThreads>(smem + F::kK + (buf ^ 1) * KT::kBytes, k, batch, head, rows,
                                        walk.row(j + 1));
      load_tile_async<kBc, D, kThreads>(smem + F::kV + (buf ^ 1) * KT::kBytes, v, batch, head, rows,
                                        walk.row(j + 1));
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int mt = 0; mt < kM; ++mt)
#pragma unroll
        for (int ks = 0; ks < kSteps; ++ks)
          ldmatrix_x4(qf[mt][ks], QT::at(smem + F::kQ, (warp * kM + mt) * 16 + lane % 16, 2 * ks + lane / 16));
    }
    char* ks_tile = smem + F::kK + buf * KT::kBytes;
    char* vs_tile = smem + F::kV + buf * KT::kBytes;
    const int64_t k0 = walk.row(j);

    // Dropout mask words of this lane's rows, drawn before S is live:
    // keep_words[mt][r][kk] decides keys (2kk + h) * 8 + 2 * (lane % 4) + e of
    // row r of m-tile mt in byte 2h + e.
    uint32_t keep_words[kM][2][4];
    if constexpr (kDropout) {
#pragma unroll
      for (int mt = 0; mt < kM; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t tq = q_row0 + mt * 16 + r * 8;
          dropout_words_rows(drop.mask, drop_rows.at(uint64_t(tq < rows.count ? tq : 0)), k0, lane,
                             keep_words[mt][r]);
        }
    }
    // S = Q K^T for this warp's rows and the kBc keys.
    float s[kM][kNTiles][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt)
#pragma unroll
      for (int i = 0; i < kNTiles; ++i) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
#pragma unroll
      for (int np = 0; np < kBc / 16; ++np) {
        uint32_t b[4];
        ldmatrix_x4(b, KT::at(ks_tile, np * 16 + lane % 8 + (lane / 16) * 8, 2 * ks + (lane / 8) % 2));
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          mma_bf16(s[mt][2 * np], qf[mt][ks], b[0], b[1]);
          mma_bf16(s[mt][2 * np + 1], qf[mt][ks], b[2], b[3]);
        }
      }
    }

    // Mask (only tiles that cross the causal diagonal, the end or a span of
    // the block's rows), then the online softmax: two rows per lane per
    // m-tile, reduced over the quad.
    const bool need_mask =
        k0 + kBc > rows.count || (kCausal && k0 + kBc - 1 > t0) || (kNested && walk.reaches(k0));
    if (need_mask) {
      const int64_t limit = rows.count - k0;  // keys at index >= limit do not exist
#pragma unroll
      for (int mt = 0; mt < kM; ++mt) {
        SpanCols own[2];  // the keys in each row's span (found here: a rare tile)
        if constexpr (kNested) fragment_span_cols<kBc>(own, pairs, q_row0 + mt * 16, k0);
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int col = nt * 8 + 2 * (lane % 4) + (e & 1);
            int64_t tq = q_row0 + mt * 16 + (e >> 1) * 8;
            if (col >= limit || (kCausal && k0 + col > tq) || (kNested && own[e >> 1].excludes(col)))
              s[mt][nt][e] = -INFINITY;
          }
      }
    }
    uint32_t pf[kM][kBc / 16][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
      float m_scaled[2], corr[2];
      online_softmax_max<kNTiles>(reinterpret_cast<const float(&)[kNTiles * 4]>(s[mt]), m_row[mt], l_row[mt],
                                  m_scaled, corr, scale_log2);
      // The exponent's offset per row and column parity: the weight 2^bias.
      const float offset[2][2] = {{kNested ? bias[0] - m_scaled[0] : -m_scaled[0], kNested ? bias[1] - m_scaled[0] : -m_scaled[0]},
                                  {kNested ? bias[0] - m_scaled[1] : -m_scaled[1], kNested ? bias[1] - m_scaled[1] : -m_scaled[1]}};
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        o[mt][dt][0] *= corr[0];
        o[mt][dt][1] *= corr[0];
        o[mt][dt][2] *= corr[1];
        o[mt][dt][3] *= corr[1];
      }
      // P in bf16 as A fragments: the accumulator layout of n-tiles (2kk,
      // 2kk+1) is the A layout of k-step kk.
#pragma unroll
      for (int kk = 0; kk < kBc / 16; ++kk) {
        float p[2][4];
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            p[h][e] = exp2f(fmaf(s[mt][2 * kk + h][e], scale_log2, offset[e >> 1][e & 1]));
            l_row[mt][e >> 1] += p[h][e];  // the normaliser counts every key
          }
        pf[mt][kk][0] = pack_bf16(p[0][0], p[0][1]);
        pf[mt][kk][1] = pack_bf16(p[0][2], p[0][3]);
        pf[mt][kk][2] = pack_bf16(p[1][0], p[1][1]);
        pf[mt][kk][3] = pack_bf16(p[1][2], p[1][3]);
        // Dropped weights are zeroed; the kept ones' scale is applied at the store.
        if constexpr (kDropout) drop_packed_weights(pf[mt][kk], keep_words[mt][0][kk], keep_words[mt][1][kk]);
      }
    }
    // O += P V.
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, KT::at(vs_tile, kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, 2 * dp + lane / 16));
#pragma unroll
        for (int mt = 0; mt < kM; ++mt) {
          mma_bf16(o[mt][2 * dp], pf[mt][kk], b[0], b[1]);
          mma_bf16(o[mt][2 * dp + 1], pf[mt][kk], b[2], b[3]);
        }
      }
    }
    __syncthreads();  // this buffer is refilled two iterations later
  }

  // Epilogue: finish the row sums, then store or merge.
#pragma unroll
  for (int mt = 0; mt < kM; ++mt)
    store_branch_rows<D, kMode>(o[mt], m_row[mt], l_row[mt], q_row0 + mt * 16, scale_log2, g, batch,
                                head, rows, o_acc, lse, out, kDropout ? drop.mask.scale : 1.f);
}

template <int D, int kM, int kBc, bool kCausal, MergeMode kMode>
void launch_forward(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                    BranchGrid g, int64_t batch, float scale_log2, const BranchDropout& drop,
                    const BranchPairs& pairs, float* o_acc, float* lse, BFloat16* out) {
  using F = FwdShape<D, kM, kBc>;
  // Dropout is a separate instantiation: its mask arithmetic would otherwise
  // cost registers (and spills) in the plain kernel. So are nested pairs,
  // which a lone branch (kSingle) never has.
  constexpr bool kNests = kMode != MergeMode::kSingle;
  MINIDL_CHECK(kNests || pairs.plain(), "dilated_attention (cuda, mma): a lone branch has all its pairs");
  auto kernel = drop.mask.enabled()
                    ? pairs.plain() ? forward_mma_kernel<D, kM, kBc, kCausal, kMode, true, false>
                                    : forward_mma_kernel<D, kM, kBc, kCausal, kMode, true, kNests>
                : pairs.plain() ? forward_mma_kernel<D, kM, kBc, kCausal, kMode, false, false>
                                : forward_mma_kernel<D, kM, kBc, kCausal, kMode, false, kNests>;
  allow_dynamic_smem(F::kSmem, forward_mma_kernel<D, kM, kBc, kCausal, kMode, true, false>,
                     forward_mma_kernel<D, kM, kBc, kCausal, kMode, false, false>,
                     forward_mma_kernel<D, kM, kBc, kCausal, kMode, true, kNests>,
                     forward_mma_kernel<D, kM, kBc, kCausal, kMode, false, kNests>);
  g.tiles_per_segment = (max_kept_rows(g.w, g.r) + F::kBr - 1) / F::kBr;
  const dim3 grid = grid_of(g, batch);
  kernel<<<grid, kThreads, F::kSmem, stream()>>>(q, k, v, g, scale_log2, drop, pairs, o_acc, lse, out);
  MINIDL_CUDA_LAUNCH_CHECK();
}

// Tile shape per head dim, measured on an H100 before the wgmma kernel took
// D = 64 there (docs/kernel-notes.md): two m-tiles per warp (128-row blocks)
// for D <= 64; D = 128 needs the registers for one.
template <int D, bool kCausal, MergeMode kMode>
void forward_variants(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                      const BranchGrid& g, int64_t batch, float scale_log2, const BranchDropout& drop,
                      const BranchPairs& pairs, float* o_acc, float* lse, BFloat16* out) {
  constexpr int kM = D <= 64 ? 2 : 1;
  launch_forward<D, kM, 64, kCausal, kMode>(q, k, v, g, batch, scale_log2, drop, pairs, o_acc, lse, out);
}

template <int D, bool kCausal>
void forward_for_mode(MergeMode mode, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                      const Operand<BFloat16>& v, const BranchGrid& g, int64_t batch, float scale_log2,
                      const BranchDropout& drop, const BranchPairs& pairs, float* o_acc, float* lse,
                      BFloat16* out) {
  switch (mode) {
    case MergeMode::kWrite: return forward_variants<D, kCausal, MergeMode::kWrite>(q, k, v, g, batch, scale_log2, drop, pairs, o_acc, lse, out);
    case MergeMode::kMerge: return forward_variants<D, kCausal, MergeMode::kMerge>(q, k, v, g, batch, scale_log2, drop, pairs, o_acc, lse, out);
    case MergeMode::kSingle: return forward_variants<D, kCausal, MergeMode::kSingle>(q, k, v, g, batch, scale_log2, drop, pairs, o_acc, lse, out);
    case MergeMode::kFinish: MINIDL_FAIL("dilated_attention (cuda, mma): kFinish is the ws kernel's");
  }
}

}  // namespace

void forward_mma(AttentionKernel kernel, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                 const Operand<BFloat16>& v, const BranchGrid& g, int64_t batch, int64_t d, bool causal,
                 float scale_log2, const BranchDropout& drop, MergeMode mode, float* o_acc, float* lse,
                 BFloat16* out, const BranchPairs& pairs) {
#if MINIDL_WGMMA
  // The Hopper kernels here take all of a branch's pairs (the ws kernels'
  // own nested plan is forward_tensor_cores'); a share of nested pairs runs mma.sync.
  if (pairs.plain() && ws_forward_runs(kernel, q, k, v, g, batch))
    return forward_ws(q, k, v, g, batch, causal, scale_log2, drop, mode, o_acc, lse, out);
  if (pairs.plain() && kernel >= AttentionKernel::kWgmma && d == 64)
    return forward_wgmma(q, k, v, g, batch, causal, scale_log2, drop, mode, o_acc, lse, out);
#endif
  auto run = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    if (causal) forward_for_mode<D, true>(mode, q, k, v, g, batch, scale_log2, drop, pairs, o_acc, lse, out);
    else forward_for_mode<D, false>(mode, q, k, v, g, batch, scale_log2, drop, pairs, o_acc, lse, out);
  };
  switch (d) {
    case 32: return run(std::integral_constant<int, 32>{});
    case 64: return run(std::integral_constant<int, 64>{});
    case 128: return run(std::integral_constant<int, 128>{});
    default: MINIDL_FAIL("dilated_attention (cuda): no tensor-core kernel for head dim ", d);
  }
}

}  // namespace minidl::cuda::attn

// ---------------------------------------------------------------------------
// Backward for one branch: backward_mma_kernel (cuda/dilated_attention_mma_backward.cuh).
namespace minidl::cuda::attn {
namespace {

template <int D, bool kCausal>
void launch_backward(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                     const Operand<BFloat16>& dout, const float* lse, const float* delta,
                     const BranchGrid& g, int64_t batch, float scale, const BranchDropout& drop,
                     const BranchPairs& pairs, float* dq_acc, float* dk_acc, float* dv_acc) {
  // Capping registers for 3 blocks per SM pays for D <= 64 (H100, measured);
  // D = 128 needs them all. The dropout variant fits the same cap without
  // spills since its mask takes 2 Philox calls per lane per tile (ptxas, sm_90).
  constexpr int kMinBlocks = D <= 64 ? 3 : 1;
  launch_backward_mma<MmaBf16, D, kCausal, kMinBlocks>(q, k, v, dout, lse, delta, g, batch, scale, drop, pairs,
                                                       dq_acc, dk_acc, dv_acc);
}

}  // namespace

void backward_mma(AttentionKernel kernel, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                  const Operand<BFloat16>& v, const Operand<BFloat16>& dout, const float* lse, const float* delta,
                  const BranchGrid& g, int64_t batch, int64_t d, bool causal, float scale,
                  const BranchDropout& drop, float* dq_acc, float* dk_acc, float* dv_acc, const BranchPairs& pairs) {
#if MINIDL_WGMMA
  // The ws backward reads attention dropout's mask from the bits the ws
  // forward kept, or draws it where there are none. It takes all of a
  // branch's pairs here, as forward_mma's Hopper kernels do.
  if (pairs.plain() && kernel == AttentionKernel::kWarpSpecialized && ws_takes(q, k, v, g, batch, &dout))
    return backward_ws(q, k, v, dout, lse, delta, g, batch, causal, scale, drop, dq_acc, dk_acc, dv_acc);
#endif
  auto run = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    if (causal) launch_backward<D, true>(q, k, v, dout, lse, delta, g, batch, scale, drop, pairs, dq_acc, dk_acc, dv_acc);
    else launch_backward<D, false>(q, k, v, dout, lse, delta, g, batch, scale, drop, pairs, dq_acc, dk_acc, dv_acc);
  };
  switch (d) {
    case 32: return run(std::integral_constant<int, 32>{});
    case 64: return run(std::integral_constant<int, 64>{});
    case 128: return run(std::integral_constant<int, 128>{});
    default: MINIDL_FAIL("dilated_attention backward (cuda): no tensor-core kernel for head dim ", d);
  }
}

}  // namespace minidl::cuda::attn
