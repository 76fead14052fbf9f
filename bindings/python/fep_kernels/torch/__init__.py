"""fep_kernels for PyTorch: the ``torch.library`` custom ops and modules on PyTorch tensors.

- ``fep_kernels.torch.ops``: ``fep::attention_forward`` / ``fep::attention_backward`` and the
  differentiable :func:`attention`, :func:`attention_with_stats`, :func:`attention_varlen`;
- ``fep_kernels.torch.settle``: ``fep::settle_energy`` / ``settle_learn`` / ``settle_infer`` and
  the differentiable :func:`settle_energy`, :func:`settle_infer_op`;
- ``fep_kernels.torch.lca``: ``fep::lca_solve`` and :func:`lca_solve`;
- ``fep_kernels.torch.nn``: modules (``PCNetwork``, ``LCALayer``, ``PrecisionAttention``).

Importing it registers the ``fep::`` ops. The same functions are reachable from ``fep_kernels``
itself (``fep_kernels.attention``...), and the modules under their earlier names
(``fep_kernels.torch_ops``, ``torch_settle``, ``torch_lca``, ``fep_kernels.nn``: the same module
objects). The ctypes layer they call (``fep_kernels.attention_forward``, ``SettleNet``,
``LcaDictionary``, ``VmpModel``) and the loader (``fep_kernels._lib``, ``_abi``) sit below this
package and ``fep_kernels.jax``.

Example::

    import torch
    import fep_kernels.torch as fkt

    q = k = v = torch.randn(1, 2, 8, 16, requires_grad=True)
    fkt.attention(q, k, v, score="student_t", nu=4.0, causal=True).sum().backward()
"""

from . import lca, ops, settle  # noqa: F401  (registers the fep:: ops)
from .lca import lca_solve
from .ops import attention, attention_varlen, attention_with_stats
from .settle import settle_energy, settle_infer_op

__all__ = ["attention", "attention_with_stats", "attention_varlen", "settle_energy",
           "settle_infer_op", "lca_solve", "nn"]


def __getattr__(name: str):
    if name == "nn":  # the modules, imported on first use
        import importlib

        return importlib.import_module(".nn", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
