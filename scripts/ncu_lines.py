#!/usr/bin/env python3
"""Where a kernel's warps stall, by how often each SASS line runs.

Reads ncu's source page of one profiled kernel as CSV and groups its lines
by execution count: lines that run equally often belong to the same level of
the code (once per tile and warp, once per work item and warp, the producer's
per-tile loop, ...), so each group shows what a level costs. Prints the
kernel's stall reasons, the groups that hold the most samples (their share,
their instruction count and top stall reasons), then the busiest lines.
docs/kernel-notes.md ("Session 16", "Session 17") reads the ws kernels so.

Producing the CSV (on the GPU machine; the report itself is large):

  ncu --section SourceCounters --section WarpStateStats -k regex:backward_ws \\
      --launch-skip 3 --launch-count 1 -o rep build/bench/bench_attention \\
      --benchmark_filter='dilated_fwd_bwd:ws/1048576/' --benchmark_min_time=0.01
  ncu -i rep.ncu-rep --page source --csv --print-source sass > lines.csv
  python3 scripts/ncu_lines.py lines.csv [--groups 10] [--lines 30]
"""
import argparse
import collections
import csv
import signal
import sys

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"


def number(text):
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", help="ncu --page source --csv --print-source sass output of one kernel")
    ap.add_argument("--groups", type=int, default=10, help="execution-count groups to show (default 10)")
    ap.add_argument("--lines", type=int, default=30, help="busiest lines to show (default 30)")
    opts = ap.parse_args()

    with open(opts.csv, newline="") as f:
        table = list(csv.reader(f))
    # Line 1 names the kernel, line 2 holds the column names.
    header_at = next((i for i, row in enumerate(table) if SAMPLES in row), None)
    if header_at is None:
        sys.exit(f"ncu_lines: no '{SAMPLES}' column in {opts.csv} (profile with --section SourceCounters)")
    if header_at > 0 and len(table[0]) > 1:
        print(table[0][1])
    header, rows = table[header_at], table[header_at + 1:]
    col = {name: i for i, name in enumerate(header)}
    stalls = [name for name in header if name.startswith("stall_") and "Not" not in name]
    total = sum(number(row[col[SAMPLES]]) for row in rows)
    if total == 0:
        sys.exit("ncu_lines: no stall samples")
    pct = lambda x: 100.0 * x / total

    by_reason = collections.Counter()
    groups = collections.defaultdict(lambda: [0.0, 0, collections.Counter()])
    for row in rows:
        samples = number(row[col[SAMPLES]])
        group = groups[int(number(row[col[EXECUTED]]))]
        group[0] += samples
        group[1] += 1
        for name in stalls:
            by_reason[name] += number(row[col[name]])
            group[2][name] += number(row[col[name]])

    def top(counter, n):
        return ", ".join(f"{name[6:]} {pct(value):.1f}" for name, value in counter.most_common(n))

    print(f"{total:,.0f} samples; stalls (% of samples): {top(by_reason, 8)}")
    print("\nlines grouped by execution count:")
    for executed, (samples, count, reasons) in sorted(groups.items(), key=lambda kv: -kv[1][0])[: opts.groups]:
        print(f"  {executed:>12,d} runs  {pct(samples):5.1f}%  {count:5d} instr  {top(reasons, 3)}")
    print("\nbusiest lines:")
    for row in sorted(rows, key=lambda r: -number(r[col[SAMPLES]]))[: opts.lines]:
        reasons = collections.Counter({name: number(row[col[name]]) for name in stalls})
        print(f"  {pct(number(row[col[SAMPLES]])):5.2f}%  {int(number(row[col[EXECUTED]])):>12,d} runs  "
              f"{row[col['Source']].strip()[:64]:64s}  {top(reasons, 2)}")


if __name__ == "__main__":
    main()
