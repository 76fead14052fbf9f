"""ctypes bindings for the fep-kernels C ABI (include/fep_kernels.h), on PyTorch tensors.

The shared library is found, in order, at the path given to :func:`load`, at ``$FEP_KERNELS_LIB``,
or at ``target/release/libfep_kernels.so`` (``.dylib`` on macOS) in the repository this file
belongs to (build it with ``cargo build --release``, adding the ``cuda`` or ``hip`` feature for a
GPU). :func:`load` is called implicitly by the first function that needs the library.

Tensors are passed by pointer (``tensor.data_ptr()``), so they must be contiguous and live on
the device the call names. CPU tensors use ``FEP_DEVICE_CPU``; CUDA tensors use
``FEP_DEVICE_CUDA`` (``FEP_DEVICE_HIP`` under a ROCm build of PyTorch) with the tensor's device
index as the ordinal and PyTorch's *current stream* of that device as the raw stream: work is
enqueued on it and the call returns without synchronising, exactly like a PyTorch op, so results
may be used by later PyTorch work on the same stream without any extra synchronisation. Outputs
are allocated with ``torch.empty`` on the inputs' device (for CUDA, from PyTorch's caching
allocator, which orders reuse on the current stream).

Every failing call raises :class:`FepError` with the status and ``fep_last_error()``; inputs that
are not contiguous or have the wrong dtype, device or shape raise :class:`ValueError` before the
library is called.

Example (runnable once the library is built; ``device = "cuda"`` needs the ``cuda`` feature)::

    import torch
    import fep_kernels as fk

    print(fk.version(), fk.device_count("cpu"), fk.device_count("cuda"))
    device = "cuda" if fk.device_count("cuda") > 0 and torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(64, 256, generator=g)
    phi /= phi.norm(dim=0, keepdim=True)                       # unit-norm columns
    x = torch.randn(8, 64, generator=g)
    with fk.LcaDictionary(phi.to(device)) as d:
        out = d.solve(x.to(device), lam=0.1, eta=0.1, steps=200, threshold="soft", trace=True)
        print(out["a"].shape, (out["a"] != 0).float().mean().item())
        print(out["energy"][:, -1], out["active"][:, -1], out["steps"])
        d.learn(x.to(device), out["a"], lr=0.01)                # one dictionary-learning step
        print((d.phi().norm(dim=0) - 1).abs().max().item())     # columns stay unit-norm

Predictive-coding settling (DESIGN.md 4.2) of a 784-128-10 network, on the same device::

    w1 = (0.05 * torch.randn(128, 784, generator=g)).to(device)
    w2 = (0.1 * torch.randn(10, 128, generator=g)).to(device)
    x0 = torch.randn(32, 784, generator=g).to(device)
    y = torch.nn.functional.one_hot(torch.arange(32) % 10, 10).float().to(device)
    net = fk.SettleNet([w1, w2], activations=["identity", "tanh"], precisions=1.0)
    res = net.infer(x0, eta=0.1, steps=20)                       # x_L free: a prediction
    print(res["x"][-1].argmax(1), res["energy"])
    res = net.learn(x0, y, eta=0.1, steps=20, trace=True, lr=0.01)  # x_L clamped, SGD applied
    print(res["trace"][:, 0], res["trace"][:, -1], res["grad_w"][1].norm())
"""

import ctypes
import operator
import os
import sys

__all__ = [
    "FepError",
    "LcaDictionary",
    "SettleNet",
    "settle_infer",
    "settle_learn",
    "VmpModel",
    "construct_policies",
    "load",
    "version",
    "abi_version",
    "last_error",
    "device_count",
    "device_name",
    "FEP_ABI_VERSION",
    "FEP_OK",
    "FEP_ERR_INVALID_ARGUMENT",
    "FEP_ERR_NO_DEVICE",
    "FEP_ERR_DRIVER",
    "FEP_ERR_OUT_OF_MEMORY",
    "FEP_ERR_UNSUPPORTED",
    "FEP_ERR_INTERNAL",
    "FEP_DEVICE_CPU",
    "FEP_DEVICE_CUDA",
    "FEP_DEVICE_HIP",
    "FEP_DTYPE_F32",
    "FEP_DTYPE_F16",
    "FEP_DTYPE_BF16",
    "FEP_LCA_SOFT",
    "FEP_LCA_SOFT_NONNEG",
    "FEP_LCA_HARD",
    "FEP_LCA_HARD_NONNEG",
    "FEP_ACT_IDENTITY",
    "FEP_ACT_TANH",
    "FEP_ACT_RELU",
    "FEP_ACT_LEAKY_RELU",
    "FEP_ACT_SIGMOID",
    "FEP_ACT_GELU",
    "FEP_SETTLE_INIT_FEEDFORWARD",
    "FEP_SETTLE_INIT_GIVEN",
    "FEP_VMP_OBS_INDEX",
    "FEP_VMP_OBS_DIST",
    "FEP_VMP_METHOD_VMP",
    "FEP_VMP_METHOD_MMP",
    "FEP_VMP_COUNTS_A",
    "FEP_VMP_COUNTS_B",
    "FEP_VMP_COUNTS_D",
]

# ---- constants of include/fep_kernels.h ----
FEP_ABI_VERSION = 1

FEP_OK = 0
FEP_ERR_INVALID_ARGUMENT = 1
FEP_ERR_NO_DEVICE = 2
FEP_ERR_DRIVER = 3
FEP_ERR_OUT_OF_MEMORY = 4
FEP_ERR_UNSUPPORTED = 5
FEP_ERR_INTERNAL = 6

FEP_DEVICE_CPU = 0
FEP_DEVICE_CUDA = 1
FEP_DEVICE_HIP = 2

FEP_DTYPE_F32 = 0
FEP_DTYPE_F16 = 1
FEP_DTYPE_BF16 = 2

FEP_LCA_SOFT = 0
FEP_LCA_SOFT_NONNEG = 1
FEP_LCA_HARD = 2
FEP_LCA_HARD_NONNEG = 3

FEP_ACT_IDENTITY = 0
FEP_ACT_TANH = 1
FEP_ACT_RELU = 2
FEP_ACT_LEAKY_RELU = 3
FEP_ACT_SIGMOID = 4
FEP_ACT_GELU = 5

FEP_SETTLE_INIT_FEEDFORWARD = 0
FEP_SETTLE_INIT_GIVEN = 1

FEP_VMP_OBS_INDEX = 0
FEP_VMP_OBS_DIST = 1

FEP_VMP_METHOD_VMP = 0
FEP_VMP_METHOD_MMP = 1

FEP_VMP_COUNTS_A = 0
FEP_VMP_COUNTS_B = 1
FEP_VMP_COUNTS_D = 2

_STATUS_NAMES = {
    FEP_OK: "FEP_OK",
    FEP_ERR_INVALID_ARGUMENT: "FEP_ERR_INVALID_ARGUMENT",
    FEP_ERR_NO_DEVICE: "FEP_ERR_NO_DEVICE",
    FEP_ERR_DRIVER: "FEP_ERR_DRIVER",
    FEP_ERR_OUT_OF_MEMORY: "FEP_ERR_OUT_OF_MEMORY",
    FEP_ERR_UNSUPPORTED: "FEP_ERR_UNSUPPORTED",
    FEP_ERR_INTERNAL: "FEP_ERR_INTERNAL",
}

_DEVICE_KINDS = {"cpu": FEP_DEVICE_CPU, "cuda": FEP_DEVICE_CUDA, "hip": FEP_DEVICE_HIP}

_THRESHOLDS = {
    "soft": FEP_LCA_SOFT,
    "soft_nonneg": FEP_LCA_SOFT_NONNEG,
    "hard": FEP_LCA_HARD,
    "hard_nonneg": FEP_LCA_HARD_NONNEG,
}

_ACTIVATIONS = {
    "identity": FEP_ACT_IDENTITY,
    "tanh": FEP_ACT_TANH,
    "relu": FEP_ACT_RELU,
    "leaky_relu": FEP_ACT_LEAKY_RELU,
    "sigmoid": FEP_ACT_SIGMOID,
    "gelu": FEP_ACT_GELU,
}
# The slope of a bare "leaky_relu" (the C ABI's default for a NULL leaky_alpha, and PyTorch's).
_LEAKY_DEFAULT = 0.01

_U32_MAX = 2**32 - 1
_U64_MAX = 2**64 - 1


class FepError(RuntimeError):
    """A call into the library returned a nonzero status.

    Attributes: ``status`` (the FEP_ERR_* code), ``name`` (its symbolic name) and ``message``
    (``fep_last_error()`` right after the failing call).
    """

    def __init__(self, status, message):
        self.status = int(status)
        self.name = _STATUS_NAMES.get(self.status, f"unknown status {self.status}")
        self.message = message
        super().__init__(f"{self.name} ({self.status}): {message}")


class _FepLcaParams(ctypes.Structure):
    """struct FepLcaParams of the header."""

    _fields_ = [
        ("threshold", ctypes.c_int32),
        ("lambda_", ctypes.c_float),
        ("eta", ctypes.c_float),
        ("steps", ctypes.c_uint32),
        ("tol", ctypes.c_float),
    ]


class _FepSettleNet(ctypes.Structure):
    """struct FepSettleNet of the header."""

    _fields_ = [
        ("layers", ctypes.c_uint32),
        ("widths", ctypes.POINTER(ctypes.c_uint64)),
        ("activations", ctypes.POINTER(ctypes.c_int32)),
        ("leaky_alpha", ctypes.POINTER(ctypes.c_float)),
        ("dtype", ctypes.c_int32),
        ("weights", ctypes.POINTER(ctypes.c_void_p)),
        ("biases", ctypes.POINTER(ctypes.c_void_p)),
        ("precision", ctypes.POINTER(ctypes.c_float)),
        ("precision_diag", ctypes.POINTER(ctypes.c_void_p)),
    ]


class _FepSettleParams(ctypes.Structure):
    """struct FepSettleParams of the header."""

    _fields_ = [
        ("eta", ctypes.c_float),
        ("momentum", ctypes.c_float),
        ("steps", ctypes.c_uint32),
        ("tol", ctypes.c_float),
        ("init", ctypes.c_int32),
        ("skip_input_checks", ctypes.c_int32),
    ]


_P_U64 = ctypes.POINTER(ctypes.c_uint64)
_P_F64 = ctypes.POINTER(ctypes.c_double)
_P_P_F64 = ctypes.POINTER(_P_F64)


class _FepVmpModelDesc(ctypes.Structure):
    """struct FepVmpModelDesc of the header."""

    _fields_ = [
        ("num_factors", ctypes.c_uint64),
        ("num_modalities", ctypes.c_uint64),
        ("num_states", _P_U64),
        ("num_controls", _P_U64),
        ("num_obs", _P_U64),
        ("a_num_deps", _P_U64),
        ("a_deps", _P_U64),
        ("a", _P_P_F64),
        ("b", _P_P_F64),
        ("c", _P_P_F64),
        ("d", _P_P_F64),
        ("policies", ctypes.POINTER(ctypes.c_int32)),
        ("num_policies", ctypes.c_uint64),
        ("policy_len", ctypes.c_uint64),
        ("e", _P_F64),
        ("pa", _P_P_F64),
        ("pb", _P_P_F64),
        ("pd", _P_P_F64),
    ]


class _FepVmpFpiParams(ctypes.Structure):
    """struct FepVmpFpiParams of the header."""

    _fields_ = [
        ("num_iter", ctypes.c_uint32),
        ("tol", ctypes.c_float),
        ("skip_input_checks", ctypes.c_int32),
    ]


class _FepVmpSequenceParams(ctypes.Structure):
    """struct FepVmpSequenceParams of the header."""

    _fields_ = [
        ("method", ctypes.c_int32),
        ("num_iter", ctypes.c_uint32),
        ("tau", ctypes.c_float),
        ("skip_input_checks", ctypes.c_int32),
    ]


class _FepVmpPolicyParams(ctypes.Structure):
    """struct FepVmpPolicyParams of the header."""

    _fields_ = [
        ("gamma", ctypes.c_float),
        ("utility", ctypes.c_int32),
        ("state_info_gain", ctypes.c_int32),
        ("param_info_gain", ctypes.c_int32),
        ("skip_input_checks", ctypes.c_int32),
    ]


class _FepVmpLearnParams(ctypes.Structure):
    """struct FepVmpLearnParams of the header."""

    _fields_ = [
        ("lr_a", ctypes.c_float),
        ("lr_b", ctypes.c_float),
        ("lr_d", ctypes.c_float),
        ("skip_input_checks", ctypes.c_int32),
    ]


# ---- loading ----

_lib = None
_lib_path = None


def _default_lib_path():
    env = os.environ.get("FEP_KERNELS_LIB")
    if env:
        return env
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    name = "libfep_kernels.dylib" if sys.platform == "darwin" else "libfep_kernels.so"
    return os.path.join(root, "target", "release", name)


def _declare(lib):
    i32, u64, vp, cp = ctypes.c_int32, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_char_p
    p_u64 = ctypes.POINTER(ctypes.c_uint64)
    p_vp = ctypes.POINTER(vp)
    sigs = {
        "fep_version": (cp, []),
        "fep_abi_version": (i32, []),
        "fep_last_error": (cp, []),
        "fep_device_count": (i32, [i32]),
        "fep_device_name": (i32, [i32, i32, cp, u64]),
        # FepLcaDict* handles and every tensor pointer are passed as void*
        "fep_lca_dict_new": (i32, [i32, i32, vp, i32, vp, u64, u64, i32, ctypes.POINTER(vp)]),
        "fep_lca_dict_free": (None, [vp]),
        "fep_lca_dict_shape": (i32, [vp, p_u64, p_u64]),
        "fep_lca_dict_phi": (i32, [vp, vp, vp]),
        "fep_lca_solve": (
            i32,
            [vp, vp, i32, vp, u64, ctypes.POINTER(_FepLcaParams), vp, vp, vp, vp, vp, vp],
        ),
        "fep_lca_dict_learn": (i32, [vp, vp, i32, vp, vp, u64, ctypes.c_float]),
        # float *const *x_out etc. are arrays of void* (tensor pointers)
        "fep_settle_infer": (
            i32,
            [i32, i32, vp, ctypes.POINTER(_FepSettleNet), ctypes.POINTER(_FepSettleParams), u64,
             vp, p_vp, p_vp, vp, vp, vp],
        ),
        "fep_settle_learn": (
            i32,
            [i32, i32, vp, ctypes.POINTER(_FepSettleNet), ctypes.POINTER(_FepSettleParams), u64,
             vp, vp, p_vp, p_vp, vp, vp, vp, p_vp, p_vp, ctypes.c_float],
        ),
        # FepVmpModel* handles are void*; tensor pointers too (device memory on a GPU)
        "fep_vmp_model_new": (i32, [i32, i32, ctypes.POINTER(_FepVmpModelDesc),
                                    ctypes.POINTER(vp)]),
        "fep_vmp_model_free": (None, [vp]),
        "fep_vmp_model_info": (i32, [vp, p_u64, p_u64, p_u64, p_u64, p_u64, p_u64]),
        "fep_vmp_model_counts": (i32, [vp, vp, i32, u64, _P_F64, u64]),
        "fep_vmp_infer_states": (
            i32, [vp, vp, ctypes.POINTER(_FepVmpFpiParams), i32, vp, u64, vp, vp, vp, vp, vp],
        ),
        "fep_vmp_infer_sequence": (
            i32, [vp, vp, ctypes.POINTER(_FepVmpSequenceParams), u64, i32, vp, u64, vp, vp, vp,
                  vp, vp],
        ),
        "fep_vmp_infer_policies": (
            i32, [vp, vp, ctypes.POINTER(_FepVmpPolicyParams), vp, u64, vp, vp],
        ),
        "fep_vmp_learn": (
            i32, [vp, vp, ctypes.POINTER(_FepVmpLearnParams), u64, i32, vp, u64, vp, vp],
        ),
    }
    for name, (restype, argtypes) in sigs.items():
        f = getattr(lib, name)
        f.restype = restype
        f.argtypes = argtypes


def load(path=None):
    """Loads the library (once per process) and returns the ``ctypes.CDLL``.

    ``path``: explicit path; default ``$FEP_KERNELS_LIB``, else
    ``<repo>/target/release/libfep_kernels.so``. Raises ``OSError`` when the file cannot be
    loaded, ``RuntimeError`` when its ABI version is not ``FEP_ABI_VERSION`` and ``ValueError``
    when a different library was already loaded.
    """
    global _lib, _lib_path
    path = os.path.abspath(path if path is not None else _default_lib_path())
    if _lib is not None:
        if path != _lib_path:
            raise ValueError(f"fep_kernels: {_lib_path} is already loaded; cannot load {path}")
        return _lib
    if not os.path.exists(path):
        raise OSError(
            f"fep_kernels: shared library not found at {path} (build it with "
            "`cargo build --release`, or set FEP_KERNELS_LIB / pass load(path))"
        )
    lib = ctypes.CDLL(path)
    _declare(lib)
    abi = lib.fep_abi_version()
    if abi != FEP_ABI_VERSION:
        raise RuntimeError(
            f"fep_kernels: {path} implements ABI {abi}, these bindings ABI {FEP_ABI_VERSION}"
        )
    _lib, _lib_path = lib, path
    return lib


def _get():
    return _lib if _lib is not None else load()


def _check(status):
    if status != FEP_OK:
        raise FepError(status, last_error())


# ---- library and device queries ----


def version():
    """The library version string, e.g. ``"0.1.0"``."""
    return _get().fep_version().decode()


def abi_version():
    """The ABI version the loaded library implements."""
    return int(_get().fep_abi_version())


def last_error():
    """``fep_last_error()``: the message of the last failed call on this thread ("" if none)."""
    msg = _get().fep_last_error()
    return msg.decode(errors="replace") if msg else ""


def _kind(kind):
    if isinstance(kind, str):
        try:
            return _DEVICE_KINDS[kind.lower()]
        except KeyError:
            raise ValueError(f"unknown device kind {kind!r}; expected one of {list(_DEVICE_KINDS)}")
    return int(kind)


def device_count(kind):
    """Number of devices of ``kind`` ("cpu" | "cuda" | "hip" or FEP_DEVICE_*).

    A build without that vendor's feature, or a machine without its driver, has 0.
    """
    n = _get().fep_device_count(_kind(kind))
    if n < 0:
        raise FepError(-n, last_error())
    return int(n)


def device_name(kind, ordinal=0):
    """The name of device ``ordinal`` of ``kind``."""
    buf = ctypes.create_string_buffer(256)
    _check(_get().fep_device_name(_kind(kind), int(ordinal), buf, len(buf)))
    return buf.value.decode(errors="replace")


# ---- tensor plumbing ----


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


# ---- LCA ----


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


class LcaDictionary(_Owned):
    """A prepared LCA dictionary (``FepLcaDict``): Phi [n, m] and G = Phi^T Phi - I in f32.

    ``phi``: a contiguous tensor [n, m] (float32, float16 or bfloat16; unit-norm columns) on the
    CPU or a CUDA device; it is copied, so it may be freed or changed afterwards.
    ``check_unit_norm``: reject columns whose norm differs from 1 by more than the dtype allows.

    Free it with :meth:`close`, a ``with`` block, or let it be garbage collected.
    """

    _free = "fep_lca_dict_free"

    def __init__(self, phi, check_unit_norm=True):
        self._handle = None
        lib = _get()
        _check_tensor(phi, "phi", (None, None))
        dtype = _dtype_code(phi, "phi")
        kind, ordinal, stream = _device_of(phi, "phi")
        n, m = (int(s) for s in phi.shape)
        handle = ctypes.c_void_p()
        _check(
            lib.fep_lca_dict_new(
                kind, ordinal, stream, dtype, _ptr(phi), n, m, 1 if check_unit_norm else 0,
                ctypes.byref(handle),
            )
        )
        if not handle.value:
            raise FepError(FEP_ERR_INTERNAL, "fep_lca_dict_new returned FEP_OK but no dictionary")
        self._lib = lib
        self._handle = handle
        self.device = _norm_device(phi.device)
        self.kind = kind
        self.ordinal = ordinal
        self.n = n
        self.m = m

    def __repr__(self):
        state = "closed" if self._handle is None else f"n={self.n}, m={self.m}"
        return f"LcaDictionary({state}, device={self.device})"

    # -- queries --

    @property
    def shape(self):
        """(n, m) as reported by the library."""
        n, m = ctypes.c_uint64(), ctypes.c_uint64()
        _check(self._lib.fep_lca_dict_shape(self._h(), ctypes.byref(n), ctypes.byref(m)))
        return int(n.value), int(m.value)

    def _stream(self):
        """The raw stream for work on this dictionary's device: PyTorch's current stream of
        that device (None, i.e. NULL, on the CPU)."""
        if self.device.type == "cpu":
            return None
        s = _torch().cuda.current_stream(self.device).cuda_stream
        return ctypes.c_void_p(s) if s else None

    def phi(self):
        """A new float32 tensor [n, m] holding the dictionary's Phi (on its device)."""
        torch = _torch()
        h = self._h()
        out = torch.empty((self.n, self.m), dtype=torch.float32, device=self.device)
        _check(self._lib.fep_lca_dict_phi(h, self._stream(), _ptr(out)))
        return out

    # -- ops --

    def solve(self, x, lam, eta, steps, threshold="soft", tol=0.0, u0=None, trace=False,
              out=None):
        """Runs LCA (DESIGN.md 4.3) on the rows of ``x``.

        ``x``: [B, n] float32/float16/bfloat16 on the dictionary's device, contiguous.
        ``lam`` (> 0), ``eta`` (in (0, 1]), ``steps`` (T >= 1), ``threshold``: "soft",
        "soft_nonneg", "hard" or "hard_nonneg"; ``tol``: early stop when a sample's
        max |du| < tol (0 disables: exactly T steps). ``u0``: optional [B, m] float32 start.

        Returns a dict of new contiguous tensors on the dictionary's device: "u" and "a"
        [B, m] float32, and with ``trace=True`` also "energy" [B, T] float32
        (0.5 ||x - Phi a||^2 + lam ||a||_1 after each step), "active" [B, T] int32 (the
        library's uint32 counts) and "steps" [B] int32 (steps run per sample). A sample that
        stopped early repeats its last energy/active values.

        ``out``: optional dict of preallocated output tensors with the same keys, shapes and
        dtypes (e.g. for timing loops); those given are written instead of new ones.
        """
        torch = _torch()
        h = self._h()
        _check_tensor(x, "x", (None, self.n), device=self.device)
        dtype = _dtype_code(x, "x")
        batch = int(x.shape[0])
        if threshold not in _THRESHOLDS:
            raise ValueError(f"threshold: {threshold!r} is not one of {list(_THRESHOLDS)}")
        try:
            steps = operator.index(steps)
        except TypeError:
            raise ValueError(f"steps: expected an int, got {steps!r}") from None
        if isinstance(steps, bool) or not 1 <= steps <= _U32_MAX:
            raise ValueError(f"steps: expected an int in [1, 2^32), got {steps!r}")
        lam, eta, tol = (_number(v, name) for v, name in ((lam, "lam"), (eta, "eta"), (tol, "tol")))
        if u0 is not None:
            _check_tensor(u0, "u0", (batch, self.m), dtype=torch.float32, device=self.device)

        out = dict(out or {})
        unknown = set(out) - {"u", "a", "energy", "active", "steps"}
        if unknown:
            raise ValueError(f"out: unknown keys {sorted(unknown)}")
        specs = {"u": ((batch, self.m), torch.float32), "a": ((batch, self.m), torch.float32)}
        if trace:
            specs["energy"] = ((batch, steps), torch.float32)
            specs["active"] = ((batch, steps), torch.int32)
            specs["steps"] = ((batch,), torch.int32)
        elif set(out) - set(specs):
            raise ValueError("out: 'energy', 'active' and 'steps' need trace=True")
        res = {}
        for key, (shape, dt) in specs.items():
            if key in out:
                _check_tensor(out[key], f"out[{key!r}]", shape, dtype=dt, device=self.device)
                res[key] = out[key]
            else:
                res[key] = torch.empty(shape, dtype=dt, device=self.device)

        params = _FepLcaParams(_THRESHOLDS[threshold], lam, eta, steps, tol)
        _check(
            self._lib.fep_lca_solve(
                h, self._stream(), dtype, _ptr(x), batch, ctypes.byref(params), _ptr(u0),
                _ptr(res["u"]), _ptr(res["a"]), _ptr(res.get("energy")),
                _ptr(res.get("active")), _ptr(res.get("steps")),
            )
        )
        return res

    def learn(self, x, a, lr):
        """One dictionary-learning step, in place:
        Phi += (lr / B) sum_b (x_b - Phi a_b) a_b^T, columns renormalised, G recomputed.

        ``x``: [B, n] float32/float16/bfloat16; ``a``: [B, m] float32 (e.g. ``solve(...)["a"]``);
        both contiguous on the dictionary's device.
        """
        torch = _torch()
        h = self._h()
        _check_tensor(x, "x", (None, self.n), device=self.device)
        dtype = _dtype_code(x, "x")
        batch = int(x.shape[0])
        _check_tensor(a, "a", (batch, self.m), dtype=torch.float32, device=self.device)
        lr = _number(lr, "lr")
        _check(self._lib.fep_lca_dict_learn(h, self._stream(), dtype, _ptr(x), _ptr(a), batch, lr))



# ---- predictive-coding settling ----


def _activation(a, what):
    """(FEP_ACT_* code, leaky slope) from "tanh", "leaky_relu" or ("leaky_relu", alpha)."""
    if isinstance(a, str):
        name, alpha = a, None
    elif isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str):
        name, alpha = a
        if name != "leaky_relu":
            raise ValueError(f"{what}: only 'leaky_relu' takes a parameter, got {a!r}")
        alpha = _number(alpha, f"{what} (leaky_relu slope)")
    else:
        raise ValueError(
            f"{what}: expected one of {list(_ACTIVATIONS)} or ('leaky_relu', alpha), got {a!r}"
        )
    if name not in _ACTIVATIONS:
        raise ValueError(f"{what}: {name!r} is not one of {list(_ACTIVATIONS)}")
    if name == "leaky_relu" and alpha is None:
        alpha = _LEAKY_DEFAULT
    return _ACTIVATIONS[name], (alpha if alpha is not None else 0.0)


def _one_activation(a):
    """Whether ``a`` names one activation (to use for every layer) rather than a list of them."""
    return isinstance(a, str) or (
        isinstance(a, tuple) and len(a) == 2 and a[0] == "leaky_relu"
        and not isinstance(a[1], (str, tuple, list))
    )


def _steps_arg(steps, what="steps"):
    try:
        steps = operator.index(steps)
    except TypeError:
        raise ValueError(f"{what}: expected an int, got {steps!r}") from None
    if isinstance(steps, bool) or not 1 <= steps <= _U32_MAX:
        raise ValueError(f"{what}: expected an int in [1, 2^32), got {steps!r}")
    return steps


def _void_array(ptrs):
    return (ctypes.c_void_p * len(ptrs))(*ptrs)


class SettleNet:
    """A predictive-coding network (``FepSettleNet``, DESIGN.md 4.2) over the caller's tensors.

    Layers x_0 ... x_L of widths n_0 ... n_L; layer l = 1 ... L predicts
    ``mu_l = W_l f_l(x_{l-1}) + b_l`` (the activation applies to the layer BELOW), with error
    ``eps_l = x_l - mu_l`` and energy ``E = 1/2 sum_l eps_l^T Pi_l eps_l`` per sample.

    ``weights``: L contiguous tensors W_l [n_l, n_{l-1}] (the layout of ``torch.nn.Linear.weight``),
    all float32, all float16 or all bfloat16, on one device (CPU or CUDA); the widths follow
    from their shapes. ``biases``: None, or L entries each None (no bias) or a contiguous [n_l]
    tensor of the weights' dtype. ``activations``: L entries (or one for every layer), each
    "identity", "tanh", "relu", "leaky_relu" (slope 0.01), ("leaky_relu", alpha), "sigmoid" or
    "gelu" (exact, x Phi(x)); entry l-1 is f_l. ``precisions``: None (all 1), a number for every
    layer, or L entries each a number (Pi_l = p I) or a contiguous float32 [n_l] tensor
    (Pi_l = diag(p)); all > 0 (checked by the library).

    Nothing is copied: the network keeps references to the tensors and passes their pointers on
    every call, so in-place changes (an optimiser step) are seen by the next call.
    :meth:`learn` with ``lr > 0`` updates the weights and biases in place (outside autograd).
    """

    def __init__(self, weights, biases=None, activations="identity", precisions=None):
        torch = _torch()
        self._lib = _get()
        weights = list(weights) if not isinstance(weights, torch.Tensor) else [weights]
        if not weights:
            raise ValueError("weights: need at least one layer")
        L = len(weights)
        _check_tensor(weights[0], "weights[0]", (None, None))
        device = _norm_device(weights[0].device)
        owner = "the device of weights[0]"
        dtype = _dtype_code(weights[0], "weights[0]")
        widths = [int(weights[0].shape[1])]
        for l, w in enumerate(weights):
            _check_tensor(w, f"weights[{l}]", (None, widths[-1]), device=device, owner=owner)
            if w.dtype != weights[0].dtype:
                raise ValueError(
                    f"weights[{l}]: dtype {w.dtype}, but weights[0] is {weights[0].dtype} "
                    "(all layers share one dtype)"
                )
            widths.append(int(w.shape[0]))
        if any(n == 0 for n in widths):
            raise ValueError(f"weights: every width must be >= 1, got widths {widths}")

        if biases is None:
            biases = [None] * L
        biases = list(biases)
        if len(biases) != L:
            raise ValueError(f"biases: expected {L} entries (one per layer, None for none), "
                             f"got {len(biases)}")
        for l, b in enumerate(biases):
            if b is not None:
                _check_tensor(b, f"biases[{l}]", (widths[l + 1],), dtype=weights[0].dtype,
                              device=device, owner=owner)

        if _one_activation(activations):
            activations = [activations] * L
        activations = list(activations)
        if len(activations) != L:
            raise ValueError(f"activations: expected {L} entries (f_1 ... f_L), "
                             f"got {len(activations)}")
        acts = [_activation(a, f"activations[{l}]") for l, a in enumerate(activations)]

        if precisions is None or not isinstance(precisions, (list, tuple)):
            precisions = [1.0 if precisions is None else precisions] * L
        precisions = list(precisions)
        if len(precisions) != L:
            raise ValueError(f"precisions: expected {L} entries, got {len(precisions)}")
        scalars, diags = [], []
        for l, p in enumerate(precisions):
            if isinstance(p, torch.Tensor) and p.dim() > 0:
                _check_tensor(p, f"precisions[{l}]", (widths[l + 1],), dtype=torch.float32,
                              device=device, owner=owner)
                scalars.append(1.0)
                diags.append(p)
            else:
                scalars.append(_number(p, f"precisions[{l}]"))
                diags.append(None)

        self.weights, self.biases, self._diags = weights, biases, diags
        self.precisions = precisions
        self.activations = activations
        self.widths = widths
        self.depth = L
        self.device = device
        self.dtype = weights[0].dtype
        self.kind, self.ordinal, _ = _device_of(weights[0], "weights[0]")
        # The C description, built once; the arrays are kept alive by this object.
        self._c = {
            "widths": (ctypes.c_uint64 * (L + 1))(*widths),
            "acts": (ctypes.c_int32 * L)(*[c for c, _ in acts]),
            "alpha": (ctypes.c_float * L)(*[a for _, a in acts]),
            "weights": _void_array([w.data_ptr() for w in weights]),
            "biases": _void_array([b.data_ptr() if b is not None else None for b in biases]),
            "precision": (ctypes.c_float * L)(*scalars),
            "diag": _void_array([d.data_ptr() if d is not None else None for d in diags]),
        }
        c = self._c
        self._net = _FepSettleNet(
            L, c["widths"], c["acts"], c["alpha"], dtype,
            ctypes.cast(c["weights"], ctypes.POINTER(ctypes.c_void_p)),
            ctypes.cast(c["biases"], ctypes.POINTER(ctypes.c_void_p))
            if any(b is not None for b in biases) else None,
            c["precision"],
            ctypes.cast(c["diag"], ctypes.POINTER(ctypes.c_void_p))
            if any(d is not None for d in diags) else None,
        )

    def __repr__(self):
        return (f"SettleNet(widths={self.widths}, activations={self.activations}, "
                f"dtype={self.dtype}, device={self.device})")

    def _refresh(self):
        """Re-reads the tensors' pointers (a tensor's storage may have been replaced, e.g. by
        ``.data = ...`` or ``set_``)."""
        c = self._c
        for l, w in enumerate(self.weights):
            c["weights"][l] = w.data_ptr()
            b = self.biases[l]
            c["biases"][l] = b.data_ptr() if b is not None else None
            d = self._diags[l]
            c["diag"][l] = d.data_ptr() if d is not None else None

    def _stream(self):
        if self.device.type == "cpu":
            return None
        s = _torch().cuda.current_stream(self.device).cuda_stream
        return ctypes.c_void_p(s) if s else None

    def _outputs(self, batch, steps, trace, learn, out):
        """The result dict: given tensors from ``out`` (checked) or new ones."""
        torch = _torch()
        out = dict(out or {})
        keys = {"x", "eps", "energy", "trace", "steps"} | ({"grad_w", "grad_b"} if learn else set())
        unknown = set(out) - keys
        if unknown:
            raise ValueError(
                f"out: unknown keys {sorted(unknown)} (expected some of {sorted(keys)})"
            )
        if "trace" in out and not trace:
            raise ValueError("out: 'trace' needs trace=True")
        f32, dev, L, n = torch.float32, self.device, self.depth, self.widths
        specs = {
            "x": [((batch, n[l + 1]), f32) for l in range(L)],
            "eps": [((batch, n[l + 1]), f32) for l in range(L)],
            "energy": ((batch,), f32),
            "steps": ((batch,), torch.int32),
        }
        if trace:
            specs["trace"] = ((batch, steps + 1), f32)
        if learn:
            specs["grad_w"] = [((n[l + 1], n[l]), f32) for l in range(L)]
            specs["grad_b"] = [((n[l + 1],), f32) for l in range(L)]
        res = {"trace": None}
        for key, spec in specs.items():
            if isinstance(spec, list):
                given = out.get(key)
                if given is not None and len(given) != L:
                    raise ValueError(f"out[{key!r}]: expected {L} tensors, got {len(given)}")
                res[key] = []
                for l, (shape, dt) in enumerate(spec):
                    if given is not None:
                        _check_tensor(given[l], f"out[{key!r}][{l}]", shape, dtype=dt,
                                      device=dev, owner="the network's device")
                        res[key].append(given[l])
                    else:
                        res[key].append(torch.empty(shape, dtype=dt, device=dev))
            else:
                shape, dt = spec
                if key in out:
                    _check_tensor(out[key], f"out[{key!r}]", shape, dtype=dt, device=dev,
                                  owner="the network's device")
                    res[key] = out[key]
                else:
                    res[key] = torch.empty(shape, dtype=dt, device=dev)
        return res

    def _prepare(self, x0, eta, steps, momentum, tol, init, n_init, check):
        torch = _torch()
        _check_tensor(x0, "x0", (None, self.widths[0]), dtype=torch.float32, device=self.device,
                      owner="the network's device")
        batch = int(x0.shape[0])
        steps = _steps_arg(steps)
        eta, momentum, tol = (_number(v, name) for v, name in
                              ((eta, "eta"), (momentum, "momentum"), (tol, "tol")))
        if init is not None:
            init = list(init)
            if len(init) != n_init:
                raise ValueError(f"init: expected {n_init} tensors (x_1 ... x_{n_init}), "
                                 f"got {len(init)}")
            for l, t in enumerate(init):
                _check_tensor(t, f"init[{l}]", (batch, self.widths[l + 1]), dtype=torch.float32,
                              device=self.device, owner="the network's device")
        mode = FEP_SETTLE_INIT_GIVEN if init is not None else FEP_SETTLE_INIT_FEEDFORWARD
        params = _FepSettleParams(eta, momentum, steps, tol, mode, 0 if check else 1)
        return batch, steps, params, init

    def infer(self, x0, eta, steps, momentum=0.0, tol=0.0, init=None, trace=False, out=None,
              check=True):
        """Settles the batch ``x0`` ([B, n_0] float32) with x_L free (``fep_settle_infer``).

        Each step, every free layer moves down the energy gradient
        ``g_l = Pi_l eps_l - f'_{l+1}(x_l) * W_{l+1}^T (Pi_{l+1} eps_{l+1})`` with momentum:
        ``v <- momentum v + g; x <- x - eta v`` (all layers from the same step's errors).
        ``eta`` > 0, ``steps`` T >= 1, ``momentum`` in [0, 1); ``tol`` > 0 stops a sample once
        ``|E_t - E_{t-1}| <= tol E_{t-1}`` or ``E_t <= tol E_0`` (0: exactly T steps). ``init``: None (the free layers
        start at the feedforward prediction, where every error, and so the energy, is 0 with a
        free top), or L float32 tensors x_1 ... x_L [B, n_l] to start from (copied).

        Returns a dict of contiguous tensors on the network's device: "x" and "eps" (lists of L
        float32 [B, n_l]: the settled x_1 ... x_L and their errors), "energy" [B] (the settled
        energy), "steps" [B] int32 (steps run), and "trace" [B, T + 1] float32 with
        ``trace=True`` (the energy at the start and after each step; a sample that stopped
        repeats its last value), else None. ``out``: optional dict of preallocated tensors with
        the same keys, shapes and dtypes ("x"/"eps" as lists); those given are written.
        ``check``: reject NaN/Inf inputs, weights and biases and non-positive precisions first;
        on a GPU that reads back a few floats (the call waits for the stream). ``check=False``
        enqueues the work and returns at once.
        """
        batch, steps, params, init = self._prepare(x0, eta, steps, momentum, tol, init,
                                                   self.depth, check)
        res = self._outputs(batch, steps, trace, False, out)
        if init is not None:
            for dst, src in zip(res["x"], init):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
        self._refresh()
        x_out = _void_array([t.data_ptr() for t in res["x"]])
        eps_out = _void_array([t.data_ptr() for t in res["eps"]])
        _check(
            self._lib.fep_settle_infer(
                self.kind, self.ordinal, self._stream(), ctypes.byref(self._net),
                ctypes.byref(params), batch, _ptr(x0), x_out, eps_out, _ptr(res["energy"]),
                _ptr(res["trace"]), _ptr(res["steps"]),
            )
        )
        return res

    def learn(self, x0, target, eta, steps, momentum=0.0, tol=0.0, init=None, trace=False,
              lr=0.0, out=None, check=True):
        """One learning step (``fep_settle_learn``): settles ``x0`` ([B, n_0] float32) with x_L
        clamped to ``target`` ([B, n_L] float32), then computes the gradients of the settled
        energy, ``grad_w[l-1] = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T`` [n_l, n_{l-1}] and
        ``grad_b[l-1] = -(1/B) sum_b Pi_l eps_l`` [n_l] (float32; a layer without bias gets
        its bias gradient too). ``lr`` > 0 then applies SGD in place,
        ``W_l -= lr grad_w``, ``b_l -= lr grad_b`` (rounded once to the weights' dtype).

        Settling parameters as for :meth:`infer`; ``init``: None (feedforward start) or L - 1
        tensors x_1 ... x_{L-1}. Returns the dict of :meth:`infer` (``x[-1]`` is the target)
        plus "grad_w" and "grad_b" (lists of L tensors); ``out`` may hold those too.
        """
        torch = _torch()
        batch, steps, params, init = self._prepare(x0, eta, steps, momentum, tol, init,
                                                   self.depth - 1, check)
        _check_tensor(target, "target", (batch, self.widths[-1]), dtype=torch.float32,
                      device=self.device, owner="the network's device")
        lr = _number(lr, "lr")
        res = self._outputs(batch, steps, trace, True, out)
        if init is not None:
            for dst, src in zip(res["x"], init):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
        self._refresh()
        x_out = _void_array([t.data_ptr() for t in res["x"]])
        eps_out = _void_array([t.data_ptr() for t in res["eps"]])
        gw = _void_array([t.data_ptr() for t in res["grad_w"]])
        gb = _void_array([t.data_ptr() for t in res["grad_b"]])
        _check(
            self._lib.fep_settle_learn(
                self.kind, self.ordinal, self._stream(), ctypes.byref(self._net),
                ctypes.byref(params), batch, _ptr(x0), _ptr(target), x_out, eps_out,
                _ptr(res["energy"]), _ptr(res["trace"]), _ptr(res["steps"]), gw, gb, lr,
            )
        )
        return res


def settle_infer(weights, biases, activations, precisions, x0, eta, steps, momentum=0.0,
                 tol=0.0, init=None, trace=False, out=None, check=True):
    """``SettleNet(weights, biases, activations, precisions).infer(x0, ...)``: settles x0 with
    x_L free and returns the dict of :meth:`SettleNet.infer` ("x", "eps", "energy", "trace",
    "steps"). Build a :class:`SettleNet` once instead when calling repeatedly."""
    net = SettleNet(weights, biases, activations, precisions)
    return net.infer(x0, eta, steps, momentum=momentum, tol=tol, init=init, trace=trace, out=out,
                     check=check)


def settle_learn(weights, biases, activations, precisions, x0, target, eta, steps, momentum=0.0,
                 tol=0.0, init=None, trace=False, lr=0.0, out=None, check=True):
    """``SettleNet(weights, biases, activations, precisions).learn(x0, target, ...)``: one
    learning step; returns the dict of :meth:`SettleNet.learn` (with "grad_w" and "grad_b"),
    and with ``lr > 0`` updates the weights and biases in place."""
    net = SettleNet(weights, biases, activations, precisions)
    return net.learn(x0, target, eta, steps, momentum=momentum, tol=tol, init=init, trace=trace,
                     lr=lr, out=out, check=check)


# ---- variational message passing ----

_VMP_METHODS = {"vmp": FEP_VMP_METHOD_VMP, "mmp": FEP_VMP_METHOD_MMP}


def construct_policies(num_controls, policy_len):
    """Every combination of actions over ``policy_len`` steps, in pymdp's order
    (``pymdp.control.construct_policies``: the last factor of the last step varies fastest),
    as a NumPy int32 array [P, policy_len, F]."""
    import itertools

    np = _np()
    num_controls = [int(u) for u in num_controls]
    digits = [range(u) for u in num_controls] * int(policy_len)
    rows = list(itertools.product(*digits))
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), int(policy_len), len(num_controls))


def _np():
    import numpy as np  # imported lazily, like torch

    return np


def _host_f64(x, what):
    """A contiguous float64 NumPy copy of an array, list or tensor (host side)."""
    np = _np()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        a = np.array(x, dtype=np.float64, order="C")
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected an array of numbers, got {type(x).__name__}") from None
    return a


def _host_list(x, what, count=None):
    """A per-modality or per-factor list (pymdp's list or object array; one array for a single
    entry) as a list of its entries (None entries kept)."""
    np = _np()
    if isinstance(x, np.ndarray) and x.dtype == object:
        x = list(x)
    if not isinstance(x, (list, tuple)) or (x and all(np.isscalar(v) for v in x)):
        x = [x]
    x = list(x)
    if count is not None and len(x) != count:
        raise ValueError(f"{what}: expected {count} entries, got {len(x)}")
    return x


def _f64_pointers(arrays):
    """A ctypes ``double *[]`` over float64 NumPy arrays (None entries: NULL)."""
    ptrs = (_P_F64 * len(arrays))()
    for i, a in enumerate(arrays):
        if a is not None:
            ptrs[i] = a.ctypes.data_as(_P_F64)
    return ctypes.cast(ptrs, _P_P_F64), ptrs


def _shaped(x, what, shape, optional_entries=False):
    """``x`` as float64 with exactly ``shape`` (or None where allowed)."""
    if x is None and optional_entries:
        return None
    a = _host_f64(x, what)
    if a.shape != tuple(shape):
        raise ValueError(f"{what}: expected shape {list(shape)}, got {list(a.shape)}")
    return a


class VmpModel(_Owned):
    """A discrete generative model for active inference (``FepVmpModel``, DESIGN.md 4.4), on one
    device, with pymdp 1.0.4's conventions (tests/fixtures/VMP-CONVENTIONS.md).

    The arguments follow pymdp's ``Agent`` and its layouts (NumPy arrays, lists, object arrays
    or tensors; copied, so they may be changed afterwards):

    * ``A``: M arrays A_m [O_m, S_deps(m)...], p(o | s), every column summing to 1.
    * ``B``: F arrays B_f [S_f, S_f, U_f] (or [S_f, S_f]: uncontrolled), B_f[s', s, u] =
      p(s' | s, u). The numbers of states and controls follow from B's shapes. pymdp's
      ``B_dependencies`` (transitions conditioned on other factors) are not supported.
    * ``A_dependencies``: M lists of factor indices, in A_m's axis order (default: every
      modality depends on every factor, as in pymdp).
    * ``C``: M log-preference vectors [O_m] used as given (None or None entries: zeros);
      ``D``: F priors [S_f] (None or None entries: uniform).
    * ``policies``: [P, H, F] actions (or pymdp's list of P arrays [H, F]); or None with
      ``policy_len=H`` for every combination (:func:`construct_policies`, pymdp's default); or
      neither (no policy inference). ``E``: [P] prior over policies (default uniform).
    * ``pA``, ``pB``, ``pD``: Dirichlet counts shaped like A, B, D (optional); :meth:`learn`
      updates them, :meth:`infer_policies` can add their novelty.
    * ``device``: where the model lives and every tensor of its calls must be ("cpu",
      "cuda", "cuda:1", a torch.device).

    Free it with :meth:`close`, a ``with`` block, or let it be garbage collected.

    Beliefs are float32 tensors [N, sum S] (factor f at offset S_0 + ... + S_{f-1}; split with
    :meth:`factors`) for N agents sharing the model. Calls on CUDA tensors run on PyTorch's
    current stream and return without synchronising (except that ``check=True`` reads back one
    word to report bad inputs). Shapes, dtypes and devices are checked in Python
    (:class:`ValueError`); values by the library (:class:`FepError`).

    Example (a two-armed T-maze-like toy; runnable as is)::

        import numpy as np, torch
        import fep_kernels as fk

        A = [np.array([[0.9, 0.1], [0.1, 0.9]])]        # one modality reports the state
        B = [np.stack([np.eye(2), np.eye(2)[::-1]], -1)] # stay or switch: [2, 2, 2]
        C = [np.array([0.0, 2.0])]                      # prefer outcome 1
        with fk.VmpModel(A, B, C=C, policy_len=2, pA=[10 * A[0]]) as model:
            obs = torch.tensor([[0], [1], [1]])          # 3 agents, one observation each
            out = model.infer_states(obs)                # D uniform: q = A[o, :] normalised
            print(out["qs"], out["vfe"])                 # [[0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]
            pol = model.infer_policies(out["qs"], gamma=4.0)
            print(pol["q_pi"].argmax(1))                 # [2, 0, 0]: policies[2] = switch,
                                                         # stay; policies[0] = stay, stay
            seq = model.infer_sequence(torch.tensor([[[0], [1]]]),  # 1 agent, T = 2 steps
                                       actions=torch.tensor([[[1]]]))  # it switched
            model.learn(torch.tensor([[[0], [1]]]), seq["qs"], lr_a=1.0)
            print(model.counts_a(0))                     # [[10, 1], [1, 10]]
    """

    _free = "fep_vmp_model_free"

    def __init__(self, A, B, C=None, D=None, A_dependencies=None, policies=None,
                 policy_len=None, E=None, pA=None, pB=None, pD=None, device="cpu"):
        torch = _torch()
        np = _np()
        self._handle = None
        lib = _get()
        B = [_host_f64(b, f"B[{f}]") for f, b in enumerate(_host_list(B, "B"))]
        for f, b in enumerate(B):
            if b.ndim == 2:
                B[f] = b = b[:, :, None].copy()
            if b.ndim != 3 or b.shape[0] != b.shape[1] or b.shape[0] == 0 or b.shape[2] == 0:
                raise ValueError(f"B[{f}]: expected shape [S, S, U] (or [S, S]) with S, U >= 1, "
                                 f"got {list(b.shape)}")
        num_states = [int(b.shape[0]) for b in B]
        num_controls = [int(b.shape[2]) for b in B]
        F = len(B)
        A = [_host_f64(a, f"A[{m}]") for m, a in enumerate(_host_list(A, "A"))]
        M = len(A)
        if A_dependencies is None:
            A_dependencies = [list(range(F)) for _ in range(M)]
        A_dependencies = [list(d) for d in A_dependencies]
        if len(A_dependencies) != M:
            raise ValueError(f"A_dependencies: expected {M} lists (one per modality), "
                             f"got {len(A_dependencies)}")
        deps = []
        for m, d in enumerate(A_dependencies):
            try:
                d = [operator.index(x) for x in d]
            except TypeError:
                raise ValueError(f"A_dependencies[{m}]: expected factor indices, got {d!r}") \
                    from None
            if not d or any(not 0 <= x < F for x in d) or len(set(d)) != len(d):
                raise ValueError(f"A_dependencies[{m}]: {d} must be distinct factors in 0..{F - 1}")
            deps.append(d)
        num_obs = []
        a_shapes = []
        for m, a in enumerate(A):
            want = tuple(num_states[x] for x in deps[m])
            if a.ndim != 1 + len(want) or a.shape[1:] != want or a.shape[0] == 0:
                raise ValueError(f"A[{m}]: expected shape [O, {', '.join(map(str, want))}] "
                                 f"(A_dependencies[{m}] = {deps[m]}), got {list(a.shape)}")
            num_obs.append(int(a.shape[0]))
            a_shapes.append(a.shape)
        b_shapes = [b.shape for b in B]
        d_shapes = [(s,) for s in num_states]

        def per_entry(x, what, shapes, fill_none):
            if x is None:
                return None
            x = _host_list(x, what, len(shapes))
            return [_shaped(v, f"{what}[{i}]", shapes[i], fill_none) for i, v in enumerate(x)]

        C = per_entry(C, "C", [(o,) for o in num_obs], True)
        D = per_entry(D, "D", d_shapes, True)
        pA = per_entry(pA, "pA", a_shapes, False)
        pB = per_entry(pB, "pB", b_shapes, False)
        pD = per_entry(pD, "pD", d_shapes, False)

        if policies is None and policy_len is not None:
            policies = construct_policies(num_controls, policy_len)
        if policies is not None:
            pol = np.asarray(policies)
            if pol.ndim == 2 and F == 1 and policy_len is None:
                pol = pol[:, :, None]
            if pol.ndim != 3 or pol.shape[2] != F or pol.shape[0] == 0 or pol.shape[1] == 0:
                raise ValueError(f"policies: expected shape [P, H, {F}] with P, H >= 1, "
                                 f"got {list(pol.shape)}")
            if not np.issubdtype(pol.dtype, np.integer):
                raise ValueError(f"policies: expected integer actions, got dtype {pol.dtype}")
            policies = np.ascontiguousarray(pol, dtype=np.int32)
        P = 0 if policies is None else int(policies.shape[0])
        H = 0 if policies is None else int(policies.shape[1])
        if E is not None:
            if policies is None:
                raise ValueError("E: given without policies (pass policies or policy_len)")
            E = _shaped(E, "E", (P,))

        u64 = lambda v: (ctypes.c_uint64 * len(v))(*v)  # noqa: E731
        keep = {
            "S": u64(num_states), "U": u64(num_controls), "O": u64(num_obs),
            "nd": u64([len(d) for d in deps]), "deps": u64([x for d in deps for x in d]),
        }
        lists = {}
        for name, arrays in (("a", A), ("b", B), ("c", C), ("d", D), ("pa", pA), ("pb", pB),
                             ("pd", pD)):
            lists[name] = None if arrays is None else _f64_pointers(arrays)
        desc = _FepVmpModelDesc(
            F, M, keep["S"], keep["U"], keep["O"], keep["nd"], keep["deps"],
            *[lists[k][0] if lists[k] is not None else None
              for k in ("a", "b", "c", "d")],
            policies.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) if P else None,
            P, H,
            E.ctypes.data_as(_P_F64) if E is not None else None,
            *[lists[k][0] if lists[k] is not None else None for k in ("pa", "pb", "pd")],
        )
        device = _norm_device(torch.device(device))
        kind, ordinal, _ = _device_args(device, "device")
        handle = ctypes.c_void_p()
        _check(lib.fep_vmp_model_new(kind, ordinal, ctypes.byref(desc), ctypes.byref(handle)))
        if not handle.value:
            raise FepError(FEP_ERR_INTERNAL, "fep_vmp_model_new returned FEP_OK but no model")
        self._lib, self._handle = lib, handle
        self.device, self.kind, self.ordinal = device, kind, ordinal
        self.num_states, self.num_controls, self.num_obs = num_states, num_controls, num_obs
        self.A_dependencies = deps
        self.num_factors, self.num_modalities = F, M
        self.belief_len, self.obs_len = sum(num_states), sum(num_obs)
        self.num_policies, self.policy_len = P, H
        self.policies = policies
        self._shapes = {FEP_VMP_COUNTS_A: a_shapes, FEP_VMP_COUNTS_B: b_shapes,
                        FEP_VMP_COUNTS_D: d_shapes}
        self._has_counts = {FEP_VMP_COUNTS_A: pA is not None, FEP_VMP_COUNTS_B: pB is not None,
                            FEP_VMP_COUNTS_D: pD is not None}

    def __repr__(self):
        state = "closed" if self._handle is None else (
            f"num_states={self.num_states}, num_obs={self.num_obs}, "
            f"A_dependencies={self.A_dependencies}, num_controls={self.num_controls}, "
            f"num_policies={self.num_policies}")
        return f"VmpModel({state}, device={self.device})"

    # -- queries --

    def info(self):
        """The sizes as the library reports them: a dict with num_factors, num_modalities,
        belief_len (sum S), obs_len (sum O), num_policies and policy_len."""
        keys = ("num_factors", "num_modalities", "belief_len", "obs_len", "num_policies",
                "policy_len")
        vals = [ctypes.c_uint64() for _ in keys]
        _check(self._lib.fep_vmp_model_info(self._h(), *[ctypes.byref(v) for v in vals]))
        return {k: int(v.value) for k, v in zip(keys, vals)}

    def factors(self, beliefs):
        """The per-factor views of beliefs [..., sum S]: a list of F tensors [..., S_f]."""
        return list(beliefs.split(self.num_states, dim=-1))

    def _counts(self, which, index, what):
        torch = _torch()
        np = _np()
        shapes = self._shapes[which]
        try:
            index = operator.index(index)
        except TypeError:
            raise ValueError(f"{what}: index {index!r} is not an int") from None
        if not 0 <= index < len(shapes):
            raise ValueError(f"{what}: index {index} is out of range (there are {len(shapes)})")
        if not self._has_counts[which]:
            return None
        out = np.empty(shapes[index], dtype=np.float64)
        _check(self._lib.fep_vmp_model_counts(self._h(), self._stream(), which, index,
                                              out.ctypes.data_as(_P_F64), out.size))
        return torch.from_numpy(out)

    def counts_a(self, m):
        """The current Dirichlet counts pA_m (a float64 CPU tensor shaped like A_m), or None
        when the model was built without pA. Waits for PyTorch's current stream (where
        :meth:`learn` ran) first."""
        return self._counts(FEP_VMP_COUNTS_A, m, "counts_a")

    def counts_b(self, f):
        """The current pB_f (float64, shaped like B_f [S, S, U]), or None without pB."""
        return self._counts(FEP_VMP_COUNTS_B, f, "counts_b")

    def counts_d(self, f):
        """The current pD_f (float64 [S_f]), or None without pD."""
        return self._counts(FEP_VMP_COUNTS_D, f, "counts_d")

    # -- plumbing --

    def _check(self, t, what, shape, dtype):
        _check_tensor(t, what, shape, dtype=dtype, device=self.device,
                      owner="the model's device")

    def _obs(self, obs, lead):
        """(FEP_VMP_OBS_*, tensor) for observations [*lead, M] (integer indices; int32 used as
        is, other integer dtypes converted) or [*lead, sum O] (float32 distributions)."""
        torch = _torch()
        if not isinstance(obs, torch.Tensor):
            raise ValueError(f"obs: expected a torch.Tensor, got {type(obs).__name__}")
        ints = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
        if obs.dtype in ints:
            self._check(obs, "obs", (*lead, self.num_modalities), None)
            return FEP_VMP_OBS_INDEX, obs.to(torch.int32)
        if obs.dtype == torch.float32:
            self._check(obs, "obs", (*lead, self.obs_len), None)
            return FEP_VMP_OBS_DIST, obs
        raise ValueError(f"obs: dtype {obs.dtype}: expected integer indices [..., "
                         f"{self.num_modalities}] or float32 distributions [..., {self.obs_len}]")

    def _actions(self, actions, n, steps):
        torch = _torch()
        if actions is None:
            return None
        if not isinstance(actions, torch.Tensor) or actions.dtype not in (torch.int32,
                                                                          torch.int64):
            raise ValueError("actions: expected an int32 or int64 torch.Tensor [N, T - 1, F]")
        self._check(actions, "actions", (n, steps - 1, self.num_factors), None)
        return actions.to(torch.int32)

    def _outputs(self, specs, out):
        """New tensors for ``specs`` ({key: (shape, dtype) or None}), or the given ones from
        ``out`` (checked)."""
        torch = _torch()
        out = dict(out or {})
        unknown = set(out) - {k for k, v in specs.items() if v is not None}
        if unknown:
            raise ValueError(f"out: unknown or disabled keys {sorted(unknown)}")
        res = {}
        for key, spec in specs.items():
            if spec is None:
                res[key] = None
            elif key in out:
                self._check(out[key], f"out[{key!r}]", *spec)
                res[key] = out[key]
            else:
                res[key] = torch.empty(spec[0], dtype=spec[1], device=self.device)
        return res

    def _stream(self):
        return _device_args(self.device, "device")[2]

    # -- ops --

    def infer_states(self, obs, prior=None, num_iter=16, tol=0.0, trace=False, out=None,
                     check=True):
        """State inference for N agents (pymdp's ``fpi``; ``fep_vmp_infer_states``).

        ``obs``: [N, M] integer indices, or [N, sum O] float32 distributions (modality m's O_m
        probabilities at offset O_0 + ... + O_{m-1}; used as sum_o o ln A, as pymdp).
        ``prior``: [N, sum S] float32 (None: every agent starts from D). ``num_iter`` K >= 1
        Jacobi iterations (one exact pass with one factor); ``tol`` > 0 stops an agent after
        iteration k >= 2 once |F_k - F_{k-1}| <= tol (0: always K, as pymdp).

        Returns a dict of tensors on the model's device: "qs" [N, sum S] float32, "vfe" [N]
        (the variational free energy F; the ELBO is -F), "iterations" [N] int32, and with
        ``trace=True`` "vfe_trace" [N, K] (F after each iteration), else None. ``out``: optional
        preallocated tensors with those keys. ``check``: on a GPU, scan the inputs first (one
        word read back); ``check=False`` returns at once and clamps bad indices.
        """
        torch = _torch()
        h = self._h()
        kind, obs = self._obs(obs, (None,))
        n = int(obs.shape[0])
        if prior is not None:
            self._check(prior, "prior", (n, self.belief_len), torch.float32)
        num_iter = _steps_arg(num_iter, "num_iter")
        f32 = torch.float32
        res = self._outputs({
            "qs": ((n, self.belief_len), f32), "vfe": ((n,), f32),
            "iterations": ((n,), torch.int32),
            "vfe_trace": ((n, num_iter), f32) if trace else None,
        }, out)
        params = _FepVmpFpiParams(num_iter, _number(tol, "tol"), 0 if check else 1)
        _check(self._lib.fep_vmp_infer_states(
            h, self._stream(), ctypes.byref(params), kind, _ptr(obs), n, _ptr(prior),
            _ptr(res["qs"]), _ptr(res["vfe"]), _ptr(res["iterations"]), _ptr(res["vfe_trace"]),
        ))
        return res

    def infer_sequence(self, obs, actions=None, prior=None, method="vmp", num_iter=16, tau=1.0,
                       out=None, check=True):
        """Sequence inference over windows of T steps (pymdp's ``vmp`` / ``mmp``;
        ``fep_vmp_infer_sequence``).

        ``obs``: [N, T, M] integer indices or [N, T, sum O] float32 distributions; ``actions``:
        [N, T - 1, F] integer past actions (action t moves the state from step t to t + 1;
        None only when T = 1); ``prior``: [N, sum S] float32 for step 0 (None: D).
        ``method``: "vmp" or "mmp"; ``num_iter`` K >= 1; ``tau``: step size in (0, 1] (pymdp's
        Agent always uses 1).

        Returns a dict: "qs" [N, T, sum S], "vfe" [N] (the window's free energy) and "vfe_t"
        [N, T] (its per-step terms), float32 on the model's device.
        """
        torch = _torch()
        h = self._h()
        if method not in _VMP_METHODS:
            raise ValueError(f"method: {method!r} is not one of {list(_VMP_METHODS)}")
        kind, obs = self._obs(obs, (None, None))
        n, steps = int(obs.shape[0]), int(obs.shape[1])
        actions = self._actions(actions, n, steps)
        if prior is not None:
            self._check(prior, "prior", (n, self.belief_len), torch.float32)
        f32 = torch.float32
        res = self._outputs({
            "qs": ((n, steps, self.belief_len), f32), "vfe": ((n,), f32),
            "vfe_t": ((n, steps), f32),
        }, out)
        params = _FepVmpSequenceParams(_VMP_METHODS[method], _steps_arg(num_iter, "num_iter"),
                                       _number(tau, "tau"), 0 if check else 1)
        _check(self._lib.fep_vmp_infer_sequence(
            h, self._stream(), ctypes.byref(params), steps, kind, _ptr(obs), n, _ptr(actions),
            _ptr(prior), _ptr(res["qs"]), _ptr(res["vfe"]), _ptr(res["vfe_t"]),
        ))
        return res

    def infer_policies(self, qs, gamma=1.0, utility=True, state_info_gain=True,
                       param_info_gain=False, out=None, check=True):
        """Policy inference (pymdp's ``Agent.infer_policies``; ``fep_vmp_infer_policies``).

        ``qs``: current beliefs [N, sum S] float32 (a sequence posterior [N, T, sum S] uses its
        last step, as pymdp's Agent). For every policy the beliefs are rolled forward through
        B and scored over the horizon with the terms asked for: utility q(o) . C, state
        information gain, and (``param_info_gain``, needs pA or pB) parameter novelty.

        Returns a dict: "g" [N, P], the expected free energy G = -(pymdp's neg_efe) (lower is
        better), and "q_pi" [N, P] = softmax(-gamma G + ln E), float32 on the model's device.
        """
        torch = _torch()
        h = self._h()
        if isinstance(qs, torch.Tensor) and qs.dim() == 3:
            qs = qs[:, -1].contiguous()
        self._check(qs, "qs", (None, self.belief_len), torch.float32)
        n = int(qs.shape[0])
        f32 = torch.float32
        P = self.num_policies
        res = self._outputs({"g": ((n, P), f32), "q_pi": ((n, P), f32)}, out)
        params = _FepVmpPolicyParams(_number(gamma, "gamma"), int(bool(utility)),
                                     int(bool(state_info_gain)), int(bool(param_info_gain)),
                                     0 if check else 1)
        _check(self._lib.fep_vmp_infer_policies(
            h, self._stream(), ctypes.byref(params), _ptr(qs), n, _ptr(res["g"]),
            _ptr(res["q_pi"]),
        ))
        return res

    def learn(self, obs, qs, actions=None, lr_a=0.0, lr_b=0.0, lr_d=0.0, check=True):
        """Dirichlet learning, in place (pymdp's ``infer_parameters``; ``fep_vmp_learn``):
        pA_m += lr_a sum o_m (x) q(s_deps(m)), pB_f[:, :, u] += lr_b sum [a_t = u] q_{t+1} (x) q_t,
        pD_f += lr_d sum q_0 where pD_f > 0, summed over the N agents and their steps.

        ``qs``: posteriors [N, T, sum S] float32 with ``obs`` [N, T, M] / [N, T, sum O] (or
        [N, sum S] with [N, M] / [N, sum O] for one step); ``actions``: [N, T - 1, F] (needed
        for lr_b > 0 when T > 1). A rate > 0 needs those counts in the model. Read the counts
        back with :meth:`counts_a` and friends.
        """
        torch = _torch()
        h = self._h()
        if not isinstance(qs, torch.Tensor):
            raise ValueError(f"qs: expected a torch.Tensor, got {type(qs).__name__}")
        if qs.dim() == 2:
            self._check(qs, "qs", (None, self.belief_len), torch.float32)
            n, steps = int(qs.shape[0]), 1
            kind, obs = self._obs(obs, (n,))
        else:
            self._check(qs, "qs", (None, None, self.belief_len), torch.float32)
            n, steps = int(qs.shape[0]), int(qs.shape[1])
            kind, obs = self._obs(obs, (n, steps))
        actions = self._actions(actions, n, steps)
        params = _FepVmpLearnParams(_number(lr_a, "lr_a"), _number(lr_b, "lr_b"),
                                    _number(lr_d, "lr_d"), 0 if check else 1)
        _check(self._lib.fep_vmp_learn(
            h, self._stream(), ctypes.byref(params), steps, kind, _ptr(obs), n, _ptr(qs),
            _ptr(actions),
        ))


# ---- precision-weighted attention (DESIGN.md 4.1) ----

FEP_SCORE_DOT = 0
FEP_SCORE_GAUSSIAN = 1
FEP_SCORE_STUDENT_T = 2
FEP_SCORE_LAPLACE = 3

_SCORES = {
    "dot": FEP_SCORE_DOT,
    "gaussian": FEP_SCORE_GAUSSIAN,
    "student_t": FEP_SCORE_STUDENT_T,
    "laplace": FEP_SCORE_LAPLACE,
}

__all__ += [
    "attention_forward",
    "attention_backward",
    "attention_merge",
    "FEP_SCORE_DOT",
    "FEP_SCORE_GAUSSIAN",
    "FEP_SCORE_STUDENT_T",
    "FEP_SCORE_LAPLACE",
]


class _FepAttnTensor(ctypes.Structure):
    """struct FepAttnTensor of the header."""

    _fields_ = [
        ("data", ctypes.c_void_p),
        ("shape", ctypes.c_uint64 * 4),
        ("strides", ctypes.c_uint64 * 3),
    ]


class _FepAttentionParams(ctypes.Structure):
    """struct FepAttentionParams of the header."""

    _fields_ = [
        ("score", ctypes.c_int32),
        ("nu", ctypes.c_float),
        ("scale", ctypes.c_double),
        ("causal", ctypes.c_int32),
        ("window", ctypes.c_int32),
        ("normalizer", ctypes.c_int32),
        ("skip_input_checks", ctypes.c_int32),
    ]


_attn_declared = None


def _declare_attention(lib):
    vp, i32 = ctypes.c_void_p, ctypes.c_int32
    p_t = ctypes.POINTER(_FepAttnTensor)
    f = lib.fep_attention_forward
    f.restype = i32
    f.argtypes = [i32, i32, vp, ctypes.POINTER(_FepAttentionParams), i32, p_t, p_t, p_t, vp, vp,
                  vp, p_t, vp, vp]
    f = lib.fep_attention_backward
    f.restype = i32
    f.argtypes = [i32, i32, vp, ctypes.POINTER(_FepAttentionParams), i32, p_t, p_t, p_t, vp, vp,
                  vp, p_t, vp, p_t, vp, vp, p_t, p_t, p_t, vp, vp, vp]
    f = lib.fep_attention_merge
    f.restype = i32
    f.argtypes = [i32, i32, vp, i32, ctypes.c_uint64, vp, vp, vp, p_t, vp, vp]


def _attn_lib():
    """The library, with the attention functions declared."""
    global _attn_declared
    lib = _get()
    if _attn_declared is not lib:
        _declare_attention(lib)
        _attn_declared = lib
    return lib


def _attn_tensor(t, what, layout):
    """(FepAttnTensor, BHLD shape) of a 4-d tensor given in ``layout`` ("bhld" or "blhd"): the
    tensor's own element strides, so views (e.g. a BLHD tensor, a slice of a packed qkv) pass
    without a copy; only the last dimension must be contiguous."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.dim() != 4:
        raise ValueError(f"{what}: expected a dense 4-d tensor, got shape {list(t.shape)}")
    shape, st = list(t.shape), list(t.stride())
    if layout == "blhd":  # [B, L, H, D] -> seen as [B, H, L, D]
        shape = [shape[0], shape[2], shape[1], shape[3]]
        st = [st[0], st[2], st[1], st[3]]
    if st[3] != 1 and shape[3] != 1:
        raise ValueError(f"{what}: the last dimension must be contiguous (stride {st[3]})")
    if any(s < 0 for s in st):
        raise ValueError(f"{what}: negative strides are not supported")
    d = _FepAttnTensor()
    d.data = t.data_ptr()
    for i in range(4):
        d.shape[i] = shape[i]
    for i in range(3):
        d.strides[i] = st[i]
    return d, shape


def _attn_params(score, nu, scale, causal, window, normalizer, check):
    """A FepAttentionParams from the Python arguments (ValueError on a bad one)."""
    if score not in _SCORES:
        raise ValueError(f"score: {score!r} is not one of {list(_SCORES)}")
    p = _FepAttentionParams()
    p.score = _SCORES[score]
    p.nu = _number(nu, "nu") if score == "student_t" else 0.0
    p.scale = 0.0 if scale is None else _number(scale, "scale")
    if scale is not None and not p.scale > 0:
        raise ValueError(f"scale: must be > 0 (None for the default), got {scale}")
    p.causal = 1 if causal else 0
    if window is None:
        p.window = 0
    else:
        w = operator.index(window)
        if not 1 <= w <= 2**31 - 1:
            raise ValueError(f"window: must be in 1 ..= 2**31 - 1 (None: no window), got {w}")
        p.window = w
    p.normalizer = 1 if normalizer else 0
    p.skip_input_checks = 0 if check else 1
    return p


def _attn_inputs(q, k, v, layout, pi_head, pi_key, kv_len):
    """The forward's inputs checked: descriptors of q, k, v, their BHLD shapes, the dtype code,
    the device and the optional pi_head, pi_key, kv_len (ValueError on a bad one)."""
    torch = _torch()
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout: {layout!r} is not 'bhld' or 'blhd'")
    qd, qs = _attn_tensor(q, "q", layout)
    kd, ks = _attn_tensor(k, "k", layout)
    vd, vs = _attn_tensor(v, "v", layout)
    dtype = _dtype_code(q, "q")
    for t, what in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise ValueError(f"{what}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{what}: on {t.device}, expected {q.device} (q's device)")
    b, hq, lq, _ = qs
    _, hkv, lk, _ = ks
    opt = []
    for t, what, shape, dt in ((pi_head, "pi_head", [hq], torch.float32),
                               (pi_key, "pi_key", [b, hkv, lk], torch.float32),
                               (kv_len, "kv_len", [b], torch.int32)):
        if t is not None:
            _check_tensor(t, what, shape, dtype=dt, device=q.device, owner="q's device")
        opt.append(t)
    return dict(q=qd, k=kd, v=vd, qs=qs, ks=ks, vs=vs, dtype=dtype,
                dev=_norm_device(q.device), opt=opt)


def _attn_out(out, shape, dtype, device):
    """``out`` checked (shape, dtype, device), or a new tensor when it is None."""
    torch = _torch()
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if not isinstance(out, torch.Tensor) or list(out.shape) != shape:
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"out: expected shape {shape}, got {got}")
    if out.dtype != dtype or out.device != device:
        raise ValueError(f"out: expected {dtype} on {device}, got {out.dtype} on {out.device}")
    return out


def _like_q(t, what, q, layout, shape):
    """The descriptor of a 4-d tensor that must have q's dtype and device and the BHLD ``shape``
    (given in ``layout``)."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype != q.dtype or t.device != q.device:
        raise ValueError(f"{what}: expected {q.dtype} on {q.device} (q's), got {t.dtype} on "
                         f"{t.device}")
    d, got = _attn_tensor(t, what, layout)
    if got != list(shape):
        want = [shape[0], shape[2], shape[1], shape[3]] if layout == "blhd" else list(shape)
        raise ValueError(f"{what}: expected shape {want} ({layout}), got {list(t.shape)}")
    return d


def attention_forward(q, k, v, score="dot", nu=5.0, scale=None, causal=False, window=None,
                      normalizer=True, pi_head=None, pi_key=None, kv_len=None, layout="bhld",
                      out=None, check=True):
    """Precision-weighted attention, forward (DESIGN.md 4.1): returns ``(o, lse, e)``.

    ``q`` [B, Hq, Lq, D], ``k`` [B, Hkv, Lk, D], ``v`` [B, Hkv, Lk, Dv] (``layout="bhld"``), or
    [B, L, H, D] each (``layout="blhd"``, FlashAttention's), all of one dtype (float32, float16
    or bfloat16) on one device; Hq % Hkv == 0 (GQA/MQA: query head h reads kv head
    h // (Hq // Hkv)). The tensors' strides are passed as they are (no copies); only the last
    dimension must be contiguous. With d2 = |q_i - k_j|^2, pi = pi_head[h] * pi_key[b, h_kv, j]
    and tau = ``scale`` (None: 1/sqrt(D) for "dot", 1 otherwise):

    - "dot":       s = tau pi q.k
    - "gaussian":  s = -tau pi d2 / 2                         (+ (D/2) ln pi with ``normalizer``)
    - "student_t": s = -((nu + D)/2) ln(1 + tau pi d2 / nu)   (+ (D/2) ln pi)
    - "laplace":   s = -sqrt(tau pi d2)                       (+ (D/2) ln pi)

    o_i = sum_j softmax_j(s_ij) v_j, lse_i = ln sum_j exp(s_ij), e_i = sum_j w_ij pi_ij d2_ij,
    over the visible keys: ``causal`` keeps j <= i + Lk - Lq (bottom-right aligned), ``window`` W
    also j > i + Lk - Lq - W (and implies causal), ``kv_len`` [B] int32 keeps j < kv_len[b]. A
    row with no visible key gives o = 0, lse = -inf, e = 0. ``pi_head`` [Hq] and ``pi_key``
    [B, Hkv, Lk] are float32 (> 0), contiguous, optional (1 where absent).

    Returns o (in ``layout``, the inputs' dtype; ``out`` may be given: a tensor of that shape,
    dtype and device with a contiguous last dimension, any other strides), lse and e
    [B, Hq, Lq] float32. ``check=False`` skips the GPU's scan of pi and kv_len (no read-back, the
    call does not wait). GPU tensors run the fused kernels (head dims 32, 64, 96, 128, 256 for
    D and Dv; others raise FEP_ERR_UNSUPPORTED) on the current stream; CPU tensors run the
    float64 reference.

    Example::

        import torch
        import fep_kernels as fk

        g = torch.Generator().manual_seed(0)
        q = torch.randn(2, 4, 8, 32, generator=g)        # [B, Hq, Lq, D]
        k = torch.randn(2, 2, 8, 32, generator=g)        # 2 kv heads: GQA
        v = torch.randn(2, 2, 8, 16, generator=g)
        o, lse, e = fk.attention_forward(q, k, v, score="gaussian", causal=True)
        print(o.shape, lse.shape, e.shape)                # [2, 4, 8, 16], [2, 4, 8], [2, 4, 8]
        ref = torch.nn.functional.scaled_dot_product_attention(
            q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
        o_dot, _, _ = fk.attention_forward(q, k, v, causal=True)
        print((o_dot - ref).abs().max())                  # ~1e-7 (dot is SDPA's softmax)
    """
    torch = _torch()
    lib = _attn_lib()
    p = _attn_params(score, nu, scale, causal, window, normalizer, check)
    x = _attn_inputs(q, k, v, layout, pi_head, pi_key, kv_len)
    qd, kd, vd, dtype, dev, opt = x["q"], x["k"], x["v"], x["dtype"], x["dev"], x["opt"]
    b, hq, lq, _ = x["qs"]
    dv = x["vs"][3]
    o_shape = [b, lq, hq, dv] if layout == "blhd" else [b, hq, lq, dv]
    o = _attn_out(out, o_shape, q.dtype, q.device)
    od, _ = _attn_tensor(o, "out", layout)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    e = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    kind, ordinal, stream = _device_args(dev, "q")
    _check(lib.fep_attention_forward(
        kind, ordinal, stream, ctypes.byref(p), dtype, ctypes.byref(qd), ctypes.byref(kd),
        ctypes.byref(vd), _ptr(opt[0]), _ptr(opt[1]), _ptr(opt[2]), ctypes.byref(od), _ptr(lse),
        _ptr(e)))
    return o, lse, e


def _f32_rows(t, what, q, shape):
    """A contiguous float32 tensor of ``shape`` on q's device (lse, e, d_e and the like)."""
    _check_tensor(t, what, shape, dtype=_torch().float32, device=q.device, owner="q's device")
    return t


def attention_backward(q, k, v, o, lse, d_o, e=None, d_e=None, score="dot", nu=5.0, scale=None,
                       causal=False, window=None, normalizer=True, pi_head=None, pi_key=None,
                       kv_len=None, layout="bhld", precision_grads=True, check=True):
    """Attention backward: the gradients of a loss L(o, e) of :func:`attention_forward`, given
    ``d_o`` = dL/do and optionally ``d_e`` = dL/de. Returns
    ``(dq, dk, dv, dpi_head, dpi_key, dnu)``.

    ``q, k, v, score, nu, scale, causal, window, normalizer, pi_head, pi_key, kv_len, layout`` and
    ``check`` are the forward call's (the same values); ``o`` (in ``layout``, q's dtype) and
    ``lse`` [B, Hq, Lq] float32 are what that call returned; ``d_o`` has o's shape and dtype (any
    strides with a contiguous last dimension, like the inputs). ``e`` [B, Hq, Lq] float32 (the
    forward's e) is needed only with ``d_e`` [B, Hq, Lq] float32 (None: the loss does not use e).

    dq, dk, dv have the shapes, layout and dtype of q, k, v (dk and dv summed over the query heads
    of each kv head's group). With ``precision_grads`` (the default): dpi_head [Hq], dpi_key
    [B, Hkv, Lk] and dnu (a 0-d tensor, 0 unless ``score="student_t"``), float32: dL/dpi_h, dL/dpi_j
    (at pi = 1 for a precision not given) and dL/dnu; without, those three are None. Rows with no
    visible key contribute nothing. Deterministic: the same call gives the same bits. CPU tensors
    run the float64 reference; GPU tensors run three kernels on the current stream (head dims as
    for the forward; float32 takes D + Dv <= 384).

    Example (the loss L = sum(o * g))::

        o, lse, e = fk.attention_forward(q, k, v, score="gaussian", causal=True, pi_key=pk)
        dq, dk, dv, dpi_head, dpi_key, dnu = fk.attention_backward(
            q, k, v, o, lse, g, score="gaussian", causal=True, pi_key=pk)
    """
    torch = _torch()
    lib = _attn_lib()
    p = _attn_params(score, nu, scale, causal, window, normalizer, check)
    x = _attn_inputs(q, k, v, layout, pi_head, pi_key, kv_len)
    qd, kd, vd, dtype, dev, opt = x["q"], x["k"], x["v"], x["dtype"], x["dev"], x["opt"]
    qs, ks, vs = x["qs"], x["ks"], x["vs"]
    b, hq, lq, _ = qs
    _, hkv, lk, _ = ks
    os_ = [b, hq, lq, vs[3]]
    od = _like_q(o, "o", q, layout, os_)
    dod = _like_q(d_o, "d_o", q, layout, os_)
    _f32_rows(lse, "lse", q, [b, hq, lq])
    if d_e is not None:
        if e is None:
            raise ValueError("e: the forward's e is required when d_e is given")
        _f32_rows(d_e, "d_e", q, [b, hq, lq])
    if e is not None:
        _f32_rows(e, "e", q, [b, hq, lq])
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    dq, dk, dv = grads
    dqd, dkd, dvd = (_attn_tensor(t, n, layout)[0] for t, n in zip(grads, ("dq", "dk", "dv")))
    if precision_grads:
        f32 = dict(dtype=torch.float32, device=q.device)
        dpi_head = torch.empty(hq, **f32)
        dpi_key = torch.empty(b, hkv, lk, **f32)
        dnu = torch.empty((), **f32)
    else:
        dpi_head = dpi_key = dnu = None
    kind, ordinal, stream = _device_args(dev, "q")
    _check(lib.fep_attention_backward(
        kind, ordinal, stream, ctypes.byref(p), dtype, ctypes.byref(qd), ctypes.byref(kd),
        ctypes.byref(vd), _ptr(opt[0]), _ptr(opt[1]), _ptr(opt[2]), ctypes.byref(od), _ptr(lse),
        ctypes.byref(dod), _ptr(e), _ptr(d_e), ctypes.byref(dqd), ctypes.byref(dkd),
        ctypes.byref(dvd), _ptr(dpi_head), _ptr(dpi_key), _ptr(dnu)))
    return dq, dk, dv, dpi_head, dpi_key, dnu


def attention_merge(o_parts, lse_parts, e_parts=None, layout="bhld", out=None):
    """Merges S partial attention results of the same rows, each over a subset of the keys (a
    split decode, shards of a sequence), by their lse: returns ``(o, lse, e)`` with

        lse = ln sum_c exp(lse_c),  o = sum_c exp(lse_c - lse) o_c,  e = sum_c exp(lse_c - lse) e_c

    (a row whose every lse_c is -inf gives o = 0, lse = -inf, e = 0). ``o_parts``
    [S, B, Hq, Lq, Dv] (float32, float16 or bfloat16), ``lse_parts`` and ``e_parts``
    [S, B, Hq, Lq] float32, all contiguous on one device; ``e_parts`` may be None (then e is None).
    o has o_parts' dtype, [B, Hq, Lq, Dv] (``layout="bhld"``) or [B, Lq, Hq, Dv] (``"blhd"``);
    ``out`` may be given (that shape, dtype and device, a contiguous last dimension, any other
    strides). lse and e are [B, Hq, Lq] float32. CPU tensors merge in float64; GPU tensors run
    one kernel on the current stream, accumulating in float32.

    Example (the keys in two chunks, each attended separately, then merged)::

        a = fk.attention_forward(q, k[:, :, :100], v[:, :, :100])
        b = fk.attention_forward(q, k[:, :, 100:], v[:, :, 100:])
        o, lse, e = fk.attention_merge(torch.stack([a[0], b[0]]), torch.stack([a[1], b[1]]),
                                       torch.stack([a[2], b[2]]))
    """
    torch = _torch()
    lib = _attn_lib()
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout: {layout!r} is not 'bhld' or 'blhd'")
    if not isinstance(o_parts, torch.Tensor) or o_parts.dim() != 5:
        got = list(o_parts.shape) if isinstance(o_parts, torch.Tensor) else type(o_parts).__name__
        raise ValueError(f"o_parts: expected a 5-d tensor [S, B, Hq, Lq, Dv], got {got}")
    dtype = _dtype_code(o_parts, "o_parts")
    s, b, hq, lq, dv = o_parts.shape
    _check_tensor(o_parts, "o_parts", [s, b, hq, lq, dv])
    if 0 in o_parts.shape:
        raise ValueError(f"o_parts: shape {list(o_parts.shape)} has a zero dimension")
    f32 = dict(dtype=torch.float32, device=o_parts.device, owner="o_parts' device")
    _check_tensor(lse_parts, "lse_parts", [s, b, hq, lq], **f32)
    if e_parts is not None:
        _check_tensor(e_parts, "e_parts", [s, b, hq, lq], **f32)
    o_shape = [b, lq, hq, dv] if layout == "blhd" else [b, hq, lq, dv]
    o = _attn_out(out, o_shape, o_parts.dtype, o_parts.device)
    od, _ = _attn_tensor(o, "out", layout)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=o_parts.device)
    e = None if e_parts is None else torch.empty_like(lse)
    kind, ordinal, stream = _device_args(_norm_device(o_parts.device), "o_parts")
    _check(lib.fep_attention_merge(
        kind, ordinal, stream, dtype, s, _ptr(o_parts), _ptr(lse_parts), _ptr(e_parts),
        ctypes.byref(od), _ptr(lse), _ptr(e)))
    return o, lse, e
