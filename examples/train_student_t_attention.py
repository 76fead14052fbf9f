#!/usr/bin/env python3
"""Train a tiny Student-t attention model with a learned per-key precision (fep_kernels + PyTorch).

The task: noisy key-value retrieval with decoys. Each sequence holds Lk = 16 slots. At the
"signal" positions a slot is a random (key, value) pair; LQ = 4 of them are targets. Each query
is a target's key plus noise, and the model must output that target's value. At the "decoy"
positions (a fixed subset of the positions, the same in every sequence) the slot's key is a noisy
copy of one of the queries -- closer to that query than its true key is -- and its value is
random. Content alone cannot tell the true key from a decoy (it prefers the decoy); the position
can. The model:

    q = Wq x_query,  k_j = Wk key_j,  v_j = Wv value_j              (H = 2 heads of D = 32)
    o = fep_kernels.attention(q, k, v, precision_key=exp(log_pi), score="student_t", nu=4)
    y = Wo o                                                         (MSE against the target value)

where ``log_pi`` [H, Lk] is a learned log-precision per head and key position (broadcast over the
batch to ``precision_key`` [B, H, Lk]). With Student-t scores and the (D/2) ln pi normaliser,
s_ij = -((nu + D)/2) ln(1 + tau pi_j d2_ij / nu) + (D/2) ln pi_j, so a lower pi_j turns position
j down (the (D/2) ln pi term alone moves by 16 nats per e-fold of pi). Gradients flow through
the custom op's backward to q, k, v (hence Wq, Wk, Wv) and to precision_key (hence log_pi). The
script prints the loss as it falls (about 1.0 -> 1e-3 in 300 steps) and, at the end, the learned
precisions of the decoy positions (~0.8) and the signal positions (~1.2), and asserts that the
loss fell below a quarter of its start and that every decoy ends below every signal key.
``--fixed-precision`` is the ablation: pi stays 1, the decoys cannot be told apart and the loss
stalls near 0.46.

Run it (CPU, float32: a few seconds for the default 300 steps)::

    cargo build --release --lib                      # add --features cuda for a GPU
    pip install ./bindings/python                    # or rely on the fallback below, and
    export FEP_KERNELS_LIB=$PWD/target/release/libfep_kernels.so
    python3 examples/train_student_t_attention.py [--steps 300] [--device cuda] [--seed 0]

Without ``pip install`` the script imports the package from ``bindings/python`` next to it.
``--device cuda`` needs a library built with ``--features cuda`` and a CUDA build of PyTorch.
"""

import argparse
import math
import os
import sys
import time

import torch

try:
    import fep_kernels as fk
except ImportError:  # not installed: use the source tree next to this example
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                    "bindings", "python"))
    import fep_kernels as fk


LK = 16                     # key slots per sequence
DECOYS = [1, 4, 6, 9, 11, 14]  # decoy positions (fixed); the other 10 are signal positions
SIGNAL = [j for j in range(LK) if j not in DECOYS]
D_IN = 16                   # key and value feature size
HEADS = 2
D = 32                      # head dim (the GPU kernels take 32, 64, 96, 128, 256)
LQ = 4                      # queries per sequence (each a different target)
Q_NOISE = 0.3               # query = target key + Q_NOISE * noise (per feature)
DECOY_NOISE = 0.2           # decoy key = a query + DECOY_NOISE * noise: closer than its target


def make_batch(batch, gen, device):
    """(query [B, LQ, D_IN], keys [B, LK, D_IN], values [B, LK, D_IN], target [B, LQ, D_IN])."""
    keys = torch.randn(batch, LK, D_IN, generator=gen)
    values = torch.randn(batch, LK, D_IN, generator=gen)
    sig = torch.tensor(SIGNAL)
    # LQ distinct signal targets per sequence; every decoy imitates one of them
    pick = torch.rand(batch, len(SIGNAL), generator=gen).argsort(dim=1)[:, :LQ]
    tgt = sig[pick]                                                    # [B, LQ] positions
    tgt_keys = keys.gather(1, tgt[..., None].expand(-1, -1, D_IN))     # [B, LQ, D_IN]
    query = tgt_keys + Q_NOISE * torch.randn(tgt_keys.shape, generator=gen)
    imitated = torch.randint(0, LQ, (batch, len(DECOYS)), generator=gen)
    decoy_keys = query.gather(1, imitated[..., None].expand(-1, -1, D_IN))
    keys[:, DECOYS] = decoy_keys + DECOY_NOISE * torch.randn(decoy_keys.shape, generator=gen)
    target = values.gather(1, tgt[..., None].expand(-1, -1, D_IN))
    return tuple(t.to(device) for t in (query, keys, values, target))


class StudentTAttention(torch.nn.Module):
    """One multi-head Student-t attention layer with a learned precision per head and key slot."""

    def __init__(self, nu=4.0, learn_precision=True):
        super().__init__()
        self.wq = torch.nn.Linear(D_IN, HEADS * D, bias=False)
        self.wk = torch.nn.Linear(D_IN, HEADS * D, bias=False)
        self.wv = torch.nn.Linear(D_IN, HEADS * D, bias=False)
        self.wo = torch.nn.Linear(HEADS * D, D_IN, bias=False)
        # pi = 1 at the start; with learn_precision=False it stays 1 (the ablation)
        self.log_pi = torch.nn.Parameter(torch.zeros(HEADS, LK), requires_grad=learn_precision)
        self.nu = nu

    def forward(self, query, keys, values):
        b = query.shape[0]
        heads = lambda x: x.view(b, x.shape[1], HEADS, D).transpose(1, 2)  # noqa: E731 [B,H,L,D]
        q = heads(self.wq(query)).contiguous()
        k = heads(self.wk(keys)).contiguous()
        v = heads(self.wv(values)).contiguous()
        pi_key = self.log_pi.exp().unsqueeze(0).expand(b, -1, -1)      # [B, H, LK] float32
        o = fk.attention(q, k, v, precision_key=pi_key, score="student_t", nu=self.nu,
                         scale=1.0 / D)
        return self.wo(o.transpose(1, 2).reshape(b, -1, HEADS * D))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--every", type=int, default=25, help="print the loss every N steps")
    ap.add_argument("--fixed-precision", action="store_true",
                    help="ablation: keep pi_j = 1 (the decoys cannot be told apart; the loss "
                         "stalls)")
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    device = torch.device(args.device)
    model = StudentTAttention(learn_precision=not args.fixed_precision).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    # a fixed held-out batch for the reported loss, so the numbers are comparable step to step
    val = make_batch(256, torch.Generator().manual_seed(args.seed + 1), device)

    def val_loss():
        with torch.no_grad():
            q, k, v, t = val
            return torch.nn.functional.mse_loss(model(q, k, v), t).item()

    print(f"fep_kernels {fk.version()} on {device}: {LK} key slots, decoys at {DECOYS}, "
          f"{HEADS} heads of D={D}, Student-t nu={model.nu}")
    t0 = time.time()
    first = val_loss()
    print(f"step {0:5d}  val loss {first:.4f}  (predicting 0 gives ~1.0)")
    for step in range(1, args.steps + 1):
        q, k, v, t = make_batch(args.batch, gen, device)
        loss = torch.nn.functional.mse_loss(model(q, k, v), t)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.every == 0 or step == args.steps:
            print(f"step {step:5d}  train loss {loss.item():.4f}  val loss {val_loss():.4f}")
    last = val_loss()
    elapsed = time.time() - t0

    pi = model.log_pi.detach().exp().cpu()                             # [H, LK]
    geo = lambda x: math.exp(x.log().mean().item())                    # noqa: E731 geometric mean
    pi_decoy, pi_signal = pi[:, DECOYS], pi[:, SIGNAL]
    print("\nlearned precision pi_j (geometric mean over heads and positions):")
    print(f"  signal positions {SIGNAL}: {geo(pi_signal):.3g}  "
          f"(range {pi_signal.min():.3g} .. {pi_signal.max():.3g})")
    print(f"  decoy positions  {DECOYS}: {geo(pi_decoy):.3g}  "
          f"(range {pi_decoy.min():.3g} .. {pi_decoy.max():.3g})")
    for h in range(HEADS):
        print(f"  head {h}: " + " ".join(
            f"{'D' if j in DECOYS else 'S'}{pi[h, j]:.2g}" for j in range(LK)))
    print(f"val loss {first:.4f} -> {last:.4f} in {args.steps} steps ({elapsed:.1f} s)")

    if args.fixed_precision:
        print("(ablation: precisions fixed at 1, no assertions)")
        return
    assert last < 0.25 * first, f"the loss did not fall enough: {first:.4f} -> {last:.4f}"
    assert pi_decoy.max() < pi_signal.min(), "decoy precisions did not end below the signal ones"
    print("ok")


if __name__ == "__main__":
    main()
