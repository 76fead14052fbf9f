"""Locally competitive algorithm (sparse coding) on a dictionary: :class:`LcaDictionary`."""

import ctypes

from ._abi import (
    FEP_ERR_INTERNAL,
    FEP_OK,
    FepError,
    _FepLcaParams,
    _THRESHOLDS,
)
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


class LcaDictionary(_Owned):
    """A prepared LCA dictionary (``FepLcaDict``): Phi [n, m] and G = Phi^T Phi - I in f32.

    ``phi``: a contiguous tensor [n, m] (float32, float16 or bfloat16; unit-norm columns) on the
    CPU or a CUDA device; it is copied, so it may be freed or changed afterwards.
    ``check_unit_norm``: reject columns whose norm differs from 1 by more than the dtype allows.

    Free it with :meth:`close`, a ``with`` block, or let it be garbage collected.
    """

    _free = "fep_lca_dict_free"

    def __init__(self, phi, check_unit_norm=True):
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

    def __repr__(self):
        state = "closed" if self._handle is None else f"n={self.n}, m={self.m}"
        return f"LcaDictionary({state}, device={self.device})"

    # -- queries --

    @property
    def shape(self):
        """(n, m) as reported by the library."""
        n, m = ctypes.c_uint64(), ctypes.c_uint64()
        _check(self._lib.fep_lca_dict_shape(self._h(), ctypes.byref(n), ctypes.byref(m)))
        return int(n.value), int(m.value)

    def _stream(self):
        """The raw stream for work on this dictionary's device: PyTorch's current stream of
        that device (None, i.e. NULL, on the CPU)."""
        if self.device.type == "cpu":
            return None
        s = _torch().cuda.current_stream(self.device).cuda_stream
        return ctypes.c_void_p(s) if s else None

    def phi(self):
        """A new float32 tensor [n, m] holding the dictionary's Phi (on its device)."""
        torch = _torch()
        h = self._h()
        out = torch.empty((self.n, self.m), dtype=torch.float32, device=self.device)
        _check(self._lib.fep_lca_dict_phi(h, self._stream(), _ptr(out)))
        return out

    # -- ops --

    def solve(self, x, lam, eta, steps, threshold="soft", tol=0.0, u0=None, trace=False,
              out=None):
        """Runs LCA (DESIGN.md 4.3) on the rows of ``x``.

        ``x``: [B, n] float32/float16/bfloat16 on the dictionary's device, contiguous.
        ``lam`` (> 0), ``eta`` (in (0, 1]), ``steps`` (T >= 1), ``threshold``: "soft",
        "soft_nonneg", "hard" or "hard_nonneg"; ``tol``: early stop when a sample's
        max |du| < tol (0 disables: exactly T steps). ``u0``: optional [B, m] float32 start.

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
        lam, eta, tol = (_number(v, name) for v, name in ((lam, "lam"), (eta, "eta"), (tol, "tol")))
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

        params = _FepLcaParams(_THRESHOLDS[threshold], lam, eta, steps, tol)
        _check(
            self._lib.fep_lca_solve(
                h, self._stream(), dtype, _ptr(x), batch, ctypes.byref(params), _ptr(u0),
                _ptr(res["u"]), _ptr(res["a"]), _ptr(res.get("energy")),
                _ptr(res.get("active")), _ptr(res.get("steps")),
            ),
            {"x": ("x", (batch, self.n)), "u0": ("u0", (batch, self.m))},
        )
        return res

    def learn(self, x, a, lr):
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
