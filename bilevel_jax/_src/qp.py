"""``solve_qp``: dense convex QPs with exact, relaxed and first-order (penalty) hypergradients.

The problem (convention: ``A y = b`` equalities, ``G y <= h`` inequalities) is

    min_y  1/2 y'Qy + c'y    s.t.   A y = b ,   G y <= h ,

with ``Q`` positive semidefinite and the objective strictly convex on the feasible set. Its
KKT conditions, with multipliers ``nu`` (free) and ``lam >= 0``, are

    Q y + c + A'nu + G'lam = 0 ,   A y = b ,   G y <= h ,   lam >= 0 ,   lam_i (h - G y)_i = 0 .

Forward: a homogeneous self-dual primal-dual interior-point method (Mehrotra
predictor-corrector) on the slack form ``G y + s = h``, ``s >= 0``, run on a copy of the
problem equilibrated by Ruiz's iteration (rows and columns of ``[Q, C'; C, 0]`` brought to
unit max-norm, plus a cost scale). The homogeneous embedding detects infeasible and unbounded
problems by certificates instead of iterating to the step limit. ``Q + delta I`` is factorised
once (Cholesky; ``delta`` at rounding level, or ``sqrt(eps)`` relative when ``Q`` is singular
or nearly so, as in LPs, with iterative refinement against the exact matrix) and the Newton
matrix ``[Q, A', G'; A, 0, 0; G, 0, -diag(s / lam)]`` is solved through its Schur complement on
the constraints, ``C Q^-1 C' + diag(0, s / lam)`` (``C = [A; G]``): one Cholesky factorisation
of size ``p + k`` per iteration, shared by the three solves of an iteration. Then a *polish*
step solves the equality KKT system on the identified active set (a few primal-dual
active-set corrections if the first guess is infeasible), which makes ``(y, nu, lam)`` exact
to rounding and inactive multipliers exactly 0. Stopping tests, statuses and
``info.residual`` are measured on the original (unscaled) data.

Hypergradients (reverse mode, with respect to all of ``Q, c, A, b, G, h``):

* ``"implicit"``: the implicit function theorem on the active-set KKT residual in the
  static-shape masked form (docs ``lower/qp.md``, "Implicit"),

      r(y, nu, lam) = [ Q y + c + A'nu + G'(m * lam) ;  A y - b ;  m * (G y - h) - (1 - m) * lam ],

  whose Jacobian is the symmetric matrix ``K = [Q, A', G'M; A, 0, 0; MG, 0, -(I - M)]``;
  the adjoint solve factorises ``K`` with ``-ridge`` on the multiplier diagonal (rows with
  ``m_i = 1`` and the equalities) and refines on ``K`` itself (the minimum-norm multipliers
  where the active rows are dependent).
  This gives the OptNet formulas on the active set (``cbar = -w``,
  ``Qbar = -(w y' + y w')/2``, ``hbar_I = mu_I``, ``Gbar_I = -(lam_I w' + mu_I y')``, ...).
* ``"relaxed"``: the same theorem on the log-barrier (central path) KKT system
  ``lam_i (h - G y)_i = mu`` at a fixed ``mu`` (as qpax does): a smooth, informative derivative
  at active constraints, biased by ``O(mu)``.
* ``"penalty"``: the first-order oracle of Kornowski et al. (VJP form),
  one SPD solve with ``Q + alpha^-2 C_I'C_I`` (``C_I`` the equalities and active rows), error
  ``O(alpha^2)`` on QPs.

:func:`active_set_adjoint` is the masked active-set KKT adjoint solve on its own (given
Hessian-vector products), for reuse by other solution maps with inequality constraints.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilevel_jax._src import kkt, sparse_linalg, vma
from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src.implicit import custom_solution, implicit_backward
from bilevel_jax._src.sparse_linalg import SparseMatrix
from bilevel_jax._src.types import (
    Array,
    ArrayLike,
    Info,
    Status,
    check_info,
    make_info,
)
from bilevel_jax._src.validation import raise_if_crossed

__all__ = ["HYPERGRADS", "QPSolution", "active_set_adjoint", "default_options", "solve_qp"]

HYPERGRADS = ("implicit", "relaxed", "penalty")
ADJOINT_METHODS = ("auto", "dense", "minres")

_HI = lax.Precision.HIGHEST


def _mm(M, x):
    """``M x`` for a dense matrix or a :class:`SparseMatrix`."""
    return M @ x if isinstance(M, SparseMatrix) else jnp.matmul(M, x, precision=_HI)


# Dense and sparse data. ``solve_qp_sparse(method="direct")`` runs this module's interior
# point, polish and adjoint with ``Q``, ``A``, ``G`` as :class:`SparseMatrix` (its KKT
# matrices factorised by :mod:`bilevel_jax._src.sparse_linalg`); these helpers are the only
# places where the two kinds of data differ outside the linear solves.


def _abs_max(M, r, c):
    """Row and column max-norms of ``diag(r) |M| diag(c)``."""
    if isinstance(M, SparseMatrix):
        return M.abs_max(r, c)
    a = jnp.abs(M) * r[:, None] * c[None, :]
    return jnp.max(a, axis=1, initial=0), jnp.max(a, axis=0, initial=0)


def _row_norms(M):
    return _abs_max(M, jnp.ones((M.shape[0],), M.dtype), jnp.ones((M.shape[1],), M.dtype))[0]


def _scale_matrix(M, r, c):
    """``diag(r) M diag(c)``."""
    if isinstance(M, SparseMatrix):
        return M.scale(r, c)
    return M * jnp.outer(r, c)


def _stack(A, G):
    return A.vstack(G) if isinstance(A, SparseMatrix) else jnp.concatenate([A, G])


def _all_finite(M):
    return jnp.all(jnp.isfinite(M.data if isinstance(M, SparseMatrix) else M))


class QPSolution(NamedTuple):
    """Solution of :func:`solve_qp`.

    Attributes:
      y: the minimiser, shape ``(n,)``.
      nu: multipliers of ``A y = b``, shape ``(p,)`` (``(0,)`` without ``A``).
      lam: multipliers of ``G y <= h``, ``>= 0``, shape ``(k,)`` (``(0,)`` without ``G``);
        exactly 0 for rows with ``h_i = +inf`` and, after a successful polish, for inactive rows.
      info: an :class:`~bilevel_jax.Info`; ``info.residual`` is the largest relative KKT
        residual (primal, dual, complementarity) at the returned point.
    """

    y: Array
    nu: Array
    lam: Array
    info: Info


def default_options(dtype) -> dict:
    """Defaults of the numerical options of :func:`solve_qp` for a floating dtype.

    Args:
      dtype: the floating dtype of the problem data.

    Returns:
      A dict with ``tol`` (1e-10 in float64, 1e-5 in float32: the float32 iteration stalls
      near 3e-6 on moderately conditioned problems, and the polish makes the active-set
      solution exact anyway), ``ridge`` (1e-12 / 1e-6),
      ``alpha`` (1e-3 / 2e-2, about ``eps^(1/4)``, which balances the ``O(alpha^2)`` bias of
      the penalty rule against its ``O(eps / alpha^2)`` rounding error), ``mu`` (1e-3) and
      ``max_iter`` (50).
    """
    wide = jnp.finfo(dtype).bits >= 64
    return {
        "tol": kkt.default_tol(dtype),
        "ridge": 1e-12 if wide else 1e-6,
        "alpha": 1e-3 if wide else 2e-2,
        "mu": 1e-3,
        "max_iter": 50,
    }


# --------------------------------------------------------------------------------------------
# Problem data. Absent blocks are zero-row arrays; rows with h_i = +inf are "valid = False":
# they are masked out of every iteration and of every backward system.


class _QP(NamedTuple):
    Q: Array
    c: Array
    A: Array
    b: Array
    G: Array
    h: Array


def _valid(h):
    """Rows that are real constraints: ``h_i`` finite (``+inf`` = no constraint)."""
    return jnp.isfinite(h)


def _safe_h(h):
    """``h`` with non-finite entries replaced by 0 (those rows are masked everywhere)."""
    return jnp.where(jnp.isfinite(h), h, jnp.zeros_like(h))


def _sym(Q):
    return Q.sym() if isinstance(Q, SparseMatrix) else 0.5 * (Q + Q.T)


def _kkt_matrix(Qs, A, G, m, eps):
    """The static-shape masked KKT matrix with ``-eps`` on the multiplier diagonal.

    ``[[Qs, A', G'M], [A, -eps I, 0], [MG, 0, -(I - M) - eps M]]`` with ``M = diag(m)``.
    """
    p, k = A.shape[0], G.shape[0]
    mf = m.astype(Qs.dtype)
    GM = G * mf[:, None]
    top = jnp.concatenate([Qs, A.T, GM.T], axis=1)
    mid = jnp.concatenate(
        [A, -eps * jnp.eye(p, dtype=Qs.dtype), jnp.zeros((p, k), Qs.dtype)], axis=1
    )
    low = jnp.concatenate([GM, jnp.zeros((k, p), Qs.dtype), jnp.diag(-(1 - mf) - eps * mf)], axis=1)
    return jnp.concatenate([top, mid, low], axis=0)


# --------------------------------------------------------------------------------------------
# The reusable helper: masked active-set KKT adjoint solve.


def active_set_adjoint(
    hvp,
    v: ArrayLike,
    G: ArrayLike,
    mask: ArrayLike,
    *,
    A: ArrayLike | None = None,
    rhs_eq: ArrayLike | None = None,
    rhs_ineq: ArrayLike | None = None,
    ridge: float = 0.0,
    method: str = "auto",
    tol: float | None = None,
    max_iter: int | None = None,
):
    r"""Solve the static-shape masked active-set KKT system (docs ``lower/qp.md``).

    With ``M = diag(mask)`` and ``eps = ridge``, solves

    .. math::
        \begin{bmatrix} H & A^T & G^T M \\ A & -\epsilon I & 0 \\
        M G & 0 & -(I - M) - \epsilon M \end{bmatrix}
        \begin{bmatrix} w \\ \mu_E \\ \mu_I \end{bmatrix} =
        \begin{bmatrix} v \\ r_E \\ r_I \end{bmatrix},

    the transposed (symmetric) Jacobian of the residual
    ``[grad_y L + A'nu + G'(m * lam); A y - b; m * (G y - h) - (1 - m) * lam]``. With
    ``r_E = r_I = 0`` this is ``w = argmin 1/2 w'Hw - v'w s.t. A w = 0, G_I w = 0`` and
    ``mu_I`` its active multipliers; ``mu_i = -r_I[i]`` on inactive rows. The hypergradient of
    any parameter ``theta`` of the residual is then ``-d/dtheta <(w, mu_E, mu_I), r>``.

    ``ridge > 0`` makes the matrix symmetric quasi-definite when ``H`` is positive definite
    (so LU without breakdown and MINRES apply) and gives finite ``(w, mu)`` when the active
    rows are linearly dependent (LICQ fails): ``w`` is then still exact up to ``O(ridge)``
    and ``mu`` is the regularised (minimum-norm-like) multiplier.

    Args:
      hvp: ``hvp(w) -> H w`` on shape ``(n,)``, ``H`` symmetric (the Hessian of the
        Lagrangian in ``y``).
      v: the cotangent of ``y``, shape ``(n,)``.
      G: inequality matrix, shape ``(k, n)``.
      mask: boolean ``(k,)``, ``True`` for active rows.
      A: optional equality matrix, shape ``(p, n)``.
      rhs_eq: cotangent of the equality multipliers (default 0), shape ``(p,)``.
      rhs_ineq: cotangent of the inequality multipliers (default 0), shape ``(k,)``.
      ridge: ``eps >= 0`` on the multiplier diagonal of active and equality rows.
      method: ``"dense"`` (materialise ``H`` with ``n`` Hessian-vector products, LU),
        ``"minres"`` (matrix-free; needs ``ridge > 0`` or a nonsingular system) or ``"auto"``
        (dense when ``n + p + k <= linear_solve.DENSE_MAX_SIZE``, else MINRES).
      tol: MINRES relative tolerance (default by dtype).
      max_iter: MINRES iteration limit.

    Returns:
      ``(w, mu_eq, mu_ineq)`` with shapes ``(n,)``, ``(p,)``, ``(k,)``.

    Raises:
      ValueError: on an unknown ``method`` or inconsistent shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> H = jnp.eye(2); G = jnp.array([[1.0, 0.0], [0.0, 1.0]])
      >>> w, mu_e, mu_i = active_set_adjoint(lambda x: H @ x, jnp.ones(2), G,
      ...                                    jnp.array([True, False]))
      >>> w  # the first coordinate is pinned by the active row
      Array([0., 1.], dtype=float32)

    References:
      Amos and Kolter. OptNet: Differentiable Optimization as a Layer in Neural Networks.
      ICML 2017. Khanduri et al. Linearly Constrained Bilevel Optimization: A Smoothed
      Implicit Gradient Approach. ICML 2023 (Lemma 2).
    """
    if method not in ADJOINT_METHODS:
        raise ValueError(f"method must be one of {ADJOINT_METHODS}, got {method!r}.")
    v = jnp.asarray(v)
    dtype = v.dtype
    n = v.shape[0]
    G = jnp.asarray(G, dtype).reshape(-1, n)
    k = G.shape[0]
    A = jnp.zeros((0, n), dtype) if A is None else jnp.asarray(A, dtype)
    p = A.shape[0]
    if A.ndim != 2 or A.shape[1] != n:
        raise ValueError(f"A has shape {A.shape} but v has {n} entries.")
    mask = jnp.asarray(mask, bool)
    if mask.shape != (k,):
        raise ValueError(f"mask has shape {mask.shape} but G has {k} rows.")
    rhs_eq = jnp.zeros((p,), dtype) if rhs_eq is None else jnp.asarray(rhs_eq, dtype)
    rhs_ineq = jnp.zeros((k,), dtype) if rhs_ineq is None else jnp.asarray(rhs_ineq, dtype)
    rhs = jnp.concatenate([v, rhs_eq, rhs_ineq])
    size = n + p + k
    if method == "auto":
        method = "dense" if size <= ls.DENSE_MAX_SIZE else "minres"
    mf = mask.astype(dtype)
    if method == "dense":
        H = ls.materialize(hvp, n, dtype)
        K = _kkt_matrix(0.5 * (H + H.T), A, G, mask, jnp.asarray(ridge, dtype))
        u = ls.solve_factorized(ls.factorize(K, structure="general"), rhs)
    else:

        def matvec(u):
            w, me, mi = u[:n], u[n : n + p], u[n + p :]
            top = hvp(w) + _mm(A.T, me) + _mm(G.T, mf * mi)
            mid = _mm(A, w) - ridge * me
            low = mf * _mm(G, w) - (1 - mf) * mi - ridge * mf * mi
            return jnp.concatenate([top, mid, low])

        u = ls.solution_or_nan(
            ls.solve_minres(matvec, rhs, tol=tol, max_iter=max_iter),
            what="solve_qp adjoint (MINRES) solve",
        )
    return u[:n], u[n : n + p], u[n + p :]


# --------------------------------------------------------------------------------------------
# Measures of a point: the single source of truth for the stopping test, the polish, the status
# and ``info.residual``.


def _amaxes(*xs):
    """``max |x|`` of each argument (0 for empty ones)."""
    return tuple(
        jnp.max(jnp.abs(x.data if isinstance(x, SparseMatrix) else x), initial=0)
        if x.size else jnp.zeros((), x.dtype) for x in xs)


class _Scales(NamedTuple):
    """``max |.|`` of the data (``h`` over the finite rows), computed once per solve."""

    Q: Array
    c: Array
    A: Array
    b: Array
    G: Array
    h: Array


class _Measure(NamedTuple):
    residual: Array  # largest relative KKT residual: primal, dual, complementarity, lam < 0
    pinf: Array  # a primal infeasibility (Farkas) certificate was found
    dinf: Array  # a dual infeasibility (unbounded ray) certificate was found


def _measure(qp: _QP, sc: _Scales, y, nu, lam, s, valid, eps_inf):
    """Relative KKT residuals at ``(y, nu, lam)`` with slack ``s`` and infeasibility tests.

    Primal ``max(|A y - b|, |G y + s - h|) / (1 + max(|b|, |h|, |A y|, |G y|))``, dual
    ``|Q y + c + A'nu + G'lam| / (1 + max(|c|, |Q y|, |A'nu|, |G'lam|))``, complementarity
    ``sum lam * s / (1 + |objective|)`` (all max-norms). The iterate is a Farkas certificate
    when ``|A'nu + G'lam| <= eps |(A, G)| |(nu, lam)|`` and ``b'nu + h'lam < 0`` (relative),
    and an unbounded ray when ``Q y``, ``A y``, ``max(G y)`` are ``<= eps |y|`` (relative) and
    ``c'y < 0``: diverging interior-point iterates become such certificates.
    """
    Q, c, A, b, G, h = qp
    vf = valid.astype(y.dtype)
    lam = vf * lam
    Qy, Ay, Gy = _mm(Q, y), _mm(A, y), vf * _mm(G, y)
    Atnu, Gtlam = _mm(A.T, nu), _mm(G.T, lam)
    farkas = Atnu + Gtlam
    rd, rp, ri = Qy + c + farkas, Ay - b, vf * (Gy + s - h)
    norms = _amaxes(rp, ri, Ay, Gy, rd, Qy, Atnu, Gtlam, nu, lam, farkas, y, jnp.minimum(lam, 0))
    rp_, ri_, Ay_, Gy_, rd_, Qy_, Atnu_, Gtlam_, nu_, lam_, farkas_, y_, neg_ = norms
    cy = jnp.dot(c, y, precision=_HI)
    obj = 0.5 * jnp.dot(y, Qy, precision=_HI) + cy
    primal = jnp.maximum(rp_, ri_) / (1 + jnp.max(jnp.stack([sc.b, sc.h, Ay_, Gy_])))
    dual = rd_ / (1 + jnp.max(jnp.stack([sc.c, Qy_, Atnu_, Gtlam_])))
    gap = jnp.sum(vf * jnp.abs(s * lam)) / (1 + jnp.abs(obj))
    residual = jnp.max(jnp.stack([primal, dual, gap, neg_ / (1 + lam_)]))
    dual_norm = jnp.maximum(nu_, lam_)
    value = jnp.dot(b, nu, precision=_HI) + jnp.dot(h, lam, precision=_HI)
    pinf = (
        (dual_norm > 0)
        & (farkas_ <= eps_inf * (sc.A + sc.G) * dual_norm)
        & (value < -eps_inf * (1 + sc.b + sc.h) * dual_norm)
    )
    g_max = jnp.max(jnp.where(valid, Gy, -jnp.inf)) if Gy.size else jnp.zeros((), y.dtype)
    dinf = (
        (y_ > 0)
        & (Qy_ <= eps_inf * sc.Q * y_)
        & (Ay_ <= eps_inf * (1 + sc.A) * y_)
        & (g_max <= eps_inf * (1 + sc.G) * y_)
        & (cy < -eps_inf * sc.c * y_)
    )
    return _Measure(residual, pinf, dinf)


def _point_residual(qp: _QP, sc: _Scales, y, nu, lam, valid):
    """Relative KKT residual of a returned point; the slack is ``max(h - G y, 0)``."""
    s = jnp.where(valid, jnp.maximum(qp.h - _mm(qp.G, y), 0), 0)
    return _measure(qp, sc, y, nu, lam, s, valid, jnp.zeros((), y.dtype)).residual


def _active_mask(y, lam, G, h, tol):
    """The active rows of a QP solution: :func:`bilevel_jax._src.kkt.active_mask`."""
    y, G = lax.stop_gradient(y), lax.stop_gradient(G)
    valid = _valid(h)
    Gy = jnp.where(valid, _mm(G, y), 0)
    hs = lax.stop_gradient(_safe_h(h))
    bound = jnp.maximum(jnp.abs(hs), jnp.abs(Gy))
    return kkt.active_mask(hs - Gy, lam, valid, tol, bound, _row_norms(G))


def _active_residual(tol):
    """The masked active-set KKT residual ``r(z, theta)`` of the implicit rule."""

    def residual(z, theta):
        y, nu, lam = z
        Q, c, A, b, G, h = theta
        mf = _active_mask(y, lam, G, h, tol).astype(y.dtype)
        r_y = _mm(_sym(Q), y) + c + _mm(A.T, nu) + _mm(G.T, mf * lam)
        r_nu = _mm(A, y) - b
        r_lam = mf * (_mm(G, y) - _safe_h(h)) - (1 - mf) * lam
        return r_y, r_nu, r_lam

    return residual


def _relaxed_residual(mu):
    """The central-path KKT residual ``lam_i (h - G y)_i = mu`` of the relaxed rule."""

    def residual(z, theta):
        y, nu, lam = z
        Q, c, A, b, G, h = theta
        valid = _valid(h)
        r_y = _mm(_sym(Q), y) + c + _mm(A.T, nu) + _mm(G.T, jnp.where(valid, lam, 0))
        r_nu = _mm(A, y) - b
        r_lam = jnp.where(valid, lam * (_safe_h(h) - _mm(G, y)) - mu, lam)
        return r_y, r_nu, r_lam

    return residual


# --------------------------------------------------------------------------------------------
# The interior-point method.


class _IPMOut(NamedTuple):
    y: Array
    nu: Array
    lam: Array
    s: Array
    num_steps: Array
    flag: Array  # 0 running (max steps), 1 converged, 2 primal infeasible, 3 unbounded, 4 nonfinite
    residual: Array  # relative KKT residual of the final iterate (original units)


_RUNNING, _CONVERGED, _PINF, _DINF, _NONFINITE = 0, 1, 2, 3, 4


def _regularisation(dtype):
    """Relative static regularisation of the Newton matrices: ``1e-2 sqrt(eps)``."""
    return float(jnp.finfo(dtype).eps) ** 0.5 * 1e-2


def _step_to_boundary(x, dx, valid):
    """Largest ``t <= 1`` with ``x + t dx >= 0`` on valid rows."""
    neg = valid & (dx < 0)
    ratio = jnp.where(neg, -x / jnp.where(neg, dx, -1), jnp.inf)
    if ratio.size == 0:
        return jnp.ones((), x.dtype)
    return jnp.minimum(jnp.min(ratio), 1).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Scaling. The interior point and the polish run on an equilibrated copy of the problem,
#
#     Q^ = sigma D Q D ,  c^ = sigma D c ,  C^ = E C D ,  d^ = E d      (C = [A; G], d = [b; h]),
#
# with ``D``, ``E`` from Ruiz's iteration on the KKT matrix ``[Q, C'; C, 0]`` (every row and
# column of it brought to unit max-norm) and the cost scale ``sigma`` of OSQP. A point of the
# scaled problem maps back as ``y = D y^``, ``(nu, lam) = E (nu^, lam^) / sigma``,
# ``s = s^ / E``; every KKT matrix as ``K(m, e) = S^-1 K^(m, E^2 e / sigma) S^-1`` with
# ``S = diag(sqrt(sigma) D, E / sqrt(sigma))``. Stopping tests, statuses and ``info.residual``
# are always measured on the original data.


class _Scaling(NamedTuple):
    D: Array  # (n,)
    E: Array  # (p + k,)
    sigma: Array  # ()


def _equilibrate(qp: _QP, valid, iters=10) -> _Scaling:
    """Ruiz equilibration of ``[Q, C'; C, 0]`` (``iters`` sweeps) and OSQP's cost scaling.

    Each sweep divides every row and column of the scaled KKT matrix by the square root of its
    max-norm, clipped to ``[1e-4, 1e4]`` (so each sweep scales by at most 100); zero rows and
    columns are left alone. ``Q`` is symmetric, so its column maxima are row maxima. (OSQP
    leaves every norm below ``1e-4`` alone; a row scaled down to ``1e-6`` then stayed there,
    and the polish's solve, accurate relative to the other rows, missed it by ``3e-5`` per
    unit row norm: the polish was rejected and an interior-point point whose true
    complementarity was ``4e-7`` came back SUCCESS with ``y`` ``1.6e-3`` off, on a fuzz QP
    with rows scaled over ``1e-4..1e4``.)
    """
    Q, c, A, _, G, _ = qp
    C = _stack(A, G)
    row_mask = jnp.concatenate([jnp.ones((A.shape[0],), Q.dtype), valid.astype(Q.dtype)])

    def inv_sqrt(norm):
        return 1 / jnp.sqrt(jnp.where(norm > 0, jnp.clip(norm, 1e-4, 1e4), 1))

    def sweep(_, carry):
        D, E = carry
        col_q = _abs_max(Q, D, D)[0]
        row_c, col_c = _abs_max(C, E * row_mask, D)
        return D * inv_sqrt(jnp.maximum(col_q, col_c)), E * inv_sqrt(row_c)

    ones = (jnp.ones_like(c), jnp.ones((C.shape[0],), Q.dtype))
    D, E = vma.fori_loop(0, iters, sweep, ones)
    cost = jnp.maximum(jnp.mean(_abs_max(Q, D, D)[0]), _amaxes(D * c)[0])
    sigma = 1 / jnp.where(cost < 1e-4, 1, jnp.minimum(cost, 1e4))
    return _Scaling(D, E, sigma)


def _scale(qp: _QP, sc: _Scaling) -> _QP:
    Q, c, A, b, G, h = qp
    D, E, sigma = sc
    p = A.shape[0]
    Ea, Eg = E[:p], E[p:]
    return _QP(
        _scale_matrix(Q, sigma * D, D),
        sigma * D * c,
        _scale_matrix(A, Ea, D),
        Ea * b,
        _scale_matrix(G, Eg, D),
        Eg * h,
    )


def _unscale(sc: _Scaling, y, nu, lam):
    D, E, sigma = sc
    p = nu.shape[0]
    return D * y, E[:p] * nu / sigma, E[p:] * lam / sigma


def _scale_point(sc: _Scaling, y, nu, lam):
    D, E, sigma = sc
    p = nu.shape[0]
    return y / D, sigma * nu / E[:p], sigma * lam / E[p:]


# Every KKT matrix of this module has the form
#
#     K(m, e) = [[Q, C'M], [M C, -diag(e)]] ,   C = [A; G] ,   M = diag(m) ,
#
# with ``m = 1`` on the equality rows, ``e >= 0`` (interior point: ``e = s / lam`` on the
# inequality rows; active-set systems: ``m`` the mask, ``e = (1 - m) + ridge m``). It is solved
# through the Schur complement on the constraints, ``S = M W M + diag(e)`` with
# ``W = C Q_d^-1 C'`` computed once per problem, so an interior-point iteration costs one
# Cholesky factorisation of size ``p + k`` instead of an LU of size ``n + p + k``.
# ``Q_d = Q + delta I`` with ``delta`` at rounding level when ``Q`` is well conditioned. When
# it is singular or nearly so (LPs, lasso-like QPs), ``delta = sqrt(eps)`` (relative) and
# every solve is followed by iterative refinement against the exact ``K``: this is a
# proximal (primal-regularised) interior point, exact at convergence.


class _Prepared(NamedTuple):
    """Once per (scaled) problem: ``chol(Q_d)``, ``C``, ``U``, ``W``, ``q_c`` and flags.

    ``U = Q_d^-1 C'``, ``W = C U`` and ``q_c = Q_d^-1 c``; ``Q`` is the exact (symmetric)
    matrix that refinement steps apply; ``refine`` the number of refinement steps every solve
    takes; ``singular`` whether the larger ``delta`` was needed; ``delta`` the shift used
    (``Q_d = Q + delta I``, ``delta`` including the factor ``1 + max|Q|``); ``convex`` is False
    when ``Q + delta I`` is not positive definite even with the larger ``delta`` (``Q``
    indefinite).
    """

    chol_q: Array
    C: Array
    U: Array
    W: Array
    q_c: Array
    Q: Array
    refine: Array
    singular: Array
    delta: Array
    convex: Array


def _prepare(qp: _QP, valid) -> _Prepared:
    """Factorise ``Q_d = Q + delta I`` and form ``W``.

    ``delta = 10 eps (1 + max|Q|)`` keeps the interior point's residual bias ``delta |y|``
    (from ``Q_d^-1 Q y ~ y``, see :func:`_dual_step`) at rounding level. When that
    factorisation fails or has a pivot below ``sqrt(eps) (1 + max|Q|)`` (``Q`` singular or
    nearly so) ``delta = sqrt(eps) (1 + max|Q|)`` and every solve takes three refinement steps
    against the exact matrix. Rows of ``G`` with ``h_i = +inf`` are zeroed: they read
    ``-e_i x_i = r_i``.
    """
    if isinstance(qp.Q, SparseMatrix):
        return _prepare_sparse(qp, valid)
    Q, c, A, _, G, _ = qp
    dtype = Q.dtype
    eps = float(jnp.finfo(dtype).eps)
    C = jnp.concatenate([A, G * valid.astype(dtype)[:, None]])
    scale = 1 + _amaxes(Q)[0]
    eye = jnp.eye(Q.shape[0], dtype=dtype)

    def factor(delta):
        return ls.cholesky(Q + (delta * scale) * eye)

    chol_q = factor(10 * eps)
    pivot = jnp.min(jnp.abs(jnp.diagonal(chol_q))) ** 2
    healthy = jnp.all(jnp.isfinite(chol_q)) & (pivot > eps**0.5 * scale)
    chol_q = vma.cond(healthy, lambda: chol_q, lambda: factor(eps**0.5))
    convex = jnp.all(jnp.isfinite(chol_q))
    Uc, Wc = ls.inverse_products(chol_q, jnp.concatenate([C, c[None, :]]))
    # float32 directions are only accurate to eps cond(K) ~ the tolerance itself: one
    # refinement step lets the iteration go below it (measured on qpax's float32 random QPs:
    # without it 1.4 % stalled at a residual near 1e-5 with an ambiguous active set).
    low = 1 if eps > 1e-10 else 0
    refine = jnp.where(healthy, low, 3).astype(jnp.int32)
    delta = jnp.where(healthy, 10 * eps, eps**0.5) * scale
    return _Prepared(chol_q, C, Uc[:, :-1], Wc[:-1, :-1], Uc[:, -1], Q, refine, ~healthy, delta,
                     convex)


class _SparsePrepared(NamedTuple):
    """:class:`_Prepared` for sparse data: the matrices, no factor.

    Every ``K(m, e)`` is factorised on its own (:mod:`bilevel_jax._src.sparse_linalg`);
    ``q_c`` is zero (the Schur shortcut ``t = Q_d^-1 r1`` of :func:`_kkt_solve` does not
    apply).
    """

    Q: SparseMatrix
    C: SparseMatrix
    q_c: Array
    refine: Array
    singular: Array
    delta: Array
    convex: Array
    d2: Array  # regularisation of the multiplier block of K (see _prepare_sparse)
    pattern: Array  # the host's token for the pattern of K (sparse_linalg.pattern)


class _SparseFactor(NamedTuple):
    """A host factorisation of the regularised ``K(m, e)``.

    Its shifts are ``pre.delta`` and ``pre.d2``; ``m`` and ``e`` are kept for a
    refactorisation if the host evicted it.
    """

    token: Array
    m: Array
    e: Array


def _prepare_sparse(qp: _QP, valid) -> _SparsePrepared:
    """The shift of ``Q_d = Q + delta I`` as :func:`_prepare` chooses it, for sparse data.

    From the pivots of the sparse factorisation of ``K(0, 2)`` (the constraint rows masked
    out: its inertia is that of ``Q_d``): ``delta = 10 eps (1 + max|Q|)``, or
    ``sqrt(eps) (1 + max|Q|)`` with three refinement steps per solve when a pivot is below
    ``sqrt(eps) (1 + max|Q|)``; ``convex`` when ``Q_d`` then has ``n`` positive pivots (the
    inertia of the quasi-definite matrix).
    """
    Q, c, A, _, G, _ = qp
    dtype, n = c.dtype, c.shape[0]
    eps = float(jnp.finfo(dtype).eps)
    C = _stack(A, G.scale(valid.astype(dtype), jnp.ones((n,), dtype)))
    scale = 1 + _amaxes(Q)[0]
    rows = C.shape[0]
    pattern = sparse_linalg.pattern(Q, C)

    def pivots(delta):
        _, positive, pivot = sparse_linalg.factor(
            Q, C, jnp.zeros((rows,), dtype), jnp.full((rows,), 2, dtype), delta * scale, 1,
            inertia=True, pattern=pattern)
        return positive, pivot

    positive, pivot = pivots(10 * eps)
    healthy = (positive == n) & (pivot > eps**0.5 * scale)
    positive = vma.cond(healthy, lambda: positive, lambda: pivots(eps**0.5)[0])
    # (as the dense path in float64: the host factorises in float64 whatever the dtype;
    # measured on the smoothing QP at n = 1e5, one step per interior-point solve cost
    # 0.45 s of 3.8 s and changed no iteration count)
    refine = jnp.where(healthy, 0, 3).astype(jnp.int32)
    delta = jnp.where(healthy, 10 * eps, eps**0.5) * scale
    # (a relative 1e-2 sqrt(eps) of float64 on the multiplier block: the host
    # factorises in float64, and refinement on the exact matrix removes the bias)
    d2 = (_regularisation(jnp.float64) * (1 + _amaxes(C)[0] ** 2)).astype(dtype)
    return _SparsePrepared(Q, C, jnp.zeros_like(c), refine, ~healthy, delta, positive == n, d2,
                           pattern)


def _factor(pre: _Prepared, m, e, delta=None):
    """Cholesky factor of ``S = M W M + diag(e + delta (1 + max|W|))``.

    By default ``delta = 10 eps``, and ``1e-2 sqrt(eps)`` when that factorisation fails or has
    a pivot below ``1e3 delta`` (equality or active rows dependent, where ``e_i = 0`` or
    ``ridge``): the larger value, whose bias the refinement steps against the exact matrix
    remove, is then needed to keep ``S`` definite. When ``Q`` is nearly singular ``W`` is
    large along its null space, so the smaller value matters there most.
    """
    if isinstance(pre, _SparsePrepared):
        token, _, _ = sparse_linalg.factor(pre.Q, pre.C, m, e, pre.delta, pre.d2,
                                           pattern=pre.pattern)
        return _SparseFactor(token, m, e)
    dtype = pre.W.dtype
    scale = 1 + _amaxes(pre.W)[0]
    base = pre.W * jnp.outer(m, m) + jnp.diag(e)
    eye = jnp.eye(base.shape[0], dtype=dtype)

    def factor(delta):
        return ls.cholesky(base + (delta * scale) * eye)

    if delta is not None:
        return factor(delta)
    small = 10 * float(jnp.finfo(dtype).eps)
    chol = factor(small)
    pivot = jnp.min(jnp.abs(jnp.diagonal(chol)), initial=jnp.inf) ** 2
    healthy = jnp.all(jnp.isfinite(chol)) & (pivot > 1e3 * small * scale)
    return vma.cond(healthy, lambda: chol, lambda: factor(_regularisation(dtype)))


def _kkt_apply(pre: _Prepared, m, e, x):
    """``K(m, e) x`` with the exact (unregularised) ``Q``."""
    x1, x2 = x
    return _mm(pre.Q, x1) + _mm(pre.C.T, m * x2), m * _mm(pre.C, x1) - e * x2


def _kkt_solve(pre: _Prepared, chol_s, m, e, r, steps=1, t=None, cap=None):
    """Solve ``K(m, e) x = r`` with the regularised factors, plus ``steps`` refinements on ``K``.

    ``x2 = S^-1 (M C t - r2)``, ``x1 = t - U M x2`` with ``t = Q_d^-1 r1``; pass ``t`` when it
    is known without a solve (e.g. ``r1 = -c`` gives ``t = -q_c``). ``steps`` may be traced;
    a loop keeps a single refinement in the program. With a ``cap``, see :func:`_refine`.

    The Schur complement squares the conditioning of ``K``, so the first solve is only
    accurate to ``eps cond(K)^2``; refinement against ``K`` brings it to ``eps cond(K)`` when
    it runs to rounding level. Where active rows are dependent (``S`` singular, regularised)
    each step gains only a constant factor: on Maros–Meszaros QPCBOEI2 (148 active rows of
    rank 106, multipliers up to 1e8) the adjoint's ``y`` block was off by 27 (3e-2 relative)
    after one step under a passing ``sqrt(eps)`` check, 4e-3 after ten. In float32,
    stopping at ``100 eps`` (and at the first step that did not halve the error) left
    hypergradients 2e-2 and 6e-2 off on badly scaled fuzz QPs (``cond(K)`` 4.5e2 and 2e4,
    SUCCESS); running on gives 2e-3 and 8e-4.
    """
    r1, r2 = r
    if isinstance(pre, _SparsePrepared):  # (a sparse factorisation of the whole matrix)
        f = chol_s

        def solve(r1, r2, t=None):
            return sparse_linalg.solve(f.token, pre.Q, pre.C, f.m, f.e, pre.delta, pre.d2,
                                       (r1, r2))

    else:

        def solve(r1, r2, t=None):
            if t is None:
                t = ls.cho_solve(pre.chol_q, r1)
            x2 = ls.cho_solve(chol_s, m * _mm(pre.C, t) - r2)
            return t - _mm(pre.U, m * x2), x2

    if cap is None:
        def refine(_, x):
            a1, a2 = _kkt_apply(pre, m, e, x)
            d1, d2 = solve(r1 - a1, r2 - a2)
            return x[0] + d1, x[1] + d2

        return vma.fori_loop(0, steps, refine, solve(r1, r2, t))
    return _refine(pre, m, e, r, lambda d: solve(*d), solve(r1, r2, t), steps, cap)


def _refine(pre: _Prepared, m, e, r, solve, x, steps, cap):
    """Iterative refinement of ``x`` on ``K(m, e) x = r`` with an approximate ``solve``.

    ``steps`` steps, then more, up to ``cap`` in all, while the backward error (on
    ``|r| + |K x|``) is above ``2 eps`` and each step lowers it by 10 %; a step past
    ``steps`` that does not lower it is undone. ``solve`` may be a factorisation of a
    regularised matrix (the Schur factors, a ridged LU): on a consistent singular system
    (dependent active rows) the corrections stay orthogonal to the null space, and the
    iteration converges to the minimum-norm solution.

    Returns:
      The refined solution.
    """
    eps = float(jnp.finfo(pre.Q.dtype).eps)

    def error(x):  # (r - K x, its size relative to |r| + |K x|)
        d, res, strict, _ = _kkt_residual(pre, m, e, r, x)
        return d, res / jnp.maximum(strict, jnp.finfo(res.dtype).tiny)

    def cond(state):
        i, _, _, res, last = state
        return (i < steps) | ((i < cap) & (res > 2 * eps) & (res < 0.9 * last))

    def body(state):
        i, x, d, res, _ = state
        dx1, dx2 = solve(d)
        x_new = (x[0] + dx1, x[1] + dx2)
        d_new, new = error(x_new)
        accept = (i < steps) | (new < res)
        keep = lambda a, b: jnp.where(accept, a, b)  # noqa: E731
        x, d = jax.tree.map(keep, (x_new, d_new), (x, d))
        return i + 1, x, d, jnp.where(accept, new, res), res

    d, res = error(x)
    state = (jnp.asarray(0, jnp.int32), x, d, res, jnp.asarray(jnp.inf, res.dtype))
    return vma.while_loop(cond, body, state)[1]


def _kkt_dense(pre: _Prepared, m, e):
    """The matrix ``K(m, e) = [Q, C'M; M C, -diag(e)]`` (exact ``Q``), for a dense LU."""
    top = jnp.concatenate([pre.Q, pre.C.T * m], axis=1)
    bottom = jnp.concatenate([pre.C * m[:, None], -jnp.diag(e)], axis=1)
    return jnp.concatenate([top, bottom])


def _flat(pre: _Prepared, chol_s, m, steps=3):
    """Whether ``K(m, .)`` is singular along ``y``: the minimiser is not unique.

    Only a singular ``Q`` (``pre.singular``: ``Q_d = Q + delta I`` with ``delta = pre.delta =
    sqrt(eps) (1 + max|Q|)``, see :func:`_prepare`) allows it: a direction ``d`` with
    ``Q d = 0`` and ``C_m d = 0`` moves along a face of minimisers, and no derivative exists.
    The ``y`` block of the regularised inverse maps ``d`` to ``d / delta``; ``steps`` inverse
    iterations on it from a fixed pseudo-random vector estimate its smallest eigenvalue from
    above, and ``d`` is declared when that estimate (``lambda_min + delta`` of ``Q_d``) is
    below ``2 delta``: only reduced-Hessian eigenvalues below ``sqrt(eps) (1 + max|Q|)`` (scaled
    problem) are flagged, those at which the hypergradient would amplify the forward
    tolerance by ``1 / sqrt(eps)`` or more. Measured on Maros–Meszaros QBEACONF (one flat
    direction, ``c'd ~ 1e-14``): the value's gradient came back finite, 0.13 away from ``y``,
    under a passing check.
    """
    n, dtype = pre.Q.shape[0], pre.Q.dtype
    if float(jnp.finfo(dtype).eps) > 1e-10:
        # float32: the Schur factors of a singular Q are too inexact for the estimate (on
        # LPs with a unique solution it came out below 2 delta); the dense LU fallback of
        # ``_masked_solver`` solves the exact system there instead.
        return jnp.asarray(False)
    zero = jnp.zeros((m.shape[0],), dtype)

    def probe():
        def step(_, v):  # (no refinement: e, the exact multiplier diagonal, is not read)
            x, _ = _kkt_solve(pre, chol_s, m, zero, (v / jnp.linalg.norm(v), zero), steps=0)
            return x

        v = jax.random.normal(jax.random.key(0), (n,), dtype)
        x = vma.fori_loop(0, steps - 1, step, v, like=(pre.Q, pre.C, chol_s, m))
        x = x / jnp.linalg.norm(x)
        estimate = 1 / jnp.linalg.norm(step(0, x))  # an upper bound on lambda_min
        return ~(estimate > 2 * pre.delta)  # (NaN counts as flat)

    return vma.cond(pre.singular, probe, lambda: jnp.asarray(False))


def _masked_solver(pre: _Prepared, m, e, delta=None, exact=None, unique=False):
    """``solve(r, steps, t=None, cap=None) -> (x, ok)`` of the scaled ``K(m, exact) x = r``.

    One Schur-complement factorisation (:func:`_factor`, of ``K(m, e)`` regularised; ``exact``
    defaults to ``e``: ``e`` may carry a ridge whose bias the refinement removes), many
    solves (:func:`_kkt_solve`, ``steps`` refinements; with a ``cap``, to rounding level).
    ``ok`` is True when the normwise backward error of ``x`` on ``K(m, exact)`` is at most
    ``sqrt(eps)`` (with a ``cap``, the backward error on ``|r| + |K x|``: see
    :func:`_backward_ok`).

    The Schur complement of ``Q_d = Q + delta I`` squares the conditioning of ``K`` (``S ~ C
    C' / delta`` when ``Q`` is singular); a dense LU (partial pivoting) of the whole
    ``K(m, e)``, of size ``n + p + k``, refined on ``K(m, exact)`` (:func:`_lu_fallback`),
    is backward stable. It solves the system where the Schur solution fails its check, and
    in float32 whenever ``Q`` is singular. Measured: in float32 on LPs and singular-``Q`` QPs
    with a unique solution (``cond(K)`` 3e2..2e4) ``S`` was numerically singular and the
    adjoint came back with O(1) relative errors under a passing ``sqrt(eps)`` check; in
    float64, SUCCESS with a NaN hypergradient on 3 of 625 singular-``Q`` fuzz problems
    (``cond(K)`` 2e5..8e6); and on badly scaled float64 QPs (rows scaled over 1e-4..1e4,
    ``cond(K)`` 3e8..5e10 after equilibration) the refinement stalled at a backward error
    of 1e-4 on ``|r| + |K x|`` while the normwise one was 5e-16, and the hypergradient came
    back SUCCESS and 0.6..1.0 off. (A threshold at rounding level would send good solves to
    the LU too: on Problem L.1 at ``n = 200`` that backward error is 7.6e-14, and 6.4e-14
    after the LU.) Under ``vmap`` the LU runs only when some member needs it
    (:func:`vma.where_needed`). The LU solution is kept only where it is finite and passes
    the normwise check.

    With ``unique`` (the backward pass), ``ok`` is also False where ``K`` is singular along
    ``y`` (:func:`_flat`: a face of minimisers, no derivative), whatever ``r``.
    """
    chol_s = _factor(pre, m, e, delta)
    flat = _flat(pre, chol_s, m) if unique else jnp.asarray(False)
    exact = e if exact is None else exact
    eps = float(jnp.finfo(pre.Q.dtype).eps)

    def solve(r, steps, t=None, cap=None):
        x = _kkt_solve(pre, chol_s, m, exact, r, steps, t, cap)
        ok = _backward_ok(pre, m, exact, r, x, strict=cap is not None)
        if isinstance(pre, _SparsePrepared):  # (already a direct factorisation of K)
            return x, ok & ~flat
        need = ~ok | (pre.singular & (eps > 1e-10))
        x, ok = vma.where_needed(need, _lu_fallback, (x, ok), pre, m, e, exact, r, x, ok)
        return x, ok & ~flat

    return solve


def _kkt_residual(pre: _Prepared, m, e, r, x):
    """``(d, |d|, |r| + |K x|, normwise scale)`` of ``d = r - K(m, e) x`` (max-norms).

    The normwise scale is ``|r| + (|Q| + |C|) |x| + |e| |x2|``: ``|d|`` over it is the
    normwise backward error. ``|r| + |K x|`` is the stricter scale refinement aims at.
    """
    x1, x2 = x
    a1, a2 = _kkt_apply(pre, m, e, x)
    d = (r[0] - a1, r[1] - a2)
    res, r1_, r2_, a_, x1_, x2_, q_, c_, e_ = _amaxes(
        jnp.concatenate(d), *r, jnp.concatenate([a1, a2]), x1, x2, pre.Q, pre.C, e)
    rhs = jnp.maximum(r1_, r2_)
    normwise = rhs + (q_ + c_) * jnp.maximum(x1_, x2_) + e_ * x2_
    return d, res, rhs + a_, normwise


def _backward_ok(pre: _Prepared, m, e, r, x, strict=False):
    """Whether ``x`` solves ``K(m, e) x = r`` to a backward error of ``sqrt(eps)``.

    Normwise (on ``|r| + (|Q| + |C|) |x|``), or with ``strict`` on ``|r| + |K x|``:

    ``x`` then solves ``K x = r + d`` with ``|d| <= sqrt(eps) (|r| + |K x|) ~ 2 sqrt(eps)
    |r|``: a relative perturbation of the right-hand side alone, whose effect on ``x`` is at
    most ``cond(K)`` times that. The normwise test also admits perturbations of ``K``, of
    the size of ``|K| |x|``: where ``x`` is large along directions ``K`` nearly annihilates it
    passes anything.
    """
    _, res, scale, normwise = _kkt_residual(pre, m, e, r, x)
    return res <= jnp.sqrt(jnp.finfo(res.dtype).eps) * (scale if strict else normwise)


def _lu_fallback(pre: _Prepared, m, e, exact, r, x, ok, cap=30):
    """``(x, ok)`` of :func:`_masked_solver` replaced by a dense LU solve where that passes.

    The LU is of ``K(m, e)``, refined (:func:`_refine`, at least one step) on
    ``K(m, exact)``.
    """
    n = pre.Q.shape[0]
    lu, piv = ls.lu_factor(_kkt_dense(pre, m, e))

    def solve(d):
        xx = ls.lu_solve(lu, piv, jnp.concatenate(d))
        return xx[:n], xx[n:]

    x_lu = _refine(pre, m, exact, r, solve, solve(r), 1, cap)
    finite = jnp.all(jnp.isfinite(x_lu[0])) & jnp.all(jnp.isfinite(x_lu[1]))
    ok_lu = _backward_ok(pre, m, exact, r, x_lu) & finite
    return tuple(jnp.where(ok_lu, a, b) for a, b in zip(x_lu, x, strict=True)), ok_lu | ok


def original_solver(pre: _Prepared, sc: _Scaling, m, e, delta=None, steps=1, ridge=0.0):
    """A solver of ``K(m, e) x = r`` in *original* units through the scaled factorisation.

    Factorises once and returns ``solve(r) -> (x, check)``: ``x`` the solution in original
    units, ``check`` True when its normwise backward error on the equilibrated system is at
    most ``sqrt(eps)`` (else the system is singular or too ill-conditioned for the accuracy
    asked); see :func:`_masked_solver`. ``ridge`` is added to the multiplier diagonal of
    the masked rows in *equilibrated* units (``e^ = E^2 e / sigma``, factorised with
    ``e^ + ridge m``), so that its relative effect is the same on every row whatever the
    scaling of the data; refinement on the unregularised ``K(m, e^)`` removes its bias.
    """
    D, E, sigma = sc
    root = jnp.sqrt(sigma)
    s1, s2 = root * D, E / root
    e_hat = e * E**2 / sigma
    # (unique: a face of minimisers has no derivative, whatever the cotangent)
    solve_scaled = _masked_solver(pre, m, e_hat + jnp.asarray(ridge, e.dtype) * m, delta,
                                  exact=e_hat, unique=True)

    def solve(r):
        # (three times the forward's refinement steps when Q is nearly singular: the
        # backward system's contraction factor delta |K^-1| can be close to 1 there; then
        # up to 30 while each gains 10 %: dependent active rows, float32, see _kkt_solve)
        (x1, x2), ok = solve_scaled((s1 * r[0], s2 * r[1]), steps + 3 * pre.refine, cap=30)
        return (s1 * x1, s2 * x2), ok

    return solve


def _solve_original(pre: _Prepared, sc: _Scaling, m, e, r, delta=None, steps=1, ridge=0.0):
    """Solve ``K(m, e) x = r`` of the original problem (:func:`original_solver`), NaN if unsure.

    The solution is NaN when its backward error exceeds ``sqrt(eps)`` (e.g. a reduced Hessian
    that is singular on the identified active set): a hypergradient that cannot be trusted is
    not returned as a number.
    """
    (x1, x2), ok = original_solver(pre, sc, m, e, delta, steps, ridge)(r)
    return jnp.where(ok, x1, jnp.nan), jnp.where(ok, x2, jnp.nan)


def active_system(p, mask, ridge, dtype):
    """``(m, e)`` of the masked active-set matrix (equalities and ``mask`` rows, ``-ridge``)."""
    m = jnp.concatenate([jnp.ones((p,), dtype), mask.astype(dtype)])
    return m, (1 - m) + jnp.asarray(ridge, dtype) * m


def _newton_system(qp: _QP, pre: _Prepared, lam, s, valid):
    """``(m, e, chol(S))`` of the Newton matrix ``[Q, A', G'; A, 0, 0; G, 0, -S/Lam]``.

    Rows with ``h_i = +inf`` read ``-dlam_i = 0``.
    """
    dtype = qp.Q.dtype
    p = qp.A.shape[0]
    w = jnp.where(valid, s / jnp.where(valid, lam, 1), 1)
    m = jnp.ones((p + valid.shape[0],), dtype)
    e = jnp.concatenate([jnp.zeros((p,), dtype), w])
    return m, e, _factor(pre, m, e, 10 * float(jnp.finfo(dtype).eps))


def _dual_step(pre: _Prepared, y, x, tau, rd):
    """``Q_d^-1 rd`` for ``rd = Q y + C'x + c tau``, the first half of every Newton solve.

    When ``Q_d`` is well conditioned this is ``y + U x + q_c tau`` up to the bias
    ``delta Q_d^-1 y`` (rounding level, see :func:`_prepare`), with no triangular solve. When
    ``Q`` is nearly singular (the bias is not small), or the multipliers are large
    (``|U x| > 1e3 (1 + |y| + |q_c|)``, where that sum cancels), it is computed by a solve.
    """
    if isinstance(pre, _SparsePrepared):
        return jnp.zeros_like(y)  # (not used: the sparse solve ignores ``t``)
    Ux = _mm(pre.U, x)
    y_, q_, Ux_ = _amaxes(y, pre.q_c * tau, Ux)
    return vma.cond(
        (Ux_ > 1e3 * (1 + y_ + q_)) | pre.singular,
        lambda: ls.cho_solve(pre.chol_q, rd),
        lambda: y + pre.q_c * tau + Ux,
    )


def _kkt_vectors(qp: _QP, y, nu, lam, s, valid):
    vf = valid.astype(y.dtype)
    rd = _mm(qp.Q, y) + qp.c + _mm(qp.A.T, nu) + _mm(qp.G.T, vf * lam)
    rp = _mm(qp.A, y) - qp.b
    ri = vf * (_mm(qp.G, y) + s - qp.h)
    return rd, rp, ri


def _initial_point(qp: _QP, pre: _Prepared, sc: _Scaling, valid, init, warm):
    """Starting point of the interior-point method (scaled problem).

    Cold: cvxopt's start (the KKT solve with ``s = lam = 1``, then a shift into the interior).
    Warm (``warm`` a traced flag): ``init = (y, nu, lam)`` (original units) scaled, with
    slacks and multipliers pushed into the interior.
    """

    def warm_start():
        y, nu, lam = _scale_point(sc, *init)
        floor = 1e-2 * (1 + _amaxes(lam)[0])
        s = jnp.where(valid, jnp.maximum(qp.h - _mm(qp.G, y), floor), 1)
        lam = jnp.where(valid, jnp.maximum(lam, floor), 0)
        return y, nu, lam, s

    return vma.cond(warm, warm_start, lambda: _cold_start(qp, pre, valid))


def _cold_start(qp: _QP, pre: _Prepared, valid):
    Q, c, A, b, G, h = qp
    dtype = Q.dtype
    ones = jnp.ones_like(h)
    p = A.shape[0]
    m, e, chol_s = _newton_system(qp, pre, ones, ones, valid)
    rhs = (-c, jnp.concatenate([b, jnp.where(valid, h, 0)]))
    y, x2 = _kkt_solve(pre, chol_s, m, e, rhs, steps=pre.refine, t=-pre.q_c)
    nu = x2[:p]
    z = jnp.where(valid, x2[p:], 0)  # = G y - h: the multiplier candidate; slack -z

    def shift(x):
        top = jnp.max(jnp.where(valid, -x, -jnp.inf)) if x.size else jnp.zeros((), dtype)
        bump = jnp.where(top >= -1e-8 * jnp.maximum(_amaxes(x)[0], 1), 1 + top, 0)
        return jnp.where(valid, x + bump, 0)

    return y, nu, shift(z), jnp.where(valid, shift(-z), 1)


def _ipm(orig: _QP, sc_orig: _Scales, qp: _QP, scaling: _Scaling, pre: _Prepared, valid, tol,
         max_iter, init, warm):
    """Homogeneous self-dual interior point (Mehrotra predictor-corrector) on the scaled QP.

    The iterate ``(y, x, s, tau, kappa)`` (``x = (nu, lam)``) solves the homogeneous embedding

        Q y + C'x + c tau = 0 ,   C y + s - d tau = 0 ,   c'y + d'x + y'Qy / tau + kappa = 0 ,

    with ``s_E = 0``, ``(s_I, lam) >= 0`` complementary and ``tau, kappa >= 0`` complementary.
    ``(y, x, s) / tau`` solves the QP when ``tau > 0``; when ``tau -> 0 < kappa`` the iterate is
    a certificate of primal infeasibility (``C'x = 0``, ``d'x < 0``) or of unboundedness
    (``Q y = 0``, ``C y <= 0``, ``c'y < 0``). Each iteration factorises ``K(1, [0; s/lam])``
    once and solves it three times (the constant direction ``[-c; d]``, predictor, corrector);
    ``dtau`` follows from the last equation. Stops when the relative KKT residual of
    ``(y, x, s) / tau`` in *original* units is below ``tol``, on a certificate (checked in
    original units once ``kappa > tau``), on a non-finite step (the last finite iterate is
    kept) or after ``max_iter`` steps.
    """
    Q, c, A, b, G, h = qp
    dtype = Q.dtype
    p = A.shape[0]
    eps_inf = jnp.asarray(10 * tol, dtype)  # relative accuracy of a certificate
    # The iteration aims below tol (a stall near the attainable accuracy ends it): at a
    # residual of just tol, multipliers and slacks of size ~sqrt(tol) are not yet told apart,
    # and the polish then starts from an ambiguous active set (float32 small-margin QPs).
    target = 1e-2 * tol
    vf = valid.astype(dtype)
    k_eff = jnp.sum(vf) + 1
    d = jnp.concatenate([b, vf * h])
    sc_scaled = _Scales(*_amaxes(Q, c, A, b, G, vf * h))
    m_all = jnp.ones((d.shape[0],), dtype)
    zeros_p = jnp.zeros((p,), dtype)
    tiny = jnp.finfo(dtype).tiny
    no = vma.vary_like(jnp.zeros((), bool), qp)  # (varying like the data under shard_map)

    def original(y, nu, lam, s, tau):
        y, nu, lam = _unscale(scaling, y / tau, nu / tau, lam / tau)
        return y, nu, lam, jnp.where(valid, s / (scaling.E[p:] * tau), 0)

    def certificates(y, nu, lam, s):
        # On the equilibrated data, where a ray or a Farkas vector is judged with balanced
        # norms (in original units a badly scaled solution can pass the normwise tests).
        meas = _measure(qp, sc_scaled, y, nu, lam, s, valid, eps_inf)
        return meas.pinf, meas.dinf

    def classify(y, nu, lam, s, tau, kappa):
        residual = _measure(orig, sc_orig, *original(y, nu, lam, s, tau), valid, eps_inf).residual
        pinf, dinf = vma.cond(kappa > tau, certificates, lambda *_: (no, no), y, nu, lam, s)
        flag = jnp.where(pinf, _PINF, jnp.where(dinf, _DINF, _RUNNING))
        return jnp.where(residual <= target, _CONVERGED, flag), residual

    def to_boundary(x, dx):
        return jnp.where(dx < 0, -x / jnp.where(dx < 0, dx, -1), 1)

    def iterate(state):
        it, y, nu, lam, s, tau, kappa, _, _ = state
        x = jnp.concatenate([nu, vf * lam])
        Qy = _mm(Q, y)
        r_y = Qy + _mm(pre.C.T, x) + c * tau
        r_x = _mm(pre.C, y) + jnp.concatenate([zeros_p, vf * s]) - d * tau
        yQy = jnp.dot(y, Qy, precision=_HI)
        r_tau = jnp.dot(c, y, precision=_HI) + jnp.dot(d, x, precision=_HI) + yQy / tau + kappa
        mu = (jnp.sum(vf * s * lam) + tau * kappa) / k_eff
        lam_safe = jnp.where(valid & (lam > 0), lam, 1)
        e = jnp.concatenate([zeros_p, jnp.where(valid, s / lam_safe, 1)])
        chol_s = _factor(pre, m_all, e, 10 * float(jnp.finfo(dtype).eps))
        p1, q1 = _kkt_solve(pre, chol_s, m_all, e, (-c, d), pre.refine, -pre.q_c)
        w = c + 2 * Qy / tau
        # The coefficient of dtau in the last equation once dy = p2 + dtau p1 and
        # dx = q2 + dtau q1 are substituted; it equals -(p1 - y/tau)'Q(p1 - y/tau) - q1'E q1 -
        # kappa/tau - delta |p1|^2 < 0 for the regularised solve.
        denom = jnp.dot(w, p1, precision=_HI) + jnp.dot(d, q1, precision=_HI)
        denom = denom - yQy / tau**2 - kappa / tau
        t_y = _dual_step(pre, y, x, tau, r_y)

        def direction(rc, rk, eta):
            rhs = (-eta * r_y, -eta * r_x + jnp.concatenate([zeros_p, vf * rc / lam_safe]))
            p2, q2 = _kkt_solve(pre, chol_s, m_all, e, rhs, pre.refine, -eta * t_y)
            num = -eta * r_tau + rk / tau - jnp.dot(w, p2, precision=_HI)
            dtau = (num - jnp.dot(d, q2, precision=_HI)) / denom
            dy, dx = p2 + dtau * p1, q2 + dtau * q1
            dlam = vf * dx[p:]
            ds = vf * -(rc + s * dlam) / lam_safe
            return dy, dx[:p], dlam, ds, dtau, -(rk + kappa * dtau) / tau

        def longest(step):
            _, _, dlam, ds, dtau, dkappa = step
            t = jnp.minimum(_step_to_boundary(s, ds, valid), _step_to_boundary(lam, dlam, valid))
            return jnp.minimum(t, jnp.minimum(to_boundary(tau, dtau), to_boundary(kappa, dkappa)))

        # Predictor (affine scaling), then corrector (centring plus the second-order term) with
        # the same factorisation; a fori_loop keeps one solve in the program.
        def predictor_corrector(_, carry):
            rc, rk, eta, _ = carry
            step = direction(rc, rk, eta)
            _, _, dlam, ds, dtau, dkappa = step
            t = longest(step)
            gap = jnp.sum(vf * (s + t * ds) * (lam + t * dlam)) + (tau + t * dtau) * (
                kappa + t * dkappa
            )
            sigma = jnp.clip((gap / k_eff / jnp.maximum(mu, tiny)) ** 3, 0, 1)
            rc = vf * (s * lam + ds * dlam - sigma * mu)
            return rc, tau * kappa + dtau * dkappa - sigma * mu, 1 - sigma, step

        zero_step = (
            jnp.zeros_like(y), jnp.zeros_like(nu), jnp.zeros_like(lam), jnp.zeros_like(s),
            jnp.zeros_like(tau), jnp.zeros_like(kappa),
        )
        start = (vf * s * lam, tau * kappa, jnp.ones_like(tau), zero_step)
        *_, step = vma.fori_loop(0, 2, predictor_corrector, start)
        t = jnp.minimum(1, 0.99 * longest(step))
        dy, dnu, dlam, ds, dtau, dkappa = step
        new = (
            y + t * dy, nu + t * dnu, lam + t * dlam, jnp.where(valid, s + t * ds, 1),
            tau + t * dtau, kappa + t * dkappa,
        )
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(a)) for a in new])) & (new[4] > 0)
        # A non-finite step keeps the last finite iterate and stops; the homogeneous iterate
        # overflows on infeasible or unbounded problems, so that iterate is tested for a
        # certificate first.
        old = (y, nu, lam, s, tau, kappa)
        y, nu, lam, s, tau, kappa = (jnp.where(finite, a, o) for a, o in zip(new, old, strict=True))
        flag, residual = classify(y, nu, lam, s, tau, kappa)
        pinf, dinf = vma.cond(finite, lambda *_: (no, no), certificates, y, nu, lam, s)
        stop = jnp.where(pinf, _PINF, jnp.where(dinf, _DINF, _NONFINITE))
        flag = jnp.where(finite, flag, stop)
        return it + finite.astype(it.dtype), y, nu, lam, s, tau, kappa, flag, residual

    # The best point so far (lowest residual) is kept: near the attainable accuracy the
    # residual stops decreasing while the homogeneous iterate keeps shrinking, and rounding
    # then degrades y / tau. A stall (no new best in 5 iterations once the residual is below
    # sqrt(tol)) ends the loop; the polish starts from the best point.
    def normalised(state):
        it, y, nu, lam, s, tau, _, _, residual = state
        return it, y / tau, nu / tau, lam / tau, s / tau, residual

    def body(carry):
        state, best = carry
        state = iterate(state)
        better = state[8] < best[5]
        best = tuple(jnp.where(better, a, b) for a, b in zip(normalised(state), best, strict=True))
        return state, best

    def cond(carry):
        (it, *_, flag, _), best = carry
        stalled = (it - best[0] >= 5) & (best[5] <= jnp.sqrt(tol))
        return (flag == _RUNNING) & (it < max_iter) & pre.convex & ~stalled

    y, nu, lam, s = _initial_point(qp, pre, scaling, valid, init, warm)
    one = vma.vary_like(jnp.ones((), dtype), qp)
    state = (jnp.asarray(0, jnp.int32), y, nu, lam, s, one, one)
    state = (*state, *classify(y, nu, lam, s, one, one))
    state, best = vma.while_loop(cond, body, (state, normalised(state)))
    it, flag = state[0], state[7]
    certificate = (flag == _PINF) | (flag == _DINF)
    point = tuple(
        jnp.where(certificate, a, b) for a, b in zip(normalised(state)[1:], best[1:], strict=True)
    )
    y, nu, lam, s, residual = point
    return _IPMOut(y, nu, jnp.where(valid, lam, 0), s, it, flag, residual)


def _polish(qp: _QP, pre: _Prepared, out: _IPMOut, valid, ridge, tol, max_rounds=8):
    """Solve the equality KKT system on a guessed active set (scaled problem).

    The first guess is ``I = {lam_i > s_i}`` at the interior point. A guess is accepted when
    the solution of the KKT system on ``I`` is finite, primal feasible (``h - G y >= -tol``,
    relative) and dual feasible (``lam_I >= -tol``, relative). Otherwise the primal-dual
    active-set update ``I <- {i in I : lam_i >= 0} + {i not in I : (h - G y)_i < 0}`` is
    tried, at most ``max_rounds`` guesses in all: near-degenerate points, where the interior
    point cannot tell ``lam_i`` from ``s_i``, need it. Each guess costs one Cholesky
    factorisation of size ``p + k`` (``ridge`` on the multiplier diagonal, two refinements).

    Returns:
      The polished point (scaled), whether a guess was accepted, and its mask.
    """
    Q, c, A, b, G, h = qp
    dtype = Q.dtype
    p = A.shape[0]

    row_norm = _row_norms(G)

    def attempt(m):
        mm, e_ridge = active_system(p, m, ridge, dtype)
        solve = _masked_solver(pre, mm, e_ridge, exact=1 - mm)
        rhs = (-c, jnp.concatenate([b, jnp.where(m, h, 0)]))
        if isinstance(pre, _SparsePrepared):
            # Sparse data: solved for the correction from the interior point. Where active
            # rows are dependent (chains of active slope rows between two variables at a
            # bound) the multipliers are not unique, and the regularised solve of the whole
            # system returns the minimum-norm ones, some negative: the guess was rejected
            # round after round (8 rounds, then the unpolished point, y 3e-6 off, on the
            # smoothing QP at n = 1e5); from the interior point's (nonnegative) multipliers
            # the correction keeps them. The dense path keeps the minimum-norm start: on a
            # pair of opposite rows (l = u in argmin(ineq=)) it makes the active-set loop
            # keep one row, the signed multiplier solve_qp reports for an equality.
            x0 = (out.y, jnp.concatenate([out.nu, jnp.where(m, out.lam, 0)]))
            a1, a2 = _kkt_apply(pre, mm, 1 - mm, x0)
            (dy, dx2), _ = solve((rhs[0] - a1, rhs[1] - a2), 2 + pre.refine, cap=30)
            y, x2 = x0[0] + dy, x0[1] + dx2
        else:
            (y, x2), _ = solve(rhs, 2 + pre.refine, -pre.q_c, cap=30)
        nu, lam = x2[:p], jnp.where(m, x2[p:], 0)
        Gy = jnp.where(valid, _mm(G, y), 0)
        bound = jnp.maximum(jnp.abs(h), jnp.abs(Gy))
        ok, update = kkt.polish_verdict(h - Gy, lam, m, valid, tol, bound, row_norm)
        finite = jnp.all(jnp.isfinite(y)) & jnp.all(jnp.isfinite(x2))
        return (y, nu, jnp.maximum(lam, 0)), ok & finite, update

    def cond(state):
        it, _, _, ok, _ = state
        return (it < max_rounds) & ~ok

    def body(state):
        it, _, _, _, m = state
        z, ok, update = attempt(m)
        return it + 1, z, m, ok, jnp.where(ok, m, update)

    m0 = valid & (out.lam > out.s)
    z = (jnp.zeros_like(out.y), jnp.zeros_like(out.nu), jnp.zeros_like(out.lam))
    state = (jnp.asarray(0, jnp.int32), z, m0, jnp.asarray(False), m0)
    _, z, m, ok, _ = vma.while_loop(cond, body, state)
    return z, ok, m


# --------------------------------------------------------------------------------------------
# Forward solve shared by the three rules.


class _Forward(NamedTuple):
    """Non-differentiable by-products of the forward solve."""

    info: Info
    pre: _Prepared  # the factorisation of the scaled Q and W, reused by every backward rule
    scaling: _Scaling


@jax.jit
def solve_forward(theta, init, warm, polish, ridge, tol, max_iter):
    """Scaling, interior point, polish and ``info``.

    Jitted with every option traced, so that eager calls reuse one compilation per shape and
    dtype whatever the options, whatever is differentiated and whichever rule runs backward.
    """
    Q, c, A, b, G, h = theta
    valid = _valid(h)
    orig = _QP(_sym(Q), c, A, b, G, _safe_h(h))
    sc = _Scales(*_amaxes(orig.Q, c, A, b, G, jnp.where(valid, orig.h, 0)))
    scaling = _equilibrate(orig, valid)
    qp = _scale(orig, scaling)
    pre = _prepare(qp, valid)
    out = _ipm(orig, sc, qp, scaling, pre, valid, tol, max_iter, init, warm)
    z = _unscale(scaling, out.y, out.nu, out.lam)
    residual = out.residual

    def skip():  # (_polish's outputs, zero: the point, whether accepted, the mask)
        z = tuple(jnp.zeros(a.shape, a.dtype) for a in (out.y, out.nu, out.lam))
        return z, jnp.zeros((), bool), jnp.zeros(valid.shape, bool)

    polish = polish & (out.flag != _PINF) & (out.flag != _DINF) & pre.convex
    z_p, ok, _ = vma.cond(polish, lambda: _polish(qp, pre, out, valid, ridge, tol), skip)
    z_p = _unscale(scaling, *z_p)
    residual_p = _point_residual(orig, sc, *z_p, valid)
    ok = polish & ok & (residual_p <= jnp.maximum(residual, tol))
    z = tuple(jnp.where(ok, a, b) for a, b in zip(z_p, z, strict=True))
    residual = jnp.where(ok, residual_p, residual)
    # Status: non-finite data > nonconvex > infeasible (certificate or h_i = -inf) >
    # unbounded > converged (residual of the returned, best point) > non-finite iterate (the
    # homogeneous iterate overflowed with no certificate) > max steps.
    finite = ~jnp.any(jnp.isnan(h))
    for a in (Q, c, A, b, G):
        finite = finite & _all_finite(a)
    converged = residual <= tol
    overflow = (out.flag == _NONFINITE) | ~jnp.isfinite(residual)
    finite = finite & (~overflow | converged | ~pre.convex)
    infeasible = (out.flag == _PINF) | jnp.any(h == -jnp.inf)
    status = jnp.where(converged, Status.SUCCESS, Status.MAX_STEPS)
    status = jnp.where(out.flag == _DINF, Status.UNBOUNDED, status)
    status = jnp.where(infeasible, Status.INFEASIBLE, status)
    status = jnp.where(pre.convex, status, Status.NONCONVEX)
    status = jnp.where(finite, status, Status.NONFINITE)
    # Outputs that cannot be mistaken for a solution: NaN when the data are not finite, Q is
    # not convex or the feasible set is empty (no point to return).
    bad = (status == Status.NONFINITE) | (status == Status.NONCONVEX) | infeasible
    z = tuple(jnp.where(bad, jnp.nan, a) for a in z)
    info = make_info(out.num_steps, residual, status == Status.SUCCESS, status)
    return z, _Forward(info, pre, scaling)


def point_residual(theta, z):
    """The relative KKT residual (as ``info.residual``) of ``z = (y, nu, lam)``.

    ``theta = (Q, c, A, b, G, h)`` in original units; the slack is ``max(h - G y, 0)``.
    """
    Q, c, A, b, G, h = theta
    valid = _valid(h)
    orig = _QP(_sym(Q), c, A, b, G, _safe_h(h))
    sc = _Scales(*_amaxes(orig.Q, c, A, b, G, jnp.where(valid, orig.h, 0)))
    return _point_residual(orig, sc, *z, valid)


def _central_path_point(theta, z, mu, tol, max_iter, pre=None, scaling=None):
    """Newton's method on the barrier KKT system ``lam * s = mu`` from the QP solution ``z``.

    Runs on the scaled problem (where the barrier reads ``lam^ s^ = sigma mu``). The start
    pushes ``s`` and ``lam`` to ``s * lam >= mu`` (active rows get ``s = mu/lam``, inactive
    rows ``lam = mu/s``); steps keep ``s, lam > 0`` (fraction to the boundary 0.99).
    ``pre`` and ``scaling`` are the forward pass's (computed when absent). Returns the point
    in original units.
    """
    Q, c, A, b, G, h = theta
    valid = _valid(h)
    orig = _QP(_sym(Q), c, A, b, G, _safe_h(h))
    scaling = _equilibrate(orig, valid) if scaling is None else scaling
    qp = _scale(orig, scaling)
    pre = _prepare(qp, valid) if pre is None else pre
    sc = _Scales(*_amaxes(qp.Q, qp.c, qp.A, qp.b, qp.G, jnp.where(valid, qp.h, 0)))
    dtype = Q.dtype
    vf = valid.astype(dtype)
    mu = jnp.asarray(mu, dtype) * scaling.sigma
    y, nu, lam = _scale_point(scaling, *z)
    root = jnp.sqrt(mu)
    s = jnp.where(valid, qp.h - _mm(qp.G, y), 1)
    s = jnp.where(valid, jnp.maximum(s, mu / jnp.maximum(lam, root)), 1)
    lam = jnp.where(valid, jnp.maximum(lam, mu / jnp.maximum(s, root)), 0)
    p = nu.shape[0]

    def residual(y, nu, lam, s):
        rd, rp, ri = _kkt_vectors(qp, y, nu, lam, s, valid)
        rd_, rp_, ri_, rc_, y_, nu_, lam_ = _amaxes(rd, rp, ri, vf * (s * lam - mu), y, nu, lam)
        primal = jnp.maximum(rp_, ri_) / (1 + sc.b + sc.h + (sc.A + sc.G) * y_)
        dual = rd_ / (1 + sc.c + sc.Q * y_ + sc.A * nu_ + sc.G * lam_)
        return jnp.max(jnp.stack([primal, dual, rc_ / mu]))

    def body(state):
        it, y, nu, lam, s, _ = state
        rd, rp, ri = _kkt_vectors(qp, y, nu, lam, s, valid)
        m, e, chol_s = _newton_system(qp, pre, lam, s, valid)
        rc = vf * (s * lam - mu)
        # Newton step: eliminating ds = -(rc + s dlam) / lam leaves
        # [Q A' G'; A 0 0; G 0 -S/Lam] [dy; dnu; dlam] = [-rd; -rp; -ri + rc/lam].
        t = -_dual_step(pre, y, jnp.concatenate([nu, vf * lam]), 1, rd)
        lam_safe = jnp.where(valid & (lam > 0), lam, 1)
        r2 = jnp.concatenate([-rp, jnp.where(valid, -ri + rc / lam_safe, 0)])
        dy, x2 = _kkt_solve(pre, chol_s, m, e, (-rd, r2), pre.refine, t)
        dnu, dlam = x2[:p], jnp.where(valid, x2[p:], 0)
        ds = jnp.where(valid, -ri - _mm(qp.G, dy), 0)
        t = jnp.minimum(_step_to_boundary(s, ds, valid), _step_to_boundary(lam, dlam, valid))
        t = jnp.minimum(1, 0.99 * t)
        y, nu, lam = y + t * dy, nu + t * dnu, lam + t * dlam
        s = jnp.where(valid, s + t * ds, 1)
        return it + 1, y, nu, lam, s, residual(y, nu, lam, s)

    def cond(state):
        return (state[0] < max_iter) & (state[5] > tol)

    state = (jnp.asarray(0, jnp.int32), y, nu, lam, s, residual(y, nu, lam, s))
    _, y, nu, lam, _, _ = vma.while_loop(cond, body, state)
    return _unscale(scaling, y, nu, jnp.where(valid, lam, 0))


# --------------------------------------------------------------------------------------------
# Backward rules. Each is jitted on its own, so that eager calls reuse the compilation. Every
# system is solved through the forward pass's factorisation of the scaled problem
# (:func:`_solve_original`).


@jax.jit
def _implicit_backward(zbar, z, theta, pre, scaling, ridge, tol):
    """The ``"implicit"`` rule: :func:`implicit_backward` on the masked active-set residual.

    The adjoint system is the masked KKT matrix with ``-ridge`` on the multiplier diagonal,
    solved through the forward pass's factorisation of ``Q`` (one Cholesky of size ``p + k``).
    """

    def adjoint_solve(vjp_z, zbar, z, theta, aux):
        del vjp_z, aux  # the matrix is built from the data
        y, nu, lam = z
        _, _, _, _, G, h = theta
        p = nu.shape[0]
        m, _ = active_system(p, _active_mask(y, lam, G, h, tol), ridge, y.dtype)
        ybar, nubar, lambar = zbar
        r = (ybar, jnp.concatenate([nubar, lambar]))
        w, mu = _solve_original(pre, scaling, m, 1 - m, r, ridge=ridge)
        return w, mu[:p], mu[p:]

    return implicit_backward(_active_residual(tol), adjoint_solve)(zbar, z, theta, None)


@jax.jit
def _relaxed_backward(zbar, z, theta, pre, scaling, ridge, mu, tol, max_iter):
    """The ``"relaxed"`` rule: :func:`implicit_backward` on the central-path residual.

    The central-path point ``z_mu`` for this ``mu`` is computed here, from the QP solution
    ``z`` (only when a gradient is asked for). The Jacobian ``J`` of
    ``[Q y + c + A'nu + G'lam; A y - b; lam * (h - G y) - mu]`` at ``z_mu`` is not symmetric,
    but ``J = D K`` with ``D = diag(1, 1, -lam)`` and ``K`` the symmetric Newton matrix with
    ``e = s / lam``, so ``J' u = zbar`` is ``u = D^-1 K^-1 zbar``.
    """
    z_mu = _central_path_point(theta, z, mu, tol, max_iter, pre, scaling)

    def adjoint_solve(vjp_z, zbar, z, theta, aux):
        del vjp_z, aux
        y, nu, lam = z
        _, _, _, _, G, h = theta
        dtype = y.dtype
        p = nu.shape[0]
        valid = _valid(h)
        slack = _safe_h(h) - _mm(G, y)
        lam_v = jnp.where(valid, lam, 1)
        # Rows of h_i = +inf read lam_i = 0 (D_i = -1, e_i = 1); -ridge on the equality block.
        m = jnp.ones((p + lam.shape[0],), dtype)
        e = jnp.concatenate([jnp.zeros((p,), dtype), jnp.where(valid, slack / lam_v, 1)])
        ybar, nubar, lambar = zbar
        r = (ybar, jnp.concatenate([nubar, lambar]))
        ridge_eq = jnp.concatenate([jnp.full((p,), ridge, dtype), jnp.zeros_like(lam)])
        w, x2 = _solve_original(pre, scaling, m, e, r, ridge=ridge_eq)
        return w, x2[:p], -x2[p:] / lam_v

    return implicit_backward(_relaxed_residual(mu), adjoint_solve)(zbar, z_mu, theta, None)


@jax.jit
def _penalty_backward(zbar, z, theta, pre, scaling, alpha, ridge, tol):
    """Kornowski et al.'s first-order oracle as a VJP (quadratic form).

    For the cotangent ``(v, rho_E, rho_I)`` (normalised to unit norm, the result rescaled) and
    the constraints ``C_I = [A; G_I]`` (equalities and active rows), solve the penalty problem

        (Q + alpha^-2 C_I'C_I) Delta = -alpha^2 v - C_I' rho ,   y_hat = y* + Delta ,

    i.e. ``y_hat = argmin alpha^2 v'y + L(y, nu*, lam*) + alpha^-2/2 ||C_I y - d_I + alpha^2
    rho||^2`` with ``C_I y* = d_I``, and return the gradient in ``theta`` of

        alpha^-2 [L(theta, y_hat) - L(theta, y*)] + e' (C_I(theta) y_hat - d_I(theta)) ,
        e = alpha^-4 (C_I Delta + alpha^2 rho)   (held fixed).

    The Lagrangian difference is expanded exactly (``L`` is quadratic in ``y``), so no
    cancellation of large values occurs. As ``alpha -> 0``, ``Delta ~ -alpha^2 w`` and
    ``e -> -mu``: the implicit rule, with error ``O(alpha^2)``. The multiplier-cotangent term
    ``rho`` is our extension (derived) of the oracle, which the paper states for objectives of
    ``y`` only.
    """
    y, nu, lam = z
    Q, c, A, b, G, h = theta
    dtype = y.dtype
    mf = _active_mask(y, lam, G, h, tol).astype(dtype)
    v, rho_e, rho_i = zbar
    rho_i = mf * rho_i
    scale = jnp.sqrt(jnp.sum(v**2) + jnp.sum(rho_e**2) + jnp.sum(rho_i**2))
    inv = jnp.where(scale > 0, 1 / jnp.where(scale > 0, scale, 1), 0)
    v, rho_e, rho_i = v * inv, rho_e * inv, rho_i * inv
    a2 = jnp.asarray(alpha, dtype) ** 2
    GI = G * mf[:, None]
    rhs = -a2 * v - _mm(A.T, rho_e) - _mm(GI.T, rho_i)
    # (Q + alpha^-2 C_I'C_I) Delta = rhs  <=>  K(m, e) (Delta, x2) = (rhs, 0) with e = alpha^2
    # on the equality and active rows (x2 = alpha^-2 C_I Delta), solved through Q's factor.
    p = A.shape[0]
    m, e = active_system(p, mf > 0, a2, dtype)
    zero = jnp.zeros((p + G.shape[0],), dtype)
    delta, _ = _solve_original(pre, scaling, m, e, (rhs, zero), delta=0.0)
    y_hat = y + delta
    e_e = (_mm(A, delta) + a2 * rho_e) / a2**2
    e_i = mf * (_mm(G, delta) + a2 * rho_i) / a2**2
    lam_v = jnp.where(_valid(h), lam, 0)

    def phi(th):
        Q_, c_, A_, b_, G_, h_ = th
        grad_l = _mm(_sym(Q_), y) + c_ + _mm(A_.T, nu) + _mm(G_.T, lam_v)
        gap = jnp.dot(grad_l, delta, precision=_HI) + 0.5 * jnp.dot(
            delta, _mm(Q_, delta), precision=_HI
        )
        penalty = jnp.dot(e_e, _mm(A_, y_hat) - b_, precision=_HI) + jnp.dot(
            e_i, _mm(G_, y_hat) - _safe_h(h_), precision=_HI
        )
        return gap / a2 + penalty

    return tuple(scale * g for g in jax.grad(phi)(theta))


# --------------------------------------------------------------------------------------------
# Validation.


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _check_options(hypergrad, tol, max_iter, ridge, alpha, mu, polish):
    if hypergrad not in HYPERGRADS:
        raise ValueError(f"hypergrad must be one of {HYPERGRADS}, got {hypergrad!r}.")
    for name, value in (("tol", tol), ("alpha", alpha), ("mu", mu)):
        if value is not None and not (_is_number(value) and value > 0):
            raise ValueError(f"{name} must be a positive Python number or None, got {value!r}.")
    if ridge is not None and not (_is_number(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a Python number >= 0 or None, got {ridge!r}.")
    if max_iter is not None and (
        isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 1
    ):
        raise ValueError(f"max_iter must be a positive integer or None, got {max_iter!r}.")
    if not isinstance(polish, bool):
        raise ValueError(f"polish must be True or False, got {polish!r}.")


def _as_float(name, x, ndim):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating) or not (
        jnp.issubdtype(x.dtype, jnp.floating)
        or jnp.issubdtype(x.dtype, jnp.integer)
        or x.dtype == bool
    ):
        raise TypeError(f"{name} must be a real array, got dtype {x.dtype}.")
    if x.ndim != ndim:
        want = "a matrix (2-D)" if ndim == 2 else "a vector (1-D)"
        raise ValueError(f"{name} must be {want}, got shape {x.shape}.")
    return x


def _check_data(Q, c, A, b, G, h):
    Q = _as_float("Q", Q, 2)
    n = Q.shape[0]
    if Q.shape != (n, n) or n == 0:
        raise ValueError(f"Q must be a non-empty square matrix, got shape {Q.shape}.")
    c = _as_float("c", c, 1)
    if c.shape != (n,):
        raise ValueError(f"c has shape {c.shape} but Q has {n} rows; c must have shape ({n},).")
    out = [Q, c]
    for mat, vec, mname, vname in ((A, b, "A", "b"), (G, h, "G", "h")):
        if (mat is None) != (vec is None):
            given, missing = (mname, vname) if vec is None else (vname, mname)
            raise ValueError(f"{given} was given without {missing}; pass both or neither.")
        if mat is None:
            out += [None, None]
            continue
        mat = _as_float(mname, mat, 2)
        vec = _as_float(vname, vec, 1)
        if mat.shape[1] != n:
            raise ValueError(
                f"{mname} has shape {mat.shape} but Q has {n} rows; "
                f"{mname} must have shape ({mat.shape[0]}, {n})."
            )
        if vec.shape != (mat.shape[0],):
            raise ValueError(
                f"{vname} has shape {vec.shape} but {mname} has {mat.shape[0]} rows; "
                f"{vname} must have shape ({mat.shape[0]},)."
            )
        out += [mat, vec]
    arrays = [x for x in out if x is not None]
    dtype = jnp.result_type(*arrays)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    Q, c, A, b, G, h = (None if x is None else x.astype(dtype) for x in out)
    if A is None:
        A, b = jnp.zeros((0, n), dtype), jnp.zeros((0,), dtype)
    if G is None:
        G, h = jnp.zeros((0, n), dtype), jnp.zeros((0,), dtype)
    return (Q, c, A, b, G, h), dtype


def _check_init(init, n, p, k, dtype):
    if init is None:
        return None
    if not (isinstance(init, (tuple, list)) and len(init) == 3):
        raise TypeError("init must be a triple (y, nu, lam) (nu or lam may be None).")
    y, nu, lam = init
    shapes = {"y": (n,), "nu": (p,), "lam": (k,)}
    out = []
    for name, x in zip(("y", "nu", "lam"), (y, nu, lam), strict=True):
        if x is None:
            if name == "y":
                raise ValueError("init y must be an array of shape (n,), got None.")
            x = jnp.zeros(shapes[name], dtype)
        x = jnp.asarray(x)
        if x.shape != shapes[name]:
            raise ValueError(f"init {name} has shape {x.shape} but must have shape {shapes[name]}.")
        out.append(lax.stop_gradient(x.astype(dtype)))
    return tuple(out)


# --------------------------------------------------------------------------------------------
# The public entry point.


def solve_qp(
    Q: ArrayLike,
    c: ArrayLike,
    A: ArrayLike | None = None,
    b: ArrayLike | None = None,
    G: ArrayLike | None = None,
    h: ArrayLike | None = None,
    *,
    C: ArrayLike | None = None,
    l: ArrayLike | None = None,  # noqa: E741
    u: ArrayLike | None = None,
    hypergrad: str = "implicit",
    tol: float | None = None,
    max_iter: int | None = None,
    ridge: float | None = None,
    alpha: float | None = None,
    mu: float | None = None,
    polish: bool = True,
    init: tuple | None = None,
    throw: bool = False,
) -> QPSolution:
    r"""Solve a dense convex QP, differentiably with respect to all of its data.

    .. math::
        \min_y \tfrac12 y^T Q y + c^T y \quad \text{s.t.} \quad A y = b,\; G y \le h

    KKT conditions: ``Q y + c + A'nu + G'lam = 0``, ``A y = b``, ``G y <= h``, ``lam >= 0``,
    ``lam * (h - G y) = 0``. Only the symmetric part of ``Q`` matters (and gets the gradient).

    **Forward.** Homogeneous self-dual interior point (Mehrotra predictor-corrector) on
    ``G y + s = h``, run on a Ruiz-equilibrated copy of the problem. ``Q + delta I`` is
    factorised once (Cholesky) together with ``W = C Q^-1 C'`` (``C = [A; G]``); each
    iteration solves the Newton matrix ``[Q, A', G'; A, 0, 0; G, 0, -diag(s/lam)]`` through
    its Schur complement ``W + diag(0, s/lam)``, one Cholesky factorisation of size ``p + k``.
    ``delta`` is at rounding level for a well-conditioned ``Q``; a singular or nearly
    singular ``Q`` (LPs, lasso-like QPs) gets ``delta = sqrt(eps)`` (relative) and every solve
    is refined against the exact matrix (a proximal interior point, exact at convergence);
    float32 solves always take one refinement step. It stops when the relative primal, dual
    and complementarity residuals of the *original* data are below ``tol``, on an
    infeasibility or unboundedness certificate of the homogeneous embedding (``tau -> 0 <
    kappa``), or when the residual has stalled below ``sqrt(tol)`` (the best iterate is kept).
    With ``polish=True`` the equality KKT system on ``I = {lam_i > s_i}`` is then solved, with
    up to three primal-dual active-set corrections of ``I`` (add violated rows, drop negative
    multipliers) near degenerate points; the result is accepted only if primal and dual
    feasible to ``tol`` and not worse, and makes ``y``, ``nu``, ``lam`` exact to rounding and
    inactive ``lam_i`` exactly 0.
    An ``h_i = +inf`` means "no constraint": the row is masked out of every iteration and
    backward system (its multiplier and cotangents are exactly 0).

    **Backward** (``hypergrad``):

    * ``"implicit"`` (exact): implicit function theorem on the active-set KKT system, in the
      static-shape masked form ``K = [Q, A', G'M; A, -eps I, 0; MG, 0, -(I-M) - eps M]`` with
      ``eps = ridge`` (in equilibrated units), solved through the forward pass's factorisation
      of ``Q`` (a Cholesky factorisation of size ``p + k`` and one refinement step). With ``(w,
      mu)`` the solution of ``K [w; mu_E; mu_I] = [ybar; nubar; lambar]`` the gradients are
      those of OptNet: ``cbar = -w``, ``Qbar = -(w y' + y w')/2``, ``bbar = mu_E``, ``Abar =
      -(nu w' + mu_E y')``, ``hbar_I = mu_I``, ``Gbar_I = -(lam_I w' + mu_I y')``, zero for
      inactive rows. Active rows (the one rule shared with ``argmin``, each row taken per unit
      norm ``|G_i|``): ``(h_i - G_i y) / |G_i| <= sqrt(tol) (1 + max_j max(|h_j|, |G_j y|) /
      |G_j|)`` *and* ``lam_i |G_i| > sqrt(tol) (1 + max_j lam_j |G_j|)``. **Weakly active rows**
      (active with a zero multiplier, where ``y*`` is not differentiable) are therefore
      *dropped*: the value returned is the one-sided derivative along perturbations that make
      those rows inactive, an element of the Clarke generalised Jacobian. ``ridge > 0`` keeps
      the gradient finite when active rows are linearly dependent (LICQ fails).
    * ``"relaxed"``: implicit function theorem on the central-path system
      ``lam_i (h - G y)_i = mu`` at the point that Newton's method finds for this ``mu`` from
      the QP solution (computed on the backward pass), as qpax does: smooth and informative
      at active constraints; at strictly complementary points it is ``O(mu / margin^2)`` from
      the exact derivative (``margin`` the smaller of the active multipliers and inactive
      slacks); at a weakly active row it averages the two one-sided derivatives. The returned
      solution is still the exact QP solution.
    * ``"penalty"``: Kornowski et al.'s first-order oracle in VJP form: one SPD solve
      with ``Q + alpha^-2 C_I'C_I`` (``C_I`` = ``A`` and the active rows of ``G``; through
      ``Q``'s factorisation, by the Woodbury identity) and one gradient of a scalar
      Lagrangian gap. Error ``O(alpha^2)``.

    Assumptions: ``Q`` positive semidefinite and the QP strictly convex on the feasible set
    (unique ``y``); the exact rules need strict complementarity and LICQ for a true
    derivative. Failures are reported in ``info.status``: ``INFEASIBLE`` (a Farkas
    certificate from the diverging multipliers, or an ``h_i = -inf``; NaN outputs: there is
    no point to return), ``UNBOUNDED`` (a direction of unbounded descent; the outputs are the
    last iterate), ``MAX_STEPS`` (with the residual reached; the best iterate),
    ``NONCONVEX`` (``Q`` indefinite beyond rounding; NaN outputs), ``NONFINITE`` (non-finite
    data or iterates; NaN outputs). Failure policy (as for every entry point, see
    :class:`~bilevel_jax.Status`): with a status other than ``SUCCESS`` every cotangent is
    NaN (per problem under ``jax.vmap``), never a finite number that looks like a
    hypergradient.

    Cost: ``n^3/3 + n^2 (p + k)`` once (Cholesky of ``Q``, then ``W``), then per iteration a
    Cholesky of size ``p + k`` and matrix-vector products (typically 8-15 iterations), the
    polish (one Cholesky of size ``p + k``, rarely up to four), and on the backward pass one
    more such Cholesky plus two solves with ``Q``'s factor (``"relaxed"`` also runs a few
    Newton steps). Best when ``p + k`` is not much larger than ``n``. Forward mode
    (``jax.jvp``) is not supported (``custom_vjp``). Under ``jax.vmap`` the ``while_loop``
    runs until the slowest member of the batch has converged, and ``lax.cond`` becomes a
    select (both branches run). The numerical options are traced inside
    the compiled solver: changing ``tol``, ``ridge``, ``alpha``, ... does not recompile it.

    Args:
      Q: ``(n, n)`` positive semidefinite matrix.
      c: ``(n,)`` vector.
      A: optional ``(p, n)`` equality matrix (with ``b``).
      b: optional ``(p,)`` equality right-hand side.
      G: optional ``(k, n)`` inequality matrix (with ``h``).
      h: optional ``(k,)`` inequality right-hand side; ``+inf`` entries mean "no constraint".
      C: optional ``(r, n)`` matrix of two-sided constraints ``l <= C y <= u`` (as in OSQP
        and jaxopt's ``BoxOSQP``; no need to stack ``[C; -C]``). Equal bounds make a row an
        equality; infinite bounds mean "no bound".
      l: lower bounds of ``C y``, a scalar or ``(r,)`` (default ``-inf``). Rows with equal
        concrete bounds are solved as equalities.
      u: upper bounds of ``C y``, a scalar or ``(r,)`` (default ``+inf``).
      hypergrad: ``"implicit"``, ``"relaxed"`` or ``"penalty"``.
      tol: relative KKT tolerance (default 1e-10 in float64, 1e-5 in float32); the active-set
        thresholds are ``sqrt(tol)`` relative.
      max_iter: interior-point iteration limit (default 50).
      ridge: ``eps >= 0`` on the multiplier diagonal of the backward KKT system (and added to
        ``Q`` in the penalty solve); default 1e-12 (float64) / 1e-6 (float32). The gradient is
        that of the regularised system (error ``O(ridge)`` under LICQ).
      alpha: accuracy of ``"penalty"`` (default 1e-3 float64, 2e-2 float32).
      mu: barrier parameter of ``"relaxed"`` (default 1e-3), absolute: ``lam_i s_i = mu``.
      polish: run the active-set polish step.
      init: optional warm start ``(y, nu, lam)`` (no gradient flows to it).
      throw: raise :class:`~bilevel_jax.SolveError` if the status is not ``SUCCESS``; under
        ``jax.jit`` it arrives as the ``jax.errors.JaxRuntimeError`` that ``SolveError``
        subclasses. Off by default (see :class:`~bilevel_jax.SolveError`).

    Returns:
      A :class:`QPSolution` ``(y, nu, lam, info)`` in the dtype of the data. With ``C``,
      ``lam`` has ``k + r`` entries: those of ``G`` (``>= 0``), then one signed multiplier
      per row of ``C`` (``> 0`` when ``C_i y = u_i`` is active, ``< 0`` when ``l_i`` is), so
      that ``Q y + c + A'nu + G'lam_G + C'lam_C = 0``.

    Raises:
      ValueError, TypeError: at trace time for bad shapes (naming the argument) or options,
        or concrete bounds with some ``l_i > u_i``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> Q, c = jnp.eye(2), jnp.array([-1.0, -1.0])
      >>> G, h = jnp.array([[1.0, 1.0]]), jnp.array([1.0])  # y_0 + y_1 <= 1
      >>> sol = solve_qp(Q, c, G=G, h=h)
      >>> print(sol.y.round(6), sol.lam.round(6), int(sol.info.status))
      [0.5 0.5] [0.5] 0
      >>> print(jax.grad(lambda h: solve_qp(Q, c, G=G, h=h).y.sum())(h).round(6))
      [1.]

    References:
      Mehrotra. On the implementation of a primal-dual interior point method. SIAM J. Optim.
      1992. Amos and Kolter. OptNet. ICML 2017. Tracy and Manchester. On the
      differentiability of the primal-dual interior-point method (qpax). 2024. Kornowski,
      Padmanabhan, Wang, Zhang, Sra. First-Order Methods for Linearly Constrained Bilevel
      Optimization. NeurIPS 2024.
    """
    _check_options(hypergrad, tol, max_iter, ridge, alpha, mu, polish)
    rows = None
    if C is not None or l is not None or u is not None:
        if init is not None:
            raise ValueError("init (a warm start) is not supported with C, l, u.")
        A, b, G, h, rows = _two_sided(C, l, u, A, b, G, h, c)
    theta, dtype = _check_data(Q, c, A, b, G, h)
    n, p, k = theta[0].shape[0], theta[2].shape[0], theta[4].shape[0]
    defaults = default_options(dtype)
    options = _Options(
        hypergrad=hypergrad,
        tol=defaults["tol"] if tol is None else float(tol),
        max_iter=defaults["max_iter"] if max_iter is None else int(max_iter),
        ridge=defaults["ridge"] if ridge is None else float(ridge),
        alpha=defaults["alpha"] if alpha is None else float(alpha),
        mu=defaults["mu"] if mu is None else float(mu),
        polish=polish,
        warm=init is not None,
    )
    init = _check_init(init, n, p, k, dtype)
    if init is None:
        init = (jnp.zeros((n,), dtype), jnp.zeros((p,), dtype), jnp.zeros((k,), dtype))
    solution = _solve(theta, init, options)
    check_info(solution.info, throw)
    if rows is not None:  # the multipliers of the rows of C, signed, in the order of C
        p0, k0, eq, ineq = rows
        nu, lam = solution.nu, solution.lam
        r_in = len(ineq)
        lam_c = jnp.zeros((len(eq) + r_in,), lam.dtype)
        lam_c = lam_c.at[eq].set(nu[p0:]).at[ineq].set(kkt.signed_multipliers(lam[k0:]))
        solution = solution._replace(nu=nu[:p0], lam=jnp.concatenate([lam[:k0], lam_c]))
    return solution


def _two_sided(C, l, u, A, b, G, h, c):  # noqa: E741
    """``l <= C y <= u`` as rows appended to ``A y = b`` and ``G y <= h``.

    Rows with equal concrete bounds become equalities; the others ``[C; -C] y <= [u; -l]``.
    Returns ``(A, b, G, h, (p0, k0, eq, ineq))``: the original numbers of rows and the indices
    of the rows of ``C`` made equalities and inequalities.
    """
    if C is None:
        raise ValueError("l and u bound C y: pass C (shape (r, n)) with them.")
    C = jnp.asarray(C)
    if C.ndim != 2:
        raise ValueError(f"C must have shape (r, n), got {C.shape}.")
    r, n = C.shape
    dtype = jnp.result_type(C, jnp.asarray(c))
    inf = jnp.asarray(jnp.inf, dtype)
    lo = jnp.broadcast_to(jnp.asarray(-inf if l is None else l, dtype), (r,))
    hi = jnp.broadcast_to(jnp.asarray(inf if u is None else u, dtype), (r,))
    concrete = raise_if_crossed(lo, hi, "l > u", "the set l <= C y <= u is empty.")
    equal = np.zeros(r, bool)
    if concrete is not None:
        lo_c, hi_c = concrete
        # Equal bounds are an equality: a pair of opposite inequalities would leave the
        # interior point no interior and the backward system two dependent rows.
        equal = np.isfinite(lo_c) & (lo_c == hi_c)
    eq, ineq = np.flatnonzero(equal), np.flatnonzero(~equal)
    A = jnp.zeros((0, n), dtype) if A is None else jnp.asarray(A)
    b = jnp.zeros((0,), dtype) if b is None else jnp.asarray(b)
    G = jnp.zeros((0, n), dtype) if G is None else jnp.asarray(G)
    h = jnp.zeros((0,), dtype) if h is None else jnp.asarray(h)
    rows = (A.shape[0], G.shape[0], eq, ineq)
    A, b = jnp.concatenate([A, C[eq]]), jnp.concatenate([b, hi[eq]])
    G_in, h_in = kkt.stack_two_sided(C[ineq], lo[ineq], hi[ineq])
    G, h = jnp.concatenate([G, G_in]), jnp.concatenate([h, h_in])
    return A, b, G, h, rows


class _Options(NamedTuple):
    """Static (hashable) options: changing one recompiles."""

    hypergrad: str
    tol: float
    max_iter: int
    ridge: float
    alpha: float
    mu: float
    polish: bool
    warm: bool


def _solve(theta, z0, options: _Options) -> QPSolution:
    """The solve and its hypergradient rule.

    The forward solve is jitted on its own (static options), so eager calls reuse its
    compilation whatever is differentiated and whichever rule runs backward.
    """
    tol, max_iter, ridge = options.tol, options.max_iter, options.ridge

    def forward(z_start, th):
        return solve_forward(th, z_start, options.warm, options.polish, ridge, tol, max_iter)

    if options.hypergrad == "implicit":

        def backward(zbar, z, th, aux):
            return _implicit_backward(zbar, z, th, aux.pre, aux.scaling, ridge, tol)

        z, aux = custom_solution(forward, backward, z0, theta)
    elif options.hypergrad == "relaxed":

        def backward(zbar, z, th, aux):
            return _relaxed_backward(
                zbar, z, th, aux.pre, aux.scaling, ridge, options.mu, tol, max_iter
            )

        z, aux = custom_solution(forward, backward, z0, theta)
    else:

        def backward(zbar, z, th, aux):
            return _penalty_backward(
                zbar, z, th, aux.pre, aux.scaling, options.alpha, ridge, tol
            )

        z, aux = custom_solution(forward, backward, z0, theta)

    y, nu, lam = z
    return QPSolution(y, nu, lam, aux.info)
