r"""Bilevel problems with a minimax or convex-constrained lower level (PBM).

The mathematics is on the docs page ``lower/penalty-minimax.md``.

The bilevel minimax problem is

    min_{x1 in X1} max_{x2 in X2} f(x1, x2, y1, y2)   s.t.  (y1, y2) in SP(x1),

where ``SP(x1)`` is the set of saddle points of ``min_{y1 in Y1} max_{y2 in Y2} g(x1, y1, y2)``,
``g`` convex in ``y1`` and concave in ``y2`` (not necessarily strongly). With the duality gap

    gap(x1; y1, y2) = max_{z2 in Y2} g(x1, y1, z2) - min_{z1 in Y1} g(x1, z1, y2) >= 0,

zero exactly on ``SP(x1)``, the penalty method of Shen, He, Wang and Lin solves the single
minimax problem

    min_{u = (x1, y1, y2)} max_{v = (x2, z1, z2)}
        P_rho(u, v) = f(x1, x2, y1, y2) + rho [ g(x1, y1, z2) - g(x1, z1, y2) ],

whose inner maximisation over the certificates ``(z1, z2)`` evaluates the gap. ``P_rho`` is
concave in ``v`` when ``f`` is concave in ``x2`` but not jointly convex in ``u``:
nonconvex–concave, with ``L_P = O(rho)``. On strongly convex–strongly concave instances
``||x1(rho) - x1*|| = O(1/rho)`` and the gap is ``O(1/rho^2)``.

A convex constrained lower level ``min_y g(x, y) s.t. c(x, y) <= 0`` (Slater) is the minimax
problem ``min_y max_{0 <= lam <= lam_max} g + lam' c`` (:func:`lagrangian_minimax`),
usable both by :func:`bilevel_jax.saddle_point` (implicit hypergradients) and by
:func:`penalty_bilevel_minimax` (as ``g`` with ``y1 = y``, ``y2 = lam``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src import loops, minimax
from bilevel_jax._src.projections import (
    Box,
    cast_sets,
    check_set,
    check_set_data,
    project,
    sets_empty,
)
from bilevel_jax._src.tree import tree_all_finite
from bilevel_jax._src.types import (
    Array,
    Info,
    PyTree,
    Status,
    check_info,
    is_successful,
    make_info,
)
from bilevel_jax._src.validation import flatten_variables

__all__ = [
    "KKTResiduals",
    "LagrangianMinimax",
    "LagrangianSolution",
    "PenaltyMinimaxSolution",
    "bilevel_minimax_kkt",
    "lagrangian_minimax",
    "penalty_bilevel_minimax",
]

INNER_SOLVERS = ("gdmax", "extragradient")


# --------------------------------------------------------------------------------------------
# Lagrangian reduction of a constrained lower level.


class LagrangianSolution(NamedTuple):
    """Result of :meth:`LagrangianMinimax.solve`: a :class:`SaddleSolution` plus the bound check.

    Attributes:
      u: ``y*(x)``, with the structure of ``y0``.
      v: the multipliers ``lam*(x)``, shape ``(m,)``.
      info: the :class:`SaddleInfo` of :func:`saddle_point`, except that ``status`` is
        ``INFEASIBLE`` (and ``converged`` false, cotangents NaN) when ``bound_active``.
      bound_active: whether some multiplier sits at its bound ``lam_max`` (to a relative
        ``sqrt(eps)``). Then the point is the saddle of the exact-penalty problem
        ``g + lam_max sum_i max(0, c_i)``, which is the constrained solution only if
        ``lam_max >= ||lam*||_inf``: either ``lam_max`` is too small (raise it) or the
        constraints have no feasible (Slater) point.
      max_violation: ``max_i c_i(x, y)`` at the returned ``y`` (``<= 0`` when feasible): with
        the bound active and a positive violation the point is not feasible for the
        constrained lower level.
    """

    u: PyTree
    v: Array
    info: minimax.SaddleInfo
    bound_active: Array
    max_violation: Array


@jax.custom_vjp
def _nan_cotangent_if(flag, tree):
    """Identity on ``tree``; its cotangent is NaN where ``flag`` is true."""
    return tree


def _nan_cotangent_if_fwd(flag, tree):
    return tree, flag


def _nan_cotangent_if_bwd(flag, cotangent):
    out = jax.tree_util.tree_map(
        lambda a: jnp.where(flag, jnp.asarray(jnp.nan, a.dtype), a), cotangent)
    return None, out


_nan_cotangent_if.defvjp(_nan_cotangent_if_fwd, _nan_cotangent_if_bwd)


class LagrangianMinimax(NamedTuple):
    """A constrained convex lower level written as a minimax problem.

    ``min_y g(x, y) s.t. c(x, y) <= 0`` becomes ``min_y max_{lam in [0, lam_max]^m} L`` with
    ``L(x, y, lam) = g(x, y) + lam' c(x, y)``.

    Attributes:
      lagrangian: ``lagrangian(x, y, lam, theta) = g(x, y, theta) + lam @ c(x, y, theta)``;
        pass it as the ``g`` of :func:`penalty_bilevel_minimax` (``y1 = y``, ``y2 = lam``,
        ``y2_set = lam_set``).
      lam_set: the box ``[0, lam_max]`` of the multipliers.
      num_constraints: ``m``, the length of ``c``.
      constraints: ``c(x, y, theta) -> (m,)``, the constraint function.
    """

    lagrangian: Callable
    lam_set: Box
    num_constraints: int
    constraints: Callable | None = None

    def bound_active(self, lam: Array) -> Array:
        """Whether some multiplier of ``lam`` is at its bound ``lam_max``.

        The test is relative, ``lam_i >= lam_max (1 - sqrt(eps))`` in ``lam``'s dtype; a true
        result means ``lam_max`` may be too small (see :class:`LagrangianSolution`). Use it
        on the ``y2`` of a :func:`penalty_bilevel_minimax` result too.
        """
        lam = jnp.asarray(lam)
        hi = jnp.asarray(self.lam_set.hi, lam.dtype)
        rtol = jnp.sqrt(jnp.finfo(lam.dtype).eps)
        return jnp.any(lam >= hi * (1 - rtol))

    def saddle(self, y: PyTree, lam: Array, params: tuple) -> Array:
        """``L`` in the ``f(u, v, theta)`` form of ``saddle_point``, ``params = (x, theta)``."""
        x, theta = params
        return self.lagrangian(x, y, lam, theta)

    def solve(
        self, x: PyTree, y0: PyTree, theta: PyTree = None, **kwargs
    ) -> LagrangianSolution:
        """Solve the lower level at ``x`` with :func:`saddle_point` (differentiable in ``x``).

        The multiplier bound is checked: if some ``lam_i`` sits at ``lam_max`` the status is
        ``INFEASIBLE`` (NaN cotangents; ``throw=True`` raises) and ``bound_active`` is true,
        since the saddle is then that of the exact-penalty problem, not necessarily the
        constrained solution (see :class:`LagrangianSolution`).

        Args:
          x: the upper-level variable.
          y0: warm start of ``y``; the multipliers start at 0.
          theta: further parameters of ``g`` and ``c``.
          **kwargs: options of :func:`saddle_point` (``solver``, ``tol``, ``throw``, ...).

        Returns:
          A :class:`LagrangianSolution` with ``u = y*(x)`` and ``v = lam*(x)``.
        """
        throw = kwargs.pop("throw", False)
        dtype = jnp.result_type(*jax.tree_util.tree_leaves(y0))
        lam0 = jnp.zeros((self.num_constraints,), dtype)
        sol = minimax.saddle_point(
            self.saddle, y0, lam0, (x, theta), v_set=self.lam_set, **kwargs
        )
        active = self.bound_active(jax.lax.stop_gradient(sol.v))
        if self.constraints is None:
            violation = jnp.asarray(jnp.nan, dtype)
        else:
            violation = jnp.max(jax.lax.stop_gradient(
                self.constraints(x, sol.u, theta))).astype(dtype)
        ok = is_successful(sol.info.status)
        status = jnp.where(ok & active, Status.INFEASIBLE, sol.info.status).astype(jnp.int32)
        info = sol.info._replace(converged=sol.info.converged & ~active, status=status)
        check_info(info, throw)
        u, v = _nan_cotangent_if(active, (sol.u, sol.v))
        return LagrangianSolution(u, v, info, active, violation)


def lagrangian_minimax(
    g: Callable, c: Callable, x: PyTree, y: PyTree, theta: PyTree = None, *, lam_max=10.0
) -> LagrangianMinimax:
    r"""Reduce ``min_y g(x, y) s.t. c(x, y) <= 0`` to a minimax problem.

    Returns ``L(x, y, lam) = g(x, y) + lam' c(x, y)`` with ``lam`` in the box ``[0, lam_max]^m``.
    For ``g`` and ``c`` convex in ``y`` with a Slater point and ``lam_max > ||lam*(x)||_inf``
    the saddle points of ``min_y max_lam L`` are exactly the primal–dual solutions; the box
    keeps the inner maximum finite at infeasible ``y`` (it is the exact penalty
    ``g + lam_max sum_i max(0, c_i)``), so the duality gap is
    ``g(x, y) + lam_max sum_i max(0, c_i(x, y)) - d(x, lam)`` with the dual function
    ``d(x, lam) = min_y L``. Equality constraints are two inequalities, or use a box
    ``[-lam_max, lam_max]`` (replace ``lam_set``).

    The saddle matrix ``[[H + sum lam_i Hc_i, Dc^T], [Dc, 0]]`` restricted to the active
    multipliers is nonsingular under LICQ and strong convexity of ``L`` in ``y``, so
    :func:`saddle_point`'s implicit rule differentiates the constrained solution exactly
    (inactive constraints sit at ``lam = 0`` and are masked out).

    Args:
      g: ``g(x, y, theta) -> scalar``, convex in ``y``.
      c: ``c(x, y, theta) -> (m,)``, each entry convex in ``y``.
      x: example upper-level variable (for shape checking).
      y: example lower-level variable (for shape checking).
      theta: example parameters.
      lam_max: the multiplier bound ``Lambda > sup_x ||lam*(x)||_inf`` (scalar or ``(m,)``).
        It is checked at each solution: :meth:`LagrangianMinimax.solve` reports a multiplier
        at the bound as ``INFEASIBLE`` with ``bound_active`` set, and
        :meth:`LagrangianMinimax.bound_active` tests the ``y2`` of a
        :func:`penalty_bilevel_minimax` result.

    Returns:
      A :class:`LagrangianMinimax`.

    Raises:
      TypeError, ValueError: at trace time, if ``g`` is not scalar or ``c`` is not 1-D.

    Examples:
      >>> import jax.numpy as jnp
      >>> g = lambda x, y, th: 0.5 * jnp.sum((y - x) ** 2)
      >>> c = lambda x, y, th: jnp.array([y[0] + y[1] - 1.0])
      >>> lag = lagrangian_minimax(g, c, jnp.zeros(2), jnp.zeros(2), lam_max=5.0)
      >>> sol = lag.solve(jnp.array([1.75, 0.25]), jnp.zeros(2))  # y* = (1.25, -0.25)

    References:
      Shen, He, Wang, Lin. Penalty-Based First-Order Methods for Bilevel Optimization with
      Minimax and Constrained Lower-Level Problems. arXiv 2605.08006, 2026.
    """
    try:
        g_out = jax.eval_shape(g, x, y, theta)
    except Exception as err:  # re-raise with the argument named
        raise TypeError(f"g(x, y, theta) could not be evaluated: {err}") from err
    if getattr(g_out, "shape", None) != ():
        shape = getattr(g_out, "shape", g_out)
        raise TypeError(f"g(x, y, theta) must return a scalar, got {shape}.")
    try:
        c_out = jax.eval_shape(c, x, y, theta)
    except Exception as err:
        raise TypeError(f"c(x, y, theta) could not be evaluated: {err}") from err
    if len(getattr(c_out, "shape", (0, 0))) != 1:
        raise ValueError(
            f"c(x, y, theta) must return a 1-D array of constraint values, got shape "
            f"{getattr(c_out, 'shape', None)}."
        )
    m = int(c_out.shape[0])
    lam_max_arr = jnp.asarray(lam_max)
    if lam_max_arr.shape not in ((), (m,)):
        raise ValueError(f"lam_max must be a scalar or have shape ({m},), got {lam_max_arr.shape}.")

    def lagrangian(x_, y_, lam, theta_):
        return g(x_, y_, theta_) + jnp.asarray(lam) @ c(x_, y_, theta_)

    return LagrangianMinimax(lagrangian, Box(0.0, lam_max), m, c)


# --------------------------------------------------------------------------------------------
# epsilon-KKT residuals.


class KKTResiduals(NamedTuple):
    """The epsilon-KKT residuals of a bilevel minimax problem at multiplier ``mu`` (``= rho``).

    With sets each stationarity norm is that of the projected-gradient mapping
    ``||w - Proj(w -+ grad)||`` (unit step), which is ``||grad||`` without a set.

    Attributes:
      x1: ``||grad_x1 f + mu [grad_x1 g(x1, y1, z2) - grad_x1 g(x1, z1, y2)]||`` (projected).
      x2: ``||grad_x2 f||`` (projected, ascent).
      y1: ``||grad_y1 f + mu grad_y1 g(x1, y1, z2)||`` (projected).
      y2: ``||grad_y2 f - mu grad_y2 g(x1, z1, y2)||`` (projected).
      z1: ``||grad_z1 g(x1, z1, y2)||`` (projected): ``z1`` is a best response.
      z2: ``||grad_z2 g(x1, y1, z2)||`` (projected, ascent): ``z2`` is a best response.
      gap: ``g(x1, y1, z2) - g(x1, z1, y2)`` (approximate lower-level optimality, ``<= eps``).
      complementarity: ``mu |g(x1, y1, z2) - g(x1, z1, y2)|`` (``<= eps``).
    """

    x1: Array
    x2: Array
    y1: Array
    y2: Array
    z1: Array
    z2: Array
    gap: Array
    complementarity: Array

    def max(self) -> Array:
        """The largest residual: the point is epsilon-KKT iff ``max() <= eps``."""
        return jnp.max(jnp.stack([jnp.asarray(r) for r in self]))


def _pg_norm(w, grad, sets, sign):
    """``||w - Proj(w - sign * grad)||`` on pytrees (``sign = +1`` descent, ``-1`` ascent)."""
    step = jax.tree_util.tree_map(lambda a, b: a - sign * b, w, grad)
    diff = jax.tree_util.tree_map(lambda a, b: a - b, w, project(sets, step))
    flat = ravel_pytree(diff)[0]
    return jnp.sqrt(jnp.sum(flat * flat))


def bilevel_minimax_kkt(
    f: Callable,
    g: Callable,
    x1: PyTree,
    x2: PyTree,
    y1: PyTree,
    y2: PyTree,
    z1: PyTree,
    z2: PyTree,
    mu,
    theta: PyTree = None,
    *,
    x1_set: PyTree = None,
    x2_set: PyTree = None,
    y1_set: PyTree = None,
    y2_set: PyTree = None,
) -> KKTResiduals:
    r"""The epsilon-KKT residuals of a bilevel minimax problem.

    A point ``(x1, x2, y1, y2)`` with certificates ``(z1, z2)`` and multiplier ``mu >= 0`` is
    epsilon-KKT (modelled on Lu and Mei) when every entry of the result is ``<= eps``; an
    approximate stationary point of ``P_rho`` satisfies the stationarity entries with
    ``mu = rho``. See :class:`KKTResiduals` for the formulas.

    Args:
      f: ``f(x1, x2, y1, y2, theta)``, the upper-level objective.
      g: ``g(x1, y1, y2, theta)``, the lower-level saddle function.
      x1: upper-level minimising variable.
      x2: upper-level maximising variable (``None`` if absent).
      y1: lower-level minimising variable.
      y2: lower-level maximising variable.
      z1: certificate for ``min_{z1} g(x1, z1, y2)``.
      z2: certificate for ``max_{z2} g(x1, y1, z2)``.
      mu: the multiplier of the gap constraint (the penalty ``rho``).
      theta: parameters of ``f`` and ``g``.
      x1_set: the set ``X1`` (see :func:`bilevel_jax.saddle_point` for set arguments).
      x2_set: the set ``X2``.
      y1_set: the set ``Y1`` (also constrains ``z1``).
      y2_set: the set ``Y2`` (also constrains ``z2``).

    Returns:
      A :class:`KKTResiduals`.
    """
    fx1, fx2, fy1, fy2 = jax.grad(f, argnums=(0, 1, 2, 3))(x1, x2, y1, y2, theta)
    gx1_a, gy1_a, gz2 = jax.grad(g, argnums=(0, 1, 2))(x1, y1, z2, theta)
    gx1_b, gz1, gy2_b = jax.grad(g, argnums=(0, 1, 2))(x1, z1, y2, theta)
    tm = jax.tree_util.tree_map
    grad_x1 = tm(lambda a, b, c: a + mu * (b - c), fx1, gx1_a, gx1_b)
    grad_y1 = tm(lambda a, b: a + mu * b, fy1, gy1_a)
    grad_y2 = tm(lambda a, b: a - mu * b, fy2, gy2_b)
    gap = g(x1, y1, z2, theta) - g(x1, z1, y2, theta)
    x2_res = _pg_norm(x2, fx2, x2_set, -1) if jax.tree_util.tree_leaves(x2) else jnp.zeros_like(gap)
    return KKTResiduals(
        _pg_norm(x1, grad_x1, x1_set, 1),
        x2_res,
        _pg_norm(y1, grad_y1, y1_set, 1),
        _pg_norm(y2, grad_y2, y2_set, 1),
        _pg_norm(z1, gz1, y1_set, 1),
        _pg_norm(z2, gz2, y2_set, -1),
        gap,
        mu * jnp.abs(gap),
    )


# --------------------------------------------------------------------------------------------
# The penalty method.


class PenaltyMinimaxSolution(NamedTuple):
    """Result of :func:`penalty_bilevel_minimax`.

    Attributes:
      x1: upper-level minimiser (structure of ``x1_0``).
      x2: upper-level maximiser (structure of ``x2_0``).
      y1: lower-level minimising player.
      y2: lower-level maximising player.
      z1: certificate ``~ argmin_{z1 in Y1} g(x1, z1, y2)`` (structure of ``y1_0``).
      z2: certificate ``~ argmax_{z2 in Y2} g(x1, y1, z2)`` (structure of ``y2_0``).
      rho: the penalty of the last stage run, which is also the multiplier estimate ``mu``.
      kkt: the :class:`KKTResiduals` at the returned point with ``mu = rho``.
      info: an :class:`Info`: ``num_steps`` (inner iterations over all stages), ``residual``
        (``kkt.max()``), ``converged`` (``residual <= tol``) and ``status``.
    """

    x1: PyTree
    x2: PyTree
    y1: PyTree
    y2: PyTree
    z1: PyTree
    z2: PyTree
    rho: Array
    kkt: KKTResiduals
    info: Info


class _Penalty(NamedTuple):
    """``P_rho`` on flat ``u = (x1, y1, y2)`` and ``v = (x2, z1, z2)``."""

    f: Callable
    g: Callable
    theta: PyTree
    unravel_u: Callable
    unravel_v: Callable
    u_sets: tuple
    v_sets: tuple
    v_blocks: np.ndarray  # block id (0: x2, 1: z1, 2: z2) of each entry of v
    z_scale_mask: np.ndarray  # 1.0 on the z entries of v, 0.0 on x2

    def value(self, u, v, rho, anchor, sigma):
        x1, y1, y2 = self.unravel_u(u)
        x2, z1, z2 = self.unravel_v(v)
        th = self.theta
        reg = 0.5 * sigma * jnp.sum((v - anchor) ** 2)
        return (
            self.f(x1, x2, y1, y2, th)
            + rho * (self.g(x1, y1, z2, th) - self.g(x1, z1, y2, th))
            - reg
        )

    def proj_u(self, u):
        return ravel_pytree(project(self.u_sets, self.unravel_u(u)))[0].astype(u.dtype)

    def proj_v(self, v):
        return ravel_pytree(project(self.v_sets, self.unravel_v(v)))[0].astype(v.dtype)

    def block_norms(self, w):
        return jnp.sqrt(jax.ops.segment_sum(w * w, self.v_blocks, num_segments=3))

    def stationarity(self, u, v, gu, gv, rho):
        """Inner residual in the KKT scaling: projected gradients, z-blocks divided by rho."""
        scale = jnp.where(self.z_scale_mask > 0, 1 / rho, 1.0)
        ru = _norm(u - self.proj_u(u - gu))
        rv = _norm(v - self.proj_v(v + scale * gv))
        return jnp.maximum(ru, rv)


def _norm(x):
    return jnp.sqrt(jnp.sum(x * x))


def _block_lipschitz(pen, u, v, rho, anchor, sigma, num_iter=20):
    """Per-block curvature of ``-P`` in ``v`` (the ``v``-Hessian is block diagonal)."""
    grad_v = jax.grad(pen.value, argnums=1)
    hvp = lambda w: jax.jvp(lambda v_: grad_v(u, v_, rho, anchor, sigma), (v,), (w,))[1]  # noqa: E731
    tiny = jnp.finfo(v.dtype).tiny

    def normalise(w):
        return w / jnp.maximum(pen.block_norms(w), tiny)[pen.v_blocks]

    w = loops.power_iteration(hvp, loops.power_start(v), num_iter, normalize=normalise)
    return pen.block_norms(hvp(w))


def _uu_lipschitz(pen, u, v, rho, anchor, sigma, num_iter=20):
    grad_u = jax.grad(pen.value, argnums=0)
    hvp = lambda w: jax.jvp(lambda u_: grad_u(u_, v, rho, anchor, sigma), (u,), (w,))[1]  # noqa: E731
    return ls.symmetric_norm(hvp, u, num_iter)


def _gdmax(pen, u0, v0, rho, sigma, tol, max_iter, ascent_steps, step_size):
    """GDmax: block-scaled ascent steps on ``v``, then one adaptive descent step on ``u``.

    Each iteration runs ``ascent_steps`` projected ascent steps on ``v``, then one projected
    gradient step on ``u`` along the Danskin gradient ``grad_u P(u, v)``.

    Ascent steps are ``1/L_b`` per block ``b`` of ``v`` (``x2``, ``z1``, ``z2``; ``P`` is
    separable across them), with ``L_b`` from power iteration and increased whenever a larger
    local curvature is observed. The descent step follows Malitsky and Mishchenko's adaptive
    gradient descent, ``eta_k = min(sqrt(1 + theta_{k-1}) eta_{k-1},
    ||u_k - u_{k-1}|| / (2 ||g_k - g_{k-1}||))``, projected. Non-finite values or the
    residual growing by ``DIVERGENCE_FACTOR`` stop it as diverged.
    """
    dtype = u0.dtype
    anchor = v0
    grads = jax.grad(pen.value, argnums=(0, 1))
    grad_v = jax.grad(pen.value, argnums=1)
    tiny = jnp.finfo(dtype).tiny
    lip_v = _block_lipschitz(pen, u0, v0, rho, anchor, sigma)
    floor = jnp.maximum(1e-6 * jnp.max(lip_v), jnp.maximum(sigma, 1e-12)).astype(dtype)
    lip_v = jnp.maximum(lip_v, floor)
    if step_size is None:
        eta0 = 0.5 / jnp.maximum(_uu_lipschitz(pen, u0, v0, rho, anchor, sigma), 1e-6)
    else:
        eta0 = jnp.asarray(step_size, dtype)
    ids = pen.v_blocks

    def ascent(u, v, lip):
        def step(_, s):
            v, lip, gv = s
            v_new = pen.proj_v(v + gv / lip[ids])
            gv_new = grad_v(u, v_new, rho, anchor, sigma)
            dv, dg = pen.block_norms(v_new - v), pen.block_norms(gv_new - gv)
            local = jnp.where(dv > tiny, dg / jnp.maximum(dv, tiny), 0.0)
            return v_new, jnp.maximum(lip, local), gv_new

        gv = grad_v(u, v, rho, anchor, sigma)
        v, lip, _ = jax.lax.fori_loop(0, ascent_steps, step, (v, lip, gv))
        return v, lip

    def cond(state):
        k, _, _, _, _, _, _, _, res, _, bad = state
        return (k < max_iter) & (res > tol) & ~bad

    def body(state):
        k, u, v, u_prev, g_prev, eta_prev, theta_prev, lip, _, res0, _ = state
        v, lip = ascent(u, v, lip)
        gu, gv = grads(u, v, rho, anchor, sigma)
        res = pen.stationarity(u, v, gu, gv, rho)
        res0 = jnp.where(k == 0, res, res0)
        du, dg = _norm(u - u_prev), _norm(gu - g_prev)
        local = jnp.where(dg > tiny, du / (2 * jnp.maximum(dg, tiny)), jnp.inf)
        eta = jnp.minimum(jnp.sqrt(1 + theta_prev) * eta_prev, local)
        eta = jnp.where(k == 0, eta0, eta)
        u_new = pen.proj_u(u - eta * gu)
        done = res <= tol
        finite = jnp.all(jnp.isfinite(u_new)) & jnp.all(jnp.isfinite(v)) & jnp.isfinite(res)
        move = ~done & finite
        return (
            k + 1,
            jnp.where(move, u_new, u),
            v,
            jnp.where(move, u, u_prev),
            jnp.where(move, gu, g_prev),
            jnp.where(move, eta, eta_prev),
            jnp.where(move, eta / eta_prev, theta_prev),
            lip,
            jnp.where(finite, res, jnp.inf),
            res0,
            ~finite | (res > minimax.DIVERGENCE_FACTOR * (1 + res0)),
        )

    zero = jnp.zeros((), dtype)
    inf = jnp.asarray(jnp.inf, dtype)
    state = (
        jnp.asarray(0), u0, v0, u0, jnp.zeros_like(u0), eta0.astype(dtype), zero, lip_v,
        inf, inf, jnp.asarray(False),
    )
    k, u, v, *_, bad = jax.lax.while_loop(cond, body, state)
    return u, v, k, bad


def _extragradient_inner(pen, u0, v0, rho, sigma, tol, max_iter, step_size):
    n_u = u0.shape[0]
    anchor = v0
    grads = jax.grad(pen.value, argnums=(0, 1))

    def op(z):
        gu, gv = grads(z[:n_u], z[n_u:], rho, anchor, sigma)
        return jnp.concatenate([gu, -gv])

    def proj(z):
        return jnp.concatenate([pen.proj_u(z[:n_u]), pen.proj_v(z[n_u:])])

    z0 = jnp.concatenate([u0, v0])
    # The natural residual is the inner stopping test (absolute tolerance: pass tol/(1+r0)).
    r0 = _norm(z0 - proj(z0 - op(z0)))
    z, k, _, diverged, _ = minimax._extragradient(
        op, proj, z0, tol / (1 + r0), max_iter, step_size
    )
    return z[:n_u], z[n_u:], k, diverged


def penalty_bilevel_minimax(
    f: Callable,
    g: Callable,
    x1_0: PyTree,
    x2_0: PyTree,
    y1_0: PyTree,
    y2_0: PyTree,
    theta: PyTree = None,
    *,
    x1_set: PyTree = None,
    x2_set: PyTree = None,
    y1_set: PyTree = None,
    y2_set: PyTree = None,
    rho0: float = 1.0,
    rho_growth: float = 10.0,
    rho_max: float = 1e3,
    num_stages: int | None = None,
    tol: float | None = None,
    inner_solver: str = "extragradient",
    max_iter: int = 20000,
    ascent_steps: int = 5,
    step_size: float | None = None,
    v_smoothing: float = 0.0,
    throw: bool = False,
) -> PenaltyMinimaxSolution:
    r"""Solve a bilevel minimax problem by the duality-gap penalty method (PBM).

    Problem: ``min_{x1 in X1} max_{x2 in X2} f(x1, x2, y1, y2)`` subject to ``(y1, y2)``
    being a saddle point of ``min_{y1 in Y1} max_{y2 in Y2} g(x1, y1, y2)``, with ``g``
    convex–concave in ``(y1, y2)`` (strong convexity is not needed) and ``f`` concave in
    ``x2``. The lower-level constraint is replaced by the penalty ``rho * gap`` and the
    resulting nonconvex–concave minimax problem

        min_{(x1, y1, y2)} max_{(x2, z1, z2)}
            f(x1, x2, y1, y2) + rho [g(x1, y1, z2) - g(x1, z1, y2)]

    is solved for an increasing schedule ``rho_k = min(rho0 * rho_growth^k, rho_max)``,
    each stage warm-started from the previous one, until the epsilon-KKT residuals
    (:class:`KKTResiduals`, ``mu = rho_k``) are all ``<= tol``. The certificates ``z1``,
    ``z2`` converge to the lower-level best responses. On strongly convex–strongly concave
    instances the solution of stage ``rho`` is ``O(1/rho)`` from the bilevel solution and its
    gap ``O(1/rho^2)``; the complementarity residual ``rho * gap = O(1/rho)`` therefore sets
    the ``rho`` needed for a given ``tol``.

    Inner solvers (fixed-size ``while_loop``s, ``max_iter`` iterations per stage, stopping
    when the stationarity residuals are ``<= tol``):

    * ``"extragradient"`` (default): projected extragradient on ``(u, v)`` with a
      backtracking step (``step_size`` is the initial step; a fixed step of about
      ``0.2 / (1 + 2 rho)`` also works). It treats the certificates as dual variables, so it handles
      maximising blocks in which ``P`` is linear (a multiplier, a player of a merely
      convex–concave ``g``), and it converges on the test problems although ``P_rho`` is
      not jointly convex in ``u``; its theory covers convex–concave ``P_rho``.
    * ``"gdmax"``: per iteration ``ascent_steps`` projected ascent steps on
      ``v = (x2, z1, z2)`` with per-block steps ``1/L_b`` (``P`` is separable across the
      blocks of ``v``, so this is exact preconditioning), then one projected gradient step on
      ``u = (x1, y1, y2)`` along the Danskin gradient with Malitsky–Mishchenko's adaptive
      step: the nonconvex–concave method of the theory, for strongly concave maximising
      blocks (``f`` strongly concave in ``x2``, ``g`` strongly convex–strongly concave). A
      block in which ``P`` is linear makes the inner maximiser jump between vertices; use
      ``v_smoothing > 0`` or extragradient there.

    ``v_smoothing = sigma > 0`` subtracts ``sigma/2 ||v - v_k||^2`` with ``v_k`` the value of
    ``v`` at the start of stage ``k`` (a proximal-point step in ``v``; the concavifying term
    of the theory-grade method), making the inner maximiser unique; its bias is
    ``O(sigma)`` per stage.

    Status: ``SUCCESS`` (epsilon-KKT reached), ``MAX_STEPS`` (not reached by the last stage;
    ``info.residual`` says how far), ``NONFINITE``, ``DIVERGED`` (the inner solver
    diverged) or ``INFEASIBLE`` (an empty set given by traced data, e.g. ``Box(lo, hi)``
    with ``lo > hi``; concrete empty sets are a ``ValueError``; or, with ``g`` a
    :class:`LagrangianMinimax`, a multiplier at its bound ``lam_max``). Not differentiated: the
    outputs are the last iterate whatever the status (see :class:`bilevel_jax.Status`).

    Cost: each GDmax iteration costs ``ascent_steps + 1`` gradients of ``P``; the iteration
    count grows like ``rho`` (the condition number of the penalised problem), so each stage
    is costlier than the last. Under ``jax.vmap`` the loops run until the slowest member
    stops. Not differentiable (use :func:`bilevel_jax.saddle_point` for hypergradients).

    Args:
      f: ``f(x1, x2, y1, y2, theta) -> scalar``, concave in ``x2``.
      g: ``g(x1, y1, y2, theta) -> scalar``, convex in ``y1``, concave in ``y2``; or a
        :class:`LagrangianMinimax` (from :func:`lagrangian_minimax`), whose ``lagrangian`` is
        then ``g`` and whose ``lam_set`` is the default ``y2_set``. Passed that way, the
        multiplier bound is checked: a result whose ``y2`` sits at ``lam_max`` is
        ``INFEASIBLE`` (``lam_max`` too small, or no Slater point), not ``SUCCESS``.
      x1_0: initial upper-level minimiser (pytree of floats).
      x2_0: initial upper-level maximiser, or ``None`` if ``f`` has none.
      y1_0: initial lower-level minimiser; also the initial ``z1``.
      y2_0: initial lower-level maximiser; also the initial ``z2``.
      theta: fixed parameters passed to ``f`` and ``g``.
      x1_set: the set ``X1`` (see :func:`bilevel_jax.saddle_point` for set arguments).
      x2_set: the set ``X2``.
      y1_set: the set ``Y1`` (also for ``z1``).
      y2_set: the set ``Y2`` (also for ``z2``); keep it bounded if ``g`` is not strongly
        concave, so that the gap is finite.
      rho0: first penalty (a number, or a traced scalar when ``num_stages`` is given, so
        that a sweep over penalties can be ``vmap``-ed).
      rho_growth: factor between stages (``>= 1``; may be traced like ``rho0``).
      rho_max: largest penalty (may be traced like ``rho0``).
      num_stages: number of stages; default ``1 + ceil(log(rho_max / rho0) /
        log(rho_growth))`` (1 when ``rho_max == rho0``), which needs concrete penalties.
        A stage whose ``rho`` equals the previous one ends at once (already converged).
      tol: ``eps`` of the epsilon-KKT test (default 1e-6 in float64, 1e-3 in float32).
      inner_solver: ``"gdmax"`` or ``"extragradient"``.
      max_iter: inner iterations per stage.
      ascent_steps: GDmax ascent steps per descent step.
      step_size: initial descent step (GDmax) or step (extragradient); default from the
        curvature at the start of each stage.
      v_smoothing: proximal weight ``sigma >= 0`` on ``v`` (see above).
      throw: raise :class:`SolveError` if the status is not ``SUCCESS``.

    Returns:
      A :class:`PenaltyMinimaxSolution`.

    Raises:
      ValueError, TypeError: at trace time, for bad options, shapes or sets.

    Examples:
      >>> import jax.numpy as jnp
      >>> g = lambda x1, y1, y2, th: y1**2 + y1 * y2 - 0.5 * y2**2 + x1 * y1 - 0.5 * x1 * y2
      >>> f = lambda x1, x2, y1, y2, th: (0.5 * x1**2 + x2 * (x1 - 1) - 0.5 * x2**2
      ...                                 + 0.5 * (y1 - 1) ** 2 + 0.5 * y2**2)
      >>> sol = penalty_bilevel_minimax(f, g, 0.0, 0.0, 0.0, 0.0, rho0=100.0, rho_max=100.0)
      >>> # sol.x1 ~ 0.3377 (the bilevel solution is 30/89 ~ 0.3371)

    References:
      Shen, He, Wang, Lin. Penalty-Based First-Order Methods for Bilevel Optimization with
      Minimax and Constrained Lower-Level Problems. arXiv 2605.08006, 2026. Lu, Mei.
      First-order penalty methods for bilevel optimization. SIAM J. Optim. 34, 2024.
      Malitsky, Mishchenko. Adaptive gradient descent without descent. ICML 2020.
    """
    if inner_solver not in INNER_SOLVERS:
        raise ValueError(f"inner_solver must be one of {INNER_SOLVERS}, got {inner_solver!r}.")
    reduction = g if isinstance(g, LagrangianMinimax) else None
    if reduction is not None:
        g = reduction.lagrangian
        y2_set = reduction.lam_set if y2_set is None else y2_set
    concrete = all(isinstance(r, (int, float)) for r in (rho0, rho_growth, rho_max))
    if concrete:
        if not rho0 > 0:
            raise ValueError(f"rho0 must be positive, got {rho0}.")
        if not rho_max >= rho0:
            raise ValueError(f"rho_max must be >= rho0, got rho_max={rho_max}, rho0={rho0}.")
        if not rho_growth >= 1 or (rho_growth == 1 and rho_max > rho0 and num_stages is None):
            raise ValueError(
                f"rho_growth must be > 1 (or 1 with rho_max == rho0), got {rho_growth}."
            )
    if num_stages is None:
        if not concrete:
            raise ValueError(
                "num_stages must be given when rho0, rho_growth or rho_max is an array or "
                "traced value."
            )
        if rho_max == rho0:
            num_stages = 1
        else:
            num_stages = 1 + int(np.ceil(np.log(rho_max / rho0) / np.log(rho_growth) - 1e-9))
    elif not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive integer, got {num_stages!r}.")
    for name, value in (("max_iter", max_iter), ("ascent_steps", ascent_steps)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}.")
    if not v_smoothing >= 0:
        raise ValueError(f"v_smoothing must be >= 0, got {v_smoothing}.")

    for name, tree in (("x1_0", x1_0), ("y1_0", y1_0), ("y2_0", y2_0)):
        flatten_variables(name, tree)
    if x2_0 is not None:
        flatten_variables("x2_0", x2_0)
    u_tree0 = (x1_0, y1_0, y2_0)
    v_tree0 = (x2_0, y1_0, y2_0)
    u_flat0, unravel_u = ravel_pytree(u_tree0)
    v_flat0, unravel_v = ravel_pytree(v_tree0)
    dtype = jnp.result_type(u_flat0, v_flat0)
    _check_functions(f, g, x1_0, x2_0, y1_0, y2_0, theta)
    check_set(x1_set, x1_0, "x1_set", "x1_0")
    if x2_0 is not None:
        check_set(x2_set, x2_0, "x2_set", "x2_0")
    elif x2_set is not None:
        raise ValueError("x2_set was given but x2_0 is None (no upper-level maximiser).")
    check_set(y1_set, y1_0, "y1_set", "y1_0")
    check_set(y2_set, y2_0, "y2_set", "y2_0")
    for name, sets in (("x1_set", x1_set), ("x2_set", x2_set), ("y1_set", y1_set),
                       ("y2_set", y2_set)):
        check_set_data(sets, name)  # concrete empty sets: ValueError; traced: INFEASIBLE
    tol = (1e-6 if jnp.finfo(dtype).bits >= 64 else 1e-3) if tol is None else tol

    sizes = [ravel_pytree(t)[0].shape[0] for t in v_tree0]
    v_blocks = np.repeat(np.arange(3), sizes).astype(np.int32)
    u_sets = (x1_set, y1_set, y2_set)
    v_sets = (x2_set, y1_set, y2_set)
    pen = _Penalty(
        f, g, theta, unravel_u, unravel_v,
        cast_sets(u_sets, dtype), cast_sets(v_sets, dtype),
        v_blocks, (v_blocks > 0).astype(np.float64),
    )
    sigma = jnp.asarray(v_smoothing, dtype)

    def kkt_at(u, v, rho):
        x1, y1, y2 = unravel_u(u)
        x2, z1, z2 = unravel_v(v)
        return bilevel_minimax_kkt(
            f, g, x1, x2, y1, y2, z1, z2, rho, theta,
            x1_set=pen.u_sets[0], x2_set=pen.v_sets[0], y1_set=pen.u_sets[1],
            y2_set=pen.u_sets[2],
        )

    def stage_rho(k):
        rho = jnp.asarray(rho0, dtype) * jnp.asarray(rho_growth, dtype) ** k
        return jnp.minimum(rho, jnp.asarray(rho_max, dtype))

    def cond(state):
        k, _, _, _, done, bad, _ = state
        return (k < num_stages) & ~done & ~bad

    def body(state):
        k, u, v, steps, _, _, _ = state
        rho = stage_rho(k)
        if inner_solver == "gdmax":
            u, v, n, bad = _gdmax(pen, u, v, rho, sigma, tol, max_iter, ascent_steps, step_size)
        else:
            u, v, n, bad = _extragradient_inner(pen, u, v, rho, sigma, tol, max_iter, step_size)
        kkt = kkt_at(u, v, rho)
        return k + 1, u, v, steps + n, kkt.max() <= tol, bad, kkt

    u0 = pen.proj_u(u_flat0.astype(dtype))
    v0 = pen.proj_v(v_flat0.astype(dtype))
    inf = jnp.asarray(jnp.inf, dtype)
    state = (jnp.asarray(0), u0, v0, jnp.asarray(0), jnp.asarray(False), jnp.asarray(False),
             KKTResiduals(*(inf,) * 8))
    k, u, v, steps, done, bad, kkt = jax.lax.while_loop(cond, body, state)
    rho = stage_rho(jnp.maximum(k - 1, 0))
    residual = kkt.max()
    finite = tree_all_finite((u, v, residual))
    status = jnp.where(done, Status.SUCCESS, Status.MAX_STEPS)
    status = jnp.where(bad, Status.DIVERGED, status)
    status = jnp.where(finite, status, Status.NONFINITE)
    infeasible = sets_empty(pen.u_sets) | sets_empty(pen.v_sets)
    x1, y1, y2 = unravel_u(u)
    if reduction is not None:  # the saddle of the exact-penalty problem, not the constrained one
        infeasible = infeasible | (done & reduction.bound_active(ravel_pytree(y2)[0]))
    status = jnp.where(infeasible, Status.INFEASIBLE, status)
    info = make_info(steps, residual, done & finite & ~bad & ~infeasible, status)
    check_info(info, throw)
    x2, z1, z2 = unravel_v(v)
    return PenaltyMinimaxSolution(x1, x2, y1, y2, z1, z2, rho, kkt, info)


def _check_functions(f, g, x1, x2, y1, y2, theta):
    try:
        out = jax.eval_shape(f, x1, x2, y1, y2, theta)
    except Exception as err:  # re-raise with the argument named
        raise TypeError(
            f"f(x1_0, x2_0, y1_0, y2_0, theta) could not be evaluated: {err}"
        ) from err
    if getattr(out, "shape", None) != ():
        shape = getattr(out, "shape", out)
        raise TypeError(f"f(x1, x2, y1, y2, theta) must return a scalar, got {shape}.")
    try:
        out = jax.eval_shape(g, x1, y1, y2, theta)
    except Exception as err:
        raise TypeError(f"g(x1_0, y1_0, y2_0, theta) could not be evaluated: {err}") from err
    if getattr(out, "shape", None) != ():
        shape = getattr(out, "shape", out)
        raise TypeError(f"g(x1, y1, y2, theta) must return a scalar, got {shape}.")
