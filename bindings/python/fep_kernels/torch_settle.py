"""PyTorch integration of predictive-coding settling (DESIGN.md 4.2): ``torch.library`` custom
ops with fake implementations (so ``torch.compile(fullgraph=True)`` traces them) and the
differentiable :func:`settle_energy`, whose backward gives the learning step's gradients.

Importing this module (``fep_kernels`` does when PyTorch is imported) registers

- ``fep::settle_energy(...) -> (Tensor energy, Tensor[] grad_w, Tensor[] grad_b)``: settles x0
  with x_L clamped to target; ``energy`` is the settled energy averaged over the batch (0-d
  float32), differentiable w.r.t. the weights and the biases (see :func:`settle_energy`);
  grad_w / grad_b (float32, one per layer) are what ``SettleNet.learn(..., lr=0)`` returns and
  are not differentiable;
- ``fep::settle_learn(...) -> (Tensor energy [B], Tensor[] grad_w, Tensor[] grad_b)``: the same
  step with the per-sample settled energies (no autograd: backward raises);
- ``fep::settle_infer(...) -> (Tensor[] x, Tensor[] eps, Tensor energy [B])``: settles with x_L
  free: the settled x_1 ... x_L, their errors and the energy (float32; no autograd).

The ops' network arguments, in order: ``Tensor[] weights`` (W_l [n_l, n_{l-1}], float32,
float16 or bfloat16), ``Tensor[] biases`` with ``int[] bias_layers`` (the layers, 0-based and
increasing, that have a bias: a ``Tensor?[]`` input cannot get gradients),
``Tensor?[] precision_diags`` (L entries: None or a float32 [n_l] diagonal precision, which
overrides the scalar), ``x0`` [B, n_0] float32 (and ``target`` [B, n_L] float32),
``int[] activations`` (``FEP_ACT_*`` codes), ``float[] alphas`` (leaky-ReLU slopes),
``float[] precisions`` (L scalars), ``float eta, int steps, float momentum, float tol,
bool check`` (as for :meth:`fep_kernels.SettleNet.infer`). The Python functions below take the
friendlier arguments of :class:`fep_kernels.SettleNet` and build these.

Every op runs on CPU or CUDA tensors (CUDA: PyTorch's current stream of the weights' device).

Example::

    import torch
    import fep_kernels as fk

    w1 = torch.nn.Parameter(0.3 * torch.randn(16, 8))
    w2 = torch.nn.Parameter(0.3 * torch.randn(4, 16))
    opt = torch.optim.SGD([w1, w2], lr=0.05)
    x0, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(100):
        opt.zero_grad()
        e = fk.settle_energy([w1, w2], x0, y, activations="tanh", eta=0.2, steps=50)
        e.backward()                                    # w.grad: SettleNet.learn's grad_w
        opt.step()
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._abi import _ACTIVATIONS, FEP_ACT_LEAKY_RELU
from ._torch_args import _DTYPES, _not_differentiable, _number, _shape, _steps, _tensor
from .settle import SettleNet, _activation, _one_activation

__all__ = ["settle_energy", "settle_learn_op", "settle_infer_op"]

_ACT_NAMES = {code: name for name, code in _ACTIVATIONS.items()}
_F32 = (torch.float32,)
_NO_TARGET = object()  # _check_net's target for settle_infer


def _check_net(weights, biases, bias_layers, diags, x0, target, acts, alphas, precisions):
    """Checks the ops' network arguments (no data needed); returns the batch size."""
    if not isinstance(weights, (list, tuple)) or not weights:
        raise ValueError("weights: need a non-empty list of tensors (one per layer)")
    L = len(weights)
    _tensor(weights[0], "weights[0]", dim=2, dtypes=_DTYPES)
    dev, dt = weights[0].device, weights[0].dtype
    owner = "weights[0]"
    widths = [weights[0].shape[1]]
    for l, w in enumerate(weights):
        _tensor(w, f"weights[{l}]", dim=2, dtypes=_DTYPES, device=dev, owner=owner)
        if w.dtype != dt:
            raise ValueError(f"weights[{l}]: dtype {w.dtype}, but weights[0] is {dt} "
                             "(all layers share one dtype)")
        if w.shape[1] != widths[-1]:
            raise ValueError(f"weights[{l}]: shape {list(w.shape)} does not follow the layer "
                             f"below (expected [*, {widths[-1]}])")
        widths.append(w.shape[0])
    if len(biases) != len(bias_layers):
        raise ValueError(f"biases: {len(biases)} tensors for {len(bias_layers)} bias_layers")
    if list(bias_layers) != sorted(set(bias_layers)) or any(not 0 <= l < L for l in bias_layers):
        raise ValueError(f"bias_layers: expected increasing layers in [0, {L}), "
                         f"got {list(bias_layers)}")
    for b, l in zip(biases, bias_layers):
        _tensor(b, f"biases[{l}]", dim=1, dtypes=(dt,), device=dev, owner=owner)
        _shape(b, f"biases[{l}]", [widths[l + 1]])
    for what, seq in (("precision_diags", diags), ("activations", acts), ("alphas", alphas),
                      ("precisions", precisions)):
        if len(seq) != L:
            raise ValueError(f"{what}: expected {L} entries (one per layer), got {len(seq)}")
    for l, d in enumerate(diags):
        _tensor(d, f"precisions[{l}]", dim=1, dtypes=_F32, device=dev, owner=owner,
                optional=True)
        if d is not None:
            _shape(d, f"precisions[{l}]", [widths[l + 1]])
    for l, c in enumerate(acts):
        if c not in _ACT_NAMES:
            raise ValueError(f"activations[{l}]: {c} is not a FEP_ACT_* code")
    _tensor(x0, "x0", dim=2, dtypes=_F32, device=dev, owner=owner)
    if x0.shape[1] != widths[0]:
        raise ValueError(f"x0: expected shape [B, {widths[0]}], got {list(x0.shape)}")
    if target is not _NO_TARGET:
        _tensor(target, "target", dim=2, dtypes=_F32, device=dev, owner=owner)
        _shape(target, "target", [x0.shape[0], widths[-1]])
    return x0.shape[0]


def _net(weights, biases, bias_layers, diags, acts, alphas, precisions):
    bs = [None] * len(weights)
    for l, b in zip(bias_layers, biases):
        bs[l] = b.contiguous()
    names = [("leaky_relu", a) if c == FEP_ACT_LEAKY_RELU else _ACT_NAMES[c]
             for c, a in zip(acts, alphas)]
    precs = [p if d is None else d.contiguous() for d, p in zip(diags, precisions)]
    return SettleNet([w.contiguous() for w in weights], bs, names, precs)


def _learn(weights, biases, bias_layers, diags, x0, target, acts, alphas, precisions, eta, steps,
           momentum, tol, check):
    _check_net(weights, biases, bias_layers, diags, x0, target, acts, alphas, precisions)
    net = _net(weights, biases, bias_layers, diags, acts, alphas, precisions)
    res = net.learn(x0.contiguous(), target.contiguous(), eta, steps, momentum=momentum, tol=tol,
                    lr=0.0, check=check)
    return res["energy"], res["grad_w"], res["grad_b"]


def _fake_grads(weights):
    return ([w.new_empty(w.shape, dtype=torch.float32) for w in weights],
            [w.new_empty((w.shape[0],), dtype=torch.float32) for w in weights])


# ---- fep::settle_learn ----

@torch.library.custom_op("fep::settle_learn", mutates_args=())
def settle_learn_raw(weights: List[Tensor], biases: List[Tensor], bias_layers: List[int],
                     precision_diags: List[Optional[Tensor]], x0: Tensor, target: Tensor,
                     activations: List[int], alphas: List[float], precisions: List[float],
                     eta: float, steps: int, momentum: float, tol: float, check: bool
                     ) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """``fep::settle_learn``: (energy [B], grad_w, grad_b) of ``SettleNet.learn(lr=0)``."""
    return _learn(weights, biases, bias_layers, precision_diags, x0, target, activations, alphas,
                  precisions, eta, steps, momentum, tol, check)


@settle_learn_raw.register_fake
def _(weights, biases, bias_layers, precision_diags, x0, target, activations, alphas, precisions,
      eta, steps, momentum, tol, check):
    batch = _check_net(weights, biases, bias_layers, precision_diags, x0, target, activations,
                       alphas, precisions)
    return (x0.new_empty((batch,), dtype=torch.float32), *_fake_grads(weights))


_not_differentiable(settle_learn_raw, "fep::settle_learn",
                    "it returns the gradients themselves; use fep_kernels.settle_energy for a "
                    "differentiable settled energy")


# ---- fep::settle_energy ----

@torch.library.custom_op("fep::settle_energy", mutates_args=())
def settle_energy_raw(weights: List[Tensor], biases: List[Tensor], bias_layers: List[int],
                      precision_diags: List[Optional[Tensor]], x0: Tensor, target: Tensor,
                      activations: List[int], alphas: List[float], precisions: List[float],
                      eta: float, steps: int, momentum: float, tol: float, check: bool
                      ) -> Tuple[Tensor, List[Tensor], List[Tensor]]:
    """``fep::settle_energy``: (mean settled energy [], grad_w, grad_b)."""
    energy, grad_w, grad_b = _learn(weights, biases, bias_layers, precision_diags, x0, target,
                                    activations, alphas, precisions, eta, steps, momentum, tol,
                                    check)
    return energy.mean(), grad_w, grad_b


@settle_energy_raw.register_fake
def _(weights, biases, bias_layers, precision_diags, x0, target, activations, alphas, precisions,
      eta, steps, momentum, tol, check):
    _check_net(weights, biases, bias_layers, precision_diags, x0, target, activations, alphas,
               precisions)
    return (x0.new_empty((), dtype=torch.float32), *_fake_grads(weights))


def _energy_setup(ctx, inputs, output):
    _, grad_w, grad_b = output
    ctx.mark_non_differentiable(*grad_w, *grad_b)
    ctx.save_for_backward(*grad_w, *grad_b)
    ctx.depth = len(grad_w)
    # the structure backward must return: a list of Nones for each input that is a list of
    # tensors (an empty list included), else None
    ctx.no_grads = [[None] * len(a) if isinstance(a, list) and all(isinstance(t, Tensor) for t in a)
                    else None for a in inputs]
    ctx.bias_layers = list(inputs[2])
    ctx.w_dtypes = [w.dtype for w in inputs[0]]
    ctx.b_dtypes = [b.dtype for b in inputs[1]]


def _energy_backward(ctx, g, _g_grad_w, _g_grad_b):
    saved = ctx.saved_tensors
    grad_w, grad_b = saved[:ctx.depth], saved[ctx.depth:]
    dw = [(g * gw).to(dt) for gw, dt in zip(grad_w, ctx.w_dtypes)]
    db = [(g * grad_b[l]).to(dt) for l, dt in zip(ctx.bias_layers, ctx.b_dtypes)]
    # no gradient for bias_layers, precision_diags, x0, target and the non-tensor arguments
    return (dw, db, *ctx.no_grads[2:])


settle_energy_raw.register_autograd(_energy_backward, setup_context=_energy_setup)


# ---- fep::settle_infer ----

@torch.library.custom_op("fep::settle_infer", mutates_args=())
def settle_infer_raw(weights: List[Tensor], biases: List[Tensor], bias_layers: List[int],
                     precision_diags: List[Optional[Tensor]], x0: Tensor,
                     activations: List[int], alphas: List[float], precisions: List[float],
                     eta: float, steps: int, momentum: float, tol: float, check: bool
                     ) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """``fep::settle_infer``: (x, eps, energy) of ``SettleNet.infer`` (x_L free)."""
    _check_net(weights, biases, bias_layers, precision_diags, x0, _NO_TARGET, activations,
               alphas, precisions)
    net = _net(weights, biases, bias_layers, precision_diags, activations, alphas, precisions)
    res = net.infer(x0.contiguous(), eta, steps, momentum=momentum, tol=tol, check=check)
    return res["x"], res["eps"], res["energy"]


@settle_infer_raw.register_fake
def _(weights, biases, bias_layers, precision_diags, x0, activations, alphas, precisions, eta,
      steps, momentum, tol, check):
    batch = _check_net(weights, biases, bias_layers, precision_diags, x0, _NO_TARGET, activations,
                       alphas, precisions)
    f32 = dict(dtype=torch.float32)
    x = [x0.new_empty((batch, w.shape[0]), **f32) for w in weights]
    eps = [x0.new_empty((batch, w.shape[0]), **f32) for w in weights]
    return x, eps, x0.new_empty((batch,), **f32)


_not_differentiable(settle_infer_raw, "fep::settle_infer",
                    "use fep_kernels.settle_energy to differentiate the settled energy w.r.t. "
                    "the weights (call settle_infer under torch.no_grad() or on detached tensors)")


# ---- the Python API ----

def _op_args(weights, biases, activations, precisions, eta, steps, momentum, tol):
    """The ops' network and settling arguments from SettleNet-style ones."""
    if isinstance(weights, Tensor):
        weights = [weights]
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"weights: expected a list of tensors, got {type(weights).__name__}")
    weights = list(weights)
    L = len(weights)
    for l, w in enumerate(weights):
        _tensor(w, f"weights[{l}]")
    if biases is None:
        biases = [None] * L
    if not isinstance(biases, (list, tuple)):
        raise TypeError(f"biases: expected None or a list (a tensor or None per layer), "
                        f"got {type(biases).__name__}")
    if len(biases) != L:
        raise ValueError(f"biases: expected {L} entries (one per layer, None for none), "
                         f"got {len(biases)}")
    for l, b in enumerate(biases):
        _tensor(b, f"biases[{l}]", optional=True)
    bias_layers = [l for l, b in enumerate(biases) if b is not None]
    biases = [biases[l] for l in bias_layers]
    if _one_activation(activations):
        activations = [activations] * L
    if not isinstance(activations, (list, tuple)) or len(activations) != L:
        raise ValueError(f"activations: expected one activation or {L} (f_1 ... f_L), got "
                         f"{activations!r}")
    acts = [_activation(a, f"activations[{l}]") for l, a in enumerate(activations)]
    if not isinstance(precisions, (list, tuple)):
        precisions = [1.0 if precisions is None else precisions] * L
    if len(precisions) != L:
        raise ValueError(f"precisions: expected {L} entries, got {len(precisions)}")
    diags, scalars = [], []
    for l, p in enumerate(precisions):
        if isinstance(p, Tensor):
            _tensor(p, f"precisions[{l}]", dim=1)  # a 0-d tensor: pass float(p) instead
            diags.append(p)
            scalars.append(1.0)
        else:
            diags.append(None)
            scalars.append(_number(p, f"precisions[{l}]"))
    return (weights, biases, bias_layers, diags, [c for c, _ in acts], [a for _, a in acts],
            scalars), (_number(eta, "eta"), _steps(steps), _number(momentum, "momentum"),
                       _number(tol, "tol"))


def settle_energy(weights, x0, target, biases=None, activations="identity", precisions=None, *,
                  eta, steps, momentum=0.0, tol=0.0, check=True):
    """The settled energy of a learning step, averaged over the batch: a 0-d float32 tensor,
    differentiable w.r.t. ``weights`` and ``biases`` (``fep::settle_energy``).

    Arguments as for :class:`fep_kernels.SettleNet` (``weights``: W_l [n_l, n_{l-1}] float32,
    float16 or bfloat16; ``biases``: None or a tensor or None per layer; ``activations``;
    ``precisions``: None, a number, or per layer a number or a float32 [n_l] diagonal) and
    :meth:`fep_kernels.SettleNet.learn` (``x0`` [B, n_0] and ``target`` [B, n_L] float32,
    ``eta``, ``steps``, ``momentum``, ``tol``, ``check``). Runs on CPU or CUDA tensors.

    Backward: ``W_l.grad += grad_output * grad_w[l]`` and ``b_l.grad += grad_output *
    grad_b[l]``, with grad_w / grad_b exactly what ``SettleNet.learn(..., lr=0)`` returns
    (float32, cast to the weights' dtype). That is the gradient of the returned value by the
    envelope theorem: the settled free layers x* minimise E(x, W), so dE(x*(W), W)/dW =
    dE/dW at x* + (dE/dx at x*)(dx*/dW) = dE/dW at x*, the library's formula with x* held fixed.
    It is exact only as far as settling converged (enough ``steps``, small enough ``eta``).
    ``x0`` and ``target`` get no gradient (None), nor do diagonal precision tensors.
    """
    net, (eta, steps, momentum, tol) = _op_args(weights, biases, activations, precisions, eta,
                                                steps, momentum, tol)
    _check_net(*net[:4], x0, target, *net[4:])
    energy, _, _ = torch.ops.fep.settle_energy(*net[:4], x0, target, *net[4:], eta, steps,
                                               momentum, tol, bool(check))
    return energy


def settle_learn_op(weights, x0, target, biases=None, activations="identity", precisions=None,
                    *, eta, steps, momentum=0.0, tol=0.0, check=True):
    """``fep::settle_learn``: ``(energy [B], grad_w, grad_b)`` of ``SettleNet.learn(lr=0)``
    (float32; lists of L tensors; a layer without a bias gets its bias gradient too). Not
    differentiable (backward raises): use :func:`settle_energy`. Arguments as for it."""
    net, (eta, steps, momentum, tol) = _op_args(weights, biases, activations, precisions, eta,
                                                steps, momentum, tol)
    _check_net(*net[:4], x0, target, *net[4:])
    return torch.ops.fep.settle_learn(*net[:4], x0, target, *net[4:], eta, steps, momentum, tol,
                                      bool(check))


def settle_infer_op(weights, x0, biases=None, activations="identity", precisions=None, *, eta,
                    steps, momentum=0.0, tol=0.0, check=True):
    """``fep::settle_infer``: settles ``x0`` with x_L free from the feedforward start and
    returns ``(x, eps, energy)``: the settled x_1 ... x_L and their errors (lists of L float32
    [B, n_l]) and the settled energy [B] (``SettleNet.infer``'s "x", "eps", "energy"). Not
    differentiable (backward raises a RuntimeError). Arguments as for :func:`settle_energy`."""
    net, (eta, steps, momentum, tol) = _op_args(weights, biases, activations, precisions, eta,
                                                steps, momentum, tol)
    _check_net(*net[:4], x0, _NO_TARGET, *net[4:])
    return torch.ops.fep.settle_infer(*net[:4], x0, *net[4:], eta, steps, momentum, tol,
                                      bool(check))
