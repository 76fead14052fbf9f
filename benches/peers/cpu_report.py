#!/usr/bin/env python3
"""Writes benches/results/cpu-<machine>.md from one run of benches/cpu-suite.sh (issue 24).

Reads the records the peer scripts wrote to DIR (attention-t<N>.json from `attention.py --op
cpu`, settle-t<N>.json, lca-t<N>.json, vmp-t<N>.json from `--device cpu`, one per thread count
N) and the example timings (examples-t<N>.txt: `name seconds rc` lines), and writes a Markdown
file: the date, commit, CPU model, thread counts and versions, then for every row ours against
each peer: the median and minimum times, the ratio peer/ours of the medians (> 1: ours is faster)
and of the minima, issue 24's target for that ratio and whether the median ratio meets it; last,
a summary of the targets met and missed. Only measured figures are written; a row cut for time
or failed says so.

Targets (issue 24, ratio = peer time / our time):
  charlm     eager >= 1 (sdpa: shown, no target)
  attention  eager >= 1 (Dot, and every family at L < 512), >= 2 for Gaussian, Student-t and
             Laplace at L >= 512 (forward and forward + backward); sdpa >= 0.8 (Dot within
             1.25x of torch SDPA)
  settle     eager >= 2, compiled >= 1 (the sizes benchmarked are the small and medium ones);
             jax_jit: no target (shown for reference)
  lca        eager >= 2, compiled >= 1
  vmp        pymdp_jax >= 1 (state and policy inference, T-maze and three-factor, N 1k and 10k)

Usage:
    python3 benches/peers/cpu_report.py --dir target/cpu-suite --threads 1,2 \\
        --out benches/results/cpu-xeon-2c.md [--machine xeon-2c] [--status "..."]
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, HERE)
from timing import cpu_model  # noqa: E402

SCRIPTS = ["attention", "charlm", "settle", "lca", "vmp"]
TITLES = {
    "attention": "Attention (f32, full, H 2, D 32; `attention.py --op cpu`)",
    "charlm": "A char-LM training step with Student-t attention (f32, B 16, L 128, H 2, D 32, "
              "Adam; `charlm.py`; sdpa is the same step with torch's Dot SDPA, for reference)",
    "settle": "Predictive-coding settling (f32; `settle.py --device cpu`)",
    "lca": "LCA sparse coding (f32, soft threshold, tol 0; `lca.py --device cpu`)",
    "vmp": "VMP, state and policy inference (pymdp's jitted, vmapped JAX agent; "
           "`vmp.py --device cpu`)",
}
TARGET_SETTLE_LCA = {"eager": (2.0, ">=2x eager"), "compiled": (1.0, ">=1x torch.compile")}


def shape_key(script, r):
    """(the row's shape as text, a key grouping ours with its peers)."""
    if script == "attention":
        kind = {"cpu_fwd": "fwd", "cpu_fwdbwd": "fwd+bwd"}.get(r.get("kind"), r.get("kind"))
        txt = f"{r['family']} {kind} B{r['B']} H{r['H']} L{r['L']} D{r['D']}"
        return txt, (r.get("kind"), r["family"], r["L"])
    if script == "settle":
        w = "-".join(str(x) for x in r.get("widths", []))
        txt = f"{r['config']} {r['mode']} {w} B{r['B']} T{r['T']} {r.get('dtype', '')}"
        return txt, (r["config"], r["mode"], r.get("dtype"), r["T"])
    if script == "charlm":
        return r["config"], (r["config"],)
    if script == "lca":
        txt = f"{r['config']} B{r['B']} n{r['n']} m{r['m']} T{r['T']}"
        return txt, (r["config"],)
    txt = f"{r['config']} N{r['N']}"
    return txt, (r["config"], r["N"])


def target_of(script, r):
    """(minimum ratio peer/ours, text) of issue 24 for this peer's row, or (None, "")."""
    impl = r["impl"]
    if script in ("attention", "charlm"):
        t = r.get("target")
        return (t, r.get("target_text") or "") if t is not None else (None, "")
    if script in ("settle", "lca"):
        return TARGET_SETTLE_LCA.get(impl, (None, ""))
    if script == "vmp" and impl == "pymdp_jax":
        t = r.get("target_ratio")
        return (t, f">={t:g}x pymdp") if t is not None else (None, "")
    return None, ""


def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3f}" if ms < 100 else f"{ms:.1f}"


def fmt_ratio(x):
    return f"{x:.2f}x" if x is not None else "-"


def load(path):
    try:
        with open(path) as f:
            return json.load(f), None
    except FileNotFoundError:
        return None, "no records (the script did not run, or wrote nothing)"
    except Exception as e:  # a truncated file cannot happen (timing.write_json), but say so
        return None, f"unreadable: {type(e).__name__}: {e}"


def git(*args):
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              timeout=20).stdout.strip()
    except Exception:
        return ""


def versions():
    out = []
    for mod, dist in (("torch", "torch"), ("jax", "jax"), ("pymdp", "inferactively-pymdp"),
                      ("numpy", "numpy")):
        try:
            from importlib import metadata
            out.append(f"{mod} {metadata.version(dist)}")
        except Exception:
            out.append(f"{mod} (not installed)")
    return ", ".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="the folder of the suite's JSON records")
    ap.add_argument("--threads", default="1,2", help="the thread counts run (comma-separated)")
    ap.add_argument("--out", required=True, help="the Markdown file to write")
    ap.add_argument("--machine", default=None, help="the machine's slug (for the title)")
    ap.add_argument("--status", default="", help="a line on how the run went (the runner's)")
    ap.add_argument("--examples-before", default="",
                    help="name=seconds,... : the examples' times before the fast path, for the "
                    "ratio (e.g. tour=12.3,pc_digits=40.1)")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.replace(" ", ",").split(",") if t.strip()]
    before = {}
    for item in args.examples_before.split(","):
        if "=" in item:
            k, v = item.split("=", 1)
            before[k.strip()] = float(v)

    lines = []
    met, missed, untested = [], [], []
    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    lines += [
        f"# CPU benchmarks: {args.machine or 'this machine'} (issue 24)",
        "",
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- commit: {commit}{' (with uncommitted changes)' if dirty else ''}",
        f"- CPU: {cpu_model()}, {os.cpu_count()} logical cores ({platform.machine()})",
        f"- thread counts: {', '.join(str(t) for t in threads)} (torch.set_num_threads, "
        "fep_kernels.set_num_threads; JAX with `--xla_cpu_multi_thread_eigen=false "
        "intra_op_parallelism_threads=1` at 1 thread, XLA's default at more)",
        f"- peers: {versions()}",
        "- runner: `bash benches/cpu-suite.sh` (benches/peers/*.py on the CPU, one process per "
        "script and thread count, wall clock, warm-up, repeated; ms = median, min = minimum)",
    ]
    if args.status:
        lines.append(f"- status of the run: {args.status}")
    lines += ["", "Ratio = peer time / our time (> 1: ours is faster), of the medians "
              "(of the minima in brackets); met: the median ratio against issue 24's target.", ""]

    for script in SCRIPTS:
        lines += [f"## {TITLES[script]}", ""]
        lines += ["| shape | threads | ours ms (min) | peer | peer ms (min) | peer/ours | "
                  "target | met |", "|---|---|---|---|---|---|---|---|"]
        notes = []
        for t in threads:
            recs, why = load(os.path.join(args.dir, f"{script}-t{t}.json"))
            if recs is None:
                notes.append(f"{t} thread(s): {why}")
                continue
            ours = {}
            for r in recs:
                if r.get("cut"):
                    txt, _ = shape_key(script, r)
                    lines.append(f"| {txt} | {t} | cut for time | | | | | |")
                    continue
                txt, key = shape_key(script, r)
                if r["impl"] == "ours":
                    ours[key] = r
                    if r.get("ms") is None:
                        lines.append(f"| {txt} | {t} | {r.get('note') or 'failed'} | | | | | |")
                    continue
                o = ours.get(key)
                tgt, tgt_text = target_of(script, r)
                o_ms = o.get("ms") if o else None
                o_min = o.get("ms_min") if o else None
                if r.get("ms") is None:
                    lines.append(f"| {txt} | {t} | {fmt_ms(o_ms)} ({fmt_ms(o_min)}) | "
                                 f"{r['impl']} | {r.get('note') or 'failed'} | - | {tgt_text} "
                                 "| - |")
                    if tgt is not None:
                        untested.append(f"{script} {txt}, {t} thread(s) vs {r['impl']}: "
                                        "peer not measured")
                    continue
                rat = r["ms"] / o_ms if o_ms else None
                rat_min = (r["ms_min"] / o_min) if (o_min and r.get("ms_min")) else None
                ok = ""
                if tgt is not None:
                    label = f"{script} {txt}, {t} thread(s) vs {r['impl']} ({tgt_text})"
                    if rat is None:
                        ok = "-"
                        untested.append(f"{label}: ours not measured")
                    elif rat >= tgt:
                        ok = "yes"
                        met.append(label)
                    else:
                        ok = "**no**"
                        missed.append(f"{label}: {rat:.2f}x")
                lines.append(f"| {txt} | {t} | {fmt_ms(o_ms)} ({fmt_ms(o_min)}) | {r['impl']} | "
                             f"{fmt_ms(r['ms'])} ({fmt_ms(r.get('ms_min'))}) | {fmt_ratio(rat)} "
                             f"({fmt_ratio(rat_min)}) | {tgt_text} | {ok} |")
        lines.append("")
        if notes:
            lines += [f"- {n}" for n in notes] + [""]

    ex_lines = []
    for t in threads:
        path = os.path.join(args.dir, f"examples-t{t}.txt")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                name, secs, rc = parts[0], parts[1], parts[2]
                b = before.get(name)
                if b is None and len(parts) > 3 and parts[3] != "-":
                    b = float(parts[3])  # the runner's own run of the example on --reference
                try:
                    s = float(secs)
                    sp = f"{b / s:.2f}x" if b else "-"
                    secs_txt = f"{s:.2f}"
                except ValueError:
                    sp, secs_txt = "-", secs
                ex_lines.append(f"| {name} | {t} | {secs_txt} | {rc} | "
                                f"{b if b else '-'} | {sp} |")
    if ex_lines:
        lines += ["## Examples (prebuilt target/release/examples/*, wall clock, one run)", "",
                  "| example | threads | seconds | exit | before (s) | speed-up |",
                  "|---|---|---|---|---|---|"] + ex_lines + [
                  "", "Target: the tour and pc_digits faster than before the fast path (before: the "
                  "same example with `--reference`, the f64 reference the CPU device ran until "
                  "issue 24, timed in the same run; or `--examples-before`).", ""]

    lines += ["## Targets", "",
              f"{len(met)} met, {len(missed)} missed, {len(untested)} not measured.", ""]
    if missed:
        lines += ["Missed:", ""] + [f"- {m}" for m in missed] + [""]
    if untested:
        lines += ["Not measured:", ""] + [f"- {m}" for m in untested] + [""]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    print(f"wrote {args.out}: {len(met)} targets met, {len(missed)} missed, "
          f"{len(untested)} not measured")
    return 0


if __name__ == "__main__":
    sys.exit(main())
