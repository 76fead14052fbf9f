#!/usr/bin/env bash
# The GPU suite's self-test (CI runs it; no GPU, ~1.5 min): ci/gpu-run.sh in its dry mode over a
# stand-in stage whose binaries are small scripts (a test that passes, one that hangs, one that
# ignores TERM, benches that write criterion estimates), stopped or timed out on purpose:
#   1. TERM from the documented launch line while tests run (one hangs, one ignores TERM): the
#      report, summary.txt and the tarball are in $OUT, at most 8 files and 2 folders deep, the
#      hanging test is KILLED, the TERM-ignoring one KILLed and marked so, what was not reached
#      CUT, and no process of the suite is left;
#   2. TERM while a peer script (benches/peers/lca.py) hangs after measuring "ours"
#      (FEP_PEERS_HANG_AFTER, the scripts' test hook): "ours" is in the report;
#   3. the same peer item's own limit running out (FEP_GPU_LIMITS): "ours" is in the report,
#      the item is TIMEOUT, the suite ends normally;
#   4. a test stopped at step 2's budget is retried in step 4 and, as it never finishes (its own
#      limit runs out there), fails the run (exit 1);
#   5. a second call with another archive unpacks it again; the same archive is not unpacked;
#   6. on a GPU run a binding test file that SKIPPED (no PyTorch) is FAILED, not ok.
# Needs the library (target/release/libfep_kernels.so: cargo build --release --lib) and a Python
# with PyTorch for 2 and 3 (FEP_GPU_PYTHON, default python3).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
py=${FEP_GPU_PYTHON:-python3}
[[ $py == */* ]] && py=$(cd "$(dirname "$py")" && pwd)/$(basename "$py")
lib=${FEP_SELFTEST_LIB:-target/release/libfep_kernels.so}
[ -f "$lib" ] || { echo "no $lib: cargo build --release --lib first"; exit 2; }
"$py" -c "import torch" 2>/dev/null || { echo "$py has no PyTorch (FEP_GPU_PYTHON): the peer cases need it"; exit 2; }
tmp=$(mktemp -d /tmp/fep-gpu-selftest.XXXXXX)
trap 'rm -rf "$tmp"' EXIT
passes=0 failures=0
check() { # check WHAT COMMAND...: runs the command, reports
  if "${@:2}"; then echo "  ok    $1"; passes=$((passes + 1)); else echo "  FAIL  $1"; failures=$((failures + 1)); fi
}

# ---- the stand-in stage ----
stage=$tmp/stage
mkdir -p "$stage/tests"
cp "$lib" "$stage/libfep_kernels.so"
echo "selftest-commit" >"$stage/COMMIT"
fake_test() { # fake_test NAME BEHAVIOUR: pass | hang | ignore-term
  cat >"$stage/tests/$1" <<EOF
#!/usr/bin/env bash
[ "\${1:-}" = --list ] && { echo "t: test"; exit 0; }
case $2 in
  pass) echo "test t ... ok"; echo "test result: ok. 1 passed; 0 failed; 0 ignored" ;;
  hang) echo "fep-selftest-hang $1"; exec sleep 1000 ;;
  ignore-term) trap '' TERM; echo "fep-selftest-hang $1 (ignores TERM)"; sleep 1000 ;;
esac
EOF
  chmod +x "$stage/tests/$1"
}
fake_test mma_gpu pass
fake_test attention_gpu pass
fake_test lca_gpu hang
fake_test settle_gpu ignore-term
for b in lca settle vmp attention; do
  cat >"$stage/bench-$b" <<'EOF'
#!/usr/bin/env bash
d=$CRITERION_HOME/cpu_selftest_$(basename "$0")/x/new
mkdir -p "$d"
echo '{"median": {"point_estimate": 1000.0}}' >"$d/estimates.json"
echo "Benchmarking selftest: Analyzing"
EOF
  chmod +x "$stage/bench-$b"
done

suite() { # suite NAME [ENV=VALUE...] -- LAUNCH...: ci/gpu-run.sh on the stand-in; sets rc, out, run
  local name=$1
  shift
  out=$tmp/$name/out run=$tmp/$name/home/run
  local envs=()
  while [ "$1" != -- ]; do envs+=("$1"); shift; done
  shift
  env FEP_GPU_DRY_RUN=1 FEP_GPU_STAGE="$stage" OUT="$out" FEP_GPU_RUN="$tmp/$name/home" \
    FEP_GPU_PYTHON="$py" FEP_KEEP=1 "${envs[@]}" "$@" bash ci/gpu-run.sh >"$tmp/$name.log" 2>&1
  rc=$?
}
# $OUT: at most 8 files, nothing more than two folders deep, the three published files there
# (grep reads the whole listing: with -q it could exit first and tar's SIGPIPE fail the pipeline)
out_contract() {
  local files deep
  files=$(find "$out" -type f | wc -l)
  deep=$(find "$out" -mindepth 3 | wc -l)
  [ "$files" -le 8 ] && [ "$deep" -eq 0 ] && [ -s "$out/dry-run.md" ] && [ -s "$out/summary.txt" ] &&
    tar tzf "$out/gpu-run.tar.gz" | grep -x "run/steps.tsv" >/dev/null ||
    { echo "    \$OUT: $files files, $deep deeper than 2 folders:"; find "$out" | sed 's/^/    /'; return 1; }
}
has() { grep -qE -- "$2" "$1" || { echo "    no /$2/ in $1:"; sed 's/^/    | /' "$1" | head -40; return 1; }; }
none_left() { ! pgrep -f "fep-selftest-hang|sleep 1000|peers/lca.py" >/dev/null || { pgrep -af "fep-selftest-hang|sleep 1000|peers/lca.py" | sed 's/^/    left: /'; return 1; }; }
wait_for() { # wait_for FILE REGEX SECONDS
  local i
  for ((i = 0; i < $3 * 5; i++)); do grep -qE "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done
  return 1
}

echo "1. TERM from the launch line's timeout while tests run (one hangs, one ignores TERM)"
suite term-tests FEP_GPU_STEPS="port tests.attention_gpu tests.lca_gpu tests.settle_gpu quick.bench-lca rest.tour" \
  FEP_GPU_TEST_JOBS=4 -- timeout -s TERM -k 30 8
check "the launch line's timeout fired (rc $rc = 124)" test "$rc" = 124
check "\$OUT within the contract, report + summary + tarball there" out_contract
check "summary: stopped by SIGTERM" has "$out/summary.txt" "STOPPED by SIGTERM"
check "summary: the hanging test KILLED" has "$out/summary.txt" "lca_gpu +KILLED"
check "summary: the TERM-ignoring test KILLed and marked" has "$out/summary.txt" "settle_gpu +KILLED .*ignored it"
check "summary: the passing test ok" has "$out/summary.txt" "attention_gpu +ok"
check "summary: a later item CUT (not reached)" has "$out/summary.txt" "bench-lca +CUT .*not reached"
check "report: the stop and the killed items" has "$out/dry-run.md" "STOPPED by SIGTERM.*KILLED"
check "no process of the suite left" none_left

echo "2. TERM while a peer script hangs after measuring ours"
suite term-peer FEP_GPU_STEPS="quick.peers-lca" FEP_PEERS_HANG_AFTER=ours -- timeout -s TERM -k 30 120 &
sleep 0.5
wait_for "$tmp/term-peer/home/run/quick.peers-lca.log" "hanging \(test hook\)" 90
pkill -TERM -f "^timeout -s TERM -k 30 120 bash ci/gpu-run.sh" # as the launch line's timeout would
wait
out=$tmp/term-peer/out
check "\$OUT within the contract" out_contract
check "summary: the peer item KILLED" has "$out/summary.txt" "peers-lca +KILLED"
check "report: the ours record of the killed item" has "$out/dry-run.md" "\| small .*\| ours \| [0-9.]+ \|"
check "no process of the suite left" none_left

echo "3. a peer item's own limit runs out while it hangs after measuring ours"
suite limit-peer FEP_GPU_STEPS="quick.peers-lca" FEP_PEERS_HANG_AFTER=ours FEP_GPU_LIMITS="quick.peers-lca=40" -- env
check "the suite ended normally (rc $rc = 0)" test "$rc" = 0
check "\$OUT within the contract" out_contract
check "summary: complete, the peer item TIMEOUT" has "$out/summary.txt" "complete"
check "summary: the peer item TIMEOUT" has "$out/summary.txt" "peers-lca +TIMEOUT"
check "report: the ours record" has "$out/dry-run.md" "\| small .*\| ours \| [0-9.]+ \|"
check "no process of the suite left" none_left

echo "4. a test stopped at step 2's budget is retried in step 4 and fails the run"
# A total of 60 s gives step 2 13 s: the ~17 items recorded "not selected" ahead of lca_gpu take
# ~0.4 s each, so lca_gpu still starts (with >= 5 s left) and is stopped by the step's end.
suite retry FEP_GPU_STEPS="tests.attention_gpu tests.lca_gpu" FEP_GPU_BUDGET_S=60 FEP_GPU_LIMITS="tests.lca_gpu=16" -- env
check "exit 1 (rc $rc)" test "$rc" = 1
check "killed at step 2's budget (13 s)" has "$out/summary.txt" "lca_gpu +KILLED .*step's budget"
check "retried in step 4 until its own limit (16 s)" has "$out/summary.txt" "lca_gpu +TIMEOUT .*its own limit"
check "counted as a failure" has "$tmp/retry.log" "1 test item\(s\) did not pass"
check "no process of the suite left" none_left

echo "5. the archive is unpacked again when it changed"
copy=$tmp/copy
mkdir -p "$copy/ci"
cp ci/gpu-run.sh ci/gpu-report.py "$copy/ci/"
pack() { # pack COMMIT: gpu-stage.tar.xz of a stage with that commit
  rm -rf "$copy/gpu-stage" "$tmp/pack" && mkdir -p "$tmp/pack/gpu-stage/tests"
  cp "$stage/tests/mma_gpu" "$tmp/pack/gpu-stage/tests/"
  echo "$1" >"$tmp/pack/gpu-stage/COMMIT"
  tar cJf "$copy/gpu-stage.tar.xz" -C "$tmp/pack" gpu-stage
}
unpack_run() { (cd "$copy" && FEP_GPU_DRY_RUN=1 FEP_GPU_STEPS=port.mma_gpu OUT=$tmp/unpack/out bash ci/gpu-run.sh >"$tmp/unpack.log" 2>&1); }
pack commit-a && unpack_run
check "first call unpacks commit-a" has "$tmp/unpack.log" "unpacked commit commit-a"
pack commit-b
mkdir -p "$copy/gpu-stage" && echo commit-a >"$copy/gpu-stage/COMMIT" && echo stale >"$copy/gpu-stage/ARCHIVE-SHA256"
unpack_run
check "second call with another archive unpacks again" has "$tmp/unpack.log" "from another archive \(commit commit-a\): unpacking again"
check "and runs commit-b" has "$tmp/unpack/out/summary.txt" "commit commit-b"
unpack_run
check "third call with the same archive does not unpack" has "$tmp/unpack.log" "was unpacked from this gpu-stage.tar.xz \(commit commit-b\)"

echo "6. on a GPU run, a binding test file that SKIPPED is FAILED"
mkdir -p "$copy/bindings/python"
printf 'print("test_vmp.py: SKIPPED: PyTorch is not installed")\n' >"$copy/bindings/python/test_vmp.py"
touch "$copy/gpu-stage/libfep_kernels.so"
(cd "$copy" && FEP_GPU_PYTHON=python3 FEP_GPU_STEPS=tests.py-vmp OUT=$tmp/skip/out bash ci/gpu-run.sh >"$tmp/skip.log" 2>&1)
rc=$?
check "exit 1 (rc $rc)" test "$rc" = 1
check "py-vmp FAILED for its SKIPPED" has "$tmp/skip/out/summary.txt" "py-vmp +FAILED .*SKIPPED"

echo "gpu-run-selftest: $passes passed, $failures failed"
((failures == 0)) || { echo "logs:"; for f in "$tmp"/*.log; do echo "== $f"; tail -30 "$f"; done; exit 1; }
