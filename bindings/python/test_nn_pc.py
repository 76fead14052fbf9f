"""Tests of fep_kernels.nn.PCNetwork (the predictive-coding nn.Module) on CPU tensors: its
parameters, that torch.optim optimisers lower the settled energy through PCNetwork.energy, that
its energy and gradients are fep_kernels.settle_energy's, learned precisions (gradients against
the closed form of a one-layer network, recovery of known per-unit noise variances, positivity),
torch.compile, state_dict round trips and argument errors. Run as
``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_nn_pc.py`` (or pytest).

The precision tests need the settling ops' precision learning (``log_det`` and precision
gradients); on a build without it they report that they were skipped.

Needs PyTorch; without it, it prints that it was skipped and exits 0."""

import io
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_nn_pc.py", f"{e.name} is not installed")

import fep_kernels as fk  # noqa: E402
from _runner import expect, run_tests  # noqa: E402
from fep_kernels.nn import PCNetwork, PCState  # noqa: E402

def data(B=32, n0=6, nL=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n0, generator=g), torch.randn(B, nL, generator=g)


def small(precision=None, seed=0, **kw):
    torch.manual_seed(seed)
    kw.setdefault("eta", 0.1)
    kw.setdefault("steps", 30)
    return PCNetwork([6, 8, 5, 3], activations=["identity", "tanh", ("leaky_relu", 0.1)],
                     precision=precision, **kw)


def test_parameters_registered():
    net = PCNetwork([6, 8, 3], activations="tanh", bias=[True, False],
                    precision=["diagonal", "scalar"], init_precision=[2.0, 0.5])
    names = dict(net.named_parameters())
    assert sorted(names) == ["biases.0", "log_precisions.0", "log_precisions.1", "weights.0",
                             "weights.1"], sorted(names)
    assert names["weights.0"].shape == (8, 6) and names["weights.1"].shape == (3, 8)
    assert names["biases.0"].shape == (8,)
    assert names["log_precisions.0"].shape == (8,) and names["log_precisions.1"].shape == ()
    assert all(p.requires_grad for p in names.values())
    # torch.nn.Linear's initialisation: uniform on +-1/sqrt(fan_in)
    assert names["weights.0"].abs().max() <= 1 / math.sqrt(6)
    assert names["weights.1"].abs().max() <= 1 / math.sqrt(8)
    assert names["biases.0"].abs().max() <= 1 / math.sqrt(6)
    pis = net.precisions()
    assert torch.allclose(pis[0], torch.full((8,), 2.0)) and torch.allclose(pis[1],
                                                                            torch.tensor(0.5))
    assert net.log_det is True and net.allow_tf32 is False
    # fixed precisions: no parameter, log_det off by default
    fixed = PCNetwork([4, 5, 2], precision=[None, 3.0])
    assert "log_precisions" not in "".join(n for n, _ in fixed.named_parameters())
    assert [p.item() for p in fixed.precisions()] == [1.0, 3.0] and fixed.log_det is False
    assert "precision=[1.0, 3.0]" in repr(fixed)


def test_energy_is_settle_energy():
    # PCNetwork.energy is fep_kernels.settle_energy on its parameters: the same value and the
    # same gradients, bit for bit
    net = small(precision=[1.0, 2.0, 0.5], bias=[True, False, True])
    x0, y = data()
    e = net.energy(x0, y)
    e.backward()
    got = [p.grad.clone() for p in net.parameters()]
    ws = [w.detach().clone().requires_grad_() for w in net.weights]
    bs = [net.biases["0"].detach().clone().requires_grad_(), None,
          net.biases["2"].detach().clone().requires_grad_()]
    ref = fk.torch_settle.settle_energy(ws, x0, y, biases=bs, activations=net.activations,
                                        precisions=[1.0, 2.0, 0.5], eta=0.1, steps=30)
    ref.backward()
    assert torch.equal(e.detach(), ref.detach())
    want = [w.grad for w in ws] + [bs[0].grad, bs[2].grad]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert e.shape == () and e.dtype == torch.float32 and e.requires_grad


def test_energy_decreases_sgd_and_adam():
    x0, y = data(B=64)
    for make in (lambda p: torch.optim.SGD(p, lr=0.1),
                 lambda p: torch.optim.Adam(p, lr=1e-2)):
        net = small()
        opt = make(net.parameters())
        energies = [net.learn_step(x0, y, opt).item() for _ in range(40)]
        assert energies[-1] < 0.7 * energies[0], energies
        assert all(math.isfinite(e) for e in energies)
    # lr= is plain SGD: the same as torch.optim.SGD without momentum
    a, b = small(), small()
    opt = torch.optim.SGD(b.parameters(), lr=0.1)
    for _ in range(3):
        ea = a.learn_step(x0, y, lr=0.1)
        eb = b.learn_step(x0, y, opt)
        assert torch.equal(ea, eb)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_infer_and_forward():
    net = small()
    x0, _ = data()
    st = net.infer(x0)
    assert isinstance(st, PCState) and len(st.x) == len(st.eps) == 3
    assert [tuple(t.shape) for t in st.x] == [(32, 8), (32, 5), (32, 3)]
    assert st.energy.shape == (32,) and not st.energy.requires_grad
    assert not any(t.requires_grad for t in st.x)
    # from the feedforward start with the top free, every error is 0: x_L is the feedforward
    # prediction
    with torch.no_grad():
        h = x0
        for l, w in enumerate(net.weights):
            f = {0: lambda t: t, 1: torch.tanh,
                 2: lambda t: torch.nn.functional.leaky_relu(t, 0.1)}[l]
            h = f(h) @ w.T + net.biases[str(l)]
    assert torch.allclose(net(x0), h, atol=1e-5)
    assert torch.equal(net(x0), st.x[-1])


def test_precision_gradient_closed_form():
    # one layer: no free layer, eps = target - W x0 - b exactly, so F = mean_b 1/2 sum_i
    # (pi_i eps_i^2 - ln pi_i) and dF/dlog_pi_i = pi_i mean_b 1/2 (eps_i^2 - 1/pi_i)
    for kind in ("diagonal", "scalar"):
        torch.manual_seed(1)
        net = PCNetwork([5, 4], activations="identity", precision=kind, init_precision=1.5,
                        eta=0.1, steps=5)
        with torch.no_grad():
            net.log_precisions["0"].add_(0.1 * torch.randn(net.log_precisions["0"].shape))
        x0, y = data(B=16, n0=5, nL=4, seed=2)
        e = net.energy(x0, y)
        e.backward()
        lp = net.log_precisions["0"].detach().double()
        pi = lp.exp()
        eps = (y.double() - x0.double() @ net.weights[0].detach().double().T
               - net.biases["0"].detach().double())
        pi_full = pi.expand(4)
        f = 0.5 * ((pi_full * eps**2).sum(1) - torch.log(pi_full).sum()).mean()
        g_pi = 0.5 * (eps**2 - 1 / pi_full).mean(0)
        g = pi * (g_pi.sum() if kind == "scalar" else g_pi)
        assert abs(e.item() - f.item()) < 1e-4 * max(1.0, abs(f.item())), (kind, e, f)
        got = net.log_precisions["0"].grad
        assert got is not None, f"{kind}: no gradient reached log_precisions"
        assert got.shape == lp.shape
        assert torch.allclose(got.double(), g, rtol=1e-4, atol=1e-5), (kind, got, g)


def test_precision_recovers_noise_variances():
    # y = W* x + noise with a known standard deviation per output unit: the learned diagonal
    # precision converges to 1 / variance (the maximum-likelihood precision)
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([0.1, 0.3, 1.0])
    w_true = torch.randn(3, 6, generator=g)
    x0 = torch.randn(512, 6, generator=g)
    y = x0 @ w_true.T + sigma * torch.randn(512, 3, generator=g)
    torch.manual_seed(3)
    net = PCNetwork([6, 3], activations="identity", precision="diagonal", eta=0.1, steps=5)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(600):
        net.learn_step(x0, y, opt)
    pi = net.precisions()[0]
    want = 1 / sigma**2
    rel = ((pi - want) / want).abs()
    assert (rel < 0.15).all(), (pi, want)


def test_precision_learning_deep_stays_positive():
    net = small(precision=["scalar", "diagonal", "diagonal"], eta=0.05)
    x0, y = data(B=64)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    energies = [net.learn_step(x0, y, opt).item() for _ in range(30)]
    assert all(math.isfinite(e) for e in energies), energies
    assert energies[-1] < energies[0], energies
    assert all((p > 0).all() and torch.isfinite(p).all() for p in net.precisions())
    assert all(p.grad is not None for p in net.log_precisions.values())


def test_max_stable_eta():
    net = small(precision=[1.0, 4.0, 2.0])
    eta = net.max_stable_eta()
    ws = [w.detach() for w in net.weights]
    bs = [net.biases[str(l)].detach() for l in range(3)]
    assert eta == fk.max_stable_eta(ws, bs, activations=net.activations,
                                    precisions=[1.0, 4.0, 2.0])
    assert 0 < net.max_stable_eta(clamped=False) <= eta
    net.eta = 0.9 * eta  # settles without diverging
    x0, y = data()
    assert torch.isfinite(net.energy(x0, y))
    # learned precisions enter with their current values: a larger precision, a smaller bound
    lp = small(precision=[None, "diagonal", "scalar"], init_precision=2.0)
    e1 = lp.max_stable_eta()
    with torch.no_grad():
        lp.log_precisions["1"].add_(math.log(4.0))
    assert lp.max_stable_eta() < e1
    expect(TypeError, lambda: net.max_stable_eta(clamped=1), "clamped")


def test_divergence_raises_and_leaves_parameters():
    net = small(eta=50.0, steps=50)
    x0, y = data()
    before = [p.detach().clone() for p in net.parameters()]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    expect(fk.DivergedError, lambda: net.learn_step(x0, y, opt), "")
    assert issubclass(fk.DivergedError, fk.FepError)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


def test_start_states_and_tf32_option():
    net = small(bias=[True, False, True])
    x0, y = data()
    # the feedforward states, given explicitly, are the default start
    with torch.no_grad():
        h, states = x0, []
        for l, w in enumerate(net.weights[:-1]):
            f = torch.tanh if l == 1 else (lambda t: t)
            h = f(h) @ w.T + (net.biases[str(l)] if str(l) in net.biases else 0)
            states.append(h.clone())
    e0 = net.energy(x0, y)
    e1 = net.energy(x0, y, init=states)
    assert torch.allclose(e0, e1, rtol=1e-5, atol=1e-6), (e0, e1)
    # another start settles elsewhere (30 steps do not forget the start completely)
    e2 = net.energy(x0, y, init=[torch.zeros_like(t) for t in states])
    assert torch.isfinite(e2) and not torch.equal(e0, e2)
    # TF32 is an NVIDIA tensor-core option: no effect on the CPU
    tf = small(bias=[True, False, True], allow_tf32=True)
    assert torch.equal(tf.energy(x0, y), e0)
    assert torch.equal(tf(x0), net(x0))


def test_torch_compile():
    torch._dynamo.reset()
    net = small(precision=[None, "diagonal", "scalar"])
    x0, y = data()

    def step(x0, y):
        return 2.0 * net.energy(x0, y)

    cstep = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = cstep(x0, y)
    loss.backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    ref = step(x0, y)
    ref.backward()
    assert torch.equal(loss, ref)
    assert all(torch.equal(a, p.grad) for a, p in zip(got, net.parameters()))
    # the whole module's forward (inference), compiled
    cnet = torch.compile(net, fullgraph=True, backend="aot_eager")
    assert torch.equal(cnet(x0), net(x0))
    # a compiled training loop lowers the energy like the eager one
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    first = None
    for _ in range(10):
        opt.zero_grad()
        e = cstep(x0, y)
        e.backward()
        opt.step()
        first = e.item() if first is None else first
    assert e.item() < first


def test_state_dict_round_trip():
    kinds = ["scalar", "diagonal", None]
    a = small(precision=kinds, seed=4)
    x0, y = data()
    opt = torch.optim.Adam(a.parameters(), lr=1e-2)
    for _ in range(3):
        a.learn_step(x0, y, opt)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = small(precision=kinds, seed=5)  # other initial weights
    assert not torch.equal(a.weights[0], b.weights[0])
    b.load_state_dict(torch.load(buf))
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                  b.state_dict().values()))
    assert list(a.state_dict()) == list(b.state_dict())
    assert torch.equal(a(x0), b(x0))
    assert torch.equal(a.energy(x0, y), b.energy(x0, y))
    assert all(torch.equal(p, q) for p, q in zip(a.precisions(), b.precisions()))
    # a network of another shape (or precision kind) refuses the state dict
    other = PCNetwork([6, 8, 5, 3], precision="diagonal")
    expect(RuntimeError, lambda: other.load_state_dict(a.state_dict()), "")


def test_bad_arguments():
    expect(ValueError, lambda: PCNetwork([4]), "widths")
    expect(TypeError, lambda: PCNetwork([4, 2.5]), "widths[1]")
    expect(ValueError, lambda: PCNetwork([4, 0, 2]), "widths[1]")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], activations="softmax"), "activations[0]")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], activations=["tanh"]), "activations")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], precision="full"), "precision[0]")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], precision=[None, -1.0]), "precision[1]")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], precision=[None]), "precision")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], precision="scalar", init_precision=0.0),
           "init_precision[0]")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], eta=0.0), "eta")
    expect(TypeError, lambda: PCNetwork([4, 3, 2], eta="0.1"), "eta")
    expect(TypeError, lambda: PCNetwork([4, 3, 2], steps=2.0), "steps")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], steps=0), "steps")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], momentum=1.0), "momentum")
    expect(TypeError, lambda: PCNetwork([4, 3, 2], bias="yes"), "bias")
    expect(TypeError, lambda: PCNetwork([4, 3, 2], log_det=1), "log_det")
    expect(ValueError, lambda: PCNetwork([4, 3, 2], dtype=torch.float64), "dtype")
    net = PCNetwork([4, 3, 2])
    x0, y = torch.randn(5, 4), torch.randn(5, 2)
    expect(TypeError, lambda: net.energy(x0.numpy(), y), "x0")
    expect(ValueError, lambda: net.energy(torch.randn(5, 3), y), "x0")
    expect(ValueError, lambda: net.energy(x0, torch.randn(5, 3)), "target")
    expect(ValueError, lambda: net.energy(x0, torch.randn(4, 2)), "target")
    expect(ValueError, lambda: net.energy(x0.double(), y), "x0")
    expect(ValueError, lambda: net(torch.randn(5, 4, 1)), "x0")
    expect(TypeError, lambda: net.learn_step(x0, y), "exactly one of optimizer and lr")
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    expect(TypeError, lambda: net.learn_step(x0, y, opt, lr=0.1), "exactly one")
    expect(TypeError, lambda: net.learn_step(x0, y, "sgd"), "optimizer")
    expect(ValueError, lambda: net.learn_step(x0, y, lr=-1.0), "lr")
    expect(TypeError, lambda: net.energy(x0, y, init=torch.zeros(5, 3)), "init")


def test_nn_exports():
    import fep_kernels.nn as fnn

    assert {"PCNetwork", "PCState", "LCALayer"} <= set(fnn.__all__)
    assert fk.nn is fnn
    here = os.path.dirname(os.path.abspath(fnn.__file__))
    if not os.path.exists(os.path.join(here, "lca.py")):
        return "SKIPPED: fep_kernels/nn/lca.py (LCALayer) is not there yet"
    assert isinstance(fnn.LCALayer, type) and issubclass(fnn.LCALayer, torch.nn.Module)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), "test_nn_pc.py"))
