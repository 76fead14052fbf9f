#!/usr/bin/env python3
"""Incremental decoding with a KV cache through a Student-t precision-weighted attention layer.

A tiny causal ``fep_kernels.nn.PrecisionAttention`` layer (Student-t scores with a learned nu
per head, learned per-head and per-key precisions, grouped-query attention: 4 query heads
sharing 2 key/value heads) runs over a batch of sequences twice:

1. all at once (the full causal forward, as in training);
2. as a decoder would: a prefill of the first tokens into a ``fep_kernels.nn.KVCache``, then
   one token per step, each step attending to everything cached so far.

Both give the same outputs; the script prints the largest difference (float32 rounding,
~1e-7), and then repeats the check with right-padded prompts of different lengths per row (a
ragged prefill: ``kv_len`` tells the layer how many tokens of each row are real).

Run (from the repository root, after ``cargo build --release --lib``)::

    FEP_KERNELS_LIB=$PWD/target/release/libfep_kernels.so \\
        PYTHONPATH=bindings/python python3 examples/python/kv_cache_decoding.py [--device cuda]
"""

import argparse
import sys

import torch

from fep_kernels.nn import PrecisionAttention


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--length", type=int, default=24)
    ap.add_argument("--prefill", type=int, default=8)
    args = ap.parse_args()
    torch.manual_seed(0)
    dev, B, T, P = args.device, args.batch, args.length, args.prefill

    layer = PrecisionAttention(64, num_heads=4, num_kv_heads=2, score="student_t", nu=4.0,
                               key_precision=True, causal=True, device=dev)
    with torch.no_grad():  # move the learned quantities off their initial values
        layer.log_nu.uniform_(0.5, 2.5)
        layer.log_precision_head.uniform_(-0.5, 0.5)
        layer.key_precision_weight.normal_(0.0, 0.2)
    print(layer)
    x = torch.randn(B, T, 64, device=dev)

    with torch.no_grad():
        full = layer(x)                                   # [B, T, 64] in one call

        cache = layer.make_cache(batch_size=B, max_len=T)
        outs = [layer(x[:, :P], cache=cache)]            # prefill P tokens
        for t in range(P, T):
            outs.append(layer(x[:, t:t + 1], cache=cache))  # one token per step
        step = torch.cat(outs, dim=1)
        d = (step - full).abs().max().item()
        print(f"prefill {P} + {T - P} one-token steps vs the full forward: max |d| = {d:.3g} "
              f"(cache lengths {cache.lengths.tolist()})")

        # ragged prompts: row b has lens[b] real tokens, the rest of the prefill is padding
        lens = [P - (b % P) for b in range(B)]
        cache.reset()
        kv_len = torch.tensor(lens, dtype=torch.int32, device=dev)
        y0 = layer(x[:, :P], kv_len=kv_len, cache=cache)
        steps = []
        for t in range(T - P):
            xt = torch.stack([x[b, lens[b] + t] for b in range(B)])[:, None]
            steps.append(layer(xt, cache=cache))
        d2 = 0.0
        for b in range(B):
            n = lens[b] + T - P
            ref = layer(x[b:b + 1, :n])[0]
            got = torch.cat([y0[b, :lens[b]]] + [s[b] for s in steps])
            d2 = max(d2, (got - ref).abs().max().item())
        print(f"ragged prefill (prompt lengths {lens}) + {T - P} steps vs each row's full "
              f"forward: max |d| = {d2:.3g}")
    ok = d < 1e-5 and d2 < 1e-5
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
