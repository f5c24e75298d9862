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

  const BlockRows block = block_rows<true>(g, kBr);
  const int64_t batch = block.batch, head = block.head, t0 = block.t0;
  const RowSet rows = block.rows;
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
      online_softmax_max<kNTiles>(reinterpret_cast<const float(&)[kNTiles * 4]>(s[mt]), m_row[mt], l_row[mt],
                                  m_scaled, corr, scale_log2);
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
    case MergeMode::kFinish: MINIDL_FAIL("dilated_attention (cuda, mma): kFinish is the ws kernel's");
  }
}

}  // namespace

void forward_mma(AttentionKernel kernel, const Operand<BFloat16>& q, const Operand<BFloat16>& k,
                 const Operand<BFloat16>& v, const BranchGrid& g, int64_t batch, int64_t d, bool causal,
                 float scale_log2, const BranchDropout& drop, MergeMode mode, float* o_acc, float* lse,
                 BFloat16* out) {
#if MINIDL_WGMMA
  if (kernel == AttentionKernel::kWarpSpecialized && (d == 64 || d == 128) && ws_takes(q, k, v, g, batch))
    return forward_ws(q, k, v, g, batch, causal, scale_log2, drop, mode, o_acc, lse, out);
  if (kernel >= AttentionKernel::kWgmma && d == 64)
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

  const BlockRows block = block_rows<false>(g, 64);
  const int64_t batch = block.batch, head = block.head, kt0 = block.t0;
  const RowSet rows = block.rows;
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
  load_row_stats<kThreads>(l2s, dls, lse, delta, g, batch, head, rows, q_first);

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
      load_row_stats<kThreads>(l2s + (buf ^ 1) * 64, dls + (buf ^ 1) * 64, lse, delta, g, batch, head, rows,
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
