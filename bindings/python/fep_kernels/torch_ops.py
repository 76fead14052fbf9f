"""PyTorch integration: the attention kernels as ``torch.library`` custom ops, with fake (meta)
implementations so ``torch.compile`` traces them and autograd so :func:`attention` is
differentiable.

Imported by ``fep_kernels`` when PyTorch is (``import torch`` before ``import fep_kernels``, or on
the first call of :func:`fep_kernels.attention`); importing it registers

- ``torch.ops.fep.attention_forward(q, k, v, pi_head, pi_key, kv_len, score, nu, scale, causal,
  window, normalizer, layout) -> (o, lse, e)``: :func:`fep_kernels.attention_forward`;
- ``torch.ops.fep.attention_backward(q, k, v, o, lse, d_o, e, d_e, pi_head, pi_key, kv_len,
  score, nu, scale, causal, window, normalizer, layout) -> (dq, dk, dv, dpi_head, dpi_key, dnu)``:
  :func:`fep_kernels.attention_backward` (precision gradients always on).

The forward op's autograd formula calls the backward op: gradients flow to q, k, v, pi_head
and pi_key from o and e (lse is not differentiable: the C ABI's backward takes no d_lse; kv_len
and nu get none). The backward op itself has no autograd (no double backward).

The library computes in float32/float16/bfloat16 only (CPU tensors run a float64 reference on
float32 inputs and round the result), so float64 tensors raise ``ValueError``; check gradients in
float32 with a loose tolerance, or against a float64 PyTorch reference of the same maths.

Example::

    import torch
    import fep_kernels as fk

    q, k, v = (torch.randn(2, 4, 8, 32, requires_grad=True) for _ in range(3))
    pk = torch.ones(2, 4, 8, requires_grad=True)           # learned per-key precision
    o = fk.attention(q, k, v, precision_key=pk, score="student_t", nu=4.0, causal=True)
    o.square().sum().backward()                             # q.grad, k.grad, v.grad, pk.grad
    f = torch.compile(lambda q, k, v: fk.attention(q, k, v, score="gaussian"), fullgraph=True)
"""

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._abi import _SCORES
from ._tensors import _integer
from ._torch_args import _DTYPES, _number

# The ops' pi_head / pi_key are fep_kernels.attention's precision_head / precision_key: errors
# (shapes, and the library's "element i is -1") name those.
_ARG_NAMES = {"pi_head": "precision_head", "pi_key": "precision_key"}
from .attention import attention_backward as _attention_backward
from .attention import attention_forward as _attention_forward

__all__ = ["attention", "attention_with_stats"]


def _bhld(shape: Sequence[int], layout: str) -> Tuple[int, int, int, int]:
    """[B, H, L, D] of a 4-d shape given in ``layout``."""
    b, x, y, d = shape
    return (b, y, x, d) if layout == "blhd" else (b, x, y, d)


def _validate(q: Any, k: Any, v: Any, pi_head: Any, pi_key: Any, kv_len: Any, score: str,
              layout: str) -> None:
    """Shape/dtype/device checks that need no data (they run on fake tensors too): TypeError for
    a non-tensor, ValueError for a wrong dtype, device, rank or shape. The library checks the
    rest (values, head dims it supports)."""
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout: {layout!r} is not 'bhld' or 'blhd'")
    if score not in _SCORES:
        raise ValueError(f"score: {score!r} is not one of {list(_SCORES)}")
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{what}: expected a 4-d tensor ({layout}), got shape {list(t.shape)}")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q: dtype {q.dtype} is not supported (float32, float16 or bfloat16)")
    for t, what in ((k, "k"), (v, "v")):
        if t.dtype != q.dtype:
            raise ValueError(f"{what}: dtype {t.dtype} differs from q's {q.dtype}")
        if t.device != q.device:
            raise ValueError(f"{what}: on {t.device}, expected {q.device} (q's device)")
    b, hq, lq, dq = _bhld(q.shape, layout)
    bk, hkv, lk, dk = _bhld(k.shape, layout)
    bv, hv, lv, _ = _bhld(v.shape, layout)
    if bk != b or bv != b or dk != dq or (hv, lv) != (hkv, lk) or hkv == 0 or hq % hkv:
        raise ValueError(f"q, k, v: shapes {list(q.shape)}, {list(k.shape)}, {list(v.shape)} "
                         f"({layout}) do not fit (same B, D of q and k, Hq % Hkv == 0, "
                         "k and v of one Lk and Hkv)")
    for t, what, shape, dt in ((pi_head, "precision_head", [hq], torch.float32),
                               (pi_key, "precision_key", [b, hkv, lk], torch.float32),
                               (kv_len, "kv_len", [b], torch.int32)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor or None, got {type(t).__name__}")
        if list(t.shape) != shape:
            raise ValueError(f"{what}: expected shape {shape}, got {list(t.shape)}")
        if t.dtype != dt:
            raise ValueError(f"{what}: expected dtype {dt}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{what}: on {t.device}, expected {q.device} (q's device)")


@torch.library.custom_op("fep::attention_forward", mutates_args=())
def attention_forward_op(q: Tensor, k: Tensor, v: Tensor, pi_head: Optional[Tensor],
                         pi_key: Optional[Tensor], kv_len: Optional[Tensor], score: str,
                         nu: float, scale: Optional[float], causal: bool, window: Optional[int],
                         normalizer: bool, layout: str) -> Tuple[Tensor, Tensor, Tensor]:
    """``fep::attention_forward``: :func:`fep_kernels.attention_forward` (returns o, lse, e)."""
    # the library reads the precisions as contiguous rows
    pi_head = None if pi_head is None else pi_head.contiguous()
    pi_key = None if pi_key is None else pi_key.contiguous()
    kv_len = None if kv_len is None else kv_len.contiguous()
    o, lse, e = _attention_forward(q, k, v, score=score, nu=nu, scale=scale, causal=causal,
                                   window=window, normalizer=normalizer, pi_head=pi_head,
                                   pi_key=pi_key, kv_len=kv_len, layout=layout,
                                   _arg_names=_ARG_NAMES)
    return o, lse, e


@attention_forward_op.register_fake
def _(q, k, v, pi_head, pi_key, kv_len, score, nu, scale, causal, window, normalizer, layout):
    _validate(q, k, v, pi_head, pi_key, kv_len, score, layout)
    b, hq, lq, _ = _bhld(q.shape, layout)
    dv = v.shape[3]
    o_shape = (b, lq, hq, dv) if layout == "blhd" else (b, hq, lq, dv)
    o = q.new_empty(o_shape)
    lse = q.new_empty((b, hq, lq), dtype=torch.float32)
    e = q.new_empty((b, hq, lq), dtype=torch.float32)
    return o, lse, e


@torch.library.custom_op("fep::attention_backward", mutates_args=())
def attention_backward_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, d_o: Tensor,
                          e: Optional[Tensor], d_e: Optional[Tensor], pi_head: Optional[Tensor],
                          pi_key: Optional[Tensor], kv_len: Optional[Tensor], score: str,
                          nu: float, scale: Optional[float], causal: bool,
                          window: Optional[int], normalizer: bool, layout: str
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fep::attention_backward``: :func:`fep_kernels.attention_backward` with the precision
    gradients (returns dq, dk, dv, dpi_head [Hq], dpi_key [B, Hkv, Lk], dnu [])."""
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    return _attention_backward(q, k, v, o, c(lse), d_o, e=c(e), d_e=c(d_e), score=score, nu=nu,
                               scale=scale, causal=causal, window=window, normalizer=normalizer,
                               pi_head=c(pi_head), pi_key=c(pi_key), kv_len=c(kv_len),
                               layout=layout, precision_grads=True, _arg_names=_ARG_NAMES)


@attention_backward_op.register_fake
def _(q, k, v, o, lse, d_o, e, d_e, pi_head, pi_key, kv_len, score, nu, scale, causal, window,
      normalizer, layout):
    _validate(q, k, v, pi_head, pi_key, kv_len, score, layout)
    b, hq, _, _ = _bhld(q.shape, layout)
    _, hkv, lk, _ = _bhld(k.shape, layout)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    f32 = dict(dtype=torch.float32)
    return (*grads, q.new_empty((hq,), **f32), q.new_empty((b, hkv, lk), **f32),
            q.new_empty((), **f32))


def _setup_context(ctx, inputs, output):
    q, k, v, pi_head, pi_key, kv_len, score, nu, scale, causal, window, normalizer, layout = inputs
    o, lse, e = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, pi_head, pi_key, kv_len, o, lse, e)
    ctx.params = (score, nu, scale, causal, window, normalizer, layout)


def _backward(ctx, d_o, d_lse, d_e):
    q, k, v, pi_head, pi_key, kv_len, o, lse, e = ctx.saved_tensors
    score, nu, scale, causal, window, normalizer, layout = ctx.params
    # grads arrive with any strides (a sum's is expanded, stride 0): the library needs a
    # contiguous last dimension for d_o and contiguous rows for d_e
    d_o = torch.zeros_like(o) if d_o is None else d_o.contiguous()
    d_e = None if d_e is None else d_e.contiguous()
    dq, dk, dv, dpi_head, dpi_key, _dnu = torch.ops.fep.attention_backward(
        q, k, v, o, lse, d_o, e if d_e is not None else None, d_e, pi_head, pi_key, kv_len,
        score, nu, scale, causal, window, normalizer, layout)
    return (dq, dk, dv, dpi_head if pi_head is not None else None,
            dpi_key if pi_key is not None else None, None, None, None, None, None, None, None,
            None)


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def attention_with_stats(q: Tensor, k: Tensor, v: Tensor, precision_key: Optional[Tensor] = None,
                         precision_head: Optional[Tensor] = None, score: str = "dot",
                         nu: float = 5.0, scale: Optional[float] = None, causal: bool = False,
                         window: Optional[int] = None, normalizer: bool = True,
                         kv_len: Optional[Tensor] = None, layout: str = "bhld"
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """Differentiable precision-weighted attention through the custom op
    ``fep::attention_forward``: returns ``(o, lse, e)``.

    ``q`` [B, Hq, Lq, D], ``k`` [B, Hkv, Lk, D], ``v`` [B, Hkv, Lk, Dv] (``layout="bhld"``; or
    [B, L, H, D] each with ``layout="blhd"``), float32/float16/bfloat16 on one device, Hq a
    multiple of Hkv (grouped-query attention). With pi_ij = ``precision_head``[h] *
    ``precision_key``[b, h_kv, j] (float32, > 0, each optional: 1 where absent), d2 = |q_i - k_j|^2
    and tau = ``scale`` (None: 1/sqrt(D) for "dot", else 1), the scores are

    - "dot": s = tau pi q.k;  "gaussian": s = -tau pi d2 / 2;
    - "student_t": s = -((nu + D)/2) ln(1 + tau pi d2 / nu);  "laplace": s = -sqrt(tau pi d2);

    the last three plus (D/2) ln pi with ``normalizer``. o_i = sum_j softmax_j(s_ij) v_j (q's
    dtype and layout), lse_i = ln sum_j exp(s_ij) and e_i = sum_j w_ij pi_ij d2_ij ([B, Hq, Lq]
    float32) over the visible keys (``causal``, bottom-right aligned; a sliding ``window``;
    ``kv_len`` [B] int32 key lengths); a row with none gives o = 0, lse = -inf, e = 0.

    o and e are differentiable w.r.t. q, k, v, ``precision_key`` [B, Hkv, Lk] and
    ``precision_head`` [Hq] (deterministic gradients); lse is not, nor are ``kv_len`` and ``nu``.
    Works under ``torch.compile(fullgraph=True)``. Argument errors raise TypeError (not a tensor
    or number) or ValueError (dtype, device, shape, unknown score/layout) before the library is
    called."""
    _validate(q, k, v, precision_head, precision_key, kv_len, score, layout)
    nu = _number(nu, "nu")
    scale = None if scale is None else _number(scale, "scale")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale: must be > 0 (None for the default), got {scale}")
    if window is not None:
        window = _integer(window, "window", 1, 2**31 - 1)
    return torch.ops.fep.attention_forward(q, k, v, precision_head, precision_key, kv_len, score,
                                           nu, scale, bool(causal), window, bool(normalizer),
                                           layout)


def attention(q: Tensor, k: Tensor, v: Tensor, precision_key: Optional[Tensor] = None,
              precision_head: Optional[Tensor] = None, score: str = "dot", nu: float = 5.0,
              scale: Optional[float] = None, causal: bool = False, window: Optional[int] = None,
              normalizer: bool = True, kv_len: Optional[Tensor] = None, layout: str = "bhld"
              ) -> Tensor:
    """Differentiable precision-weighted attention: the output ``o`` of
    :func:`attention_with_stats` (same arguments: scores "dot", "gaussian", "student_t",
    "laplace" with precisions per key and per head, causal/window/length masks, grouped-query
    heads, "bhld" or "blhd" layouts). Gradients flow to q, k, v, ``precision_key`` and
    ``precision_head``. Works under ``torch.compile(fullgraph=True)``.

    Example::

        q, k, v = (torch.randn(2, 4, 8, 32, requires_grad=True) for _ in range(3))
        o = fep_kernels.attention(q, k, v, score="gaussian", causal=True)   # [2, 4, 8, 32]
        o.sum().backward()
    """
    return attention_with_stats(q, k, v, precision_key=precision_key,
                                precision_head=precision_head, score=score, nu=nu, scale=scale,
                                causal=causal, window=window, normalizer=normalizer,
                                kv_len=kv_len, layout=layout)[0]
