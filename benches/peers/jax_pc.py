#!/usr/bin/env python3
"""The JAX front end's predictive-coding learning step against the PCX / jpc way of writing it
(issue 25): one jitted training step — settle the hidden layers with the input and the label
clamped, then the weights' gradient of the settled energy — written

  ours        jax.value_and_grad(fep_kernels.jax.settle_energy) (all T steps in one XLA FFI call,
              gradients from the same call by the envelope theorem),
  jax_loop    plain JAX: the energy's jax.grad w.r.t. the states, T gradient steps in
              lax.fori_loop, stop_gradient, then jax.value_and_grad of the energy w.r.t. the
              weights (what PCX and jpc compile to),

on the same weights, data, step size and T, on JAX's CPU device, one process, interleaved
repetitions (min and median). Both are checked to give the same energy and gradients first.

    python3 benches/peers/jax_pc.py --threads 1           # XLA and ours on one thread
    python3 benches/peers/jax_pc.py --threads 2 --out target/jax_pc-t2.json

Configurations: 64-64-10 (B 64 and 256, T 20) and PCX's 784-128-128-128-10 (B 256, T 8 and 32),
tanh hidden layers, identity into the first layer.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from timing import cpu_model, cpu_threads_env  # noqa: E402

CONFIGS = [("pc_b64", (64, 64, 10), 64, 20), ("pc_b256", (64, 64, 10), 256, 20),
           ("pcx_t8", (784, 128, 128, 128, 10), 256, 8),
           ("pcx_t32", (784, 128, 128, 128, 10), 256, 32)]
ETA = 0.1


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--out", default=None, help="write the records as JSON here")
    args = ap.parse_args()
    xla = cpu_threads_env(args.threads)
    import jax
    import jax.numpy as jnp
    import numpy as np

    import fep_kernels as fk
    import fep_kernels.jax as fkj
    fk.set_num_threads(args.threads)
    print(f"jax {jax.__version__} ({xla}), fep-kernels {fk.version()} threads "
          f"{fk.get_num_threads()}, {cpu_model()}")
    records = []
    for name, widths, batch, steps in CONFIGS:
        L = len(widths) - 1
        acts = ["identity"] + ["tanh"] * (L - 1)
        r = np.random.default_rng(0)
        ws = [jnp.asarray(r.standard_normal((widths[l + 1], widths[l])) / np.sqrt(widths[l]),
                          jnp.float32) for l in range(L)]
        x0 = jnp.asarray(r.standard_normal((batch, widths[0])), jnp.float32)
        y = jnp.asarray(np.eye(widths[-1])[r.integers(0, widths[-1], batch)], jnp.float32)

        def energy(ws, free):
            full = list(free) + [y]
            prev, e = x0, 0.0
            for l, w in enumerate(ws):
                f = prev if acts[l] == "identity" else jnp.tanh(prev)
                e = e + 0.5 * ((full[l] - f @ w.T) ** 2).sum(-1)
                prev = full[l]
            return e

        def loop_energy(ws):
            prev, xs = x0, []
            for l, w in enumerate(ws[:-1]):
                prev = (prev if acts[l] == "identity" else jnp.tanh(prev)) @ w.T
                xs.append(prev)

            def step(_, free):
                g = jax.grad(lambda fr: energy(ws, fr).sum())(free)
                return [x - ETA * gx for x, gx in zip(free, g)]

            free = jax.lax.stop_gradient(
                jax.lax.fori_loop(0, steps, step, [jax.lax.stop_gradient(x) for x in xs]))
            return energy(ws, free).mean()

        def ours_energy(ws):
            return fkj.settle_energy(ws, x0, y, activations=acts, eta=ETA, steps=steps)

        fns = {"ours": jax.jit(jax.value_and_grad(ours_energy)),
               "jax_loop": jax.jit(jax.value_and_grad(loop_energy))}
        vals = {k: jax.block_until_ready(f(ws)) for k, f in fns.items()}
        e0, g0 = vals["ours"]
        e1, g1 = vals["jax_loop"]
        err = max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(g0, g1))
        times = {k: [] for k in fns}
        for _ in range(args.reps):
            for k, f in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(f(ws))
                times[k].append(1e3 * (time.perf_counter() - t0))
        med = {k: float(np.median(v)) for k, v in times.items()}
        mn = {k: float(np.min(v)) for k, v in times.items()}
        rec = {"config": name, "widths": list(widths), "B": batch, "T": steps,
               "threads": args.threads, "ms": med, "ms_min": mn,
               "jax_loop_over_ours": med["jax_loop"] / med["ours"],
               "energy_rel_diff": float(abs(e0 - e1) / abs(e1)), "grad_rel_diff": err}
        records.append(rec)
        print(f"{name:8} {'-'.join(map(str, widths))} B{batch} T{steps}: ours "
              f"{med['ours']:.3f} ms (min {mn['ours']:.3f}), jax loop {med['jax_loop']:.3f} ms "
              f"(min {mn['jax_loop']:.3f}): loop/ours {rec['jax_loop_over_ours']:.2f}x; "
              f"grads agree to {err:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(records, f, indent=1)


if __name__ == "__main__":
    main()
