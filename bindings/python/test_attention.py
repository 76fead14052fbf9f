#!/usr/bin/env python3
"""Tests of attention_forward of bindings/python/fep_kernels.py against the real library, on CPU
tensors, and on CUDA (or ROCm) tensors when there is a GPU.

The reference is a small pure-PyTorch float64 implementation of DESIGN.md section 4.1, written
from the contract and not from the library (d2 = |q_i - k_j|^2, pi = pi_h pi_j, tau = scale):

    dot s = tau pi q.k; gaussian s = -tau pi d2 / 2; student_t s = -((nu+D)/2) ln(1 + tau pi d2/nu);
    laplace s = -sqrt(tau pi d2); the distance families + (D/2) ln pi with the normaliser;
    visible keys: j <= i + Lk - Lq (causal), j > i + Lk - Lq - W (window), j < kv_len[b];
    o = softmax(s) v, lse = logsumexp(s), e = sum_j w pi d2; no visible key: o = 0, lse = -inf, e = 0

plus a couple of the PyTorch fixture cases (tests/fixtures/attention_torch.json, inputs rebuilt
with the SplitMix64 generator of ATTENTION-CONVENTIONS.md section 2).

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

try:
    import torch
except ImportError:  # pragma: no cover
    print("test_attention.py: SKIPPED: PyTorch is not installed")
    sys.exit(0)

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
        # ... and the library, on the float32-rounded inputs, the reference on those.
        q32, k32, v32 = (x.float() for x in (q, k, v))
        kw32 = {n: (x.float() if n.startswith("pi_") else x) for n, x in kw.items()}
        got = fk.attention_forward(q32, k32, v32, **kw32)
        assert_close(name, got, reference(q32, k32, v32, **kw32), F32_TOL)


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
    expect_error(fk.FepError, lambda: f(q, k, v, score="student_t", nu=0.0), "`params.nu`")
    expect_error(fk.FepError, lambda: f(q, k, v, scale=math.inf), "`params.scale`")
    expect_error(fk.FepError, lambda: f(q, k, v, pi_head=torch.tensor([1.0, 0.0, 1.0, 1.0])),
                 "`precision.head`")
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


def main():
    return run_tests(globals(), "test_attention.py")


if __name__ == "__main__":
    sys.exit(main())
