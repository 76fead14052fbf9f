"""Interop with pymdp 1.0 (``inferactively-pymdp``, JAX): a batched pymdp ``Agent`` and our
``fep_kernels.jax.VmpModel`` built from the same model (the T-maze and a two-factor model of
tests/fixtures/vmp_pymdp.json) live through the same episode: at every step the same
observations (sampled from the generative process), state inference (ours inside ``jax.jit``
and ``jax.vmap`` over two groups of agents), policy inference, deterministic action selection and
the empirical prior for the next step. Beliefs and q(pi) must agree to 1e-5 (float32) and the
actions must be the same (a differing argmax is accepted only where pymdp's own q(pi) ties within
1e-5, and then pymdp's action is taken so the episodes stay aligned).
Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_jax_pymdp.py`` (or pytest).

Needs JAX and pymdp; without them, it prints that it was skipped and exits 0."""

import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import jax
except ImportError as e:  # pragma: no cover
    skip_module("test_jax_pymdp.py", f"{e.name} is not installed")
try:  # pymdp.utils imports matplotlib.pyplot for plotting helpers the agent never calls
    import matplotlib.pyplot  # noqa: F401
except ImportError:
    _mpl = types.ModuleType("matplotlib")
    _mpl.__path__ = []
    _mpl.pyplot = types.ModuleType("matplotlib.pyplot")
    sys.modules["matplotlib"], sys.modules["matplotlib.pyplot"] = _mpl, _mpl.pyplot
try:
    from pymdp.agent import Agent
except ImportError as e:  # pragma: no cover
    skip_module("test_jax_pymdp.py", f"pymdp does not import ({e})")

# VMP models live on the host: on a machine with a GPU, JAX's arrays stay on the CPU here.
jax.config.update("jax_platforms", "cpu")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fep_kernels as fk  # noqa: E402
import fep_kernels.jax as fkj  # noqa: E402
from _runner import run_functions  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
from vmp_pymdp_models import load  # noqa: E402  (the fixture's models as NumPy arrays)

K = 16
TOL = 1e-5


def episode(name, n=4, steps=6, seed=0):
    M = load(name)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    agent = Agent(A=[f32(a) for a in M["A"]], B=[f32(b) for b in M["B"]],
                  C=[f32(c) for c in M["C"]], D=[f32(d) for d in M["D"]],
                  E=None if M["E"] is None else f32(M["E"]), A_dependencies=M["deps"],
                  B_dependencies=[[f] for f in range(len(M["B"]))], policy_len=M["policy_len"],
                  gamma=M["gamma"], batch_size=n, num_iter=K, inference_algo="fpi",
                  action_selection="deterministic")
    policies = np.asarray(agent.policies.policy_arr)
    model = fkj.VmpModel(M["A"], M["B"], C=M["C"], D=M["D"], A_dependencies=M["deps"],
                         policies=policies, E=M["E"])
    S = model.num_states
    offs = np.cumsum([0] + S)

    @jax.jit
    def ours(obs, prior):
        # two groups of agents through vmap (folded into one call of 2 x n/2 agents)
        g = lambda x: x.reshape((2, x.shape[0] // 2) + x.shape[1:])  # noqa: E731
        qs = jax.vmap(lambda o, p: model.infer_states(o, p, num_iter=K)["qs"])(g(obs), g(prior))
        qs = qs.reshape(n, -1)
        pol = model.infer_policies(qs, gamma=M["gamma"])
        return qs, pol["q_pi"]

    pm_states = jax.jit(lambda ag, obs, prior: ag.infer_states(obs, prior))
    pm_policies = jax.jit(lambda ag, qs: ag.infer_policies(qs))
    rng = np.random.default_rng(seed)
    state = [rng.integers(0, s, size=n) for s in S]   # the generative process's true states
    pm_prior = agent.D
    our_prior = jnp.concatenate([jnp.broadcast_to(f32(d / d.sum()), (n, len(d)))
                                 for d in M["D"]], axis=1)
    worst = {"qs": 0.0, "q_pi": 0.0}
    ties = 0
    for t in range(steps):
        obs = []
        for m, a in enumerate(M["A"]):  # o ~ A_m[:, s_deps]
            cols = a[(slice(None),) + tuple(state[f] for f in M["deps"][m])]  # [O, n]
            obs.append(np.array([rng.choice(a.shape[0], p=cols[:, i] / cols[:, i].sum())
                                 for i in range(n)], np.int32))
        pm_qs = pm_states(agent, [jnp.asarray(o) for o in obs], pm_prior)
        pm_q_pi, _ = pm_policies(agent, pm_qs)
        qs, q_pi = ours(jnp.asarray(np.stack(obs, 1)), our_prior)
        pm_flat = np.concatenate([np.asarray(q[:, -1]) for q in pm_qs], axis=1)
        worst["qs"] = max(worst["qs"], float(np.abs(np.asarray(qs) - pm_flat).max()))
        worst["q_pi"] = max(worst["q_pi"], float(np.abs(np.asarray(q_pi) - np.asarray(pm_q_pi)).max()))
        pm_action = np.asarray(agent.sample_action(pm_q_pi))            # [n, F]
        mine = policies[np.asarray(q_pi).argmax(1), 0, :]               # the same rule
        for i in range(n):
            if not np.array_equal(mine[i], pm_action[i]):
                p = np.asarray(pm_q_pi[i])
                best = np.flatnonzero(p >= p.max() - TOL)
                assert len(best) > 1 and (policies[best, 0, :] == mine[i]).all(1).any(), \
                    (name, t, i, mine[i], pm_action[i])
                ties += 1
        action = jnp.asarray(pm_action)
        pm_prior = agent.update_empirical_prior(action, pm_qs)
        # ours: the empirical prior B_f[:, :, a_f] q_f, from our beliefs
        q_f = [qs[:, offs[f]:offs[f + 1]] for f in range(len(S))]
        our_prior = jnp.concatenate([
            jnp.einsum("ijn,nj->ni", f32(M["B"][f])[:, :, pm_action[:, f]], q_f[f])
            for f in range(len(S))], axis=1)
        for f in range(len(S)):  # the world moves: s' ~ B_f[:, s, a]
            b = M["B"][f]
            state[f] = np.array([rng.choice(b.shape[0], p=b[:, state[f][i], pm_action[i, f]])
                                 for i in range(n)])
    model.close()
    return worst, ties


def test_tmaze_episode_matches_pymdp():
    worst, ties = episode("tmaze")
    assert worst["qs"] < TOL and worst["q_pi"] < TOL, worst
    return f"max |diff| qs {worst['qs']:.1e}, q_pi {worst['q_pi']:.1e}, {ties} ties"


def test_two_factor_episode_matches_pymdp():
    worst, ties = episode("two_factor", n=6, seed=1)
    assert worst["qs"] < TOL and worst["q_pi"] < TOL, worst
    return f"max |diff| qs {worst['qs']:.1e}, q_pi {worst['q_pi']:.1e}, {ties} ties"


if __name__ == "__main__":
    try:
        fk.load()
    except (OSError, RuntimeError) as e:
        print(f"test_jax_pymdp.py: cannot load the library: {e}")
        sys.exit(1)
    print(f"fep-kernels {fk.version()} at {fk._lib_path}, jax {jax.__version__}")
    sys.exit(run_functions(globals()))
