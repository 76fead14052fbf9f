"""Tests of ``fep_kernels.jax``'s LCA: the XLA FFI calls against a plain JAX LCA loop in float64
(every threshold, a warm start, the automatic step), the dictionary-learning step against its
formula, ``jax.jit``, ``jax.vmap`` (a shared dictionary folded into one call; one per entry),
``jax.grad`` refused with a clear message, argument errors.
Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_jax_lca.py`` (or pytest).

Needs JAX; without it, it prints that it was skipped and exits 0."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import jax
except ImportError as e:  # pragma: no cover
    skip_module("test_jax_lca.py", f"{e.name} is not installed")

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fep_kernels as fk  # noqa: E402
import fep_kernels.jax as fkj  # noqa: E402
from _runner import expect, run_functions  # noqa: E402


def problem(seed=0, n=16, m=40, b=5):
    r = np.random.default_rng(seed)
    phi = r.standard_normal((n, m))
    phi /= np.linalg.norm(phi, axis=0)
    x = r.standard_normal((b, n))
    return jnp.asarray(phi, jnp.float32), jnp.asarray(x, jnp.float32)


def theta(u, lam, kind):
    if kind.startswith("soft"):
        a = jnp.sign(u) * jnp.maximum(jnp.abs(u) - lam, 0.0)
    else:
        a = jnp.where(jnp.abs(u) > lam, u, 0.0)
    return jnp.maximum(a, 0.0) if kind.endswith("nonneg") else a


def reference(phi, x, lam, eta, steps, kind, u0=None):
    phi, x = jnp.asarray(phi, jnp.float64), jnp.asarray(x, jnp.float64)
    g = phi.T @ phi - jnp.eye(phi.shape[1])
    b = x @ phi
    u = jnp.zeros_like(b) if u0 is None else jnp.asarray(u0, jnp.float64)
    for _ in range(steps):
        a = theta(u, lam, kind)
        u = u + eta * (b - u - a @ g)
    return u, theta(u, lam, kind)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def test_solve_matches_a_jax_loop_for_every_threshold():
    phi, x = problem(1)
    for kind in ("soft", "soft_nonneg", "hard", "hard_nonneg"):
        u, a, steps = jax.jit(lambda phi, x: fkj.lca_solve(phi, x, lam=0.2, eta=0.1, steps=60,
                                                           threshold=kind))(phi, x)
        ru, ra = reference(phi, x, 0.2, 0.1, 60, kind)
        assert rel(u, ru) < 1e-4 and rel(a, ra) < 1e-4, (kind, rel(u, ru), rel(a, ra))
        assert a.dtype == jnp.float32 and (np.asarray(steps) == 60).all()
        assert (np.asarray(a) == 0).mean() > 0.2, kind  # sparse
    # a warm start continues where the first call stopped
    u1, _, _ = fkj.lca_solve(phi, x, lam=0.2, eta=0.1, steps=30)
    u2, a2, _ = fkj.lca_solve(phi, x, lam=0.2, eta=0.1, steps=30, u0=u1)
    _, ra = reference(phi, x, 0.2, 0.1, 60, "soft")
    assert rel(a2, ra) < 1e-4
    # the automatic step: 1 / lambda_max(Phi^T Phi)
    lam_max = float(np.linalg.eigvalsh(np.asarray(phi, np.float64).T @ np.asarray(phi,
                                                                              np.float64))[-1])
    _, a, _ = fkj.lca_solve(phi, x, lam=0.2, steps=40)
    _, ra = reference(phi, x, 0.2, min(1.0, 1.0 / lam_max), 40, "soft")
    assert rel(a, ra) < 1e-4


def test_learning_step_matches_its_formula():
    phi, x = problem(2)
    _, a, _ = fkj.lca_solve(phi, x, lam=0.1, eta=0.1, steps=50)
    new = jax.jit(lambda phi, x, a: fkj.lca_learn(phi, x, a, lr=0.05))(phi, x, a)
    p, xd, ad = (np.asarray(t, np.float64) for t in (phi, x, a))
    want = p + 0.05 / x.shape[0] * (xd - ad @ p.T).T @ ad
    want /= np.linalg.norm(want, axis=0)
    assert rel(new, want) < 1e-5
    assert np.allclose(np.linalg.norm(np.asarray(new, np.float64), axis=0), 1.0, atol=1e-5)


def test_vmap_and_grad():
    phi, x = problem(3)
    xs = jnp.stack([x, 2 * x, -x])
    f = lambda x: fkj.lca_solve(phi, x, lam=0.1, eta=0.1, steps=40)[1]  # noqa: E731
    got = jax.vmap(f)(xs)
    for i in range(3):
        assert rel(got[i], f(xs[i])) < 1e-6
    assert jax.jit(jax.vmap(f)).lower(xs).as_text().count("fep_lca_solve") == 1
    phis = jnp.stack([phi, phi[:, ::-1]])
    got = jax.vmap(lambda p: fkj.lca_solve(p, x, lam=0.1, eta=0.1, steps=40)[1])(phis)
    assert rel(got[1], fkj.lca_solve(phis[1], x, lam=0.1, eta=0.1, steps=40)[1]) < 1e-6
    expect(NotImplementedError, lambda: jax.grad(lambda x: f(x).sum())(x), "not differentiable")


def test_errors():
    phi, x = problem(4)
    expect(ValueError, lambda: fkj.lca_solve(phi, x[:, :3], lam=0.1), "x")
    expect(ValueError, lambda: fkj.lca_solve(phi, x, lam=0.1, threshold="l1"), "threshold")
    expect(ValueError, lambda: fkj.lca_solve(phi, x, lam=0.1, steps=0), "steps")
    expect(ValueError, lambda: fkj.lca_learn(phi, x, jnp.ones((5, 3), jnp.float32), lr=0.1), "a")
    try:  # values only the library checks: columns that are not unit norm, lam <= 0
        jax.block_until_ready(fkj.lca_solve(2 * phi, x, lam=0.1))
    except Exception as e:  # XlaRuntimeError
        assert "norm" in str(e), str(e)
    else:
        raise AssertionError("a dictionary with norm-2 columns was accepted")
    try:
        jax.block_until_ready(fkj.lca_solve(phi, x, lam=-1.0))
    except Exception as e:
        assert "lambda" in str(e) or "lam" in str(e), str(e)
    else:
        raise AssertionError("lam = -1 was accepted")


if __name__ == "__main__":
    try:
        fk.load()
    except (OSError, RuntimeError) as e:
        print(f"test_jax_lca.py: cannot load the library: {e}")
        sys.exit(1)
    print(f"fep-kernels {fk.version()} at {fk._lib_path}, jax {jax.__version__}")
    sys.exit(run_functions(globals()))
