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
* ``"finite_difference"``: first-order, Hessian-free (ALGORITHMS.md §1.6, Kornowski et al.).
* ``"unrolled"``: reverse-mode through a fixed number of solver steps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src.implicit import custom_solution, implicit_solution
from bilevel_jax._src.tree import is_inexact, tree_all_finite, tree_scale
from bilevel_jax._src.types import Array, PyTree, Solution, Status, check_info, make_info

SOLVERS = ("auto", "newton", "lbfgs", "gradient")
HYPERGRADS = ("implicit", "finite_difference", "unrolled")
LINEAR_SOLVERS = (
    "auto", "cholesky", "cg", "neumann", "dense", "lu", "minres", "gmres", "normal_cg"
)
#: Largest flattened ``y`` for which ``solver="auto"`` uses dense Newton.
NEWTON_MAX_SIZE = 500
_REDUCED_METHODS = ("auto", "cholesky", "cg", "neumann")


def default_tol(dtype) -> float:
    """Default relative tolerance on the KKT residual: 1e-10 in float64, 1e-5 in float32."""
    return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5


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
    """The lower level on flat ``y``: objective and constraints as functions of ``params``."""

    objective: Callable  # (y_flat, params) -> scalar
    constraints: Callable | None  # params -> (A, b)

    def affine(self, params) -> AffineSet | None:
        if self.constraints is None:
            return None
        A, b = self.constraints(params)
        return AffineSet(A, b, jnp.linalg.pinv(A))

    def residual(self, z, params):
        """KKT residual ``[grad g + A^T nu; A y - b]`` for ``z = (y, nu)``."""
        y, nu = z
        grad = jax.grad(self.objective)(y, params)
        if self.constraints is None:
            return grad, nu
        A, b = self.constraints(params)
        return grad + A.T @ nu, A @ y - b

    def lagrangian(self, y, nu, params):
        """``g(y) + nu^T (A y - b)``."""
        value = self.objective(y, params)
        if self.constraints is None:
            return value
        A, b = self.constraints(params)
        return value + nu @ (A @ y - b)


# --------------------------------------------------------------------------------------------
# Forward solvers. Each takes a function of flat y, a feasible start, the affine set, a
# relative tolerance and an iteration limit, and returns (y, num_steps, residual_norm,
# converged, factorisation or None). The residual is ||P grad g(y)||.


def _newton(fun, y0, affine, tol, max_iter):
    """Damped Newton with Armijo backtracking, on the affine set via the projector ``P``."""
    n = y0.shape[0]
    eye = jnp.eye(n, dtype=y0.dtype)
    P = None if affine is None else eye - affine.pinv @ affine.A

    def model(y):
        grad = jax.grad(fun)(y)
        hess = jax.hessian(fun)(y)
        if P is None:
            return grad, ls.factorize(hess, structure="spd")
        return P @ grad, ls.factorize(P @ hess @ P + (eye - P), structure="spd")

    def line_search(y, value, grad, direction):
        # Armijo on g, or (once the decrease is below rounding in g) on the residual norm.
        slope, gnorm = grad @ direction, jnp.linalg.norm(grad)

        def accept(t):
            trial = y + t * direction
            pgrad = _tangent(affine, jax.grad(fun)(trial))
            armijo = fun(trial) <= value + 1e-4 * t * slope
            return armijo | (jnp.linalg.norm(pgrad) <= (1 - 1e-4 * t) * gnorm)

        def cond(t):
            return ~accept(t) & (t > 1e-12)

        t = jax.lax.while_loop(cond, lambda t: t / 2, jnp.ones_like(value))
        return t, accept(t)

    grad0, fact0 = model(y0)
    threshold = tol * (1 + jnp.linalg.norm(grad0))

    def cond(state):
        k, _, grad, _, ok = state
        return (k < max_iter) & (jnp.linalg.norm(grad) > threshold) & ok

    def body(state):
        k, y, grad, fact, _ = state
        direction = -ls.solve_factorized(fact, grad)
        t, ok = line_search(y, fun(y), grad, direction)
        ok = ok & jnp.all(jnp.isfinite(direction))
        y_new = jnp.where(ok, y + t * direction, y)
        grad_new, fact_new = model(y_new)
        return k + 1, y_new, grad_new, fact_new, ok

    state = (jnp.asarray(0), y0, grad0, fact0, jnp.asarray(True))
    k, y, grad, fact, _ = jax.lax.while_loop(cond, body, state)
    res = jnp.linalg.norm(grad)
    return y, k, res, res <= threshold, fact


def _lbfgs(fun, y0, affine, tol, max_iter):
    """L-BFGS (optax, zoom line search) in the null space: ``y = y0 + P z``."""

    def reduced(z):
        # optax's line search may promote z to float64 when x64 is on: keep y0's dtype.
        return fun(y0 + _tangent(affine, z.astype(y0.dtype)))

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(reduced)
    z0 = jnp.zeros_like(y0)
    threshold = tol * (1 + jnp.linalg.norm(jax.grad(reduced)(z0)))

    def cond(state):
        k, _, _, res = state
        return (k < max_iter) & (res > threshold)

    def body(state):
        k, z, opt_state, _ = state
        value, grad = value_and_grad(z, state=opt_state)
        updates, opt_state = opt.update(
            grad, opt_state, z, value=value, grad=grad, value_fn=reduced
        )
        z = optax.apply_updates(z, updates).astype(y0.dtype)
        return k + 1, z, opt_state, jnp.linalg.norm(jax.grad(reduced)(z))

    state = (jnp.asarray(0), z0, opt.init(z0), jnp.asarray(jnp.inf, y0.dtype))
    k, z, _, res = jax.lax.while_loop(cond, body, state)
    return y0 + _tangent(affine, z), k, res, res <= threshold, None


def _gradient(fun, y0, affine, tol, max_iter):
    """Accelerated projected gradient (FISTA) with adaptive step and gradient restart.

    The step ``1/L`` adapts to the local curvature ``||grad(y+) - grad(x)|| / ||y+ - x||``
    (no function values, so rounding near the solution cannot stall it); momentum restarts
    when the gradient mapping points against it (O'Donoghue and Candes, 2015).
    """

    def pgrad(y):
        return _tangent(affine, jax.grad(fun)(y))

    tiny = jnp.finfo(y0.dtype).tiny
    threshold = tol * (1 + jnp.linalg.norm(pgrad(y0)))

    def step(x, lip):
        grad = pgrad(x)

        def curvature(y_new):
            d = y_new - x
            return jnp.linalg.norm(pgrad(y_new) - grad) / jnp.maximum(jnp.linalg.norm(d), tiny)

        def cond(state):
            lip_, y_new = state
            return (curvature(y_new) > lip_) & (lip_ < 1e30)

        def body(state):
            lip_, y_new = state
            lip_ = 2 * jnp.maximum(lip_, curvature(y_new))
            return lip_, x - grad / lip_

        return jax.lax.while_loop(cond, body, (lip, x - grad / lip))

    def cond(state):
        k, _, _, _, _, res = state
        return (k < max_iter) & (res > threshold)

    def body(state):
        k, y, x, t, lip, _ = state
        lip, y_new = step(x, lip)
        t_new = (1 + jnp.sqrt(1 + 4 * t**2)) / 2
        restart = (x - y_new) @ (y_new - y) > 0
        x_new = jnp.where(restart, y_new, y_new + ((t - 1) / t_new) * (y_new - y))
        t_new = jnp.where(restart, jnp.ones_like(t), t_new)
        return k + 1, y_new, x_new, t_new, 0.9 * lip, jnp.linalg.norm(pgrad(y_new))

    one = jnp.ones((), y0.dtype)
    state = (jnp.asarray(0), y0, y0, one, one, jnp.linalg.norm(pgrad(y0)))
    k, y, _, _, _, res = jax.lax.while_loop(cond, body, state)
    return y, k, res, res <= threshold, None


_FORWARD = {"newton": _newton, "lbfgs": _lbfgs, "gradient": _gradient}


# --------------------------------------------------------------------------------------------
# Unrolled solvers: a fixed-length scan of differentiable steps.


def _unrolled(fun, y0, affine, tol, max_iter, solver):
    """Run exactly ``max_iter`` differentiable steps (Newton or projected gradient)."""
    n = y0.shape[0]
    if solver == "newton":
        ts = 0.5 ** jnp.arange(30, dtype=y0.dtype)

        def step(y, _):
            grad = _tangent(affine, jax.grad(fun)(y))
            hvp = lambda w: jax.jvp(jax.grad(fun), (y,), (w,))[1]  # noqa: E731
            hess = jax.vmap(hvp)(jnp.eye(n, dtype=y.dtype)).T
            if affine is not None:
                P = jnp.eye(n, dtype=y.dtype) - affine.pinv @ affine.A
                hess = P @ hess @ P + (jnp.eye(n, dtype=y.dtype) - P)
            direction = -jnp.linalg.solve(hess, grad)
            def accept(t):
                trial = y + t * direction
                armijo = fun(trial) <= fun(y) + 1e-4 * t * (grad @ direction)
                pgrad = _tangent(affine, jax.grad(fun)(trial))
                return armijo | (pgrad @ pgrad <= (1 - 1e-4 * t) ** 2 * (grad @ grad))

            ok = jax.vmap(accept)(ts)
            t = jnp.where(jnp.any(ok), ts[jnp.argmax(ok)], 0.0)
            return y + t * direction, None

    else:
        lip = jax.lax.stop_gradient(_lipschitz_estimate(fun, y0, affine))

        def step(carry, _):
            y, y_prev, k = carry
            x = y + (k - 1) / (k + 2) * (y - y_prev)
            return (x - _tangent(affine, jax.grad(fun)(x)) / lip, y, k + 1), None

    init = y0 if solver == "newton" else (y0, y0, jnp.ones((), y0.dtype))
    out, _ = jax.lax.scan(step, init, None, length=max_iter)
    y = out if solver == "newton" else out[0]
    res = jnp.linalg.norm(_tangent(affine, jax.grad(fun)(y)))
    threshold = tol * (1 + jnp.linalg.norm(_tangent(affine, jax.grad(fun)(y0))))
    return y, max_iter, res, res <= threshold


def _lipschitz_estimate(fun, y, affine, num_iter=50):
    """Largest eigenvalue of ``P H P`` at ``y`` by power iteration (times a safety factor)."""
    grad = jax.grad(fun)

    def hvp(w):
        return _tangent(affine, jax.jvp(grad, (y,), (_tangent(affine, w),))[1])

    v = _tangent(affine, jnp.ones_like(y) + jnp.arange(y.shape[0], dtype=y.dtype) / y.shape[0])
    v = v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(y.dtype).tiny)

    def body(_, v):
        w = hvp(v)
        return w / jnp.maximum(jnp.linalg.norm(w), jnp.finfo(y.dtype).tiny)

    v = jax.lax.fori_loop(0, num_iter, body, v)
    return 1.5 * jnp.maximum(v @ hvp(v), jnp.finfo(y.dtype).tiny)


# --------------------------------------------------------------------------------------------
# The implicit rule's adjoint solve.


def _adjoint_solve(method: str, ridge: float, tol: float | None, max_iter: int | None):
    """Build ``adjoint_solve(vjp_z, zbar, z, params, aux)`` for the KKT residual."""

    def adjoint_solve(vjp_z, zbar, z, params, aux):
        _, affine, fact = aux
        v, nubar = zbar
        y = z[0]
        zeros_nu = jnp.zeros_like(z[1])

        def hvp(w):
            return vjp_z((w, zeros_nu))[0] + ridge * w

        if method not in _REDUCED_METHODS:
            # The full symmetric KKT system [H + ridge I, A^T; A, 0].
            flat, unflat = ravel_pytree((v, nubar))

            def kkt(u):
                w, mu = unflat(u)
                Kw, Kmu = vjp_z((w, mu))
                return ravel_pytree((Kw + ridge * w, Kmu))[0]

            u = ls.linear_solve(kkt, flat, method=method, structure="symmetric", tol=tol,
                                max_iter=max_iter)
            return unflat(u)

        w_r = jnp.zeros_like(v) if affine is None else affine.pinv @ nubar
        rhs = _tangent(affine, v - hvp(w_r)) if affine is not None else v

        def reduced(w):
            if affine is None:
                return hvp(w)
            pw = affine.tangent(w)
            return affine.tangent(hvp(pw)) + (w - pw)

        if method == "auto" and fact is not None and ridge == 0.0:
            w_n = ls.solve_factorized(fact, rhs)
        elif method == "neumann":
            step = 1.0 / _lipschitz_estimate(lambda w: 0.5 * w @ reduced(w), y, None)
            w_n = ls.solve_neumann(reduced, rhs, step=step, num_terms=max_iter or 1000)
        else:
            w_n = ls.linear_solve(
                reduced, rhs, method=method, structure="spd", tol=tol, max_iter=max_iter
            )
        w = w_r + w_n
        mu = zeros_nu if affine is None else -affine.multipliers(v - hvp(w))
        return w, mu

    return adjoint_solve


# --------------------------------------------------------------------------------------------
# The public entry point.


def argmin(
    g: Callable,
    y0: PyTree,
    theta: PyTree,
    *,
    eq: Callable | None = None,
    solver: str = "auto",
    hypergrad: str = "implicit",
    linear_solver: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    ridge: float = 0.0,
    delta: float = 1e-4,
    throw: bool = False,
) -> Solution:
    r"""Minimise a smooth strongly convex ``g(y, theta)`` over ``y``, optionally on ``A y = b``.

    Solves the lower level

    .. math:: y^*(\theta) = \arg\min_y g(y, \theta) \quad \text{s.t.} \quad A(\theta) y = b(\theta)

    and makes ``y*`` (and the multipliers ``nu*``) differentiable in reverse mode with respect
    to ``theta`` and to every array that ``g`` or ``eq`` close over. The KKT conditions are
    ``grad_y g + A^T nu = 0`` and ``A y = b``; the implicit rule solves the transposed KKT system
    ``[H A^T; A 0] [w; mu] = [ybar; nubar]`` (``H`` the Hessian of ``g`` in ``y``) and returns
    ``thetabar = -d/dtheta (w^T (grad_y g + A^T nu) + mu^T (A y - b))``.

    Assumptions: ``g`` is twice differentiable and strongly convex in ``y`` (on ``null(A)``);
    the constraints are consistent. Linearly dependent rows of ``A`` are allowed: the solution
    is still unique, ``info.status`` says ``RANK_DEFICIENT`` and ``nu`` is the minimum-norm
    multiplier (the ``"finite_difference"`` and ``"unrolled"`` rules then need full row rank
    to differentiate ``nu``). An inconsistent ``A y = b`` gives ``INFEASIBLE``; an iteration
    limit gives ``MAX_STEPS`` with the residual reached; an ``inf``/``nan`` input or iterate
    gives ``NONFINITE``.

    Cost: Newton forms the ``n x n`` Hessian (use it for ``n`` up to a few thousand); L-BFGS
    and the gradient method use gradients only and the implicit rule then uses Hessian-vector
    products (CG). Under ``jax.vmap`` a ``while_loop`` runs until the slowest member of the
    batch has converged; ``hypergrad="unrolled"`` runs exactly ``max_iter`` steps.

    Args:
      g: ``g(y, theta) -> scalar``. May close over arrays (network parameters, data): they
        receive gradients too (closure conversion).
      y0: warm start, a pytree of float arrays. Receives no gradient.
      theta: the parameters, any pytree.
      eq: optional ``eq(theta) -> (A, b)`` with ``A`` of shape ``(m, n)`` acting on the
        flattened ``y`` (``jax.flatten_util.ravel_pytree`` order) and ``b`` of shape ``(m,)``.
      solver: ``"newton"`` (dense, with Armijo line search), ``"lbfgs"`` (optax),
        ``"gradient"`` (accelerated projected gradient) or ``"auto"`` (Newton when
        ``n <= NEWTON_MAX_SIZE`` (500), else L-BFGS; for ``"unrolled"``, else ``"gradient"``).
      hypergrad: ``"implicit"`` (exact KKT), ``"finite_difference"`` (first-order and
        Hessian-free: one extra solve of ``g + delta <ybar, y>``, error ``O(delta)``, exact for
        quadratic ``g``) or ``"unrolled"`` (differentiate ``max_iter`` solver steps).
      linear_solver: the backward solve of the implicit rule. ``"auto"`` reuses Newton's
        Cholesky factorisation, else factorises densely when ``n <= 1000``, else CG;
        ``"cholesky"``, ``"cg"`` and ``"neumann"`` solve the null-space reduced SPD system;
        ``"dense"``, ``"lu"``, ``"minres"``, ``"gmres"`` and ``"normal_cg"`` solve the full
        symmetric KKT system (which is singular if ``A`` is rank-deficient).
      tol: relative tolerance on the KKT residual (default 1e-10 in float64, 1e-5 in float32).
      max_iter: iteration limit (default 100 Newton, 2000 L-BFGS, 10000 gradient steps;
        unrolled: 20 Newton or 500 gradient steps).
      ridge: ``ridge >= 0`` added to the Hessian in the backward solve; the result is then the
        hypergradient of the lower level with ``g + ridge/2 ||y||^2`` linearised at ``y*``.
      delta: perturbation size of the ``"finite_difference"`` rule.
      throw: raise :class:`SolveError` if the status is not ``SUCCESS``.

    Returns:
      A :class:`Solution` ``(y, nu, lam, info)``; ``nu`` is ``None`` without ``eq`` and
      ``lam`` is ``None`` (no inequality constraints).

    Raises:
      ValueError, TypeError: at trace time, for bad options or shapes (naming the argument).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> def g(y, lam):  # ridge regression
      ...     X = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      ...     t = jnp.array([1.0, 2.0, 0.0])
      ...     return 0.5 * jnp.sum((X @ y - t) ** 2) + 0.5 * lam * y @ y
      >>> sol = bj.argmin(g, jnp.zeros(2), 1.0)
      >>> dy = jax.grad(lambda lam: bj.argmin(g, jnp.zeros(2), lam).y.sum())(1.0)

    References:
      Kornowski, Padmanabhan, Wang, Zhang, Sra. First-Order Methods for Linearly Constrained
      Bilevel Optimization. NeurIPS 2024 (the finite-difference rule).
    """
    _check_option("solver", solver, SOLVERS)
    _check_option("hypergrad", hypergrad, HYPERGRADS)
    _check_option("linear_solver", linear_solver, LINEAR_SOLVERS)
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    if max_iter is not None and (not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}.")

    y0_flat, unravel = _flatten_y0(y0)
    n, dtype = y0_flat.shape[0], y0_flat.dtype
    _check_objective(g, y0, theta)
    if solver == "auto":
        solver = "newton" if n <= NEWTON_MAX_SIZE else "lbfgs"
        if hypergrad == "unrolled" and solver == "lbfgs":
            solver = "gradient"
    if hypergrad == "unrolled" and solver == "lbfgs":
        raise ValueError(
            "solver='lbfgs' cannot be unrolled (its line search is a while_loop); use "
            "solver='newton' or 'gradient' with hypergrad='unrolled'."
        )
    tol = default_tol(dtype) if tol is None else tol
    if max_iter is None:
        if hypergrad == "unrolled":
            max_iter = 20 if solver == "newton" else 500
        else:
            max_iter = {"newton": 100, "lbfgs": 2000, "gradient": 10000}[solver]

    g_conv, g_consts = jax.closure_convert(g, y0, theta)
    constraints = None
    eq_consts = ()
    if eq is not None:
        A, b = _check_eq(eq, theta, n)
        eq_conv, eq_consts = jax.closure_convert(eq, theta)
        constraints = lambda p: tuple(jnp.asarray(a, dtype) for a in eq_conv(p[0], *p[2]))  # noqa: E731
    problem = _Problem(lambda yf, p: g_conv(unravel(yf), p[0], *p[1]), constraints)
    params = (theta, tuple(g_consts), tuple(eq_consts))

    def fun_at(p):
        return lambda yf: problem.objective(yf, p)

    def forward(y_start, p, tol_=tol):
        affine = problem.affine(p)
        y_start = _project(affine, y_start)
        y, k, res, conv, fact = _FORWARD[solver](fun_at(p), y_start, affine, tol_, max_iter)
        return y, affine, (k, res, conv), fact

    if hypergrad == "implicit":

        def solve(z0, p):
            y, affine, stats, fact = forward(z0[0], p)
            nu = _multipliers(problem, affine, y, p)
            return (y, nu), (stats, affine, fact)

        nu0 = jnp.zeros((0,) if eq is None else (A.shape[0],), dtype)
        (y, nu), (stats, affine, _) = implicit_solution(
            solve, problem.residual, _adjoint_solve(linear_solver, ridge, None, None),
            (jax.lax.stop_gradient(y0_flat), nu0), params,
        )
    elif hypergrad == "finite_difference":
        # The 1/delta factor amplifies the inner error: solve the perturbed problem tighter.
        fd_tol = max(tol * min(delta, 1.0), 100 * float(jnp.finfo(dtype).eps))

        def solve(y_start, p):
            y, affine, stats, _ = forward(y_start, p)
            return y, (stats, affine)

        def backward(ybar, y, p, aux):
            scale = jnp.linalg.norm(ybar)
            direction = ybar / jnp.where(scale > 0, scale, 1)
            affine = aux[1]
            nu = _multipliers(problem, affine, y, p)
            perturbed = lambda yf: problem.objective(yf, p) + delta * direction @ yf  # noqa: E731
            y_d = _FORWARD[solver](perturbed, y, affine, fd_tol, max_iter)[0]
            grad_d = jax.grad(perturbed)(y_d)
            nu_d = None if affine is None else affine.multipliers(grad_d)

            def gap(p_):
                return problem.lagrangian(y_d, nu_d, p_) - problem.lagrangian(y, nu, p_)

            return tree_scale(scale / delta, jax.grad(gap, allow_int=True)(p))

        y, (stats, affine) = custom_solution(
            solve, backward, jax.lax.stop_gradient(y0_flat), params
        )
        nu = _multipliers(problem, affine, y, params)
    else:
        affine = problem.affine(params)
        y_start = _project(affine, jax.lax.stop_gradient(y0_flat))
        y, k, res, conv = _unrolled(fun_at(params), y_start, affine, tol, max_iter, solver)
        stats = (k, res, conv)
        nu = _multipliers(problem, affine, y, params)

    info = _make_info(problem, affine, y, stats, y0_flat, params, dtype)
    check_info(info, throw)
    return Solution(unravel(y), None if eq is None else nu, None, info)


def _multipliers(problem, affine, y, params):
    if affine is None:
        return jnp.zeros((0,), y.dtype)
    return affine.multipliers(jax.grad(problem.objective)(y, params))


def _make_info(problem, affine, y, stats, y0_flat, params, dtype):
    k, res, conv = stats
    eps = jnp.finfo(dtype).eps
    finite = tree_all_finite((y, res, y0_flat, params, affine))
    status = jnp.where(conv, Status.SUCCESS, Status.MAX_STEPS)
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
    status = jnp.where(finite, status, Status.NONFINITE)
    return make_info(k, res, conv & finite, status)


def _rank_tol(A):
    s_max = jnp.linalg.norm(A, 2) if A.size else 0.0
    return max(A.shape) * jnp.finfo(A.dtype).eps * s_max * 10


# --------------------------------------------------------------------------------------------
# Trace-time validation.


def _check_option(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def _flatten_y0(y0):
    leaves = jax.tree_util.tree_leaves(y0)
    if not leaves:
        raise ValueError("y0 must contain at least one array, got an empty pytree.")
    for leaf in leaves:
        if not is_inexact(leaf):
            raise TypeError(
                f"y0 must contain floating-point arrays, got dtype {jnp.result_type(leaf)}; "
                "pass e.g. jnp.zeros(n) rather than an integer array."
            )
    y0_flat, unravel = ravel_pytree(y0)
    return y0_flat, unravel


def _check_objective(g, y0, theta):
    try:
        out = jax.eval_shape(g, y0, theta)
    except Exception as err:  # re-raise with the argument named
        raise TypeError(f"g(y0, theta) could not be evaluated: {err}") from err
    if not (hasattr(out, "shape") and out.shape == ()):
        shape = getattr(out, "shape", type(out).__name__)
        raise TypeError(f"g(y, theta) must return a scalar, got {shape}.")


def _check_eq(eq, theta, n):
    try:
        out = jax.eval_shape(eq, theta)
    except Exception as err:
        raise TypeError(f"eq(theta) could not be evaluated: {err}") from err
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("eq(theta) must return a pair (A, b).")
    A, b = out
    if len(A.shape) != 2 or A.shape[1] != n:
        raise ValueError(
            f"eq(theta) returned A with shape {tuple(A.shape)} but y has {n} entries; "
            f"A must have shape (m, {n})."
        )
    if tuple(b.shape) != (A.shape[0],):
        raise ValueError(
            f"eq(theta) returned b with shape {tuple(b.shape)} but A has {A.shape[0]} rows; "
            f"b must have shape ({A.shape[0]},)."
        )
    if A.shape[0] == 0:
        raise ValueError("eq(theta) returned A with no rows; pass eq=None instead.")
    return A, b
