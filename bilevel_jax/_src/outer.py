"""Upper-level algorithms for ``min_x F(x) = f(x, y*(x))`` (docs page ``algorithms.md``).

Every algorithm is a factory returning an :class:`Algorithm` ``(init, step, run, output)`` of
pure functions, in the style of optax: ``init(x0, key) -> State``,
``step(state, *batch) -> (State, StepInfo)``, ``run(x0, key, num_steps) -> (x, history)`` (a
``lax.scan`` of ``step``) and ``output(state) -> x``. States and step diagnostics are separate
NamedTuples; a state keeps the same structure and dtypes from step to step, so ``step`` runs
under ``jit``, ``scan`` and ``vmap``.

The lower level ``y*(x) = argmin_y g(y, x)`` over linear constraints (``eq``, ``ineq``,
``box``) is solved by :func:`~bilevel_jax.argmin`, whose hypergradient rule
(``"implicit"``, ``"penalty"``, ``"finite_difference"``) gives the hypergradient by
``jax.grad``; SIGD's fixed number of projected-gradient steps is a second lower-level mode
(:func:`pgd_solution`). No algorithm defines a ``custom_vjp`` of its own.

| factory | algorithm | default optimizer | reference |
|---|---|---|---|
| :func:`ssigd` | [S]SIGD: perturbed LL, implicit gradient, projected step | SGD 0.1 | SIGD Alg. 2 |
| :func:`dsigd` | [D]SIGD: the same with Armijo backtracking | SGD 1 (s = 1) | SIGD Alg. 1 |
| :func:`f2cba` | O2NC with the penalty oracle, or its Adam variant | SGD / Adam | F2CBA |
| :func:`zeroth_order` | O2NC with a two-point spherical estimator | SGD | F2CBA |
| :func:`equality_gd` | gradient descent, finite-difference oracle | SGD 0.1 | F2CBA |
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src.argmin import argmin
from bilevel_jax._src.implicit import implicit_solution
from bilevel_jax._src.problems import BilevelProblem
from bilevel_jax._src.progress import make_progress
from bilevel_jax._src.projections import is_set
from bilevel_jax._src.projections import project as project_onto
from bilevel_jax._src.smoothing import DISTRIBUTIONS, linear_perturbation
from bilevel_jax._src.types import Array, PyTree, Status
from bilevel_jax._src.validation import check_option, check_scalar_output, flatten_variables

__all__ = [
    "Algorithm",
    "O2NCState",
    "State",
    "StepInfo",
    "dsigd",
    "equality_gd",
    "f2cba",
    "pgd_solution",
    "ssigd",
    "zeroth_order",
]

HYPERGRADS = ("implicit", "penalty", "finite_difference")
F2CBA_METHODS = ("o2nc", "adam")
#: ``dsigd``'s slack rules: decaying with the lower-level accuracy (the theorem's), or the
#: authors' practical ``a e0 / m``.
SLACK_RULES = ("accuracy", "backtracks")


class State(NamedTuple):
    """The carried state of an upper-level algorithm.

    Attributes:
      x: the upper-level iterate (a pytree like ``x0``).
      y: the lower-level warm start, the last ``y_hat`` (a pytree like ``y0``).
      opt_state: the optax state of ``optimizer``.
      key: the PRNG key for the next step's randomness.
      count: steps taken (``int32``).
      extra: algorithm-specific data: SIGD's perturbation ``q`` (like ``y0``), an
        :class:`O2NCState`, or ``()``.
    """

    x: PyTree
    y: PyTree
    opt_state: PyTree
    key: Array
    count: Array
    extra: PyTree


class O2NCState(NamedTuple):
    """O2NC's extra state.

    Attributes:
      delta: the current increment ``Delta_t`` (like ``x``), ``||delta|| <= radius``.
      sum_z: sum of the evaluation points ``z_t`` of the current block.
      sum_grad: sum of the gradient estimates of the current block.
      block_count: steps in the current block (``int32``).
      best_x: the output candidate: the block average ``x_bar_k`` with the smallest
        ``||mean g||`` so far (``output_rule="best"``), or a block average drawn uniformly
        from the blocks completed so far (``"random"``, by reservoir sampling).
      best_grad_norm: that block's ``||mean g||`` (``inf`` before the first full block).
      num_blocks: blocks completed so far (``int32``).
    """

    delta: PyTree
    sum_z: PyTree
    sum_grad: PyTree
    block_count: Array
    best_x: PyTree
    best_grad_norm: Array
    num_blocks: Array = 0


class StepInfo(NamedTuple):
    """Diagnostics of one step (stacked along a leading axis by ``run``).

    Attributes:
      x: the point where the hypergradient was estimated (``x_r``; O2NC: ``z_t``).
      value: ``F_hat = f(x, y_hat)`` there (zeroth order: the mean of its two values).
      grad: the hypergradient estimate (like ``x``).
      grad_norm: its norm.
      num_active: inequality or box constraints active at ``y_hat`` (``int32``).
      num_backtracks: Armijo backtracks ([D]SIGD; 0 for the others) (``int32``).
      lower_residual: the lower solve's optimality residual.
      status: ``Status.NONFINITE`` if the estimate was not finite (the step is then skipped,
        the state is kept), else the lower solve's status (``int32``).
    """

    x: PyTree
    value: Array
    grad: PyTree
    grad_norm: Array
    num_active: Array
    num_backtracks: Array
    lower_residual: Array
    status: Array


class Algorithm(NamedTuple):
    """An upper-level algorithm as pure functions (jit-, scan- and vmap-compatible).

    Attributes:
      init: ``init(x0, key) -> State``.
      step: ``step(state, *batch) -> (State, StepInfo)``; ``batch`` goes to ``f(x, y, *batch)``.
      run: ``run(x0, key, num_steps, *, batches=None, callback=None, verbose=False) -> (x,
        history)``: ``num_steps`` steps in a ``lax.scan`` (``history`` the stacked
        :class:`StepInfo`, ``x = output(final state)``); ``batches`` is a tuple of arrays with
        leading axis ``num_steps``; ``callback(step_index, info)`` runs through
        ``jax.debug.callback``. ``verbose=True`` shows progress (value, hypergradient norm,
        status name): a tqdm bar if tqdm is installed (``pip install
        "bilevel_jax[progress]"``), else a printed line every ``num_steps // 10`` steps;
        ``"tqdm"`` or ``"print"`` choose. Under ``jax.vmap`` the display follows one member.
        Jit it with ``jax.jit(alg.run, static_argnames=("num_steps", "callback", "verbose"))``.
      output: ``output(state) -> x``: the iterate, or O2NC's best block average.
    """

    init: Callable
    step: Callable
    run: Callable
    output: Callable


# --------------------------------------------------------------------------------------------
# Small helpers.


def _tree_vdot(a, b):
    return sum(jnp.vdot(u, v) for u, v in zip(
        jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


def _tree_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.abs(leaf) ** 2) for leaf in jax.tree_util.tree_leaves(tree)))


def _all_finite(tree):
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.asarray([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _select(pred, new, old):
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), new, old)


def _cast_like(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def _x_dtype(x0):
    return jnp.result_type(*jax.tree_util.tree_leaves(x0))


def _flat_bound(bound, y, dtype):
    """A box bound (scalar, or a pytree like ``y``) as a flat array of ``y``'s size."""
    y_flat = ravel_pytree(y)[0]
    if not jax.tree_util.tree_leaves(bound) or jnp.ndim(bound) == 0 and not isinstance(
            bound, (tuple, list, dict)):
        return jnp.full(y_flat.shape, bound, dtype)
    leaves = jax.tree_util.tree_map(
        lambda b, v: jnp.broadcast_to(jnp.asarray(b, dtype), jnp.shape(v)), bound, y)
    return ravel_pytree(leaves)[0]


def _check_optimizer(optimizer):
    if not (callable(getattr(optimizer, "init", None))
            and callable(getattr(optimizer, "update", None))):
        raise TypeError(
            "optimizer must be an optax.GradientTransformation (with init and update), got "
            f"{type(optimizer).__name__}."
        )


def _check_positive(name, value, *, allow_zero=False):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}.")


def _check_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")


def _make_projection(projection):
    """``None``, a set object (``Box``, ``Simplex``, ...) or a callable ``x -> Proj_X(x)``."""
    if projection is None:
        return lambda x: x
    if is_set(projection) or isinstance(projection, (tuple, list, dict)):
        return lambda x: project_onto(projection, x)
    if callable(projection):
        return projection
    raise TypeError(
        "projection must be None, a set with a project() method (e.g. bj.Box, bj.Simplex) or "
        f"a callable x -> Proj_X(x), got {type(projection).__name__}."
    )


def _problem_projection(f, projection):
    """A :class:`BilevelProblem`'s upper-level domain when no ``projection`` is passed."""
    if projection is None and isinstance(f, BilevelProblem):
        return f.projection
    return projection


def _unpack(f, g, y0, eq, ineq, box):
    """Accept plain callables ``(f, g, y0)`` or a :class:`BilevelProblem` in place of ``f``."""
    if isinstance(f, BilevelProblem):
        problem = f
        if g is not None or y0 is not None:
            raise TypeError("pass either a BilevelProblem, or f, g and y0, not both.")
        if (ineq is not None and problem.ineq is not None) or (
                box is not None and problem.box is not None):
            raise TypeError("the BilevelProblem already has ineq/box constraints; do not "
                            "pass them again.")
        return (problem.f, problem.g, jnp.zeros(problem.dim_y), eq,
                ineq if problem.ineq is None else problem.ineq,
                box if problem.box is None else problem.box)
    for name, fn in (("f", f), ("g", g)):
        if not callable(fn):
            raise TypeError(f"{name} must be a callable (or f a BilevelProblem), got "
                            f"{type(fn).__name__}.")
    if y0 is None:
        raise TypeError("y0 (the lower-level warm start, a pytree of floats) is required.")
    for name, fn in (("eq", eq), ("ineq", ineq), ("box", box)):
        if fn is not None and not callable(fn):
            raise TypeError(f"{name} must be None or a callable of x, got {type(fn).__name__}.")
    flatten_variables("y0", y0)
    return f, g, y0, eq, ineq, box


# --------------------------------------------------------------------------------------------
# SIGD Algorithm 3: a fixed number of projected-gradient steps, implicit rule at y_hat.


def pgd_solution(g, y0, x, *, steps, step_size, eq=None, ineq=None, box=None, q=None):
    r"""``steps`` projected-gradient steps on the lower level, differentiable in ``x``.

    SIGD Algorithm 3: ``y <- Proj_Y(y - gamma grad_y g_q(y, x))`` from the warm start ``y0``,
    ``g_q = g + <q, y>``. The returned ``y_hat`` is an inexact solution; its derivative is the
    implicit rule of the fixed-point residual ``r(y, x) = y - Proj_Y(y - gamma grad_y g_q)``
    evaluated at ``y_hat`` (SIGD's "implicit gradient at the approximate solution"): with
    ``D`` the Jacobian of the projection (the free-coordinate mask for a box, the projector
    onto the null space of the active rows for a polyhedron),
    ``(I - D (I - gamma H))^T u = ybar`` and ``xbar = -gamma (D J)^T u`` (plus the term of
    ``Proj_Y``'s own dependence on ``x`` for coupled constraints), which at an exact
    solution with strict complementarity equals the active-set rule of :func:`~bilevel_jax.argmin`.
    ``Proj_Y`` is ``clip`` for a box alone, else a quadratic program solved by
    :func:`~bilevel_jax.argmin` (interior point; ``eq``/``ineq`` may depend on ``x``).

    Args:
      g: ``g(y, x) -> scalar``.
      y0: warm start (a pytree of floats); receives no gradient.
      x: upper-level variable (a pytree).
      steps: number of projected-gradient steps (``>= 1``).
      step_size: ``gamma > 0`` (``gamma <= 1/L_g`` for the rate ``(1 - mu_g/L_g)^steps``).
      eq: ``eq(x) -> (A, b)`` or ``None``.
      ineq: ``ineq(x) -> (G, h)`` or ``None``.
      box: ``box(x) -> (lo, hi)`` or ``None``.
      q: linear perturbation (a pytree like ``y0``) or ``None``.

    Returns:
      ``(y_hat, residual)``: ``y_hat`` like ``y0`` and the fixed-point residual
      ``||r(y_hat, x)|| / gamma`` (the gradient mapping).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel_jax import algorithms
      >>> g = lambda y, x: 0.5 * y @ y + x @ y  # y* = clip(-x, -1, 1)
      >>> def y_hat(x):
      ...     return algorithms.pgd_solution(g, jnp.zeros(2), x, steps=50, step_size=0.5,
      ...                                    box=lambda x: (-1.0, 1.0))[0]
      >>> jac = jax.jacrev(y_hat)(jnp.array([0.5, 2.0]))  # diag(-1, 0)

    References:
      Khanduri et al. Linearly Constrained Bilevel Optimization: A Smoothed Implicit Gradient
      Approach. ICML 2023, Algorithm 3 (projected gradient lower level) and §3 (the implicit
      gradient at the approximate solution).
    """
    y_flat, unravel = ravel_pytree(y0)
    dtype = y_flat.dtype
    q_flat = jnp.zeros_like(y_flat) if q is None else ravel_pytree(q)[0].astype(dtype)

    def project(z, x_):
        if eq is None and ineq is None:
            if box is None:
                return z
            lo, hi = box(x_)
            return jnp.clip(z, _flat_bound(lo, y0, dtype), _flat_bound(hi, y0, dtype))
        sol = argmin(lambda y, t: 0.5 * jnp.sum((y - t[0]) ** 2), z, (z, x_),
                     eq=None if eq is None else lambda t: eq(t[1]),
                     ineq=None if ineq is None else lambda t: ineq(t[1]),
                     box=None if box is None else lambda t: box(t[1]))
        return sol.y

    def residual_raw(yf, x_, q_):
        grad = ravel_pytree(jax.grad(g)(unravel(yf), x_))[0] + q_
        return yf - project(yf - step_size * grad, x_)

    # Closure conversion: arrays g / eq / ineq / box close over become explicit inputs.
    conv, consts = jax.closure_convert(residual_raw, y_flat, x, q_flat)
    params = (x, q_flat, tuple(consts))

    def residual(yf, p):
        return conv(yf, p[0], p[1], *p[2])

    def solve(z0, p):
        y = jax.lax.fori_loop(0, steps, lambda _, y: y - residual(y, p), z0)
        return y, jnp.linalg.norm(residual(y, p)) / step_size

    def adjoint_solve(vjp_z, zbar, z, p, aux):
        sol = ls.linear_solve(vjp_z, zbar, method="auto", structure="general")
        return ls.solution_or_nan(sol, what="projected-gradient adjoint solve")

    y, res = implicit_solution(solve, residual, adjoint_solve,
                               jax.lax.stop_gradient(y_flat), params)
    return unravel(y), res


# --------------------------------------------------------------------------------------------
# The lower level: y_hat(x), F_hat(x) = f(x, y_hat) and its gradient.


class _Lower(NamedTuple):
    solve: Callable  # (x, y_warm, q) -> (y_hat, residual, status)
    num_active: Callable  # (x, y_hat) -> int32


def _make_lower(g, eq, ineq, box, *, hypergrad, alpha, delta, lower_steps, lower_step_size,
                lower_kwargs):
    lower_kwargs = dict(lower_kwargs or {})

    def solve(x, y_warm, q):
        if lower_steps is not None:
            y, res = pgd_solution(g, y_warm, x, steps=lower_steps, step_size=lower_step_size,
                                  eq=eq, ineq=ineq, box=box, q=q)
            status = jnp.where(_all_finite(y), Status.SUCCESS, Status.NONFINITE)
            return y, res, status.astype(jnp.int32)
        g_q = g if q is None else (lambda y, t: g(y, t) + _tree_vdot(q, y))
        sol = argmin(g_q, y_warm, x, eq=eq, ineq=ineq, box=box, hypergrad=hypergrad,
                     alpha=alpha, delta=delta, **lower_kwargs)
        return sol.y, sol.info.residual, sol.info.status

    def num_active(x, y):
        y_flat = ravel_pytree(y)[0]
        tol = jnp.sqrt(jnp.finfo(y_flat.dtype).eps)
        count = jnp.zeros((), jnp.int32)
        if ineq is not None:
            G, h = ineq(x)
            slack = h - G @ y_flat
            active = jnp.isfinite(h) & (slack <= tol * (1 + jnp.abs(h)))
            count = count + jnp.sum(active).astype(jnp.int32)
        if box is not None:
            lo, hi = box(x)
            lo = _flat_bound(lo, y, y_flat.dtype)
            hi = _flat_bound(hi, y, y_flat.dtype)
            active = ((y_flat - lo <= tol * (1 + jnp.abs(lo))) & jnp.isfinite(lo)) | (
                (hi - y_flat <= tol * (1 + jnp.abs(hi))) & jnp.isfinite(hi))
            count = count + jnp.sum(active).astype(jnp.int32)
        return jax.lax.stop_gradient(count)

    return _Lower(solve, num_active)


def _value_and_grad(f, lower, x, y_warm, q, batch):
    """``F_hat(x) = f(x, y_hat(x), *batch)``, its gradient (the hypergradient rule) and data."""

    def value(x_):
        y, res, status = lower.solve(x_, y_warm, q)
        return f(x_, y, *batch), (y, res, status)

    (val, (y, res, status)), grad = jax.value_and_grad(value, has_aux=True)(x)
    return val, grad, jax.lax.stop_gradient(y), res, status


def _value(f, lower, x, y_warm, q, batch):
    y, res, status = lower.solve(x, y_warm, q)
    return jax.lax.stop_gradient(f(x, y, *batch)), jax.lax.stop_gradient(y), status


def _check_f(f, x, y, batch):
    check_scalar_output(f, (x, y, *batch), "f(x, y, *batch)", "f(x, y, *batch)")


def _finish(lower, x_eval, value, grad, y, res, status, backtracks=0):
    finite = _all_finite((grad, value))
    status = jnp.where(finite, status, Status.NONFINITE).astype(jnp.int32)
    info = StepInfo(x_eval, value, grad, _tree_norm(grad), lower.num_active(x_eval, y),
                    jnp.asarray(backtracks, jnp.int32), jnp.asarray(res, value.dtype), status)
    return finite, info


# --------------------------------------------------------------------------------------------
# The algorithm skeleton: init, step, run, output.


def _build(init, step, output):
    def run(x0, key, num_steps, *, batches=None, callback=None, verbose=False):
        _check_int("num_steps", num_steps, 0)
        display = make_progress(num_steps, verbose)
        if batches is not None:
            batches = tuple(batches) if isinstance(batches, (tuple, list)) else (batches,)
            for leaf in jax.tree_util.tree_leaves(batches):
                if jnp.ndim(leaf) == 0 or jnp.shape(leaf)[0] != num_steps:
                    raise ValueError(
                        f"batches must have a leading axis of length num_steps={num_steps}, "
                        f"got a leaf of shape {jnp.shape(leaf)}.")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {type(callback).__name__}.")

        def body(state, batch):
            new_state, info = step(state, *(() if batch is None else batch))
            if callback is not None:
                jax.debug.callback(callback, state.count, info)
            if display is not None:
                jax.debug.callback(display, state.count, info.value, info.grad_norm, info.status)
            return new_state, info

        state, history = jax.lax.scan(body, init(x0, key), batches, length=num_steps)
        return output(state), history

    return Algorithm(init, step, run, output)


def _init_common(x0, key, y0, optimizer, opt_params=None):
    flatten_variables("x0", x0)
    if not (hasattr(key, "dtype") and (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                       or key.dtype == jnp.uint32)):
        raise TypeError(f"key must be a jax.random key, got {type(key).__name__}.")
    dtype = _x_dtype(x0)
    x0 = _cast_like(x0, dtype)
    y = _cast_like(y0, dtype)
    opt_state = optimizer.init(x0 if opt_params is None else opt_params(x0))
    return x0, y, opt_state, dtype


def _descent(f, g, y0, *, eq, ineq, box, optimizer, projection, hypergrad, alpha, delta,
             lower_steps, lower_step_size, lower_kwargs, perturbation):
    """``x <- Proj_X(x + optimizer(grad F_hat(x)))``: SSIGD, the Adam variant, equality GD."""
    lower = _make_lower(g, eq, ineq, box, hypergrad=hypergrad, alpha=alpha, delta=delta,
                        lower_steps=lower_steps, lower_step_size=lower_step_size,
                        lower_kwargs=lower_kwargs)
    proj = _make_projection(projection)

    def init(x0, key):
        x0, y, opt_state, _ = _init_common(x0, key, y0, optimizer)
        check_scalar_output(g, (y, x0), "g(y0, x0)", "g(y, x)")
        key, q_key = jax.random.split(key)
        extra = () if perturbation is None else linear_perturbation(q_key, y, *perturbation)
        return State(proj(x0), y, opt_state, key, jnp.zeros((), jnp.int32), extra)

    def step(state, *batch):
        _check_f(f, state.x, state.y, batch)
        q = None if perturbation is None else state.extra
        value, grad, y, res, status = _value_and_grad(f, lower, state.x, state.y, q, batch)
        finite, info = _finish(lower, state.x, value, grad, y, res, status)
        updates, opt_state = optimizer.update(grad, state.opt_state, state.x)
        x = proj(optax.apply_updates(state.x, updates))
        new = State(x, y, opt_state, state.key, state.count + 1, state.extra)
        return _select(finite, new, state._replace(count=state.count + 1)), info

    return _build(init, step, lambda state: state.x)


# --------------------------------------------------------------------------------------------
# Public factories.


def _check_common(optimizer, hypergrad, alpha, delta, lower_steps, lower_step_size,
                  lower_kwargs):
    _check_optimizer(optimizer)
    check_option("hypergrad", hypergrad, HYPERGRADS)
    _check_positive("alpha", alpha)
    _check_positive("delta", delta)
    if lower_steps is not None:
        _check_int("lower_steps", lower_steps, 1)
        if hypergrad != "implicit":
            raise ValueError(f"lower_steps (projected-gradient lower level) needs "
                             f"hypergrad='implicit', got {hypergrad!r}.")
    _check_positive("lower_step_size", lower_step_size)
    if lower_kwargs is not None and not isinstance(lower_kwargs, dict):
        raise TypeError(f"lower_kwargs must be None or a dict of argmin options, got "
                        f"{type(lower_kwargs).__name__}.")


def ssigd(
    f: Callable | BilevelProblem,
    g: Callable | None = None,
    y0: PyTree = None,
    *,
    eq: Callable | None = None,
    ineq: Callable | None = None,
    box: Callable | None = None,
    learning_rate: float = 0.1,
    optimizer: optax.GradientTransformation | None = None,
    projection: Any = None,
    perturbation_scale: float = 1e-3,
    distribution: str = "sphere",
    hypergrad: str = "implicit",
    lower_steps: int | None = None,
    lower_step_size: float = 0.1,
    lower_kwargs: dict | None = None,
    alpha: float = 1e-3,
    delta: float = 1e-4,
) -> Algorithm:
    r"""[S]SIGD: smoothed implicit gradient descent (SIGD Algorithm 2).

    Draws ``q ~ Q`` once (in ``init``, from ``key``) and solves the perturbed lower level
    ``y_q*(x) = argmin_y g(y, x) + <q, y>`` over the linear constraints; a random ``q`` makes
    strict complementarity hold w.p. 1 at every iterate, so ``F_q(x) = f(x, y_q*(x))`` is
    differentiable there and its gradient is the active-set implicit rule (docs:
    ``lower/inequality.md``, sections 'Implicit' and 'SIGD smoothing')::

        y_hat_r ~ y_q*(x_r);   g_r = grad F_hat(x_r; xi_r);   x_{r+1} = Proj_X(x_r - eta g_r)

    ``xi_r`` is the ``batch`` passed to ``step`` (``f(x, y, *batch)``): a stochastic upper
    gradient. The bias is ``|F_q - F| <= L_f ||q|| / mu_g``.

    Assumptions: ``g`` strongly convex in ``y``; LICQ; the constraints may depend on ``x``.
    Guarantees (w.p. 1 over ``q``, ``X`` compact): ``O(1/sqrt(T)) + O(delta^2)`` for the Moreau
    envelope gradient of a weakly convex ``F`` with ``eta ~ 1/sqrt(T)``; ``eta_r = 1/(mu (r+1))``
    for a ``mu``-strongly convex ``F`` (pass ``optax.sgd(schedule)``).

    Cost: one lower solve and one backward linear solve per step. Under ``jax.vmap`` (e.g.
    over keys), the lower solver's ``while_loop`` runs to the slowest member.

    Args:
      f: upper level ``f(x, y, *batch) -> scalar``, or a
        :class:`~bilevel_jax.problems.BilevelProblem` (then ``g``, ``y0``, ``ineq``, ``box``
        come from it).
      g: lower level ``g(y, x) -> scalar``.
      y0: lower-level warm start (a pytree of floats); cast to ``x0``'s dtype.
      eq: ``eq(x) -> (A, b)``: ``A y = b``.
      ineq: ``ineq(x) -> (G, h)``: ``G y <= h``.
      box: ``box(x) -> (lo, hi)``.
      learning_rate: step ``eta`` of the default optimizer ``optax.sgd(learning_rate)``.
      optimizer: any ``optax.GradientTransformation`` (overrides ``learning_rate``).
      projection: the upper-level set ``X``: ``None`` (``R^d``, or the problem's own
        ``projection`` when ``f`` is a :class:`~bilevel_jax.problems.BilevelProblem`), a set
        (``bj.Box``, ``bj.Simplex``, ...) or a callable ``x -> Proj_X(x)``.
      perturbation_scale: scale of ``q`` (0 disables the smoothing: plain implicit gradient
        descent).
      distribution: ``"sphere"`` (``||q|| = scale``, the SIGD comparison code) or
        ``"normal"`` (``q ~ N(0, scale^2 I)``).
      hypergrad: the :func:`~bilevel_jax.argmin` rule (``"implicit"``, ``"penalty"``, ...).
      lower_steps: ``None``: exact lower solve by ``argmin``; an integer: that many
        projected-gradient steps from the previous ``y_hat`` (SIGD Algorithm 3,
        :func:`pgd_solution`).
      lower_step_size: ``gamma`` of the projected-gradient steps.
      lower_kwargs: extra options for :func:`~bilevel_jax.argmin` (``tol``, ``max_iter``, ...).
      alpha: the penalty rule's accuracy (``hypergrad="penalty"``).
      delta: the finite-difference rule's step (``hypergrad="finite_difference"``).

    Returns:
      An :class:`Algorithm`; ``State.extra`` is ``q``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> from bilevel_jax import algorithms
      >>> problem = bj.problems.sigd_quadratic(17)
      >>> alg = algorithms.ssigd(problem, learning_rate=0.1)
      >>> x, history = alg.run(problem.x0, jax.random.PRNGKey(0), 50)
      >>> bool(jnp.allclose(jnp.abs(x), 2.0, atol=1e-2))
      True

    References:
      Khanduri, Tsaknakis, Zhang, Liu, Liu, Zhang, Hong. Linearly Constrained Bilevel
      Optimization: A Smoothed Implicit Gradient Approach. ICML 2023, Algorithms 2 and 3.
    """
    projection = _problem_projection(f, projection)
    f, g, y0, eq, ineq, box = _unpack(f, g, y0, eq, ineq, box)
    optimizer = optax.sgd(learning_rate) if optimizer is None else optimizer
    _check_positive("learning_rate", learning_rate)
    _check_common(optimizer, hypergrad, alpha, delta, lower_steps, lower_step_size,
                  lower_kwargs)
    _check_positive("perturbation_scale", perturbation_scale, allow_zero=True)
    check_option("distribution", distribution, DISTRIBUTIONS)
    return _descent(f, g, y0, eq=eq, ineq=ineq, box=box, optimizer=optimizer,
                    projection=projection, hypergrad=hypergrad, alpha=alpha, delta=delta,
                    lower_steps=lower_steps, lower_step_size=lower_step_size,
                    lower_kwargs=lower_kwargs,
                    perturbation=(perturbation_scale, distribution))


def dsigd(
    f: Callable | BilevelProblem,
    g: Callable | None = None,
    y0: PyTree = None,
    *,
    eq: Callable | None = None,
    ineq: Callable | None = None,
    box: Callable | None = None,
    optimizer: optax.GradientTransformation | None = None,
    projection: Any = None,
    sigma: float = 1e-4,
    backtrack_factor: float = 0.9,
    max_backtracks: int = 30,
    slack: float = 1.0,
    slack_rule: str = "accuracy",
    perturbation_scale: float = 1e-3,
    distribution: str = "sphere",
    hypergrad: str = "implicit",
    lower_steps: int | None = None,
    lower_step_size: float = 0.1,
    lower_kwargs: dict | None = None,
    alpha: float = 1e-3,
    delta: float = 1e-4,
) -> Algorithm:
    r"""[D]SIGD: smoothed implicit gradient with Armijo backtracking (SIGD Algorithm 1).

    As :func:`ssigd` (``q`` drawn once, ``g_r = grad F_hat(x_r)`` from the implicit rule at
    ``y_hat_r``), then::

        x~_r = Proj_X(x_r + u_r)   (u_r = optimizer update of g_r; default -s g_r, s = 1)
        d_r = x~_r - x_r ;   a_r = c^m, the smallest m in 0..max_backtracks with
        F_hat(x_r) - F_hat(x_r + a_r d_r) >= -sigma a_r g_r^T d_r - eps_r
        x_{r+1} = x_r + a_r d_r

    The slack ``eps_r`` absorbs the error of the inexact lower level in the two values. The
    convergence theorem bounds it by a multiple of the lower-level accuracies at ``x_r`` and at
    the trial point, so it vanishes as they do; ``slack_rule="accuracy"`` (default) uses
    ``eps_r = e0 (delta_r + delta_trial)`` with ``delta`` the lower solve's residual at each
    point (``info.residual`` of ``argmin``, the projected-gradient residual with
    ``lower_steps``): plain Armijo once the lower level is solved exactly. The authors'
    practical rule, ``slack_rule="backtracks"``, uses ``eps_r = a_r e0 / m`` (``m >= 1``
    counting the trials), which does not decay with ``r``. ``slack=0`` gives plain Armijo
    under either rule. If no trial passes, the smallest step ``c^max_backtracks`` is taken
    (``num_backtracks = max_backtracks``). Trial values ``F_hat`` use the same lower solver as
    the gradient, warm-started at ``y_hat_r`` (the authors: 20 PGD steps from a random start).
    Theorem 1: with ``delta_r -> 0`` every limit point is stationary w.p. 1 (no Lipschitz
    ``grad F`` needed).

    Defaults. The library's defaults are the settings the theorem covers: ``sigma = 1e-4``
    (the textbook Armijo constant) and the decaying ``"accuracy"`` slack with ``e0 = 1``. The
    authors' practical settings, ``sigma = 1`` with ``slack_rule="backtracks"`` and ``e0 = 1``
    (``bench/sigd_quadratics.py`` passes them), suit their non-convex test problems but need
    not converge: ``sigma = 1`` asks for at least the first-order decrease, which a convex
    ``F_hat`` never gives, so every accepted step is accepted through the slack, and a slack
    that does not decay lets the iterates wander. On a box-constrained quadratic bilevel
    problem with a known minimiser (the test ``test_dsigd_defaults_converge``) they stall at a
    relative distance of 0.11 after 600 steps, while the defaults reach 9e-5 (the bias of the
    1e-3 perturbation).

    Cost: one lower solve plus ``1 + num_backtracks`` lower solves (values only) per step, in
    a ``lax.while_loop``; under ``jax.vmap`` the loop runs to the slowest member.

    Args:
      f: ``f(x, y, *batch) -> scalar`` or a :class:`~bilevel_jax.problems.BilevelProblem`.
      g: ``g(y, x) -> scalar``.
      y0: lower-level warm start.
      eq: ``eq(x) -> (A, b)``.
      ineq: ``ineq(x) -> (G, h)``.
      box: ``box(x) -> (lo, hi)``.
      optimizer: gives the trial direction (default ``optax.sgd(1.0)``: ``s = 1``).
      projection: the upper-level set ``X`` (see :func:`ssigd`).
      sigma: Armijo parameter (default 1e-4; the authors use 1).
      backtrack_factor: ``c`` in ``(0, 1)`` (0.9; 0.95 for problem (17)).
      max_backtracks: at most this many backtracks (30).
      slack: ``e0 >= 0``, the scale of the slack (1).
      slack_rule: ``"accuracy"`` (default; ``eps_r = e0 (delta_r + delta_trial)``, decaying
        with the lower-level accuracy as in the theorem) or ``"backtracks"`` (the authors'
        ``a e0 / m``).
      perturbation_scale: scale of ``q`` (see :func:`ssigd`).
      distribution: ``"sphere"`` or ``"normal"``.
      hypergrad: the :func:`~bilevel_jax.argmin` rule.
      lower_steps: ``None`` (exact) or the number of projected-gradient steps.
      lower_step_size: their step ``gamma``.
      lower_kwargs: extra :func:`~bilevel_jax.argmin` options.
      alpha: penalty-rule accuracy.
      delta: finite-difference step.

    Returns:
      An :class:`Algorithm`; ``State.extra`` is ``q``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> from bilevel_jax import algorithms
      >>> problem = bj.problems.sigd_quadratic(16)
      >>> alg = algorithms.dsigd(problem, lower_steps=10, lower_step_size=1.0)
      >>> x, history = alg.run(problem.x0, jax.random.PRNGKey(0), 60)
      >>> bool(jnp.allclose(jnp.abs(x), 10.0, atol=1e-2))
      True

    References:
      Khanduri et al. Linearly Constrained Bilevel Optimization: A Smoothed Implicit Gradient
      Approach. ICML 2023, Algorithm 1 and Theorem 1.
    """
    projection = _problem_projection(f, projection)
    f, g, y0, eq, ineq, box = _unpack(f, g, y0, eq, ineq, box)
    optimizer = optax.sgd(1.0) if optimizer is None else optimizer
    _check_common(optimizer, hypergrad, alpha, delta, lower_steps, lower_step_size,
                  lower_kwargs)
    _check_positive("sigma", sigma)
    if not (isinstance(backtrack_factor, (int, float)) and 0 < backtrack_factor < 1):
        raise ValueError(f"backtrack_factor must be in (0, 1), got {backtrack_factor!r}.")
    _check_int("max_backtracks", max_backtracks, 0)
    _check_positive("slack", slack, allow_zero=True)
    check_option("slack_rule", slack_rule, SLACK_RULES)
    _check_positive("perturbation_scale", perturbation_scale, allow_zero=True)
    check_option("distribution", distribution, DISTRIBUTIONS)
    lower = _make_lower(g, eq, ineq, box, hypergrad=hypergrad, alpha=alpha, delta=delta,
                        lower_steps=lower_steps, lower_step_size=lower_step_size,
                        lower_kwargs=lower_kwargs)
    proj = _make_projection(projection)

    def init(x0, key):
        x0, y, opt_state, _ = _init_common(x0, key, y0, optimizer)
        check_scalar_output(g, (y, x0), "g(y0, x0)", "g(y, x)")
        key, q_key = jax.random.split(key)
        q = linear_perturbation(q_key, y, perturbation_scale, distribution)
        return State(proj(x0), y, opt_state, key, jnp.zeros((), jnp.int32), q)

    def step(state, *batch):
        _check_f(f, state.x, state.y, batch)
        x, q = state.x, state.extra
        value, grad, y, res, status = _value_and_grad(f, lower, x, state.y, q, batch)
        updates, opt_state = optimizer.update(grad, state.opt_state, x)
        direction = jax.tree_util.tree_map(jnp.subtract,
                                           proj(optax.apply_updates(x, updates)), x)
        slope = _tree_vdot(grad, direction)
        dtype = value.dtype

        def trial(m):
            a = jnp.asarray(backtrack_factor, dtype) ** m
            x_t = jax.tree_util.tree_map(lambda u, d: u + a * d, x, direction)
            y_t, res_t, _ = lower.solve(x_t, y, q)
            value_t = jax.lax.stop_gradient(f(x_t, y_t, *batch))
            if slack_rule == "backtracks":
                eps = a * slack / (m + 1)
            else:
                eps = slack * (jnp.asarray(res, dtype) + jnp.asarray(res_t, dtype))
                eps = jnp.where(jnp.isfinite(eps), eps, 0)
            ok = value - value_t >= -sigma * a * slope - eps
            return ok & jnp.isfinite(value_t)

        def cond(carry):
            m, ok = carry
            return ~ok & (m < max_backtracks)

        def body(carry):
            m, _ = carry
            return m + 1, trial(m + 1)

        m, _ = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), trial(0)))
        a = jnp.asarray(backtrack_factor, dtype) ** m
        x_new = jax.tree_util.tree_map(lambda u, d: u + a * d, x, direction)
        finite, info = _finish(lower, x, value, grad, y, res, status, m)
        new = State(x_new, y, opt_state, state.key, state.count + 1, q)
        return _select(finite, new, state._replace(count=state.count + 1)), info

    return _build(init, step, lambda state: state.x)


#: O2NC's output rules: the block average with the smallest mean gradient, or the theory's
#: uniformly random block average.
OUTPUT_RULES = ("best", "random")


def _o2nc(oracle, y0, *, optimizer, projection, radius, block_size, output_rule="best"):
    """The O2NC loop around ``oracle(z, y_warm, key, batch)``."""
    proj = _make_projection(projection)

    def init(x0, key):
        x0, y, opt_state, dtype = _init_common(
            x0, key, y0, optimizer, opt_params=lambda x: jax.tree_util.tree_map(
                jnp.zeros_like, x))
        x0 = proj(x0)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, x0)
        extra = O2NCState(zeros, zeros, zeros, jnp.zeros((), jnp.int32), x0,
                          jnp.asarray(jnp.inf, dtype), jnp.zeros((), jnp.int32))
        return State(x0, y, opt_state, key, jnp.zeros((), jnp.int32), extra)

    def step(state, *batch):
        o = state.extra
        key, s_key, o_key = jax.random.split(state.key, 3)
        x_prev = state.x
        x = proj(jax.tree_util.tree_map(jnp.add, x_prev, o.delta))
        s = jax.random.uniform(s_key, (), _x_dtype(x_prev))
        z = jax.tree_util.tree_map(lambda a, b: a + s * (b - a), x_prev, x)
        lower, value, grad, y, res, status = oracle(z, state.y, o_key, batch)
        finite, info = _finish(lower, z, value, grad, y, res, status)
        updates, opt_state = optimizer.update(grad, state.opt_state, o.delta)
        delta = optax.apply_updates(o.delta, updates)
        norm = _tree_norm(delta)
        scale = jnp.minimum(1, radius / jnp.where(norm > 0, norm, 1))
        delta = jax.tree_util.tree_map(lambda d: scale * d, delta)
        sum_z = jax.tree_util.tree_map(jnp.add, o.sum_z, z)
        sum_grad = jax.tree_util.tree_map(jnp.add, o.sum_grad, grad)
        count = o.block_count + 1
        full = count == block_size
        mean_norm = _tree_norm(sum_grad) / block_size
        num_blocks = o.num_blocks + full.astype(jnp.int32)
        if output_rule == "random":  # reservoir sampling: block k kept w.p. 1/k
            u = jax.random.uniform(jax.random.fold_in(s_key, 1), (), _x_dtype(x_prev))
            better = full & (u * num_blocks.astype(u.dtype) < 1)
        else:
            better = full & (mean_norm < o.best_grad_norm)
        best_x = _select(better, jax.tree_util.tree_map(lambda a: a / block_size, sum_z),
                         o.best_x)
        zeros = jax.tree_util.tree_map(jnp.zeros_like, sum_z)
        extra = O2NCState(delta, _select(full, zeros, sum_z), _select(full, zeros, sum_grad),
                          jnp.where(full, 0, count).astype(jnp.int32), best_x,
                          jnp.where(better, mean_norm, o.best_grad_norm), num_blocks)
        new = State(x, y, opt_state, key, state.count + 1, extra)
        kept = state._replace(key=key, count=state.count + 1)
        return _select(finite, new, kept), info

    def output(state):
        o = state.extra
        return _select(jnp.isfinite(o.best_grad_norm), o.best_x, state.x)

    return _build(init, step, output)


def _check_o2nc(radius, block_size, output_rule="best"):
    _check_positive("radius", radius)
    _check_int("block_size", block_size, 1)
    check_option("output_rule", output_rule, OUTPUT_RULES)


def f2cba(
    f: Callable | BilevelProblem,
    g: Callable | None = None,
    y0: PyTree = None,
    *,
    eq: Callable | None = None,
    ineq: Callable | None = None,
    box: Callable | None = None,
    method: str = "o2nc",
    alpha: float = 0.1,
    learning_rate: float | None = None,
    optimizer: optax.GradientTransformation | None = None,
    projection: Any = None,
    radius: float = 0.1,
    block_size: int = 10,
    hypergrad: str = "penalty",
    lower_kwargs: dict | None = None,
    output_rule: str = "best",
) -> Algorithm:
    r"""F2CBA: first-order (Hessian-free) methods with the penalty hypergradient oracle.

    Each step solves the lower level exactly (``y*``, ``lam*``, active set ``I``) with
    :func:`~bilevel_jax.argmin` and estimates ``grad F`` by the penalty oracle (docs
    ``lower/inequality.md``, 'Penalty'), error ``O(alpha)`` (``O(alpha^2)`` for quadratic ``g``)::

        y_a = argmin_y f(x, y) + alpha^-2 [l(x, y, lam*) - l(x, y*, lam*)]
                               + alpha^-4 / 2 ||h_I(x, y)||^2             (unconstrained)
        grad~F(x) = grad_x of the same Lagrangian at y_a

    ``method="o2nc"`` (the theory algorithm)::

        x_t = Proj_X(x_{t-1} + Delta_t),  z_t = x_{t-1} + s_t (x_t - x_{t-1}),  s_t ~ U[0, 1]
        Delta_{t+1} = clip_D(Delta_t + u_t)   (u_t = optimizer update of grad~F(z_t); -eta g)
        x_bar_k = mean of z_t over block k (block_size M); output the x_bar_k with the
        smallest ||mean g|| (output_rule="best"), or, as in the theory, an x_bar_k drawn
        uniformly from the completed blocks (output_rule="random")

    Guidance (derived from the rate): for ``(delta, eps)``-Goldstein stationarity take
    ``alpha ~ eps``, ``M ~ L_F^2/eps^2``, ``D ~ delta eps^2 / L_F^2`` (so ``D M ~ delta``),
    ``eta ~ delta eps^3 / L_F^4``; in practice ``D`` is the largest step per iteration.
    ``method="adam"`` (the authors' ``ffo`` branch, used for their Problem L.1 curves):
    ``x <- Proj_X(x + optimizer(grad~F(x)))`` with ``optax.adam(learning_rate)`` by default.

    Assumptions: ``g`` strongly convex in ``y``; LICQ; an accurate ``lam*``; ``ineq``/``eq``
    (with a box alone, pass the bounds as ``ineq`` rows for the penalty rule).
    Cost: one lower solve and one unconstrained penalised solve (Newton when ``n <= 500``,
    else L-BFGS) per step; no Hessian of ``g`` is formed by the rule. Under ``jax.vmap`` the
    inner ``while_loop``\ s run to the slowest member.

    Args:
      f: ``f(x, y, *batch) -> scalar`` or a :class:`~bilevel_jax.problems.BilevelProblem`.
      g: ``g(y, x) -> scalar``.
      y0: lower-level warm start.
      eq: ``eq(x) -> (A, b)``.
      ineq: ``ineq(x) -> (G, h)``.
      box: ``box(x) -> (lo, hi)``.
      method: ``"o2nc"`` or ``"adam"``.
      alpha: the penalty accuracy (the paper's headline 0.1).
      learning_rate: ``eta`` of the default optimizer (``optax.sgd``, default 1e-2, for
        O2NC; ``optax.adam``, default 1e-2, for ``"adam"``).
      optimizer: any ``optax.GradientTransformation`` (overrides ``learning_rate``).
      projection: the upper-level set ``X`` (see :func:`ssigd`).
      radius: O2NC's ``D``.
      block_size: O2NC's ``M``.
      hypergrad: ``"penalty"`` (F2CBA) or ``"implicit"`` (the exact rule, for comparison).
      lower_kwargs: extra :func:`~bilevel_jax.argmin` options.
      output_rule: O2NC's output: ``"best"`` (default; the block average with the smallest
        mean gradient estimate, a practical choice) or ``"random"`` (the rule the guarantee
        is proved for: a block average drawn uniformly from the completed blocks, kept by
        reservoir sampling with the step's key).

    Returns:
      An :class:`Algorithm` (O2NC: ``State.extra`` is an :class:`O2NCState`, ``output`` the
      block average chosen by ``output_rule``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> from bilevel_jax import algorithms
      >>> problem, _ = bj.problems.kornowski_l1(seed=1, dim_x=3, dim_y=5)
      >>> alg = algorithms.f2cba(problem, method="adam", learning_rate=0.05)
      >>> x, history = alg.run(problem.x0, jax.random.PRNGKey(0), 20)
      >>> bool(history.value[-1] < history.value[0])
      True

    References:
      Kornowski, Padmanabhan, Wang, Zhang, Sra. First-Order Methods for Linearly Constrained
      Bilevel Optimization. NeurIPS 2024 (Algorithm 3, the O2NC conversion of Cutkosky,
      Mehta, Orabona 2023; code ``guaguakai/constrained-bilevel-optimization``, branch ``ffo``).
    """
    projection = _problem_projection(f, projection)
    f, g, y0, eq, ineq, box = _unpack(f, g, y0, eq, ineq, box)
    check_option("method", method, F2CBA_METHODS)
    if learning_rate is None:
        learning_rate = 1e-2
    _check_positive("learning_rate", learning_rate)
    if optimizer is None:
        optimizer = optax.adam(learning_rate) if method == "adam" else optax.sgd(learning_rate)
    _check_common(optimizer, hypergrad, alpha, 1e-4, None, 0.1, lower_kwargs)
    if method == "adam":
        return _descent(f, g, y0, eq=eq, ineq=ineq, box=box, optimizer=optimizer,
                        projection=projection, hypergrad=hypergrad, alpha=alpha, delta=1e-4,
                        lower_steps=None, lower_step_size=0.1, lower_kwargs=lower_kwargs,
                        perturbation=None)
    _check_o2nc(radius, block_size, output_rule)
    lower = _make_lower(g, eq, ineq, box, hypergrad=hypergrad, alpha=alpha, delta=1e-4,
                        lower_steps=None, lower_step_size=0.1, lower_kwargs=lower_kwargs)

    def oracle(z, y_warm, key, batch):
        _check_f(f, z, y_warm, batch)
        value, grad, y, res, status = _value_and_grad(f, lower, z, y_warm, None, batch)
        return lower, value, grad, y, res, status

    return _o2nc(oracle, y0, optimizer=optimizer, projection=projection, radius=radius,
                 block_size=block_size, output_rule=output_rule)


def zeroth_order(
    f: Callable | BilevelProblem,
    g: Callable | None = None,
    y0: PyTree = None,
    *,
    eq: Callable | None = None,
    ineq: Callable | None = None,
    box: Callable | None = None,
    smoothing_radius: float = 1e-2,
    num_directions: int = 1,
    learning_rate: float = 1e-2,
    optimizer: optax.GradientTransformation | None = None,
    projection: Any = None,
    radius: float = 0.1,
    block_size: int = 10,
    lower_kwargs: dict | None = None,
    output_rule: str = "best",
) -> Algorithm:
    r"""Zeroth-order F2CBA: O2NC with a two-point spherical estimator.

    Only values of the hyperobjective are used: ``F~(x) = f(x, y_hat(x))`` with ``y_hat`` a
    high-accuracy lower solve (:func:`~bilevel_jax.argmin`, no hypergradient), and::

        g = (d / (2 r)) (F~(z + r w) - F~(z - r w)) w ,   w ~ Unif(S^{d-1}),   d = dim x

    (averaged over ``num_directions`` independent ``w``) inside the O2NC loop of
    :func:`f2cba`. ``g`` is an unbiased estimate of ``grad F_r``, ``F_r(x) = E_u F(x + r u)``
    (``u`` uniform in the unit ball), and ``grad F_r(x)`` lies in the Goldstein
    ``r``-subdifferential; inexact values add a bias ``<= d nu_0 / r``, so the lower solve
    must be accurate to ``nu_0 << r eps / d``. Rate ``O~(d delta^-1 eps^-3)`` oracle calls.

    Cost: ``2 num_directions`` lower solves per step (batched with ``vmap``; the inner loops
    run to the slowest). Under ``jax.vmap`` the same holds across the batch.

    Args:
      f: ``f(x, y, *batch) -> scalar`` or a :class:`~bilevel_jax.problems.BilevelProblem`.
      g: ``g(y, x) -> scalar``.
      y0: lower-level warm start.
      eq: ``eq(x) -> (A, b)``.
      ineq: ``ineq(x) -> (G, h)``.
      box: ``box(x) -> (lo, hi)``.
      smoothing_radius: ``r`` (``r <= delta``).
      num_directions: directions ``w`` averaged per step.
      learning_rate: ``eta`` of the default ``optax.sgd``.
      optimizer: any ``optax.GradientTransformation``.
      projection: the upper-level set ``X``.
      radius: O2NC's ``D``.
      block_size: O2NC's ``M``.
      lower_kwargs: extra :func:`~bilevel_jax.argmin` options.
      output_rule: ``"best"`` or ``"random"`` (see :func:`f2cba`).

    Returns:
      An :class:`Algorithm`; ``StepInfo.value`` is the mean of the two values.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> from bilevel_jax import algorithms
      >>> problem = bj.problems.sigd_quadratic(17)
      >>> alg = algorithms.zeroth_order(problem, learning_rate=0.05, radius=0.2)
      >>> x, history = alg.run(problem.x0, jax.random.PRNGKey(0), 40)

    References:
      Kornowski et al. First-Order Methods for Linearly Constrained Bilevel Optimization.
      NeurIPS 2024 (the zeroth-order algorithm); Cutkosky, Mehta, Orabona. Optimal
      Stochastic Non-smooth Non-convex Optimization through Online-to-Non-convex Conversion.
      ICML 2023.
    """
    projection = _problem_projection(f, projection)
    f, g, y0, eq, ineq, box = _unpack(f, g, y0, eq, ineq, box)
    optimizer = optax.sgd(learning_rate) if optimizer is None else optimizer
    _check_positive("learning_rate", learning_rate)
    _check_common(optimizer, "implicit", 1e-3, 1e-4, None, 0.1, lower_kwargs)
    _check_positive("smoothing_radius", smoothing_radius)
    _check_int("num_directions", num_directions, 1)
    _check_o2nc(radius, block_size, output_rule)
    lower = _make_lower(g, eq, ineq, box, hypergrad="implicit", alpha=1e-3, delta=1e-4,
                        lower_steps=None, lower_step_size=0.1, lower_kwargs=lower_kwargs)

    def oracle(z, y_warm, key, batch):
        _check_f(f, z, y_warm, batch)
        flat, unravel = ravel_pytree(z)
        d = flat.shape[0]
        w = jax.random.normal(key, (num_directions, d), flat.dtype)
        w = w / jnp.linalg.norm(w, axis=1, keepdims=True)
        r = jnp.asarray(smoothing_radius, flat.dtype)

        def value(point):
            val, y, status = _value(f, lower, unravel(point), y_warm, None, batch)
            return val, y, status

        vals, ys, statuses = jax.vmap(value)(jnp.concatenate([flat + r * w, flat - r * w]))
        diff = vals[:num_directions] - vals[num_directions:]
        grad = unravel((d / (2 * r)) * jnp.mean(diff[:, None] * w, axis=0))
        y = jax.tree_util.tree_map(lambda a: a[0], ys)
        status = jnp.max(statuses).astype(jnp.int32)
        return lower, jnp.mean(vals), grad, y, jnp.zeros((), flat.dtype), status

    return _o2nc(oracle, y0, optimizer=optimizer, projection=projection, radius=radius,
                 block_size=block_size, output_rule=output_rule)


def equality_gd(
    f: Callable | BilevelProblem,
    g: Callable | None = None,
    y0: PyTree = None,
    *,
    eq: Callable | None = None,
    learning_rate: float = 0.1,
    optimizer: optax.GradientTransformation | None = None,
    projection: Any = None,
    delta: float = 1e-4,
    hypergrad: str = "finite_difference",
    lower_kwargs: dict | None = None,
) -> Algorithm:
    r"""Gradient descent for linearly equality-constrained lower levels (F2CBA).

    ``y*(x) = argmin {g(y, x) : A(x) y = b(x)}``; ``F`` is ``C_F``-smooth and
    ``x <- x - (1/C_F) g_hat(x)`` with the first-order (Hessian-free) finite-difference oracle
    (docs: ``lower/unconstrained.md``, section 'Finite difference')::

        (y_d, nu_d) solves min g + delta f  s.t. A y = b
        g_hat(x) = [grad_x l(x, y_d, nu_d) + delta grad_x f(x, y_d) - grad_x l(x, y*, nu*)] / delta

    error ``O(delta)``, exact when ``g`` is quadratic in ``y`` and ``f`` linear in ``y``
    (realised by :func:`~bilevel_jax.argmin` with ``hypergrad="finite_difference"``).
    ``T = O(C_F (F(x_0) - inf F) / eps^2)`` steps reach ``||grad F|| <= eps``:
    ``O~(eps^-2)`` gradient calls in all.

    Assumptions: ``g`` strongly convex and smooth in ``y`` with Lipschitz second derivatives;
    ``f`` Lipschitz and smooth; ``A`` of full row rank. Cost: two lower solves per step;
    under ``jax.vmap`` their ``while_loop``\ s run to the slowest member.

    Args:
      f: ``f(x, y, *batch) -> scalar``, or a :class:`~bilevel_jax.problems.BilevelProblem`
        without inequality or box constraints.
      g: ``g(y, x) -> scalar``.
      y0: lower-level warm start.
      eq: ``eq(x) -> (A, b)`` (required).
      learning_rate: ``1/C_F``, the step of the default ``optax.sgd``.
      optimizer: any ``optax.GradientTransformation``.
      projection: the upper-level set ``X``.
      delta: the finite-difference step.
      hypergrad: ``"finite_difference"`` or ``"implicit"`` (the exact KKT rule).
      lower_kwargs: extra :func:`~bilevel_jax.argmin` options.

    Returns:
      An :class:`Algorithm`.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel_jax import algorithms
      >>> f = lambda x, y: 0.5 * jnp.sum((y - 1.0) ** 2) + 0.5 * x @ x
      >>> g = lambda y, x: 0.5 * y @ y - x @ y
      >>> eq = lambda x: (jnp.ones((1, 2)), jnp.zeros(1))
      >>> alg = algorithms.equality_gd(f, g, jnp.zeros(2), eq=eq, learning_rate=0.5)
      >>> x, _ = alg.run(jnp.ones(2), jax.random.PRNGKey(0), 30)

    References:
      Kornowski et al. First-Order Methods for Linearly Constrained Bilevel Optimization.
      NeurIPS 2024 (Algorithms 1 and 2, linear equality constraints).
    """
    if eq is None or not callable(eq):
        raise TypeError("eq must be a callable x -> (A, b) giving the lower-level equality "
                        "constraints A y = b.")
    projection = _problem_projection(f, projection)
    f, g, y0, eq, ineq, box = _unpack(f, g, y0, eq, None, None)
    if ineq is not None or box is not None:
        raise ValueError("equality_gd handles equality constraints only; the problem has "
                         "ineq/box constraints (use f2cba or ssigd).")
    optimizer = optax.sgd(learning_rate) if optimizer is None else optimizer
    _check_positive("learning_rate", learning_rate)
    _check_common(optimizer, hypergrad, 1e-3, delta, None, 0.1, lower_kwargs)
    if hypergrad == "penalty":
        raise ValueError("hypergrad must be 'finite_difference' or 'implicit' for "
                         "equality_gd, got 'penalty'.")
    return _descent(f, g, y0, eq=eq, ineq=None, box=None, optimizer=optimizer,
                    projection=projection, hypergrad=hypergrad, alpha=1e-3, delta=delta,
                    lower_steps=None, lower_step_size=0.1, lower_kwargs=lower_kwargs,
                    perturbation=None)
