"""Shared test problems with known answers, dtype-keyed comparisons, and the bench loader."""

from __future__ import annotations

import importlib
import pathlib
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Default tolerances by dtype (rtol, atol); call sites that loosen them say why.
_TOLERANCES = {np.dtype("float64"): (1e-9, 1e-10), np.dtype("float32"): (1e-4, 1e-5)}


def tree_allclose(actual, expected, rtol=None, atol=None):
    """Assert two pytrees are close, with tolerances keyed by the dtype of ``actual``."""
    leaves_a, tree_a = jax.tree_util.tree_flatten(actual)
    leaves_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e, f"structures differ: {tree_a} vs {tree_e}"
    for a, e in zip(leaves_a, leaves_e, strict=True):
        a, e = np.asarray(a), np.asarray(e)
        default_rtol, default_atol = _TOLERANCES.get(a.dtype, _TOLERANCES[np.dtype("float64")])
        np.testing.assert_allclose(
            a, e,
            rtol=default_rtol if rtol is None else rtol,
            atol=default_atol if atol is None else atol,
        )


class QuadraticProblem(NamedTuple):
    """``g = 1/2 y'Qy + (P'x + d)'y`` s.t. ``E y = R x + r``; ``f = 1/2 ||y - t||^2 + c'x``.

    Closed forms: ``[Q E'; E 0] [y; nu] = [-P'x - d; R x + r]``, ``Dy*`` from the same matrix.
    """

    Q: np.ndarray
    P: np.ndarray
    d: np.ndarray
    E: np.ndarray | None
    R: np.ndarray | None
    r: np.ndarray | None
    t: np.ndarray
    c: np.ndarray

    def g(self, y, x):
        return 0.5 * y @ (self.Q @ y) + (self.P.T @ x + self.d) @ y

    def eq(self, x):
        return jnp.asarray(self.E), self.R @ x + self.r

    def f(self, x, y):
        return 0.5 * jnp.sum((y - self.t) ** 2) + self.c @ x

    def kkt(self):
        if self.E is None:
            return self.Q
        m = self.E.shape[0]
        return np.block([[self.Q, self.E.T], [self.E, np.zeros((m, m))]])

    def solution(self, x):
        """Closed-form ``(y*, nu*)``."""
        x = np.asarray(x)
        rhs = -(self.P.T @ x + self.d)
        if self.E is None:
            return np.linalg.solve(self.Q, rhs), None
        z = np.linalg.solve(self.kkt(), np.concatenate([rhs, self.R @ x + self.r]))
        n = self.Q.shape[0]
        return z[:n], z[n:]

    def jacobian(self):
        """Closed-form ``(Dy*, Dnu*)`` (constant in x)."""
        n = self.Q.shape[0]
        if self.E is None:
            return -np.linalg.solve(self.Q, self.P.T), None
        Z = np.linalg.solve(self.kkt(), np.vstack([-self.P.T, self.R]))
        return Z[:n], Z[n:]

    def hypergradient(self, x):
        """Closed-form ``grad F(x) = c + Dy*^T (y* - t)``."""
        y, _ = self.solution(x)
        return self.c + self.jacobian()[0].T @ (y - self.t)


def quadratic_problem(seed=0, n=6, dx=3, m=0, coupled=True) -> QuadraticProblem:
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((n, n))
    Q = L @ L.T + n * np.eye(n)
    P = rng.standard_normal((dx, n))
    d = rng.standard_normal(n)
    t = rng.standard_normal(n)
    c = rng.standard_normal(dx)
    if m == 0:
        return QuadraticProblem(Q, P, d, None, None, None, t, c)
    E = rng.standard_normal((m, n))
    R = rng.standard_normal((m, dx)) if coupled else np.zeros((m, dx))
    r = rng.standard_normal(m)
    return QuadraticProblem(Q, P, d, E, R, r, t, c)


def nonquadratic_g(seed=0, n=5, dx=3):
    """A smooth strongly convex non-quadratic lower level ``g(y, x)`` (log-sum-exp + quartic)."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((n, n))
    Q = jnp.asarray(L @ L.T / n + np.eye(n))
    P = jnp.asarray(rng.standard_normal((dx, n)))
    W = jnp.asarray(rng.standard_normal((4, n)))

    def g(y, x):
        return (
            0.5 * y @ (Q @ y)
            + (P.T @ x) @ y
            + jax.nn.logsumexp(W @ y + jnp.sin(x).sum())
            + 0.05 * jnp.sum(y**4)
            + 0.1 * jnp.sum(jnp.cos(x)) * jnp.sum(y**2)
        )

    return g


_BENCH = str(pathlib.Path(__file__).resolve().parents[1] / "bench")


def load_bench(name):
    """Import ``bench/<name>.py`` as the module ``name``, as it imports when run as a script.

    ``bench/`` goes on ``sys.path`` (once): the scripts import their sibling ``_device`` and
    each other by name. Importing does not select or pin a device (only ``__main__`` does).
    """
    if _BENCH not in sys.path:
        sys.path.insert(0, _BENCH)
    return importlib.import_module(name)
