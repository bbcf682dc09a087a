"""Linear-inequality-constrained lower levels: the KKT residual, its solvers and its rules.

The lower level is ``min_y g(y, theta)  s.t.  A y = b,  G y <= h`` with ``g`` smooth and
strongly convex; ``A, b, G, h`` may depend on ``theta`` (coupled constraints). An entry of
``h`` equal to ``+inf`` means "no constraint": the row is masked out of the iteration and of
the backward system, and receives a zero cotangent.

Active set: the one rule of :mod:`bilevel_jax._src.kkt` (tight to ``sqrt(tol)`` and a
multiplier above ``sqrt(tol)``, relative; weakly active rows are classed inactive, which gives
the one-sided derivative along directions that make such a row inactive, an element of the
Clarke generalised Jacobian), at the dtype's default tolerance. With the mask ``m`` the
residual is

    r(y, nu, lam) = [ grad g + A^T nu + G^T (m lam) ;  A y - b ;  m (G y - h) - (1 - m) lam ]

whose Jacobian is the symmetric quasi-definite masked KKT matrix. The forward solve
(:func:`sqp`) and the default adjoint solve (:func:`qp_adjoint`) run on the QP engine of
``qp.py`` (one interior point, one polish, one factorisation of the KKT system).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._src import kkt, qp, vma
from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src.types import Array, Status


class Inequalities(NamedTuple):
    """``G y <= h`` with the rows of infinite ``h`` masked out (``finite`` is the mask)."""

    G: Array
    h: Array
    finite: Array

    @classmethod
    def create(cls, G, h):
        """Mask rows with ``h = +inf``; their data is replaced by zeros (never clipped)."""
        finite = jnp.isfinite(h)
        return cls(jnp.where(finite[:, None], G, 0), jnp.where(finite, h, 0), finite)

    def slack(self, y):
        """``h - G y`` (zero on masked rows)."""
        return self.h - self.G @ y

    def bounds(self, y):
        """``max(|h_i|, |G_i y|)`` and ``max_j |G_ij|`` per row (no gradient)."""
        Gy = jax.lax.stop_gradient(self.G @ y)
        bound = jnp.maximum(jnp.abs(self.h), jnp.abs(Gy))
        return bound, jax.lax.stop_gradient(jnp.max(jnp.abs(self.G), axis=1, initial=0.0))

    def active(self, y, lam):
        """The active mask (a float array of 0/1, no gradient): :func:`kkt.active_mask`."""
        tol = kkt.default_tol(y.dtype)
        mask = kkt.active_mask(self.slack(y), lam, self.finite, tol, *self.bounds(y))
        return mask.astype(y.dtype)


def masked_residual(grad, y, nu, lam, A, b, ineq: Inequalities):
    """The masked KKT residual ``[grad + A^T nu + G^T m lam; A y - b; m (G y - h) - (1-m) lam]``."""
    m = ineq.active(y, lam)
    stationarity = grad + ineq.G.T @ (m * lam)
    primal = jnp.zeros((0,), y.dtype)
    if A is not None:
        stationarity = stationarity + A.T @ nu
        primal = A @ y - b
    return stationarity, primal, m * (ineq.G @ y - ineq.h) - (1 - m) * lam


# --------------------------------------------------------------------------------------------
# The forward solve: sequential quadratic programming over the QP engine of ``qp.py``.


class SQPResult(NamedTuple):
    """What :func:`sqp` returns.

    Attributes:
      y, nu, lam: the last iterate and its multipliers (those of the last QP subproblem).
      num_steps: the number of QP subproblems solved.
      residual: the relative KKT residual of ``(y, nu, lam)`` (as ``solve_qp`` measures it).
      verdict: ``SUCCESS`` or the status that stopped the iteration (``INFEASIBLE``,
        ``NONCONVEX``, ``NONFINITE``, ``MAX_STEPS`` when a subproblem did not converge).
      factors: the last subproblem's factorisation ``(pre, scaling)``, reused backward.
    """

    y: Array
    nu: Array
    lam: Array
    num_steps: Array
    residual: Array
    verdict: Array
    factors: Any


def sqp(fun: Callable, y0, A, b, G, h, tol, max_iter) -> SQPResult:
    """Sequential quadratic programming for ``min fun(y) s.t. A y = b, G y <= h``.

    Iteration ``k`` solves, with the QP engine of :func:`bilevel_jax.solve_qp` (homogeneous
    interior point on equilibrated data, then the active-set polish), the quadratic model

    ``min_y 1/2 y' H_k y + (grad_k - H_k y_k)' y  s.t.  A y = b,  G y <= h``

    (``H_k``, ``grad_k`` the Hessian and gradient of ``fun`` at ``y_k``), whose multipliers
    are the new ``(nu, lam)``. The step ``d = y_QP - y_k`` is taken in full when the KKT
    residual of ``fun`` at ``y_QP`` is below ``tol`` (always, for a quadratic ``fun``: one
    subproblem solves it) or when it passes the Armijo test on the exact penalty
    ``fun(y) + rho (|A y - b|_1 + |max(G y - h, 0)|_1)`` with ``rho = 1 + 2 max|(nu, lam)|``
    (``d`` is a descent direction of it for convex ``fun``); otherwise the step is halved.
    The feasible set is that of every subproblem, so an infeasibility certificate of a
    subproblem proves the problem infeasible. ``h_i = +inf`` rows are no constraint.

    Cost per iteration: one dense Hessian (``n`` Hessian-vector products) and one QP solve
    (one ``n x n`` Cholesky plus one of size ``p + k`` per interior-point step).

    Returns:
      An :class:`SQPResult`.
    """
    dtype = y0.dtype
    p, k = A.shape[0], G.shape[0]
    valid = h != jnp.inf
    zero_nu, zero_lam = jnp.zeros((p,), dtype), jnp.zeros((k,), dtype)

    def data(y, H):
        return H, jax.grad(fun)(y) - H @ y, A, b, G, h

    def subproblem(y):
        H = ls.hessian(fun, y)
        z, fw = qp.solve_forward(data(y, H), (y, zero_nu, zero_lam), False, True, 0.0, tol,
                                 qp.default_options(dtype)["max_iter"])
        return H, z, fw

    def violation(y):
        viol = jnp.where(valid, jnp.maximum(G @ y - h, 0), 0)
        return jnp.sum(jnp.abs(A @ y - b)) + jnp.sum(viol)

    def body(state):
        it, y, nu_prev, lam_prev, res_prev = state[:5]
        H, (y_qp, nu, lam), fw = subproblem(y)
        status = fw.info.status
        ok = (status == Status.SUCCESS) | (status == Status.RANK_DEFICIENT)
        # A failed subproblem (NaN outputs when infeasible or nonconvex) leaves the iterate.
        y_qp = jnp.where(ok, y_qp, y)
        nu, lam = jnp.where(ok, nu, nu_prev), jnp.where(ok, lam, lam_prev)
        d = y_qp - y
        res_full = qp.point_residual(data(y_qp, H), (y_qp, nu, lam))
        rho = 1 + 2 * jnp.max(jnp.abs(jnp.concatenate([nu, lam])), initial=0.0)
        v0 = violation(y)
        phi0 = fun(y) + rho * v0
        slope = jnp.dot(jax.grad(fun)(y), d) - rho * v0

        def armijo(t):
            y_t = y + t * d
            return fun(y_t) + rho * violation(y_t) <= phi0 + 1e-4 * t * slope

        full = (res_full <= tol) | armijo(jnp.ones((), dtype))
        t = vma.while_loop(lambda t: ~full & ~armijo(t) & (t > 1e-10), lambda t: 0.5 * t,
                           jnp.where(full, 1, 0.5).astype(dtype))
        y_new = y + t * d
        # (the full step's residual is known: measure again only after a shortened step)
        res = vma.cond(full, lambda: res_full,
                       lambda: qp.point_residual(data(y_new, H), (y_new, nu, lam)))
        res = jnp.where(ok, res, res_prev)
        verdict = jnp.where(ok, Status.SUCCESS, jnp.asarray(_VERDICT_OF_QP)[jnp.clip(status, 0, 8)])
        return it + 1, y_new, nu, lam, res, verdict, fw.pre, fw.scaling

    def cond(state):
        it, res, verdict = state[0], state[4], state[5]
        return (it < max_iter) & (res > tol) & (verdict == Status.SUCCESS)

    shapes = jax.eval_shape(lambda y: subproblem(y)[2], y0)
    factors = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), (shapes.pre, shapes.scaling))
    state = (jnp.asarray(0, jnp.int32), y0, zero_nu, zero_lam, jnp.asarray(jnp.finfo(dtype).max),
             jnp.asarray(Status.SUCCESS, jnp.int32), *factors)
    it, y, nu, lam, res, verdict, pre, scaling = vma.while_loop(cond, body, state)
    return SQPResult(y, nu, lam, it, res, verdict, (pre, scaling))


# The verdict when a QP subproblem ends with the status at that index: an unbounded quadratic
# model does not prove ``fun`` unbounded, so it reads as a failure to converge (MAX_STEPS).
_VERDICT_OF_QP = np.asarray([Status.SUCCESS, Status.MAX_STEPS, Status.INFEASIBLE,
                             Status.MAX_STEPS, Status.NONFINITE, Status.SUCCESS,
                             Status.MAX_STEPS, Status.NONCONVEX, Status.SINGULAR], np.int32)


def qp_adjoint(vjp_z, zbar, z, ineq: Inequalities, factors, steps=3):
    """Solve the masked KKT system ``K u = zbar`` of the implicit rule with the forward's factors.

    ``K`` (the Jacobian of :func:`masked_residual`, symmetric) is applied exactly through
    ``vjp_z``; the factorisation of the last SQP subproblem (the Hessian at the iterate before
    the last step) preconditions at most ``steps`` refinement steps, which stop at a backward
    error of ``100 eps``. For a quadratic ``g`` the two matrices are equal and no refinement
    is needed; otherwise the factor is
    within the last step's length of the exact one and the refinement converges fast. The
    result is NaN when the backward error is not below ``sqrt(eps)`` (a singular system).
    """
    pre, scaling = factors
    y, nu, lam = z
    p, dtype = nu.shape[0], y.dtype
    m, e = qp.active_system(p, ineq.active(y, lam), 0.0, dtype)
    solve = qp.original_solver(pre, scaling, m, e)
    ybar, nubar, lambar = zbar
    r = (ybar, jnp.concatenate([nubar, lambar]))

    def apply(x):
        w, mu = x
        a = vjp_z((w, mu[:p], mu[p:]))
        return a[0], jnp.concatenate([a[1], a[2]])

    eps = jnp.finfo(dtype).eps

    def error(x):  # (residual r - K x, its size, the size of r + K x)
        a = apply(x)
        d = (r[0] - a[0], r[1] - a[1])
        sizes = (jnp.max(jnp.abs(jnp.concatenate(v))) for v in (d, r, a))
        res, r_, a_ = sizes
        return d, res, r_ + a_

    def cond(state):
        i, _, (_, res, scale) = state
        return (i < steps) & (res > 100 * eps * scale)

    def refine(state):
        i, x, (d, _, _) = state
        dx, _ = solve(d)
        x = (x[0] + dx[0], x[1] + dx[1])
        return i + 1, x, error(x)

    # Refinement stops once the backward error is at rounding level: for a quadratic g the
    # first solve is exact and no step runs (each cost 0.8 ms at n = 200, a third of argmin's
    # hypergradient time).
    x = solve(r)[0]
    _, x, (_, res, scale) = vma.while_loop(cond, refine, (jnp.asarray(0), x, error(x)))
    ok = res <= jnp.sqrt(eps) * scale
    w, mu = (jnp.where(ok, v, jnp.nan) for v in x)
    return w, mu[:p], mu[p:]
