"""The timing harness the peer scripts share (lca.py, settle.py, vmp.py): one synchronised call,
and the median over repetitions by CUDA events on the current stream or by the wall clock.

PyTorch is imported only when timing CUDA work, so the scripts still run (and skip) without it.
"""

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
