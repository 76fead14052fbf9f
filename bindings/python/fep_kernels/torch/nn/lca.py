"""Sparse coding as a PyTorch module: :class:`LCALayer`.

The locally competitive algorithm (LCA; Rozell et al., 2008) codes each sample x [n] against a
dictionary Phi [n, m] whose columns ("atoms") have unit norm, by T steps of

    b = Phi^T x,   u <- u + eta (b - u - (Phi^T Phi - I) a),   a = theta_lam(u),   u_0 = 0

With the soft threshold theta_lam(u) = sign(u) max(|u| - lam, 0) the codes a converge to the
LASSO solution argmin_a 0.5 ||x - Phi a||^2 + lam ||a||_1. The dictionary is learned by
gradient steps on the reconstruction error at the codes, each followed by putting every column
back on the unit sphere:

    Phi <- Phi + (lr / B) sum_b (x_b - Phi a_b) a_b^T,   phi_k <- phi_k / ||phi_k||

Example::

    import torch
    from fep_kernels.nn import LCALayer

    layer = LCALayer(64, 256, lam=0.1, steps=200)       # step size 1 / lambda_max by default
    x = torch.randn(32, 64)
    a = layer(x)                                        # sparse codes [32, 256]
    for _ in range(10):
        layer.learn_step(x, lr=0.05)                    # one dictionary-learning step each
    torch.save(layer.state_dict(), "lca.pt")
"""

from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from ...lca import LcaDictionary, _tol_mode_arg
from ..._abi import _THRESHOLDS
from ..lca import lca_solve

__all__ = ["LCALayer"]


def _unit_columns(phi: Tensor) -> Tensor:
    """``phi`` with every column of nonzero norm scaled to unit norm (norms in float32 or wider);
    a column of norm 0 is left as it is."""
    norms = phi.float().norm(dim=0, keepdim=True)
    scale = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(torch.float32).tiny),
                        torch.ones_like(norms))
    return (phi.float() * scale).to(phi.dtype)


class LCALayer(nn.Module):
    """Sparse coding by the locally competitive algorithm, with the dictionary as a parameter.

    ``n_inputs`` (n) and ``n_atoms`` (m): the dictionary's shape [n, m]. ``lam`` (> 0): the
    threshold (the LASSO's sparsity weight with the soft threshold). ``eta``: the step in
    (0, 1], or None (default) for 1 / lambda_max(Phi^T Phi), recomputed for the current
    dictionary at every call. ``steps``: the most steps T. ``tol``: early stop per sample
    (0 runs exactly T steps) when max |du| < tol (``tol_mode="absolute"``) or
    < tol * max |Phi^T x| (``"relative"``: independent of the input's scale). ``threshold``:
    "soft" (LASSO), "soft_nonneg" (non-negative LASSO), "hard" or "hard_nonneg".
    ``allow_tf32``: permission (not a request) to use TF32 tensor cores for float32 products;
    the LCA kernels use none, so codes are accurate float32 either way.
    ``dictionary``: an initial [n, m] tensor (copied; columns renormalised to unit norm), or None
    for Gaussian random atoms normalised to unit norm (drawn from ``generator`` when given).
    ``device`` and ``dtype`` (float32, float16 or bfloat16) of the parameter.

    The parameter ``phi`` [n, m] is an ``nn.Parameter``: it is saved and loaded by
    ``state_dict``, moved by ``.to()``, and may be trained either by :meth:`learn_step` (the
    dictionary-learning rule above, no optimiser needed) or by any ``torch.optim`` optimiser on
    :meth:`reconstruction_loss` followed by :meth:`normalize_`. The codes themselves carry no
    gradient (``forward`` reads ``phi`` detached).
    """

    phi: nn.Parameter

    def __init__(self, n_inputs: int, n_atoms: int, lam: float, *, eta: Optional[float] = None,
                 steps: int = 100, tol: float = 0.0, tol_mode: str = "absolute",
                 threshold: str = "soft", allow_tf32: bool = False,
                 dictionary: Optional[Tensor] = None, generator: Optional[torch.Generator] = None,
                 device: Optional[torch.device] = None, dtype: torch.dtype = torch.float32
                 ) -> None:
        super().__init__()
        if isinstance(n_inputs, bool) or not isinstance(n_inputs, int) or n_inputs < 1:
            raise ValueError(f"n_inputs: expected an int >= 1, got {n_inputs!r}")
        if isinstance(n_atoms, bool) or not isinstance(n_atoms, int) or n_atoms < 1:
            raise ValueError(f"n_atoms: expected an int >= 1, got {n_atoms!r}")
        if threshold not in _THRESHOLDS:
            raise ValueError(f"threshold: {threshold!r} is not one of {list(_THRESHOLDS)}")
        _tol_mode_arg(tol_mode)
        if not (float(lam) > 0.0):
            raise ValueError(f"lam: must be > 0, got {lam!r}")
        if eta is not None and not (0.0 < float(eta) <= 1.0):
            raise ValueError(f"eta: must be in (0, 1] or None (automatic), got {eta!r}")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype: expected float32, float16 or bfloat16, got {dtype}")
        self.n_inputs = n_inputs
        self.n_atoms = n_atoms
        self.lam = float(lam)
        self.eta = None if eta is None else float(eta)
        self.steps = int(steps)
        self.tol = float(tol)
        self.tol_mode = tol_mode
        self.threshold = threshold
        self.allow_tf32 = bool(allow_tf32)
        if dictionary is None:
            init = torch.randn(n_inputs, n_atoms, generator=generator, dtype=torch.float32)
        else:
            if tuple(dictionary.shape) != (n_inputs, n_atoms):
                raise ValueError(f"dictionary: expected shape [{n_inputs}, {n_atoms}], got "
                                 f"{list(dictionary.shape)}")
            init = dictionary.detach().to(torch.float32).clone()
        init = _unit_columns(init)
        self.phi = nn.Parameter(init.to(device=device, dtype=dtype).contiguous())

    def extra_repr(self) -> str:
        eta = "auto" if self.eta is None else f"{self.eta:g}"
        return (f"n_inputs={self.n_inputs}, n_atoms={self.n_atoms}, lam={self.lam:g}, "
                f"eta={eta}, steps={self.steps}, tol={self.tol:g} ({self.tol_mode}), "
                f"threshold={self.threshold!r}")

    def _flat(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.n_inputs:
            raise ValueError(f"x: expected last dimension {self.n_inputs}, got shape "
                             f"{list(x.shape)}")
        return x.reshape(-1, self.n_inputs)

    def code(self, x: Tensor, u0: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """Runs LCA on ``x`` [..., n] (float32/float16/bfloat16 on the parameter's device).
        ``u0``: None (start at 0) or a float32 start [..., m]. Returns ``(u, a, steps)``:
        the internal state and the codes [..., m] float32, and the steps each sample ran
        [...] int32. No gradient flows through the codes."""
        lead = x.shape[:-1]
        flat = self._flat(x)
        u0f = None if u0 is None else u0.reshape(-1, self.n_atoms)
        u, a, steps = lca_solve(self.phi.detach(), flat, self.lam, eta=self.eta,
                                steps=self.steps, threshold=self.threshold, tol=self.tol,
                                u0=u0f, tol_mode=self.tol_mode, allow_tf32=self.allow_tf32)
        return (u.reshape(*lead, self.n_atoms), a.reshape(*lead, self.n_atoms),
                steps.reshape(lead))

    def forward(self, x: Tensor) -> Tensor:
        """The sparse codes a [..., m] (float32) of ``x`` [..., n]."""
        return self.code(x)[1]

    def reconstruct(self, a: Tensor) -> Tensor:
        """Phi a: the reconstruction [..., n] of codes ``a`` [..., m] (differentiable in phi
        and a)."""
        return a.to(self.phi.dtype) @ self.phi.t()

    def reconstruction_loss(self, x: Tensor, a: Optional[Tensor] = None) -> Tensor:
        """0.5 ||x - Phi a||^2 averaged over the batch, at the codes ``a`` (computed by
        :meth:`forward` when None). Its gradient in phi is minus the dictionary-learning
        direction of :meth:`learn_step`; after an optimiser step call :meth:`normalize_`."""
        if a is None:
            a = self.forward(x)
        flat = self._flat(x).to(self.phi.dtype)
        r = flat - self.reconstruct(a.reshape(-1, self.n_atoms))
        return 0.5 * r.float().pow(2).sum() / flat.shape[0]

    @torch.no_grad()
    def normalize_(self) -> None:
        """Scales every column of phi of nonzero norm to unit norm, in place."""
        self.phi.copy_(_unit_columns(self.phi))

    @torch.no_grad()
    def learn_step(self, x: Tensor, lr: float, a: Optional[Tensor] = None) -> Tensor:
        """One dictionary-learning step on the batch ``x`` [..., n], in place:
        Phi <- Phi + (lr / B) sum_b (x_b - Phi a_b) a_b^T, then every column of nonzero norm
        renormalised to unit norm. ``a``: the codes of ``x`` [..., m] (computed by
        :meth:`forward` when None). Returns the codes used. A step that would make phi
        non-finite raises ``FloatingPointError`` and leaves phi unchanged."""
        lr = float(lr)
        if not (lr >= 0.0 and lr != float("inf")):
            raise ValueError(f"lr: must be finite and >= 0, got {lr!r}")
        if a is None:
            a = self.forward(x)
        xf = self._flat(x).float()
        af = a.reshape(-1, self.n_atoms).float()
        phi = self.phi.float()
        r = xf - af @ phi.t()
        nxt = _unit_columns(phi + (lr / xf.shape[0]) * (r.t() @ af))
        if not bool(torch.isfinite(nxt).all()):
            raise FloatingPointError("learn_step: the update is not finite (lower lr, or check "
                                     "x); the dictionary is unchanged")
        self.phi.copy_(nxt.to(self.phi.dtype))
        return a

    def lambda_max(self) -> float:
        """lambda_max(Phi^T Phi) of the current dictionary (power iteration in float64); the
        automatic step is min(1, 1 / lambda_max)."""
        with LcaDictionary(self.phi.detach().contiguous(), check_unit_norm=False) as d:
            return d.lambda_max
