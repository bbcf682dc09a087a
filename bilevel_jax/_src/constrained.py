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

whose Jacobian is the symmetric quasi-definite masked KKT matrix of §1.3. Its transposed
solve reduces to the equality-constrained one with the active rows appended to ``A``, which
handles dependent active rows (LICQ failure) with the minimum-norm multiplier.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bilevel_jax._src import kkt, vma
from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src.types import Array


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
# Primal-dual interior point for smooth convex g (dense Newton systems).


def interior_point(fun: Callable, y0, tangent: Callable, ineq: Inequalities, tol, max_iter):
    """Mehrotra predictor-corrector interior point for ``min fun(y) s.t. G y <= h``.

    ``y0`` must satisfy the equality constraints, and ``tangent`` is the orthogonal projector
    ``P`` onto their null space (identity without them): every step stays on the affine set.
    Each iteration solves the augmented Newton system
    ``[H_P, G_P'; G_P, -diag(s / lam)] [dy; dlam] = [-r_d; -r_i + r_c / lam]``
    (``H_P = P H P + I - P``, ``G_P = G P``) for the predictor and the corrector through its
    Schur complement on the constraints, ``G_P H_P^-1 G_P' + diag(s / lam)``, which stays
    well conditioned as ``lam / s`` spreads over many orders of magnitude (the reduced
    ``H_P + G_P' diag(lam / s) G_P`` does not); then it backtracks on the KKT residual norm
    only when the full fraction-to-boundary step (0.99) is non-finite or multiplies it by
    more than 1e3 (a non-monotone safeguard for non-quadratic ``g``).

    Returns:
      ``(y, lam, num_steps, residual, converged)``.
    """
    n, dtype = y0.shape[0], y0.dtype
    fin = ineq.finite.astype(dtype)
    k_active = jnp.maximum(jnp.sum(fin), 1)
    eye = jnp.eye(n, dtype=dtype)
    P = jax.vmap(tangent)(eye).T  # dense projector (identity without equalities)
    G_P = ineq.G @ P  # masked rows are zero

    def residuals(y, lam, s):
        r_d = tangent(jax.grad(fun)(y) + ineq.G.T @ lam)
        r_i = fin * (ineq.G @ y + s - ineq.h)
        return r_d, r_i

    def merit(y, lam, s):
        # Residual norm plus the duality measure (not its square, nor the products lam_i s_i,
        # which Mehrotra's direction steers to sigma mu, not to 0).
        r_d, r_i = residuals(y, lam, s)
        return jnp.sqrt(r_d @ r_d + r_i @ r_i) + jnp.sum(fin * lam * s)

    def max_step(v, dv):
        ratios = jnp.where(dv < 0, -v / jnp.where(dv < 0, dv, -1), jnp.inf)
        return jnp.minimum(1.0, jnp.min(ratios, initial=jnp.inf))

    grad0 = tangent(jax.grad(fun)(y0))
    scale = 1 + jnp.linalg.norm(grad0)
    threshold = tol * scale

    def body(state):
        k, y, lam, s, _ = state
        r_d, r_i = residuals(y, lam, s)
        mu = jnp.sum(fin * lam * s) / k_active
        H = jax.hessian(fun)(y)
        chol = ls.factorize(P @ H @ P + (eye - P), structure="spd")
        U, W = ls.inverse_products(chol.factors[0], G_P)
        e = jnp.where(fin > 0, s / jnp.where(fin > 0, lam, 1), 1)
        chol_s = ls.factorize(W + jnp.diag(e), structure="spd")

        def direction(r_c):
            # [H_P, G_P'; G_P, -diag(s/lam)] [dy; dlam] = [-r_d; -r_i + r_c/lam] (ds eliminated),
            # through the Schur complement S = W + diag(s/lam): no product of lam/s with a
            # residual is ever formed, so nothing large cancels.
            r2 = fin * (-r_i + r_c / jnp.where(fin > 0, lam, 1))
            t = ls.solve_factorized(chol, -r_d)
            dlam = fin * ls.solve_factorized(chol_s, G_P @ t - r2)
            dy = t - U @ dlam
            ds = -r_i - fin * (ineq.G @ dy)
            return dy, dlam, ds

        # Predictor (affine scaling), then Mehrotra's centring and second-order correction.
        dy_a, dlam_a, ds_a = direction(fin * lam * s)
        alpha_a = jnp.minimum(max_step(s, ds_a), max_step(lam, dlam_a))
        mu_a = jnp.sum(fin * (lam + alpha_a * dlam_a) * (s + alpha_a * ds_a)) / k_active
        sigma = jnp.clip((mu_a / jnp.maximum(mu, jnp.finfo(dtype).tiny)) ** 3, 0.0, 1.0)
        dy, dlam, ds = direction(fin * (lam * s + ds_a * dlam_a - sigma * mu))

        alpha_max = 0.99 * jnp.minimum(max_step(s, ds), max_step(lam, dlam))
        alphas = alpha_max * 0.5 ** jnp.arange(30, dtype=dtype)
        current = merit(y, lam, s)
        trial = jax.vmap(lambda a: merit(y + a * dy, lam + a * dlam, s + a * ds))(alphas)
        # Mehrotra's full step (to 0.99 of the boundary) unless it is non-finite or multiplies
        # the merit by more than 1e3 (non-monotone: a monotone Armijo test on this merit stalls
        # Mehrotra's method far from the central path); otherwise Armijo backtracking.
        full = jnp.isfinite(trial[0]) & (trial[0] <= 1e3 * current)
        ok = trial <= (1 - 1e-4 * alphas) * current
        backtracked = jnp.where(jnp.any(ok), alphas[jnp.argmax(ok)], alphas[-1])
        alpha = jnp.where(full, alpha_max, backtracked)
        y, lam, s = y + alpha * dy, lam + alpha * dlam, s + alpha * ds
        return k + 1, y, fin * lam, jnp.where(fin > 0, s, 1), converged(y, lam, s)

    def converged(y, lam, s):
        r_d, r_i = residuals(y, lam, s)
        mu = jnp.sum(fin * lam * s) / k_active
        res = jnp.sqrt(r_d @ r_d + r_i @ r_i)
        return (res <= threshold) & (mu <= threshold)

    s0 = jnp.where(fin > 0, jnp.maximum(ineq.slack(y0), 1.0), 1.0)
    lam0 = fin
    state = (jnp.asarray(0), y0, lam0, s0, converged(y0, lam0, s0))
    k, y, lam, s, conv = vma.while_loop(
        lambda st: (st[0] < max_iter) & ~st[4], body, state
    )
    r_d, r_i = residuals(y, lam, s)
    mu = jnp.sum(fin * lam * s) / k_active
    return y, lam, k, jnp.sqrt(r_d @ r_d + r_i @ r_i + mu**2), conv
