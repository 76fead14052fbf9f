"""Predictive-coding settling for JAX: the library's fused settling (all T steps in one call) as
XLA FFI calls, and the settled energy as a differentiable function (``jax.grad`` gives the
learning step's weight, bias and precision gradients by the envelope theorem: at a settled state
the energy's gradient w.r.t. the parameters is its partial derivative).

A network has layers x_0 … x_L; layer l predicts ``mu_l = W_l f_l(x_{l-1}) + b_l`` with error
``eps_l = x_l - mu_l`` and precision Pi_l (a scalar, a diagonal [n_l] or one diagonal per
sample [B, n_l]); settling descends ``E = 1/2 sum_l eps_l^T Pi_l eps_l`` per sample in the free
layers by gradient descent (``eta``, ``momentum``, ``steps``, early stop ``tol``) from the
feedforward pass (or from ``init``), with x_0 clamped to the input and, when learning, x_L to
the target. With ``log_det`` the energy is the free energy ``F = E - 1/2 sum_l ln|Pi_l|``.

Example (a PCX/jpc-style training step under jit)::

    import jax, jax.numpy as jnp
    import fep_kernels.jax as fkj

    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    ws = [0.3 * jax.random.normal(k1, (16, 8)), 0.3 * jax.random.normal(k2, (4, 16))]
    x0 = jax.random.normal(k3, (32, 8))
    y = jax.nn.one_hot(jnp.arange(32) % 4, 4)

    @jax.jit
    def step(ws):
        e, g = jax.value_and_grad(lambda ws: fkj.settle_energy(
            ws, x0, y, activations=["identity", "tanh"], eta=0.1, steps=20))(ws)
        return [w - 0.05 * gw for w, gw in zip(ws, g)], e

    ws, e = step(ws)
    out = fkj.settle_infer(ws, x0, activations=["identity", "tanh"], eta=0.1, steps=20)
    print(e, out["x"][-1].argmax(1))
"""

import functools
from typing import Any, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ..settle import _activation, _one_activation, _per_layer
from ._ffi import ensure_registered

__all__ = ["settle_energy", "settle_infer", "settle_learn"]


class _Static(NamedTuple):
    """The attributes of a settling call (hashable)."""
    activations: Tuple[int, ...]
    alphas: Tuple[float, ...]
    scalars: Tuple[float, ...]  # the scalar precision of every layer (1 where a tensor is given)
    bias_layers: Tuple[int, ...]
    pi_layers: Tuple[int, ...]
    eta: float
    steps: int
    momentum: float
    tol: float
    log_det: bool
    init: bool


def _attrs(s: _Static) -> dict:
    return dict(activations=np.asarray(s.activations, np.int32),
                alphas=np.asarray(s.alphas, np.float32),
                precisions=np.asarray(s.scalars, np.float32),
                bias_layers=np.asarray(s.bias_layers, np.int32),
                precision_layers=np.asarray(s.pi_layers, np.int32),
                eta=np.float32(s.eta), steps=np.int32(s.steps), momentum=np.float32(s.momentum),
                tol=np.float32(s.tol), init=np.int32(s.init), log_det=np.int32(s.log_det))


def _call(s: _Static, learn: bool, x0, target, weights, biases, pis, init):
    """One FFI call: (energy, steps, xs, epss[, grad_w, grad_b, grad_pi])."""
    ensure_registered()
    b = x0.shape[0]
    widths = [x0.shape[1]] + [w.shape[0] for w in weights]
    depth = len(weights)
    f32 = jnp.float32
    out = [jax.ShapeDtypeStruct((b,), f32), jax.ShapeDtypeStruct((b,), jnp.uint32)]
    out += [jax.ShapeDtypeStruct((b, n), f32) for n in widths[1:]] * 2
    if learn:
        out += [jax.ShapeDtypeStruct((widths[l + 1], widths[l]), f32) for l in range(depth)]
        out += [jax.ShapeDtypeStruct((n,), f32) for n in widths[1:]]
        pi_shape = {l: p.shape for l, p in zip(s.pi_layers, pis)}
        out += [jax.ShapeDtypeStruct(pi_shape.get(l, (1,)), f32) for l in range(depth)]
    args = [x0] + ([target] if learn else []) + list(weights) + list(biases) + list(pis)
    aliases = {}
    if s.init:
        for l, t in enumerate(init):  # the library starts from x_out: give it init's buffers
            aliases[len(args) + l] = 2 + l
        args += list(init)
    name = "fep_settle_learn" if learn else "fep_settle_infer"
    res = jax.ffi.ffi_call(name, tuple(out), input_output_aliases=aliases)(*args, **_attrs(s))
    res = list(res)
    xs, es = res[2:2 + depth], res[2 + depth:2 + 2 * depth]
    head = (res[0], res[1], xs, es)
    if not learn:
        return head
    r = res[2 + 2 * depth:]
    return head + (r[:depth], r[depth:2 * depth], r[2 * depth:])


def _per_entry(fn):
    """A custom_vmap rule running ``fn`` once per map entry (lax.map): used where the mapped
    axis cannot fold into the batch (a batched network, or gradients summed over the batch)."""

    def rule(size, in_batched, *args):
        flat, tree = jax.tree_util.tree_flatten(args)
        flat_b = jax.tree_util.tree_flatten(in_batched)[0]
        mapped = tuple(a for a, bt in zip(flat, flat_b) if bt)

        def one(xs):
            it = iter(xs)
            leaves = [next(it) if bt else a for a, bt in zip(flat, flat_b)]
            return fn(*jax.tree_util.tree_unflatten(tree, leaves))

        out = jax.lax.map(one, mapped)
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return rule


@functools.lru_cache(maxsize=None)
def _infer_op(s: _Static):
    @jax.custom_batching.custom_vmap
    def op(x0, weights, biases, pis, init):
        return _call(s, False, x0, None, weights, biases, pis, init)

    @op.def_vmap
    def rule(size, in_batched, x0, weights, biases, pis, init):
        net_batched = any(jax.tree_util.tree_leaves((in_batched[1], in_batched[2])))
        # a per-sample precision [B, n] folds like x0; a diagonal [n] must be shared
        pi_b = in_batched[3]
        diag_batched = any(bt and p.ndim == 2 for p, bt in zip(pis, pi_b))
        if net_batched or diag_batched:
            return _per_entry(op)(size, in_batched, x0, weights, biases, pis, init)

        def fold(x, bt):
            x = x if bt else jnp.broadcast_to(x, (size,) + x.shape)
            return x.reshape((size * x.shape[1],) + x.shape[2:])

        fx0 = fold(x0, in_batched[0])
        fpis = [fold(p, bt) if p.ndim == 2 else p for p, bt in zip(pis, pi_b)]
        finit = [fold(t, bt) for t, bt in zip(init, in_batched[4])]
        energy, steps, xs, es = op(fx0, weights, biases, fpis, finit)
        un = lambda t: t.reshape((size, t.shape[0] // size) + t.shape[1:])  # noqa: E731
        out = (un(energy), un(steps), [un(x) for x in xs], [un(e) for e in es])
        return out, jax.tree_util.tree_map(lambda _: True, out)

    return op


@functools.lru_cache(maxsize=None)
def _learn_op(s: _Static):
    @jax.custom_batching.custom_vmap
    def op(x0, target, weights, biases, pis, init):
        return _call(s, True, x0, target, weights, biases, pis, init)

    op.def_vmap(_per_entry(op))
    return op


def _prepare(weights, x0, biases, activations, precisions, eta, steps, momentum, tol, log_det,
             init, learn, target=None):
    weights = [jnp.asarray(w) for w in weights]
    depth = len(weights)
    if depth == 0:
        raise ValueError("weights: expected at least one layer")
    dt = weights[0].dtype
    if dt not in (jnp.float32, jnp.float16, jnp.bfloat16):
        raise ValueError(f"weights[0]: dtype {dt} is not float32, float16 or bfloat16")
    x0 = jnp.asarray(x0)
    if x0.ndim != 2 or x0.dtype != jnp.float32:
        raise ValueError(f"x0: expected float32 [B, n_0], got {x0.dtype} {list(x0.shape)}")
    widths = [x0.shape[1]]
    for l, w in enumerate(weights):
        if w.ndim != 2 or w.shape[1] != widths[l] or w.dtype != dt:
            raise ValueError(f"weights[{l}]: expected {dt} [n_{l + 1}, {widths[l]}], got "
                             f"{w.dtype} {list(w.shape)}")
        widths.append(w.shape[0])
    acts = [_activation(a, f"activations[{l}]") for l, a in enumerate(
        _per_layer(activations, "activations", depth, one=_one_activation))]
    bias_list = _per_layer(biases, "biases", depth, default=[None] * depth)
    bias_layers, bs = [], []
    for l, b_ in enumerate(bias_list):
        if b_ is None:
            continue
        b_ = jnp.asarray(b_)
        if b_.shape != (widths[l + 1],) or b_.dtype != dt:
            raise ValueError(f"biases[{l}]: expected {dt} [{widths[l + 1]}], got {b_.dtype} "
                             f"{list(b_.shape)}")
        bias_layers.append(l)
        bs.append(b_)
    pi_list = _per_layer(precisions, "precisions", depth, default=1.0,
                         one=lambda p: not isinstance(p, (list, tuple)))
    scalars, pi_layers, pis = [], [], []
    for l, p in enumerate(pi_list):
        if isinstance(p, (jax.Array, np.ndarray)) and np.ndim(p) > 0:
            p = jnp.asarray(p)
            n = widths[l + 1]
            if p.dtype != jnp.float32 or p.shape not in ((n,), (x0.shape[0], n)):
                raise ValueError(f"precisions[{l}]: expected float32 [{n}] or "
                                 f"[{x0.shape[0]}, {n}], got {p.dtype} {list(p.shape)}")
            scalars.append(1.0)
            pi_layers.append(l)
            pis.append(p)
        else:
            if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)):
                raise TypeError(f"precisions[{l}]: expected a number or a float32 array, got "
                                f"{type(p).__name__}")
            scalars.append(float(p))
    if target is not None:
        target = jnp.asarray(target)
        if target.shape != (x0.shape[0], widths[-1]) or target.dtype != jnp.float32:
            raise ValueError(f"target: expected float32 [{x0.shape[0]}, {widths[-1]}], got "
                             f"{target.dtype} {list(target.shape)}")
    free = depth - 1 if learn else depth
    init_list = []
    if init is not None:
        init_list = [jnp.asarray(t) for t in init]
        if len(init_list) != free:
            raise ValueError(f"init: expected {free} arrays (x_1 ... x_{free}), got "
                             f"{len(init_list)}")
        for l, t in enumerate(init_list):
            if t.shape != (x0.shape[0], widths[l + 1]) or t.dtype != jnp.float32:
                raise ValueError(f"init[{l}]: expected float32 [{x0.shape[0]}, "
                                 f"{widths[l + 1]}], got {t.dtype} {list(t.shape)}")
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ValueError(f"steps: expected an int >= 1, got {steps!r}")
    s = _Static(tuple(c for c, _ in acts), tuple(float(a) for _, a in acts), tuple(scalars),
                tuple(bias_layers), tuple(pi_layers), float(eta), int(steps), float(momentum),
                float(tol), bool(log_det), init is not None)
    return s, x0, target, weights, bs, pis, init_list


def settle_infer(weights: Sequence[ArrayLike], x0: ArrayLike,
                 biases: Optional[Sequence[Optional[ArrayLike]]] = None,
                 activations: Any = "tanh", precisions: Any = 1.0, eta: float = 0.1,
                 steps: int = 20, momentum: float = 0.0, tol: float = 0.0,
                 init: Optional[Sequence[ArrayLike]] = None, log_det: bool = False) -> dict:
    """Settles ``x0`` ([B, n_0] float32) with x_L free (inference): returns a dict with "x"
    (x_1 … x_L, [B, n_l] float32), "eps" (their errors), "energy" [B] and "steps" [B] (uint32:
    the steps each sample ran). ``weights``: W_l [n_l, n_{l-1}] (float32, float16 or bfloat16);
    ``biases``: None or one entry per layer (None: no bias); ``activations``: f_l applied to
    x_{l-1} ("identity", "tanh", "relu", "leaky_relu" or ("leaky_relu", slope), "sigmoid",
    "gelu"), one for all layers or one per layer; ``precisions``: one for all layers or one per
    layer, each a number, a float32 diagonal [n_l] or a per-sample [B, n_l]; ``init``: None
    (the feedforward start) or x_1 … x_L to start from. Not differentiable (the inputs are
    stopped). ``jax.vmap`` over the data folds into B when the network is shared."""
    s, x0, _, ws, bs, pis, init_l = _prepare(weights, x0, biases, activations, precisions, eta,
                                             steps, momentum, tol, log_det, init, False)
    stop = jax.lax.stop_gradient
    args = jax.tree_util.tree_map(stop, (x0, ws, bs, pis, init_l))
    energy, nsteps, xs, es = _infer_op(s)(*args)
    return {"x": list(xs), "eps": list(es), "energy": energy, "steps": nsteps}


def settle_learn(weights: Sequence[ArrayLike], x0: ArrayLike, target: ArrayLike,
                 biases: Optional[Sequence[Optional[ArrayLike]]] = None,
                 activations: Any = "tanh", precisions: Any = 1.0, eta: float = 0.1,
                 steps: int = 20, momentum: float = 0.0, tol: float = 0.0,
                 init: Optional[Sequence[ArrayLike]] = None, log_det: bool = False) -> dict:
    """One learning step's settle with x_L clamped to ``target`` ([B, n_L] float32): the dict
    of :func:`settle_infer` plus "grad_w", "grad_b" (every layer) and "grad_pi" ([1], [n_l] or
    [B, n_l]): the gradients of the batch-mean settled free energy F (the library's learning
    gradients). Not differentiable; :func:`settle_energy` is the differentiable form."""
    s, x0, target, ws, bs, pis, init_l = _prepare(weights, x0, biases, activations, precisions,
                                                  eta, steps, momentum, tol, log_det, init,
                                                  True, target)
    args = jax.tree_util.tree_map(jax.lax.stop_gradient, (x0, target, ws, bs, pis, init_l))
    energy, nsteps, xs, es, gw, gb, gp = _learn_op(s)(*args)
    return {"x": list(xs), "eps": list(es), "energy": energy, "steps": nsteps,
            "grad_w": list(gw), "grad_b": list(gb), "grad_pi": list(gp)}


@functools.lru_cache(maxsize=None)
def _energy_fn(s: _Static):
    @jax.custom_vjp
    def energy(ws, bs, pis, x0, target, init):
        return _learn_op(s)(x0, target, ws, bs, pis, init)[0].mean()

    def fwd(ws, bs, pis, x0, target, init):
        e, _, _, _, gw, gb, gp = _learn_op(s)(x0, target, ws, bs, pis, init)
        return e.mean(), (ws, bs, pis, x0, gw, gb, gp)

    def bwd(res, g):
        ws, bs, pis, x0, gw, gb, gp = res
        dws = [(g * d).astype(w.dtype) for d, w in zip(gw, ws)]
        dbs = [(g * gb[l]).astype(b_.dtype) for l, b_ in zip(s.bias_layers, bs)]
        dps = []
        for l, p in zip(s.pi_layers, pis):
            d = gp[l]
            if not s.log_det:  # dE/dpi = dF/dpi + (1/B) sum_b 1/(2 pi)
                d = d + (0.5 / p if p.ndim == 1 else 0.5 / (x0.shape[0] * p))
            dps.append(g * d)
        return dws, dbs, dps, None, None, None

    energy.defvjp(fwd, bwd)
    return energy


def settle_energy(weights: Sequence[ArrayLike], x0: ArrayLike, target: ArrayLike,
                  biases: Optional[Sequence[Optional[ArrayLike]]] = None,
                  activations: Any = "tanh", precisions: Any = 1.0, eta: float = 0.1,
                  steps: int = 20, momentum: float = 0.0, tol: float = 0.0,
                  init: Optional[Sequence[ArrayLike]] = None, log_det: bool = False
                  ) -> jax.Array:
    """The settled energy averaged over the batch (a float32 scalar): settles ``x0`` with x_L
    clamped to ``target`` (arguments as for :func:`settle_learn`), returning E (F with
    ``log_det``). Differentiable w.r.t. ``weights``, ``biases`` and the precision arrays: at a
    settled state the states' own gradient is zero, so the parameters' gradient is the energy's
    partial derivative (the learning rule of predictive coding), which the library returns from
    the same call. ``x0``, ``target`` and ``init`` get no gradient. Works under ``jax.jit``;
    under ``jax.vmap`` each map entry settles separately (its gradients are its own)."""
    s, x0, target, ws, bs, pis, init_l = _prepare(weights, x0, biases, activations, precisions,
                                                  eta, steps, momentum, tol, log_det, init,
                                                  True, target)
    return _energy_fn(s)(ws, bs, pis, x0, target, init_l)
