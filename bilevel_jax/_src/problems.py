"""Seed bilevel problems of the papers (ALGORITHMS.md §4), as data plus functions.

Every generator returns a :class:`BilevelProblem`: an upper level ``f(x, y)``, a lower level
``g(y, x)`` (variables first, as in :func:`~bilevel_jax.argmin`), its linear constraints as
``ineq(x) -> (G, h)`` and/or ``box(x) -> (lo, hi)``, and a starting point ``x0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from bilevel_jax._src.argmin import argmin
from bilevel_jax._src.types import Array, Solution


class BilevelProblem(NamedTuple):
    """``min_x f(x, y*(x))`` with ``y*(x) = argmin_y g(y, x)`` over linear constraints.

    Attributes:
      f: upper level ``f(x, y) -> scalar``.
      g: lower level ``g(y, x) -> scalar``.
      x0: a starting point for the upper level.
      dim_y: size of the lower-level variable.
      ineq: ``ineq(x) -> (G, h)`` for ``G y <= h``, or ``None``.
      box: ``box(x) -> (lo, hi)``, or ``None``.
    """

    f: Callable
    g: Callable
    x0: Array
    dim_y: int
    ineq: Callable | None = None
    box: Callable | None = None

    def lower(self, x, **kwargs) -> Solution:
        """Solve the lower level at ``x`` with :func:`~bilevel_jax.argmin` (differentiable)."""
        y0 = jnp.zeros(self.dim_y, jnp.result_type(x))
        return argmin(self.g, y0, x, ineq=self.ineq, box=self.box, **kwargs)

    def value(self, x, **kwargs):
        """The hyperobjective ``F(x) = f(x, y*(x))``; ``jax.grad`` of it is the hypergradient."""
        return self.f(x, self.lower(x, **kwargs).y)


def sigd_quadratic(equation: int) -> BilevelProblem:
    """The SIGD quadratic problems (Khanduri et al., ICML 2023), equations 14, 16, 17, 18.

    ``d_x = d_y = 2``; box ``[-1, 1]^2`` (14, 16, 17) or ``[-5, 5]^2`` with
    ``-5 <= y_1 + y_2 <= 5`` (18), written as ``G y <= h``. Closed forms (ALGORITHMS.md §4.1):
    (16) ``y* = clip(-x, -1, 1)``, ``dF/dx_i = -10 x_i`` inside, ``x_i/2 - 5 sign(x_i)``
    outside; (17) ``y* = clip(-x, -1, 1)``, ``-4 x_i`` inside, ``x_i - 2 sign(x_i)`` outside;
    (14) ``y* = clip(-x - e_2, -1, 1)``; (18) ``y* = Proj_Y(-x - 1)``.
    """
    one = jnp.ones(2)

    def unit_box(x):
        return -1.0, 1.0

    if equation == 14:
        def f(x, y):
            return 0.25 * x @ x + 10 * x @ y - 0.25 * y @ y + one @ x + one @ y + 1

        def g(y, x):
            return x @ y + 0.5 * y @ y + x[0] + y[1]

        return BilevelProblem(f, g, jnp.asarray([1.5, -2.0]), 2, box=unit_box)
    if equation == 16:
        def f(x, y):
            return 0.25 * x @ x + 5 * x @ y - 0.25 * y @ y

        def g(y, x):
            return 0.25 * x @ x + 0.5 * x @ y + 0.25 * y @ y

        return BilevelProblem(f, g, jnp.asarray([0.5, -0.3]), 2, box=unit_box)
    if equation == 17:
        def f(x, y):
            return 0.5 * x @ x + 2 * x @ y - 0.5 * y @ y

        def g(y, x):
            return x @ y + 0.5 * y @ y

        return BilevelProblem(f, g, jnp.asarray([0.5, -0.3]), 2, box=unit_box)
    if equation == 18:
        def f(x, y):
            return 0.25 * x @ x + 2 * x @ y - 0.25 * y @ y + 1

        def g(y, x):
            return x @ y + 0.5 * y @ y + one @ x + one @ y

        G = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 1.0],
                         [-1.0, -1.0]])
        return BilevelProblem(f, g, jnp.asarray([3.0, -1.0]), 2,
                              ineq=lambda x: (G.astype(x.dtype), jnp.full(6, 5.0, x.dtype)))
    raise ValueError(f"equation must be one of (14, 16, 17, 18), got {equation!r}.")


def kink() -> BilevelProblem:
    """SIGD's kink: ``min x + y*(x)``, ``y* = argmin_{sqrt(0.6) <= y <= 1} (y^2 - x^2)^2``.

    ``y*(x) = max(x, sqrt(0.6))`` on ``[0, 1]``: ``F`` has a kink at ``x = sqrt(0.6)``, with
    ``dF/dx = 1`` below it and ``2`` above it.
    """

    def f(x, y):
        return x + y[0]

    def g(y, x):
        return (y[0] ** 2 - x**2) ** 2

    return BilevelProblem(f, g, jnp.asarray(0.5), 1, box=lambda x: (jnp.sqrt(0.6), 1.0))


def kornowski_l1(seed: int = 1, dim_x: int = 100, dim_y: int = 200, dist: str = "uniform"):
    """Problem L.1 of Kornowski et al. (NeurIPS 2024), with the authors' draw order.

    ``min_x c'y* + 0.01 ||x||^2 + 0.01 ||y*||^2``,
    ``y* = argmin_{A y <= b} 1/2 y'Qy + x'P y``; draws (NumPy ``RandomState(seed)``), in order:
    ``L`` (dy x dy), ``c`` (normalised), ``Q = L'L + I``, ``P`` (dx x dy), ``A`` (m x dy, m = dy/5),
    ``b`` (m), ``x0`` (dx); ``dist="uniform"`` (the code, default) or ``"normal"`` (the text).

    Returns:
      ``(problem, data)``: a :class:`BilevelProblem` and the dict of NumPy arrays
      ``Q, c, P, A, b, x0`` (for QP solvers such as :func:`~bilevel_jax.solve_qp`).
    """
    if dist not in ("uniform", "normal"):
        raise ValueError(f"dist must be 'uniform' or 'normal', got {dist!r}.")
    rng = np.random.RandomState(seed)
    draw = rng.rand if dist == "uniform" else rng.randn
    m = max(dim_y // 5, 1)
    L = draw(dim_y, dim_y)
    c = draw(dim_y)
    c = c / np.linalg.norm(c)
    Q = L.T @ L + np.eye(dim_y)
    P = draw(dim_x, dim_y)
    A = draw(m, dim_y)
    b = draw(m)
    x0 = draw(dim_x)
    data = dict(Q=Q, c=c, P=P, A=A, b=b, x0=x0)

    def f(x, y):
        return c @ y + 0.01 * x @ x + 0.01 * y @ y

    def g(y, x):
        return 0.5 * y @ (Q @ y) + (P.T @ x) @ y

    problem = BilevelProblem(f, g, jnp.asarray(x0), dim_y, ineq=lambda x: (jnp.asarray(A),
                                                                           jnp.asarray(b)))
    return problem, data
