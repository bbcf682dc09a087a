"""``argmin``: smooth strongly convex lower levels, unconstrained or with linear equalities.

The lower level is ``y*(theta) = argmin_y g(y, theta)  s.t.  A(theta) y = b(theta)``, with ``g``
smooth and strongly convex in ``y`` (a pytree, flattened to ``n`` entries) and ``A`` of shape
``(m, n)``. Its optimality (KKT) residual, the single source of truth for the stopping test and
for the implicit rule, is

    r(y, nu, theta) = [ grad_y g(y, theta) + A^T nu ;  A y - b ] .

Forward solvers keep the iterate on the affine set ``{A y = b}`` with the orthogonal projector
``P = I - A^+ A`` onto ``null(A)`` (``A^+`` the pseudo-inverse, so linearly dependent rows are
allowed): damped Newton (dense, small ``n``), L-BFGS (optax, large ``n``) and an accelerated
projected gradient method. The multipliers are recovered as the least-squares solution
``nu = -(A^+)^T grad_y g``.

Hypergradient rules:

* ``"implicit"``: the KKT system ``[H A^T; A 0] [w; mu] = [ybar; nubar]`` solved in the
  null-space form ``(P H P + I - P) w_N = P (ybar - H w_R)``, ``w_R = A^+ nubar``,
  ``mu = (A^+)^T (ybar - H w)`` (Cholesky, reusing Newton's factorisation, or CG), or as a
  full symmetric system (MINRES, LU, GMRES, ...); then ``thetabar = -d/dtheta <(w, mu), r>``.
* ``"finite_difference"``: first-order, Hessian-free (Kornowski et al.; docs page "Unconstrained").
* ``"unrolled"``: reverse-mode through the forward solver's own steps (``loops.iterate``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import kkt, loops, vma
from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src.constrained import Inequalities, masked_residual, qp_adjoint, sqp
from bilevel_jax._src.implicit import SolveAux, custom_solution, implicit_solution
from bilevel_jax._src.tree import is_inexact, tree_all_finite, tree_scale
from bilevel_jax._src.types import (
    Array,
    PyTree,
    Solution,
    Status,
    check_info,
    make_info,
)
from bilevel_jax._src.validation import (
    check_option,
    check_scalar_output,
    flatten_variables,
    raise_if_crossed,
)

SOLVERS = ("auto", "newton", "lbfgs", "gradient", "sqp")
HYPERGRADS = ("implicit", "penalty", "finite_difference", "unrolled")
LINEAR_SOLVERS = (
    "auto", "cholesky", "cg", "neumann", "dense", "lu", "minres", "gmres", "normal_cg"
)
#: Largest flattened ``y`` for which ``solver="auto"`` uses dense Newton.
NEWTON_MAX_SIZE = 500
_REDUCED_METHODS = ("auto", "cholesky", "cg", "neumann")


default_tol = kkt.default_tol


# --------------------------------------------------------------------------------------------
# The affine set {A y = b} and the KKT residual.


class AffineSet(NamedTuple):
    """Linear equality constraints ``A y = b`` with the pseudo-inverse ``A^+`` of ``A``."""

    A: Array
    b: Array
    pinv: Array

    def tangent(self, z):
        """Project ``z`` onto ``null(A)``: ``P z = z - A^+ A z``."""
        return z - self.pinv @ (self.A @ z)

    def project(self, z):
        """Project ``z`` onto ``{A y = b}`` (least-squares when inconsistent)."""
        return z - self.pinv @ (self.A @ z - self.b)

    def multipliers(self, grad):
        """Least-squares multipliers ``nu = argmin ||grad + A^T nu||`` (minimum norm)."""
        return -(self.pinv.T @ grad)


def _tangent(affine, z):
    return z if affine is None else affine.tangent(z)


def _project(affine, z):
    return z if affine is None else affine.project(z)


class _Problem(NamedTuple):
    """The lower level on flat ``y``; each field a function of the differentiable ``params``.

    ``z = (y, nu, lam)`` throughout, with ``nu`` / ``lam`` of size 0 when absent.
    """

    objective: Callable  # (y_flat, params) -> scalar
    equalities: Callable | None = None  # params -> (A, b)
    inequalities_fn: Callable | None = None  # params -> (G, h)
    box: Callable | None = None  # params -> (lo, hi), flat (box-only lower levels)
    bounds: Callable | None = None  # params -> (lo, hi), flat, whenever box= is given

    def affine(self, params, extra=None) -> AffineSet | None:
        """The equality constraints, with ``extra = (G_I, h_I)`` rows appended if given."""
        rows = [] if self.equalities is None else [self.equalities(params)]
        rows += [] if extra is None else [extra]
        if not rows:
            return None
        A = jnp.concatenate([r[0] for r in rows])
        b = jnp.concatenate([r[1] for r in rows])
        return AffineSet(A, b, jnp.linalg.pinv(A))

    def inequalities(self, params) -> Inequalities | None:
        if self.inequalities_fn is None:
            return None
        return Inequalities.create(*self.inequalities_fn(params))

    def free_mask(self, y, params):
        """Box lower levels: 1 on free coordinates, 0 on strictly active bounds.

        A coordinate on a bound is active when its multiplier (the gradient pointing out of
        the box) exceeds what the solve can tell from zero: the largest entry of the
        stationarity residual the forward solve left, ``|y - clip(y - grad, lo, hi)|`` (the
        gradient on free coordinates), and at least ``10 eps (1 + max |grad|)`` (rounding in
        the gradient). Smaller multipliers are weakly active and count as free (the
        one-sided derivative along directions that leave the bound). Both thresholds scale
        with the dtype and with the solve's accuracy.
        """
        lo, hi = self.box(params)
        grad = jax.grad(self.objective)(y, params)
        at_lo, at_hi = y <= lo, y >= hi
        eps = jnp.finfo(y.dtype).eps
        stationarity = jnp.max(jnp.abs(y - jnp.clip(y - grad, lo, hi)), initial=0.0)
        margin = jnp.maximum(stationarity, 10 * eps * (1 + jnp.max(jnp.abs(grad), initial=0.0)))
        active = (at_lo & (grad > margin)) | (at_hi & (grad < -margin))
        return jax.lax.stop_gradient(1 - active.astype(y.dtype))

    def residual(self, z, params):
        """The optimality residual: masked KKT, or the masked gradient for boxes."""
        y, nu, lam = z
        grad = jax.grad(self.objective)(y, params)
        if self.box is not None:
            lo, hi = self.box(params)
            m = self.free_mask(y, params)
            return m * grad + (1 - m) * (y - jnp.where(y <= lo, lo, hi)), nu, lam
        A, b = (None, None) if self.equalities is None else self.equalities(params)
        ineq = self.inequalities(params)
        if ineq is None:
            primal = jnp.zeros((0,), y.dtype) if A is None else A @ y - b
            return grad + (0 if A is None else A.T @ nu), primal, lam
        return masked_residual(grad, y, nu, lam, A, b, ineq)

    def lagrangian(self, y, nu, lam, params):
        """``g + nu^T (A y - b) + lam^T (G y - h)``."""
        value = self.objective(y, params)
        if self.equalities is not None:
            A, b = self.equalities(params)
            value = value + nu @ (A @ y - b)
        ineq = self.inequalities(params)
        if ineq is not None:
            value = value + lam @ (ineq.G @ y - ineq.h)
        return value

    def multipliers(self, y, lam, params):
        """Least-squares ``(nu, lam)`` on the equalities and the active rows."""
        ineq = self.inequalities(params)
        m_eq = 0 if self.equalities is None else self.equalities(params)[0].shape[0]
        extra = None
        if ineq is not None:
            m = ineq.active(y, lam)
            extra = (m[:, None] * ineq.G, m * ineq.h)
        affine = self.affine(params, extra)
        if affine is None:
            return jnp.zeros((0,), y.dtype), lam
        mult = affine.multipliers(jax.grad(self.objective)(y, params))
        nu = mult[:m_eq]
        return nu, (lam if ineq is None else mult[m_eq:] * m)


# --------------------------------------------------------------------------------------------
# Forward solvers. Each takes a function of flat y, a feasible start, the affine set, a
# relative tolerance and an iteration limit, and returns (y, num_steps, residual_norm,
# converged, factorisation or None). The residual is ||P grad g(y)||.


def _newton(fun, y0, affine, tol, max_iter, unrolled=False):
    """Damped Newton with Armijo backtracking, on the affine set via the projector ``P``.

    One step: ``d = -(P H P + I - P)^{-1} P grad g(y)`` (Cholesky), then the first of
    ``t = 1, 1/2, ...`` that passes Armijo on ``g`` or (once the decrease is below rounding in
    ``g``) reduces ``||P grad g||``. The same step runs forward (``while_loop``, stopping at
    the tolerance or a failed search) and unrolled (``scan`` of ``max_iter`` steps).
    """
    n = y0.shape[0]
    eye = jnp.eye(n, dtype=y0.dtype)
    P = None if affine is None else eye - affine.pinv @ affine.A

    def reduced_hessian(y):
        hess = ls.hessian(fun, y)
        return hess if P is None else P @ hess @ P + (eye - P)

    def model(y):
        grad = jax.grad(fun)(y)
        return _tangent(affine, grad), ls.factorize(reduced_hessian(y), structure="spd")

    def step(state):
        y, grad, fact, _ = state
        direction = -ls.solve_factorized(fact, grad)
        value, slope, gnorm = fun(y), grad @ direction, jnp.linalg.norm(grad)

        def trial(t):
            y_t = y + t * direction
            pgrad = _tangent(affine, jax.grad(fun)(y_t))
            armijo = fun(y_t) <= value + 1e-4 * t * slope
            return armijo | (jnp.linalg.norm(pgrad) <= (1 - 1e-4 * t) * gnorm), None

        t, ok, _ = loops.backtracking(trial, jnp.ones_like(value), min_step=1e-12)
        ok = ok & jnp.all(jnp.isfinite(direction))
        y_new = jnp.where(ok, y + t * direction, y)
        grad_new, fact_new = model(y_new)
        return y_new, grad_new, fact_new, ok

    grad0, fact0 = model(y0)
    threshold = tol * (1 + jnp.linalg.norm(grad0))

    def cond(state):
        _, grad, _, ok = state
        return (jnp.linalg.norm(grad) > threshold) & ok

    k, (y, grad, fact, _) = loops.iterate(step, (y0, grad0, fact0, jnp.asarray(True)), cond,
                                          max_iter, unrolled)
    res = jnp.linalg.norm(grad)
    if unrolled:  # the unrolled rule reports no curvature verdict
        return y, k, res, res <= threshold, fact, None
    return y, k, res, res <= threshold, fact, _curvature_verdict(reduced_hessian, fact, y)


def _curvature_verdict(hessian, fact, y):
    """``SUCCESS``, ``SINGULAR`` or ``NONCONVEX`` from Newton's Cholesky factor at ``y``.

    A finite factor with a pivot ``c_ii^2`` below ``100 eps`` times the diagonal entry
    ``H_ii`` is singular up to rounding (row ``i`` depends on the previous rows). A factor
    with NaN (the factorisation of an indefinite matrix fails) is told apart from a singular
    positive semidefinite one by factorising the Hessian shifted by ``sqrt(eps)`` times its
    largest entry: success means the Hessian is positive semidefinite up to that shift
    (``SINGULAR``), failure that it has an eigenvalue below ``-sqrt(eps)`` times its scale
    (``NONCONVEX``). The shifted factorisation runs only in that failure case (under
    ``jax.vmap`` it runs for every member).
    """
    c = fact.factors[0]
    eps = jnp.finfo(y.dtype).eps
    # Each pivot relative to its diagonal entry H_ii = sum_j c_ij^2: the fraction of H_ii left
    # after eliminating the previous unknowns, invariant to a diagonal scaling of y.
    pivots = jnp.diagonal(c) ** 2 / jnp.sum(c * c, axis=1)
    failed = ~jnp.all(jnp.isfinite(pivots))
    tiny = jnp.min(pivots) <= 100 * eps

    def classify():
        hess = hessian(y)
        scale = jnp.max(jnp.abs(hess))
        shifted = ls.cholesky(hess + jnp.sqrt(eps) * scale * jnp.eye(y.shape[0], dtype=y.dtype))
        psd = jnp.all(jnp.isfinite(shifted)) | (scale == 0)  # a zero Hessian is singular
        return jnp.where(psd & jnp.all(jnp.isfinite(hess)), Status.SINGULAR, Status.NONCONVEX)

    def finite_factor():
        return jnp.where(tiny, Status.SINGULAR, Status.SUCCESS)

    return vma.cond(failed, classify, finite_factor).astype(jnp.int32)


def _lbfgs(fun, y0, affine, tol, max_iter):
    """L-BFGS (optax, zoom line search) in the null space: ``y = y0 + P z``."""
    vma.unsupported("solver='lbfgs'", vma.OPTAX_LINESEARCH, y0)

    def reduced(z):
        # optax's line search may promote z to float64 when x64 is on: keep y0's dtype.
        return fun(y0 + _tangent(affine, z.astype(y0.dtype)))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(reduced)
    z0 = jnp.zeros_like(y0)
    threshold = tol * (1 + jnp.linalg.norm(jax.grad(reduced)(z0)))
    eps = jnp.finfo(y0.dtype).eps

    def cond(state):
        _, _, res, negative = state
        return (res > threshold) & ~negative

    def step(state):
        # Stops at negative curvature along the step, s' (grad(z + s) - grad(z)) < 0 beyond
        # rounding: g is not convex there (on a convex g the curvature is >= 0).
        z, opt_state, _, _ = state
        value, grad = value_and_grad(z, state=opt_state)
        updates, opt_state = opt.update(
            grad, opt_state, z, value=value, grad=grad, value_fn=reduced
        )
        z_new = optax.apply_updates(z, updates).astype(y0.dtype)
        grad_new = jax.grad(reduced)(z_new)
        move, gnorm = z_new - z, jnp.linalg.norm(grad_new)
        rounding = 100 * eps * jnp.linalg.norm(move) * (jnp.linalg.norm(grad) + gnorm)
        negative = move @ (grad_new - grad) < -rounding
        return z_new, opt_state, gnorm, negative

    state = (z0, opt.init(z0), jnp.asarray(jnp.inf, y0.dtype), jnp.asarray(False))
    k, (z, _, res, negative) = loops.iterate(step, state, cond, max_iter)
    verdict = jnp.where(negative, Status.NONCONVEX, Status.SUCCESS).astype(jnp.int32)
    return y0 + _tangent(affine, z), k, res, res <= threshold, None, verdict


def _gradient(fun, y0, project, tol, max_iter, unrolled=False):
    """Accelerated projected gradient (FISTA) with adaptive step and gradient restart.

    ``project`` maps onto the feasible set (the affine set, or a box). The residual is the
    gradient mapping ``||y - project(y - grad g(y))||``. The step ``1/L`` adapts to the local
    curvature ``||grad(y+) - grad(x)|| / ||y+ - x||`` (no function values, so rounding near
    the solution cannot stall it); momentum restarts when the step points against it
    (O'Donoghue and Candes, 2015). The same step runs forward and unrolled (the step size is
    held constant by the unrolled derivative).
    """
    grad_fn = jax.grad(fun)
    tiny = jnp.finfo(y0.dtype).tiny

    def mapping(y):
        return jnp.linalg.norm(y - project(y - grad_fn(y)))

    threshold = tol * (1 + mapping(y0))

    def projected_step(x, lip):
        # Search on the step t = 1/L: accept when the local curvature is at most 1/t, else
        # L <- 2 max(L, curvature).
        grad = grad_fn(x)

        def trial(t):
            y_new = project(x - t * grad)
            d = y_new - x
            curvature = jnp.linalg.norm(grad_fn(y_new) - grad) / jnp.maximum(
                jnp.linalg.norm(d), tiny)
            return curvature * t <= 1, (y_new, curvature)

        def shrink(t, aux):
            return 1 / (2 * jnp.maximum(1 / t, aux[1]))

        t, _, (y_new, _) = loops.backtracking(trial, 1 / lip, shrink=shrink, min_step=1e-30,
                                              differentiable=unrolled)
        return 1 / t, y_new

    def step(state):
        y, x, t, lip, _ = state
        lip, y_new = projected_step(x, lip)
        t_new = (1 + jnp.sqrt(1 + 4 * t**2)) / 2
        restart = (x - y_new) @ (y_new - y) > 0
        x_new = jnp.where(restart, y_new, y_new + ((t - 1) / t_new) * (y_new - y))
        t_new = jnp.where(restart, jnp.ones_like(t), t_new)
        return y_new, x_new, t_new, 0.9 * lip, jax.lax.stop_gradient(mapping(y_new))

    def cond(state):
        return state[4] > threshold

    one = jnp.ones((), y0.dtype)
    state = (y0, y0, one, one, jax.lax.stop_gradient(mapping(y0)))
    k, (y, _, _, _, res) = loops.iterate(step, state, cond, max_iter, unrolled)
    return y, k, res, res <= threshold, None, jnp.asarray(Status.SUCCESS, jnp.int32)


_FORWARD = {
    "newton": _newton,
    "lbfgs": _lbfgs,
    "gradient": lambda fun, y0, affine, tol, max_iter: _gradient(
        fun, y0, lambda z: _project(affine, z), tol, max_iter
    ),
}


# --------------------------------------------------------------------------------------------
# Unrolled solvers: a fixed-length scan of differentiable steps.


def _unrolled(fun, y0, affine, tol, max_iter, solver, project=None):
    """Exactly ``max_iter`` steps of the forward solver's own step (Newton or gradient)."""
    if solver == "newton":
        y, k, res, conv, *_ = _newton(fun, y0, affine, tol, max_iter, unrolled=True)
    else:
        project = project or (lambda z: _project(affine, z))
        y, k, res, conv, *_ = _gradient(fun, y0, project, tol, max_iter, unrolled=True)
    return y, k, res, conv


def _lipschitz_estimate(fun, y, affine, num_iter=50):
    """Largest eigenvalue of ``P H P`` at ``y`` by power iteration (times a safety factor)."""
    grad = jax.grad(fun)

    def hvp(w):
        return _tangent(affine, jax.jvp(grad, (y,), (_tangent(affine, w),))[1])

    v = loops.power_iteration(hvp, _tangent(affine, loops.power_start(y)), num_iter)
    return 1.5 * jnp.maximum(v @ hvp(v), jnp.finfo(y.dtype).tiny)


# --------------------------------------------------------------------------------------------
# The implicit rule's adjoint solves.


def kkt_adjoint(hvp, v, nubar, affine, fact, method, tol=None, max_iter=None, report=False):
    """Solve ``[H A^T; A 0] [w; mu] = [v; nubar]`` in null-space form (SPD reduced system).

    With ``P = I - A^+ A``: ``w = w_R + w_N``, ``w_R = A^+ nubar``,
    ``(P H P + I - P) w_N = P (v - H w_R)`` and ``mu = (A^+)^T (v - H w)``. Rank-deficient
    ``A`` is allowed (minimum-norm ``mu``). ``fact``, a factorisation of the reduced matrix
    from the forward pass, is reused when given. A reduced solve that does not converge makes
    ``w`` (hence the hypergradient) NaN; ``report`` prints a message when it happens.
    """
    if affine is None:
        if fact is not None:
            return ls.solve_factorized(fact, v), None
        return _reduced_solve(hvp, v, v, method, tol, max_iter, report), None
    w_r = affine.pinv @ nubar
    rhs = affine.tangent(v - hvp(w_r))

    def reduced(w):
        pw = affine.tangent(w)
        return affine.tangent(hvp(pw)) + (w - pw)

    w_n = ls.solve_factorized(fact, rhs) if fact is not None else _reduced_solve(
        reduced, rhs, v, method, tol, max_iter, report
    )
    w = w_r + w_n
    return w, -affine.multipliers(v - hvp(w))


#: Largest SPD adjoint system that ``linear_solver="auto"`` factorises without trying CG
#: first. Above it, up to ``ls.DENSE_MAX_SIZE``, CG runs first (at most ``n`` steps) and the
#: dense factorisation only where CG did not converge: materialising the matrix takes ``n``
#: Hessian-vector products and factorising it ``n^3 / 3`` flops, where CG on a
#: well-conditioned system takes tens of products. Measured on the box QP of
#: ``bench/box_qp.py`` at ``n = 1e3`` (tridiagonal Hessian, one core), forward + backward took
#: 41 ms with the dense solve and 0.4 ms with CG (gradient error 2e-16 and 4e-13).
_CG_FIRST_ABOVE = 200


def _reduced_solve(matvec, rhs, like, method, tol, max_iter, report=False):
    """The SPD adjoint solve; NaN when it does not converge (see ``ls.solution_or_nan``)."""
    n = rhs.shape[0]
    if method == "neumann":
        step = 1.0 / _lipschitz_estimate(lambda w: 0.5 * w @ matvec(w), like, None)
        sol = ls.solve_neumann(matvec, rhs, step=step, num_terms=max_iter or 1000)
    elif method == "auto" and _CG_FIRST_ABOVE < n <= ls.DENSE_MAX_SIZE:
        sol = ls.linear_solve(matvec, rhs, method="cg", structure="spd", tol=tol,
                              max_iter=max_iter or n)
        sol = vma.cond(sol.converged, lambda: sol,
                       lambda: ls.linear_solve(matvec, rhs, method="dense", structure="spd"))
    else:
        sol = ls.linear_solve(matvec, rhs, method=method, structure="spd", tol=tol,
                              max_iter=max_iter)
    return ls.solution_or_nan(sol, report=report, what="argmin adjoint solve")


def _adjoint_solve(problem, method: str, ridge: float, report: bool = False):
    """Build ``adjoint_solve(vjp_z, zbar, z, params, aux)`` for ``z = (y, nu, lam)``.

    A backward linear solve that does not converge makes the cotangents NaN; ``report``
    (``throw=True``) also prints a message when that happens.
    """

    def adjoint_solve(vjp_z, zbar, z, params, aux):
        y, nu, lam = z
        v, nubar, lambar = zbar

        def hvp(w):
            return vjp_z((w, jnp.zeros_like(nu), jnp.zeros_like(lam)))[0] + ridge * w

        if problem.box is not None:
            # r = m grad g + (1 - m)(y - bound): solve H_FF u_F = v_F, then the bound rows.
            m = problem.free_mask(y, params)
            u_f = _reduced_solve(
                lambda w: m * hvp(m * w) + (1 - m) * w, m * v, v, method, None, None, report
            )
            return u_f + (1 - m) * (v - hvp(u_f)), nubar, lambar
        if method not in _REDUCED_METHODS:
            # The full symmetric (quasi-definite on inactive rows) KKT system.
            flat, unflat = ravel_pytree(zbar)

            def kkt(u):
                w = unflat(u)[0]
                return ravel_pytree(jax.tree_util.tree_map(jnp.add, vjp_z(unflat(u)), (
                    ridge * w, jnp.zeros_like(nu), jnp.zeros_like(lam))))[0]

            sol = ls.linear_solve(kkt, flat, method=method, structure="symmetric")
            return unflat(ls.solution_or_nan(sol, report=report, what="argmin adjoint solve"))
        fact = aux[1] if ridge == 0.0 and method == "auto" else None
        ineq = problem.inequalities(params)
        if ineq is not None and fact is not None:
            # The forward's factorisation of the last QP subproblem, refined on the exact K.
            return qp_adjoint(vjp_z, zbar, z, ineq, fact)
        if ineq is None:
            w, mu = kkt_adjoint(hvp, v, nubar, problem.affine(params), fact, method,
                                report=report)
            return w, jnp.zeros_like(nu) if mu is None else mu, lambar
        # Active inequality rows join the equalities; inactive rows: mu_i = -lambar_i.
        m = ineq.active(y, lam)
        affine = problem.affine(params, extra=(m[:, None] * ineq.G, m * ineq.h))
        w, mu = kkt_adjoint(hvp, v, jnp.concatenate([nubar, m * lambar]), affine, None, method,
                            report=report)
        mu_eq, mu_in = mu[: nu.shape[0]], mu[nu.shape[0]:]
        return w, mu_eq, m * mu_in - (1 - m) * lambar

    return adjoint_solve


# --------------------------------------------------------------------------------------------
# First-order (Hessian-free) rules.


def _finite_difference_backward(problem, solver, delta, tol, max_iter):
    """Finite differences: ``[grad_theta l(y_d, nu_d) - grad_theta l(y*, nu*)] / delta``.

    ``(y_d, nu_d)`` solves the lower level with ``g + delta <v, y>`` (``v = ybar / |ybar|``);
    by the envelope theorem the difference quotient tends to ``v^T Dy*`` with error
    ``O(delta)``, and is exact when ``g`` is quadratic with ``grad_theta g`` affine in ``y``.
    """

    def backward(zbar, y, params, aux):
        scale = jnp.linalg.norm(zbar)
        direction = zbar / jnp.where(scale > 0, scale, 1)
        affine = problem.affine(params)
        nu = problem.multipliers(y, None, params)[0]
        # Tilt by the residual left at y* so that y* solves the unperturbed problem exactly.
        tilt = jax.grad(problem.lagrangian)(y, nu, None, params)

        def perturbed(yf):
            return problem.objective(yf, params) + (delta * direction - tilt) @ yf

        y_d = _FORWARD[solver](perturbed, y, affine, tol, max_iter)[0]
        nu_d = None if affine is None else affine.multipliers(jax.grad(perturbed)(y_d))

        def gap(p):
            return problem.lagrangian(y_d, nu_d, None, p) - problem.lagrangian(y, nu, None, p)

        return tree_scale(scale / delta, jax.grad(gap, allow_int=True)(params))

    return backward


def _penalty_backward(problem, alpha, tol, max_iter):
    """The F2CBA penalty oracle as a VJP (Kornowski et al.; docs ``lower/inequality.md``).

    With ``(y*, nu*, lam*)`` and the active rows ``c_I(y) = [A y - b; G_I y - h_I]`` held
    fixed, for ``v = ybar / |ybar|`` solve the *unconstrained* problem

        y_a = argmin_y  alpha^2 v^T y + l(y) + alpha^-2/2 ||c_I(y)||^2

    and return ``|ybar| d/dtheta [ alpha^-2 (l(y_a) - l(y*)) + alpha^-4/2 ||c_I(y_a)||^2 ]``
    (``l`` the Lagrangian). Error ``O(alpha)``, ``O(alpha^2)`` for quadratic lower levels.
    The unknown is ``d = y_a - y*`` and ``c_I(y_a) = C_I d`` (``c_I(y*) = 0``), which avoids
    the cancellation of ``c_I(y_a) ~ alpha^4`` in floating point; with ``alpha`` below about
    ``1e-3`` in float64 rounding still dominates, so the default is ``1e-3``.
    """

    def backward(zbar, y, params, aux):
        scale = jnp.linalg.norm(zbar)
        direction = zbar / jnp.where(scale > 0, scale, 1)
        nu, lam = problem.multipliers(y, aux[1], params)
        ineq = problem.inequalities(params)
        m = None if ineq is None else ineq.active(y, lam)

        def active_rows(yf, p, shift=True):
            rows = []
            if problem.equalities is not None:
                A, b = problem.equalities(p)
                rows.append(A @ yf - (b if shift else 0))
            if m is not None:
                ineq_p = problem.inequalities(p)
                rows.append(m * (ineq_p.G @ yf - (ineq_p.h if shift else 0)))
            return jnp.concatenate(rows) if rows else jnp.zeros((0,), yf.dtype)

        # Tilt by the residual left at y* (solve error), which 1/alpha^2 would amplify.
        tilt = jax.grad(problem.lagrangian)(y, nu, lam, params)

        def penalised(d):
            c = active_rows(d, params, shift=False)
            return ((alpha**2 * direction - tilt) @ d + problem.lagrangian(y + d, nu, lam, params)
                    + 0.5 / alpha**2 * (c @ c))

        solver = "newton" if y.shape[0] <= NEWTON_MAX_SIZE else "lbfgs"
        d = _FORWARD[solver](penalised, jnp.zeros_like(y), None, tol, max_iter)[0]
        c = active_rows(d, params, shift=False)

        def oracle(p):
            gap = problem.lagrangian(y + d, nu, lam, p) - problem.lagrangian(y, nu, lam, p)
            return gap / alpha**2 + (c @ active_rows(y + d, p)) / alpha**4

        return tree_scale(scale, jax.grad(oracle, allow_int=True)(params))

    return backward


# --------------------------------------------------------------------------------------------
# The public entry point.


def argmin(
    g: Callable,
    y0: PyTree,
    theta: PyTree,
    *,
    eq: Callable | None = None,
    ineq: Callable | None = None,
    box: Callable | None = None,
    solver: str = "auto",
    hypergrad: str = "implicit",
    linear_solver: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    ridge: float = 0.0,
    delta: float = 1e-4,
    alpha: float = 1e-3,
    throw: bool = False,
) -> Solution:
    r"""Minimise a smooth strongly convex ``g(y, theta)`` subject to linear constraints.

    Solves the lower level

    .. math:: y^*(\theta) = \arg\min_y g(y, \theta) \ \text{s.t.}\ A y = b,\ G y \le h,
              \ lo \le y \le hi

    (every constraint optional, each possibly depending on ``theta``) and makes ``y*`` and the
    multipliers ``nu*``, ``lam*`` differentiable in reverse mode with respect to ``theta`` and
    to every array that ``g``, ``eq``, ``ineq`` or ``box`` close over. The KKT conditions are
    ``grad_y g + A^T nu + G^T lam = 0``, ``A y = b``, ``0 <= lam _|_ h - G y >= 0``.

    With ``ineq`` (or ``box`` together with ``eq``/``ineq``) the forward solve is sequential
    quadratic programming over the engine of :func:`solve_qp`: each step solves the quadratic
    model of ``g`` at the iterate under the constraints (homogeneous interior point, then the
    active-set polish), with an Armijo test on an exact penalty; a quadratic ``g`` takes one
    step, so it costs what ``solve_qp`` costs.

    The implicit rule differentiates the KKT system on the active set (the one rule of the
    library: rows tight to ``sqrt(tol)`` with a multiplier above ``sqrt(tol)``, both relative
    and per unit row norm; weakly active rows count as inactive, which gives the one-sided
    derivative along directions that leave them): it solves
    ``[H A_I^T; A_I 0] [w; mu] = [ybar; nubar_I]`` (``H`` the Hessian of ``g``, ``A_I`` the
    equality and active rows) and returns ``thetabar = -d/dtheta <(w, mu), r(y*, nu*, lam*)>``
    with ``r`` the masked KKT residual (docs ``lower/inequality.md``). By default the system
    is solved through the last QP subproblem's factorisation, refined against the exact
    Hessian at ``y*``; a system that is singular on the identified active set gives NaN
    cotangents. For ``box`` constraints alone the rule is matrix-free:
    ``H_FF u_F = ybar_F`` on the free coordinates by CG with masked Hessian-vector products.

    Assumptions: ``g`` twice differentiable and strongly convex in ``y`` (on ``null(A)``);
    constraints consistent. Failures are reported in ``info.status``: ``INFEASIBLE``
    (inconsistent ``A y = b``, or a traced box with some ``lo > hi``; concrete bounds with
    ``lo > hi`` raise ``ValueError``), ``MAX_STEPS`` (with the residual reached),
    ``NONFINITE`` (``nan`` in ``theta`` or in what the functions close over, or a non-finite
    iterate), ``NONCONVEX`` (negative curvature: Newton's Cholesky factorisation of the
    reduced Hessian failed on an indefinite matrix, or an L-BFGS step met negative
    curvature; the solve stops there), ``SINGULAR`` (Newton's reduced Hessian at the
    returned point is singular: the minimiser is not isolated and has no derivative),
    ``UNBOUNDED`` (``g`` fell below ``-1e30 (1 + |g(y0)|)``), ``RANK_DEFICIENT`` (dependent
    rows in ``A``: ``y`` is still unique and ``nu`` is the minimum-norm multiplier; a
    success). ``+inf`` in ``h`` (or infinite box bounds) means "no constraint". L-BFGS and
    the projected gradient method do not form the Hessian, so they cannot see a singular
    one; their backward solve then returns NaN.

    Failure policy (as for every entry point, see :class:`Status`): with a status other than
    ``SUCCESS`` or ``RANK_DEFICIENT`` every cotangent is NaN (per problem under
    ``jax.vmap``); ``NONFINITE`` and ``INFEASIBLE`` (no point to return) also make ``y``,
    ``nu`` and ``lam`` NaN, and the other failures return the last iterate.
    ``hypergrad="unrolled"`` differentiates the steps it ran whatever the status.

    Cost: Newton and SQP form the ``n x n`` Hessian (``n`` up to a few
    thousand); L-BFGS and the projected gradient method use gradients only and the implicit
    rule then uses Hessian-vector products (CG), which scales to ``10^6`` variables for box
    constraints. Under ``jax.vmap`` a ``while_loop`` runs until the slowest member of the batch
    has converged; ``hypergrad="unrolled"`` runs a ``scan`` of ``max_iter`` steps instead
    (steps after convergence leave the iterate unchanged).

    Args:
      g: ``g(y, theta) -> scalar``. May close over arrays (network parameters, data): they
        receive gradients too (closure conversion).
      y0: warm start, a pytree of float arrays. Receives no gradient.
      theta: the parameters, any pytree.
      eq: ``eq(theta) -> (A, b)``, ``A`` of shape ``(m, n)`` acting on the flattened ``y``
        (``jax.flatten_util.ravel_pytree`` order), ``b`` of shape ``(m,)``.
      ineq: ``ineq(theta) -> (G, h)``, ``G`` of shape ``(k, n)``, ``h`` of shape ``(k,)``
        (``G y <= h``; ``h_i = +inf`` drops a row), or ``ineq(theta) -> (C, l, u)`` for
        two-sided rows ``l <= C y <= u`` (the OSQP form; infinite ``l_i`` or ``u_i`` drop
        that side). Two-sided rows are solved as ``[C; -C] y <= [u; -l]``, and ``lam`` holds
        one *signed* multiplier per row of ``C``: positive where the upper bound is active,
        negative at the lower one. A row with ``l_i == u_i`` is a pair of opposite
        inequalities whose gradient splits between ``l_i`` and ``u_i``; pass equalities
        through ``eq`` to differentiate their right-hand side.
      box: ``box(theta) -> (lo, hi)``, each a scalar or a pytree like ``y0``; infinite bounds
        allowed. Alone, it is handled matrix-free; with ``eq`` or ``ineq`` it becomes rows of
        ``G``.
      solver: ``"newton"`` (dense, Armijo line search), ``"lbfgs"`` (optax), ``"gradient"``
        (accelerated projected gradient), ``"sqp"`` (sequential QP over the ``solve_qp``
        engine, dense; the only one for ``ineq``) or ``"auto"``: SQP with ``ineq``, projected
        gradient with ``box`` alone, else Newton when ``n <= 500`` and L-BFGS above
        (``"gradient"`` when unrolled).
      hypergrad: ``"implicit"`` (exact KKT on the active set); ``"penalty"`` (first-order,
        Hessian-free F2CBA oracle: one unconstrained solve per VJP, error ``O(alpha)``,
        ``O(alpha^2)`` for quadratic ``g``; ``eq``/``ineq``); ``"finite_difference"``
        (first-order, one extra solve of ``g + delta <ybar, y>``, error ``O(delta)``, exact for
        quadratic ``g``; unconstrained or ``eq`` only); ``"unrolled"`` (differentiate the
        very Newton or projected-gradient steps the forward solver takes, step sizes held
        constant; not with ``ineq``).
      linear_solver: the implicit rule's backward solve. ``"auto"`` reuses Newton's Cholesky
        factor, else factorises densely when ``n <= 200``, else CG (for ``n <= 1000`` at most
        ``n`` CG steps, then the dense factorisation where they did not converge);
        ``"cholesky"``, ``"cg"`` and ``"neumann"`` solve the reduced SPD system; ``"dense"``,
        ``"lu"``, ``"minres"``, ``"gmres"`` and ``"normal_cg"`` solve the full symmetric KKT
        system (singular when the active rows are dependent). An iterative backward solve
        that does not reach its tolerance (default 1e-12 relative residual in float64, 1e-6
        in float32, below the forward tolerance) makes the hypergradient NaN rather than
        silently inaccurate.
      tol: relative tolerance on the KKT residual (default 1e-10 in float64, 1e-5 in float32).
      max_iter: iteration limit (defaults: 100 Newton, 2000 L-BFGS, 10000 gradient, 50 SQP
        steps; unrolled: 20 Newton or 500 gradient steps).
      ridge: ``ridge >= 0`` added to the Hessian in the backward solve: the result is then the
        hypergradient of the lower level with ``g + ridge/2 ||y||^2`` linearised at ``y*``.
      delta: perturbation of the ``"finite_difference"`` rule.
      alpha: accuracy parameter of the ``"penalty"`` rule.
      throw: raise :class:`SolveError` if the status is a failure (neither ``SUCCESS`` nor
        ``RANK_DEFICIENT``); under ``jax.jit`` it arrives as the
        ``jax.errors.JaxRuntimeError`` that ``SolveError`` subclasses. Off by default so
        that batched sweeps and training loops report failures through the status and NaN
        cotangents rather than abort (see :class:`SolveError`). With ``throw`` a backward
        linear solve that does not converge also prints a message.

    Returns:
      A :class:`Solution` ``(y, nu, lam, info)``: ``nu`` is ``None`` without ``eq``, ``lam``
      is ``None`` without ``ineq`` (box multipliers are not returned).

    Raises:
      ValueError, TypeError: at trace time, for bad options or shapes (naming the argument),
        or concrete box bounds with ``lo > hi`` (or concrete two-sided rows with ``l > u``).
      SolveError: with ``throw=True``, on a failed status.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> def g(y, lam):  # ridge regression
      ...     X = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      ...     t = jnp.array([1.0, 2.0, 0.0])
      ...     return 0.5 * jnp.sum((X @ y - t) ** 2) + 0.5 * lam * y @ y
      >>> sol = bj.argmin(g, jnp.zeros(2), 1.0)
      >>> dy = jax.grad(lambda lam: bj.argmin(g, jnp.zeros(2), lam).y.sum())(1.0)
      >>> nonneg = bj.argmin(g, jnp.zeros(2), 1.0, box=lambda lam: (0.0, jnp.inf))

    References:
      Khanduri et al. Linearly Constrained Bilevel Optimization: A Smoothed Implicit Gradient
      Approach. ICML 2023 (the active-set rule). Kornowski, Padmanabhan, Wang, Zhang, Sra.
      First-Order Methods for Linearly Constrained Bilevel Optimization. NeurIPS 2024 (the
      penalty and finite-difference rules).
    """
    check_option("solver", solver, SOLVERS)
    check_option("hypergrad", hypergrad, HYPERGRADS)
    check_option("linear_solver", linear_solver, LINEAR_SOLVERS)
    for name, value in (("tol", tol), ("delta", delta), ("alpha", alpha)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}.")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")

    y0_flat, unravel = flatten_variables("y0", y0)
    n, dtype = y0_flat.shape[0], y0_flat.dtype
    check_scalar_output(g, (y0, theta), "g(y0, theta)", "g(y, theta)")
    box_only = box is not None and eq is None and ineq is None
    solver = _choose_solver(solver, hypergrad, n, eq, ineq, box, box_only)
    tol = default_tol(dtype) if tol is None else tol
    if max_iter is None:
        if hypergrad == "unrolled":
            max_iter = 20 if solver == "newton" else 500
        else:
            max_iter = {"newton": 100, "lbfgs": 2000, "gradient": 10000,
                        "sqp": 50}[solver]

    # Closure conversion: arrays the user functions close over become differentiable inputs.
    # jax.closure_convert caches the converted function per (function, argument types), so a
    # repeated call with the same functions and shapes hits the compilation cache of _solve.
    # As with jax.jit, functions must be pure: a global they read is captured when they are
    # first traced (JAX's trace cache), so pass changing data through theta or a closure.
    g_conv, g_consts = vma.closure_convert(g, y0, theta)
    converted, consts = {}, {}
    for name, fn in (("eq", eq), ("ineq", ineq), ("box", box)):
        if fn is not None:
            converted[name], consts[name] = vma.closure_convert(fn, theta)
    if eq is not None:
        _check_rows("eq", eq, theta, n, "A", "b")
    two_sided = ineq is not None and _check_rows("ineq", ineq, theta, n, "G", "h") == 3
    if two_sided:
        _check_two_sided_concrete(ineq, theta)
    if box is not None:
        _check_box_concrete(_box_bounds(box, theta, y0, unravel), box, theta)
    options = _Options(solver, hypergrad, linear_solver, float(tol), int(max_iter), float(ridge),
                       float(delta), float(alpha), bool(throw))
    fns = (g_conv, converted.get("eq"), converted.get("ineq"), converted.get("box"))
    y, nu, lam, info = _solve(fns, options, y0, theta,
                              (tuple(g_consts), {k: tuple(v) for k, v in consts.items()}))
    check_info(info, throw)
    if two_sided:  # [C; -C] y <= [u; -l]: one signed multiplier per row of C
        lam = kkt.signed_multipliers(lam)
    return Solution(unravel(y), nu if eq is not None else None,
                    lam if ineq is not None else None, info)


class _Options(NamedTuple):
    """The static options of one :func:`argmin` solve (hashable: the compilation-cache key)."""

    solver: str
    hypergrad: str
    linear_solver: str
    tol: float
    max_iter: int
    ridge: float
    delta: float
    alpha: float
    throw: bool


def _solve_traced(fns, options: _Options, y0, theta, consts):
    """Build the problem from the converted user functions and run the rule.

    Jitted once per functions, options, shapes and dtypes: eager calls reuse the compilation.
    """
    g_conv, eq_conv, ineq_conv, box_conv = fns
    solver, hypergrad, linear_solver, tol, max_iter, ridge, delta, alpha, throw = options
    y0_flat, unravel = ravel_pytree(y0)
    n, dtype = y0_flat.shape[0], y0_flat.dtype
    box_only = box_conv is not None and eq_conv is None and ineq_conv is None
    converted = {"eq": eq_conv, "ineq": ineq_conv, "box": box_conv}
    params = (theta, consts[0], consts[1])
    # Inside shard_map: one uniformly per-device problem (see vma.py); the identity elsewhere.
    params = vma.vary_like(params, params, y0_flat)
    y0_flat = vma.vary_like(y0_flat, params)

    def call(name):
        def fn(p):
            out = tuple(jnp.asarray(a, dtype) for a in converted[name](p[0], *p[2][name]))
            if len(out) == 3:  # two-sided rows l <= C y <= u
                C, lo, hi = out
                lo, hi = (jnp.broadcast_to(v, C.shape[:1]) for v in (lo, hi))
                return kkt.stack_two_sided(C, lo, hi)
            return out
        return fn

    m_eq = 0 if eq_conv is None else jax.eval_shape(call("eq"), params)[0].shape[0]
    k_in = 0 if ineq_conv is None else jax.eval_shape(call("ineq"), params)[0].shape[0]
    equalities = call("eq") if eq_conv is not None else None
    inequalities = call("ineq") if ineq_conv is not None else None
    box_fn = bounds_fn = None
    if box_conv is not None:
        bounds = _box_bounds(lambda th: box_conv(th, *params[2]["box"]), theta, y0, unravel)

        def box_fn(p):
            return bounds(converted["box"](p[0], *p[2]["box"]))

        bounds_fn = box_fn
        if not box_only:  # box rows join G y <= h for SQP
            inequalities = _append_box(inequalities, box_fn, n, dtype)
            k_in += 2 * n
            box_fn = None
    problem = _Problem(lambda yf, p: g_conv(unravel(yf), p[0], *p[1]), equalities,
                       inequalities, box_fn, bounds_fn)

    def fun_at(p):
        return lambda yf: problem.objective(yf, p)

    def forward(z0, p, tol_=tol):
        y_start, _, lam = z0
        affine = problem.affine(p)
        ineq_p = problem.inequalities(p)
        fact, verdict = None, jnp.asarray(Status.SUCCESS, jnp.int32)
        if problem.box is not None:
            lo, hi = problem.box(p)
            y, k, res, conv, _, verdict = _gradient(
                fun_at(p), jnp.clip(y_start, lo, hi), lambda z: jnp.clip(z, lo, hi), tol_, max_iter
            )
        elif ineq_p is not None:
            A, b = (jnp.zeros((0, n), dtype), jnp.zeros((0,), dtype)) if affine is None else (
                affine.A, affine.b)
            out = sqp(fun_at(p), y_start, A, b, *problem.inequalities_fn(p), tol_, max_iter)
            y, nu, lam, k, res, verdict, fact = out
            conv = (res <= tol_) & (verdict == Status.SUCCESS)
        else:
            y, k, res, conv, fact, verdict = _FORWARD[solver](
                fun_at(p), _project(affine, y_start), affine, tol_, max_iter
            )
        if ineq_p is None:
            nu = jnp.zeros((m_eq,), dtype) if affine is None else affine.multipliers(
                jax.grad(problem.objective)(y, p))
        info = _make_info(problem, y, lam, (k, res, conv, verdict), y_start, p, dtype)
        # NONFINITE data or iterates: NaN outputs (the policy of types.Status).
        y, nu, lam = _nan_if_nonfinite(info, (y, nu, lam))
        return (y, nu, lam), SolveAux(info, fact)

    z0 = (jax.lax.stop_gradient(y0_flat), jnp.zeros((m_eq,), dtype), jnp.zeros((k_in,), dtype))
    if hypergrad == "implicit":
        z, aux = implicit_solution(
            forward, problem.residual, _adjoint_solve(problem, linear_solver, ridge, throw), z0,
            params,
        )
        y, nu, lam = z
        info = aux.info
    elif hypergrad == "unrolled":
        affine = problem.affine(params)
        y_start = _project(affine, z0[0])
        project = None
        if problem.box is not None:
            lo, hi = problem.box(params)
            project = lambda z: jnp.clip(z, lo, hi)  # noqa: E731
            y_start = project(y_start)
        y, k, res, conv = _unrolled(fun_at(params), y_start, affine, tol, max_iter, solver,
                                    project)
        nu, lam = problem.multipliers(y, z0[2], params)
        # The unrolled rule differentiates the steps it ran, whatever the status.
        info = _make_info(problem, y, lam, (k, res, conv, Status.SUCCESS), z0[0], params, dtype)
    else:
        inner_tol = max(tol * min(delta if hypergrad == "finite_difference" else alpha, 1.0),
                        100 * float(jnp.finfo(dtype).eps))

        def solve(y_start, p):
            # (zeros made here: a custom_vjp rule must not close over tracers of this trace)
            zeros = (jnp.zeros((m_eq,), dtype), jnp.zeros((k_in,), dtype))
            (y, _, lam), aux = forward((y_start, *zeros), p)
            return y, SolveAux(aux.info, lam)

        backward = (_finite_difference_backward(problem, solver, delta, inner_tol, max_iter)
                    if hypergrad == "finite_difference"
                    else _penalty_backward(problem, alpha, inner_tol, max(max_iter, 100)))
        y, aux = custom_solution(solve, backward, z0[0], params)
        info = aux.info
        nu, lam = problem.multipliers(y, jax.lax.stop_gradient(aux.extra), params)

    return y, nu, lam[: k_in - (2 * n if box_conv is not None and not box_only else 0)], info




_solve = vma.jit_when_eager(_solve_traced, static_argnums=(0, 1))


def _choose_solver(solver, hypergrad, n, eq, ineq, box, box_only):
    if ineq is not None or (box is not None and not box_only):
        if solver not in ("auto", "sqp"):
            raise ValueError(
                f"solver={solver!r} does not handle inequality constraints; use "
                "solver='sqp' (or 'auto')."
            )
        if hypergrad in ("unrolled", "finite_difference"):
            raise ValueError(
                f"hypergrad={hypergrad!r} is not available with inequality constraints; use "
                "'implicit' or 'penalty'."
            )
        return "sqp"
    if solver == "sqp":
        raise ValueError("solver='sqp' needs inequality constraints (ineq=...).")
    if box_only:
        if solver not in ("auto", "gradient"):
            raise ValueError(
                f"solver={solver!r} does not handle box constraints; use solver='gradient'."
            )
        if hypergrad in ("penalty", "finite_difference"):
            raise ValueError(
                f"hypergrad={hypergrad!r} is not available with box constraints alone; use "
                "'implicit' or 'unrolled', or pass the bounds as ineq rows."
            )
        return "gradient"
    if hypergrad == "unrolled" and solver == "lbfgs":
        raise ValueError(
            "solver='lbfgs' cannot be unrolled (its line search is a while_loop); use "
            "solver='newton' or 'gradient' with hypergrad='unrolled'."
        )
    if solver == "auto":
        solver = "newton" if n <= NEWTON_MAX_SIZE else "lbfgs"
        if hypergrad == "unrolled" and solver == "lbfgs":
            solver = "gradient"
    return solver


def _append_box(inequalities, box_fn, n, dtype):
    eye = jnp.eye(n, dtype=dtype)

    def fn(p):
        lo, hi = box_fn(p)
        G, h = [eye, -eye], [hi, -lo]
        if inequalities is not None:
            G0, h0 = inequalities(p)
            G, h = [G0, *G], [h0, *h]
        return jnp.concatenate(G), jnp.concatenate(h)

    return fn


def _nan_if_nonfinite(info, tree):
    """NaN in every leaf of ``tree`` when ``info.status`` is ``NONFINITE`` or ``INFEASIBLE``."""
    bad = (info.status == Status.NONFINITE) | (info.status == Status.INFEASIBLE)
    return jax.tree_util.tree_map(lambda a: jnp.where(bad, jnp.nan, a).astype(a.dtype), tree)


def _make_info(problem, y, lam, stats, y_start, params, dtype):
    """The status of a solve, computed inside the forward pass (it gates the cotangents).

    Precedence: an empty box (``INFEASIBLE``) > ``NONFINITE`` (NaN in the data, or a
    non-finite iterate) > ``UNBOUNDED`` > the solver's curvature verdict (``NONCONVEX``,
    ``SINGULAR``) > ``INFEASIBLE`` (equalities, inequalities) > ``RANK_DEFICIENT`` /
    ``SUCCESS`` / ``MAX_STEPS``.
    """
    k, res, conv, verdict = stats
    eps = jnp.finfo(dtype).eps
    leaves = [a for a in jax.tree_util.tree_leaves(params) if is_inexact(a)]
    nan_data = jnp.any(jnp.stack([jnp.any(jnp.isnan(a)) for a in leaves] or [jnp.asarray(False)]))
    finite = tree_all_finite((y, lam, res, y_start)) & ~nan_data
    status = jnp.where(conv, Status.SUCCESS, Status.MAX_STEPS)
    affine = problem.affine(params)
    if affine is not None:
        A, b = affine.A, affine.b
        feas = jnp.linalg.norm(A @ y - b)
        scale = 1 + jnp.linalg.norm(b) + jnp.linalg.norm(A) * jnp.linalg.norm(y)
        infeasible = feas > jnp.sqrt(eps) * scale
        rank = jnp.sum(jnp.linalg.svd(A, compute_uv=False) > _rank_tol(A))
        deficient = rank < A.shape[0]
        status = jnp.where(conv & deficient, Status.RANK_DEFICIENT, status)
        status = jnp.where(infeasible, Status.INFEASIBLE, status)
        res = jnp.sqrt(res**2 + feas**2)
        conv = conv & ~infeasible
        finite = finite & tree_all_finite(affine)
    ineq = problem.inequalities(params)
    if ineq is not None:
        # Primal infeasibility left after the solve (an empty polyhedron).
        violation = jnp.max(jnp.maximum(-ineq.slack(y), 0), initial=0.0)
        infeasible = violation > jnp.sqrt(eps) * (1 + jnp.max(jnp.abs(ineq.h), initial=0.0))
        status = jnp.where(infeasible & ~conv, Status.INFEASIBLE, status)
    # The curvature verdict overrides convergence: no hypergradient without it.
    status = jnp.where(verdict != Status.SUCCESS, verdict, status)
    # Unbounded below: g fell below -1e30 times its scale at the start.
    value, value0 = problem.objective(y, params), problem.objective(y_start, params)
    unbounded = (value < -1e30 * (1 + jnp.abs(value0))) & jnp.isfinite(value0)
    status = jnp.where(unbounded, Status.UNBOUNDED, status)
    # g itself must be finite at the answer: a stationary point of grad g outside the domain
    # of g (a log barrier's gradient extends past the barrier) is no minimiser.
    finite = finite & (jnp.isfinite(value) | unbounded)
    status = jnp.where(finite, status, Status.NONFINITE)
    if problem.bounds is not None:
        # An empty box (finite data): say why, whatever the solver reported.
        lo, hi = problem.bounds(params)
        status = jnp.where(jnp.any(lo > hi) & ~nan_data, Status.INFEASIBLE, status)
    ok = (status == Status.SUCCESS) | (status == Status.RANK_DEFICIENT)
    return make_info(k, res, ok, status)


def _rank_tol(A):
    s_max = jnp.linalg.norm(A, 2) if A.size else 0.0
    return max(A.shape) * jnp.finfo(A.dtype).eps * s_max * 10


# --------------------------------------------------------------------------------------------
# Trace-time validation.


def _check_rows(arg, fn, theta, n, mat, vec):
    """Check ``fn(theta) -> (M, v)``, ``M`` of shape ``(rows, n)``; return the tuple's length.

    For ``ineq`` a triple ``(C, l, u)`` (two-sided rows) is accepted too, and 3 returned.
    """
    try:
        out = jax.eval_shape(fn, theta)
    except Exception as err:
        raise TypeError(f"{arg}(theta) could not be evaluated: {err}") from err
    triple = arg == "ineq" and isinstance(out, (tuple, list)) and len(out) == 3
    if not (isinstance(out, (tuple, list)) and (len(out) == 2 or triple)):
        what = f"a pair ({mat}, {vec})" + (" or a triple (C, l, u)" if arg == "ineq" else "")
        raise TypeError(f"{arg}(theta) must return {what}.")
    if triple:
        M, mat = out[0], "C"
        for vec, v in zip(("l", "u"), out[1:], strict=True):
            if tuple(v.shape) not in ((), (M.shape[0],) if len(M.shape) == 2 else ()):
                raise ValueError(
                    f"ineq(theta) returned {vec} with shape {tuple(v.shape)} but C has shape "
                    f"{tuple(M.shape)}; {vec} must be a scalar or have shape (rows,)."
                )
        out = (M, jnp.zeros(M.shape[:1]))
    M, v = out
    if len(M.shape) != 2 or M.shape[1] != n:
        raise ValueError(
            f"{arg}(theta) returned {mat} with shape {tuple(M.shape)} but y has {n} entries; "
            f"{mat} must have shape (rows, {n})."
        )
    if tuple(v.shape) != (M.shape[0],):
        raise ValueError(
            f"{arg}(theta) returned {vec} with shape {tuple(v.shape)} but {mat} has "
            f"{M.shape[0]} rows; {vec} must have shape ({M.shape[0]},)."
        )
    if M.shape[0] == 0:
        raise ValueError(f"{arg}(theta) returned {mat} with no rows; pass {arg}=None instead.")
    return 3 if triple else 2


def _check_two_sided_concrete(ineq, theta):
    """``ValueError`` if ``ineq(theta) -> (C, l, u)`` has concrete ``l > u`` somewhere."""
    with jax.ensure_compile_time_eval():
        _, lo, hi = ineq(theta)
        raise_if_crossed(lo, hi, "ineq(theta) returned l > u", "the set l <= C y <= u is empty.")


def _check_box_concrete(bounds, box, theta):
    """``ValueError`` if ``box(theta)`` has concrete bounds with some ``lo > hi``."""
    with jax.ensure_compile_time_eval():
        raise_if_crossed(*bounds(box(theta)), "box(theta) returned lo > hi",
                         "the box is empty.", index="flattened index")


def _box_bounds(box, theta, y0, unravel):
    """Validate ``box(theta) -> (lo, hi)`` and return a function flattening the bounds."""
    try:
        out = jax.eval_shape(box, theta)
    except Exception as err:
        raise TypeError(f"box(theta) could not be evaluated: {err}") from err
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("box(theta) must return a pair (lo, hi).")
    y_struct = jax.tree_util.tree_structure(y0)
    y_flat = ravel_pytree(y0)[0]

    def is_scalar(bound):
        return hasattr(bound, "shape") and bound.shape == () or isinstance(bound, (int, float))

    for bound, name in zip(out, ("lo", "hi"), strict=True):
        if is_scalar(bound):
            continue
        if jax.tree_util.tree_structure(bound) != y_struct:
            raise ValueError(
                f"box(theta) returned {name} with shape {getattr(bound, 'shape', bound)}: it "
                "must be a scalar or a pytree like y0."
            )
        for b, y in zip(jax.tree_util.tree_leaves(bound), jax.tree_util.tree_leaves(y0),
                        strict=True):
            pairs = zip(jnp.shape(b)[::-1], jnp.shape(y)[::-1], strict=False)
            if jnp.ndim(b) > jnp.ndim(y) or any(d not in (1, e) for d, e in pairs):
                raise ValueError(
                    f"box(theta) returned {name} with shape {jnp.shape(b)} for a leaf of y0 of "
                    f"shape {jnp.shape(y)}."
                )

    def flat(bound):
        if is_scalar(bound):
            return jnp.full(y_flat.shape, bound, y_flat.dtype)
        leaves = jax.tree_util.tree_map(
            lambda b, y: jnp.broadcast_to(jnp.asarray(b, y_flat.dtype), jnp.shape(y)), bound, y0
        )
        return ravel_pytree(leaves)[0]

    return lambda bounds: (flat(bounds[0]), flat(bounds[1]))
