#!/usr/bin/env bash
# The GPU suite, on a GPU machine without Rust, over the binaries of ci/gpu-stage.sh:
#   1. every test binary, with FEP_REQUIRE_GPU=1 (a GPU test that finds no GPU fails here);
#   2. the tour, the digits example and the Python binding tests (on CUDA tensors);
#      then the criterion benches;
#   3. the peer scripts (PyTorch SDPA and FlexAttention, JAX, pymdp) on the same shapes, through the C ABI; pymdp is
#      installed from the wheels of gpu-stage/wheels/ into a temporary folder that only
#      benches/peers/vmp.py searches (this machine has no network; nothing system-wide changes);
#   4. benches/results/<gpu>.md from 2 and 3 (written into $OUT too).
# Logs go to $OUT (default gpu-out/). Exits non-zero if any test failed.
# FEP_GPU_STEPS (default "tests python benches peers") picks the steps, so a device call that
# would pass its 10-minute limit can be split in two (the report covers what ran).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
stage=gpu-stage
# ci/gpu-stage.sh's archive (what a device call carries), unpacked once.
if [ ! -d "$stage" ] && [ -f gpu-stage.tar.xz ]; then
  tar xJf gpu-stage.tar.xz || python3 -m tarfile -e gpu-stage.tar.xz .
fi
export FEP_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/device.txt" 2>&1 || true
cat "$OUT/device.txt"

steps=" ${FEP_GPU_STEPS:-tests python benches peers} "
want() { [[ "$steps" == *" $1 "* ]]; }

failed=0
if want tests; then
for t in "$stage"/tests/*; do
  echo "=== test $(basename "$t")"
  if ! "$t" --test-threads=1 >>"$OUT/tests.log" 2>&1; then
    echo "FAILED: $(basename "$t")"
    failed=1
  fi
done
grep -E "^test result|SKIPPED|FAILED|panicked" "$OUT/tests.log" | head -50
fi

if want python; then
echo "=== tour"
"$stage/tour" 2>&1 | tee "$OUT/tour.log"

echo "=== pc_digits (predictive-coding training on the GPU; >= 95% test accuracy expected)"
"$stage/pc_digits" 2>&1 | tee "$OUT/pc_digits.log" | tail -4

echo "=== Python bindings on CUDA tensors"
: >"$OUT/python.log"
for t in test_settle.py test_vmp.py test_attention.py; do
  echo "--- bindings/python/$t" >>"$OUT/python.log"
  if ! FEP_KERNELS_LIB="$stage/libfep_kernels.so" python3 "bindings/python/$t" >>"$OUT/python.log" 2>&1; then
    echo "FAILED: bindings/python/$t"
    failed=1
  fi
done
grep -E "^--- |passed|SKIPPED|FAILED|Error" "$OUT/python.log" | tail -12
fi

if want benches; then
echo "=== benches"
export CRITERION_HOME="$OUT/criterion"
for b in "$stage"/bench-*; do
  "$b" --bench --noplot 2>&1 | tee -a "$OUT/bench.log" | grep -E "lca |settle |vmp |attention |time:|thrpt:|SKIPPED|^[a-z]+_(lca|settle|vmp|attention)"
done

fi

if want peers; then
echo "=== peers"
python3 benches/peers/lca.py --lib "$stage/libfep_kernels.so" --out "$OUT/peers-lca.json" 2>&1 | tee "$OUT/peers.log"
python3 benches/peers/settle.py --lib "$stage/libfep_kernels.so" --out "$OUT/peers-settle.json" 2>&1 | tee -a "$OUT/peers.log"
# pymdp (pure Python) and the pure-Python packages it imports that a JAX install lacks, from the
# wheels ci/gpu-stage.sh downloaded; vmp.py appends the folder to sys.path, after the system's
# packages. pip where there is one, else the wheels are unpacked (what installing a
# pure-Python wheel amounts to).
pydeps=$(mktemp -d "${TMPDIR:-/tmp}/fep-pydeps.XXXXXX")
if ls "$stage"/wheels/*.whl >/dev/null 2>&1; then
  if ! python3 -m pip install --quiet --no-index --no-deps --target "$pydeps" "$stage"/wheels/*.whl >>"$OUT/peers.log" 2>&1; then
    echo "pip could not install $stage/wheels; unpacking them into $pydeps" | tee -a "$OUT/peers.log"
    for w in "$stage"/wheels/*.whl; do python3 -m zipfile -e "$w" "$pydeps"; done
  fi
else
  echo "no wheels in $stage/wheels (ci/gpu-stage.sh downloads them): pymdp will be SKIPPED" | tee -a "$OUT/peers.log"
fi
timeout 240 python3 benches/peers/vmp.py --lib "$stage/libfep_kernels.so" --pydeps "$pydeps" --out "$OUT/peers-vmp.json" 2>&1 | tee -a "$OUT/peers.log"
rm -rf "$pydeps"
# FlexAttention compiles once per family (dynamic shapes); the script stops starting new shapes
# after its own budget (165 s) and writes its JSON as it goes, so the timeout only guards a hang.
timeout 200 python3 benches/peers/attention.py --lib "$stage/libfep_kernels.so" --out "$OUT/peers-attention.json" 2>&1 | tee -a "$OUT/peers.log"
fi

echo "=== report"
python3 ci/gpu-report.py --out "$OUT" --commit "$(cat "$stage/COMMIT")"
exit $failed
