"""Variational message passing (discrete active inference): :class:`VmpModel`,
:func:`construct_policies`.

A model has hidden-state factors f = 1..F with S_f states and modalities m = 1..M with O_m
outcomes; A_m [O_m, S_deps(m)...] = p(o_m | s), B_f [S_f, S_f, U_f] = p(s' | s, u), C_m
log-preferences, D_f the prior over initial states. State inference is pymdp's fixed-point
iteration (``fpi``), sequence inference its ``vmp`` / ``mmp`` updates, policy inference its
expected free energy, learning its Dirichlet count updates, with pymdp 1.0.4's layouts and
conventions (logs clipped at the float64 machine epsilon).
"""

import ctypes
import sys
from typing import Any, Dict, List, Optional, Sequence

from ._abi import (
    FEP_ERR_INTERNAL,
    FEP_OK,
    FEP_VMP_COUNTS_A,
    FEP_VMP_COUNTS_B,
    FEP_VMP_COUNTS_D,
    FEP_VMP_METHOD_MMP,
    FEP_VMP_METHOD_VMP,
    FEP_VMP_OBS_DIST,
    FEP_VMP_OBS_INDEX,
    FepError,
    _FepVmpFpiParams,
    _FepVmpLearnParams,
    _FepVmpModelDesc,
    _FepVmpPolicyParams,
    _FepVmpSequenceParams,
    _P_F64,
    _P_P_F64,
)
from ._lib import (
    _check,
    _cpu_kind,
    _get,
)
from ._tensors import (
    _Owned,
    _check_indices,
    _check_tensor,
    _device_args,
    _integer,
    _norm_device,
    _number,
    _ptr,
    _torch,
)
from .settle import (
    _steps_arg,
)

_I32_LIMIT = 2**31 - 1  # indices go to the library as int32


_VMP_METHODS = {"vmp": FEP_VMP_METHOD_VMP, "mmp": FEP_VMP_METHOD_MMP}


def construct_policies(num_controls: Sequence[int], policy_len: int) -> Any:
    """Every combination of actions over ``policy_len`` steps, in pymdp's order
    (``pymdp.control.construct_policies``: the last factor of the last step varies fastest),
    as a NumPy int32 array [P, policy_len, F]."""
    import itertools

    np = _np()
    num_controls = [_integer(u, f"num_controls[{f}]", 1, _I32_LIMIT)
                    for f, u in enumerate(num_controls)]
    policy_len = _integer(policy_len, "policy_len", 1, _I32_LIMIT)
    digits = [range(u) for u in num_controls] * policy_len
    rows = list(itertools.product(*digits))
    return np.asarray(rows, dtype=np.int32).reshape(len(rows), policy_len, len(num_controls))


def _np() -> Any:
    import numpy as np  # imported lazily, like torch

    return np


def _host_f64(x: Any, what: str) -> Any:
    """A contiguous float64 NumPy copy of an array, list or tensor (host side)."""
    np = _np()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    try:
        a = np.array(x, dtype=np.float64, order="C")
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected an array of numbers, got {type(x).__name__}") from None
    return a


def _host_list(x: Any, what: str, count: Optional[int] = None) -> List[Any]:
    """A per-modality or per-factor list (pymdp's list or object array; one array for a single
    entry) as a list of its entries (None entries kept)."""
    np = _np()
    if isinstance(x, np.ndarray) and x.dtype == object:
        x = list(x)
    if not isinstance(x, (list, tuple)) or (x and all(np.isscalar(v) for v in x)):
        x = [x]
    x = list(x)
    if count is not None and len(x) != count:
        raise ValueError(f"{what}: expected {count} entries, got {len(x)}")
    return x


def _f64_pointers(arrays: Sequence[Any]) -> Any:
    """A ctypes ``double *[]`` over float64 NumPy arrays (None entries: NULL)."""
    ptrs = (_P_F64 * len(arrays))()
    for i, a in enumerate(arrays):
        if a is not None:
            ptrs[i] = a.ctypes.data_as(_P_F64)
    return ctypes.cast(ptrs, _P_P_F64), ptrs


def _shaped(x: Any, what: str, shape: Sequence[int], optional_entries: bool = False) -> Any:
    """``x`` as float64 with exactly ``shape`` (or None where allowed)."""
    if x is None and optional_entries:
        return None
    a = _host_f64(x, what)
    if a.shape != tuple(shape):
        raise ValueError(f"{what}: expected shape {list(shape)}, got {list(a.shape)}")
    return a


def _states_without_b(A: List[Any], A_dependencies: Optional[Sequence[Sequence[int]]],
                      num_states: Optional[Sequence[int]]) -> List[int]:
    """S_f per factor for a model without B: ``num_states`` when given, else read from A's
    shapes (A_m's axis 1 + i has the size of factor A_dependencies[m][i]; without
    A_dependencies every modality depends on every factor, so F = A_m.ndim - 1)."""
    if num_states is not None:
        out = [_integer(s, f"num_states[{f}]", 1, _I32_LIMIT) for f, s in enumerate(num_states)]
        if not out:
            raise ValueError("num_states: no factors")
        return out
    if not A:
        raise ValueError("A: no modalities")
    if A_dependencies is None:
        return [int(v) for v in A[0].shape[1:]]
    sizes: Dict[int, int] = {}
    for m, deps in enumerate(A_dependencies):
        for i, f in enumerate(deps):
            f = _integer(f, f"A_dependencies[{m}][{i}]", 0, _I32_LIMIT)
            if m < len(A) and 1 + i < A[m].ndim:
                sizes.setdefault(f, int(A[m].shape[1 + i]))
    F = max(sizes) + 1 if sizes else 0
    missing = [f for f in range(F) if f not in sizes]
    if missing or not F:
        raise ValueError(f"num_states: needed with B=None (factors {missing} appear in no "
                         f"modality's A_dependencies)")
    return [sizes[f] for f in range(F)]


class VmpModel(_Owned):
    """A discrete generative model for active inference, stored on one device, with pymdp
    1.0.4's conventions (layouts, log clipping at the float64 machine epsilon, the sign of the
    expected free energy).

    The arguments follow pymdp's ``Agent`` and its layouts (NumPy arrays, lists, object arrays
    or tensors; copied, so they may be changed afterwards):

    * ``A``: M arrays A_m [O_m, S_deps(m)...], p(o | s), every column summing to 1.
    * ``B``: F arrays B_f [S_f, S_f, U_f] (or [S_f, S_f]: uncontrolled), B_f[s', s, u] =
      p(s' | s, u). The numbers of states and controls follow from B's shapes. pymdp's
      ``B_dependencies`` (transitions conditioned on other factors) are not supported.
      ``B=None``: a model without transitions, for :meth:`infer_states` only (every factor
      uncontrolled; the numbers of states from ``num_states``, or else from A's shapes).
      :meth:`infer_sequence`, :meth:`infer_policies`, ``pB`` and :meth:`learn` with
      ``lr_b > 0`` need B and raise :class:`FepError` / ValueError naming B without it.
    * ``A_dependencies``: M lists of factor indices, in A_m's axis order (default: every
      modality depends on every factor, as in pymdp).
    * ``C``: M log-preference vectors [O_m] used as given (None or None entries: zeros);
      ``D``: F priors [S_f] (None or None entries: uniform).
    * ``policies``: [P, H, F] actions (or pymdp's list of P arrays [H, F]); or None with
      ``policy_len=H`` for every combination (:func:`construct_policies`, pymdp's default); or
      neither (no policy inference). ``E``: [P] prior over policies (default uniform).
    * ``pA``, ``pB``, ``pD``: Dirichlet counts shaped like A, B, D (optional); :meth:`learn`
      updates them, :meth:`infer_policies` can add their novelty.
    * ``num_states``: [S_f] per factor; needed only with ``B=None`` when a factor's size
      cannot be read from A (a factor no modality depends on); with B it must agree with B.
    * ``device``: where the model lives and every tensor of its calls must be ("cpu",
      "cuda", "cuda:1", a torch.device).

    Free it with :meth:`close`, a ``with`` block, or let it be garbage collected.

    Beliefs are float32 tensors [N, sum S] (factor f at offset S_0 + ... + S_{f-1}; split with
    :meth:`factors`) for N agents sharing the model. Calls on CUDA tensors run on PyTorch's
    current stream and return without synchronising (except that ``check=True`` reads back one
    word to report bad inputs). Shapes, dtypes and devices are checked in Python
    (:class:`ValueError`), and so are integer observations, actions and policies, whatever
    their dtype, before they are narrowed to int32 (``0 <= x < O_m`` or ``U_f``; ValueError
    with the multi-index, e.g. "obs[0, 1] is 4294967297: ..."; on a GPU only with
    ``check=True``, else out-of-range indices are clamped); other values by the library
    (:class:`FepError`).

    Example (a two-armed T-maze-like toy; runnable as is)::

        import numpy as np, torch
        import fep_kernels as fk

        A = [np.array([[0.9, 0.1], [0.1, 0.9]])]        # one modality reports the state
        B = [np.stack([np.eye(2), np.eye(2)[::-1]], -1)] # stay or switch: [2, 2, 2]
        C = [np.array([0.0, 2.0])]                      # prefer outcome 1
        with fk.VmpModel(A, B, C=C, policy_len=2, pA=[10 * A[0]]) as model:
            obs = torch.tensor([[0], [1], [1]])          # 3 agents, one observation each
            out = model.infer_states(obs)                # D uniform: q = A[o, :] normalised
            print(out["qs"], out["vfe"])                 # [[0.9, 0.1], [0.1, 0.9], [0.1, 0.9]]
            pol = model.infer_policies(out["qs"], gamma=4.0)
            print(pol["q_pi"].argmax(1))                 # [2, 0, 0]: policies[2] = switch,
                                                         # stay; policies[0] = stay, stay
            seq = model.infer_sequence(torch.tensor([[[0], [1]]]),  # 1 agent, T = 2 steps
                                       actions=torch.tensor([[[1]]]))  # it switched
            model.learn(torch.tensor([[[0], [1]]]), seq["qs"], lr_a=1.0)
            print(model.counts_a(0))                     # [[10, 1], [1, 10]]
    """

    _free = "fep_vmp_model_free"

    def __init__(self, A: Any, B: Any = None, C: Any = None, D: Any = None,
                 A_dependencies: Optional[Sequence[Sequence[int]]] = None, policies: Any = None,
                 policy_len: Optional[int] = None, E: Any = None, pA: Any = None, pB: Any = None,
                 pD: Any = None, device: Any = "cpu",
                 num_states: Optional[Sequence[int]] = None) -> None:
        np = _np()
        self._handle = None
        lib = _get()
        A = [_host_f64(a, f"A[{m}]") for m, a in enumerate(_host_list(A, "A"))]
        M = len(A)
        if B is not None:
            B = [_host_f64(b, f"B[{f}]") for f, b in enumerate(_host_list(B, "B"))]
            for f, b in enumerate(B):
                if b.ndim == 2:
                    B[f] = b = b[:, :, None].copy()
                if b.ndim != 3 or b.shape[0] != b.shape[1] or b.shape[0] == 0 or b.shape[2] == 0:
                    raise ValueError(f"B[{f}]: expected shape [S, S, U] (or [S, S]) with "
                                     f"S, U >= 1, got {list(b.shape)}")
            from_b = [int(b.shape[0]) for b in B]
            if num_states is not None and [int(v) for v in num_states] != from_b:
                raise ValueError(f"num_states: {list(num_states)} disagrees with B's shapes "
                                 f"({from_b})")
            num_states = from_b
            num_controls = [int(b.shape[2]) for b in B]
        else:
            if pB is not None:
                raise ValueError("pB: given without B (Dirichlet counts over B need B)")
            num_states = _states_without_b(A, A_dependencies, num_states)
            num_controls = [1] * len(num_states)
        F = len(num_states)
        if A_dependencies is None:
            A_dependencies = [list(range(F)) for _ in range(M)]
        A_dependencies = [list(d) for d in A_dependencies]
        if len(A_dependencies) != M:
            raise ValueError(f"A_dependencies: expected {M} lists (one per modality), "
                             f"got {len(A_dependencies)}")
        deps = []
        for m, d in enumerate(A_dependencies):
            d = [_integer(x, f"A_dependencies[{m}][{i}]", 0, F - 1) for i, x in enumerate(d)]
            if not d or any(not 0 <= x < F for x in d) or len(set(d)) != len(d):
                raise ValueError(f"A_dependencies[{m}]: {d} must be distinct factors in 0..{F - 1}")
            deps.append(d)
        num_obs = []
        a_shapes = []
        for m, a in enumerate(A):
            want = tuple(num_states[x] for x in deps[m])
            if a.ndim != 1 + len(want) or a.shape[1:] != want or a.shape[0] == 0:
                raise ValueError(f"A[{m}]: expected shape [O, {', '.join(map(str, want))}] "
                                 f"(A_dependencies[{m}] = {deps[m]}), got {list(a.shape)}")
            num_obs.append(int(a.shape[0]))
            a_shapes.append(a.shape)
        b_shapes = [(s, s, u) for s, u in zip(num_states, num_controls)]
        d_shapes = [(s,) for s in num_states]

        def per_entry(x, what, shapes, fill_none):
            if x is None:
                return None
            x = _host_list(x, what, len(shapes))
            return [_shaped(v, f"{what}[{i}]", shapes[i], fill_none) for i, v in enumerate(x)]

        C = per_entry(C, "C", [(o,) for o in num_obs], True)
        D = per_entry(D, "D", d_shapes, True)
        pA = per_entry(pA, "pA", a_shapes, False)
        pB = per_entry(pB, "pB", b_shapes, False)
        pD = per_entry(pD, "pD", d_shapes, False)

        if policies is None and policy_len is not None:
            policies = construct_policies(num_controls, policy_len)
        if policies is not None:
            pol = np.asarray(policies)
            if pol.ndim == 2 and F == 1 and policy_len is None:
                pol = pol[:, :, None]
            if pol.ndim != 3 or pol.shape[2] != F or pol.shape[0] == 0 or pol.shape[1] == 0:
                raise ValueError(f"policies: expected shape [P, H, {F}] with P, H >= 1, "
                                 f"got {list(pol.shape)}")
            if not np.issubdtype(pol.dtype, np.integer):
                raise ValueError(f"policies: expected integer actions, got dtype {pol.dtype}")
            _check_indices(pol, "policies", num_controls, "factor {j} has {n} controls")
            policies = np.ascontiguousarray(pol, dtype=np.int32)  # in range: exact
        P = 0 if policies is None else int(policies.shape[0])
        H = 0 if policies is None else int(policies.shape[1])
        if E is not None:
            if policies is None:
                raise ValueError("E: given without policies (pass policies or policy_len)")
            E = _shaped(E, "E", (P,))

        u64 = lambda v: (ctypes.c_uint64 * len(v))(*v)  # noqa: E731
        keep = {
            "S": u64(num_states), "U": u64(num_controls), "O": u64(num_obs),
            "nd": u64([len(d) for d in deps]), "deps": u64([x for d in deps for x in d]),
        }
        lists = {}
        for name, arrays in (("a", A), ("b", B), ("c", C), ("d", D), ("pa", pA), ("pb", pB),
                             ("pd", pD)):
            lists[name] = None if arrays is None else _f64_pointers(arrays)
        desc = _FepVmpModelDesc(
            F, M, keep["S"], keep["U"], keep["O"], keep["nd"], keep["deps"],
            *[lists[k][0] if lists[k] is not None else None
              for k in ("a", "b", "c", "d")],
            policies.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)) if P else None,
            P, H,
            E.ctypes.data_as(_P_F64) if E is not None else None,
            *[lists[k][0] if lists[k] is not None else None for k in ("pa", "pb", "pd")],
        )
        if device == "cpu" and "torch" not in sys.modules:
            # A host model without PyTorch (the JAX front end's): no torch.device to make.
            kind, ordinal = _cpu_kind(), 0
        else:
            device = _norm_device(_torch().device(device))
            kind, ordinal, _ = _device_args(device, "device")
        handle = ctypes.c_void_p()
        # The library names the description's fields (desc.a[1], element 5): say A[1][2, 1].
        names = {"desc.policies": ("policies", (P, H, F)), "desc.e": ("E", (P,))}
        for c_name, py, shapes in (("a", "A", a_shapes), ("pa", "pA", a_shapes),
                                   ("b", "B", b_shapes), ("pb", "pB", b_shapes),
                                   ("c", "C", [(o,) for o in num_obs]), ("d", "D", d_shapes),
                                   ("pd", "pD", d_shapes)):
            for i, shape in enumerate(shapes):
                names[f"desc.{c_name}[{i}]"] = (f"{py}[{i}]", tuple(shape))
        _check(lib.fep_vmp_model_new(kind, ordinal, ctypes.byref(desc), ctypes.byref(handle)),
               names)
        if not handle.value:
            raise FepError(FEP_ERR_INTERNAL, "fep_vmp_model_new returned FEP_OK but no model")
        self._lib, self._handle = lib, handle
        self.device, self.kind, self.ordinal = device, kind, ordinal
        self.num_states, self.num_controls, self.num_obs = num_states, num_controls, num_obs
        self.A_dependencies = deps
        self.num_factors, self.num_modalities = F, M
        self.belief_len, self.obs_len = sum(num_states), sum(num_obs)
        self.num_policies, self.policy_len = P, H
        self.policies = policies
        self._shapes = {FEP_VMP_COUNTS_A: a_shapes, FEP_VMP_COUNTS_B: b_shapes,
                        FEP_VMP_COUNTS_D: d_shapes}
        self._has_counts = {FEP_VMP_COUNTS_A: pA is not None, FEP_VMP_COUNTS_B: pB is not None,
                            FEP_VMP_COUNTS_D: pD is not None}
        self.has_b = B is not None

    def __repr__(self) -> str:
        state = "closed" if self._handle is None else (
            f"num_states={self.num_states}, num_obs={self.num_obs}, "
            f"A_dependencies={self.A_dependencies}, num_controls={self.num_controls}, "
            f"num_policies={self.num_policies}")
        return f"VmpModel({state}, device={self.device})"

    # -- queries --

    def info(self) -> Dict[str, int]:
        """The sizes as the library reports them: a dict with num_factors, num_modalities,
        belief_len (sum S), obs_len (sum O), num_policies and policy_len."""
        keys = ("num_factors", "num_modalities", "belief_len", "obs_len", "num_policies",
                "policy_len")
        vals = [ctypes.c_uint64() for _ in keys]
        _check(self._lib.fep_vmp_model_info(self._h(), *[ctypes.byref(v) for v in vals]))
        return {k: int(v.value) for k, v in zip(keys, vals)}

    def factors(self, beliefs: Any) -> List[Any]:
        """The per-factor views of beliefs [..., sum S]: a list of F tensors [..., S_f]."""
        return list(beliefs.split(self.num_states, dim=-1))

    def _counts(self, which: int, index: int, what: str) -> Any:
        torch = _torch()
        np = _np()
        shapes = self._shapes[which]
        index = _integer(index, f"{what} index", 0, len(shapes) - 1)
        if not self._has_counts[which]:
            return None
        out = np.empty(shapes[index], dtype=np.float64)
        _check(self._lib.fep_vmp_model_counts(self._h(), self._stream(), which, index,
                                              out.ctypes.data_as(_P_F64), out.size))
        return torch.from_numpy(out)

    def counts_a(self, m: int) -> Any:
        """The current Dirichlet counts pA_m (a float64 CPU tensor shaped like A_m), or None
        when the model was built without pA. Waits for PyTorch's current stream (where
        :meth:`learn` ran) first."""
        return self._counts(FEP_VMP_COUNTS_A, m, "counts_a")

    def counts_b(self, f: int) -> Any:
        """The current pB_f (float64, shaped like B_f [S, S, U]), or None without pB."""
        return self._counts(FEP_VMP_COUNTS_B, f, "counts_b")

    def counts_d(self, f: int) -> Any:
        """The current pD_f (float64 [S_f]), or None without pD."""
        return self._counts(FEP_VMP_COUNTS_D, f, "counts_d")

    # -- plumbing --

    def _check(self, t: Any, what: str, shape: Sequence[Optional[int]], dtype: Any) -> None:
        _check_tensor(t, what, shape, dtype=dtype, device=self.device,
                      owner="the model's device")

    def _indices(self, t: Any, what: str, limits: Sequence[int], unit: str, check: bool) -> Any:
        """Integer indices ``t`` (last axis: one entry per modality or factor, ``limits[j]``
        values each) as an int32 tensor, range-checked BEFORE narrowing (so 2**32 + 1 is never
        read as 1): ValueError naming ``what`` and the multi-index of the first bad element
        (:func:`fep_kernels._tensors._check_indices`). The check reads the tensor, so on a GPU
        it runs only with ``check`` (it waits for the stream); without, out-of-range indices are
        clamped into range first, as the library's kernels clamp the int32 ones."""
        torch = _torch()
        if t.device.type == "cpu" or check:
            _check_indices(t, what, limits, unit)
        elif t.dtype != torch.int32:
            hi = torch.tensor([min(int(n), _I32_LIMIT) - 1 for n in limits], device=t.device)
            t = torch.minimum(t.to(torch.int64).clamp_min(0), hi)
        return t.to(torch.int32)

    def _obs(self, obs: Any, lead: Sequence[Optional[int]], check: bool = True) -> Any:
        """(FEP_VMP_OBS_*, tensor) for observations [*lead, M] (integer indices, range-checked
        and converted to int32 by :meth:`_indices`) or [*lead, sum O] (float32
        distributions)."""
        torch = _torch()
        if not isinstance(obs, torch.Tensor):
            raise ValueError(f"obs: expected a torch.Tensor, got {type(obs).__name__}")
        ints = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)
        if obs.dtype in ints:
            self._check(obs, "obs", (*lead, self.num_modalities), None)
            return FEP_VMP_OBS_INDEX, self._indices(obs, "obs", self.num_obs,
                                                    "modality {j} has {n} outcomes", check)
        if obs.dtype == torch.float32:
            self._check(obs, "obs", (*lead, self.obs_len), None)
            return FEP_VMP_OBS_DIST, obs
        raise ValueError(f"obs: dtype {obs.dtype}: expected integer indices [..., "
                         f"{self.num_modalities}] or float32 distributions [..., {self.obs_len}]")

    def _actions(self, actions: Any, n: int, steps: int, check: bool = True) -> Any:
        """Past actions [n, steps - 1, F] (int32 or int64) as int32, range-checked by
        :meth:`_indices`; None stays None."""
        torch = _torch()
        if actions is None:
            return None
        if not isinstance(actions, torch.Tensor) or actions.dtype not in (torch.int32,
                                                                          torch.int64):
            raise ValueError("actions: expected an int32 or int64 torch.Tensor [N, T - 1, F]")
        self._check(actions, "actions", (n, steps - 1, self.num_factors), None)
        return self._indices(actions, "actions", self.num_controls,
                             "factor {j} has {n} controls", check)

    def _outputs(self, specs: Dict[str, Any], out: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        """New tensors for ``specs`` ({key: (shape, dtype) or None}), or the given ones from
        ``out`` (checked)."""
        torch = _torch()
        out = dict(out or {})
        unknown = set(out) - {k for k, v in specs.items() if v is not None}
        if unknown:
            raise ValueError(f"out: unknown or disabled keys {sorted(unknown)}")
        res = {}
        for key, spec in specs.items():
            if spec is None:
                res[key] = None
            elif key in out:
                self._check(out[key], f"out[{key!r}]", *spec)
                res[key] = out[key]
            else:
                res[key] = torch.empty(spec[0], dtype=spec[1], device=self.device)
        return res

    def _stream(self) -> Any:
        return _device_args(self.device, "device")[2]

    # -- ops --

    def infer_states(self, obs: Any, prior: Any = None, num_iter: int = 16, tol: float = 0.0,
                     trace: bool = False, out: Optional[Dict[str, Any]] = None,
                     check: bool = True) -> Dict[str, Any]:
        """State inference for N agents (pymdp's ``fpi``). Works on a model without B.

        ``obs``: [N, M] integer indices, or [N, sum O] float32 distributions (modality m's O_m
        probabilities at offset O_0 + ... + O_{m-1}; used as sum_o o ln A, as pymdp).
        ``prior``: [N, sum S] float32 (None: every agent starts from D). ``num_iter`` K >= 1
        Jacobi iterations (one exact pass with one factor); ``tol`` > 0 stops an agent after
        iteration k >= 2 once |F_k - F_{k-1}| <= tol (0: always K, as pymdp).

        Returns a dict of tensors on the model's device: "qs" [N, sum S] float32, "vfe" [N]
        (the variational free energy F; the ELBO is -F), "iterations" [N] int32, and with
        ``trace=True`` "vfe_trace" [N, K] (F after each iteration), else None. ``out``: optional
        preallocated tensors with those keys. ``check``: on a GPU, scan the inputs first (one
        word read back); ``check=False`` returns at once and clamps bad indices.
        """
        torch = _torch()
        h = self._h()
        kind, obs = self._obs(obs, (None,), check)
        n = int(obs.shape[0])
        if prior is not None:
            self._check(prior, "prior", (n, self.belief_len), torch.float32)
        num_iter = _steps_arg(num_iter, "num_iter")
        f32 = torch.float32
        res = self._outputs({
            "qs": ((n, self.belief_len), f32), "vfe": ((n,), f32),
            "iterations": ((n,), torch.int32),
            "vfe_trace": ((n, num_iter), f32) if trace else None,
        }, out)
        params = _FepVmpFpiParams(num_iter, _number(tol, "tol"), 0 if check else 1)
        _check(self._lib.fep_vmp_infer_states(
            h, self._stream(), ctypes.byref(params), kind, _ptr(obs), n, _ptr(prior),
            _ptr(res["qs"]), _ptr(res["vfe"]), _ptr(res["iterations"]), _ptr(res["vfe_trace"]),
        ))
        return res

    def infer_sequence(self, obs: Any, actions: Any = None, prior: Any = None,
                       method: str = "vmp", num_iter: int = 16, tau: float = 1.0,
                       out: Optional[Dict[str, Any]] = None, check: bool = True
                       ) -> Dict[str, Any]:
        """Sequence inference over windows of T steps (pymdp's ``vmp`` / ``mmp``). Needs B.

        ``obs``: [N, T, M] integer indices or [N, T, sum O] float32 distributions; ``actions``:
        [N, T - 1, F] integer past actions (action t moves the state from step t to t + 1;
        None only when T = 1); ``prior``: [N, sum S] float32 for step 0 (None: D).
        ``method``: "vmp" or "mmp"; ``num_iter`` K >= 1; ``tau``: step size in (0, 1] (pymdp's
        Agent always uses 1).

        Returns a dict: "qs" [N, T, sum S], "vfe" [N] (the window's free energy) and "vfe_t"
        [N, T] (its per-step terms), float32 on the model's device.
        """
        torch = _torch()
        h = self._h()
        if method not in _VMP_METHODS:
            raise ValueError(f"method: {method!r} is not one of {list(_VMP_METHODS)}")
        kind, obs = self._obs(obs, (None, None), check)
        n, steps = int(obs.shape[0]), int(obs.shape[1])
        actions = self._actions(actions, n, steps, check)
        if prior is not None:
            self._check(prior, "prior", (n, self.belief_len), torch.float32)
        f32 = torch.float32
        res = self._outputs({
            "qs": ((n, steps, self.belief_len), f32), "vfe": ((n,), f32),
            "vfe_t": ((n, steps), f32),
        }, out)
        params = _FepVmpSequenceParams(_VMP_METHODS[method], _steps_arg(num_iter, "num_iter"),
                                       _number(tau, "tau"), 0 if check else 1)
        _check(self._lib.fep_vmp_infer_sequence(
            h, self._stream(), ctypes.byref(params), steps, kind, _ptr(obs), n, _ptr(actions),
            _ptr(prior), _ptr(res["qs"]), _ptr(res["vfe"]), _ptr(res["vfe_t"]),
        ))
        return res

    def infer_policies(self, qs: Any, gamma: float = 1.0, utility: bool = True,
                       state_info_gain: bool = True, param_info_gain: bool = False,
                       out: Optional[Dict[str, Any]] = None, check: bool = True
                       ) -> Dict[str, Any]:
        """Policy inference (pymdp's ``Agent.infer_policies``). Needs B.

        ``qs``: current beliefs [N, sum S] float32 (a sequence posterior [N, T, sum S] uses its
        last step, as pymdp's Agent). For every policy the beliefs are rolled forward through
        B and scored over the horizon with the terms asked for: utility q(o) . C, state
        information gain, and (``param_info_gain``, needs pA or pB) parameter novelty.

        Returns a dict: "g" [N, P], the expected free energy G = -(pymdp's neg_efe) (lower is
        better), and "q_pi" [N, P] = softmax(-gamma G + ln E), float32 on the model's device.
        """
        torch = _torch()
        h = self._h()
        if isinstance(qs, torch.Tensor) and qs.dim() == 3:
            qs = qs[:, -1].contiguous()
        self._check(qs, "qs", (None, self.belief_len), torch.float32)
        n = int(qs.shape[0])
        f32 = torch.float32
        P = self.num_policies
        res = self._outputs({"g": ((n, P), f32), "q_pi": ((n, P), f32)}, out)
        params = _FepVmpPolicyParams(_number(gamma, "gamma"), int(bool(utility)),
                                     int(bool(state_info_gain)), int(bool(param_info_gain)),
                                     0 if check else 1)
        _check(self._lib.fep_vmp_infer_policies(
            h, self._stream(), ctypes.byref(params), _ptr(qs), n, _ptr(res["g"]),
            _ptr(res["q_pi"]),
        ))
        return res

    def learn(self, obs: Any, qs: Any, actions: Any = None, lr_a: float = 0.0, lr_b: float = 0.0,
              lr_d: float = 0.0, check: bool = True) -> None:
        """Dirichlet learning, in place (pymdp's ``infer_parameters``):
        pA_m += lr_a sum o_m (x) q(s_deps(m)), pB_f[:, :, u] += lr_b sum [a_t = u] q_{t+1} (x) q_t,
        pD_f += lr_d sum q_0 where pD_f > 0, summed over the N agents and their steps.

        ``qs``: posteriors [N, T, sum S] float32 with ``obs`` [N, T, M] / [N, T, sum O] (or
        [N, sum S] with [N, M] / [N, sum O] for one step); ``actions``: [N, T - 1, F] (needed
        for lr_b > 0 when T > 1). A rate > 0 needs those counts in the model (and lr_b > 0 needs
        B). Read the counts back with :meth:`counts_a` and friends.
        """
        torch = _torch()
        h = self._h()
        if not isinstance(qs, torch.Tensor):
            raise ValueError(f"qs: expected a torch.Tensor, got {type(qs).__name__}")
        if qs.dim() == 2:
            self._check(qs, "qs", (None, self.belief_len), torch.float32)
            n, steps = int(qs.shape[0]), 1
            kind, obs = self._obs(obs, (n,), check)
        else:
            self._check(qs, "qs", (None, None, self.belief_len), torch.float32)
            n, steps = int(qs.shape[0]), int(qs.shape[1])
            kind, obs = self._obs(obs, (n, steps), check)
        actions = self._actions(actions, n, steps, check)
        params = _FepVmpLearnParams(_number(lr_a, "lr_a"), _number(lr_b, "lr_b"),
                                    _number(lr_d, "lr_d"), 0 if check else 1)
        _check(self._lib.fep_vmp_learn(
            h, self._stream(), ctypes.byref(params), steps, kind, _ptr(obs), n, _ptr(qs),
            _ptr(actions),
        ))
