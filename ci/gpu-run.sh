#!/usr/bin/env bash
# The GPU suite, on a GPU machine without Rust, over the binaries of ci/gpu-stage.sh (gpu-stage/,
# or its archive gpu-stage.tar.xz, unpacked here). Everything of value in ONE device call: the
# steps run in order of value, each with its own time budget; a step starts no new work once its
# budget is spent (what it did not start is CUT, what it had to stop is KILLED), every process
# runs under `timeout`, and the report says what was cut. Budgets sum to 450 s (7.5 min) so the
# call ends within 8 minutes; a step that ends early leaves its time to step 4.
#
# Launch it like this (the device tool kills a call at 600 s; TERM at 570 s leaves the suite 30 s
# to stop what is in flight and publish, KILL at 590 s if it does not):
#
#     timeout -s TERM -k 20 570 bash ci/gpu-run.sh
#
# Results survive a kill. The run folder (every log, criterion's output, the peers' JSON) lives
# outside $OUT (target/gpu-run/run); $OUT only ever holds four files, each replaced whole:
# <gpu>.md (the report), summary.txt, console.log and gpu-run.tar.gz (the run folder). They are
# published at the start, after every step, after any item that ends 20 s or more after the last
# publication, and from the traps: on TERM or INT the items in flight are stopped (TERM to each
# item's process group, KILL 3 s later if it ignored that; an item that outlives KILL, e.g. stuck
# in the driver, is left behind and marked so) and recorded KILLED, the items not reached are
# recorded CUT, and the EXIT trap publishes. A kernel that hangs costs its item, not the run.
#
# Plan. Budget: seconds the step may start work in (a step's items are cut to what is left of it;
# its unused time goes to step 4); an item's limit is its own `timeout`, and a peer script gets
# --budget-s = its limit less a margin (it starts no new configuration after that). Every peer
# script writes each implementation's record as soon as it is measured, so an item stopped in a
# cold compile keeps ours and the peers measured before it. Dry: ci/gpu-run.sh with
# FEP_GPU_DRY_RUN=1 on the 2-core build machine (issue 11's figures; control flow and fixed costs
# only). H200 est.: from the FLOP counts and criterion's settings (~300 TFLOP/s assumed for our
# bf16 attention), and for the peers from their compile costs measured on the 2-core build
# machine's CPU PyTorch 2.15 (torch.compile / inductor, fresh cache, issue 20): one LCA step
# 9-14 s; the settle step 11-12 s (f32; bf16 after it 2.5 s; JAX jit 0.2-0.4 s); FlexAttention
# forward 14-15 s for the first family, 5-6 s for each further one (one graph per family, reused
# across lengths; issue 23's score_mods with a captured bias or a padding block mask, measured
# with a cargo bench running beside: 25 s cold, 11-13 s each further one). Triton on the GPU
# machine's 16 cores is taken to cost the same, and each
# limit allows twice that; FlexAttention's backward has no CPU implementation to measure
# (torch 2.15), so its compile is taken as twice the forward's (30 s + 12 s per further family).
#
# | step / item                              | budget | limit | H200 est. | how the estimate is made                                 |
# |------------------------------------------|--------|-------|-----------|----------------------------------------------------------|
# | 0 unpack gpu-stage.tar.xz (~17 MiB)      |   -    |   -   |   5-10 s  | xz -d to ~450 MB; not budgeted, counts against the total |
# | 1 port: mma_gpu (tensor-core fragment    |   20   | 30/15 |    5 s    | one CUDA context + module load (~2 s), a few 16x8 tiles; |
# |   layouts), nvidia-smi, binaries load    |        |  /20  |           | ldd + --list of every binary, the .so in Python          |
# | 2 tests, FEP_REQUIRE_GPU=1, 4 at once:   |  100   | 60 py | 40-80 s   | the binding tests first (5 processes importing torch,    |
# |   the Python bindings on CUDA tensors,   |        | 90    |           | ~5 s each); then CPU-reference bound: f64 references on  |
# |   attention_gpu attention_backward_gpu   |        | Rust  |           | 16 cores (LCA m = 16000, 20 steps: 10 GFLOP; attention   |
# |   attention_decode lca_gpu settle_gpu    |        |       |           | L = 1000: ~1 GFLOP per case and dtype); the GPU work is  |
# |   vmp_gpu, then the *_ffi                |        |       |           | milliseconds. KILLED ones are retried first in step 4.   |
# | 3 quick benches: ours, then the peers    |  320   |       |  ~430 s   | so the last peers are usually cut: retried in step 4     |
# |   ours attention bf16 forward, 24 configs|        |  75   |   30 s    | (4 families x causal/full x L 1k/4k/16k, D 128 and 64)   |
# |   ours attention backward (D 128, L 4k)  |        |  40   |   12 s    | 14 configs                                               |
# |   ours attention decode                  |        |  45   |   20 s    | 24 configs incl. uploading 2 x 2 GiB of cache            |
# |   ours attention score inputs (bias,     |        |  40   |   15 s    | 14 configs (dot, studentt x 7; D 128, L 4k) incl. a 1 GB |
# |   mask, packed sequences; issue 23)      |        |       |           | full bias + dbias; SKIPPED at once without GPU kernels   |
# |   ours lca large, settle pcx, vmp at the |        | 20/25 |   19 s    | calibration solves, 4 settle configs, 3 vmp batches of   |
# |   targets                                |        |  /20  |           | up to 100k agents built on the host                      |
# |   peers attention forward (SDPA, flex,   |        |  90   |   80 s    | flex: 30 s + 3 x 12 s of compiles; 24 shapes x 3.3 impls |
# |   padded SDPA), D 128                    |        |       |           | x ~0.12 s                                                |
# |   peers lca large (eager, CUDA graph,    |        |  60   |   50 s    | torch.compile of one step 20-30 s (+ a recompile for the |
# |   compiled, compiled + graph)            |        |       |           | large shape); eager 200 steps of 8.6 GFLOP products      |
# |   peers settle pcx f32 (eager, compiled, |        |  50   |   40 s    | torch.compile 25 s + 2 JAX jits + 4 x 4 x 0.2 s          |
# |   JAX as PCX)                            |        |       |           |                                                          |
# |   peers vmp at the targets (pymdp JAX)   |        |  40   |   35 s    | pymdp's agent jitted once per config (~8 s each)         |
# |   peers attention decode (SDPA, flex)    |        |  80   |   70 s    | flex: 30 s + 3 x 12 s of compiles, then the shapes       |
# |   peers attention backward (flex, SDPA,  |        | 150   |  145 s    | flex fwd+bwd: 60 s + 3 x 25 s of compiles (taken as 2x   |
# |   padded SDPA)                           |        |       |           | the forward's), then 14 shapes                           |
# |   peers attention score inputs (flex     |        | 150   | ~190 s:   | 10 flex compiles (dot, studentt x 5 variants): forward   |
# |   with a captured bias / block masks,    |        |       | cut by its| 25 s first + 5 x 12 s (bias, mask score_mods measured on |
# |   SDPA with attn_mask), lowest value     |        |       | budget    | the CPU: 25, 11, 13 s), backward 4 x 24 s (2x): the bias |
# |                                          |        |       |           | forward and backward rows come first, packed ones cut    |
# | 4 the rest until 440 s: first what steps |  rest  |       |  (cut)    | on the H200 whatever fits (~40-80 s): the cut peers of   |
# |   1-3 cut and the tests step 2 killed,   |        |       |           | step 3 first; the full attention bench (192 configs,     |
# |   then tour, pc_digits, ours attention   |        |       |           | ~250 s) is last and usually KILLED (its figures so far   |
# |   f16, peers D 64, full lca/vmp/settle   |        |       |           | are kept)                                                |
# |   benches, peers f16 and full, the full  |        |       |           |                                                          |
# |   attention bench                        |        |       |           |                                                          |
# | 5 report (reserved)                      |   10   |       |    2 s    | also published after every step and from the traps       |
# |------------------------------------------|--------|-------|-----------|----------------------------------------------------------|
# | total                                    |  450   |       |           | the call ends by ~450 s (8 min = 480 s)                  |
#
# The *_cpu, ffi_header, resources, settle_digits and census test binaries are NOT run on the
# GPU machine: they need no GPU and CI runs them on every submission from the same sources (the
# cuda feature changes nothing they test; census reads the build machine's own kernels and skips
# elsewhere). FEP_GPU_CPU_TESTS=1 runs them last in step 4.
#
# Environment:
#   OUT                  where the results go (default gpu-out/; dry run: target/gpu-dry-out/).
#                        $OUT holds only: <gpu>.md (the report), summary.txt, console.log and
#                        gpu-run.tar.gz (every log, the criterion estimates, the peer JSONs:
#                        `tar xzf` it and `python3 ci/gpu-report.py --run run --out .` redoes the
#                        report), so the device tool's 8-file, two-folder limit is kept.
#   FEP_GPU_RUN          the folder that holds the run folder run/ (default target/gpu-run).
#   FEP_GPU_PYTHON       the Python for the binding tests and the peers (default python3).
#   FEP_GPU_LIMITS       item limits to override, "ITEM=SECONDS ..." (e.g. "quick.peers-lca=8":
#                        the self-test forces a peer item's time to run out mid-way).
#   FEP_GPU_STEPS        words picking what runs: step names (port tests quick rest), item names
#                        (quick.peers-attention, tests.lca_gpu, ...: see summary.txt), or the old
#                        step names python (binding tests, tour, pc_digits), benches (our criterion
#                        benches) and peers (the peer scripts). Default: everything.
#   FEP_GPU_BUDGET_S     the total budget (default 450); every step budget scales with it.
#   FEP_GPU_DRY_RUN=1    the same steps on a machine without a GPU: no FEP_REQUIRE_GPU, our benches
#                        on the CPU reference's smoke configurations, peers with --smoke.
#   FEP_GPU_STAGE        the stage folder (default gpu-stage; dry run: gpu-stage, else
#                        target/gpu-stage-cpu from FEP_GPU_STAGE_CPU=1 bash ci/gpu-stage.sh).
#   FEP_GPU_TEST_JOBS    test processes at once in step 2 (default 4; 1: one after another).
#   FEP_GPU_TEST_THREADS --test-threads for each test binary (default: libtest's, one per core).
#   FEP_GPU_CPU_TESTS=1  also run the CPU-only test binaries, last.
#   FEP_GPU_KEEP_RUN=1   keep the run folder after packing it (the default in the dry run and
#                        when the suite was stopped).
# The archive is unpacked into gpu-stage/ when that folder is absent or was unpacked from another
# archive (its SHA-256 is kept in gpu-stage/ARCHIVE-SHA256): a second call on a warm machine runs
# what it carried, not what the first call unpacked.
# Exits 1 if a test item (port.mma_gpu, port.load, tests.*) did not pass: it failed, timed out,
# was killed or cut and never finished in step 4's retry; 0 otherwise (cut benches are reported,
# not failed); 2 if nothing could run (no stage); 143 / 130 when stopped by TERM / INT.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

# Helpers the items call (bash ci/gpu-run.sh --load-check STAGE | --pydeps STAGE DIR).
if [ "${1:-}" = --load-check ]; then
  # every binary's shared libraries resolve, every test binary lists its tests, the library
  # loads in Python and (on a GPU machine) sees a CUDA device
  bad=0
  for f in "$2"/tests/* "$2"/bench-* "$2"/tour "$2"/pc_digits "$2"/*.so; do
    [ -e "$f" ] || continue
    if ldd "$f" 2>&1 | grep -q "not found"; then echo "$f: $(ldd "$f" | grep 'not found' | tr '\n' ' ')"; bad=1; fi
  done
  n=0
  for f in "$2"/tests/*; do
    if "$f" --list >/dev/null 2>&1; then n=$((n + 1)); else echo "$f --list failed"; bad=1; fi
  done
  echo "$n test binaries list their tests"
  "${FEP_GPU_PYTHON:-python3}" - "$2/libfep_kernels.so" "${FEP_GPU_DRY_RUN:-0}" <<'PY' || bad=1
import sys
sys.path.insert(0, "bindings/python")
import fep_kernels as fk
fk.load(sys.argv[1])
n = fk.device_count("cuda")
print(f"libfep_kernels.so {fk.version()} (ABI {fk.abi_version()}) loads in Python; CUDA devices: {n}")
if n < 1 and sys.argv[2] != "1":
    sys.exit("the library sees no CUDA device")
PY
  exit $bad
fi
if [ "${1:-}" = --pydeps ]; then
  # pymdp and the pure-Python packages it imports that the machine lacks, from the wheels
  # ci/gpu-stage.sh downloaded, into a folder only benches/peers/vmp.py searches (no network
  # there; nothing system-wide changes): pip where there is one, else the wheels are unpacked
  # (what installing a pure-Python wheel amounts to). Once per run: the suite starts it in the
  # background at its start, and the vmp peer items wait for that (60 s at most).
  for _ in $(seq 120); do
    [ -e "$3/.done" ] && exit 0
    [ -e "$3/.started" ] || break
    sleep 0.5
  done
  [ -e "$3/.done" ] && exit 0
  mkdir -p "$3"
  touch "$3/.started"
  if ls "$2"/wheels/*.whl >/dev/null 2>&1; then
    if ! python3 -m pip install --quiet --no-index --no-deps --target "$3" "$2"/wheels/*.whl; then
      echo "pip could not install $2/wheels; unpacking them into $3"
      for w in "$2"/wheels/*.whl; do python3 -m zipfile -e "$w" "$3"; done
    fi
  else
    echo "no wheels in $2/wheels (ci/gpu-stage.sh downloads them): pymdp will be SKIPPED"
  fi
  touch "$3/.done"
  exit 0
fi
DRY=${FEP_GPU_DRY_RUN:-0}
[ "$DRY" = 1 ] && OUT=${OUT:-target/gpu-dry-out} || OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
RUN_HOME=${FEP_GPU_RUN:-$ROOT/target/gpu-run}
mkdir -p "$RUN_HOME"
RUN_HOME=$(cd "$RUN_HOME" && pwd)
RUN=$RUN_HOME/run
case "$RUN/" in "$OUT"/*) echo "FEP_GPU_RUN ($RUN_HOME) must not be inside OUT ($OUT)"; exit 2 ;; esac
# what an earlier run published (and the old layout's $OUT/run)
rm -rf "$RUN" "$OUT/run" "$OUT/gpu-run.tar.gz" "$OUT/summary.txt" "$OUT/dry-run.md"
mkdir -p "$RUN/inflight"
# console.log ignores TERM and INT: the traps below still write to it after the launch line's
# timeout has signalled the whole process group.
exec > >(trap '' TERM INT; exec tee "$OUT/console.log") 2>&1
TEE_PID=$!

now_ms() { local t=${EPOCHREALTIME//[.,]/}; echo $((t / 1000)); }
T0=$(now_ms)
el() { echo $((($(now_ms) - T0) / 1000)); }  # seconds since the start
since_s() { awk -v a="$1" -v b="$(now_ms)" 'BEGIN { printf "%.1f", (b - a) / 1000 }'; } # since_s START_MS

TOTAL=${FEP_GPU_BUDGET_S:-450}
# scaled budget: sb SECONDS (nominal, for a 450 s total)
sb() { echo $(($1 * TOTAL / 450)); }
REPORT_RESERVE=$(sb 10)
END_MS=$((T0 + (TOTAL - REPORT_RESERVE) * 1000)) # no step runs past this

if [ "$DRY" = 1 ]; then
  if [ -n "${FEP_GPU_STAGE:-}" ]; then stage=$FEP_GPU_STAGE
  elif [ -d gpu-stage ] || [ -f gpu-stage.tar.xz ]; then stage=gpu-stage
  else stage=target/gpu-stage-cpu; fi
  BENCH_DEVICES=cpu
  unset FEP_REQUIRE_GPU
else
  stage=${FEP_GPU_STAGE:-gpu-stage}
  BENCH_DEVICES=gpu
  export FEP_REQUIRE_GPU=1
fi
py=${FEP_GPU_PYTHON:-python3}
export FEP_GPU_PYTHON=$py PYTHONUNBUFFERED=1 CRITERION_HOME="$RUN/criterion"
LIB=$ROOT/$stage/libfep_kernels.so
[[ $stage == /* ]] && LIB=$stage/libfep_kernels.so

echo "=== fep-kernels GPU suite: $( [ "$DRY" = 1 ] && echo "DRY RUN (CPU, no GPU required)" || echo "GPU run" ), budget ${TOTAL} s, stage $stage, out $OUT, run folder $RUN"
# ci/gpu-stage.sh's archive (what a device call carries), unpacked when gpu-stage/ is absent or
# came from another archive (a second call on a warm machine keeps the first call's folder).
if [ "$stage" = gpu-stage ] && [ -f gpu-stage.tar.xz ]; then
  sha=$(sha256sum gpu-stage.tar.xz | cut -d' ' -f1)
  if [ "$(cat gpu-stage/ARCHIVE-SHA256 2>/dev/null)" != "$sha" ]; then
    if [ -d gpu-stage ]; then
      echo "gpu-stage/ is from another archive (commit $(cat gpu-stage/COMMIT 2>/dev/null || echo unknown)): unpacking again"
      rm -rf gpu-stage
    fi
    echo "unpacking gpu-stage.tar.xz"
    tar xJf gpu-stage.tar.xz || python3 -m tarfile -e gpu-stage.tar.xz .
    [ -d gpu-stage ] && echo "$sha" >gpu-stage/ARCHIVE-SHA256
    echo "unpacked commit $(cat gpu-stage/COMMIT 2>/dev/null || echo unknown) in $(el) s"
  else
    echo "gpu-stage/ was unpacked from this gpu-stage.tar.xz (commit $(cat gpu-stage/COMMIT 2>/dev/null || echo unknown))"
  fi
fi
if [ ! -d "$stage" ]; then
  echo "MISSING: no $stage/ (and no gpu-stage.tar.xz): build it with 'bash ci/gpu-stage.sh'" \
    "(or a CPU stand-in for the dry run: FEP_GPU_STAGE_CPU=1 bash ci/gpu-stage.sh); items that" \
    "need its binaries are reported MISSING"
fi
COMMIT=$(cat "$stage/COMMIT" 2>/dev/null || git rev-parse HEAD 2>/dev/null || echo unknown)
[ -f "$stage/CPU-ONLY" ] && [ "$DRY" != 1 ] &&
  echo "WARNING: $stage is the CPU-only stand-in (no cuda feature): every GPU test will fail"

# ---- the item runner ----
# An item: a name "<step>.<item>", a timeout (seconds, its own limit), a command (a string run by
# bash -c, in the repository root, output to $RUN/<step>.<item>.log). In the command, @BUDGET@
# becomes the seconds the item may use (its timeout as cut to the step's time left, less
# @MARGIN@ seconds for the work in flight when a script's own --budget-s runs out).
# $RUN/steps.tsv gets one line per item run or not run:
#   order  step  item  status  seconds  limit_s  note
# status: ok, FAILED, TIMEOUT (its own limit), KILLED (stopped at the step's budget, or by the
# suite's TERM/INT), CUT (not started: the step's budget was spent, or the suite was stopped),
# SKIPPED (not selected, not applicable), MISSING (a binary of the stage is missing).
# While an item runs, $RUN/inflight/<name> holds "PID START_MS LIMIT_S" (PID: its `timeout`,
# which leads the item's process group), so the traps can stop and record it.
declare -A CMD TMO MARGIN NEED CPU_ONLY
ORDER=()
add() { # add STEP.ITEM TIMEOUT_S MARGIN_S NEEDS(file or -) COMMAND
  CMD[$1]=$5; TMO[$1]=$2; MARGIN[$1]=$3; NEED[$1]=$4; ORDER+=("$1")
}
order_of() { local i; for i in "${!ORDER[@]}"; do [ "${ORDER[$i]}" = "$1" ] && { echo "$i"; return; }; done; echo 999; }
record() { # record NAME STATUS SECONDS LIMIT NOTE
  local name=$1
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$(order_of "$name")" "${name%%.*}" "${name#*.}" "$2" "$3" "$4" "$5" >>"$RUN/steps.tsv"
  printf '  %-34s %-8s %6s s / %-5s %s\n' "$name" "$2" "$3" "$4" "$5"
}

selected() { # selected STEP.ITEM
  [ -z "${FEP_GPU_STEPS:-}" ] && return 0
  local step=${1%%.*} item=${1#*.} w
  for w in $FEP_GPU_STEPS; do
    case "$w" in
      "$step" | "$1") return 0 ;;
      python) [[ $item == py-* || $item == tour || $item == pc_digits ]] && return 0 ;;
      benches) [[ $item == bench-* ]] && return 0 ;;
      peers) [[ $item == peers-* ]] && return 0 ;;
    esac
  done
  return 1
}

STEP_END=0 # the current step's deadline (ms since the epoch)

# What a finished item's log says, for the note (test counts, skips, cut shapes).
summarise() { # summarise LOG
  local log=$1
  if grep -q "^test result:" "$log" 2>/dev/null; then
    awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i - 1)
        if ($i == "failed;") f += $(i - 1); if ($i == "ignored;") g += $(i - 1) } }
      /^SKIPPED/ { if (!($0 in seen)) s++; seen[$0] = 1 }
      END { printf "%d passed, %d failed, %d ignored", p, f, g; if (s) printf ", %d SKIPPED (no GPU)", s }' "$log"
  elif grep -qE "^[0-9]+ passed, [0-9]+ failed" "$log" 2>/dev/null; then
    grep -E "^[0-9]+ passed, [0-9]+ failed" "$log" | tail -1
  elif grep -qE "SKIPPED: |: skipped: " "$log" 2>/dev/null; then
    grep -m1 -oE "(SKIPPED|skipped): .{0,90}" "$log"
  fi
  grep -m1 -E "^thread .* panicked at|^Error: |^error: " "$log" 2>/dev/null | cut -c1-120 | sed 's/^/; /'

  if grep -qE "^(--|==) .*: CUT" "$log" 2>/dev/null; then
    echo "; $(grep -cE "^(--|==) .*: CUT" "$log") configs CUT by its own --budget-s"
  fi
  if [[ $log == *bench-* ]]; then
    echo "; $(grep -cE "^Benchmarking .*: Analyzing" "$log") benchmarks measured"
    grep -qE ": SKIPPED \(" "$log" && echo "; $(grep -cE ": SKIPPED \(" "$log") groups SKIPPED by the bench"
  fi
}

# Whether a process is alive: it exists and is not a zombie (an item whose worker died is
# reparented, and a zombie answers kill -0 until someone reaps it).
alive() { # alive PID
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null) || { kill -0 "$1" 2>/dev/null; return; }
  [ -n "$st" ] && [ "${st:0:1}" != Z ]
}

# An item whose process outlived TERM and KILL (stuck in the driver?) is left running: noted once.
LEFT_BEHIND="TERM and KILL, and outlived both (stuck in the driver?): left behind"
note_left_behind() { echo "$1: left behind (pid $2), still running" >>"$RUN/left-behind.txt"; } # NAME PID

# Waits for an item's `timeout` process: its exit status, or 255 when it is still there 10 s
# after its limit (its KILL came and went: a process stuck in the driver keeps it alive; it is
# left behind). Polls, so the traps run within 0.2 s of a signal.
wait_item() { # wait_item PID LIMIT_S
  local pid=$1 until=$(($(now_ms) + ($2 + 10) * 1000))
  while alive "$pid"; do
    (($(now_ms) > until)) && return 255
    sleep 0.2
  done
  wait "$pid"
}

run_item() { # run_item NAME: runs it now if selected and time remains (returns when it ended)
  local name=$1 log="$RUN/$1.log" now left t budget rc t1 secs status note need pid
  if ! selected "$name"; then record "$name" SKIPPED 0 - "not selected (FEP_GPU_STEPS)"; return; fi
  need=${NEED[$name]}
  if [ "$need" != - ] && [ ! -e "$need" ]; then record "$name" MISSING 0 - "no $need"; return; fi
  now=$(now_ms)
  left=$(((STEP_END < END_MS ? STEP_END : END_MS) - now))
  t=${TMO[$name]}
  # start while the step has time left (at least min(own timeout, 5 s)); the timeout is cut
  # to what is left, so an item that cannot finish in time is KILLED at the step's end
  if ((left < 1000 * (t < 5 ? t : 5))); then
    record "$name" CUT 0 "$t" "not started: the step's budget was spent ($((left / 1000)) s left)"
    return
  fi
  ((t * 1000 > left)) && t=$((left / 1000))
  budget=$((t - ${MARGIN[$name]}))
  ((budget < t / 2)) && budget=$((t / 2))
  local cmd=${CMD[$name]//@BUDGET@/$budget}
  printf '%s: %s\n' "$name" "$cmd" >>"$RUN/commands.txt"
  : >"$log"
  t1=$(now_ms)
  timeout -k 5 "$t" bash -c "$cmd" >>"$log" 2>&1 </dev/null &
  pid=$!
  echo "$pid $t1 $t" >"$RUN/inflight/$name"
  wait_item "$pid" "$t"
  rc=$?
  secs=$(since_s "$t1")
  note=$(summarise "$log" | tr '\n' ' ' | sed 's/ *$//; s/^; //')
  # else the last line it printed (the load check's, pc_digits' accuracy, ...)
  [ -z "$note" ] && note=$(grep -v '^[[:space:]]*$' "$log" | tail -1 | cut -c1-110)
  local how="TERM"
  ((rc == 137)) && how="TERM, ignored it: KILLed 5 s later"
  ((rc == 255)) && how=$LEFT_BEHIND
  if ((rc == 0)); then
    status=ok
  elif ((rc == 124 || rc == 137 || rc == 255)); then
    if ((t < ${TMO[$name]})); then status=KILLED; note="stopped at the step's budget ($t s: $how); $note"
    else status=TIMEOUT; note="its own limit ($t s: $how); $note"; fi
  else
    status=FAILED; note="exit $rc; $note"
  fi
  # A test that skipped its GPU part on a GPU machine did not test what it is here for (every
  # skip in tests/*_gpu.rs, *_ffi.rs and bindings/python is "no GPU" or "the emulator"). The
  # binding tests print "skip NAME: ..." per test and "FILE: SKIPPED: ..." when the whole file
  # skips (no PyTorch): any SKIPPED in their log counts.
  if [ "$status" = ok ] && [ "$DRY" != 1 ]; then
    if { [[ $name == tests.py-* ]] && grep -qE "SKIPPED|^skip " "$log"; } ||
      { [[ $name == tests.* || $name == port.mma_gpu ]] && grep -qE "^SKIPPED|^skip " "$log"; }; then
      status=FAILED; note="a GPU test was SKIPPED on the GPU machine; $note"
    fi
  fi
  record "$name" "$status" "$secs" "$t" "$note"
  rm -f "$RUN/inflight/$name"
  ((rc == 255)) && note_left_behind "$name" "$pid"
  return 0
}

run_parallel() { # run_parallel JOBS NAME...: the items in order, JOBS at a time
  local jobs=$1 name p alive
  shift
  PAR_PIDS=()
  for name in "$@"; do
    while :; do
      alive=0
      for p in "${PAR_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && alive=$((alive + 1)); done
      ((alive < jobs)) && break
      sleep 0.2
    done
    run_item "$name" &
    PAR_PIDS+=($!)
    sleep 0.2
  done
  for p in "${PAR_PIDS[@]}"; do
    while kill -0 "$p" 2>/dev/null; do sleep 0.2; done # the traps run meanwhile
  done
  PAR_PIDS=()
}

step() { # step NAME BUDGET_S: starts a step
  STEP_END=$(($(now_ms) + $2 * 1000))
  ((STEP_END > END_MS)) && STEP_END=$END_MS
  echo
  echo "=== step $1 (budget $2 s, at $(el) s of ${TOTAL} s)"
}

# ---- the items ----
B="$stage"
bq="env FEP_BENCH_QUICK=1 FEP_BENCH_DEVICES=$BENCH_DEVICES"
bf="env FEP_BENCH_DEVICES=$BENCH_DEVICES"
crit="--bench --noplot --nresamples 10000"
if [ "$DRY" = 1 ]; then
  smoke="--smoke"; lcadev="--device cpu --configs small"
  f_att="cpu_attention_.*_f32/"
  f_att16="cpu_attention_.*_f16/"
  f_bwd="cpu_attention_bwd_.*_f32/"
  f_dec="cpu_attention_decode_.*_f32/"
  f_inp="cpu_attention_inputs_.*_f32/"
  dt_q=f32 dt_16=f16
  f_lca="cpu_lca_small_f32/"
  f_settle="cpu_settle_smoke_(infer|learn)_f32/"
  f_vmp="cpu_vmp_(tmaze_states_f32/N1000_|five_factor_states_f32/N100_|grid_policies_f32/N32_)"
  p_att="" p_att64="" p_lca="" p_settle="" p_vmp=""
else
  smoke=""; lcadev=""
  f_att="cuda_attention_(dot|gaussian|studentt|laplace)_(full|causal)_bf16/D(64|128)_L(1024|4096|16384)_"
  f_att16="cuda_attention_(dot|gaussian|studentt|laplace)_(full|causal)_f16/D(64|128)_L(1024|4096|16384)_"
  f_bwd="cuda_attention_bwd_.*_bf16/D128_L4096_"
  f_dec="cuda_attention_decode_.*_bf16/"
  f_inp="cuda_attention_inputs_(dot|studentt)_.*_bf16/D128_(L4096_B4|T16384_S8)_H16"
  dt_q=bf16 dt_16=f16
  f_lca="cuda_lca_large_f32/"
  f_settle="cuda_settle_pcx_(infer|learn)_f32/"
  f_vmp="cuda_vmp_((tmaze|five_factor)_states_f32/N100000_|grid_policies_f32/N10000_)"
  p_att="--quick --dims 128" p_att64="--quick --dims 64" p_lca="--quick --configs large" p_settle="--quick --configs pcx --dtypes f32"
  p_vmp="--quick --targets-only"
fi
pydeps=$RUN/pydeps
vmpdeps="--pydeps $pydeps"

# 1. port
add port.mma_gpu 30 0 "$B/tests/mma_gpu" "$B/tests/mma_gpu --color never --show-output"
smi="nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu,power.draw --format=csv | tee $RUN/device.txt && nvidia-smi -L"
[ "$DRY" = 1 ] && smi="if command -v nvidia-smi >/dev/null; then $smi; else echo 'SKIPPED: no nvidia-smi (dry run)'; fi"
add port.nvidia-smi 15 0 - "$smi"
add port.load 20 0 "$B" "bash ci/gpu-run.sh --load-check $B"

# 2. tests: the Python bindings on CUDA tensors first (what a user runs first, and each is short),
#    then the GPU ones by value, then the C ABI ones
threads=${FEP_GPU_TEST_THREADS:+--test-threads=$FEP_GPU_TEST_THREADS}
TESTS=()
for t in attention attention_inputs settle settle_precision vmp torch_ops torch_settle_lca nn_pc nn_lca nn_attention; do
  add "tests.py-$t" 60 0 "$B/libfep_kernels.so" "FEP_KERNELS_LIB=$LIB $py bindings/python/test_$t.py"
  TESTS+=("tests.py-$t")
done
for t in attention_gpu attention_backward_gpu attention_decode attention_inputs_gpu attention_inputs_backward_gpu lca_gpu settle_gpu vmp_gpu attention_ffi settle_ffi vmp_ffi; do
  add "tests.$t" 90 0 "$B/tests/$t" "$B/tests/$t --color never --show-output $threads"
  TESTS+=("tests.$t")
done
# the JAX front end's XLA FFI handlers on CUDA arrays (JAX's default device is the GPU there;
# the VMP ones are host-only and stay in CI), after the Rust GPU tests
for t in jax_attention jax_settle jax_lca; do
  add "tests.py-$t" 120 0 "$B/libfep_kernels.so" "FEP_KERNELS_LIB=$LIB $py bindings/python/test_$t.py"
  TESTS+=("tests.py-$t")
done
# any other test binary that is not CPU-only (a new one) runs after those
CPU_TESTS=()
for f in "$B"/tests/*; do
  [ -e "$f" ] || continue
  t=$(basename "$f")
  case "$t" in
    mma_gpu | attention_gpu | attention_backward_gpu | attention_decode | attention_inputs_gpu | attention_inputs_backward_gpu | lca_gpu | settle_gpu | vmp_gpu | attention_ffi | settle_ffi | vmp_ffi) ;;
    # CPU-only (candle_ops: candle's CPU storage; no tests at all without its feature)
    # bad_input*: the CPU's bad-input probes and property tests (README's matrix from the repo)
    *_cpu | ffi_header | resources | settle_digits | settle_precision | census | candle_ops | bad_input | bad_input_matrix) CPU_TESTS+=("$t") ;;
    *) add "tests.$t" 90 0 "$f" "$f --color never --show-output $threads"; TESTS+=("tests.$t") ;;
  esac
done

# 3. quick benches: ours (criterion, FEP_BENCH_QUICK=1, a filter), then the peers (--quick,
#    their own --budget-s, JSON written as they go)
att="$B/bench-attention"
add quick.bench-attention 75 0 "$att" "$bq FEP_BENCH_OPS=forward FEP_BENCH_DTYPES=$dt_q $att $crit '$f_att'"
add quick.bench-attention-bwd 40 0 "$att" "$bq FEP_BENCH_OPS=backward FEP_BENCH_DTYPES=$dt_q $att $crit '$f_bwd'"
add quick.bench-attention-decode 45 0 "$att" "$bq FEP_BENCH_OPS=decode FEP_BENCH_DTYPES=$dt_q $att $crit '$f_dec'"
add quick.bench-attention-inputs 40 0 "$att" "$bq FEP_BENCH_OPS=inputs FEP_BENCH_DTYPES=$dt_q $att $crit '$f_inp'"
add quick.bench-lca 20 0 "$B/bench-lca" "$bq $B/bench-lca $crit '$f_lca'"
add quick.bench-settle 25 0 "$B/bench-settle" "$bq $B/bench-settle $crit '$f_settle'"
add quick.bench-vmp 20 0 "$B/bench-vmp" "$bq $B/bench-vmp $crit '$f_vmp'"
add quick.peers-attention 90 15 - "$py benches/peers/attention.py --lib $LIB $smoke $p_att --budget-s @BUDGET@ --out $RUN/peers-attention.json"
add quick.peers-attention-bwd 150 30 - "$py benches/peers/attention.py --op backward --lib $LIB $smoke ${p_att:+--quick} --criterion $RUN/criterion --budget-s @BUDGET@ --out $RUN/peers-attention-bwd.json"
add quick.peers-attention-inputs 150 30 - "$py benches/peers/attention.py --op inputs --lib $LIB $smoke ${p_att:+--quick} --budget-s @BUDGET@ --out $RUN/peers-attention-inputs.json"
add quick.peers-attention-decode 80 15 - "$py benches/peers/attention.py --op decode --lib $LIB $smoke ${p_att:+--quick} --budget-s @BUDGET@ --out $RUN/peers-attention-decode.json"
add quick.peers-lca 60 10 - "$py benches/peers/lca.py --lib $LIB $lcadev $p_lca --budget-s @BUDGET@ --out $RUN/peers-lca.json"
add quick.peers-settle 50 10 - "$py benches/peers/settle.py --lib $LIB $smoke $p_settle --budget-s @BUDGET@ --out $RUN/peers-settle.json"
add quick.peers-vmp 40 10 - "bash ci/gpu-run.sh --pydeps $B $pydeps; $py benches/peers/vmp.py --lib $LIB $smoke $p_vmp $vmpdeps --budget-s @BUDGET@ --out $RUN/peers-vmp.json"
# the peers by value and cost: the headline comparison (attention forward) first, then the
# cheap ones, the costliest compiles (FlexAttention's decode and backward) last, the score inputs
# (issue 23: bias, mask, packed sequences; ten flex compiles) after them as the lowest value
QUICK=(quick.bench-attention quick.bench-attention-bwd quick.bench-attention-decode
  quick.bench-attention-inputs quick.bench-lca quick.bench-settle quick.bench-vmp
  quick.peers-attention quick.peers-lca quick.peers-settle quick.peers-vmp
  quick.peers-attention-decode quick.peers-attention-bwd quick.peers-attention-inputs)

# 4. the rest, in order of value
add rest.tour 60 0 "$B/tour" "$B/tour"
add rest.pc_digits 60 0 "$B/pc_digits" "$B/pc_digits"
add rest.bench-attention-f16 60 0 "$att" "$bq FEP_BENCH_OPS=forward FEP_BENCH_DTYPES=$dt_16 $att $crit '$f_att16'"
add rest.peers-attention-d64 90 15 - "$py benches/peers/attention.py --lib $LIB $smoke $p_att64 --budget-s @BUDGET@ --out $RUN/peers-attention-d64.json"
add rest.bench-lca 40 0 "$B/bench-lca" "$bf $B/bench-lca $crit"
add rest.bench-vmp 60 0 "$B/bench-vmp" "$bf $B/bench-vmp $crit"
add rest.bench-settle 120 0 "$B/bench-settle" "$bf $B/bench-settle $crit"
add rest.peers-attention-f16 120 15 - "$py benches/peers/attention.py --lib $LIB $smoke ${p_att:+--quick --dtypes f16} --budget-s @BUDGET@ --out $RUN/peers-attention-f16.json"
add rest.peers-vmp-full 120 10 - "bash ci/gpu-run.sh --pydeps $B $pydeps; $py benches/peers/vmp.py --lib $LIB $smoke $vmpdeps --budget-s @BUDGET@ --out $RUN/peers-vmp-full.json"
add rest.peers-lca-full 90 10 - "$py benches/peers/lca.py --lib $LIB $lcadev --budget-s @BUDGET@ --out $RUN/peers-lca-full.json"
add rest.peers-settle-full 150 10 - "$py benches/peers/settle.py --lib $LIB $smoke --budget-s @BUDGET@ --out $RUN/peers-settle-full.json"
add rest.bench-attention-full 400 0 "$B/bench-attention" "$bf $B/bench-attention $crit"
REST=(rest.tour rest.pc_digits rest.bench-attention-f16 rest.peers-attention-d64 rest.bench-lca rest.bench-vmp rest.bench-settle
  rest.peers-attention-f16 rest.peers-vmp-full rest.peers-lca-full rest.peers-settle-full
  rest.bench-attention-full)
for t in "${CPU_TESTS[@]}"; do
  add "rest.$t" 120 0 "$B/tests/$t" "$B/tests/$t --color never"
  REST+=("rest.$t")
  CPU_ONLY[rest.$t]=1
done

# The criterion ids step 3 should measure (the report lists those it cannot find as not
# measured); they follow the id formats of benches/*.rs.
if [ "$DRY" != 1 ]; then
  {
    for fam in dot gaussian studentt laplace; do for mask in full causal; do for d in 128 64; do
      for l in 1024 4096 16384; do
        echo "quick.bench-attention cuda_attention_${fam}_${mask}_bf16/D${d}_L${l}_B$((16384 / l))_H$((2048 / d))"
      done; done; done; done
    for fam in dot gaussian_V studentt_V laplace_V; do for mask in full causal; do for v in learnpi fixedpi; do
      [ "$fam" = dot ] && [ "$v" = fixedpi ] && continue
      g=${fam/_V/_${mask}_$v}; [ "$fam" = dot ] && g=dot_$mask
      echo "quick.bench-attention-bwd cuda_attention_bwd_${g}_bf16/D128_L4096_B4_H16"
    done; done; done
    for fam in dot studentt; do
      for v in fwd fwd_keybias fwd_padmask bwd bwd_fullbias; do
        echo "quick.bench-attention-inputs cuda_attention_inputs_${fam}_${v}_bf16/D128_L4096_B4_H16"
      done
      for v in fwd_varlen_causal bwd_varlen_causal; do
        echo "quick.bench-attention-inputs cuda_attention_inputs_${fam}_${v}_bf16/D128_T16384_S8_H16"
      done
    done
    for fam in dot gaussian studentt laplace; do for lq in 1 16; do
      for bl in 1:65536 4:65536 1:1048576; do
        echo "quick.bench-attention-decode cuda_attention_decode_${fam}_bf16/Lq${lq}_Lk${bl#*:}_B${bl%%:*}_Hq32_Hkv8_D128"
      done; done; done
    echo "quick.bench-lca cuda_lca_large_f32/B4096_n256_m1024_T200"
    for mode in infer learn; do for t in 8 32; do
      echo "quick.bench-settle cuda_settle_pcx_${mode}_f32/B256_784-128-128-128-10_T$t"; done; done
    echo "quick.bench-vmp cuda_vmp_tmaze_states_f32/N100000_K16"
    echo "quick.bench-vmp cuda_vmp_five_factor_states_f32/N100000_K16"
    echo "quick.bench-vmp cuda_vmp_grid_policies_f32/N10000_P64_H3"
  } >"$RUN/expected.txt"
fi

# Item limits to override (FEP_GPU_LIMITS="ITEM=SECONDS ..."), e.g. to test what a time-out does.
for kv in ${FEP_GPU_LIMITS:-}; do
  if [ -n "${TMO[${kv%%=*}]:-}" ]; then TMO[${kv%%=*}]=${kv#*=}; else echo "FEP_GPU_LIMITS: no item ${kv%%=*}"; fi
done

# ---- publishing: the report, summary.txt and gpu-run.tar.gz, each replaced whole ----
results=(--results-dir benches/results)
[ "$DRY" = 1 ] && results=(--dry-run)
STATE="started"  # what the published files say about the run as a whole
STOPPED=""       # the signal that stopped the suite, and when
LAST_PUBLISH=0
PUBLISHED_MD=""

summary() { # the summary: one line per run of an item in plan order, then what was cut
  echo "=== summary ($(el) s of ${TOTAL} s; $STATE; $( [ "$DRY" = 1 ] && echo "DRY RUN" || sed -n 2p "$RUN/device.txt" 2>/dev/null); commit $COMMIT)"
  printf "%-6s %-24s %-8s %8s   %-5s %s\n" step item status seconds limit note
  # an item cut in its step and retried in step 4 has two lines; then what stayed cut
  tail -n +2 "$RUN/steps.tsv" | sort -t$'\t' -k1,1n -s | awk -F'\t' '
    $4 == "SKIPPED" && $7 ~ /^not selected/ { ns = ns " " $2 "." $3; next }
    $4 == "SKIPPED" && $7 ~ /^CPU-only/ { cpu = cpu " " $3; next }
    { printf "%-6s %-24s %-8s %6s s   %-5s %s\n", $2, $3, $4, $5, $6, substr($7, 1, 110) }
    END { if (ns != "") print "not selected (FEP_GPU_STEPS):" ns
      if (cpu != "") print "not run here (CPU-only tests: CI runs them; FEP_GPU_CPU_TESTS=1):" cpu }'
  local n
  for n in "$RUN"/inflight/*; do
    [ -e "$n" ] && echo "running   $(basename "$n") (since $(((($(now_ms) - $(cut -d' ' -f2 "$n")) / 1000))) s)"
  done
  awk -F'\t' 'NR > 1 { last[$2 "." $3] = $4; if (!($2 "." $3 in seen)) { seen[$2 "." $3] = 1; order[++n] = $2 "." $3 } }
    END { for (i = 1; i <= n; i++) if (last[order[i]] == "CUT" || last[order[i]] == "KILLED") s = s order[i] " "
      print "cut or killed: " (s == "" ? "nothing" : s) }' "$RUN/steps.tsv"
  [ -s "$RUN/left-behind.txt" ] && sed 's/^/LEFT BEHIND: /' "$RUN/left-behind.txt"
  return 0
}

publish() { # publish: writes the three files next to the run folder, then moves each into $OUT
  local md
  LAST_PUBLISH=$(now_ms)
  summary >"$RUN_HOME/summary.txt" 2>&1 && mv -f "$RUN_HOME/summary.txt" "$OUT/summary.txt"
  rm -rf "$RUN_HOME/report" && mkdir -p "$RUN_HOME/report"
  if python3 ci/gpu-report.py --run "$RUN" --out "$RUN_HOME/report" --commit "$COMMIT" \
    --status "$STATE" "${results[@]}" >"$RUN/report.log" 2>&1; then
    for md in "$RUN_HOME"/report/*.md; do
      [ -e "$md" ] || continue
      mv -f "$md" "$OUT/"
      # the report's name follows the device (known after step 1): drop the one published before
      [ -n "$PUBLISHED_MD" ] && [ "$PUBLISHED_MD" != "$(basename "$md")" ] && rm -f "$OUT/$PUBLISHED_MD"
      PUBLISHED_MD=$(basename "$md")
    done
  else
    echo "ci/gpu-report.py failed:"; tail -20 "$RUN/report.log"
  fi
  tar czf "$RUN_HOME/gpu-run.tar.gz" -C "$RUN_HOME" run 2>/dev/null &&
    mv -f "$RUN_HOME/gpu-run.tar.gz" "$OUT/gpu-run.tar.gz"
}
publish_if_due() { (($(now_ms) - LAST_PUBLISH >= 20000)) && publish; return 0; }

# ---- stopping: TERM (the launch line's timeout) or INT (a person) ----
stop_inflight() { # stop_inflight WHY: TERM to every item in flight, KILL after 5 s, record them
  local f pid t1 lim name waited=0 any how
  # the step-2 workers first (they die on the signal; their items are recorded here)
  for pid in "${PAR_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null; done
  for f in "$RUN"/inflight/*; do
    [ -e "$f" ] || continue
    read -r pid t1 lim <"$f"
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null
  done
  while ((waited < 15)); do # 3 s for every item to go (less than the items' own `timeout -k 5`)
    any=0
    for f in "$RUN"/inflight/*; do [ -e "$f" ] && read -r pid t1 lim <"$f" && alive "$pid" && any=1; done
    ((any)) || break
    sleep 0.2; waited=$((waited + 1))
  done
  for f in "$RUN"/inflight/*; do
    [ -e "$f" ] || continue
    read -r pid t1 lim <"$f"
    name=$(basename "$f")
    how="TERM"
    if alive "$pid"; then
      kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
      sleep 0.5
      how="TERM, ignored it: KILLed 3 s later"
      if alive "$pid"; then
        how=$LEFT_BEHIND
        note_left_behind "$name" "$pid"
      fi
    fi
    record "$name" KILLED "$(since_s "$t1")" "$lim" \
      "$1 ($how); what it printed is in its log"
    rm -f "$f"
  done
}

on_signal() { # on_signal SIG
  [ -n "$STOPPED" ] && return
  STOPPED="SIG$1 at $(el) s"
  trap '' TERM INT # a second signal does not cut the stop short
  echo
  echo "=== stopped by SIG$1 at $(el) s: stopping the items in flight, then publishing"
  stop_inflight "the suite was stopped (SIG$1 at $(el) s)"
  [ "$1" = INT ] && exit 130
  exit 143
}

finish() { # the EXIT trap: every item accounted for, the last publication, the exit status
  local rc=$? n failed
  trap '' TERM INT
  [ -n "${PYDEPS_PID:-}" ] && kill "$PYDEPS_PID" 2>/dev/null
  if [ -n "$STOPPED" ]; then
    # what the plan had and the suite never reached
    for n in "${ORDER[@]}"; do
      awk -F'\t' -v s="${n%%.*}" -v i="${n#*.}" '$2 == s && $3 == i { f = 1 } END { exit !f }' "$RUN/steps.tsv" ||
        record "$n" CUT 0 "${TMO[$n]}" "not reached: the suite was stopped ($STOPPED)"
    done
    STATE="STOPPED by $STOPPED: items in flight KILLED, items not reached CUT"
  elif ((rc == 0)); then
    STATE="complete"
  else
    STATE="ended early (exit $rc) at $(el) s"
  fi
  echo
  echo "=== report (at $(el) s; $STATE)"
  publish
  cat "$OUT/summary.txt"
  # a test item's last run did not pass (nvidia-smi's line is informative only)
  failed=$(awk -F'\t' 'NR > 1 { k = $2 "." $3; last[k] = $4 }
    END { for (k in last) if (k ~ /^(port\.(mma_gpu|load)|tests\.)/ && last[k] ~ /^(FAILED|TIMEOUT|KILLED|CUT)$/) n++
      print n + 0 }' "$RUN/steps.tsv")
  rm -rf "$pydeps"
  if [ "${FEP_GPU_KEEP_RUN:-$DRY}" != 1 ] && [ -z "$STOPPED" ]; then rm -rf "$RUN"; fi
  echo "results in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
  ((rc == 0)) && ((failed)) && { echo "$failed test item(s) did not pass"; rc=1; }
  ((rc == 0)) && [ ! -d "$stage" ] && rc=2
  exec >&- 2>&-
  wait "$TEE_PID" 2>/dev/null # console.log complete before the device tool collects $OUT
  exit $rc
}

# ---- the steps ----
printf 'order\tstep\titem\tstatus\tseconds\tlimit_s\tnote\n' >"$RUN/steps.tsv"
trap 'on_signal TERM' TERM
trap 'on_signal INT' INT
trap finish EXIT
publish
# pymdp's wheels install in the background meanwhile (CPU only; the vmp peers wait for it)
if selected quick.peers-vmp || selected rest.peers-vmp-full; then
  bash ci/gpu-run.sh --pydeps "$B" "$pydeps" >"$RUN/pydeps.log" 2>&1 &
  PYDEPS_PID=$!
fi
PAR_PIDS=()

step "1 port (tensor-core layouts, device, binaries load)" "$(sb 20)"
for n in port.mma_gpu port.nvidia-smi port.load; do run_item "$n"; done
[ -s "$RUN/device.txt" ] || [ "$DRY" = 1 ] ||
  timeout 10 nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$RUN/device.txt" 2>/dev/null
awk -F, 'NF > 1 { n++ } END { exit n < 2 }' "$RUN/device.txt" 2>/dev/null || echo "name, driver_version, memory.total [MiB], clocks.max.sm [MHz]
$( [ "$DRY" = 1 ] && echo "no GPU (dry run on $(nproc) CPUs)" || echo "unknown GPU (nvidia-smi failed)")" >"$RUN/device.txt"
STATE="running: step 2 (tests)"
publish

step "2 tests (FEP_REQUIRE_GPU=${FEP_REQUIRE_GPU:-0}, ${FEP_GPU_TEST_JOBS:-4} at once)" "$(sb 100)"
run_parallel "${FEP_GPU_TEST_JOBS:-4}" "${TESTS[@]}"
STATE="running: step 3 (quick benches)"
publish

step "3 quick benches (ours, then the peers)" "$(sb 320)"
for n in "${QUICK[@]}"; do run_item "$n"; publish_if_due; done
STATE="running: step 4 (the rest)"
publish

step "4 the rest, until $((TOTAL - REPORT_RESERVE)) s" "$TOTAL"
# first what steps 1-3 did not start for want of time, and the test items stopped at step 2's
# end (a test that never finishes counts as failed)
mapfile -t retry < <(awk -F'\t' 'NR > 1 { k = $2 "." $3; last[k] = $4; if (!(k in seen)) { seen[k] = 1; order[++n] = k } }
  END { for (i = 1; i <= n; i++) { k = order[i]; if (last[k] == "CUT" || (last[k] == "KILLED" && k ~ /^tests\./)) print k } }' "$RUN/steps.tsv")
if ((${#retry[@]})); then
  echo "  (first the ${#retry[@]} item(s) cut or killed earlier: ${retry[*]})"
  for n in "${retry[@]}"; do run_item "$n"; publish_if_due; done
fi
for n in "${REST[@]}"; do
  if [ -n "${CPU_ONLY[$n]:-}" ] && [ "${FEP_GPU_CPU_TESTS:-0}" != 1 ]; then
    record "$n" SKIPPED 0 - "CPU-only test: CI runs it (FEP_GPU_CPU_TESTS=1 runs it here)"
    continue
  fi
  run_item "$n"
  publish_if_due
done
[ -n "${PYDEPS_PID:-}" ] && wait "$PYDEPS_PID"
exit 0 # the EXIT trap publishes
