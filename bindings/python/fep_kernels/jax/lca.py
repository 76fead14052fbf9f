"""LCA sparse coding for JAX (the locally competitive algorithm): sparse codes ``a`` of ``x``
against a dictionary Phi [n, m] with unit-norm columns, ``u <- u + eta (Phi^T x - u -
(Phi^T Phi - I) a)``, ``a = theta_lam(u)``, all steps in one XLA FFI call; and one
dictionary-learning step as a function returning the new Phi.

Each call prepares the dictionary from the Phi it is given (a copy and G = Phi^T Phi - I:
O(n m^2), as JAX code of the same maths would do inside jit). The codes are not differentiable
(``jax.grad`` through :func:`lca_solve` raises); under ``jax.vmap`` a shared dictionary folds the
mapped axis into the batch, a mapped one runs per entry.

Example::

    import jax, jax.numpy as jnp
    import fep_kernels.jax as fkj

    phi = jax.random.normal(jax.random.key(0), (64, 256))
    phi = phi / jnp.linalg.norm(phi, axis=0)                     # unit-norm columns
    x = jax.random.normal(jax.random.key(1), (8, 64))
    u, a, steps = jax.jit(lambda phi, x: fkj.lca_solve(phi, x, lam=0.1, steps=200))(phi, x)
    phi = fkj.lca_learn(phi, x, a, lr=0.01)                      # one learning step
"""

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from .._abi import _THRESHOLDS
from ._ffi import ensure_registered
from .settle import _per_entry

__all__ = ["lca_solve", "lca_learn"]

_TOL_MODES = {"absolute": 0, "relative": 1}


class _Solve(NamedTuple):
    threshold: int
    lam: float
    eta: float
    steps: int
    tol: float
    tol_mode: int
    check: bool
    warm: bool


def _solve_call(s: _Solve, phi, x, u0):
    ensure_registered()
    b, m = x.shape[0], phi.shape[1]
    f32 = jnp.float32
    out = (jax.ShapeDtypeStruct((b, m), f32), jax.ShapeDtypeStruct((b, m), f32),
           jax.ShapeDtypeStruct((b,), jnp.uint32))
    args = (phi, x) + ((u0,) if s.warm else ())
    return jax.ffi.ffi_call("fep_lca_solve", out)(
        *args, threshold=np.int32(s.threshold), lam=np.float32(s.lam), eta=np.float32(s.eta),
        steps=np.int32(s.steps), tol=np.float32(s.tol), tol_mode=np.int32(s.tol_mode),
        check_unit_norm=np.int32(s.check), warm=np.int32(s.warm))


@functools.lru_cache(maxsize=None)
def _solve_op(s: _Solve):
    @jax.custom_batching.custom_vmap
    def op(phi, x, u0):
        return _solve_call(s, phi, x, u0)

    @op.def_vmap
    def rule(size, in_batched, phi, x, u0):
        if in_batched[0]:  # a dictionary per entry
            return _per_entry(op)(size, in_batched, phi, x, u0)

        def fold(t, bt):
            t = t if bt else jnp.broadcast_to(t, (size,) + t.shape)
            return t.reshape((size * t.shape[1],) + t.shape[2:])

        u, a, steps = op(phi, fold(x, in_batched[1]), fold(u0, in_batched[2]) if s.warm else u0)
        un = lambda t: t.reshape((size, t.shape[0] // size) + t.shape[1:])  # noqa: E731
        return (un(u), un(a), un(steps)), (True, True, True)

    @jax.custom_vjp
    def solve(phi, x, u0):
        return op(phi, x, u0)

    def fwd(phi, x, u0):
        return op(phi, x, u0), None

    def bwd(_, __):
        raise NotImplementedError(
            "fep_kernels.jax.lca_solve: the LCA codes are not differentiable here (the library "
            "has no LCA backward); apply jax.lax.stop_gradient to the inputs to use the codes "
            "as constants")

    solve.defvjp(fwd, bwd)
    return solve


def _check_phi_x(phi, x):
    phi, x = jnp.asarray(phi), jnp.asarray(x)
    if phi.ndim != 2 or phi.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16):
        raise ValueError(f"phi: expected a float32/float16/bfloat16 [n, m] array, got "
                         f"{phi.dtype} {list(phi.shape)}")
    if x.ndim != 2 or x.shape[1] != phi.shape[0] or x.dtype != phi.dtype:
        raise ValueError(f"x: expected {phi.dtype} [B, {phi.shape[0]}], got {x.dtype} "
                         f"{list(x.shape)}")
    return phi, x


def lca_solve(phi: ArrayLike, x: ArrayLike, lam: float, eta: float = 0.0, steps: int = 200,
              threshold: str = "soft", tol: float = 0.0, tol_mode: str = "absolute",
              u0: Optional[ArrayLike] = None, check_unit_norm: bool = True
              ) -> Tuple[jax.Array, jax.Array, jax.Array]:
    """LCA codes of ``x`` ([B, n], phi's dtype) against ``phi`` ([n, m], float32, float16 or
    bfloat16, unit-norm columns unless ``check_unit_norm=False``): returns ``(u, a, steps)``,
    the membrane potentials and codes [B, m] float32 and the steps each sample ran [B] uint32.
    ``threshold``: "soft", "soft_nonneg", "hard" or "hard_nonneg" at ``lam`` > 0; ``eta`` in
    (0, 1], or 0 for 1 / lambda_max(Phi^T Phi); ``tol`` > 0 stops a sample early when
    max |du| < tol (``tol_mode`` "relative": relative to its max |Phi^T x|); ``u0`` [B, m]
    float32: a warm start. Works under ``jax.jit`` and ``jax.vmap``; not differentiable."""
    phi, x = _check_phi_x(phi, x)
    if threshold not in _THRESHOLDS:
        raise ValueError(f"threshold: {threshold!r} is not one of {list(_THRESHOLDS)}")
    if tol_mode not in _TOL_MODES:
        raise ValueError(f"tol_mode: {tol_mode!r} is not 'absolute' or 'relative'")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    if u0 is not None:
        u0 = jnp.asarray(u0)
        if u0.shape != (x.shape[0], phi.shape[1]) or u0.dtype != jnp.float32:
            raise ValueError(f"u0: expected float32 [{x.shape[0]}, {phi.shape[1]}], got "
                             f"{u0.dtype} {list(u0.shape)}")
    s = _Solve(_THRESHOLDS[threshold], float(lam), float(eta), int(steps), float(tol),
               _TOL_MODES[tol_mode], bool(check_unit_norm), u0 is not None)
    return _solve_op(s)(phi, x, u0 if u0 is not None else jnp.zeros((0,), jnp.float32))


@functools.lru_cache(maxsize=None)
def _learn_op(lr: float, check: bool):
    @jax.custom_batching.custom_vmap
    def op(phi, x, a):
        ensure_registered()
        out = jax.ShapeDtypeStruct(phi.shape, jnp.float32)
        return jax.ffi.ffi_call("fep_lca_learn", out)(
            phi, x, a, lr=np.float32(lr), check_unit_norm=np.int32(check))

    op.def_vmap(_per_entry(op))
    return op


def lca_learn(phi: ArrayLike, x: ArrayLike, a: ArrayLike, lr: float,
              check_unit_norm: bool = True) -> jax.Array:
    """One dictionary-learning step: returns the new Phi (float32 [n, m]),
    ``Phi + (lr / B) sum_b (x_b - Phi a_b) a_b^T`` with every column renormalised to unit norm.
    ``x`` [B, n] (phi's dtype) and ``a`` [B, m] float32 (codes from :func:`lca_solve`). Not
    differentiable; under ``jax.vmap`` each entry learns its own dictionary."""
    phi, x = _check_phi_x(phi, x)
    a = jnp.asarray(a)
    if a.shape != (x.shape[0], phi.shape[1]) or a.dtype != jnp.float32:
        raise ValueError(f"a: expected float32 [{x.shape[0]}, {phi.shape[1]}], got {a.dtype} "
                         f"{list(a.shape)}")
    return _learn_op(float(lr), bool(check_unit_norm))(*(jax.lax.stop_gradient(t)
                                                         for t in (phi, x, a)))
