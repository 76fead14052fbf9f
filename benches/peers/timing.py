"""The timing harness the peer scripts share (lca.py, settle.py, vmp.py, attention.py): one
synchronised call, and the median over repetitions by CUDA events on the current stream or by the
wall clock; the --budget-s time budget; the records, written to the JSON one by one as they come.

PyTorch is imported only when timing CUDA work, so the scripts still run (and skip) without it.

Records: each implementation's record is added (and the JSON rewritten) as soon as that
implementation is measured, ours first, so a script killed by its timeout in a peer's cold
compile (torch.compile, FlexAttention) keeps ours and the peers already measured.

Test hook: with FEP_PEERS_HANG_AFTER=<impl> in the environment (an implementation's name, e.g.
"ours"), the script prints "FEP_PEERS_HANG_AFTER=<impl>: hanging (test hook)" right after the
first record of that implementation is written, then sleeps forever: a deterministic stand-in
for a hang in the next implementation (a cold compile), for the GPU suite's self-test that a
killed item keeps what it measured. Unset or empty: no effect.
"""

import json
import math
import os
import statistics
import sys
import time

HANG_AFTER_ENV = "FEP_PEERS_HANG_AFTER"


class Timer:
    def __init__(self, cuda):
        self.cuda = cuda

    def sync(self):
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def once(self, fn, block=None):
        """Milliseconds of one call of fn (synchronised)."""
        self.sync()
        t0 = time.perf_counter()
        r = fn()
        if block:
            block(r)
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def median(self, fn, reps, warmup, block=None):
        """Median milliseconds over reps calls of fn: CUDA events on the current stream, or the
        wall clock (CPU, or work outside PyTorch's stream such as JAX's: then ``block`` waits
        for each call's result)."""
        return self.stats(fn, reps, warmup, block)[1]

    def stats(self, fn, reps, warmup, block=None):
        """(min, median) milliseconds over reps calls of fn, timed as :meth:`median` says (the
        CPU benchmarks report both: these machines are noisy)."""
        for _ in range(warmup):
            r = fn()
            if block:
                block(r)
        self.sync()
        if not self.cuda or block is not None:
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                r = fn()
                if block:
                    block(r)
                self.sync()
                times.append((time.perf_counter() - t0) * 1e3)
            return min(times), statistics.median(times)
        import torch

        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
        for start, end in ev:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        times = [s.elapsed_time(e) for s, e in ev]
        return min(times), statistics.median(times)


def pick_reps(ms_one, budget_ms, lo, hi):
    return int(max(lo, min(hi, budget_ms // max(ms_one, 1e-3))))


class Budget:
    """A script's --budget-s: the caller asks before starting each configuration and starts none
    once it is spent; what it does not start becomes a record with "cut": true and no figures
    (ci/gpu-report.py lists those as cut for time). None: no budget."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.t0 = time.perf_counter()

    def left(self):
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.perf_counter() - self.t0)

    def spent(self, need=0.0):
        """Whether less than ``need`` seconds (0: nothing) are left."""
        return self.left() <= need

    def why(self, need=0.0):
        left = self.left()
        if left <= 0:
            return f"CUT: past the {self.seconds:g} s budget"
        return f"CUT: {left:.0f} s left of the {self.seconds:g} s budget, less than {need:.0f} s"


def fail_msg(e):
    """An exception as one short line: its type and the first line of its message."""
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


def ratio(ms, ours_ms):
    """ms / ours_ms (a peer's time over ours: > 1, ours is faster); None when either is missing."""
    return ms / ours_ms if (ms is not None and ours_ms) else None


def write_json(path, records):
    """Writes the records (again) to path, if any. Through a temporary file and a rename, so a
    script killed while writing leaves the previous complete JSON, never a truncated one."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


class Records(list):
    """A script's records (a list of dicts), written to ``path`` (--out; None: not written) each
    time one is added, so a script stopped by a timeout still leaves everything it measured."""

    def __init__(self, path):
        super().__init__()
        self.path = path
        self.hang_after = os.environ.get(HANG_AFTER_ENV) or None

    def add(self, rec):
        """Appends rec and rewrites the JSON; flushes stdout too, so the log of a killed run
        shows as much as its JSON. Then the test hook (module docstring)."""
        self.append(rec)
        self.write()
        sys.stdout.flush()
        if self.hang_after is not None and rec.get("impl") == self.hang_after:
            self._hang()

    def write(self):
        write_json(self.path, self)

    def _hang(self):
        print(f"{HANG_AFTER_ENV}={self.hang_after}: hanging (test hook)", flush=True)
        while True:
            time.sleep(3600)


# ---- CPU runs (issue 24): thread counts, the machine ----


def cpu_threads_env(threads):
    """Before JAX (or PyTorch) is imported: with ``threads`` = 1, XLA's CPU client is told to
    use one thread (``--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1``,
    appended to XLA_FLAGS), and OMP/MKL get 1; other counts leave XLA at its default (every
    core). None: nothing. Returns a line describing what JAX was told."""
    if threads is None:
        return "default"
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(threads)
    if threads == 1:
        flags = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        old = os.environ.get("XLA_FLAGS", "")
        if flags not in old:
            os.environ["XLA_FLAGS"] = (old + " " + flags).strip()
        return f"XLA_FLAGS={os.environ['XLA_FLAGS']}"
    return "XLA default (all cores)"


def apply_threads(threads, torch=None, fk=None):
    """torch.set_num_threads(threads) and fep_kernels.set_num_threads(threads) (None: leave
    both at their defaults; ours follows torch)."""
    if threads is None:
        return
    if torch is not None:
        torch.set_num_threads(threads)
    if fk is not None and hasattr(fk, "set_num_threads"):
        fk.set_num_threads(threads)


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo; platform.processor() elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown cpu"


def cpu_device_name(threads):
    """The ``device`` field of a CPU record: the model and the thread count."""
    return f"cpu: {cpu_model()}, {os.cpu_count()} cores, {threads or 'default'} thread(s)"
