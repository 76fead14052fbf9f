"""The runner the binding tests share (test_settle.py, test_vmp.py, test_attention.py): load the
library, run every ``test_*`` function of the calling module in name order, print ok / FAIL /
skip per test (a test that returns a string starting with "SKIPPED" was skipped) and a summary.

    sys.exit(run_tests(globals(), "test_vmp.py"))
"""

import traceback

import fep_kernels as fk


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
