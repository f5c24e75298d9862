"""PyTorch anchor for bench_attention: the same problems through SDPA.

Dense: F.scaled_dot_product_attention(is_causal=True), and without the mask
for bench_attention's dense _noncausal problems. Segments: the same on
the 1M problem's dilation-1 branch alone (512 causal attentions of 2048 rows
per head, as a batch: no gather), the kernel-against-kernel anchor of
bench_attention's segments_* problems. Dilated: per branch,
gather the kept rows of each head-offset group with strided slicing, run
flash attention per segment (segments as batch), and merge branches by their
log-sum-exp (LongNet's rule; weights detached, as in torchscale).

The fwd+bwd timings clear q, k and v's gradients in each call (they stand for
a layer's activations: no accumulation pass), as bench_attention does; the
forward timings run under no_grad. "dilated N: kernels only" times the four
branches' SDPA calls on tensors already in the gathered layout ((N/w, H, w/r,
D) each, w/r = 2048 for every branch): what the composition's kernels cost
without its gathers, scatters and merge, the kernel-against-kernel anchor of
the dilated rows; "dilated not causal" times the same calls without the mask,
the anchor of the dilated_noncausal rows.

SDPA picks its backend per call (cuDNN's fused flash kernels, FlashAttention-2
or the memory-efficient kernel); each SDPA row names the one it picked, and
"only" rows time the same call with SDPA held to FlashAttention-2 and to
cuDNN in turn, so that minidl stands beside each vendor kernel by name.

Timed as bench_attention times minidl (Google Benchmark, --benchmark_min_time
0.2 --benchmark_repetitions 3): calls back to back, each followed by a
synchronize, for at least 0.2 s, three times; prints the median of the three
means in milliseconds. A few calls with idle gaps between them (this script
before session 17) ran SDPA on the dense problems 1-8% faster than a
sustained loop, on the same card in the same call (docs/BENCHMARKS.md). Not
part of the build.
  python3 bench/pytorch/attention_baseline.py
"""
import math
import time
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

H, D = 8, 64
SEGMENTS, DILATIONS = [2048, 4096, 8192, 16384], [1, 2, 4, 8]


def timed(fn, min_time=0.2, repetitions=3):
    fn()  # warm-up
    torch.cuda.synchronize()
    means = []
    for _ in range(repetitions):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            torch.cuda.synchronize()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        means.append(1e3 * elapsed / calls)
    return sorted(means)[len(means) // 2]


def cleared(*tensors):
    """Drops the gradients of tensors (a fresh backward writes them, no accumulation)."""
    for t in tensors:
        t.grad = None


def picked(q, k, v, dropout_p=0.0, causal=True):
    """The backend SDPA picks for a call on q, k, v ('?' where this PyTorch does not say)."""
    try:
        names = {int(b): name for name, b in SDPBackend.__members__.items()}
        return names.get(int(torch._fused_sdp_choice(q, k, v, dropout_p=dropout_p, is_causal=causal)), "?")
    except (AttributeError, RuntimeError, TypeError):
        return "?"


def by_backend(label, fn):
    """Prints fn's time with SDPA held to FlashAttention-2, then to cuDNN."""
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        try:
            with sdpa_kernel([backend]):
                print(f"  {label}, {backend.name} only: {timed(fn):.2f} ms")
        except RuntimeError as e:  # the backend does not take the call
            print(f"  {label}, {backend.name} only: not taken ({str(e).splitlines()[0][:100]})")


def flash(q, k, v):
    # (batch, heads, rows, D) -> out, lse (batch, heads, rows)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True)[:2]
    return out, lse


def dilated(q, k, v):
    b, n, h, d = q.shape
    outs = []
    for w, r in zip(SEGMENTS, DILATIONS):
        w = min(w, n)
        assert n % w == 0 and w % r == 0, "anchor assumes divisible sizes"
        s = n // w
        # r = 1 writes every row; the others leave the rows they skip at zero.
        o_b = (torch.empty if r == 1 else torch.zeros)(b, n, h, d, device=q.device, dtype=q.dtype)
        l_b = torch.full((b, n, h), -math.inf, device=q.device)
        for off in range(r):
            heads = list(range(off, h, r))
            def pick(x):
                x = x.view(b, s, w, h, d)[:, :, off::r][:, :, :, heads]
                return x.reshape(b * s, w // r, len(heads), d).transpose(1, 2)
            o, l = flash(pick(q), pick(k), pick(v))
            o = o.transpose(1, 2).reshape(b, s, w // r, len(heads), d)
            l = l.transpose(1, 2).reshape(b, s, w // r, len(heads))
            ob = o_b.view(b, s, w, h, d)
            lb = l_b.view(b, s, w, h)
            ob[:, :, off::r, heads] = o
            lb[:, :, off::r, heads] = l
        outs.append((o_b, l_b))
    lse_total = torch.logsumexp(torch.stack([l for _, l in outs]), dim=0)
    weights = [torch.exp(l - lse_total).nan_to_num(0.0).detach() for _, l in outs]
    terms = [o.float() * wt.unsqueeze(-1) for (o, _), wt in zip(outs, weights)]
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total.to(q.dtype)


def main():
    torch.manual_seed(0)
    dev = "cuda"
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")

    def sdpa_rows(label, batch, rows, d, dropout=False, causal=True):
        """SDPA's fwd and fwd+bwd on (batch, H, rows, d): as SDPA picks, then per backend."""
        q, k, v = (torch.randn(batch, H, rows, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)

        def fwd():
            with torch.no_grad():
                F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def both(p=0.0):
            cleared(q, k, v)
            F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=causal).backward(g)

        print(f"{label}: fwd {timed(fwd):.2f} ms, fwd+bwd {timed(both):.2f} ms "
              f"(SDPA picks {picked(q, k, v, causal=causal)})")
        by_backend(f"{label} fwd", fwd)
        by_backend(f"{label} fwd+bwd", both)
        if dropout:  # attention dropout as the char-LM recipe trains (bench_attention's _drop problems)
            print(f"{label} dropout 0.2: fwd+bwd {timed(lambda: both(0.2)):.2f} ms "
                  f"(SDPA picks {picked(q, k, v, dropout_p=0.2)})")
            by_backend(f"{label} dropout 0.2 fwd+bwd", lambda: both(0.2))

    sdpa_rows("dense causal N=32768 D=64", 1, 32768, 64, dropout=True)
    sdpa_rows("dense causal N=16384 D=128", 1, 16384, 128)
    sdpa_rows("dense not causal N=32768 D=64", 1, 32768, 64, causal=False)
    sdpa_rows("dense not causal N=16384 D=128", 1, 16384, 128, causal=False)
    n, w = 1 << 20, SEGMENTS[0]
    sdpa_rows(f"segments N={n} w={w} (dilation-1 branch)", n // w, w, D)
    for n in [131072, 1 << 20]:
        q, k, v = (torch.randn(1, n, H, D, device=dev, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = torch.randn_like(q)
        with torch.no_grad():
            fwd = timed(lambda: dilated(q, k, v))
        both = timed(lambda: (cleared(q, k, v), dilated(q, k, v).backward(g)))
        print(f"dilated N={n}: fwd {fwd:.2f} ms, fwd+bwd {both:.2f} ms")
        del q, k, v, g
        # The same branches' kernels alone, on inputs already gathered.
        branches = [tuple(torch.randn(n // w, H, w // r, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
                          for _ in range(4)) for w, r in zip(SEGMENTS, DILATIONS)]  # q, k, v, grad
        def kernels_fwd(causal=True):
            with torch.no_grad():
                for q, k, v, _ in branches:
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def kernels_both(causal=True):
            for q, k, v, g in branches:
                cleared(q, k, v)
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(g)

        fwd, both = timed(kernels_fwd), timed(kernels_both)
        print(f"dilated N={n} kernels only (SDPA per branch on gathered rows): fwd {fwd:.2f} ms, fwd+bwd {both:.2f} ms")
        by_backend(f"dilated N={n} kernels only fwd", kernels_fwd)
        by_backend(f"dilated N={n} kernels only fwd+bwd", kernels_both)
        # bench_attention's dilated_noncausal problems (LongNet as an encoder), kernels only.
        fwd, both = timed(lambda: kernels_fwd(False)), timed(lambda: kernels_both(False))
        print(f"dilated not causal N={n} kernels only: fwd {fwd:.2f} ms, fwd+bwd {both:.2f} ms")
        del branches


if __name__ == "__main__":
    main()
