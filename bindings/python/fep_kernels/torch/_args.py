"""Argument checks the ``torch.library`` ops share (torch_ops, torch_settle, torch_lca): TypeError
for a value of the wrong kind (not a tensor, not a number, not an int), ValueError for a tensor of
the wrong dtype, device, rank or shape, before the library is called. They need no data, so the
fake implementations run them too (errors surface while ``torch.compile`` traces)."""

from typing import Any, Optional, Sequence

import torch
from torch import Tensor

from .._tensors import _integer
from .._tensors import _number as _number_arg

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _tensor(t: Any, what: str, dim: Optional[int] = None,
            dtypes: Optional[Sequence[torch.dtype]] = None,
            device: Optional[torch.device] = None, owner: Optional[str] = None,
            optional: bool = False) -> None:
    """Checks kind, rank, dtype and device of ``t`` (None passes when ``optional``)."""
    if t is None and optional:
        return
    if not isinstance(t, Tensor):
        none = " or None" if optional else ""
        raise TypeError(f"{what}: expected a torch.Tensor{none}, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{what}: expected a {dim}-d tensor, got shape {list(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{what}: dtype {t.dtype} is not supported ({names})")
    if device is not None and t.device != device:
        raise ValueError(f"{what}: on {t.device}, expected {device} ({owner}'s device)")
    if t.device.type not in ("cpu", "cuda", "meta"):  # meta: shapes only (the fake impls)
        raise ValueError(f"{what}: tensors on device type {t.device.type!r} are not supported "
                         "(cpu or cuda)")


def _shape(t: Tensor, what: str, shape: Sequence[int]) -> None:
    """ValueError naming ``what`` unless ``t`` has exactly ``shape``."""
    if list(t.shape) != list(shape):
        raise ValueError(f"{what}: expected shape {list(shape)}, got {list(t.shape)}")


def _number(x: Any, what: str) -> float:
    """float(x) for a real Python/NumPy number (:func:`fep_kernels._tensors._number` without
    tensors); :class:`~fep_kernels.ArgumentTypeError` (a TypeError) for anything else (bool,
    str, tensor)."""
    return _number_arg(x, what, tensors=False)


def _steps(x: Any, what: str = "steps") -> int:
    """An int in [1, 2^32) (:func:`fep_kernels._tensors._integer`): ArgumentTypeError (a
    TypeError) for a non-int or a bool, ValueError out of range."""
    return _integer(x, what)


def _not_differentiable(op: Any, name: str, hint: str) -> None:
    """Registers an autograd formula for ``op`` whose backward raises a RuntimeError naming the
    op (the outputs of an op without one would fail with a less helpful message)."""

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise RuntimeError(f"{name} is not differentiable: {hint}")

    op.register_autograd(backward, setup_context=setup_context)
