"""The iteration toolkit: one loop driver, one backtracking line search, one power iteration.

Every iterative solver of the package is written as a *step* ``state -> state`` and run by
:func:`iterate`:

* forward (implicit and first-order rules): a ``while_loop`` that stops at ``max_iter`` steps
  or as soon as ``cond(state)`` is false (converged, or the step failed), keeping no tape;
* ``hypergrad="unrolled"``: a ``scan`` of *the same step* for exactly ``max_iter`` steps
  (reverse-mode differentiable), each step masked by the same ``cond``: once the forward loop
  would have stopped, the state is kept as it is (a select, so every step is paid, as under
  ``jax.vmap`` anyway). Both therefore return the same iterate and step count, and the
  unrolled rule differentiates the iteration that ran. The mask also keeps the derivative
  finite where a step taken past convergence would not be (an adaptive step that keeps
  growing once the iterate stops moving).

Step sizes chosen by a search (:func:`backtracking`) or by a curvature estimate are held
constant by the unrolled rule (``stop_gradient``): the halving counts of a backtracking search
are piecewise constant in the data, and differentiating a step-size heuristic through norms
of vanishing differences would give NaN at a fixed point. The unrolled derivative is the
derivative of the iteration with the step sizes it used.

All loops go through :mod:`bilevel_jax._src.vma`, so they run under ``jax.shard_map`` with its
default checks.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from bilevel_jax._src import vma
from bilevel_jax._src.types import PyTree

__all__ = ["backtracking", "iterate", "power_iteration", "power_start", "unit"]


def iterate(
    step: Callable, state: PyTree, cond: Callable, max_iter: int, unrolled: bool = False,
    *, like: PyTree = None,
):
    """Run ``state <- step(state)``: a ``while_loop`` forward, a ``scan`` when unrolled.

    Args:
      step: ``state -> state`` (structure, shapes and dtypes preserved).
      state: the initial state.
      cond: ``state -> bool``, whether to go on (not converged and not failed).
      max_iter: the iteration limit (a Python int).
      unrolled: run ``max_iter`` masked steps with ``lax.scan`` (reverse-mode
        differentiable) instead of the ``while_loop``.
      like: optional pytree whose ``shard_map`` axes the state must carry (see
        :func:`~bilevel_jax._src.vma.while_loop`).

    Returns:
      ``(num_steps, state)``: the steps taken (an ``int32`` scalar, the same in both modes)
      and the final state.
    """
    if unrolled:

        def masked(carry, _):
            k, s = carry
            go = cond(s)
            new = jax.tree_util.tree_map(lambda a, b: jnp.where(go, a, b), step(s), s)
            return (k + go.astype(k.dtype), new), None

        (k, state), _ = vma.scan(masked, (jnp.zeros((), jnp.int32), state), None,
                                 length=max_iter, like=like)
        return k, state

    def go_on(carry):
        k, s = carry
        return (k < max_iter) & cond(s)

    def body(carry):
        k, s = carry
        return k + 1, step(s)

    return vma.while_loop(go_on, body, (jnp.zeros((), jnp.int32), state), like=like)


def backtracking(
    trial: Callable, step, *, shrink: float | Callable = 0.5, min_step: float = 0.0,
    differentiable: bool = False,
):
    """The first accepted step of the sequence ``step, shrink(step), ...`` (Armijo-style).

    The search stops at the first ``t`` with ``trial(t)`` accepted, or once ``t <= min_step``
    (then ``ok`` is false and ``t``, ``aux`` are those of the last trial).

    Args:
      trial: ``t -> (accepted, aux)``: the acceptance test at step ``t`` and what it computed
        on the way (the trial point, its gradient, ...), reused by the caller.
      step: the first step, a scalar array of the iterate's dtype.
      shrink: a factor applied to a rejected step, or ``(t, aux) -> next t``.
      min_step: the search gives up below this step.
      differentiable: recompute ``aux`` at the accepted step outside the loop, so that it is
        differentiable in the data (for ``hypergrad="unrolled"``); the values are those the
        loop computed.

    Returns:
      ``(t, ok, aux)``; ``t`` and ``ok`` are constants for differentiation (the search itself
      is not differentiated), and so is ``aux`` unless ``differentiable``.
    """
    next_step = shrink if callable(shrink) else (lambda t, _: t * shrink)

    def cond(s):
        t, ok, _ = s
        return ~ok & (t > min_step)

    def body(s):
        t, _, aux = s
        t = next_step(t, aux)
        return lax.stop_gradient((t, *trial(t)))

    t, ok, aux = vma.while_loop(cond, body, lax.stop_gradient((step, *trial(step))))
    if differentiable:
        aux = trial(t)[1]
    return t, ok, aux


def unit(v):
    """``v / ||v||`` (``v`` itself when it is zero)."""
    return v / jnp.maximum(jnp.sqrt(jnp.sum(v * v)), jnp.finfo(v.dtype).tiny)


def power_start(like):
    """The deterministic start ``1 + i / n`` of the power iterations (shape of ``like``)."""
    n = like.shape[0]
    return jnp.ones_like(like) + jnp.arange(n, dtype=like.dtype) / max(n, 1)


def power_iteration(matvec: Callable, start, num_iter: int, *, normalize: Callable = unit):
    """``num_iter`` steps of ``v <- normalize(matvec(v))`` from ``normalize(start)``.

    For a symmetric ``M`` the iterate converges to an eigenvector of the largest absolute
    eigenvalue (when ``start`` is not orthogonal to it); callers read the estimate they need
    from it (``||M v||`` or the Rayleigh quotient ``v' M v``). The iteration count is fixed,
    so the cost is static.

    Args:
      matvec: ``v -> M v`` on flat arrays.
      start: the first vector (e.g. :func:`power_start`).
      num_iter: the number of steps.
      normalize: the normalisation (blockwise for a block-diagonal ``M``).

    Returns:
      The final normalised vector.
    """
    return vma.fori_loop(0, num_iter, lambda _, v: normalize(matvec(v)), normalize(start))
