"""Precision-weighted attention: :func:`attention_forward`, :func:`attention_backward`,
:func:`attention_probabilities`, :func:`attention_merge`.

Attention in which every query-key pair carries a precision pi_ij = pi_head[h] * pi_key[b, h_kv, j]
(inverse variance, > 0) that scales its score: with d2 = |q_i - k_j|^2 and a scale tau, the
score s_ij is tau pi q.k ("dot"), -tau pi d2 / 2 ("gaussian"), -((nu + D)/2) ln(1 + tau pi d2 / nu)
("student_t") or -sqrt(tau pi d2) ("laplace"), the last three plus (D/2) ln pi (the normaliser
of the distribution, which matters when pi varies per key). The output is o_i = sum_j
softmax_j(s_ij) v_j, with lse_i = ln sum_j exp(s_ij) and the expected precision-weighted error
e_i = sum_j w_ij pi_ij d2_ij (the predictive-coding energy of the head) alongside.

Optional score inputs (keyword arguments of every call here): ``nu`` per query head as a float32
tensor [Hq]; an additive ``bias`` (float32) and a boolean ``attn_mask`` (True = keep, as
PyTorch's SDPA), each broadcastable to the scores [B, Hq, Lq, Lk] with Lk given in full
(s_ij += bias[b, h, i, j]; a masked score, or a bias of -inf, leaves key j out of row i; a row
with nothing left gives o = 0, lse = -inf); and packed variable-length sequences
(``cu_seqlens_q``/``cu_seqlens_k`` int32 [S + 1] and ``max_seqlen_q``/``max_seqlen_k``:
FlashAttention's varlen convention, q [total_q, Hq, D], k and v [total_k, Hkv, D], every mask
applied within each sequence).
"""

import ctypes
from typing import TYPE_CHECKING, Any, Dict, Mapping, Optional, Sequence, Tuple

from ._abi import (
    FEP_ERR_UNSUPPORTED,
    _FepAttentionParams,
    _FepAttnScoreInputs,
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
    # A per-head nu (a tensor) travels in FepAttnScoreInputs; the params' own must still be valid.
    torch = _torch()
    per_head = isinstance(nu, torch.Tensor)
    p.nu = (1.0 if per_head else _number(nu, "nu")) if score == "student_t" else 0.0
    if per_head and score != "student_t":
        raise ValueError(f"nu: a per-head nu tensor needs score='student_t', got {score!r}")
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
            "inputs.nu_head": ("nu", [qs[1]]),
            "inputs.bias": (names.get("bias", "bias"), None),
            "inputs.mask": (names.get("attn_mask", "attn_mask"), None),
            **{f"inputs.{p}": (p, None)
               for p in ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")},
            **{f"params.{p}": (p, None) for p in ("score", "nu", "scale", "window")}}


def _broadcast4(t: Any, what: str, full: Sequence[int], dtypes: Sequence[Any], q: Any) -> Any:
    """``t`` as a 4-d view broadcastable to the scores ``full`` = [B, Hq, Lq, Lk]: fewer dims
    are padded on the left with 1s (SDPA's broadcasting), B, Hq and Lq may be 1, Lk must be
    full; a key dimension of 1 is expanded and copied (the kernels read Lk contiguously)."""
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{what}: dtype {t.dtype} is not supported ({names})")
    if t.device != q.device:
        raise ValueError(f"{what}: on {t.device}, expected {q.device} (q's device)")
    if not 1 <= t.dim() <= 4:
        raise ValueError(f"{what}: expected 1 to 4 dims broadcastable to {list(full)}, got "
                         f"shape {list(t.shape)}")
    x = t.reshape([1] * (4 - t.dim()) + list(t.shape)) if t.dim() < 4 else t
    shape = list(x.shape)
    if any(n not in (1, f) for n, f in zip(shape, full)):
        raise ValueError(f"{what}: shape {list(t.shape)} does not broadcast to the scores "
                         f"[B, Hq, Lq, Lk] = {list(full)} (each of B, Hq, Lq full or 1)")
    if shape[3] != full[3] or (x.stride(3) != 1 and full[3] > 1):
        x = x.expand(*shape[:3], full[3]).contiguous()
    if any(st < 0 for st in x.stride()):
        raise ValueError(f"{what}: negative strides are not supported")
    return x


def _score_inputs(q: Any, qs: Sequence[int], ks: Sequence[int], nu: Any, bias: Any,
                  attn_mask: Any, varlen: Optional[Tuple[Any, Any, int, int]]
                  ) -> Tuple[Any, list]:
    """The FepAttnScoreInputs of the optional inputs (None when there are none) and the tensors
    it points into (kept alive for the call)."""
    torch = _torch()
    if nu is None or not isinstance(nu, torch.Tensor):
        nu = None
    if nu is None and bias is None and attn_mask is None and varlen is None:
        return None, []
    x = _FepAttnScoreInputs()
    keep = []
    full = [qs[0], qs[1], qs[2], ks[2]]
    if nu is not None:
        _check_tensor(nu, "nu", [qs[1]], dtype=torch.float32, device=q.device,
                      owner="q's device")
        x.nu_head = nu.data_ptr()
        keep.append(nu)
    for t, what, dtypes in ((bias, "bias", (torch.float32,)),
                            (attn_mask, "attn_mask", (torch.bool, torch.uint8))):
        if t is None:
            continue
        t4 = _broadcast4(t, what, full, dtypes, q)
        if t4.dtype == torch.bool:
            t4 = t4.view(torch.uint8)
        keep.append(t4)
        field = "bias" if what == "bias" else "mask"
        setattr(x, field, t4.data_ptr())
        for i in range(4):
            getattr(x, f"{field}_shape")[i] = t4.shape[i]
        for i in range(3):
            getattr(x, f"{field}_strides")[i] = t4.stride(i)
    if varlen is not None:
        cu_q, cu_k, max_q, max_k = varlen
        for t, what in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
            _check_tensor(t, what, [None], dtype=torch.int32, device=q.device, owner="q's device")
        if cu_k.numel() != cu_q.numel():
            raise ValueError(f"cu_seqlens_k: has {cu_k.numel()} offsets, cu_seqlens_q "
                             f"{cu_q.numel()}: both are [S + 1]")
        if cu_q.numel() < 2:
            raise ValueError("cu_seqlens_q: needs S + 1 >= 2 offsets")
        x.cu_seqlens_q, x.cu_seqlens_k = cu_q.data_ptr(), cu_k.data_ptr()
        x.num_seqs = cu_q.numel() - 1
        x.max_seqlen_q = _integer(max_q, "max_seqlen_q", 1, 2**31 - 1)
        x.max_seqlen_k = _integer(max_k, "max_seqlen_k", 1, 2**31 - 1)
        keep += [cu_q, cu_k]
    return x, keep


def _varlen_args(cu_seqlens_q: Any, cu_seqlens_k: Any, max_seqlen_q: Any, max_seqlen_k: Any
                 ) -> Optional[Tuple[Any, Any, Any, Any]]:
    """The packed-sequence arguments as one tuple, or None; all four or none (ValueError)."""
    given = [a is not None for a in (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k: packed "
                         "sequences need all four")
    return cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k


def _packed(ts: Sequence[Any], names: Sequence[str]) -> list:
    """3-d packed tensors [total, H, D] as the 4-d [1, total, H, D] views the library takes
    (layout "blhd")."""
    torch = _torch()
    out = []
    for t, what in zip(ts, names):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{what}: packed sequences take a 3-d [total, H, D] tensor, got "
                             f"{got}")
        out.append(t.unsqueeze(0))
    return out


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
                      bias: Optional["Tensor"] = None, attn_mask: Optional["Tensor"] = None,
                      cu_seqlens_q: Optional["Tensor"] = None,
                      cu_seqlens_k: Optional["Tensor"] = None,
                      max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
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

    Optional score inputs: ``nu`` may be a float32 tensor [Hq] (Student-t's nu per query
    head); ``bias`` (float32) is added to the scores and ``attn_mask`` (bool or uint8, True =
    keep) removes keys, each broadcastable to [B, Hq, Lq, Lk] (1 to 4 dims, padded on the left;
    B, Hq, Lq may be 1; -inf in the bias masks). Packed sequences: ``cu_seqlens_q``,
    ``cu_seqlens_k`` (int32 [S + 1], starting at 0, nondecreasing) with ``max_seqlen_q``,
    ``max_seqlen_k``: q [total_q, Hq, D], k and v [total_k, Hkv, D] (3-d; ``layout`` is
    ignored), o [total_q, Hq, Dv], lse and e [Hq, total_q], ``pi_key`` [1, Hkv, total_k]; not
    with ``kv_len``, ``bias`` or ``attn_mask``.

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
    varlen = _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if varlen is not None:
        q, k, v = _packed((q, k, v), ("q", "k", "v"))
        layout = "blhd"
        if out is not None:
            out = _packed((out,), ("out",))[0]
    p = _attn_params(score, nu, scale, causal, window, normalizer, check)
    x = _attn_inputs(q, k, v, layout, pi_head, pi_key, kv_len, _arg_names)
    qd, kd, vd, dtype, dev, opt = x["q"], x["k"], x["v"], x["dtype"], x["dev"], x["opt"]
    b, hq, lq, _ = x["qs"]
    dv = x["vs"][3]
    inputs, keep = _score_inputs(q, x["qs"], x["ks"], nu, bias, attn_mask, varlen)
    o_shape = [b, lq, hq, dv] if layout == "blhd" else [b, hq, lq, dv]
    o = _attn_out(out, o_shape, q.dtype, q.device)
    od, _ = _attn_tensor(o, "out", layout)
    lse = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    e = torch.empty(b, hq, lq, dtype=torch.float32, device=q.device)
    kind, ordinal, stream = _device_args(dev, "q")
    _check(lib.fep_attention_forward2(
        kind, ordinal, stream, ctypes.byref(p), dtype, ctypes.byref(qd), ctypes.byref(kd),
        ctypes.byref(vd), _ptr(opt[0]), _ptr(opt[1]), _ptr(opt[2]),
        None if inputs is None else ctypes.byref(inputs), ctypes.byref(od), _ptr(lse),
        _ptr(e)), x["names"])
    del keep
    if varlen is not None:
        return o[0], lse[0], e[0]
    return o, lse, e


def attention_probabilities(q: "Tensor", k: "Tensor", v: "Tensor", score: str = "dot",
                            nu: Any = 5.0, scale: Optional[float] = None, causal: bool = False,
                            window: Optional[int] = None, normalizer: bool = True,
                            pi_head: Optional["Tensor"] = None,
                            pi_key: Optional["Tensor"] = None,
                            kv_len: Optional["Tensor"] = None, layout: str = "bhld", *,
                            bias: Optional["Tensor"] = None,
                            attn_mask: Optional["Tensor"] = None,
                            cu_seqlens_q: Optional["Tensor"] = None,
                            cu_seqlens_k: Optional["Tensor"] = None,
                            max_seqlen_q: Optional[int] = None,
                            max_seqlen_k: Optional[int] = None,
                            max_elements: int = 1 << 26) -> "Tensor":
    """The attention weights w_ij = softmax_j(s_ij) of :func:`attention_forward` with the same
    arguments, as a float32 tensor [B, Hq, Lq, Lk] (packed sequences: [Hq, total_q, total_k],
    0 across sequences). Masked keys and fully masked rows are 0.

    A debugging and visualisation aid: it materialises the score matrix that the fused kernels
    never store (B Hq Lq Lk floats), so it is refused (ValueError) above ``max_elements``
    (default 2^26, 256 MiB); raise that explicitly for a bigger one. Not differentiable.

    Example::

        w = fk.attention_probabilities(q, k, v, score="student_t", causal=True)
        print(w.sum(-1))   # 1 on every row with a visible key
    """
    torch = _torch()
    lib = _attn_lib()
    varlen = _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if varlen is not None:
        q, k, v = _packed((q, k, v), ("q", "k", "v"))
        layout = "blhd"
    p = _attn_params(score, nu, scale, causal, window, normalizer, True)
    x = _attn_inputs(q, k, v, layout, pi_head, pi_key, kv_len)
    b, hq, lq, _ = x["qs"]
    lk = x["ks"][2]
    n = b * hq * lq * lk
    limit = _integer(max_elements, "max_elements", 1, 2**62)
    if n > limit:
        raise ValueError(f"max_elements: the probabilities [{b}, {hq}, {lq}, {lk}] have {n} "
                         f"elements, over the limit {limit} (raise it to materialise them)")
    inputs, keep = _score_inputs(q, x["qs"], x["ks"], nu, bias, attn_mask, varlen)
    w = torch.empty(b, hq, lq, lk, dtype=torch.float32, device=q.device)
    kind, ordinal, stream = _device_args(x["dev"], "q")
    opt = x["opt"]
    _check(lib.fep_attention_probabilities(
        kind, ordinal, stream, ctypes.byref(p), x["dtype"], ctypes.byref(x["q"]),
        ctypes.byref(x["k"]), ctypes.byref(x["v"]), _ptr(opt[0]), _ptr(opt[1]), _ptr(opt[2]),
        None if inputs is None else ctypes.byref(inputs), _ptr(w), n), x["names"])
    del keep
    return w[0] if varlen is not None else w


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
                       d_lse: Optional["Tensor"] = None, bias: Optional["Tensor"] = None,
                       attn_mask: Optional["Tensor"] = None,
                       cu_seqlens_q: Optional["Tensor"] = None,
                       cu_seqlens_k: Optional["Tensor"] = None,
                       max_seqlen_q: Optional[int] = None, max_seqlen_k: Optional[int] = None,
                       _arg_names: Optional[Mapping[str, str]] = None
                       ) -> Tuple[Any, ...]:
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

    The optional score inputs (``nu`` as a tensor [Hq], ``bias``, ``attn_mask``, packed
    sequences) are the forward call's. ``d_lse`` [B, Hq, Lq] float32 is dL/dlse (None: the loss
    does not use lse; a row with no visible key ignores it): it enters as
    dS_ij = w_ij (dL/dw_ij - Delta_i + d_lse_i). With a tensor ``nu``, dnu is [Hq]. With a
    ``bias``, a seventh value dbias is returned: dL/dbias in the 4-d broadcast shape of the bias
    (its dims padded on the left to 4), each broadcast dimension summed in a fixed order.

    Example (the loss L = sum(o * g))::

        o, lse, e = fk.attention_forward(q, k, v, score="gaussian", causal=True, pi_key=pk)
        dq, dk, dv, dpi_head, dpi_key, dnu = fk.attention_backward(
            q, k, v, o, lse, g, score="gaussian", causal=True, pi_key=pk)
    """
    torch = _torch()
    lib = _attn_lib()
    varlen = _varlen_args(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    if varlen is not None:
        q, k, v, o, d_o = _packed((q, k, v, o, d_o), ("q", "k", "v", "o", "d_o"))
        rows_in = [t if t is None else t.unsqueeze(0) for t in (lse, e, d_e, d_lse)]
        lse, e, d_e, d_lse = rows_in
        layout = "blhd"
    p = _attn_params(score, nu, scale, causal, window, normalizer, check)
    x = _attn_inputs(q, k, v, layout, pi_head, pi_key, kv_len, _arg_names)
    qd, kd, vd, dtype, dev, opt = x["q"], x["k"], x["v"], x["dtype"], x["dev"], x["opt"]
    qs, ks, vs = x["qs"], x["ks"], x["vs"]
    b, hq, lq, _ = qs
    _, hkv, lk, _ = ks
    os_ = [b, hq, lq, vs[3]]
    od = _like_q(o, "o", q, layout, os_)
    dod = _like_q(d_o, "d_o", q, layout, os_)
    rows = [b, hq, lq]
    _f32_rows(lse, "lse", q, rows)
    if d_e is not None:
        if e is None:
            raise ValueError("e: the forward's e is required when d_e is given")
        _f32_rows(d_e, "d_e", q, rows)
    if e is not None:
        _f32_rows(e, "e", q, rows)
    if d_lse is not None:
        _f32_rows(d_lse, "d_lse", q, rows)
    inputs, keep = _score_inputs(q, qs, ks, nu, bias, attn_mask, varlen)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)]
    dq, dk, dv = grads
    dqd, dkd, dvd = (_attn_tensor(t, n, layout)[0] for t, n in zip(grads, ("dq", "dk", "dv")))
    f32 = dict(dtype=torch.float32, device=q.device)
    if precision_grads:
        dpi_head = torch.empty(hq, **f32)
        dpi_key = torch.empty(b, hkv, lk, **f32)
        dnu = torch.empty(hq, **f32) if isinstance(nu, torch.Tensor) else torch.empty((), **f32)
    else:
        dpi_head = dpi_key = dnu = None
    dbias = None
    if bias is not None:
        dbias = torch.empty(list(inputs.bias_shape), **f32)  # the bias's 4-d broadcast shape
    kind, ordinal, stream = _device_args(dev, "q")
    _check(lib.fep_attention_backward2(
        kind, ordinal, stream, ctypes.byref(p), dtype, ctypes.byref(qd), ctypes.byref(kd),
        ctypes.byref(vd), _ptr(opt[0]), _ptr(opt[1]), _ptr(opt[2]),
        None if inputs is None else ctypes.byref(inputs), ctypes.byref(od), _ptr(lse),
        ctypes.byref(dod), _ptr(e), _ptr(d_e), _ptr(d_lse), ctypes.byref(dqd), ctypes.byref(dkd),
        ctypes.byref(dvd), _ptr(dpi_head), _ptr(dpi_key), _ptr(dnu), _ptr(dbias)),
        {**x["names"], "lse": ("lse", rows), "e": ("e", rows), "d_e": ("d_e", rows),
         "d_lse": ("d_lse", rows)})
    del keep
    if varlen is not None:
        dq, dk, dv = dq[0], dk[0], dv[0]
    if bias is not None:
        return dq, dk, dv, dpi_head, dpi_key, dnu, dbias
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
