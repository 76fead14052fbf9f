"""Active inference for JAX: state, sequence and policy inference of many agents sharing one
discrete generative model (pymdp 1.0's layouts and conventions), each one XLA FFI call that
works under ``jax.jit`` and ``jax.vmap`` (the mapped axis folds into the agents).

The model is built once on the host from NumPy/JAX arrays (:class:`VmpModel`, pymdp's
``A``, ``B``, ``C``, ``D``, ``policies``...) and stays fixed; the arrays that change every step
(observations, priors, beliefs) are the calls' inputs. The FFI calls name the model by its
address: keep the :class:`VmpModel` alive (and open) while computations that use it may run.
Host (CPU) arrays only for now; not differentiable (inputs are stopped).

Example (a T-maze-like toy, 3 agents)::

    import numpy as np, jax, jax.numpy as jnp
    import fep_kernels.jax as fkj

    A = [np.array([[0.9, 0.1], [0.1, 0.9]])]
    B = [np.stack([np.eye(2), np.eye(2)[::-1]], -1)]
    model = fkj.VmpModel(A, B, C=[np.array([0.0, 2.0])], policy_len=2)

    @jax.jit
    def step(obs):
        qs = model.infer_states(obs)["qs"]
        return qs, model.infer_policies(qs, gamma=4.0)["q_pi"]

    qs, q_pi = step(jnp.array([[0], [1], [1]], jnp.int32))
"""

import functools
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._ffi import ensure_registered

__all__ = ["VmpModel"]

_METHODS = {"vmp": 0, "mmp": 1}


def _fold_rule(op):
    """A custom_vmap rule folding the mapped axis into the agents (axis 0 of every argument
    and result)."""

    def rule(size, in_batched, *args):
        def fold(t, bt):
            t = t if bt else jnp.broadcast_to(t, (size,) + t.shape)
            return t.reshape((size * t.shape[1],) + t.shape[2:])

        out = op(*(fold(a, bt) for a, bt in zip(args, in_batched)))
        un = lambda t: t.reshape((size, t.shape[0] // size) + t.shape[1:])  # noqa: E731
        out = tuple(un(t) for t in out)
        return out, (True,) * len(out)

    return rule


@functools.lru_cache(maxsize=None)
def _op(target: str, attrs: tuple, shapes_fn):
    """A custom_vmap FFI call of ``target`` with static ``attrs`` ((name, numpy value) pairs)."""

    @jax.custom_batching.custom_vmap
    def op(*args):
        ensure_registered()
        return jax.ffi.ffi_call(target, shapes_fn(*args))(*args, **dict(attrs))

    op.def_vmap(_fold_rule(op))
    return op


class VmpModel:
    """A discrete generative model for the JAX front end, on the host. Arguments as
    :class:`fep_kernels.VmpModel` (pymdp's layouts): ``A`` (M arrays [O_m, S...]), ``B`` (F
    arrays [S_f, S_f, U_f]), ``C``, ``D``, ``A_dependencies``, ``policies`` or ``policy_len``,
    ``E``, ``pA``, ``pB``, ``pD``, ``num_states`` (NumPy or concrete JAX arrays; copied).
    Free it with :meth:`close` or a ``with`` block once no computation uses it."""

    def __init__(self, A: Any, B: Any = None, C: Any = None, D: Any = None,
                 A_dependencies: Optional[Sequence[Sequence[int]]] = None, policies: Any = None,
                 policy_len: Optional[int] = None, E: Any = None, pA: Any = None, pB: Any = None,
                 pD: Any = None, num_states: Optional[Sequence[int]] = None) -> None:
        from .. import vmp as _vmp

        host = lambda x: jax.tree_util.tree_map(np.asarray, x)  # noqa: E731
        self._model = _vmp.VmpModel(host(A), host(B), host(C), host(D), A_dependencies,
                                    host(policies), policy_len, host(E), host(pA), host(pB),
                                    host(pD), device="cpu", num_states=num_states)
        m = self._model
        self.num_states, self.num_controls, self.num_obs = m.num_states, m.num_controls, m.num_obs
        self.num_factors, self.num_modalities = m.num_factors, m.num_modalities
        self.belief_len, self.obs_len = m.belief_len, m.obs_len
        self.num_policies, self.policy_len, self.policies = m.num_policies, m.policy_len, m.policies

    def close(self) -> None:
        """Frees the model (no computation may still use it)."""
        self._model.close()

    def __enter__(self) -> "VmpModel":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _address(self) -> np.int64:
        h = self._model._handle
        if h is None or not h.value:
            raise ValueError("VmpModel: the model is closed")
        return np.int64(h.value)

    def _obs(self, obs, steps: bool):
        obs = jnp.asarray(obs)
        want = 3 if steps else 2
        if obs.ndim != want:
            raise ValueError(f"obs: expected {want} dims, got shape {list(obs.shape)}")
        if jnp.issubdtype(obs.dtype, jnp.integer):
            if obs.shape[-1] != self.num_modalities:
                raise ValueError(f"obs: indices need {self.num_modalities} per step, got "
                                 f"shape {list(obs.shape)}")
            return obs.astype(jnp.int32)
        if obs.dtype != jnp.float32 or obs.shape[-1] != self.obs_len:
            raise ValueError(f"obs: distributions need float32 [..., {self.obs_len}], got "
                             f"{obs.dtype} {list(obs.shape)}")
        return obs

    def _prior(self, prior, n: int):
        if prior is None:
            return ()
        prior = jnp.asarray(prior)
        if prior.shape != (n, self.belief_len) or prior.dtype != jnp.float32:
            raise ValueError(f"prior: expected float32 [{n}, {self.belief_len}], got "
                             f"{prior.dtype} {list(prior.shape)}")
        return (prior,)

    def infer_states(self, obs: ArrayLike, prior: Optional[ArrayLike] = None, num_iter: int = 16,
                     tol: float = 0.0) -> dict:
        """State inference (pymdp's fpi) for n agents: ``obs`` [n, M] integer indices or
        [n, sum O] float32 distributions, ``prior`` [n, sum S] float32 or None (D). Returns
        {"qs" [n, sum S], "vfe" [n], "iterations" [n] int32}."""
        obs = self._obs(obs, False)
        n = obs.shape[0]
        args = (obs,) + self._prior(prior, n)
        attrs = (("model", self._address()), ("num_iter", np.int32(num_iter)),
                 ("tol", np.float32(tol)), ("prior", np.int32(prior is not None)))
        s = self.belief_len

        def shapes(obs, *_):
            n = obs.shape[0]
            return (jax.ShapeDtypeStruct((n, s), jnp.float32),
                    jax.ShapeDtypeStruct((n,), jnp.float32),
                    jax.ShapeDtypeStruct((n,), jnp.int32))

        qs, vfe, it = _op("fep_vmp_infer_states", attrs, _Shapes(shapes, ("s", s)))(
            *map(jax.lax.stop_gradient, args))
        return {"qs": qs, "vfe": vfe, "iterations": it}

    def infer_sequence(self, obs: ArrayLike, actions: Optional[ArrayLike] = None,
                       prior: Optional[ArrayLike] = None, method: str = "vmp",
                       num_iter: int = 16, tau: float = 1.0) -> dict:
        """Sequence inference over windows of T steps: ``obs`` [n, T, M] indices or
        [n, T, sum O] distributions, ``actions`` [n, T - 1, F] (needed when T > 1), ``prior``
        [n, sum S] for step 0 or None (D); ``method`` "vmp" or "mmp". Returns {"qs"
        [n, T, sum S], "vfe" [n], "vfe_t" [n, T]}."""
        if method not in _METHODS:
            raise ValueError(f"method: {method!r} is not 'vmp' or 'mmp'")
        obs = self._obs(obs, True)
        n, t = obs.shape[0], obs.shape[1]
        args = (obs,)
        if t > 1:
            if actions is None:
                raise ValueError("actions: needed for windows of T > 1 steps")
            actions = jnp.asarray(actions)
            if actions.shape != (n, t - 1, self.num_factors) or not jnp.issubdtype(
                    actions.dtype, jnp.integer):
                raise ValueError(f"actions: expected integers [{n}, {t - 1}, "
                                 f"{self.num_factors}], got {actions.dtype} "
                                 f"{list(actions.shape)}")
            args += (actions.astype(jnp.int32),)
        args += self._prior(prior, n)
        attrs = (("model", self._address()), ("method", np.int32(_METHODS[method])),
                 ("num_iter", np.int32(num_iter)), ("tau", np.float32(tau)),
                 ("prior", np.int32(prior is not None)))
        s = self.belief_len

        def shapes(obs, *_):
            n, t = obs.shape[0], obs.shape[1]
            return (jax.ShapeDtypeStruct((n, t, s), jnp.float32),
                    jax.ShapeDtypeStruct((n,), jnp.float32),
                    jax.ShapeDtypeStruct((n, t), jnp.float32))

        qs, vfe, vfe_t = _op("fep_vmp_infer_sequence", attrs, _Shapes(shapes, ("s", s)))(
            *map(jax.lax.stop_gradient, args))
        return {"qs": qs, "vfe": vfe, "vfe_t": vfe_t}

    def infer_policies(self, qs: ArrayLike, gamma: float = 16.0, utility: bool = True,
                       state_info_gain: bool = True, param_info_gain: bool = False) -> dict:
        """Policy inference: ``qs`` [n, sum S] float32 beliefs. Returns {"q_pi" [n, P],
        "G" [n, P]} with q(pi) = softmax(-gamma G + ln E) (G: pymdp's -neg_efe)."""
        if self.num_policies == 0:
            raise ValueError("VmpModel: no policy table (pass policies or policy_len)")
        qs = jnp.asarray(qs)
        if qs.ndim != 2 or qs.shape[1] != self.belief_len or qs.dtype != jnp.float32:
            raise ValueError(f"qs: expected float32 [n, {self.belief_len}], got {qs.dtype} "
                             f"{list(qs.shape)}")
        attrs = (("model", self._address()), ("gamma", np.float32(gamma)),
                 ("utility", np.int32(utility)), ("state_info_gain", np.int32(state_info_gain)),
                 ("param_info_gain", np.int32(param_info_gain)))
        p = self.num_policies

        def shapes(qs):
            return (jax.ShapeDtypeStruct((qs.shape[0], p), jnp.float32),) * 2

        q_pi, g = _op("fep_vmp_infer_policies", attrs, _Shapes(shapes, ("p", p)))(
            jax.lax.stop_gradient(qs))
        return {"q_pi": q_pi, "G": g}

    def factors(self, qs: ArrayLike) -> list:
        """The per-factor beliefs [..., S_f] of beliefs [..., sum S]."""
        cuts = np.cumsum(self.num_states)[:-1]
        return jnp.split(qs, cuts, axis=-1)


class _Shapes:
    """A hashable result-shape function (``_op`` caches on it): equal when its key is."""

    def __init__(self, fn, key):
        self.fn, self.key = fn, (fn.__qualname__,) + tuple(key)

    def __call__(self, *args):
        return self.fn(*args)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _Shapes) and other.key == self.key
