"""Precision-weighted attention for JAX: the library's fused kernels as XLA FFI calls that work
under ``jax.jit``, ``jax.grad`` (a ``custom_vjp`` whose backward is the library's deterministic
backward) and ``jax.vmap`` (a ``custom_vmap`` rule that folds the mapped axis into the batch).

Example::

    import jax, jax.numpy as jnp
    import fep_kernels.jax as fkj

    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 4, 16, 32))              # [B, Hq, Lq, D]
    k = jax.random.normal(kk, (2, 4, 16, 32))
    v = jax.random.normal(kv, (2, 4, 16, 32))
    pk = jnp.ones((2, 4, 16))                                # per-key precision [B, Hkv, Lk]
    f = jax.jit(lambda q, k, v, pk: fkj.attention(q, k, v, precision_key=pk,
                                                 score="student_t", nu=4.0, causal=True))
    o = f(q, k, v, pk)                                       # [2, 4, 16, 32]
    g = jax.grad(lambda pk: f(q, k, v, pk).sum())(pk)        # dL/dpk
    ob = jax.vmap(f, in_axes=(0, 0, 0, None))(q[None], k[None], v[None], pk)   # [1, 2, 4, 16, 32]
"""

import functools
from typing import Any, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from .._abi import _SCORES
from ._ffi import ensure_registered

__all__ = ["attention", "attention_with_stats"]

# Bits of the handlers' `inputs` attribute (src/xla/attention.rs): which optional buffers follow.
_PI_HEAD, _PI_KEY, _KV_LEN, _NU_HEAD, _BIAS, _MASK, _E_DE, _D_LSE = (1 << i for i in range(8))
_OPTIONAL = ("pi_head", "pi_key", "kv_len", "nu_head", "bias", "mask")


class _Static(NamedTuple):
    """The parameters that are attributes of the FFI calls (hashable: one traced function per
    configuration)."""
    score: int
    nu: float
    scale: float
    causal: int
    window: int
    normalizer: int
    layout: int


def _attrs(s: _Static) -> dict:
    return dict(score=np.int32(s.score), nu=np.float32(s.nu), scale=np.float64(s.scale),
                causal=np.int32(s.causal), window=np.int32(s.window),
                normalizer=np.int32(s.normalizer), layout=np.int32(s.layout))


def _bhld(shape, layout: int) -> Tuple[int, int, int, int]:
    b, x, y, d = shape
    return (b, y, x, d) if layout == 1 else (b, x, y, d)


def _bits(opt) -> int:
    return sum(1 << i for i, t in enumerate(opt) if t is not None)


def _forward_call(s: _Static, q, k, v, opt):
    """One FFI call: (o, lse, e)."""
    ensure_registered()
    b, hq, lq, _ = _bhld(q.shape, s.layout)
    dv = v.shape[3]
    o_shape = (b, lq, hq, dv) if s.layout == 1 else (b, hq, lq, dv)
    rows = jax.ShapeDtypeStruct((b, hq, lq), jnp.float32)
    out = (jax.ShapeDtypeStruct(o_shape, q.dtype), rows, rows)
    args = [q, k, v] + [t for t in opt if t is not None]
    return jax.ffi.ffi_call("fep_attention_forward", out)(
        *args, inputs=np.int32(_bits(opt)), **_attrs(s))


def _backward_call(s: _Static, q, k, v, o, lse, d_o, opt, e, d_e, d_lse, precision_grads: bool):
    """One FFI call: (dq, dk, dv, [dpi_head, dpi_key, dnu], [dbias])."""
    ensure_registered()
    b, hq, _, _ = _bhld(q.shape, s.layout)
    _, hkv, lk, _ = _bhld(k.shape, s.layout)
    f32 = jnp.float32
    out = [jax.ShapeDtypeStruct(t.shape, t.dtype) for t in (q, k, v)]
    if precision_grads:
        nu_dims = (hq,) if opt[3] is not None else (1,)
        out += [jax.ShapeDtypeStruct((hq,), f32), jax.ShapeDtypeStruct((b, hkv, lk), f32),
                jax.ShapeDtypeStruct(nu_dims, f32)]
    if opt[4] is not None:
        out.append(jax.ShapeDtypeStruct(opt[4].shape, f32))
    bits = _bits(opt) | (_E_DE if d_e is not None else 0) | (_D_LSE if d_lse is not None else 0)
    args = [q, k, v, o, lse, d_o] + [t for t in opt if t is not None]
    if d_e is not None:
        args += [e, d_e]
    if d_lse is not None:
        args.append(d_lse)
    return jax.ffi.ffi_call("fep_attention_backward", tuple(out))(
        *args, inputs=np.int32(bits), precision_grads=np.int32(precision_grads), **_attrs(s))


# ---- vmap: the mapped axis folded into the batch ---------------------------------------------
#
# A custom_vmap rule gets the mapped axis first on every batched argument. When neither pi_head
# nor nu_head (one value per head for the whole batch) is mapped, the mapped axis V is folded
# into B: q [V, B, ...] -> [V*B, ...] (a reshape), unmapped arguments broadcast first, and one
# call serves all V*B sequences. A bias or mask with B = 1 stays shared when it is not mapped.
# Otherwise (a per-head input mapped, or a backward whose per-head gradients must stay per map
# entry) the call runs once per entry through lax.map: correct, not fused.

def _lead(x, batched: bool, size: int):
    """x with the mapped axis first, broadcast to ``size`` when it is not mapped."""
    return x if batched else jnp.broadcast_to(x, (size,) + x.shape)


def _fold(x):
    """[V, B, ...] -> [V*B, ...]."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _unfold(x, size: int):
    return x.reshape((size, x.shape[0] // size) + x.shape[1:])


def _fold_b(x, batched: bool, size: int, b: int):
    """A [B | 1, ...] input (bias, mask) for the folded call: an unmapped one with B = 1 stays
    shared; otherwise broadcast to [V, B, ...] and folded."""
    if x is None:
        return None
    if not batched and x.shape[0] == 1:
        return x
    x = _lead(x, batched, size)
    x = jnp.broadcast_to(x, (size, b) + x.shape[2:])
    return _fold(x)


@functools.lru_cache(maxsize=None)
def _forward_op(s: _Static, bits: int):
    """The forward FFI call as a function of arrays with a vmap rule."""

    @jax.custom_batching.custom_vmap
    def fwd(q, k, v, *opt_present):
        return _forward_call(s, q, k, v, _expand(bits, opt_present))

    @fwd.def_vmap
    def rule(size, in_batched, q, k, v, *opt_present):
        opt = _expand(bits, opt_present)
        ob = _expand(bits, in_batched[3:])
        qb, kb, vb = in_batched[:3]
        if ob[0] or ob[3]:  # pi_head or nu_head mapped: one call per entry
            args = (q, k, v, *opt_present)
            axes = tuple(0 if bt else None for bt in in_batched)
            out = jax.lax.map(lambda xs: fwd(*_place(args, axes, xs)),
                              tuple(a for a, ax in zip(args, axes) if ax == 0))
            return out, (True, True, True)
        b = q.shape[1] if qb else q.shape[0]
        fq, fk, fv = (_fold(_lead(t, bt, size)) for t, bt in ((q, qb), (k, kb), (v, vb)))
        pi_key = None if opt[1] is None else _fold(_lead(opt[1], ob[1], size))
        kv_len = None if opt[2] is None else _fold(_lead(opt[2], ob[2], size))
        bias = _fold_b(opt[4], ob[4], size, b)
        mask = _fold_b(opt[5], ob[5], size, b)
        o, lse, e = fwd(fq, fk, fv, *_compress((opt[0], pi_key, kv_len, opt[3], bias, mask)))
        return (_unfold(o, size), _unfold(lse, size), _unfold(e, size)), (True, True, True)

    return fwd


@functools.lru_cache(maxsize=None)
def _backward_op(s: _Static, bits: int):
    """The backward FFI call as a function of arrays with a vmap rule: (q, k, v, o, lse, d_o,
    *present optional inputs, e, d_e, d_lse) -> (dq, dk, dv, then the gradients of the present
    pi_head, pi_key, nu_head and bias, in that order)."""
    n_opt = bin(bits).count("1")
    wanted = [i for i in (0, 1, 3, 4) if bits & (1 << i)]  # pi_head, pi_key, nu_head, bias
    precision_grads = any(i in wanted for i in (0, 1, 3))

    @jax.custom_batching.custom_vmap
    def bwd(q, k, v, o, lse, d_o, *rest):
        opt = _expand(bits, rest[:n_opt])
        e, d_e, d_lse = rest[n_opt:]
        out = _backward_call(s, q, k, v, o, lse, d_o, opt, e, d_e, d_lse, precision_grads)
        grads = {}
        if precision_grads:
            grads = {0: out[3], 1: out[4], 3: out[5]}
        if bits & _BIAS:
            grads[4] = out[-1]
        return tuple(out[:3]) + tuple(grads[i] for i in wanted)

    @bwd.def_vmap
    def rule(size, in_batched, q, k, v, o, lse, d_o, *rest):
        args = (q, k, v, o, lse, d_o, *rest)
        opt = _expand(bits, rest[:n_opt])
        ob = _expand(bits, in_batched[6:6 + n_opt])
        n_out = 3 + len(wanted)
        if opt[0] is not None or opt[3] is not None:
            # dpi_head and dnu are sums over the batch: each map entry needs its own.
            axes = tuple(0 if bt else None for bt in in_batched)
            out = jax.lax.map(lambda xs: bwd(*_place(args, axes, xs)),
                              tuple(a for a, ax in zip(args, axes) if ax == 0))
            return out, (True,) * n_out
        b = q.shape[1] if in_batched[0] else q.shape[0]
        folded = [_fold(_lead(t, bt, size)) for t, bt in zip(args[:6], in_batched[:6])]
        pi_key = None if opt[1] is None else _fold(_lead(opt[1], ob[1], size))
        kv_len = None if opt[2] is None else _fold(_lead(opt[2], ob[2], size))
        bias = None
        if opt[4] is not None:  # never shared across entries: dbias is per entry
            bias = _fold(jnp.broadcast_to(_lead(opt[4], ob[4], size),
                                          (size, b) + opt[4].shape[-3:]))
        mask = _fold_b(opt[5], ob[5], size, b)
        tail = [_fold(_lead(t, bt, size)) for t, bt in zip(rest[n_opt:], in_batched[6 + n_opt:])]
        res = bwd(*folded, *_compress((None, pi_key, kv_len, None, bias, mask)), *tail)
        res = [_unfold(r, size) for r in res]
        if opt[4] is not None and opt[4].shape[-4] == 1:  # a bias shared over B: sum it back
            res[-1] = res[-1].sum(axis=1, keepdims=True)
        return tuple(res), (True,) * n_out

    return bwd


def _compress(opt):
    return tuple(t for t in opt if t is not None)


def _expand(bits: int, present):
    """The six optional slots from the present ones (in order) and the bit set."""
    it = iter(present)
    return tuple(next(it) if bits & (1 << i) else None for i in range(6))


def _place(args, axes, xs):
    """Rebuilds the argument tuple from unmapped args and one entry of the mapped ones."""
    it = iter(xs)
    return tuple(next(it) if ax == 0 else a for a, ax in zip(args, axes))


# ---- differentiation --------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _differentiable(s: _Static, bits: int):
    """(q, k, v, opt) -> (o, lse, e) with a custom_vjp over q, k, v, pi_head, pi_key, nu_head
    and bias (kv_len and the mask get zero cotangents)."""

    def run(q, k, v, opt):
        return _forward_op(s, bits)(q, k, v, *_compress(opt))

    @jax.custom_vjp
    def f(q, k, v, opt):
        return run(q, k, v, opt)

    def f_fwd(q, k, v, opt):
        o, lse, e = run(q, k, v, opt)
        return (o, lse, e), (q, k, v, opt, o, lse, e)

    def f_bwd(res, cot):
        q, k, v, opt, o, lse, e = res
        d_o, d_lse, d_e = cot
        out = _backward_op(s, bits)(q, k, v, o, lse, d_o.astype(o.dtype), *_compress(opt), e,
                                    d_e.astype(jnp.float32), d_lse.astype(jnp.float32))
        dq, dk, dv = out[:3]
        d_opt = [None] * 6
        for i, g in zip([i for i in (0, 1, 3, 4) if opt[i] is not None], out[3:]):
            d_opt[i] = g
        for j in (2, 5):  # kv_len, mask: no gradient (float0 zeros for integer/bool inputs)
            if opt[j] is not None:
                d_opt[j] = np.zeros(opt[j].shape, dtype=jax.dtypes.float0)
        return dq, dk, dv, tuple(d_opt)

    f.defvjp(f_fwd, f_bwd)
    return f


# ---- the public functions -----------------------------------------------------------------------

def _bias4(x: Optional[Any], full: Tuple[int, int, int, int], what: str):
    """A bias or mask as a 4-d array broadcastable to the scores, its key dim full."""
    if x is None:
        return None
    x = jnp.asarray(x)
    if not 1 <= x.ndim <= 4:
        raise ValueError(f"{what}: expected 1 to 4 dims broadcastable to {list(full)}, got "
                         f"shape {list(x.shape)}")
    x = x.reshape((1,) * (4 - x.ndim) + x.shape)
    if any(n not in (1, f) for n, f in zip(x.shape, full)):
        raise ValueError(f"{what}: shape {list(x.shape)} does not broadcast to the scores "
                         f"[B, Hq, Lq, Lk] = {list(full)}")
    if x.shape[3] != full[3]:
        x = jnp.broadcast_to(x, x.shape[:3] + (full[3],))
    return x


def attention_with_stats(q: ArrayLike, k: ArrayLike, v: ArrayLike,
                         precision_key: Optional[ArrayLike] = None,
                         precision_head: Optional[ArrayLike] = None, score: str = "dot",
                         nu: Any = 5.0, scale: Optional[float] = None, causal: bool = False,
                         window: Optional[int] = None, normalizer: bool = True,
                         kv_len: Optional[ArrayLike] = None, layout: str = "bhld", *,
                         bias: Optional[ArrayLike] = None, attn_mask: Optional[ArrayLike] = None
                         ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """Precision-weighted attention with its statistics: returns ``(o, lse, e)``.

    ``q`` [B, Hq, Lq, D], ``k`` [B, Hkv, Lk, D], ``v`` [B, Hkv, Lk, Dv] (``layout="bhld"``; or
    [B, L, H, D] each with ``layout="blhd"``), float32, float16 or bfloat16, Hq a multiple of
    Hkv. With pi_ij = ``precision_head``[h] * ``precision_key``[b, h_kv, j] (float32, > 0, each
    optional), d2 = |q_i - k_j|^2 and tau = ``scale`` (None: 1/sqrt(D) for "dot", else 1):
    "dot" s = tau pi q.k; "gaussian" s = -tau pi d2 / 2; "student_t"
    s = -((nu + D)/2) ln(1 + tau pi d2 / nu); "laplace" s = -sqrt(tau pi d2); the last three
    plus (D/2) ln pi with ``normalizer``; plus ``bias`` (float32, broadcastable to
    [B, Hq, Lq, Lk]); ``attn_mask`` (bool, True = keep), ``causal`` (bottom-right aligned),
    ``window`` and ``kv_len`` ([B] int32) remove keys. o = softmax(s) v (q's dtype and layout),
    lse = ln sum exp s and e = sum w pi d2 ([B, Hq, Lq] float32).

    ``nu`` is a number or a float32 array [Hq] (per query head). Differentiable (``jax.grad``,
    ``jax.vjp``) with respect to q, k, v, both precisions, an array nu and the bias, through o,
    lse and e; works under ``jax.jit`` and ``jax.vmap`` (the mapped axis is folded into B when
    no per-head input is mapped). Argument errors raise ValueError or TypeError at trace time;
    the library's value checks (a precision <= 0, a NaN input) raise when the call runs.
    """
    if score not in _SCORES:
        raise ValueError(f"score: {score!r} is not one of {list(_SCORES)}")
    if layout not in ("bhld", "blhd"):
        raise ValueError(f"layout: {layout!r} is not 'bhld' or 'blhd'")
    q, k, v = (jnp.asarray(t) for t in (q, k, v))
    for t, what in ((q, "q"), (k, "k"), (v, "v")):
        if t.ndim != 4:
            raise ValueError(f"{what}: expected a 4-d array ({layout}), got shape {list(t.shape)}")
        if t.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
            raise ValueError(f"{what}: dtype {t.dtype} is not supported (float32, float16 or "
                             "bfloat16)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"k, v: dtypes {k.dtype}, {v.dtype} differ from q's {q.dtype}")
    lay = 1 if layout == "blhd" else 0
    b, hq, lq, _ = _bhld(q.shape, lay)
    lk = _bhld(k.shape, lay)[2]
    nu_head = None
    if isinstance(nu, (jax.Array, np.ndarray)) and not isinstance(nu, np.generic):
        if score != "student_t":
            raise ValueError(f"nu: a per-head nu array needs score='student_t', got {score!r}")
        nu_head = jnp.broadcast_to(jnp.asarray(nu, jnp.float32).reshape(-1), (hq,))
        nu_f = 1.0
    else:
        if isinstance(nu, bool) or not isinstance(nu, (int, float, np.floating, np.integer)):
            raise TypeError(f"nu: expected a number or an array, got {type(nu).__name__}")
        nu_f = float(nu)
    if scale is not None and not float(scale) > 0:
        raise ValueError(f"scale: must be > 0 (None for the default), got {scale}")
    if window is not None and (isinstance(window, bool) or int(window) < 1):
        raise ValueError(f"window: expected an int >= 1 or None, got {window!r}")

    def f32(t, what, shape):
        if t is None:
            return None
        t = jnp.asarray(t)
        if t.dtype != jnp.float32:
            raise ValueError(f"{what}: expected float32, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{what}: expected shape {list(shape)}, got {list(t.shape)}")
        return t

    hkv = _bhld(k.shape, lay)[1]
    pi_head = f32(precision_head, "precision_head", (hq,))
    pi_key = f32(precision_key, "precision_key", (b, hkv, lk))
    if kv_len is not None:
        kv_len = jnp.asarray(kv_len)
        if kv_len.dtype != jnp.int32 or tuple(kv_len.shape) != (b,):
            raise ValueError(f"kv_len: expected int32 [{b}], got {kv_len.dtype} "
                             f"{list(kv_len.shape)}")
    bias = _bias4(bias, (b, hq, lq, lk), "bias")
    if bias is not None and bias.dtype != jnp.float32:
        raise ValueError(f"bias: expected float32, got {bias.dtype}")
    mask = _bias4(attn_mask, (b, hq, lq, lk), "attn_mask")
    if mask is not None and mask.dtype != jnp.bool_:
        raise ValueError(f"attn_mask: expected bool, got {mask.dtype}")
    s = _Static(_SCORES[score], nu_f, 0.0 if scale is None else float(scale), int(bool(causal)),
                0 if window is None else int(window), int(bool(normalizer)), lay)
    opt = (pi_head, pi_key, kv_len, nu_head, bias, mask)
    return _differentiable(s, _bits(opt))(q, k, v, opt)


def attention(q: ArrayLike, k: ArrayLike, v: ArrayLike, precision_key: Optional[ArrayLike] = None,
              precision_head: Optional[ArrayLike] = None, score: str = "dot", nu: Any = 5.0,
              scale: Optional[float] = None, causal: bool = False, window: Optional[int] = None,
              normalizer: bool = True, kv_len: Optional[ArrayLike] = None, layout: str = "bhld",
              *, bias: Optional[ArrayLike] = None, attn_mask: Optional[ArrayLike] = None
              ) -> jax.Array:
    """The output ``o`` of :func:`attention_with_stats` (same arguments)."""
    return attention_with_stats(q, k, v, precision_key, precision_head, score, nu, scale, causal,
                                window, normalizer, kv_len, layout, bias=bias,
                                attn_mask=attn_mask)[0]
