#!/usr/bin/env python3
"""Where ptxas put the wgmma waits in the attention kernels.

For each kernel of a binary or object file whose name matches a pattern,
prints its SASS size, registers at launch (setmaxnreg moves them at run
time) and stack, the local-memory accesses (spills: LDL, STL) inside the
innermost loops that hold a wgmma (the consumers' tile loops, where a spill
costs every tile; the producer's and once-per-item code lie outside), the
integer divisions there (each one's reciprocal, I2F.*.RP: ptxas inlines a
32-bit fast path of ~20 instructions and calls a 64-bit routine beside it,
per tile; docs/kernel-notes.md, session 37), and its wait map: the
WARPGROUP.DEPBAR instructions in layout order, each as "E>n", E the
MUFU.EX2 instructions laid out since the previous one and n the groups the
wait leaves in flight. The source places each wait after the exponentials
that are meant to run under a product; a wait that ptxas moved above them
shows as a small E (docs/kernel-notes.md, "Session 16").

Needs cuobjdump (the CUDA toolkit's, or NVIDIA's nvidia-cuda-cuobjdump
wheel); no GPU.

  python3 scripts/sass_waits.py build/bench/bench_attention [--kernels REGEX]
"""
import argparse
import re
import shutil
import signal
import subprocess
import sys


def cuobjdump(args, path):
    tool = shutil.which("cuobjdump") or "/usr/local/cuda/bin/cuobjdump"
    try:
        return subprocess.run([tool, *args, path], check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        sys.exit(f"sass_waits: cuobjdump failed on {path}: {e}")


def demangled_template(name):
    """The kernel's name and template arguments, short: forward_ws_kernel<64,1,3,0>."""
    m = re.search(r"([A-Za-z_]+_kernel)I(.*?)EEv", name)
    if not m:
        return name
    args = re.findall(r"L[ib](\d+)E|LNS\w*?E(\d+)E", m.group(2))
    return f"{m.group(1)}<{','.join(a or b for a, b in args)}>"


def tile_loops(lines):
    """Indices of the lines inside the innermost loops that hold a wgmma: the
    consumers' tile loops. A loop is a backward branch's range without an
    EXIT: ptxas lays slow paths (mbarrier waits) out past the kernel's exits,
    and their branches back are not loops."""
    where = {}
    for i, line in enumerate(lines):
        where[int(re.match(r"\s+/\*([0-9a-f]+)\*/", line).group(1), 16)] = i
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA (?:\S+ )?0x([0-9a-f]+)", line)
        a = where.get(int(m.group(1), 16), i) if m else i
        if a < i and not any("EXIT" in lines[j] for j in range(a, i)):
            loops.append((a, i))
    with_products = [(a, b) for a, b in loops if any("HGMMA" in lines[i] for i in range(a, b + 1))]
    inner = [(a, b) for a, b in with_products if not any(a <= c and d <= b and (c, d) != (a, b) for c, d in with_products)]
    return sorted({i for a, b in inner for i in range(a, b + 1)})


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # quiet when piped into head
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="an executable, library or object file with sm_90a code")
    ap.add_argument("--kernels", default=r"_ws_kernel", help="regex on the mangled kernel names (default: the ws kernels)")
    opts = ap.parse_args()
    pattern = re.compile(opts.kernels)

    usage = {}
    current = None
    for line in cuobjdump(["--dump-resource-usage"], opts.file).splitlines():
        m = re.search(r"Function (\S+):", line)
        if m:
            current = m.group(1)
            continue
        if current and "REG:" in line:
            fields = dict(re.findall(r"(REG|STACK):(\d+)", line))
            usage[current] = (fields.get("REG", "?"), fields.get("STACK", "?"))
            current = None

    kernels = {}
    current = None
    for line in cuobjdump(["-sass"], opts.file).splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            current = m.group(1) if pattern.search(m.group(1)) else None
            if current:
                kernels[current] = []
            continue
        if current and re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            kernels[current].append(line)

    if not kernels:
        sys.exit(f"sass_waits: no kernel matching {opts.kernels!r} in {opts.file}")
    for name in sorted(kernels, key=demangled_template):
        exps, waits = 0, []
        loops = tile_loops(kernels[name])
        local = sum(1 for i in loops if re.search(r"\b(LDL|STL)\b", kernels[name][i]))
        divs = sum(1 for i in loops if re.search(r"\bI2F\.U(32|64)\.RP\b", kernels[name][i]))
        for line in kernels[name]:
            if "MUFU.EX2" in line:
                exps += 1
            m = re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)", line)
            if m:
                waits.append(f"{exps}>{int(m.group(1), 16)}")
                exps = 0
        regs, stack = usage.get(name, ("?", "?"))
        print(f"{demangled_template(name):34} {len(kernels[name]):6} instr  reg {regs:>3}  stack {stack:>3}  "
              f"local {local:>3}  div {divs:>2}  waits {' '.join(waits)}")


if __name__ == "__main__":
    main()
