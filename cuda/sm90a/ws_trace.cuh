// In-kernel timelines of the ws attention kernels, for finding where an item's
// time goes (docs/kernel-notes.md, "Session 18"). Built only with
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

// Host: whether this launch of `kind` is the recorded one (clears the records
// first), and after it, write them out.
bool begin(int kind);
void end(int kind);

}  // namespace minidl::cuda::attn::trace
#define WS_TRACE_STATE int trace_n_ = 0
#define WS_TRACE(kind, event, tile) ::minidl::cuda::attn::trace::mark(kind, consumer, trace_n_, event, tile)
#else
#define WS_TRACE_STATE
#define WS_TRACE(kind, event, tile)
#endif
