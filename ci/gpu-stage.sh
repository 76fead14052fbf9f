#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, everything the GPU suite runs, into gpu-stage/ (git-ignored,
# kept well under the 64 MiB a device call can carry):
#   gpu-stage/tests/<name>      release test binaries built with --features cuda
#   gpu-stage/bench-<op>        the criterion bench binaries (bench-lca, bench-settle, bench-vmp)
#   gpu-stage/tour              the tour example
#   gpu-stage/libfep_kernels.so the cdylib, for bindings/python and benches/peers
#   gpu-stage/wheels/           pymdp and its pure-Python dependencies, for benches/peers/vmp.py
#   gpu-stage/COMMIT            the commit (and whether the tree was dirty)
# and packs it as gpu-stage.tar.xz: every binary embeds the same kernel images, so xz shrinks the
# ~450 MB folder to ~17 MiB (at issue 20's filing), well under what a device call carries
# (64 MiB); the size is printed at the end. Carry that file. Then, on the GPU machine (no Rust
# there): timeout -s TERM -k 20 570 bash ci/gpu-run.sh (it unpacks the archive, and unpacks it
# again when a later call carries another one).
# FEP_CUDA_ARCHS defaults to 90a here (H100/H200); set it for other GPUs.
# FEP_GPU_STAGE_CPU=1 builds a CPU-only stand-in instead (no cuda feature, no nvcc, no wheels, not
# packed) into target/gpu-stage-cpu, for the suite's dry run on a machine without a GPU:
#   FEP_GPU_STAGE_CPU=1 bash ci/gpu-stage.sh
#   FEP_GPU_DRY_RUN=1 FEP_GPU_STAGE=target/gpu-stage-cpu bash ci/gpu-run.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ "${FEP_GPU_STAGE_CPU:-0}" = 1 ]; then
  features=()
  stage=target/gpu-stage-cpu
else
  eval "$(bash ci/setup-cuda.sh)"
  export FEP_CUDA_ARCHS=${FEP_CUDA_ARCHS:-90a}
  features=(--features cuda)
  stage=gpu-stage
fi
rm -rf "$stage"
mkdir -p "$stage/tests"

json=$(mktemp)
cargo test --release "${features[@]}" --tests --no-run --message-format=json >"$json"
# --release --benches, not `cargo bench`: the bench profile would run build.rs (every kernel) a second time.
cargo build --release "${features[@]}" --benches --message-format=json >>"$json"
cargo build --release "${features[@]}" --lib --examples --message-format=json >>"$json"
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
if [ "${FEP_GPU_STAGE_CPU:-0}" = 1 ]; then
  echo "CPU-only stand-in (no cuda feature) for FEP_GPU_DRY_RUN=1" >"$stage/CPU-ONLY"
  du -sh "$stage" >&2
  exit 0
fi

# pymdp for benches/peers/vmp.py: the GPU machine has PyTorch, JAX and CuPy but neither pymdp nor
# a network. Its pure-Python wheel and those of the pure-Python packages its Agent imports that
# a JAX install lacks (equinox, jaxtyping, wadler-lindig, multimethod; typing-extensions and
# opt-einsum as well, though torch and jax bring them: vmp.py searches these after the system's
# packages), pinned to versions that support Python >= 3.10, pymdp's own floor. Nothing with
# compiled code (jax, jaxlib, numpy, scipy, torch come from the machine), and not matplotlib,
# seaborn, mctx, networkx or numpyro, which the agent's code never calls (pymdp.utils imports
# matplotlib.pyplot at the top; vmp.py puts an empty stand-in there where it is missing).
# ci/gpu-run.sh installs them with pip --target into a temporary folder.
mkdir -p "$stage/wheels"
if ! python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.10 \
  -d "$stage/wheels" inferactively-pymdp==1.0.4 equinox==0.13.8 jaxtyping==0.3.7 \
  wadler-lindig==0.1.8 multimethod==2.0.2 typing-extensions==4.16.0 opt-einsum==3.4.0; then
  echo "WARNING: could not download the pymdp wheels; benches/peers/vmp.py will skip pymdp" >&2
fi
du -sh "$stage" >&2
ls -la "$stage" "$stage/tests" >&2
rm -f gpu-stage.tar.xz
# A dictionary larger than the whole stage, so each binary's copy of the kernel images (about
# 12 MB since attention's 75 kernels) compresses against the first one; the default 8 MiB
# window would see none of them (116 MB instead of ~8 MB before the attention kernels; ~17 MiB
# with them). Unpacking needs 256 MiB of memory.
XZ_OPT="--lzma2=preset=6,dict=256MiB" tar cJf gpu-stage.tar.xz "$stage"
ls -la gpu-stage.tar.xz >&2
