"""ctypes bindings for the fep-kernels C ABI (the library's C header ``fep_kernels.h``), on
PyTorch tensors, with ``torch.library`` custom ops and PyTorch modules on top.

The shared library is found, in order, at the path given to :func:`load`, at ``$FEP_KERNELS_LIB``,
next to this package (a library bundled in ``fep_kernels/``), or at
``target/release/libfep_kernels.so`` (``.dylib`` on macOS) of the fep-kernels source checkout
this package is used from (a checkout or ``pip install -e``; build it with
``cargo build --release --lib``, adding the ``cuda`` or ``rocm`` feature for a GPU).
:func:`load` is called implicitly by the first function that needs the library;
``import fep_kernels`` itself needs neither the library nor PyTorch.

Layout, by framework: ``_lib`` (loading, queries) and ``_abi`` (the header's constants, structs
and signatures) below everything; the ctypes layer, one module per op on PyTorch tensors
(``lca``, ``settle``, ``vmp``, and the ``attention`` functions, reachable as
``fep_kernels.attention_forward`` etc.; the name ``fep_kernels.attention`` itself is the
differentiable PyTorch function below); ``fep_kernels.torch`` (``torch.library`` custom ops with
fake implementations and autograd: ``torch.ops``'s ``fep::attention_*``, ``fep::settle_*``,
``fep::lca_solve``, and the modules ``fep_kernels.torch.nn``: ``PCNetwork``, a predictive-coding
network with learnable precisions, ``LCALayer``, ``PrecisionAttention``), imported when PyTorch
is; and ``fep_kernels.jax`` (the ops as XLA FFI calls under ``jax.jit``, ``grad`` and ``vmap``;
needs JAX, imported explicitly). The earlier paths ``fep_kernels.torch_ops``, ``torch_settle``,
``torch_lca`` and ``fep_kernels.nn`` still work (the same module objects).

Tensors are passed by pointer (``tensor.data_ptr()``), so they must be contiguous and live on
the device the call names. CPU tensors use ``FEP_DEVICE_CPU``, the fast f32 path (threads:
:func:`set_num_threads`, which by default follows ``torch.get_num_threads()``), or inside
``with fep_kernels.cpu_reference():`` the f64 reference it is tested against; CUDA tensors use
``FEP_DEVICE_CUDA`` (``FEP_DEVICE_HIP`` under a ROCm build of PyTorch) with the tensor's device
index as the ordinal and PyTorch's *current stream* of that device as the raw stream: work is
enqueued on it and the call returns without synchronising, exactly like a PyTorch op, so results
may be used by later PyTorch work on the same stream without any extra synchronisation. Outputs
are allocated with ``torch.empty`` on the inputs' device (for CUDA, from PyTorch's caching
allocator, which orders reuse on the current stream).

Every failing call raises :class:`FepError` with the status and ``fep_last_error()`` (the
library's names of arguments and flat element indices translated to the Python argument and a
multi-index where the binding knows them: "precision_key[0, 1, 3] is -1"); tensors that are
empty, not contiguous, of the wrong dtype, device or shape, or outputs that share memory with
each other or with an input raise :class:`ValueError` before the library is called, on every
call (tensors an object keeps, such as a :class:`SettleNet`'s weights, are re-checked each time);
an integer or real parameter of the wrong kind (a bool, a float where an int is needed, a str)
raises :class:`ArgumentTypeError`, both a TypeError and a ValueError.

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

Predictive-coding settling of a 784-128-10 network, on the same device. Layer l predicts
mu_l = W_l f_l(x_{l-1}) + b_l from the layer below, with error eps_l = x_l - mu_l and precision
Pi_l; settling moves the free layers down the energy E = 1/2 sum_l eps_l^T Pi_l eps_l (per
sample) by gradient descent with x_0 clamped to the input, and x_L clamped to the target when
learning (free when inferring); learning then follows the local gradients at the settled state,
dE/dW_l = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T::

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

import sys as _sys
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

from . import _lib
from ._abi import *  # noqa: F401,F403  (the FEP_* constants and FepError)
from ._abi import FEP_SCORE_DOT, FEP_SCORE_GAUSSIAN, FEP_SCORE_LAPLACE, FEP_SCORE_STUDENT_T
from ._lib import (abi_version, cpu_reference, device_count, device_name, get_num_threads,
                   last_error, load, set_num_threads, version)
from ._tensors import ArgumentTypeError
from .attention import (attention_backward, attention_forward, attention_merge,
                        attention_probabilities)
from .lca import LcaDictionary
from .settle import SettleNet, max_stable_eta, settle_infer, settle_learn
from .vmp import VmpModel, construct_policies

if TYPE_CHECKING:  # PyTorch is imported lazily: ``import fep_kernels`` works without it
    from torch import Tensor

__version__ = "0.1.0"

__all__ = [
    "FepError",
    "ArgumentTypeError",
    "LcaDictionary",
    "SettleNet",
    "max_stable_eta",
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
    "set_num_threads",
    "get_num_threads",
    "cpu_reference",
    "FEP_ABI_VERSION",
    "FEP_OK",
    "FEP_ERR_INVALID_ARGUMENT",
    "FEP_ERR_NO_DEVICE",
    "FEP_ERR_DRIVER",
    "FEP_ERR_OUT_OF_MEMORY",
    "FEP_ERR_UNSUPPORTED",
    "FEP_ERR_INTERNAL",
    "FEP_ERR_DIVERGED",
    "FEP_DEVICE_CPU",
    "FEP_DEVICE_CUDA",
    "FEP_DEVICE_HIP",
    "FEP_DEVICE_CPU_REFERENCE",
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
__all__ += [
    "attention",
    "settle_energy",
    "settle_infer_op",
    "lca_solve",
    "attention_forward",
    "attention_backward",
    "attention_merge",
    "attention_probabilities",
    "FEP_SCORE_DOT",
    "FEP_SCORE_GAUSSIAN",
    "FEP_SCORE_STUDENT_T",
    "FEP_SCORE_LAPLACE",
]
if "DivergedError" in globals():  # a diverging settle (a FepError)
    __all__.append("DivergedError")


def attention(q: "Tensor", k: "Tensor", v: "Tensor", precision_key: Optional["Tensor"] = None,
              precision_head: Optional["Tensor"] = None, score: str = "dot", nu: float = 5.0,
              scale: Optional[float] = None, causal: bool = False, window: Optional[int] = None,
              normalizer: bool = True, kv_len: Optional["Tensor"] = None, layout: str = "bhld",
              *, bias: Optional["Tensor"] = None, attn_mask: Optional["Tensor"] = None
              ) -> "Tensor":
    """Differentiable precision-weighted attention on PyTorch tensors: returns ``o``.

    With precisions pi_ij = ``precision_head``[h] * ``precision_key``[b, h_kv, j] (float32,
    > 0, optional) and d2 = |q_i - k_j|^2, the scores are tau pi q.k ("dot"), -tau pi d2 / 2
    ("gaussian"), -((nu + D)/2) ln(1 + tau pi d2 / nu) ("student_t") or -sqrt(tau pi d2)
    ("laplace"), the last three plus (D/2) ln pi with ``normalizer``; o_i = sum_j
    softmax_j(s_ij) v_j. Gradients flow to q, k, v, ``precision_key`` [B, Hkv, Lk] and
    ``precision_head`` [Hq], a tensor ``nu`` (per head) and an additive ``bias`` (broadcast to
    [B, Hq, Lq, Lk]); ``attn_mask`` (bool, True = keep) removes scores. Full description:
    :func:`fep_kernels.torch_ops.attention_with_stats`. Needs PyTorch; works under
    ``torch.compile`` and ``torch.autocast``."""
    from .torch_ops import attention as _attention

    return _attention(q, k, v, precision_key=precision_key, precision_head=precision_head,
                      score=score, nu=nu, scale=scale, causal=causal, window=window,
                      normalizer=normalizer, kv_len=kv_len, layout=layout, bias=bias,
                      attn_mask=attn_mask)


def settle_energy(weights: Sequence["Tensor"], x0: "Tensor", target: "Tensor",
                  biases: Optional[Sequence[Optional["Tensor"]]] = None,
                  activations: Any = "identity", precisions: Any = None, *, eta: float,
                  steps: int, momentum: float = 0.0, tol: float = 0.0, check: bool = True,
                  log_det: bool = False, allow_tf32: bool = False,
                  init: Optional[Sequence["Tensor"]] = None) -> "Tensor":
    """The settled (free) energy of a predictive-coding learning step, averaged over the batch
    (a 0-d float32 tensor), differentiable w.r.t. the weights, biases and precision tensors.

    Layers x_0 ... x_L: layer l predicts mu_l = W_l f_l(x_{l-1}) + b_l (``weights[l-1]`` W_l
    [n_l, n_{l-1}], ``biases``, ``activations`` f_l) with error eps_l = x_l - mu_l and precision
    Pi_l (``precisions``: a number, or per layer a number or a precision tensor). x_0 is clamped
    to ``x0`` [B, n_0] and x_L to ``target`` [B, n_L]; the free layers settle by ``steps``
    gradient steps of size ``eta`` (with ``momentum``; ``tol`` > 0 stops early) on
    E = 1/2 sum_l eps_l^T Pi_l eps_l (with ``log_det``, the free energy
    F = 1/2 sum_l (eps_l^T Pi_l eps_l - ln|Pi_l|)). Backward gives the gradients at the settled
    state (envelope theorem): dE/dW_l = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T and likewise
    for the biases and precisions. Full description:
    :func:`fep_kernels.torch_settle.settle_energy`. Needs PyTorch; works under
    ``torch.compile``."""
    from .torch_settle import settle_energy as _settle_energy

    return _settle_energy(weights, x0, target, biases=biases, activations=activations,
                          precisions=precisions, eta=eta, steps=steps, momentum=momentum,
                          tol=tol, check=check, log_det=log_det, allow_tf32=allow_tf32, init=init)


def settle_infer_op(weights: Sequence["Tensor"], x0: "Tensor",
                    biases: Optional[Sequence[Optional["Tensor"]]] = None,
                    activations: Any = "identity", precisions: Any = None, *, eta: float,
                    steps: int, momentum: float = 0.0, tol: float = 0.0, check: bool = True,
                    log_det: bool = False, allow_tf32: bool = False,
                    init: Optional[Sequence["Tensor"]] = None
                    ) -> Tuple[List["Tensor"], List["Tensor"], "Tensor"]:
    """Predictive-coding inference: settles ``x0`` [B, n_0] with the top layer free and returns
    ``(x, eps, energy)``: the settled x_1 ... x_L and their errors eps_l = x_l - mu_l (lists of
    L float32 [B, n_l]) and the settled energy per sample [B]. Arguments as for
    :func:`settle_energy` (no target). Not differentiable. Full description:
    :func:`fep_kernels.torch_settle.settle_infer_op`. Needs PyTorch; works under
    ``torch.compile``."""
    from .torch_settle import settle_infer_op as _settle_infer_op

    return _settle_infer_op(weights, x0, biases=biases, activations=activations,
                            precisions=precisions, eta=eta, steps=steps, momentum=momentum,
                            tol=tol, check=check, log_det=log_det, allow_tf32=allow_tf32, init=init)


def lca_solve(phi: "Tensor", x: "Tensor", lam: float, eta: Optional[float] = None,
              steps: int = 100, threshold: str = "soft", tol: float = 0.0,
              u0: Optional["Tensor"] = None, check_unit_norm: bool = True,
              tol_mode: str = "absolute", allow_tf32: bool = False) -> Any:
    """Sparse coding by the locally competitive algorithm (LCA) on the rows of ``x`` [B, n]
    against the dictionary ``phi`` [n, m] (unit-norm columns) through ``fep::lca_solve``.

    Each of ``steps`` steps: u <- u + eta (phi^T x - u - (phi^T phi - I) a), a = theta_lam(u),
    from u = 0 (or ``u0``), with the threshold theta "soft" (sign(u) max(|u| - lam, 0): the
    fixed point minimises 1/2 |x - phi a|^2 + lam |a|_1), "soft_nonneg", "hard" or
    "hard_nonneg". ``eta`` None (the default): 1 / lambda_max(phi^T phi), computed once per
    call. ``tol`` > 0 stops a sample once max|du| < tol (``tol_mode="absolute"``) or
    < tol * max|phi^T x| (``"relative"``, independent of the input's scale). ``allow_tf32``:
    permission only (LCA runs float32 arithmetic). Returns ``(u, a, steps)`` ([B, m] float32
    twice, the steps run [B] int32); not differentiable. Full description:
    :func:`fep_kernels.torch_lca.lca_solve`. Needs PyTorch; works under ``torch.compile``."""
    from .torch_lca import lca_solve as _lca_solve

    return _lca_solve(phi, x, lam, eta, steps, threshold=threshold, tol=tol, u0=u0,
                      check_unit_norm=check_unit_norm, tol_mode=tol_mode, allow_tf32=allow_tf32)


_TORCH_MODULES = ("torch_ops", "torch_settle", "torch_lca", "nn")


def __getattr__(name: str) -> Any:
    # the loaded library's path and handle live in fep_kernels._lib (the loader module)
    if name == "_lib_path":
        return _lib._lib_path
    if name in _TORCH_MODULES:
        import importlib

        return importlib.import_module("." + name, __name__)
    if name in ("attention_with_stats", "attention_varlen"):  # PyTorch functions, lazily
        from . import torch_ops

        return getattr(torch_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if "torch" in _sys.modules:  # PyTorch already imported: register the fep:: ops now
    from .torch import lca as torch_lca  # noqa: E402
    from .torch import ops as torch_ops  # noqa: E402
    from .torch import settle as torch_settle  # noqa: E402

    attention = torch_ops.attention  # noqa: F811
    attention_with_stats = torch_ops.attention_with_stats
    attention_varlen = torch_ops.attention_varlen
    settle_energy = torch_settle.settle_energy  # noqa: F811
    settle_infer_op = torch_settle.settle_infer_op  # noqa: F811
    lca_solve = torch_lca.lca_solve  # noqa: F811
