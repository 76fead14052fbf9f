"""Locally competitive algorithm (sparse coding) on a dictionary: :class:`LcaDictionary`.

LCA (Rozell et al., 2008) codes each sample x [n] against a dictionary Phi [n, m] with
unit-norm columns by T steps of the leaky integrator

    b = Phi^T x,   G = Phi^T Phi - I,   u_0 = 0 (or a given start)
    u <- u + eta (b - u - G a),   a = theta_lam(u)

with theta one of "soft" (sign(u) max(|u| - lam, 0): the fixed point is the LASSO solution of
0.5 ||x - Phi a||^2 + lam ||a||_1), "soft_nonneg" (max(u - lam, 0)), "hard" (u where
|u| > lam) and "hard_nonneg" (u where u > lam).

The step ``eta`` defaults to 1 / lambda_max(Phi^T Phi) (:attr:`LcaDictionary.lambda_max`), the
largest step at which the iteration contracts on every set of active units; the early stop
``tol`` is absolute (max |du| < tol) or relative to the input's scale (max |du| < tol *
max |Phi^T x|, per sample).
"""

import ctypes
from typing import Any, Dict, Optional, Tuple

from ._abi import (
    FEP_ERR_INTERNAL,
    FEP_LCA_TOL_ABSOLUTE,
    FEP_LCA_TOL_RELATIVE,
    FEP_OK,
    FepError,
    _FepLcaParams,
    _THRESHOLDS,
)

# Early-stop modes: FepLcaParams.tol_mode (FEP_LCA_TOL_ABSOLUTE / FEP_LCA_TOL_RELATIVE).
_TOL_MODES = {"absolute": FEP_LCA_TOL_ABSOLUTE, "relative": FEP_LCA_TOL_RELATIVE}
from ._lib import (
    _check,
    _get,
)
from ._tensors import (
    _Owned,
    _check_no_overlap,
    _check_tensor,
    _integer,
    _device_of,
    _dtype_code,
    _norm_device,
    _number,
    _ptr,
    _torch,
)


def _eta_arg(eta: Optional[float]) -> float:
    """The library's eta: 0.0 (automatic, 1 / lambda_max) for None, else the number as given
    (the library checks it is in (0, 1])."""
    return 0.0 if eta is None else _number(eta, "eta")


def _tol_mode_arg(tol_mode: str) -> int:
    """The library's code for ``tol_mode`` ("absolute" or "relative")."""
    if not isinstance(tol_mode, str):
        raise TypeError(f"tol_mode: expected a str, got {type(tol_mode).__name__}")
    if tol_mode not in _TOL_MODES:
        raise ValueError(f"tol_mode: {tol_mode!r} is not one of {list(_TOL_MODES)}")
    return _TOL_MODES[tol_mode]


class LcaDictionary(_Owned):
    """A prepared LCA dictionary: Phi [n, m] and G = Phi^T Phi - I, stored in float32 on one
    device.

    ``phi``: a contiguous tensor [n, m] (float32, float16 or bfloat16; unit-norm columns) on the
    CPU or a CUDA device; it is copied, so it may be freed or changed afterwards.
    ``check_unit_norm``: reject columns whose norm differs from 1 by more than the dtype allows.

    Free it with :meth:`close`, a ``with`` block, or let it be garbage collected.
    """

    _free = "fep_lca_dict_free"

    def __init__(self, phi: Any, check_unit_norm: bool = True) -> None:
        self._handle = None
        lib = _get()
        _check_tensor(phi, "phi", (None, None))
        dtype = _dtype_code(phi, "phi")
        kind, ordinal, stream = _device_of(phi, "phi")
        n, m = (int(s) for s in phi.shape)
        handle = ctypes.c_void_p()
        _check(
            lib.fep_lca_dict_new(
                kind, ordinal, stream, dtype, _ptr(phi), n, m, 1 if check_unit_norm else 0,
                ctypes.byref(handle),
            ),
            {"phi": ("phi", (n, m))},
        )
        if not handle.value:
            raise FepError(FEP_ERR_INTERNAL, "fep_lca_dict_new returned FEP_OK but no dictionary")
        self._lib = lib
        self._handle = handle
        self.device = _norm_device(phi.device)
        self.kind = kind
        self.ordinal = ordinal
        self.n = n
        self.m = m

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else f"n={self.n}, m={self.m}"
        return f"LcaDictionary({state}, device={self.device})"

    # -- queries --

    @property
    def shape(self) -> Tuple[int, int]:
        """(n, m) as reported by the library."""
        n, m = ctypes.c_uint64(), ctypes.c_uint64()
        _check(self._lib.fep_lca_dict_shape(self._h(), ctypes.byref(n), ctypes.byref(m)))
        return int(n.value), int(m.value)

    def _stream(self) -> Optional[ctypes.c_void_p]:
        """The raw stream for work on this dictionary's device: PyTorch's current stream of
        that device (None, i.e. NULL, on the CPU)."""
        if self.device.type == "cpu":
            return None
        s = _torch().cuda.current_stream(self.device).cuda_stream
        return ctypes.c_void_p(s) if s else None

    @property
    def lambda_max(self) -> float:
        """lambda_max(Phi^T Phi): the largest eigenvalue of the Gram matrix (>= 1 for unit-norm
        columns). Computed once per dictionary, on first use, by power iteration in float64 on
        the host (a fixed start vector; at most 1000 iterations, until the Rayleigh quotient
        changes by less than 1e-9 relatively), and again after :meth:`learn`. On a GPU the first
        call copies Phi to the host and waits for the device."""
        v = ctypes.c_double()
        _check(self._lib.fep_lca_dict_lambda_max(self._h(), ctypes.byref(v)))
        return float(v.value)

    @property
    def auto_eta(self) -> float:
        """The step that ``eta=None`` selects: min(1, 1 / :attr:`lambda_max`)."""
        lmax = self.lambda_max
        return 1.0 / lmax if lmax > 1.0 else 1.0

    def phi(self) -> Any:
        """A new float32 tensor [n, m] holding the dictionary's Phi (on its device)."""
        torch = _torch()
        h = self._h()
        out = torch.empty((self.n, self.m), dtype=torch.float32, device=self.device)
        _check(self._lib.fep_lca_dict_phi(h, self._stream(), _ptr(out)))
        return out

    # -- ops --

    def solve(self, x: Any, lam: float, eta: Optional[float] = None, steps: int = 100,
              threshold: str = "soft", tol: float = 0.0, u0: Any = None, trace: bool = False,
              out: Optional[Dict[str, Any]] = None, tol_mode: str = "absolute",
              allow_tf32: bool = False) -> Dict[str, Any]:
        """Runs LCA on the rows of ``x``: T steps of u <- u + eta (b - u - G a), a = theta(u),
        b = Phi^T x, G = Phi^T Phi - I, from u = ``u0`` (or 0).

        ``x``: [B, n] float32/float16/bfloat16 on the dictionary's device, contiguous.
        ``lam`` (> 0): the threshold; ``eta``: the step, in (0, 1], or None (default) for
        1 / lambda_max(Phi^T Phi) (:attr:`auto_eta`); ``steps`` (T >= 1): the most steps;
        ``threshold``: "soft", "soft_nonneg", "hard" or "hard_nonneg".
        ``tol``: early stop per sample (0 disables: exactly T steps); with
        ``tol_mode="absolute"`` a sample stops when max |du| < tol, with ``"relative"`` when
        max |du| < tol * max |Phi^T x| of that sample (so x and c * x, with lam scaled by c too,
        stop at the same step; a sample with Phi^T x = 0 stops once du is exactly 0).
        ``u0``: optional [B, m] float32 start.
        ``allow_tf32``: permission (not a request) to use TF32 tensor cores for float32
        products, as PyTorch's ``allow_tf32``. No LCA kernel uses tensor cores today, so it
        changes nothing: results are accurate float32 (FMA, float32 accumulation) either way.

        Returns a dict of new contiguous tensors on the dictionary's device: "u" and "a"
        [B, m] float32, and with ``trace=True`` also "energy" [B, T] float32
        (0.5 ||x - Phi a||^2 + lam ||a||_1 after each step), "active" [B, T] int32 (the
        library's uint32 counts) and "steps" [B] int32 (steps run per sample). A sample that
        stopped early repeats its last energy/active values. With ``trace=False``,
        ``out={"steps": t}`` still gets the steps run (and "steps" is returned) without the trace.

        ``out``: optional dict of preallocated output tensors with the same keys, shapes and
        dtypes (e.g. for timing loops); those given are written instead of new ones. They must
        not share memory with each other or with ``x`` or ``u0`` (ValueError naming both),
        except that ``out["u"]`` may be ``u0`` itself (u then starts from, and overwrites, it).
        """
        torch = _torch()
        h = self._h()
        _check_tensor(x, "x", (None, self.n), device=self.device)
        dtype = _dtype_code(x, "x")
        batch = int(x.shape[0])
        if threshold not in _THRESHOLDS:
            raise ValueError(f"threshold: {threshold!r} is not one of {list(_THRESHOLDS)}")
        steps = _integer(steps, "steps")
        lam, tol = (_number(v, name) for v, name in ((lam, "lam"), (tol, "tol")))
        eta = _eta_arg(eta)
        mode = _tol_mode_arg(tol_mode)
        if u0 is not None:
            _check_tensor(u0, "u0", (batch, self.m), dtype=torch.float32, device=self.device)

        out = dict(out or {})
        unknown = set(out) - {"u", "a", "energy", "active", "steps"}
        if unknown:
            raise ValueError(f"out: unknown keys {sorted(unknown)}")
        specs = {"u": ((batch, self.m), torch.float32), "a": ((batch, self.m), torch.float32)}
        if trace:
            specs["energy"] = ((batch, steps), torch.float32)
            specs["active"] = ((batch, steps), torch.int32)
        elif set(out) - set(specs) - {"steps"}:
            raise ValueError("out: 'energy' and 'active' need trace=True")
        if trace or "steps" in out:  # out["steps"] alone: the step counts without the trace
            specs["steps"] = ((batch,), torch.int32)
        res = {}
        for key, (shape, dt) in specs.items():
            if key in out:
                _check_tensor(out[key], f"out[{key!r}]", shape, dtype=dt, device=self.device)
                res[key] = out[key]
            else:
                res[key] = torch.empty(shape, dtype=dt, device=self.device)
        # u0 may be out["u"] itself (u is updated in place), but no output may share memory
        # with another output or with x, nor u0 with any output but u.
        _check_no_overlap([(f"out[{k!r}]", res[k]) for k in res if k in out],
                          [("x", x), ("u0", u0)], same_ok=[("out['u']", "u0")])

        params = _FepLcaParams(_THRESHOLDS[threshold], lam, eta, steps, tol, mode,
                               1 if allow_tf32 else 0)
        _check(
            self._lib.fep_lca_solve(
                h, self._stream(), dtype, _ptr(x), batch, ctypes.byref(params), _ptr(u0),
                _ptr(res["u"]), _ptr(res["a"]), _ptr(res.get("energy")),
                _ptr(res.get("active")), _ptr(res.get("steps")),
            ),
            {"x": ("x", (batch, self.n)), "u0": ("u0", (batch, self.m))},
        )
        return res

    def learn(self, x: Any, a: Any, lr: float) -> None:
        """One dictionary-learning step, in place:
        Phi += (lr / B) sum_b (x_b - Phi a_b) a_b^T, columns renormalised, G recomputed.

        ``x``: [B, n] float32/float16/bfloat16; ``a``: [B, m] float32 (e.g. ``solve(...)["a"]``);
        both contiguous on the dictionary's device.
        """
        torch = _torch()
        h = self._h()
        _check_tensor(x, "x", (None, self.n), device=self.device)
        dtype = _dtype_code(x, "x")
        batch = int(x.shape[0])
        _check_tensor(a, "a", (batch, self.m), dtype=torch.float32, device=self.device)
        lr = _number(lr, "lr")
        _check(self._lib.fep_lca_dict_learn(h, self._stream(), dtype, _ptr(x), _ptr(a), batch, lr),
               {"x": ("x", (batch, self.n)), "a": ("a", (batch, self.m))})
