"""Tensor plumbing the ops share: dtype codes, device and stream arguments, checks, and the
owner of a library handle."""

import ctypes

from ._abi import (
    FEP_DEVICE_CPU,
    FEP_DEVICE_CUDA,
    FEP_DEVICE_HIP,
    FEP_DTYPE_BF16,
    FEP_DTYPE_F16,
    FEP_DTYPE_F32,
)
from ._lib import (
    version,
)


def _torch():
    import torch  # imported lazily: the module loads without PyTorch

    return torch


def _dtype_code(t, what):
    torch = _torch()
    codes = {torch.float32: FEP_DTYPE_F32, torch.float16: FEP_DTYPE_F16, torch.bfloat16: FEP_DTYPE_BF16}
    try:
        return codes[t.dtype]
    except KeyError:
        raise ValueError(f"{what}: dtype {t.dtype} is not supported (float32, float16 or bfloat16)")


def _device_of(t, what):
    """(kind, ordinal, raw stream) for the tensor's device."""
    return _device_args(t.device, what)


def _device_args(dev, what):
    """(kind, ordinal, raw stream) for a torch.device: FEP_DEVICE_CPU, or CUDA (HIP under a ROCm
    build of PyTorch) with PyTorch's current stream of that device."""
    torch = _torch()
    if dev.type == "cpu":
        return FEP_DEVICE_CPU, 0, None
    if dev.type == "cuda":
        kind = FEP_DEVICE_HIP if getattr(torch.version, "hip", None) else FEP_DEVICE_CUDA
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        stream = torch.cuda.current_stream(torch.device("cuda", index)).cuda_stream
        return kind, int(index), (ctypes.c_void_p(stream) if stream else None)
    raise ValueError(f"{what}: tensors on device type {dev.type!r} are not supported (cpu or cuda)")


def _check_tensor(t, what, shape, dtype=None, device=None, owner="the dictionary's device"):
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_complex():
        raise ValueError(f"{what}: dense real tensors only (layout {t.layout}, dtype {t.dtype})")
    if t.dim() != len(shape) or any(s is not None and d != s for d, s in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{what}: expected shape {want}, got {list(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{what}: expected dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{what}: on {t.device}, expected {device} ({owner})")
    if not t.is_contiguous():
        raise ValueError(f"{what}: must be contiguous (call .contiguous())")


def _number(v, what):
    """float(v) for a real number (Python, NumPy or 0-d tensor); range checks are the library's."""
    if isinstance(v, (bool, str, bytes)):
        raise ValueError(f"{what}: expected a number, got {v!r}")
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a number, got {v!r}") from None


def _ptr(t):
    return ctypes.c_void_p(t.data_ptr()) if t is not None else None


def _norm_device(dev):
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

    def close(self):
        """Frees the handle (idempotent). Work already enqueued must not still use it."""
        handle, self._handle = self._handle, None
        if handle is not None and handle.value:
            getattr(self._lib, self._free)(handle)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing sensible left to do
            pass

    def _h(self):
        if self._handle is None:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._handle
