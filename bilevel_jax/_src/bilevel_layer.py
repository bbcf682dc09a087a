"""``bilevel_layer``: a differentiable bilevel program (BiGrad continuous push-back).

The layer maps an input ``z`` (any pytree) to the solution ``(x*, y*)`` of

    x*(z) = argmin_x f(x, y*(x, z), z),      y*(x, z) = argmin_y g(x, y, z)  [s.t. A y = b],

and differentiates both outputs with respect to ``z`` and to every array that ``f``, ``g`` or
``eq`` close over (Alesiani, AAAI 2023; docs page ``lower/bilevel-layer.md``).

Notation on flattened variables: ``w = y`` (or ``w = (y, nu)`` with linear equalities, ``nu``
their multipliers), ``ell = g + nu^T (A y - b)`` the lower-level Lagrangian,
``G = grad_w ell`` the lower-level stationarity residual and ``G_w``, ``G_x``, ``G_z`` its
Jacobians. The adjoint ``lam`` solves ``G_w^T lam = grad_w f`` and

    L(x, w, lam, z) = f(x, y, z) - lam^T G(x, w, z)

is the Lagrangian of the single-level reformulation ``min_{x, w} f  s.t.  G(x, w, z) = 0``.
Its gradient in ``zeta = (x, w, lam)`` is the optimality residual of the layer, the single
source of truth for the stopping test (``info.residual``) and the backward pass:

    grad_x L = U = grad_x f - G_x^T lam   (the reduced gradient of phi(x) = f(x, y*(x), z)),
    grad_w L = grad_w f - G_w^T lam,      grad_lam L = -G .

Backward passes (``hypergrad``), for output cotangents ``(xbar, ybar)``:

* ``"saddle"`` (default): ``K = d^2 L / d zeta^2`` is symmetric indefinite; solve
  ``K u = (xbar, ybar, 0)`` once (dense LU when small, else MINRES) and return
  ``zbar = -K_z^T u`` with ``K_z = d grad_zeta L / dz`` (one VJP).
* ``"schur"``: the four-solve push-back on ``[U; G] = 0`` with ``U`` containing the solve for
  ``lam`` (differentiated, so third derivatives of ``g`` enter): ``G_w^T w = ybar``,
  ``S^T a = xbar - G_x^T w``, ``b = w - G_w^{-T} U_w^T a``, ``zbar = -(U_z^T a + G_z^T b)``,
  ``S = U_x - U_w G_w^{-1} G_x`` the Hessian of ``phi``. Equal to ``"saddle"`` exactly.
* ``"gauss_newton"``: ``"saddle"`` with ``lam`` frozen in the curvature of ``L``: the
  ``lam``-weighted third derivatives of ``g`` are dropped from ``K`` and ``K_z``
  (``K ~ [[grad^2 f, -J^T], [-J, 0]]``, ``J = [G_x, G_w]``). Exact when ``g`` is quadratic in
  ``(x, y)`` and ``z``, otherwise an approximation with error ``O(||grad^3 g|| ||lam||)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src import loops, vma
from bilevel_jax._src.argmin import argmin, default_tol
from bilevel_jax._src.implicit import SolveAux, custom_solution, implicit_solution
from bilevel_jax._src.tree import tree_all_finite
from bilevel_jax._src.types import Array, Info, PyTree, Status, check_info, make_info
from bilevel_jax._src.validation import check_option, check_scalar_output, flatten_variables

__all__ = ["BilevelSolution", "SaddleSystem", "bilevel_layer", "saddle_system"]

HYPERGRADS = ("saddle", "schur", "gauss_newton")
SOLVERS = ("auto", "newton", "lbfgs")
INNER_SOLVERS = ("auto", "newton", "lbfgs", "gradient")
LINEAR_SOLVERS = ("auto", "dense", "lu", "minres", "gmres", "normal_cg")
#: Largest ``n_x + n_w`` for which ``solver="auto"`` uses the dense reduced Newton method.
NEWTON_MAX_SIZE = 200


class BilevelSolution(NamedTuple):
    """Solution of :func:`bilevel_layer`.

    Attributes:
      x: the upper-level solution ``x*``, with the structure and dtypes of ``x0``.
      y: the lower-level solution ``y*(x*, z)``, with the structure and dtypes of ``y0``.
      info: an :class:`~bilevel_jax.Info`; ``residual`` is ``||grad_(x, w, lam) L||``.
    """

    x: PyTree
    y: PyTree
    info: Info


class SaddleSystem(NamedTuple):
    """The push-back system of a bilevel layer at a solution, as dense matrices.

    Attributes:
      K: the symmetric matrix ``d^2 L / d zeta^2`` with ``zeta = (x, w, lam)`` flattened
        (``x``, then ``y``, then the lower-level multipliers ``nu`` if any, then ``lam``).
      K_theta: ``d grad_zeta L / d z`` with ``z`` flattened (``ravel_pytree`` order).
      lam: the adjoint ``lam`` solving ``G_w^T lam = grad_w f``.
    """

    K: Array
    K_theta: Array
    lam: Array


# --------------------------------------------------------------------------------------------
# The problem on flat variables.


class _Problem(NamedTuple):
    """``f``, ``g`` and ``eq`` on flat ``x`` (``nx``), ``y`` (``ny``) and ``m`` equalities."""

    f: Callable  # (xf, yf, p) -> scalar
    g: Callable  # (xf, yf, p) -> scalar
    eq: Callable | None  # (xf, p) -> (A, b)
    nx: int
    ny: int
    m: int
    dtype: jnp.dtype

    @property
    def nw(self):
        return self.ny + self.m

    def split(self, zeta):
        nx, nw = self.nx, self.nw
        return zeta[:nx], zeta[nx : nx + nw], zeta[nx + nw :]

    def F(self, xf, w, p):
        return self.f(xf, w[: self.ny], p)

    def ell(self, xf, w, p):
        y = w[: self.ny]
        value = self.g(xf, y, p)
        if self.eq is None:
            return value
        A, b = self.eq(xf, p)
        return value + w[self.ny :] @ (A @ y - b)

    def G(self, xf, w, p):
        return jax.grad(self.ell, argnums=1)(xf, w, p).astype(self.dtype)

    def lagrangian(self, zeta, p):
        xf, w, lam = self.split(zeta)
        return self.F(xf, w, p) - lam @ self.G(xf, w, p)

    def residual(self, zeta, p):
        """``grad_zeta L``: ``[U; grad_w f - G_w^T lam; -G]``."""
        return jax.grad(self.lagrangian)(zeta, p).astype(self.dtype)

    def residual_gauss_newton(self, zeta, p):
        """``grad_zeta L`` with ``G``'s Jacobian frozen at the point (no third derivatives)."""
        xf, w, lam = self.split(zeta)
        frozen = jax.lax.stop_gradient((xf, w, p))
        _, vjp = jax.vjp(lambda x_, w_: self.G(x_, w_, frozen[2]), frozen[0], frozen[1])
        cx, cw = vjp(lam)
        fx, fw = jax.grad(self.F, argnums=(0, 1))(xf, w, p)
        out = jnp.concatenate([fx - cx, fw - cw, -self.G(xf, w, p)])
        return out.astype(self.dtype)

    def gw_structure(self):
        return "spd" if self.eq is None else "symmetric"


def _adjoint(problem, xf, w, p, method, report=False):
    """``lam`` solving ``G_w^T lam = grad_w f`` (``G_w`` symmetric); NaN if not converged."""
    _, vjp = jax.vjp(lambda w_: problem.G(xf, w_, p), w)
    rhs = jax.grad(problem.F, argnums=1)(xf, w, p).astype(problem.dtype)
    structure = problem.gw_structure()
    if method == "minres" or (method == "auto" and w.shape[0] > ls.DENSE_MAX_SIZE):
        method = "cg" if structure == "spd" else "minres"
    sol = ls.linear_solve(lambda v: vjp(v)[0], rhs, method=method, structure=structure)
    return ls.solution_or_nan(sol, report=report, what="bilevel_layer adjoint (lam) solve")


# --------------------------------------------------------------------------------------------
# Forward solvers of the upper level.


class _Inner(NamedTuple):
    solver: str
    tol: float | None
    max_iter: int | None


def _inner_solve(problem, inner, xf, w_start, p, differentiable=False):
    """``w = (y*, nu*)`` at ``x``: :func:`argmin`, or the dense Newton below.

    ``argmin`` (differentiable in ``xf`` and ``p`` by its implicit rule) is used when
    ``differentiable`` or when ``inner.solver`` names one of its solvers; otherwise (Newton
    upper level, ``inner_solver="auto"``) the lean dense Newton :func:`_dense_inner`, which
    compiles to less code.
    """
    if inner.solver == "auto" and not differentiable:
        return _dense_inner(problem, inner, xf, w_start, p)
    eq = None
    if problem.eq is not None:
        eq = lambda t: problem.eq(t[0], t[1])  # noqa: E731
    sol = argmin(
        lambda yf, t: problem.g(t[0], yf, t[1]),
        w_start[: problem.ny],
        (xf, p),
        eq=eq,
        solver=inner.solver,
        tol=inner.tol,
        max_iter=inner.max_iter,
    )
    w = sol.y if sol.nu is None else jnp.concatenate([sol.y, sol.nu.astype(sol.y.dtype)])
    return w, sol.info


def _dense_inner(problem, inner, xf, w0, p):
    """Damped Newton on ``G(x, w) = 0`` for fixed ``x``, Armijo on ``g`` (on ``A y = b``).

    With equalities the start is projected onto ``{A y = b}`` and every step solves the KKT
    system ``G_w d = -G``, which keeps ``y`` feasible; the step in ``y`` is a descent
    direction of ``g`` on the affine set.
    """
    ny, dtype = problem.ny, problem.dtype
    tol = default_tol(dtype) if inner.tol is None else inner.tol
    max_iter = 100 if inner.max_iter is None else inner.max_iter

    def gfun(y):
        return problem.g(xf, y, p)

    def residual(w):
        return problem.G(xf, w, p)

    y0 = w0[:ny]
    if problem.eq is not None:
        A, b = problem.eq(xf, p)
        y0 = y0 - jnp.linalg.lstsq(A, A @ y0 - b)[0]
    w0 = jnp.concatenate([y0, w0[ny:]])
    threshold = tol * (1 + jnp.linalg.norm(residual(w0)))

    def cond(state):
        _, res, ok = state
        return (res > threshold) & ok

    def step(state):
        w, res, _ = state
        r = residual(w)
        d = -jnp.linalg.solve(jax.jacfwd(residual)(w), r)
        y, dy = w[:ny], d[:ny]
        nu = w[ny:] + d[ny:]
        value, slope = gfun(y), jax.grad(gfun)(y) @ dy

        def trial(t):
            w_t = jnp.concatenate([y + t * dy, nu])
            res_t = jnp.linalg.norm(residual(w_t))
            value_t = gfun(y + t * dy)
            armijo = value_t <= value + 1e-4 * t * slope
            # Near the solution the decrease of g is below rounding: accept a smaller residual
            # if g does not rise above rounding.
            rounding = 100 * jnp.finfo(dtype).eps * (1 + jnp.abs(value))
            smaller = (res_t <= (1 - 1e-4 * t) * res) & (value_t <= value + rounding)
            return (armijo | smaller) & jnp.isfinite(res_t), (w_t, res_t)

        _, ok, (w_t, res_t) = loops.backtracking(trial, jnp.ones((), dtype), min_step=1e-10)
        return jnp.where(ok, w_t, w), jnp.where(ok, res_t, res), ok

    res0 = jnp.linalg.norm(residual(w0))
    k, (w, res, _) = loops.iterate(step, (w0, res0, jnp.asarray(True)), cond, max_iter)
    # One full Newton step more (kept if it reduces the residual): Newton converges
    # quadratically, so this takes w from the tolerance to about machine precision, which
    # the upper level's reduced gradient (computed at w) needs.
    d = -jnp.linalg.solve(jax.jacfwd(residual)(w), residual(w))
    w_polish = w + d
    res_polish = jnp.linalg.norm(residual(w_polish))
    better = res_polish < res
    w, res = jnp.where(better, w_polish, w), jnp.where(better, res_polish, res)
    converged = res <= threshold
    finite = tree_all_finite((w, res))
    status = jnp.where(converged, Status.SUCCESS, Status.MAX_STEPS)
    status = jnp.where(finite, status, Status.NONFINITE)
    return w, make_info(k, res, converged & finite, status)


def _newton_model(problem, xf, w, p):
    """Reduced gradient ``U``, reduced Hessian ``S`` (of ``phi``), ``phi`` and ``lam``."""
    nx = problem.nx
    J = jax.jacfwd(problem.G, argnums=(0, 1))(xf, w, p)
    Gx, Gw = J
    fx, fw = jax.grad(problem.F, argnums=(0, 1))(xf, w, p)
    fact = ls.factorize(Gw, structure="general")
    lam = ls.solve_factorized(fact, fw, transpose=True)
    U = fx - Gx.T @ lam
    xw = jnp.concatenate([xf, w])

    def lagr(xw_):
        return problem.F(xw_[:nx], xw_[nx:], p) - lam @ problem.G(xw_[:nx], xw_[nx:], p)

    H = jax.hessian(lagr)(xw)
    Z = jnp.concatenate([jnp.eye(nx, dtype=xf.dtype), -_solve_columns(fact, Gx)], axis=0)
    S = Z.T @ H @ Z
    return U, 0.5 * (S + S.T), problem.F(xf, w, p), lam


def _solve_columns(fact, B):
    return jax.vmap(lambda b: ls.solve_factorized(fact, b), in_axes=1, out_axes=1)(B)


def _modified_newton_direction(S, U):
    """``-|S|^{-1} U`` with the eigenvalues of ``S`` replaced by ``max(|s_i|, delta)``."""
    evals, V = jnp.linalg.eigh(S)
    scale = jnp.maximum(jnp.max(jnp.abs(evals)), 1.0)
    floor = jnp.sqrt(jnp.finfo(S.dtype).eps) * scale
    return -V @ ((V.T @ U) / jnp.maximum(jnp.abs(evals), floor))


def _blank_info(dtype):
    return make_info(0, jnp.zeros((), dtype), False, Status.SUCCESS)


def _newton(problem, inner, x0, w0, p, tol, max_iter):
    """Newton on ``phi(x) = f(x, y*(x))`` with the reduced Hessian and Armijo backtracking.

    One flat loop: every iteration evaluates one trial point ``x + t d`` (lower-level solve,
    warm started, then ``phi``, ``U`` and ``S``); an accepted trial becomes the current point
    and gets a new direction, a rejected one halves ``t``. The first trial is ``x0`` itself.
    Each function is traced once, which keeps compilation small.
    """
    dtype = x0.dtype

    def cond(state):
        k, _, _, _, _, _, _, _, t, stop, _, _ = state
        return (k < max_iter) & ~stop & (t > 1e-10)

    def body(state):
        k, xf, w, phi, unorm, slope, direction, threshold, t, _, _, info = state
        x_t = xf + t * direction
        w_t, info_t = _inner_solve(problem, inner, x_t, w, p)
        U_t, S_t, phi_t, _ = _newton_model(problem, x_t, w_t, p)
        unorm_t = jnp.linalg.norm(U_t)
        armijo = phi_t <= phi + 1e-4 * t * slope
        # Near the solution the decrease of phi is below rounding: accept a step that
        # reduces the reduced gradient instead, provided phi does not rise above rounding
        # (otherwise a nonconvex phi can make the iteration cycle).
        rounding = 100 * jnp.finfo(dtype).eps * (1 + jnp.abs(phi))
        smaller = (unorm_t <= (1 - 1e-4 * t) * unorm) & (phi_t <= phi + rounding)
        accept = (armijo | smaller) & jnp.isfinite(phi_t) & tree_all_finite((w_t, U_t, S_t))
        first = ~jnp.isfinite(phi)
        threshold = jnp.where(first & accept, tol * (1 + unorm_t), threshold)
        d_t = _modified_newton_direction(S_t, U_t)
        converged = accept & (unorm_t <= threshold)
        pick = lambda a, b: jnp.where(accept, a, b)  # noqa: E731
        k = k + (accept & ~first).astype(k.dtype)
        info = jax.tree_util.tree_map(pick, info_t, info)
        t = jnp.where(accept, jnp.ones_like(t), t / 2)
        stop = converged | (first & ~accept)  # a non-finite start cannot be backtracked
        return (k, pick(x_t, xf), pick(w_t, w), pick(phi_t, phi), pick(unorm_t, unorm),
                pick(U_t @ d_t, slope), pick(d_t, direction), threshold, t, stop, converged,
                info)

    inf = jnp.asarray(jnp.inf, dtype)
    zero = jnp.zeros((), dtype)
    state = (jnp.asarray(0), x0, w0, inf, inf, zero, jnp.zeros_like(x0), inf,
             jnp.ones((), dtype), jnp.asarray(False), jnp.asarray(False), _blank_info(dtype))
    k, xf, w, _, _, _, _, _, _, _, done, info = vma.while_loop(cond, body, state)
    return xf, w, k, done, info


def _lbfgs(problem, inner, x0, w0, p, tol, max_iter):
    """L-BFGS (optax) on ``phi(x)``, its gradient ``U`` from ``argmin``'s implicit rule."""
    vma.unsupported("solver='lbfgs'", vma.OPTAX_LINESEARCH, x0, w0, p)
    dtype = problem.dtype

    def phi(xf, w_warm):
        w, _ = _inner_solve(problem, inner, xf.astype(dtype), w_warm, p, differentiable=True)
        return problem.F(xf.astype(dtype), w, p)

    opt = optax.lbfgs()
    grad0 = jax.grad(phi)(x0, w0)
    threshold = tol * (1 + jnp.linalg.norm(grad0))

    def cond(state):
        k, _, _, _, res = state
        return (k < max_iter) & (res > threshold)

    def body(state):
        k, xf, w, opt_state, _ = state
        w, _ = _inner_solve(problem, inner, xf, w, p)
        w = jax.lax.stop_gradient(w)
        value_fn = lambda x_: phi(x_, w)  # noqa: E731
        value, grad = jax.value_and_grad(value_fn)(xf)
        updates, opt_state = opt.update(
            grad, opt_state, xf, value=value, grad=grad, value_fn=value_fn
        )
        xf = optax.apply_updates(xf, updates).astype(dtype)
        return k + 1, xf, w, opt_state, jnp.linalg.norm(jax.grad(value_fn)(xf))

    state = (jnp.asarray(0), x0, w0, opt.init(x0), jnp.asarray(jnp.inf, dtype))
    k, xf, w, _, res = vma.while_loop(cond, body, state)
    w, inner_info = _inner_solve(problem, inner, xf, w, p)
    return xf, w, k, res <= threshold, inner_info


_FORWARD = {"newton": _newton, "lbfgs": _lbfgs}


# --------------------------------------------------------------------------------------------
# Backward passes.


def _saddle_adjoint(method, ridge, report=False):
    def adjoint_solve(vjp_z, zbar, z, p, aux):
        sol = ls.linear_solve(vjp_z, zbar, method=method, structure="symmetric", ridge=ridge)
        return ls.solution_or_nan(sol, report=report, what="bilevel_layer backward solve")

    return adjoint_solve


def _schur_backward(problem, method, ridge, report=False):
    """The four-solve Schur push-back."""
    nx, nw = problem.nx, problem.nw

    def U_fn(xf, w, p):
        # The adjoint lam is a (differentiated) dense solve, so U's Jacobians carry the third
        # derivatives of g.
        Gw = jax.jacfwd(problem.G, argnums=1)(xf, w, p)
        lam = jnp.linalg.solve(Gw.T, jax.grad(problem.F, argnums=1)(xf, w, p))
        _, vjp = jax.vjp(lambda x_: problem.G(x_, w, p), xf)
        return (jax.grad(problem.F)(xf, w, p) - vjp(lam)[0]).astype(problem.dtype)

    def backward(zbar, zeta, p, aux):
        xf, w, _ = problem.split(zeta)
        xbar, wbar = zbar[:nx], zbar[nx : nx + nw]
        Gw = jax.jacfwd(problem.G, argnums=1)(xf, w, p)
        fact = ls.factorize(Gw, structure="general")
        _, U_vjp = jax.vjp(U_fn, xf, w, p)
        _, G_vjp = jax.vjp(problem.G, xf, w, p)
        w1 = ls.solve_factorized(fact, wbar, transpose=True)  # 1. G_w^T w = ybar

        def schur_t(a):  # S^T a = U_x^T a - G_x^T G_w^{-T} U_w^T a
            ux, uw, _ = U_vjp(a)
            return ux - G_vjp(ls.solve_factorized(fact, uw, transpose=True))[0]

        rhs = xbar - G_vjp(w1)[0]
        a = ls.solution_or_nan(
            ls.linear_solve(schur_t, rhs, method=method, structure="general", ridge=ridge),
            report=report, what="bilevel_layer Schur-complement solve",
        )
        _, uw, uz = U_vjp(a)
        b = w1 - ls.solve_factorized(fact, uw, transpose=True)  # 3.
        gz = G_vjp(b)[2]
        return jax.tree_util.tree_map(_negative_sum, uz, gz)  # 4.

    return backward


def _negative_sum(u, g):
    if getattr(u, "dtype", None) == jax.dtypes.float0:  # integer leaves of z
        return u
    return -(u + g)


# --------------------------------------------------------------------------------------------
# The public entry point.


def bilevel_layer(
    f: Callable,
    g: Callable,
    x0: PyTree,
    y0: PyTree,
    z: PyTree,
    *,
    eq: Callable | None = None,
    hypergrad: str = "saddle",
    solver: str = "auto",
    inner_solver: str = "auto",
    linear_solver: str = "auto",
    tol: float | None = None,
    inner_tol: float | None = None,
    max_iter: int | None = None,
    inner_max_iter: int | None = None,
    ridge: float = 0.0,
    throw: bool = False,
) -> BilevelSolution:
    r"""Solve a bilevel program and differentiate its solution ``(x*, y*)`` in ``z``.

    .. math::

        x^*(z) = \arg\min_x f(x, y^*(x, z), z), \qquad
        y^*(x, z) = \arg\min_y g(x, y, z) \ \ \text{s.t.}\ \ A(x, z) y = b(x, z).

    Both outputs are reverse-mode differentiable with respect to ``z`` and to every array
    that ``f``, ``g`` and ``eq`` close over (closure conversion). With the lower-level
    stationarity residual ``G = grad_w ell`` (``w = y``, or ``(y, nu)`` with equalities,
    ``ell = g + nu^T (A y - b)``) and the adjoint ``lam = G_w^{-T} grad_w f``, the optimality
    conditions of the layer are ``grad_(x, w, lam) L = 0`` for ``L = f - lam^T G``; the first
    block is the reduced gradient ``U = grad phi`` of ``phi(x) = f(x, y*(x, z), z)``.

    Forward pass: Newton on ``phi`` (``solver="newton"``) with the reduced Hessian
    ``S = Z^T (d^2 L / d(x, w)^2) Z``, ``Z = [I; -G_w^{-1} G_x]`` (eigenvalues replaced by
    ``max(|s_i|, delta)`` so a nonconvex ``phi`` still gets a descent direction) and Armijo
    backtracking, each trial point re-solving the lower level (warm started) by damped
    Newton on ``G = 0`` (or by :func:`~bilevel_jax.argmin` with the ``inner_solver`` named);
    or L-BFGS on ``phi`` (``solver="lbfgs"``) with ``grad phi`` from ``argmin``'s implicit
    rule. Backward pass (``hypergrad``): the symmetric saddle system on ``K = d^2 L /
    d zeta^2``, ``zeta = (x, w, lam)``:

    .. math:: \bar z = -K_z^T K^{-1} [\bar x; \bar y; 0],

    the equivalent four-solve Schur form, or the Gauss–Newton approximation that freezes
    ``lam`` in the curvature of ``L`` (no third derivatives of ``g``); see the module
    docstring.

    Assumptions: ``g`` is twice differentiable and strongly convex in ``y`` (on ``null(A)``,
    with ``A`` of full row rank), so ``G_w`` is nonsingular; ``f`` is twice differentiable
    and ``x*`` is a local minimiser of ``phi`` with a nonsingular Hessian ``S`` (then ``K`` is
    nonsingular). Newton finds a local minimiser of ``phi`` near ``x0`` when ``phi`` is
    nonconvex. Inequality constraints are not supported here. If the iteration limit is hit
    ``info.status`` is ``MAX_STEPS`` with the residual reached; a failed lower-level solve
    passes its status on (``MAX_STEPS``, ``INFEASIBLE``, ...); ``inf``/``nan`` give
    ``NONFINITE``. Forward-mode differentiation (``jax.jvp``) is not available (custom VJP).
    Failure policy (as for every entry point, see :class:`~bilevel_jax.Status`): with a
    status other than ``SUCCESS`` or ``RANK_DEFICIENT`` every cotangent is NaN (per problem
    under ``jax.vmap``); ``NONFINITE`` also makes ``x`` and ``y`` NaN, and the other
    failures return the last iterate.

    Cost: each Newton trial point forms ``S`` (``O((n_x + n_w)^3)``, third derivatives of
    ``g``) and solves the lower level (dense, ``O(n_w^3)`` per inner step); use
    ``solver="lbfgs"`` (and an iterative ``inner_solver``) for large problems. The
    ``"saddle"`` backward solves one system of size ``n_x + 2 n_w`` (dense LU up to 1000
    unknowns, else MINRES with Hessian-vector products of ``L``); ``"schur"`` forms ``G_w``
    densely and differentiates through its solve. Under ``jax.vmap`` the ``while_loop``
    solvers run until the slowest member of the batch has converged.

    Args:
      f: upper-level objective ``f(x, y, z) -> scalar``.
      g: lower-level objective ``g(x, y, z) -> scalar``, strongly convex in ``y``.
      x0: upper-level warm start (pytree of float arrays); receives no gradient.
      y0: lower-level warm start (pytree of float arrays); receives no gradient.
      z: the layer input, any pytree; receives gradients.
      eq: optional lower-level equalities ``eq(x, z) -> (A, b)``, ``A`` of shape
        ``(m, n_y)`` acting on the flattened ``y``, ``b`` of shape ``(m,)``; may depend on
        ``x`` (coupled constraints).
      hypergrad: backward pass, ``"saddle"`` (default), ``"schur"`` or ``"gauss_newton"``.
      solver: upper-level solver, ``"newton"``, ``"lbfgs"`` or ``"auto"`` (Newton when
        ``n_x + n_w <= NEWTON_MAX_SIZE`` (200), else L-BFGS).
      inner_solver: lower-level solver: ``"auto"`` (dense damped Newton with the Newton
        upper level, :func:`~bilevel_jax.argmin`'s default with L-BFGS) or an ``argmin``
        ``solver`` (``"newton"``, ``"lbfgs"``, ``"gradient"``).
      linear_solver: backward solve: ``"auto"`` (dense LU up to 1000 unknowns, else MINRES
        (``"saddle"``, ``"gauss_newton"``) or GMRES (``"schur"``)), ``"dense"``, ``"lu"``,
        ``"minres"`` (symmetric rules only), ``"gmres"`` or ``"normal_cg"``.
      tol: relative tolerance on ``||U||`` (default 1e-10 in float64, 1e-5 in float32).
      inner_tol: lower-level tolerance (default: ``argmin``'s).
      max_iter: upper-level iteration limit (default 100 Newton, 1000 L-BFGS steps).
      inner_max_iter: lower-level iteration limit (default: ``argmin``'s).
      ridge: ``ridge >= 0`` added to the backward system (``K``, or ``S`` with
        ``hypergrad="schur"``); the result is then the push-back of the regularised system.
      throw: raise :class:`~bilevel_jax.SolveError` if the status is a failure (neither
        ``SUCCESS`` nor ``RANK_DEFICIENT``); under ``jax.jit`` it arrives as the
        ``jax.errors.JaxRuntimeError`` that ``SolveError`` subclasses. Off by default (see
        :class:`~bilevel_jax.SolveError`); with ``throw`` a backward linear solve
        that does not converge also prints a message (its cotangents are NaN).

    Returns:
      A :class:`BilevelSolution` ``(x, y, info)``.

    Raises:
      ValueError, TypeError: at trace time, for bad options, shapes or dtypes (naming the
        argument).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel_jax._src.bilevel_layer import bilevel_layer
      >>> g = lambda x, y, z: 0.5 * y**2 - y * (x + 0.5 * z)  # y* = x + z / 2
      >>> f = lambda x, y, z: x**2 - x * z + 0.5 * (y - 2 * z) ** 2
      >>> sol = bilevel_layer(f, g, 0.0, 0.0, 1.0)
      >>> print(round(float(sol.x), 6), round(float(sol.y), 6))
      0.833333 1.333333
      >>> dx = jax.grad(lambda z: bilevel_layer(f, g, 0.0, 0.0, z).x)(1.0)

    References:
      Alesiani. Implicit Bilevel Optimization: Differentiating through Bilevel Optimization
      Programming. AAAI 2023 (arXiv 2302.14473).
    """
    check_option("hypergrad", hypergrad, HYPERGRADS)
    check_option("solver", solver, SOLVERS)
    check_option("inner_solver", inner_solver, INNER_SOLVERS)
    check_option("linear_solver", linear_solver, LINEAR_SOLVERS)
    if hypergrad == "schur" and linear_solver == "minres":
        raise ValueError(
            "linear_solver='minres' needs a symmetric system; the Schur complement S^T of "
            "hypergrad='schur' is not symmetric away from the solution: use 'gmres' or 'dense'."
        )
    for name, value in (("tol", tol), ("inner_tol", inner_tol)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be positive, got {value}.")
    for name, value in (("max_iter", max_iter), ("inner_max_iter", inner_max_iter)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")

    problem, params, x0f, y0f, unravel_x, unravel_y = _setup(f, g, eq, x0, y0, z)
    dtype = problem.dtype
    if solver == "auto":
        solver = "newton" if problem.nx + problem.nw <= NEWTON_MAX_SIZE else "lbfgs"
    tol = default_tol(dtype) if tol is None else tol
    if max_iter is None:
        max_iter = {"newton": 100, "lbfgs": 1000}[solver]
    inner = _Inner(inner_solver, inner_tol, inner_max_iter)

    def solve(zeta0, p):
        xf, w0, _ = problem.split(zeta0)
        xf, w, k, conv, inner_info = _FORWARD[solver](problem, inner, xf, w0, p, tol, max_iter)
        lam = _adjoint(problem, xf, w, p, "auto", throw)
        zeta = jnp.concatenate([xf, w, lam])
        info = _make_info(problem, zeta, p, (k, conv, inner_info))
        # NONFINITE data or iterates: NaN outputs (the policy of types.Status).
        zeta = jnp.where(info.status == Status.NONFINITE, jnp.nan, zeta).astype(zeta.dtype)
        return zeta, SolveAux(info)

    zeta0 = jnp.concatenate([x0f, y0f, jnp.zeros(problem.m + problem.nw, dtype)])
    zeta0 = jax.lax.stop_gradient(zeta0)
    if hypergrad == "schur":
        backward = _schur_backward(problem, linear_solver, ridge, throw)
        zeta, aux = custom_solution(solve, backward, zeta0, params)
    else:
        # linear_solve's "auto" picks dense LU up to DENSE_MAX_SIZE unknowns, else MINRES, for
        # the symmetric indefinite K.
        residual = problem.residual if hypergrad == "saddle" else problem.residual_gauss_newton
        adjoint = _saddle_adjoint(linear_solver, ridge, throw)
        zeta, aux = implicit_solution(solve, residual, adjoint, zeta0, params)

    info = aux.info
    check_info(info, throw)
    xf, w, _ = problem.split(zeta)
    return BilevelSolution(unravel_x(xf), unravel_y(w[: problem.ny]), info)


def _make_info(problem, zeta, params, aux):
    k, conv, inner_info = aux
    res = jnp.linalg.norm(problem.residual(jax.lax.stop_gradient(zeta), params))
    res = jax.lax.stop_gradient(res)
    finite = tree_all_finite((zeta, params)) & jnp.isfinite(res)
    inner_status = inner_info.status
    # RANK_DEFICIENT equalities still give a unique y: reported, but not a failure.
    inner_fatal = (inner_status != Status.SUCCESS) & (inner_status != Status.RANK_DEFICIENT)
    status = jnp.where(conv, Status.SUCCESS, Status.MAX_STEPS)
    status = jnp.where(conv & (inner_status == Status.RANK_DEFICIENT), inner_status, status)
    status = jnp.where(inner_fatal, inner_status, status)
    status = jnp.where(finite, status, Status.NONFINITE)
    converged = conv & ~inner_fatal & finite
    return make_info(k, res, converged, status)


# --------------------------------------------------------------------------------------------
# Setup and trace-time validation.


def _setup(f, g, eq, x0, y0, z):
    x0f, unravel_x = flatten_variables("x0", x0)
    y0f, unravel_y = flatten_variables("y0", y0)
    dtype = jnp.result_type(x0f, y0f)
    x0f, y0f = x0f.astype(dtype), y0f.astype(dtype)
    nx, ny = x0f.shape[0], y0f.shape[0]
    check_scalar_output(f, (x0, y0, z), "f(x0, y0, z)", "f(x, y, z)")
    check_scalar_output(g, (x0, y0, z), "g(x0, y0, z)", "g(x, y, z)")
    m = 0
    eq_conv, eq_consts = None, ()
    if eq is not None:
        m = _check_eq(eq, x0, z, ny)
        eq_conv, eq_consts = vma.closure_convert(eq, x0, z)
    f_conv, f_consts = vma.closure_convert(f, x0, y0, z)
    g_conv, g_consts = vma.closure_convert(g, x0, y0, z)
    params = (z, tuple(f_consts), tuple(g_consts), tuple(eq_consts))
    # Inside shard_map: one uniformly per-device problem (see vma.py); the identity elsewhere.
    params = vma.vary_like(params, params, x0f, y0f)
    x0f, y0f = vma.vary_like((x0f, y0f), params)

    def f_flat(xf, yf, p):
        return f_conv(unravel_x(xf), unravel_y(yf), p[0], *p[1]).astype(dtype)

    def g_flat(xf, yf, p):
        return g_conv(unravel_x(xf), unravel_y(yf), p[0], *p[2]).astype(dtype)

    eq_flat = None
    if eq is not None:

        def eq_flat(xf, p):
            A, b = eq_conv(unravel_x(xf), p[0], *p[3])
            return jnp.asarray(A, dtype), jnp.asarray(b, dtype)

    problem = _Problem(f_flat, g_flat, eq_flat, nx, ny, m, dtype)
    return problem, params, x0f, y0f, unravel_x, unravel_y


def _check_eq(eq, x0, z, ny):
    try:
        out = jax.eval_shape(eq, x0, z)
    except Exception as err:
        raise TypeError(f"eq(x0, z) could not be evaluated: {err}") from err
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise TypeError("eq(x, z) must return a pair (A, b).")
    A, b = out
    if len(A.shape) != 2 or A.shape[1] != ny or A.shape[0] == 0:
        raise ValueError(
            f"eq(x, z) returned A with shape {tuple(A.shape)} but y has {ny} entries; "
            f"A must have shape (m, {ny}) with m >= 1."
        )
    if tuple(b.shape) != (A.shape[0],):
        raise ValueError(
            f"eq(x, z) returned b with shape {tuple(b.shape)} but A has {A.shape[0]} rows; "
            f"b must have shape ({A.shape[0]},)."
        )
    return A.shape[0]


# --------------------------------------------------------------------------------------------
# The dense push-back system (for inspection and tests).


def saddle_system(
    f: Callable, g: Callable, x: PyTree, y: PyTree, z: PyTree, *, eq: Callable | None = None
) -> SaddleSystem:
    """The dense saddle matrix ``K`` and ``K_theta`` of a bilevel layer at ``(x, y)``.

    ``K = d^2 L / d zeta^2`` and ``K_theta = d grad_zeta L / dz`` for
    ``L = f - lam^T grad_w ell`` (see :func:`bilevel_layer`), evaluated at the given
    ``(x, y)`` (normally a solution) with the lower-level multipliers ``nu`` (least squares)
    and the adjoint ``lam`` computed there. Then ``d zeta / dz = -K^{-1} K_theta``.

    Args:
      f: upper-level objective ``f(x, y, z)``.
      g: lower-level objective ``g(x, y, z)``.
      x: upper-level point.
      y: lower-level point.
      z: the layer input.
      eq: optional lower-level equalities ``eq(x, z) -> (A, b)``.

    Returns:
      A :class:`SaddleSystem` ``(K, K_theta, lam)``; the order of ``zeta`` is flattened
      ``x``, ``y``, ``nu``, ``lam``.

    Examples:
      >>> from bilevel_jax._src.bilevel_layer import saddle_system
      >>> g = lambda x, y, z: 0.5 * y**2 - y * (x + 0.5 * z)
      >>> f = lambda x, y, z: x**2 - x * z + 0.5 * (y - 2 * z) ** 2
      >>> K, K_theta, lam = saddle_system(f, g, 5 / 6, 4 / 3, 1.0)
    """
    problem, params, xf, yf, _, _ = _setup(f, g, eq, x, y, z)
    w = yf
    if problem.eq is not None:
        A, _ = problem.eq(xf, params)
        grad = jax.grad(problem.g, argnums=1)(xf, yf, params)
        nu = -jnp.linalg.lstsq(A.T, grad)[0]
        w = jnp.concatenate([yf, nu])
    lam = _adjoint(problem, xf, w, params, "dense")
    zeta = jnp.concatenate([xf, w, lam])
    K = jax.jacfwd(problem.residual)(zeta, params)
    z_flat, unravel_z = ravel_pytree(z)

    def res_z(zf):
        return problem.residual(zeta, (unravel_z(zf),) + tuple(params[1:]))

    K_theta = jax.jacfwd(res_z)(z_flat)
    return SaddleSystem(K, K_theta, lam)
