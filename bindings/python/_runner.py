"""The runner the binding tests share (test_*.py): load the library, run every ``test_*`` function of the calling module in name order, print ok / FAIL /
skip per test (a test that returns a string starting with "SKIPPED" was skipped) and a summary.

    sys.exit(run_tests(globals(), "test_vmp.py"))
"""

import sys
import traceback
import typing

import fep_kernels as fk


def skip_module(script: str, why: str) -> "typing.NoReturn":
    """Skips the whole test file (``why``: e.g. "PyTorch is not installed"): under pytest as a
    module-level skip, run as a script by printing "<script>: SKIPPED: <why>" and exiting 0."""
    if "pytest" in sys.modules:
        import pytest

        pytest.skip(why, allow_module_level=True)
    print(f"{script}: SKIPPED: {why}")
    sys.exit(0)


def run_tests(namespace, script, banner=""):
    """Runs the ``test_*`` callables of ``namespace``; returns the exit status (1 on a failure or
    when the library does not load). ``banner`` is appended to the first line printed."""
    try:
        fk.load()
    except (OSError, RuntimeError) as e:
        print(f"{script}: cannot load the library: {e}")
        return 1
    import torch

    print(f"fep-kernels {fk.version()} at {fk._lib_path}, torch {torch.__version__}{banner}")
    return run_functions(namespace)


def run_functions(namespace):
    """The loop of :func:`run_tests` without loading anything: runs the ``test_*`` callables of
    ``namespace`` in name order; returns the exit status (1 when one failed)."""
    tests = [(n, f) for n, f in sorted(namespace.items()) if n.startswith("test_") and callable(f)]
    passed = failed = skipped = 0
    for name, fn in tests:
        try:
            note = fn()
        except Exception:
            failed += 1
            print(f"FAIL {name}")
            traceback.print_exc()
            continue
        if isinstance(note, str) and note.startswith("SKIPPED"):
            skipped += 1
            print(f"skip {name}: {note}")
        else:
            passed += 1
            print(f"ok   {name}")
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


def expect(exc, fn, needle):
    """Asserts that ``fn()`` raises ``exc`` with ``needle`` in its message."""
    try:
        fn()
    except exc as e:
        assert needle in str(e), f"{needle!r} not in {e}"
        return
    raise AssertionError(f"no {exc.__name__} ({needle})")
