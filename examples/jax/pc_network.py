#!/usr/bin/env python3
"""A predictive-coding network trained in JAX with the library's fused settling, next to the
same network settled by a plain jitted JAX loop (the PCX / jpc way: gradient descent on the
energy with ``jax.grad`` at every step, inside ``lax.fori_loop``).

The data are scikit-learn's 8x8 digits (``examples/data/digits.bin``: 1797 records of 64
pixels, the label and the split), a 64-64-64-10 network with tanh hidden layers. A learning step
settles the hidden layers with the input clamped to x_0 and the one-hot label to x_L, then moves
the weights down the settled energy's gradient (the envelope theorem: at a settled state that
gradient is the energy's partial derivative, the local learning rule of predictive coding). Both
versions train from the same weights with the same steps; the script prints their test accuracy,
the largest difference of their weights after training, and the time of one training step of
each (jitted, after compilation) on this machine.

Run (from the repository root, after ``cargo build --release --lib``)::

    PYTHONPATH=bindings/python python3 examples/jax/pc_network.py [--epochs 5]
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

import fep_kernels.jax as fkj

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WIDTHS = (64, 64, 64, 10)
ACTS = ("identity", "tanh", "tanh")
ETA, T, LR, BATCH = 0.1, 20, 0.1, 64


def digits():
    raw = np.fromfile(os.path.join(ROOT, "examples", "data", "digits.bin"), np.uint8)
    raw = raw.reshape(-1, 66)
    x = raw[:, :64].astype(np.float32) / 16.0
    y = np.eye(10, dtype=np.float32)[raw[:, 64]]
    train = raw[:, 65] == 0
    return (x[train], y[train]), (x[~train], y[~train])


def jax_energy(ws, x0, target, free):
    """Per-sample E = 1/2 sum_l |x_l - W_l f_l(x_{l-1})|^2 (the plain JAX version)."""
    full = list(free) + [target]
    prev, e = x0, 0.0
    for l, w in enumerate(ws):
        f = prev if ACTS[l] == "identity" else jnp.tanh(prev)
        e = e + 0.5 * ((full[l] - f @ w.T) ** 2).sum(-1)
        prev = full[l]
    return e


def jax_settled_energy(ws, x0, target):
    """The PCX/jpc loop: feedforward start, T gradient steps on the free layers, then the mean
    energy as a function of the weights at the settled (stopped) states."""
    prev, xs = x0, []
    for l, w in enumerate(ws[:-1]):
        prev = (prev if ACTS[l] == "identity" else jnp.tanh(prev)) @ w.T
        xs.append(prev)

    def step(_, free):
        g = jax.grad(lambda fr: jax_energy(ws, x0, target, fr).sum())(free)
        return [x - ETA * gx for x, gx in zip(free, g)]

    free = jax.lax.stop_gradient(jax.lax.fori_loop(0, T, step, xs))
    return jax_energy(ws, x0, target, free).mean()


def ours_settled_energy(ws, x0, target):
    return fkj.settle_energy(ws, x0, target, activations=ACTS, eta=ETA, steps=T)


def trainer(energy):
    @jax.jit
    def step(ws, x0, target):
        e, g = jax.value_and_grad(energy)(ws, x0, target)
        return [w - LR * gw for w, gw in zip(ws, g)], e
    return step


def predict(ws, x0):
    out = fkj.settle_infer(ws, x0, activations=ACTS, eta=ETA, steps=T)
    return out["x"][-1].argmax(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=5)
    args = ap.parse_args()
    (xtr, ytr), (xte, yte) = digits()
    rng = np.random.default_rng(0)
    ws0 = [jnp.asarray(rng.standard_normal((WIDTHS[l + 1], WIDTHS[l])) / np.sqrt(WIDTHS[l]),
                       jnp.float32) for l in range(len(WIDTHS) - 1)]
    results = {}
    for name, energy in (("fep-kernels", ours_settled_energy), ("plain JAX", jax_settled_energy)):
        step = trainer(energy)
        ws = list(ws0)
        order = np.random.default_rng(1)
        for _ in range(args.epochs):
            perm = order.permutation(len(xtr))
            for i in range(0, len(perm) - BATCH + 1, BATCH):
                idx = perm[i:i + BATCH]
                ws, e = step(ws, jnp.asarray(xtr[idx]), jnp.asarray(ytr[idx]))
        xb, yb = jnp.asarray(xtr[:BATCH]), jnp.asarray(ytr[:BATCH])
        jax.block_until_ready(step(ws, xb, yb))
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            jax.block_until_ready(step(ws, xb, yb))
            times.append(time.perf_counter() - t0)
        acc = float((predict(ws, jnp.asarray(xte)) == yte.argmax(1)).mean())
        results[name] = (ws, acc, 1e3 * float(np.median(times)))
        print(f"{name:>12}: test accuracy {acc:.3f} after {args.epochs} epochs, "
              f"{results[name][2]:.2f} ms per training step (B {BATCH}, T {T}, median of 20)")
    diff = max(float(jnp.abs(a - b).max()) for a, b in zip(results["fep-kernels"][0],
                                                            results["plain JAX"][0]))
    ratio = results["plain JAX"][2] / results["fep-kernels"][2]
    print(f"largest weight difference after training: {diff:.2e}; plain JAX / fep-kernels step "
          f"time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
