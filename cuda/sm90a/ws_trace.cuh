// In-kernel timelines of the ws attention kernels (dilated_attention_ws.cu
// includes this, once), for finding where an item's time goes
// (docs/kernel-notes.md, "Session 18"). Built only with
// -DMINIDL_WS_TRACE=1 (cmake -DMINIDL_WS_TRACE=ON); otherwise every macro here
// is empty and the kernels are unchanged.
//
// Thread 0 of each consumer warpgroup of the first kTraceBlocks blocks records
// (event, tile, SM clock) at marked points. The host records one launch of each
// kernel kind (forward, backward): the MINIDL_WS_TRACE_AT-th (default 3) after
// the process starts, written to $MINIDL_WS_TRACE + "_fwd.bin" / "_bwd.bin" as
// raw uint64 records [block][warpgroup][kTraceCap] (0 ends a list); read by
// scripts/ws_timeline.py. The clock reads change the SASS around them: read
// the timeline for where time goes, not for the kernel's speed.
#pragma once

#include <cstdint>

#if MINIDL_WS_TRACE
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda/runtime.h"

namespace minidl::cuda::attn::trace {

constexpr int kTraceBlocks = 8, kTraceCap = 16384;
// [kind: 0 forward, 1 backward][block][consumer warpgroup][record]
__device__ uint64_t g_records[2][kTraceBlocks][2][kTraceCap];

// A record: event in bits 56..63, tile in 40..55, the SM clock's low 40 bits.
__device__ __forceinline__ void mark(int kind, int consumer, int& n, int event, int tile) {
  if (blockIdx.x < kTraceBlocks && threadIdx.x % 128 == 0 && n < kTraceCap) {
    const uint64_t clk = static_cast<uint64_t>(clock64()) & ((uint64_t(1) << 40) - 1);
    g_records[kind][blockIdx.x][consumer][n++] =
        (uint64_t(event) << 56) | (uint64_t(tile & 0xffff) << 40) | clk;
  }
}

// Host: whether this launch of `kind` is the recorded one (then the records
// are cleared first), and after it, writing them out.
inline bool begin(int kind) {
  static int launches[2] = {0, 0};
  const char* at = std::getenv("MINIDL_WS_TRACE_AT");
  if (!std::getenv("MINIDL_WS_TRACE") || ++launches[kind] != (at ? std::atoi(at) : 3)) return false;
  void* records = nullptr;
  MINIDL_CUDA_CHECK(cudaGetSymbolAddress(&records, g_records));
  MINIDL_CUDA_CHECK(cudaMemsetAsync(records, 0, sizeof(g_records), stream()));
  return true;
}
inline void end(int kind) {
  std::vector<uint64_t> host(sizeof(g_records[kind]) / 8);
  MINIDL_CUDA_CHECK(cudaStreamSynchronize(stream()));
  MINIDL_CUDA_CHECK(cudaMemcpyFromSymbol(host.data(), g_records, sizeof(g_records[kind]), kind * sizeof(g_records[kind])));
  const std::string path = std::string(std::getenv("MINIDL_WS_TRACE")) + (kind == 0 ? "_fwd.bin" : "_bwd.bin");
  std::FILE* f = std::fopen(path.c_str(), "wb");
  MINIDL_CHECK(f != nullptr, "MINIDL_WS_TRACE: cannot write ", path);
  std::fwrite(host.data(), 8, host.size(), f);
  std::fclose(f);
}

}  // namespace minidl::cuda::attn::trace
// WS_TRACE_STATE(wg) starts a consumer warpgroup's record list (wg: its
// index, 0 or 1); WS_TRACE marks a point of it.
#define WS_TRACE_STATE(wg) \
  const int trace_wg_ = (wg); \
  int trace_n_ = 0
#define WS_TRACE(kind, event, tile) ::minidl::cuda::attn::trace::mark(kind, trace_wg_, trace_n_, event, tile)
#else
#define WS_TRACE_STATE(wg)
#define WS_TRACE(kind, event, tile)
#endif
