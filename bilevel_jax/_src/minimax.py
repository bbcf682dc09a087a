r"""``saddle_point``: convex–concave minimax lower levels with exact hypergradients.

The lower level is the saddle point of ``min_{u in U} max_{v in V} f(u, v, theta)`` with ``f``
smooth, convex in ``u`` and concave in ``v`` (pytrees, flattened to ``z = (u, v)`` with
``n = n_u + n_v`` entries) and ``U``, ``V`` closed convex sets given by their projections
(:mod:`bilevel_jax._src.projections`). With the monotone saddle operator

    F(z) = [ grad_u f(u, v) ; -grad_v f(u, v) ]

a saddle point is a fixed point of the projected gradient map, and the optimality residual
(the natural map, the single source of truth for the stopping test and ``info.residual``) is

    r(z, theta) = z - Proj_{U x V}(z - F(z))            (= F(z) without sets).

Forward solvers: projected extragradient with a backtracking step (Korpelevich; Khobotov),
optimistic GDA in its forward-reflected-backward form with an adaptive step (Malitsky and
Tam), and, for the unconstrained small dense case, Newton's method on ``grad f = 0`` with a
line search on ``||grad f||``.

Hypergradient rules:

* ``"implicit"``: the implicit function theorem on the residual. Without sets the residual
  is written ``[grad_u f; grad_v f]``, whose Jacobian is the symmetric indefinite saddle
  matrix ``K = [[f_uu, f_uv], [f_vu, f_vv]]`` (docs: minimax page): solve ``K w = zbar`` (dense
  LU, reusing Newton's factorisation, or MINRES) and return ``-d/dtheta <w, grad f>``. With
  sets the natural map is differentiated (autodiff of the projection gives the mask / the
  tangent projector of the active face): ``(I - D (I - J))^T w = zbar`` with ``D`` the
  projection's Jacobian and ``J = dF/dz`` (dense LU or GMRES).
* ``"unrolled"``: reverse-mode through the forward solver's own steps (a ``lax.scan`` of
  ``max_iter`` steps, masked after convergence), step sizes held constant.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src import loops, vma
from bilevel_jax._src.implicit import SolveAux, implicit_solution
from bilevel_jax._src.projections import (
    cast_sets,
    check_set,
    check_set_data,
    flat_projector,
    sets_empty,
)
from bilevel_jax._src.tree import tree_all_finite
from bilevel_jax._src.types import Array, PyTree, Status, check_info
from bilevel_jax._src.validation import check_option, check_scalar_output, flatten_variables

__all__ = ["SaddleInfo", "SaddleSolution", "duality_gap", "saddle_point"]

SOLVERS = ("auto", "extragradient", "ogda", "newton")
HYPERGRADS = ("implicit", "unrolled")
LINEAR_SOLVERS = ("auto", "dense", "lu", "minres", "gmres", "normal_cg")
#: Largest ``n = n_u + n_v`` for which ``solver="auto"`` uses dense Newton (no sets).
NEWTON_MAX_SIZE = 500
#: The convex–concave curvature check (dense Hessian) runs when ``n <= 2 *`` this.
CURVATURE_CHECK_MAX_SIZE = 500
#: The residual growing by this factor over its initial value is reported as ``DIVERGED``.
DIVERGENCE_FACTOR = 1e6


class SaddleInfo(NamedTuple):
    """Diagnostics of :func:`saddle_point`: the fields of :class:`Info` plus the duality gap.

    Attributes:
      num_steps: iterations taken (``int32``).
      residual: ``||z - Proj(z - F(z))||``, the natural (projected-gradient fixed-point)
        residual at the returned point; ``||grad f||`` without sets.
      converged: whether ``residual`` met the tolerance.
      status: a :class:`Status` value as an ``int32`` array.
      gap: the duality gap ``max_{v' in V} f(u, v') - min_{u' in U} f(u', v) >= 0`` at the
        returned point, estimated as in :func:`duality_gap` with ``gap_steps`` inner steps
        (step sizes from Newton's Hessian, or the first-order solver's final step): a lower
        bound on the exact gap that is never negative, zero at a saddle point and exact once
        the inner problems converge. Very large when ``f`` is unbounded over a set.
    """

    num_steps: Array
    residual: Array
    converged: Array
    status: Array
    gap: Array


class SaddleSolution(NamedTuple):
    """Solution of :func:`saddle_point`.

    Attributes:
      u: the minimising player, with the structure and dtypes of ``u0``.
      v: the maximising player, with the structure and dtypes of ``v0``.
      info: a :class:`SaddleInfo` (an :class:`Info` extended with the duality ``gap``).
    """

    u: PyTree
    v: PyTree
    info: SaddleInfo


def default_tol(dtype) -> float:
    """Default relative tolerance on the residual: 1e-10 in float64, 1e-5 in float32."""
    return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5


# --------------------------------------------------------------------------------------------
# The problem on flat z = (u, v).


class _Problem(NamedTuple):
    """``f`` on flat ``(u, v)`` and the projections; ``params = (theta, consts, U, V)``."""

    fun: Callable  # (u_flat, v_flat, params) -> scalar
    n_u: int
    proj_u: Callable  # (sets, u_flat) -> u_flat
    proj_v: Callable
    constrained: bool

    def split(self, z):
        return z[: self.n_u], z[self.n_u :]

    def grads(self, z, p):
        u, v = self.split(z)
        return jax.grad(self.fun, argnums=(0, 1))(u, v, p)

    def operator(self, z, p):
        """The monotone operator ``F = [grad_u f; -grad_v f]``."""
        gu, gv = self.grads(z, p)
        return jnp.concatenate([gu, -gv])

    def gradient(self, z, p):
        """``[grad_u f; grad_v f]`` (symmetric Jacobian: the Hessian of f)."""
        return jnp.concatenate(self.grads(z, p))

    def project(self, z, p):
        u, v = self.split(z)
        return jnp.concatenate([self.proj_u(p[2], u), self.proj_v(p[3], v)])

    def natural_residual(self, z, p):
        """``z - Proj(z - F(z))``: the optimality residual reported in ``info.residual``."""
        return z - self.project(z - self.operator(z, p), p)

    def implicit_residual(self, ridge):
        """The residual differentiated by the implicit rule (same zeros as the natural map).

        ``ridge`` adds ``ridge * diag(I_u, -I_v)`` to ``K`` (no sets; the saddle of
        ``f + ridge/2 ||u||^2 - ridge/2 ||v||^2`` linearised at the solution), or
        ``ridge * I`` to ``dF/dz`` inside the projection (with sets). The value is unchanged.
        """

        def residual(z, p):
            shift = ridge * (z - jax.lax.stop_gradient(z)) if ridge else jnp.zeros_like(z)
            if not self.constrained:
                n_v = z.shape[0] - self.n_u
                sign = jnp.concatenate([jnp.ones(self.n_u, z.dtype), -jnp.ones(n_v, z.dtype)])
                return self.gradient(z, p) + sign * shift
            return z - self.project(z - self.operator(z, p) - shift, p)

        return residual


def _norm(x):
    return jnp.sqrt(jnp.sum(x * x))


# --------------------------------------------------------------------------------------------
# Forward solvers. Each runs on flat z with the operator F, the projection and the initial
# step, and returns (z, num_steps, residual, diverged, extra).


def _secant_step(op, proj, z0, F0, step_size, factor):
    """``step_size`` if given, else ``factor / l`` with a secant curvature estimate ``l``.

    ``l = ||F(z1) - F(z0)|| / ||z1 - z0||`` with ``z1 = Proj(z0 - tau F(z0))`` a short step:
    a cheap starting value (one evaluation of ``F``) for the solvers that adapt their step.
    """
    if step_size is not None:
        return jnp.asarray(step_size, z0.dtype)
    tiny = jnp.finfo(z0.dtype).tiny
    tau = 1e-4 * (1 + _norm(z0)) / jnp.maximum(_norm(F0), tiny)
    z1 = proj(z0 - tau * F0)
    dz = _norm(z1 - z0)
    lip = _norm(op(z1) - F0) / jnp.maximum(dz, tiny)
    ok = jnp.isfinite(lip) & (dz > 0) & (lip > 0)
    return jnp.where(ok, factor / jnp.where(ok, lip, 1.0), factor).astype(z0.dtype)


def _extragradient(op, proj, z0, tol, max_iter, step_size, unrolled=False):
    """Projected extragradient with a backtracking step (Khobotov's rule).

    ``zh = P(z - eta F(z))``, ``z+ = P(z - eta F(zh))`` with ``eta`` halved until
    ``eta ||F(zh) - F(z)|| <= 0.9 ||zh - z||`` and increased by 20% after each step. The same
    step runs forward and unrolled (``eta`` held constant by the unrolled derivative).
    """
    eps = jnp.finfo(z0.dtype).eps
    F0 = op(z0)
    eta0 = jax.lax.stop_gradient(_secant_step(op, proj, z0, F0, step_size, 1.0))
    res0 = _norm(z0 - proj(z0 - F0))
    threshold = tol * (1 + res0)
    limit = DIVERGENCE_FACTOR * (1 + res0)
    eta_min = eta0 * 1e-12

    def step(state):
        z, Fz, eta, _, _ = state

        def trial(eta):
            zh = proj(z - eta * Fz)
            Fh = op(zh)
            slack = 10 * eps * eta * (_norm(Fz) + _norm(Fh))
            return eta * _norm(Fh - Fz) <= 0.9 * _norm(zh - z) + slack, (zh, Fh)

        eta, ok, (_, Fh) = loops.backtracking(trial, eta, min_step=eta_min,
                                              differentiable=unrolled)
        z_new = proj(z - eta * Fh)
        F_new = op(z_new)
        res_new = jax.lax.stop_gradient(_norm(z_new - proj(z_new - F_new)))
        finite = jnp.all(jnp.isfinite(z_new)) & jnp.all(jnp.isfinite(F_new))
        bad = ~finite | ~ok | (res_new > limit)
        z = jnp.where(finite, z_new, z)
        Fz = jnp.where(finite, F_new, Fz)
        res = jnp.where(finite, res_new, jnp.inf)
        return z, Fz, 1.2 * eta, res, bad

    def cond(state):
        return (state[3] > threshold) & ~state[4]

    state = (z0, F0, eta0, jax.lax.stop_gradient(res0), ~jnp.isfinite(res0))
    k, (z, _, eta, res, bad) = loops.iterate(step, state, cond, max_iter, unrolled)
    return z, k, res, bad & (res > threshold), eta


def _ogda(op, proj, z0, tol, max_iter, step_size, unrolled=False):
    """Optimistic GDA as forward-reflected-backward splitting, adaptive step.

    ``z+ = P(z - eta_k F(z) - eta_{k-1} (F(z) - F(z_prev)))`` with
    ``eta_k = min(1.05 eta_{k-1}, 0.45 / l_k)``, ``l_k = ||F(z) - F(z_prev)|| / ||z - z_prev||``
    the local Lipschitz estimate (Malitsky and Tam: ``eta < 1 / (2L)``). The same step runs
    forward and unrolled (the steps ``eta_k`` held constant by the unrolled derivative).
    """
    F0 = op(z0)
    eta0 = jax.lax.stop_gradient(_secant_step(op, proj, z0, F0, step_size, 0.45))
    res0 = _norm(z0 - proj(z0 - F0))
    threshold = tol * (1 + res0)
    limit = DIVERGENCE_FACTOR * (1 + res0)
    tiny = jnp.finfo(z0.dtype).tiny

    def step(state):
        z, Fz, z_prev, F_prev, eta_prev, _, _ = state
        dz, dF = jax.lax.stop_gradient((_norm(z - z_prev), _norm(Fz - F_prev)))
        local = jnp.where(dF > tiny, 0.45 * dz / jnp.maximum(dF, tiny), jnp.inf)
        eta = jnp.minimum(1.05 * eta_prev, local)
        z_new = proj(z - eta * Fz - eta_prev * (Fz - F_prev))
        F_new = op(z_new)
        res_new = jax.lax.stop_gradient(_norm(z_new - proj(z_new - F_new)))
        finite = jnp.all(jnp.isfinite(z_new)) & jnp.all(jnp.isfinite(F_new))
        bad = ~finite | (res_new > limit)
        return (
            jnp.where(finite, z_new, z),
            jnp.where(finite, F_new, Fz),
            z,
            Fz,
            eta,
            jnp.where(finite, res_new, jnp.inf),
            bad,
        )

    def cond(state):
        return (state[5] > threshold) & ~state[6]

    state = (z0, F0, z0, F0, eta0, jax.lax.stop_gradient(res0), ~jnp.isfinite(res0))
    k, (z, _, _, _, eta, res, bad) = loops.iterate(step, state, cond, max_iter, unrolled)
    return z, k, res, bad & (res > threshold), eta


def _newton(grad, z0, tol, max_iter, unrolled=False):
    """Newton on ``grad f = 0`` (no sets) with a backtracking line search on ``||grad f||``.

    The Newton direction ``d = -K^{-1} grad f`` is a descent direction of ``||grad f||^2``
    whenever ``K`` is nonsingular (``<K grad f, d> = -||grad f||^2``). Returns the Hessian
    and its LU factorisation at the final point as well. The same step runs forward and
    unrolled.
    """

    def model(z):
        hess = jax.jacfwd(grad)(z)
        return grad(z), hess, ls.factorize(hess, structure="symmetric")

    g0, hess0, fact0 = model(z0)
    res0 = _norm(g0)
    threshold = tol * (1 + res0)
    limit = DIVERGENCE_FACTOR * (1 + res0)

    def step(state):
        z, g, _, fact, _ = state
        d = -ls.solve_factorized(fact, g)
        gnorm = _norm(g)

        def trial(t):
            return _norm(grad(z + t * d)) <= (1 - 1e-4 * t) * gnorm, None

        t, ok, _ = loops.backtracking(trial, jnp.ones_like(gnorm), min_step=1e-10)
        ok = (t > 1e-10) & jnp.all(jnp.isfinite(d))
        z_new = jnp.where(ok, z + t * d, z)
        g_new, hess_new, fact_new = model(z_new)
        return z_new, g_new, hess_new, fact_new, ok

    def cond(state):
        return (_norm(state[1]) > threshold) & state[4]

    state = (z0, g0, hess0, fact0, jnp.isfinite(res0))
    k, (z, g, hess, fact, _) = loops.iterate(step, state, cond, max_iter, unrolled)
    res = _norm(g)
    return z, k, res, res > limit, hess, fact


# --------------------------------------------------------------------------------------------
# Unrolled solvers: exactly max_iter steps of the forward solver's own step.


def _unrolled(problem, z0, p, solver, tol, max_iter, step_size):
    """``solver``'s own step in a ``lax.scan`` (see ``loops.iterate``); ``(z, k, eta)``."""
    if solver == "newton":
        grad = lambda z: problem.gradient(z, p)  # noqa: E731
        z, k, *_ = _newton(grad, z0, tol, max_iter, unrolled=True)
        return z, k, None
    op = lambda z: problem.operator(z, p)  # noqa: E731
    proj = lambda z: problem.project(z, p)  # noqa: E731
    run = _extragradient if solver == "extragradient" else _ogda
    z, k, _, _, eta = run(op, proj, z0, tol, max_iter, step_size, unrolled=True)
    return z, k, eta


# --------------------------------------------------------------------------------------------
# Duality gap: best responses by accelerated projected gradient with backtracking.


def _hessian_norm(obj, x, num_iter=10):
    """Largest ``|eigenvalue|`` of the Hessian of ``obj`` at ``x`` (power iteration)."""
    hvp = lambda w: jax.jvp(jax.grad(obj), (x,), (w,))[1]  # noqa: E731
    return _norm(hvp(loops.power_iteration(hvp, loops.power_start(x), num_iter)))


def _gap(problem, z, p, num_steps, lips=None):
    """Duality-gap estimate at ``z`` (not differentiated); ``lips = (L_u, L_v)`` or None.

    Both best responses, ``max_{v'} f(u, v')`` and ``min_{u'} f(u', v)``, are computed in one
    loop by accelerated projected gradient (FISTA with step ``1/L`` and adaptive restart, as
    in O'Donoghue and Candes), evaluating ``f`` at the two points ``(u, v')`` and ``(u', v)``
    with one ``vmap``. The best value seen is kept, so each gain is never negative, and any
    (feasible, projected) iterate gives a valid lower bound even if ``L`` is underestimated.
    """
    z, p = jax.lax.stop_gradient((z, p))
    u, v = problem.split(z)
    if lips is None:
        lips = (
            _hessian_norm(lambda u_: problem.fun(u_, v, p), u),
            _hessian_norm(lambda v_: problem.fun(u, v_, p), v),
        )
    eta_u = (1.0 / jnp.maximum(lips[0], 1e-6)).astype(z.dtype)
    eta_v = (1.0 / jnp.maximum(lips[1], 1e-6)).astype(z.dtype)
    value_and_grad = jax.vmap(jax.value_and_grad(problem.fun, argnums=(0, 1)), (0, 0, None))
    values = jax.vmap(problem.fun, (0, 0, None))
    f0 = problem.fun(u, v, p)

    def project(u_, v_):
        return problem.proj_u(p[2], u_), problem.proj_v(p[3], v_)

    def step(_, state):
        # x = (u', v'), the current best responses; y = their extrapolations.
        xu, xv, yu, yv, t, fx, best = state
        _, (gu, gv) = value_and_grad(jnp.stack([u, yu]), jnp.stack([yv, v]), p)
        nu, nv = project(yu - eta_u * gu[1], yv + eta_v * gv[0])
        fv, fu = values(jnp.stack([u, nu]), jnp.stack([nv, v]), p)
        f_new = jnp.stack([fv, -fu])  # both players maximise
        better = f_new >= fx
        t_new = jnp.where(better, (1 + jnp.sqrt(1 + 4 * t * t)) / 2, 1.0)
        mom = (t - 1) / t_new
        yu_new = jnp.where(better[1], nu + mom[1] * (nu - xu), xu)
        yv_new = jnp.where(better[0], nv + mom[0] * (nv - xv), xv)
        xu = jnp.where(better[1], nu, xu)
        xv = jnp.where(better[0], nv, xv)
        best = jnp.where(f_new > best, f_new, best)  # a NaN trial never enters
        return xu, xv, yu_new, yv_new, t_new, jnp.where(better, f_new, fx), best

    start = jnp.stack([f0, -f0])
    state = (u, v, u, v, jnp.ones(2, z.dtype), start, start)
    best = vma.fori_loop(0, num_steps, step, state)[6]
    return jnp.sum(best - start)


def _dense_hessian(problem, z, p):
    """The Hessian of ``f`` in ``z = (u, v)`` (``n`` Hessian-vector products)."""
    z, p = jax.lax.stop_gradient((z, p))
    grad = lambda z_: problem.gradient(z_, p)  # noqa: E731
    eye = vma.vary_like(jnp.eye(z.shape[0], dtype=z.dtype), z)  # tangents vary like z
    return jax.vmap(lambda w: jax.jvp(grad, (z,), (w,))[1])(eye)


def _curvature(hess, n_u):
    """Check ``f_uu >= 0`` and ``f_vv <= 0`` (up to rounding) from the dense Hessian.

    Returns ``(ok, (L_u, L_v))`` with the spectral norms of the two diagonal blocks.
    """
    hess = jax.lax.stop_gradient((hess + hess.T) / 2)
    eig_u = jnp.linalg.eigvalsh(hess[:n_u, :n_u])
    eig_v = jnp.linalg.eigvalsh(hess[n_u:, n_u:])
    lip_u = jnp.maximum(-eig_u[0], eig_u[-1])
    lip_v = jnp.maximum(-eig_v[0], eig_v[-1])
    tol = 100 * jnp.sqrt(jnp.finfo(hess.dtype).eps) * (1 + jnp.maximum(lip_u, lip_v))
    return (eig_u[0] >= -tol) & (eig_v[-1] <= tol), (lip_u, lip_v)


# --------------------------------------------------------------------------------------------
# The implicit rule's adjoint solve.


def _adjoint_solve(method: str, structure: str, use_fact: bool, report: bool = False):
    """The transposed saddle-point solve; NaN when an iterative solve does not converge."""

    def adjoint_solve(vjp_z, zbar, z, p, aux):
        fact = aux.extra
        if use_fact and fact is not None:
            return ls.solve_factorized(fact, zbar, transpose=True)
        sol = ls.linear_solve(vjp_z, zbar, method=method, structure=structure)
        return ls.solution_or_nan(sol, report=report, what="saddle_point adjoint solve")

    return adjoint_solve


# --------------------------------------------------------------------------------------------
# The public entry points.


def saddle_point(
    f: Callable,
    u0: PyTree,
    v0: PyTree,
    theta: PyTree,
    *,
    u_set: PyTree = None,
    v_set: PyTree = None,
    solver: str = "auto",
    hypergrad: str = "implicit",
    linear_solver: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
    step_size: float | None = None,
    ridge: float = 0.0,
    gap_steps: int = 30,
    throw: bool = False,
) -> SaddleSolution:
    r"""Solve ``min_{u in U} max_{v in V} f(u, v, theta)`` with differentiable saddle point.

    Finds ``z* = (u*, v*)`` with ``f(u*, v) <= f(u*, v*) <= f(u, v*)`` for all ``u in U``,
    ``v in V``, i.e. a zero of the natural residual ``r(z) = z - Proj(z - F(z))`` of the
    monotone operator ``F = [grad_u f; -grad_v f]``, and makes ``(u*, v*)`` differentiable in
    reverse mode with respect to ``theta``, to every array that ``f`` closes over, and to the
    data of the sets (e.g. a box bound).

    Implicit rule (docs ``lower/minimax.md``). Without sets the residual is ``grad f(z) = 0`` and
    ``K = [[f_uu, f_uv], [f_vu, f_vv]]`` is symmetric indefinite (``f_uu > 0``, ``f_vv < 0``
    make it nonsingular); the adjoint ``K w = (ubar, vbar)`` gives
    ``thetabar = -d/dtheta <w, grad f(z*, theta)>``. With sets the natural residual is
    differentiated: with ``D`` the Jacobian of the projection at ``z* - F(z*)`` (the 0/1 mask
    of the inactive coordinates for a box, the tangent projector of the active face for a
    simplex) and ``J = dF/dz``, solve ``(I - D (I - J))^T w = zbar`` and return
    ``-(dr/dtheta)^T w``. Its inactive rows are the saddle system restricted to the free
    coordinates, its active rows pin the coordinate to the bound, so the result is the
    derivative of the solution map with the active set held fixed.

    Assumptions: ``f`` twice differentiable, convex in ``u``, concave in ``v``; for the
    implicit rule, the (restricted) saddle matrix is nonsingular, e.g. ``f`` strongly
    convex–strongly concave, or a bilinear coupling of full rank (as in a Lagrangian), and
    strict complementarity at active bounds (a weakly active bound is treated as inactive).
    Failures are reported in ``info.status``: ``MAX_STEPS`` (with the residual reached),
    ``NONFINITE`` (an ``inf``/``nan`` input or iterate) and ``DIVERGED``: the residual grew
    by a factor ``1e6`` (a direction of non-convexity in ``u`` or non-concavity in ``v``
    drives the first-order iterates away), the extragradient step collapsed, or, for Newton
    (which converges to any stationary point), its final Hessian has ``f_uu`` with a
    negative or ``f_vv`` with a positive eigenvalue: ``f`` is not convex–concave there. A
    non-convex–concave problem therefore stops with ``DIVERGED``; it does not hang. (A
    first-order solver started exactly at a stationary point of such an ``f`` reports
    ``SUCCESS``: it never moves.) An empty set (``Box`` with ``lo > hi``, ``Simplex`` with a
    negative budget, ``Ball`` with a negative radius, an inconsistent ``Affine``) is a
    ``ValueError`` when its data are concrete and ``INFEASIBLE`` (with NaN outputs: there
    is no point to return) when traced.

    Failure policy (as for every entry point, see :class:`Status`): with a status other than
    ``SUCCESS`` every cotangent is NaN (per problem under ``jax.vmap``); ``NONFINITE`` also
    makes ``u`` and ``v`` NaN, and ``MAX_STEPS`` / ``DIVERGED`` return the last iterate.
    ``hypergrad="unrolled"`` differentiates the steps it ran whatever the status.

    Cost: extragradient and OGDA use gradients of ``f`` only (two, resp. one, per step;
    linear convergence for strongly convex–strongly concave ``f``, ``O(1/k)`` for the
    residual otherwise); Newton forms the ``n x n`` Hessian. The implicit rule materialises
    the ``n x n`` system when ``n <= 1000`` (``linear_solver="auto"``), else runs MINRES
    (no sets) or GMRES. The duality gap costs ``2 * gap_steps`` projected-gradient steps.
    Under ``jax.vmap`` a ``while_loop`` runs until the slowest member of the batch has
    converged; ``hypergrad="unrolled"`` runs the same steps in a ``lax.scan`` of
    ``max_iter`` steps, those after convergence masked (each paid, none changing ``z``).

    Args:
      f: ``f(u, v, theta) -> scalar``. May close over arrays: they receive gradients too
        (closure conversion).
      u0: warm start of the minimising player, a pytree of float arrays. No gradient.
      v0: warm start of the maximising player, a pytree of float arrays. No gradient.
      theta: the parameters, any pytree.
      u_set: the set ``U``: ``None`` (unconstrained), a set such as ``Box(lo, hi)``,
        ``NonNegative()``, ``Simplex(total)``, ``Ball(radius)``, ``Halfspace(a, b)``,
        ``Affine(A, b)`` (applied to the whole of ``u``; a single array keeps its shape, a
        larger pytree is flattened), or a container of sets and ``None`` matching a prefix of
        ``u0``'s structure. Set data may be traced and receive gradients.
      v_set: the set ``V``, as ``u_set``.
      solver: ``"extragradient"``, ``"ogda"``, ``"newton"`` (no sets only) or ``"auto"``
        (Newton when there are no sets and ``n <= NEWTON_MAX_SIZE`` (500), else
        extragradient).
      hypergrad: ``"implicit"`` or ``"unrolled"``.
      linear_solver: the backward solve of the implicit rule: ``"auto"`` (reuse Newton's LU
        factorisation, else dense LU when ``n <= 1000``, else MINRES without sets or GMRES
        with sets), ``"dense"``/``"lu"``, ``"minres"`` (no sets only: it needs the symmetric
        system), ``"gmres"`` or ``"normal_cg"``.
      tol: relative tolerance: stop when ``residual <= tol * (1 + residual at z0)``
        (default 1e-10 in float64, 1e-5 in float32).
      max_iter: iteration limit (default 50 Newton, 10000 extragradient, 20000 OGDA
        steps; unrolled: 20 Newton, 500 extragradient or 1000 OGDA steps).
      step_size: initial step of extragradient and OGDA (default ``1/l`` and ``0.45/l`` with
        ``l`` a secant estimate of the Lipschitz constant of ``F`` at ``z0``); the steps then
        adapt (backtracking, resp. local Lipschitz estimates), in the unrolled rule too
        (which holds the chosen steps constant when it differentiates).
      ridge: ``ridge >= 0`` added to the backward system: the hypergradient is then that of
        ``f + ridge/2 ||u||^2 - ridge/2 ||v||^2`` linearised at the solution.
      gap_steps: inner steps per player of the duality-gap estimate in ``info.gap``.
      throw: raise :class:`SolveError` if the status is not ``SUCCESS``; under ``jax.jit``
        it arrives as the ``jax.errors.JaxRuntimeError`` that ``SolveError`` subclasses.
        Off by default so that sweeps report failures through the status (see
        :class:`SolveError`); with ``throw`` a backward linear solve that does not
        converge also prints a message (its cotangents are NaN).

    Returns:
      A :class:`SaddleSolution` ``(u, v, info)``; ``info`` is a :class:`SaddleInfo`, the
      fields of :class:`Info` followed by the duality ``gap``.

    Raises:
      ValueError, TypeError: at trace time, for bad options, shapes or sets (naming the
        argument), or sets that are empty with concrete data.
      SolveError: with ``throw=True``, on a failed status.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> def g(y1, y2, x):  # y1* = -x/6, y2* = -2x/3
      ...     return y1**2 + y1 * y2 - 0.5 * y2**2 + x * y1 - 0.5 * x * y2
      >>> sol = bj.saddle_point(g, 0.0, 0.0, 1.0)
      >>> dy1 = jax.grad(lambda x: bj.saddle_point(g, 0.0, 0.0, x).u)(1.0)  # -1/6

    References:
      Korpelevich. The extragradient method for finding saddle points and other problems.
      Matecon 12, 1976. Khobotov. Modification of the extra-gradient method for solving
      variational inequalities. USSR Comput. Math. Math. Phys. 27, 1987. Malitsky, Tam. A
      forward-backward splitting method for monotone inclusions without cocoercivity. SIAM
      J. Optim. 30, 2020.
    """
    check_option("solver", solver, SOLVERS)
    check_option("hypergrad", hypergrad, HYPERGRADS)
    check_option("linear_solver", linear_solver, LINEAR_SOLVERS)
    _check_common(tol, max_iter, step_size, ridge)
    if not isinstance(gap_steps, int) or isinstance(gap_steps, bool) or gap_steps < 1:
        raise ValueError(f"gap_steps must be a positive integer, got {gap_steps!r}.")

    u_flat0, unravel_u = flatten_variables("u0", u0)
    v_flat0, unravel_v = flatten_variables("v0", v0)
    dtype = jnp.result_type(u_flat0, v_flat0)
    check_scalar_output(f, (u0, v0, theta), "f(u0, v0, theta)", "f(u, v, theta)")
    check_set(u_set, u0, "u_set", "u0")
    check_set(v_set, v0, "v_set", "v0")
    check_set_data(u_set, "u_set")
    check_set_data(v_set, "v_set")
    constrained = u_set is not None or v_set is not None
    n_u = u_flat0.shape[0]
    n = n_u + v_flat0.shape[0]
    if solver == "newton" and constrained:
        raise ValueError(
            "solver='newton' handles unconstrained saddles only; with u_set/v_set use "
            "solver='extragradient' or 'ogda'."
        )
    if linear_solver == "minres" and constrained:
        raise ValueError(
            "linear_solver='minres' needs the symmetric system of an unconstrained saddle; "
            "with u_set/v_set use 'auto', 'lu', 'gmres' or 'normal_cg'."
        )
    if solver == "auto":
        solver = "newton" if (not constrained and n <= NEWTON_MAX_SIZE) else "extragradient"
    tol = default_tol(dtype) if tol is None else tol
    if max_iter is None:
        if hypergrad == "unrolled":
            max_iter = {"newton": 20, "extragradient": 500, "ogda": 1000}[solver]
        else:
            max_iter = {"newton": 50, "extragradient": 10000, "ogda": 20000}[solver]

    # Compiled once per (function, options, shapes, dtypes): eager calls reuse it (the
    # converted function is cached by jax.closure_convert per function and argument types).
    f_conv, f_consts = vma.closure_convert(f, u0, v0, theta)
    options = _Options(solver, hypergrad, linear_solver, float(tol), int(max_iter),
                       None if step_size is None else float(step_size), float(ridge),
                       int(gap_steps), bool(throw))
    u, v, info = _solve(f_conv, options, u0, v0, theta, tuple(f_consts), u_set, v_set)
    check_info(info, throw)
    return SaddleSolution(unravel_u(u), unravel_v(v), info)


class _Options(NamedTuple):
    """The static options of one :func:`saddle_point` solve (the compilation-cache key)."""

    solver: str
    hypergrad: str
    linear_solver: str
    tol: float
    max_iter: int
    step_size: float | None
    ridge: float
    gap_steps: int
    throw: bool


def _solve_traced(f_conv, options: _Options, u0, v0, theta, f_consts, u_set, v_set):
    """Build the problem and run the rule; jitted per function, options, shapes and dtypes."""
    solver, hypergrad, linear_solver, tol, max_iter, step_size, ridge, gap_steps, throw = options
    u_flat0, unravel_u = ravel_pytree(u0)
    v_flat0, unravel_v = ravel_pytree(v0)
    dtype = jnp.result_type(u_flat0, v_flat0)
    constrained = u_set is not None or v_set is not None
    n_u = u_flat0.shape[0]
    params = (theta, f_consts, cast_sets(u_set, dtype), cast_sets(v_set, dtype))
    problem = _Problem(
        lambda uf, vf, p: f_conv(unravel_u(uf), unravel_v(vf), p[0], *p[1]),
        n_u,
        flat_projector(u_set, unravel_u),
        flat_projector(v_set, unravel_v),
        constrained,
    )
    z0 = jax.lax.stop_gradient(jnp.concatenate([u_flat0, v_flat0]).astype(dtype))
    # Inside shard_map: one uniformly per-device problem (see vma.py); the identity elsewhere.
    params = vma.vary_like(params, params, z0)
    z0 = vma.vary_like(z0, params)

    if hypergrad == "implicit":

        def solve(z_start, p):
            z_start = problem.project(z_start, p)
            if solver == "newton":
                grad = lambda z: problem.gradient(z, p)  # noqa: E731
                z, k, res, diverged, hess, fact = _newton(grad, z_start, tol, max_iter)
                extra = (hess, None)
            else:
                op = lambda z: problem.operator(z, p)  # noqa: E731
                proj = lambda z: problem.project(z, p)  # noqa: E731
                run = _extragradient if solver == "extragradient" else _ogda
                z, k, res, diverged, eta = run(op, proj, z_start, tol, max_iter, step_size)
                extra, fact = (None, eta), None
            res0 = _norm(problem.natural_residual(z_start, p))
            stats = (k, res, res0, diverged)
            info = _make_info(problem, z, stats, tol, (z_start, p[:2]), p, gap_steps, extra)
            # NONFINITE data or iterates: NaN outputs (the policy of types.Status).
            z = jnp.where(info.status == Status.NONFINITE, jnp.nan, z).astype(z.dtype)
            return z, SolveAux(info, fact)

        structure = "general" if constrained else "symmetric"
        use_fact = solver == "newton" and linear_solver == "auto" and not ridge
        z, aux = implicit_solution(
            solve,
            problem.implicit_residual(ridge),
            _adjoint_solve(linear_solver, structure, use_fact, throw),
            z0,
            params,
        )
        info = aux.info
    else:
        # The unrolled rule differentiates the steps it ran, whatever the status.
        z_start = problem.project(z0, params)
        z, k, eta = _unrolled(problem, z_start, params, solver, tol, max_iter, step_size)
        res = _norm(problem.natural_residual(z, params))
        res0 = _norm(problem.natural_residual(z_start, params))
        stats = (k, res, res0, res > DIVERGENCE_FACTOR * (1 + res0))
        info = _make_info(problem, z, stats, tol, (z0, params[:2]), params, gap_steps,
                          (None, eta))
    u, v = problem.split(z)
    return u, v, info




_solve = vma.jit_when_eager(_solve_traced, static_argnums=(0, 1))


def _make_info(problem, z, stats, tol, inputs, params, gap_steps, extra):
    """Status, residual and gap. ``extra = (hessian, step)`` from the solver.

    Newton's final Hessian gives the convex–concave curvature check and the gap's step
    sizes; first-order solvers give their final step ``eta ~ 1/L`` (non-convex–concave
    directions then show up as residual growth). Unrolled Newton forms the Hessian here.
    """
    k, res, res0, diverged = jax.lax.stop_gradient(stats)
    hess, eta = jax.lax.stop_gradient(extra)
    if hess is None and eta is None and z.shape[0] <= 2 * CURVATURE_CHECK_MAX_SIZE:
        hess = _dense_hessian(problem, z, params)
    if hess is not None:
        curvature_ok, lips = _curvature(hess, problem.n_u)
    else:
        curvature_ok = jnp.asarray(True)
        # The solvers return their next trial step, 1.2x the last accepted one.
        lips = None if eta is None else (1.2 / eta, 1.2 / eta)
    conv = res <= tol * (1 + res0)
    finite = tree_all_finite((jax.lax.stop_gradient(z), res, inputs))
    status = jnp.where(conv, Status.SUCCESS, Status.MAX_STEPS)
    status = jnp.where(diverged | ~curvature_ok, Status.DIVERGED, status)
    status = jnp.where(finite, status, Status.NONFINITE)
    # An empty set (traced data; concrete data raised at trace time): NaN projections, and no
    # saddle point to find.
    empty = sets_empty(params[2]) | sets_empty(params[3])
    status = jnp.where(empty, Status.INFEASIBLE, status)
    gap = jnp.where(finite & ~empty, _gap(problem, z, params, gap_steps, lips), jnp.inf)
    return SaddleInfo(
        jnp.asarray(k, jnp.int32),
        jnp.asarray(res),
        jnp.asarray(conv & finite & curvature_ok & ~diverged & ~empty, bool),
        jnp.asarray(status, jnp.int32),
        jnp.asarray(gap),
    )


def duality_gap(
    f: Callable,
    u: PyTree,
    v: PyTree,
    theta: PyTree,
    *,
    u_set: PyTree = None,
    v_set: PyTree = None,
    num_steps: int = 30,
) -> Array:
    r"""The duality gap ``max_{v' in V} f(u, v', theta) - min_{u' in U} f(u', v, theta)``.

    For convex–concave ``f`` the gap is ``>= 0`` and vanishes exactly at saddle points; it
    bounds the suboptimality of both players. The two inner problems are solved by
    ``num_steps`` steps of accelerated projected gradient (FISTA with step ``1/L``, ``L`` the
    norm of the block Hessian at the point, and adaptive restart) from ``v`` and from ``u``,
    keeping the best value seen, so the result
    is a lower bound on the exact gap that is never negative, is zero (up to rounding) at a
    saddle point, and converges to the exact gap (linearly for strongly convex–concave
    ``f``; exact in a few steps for separable quadratics). It is ``inf`` or very large when
    ``f`` is unbounded above in ``v`` or below in ``u`` over the sets.

    Not differentiable (it runs loops); use it as a certificate.

    Args:
      f: ``f(u, v, theta) -> scalar``, convex in ``u``, concave in ``v``.
      u: the minimising player's point (pytree).
      v: the maximising player's point (pytree).
      theta: parameters of ``f``.
      u_set: the set ``U`` (see :func:`saddle_point`).
      v_set: the set ``V``.
      num_steps: inner steps per player.

    Returns:
      A nonnegative scalar.

    Examples:
      >>> import jax.numpy as jnp
      >>> f = lambda u, v, th: u**2 + u * v - 0.5 * v**2  # saddle at (0, 0)
      >>> gap = duality_gap(f, 1.0, 0.0, None)  # max_v (1 + v - v^2/2) - min_u (u^2) = 1.5
    """
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}.")
    u_flat, unravel_u = flatten_variables("u", u)
    v_flat, unravel_v = flatten_variables("v", v)
    dtype = jnp.result_type(u_flat, v_flat)
    check_set(u_set, u, "u_set", "u")
    check_set(v_set, v, "v_set", "v")
    params = (theta, (), cast_sets(u_set, dtype), cast_sets(v_set, dtype))
    problem = _Problem(
        lambda uf, vf, p: f(unravel_u(uf), unravel_v(vf), p[0]),
        u_flat.shape[0],
        flat_projector(u_set, unravel_u),
        flat_projector(v_set, unravel_v),
        u_set is not None or v_set is not None,
    )
    z = jnp.concatenate([u_flat, v_flat]).astype(dtype)
    lips = None
    if z.shape[0] <= 2 * CURVATURE_CHECK_MAX_SIZE:
        lips = _curvature(_dense_hessian(problem, z, params), problem.n_u)[1]
    return _gap(problem, z, params, num_steps, lips)


# --------------------------------------------------------------------------------------------
# Trace-time validation.


def _check_common(tol, max_iter, step_size, ridge):
    if tol is not None and not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}.")
    if max_iter is not None and (
        not isinstance(max_iter, int) or isinstance(max_iter, bool) or max_iter < 1
    ):
        raise ValueError(f"max_iter must be a positive integer, got {max_iter!r}.")
    if step_size is not None and not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size}.")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge}.")


