"""Tensor plumbing the ops share: dtype codes, device and stream arguments, checks, and the
owner of a library handle.

Every tensor whose pointer goes to the library is checked by :func:`_check_tensor` on the call
that passes it (kind, layout, shape, dtype, device, contiguity, not empty): tensors an object
keeps between calls (a :class:`~fep_kernels.SettleNet`'s weights) are re-checked on every call
through :func:`_checked_ptr`, since ``t.data = ...`` or ``t.set_(...)`` may have replaced their
storage. :func:`_check_no_overlap` rejects outputs that share memory with each other or with an
input; :func:`_integer` and :func:`_number` are the one conversion of integer and real
parameters (bools rejected)."""

import ctypes
import numbers
import operator
from typing import Any, Iterable, Optional, Sequence, Tuple

from ._abi import (
    FEP_DEVICE_CUDA,
    FEP_DEVICE_HIP,
    FEP_DTYPE_BF16,
    FEP_DTYPE_F16,
    FEP_DTYPE_F32,
)
from ._lib import (
    _cpu_kind,
    version,
)


_torch_module: Any = None


def _torch() -> Any:
    """The torch module (imported on first use: the package loads without PyTorch)."""
    global _torch_module
    if _torch_module is None:
        import torch

        _torch_module = torch
    return _torch_module


def _dtype_code(t: Any, what: str) -> int:
    """The FEP_DTYPE_* code of a float32/float16/bfloat16 tensor; ValueError for another dtype."""
    torch = _torch()
    codes = {torch.float32: FEP_DTYPE_F32, torch.float16: FEP_DTYPE_F16, torch.bfloat16: FEP_DTYPE_BF16}
    try:
        return codes[t.dtype]
    except KeyError:
        raise ValueError(f"{what}: dtype {t.dtype} is not supported (float32, float16 or bfloat16)")


def _device_of(t: Any, what: str) -> Tuple[int, int, Optional[ctypes.c_void_p]]:
    """(kind, ordinal, raw stream) for the tensor's device."""
    return _device_args(t.device, what)


def _device_args(dev: Any, what: str) -> Tuple[int, int, Optional[ctypes.c_void_p]]:
    """(kind, ordinal, raw stream) for a torch.device: FEP_DEVICE_CPU, or CUDA (HIP under a ROCm
    build of PyTorch) with PyTorch's current stream of that device."""
    torch = _torch()
    if dev.type == "cpu":
        return _cpu_kind(), 0, None
    if dev.type == "cuda":
        kind = FEP_DEVICE_HIP if getattr(torch.version, "hip", None) else FEP_DEVICE_CUDA
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(torch.device("cuda", index)).cuda_stream
        return kind, int(index), (ctypes.c_void_p(stream) if stream else None)
    raise ValueError(f"{what}: tensors on device type {dev.type!r} are not supported (cpu or cuda)")


def _check_tensor(t: Any, what: str, shape: Sequence[Optional[int]], dtype: Any = None,
                  device: Any = None, owner: str = "the dictionary's device") -> None:
    """ValueError naming ``what`` unless ``t`` is a dense real tensor of ``shape`` (None: any
    size), ``dtype`` and ``device`` (when given), contiguous and not empty."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_complex():
        raise ValueError(f"{what}: dense real tensors only (layout {t.layout}, dtype {t.dtype})")
    # Run on every call for every tensor an object holds: plain loops and one read of each
    # attribute (a generator per check cost more than the rest of the check).
    got = t.shape
    ok = len(got) == len(shape)
    if ok:
        for d, s in zip(got, shape):
            if s is not None and d != s:
                ok = False
                break
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{what}: expected shape {want}, got {list(got)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{what}: expected dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{what}: on {t.device}, expected {device} ({owner})")
    if not t.is_contiguous():
        raise ValueError(f"{what}: must be contiguous (call .contiguous())")
    if t.numel() == 0:
        raise ValueError(f"{what}: is empty (shape {list(got)})")


def _checked_ptr(t: Any, what: str, shape: Sequence[Optional[int]], dtype: Any = None,
                 device: Any = None, owner: str = "the dictionary's device") -> ctypes.c_void_p:
    """The data pointer of ``t`` after :func:`_check_tensor` (ValueError naming ``what``): the
    one re-validation of a tensor an object holds, run on every call that passes it to the
    library (its storage, shape, dtype or device may have changed since the last call)."""
    _check_tensor(t, what, shape, dtype=dtype, device=device, owner=owner)
    return ctypes.c_void_p(t.data_ptr())


class ArgumentTypeError(TypeError, ValueError):
    """A parameter of the wrong kind (a bool, str or float where an int is needed, a bool or str
    where a number is): both a TypeError (the convention of the ``torch.library`` wrappers) and
    a ValueError (that of the classes), so either ``except`` clause catches it. Exported as
    ``fep_kernels.ArgumentTypeError``."""


def _is_bool(v: Any) -> bool:
    """Whether ``v`` is a Python, NumPy or PyTorch boolean (a 0-d bool tensor or array too)."""
    return isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool")


def _integer(v: Any, what: str, lo: int = 1, hi: int = 2**32 - 1) -> int:
    """``v`` as an int in ``[lo, hi]``: the one conversion of every integer parameter (steps,
    num_iter, window, an index). A bool, float, str or other non-integer raises
    :class:`ArgumentTypeError` (a TypeError and a ValueError); an int out of range ValueError."""
    if _is_bool(v):
        raise ArgumentTypeError(f"{what}: expected an int, got bool {v!r}")
    try:
        x = operator.index(v)
    except TypeError:
        raise ArgumentTypeError(f"{what}: expected an int, got {type(v).__name__} {v!r}") \
            from None
    if not lo <= x <= hi:
        upper = "2^32)" if hi == 2**32 - 1 else f"{hi}]"
        raise ValueError(f"{what}: expected an int in [{lo}, {upper}, got {x} (out of range)")
    return int(x)


def _number(v: Any, what: str, tensors: bool = True) -> float:
    """float(v) for a real number: the one conversion of every real parameter (range checks are
    the library's). ``tensors``: also a NumPy or 0-d PyTorch value that ``float()`` takes (the
    classes); without, only a Python or NumPy scalar (``numbers.Real``: the ``torch.library``
    wrappers, whose schemas take a float). A bool (Python, NumPy or a bool tensor), str or any
    other non-number raises :class:`ArgumentTypeError`."""
    want = "a number" if tensors else "a Python number"
    if _is_bool(v) or isinstance(v, (str, bytes)) or not (tensors or isinstance(v, numbers.Real)):
        raise ArgumentTypeError(f"{what}: expected {want}, got {type(v).__name__} {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ArgumentTypeError(f"{what}: expected {want}, got {type(v).__name__} {v!r}") \
            from None


def _span(t: Any) -> Tuple[int, int]:
    """The bytes [lo, hi) that a strided tensor's elements occupy (hi == lo when empty)."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    lo = hi = t.data_ptr()
    for size, stride in zip(t.shape, t.stride()):
        reach = (size - 1) * stride * t.element_size()
        if reach < 0:
            lo += reach
        else:
            hi += reach
    return lo, hi + t.element_size()


def _check_no_overlap(outputs: Iterable[Tuple[str, Any]], inputs: Iterable[Tuple[str, Any]] = (),
                      same_ok: Iterable[Tuple[str, str]] = ()) -> None:
    """ValueError naming both when an output's memory overlaps another output's or an input's
    (``(name, tensor)`` pairs; None tensors skipped). ``same_ok``: (output, input) name pairs
    that may be exactly the same memory (an update in place), though not overlap otherwise."""
    outs = [(n, t) for n, t in outputs if t is not None]
    ins = [(n, t) for n, t in inputs if t is not None]
    same_ok = set(same_ok)
    for i, (name, t) in enumerate(outs):
        a0, a1 = _span(t)
        for other, u in outs[:i] + ins:
            if u.device != t.device:
                continue
            b0, b1 = _span(u)
            if not (a0 < a1 and b0 < b1 and a0 < b1 and b0 < a1):
                continue
            if (name, other) in same_ok and (a0, a1) == (b0, b1) and t.shape == u.shape \
                    and t.stride() == u.stride():
                continue
            raise ValueError(f"{name}: overlaps {other} in memory (outputs must not share "
                             "memory with each other or with the inputs)")


def _check_indices(t: Any, what: str, limits: Sequence[int], unit: str) -> None:
    """ValueError unless every integer of ``t`` (a tensor or NumPy array whose last axis runs
    over entries with ``limits[j]`` values each) is in ``0 <= x < limits[j]`` (and so fits an
    int32): checked before the indices are narrowed to int32. The message names ``what``, the
    multi-index and the value of the first bad element, and ``unit`` (e.g. "modality {j} has {n}
    outcomes")."""
    hi = [min(int(n), 2**31 - 1) for n in limits]
    if hasattr(t, "numel"):  # a torch.Tensor
        torch = _torch()
        if t.numel() == 0:
            return
        x = t.to(torch.int64)
        bad = (x < 0) | (x >= torch.tensor(hi, dtype=torch.int64, device=t.device))
        if not bool(bad.any()):
            return
        idx = [int(i) for i in torch.nonzero(bad)[0]]
    else:  # a NumPy array
        import numpy as np

        if t.size == 0:
            return
        bad = (t < 0) | (t >= np.asarray(hi, dtype=np.int64))
        if not bad.any():
            return
        idx = [int(i) for i in np.argwhere(bad)[0]]
    value = int(t[tuple(idx)])
    j = idx[-1]
    raise ValueError(f"{what}[{', '.join(map(str, idx))}] is {value}: expected 0 <= {what} < "
                     f"{limits[j]} ({unit.format(j=j, n=limits[j])})")


def _ptr(t: Any) -> Optional[ctypes.c_void_p]:
    """The data pointer of a tensor, or None (a NULL pointer) for None."""
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _norm_device(dev: Any) -> Any:
    """``dev`` with the current CUDA device's index filled in for a bare "cuda"."""
    torch = _torch()
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


class _Owned:
    """An object owning a library handle (``self._handle``, a ``ctypes.c_void_p``), freed by
    ``self._lib.<_free>`` on :meth:`close`, at the end of a ``with`` block, or when garbage
    collected."""

    _free = None  # the name of the fep_*_free function
    _handle = None

    def close(self) -> None:
        """Frees the handle (idempotent). Work already enqueued must not still use it."""
        handle, self._handle = self._handle, None
        if handle is not None and handle.value:
            getattr(self._lib, self._free)(handle)

    def __enter__(self) -> "_Owned":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.close()
        return False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing sensible left to do
            pass

    def _h(self) -> ctypes.c_void_p:
        if self._handle is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._handle
