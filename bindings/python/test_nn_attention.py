"""Tests of fep_kernels.nn.PrecisionAttention and fep_kernels.nn.KVCache on CPU tensors (and
CUDA tensors when PyTorch and the library both see a GPU): the module's forward, lse and e
against a float64 PyTorch implementation of the same maths (projections, the four score
families, per-head / per-key precisions, learned nu, bias, masks, GQA), the gradients of every
parameter against float64 autograd, KV-cache decoding (prefill then one token at a time, equal
and ragged rows) against full recomputation, the cache's own checks, torch.compile(fullgraph)
and autocast, a few training steps, and argument errors. Run as
``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_nn_attention.py`` (or pytest).

Needs PyTorch; without it, it prints that it was skipped and exits 0."""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_nn_attention.py", f"{e.name} is not installed")

import torch.nn.functional as F  # noqa: E402

import fep_kernels as fk  # noqa: E402
from _runner import expect, run_tests  # noqa: E402
from fep_kernels.nn import KVCache, PrecisionAttention  # noqa: E402

SCORES = ("dot", "gaussian", "student_t", "laplace")
# measured errors, printed at the end
MAX = {}


def note(key, val):
    MAX[key] = max(MAX.get(key, 0.0), float(val))


def devices():
    """"cpu", and "cuda" when PyTorch and the library both see a CUDA device."""
    out = ["cpu"]
    if torch.cuda.is_available() and fk.device_count("cuda") > 0:
        out.append("cuda")
    return out


def make(score="student_t", seed=0, device="cpu", **kw):
    """A module with every learned quantity moved off its initial value (so gradients and the
    reference see non-trivial precisions and nu)."""
    torch.manual_seed(seed)
    args = dict(num_heads=4, num_kv_heads=2, head_dim=8, key_precision=True)
    args.update(kw)
    m = PrecisionAttention(32, score=score, device=device, **args)
    with torch.no_grad():
        if m.log_nu is not None:
            m.log_nu.copy_(torch.linspace(math.log(2.0), math.log(11.0), m.num_heads))
        if m.log_precision_head is not None:
            m.log_precision_head.uniform_(-0.5, 0.5)
        if m.key_precision_weight is not None:
            m.key_precision_weight.normal_(0.0, 0.3)
            m.key_precision_bias.uniform_(-0.5, 1.0)
    return m


def params64(m):
    """The module's parameters as float64 leaves (same names)."""
    return {n: p.detach().double().cpu().requires_grad_(True) for n, p in m.named_parameters()}


def reference(m, P, x, attn_bias=None, attn_mask=None, kv_len=None):
    """The module's maths in float64 PyTorch: (y, lse, e)."""
    x = x.double().cpu()
    B, L, _ = x.shape
    hq, hkv, d = m.num_heads, m.num_kv_heads, m.head_dim

    def lin(name, t):
        y = t @ P[name + ".weight"].T
        return y + P[name + ".bias"] if name + ".bias" in P else y

    q = lin("q_proj", x).view(B, L, hq, d).transpose(1, 2)
    k = lin("k_proj", x).view(B, L, hkv, d)
    v = lin("v_proj", x).view(B, L, hkv, d).transpose(1, 2)
    if "key_precision_weight" in P:
        z = (k * P["key_precision_weight"]).sum(-1) + P["key_precision_bias"]
        pk = (F.softplus(z) + 1e-6).transpose(1, 2)  # [B, Hkv, L]
    else:
        pk = torch.ones(B, hkv, L, dtype=torch.float64)
    k = k.transpose(1, 2)
    g = hq // hkv
    kr, vr, pkr = (t.repeat_interleave(g, 1) for t in (k, v, pk))
    ph = (P["log_precision_head"].exp() if "log_precision_head" in P
          else torch.ones(hq, dtype=torch.float64))
    pi = ph[None, :, None, None] * pkr[:, :, None, :]
    d2 = (q[:, :, :, None, :] - kr[:, :, None, :, :]).square().sum(-1)
    tau = m.scale if m.scale is not None else (1 / math.sqrt(d) if m.score == "dot" else 1.0)
    if m.score == "dot":
        s = tau * pi * (q @ kr.transpose(-1, -2))
    elif m.score == "gaussian":
        s = -0.5 * tau * pi * d2
    elif m.score == "student_t":
        nu = (P["log_nu"].exp()[None, :, None, None] if "log_nu" in P else m.nu)
        s = -((nu + d) / 2) * torch.log1p(tau * pi * d2 / nu)
    else:
        s = -torch.sqrt(tau * pi * d2)
    if m.normalizer and m.score != "dot":
        s = s + (d / 2) * torch.log(pi)
    if attn_bias is not None:
        s = s + attn_bias.double().cpu()
    lq = lk = L
    i = torch.arange(lq)[:, None]
    j = torch.arange(lk)[None, :]
    keep = torch.ones(B, 1, lq, lk, dtype=torch.bool)
    if m.causal:
        keep &= j <= i + lk - lq
    if m.window is not None:
        keep &= j > i + lk - lq - m.window
    if kv_len is not None:
        keep &= (j[None] < kv_len.cpu().long()[:, None, None])[:, None]
    if attn_mask is not None:
        keep = keep & attn_mask.cpu()
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, -1)
    w = torch.softmax(s, -1)
    o = w @ vr
    e = (w * pi * d2).sum(-1)
    y = lin("out_proj", o.transpose(1, 2).reshape(B, L, hq * d))
    return y, lse, e


def rel(a, b):
    """max |a - b| / max |b| (b the float64 reference)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def test_parameters_and_repr():
    m = PrecisionAttention(32, 4, num_kv_heads=2, key_precision=True)
    names = sorted(n for n, _ in m.named_parameters())
    want = sorted(["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                   "v_proj.weight", "v_proj.bias", "out_proj.weight", "out_proj.bias",
                   "log_nu", "log_precision_head", "key_precision_weight",
                   "key_precision_bias"])
    assert names == want, names
    assert m.head_dim == 8 and m.q_proj.out_features == 32 and m.k_proj.out_features == 16
    assert torch.allclose(m.nu_value(), torch.full((4,), 5.0))
    assert torch.equal(m.precision_head(), torch.ones(4))
    k = torch.randn(3, 5, 2, 8)
    assert torch.allclose(m.key_precisions(k), torch.ones(3, 2, 5), atol=1e-6)
    assert "student_t" in repr(m) and "num_kv_heads=2" in repr(m)
    # no nu parameter for the other families; fixed nu / precisions when not learned
    m = PrecisionAttention(32, 4, score="gaussian", bias=False, learn_precision_head=False)
    assert sorted(n for n, _ in m.named_parameters()) == [
        "k_proj.weight", "out_proj.weight", "q_proj.weight", "v_proj.weight"]
    assert m.precision_head() is None and m.key_precisions(k) is None
    m = PrecisionAttention(32, 4, learn_nu=False, nu=3.0)
    assert m.log_nu is None and m.nu_value() == 3.0
    # state_dict round trip
    a, b = make(seed=1), make(seed=2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 32)
    assert torch.equal(a(x), b(x))


def test_forward_matches_float64_reference():
    torch.manual_seed(10)
    cases = []
    for score in SCORES:
        cases.append((score, dict()))
        cases.append((score, dict(causal=True)))
    cases += [("student_t", dict(causal=True, window=3)),
              ("student_t", dict(num_kv_heads=4, key_precision=False, learn_nu=False, nu=2.5)),
              ("gaussian", dict(num_kv_heads=1, normalizer=False, scale=0.3)),
              ("dot", dict(learn_precision_head=False, bias=False)),
              ("laplace", dict(num_heads=2, num_kv_heads=1, head_dim=16))]
    for dev in devices():
        for score, kw in cases:
            m = make(score, device=dev, **kw)
            P = params64(m)
            x = torch.randn(2, 7, 32, device=dev)
            y, lse, e = m(x, need_stats=True)
            assert y.shape == (2, 7, 32) and y.dtype == torch.float32
            assert lse.shape == (2, m.num_heads, 7) and e.shape == lse.shape
            yr, lr, er = reference(m, P, x)
            for what, a, b in (("y", y, yr), ("lse", lse, lr), ("e", e, er)):
                r = rel(a, b)
                note("forward rel", r)
                assert r < 1e-5, (dev, score, kw, what, r)
        # bias, mask and kv_len passed through
        m = make("student_t", device=dev, causal=True)
        P = params64(m)
        x = torch.randn(2, 7, 32, device=dev)
        bias = torch.randn(4, 7, 7, device=dev)
        mask = torch.rand(2, 1, 7, 7, device=dev) > 0.3
        mask |= torch.eye(7, dtype=torch.bool, device=dev)  # no empty row
        kv_len = torch.tensor([7, 5], dtype=torch.int32, device=dev)
        y, lse, e = m(x, attn_bias=bias, attn_mask=mask, kv_len=kv_len, need_stats=True)
        yr, lr, er = reference(m, P, x, attn_bias=bias, attn_mask=mask, kv_len=kv_len)
        for a, b in ((y, yr), (lse, lr), (e, er)):
            r = rel(a, b)
            note("forward rel", r)
            assert r < 1e-5, r


def test_gradients_match_float64_autograd():
    torch.manual_seed(11)
    cases = [(s, dict()) for s in SCORES] + [
        ("student_t", dict(causal=True, num_kv_heads=1)),
        ("gaussian", dict(causal=True, window=4))]
    for dev in devices():
        for score, kw in cases:
            m = make(score, device=dev, **kw)
            P = params64(m)
            x = torch.randn(2, 6, 32, device=dev)
            bias = (0.5 * torch.randn(m.num_heads, 6, 6, device=dev)).requires_grad_(True)
            gy = torch.randn(2, 6, 32, device=dev)
            gl = torch.randn(2, m.num_heads, 6, device=dev)
            ge = 0.1 * torch.randn(2, m.num_heads, 6, device=dev)
            y, lse, e = m(x, attn_bias=bias, need_stats=True)
            ((y * gy).sum() + (lse * gl).sum() + (e * ge).sum()).backward()
            b64 = bias.detach().double().cpu().requires_grad_(True)
            yr, lr, er = reference(m, P, x, attn_bias=b64)
            ((yr * gy.double().cpu()).sum() + (lr * gl.double().cpu()).sum()
             + (er * ge.double().cpu()).sum()).backward()
            grads = dict(m.named_parameters())
            assert set(grads) == set(P)
            for n, p in grads.items():
                assert p.grad is not None, n
                r = rel(p.grad, P[n].grad)
                note("grad rel", r)
                assert r < 1e-4, (dev, score, kw, n, r)
            r = rel(bias.grad, b64.grad)
            note("grad rel", r)
            assert r < 1e-4, ("attn_bias", r)


def _decode(m, x, prefill, cache=None):
    """y of x [B, T, E] computed as a prefill of ``prefill`` tokens then 1-token steps."""
    B, T, _ = x.shape
    cache = cache if cache is not None else m.make_cache(B, T + 2)
    outs = [m(x[:, :prefill], cache=cache)]
    for t in range(prefill, T):
        outs.append(m(x[:, t:t + 1], cache=cache))
    return torch.cat(outs, 1), cache


def test_kv_cache_decoding_equals_full_recomputation():
    torch.manual_seed(12)
    cases = [("student_t", dict(causal=True)),                      # GQA 4/2, per-key precision
             ("student_t", dict(causal=True, num_kv_heads=1)),      # MQA
             ("student_t", dict(causal=True, window=4)),
             ("gaussian", dict(causal=True, num_kv_heads=4)),
             ("dot", dict(causal=True, key_precision=False)),
             ("laplace", dict(causal=True))]
    for dev in devices():
        for score, kw in cases:
            m = make(score, device=dev, **kw)
            x = torch.randn(3, 12, 32, device=dev)
            with torch.no_grad():
                full, lse_full, e_full = m(x, need_stats=True)
                for prefill in (1, 5):
                    y, cache = _decode(m, x, prefill)
                    d = (y - full).abs().max().item()
                    note("decode max|d| (f32)", d)
                    assert d < 1e-5, (dev, score, kw, prefill, d)
                    assert torch.equal(cache.lengths, torch.full((3,), 12, dtype=torch.int32,
                                                                 device=dev))
                    # the cache holds the projected keys and the per-key precisions
                    k = m.k_proj(x).view(3, 12, m.num_kv_heads, 8)
                    assert (cache.k - k).abs().max() < 1e-6
                    if m.key_precision_weight is not None:
                        assert (cache.precision_key - m.key_precisions(k)).abs().max() < 1e-6
                    else:
                        assert cache.precision_key is None
                # need_stats with a cache: the last step's lse and e are the full ones' last
                cache = m.make_cache(3, 12)
                m(x[:, :11], cache=cache)
                y, lse, e = m(x[:, 11:], cache=cache, need_stats=True)
                assert (lse - lse_full[:, :, 11:]).abs().max() < 1e-4
                assert (e - e_full[:, :, 11:]).abs().max() < 1e-4 * e_full.abs().max()


def test_kv_cache_ragged_prefill():
    """Right-padded prompts of different lengths (kv_len with a cache), then equal 1-token
    steps: each row's outputs equal the full causal forward of its own sequence."""
    torch.manual_seed(13)
    for dev in devices():
        for kw in (dict(), dict(window=3)):
            m = make("student_t", device=dev, causal=True, **kw)
            T, lens = 10, [5, 2, 4]
            seqs = torch.randn(3, T, 32, device=dev)
            with torch.no_grad():
                cache = m.make_cache(3, T)
                x0 = seqs[:, :5].clone()
                x0[1, 2:] = 100.0  # padding: must not reach any valid output
                x0[2, 4:] = -100.0
                kv = torch.tensor(lens, dtype=torch.int32, device=dev)
                y0 = m(x0, kv_len=kv, cache=cache)
                assert cache.lengths.tolist() == lens
                steps = []
                for t in range(5):
                    xt = torch.stack([seqs[b, lens[b] + t] for b in range(3)])[:, None]
                    steps.append(m(xt, cache=cache))
                for b in range(3):
                    full = m(seqs[b:b + 1, :lens[b] + 5])[0]
                    d = max((y0[b, :lens[b]] - full[:lens[b]]).abs().max().item(),
                            (torch.cat([s[b] for s in steps]) - full[lens[b]:]).abs().max()
                            .item())
                    note("ragged decode max|d| (f32)", d)
                    assert d < 1e-5, (dev, kw, b, d)
                assert cache.lengths.tolist() == [n + 5 for n in lens]


def test_kv_cache_checks_and_reset():
    for dev in devices():
        c = KVCache(2, 4, 2, 8, precision_key=True, device=dev)
        assert c.k.shape == (2, 0, 2, 8) and c.lengths.dtype == torch.int32
        k, v, p = (torch.randn(2, 3, 2, 8, device=dev), torch.randn(2, 3, 2, 8, device=dev),
                   torch.rand(2, 2, 3, device=dev) + 0.5)
        before = c.append(k, v, p)
        assert before.tolist() == [0, 0] and c.lengths.tolist() == [3, 3]
        assert torch.equal(c.k, k) and torch.equal(c.v, v) and torch.equal(c.precision_key, p)
        # overflow: nothing is written
        expect(ValueError, lambda: c.append(k, v, p), "max_len")
        expect(ValueError, lambda: c.append(k, v, p), "k_new")
        assert c.lengths.tolist() == [3, 3]
        one = (k[:, :1], v[:, :1], p[:, :, :1])
        expect(ValueError, lambda: c.append(k[:, :1, :1], *one[1:]), "k_new")
        expect(ValueError, lambda: c.append(one[0], v[:, :2], one[2]), "v_new")
        expect(ValueError, lambda: c.append(one[0].double(), *one[1:]), "k_new: dtype")
        expect(ValueError, lambda: c.append(*one[:2]), "pi_new")
        expect(ValueError, lambda: c.append(*one[:2], one[2].double()), "pi_new")
        expect(ValueError, lambda: c.append(*one[:2], p[:, :, :2]), "pi_new")
        expect(ValueError, lambda: c.append(*one, new_len=torch.tensor([1, 2])), "new_len")
        expect(ValueError, lambda: c.append(*one, new_len=torch.tensor(
            [1, 2], dtype=torch.int32, device=dev)), "new_len")
        if dev == "cpu" and "cuda" in devices():
            expect(ValueError, lambda: c.append(one[0].cuda(), *one[1:]), "k_new")
        c.append(*one)
        assert c.lengths.tolist() == [4, 4] and torch.equal(c.k[:, 3], k[:, 0])
        c.reset()
        assert c.lengths.tolist() == [0, 0] and c.k.shape[1] == 0
        c2 = KVCache(2, 4, 2, 8, device=dev)
        expect(ValueError, lambda: c2.append(*one), "pi_new")
        expect(ValueError, lambda: KVCache(2, 0, 2, 8), "max_len")
        expect(TypeError, lambda: KVCache(2, 4.0, 2, 8), "max_len")
        # the module's checks of a cache: overflow through forward names k_new and max_len
        m = make(device=dev, causal=True)
        x = torch.randn(2, 3, 32, device=dev)
        with torch.no_grad():
            cache = m.make_cache(2, 4)
            m(x, cache=cache)
            expect(ValueError, lambda: m(x, cache=cache), "overflows max_len=4")
            expect(ValueError, lambda: m(x, cache=KVCache(2, 8, 2, 8, device=dev)), "cache")
            expect(ValueError, lambda: m(x, cache=KVCache(2, 8, 2, 4, precision_key=True,
                                                          device=dev)), "cache")
            expect(ValueError, lambda: m(x, cache=m.make_cache(3, 8)), "batch")
            expect(TypeError, lambda: m(x, cache=object()), "cache")
        if dev == "cpu":
            bf = m.make_cache(2, 4, dtype=torch.bfloat16)
            assert bf.dtype == torch.bfloat16 and bf.k.dtype == torch.bfloat16
        # a bfloat16 model: its cache is bfloat16 and decoding matches its full forward
        mb = make(device=dev, causal=True, dtype=torch.bfloat16)
        xb = torch.randn(2, 6, 32, device=dev, dtype=torch.bfloat16)
        with torch.no_grad():
            full = mb(xb)
            y, cache = _decode(mb, xb, 2)
        assert cache.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
        r = rel(y, full.float())
        note("bf16 model decode rel", r)
        assert r < 2e-2, r


def test_compile_and_autocast():
    torch.manual_seed(14)
    m = make("student_t", causal=True)
    x = torch.randn(2, 9, 32)
    bias = 0.1 * torch.randn(4, 9, 9)
    eager = m(x, attn_bias=bias)
    f = torch.compile(m, fullgraph=True)
    y = f(x, attn_bias=bias)
    d = (y - eager).abs().max().item()
    note("compile max|d|", d)
    assert d < 1e-5, d
    # backward through the compiled graph: the eager gradients
    f(x, attn_bias=bias).square().sum().backward()
    g_c = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    m(x, attn_bias=bias).square().sum().backward()
    for n, p in m.named_parameters():
        r = rel(g_c[n], p.grad)
        note("compile grad rel", r)
        assert r < 1e-5, (n, r)
    # autocast: the output in bfloat16, within bfloat16 bounds of float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb, lse, e = m(x, attn_bias=bias, need_stats=True)
    assert yb.dtype == torch.bfloat16 and lse.dtype == torch.float32, (yb.dtype, lse.dtype)
    r = rel(yb.float(), eager)
    note("autocast bf16 rel", r)
    assert r < 5e-2, r
    yb.float().square().sum().backward()  # differentiable under autocast
    assert m.log_nu.grad is not None and torch.isfinite(m.log_nu.grad).all()


def test_training_reduces_loss_and_moves_nu_and_precisions():
    torch.manual_seed(15)
    teacher = make("student_t", seed=3, causal=True)
    m = PrecisionAttention(32, 4, num_kv_heads=2, head_dim=8, key_precision=True, causal=True)
    x = torch.randn(8, 10, 32)
    with torch.no_grad():
        target = teacher(x)
    init = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.mse_loss(m(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    for n in ("log_nu", "log_precision_head", "key_precision_weight", "key_precision_bias"):
        assert (getattr(m, n) - init[n]).abs().max() > 1e-3, n
    MAX["training loss first -> last"] = f"{losses[0]:.4f} -> {losses[-1]:.4f}"


def test_argument_errors():
    expect(ValueError, lambda: PrecisionAttention(30, 4), "num_heads")
    expect(ValueError, lambda: PrecisionAttention(32, 4, num_kv_heads=3), "num_kv_heads")
    expect(ValueError, lambda: PrecisionAttention(32, 4, score="cauchy"), "score")
    expect(ValueError, lambda: PrecisionAttention(0, 4), "embed_dim")
    expect(TypeError, lambda: PrecisionAttention(32, 4.0), "num_heads")
    expect(ValueError, lambda: PrecisionAttention(32, 4, head_dim=0), "head_dim")
    expect(ValueError, lambda: PrecisionAttention(32, 4, nu=0.0), "nu")
    expect(ValueError, lambda: PrecisionAttention(32, 4, window=0), "window")
    expect(ValueError, lambda: PrecisionAttention(32, 4, scale=-1.0), "scale")
    expect(ValueError, lambda: PrecisionAttention(32, 4, dtype=torch.float64), "dtype")
    # head_dim given: embed_dim need not divide
    m = PrecisionAttention(30, 4, head_dim=8)
    assert m(torch.randn(1, 3, 30)).shape == (1, 3, 30)
    m = PrecisionAttention(32, 4)
    expect(ValueError, lambda: m(torch.randn(2, 3, 16)), "embed_dim")
    expect(ValueError, lambda: m(torch.randn(2, 32)), "x")
    expect(TypeError, lambda: m([1.0]), "x")
    expect(ValueError, lambda: m(torch.randn(2, 3, 32), attn_bias=torch.randn(5, 3, 3)),
           "bias")
    expect(ValueError, lambda: m(torch.randn(2, 3, 32), kv_len=torch.tensor([3, 3])), "kv_len")


def test_zz_report():
    for k, v in MAX.items():
        print(f"     {k}: {v:.3g}" if isinstance(v, float) else f"     {k}: {v}")


if __name__ == "__main__":
    sys.exit(run_tests(globals(), "test_nn_attention.py"))
