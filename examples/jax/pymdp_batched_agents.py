#!/usr/bin/env python3
"""N active-inference agents in one batch: pymdp 1.0's own jitted ``Agent`` next to the same
agents whose state and policy inference run in fep-kernels (``fep_kernels.jax.VmpModel``), on
the T-maze of tests/fixtures/vmp_pymdp.json.

Both take the same observations each step (sampled from the generative process), infer states
(16 fixed-point iterations, as pymdp), infer policies, pick actions deterministically and form
the next empirical prior (pymdp's action is taken for both, so the episodes stay aligned). The
script prints the largest difference of the beliefs and of q(pi) between the two over the
episode, how many actions differed (and how many of those were ties of pymdp's own q(pi) within
1e-5), and the time per step (state and policy inference for all N agents, jitted, after
compilation) of each.

Run (from the repository root, after ``cargo build --release --lib``; needs
``pip install inferactively-pymdp==1.0.4``)::

    PYTHONPATH=bindings/python python3 examples/jax/pymdp_batched_agents.py [--agents 1000]
"""

import argparse
import os
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

try:  # pymdp.utils imports matplotlib.pyplot for plotting helpers the agent never calls
    import matplotlib.pyplot  # noqa: F401
except ImportError:
    _mpl = types.ModuleType("matplotlib")
    _mpl.__path__ = []
    _mpl.pyplot = types.ModuleType("matplotlib.pyplot")
    sys.modules["matplotlib"], sys.modules["matplotlib.pyplot"] = _mpl, _mpl.pyplot
from pymdp.agent import Agent  # noqa: E402

import fep_kernels.jax as fkj  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "tests", "fixtures"))
from vmp_pymdp_models import load  # noqa: E402  (tests/fixtures/vmp_pymdp.json as arrays)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    n = args.agents
    M = load("tmaze")
    A, B, C, D = M["A"], M["B"], M["C"], M["D"]
    deps, gamma = M["deps"], M["gamma"]
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    agent = Agent(A=[f32(a) for a in A], B=[f32(b) for b in B], C=[f32(c) for c in C],
                  D=[f32(d) for d in D], A_dependencies=deps,
                  B_dependencies=[[f] for f in range(len(B))], policy_len=M["policy_len"],
                  gamma=gamma, batch_size=n, num_iter=16, inference_algo="fpi",
                  action_selection="deterministic")
    policies = np.asarray(agent.policies.policy_arr)
    model = fkj.VmpModel(A, B, C=C, D=D, A_dependencies=deps, policies=policies)
    S = model.num_states
    offs = np.cumsum([0] + S)

    @jax.jit
    def pymdp_step(obs, prior):
        qs = agent.infer_states(obs, prior)
        q_pi, _ = agent.infer_policies(qs)
        return qs, q_pi

    @jax.jit
    def ours_step(obs, prior):
        qs = model.infer_states(obs, prior)["qs"]
        return qs, model.infer_policies(qs, gamma=gamma)["q_pi"]

    rng = np.random.default_rng(0)
    state = [rng.integers(0, s, size=n) for s in S]
    pm_prior = agent.D
    prior = jnp.concatenate([jnp.broadcast_to(f32(d / d.sum()), (n, len(d))) for d in D], 1)
    worst_qs = worst_pi = 0.0
    mismatched = ties = 0
    t_pm, t_ours = [], []
    for t in range(args.steps):
        obs = [np.array([rng.choice(a.shape[0], p=col / col.sum()) for col in
                         a[(slice(None),) + tuple(state[f] for f in deps[mi])].T], np.int32)
               for mi, a in enumerate(A)]
        pm_obs = [jnp.asarray(o) for o in obs]
        our_obs = jnp.asarray(np.stack(obs, 1))
        for fn, args_, times in ((pymdp_step, (pm_obs, pm_prior), t_pm),
                                 (ours_step, (our_obs, prior), t_ours)):
            jax.block_until_ready(fn(*args_))  # compiled on the first step
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args_))
            times.append(time.perf_counter() - t0)
            if fn is pymdp_step:
                pm_qs, pm_q_pi = out
            else:
                qs, q_pi = out
        flat = np.concatenate([np.asarray(q[:, -1]) for q in pm_qs], 1)
        worst_qs = max(worst_qs, float(np.abs(np.asarray(qs) - flat).max()))
        worst_pi = max(worst_pi, float(np.abs(np.asarray(q_pi) - np.asarray(pm_q_pi)).max()))
        action = np.asarray(agent.sample_action(pm_q_pi))
        mine = policies[np.asarray(q_pi).argmax(1), 0, :]
        for i in np.flatnonzero((mine != action).any(1)):
            # a different argmax is a tie when pymdp's own q(pi) has several maxima (1e-5)
            p = np.asarray(pm_q_pi[i])
            best = np.flatnonzero(p >= p.max() - 1e-5)
            if len(best) > 1 and (policies[best, 0, :] == mine[i]).all(1).any():
                ties += 1
            else:
                mismatched += 1
        pm_prior = agent.update_empirical_prior(jnp.asarray(action), pm_qs)
        prior = jnp.concatenate([
            jnp.einsum("ijn,nj->ni", f32(B[f])[:, :, action[:, f]], qs[:, offs[f]:offs[f + 1]])
            for f in range(len(S))], 1)
        for f in range(len(S)):
            state[f] = np.array([rng.choice(B[f].shape[0], p=B[f][:, state[f][i], action[i, f]])
                                 for i in range(n)])
    model.close()
    pm_ms, our_ms = 1e3 * np.median(t_pm[1:]), 1e3 * np.median(t_ours[1:])
    print(f"{n} T-maze agents, {args.steps} steps: max |beliefs diff| {worst_qs:.1e}, "
          f"max |q(pi) diff| {worst_pi:.1e}; actions: {mismatched} different, {ties} ties "
          f"broken differently (pymdp's action is taken)")
    print(f"time per step (state + policy inference, all agents, median): pymdp {pm_ms:.2f} ms, "
          f"fep-kernels {our_ms:.2f} ms ({pm_ms / our_ms:.2f}x)")


if __name__ == "__main__":
    main()
