// Hopper (sm_90a) warp-specialised forward for one dilated-attention branch at
// head dim 64: the FlashAttention-3 structure (docs/kernel-notes.md, "ws").
//
// A block owns 128 kept query rows of one (batch, head, segment) and runs
// three warpgroups:
// - a producer, whose first warp loads Q once and streams 128-key K and V
//   tiles with TMA into a kStages-deep shared-memory ring; each slot has
//   "full" mbarriers (K and V apart, so S can start before V lands) and an
//   "empty" mbarrier the consumers release it on;
// - two consumer warpgroups of 64 query rows each. Within a warpgroup,
//   S(j) = Q K(j)^T is issued before O += P(j-1) V(j-1), and the softmax of
//   tile j runs while that product is in flight.
// setmaxnreg gives the producer's registers to the consumers.
//
// A branch's kept rows are a strided row set (stride r rows). The tensor maps
// see the (B, N) positions of q/k/v flattened to P = b N + pos and split as
// P = o + r j: dims (d, head, o < r, j < J), so the rows of one (batch, head,
// segment) are the box at (0, h, o, j0 + t). J = floor(B N / r) keeps every
// address the map can form inside the tensor; the few tail rows past J (the
// last r - 1 positions) are gathered by the producer warp with plain loads.
#include <cudaTypedefs.h>

#include "cuda/dilated_attention_mma.cuh"
#include "cuda/dilated_attention_tiles.cuh"
#include "cuda/hopper.cuh"
#include "cuda/runtime.h"
#include "cuda/wgmma.cuh"

namespace minidl::cuda::attn {
namespace {

constexpr int D = 64;
constexpr int kBr = 128;  // query rows per block: two consumer warpgroups x 64
constexpr int kBc = 128;  // keys per tile: S is one m64n128 accumulator per warpgroup
constexpr int kStages = 4;  // K/V ring depth: the producer runs up to three tiles ahead
constexpr int kThreads = 3 * 128;
constexpr int kProducerRegs = 56, kConsumerRegs = 224;  // 128 * 56 + 256 * 224 <= 64K
constexpr int kConsumerWarps = 8;

using QTile = SmemTile<kBr, D>;
using KTile = SmemTile<kBc, D>;

struct Smem {
  static constexpr int kQ = 0;
  static constexpr int kK = kQ + QTile::kBytes;
  static constexpr int kV = kK + kStages * KTile::kBytes;
  static constexpr int kBars = kV + kStages * KTile::kBytes;
  static constexpr int kNumBars = 1 + 3 * kStages;  // q_full, k_full[], v_full[], empty[]
  // TMA's and wgmma's 128-byte swizzle repeats every 1024 bytes of absolute
  // address: tiles start on a 1024-byte boundary, hence the slack.
  static constexpr int kBytes = kBars + kNumBars * 8 + 1024;
};

struct WsParams {
  BranchGrid g;
  Operand<BFloat16> q, k, v;  // for the tail rows the maps cannot reach
  int64_t map_rows;           // J
  float scale_log2;
  float *o_acc, *lse;
  BFloat16* out;
};

// Loads rows [t_first, t_first + kRows) of a row set into a swizzled tile and
// completes `bar`: one TMA box when the map reaches every valid row, else the
// warp gathers the rows (zeros past the row set) and arrives itself.
template <int kRows>
__device__ __forceinline__ void load_rows(char* dst, const CUtensorMap* map, const Operand<BFloat16>& x,
                                          uint64_t* bar, const WsParams& p, int64_t batch, int64_t head,
                                          const RowSet& rows, int o, int64_t j0, int64_t t_first) {
  using Tile = SmemTile<kRows, D>;
  const int lane = threadIdx.x % 32;
  const int64_t t_end = min(t_first + kRows, rows.count);
  if (j0 + t_end - 1 < p.map_rows) {
    if (lane == 0) {
      hopper::mbar_arrive_expect_tx(bar, Tile::kBytes);
      hopper::tma_load_4d(dst, map, bar, 0, static_cast<int>(head), o, static_cast<int>(j0 + t_first));
    }
    return;
  }
  for (int i = lane; i < kRows * Tile::kChunks; i += 32) {
    const int r = i / Tile::kChunks, c = i % Tile::kChunks;
    const int64_t t = t_first + r;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (t < rows.count) val = *reinterpret_cast<const uint4*>(x.row(batch, rows.base + t * rows.stride, head) + c * 8);
    *reinterpret_cast<uint4*>(Tile::at(dst, r, c)) = val;
  }
  wgmma::fence_proxy_async();  // ordinary stores, read next by wgmma (async proxy)
  __syncwarp();
  if (lane == 0) hopper::mbar_arrive(bar);
}

// The online-softmax step of one tile for a lane's two rows: masks S, updates
// m and l, and returns P as bf16 A fragments and the factor that rescales O.
template <bool kCausal>
__device__ __forceinline__ void softmax_tile(float (&s)[64], uint32_t (&pf)[kBc / 16][4], float (&corr)[2],
                                             float (&m_row)[2], float (&l_row)[2], int64_t k0, int64_t q_row0,
                                             int64_t group_row0, int64_t count, float scale_log2) {
  const int lane = threadIdx.x % 32;
  // s[4c + e]: key 8c + 2 (lane % 4) + (e & 1) of the tile, row q_row0 + 8 (e >> 1). Only
  // the tiles at the end of the row set or on the causal diagonal need a mask,
  // computed in 32-bit from offsets clamped to the tile.
  if (k0 + kBc > count || (kCausal && k0 + kBc - 1 > group_row0)) {
    const int64_t left = count - k0, ahead = q_row0 - k0;
    const int limit = left < kBc ? static_cast<int>(left) : kBc;
    // key col > diag (+ 8 for the lane's second row) is in the row's future
    const int diag = ahead > kBc ? kBc : ahead < -16 ? -16 : static_cast<int>(ahead);
#pragma unroll
    for (int i = 0; i < 64; ++i) {
      const int col = (i / 4) * 8 + 2 * (lane % 4) + (i & 1);
      if (col >= limit || (kCausal && col > diag + ((i >> 1) & 1) * 8)) s[i] = -INFINITY;
    }
  }
  float m_scaled[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m_row[r];
#pragma unroll
    for (int c = 0; c < kBc / 8; ++c) mx = fmaxf(mx, fmaxf(s[4 * c + 2 * r], s[4 * c + 2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // A row with nothing visible yet keeps m = -inf; use 0 so p = 0, not NaN.
    m_scaled[r] = mx == -INFINITY ? 0.f : mx * scale_log2;
    corr[r] = exp2f(m_row[r] * scale_log2 - m_scaled[r]);
    m_row[r] = mx;
    l_row[r] *= corr[r];
  }
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) {
    float p[2][4];
#pragma unroll
    for (int c = 0; c < 2; ++c)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        p[c][e] = exp2f(fmaf(s[4 * (2 * kk + c) + e], scale_log2, -m_scaled[e >> 1]));
        l_row[e >> 1] += p[c][e];
      }
    pf[kk][0] = mma::pack_bf16(p[0][0], p[0][1]);
    pf[kk][1] = mma::pack_bf16(p[0][2], p[0][3]);
    pf[kk][2] = mma::pack_bf16(p[1][0], p[1][1]);
    pf[kk][3] = mma::pack_bf16(p[1][2], p[1][3]);
  }
}

__device__ __forceinline__ void issue_s(float (&s)[64], const char* q_tile, const char* k_tile) {
  wgmma::fence();
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    const uint64_t da = wgmma::desc_sw128(q_tile + ks * 32), db = wgmma::desc_sw128(k_tile + ks * 32);
    if (ks == 0) wgmma::mma_64x128x16_ss<false>(s, da, db);
    else wgmma::mma_64x128x16_ss<true>(s, da, db);
  }
  wgmma::commit();
}

__device__ __forceinline__ void issue_pv(float (&o)[32], const uint32_t (&pf)[kBc / 16][4], const char* v_tile) {
  wgmma::fence();
#pragma unroll
  for (int kk = 0; kk < kBc / 16; ++kk) wgmma::mma_64x64x16_rs_mn(o, pf[kk], wgmma::desc_sw128(v_tile + kk * 16 * 128));
  wgmma::commit();
}

template <bool kCausal, MergeMode kMode>
__global__ __launch_bounds__(kThreads, 1) void forward_ws_kernel(const __grid_constant__ CUtensorMap qmap,
                                                                 const __grid_constant__ CUtensorMap kmap,
                                                                 const __grid_constant__ CUtensorMap vmap,
                                                                 const WsParams p) {
  extern __shared__ __align__(128) char smem_raw[];
  char* smem = smem_raw + ((1024 - (mma::smem_addr(smem_raw) & 1023)) & 1023);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + Smem::kBars);
  uint64_t* q_full = bars;
  uint64_t* k_full = bars + 1;
  uint64_t* v_full = bars + 1 + kStages;
  uint64_t* empty = bars + 1 + 2 * kStages;

  const BranchGrid& g = p.g;
  const int64_t bh = blockIdx.y;
  const int64_t batch = bh / g.heads, head = bh % g.heads;
  const int64_t segment = blockIdx.x / g.tiles_per_segment;
  // Heaviest (latest) causal tiles first, for a better tail.
  const int64_t tile = g.tiles_per_segment - 1 - blockIdx.x % g.tiles_per_segment;
  const RowSet rows = kept_rows(g.n, g.w, g.r, head, segment);
  const int64_t t0 = tile * kBr;
  if (t0 >= rows.count) return;  // uniform across the block
  const int64_t key_end = kCausal ? min(t0 + kBr, rows.count) : rows.count;
  const int n_tiles = static_cast<int>((key_end + kBc - 1) / kBc);

  if (threadIdx.x == 0) {
    hopper::mbar_init(q_full, 1);
    for (int s = 0; s < kStages; ++s) {
      hopper::mbar_init(&k_full[s], 1);
      hopper::mbar_init(&v_full[s], 1);
      hopper::mbar_init(&empty[s], kConsumerWarps);
    }
    hopper::mbar_fence_init();
  }
  __syncthreads();

  const int warpgroup = threadIdx.x / 128;
  if (warpgroup == 0) {  // producer
    hopper::regs_dec<kProducerRegs>();
    if (threadIdx.x >= 32) return;
    const int64_t first = batch * g.n + rows.base;  // flattened position of row t = 0
    const int o = static_cast<int>(first % g.r);
    const int64_t j0 = first / g.r;
    load_rows<kBr>(smem + Smem::kQ, &qmap, p.q, q_full, p, batch, head, rows, o, j0, t0);
    for (int j = 0; j < n_tiles; ++j) {
      const int s = j % kStages;
      hopper::mbar_wait(&empty[s], ((j / kStages) & 1) ^ 1);
      load_rows<kBc>(smem + Smem::kK + s * KTile::kBytes, &kmap, p.k, &k_full[s], p, batch, head, rows, o, j0,
                     int64_t(j) * kBc);
      load_rows<kBc>(smem + Smem::kV + s * KTile::kBytes, &vmap, p.v, &v_full[s], p, batch, head, rows, o, j0,
                     int64_t(j) * kBc);
    }
    return;
  }

  hopper::regs_inc<kConsumerRegs>();
  const int consumer = warpgroup - 1;
  const int warp = (threadIdx.x / 32) % 4, lane = threadIdx.x % 32;
  const int64_t group_row0 = t0 + consumer * 64;
  const int64_t q_row0 = group_row0 + warp * 16 + lane / 4;  // this lane's rows: q_row0, q_row0 + 8
  const char* q_tile = smem + Smem::kQ + consumer * 64 * 128;
  auto k_tile = [&](int s) { return smem + Smem::kK + s * KTile::kBytes; };
  auto v_tile = [&](int s) { return smem + Smem::kV + s * KTile::kBytes; };

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float(&o_flat)[32] = reinterpret_cast<float(&)[32]>(o);
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.f, 0.f};
  float s[64], corr[2];
  uint32_t pf[kBc / 16][4];

  hopper::mbar_wait(q_full, 0);
  hopper::mbar_wait(&k_full[0], 0);
  issue_s(s, q_tile, k_tile(0));
  wgmma::wait<0>();
  wgmma::fence_operands(s);
  softmax_tile<kCausal>(s, pf, corr, m_row, l_row, 0, q_row0, group_row0, rows.count, p.scale_log2);

  // Tile j: S(j) and O += P(j-1) V(j-1) in flight together, then softmax(j)
  // into the other P buffer. The loop is unrolled by two so that the buffers
  // swap roles without a register copy (a copy into a wgmma operand makes
  // ptxas serialise the wgmma: warning C7513).
  auto step = [&](int j, const uint32_t(&p_in)[kBc / 16][4], uint32_t(&p_out)[kBc / 16][4]) {
    const int sj = j % kStages, sp = (j - 1) % kStages;
    hopper::mbar_wait(&k_full[sj], (j / kStages) & 1);
    issue_s(s, q_tile, k_tile(sj));
    hopper::mbar_wait(&v_full[sp], ((j - 1) / kStages) & 1);
    issue_pv(o_flat, p_in, v_tile(sp));
    wgmma::wait<1>();
    wgmma::fence_operands(s);
    softmax_tile<kCausal>(s, p_out, corr, m_row, l_row, int64_t(j) * kBc, q_row0, group_row0, rows.count,
                          p.scale_log2);
    wgmma::wait<0>();
    wgmma::fence_operands(o_flat);
    if (lane == 0) hopper::mbar_arrive(&empty[sp]);  // K(j-1), V(j-1) read
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      o[dt][0] *= corr[0];
      o[dt][1] *= corr[0];
      o[dt][2] *= corr[1];
      o[dt][3] *= corr[1];
    }
  };
  // The last tile: O += P V.
  auto finish = [&](const uint32_t(&p_last)[kBc / 16][4]) {
    const int sl = (n_tiles - 1) % kStages;
    hopper::mbar_wait(&v_full[sl], ((n_tiles - 1) / kStages) & 1);
    issue_pv(o_flat, p_last, v_tile(sl));
    wgmma::wait<0>();
    wgmma::fence_operands(o_flat);
    if (lane == 0) hopper::mbar_arrive(&empty[sl]);
  };
  uint32_t pn[kBc / 16][4];
  int j = 1;
  for (; j + 1 < n_tiles; j += 2) {
    step(j, pf, pn);
    step(j + 1, pn, pf);
  }
  if (j < n_tiles) {
    step(j, pf, pn);
    finish(pn);
  } else {
    finish(pf);
  }
  store_branch_rows<D, kMode>(o, m_row, l_row, q_row0, p.scale_log2, g, batch, head, rows, p.o_acc, p.lse, p.out);
}

// ---- host side ----

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    MINIDL_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found));
    MINIDL_CHECK(found == cudaDriverEntryPointSuccess && f,
                 "dilated_attention (cuda): the driver has no cuTensorMapEncodeTiled");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// The (d, head, o, j) map of one operand for dilation r (see the top comment).
CUtensorMap rows_map(const Operand<BFloat16>& x, int64_t heads, int64_t r, int64_t map_rows, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[4] = {D, cuuint64_t(heads), cuuint64_t(r), cuuint64_t(map_rows)};
  const cuuint64_t strides[3] = {cuuint64_t(x.sh) * 2, cuuint64_t(x.sn) * 2, cuuint64_t(r * x.sn) * 2};
  const cuuint32_t box[4] = {D, 1, 1, cuuint32_t(box_rows)};
  const cuuint32_t elem[4] = {1, 1, 1, 1};
  CUresult res = encode_tiled()(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, const_cast<BFloat16*>(x.ptr), dims,
                                strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  MINIDL_CHECK(res == CUDA_SUCCESS, "dilated_attention (cuda): cuTensorMapEncodeTiled failed (", int(res), ")");
  return map;
}

template <bool kCausal, MergeMode kMode>
void launch(const WsParams& p, const CUtensorMap& qm, const CUtensorMap& km, const CUtensorMap& vm, int64_t batch) {
  auto kernel = forward_ws_kernel<kCausal, kMode>;
  static bool configured = false;  // one attribute call per instantiation
  if (!configured) {
    MINIDL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Smem::kBytes));
    configured = true;
  }
  dim3 grid(static_cast<unsigned>(p.g.segments * p.g.tiles_per_segment), static_cast<unsigned>(batch * p.g.heads));
  kernel<<<grid, kThreads, Smem::kBytes, stream()>>>(qm, km, vm, p);
  MINIDL_CUDA_LAUNCH_CHECK();
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool ws_takes(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v, const BranchGrid& g,
              int64_t batch) {
  for (const Operand<BFloat16>* x : {&q, &k, &v})
    if (x->sb != g.n * x->sn || x->sh % 8 != 0 || x->sn % 8 != 0 || !aligned16(x->ptr)) return false;
  return batch * g.n < (int64_t(1) << 31) && g.heads < (int64_t(1) << 31);
}

void forward_ws(const Operand<BFloat16>& q, const Operand<BFloat16>& k, const Operand<BFloat16>& v, const BranchGrid& g,
                int64_t batch, bool causal, float scale_log2, MergeMode mode, float* o_acc, float* lse, BFloat16* out) {
  WsParams p{g, q, k, v, 0, scale_log2, o_acc, lse, out};
  p.g.tiles_per_segment = ((g.w + g.r - 1) / g.r + kBr - 1) / kBr;
  p.map_rows = batch * g.n / g.r;
  if (p.map_rows == 0) p.map_rows = 1;  // a map needs one row; the tail path loads everything then
  const CUtensorMap qm = rows_map(q, g.heads, g.r, p.map_rows, kBr);
  const CUtensorMap km = rows_map(k, g.heads, g.r, p.map_rows, kBc);
  const CUtensorMap vm = rows_map(v, g.heads, g.r, p.map_rows, kBc);
  auto run = [&](auto causal_tag) {
    constexpr bool kCausal = decltype(causal_tag)::value;
    switch (mode) {
      case MergeMode::kWrite: return launch<kCausal, MergeMode::kWrite>(p, qm, km, vm, batch);
      case MergeMode::kMerge: return launch<kCausal, MergeMode::kMerge>(p, qm, km, vm, batch);
      case MergeMode::kSingle: return launch<kCausal, MergeMode::kSingle>(p, qm, km, vm, batch);
    }
  };
  if (causal) run(std::true_type{});
  else run(std::false_type{});
}

}  // namespace minidl::cuda::attn
