"""fep_kernels for JAX: the library's ops as XLA FFI custom calls (``jax.ffi``), usable under
``jax.jit``, ``jax.grad`` and ``jax.vmap``.

The handlers are C symbols of the same shared library the PyTorch front end uses (found as
:func:`fep_kernels.load` finds it); :func:`attention` registers them with JAX on first use, so
``import fep_kernels.jax`` needs JAX but not the library. Arrays on the host run the fast CPU
path (threads: :func:`fep_kernels.set_num_threads`); arrays on a CUDA device run the GPU kernels
on XLA's stream (a library built with the ``cuda`` feature and jax[cuda]).

Example::

    import jax, jax.numpy as jnp
    import fep_kernels.jax as fkj

    q = k = v = jnp.ones((1, 2, 8, 16))
    o = jax.jit(lambda q, k, v: fkj.attention(q, k, v, score="gaussian", causal=True))(q, k, v)
"""

from .attention import attention, attention_with_stats
from .lca import lca_learn, lca_solve
from .settle import settle_energy, settle_infer, settle_learn
from .vmp import VmpModel

__all__ = ["attention", "attention_with_stats", "settle_energy", "settle_infer", "settle_learn",
           "lca_solve", "lca_learn", "VmpModel"]
