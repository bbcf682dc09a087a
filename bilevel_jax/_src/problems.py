"""Seed bilevel problems of the papers (SIGD and F2CBA experiments), as data plus functions.

Every generator returns a :class:`BilevelProblem`: an upper level ``f(x, y)``, a lower level
``g(y, x)`` (variables first, as in :func:`~bilevel_jax.argmin`), its linear constraints as
``eq(x) -> (A, b)``, ``ineq(x) -> (G, h)`` and/or ``box(x) -> (lo, hi)``, and a starting
point ``x0``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from bilevel_jax._src.argmin import argmin
from bilevel_jax._src.projections import Box, Simplex
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
      eq: ``eq(x) -> (A, b)`` for ``A y = b``, or ``None``.
      projection: the upper-level domain ``X`` (a set such as :class:`~bilevel_jax.Box`, or
        a callable ``x -> Proj_X(x)``), or ``None`` for ``R^d``. The algorithms of
        :mod:`bilevel_jax.algorithms` project onto it when they are given the problem and
        no ``projection`` of their own.
    """

    f: Callable
    g: Callable
    x0: Array
    dim_y: int
    ineq: Callable | None = None
    box: Callable | None = None
    eq: Callable | None = None
    projection: Any = None

    def lower(self, x, **kwargs) -> Solution:
        """Solve the lower level at ``x`` with :func:`~bilevel_jax.argmin` (differentiable)."""
        y0 = jnp.zeros(self.dim_y, jnp.result_type(x))
        return argmin(self.g, y0, x, eq=self.eq, ineq=self.ineq, box=self.box, **kwargs)

    def value(self, x, **kwargs):
        """The hyperobjective ``F(x) = f(x, y*(x))``; ``jax.grad`` of it is the hypergradient."""
        return self.f(x, self.lower(x, **kwargs).y)


def sigd_quadratic(equation: int) -> BilevelProblem:
    """The SIGD quadratic problems (Khanduri et al., ICML 2023), equations 14, 16, 17, 18.

    ``d_x = d_y = 2``; box ``[-1, 1]^2`` (14, 16, 17) or ``[-5, 5]^2`` with
    ``-5 <= y_1 + y_2 <= 5`` (18), written as ``G y <= h``. Closed forms (derived here):
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
    ``dF/dx = 1`` below it and ``2`` above it. The upper-level domain is ``X = [0, 1]``
    (``projection = Box(0, 1)``; outside it ``y*`` would leave the formula above), so the
    minimiser is ``x = 0`` with ``F = sqrt(0.6)``.
    """

    def f(x, y):
        return x + y[0]

    def g(y, x):
        return (y[0] ** 2 - x**2) ** 2

    return BilevelProblem(f, g, jnp.asarray(0.5), 1, box=lambda x: (jnp.sqrt(0.6), 1.0),
                          projection=Box(0.0, 1.0))


def kornowski_l1(seed: int = 1, dim_x: int = 100, dim_y: int = 200, dist: str = "uniform"):
    """Problem L.1 of Kornowski et al. (NeurIPS 2024), with the authors' draw order.

    ``min_x c'y* + 0.01 ||x||^2 + 0.01 ||y*||^2``,
    ``y* = argmin_{A y <= b} 1/2 y'Qy + x'P y``; draws (NumPy ``RandomState(seed)``), in order:
    ``L`` (dy x dy), ``c`` (normalised), ``Q = L'L + I``, ``P`` (dx x dy), ``A`` (m x dy, m = dy/5),
    ``b`` (m), ``x0`` (dx); ``dist="uniform"`` (the code, default) or ``"normal"`` (the text).
    The authors draw with ``torch.rand``, so the same seed gives a different instance here
    (seed 1 starts at ``F(x0) = 1.087``, the paper's at 0.97).

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


def _cast(a, x):
    """The NumPy array ``a`` as a JAX array of ``x``'s floating dtype (float32 in, float32 out)."""
    return jnp.asarray(a, jnp.result_type(x))


def coupled_benchmark(seed: int = 0, dim_x: int = 50, dim_y: int = 50,
                      num_constraints: int = 10):
    r"""The coupled 50/50/10 quadratic benchmark of the SIGD group.

    .. math::
        \min_x\ \tfrac12 x^T P_u x + x^T Q_u y^* + \tfrac12 {y^*}^T R_u y^* + c_u^T x + d_u^T y^*,
        \quad y^*(x) = \arg\min_{A y + B x \le b}\ \tfrac12 x^T P_l x + x^T Q_l y
        + \tfrac12 y^T R_l y

    with ``P_u = R_u = P_l = R_l = 2 I``, ``c_u = d_u = 1``, ``Q_u = 0.1 U[0,1]``,
    ``Q_l = U[0,1]`` (both ``dim_x x dim_y``) and ``A, B, b ~ U[0,1]``. The constraints are
    *coupled*: the lower level depends on ``x`` through ``ineq(x) = (A, b - B x)`` as well as
    through ``g``. ``H = 2 I`` and ``J = Q_l^T``; on the active set ``I`` (the KKT rule)
    ``Dy* = -N Q_l^T - (1/2) A_I^T S^{-1} B_I``, ``S = A_I A_I^T / 2``,
    ``N = (I - A_I^T (A_I A_I^T)^{-1} A_I) / 2``.

    Draws (NumPy ``RandomState(seed)``), in the order of the source
    (``ctphan99/testbilevel``, ``BilevelLinearConstraints/problems.py::cvx_prob``, then the
    first run's starting point of ``experiments.py::exp_init``): ``Q_u`` (dx x dy, times 0.1),
    ``Q_l`` (dx x dy), ``A`` (k x dy), ``B`` (k x dx), ``b`` (k), ``x0`` (dx). The source draws
    from NumPy's global generator without a seed; ``seed`` fixes it here. (The source's comment
    reads ``A x + B y <= b`` with ``A`` drawn ``k x d_x``, but its solver uses ``A y + B x <= b``;
    the two agree at ``d_x = d_y`` and the solver's reading is the one kept.) With nonnegative
    data and ``x`` near ``x0`` (positive) no constraint is active; negative ``x`` activates them.
    At ``x0`` itself :func:`~bilevel_jax.argmin`'s interior point currently stalls (status
    ``MAX_STEPS``, though ``y`` is right); ``solve_qp(**data["qp"](x))`` solves it.

    Args:
      seed: the NumPy seed.
      dim_x: ``d_x``, size of the upper-level variable.
      dim_y: ``d_y``, size of the lower-level variable.
      num_constraints: ``k``, number of coupled inequality rows.

    Returns:
      ``(problem, data)``: a :class:`BilevelProblem` and the dict of NumPy arrays
      ``P_u, Q_u, R_u, c_u, d_u, P_l, Q_l, R_l, A, B, b, x0``, plus ``qp``: ``qp(x)`` returns
      the lower level at ``x`` as the keyword arguments of :func:`~bilevel_jax.solve_qp`
      (``Q=R_l, c=Q_l^T x, G=A, h=b - B x``, JAX arrays in ``x``'s dtype; the ``g`` terms
      constant in ``y`` dropped), so ``solve_qp(**data["qp"](x)).y`` is ``y*(x)``,
      differentiably.

    Examples:
      >>> import jax
      >>> problem, data = coupled_benchmark(seed=0)
      >>> x = -0.05 * problem.x0  # five coupled rows active
      >>> hypergradient = jax.grad(problem.value)(x)

    References:
      Khanduri et al. Linearly Constrained Bilevel Optimization: A Smoothed Implicit Gradient
      Approach. ICML 2023 (the setting as re-implemented in ``ctphan99/testbilevel``).
    """
    for name, value in (("dim_x", dim_x), ("dim_y", dim_y), ("num_constraints", num_constraints)):
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    rng = np.random.RandomState(seed)
    Q_u = 0.1 * rng.rand(dim_x, dim_y)
    Q_l = rng.rand(dim_x, dim_y)
    A = rng.rand(num_constraints, dim_y)
    B = rng.rand(num_constraints, dim_x)
    b = rng.rand(num_constraints)
    x0 = rng.rand(dim_x)
    data = dict(P_u=2 * np.eye(dim_x), Q_u=Q_u, R_u=2 * np.eye(dim_y), c_u=np.ones(dim_x),
                d_u=np.ones(dim_y), P_l=2 * np.eye(dim_x), Q_l=Q_l, R_l=2 * np.eye(dim_y),
                A=A, B=B, b=b, x0=x0)

    def f(x, y):
        return (x @ x + x @ (_cast(Q_u, x) @ y) + y @ y + jnp.sum(x) + jnp.sum(y))

    def g(y, x):
        return x @ x + x @ (_cast(Q_l, x) @ y) + y @ y

    def ineq(x):
        return _cast(A, x), _cast(b, x) - _cast(B, x) @ x

    def qp(x):
        G, h = ineq(x)
        return dict(Q=_cast(data["R_l"], x), c=_cast(Q_l, x).T @ x, G=G, h=h)

    data["qp"] = qp
    return BilevelProblem(f, g, jnp.asarray(x0), dim_y, ineq=ineq), data


def _max_flow(capacity: np.ndarray, source: int, sink: int) -> float:
    """Maximum ``source -> sink`` flow value by Edmonds–Karp (BFS augmenting paths), NumPy."""
    residual = np.array(capacity, dtype=np.float64)
    n = residual.shape[0]
    tiny = 1e-12 * max(float(residual.max(initial=0.0)), 1.0)
    value = 0.0
    while True:
        parent = np.full(n, -1)
        parent[source] = source
        queue = [source]
        for u in queue:  # the list grows while it is read: a breadth-first search
            for v in np.flatnonzero((residual[u] > tiny) & (parent < 0)):
                parent[v] = u
                queue.append(int(v))
        if parent[sink] < 0:
            return value
        path, v = [], sink
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[u, v] for u, v in path)
        for u, v in path:
            residual[u, v] -= push
            residual[v, u] += push
        value += push


def toll_network(seed: int = 0, num_nodes: int = 10, gamma: float = 0.05,
                 budget: float = 100.0):
    r"""The network toll (attack) problem of the SIGD authors.

    A complete digraph on ``n = num_nodes`` nodes (``E = n (n - 1)`` edges ``(i, j)``,
    ``i != j``, in row-major order), capacities ``cap ~ U[100, 1000]``, edge costs
    ``c ~ U[5, 30]``. The operator routes ``demand`` units from node ``0`` (source) to node
    ``n - 1`` (sink) at minimum regularised cost under the attacker's tolls ``x``:

    .. math::
        y^*(x) = \arg\min_y\ (c + x)^T y + \tfrac{\gamma}{2} \|y\|^2 \quad
        \text{s.t.}\ N y = e,\ 0 \le y \le cap

    with ``N`` the node-arc incidence matrix without the sink's row (``n - 1`` independent
    rows: out-flow minus in-flow), ``e = demand * e_source``. The attacker maximises the
    operator's cost, ``min_x f(x, y*) = -(c + x)^T y*``, over the budget simplex
    ``{x >= 0, 1^T x = budget}`` (``data["projection"].project``, a :class:`~bilevel_jax.Simplex`).
    ``H = gamma I``, ``J = I``: ``Dy* = -(1/gamma)(I - A_I^T (A_I A_I^T)^{-1} A_I)`` with
    ``A_I`` the conservation rows and the active bound rows, so the hypergradient is
    ``-y* + (1/gamma) P_I (c + x)`` (``P_I`` the projector onto ``null(A_I)``).

    Demand: the source reads "0.75 x total capacity into the sink", which can exceed the
    maximum flow (when the source's out-capacity or another cut is smaller than the sink's
    in-capacity, the lower level is infeasible); here ``demand = 0.75 x`` the maximum
    ``0 -> n-1`` flow (= the minimum cut, Edmonds–Karp), which is always strictly feasible.
    SIGD's perturbation ``q = 1e-3 u/||u||`` is left to :func:`~bilevel_jax.perturb_linear`.

    Solving: ``problem.lower``/``problem.value`` go through :func:`~bilevel_jax.argmin`
    (equalities plus box rows for its interior point), which does not converge on this
    problem at present; ``data["qp"]`` gives the same lower level to
    :func:`~bilevel_jax.solve_qp` (Mehrotra interior point, about 11 iterations), with the same
    active-set hypergradient.

    Draws (NumPy ``RandomState(seed)``), in order: ``cap`` (E), ``c`` (E).

    Args:
      seed: the NumPy seed.
      num_nodes: ``n >= 3``.
      gamma: the regularisation ``gamma > 0`` (the authors' code: ``[0.01, 0.1]``).
      budget: the attacker's total toll ``> 0``.

    Returns:
      ``(problem, data)``: a :class:`BilevelProblem` (``eq`` and ``box`` set, ``x0`` the
      uniform attack ``budget / E``) and the dict ``edges`` (E x 2 int), ``capacity``,
      ``cost``, ``incidence`` (the ``n - 1`` x E matrix ``N``), ``supply`` (``e``),
      ``source``, ``sink``, ``demand``, ``max_flow``, ``gamma``, ``budget``, ``x0`` (NumPy),
      ``projection`` (a :class:`~bilevel_jax.projections.Simplex` of total ``budget``) and
      ``qp``: ``qp(x)`` returns the lower level as the keyword arguments of
      :func:`~bilevel_jax.solve_qp` (``Q = gamma I, c = cost + x, A = N, b = e``, the bounds
      as ``G = [I; -I]``, ``h = [cap; 0]``), so ``solve_qp(**data["qp"](x)).y`` is ``y*(x)``.

    Examples:
      >>> import jax
      >>> import bilevel_jax as bj
      >>> problem, data = toll_network(seed=0)
      >>> def F(x):  # the lower level as a QP (see the note on argmin above)
      ...     return problem.f(x, bj.solve_qp(**data["qp"](x)).y)
      >>> x = data["projection"].project(problem.x0 - 1e-3 * jax.grad(F)(problem.x0))

    References:
      Tsaknakis, Khanduri, Hong. An implicit gradient-type method for linearly constrained
      bilevel problems. ICASSP 2022.
    """
    if not isinstance(num_nodes, (int, np.integer)) or num_nodes < 3:
        raise ValueError(f"num_nodes must be an integer >= 3, got {num_nodes!r}.")
    if not gamma > 0:
        raise ValueError(f"gamma must be positive, got {gamma!r}.")
    if not budget > 0:
        raise ValueError(f"budget must be positive, got {budget!r}.")
    n = num_nodes
    edges = np.array([(i, j) for i in range(n) for j in range(n) if i != j])
    num_edges = edges.shape[0]
    rng = np.random.RandomState(seed)
    capacity = rng.uniform(100.0, 1000.0, num_edges)
    cost = rng.uniform(5.0, 30.0, num_edges)
    source, sink = 0, n - 1
    cap_matrix = np.zeros((n, n))
    cap_matrix[edges[:, 0], edges[:, 1]] = capacity
    max_flow = _max_flow(cap_matrix, source, sink)
    demand = 0.75 * max_flow
    incidence = np.zeros((n, num_edges))
    incidence[edges[:, 0], np.arange(num_edges)] = 1.0
    incidence[edges[:, 1], np.arange(num_edges)] = -1.0
    incidence = np.delete(incidence, sink, axis=0)
    supply = np.zeros(n - 1)
    supply[source] = demand
    x0 = np.full(num_edges, budget / num_edges)
    data = dict(edges=edges, capacity=capacity, cost=cost, incidence=incidence, supply=supply,
                source=source, sink=sink, demand=demand, max_flow=max_flow, gamma=gamma,
                budget=budget, x0=x0, projection=Simplex(budget))

    def f(x, y):
        return -(_cast(cost, x) + x) @ y

    def g(y, x):
        return (_cast(cost, x) + x) @ y + 0.5 * gamma * y @ y

    def eq(x):
        return _cast(incidence, x), _cast(supply, x)

    def box(x):
        return jnp.zeros(num_edges, jnp.result_type(x)), _cast(capacity, x)

    def qp(x):
        A, b = eq(x)
        lo, hi = box(x)
        eye = jnp.eye(num_edges, dtype=jnp.result_type(x))
        return dict(Q=gamma * eye, c=_cast(cost, x) + x, A=A, b=b,
                    G=jnp.concatenate([eye, -eye]), h=jnp.concatenate([hi, -lo]))

    data["qp"] = qp
    return BilevelProblem(f, g, jnp.asarray(x0), num_edges, box=box, eq=eq), data
