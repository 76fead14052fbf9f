"""PyTorch integration: the attention kernels as ``torch.library`` custom ops, with fake (meta)
implementations so ``torch.compile`` traces them and autograd so :func:`attention` is
differentiable.

Imported by ``fep_kernels`` when PyTorch is (``import torch`` before ``import fep_kernels``, or on
the first call of :func:`fep_kernels.attention`); importing it registers

- ``torch.ops.fep.attention_forward(q, k, v, pi_head, pi_key, kv_len, nu_head, bias, mask,
  cu_seqlens_q, cu_seqlens_k, score, nu, scale, causal, window, normalizer, layout,
  max_seqlen_q, max_seqlen_k) -> (o, lse, e)``: :func:`fep_kernels.attention_forward`;
- ``torch.ops.fep.attention_backward(q, k, v, o, lse, d_o, e, d_e, d_lse, pi_head, pi_key,
  kv_len, nu_head, bias, mask, cu_seqlens_q, cu_seqlens_k, score, nu, scale, causal, window,
  normalizer, layout, max_seqlen_q, max_seqlen_k) -> (dq, dk, dv, dpi_head, dpi_key, dnu,
  dbias)``: :func:`fep_kernels.attention_backward` (the precision gradients computed when a
  precision or a per-head nu is given, zeros otherwise; dbias is empty without a bias).

The forward op's autograd formula calls the backward op: gradients flow to q, k, v, pi_head,
pi_key, the per-head nu and the bias from o, lse and e (kv_len, the mask and the offsets get
none). The backward op itself has no autograd (no double backward).

Autocast: :func:`attention` and its siblings follow ``torch.autocast``: inside an autocast
region q, k and v are cast to the region's dtype (float16 or bfloat16), while precisions, nu
and the bias stay float32 (cast to it if they come in another dtype).

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
    rel = torch.zeros(1, 4, 8, 8, requires_grad=True)       # a learned relative bias per head
    nu = torch.full((4,), 4.0, requires_grad=True)          # a learned nu per head
    o, lse, e = fk.attention_with_stats(q, k, v, score="student_t", nu=nu, bias=rel)
    (o.sum() - lse.sum()).backward()                        # rel.grad, nu.grad, ... (lse too)
    f = torch.compile(lambda q, k, v: fk.attention(q, k, v, score="gaussian"), fullgraph=True)
"""

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .._abi import _SCORES
from .._tensors import _integer
from ._args import _DTYPES, _number

# The ops' pi_head / pi_key are fep_kernels.attention's precision_head / precision_key: errors
# (shapes, and the library's "element i is -1") name those.
_ARG_NAMES = {"pi_head": "precision_head", "pi_key": "precision_key"}
from ..attention import attention_backward as _attention_backward
from ..attention import attention_forward as _attention_forward

__all__ = ["attention", "attention_with_stats", "attention_varlen"]


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


def _validate_extras(q: Any, k: Any, layout: str, nu_head: Any, bias: Any, mask: Any,
                     cu_q: Any, cu_k: Any) -> None:
    """Kind, dtype and device checks of the optional score inputs (shapes: the library)."""
    hq = _bhld(q.shape, layout)[1] if cu_q is None else q.shape[1]
    for t, what, dts in ((nu_head, "nu", (torch.float32,)), (bias, "bias", (torch.float32,)),
                         (mask, "attn_mask", (torch.bool, torch.uint8)),
                         (cu_q, "cu_seqlens_q", (torch.int32,)),
                         (cu_k, "cu_seqlens_k", (torch.int32,))):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in dts:
            names = " or ".join(str(d).replace("torch.", "") for d in dts)
            raise ValueError(f"{what}: dtype {t.dtype} is not supported ({names})")
        if t.device != q.device:
            raise ValueError(f"{what}: on {t.device}, expected {q.device} (q's device)")
    if nu_head is not None and list(nu_head.shape) != [hq]:
        raise ValueError(f"nu: expected shape [{hq}] (one per query head), got "
                         f"{list(nu_head.shape)}")
    if (cu_q is None) != (cu_k is None):
        raise ValueError("cu_seqlens_q, cu_seqlens_k: give both or neither")


def _validate_all(q, k, v, pi_head, pi_key, kv_len, nu_head, bias, mask, cu_q, cu_k, score,
                  layout):
    """:func:`_validate` on 4-d views (packed 3-d tensors as [1, total, H, D]), then the extras."""
    if cu_q is not None:
        for t, what in ((q, "q"), (k, "k"), (v, "v")):
            if not isinstance(t, Tensor) or t.dim() != 3:
                got = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"{what}: packed sequences take a 3-d [total, H, D] tensor, "
                                 f"got {got}")
        _validate(q[None], k[None], v[None], pi_head, pi_key, kv_len, score, "blhd")
    else:
        _validate(q, k, v, pi_head, pi_key, kv_len, score, layout)
    _validate_extras(q, k, layout, nu_head, bias, mask, cu_q, cu_k)


def _fwd_kwargs(nu_head, bias, mask, cu_q, cu_k, max_q, max_k):
    """The optional score inputs as keyword arguments of the library calls."""
    return dict(bias=bias, attn_mask=mask, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                max_seqlen_q=max_q if cu_q is not None else None,
                max_seqlen_k=max_k if cu_q is not None else None)


@torch.library.custom_op("fep::attention_forward", mutates_args=())
def attention_forward_op(q: Tensor, k: Tensor, v: Tensor, pi_head: Optional[Tensor],
                         pi_key: Optional[Tensor], kv_len: Optional[Tensor],
                         nu_head: Optional[Tensor], bias: Optional[Tensor],
                         mask: Optional[Tensor], cu_seqlens_q: Optional[Tensor],
                         cu_seqlens_k: Optional[Tensor], score: str, nu: float,
                         scale: Optional[float], causal: bool, window: Optional[int],
                         normalizer: bool, layout: str, max_seqlen_q: Optional[int],
                         max_seqlen_k: Optional[int]) -> Tuple[Tensor, Tensor, Tensor]:
    """``fep::attention_forward``: :func:`fep_kernels.attention_forward` (returns o, lse, e)."""
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731 (rows the library reads)
    o, lse, e = _attention_forward(
        q, k, v, score=score, nu=nu if nu_head is None else c(nu_head), scale=scale,
        causal=causal, window=window, normalizer=normalizer, pi_head=c(pi_head),
        pi_key=c(pi_key), kv_len=c(kv_len), layout=layout, _arg_names=_ARG_NAMES,
        **_fwd_kwargs(nu_head, bias, mask, c(cu_seqlens_q), c(cu_seqlens_k), max_seqlen_q,
                      max_seqlen_k))
    return o, lse, e


def _out_shapes(q, k, v, layout, packed):
    """(o's shape, lse's shape) of a forward call."""
    if packed:
        total, hq, _ = q.shape
        return (total, hq, v.shape[2]), (hq, total)
    b, hq, lq, _ = _bhld(q.shape, layout)
    dv = v.shape[3]
    return ((b, lq, hq, dv) if layout == "blhd" else (b, hq, lq, dv)), (b, hq, lq)


@attention_forward_op.register_fake
def _(q, k, v, pi_head, pi_key, kv_len, nu_head, bias, mask, cu_seqlens_q, cu_seqlens_k, score,
      nu, scale, causal, window, normalizer, layout, max_seqlen_q, max_seqlen_k):
    _validate_all(q, k, v, pi_head, pi_key, kv_len, nu_head, bias, mask, cu_seqlens_q,
                  cu_seqlens_k, score, layout)
    o_shape, rows = _out_shapes(q, k, v, layout, cu_seqlens_q is not None)
    return (q.new_empty(o_shape), q.new_empty(rows, dtype=torch.float32),
            q.new_empty(rows, dtype=torch.float32))


@torch.library.custom_op("fep::attention_backward", mutates_args=())
def attention_backward_op(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, d_o: Tensor,
                          e: Optional[Tensor], d_e: Optional[Tensor], d_lse: Optional[Tensor],
                          pi_head: Optional[Tensor], pi_key: Optional[Tensor],
                          kv_len: Optional[Tensor], nu_head: Optional[Tensor],
                          bias: Optional[Tensor], mask: Optional[Tensor],
                          cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                          score: str, nu: float, scale: Optional[float], causal: bool,
                          window: Optional[int], normalizer: bool, layout: str,
                          max_seqlen_q: Optional[int], max_seqlen_k: Optional[int]
                          ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``fep::attention_backward``: :func:`fep_kernels.attention_backward` (returns dq, dk, dv,
    dpi_head [Hq], dpi_key [B, Hkv, Lk], dnu ([] or [Hq] with a per-head nu) and dbias (the
    bias's 4-d shape; empty [0] without a bias)). The precision gradients are computed when
    ``pi_head``, ``pi_key`` or ``nu_head`` is given; without any of them they are zeros."""
    c = lambda t: None if t is None else t.contiguous()  # noqa: E731
    # The precision gradients cost the library extra work per score (~10-17% of a CPU
    # backward): asked for only when a precision or a per-head nu was given. Without one, the
    # three outputs are zeros of the schema's shapes (autograd drops them: no such input).
    wanted = pi_head is not None or pi_key is not None or nu_head is not None
    r = _attention_backward(
        q, k, v, o, c(lse), d_o, e=c(e), d_e=c(d_e), d_lse=c(d_lse), score=score,
        nu=nu if nu_head is None else c(nu_head), scale=scale, causal=causal, window=window,
        normalizer=normalizer, pi_head=c(pi_head), pi_key=c(pi_key), kv_len=c(kv_len),
        layout=layout, precision_grads=wanted, _arg_names=_ARG_NAMES,
        **_fwd_kwargs(nu_head, bias, mask, c(cu_seqlens_q), c(cu_seqlens_k), max_seqlen_q,
                      max_seqlen_k))
    dbias = r[6] if bias is not None else q.new_empty((0,), dtype=torch.float32)
    if not wanted:
        hq, (b, hkv, lk) = (q.shape[1], (1, k.shape[1], k.shape[0])) \
            if cu_seqlens_q is not None else (_bhld(q.shape, layout)[1],
                                              _bhld(k.shape, layout)[:3])
        f32 = dict(dtype=torch.float32)
        return (*r[:3], q.new_zeros((hq,), **f32), q.new_zeros((b, hkv, lk), **f32),
                q.new_zeros((), **f32), dbias)
    return (*r[:6], dbias)


@attention_backward_op.register_fake
def _(q, k, v, o, lse, d_o, e, d_e, d_lse, pi_head, pi_key, kv_len, nu_head, bias, mask,
      cu_seqlens_q, cu_seqlens_k, score, nu, scale, causal, window, normalizer, layout,
      max_seqlen_q, max_seqlen_k):
    _validate_all(q, k, v, pi_head, pi_key, kv_len, nu_head, bias, mask, cu_seqlens_q,
                  cu_seqlens_k, score, layout)
    if cu_seqlens_q is not None:
        hq, (_, hkv, _), b, lk = q.shape[1], k.shape, 1, k.shape[0]
    else:
        b, hq, _, _ = _bhld(q.shape, layout)
        _, hkv, lk, _ = _bhld(k.shape, layout)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    f32 = dict(dtype=torch.float32)
    dnu = q.new_empty((hq,) if nu_head is not None else (), **f32)
    dbias = q.new_empty(tuple(bias.shape) if bias is not None else (0,), **f32)
    return (*grads, q.new_empty((hq,), **f32), q.new_empty((b, hkv, lk), **f32), dnu, dbias)


_FWD_ARGS = ("q", "k", "v", "pi_head", "pi_key", "kv_len", "nu_head", "bias", "mask",
             "cu_seqlens_q", "cu_seqlens_k", "score", "nu", "scale", "causal", "window",
             "normalizer", "layout", "max_seqlen_q", "max_seqlen_k")


def _setup_context(ctx, inputs, output):
    a = dict(zip(_FWD_ARGS, inputs))
    o, lse, e = output
    ctx.save_for_backward(a["q"], a["k"], a["v"], a["pi_head"], a["pi_key"], a["kv_len"],
                          a["nu_head"], a["bias"], a["mask"], a["cu_seqlens_q"],
                          a["cu_seqlens_k"], o, lse, e)
    ctx.params = tuple(a[n] for n in ("score", "nu", "scale", "causal", "window", "normalizer",
                                      "layout", "max_seqlen_q", "max_seqlen_k"))


def _backward(ctx, d_o, d_lse, d_e):
    q, k, v, pi_head, pi_key, kv_len, nu_head, bias, mask, cu_q, cu_k, o, lse, e = \
        ctx.saved_tensors
    score, nu, scale, causal, window, normalizer, layout, max_q, max_k = ctx.params
    # grads arrive with any strides (a sum's is expanded, stride 0): the library needs a
    # contiguous last dimension for d_o and contiguous rows for d_e and d_lse
    d_o = torch.zeros_like(o) if d_o is None else d_o.contiguous()
    d_e = None if d_e is None else d_e.contiguous()
    d_lse = None if d_lse is None else d_lse.contiguous()
    dq, dk, dv, dpi_head, dpi_key, dnu, dbias = torch.ops.fep.attention_backward(
        q, k, v, o, lse, d_o, e if d_e is not None else None, d_e, d_lse, pi_head, pi_key,
        kv_len, nu_head, bias, mask, cu_q, cu_k, score, nu, scale, causal, window, normalizer,
        layout, max_q, max_k)
    keep = lambda t, g: g if t is not None else None  # noqa: E731
    return (dq, dk, dv, keep(pi_head, dpi_head), keep(pi_key, dpi_key), None,
            keep(nu_head, dnu), keep(bias, dbias), None, None, None, None, None, None, None,
            None, None, None, None, None)


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_dtype(q: Any) -> Optional[torch.dtype]:
    """The dtype of the autocast region active on q's device (float16 or bfloat16: the kernels'
    16-bit inputs), or None outside one."""
    if not isinstance(q, Tensor):
        return None  # _validate names the argument that is not a tensor
    dev = q.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        if dt in (torch.float16, torch.bfloat16):
            return dt
    return None


def _autocast(q: Any, k: Any, v: Any, *f32: Any) -> Tuple[Any, ...]:
    """Inside an autocast region: q, k, v cast to its dtype and the ``f32`` tensors (precisions,
    nu, the bias) to float32, whatever dtype autocast gave them. Outside one: everything as it
    is (a wrong dtype is then an error naming the argument)."""
    dt = _autocast_dtype(q)
    if dt is None:
        return (q, k, v, *f32)
    cast = lambda t, d: t.to(d) if isinstance(t, Tensor) and t.is_floating_point() else t  # noqa: E731
    return (cast(q, dt), cast(k, dt), cast(v, dt), *(cast(t, torch.float32) for t in f32))


def _bias4(bias: Optional[Tensor], full: Sequence[int], what: str) -> Optional[Tensor]:
    """A bias or mask as the 4-d tensor the op takes ([B | 1, Hq | 1, Lq | 1, Lk]), through
    differentiable views: fewer dims padded on the left with 1s, a key dimension of 1 expanded
    (autograd then sums dbias back to the caller's shape)."""
    if bias is None:
        return None
    if not isinstance(bias, Tensor):
        raise TypeError(f"{what}: expected a torch.Tensor or None, got {type(bias).__name__}")
    if not 1 <= bias.dim() <= 4:
        raise ValueError(f"{what}: expected 1 to 4 dims broadcastable to {list(full)}, got "
                         f"shape {list(bias.shape)}")
    x = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
    if any(n not in (1, f) for n, f in zip(x.shape, full)):
        raise ValueError(f"{what}: shape {list(bias.shape)} does not broadcast to the scores "
                         f"[B, Hq, Lq, Lk] = {list(full)} (each of B, Hq, Lq full or 1)")
    if x.shape[3] != full[3]:
        x = x.expand(*x.shape[:3], full[3])
    return x


def _nu_args(nu: Any, hq: int) -> Tuple[float, Optional[Tensor]]:
    """(the op's float nu, its per-head nu tensor or None): a tensor nu of shape [], [1] or [Hq]
    becomes [Hq] float32 (a shared learnable nu through expand); a number stays a number."""
    if isinstance(nu, Tensor):
        t = nu
        if t.dim() == 0 or list(t.shape) == [1]:
            t = t.reshape(1).expand(hq)
        return 1.0, t
    return _number(nu, "nu"), None


def attention_with_stats(q: Tensor, k: Tensor, v: Tensor, precision_key: Optional[Tensor] = None,
                         precision_head: Optional[Tensor] = None, score: str = "dot",
                         nu: Any = 5.0, scale: Optional[float] = None, causal: bool = False,
                         window: Optional[int] = None, normalizer: bool = True,
                         kv_len: Optional[Tensor] = None, layout: str = "bhld", *,
                         bias: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None
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

    the last three plus (D/2) ln pi with ``normalizer``, then plus ``bias``[b, h, i, j] (float32,
    broadcastable to [B, Hq, Lq, Lk] with 1 to 4 dims: e.g. [Lq, Lk], [Hq, Lq, Lk],
    [B, 1, 1, Lk]; -inf masks). ``attn_mask`` (bool, same broadcasting; True = keep, as SDPA's)
    removes scores. o_i = sum_j softmax_j(s_ij) v_j (q's dtype and layout), lse_i = ln sum_j
    exp(s_ij) and e_i = sum_j w_ij pi_ij d2_ij ([B, Hq, Lq] float32) over the visible keys
    (``causal``, bottom-right aligned; a sliding ``window``; ``kv_len`` [B] int32 key lengths;
    the mask); a row with none gives o = 0, lse = -inf, e = 0.

    ``nu`` (Student-t) is a number, or a tensor of shape [], [1] or [Hq] (per query head),
    learnable. o, lse and e are all differentiable, w.r.t. q, k, v, ``precision_key`` [B, Hkv,
    Lk], ``precision_head`` [Hq], a tensor ``nu`` and ``bias`` (deterministic gradients: the
    bias's broadcast dimensions are summed in a fixed order, without atomics); ``kv_len`` and
    ``attn_mask`` get none. Under ``torch.autocast`` q, k, v are cast to its dtype and the
    precisions, nu and bias kept in float32. Works under ``torch.compile(fullgraph=True)``.
    Argument errors raise TypeError (not a tensor or number) or ValueError (dtype, device,
    shape, unknown score/layout) before the library is called."""
    q, k, v, precision_key, precision_head, bias, nu = _autocast(
        q, k, v, precision_key, precision_head, bias, nu)
    _validate(q, k, v, precision_head, precision_key, kv_len, score, layout)
    b, hq, lq, _ = _bhld(q.shape, layout)
    lk = _bhld(k.shape, layout)[2]
    nu_f, nu_head = _nu_args(nu, hq)
    bias = _bias4(bias, (b, hq, lq, lk), "bias")
    mask = _bias4(attn_mask, (b, hq, lq, lk), "attn_mask")
    scale, window = _scale_window(scale, window)
    return torch.ops.fep.attention_forward(q, k, v, precision_head, precision_key, kv_len,
                                           nu_head, bias, mask, None, None, score, nu_f, scale,
                                           bool(causal), window, bool(normalizer), layout, None,
                                           None)


def _scale_window(scale: Any, window: Any) -> Tuple[Optional[float], Optional[int]]:
    """``scale`` and ``window`` checked (TypeError / ValueError naming them)."""
    scale = None if scale is None else _number(scale, "scale")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale: must be > 0 (None for the default), got {scale}")
    if window is not None:
        window = _integer(window, "window", 1, 2**31 - 1)
    return scale, window


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                     precision_key: Optional[Tensor] = None,
                     precision_head: Optional[Tensor] = None, score: str = "dot",
                     nu: Any = 5.0, scale: Optional[float] = None, causal: bool = False,
                     window: Optional[int] = None, normalizer: bool = True,
                     return_stats: bool = False) -> Any:
    """Differentiable attention over packed variable-length sequences (FlashAttention's varlen
    convention): ``q`` [total_q, Hq, D], ``k`` [total_k, Hkv, D], ``v`` [total_k, Hkv, Dv];
    sequence s is rows ``cu_seqlens_q[s]:cu_seqlens_q[s+1]`` of q and
    ``cu_seqlens_k[s]:cu_seqlens_k[s+1]`` of k and v (int32 [S + 1], from 0, nondecreasing;
    ``max_seqlen_q``/``_k`` bound the lengths) and attends only within itself; ``causal`` and
    ``window`` apply per sequence (bottom-right aligned to its own lengths). ``precision_key``
    is [1, Hkv, total_k]. The scores are :func:`attention_with_stats`'s. Returns o [total_q, Hq,
    Dv], or ``(o, lse, e)`` with lse and e [Hq, total_q] when ``return_stats``; differentiable
    like :func:`attention_with_stats` (no bias or mask here).

    Example::

        cu = torch.tensor([0, 5, 12], dtype=torch.int32)      # two sequences: 5 and 7 tokens
        q, k, v = (torch.randn(12, 4, 32, requires_grad=True) for _ in range(3))
        o = fk.attention_varlen(q, k, v, cu, cu, 7, 7, causal=True)   # [12, 4, 32]
    """
    q, k, v, precision_key, precision_head, nu = _autocast(q, k, v, precision_key,
                                                          precision_head, nu)
    for t, what in ((cu_seqlens_q, "cu_seqlens_q"), (cu_seqlens_k, "cu_seqlens_k")):
        if not isinstance(t, Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    _validate_all(q, k, v, precision_head, precision_key, None, None, None, None, cu_seqlens_q,
                  cu_seqlens_k, score, "blhd")
    nu_f, nu_head = _nu_args(nu, q.shape[1])
    scale, window = _scale_window(scale, window)
    max_q = _integer(max_seqlen_q, "max_seqlen_q", 1, 2**31 - 1)
    max_k = _integer(max_seqlen_k, "max_seqlen_k", 1, 2**31 - 1)
    r = torch.ops.fep.attention_forward(q, k, v, precision_head, precision_key, None, nu_head,
                                        None, None, cu_seqlens_q, cu_seqlens_k, score, nu_f,
                                        scale, bool(causal), window, bool(normalizer), "blhd",
                                        max_q, max_k)
    return r if return_stats else r[0]


def attention(q: Tensor, k: Tensor, v: Tensor, precision_key: Optional[Tensor] = None,
              precision_head: Optional[Tensor] = None, score: str = "dot", nu: Any = 5.0,
              scale: Optional[float] = None, causal: bool = False, window: Optional[int] = None,
              normalizer: bool = True, kv_len: Optional[Tensor] = None, layout: str = "bhld", *,
              bias: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
    """Differentiable precision-weighted attention: the output ``o`` of
    :func:`attention_with_stats` (same arguments: scores "dot", "gaussian", "student_t",
    "laplace" with precisions per key and per head, a learnable nu per head, an additive
    ``bias`` and a boolean ``attn_mask`` broadcast to the scores, causal/window/length masks,
    grouped-query heads, "bhld" or "blhd" layouts). Gradients flow to q, k, v,
    ``precision_key``, ``precision_head``, a tensor ``nu`` and ``bias``. Works under
    ``torch.compile(fullgraph=True)`` and ``torch.autocast``.

    Example::

        q, k, v = (torch.randn(2, 4, 8, 32, requires_grad=True) for _ in range(3))
        o = fep_kernels.attention(q, k, v, score="gaussian", causal=True)   # [2, 4, 8, 32]
        o.sum().backward()
    """
    return attention_with_stats(q, k, v, precision_key=precision_key,
                                precision_head=precision_head, score=score, nu=nu, scale=scale,
                                causal=causal, window=window, normalizer=normalizer,
                                kv_len=kv_len, layout=layout, bias=bias,
                                attn_mask=attn_mask)[0]
