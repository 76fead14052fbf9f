"""The timing harness the peer scripts share (lca.py, settle.py, vmp.py, attention.py): one
synchronised call, and the median over repetitions by CUDA events on the current stream or by the
wall clock; the --budget-s time budget; the JSON written as the records come.

PyTorch is imported only when timing CUDA work, so the scripts still run (and skip) without it.
"""

import json
import math
import os
import statistics
import time


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
            return statistics.median(times)
        import torch

        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
        for start, end in ev:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) for s, e in ev)


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


def write_json(path, records):
    """Writes the records (again) to path, if any: called after each configuration, so a script
    stopped by a timeout still leaves what it measured."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(records, f, indent=1)
        f.write("\n")
