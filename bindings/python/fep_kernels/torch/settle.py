"""PyTorch integration of predictive-coding settling: ``torch.library`` custom ops with fake
implementations (so ``torch.compile(fullgraph=True)`` traces them) and the differentiable
:func:`settle_energy`, whose backward gives the learning step's gradients.

A network has layers x_0 ... x_L; layer l predicts ``mu_l = W_l f_l(x_{l-1}) + b_l`` with error
``eps_l = x_l - mu_l`` and precision Pi_l; settling descends ``E = 1/2 sum_l eps_l^T Pi_l eps_l``
(per sample) in the free layers, and with ``log_det=True`` the energy reported is the free
energy ``F = E - 1/2 sum_l ln|Pi_l|``.

Importing this module (``fep_kernels`` does when PyTorch is imported) registers

- ``fep::settle_energy(...) -> (Tensor energy, Tensor[] grad_w, Tensor[] grad_b,
  Tensor[] grad_pi)``: settles x0 with x_L clamped to target; ``energy`` is the settled energy
  averaged over the batch (0-d float32), differentiable w.r.t. the weights, the biases and the
  precision tensors (see :func:`settle_energy`); the gradients (float32) are what
  ``SettleNet.learn(..., lr=0)`` returns and are not differentiable;
- ``fep::settle_learn(...) -> (Tensor energy [B], Tensor[] grad_w, Tensor[] grad_b,
  Tensor[] grad_pi)``: the same step with the per-sample settled energies (no autograd:
  backward raises);
- ``fep::settle_infer(...) -> (Tensor[] x, Tensor[] eps, Tensor energy [B])``: settles with x_L
  free: the settled x_1 ... x_L, their errors and the energy (float32; no autograd).

The ops' network arguments, in order: ``Tensor[] weights`` (W_l [n_l, n_{l-1}], float32,
float16 or bfloat16), ``Tensor[] biases`` with ``int[] bias_layers`` (the layers, 0-based and
increasing, that have a bias: a ``Tensor?[]`` input cannot get gradients), likewise
``Tensor[] precision_tensors`` with ``int[] precision_layers`` (float32 [n_l] diagonals or
[B, n_l] per-sample diagonals, overriding the scalar of their layer), ``x0`` [B, n_0] float32
(and ``target`` [B, n_L] float32), ``Tensor[] init`` (empty: the feedforward start; else the
start of every free layer, float32 [B, n_l]), ``int[] activations`` (``FEP_ACT_*`` codes),
``float[] alphas`` (leaky-ReLU slopes), ``float[] precisions`` (L scalars), ``float eta, int
steps, float momentum, float tol, bool check, bool log_det, bool allow_tf32`` (as for
:meth:`fep_kernels.SettleNet.learn`). The Python functions below take the friendlier
arguments of :class:`fep_kernels.SettleNet` and build these.

Every op runs on CPU or CUDA tensors (CUDA: PyTorch's current stream of the weights' device).

Example::

    import torch
    import fep_kernels as fk

    w1 = torch.nn.Parameter(0.3 * torch.randn(16, 8))
    w2 = torch.nn.Parameter(0.3 * torch.randn(4, 16))
    log_pi = torch.nn.Parameter(torch.zeros(4))          # a learnable diagonal precision
    opt = torch.optim.SGD([w1, w2, log_pi], lr=0.05)
    x0, y = torch.randn(32, 8), torch.randn(32, 4)
    for _ in range(100):
        opt.zero_grad()
        e = fk.settle_energy([w1, w2], x0, y, activations="tanh",
                             precisions=[1.0, log_pi.exp()], log_det=True, eta=0.2, steps=50)
        e.backward()                                    # w.grad, log_pi.grad
        opt.step()
"""

from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._abi import _ACTIVATIONS, FEP_ACT_LEAKY_RELU
from ._args import _DTYPES, _not_differentiable, _number, _shape, _steps, _tensor
from ..settle import SettleNet, _activation, _one_activation

__all__ = ["settle_energy", "settle_learn_op", "settle_infer_op"]

_ACT_NAMES = {code: name for name, code in _ACTIVATIONS.items()}
_F32 = (torch.float32,)
_NO_TARGET = object()  # _check_net's target for settle_infer


def _check_net(weights, biases, bias_layers, ptensors, players, x0, target, init, acts, alphas,
               precisions):
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
    for what, ts, ls in (("biases", biases, bias_layers),
                         ("precisions", ptensors, players)):
        if len(ts) != len(ls):
            raise ValueError(f"{what}: {len(ts)} tensors for {len(ls)} layers")
        if list(ls) != sorted(set(ls)) or any(not 0 <= l < L for l in ls):
            raise ValueError(f"{what} layers: expected increasing layers in [0, {L}), "
                             f"got {list(ls)}")
    for b, l in zip(biases, bias_layers):
        _tensor(b, f"biases[{l}]", dtypes=(dt,), device=dev, owner=owner)
        _shape(b, f"biases[{l}]", [widths[l + 1]])
    for what, seq in (("activations", acts), ("alphas", alphas), ("precisions", precisions)):
        if len(seq) != L:
            raise ValueError(f"{what}: expected {L} entries (one per layer), got {len(seq)}")
    for l, c in enumerate(acts):
        if c not in _ACT_NAMES:
            raise ValueError(f"activations[{l}]: {c} is not a FEP_ACT_* code")
    _tensor(x0, "x0", dim=2, dtypes=_F32, device=dev, owner=owner)
    if x0.shape[1] != widths[0]:
        raise ValueError(f"x0: expected shape [B, {widths[0]}], got {list(x0.shape)}")
    batch = x0.shape[0]
    for p, l in zip(ptensors, players):
        _tensor(p, f"precisions[{l}]", dtypes=_F32, device=dev, owner=owner)
        if p.dim() == 2:
            _shape(p, f"precisions[{l}] (one diagonal per sample)", [batch, widths[l + 1]])
        else:
            _shape(p, f"precisions[{l}]", [widths[l + 1]])
    if target is not _NO_TARGET:
        _tensor(target, "target", dim=2, dtypes=_F32, device=dev, owner=owner)
        _shape(target, "target", [batch, widths[-1]])
    if init:
        free = L - (target is not _NO_TARGET)
        if len(init) != free:
            raise ValueError(f"init: expected {free} tensors (x_1 ... x_{free}), got {len(init)}")
        for l, t in enumerate(init):
            _tensor(t, f"init[{l}]", dim=2, dtypes=_F32, device=dev, owner=owner)
            _shape(t, f"init[{l}]", [batch, widths[l + 1]])
    return batch


def _net(weights, biases, bias_layers, ptensors, players, acts, alphas, precisions):
    bs = [None] * len(weights)
    for l, b in zip(bias_layers, biases):
        bs[l] = b.contiguous()
    names = [("leaky_relu", a) if c == FEP_ACT_LEAKY_RELU else _ACT_NAMES[c]
             for c, a in zip(acts, alphas)]
    precs = list(precisions)
    for l, p in zip(players, ptensors):
        precs[l] = p.contiguous()
    return SettleNet([w.contiguous() for w in weights], bs, names, precs)


def _learn(weights, biases, bias_layers, ptensors, players, x0, target, init, acts, alphas,
           precisions, eta, steps, momentum, tol, check, log_det, allow_tf32):
    _check_net(weights, biases, bias_layers, ptensors, players, x0, target, init, acts, alphas,
               precisions)
    net = _net(weights, biases, bias_layers, ptensors, players, acts, alphas, precisions)
    res = net.learn(x0.contiguous(), target.contiguous(), eta, steps, momentum=momentum, tol=tol,
                    init=[t.contiguous() for t in init] if init else None, lr=0.0, check=check,
                    log_det=log_det, allow_tf32=allow_tf32)
    return res["energy"], res["grad_w"], res["grad_b"], [res["grad_pi"][l] for l in players]


def _fake_grads(weights, ptensors):
    return ([w.new_empty(w.shape, dtype=torch.float32) for w in weights],
            [w.new_empty((w.shape[0],), dtype=torch.float32) for w in weights],
            [p.new_empty(p.shape, dtype=torch.float32) for p in ptensors])


# ---- fep::settle_learn ----

@torch.library.custom_op("fep::settle_learn", mutates_args=())
def settle_learn_raw(weights: List[Tensor], biases: List[Tensor], bias_layers: List[int],
                     precision_tensors: List[Tensor], precision_layers: List[int], x0: Tensor,
                     target: Tensor, init: List[Tensor], activations: List[int],
                     alphas: List[float], precisions: List[float], eta: float, steps: int,
                     momentum: float, tol: float, check: bool, log_det: bool, allow_tf32: bool
                     ) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """``fep::settle_learn``: (energy [B], grad_w, grad_b, grad_pi) of
    ``SettleNet.learn(lr=0)``; grad_pi has one entry per precision tensor."""
    return _learn(weights, biases, bias_layers, precision_tensors, precision_layers, x0, target,
                  init, activations, alphas, precisions, eta, steps, momentum, tol, check,
                  log_det, allow_tf32)


@settle_learn_raw.register_fake
def _(weights, biases, bias_layers, precision_tensors, precision_layers, x0, target, init,
      activations, alphas, precisions, eta, steps, momentum, tol, check, log_det, allow_tf32):
    batch = _check_net(weights, biases, bias_layers, precision_tensors, precision_layers, x0,
                       target, init, activations, alphas, precisions)
    return (x0.new_empty((batch,), dtype=torch.float32),
            *_fake_grads(weights, precision_tensors))


_not_differentiable(settle_learn_raw, "fep::settle_learn",
                    "it returns the gradients themselves; use fep_kernels.settle_energy for a "
                    "differentiable settled energy")


# ---- fep::settle_energy ----

@torch.library.custom_op("fep::settle_energy", mutates_args=())
def settle_energy_raw(weights: List[Tensor], biases: List[Tensor], bias_layers: List[int],
                      precision_tensors: List[Tensor], precision_layers: List[int], x0: Tensor,
                      target: Tensor, init: List[Tensor], activations: List[int],
                      alphas: List[float], precisions: List[float], eta: float, steps: int,
                      momentum: float, tol: float, check: bool, log_det: bool, allow_tf32: bool
                      ) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """``fep::settle_energy``: (mean settled energy [], grad_w, grad_b, grad_pi)."""
    energy, grad_w, grad_b, grad_pi = _learn(
        weights, biases, bias_layers, precision_tensors, precision_layers, x0, target, init,
        activations, alphas, precisions, eta, steps, momentum, tol, check, log_det, allow_tf32)
    return energy.mean(), grad_w, grad_b, grad_pi


@settle_energy_raw.register_fake
def _(weights, biases, bias_layers, precision_tensors, precision_layers, x0, target, init,
      activations, alphas, precisions, eta, steps, momentum, tol, check, log_det, allow_tf32):
    _check_net(weights, biases, bias_layers, precision_tensors, precision_layers, x0, target,
               init, activations, alphas, precisions)
    return (x0.new_empty((), dtype=torch.float32), *_fake_grads(weights, precision_tensors))


def _energy_setup(ctx, inputs, output):
    _, grad_w, grad_b, grad_pi = output
    ctx.mark_non_differentiable(*grad_w, *grad_b, *grad_pi)
    ctx.save_for_backward(*grad_w, *grad_b, *grad_pi)
    ctx.depth = len(grad_w)
    # the structure backward must return: a list of Nones for each input that is a list of
    # tensors (an empty list included), else None
    ctx.no_grads = [[None] * len(a) if isinstance(a, list) and all(isinstance(t, Tensor) for t in a)
                    else None for a in inputs]
    ctx.bias_layers = list(inputs[2])
    ctx.w_dtypes = [w.dtype for w in inputs[0]]
    ctx.b_dtypes = [b.dtype for b in inputs[1]]
    # Without the normaliser the value is E, whose precision gradient lacks F's -1/(2 pi) term
    # (per unit, batch-averaged): it is added back in backward from the precisions themselves.
    ctx.log_det = bool(inputs[16])
    ctx.batch = inputs[5].shape[0]
    ctx.precisions = [] if ctx.log_det else [p.detach() for p in inputs[3]]


def _energy_backward(ctx, g, _g_grad_w, _g_grad_b, _g_grad_pi):
    saved = ctx.saved_tensors
    d = ctx.depth
    grad_w, grad_b, grad_pi = saved[:d], saved[d:2 * d], saved[2 * d:]
    dw = [(g * gw).to(dt) for gw, dt in zip(grad_w, ctx.w_dtypes)]
    db = [(g * grad_b[l]).to(dt) for l, dt in zip(ctx.bias_layers, ctx.b_dtypes)]
    if ctx.log_det:
        dp = [g * gp for gp in grad_pi]
    else:  # dE/dpi = dF/dpi + (1/B) sum_b 1/(2 pi)
        dp = [g * (gp + 0.5 / p if p.dim() == 1 else gp + 0.5 / (ctx.batch * p))
              for gp, p in zip(grad_pi, ctx.precisions)]
    # no gradient for bias_layers, precision_layers, x0, target, init and the non-tensor
    # arguments
    return (dw, db, ctx.no_grads[2], dp, *ctx.no_grads[4:])


settle_energy_raw.register_autograd(_energy_backward, setup_context=_energy_setup)


# ---- fep::settle_infer ----

@torch.library.custom_op("fep::settle_infer", mutates_args=())
def settle_infer_raw(weights: List[Tensor], biases: List[Tensor], bias_layers: List[int],
                     precision_tensors: List[Tensor], precision_layers: List[int], x0: Tensor,
                     init: List[Tensor], activations: List[int], alphas: List[float],
                     precisions: List[float], eta: float, steps: int, momentum: float,
                     tol: float, check: bool, log_det: bool, allow_tf32: bool
                     ) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """``fep::settle_infer``: (x, eps, energy) of ``SettleNet.infer`` (x_L free)."""
    _check_net(weights, biases, bias_layers, precision_tensors, precision_layers, x0,
               _NO_TARGET, init, activations, alphas, precisions)
    net = _net(weights, biases, bias_layers, precision_tensors, precision_layers, activations,
               alphas, precisions)
    res = net.infer(x0.contiguous(), eta, steps, momentum=momentum, tol=tol,
                    init=[t.contiguous() for t in init] if init else None, check=check,
                    log_det=log_det, allow_tf32=allow_tf32)
    return res["x"], res["eps"], res["energy"]


@settle_infer_raw.register_fake
def _(weights, biases, bias_layers, precision_tensors, precision_layers, x0, init, activations,
      alphas, precisions, eta, steps, momentum, tol, check, log_det, allow_tf32):
    batch = _check_net(weights, biases, bias_layers, precision_tensors, precision_layers, x0,
                       _NO_TARGET, init, activations, alphas, precisions)
    f32 = dict(dtype=torch.float32)
    x = [x0.new_empty((batch, w.shape[0]), **f32) for w in weights]
    eps = [x0.new_empty((batch, w.shape[0]), **f32) for w in weights]
    return x, eps, x0.new_empty((batch,), **f32)


_not_differentiable(settle_infer_raw, "fep::settle_infer",
                    "use fep_kernels.settle_energy to differentiate the settled energy w.r.t. "
                    "the weights and precisions (call settle_infer under torch.no_grad() or on "
                    "detached tensors)")


# ---- the Python API ----

def _op_args(weights, biases, activations, precisions, eta, steps, momentum, tol, init,
             log_det, allow_tf32):
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
    ptensors, players, scalars = [], [], []
    for l, p in enumerate(precisions):
        if isinstance(p, Tensor):
            _tensor(p, f"precisions[{l}]", dtypes=_F32)
            if p.dim() > 2:
                raise ValueError(f"precisions[{l}]: expected a 0-d (scalar), [n_l] (diagonal) or "
                                 f"[B, n_l] (per-sample) tensor, got shape {list(p.shape)}")
            if p.dim() == 0:
                # A scalar tensor as a diagonal of equal entries: its gradient (autograd of the
                # expand) is the sum over units, dF/dpi of a scalar precision.
                _tensor(weights[l], f"weights[{l}]", dim=2)
                p = p.reshape(1).expand(weights[l].shape[0])
            ptensors.append(p)
            players.append(l)
            scalars.append(1.0)
        else:
            scalars.append(_number(p, f"precisions[{l}]"))
    for v, name in ((log_det, "log_det"), (allow_tf32, "allow_tf32"), ):
        if not isinstance(v, bool):
            raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    if init is None:
        init = []
    if isinstance(init, Tensor) or not isinstance(init, (list, tuple)):
        raise TypeError(f"init: expected None or a list of tensors, got {type(init).__name__}")
    init = list(init)
    for l, t in enumerate(init):
        _tensor(t, f"init[{l}]")
    return (weights, biases, bias_layers, ptensors, players, [c for c, _ in acts],
            [a for _, a in acts], scalars), init, (
        _number(eta, "eta"), _steps(steps), _number(momentum, "momentum"), _number(tol, "tol"))


def _call_args(net, x0, target, init, settle, check, log_det, allow_tf32):
    """The op's positional arguments from _op_args' parts (target _NO_TARGET: settle_infer)."""
    w, b, bl, pt, pl, acts, alphas, scalars = net
    data = (x0, init) if target is _NO_TARGET else (x0, target, init)
    return (w, b, bl, pt, pl, *data, acts, alphas, scalars, *settle, bool(check), log_det,
            allow_tf32)


def settle_energy(weights: Sequence[Tensor], x0: Tensor, target: Tensor,
                  biases: Optional[Sequence[Optional[Tensor]]] = None,
                  activations: Any = "identity", precisions: Any = None, *, eta: float,
                  steps: int, momentum: float = 0.0, tol: float = 0.0, check: bool = True,
                  log_det: bool = False, allow_tf32: bool = False,
                  init: Optional[Sequence[Tensor]] = None) -> Tensor:
    """The settled energy of a learning step, averaged over the batch: a 0-d float32 tensor,
    differentiable w.r.t. ``weights``, ``biases`` and precision tensors (``fep::settle_energy``).

    Args:
        weights: W_l [n_l, n_{l-1}], float32, float16 or bfloat16, one per layer.
        x0: [B, n_0] float32 input (clamped).
        target: [B, n_L] float32 (x_L is clamped to it).
        biases: None, or a tensor or None per layer.
        activations: one activation for every layer or one per layer (see
            :class:`fep_kernels.SettleNet`).
        precisions: None (all 1), a number, or per layer a number, or a float32 tensor of
            shape [] (a scalar), [n_l] (a diagonal) or [B, n_l] (one diagonal per sample).
            Tensors receive gradients (``requires_grad``); keep them positive, e.g. by passing
            ``log_pi.exp()`` of a parameter ``log_pi``.
        eta, steps, momentum, tol, check, allow_tf32: as for :meth:`fep_kernels.SettleNet.infer`.
        log_det: return the free energy ``F = E - 1/2 sum_l ln|Pi_l|`` (batch mean). Needed to
            learn precisions: without it the energy falls as the precisions fall, and a learned
            precision runs to 0.
        init: None (free layers start at the feedforward prediction) or x_1 ... x_{L-1}
            [B, n_l] float32 to start from.

    Backward (the envelope theorem): ``W_l.grad += grad_output * grad_w[l]``,
    ``b_l.grad += grad_output * grad_b[l]`` and ``pi_l.grad += grad_output * grad_pi[l]``,
    exactly what ``SettleNet.learn(..., lr=0)`` returns (float32, cast to the parameters'
    dtype). The settled free layers x* minimise E(x, theta), so
    dE(x*(theta), theta)/dtheta = dE/dtheta at x*, the library's formulas with x* held fixed.
    This is exact only as far as settling converged (enough ``steps``, small enough ``eta``).
    For a precision the gradient is that of the value returned: with ``log_det=True`` that of
    F, ``(1/B) sum_b 1/2 (eps^2 - 1/pi)`` per unit (``grad_pi``); with ``log_det=False`` that
    of E, ``(1/B) sum_b 1/2 eps^2`` (which would drive a learned precision to 0).
    ``x0``, ``target`` and ``init`` get no gradient.

    Raises:
        DivergedError: the settling diverged (a non-finite energy; ``eta`` too large).
        ValueError, TypeError: bad arguments, before the library is called.

    Example::

        import torch
        import fep_kernels as fk

        w = [torch.nn.Parameter(0.3 * torch.randn(16, 8)),
             torch.nn.Parameter(0.3 * torch.randn(4, 16))]
        log_pi = torch.nn.Parameter(torch.zeros(4))
        e = fk.settle_energy(w, torch.randn(32, 8), torch.randn(32, 4), activations="tanh",
                             precisions=[1.0, log_pi.exp()], log_det=True, eta=0.1, steps=50)
        e.backward()                     # w[0].grad, w[1].grad, log_pi.grad
    """
    net, init, settle = _op_args(weights, biases, activations, precisions, eta, steps, momentum,
                                 tol, init, log_det, allow_tf32)
    args = _call_args(net, x0, target, init, settle, check, log_det, allow_tf32)
    _check_net(*args[:11])
    energy, _, _, _ = torch.ops.fep.settle_energy(*args)
    return energy


def settle_learn_op(weights: Sequence[Tensor], x0: Tensor, target: Tensor,
                    biases: Optional[Sequence[Optional[Tensor]]] = None,
                    activations: Any = "identity", precisions: Any = None, *, eta: float,
                    steps: int, momentum: float = 0.0, tol: float = 0.0, check: bool = True,
                    log_det: bool = False, allow_tf32: bool = False,
                    init: Optional[Sequence[Tensor]] = None
                    ) -> Tuple[Tensor, List[Tensor], List[Tensor], List[Tensor]]:
    """``fep::settle_learn``: ``(energy [B], grad_w, grad_b, grad_pi)`` of
    ``SettleNet.learn(lr=0)`` (float32; grad_w and grad_b one per layer, a layer without a bias
    getting its bias gradient too; grad_pi one per precision tensor, in layer order). Not
    differentiable (backward raises): use :func:`settle_energy`. Arguments as for it."""
    net, init, settle = _op_args(weights, biases, activations, precisions, eta, steps, momentum,
                                 tol, init, log_det, allow_tf32)
    args = _call_args(net, x0, target, init, settle, check, log_det, allow_tf32)
    _check_net(*args[:11])
    return torch.ops.fep.settle_learn(*args)


def settle_infer_op(weights: Sequence[Tensor], x0: Tensor,
                    biases: Optional[Sequence[Optional[Tensor]]] = None,
                    activations: Any = "identity", precisions: Any = None, *, eta: float,
                    steps: int, momentum: float = 0.0, tol: float = 0.0, check: bool = True,
                    log_det: bool = False, allow_tf32: bool = False,
                    init: Optional[Sequence[Tensor]] = None
                    ) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """``fep::settle_infer``: settles ``x0`` with x_L free and returns ``(x, eps, energy)``:
    the settled x_1 ... x_L and their errors (lists of L float32 [B, n_l]) and the settled
    energy [B] (``SettleNet.infer``'s "x", "eps", "energy"). ``init``: None (feedforward
    start, where a free top gives energy 0) or x_1 ... x_L to start from. Raises
    :class:`fep_kernels.DivergedError` when the settling diverges. Not differentiable (backward
    raises a RuntimeError). Other arguments as for :func:`settle_energy`."""
    net, init, settle = _op_args(weights, biases, activations, precisions, eta, steps, momentum,
                                 tol, init, log_det, allow_tf32)
    args = _call_args(net, x0, _NO_TARGET, init, settle, check, log_det, allow_tf32)
    _check_net(*args[:6], _NO_TARGET, *args[6:10])
    return torch.ops.fep.settle_infer(*args)
