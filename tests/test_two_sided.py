"""Two-sided constraints ``l <= C y <= u`` in ``bj.solve_qp`` (no stacking by the user)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj


def _data():
    rng = np.random.default_rng(3)
    n, r = 5, 3
    L = rng.standard_normal((n, n))
    Q = jnp.asarray(L @ L.T + np.eye(n))
    c = jnp.asarray(rng.standard_normal(n))
    C = jnp.asarray(rng.standard_normal((r, n)))
    # row 0 active at its upper bound, row 1 at its lower bound, row 2 an equality
    y_free = np.linalg.solve(np.asarray(Q), -np.asarray(c))
    Cy = np.asarray(C) @ y_free
    l = jnp.asarray([Cy[0] - 1.0, Cy[1] + 0.3, Cy[2] + 0.2])  # noqa: E741
    u = jnp.asarray([Cy[0] - 0.3, Cy[1] + 1.0, Cy[2] + 0.2])
    return Q, c, C, l, u


def _stacked(Q, c, C, l, u):  # noqa: E741
    return bj.solve_qp(Q, c, G=jnp.concatenate([C, -C]), h=jnp.concatenate([u, -l]))


def test_two_sided_equals_stacked_rows_with_signed_multipliers():
    Q, c, C, l, u = _data()  # noqa: E741
    sol = bj.solve_qp(Q, c, C=C, l=l, u=u)
    ref = _stacked(Q, c, C, l, u)
    assert int(sol.info.status) == bj.Status.SUCCESS
    np.testing.assert_allclose(sol.y, ref.y, atol=1e-10)
    r = C.shape[0]
    np.testing.assert_allclose(sol.lam, ref.lam[:r] - ref.lam[r:], atol=1e-9)
    assert sol.lam[0] > 0 and sol.lam[1] < 0  # upper bound active, lower bound active
    stationarity = Q @ sol.y + c + C.T @ sol.lam
    np.testing.assert_allclose(stationarity, 0, atol=1e-10)


def test_two_sided_gradients_match_stacked_and_finite_differences():
    Q, c, C, l, u = _data()  # noqa: E741
    w = jnp.arange(1.0, 6.0)

    def f(c, l, u):  # noqa: E741
        return w @ bj.solve_qp(Q, c, C=C, l=l, u=u).y

    def f_ref(c, l, u):  # noqa: E741
        return w @ _stacked(Q, c, C, l, u).y

    g = jax.grad(f, argnums=(0, 1, 2))(c, l, u)
    g_ref = jax.grad(f_ref, argnums=(0, 1, 2))(c, l, u)
    for a, b in zip(g, g_ref, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-10)
    eps = 1e-6
    fd = (f(c, l, u + eps * jnp.eye(3)[0]) - f(c, l, u - eps * jnp.eye(3)[0])) / (2 * eps)
    np.testing.assert_allclose(g[2][0], fd, rtol=1e-6, atol=1e-8)


def test_two_sided_defaults_scalars_and_errors():
    Q, c, C, _, _ = _data()
    free = bj.solve_qp(Q, c, C=C)  # no bounds: the unconstrained solution
    np.testing.assert_allclose(free.y, jnp.linalg.solve(Q, -c), atol=1e-10)
    box = bj.solve_qp(Q, c, C=jnp.eye(5), l=-0.1, u=0.1)
    assert float(jnp.max(jnp.abs(box.y))) <= 0.1 + 1e-12
    with pytest.raises(ValueError, match="l > u"):
        bj.solve_qp(Q, c, C=C, l=1.0, u=0.0)
    with pytest.raises(ValueError, match="pass C"):
        bj.solve_qp(Q, c, l=0.0)
    traced = jax.jit(lambda lo: bj.solve_qp(Q, c, C=C, l=lo, u=0.0))(jnp.ones(3))
    assert int(traced.info.status) == bj.Status.INFEASIBLE


def _argmin(Q, c, C, l, u, **kw):  # noqa: E741
    return bj.argmin(lambda y, t: 0.5 * y @ Q @ y + t @ y, jnp.zeros(c.shape[0]), c,
                     ineq=lambda t: (C, l, u), **kw)


def test_argmin_two_sided_rows_match_solve_qp():
    # ineq=lambda t: (C, l, u): the same solution, signed multipliers and hypergradients
    # (w.r.t. c, l and u; row 2 has l == u) as solve_qp(C=, l=, u=).
    Q, c, C, l, u = _data()  # noqa: E741
    l = l.at[1].set(-jnp.inf)  # noqa: E741  (a one-sided row)
    sol, ref = _argmin(Q, c, C, l, u), bj.solve_qp(Q, c, C=C, l=l, u=u)
    assert int(sol.info.status) == bj.Status.SUCCESS
    np.testing.assert_allclose(sol.y, ref.y, atol=1e-10)
    np.testing.assert_allclose(sol.lam, ref.lam, atol=1e-8)
    assert sol.lam.shape == (C.shape[0],)
    v = jnp.arange(1.0, 6.0)
    for argnum in (0, 1, 2):
        got = jax.grad(lambda *x: v @ _argmin(Q, x[0], C, x[1], x[2]).y, argnum)(c, l, u)
        want = jax.grad(lambda *x: v @ bj.solve_qp(Q, x[0], C=C, l=x[1], u=x[2]).y,
                        argnum)(c, l, u)
        np.testing.assert_allclose(got, want, atol=1e-8)


def test_argmin_two_sided_crossed_bounds_and_shapes():
    Q, c, C, l, u = _data()  # noqa: E741
    with pytest.raises(ValueError, match="l > u at .* row 0"):
        _argmin(Q, c, C, u + 1.0, u)
    traced = jax.jit(lambda lo: _argmin(Q, c, C, lo, u))(u + 1.0)
    assert int(traced.info.status) == bj.Status.INFEASIBLE
    assert np.all(np.isnan(traced.y))
    with pytest.raises(ValueError, match="l with shape"):
        _argmin(Q, c, C, jnp.zeros(2), u)
    with pytest.raises(TypeError, match="a pair \\(G, h\\) or a triple"):
        bj.argmin(lambda y, t: y @ y, jnp.zeros(5), c, ineq=lambda t: (C,))
