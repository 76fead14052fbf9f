"""Registration of the library's XLA FFI handlers with JAX (``jax.ffi.register_ffi_target``).

The handlers are C symbols of the same shared library the PyTorch front end loads
(``fep_xla_cpu_<op>`` and ``fep_xla_cuda_<op>``, src/xla/ in the crate): nothing is compiled at
install or import time. Each target is registered once per process, for the host and, when the
library has them and jaxlib a CUDA backend, for CUDA.
"""

from typing import Set

import jax

from .._lib import _get

# The ops with XLA handlers, by target name (the symbol is fep_xla_<platform>_<name>).
TARGETS = ("attention_forward", "attention_backward", "settle_infer", "settle_learn", "lca_solve",
           "lca_learn", "vmp_infer_states", "vmp_infer_sequence", "vmp_infer_policies")


_registered: Set[str] = set()


def _cuda_backend() -> bool:
    """Whether jaxlib has a CUDA backend in this process (jax[cuda] and a visible GPU)."""
    try:
        return any(d.platform == "gpu" for d in jax.devices("cuda"))
    except RuntimeError:
        return False


def ensure_registered() -> None:
    """Registers every target with JAX (idempotent; loads the library on first use)."""
    if len(_registered) == len(TARGETS):
        return
    lib = _get()
    cuda = _cuda_backend()
    for name in TARGETS:
        if name in _registered:
            continue
        fn = getattr(lib, f"fep_xla_cpu_{name}")
        jax.ffi.register_ffi_target(f"fep_{name}", jax.ffi.pycapsule(fn), platform="cpu")
        if cuda:  # (the VMP ones answer with an error there: their models live on the host)
            fn = getattr(lib, f"fep_xla_cuda_{name}")
            jax.ffi.register_ffi_target(f"fep_{name}", jax.ffi.pycapsule(fn), platform="CUDA")
        _registered.add(name)
