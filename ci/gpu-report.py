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
       "| group | benchmark | median time | throughput (sample-steps/s) |", "|---|---|---|---|"]
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
    md.append(f"| {group} | {bench} | {med / 1e6:.4f} ms | {thr} |")
    found = True
if not found:
    md.append("| (no criterion results found) | | | |")
md.append("")

for peers in sorted(glob.glob(os.path.join(args.out, "peers-*.json"))):
    op = os.path.basename(peers)[len("peers-"):-len(".json")]
    recs = json.load(open(peers))
    md += [f"## {op}: peers in the same run (benches/peers/{op}.py)", "",
           "| config | impl | ms | ratio impl/ours | active fraction | rel. error vs ours | note |",
           "|---|---|---|---|---|---|---|"]
    for r in recs:
        ms = f"{r['ms']:.4f}" if r.get("ms") is not None else "failed"
        ratio = f"{r['ratio_vs_ours']:.2f}" if r.get("ratio_vs_ours") is not None else "-"
        af = f"{r['active_fraction']:.3f}" if r.get("active_fraction") is not None else "-"
        err = f"{r['rel_err_vs_ours']:.2e}" if r.get("rel_err_vs_ours") is not None else "-"
        md.append(f"| {r['config']} (B={r['B']} n={r['n']} m={r['m']} T={r['T']}) | {r['impl']} | {ms} | {ratio} | {af} | {err} | {r.get('note') or ''} |")
    md.append("")

text = "\n".join(md) + "\n"
os.makedirs("benches/results", exist_ok=True)
for path in (f"benches/results/{gpu}.md", os.path.join(args.out, f"{gpu}.md")):
    with open(path, "w") as f:
        f.write(text)
print(text)
