"""PyTorch modules on the fep-kernels ops (needs PyTorch).

- :class:`PCNetwork`: a predictive-coding network (``nn.Module``) with learned weights, biases
  and error precisions; :meth:`PCNetwork.energy` is the differentiable settled free energy, so
  any ``torch.optim`` optimiser trains it; :meth:`PCNetwork.infer` / ``forward`` settle with the
  top layer free. :class:`PCState` is what ``infer`` returns.
- :class:`LCALayer`: sparse coding by the locally competitive algorithm, with the dictionary as
  a parameter and a dictionary-learning step.

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

__all__ = ["PCNetwork", "PCState", "LCALayer"]


def __getattr__(name: str) -> Any:
    # LCALayer lives in its own module, imported on first use
    if name == "LCALayer":
        from .lca import LCALayer

        globals()["LCALayer"] = LCALayer
        return LCALayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> List[str]:
    return sorted(set(globals()) | set(__all__))
