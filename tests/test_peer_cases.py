"""The peers' own differentiable-QP test cases, run through ``bj.solve_qp``.

The cases of the test suites of qpax (``test/``), jaxopt (``tests/quadratic_prog_test.py``,
``osqp_test.py``, ``eq_qp_test.py``, ``cvxpy_wrapper_test.py``) and cvxpylayers
(``tests/test_jax.py``, ``tests/test_torch.py``), transcribed as data and assertions: what the
peers test their own solvers on, ``solve_qp`` must pass too. Each peer formulation (OSQP's
``l <= A x <= u``, cvxpy problems, elastic QPs, ...) is rewritten by hand in the
``A y = b``, ``G y <= h`` form.

Oracles, none of which shares code with the solver:

* a KKT certificate computed here in NumPy (primal and dual feasibility, complementarity,
  stationarity: sufficient for optimality of a convex QP);
* closed forms (projections, least squares, equality-constrained KKT systems) and the known
  solutions the peers assert, or the solution a problem was generated around;
* scikit-learn (SVC for the kernel-SVM dual, Lasso for the lasso QP);
* central differences of the (float64, tight) solve for gradients, or exact Jacobians from a
  closed form on the active set.

Cases that fail today are listed in ``XFAIL`` (strict): remove an entry when its fix lands.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

# test name (or "name[param id]") -> why it fails today. Strict: an entry that starts passing
# fails the suite until it is removed here.
XFAIL = {
}

S = bj.Status


def _marks(key):
    return [pytest.mark.xfail(strict=True, reason=XFAIL[key])] if key in XFAIL else []


def listed(fn):
    """Mark a test as an expected failure when its name is in ``XFAIL``."""
    for mark in _marks(fn.__name__):
        fn = mark(fn)
    return fn


def cases(test_name, ids):
    """``pytest.param`` per id, marked when ``"test_name[id]"`` is in ``XFAIL``."""
    return [pytest.param(i, id=str(i), marks=_marks(f"{test_name}[{i}]")) for i in ids]


# --------------------------------------------------------------------------- shared tools


@jax.jit
def solve(Q, c, A, b, G, h):
    """``bj.solve_qp`` with its defaults, compiled once per shape and dtype."""
    return bj.solve_qp(Q, c, A, b, G, h)


def empty(n, dtype=np.float64):
    """No constraints of a kind: a ``(0, n)`` matrix and a ``(0,)`` vector."""
    return np.zeros((0, n), dtype), np.zeros((0,), dtype)


def kkt_residuals(Q, c, A, b, G, h, y, nu, lam, relative=True):
    """Primal, dual and complementarity residuals of ``(y, nu, lam)``, max-norms, in NumPy.

    Works on one problem or a batch (leading axis). ``h_i = +inf`` rows are no constraint.
    ``relative``: each residual divided by ``1 +`` the size of the terms it balances.
    """
    Q, c, A, b, G, h, y, nu, lam = (
        np.asarray(v, np.float64) for v in (Q, c, A, b, G, h, y, nu, lam)
    )

    def mx(v):
        v = np.abs(v)
        return v.max(axis=-1) if v.shape[-1] else np.zeros(v.shape[:-1])

    finite = np.isfinite(h)
    hf = np.where(finite, h, 0.0)
    Ay = np.einsum("...ij,...j->...i", A, y)
    Gy = np.einsum("...ij,...j->...i", G, y) * finite
    Qy = np.einsum("...ij,...j->...i", Q, y)
    Anu = np.einsum("...ij,...i->...j", A, nu)
    Glam = np.einsum("...ij,...i->...j", G, lam)
    primal = np.maximum(mx(Ay - b), mx(np.maximum(Gy - hf, 0.0)))
    stat = mx(Qy + c + Anu + Glam)
    sign = mx(np.minimum(lam, 0.0))
    comp = mx(lam * (hf - Gy))
    if relative:
        primal = primal / (1 + np.maximum.reduce([mx(b), mx(hf), mx(Ay), mx(Gy)]))
        stat = stat / (1 + np.maximum.reduce([mx(Qy), mx(c), mx(Anu), mx(Glam)]))
        sign = sign / (1 + mx(lam))
        scale = np.maximum(np.abs(np.einsum("...i,...i->...", y, Qy)),
                           np.abs(np.einsum("...i,...i->...", c, y)))
        comp = comp / (1 + scale)
    return primal, np.maximum(stat, sign), comp


def assert_certified(data, sol, tol=1e-8):
    """SUCCESS, and the NumPy KKT certificate holds to ``tol`` (relative)."""
    status = S(int(sol.info.status))
    res = kkt_residuals(*data, sol.y, sol.nu, sol.lam)
    assert status == S.SUCCESS, f"status {status.name}, KKT residuals {res}"
    assert max(res) <= tol, f"KKT residuals (primal, dual, comp) {res} above {tol}"


def directional_fd(f, args, argnums, n_dirs=3, eps=1e-6, seed=0):
    """``<grad f, d>`` and the central difference along unit random directions ``d``.

    The perturbed values come from the same compiled ``value_and_grad``, so the check costs
    one compilation. Returns (analytic, numeric, grads).
    """
    rng = np.random.default_rng(seed)
    args = tuple(np.asarray(a) for a in args)
    value_and_grad = jax.jit(jax.value_and_grad(f, argnums=argnums))
    grads = value_and_grad(*args)[1]
    analytic, plus, minus = [], [], []
    for i, g in zip(argnums, grads, strict=True):
        for _ in range(n_dirs):
            d = rng.standard_normal(args[i].shape)
            d /= np.linalg.norm(d)
            analytic.append(float(np.vdot(np.asarray(g), d)))
            plus.append(tuple(a + eps * d if j == i else a for j, a in enumerate(args)))
            minus.append(tuple(a - eps * d if j == i else a for j, a in enumerate(args)))

    def values(rows):  # the compiled value_and_grad again: no second compilation
        return np.array([float(value_and_grad(*r)[0]) for r in rows])

    numeric = (values(plus) - values(minus)) / (2 * eps)
    return np.asarray(analytic), numeric, grads


def assert_fd_close(f, args, argnums, rtol=1e-6, **kw):
    analytic, numeric, grads = directional_fd(f, args, argnums, **kw)
    for g in grads:
        assert np.all(np.isfinite(np.asarray(g))), "non-finite gradient"
    scale = max(1.0, float(np.max(np.abs(numeric))))
    np.testing.assert_allclose(analytic, numeric, rtol=rtol, atol=rtol * scale)


def random_qp(rng, nx, ns, ny, dtype=np.float64):
    """qpax's generator, rewritten: a QP built around a chosen KKT point.

    ``Q = M'M``; each inequality is active (slack 0, multiplier |N(0,1)|) or inactive
    (multiplier 0, slack |N(0,1)|) with probability 1/2; ``c`` makes ``(x, z, y)`` stationary.
    With ``rng = np.random.RandomState(seed)`` the draws come in qpax's order, so qpax's
    seeds give qpax's own test problems.
    """
    x = rng.standard_normal(nx)
    M = rng.standard_normal((nx, nx))
    Q = M.T @ M
    G = rng.standard_normal((ns, nx))
    A = rng.standard_normal((ny, nx))
    s = np.abs(rng.standard_normal(ns))
    z = np.abs(rng.standard_normal(ns))
    active = rng.random(ns) < 0.5
    s[active] = 0.0
    z[~active] = 0.0
    h = G @ x + s
    b = A @ x
    y = rng.standard_normal(ny)
    c = -Q @ x - G.T @ z - A.T @ y
    data = tuple(v.astype(dtype) for v in (Q, c, A, b, G, h))
    return data, x


@functools.cache
def qpax_random_sets():
    """qpax's solver tests (seed 1): 1,000 QPs with 3 equalities, then 1,000 with none."""
    rng = np.random.RandomState(1)
    sets = {}
    for ny in (3, 0):
        problems = [random_qp(rng, 15, 10, ny) for _ in range(1000)]
        data = tuple(np.stack([p[0][j] for p in problems]) for j in range(6))
        sets[ny] = (data, np.stack([p[1] for p in problems]))
    return sets


def status_names(sol):
    return [S(int(s)).name for s in np.atleast_1d(np.asarray(sol.info.status))]


# ===========================================================================================
# qpax (kevin-tracy/qpax, test/)
# ===========================================================================================

_M = np.array([[1.0, 2.0, 0.0], [-8.0, 3.0, 2.0], [0.0, 1.0, 1.0]])
_P3 = _M.T @ _M
_Q3 = np.array([3.0, 2.0, 3.0]) @ _M


@listed
def test_qpax_no_constraints():
    data = (_P3, _Q3, *empty(3), *empty(3))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-12)
    np.testing.assert_allclose(sol.y, np.linalg.solve(_P3, -_Q3), rtol=1e-10)


@listed
def test_qpax_eq_only():
    A, b = np.ones((1, 3)), np.array([1.0])
    data = (_P3, _Q3, A, b, *empty(3))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-12)
    kkt = np.block([[_P3, A.T], [A, np.zeros((1, 1))]])
    ref = np.linalg.solve(kkt, np.concatenate([-_Q3, b]))
    np.testing.assert_allclose(sol.y, ref[:3], rtol=1e-10)
    np.testing.assert_allclose(sol.nu, ref[3:], rtol=1e-10)
    np.testing.assert_allclose(sol.y, [0.28026906, -1.55156951, 2.27130045], atol=1e-7)


@listed
def test_qpax_qpsut03_infinite_bounds():
    """QPSUT03 from the qpax suite: half of the box bounds are ``+inf`` (no constraint)."""
    Q = np.array([[122.0, 59, 39, 9], [59, 95, 48, 24], [39, 48, 26, 19], [9, 24, 19, 90]])
    c = np.array([66.0, 93, 47, 11])
    G = np.vstack([-np.eye(4), np.eye(4)])
    h = np.array([np.inf, 0.4, np.inf, 1.0, np.inf, np.inf, 0.5, 1.0])
    data = (Q, c, *empty(4), G, h)
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-10)
    # qpax's reference values are rounded (it asserts 1e-4); they are good to 5e-7
    np.testing.assert_allclose(sol.y, [0.18143455, 0.00843864, -2.35442995, 0.35443034],
                               atol=1e-6)
    assert np.all(np.asarray(sol.lam)[np.isinf(h)] == 0)


@listed
def test_qpax_small_maros_meszaros():
    """qpax's two-variable Maros–Meszaros-style problem (one ``+inf`` bound)."""
    Q = np.array([[8.0, 2.0], [2.0, 10.0]])
    c = np.array([1.5, -2.0])
    G = np.array([[-1.0, 2.0], [-2.0, -1.0], [-1.0, 0.0], [0.0, -1.0], [1.0, 0.0], [0.0, 1.0]])
    h = np.array([6.0, -2.0, 0.0, 0.0, 20.0, np.inf])
    data = (Q, c, *empty(2), G, h)
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-10)
    np.testing.assert_allclose(sol.y, [0.7625, 0.475], atol=1e-10)


# The 1,000-problem batches run through ``lax.map`` (one problem after another inside one
# compiled loop), not ``vmap``: with jaxlib 0.10.2 on a 2-core CPU, ``jit(vmap(solve_qp))`` over
# the float32 batch deadlocked in the batched triangular solve (``lapack_strsm_ffi`` waiting in
# ``ParallelBatchMap``; issue 10's defect 10). Switch back to ``jax.vmap`` once that is fixed.
_solve_batch = jax.jit(lambda *d: jax.lax.map(lambda args: bj.solve_qp(*args), d))


@listed
@pytest.mark.slow
@pytest.mark.parametrize("ny", cases("test_qpax_random_float64", [3, 0]))
def test_qpax_random_float64(ny):
    """qpax's double-precision test: 1,000 random QPs (15 variables, 10 inequalities)."""
    data, x_true = qpax_random_sets()[ny]
    sol = _solve_batch(*data)
    names = status_names(sol)
    bad = [i for i, s in enumerate(names) if s != "SUCCESS"]
    assert not bad, f"{len(bad)} of 1000 not SUCCESS: {sorted(set(names))}"
    res = np.max(kkt_residuals(*data, sol.y, sol.nu, sol.lam), axis=0)
    assert res.max() <= 1e-8, f"max relative KKT residual {res.max():.1e}"
    np.testing.assert_allclose(sol.y, x_true, atol=1e-6)


@listed
@pytest.mark.parametrize("ny", cases("test_qpax_random_float32", [3, 0]))
def test_qpax_random_float32(ny):
    """qpax's single-precision test: 1,000 random QPs, KKT residuals (absolute) <= 1e-2.

    At least 99.5 % must be SUCCESS with residuals within 1e-2, and a SUCCESS must never
    come with residuals above it.
    """
    data = tuple(v.astype(np.float32) for v in qpax_random_sets()[ny][0])
    sol = _solve_batch(*data)
    assert sol.y.dtype == jnp.float32
    success = np.asarray(sol.info.status) == int(S.SUCCESS)
    res = np.max(kkt_residuals(*data, sol.y, sol.nu, sol.lam, relative=False), axis=0)
    good = success & (res <= 1e-2)
    names = status_names(sol)
    summary = {s: names.count(s) for s in set(names)}
    assert good.mean() >= 0.995, (
        f"{good.mean():.1%} SUCCESS with KKT <= 1e-2; statuses {summary}; "
        f"SUCCESS with KKT > 1e-2: {int((success & ~good).sum())}"
    )
    assert not np.any(success & (res > 1e-2)), f"SUCCESS with KKT up to {res[success].max():.1e}"


def _qpax_objective(hypergrad):
    target = np.ones(15)

    def f(Q, c, A, b, G, h):
        y = bj.solve_qp(Q, c, A, b, G, h, hypergrad=hypergrad).y
        return jnp.sum((y - target) ** 2)

    return f


@functools.cache
def _qpax_derivative_check(hypergrad):
    data, _ = random_qp(np.random.RandomState(3), 15, 10, 3)  # qpax's instance
    return directional_fd(_qpax_objective(hypergrad), data, tuple(range(6)), n_dirs=3)


@listed
@pytest.mark.parametrize("arg", cases("test_qpax_derivatives", ["Q", "c", "A", "b", "G", "h"]))
def test_qpax_derivatives(arg):
    """qpax's derivative test (15 variables, 10 inequalities, 3 equalities), exact rule.

    ``f = ||y* - 1||^2``; the gradient with respect to each argument, along random
    directions, against central differences (the generated problem is strictly
    complementary, so ``y*`` is differentiable).
    """
    i = "Q c A b G h".split().index(arg)
    analytic, numeric, grads = _qpax_derivative_check("implicit")
    assert np.all(np.isfinite(np.asarray(grads[i])))
    sl = slice(3 * i, 3 * i + 3)
    np.testing.assert_allclose(analytic[sl], numeric[sl], rtol=1e-5,
                               atol=1e-5 * np.abs(numeric).max())


@listed
@pytest.mark.parametrize("arg", cases("test_qpax_derivatives_relaxed", ["Q", "c", "G", "h"]))
def test_qpax_derivatives_relaxed(arg):
    """The same with the smoothed ``relaxed`` rule (qpax's own): within qpax's 20 %."""
    i = "Q c A b G h".split().index(arg)
    analytic, numeric, grads = _qpax_derivative_check("relaxed")
    assert np.all(np.isfinite(np.asarray(grads[i])))
    sl = slice(3 * i, 3 * i + 3)
    assert np.linalg.norm(analytic[sl] - numeric[sl]) <= 0.2 * np.linalg.norm(numeric[sl])


def _elastic(Q, c, G, h, penalty):
    """qpax's elastic QP: ``min 1/2 x'Qx + c'x + penalty 1't  s.t.  G x - t <= h, t >= 0``.

    Variables ``(x, t)``; the quadratic is singular in ``t``.
    """
    nx, ns = Q.shape[0], G.shape[0]
    Q2 = jnp.block([[Q, jnp.zeros((nx, ns))], [jnp.zeros((ns, nx)), jnp.zeros((ns, ns))]])
    c2 = jnp.concatenate([c, penalty * jnp.ones(ns)])
    G2 = jnp.block([[jnp.zeros((ns, nx)), -jnp.eye(ns)], [G, -jnp.eye(ns)]])
    h2 = jnp.concatenate([jnp.zeros(ns), h])
    return Q2, c2, jnp.zeros((0, nx + ns)), jnp.zeros((0,)), G2, h2


def _elastic_data():
    """A QP whose inequalities cannot all hold (``G`` rows in opposing pairs with a gap)."""
    rng = np.random.default_rng(7)
    nx, half = 6, 4
    M = rng.standard_normal((nx, nx))
    Q = M @ M.T + 0.1 * np.eye(nx)
    c = rng.standard_normal(nx)
    G0 = rng.standard_normal((half, nx))
    h0 = rng.standard_normal(half)
    G = np.vstack([G0, -G0])  # G0 x <= h0 and G0 x >= h0 + 1: infeasible
    h = np.concatenate([h0, -h0 - 1.0])
    return Q, c, G, h, 1.5


@listed
def test_qpax_elastic_solution():
    Q, c, G, h, penalty = _elastic_data()
    data = tuple(np.asarray(v) for v in _elastic(Q, c, G, h, penalty))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-8)
    nx = Q.shape[0]
    x, t = np.asarray(sol.y[:nx]), np.asarray(sol.y[nx:])
    np.testing.assert_allclose(t, np.maximum(G @ x - h, 0.0), atol=1e-8)
    # and the hard-constrained problem is reported infeasible
    hard = solve(Q, c, *empty(nx), G, h)
    assert S(int(hard.info.status)) == S.INFEASIBLE


@listed
def test_qpax_elastic_gradient():
    """Gradient of ``||x* - x_des||^2`` through the elastic QP w.r.t. ``Q, c, G, h``."""
    Q, c, G, h, penalty = _elastic_data()
    x_des = np.random.default_rng(8).standard_normal(Q.shape[0])

    def f(Q, c, G, h):
        y = bj.solve_qp(*_elastic(Q, c, G, h, penalty)).y
        return jnp.sum((y[: x_des.size] - x_des) ** 2)

    assert_fd_close(f, (Q, c, G, h), (0, 1, 2, 3), rtol=1e-5)


# ===========================================================================================
# jaxopt (google/jaxopt, tests/): QuadraticProgramming, CvxpyQP, EqualityConstrainedQP,
# OSQP, BoxOSQP
# ===========================================================================================

_Q2 = 2 * np.array([[2.0, 0.5], [0.5, 1.0]])
_C2 = np.array([1.0, 1.0])
_A2 = np.array([[1.0, 1.0]])
_B2 = np.array([1.0])
_G2 = -np.eye(2)
_H2 = np.zeros(2)


def _sum_y(Q, c, A, b, G, h):
    Q = 0.5 * (Q + Q.T)
    return jnp.sum(bj.solve_qp(Q, c, A, b, G, h).y)


@listed
def test_jaxopt_qp_eq_and_ineq():
    """jaxopt's 2-variable QP (eq. and ineq.): solution, then d sum(y)/d(Q, c, A, b, G, h)."""
    data = (_Q2, _C2, _A2, _B2, _G2, _H2)
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-12)
    np.testing.assert_allclose(sol.y, [0.25, 0.75], atol=1e-12)
    assert_fd_close(_sum_y, data, (0, 1, 2, 3, 4, 5), rtol=1e-6)


@listed
def test_jaxopt_qp_eq_only():
    """jaxopt's EqualityConstrainedQP case: gradients w.r.t. Q, c, A, b against the KKT solve."""
    data = (_Q2, _C2, _A2, _B2, *empty(2))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-12)

    def closed_form(Q, c, A, b):
        Q = 0.5 * (Q + Q.T)
        K = jnp.block([[Q, A.T], [A, jnp.zeros((1, 1))]])
        return jnp.sum(jnp.linalg.solve(K, jnp.concatenate([-c, b]))[:2])

    got = jax.grad(lambda Q, c, A, b: _sum_y(Q, c, A, b, *empty(2)), (0, 1, 2, 3))(*data[:4])
    ref = jax.grad(closed_form, (0, 1, 2, 3))(*data[:4])
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-12)


def _simplex_projection(x):
    """Euclidean projection onto the probability simplex by sorting (NumPy)."""
    u = np.sort(x)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, x.size + 1) > 0)[0][-1]
    return np.maximum(x - css[rho] / (rho + 1), 0.0)


def _project_simplex_qp(x):
    n = x.shape[0]
    return bj.solve_qp(jnp.eye(n, dtype=x.dtype), -x, jnp.ones((1, n), x.dtype),
                       jnp.ones(1, x.dtype), -jnp.eye(n, dtype=x.dtype),
                       jnp.zeros(n, x.dtype)).y


@listed
@pytest.mark.parametrize("dtype", cases("test_jaxopt_projection_simplex", ["float64", "float32"]))
def test_jaxopt_projection_simplex(dtype):
    """Projection onto the simplex as a QP; its Jacobian ``diag(1_S) - 1_S 1_S'/|S|``."""
    x = np.random.default_rng(0).standard_normal(10).astype(dtype)
    p_ref = _simplex_projection(x.astype(np.float64))
    support = (p_ref > 0).astype(np.float64)
    J_ref = np.diag(support) - np.outer(support, support) / support.sum()
    tol = 1e-10 if dtype == "float64" else 1e-4
    p = jax.jit(_project_simplex_qp)(jnp.asarray(x))
    J = jax.jit(jax.jacrev(_project_simplex_qp))(jnp.asarray(x))
    assert p.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(p, p_ref, atol=tol)
    np.testing.assert_allclose(J, J_ref, atol=tol)


@listed
def test_jaxopt_projection_hyperplane():
    """Projection onto ``a'y = b`` (jaxopt's EqualityConstrainedQP and BoxOSQP cases)."""
    x, a, beta = np.array([1.0, 2.0]), np.array([-0.5, 1.5]), 0.3

    def proj(x):
        return bj.solve_qp(jnp.eye(2), -x, a[None], jnp.array([beta]), *empty(2)).y

    expected = x - (a @ x - beta) / (a @ a) * a
    np.testing.assert_allclose(jax.jit(proj)(x), expected, atol=1e-12)
    np.testing.assert_allclose(jax.jacrev(proj)(x), np.eye(2) - np.outer(a, a) / (a @ a),
                               atol=1e-12)


@listed
def test_jaxopt_eq_qp_random():
    """jaxopt's pytree EqualityConstrainedQP data (7 variables, 4 equalities), flattened."""
    rng = np.random.RandomState(0)
    Q = rng.randn(7, 7)
    Q = Q @ Q.T
    A = rng.randn(4, 7)
    c = rng.randn(7)
    b = rng.randn(4)
    data = (Q, c, A, b, *empty(7))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-10)
    K = np.block([[Q, A.T], [A, np.zeros((4, 4))]])
    ref = np.linalg.solve(K, np.concatenate([-c, b]))
    np.testing.assert_allclose(sol.y, ref[:7], rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(sol.nu, ref[7:], rtol=1e-8, atol=1e-10)


@listed
def test_jaxopt_eq_qp_challenging():
    """jaxopt's "challenging" EqualityConstrainedQP: 100 variables, 98 dense equalities.

    ``Q = X X'`` with ``X`` uniform has a huge condition number; jaxopt asks only for an
    optimality error below 0.1 (with iterative refinement). Here: SUCCESS means certified.
    """
    rng = np.random.RandomState(511)
    X = rng.rand(100, 100)
    Q = X @ X.T
    c = rng.rand(100)
    A = rng.rand(98, 100)
    b = rng.rand(98)
    data = (Q, c, A, b, *empty(100))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-8)


def _osqp_random(problem_size, n_eq, n_ineq):
    """jaxopt's ``get_random_osqp_problem`` data, in ``A y = b``, ``G y <= h`` form.

    OSQP form ``l <= C y <= u`` with ``n_ineq`` two-sided rows (``l < u``) and ``n_eq``
    equality rows (``l = u``).
    """
    rng = np.random.RandomState(problem_size + n_eq + n_ineq)
    Q = rng.randn(problem_size, problem_size)
    Q = Q.T @ Q
    c = rng.randn(problem_size)
    C = rng.randn(n_ineq + n_eq, problem_size)
    lo = rng.randn(n_ineq)
    up = lo + np.abs(rng.randn(n_ineq))
    b = rng.randn(n_eq)
    Ci = C[:n_ineq]
    return Q, c, C[n_ineq:], b, np.vstack([Ci, -Ci]), np.concatenate([up, -lo])


@listed
def test_jaxopt_boxosqp_small_qp():
    """BoxOSQP's small random QP (16 variables, 2 equalities, 4 two-sided rows).

    Solution certified, and the Jacobian of ``y*`` w.r.t. ``(Q, c)`` (jaxopt compares it
    with CvxpyQP's) against central differences.
    """
    data = _osqp_random(16, 2, 4)
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-10)
    w = np.random.default_rng(1).standard_normal(16)

    def f(Q, c):
        Q = 0.5 * (Q + Q.T)
        return jnp.dot(w, bj.solve_qp(Q, c, *data[2:]).y)

    assert_fd_close(f, data[:2], (0, 1), rtol=1e-5)


@listed
@pytest.mark.parametrize("wrt", cases("test_jaxopt_boxosqp_eq_and_ineq", ["eq", "ineq"]))
def test_jaxopt_boxosqp_eq_and_ineq(wrt):
    """BoxOSQP's check_grads of the 2-variable QP w.r.t. (A, b) or (G, h), all outputs.

    ``y``, ``nu`` and ``lam`` are differentiated (``lam`` = 0 on inactive rows).
    """
    data = (_Q2, _C2, _A2, _B2, _G2, _H2)
    argnums = (2, 3) if wrt == "eq" else (4, 5)
    w = np.array([0.3, -1.1, 0.7, 0.4, 0.9])

    def f(*d):
        sol = bj.solve_qp(*d)
        return jnp.dot(w, jnp.concatenate([sol.y, sol.nu, sol.lam]))

    assert_fd_close(f, data, argnums, rtol=1e-6)


@listed
def test_jaxopt_kernel_svm_low_rank():
    """BoxOSQP's binary kernel SVM dual: a rank-8 linear kernel on 50 samples.

    ``min 1/2 beta'K beta - y'beta  s.t.  sum(beta) = 0,  0 <= y_i beta_i <= C``; compared
    with scikit-learn's SVC (libsvm) on the same precomputed kernel.
    """
    datasets = pytest.importorskip("sklearn.datasets")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    svm = pytest.importorskip("sklearn.svm")
    X, labels = datasets.make_classification(n_samples=50, n_features=8, n_informative=6,
                                             n_classes=2, random_state=0)
    X = preprocessing.Normalizer().fit_transform(X)
    yl = labels * 2.0 - 1.0
    C = 0.1
    K = X @ X.T
    lo, hi = -np.maximum(-yl * C, 0), np.maximum(yl * C, 0)
    data = (K, -yl, np.ones((1, 50)), np.zeros(1), np.vstack([np.eye(50), -np.eye(50)]),
            np.concatenate([hi, -lo]))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-8)
    svc = svm.SVC(kernel="precomputed", C=C, tol=1e-10).fit(K, yl)
    beta_skl = np.zeros(50)
    beta_skl[svc.support_] = svc.dual_coef_[0]

    def obj(beta):
        return 0.5 * beta @ K @ beta - yl @ beta

    assert obj(np.asarray(sol.y)) <= obj(beta_skl) + 1e-9
    # the solution is a vertex (every beta_i at a bound): unique; libsvm gets it to 1e-11
    np.testing.assert_allclose(sol.y, beta_skl, atol=1e-6)


@listed
def test_jaxopt_infeasible_polyhedron():
    """Inconsistent equalities ``p1 + p2 = 1, p2 = 1, -p1 + p2 = -1`` with ``p >= 0``."""
    A = np.array([[1.0, 1.0], [0.0, 1.0], [-1.0, 1.0]])
    sol = solve(np.eye(2), np.zeros(2), A, np.array([1.0, 1.0, -1.0]), -np.eye(2), np.zeros(2))
    assert S(int(sol.info.status)) == S.INFEASIBLE


@listed
def test_jaxopt_infeasible_lp():
    """``min y1 + y2  s.t.  y1 >= 6, y2 >= 6, y1 + y2 <= 11``: an infeasible LP."""
    G = np.array([[-1.0, 0.0], [0.0, -1.0], [1.0, 1.0]])
    sol = solve(np.zeros((2, 2)), np.ones(2), *empty(2), G, np.array([-6.0, -6.0, 11.0]))
    assert S(int(sol.info.status)) == S.INFEASIBLE


@listed
def test_jaxopt_unbounded_lp():
    """``min y1 - 2 y2 + y3  s.t.  y1 + y2 >= 0, y3 = 1``: unbounded below."""
    sol = solve(np.zeros((3, 3)), np.array([1.0, -2.0, 1.0]), np.array([[0.0, 0.0, 1.0]]),
                np.array([1.0]), np.array([[-1.0, -1.0, 0.0]]), np.zeros(1))
    assert S(int(sol.info.status)) == S.UNBOUNDED


@listed
def test_jaxopt_portfolio():
    """BoxOSQP's portfolio problem: low-rank-plus-diagonal covariance, the simplex."""
    rng = np.random.RandomState(0)
    assets, factors = 10, 3
    F = rng.randn(assets, factors)
    D = np.diag(rng.uniform(0.0, factors**0.5, assets))
    cov = 2 * (F @ F.T + D)
    mu = rng.randn(assets)
    data = (cov, mu, np.ones((1, assets)), np.ones(1), -np.eye(assets), np.zeros(assets))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-10)

    def f(cov, mu):
        return jnp.sum(bj.solve_qp(cov, mu, *data[2:]).y ** 2)

    assert_fd_close(f, data[:2], (0, 1), rtol=1e-5)


def _lasso_data():
    datasets = pytest.importorskip("sklearn.datasets")
    X, t = datasets.make_regression(n_samples=10, n_features=3, random_state=0)
    return X, t, 10.0


def _lasso_qp(X, t, lam):
    """BoxOSQP's lasso QP: ``min r'r + 2 n lam 1'u  s.t.  X w - r = t,  -u <= w <= u``.

    Variables ``(w, r, u)``; the quadratic is singular (zero on ``w`` and ``u``).
    """
    n, d = X.shape
    Q = jnp.zeros((2 * d + n, 2 * d + n)).at[d:d + n, d:d + n].set(2 * jnp.eye(n))
    c = jnp.concatenate([jnp.zeros(d + n), 2 * n * lam * jnp.ones(d)])
    A = jnp.concatenate([X, -jnp.eye(n), jnp.zeros((n, d))], axis=1)
    eye, Z = jnp.eye(d), jnp.zeros((d, n))
    G = jnp.block([[eye, Z, -eye], [-eye, Z, -eye]])
    return Q, c, A, t, G, jnp.zeros(2 * d)


def _lasso_w(X, t, lam):
    return bj.solve_qp(*_lasso_qp(X, t, lam)).y[: X.shape[1]]


@listed
def test_jaxopt_lasso():
    """Lasso as a QP (singular quadratic) against scikit-learn's coordinate descent."""
    linear_model = pytest.importorskip("sklearn.linear_model")
    X, t, lam = _lasso_data()
    data = tuple(np.asarray(v) for v in _lasso_qp(X, t, lam))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-8)
    # sklearn's Lasso minimises ||X w - t||^2 / (2 n) + alpha ||w||_1: the same problem / 2n
    ref = linear_model.Lasso(alpha=lam, fit_intercept=False, tol=1e-14, max_iter=100_000)
    ref.fit(X, t)
    np.testing.assert_allclose(sol.y[:3], ref.coef_, rtol=1e-6, atol=1e-6)


@listed
def test_jaxopt_lasso_jacobian():
    """d w*/d X of the lasso QP against the closed form on the support.

    On the support ``S`` with signs ``s``: ``X_S'X_S w_S = X_S't - n lam s``, ``w = 0`` off it.
    """
    X, t, lam = _lasso_data()
    w = np.asarray(jax.jit(_lasso_w)(X, t, lam))
    support = np.abs(w) > 1e-8
    signs = np.sign(w[support])
    assert support.any()

    def closed_form(X):
        XS = X[:, support]
        wS = jnp.linalg.solve(XS.T @ XS, XS.T @ t - X.shape[0] * lam * signs)
        return jnp.zeros(X.shape[1]).at[np.flatnonzero(support)].set(wS)

    np.testing.assert_allclose(w, closed_form(X), rtol=1e-8, atol=1e-8)
    J = jax.jacrev(_lasso_w)(X, t, lam)
    np.testing.assert_allclose(J, jax.jacrev(closed_form)(X), rtol=1e-6, atol=1e-6)


@listed
def test_jaxopt_osqp_random_200():
    """BoxOSQP's LU test problem: 200 variables, 30 equalities, 70 two-sided rows."""
    data = _osqp_random(200, 30, 70)
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-8)


# ===========================================================================================
# cvxpylayers (cvxpy/cvxpylayers, tests/test_jax.py and tests/test_torch.py)
# ===========================================================================================


def _l1_regression_lp(A, b):
    """``min 1/2 ||A x - b||_1  s.t.  x >= 0`` as an LP in ``(x, t)``: ``-t <= A x - b <= t``."""
    m, n = A.shape
    Q = jnp.zeros((n + m, n + m))
    c = jnp.concatenate([jnp.zeros(n), 0.5 * jnp.ones(m)])
    eye, Zn = jnp.eye(m), jnp.zeros((n, m))
    G = jnp.block([[A, -eye], [-A, -eye], [-jnp.eye(n), Zn]])
    h = jnp.concatenate([b, -b, jnp.zeros(n)])
    return Q, c, jnp.zeros((0, n + m)), jnp.zeros(0), G, h


@listed
def test_cvxpylayers_l1_regression_lp():
    """cvxpylayers' first example (an LP): solution certified, d sum(x)/d(A, b) checked."""
    rng = np.random.default_rng(0)
    A, b = rng.standard_normal((3, 2)), rng.standard_normal(3)
    data = tuple(np.asarray(v) for v in _l1_regression_lp(A, b))
    sol = solve(*data)
    assert_certified(data, sol, tol=1e-9)

    def f(A, b):
        return jnp.sum(bj.solve_qp(*_l1_regression_lp(A, b)).y[:2])

    assert_fd_close(f, (A, b), (0, 1), rtol=1e-5)


def _ridge_qp(A, b):
    """``min ||A x - b||^2 + ||x||^2`` as ``1/2 x'(2A'A + 2I)x - 2(A'b)'x``."""
    n = A.shape[1]
    return 2 * (A.T @ A + jnp.eye(n)), -2 * A.T @ b


def _ridge_closed_form(A, b):
    return jnp.linalg.solve(A.T @ A + jnp.eye(A.shape[1]), A.T @ b)


@listed
def test_cvxpylayers_least_squares():
    """d sum(x*)/d(A, b) of ridge least squares (100 x 20) against the closed form."""
    rng = np.random.default_rng(0)
    A, b = rng.standard_normal((100, 20)), rng.standard_normal(100)

    def f(A, b):
        return jnp.sum(bj.solve_qp(*_ridge_qp(A, b)).y)

    got = jax.grad(f, (0, 1))(A, b)
    ref = jax.grad(lambda A, b: jnp.sum(_ridge_closed_form(A, b)), (0, 1))(A, b)
    for g, r in zip(got, ref, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-10)


@listed
def test_cvxpylayers_broadcasting():
    """A batch of two identical ``b`` under ``vmap``: the gradient w.r.t. ``A`` doubles."""
    rng = np.random.default_rng(1)
    A, b0 = rng.standard_normal((100, 20)), rng.standard_normal(100)
    bs = np.stack([b0, b0])

    def f(A, bs):
        ys = jax.vmap(lambda b: bj.solve_qp(*_ridge_qp(A, b)).y)(bs)
        return jnp.sum(ys)

    gA, gb = jax.grad(f, (0, 1))(A, bs)
    rA, rb = jax.grad(lambda A, b: jnp.sum(_ridge_closed_form(A, b)), (0, 1))(A, b0)
    np.testing.assert_allclose(gA / 2, rA, atol=1e-10)
    np.testing.assert_allclose(gb[0], rb, atol=1e-10)
    np.testing.assert_allclose(gb[1], rb, atol=1e-10)


@listed
def test_cvxpylayers_shared_parameter():
    """Two least-squares layers sharing ``A`` (10 x 5): the Jacobian of both solutions."""
    rng = np.random.default_rng(2)
    A = rng.standard_normal((10, 5))
    b1, b2 = rng.standard_normal(10), rng.standard_normal(10)
    w = rng.standard_normal(10)

    def f(A):
        x1 = bj.solve_qp(2 * A.T @ A, -2 * A.T @ b1).y
        x2 = bj.solve_qp(2 * A.T @ A, -2 * A.T @ b2).y
        return jnp.dot(w, jnp.concatenate([x1, x2]))

    assert_fd_close(f, (A,), (0,), rtol=1e-6)


@listed
def test_cvxpylayers_equality():
    """``min ||x||^2  s.t.  x = b``: the Jacobian of ``x*`` w.r.t. ``b`` is the identity."""
    n = 10
    b = np.random.default_rng(3).standard_normal(n)

    def layer(b):
        return bj.solve_qp(2 * jnp.eye(n), jnp.zeros(n), jnp.eye(n), b).y

    np.testing.assert_allclose(jax.jit(layer)(b), b, atol=1e-12)
    np.testing.assert_allclose(jax.jacrev(layer)(b), np.eye(n), atol=1e-12)


@listed
@pytest.mark.parametrize("objective", cases("test_cvxpylayers_infeasible", ["c=0", "c=1", "Q=1"]))
def test_cvxpylayers_infeasible(objective):
    """``x >= 1, x <= -1``: INFEASIBLE, whatever the objective (cvxpylayers' test uses a
    constant; ``c = 1`` and ``Q = 1`` are the issue's variants)."""
    Q = np.ones((1, 1)) if objective == "Q=1" else np.zeros((1, 1))
    c = np.ones(1) if objective == "c=1" else np.zeros(1)
    sol = solve(Q, c, *empty(1), np.array([[-1.0], [1.0]]), np.array([-1.0, -1.0]))
    assert S(int(sol.info.status)) == S.INFEASIBLE


@listed
def test_cvxpylayers_unbounded():
    """``min x  s.t.  x <= 1``: UNBOUNDED."""
    sol = solve(np.zeros((1, 1)), np.ones(1), *empty(1), np.ones((1, 1)), np.ones(1))
    assert S(int(sol.info.status)) == S.UNBOUNDED


@listed
def test_cvxpylayers_box_clamp():
    """``min 1/2 ||x||^2 + q'x`` on the box ``[-0.5, 0.5]^3``: ``clip(-q)``, Jacobian w.r.t.
    ``q`` ``-diag(free)``."""
    q = np.array([3.0, -3.0, 0.1])
    G, h = np.vstack([np.eye(3), -np.eye(3)]), 0.5 * np.ones(6)

    def layer(q):
        return bj.solve_qp(jnp.eye(3), q, *empty(3), G, h).y

    np.testing.assert_allclose(jax.jit(layer)(q), [-0.5, 0.5, -0.1], atol=1e-12)
    # clamped coordinates: 0 up to the backward system's ridge (1e-12)
    np.testing.assert_allclose(jax.jacrev(layer)(q), -np.diag([0.0, 0.0, 1.0]), atol=1e-10)


@listed
def test_cvxpylayers_quad_form_grad_Q():
    """Unconstrained ``min 1/2 x'Qx + q'x``: d sum(x*)/dQ at ``Q = 2I`` (symmetrised input)."""
    q = np.array([1.0, -1.0, 0.5])

    def f(Q):
        return jnp.sum(bj.solve_qp(0.5 * (Q + Q.T), q).y)

    expected = jax.grad(lambda Q: jnp.sum(jnp.linalg.solve(0.5 * (Q + Q.T), -q)))(2 * np.eye(3))
    np.testing.assert_allclose(jax.grad(f)(2 * np.eye(3)), expected, atol=1e-12)
    assert_fd_close(f, (2 * np.eye(3),), (0,), rtol=1e-6)


@listed
def test_cvxpylayers_batched_Q():
    """A ``vmap`` batch of four scaled identities: ``x_i = -q_i / s_i`` and its gradients."""
    scales = np.array([1.0, 2.0, 3.0, 4.0])
    Qs = scales[:, None, None] * np.eye(3)
    qs = np.random.default_rng(136).standard_normal((4, 3))

    def f(Qs, qs):
        return jnp.sum(jax.vmap(lambda Q, q: bj.solve_qp(Q, q).y)(Qs, qs))

    ys = jax.vmap(lambda Q, q: bj.solve_qp(Q, q).y)(Qs, qs)
    np.testing.assert_allclose(ys, -qs / scales[:, None], atol=1e-12)
    gQ, gq = jax.grad(f, (0, 1))(Qs, qs)
    np.testing.assert_allclose(gq, -np.ones((4, 3)) / scales[:, None], atol=1e-12)
    # d/dQ of 1'Q^-1(-q) = Q^-T 1 q'Q^-T (symmetrised)
    ref = np.stack([np.outer(np.ones(3), qq) / s**2 for s, qq in zip(scales, qs, strict=True)])
    np.testing.assert_allclose(gQ, 0.5 * (ref + ref.transpose(0, 2, 1)), atol=1e-12)


@listed
def test_cvxpylayers_max_iter_is_not_success():
    """cvxpylayers checks that ``max_iters=1`` changes the answer; here a one-iteration
    solve of a constrained QP without the polish must not report SUCCESS, and with the polish
    it may only when its answer is certified (the active set is often right after one
    step)."""
    rng = np.random.default_rng(123)
    A, b = rng.standard_normal((50, 20)), rng.standard_normal(50)
    Q, c = 2 * (A.T @ A + 0.01 * np.eye(20)), -2 * A.T @ b
    G, h = np.vstack([np.eye(20), -np.eye(20)]), 0.05 * np.ones(40)
    one = bj.solve_qp(Q, c, G=G, h=h, max_iter=1, polish=False)
    full = solve(Q, c, *empty(20), G, h)
    assert S(int(one.info.status)) != S.SUCCESS
    assert_certified((Q, c, *empty(20), G, h), full, tol=1e-9)
    polished = bj.solve_qp(Q, c, G=G, h=h, max_iter=1)
    if S(int(polished.info.status)) == S.SUCCESS:
        assert_certified((Q, c, *empty(20), G, h), polished, tol=1e-9)


@listed
def test_cvxpylayers_matrix_variable():
    """``min ||A X - B||^2 + 0.01 ||X||^2`` over a matrix ``X``: columns under ``vmap``."""
    rng = np.random.default_rng(123)
    A, B = rng.standard_normal((50, 20)), rng.standard_normal((50, 10))
    Q = 2 * (A.T @ A + 0.01 * np.eye(20))
    X = jax.vmap(lambda bcol: bj.solve_qp(Q, -2 * A.T @ bcol).y)(B.T).T
    ref = np.linalg.solve(A.T @ A + 0.01 * np.eye(20), A.T @ B)
    np.testing.assert_allclose(X, ref, rtol=1e-9, atol=1e-10)
