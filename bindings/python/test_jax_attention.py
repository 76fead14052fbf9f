"""Tests of ``fep_kernels.jax``'s attention: the XLA FFI calls against a pure-JAX float64
implementation of the same scores (``jax_enable_x64``), for every family, forward and
``jax.grad`` with respect to q, k, v, both precisions, a per-head nu and the bias, under
``jax.jit``; ``jax.vmap`` folded into one call (checked on the jaxpr) and its per-entry fallback,
against a loop of single calls; argument and value errors.
Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_jax_attention.py`` (or pytest).

Needs JAX; without it, it prints that it was skipped and exits 0."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import jax
except ImportError as e:  # pragma: no cover
    skip_module("test_jax_attention.py", f"{e.name} is not installed")

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import fep_kernels as fk  # noqa: E402
import fep_kernels.jax as fkj  # noqa: E402
from _runner import expect, run_functions  # noqa: E402

SCORES = ("dot", "gaussian", "student_t", "laplace")


def reference(q, k, v, pk=None, ph=None, score="dot", nu=5.0, scale=None, causal=False,
              window=None, normalizer=True, kv_len=None, bias=None, mask=None):
    """(o, lse, e) in float64, written plainly from the definition ([B, H, L, D] layout)."""
    q, k, v = (jnp.asarray(t, jnp.float64) for t in (q, k, v))
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    k, v = jnp.repeat(k, g, axis=1), jnp.repeat(v, g, axis=1)
    pi = jnp.ones((b, hq, 1, lk))
    if pk is not None:
        pi = pi * jnp.repeat(jnp.asarray(pk, jnp.float64), g, axis=1)[:, :, None, :]
    if ph is not None:
        pi = pi * jnp.asarray(ph, jnp.float64)[None, :, None, None]
    d2 = ((q[:, :, :, None, :] - k[:, :, None, :, :]) ** 2).sum(-1)
    tau = scale if scale is not None else (1 / np.sqrt(d) if score == "dot" else 1.0)
    nu = jnp.asarray(nu, jnp.float64).reshape(-1)[None, :, None, None] \
        if not isinstance(nu, float) else nu
    if score == "dot":
        s = tau * pi * jnp.einsum("bhid,bhjd->bhij", q, k)
    elif score == "gaussian":
        s = -tau * pi * d2 / 2
    elif score == "student_t":
        s = -((nu + d) / 2) * jnp.log1p(tau * pi * d2 / nu)
    else:
        s = -jnp.sqrt(tau * pi * d2)
    if score != "dot" and normalizer:
        s = s + (d / 2) * jnp.log(pi)
    if bias is not None:
        s = s + jnp.asarray(bias, jnp.float64)
    i = jnp.arange(lq)[:, None]
    j = jnp.arange(lk)[None, :]
    vis = jnp.ones((b, hq, lq, lk), bool)
    if causal or window is not None:
        vis = vis & (j <= i + lk - lq)
    if window is not None:
        vis = vis & (j > i + lk - lq - window)
    if kv_len is not None:
        vis = vis & (j[None, None] < jnp.asarray(kv_len)[:, None, None, None])
    if mask is not None:
        vis = vis & jnp.broadcast_to(mask, vis.shape)
    s = jnp.where(vis, s, -jnp.inf)
    lse = jax.scipy.special.logsumexp(s, axis=-1)
    w = jnp.where(vis, jnp.exp(s - lse[..., None]), 0.0)
    o = jnp.einsum("bhij,bhjd->bhid", w, v)
    e = (w * pi * d2).sum(-1)
    return o, lse, e


def case(seed=0, b=2, hq=4, hkv=2, lq=9, lk=11, d=8, dv=6):
    r = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(r.standard_normal(s), jnp.float32)  # noqa: E731
    q, k, v = f(b, hq, lq, d), f(b, hkv, lk, d), f(b, hkv, lk, dv)
    pk = jnp.asarray(0.5 + r.random((b, hkv, lk)), jnp.float32)
    ph = jnp.asarray(0.5 + r.random(hq), jnp.float32)
    return q, k, v, pk, ph


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def loss_weights(o_shape, rows, seed=7):
    r = np.random.default_rng(seed)
    return (jnp.asarray(r.standard_normal(o_shape)), jnp.asarray(r.standard_normal(rows)),
            jnp.asarray(r.standard_normal(rows)))


def test_every_family_forward_and_gradients_under_jit():
    for score in SCORES:
        q, k, v, pk, ph = case(1)
        nu = jnp.asarray([2.0, 3.0, 5.0, 8.0], jnp.float32) if score == "student_t" else 5.0
        go, gl, ge = loss_weights((2, 4, 9, 6), (2, 4, 9))

        def ours(q, k, v, pk, ph, nu_arg):
            nu_ = nu_arg if score == "student_t" else 5.0  # an array nu is Student-t's only
            o, lse, e = fkj.attention_with_stats(q, k, v, pk, ph, score=score, nu=nu_,
                                                 causal=True)
            return (o * go).sum() + (lse * gl).sum() + (e * ge).sum(), (o, lse, e)

        def ref(q, k, v, pk, ph, nu):
            o, lse, e = reference(q, k, v, pk, ph, score=score, nu=nu, causal=True)
            return (o * go).sum() + (lse * gl).sum() + (e * ge).sum(), (o, lse, e)

        argnums = (0, 1, 2, 3, 4) + ((5,) if score == "student_t" else ())
        (_, got), dgot = jax.jit(jax.value_and_grad(ours, argnums, has_aux=True))(
            q, k, v, pk, ph, nu)
        (_, want), dwant = jax.value_and_grad(ref, argnums, has_aux=True)(
            *(jnp.asarray(t, jnp.float64) for t in (q, k, v, pk, ph)),
            jnp.asarray(nu, jnp.float64) if score == "student_t" else nu)
        for a, w, what in zip(got, want, ("o", "lse", "e")):
            assert rel(a, w) < 2e-5, (score, what, rel(a, w))
        for a, w, what in zip(dgot, dwant, ("dq", "dk", "dv", "dpk", "dph", "dnu")):
            assert a.dtype == jnp.float32, (score, what, a.dtype)
            assert rel(a, w) < 2e-4, (score, what, rel(a, w))


def test_options_bias_mask_kv_len_window_gqa_blhd():
    q, k, v, pk, _ = case(2, lq=12, lk=12)
    r = np.random.default_rng(3)
    bias = jnp.asarray(r.standard_normal((4, 12, 12)), jnp.float32)        # [Hq, Lq, Lk]
    mask = jnp.asarray(r.random((2, 1, 1, 12)) > 0.2)                      # [B, 1, 1, Lk]
    kv_len = jnp.asarray([12, 7], jnp.int32)
    for score in SCORES:
        for kw in (dict(window=4), dict(kv_len=kv_len), dict(attn_mask=mask, causal=True)):
            def ours(q, k, v, bias):
                return fkj.attention(q, k, v, pk, score=score, nu=3.0, bias=bias, **kw)

            def ref(q, k, v, bias):
                rk = dict(kw)
                if "attn_mask" in rk:
                    rk["mask"] = rk.pop("attn_mask")
                return reference(q, k, v, pk, score=score, nu=3.0, bias=bias, **rk)[0]

            got, vjp = jax.vjp(jax.jit(ours), q, k, v, bias)
            want, vjp_ref = jax.vjp(ref, *(jnp.asarray(t, jnp.float64) for t in (q, k, v, bias)))
            assert rel(got, want) < 2e-5, (score, kw)
            ct = jnp.asarray(np.random.default_rng(4).standard_normal(got.shape), jnp.float32)
            for a, w, what in zip(vjp(ct), vjp_ref(ct.astype(jnp.float64)),
                                  ("dq", "dk", "dv", "dbias")):
                assert rel(a, w) < 2e-4, (score, kw, what, rel(a, w))
    # [B, L, H, D] (flax's layout) gives the transposed results of [B, H, L, D]
    t = lambda x: jnp.swapaxes(x, 1, 2)  # noqa: E731
    o1 = fkj.attention(q, k, v, score="gaussian", causal=True)
    o2 = fkj.attention(t(q), t(k), t(v), score="gaussian", causal=True, layout="blhd")
    assert rel(t(o2), o1) < 1e-6
    g1 = jax.grad(lambda q: fkj.attention(q, k, v, score="laplace").sum())(q)
    g2 = jax.grad(lambda q: fkj.attention(q, t(k), t(v), score="laplace", layout="blhd").sum())(
        t(q))
    assert rel(t(g2), g1) < 1e-5


def n_calls(f, *args):
    """How many fep_attention_* custom calls the lowered computation of f holds."""
    text = jax.jit(f).lower(*args).as_text()
    return text.count("fep_attention_forward"), text.count("fep_attention_backward")


def test_vmap_folds_into_the_batch_and_matches_single_calls():
    q, k, v, pk, ph = case(5)
    qs, ks, vs = (jnp.stack([t, 2 * t, -t]) for t in (q, k, v))
    pks = jnp.stack([pk, pk * 2, pk * 0.5])
    bias = jnp.asarray(np.random.default_rng(6).standard_normal((1, 4, 1, 11)), jnp.float32)

    def f(q, k, v, pk, bias):
        return fkj.attention(q, k, v, pk, score="student_t", nu=4.0, causal=True, bias=bias)

    def loss(q, k, v, pk, bias):
        return (f(q, k, v, pk, bias) ** 2).sum()

    cases = [((0, 0, 0, 0, None), (qs, ks, vs, pks, bias)),      # everything mapped but the bias
             ((0, None, None, None, None), (qs, k, v, pk, bias)),  # only q mapped
             ((0, 0, 0, None, 0), (qs, ks, vs, pk, jnp.stack([bias, 2 * bias, bias])))]
    for axes, args in cases:
        got = jax.vmap(f, in_axes=axes)(*args)
        grads = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), in_axes=axes)(*args)
        for i in range(3):
            one = [a[i] if ax == 0 else a for a, ax in zip(args, axes)]
            assert rel(got[i], f(*one)) < 1e-6, axes
            for g, w in zip(grads, jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*one)):
                assert rel(g[i], w) < 1e-5, axes
        # one forward call and one backward call for the whole map (folded, no loop)
        assert n_calls(jax.vmap(f, in_axes=axes), *args) == (1, 0), axes
        assert n_calls(jax.vmap(jax.grad(loss), in_axes=axes), *args) == (1, 1), axes
    # a mapped per-head precision cannot fold into B: one call per entry (lax.map), same values
    phs = jnp.stack([ph, 2 * ph, 0.5 * ph])
    g = jax.vmap(lambda ph: fkj.attention(q, k, v, precision_head=ph, score="gaussian"))(phs)
    for i in range(3):
        assert rel(g[i], fkj.attention(q, k, v, precision_head=phs[i], score="gaussian")) < 1e-6
    dg = jax.vmap(jax.grad(lambda ph: (fkj.attention(q, k, v, precision_head=ph,
                                                     score="gaussian") ** 2).sum()))(phs)
    for i in range(3):
        w = jax.grad(lambda ph: (fkj.attention(q, k, v, precision_head=ph,
                                               score="gaussian") ** 2).sum())(phs[i])
        assert rel(dg[i], w) < 1e-5


def test_errors():
    q, k, v, pk, _ = case(8)
    expect(ValueError, lambda: fkj.attention(q.astype(jnp.float64), k, v), "q: dtype float64")
    expect(ValueError, lambda: fkj.attention(q, k, v, score="cosine"), "score")
    expect(ValueError, lambda: fkj.attention(q, k, v, precision_key=pk[:1]), "precision_key")
    expect(ValueError, lambda: fkj.attention(q, k, v, bias=jnp.ones((3, 9, 11), jnp.float32)),
           "bias")
    expect(TypeError, lambda: fkj.attention(q, k, v, score="student_t", nu="4"), "nu")
    expect(ValueError, lambda: fkj.attention(q, k, v, nu=jnp.ones(4, jnp.float32)),
           "student_t")
    # a value only the library sees: a precision <= 0, reported when the call runs
    bad = pk.at[1, 0, 3].set(-1.0)
    try:
        jax.block_until_ready(fkj.attention(q, k, v, precision_key=bad, score="gaussian"))
    except Exception as e:  # XlaRuntimeError (its module moved between jaxlib versions)
        assert "`precision_key`" in str(e), str(e)  # the caller's name, not the C ABI's
    else:
        raise AssertionError("a negative precision was accepted")


if __name__ == "__main__":
    try:
        fk.load()
    except (OSError, RuntimeError) as e:
        print(f"test_jax_attention.py: cannot load the library: {e}")
        sys.exit(1)
    print(f"fep-kernels {fk.version()} at {fk._lib_path}, jax {jax.__version__}")
    sys.exit(run_functions(globals()))
