#!/usr/bin/env python3
"""Peer benchmark for variational message passing (DESIGN.md sections 4.4 and 7, issue 4).

Times, on the same models and the same batches, in the same run:

  ours        fep_vmp_infer_states / fep_vmp_infer_policies through the C ABI
              (bindings/python/fep_kernels's VmpModel on CUDA tensors, the model uploaded
              once outside the timed region, preallocated outputs, check=False as
              benches/vmp.rs does: the input scan reads one word back, which synchronises)
  pymdp_jax   pymdp's JAX agent (inferactively-pymdp 1.0.4, pymdp.agent.Agent(...,
              batch_size=N)), its infer_states / infer_policies under jax.jit (the agent passed
              as an argument, so its arrays are not baked in as constants), float32 (x64 OFF,
              as a user runs it on a GPU), on the GPU; compiled once per configuration (the
              first call, reported apart), then timed

The models are those of tests/fixtures/vmp_pymdp.json (A, B, C, D, E, policies, gamma), built
for pymdp exactly as tests/fixtures/vmp_pymdp.py builds its Agent:

  tmaze_states        T-maze (F = 2, M = 3), fpi, K = 16 iterations, no early stop, index
                      observations, prior D; N = 1, 1k, 100k
  five_factor_states  the F = M = 5 model, likewise; N = 1k, 100k
  grid_policies       7x7 grid world, 64 policies of 3 steps, gamma = 3, utility + state
                      information gain (pymdp's Agent defaults); beliefs are random normalised
                      vectors; N = 10k

Inputs come from a fixed seed (NumPy), the same arrays for both. Each configuration's results
are compared once: the max abs difference of qs (state inference) or q(pi) (policy inference;
G too) between pymdp and ours.

Timing (as benches/peers/settle.py): one warm-up call, then the median of N repetitions (N
chosen from a first measurement so each implementation takes ~0.2 s, at least 3): CUDA events
on PyTorch's stream for ours, the wall clock with jax.block_until_ready for pymdp.

Targets of issue 4, printed next to the measured ratio pymdp/ours (never as a verdict):
>= 100x for state inference at N = 100k, >= 50x for policy inference at N = 10k.

--device cpu (issue 24): pymdp's agent on JAX's CPU device against ours on the CPU, state and
policy inference on the T-maze and on a synthetic three-factor model (three_factor: S = 4, 3, 5,
O = 5, 4, 6, A_dependencies [[0, 1], [1, 2], [0, 2]], controls 3, 1, 2, policy_len 2: 36 policies;
random A, B, C, D from a fixed seed, built in this script), N = 1k and 10k agents; target
pymdp/ours >= 1 everywhere. `--threads N` sets torch.set_num_threads(N),
fep_kernels.set_num_threads(N) and, for N = 1, XLA's one-thread flags before JAX is imported.
Every record has the median ("ms") and the minimum ("ms_min") of the repetitions.
benches/cpu-suite.sh runs it at 1 and 2 threads.

Usage:
    python3 benches/peers/vmp.py --lib target/release/libfep_kernels.so --out vmp_peers.json
    python3 benches/peers/vmp.py --smoke      # tiny shapes on the CPU: a test of the script
    python3 benches/peers/vmp.py --quick --targets-only --budget-s 45
                                              # ci/gpu-run.sh's quick step: the batches that
                                              # have a target (N = 100k states, 10k policies)
    python3 benches/peers/vmp.py --pydeps DIR # also look for pymdp and its pure-Python
                                              # dependencies in DIR (searched after the system's
                                              # site-packages; ci/gpu-run.sh installs the wheels
                                              # staged by ci/gpu-stage.sh there)

Prints a table and writes the records as JSON to --out (read by ci/gpu-report.py), each
implementation's record as soon as it is measured (ours first; benches/peers/timing.py's
Records), so a timeout in pymdp's cold jit keeps ours. A missing
piece (PyTorch, CUDA, the library, VmpModel, JAX, a JAX GPU, pymdp) makes the implementations
that need it SKIPPED; a failing call is reported as FAILED; neither is fatal (exit 0).
"""

import argparse
import json
import os
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "vmp_pymdp.json")
# JAX must not grab most of the GPU's memory next to PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

K = 16  # pymdp's default fpi iterations
CONFIGS = [
    # name, fixture model, op, batches
    ("tmaze_states", "tmaze", "states", [1, 1_000, 100_000]),
    ("five_factor_states", "five_factor", "states", [1_000, 100_000]),
    ("grid_policies", "grid7x7", "policies", [10_000]),
]
SMOKE_CONFIGS = [
    ("tmaze_states", "tmaze", "states", [1, 8]),
    ("three_factor_states", "three_factor", "states", [5]),
    ("three_factor_policies", "three_factor", "policies", [3]),
    ("five_factor_states", "five_factor", "states", [6]),
    ("grid_policies", "grid7x7", "policies", [4]),
]
CPU_CONFIGS = [  # issue 24: T-maze and a three-factor model, N = 1k and 10k
    ("tmaze_states", "tmaze", "states", [1_000, 10_000]),
    ("three_factor_states", "three_factor", "states", [1_000, 10_000]),
    ("tmaze_policies", "tmaze", "policies", [1_000, 10_000]),
    ("three_factor_policies", "three_factor", "policies", [1_000, 10_000]),
]
CPU_TARGET = 1.0  # issue 24: at least as fast as pymdp's jitted, vmapped agent on the CPU
# (op, N) -> the target for pymdp_jax / ours
TARGETS = {("states", 100_000): 100.0, ("policies", 10_000): 50.0}
SEED = 20240904
PYMDP_VERSION = "1.0.4"

np = None  # imported in main()
torch = None


# ---- the fixture ----


def tensor(v):
    """A fixture tensor: {shape, data} dense row-major, or {shape, fill, index, data}."""
    shape = tuple(v["shape"])
    if "index" not in v:
        return np.asarray(v["data"], dtype=np.float64).reshape(shape)
    out = np.full(int(np.prod(shape)), float(v["fill"]))
    out[np.asarray(v["index"], dtype=np.int64)] = v["data"]
    return out.reshape(shape)


def load_models():
    with open(FIXTURE) as f:
        doc = json.load(f)
    models = {}
    for m in doc["models"]:
        pol = m["policies"]
        models[m["name"]] = {
            "name": m["name"],
            "A": [tensor(a) for a in m["A"]],
            "B": [tensor(b) for b in m["B"]],
            "C": [tensor(c) for c in m["C"]],
            "D": [tensor(d) for d in m["D"]],
            "E": tensor(m["E"]) if m["E"] is not None else None,
            "deps": [list(d) for d in m["A_dependencies"]],
            "num_states": list(m["num_states"]),
            "num_obs": list(m["num_obs"]),
            "policy_len": int(m["policy_len"]),
            "policies": np.asarray(pol["data"], dtype=np.int32).reshape(pol["shape"]),
            "gamma": float(m["gamma"]),
        }
    return models


def pymdp_policy_order(num_controls, policy_len):
    """pymdp.control.construct_policies's order: [P, policy_len, F] int32."""
    import itertools

    rows = list(itertools.product(*([range(u) for u in num_controls] * policy_len)))
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), policy_len, len(num_controls))


def three_factor_model(seed=SEED + 3):
    """A synthetic three-factor model (issue 24's CPU benchmark; not in the fixture): S = 4, 3,
    5, O = 5, 4, 6, each modality reading two factors, controls 3, 1, 2, policy_len 2. A and B
    random with a diagonal bias (so observations inform and actions matter), normalised over
    their first axis; C ~ N(0, 1); D random normalised; no E."""
    rng = np.random.default_rng(seed)
    S, O, U = [4, 3, 5], [5, 4, 6], [3, 1, 2]
    deps = [[0, 1], [1, 2], [0, 2]]
    A = []
    for m, o in enumerate(O):
        a = rng.uniform(0.05, 1.0, size=(o, *[S[f] for f in deps[m]]))
        first = S[deps[m][0]]
        for i in range(min(o, first)):
            a[i, i] += 2.0
        A.append(a / a.sum(axis=0, keepdims=True))
    B = []
    for f, s in enumerate(S):
        b = rng.uniform(0.05, 1.0, size=(s, s, U[f]))
        for u in range(U[f]):
            b[:, :, u] += 3.0 * np.roll(np.eye(s), u, axis=0)
        B.append(b / b.sum(axis=0, keepdims=True))
    D = [rng.uniform(0.1, 1.0, size=s) for s in S]
    return {
        "name": "three_factor",
        "A": A, "B": B, "C": [rng.normal(0.0, 1.0, size=o) for o in O],
        "D": [d / d.sum() for d in D], "E": None, "deps": deps,
        "num_states": S, "num_obs": O, "policy_len": 2,
        "policies": pymdp_policy_order(U, 2), "gamma": 16.0,
    }


def make_inputs(M, op, n, seed):
    """[N, M] int32 observations (uniform indices) or [N, sum S] float32 beliefs (per factor,
    uniform(1e-3, 1) entries normalised to sum 1)."""
    rng = np.random.default_rng(seed)
    if op == "states":
        return np.stack([rng.integers(0, o, size=n) for o in M["num_obs"]], axis=1).astype(np.int32)
    parts = []
    for s in M["num_states"]:
        q = rng.uniform(1e-3, 1.0, size=(n, s))
        parts.append(q / q.sum(axis=1, keepdims=True))
    return np.concatenate(parts, axis=1).astype(np.float32)


# ---- timing ----


# Timer and pick_reps: benches/peers/timing.py, shared by the peer scripts.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import (Budget, Records, Timer, apply_threads, cpu_device_name,  # noqa: E402
                    cpu_threads_env, fail_msg, pick_reps, ratio)


# ---- ours (through the C ABI) ----


def setup_ours(args):
    """{"ok": True, "fk", "device", "cuda", "name"} or {"ok": False, "why"}."""
    global torch
    try:
        import torch as _torch
        torch = _torch
    except Exception as e:
        return {"ok": False, "why": f"PyTorch is not installed ({fail_msg(e)})"}
    try:
        import fep_kernels as fk
    except Exception as e:
        return {"ok": False, "why": f"bindings/python/fep_kernels: {fail_msg(e)}"}
    if not hasattr(fk, "VmpModel"):
        return {"ok": False, "why": "bindings/python/fep_kernels has no VmpModel yet"}
    if args.device == "cuda" and not torch.cuda.is_available():
        return {"ok": False, "why": "torch.cuda.is_available() is False (no GPU or a CPU-only "
                "PyTorch)"}
    try:
        fk.load(args.lib)
    except Exception as e:
        return {"ok": False, "why": f"cannot load the library: {fail_msg(e)}"}
    if args.device == "cuda":
        kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
        if fk.device_count(kind) < 1:
            return {"ok": False, "why": f"the library at {fk._lib_path} sees no {kind} device "
                    f"(built without the {kind} feature?)"}
        device = torch.device("cuda", torch.cuda.current_device())
        name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        name = cpu_device_name(args.threads)
    apply_threads(args.threads, torch, fk)
    return {"ok": True, "fk": fk, "device": device, "cuda": device.type == "cuda", "name": name,
            "version": fk.version()}


def ours_model(ours, M):
    return ours["fk"].VmpModel(M["A"], M["B"], C=M["C"], D=M["D"], A_dependencies=M["deps"],
                               policies=M["policies"], E=M["E"], device=ours["device"])


# ---- pymdp (JAX) ----


def setup_pymdp(args):
    """{"ok": True, "jax", "jnp", "Agent", "device", "version", "stubbed", "fns"}, or
    {"ok": False, "why"}."""
    if args.no_pymdp:
        return {"ok": False, "why": "--no-pymdp"}
    if args.pydeps:
        # after the system's packages: a staged wheel is used only where the system has none
        sys.path.append(os.path.abspath(args.pydeps))
    try:
        import jax
    except Exception as e:
        return {"ok": False, "why": f"jax is not installed ({fail_msg(e)})"}
    try:
        jax.config.update("jax_enable_x64", False)  # float32, as a user runs pymdp on a GPU
        if args.device == "cuda":
            gpus = [d for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")]
            if not gpus:
                return {"ok": False, "why": f"jax {jax.__version__} has no GPU backend "
                        f"(devices {jax.devices()})"}
            jdev = gpus[0]
        else:
            jdev = jax.devices("cpu")[0]
    except Exception as e:
        return {"ok": False, "why": f"jax setup failed ({fail_msg(e)})"}
    # pymdp.utils imports matplotlib.pyplot at the top for its plotting helpers, which the
    # inference and control code never calls: where matplotlib is absent (the GPU machine),
    # an empty stand-in module is registered instead of installing it.
    stubbed = False
    try:
        import matplotlib.pyplot  # noqa: F401
    except Exception:
        mpl = types.ModuleType("matplotlib")
        mpl.__path__ = []
        plt = types.ModuleType("matplotlib.pyplot")
        mpl.pyplot = plt
        sys.modules["matplotlib"], sys.modules["matplotlib.pyplot"] = mpl, plt
        stubbed = True
    try:
        import jax.numpy as jnp
        from pymdp.agent import Agent
    except Exception as e:
        hint = (f" (pip install inferactively-pymdp=={PYMDP_VERSION}, or --pydeps DIR with its "
                "wheels: ci/gpu-stage.sh)")
        return {"ok": False, "why": f"pymdp does not import: {fail_msg(e)}{hint}"}
    try:
        from importlib import metadata
        version = metadata.version("inferactively-pymdp")
    except Exception:
        version = "unknown"
    return {"ok": True, "jax": jax, "jnp": jnp, "Agent": Agent, "device": jdev,
            "version": version, "stubbed": stubbed, "fns": {}}


def pymdp_agent(px, M, n):
    """pymdp's Agent for model M and N agents, as tests/fixtures/vmp_pymdp.py builds it
    (float32 arrays on the JAX device)."""
    jnp = px["jnp"]
    with px["jax"].default_device(px["device"]):
        f32 = lambda x: jnp.asarray(x, dtype=jnp.float32)  # noqa: E731
        agent = px["Agent"](
            A=[f32(a) for a in M["A"]], B=[f32(b) for b in M["B"]], C=[f32(c) for c in M["C"]],
            D=[f32(d) for d in M["D"]], E=None if M["E"] is None else f32(M["E"]),
            A_dependencies=M["deps"], B_dependencies=[[f] for f in range(len(M["B"]))],
            policy_len=M["policy_len"], gamma=M["gamma"], batch_size=n, num_iter=K,
            inference_algo="fpi",
        )
    pol = np.asarray(agent.policies.policy_arr)
    if pol.shape != M["policies"].shape or not np.array_equal(pol, M["policies"]):
        raise RuntimeError("pymdp's policy table differs from the fixture's")
    return agent


def pymdp_fns(px):
    """The jitted calls, made once (jax.jit compiles once per new shape)."""
    if not px["fns"]:
        jax = px["jax"]
        px["fns"]["states"] = jax.jit(lambda ag, obs: ag.infer_states(obs, ag.D))
        px["fns"]["policies"] = jax.jit(lambda ag, qs: ag.infer_policies(qs))
    return px["fns"]


# ---- one configuration ----


def run_config(args, ours, px, timer, cfg, models, records):
    name, model_name, op, batches = cfg
    M = models[model_name]
    S = M["num_states"]
    P, H = M["policies"].shape[0], M["policies"].shape[1]
    desc = (f"fpi K={K}, index observations, prior D" if op == "states" else
            f"P={P} H={H} gamma={M['gamma']}, utility + state information gain")
    print(f"\n== {name}: model {model_name} (S={S}, O={M['num_obs']}, deps={M['deps']}), {desc}")
    model = None
    if ours["ok"]:
        try:
            model = ours_model(ours, M)
        except Exception as e:
            ours = {"ok": False, "why": f"VmpModel: {fail_msg(e)}"}
    if args.targets_only:
        batches = [n for n in batches if (op, n) in TARGETS]
    for n in batches:
        if args.budget.spent():
            print(f"-- {name} N={n}: {args.budget.why()}")
            records.add({"op": "vmp", "config": name, "model": model_name, "mode": op,
                         "N": n, "K": K if op == "states" else None,
                         "P": P if op == "policies" else None,
                         "H": H if op == "policies" else None, "impl": "all", "ms": None,
                         "cut": True, "note": args.budget.why()})
            continue
        print(f"-- {name} N={n}")
        x = make_inputs(M, op, n, SEED + 7919 * len(name) + n)
        values = {}  # impl -> its result, compared once with ours'
        elements = n * (K if op == "states" else P)
        ours_ms = None  # ours is measured first: pymdp's ratio is known when it is written

        def add(r):
            """Writes the record of r (impl, ms, first_ms, reps, diff, diff_g, note) now, so a
            later implementation that hangs or is killed (a cold jit) cannot lose it."""
            nonlocal ours_ms
            ms = r["ms"]
            if r["impl"] == "ours":
                ours_ms = ms
            target = ((CPU_TARGET if args.device == "cpu" else TARGETS.get((op, n)))
                      if r["impl"] == "pymdp_jax" else None)
            records.add({
                "op": "vmp",
                "config": name,
                "model": model_name,
                "mode": op,
                "N": n,
                "K": K if op == "states" else None,
                "P": P if op == "policies" else None,
                "H": H if op == "policies" else None,
                "impl": r["impl"],
                "ms": ms,
                "ms_min": r.get("ms_min"),
                "threads": args.threads,
                "first_call_ms": r.get("first_ms"),
                "reps": r.get("reps"),
                "agents_per_s": n / (ms * 1e-3) if ms else None,
                "throughput_unit": "agent-iterations/s" if op == "states" else
                                   "agent-policies/s",
                "throughput": elements / (ms * 1e-3) if ms else None,
                "ratio_vs_ours": ratio(ms, ours_ms),
                "target_ratio": target,
                "compared": "qs" if op == "states" else "q_pi",
                "max_abs_diff_vs_ours": r.get("diff"),
                "max_abs_diff_g_vs_ours": r.get("diff_g"),
                "device": ours.get("name") or args.device,
                "pymdp_version": px.get("version"),
                "note": r["note"],
            })

        def compare_with_ours(r):
            """Puts the max abs difference of r's result from ours' (if measured) into r."""
            if "ours" not in values:
                return
            a, b = values[r["impl"]], values["ours"]
            r["diff"] = float(np.max(np.abs(a[0] - b[0])))
            if a[1] is not None:
                r["diff_g"] = float(np.max(np.abs(a[1] - b[1])))
            what = "qs" if op == "states" else "q_pi"
            extra = f", G {r['diff_g']:.2e}" if "diff_g" in r else ""
            print(f"  max |pymdp - ours|: {what} {r['diff']:.2e}{extra}")

        def measure(impl, fn, get, block=None):
            try:
                t_first = timer.once(fn, block)  # includes compilation / first calls
                values[impl] = get()
                t1 = timer.once(fn, block)
                reps = pick_reps(t1, args.budget_ms, args.min_reps, args.max_reps)
                ms_min, ms = timer.stats(fn, reps, warmup=1, block=block)
            except Exception as e:  # a peer that cannot run is reported, not fatal
                msg = fail_msg(e)
                print(f"  {impl:<10} FAILED ({msg})")
                add({"impl": impl, "ms": None, "note": f"FAILED: {msg}"})
                return
            note = f"first call {t_first:.1f} ms" if t_first > 5 * max(ms, 1e-3) else ""
            r = {"impl": impl, "ms": ms, "ms_min": ms_min, "first_ms": t_first, "reps": reps,
                 "note": note}
            print(f"  {impl:<10} {ms:10.4f} ms  (min {ms_min:.4f}, reps {reps}) {note}")
            if impl != "ours":
                compare_with_ours(r)
            add(r)

        def skip(impl, why):
            print(f"  {impl:<10} SKIPPED ({why})")
            add({"impl": impl, "ms": None, "note": f"SKIPPED: {why}"})

        # ours
        if not ours["ok"]:
            skip("ours", ours["why"])
        else:
            dev = ours["device"]
            if op == "states":
                obs_t = torch.from_numpy(x).to(dev)
                out = {"qs": torch.empty(n, sum(S), device=dev),
                       "vfe": torch.empty(n, device=dev),
                       "iterations": torch.empty(n, dtype=torch.int32, device=dev)}
                measure("ours",
                        lambda: model.infer_states(obs_t, num_iter=K, out=out, check=False),
                        lambda: (out["qs"].double().cpu().numpy(), None))
            else:
                qs_t = torch.from_numpy(x).to(dev)
                out = {"g": torch.empty(n, P, device=dev), "q_pi": torch.empty(n, P, device=dev)}
                measure("ours",
                        lambda: model.infer_policies(qs_t, gamma=M["gamma"], out=out,
                                                     check=False),
                        lambda: (out["q_pi"].double().cpu().numpy(),
                                 out["g"].double().cpu().numpy()))

        # pymdp
        if not px["ok"]:
            skip("pymdp_jax", px["why"])
        else:
            jax, jnp = px["jax"], px["jnp"]
            agent = None
            try:
                agent = pymdp_agent(px, M, n)
                fns = pymdp_fns(px)
                if op == "states":
                    jobs = [jax.device_put(jnp.asarray(x[:, m]), px["device"])
                            for m in range(x.shape[1])]
                    fn = fns["states"]

                    def run():
                        return fn(agent, jobs)

                    def get():
                        qs = run()
                        return (np.concatenate([np.asarray(q[:, -1], dtype=np.float64)
                                                for q in qs], axis=1), None)
                else:
                    offs = np.cumsum([0] + S)
                    jqs = [jax.device_put(jnp.asarray(x[:, offs[f]:offs[f + 1]])[:, None, :],
                                          px["device"]) for f in range(len(S))]
                    fn = fns["policies"]

                    def run():
                        return fn(agent, jqs)

                    def get():
                        q_pi, neg_efe = run()
                        return (np.asarray(q_pi, dtype=np.float64),
                                -np.asarray(neg_efe, dtype=np.float64))
            except Exception as e:
                msg = fail_msg(e)
                print(f"  {'pymdp_jax':<10} FAILED ({msg})")
                add({"impl": "pymdp_jax", "ms": None, "note": f"FAILED: {msg}"})
            else:
                measure("pymdp_jax", run, get, block=jax.block_until_ready)
            del agent
        values.clear()

    if model is not None:
        model.close()


def print_table(records):
    print()
    hdr = (f"{'config':<19} {'N':>7} {'impl':<10} {'ms':>10} {'agents/s':>10} "
           f"{'elem/s':>10} {'peer/ours':>10} {'target':>7} {'max|diff|':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in records:
        head = f"{r['config']:<19} {r['N']:>7} {r['impl']:<10}"
        if r["ms"] is None:
            print(f"{head} {'-':>10}   {r['note']}")
            continue
        ratio = f"{r['ratio_vs_ours']:.2f}x" if r["ratio_vs_ours"] is not None else "-"
        target = f">={r['target_ratio']:g}x" if r["target_ratio"] else ""
        diff = (f"{r['max_abs_diff_vs_ours']:.2e}" if r["max_abs_diff_vs_ours"] is not None
                else "-")
        print(f"{head} {r['ms']:10.4f} {r['agents_per_s']:10.3e} {r['throughput']:10.3e} "
              f"{ratio:>10} {target:>7} {diff:>10}")
    print("(elem/s: agent-iterations/s for state inference (N*K per call), agent-policies/s for "
          "policy inference (N*P); peer/ours > 1: ours is faster; target: issue 4's goal for "
          "that ratio; max|diff|: of qs or q_pi between pymdp and ours)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", help="libfep_kernels.so (default: $FEP_KERNELS_LIB or "
                    "target/release/libfep_kernels.so)")
    ap.add_argument("--out", help="write the records as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny shapes, quick, on the CPU unless --device cuda: tests the script")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset of: " + ", ".join(c[0] for c in CONFIGS))
    ap.add_argument("--no-pymdp", action="store_true", help="skip the pymdp peer")
    ap.add_argument("--pydeps", default=None,
                    help="a folder with pymdp and its pure-Python dependencies (pip install "
                    "--target), searched after the system's packages")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="default cuda (cpu with --smoke); cpu: issue 24's CPU configurations")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads: torch.set_num_threads(N), fep_kernels.set_num_threads(N), "
                    "and XLA's one-thread flags for N = 1")
    ap.add_argument("--targets-only", action="store_true",
                    help="only the batches issue 4 sets a target for (N = 100k for state "
                    "inference, 10k for policy inference)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new batch after this many seconds (default: none)")
    args = ap.parse_args()
    args.budget = Budget(args.budget_s)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    quick = args.quick or args.smoke
    args.budget_ms = 50.0 if quick else 200.0
    args.min_reps, args.max_reps = (2, 10) if quick else (3, 30)
    cpu_threads_env(args.threads)  # before torch and JAX are imported
    configs = (SMOKE_CONFIGS if args.smoke else CPU_CONFIGS if args.device == "cpu"
               else CONFIGS)
    wanted = [c.strip() for c in (args.configs or ",".join(c[0] for c in configs)).split(",")
              if c.strip()]
    unknown = set(wanted) - {c[0] for c in configs}
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}")

    global np
    try:
        import numpy as _np
        np = _np
    except ImportError:
        print("benches/peers/vmp.py: SKIPPED: NumPy is not installed")
        return 0

    ours = setup_ours(args)
    px = setup_pymdp(args)
    if not ours["ok"] and not px["ok"]:
        print(f"benches/peers/vmp.py: SKIPPED: ours: {ours['why']}; pymdp: {px['why']}")
    ours_desc = (f"fep-kernels {ours['version']} on {ours['name']}" if ours["ok"]
                 else f"ours: SKIPPED ({ours['why']})")
    px_desc = (f"pymdp {px['version']} (jax {px['jax'].__version__}, float32) on {px['device']}"
               + (" [matplotlib stubbed]" if px["stubbed"] else "") if px["ok"]
               else f"pymdp: SKIPPED ({px['why']})")
    print(f"{ours_desc} | {px_desc}"
          + (f" | threads torch {torch.get_num_threads()}" if torch is not None else "")
          + (f" | {os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""))
    models = load_models()
    models["three_factor"] = three_factor_model()
    timer = Timer(bool(ours["ok"] and ours["cuda"]))
    records = Records(args.out)
    t0 = time.perf_counter()
    ctx = torch.no_grad() if torch is not None else None
    if ctx is not None:
        ctx.__enter__()
    try:
        for cfg in configs:
            if cfg[0] in wanted:
                run_config(args, ours, px, timer, cfg, models, records)
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    print_table(records)
    print(f"total {time.perf_counter() - t0:.1f} s")
    records.write()  # also when nothing was added: an empty list, not no file
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
