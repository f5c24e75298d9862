#!/usr/bin/env python3
"""Where a ws attention kernel's items spend their cycles, from its in-kernel timeline.

Reads the records of a build with MINIDL_WS_TRACE=ON (cuda/sm90a/ws_trace.cuh:
thread 0 of each consumer warpgroup of the first blocks marks events with the
SM clock) and splits each item's cycles into the spans between consecutive
marks. A tile's spans are put in one of three classes: its item's first tile,
its last, or a middle one; the middle tiles give the steady cost per tile, and
what an item costs beyond n_tiles of those is its overhead.

  MINIDL_WS_TRACE=/tmp/t build/bench/bench_attention --benchmark_filter=...
  python3 scripts/ws_timeline.py /tmp/t_bwd.bin [--skip 2]

--skip drops each warpgroup's first items (the pipeline's fill).
"""
import argparse
import collections
import signal
import struct
import sys

BLOCKS, WARPGROUPS, CAP = 8, 2, 16384

NAMES = {
    "fwd": {1: "item", 2: "S(0) done", 3: "softmax(0) done", 4: "step", 5: "S(j) done",
            6: "softmax(j) done", 7: "step end", 8: "finish", 9: "last PV done", 10: "stored"},
    "bwd": {1: "item", 2: "tile", 3: "S^T,dP^T done", 4: "dS^T stored", 5: "dS^T barrier",
            6: "dQ done", 7: "tile end", 8: "next issued", 9: "dK,dV stored"},
}


def records(path):
    data = open(path, "rb").read()
    words = struct.unpack(f"<{len(data) // 8}Q", data)
    for b in range(BLOCKS):
        for w in range(WARPGROUPS):
            base = (b * WARPGROUPS + w) * CAP
            out = []
            for x in words[base:base + CAP]:
                if x == 0:
                    break
                out.append((x >> 56, (x >> 40) & 0xFFFF, x & ((1 << 40) - 1)))
            if out:
                yield b, w, out


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet under | head
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--skip", type=int, default=2, help="first items of each warpgroup to leave out")
    args = ap.parse_args()
    kind = "fwd" if args.trace.endswith("_fwd.bin") else "bwd"
    names = NAMES[kind]
    spans = collections.Counter()  # (class, from, to) -> cycles
    items = tiles = middle_tiles = 0
    item_cycles = 0
    for _, _, recs in records(args.trace):
        # Split into items at each "item" mark; the last item has no end mark: dropped.
        starts = [i for i, r in enumerate(recs) if r[0] == 1]
        for k, (s, e) in enumerate(zip(starts, starts[1:])):
            if k < args.skip:
                continue
            n = recs[s][1]
            items += 1
            tiles += n
            middle_tiles += max(n - 2, 0)
            item_cycles += recs[e][2] - recs[s][2]
            for a, b in zip(recs[s:e], recs[s + 1:e + 1]):
                j = a[1] if a[0] not in (1, 8, 9, 10) else -1
                cls = "item" if j < 0 else "first" if j == 0 else "last" if j == n - 1 else "middle"
                spans[(cls, a[0], b[0])] += (b[2] - a[2]) % (1 << 40)
    if not items:
        sys.exit("no complete items in " + args.trace)
    middle = sum(c for (cls, _, _), c in spans.items() if cls == "middle")
    per_tile = middle / middle_tiles if middle_tiles else float("nan")
    print(f"{args.trace}: {items} items, {tiles / items:.2f} tiles each, {item_cycles / items:.0f} cycles per item")
    print(f"steady tile (middle tiles): {per_tile:.0f} cycles; overhead per item beyond n_tiles x that: "
          f"{item_cycles / items - tiles / items * per_tile:.0f} cycles")
    print(f"{'class':7} {'span':40} {'cycles/item':>12} {'cycles/tile':>12}")
    for (cls, a, b), c in sorted(spans.items(), key=lambda kv: -kv[1]):
        count = middle_tiles if cls == "middle" else items
        print(f"{cls:7} {names.get(a, a)!s:>18} -> {names.get(b, b)!s:18} {c / items:12.0f} "
              f"{c / count if count else 0:12.0f}")


if __name__ == "__main__":
    main()
