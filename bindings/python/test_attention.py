#!/usr/bin/env python3
"""Tests of attention_forward, attention_backward and attention_merge of
bindings/python/fep_kernels.py against the real library, on CPU tensors, and on CUDA (or ROCm)
tensors when there is a GPU.

The reference is a small pure-PyTorch float64 implementation of DESIGN.md section 4.1, written
from the contract and not from the library (d2 = |q_i - k_j|^2, pi = pi_h pi_j, tau = scale):

    dot s = tau pi q.k; gaussian s = -tau pi d2 / 2; student_t s = -((nu+D)/2) ln(1 + tau pi d2/nu);
    laplace s = -sqrt(tau pi d2); the distance families + (D/2) ln pi with the normaliser;
    visible keys: j <= i + Lk - Lq (causal), j > i + Lk - Lq - W (window), j < kv_len[b];
    o = softmax(s) v, lse = logsumexp(s), e = sum_j w pi d2; no visible key: o = 0, lse = -inf, e = 0

plus a couple of the PyTorch fixture cases (tests/fixtures/attention_torch.json, inputs rebuilt
with the SplitMix64 generator of ATTENTION-CONVENTIONS.md section 2). The backward is checked
against torch.autograd through a float64 version of the same maths (masking written so that
fully masked rows have zero gradients), of the loss L = sum(o d_o) + sum(e d_e); the merge against
the unsplit forward.

Run from the repository root, after `cargo build`:

    FEP_KERNELS_LIB=target/debug/libfep_kernels.so python3 bindings/python/test_attention.py

It prints one line per test and closes with "N passed, N failed" (exit status 1 on a failure).
Needs PyTorch; without it, it prints that it was skipped and exits 0.
"""

import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_attention.py", f"{e.name} is not installed")

import fep_kernels as fk
from _runner import run_tests

F64 = torch.float64
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# ---- the reference ----


def reference(q, k, v, score="dot", nu=5.0, scale=None, causal=False, window=None,
              normalizer=True, pi_head=None, pi_key=None, kv_len=None):
    """float64 (o, lse, e) for BHLD inputs."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    g = Hq // Hkv
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    tau = scale if scale is not None else (1 / math.sqrt(D) if score == "dot" else 1.0)
    ph = pi_head.to(F64) if pi_head is not None else torch.ones(Hq, dtype=F64)
    pk = pi_key.to(F64) if pi_key is not None else torch.ones(B, Hkv, Lk, dtype=F64)
    pi = ph.view(1, Hq, 1, 1) * pk.repeat_interleave(g, 1).view(B, Hq, 1, Lk)
    d2 = ((q.unsqueeze(3) - k.unsqueeze(2)) ** 2).sum(-1)
    if score == "dot":
        s = tau * pi * (q @ k.transpose(-1, -2))
    elif score == "gaussian":
        s = -0.5 * tau * pi * d2
    elif score == "student_t":
        s = -((nu + D) / 2) * torch.log1p(tau * pi * d2 / nu)
    else:
        s = -torch.sqrt(tau * pi * d2)
    if score != "dot" and normalizer:
        s = s + (D / 2) * torch.log(pi)
    i = torch.arange(Lq).view(Lq, 1)
    j = torch.arange(Lk).view(1, Lk)
    vis = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if causal or window is not None:
        vis &= j <= i + Lk - Lq
    if window is not None:
        vis &= j > i + Lk - Lq - window
    if kv_len is not None:
        vis &= (j.view(1, 1, 1, Lk) < kv_len.view(B, 1, 1, 1))
    s = s.masked_fill(~vis, -math.inf)
    lse = torch.logsumexp(s, -1)
    w = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    o = w @ v
    e = (w * pi * d2).sum(-1)
    return o, lse, e


def rel(a, ref):
    """max |a - ref| / max(1, |ref|), with -inf required to match exactly."""
    a, ref = a.to(F64), ref.to(F64)
    inf = torch.isinf(ref) | torch.isinf(a)
    if not torch.equal(a[inf], ref[inf]):
        return math.inf
    d = (a[~inf] - ref[~inf]).abs() / ref[~inf].abs().clamp(min=1)
    return d.max().item() if d.numel() else 0.0


def assert_close(what, got, want, tol):
    for name, g, w in zip(("o", "lse", "e"), got, want):
        r = rel(g, w)
        assert r <= tol, f"{what}: {name} off by {r:.3g} (tol {tol:.1g})"


def problem(B=2, Hq=4, Hkv=2, Lq=7, Lk=9, D=16, Dv=8, seed=0, prec=True, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (0.5 * torch.randn(*s, generator=g)).to(device)  # noqa: E731
    kw = {}
    if prec:
        kw["pi_head"] = (0.5 + torch.rand(Hq, generator=g)).to(device)
        kw["pi_key"] = (0.25 + 2 * torch.rand(B, Hkv, Lk, generator=g)).to(device)
    return t(B, Hq, Lq, D), t(B, Hkv, Lk, D), t(B, Hkv, Lk, Dv), kw


F32_TOL = 2e-6
# The fast CPU path and the GPUs accumulate in f32 (DESIGN §6: 1e-5 for f32).
FAST_F32_TOL = 1e-5

# ---- tests ----


def test_every_score_against_the_reference():
    q, k, v, kw = problem()
    for score in ("dot", "gaussian", "student_t", "laplace"):
        for normalizer in (True, False):
            got = fk.attention_forward(q, k, v, score=score, nu=3.0, normalizer=normalizer, **kw)
            want = reference(q, k, v, score=score, nu=3.0, normalizer=normalizer, **kw)
            assert got[0].dtype == torch.float32 and got[1].shape == (2, 4, 7)
            assert_close(f"{score} norm={normalizer}", got, want, F32_TOL)
    got = fk.attention_forward(q, k, v, score="gaussian", scale=0.3)
    assert_close("scale 0.3", got, reference(q, k, v, score="gaussian", scale=0.3), F32_TOL)


def test_masks_causal_window_kv_len():
    q, k, v, kw = problem(B=3, seed=1)
    kv_len = torch.tensor([9, 0, 4], dtype=torch.int32)
    for causal, window, kl in ((True, None, None), (False, 3, None), (True, None, kv_len),
                               (False, 2, kv_len), (False, None, kv_len)):
        args = dict(score="student_t", causal=causal, window=window, kv_len=kl, **kw)
        got = fk.attention_forward(q, k, v, **args)
        want = reference(q, k, v, **args)
        assert_close(f"causal={causal} window={window} kv_len={kl}", got, want, F32_TOL)
        if kl is not None:  # batch 1 has no keys: o = 0, lse = -inf, e = 0
            assert torch.all(got[0][1] == 0) and torch.all(got[1][1] == -math.inf)
            assert torch.all(got[2][1] == 0)


def test_gqa_and_mqa():
    for hkv in (4, 2, 1):
        q, k, v, kw = problem(Hkv=hkv, seed=2 + hkv)
        got = fk.attention_forward(q, k, v, score="laplace", causal=True, **kw)
        assert_close(f"Hkv={hkv}", got, reference(q, k, v, score="laplace", causal=True, **kw),
                     F32_TOL)


def test_blhd_strides_without_copies():
    q, k, v, kw = problem(seed=5)
    ql, kl, vl = (x.transpose(1, 2).contiguous() for x in (q, k, v))  # [B, L, H, D] memory
    o, lse, e = fk.attention_forward(ql, kl, vl, score="gaussian", layout="blhd", **kw)
    assert o.shape == (2, 7, 4, 8), o.shape
    want = reference(q, k, v, score="gaussian", **kw)
    assert_close("blhd", (o.transpose(1, 2), lse, e), want, F32_TOL)
    # Views of a packed qkv (no copy): q, k, v are strided slices of one tensor.
    B, L, H, D = 2, 6, 2, 16
    qkv = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(6))
    qs, ks, vs = qkv.unbind(2)
    assert not qs.is_contiguous()
    out = torch.full((B, L, H, D), 7.0)
    o, lse, e = fk.attention_forward(qs, ks, vs, layout="blhd", causal=True, out=out)
    assert o is out
    want = reference(qs.transpose(1, 2), ks.transpose(1, 2), vs.transpose(1, 2), causal=True)
    assert_close("packed qkv", (o.transpose(1, 2), lse, e), want, F32_TOL)


def test_half_precision_inputs():
    q, k, v, kw = problem(seed=7)
    for dtype in (torch.float16, torch.bfloat16):
        qh, kh, vh = (x.to(dtype) for x in (q, k, v))
        o, lse, e = fk.attention_forward(qh, kh, vh, score="student_t", causal=True, **kw)
        assert o.dtype == dtype
        want = reference(qh, kh, vh, score="student_t", causal=True, **kw)  # same rounded inputs
        tol = 2 ** -10 if dtype == torch.float16 else 2 ** -7
        assert_close(str(dtype), (o, lse, e), (want[0].to(dtype), want[1], want[2]), tol)


# ---- the fixtures ----

GAMMA, MUL1, MUL2, M64 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 2**64 - 1


def mix64(z):
    z ^= z >> 30
    z = (z * MUL1) & M64
    z ^= z >> 27
    z = (z * MUL2) & M64
    return z ^ (z >> 31)


def bits(seed, tid, n):
    base = mix64((mix64((seed + GAMMA) & M64) ^ tid) + GAMMA & M64)
    return [mix64((base + (i + 1) * GAMMA) & M64) for i in range(n)]


def uniform_pm1(b):
    return ((b >> 11) - (1 << 52)) * 2.0**-52


def precision(b):
    n = b >> 11
    return ((1 << 51) + (n & ((1 << 51) - 1))) * 2.0 ** ((n >> 51) - 53)


def fixture_case(c):
    """(inputs, kwargs, expected (o rows, lse, e)) of a fixture case."""
    sh, seed = c["shape"], c["seed"]
    B, Hq, Hkv, Lq, Lk, D, Dv = (sh[x] for x in ("B", "Hq", "Hkv", "Lq", "Lk", "D", "Dv"))
    sc = c["qk_scale"]
    ten = lambda tid, shape, s: torch.tensor(  # noqa: E731
        [uniform_pm1(b) * s for b in bits(seed, tid, math.prod(shape))], dtype=F64).view(shape)
    q, k, v = ten(1, [B, Hq, Lq, D], sc), ten(2, [B, Hkv, Lk, D], sc), ten(3, [B, Hkv, Lk, Dv], 1)
    pr, kw = c["precision"], {}
    if pr["kind"] in ("head", "both"):
        kw["pi_head"] = torch.tensor([precision(b) * pr["head_mul"] for b in bits(seed, 4, Hq)],
                                     dtype=F64)
    if pr["kind"] in ("key", "both"):
        kw["pi_key"] = torch.tensor(
            [precision(b) * pr["key_mul"][(i % Lk) % 2]
             for i, b in enumerate(bits(seed, 5, B * Hkv * Lk))], dtype=F64).view(B, Hkv, Lk)
    m = c["mask"]
    if m["kv_len"] is not None:
        kw["kv_len"] = torch.tensor(m["kv_len"], dtype=torch.int32)
    score = {"studentt": "student_t"}.get(c["family"], c["family"])
    kw.update(score=score, nu=c.get("nu") or 5.0, causal=m["causal"], window=m["window"],
              normalizer=c["normalizer"], scale=None if c["tau_default"] else c["tau"])
    dec = lambda t: torch.tensor(  # noqa: E731
        [-math.inf if x == "-inf" else x for x in t["data"]], dtype=F64).view(t["shape"])
    return (q, k, v), kw, (dec(c["o"]), dec(c["lse"]), dec(c["e"])), c["o_rows"]


def test_fixture_cases():
    with open(os.path.join(ROOT, "tests", "fixtures", "attention_torch.json")) as f:
        cases = {c["name"]: c for c in json.load(f)["cases"]}
    for name in ("first/gaussian/both/norm/causal_varlen", "gqa/laplace/8x2",
                 "mask/studentt/window_varlen", "tau/dot/0.5"):
        (q, k, v), kw, (o_ref, lse_ref, e_ref), rows = fixture_case(cases[name])
        # Our reference reproduces the fixture in float64 ...
        o64, lse64, e64 = reference(q, k, v, **kw)
        assert_close(f"{name} (reference)", (o64[:, :, rows], lse64, e64),
                     (o_ref, lse_ref, e_ref), 1e-10)
        # ... and the library, on the float32-rounded inputs, the reference on those: the f64
        # CPU reference at F32_TOL (its only rounding is the f32 output's), the fast CPU path
        # (f32 accumulation, issue 24) at FAST_F32_TOL.
        q32, k32, v32 = (x.float() for x in (q, k, v))
        kw32 = {n: (x.float() if n.startswith("pi_") else x) for n, x in kw.items()}
        want = reference(q32, k32, v32, **kw32)
        with fk.cpu_reference():
            got = fk.attention_forward(q32, k32, v32, **kw32)
        assert_close(f"{name} (cpu_reference)", got, want, F32_TOL)
        got = fk.attention_forward(q32, k32, v32, **kw32)
        assert_close(name, got, want, FAST_F32_TOL)


# ---- bad input ----


def expect_error(exc, fn, *needles):
    try:
        fn()
    except exc as e:
        msg = str(e)
        for n in needles:
            assert n in msg, f"{exc.__name__} message {msg!r} lacks {n!r}"
        return e
    raise AssertionError(f"expected {exc.__name__} containing {needles}")


def test_bad_arguments():
    q, k, v, kw = problem()
    f = fk.attention_forward
    # Caught by the library (FepError with FEP_ERR_INVALID_ARGUMENT naming the argument).
    e = expect_error(fk.FepError, lambda: f(q, k[:, :, :, :8], v), "`k`", "head dim")
    assert e.status == fk.FEP_ERR_INVALID_ARGUMENT
    expect_error(fk.FepError, lambda: f(q[:, :3], k, v), "`k`", "do not divide")
    expect_error(fk.FepError, lambda: f(q, k, v[:, :, :5]), "`v`")
    expect_error(fk.FepError, lambda: f(q, k, v, score="student_t", nu=0.0), "`nu`")
    expect_error(fk.FepError, lambda: f(q, k, v, scale=math.inf), "`scale`")
    expect_error(fk.FepError, lambda: f(q, k, v, pi_head=torch.tensor([1.0, 0.0, 1.0, 1.0])),
                 "`pi_head`", "pi_head[1] is 0")
    expect_error(fk.FepError, lambda: f(q, k, v, kv_len=torch.tensor([9, 10], dtype=torch.int32)),
                 "`kv_len`")
    expect_error(fk.FepError, lambda: f(q, k, v, out=q[..., :8]), "overlaps")  # o aliases q
    # Caught by the wrapper (ValueError).
    expect_error(ValueError, lambda: f(q, k, v, score="cauchy"), "score")
    expect_error(ValueError, lambda: f(q, k, v, layout="lbhd"), "layout")
    expect_error(ValueError, lambda: f(q[0], k, v), "q", "4-d")
    expect_error(ValueError, lambda: f(q.double(), k.double(), v.double()), "q", "float64")
    expect_error(ValueError, lambda: f(q, k.half(), v), "k", "dtype")
    expect_error(ValueError, lambda: f(q.transpose(2, 3), k, v), "q", "contiguous")
    expect_error(ValueError, lambda: f(q, k, v, pi_head=torch.ones(3)), "pi_head")
    expect_error(ValueError, lambda: f(q, k, v, pi_key=torch.ones(2, 2, 9).double()), "pi_key")
    expect_error(ValueError, lambda: f(q, k, v, kv_len=torch.ones(2)), "kv_len")
    expect_error(ValueError, lambda: f(q, k, v, window=0), "window")
    expect_error(ValueError, lambda: f(q, k, v, scale=-1.0), "scale")
    expect_error(ValueError, lambda: f(q, k, v, out=torch.empty(2, 4, 7, 9)), "out")


def test_cuda_tensors():
    if not torch.cuda.is_available():
        return "SKIPPED: torch.cuda.is_available() is False"
    kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
    if fk.device_count(kind) == 0:
        return f"SKIPPED: the library sees no {kind} device (built without the feature?)"
    # Every family, f32/f16/bf16, BHLD and a strided BLHD view, GQA, masks and both precision
    # kinds, against reference() on the same (dtype-rounded) values; on the current stream.
    tols = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
    for seed, score in enumerate(("dot", "gaussian", "student_t", "laplace")):
        q, k, v, kw = problem(Lq=33, Lk=70, D=32, Dv=64, seed=10 + seed, device="cuda")
        kv_len = torch.tensor([70, 41], dtype=torch.int32, device="cuda")
        for dtype, tol in tols.items():
            qd, kd, vd = (x.to(dtype) for x in (q, k, v))
            got = fk.attention_forward(qd, kd, vd, score=score, causal=True, kv_len=kv_len, **kw)
            torch.cuda.current_stream().synchronize()
            cpu = {n: t.cpu() for n, t in kw.items()}
            want = reference(qd.cpu(), kd.cpu(), vd.cpu(), score=score, causal=True,
                             kv_len=kv_len.cpu(), **cpu)
            assert got[0].is_cuda and got[0].dtype == dtype
            assert_close(f"cuda {score} {dtype}", [t.cpu() for t in got], want, tol)
        # BLHD views of a packed qkv, window, no precisions.
        qkv = torch.randn(2, 40, 3, 2, 64, device="cuda", dtype=torch.float16)
        qs, ks, vs = qkv.unbind(2)
        got = fk.attention_forward(qs, ks, vs, score=score, layout="blhd", window=9)
        want = reference(*(x.transpose(1, 2).cpu() for x in (qs, ks, vs)), score=score, window=9)
        assert_close(f"cuda blhd {score}", (got[0].transpose(1, 2).cpu(), got[1].cpu(),
                                            got[2].cpu()), want, 2e-2)
    # Bad data found by the device scan.
    q, k, v, kw = problem(D=32, Dv=32, device="cuda")
    kw["pi_key"][1, 0, 3] = -1.0
    e = expect_error(fk.FepError, lambda: fk.attention_forward(q, k, v, score="gaussian", **kw),
                     "precision.key")
    assert e.status == fk.FEP_ERR_INVALID_ARGUMENT, e


# ---- backward (torch.autograd of the same maths in float64) ----


def differentiable(q, k, v, pi_head, pi_key, nu, score="dot", scale=None, causal=False,
                   window=None, normalizer=True, kv_len=None):
    """float64 (o, e) of reference()'s maths with every masked score excluded by torch.where, so
    that rows with no visible key give o = 0, e = 0 and zero gradients (no NaN)."""
    B, Hq, Lq, D = q.shape
    _, Hkv, Lk, _ = k.shape
    g = Hq // Hkv
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    tau = scale if scale is not None else (1 / math.sqrt(D) if score == "dot" else 1.0)
    pi = pi_head.view(1, Hq, 1, 1) * pi_key.repeat_interleave(g, 1).view(B, Hq, 1, Lk)
    d2 = ((q.unsqueeze(3) - k.unsqueeze(2)) ** 2).sum(-1)
    if score == "dot":
        s = tau * pi * (q @ k.transpose(-1, -2))
    elif score == "gaussian":
        s = -0.5 * tau * pi * d2
    elif score == "student_t":
        s = -((nu + D) / 2) * torch.log1p(tau * pi * d2 / nu)
    else:
        s = -torch.sqrt(tau * pi * d2)
    if score != "dot" and normalizer:
        s = s + (D / 2) * torch.log(pi)
    i = torch.arange(Lq).view(Lq, 1)
    j = torch.arange(Lk).view(1, Lk)
    vis = torch.ones(B, 1, Lq, Lk, dtype=torch.bool)
    if causal or window is not None:
        vis = vis & (j <= i + Lk - Lq)
    if window is not None:
        vis = vis & (j > i + Lk - Lq - window)
    if kv_len is not None:
        vis = vis & (j.view(1, 1, 1, Lk) < kv_len.view(B, 1, 1, 1))
    vis = vis.expand(B, Hq, Lq, Lk)
    any_vis = vis.any(-1, keepdim=True)
    s = torch.where(vis, s, torch.full_like(s, -math.inf))
    s = torch.where(any_vis, s, torch.zeros_like(s))
    w = torch.softmax(s, -1) * any_vis
    o = w @ v
    e = (w * pi * d2).sum(-1)
    return o, e


def autograd_backward(q, k, v, d_o, d_e=None, pi_head=None, pi_key=None, nu=5.0, **kw):
    """float64 (dq, dk, dv, dpi_head, dpi_key, dnu) of L = sum(o d_o) + sum(e d_e) at the given
    values (pi = 1 where not given, as the library's gradients are)."""
    B, Hq = q.shape[:2]
    _, Hkv, Lk, _ = k.shape
    leaf = lambda t: t.detach().to(F64).requires_grad_(True)  # noqa: E731
    q, k, v = leaf(q), leaf(k), leaf(v)
    ph = leaf(pi_head if pi_head is not None else torch.ones(Hq))
    pk = leaf(pi_key if pi_key is not None else torch.ones(B, Hkv, Lk))
    nu_t = torch.tensor(float(nu), dtype=F64, requires_grad=True)
    o, e = differentiable(q, k, v, ph, pk, nu_t, **kw)
    loss = (o * d_o.to(F64)).sum()
    if d_e is not None:
        loss = loss + (e * d_e.to(F64)).sum()
    grads = torch.autograd.grad(loss, (q, k, v, ph, pk, nu_t), allow_unused=True)
    return tuple(torch.zeros((), dtype=F64) if g is None else g for g in grads)


def assert_grads(what, got, want, tol):
    for name, g, w in zip(("dq", "dk", "dv", "dpi_head", "dpi_key", "dnu"), got, want):
        assert g is not None, f"{what}: {name} missing"
        assert g.shape == w.shape, f"{what}: {name} shape {tuple(g.shape)} vs {tuple(w.shape)}"
        assert torch.isfinite(g).all(), f"{what}: {name} not finite"
        r = rel(g, w)
        assert r <= tol, f"{what}: {name} off by {r:.3g} (tol {tol:.1g})"


BWD_TOL = 1e-5


def test_backward_every_score_against_autograd():
    q, k, v, kw = problem(seed=20)
    g = torch.Generator().manual_seed(21)
    d_o = torch.randn(2, 4, 7, 8, generator=g)
    d_e = torch.randn(2, 4, 7, generator=g)
    for score in ("dot", "gaussian", "student_t", "laplace"):
        for normalizer in (True, False):
            args = dict(score=score, nu=3.0, normalizer=normalizer, causal=True, **kw)
            o, lse, e = fk.attention_forward(q, k, v, **args)
            for de in (d_e, None):
                got = fk.attention_backward(q, k, v, o, lse, d_o, e=e, d_e=de, **args)
                assert got[0].dtype == torch.float32 and got[1].shape == k.shape
                assert got[4].shape == (2, 2, 9) and got[5].shape == ()
                want = autograd_backward(q, k, v, d_o, de, **args)
                assert_grads(f"{score} norm={normalizer} d_e={de is not None}", got, want,
                             BWD_TOL)
            if score != "student_t":
                assert got[5].item() == 0.0


def test_backward_masks_gqa_and_no_precisions():
    q, k, v, kw = problem(B=3, Hq=4, Hkv=1, seed=22)
    g = torch.Generator().manual_seed(23)
    d_o = torch.randn(3, 4, 7, 8, generator=g)
    d_e = torch.randn(3, 4, 7, generator=g)
    kv_len = torch.tensor([9, 0, 4], dtype=torch.int32)
    for causal, window, kl, prec in ((False, None, None, {}), (True, None, kv_len, kw),
                                     (False, 3, kv_len, {}), (False, 2, None, kw)):
        args = dict(score="student_t", causal=causal, window=window, kv_len=kl, **prec)
        o, lse, e = fk.attention_forward(q, k, v, **args)
        got = fk.attention_backward(q, k, v, o, lse, d_o, e=e, d_e=d_e, **args)
        want = autograd_backward(q, k, v, d_o, d_e, **args)
        assert_grads(f"causal={causal} window={window} kv_len={kl} prec={bool(prec)}", got, want,
                     BWD_TOL)
        if kl is not None:  # batch 1 sees no key: no gradient
            assert torch.all(got[0][1] == 0) and torch.all(got[1][1] == 0)
            assert torch.all(got[4][1] == 0)


def test_backward_blhd_and_precision_grads_off():
    q, k, v, kw = problem(seed=24)
    ql, kl, vl = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    d_o = torch.randn(2, 7, 4, 8, generator=torch.Generator().manual_seed(25))  # BLHD
    args = dict(score="gaussian", causal=True, **kw)
    o, lse, e = fk.attention_forward(ql, kl, vl, layout="blhd", **args)
    got = fk.attention_backward(ql, kl, vl, o, lse, d_o, layout="blhd", **args)
    assert got[0].shape == ql.shape and got[1].shape == kl.shape and got[2].shape == vl.shape
    want = autograd_backward(q, k, v, d_o.transpose(1, 2), **args)
    bhld = tuple(t.transpose(1, 2) for t in got[:3]) + tuple(got[3:])
    assert_grads("blhd", bhld, want, BWD_TOL)
    dq, dk, dv, dph, dpk, dnu = fk.attention_backward(ql, kl, vl, o, lse, d_o, layout="blhd",
                                                       precision_grads=False, **args)
    assert dph is None and dpk is None and dnu is None
    assert torch.equal(dq, got[0]) and torch.equal(dk, got[1]) and torch.equal(dv, got[2])


def test_backward_half_precision():
    q, k, v, kw = problem(seed=26)
    d_o = torch.randn(2, 4, 7, 8, generator=torch.Generator().manual_seed(27))
    for dtype in (torch.float16, torch.bfloat16):
        qh, kh, vh, doh = (x.to(dtype) for x in (q, k, v, d_o))
        args = dict(score="laplace", causal=True, **kw)
        o, lse, e = fk.attention_forward(qh, kh, vh, **args)
        got = fk.attention_backward(qh, kh, vh, o, lse, doh, **args)
        assert got[0].dtype == dtype and got[3].dtype == torch.float32
        want = autograd_backward(qh, kh, vh, doh, **args)  # the same rounded inputs
        tol = 2 ** -10 if dtype == torch.float16 else 2 ** -7
        rounded = tuple(w.to(dtype) for w in want[:3]) + want[3:]
        assert_grads(str(dtype), got, rounded, tol)


def test_backward_bad_arguments():
    q, k, v, kw = problem()
    o, lse, e = fk.attention_forward(q, k, v, **kw)
    d_o = torch.ones_like(o)
    d_e = torch.ones_like(e)

    def f(**a):
        return fk.attention_backward(**{**dict(q=q, k=k, v=v, o=o, lse=lse, d_o=d_o), **a})

    f()  # valid
    # Caught by the wrapper (ValueError naming the argument).
    expect_error(ValueError, lambda: f(d_e=d_e), "e", "required when d_e")
    expect_error(ValueError, lambda: f(d_o=d_o[..., :4]), "d_o", "shape")
    expect_error(ValueError, lambda: f(d_o=d_o.double()), "d_o", "float64")
    expect_error(ValueError, lambda: f(o=o.half()), "o", "float16")
    expect_error(ValueError, lambda: f(o=None), "o", "torch.Tensor")
    expect_error(ValueError, lambda: f(lse=lse[:, :2]), "lse", "shape")
    expect_error(ValueError, lambda: f(lse=lse.double()), "lse", "dtype")
    expect_error(ValueError, lambda: f(e=e, d_e=d_e.half()), "d_e", "dtype")
    expect_error(ValueError, lambda: f(e=e[0], d_e=d_e), "e", "shape")
    expect_error(ValueError, lambda: f(q=q.double(), k=k.double(), v=v.double()), "q", "float64")
    expect_error(ValueError, lambda: f(pi_head=torch.ones(3)), "pi_head")
    expect_error(ValueError, lambda: f(score="cauchy"), "score")
    expect_error(ValueError, lambda: f(window=0), "window")
    # Caught by the library (FepError naming the argument).
    e1 = expect_error(fk.FepError, lambda: f(k=k[:, :, :, :8]), "`k`", "head dim")
    assert e1.status == fk.FEP_ERR_INVALID_ARGUMENT
    expect_error(fk.FepError, lambda: f(pi_key=-kw["pi_key"]), "`pi_key`", "pi_key[0, 0, 0] is -")
    expect_error(fk.FepError, lambda: f(score="student_t", nu=-1.0), "`nu`")
    expect_error(fk.FepError, lambda: f(kv_len=torch.tensor([10, 1], dtype=torch.int32)),
                 "`kv_len`")


def test_errors_name_python_arguments_and_multi_indices():
    # Issue 21: the library's `precision.key` with a flat "element 9" is the user's pi_key with
    # a multi-index; empty tensors were "`q.data` is NULL".
    q, k, v, kw = problem()
    f = fk.attention_forward
    pk = kw["pi_key"].clone()
    pk[0, 1, 3] = -1.0
    e = expect_error(fk.FepError, lambda: f(q, k, v, pi_key=pk), "invalid argument `pi_key`",
                     "pi_key[0, 1, 3] is -1")
    assert "precision.key" not in str(e) and "element" not in str(e), str(e)
    ph = kw["pi_head"].clone()
    ph[2] = float("nan")
    expect_error(fk.FepError, lambda: f(q, k, v, pi_head=ph), "pi_head[2] is NaN")
    o, lse, _ = f(q, k, v, **kw)
    expect_error(fk.FepError, lambda: fk.attention_backward(q, k, v, o, lse, torch.ones_like(o),
                                                            pi_key=pk), "pi_key[0, 1, 3] is -1")
    for args, what in (((q[:0], k[:0], v[:0]), "q: is empty (shape [0, 4, 7, 16])"),
                       ((q, k[:, :, :0], v[:, :, :0]), "k: is empty (shape [2, 2, 0, 16])"),
                       ((q, k, v[..., :0]), "v: is empty")):
        expect_error(ValueError, lambda: f(*args), what)
    expect_error(ValueError, lambda: f(q, k, v, pi_key=kw["pi_key"][:, :, :0]), "pi_key")
    # window: an int, not a bool (True was window 1).
    expect_error(TypeError, lambda: f(q, k, v, window=True), "window")
    expect_error(ValueError, lambda: f(q, k, v, window=2.0), "window")
    expect_error(ValueError, lambda: f(q, k, v, nu=True, score="student_t"), "nu")
    # The merge: "element 22 (part 1, row 6)" is lse_parts[1, 0, 1, 2].
    o_p, lse_p = torch.stack([o, o]), torch.stack([lse, lse])
    lse_p[1, 0, 1, 2] = float("inf")
    expect_error(fk.FepError, lambda: fk.attention_merge(o_p, lse_p), "`lse_parts`",
                 "lse_parts[1, 0, 1, 2] is inf")


# ---- the lse merge ----


def test_merge_matches_the_unsplit_forward():
    q, k, v, kw = problem(B=2, Lk=11, seed=30)
    kv_len = torch.tensor([11, 3], dtype=torch.int32)
    args = dict(score="gaussian", **kw)
    whole = fk.attention_forward(q, k, v, kv_len=kv_len, **args)
    cuts = [0, 4, 8, 11]
    parts = []
    for lo, hi in zip(cuts, cuts[1:]):
        pk = kw["pi_key"][:, :, lo:hi].contiguous()
        kl = (kv_len - lo).clamp(0, hi - lo).to(torch.int32)
        a = dict(args, pi_key=pk)
        parts.append(fk.attention_forward(q, k[:, :, lo:hi].contiguous(),
                                          v[:, :, lo:hi].contiguous(), kv_len=kl, **a))
    o_p, lse_p, e_p = (torch.stack([p[i] for p in parts]) for i in range(3))
    assert torch.isinf(lse_p).any()  # batch 1's later chunks see no key
    got = fk.attention_merge(o_p, lse_p, e_p)
    assert_close("merge", got, whole, 2e-6)
    # Into a BLHD out; no e parts: e is None.
    out = torch.full((2, 7, 4, 8), 7.0)
    o, lse, e = fk.attention_merge(o_p, lse_p, layout="blhd", out=out)
    assert o is out and e is None
    assert torch.equal(o.transpose(1, 2), got[0]) and torch.equal(lse, got[1])
    # bfloat16 parts.
    o16, _, _ = fk.attention_merge(o_p.bfloat16(), lse_p)
    assert o16.dtype == torch.bfloat16
    assert rel(o16, got[0]) <= 2 ** -7


def test_merge_bad_arguments():
    o_p = torch.randn(3, 2, 4, 5, 8)
    lse_p = torch.randn(3, 2, 4, 5)
    f = fk.attention_merge
    expect_error(ValueError, lambda: f(o_p[0], lse_p), "o_parts", "5-d")
    expect_error(ValueError, lambda: f(o_p.double(), lse_p), "o_parts", "float64")
    expect_error(ValueError, lambda: f(o_p.transpose(3, 4), lse_p), "o_parts")
    expect_error(ValueError, lambda: f(o_p, lse_p[:2]), "lse_parts", "shape")
    expect_error(ValueError, lambda: f(o_p, lse_p.half()), "lse_parts", "dtype")
    expect_error(ValueError, lambda: f(o_p, lse_p, e_parts=lse_p[..., :3]), "e_parts", "shape")
    expect_error(ValueError, lambda: f(o_p[:, :, :, :0], lse_p[:, :, :, :0]), "o_parts",
                 "is empty (shape [3, 2, 4, 0, 8])")
    expect_error(ValueError, lambda: f(o_p, lse_p, layout="bhdl"), "layout")
    expect_error(ValueError, lambda: f(o_p, lse_p, out=torch.empty(2, 4, 5, 7)), "out")
    expect_error(ValueError, lambda: f(o_p, lse_p, out=torch.empty(2, 4, 5, 8).half()), "out")
    # The library: an out that overlaps the parts.
    expect_error(fk.FepError, lambda: f(o_p, lse_p, out=o_p[0]), "`o`", "overlaps o_parts")


def test_cuda_backward_and_merge():
    if not torch.cuda.is_available():
        return "SKIPPED: torch.cuda.is_available() is False"
    kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
    if fk.device_count(kind) == 0:
        return f"SKIPPED: the library sees no {kind} device (built without the feature?)"
    # Every family, f32/f16/bf16, GQA, causal with key lengths, both precisions and d_e, against
    # autograd on the same (dtype-rounded) values; on the current stream.
    tols = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 8e-2}
    for seed, score in enumerate(("dot", "gaussian", "student_t", "laplace")):
        q, k, v, kw = problem(Lq=33, Lk=70, D=32, Dv=64, seed=40 + seed, device="cuda")
        kv_len = torch.tensor([70, 41], dtype=torch.int32, device="cuda")
        g = torch.Generator().manual_seed(50 + seed)
        d_o = torch.randn(2, 4, 33, 64, generator=g).cuda()
        d_e = torch.randn(2, 4, 33, generator=g).cuda()
        for dtype, tol in tols.items():
            qd, kd, vd, dod = (x.to(dtype) for x in (q, k, v, d_o))
            args = dict(score=score, nu=4.0, causal=True, kv_len=kv_len, **kw)
            o, lse, e = fk.attention_forward(qd, kd, vd, **args)
            got = fk.attention_backward(qd, kd, vd, o, lse, dod, e=e, d_e=d_e, **args)
            again = fk.attention_backward(qd, kd, vd, o, lse, dod, e=e, d_e=d_e, **args)
            torch.cuda.current_stream().synchronize()
            for a, b in zip(got, again):  # deterministic
                assert torch.equal(a, b), f"cuda {score} {dtype}: two runs differ"
            cpu = {n: (t.cpu() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
            want = autograd_backward(qd.cpu(), kd.cpu(), vd.cpu(), dod.cpu(), d_e.cpu(), **cpu)
            assert got[0].is_cuda and got[0].dtype == dtype
            # Relative to each gradient's largest entry (sums of many terms in low precision).
            for name, gt, w in zip(("dq", "dk", "dv", "dpi_head", "dpi_key", "dnu"), got, want):
                err = (gt.cpu().to(F64) - w).abs().max().item()
                scale = max(w.abs().max().item(), 1.0)
                assert err <= tol * scale, f"cuda {score} {dtype}: {name} off by {err / scale:.3g}"
        # The merge of two key chunks against the unsplit forward.
        whole = fk.attention_forward(q, k, v, score=score, **kw)
        parts = [fk.attention_forward(q, k[:, :, lo:hi].contiguous(), v[:, :, lo:hi].contiguous(),
                                      score=score, pi_head=kw["pi_head"],
                                      pi_key=kw["pi_key"][:, :, lo:hi].contiguous())
                 for lo, hi in ((0, 30), (30, 70))]
        o_p, lse_p, e_p = (torch.stack([p[i] for p in parts]) for i in range(3))
        got = fk.attention_merge(o_p, lse_p, e_p)
        torch.cuda.current_stream().synchronize()
        assert_close(f"cuda merge {score}", [t.cpu() for t in got], [t.cpu() for t in whole], 1e-4)


def main():
    return run_tests(globals(), "test_attention.py")


if __name__ == "__main__":
    sys.exit(main())
