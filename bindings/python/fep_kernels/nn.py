"""The earlier import path of ``fep_kernels.torch.nn``, kept working: ``fep_kernels.nn`` and its
submodules (``fep_kernels.nn.pc``, ``.lca``, ``.attention``) are the same module objects as
``fep_kernels.torch.nn``'s, so classes and ``isinstance`` checks agree whichever path imported
them."""

import importlib
import sys

_package = importlib.import_module("fep_kernels.torch.nn")
for _sub in ("pc", "lca", "attention"):
    sys.modules[f"{__name__}.{_sub}"] = importlib.import_module(f"fep_kernels.torch.nn.{_sub}")
sys.modules[__name__] = _package
