"""Tests of fep_kernels.torch_ops (the fep:: torch.library ops, autograd and torch.compile) on
CPU tensors (and CUDA tensors in test_cuda_matches_cpu when PyTorch and the library both see a
GPU). Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_torch_ops.py`` (or pytest).

The C ABI has no float64: the ops take float32/float16/bfloat16. So opcheck runs in float32 with
its default tolerances, and the gradients are checked (a) by torch.autograd.gradcheck in float32
with a loose eps/atol and (b) against the float64 PyTorch reference of test_attention.py.

Needs PyTorch; without it, it prints that it was skipped and exits 0."""

import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_torch_ops.py", f"{e.name} is not installed")

import fep_kernels as fk  # noqa: E402
from _runner import expect, run_tests  # noqa: E402
from test_attention import differentiable  # noqa: E402


def problem(B=2, Hq=4, Hkv=2, Lq=5, Lk=6, D=8, Dv=4, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    ph = 0.5 + torch.rand(Hq, generator=g)
    pk = 0.5 + torch.rand(B, Hkv, Lk, generator=g)
    ts = [q, k, v, ph, pk]
    return [t.requires_grad_(grad) for t in ts]


def op_args(score="gaussian", causal=True, layout="bhld", **kw):
    q, k, v, ph, pk = problem(**kw)
    if layout == "blhd":
        q, k, v = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    # q, k, v, pi_head, pi_key, kv_len, nu_head, bias, mask, cu_seqlens_q, cu_seqlens_k, score,
    # nu, scale, causal, window, normalizer, layout, max_seqlen_q, max_seqlen_k
    return (q, k, v, ph, pk, None, None, None, None, None, None, score, 4.0, None, causal, None,
            True, layout, None, None)


def test_ops_registered():
    from fep_kernels import torch_ops  # noqa: F401

    assert hasattr(torch.ops.fep, "attention_forward")
    assert hasattr(torch.ops.fep, "attention_backward")


def test_opcheck_attention_forward():
    for score in ("dot", "gaussian", "student_t", "laplace"):
        for layout in ("bhld", "blhd"):
            torch.library.opcheck(torch.ops.fep.attention_forward,
                                  op_args(score=score, layout=layout))
    # kv_len and no precisions
    q, k, v, _, _ = problem()
    kv = torch.tensor([6, 3], dtype=torch.int32)
    torch.library.opcheck(torch.ops.fep.attention_forward,
                          (q, k, v, None, None, kv, None, None, None, None, None, "dot", 5.0, 0.5,
                           False, 2, False, "bhld", None, None))
    # per-head nu, a bias and a mask (issue 23's score inputs)
    q, k, v, ph, pk = problem()
    nu = torch.tensor([2.0, 3.0, 5.0, 8.0], requires_grad=True)
    bias = torch.randn(1, 4, 5, 6, requires_grad=True)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, 0, 0, 2] = False
    torch.library.opcheck(torch.ops.fep.attention_forward,
                          (q, k, v, ph, pk, None, nu, bias, mask, None, None, "student_t", 1.0,
                           None, True, None, True, "bhld", None, None))


def test_opcheck_attention_backward():
    q, k, v, ph, pk = problem(grad=False)
    o, lse, e = fk.attention_forward(q, k, v, score="student_t", nu=4.0, pi_head=ph, pi_key=pk)
    d_o, d_e = torch.randn_like(o), torch.randn_like(e)
    d_lse = torch.randn_like(lse)
    for de, dl in ((None, None), (d_e, None), (d_e, d_lse)):
        torch.library.opcheck(torch.ops.fep.attention_backward,
                              (q, k, v, o, lse, d_o, e if de is not None else None, de, dl, ph,
                               pk, None, None, None, None, None, None, "student_t", 4.0, None,
                               False, None, True, "bhld", None, None))
    # with a bias (dbias) and a per-head nu (dnu [Hq])
    nu = torch.tensor([2.0, 3.0, 5.0, 8.0])
    bias = torch.randn(1, 4, 1, 6)
    o, lse, e = fk.attention_forward(q, k, v, score="student_t", nu=nu, pi_head=ph, pi_key=pk,
                                     bias=bias)
    torch.library.opcheck(torch.ops.fep.attention_backward,
                          (q, k, v, o, lse, d_o, e, d_e, d_lse, ph, pk, None, nu, bias, None,
                           None, None, "student_t", 1.0, None, False, None, True, "bhld", None,
                           None))
    # no precision and no per-head nu: the precision gradients are skipped (zeros of the
    # schema's shapes) and dq, dk, dv are bitwise those of the call that computes them
    for score in ("gaussian", "student_t"):
        o, lse, _ = fk.attention_forward(q, k, v, score=score, nu=4.0)
        args = (q, k, v, o, lse, d_o, None, None, None, None, None, None, None, None, None, None,
                None, score, 4.0, None, False, None, True, "bhld", None, None)
        torch.library.opcheck(torch.ops.fep.attention_backward, args)
        got = torch.ops.fep.attention_backward(*args)
        full = fk.attention_backward(q, k, v, o, lse, d_o, score=score, nu=4.0,
                                     precision_grads=True)
        assert all(torch.equal(a, b) for a, b in zip(got[:3], full[:3])), score
        assert [list(t.shape) for t in got[3:6]] == [[4], [2, 2, 6], []], score
        assert not any(t.any() for t in got[3:6]), score



def test_package_layout_keeps_the_old_paths():
    import importlib

    import fep_kernels.torch as fkt
    for old, new in (("torch_ops", "torch.ops"), ("torch_settle", "torch.settle"),
                     ("torch_lca", "torch.lca"), ("nn", "torch.nn"), ("nn.pc", "torch.nn.pc"),
                     ("nn.lca", "torch.nn.lca"), ("nn.attention", "torch.nn.attention")):
        a = importlib.import_module(f"fep_kernels.{old}")
        b = importlib.import_module(f"fep_kernels.{new}")
        assert a is b, (old, new)
    from fep_kernels.nn import PCNetwork
    assert PCNetwork is fkt.nn.PCNetwork
    assert fk.torch_ops is fkt.ops and fk.torch_settle is fkt.settle and fk.nn is fkt.nn

def test_gradcheck_float32():
    for score in ("dot", "gaussian", "student_t", "laplace"):
        q, k, v, ph, pk = problem(B=1, Hq=2, Hkv=1, Lq=3, Lk=4, D=4, Dv=3, seed=1)

        def f(q, k, v, ph, pk):
            o, _, e = fk.torch_ops.attention_with_stats(q, k, v, precision_key=pk,
                                                        precision_head=ph, score=score, nu=4.0,
                                                        causal=True)
            return o, e

        with warnings.catch_warnings():  # "not a double precision" (the ABI has no float64)
            warnings.simplefilter("ignore", UserWarning)
            assert torch.autograd.gradcheck(f, (q, k, v, ph, pk), eps=1e-3, atol=2e-2,
                                            rtol=2e-2, fast_mode=False), score


def test_gradients_match_float64_reference():
    for score in ("dot", "gaussian", "student_t", "laplace"):
        for causal in (False, True):
            q, k, v, ph, pk = problem(seed=2)
            o, _, e = fk.torch_ops.attention_with_stats(q, k, v, precision_key=pk,
                                                        precision_head=ph, score=score, nu=4.0,
                                                        causal=causal)
            g = torch.Generator().manual_seed(3)
            go, ge = torch.randn(o.shape, generator=g), torch.randn(e.shape, generator=g)
            ((o * go).sum() + (e * ge).sum()).backward()
            got = [t.grad for t in (q, k, v, ph, pk)]
            ref_in = [t.detach().double().requires_grad_() for t in (q, k, v, ph, pk)]
            ro, re = differentiable(*ref_in, 4.0, score=score, causal=causal)
            assert (o.double() - ro).abs().max() < 1e-5
            ((ro * go.double()).sum() + (re * ge.double()).sum()).backward()
            for name, a, r in zip(("q", "k", "v", "pi_head", "pi_key"), got,
                                  (t.grad for t in ref_in)):
                err = (a.double() - r).abs().max() / max(r.abs().max().item(), 1e-30)
                assert err < 1e-4, f"{score} causal={causal} d{name}: rel err {err:.2e}"


def test_attention_blhd_and_no_precisions():
    q, k, v, _, _ = problem(seed=4)
    qb, kb, vb = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    o = fk.attention(qb, kb, vb, score="gaussian", layout="blhd")
    o.sum().backward()
    o2 = fk.attention(q, k, v, score="gaussian")
    o2.sum().backward()
    assert torch.allclose(o.transpose(1, 2), o2, atol=1e-6)
    assert torch.allclose(qb.grad.transpose(1, 2), q.grad, atol=1e-5)
    assert torch.allclose(vb.grad.transpose(1, 2), v.grad, atol=1e-5)


def test_torch_compile_fullgraph():
    torch._dynamo.reset()

    def f(q, k, v, pk):
        return fk.attention(q, k, v, precision_key=pk, score="student_t", nu=3.0,
                            causal=True).square().sum()

    cf = torch.compile(f, fullgraph=True, backend="aot_eager")
    q, k, v, ph, pk = problem(seed=5)
    loss = cf(q, k, v, pk)
    loss.backward()
    grads = [t.grad.clone() for t in (q, k, v, pk)]
    for t in (q, k, v, pk):
        t.grad = None
    ref = f(q, k, v, pk)
    ref.backward()
    assert torch.allclose(loss, ref)
    for a, t in zip(grads, (q, k, v, pk)):
        assert torch.allclose(a, t.grad)
    # the default (inductor) backend, forward only
    torch._dynamo.reset()
    co = torch.compile(lambda q, k, v: fk.attention(q, k, v, score="laplace") * 2, fullgraph=True)
    with torch.no_grad():
        assert torch.allclose(co(q, k, v), 2 * fk.attention(q, k, v, score="laplace"))


def test_cuda_matches_cpu():
    """The ops on CUDA tensors (opcheck, and forward/backward against the CPU's)."""
    if not (torch.cuda.is_available() and fk.device_count("cuda") > 0):
        return "SKIPPED: no CUDA device seen by both PyTorch and the library"
    for score in ("dot", "student_t"):
        args = op_args(score=score, seed=6)
        cuda = tuple(t.detach().cuda().requires_grad_() if isinstance(t, torch.Tensor) else t
                     for t in args)
        torch.library.opcheck(torch.ops.fep.attention_forward, cuda)
        outs = []
        for q, k, v, ph, pk in (args[:5], cuda[:5]):
            o, _, e = fk.torch_ops.attention_with_stats(q, k, v, precision_key=pk,
                                                        precision_head=ph, score=score, nu=4.0,
                                                        causal=True)
            (o.square().sum() + e.sum()).backward()
            outs.append([o, e, q.grad, k.grad, v.grad, ph.grad, pk.grad])
        for name, a, c in zip(("o", "e", "dq", "dk", "dv", "dpi_head", "dpi_key"), *outs):
            err = (a.detach() - c.detach().cpu()).abs().max() / max(a.abs().max().item(), 1e-30)
            assert err < 1e-4, f"{score} {name}: CUDA vs CPU rel err {err:.2e}"
        q, k, v, ph, pk = (t.detach() for t in cuda[:5])
        o, lse, e = fk.attention_forward(q, k, v, score=score, nu=4.0, pi_head=ph, pi_key=pk)
        torch.library.opcheck(torch.ops.fep.attention_backward,
                              (q, k, v, o, lse, torch.randn_like(o), e, torch.randn_like(e), ph,
                               pk, None, score, 4.0, None, False, None, True, "bhld"))


def test_bad_inputs():
    q, k, v, ph, pk = problem(grad=False)
    a = fk.attention
    expect(TypeError, lambda: a(q.tolist(), k, v), "q: expected a torch.Tensor")
    expect(TypeError, lambda: a(q, k, v, precision_key=[1.0]), "precision_key")
    expect(TypeError, lambda: a(q, k, v, nu="5"), "nu")
    expect(ValueError, lambda: a(q.double(), k.double(), v.double()), "float64")
    expect(ValueError, lambda: a(q, k.half(), v), "differs from q")
    expect(ValueError, lambda: a(q[0], k, v), "4-d")
    expect(ValueError, lambda: a(q, k[:, :, :, :4], v), "do not fit")
    expect(ValueError, lambda: a(q, k, v, precision_key=pk[:, :, :2]), "precision_key: expected shape")
    expect(ValueError, lambda: a(q, k, v, precision_head=ph.double()), "precision_head: expected dtype")
    expect(ValueError, lambda: a(q, k, v, score="cosine"), "score")
    expect(ValueError, lambda: a(q, k, v, layout="bshd"), "layout")
    expect(ValueError, lambda: a(q, k, v, scale=-1.0), "scale")
    expect(ValueError, lambda: a(q, k, v, window=0), "window")
    # values are the library's: a non-positive precision is FEP_ERR_INVALID_ARGUMENT
    expect(fk.FepError, lambda: a(q, k, v, precision_key=-pk), "")
    # Issue 21: the library's `precision.key` and flat index are the user's precision_key with
    # a multi-index, forward and backward.
    bad = pk.detach().clone()
    bad[0, 1, 3] = -1.0
    expect(fk.FepError, lambda: a(q, k, v, precision_key=bad),
           "`precision_key`: precision_key[0, 1, 3] is -1")
    bad_h = ph.detach().clone()
    bad_h[1] = 0.0
    expect(fk.FepError, lambda: a(q, k, v, precision_head=bad_h), "precision_head[1] is 0")
    expect(ValueError, lambda: a(q[:0], k[:0], v[:0]), "q: is empty (shape [0, 4, 5, 8])")
    expect(TypeError, lambda: a(q, k, v, window=True), "window: expected an int, got bool")
    expect(TypeError, lambda: a(q, k, v, nu=True), "nu")


if __name__ == "__main__":
    sys.exit(run_tests(globals(), "test_torch_ops.py"))
