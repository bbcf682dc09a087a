"""Trust issue: defects 2 and 6 and DSIGD's defaults, each against an independent reference.

* Defect 2: the float32 matrix-free box rule at 10^4 variables against the exact masked system
  (a primal-dual active-set solve in float64 SciPy, then ``H_FF w = v_F``).
* Defect 6: backward linear solves report their status; a non-converged adjoint solve gives a
  NaN hypergradient (and a message with ``throw=True``), never a plausible wrong number.
* DSIGD: the library defaults converge on a box-constrained quadratic bilevel problem with a
  known minimiser; the paper's practical settings do not.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

import bilevel_jax as bj
from bilevel_jax._src import linear_solve as ls
from bilevel_jax.algorithms import dsigd

# ------------------------------------------------------------------ defect 2: float32 box rule

GRID = 100  # 100 x 100 grid, n = 10^4
BOUND = 0.3


def _laplacian(y):
    Y = y.reshape(GRID, GRID)
    L = 4 * Y - jnp.roll(Y, 1, 0) - jnp.roll(Y, -1, 0) - jnp.roll(Y, 1, 1) - jnp.roll(Y, -1, 1)
    return L.reshape(-1)


def _grid_energy(y, theta):
    return 0.5 * y @ (y + 0.2 * _laplacian(y)) - theta @ y


@jax.jit
def _box_hypergradient(theta):
    def upper(th):
        sol = bj.argmin(_grid_energy, jnp.zeros_like(th), th, box=lambda t: (-BOUND, BOUND))
        return jnp.sum(jnp.sin(sol.y)), sol.info

    return jax.grad(upper, has_aux=True)(theta)


def _grid_hessian():
    ring = sp.diags([2 * np.ones(GRID), -np.ones(GRID - 1), -np.ones(GRID - 1)], [0, 1, -1])
    ring = ring.tolil()
    ring[0, GRID - 1] = ring[GRID - 1, 0] = -1
    eye = sp.identity(GRID)
    return (sp.identity(GRID**2) + 0.2 * (sp.kron(ring, eye) + sp.kron(eye, ring))).tocsr()


def _box_qp_reference(H, theta, lo, hi):
    """``min 1/2 y'Hy - theta'y`` on ``[lo, hi]^n`` by primal-dual active sets (float64).

    ``H`` is an M-matrix, for which the iteration terminates; the KKT conditions are checked.
    """
    n = theta.shape[0]
    y, lam = np.clip(spla.spsolve(H.tocsc(), theta), lo, hi), np.zeros(n)
    for _ in range(50):
        upper, lower = lam + (y - hi) > 0, lam + (y - lo) < 0
        free = ~(upper | lower)
        y_new = np.where(upper, hi, np.where(lower, lo, 0.0))
        rhs = theta[free] - H[free][:, ~free] @ y_new[~free]
        y_new[free] = spla.spsolve(H[free][:, free].tocsc(), rhs)
        lam = np.where(free, 0.0, theta - H @ y_new)  # H y - theta + lam = 0
        if np.array_equal(y_new, y):
            break
        y = y_new
    grad = H @ y - theta
    assert np.all((y >= lo) & (y <= hi))
    assert np.max(np.abs(np.where((y > lo) & (y < hi), grad, 0))) < 1e-10  # stationary
    assert np.all(np.where(y == hi, grad, 0) <= 1e-10)  # multipliers of the right sign
    assert np.all(np.where(y == lo, grad, 0) >= -1e-10)
    return y


def test_defect2_float32_box_rule_at_1e4_matches_masked_system():
    """Defect 2: the float32 hypergradient of sum(sin(y*)) was 4.8e-2 off (with SUCCESS), with
    nonzero entries (0.70) on coordinates sitting on a bound: bounds with multipliers up to
    sqrt(eps) (1.5e-3 here) were read as free. Now within 1e-3 (measured 5.7e-7)."""
    n = GRID**2
    theta = np.random.default_rng(0).standard_normal(n)
    H = _grid_hessian()
    y = _box_qp_reference(H, theta, -BOUND, BOUND)
    free = (y > -BOUND) & (y < BOUND)
    ref = np.zeros(n)
    ref[free] = spla.spsolve(H[free][:, free].tocsc(), np.cos(y[free]))

    grad, info = _box_hypergradient(jnp.asarray(theta, jnp.float32))
    assert grad.dtype == jnp.float32
    assert int(info.status) == bj.Status.SUCCESS
    grad = np.asarray(grad, np.float64)
    assert np.linalg.norm(grad - ref) / np.linalg.norm(ref) <= 1e-3
    # Coordinates on a bound (multiplier > 0 in this instance: none is weakly active) get 0.
    np.testing.assert_array_equal(grad[~free], 0.0)


# ------------------------------------------------------------------ defect 6: backward solves

NL = 40


def _spd(n=NL, cond=1e2, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return q @ np.diag(np.geomspace(1.0, cond, n)) @ q.T


SOLVERS = {"cg": ls.solve_cg, "minres": ls.solve_minres, "gmres": ls.solve_gmres,
           "normal_cg": ls.solve_normal_cg}


@functools.cache
def _solver(method):
    return jax.jit(lambda a, b, max_iter: SOLVERS[method](lambda v: a @ v, b, max_iter=max_iter))


def test_defect6_iterative_solvers_report_status_and_residual():
    """Each Krylov solver returns (x, converged, residual, num_steps); the residual is the
    recomputed ||b - A x|| / ||b||, and a budget too small to converge says so."""
    a, b = _spd(), np.random.default_rng(1).standard_normal(NL)
    for method in SOLVERS:
        sol = _solver(method)(a, b, 1000)
        assert isinstance(sol, ls.LinearSolution)
        assert bool(sol.converged), method
        assert 0 < int(sol.num_steps) < 1000
        true_residual = np.linalg.norm(a @ np.asarray(sol.x) - b) / np.linalg.norm(b)
        np.testing.assert_allclose(float(sol.residual), true_residual, rtol=1e-3, atol=1e-15)
        assert float(sol.residual) <= 10 * ls.default_tol(jnp.float64)

        short = _solver(method)(a, b, 3)
        assert not bool(short.converged), method
        assert int(short.num_steps) <= 3 + (method == "gmres")  # GMRES counts its restart
        assert float(short.residual) > 1e-3
        x_nan = ls.solution_or_nan(short)
        assert np.all(np.isnan(np.asarray(x_nan)))


def test_defect6_dense_solve_reports_breakdown():
    """Cholesky of an indefinite matrix is not reported as converged."""
    indefinite = np.diag(np.r_[np.ones(5), -np.ones(5)])
    sol = ls.linear_solve(lambda v: indefinite @ v, np.ones(10), method="cholesky")
    assert not bool(sol.converged)
    good = ls.linear_solve(lambda v: _spd(10) @ v, np.ones(10), method="dense", structure="spd")
    assert bool(good.converged) and float(good.residual) < 1e-13 and int(good.num_steps) == 0


# H = Q diag(1 ... 1e-12) Q' (n = 10) and g = 1/2 y'Hy - x q_1'y, so y* = x q_1 (q_1 the top
# eigenvector: the forward solve is easy) and d(w'y*)/dx = w'q_1 = 1 for w = sum of the q_i.
# The adjoint system H u = w is not: CG does not meet its tolerance in its 100 steps, while
# Cholesky solves it to the rounding floor (error 4e-5 in the hypergradient).
_Q = np.linalg.qr(np.random.default_rng(0).standard_normal((10, 10)))[0]
_H_ILL = jnp.asarray(_Q @ np.diag(np.logspace(0, -12, 10)) @ _Q.T)
_W_ILL = jnp.asarray(_Q.sum(axis=1))


def _ill_conditioned(y, x):
    return 0.5 * y @ (_H_ILL @ y) - x * (jnp.asarray(_Q[:, 0]) @ y)


def test_defect6_non_converged_adjoint_solve_gives_nan_hypergradient(capsys):
    """argmin's backward CG that cannot converge used to return a finite wrong number without
    a signal; it now makes the hypergradient NaN, and throw=True prints why."""

    def hypergradient(linear_solver, throw=False):
        def upper(x):
            sol = bj.argmin(_ill_conditioned, jnp.zeros(10), x, linear_solver=linear_solver,
                            throw=throw)
            return _W_ILL @ sol.y

        return jax.jit(jax.grad(upper))(2.0)

    info = bj.argmin(_ill_conditioned, jnp.zeros(10), 2.0).info
    assert int(info.status) == bj.Status.SUCCESS  # only the backward solve is hard
    np.testing.assert_allclose(hypergradient("cholesky"), 1.0, rtol=1e-3)
    assert np.isnan(hypergradient("cg"))
    capsys.readouterr()
    assert np.isnan(hypergradient("cg", throw=True))  # the forward solve succeeded: no raise
    jax.effects_barrier()
    out = capsys.readouterr().out
    assert "argmin adjoint solve did not converge" in out and "NaN" in out


def test_defect6_backward_tolerance_below_forward_error():
    """The default backward tolerances (1e-12 in float64, 1e-6 in float32) leave the
    hypergradient error to the forward solve: CG and the exact dense solve agree to well
    below the forward tolerances (1e-10, 1e-5)."""
    n = 60
    rng = np.random.default_rng(3)
    H = _spd(n, cond=1e2, seed=4)
    w = rng.standard_normal(n)

    def g(y, x):
        return 0.5 * y @ (jnp.asarray(H, y.dtype) @ y) - x @ y + 0.1 * jnp.sum(jnp.cos(y))

    def upper(x_, method):
        y = bj.argmin(g, jnp.zeros_like(x_), x_, linear_solver=method).y
        return jnp.asarray(w, x_.dtype) @ y

    for dtype, bound in ((jnp.float64, 1e-10), (jnp.float32, 1e-4)):
        x = jnp.asarray(rng.standard_normal(n), dtype)

        hypergradient = jax.jit(jax.grad(upper), static_argnums=1)
        cg, dense = hypergradient(x, "cg"), hypergradient(x, "cholesky")
        assert cg.dtype == dtype
        assert float(jnp.linalg.norm(cg - dense) / jnp.linalg.norm(dense)) < bound


# ------------------------------------------------------------------ DSIGD defaults

_T = jnp.array([0.5, -0.3, 2.0, -2.0])
_C = jnp.array([0.0, 0.0, 3.0, -3.0])
# F(x) = f(x, clip(x)) with f = 3/4 ||y - t||^2 + 3/4 ||x - c||^2: the free coordinates minimise
# at x_i = (t_i + c_i) / 2, the other two sit beyond the box (y_i = +-1) at x_i = c_i.
_X_STAR = np.array([0.25, -0.15, 3.0, -3.0])
_BOX_QUADRATIC = bj.problems.BilevelProblem(
    f=lambda x, y: 0.75 * jnp.sum((y - _T) ** 2) + 0.75 * jnp.sum((x - _C) ** 2),
    g=lambda y, x: 0.5 * jnp.sum((y - x) ** 2),
    x0=jnp.zeros(4),
    dim_y=4,
    box=lambda x: (-1.0, 1.0),
)


def _dsigd_distance(**options):
    alg = dsigd(_BOX_QUADRATIC, **options)
    x, hist = jax.jit(lambda x0, key: alg.run(x0, key, 600))(_BOX_QUADRATIC.x0,
                                                            jax.random.PRNGKey(0))
    assert jnp.all(hist.status == bj.Status.SUCCESS)
    return np.linalg.norm(np.asarray(x) - _X_STAR) / np.linalg.norm(_X_STAR)


def test_dsigd_defaults_converge():
    """The defaults (sigma = 1e-4, slack decaying with the lower-level accuracy) reach the
    known minimiser up to the bias of the 1e-3 perturbation (measured 9e-5); the authors'
    practical settings (sigma = 1, non-decaying slack a e0 / m) stall at 0.11."""
    assert _dsigd_distance() < 1e-3
    paper = _dsigd_distance(sigma=1.0, slack=1.0, slack_rule="backtracks")
    assert paper > 0.05



def _box_gradients(H, w, theta, y0, lo, hi):
    """d(w'y*)/dtheta with the automatic and with the Cholesky adjoint solve, and y*."""
    def g(y, th):
        return 0.5 * y @ (H @ y) - th @ y

    def loss(th, linear_solver):
        sol = bj.argmin(g, y0, th, box=lambda _: (lo, hi), linear_solver=linear_solver)
        return w @ sol.y, sol

    grad = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)
    (auto, sol), (dense, _) = grad(theta, "auto"), grad(theta, "cholesky")
    assert int(sol.info.status) == bj.Status.SUCCESS
    return np.asarray(auto), np.asarray(dense), np.asarray(sol.y)


def test_box_adjoint_cg_first_then_dense_where_cg_fails():
    """``linear_solver="auto"`` on a box adjoint of more than 200 coordinates: CG first (a
    well-conditioned tridiagonal Hessian, two thirds of the coordinates at a bound), the
    dense factorisation where CG does not converge in ``n`` steps (a condition number of
    1e4, no bound active). Both agree with the Cholesky rule and with the derivative on the
    free set, ``H_FF u_F = w_F``."""
    n = 256
    rng = np.random.default_rng(0)
    w, theta = (jnp.asarray(rng.standard_normal(n)) for _ in range(2))
    L = 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)
    orth = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ill = orth @ np.diag(np.logspace(0, 4, n)) @ orth.T
    # (the second system is one that CG does not solve to its tolerance in n steps)
    cg = ls.linear_solve(lambda v: jnp.asarray(ill) @ v, w, method="cg", structure="spd",
                         max_iter=n)
    assert not bool(cg.converged)
    cases = ((np.eye(n) + 0.2 * L, jnp.zeros(n), 0.3),
             (ill, jnp.asarray(np.linalg.solve(ill, np.asarray(theta))), 1e3))
    for H, y0, bound in cases:
        auto, dense, y = _box_gradients(jnp.asarray(H), w, theta, y0, -bound, bound)
        free = np.abs(y) < bound - 1e-9
        want = np.zeros(n)
        want[free] = np.linalg.solve(H[np.ix_(free, free)], np.asarray(w)[free])
        scale = np.linalg.norm(want)
        assert np.linalg.norm(auto - dense) <= 1e-10 * scale
        assert np.linalg.norm(auto - want) <= 1e-10 * scale
