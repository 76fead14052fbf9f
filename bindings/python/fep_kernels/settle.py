"""Predictive-coding settling over the caller's tensors: :class:`SettleNet`,
:func:`settle_infer`, :func:`settle_learn`.

A predictive-coding network has layers x_0 ... x_L; layer l predicts the one above it,
``mu_l = W_l f_l(x_{l-1}) + b_l``, with error ``eps_l = x_l - mu_l`` and precision Pi_l (a
scalar, a diagonal [n_l], or one diagonal per sample [B, n_l]). Settling descends the energy
``E = 1/2 sum_l eps_l^T Pi_l eps_l`` (per sample) in the free layers; with ``log_det=True`` the
energies reported are the free energy ``F = E - 1/2 sum_l ln|Pi_l|`` (the Gaussian's
normaliser, which is what makes a precision learnable). Learning then uses the gradients at the
settled state (the envelope theorem): ``dF/dW_l = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T`` and
``dF/dpi_l = (1/B) sum_b 1/2 (eps_l^2 - 1/pi_l)`` per unit (summed over units for a scalar).
"""

import ctypes
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from ._abi import (
    DivergedError,
    FEP_ERR_DIVERGED,
    FEP_SETTLE_INIT_FEEDFORWARD,
    FEP_SETTLE_INIT_GIVEN,
    _ACTIVATIONS,
    _FepSettleNet,
    _FepSettleParams,
    _LEAKY_DEFAULT,
)
from ._lib import (
    _check,
    _get,
)
from ._tensors import (
    _check_tensor,
    _checked_ptr,
    _device_of,
    _dtype_code,
    _integer,
    _norm_device,
    _number,
    _ptr,
    _torch,
)


def _activation(a, what):
    """(FEP_ACT_* code, leaky slope) from "tanh", "leaky_relu" or ("leaky_relu", alpha)."""
    if isinstance(a, str):
        name, alpha = a, None
    elif isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str):
        name, alpha = a
        if name != "leaky_relu":
            raise ValueError(f"{what}: only 'leaky_relu' takes a parameter, got {a!r}")
        alpha = _number(alpha, f"{what} (leaky_relu slope)")
    else:
        raise ValueError(
            f"{what}: expected one of {list(_ACTIVATIONS)} or ('leaky_relu', alpha), got {a!r}"
        )
    if name not in _ACTIVATIONS:
        raise ValueError(f"{what}: {name!r} is not one of {list(_ACTIVATIONS)}")
    if name == "leaky_relu" and alpha is None:
        alpha = _LEAKY_DEFAULT
    return _ACTIVATIONS[name], (alpha if alpha is not None else 0.0)


def _one_activation(a):
    """Whether ``a`` names one activation (to use for every layer) rather than a list of them."""
    return isinstance(a, str) or (
        isinstance(a, tuple) and len(a) == 2 and a[0] == "leaky_relu"
        and not isinstance(a[1], (str, tuple, list))
    )


def _steps_arg(steps: Any, what: str = "steps") -> int:
    """An int in [1, 2^32) (:func:`fep_kernels._tensors._integer`)."""
    return _integer(steps, what)


def _per_layer(value: Any, what: str, depth: int, default: Any = None, one: Any = None) -> list:
    """A list of ``depth`` entries from ``value``: None gives ``default`` for every layer, a
    single entry (``one(value)`` true) that entry for every layer, else the entries of a
    list/tuple (ValueError unless there are ``depth``)."""
    if value is None:
        value = default
    if one is not None and one(value):
        return [value] * depth
    try:
        value = list(value)
    except TypeError:
        raise ValueError(f"{what}: expected {depth} entries (one per layer), got "
                         f"{type(value).__name__}") from None
    if len(value) != depth:
        raise ValueError(f"{what}: expected {depth} entries (one per layer), got {len(value)}")
    return value


def _void_array(ptrs: Sequence[Any]) -> ctypes.Array:
    """A ``void *[]`` of ints, ``ctypes.c_void_p`` values or None (NULL)."""
    return (ctypes.c_void_p * len(ptrs))(*[p.value if isinstance(p, ctypes.c_void_p) else p
                                           for p in ptrs])


class SettleNet:
    """A predictive-coding network over the caller's tensors (the C ABI's ``FepSettleNet``).

    Layers x_0 ... x_L of widths n_0 ... n_L; layer l = 1 ... L predicts
    ``mu_l = W_l f_l(x_{l-1}) + b_l`` (the activation applies to the layer BELOW), with error
    ``eps_l = x_l - mu_l`` and energy ``E = 1/2 sum_l eps_l^T Pi_l eps_l`` per sample (with
    ``log_det=True``, the free energy ``F = E - 1/2 sum_l ln|Pi_l|``).

    Args:
        weights: L contiguous tensors W_l [n_l, n_{l-1}] (the layout of
            ``torch.nn.Linear.weight``), all float32, all float16 or all bfloat16, on one device
            (CPU or CUDA); the widths follow from their shapes.
        biases: None, or L entries each None (no bias) or a contiguous [n_l] tensor of the
            weights' dtype.
        activations: L entries (or one for every layer), each "identity", "tanh", "relu",
            "leaky_relu" (slope 0.01), ("leaky_relu", alpha), "sigmoid" or "gelu" (exact,
            x Phi(x)); entry l-1 is f_l.
        precisions: None (all 1), a number for every layer, or L entries each a number
            (Pi_l = p I), a contiguous float32 [n_l] tensor (Pi_l = diag(p)) or a contiguous
            float32 [B, n_l] tensor (one diagonal per sample; B must match each call's batch);
            all > 0 (checked by the library).

    Nothing is copied: the network keeps references to the tensors and passes their pointers on
    every call, so in-place changes (an optimiser step) are seen by the next call. Every call
    first re-validates ``weights``, ``biases``, ``activations`` and ``precisions`` as they are
    then (attributes that may be replaced, as may a tensor's storage through ``.data`` or
    ``set_``): a tensor whose shape, dtype, device or contiguity no longer fits the network
    raises ValueError naming it, e.g. "weights[1]: expected shape [2, 5], got [1]".
    :meth:`learn` with ``lr > 0`` updates the weights and biases in place (outside autograd);
    a settling that diverges raises :class:`DivergedError` and leaves them untouched.

    Example::

        import torch
        import fep_kernels as fk

        w1, w2 = 0.3 * torch.randn(16, 8), 0.3 * torch.randn(4, 16)
        pi2 = torch.ones(4)                                     # a learnable diagonal precision
        net = fk.SettleNet([w1, w2], activations="tanh", precisions=[1.0, pi2])
        x0, y = torch.randn(32, 8), torch.randn(32, 4)
        out = net.learn(x0, y, eta=0.1, steps=50, log_det=True, lr=0.05, lr_precision=0.05)
        print(out["energy"].mean(), out["grad_pi"][1])          # dF/dpi_2 per unit
    """

    def __init__(self, weights: Union[Any, Sequence[Any]], biases: Optional[Sequence[Any]] = None,
                 activations: Any = "identity", precisions: Any = None) -> None:
        torch = _torch()
        self._lib = _get()
        weights = list(weights) if not isinstance(weights, torch.Tensor) else [weights]
        if not weights:
            raise ValueError("weights: need at least one layer")
        _check_tensor(weights[0], "weights[0]", (None, None))
        device = _norm_device(weights[0].device)
        owner = "the device of weights[0]"
        _dtype_code(weights[0], "weights[0]")
        widths = [int(weights[0].shape[1])]
        for l, w in enumerate(weights):  # the widths follow from the shapes
            _check_tensor(w, f"weights[{l}]", (None, widths[-1]), device=device, owner=owner)
            if w.dtype != weights[0].dtype:
                raise ValueError(
                    f"weights[{l}]: dtype {w.dtype}, but weights[0] is {weights[0].dtype} "
                    "(all layers share one dtype)"
                )
            widths.append(int(w.shape[0]))
        L = len(weights)
        self.widths: List[int] = widths
        self.depth: int = L
        self.device = device
        self.dtype = weights[0].dtype
        self.kind, self.ordinal, _ = _device_of(weights[0], "weights[0]")
        self.weights = weights
        self.biases = _per_layer(biases, "biases", L, default=[None] * L)
        self.activations = _per_layer(activations, "activations", L, one=_one_activation)
        self.precisions = _per_layer(
            precisions, "precisions", L, default=1.0,
            one=lambda p: not isinstance(p, (list, tuple)))
        self._bind()  # every other check: the one every call repeats

    def __repr__(self) -> str:
        return (f"SettleNet(widths={self.widths}, activations={self.activations}, "
                f"dtype={self.dtype}, device={self.device})")

    def _bind(self) -> list:
        """Re-validates everything the network passes to the library and rebuilds its C
        description (``self._net``) from ``weights``, ``biases``, ``activations`` and
        ``precisions`` as they are now. Runs on every call: a tensor's storage, shape, dtype or
        device may have changed (``w.data = ...``, ``set_``, ``net.weights[l] = ...``), and a
        pointer is never passed for a tensor that no longer fits (ValueError naming it, e.g.
        "weights[1]: expected shape [2, 5], got [1]"). The widths, dtype and device are those
        the network was built with. Returns views of the tensors bound: holding them keeps
        the storages behind the pointers alive for the call, whatever ``.data`` becomes."""
        torch = _torch()
        L, n, dev = self.depth, self.widths, self.device
        own = dict(device=dev, owner="the network's device")
        weights = _per_layer(self.weights, "weights", L)
        biases = _per_layer(self.biases, "biases", L, default=[None] * L)
        activations = _per_layer(self.activations, "activations", L, one=_one_activation)
        precisions = _per_layer(self.precisions, "precisions", L, default=1.0,
                                one=lambda p: not isinstance(p, (list, tuple)))
        w_ptrs = [_checked_ptr(w, f"weights[{l}]", (n[l + 1], n[l]), dtype=self.dtype, **own)
                  for l, w in enumerate(weights)]
        b_ptrs = [None if b is None else
                  _checked_ptr(b, f"biases[{l}]", (n[l + 1],), dtype=self.dtype, **own)
                  for l, b in enumerate(biases)]
        acts = [_activation(a, f"activations[{l}]") for l, a in enumerate(activations)]
        scalars, d_ptrs, per_sample = [], [], []
        for l, p in enumerate(precisions):
            if isinstance(p, torch.Tensor) and p.dim() == 2:
                d_ptrs.append(_checked_ptr(p, f"precisions[{l}]", (None, n[l + 1]),
                                           dtype=torch.float32, **own))
                scalars.append(1.0)
                per_sample.append(int(p.shape[0]))
            elif isinstance(p, torch.Tensor) and p.dim() > 0:
                d_ptrs.append(_checked_ptr(p, f"precisions[{l}]", (n[l + 1],),
                                           dtype=torch.float32, **own))
                scalars.append(1.0)
                per_sample.append(0)
            else:
                d_ptrs.append(None)
                scalars.append(_number(p, f"precisions[{l}]"))
                per_sample.append(0)
        # The C description; its arrays are kept alive by this object until the next _bind.
        c = {
            "widths": (ctypes.c_uint64 * (L + 1))(*n),
            "acts": (ctypes.c_int32 * L)(*[code for code, _ in acts]),
            "alpha": (ctypes.c_float * L)(*[a for _, a in acts]),
            "weights": _void_array(w_ptrs),
            "biases": _void_array(b_ptrs),
            "precision": (ctypes.c_float * L)(*scalars),
            "diag": _void_array(d_ptrs),
            "per_sample": (ctypes.c_int32 * L)(*[int(b > 0) for b in per_sample]),
        }
        p_vp = ctypes.POINTER(ctypes.c_void_p)
        self._c = c
        self._per_sample = per_sample  # the batch of each per-sample precision, else 0
        self._scalar = [d is None for d in d_ptrs]
        self._net = _FepSettleNet(
            L, c["widths"], c["acts"], c["alpha"], _dtype_code(weights[0], "weights[0]"),
            ctypes.cast(c["weights"], p_vp), ctypes.cast(c["biases"], p_vp), c["precision"],
            ctypes.cast(c["diag"], p_vp), c["per_sample"],
        )
        return [t.detach() for t in (*weights, *biases, *precisions)
                if isinstance(t, torch.Tensor) and t.dim() > 0]

    def _check_batch(self, batch: int) -> None:
        """Per-sample precisions must have the call's batch."""
        for l, b in enumerate(self._per_sample):
            if b and b != batch:
                raise ValueError(f"precisions[{l}]: a per-sample precision of {b} rows, but x0 "
                                 f"has a batch of {batch}")

    def _names(self, batch: int, init: bool) -> Dict[str, Tuple[str, Optional[Sequence[int]]]]:
        """The library's names of this network's arguments -> (Python name, shape), for
        :func:`fep_kernels._lib._check`'s messages."""
        n, L = self.widths, self.depth
        names = {"x0": ("x0", (batch, n[0])), "target": ("target", (batch, n[L]))}
        for l in range(L):
            names[f"layers[{l}].weight"] = (f"weights[{l}]", (n[l + 1], n[l]))
            names[f"layers[{l}].bias"] = (f"biases[{l}]", (n[l + 1],))
            shape = (batch, n[l + 1]) if self._per_sample[l] else (n[l + 1],)
            names[f"layers[{l}].precision"] = (f"precisions[{l}]", shape)
            if init:
                names[f"x[{l}] (the start)"] = (f"init[{l}]", (batch, n[l + 1]))
        return names

    def _stream(self):
        if self.device.type == "cpu":
            return None
        s = _torch().cuda.current_stream(self.device).cuda_stream
        return ctypes.c_void_p(s) if s else None

    def _grad_pi_shape(self, batch: int, l: int) -> Tuple[int, ...]:
        """The shape of dF/dPi_l: [1] (scalar), [n_l] (diagonal) or [B, n_l] (per sample)."""
        n = self.widths[l + 1]
        if self._scalar[l]:
            return (1,)
        return (batch, n) if self._per_sample[l] else (n,)

    def _outputs(self, batch, steps, trace, learn, out):
        """The result dict: given tensors from ``out`` (checked) or new ones."""
        torch = _torch()
        out = dict(out or {})
        keys = {"x", "eps", "energy", "trace", "steps"}
        if learn:
            keys |= {"grad_w", "grad_b", "grad_pi"}
        unknown = set(out) - keys
        if unknown:
            raise ValueError(
                f"out: unknown keys {sorted(unknown)} (expected some of {sorted(keys)})"
            )
        if "trace" in out and not trace:
            raise ValueError("out: 'trace' needs trace=True")
        f32, dev, L, n = torch.float32, self.device, self.depth, self.widths
        specs = {
            "x": [((batch, n[l + 1]), f32) for l in range(L)],
            "eps": [((batch, n[l + 1]), f32) for l in range(L)],
            "energy": ((batch,), f32),
            "steps": ((batch,), torch.int32),
        }
        if trace:
            specs["trace"] = ((batch, steps + 1), f32)
        if learn:
            specs["grad_w"] = [((n[l + 1], n[l]), f32) for l in range(L)]
            specs["grad_b"] = [((n[l + 1],), f32) for l in range(L)]
            specs["grad_pi"] = [(self._grad_pi_shape(batch, l), f32) for l in range(L)]
        res = {"trace": None}
        for key, spec in specs.items():
            if isinstance(spec, list):
                given = out.get(key)
                if given is not None and len(given) != L:
                    raise ValueError(f"out[{key!r}]: expected {L} tensors, got {len(given)}")
                res[key] = []
                for l, (shape, dt) in enumerate(spec):
                    if given is not None:
                        _check_tensor(given[l], f"out[{key!r}][{l}]", shape, dtype=dt,
                                      device=dev, owner="the network's device")
                        res[key].append(given[l])
                    else:
                        res[key].append(torch.empty(shape, dtype=dt, device=dev))
            else:
                shape, dt = spec
                if key in out:
                    _check_tensor(out[key], f"out[{key!r}]", shape, dtype=dt, device=dev,
                                  owner="the network's device")
                    res[key] = out[key]
                else:
                    res[key] = torch.empty(shape, dtype=dt, device=dev)
        return res

    def _prepare(self, x0, eta, steps, momentum, tol, init, n_init, check, log_det, allow_tf32):
        torch = _torch()
        _check_tensor(x0, "x0", (None, self.widths[0]), dtype=torch.float32, device=self.device,
                      owner="the network's device")
        batch = int(x0.shape[0])
        self._check_batch(batch)
        steps = _steps_arg(steps)
        eta, momentum, tol = (_number(v, name) for v, name in
                              ((eta, "eta"), (momentum, "momentum"), (tol, "tol")))
        flags = []
        for v, name in ((log_det, "log_det"), (allow_tf32, "allow_tf32")):
            if not isinstance(v, bool):
                raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
            flags.append(int(v))
        if init is not None:
            init = list(init)
            if len(init) != n_init:
                raise ValueError(f"init: expected {n_init} tensors (x_1 ... x_{n_init}), "
                                 f"got {len(init)}")
            for l, t in enumerate(init):
                _check_tensor(t, f"init[{l}]", (batch, self.widths[l + 1]), dtype=torch.float32,
                              device=self.device, owner="the network's device")
        mode = FEP_SETTLE_INIT_GIVEN if init is not None else FEP_SETTLE_INIT_FEEDFORWARD
        params = _FepSettleParams(eta, momentum, steps, tol, mode, 0 if check else 1, *flags)
        return batch, steps, params, init

    @staticmethod
    def _diverged(res: dict, check: bool, eta: float) -> None:
        """With ``check``: DivergedError when a settled energy is not finite. The CPU reports
        divergence itself; on a GPU this reads the energies back (the call waits)."""
        torch = _torch()
        if check and not bool(torch.isfinite(res["energy"]).all()):
            bad = int((~torch.isfinite(res["energy"])).nonzero()[0, 0])
            raise DivergedError(FEP_ERR_DIVERGED, f"settling sample {bad} diverged (energy "
                                f"{float(res['energy'][bad])}) with eta = {eta}: lower eta")

    def infer(self, x0: Any, eta: float, steps: int, momentum: float = 0.0, tol: float = 0.0,
              init: Optional[Sequence[Any]] = None, trace: bool = False,
              out: Optional[dict] = None, check: bool = True, log_det: bool = False,
              allow_tf32: bool = False) -> dict:
        """Settles the batch ``x0`` ([B, n_0] float32) with x_L free (``fep_settle_infer``).

        Each step, every free layer moves down the energy gradient
        ``g_l = Pi_l eps_l - f'_{l+1}(x_l) * W_{l+1}^T (Pi_{l+1} eps_{l+1})`` with momentum:
        ``v <- momentum v + g; x <- x - eta v`` (all layers from the same step's errors).

        Args:
            x0: [B, n_0] float32 input (clamped).
            eta: step size > 0. Too large for the network's curvature diverges
                (:class:`DivergedError`); :func:`fep_kernels.max_stable_eta` gives a safe bound.
            steps: T >= 1.
            momentum: in [0, 1).
            tol: > 0 stops a sample once ``|E_t - E_{t-1}| <= tol E_{t-1}`` or
                ``E_t <= tol E_0`` (on the quadratic energy E); 0 runs exactly T steps.
            init: None (the free layers start at the feedforward prediction, where every error,
                and so the energy, is 0 with a free top), or L float32 tensors x_1 ... x_L
                [B, n_l] to start from (copied).
            trace: also return the energy at the start and after each step.
            out: optional dict of preallocated tensors with the keys, shapes and dtypes of the
                result ("x"/"eps" as lists); those given are written.
            check: reject NaN/Inf inputs, weights and biases and non-positive precisions first,
                and raise :class:`DivergedError` when the settled energy is not finite; on a GPU
                that reads back a few floats (the call waits for the stream). ``check=False``
                enqueues the work and returns at once.
            log_det: report the free energy F = E - 1/2 sum_l ln|Pi_l| instead of E.
            allow_tf32: allow single-pass TF32 tensor-core products for float32 weights on
                NVIDIA GPUs (about 1e-3 relative error per product). Default: float32-accurate
                products on every device.

        Returns:
            A dict of contiguous tensors on the network's device: "x" and "eps" (lists of L
            float32 [B, n_l]: the settled x_1 ... x_L and their errors), "energy" [B] (the
            settled energy), "steps" [B] int32 (steps run), and "trace" [B, T + 1] float32 with
            ``trace=True`` (a sample that stopped repeats its last value), else None.
        """
        keep = self._bind()  # noqa: F841  (the storages stay alive for the call)
        batch, steps, params, init = self._prepare(x0, eta, steps, momentum, tol, init,
                                                   self.depth, check, log_det, allow_tf32)
        res = self._outputs(batch, steps, trace, False, out)
        if init is not None:
            for dst, src in zip(res["x"], init):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
        x_out = _void_array([t.data_ptr() for t in res["x"]])
        eps_out = _void_array([t.data_ptr() for t in res["eps"]])
        _check(
            self._lib.fep_settle_infer(
                self.kind, self.ordinal, self._stream(), ctypes.byref(self._net),
                ctypes.byref(params), batch, _ptr(x0), x_out, eps_out, _ptr(res["energy"]),
                _ptr(res["trace"]), _ptr(res["steps"]),
            ),
            self._names(batch, init is not None),
        )
        self._diverged(res, check, params.eta)
        return res

    def learn(self, x0: Any, target: Any, eta: float, steps: int, momentum: float = 0.0, tol: float = 0.0,
              init: Optional[Sequence[Any]] = None, trace: bool = False, lr: float = 0.0,
              out: Optional[dict] = None, check: bool = True, log_det: bool = False,
              allow_tf32: bool = False, lr_precision: float = 0.0) -> dict:
        """One learning step (``fep_settle_learn``): settles ``x0`` ([B, n_0] float32) with x_L
        clamped to ``target`` ([B, n_L] float32), then computes the gradients at the settled
        state:

        - ``grad_w[l-1] = -(1/B) sum_b (Pi_l eps_l) f_l(x_{l-1})^T`` [n_l, n_{l-1}],
        - ``grad_b[l-1] = -(1/B) sum_b Pi_l eps_l`` [n_l] (a layer without bias gets it too),
        - ``grad_pi[l-1] = (1/B) sum_b 1/2 (eps_l^2 - 1/pi_l)``: the gradient of the free
          energy F w.r.t. the precision, [1] for a scalar (summed over units), [n_l] for a
          diagonal, [B, n_l] for a per-sample precision (not summed over the batch).

        ``lr`` > 0 then applies SGD in place, ``W_l -= lr grad_w``, ``b_l -= lr grad_b``
        (rounded once to the weights' dtype); ``lr_precision`` > 0 updates every tensor
        precision in log space, ``pi <- pi exp(-lr_precision pi grad_pi)`` (so it stays > 0;
        number precisions are not updated). Each update is all or nothing: one that would
        write a non-finite value writes nothing (:class:`DivergedError` on the CPU).

        Settling arguments as for :meth:`infer`; ``init``: None (feedforward start) or L - 1
        tensors x_1 ... x_{L-1}. Returns the dict of :meth:`infer` (``x[-1]`` is the target)
        plus "grad_w", "grad_b" and "grad_pi" (lists of L float32 tensors); ``out`` may hold
        those too.
        """
        torch = _torch()
        keep = self._bind()  # noqa: F841  (the storages stay alive for the call)
        batch, steps, params, init = self._prepare(x0, eta, steps, momentum, tol, init,
                                                   self.depth - 1, check, log_det, allow_tf32)
        _check_tensor(target, "target", (batch, self.widths[-1]), dtype=torch.float32,
                      device=self.device, owner="the network's device")
        lr = _number(lr, "lr")
        lr_precision = _number(lr_precision, "lr_precision")
        res = self._outputs(batch, steps, trace, True, out)
        if init is not None:
            for dst, src in zip(res["x"], init):
                if dst.data_ptr() != src.data_ptr():
                    dst.copy_(src)
        x_out = _void_array([t.data_ptr() for t in res["x"]])
        eps_out = _void_array([t.data_ptr() for t in res["eps"]])
        gw = _void_array([t.data_ptr() for t in res["grad_w"]])
        gb = _void_array([t.data_ptr() for t in res["grad_b"]])
        gp = _void_array([t.data_ptr() for t in res["grad_pi"]])
        _check(
            self._lib.fep_settle_learn(
                self.kind, self.ordinal, self._stream(), ctypes.byref(self._net),
                ctypes.byref(params), batch, _ptr(x0), _ptr(target), x_out, eps_out,
                _ptr(res["energy"]), _ptr(res["trace"]), _ptr(res["steps"]), gw, gb, gp, lr,
            ),
            self._names(batch, init is not None),
        )
        self._diverged(res, check, params.eta)
        if lr_precision > 0:
            self._sgd_log(res["grad_pi"], lr_precision)
        return res

    def max_stable_eta(self, momentum: float = 0.0, clamped: bool = True,
                       batch: Optional[int] = None) -> float:
        """The largest step size ``eta`` for which settling this network is certain to be
        stable near a settled state (``fep_settle_max_stable_eta``).

        Settling is gradient descent (with heavy-ball ``momentum``) on the energy, stable while
        ``eta < 2 (1 + momentum) / lambda_max`` of its curvature in the free layers. Near a
        settled state that curvature is at most ``sum_l max(Pi_l) (a_l + c_l ||W_l||_2 b_l)^2``
        (a_l = 1 when x_l is free, b_l = 1 when x_{l-1} is free, c_l the largest slope of
        f_l: 1 for identity/tanh/relu, 1/4 for the sigmoid, 1.13 for gelu), so the value
        returned is a sufficient bound: larger steps may still converge, smaller ones never
        diverge near the minimum. ``clamped``: x_L clamped (learning, the default) or free
        (inference, a smaller bound). ``batch``: the batch of per-sample precisions (default:
        their own). Weights on a GPU are copied back (the call waits).
        """
        self._bind()
        batch = batch if batch is not None else max([1, *self._per_sample])
        self._check_batch(_integer(batch, "batch"))
        if not isinstance(clamped, bool):
            raise TypeError(f"clamped: expected a bool, got {type(clamped).__name__}")
        out = ctypes.c_float()
        _check(self._lib.fep_settle_max_stable_eta(
            self.kind, self.ordinal, ctypes.byref(self._net), batch,
            _number(momentum, "momentum"), int(clamped), ctypes.byref(out)))
        return float(out.value)

    def _sgd_log(self, grad_pi: List[Any], lr: float) -> None:
        """pi <- pi exp(-lr pi grad) on every tensor precision, all or nothing
        (``fep_settle_sgd_log``)."""
        torch = _torch()
        precisions = _per_layer(self.precisions, "precisions", self.depth, default=1.0,
                                one=lambda p: not isinstance(p, (list, tuple)))
        layers = [l for l, p in enumerate(precisions)
                  if isinstance(p, torch.Tensor) and p.dim() > 0]
        if not layers:
            return
        pairs = [(precisions[l], grad_pi[l]) for l in layers]
        names = {f"params[{i}]": (f"precisions[{l}]", tuple(precisions[l].shape))
                 for i, l in enumerate(layers)}
        names.update({f"grads[{i}]": (f"grad_pi[{l}]", tuple(precisions[l].shape))
                      for i, l in enumerate(layers)})
        _check(
            self._lib.fep_settle_sgd_log(
                self.kind, self.ordinal, self._stream(), len(pairs),
                _void_array([p.data_ptr() for p, _ in pairs]),
                _void_array([g.data_ptr() for _, g in pairs]),
                (ctypes.c_uint64 * len(pairs))(*[p.numel() for p, _ in pairs]),
                lr, None,
            ),
            names,
        )


def settle_infer(weights: Sequence[Any], biases: Optional[Sequence[Any]], activations: Any,
                 precisions: Any, x0: Any, eta: float, steps: int,
                 momentum: float = 0.0, tol: float = 0.0, init: Optional[Sequence[Any]] = None,
                 trace: bool = False,
                 out: Optional[dict] = None, check: bool = True, log_det: bool = False,
                 allow_tf32: bool = False) -> dict:
    """``SettleNet(weights, biases, activations, precisions).infer(x0, ...)``: settles x0 with
    x_L free and returns the dict of :meth:`SettleNet.infer` ("x", "eps", "energy", "trace",
    "steps"). Build a :class:`SettleNet` once instead when calling repeatedly."""
    net = SettleNet(weights, biases, activations, precisions)
    return net.infer(x0, eta, steps, momentum=momentum, tol=tol, init=init, trace=trace, out=out,
                     check=check, log_det=log_det, allow_tf32=allow_tf32)


def settle_learn(weights: Sequence[Any], biases: Optional[Sequence[Any]], activations: Any,
                 precisions: Any, x0: Any, target: Any, eta: float, steps: int,
                 momentum: float = 0.0, tol: float = 0.0, init: Optional[Sequence[Any]] = None,
                 trace: bool = False,
                 lr: float = 0.0, out: Optional[dict] = None, check: bool = True,
                 log_det: bool = False, allow_tf32: bool = False,
                 lr_precision: float = 0.0) -> dict:
    """``SettleNet(weights, biases, activations, precisions).learn(x0, target, ...)``: one
    learning step; returns the dict of :meth:`SettleNet.learn` (with "grad_w", "grad_b" and
    "grad_pi"), and with ``lr > 0`` / ``lr_precision > 0`` updates the weights and biases /
    the tensor precisions in place."""
    net = SettleNet(weights, biases, activations, precisions)
    return net.learn(x0, target, eta, steps, momentum=momentum, tol=tol, init=init, trace=trace,
                     lr=lr, out=out, check=check, log_det=log_det, allow_tf32=allow_tf32,
                     lr_precision=lr_precision)


def max_stable_eta(weights: Sequence[Any], biases: Optional[Sequence[Any]] = None,
                   activations: Any = "identity", precisions: Any = None,
                   momentum: float = 0.0, clamped: bool = True) -> float:
    """``SettleNet(weights, biases, activations, precisions).max_stable_eta(momentum,
    clamped)``: the largest step size for which settling is certain to be stable near a
    settled state (see :meth:`SettleNet.max_stable_eta`).

    Example::

        import torch
        import fep_kernels as fk

        w = [0.5 * torch.randn(16, 8), 0.5 * torch.randn(4, 16)]
        eta = 0.9 * fk.max_stable_eta(w, activations="tanh", precisions=[1.0, 10.0])
    """
    return SettleNet(weights, biases, activations, precisions).max_stable_eta(momentum, clamped)
