"""PyTorch integration of LCA sparse coding (the locally competitive algorithm: sparse codes a
of x against a dictionary Phi with unit-norm columns, u <- u + eta (Phi^T x - u -
(Phi^T Phi - I) a), a = theta_lam(u); see :mod:`fep_kernels.lca`): the ``torch.library``
custom op ``fep::lca_solve`` with a fake implementation (so ``torch.compile(fullgraph=True)``
traces it) and :func:`lca_solve`, its Python wrapper.

``fep::lca_solve(Tensor phi, Tensor x, Tensor? u0, float lam, float eta, int steps,
str threshold, float tol, bool check_unit_norm, str tol_mode="absolute",
bool allow_tf32=False) -> (Tensor u, Tensor a, Tensor steps)`` is functional: each call prepares an
:class:`fep_kernels.LcaDictionary` from ``phi`` (a copy, and G = Phi^T Phi - I: O(n m^2) work;
with the automatic step also lambda_max(Phi^T Phi) by power iteration) and runs
:meth:`~fep_kernels.LcaDictionary.solve`. In the op's schema ``eta = 0`` means automatic
(1 / lambda_max). Build an ``LcaDictionary`` once instead when solving many batches against one
dictionary outside a compiled graph. LCA is not differentiable here: the op's backward raises a
RuntimeError.

Example::

    import torch
    import fep_kernels as fk

    phi = torch.randn(64, 256)
    phi /= phi.norm(dim=0, keepdim=True)                  # unit-norm columns
    u, a, steps = fk.lca_solve(phi, torch.randn(8, 64), lam=0.1, steps=200)  # eta automatic
    f = torch.compile(lambda phi, x: fk.lca_solve(phi, x, lam=0.1, steps=50)[1],
                      fullgraph=True)
"""

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._abi import _THRESHOLDS
from ._args import _DTYPES, _not_differentiable, _number, _shape, _steps, _tensor
from ..lca import LcaDictionary, _tol_mode_arg

__all__ = ["lca_solve"]

# CUDA dictionaries whose solve may still be running: (event recorded after it, dictionary),
# freed once the event has completed (so a call never waits for the GPU to free one)
_pending = []


def _retire(d: LcaDictionary) -> None:
    if d.device.type == "cpu":
        d.close()
    else:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(d.device))
        _pending.append((ev, d))
    while _pending and _pending[0][0].query():
        _pending.pop(0)[1].close()


def _check(phi: Tensor, x: Tensor, u0: Optional[Tensor], threshold: str,
           tol_mode: str = "absolute") -> None:
    """Checks kind, rank, dtype, device and shape (no data needed)."""
    _tensor(phi, "phi", dim=2, dtypes=_DTYPES)
    _tensor(x, "x", dim=2, dtypes=_DTYPES, device=phi.device, owner="phi")
    if x.shape[1] != phi.shape[0]:
        raise ValueError(f"x: expected shape [B, {phi.shape[0]}] (phi is "
                         f"{list(phi.shape)}), got {list(x.shape)}")
    _tensor(u0, "u0", dim=2, dtypes=(torch.float32,), device=phi.device, owner="phi",
            optional=True)
    if u0 is not None:
        _shape(u0, "u0", [x.shape[0], phi.shape[1]])
    if not isinstance(threshold, str):
        raise TypeError(f"threshold: expected a str, got {type(threshold).__name__}")
    if threshold not in _THRESHOLDS:
        raise ValueError(f"threshold: {threshold!r} is not one of {list(_THRESHOLDS)}")
    _tol_mode_arg(tol_mode)


@torch.library.custom_op("fep::lca_solve", mutates_args=())
def lca_solve_raw(phi: Tensor, x: Tensor, u0: Optional[Tensor], lam: float, eta: float,
                  steps: int, threshold: str, tol: float, check_unit_norm: bool,
                  tol_mode: str = "absolute", allow_tf32: bool = False
                  ) -> Tuple[Tensor, Tensor, Tensor]:
    """``fep::lca_solve``: (u, a, steps) of ``LcaDictionary(phi).solve(x, ...)``; eta = 0
    selects the automatic step 1 / lambda_max(Phi^T Phi)."""
    _check(phi, x, u0, threshold, tol_mode)
    d = LcaDictionary(phi.contiguous(), check_unit_norm=check_unit_norm)
    try:
        n_steps = torch.empty((x.shape[0],), dtype=torch.int32, device=x.device)
        res = d.solve(x.contiguous(), lam, None if eta == 0.0 else eta, steps,
                      threshold=threshold, tol=tol, tol_mode=tol_mode, allow_tf32=allow_tf32,
                      u0=None if u0 is None else u0.contiguous(), out={"steps": n_steps})
    finally:
        _retire(d)
    return res["u"], res["a"], res["steps"]


@lca_solve_raw.register_fake
def _(phi: Tensor, x: Tensor, u0: Optional[Tensor], lam: float, eta: float, steps: int,
      threshold: str, tol: float, check_unit_norm: bool, tol_mode: str = "absolute",
      allow_tf32: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    _check(phi, x, u0, threshold, tol_mode)
    batch, m = x.shape[0], phi.shape[1]
    u = x.new_empty((batch, m), dtype=torch.float32)
    a = x.new_empty((batch, m), dtype=torch.float32)
    return u, a, x.new_empty((batch,), dtype=torch.int32)


_not_differentiable(lca_solve_raw, "fep::lca_solve",
                    "the LCA codes have no gradient in fep-kernels; call it under "
                    "torch.no_grad() or on detached tensors (learn the dictionary with "
                    "LcaDictionary.learn)")


def lca_solve(phi: Tensor, x: Tensor, lam: float, eta: Optional[float] = None,
              steps: int = 100, threshold: str = "soft", tol: float = 0.0,
              u0: Optional[Tensor] = None, check_unit_norm: bool = True,
              tol_mode: str = "absolute", allow_tf32: bool = False
              ) -> Tuple[Tensor, Tensor, Tensor]:
    """Runs LCA on the rows of ``x`` against the dictionary ``phi`` (``fep::lca_solve``).

    ``phi``: [n, m] float32, float16 or bfloat16 with unit-norm columns; ``x``: [B, n] of one
    of those dtypes on phi's device (CPU or CUDA); ``u0``: None or a [B, m] float32 start.
    ``lam`` (> 0): the threshold; ``eta``: the step in (0, 1], or None (default) for
    1 / lambda_max(phi^T phi); ``steps``: the most steps T; ``threshold``: "soft",
    "soft_nonneg", "hard" or "hard_nonneg"; ``tol``: early stop per sample (0: exactly T steps),
    when max |du| < tol (``tol_mode="absolute"``) or < tol * max |phi^T x| of that sample
    (``"relative"``). ``allow_tf32``: permission to use TF32 tensor cores for float32 products;
    no LCA kernel uses them today, so results are accurate float32 either way.
    ``check_unit_norm``: reject a phi whose columns are not of unit norm.

    Returns ``(u, a, steps)``: u and a [B, m] float32 (the same values as
    ``LcaDictionary(phi).solve(x, ...)``), steps [B] int32 (steps run per sample). Not
    differentiable: backward raises a RuntimeError. TypeError / ValueError for a bad argument
    (not a tensor or number; dtype, device, shape) before the library is called.
    """
    _check(phi, x, u0, threshold, tol_mode)
    return torch.ops.fep.lca_solve(phi, x, u0, _number(lam, "lam"),
                                   0.0 if eta is None else _number(eta, "eta"),
                                   _steps(steps), threshold, _number(tol, "tol"),
                                   bool(check_unit_norm), tol_mode, bool(allow_tf32))
