"""PyTorch modules on the fep-kernels ops (needs PyTorch).

- :class:`PCNetwork`: a predictive-coding network (``nn.Module``) with learned weights, biases
  and error precisions; :meth:`PCNetwork.energy` is the differentiable settled free energy, so
  any ``torch.optim`` optimiser trains it; :meth:`PCNetwork.infer` / ``forward`` settle with the
  top layer free. :class:`PCState` is what ``infer`` returns.
- :class:`LCALayer`: sparse coding by the locally competitive algorithm, with the dictionary as
  a parameter and a dictionary-learning step.
- :class:`PrecisionAttention`: multi-head (grouped-query) precision-weighted attention with
  learned per-head precisions, Student-t nu and optional per-key precisions; :class:`KVCache`
  for incremental decoding with it.

Example::

    import torch
    from fep_kernels.nn import PCNetwork

    net = PCNetwork([64, 64, 10], activations=["identity", "tanh"], precision="scalar")
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    x0, y = torch.rand(32, 64), torch.eye(10)[torch.arange(32) % 10]
    net.learn_step(x0, y, opt)
    print(net(x0).argmax(1), net.precisions())
"""

from typing import Any, List

from .pc import PCNetwork, PCState

__all__ = ["PCNetwork", "PCState", "LCALayer", "PrecisionAttention", "KVCache"]


def __getattr__(name: str) -> Any:
    # LCALayer, PrecisionAttention and KVCache live in their own modules, imported on first use
    if name == "LCALayer":
        from .lca import LCALayer

        globals()["LCALayer"] = LCALayer
        return LCALayer
    if name in ("PrecisionAttention", "KVCache"):
        from . import attention

        globals()["PrecisionAttention"] = attention.PrecisionAttention
        globals()["KVCache"] = attention.KVCache
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
