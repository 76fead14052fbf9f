"""Tests of ``fep_kernels.jax``'s settling: the XLA FFI calls against a plain JAX settling loop
in float64 (``jax_enable_x64``: the PCX/jpc way, gradient descent on the energy with
``jax.grad`` at every step), the settled energy's ``jax.grad`` (weights, biases, diagonal and
per-sample precisions, with and without the log-det term) against the same loop's gradients at
the settled state, under ``jax.jit``; ``jax.vmap`` over the data (folded into the batch) and over
the network (per entry); the start from ``init``; argument errors.
Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_jax_settle.py`` (or pytest).

Needs JAX; without it, it prints that it was skipped and exits 0."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import jax
except ImportError as e:  # pragma: no cover
    skip_module("test_jax_settle.py", f"{e.name} is not installed")

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fep_kernels as fk  # noqa: E402
import fep_kernels.jax as fkj  # noqa: E402
from _runner import expect, run_functions  # noqa: E402

ACTS = {"identity": lambda x: x, "tanh": jnp.tanh}
ETA, T = 0.1, 30


def net(seed=0, widths=(8, 16, 4), batch=6):
    r = np.random.default_rng(seed)
    ws = [jnp.asarray(r.standard_normal((widths[l + 1], widths[l])) / np.sqrt(widths[l]),
                      jnp.float32) for l in range(len(widths) - 1)]
    bs = [jnp.asarray(0.1 * r.standard_normal(n), jnp.float32) for n in widths[1:]]
    x0 = jnp.asarray(r.standard_normal((batch, widths[0])), jnp.float32)
    y = jnp.asarray(np.eye(widths[-1])[r.integers(0, widths[-1], batch)], jnp.float32)
    pis = [jnp.asarray(0.5 + r.random((batch, widths[1])), jnp.float32),   # per sample
           jnp.asarray(0.5 + r.random(widths[2]), jnp.float32)]            # diagonal
    return ws, bs, x0, y, pis


def reference(ws, bs, acts, pis, x0, target, log_det=False, init=None, steps=T):
    """(free states, per-sample energy, energy function of the parameters at those states) in
    float64: feedforward start, `steps` gradient steps on E."""
    f64 = lambda t: jnp.asarray(t, jnp.float64)  # noqa: E731
    ws, bs, pis = [f64(w) for w in ws], [f64(b) for b in bs], [f64(p) for p in pis]
    x0 = f64(x0)
    target = None if target is None else f64(target)
    depth = len(ws)

    def energy(ws, bs, pis, free):
        full = list(free) + ([target] if target is not None else [])
        prev, e = x0, 0.0
        for l in range(depth):
            eps = full[l] - (ACTS[acts[l]](prev) @ ws[l].T + bs[l])
            p = jnp.broadcast_to(pis[l], eps.shape)
            e = e + 0.5 * (p * eps ** 2).sum(-1)
            if log_det:
                e = e - 0.5 * jnp.log(p).sum(-1)
            prev = full[l]
        return e

    if init is None:
        xs, prev = [], x0
        for l in range(depth):
            prev = ACTS[acts[l]](prev) @ ws[l].T + bs[l]
            xs.append(prev)
        free = xs[:-1] if target is not None else xs
    else:
        free = [f64(t) for t in init]
    for _ in range(steps):
        g = jax.grad(lambda fr: energy(ws, bs, pis, fr).sum())(free)
        free = [x - ETA * gx for x, gx in zip(free, g)]
    return free, energy(ws, bs, pis, free), (lambda ws, bs, pis: energy(ws, bs, pis, free).mean())


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_infer_matches_a_jax_settling_loop():
    ws, bs, x0, _, pis = net(1)
    acts = ["identity", "tanh"]
    out = jax.jit(lambda ws, bs, pis, x0: fkj.settle_infer(
        ws, x0, bs, acts, pis, eta=ETA, steps=T))(ws, bs, pis, x0)
    free, energy, _ = reference(ws, bs, acts, pis, x0, None)
    for a, w in zip(out["x"], free):
        assert rel(a, w) < 1e-4, rel(a, w)
    assert rel(out["energy"], energy) < 1e-4
    assert (np.asarray(out["steps"]) == T).all()
    for l, (x, e) in enumerate(zip(out["x"], out["eps"])):
        assert x.dtype == jnp.float32 and e.shape == x.shape, l
    # the start from given states (here: the settled ones, so a few more steps barely move)
    again = fkj.settle_infer(ws, x0, bs, acts, pis, eta=ETA, steps=5, init=out["x"])
    free2, _, _ = reference(ws, bs, acts, pis, x0, None, init=out["x"], steps=5)
    for a, w in zip(again["x"], free2):
        assert rel(a, w) < 1e-4


def test_energy_gradients_are_the_learning_rule():
    ws, bs, x0, y, pis = net(2)
    acts = ["identity", "tanh"]
    for log_det in (False, True):
        def loss(ws, bs, pis):
            return fkj.settle_energy(ws, x0, y, bs, acts, pis, eta=ETA, steps=T, log_det=log_det)

        e, (dw, db, dp) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(ws, bs, pis)
        _, per_sample, ref_fn = reference(ws, bs, acts, pis, x0, y, log_det=log_det)
        assert rel(e, per_sample.mean()) < 1e-4, log_det
        rw, rb, rp = jax.grad(ref_fn, argnums=(0, 1, 2))(
            [jnp.asarray(w, jnp.float64) for w in ws], [jnp.asarray(b, jnp.float64) for b in bs],
            [jnp.asarray(p, jnp.float64) for p in pis])
        for a, w, what in zip(dw + db + dp, rw + rb + rp, ["w1", "w2", "b1", "b2", "p1", "p2"]):
            assert a.dtype == jnp.float32, what
            assert rel(a, w) < 5e-4, (log_det, what, rel(a, w))
    # settle_learn returns the same gradients (of F) and the settled states
    r = fkj.settle_learn(ws, x0, y, bs, acts, pis, eta=ETA, steps=T, log_det=True)
    assert rel(r["grad_w"][0], dw[0]) < 1e-6 and np.allclose(r["x"][-1], y)


def test_training_matches_a_jax_loop_trained_the_same_way():
    """A PC network trained for 5 SGD steps with our settled energy under jit and the same one
    trained with the plain JAX loop's (jpc-style) energy: the same weights to f32 bounds."""
    ws, bs, x0, y, _ = net(5, widths=(8, 12, 12, 4), batch=16)
    acts = ["identity", "tanh", "tanh"]

    def ours(ws):
        return fkj.settle_energy(ws, x0, y, bs, acts, 1.0, eta=ETA, steps=T)

    def plain(ws):
        # settle at the current weights (stopped), then the energy's gradient at those states
        _, _, fn = reference([jax.lax.stop_gradient(w) for w in ws], bs, acts, [1.0] * 3, x0, y)
        return fn(ws, [jnp.asarray(b, jnp.float64) for b in bs], [1.0] * 3)

    step_ours = jax.jit(lambda ws: [w - 0.1 * g for w, g in zip(ws, jax.grad(ours)(ws))])
    a = list(ws)
    b = [jnp.asarray(w, jnp.float64) for w in ws]
    for _ in range(5):
        a = step_ours(a)
        b = [w - 0.1 * g for w, g in zip(b, jax.grad(plain)(b))]
    for x, w in zip(a, b):
        assert rel(x, w) < 1e-4, rel(x, w)
    assert rel(a[0], ws[0]) > 1e-3  # the weights did move

def test_vmap_over_data_folds_and_over_networks_runs_per_entry():
    ws, bs, x0, y, pis = net(3)
    acts = "tanh"
    xs = jnp.stack([x0, 2 * x0, -x0])

    def infer(x0):
        return fkj.settle_infer(ws, x0, bs, acts, [1.0, pis[1]], eta=ETA, steps=T)["x"][-1]

    got = jax.vmap(infer)(xs)
    for i in range(3):
        assert rel(got[i], infer(xs[i])) < 1e-6
    text = jax.jit(jax.vmap(infer)).lower(xs).as_text()
    assert text.count("fep_settle_infer") == 1  # one call for the whole map: folded into B

    wss = [jnp.stack([w, 0.5 * w]) for w in ws]

    def loss(ws, x0):
        return fkj.settle_energy(ws, x0, y, bs, acts, [pis[0], pis[1]], eta=ETA, steps=T)

    e, g = jax.vmap(jax.value_and_grad(loss), in_axes=(0, None))(wss, x0)
    for i in range(2):
        ei, gi = jax.value_and_grad(loss)([w[i] for w in wss], x0)
        assert rel(e[i], ei) < 1e-6
        for a, b_ in zip(g, gi):
            assert rel(a[i], b_) < 1e-6


def test_errors():
    ws, bs, x0, y, pis = net(4)
    expect(ValueError, lambda: fkj.settle_infer(ws, x0.astype(jnp.float64)), "x0")
    expect(ValueError, lambda: fkj.settle_infer([ws[1], ws[0]], x0), "weights[0]")
    expect(ValueError, lambda: fkj.settle_energy(ws, x0, y[:, :3]), "target")
    expect(ValueError, lambda: fkj.settle_infer(ws, x0, activations="softmax"), "activations")
    expect(ValueError, lambda: fkj.settle_infer(ws, x0, precisions=[1.0, pis[0]]),
           "precisions[1]")
    expect(ValueError, lambda: fkj.settle_infer(ws, x0, steps=0), "steps")
    try:  # a value only the library checks: eta <= 0
        jax.block_until_ready(fkj.settle_infer(ws, x0, eta=-1.0)["energy"])
    except Exception as e:  # XlaRuntimeError
        assert "eta" in str(e), str(e)
    else:
        raise AssertionError("eta = -1 was accepted")


if __name__ == "__main__":
    try:
        fk.load()
    except (OSError, RuntimeError) as e:
        print(f"test_jax_settle.py: cannot load the library: {e}")
        sys.exit(1)
    print(f"fep-kernels {fk.version()} at {fk._lib_path}, jax {jax.__version__}")
    sys.exit(run_functions(globals()))
