"""Precision-weighted attention: :func:`attention_forward`, :func:`attention_backward`,
:func:`attention_merge`.

Attention in which every query-key pair carries a precision pi_ij = pi_head[h] * pi_key[b, h_kv, j]
(inverse variance, > 0) that scales its score: with d2 = |q_i - k_j|^2 and a scale tau, the
score s_ij is tau pi q.k ("dot"), -tau pi d2 / 2 ("gaussian"), -((nu + D)/2) ln(1 + tau pi d2 / nu)
("student_t") or -sqrt(tau pi d2) ("laplace"), the last three plus (D/2) ln pi (the normaliser
of the distribution, which matters when pi varies per key). The output is o_i = sum_j
softmax_j(s_ij) v_j, with lse_i = ln sum_j exp(s_ij) and the expected precision-weighted error
e_i = sum_j w_ij pi_ij d2_ij (the predictive-coding energy of the head) alongside.
"""

import ctypes
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple

from ._abi import (
    FEP_ERR_UNSUPPORTED,
    _FepAttentionParams,
    _FepAttnTensor,
    _SCORES,
    _declare_attention,
)
from ._lib import (
    _check,
    _get,
)
from ._tensors import (
    _check_tensor,
    _device_args,
    _dtype_code,
    _integer,
    _norm_device,
    _number,
    _ptr,
    _torch,
)


if TYPE_CHECKING:  # PyTorch is imported lazily: the module loads without it
    from torch import Tensor

_attn_declared = None


def _attn_lib() -> Any:
    """The library, with the attention functions declared."""
    global _attn_declared
    lib = _get()
    if _attn_declared is not lib:
        _declare_attention(lib)
        _attn_declared = lib
    return lib


def _attn_tensor(t: Any, what: str, layout: str) -> Tuple[Any, list]:
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
    if t.numel() == 0:
        raise ValueError(f"{what}: is empty (shape {list(t.shape)})")
    d = _FepAttnTensor()
    d.data = t.data_ptr()
    for i in range(4):
        d.shape[i] = shape[i]
    for i in range(3):
        d.strides[i] = st[i]
    return d, shape


def _attn_params(score: str, nu: Any, scale: Any, causal: bool, window: Any, normalizer: bool,
                 check: bool) -> Any:
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
    p.window = 0 if window is None else _integer(window, "window", 1, 2**31 - 1)
    p.normalizer = 1 if normalizer else 0
    p.skip_input_checks = 0 if check else 1
    return p


def _c_names(qs: Sequence[int], ks: Sequence[int],
             arg_names: Optional[Mapping[str, str]]) -> Dict[str, Tuple[str, Sequence[int]]]:
    """The library's names of the precisions and parameters -> (the caller's name, shape), for
    :func:`fep_kernels._lib._check` ("precision.key" element 9 -> "pi_key[0, 1, 3]", or
    "precision_key[0, 1, 3]" through :func:`fep_kernels.attention`; "params.nu" -> "nu")."""
    names = dict(arg_names or {})
    return {"precision.head": (names.get("pi_head", "pi_head"), [qs[1]]),
            "precision.key": (names.get("pi_key", "pi_key"), [ks[0], ks[1], ks[2]]),
            "kv_len": ("kv_len", [qs[0]]),
            **{f"params.{p}": (p, None) for p in ("score", "nu", "scale", "window")}}


def _attn_inputs(q: Any, k: Any, v: Any, layout: str, pi_head: Any, pi_key: Any, kv_len: Any,
                 arg_names: Optional[Mapping[str, str]] = None) -> Dict[str, Any]:
    """The forward's inputs checked: descriptors of q, k, v, their BHLD shapes, the dtype code,
    the device and the optional pi_head, pi_key, kv_len (ValueError on a bad one, naming
    ``arg_names.get(name, name)``)."""
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
    names = dict(arg_names or {})
    for t, what, shape, dt in ((pi_head, "pi_head", [hq], torch.float32),
                               (pi_key, "pi_key", [b, hkv, lk], torch.float32),
                               (kv_len, "kv_len", [b], torch.int32)):
        if t is not None:
            _check_tensor(t, names.get(what, what), shape, dtype=dt, device=q.device,
                          owner="q's device")
        opt.append(t)
    return dict(q=qd, k=kd, v=vd, qs=qs, ks=ks, vs=vs, dtype=dtype,
                dev=_norm_device(q.device), opt=opt, names=_c_names(qs, ks, arg_names))


def _attn_out(out: Any, shape: list, dtype: Any, device: Any) -> Any:
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


def _like_q(t: Any, what: str, q: Any, layout: str, shape: Sequence[int]) -> Any:
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


def attention_forward(q: "Tensor", k: "Tensor", v: "Tensor", score: str = "dot", nu: float = 5.0,
                      scale: Optional[float] = None, causal: bool = False,
                      window: Optional[int] = None, normalizer: bool = True,
                      pi_head: Optional["Tensor"] = None, pi_key: Optional["Tensor"] = None,
                      kv_len: Optional["Tensor"] = None, layout: str = "bhld",
                      out: Optional["Tensor"] = None, check: bool = True, *,
                      _arg_names: Optional[Mapping[str, str]] = None
                      ) -> Tuple["Tensor", "Tensor", "Tensor"]:
    """Precision-weighted attention, forward: returns ``(o, lse, e)``.

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
    float64 reference. (``_arg_names``, internal: the caller's names of ``pi_head`` and
    ``pi_key`` for error messages.)

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
        print((o_dot - ref).abs().max())                  # 2.8e-7 on the CPU (dot is SDPA's)
    """
    torch = _torch()
    lib = _attn_lib()
    p = _attn_params(score, nu, scale, causal, window, normalizer, check)
    x = _attn_inputs(q, k, v, layout, pi_head, pi_key, kv_len, _arg_names)
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
        _ptr(e)), x["names"])
    return o, lse, e


def _f32_rows(t: Any, what: str, q: Any, shape: Sequence[int]) -> Any:
    """A contiguous float32 tensor of ``shape`` on q's device (lse, e, d_e and the like)."""
    _check_tensor(t, what, shape, dtype=_torch().float32, device=q.device, owner="q's device")
    return t


def attention_backward(q: "Tensor", k: "Tensor", v: "Tensor", o: "Tensor", lse: "Tensor",
                       d_o: "Tensor", e: Optional["Tensor"] = None,
                       d_e: Optional["Tensor"] = None, score: str = "dot", nu: float = 5.0,
                       scale: Optional[float] = None, causal: bool = False,
                       window: Optional[int] = None, normalizer: bool = True,
                       pi_head: Optional["Tensor"] = None, pi_key: Optional["Tensor"] = None,
                       kv_len: Optional["Tensor"] = None, layout: str = "bhld",
                       precision_grads: bool = True, check: bool = True, *,
                       _arg_names: Optional[Mapping[str, str]] = None
                       ) -> Tuple["Tensor", "Tensor", "Tensor", Optional["Tensor"],
                                  Optional["Tensor"], Optional["Tensor"]]:
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
    x = _attn_inputs(q, k, v, layout, pi_head, pi_key, kv_len, _arg_names)
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
        ctypes.byref(dvd), _ptr(dpi_head), _ptr(dpi_key), _ptr(dnu)),
        {**x["names"], "lse": ("lse", [b, hq, lq]), "e": ("e", [b, hq, lq]),
         "d_e": ("d_e", [b, hq, lq])})
    return dq, dk, dv, dpi_head, dpi_key, dnu


def attention_merge(o_parts: "Tensor", lse_parts: "Tensor", e_parts: Optional["Tensor"] = None,
                    layout: str = "bhld", out: Optional["Tensor"] = None
                    ) -> Tuple["Tensor", "Tensor", Optional["Tensor"]]:
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
    _check_tensor(o_parts, "o_parts", [s, b, hq, lq, dv])  # not empty either
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
        ctypes.byref(od), _ptr(lse), _ptr(e)),
        {"lse_parts": ("lse_parts", [s, b, hq, lq]), "e_parts": ("e_parts", [s, b, hq, lq])})
    return o, lse, e
