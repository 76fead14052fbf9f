"""The one place that finds and loads the cdylib (``libfep_kernels.so``), and the library and
device queries."""

import ctypes
import math
import os
import re
import sys
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

from ._abi import (
    FEP_ABI_VERSION,
    FEP_DEVICE_CPU,
    FEP_DEVICE_CPU_REFERENCE,
    FEP_ERR_DIVERGED,
    FEP_OK,
    DivergedError,
    FepError,
    _DEVICE_KINDS,
    _declare,
)


_lib = None
_lib_path = None

_LIB_NAME = "libfep_kernels.dylib" if sys.platform == "darwin" else "libfep_kernels.so"
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
# bindings/python/fep_kernels/ -> the repository root (a source checkout or an editable install)
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(_PKG_DIR)))

_HOW_TO_BUILD = (
    "build it with `cargo build --release --lib` in the fep-kernels repository (add "
    "`--features cuda` or `--features rocm` for a GPU) and set FEP_KERNELS_LIB to "
    "target/release/" + _LIB_NAME + ", or pass the path to fep_kernels.load(path)"
)


def _candidates() -> List[str]:
    """Where the library is looked for, in order: ``$FEP_KERNELS_LIB``, a library bundled in the
    package directory, ``target/release/`` of the repository the package lives in."""
    env = os.environ.get("FEP_KERNELS_LIB")
    if env:
        return [env]
    cands = [os.path.join(_PKG_DIR, _LIB_NAME)]
    if os.path.exists(os.path.join(_REPO_ROOT, "Cargo.toml")):  # a checkout, or pip install -e
        cands.append(os.path.join(_REPO_ROOT, "target", "release", _LIB_NAME))
    return cands


def _default_lib_path() -> str:
    """The first of :func:`_candidates` that exists; raises ``FileNotFoundError`` (an
    ``OSError``) saying where it looked and how to build the library when none does."""
    cands = _candidates()
    for c in cands:
        if os.path.exists(c):
            return c
    where = "FEP_KERNELS_LIB=" + cands[0] if len(cands) == 1 else ", ".join(cands)
    raise FileNotFoundError(f"fep_kernels: the shared library {_LIB_NAME} was not found "
                            f"(looked at {where}); {_HOW_TO_BUILD}")


def load(path: Optional[str] = None) -> ctypes.CDLL:
    """Loads the fep-kernels shared library (once per process) and returns the ``ctypes.CDLL``.

    ``path``: an explicit path to ``libfep_kernels.so`` (``.dylib`` on macOS). Default: the
    environment variable ``FEP_KERNELS_LIB``, else the library bundled in this package (what
    ``pip install`` puts there), else, when the package is used from a source checkout of
    fep-kernels, ``target/release/libfep_kernels.so`` of that checkout (built by
    ``cargo build --release --lib``). Calling it is optional: the first function that needs the
    library loads it. Raises ``OSError`` (``FileNotFoundError``) when the file cannot be found
    or loaded, ``RuntimeError`` when its ABI version is not ``FEP_ABI_VERSION`` and
    ``ValueError`` when a different library was already loaded.

    Example::

        import fep_kernels as fk
        fk.load("/opt/fep/libfep_kernels.so")    # or set FEP_KERNELS_LIB
        print(fk.version(), fk.abi_version())
    """
    global _lib, _lib_path
    path = os.path.abspath(path if path is not None else _default_lib_path())
    if _lib is not None:
        if path != _lib_path:
            raise ValueError(f"fep_kernels: {_lib_path} is already loaded; cannot load {path}")
        return _lib
    if not os.path.exists(path):
        raise FileNotFoundError(f"fep_kernels: shared library not found at {path}; {_HOW_TO_BUILD}")
    lib = ctypes.CDLL(path)
    _declare(lib)
    abi = lib.fep_abi_version()
    if abi != FEP_ABI_VERSION:
        raise RuntimeError(
            f"fep_kernels: {path} implements ABI {abi}, these bindings ABI {FEP_ABI_VERSION}"
        )
    _lib, _lib_path = lib, path
    return lib


def _get() -> ctypes.CDLL:
    """The loaded library (loading it on first use)."""
    return _lib if _lib is not None else load()


# "invalid argument `<field>`: <rest>", the library's message for a bad argument
_FIELD = re.compile(r"invalid argument `(?P<field>[^`]+)`: (?P<rest>.*)", re.S)
# "element <flat index> [(<where>)] is <value>...", the library's words for a bad element
_ELEMENT = re.compile(r"element (?P<i>\d+)(?: \([^)]*\))? is (?P<tail>.*)", re.S)

# How the ops name the library's fields: {C field: (Python name, the tensor's shape or None)}.
_Names = Mapping[str, Tuple[str, Optional[Sequence[int]]]]


def _unravel(i: int, shape: Sequence[int]) -> Optional[List[int]]:
    """The multi-index of flat (row-major) element ``i`` of ``shape``; None when out of range."""
    if not 0 <= i < math.prod(shape):
        return None
    idx = []
    for n in reversed(shape):
        i, r = divmod(i, n)
        idx.append(r)
    return idx[::-1]


def _python_names(message: str, names: Optional[_Names]) -> str:
    """``message`` (the library's) with the C names of ``names`` replaced by the Python
    arguments' names, and "element <flat index>" of a named tensor by its multi-index:
    "invalid argument `precision.key`: element 9 is -1; ..." becomes "invalid argument
    `precision_key`: precision_key[0, 1, 3] is -1; ..." (anything else is left as it is)."""
    m = _FIELD.match(message) if names else None
    if m is None or m["field"] not in names:
        return message
    py, shape = names[m["field"]]
    rest = m["rest"]
    e = _ELEMENT.match(rest)
    idx = _unravel(int(e["i"]), shape) if e and shape is not None else None
    if idx is not None:
        rest = f"{py}[{', '.join(map(str, idx))}] is {e['tail']}"
    for c, (p, _) in names.items():  # other fields the message mentions (overlaps ...)
        if c != p and not c.isidentifier():  # "layers[0].weight", not a word like "a"
            rest = re.sub(rf"(?<![\w.\[]){re.escape(c)}(?![\w\[])", p, rest)
    return f"{message[:m.start()]}invalid argument `{py}`: {rest}"


def _check(status: int, names: Optional[_Names] = None) -> None:
    """Raises :class:`FepError` for a status other than FEP_OK, with ``fep_last_error()``
    translated to the Python names by ``names`` (see :func:`_python_names`)."""
    if status != FEP_OK:
        cls = DivergedError if status == FEP_ERR_DIVERGED else FepError
        raise cls(status, _python_names(last_error(), names))


# ---- library and device queries ----


def version() -> str:
    """The loaded library's version string, e.g. ``"0.1.0"`` (loads the library)."""
    return _get().fep_version().decode()


def abi_version() -> int:
    """The version of the C ABI the loaded library implements (these bindings need
    ``FEP_ABI_VERSION``; :func:`load` checks it)."""
    return int(_get().fep_abi_version())


def last_error() -> str:
    """The library's message for the last failed call on this thread ("" if none). Failing calls
    already raise :class:`FepError` with this message."""
    msg = _get().fep_last_error()
    return msg.decode(errors="replace") if msg else ""


def _kind(kind: Union[str, int]) -> int:
    if isinstance(kind, str):
        try:
            return _DEVICE_KINDS[kind.lower()]
        except KeyError:
            raise ValueError(f"unknown device kind {kind!r}; expected one of {list(_DEVICE_KINDS)}")
    from ._tensors import _integer  # (_tensors imports this module)

    return _integer(kind, "kind", 0, 2**31 - 1)


def device_count(kind: Union[str, int]) -> int:
    """The number of devices of ``kind`` that the library can use: "cpu" (always 1), "cuda" or
    "hip" (or a ``FEP_DEVICE_*`` constant).

    A library built without that vendor's GPU support, or a machine without its driver, has 0.
    Raises ValueError for an unknown kind.
    """
    n = _get().fep_device_count(_kind(kind))
    if n < 0:
        raise FepError(-n, last_error())
    return int(n)


def device_name(kind: Union[str, int], ordinal: int = 0) -> str:
    """The name of device ``ordinal`` (0-based) of ``kind`` ("cpu", "cuda", "hip" or a
    ``FEP_DEVICE_*`` constant), e.g. the GPU's marketing name. Raises :class:`FepError` when
    there is no such device."""
    from ._tensors import _integer

    buf = ctypes.create_string_buffer(256)
    ordinal = _integer(ordinal, "ordinal", 0, 2**31 - 1)
    _check(_get().fep_device_name(_kind(kind), ordinal, buf, len(buf)))
    return buf.value.decode(errors="replace")


# ---- CPU threads and the f64 reference ----

_threads_explicit = False  # set_num_threads(n) was called: stop following torch
_threads_applied: Optional[int] = None  # what the library was last told
_reference_depth = 0  # > 0 inside `with cpu_reference():`


def set_num_threads(n: Optional[int]) -> None:
    """Sets how many threads the CPU device uses for the calls that follow.

    ``n >= 1``: a pool of ``n`` threads of the library's own. ``0``: rayon's global pool (one
    thread per core, or ``RAYON_NUM_THREADS``). ``None`` (the default state): follow
    ``torch.get_num_threads()`` when PyTorch is imported, so ``torch.set_num_threads(1)``
    limits this library too and the two never oversubscribe the cores. Results do not depend on
    the thread count. Raises ValueError for a negative or huge ``n``.

    Example::

        import fep_kernels as fk
        fk.set_num_threads(2)
        assert fk.get_num_threads() == 2
        fk.set_num_threads(None)   # follow torch again
    """
    global _threads_explicit, _threads_applied
    if n is None:
        _threads_explicit, _threads_applied = False, None
        _check(_get().fep_set_num_threads(0))
        _sync_threads()
        return
    from ._tensors import _integer

    n = _integer(n, "n", 0, 4096)
    _check(_get().fep_set_num_threads(n))
    _threads_explicit, _threads_applied = True, n


def get_num_threads() -> int:
    """The number of threads a CPU call made now would use (after following torch, see
    :func:`set_num_threads`)."""
    _sync_threads()
    return int(_get().fep_num_threads())


def _sync_threads() -> None:
    """Before a CPU call: unless :func:`set_num_threads` fixed a count, give the library
    ``torch.get_num_threads()`` threads (only when it changed, one C call)."""
    global _threads_applied
    if _threads_explicit:
        return
    torch = sys.modules.get("torch")
    if torch is None:
        return
    n = int(torch.get_num_threads())
    if n != _threads_applied:
        _check(_get().fep_set_num_threads(n))
        _threads_applied = n


class cpu_reference:
    """Context manager: inside it, CPU tensors run through the f64 reference
    (``FEP_DEVICE_CPU_REFERENCE``), the oracle the fast CPU path is tested against, instead of
    the fast f32 path. Slower by design; for checking results, not for speed.

    Example::

        import torch, fep_kernels as fk
        q, k, v = torch.randn(3, 1, 2, 8, 16)
        fast = fk.attention(q, k, v)
        with fk.cpu_reference():
            oracle = fk.attention(q, k, v)
        assert torch.allclose(fast, oracle, atol=1e-5)
    """

    def __enter__(self) -> "cpu_reference":
        global _reference_depth
        _reference_depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        global _reference_depth
        _reference_depth -= 1


def _cpu_kind() -> int:
    """The device kind CPU tensors use now: the fast path, or the reference inside
    :class:`cpu_reference`."""
    _sync_threads()
    return FEP_DEVICE_CPU_REFERENCE if _reference_depth > 0 else FEP_DEVICE_CPU
