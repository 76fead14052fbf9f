#!/usr/bin/env bash
# The GPU suite, on a GPU machine without Rust, over the binaries of ci/gpu-stage.sh:
#   1. every test binary, with FEP_REQUIRE_GPU=1 (a GPU test that finds no GPU fails here);
#   2. the tour, the digits example and the Python binding tests (on CUDA tensors);
#      then the criterion benches;
#   3. the peer scripts (PyTorch) on the same shapes, through the C ABI;
#   4. benches/results/<gpu>.md from 2 and 3 (written into $OUT too).
# Logs go to $OUT (default gpu-out/). Exits non-zero if any test failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
stage=gpu-stage
export FEP_REQUIRE_GPU=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/device.txt" 2>&1 || true
cat "$OUT/device.txt"

failed=0
for t in "$stage"/tests/*; do
  echo "=== test $(basename "$t")"
  if ! "$t" --test-threads=1 >>"$OUT/tests.log" 2>&1; then
    echo "FAILED: $(basename "$t")"
    failed=1
  fi
done
grep -E "^test result|SKIPPED|FAILED|panicked" "$OUT/tests.log" | head -50

echo "=== tour"
"$stage/tour" 2>&1 | tee "$OUT/tour.log"

echo "=== pc_digits (predictive-coding training on the GPU; >= 95% test accuracy expected)"
"$stage/pc_digits" 2>&1 | tee "$OUT/pc_digits.log" | tail -4

echo "=== Python bindings on CUDA tensors"
if ! FEP_KERNELS_LIB="$stage/libfep_kernels.so" python3 bindings/python/test_settle.py >"$OUT/python.log" 2>&1; then
  echo "FAILED: bindings/python/test_settle.py"
  failed=1
fi
tail -3 "$OUT/python.log"

echo "=== benches"
export CRITERION_HOME="$OUT/criterion"
for b in "$stage"/bench-*; do
  "$b" --bench --noplot 2>&1 | tee -a "$OUT/bench.log" | grep -E "lca |settle |time:|thrpt:|^[a-z]+_(lca|settle)"
done

echo "=== peers"
python3 benches/peers/lca.py --lib "$stage/libfep_kernels.so" --out "$OUT/peers-lca.json" 2>&1 | tee "$OUT/peers.log"
python3 benches/peers/settle.py --lib "$stage/libfep_kernels.so" --out "$OUT/peers-settle.json" 2>&1 | tee -a "$OUT/peers.log"

echo "=== report"
python3 ci/gpu-report.py --out "$OUT" --commit "$(cat "$stage/COMMIT")"
exit $failed
