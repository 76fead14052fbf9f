#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, everything the GPU suite runs, into gpu-stage/ (git-ignored,
# kept well under the 64 MiB a device call can carry):
#   gpu-stage/tests/<name>      release test binaries built with --features cuda
#   gpu-stage/bench-<op>        the criterion bench binaries (bench-lca, bench-settle)
#   gpu-stage/tour              the tour example
#   gpu-stage/libfep_kernels.so the cdylib, for bindings/python and benches/peers
#   gpu-stage/COMMIT            the commit (and whether the tree was dirty)
# Then, on the GPU machine (no Rust there): bash ci/gpu-run.sh
# FEP_CUDA_ARCHS defaults to 90a here (H100/H200); set it for other GPUs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
eval "$(bash ci/setup-cuda.sh)"
export FEP_CUDA_ARCHS=${FEP_CUDA_ARCHS:-90a}
stage=gpu-stage
rm -rf "$stage"
mkdir -p "$stage/tests"

json=$(mktemp)
cargo test --release --features cuda --tests --no-run --message-format=json >"$json"
cargo bench --features cuda --no-run --message-format=json >>"$json"
cargo build --release --features cuda --lib --examples --message-format=json >>"$json"
python3 - "$json" "$stage" <<'PY'
import json, shutil, sys, os
src, stage = sys.argv[1], sys.argv[2]
for line in open(src):
    if not line.startswith("{"):
        continue
    msg = json.loads(line)
    if msg.get("reason") != "compiler-artifact" or not msg.get("target"):
        continue
    t, exe = msg["target"], msg.get("executable")
    kinds = t["kind"]
    if exe and "test" in kinds and msg["profile"]["test"]:
        shutil.copy(exe, os.path.join(stage, "tests", t["name"]))
    elif exe and "bench" in kinds:
        shutil.copy(exe, os.path.join(stage, "bench-" + t["name"]))
    elif exe and "example" in kinds:
        shutil.copy(exe, os.path.join(stage, t["name"]))
    for f in msg.get("filenames", []):
        if f.endswith(".so") and "cdylib" in kinds:
            shutil.copy(f, os.path.join(stage, os.path.basename(f)))
PY
rm -f "$json"
strip "$stage"/tests/* "$stage"/bench-* "$stage"/tour "$stage"/*.so 2>/dev/null || true
echo "$(git rev-parse HEAD)$(git diff --quiet HEAD || echo '-dirty')" >"$stage/COMMIT"
du -sh "$stage" >&2
ls -la "$stage" "$stage/tests" >&2
