#!/usr/bin/env bash
# ci/fuzz.sh: the C ABI fuzz run. Builds every cargo-fuzz target in fuzz/ (one per C ABI entry
# point or handle family: attention forward/backward/merge, the v3 score inputs (attention_inputs:
# forward2 and probabilities; attention_backward2), settle infer/learn, LCA dictionary
# new-shape-phi-free / solve / learn, VMP model new-info-counts-free / infer_states /
# infer_sequence / infer_policies / learn, device and library queries) with AddressSanitizer,
# then runs each, on the CPU backend, from its committed seed corpus (fuzz/corpus/<target>) for
# FEP_FUZZ_RUNS (default 3000) runs from the seed FEP_FUZZ_SEED (default 1), each capped at an
# equal share of FEP_FUZZ_SECONDS (default 68: 4 s for each of the 17) seconds, two at a time
# (FEP_FUZZ_JOBS, each on its own core). Prints the number of runs of
# each target; exits non-zero when any target crashes: a panic (libfuzzer-sys's hook aborts
# even on one the entry point would catch), an ASan report (out-of-bounds, use after free), an
# oracle failure (FEP_ERR_INTERNAL, an undocumented status, an output written on failure, an
# overlap accepted; see fuzz/src/lib.rs), a timeout (-timeout, 10 s per input) or running out of
# memory (-rss_limit_mb; a single huge allocation is left to the library's fallible path, which
# must turn it into FEP_ERR_OUT_OF_MEMORY).
#
# Stable toolchain: cargo-fuzz passes -Zsanitizer=address, which stable rustc refuses ("the
# option `Z` is only accepted on the nightly compiler"). RUSTC_BOOTSTRAP=1 lets the stable
# compiler accept it (its ASan runtime ships with the stable x86_64-linux standard library);
# no nightly toolchain is needed. (`-s none` builds without it, but misses out-of-bounds reads.)
#
# Reproducing a crash (its input is written to fuzz/artifacts/<target>/crash-*):
#   export RUSTC_BOOTSTRAP=1 ASAN_OPTIONS=allocator_may_return_null=1
#   cargo fuzz run <target> fuzz/artifacts/<target>/crash-<hash>
#   FEP_FUZZ_TRACE=1 cargo fuzz run <target> <artifact>   # also prints the call it makes
#   cargo fuzz fmt <target> <artifact>                    # the decoded fuzz input
# and once it is fixed, keep it: copy the artifact into fuzz/corpus/<target>/ so every run
# replays it. Longer runs of one target: RUSTC_BOOTSTRAP=1 cargo fuzz run <target> --
# -max_total_time=600. FEP_FUZZ_SKIP=misaligned,alias turns those pointer choices off (to look
# past a known finding; CI sets neither).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export RUSTC_BOOTSTRAP=1
# A failed allocation returns NULL, as in production, so the library's fallible allocation path
# (an OutOfMemory error) is what gets tested; an infallible one still aborts and is reported.
export ASAN_OPTIONS="allocator_may_return_null=1${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
total=${FEP_FUZZ_SECONDS:-68}
# A fixed seed and a fixed number of runs per target make the run reproducible: the same tree
# explores the same inputs on every machine (a slow one, stopped by the time cap, a prefix of
# them), so CI is red for a bug in the change, not for a lucky draw. Longer or other draws:
# FEP_FUZZ_SEED, FEP_FUZZ_RUNS (-1: until the time share is spent).
seed=${FEP_FUZZ_SEED:-1}
runs=${FEP_FUZZ_RUNS:-3000}
start=$SECONDS

echo "=== building the fuzz targets (cargo fuzz build, AddressSanitizer, release + debug assertions)"
cargo fuzz build
mapfile -t targets < <(cargo fuzz list)
per=$((total / ${#targets[@]}))
((per >= 1)) || per=1
echo "=== built in $((SECONDS - start)) s; ${#targets[@]} targets, ${per} s each"

# New inputs go to a scratch corpus; the committed one is only read.
scratch=$(mktemp -d)
logs=fuzz/target/ci-logs
mkdir -p "$logs"
trap 'rm -rf "$scratch"' EXIT
# Two targets at a time (FEP_FUZZ_JOBS): each run is one process on one core with its own time
# cap, so the results are those of a serial run on a machine with a free core per target.
run_one() { # run_one TARGET: its log and status in $logs
  local t=$1
  mkdir -p "$scratch/$t" "fuzz/corpus/$t"
  if cargo fuzz run "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
      -seed="$seed" -runs="$runs" -max_total_time="$per" -timeout=10 -rss_limit_mb=4096 -malloc_limit_mb=$((1 << 30)) \
      -print_final_stats=1 >"$logs/$t.log" 2>&1; then
    echo ok >"$logs/$t.status"
  else
    echo FAILED >"$logs/$t.status"
  fi
}
jobs_max=${FEP_FUZZ_JOBS:-2}
for t in "${targets[@]}"; do
  while (($(jobs -rp | wc -l) >= jobs_max)); do wait -n || true; done
  run_one "$t" &
done
wait
failed=()
for t in "${targets[@]}"; do
  log="$logs/$t.log"
  status=$(cat "$logs/$t.status" 2>/dev/null || echo FAILED)
  [[ $status == ok ]] || failed+=("$t")
  # (not $runs: that is every target's run count)
  done_runs=$(sed -n 's/^Done \([0-9]*\) runs in .*/\1/p' "$log" | tail -1)
  [[ -n $done_runs ]] || done_runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  printf '%-22s %-6s %10s runs\n' "$t" "$status" "${done_runs:-?}"
  if [[ $status == FAILED ]]; then
    # The call, the panic or ASan report, and the artifact.
    grep -v -E '^\s+#[0-9]+ 0x|^\s+at |^\s+[0-9]+: ' "$log" \
      | grep -E -A40 'the call being made|panicked at|ERROR: (AddressSanitizer|libFuzzer)' | head -80 || true
    grep -E 'Test unit written to|Failing input' -A2 "$log" | head -6 || true
  fi
done

echo "=== fuzzing done in $((SECONDS - start)) s (logs: $logs)"
if ((${#failed[@]})); then
  echo "crashed: ${failed[*]} (reproduce: see the header of ci/fuzz.sh)"
  exit 1
fi
