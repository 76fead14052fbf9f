#!/usr/bin/env python3
"""Peer benchmark for LCA sparse coding (DESIGN.md sections 4.3 and 7).

Times, on the same shapes and the same input tensors, in the same run:

  ours                 fep_lca_solve through the C ABI (bindings/python/fep_kernels); the
                       dictionary (Phi, G) is prepared once, outside the timed region
  eager                a dense PyTorch LCA, eager: b = x @ Phi; u = 0;
                       T times { a = theta(u); u = u + eta * (b - u - a @ G) }; a = theta(u)
  cuda_graph           the same eager loop captured once in a torch.cuda.CUDAGraph, replayed
  compiled             torch.compile of one LCA step (u, a) -> (u', theta(u')), called T times;
                       compiled once with dynamic shapes and reused for both configurations
  compiled_cuda_graph  the T compiled steps captured in a CUDAGraph, replayed

with G = Phi^T Phi - I precomputed for the peers (as ours caches it) and b = x @ Phi inside every
timed region (ours computes b inside fep_lca_solve). theta is the soft threshold
(torch.nn.functional.softshrink), eta = 0.1, tol = 0 (exactly T steps everywhere), float32 with
PyTorch's default matmul precision ("highest": no TF32).

Configurations: small B=256, n=64, m=256, T=100 and large B=4096, n=256, m=1024, T=200. Inputs:
fixed seed, Phi ~ N(0, 1) with unit-norm columns, x = Phi a_true + 0.05 noise with a_true 5%
sparse, generated on the GPU. lambda is first calibrated by bisection (with our solve) so that
about 5% of the units are active after T steps.

Each peer's final a is compared once with ours (relative L2 error) so the timings compare the
same computation. Timing: CUDA events around each repetition, warm-up first, median of N
repetitions (N chosen from a first measurement so each implementation takes ~1 s).

Usage:
    python3 benches/peers/lca.py --lib target/release/libfep_kernels.so --out lca_peers.json
    python3 benches/peers/lca.py --quick            # fewer repetitions and bisection steps
    python3 benches/peers/lca.py --quick --configs large --budget-s 40   # ci/gpu-run.sh's quick step

--budget-s stops starting new configurations once spent: those left are written as records with
"cut": true (no figures). Each implementation's record is written to the JSON as soon as it is
measured (ours first; benches/peers/timing.py's Records), so a timeout in a cold torch.compile
keeps the figures measured before it.

Prints a table (config, impl, ms, active fraction, ratio peer/ours, rel. error vs ours) and
writes the records as JSON to --out. Exits 0 with a message when PyTorch or CUDA is missing.
`--device cpu` runs everything on the CPU (wall-clock timing, no CUDA graphs) on the CPU
configurations of issue 24: small B=256, n=64, m=128, T=200 (the issue's measured shape) and
medium B=512, n=128, m=256, T=200; `--threads N` sets torch.set_num_threads(N) and
fep_kernels.set_num_threads(N) first; every record has the median ("ms") and the minimum
("ms_min") of the repetitions. `--smoke`: a tiny configuration on the CPU, a test of the script
(benches/cpu-suite.sh runs the CPU configurations at 1 and 2 threads).
"""

import argparse
import math
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.normpath(os.path.join(HERE, "..", "..", "bindings", "python")))

CONFIGS = [
    # name, B, n, m, T
    ("small", 256, 64, 256, 100),
    ("large", 4096, 256, 1024, 200),
]
CPU_CONFIGS = [  # issue 24: its measured shape, and a bigger one
    ("small", 256, 64, 128, 200),
    ("medium", 512, 128, 256, 200),
]
SMOKE_CONFIGS = [("tiny", 16, 8, 16, 5)]
ETA = 0.1
TARGET_ACTIVE = 0.05
TRUE_ACTIVE = 0.05
NOISE = 0.05
SEED = 20240607


# ---- the dense PyTorch LCA (the peer) ----

torch = None  # imported in main(), so that the script runs (and skips) without PyTorch
F = None


def lca_eager(x, phi, G, lam, eta, steps):
    """DESIGN.md 4.3 literally, with the soft threshold; returns (u, a)."""
    b = x @ phi
    u = torch.zeros_like(b)
    for _ in range(steps):
        a = F.softshrink(u, lam)
        u = u + eta * (b - u - a @ G)
    return u, F.softshrink(u, lam)


def lca_step(u, a, b, G, lam, eta: float):
    """One LCA step returning the new u and theta(u): the unit torch.compile compiles (the
    threshold of the next step fuses into this step's epilogue). ``lam`` is a 0-d tensor so that
    one compilation (dynamic shapes) serves every configuration; u - clamp(u, -lam, lam) is
    softshrink(u, lam) exactly."""
    u = u + eta * (b - u - a @ G)
    return u, u - torch.clamp(u, -lam, lam)


def lca_stepped(step, x, phi, G, lam, eta, steps):
    """The LCA loop driving a (compiled) step function; same maths as lca_eager."""
    b = x @ phi
    u = torch.zeros_like(b)
    a = torch.zeros_like(b)  # theta(0) = 0
    lam = torch.full((), lam, dtype=b.dtype, device=b.device)
    for _ in range(steps):
        u, a = step(u, a, b, G, lam, eta)
    return u, a


# ---- timing ----


# Timer and pick_reps: benches/peers/timing.py, shared by the peer scripts.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import (Budget, Records, Timer, apply_threads, cpu_device_name,  # noqa: E402
                    cpu_threads_env, fail_msg, pick_reps, ratio)


def capture_graph(torch, fn):
    """Captures fn() in a CUDA graph (after a warm-up on a side stream); returns (graph, outputs)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    return g, out


# ---- main ----


def make_inputs(torch, device, B, n, m, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    phi = torch.randn(n, m, generator=gen, device=device)
    phi = (phi / phi.norm(dim=0, keepdim=True)).contiguous()
    mask = torch.rand(B, m, generator=gen, device=device) < TRUE_ACTIVE
    mag = 0.5 + torch.rand(B, m, generator=gen, device=device)
    sign = torch.where(torch.rand(B, m, generator=gen, device=device) < 0.5, -1.0, 1.0)
    a_true = torch.where(mask, sign * mag, torch.zeros((), device=device))
    x = (a_true @ phi.T + NOISE * torch.randn(B, n, generator=gen, device=device)).contiguous()
    return phi, x


def rel_err(a, ref):
    den = ref.double().norm().item()
    num = (a.double() - ref.double()).norm().item()
    return num / den if den > 0 else num


def run_config(args, torch, fk, timer, device, dev_name, cfg, records):
    name, B, n, m, T = cfg
    phi, x = make_inputs(torch, device, B, n, m, SEED + B + n + m + T)
    G = (phi.T @ phi - torch.eye(m, device=device)).contiguous()
    dense_gflop = (2 * B * n * m + T * 2 * B * m * m) / 1e9
    print(f"\n== {name}: B={B} n={n} m={m} T={T} eta={ETA}  (dense LCA: {dense_gflop:.2f} GFLOP)")

    d = fk.LcaDictionary(phi)  # prepared once, not timed
    out = {
        "u": torch.empty(B, m, device=device),
        "a": torch.empty(B, m, device=device),
    }

    def ours(lam):
        return d.solve(x, lam=lam, eta=ETA, steps=T, threshold="soft", tol=0.0, out=out)

    def frac(a):
        return (a != 0).float().mean().item()

    # -- calibrate lambda: bisection in log space on the active fraction after T steps --
    hi = (x @ phi).abs().max().item()  # lam >= max|b|: nothing ever becomes active
    lo = hi * 1e-3
    lam, f = None, None
    for _ in range(args.bisect):
        lam = math.sqrt(lo * hi)
        f = frac(ours(lam)["a"])
        if f > TARGET_ACTIVE:
            lo = lam
        else:
            hi = lam
    timer.sync()
    print(f"lambda = {lam:.6g} (active fraction {f:.4f}, target {TARGET_ACTIVE}, "
          f"{args.bisect} bisection steps)")

    ref = ours(lam)
    timer.sync()
    a_ours = ref["a"].clone()

    shape = {"config": name, "B": B, "n": n, "m": m, "T": T, "eta": ETA, "lambda": lam}
    ours_ms = None  # ours is measured first: every peer's ratio is known when it is written

    def add(impl, ms=None, af=None, err=None, note="", ms_min=None):
        """Writes impl's record now, so a later peer that hangs or is killed cannot lose it."""
        nonlocal ours_ms
        if impl == "ours":
            ours_ms = ms
        records.add({**shape, "impl": impl, "ms": ms, "ms_min": ms_min,
                     "ratio_vs_ours": ratio(ms, ours_ms),
                     "active_fraction": af, "rel_err_vs_ours": err, "device": dev_name,
                     "threads": args.threads, "note": note})

    def measure(impl, fn, get_a):
        """Checks fn's final a once, then times fn; returns the median ms (None: failed)."""
        try:
            t_first = timer.once(fn)  # includes compilation / first-call costs
            a = get_a().clone()
            t1 = timer.once(fn)
            reps = pick_reps(t1, args.budget_ms, args.min_reps, args.max_reps)
            ms_min, ms = timer.stats(fn, reps, warmup=args.warmup)
        except Exception as e:  # a peer that cannot run is reported, not fatal
            msg = fail_msg(e)
            print(f"  {impl:<20} FAILED ({msg})")
            add(impl, note=msg)
            return None
        err = rel_err(a, a_ours) if impl != "ours" else 0.0
        note = f"first call {t_first:.1f} ms" if t_first > 5 * max(ms, 1e-3) else ""
        print(f"  {impl:<20} {ms:10.3f} ms  (min {ms_min:.3f}, reps {reps}) {note}")
        add(impl, ms, frac(a), err, note, ms_min=ms_min)
        return ms

    measure("ours", lambda: ours(lam), lambda: out["a"])

    state = {}

    def eager():
        state["eager"] = lca_eager(x, phi, G, lam, ETA, T)

    measure("eager", eager, lambda: state["eager"][1])

    if device.type == "cuda":
        graph = {}

        def graph_replay():
            if "g" not in graph:
                graph["g"], graph["out"] = capture_graph(
                    torch, lambda: lca_eager(x, phi, G, lam, ETA, T)
                )
            graph["g"].replay()

        measure("cuda_graph", graph_replay, lambda: graph["out"][1])
        graph.clear()

    if not args.no_compile:
        step = args.compiled_step
        if isinstance(step, str):
            print(f"  compiled             FAILED ({step})")
            add("compiled", note=step)
        else:

            def compiled():
                state["compiled"] = lca_stepped(step, x, phi, G, lam, ETA, T)

            compiled_ms = measure("compiled", compiled, lambda: state["compiled"][1])
            if device.type == "cuda" and compiled_ms is not None:
                cgraph = {}

                def cgraph_replay():
                    if "g" not in cgraph:
                        cgraph["g"], cgraph["out"] = capture_graph(
                            torch, lambda: lca_stepped(step, x, phi, G, lam, ETA, T)
                        )
                    cgraph["g"].replay()

                measure("compiled_cuda_graph", cgraph_replay, lambda: cgraph["out"][1])
                cgraph.clear()
        state.clear()

    d.close()


def print_table(records):
    print()
    hdr = f"{'config':<7} {'impl':<20} {'ms':>10} {'active':>8} {'peer/ours':>10} {'rel_err':>10}"
    print(hdr)
    print("-" * len(hdr))
    for r in records:
        if r["ms"] is None:
            what = "cut" if r.get("cut") else "failed"
            print(f"{r['config']:<7} {r['impl']:<20} {what:>10}   {r['note']}")
            continue
        ratio = f"{r['ratio_vs_ours']:.2f}x" if r["ratio_vs_ours"] is not None else "-"
        print(
            f"{r['config']:<7} {r['impl']:<20} {r['ms']:10.3f} {r['active_fraction']:8.4f} "
            f"{ratio:>10} {r['rel_err_vs_ours']:10.2e}"
        )
    print("(peer/ours > 1: ours is faster; rel_err: ||a_peer - a_ours|| / ||a_ours||)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lib", help="libfep_kernels.so (default: $FEP_KERNELS_LIB or "
                    "target/release/libfep_kernels.so)")
    ap.add_argument("--out", help="write the records as JSON here")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and bisection steps")
    ap.add_argument("--configs", default=None,
                    help="comma-separated subset of: " + ", ".join(c[0] for c in CONFIGS) +
                    " (GPU), " + ", ".join(c[0] for c in CPU_CONFIGS) + " (--device cpu)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile peers")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode (default; max-autotune-no-cudagraphs is slower to "
                    "compile)")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"],
                    help="default cuda (cpu with --smoke); cpu: issue 24's CPU configurations")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads: torch.set_num_threads(N) and fep_kernels.set_num_threads(N)")
    ap.add_argument("--smoke", action="store_true",
                    help="a tiny configuration, quick, on the CPU: tests the script")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="start no new configuration after this many seconds (default: none)")
    args = ap.parse_args()
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.quick = args.quick or args.smoke
    cpu_threads_env(args.threads)  # before torch is imported
    budget = Budget(args.budget_s)
    args.bisect = 6 if args.quick else (8 if args.device == "cpu" else 12)
    args.budget_ms = 300.0 if args.quick else 1000.0
    args.min_reps, args.max_reps = (3, 20) if args.quick else (5, 100)
    args.warmup = 1 if args.quick else 3
    if args.device == "cpu" and not args.quick:  # the two first calls warm up too
        args.budget_ms, args.min_reps, args.max_reps, args.warmup = 600.0, 3, 50, 1

    global torch, F
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("benches/peers/lca.py: skipped: PyTorch is not installed (pip install torch)")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("benches/peers/lca.py: skipped: torch.cuda.is_available() is False "
              "(no GPU or a CPU-only PyTorch)")
        return 0

    import fep_kernels as fk

    try:
        fk.load(args.lib)
    except (OSError, RuntimeError, ValueError) as e:
        print(f"benches/peers/lca.py: cannot load the library: {e}", file=sys.stderr)
        return 1
    if args.device == "cuda":
        kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
        if fk.device_count(kind) < 1:
            print(f"benches/peers/lca.py: the library at {fk._lib_path} sees no {kind} device "
                  f"(built without the {kind} feature?)", file=sys.stderr)
            return 1
        device = torch.device("cuda", torch.cuda.current_device())
        dev_name = torch.cuda.get_device_name(device)
    else:
        device = torch.device("cpu")
        dev_name = cpu_device_name(args.threads)
    apply_threads(args.threads, torch, fk)

    torch.manual_seed(SEED)
    print(f"fep-kernels {fk.version()} | torch {torch.__version__} | {dev_name} | "
          f"float32 matmul precision {torch.get_float32_matmul_precision()} | "
          f"threads torch {torch.get_num_threads()}"
          + (f", ours {fk.get_num_threads()}" if hasattr(fk, "get_num_threads") else ""))
    timer = Timer(device.type == "cuda")
    configs = (SMOKE_CONFIGS if args.smoke else CPU_CONFIGS if args.device == "cpu"
               else CONFIGS)
    wanted = ([c.strip() for c in args.configs.split(",") if c.strip()] if args.configs
              else [c[0] for c in configs])
    unknown = set(wanted) - {c[0] for c in configs}
    if unknown:
        ap.error(f"unknown configs {sorted(unknown)}")
    args.compiled_step = None
    if not args.no_compile:
        # compiled once, reused by every configuration (dynamic shapes; DESIGN.md section 7)
        try:
            args.compiled_step = torch.compile(lca_step, mode=args.compile_mode, dynamic=True)
        except Exception as e:
            args.compiled_step = f"torch.compile: {fail_msg(e)}"
    records = Records(args.out)
    t0 = time.perf_counter()
    with torch.no_grad():
        for cfg in configs:
            if cfg[0] not in wanted:
                continue
            if budget.spent():
                name, B, n, m, T = cfg
                print(f"== {name}: {budget.why()}")
                records.add({"config": name, "B": B, "n": n, "m": m, "T": T, "impl": "all",
                             "ms": None, "cut": True, "note": budget.why()})
            else:
                run_config(args, torch, fk, timer, device, dev_name, cfg, records)
    print_table(records)
    print(f"total {time.perf_counter() - t0:.1f} s")
    records.write()  # also when nothing was added: an empty list, not no file
    if args.out:
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
