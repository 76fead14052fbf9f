#!/usr/bin/env python3
"""Writes benches/results/<gpu>.md from one GPU-suite run (ci/gpu-run.sh): date, commit, device,
every criterion figure of our benches, and the peer timings with their ratio to ours.

Reads $OUT/device.txt, $OUT/criterion/**/new/estimates.json (CRITERION_HOME) and
$OUT/peers-*.json; writes the markdown into benches/results/ and a copy into $OUT. Only measured
figures are written: a missing input leaves its section saying so."""

import argparse
import datetime
import glob
import json
import os
import re

ap = argparse.ArgumentParser()
ap.add_argument("--out", required=True)
ap.add_argument("--commit", default="unknown")
args = ap.parse_args()

device = "unknown GPU"
try:
    lines = [l.strip() for l in open(os.path.join(args.out, "device.txt")) if l.strip()]
    if len(lines) >= 2:
        device = lines[1]
except OSError:
    pass
gpu = re.sub(r"[^a-z0-9]+", "-", device.split(",")[0].lower()).strip("-") or "gpu"

md = [f"# fep-kernels on {device.split(',')[0]}", ""]
md += [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC", f"- commit: {args.commit}",
       f"- device (name, driver, memory, max SM clock): {device}", ""]

md += ["## Our benches (criterion, benches/*.rs)", "",
       "| group | benchmark | median time | per step (T from the id) | throughput (sample-steps/s) |",
       "|---|---|---|---|---|"]
found = False
for est in sorted(glob.glob(os.path.join(args.out, "criterion", "**", "new", "estimates.json"), recursive=True)):
    parts = est.split(os.sep)
    group, bench = parts[-4], parts[-3]
    med = json.load(open(est))["median"]["point_estimate"]  # ns
    bench_json = os.path.join(os.path.dirname(est), "benchmark.json")
    thr = ""
    try:
        t = json.load(open(bench_json)).get("throughput") or {}
        if "Elements" in t:
            thr = f"{t['Elements'] / (med * 1e-9):.3e}"
    except OSError:
        pass
    steps = re.search(r"_T(\d+)$", bench)
    per_step = f"{med / 1e3 / int(steps.group(1)):.2f} us" if steps and int(steps.group(1)) > 0 else ""
    md.append(f"| {group} | {bench} | {med / 1e6:.4f} ms | {per_step} | {thr} |")
    found = True
if not found:
    md.append("| (no criterion results found) | | | | |")
md.append("")


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


for peers in sorted(glob.glob(os.path.join(args.out, "peers-*.json"))):
    op = os.path.basename(peers)[len("peers-"):-len(".json")]
    recs = json.load(open(peers))
    md += [f"## {op}: peers in the same run (benches/peers/{op}.py)", ""]
    md += settle_rows(recs) if recs and "widths" in recs[0] else lca_rows(recs)
    md.append("")

text = "\n".join(md) + "\n"
os.makedirs("benches/results", exist_ok=True)
for path in (f"benches/results/{gpu}.md", os.path.join(args.out, f"{gpu}.md")):
    with open(path, "w") as f:
        f.write(text)
print(text)
