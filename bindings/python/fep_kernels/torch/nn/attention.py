"""Precision-weighted multi-head attention as a PyTorch module, with a KV cache for decoding:
:class:`PrecisionAttention` and :class:`KVCache`.

:class:`PrecisionAttention` is multi-head (optionally grouped-query) self-attention whose scores
come from :func:`fep_kernels.attention_with_stats`: "dot", "gaussian", "student_t" or "laplace",
each pair (i, j) weighted by a precision pi_ij = pi_head[h] * pi_key[b, h_kv, j]. The per-head
precision, the per-head Student-t degrees of freedom nu and (optionally) a per-key precision
computed from the keys are learned with the projections.

The module adds no positional information (no RoPE, no learned positions): add it to ``x``, or
give a relative-position ``attn_bias``.

Example (training, then incremental decoding with a cache)::

    import torch
    from fep_kernels.nn import PrecisionAttention

    attn = PrecisionAttention(256, num_heads=8, num_kv_heads=2, score="student_t", nu=5.0,
                              causal=True)
    x = torch.randn(4, 32, 256)
    y = attn(x)                                         # [4, 32, 256], differentiable
    y.square().mean().backward()                        # grads of projections, nu, precisions

    with torch.no_grad():
        cache = attn.make_cache(batch_size=4, max_len=64)
        y0 = attn(x[:, :16], cache=cache)               # prefill 16 tokens
        for t in range(16, 32):
            yt = attn(x[:, t:t + 1], cache=cache)       # one token at a time: [4, 1, 256]
"""

import math
from typing import Any, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..._abi import _SCORES
from ..ops import attention_with_stats

__all__ = ["PrecisionAttention", "KVCache"]

# softplus(z) + _PI_FLOOR: the per-key precision stays > 0 (and ln pi finite) for any z
_PI_FLOOR = 1e-6
# softplus^-1(1 - _PI_FLOOR): the bias that makes the initial per-key precision 1
_PI_BIAS_INIT = math.log(math.expm1(1.0 - _PI_FLOOR))


def _positive_int(x: Any, what: str) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{what}: expected an int, got {type(x).__name__}")
    if x < 1:
        raise ValueError(f"{what}: expected an int >= 1, got {x}")
    return x


class KVCache:
    """A preallocated key/value cache for incremental decoding with :class:`PrecisionAttention`.

    Holds keys and values [B, max_len, Hkv, D] (the "blhd" layout the module uses), optionally
    the per-key precisions [B, Hkv, max_len] (float32; ``precision_key=True``, needed by a
    module built with ``key_precision=True``), and the number of tokens stored per batch row,
    :attr:`lengths` (int32 [B], on the cache's device). :meth:`append` writes new tokens of every
    row at that row's current length.

    For ``generate``-style decoding every row appends the same number of tokens per call (a
    prefill of L tokens, then 1 per step); rows then stay equally long and the module attends
    with a plain bottom-right-aligned causal mask. Rows of different lengths arise from a ragged
    prefill (``kv_len`` given to the module's forward, or ``new_len`` to :meth:`append`: right-
    padded prompts); the module then masks every row by its own length and position.

    ``batch_size`` (B), ``max_len`` (the capacity per row), ``num_kv_heads`` (Hkv), ``head_dim``
    (D of the keys), ``head_dim_v`` (D of the values; default ``head_dim``), ``precision_key``
    (also store per-key precisions), ``device`` and ``dtype`` (of k and v; the model's, e.g.
    float32 or bfloat16). The cache holds no autograd history: what is appended is detached
    (decode under ``torch.no_grad()``). Works on CPU and CUDA tensors alike.
    """

    def __init__(self, batch_size: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 head_dim_v: Optional[int] = None, precision_key: bool = False,
                 device: Optional[Union[torch.device, str]] = None,
                 dtype: torch.dtype = torch.float32) -> None:
        b = _positive_int(batch_size, "batch_size")
        n = _positive_int(max_len, "max_len")
        h = _positive_int(num_kv_heads, "num_kv_heads")
        d = _positive_int(head_dim, "head_dim")
        dv = d if head_dim_v is None else _positive_int(head_dim_v, "head_dim_v")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype: expected a floating torch.dtype, got {dtype!r}")
        self.batch_size, self.max_len, self.num_kv_heads = b, n, h
        self.head_dim, self.head_dim_v = d, dv
        self._k = torch.zeros(b, n, h, d, device=device, dtype=dtype)
        self._v = torch.zeros(b, n, h, dv, device=device, dtype=dtype)
        self._pi: Optional[Tensor] = (torch.ones(b, h, n, device=device, dtype=torch.float32)
                                      if precision_key else None)
        self._lengths = torch.zeros(b, device=self._k.device, dtype=torch.int32)
        self._host: List[int] = [0] * b  # lengths on the host: overflow checks, slicing

    def __repr__(self) -> str:
        return (f"KVCache(batch_size={self.batch_size}, max_len={self.max_len}, "
                f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
                f"head_dim_v={self.head_dim_v}, precision_key={self._pi is not None}, "
                f"dtype={self.dtype}, device={self.device}, lengths={self._host})")

    @property
    def device(self) -> torch.device:
        return self._k.device

    @property
    def dtype(self) -> torch.dtype:
        return self._k.dtype

    @property
    def has_precision_key(self) -> bool:
        """Whether the cache stores per-key precisions."""
        return self._pi is not None

    @property
    def lengths(self) -> Tensor:
        """Tokens stored per batch row: int32 [B] on the cache's device (a copy)."""
        return self._lengths.clone()

    def max_length(self) -> int:
        """The longest row's length (a Python int; no device synchronisation)."""
        return max(self._host)

    @property
    def k(self) -> Tensor:
        """The keys [B, Lmax, Hkv, D], a view up to the longest row's length Lmax (positions
        at and beyond a shorter row's length are stale or zero)."""
        return self._k[:, :self.max_length()]

    @property
    def v(self) -> Tensor:
        """The values [B, Lmax, Hkv, Dv], a view up to the longest row's length."""
        return self._v[:, :self.max_length()]

    @property
    def precision_key(self) -> Optional[Tensor]:
        """The per-key precisions [B, Hkv, Lmax] (float32), a view up to the longest row's
        length; None when the cache stores none."""
        return None if self._pi is None else self._pi[:, :, :self.max_length()]

    def reset(self) -> None:
        """Empties every row (lengths 0); the buffers are kept and overwritten later."""
        self._lengths.zero_()
        self._host = [0] * self.batch_size

    def append(self, k_new: Tensor, v_new: Tensor, pi_new: Optional[Tensor] = None,
               new_len: Optional[Tensor] = None) -> Tensor:
        """Writes ``k_new`` [B, L, Hkv, D] and ``v_new`` [B, L, Hkv, Dv] (and ``pi_new``
        [B, Hkv, L], float32 > 0, when the cache stores per-key precisions; required then and
        rejected otherwise) at each row's current length, and advances the lengths by L, or by
        ``new_len`` [B] (int32, 0..L; a ragged append: only the first ``new_len[b]`` tokens of
        row b are stored). Returns the lengths before the append (int32 [B]). Raises ValueError
        (naming the argument) on a shape, dtype or device mismatch, or when a row would exceed
        ``max_len``; nothing is written then."""
        b, h, d, dv = self.batch_size, self.num_kv_heads, self.head_dim, self.head_dim_v
        for t, what in ((k_new, "k_new"), (v_new, "v_new"), (pi_new, "pi_new"),
                        (new_len, "new_len")):
            if t is not None and not isinstance(t, Tensor):
                raise TypeError(f"{what}: expected a torch.Tensor, got {type(t).__name__}")
        if k_new.dim() != 4 or k_new.shape[0] != b or tuple(k_new.shape[2:]) != (h, d):
            raise ValueError(f"k_new: expected shape [{b}, L, {h}, {d}], got "
                             f"{list(k_new.shape)}")
        n = k_new.shape[1]
        if tuple(v_new.shape) != (b, n, h, dv):
            raise ValueError(f"v_new: expected shape [{b}, {n}, {h}, {dv}] (k_new's L), got "
                             f"{list(v_new.shape)}")
        for t, what in ((k_new, "k_new"), (v_new, "v_new")):
            if t.dtype != self.dtype:
                raise ValueError(f"{what}: dtype {t.dtype} differs from the cache's {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{what}: on {t.device}, the cache is on {self.device}")
        if self._pi is None and pi_new is not None:
            raise ValueError("pi_new: this cache stores no per-key precisions (build it with "
                             "precision_key=True)")
        if self._pi is not None:
            if pi_new is None:
                raise ValueError("pi_new: this cache stores per-key precisions; give them "
                                 f"([{b}, {h}, {n}] float32)")
            if tuple(pi_new.shape) != (b, h, n):
                raise ValueError(f"pi_new: expected shape [{b}, {h}, {n}], got "
                                 f"{list(pi_new.shape)}")
            if pi_new.dtype != torch.float32:
                raise ValueError(f"pi_new: expected dtype torch.float32, got {pi_new.dtype}")
            if pi_new.device != self.device:
                raise ValueError(f"pi_new: on {pi_new.device}, the cache is on {self.device}")
        if new_len is None:
            add = [n] * b
        else:
            if tuple(new_len.shape) != (b,) or new_len.dtype != torch.int32:
                raise ValueError(f"new_len: expected an int32 tensor of shape [{b}], got "
                                 f"{new_len.dtype} {list(new_len.shape)}")
            if new_len.device != self.device:
                raise ValueError(f"new_len: on {new_len.device}, the cache is on {self.device}")
            add = [int(x) for x in new_len.tolist()]
            if any(not 0 <= a <= n for a in add):
                raise ValueError(f"new_len: every entry must be in [0, {n}] (L of k_new), got "
                                 f"{add}")
        start = list(self._host)
        over = [i for i in range(b) if start[i] + add[i] > self.max_len]
        if over:
            i = over[0]
            raise ValueError(f"k_new: appending {add[i]} token(s) to row {i} of length "
                             f"{start[i]} overflows max_len={self.max_len} (rows {over})")
        before = self._lengths.clone()
        k_new, v_new = k_new.detach(), v_new.detach()
        pi_new = None if pi_new is None else pi_new.detach()
        if n and len(set(start)) == 1 and all(a == n for a in add):
            s = start[0]  # the common case: equally long rows, the whole block
            self._k[:, s:s + n] = k_new
            self._v[:, s:s + n] = v_new
            if self._pi is not None:
                self._pi[:, :, s:s + n] = pi_new
        elif n:
            dev = self.device
            keep = torch.arange(n, device=dev)[None, :] < torch.tensor(add, device=dev)[:, None]
            bi, ii = torch.nonzero(keep, as_tuple=True)
            pos = torch.tensor(start, device=dev, dtype=torch.long)[bi] + ii
            self._k[bi, pos] = k_new[bi, ii]
            self._v[bi, pos] = v_new[bi, ii]
            if self._pi is not None:
                self._pi[bi, :, pos] = pi_new[bi, :, ii]
        self._host = [s + a for s, a in zip(start, add)]
        self._lengths.copy_(torch.tensor(self._host, dtype=torch.int32))
        return before


class PrecisionAttention(nn.Module):
    """Multi-head precision-weighted self-attention (``nn.Module``) on
    :func:`fep_kernels.attention_with_stats`.

    ``x`` [B, L, E] is projected to queries [B, L, Hq, D], keys and values [B, L, Hkv, D]
    (``nn.Linear``; grouped-query attention when Hkv < Hq: query head h reads key/value head
    h // (Hq / Hkv)); each head attends with the score family ``score``:

    - "dot": s = tau pi q.k;  "gaussian": s = -tau pi |q - k|^2 / 2 (+ (D/2) ln pi);
    - "student_t": s = -((nu + D)/2) ln(1 + tau pi |q - k|^2 / nu) (+ (D/2) ln pi);
    - "laplace": s = -sqrt(tau pi |q - k|^2) (+ (D/2) ln pi);

    with pi = pi_head[h] * pi_key[b, h_kv, j], tau = ``scale`` (None: 1/sqrt(D) for "dot", 1
    otherwise), the (D/2) ln pi term when ``normalizer``, plus ``attn_bias``; the heads' outputs
    are concatenated and projected back to E.

    Arguments: ``embed_dim`` (E); ``num_heads`` (Hq); ``num_kv_heads`` (Hkv, dividing Hq;
    default Hq); ``head_dim`` (D; default E // Hq, which then must divide exactly); ``score``
    (one of the four families); ``nu`` (Student-t's degrees of freedom, > 0, the initial value
    when learned); ``learn_nu`` (Student-t only: a per-head parameter ``log_nu`` [Hq], nu =
    exp(log_nu), so nu stays > 0; otherwise nu is the fixed number); ``learn_precision_head``
    (a per-head parameter ``log_precision_head`` [Hq], pi_head = exp(log_precision_head),
    initially 1; otherwise no per-head precision); ``key_precision`` (a per-key precision per
    key/value head from the projected key: pi_key[b, h, j] = softplus(w_h . k_bjh + c_h) + 1e-6,
    parameters ``key_precision_weight`` [Hkv, D] (initially 0) and ``key_precision_bias``
    [Hkv] (initially so that pi_key = 1)); ``causal`` and ``window`` (a causal sliding window of
    that many keys, None for none) masks; ``bias`` (biases in the four projections);
    ``scale``; ``normalizer``; ``device`` and ``dtype`` of the parameters.

    Works with autograd (gradients of every parameter, nu and the precisions included),
    ``torch.autocast`` (q, k, v in the autocast dtype, precisions and nu in float32) and
    ``torch.compile(fullgraph=True)`` (without a cache). Argument errors raise TypeError or
    ValueError naming the argument.
    """

    log_nu: Optional[nn.Parameter]
    log_precision_head: Optional[nn.Parameter]
    key_precision_weight: Optional[nn.Parameter]
    key_precision_bias: Optional[nn.Parameter]

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, score: str = "student_t", nu: float = 5.0,
                 learn_nu: bool = True, learn_precision_head: bool = True,
                 key_precision: bool = False, causal: bool = False,
                 window: Optional[int] = None, bias: bool = True,
                 scale: Optional[float] = None, normalizer: bool = True,
                 device: Optional[Union[torch.device, str]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        e = _positive_int(embed_dim, "embed_dim")
        hq = _positive_int(num_heads, "num_heads")
        hkv = hq if num_kv_heads is None else _positive_int(num_kv_heads, "num_kv_heads")
        if hq % hkv:
            raise ValueError(f"num_kv_heads: {hkv} does not divide num_heads={hq}")
        if head_dim is None:
            if e % hq:
                raise ValueError(f"num_heads: {hq} does not divide embed_dim={e} (or give "
                                 "head_dim)")
            d = e // hq
        else:
            d = _positive_int(head_dim, "head_dim")
        if not isinstance(score, str) or score not in _SCORES:
            raise ValueError(f"score: {score!r} is not one of {list(_SCORES)}")
        if isinstance(nu, bool) or not isinstance(nu, (int, float)) or not (
                0.0 < float(nu) < float("inf")):
            raise ValueError(f"nu: expected a finite number > 0, got {nu!r}")
        if window is not None:
            window = _positive_int(window, "window")
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
                    0.0 < float(scale) < float("inf")):
                raise ValueError(f"scale: expected a finite number > 0 or None, got {scale!r}")
            scale = float(scale)
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        self.embed_dim, self.num_heads, self.num_kv_heads, self.head_dim = e, hq, hkv, d
        self.score, self.causal, self.window = score, bool(causal), window
        self.scale, self.normalizer = scale, bool(normalizer)
        self.nu = float(nu)
        fk = dict(device=device, dtype=dtype)
        self.q_proj = nn.Linear(e, hq * d, bias=bias, **fk)
        self.k_proj = nn.Linear(e, hkv * d, bias=bias, **fk)
        self.v_proj = nn.Linear(e, hkv * d, bias=bias, **fk)
        self.out_proj = nn.Linear(hq * d, e, bias=bias, **fk)
        f32 = dict(device=device, dtype=torch.float32)
        self.log_nu = (nn.Parameter(torch.full((hq,), math.log(self.nu), **f32))
                       if learn_nu and score == "student_t" else None)
        self.log_precision_head = (nn.Parameter(torch.zeros(hq, **f32))
                                   if learn_precision_head else None)
        if key_precision:
            self.key_precision_weight = nn.Parameter(torch.zeros(hkv, d, **f32))
            self.key_precision_bias = nn.Parameter(torch.full((hkv,), _PI_BIAS_INIT, **f32))
        else:
            self.key_precision_weight = None
            self.key_precision_bias = None

    def extra_repr(self) -> str:
        s = (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, "
             f"num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, "
             f"score={self.score!r}")
        if self.score == "student_t":
            s += f", nu={'learned' if self.log_nu is not None else self.nu}"
        s += (f", precision_head={'learned' if self.log_precision_head is not None else None}"
              f", key_precision={self.key_precision_weight is not None}, causal={self.causal}")
        if self.window is not None:
            s += f", window={self.window}"
        return s

    # -- the learned quantities -------------------------------------------------------------
    def nu_value(self) -> Union[Tensor, float]:
        """nu as the attention call takes it: exp(log_nu) [Hq] when learned, else the number."""
        return self.log_nu.exp() if self.log_nu is not None else self.nu

    def precision_head(self) -> Optional[Tensor]:
        """The per-head precision exp(log_precision_head) [Hq] (float32), None when not
        learned."""
        return None if self.log_precision_head is None else self.log_precision_head.exp()

    def key_precisions(self, k: Tensor) -> Optional[Tensor]:
        """The per-key precisions [B, Hkv, L] (float32) of projected keys ``k`` [B, L, Hkv, D]:
        softplus(w_h . k + c_h) + 1e-6; None without ``key_precision``."""
        if self.key_precision_weight is None:
            return None
        z = (k.float() * self.key_precision_weight).sum(-1) + self.key_precision_bias
        return (F.softplus(z) + _PI_FLOOR).transpose(1, 2)

    def make_cache(self, batch_size: int, max_len: int,
                   device: Optional[Union[torch.device, str]] = None,
                   dtype: Optional[torch.dtype] = None) -> KVCache:
        """A :class:`KVCache` fitting this module (Hkv, D, per-key precisions when
        ``key_precision``), on the parameters' device and in their dtype unless given."""
        w = self.k_proj.weight
        return KVCache(batch_size, max_len, self.num_kv_heads, self.head_dim,
                       precision_key=self.key_precision_weight is not None,
                       device=w.device if device is None else device,
                       dtype=w.dtype if dtype is None else dtype)

    # -- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor, attn_bias: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, kv_len: Optional[Tensor] = None,
                cache: Optional[KVCache] = None, need_stats: bool = False
                ) -> Union[Tensor, Tuple[Tensor, Tensor, Tensor]]:
        """``x`` [B, L, E] -> y [B, L, E]; with ``need_stats`` ``(y, lse, e)``, lse and e
        [B, Hq, L] float32 (log-normaliser and expected precision-weighted error per query,
        both differentiable).

        ``attn_bias`` (float, added to the scores) and ``attn_mask`` (bool, True = keep)
        broadcast to [B, Hq, L, Lk] (1 to 4 dims), Lk the number of keys (L without a cache).
        ``kv_len`` int32 [B]: without a cache, the valid length of each row of ``x`` (keys at
        and beyond it are padding); with a cache, how many of this call's tokens of each row
        are valid and are appended (a ragged prefill of right-padded prompts; the outputs of
        padding positions are meaningless).

        ``cache`` (a :class:`KVCache`, e.g. :meth:`make_cache`): this call's keys and values
        (and per-key precisions) are appended to each row at its current length, and the
        queries attend to the whole cache (masked to each row's length; with ``causal`` query i
        of a row of previous length s sees keys j <= s + i, so a prefill of L tokens followed by
        1-token steps reproduces the full causal forward). Lk is then the longest row's length
        after the append. Keys are cast to the cache's dtype; the cache keeps no gradient
        (decode under ``torch.no_grad()``: a backward through a cached call after a later append
        raises PyTorch's in-place modification error). Calls with a cache are not for
        ``torch.compile`` (the cache's lengths live on the host).
        """
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"x: expected shape [B, L, {self.embed_dim}] (embed_dim), got "
                             f"{list(x.shape)}")
        bsz, n, _ = x.shape
        hq, hkv, d = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(bsz, n, hq, d)
        k = self.k_proj(x).view(bsz, n, hkv, d)
        v = self.v_proj(x).view(bsz, n, hkv, d)
        pi_key = self.key_precisions(k)
        causal, window = self.causal, self.window
        if cache is not None:
            k, v, pi_key, kv_len, attn_mask, causal, window = self._use_cache(
                cache, k, v, pi_key, kv_len, attn_mask, n)
        o, lse, e = attention_with_stats(
            q, k, v, precision_key=pi_key, precision_head=self.precision_head(),
            score=self.score, nu=self.nu_value(), scale=self.scale, causal=causal,
            window=window, normalizer=self.normalizer, kv_len=kv_len, layout="blhd",
            bias=attn_bias, attn_mask=attn_mask)
        y = self.out_proj(o.reshape(bsz, n, hq * d))
        return (y, lse, e) if need_stats else y

    def _use_cache(self, cache: KVCache, k: Tensor, v: Tensor, pi_key: Optional[Tensor],
                   kv_len: Optional[Tensor], attn_mask: Optional[Tensor], n: int) -> Any:
        """Appends to ``cache`` and returns the attention's (k, v, pi_key, kv_len, attn_mask,
        causal, window) over it."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache, got {type(cache).__name__}")
        if (cache.num_kv_heads, cache.head_dim, cache.head_dim_v) != (
                self.num_kv_heads, self.head_dim, self.head_dim):
            raise ValueError(f"cache: holds Hkv={cache.num_kv_heads}, D={cache.head_dim}, "
                             f"Dv={cache.head_dim_v}; this module needs "
                             f"{self.num_kv_heads}, {self.head_dim}, {self.head_dim}")
        if cache.has_precision_key != (pi_key is not None):
            raise ValueError("cache: per-key precisions stored "
                             f"({cache.has_precision_key}) must match key_precision "
                             f"({pi_key is not None}); use make_cache")
        if k.shape[0] != cache.batch_size:
            raise ValueError(f"x: batch {k.shape[0]} differs from the cache's "
                             f"batch_size={cache.batch_size}")
        start_host = list(cache._host)
        start = cache.append(k.to(cache.dtype), v.to(cache.dtype), pi_key, new_len=kv_len)
        lk = cache.max_length()
        lengths = cache._lengths.clone()  # the next append must not change what autograd saved
        ragged = kv_len is not None or len(set(start_host)) != 1
        if not ragged:
            # equally long rows: Lk = every row's length; the op's bottom-right-aligned
            # causal/window masks are each row's positions
            return (cache._k[:, :lk], cache._v[:, :lk],
                    None if cache._pi is None else cache._pi[:, :, :lk], lengths, attn_mask,
                    self.causal, self.window)
        # rows of different lengths: query i of row b sits at position start[b] + i
        if self.causal or self.window is not None:
            dev = lengths.device
            pos_q = start.to(torch.long)[:, None] + torch.arange(n, device=dev)[None, :]
            j = torch.arange(lk, device=dev)
            keep = torch.ones(k.shape[0], n, lk, dtype=torch.bool, device=dev)
            if self.causal:
                keep = keep & (j[None, None, :] <= pos_q[:, :, None])
            if self.window is not None:
                keep = keep & (j[None, None, :] > pos_q[:, :, None] - self.window)
            keep = keep[:, None]
            if attn_mask is not None:
                if not isinstance(attn_mask, Tensor) or not 1 <= attn_mask.dim() <= 4:
                    raise ValueError("attn_mask: expected a bool tensor of 1 to 4 dims "
                                     f"broadcastable to [B, Hq, {n}, {lk}]")
                m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
                keep = keep & m.to(torch.bool)
            attn_mask = keep
        return (cache._k[:, :lk], cache._v[:, :lk],
                None if cache._pi is None else cache._pi[:, :, :lk], lengths, attn_mask,
                False, None)
