"""A predictive-coding network as a PyTorch module: :class:`PCNetwork`.

The model (a hierarchical Gaussian generative model, one layer per weight matrix): layers
x_0 ... x_L with widths n_0 ... n_L and a batch of B samples. Layer l >= 1 is predicted from the
layer below,

    mu_l = W_l f_l(x_{l-1}) + b_l,        eps_l = x_l - mu_l,

and the network's free energy per sample is

    F = 1/2 sum_{l=1..L} ( eps_l^T Pi_l eps_l  -  ln|Pi_l| )

with Pi_l the precision (inverse variance) of layer l's prediction errors: a fixed number, a
learned scalar, or a learned diagonal [n_l]. The ln|Pi_l| term is the Gaussian's normaliser
and keeps a learned precision from running to 0; ``log_det`` chooses whether the value
returned (and so its precision gradients) includes it.

*Settling* (inference) holds x_0 at the input and moves the free layers down the gradient of F,
``x_l <- x_l - eta v_l`` with ``v_l <- momentum v_l + dF/dx_l`` for ``steps`` steps (or fewer,
see ``tol``), starting from the feedforward prediction x_l = mu_l. For *learning* the top layer
x_L is also clamped, to the target. At the settled state the gradients of F w.r.t. the weights,
biases and precisions are local (envelope theorem: dF/dx = 0 there, so the state's dependence on
the parameters drops out):

    dF/dW_l = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T,    dF/db_l = -(1/B) sum_b Pi_l eps_l,
    dF/dpi_{l,i} = (1/B) sum_b 1/2 (eps_{l,i}^2 - 1/pi_{l,i})   (a scalar precision: summed
                                                                  over the units i),

and :meth:`PCNetwork.energy` returns the settled F (batch mean) as a differentiable tensor whose
``backward()`` delivers exactly these gradients, so any ``torch.optim`` optimiser trains the
weights, biases and precisions. The fused settling runs in the fep-kernels library (CPU or
CUDA tensors).
"""

import math
import numbers
from typing import Any, Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .. import settle as _ts
from ..._abi import _ACTIVATIONS

__all__ = ["PCNetwork", "PCState"]

# One activation: a name, or ("leaky_relu", slope).
Activation = Union[str, Tuple[str, float]]
# One layer's precision: None (fixed 1), a positive number (fixed), "scalar" or "diagonal"
# (learned).
PrecisionSpec = Union[None, float, str]

_KINDS = ("scalar", "diagonal")


class PCState(NamedTuple):
    """The settled state of :meth:`PCNetwork.infer` (all float32, on the network's device).

    ``x``: the settled layers x_1 ... x_L, a list of L tensors [B, n_l] (``x[-1]`` is the
    prediction); ``eps``: their prediction errors eps_l = x_l - mu_l, the same shapes;
    ``energy``: the settled energy per sample [B]."""

    x: List[Tensor]
    eps: List[Tensor]
    energy: Tensor


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _positive(v: Any, what: str, allow_zero: bool = False) -> float:
    if not _is_number(v):
        raise TypeError(f"{what}: expected a number, got {type(v).__name__} {v!r}")
    v = float(v)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{what}: expected a finite number {'>= 0' if allow_zero else '> 0'}, "
                         f"got {v}")
    return v


def _activation(a: Any, what: str) -> Activation:
    if isinstance(a, str):
        if a not in _ACTIVATIONS:
            raise ValueError(f"{what}: {a!r} is not one of {list(_ACTIVATIONS)}")
        return a
    if isinstance(a, (tuple, list)) and len(a) == 2 and a[0] == "leaky_relu":
        if not _is_number(a[1]):
            raise TypeError(f"{what}: the leaky_relu slope must be a number, got {a[1]!r}")
        return ("leaky_relu", float(a[1]))
    raise ValueError(f"{what}: expected one of {list(_ACTIVATIONS)} or ('leaky_relu', slope), "
                     f"got {a!r}")


def _one_activation(a: Any) -> bool:
    return isinstance(a, str) or (isinstance(a, tuple) and len(a) == 2 and a[0] == "leaky_relu"
                                  and _is_number(a[1]))


def _per_layer(value: Any, what: str, depth: int, one: Callable[[Any], bool]) -> list:
    if one(value):
        return [value] * depth
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{what}: expected one value or a list of {depth} (one per layer), got "
                        f"{type(value).__name__}")
    if len(value) != depth:
        raise ValueError(f"{what}: expected {depth} entries (one per layer), got {len(value)}")
    return list(value)


class PCNetwork(nn.Module):
    """A predictive-coding network that can learn the precision of its prediction errors.

    Layers x_0 (input) ... x_L (output), widths ``widths = [n_0, ..., n_L]``. Layer l predicts
    ``mu_l = W_l f_l(x_{l-1}) + b_l`` (note: f_l applies to the layer *below*, so with
    ``activations=["identity", "tanh", "tanh"]`` the prediction of the top layer from the input is
    the usual tanh MLP with a linear output) and carries the error ``eps_l = x_l - mu_l`` with
    precision Pi_l. The free energy per sample is ``F = 1/2 sum_l (eps_l^T Pi_l eps_l -
    ln|Pi_l|)`` (the ln|Pi_l| term only with ``log_det``); settling minimises it over the free
    layers by (momentum) gradient descent, and learning minimises the settled F over the
    parameters.

    Parameters (all registered, so ``parameters()``, ``state_dict()`` and ``.to()`` see them):

    - ``weights[l]``: W_{l+1} [n_{l+1}, n_l] for l = 0 ... L-1, initialised like
      ``torch.nn.Linear``: uniform on [-1/sqrt(n_l), 1/sqrt(n_l)];
    - ``biases[str(l)]``: b_{l+1} [n_{l+1}] for the layers with a bias (``bias``), the same
      initialisation;
    - ``log_precisions[str(l)]``: ln pi_{l+1} for the layers with a learned precision, shape
      [] ("scalar") or [n_{l+1}] ("diagonal"), float32, initialised to ln ``init_precision``.
      The precision is pi = exp(log_pi), so it stays positive under any optimiser step, and
      the gradient an optimiser sees is dF/dlog_pi = pi dF/dpi.

    Args:
        widths: [n_0, ..., n_L], at least two positive ints.
        activations: f_1 ... f_L, one for every layer or a list of L: "identity", "tanh",
            "relu", "leaky_relu" (slope 0.01), ("leaky_relu", slope), "sigmoid", "gelu".
        bias: whether the layers have a bias: one bool, or a list of L.
        precision: the precision of each layer's errors, one for every layer or a list of L:
            None (fixed 1), a positive number (fixed), "scalar" (one learned pi for the layer)
            or "diagonal" (a learned pi per unit).
        init_precision: the initial pi of the learned precisions (one number, or a list of L;
            ignored for fixed layers).
        eta: the settling step size (> 0). Settling is gradient descent on F, whose curvature
            grows with the precisions: keep eta * max(pi) well below 1 (with learned
            precisions, lower ``net.eta`` between steps as they grow; it is a plain
            attribute). A diverging settle raises ``fep_kernels.DivergedError``.
        steps: settling steps per call (>= 1).
        momentum: the settling momentum in [0, 1).
        tol: 0 runs exactly ``steps`` steps; > 0 stops a sample early once its relative
            energy change per step falls below ``tol``.
        log_det: whether the value :meth:`energy` returns includes -1/2 sum_l ln|Pi_l| (the
            free energy F) or not (the energy E = 1/2 sum_l eps_l^T Pi_l eps_l); gradients are
            those of the value returned (E alone would drive a learned precision to 0). None
            (the default): True when some precision is learned, else False.
        allow_tf32: on NVIDIA GPUs, let the settling products run as single-pass TF32
            (faster; TF32 rounds the factors to a 10-bit mantissa); False (the default) keeps
            them float32-accurate. No effect on the CPU.
        check: reject non-finite inputs and parameters before settling (on a GPU this reads a
            few values back, so the call waits for the stream).
        device, dtype: where the parameters live and the weights' and biases' dtype (float32,
            float16 or bfloat16; learned precisions are always float32). Inputs and targets are
            float32 on the same device.

    Settled states are float32; inputs ``x0`` are [B, n_0] and targets [B, n_L], float32.

    What a learned precision converges to: dF/dpi_{l,i} = 0 at pi_{l,i} = 1 / mean_b
    eps_{l,i}^2, the inverse mean squared error of unit i *at the settled state*. With the
    output clamped, the free layers below move to absorb part of the output error, so the
    settled output errors are smaller than the errors of the prediction with x_L free, the more
    so the lower the hidden layers' precisions and the higher the output's. Without free layers
    (one weight matrix) the learned output precision is the inverse residual variance of the
    fit, e.g. the inverse noise variance of the targets. With free layers that can explain the
    output exactly, the settled F has no minimum in the output precision (eps_L -> 0 while
    -1/2 ln pi_L -> -inf as pi_L grows): stiff hidden layers (fixed high precision) slow that
    drift, a small learning rate for the log-precisions keeps it in check.

    Example::

        import torch
        from fep_kernels.nn import PCNetwork

        torch.manual_seed(0)
        net = PCNetwork([8, 32, 4], activations=["identity", "tanh"], precision="diagonal",
                        eta=0.1, steps=30)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        x0 = torch.randn(64, 8)
        y = torch.randn(64, 4) * torch.tensor([0.1, 0.3, 1.0, 2.0])   # per-unit noise
        for _ in range(200):
            f = net.learn_step(x0, y, opt)     # settle, F.backward(), opt.step()
        print(f.item())                        # the settled free energy (batch mean)
        print(net.precisions()[-1])            # learned output precisions: larger where y is
                                               # less noisy
        pred = net(x0)                         # the settled top layer with x_L free [64, 4]
    """

    def __init__(self, widths: Sequence[int],
                 activations: Union[Activation, Sequence[Activation]] = "tanh",
                 bias: Union[bool, Sequence[bool]] = True,
                 precision: Union[PrecisionSpec, Sequence[PrecisionSpec]] = None,
                 init_precision: Union[float, Sequence[float]] = 1.0, *,
                 eta: float = 0.1, steps: int = 20, momentum: float = 0.0, tol: float = 0.0,
                 log_det: Optional[bool] = None, allow_tf32: bool = False, check: bool = True,
                 device: Optional[Union[str, torch.device]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if not isinstance(widths, (list, tuple)) or len(widths) < 2:
            raise ValueError(f"widths: expected a list [n_0, ..., n_L] of at least 2 ints, got "
                             f"{widths!r}")
        for i, n in enumerate(widths):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise TypeError(f"widths[{i}]: expected an int, got {type(n).__name__} {n!r}")
            if n < 1:
                raise ValueError(f"widths[{i}]: expected a width >= 1, got {n}")
        self.widths: List[int] = [int(n) for n in widths]
        L = len(widths) - 1
        self.depth: int = L
        acts = _per_layer(activations, "activations", L, _one_activation)
        self.activations: List[Activation] = [_activation(a, f"activations[{l}]")
                                              for l, a in enumerate(acts)]
        bias = _per_layer(bias, "bias", L, lambda b: isinstance(b, bool))
        for l, b in enumerate(bias):
            if not isinstance(b, bool):
                raise TypeError(f"bias[{l}]: expected a bool, got {type(b).__name__}")
        specs = _per_layer(precision, "precision", L,
                           lambda p: p is None or isinstance(p, str) or _is_number(p))
        inits = _per_layer(init_precision, "init_precision", L, _is_number)
        self._fixed: List[Optional[float]] = []
        self._kinds: List[Optional[str]] = []
        for l, p in enumerate(specs):
            if p is None:
                self._fixed.append(1.0)
                self._kinds.append(None)
            elif isinstance(p, str):
                if p not in _KINDS:
                    raise ValueError(f"precision[{l}]: {p!r} is not None, a number, 'scalar' or "
                                     "'diagonal'")
                self._fixed.append(None)
                self._kinds.append(p)
            elif _is_number(p):
                self._fixed.append(_positive(p, f"precision[{l}]"))
                self._kinds.append(None)
            else:
                raise TypeError(f"precision[{l}]: expected None, a number, 'scalar' or "
                                f"'diagonal', got {type(p).__name__}")
        inits = [_positive(v, f"init_precision[{l}]") for l, v in enumerate(inits)]
        if dtype is not None and dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: {dtype} is not supported (float32, float16 or bfloat16)")
        factory = dict(device=device, dtype=dtype if dtype is not None else torch.float32)

        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(m, n, **factory)) for n, m in zip(widths[:-1], widths[1:])])
        self.biases = nn.ParameterDict(
            {str(l): nn.Parameter(torch.empty(widths[l + 1], **factory))
             for l in range(L) if bias[l]})
        self.log_precisions = nn.ParameterDict(
            {str(l): nn.Parameter(torch.full((widths[l + 1],) if k == "diagonal" else (),
                                             math.log(inits[l]), device=device,
                                             dtype=torch.float32))
             for l, k in enumerate(self._kinds) if k is not None})
        self._bias_layers: Tuple[bool, ...] = tuple(bias)

        self.eta: float = _positive(eta, "eta")
        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral):
            raise TypeError(f"steps: expected an int, got {type(steps).__name__} {steps!r}")
        if steps < 1:
            raise ValueError(f"steps: expected an int >= 1, got {steps}")
        self.steps: int = int(steps)
        self.momentum: float = _positive(momentum, "momentum", allow_zero=True)
        if self.momentum >= 1:
            raise ValueError(f"momentum: expected a number in [0, 1), got {momentum}")
        self.tol: float = _positive(tol, "tol", allow_zero=True)
        learned = any(k is not None for k in self._kinds)
        if log_det is not None and not isinstance(log_det, bool):
            raise TypeError(f"log_det: expected None or a bool, got {type(log_det).__name__}")
        self.log_det: bool = learned if log_det is None else log_det
        if not isinstance(allow_tf32, bool):
            raise TypeError(f"allow_tf32: expected a bool, got {type(allow_tf32).__name__}")
        self.allow_tf32: bool = allow_tf32
        self.check: bool = bool(check)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-initialises the weights and biases like ``torch.nn.Linear`` (uniform on
        [-1/sqrt(fan_in), 1/sqrt(fan_in)], fan_in = n_{l-1}); learned precisions are left as
        they are."""
        with torch.no_grad():
            for l, w in enumerate(self.weights):
                bound = 1.0 / math.sqrt(w.shape[1])
                w.uniform_(-bound, bound)
                if str(l) in self.biases:
                    self.biases[str(l)].uniform_(-bound, bound)

    def extra_repr(self) -> str:
        kinds = [k if k is not None else f
                 for k, f in zip(self._kinds, self._fixed)]
        return (f"widths={self.widths}, activations={self.activations}, precision={kinds}, "
                f"eta={self.eta}, steps={self.steps}, momentum={self.momentum}, tol={self.tol}, "
                f"log_det={self.log_det}, allow_tf32={self.allow_tf32}")

    # ---- the settling arguments ----

    def _bias_list(self, detach: bool) -> List[Optional[Tensor]]:
        out: List[Optional[Tensor]] = []
        for l in range(self.depth):
            if self._bias_layers[l]:
                b = self.biases[str(l)]
                out.append(b.detach() if detach else b)
            else:
                out.append(None)
        return out

    def _precision_list(self, detach: bool) -> List[Union[float, Tensor]]:
        out: List[Union[float, Tensor]] = []
        for l in range(self.depth):
            fixed = self._fixed[l]
            if fixed is not None:
                out.append(fixed)
            else:
                lp = self.log_precisions[str(l)]
                pi = torch.exp(lp.float())
                out.append(pi.detach() if detach else pi)
        return out

    def _options(self, init: Optional[Sequence[Tensor]]) -> dict:
        """The settling keywords of this network and call."""
        if init is not None and not isinstance(init, (list, tuple)):
            raise TypeError(f"init: expected None or a list of tensors (one per free "
                            f"layer), got {type(init).__name__}")
        return dict(log_det=self.log_det, allow_tf32=self.allow_tf32,
                    init=None if init is None else list(init))

    def _check_input(self, x0: Any, what: str, width: int) -> None:
        if not isinstance(x0, Tensor):
            raise TypeError(f"{what}: expected a torch.Tensor, got {type(x0).__name__}")
        if x0.dim() != 2 or x0.shape[1] != width:
            raise ValueError(f"{what}: expected shape [B, {width}], got {list(x0.shape)}")

    # ---- the public API ----

    def precisions(self) -> List[Tensor]:
        """The current precision pi_l of every layer l = 1 ... L (detached float32 tensors on
        the parameters' device): shape [] for a fixed or "scalar" layer, [n_l] for a "diagonal"
        one."""
        dev = self.weights[0].device
        return [torch.tensor(p, dtype=torch.float32, device=dev) if isinstance(p, float) else p
                for p in self._precision_list(detach=True)]

    def max_stable_eta(self, clamped: bool = True) -> float:
        """The largest settling step size that is certain to be stable near a settled state,
        for the current weights and precisions and this network's ``momentum``.

        Settling is gradient descent with heavy-ball momentum beta on F, stable while
        eta < 2 (1 + beta) / lambda_max of F's curvature in the free layers; near a settled
        state that curvature is at most sum_l max(pi_l) (a_l + c_l ||W_l||_2 b_l)^2 (a_l = 1 when
        x_l is free, b_l = 1 when x_{l-1} is free, c_l the largest slope of f_l), so the value
        is a sufficient bound: larger steps may still converge. ``clamped``: the top layer
        clamped (learning, :meth:`energy`) or free (inference, :meth:`infer`; a smaller bound).
        Use it to keep ``eta`` stable while precisions are learned, e.g.
        ``net.eta = 0.5 * net.max_stable_eta()`` between steps. Weights on a GPU are copied
        back (the call waits)."""
        from ... import settle as _settle

        if not isinstance(clamped, bool):
            raise TypeError(f"clamped: expected a bool, got {type(clamped).__name__}")
        pis = [p if isinstance(p, float) else (p if p.dim() else float(p))
               for p in self._precision_list(detach=True)]
        return _settle.max_stable_eta([w.detach().float().contiguous() for w in self.weights],
                                      [None if b is None else b.detach().float().contiguous()
                                       for b in self._bias_list(True)],
                                      activations=self.activations, precisions=pis,
                                      momentum=self.momentum, clamped=clamped)

    def energy(self, x0: Tensor, target: Tensor,
               init: Optional[Sequence[Tensor]] = None) -> Tensor:
        """The settled free energy of a learning step: a 0-d float32 tensor, differentiable
        w.r.t. every parameter.

        Settles the free layers x_1 ... x_{L-1} with x_0 clamped to ``x0`` [B, n_0] and x_L to
        ``target`` [B, n_L] (float32, on the parameters' device) and returns F at the settled
        state, averaged over the batch (F = 1/2 sum_l (eps_l^T Pi_l eps_l - ln|Pi_l|); without
        ``log_det`` the ln|Pi_l| term is left out). ``init``: None (start at the feedforward
        prediction) or one start state [B, n_l] float32 per free layer, x_1 ... x_{L-1}.

        ``backward()`` gives every weight, bias and log-precision its gradient of the value
        returned, taken at the settled state (see the module's docstring for the formulas):
        exact gradients of that value as far as settling converged. Raises ``fep_kernels.DivergedError``
        when settling diverges (lower ``eta``); ``ValueError``/``TypeError`` naming the argument
        for a bad input."""
        self._check_input(x0, "x0", self.widths[0])
        self._check_input(target, "target", self.widths[-1])
        return _ts.settle_energy(list(self.weights), x0, target, biases=self._bias_list(False),
                                 activations=self.activations,
                                 precisions=self._precision_list(False), eta=self.eta,
                                 steps=self.steps, momentum=self.momentum, tol=self.tol,
                                 check=self.check, **self._options(init))

    def infer(self, x0: Tensor, init: Optional[Sequence[Tensor]] = None) -> PCState:
        """Settles ``x0`` [B, n_0] (float32) with the top layer free and returns the settled
        :class:`PCState` ``(x, eps, energy)``: x_1 ... x_L, their errors, and the energy per
        sample [B]. ``init``: None (start at the feedforward prediction, where every error is
        0 when no layer is clamped) or one start state [B, n_l] float32 per free layer.

        Not differentiable (the outputs do not require grad); use :meth:`energy` to train.
        Raises ``fep_kernels.DivergedError`` when settling diverges."""
        self._check_input(x0, "x0", self.widths[0])
        x, eps, energy = _ts.settle_infer_op(
            [w.detach() for w in self.weights], x0, biases=self._bias_list(True),
            activations=self.activations, precisions=self._precision_list(True), eta=self.eta,
            steps=self.steps, momentum=self.momentum, tol=self.tol, check=self.check,
            **self._options(init))
        return PCState(list(x), list(eps), energy)

    def forward(self, x0: Tensor) -> Tensor:
        """The prediction for ``x0`` [B, n_0]: the settled top layer x_L [B, n_L] (float32) of
        :meth:`infer`."""
        return self.infer(x0).x[-1]

    def learn_step(self, x0: Tensor, target: Tensor,
                   optimizer: Optional[torch.optim.Optimizer] = None, *,
                   lr: Optional[float] = None,
                   init: Optional[Sequence[Tensor]] = None) -> Tensor:
        """One learning step on the batch (``x0`` [B, n_0], ``target`` [B, n_L]): zeroes the
        gradients, computes :meth:`energy`, back-propagates it and applies either
        ``optimizer.step()`` or, with ``lr``, plain SGD ``p <- p - lr * p.grad`` on every
        parameter (exactly one of the two). Returns the settled free energy before the update
        (a detached 0-d tensor).

        When settling diverges, ``fep_kernels.DivergedError`` is raised before any parameter
        is changed."""
        if (optimizer is None) == (lr is None):
            raise TypeError("learn_step: give exactly one of optimizer and lr")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        if lr is not None:
            lr = _positive(lr, "lr")
        params = list(self.parameters())
        if optimizer is not None:
            optimizer.zero_grad()
        else:
            for p in params:
                p.grad = None
        f = self.energy(x0, target, init=init)
        f.backward()
        if optimizer is not None:
            optimizer.step()
        else:
            with torch.no_grad():
                for p in params:
                    if p.grad is not None:
                        p.add_(p.grad, alpha=-lr)
        return f.detach()
