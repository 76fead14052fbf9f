"""Tests of the CPU device's thread control and of the f64 reference in the Python front end:
``fk.set_num_threads`` / ``fk.get_num_threads`` (following ``torch.get_num_threads()`` by
default, so PyTorch and this library never oversubscribe the cores), results independent of the
thread count, ``with fk.cpu_reference():`` (the oracle) against the fast path, and bad counts.
Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_cpu_threads.py`` (or pytest).

Needs PyTorch; without it, it prints that it was skipped and exits 0."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_cpu_threads.py", f"{e.name} is not installed")

import fep_kernels as fk  # noqa: E402
from _runner import expect, run_tests  # noqa: E402


def _attention_case(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, 70, 32, generator=g)
    k = torch.randn(2, 2, 90, 32, generator=g)
    v = torch.randn(2, 2, 90, 32, generator=g)
    pk = torch.rand(2, 2, 90, generator=g) + 0.5
    return q, k, v, pk


def test_follows_torch_by_default():
    before = torch.get_num_threads()
    try:
        fk.set_num_threads(None)
        torch.set_num_threads(1)
        assert fk.get_num_threads() == 1
        torch.set_num_threads(2)
        assert fk.get_num_threads() == 2
        fk.set_num_threads(3)  # explicit: torch no longer followed
        torch.set_num_threads(1)
        assert fk.get_num_threads() == 3
    finally:
        fk.set_num_threads(None)
        torch.set_num_threads(before)


def test_bad_counts():
    expect(ValueError, lambda: fk.set_num_threads(-1), "n")
    expect(ValueError, lambda: fk.set_num_threads(10**6), "n")
    expect(TypeError, lambda: fk.set_num_threads(1.5), "n")
    expect(TypeError, lambda: fk.set_num_threads(True), "n")


def test_results_do_not_depend_on_threads():
    q, k, v, pk = _attention_case()
    outs = []
    try:
        for n in (1, 2, 3):
            fk.set_num_threads(n)
            o = fk.attention(q, k, v, precision_key=pk, score="student_t", nu=3.0, causal=True)
            outs.append(o)
    finally:
        fk.set_num_threads(None)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_reference_is_the_oracle():
    q, k, v, pk = _attention_case(1)
    for score in ("dot", "gaussian", "student_t", "laplace"):
        fast = fk.attention(q, k, v, precision_key=pk, score=score)
        with fk.cpu_reference():
            ref = fk.attention(q, k, v, precision_key=pk, score=score)
        err = ((fast.double() - ref.double()).norm() / ref.double().norm()).item()
        assert err < 1e-5, (score, err)
    # outside the block the fast path runs again
    assert fk._lib._reference_depth == 0


if __name__ == "__main__":
    sys.exit(run_tests(globals(), "test_cpu_threads.py"))
