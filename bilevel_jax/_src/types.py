"""Result types shared by every solution map: ``Status``, ``Info`` and ``Solution``.

Every public entry point returns a NamedTuple (hence a pytree that passes through ``jit``,
``vmap`` and ``scan``) whose last field is an :class:`Info`. Non-convergence is reported in
``info.status``, never hidden; a failed status comes with NaN cotangents, and ``throw=True``
turns it into an error (the policy is stated once, in :class:`Status`).
"""

from __future__ import annotations

import enum
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

Array = jax.Array
PyTree = Any

__all__ = [
    "Array",
    "ArrayLike",
    "Info",
    "PyTree",
    "Solution",
    "SolveError",
    "Status",
    "concrete_or_none",
    "is_successful",
]


class Status(enum.IntEnum):
    """Outcome of a solve, stored as an ``int32`` in :attr:`Info.status` (works under ``jit``).

    The failure policy is the same at every entry point (``argmin``, ``solve_qp``,
    ``saddle_point``, ``bilevel_layer``): a result never looks valid when it is not.

    * ``SUCCESS`` (and ``RANK_DEFICIENT``, whose primal solution is still unique) means the
      optimality conditions hold to the tolerance and the hypergradient is right.
    * Any other status comes with **NaN cotangents**: reverse mode through the solution
      returns NaN for every differentiable input, per problem under ``jax.vmap`` (one failed
      member of a batch does not poison the others' cotangents; a loss summed over the batch
      does become NaN, which is the signal). Forward outputs: ``NONFINITE`` from ``nan`` or
      ``inf`` in the data gives NaN outputs; the other statuses return the last iterate (or
      the last finite one; documented at each entry point), which may help diagnosis but is
      not a solution. An empty set has no point to return: NaN outputs with ``INFEASIBLE``.
      ``hypergrad="unrolled"`` differentiates the iterations actually run, whatever the
      status.
    * Inconsistent set data (``lo > hi``, a negative radius or budget) is a ``ValueError``
      when the data are concrete, and ``INFEASIBLE`` when they are traced.
    * ``throw=True`` raises :class:`SolveError` instead (see there).

    New values are only ever appended, so stored codes keep their meaning.

    Attributes:
      SUCCESS: the optimality residual met the tolerance.
      MAX_STEPS: the iteration limit was reached first; ``info.residual`` says how far it got.
      INFEASIBLE: the constraints have no solution (e.g. an inconsistent ``A y = b``, a box
        with ``lo > hi``, a simplex with a negative budget).
      UNBOUNDED: the objective is unbounded below on the feasible set (detected when it falls
        below ``-1e30`` times its initial scale, or by the solver's certificate).
      NONFINITE: an input or an iterate was ``inf`` or ``nan``.
      RANK_DEFICIENT: the equality constraints are linearly dependent but consistent; the
        primal solution is unique, the multipliers returned are the minimum-norm ones.
      DIVERGED: the iteration moved away from a solution (e.g. a growing duality gap).
      NONCONVEX: negative curvature of the lower-level objective was detected (a Cholesky
        factorisation of the Hessian failed on an indefinite matrix, or a step of L-BFGS
        met ``s' (grad(y + s) - grad(y)) < 0``; for ``solve_qp``, ``Q`` indefinite beyond
        rounding, with NaN outputs): the convexity the solver and the hypergradient rely on
        does not hold.
      SINGULAR: the Hessian at the returned point is singular (up to rounding): the
        minimiser is not unique or not isolated, so no hypergradient exists.
    """

    SUCCESS = 0
    MAX_STEPS = 1
    INFEASIBLE = 2
    UNBOUNDED = 3
    NONFINITE = 4
    RANK_DEFICIENT = 5
    DIVERGED = 6
    NONCONVEX = 7
    SINGULAR = 8

    def __str__(self) -> str:
        """The name, e.g. ``SUCCESS`` (``print`` and ``str``; ``int(s)`` gives the code)."""
        return self.name

    def __format__(self, spec: str) -> str:
        """The name in f-strings (``f"{s:>10}"``); numeric specs (``f"{s:d}"``) give the code."""
        if spec and spec[-1] in "bcdoxXneEfFgG%":
            return int.__format__(self, spec)
        return format(self.name, spec)

    @classmethod
    def name_of(cls, status: ArrayLike) -> str | np.ndarray:
        """Name(s) of status code(s), e.g. ``info.status`` of a single or a batched solve.

        Args:
          status: an integer code or an array of codes (concrete: not under ``jit``).

        Returns:
          The name (``str``) for a scalar, else a NumPy array of names of the same shape.

        Examples:
          >>> import jax.numpy as jnp
          >>> Status.name_of(jnp.array([0, 1]))
          array(['SUCCESS', 'MAX_STEPS'], dtype='<U9')
          >>> Status(int(jnp.array(2))), str(Status.SUCCESS)
          (<Status.INFEASIBLE: 2>, 'SUCCESS')
        """
        codes = np.asarray(status)
        if codes.ndim == 0:
            return cls(int(codes)).name
        names = [cls(int(code)).name for code in codes.ravel()]
        return np.asarray(names, dtype=str if names else "<U1").reshape(codes.shape)


def is_successful(status: ArrayLike) -> Array:
    """Whether ``status`` is a usable result: ``SUCCESS`` or ``RANK_DEFICIENT`` (elementwise).

    These two statuses carry a correct solution and hypergradient; every other status gets
    NaN cotangents and makes ``throw=True`` raise.
    """
    status = jnp.asarray(status)
    return (status == Status.SUCCESS) | (status == Status.RANK_DEFICIENT)


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


class SolveError(jax.errors.JaxRuntimeError):
    """Raised by a solve called with ``throw=True`` whose status is a failure.

    A failure is any status but ``SUCCESS`` and ``RANK_DEFICIENT`` (see :class:`Status`).
    The message is one line, ``bilevel_jax solve failed with status NAME (residual R)``,
    naming the first failed member of a batch and how many failed.

    Where it surfaces:

    * eagerly (concrete results), ``SolveError`` itself is raised by the call;
    * under ``jax.jit`` the status is only known when the compiled program runs, so the
      check is a host callback; XLA re-raises an exception from a callback as
      ``jax.errors.JaxRuntimeError`` (``INTERNAL: CpuCallback error calling callback``), and
      the last line of its message is ``SolveError: bilevel_jax solve failed ...``. No
      library can change that type under a plain ``jax.jit``; ``SolveError`` therefore
      subclasses ``jax.errors.JaxRuntimeError``, so ``except jax.errors.JaxRuntimeError``
      catches the failure in every mode (eager, ``jit``, ``vmap``, ``grad``), and
      ``except SolveError`` catches it eagerly;
    * under ``jax.vmap`` / ``jax.grad`` without ``jit`` the callback runs immediately and
      ``SolveError`` is raised as is.

    ``throw`` defaults to ``False`` (optimistix defaults to ``True``): the library is meant
    to run inside vmapped sweeps and training loops, where one failed member should not
    abort the whole batch or step; the status and the NaN cotangents report it instead, and
    the host callback that ``throw=True`` adds under ``jit`` synchronises with the host.
    Pass ``throw=True`` while developing, or where a failure must stop the program.
    """


def status_message(status: int, residual: float, failed: int = 1, total: int = 1) -> str:
    """Human-readable description of a failed status code (one line)."""
    name = Status(int(status)).name
    batch = f"; {failed} of {total} problems in the batch failed" if total > 1 else ""
    return (
        f"bilevel_jax solve failed with status {name} (residual {float(residual):.3e}{batch})."
    )


def _raise_on_failure(status, residual):
    status = np.asarray(status)
    residual = np.broadcast_to(np.asarray(residual), status.shape)
    bad = (status != Status.SUCCESS) & (status != Status.RANK_DEFICIENT)  # numpy: on the host
    if np.any(bad):
        index = np.flatnonzero(bad.ravel())[0]
        raise SolveError(status_message(status.ravel()[index], residual.ravel()[index],
                                        int(np.sum(bad)), status.size))


class _DropSolveErrorLog(logging.Filter):
    """Drop JAX's log record of a :class:`SolveError` raised inside a host callback.

    JAX logs every exception raised by a callback (with its traceback) before re-raising
    it; for ``throw=True`` that duplicates the error the user is about to receive.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, SolveError)


# The loggers of jax.debug.callback (jax/_src/debugging.py) and of the other callbacks; a
# renamed logger only brings the duplicate traceback back.
for _name in ("jax._src.debugging", "jax._src.callback"):
    logging.getLogger(_name).addFilter(_DropSolveErrorLog())


def concrete_or_none(x):
    """``np.asarray(x)``, or ``None`` when ``x`` is traced (under ``jit``/``vmap``/``grad``)."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def check_info(info: Info, throw: bool) -> None:
    """Raise :class:`SolveError` when ``throw`` and the status is a failure.

    With concrete values the error is raised directly; when traced it is raised from a host
    callback when the computation runs (see :class:`SolveError` for how it surfaces). The
    callback is issued outside any ``except`` block so no unrelated exception is chained.
    """
    if not throw:
        return
    status, residual = concrete_or_none(info.status), concrete_or_none(info.residual)
    if status is None or residual is None:
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
