#!/usr/bin/env python3
"""Tests of the settling op of bindings/python/fep_kernels.py (SettleNet, settle_infer,
settle_learn) against the real library, on CPU tensors (and CUDA tensors when PyTorch and the
library both see a GPU).

The reference is a small pure-PyTorch float64 implementation of DESIGN.md section 4.2, written
from the contract and not from the library:

    mu_l = W_l f_l(x_{l-1}) + b_l,  eps_l = x_l - mu_l,  E = 1/2 sum_l eps_l^T Pi_l eps_l
    g_l = Pi_l eps_l - f'_{l+1}(x_l) * W_{l+1}^T (Pi_{l+1} eps_{l+1})   (no second term at l = L)
    v_l <- beta v_l + g_l,  x_l <- x_l - eta v_l                      (free layers, synchronous)
    trace: the energy at the start and after each step (T + 1 per sample); a sample stops after
    step t when |E_t - E_{t-1}| <= tol E_{t-1} or E_t <= tol E_0, and then repeats its values
    grad_W_l = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T,  grad_b_l = -(1/B) sum_b Pi_l eps_l

Run from the repository root, after `cargo build --release` (no pytest needed):

    python3 bindings/python/test_settle.py            # or: FEP_KERNELS_LIB=... python3 ...

It prints one line per test and closes with "N passed, N failed" (exit status 1 on a failure).
Needs PyTorch; without it, it prints that it was skipped and exits 0.
"""

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_settle.py", f"{e.name} is not installed")

import fep_kernels as fk
from _runner import run_tests

F64 = torch.float64

# ---- the reference ----


def act_fn(a):
    """(f, f') in float64 for an activation spec as the wrapper takes it."""
    name, alpha = (a, 0.01) if isinstance(a, str) else a
    if name == "identity":
        return (lambda x: x), (lambda x: torch.ones_like(x))
    if name == "tanh":
        return torch.tanh, (lambda x: 1 - torch.tanh(x) ** 2)
    if name == "relu":
        return torch.relu, (lambda x: (x > 0).to(x.dtype))
    if name == "leaky_relu":
        return (lambda x: torch.where(x > 0, x, alpha * x)), (
            lambda x: torch.where(x > 0, torch.ones_like(x), torch.full_like(x, alpha))
        )
    if name == "sigmoid":
        return torch.sigmoid, (lambda x: torch.sigmoid(x) * (1 - torch.sigmoid(x)))
    if name == "gelu":
        cdf = lambda x: 0.5 * torch.erfc(-x / math.sqrt(2.0))  # noqa: E731
        pdf = lambda x: torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)  # noqa: E731
        return (lambda x: x * cdf(x)), (lambda x: cdf(x) + x * pdf(x))
    raise ValueError(a)


def reference(weights, biases, acts, precs, x0, eta, steps, momentum=0.0, tol=0.0, init=None,
              target=None):
    """The settle of DESIGN.md 4.2 in float64; returns a dict like the wrapper's."""
    L = len(weights)
    W = [w.to(F64) for w in weights]
    b = [torch.zeros(w.shape[0], dtype=F64) if bb is None else bb.to(F64)
         for w, bb in zip(weights, biases)]
    pi = [torch.full((w.shape[0],), float(p), dtype=F64) if not isinstance(p, torch.Tensor)
          else p.to(F64) for w, p in zip(weights, precs)]
    fs = [act_fn(a) for a in acts]
    B = x0.shape[0]
    clamped = target is not None
    top_free = L - 1 if clamped else L

    def mu(l, x):  # layer l >= 1
        return fs[l - 1][0](x[l - 1]) @ W[l - 1].T + b[l - 1]

    x = [x0.to(F64)] + [None] * L
    if init is not None:
        for l in range(1, top_free + 1):
            x[l] = init[l - 1].to(F64).clone()
    else:
        for l in range(1, top_free + 1):
            x[l] = mu(l, x)
    if clamped:
        x[L] = target.to(F64).clone()

    def errors(x):
        eps = [x[l] - mu(l, x) for l in range(1, L + 1)]
        energy = sum(0.5 * (pi[l] * e * e).sum(1) for l, e in enumerate(eps))
        return eps, energy

    eps, energy = errors(x)
    trace = [energy]
    v = [torch.zeros_like(x[l]) for l in range(L + 1)]
    active = torch.ones(B, dtype=torch.bool)
    nsteps = torch.full((B,), steps, dtype=torch.int32)
    for t in range(1, steps + 1):
        g = [None] * (L + 1)
        for l in range(1, top_free + 1):
            g[l] = pi[l - 1] * eps[l - 1]
            if l < L:
                g[l] = g[l] - fs[l][1](x[l]) * ((pi[l] * eps[l]) @ W[l])
        for l in range(1, top_free + 1):
            v_new = momentum * v[l] + g[l]
            x_new = x[l] - eta * v_new
            v[l] = torch.where(active[:, None], v_new, v[l])
            x[l] = torch.where(active[:, None], x_new, x[l])
        eps, energy = errors(x)
        prev = trace[-1]
        energy = torch.where(active, energy, prev)
        if tol > 0:
            stop = active & (((energy - prev).abs() <= tol * prev) | (energy <= tol * trace[0]))
            nsteps[stop] = t
            active = active & ~stop
        trace.append(energy)
    res = {
        "x": x[1:],
        "eps": eps,
        "energy": trace[-1],
        "trace": torch.stack(trace, 1),
        "steps": nsteps,
    }
    if clamped:
        res["grad_w"] = [-(pi[l] * eps[l]).T @ fs[l][0](x[l]) / B for l in range(L)]
        res["grad_b"] = [-(pi[l] * eps[l]).sum(0) / B for l in range(L)]
    return res


# ---- helpers ----


def cpu_or_none(t):
    return t.cpu() if t is not None else None


def rel(a, ref):
    a, ref = a.detach().cpu().to(F64), ref.detach().cpu().to(F64)
    if torch.isnan(a).any():
        return float("inf")
    den = ref.norm().item()
    return (a - ref).norm().item() / den if den > 0 else (a - ref).norm().item()


def assert_close(what, got, want, tol):
    if isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{what}: list lengths"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(f"{what}[{i}]", g, w, tol)
        return
    assert tuple(got.shape) == tuple(want.shape), (
        f"{what}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    )
    e = rel(got, want)
    assert e <= tol, f"{what}: relative error {e:.3e} > {tol:.1e}"


def compare(got, want, tol, keys=("x", "eps", "energy", "trace", "grad_w", "grad_b")):
    for k in keys:
        if k in want and got.get(k) is not None:
            assert_close(k, got[k], want[k], tol)
    assert torch.equal(got["steps"].cpu(), want["steps"]), (
        f"steps {got['steps']} vs {want['steps']}"
    )


def problem(widths, batch, dtype=torch.float32, seed=0, bias=True, diag=False, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    L = len(widths) - 1
    weights = [(torch.randn(widths[l + 1], widths[l], generator=g) / math.sqrt(widths[l]))
               .to(dtype).to(device) for l in range(L)]
    biases = [(0.1 * torch.randn(widths[l + 1], generator=g)).to(dtype).to(device)
              if bias and l % 2 == 0 else None for l in range(L)]
    if diag:
        precs = [(0.5 + 1.5 * torch.rand(widths[l + 1], generator=g)).to(device) if l % 2 == 0
                 else 0.5 + l for l in range(L)]
    else:
        precs = [1.0 + 0.5 * l for l in range(L)]
    x0 = torch.randn(batch, widths[0], generator=g).to(device)
    target = torch.randn(batch, widths[-1], generator=g).to(device)
    init = [torch.randn(batch, widths[l + 1], generator=g).to(device) for l in range(L)]
    return weights, biases, precs, x0, target, init


ALL_ACTS = ["identity", "tanh", "relu", ("leaky_relu", 0.2), "sigmoid", "gelu"]
F32_TOL = 1e-5

# ---- tests ----


def test_infer_given_start_every_activation(device="cpu"):
    widths = [5, 7, 6, 9, 4, 3, 6]
    weights, biases, precs, x0, _, init = problem(widths, 4, seed=1, diag=True, device=device)
    res = fk.settle_infer(weights, biases, ALL_ACTS, precs, x0, eta=0.05, steps=25,
                          momentum=0.5, init=init, trace=True)
    want = reference(weights, biases, ALL_ACTS, precs, x0.cpu(), 0.05, 25, momentum=0.5,
                     init=[t.cpu() for t in init])
    compare(res, want, F32_TOL)
    assert res["trace"][:, -1].sum() < res["trace"][:, 0].sum(), "settling lowered the energy"
    for l, t in enumerate(init):  # the start was copied, not written through
        assert not torch.equal(t, res["x"][l])


def test_infer_feedforward_is_a_fixed_point():
    widths = [6, 8, 3]
    weights, biases, precs, x0, _, _ = problem(widths, 5, seed=2)
    res = fk.settle_infer(weights, biases, ["identity", "tanh"], precs, x0, eta=0.1, steps=5,
                          trace=True)
    want = reference(weights, biases, ["identity", "tanh"], precs, x0, 0.1, 5)
    compare(res, want, F32_TOL, keys=("x",))
    assert res["trace"].abs().max().item() < 1e-10, res["trace"]
    assert all(e.abs().max().item() < 1e-5 for e in res["eps"])


def test_learn_gradients_and_sgd(dtype=torch.float32, device="cpu", tol=F32_TOL):
    widths = [7, 9, 8, 4]
    acts = ["identity", "tanh", "tanh"]
    weights, biases, precs, x0, target, _ = problem(widths, 6, dtype=dtype, seed=3, diag=True,
                                                    device=device)
    res = fk.settle_learn(weights, biases, acts, precs, x0, target, eta=0.1, steps=20,
                          momentum=0.3, trace=True)
    want = reference([w.cpu() for w in weights], [cpu_or_none(b) for b in biases],
                     acts, [p.cpu() if isinstance(p, torch.Tensor) else p for p in precs],
                     x0.cpu(), 0.1, 20, momentum=0.3, target=target.cpu())
    compare(res, want, tol)
    assert torch.equal(res["x"][-1], target), "x_out[L-1] receives the target"
    assert res["trace"][:, -1].sum() < res["trace"][:, 0].sum()
    # lr > 0: the same gradients, and W -= lr grad applied in place, rounded once.
    w_before = [w.clone() for w in weights]
    b_before = [b.clone() if b is not None else None for b in biases]
    lr = 0.05
    res2 = fk.settle_learn(weights, biases, acts, precs, x0, target, eta=0.1, steps=20,
                           momentum=0.3, lr=lr)
    for l in range(len(weights)):
        assert torch.equal(res2["grad_w"][l], res["grad_w"][l]), "same gradients"
        expect = (w_before[l].to(F64) - lr * res["grad_w"][l].to(F64)).to(dtype)
        diff = (weights[l].to(F64) - expect.to(F64)).abs().max().item()
        ulp = 0.0 if dtype == torch.float32 else expect.to(F64).abs().max().item() * 2**-7
        assert diff <= max(ulp, 1e-7), f"W_{l + 1} after SGD: max diff {diff}"
        if biases[l] is not None:
            expect = (b_before[l].to(F64) - lr * res["grad_b"][l].to(F64)).to(dtype)
            diff = (biases[l].to(F64) - expect.to(F64)).abs().max().item()
            assert diff <= max(ulp, 1e-7), f"b_{l + 1} after SGD: max diff {diff}"


def test_learn_half_precision_weights():
    for dtype in (torch.float16, torch.bfloat16):
        # The reference uses the same rounded weights, and the CPU backend computes in f64.
        test_learn_gradients_and_sgd(dtype=dtype, tol=F32_TOL)


def test_learn_given_start_and_single_layer():
    widths = [4, 6, 5, 3]
    acts = ["tanh", "relu", "sigmoid"]
    weights, biases, precs, x0, target, init = problem(widths, 3, seed=4, bias=False)
    res = fk.settle_learn(weights, None, acts, precs, x0, target, eta=0.1, steps=15,
                          init=init[:2], trace=True)
    want = reference(weights, [None] * 3, acts, precs, x0, 0.1, 15, init=init[:2], target=target)
    compare(res, want, F32_TOL)
    # L = 1: nothing is free; the gradient is that of the clamped pair.
    w = weights[:1]
    res = fk.settle_learn(w, [None], ["gelu"], [2.0], x0, init[0], eta=0.1, steps=3, trace=True)
    want = reference(w, [None], ["gelu"], [2.0], x0, 0.1, 3, target=init[0])
    compare(res, want, F32_TOL)


def test_early_stop():
    # With x_L clamped the energy settles at a positive minimum, so its relative change falls
    # below tol; samples with different scales stop at different steps.
    widths = [5, 8, 7, 6]
    acts = ["identity", "tanh", "tanh"]
    weights, biases, precs, x0, target, init = problem(widths, 6, seed=5)
    target = target * (1 + torch.arange(6, dtype=torch.float32)[:, None])
    tol = 1e-4
    res = fk.settle_learn(weights, biases, acts, precs, x0, target, eta=0.1, steps=300,
                          tol=tol, trace=True)
    want = reference(weights, biases, acts, precs, x0, 0.1, 300, tol=tol, target=target)
    assert (want["steps"] < 300).all() and len(set(want["steps"].tolist())) > 1, want["steps"]
    compare(res, want, 1e-4)
    for b, s in enumerate(res["steps"].tolist()):
        row = res["trace"][b, s:]
        assert torch.equal(row, row[:1].expand_as(row)), "a stopped sample repeats its energy"
    # infer too (the early stop does not depend on the mode)
    res = fk.settle_infer(weights, biases, acts, precs, x0, eta=0.1, steps=50, tol=0.05,
                          init=init, trace=True)
    want = reference(weights, biases, acts, precs, x0, 0.1, 50, tol=0.05, init=init)
    compare(res, want, 1e-4)


def test_scalar_and_broadcast_arguments():
    widths = [3, 4, 2]
    weights, biases, _, x0, _, init = problem(widths, 2, seed=6)
    # One activation and one precision for every layer; a bare "leaky_relu" has slope 0.01;
    # a 0-d tensor is a scalar precision.
    res = fk.settle_infer(weights, biases, "leaky_relu", torch.tensor(1.5), x0, eta=0.1,
                          steps=4, init=init, trace=True)
    want = reference(weights, biases, [("leaky_relu", 0.01)] * 2, [1.5, 1.5], x0, 0.1, 4,
                     init=init)
    compare(res, want, F32_TOL)
    res = fk.settle_infer(weights, biases, ("leaky_relu", 0.3), None, x0, eta=0.1, steps=4,
                          init=init)
    want = reference(weights, biases, [("leaky_relu", 0.3)] * 2, [1.0, 1.0], x0, 0.1, 4,
                     init=init)
    compare(res, want, F32_TOL)
    assert res["trace"] is None


def test_out_tensors_and_reuse():
    widths = [5, 6, 3]
    acts = ["identity", "tanh"]
    weights, biases, precs, x0, target, _ = problem(widths, 4, seed=7)
    net = fk.SettleNet(weights, biases, acts, precs)
    B, T = 4, 6
    out = {
        "x": [torch.empty(B, n) for n in widths[1:]],
        "eps": [torch.empty(B, n) for n in widths[1:]],
        "energy": torch.empty(B),
        "trace": torch.empty(B, T + 1),
        "steps": torch.empty(B, dtype=torch.int32),
        "grad_w": [torch.empty(widths[l + 1], widths[l]) for l in range(2)],
        "grad_b": [torch.empty(n) for n in widths[1:]],
    }
    res = net.learn(x0, target, eta=0.1, steps=T, trace=True, out=out)
    for k, v in out.items():
        if isinstance(v, list):
            assert all(a is b for a, b in zip(res[k], v)), k
        else:
            assert res[k] is v, k
    compare(res, reference(weights, biases, acts, precs, x0, 0.1, T, target=target), F32_TOL)
    # The net reads the weights at each call: an in-place change is seen.
    with torch.no_grad():
        weights[1].mul_(2.0)
    res = net.learn(x0, target, eta=0.1, steps=T)
    compare(res, reference(weights, biases, acts, precs, x0, 0.1, T, target=target), F32_TOL)


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
    widths = [5, 6, 3]
    acts = ["identity", "tanh"]
    weights, biases, precs, x0, target, init = problem(widths, 4, seed=8)
    W = weights
    V = ValueError
    expect_error(V, lambda: fk.SettleNet([W[0], W[0]], None, acts), "weights[1]", "[*, 6]")
    expect_error(V, lambda: fk.SettleNet([W[0], W[1].half()], None, acts), "weights[1]", "dtype")
    expect_error(V, lambda: fk.SettleNet([W[0].double(), W[1]], None, acts), "weights[0]",
                 "float64")
    expect_error(V, lambda: fk.SettleNet([W[0].T, W[1]], None, acts), "weights[0]")
    expect_error(V, lambda: fk.SettleNet([W[0], W[1].T.contiguous().T], None, acts),
                 "contiguous")
    expect_error(V, lambda: fk.SettleNet([], None, acts), "at least one")
    expect_error(V, lambda: fk.SettleNet(W, [None], acts), "biases", "2 entries")
    expect_error(V, lambda: fk.SettleNet(W, [torch.zeros(5), None], acts), "biases[0]", "[6]")
    expect_error(V, lambda: fk.SettleNet(W, [torch.zeros(6).half(), None], acts), "biases[0]",
                 "dtype")
    expect_error(V, lambda: fk.SettleNet(W, None, ["tanh"]), "activations", "2 entries")
    expect_error(V, lambda: fk.SettleNet(W, None, ["tanh", "swish"]), "activations[1]", "swish")
    expect_error(V, lambda: fk.SettleNet(W, None, ["tanh", ("tanh", 1.0)]), "activations[1]")
    expect_error(V, lambda: fk.SettleNet(W, None, acts, [1.0]), "precisions", "2 entries")
    expect_error(V, lambda: fk.SettleNet(W, None, acts, [torch.ones(5), 1.0]), "precisions[0]",
                 "[6]")
    expect_error(V, lambda: fk.SettleNet(W, None, acts, [torch.ones(6).double(), 1.0]),
                 "precisions[0]", "float32")
    expect_error(V, lambda: fk.SettleNet(W, None, acts, ["x", 1.0]), "precisions[0]")
    net = fk.SettleNet(W, biases, acts, precs)
    expect_error(V, lambda: net.infer(x0[:, :4], 0.1, 5), "x0", "[*, 5]")
    expect_error(V, lambda: net.infer(x0.half(), 0.1, 5), "x0", "float32")
    expect_error(V, lambda: net.infer(x0, 0.1, 0), "steps")
    expect_error(V, lambda: net.infer(x0, 0.1, 2.5), "steps")
    expect_error(V, lambda: net.infer(x0, "a", 5), "eta")
    expect_error(V, lambda: net.infer(x0, 0.1, 5, init=init[:1]), "init", "2 tensors")
    expect_error(V, lambda: net.infer(x0, 0.1, 5, init=[init[0], init[0]]), "init[1]")
    expect_error(V, lambda: net.learn(x0, target[:, :2], 0.1, 5), "target", "[4, 3]")
    expect_error(V, lambda: net.learn(x0, target, 0.1, 5, init=init), "init", "1 tensors")
    expect_error(V, lambda: net.infer(x0, 0.1, 5, out={"trace": torch.empty(4, 6)}), "trace=True")
    expect_error(V, lambda: net.infer(x0, 0.1, 5, out={"grad_w": []}), "unknown keys")
    expect_error(V, lambda: net.infer(x0, 0.1, 5, out={"x": [torch.empty(4, 6)]}), "out['x']",
                 "2 tensors")
    # Range checks are the library's: FepError with FEP_ERR_INVALID_ARGUMENT, outputs untouched.
    out = {"energy": torch.full((4,), float("nan"))}
    for kwargs, needle in [
        (dict(eta=-0.1, steps=5), "eta"),
        (dict(eta=0.1, steps=5, momentum=1.0), "momentum"),
        (dict(eta=0.1, steps=5, tol=-1.0), "tol"),
        (dict(eta=float("nan"), steps=5), "eta"),
    ]:
        e = expect_error(fk.FepError, lambda: net.infer(x0, out=out, **kwargs), needle)
        assert e.status == fk.FEP_ERR_INVALID_ARGUMENT and e.name == "FEP_ERR_INVALID_ARGUMENT"
        assert torch.isnan(out["energy"]).all(), "outputs untouched on error"
    e = expect_error(fk.FepError, lambda: fk.settle_infer(W, None, acts, [1.0, -2.0], x0, 0.1, 5),
                     "precision")
    assert e.status == fk.FEP_ERR_INVALID_ARGUMENT
    expect_error(fk.FepError, lambda: fk.settle_infer(W, None, acts, [torch.zeros(6), 1.0], x0,
                                                      0.1, 5), "precision")
    expect_error(fk.FepError, lambda: net.learn(x0, target, 0.1, 5, lr=-1.0), "lr")
    bad = x0.clone()
    bad[1, 2] = float("inf")
    expect_error(fk.FepError, lambda: net.infer(bad, 0.1, 5), "x0")
    # Two outputs sharing memory are rejected by the library.
    shared = torch.empty(4, 6)
    overlapping = {"x": [shared, torch.empty(4, 3)], "eps": [shared, torch.empty(4, 3)]}
    expect_error(fk.FepError, lambda: net.infer(x0, 0.1, 5, out=overlapping), "overlap")


# ---- issue 21: held tensors re-validated, Python names in messages, divergence ----


def test_replaced_weights_are_revalidated_on_every_call():
    # A SettleNet keeps its tensors: their storage, shape, dtype or device may change between
    # calls, and no pointer may go to the library for a tensor that no longer fits (issue 21:
    # `w2.data = g[:1]` then learn(lr=0.5) wrote 9 floats past the 1-element tensor).
    V = ValueError
    x0, y = torch.randn(4, 3), torch.randn(4, 2)
    learn = lambda net: net.learn(x0, y, 0.1, 10, lr=0.5)  # noqa: E731
    w1, w2 = torch.randn(5, 3), torch.randn(2, 5)
    net = fk.SettleNet([w1, w2])
    g = torch.zeros(64)
    w2.data = g[:1]
    expect_error(V, lambda: learn(net), "weights[1]: expected shape [2, 5], got [1]")
    assert not g.any(), "nothing written past (or into) the replaced weight"
    w1, w2 = torch.randn(5, 3), torch.randn(2, 5)
    net = fk.SettleNet([w1, w2])
    net.weights[1] = g[:3]
    expect_error(V, lambda: learn(net), "weights[1]: expected shape [2, 5], got [3]")
    assert not g.any()
    net.weights = [w1]
    expect_error(V, lambda: learn(net), "weights", "expected 2 entries")
    w1, w2 = torch.randn(5, 3), torch.randn(2, 5)
    net = fk.SettleNet([w1, w2])
    w2.data = w2.data.double()
    expect_error(V, lambda: learn(net), "weights[1]: expected dtype torch.float32, got "
                 "torch.float64")
    w2.data = torch.randn(5, 2).T  # the right shape, not contiguous
    expect_error(V, lambda: learn(net), "weights[1]", "contiguous")
    # Biases and diagonal precisions alike (set_ and .data).
    b1, p1 = torch.zeros(5), torch.ones(5)
    net = fk.SettleNet([w1, torch.randn(2, 5)], biases=[b1, None], precisions=[p1, 1.0])
    b1.set_(torch.zeros(2))
    expect_error(V, lambda: net.infer(x0, 0.1, 5), "biases[0]: expected shape [5], got [2]")
    b1.set_(torch.zeros(5))
    p1.data = torch.ones(5, dtype=torch.float16)
    expect_error(V, lambda: net.infer(x0, 0.1, 5), "precisions[0]", "float32")
    p1.data = torch.ones(5)
    net.infer(x0, 0.1, 5)  # fits again
    # A replacement that fits is used: the new storage, not the old pointer.
    weights, biases, precs, x0, target, _ = problem([5, 6, 3], 4, seed=21)
    net = fk.SettleNet([w.clone() for w in weights], [b if b is None else b.clone()
                                                      for b in biases], "tanh", precs)
    net.weights[0].data = weights[0] * 2
    net.precisions = [2.0, precs[1]]
    got = net.infer(x0, 0.1, 5)
    want = fk.SettleNet([weights[0] * 2, weights[1]], biases, "tanh", [2.0, precs[1]]).infer(
        x0, 0.1, 5)
    assert torch.equal(got["energy"], want["energy"]) and torch.equal(got["x"][0], want["x"][0])


def test_errors_name_python_arguments_and_multi_indices():
    V = ValueError
    weights, biases, precs, x0, target, init = problem([5, 6, 3], 4, seed=22, diag=True)
    net = fk.SettleNet(weights, biases, ["tanh", "tanh"], precs)
    # Empty tensors: said in Python ("`x0.data` is NULL" from the library before).
    expect_error(V, lambda: net.infer(x0[:0], 0.1, 5), "x0: is empty (shape [0, 5])")
    expect_error(V, lambda: fk.SettleNet([torch.randn(0, 5)]), "weights[0]: is empty")
    # The library's "layers[1].weight: element 8" is the user's weights[1][1, 2].
    bad = [w.clone() for w in weights]
    bad[1][1, 2] = float("nan")
    e = expect_error(fk.FepError, lambda: fk.settle_infer(bad, biases, "tanh", precs, x0, 0.1, 5),
                     "`weights[1]`", "weights[1][1, 2] is NaN")
    assert "layers[" not in str(e) and "element" not in str(e), str(e)
    diag = precs[0].clone()
    diag[4] = -1.0
    expect_error(fk.FepError, lambda: fk.settle_infer(weights, biases, "tanh", [diag, 1.0], x0,
                                                      0.1, 5), "precisions[0][4] is -1")
    expect_error(fk.FepError, lambda: fk.settle_infer(weights, biases, "tanh", [1.0, -2.0], x0,
                                                      0.1, 5), "`precisions[1]`")
    b = x0.clone()
    b[2, 1] = float("inf")
    expect_error(fk.FepError, lambda: net.infer(b, 0.1, 5), "x0[2, 1] is inf")
    t = target.clone()
    t[3, 0] = float("nan")
    expect_error(fk.FepError, lambda: net.learn(x0, t, 0.1, 5), "target[3, 0] is NaN")
    start = [i.clone() for i in init]
    start[1][2, 0] = float("inf")
    expect_error(fk.FepError, lambda: net.infer(x0, 0.1, 5, init=start), "`init[1]`",
                 "init[1][2, 0] is inf")
    # Integer and real parameters: a bool is neither (steps=True ran one step before).
    for kwargs, needle in [(dict(steps=True), "steps"), (dict(steps=2.0), "steps"),
                           (dict(eta=True), "eta"), (dict(momentum=False), "momentum"),
                           (dict(tol=True), "tol"), (dict(steps=torch.tensor(True)), "steps")]:
        args = {**dict(eta=0.1, steps=5), **kwargs}
        expect_error(TypeError, lambda: net.infer(x0, **args), needle)
        expect_error(V, lambda: net.infer(x0, **args), needle)
    expect_error(fk.ArgumentTypeError, lambda: net.learn(x0, target, 0.1, 5, lr=True), "lr")
    expect_error(fk.ArgumentTypeError, lambda: fk.SettleNet(weights, None, "tanh", [True, 1.0]),
                 "precisions[0]")


def test_diverging_settle_raises_and_leaves_weights_untouched():
    # eta = 50 on a 3-layer tanh network with targets 3..8: the states blow up. The library
    # reports FEP_ERR_DIVERGED (issue 21: it returned FEP_OK with an infinite energy, and
    # lr > 0 could write non-finite weights) and writes nothing.
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 4, generator=g), torch.randn(8, 8, generator=g),
          torch.randn(6, 8, generator=g)]
    x0 = torch.randn(5, 4, generator=g)
    y = torch.linspace(3, 8, 30).reshape(5, 6)
    net = fk.SettleNet([w.clone() for w in ws], activations="tanh")
    before = [w.clone() for w in net.weights]
    e = expect_error(fk.FepError, lambda: net.learn(x0, y, eta=50.0, steps=20, lr=0.1),
                     "diverged")
    assert e.status == fk.FEP_ERR_DIVERGED == 7 and e.name == "FEP_ERR_DIVERGED", e
    assert all(torch.equal(w, b) for w, b in zip(net.weights, before)), "weights written"


def test_cuda_tensors():
    if not torch.cuda.is_available():
        return "SKIPPED: torch.cuda.is_available() is False"
    kind = "hip" if getattr(torch.version, "hip", None) else "cuda"
    if fk.device_count(kind) < 1:
        return f"SKIPPED: the library sees no {kind} device (built without the {kind} feature?)"
    # Mixed devices are rejected in Python.
    weights, biases, precs, x0, _, _ = problem([5, 6, 3], 4, seed=9, device="cuda")
    expect_error(ValueError, lambda: fk.settle_infer(weights, biases, ["tanh", "tanh"], precs,
                                                     x0.cpu(), 0.1, 5), "x0", "cuda")
    # Loose tolerances: the GPU computes in f32 (tf32/bf16 tensor cores where it chooses).
    test_infer_given_start_every_activation(device="cuda")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)):
        test_learn_gradients_and_sgd(dtype=dtype, device="cuda", tol=tol)
    # On a side stream: the work is ordered on torch's current stream.
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        weights, biases, precs, x0, target, _ = problem([5, 6, 3], 4, seed=10, device="cuda")
        res = fk.settle_learn(weights, biases, ["tanh", "tanh"], precs, x0, target, 0.1, 10)
        gw = res["grad_w"][0].cpu()
    want = reference([w.cpu() for w in weights], [cpu_or_none(b) for b in biases],
                     ["tanh", "tanh"], precs, x0.cpu(), 0.1, 10, target=target.cpu())
    assert_close("grad_w[0] (side stream)", gw, want["grad_w"][0], 1e-4)
    return None


def main():
    return run_tests(globals(), "test_settle.py")


if __name__ == "__main__":
    sys.exit(main())
