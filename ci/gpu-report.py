#!/usr/bin/env python3
"""Writes benches/results/<gpu>.md from one GPU-suite run (ci/gpu-run.sh): date, commit, device,
what ran and what was cut for time, every criterion figure of our benches, and the peer timings
with their ratio to ours.

Reads, in the run folder (--run: ci/gpu-run.sh's target/gpu-run/run, packed as run/ in
$OUT/gpu-run.tar.gz): device.txt, steps.tsv (one line per item: status, seconds, limit, note),
expected.txt (the criterion ids the quick step should measure), criterion/**/new/estimates.json
(CRITERION_HOME) and peers-*.json. Writes the markdown into --out and, with --results-dir, into
that folder too (benches/results/ on a GPU machine; not for a dry run). Only measured figures are
written: a record without a figure (failed, skipped, cut) says why instead, and what was cut for
time is listed in its own section.

    tar xzf gpu-out/gpu-run.tar.gz && python3 ci/gpu-report.py --run run --out . --commit abc123
    (older runs: --out DIR alone reads DIR)"""

import argparse
import collections
import datetime
import glob
import json
import os
import re

ap = argparse.ArgumentParser()
ap.add_argument("--run", help="the run folder (default: --out)")
ap.add_argument("--out", required=True, help="where to write <gpu>.md")
ap.add_argument("--commit", default="unknown")
ap.add_argument("--results-dir", help="write <gpu>.md here too (benches/results)")
ap.add_argument("--dry-run", action="store_true", help="a CPU dry run: named dry-run.md")
ap.add_argument("--status", default=None,
                help="the run as a whole: complete, running (a report published mid-run), or "
                "stopped by a signal")
args = ap.parse_args()
run = args.run or args.out

device = "unknown GPU"
try:
    lines = [l.strip() for l in open(os.path.join(run, "device.txt")) if l.strip()]
    if len(lines) >= 2:
        device = lines[1]
except OSError:
    pass
gpu = re.sub(r"[^a-z0-9]+", "-", device.split(",")[0].lower()).strip("-") or "gpu"
if args.dry_run:
    gpu = "dry-run"

# ---- what ran (steps.tsv) ----
Item = collections.namedtuple("Item", "order step item status seconds limit note")
runs = []
try:
    with open(os.path.join(run, "steps.tsv")) as f:
        for i, line in enumerate(f):
            cols = line.rstrip("\n").split("\t")
            if i == 0 or len(cols) < 7:
                continue
            runs.append(Item(int(cols[0]) if cols[0].isdigit() else 999, *cols[1:7]))
except OSError:
    pass
last = {}  # the last run of each item (an item cut in its step may have run in step 4)
for r in runs:
    last[f"{r.step}.{r.item}"] = r

title = "a dry run on the CPU (no GPU: fixed costs and control flow only)" if args.dry_run \
    else device.split(",")[0]
md = [f"# fep-kernels on {title}", ""]
md += [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", f"- commit: {args.commit}",
       f"- device (name, driver, memory, max SM clock, SM clock, temperature, power): {device}"]
if args.status:
    md.append(f"- status of the run: {args.status}" + (
        "" if args.status == "complete" else
        " (this report was published before the run ended: what it lacks was not measured)"
        if args.status.startswith(("running", "started")) else ""))
try:
    for line in open(os.path.join(run, "left-behind.txt")):
        md.append(f"- LEFT BEHIND (outlived TERM and KILL, still running when published): {line.strip()}")
except OSError:
    pass
if runs:
    total = sum(float(r.seconds) for r in runs if r.seconds.replace(".", "").isdigit())
    md.append(f"- the suite: ci/gpu-run.sh, one device call; {len(last)} items, "
              f"{total:.0f} s of item time")
md.append("")

# ---- the run, and what was cut ----
if runs:
    md += ["## The run (ci/gpu-run.sh)", "",
           "One line per item in plan order (step 1 port, 2 tests, 3 quick benches, 4 the rest). "
           "ok / FAILED / TIMEOUT (its own limit); KILLED: stopped when its step's budget ran "
           "out or when the suite was stopped (TERM/INT); CUT: not started, the step's budget "
           "was spent or the suite was stopped; SKIPPED: not selected or not "
           "run on a GPU machine by design; MISSING: not in the stage. An item cut in its step "
           "and run in step 4 shows both lines.", "",
           "| step | item | status | seconds | limit (s) | note |", "|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: r.order):
        md.append(f"| {r.step} | {r.item} | {r.status} | {r.seconds} | {r.limit} | "
                  f"{r.note.replace('|', '/')} |")
    md.append("")

cut_lines = []
for k, r in last.items():
    if r.status in ("CUT", "KILLED"):
        cut_lines.append(f"- {k}: {r.status} ({r.note})")

md += ["## Our benches (criterion, benches/*.rs)", "",
       "Throughput counts elements per second: sample-steps (B·T) for lca and settle, "
       "agent-iterations (N·K) for vmp state inference, agent-policies (N·P) for vmp policy "
       "inference, FLOPs for attention (FlashAttention's convention 4·B·Hq·Lq·Lk·D, halved when "
       "causal: the TFLOP/s column; backward 2.5x the forward), bytes of the KV cache read for attention "
       "decode (GB/s). Per step: the median over T (lca, settle) or K (vmp) from "
       "the id. Step 3 measures with FEP_BENCH_QUICK=1 (10 samples, short warm-up and measurement, "
       "a filter per bench); where step 4's full bench measured the same id later, its figure "
       "is the one shown.", "",
       "| group | benchmark | median time | per step / iteration | throughput (elements/s) | agents/s (vmp) | TFLOP/s (attention) |",
       "|---|---|---|---|---|---|---|"]
found = False
found_ids = set()
for est in sorted(glob.glob(os.path.join(run, "criterion", "**", "new", "estimates.json"), recursive=True)):
    parts = est.split(os.sep)
    group, bench = parts[-4], parts[-3]
    found_ids.add(f"{group}/{bench}")
    med = json.load(open(est))["median"]["point_estimate"]  # ns
    bench_json = os.path.join(os.path.dirname(est), "benchmark.json")
    thr = tflops = ""
    try:
        t = json.load(open(bench_json)).get("throughput") or {}
        if "Elements" in t:
            thr = f"{t['Elements'] / (med * 1e-9):.3e}"
            if "_attention_" in group:
                tflops = f"{t['Elements'] / (med * 1e-9) / 1e12:.2f}"
        elif "Bytes" in t:
            # attention decode: the KV cache read per call, as GB/s (the HBM floor is in the bench)
            thr = f"{t['Bytes'] / (med * 1e-9) / 1e9:.1f} GB/s"
    except OSError:
        pass
    steps = re.search(r"_[TK](\d+)$", bench)
    per_step = f"{med / 1e3 / int(steps.group(1)):.2f} us" if steps and int(steps.group(1)) > 0 else ""
    agents = re.match(r"N(\d+)_", bench) if "_vmp_" in group else None
    agents = f"{int(agents.group(1)) / (med * 1e-9):.3e}" if agents else ""
    md.append(f"| {group} | {bench} | {med / 1e6:.4f} ms | {per_step} | {thr} | {agents} | {tflops} |")
    found = True
if not found:
    md.append("| (no criterion results found) | | | | | | |")
md.append("")

# the quick step's criterion ids that were not measured (the bench was cut, killed or failed)
try:
    missing = collections.defaultdict(list)
    for line in open(os.path.join(run, "expected.txt")):
        item, _, bid = line.strip().partition(" ")
        if bid and bid not in found_ids:
            missing[item].append(bid)
    for item, ids in missing.items():
        why = last[item].status if item in last else "not run"
        how = ("cut for time" if why in ("CUT", "KILLED") else
               "its own timeout" if why == "TIMEOUT" else
               "the bench skipped or failed them: see its log" if why in ("ok", "FAILED") else why)
        cut_lines.append(f"- {item} ({why}): {len(ids)} benchmark(s) not measured ({how}): "
                         + ", ".join(ids))
except OSError:
    pass


def fmt(v, spec, missing="-"):
    return format(v, spec) if v is not None else missing


def lca_rows(recs):
    rows = ["| config | impl | ms | ratio impl/ours | active fraction | rel. error vs ours | note |",
            "|---|---|---|---|---|---|---|"]
    for r in recs:
        rows.append(f"| {r['config']} (B={r['B']} n={r['n']} m={r['m']} T={r['T']}) | {r['impl']} | "
                    f"{fmt(r.get('ms'), '.4f', 'failed')} | {fmt(r.get('ratio_vs_ours'), '.2f')} | "
                    f"{fmt(r.get('active_fraction'), '.3f')} | {fmt(r.get('rel_err_vs_ours'), '.2e')} | "
                    f"{r.get('note') or ''} |")
    return rows


def settle_rows(recs):
    rows = ["| config | mode | dtype | impl | ms per settle | us per step | ratio impl/ours | "
            "rel. error vs ours | note |", "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        widths = "-".join(str(w) for w in r["widths"])
        failed = "skipped" if (r.get("note") or "").startswith("SKIPPED") else "failed"
        per_step = r["ms_per_step"] * 1e3 if r.get("ms_per_step") is not None else None
        rows.append(f"| {r['config']} ({widths}, B={r['B']}, T={r['T']}) | {r['mode']} | {r['dtype']} | "
                    f"{r['impl']} | {fmt(r.get('ms'), '.4f', failed)} | {fmt(per_step, '.1f')} | "
                    f"{fmt(r.get('ratio_vs_ours'), '.2f')} | {fmt(r.get('rel_err_vs_ours'), '.2e')} | "
                    f"{r.get('note') or ''} |")
    return rows


def vmp_rows(recs):
    rows = ["Issue 4's targets for the ratio pymdp_jax/ours are shown next to the measured ratio: "
            ">= 100x for state inference at N = 100k, >= 50x for policy inference at N = 10k. "
            "Throughput: agent-iterations/s (N·K) for state inference, agent-policies/s (N·P) "
            "for policy inference. max abs diff: of qs (states) or q(pi) (policies) between "
            "pymdp (float32) and ours.", "",
            "| config | N | impl | ms per call | agents/s | throughput | ratio impl/ours | "
            "target | max abs diff vs ours | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        shape = f"K={r['K']}" if r.get("K") else f"P={r.get('P')} H={r.get('H')}"
        failed = "skipped" if (r.get("note") or "").startswith("SKIPPED") else "failed"
        target = f">= {r['target_ratio']:g}x" if r.get("target_ratio") else ""
        thr = (f"{r['throughput']:.3e} {r.get('throughput_unit', '')}"
               if r.get("throughput") is not None else "-")
        rows.append(f"| {r['config']} ({r['model']}, {shape}) | {r['N']} | {r['impl']} | "
                    f"{fmt(r.get('ms'), '.4f', failed)} | {fmt(r.get('agents_per_s'), '.3e')} | "
                    f"{thr} | {fmt(r.get('ratio_vs_ours'), '.2f')} | {target} | "
                    f"{fmt(r.get('max_abs_diff_vs_ours'), '.2e')} | {r.get('note') or ''} |")
    return rows


def attention_rows(recs):
    rows = ["Issue 5's targets on an H100 are shown next to the rows they concern (not as a "
            "verdict): Dot >= 350 TFLOP/s non-causal at L >= 4k; every family at least as fast "
            "as flex with the same score (flex/ours >= 1); Gaussian (per-head precision) within "
            "10% of our Dot; Student-t >= 60% of our Dot. TFLOP/s by FlashAttention's convention "
            "(4·B·Hq·L²·D, halved when causal) for every implementation. ratio: impl time / our "
            "time (> 1: ours is faster). rel. error: max|o − ref| / max|ref| against a float32 "
            "evaluation on batch 0, heads 0-1, at the shortest length measured.", "",
            "| family (precision) | mask | dtype | D | L | B×H | impl | ms | TFLOP/s | "
            "ratio impl/ours | target | rel. error | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        failed = "skipped" if (r.get("note") or "").startswith("SKIPPED") else "failed"
        rows.append(f"| {r['family']} ({r.get('precision', '')}) | "
                    f"{'causal' if r['causal'] else 'full'} | {r['dtype']} | {r['D']} | {r['L']} | "
                    f"{r['B']}×{r['H']} | {r['impl']} | {fmt(r.get('ms'), '.4f', failed)} | "
                    f"{fmt(r.get('tflops'), '.1f')} | {fmt(r.get('ratio_vs_ours'), '.2f')} | "
                    f"{r.get('target') or ''} | {fmt(r.get('rel_err_vs_ref'), '.1e')} | "
                    f"{r.get('note') or ''} |")
    return rows


def cut_desc(r):
    keys = ("family", "config", "mode", "dtype", "D", "L", "N", "T")
    parts = []
    for k in keys:
        if r.get(k) is None:
            continue
        v = r[k]
        parts.append(f"{k}={v}" if k in ("D", "L", "N", "T") else str(v))
    if "causal" in r:
        parts.insert(1, "causal" if r["causal"] else "full")
    return " ".join(parts)


for peers in sorted(glob.glob(os.path.join(run, "peers-*.json"))):
    op = os.path.basename(peers)[len("peers-"):-len(".json")]
    script = op.split("-")[0]
    try:
        recs = json.load(open(peers))
    except (OSError, ValueError) as e:
        md += [f"## {op}: peers (benches/peers/{script}.py)", "", f"(unreadable: {e})", ""]
        continue
    cut = [r for r in recs if r.get("cut")]
    recs = [r for r in recs if not r.get("cut")]
    if cut:
        cut_lines.append(f"- peers-{op} (its own --budget-s): {len(cut)} configuration(s) not "
                         "measured: " + "; ".join(cut_desc(r) for r in cut))
    md += [f"## {op}: peers in the same run (benches/peers/{script}.py)", ""]
    if not recs:
        md.append("(no records: the script was skipped or cut; see its log in gpu-run.tar.gz)")
    elif recs[0].get("op") == "attention":
        md += attention_rows(recs)
    elif recs[0].get("op") == "vmp":
        md += vmp_rows(recs)
    elif recs and "widths" in recs[0]:
        md += settle_rows(recs)
    else:
        md += lca_rows(recs)
    md.append("")

# what was cut for time, after the header (before the figures)
cut_md = ["## Cut for time, or not measured", "",
          "What the plan asked for and this run did not measure: items not started (CUT) or "
          "stopped (KILLED) when their step's budget ran out, criterion ids of step 3 with no "
          "figure, and the configurations the peer scripts did not start within their own "
          "--budget-s. No figure is written for any of them.", ""]
cut_md += cut_lines if cut_lines else ["Nothing: every item and configuration of the plan ran."]
cut_md.append("")
at = next((i for i, l in enumerate(md) if l.startswith("## Our benches")), len(md))
md[at:at] = cut_md

text = "\n".join(md) + "\n"
paths = [os.path.join(args.out, f"{gpu}.md")]
if args.results_dir:
    os.makedirs(args.results_dir, exist_ok=True)
    paths.append(os.path.join(args.results_dir, f"{gpu}.md"))
for path in paths:
    with open(path, "w") as f:
        f.write(text)
    print(f"wrote {path}")
