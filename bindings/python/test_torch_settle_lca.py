"""Tests of fep_kernels.torch_settle and fep_kernels.torch_lca (the fep::settle_energy,
fep::settle_learn, fep::settle_infer and fep::lca_solve torch.library ops, settle_energy's
autograd and torch.compile), on CPU tensors and, when PyTorch and the library both see a GPU, on
CUDA tensors. Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_torch_settle_lca.py``
(or pytest).

settle_energy's gradients are checked (a) bitwise against SettleNet.learn(lr=0), the library
call it wraps, and (b) against an independent float64 PyTorch settle + autograd of the mean
settled energy (envelope theorem: the free layers held at their settled values).

Needs PyTorch; without it, it prints that it was skipped and exits 0."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_torch_settle_lca.py", f"{e.name} is not installed")

import fep_kernels as fk  # noqa: E402
from _runner import expect, run_tests  # noqa: E402

F64 = torch.float64
ACTS = ["tanh", ("leaky_relu", 0.1), "sigmoid"]


def devices():
    """"cpu", and "cuda" when PyTorch and the library both see a CUDA device."""
    out = ["cpu"]
    if torch.cuda.is_available() and fk.device_count("cuda") > 0:
        out.append("cuda")
    return out


def net(device="cpu", dtype=torch.float32, widths=(6, 5, 4, 3), B=8, seed=0, grad=True):
    """(weights, biases (layer 1 without), precisions (a diagonal on layer 1), x0, target)."""
    g = torch.Generator().manual_seed(seed)
    ws = [0.5 * torch.randn(m, n, generator=g) for n, m in zip(widths[:-1], widths[1:])]
    bs = [0.1 * torch.randn(m, generator=g) for m in widths[1:]]
    bs[1] = None
    precs = [1.0, 0.5 + torch.rand(widths[2], generator=g), 2.0][:len(ws)]
    x0 = torch.randn(B, widths[0], generator=g)
    y = torch.randn(B, widths[-1], generator=g)
    mv = lambda t: t.to(device=device, dtype=dtype).requires_grad_(grad)  # noqa: E731
    ws = [mv(w) for w in ws]
    bs = [None if b is None else mv(b) for b in bs]
    precs = [p.to(device) if isinstance(p, torch.Tensor) else p for p in precs]
    return ws, bs, precs, x0.to(device), y.to(device)


def raw_args(ws, bs, precs, x0, y=None, acts=ACTS, eta=0.1, steps=30, log_det=False):
    """The ops' argument tuple (with target y for settle_energy/settle_learn)."""
    ts = fk.torch_settle
    net_args, init, settle = ts._op_args(ws, bs, acts, precs, eta, steps, 0.5, 1e-6, None,
                                         log_det, False)
    target = ts._NO_TARGET if y is None else y
    return ts._call_args(net_args, x0, target, init, settle, True, log_det, False)


def test_import_without_torch():
    code = ("import sys, fep_kernels as fk; assert 'torch' not in sys.modules; "
            "assert callable(fk.settle_energy) and callable(fk.lca_solve); print(fk.version())")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == fk.version()


def test_opcheck_settle_ops():
    for dev in devices():
        ws, bs, precs, x0, y = net(dev)
        torch.library.opcheck(torch.ops.fep.settle_energy, raw_args(ws, bs, precs, x0, y))
        ws, bs, precs, x0, y = net(dev, grad=False)
        torch.library.opcheck(torch.ops.fep.settle_learn, raw_args(ws, bs, precs, x0, y))
        torch.library.opcheck(torch.ops.fep.settle_infer, raw_args(ws, bs, precs, x0))
        # no biases, scalar precisions, one layer
        torch.library.opcheck(torch.ops.fep.settle_infer,
                              raw_args(ws[:1], None, None, x0, acts="gelu"))


def test_settle_energy_grads_bitwise():
    for dev in devices():
        dtypes = [torch.float32, torch.float16, torch.bfloat16] if dev == "cpu" else [torch.float32]
        for dt in dtypes:
            ws, bs, precs, x0, y = net(dev, dt, seed=1)
            x0.requires_grad_()
            precs[1].requires_grad_()
            kw = dict(biases=bs, activations=ACTS, precisions=precs, eta=0.1, steps=40,
                      momentum=0.5)
            e = fk.settle_energy(ws, x0, y, **kw)
            (2.5 * e).backward()
            ref = fk.SettleNet([w.detach() for w in ws],
                               [None if b is None else b.detach() for b in bs], ACTS,
                               [1.0, precs[1].detach(), 2.0]).learn(x0.detach(), y, 0.1, 40,
                                                                    momentum=0.5)
            assert e.shape == () and e.dtype == torch.float32
            assert torch.equal(e.detach(), ref["energy"].mean()), (dev, dt)
            for l, w in enumerate(ws):
                assert w.grad.dtype == dt
                assert torch.equal(w.grad, (2.5 * ref["grad_w"][l]).to(dt)), (dev, dt, l)
            for l, b in enumerate(bs):
                if b is not None:
                    assert torch.equal(b.grad, (2.5 * ref["grad_b"][l]).to(dt)), (dev, dt, l)
            # the precision tensor gets the gradient of the value returned
            assert x0.grad is None
            # (of the value returned, E: dF/dpi + 1/(2 pi))
            want = 2.5 * (ref["grad_pi"][1] + 0.5 / precs[1].detach())
            assert torch.equal(precs[1].grad, want), (dev, dt)
            assert ref["grad_w"][0].abs().max() > 0


SMOOTH = ["tanh", "sigmoid", "tanh"]  # leaky_relu's kink makes plain gradient descent chatter


def test_settle_energy_argument_structures():
    # no biases / every layer a bias, scalar / all-diagonal / mixed precisions, one layer: the
    # backward's structure follows the inputs' (an empty or all-tensor list is a list of grads)
    for dev in devices():
        ws, bs, precs, x0, y = net(dev, seed=8)
        diag = [0.5 + torch.rand(w.shape[0], device=dev) for w in ws]
        full = [torch.zeros(w.shape[0], device=dev, requires_grad=True) for w in ws]
        for L, biases, pr in ((3, None, None), (3, full, diag), (1, None, diag[:1]),
                              (1, full[:1], 3.0), (3, [None, full[1], None], [diag[0], 1.0, 2.0])):
            wl = ws[:L]
            yl = y if L == 3 else torch.randn(x0.shape[0], wl[-1].shape[0], device=dev)
            args = raw_args(wl, biases, pr, x0, yl, acts="tanh")
            torch.library.opcheck(torch.ops.fep.settle_energy, args)
            for t in (*wl, *(biases or [])):
                if t is not None:
                    t.grad = None
            fk.settle_energy(wl, x0, yl, biases=biases, activations="tanh", precisions=pr,
                             eta=0.1, steps=30, momentum=0.5, tol=1e-6).backward()
            ref = fk.settle_learn(wl, biases, "tanh", pr, x0, yl, 0.1, 30, momentum=0.5,
                                  tol=1e-6)
            for l, w in enumerate(wl):
                assert torch.equal(w.grad, ref["grad_w"][l]), (dev, L, l)
                b = None if biases is None else biases[l]
                assert b is None or torch.equal(b.grad, ref["grad_b"][l]), (dev, L, l)


def _act64(a):
    name, alpha = (a, None) if isinstance(a, str) else a
    return {"tanh": torch.tanh, "sigmoid": torch.sigmoid,
            "leaky_relu": lambda x: torch.where(x > 0, x, alpha * x)}[name]


def _energy64(ws, bs, pis, xs):
    """Per-sample E = 1/2 sum_l (x_l - W_l f_l(x_{l-1}) - b_l)^T Pi_l (...), float64."""
    e = 0.0
    for l, (w, b, pi) in enumerate(zip(ws, bs, pis)):
        eps = xs[l + 1] - _act64(SMOOTH[l])(xs[l]) @ w.T - b
        e = e + 0.5 * (pi * eps * eps).sum(1)
    return e


def test_settle_energy_matches_float64_reference():
    for dev in devices():
        ws, bs, precs, x0, y = net(dev, seed=2)
        eta, steps = 0.1, 600
        e = fk.settle_energy(ws, x0, y, biases=bs, activations=SMOOTH, precisions=precs,
                             eta=eta, steps=steps)
        e.backward()
        # the reference: plain gradient descent (autograd for dE/dx) from the feedforward start
        W = [w.detach().cpu().to(F64).requires_grad_() for w in ws]
        b = [torch.zeros(w.shape[0], dtype=F64) if bb is None else bb.detach().cpu().to(F64)
             .requires_grad_() for w, bb in zip(ws, bs)]
        pis = [p.cpu().to(F64) if isinstance(p, torch.Tensor) else torch.tensor(p, dtype=F64)
               for p in precs]
        xs = [x0.cpu().to(F64)]
        with torch.no_grad():
            for l in range(len(W) - 1):
                xs.append(_act64(SMOOTH[l])(xs[-1]) @ W[l].T + b[l])
        xs.append(y.cpu().to(F64))
        free = [x.requires_grad_() for x in xs[1:-1]]
        for _ in range(steps):
            gs = torch.autograd.grad(_energy64(W, b, pis, xs).sum(), free)
            with torch.no_grad():
                for x, gx in zip(free, gs):
                    x -= eta * gx
        assert max(gx.abs().max().item() for gx in gs) < 1e-7, "the reference did not settle"
        xs = [x.detach() for x in xs]
        e64 = _energy64(W, b, pis, xs).mean()
        e64.backward()
        assert abs(e.item() - e64.item()) <= 1e-4 * e64.item(), (e.item(), e64.item())
        for l in range(len(W)):
            bias_grad = None if bs[l] is None else bs[l].grad
            for got, want in ((ws[l].grad, W[l].grad), (bias_grad, b[l].grad)):
                if got is None:
                    continue
                err = (got.cpu().to(F64) - want).abs().max() / want.abs().max()
                assert err < 1e-3, f"{dev} layer {l}: rel err {err:.2e}"


def test_sgd_on_settle_energy():
    for dev in devices():
        ws, bs, precs, x0, y = net(dev, seed=3, B=32)
        ws = [torch.nn.Parameter(w.detach()) for w in ws]
        bs = [None if b is None else torch.nn.Parameter(b.detach()) for b in bs]
        w0 = [w.detach().clone() for w in ws]
        opt = torch.optim.SGD([*ws, *(b for b in bs if b is not None)], lr=0.3)
        energies = []
        for _ in range(60):
            opt.zero_grad()
            e = fk.settle_energy(ws, x0, y, biases=bs, activations=ACTS, precisions=precs,
                                 eta=0.1, steps=30)
            e.backward()
            opt.step()
            energies.append(e.item())
        assert energies[-1] < 0.5 * energies[0], energies
        assert all(not torch.equal(w, w_) for w, w_ in zip(ws, w0))
        # the energy the op reports is the library's, for the final weights too
        ref = fk.SettleNet([w.detach() for w in ws], [None if b is None else b.detach()
                                                      for b in bs], ACTS, precs)
        with torch.no_grad():
            e = fk.settle_energy(ws, x0, y, biases=bs, activations=ACTS, precisions=precs,
                                 eta=0.1, steps=30)
        assert torch.equal(e, ref.learn(x0, y, 0.1, 30)["energy"].mean())


def test_settle_infer_and_learn_ops():
    for dev in devices():
        ws, bs, precs, x0, y = net(dev, seed=4, grad=False)
        kw = dict(biases=bs, activations=ACTS, precisions=precs, eta=0.1, steps=25)
        x, eps, energy = fk.torch_settle.settle_infer_op(ws, x0, **kw)
        # free top: settling from the feedforward start stays there (every error 0)
        h = x0
        for l, (w, b) in enumerate(zip(ws, bs)):
            h = _act64(ACTS[l])(h.double()) @ w.double().T + (0 if b is None else b.double())
            assert (x[l].double() - h).abs().max() < 1e-4
            assert eps[l].abs().max() < 1e-4
            h = x[l]
        assert energy.shape == (8,) and energy.abs().max() < 1e-6
        net_ = fk.SettleNet(ws, bs, ACTS, precs)
        en, gw, gb, gp = fk.torch_settle.settle_learn_op(ws, x0, y, **kw)
        ref = net_.learn(x0, y, 0.1, 25)
        assert torch.equal(en, ref["energy"]) and en.min() > 0
        assert all(torch.equal(a, r) for a, r in zip(gw, ref["grad_w"]))
        assert all(torch.equal(a, r) for a, r in zip(gb, ref["grad_b"]))
        # grad_pi: one per precision tensor (layer 1's diagonal here)
        assert len(gp) == 1 and torch.equal(gp[0], ref["grad_pi"][1])


def test_not_differentiable():
    ws, bs, precs, x0, y = net(seed=5)
    kw = dict(biases=bs, activations=ACTS, precisions=precs, eta=0.1, steps=5)
    x, _, _ = fk.torch_settle.settle_infer_op(ws, x0, **kw)
    expect(RuntimeError, lambda: x[-1].sum().backward(), "fep::settle_infer is not differentiable")
    en, _, _, _ = fk.torch_settle.settle_learn_op(ws, x0, y, **kw)
    expect(RuntimeError, lambda: en.sum().backward(), "use fep_kernels.settle_energy")
    phi, xl = dictionary(seed=5)
    _, a, _ = fk.lca_solve(phi.requires_grad_(), xl, lam=0.1, eta=0.1, steps=5)
    expect(RuntimeError, lambda: a.sum().backward(), "fep::lca_solve is not differentiable")


def test_torch_compile_fullgraph():
    for dev in devices():
        torch._dynamo.reset()
        ws, bs, precs, x0, y = net(dev, seed=6)

        def step(w0, w1, w2, b0, b2, x0, y):
            return 3.0 * fk.settle_energy([w0, w1, w2], x0, y, biases=[b0, None, b2],
                                          activations=ACTS, precisions=precs, eta=0.1, steps=20)

        def infer(ws, x0, y, phi, x):
            x_, eps, en = fk.torch_settle.settle_infer_op(ws, x0, activations=ACTS, eta=0.1,
                                                          steps=10)
            e2, gw, gb, _ = fk.torch_settle.settle_learn_op(ws, x0, y, activations=ACTS, eta=0.1,
                                                            steps=10)
            u, a, s = fk.lca_solve(phi, x, lam=0.1, eta=0.2, steps=20, tol=1e-4)
            return x_[-1] * 2, en + e2, gw[0] + 1, a.abs().sum(1), s

        params = [ws[0], ws[1], ws[2], bs[0], bs[2]]
        cstep = torch.compile(step, fullgraph=True, backend="aot_eager")
        loss = cstep(*params, x0, y)
        loss.backward()
        got = [p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        ref = step(*params, x0, y)
        ref.backward()
        assert torch.equal(loss, ref), dev
        assert all(torch.equal(a, p.grad) for a, p in zip(got, params)), dev

        det = [w.detach() for w in ws]
        phi, xl = dictionary(seed=6, device=dev)
        cinfer = torch.compile(infer, fullgraph=True, backend="aot_eager")
        for a, r in zip(cinfer(det, x0, y, phi, xl), infer(det, x0, y, phi, xl)):
            assert torch.equal(a, r), dev


def test_meta_tensors():
    # meta tensors (shapes only) go through the fake implementations
    ws, bs, precs, x0, y = net("meta")
    e = fk.settle_energy(ws, x0, y, biases=bs, activations=ACTS, precisions=precs, eta=0.1,
                         steps=5)
    assert e.device.type == "meta" and e.shape == () and e.requires_grad
    x, eps, en = fk.torch_settle.settle_infer_op(ws, x0, biases=bs, eta=0.1, steps=5)
    assert [t.shape for t in x] == [(8, 5), (8, 4), (8, 3)] and en.shape == (8,)
    phi, xl = dictionary(device="meta")
    u, a, s = fk.lca_solve(phi, xl, lam=0.1, eta=0.1, steps=5)
    assert u.shape == a.shape == (5, 20) and s.shape == (5,) and s.dtype == torch.int32


def test_settle_energy_diverging_raises():
    # Issue 21: a diverging settle_energy returned inf with no warning; the library now reports
    # FEP_ERR_DIVERGED, surfaced as FepError (eta = 50, a 3-layer net, targets 3..8).
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 4, generator=g, requires_grad=True),
          torch.randn(8, 8, generator=g, requires_grad=True),
          torch.randn(6, 8, generator=g, requires_grad=True)]
    x0 = torch.randn(5, 4, generator=g)
    y = torch.linspace(3, 8, 30).reshape(5, 6)
    try:
        fk.settle_energy(ws, x0, y, activations="tanh", eta=50.0, steps=20)
    except fk.FepError as e:
        assert e.status == fk.FEP_ERR_DIVERGED == 7 and "diverged" in str(e), e
    else:
        raise AssertionError("a diverging settle_energy returned without FEP_ERR_DIVERGED")
    assert all(w.grad is None for w in ws)
    # A settling that does not diverge still works (the same net, a small step).
    e = fk.settle_energy(ws, x0, y, activations="tanh", eta=0.05, steps=20)
    assert torch.isfinite(e)


def test_settle_op_messages_name_python_arguments():
    ws, bs, precs, x0, y = net(grad=False)
    bad = [w.clone() for w in ws]
    bad[2][1, 3] = float("nan")
    expect(fk.FepError, lambda: fk.settle_energy(bad, x0, y, bs, ACTS, precs, eta=0.1, steps=5),
           "weights[2][1, 3] is NaN")
    diag = precs[1].clone()
    diag[2] = -1.0
    p2 = [precs[0], diag, precs[2]]
    expect(fk.FepError, lambda: fk.settle_energy(ws, x0, y, bs, ACTS, p2, eta=0.1, steps=5),
           "precisions[1][2] is -1")
    expect(ValueError, lambda: fk.settle_energy(ws, x0[:0], y[:0], bs, ACTS, precs, eta=0.1,
                                                steps=5), "x0: is empty (shape [0, 6])")
    for kw in (dict(steps=True), dict(eta=True), dict(momentum=True)):
        args = {**dict(eta=0.1, steps=5), **kw}
        expect(TypeError, lambda: fk.settle_energy(ws, x0, y, bs, ACTS, precs, **args),
               next(iter(kw)))


# ---- LCA ----

def dictionary(n=12, m=20, B=5, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, m, generator=g)
    phi /= phi.norm(dim=0, keepdim=True)
    return phi.to(device), torch.randn(B, n, generator=g).to(device)


def test_opcheck_lca_solve():
    for dev in devices():
        phi, x = dictionary(device=dev)
        u0 = 0.1 * torch.ones(x.shape[0], phi.shape[1], device=dev)
        for th, u in (("soft", None), ("hard_nonneg", u0)):
            torch.library.opcheck(torch.ops.fep.lca_solve,
                                  (phi, x, u, 0.1, 0.2, 30, th, 1e-4, True))


def test_lca_solve_matches_dictionary():
    for dev in devices():
        for dt in (torch.float32, torch.float16):
            phi, x = dictionary(seed=7, device=dev)
            x = x.to(dt)
            for th in ("soft", "soft_nonneg", "hard", "hard_nonneg"):
                u, a, s = fk.lca_solve(phi, x, lam=0.2, eta=0.1, steps=200, threshold=th,
                                       tol=1e-2)
                with fk.LcaDictionary(phi) as d:
                    ref = d.solve(x, lam=0.2, eta=0.1, steps=200, threshold=th, tol=1e-2,
                                  trace=True)
                assert torch.equal(u, ref["u"]) and torch.equal(a, ref["a"]), (dev, dt, th)
                assert torch.equal(s, ref["steps"]) and s.dtype == torch.int32
                if th == "soft":  # independent: a is the soft threshold of u
                    want = torch.sign(u) * torch.clamp(u.abs() - 0.2, min=0)
                    assert torch.allclose(a, want, atol=1e-6) and (a != 0).any()
                    assert s.min() < 200  # tol stopped some samples early


def test_lca_rejects_overlapping_outputs():
    # Issue 21: solve(out={"u": t, "a": t}) was accepted and u was lost.
    phi, x = dictionary()
    B, m = x.shape[0], phi.shape[1]
    with fk.LcaDictionary(phi) as d:
        kw = dict(lam=0.1, eta=0.2, steps=10)
        t = torch.full((B, m), float("nan"))
        expect(ValueError, lambda: d.solve(x, **kw, out={"u": t, "a": t}),
               "out['a']: overlaps out['u']")
        assert torch.isnan(t).all(), "outputs untouched on error"
        buf = torch.full((3 * B * m,), float("nan"))
        parts = lambda i, j: buf[i:j].view(B, m)  # noqa: E731
        n = B * m
        expect(ValueError, lambda: d.solve(x, **kw, out={"u": parts(0, n),
                                                         "a": parts(n - 1, 2 * n - 1)}),
               "out['a']: overlaps out['u']")
        expect(ValueError, lambda: d.solve(x, **kw, trace=True, out={
            "energy": buf[n:n + B * 10].view(B, 10), "a": parts(n + 5, 2 * n + 5)}),
            "out['energy']: overlaps out['a']")
        # An output over an input: x, or u0 (other than as u itself).
        xbuf = torch.zeros(B * max(m, x.shape[1]) * 2)
        xs = xbuf[:x.numel()].view_as(x).copy_(x)
        expect(ValueError, lambda: d.solve(xs, **kw, out={"u": xbuf[4:4 + n].view(B, m)}),
               "out['u']: overlaps x")
        u0 = torch.zeros(B, m)
        expect(ValueError, lambda: d.solve(x, **kw, u0=u0, out={"a": u0}), "out['a']: overlaps u0")
        expect(ValueError, lambda: d.solve(x, **kw, u0=parts(0, n), out={"u": parts(1, n + 1)}),
               "out['u']: overlaps u0")
        assert torch.isnan(buf).all(), "outputs untouched on error"
        # u0 may be u itself: u starts from it and is updated in place.
        want = d.solve(x, **kw, u0=0.1 * torch.ones(B, m))
        u = 0.1 * torch.ones(B, m)
        got = d.solve(x, **kw, u0=u, out={"u": u})
        assert got["u"] is u and torch.equal(u, want["u"]) and torch.equal(got["a"], want["a"])


def test_lca_messages_and_integer_parameters():
    phi, x = dictionary()
    with fk.LcaDictionary(phi) as d:
        kw = dict(lam=0.1, eta=0.2, steps=10)
        # Issue 21: steps=True ran one step.
        for bad in (True, False, 2.0, "3", torch.tensor(True)):
            expect(fk.ArgumentTypeError, lambda: d.solve(x, 0.1, 0.2, bad), "steps")
        expect(TypeError, lambda: d.solve(x, 0.1, 0.2, True), "steps: expected an int")
        expect(ValueError, lambda: d.solve(x, True, 0.2, 10), "lam")
        expect(ValueError, lambda: d.solve(x, 0.1, 0.2, 10, tol=False), "tol")
        expect(ValueError, lambda: d.learn(x, d.solve(x, **kw)["a"], lr=True), "lr")
        expect(TypeError, lambda: fk.lca_solve(phi, x, 0.1, 0.2, True), "steps")
        expect(TypeError, lambda: fk.lca_solve(phi, x, True, 0.2, 10), "lam")
        # Empty tensors are said to be empty (the library said "`x` is NULL").
        expect(ValueError, lambda: d.solve(x[:0], **kw), "x: is empty (shape [0, 12])")
        expect(ValueError, lambda: fk.LcaDictionary(phi[:, :0]), "phi: is empty (shape [12, 0])")
        # The library's flat "element 10" is the user's x[0, 10].
        bad = x.clone()
        bad[1, 4] = float("nan")
        expect(fk.FepError, lambda: d.solve(bad, **kw), "`x`: x[1, 4] is NaN")
        expect(fk.FepError, lambda: fk.lca_solve(phi, bad, **kw), "`x`: x[1, 4] is NaN")
        u0 = torch.zeros(x.shape[0], phi.shape[1])
        u0[2, 7] = float("inf")
        expect(fk.FepError, lambda: d.solve(x, **kw, u0=u0), "u0[2, 7] is inf")
        expect(fk.FepError, lambda: d.learn(x, u0, 0.1), "a[2, 7] is inf")


def test_bad_inputs_settle():
    ws, bs, precs, x0, y = net(grad=False)
    kw = dict(biases=bs, activations=ACTS, precisions=precs, eta=0.1, steps=5)

    def se(ws=ws, x0=x0, y=y, **over):
        return fk.settle_energy(ws, x0, y, **{**kw, **over})

    expect(TypeError, lambda: se(ws=[ws[0].tolist(), *ws[1:]]),
           "weights[0]: expected a torch.Tensor")
    expect(TypeError, lambda: se(ws="w"), "weights: expected a list")
    expect(TypeError, lambda: se(x0=x0.tolist()), "x0: expected a torch.Tensor")
    expect(TypeError, lambda: se(y=None), "target: expected a torch.Tensor")
    expect(TypeError, lambda: se(biases=[1.0, None, None]), "biases[0]")
    expect(TypeError, lambda: se(eta="0.1"), "eta: expected a Python number")
    expect(TypeError, lambda: se(steps=2.5), "steps: expected an int")
    expect(TypeError, lambda: se(precisions=[1.0, "2", 1.0]), "precisions[1]")
    expect(ValueError, lambda: se(steps=0), "steps: expected an int in [1, 2^32)")
    expect(ValueError, lambda: se(ws=[w.double() for w in ws], biases=None), "float64")
    expect(ValueError, lambda: se(ws=[ws[0], ws[1].half(), ws[2]]), "all layers share one dtype")
    expect(ValueError, lambda: se(x0=x0.half()), "x0: dtype torch.float16")
    expect(ValueError, lambda: se(ws=[ws[0], ws[1][:, :3], ws[2]]), "does not follow")
    expect(ValueError, lambda: se(ws=[ws[0][0], *ws[1:]]), "2-d")
    expect(ValueError, lambda: se(y=y[:, :2]), "target: expected shape [8, 3]")
    expect(ValueError, lambda: se(x0=x0[:, :4]), "x0: expected shape [B, 6]")
    expect(ValueError, lambda: se(biases=[bs[0][:2], None, bs[2]]), "biases[0]: expected shape")
    expect(ValueError, lambda: se(biases=[None, None]), "biases: expected 3 entries")
    expect(ValueError, lambda: se(precisions=[1.0, precs[1].double(), 1.0]),
           "precisions[1]: dtype")
    expect(ValueError, lambda: se(precisions=[1.0, torch.ones(1, 1, 4), 1.0]),
           "precisions[1]: expected a 0-d (scalar), [n_l] (diagonal) or [B, n_l]")
    expect(ValueError, lambda: se(precisions=[1.0, torch.ones(7, 4), 1.0]),
           "precisions[1] (one diagonal per sample): expected shape [8, 4]")
    expect(TypeError, lambda: se(log_det=1), "log_det: expected a bool")
    expect(ValueError, lambda: se(activations="swish"), "swish")
    expect(ValueError, lambda: se(x0=x0.to("meta")), "x0: on meta")
    if "cuda" in devices():
        expect(ValueError, lambda: se(x0=x0.cuda()), "x0: on cuda")
    # values are the library's: a non-positive step size is FEP_ERR_INVALID_ARGUMENT
    expect(fk.FepError, lambda: se(eta=-1.0), "")
    # the ops check too (the raw op, bypassing the wrapper)
    bad = list(raw_args(ws, bs, precs, x0, y))
    bad[5] = x0.double()
    expect(ValueError, lambda: torch.ops.fep.settle_learn(*bad), "x0: dtype torch.float64")
    expect(TypeError, lambda: fk.torch_settle.settle_infer_op([ws[0], 3], x0, eta=0.1, steps=1),
           "weights[1]: expected a torch.Tensor")


def test_bad_inputs_lca():
    phi, x = dictionary()
    kw = dict(lam=0.1, eta=0.1, steps=10)
    s = fk.lca_solve
    expect(TypeError, lambda: s(phi.tolist(), x, **kw), "phi: expected a torch.Tensor")
    expect(TypeError, lambda: s(phi, x.numpy(), **kw), "x: expected a torch.Tensor")
    expect(TypeError, lambda: s(phi, x, **kw, u0=[0.0]), "u0: expected a torch.Tensor or None")
    expect(TypeError, lambda: s(phi, x, lam="0.1", eta=0.1, steps=10), "lam")
    expect(TypeError, lambda: s(phi, x, lam=0.1, eta=0.1, steps=None), "steps")
    expect(TypeError, lambda: s(phi, x, **kw, threshold=1), "threshold: expected a str")
    expect(ValueError, lambda: s(phi, x, **kw, threshold="medium"), "threshold")
    expect(ValueError, lambda: s(phi, x, lam=0.1, eta=0.1, steps=0), "steps")
    expect(ValueError, lambda: s(phi.double(), x, **kw), "phi: dtype torch.float64")
    expect(ValueError, lambda: s(phi, x.double(), **kw), "x: dtype torch.float64")
    expect(ValueError, lambda: s(phi, x[:, :5], **kw), "x: expected shape [B, 12]")
    expect(ValueError, lambda: s(phi[0], x, **kw), "phi: expected a 2-d")
    expect(ValueError, lambda: s(phi, x, **kw, u0=torch.zeros(5, 3)),
           "u0: expected shape [5, 20]")
    expect(ValueError, lambda: s(phi, x, **kw, u0=torch.zeros(5, 20).half()), "u0: dtype")
    expect(ValueError, lambda: s(phi, x.to("meta"), **kw), "x: on meta")
    if "cuda" in devices():
        expect(ValueError, lambda: s(phi.cuda(), x, **kw), "x: on cpu")
    expect(ValueError, lambda: torch.ops.fep.lca_solve(phi, x.double(), None, 0.1, 0.1, 5, "soft",
                                                       0.0, True), "x: dtype")
    # values are the library's: columns that are not unit-norm
    expect(fk.FepError, lambda: s(2 * phi, x, **kw), "")
    u, a, _ = s(2 * phi, x, **kw, check_unit_norm=False)
    assert a.shape == (5, 20)


def tlca(*args, **kwargs):
    """fep_kernels.torch_lca.lca_solve (eta=None automatic, tol_mode, allow_tf32)."""
    return fk.torch_lca.lca_solve(*args, **kwargs)


def test_lca_lambda_max_and_automatic_eta():
    for dev in devices():
        phi, x = dictionary(n=10, m=24, seed=11, device=dev)
        want = torch.linalg.eigvalsh(phi.cpu().double().T @ phi.cpu().double()).max().item()
        with fk.LcaDictionary(phi) as d:
            lmax = d.lambda_max
            assert abs(lmax - want) <= 1e-6 * want, (dev, lmax, want)
            assert d.auto_eta == min(1.0, 1.0 / lmax)
            # eta=None (the default) is the automatic step: the same as giving it explicitly
            auto = d.solve(x, lam=0.1, steps=60, trace=True)
            explicit = d.solve(x, lam=0.1, eta=d.auto_eta, steps=60, trace=True)
            assert all(torch.equal(auto[k], explicit[k]) for k in auto), dev
            # the op: eta=None by default, the same numbers
            u, a, steps = tlca(phi, x, lam=0.1, steps=60)
            assert torch.equal(u, auto["u"]) and torch.equal(a, auto["a"]), dev
            expect(fk.FepError, lambda: d.solve(x, lam=0.1, eta=1.5, steps=5), "eta")


def test_lca_relative_tol_is_scale_invariant():
    for dev in devices():
        phi, x = dictionary(n=12, m=30, B=4, seed=12, device=dev)
        scale = 1024.0  # a power of two: every float32 operation scales exactly
        kw = dict(steps=3000, tol=1e-4)
        u1, a1, s1 = tlca(phi, x, lam=0.1, tol_mode="relative", **kw)
        u2, a2, s2 = tlca(phi, scale * x, lam=0.1 * scale, tol_mode="relative", **kw)
        assert torch.equal(s1, s2) and (s1 < 3000).all(), (dev, s1, s2)
        assert torch.allclose(a2, scale * a1, rtol=1e-5, atol=1e-5 * scale), dev
        # absolute: the same tol stops the scaled input later
        _, _, t1 = tlca(phi, x, lam=0.1, **kw)
        _, _, t2 = tlca(phi, scale * x, lam=0.1 * scale, **kw)
        assert (t2 > t1).all(), (dev, t1, t2)
        # 1000 x (not exact in binary): the same steps up to one, codes within float32 noise
        # where the steps agree. A sample that stops one step later in one run moved once more,
        # by less than its stop limit (tol * max |Phi^T x|; theta is 1-Lipschitz), so there
        # the codes agree within that limit on top of the same noise bound.
        _, a3, s3 = tlca(phi, 1000.0 * x, lam=100.0, tol_mode="relative", **kw)
        assert ((s3 - s1).abs() <= 1).all(), (dev, s1, s3)
        same = s3 == s1
        assert torch.allclose(a3[same], 1000.0 * a1[same], rtol=1e-3, atol=1e-2), dev
        limit = 1e-4 * (1000.0 * x @ phi).abs().amax(dim=1, keepdim=True)
        err = (a3 - 1000.0 * a1).abs() - (1e-2 + 1e-3 * (1000.0 * a1).abs()) - limit
        assert (err[~same] <= 0).all(), (dev, err.max())
        if dev == "cpu":
            # the f64 reference stops at the same step here and meets the noise bound throughout
            with fk.cpu_reference():
                _, r1, t1 = tlca(phi, x, lam=0.1, tol_mode="relative", **kw)
                _, r3, t3 = tlca(phi, 1000.0 * x, lam=100.0, tol_mode="relative", **kw)
            assert ((t3 - t1).abs() <= 1).all() and torch.allclose(r3, 1000.0 * r1, rtol=1e-3,
                                                                   atol=1e-2), "reference"
        expect(ValueError, lambda: tlca(phi, x, lam=0.1, tol_mode="rel"), "tol_mode")
        expect(TypeError, lambda: tlca(phi, x, lam=0.1, tol_mode=1), "tol_mode")


def test_lca_allow_tf32_is_a_no_op():
    for dev in devices():
        phi, x = dictionary(seed=13, device=dev)
        ref = tlca(phi, x, lam=0.1, steps=40)
        got = tlca(phi, x, lam=0.1, steps=40, allow_tf32=True)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)), dev


def test_lca_new_options_under_torch_compile():
    for dev in devices():
        torch._dynamo.reset()
        phi, x = dictionary(seed=14, device=dev)

        def f(phi, x):
            u, a, s = tlca(phi, x, lam=0.1, steps=50, tol=1e-4, tol_mode="relative",
                                   allow_tf32=True)
            return a, s

        cf = torch.compile(f, fullgraph=True, backend="aot_eager")
        for got, want in zip(cf(phi, x), f(phi, x)):
            assert torch.equal(got, want), dev
        torch.library.opcheck(torch.ops.fep.lca_solve,
                              (phi, x, None, 0.1, 0.0, 30, "soft", 1e-4, True, "relative",
                               False))


if __name__ == "__main__":
    sys.exit(run_tests(globals(), "test_torch_settle_lca.py", f" (devices: {devices()})"))
