// Tensor-core forward for one dilated-attention branch, FlashAttention-2
// style: a block owns 64 or 128 kept query rows of one (batch, head,
// segment) (16 or 32 per warp), streams 64-key tiles of K and V through double-buffered shared
// memory with cp.async, computes S = Q K^T and O += P V with mma.sync bf16
// (fp32 accumulation) and keeps the online softmax in registers. Rows are a
// strided set (base + t * dilation), gathered by address arithmetic.
#include "cuda/dilated_attention_mma.cuh"
#include "cuda/dilated_attention_tiles.cuh"
#include "cuda/mma.cuh"
#include "cuda/runtime.h"

namespace minidl::cuda::attn {
namespace {

using namespace mma;

constexpr int kWarps = 4;
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

template <int D, int kM, int kBc, bool kCausal, MergeMode kMode, bool kDropout>
__global__ __launch_bounds__(kThreads) void forward_mma_kernel(Operand<BFloat16> q, Operand<BFloat16> k,
                                                               Operand<BFloat16> v, BranchGrid g,
                                                               float scale_log2, BranchDropout drop,
                                                               float* o_acc, float* lse, BFloat16* out) {
  using F = FwdShape<D, kM, kBc>;
  using QT = typename F::QTile;
  using KT = typename F::KTile;
  constexpr int kBr = F::kBr;
  constexpr int kSteps = D / 16;  // k-steps of Q K^T
  constexpr int kDTiles = D / 8;  // n-tiles of the output
  constexpr int kNTiles = kBc / 8;
  extern __shared__ __align__(128) char smem[];

  const int64_t bh = blockIdx.y;
  const int64_t batch = bh / g.heads, head = bh % g.heads;
  const int64_t segment = blockIdx.x / g.tiles_per_segment;
  // Heaviest (latest) causal tiles first, for a better tail.
  const int64_t tile = g.tiles_per_segment - 1 - blockIdx.x % g.tiles_per_segment;
  const RowSet rows = kept_rows(g.n, g.w, g.r, head, segment);
  const int64_t t0 = tile * kBr;
  if (t0 >= rows.count) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t key_end = kCausal ? min(t0 + kBr, rows.count) : rows.count;
  const int n_tiles = static_cast<int>((key_end + kBc - 1) / kBc);

  load_tile_async<kBr, D, kThreads>(smem + F::kQ, q, batch, head, rows, t0);
  load_tile_async<kBc, D, kThreads>(smem + F::kK, k, batch, head, rows, 0);
  load_tile_async<kBc, D, kThreads>(smem + F::kV, v, batch, head, rows, 0);
  cp_async_commit();

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
  // Dropout: mask row of kept row tq is drop_row0 + tq * stride (core/dilated.h).
  const uint64_t drop_row0 = kDropout ? dropout_row(drop, g, batch, head, rows.base) : 0;
  static_assert(!kDropout || kBc == 64, "the dropout words cover 4 16-key groups per tile");

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    if (j + 1 < n_tiles) {  // prefetch the next tile into the other buffer
      load_tile_async<kBc, D, kThreads>(smem + F::kK + (buf ^ 1) * KT::kBytes, k, batch, head, rows,
                              int64_t(j + 1) * kBc);
      load_tile_async<kBc, D, kThreads>(smem + F::kV + (buf ^ 1) * KT::kBytes, v, batch, head, rows,
                              int64_t(j + 1) * kBc);
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

    // Dropout mask words of this lane's rows, drawn before S is live:
    // keep_words[mt][r][kk] holds keys (2kk + h) * 8 + 2 * (lane % 4) + e of
    // row r of m-tile mt in byte 2h + e.
    uint32_t keep_words[kM][2][4];
    if constexpr (kDropout) {
#pragma unroll
      for (int mt = 0; mt < kM; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int64_t tq = q_row0 + mt * 16 + r * 8;
          dropout_words_rows(drop.mask, drop_row0 + uint64_t(tq < rows.count ? tq : 0) * rows.stride,
                             int64_t(j) * kBc, lane, keep_words[mt][r]);
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

    // Mask (only tiles that cross the causal diagonal or the end), then the
    // online softmax: two rows per lane per m-tile, reduced over the quad.
    const int64_t k0 = int64_t(j) * kBc;
    const bool need_mask = k0 + kBc > rows.count || (kCausal && k0 + kBc - 1 > t0);
    if (need_mask) {
      const int64_t limit = rows.count - k0;  // keys at index >= limit do not exist
#pragma unroll
      for (int mt = 0; mt < kM; ++mt)
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            int col = nt * 8 + 2 * (lane % 4) + (e & 1);
            int64_t tq = q_row0 + mt * 16 + (e >> 1) * 8;
            if (col >= limit || (kCausal && k0 + col > tq)) s[mt][nt][e] = -INFINITY;
          }
    }
    uint32_t pf[kM][kBc / 16][4];
#pragma unroll
    for (int mt = 0; mt < kM; ++mt) {
      float m_scaled[2], corr[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = m_row[mt][r];
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * r], s[mt][nt][2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        // A row with nothing visible yet keeps m = -inf; use 0 so p = 0, not NaN.
        m_scaled[r] = mx == -INFINITY ? 0.f : mx * scale_log2;
        corr[r] = exp2f(m_row[mt][r] * scale_log2 - m_scaled[r]);
        m_row[mt][r] = mx;
        l_row[mt][r] *= corr[r];
      }
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
            p[h][e] = exp2f(fmaf(s[mt][2 * kk + h][e], scale_log2, -m_scaled[e >> 1]));
            l_row[mt][e >> 1] += p[h][e];  // the normaliser counts every key
            // Dropped weights are zeroed; the kept ones' scale is applied at the store.
            if constexpr (kDropout)
              if (!attention_keep_byte(keep_words[mt][e >> 1][kk], 2 * h + (e & 1), drop.mask.threshold)) p[h][e] = 0.f;
          }
        pf[mt][kk][0] = pack_bf16(p[0][0], p[0][1]);
        pf[mt][kk][1] = pack_bf16(p[0][2], p[0][3]);
        pf[mt][kk][2] = pack_bf16(p[1][0], p[1][1]);
        pf[mt][kk][3] = pack_bf16(p[1][2], p[1][3]);
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
                    float* o_acc, float* lse, BFloat16* out) {
  using F = FwdShape<D, kM, kBc>;
  // Dropout is a separate instantiation: its mask arithmetic would otherwise
  // cost registers (and spills) in the plain kernel.
  auto kernel = drop.mask.enabled() ? forward_mma_kernel<D, kM, kBc, kCausal, kMode, true>
                                    : forward_mma_kernel<D, kM, kBc, kCausal, kMode, false>;
  allow_dynamic_smem(F::kSmem, forward_mma_kernel<D, kM, kBc, kCausal, kMode, true>,
                     forward_mma_kernel<D, kM, kBc, kCausal, kMode, false>);
  g.tiles_per_segment = ((g.w + g.r - 1) / g.r + F::kBr - 1) / F::kBr;
  dim3 grid(static_cast<unsigned>(g.segments * g.tiles_per_segment), static_cast<unsigned>(batch * g.heads));
  kernel<<<grid, kThreads, F::kSmem, stream()>>>(q, k, v, g, scale_log2, drop, o_acc, lse, out);
  MINIDL_CUDA_LAUNCH_CHECK();
}

// Tile shape per head dim, measured on an H100 before the wgmma kernel took
// D = 64 there (docs/kernel-notes.md): two m-tiles per warp (128-row blocks)
// for D <= 64; D = 128 needs the registers for one.
template <int D, bool kCausal, MergeMode kMode>
void forward_variants(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                      const BranchGrid& g, int64_t batch, float scale_log2, const BranchDropout& drop,
                      float* o_acc, float* lse, BFloat16* out) {
  constexpr int kM = D <= 64 ? 2 : 1;
  launch_forward<D, kM, 64, kCausal, kMode>(q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
}

template <int D, bool kCausal>
void forward_for_mode(MergeMode mode, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                      const Operand<BFloat16>& v, const BranchGrid& g, int64_t batch, float scale_log2,
                      const BranchDropout& drop, float* o_acc, float* lse, BFloat16* out) {
  switch (mode) {
    case MergeMode::kWrite: return forward_variants<D, kCausal, MergeMode::kWrite>(q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
    case MergeMode::kMerge: return forward_variants<D, kCausal, MergeMode::kMerge>(q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
    case MergeMode::kSingle: return forward_variants<D, kCausal, MergeMode::kSingle>(q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
  }
}

}  // namespace

void forward_mma(AttentionKernel kernel, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                 const Operand<BFloat16>& v, const BranchGrid& g, int64_t batch, int64_t d, bool causal,
                 float scale_log2, const BranchDropout& drop, MergeMode mode, float* o_acc, float* lse,
                 BFloat16* out) {
#if MINIDL_WGMMA
  if (kernel == AttentionKernel::kWarpSpecialized && ws_takes(q, k, v, g, batch))
    return forward_ws(q, k, v, g, batch, causal, scale_log2, drop, mode, o_acc, lse, out);
  if (kernel >= AttentionKernel::kWgmma)
    return forward_wgmma(q, k, v, g, batch, causal, scale_log2, drop, mode, o_acc, lse, out);
#endif
  auto run = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    if (causal) forward_for_mode<D, true>(mode, q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
    else forward_for_mode<D, false>(mode, q, k, v, g, batch, scale_log2, drop, o_acc, lse, out);
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
// Backward for one branch, FlashAttention-2 style but key-major: a block owns
// 64 kept key rows (16 per warp) of one (batch, head, segment) and walks the
// query tiles that see them. Each warp computes S^T = K Q^T and dP^T = V dO^T
// directly in the (key, query) orientation, so P^T and dS^T are already A
// fragments for dV += P^T dO and dK += dS^T Q; dS^T goes through shared memory
// once so the block can form dQ = dS K, which is added to global memory with
// atomics.
namespace minidl::cuda::attn {
namespace {

template <int D>
struct BwdSmem {
  using Tile = SmemTile<64, D>;
  using STile = SmemTile<64, 64>;  // dS^T: 64 keys x 64 queries
  static constexpr int kK = 0;
  static constexpr int kV = kK + Tile::kBytes;
  static constexpr int kQ = kV + Tile::kBytes;          // two buffers
  static constexpr int kDO = kQ + 2 * Tile::kBytes;     // two buffers
  static constexpr int kDS = kDO + 2 * Tile::kBytes;
  static constexpr int kL = kDS + STile::kBytes;        // 2 x 64 floats
  static constexpr int kDelta = kL + 2 * 64 * 4;        // 2 x 64 floats
  static constexpr int kBytes = kDelta + 2 * 64 * 4;
};

// Loads lse (as log2 units, +inf for padding rows) and delta of query rows
// [t0, t0 + 64) into shared memory.
__device__ __forceinline__ void load_row_stats(float* l2s, float* ds, const float* lse,
                                               const float* delta, const BranchGrid& g,
                                               int64_t batch, int64_t head, const RowSet& rows,
                                               int64_t t0) {
  for (int i = threadIdx.x; i < 64; i += kThreads) {
    int64_t t = t0 + i;
    float l2 = INFINITY, dd = 0.f;
    if (t < rows.count) {
      int64_t ri = (batch * g.n + rows.base + t * rows.stride) * g.heads + head;
      l2 = lse[ri] * kLog2e;
      dd = delta[ri];
    }
    l2s[i] = l2;
    ds[i] = dd;
  }
}

template <int D, bool kCausal, int kMinBlocks, bool kDropout>
__global__ __launch_bounds__(kThreads, kMinBlocks) void backward_mma_kernel(
    Operand<BFloat16> q, Operand<BFloat16> k, Operand<BFloat16> v, Operand<BFloat16> dout,
    const float* __restrict__ lse, const float* __restrict__ delta, BranchGrid g, float scale,
    BranchDropout drop, float* __restrict__ dq_acc, float* __restrict__ dk_acc,
    float* __restrict__ dv_acc) {
  using L = BwdSmem<D>;
  using T = typename L::Tile;
  using ST = typename L::STile;
  constexpr int kSteps = D / 16;
  constexpr int kDTiles = D / 8;
  constexpr int kQ = 64;  // queries per tile
  extern __shared__ __align__(128) char smem[];

  const int64_t bh = blockIdx.y;
  const int64_t batch = bh / g.heads, head = bh % g.heads;
  const int64_t segment = blockIdx.x / g.tiles_per_segment;
  const int64_t tile = blockIdx.x % g.tiles_per_segment;  // earliest keys see the most queries: first
  const RowSet rows = kept_rows(g.n, g.w, g.r, head, segment);
  const int64_t kt0 = tile * 64;
  if (kt0 >= rows.count) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const float scale_log2 = scale * kLog2e;

  const int64_t q_first = kCausal ? kt0 : 0;  // kt0 is a multiple of 64 = kQ
  const int n_tiles = static_cast<int>((rows.count - q_first + kQ - 1) / kQ);
  float* l2s = reinterpret_cast<float*>(smem + L::kL);
  float* dls = reinterpret_cast<float*>(smem + L::kDelta);

  load_tile_async<64, D, kThreads>(smem + L::kK, k, batch, head, rows, kt0);
  load_tile_async<64, D, kThreads>(smem + L::kV, v, batch, head, rows, kt0);
  load_tile_async<64, D, kThreads>(smem + L::kQ, q, batch, head, rows, q_first);
  load_tile_async<64, D, kThreads>(smem + L::kDO, dout, batch, head, rows, q_first);
  cp_async_commit();
  load_row_stats(l2s, dls, lse, delta, g, batch, head, rows, q_first);

  float dk[kDTiles][4], dv[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const int64_t key_row0 = kt0 + warp * 16 + lane / 4;  // this lane's keys: key_row0, key_row0 + 8
  // Dropout: mask row of kept row tq is drop_row0 + tq * stride (core/dilated.h);
  // this warp's 16 keys are one group; this lane's keys are bytes key_byte and key_byte + 2.
  const uint64_t drop_row0 = kDropout ? dropout_row(drop, g, batch, head, rows.base) : 0;
  const int key_byte = (lane / 4) & 1;

  for (int j = 0; j < n_tiles; ++j) {
    const int buf = j & 1;
    const int64_t q0 = q_first + int64_t(j) * kQ;
    if (j + 1 < n_tiles) {
      load_tile_async<64, D, kThreads>(smem + L::kQ + (buf ^ 1) * T::kBytes, q, batch, head, rows, q0 + kQ);
      load_tile_async<64, D, kThreads>(smem + L::kDO + (buf ^ 1) * T::kBytes, dout, batch, head, rows, q0 + kQ);
      cp_async_commit();
      load_row_stats(l2s + (buf ^ 1) * 64, dls + (buf ^ 1) * 64, lse, delta, g, batch, head, rows,
                     q0 + kQ);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    char* qs = smem + L::kQ + buf * T::kBytes;
    char* dos = smem + L::kDO + buf * T::kBytes;
    const float* l2 = l2s + buf * 64;
    const float* dl = dls + buf * 64;

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x 64 queries per warp.
    float s[8][4], dp[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      uint32_t kf[4], vf[4];
      ldmatrix_x4(kf, T::at(smem + L::kK, warp * 16 + lane % 16, 2 * ks + lane / 16));
      ldmatrix_x4(vf, T::at(smem + L::kV, warp * 16 + lane % 16, 2 * ks + lane / 16));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        int row = np * 16 + lane % 8 + (lane / 16) * 8, chunk = 2 * ks + (lane / 8) % 2;
        ldmatrix_x4(b, T::at(qs, row, chunk));
        mma_bf16(s[2 * np], kf, b[0], b[1]);
        mma_bf16(s[2 * np + 1], kf, b[2], b[3]);
        ldmatrix_x4(b, T::at(dos, row, chunk));
        mma_bf16(dp[2 * np], vf, b[0], b[1]);
        mma_bf16(dp[2 * np + 1], vf, b[2], b[3]);
      }
    }
    // Dropout mask words, drawn per half of the n-tiles (8 live words):
    // keep_words[2 (nt % 4) + e] is this lane's word of query q0 + 8nt + 2 * (lane % 4) + e.
    uint32_t keep_words[8];
    const int64_t drop_tq0 = q0 + 2 * (lane % 4);
    // P^T = exp2(S^T * scale_log2 - L2[q]), dS^T = P^T (dP^T - delta[q]).
    const bool need_mask = kt0 + 64 > rows.count || q0 + kQ > rows.count || (kCausal && q0 < kt0 + 63);
    uint32_t pf[4][4], dsf[4][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      if constexpr (kDropout) {
        if (nt % 4 == 0) {
          dropout_words_keys(
              drop.mask, kt0 + warp * 16, lane, nt / 4,
              [&](int u) {
                const int64_t tq = drop_tq0 + 8 * (u >> 1) + (u & 1);
                return drop_row0 + uint64_t(tq < rows.count ? tq : 0) * rows.stride;
              },
              keep_words);
          // This lane's keys to bytes 0 and 2, so the byte index below is a constant.
#pragma unroll
          for (int u = 0; u < 8; ++u) keep_words[u] >>= 8 * key_byte;
        }
      }
      float p[4], dsv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        int col = nt * 8 + 2 * (lane % 4) + (e & 1);
        float x = exp2f(s[nt][e] * scale_log2 - l2[col]);
        if (need_mask) {
          int64_t tk = key_row0 + (e >> 1) * 8, tq = q0 + col;
          if (tk >= rows.count || tq >= rows.count || (kCausal && tq < tk)) x = 0.f;
        }
        // With dropout: dV uses P * M, dS = P (M dP' - D) (core/dilated.h).
        float m = 1.f;
        if constexpr (kDropout)
          m = attention_keep_byte(keep_words[2 * (nt % 4) + (e & 1)], 2 * (e >> 1), drop.mask.threshold)
                  ? drop.mask.scale
                  : 0.f;
        p[e] = x * m;
        dsv[e] = x * (m * dp[nt][e] - dl[col]);
      }
      // accumulator layout of n-tiles (2kk, 2kk+1) = A layout of k-step kk
      const int kk = nt / 2, h = nt % 2;
      pf[kk][2 * h] = pack_bf16(p[0], p[1]);
      pf[kk][2 * h + 1] = pack_bf16(p[2], p[3]);
      dsf[kk][2 * h] = pack_bf16(dsv[0], dsv[1]);
      dsf[kk][2 * h + 1] = pack_bf16(dsv[2], dsv[3]);
      // dS^T to shared memory for dQ: rows = keys, columns = queries
      int key = warp * 16 + lane / 4, qc = nt * 8 + 2 * (lane % 4);
      *reinterpret_cast<uint32_t*>(ST::at(smem + L::kDS, key, qc / 8) + (qc % 8) * 2) = dsf[kk][2 * h];
      *reinterpret_cast<uint32_t*>(ST::at(smem + L::kDS, key + 8, qc / 8) + (qc % 8) * 2) = dsf[kk][2 * h + 1];
    }
    // dV += P^T dO and dK += dS^T Q (B operands: dO and Q rows, transposed).
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
      for (int dp2 = 0; dp2 < D / 16; ++dp2) {
        int row = kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, chunk = 2 * dp2 + lane / 16;
        uint32_t b[4];
        ldmatrix_x4_trans(b, T::at(dos, row, chunk));
        mma_bf16(dv[2 * dp2], pf[kk], b[0], b[1]);
        mma_bf16(dv[2 * dp2 + 1], pf[kk], b[2], b[3]);
        ldmatrix_x4_trans(b, T::at(qs, row, chunk));
        mma_bf16(dk[2 * dp2], dsf[kk], b[0], b[1]);
        mma_bf16(dk[2 * dp2 + 1], dsf[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // dS^T complete
    // dQ (16 queries of this warp x D) = dS K, from dS^T (transposed load).
    float dq[kDTiles][4];
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t a[4];
      ldmatrix_x4_trans(a, ST::at(smem + L::kDS, kk * 16 + lane % 8 + (lane / 16) * 8, warp * 2 + (lane / 8) % 2));
#pragma unroll
      for (int dp2 = 0; dp2 < D / 16; ++dp2) {
        uint32_t b[4];
        ldmatrix_x4_trans(b, T::at(smem + L::kK, kk * 16 + lane % 8 + ((lane / 8) % 2) * 8, 2 * dp2 + lane / 16));
        mma_bf16(dq[2 * dp2], a, b[0], b[1]);
        mma_bf16(dq[2 * dp2 + 1], a, b[2], b[3]);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      int64_t tq = q0 + warp * 16 + lane / 4 + r * 8;
      if (tq >= rows.count) continue;
      float* dst = dq_acc + ((batch * g.n + rows.base + tq * rows.stride) * g.heads + head) * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        int col = dt * 8 + 2 * (lane % 4);
        red_add_v2(dst + col, scale * dq[dt][2 * r], scale * dq[dt][2 * r + 1]);
      }
    }
    __syncthreads();  // buffers of this iteration are reused
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    int64_t tk = key_row0 + r * 8;
    if (tk >= rows.count) continue;
    int64_t ri = (batch * g.n + rows.base + tk * rows.stride) * g.heads + head;
    float* dkr = dk_acc + ri * D;
    float* dvr = dv_acc + ri * D;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      int col = dt * 8 + 2 * (lane % 4);
      float2 a = *reinterpret_cast<float2*>(dkr + col), b = *reinterpret_cast<float2*>(dvr + col);
      *reinterpret_cast<float2*>(dkr + col) =
          make_float2(a.x + scale * dk[dt][2 * r], a.y + scale * dk[dt][2 * r + 1]);
      *reinterpret_cast<float2*>(dvr + col) = make_float2(b.x + dv[dt][2 * r], b.y + dv[dt][2 * r + 1]);
    }
  }
}

template <int D, bool kCausal>
void launch_backward(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v,
                     const Operand<BFloat16>& dout, const float* lse, const float* delta,
                     const BranchGrid& g, int64_t batch, float scale, const BranchDropout& drop,
                     float* dq_acc, float* dk_acc, float* dv_acc) {
  // Capping registers for 3 blocks per SM pays for D <= 64 (H100, measured);
  // D = 128 needs them all. The dropout variant fits the same cap without
  // spills since its mask takes 2 Philox calls per lane per tile (ptxas, sm_90).
  constexpr int kMinBlocks = D <= 64 ? 3 : 1;
  auto kernel = drop.mask.enabled() ? backward_mma_kernel<D, kCausal, kMinBlocks, true>
                                    : backward_mma_kernel<D, kCausal, kMinBlocks, false>;
  constexpr int smem = BwdSmem<D>::kBytes;
  allow_dynamic_smem(smem, backward_mma_kernel<D, kCausal, kMinBlocks, true>,
                     backward_mma_kernel<D, kCausal, kMinBlocks, false>);
  dim3 grid(static_cast<unsigned>(g.segments * g.tiles_per_segment), static_cast<unsigned>(batch * g.heads));
  kernel<<<grid, kThreads, smem, stream()>>>(q, k, v, dout, lse, delta, g, scale, drop, dq_acc, dk_acc,
                                             dv_acc);
  MINIDL_CUDA_LAUNCH_CHECK();
}

}  // namespace

void backward_mma(AttentionKernel kernel, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                  const Operand<BFloat16>& v, const Operand<BFloat16>& dout, const float* lse, const float* delta,
                  const BranchGrid& g, int64_t batch, int64_t d, bool causal, float scale,
                  const BranchDropout& drop, float* dq_acc, float* dk_acc, float* dv_acc) {
#if MINIDL_WGMMA
  if (kernel == AttentionKernel::kWarpSpecialized && ws_takes(q, k, v, g, batch, &dout))
    return backward_ws(q, k, v, dout, lse, delta, g, batch, causal, scale, drop, dq_acc, dk_acc, dv_acc);
#endif
  auto run = [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    if (causal) launch_backward<D, true>(q, k, v, dout, lse, delta, g, batch, scale, drop, dq_acc, dk_acc, dv_acc);
    else launch_backward<D, false>(q, k, v, dout, lse, delta, g, batch, scale, drop, dq_acc, dk_acc, dv_acc);
  };
  switch (d) {
    case 32: return run(std::integral_constant<int, 32>{});
    case 64: return run(std::integral_constant<int, 64>{});
    case 128: return run(std::integral_constant<int, 128>{});
    default: MINIDL_FAIL("dilated_attention backward (cuda): no tensor-core kernel for head dim ", d);
  }
}

}  // namespace minidl::cuda::attn

// ---------------------------------------------------------------------------
// float32 on TF32 tensor cores (mma.sync m16n8k8, sm_80+), the library's
// float32 matmul policy (cuBLAS CUBLAS_COMPUTE_32F_FAST_TF32) applied to
// attention: every operand of the seven products is rounded to tf32
// (cvt.rna) as its fragment is loaded, P and dS included; accumulation, the
// softmax, lse, the merge and the dropout mask are fp32 and the same as the
// bf16 kernels'. The m16n8k8 accumulator layout is that of m16n8k16, so the
// masking, online softmax, dropout words and epilogues are the bf16 code's.
// Its A layout is not (lane l holds columns l%4 and l%4 + 4, not 2(l%4) and
// 2(l%4) + 1): a product whose A comes from an accumulator (P V, P^T dO,
// dS^T Q) permutes its reduction index instead, A slot c <-> column 2c and
// slot c + 4 <-> column 2c + 1 within each 8-wide k-step, and its B fragment
// reads the same rows (2(l%4) and 2(l%4) + 1); dQ = dS K does the same so
// that its K loads are bank-conflict free. fp32 tiles are twice the bytes of
// bf16 ones, so K and V (forward) and Q and dO (backward) are single-buffered,
// each refilled as soon as the block is done with it.
namespace minidl::cuda::attn {
namespace {

// Forward: 64 query rows per block (16 per warp), 64-key tiles.
template <int D>
struct Tf32FwdSmem {
  using Tile = F32Tile<64, D>;
  static constexpr int kQ = 0;
  static constexpr int kK = Tile::kBytes;
  static constexpr int kV = 2 * Tile::kBytes;
  static constexpr int kBytes = 3 * Tile::kBytes;  // D = 64: 52 KiB, D = 128: 99 KiB
};

template <int D, bool kCausal, MergeMode kMode, bool kDropout>
__global__ __launch_bounds__(kThreads) void forward_tf32_kernel(Operand<float> q, Operand<float> k,
                                                                Operand<float> v, BranchGrid g,
                                                                float scale_log2, BranchDropout drop,
                                                                float* o_acc, float* lse) {
  static_assert(kMode != MergeMode::kSingle, "float32 writes its output as the fp32 accumulator (kWrite)");
  using L = Tf32FwdSmem<D>;
  using T = typename L::Tile;
  constexpr int kBr = 64, kBc = 64;
  constexpr int kSteps = D / 8;   // k-steps of Q K^T
  constexpr int kDTiles = D / 8;  // n-tiles of the output
  constexpr int kNTiles = kBc / 8;
  extern __shared__ __align__(128) char smem[];

  const int64_t bh = blockIdx.y;
  const int64_t batch = bh / g.heads, head = bh % g.heads;
  const int64_t segment = blockIdx.x / g.tiles_per_segment;
  // Heaviest (latest) causal tiles first, for a better tail.
  const int64_t tile = g.tiles_per_segment - 1 - blockIdx.x % g.tiles_per_segment;
  const RowSet rows = kept_rows(g.n, g.w, g.r, head, segment);
  const int64_t t0 = tile * kBr;
  if (t0 >= rows.count) return;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lr = lane / 4, lc = lane % 4;  // fragment row and column of this lane
  const int64_t key_end = kCausal ? min(t0 + kBr, rows.count) : rows.count;
  const int n_tiles = static_cast<int>((key_end + kBc - 1) / kBc);

  // cp.async groups, in order: {Q, K_0}, {V_0}, then K_{j+1} after S_j and
  // V_{j+1} after P_j V_j, so "all but the newest group" is always the tile
  // about to be read.
  load_tile_f32_async<kBr, D, kThreads>(smem + L::kQ, q, batch, head, rows, t0);
  load_tile_f32_async<kBc, D, kThreads>(smem + L::kK, k, batch, head, rows, 0);
  cp_async_commit();
  load_tile_f32_async<kBc, D, kThreads>(smem + L::kV, v, batch, head, rows, 0);
  cp_async_commit();

  uint32_t qf[kSteps][4];
  float o[kDTiles][4];
  // Row maxima in raw score units, as in the bf16 kernel.
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
#pragma unroll
  for (int i = 0; i < kDTiles; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  // This lane's rows: q_row0 and q_row0 + 8.
  const int64_t q_row0 = t0 + warp * 16 + lr;
  const uint64_t drop_row0 = kDropout ? dropout_row(drop, g, batch, head, rows.base) : 0;
  char* qs = smem + L::kQ;
  char* ks_tile = smem + L::kK;
  char* vs_tile = smem + L::kV;

  for (int j = 0; j < n_tiles; ++j) {
    cp_async_wait<1>();  // K_j (and Q)
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int ks = 0; ks < kSteps; ++ks) {
        const int r = warp * 16 + lr, c = ks * 8 + lc;
        qf[ks][0] = to_tf32(*T::at(qs, r, c));
        qf[ks][1] = to_tf32(*T::at(qs, r + 8, c));
        qf[ks][2] = to_tf32(*T::at(qs, r, c + 4));
        qf[ks][3] = to_tf32(*T::at(qs, r + 8, c + 4));
      }
    }
    // Dropout mask words of this lane's rows (layout: the bf16 kernel's).
    uint32_t keep_words[2][4];
    if constexpr (kDropout) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t tq = q_row0 + r * 8;
        dropout_words_rows(drop.mask, drop_row0 + uint64_t(tq < rows.count ? tq : 0) * rows.stride,
                           int64_t(j) * kBc, lane, keep_words[r]);
      }
    }
    // S = Q K^T: B[d][key] = K[key][d].
    float s[kNTiles][4];
#pragma unroll
    for (int i = 0; i < kNTiles; ++i) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks)
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
        mma_tf32(s[nt], qf[ks], to_tf32(*T::at(ks_tile, nt * 8 + lr, ks * 8 + lc)),
                 to_tf32(*T::at(ks_tile, nt * 8 + lr, ks * 8 + lc + 4)));
    __syncthreads();  // every warp is done with K_j
    if (j + 1 < n_tiles) {
      load_tile_f32_async<kBc, D, kThreads>(ks_tile, k, batch, head, rows, int64_t(j + 1) * kBc);
      cp_async_commit();
    }

    // Mask (only tiles that cross the causal diagonal or the end), then the
    // online softmax: two rows per lane, reduced over the quad.
    const int64_t k0 = int64_t(j) * kBc;
    const bool need_mask = k0 + kBc > rows.count || (kCausal && k0 + kBc - 1 > t0);
    if (need_mask) {
      const int64_t limit = rows.count - k0;  // keys at index >= limit do not exist
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          int col = nt * 8 + 2 * lc + (e & 1);
          int64_t tq = q_row0 + (e >> 1) * 8;
          if (col >= limit || (kCausal && k0 + col > tq)) s[nt][e] = -INFINITY;
        }
    }
    float m_scaled[2], corr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = m_row[r];
#pragma unroll
      for (int nt = 0; nt < kNTiles; ++nt) mx = fmaxf(mx, fmaxf(s[nt][2 * r], s[nt][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      // A row with nothing visible yet keeps m = -inf; use 0 so p = 0, not NaN.
      m_scaled[r] = mx == -INFINITY ? 0.f : mx * scale_log2;
      corr[r] = exp2f(m_row[r] * scale_log2 - m_scaled[r]);
      m_row[r] = mx;
      l_row[r] *= corr[r];
    }
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      o[dt][0] *= corr[0];
      o[dt][1] *= corr[0];
      o[dt][2] *= corr[1];
      o[dt][3] *= corr[1];
    }
    // P as tf32 A fragments: n-tile nt is k-step nt of P V, with its columns
    // (keys) 2c, 2c + 1 in A slots c, c + 4.
    uint32_t pf[kNTiles][4];
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      float p[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[e] = exp2f(fmaf(s[nt][e], scale_log2, -m_scaled[e >> 1]));
        l_row[e >> 1] += p[e];  // the normaliser counts every key
        // Dropped weights are zeroed; the kept ones' scale is applied at the store.
        if constexpr (kDropout)
          if (!attention_keep_byte(keep_words[e >> 1][nt / 2], 2 * (nt % 2) + (e & 1), drop.mask.threshold))
            p[e] = 0.f;
      }
      pf[nt][0] = to_tf32(p[0]);  // (row lr, key 2lc)
      pf[nt][1] = to_tf32(p[2]);  // (row lr + 8, key 2lc)
      pf[nt][2] = to_tf32(p[1]);  // (row lr, key 2lc + 1)
      pf[nt][3] = to_tf32(p[3]);  // (row lr + 8, key 2lc + 1)
    }
    if (j + 1 < n_tiles) cp_async_wait<1>();  // V_j (K_{j+1} may still be in flight)
    else cp_async_wait<0>();
    __syncthreads();
    // O += P V: B[slot][d] = V[key of slot][d].
#pragma unroll
    for (int kk = 0; kk < kNTiles; ++kk)
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        mma_tf32(o[dt], pf[kk], to_tf32(*T::at(vs_tile, kk * 8 + 2 * lc, dt * 8 + lr)),
                 to_tf32(*T::at(vs_tile, kk * 8 + 2 * lc + 1, dt * 8 + lr)));
    __syncthreads();  // every warp is done with V_j
    if (j + 1 < n_tiles) {
      load_tile_f32_async<kBc, D, kThreads>(vs_tile, v, batch, head, rows, int64_t(j + 1) * kBc);
      cp_async_commit();
    }
  }
  store_branch_rows<D, kMode>(o, m_row, l_row, q_row0, scale_log2, g, batch, head, rows, o_acc, lse,
                              nullptr, kDropout ? drop.mask.scale : 1.f);
}

template <int D, bool kCausal, MergeMode kMode>
void launch_forward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v,
                         BranchGrid g, int64_t batch, float scale_log2, const BranchDropout& drop,
                         float* o_acc, float* lse) {
  constexpr int smem = Tf32FwdSmem<D>::kBytes;
  auto kernel = drop.mask.enabled() ? forward_tf32_kernel<D, kCausal, kMode, true>
                                    : forward_tf32_kernel<D, kCausal, kMode, false>;
  allow_dynamic_smem(smem, forward_tf32_kernel<D, kCausal, kMode, true>, forward_tf32_kernel<D, kCausal, kMode, false>);
  g.tiles_per_segment = ((g.w + g.r - 1) / g.r + 63) / 64;
  dim3 grid(static_cast<unsigned>(g.segments * g.tiles_per_segment), static_cast<unsigned>(batch * g.heads));
  kernel<<<grid, kThreads, smem, stream()>>>(q, k, v, g, scale_log2, drop, o_acc, lse);
  MINIDL_CUDA_LAUNCH_CHECK();
}

// Backward: the bf16 kernel's key-major structure (64 keys per block, 16 per
// warp; 64-query tiles), with Q and dO single-buffered: the next tile's loads
// are issued once dV and dK are done with the current one, and run under dQ.
template <int D>
struct Tf32BwdSmem {
  using Tile = F32Tile<64, D>;
  using STile = F32Tile<64, 64>;  // dS^T (tf32 values): 64 keys x 64 queries
  static constexpr int kK = 0;
  static constexpr int kV = Tile::kBytes;
  static constexpr int kQ = 2 * Tile::kBytes;
  static constexpr int kDO = 3 * Tile::kBytes;
  static constexpr int kDS = 4 * Tile::kBytes;
  static constexpr int kL = kDS + STile::kBytes;  // 64 floats
  static constexpr int kDelta = kL + 64 * 4;      // 64 floats
  static constexpr int kBytes = kDelta + 64 * 4;  // D = 64: 86 KiB, D = 128: 150 KiB
};

template <int D, bool kCausal, bool kDropout>
__global__ __launch_bounds__(kThreads) void backward_tf32_kernel(
    Operand<float> q, Operand<float> k, Operand<float> v, Operand<float> dout, const float* __restrict__ lse,
    const float* __restrict__ delta, BranchGrid g, float scale, BranchDropout drop,
    float* __restrict__ dq_acc, float* __restrict__ dk_acc, float* __restrict__ dv_acc) {
  using L = Tf32BwdSmem<D>;
  using T = typename L::Tile;
  using ST = typename L::STile;
  constexpr int kSteps = D / 8;
  constexpr int kDTiles = D / 8;
  constexpr int kQRows = 64;  // queries per tile
  extern __shared__ __align__(128) char smem[];

  const int64_t bh = blockIdx.y;
  const int64_t batch = bh / g.heads, head = bh % g.heads;
  const int64_t segment = blockIdx.x / g.tiles_per_segment;
  const int64_t tile = blockIdx.x % g.tiles_per_segment;  // earliest keys see the most queries: first
  const RowSet rows = kept_rows(g.n, g.w, g.r, head, segment);
  const int64_t kt0 = tile * 64;
  if (kt0 >= rows.count) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lr = lane / 4, lc = lane % 4;
  const float scale_log2 = scale * kLog2e;

  const int64_t q_first = kCausal ? kt0 : 0;  // kt0 is a multiple of 64 = kQRows
  const int n_tiles = static_cast<int>((rows.count - q_first + kQRows - 1) / kQRows);
  float* l2s = reinterpret_cast<float*>(smem + L::kL);
  float* dls = reinterpret_cast<float*>(smem + L::kDelta);
  char* ks_tile = smem + L::kK;
  char* vs_tile = smem + L::kV;
  char* qs = smem + L::kQ;
  char* dos = smem + L::kDO;
  char* dst_tile = smem + L::kDS;

  load_tile_f32_async<64, D, kThreads>(ks_tile, k, batch, head, rows, kt0);
  load_tile_f32_async<64, D, kThreads>(vs_tile, v, batch, head, rows, kt0);
  load_tile_f32_async<64, D, kThreads>(qs, q, batch, head, rows, q_first);
  load_tile_f32_async<64, D, kThreads>(dos, dout, batch, head, rows, q_first);
  cp_async_commit();
  load_row_stats(l2s, dls, lse, delta, g, batch, head, rows, q_first);

  float dk[kDTiles][4], dv[kDTiles][4];
#pragma unroll
  for (int i = 0; i < kDTiles; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[i][e] = dv[i][e] = 0.f;
  const int kw = warp * 16;                 // this warp's keys in the tile
  const int64_t key_row0 = kt0 + kw + lr;  // this lane's keys: key_row0, key_row0 + 8
  const uint64_t drop_row0 = kDropout ? dropout_row(drop, g, batch, head, rows.base) : 0;
  const int key_byte = (lane / 4) & 1;

  for (int j = 0; j < n_tiles; ++j) {
    const int64_t q0 = q_first + int64_t(j) * kQRows;
    cp_async_wait<0>();
    __syncthreads();  // Q, dO and the row stats of tile j are in; dQ of tile j - 1 is done with dS^T

    // S^T = K Q^T and dP^T = V dO^T: 16 keys x 64 queries per warp.
    float s[8][4], dp[8][4];
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
#pragma unroll
    for (int ks = 0; ks < kSteps; ++ks) {
      const int c = ks * 8 + lc;
      const uint32_t kf[4] = {to_tf32(*T::at(ks_tile, kw + lr, c)), to_tf32(*T::at(ks_tile, kw + lr + 8, c)),
                              to_tf32(*T::at(ks_tile, kw + lr, c + 4)),
                              to_tf32(*T::at(ks_tile, kw + lr + 8, c + 4))};
      const uint32_t vf[4] = {to_tf32(*T::at(vs_tile, kw + lr, c)), to_tf32(*T::at(vs_tile, kw + lr + 8, c)),
                              to_tf32(*T::at(vs_tile, kw + lr, c + 4)),
                              to_tf32(*T::at(vs_tile, kw + lr + 8, c + 4))};
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        mma_tf32(s[nt], kf, to_tf32(*T::at(qs, nt * 8 + lr, c)), to_tf32(*T::at(qs, nt * 8 + lr, c + 4)));
        mma_tf32(dp[nt], vf, to_tf32(*T::at(dos, nt * 8 + lr, c)), to_tf32(*T::at(dos, nt * 8 + lr, c + 4)));
      }
    }
    // P^T = exp2(S^T * scale_log2 - L2[q]), dS^T = P^T (M dP^T - delta[q]);
    // dropout words as in the bf16 kernel.
    uint32_t keep_words[8];
    const int64_t drop_tq0 = q0 + 2 * lc;
    const bool need_mask = kt0 + 64 > rows.count || q0 + kQRows > rows.count || (kCausal && q0 < kt0 + 63);
    uint32_t pf[8][4], dsf[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      if constexpr (kDropout) {
        if (nt % 4 == 0) {
          dropout_words_keys(
              drop.mask, kt0 + kw, lane, nt / 4,
              [&](int u) {
                const int64_t tq = drop_tq0 + 8 * (u >> 1) + (u & 1);
                return drop_row0 + uint64_t(tq < rows.count ? tq : 0) * rows.stride;
              },
              keep_words);
#pragma unroll
          for (int u = 0; u < 8; ++u) keep_words[u] >>= 8 * key_byte;
        }
      }
      float p[4], dsv[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = nt * 8 + 2 * lc + (e & 1);
        float x = exp2f(s[nt][e] * scale_log2 - l2s[col]);
        if (need_mask) {
          const int64_t tk = key_row0 + (e >> 1) * 8, tq = q0 + col;
          if (tk >= rows.count || tq >= rows.count || (kCausal && tq < tk)) x = 0.f;
        }
        float m = 1.f;
        if constexpr (kDropout)
          m = attention_keep_byte(keep_words[2 * (nt % 4) + (e & 1)], 2 * (e >> 1), drop.mask.threshold)
                  ? drop.mask.scale
                  : 0.f;
        p[e] = x * m;
        dsv[e] = x * (m * dp[nt][e] - dls[col]);
      }
      // n-tile nt is k-step nt of dV and dK: queries 2c, 2c + 1 in A slots c, c + 4.
      pf[nt][0] = to_tf32(p[0]);
      pf[nt][1] = to_tf32(p[2]);
      pf[nt][2] = to_tf32(p[1]);
      pf[nt][3] = to_tf32(p[3]);
      dsf[nt][0] = to_tf32(dsv[0]);
      dsf[nt][1] = to_tf32(dsv[2]);
      dsf[nt][2] = to_tf32(dsv[1]);
      dsf[nt][3] = to_tf32(dsv[3]);
      // dS^T to shared memory for dQ: rows = keys, columns = queries.
      *reinterpret_cast<uint2*>(ST::at(dst_tile, kw + lr, nt * 8 + 2 * lc)) = make_uint2(dsf[nt][0], dsf[nt][2]);
      *reinterpret_cast<uint2*>(ST::at(dst_tile, kw + lr + 8, nt * 8 + 2 * lc)) = make_uint2(dsf[nt][1], dsf[nt][3]);
    }
    // dV += P^T dO and dK += dS^T Q: B[slot][d] = dO / Q[query of slot][d].
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int r = kk * 8 + 2 * lc, c = dt * 8 + lr;
        mma_tf32(dv[dt], pf[kk], to_tf32(*T::at(dos, r, c)), to_tf32(*T::at(dos, r + 1, c)));
        mma_tf32(dk[dt], dsf[kk], to_tf32(*T::at(qs, r, c)), to_tf32(*T::at(qs, r + 1, c)));
      }
    __syncthreads();  // dS^T complete; Q, dO and the row stats of tile j are no longer read

    // Tile j + 1: Q and dO by cp.async, the row stats into registers; both land during dQ.
    const bool more = j + 1 < n_tiles;
    float next_l2 = INFINITY, next_dl = 0.f;  // +inf makes P = 0 for padding rows
    if (more) {
      load_tile_f32_async<64, D, kThreads>(qs, q, batch, head, rows, q0 + kQRows);
      load_tile_f32_async<64, D, kThreads>(dos, dout, batch, head, rows, q0 + kQRows);
      cp_async_commit();
      const int64_t t = q0 + kQRows + threadIdx.x;
      if (threadIdx.x < 64 && t < rows.count) {
        const int64_t ri = (batch * g.n + rows.base + t * rows.stride) * g.heads + head;
        next_l2 = lse[ri] * kLog2e;
        next_dl = delta[ri];
      }
    }

    // dQ (this warp's 16 queries x D) = dS K, A from dS^T: keys 2c, 2c + 1 in A slots c, c + 4.
    const int qw = warp * 16;
    float dq[kDTiles][4];
#pragma unroll
    for (int i = 0; i < kDTiles; ++i) dq[i][0] = dq[i][1] = dq[i][2] = dq[i][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
      const int r = kk * 8 + 2 * lc;
      const uint32_t a[4] = {__float_as_uint(*ST::at(dst_tile, r, qw + lr)),
                             __float_as_uint(*ST::at(dst_tile, r, qw + lr + 8)),
                             __float_as_uint(*ST::at(dst_tile, r + 1, qw + lr)),
                             __float_as_uint(*ST::at(dst_tile, r + 1, qw + lr + 8))};
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt)
        mma_tf32(dq[dt], a, to_tf32(*T::at(ks_tile, r, dt * 8 + lr)), to_tf32(*T::at(ks_tile, r + 1, dt * 8 + lr)));
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t tq = q0 + qw + lr + r * 8;
      if (tq >= rows.count) continue;
      float* dst = dq_acc + ((batch * g.n + rows.base + tq * rows.stride) * g.heads + head) * D;
#pragma unroll
      for (int dt = 0; dt < kDTiles; ++dt) {
        const int col = dt * 8 + 2 * lc;
        red_add_v2(dst + col, scale * dq[dt][2 * r], scale * dq[dt][2 * r + 1]);
      }
    }
    if (more && threadIdx.x < 64) {
      l2s[threadIdx.x] = next_l2;
      dls[threadIdx.x] = next_dl;
    }
  }
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int64_t tk = key_row0 + r * 8;
    if (tk >= rows.count) continue;
    const int64_t ri = (batch * g.n + rows.base + tk * rows.stride) * g.heads + head;
    float* dkr = dk_acc + ri * D;
    float* dvr = dv_acc + ri * D;
#pragma unroll
    for (int dt = 0; dt < kDTiles; ++dt) {
      const int col = dt * 8 + 2 * lc;
      float2 a = *reinterpret_cast<float2*>(dkr + col), b = *reinterpret_cast<float2*>(dvr + col);
      *reinterpret_cast<float2*>(dkr + col) =
          make_float2(a.x + scale * dk[dt][2 * r], a.y + scale * dk[dt][2 * r + 1]);
      *reinterpret_cast<float2*>(dvr + col) = make_float2(b.x + dv[dt][2 * r], b.y + dv[dt][2 * r + 1]);
    }
  }
}

template <int D, bool kCausal>
void launch_backward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v,
                          const Operand<float>& dout, const float* lse, const float* delta,
                          const BranchGrid& g, int64_t batch, float scale, const BranchDropout& drop,
                          float* dq_acc, float* dk_acc, float* dv_acc) {
  auto kernel = drop.mask.enabled() ? backward_tf32_kernel<D, kCausal, true> : backward_tf32_kernel<D, kCausal, false>;
  constexpr int smem = Tf32BwdSmem<D>::kBytes;
  allow_dynamic_smem(smem, backward_tf32_kernel<D, kCausal, true>, backward_tf32_kernel<D, kCausal, false>);
  dim3 grid(static_cast<unsigned>(g.segments * g.tiles_per_segment), static_cast<unsigned>(batch * g.heads));
  kernel<<<grid, kThreads, smem, stream()>>>(q, k, v, dout, lse, delta, g, scale, drop, dq_acc, dk_acc, dv_acc);
  MINIDL_CUDA_LAUNCH_CHECK();
}

// Calls f(std::integral_constant<int, D>{}) for a head dim the kernels take.
template <typename F>
void with_head_dim(const char* op, int64_t d, F&& f) {
  switch (d) {
    case 32: return f(std::integral_constant<int, 32>{});
    case 64: return f(std::integral_constant<int, 64>{});
    case 128: return f(std::integral_constant<int, 128>{});
    default: MINIDL_FAIL(op, ": no tensor-core kernel for head dim ", d);
  }
}

}  // namespace

void forward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v, const BranchGrid& g,
                  int64_t batch, int64_t d, bool causal, float scale_log2, const BranchDropout& drop,
                  MergeMode mode, float* o_acc, float* lse) {
  MINIDL_CHECK(mode != MergeMode::kSingle, "dilated_attention (cuda, tf32): kSingle is bf16 only; float32 "
               "writes its output with kWrite");
  with_head_dim("dilated_attention (cuda, tf32)", d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    auto run = [&](auto causal_tag) {
      constexpr bool kCausal = decltype(causal_tag)::value;
      if (mode == MergeMode::kWrite)
        launch_forward_tf32<D, kCausal, MergeMode::kWrite>(q, k, v, g, batch, scale_log2, drop, o_acc, lse);
      else
        launch_forward_tf32<D, kCausal, MergeMode::kMerge>(q, k, v, g, batch, scale_log2, drop, o_acc, lse);
    };
    if (causal) run(std::true_type{});
    else run(std::false_type{});
  });
}

void backward_tf32(const Operand<float>& q, const Operand<float>& k, const Operand<float>& v,
                   const Operand<float>& dout, const float* lse, const float* delta, const BranchGrid& g,
                   int64_t batch, int64_t d, bool causal, float scale, const BranchDropout& drop, float* dq_acc,
                   float* dk_acc, float* dv_acc) {
  with_head_dim("dilated_attention backward (cuda, tf32)", d, [&](auto dim) {
    constexpr int D = decltype(dim)::value;
    if (causal) launch_backward_tf32<D, true>(q, k, v, dout, lse, delta, g, batch, scale, drop, dq_acc, dk_acc, dv_acc);
    else launch_backward_tf32<D, false>(q, k, v, dout, lse, delta, g, batch, scale, drop, dq_acc, dk_acc, dv_acc);
  });
}

}  // namespace minidl::cuda::attn
