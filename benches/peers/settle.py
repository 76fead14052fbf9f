#!/usr/bin/env python3
"""Peer benchmark for predictive-coding settling (DESIGN.md sections 4.2 and 7).

Times, on the same shapes and the same input tensors, in the same run:

  ours        fep_settle_infer / fep_settle_learn through the C ABI
              (bindings/python/fep_kernels, a SettleNet prepared once outside the timed
              region, preallocated outputs), with the input checks off (check=False, as
              benches/settle.rs does): the checks read a few floats back, which
              synchronises the stream
  eager       a PyTorch settling loop, eager, with the energy gradient written out by hand
              (the fastest eager form: tanh computed once per step and reused for f'):
              T times { h_l = f(x_l); eps_l = x_l - (h_{l-1} W_l^T + b_l);
                        g_l = eps_l - (1 - h_l^2) * (eps_{l+1} W_{l+1}); x_l -= eta g_l }
  compiled    torch.compile of that one step, called T times; compiled once per dtype with
              dynamic shapes and reused for every configuration and both modes (the clamped
              top is a 0-d tensor, not a Python constant)
  jax_jit     JAX as PCX runs it: jax.grad of the batch-summed energy with respect to the free
              layers inside a jitted jax.lax.fori_loop over the T steps (and jax.grad with
              respect to the weights and biases for learning); compiled once per shape and mode,
              T a traced argument

Both modes start at the feedforward prediction, run exactly T steps (tol = 0), eta = 0.1, no
momentum, unit precisions, f_1 = identity and f_2..f_L = tanh (PCX's MNIST setting):
  infer   x_L free (settling from the feedforward state, as a classifier would)
  learn   x_L clamped to a one-hot target; then the gradients of the batch-mean energy,
          grad_W_l = -(1/B) eps_l^T f_l(x_{l-1}), grad_b_l = -(1/B) sum_b eps_l (no update)
Each implementation's result (the settled x_1..x_L for infer, the gradients for learn) is
compared once with ours (relative L2 error) so the timings compare the same computation.

Dtypes: f32 (ours runs f32 weights on TF32 tensor cores; the peers get TF32 matmuls too unless
--no-tf32) and bf16 (weights and biases bf16; the peers cast the matmul inputs to bf16 and the
products back to f32, so the state stays f32 as in ours).

Configurations: pcx 784-128-128-128-10, B=256, T=8 and 32; wide 784-4096-4096-4096-10, B=1024,
T=20. Inputs: fixed seed, W_l ~ N(0, 1/n_{l-1}), b_l ~ N(0, 0.1^2), x_0 ~ N(0, 1), one-hot
targets, generated on the device.

Timing: CUDA events around each repetition (wall clock with block_until_ready for JAX), one
warm-up call, median of N repetitions (N chosen from a first measurement so each implementation
takes ~0.3 s). Every figure is also given per step (ms / T).

Usage:
    python3 benches/peers/settle.py --lib target/release/libfep_kernels.so --out settle_peers.json
    python3 benches/peers/settle.py --smoke         # tiny shapes on the CPU: a test of the script
    python3 benches/peers/settle.py --quick --configs pcx --dtypes f32 --budget-s 45
                                                    # ci/gpu-run.sh's quick step

--device cpu (issue 24): the CPU configurations, f32 only by default: the issue's PC learning
step 64-64-10, T=20, B=64 and B=256 (pc_b64, pc_b256), and pcx 784-128-128-128-10, B=256, T=8
and 32; wall-clock timing; `--threads N` sets torch.set_num_threads(N),
fep_kernels.set_num_threads(N) and, for N = 1, XLA's one-thread flags before JAX is imported.
Every record has the median ("ms") and the minimum ("ms_min") of the repetitions.
benches/cpu-suite.sh runs it at 1 and 2 threads.

--budget-s stops starting new (configuration, dtype, mode, T) once spent: those left are written
as records with "cut": true (no figures). Each implementation's record is written to the JSON as
soon as it is measured (ours first; benches/peers/timing.py's Records), so a timeout in a cold
torch.compile or JAX jit keeps the figures measured before it.

Prints a table (config, mode, dtype, impl, ms per settle, us per step, ratio peer/ours, rel. error
vs ours) and writes the records as JSON to --out (read by ci/gpu-report.py). Exits 0 with a
message when PyTorch or CUDA is missing; a peer that is missing (JAX, or JAX without a GPU) or
fails is reported as SKIPPED / FAILED, never fatal.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "..", "bindings", "python")))
# JAX must not grab most of the GPU's memory next to PyTorch.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

CONFIGS = [
    # name, widths n_0..n_L, B, [T, ...]
    ("pcx", [784, 128, 128, 128, 10], 256, [8, 32]),
    ("wide", [784, 4096, 4096, 4096, 10], 1024, [20]),
]
CPU_CONFIGS = [  # issue 24: its measured PC learning step, and PCX's MNIST network
    ("pc_b64", [64, 64, 10], 64, [20]),
    ("pc_b256", [64, 64, 10], 256, [20]),
    ("pcx", [784, 128, 128, 128, 10], 256, [8, 32]),
]
SMOKE_CONFIGS = [
    ("smoke", [16, 12, 12, 12, 4], 8, [4, 6]),
]
MODES = ["infer", "learn"]
DTYPES = ["f32", "bf16"]
ETA = 0.1
SEED = 20240611

torch = None  # imported in main(), so that the script runs (and skips) without PyTorch


# ---- the PyTorch settling loop (eager and compiled) ----


def mm(a, w):
    """a W^T with a in f32 and W in its dtype: bf16 inputs, f32 result (a no-op cast for f32)."""
    return (a.to(w.dtype) @ w.T).float()


def mm_n(a, w):
    """a W (the backward product) likewise."""
    return (a.to(w.dtype) @ w).float()


def pc_step(xs, ws, bs, eta: float, top_free):
    """One synchronous settling step of DESIGN.md 4.2 (f_1 = identity, tanh above, Pi = 1, no
    momentum). xs = [x_0, ..., x_L] (x_0 clamped), ws/bs the layers 1..L (biases f32), top_free
    a 0-d f32 tensor: 1 lets x_L move (infer), 0 keeps it clamped (learn)."""
    L = len(ws)
    h = [xs[0]] + [torch.tanh(x) for x in xs[1:L]]  # f_{l+1}(x_l)
    eps = [xs[l + 1] - (mm(h[l], ws[l]) + bs[l]) for l in range(L)]
    new = [xs[0]]
    for l in range(1, L + 1):
        g = eps[l - 1]
        if l < L:
            g = g - (1 - h[l] * h[l]) * mm_n(eps[l], ws[l])
        new.append(xs[l] - (eta * top_free) * g if l == L else xs[l] - eta * g)
    return new


def pc_feedforward(x0, ws, bs, target):
    """x_l = mu_l layer by layer (x_L = target when given)."""
    xs = [x0]
    for l in range(len(ws)):
        if target is not None and l == len(ws) - 1:
            xs.append(target.clone())
        else:
            h = xs[l] if l == 0 else torch.tanh(xs[l])
            xs.append(mm(h, ws[l]) + bs[l])
    return xs


def pc_grads(xs, ws, bs):
    """Gradients of the batch-mean energy at xs: lists grad_W (f32), grad_b."""
    L, B = len(ws), xs[0].shape[0]
    h = [xs[0]] + [torch.tanh(x) for x in xs[1:L]]
    gw, gb = [], []
    for l in range(L):
        e = xs[l + 1] - (mm(h[l], ws[l]) + bs[l])
        gw.append((e.T.to(ws[l].dtype) @ h[l].to(ws[l].dtype)).float() * (-1.0 / B))
        gb.append(e.sum(0) * (-1.0 / B))
    return gw, gb


def pc_settle(step, x0, ws, bs, target, steps, top_free):
    """The loop driving a (compiled) step; returns xs, and the gradients when learning."""
    xs = pc_feedforward(x0, ws, bs, target)
    for _ in range(steps):
        xs = step(xs, ws, bs, ETA, top_free)
    if target is None:
        return xs[1:], None
    return xs[1:], pc_grads(xs, ws, bs)


# ---- the JAX peer (PCX-style: jax.grad of the energy in a jitted fori_loop) ----


def make_jax_settle(jax, jnp, L, clamped):
    """A jitted settle(x0, target, ws, bs, steps) for L layers; with clamped=True, x_L is the
    target and the weight/bias gradients of the batch-mean energy are returned too."""
    f32 = jnp.float32

    def jmm(a, w):
        return jnp.dot(a.astype(w.dtype), w.T, preferred_element_type=f32)

    def layers(xs, ws, bs):
        for l in range(L):
            h = xs[l] if l == 0 else jnp.tanh(xs[l])
            yield xs[l + 1] - (jmm(h, ws[l]) + bs[l])

    def energy(free, x0, target, ws, bs):  # summed over the batch, as PCX's psum
        xs = [x0] + list(free) + ([target] if clamped else [])
        return sum(0.5 * jnp.sum(e * e) for e in layers(xs, ws, bs))

    dx = jax.grad(energy)

    def param_energy(ws, bs, xs):
        return sum(0.5 * jnp.sum(e * e) for e in layers(xs, ws, bs)) / xs[0].shape[0]

    dparams = jax.grad(param_energy, argnums=(0, 1))

    def settle(x0, target, ws, bs, steps):
        xs = [x0]
        for l in range(L - 1 if clamped else L):
            h = xs[l] if l == 0 else jnp.tanh(xs[l])
            xs.append(jmm(h, ws[l]) + bs[l])
        free = tuple(xs[1:])

        def body(_, free):
            g = dx(free, x0, target, ws, bs)
            return tuple(x - ETA * gx for x, gx in zip(free, g))

        free = jax.lax.fori_loop(0, steps, body, free)
        if not clamped:
            return free, None
        xs = [x0] + list(free) + [target]
        gw, gb = dparams(ws, bs, xs)
        return tuple(xs[1:]), (gw, gb)

    return jax.jit(settle)


# ---- timing ----


# Timer and pick_reps: benches/peers/timing.py, shared by the peer scripts.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import (Budget, Records, Timer, apply_threads, cpu_device_name,  # noqa: E402
                    cpu_threads_env, fail_msg, pick_reps, ratio)


# ---- main ----


def make_inputs(device, widths, B, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    ws = [torch.randn(widths[l + 1], widths[l], generator=gen, device=device) / widths[l] ** 0.5
          for l in range(len(widths) - 1)]
    bs = [0.1 * torch.randn(n, generator=gen, device=device) for n in widths[1:]]
    x0 = torch.randn(B, widths[0], generator=gen, device=device)
    labels = torch.randint(0, widths[-1], (B,), generator=gen, device=device)
    target = torch.nn.functional.one_hot(labels, widths[-1]).float().contiguous()
    return ws, bs, x0, target


def flat(ts):
    return torch.cat([t.detach().reshape(-1).double().cpu() for t in ts])


def rel_err(a, ref):
    den = ref.norm().item()
    num = (a - ref).norm().item()
    return num / den if den > 0 else num


def run_config(args, fk, jx, timer, device, dev_name, cfg, records):
    name, widths, B, Ts = cfg
    L = len(widths) - 1
    P = sum(widths[l] * widths[l + 1] for l in range(L))
    P2 = P - widths[0] * widths[1]
    step_gflop = (2 * B * P + 2 * B * P2) / 1e9
    print(f"\n== {name}: widths {widths}, B={B}, T={Ts}, eta={ETA}  "
          f"({step_gflop:.4g} GFLOP per step; learning adds {2 * B * P / 1e9:.4g} GFLOP once)")
    ws32, bs32, x0, target = make_inputs(device, widths, B, SEED + B + sum(widths))
    acts = ["identity"] + ["tanh"] * (L - 1)

    for dtype in args.dtypes:
        tdt = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
        ws = [w.to(tdt).contiguous() for w in ws32]
        bs_t = [b.to(tdt).contiguous() for b in bs32]  # ours: biases in the weights' dtype
        bs = [b.float() for b in bs_t]  # the peers add them in f32 (the same values)
        net = fk.SettleNet(ws, bs_t, acts, 1.0)  # prepared once, not timed
        jax_inputs = None
        if jx.get("ok"):
            jax, jnp, jdev = jx["jax"], jx["jnp"], jx["device"]
            jdt = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]

            def to_jax(t, dt=jnp.float32):
                return jax.device_put(jnp.asarray(t.detach().float().cpu().numpy()).astype(dt),
                                      jdev)

            jax_inputs = ([to_jax(w, jdt) for w in ws], [to_jax(b) for b in bs], to_jax(x0),
                          to_jax(target))
        for mode in args.modes:
            tgt = target if mode == "learn" else None
            top_free = torch.full((), 1.0 if mode == "infer" else 0.0, device=device)
            for T in Ts:
                tag = f"{name} {mode} {dtype} T={T}"
                if args.budget.spent():
                    print(f"-- {tag}: {args.budget.why()}")
                    records.add({"config": name, "widths": widths, "B": B, "T": T,
                                 "mode": mode, "dtype": dtype, "impl": "all", "ms": None,
                                 "cut": True, "note": args.budget.why()})
                    continue
                print(f"-- {tag}")
                out = {
                    "x": [torch.empty(B, n, device=device) for n in widths[1:]],
                    "eps": [torch.empty(B, n, device=device) for n in widths[1:]],
                    "energy": torch.empty(B, device=device),
                    "steps": torch.empty(B, dtype=torch.int32, device=device),
                }
                if mode == "learn":
                    out["grad_w"] = [torch.empty(widths[l + 1], widths[l], device=device)
                                     for l in range(L)]
                    out["grad_b"] = [torch.empty(n, device=device) for n in widths[1:]]
                shape = {"config": name, "widths": widths, "B": B, "T": T, "mode": mode,
                         "dtype": dtype, "eta": ETA}
                ref = {}  # "v": ours' result, "ms": ours' time (ours is measured first)

                def add(impl, ms=None, err=None, note="", ms_min=None):
                    """Writes impl's record now, so a later peer that hangs or is killed
                    (a cold compile) cannot lose it."""
                    if impl == "ours":
                        ref["ms"] = ms
                    records.add({
                        **shape,
                        "impl": impl,
                        "ms": ms,
                        "ms_min": ms_min,
                        "threads": args.threads,
                        "ms_per_step": (ms / T) if ms is not None else None,
                        "ratio_vs_ours": ratio(ms, ref.get("ms")),
                        "rel_err_vs_ours": err,
                        "gflop_per_step": step_gflop,
                        "device": dev_name,
                        "note": note,
                    })

                def result_of(xs, grads):
                    return flat(xs) if mode == "infer" else flat(list(grads[0]) + list(grads[1]))

                def measure(impl, fn, get, block=None):
                    try:
                        t_first = timer.once(fn, block)  # includes compilation / first calls
                        value = get()
                        t1 = timer.once(fn, block)
                        reps = pick_reps(t1, args.budget_ms, args.min_reps, args.max_reps)
                        ms_min, ms = timer.stats(fn, reps, warmup=args.warmup, block=block)
                    except Exception as e:  # a peer that cannot run is reported, not fatal
                        msg = fail_msg(e)
                        print(f"  {impl:<10} FAILED ({msg})")
                        add(impl, note=msg)
                        return
                    if impl == "ours":
                        ref["v"] = value
                        err = 0.0
                    else:
                        err = rel_err(value, ref["v"]) if "v" in ref else None
                    note = f"first call {t_first:.1f} ms" if t_first > 5 * max(ms, 1e-3) else ""
                    err_s = f"{err:.2e}" if err is not None else "-"
                    print(f"  {impl:<10} {ms:10.3f} ms  {ms / T * 1e3:10.1f} us/step  "
                          f"(min {ms_min:.3f}, reps {reps}, rel err vs ours {err_s}) {note}")
                    add(impl, ms, err, note, ms_min=ms_min)

                def skip(impl, why):
                    print(f"  {impl:<10} SKIPPED ({why})")
                    add(impl, note=f"SKIPPED: {why}")

                # ours
                if mode == "infer":
                    measure("ours", lambda: net.infer(x0, ETA, T, out=out, check=False),
                            lambda: flat(out["x"]))
                else:
                    measure("ours", lambda: net.learn(x0, target, ETA, T, out=out, check=False),
                            lambda: flat(out["grad_w"] + out["grad_b"]))

                state = {}

                def eager():
                    state["eager"] = pc_settle(pc_step, x0, ws, bs, tgt, T, top_free)

                measure("eager", eager, lambda: result_of(*state["eager"]))

                step = args.compiled_steps.get(dtype)
                if args.no_compile:
                    skip("compiled", "--no-compile")
                elif isinstance(step, str):
                    skip("compiled", step)
                else:
                    def compiled():
                        state["compiled"] = pc_settle(step, x0, ws, bs, tgt, T, top_free)

                    measure("compiled", compiled,
                            lambda: result_of(*state["compiled"]))

                if not jx.get("ok"):
                    skip("jax_jit", jx.get("why", "jax unavailable"))
                else:
                    key = (name, dtype, mode)
                    if key not in jx["fns"]:
                        jx["fns"][key] = make_jax_settle(jx["jax"], jx["jnp"], L,
                                                         mode == "learn")
                    fn = jx["fns"][key]
                    jw, jb, jx0, jt = jax_inputs
                    block = jx["jax"].block_until_ready

                    def jax_run():
                        state["jax"] = fn(jx0, jt, jw, jb, T)
                        return state["jax"]

                    def jax_value():
                        import numpy as np

                        xs, grads = state["jax"]
                        def to_t(a):
                            return torch.from_numpy(np.asarray(a, dtype=np.float64))

                        if mode == "infer":
                            return flat([to_t(a) for a in xs])
                        return flat([to_t(a) for a in list(grads[0]) + list(grads[1])])

                    measure("jax_jit", jax_run, jax_value, block=block)
                state.clear()


def print_table(records):
    print()
    hdr = (f"{'config':<7} {'mode':<6} {'dtype':<5} {'T':>3} {'impl':<10} {'ms':>10} "
           f"{'us/step':>10} {'peer/ours':>10} {'rel_err':>10}")
    print(hdr)
    print("-" * len(hdr))
    for r in records:
        head = f"{r['config']:<7} {r['mode']:<6} {r['dtype']:<5} {r['T']:>3} {r['impl']:<10}"
        if r["ms"] is None:
            print(f"{head} {'-':>10}   {r['note']}")
            continue
        ratio = f"{r['ratio_vs_ours']:.2f}x" if r["ratio_vs_ours"] is not None else "-"
        err = f"{r['rel_err_vs_ours']:.2e}" if r["rel_err_vs_ours"] is not None else "-"
        print(f"{head} {r['ms']:10.3f} {r['ms_per_step'] * 1e3:10.1f} {ratio:>10} {err:>10}")
    print("(peer/ours > 1: ours is faster; rel_err: ||peer - ours|| / ||ours|| of the settled x "
          "(infer) or of the gradients (learn))")


def setup_jax(args, device):
    """{"ok": True, "jax", "jnp", "device", "fns"} or {"ok": False, "why"}."""
    if args.no_jax:
        return {"ok": False, "why": "--no-jax"}
    try:
        import jax
        import jax.numpy as jnp
    except Exception as e:
        return {"ok": False, "why": f"jax is not installed ({fail_msg(e)})"}
    try:
        if device.type == "cuda":
            gpus = [d for d in jax.devices() if d.platform in ("gpu", "cuda", "rocm")]
            if not gpus:
                return {"ok": False, "why": f"jax {jax.__version__} has no GPU backend "
                        f"(devices {jax.devices()}); pip install 'jax[cuda13]'"}
            jdev = gpus[0]
        else:
            jdev = jax.devices("cpu")[0]
        jax.config.update("jax_default_matmul_precision",
                          "tensorfloat32" if args.tf32 else "float32")
    except Exception as e:
        return {"ok": False, "why": f"jax setup failed ({fail_msg(e)})"}
    return {"ok": True, "jax": jax, "jnp": jnp, "device": jdev, "fns": {}}


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
    ap.add_argument("--modes", default=",".join(MODES), help="subset of: infer,learn")
    ap.add_argument("--dtypes", default=None,
                    help="subset of: f32,bf16 (default both; f32 with --device cpu)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads: torch.set_num_threads(N), fep_kernels.set_num_threads(N), "
                    "and XLA's one-thread flags for N = 1")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    ap.add_argument("--no-jax", action="store_true", help="skip the JAX peer")
    ap.add_argument("--no-tf32", dest="tf32", action="store_false",
                    help="f32 matmuls of the peers in full f32 (ours uses TF32 for f32 weights)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="default cuda (cpu with --smoke); cpu: issue 24's CPU configurations")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start nothing new after this many seconds (default: none)")
    args = ap.parse_args()
    args.budget = Budget(args.budget_s)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.device == "cpu":
        args.tf32 = False  # no TF32 on the CPU: full f32 matmuls everywhere (JAX told so too)
    quick = args.quick or args.smoke
    args.budget_ms = 100.0 if quick else 300.0
    args.min_reps, args.max_reps = (2, 10) if quick else (3, 50)
    args.warmup = 1
    cpu_threads_env(args.threads)  # before torch and JAX are imported
    if args.dtypes is None:
        args.dtypes = "f32" if args.device == "cpu" and not args.smoke else ",".join(DTYPES)
    configs = (SMOKE_CONFIGS if args.smoke else CPU_CONFIGS if args.device == "cpu"
               else CONFIGS)
    wanted = [c.strip() for c in (args.configs or ",".join(c[0] for c in configs)).split(",")
              if c.strip()]
    unknown = set(wanted) - {c[0] for c in configs}
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if set(args.modes) - set(MODES) or set(args.dtypes) - set(DTYPES):
        ap.error(f"--modes from {MODES}, --dtypes from {DTYPES}")

    global torch
    try:
        import torch
    except ImportError:
        print("benches/peers/settle.py: skipped: PyTorch is not installed (pip install torch)")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benches/peers/settle.py: skipped: torch.cuda.is_available() is False "
              "(no GPU or a CPU-only PyTorch)")
        return 0

    import fep_kernels as fk

    try:
        fk.load(args.lib)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"benches/peers/settle.py: cannot load the library: {e}", file=sys.stderr)
        return 1
    if args.device == "cuda":
        kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
        if fk.device_count(kind) < 1:
            print(f"benches/peers/settle.py: the library at {fk._lib_path} sees no {kind} device "
                  f"(built without the {kind} feature?)", file=sys.stderr)
            return 1
        device = torch.device("cuda", torch.cuda.current_device())
        dev_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        dev_name = cpu_device_name(args.threads)
    apply_threads(args.threads, torch, fk)

    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    jx = setup_jax(args, device)
    jax_desc = (f"jax {jx['jax'].__version__} on {jx['device']}" if jx["ok"]
                else f"jax: SKIPPED ({jx['why']})")
    print(f"fep-kernels {fk.version()} | torch {torch.__version__} | {jax_desc} | {dev_name} | "
          f"f32 matmuls of the peers: {'TF32' if args.tf32 else 'full f32'} | threads torch "
          f"{torch.get_num_threads()}"
          + (f", ours {fk.get_num_threads()}" if hasattr(fk, "get_num_threads") else "")
          + (f" | {os.environ['XLA_FLAGS']}" if os.environ.get("XLA_FLAGS") else ""))
    args.compiled_steps = {}
    if not args.no_compile:
        # compiled once per dtype, reused by every configuration and mode (dynamic shapes)
        for dtype in args.dtypes:
            try:
                args.compiled_steps[dtype] = torch.compile(pc_step, dynamic=True)
            except Exception as e:
                args.compiled_steps[dtype] = f"torch.compile: {fail_msg(e)}"
    timer = Timer(device.type == "cuda")
    records = Records(args.out)
    t0 = time.perf_counter()
    with torch.no_grad():
        for cfg in configs:
            if cfg[0] in wanted:
                run_config(args, fk, jx, timer, device, dev_name, cfg, records)
    print_table(records)
    print(f"total {time.perf_counter() - t0:.1f} s")
    records.write()  # also when nothing was added: an empty list, not no file
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
