"""Tests of learnable precision in the PyTorch front end: ``fk.settle_energy`` with the free
energy's normaliser (``log_det=True``) and precision tensors of every kind (a 0-d scalar, an
[n_l] diagonal, a [B, n_l] per-sample diagonal) against an independent float64 PyTorch settle
with autograd; divergence raised as ``fk.DivergedError``; ``SettleNet.learn(lr_precision=...)``
(log-space SGD); ``max_stable_eta``; and a torch.optim loop that learns known noise levels.
Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_settle_precision.py`` (or pytest).

Needs PyTorch; without it, it prints that it was skipped and exits 0."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_settle_precision.py", f"{e.name} is not installed")

import fep_kernels as fk  # noqa: E402
from _runner import expect, run_tests  # noqa: E402

F64 = torch.float64


def devices():
    """"cpu", and "cuda" when PyTorch and the library both see a CUDA device."""
    out = ["cpu"]
    if torch.cuda.is_available() and fk.device_count("cuda") > 0:
        out.append("cuda")
    return out


def problem(seed=0, B=6, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ws = [0.5 * torch.randn(5, 3, generator=g), 0.5 * torch.randn(4, 5, generator=g)]
    x0, y = torch.randn(B, 3, generator=g), torch.randn(B, 4, generator=g)
    return [w.to(device) for w in ws], x0.to(device), y.to(device)


def free_energy64(ws, pis, xs):
    """Per-sample F = 1/2 sum_l (eps_l^T Pi_l eps_l - ln|Pi_l|), float64, tanh, no bias; each
    pi broadcasts against eps ([], [n] or [B, n])."""
    f = 0.0
    for l, (w, pi) in enumerate(zip(ws, pis)):
        eps = xs[l + 1] - torch.tanh(xs[l]) @ w.T
        logdet = torch.log(pi).expand_as(eps).sum(1)
        f = f + 0.5 * ((pi * eps * eps).sum(1) - logdet)
    return f


def reference(ws, pis, x0, y, eta, steps):
    """Settles the hidden layer in float64 by gradient descent from the feedforward start;
    returns the batch-mean F at the settled state and its gradients w.r.t. the precisions
    (the settled state held fixed: the envelope theorem)."""
    W = [w.detach().cpu().to(F64) for w in ws]
    P = [p.detach().cpu().to(F64).requires_grad_() for p in pis]
    x1 = (torch.tanh(x0.cpu().to(F64)) @ W[0].T).requires_grad_()
    xs = [x0.cpu().to(F64), x1, y.cpu().to(F64)]
    for _ in range(steps):
        (g,) = torch.autograd.grad(free_energy64(W, [p.detach() for p in P], xs).sum(), [x1])
        with torch.no_grad():
            x1 -= eta * g
    assert g.abs().max() < 1e-9, "the reference did not settle"
    xs = [xs[0], x1.detach(), xs[2]]
    f = free_energy64(W, P, xs).mean()
    f.backward()
    return f.item(), [p.grad for p in P]


def test_precision_gradients_match_float64_reference():
    for dev in devices():
        ws, x0, y = problem(1, device=dev)
        B = x0.shape[0]
        kinds = {
            "scalar": [torch.tensor(0.7), torch.tensor(1.6)],
            "diagonal": [0.5 + torch.rand(5, generator=torch.Generator().manual_seed(2)),
                         0.5 + torch.rand(4, generator=torch.Generator().manual_seed(3))],
            "per-sample": [0.5 + torch.rand(B, 5, generator=torch.Generator().manual_seed(4)),
                           torch.tensor(1.3)],
        }
        for kind, pis in kinds.items():
            pis = [p.to(dev).requires_grad_() for p in pis]
            e = fk.settle_energy(ws, x0, y, activations="tanh", precisions=pis, log_det=True,
                                 eta=0.2, steps=2000)
            e.backward()
            f64, grads = reference(ws, pis, x0, y, 0.2, 2000)
            assert abs(e.item() - f64) <= 1e-5 * max(1.0, abs(f64)), (dev, kind, e.item(), f64)
            for l, (p, want) in enumerate(zip(pis, grads)):
                assert p.grad is not None and p.grad.shape == p.shape, (dev, kind, l)
                err = (p.grad.cpu().to(F64) - want).abs().max() / want.abs().max()
                assert err < 1e-4, f"{dev} {kind} layer {l}: rel err {err:.2e}"


def test_without_log_det_the_value_and_its_gradient_are_those_of_e():
    ws, x0, y = problem(2)
    B = x0.shape[0]
    kw = dict(activations="tanh", eta=0.2, steps=500)
    for shape in ((), (4,), (B, 4)):
        pi = torch.full(shape, 2.0, requires_grad=True)
        e = fk.settle_energy(ws, x0, y, precisions=[1.0, pi], **kw)
        e.backward()
        g_e = pi.grad.clone()
        pi.grad = None
        f = fk.settle_energy(ws, x0, y, precisions=[1.0, pi], log_det=True, **kw)
        f.backward()
        # F - E = -1/2 ln|Pi_2| = -1/2 * 4 ln 2 per sample
        assert abs((f - e).item() + 2.0 * torch.log(torch.tensor(2.0)).item()) < 1e-5
        # dE/dpi = dF/dpi + d(1/2 ln|Pi|)/dpi, batch-averaged
        extra = {(): 4 * 0.25, (4,): 0.25, (B, 4): 0.25 / B}[shape]
        assert torch.allclose(g_e, pi.grad + extra, rtol=1e-6, atol=1e-7), (shape, g_e, pi.grad)


def test_divergence_raises_diverged_error():
    # eta above the curvature's bound (a linear net: 1.5 x max_stable_eta) and far above it
    # (eta = 50, tanh): a DivergedError, and no gradient reaches the weights
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 4, generator=g, requires_grad=True),
          torch.randn(8, 8, generator=g, requires_grad=True),
          torch.randn(6, 8, generator=g, requires_grad=True)]
    x0, y = torch.randn(5, 4, generator=g), torch.linspace(3, 8, 30).reshape(5, 6)
    # one free layer: the bound is exact for a linear net
    two = [ws[0], ws[2]]
    linear = 1.5 * fk.SettleNet([w.detach() for w in two], None, "identity").max_stable_eta()
    expect(fk.DivergedError, lambda: fk.settle_energy(two, x0, y, activations="identity",
                                                     eta=linear, steps=500), "diverged")
    for act, eta in (("tanh", 50.0),):
        expect(fk.DivergedError, lambda: fk.settle_energy(ws, x0, y, activations=act, eta=eta,
                                                         steps=500), "diverged")
        expect(fk.DivergedError,
               lambda: fk.settle_infer_op([w.detach() for w in ws], x0, activations=act,
                                          eta=eta, steps=500, init=[torch.ones(5, 8)] * 2
                                          + [torch.ones(5, 6)]),
               "diverged")
    assert all(w.grad is None for w in ws)
    assert issubclass(fk.DivergedError, fk.FepError)


def test_learn_lr_precision_is_a_log_space_step():
    ws, x0, y = problem(3)
    pi = torch.full((4,), 1.5)
    before = pi.clone()
    out = fk.SettleNet(ws, None, "tanh", [1.0, pi]).learn(x0, y, 0.2, 100, log_det=True,
                                                          lr_precision=0.3)
    g = out["grad_pi"][1]
    assert g.shape == (4,) and out["grad_pi"][0].shape == (1,)
    want = before * torch.exp(-0.3 * before * g)
    assert torch.allclose(pi, want, rtol=1e-6), (pi, want)
    assert (pi > 0).all()
    # a per-sample precision's gradient is per sample
    ps = torch.ones(x0.shape[0], 5)
    out = fk.SettleNet(ws, None, "tanh", [ps, 1.0]).learn(x0, y, 0.2, 10)
    assert out["grad_pi"][0].shape == (x0.shape[0], 5)
    expect(ValueError, lambda: fk.SettleNet(ws, None, "tanh", [ps[:2], 1.0]).learn(x0, y, 0.2, 5),
           "precisions[0]: a per-sample precision of 2 rows, but x0 has a batch of 6")


def test_max_stable_eta():
    g = torch.Generator().manual_seed(4)
    ws = [0.7 * torch.randn(5, 3, generator=g), 0.7 * torch.randn(4, 5, generator=g)]
    x0, y = torch.randn(2, 3, generator=g), torch.randn(2, 4, generator=g)
    net = fk.SettleNet(ws, None, "identity", [0.5, 3.0])
    eta = net.max_stable_eta()
    assert eta == fk.max_stable_eta(ws, activations="identity", precisions=[0.5, 3.0])
    net.learn(x0, y, 0.95 * eta, 3000)
    expect(fk.DivergedError, lambda: net.learn(x0, y, 1.05 * eta, 3000), "lower eta")
    assert net.max_stable_eta(clamped=False) < eta
    expect(fk.FepError, lambda: net.max_stable_eta(momentum=1.0), "momentum")


def test_allow_tf32_is_accepted_and_exact_on_the_cpu():
    ws, x0, y = problem(5)
    a = fk.settle_energy(ws, x0, y, activations="tanh", eta=0.2, steps=50)
    b = fk.settle_energy(ws, x0, y, activations="tanh", eta=0.2, steps=50, allow_tf32=True)
    assert torch.equal(a, b)


def test_learning_precision_recovers_noise_levels_with_torch_optim():
    # A linear model with per-unit output noise sigma; learning log(pi) with Adam through
    # settle_energy's gradient recovers pi ~ 1/sigma^2; a fixed precision stays at 1.
    g = torch.Generator().manual_seed(6)
    w_true = torch.randn(3, 4, generator=g)
    sigma = torch.tensor([0.2, 0.5, 1.0])
    log_pi = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([log_pi], lr=0.05)
    for _ in range(300):
        x0 = torch.randn(256, 4, generator=g)
        y = x0 @ w_true.T + sigma * torch.randn(256, 3, generator=g)
        opt.zero_grad()
        fk.settle_energy([w_true], x0, y, activations="identity", precisions=[log_pi.exp()],
                         log_det=True, eta=0.1, steps=1).backward()
        opt.step()
    ratio = log_pi.exp().detach() * sigma ** 2
    assert ((ratio > 0.85) & (ratio < 1.15)).all(), ratio


if __name__ == "__main__":
    sys.exit(run_tests(globals(), "test_settle_precision.py", f" (devices: {devices()})"))
