"""The active-set rule, written once for every solution map with inequality constraints.

At a solution of ``min g(y) s.t. A y = b, G y <= h`` with multipliers ``lam >= 0``, row ``i``
is *active* when it is tight *and* its multiplier is clearly positive:

    h_i - G_i y <= sqrt(tol) (1 + s_scale)     and     lam_i > sqrt(tol) (1 + max_j lam_j) ,

with ``s_scale`` the magnitude of the constraint values (``max(|h|, |G y|)``). An interior
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


def active_mask(slack, lam, valid, tol, s_scale):
    """The active rows (a boolean mask, no gradient): tight and with a clearly positive multiplier.

    Args:
      slack: ``h - G y``, shape ``(k,)``.
      lam: the multipliers, shape ``(k,)``.
      valid: boolean ``(k,)``, False for rows that are no constraint (``h_i = +inf``).
      tol: the relative KKT tolerance of the solve (a Python float or a traced scalar).
      s_scale: magnitude of the constraint values, e.g. ``max(|h|, |G y|)``.
    """
    slack, lam, s_scale = (lax.stop_gradient(a) for a in (slack, lam, s_scale))
    root = jnp.sqrt(jnp.asarray(tol, slack.dtype))
    lam_scale = _max_abs(jnp.where(valid, lam, 0))
    return valid & (slack <= root * (1 + s_scale)) & (lam > root * (1 + lam_scale))


def polish_verdict(slack, lam, mask, valid, tol, s_scale):
    """Whether a polished point on the guess ``mask`` is accepted, and the next guess.

    Returns:
      ``(ok, update)``: ``ok`` when every valid row is feasible to ``tol (1 + s_scale)`` and
      every multiplier is ``>= -tol (1 + max|lam|)``; ``update`` the primal-dual active-set
      step (keep guessed rows with nonnegative multipliers, add violated rows).
    """
    tol_s = tol * (1 + s_scale)
    tol_l = tol * (1 + _max_abs(jnp.where(valid, lam, 0)))
    feasible = jnp.where(valid, slack >= -tol_s, True)
    ok = jnp.all(feasible) & jnp.all(jnp.where(mask, lam >= -tol_l, True))
    update = valid & jnp.where(mask, lam >= -tol_l, slack < -tol_s)
    return ok, update
