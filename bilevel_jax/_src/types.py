"""Result types shared by every solution map: ``Status``, ``Info`` and ``Solution``.

Every public entry point returns a NamedTuple (hence a pytree that passes through ``jit``,
``vmap`` and ``scan``) whose last field is an :class:`Info`. Non-convergence is reported in
``info.status``, never hidden; ``throw=True`` turns a failed status into an error.
"""

from __future__ import annotations

import enum
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Array = jax.Array
PyTree = Any

__all__ = ["Array", "ArrayLike", "Info", "PyTree", "Solution", "SolveError", "Status"]


class Status(enum.IntEnum):
    """Outcome of a solve, stored as an ``int32`` in :attr:`Info.status` (works under ``jit``).

    Attributes:
      SUCCESS: the optimality residual met the tolerance.
      MAX_STEPS: the iteration limit was reached first; ``info.residual`` says how far it got.
      INFEASIBLE: the constraints have no solution (e.g. an inconsistent ``A y = b``).
      UNBOUNDED: the objective is unbounded below on the feasible set.
      NONFINITE: an input or an iterate was ``inf`` or ``nan``.
      RANK_DEFICIENT: the equality constraints are linearly dependent but consistent; the
        primal solution is unique, the multipliers returned are the minimum-norm ones.
      DIVERGED: the iteration moved away from a solution (e.g. a growing duality gap).
      NONCONVEX: the lower level is not convex where it must be (e.g. ``solve_qp`` with an
        indefinite ``Q``): no solution is returned (NaN outputs).
    """

    SUCCESS = 0
    MAX_STEPS = 1
    INFEASIBLE = 2
    UNBOUNDED = 3
    NONFINITE = 4
    RANK_DEFICIENT = 5
    DIVERGED = 6
    NONCONVEX = 7


class Info(NamedTuple):
    """Diagnostics of a solve.

    Attributes:
      num_steps: iterations taken (``int32``).
      residual: norm of the optimality residual at the returned point.
      converged: whether ``residual`` met the tolerance.
      status: a :class:`Status` value as an ``int32`` array.
    """

    num_steps: Array
    residual: Array
    converged: Array
    status: Array


class Solution(NamedTuple):
    """Solution of ``argmin``: primal ``y`` (a pytree like ``y0``), multipliers and diagnostics.

    Attributes:
      y: the lower-level minimiser, with the structure and dtypes of ``y0``.
      nu: multipliers of the equality constraints ``A y = b`` (shape ``(m,)``), or ``None``.
      lam: multipliers of the inequality constraints ``G y <= h`` (``>= 0``), or ``None``.
      info: an :class:`Info`.
    """

    y: PyTree
    nu: Array | None
    lam: Array | None
    info: Info


class SolveError(RuntimeError):
    """Raised by a solve called with ``throw=True`` whose status is not ``SUCCESS``."""


def status_message(status: int, residual: float) -> str:
    """Human-readable description of a status code."""
    name = Status(int(status)).name
    return f"bilevel_jax solve failed with status {name} (residual {float(residual):.3e})."


def _raise_on_failure(status, residual):
    status = np.asarray(status)
    residual = np.broadcast_to(np.asarray(residual), status.shape)
    bad = status != Status.SUCCESS
    if np.any(bad):
        index = np.flatnonzero(bad.ravel())[0]
        raise SolveError(status_message(status.ravel()[index], residual.ravel()[index]))


def check_info(info: Info, throw: bool) -> None:
    """Raise :class:`SolveError` when ``throw`` and the status is not ``SUCCESS``.

    Eagerly (concrete values) the error is raised directly; under ``jit`` or ``vmap`` it is
    raised from a host callback when the computation runs.
    """
    if not throw:
        return
    try:
        status = np.asarray(info.status)
        residual = np.asarray(info.residual)
    except jax.errors.TracerArrayConversionError:
        jax.debug.callback(_raise_on_failure, info.status, info.residual)
        return
    _raise_on_failure(status, residual)


def make_info(num_steps, residual, converged, status) -> Info:
    """Build an :class:`Info` with canonical dtypes."""
    return Info(
        jnp.asarray(num_steps, jnp.int32),
        jnp.asarray(residual),
        jnp.asarray(converged, bool),
        jnp.asarray(status, jnp.int32),
    )
