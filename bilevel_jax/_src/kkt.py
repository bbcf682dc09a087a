"""The active-set rule, written once for every solution map with inequality constraints.

At a solution of ``min g(y) s.t. A y = b, G y <= h`` with multipliers ``lam >= 0``, row ``i``
is *active* when it is tight *and* its multiplier is clearly positive:

    h_i - G_i y <= sqrt(tol) (1 + s_scale)     and     lam_i > sqrt(tol) (1 + max_j lam_j) ,

with ``s_scale`` the magnitude of the constraint values (``max(|h|, |G y|)``), every quantity
taken per unit row norm (``slack_i / |G_i|``, ``lam_i |G_i|``) so that scaling a row does not
change the rule. An interior
point stopped at a relative accuracy ``tol`` has ``lam_i s_i ~ tol``, so strictly active rows
(``lam_i >> sqrt(tol)``, ``s_i << sqrt(tol)``) and inactive rows (the reverse) are told apart
by ``sqrt(tol)`` thresholds; after a polish (the equality KKT system solved on the identified
set) inactive multipliers are exactly 0 and active slacks are at rounding level, and the rule
is unambiguous. *Weakly active* rows (tight with a zero multiplier, where the solution map has
only one-sided derivatives) are classed inactive: the derivative returned there is the one
along perturbations that make such a row inactive, an element of the Clarke generalised
Jacobian.

A polished point is *accepted* when it is primal feasible (``h - G y >= -tol (1 + s_scale)``)
and dual feasible (``lam >= -tol (1 + max lam)``) to the full tolerance ``tol``, not its
square root: a guess that misses a weakly violated row must be rejected, since the violation
is an error of the returned solution. A rejected guess ``I`` is updated by the primal-dual
active-set step ``I <- {i in I : lam_i >= 0} + {i not in I : row i violated}``.

The default tolerance depends only on the dtype (:func:`default_tol`).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

__all__ = ["active_mask", "default_tol", "polish_verdict"]


def default_tol(dtype) -> float:
    """Default relative KKT tolerance: 1e-10 in float64, 1e-5 in float32."""
    return 1e-10 if jnp.finfo(dtype).bits >= 64 else 1e-5


def _max_abs(x):
    return jnp.max(jnp.abs(x), initial=0.0)


def _per_unit_row(slack, lam, valid, bound, row_norm):
    """Slacks, multipliers and constraint magnitudes per unit row norm (row-scaling invariant)."""
    unit = jnp.where(valid & (row_norm > 0), row_norm, 1)
    bound = jnp.max(jnp.where(valid, bound / unit, 0), initial=0.0)
    return slack / unit, jnp.where(valid, lam * unit, 0), bound


def active_mask(slack, lam, valid, tol, bound, row_norm):
    """The active rows (a boolean mask, no gradient): tight, with a multiplier above the slack.

    Every quantity is taken per unit row norm (``slack_i / |G_i|``, ``lam_i |G_i|``), so that
    scaling a row of ``G y <= h`` by any positive factor does not change the rule.

    Args:
      slack: ``h - G y``, shape ``(k,)``.
      lam: the multipliers, shape ``(k,)``.
      valid: boolean ``(k,)``, False for rows that are no constraint (``h_i = +inf``).
      tol: the relative KKT tolerance of the solve (a Python float or a traced scalar).
      bound: the magnitude of each constraint, ``max(|h_i|, |G_i y|)``, shape ``(k,)``.
      row_norm: ``max_j |G_ij|``, shape ``(k,)``.
    """
    slack, lam, bound, row_norm = (lax.stop_gradient(a) for a in (slack, lam, bound, row_norm))
    slack, lam, scale = _per_unit_row(slack, lam, valid, bound, row_norm)
    tol = jnp.asarray(tol, slack.dtype)
    tight = slack <= jnp.sqrt(tol) * (1 + scale)
    # Relative to their scales, the multiplier must exceed the slack (at an interior-point
    # iterate of a strictly complementary pair one is O(1) and the other O(mu)) and rounding.
    # A threshold sqrt(tol) (1 + max |lam|) alone misclassified strongly active rows when the
    # multipliers span many orders of magnitude (Maros-Meszaros QBEACONF: max lam 3.6e6, so
    # rows with lam ~ 30 and zero slack were dropped and the hypergradient was off by 1e4).
    lam_scale = 1 + _max_abs(lam)
    positive = (lam / lam_scale > slack / (1 + scale)) & (lam > tol * lam_scale)
    return valid & tight & positive


def polish_verdict(slack, lam, mask, valid, tol, bound, row_norm):
    """Whether a polished point on the guess ``mask`` is accepted, and the next guess.

    Arguments as in :func:`active_mask` (per unit row norm), plus the guess ``mask``.

    Returns:
      ``(ok, update)``: ``ok`` when every valid row is feasible to ``tol (1 + scale)`` and
      every guessed multiplier is ``>= -tol (1 + max|lam|)``; ``update`` the primal-dual
      active-set step (keep guessed rows with nonnegative multipliers, add violated rows).
    """
    slack, lam, scale = _per_unit_row(slack, lam, valid, bound, row_norm)
    tol_s = tol * (1 + scale)
    tol_l = tol * (1 + _max_abs(lam))
    feasible = jnp.where(valid, slack >= -tol_s, True)
    ok = jnp.all(feasible) & jnp.all(jnp.where(mask, lam >= -tol_l, True))
    update = valid & jnp.where(mask, lam >= -tol_l, slack < -tol_s)
    return ok, update


def stack_two_sided(C, lo, hi):
    """``lo <= C y <= hi`` as the one-sided rows ``[C; -C] y <= [hi; -lo]``."""
    return jnp.concatenate([C, -C]), jnp.concatenate([hi, -lo])


def signed_multipliers(lam):
    """One signed multiplier per row of ``C`` from those of ``[C; -C]`` (:func:`stack_two_sided`).

    ``lam_upper - lam_lower``: positive where the upper bound is active, negative where the
    lower one is.
    """
    r = lam.shape[0] // 2
    return lam[:r] - lam[r:]
