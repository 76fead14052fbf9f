"""Tests of fep_kernels.nn.LCALayer (sparse coding as an nn.Module) on CPU tensors (and CUDA
tensors when PyTorch and the library both see a GPU): its parameter, that forward gives
fep_kernels.LcaDictionary's codes (automatic step by default), the LASSO optimality of the
codes, that learn_step is the dictionary-learning rule (against LcaDictionary.learn and a
float64 PyTorch computation) and lowers the reconstruction error, the optimiser route
(reconstruction_loss + normalize_), torch.compile (fullgraph), state_dict round trips and
argument errors. Run as ``FEP_KERNELS_LIB=<libfep_kernels.so> python3 test_nn_lca.py`` (or
pytest).

Needs PyTorch; without it, it prints that it was skipped and exits 0."""

import io
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _runner import skip_module  # noqa: E402

try:
    import torch
except ImportError as e:  # pragma: no cover
    skip_module("test_nn_lca.py", f"{e.name} is not installed")

import fep_kernels as fk  # noqa: E402
from _runner import expect, run_tests  # noqa: E402
from fep_kernels.nn.lca import LCALayer  # noqa: E402


def devices():
    """"cpu", and "cuda" when PyTorch and the library both see a CUDA device."""
    out = ["cpu"]
    if torch.cuda.is_available() and fk.device_count("cuda") > 0:
        out.append("cuda")
    return out


def data(n=16, m=32, B=12, k=3, seed=0, device="cpu"):
    """A unit-norm dictionary [n, m] and B signals that are k-sparse in it plus noise."""
    g = torch.Generator().manual_seed(seed)
    phi = torch.randn(n, m, generator=g)
    phi /= phi.norm(dim=0, keepdim=True)
    codes = torch.zeros(B, m)
    for b in range(B):
        idx = torch.randperm(m, generator=g)[:k]
        codes[b, idx] = 1.0 + torch.rand(k, generator=g)
    x = codes @ phi.T + 0.01 * torch.randn(B, n, generator=g)
    return phi.to(device), x.to(device)


def test_parameter_and_defaults():
    layer = LCALayer(16, 32, lam=0.1, generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["phi"], names
    assert layer.phi.shape == (16, 32) and layer.phi.dtype == torch.float32
    assert torch.allclose(layer.phi.norm(dim=0), torch.ones(32), atol=1e-6)
    assert layer.eta is None and "eta=auto" in repr(layer)
    # a given dictionary is copied and its columns renormalised
    phi, _ = data()
    layer = LCALayer(16, 32, lam=0.1, dictionary=3.0 * phi)
    assert torch.allclose(layer.phi.detach(), phi, atol=1e-6)
    assert layer.phi.data_ptr() != phi.data_ptr()


def test_forward_is_lca_with_the_automatic_step():
    for dev in devices():
        phi, x = data(seed=2, device=dev)
        layer = LCALayer(16, 32, lam=0.05, steps=3000, tol=1e-7, tol_mode="relative",
                         dictionary=phi, device=dev)
        a = layer(x)
        assert a.shape == (12, 32) and a.dtype == torch.float32 and not a.requires_grad
        with fk.LcaDictionary(layer.phi.detach()) as d:
            ref = d.solve(x, lam=0.05, steps=3000, tol=1e-7, tol_mode="relative")
            assert abs(layer.lambda_max() - d.lambda_max) < 1e-12
        assert torch.equal(a, ref["a"]), dev
        # leading dimensions are kept
        a3 = layer(x.reshape(3, 4, 16))
        assert a3.shape == (3, 4, 32) and torch.equal(a3.reshape(12, 32), a)
        u, a2, steps = layer.code(x)
        assert torch.equal(a2, a) and steps.shape == (12,) and steps.dtype == torch.int32
        # the codes are the LASSO solution: |phi^T (x - phi a)| <= lam, = lam where a != 0
        p64 = layer.phi.detach().double()
        c = (x.double() - a.double() @ p64.T) @ p64
        assert (c.abs() <= 0.05 * (1 + 1e-3) + 1e-5).all(), dev
        act = a != 0
        assert act.any() and torch.allclose(c[act], 0.05 * a[act].sign().double(), atol=1e-4)


def test_relative_tol_and_options_reach_the_op():
    phi, x = data(seed=3)
    kw = dict(dictionary=phi, steps=2000, tol=1e-4, tol_mode="relative")
    small = LCALayer(16, 32, lam=0.05, **kw)
    big = LCALayer(16, 32, lam=0.05 * 1024, **kw)
    _, a1, s1 = small.code(x)
    _, a2, s2 = big.code(1024 * x)
    assert torch.equal(s1, s2) and (s1 < 2000).all(), (s1, s2)
    assert torch.allclose(a2, 1024 * a1, rtol=1e-5, atol=1e-3)
    fixed = LCALayer(16, 32, lam=0.05, eta=0.1, steps=50, threshold="soft_nonneg",
                     dictionary=phi, allow_tf32=True)
    with fk.LcaDictionary(fixed.phi.detach()) as d:
        ref = d.solve(x, lam=0.05, eta=0.1, steps=50, threshold="soft_nonneg")
    assert torch.equal(fixed(x), ref["a"]) and (fixed(x) >= 0).all()


def test_learn_step_is_the_dictionary_learning_rule():
    for dev in devices():
        phi, x = data(seed=4, device=dev)
        layer = LCALayer(16, 32, lam=0.05, steps=200, dictionary=phi, device=dev)
        a = layer(x)
        lr = 0.3
        # float64 PyTorch: phi + (lr / B) (x - a phi^T)^T a, columns renormalised
        p64, a64, x64 = phi.double(), a.double(), x.double()
        want = p64 + (lr / x.shape[0]) * (x64 - a64 @ p64.T).T @ a64
        want = want / want.norm(dim=0, keepdim=True)
        with fk.LcaDictionary(phi) as d:
            d.learn(x, a, lr)
            lib = d.phi()
        used = layer.learn_step(x, lr, a=a)
        assert used is a
        got = layer.phi.detach()
        assert (got.double() - want).abs().max() < 1e-5, dev
        assert (got - lib).abs().max() < 1e-5, dev
        assert torch.allclose(got.norm(dim=0), torch.ones(32, device=dev), atol=1e-5)


def test_learning_lowers_the_reconstruction_error():
    phi_true, x = data(n=12, m=24, B=64, k=2, seed=5)
    layer = LCALayer(12, 24, lam=0.02, steps=150, generator=torch.Generator().manual_seed(9))
    param = layer.phi
    first = layer.reconstruction_loss(x).item()
    for _ in range(30):
        layer.learn_step(x, lr=0.5)
    last = layer.reconstruction_loss(x).item()
    assert layer.phi is param  # updated in place: optimisers and state_dict stay valid
    assert last < 0.5 * first, (first, last)
    # the optimiser route: reconstruction_loss's gradient, then normalize_
    layer2 = LCALayer(12, 24, lam=0.02, steps=150, generator=torch.Generator().manual_seed(9))
    opt = torch.optim.SGD(layer2.parameters(), lr=0.5)
    for _ in range(30):
        opt.zero_grad()
        a = layer2(x)
        loss = layer2.reconstruction_loss(x, a)
        loss.backward()
        opt.step()
        layer2.normalize_()
    assert layer2.reconstruction_loss(x).item() < 0.5 * first
    assert torch.allclose(layer2.phi.detach().norm(dim=0), torch.ones(24), atol=1e-5)


def test_torch_compile_fullgraph():
    for dev in devices():
        torch._dynamo.reset()
        phi, x = data(seed=6, device=dev)
        layer = LCALayer(16, 32, lam=0.05, steps=100, tol=1e-5, tol_mode="relative",
                         dictionary=phi, device=dev)
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(x), layer(x)), dev
        # after a learning step the compiled module sees the new dictionary (same parameter)
        layer.learn_step(x, lr=0.2)
        assert torch.equal(compiled(x), layer(x)), dev

        def recon(x):
            return layer.reconstruct(layer(x))

        crecon = torch.compile(recon, fullgraph=True, backend="aot_eager")
        assert torch.allclose(crecon(x), recon(x)), dev


def test_state_dict_round_trip():
    phi, x = data(seed=7)
    layer = LCALayer(16, 32, lam=0.05, steps=120, generator=torch.Generator().manual_seed(3))
    layer.learn_step(x, lr=0.2)
    buf = io.BytesIO()
    torch.save(layer.state_dict(), buf)
    buf.seek(0)
    other = LCALayer(16, 32, lam=0.05, steps=120, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(other.phi, layer.phi)
    other.load_state_dict(torch.load(buf))
    assert torch.equal(other.phi, layer.phi)
    assert torch.equal(other(x), layer(x))
    expect(RuntimeError, lambda: LCALayer(16, 33, lam=0.05).load_state_dict(layer.state_dict()),
           "size mismatch")


def test_argument_errors():
    expect(ValueError, lambda: LCALayer(0, 4, lam=0.1), "n_inputs")
    expect(ValueError, lambda: LCALayer(4, 4, lam=0.0), "lam")
    expect(ValueError, lambda: LCALayer(4, 4, lam=0.1, eta=1.5), "eta")
    expect(ValueError, lambda: LCALayer(4, 4, lam=0.1, threshold="medium"), "threshold")
    expect(ValueError, lambda: LCALayer(4, 4, lam=0.1, tol_mode="rel"), "tol_mode")
    expect(ValueError, lambda: LCALayer(4, 4, lam=0.1, dtype=torch.float64), "dtype")
    expect(ValueError, lambda: LCALayer(4, 4, lam=0.1, dictionary=torch.ones(3, 4)),
           "dictionary")
    layer = LCALayer(4, 6, lam=0.1)
    expect(ValueError, lambda: layer(torch.ones(2, 5)), "last dimension 4")
    expect(ValueError, lambda: layer.learn_step(torch.ones(2, 4), lr=-1.0), "lr")
    before = layer.phi.detach().clone()
    big = torch.full((2, 4), 1e30)
    expect(FloatingPointError, lambda: layer.learn_step(big, lr=1e10,
                                                        a=torch.full((2, 6), 1e30)),
           "not finite")
    assert torch.equal(layer.phi.detach(), before)


if __name__ == "__main__":
    sys.exit(run_tests(globals(), "test_nn_lca.py", f" (devices: {devices()})"))
