"""The seed problems against their closed forms (SIGD, coupled, toll, L.1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bilevel_jax as bj
from bilevel_jax._src.problems import coupled_benchmark, toll_network

from helpers import tree_allclose


@pytest.mark.parametrize("equation, slope_in, outside", [(16, -10.0, (0.5, -5.0)),
                                                         (17, -4.0, (1.0, -2.0))])
def test_sigd_quadratics_closed_form_hypergradients(equation, slope_in, outside):
    """(16), (17): y* = clip(-x), dF/dx_i = slope_in x_i inside, a x_i + b sign(x_i) outside."""
    prob = bj.problems.sigd_quadratic(equation)
    grad = jax.jit(jax.grad(prob.value))
    for x in ([0.5, -0.3], [2.0, -0.4], [-3.0, 1.5]):
        x = jnp.asarray(x)
        tree_allclose(prob.lower(x).y, jnp.clip(-x, -1, 1), atol=1e-9)
        a, b = outside
        expected = jnp.where(jnp.abs(x) < 1, slope_in * x, a * x + b * jnp.sign(x))
        tree_allclose(grad(x), expected, atol=1e-8)


def test_sigd_14_and_18_lower_levels():
    prob14 = bj.problems.sigd_quadratic(14)
    x = jnp.asarray([0.3, -0.6])
    tree_allclose(prob14.lower(x).y, jnp.clip(-x - jnp.asarray([0.0, 1.0]), -1, 1), atol=1e-9)
    # (18): y* = Proj_Y(-x - 1), the projection onto the polygon, computed as a QP.
    prob18 = bj.problems.sigd_quadratic(18)
    x = jnp.asarray([3.0, 2.5])
    G, h = prob18.ineq(x)
    proj = bj.solve_qp(jnp.eye(2), x + 1.0, G=G, h=h).y
    tree_allclose(prob18.lower(x).y, proj, atol=1e-9)
    assert float(jnp.sum(proj)) == pytest.approx(-5.0)  # the diagonal constraint is active
    e = jnp.asarray([1e-6, 0.0])
    fd = (prob18.value(x + e) - prob18.value(x - e)) / 2e-6
    tree_allclose(jax.grad(prob18.value)(x)[0], fd, rtol=1e-6)


def test_kink_problem():
    prob = bj.problems.kink()
    grad = jax.jit(jax.grad(prob.value))
    tree_allclose(grad(0.5), 1.0, rtol=1e-8)
    tree_allclose(grad(0.9), 2.0, rtol=1e-8)


def test_kink_problem_carries_its_upper_domain():
    """The kink's X = [0, 1] travels with the problem: dsigd/ssigd stay in it and reach x = 0
    (F = sqrt(0.6)); before, dsigd ran off to x = -49.5 in 50 steps."""
    prob = bj.problems.kink()
    assert isinstance(prob.projection, bj.Box)
    key = jax.random.PRNGKey(0)
    for alg in (bj.algorithms.dsigd(prob), bj.algorithms.ssigd(prob, learning_rate=0.1)):
        x, hist = jax.jit(alg.run, static_argnums=2)(prob.x0, key, 50)
        xs = np.asarray(hist.x)
        assert np.all((xs >= 0.0) & (xs <= 1.0))
        tree_allclose(x, 0.0, atol=1e-12)
        tree_allclose(prob.value(x), np.sqrt(0.6), rtol=1e-8)
    # An explicit projection still overrides the problem's own.
    x, _ = bj.algorithms.dsigd(prob, projection=bj.Box(0.2, 1.0)).run(prob.x0, key, 20)
    tree_allclose(x, 0.2, atol=1e-12)


def test_kornowski_l1_draws_and_hypergradients():
    prob, data = bj.problems.kornowski_l1(seed=1, dim_x=10, dim_y=20)
    assert data["A"].shape == (4, 20) and data["P"].shape == (10, 20)
    L = np.random.RandomState(1).rand(20, 20)  # the first draw
    tree_allclose(data["Q"], L.T @ L + np.eye(20), rtol=1e-14)
    tree_allclose(np.linalg.norm(data["c"]), 1.0)
    _, normal = bj.problems.kornowski_l1(seed=1, dim_x=10, dim_y=20, dist="normal")
    assert np.any(normal["A"] < 0)
    x = prob.x0

    def F_qp(x):
        y = bj.solve_qp(jnp.asarray(data["Q"]), jnp.asarray(data["P"]).T @ x,
                        G=jnp.asarray(data["A"]), h=jnp.asarray(data["b"])).y
        return prob.f(x, y)

    tree_allclose(jax.grad(prob.value)(x), jax.grad(F_qp)(x), atol=1e-9)
    with pytest.raises(ValueError, match="dist must be"):
        bj.problems.kornowski_l1(dist="gamma")


# ------------------------------------------------------------------ coupled 50/50/10


def test_coupled_benchmark_draws():
    prob, data = coupled_benchmark(seed=3, dim_x=6, dim_y=5, num_constraints=4)
    # The source's draw order: Q_u, Q_l, A (k x dy), B (k x dx), b, then x0.
    rng = np.random.RandomState(3)
    expected = dict(Q_u=0.1 * rng.rand(6, 5), Q_l=rng.rand(6, 5), A=rng.rand(4, 5),
                    B=rng.rand(4, 6), b=rng.rand(4), x0=rng.rand(6))
    for name, value in expected.items():
        np.testing.assert_array_equal(data[name], value)
    np.testing.assert_array_equal(prob.x0, expected["x0"])
    assert prob.dim_y == 5 and prob.eq is None and prob.box is None
    again = coupled_benchmark(seed=3, dim_x=6, dim_y=5, num_constraints=4)[1]
    assert all(np.array_equal(data[k], again[k]) for k in expected)
    assert not np.array_equal(coupled_benchmark(seed=4, dim_x=6, dim_y=5)[1]["Q_l"], data["Q_l"])
    default = coupled_benchmark()[1]
    assert default["Q_l"].shape == (50, 50) and default["A"].shape == (10, 50)
    # f and g as in the docstring, against the data at a random point; the coupled constraints.
    x, y = rng.randn(6), rng.randn(5)
    f = (0.5 * x @ data["P_u"] @ x + x @ data["Q_u"] @ y + 0.5 * y @ data["R_u"] @ y + x.sum()
         + y.sum())
    g = 0.5 * x @ data["P_l"] @ x + x @ data["Q_l"] @ y + 0.5 * y @ data["R_l"] @ y
    tree_allclose(prob.f(jnp.asarray(x), jnp.asarray(y)), f)
    tree_allclose(prob.g(jnp.asarray(y), jnp.asarray(x)), g)
    G, h = prob.ineq(jnp.asarray(x))
    tree_allclose(h, data["b"] - data["B"] @ x)
    # float32 in, float32 out (the NumPy data is cast to x's dtype).
    x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    assert prob.f(x32, y32).dtype == jnp.float32 and prob.g(y32, x32).dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in prob.ineq(x32))
    with pytest.raises(ValueError, match="num_constraints"):
        coupled_benchmark(num_constraints=0)


def _coupled_closed_form(data, x, active):
    """Coupled rows: Dy* = -N J - H^-1 A_I^T S^-1 B_I, Dlam_I = -S^-1 (A_I H^-1 J - B_I)."""
    H, J = data["R_l"], data["Q_l"].T
    A_I, B_I, b_I = data["A"][active], data["B"][active], data["b"][active]
    Hinv = np.linalg.inv(H)
    S = A_I @ Hinv @ A_I.T
    N = Hinv - Hinv @ A_I.T @ np.linalg.solve(S, A_I @ Hinv)
    Dy = -N @ J - Hinv @ A_I.T @ np.linalg.solve(S, B_I)
    Dlam = -np.linalg.solve(S, A_I @ Hinv @ J - B_I)
    # y*, lam_I from the KKT system on the active set (checked to be the solution below).
    k = len(active)
    K = np.block([[H, A_I.T], [A_I, np.zeros((k, k))]])
    z = np.linalg.solve(K, np.concatenate([-J @ x, b_I - B_I @ x]))
    return z[: H.shape[0]], z[H.shape[0]:], Dy, Dlam


def test_coupled_benchmark_hypergradient_closed_form():
    prob, data = coupled_benchmark(seed=0)
    # Near x0 (> 0) nothing is active; at -0.05 x0 five coupled rows are (margins > 0.1).
    x = -0.05 * prob.x0

    # One compiled function for every check: grad_x [F(x) + <wy, y*(x)> + <wl, lam*(x)>] gives
    # the hypergradient at wy = wl = 0 and adds Dy*^T wy + Dlam*^T wl otherwise.
    @jax.jit
    def objective(x, wy, wl):
        sol = prob.lower(x)
        return prob.f(x, sol.y) + wy @ sol.y + wl @ sol.lam, sol

    @jax.jit
    def objective_qp(x, wy, wl):  # solve_qp's rule through the same data (h = b - B x)
        sol = bj.solve_qp(**data["qp"](x))
        return prob.f(x, sol.y) + wy @ sol.y + wl @ sol.lam, sol

    zy, zl = jnp.zeros(50), jnp.zeros(10)
    (value, sol), grad = jax.value_and_grad(objective, has_aux=True)(x, zy, zl)
    assert int(sol.info.status) == bj.Status.SUCCESS
    slack = data["b"] - data["B"] @ np.asarray(x) - data["A"] @ np.asarray(sol.y)
    active = np.flatnonzero(np.asarray(sol.lam) > slack)
    assert 0 < len(active) < 10
    y_ref, lam_I, Dy, Dlam = _coupled_closed_form(data, np.asarray(x), active)
    inactive = np.setdiff1d(np.arange(10), active)
    # (y_ref, lam_I) is the solution: lam_I > 0, the other rows strictly feasible (SC holds).
    slack_ref = data["b"] - data["B"] @ x - data["A"] @ y_ref
    assert lam_I.min() > 0.1 and slack_ref[inactive].min() > 0.1
    tree_allclose(sol.y, y_ref, atol=1e-10)
    value_fn = jax.jit(prob.value)
    tree_allclose(value_fn(x), prob.f(x, jnp.asarray(y_ref)), rtol=1e-12)
    tree_allclose(value, value_fn(x), rtol=1e-12)
    x_np = np.asarray(x)
    grad_x_f = data["P_u"] @ x_np + data["Q_u"] @ y_ref + data["c_u"]
    grad_y_f = data["Q_u"].T @ x_np + data["R_u"] @ y_ref + data["d_u"]
    expected = grad_x_f + Dy.T @ grad_y_f
    tree_allclose(grad, expected, rtol=1e-9, atol=1e-9)
    tree_allclose(jax.grad(lambda x: objective_qp(x, zy, zl)[0])(x), expected, rtol=1e-9,
                  atol=1e-9)

    # Dy* and Dlam_I in random directions, against the closed forms.
    rng = np.random.RandomState(0)
    wy, wl = rng.randn(50), rng.randn(10)
    grad_w = jax.grad(lambda x: objective(x, wy, wl)[0])(x)
    tree_allclose(grad_w, expected + Dy.T @ wy + Dlam.T @ wl[active], rtol=1e-9, atol=1e-9)

    # problem.value's VJP against central differences (step 1e-4 keeps the active set: the
    # margins are > 0.1).
    check_grads(value_fn, (x,), order=1, modes=["rev"])


@pytest.mark.slow
def test_coupled_benchmark_lower_level_at_x0():
    prob, _ = coupled_benchmark(seed=0)
    assert int(prob.lower(prob.x0).info.status) == bj.Status.SUCCESS


# ------------------------------------------------------------------ network toll


def test_toll_network_data():
    prob, data = toll_network(seed=2)
    edges, cap, cost = data["edges"], data["capacity"], data["cost"]
    assert edges.shape == (90, 2) and prob.dim_y == 90 and np.all(edges[:, 0] != edges[:, 1])
    assert len({tuple(e) for e in edges}) == 90  # the complete digraph on 10 nodes
    assert cap.min() >= 100 and cap.max() <= 1000 and cost.min() >= 5 and cost.max() <= 30
    rng = np.random.RandomState(2)
    np.testing.assert_array_equal(cap, rng.uniform(100, 1000, 90))
    np.testing.assert_array_equal(cost, rng.uniform(5, 30, 90))
    again = toll_network(seed=2)[1]
    assert np.array_equal(again["capacity"], cap) and again["demand"] == data["demand"]
    # The maximum flow equals the minimum cut, by enumerating the 2^8 cuts {0} + S.
    cut = np.inf
    for mask in range(2**8):
        side = np.array([True] + [bool(mask >> i & 1) for i in range(8)] + [False])
        cut = min(cut, cap[side[edges[:, 0]] & ~side[edges[:, 1]]].sum())
    tree_allclose(data["max_flow"], cut, rtol=1e-12)
    tree_allclose(data["demand"], 0.75 * cut, rtol=1e-12)
    # Why not 0.75 x the sink's in-capacity: for seed 9 that exceeds the maximum flow.
    _, data9 = toll_network(seed=9)
    into_sink = data9["capacity"][data9["edges"][:, 1] == 9].sum()
    assert 0.75 * into_sink > data9["max_flow"] > data9["demand"]
    # The incidence matrix: out-flow minus in-flow of nodes 0..8, full row rank.
    N = data["incidence"]
    assert N.shape == (9, 90) and np.linalg.matrix_rank(N) == 9
    np.testing.assert_array_equal(N[0], (edges[:, 0] == 0) * 1.0 - (edges[:, 1] == 0))
    # x0 (uniform attack) lies on the budget simplex, and so does any projection.
    tree_allclose(jnp.sum(prob.x0), 100.0)
    z = data["projection"].project(jnp.asarray(rng.randn(90)))
    assert float(jnp.min(z)) >= 0
    tree_allclose(jnp.sum(z), 100.0)
    x32 = jnp.asarray(prob.x0, jnp.float32)
    assert prob.f(x32, x32).dtype == jnp.float32 and prob.g(x32, x32).dtype == jnp.float32
    assert all(a.dtype == jnp.float32 for a in (*prob.eq(x32), *prob.box(x32)))
    with pytest.raises(ValueError, match="gamma"):
        toll_network(gamma=0.0)
    with pytest.raises(ValueError, match="num_nodes"):
        toll_network(num_nodes=2)


def test_toll_network_lower_level_and_hypergradient():
    prob, data = toll_network(seed=0)
    gamma, cap, edges = data["gamma"], data["capacity"], data["edges"]

    @jax.jit
    def value_and_grad(x):  # F(x) = -(c + x)^T y*(x), the lower level solved as a QP
        def value(x):
            sol = bj.solve_qp(**data["qp"](x))
            return prob.f(x, sol.y), sol
        return jax.value_and_grad(value, has_aux=True)(x)

    rng = np.random.RandomState(1)
    points = [prob.x0, data["projection"].project(jnp.asarray(10 * rng.rand(90)))]
    for x in points:
        (_, sol), g = value_and_grad(x)
        assert int(sol.info.status) == bj.Status.SUCCESS  # the demand is feasible
        y = np.asarray(sol.y)
        assert y.min() >= -1e-9 and (cap - y).min() >= -1e-9
        inflow = np.bincount(edges[:, 1], y, 10)
        outflow = np.bincount(edges[:, 0], y, 10)
        tree_allclose(outflow - inflow, np.r_[data["demand"], np.zeros(8), -data["demand"]],
                      atol=1e-8)
        # H = gamma I, J = I, Dy* = -(1/gamma) (I - A_I^T (A_I A_I^T)^+ A_I), with A_I the
        # conservation rows and the active bounds (pinv: the rows can be dependent).
        lam = np.asarray(sol.lam)
        lower_bd, upper_bd = lam[90:] > y, lam[:90] > cap - y
        assert lower_bd.sum() + upper_bd.sum() > 10  # a nontrivial active set
        active = np.r_[upper_bd, lower_bd]
        slack = np.r_[cap - y, y]
        assert lam[active].min() > 1e-2 and slack[~active].min() > 1  # strict complementarity
        eye = np.eye(90)
        A_I = np.concatenate([data["incidence"], eye[upper_bd], -eye[lower_bd]])
        Dy = -(eye - np.linalg.pinv(A_I) @ A_I) / gamma
        expected = -y + Dy.T @ -(data["cost"] + np.asarray(x))
        tree_allclose(g, expected, rtol=1e-9, atol=1e-8)
        # Central differences along random directions in the simplex's tangent space: F is
        # piecewise quadratic and h = 1e-4 keeps the active set (the margins above),
        # so only rounding remains (|F| ~ 1e5: ~1e-16 * 1e5 / 1e-4 = 1e-7).
        for _ in range(2):
            u = rng.randn(90)
            u -= u.mean()
            u = jnp.asarray(u / np.linalg.norm(u))
            h = 1e-4
            fd = (value_and_grad(x + h * u)[0][0] - value_and_grad(x - h * u)[0][0]) / (2 * h)
            tree_allclose(fd, g @ u, rtol=1e-7, atol=1e-6)


@pytest.mark.slow
def test_toll_network_lower_level_through_argmin():
    prob, _ = toll_network(seed=0, num_nodes=4)
    assert int(prob.lower(prob.x0).info.status) == bj.Status.SUCCESS


def test_bilevel_problem_eq_field():
    """``eq`` reaches argmin: y* = proj_{1'y = 1}(x) = x - (1'x - 1)/2, dy*_0/dx = (1/2, -1/2)."""
    prob = bj.problems.BilevelProblem(
        f=lambda x, y: y[0], g=lambda y, x: 0.5 * jnp.sum((y - x) ** 2), x0=jnp.zeros(2),
        dim_y=2, eq=lambda x: (jnp.ones((1, 2), x.dtype), jnp.ones(1, x.dtype)))
    x = jnp.asarray([0.3, 2.0])
    sol = prob.lower(x)
    tree_allclose(sol.y, x - (jnp.sum(x) - 1) / 2)
    assert sol.nu.shape == (1,)
    tree_allclose(jax.grad(prob.value)(x), jnp.asarray([0.5, -0.5]))
