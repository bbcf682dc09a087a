"""Tests of the Lagrangian reduction and the penalty method (T4, T5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import bilevel_jax as bj
from bilevel_jax._src.penalty_minimax import (
    bilevel_minimax_kkt,
    lagrangian_minimax,
    penalty_bilevel_minimax,
)
from bilevel_jax._src.projections import Box
from bilevel_jax._src.types import Status

from helpers import load_bench, tree_allclose

# ------------------------------------------------------------------ T4 (bilevel minimax)


def t4_g(x1, y1, y2, th):
    return y1**2 + y1 * y2 - 0.5 * y2**2 + x1 * y1 - 0.5 * x1 * y2


def t4_f(x1, x2, y1, y2, th):
    return 0.5 * x1**2 + x2 * (x1 - 1) - 0.5 * x2**2 + 0.5 * (y1 - th) ** 2 + 0.5 * y2**2


X1_STAR = 30 / 89
T4_TABLE = {10.0: (0.343234, 6.16e-3, 1.9e-3), 100.0: (0.337717, 6.39e-4, 2.0e-5),
            1000.0: (0.337143, 6.41e-5, 2.0e-7)}


def penalised_saddle(f, g, example, rho, theta=1.0):
    """Exact stationary point of P_rho for quadratic f, g: solve grad P = 0 (linear)."""
    flat0, unravel = ravel_pytree(example)

    def P(w):
        x1, x2, y1, y2, z1, z2 = unravel(w)
        return f(x1, x2, y1, y2, theta) + rho * (g(x1, y1, z2, theta) - g(x1, z1, y2, theta))

    H, g0 = jax.hessian(P)(flat0), jax.grad(P)(flat0)
    return unravel(np.linalg.solve(np.asarray(H), -np.asarray(g0)))


def test_t4_error_scales_like_one_over_rho():
    """x1(rho) -> 30/89 with |x1(rho) - x1*| ~ 0.064/rho and gap ~ 0.2/rho^2 (T4 table);
    one vmapped compile over rho = 10, 100, 1000."""
    rhos = jnp.asarray(list(T4_TABLE))

    @jax.jit
    @jax.vmap
    def run(rho):
        return penalty_bilevel_minimax(t4_f, t4_g, 0.0, 0.0, 0.0, 0.0, 1.0, rho0=rho,
                                       rho_max=rho, num_stages=1, tol=1e-10, max_iter=100000)

    sol = run(rhos)
    x1 = np.asarray(sol.x1)
    err = np.abs(x1 - X1_STAR)
    example = (0.0,) * 6
    for i, (rho, (x1_table, err_table, gap_table)) in enumerate(T4_TABLE.items()):
        exact = penalised_saddle(t4_f, t4_g, example, rho)
        got = [np.asarray(a)[i] for a in (sol.x1, sol.x2, sol.y1, sol.y2, sol.z1, sol.z2)]
        # Inner solve to 1e-10 (condition number ~rho) -> 1e-8 on the penalised saddle.
        tree_allclose(got, [float(e) for e in exact], rtol=0, atol=1e-8)
        tree_allclose(x1[i], x1_table, rtol=0, atol=5e-7)  # the table has 6 decimals
        tree_allclose(err[i], err_table, rtol=0.01)
        tree_allclose(float(sol.kkt.gap[i]), gap_table, rtol=0.05)  # table: 2 digits
        assert int(sol.info.status[i]) == Status.MAX_STEPS  # rho * gap > tol: not eps-KKT
    assert err[1] < 1e-3  # within 1e-3 of 30/89 at rho = 100
    slope = np.polyfit(np.log10(np.asarray(rhos)), np.log10(err), 1)[0]
    assert abs(slope + 1) < 0.02, slope
    tree_allclose(err * np.asarray(rhos), 0.064, rtol=0.04)
    # Certificates approach the lower-level best responses y1*(x1) = -x1/6, y2*(x1) = -2x1/3.
    r = np.asarray(rhos)
    assert np.all(np.abs(np.asarray(sol.z1) + x1 / 6) * r < 0.5)
    assert np.all(np.abs(np.asarray(sol.z2) + 2 * x1 / 3) * r < 0.5)


def test_t4_continuation_reaches_epsilon_kkt():
    """rho = 1, 10, 100, ... until every epsilon-KKT residual is <= tol = 1e-3 (needs
    rho * gap = 0.2/rho <= 1e-3, i.e. the rho = 1000 stage); the reported residuals are
    those of bilevel_minimax_kkt."""
    run = jax.jit(lambda th: penalty_bilevel_minimax(t4_f, t4_g, 0.0, 0.0, 0.0, 0.0, th,
                                                     rho0=1.0, rho_max=1e5, tol=1e-3))
    sol = run(1.0)
    assert int(sol.info.status) == Status.SUCCESS and bool(sol.info.converged)
    assert float(sol.rho) == 1000.0
    assert float(sol.kkt.max()) <= 1e-3
    tree_allclose(sol.info.residual, sol.kkt.max())
    kkt = bilevel_minimax_kkt(t4_f, t4_g, sol.x1, sol.x2, sol.y1, sol.y2, sol.z1, sol.z2,
                              sol.rho, 1.0)
    tree_allclose(kkt, sol.kkt)
    # eps-KKT at 1e-3: the stationarity residuals, hence |x1 - x1(rho)|, are O(1e-3).
    assert abs(float(sol.x1) - X1_STAR) < 1e-3
    assert int(sol.info.num_steps) > 0


def test_t4_gdmax_reaches_the_penalised_saddle():
    """GDmax (block-scaled ascent, adaptive Danskin descent) at rho = 100: the exact
    penalised saddle to 1e-8, hence within 1e-3 of x1* = 30/89."""
    sol = jax.jit(lambda th: penalty_bilevel_minimax(
        t4_f, t4_g, 0.0, 0.0, 0.0, 0.0, th, rho0=100.0, rho_max=100.0, tol=1e-11,
        inner_solver="gdmax", max_iter=100000))(1.0)
    exact = penalised_saddle(t4_f, t4_g, (0.0,) * 6, 100.0)
    got = (sol.x1, sol.x2, sol.y1, sol.y2, sol.z1, sol.z2)
    tree_allclose(got, tuple(float(e) for e in exact), rtol=0, atol=1e-8)
    assert abs(float(sol.x1) - X1_STAR) < 1e-3
    assert float(sol.kkt.max()) < 1e-2  # complementarity rho * gap = 2e-3 dominates


# ------------------------------------------------------------------ T5 (Lagrangian reduction)


def t5_g(x, y, th):
    return 0.5 * jnp.sum((y - x) ** 2)


def t5_c(x, y, th):
    return jnp.asarray([y[0] + y[1] - 1.0])


def t5_f(x, y):
    return 0.5 * jnp.sum((x - jnp.asarray([2.0, 0.0])) ** 2) \
        + 0.5 * jnp.sum((y - jnp.asarray([2.0, 1.0])) ** 2)


LAG = lagrangian_minimax(t5_g, t5_c, jnp.zeros(2), jnp.zeros(2), lam_max=5.0)


def test_t5_lagrangian_saddle_point_and_its_jacobian():
    """y* = x - max(0, x1 + x2 - 1)/2 (1, 1), lam* = max(0, x1 + x2 - 1)/2 and
    dy*/dx = I - aa'/2 (active) or I (inactive), through saddle_point's masked implicit rule."""
    xs = jnp.asarray([[1.75, 0.25], [0.2, 0.3], [1.0, 0.6]])

    @jax.jit
    @jax.vmap
    def run(x):
        sol = LAG.solve(x, jnp.zeros(2))
        return sol, jax.jacrev(lambda x: LAG.solve(x, jnp.zeros(2)).u)(x)

    sol, jac = run(xs)
    for i, x in enumerate(np.asarray(xs)):
        excess = max(0.0, x.sum() - 1)
        tree_allclose(sol.u[i], x - excess / 2, rtol=1e-8, atol=1e-9)
        tree_allclose(sol.v[i], np.asarray([excess / 2]), rtol=1e-8, atol=1e-9)
        expected = np.eye(2) - 0.5 * np.ones((2, 2)) if excess > 0 else np.eye(2)
        tree_allclose(jac[i], expected, rtol=1e-9, atol=1e-10)
        assert int(sol.info.status[i]) == Status.SUCCESS
        assert 0 <= float(sol.info.gap[i]) <= 1e-12


def test_defect14_lagrangian_multiplier_bound_is_checked():
    """lam_max below ||lam*|| (T5 at x* has lam* = 0.5): the saddle is that of the exact
    penalty y = x - 0.25 (1, 1), infeasible for y1 + y2 <= 1; it used to come back SUCCESS.
    Now bound_active, INFEASIBLE, a positive violation and NaN cotangents; with lam_max = 5 the
    same point is SUCCESS and the bound inactive. Also usable on a penalty result's y2."""
    small = lagrangian_minimax(t5_g, t5_c, jnp.zeros(2), jnp.zeros(2), lam_max=0.25)
    x = jnp.asarray([1.75, 0.25])

    @jax.jit
    def run(x):
        out = []
        for lag in (small, LAG):
            sol = lag.solve(x, jnp.zeros(2))
            grad = jax.grad(lambda x, lag=lag: lag.solve(x, jnp.zeros(2)).u[0])(x)
            out.append((sol, grad))
        return out

    (bad, bad_grad), (good, good_grad) = run(x)
    assert bool(bad.bound_active) and int(bad.info.status) == Status.INFEASIBLE
    assert not bool(bad.info.converged)
    tree_allclose(bad.u, np.asarray([1.5, 0.0]), rtol=1e-8, atol=1e-9)  # x - 0.25 (1, 1)
    tree_allclose(bad.v, np.asarray([0.25]))
    tree_allclose(bad.max_violation, 0.5, rtol=1e-8)
    assert np.all(np.isnan(np.asarray(bad_grad)))
    assert not bool(good.bound_active) and int(good.info.status) == Status.SUCCESS
    tree_allclose(good.max_violation, 0.0, atol=1e-9)
    tree_allclose(good_grad, np.asarray([0.5, -0.5]), rtol=1e-8)  # row 0 of I - aa'/2
    assert bool(small.bound_active(jnp.asarray([0.25]))) and not bool(
        LAG.bound_active(jnp.asarray([0.5])))
    with pytest.raises(bj.SolveError):
        small.solve(x, jnp.zeros(2), throw=True)


def test_t5_upper_level_descent_reaches_the_bilevel_solution():
    """Gradient descent on F(x) = f(x, y*(x)) with the implicit hypergradient reaches
    x* = (1.75, 0.25), y* = (1.25, -0.25), lam* = 0.5, F* = 1.125, grad F(x*) = 0."""

    def F(x):
        return t5_f(x, LAG.solve(x, jnp.zeros(2)).u)

    @jax.jit
    def descend(x):
        x = jax.lax.fori_loop(0, 40, lambda _, x: x - 0.5 * jax.grad(F)(x), x)
        sol = LAG.solve(x, jnp.zeros(2))
        return x, sol, F(x), jax.grad(F)(x), jax.grad(F)(jnp.asarray([1.75, 0.25]))

    x, sol, value, grad, grad_star = descend(jnp.zeros(2))
    # Solves stop at a relative residual of 1e-10.
    tree_allclose(x, np.asarray([1.75, 0.25]), rtol=1e-8, atol=1e-8)
    y_star, lam_star = np.asarray([1.25, -0.25]), np.asarray([0.5])
    tree_allclose((sol.u, sol.v), (y_star, lam_star), rtol=1e-8, atol=1e-8)
    tree_allclose(value, 1.125, rtol=1e-9)
    tree_allclose(grad, np.zeros(2), atol=1e-8)
    tree_allclose(grad_star, np.zeros(2), atol=1e-9)


def test_t5_penalised_minimax_table():
    """Lambda = 5: x(rho) = (1.75 + t, 0.25 - t), y(rho) = (1.25 - t, -0.25 + t),
    t = 0.25/(2 rho + 1), lam = 0.5, z1 = x(rho) - 0.5, z2 = 0.5 + 1/rho, for rho = 1, 10,
    100 and, warm-started through 1, 10, 100, 1000, for rho = 1000 (one vmapped compile)."""
    schedules = jnp.asarray([[1.0, 1.0], [10.0, 1.0], [100.0, 1.0], [1.0, 10.0]])

    def f(x, x2, y, lam, th):
        return t5_f(x, y)

    @jax.jit
    @jax.vmap
    def run(schedule):
        return penalty_bilevel_minimax(
            f, LAG.lagrangian, jnp.zeros(2), None, jnp.zeros(2), jnp.zeros(1),
            y2_set=LAG.lam_set, rho0=schedule[0], rho_growth=schedule[1], rho_max=1000.0,
            num_stages=4, tol=1e-10, max_iter=100000)

    sol = run(schedules)
    for i, rho in enumerate([1.0, 10.0, 100.0, 1000.0]):
        t = 0.25 / (2 * rho + 1)
        x = np.asarray([1.75 + t, 0.25 - t])
        assert float(sol.rho[i]) == rho
        # Inner solves stop at 1e-10 (condition number ~rho).
        tol = dict(rtol=0, atol=1e-7)
        tree_allclose(sol.x1[i], x, **tol)
        tree_allclose(sol.y1[i], np.asarray([1.25 - t, -0.25 + t]), **tol)
        tree_allclose(sol.y2[i], np.asarray([0.5]), **tol)
        tree_allclose(sol.z1[i], x - 0.5, **tol)
        tree_allclose(sol.z2[i], np.asarray([0.5 + 1 / rho]), **tol)
    table = {1.0: (1.8333, 0.1667), 10.0: (1.76190, 0.23810), 100.0: (1.75124, 0.24876),
             1000.0: (1.750125, 0.249875)}
    for i, (x1, x2) in enumerate(table.values()):
        tree_allclose(sol.x1[i], np.asarray([x1, x2]), rtol=0, atol=5e-5)


def test_lower_level_without_strong_convexity():
    """g = y2 (y1 - x1) - y2^2/2 is linear (not strongly convex) in y1 on a box:
    SP(x1) = {(x1, 0)}; with f = x1^2/2 + (y1 - 1)^2/2 the bilevel solution is x1* = 1/2
    and the penalised one x1(rho) = rho/(1 + 2 rho), y1 = (1 + rho)/(1 + 2 rho)."""

    def g(x1, y1, y2, th):
        return y2 * (y1 - x1) - 0.5 * y2**2

    def f(x1, x2, y1, y2, th):
        return 0.5 * x1**2 + 0.5 * (y1 - 1.0) ** 2

    rhos = jnp.asarray([10.0, 100.0])
    sol = jax.jit(jax.vmap(lambda rho: penalty_bilevel_minimax(
        f, g, 0.0, None, 0.0, 0.0, y1_set=Box(-2.0, 2.0), y2_set=Box(-1.0, 1.0), rho0=rho,
        rho_max=rho, num_stages=1, tol=1e-10, max_iter=100000)))(rhos)
    r = np.asarray(rhos)
    tree_allclose(sol.x1, r / (1 + 2 * r), rtol=0, atol=1e-8)
    tree_allclose(sol.y1, (1 + r) / (1 + 2 * r), rtol=0, atol=1e-8)
    tree_allclose(sol.y2, np.zeros(2), rtol=0, atol=1e-8)
    tree_allclose(sol.z2, 1 / (1 + 2 * r), rtol=0, atol=1e-8)
    tree_allclose(sol.kkt.gap, 0.5 / (1 + 2 * r) ** 2, rtol=1e-6)


# ------------------------------------------------------------------ transformations, failures


def test_float32_in_float32_out():
    """(vmap is exercised by the T4, T5 and non-strongly-convex tests: every member of the
    batch matches its closed form.)"""
    sol = jax.jit(lambda th: penalty_bilevel_minimax(
        t4_f, t4_g, *(jnp.float32(0),) * 4, th, rho0=10.0, rho_max=10.0))(jnp.float32(1.0))
    assert all(a.dtype == jnp.float32 for a in (sol.x1, sol.x2, sol.y1, sol.z2, sol.rho))
    assert sol.kkt.gap.dtype == jnp.float32
    # float32 default tol is 1e-3 on the stationarity residuals.
    tree_allclose(sol.x1, T4_TABLE[10.0][0], rtol=0, atol=1e-3)


def test_non_concave_lower_level_is_diverged():
    """g convex in y2 (its max is +inf): the inner solver's residual grows, DIVERGED."""
    g = lambda x1, y1, y2, th: y1**2 + y2**2 + x1 * y1  # noqa: E731
    sols = jax.jit(lambda: [penalty_bilevel_minimax(t4_f, g, 0.0, 0.0, 0.0, 0.5, 1.0,
                                                    rho0=10.0, rho_max=10.0, inner_solver=s)
                            for s in ("extragradient", "gdmax")])()
    for sol in sols:
        assert int(sol.info.status) == Status.DIVERGED
        assert not bool(sol.info.converged)
        assert int(sol.info.num_steps) < 1000


def test_bad_input_is_named():
    args = (t4_f, t4_g, 0.0, 0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="inner_solver must be one of"):
        penalty_bilevel_minimax(*args, inner_solver="sgda")
    with pytest.raises(ValueError, match="rho_max must be >= rho0"):
        penalty_bilevel_minimax(*args, rho0=10.0, rho_max=1.0)
    with pytest.raises(ValueError, match="num_stages must be given"):
        penalty_bilevel_minimax(*args, rho0=jnp.asarray(1.0))
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        penalty_bilevel_minimax(*args, max_iter=0)
    with pytest.raises(ValueError, match="x2_set was given but x2_0 is None"):
        penalty_bilevel_minimax(lambda x1, x2, y1, y2, th: x1 * y1, t4_g, 0.0, None, 0.0, 0.0,
                                x2_set=Box(0.0, 1.0))
    with pytest.raises(ValueError, match=r"y2_set: Box.project cannot be applied to y2_0"):
        penalty_bilevel_minimax(lambda x1, x2, y1, y2, th: x1 * y1 + jnp.sum(y2),
                                lambda x1, y1, y2, th: y1**2 - jnp.sum(y2**2), 0.0, 0.0, 0.0,
                                jnp.zeros(2), y2_set=Box(jnp.zeros(3), 1.0))
    with pytest.raises(TypeError, match=r"g\(x1_0, y1_0, y2_0, theta\) could not be evaluated"):
        penalty_bilevel_minimax(lambda x1, x2, y1, y2, th: x1 + jnp.sum(y1), 
                                lambda x1, y1, y2, th: y1 @ jnp.ones(3), 0.0, 0.0,
                                jnp.zeros(2), 0.0)
    with pytest.raises(TypeError, match="y1_0 must contain floating-point arrays"):
        penalty_bilevel_minimax(t4_f, t4_g, 0.0, 0.0, jnp.zeros(2, jnp.int32), 0.0)
    with pytest.raises(ValueError, match=r"c\(x, y, theta\) must return a 1-D array"):
        lagrangian_minimax(t5_g, lambda x, y, th: y.sum(), jnp.zeros(2), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"lam_max must be a scalar or have shape \(1,\)"):
        lagrangian_minimax(t5_g, t5_c, jnp.zeros(2), jnp.zeros(2), lam_max=jnp.ones(3))


@pytest.mark.slow
def test_group_dro_benchmark_small():
    """bench/group_dro.py --small: both tuned methods beat default group DRO on the
    worst-group validation loss they minimise, and ERM on worst-group test accuracy."""
    bench = load_bench("group_dro")
    rows = {row[0]: row for row in bench.main(["--small"])}
    erm = rows["ERM"]
    dro = rows["group DRO, x1 = 0, tau = 0"]
    tuned = [row for name, row in rows.items() if name.startswith(("implicit", "penalty"))]
    assert len(tuned) == 2
    for row in tuned:
        assert row[1] < dro[1]  # worst-group validation loss
        assert row[2] > erm[2]  # worst-group test accuracy


def test_penalty_method_checks_the_multiplier_bound_of_a_lagrangian_reduction():
    """g = lagrangian_minimax(...) itself (not its .lagrangian): the multiplier bound is
    checked. T5 at rho = 100 (tol 1e-2) has lam = 0.5: with lam_max = 0.25 the method stopped
    with SUCCESS on the saddle of the exact-penalty problem (lam at its bound); now
    INFEASIBLE. With lam_max = 5 the result is SUCCESS and equals the one through
    .lagrangian."""
    small = lagrangian_minimax(t5_g, t5_c, jnp.zeros(2), jnp.zeros(2), lam_max=0.25)

    def f(x, x2, y, lam, th):
        return t5_f(x, y)

    def run(g, tol=1e-2, **kw):
        return penalty_bilevel_minimax(f, g, jnp.zeros(2), None, jnp.zeros(2), jnp.zeros(1),
                                       rho0=100.0, rho_max=100.0, tol=tol, max_iter=100000,
                                       **kw)

    bad, good = run(small), run(LAG)
    assert int(run(small.lagrangian, y2_set=small.lam_set).info.status) == (
        Status.SUCCESS)  # what the plain Lagrangian cannot tell
    assert int(bad.info.status) == Status.INFEASIBLE and not bool(bad.info.converged)
    tree_allclose(bad.y2, np.asarray([0.25]))
    assert int(good.info.status) == Status.SUCCESS
    plain = run(LAG.lagrangian, y2_set=LAG.lam_set)
    tree_allclose(good.x1, plain.x1, rtol=0, atol=1e-12)
    with pytest.raises(bj.SolveError):
        run(small, throw=True)
