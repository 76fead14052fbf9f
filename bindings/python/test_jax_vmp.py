"""Tests of ``fep_kernels.jax.VmpModel``: state, sequence and policy inference through the XLA
FFI calls give the same values as the ctypes front end on the same model (the T-maze and the
five-factor model of tests/fixtures/vmp_pymdp.json; distributional observations too), under
``jax.jit``; ``jax.vmap`` folds into one call; argument errors and a closed model.
(test_jax_pymdp.py holds the comparison with pymdp itself.)
Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_jax_vmp.py`` (or pytest).

Needs JAX and PyTorch (for the ctypes side); without them, it prints that it was skipped."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import jax
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_jax_vmp.py", f"{e.name} is not installed")

# VMP models live on the host: on a machine with a GPU, JAX's arrays stay on the CPU here.
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fep_kernels as fk  # noqa: E402
import fep_kernels.jax as fkj  # noqa: E402
from _runner import expect, run_functions  # noqa: E402
from test_jax_pymdp import load  # noqa: E402


def models(name):
    M = load(name)
    kw = dict(C=M["C"], D=M["D"], A_dependencies=M["deps"], policies=M["policies"], E=M["E"])
    return M, fkj.VmpModel(M["A"], M["B"], **kw), fk.VmpModel(M["A"], M["B"], **kw)


def test_same_values_as_the_ctypes_front_end():
    for name in ("tmaze", "five_factor"):
        M, jm, tm = models(name)
        r = np.random.default_rng(0)
        n, t = 5, 3
        obs = np.stack([r.integers(0, o, size=(n, t)) for o in tm.num_obs], -1).astype(np.int32)
        first = np.ascontiguousarray(obs[:, 0])
        acts = np.stack([r.integers(0, u, size=(n, t - 1)) for u in tm.num_controls],
                        -1).astype(np.int32)
        got = jax.jit(lambda o: jm.infer_states(o))(jnp.asarray(first))
        want = tm.infer_states(torch.from_numpy(first))
        assert np.array_equal(np.asarray(got["qs"]), want["qs"].numpy()), name
        assert np.array_equal(np.asarray(got["vfe"]), want["vfe"].numpy()), name
        # distributional observations, a prior, early stop
        dist = np.concatenate([np.eye(o, dtype=np.float32)[first[:, m]]
                               for m, o in enumerate(tm.num_obs)], 1)  # one-hot
        prior = got["qs"]
        g2 = jm.infer_states(jnp.asarray(dist), prior=prior, tol=1e-4)
        w2 = tm.infer_states(torch.from_numpy(dist), prior=torch.from_numpy(np.array(prior)),
                             tol=1e-4)
        assert np.array_equal(np.asarray(g2["qs"]), w2["qs"].numpy()), name
        for method in ("vmp", "mmp"):
            gs = jm.infer_sequence(jnp.asarray(obs), jnp.asarray(acts), method=method)
            ws = tm.infer_sequence(torch.from_numpy(obs), actions=torch.from_numpy(acts),
                                   method=method)
            assert np.array_equal(np.asarray(gs["qs"]), ws["qs"].numpy()), (name, method)
        gp = jm.infer_policies(got["qs"], gamma=M["gamma"])
        wp = tm.infer_policies(want["qs"], gamma=M["gamma"])
        assert np.array_equal(np.asarray(gp["q_pi"]), wp["q_pi"].numpy()), name
        assert np.array_equal(np.asarray(gp["G"]), wp["g"].numpy()), name
        jm.close()
        tm.close()


def test_vmap_folds_into_the_agents():
    _, jm, tm = models("tmaze")
    r = np.random.default_rng(1)
    obs = np.stack([r.integers(0, o, size=(3, 4)) for o in jm.num_obs], -1).astype(np.int32)
    f = lambda o: jm.infer_states(o)["qs"]  # noqa: E731
    got = jax.vmap(f)(jnp.asarray(obs))
    for i in range(3):
        assert np.array_equal(np.asarray(got[i]), np.asarray(f(jnp.asarray(obs[i]))))
    assert jax.jit(jax.vmap(f)).lower(jnp.asarray(obs)).as_text().count(
        "fep_vmp_infer_states") == 1
    jm.close()
    tm.close()


def test_errors():
    _, jm, tm = models("tmaze")
    expect(ValueError, lambda: jm.infer_states(jnp.zeros((2, 2), jnp.int32)), "obs")
    expect(ValueError, lambda: jm.infer_policies(jnp.zeros((2, 3), jnp.float32)), "qs")
    expect(ValueError, lambda: jm.infer_sequence(jnp.zeros((2, 3, 3), jnp.int32)), "actions")
    jm.close()
    expect(ValueError, lambda: jm.infer_states(jnp.zeros((2, 3), jnp.int32)), "closed")
    tm.close()


if __name__ == "__main__":
    try:
        fk.load()
    except (OSError, RuntimeError) as e:
        print(f"test_jax_vmp.py: cannot load the library: {e}")
        sys.exit(1)
    print(f"fep-kernels {fk.version()} at {fk._lib_path}, jax {jax.__version__}")
    sys.exit(run_functions(globals()))
