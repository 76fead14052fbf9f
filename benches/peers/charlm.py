#!/usr/bin/env python3
"""Peer benchmark (issue 24): one training step of a small character-level language model whose
attention is Student-t, on the CPU, ours against the PyTorch a user would write.

The model: embedding (vocabulary 65) + learned positions, width 64, one pre-norm block (H 2
heads of D 32, causal; a 4x MLP with GELU), a final norm and the output projection; cross-entropy
on the next character; Adam. The step (forward, backward, optimiser) is timed on batches of
B 16 x L 128 characters (issue 24's shape). Three variants differ only in the attention:

  ours     fep_kernels.attention(score="student_t", nu=4, causal=True, precision_key=...)
           with a learned per-key precision softplus(k·w + c) (the op's autograd)
  eager    the same Student-t maths in plain PyTorch: d² = ‖q‖² + ‖k‖² − 2 q·k, the score
           −((ν + D)/2) log1p(π d²/ν) + (D/2) ln π, causal mask, softmax, P·V; autograd
  sdpa     torch's scaled_dot_product_attention (Dot, causal): what the step would cost with
           the fastest fused CPU attention PyTorch has, for reference (a different score)

Wall clock, one warm-up, min and median of the repetitions; --threads N sets torch's and our
thread counts. Records: {config, impl, ms, ms_min, reps, threads, ratio_vs_ours}; the target
(issue 24): ours at least as fast as eager (ratio >= 1).

    python3 benches/peers/charlm.py --device cpu --threads 1 --out charlm.json
"""

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import Records, Timer, apply_threads, cpu_device_name, fail_msg, pick_reps  # noqa: E402

VOCAB, WIDTH, HEADS, HEAD_DIM, NU = 65, 64, 2, 32, 4.0
SHAPES = [(16, 128)]
SMOKE_SHAPES = [(2, 16)]


def build(torch, fk, attn, seed):
    nn, F = torch.nn, torch.nn.functional

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(WIDTH), nn.LayerNorm(WIDTH)
            self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
            self.key_prec = nn.Linear(HEAD_DIM, 1)  # per-key precision softplus(k·w + c)
            self.proj = nn.Linear(WIDTH, WIDTH)
            self.mlp = nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Linear(4 * WIDTH, WIDTH))

        def forward(self, x):
            b, l, _ = x.shape
            q, k, v = self.qkv(self.n1(x)).view(b, l, 3, HEADS, HEAD_DIM).permute(2, 0, 3, 1, 4)
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            pk = F.softplus(self.key_prec(k).squeeze(-1)) + 1e-3
            o = attn(q, k, v, pk)
            x = x + self.proj(o.transpose(1, 2).reshape(b, l, WIDTH))
            return x + self.mlp(self.n2(x))

    class CharLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(VOCAB, WIDTH)
            self.pos = nn.Parameter(torch.zeros(1024, WIDTH))
            self.block = Block()
            self.norm = nn.LayerNorm(WIDTH)
            self.out = nn.Linear(WIDTH, VOCAB)

        def forward(self, idx):
            x = self.emb(idx) + self.pos[: idx.shape[1]]
            return self.out(self.norm(self.block(x)))

    torch.manual_seed(seed)
    return CharLM()


def attn_ours(fk):
    def attn(q, k, v, pk):
        return fk.attention(q, k, v, precision_key=pk, score="student_t", nu=NU, causal=True)
    return attn


def attn_eager(torch):
    def attn(q, k, v, pk):
        d = q.shape[-1]
        tau = 1.0
        qq = (q * q).sum(-1, keepdim=True)
        kk = (k * k).sum(-1).unsqueeze(-2)
        d2 = (qq + kk - 2 * q @ k.transpose(-1, -2)).clamp_min(0)
        pi = pk.unsqueeze(-2)
        s = -((NU + d) / 2) * torch.log1p(tau * pi * d2 / NU) + (d / 2) * torch.log(pi)
        lq, lk = q.shape[-2], k.shape[-2]
        mask = torch.ones(lq, lk, dtype=torch.bool).triu(lk - lq + 1)
        s = s.masked_fill(mask, float("-inf"))
        return torch.softmax(s, -1) @ v
    return attn


def attn_sdpa(torch):
    def attn(q, k, v, pk):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return attn


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu"], help="CPU only")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="a tiny shape: a test of the script")
    ap.add_argument("--budget-s", type=float, default=60.0)
    ap.add_argument("--lib", default=None)
    args = ap.parse_args()
    import torch

    import fep_kernels as fk
    if args.lib:
        fk.load(args.lib)
    apply_threads(args.threads, torch, fk)
    records = Records(args.out)
    timer = Timer(False)
    deadline = time.perf_counter() + args.budget_s
    budget_ms = 1000.0 * args.budget_s / 12
    for (b, l) in (SMOKE_SHAPES if args.smoke else SHAPES):
        gen = torch.Generator().manual_seed(7)
        data = torch.randint(0, VOCAB, (b, l + 1), generator=gen)
        x, y = data[:, :-1], data[:, 1:]
        rec0 = {"op": "charlm", "config": f"charlm_B{b}_L{l}", "B": b, "L": l, "H": HEADS,
                "D": HEAD_DIM, "threads": args.threads, "device": cpu_device_name(args.threads)}
        got, losses = {}, {}
        for impl, attn in (("ours", attn_ours(fk)), ("eager", attn_eager(torch)),
                           ("sdpa", attn_sdpa(torch))):
            if time.perf_counter() > deadline:
                records.add({**rec0, "impl": impl, "ms": None, "cut": True,
                             "note": f"CUT: past the {args.budget_s:g} s budget"})
                continue
            model = build(torch, fk, attn, seed=3)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3)

            def step():
                opt.zero_grad(set_to_none=True)
                logits = model(x)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
                loss.backward()
                opt.step()
                return loss

            try:
                losses[impl] = step().item()  # the first step's loss, before any update
                t1 = timer.once(step)
                reps = pick_reps(t1, budget_ms, 5, 200)
                ms_min, ms = timer.stats(step, reps, warmup=1)
            except Exception as e:
                records.add({**rec0, "impl": impl, "ms": None, "note": f"FAILED: {fail_msg(e)}"})
                print(f"  {impl:<6} FAILED ({fail_msg(e)})")
                continue
            got[impl] = ms
            ratio = ms / got["ours"] if impl != "ours" and "ours" in got else None
            note = ""
            if impl == "eager" and "ours" in losses:
                note = f"first-step loss ours {losses['ours']:.6f}, eager {losses['eager']:.6f}"
            print(f"  {impl:<6} {ms:9.3f} ms (min {ms_min:.3f}, reps {reps})"
                  + (f"  peer/ours {ratio:.2f}x" if ratio else "") + (f"  {note}" if note else ""))
            records.add({**rec0, "impl": impl, "ms": ms, "ms_min": ms_min, "reps": reps,
                         "ratio_vs_ours": ratio,
                         "target": 1.0 if impl == "eager" else None,
                         "target_text": ">=1x eager" if impl == "eager" else "", "note": note})
        if "ours" in losses and "eager" in losses:
            # the same model and data: the first losses agree to the f32 bound
            assert math.isclose(losses["ours"], losses["eager"], rel_tol=1e-4), losses
    records.write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
