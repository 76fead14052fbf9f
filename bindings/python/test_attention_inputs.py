"""Tests of the attention score inputs of issue 23 on CPU tensors: an additive bias and a boolean
mask broadcast to the scores, nu per head, lse as a differentiable output, packed
variable-length sequences, the probabilities, autocast and torch.compile. Every gradient is held
against float64 PyTorch autograd of the same maths (written here, independently of the
library). Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_attention_inputs.py``.

Needs PyTorch; without it, it prints that it was skipped and exits 0."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_attention_inputs.py", f"{e.name} is not installed")

import fep_kernels as fk  # noqa: E402
from _runner import run_tests  # noqa: E402

FAMILIES = ("dot", "gaussian", "student_t", "laplace")


def check(cond, what):
    """AssertionError saying ``what`` unless ``cond``."""
    if not cond:
        raise AssertionError(what)


def reference(q, k, v, score, nu, bias=None, mask=None, causal=False, pk=None):
    """(o, lse, e) in float64 torch, differentiable: q [B, Hq, Lq, D], k, v [B, Hkv, Lk, .],
    nu a number or [Hq], bias/mask broadcastable to [B, Hq, Lq, Lk], pk [B, Hkv, Lk]."""
    B, Hq, Lq, D = q.shape
    g = Hq // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    pi = torch.ones(B, Hq, 1, k.shape[2], dtype=q.dtype)
    if pk is not None:
        pi = pk.repeat_interleave(g, 1)[:, :, None, :]
    x = q @ k.transpose(-1, -2)
    d2 = ((q[..., :, None, :] - k[..., None, :, :]) ** 2).sum(-1)
    nu_t = torch.as_tensor(nu, dtype=q.dtype).reshape(-1)
    nu_t = (nu_t if nu_t.numel() == Hq else nu_t.expand(Hq))[None, :, None, None]
    norm = 0.5 * D * torch.log(pi)
    if score == "dot":
        s = pi * x / D**0.5
    elif score == "gaussian":
        s = -0.5 * pi * d2 + norm
    elif score == "student_t":
        s = -((nu_t + D) / 2) * torch.log1p(pi * d2 / nu_t) + norm
    else:
        s = -torch.sqrt(pi * d2 + 1e-300) + norm
    if bias is not None:
        s = s + bias
    keep = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        keep = keep & mask
    if causal:
        Lk = k.shape[2]
        keep = keep & (torch.arange(Lk)[None, :] <= torch.arange(Lq)[:, None] + Lk - Lq)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    w = torch.where(keep, torch.exp(s - lse.clamp_min(-1e300)[..., None]), torch.zeros_like(s))
    w = torch.nan_to_num(w)
    return w @ v, lse, (w * pi * d2).sum(-1)


def tensors(B=2, Hq=4, Hkv=2, Lq=5, Lk=6, D=8, Dv=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g), torch.randn(B, Hkv, Lk, D, generator=g),
            torch.randn(B, Hkv, Lk, Dv, generator=g))


def grads_both(score, bias_shape, nu_per_head, use_mask, seed=0):
    """Max |ours - float64 torch| over o, lse, e and every gradient of
    L = sum(o * go) + sum(lse * gl) + sum(e * ge) (lse, e restricted to visible rows)."""
    q, k, v = tensors(seed=seed)
    B, Hq, Lq, _ = q.shape
    Lk = k.shape[2]
    g = torch.Generator().manual_seed(seed + 1)
    bias = 0.5 * torch.randn(bias_shape, generator=g) if bias_shape else None
    nu = 0.5 + 5 * torch.rand(Hq, generator=g) if nu_per_head else 4.0
    mask = None
    if use_mask:
        mask = torch.rand(B, 1, Lq, Lk, generator=g) > 0.3
        mask[0, 0, 1] = False  # a fully masked row
    go = torch.randn(B, Hq, Lq, v.shape[3], generator=g)
    gl, ge = torch.randn(B, Hq, Lq, generator=g), torch.randn(B, Hq, Lq, generator=g)
    leaves32 = [t.clone().requires_grad_() for t in (q, k, v)]
    extra32 = []
    kw = dict(score=score, causal=True, attn_mask=mask)
    if bias is not None:
        kw["bias"] = bias.clone().requires_grad_()
        extra32.append(kw["bias"])
    if nu_per_head:
        kw["nu"] = nu.clone().requires_grad_()
        extra32.append(kw["nu"])
    else:
        kw["nu"] = nu
    o, lse, e = fk.attention_with_stats(*leaves32, **kw)
    fin = torch.isfinite(lse)
    loss = (o * go).sum() + (lse[fin] * gl[fin]).sum() + (e * ge).sum()
    loss.backward()
    leaves64 = [t.double().requires_grad_() for t in (q, k, v)]
    b64 = bias.double().requires_grad_() if bias is not None else None
    nu64 = nu.double().requires_grad_() if nu_per_head else nu
    o2, lse2, e2 = reference(*leaves64, score, nu64, b64, mask, causal=True)
    fin2 = torch.isfinite(lse2)
    check(bool((fin == fin2).all()), "the same rows are fully masked")
    loss2 = (o2 * go.double()).sum() + (lse2[fin2] * gl.double()[fin2]).sum() + \
        (e2 * ge.double()).sum()
    loss2.backward()
    errs = {"o": (o.double() - o2).abs().max().item(),
            "lse": (lse.double()[fin] - lse2[fin2]).abs().max().item(),
            "e": (e.double() - e2).abs().max().item()}
    for name, a, b in zip(("dq", "dk", "dv"), leaves32, leaves64):
        errs[name] = (a.grad.double() - b.grad).abs().max().item() / (1 + b.grad.abs().max().item())
    if bias is not None:
        errs["dbias"] = (kw["bias"].grad.double() - b64.grad).abs().max().item()
        check(list(kw["bias"].grad.shape) == list(bias_shape), "dbias has the bias's shape")
    if nu_per_head:
        errs["dnu"] = (kw["nu"].grad.double() - nu64.grad).abs().max().item() / \
            (1 + nu64.grad.abs().max().item())
    if use_mask:
        check(bool((o[0, :, 1] == 0).all()) and bool(torch.isneginf(lse[0, :, 1]).all()),
               "a fully masked row gives o = 0, lse = -inf")
    return errs


def test_bias_mask_nu_lse_gradients_match_float64_torch():
    shapes = [None, (2, 4, 5, 6), (2, 4, 1, 6), (4, 5, 6), (2, 1, 5, 6), (6,)]
    worst = 0.0
    for i, score in enumerate(FAMILIES):
        for j, shape in enumerate(shapes):
            errs = grads_both(score, shape, nu_per_head=score == "student_t",
                              use_mask=(i + j) % 2 == 0, seed=10 * i + j)
            for name, err in errs.items():
                check(err < 2e-5, f"{score} bias {shape}: {name} differs by {err:.2e}")
                worst = max(worst, err)
    print(f"     worst error against float64 torch: {worst:.2e}")


def test_backward_is_bitwise_repeatable():
    q, k, v = tensors()
    bias = torch.randn(1, 4, 5, 6)
    outs = []
    for _ in range(2):
        b = bias.clone().requires_grad_()
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o, lse, e = fk.attention_with_stats(*leaves, score="student_t", bias=b)
        (o.sum() + lse.sum() + e.sum()).backward()
        outs.append([t.grad for t in leaves] + [b.grad])
    for a, c in zip(*outs):
        check(torch.equal(a, c), "two backward calls give the same bits")


def test_varlen_equals_padded_sequences():
    g = torch.Generator().manual_seed(3)
    lq, lk = [4, 0, 7], [5, 3, 7]
    cu_q = torch.tensor([0, 4, 4, 11], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 8, 15], dtype=torch.int32)
    H, D = 2, 8
    q = torch.randn(11, H, D, generator=g, requires_grad=True)
    k = torch.randn(15, H, D, generator=g, requires_grad=True)
    v = torch.randn(15, H, D, generator=g, requires_grad=True)
    for window in (None, 3):
        o, lse, e = fk.attention_varlen(q, k, v, cu_q, cu_k, 7, 7, score="gaussian", causal=True,
                                        window=window, return_stats=True)
        check(list(o.shape) == [11, H, D] and list(lse.shape) == [H, 11], "packed shapes")
        gq = torch.autograd.grad(o.sum() + e.sum(), q, retain_graph=True)[0]
        for s in range(3):
            if lq[s] == 0:
                continue
            qs = q[cu_q[s]:cu_q[s + 1]].transpose(0, 1)[None]
            ks = k[cu_k[s]:cu_k[s + 1]].transpose(0, 1)[None]
            vs = v[cu_k[s]:cu_k[s + 1]].transpose(0, 1)[None]
            o1, l1, e1 = fk.attention_with_stats(qs, ks, vs, score="gaussian", causal=True,
                                                 window=window)
            g1 = torch.autograd.grad(o1.sum() + e1.sum(), qs)[0]
            rows = slice(int(cu_q[s]), int(cu_q[s + 1]))
            check((o[rows] - o1[0].transpose(0, 1)).abs().max() < 1e-6, f"o of sequence {s}")
            check((lse[:, rows] - l1[0]).abs().max() < 1e-6, f"lse of sequence {s}")
            check((gq[rows] - g1[0].transpose(0, 1)).abs().max() < 1e-5, f"dq of sequence {s}")


def test_probabilities():
    q, k, v = tensors()
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[2] = False
    bias = torch.randn(4, 5, 6)
    w = fk.attention_probabilities(q, k, v, score="laplace", bias=bias, attn_mask=mask)
    o, lse, _ = fk.attention_forward(q, k, v, score="laplace", bias=bias, attn_mask=mask)
    check(list(w.shape) == [2, 4, 5, 6], "probabilities are [B, Hq, Lq, Lk]")
    sums = w.sum(-1)
    check(bool((sums[:, :, 2] == 0).all()), "a fully masked row is 0")
    check((sums[:, :, [0, 1, 3, 4]] - 1).abs().max() < 1e-6, "rows sum to 1")
    ov = w @ v.repeat_interleave(2, 1)
    check((ov - o).abs().max() < 1e-6, "w v = o")
    try:
        fk.attention_probabilities(q, k, v, max_elements=10)
        check(False, "the size limit is enforced")
    except ValueError as ex:
        check("max_elements" in str(ex), f"the limit names max_elements: {ex}")


def test_torch_compile_and_autocast():
    q, k, v = (t.requires_grad_() for t in tensors())
    bias = torch.zeros(1, 4, 1, 6, requires_grad=True)
    nu = torch.full((4,), 3.0, requires_grad=True)
    f = torch.compile(lambda q, k, v, b, n: fk.attention_with_stats(
        q, k, v, score="student_t", nu=n, bias=b, causal=True), fullgraph=True)
    o, lse, e = f(q, k, v, bias, nu)
    (o.sum() + lse.sum()).backward()
    o2, lse2, _ = fk.attention_with_stats(q, k, v, score="student_t", nu=nu, bias=bias,
                                          causal=True)
    check((o - o2).abs().max() < 1e-6 and bias.grad is not None and nu.grad is not None,
           "compiled equals eager, gradients reach bias and nu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pk = torch.ones(2, 2, 6, dtype=torch.bfloat16)  # computed under autocast: kept float32
        y = fk.attention(q, k.float(), v, precision_key=pk, score="gaussian", bias=bias)
    check(y.dtype == torch.bfloat16, f"autocast computes in bfloat16, got {y.dtype}")
    y32 = fk.attention(q, k, v, precision_key=torch.ones(2, 2, 6), score="gaussian", bias=bias)
    check((y.float() - y32).abs().max() < 5e-2, "autocast result within bfloat16 bounds")


def test_bad_inputs_name_the_argument():
    q, k, v = tensors()
    cases = [
        (dict(bias=torch.randn(2, 2, 5, 6)), "bias"),  # Hkv, not Hq
        (dict(bias=torch.randn(2, 4, 5, 3)), "bias"),
        (dict(attn_mask=torch.ones(2, 4, 5, 7, dtype=torch.bool)), "attn_mask"),
        (dict(attn_mask=torch.ones(2, 4, 5, 6)), "attn_mask"),  # float, not bool
        (dict(score="student_t", nu=torch.ones(3)), "nu"),
        (dict(score="student_t", nu=torch.tensor([1.0, 2.0, -1.0, 1.0])), "nu"),
        (dict(score="gaussian", nu=torch.ones(4)), "nu"),
        (dict(bias=torch.full((6,), float("nan"))), "bias"),
    ]
    for kw, name in cases:
        try:
            fk.attention(q, k, v, **kw)
            check(False, f"{kw} is refused")
        except (ValueError, TypeError, fk.FepError) as ex:
            check(f"`{name}`" in str(ex) or str(ex).startswith(f"{name}:"),
                   f"the error names {name}: {ex}")
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    qp, kp, vp = (torch.randn(8, 2, 8) for _ in range(3))
    for cu_q, name in ((torch.tensor([0, 5, 3], dtype=torch.int32), "cu_seqlens_q"),
                       (torch.tensor([1, 3, 8], dtype=torch.int32), "cu_seqlens_q"),
                       (torch.tensor([0, 3, 8], dtype=torch.int64), "cu_seqlens_q")):
        try:
            fk.attention_varlen(qp, kp, vp, cu_q, cu, 8, 8)
            check(False, f"{cu_q} is refused")
        except (ValueError, TypeError, fk.FepError) as ex:
            check(name in str(ex), f"the error names {name}: {ex}")
    try:
        fk.attention_varlen(qp, kp, vp, cu, cu, 4, 8)
        check(False, "a length over max_seqlen_q is refused")
    except fk.FepError as ex:
        check("cu_seqlens_q" in str(ex) and "max" in str(ex), str(ex))


if __name__ == "__main__":
    sys.exit(run_tests(globals(), "test_attention_inputs.py"))
