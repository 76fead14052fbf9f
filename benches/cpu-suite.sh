#!/usr/bin/env bash
# The CPU benchmarks of issue 24: every peer script of benches/peers/ on the CPU, at 1 and 2
# threads, ours against plain PyTorch eager, torch.compile, torch SDPA (Dot), JAX jit (settling)
# and pymdp's jitted, vmapped JAX agent (VMP), on the same shapes; writes
# benches/results/cpu-<machine>.md (machine: a slug of the CPU model and the core count, e.g.
# cpu-xeon-2c) with every ratio and issue 24's target beside it (benches/peers/cpu_report.py).
#
# It builds nothing: it needs target/release/libfep_kernels.so (cargo build --release --lib)
# and, with --examples, the prebuilt target/release/examples/{tour,pc_digits}
# (cargo build --release --examples); Python from $PYTHON, else target/ci-venv/bin/python, else
# python3 (torch; jax and inferactively-pymdp for the JAX peers, which are SKIPPED without them).
#
#   bash benches/cpu-suite.sh                  # threads 1 and 2, ~11 minutes on 2 cores
#   bash benches/cpu-suite.sh --examples       # also times the tour and pc_digits
#   bash benches/cpu-suite.sh --smoke          # tiny shapes: a test of the suite (seconds per
#                                              # script; writes target/cpu-suite/, not results/)
# Options: --threads "1 2", --budget-s S (each script's budget; default per script below),
#   --out FILE (default benches/results/cpu-<machine>.md), --dir DIR (records and logs, default
#   target/cpu-suite), --examples-before tour=S,pc_digits=S (times before the fast path, for
#   the speed-up column), --only "attention charlm settle lca vmp".
#
# Each script runs in its own process under `timeout` (its budget + 45 s): it starts no new
# shape past its --budget-s, and what it measured before a kill stays in its JSON (the scripts
# write each record as it comes). Logs: DIR/<script>-t<N>.log.
set -u
cd "$(dirname "$0")/.."
ROOT=$PWD

THREADS="1 2"
BUDGET=""
SMOKE=0
EXAMPLES=0
OUT=""
DIR="$ROOT/target/cpu-suite"
BEFORE=""
ONLY="attention charlm settle lca vmp"
while [ $# -gt 0 ]; do
  case "$1" in
    --threads) THREADS="$2"; shift 2 ;;
    --budget-s) BUDGET="$2"; shift 2 ;;
    --smoke) SMOKE=1; shift ;;
    --examples) EXAMPLES=1; shift ;;
    --out) OUT="$2"; shift 2 ;;
    --dir) DIR="$2"; shift 2 ;;
    --examples-before) BEFORE="$2"; shift 2 ;;
    --only) ONLY="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "cpu-suite.sh: unknown option $1" >&2; exit 2 ;;
  esac
done

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x "$ROOT/target/ci-venv/bin/python" ]; then PY=$ROOT/target/ci-venv/bin/python
else PY=python3; fi
export FEP_KERNELS_LIB=${FEP_KERNELS_LIB:-$ROOT/target/release/libfep_kernels.so}
export PYTHONPATH=$ROOT/bindings/python${PYTHONPATH:+:$PYTHONPATH}
export MPLBACKEND=Agg
if [ ! -f "$FEP_KERNELS_LIB" ]; then
  echo "cpu-suite.sh: $FEP_KERNELS_LIB is missing (cargo build --release --lib; this script builds nothing)" >&2
  exit 1
fi

# the machine: the CPU model without vendor marks and clock, and the core count
MODEL=$(grep -m1 -i '^model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- || true)
[ -n "$MODEL" ] || MODEL=$(uname -m)
CORES=$(nproc 2>/dev/null || echo 1)
SLUG=$(echo "$MODEL" | tr 'A-Z' 'a-z' | sed -e 's/(r)//g' -e 's/(tm)//g' -e 's/@.*//' \
  -e 's/\b\(intel\|amd\|processor\|cpu\|core\|[0-9]*-core\|with\|radeon\|graphics\)\b//g' \
  | tr -cs 'a-z0-9' '-' | sed -e 's/^-*//' -e 's/-*$//')
[ -n "$SLUG" ] || SLUG=cpu
MACHINE="$SLUG-${CORES}c"
if [ -z "$OUT" ]; then
  if [ "$SMOKE" = 1 ]; then OUT="$DIR/cpu-$MACHINE-smoke.md"; else OUT="$ROOT/benches/results/cpu-$MACHINE.md"; fi
fi
mkdir -p "$DIR"
rm -f "$DIR"/*-t*.json "$DIR"/*-t*.log "$DIR"/examples-t*.txt

budget_of() {  # each script's --budget-s (the whole suite ~11 min at two thread counts)
  if [ -n "$BUDGET" ]; then echo "$BUDGET"; return; fi
  if [ "$SMOKE" = 1 ]; then echo 30; return; fi
  case "$1" in
    attention) echo 90 ;;
    charlm) echo 40 ;;
    settle) echo 75 ;;
    lca) echo 60 ;;
    vmp) echo 75 ;;
    *) echo 60 ;;
  esac
}

STATUS="complete"
T_START=$(date +%s)
echo "cpu-suite: $MODEL, $CORES cores -> $OUT (records in $DIR; python $PY)"
for t in $THREADS; do
  for s in $ONLY; do
    b=$(budget_of "$s")
    case "$s" in
      attention) args=(--op cpu) ;;
      *) args=(--device cpu) ;;
    esac
    [ "$SMOKE" = 1 ] && args+=(--smoke)
    log="$DIR/$s-t$t.log"
    echo "== $s, $t thread(s), budget ${b} s"
    t0=$(date +%s)
    RAYON_NUM_THREADS=$t timeout -s TERM -k 10 $((b + 45)) \
      "$PY" "$ROOT/benches/peers/$s.py" "${args[@]}" --threads "$t" --budget-s "$b" \
      --out "$DIR/$s-t$t.json" >"$log" 2>&1
    rc=$?
    echo "   rc $rc, $(( $(date +%s) - t0 )) s; log $log"
    if [ $rc -ne 0 ]; then
      STATUS="partial ($s at $t thread(s): exit $rc$([ $rc = 124 ] && echo ', killed by its timeout'))"
      tail -5 "$log" | sed 's/^/   | /'
    fi
  done
  if [ "$EXAMPLES" = 1 ]; then
    for ex in tour pc_digits; do
      bin="$ROOT/target/release/examples/$ex"
      if [ ! -x "$bin" ]; then
        echo "   $ex: $bin missing (cargo build --release --examples): not timed"
        continue
      fi
      exargs=()
      [ "$SMOKE" = 1 ] && [ "$ex" = pc_digits ] && exargs=(--epochs 1)
      # "before": the same example on the f64 reference (--reference), what the CPU device
      # ran before issue 24's fast path
      t0=$(date +%s.%N)
      RAYON_NUM_THREADS=$t FEP_NUM_THREADS=$t timeout -k 10 300 "$bin" --reference "${exargs[@]}" \
        >"$DIR/$ex-reference-t$t.log" 2>&1
      rc_ref=$?
      ref_secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
      [ $rc_ref -eq 0 ] || ref_secs=-
      t0=$(date +%s.%N)
      RAYON_NUM_THREADS=$t FEP_NUM_THREADS=$t timeout -k 10 300 "$bin" "${exargs[@]}" \
        >"$DIR/$ex-t$t.log" 2>&1
      rc=$?
      secs=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.2f", b - a }')
      echo "$ex $secs $rc $ref_secs" >>"$DIR/examples-t$t.txt"
      echo "   $ex, $t thread(s): $secs s (exit $rc); on the reference $ref_secs s"
    done
  fi
done
echo "suite: $(( $(date +%s) - T_START )) s"

"$PY" "$ROOT/benches/peers/cpu_report.py" --dir "$DIR" --threads "$(echo $THREADS | tr ' ' ',')" \
  --out "$OUT" --machine "cpu-$MACHINE" --status "$STATUS" --examples-before "$BEFORE"
