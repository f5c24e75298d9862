"""PyTorch anchor for the char-LM training step: nanoGPT's shakespeare_char
model and recipe (6 layers, 6 heads, width 384, context 256, batch 64,
dropout 0.2, AdamW lr 1e-3 betas (0.9, 0.99) weight decay 0.1 on matrices,
grad clip 1.0), timed in eager mode and under torch.compile, with bf16
autocast or in float32. Batches are random windows of random tokens drawn on
the device (the step's speed does not depend on the text). Prints tokens/s
per configuration: the median over timed windows of --steps steps, after
warm-up. Not part of the build.
  python3 bench/pytorch/charlm_baseline.py [--context 256 --batch 64 --dropout 0.2]
      [--modes eager,compile] [--dtypes bfloat16,float32] [--steps 50]
"""
import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, width, heads, dropout):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln_1, self.ln_2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.c_attn, self.c_proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.fc, self.proj = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        x = x + self.drop(self.c_proj(y.transpose(1, 2).reshape(b, t, c)))
        return x + self.drop(self.proj(F.gelu(self.fc(self.ln_2(x)), approximate="tanh")))


class GPT(nn.Module):
    def __init__(self, vocab, context, layers, heads, width, dropout):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.h = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("c_proj.weight", "proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.drop(self.wte(idx) + self.wpe(torch.arange(t, device=idx.device)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


def run(args, mode, dtype):
    torch.manual_seed(1337)
    dev = "cuda"
    model = GPT(65, args.context, args.layers, args.heads, args.width, args.dropout).to(dev)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99), fused=True)
    data = torch.randint(0, 65, (1 << 20,), device=dev)

    def batch():
        starts = torch.randint(0, data.numel() - args.context - 1, (args.batch,), device=dev)
        rows = starts[:, None] + torch.arange(args.context + 1, device=dev)
        w = data[rows]
        return w[:, :-1], w[:, 1:]

    def step(x, y):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    if mode == "compile":
        step = torch.compile(step)
    for _ in range(10):  # warm-up (and compilation)
        step(*batch())
    torch.cuda.synchronize()
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step(*batch())
        torch.cuda.synchronize()
        rates.append(args.steps * args.batch * args.context / (time.perf_counter() - t0))
    rate = sorted(rates)[len(rates) // 2]
    print(f"pytorch {mode:7s} {dtype:8s} context {args.context} batch {args.batch} dropout {args.dropout}: "
          f"{rate / 1e6:.3f} M tok/s (loss {loss.item():.3f})", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=6)
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--dropout", type=float, default=0.2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--modes", default="eager,compile")
    ap.add_argument("--dtypes", default="bfloat16,float32")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()} torch {torch.__version__}")
    for dtype in args.dtypes.split(","):
        for mode in args.modes.split(","):
            run(args, mode, dtype)


if __name__ == "__main__":
    main()
