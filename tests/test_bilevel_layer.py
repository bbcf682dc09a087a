"""Tests of the BiGrad bilevel layer (docs lower/bilevel-layer.md; oracles T1 and T2)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bilevel_jax._src.bilevel_layer import bilevel_layer, saddle_system
from bilevel_jax._src.types import SolveError, Status

from helpers import tree_allclose

MODES = ["saddle", "schur", "gauss_newton"]

# ------------------------------------------------------------------ T1: scalar closed form

P, Q, B, C, E, W = 2.0, 1.0, 1.0, 0.5, 1.0, 2.0


def g_t1(x, y, th):
    return 0.5 * Q * y**2 - y * (B * x + C * th)


def f_t1(x, y, th):
    return 0.5 * P * x**2 - E * x * th + 0.5 * (y - W * th) ** 2


def _t1_outputs(mode, **kwargs):
    """Jittable ``th -> (x, y, VJP with (1, 1), dx/dth, dy/dth)`` on T1."""

    def fn(th):
        sol = bilevel_layer(f_t1, g_t1, 0.0, 0.0, th, hypergrad=mode, **kwargs)
        return sol.x, sol.y

    def all_outputs(th):
        (x, y), vjp = jax.vjp(fn, th)
        one, zero = jnp.ones_like(x), jnp.zeros_like(x)
        return x, y, vjp((one, one))[0], vjp((one, zero))[0], vjp((zero, one))[0]

    return all_outputs


@pytest.mark.parametrize("mode", MODES)
def test_t1_scalar_closed_form(mode):
    """x* = 5/6 th, y* = 4/3 th, dx/dth = 5/6, dy/dth = 4/3, VJP with (1, 1) = 13/6."""
    th = 1.0
    q_over = (B / Q) * (C / Q - W)
    x_closed = th * (E - q_over) / (P + B**2 / Q**2)
    assert abs(x_closed - 5 / 6) < 1e-15
    x, y, vjp11, dx, dy = jax.jit(_t1_outputs(mode))(th)
    # g is quadratic, so the Gauss-Newton push-back is exact too.
    for got, want in [(x, 5 / 6), (y, 4 / 3), (vjp11, 13 / 6), (dx, 5 / 6), (dy, 4 / 3)]:
        tree_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_t1_saddle_matrix():
    """K = [[2, 0, 1], [0, 1, -1], [1, -1, 0]], K_theta = (-1, -2, 1/2), -K^-1 K_theta."""
    K, K_theta, lam = jax.jit(lambda x, y, z: saddle_system(f_t1, g_t1, x, y, z))(
        5 / 6, 4 / 3, 1.0)
    tree_allclose(K, np.array([[2.0, 0.0, 1.0], [0.0, 1.0, -1.0], [1.0, -1.0, 0.0]]),
                  atol=1e-14)
    tree_allclose(K_theta[:, 0], np.array([-1.0, -2.0, 0.5]), atol=1e-14)
    tree_allclose(lam, np.array([-2 / 3]), atol=1e-14)
    tree_allclose(-np.linalg.solve(K, K_theta)[:, 0], np.array([5 / 6, 4 / 3, -2 / 3]),
                  atol=1e-12)


def test_t1_jit_equals_eager(maybe_jit):
    # throw=True: a successful solve raises nothing, under jit (host callback) or eagerly.
    x, y, vjp11, _, _ = maybe_jit(_t1_outputs("saddle", throw=True))(1.5)
    tree_allclose((x, y, vjp11), (1.25, 2.0, 13 / 6), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ T2: nonquadratic


def _t2_problem(seed=0):
    rng = np.random.default_rng(seed)
    M1 = rng.standard_normal((4, 4))
    Qg = jnp.asarray(M1 @ M1.T + 4 * np.eye(4))
    M2 = rng.standard_normal((3, 3))
    Pf = jnp.asarray(M2 @ M2.T + 3 * np.eye(3))
    Bm, Cm = jnp.asarray(rng.standard_normal((4, 3))), jnp.asarray(rng.standard_normal((4, 2)))
    Em, Wm = jnp.asarray(rng.standard_normal((3, 2))), jnp.asarray(rng.standard_normal((4, 2)))

    def g(x, y, th):
        return (0.5 * y @ Qg @ y + y @ (Bm @ x + Cm @ th) + 0.25 * jnp.sum(y**4)
                + 0.1 * jnp.sum(jnp.sin(x) * y[:3]))

    def f(x, y, th):
        return (0.5 * x @ Pf @ x + x @ Em @ th + 0.5 * jnp.sum((y - Wm @ th) ** 2)
                + 0.05 * jnp.sum(x**4))

    return f, g


@functools.cache
def _t2_value_and_jac(mode="saddle"):
    """Jitted ``th -> ((x, y) stacked, d(x, y)/dth)`` on T2 (seed 0), shared by several tests.

    Solved to tol = 1e-13: Newton stops far below it, so h = 1e-6 central differences of the
    nested solve are accurate to ~1e-10.
    """
    f, g = _t2_problem()
    fn = _stacked(f, g, mode, tol=1e-13)
    return jax.jit(lambda t: (fn(t), jax.jacrev(fn)(t)))


def _stacked(f, g, mode="saddle", **kwargs):
    def fn(th):
        sol = bilevel_layer(f, g, jnp.zeros(3), jnp.zeros(4), th, hypergrad=mode, **kwargs)
        return jnp.concatenate([sol.x, sol.y])

    return fn


def g_small(x, y, z):
    """A small nonquadratic lower level: x scalar, y in R^2, z in R^2."""
    quad = 0.5 * (2 * y[0] ** 2 + y[0] * y[1] + y[1] ** 2)
    return (quad + y @ jnp.stack([x + z[0], 0.5 * z[1] - x]) + 0.25 * jnp.sum(y**4)
            + 0.1 * jnp.sin(x) * y[0])


def f_small(x, y, z):
    return x**2 - x * (z[0] - z[1]) + 0.5 * jnp.sum((y - z) ** 2) + 0.05 * x**4


def test_t2_nonquadratic_against_finite_differences():
    f, g = _t2_problem()
    th = jnp.asarray([0.7, -0.4])
    value_and_jac = _t2_value_and_jac()
    _, jac = value_and_jac(th)
    h = 1e-6
    fd = np.stack(
        [(value_and_jac(th + h * e)[0] - value_and_jac(th - h * e)[0]) / (2 * h)
         for e in np.eye(2)], 1)
    assert np.abs(jac - fd).max() <= 1e-6
    assert np.abs(_t2_value_and_jac("schur")(th)[1] - jac).max() <= 1e-10
    # Gauss-Newton drops the lam-weighted third derivatives of g (its quartic and sine
    # terms): a visible but small error.
    gn_err = np.abs(_t2_value_and_jac("gauss_newton")(th)[1] - jac).max()
    assert 1e-8 < gn_err < 0.05 * np.abs(jac).max()

    def system(t):
        sol = bilevel_layer(f, g, jnp.zeros(3), jnp.zeros(4), t)
        return sol, saddle_system(f, g, sol.x, sol.y, t)

    sol, (K, K_theta, _) = jax.jit(system)(th)
    assert int(sol.info.status) == Status.SUCCESS and sol.info.residual < 1e-10
    tree_allclose(K, K.T, atol=1e-14)
    tree_allclose(-np.linalg.solve(K, K_theta)[:7], jac, atol=1e-10)


def test_check_grads_with_minres_backward():
    """The dense backward is exact on T1/T2; here the matrix-free MINRES path vs differences."""

    def fn(z):
        sol = bilevel_layer(f_small, g_small, 0.0, jnp.zeros(2), z, linear_solver="minres")
        return jnp.concatenate([jnp.atleast_1d(sol.x), sol.y])

    # Reverse mode only (custom VJP); eps ~ sqrt(machine eps) scale, inner solves at 1e-10,
    # MINRES at a relative residual of 1e-12.
    check_grads(jax.jit(fn), (jnp.asarray([0.2, 0.5]),), order=1, modes=["rev"], eps=1e-6,
                atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ closure conversion


def test_closed_over_hyperparameter_gets_its_gradient():
    def closure(z, scale):
        f_closed = lambda x, y, t: scale * f_small(x, y, t) + 0.3 * scale * x  # noqa: E731
        g_closed = lambda x, y, t: g_small(x, y, t) + scale * y @ y  # noqa: E731
        sol = bilevel_layer(f_closed, g_closed, 0.0, jnp.zeros(2), z)
        return sol.x**2 + jnp.sum(sol.y)

    def explicit(z, scale):
        def f_in(x, y, t):
            return t[1] * f_small(x, y, t[0]) + 0.3 * t[1] * x

        def g_in(x, y, t):
            return g_small(x, y, t[0]) + t[1] * y @ y

        sol = bilevel_layer(f_in, g_in, 0.0, jnp.zeros(2), (z, scale))
        return sol.x**2 + jnp.sum(sol.y)

    z, scale = jnp.asarray([0.3, 0.1]), 1.7
    grad_closure = jax.jit(jax.grad(closure, argnums=(0, 1)))(z, scale)
    grad_explicit = jax.jit(jax.grad(explicit, argnums=(0, 1)))(z, scale)
    assert abs(float(grad_closure[1])) > 1e-3
    tree_allclose(grad_closure, grad_explicit, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------ transformations, pytrees


def test_vmap_equals_loop():
    value_and_jac = _t2_value_and_jac()
    ths = jnp.asarray(np.random.default_rng(5).standard_normal((3, 2)))
    batched = jax.jit(jax.vmap(value_and_jac))(ths)
    looped = [value_and_jac(th) for th in ths]
    # A batched while_loop runs to the slowest member: agreement to the solver tolerance.
    tree_allclose(batched[0], jnp.stack([v for v, _ in looped]), rtol=1e-9, atol=1e-10)
    tree_allclose(batched[1], jnp.stack([d for _, d in looped]), rtol=1e-8, atol=1e-9)


def test_pytree_variables_and_no_recompilation():
    """Dict x, tuple y, dict z (with an integer leaf): the flat T1 problem embedded twice."""
    traces = []

    def g(x, y, z):
        traces.append(1)
        return g_t1(x["a"], y[0], z["t"]) + g_t1(x["b"], y[1], z["n"] * z["t"])

    def f(x, y, z):
        return f_t1(x["a"], y[0], z["t"]) + f_t1(x["b"], y[1], z["n"] * z["t"])

    x0 = {"a": jnp.zeros(()), "b": jnp.zeros(())}
    y0 = (jnp.zeros(()), jnp.zeros(()))

    def loss(z):
        sol = bilevel_layer(f, g, x0, y0, z)
        return sol.x["a"] + sol.y[0] + sol.x["b"] + sol.y[1], sol

    fn = jax.jit(jax.value_and_grad(loss, has_aux=True, allow_int=True))
    (_, sol), grad = fn({"t": jnp.asarray(1.0), "n": 2})
    tree_allclose(sol.x, {"a": 5 / 6, "b": 5 / 3}, atol=1e-12)
    tree_allclose(sol.y, (4 / 3, 8 / 3), atol=1e-12)
    tree_allclose(grad["t"], 3 * 13 / 6, atol=1e-11)
    assert grad["n"].dtype == jax.dtypes.float0
    count = len(traces)
    fn({"t": jnp.asarray(0.4), "n": 2})
    assert len(traces) == count


def test_float32_in_float32_out():
    x0, y0, th = (jnp.zeros((), jnp.float32),) * 2 + (jnp.asarray(1.0, jnp.float32),)

    def fn(th):
        sol = bilevel_layer(f_t1, g_t1, x0, y0, th)
        return sol.x + sol.y, sol

    (_, sol), grad = jax.jit(jax.value_and_grad(fn, has_aux=True))(th)
    assert sol.x.dtype == sol.y.dtype == grad.dtype == jnp.float32
    assert int(sol.info.status) == Status.SUCCESS
    tree_allclose((sol.x, sol.y, grad), (5 / 6, 4 / 3, 13 / 6))


# ------------------------------------------------------------------ lower-level equalities


def _eq_small(x, z):
    return jnp.asarray([[1.0, 2.0]]), jnp.atleast_1d(x + z[1])


def _eq_layer(z, mode):
    sol = bilevel_layer(f_small, g_small, 0.0, jnp.zeros(2), z, eq=_eq_small, hypergrad=mode,
                        tol=1e-12)
    return jnp.concatenate([jnp.atleast_1d(sol.x), sol.y]), sol


@functools.cache
def _eq_value_and_jac():
    return jax.jit(lambda t: (_eq_layer(t, "saddle"),
                              jax.jacrev(lambda s: _eq_layer(s, "saddle")[0])(t)))


def test_lower_level_equality_constraints():
    """y on the coupled affine line y_0 + 2 y_1 = x + z_1: push-back vs central differences."""
    z = jnp.asarray([0.4, 0.9])
    value_and_jac = _eq_value_and_jac()
    (_, sol), jac = value_and_jac(z)
    assert int(sol.info.status) == Status.SUCCESS
    tree_allclose(sol.y[0] + 2 * sol.y[1], sol.x + z[1], atol=1e-12)
    h = 1e-6  # the nested solve is accurate to ~1e-14, so differences are good to ~1e-9
    fd = np.stack(
        [(value_and_jac(z + h * e)[0][0] - value_and_jac(z - h * e)[0][0]) / (2 * h)
         for e in np.eye(2)], 1)
    assert np.abs(jac - fd).max() <= 1e-6


@pytest.mark.slow
def test_schur_with_lower_level_equalities():
    """The Schur push-back with an indefinite lower-level KKT matrix G_w equals the saddle."""
    z = jnp.asarray([0.4, 0.9])
    jac = _eq_value_and_jac()(z)[1]
    jac_schur = jax.jit(jax.jacrev(lambda t: _eq_layer(t, "schur")[0]))(z)
    assert np.abs(jac_schur - jac).max() <= 1e-10


@pytest.mark.slow
def test_lbfgs_upper_solver_agrees_with_newton():
    f, g = _t2_problem(seed=8)
    th = jnp.asarray([0.5, 0.5])

    def loss(th, solver):
        sol = bilevel_layer(f, g, jnp.zeros(3), jnp.zeros(4), th, solver=solver)
        return jnp.sum(sol.x) + jnp.sum(sol.y**2), sol

    (v_n, sol_n), d_n = jax.jit(jax.value_and_grad(lambda t: loss(t, "newton"), has_aux=True))(th)
    (v_l, sol_l), d_l = jax.jit(jax.value_and_grad(lambda t: loss(t, "lbfgs"), has_aux=True))(th)
    assert int(sol_l.info.status) == Status.SUCCESS
    # L-BFGS stops at ||U|| <= 1e-10 (relative): the solution agrees to about 1e-9.
    tree_allclose((sol_l.x, sol_l.y, d_l), (sol_n.x, sol_n.y, d_n), rtol=1e-7, atol=1e-8)


# ------------------------------------------------------------------ bad input and failures


def test_bad_input_is_named_at_trace_time():
    x0, y0 = jnp.zeros(3), jnp.zeros(4)
    f, g = _t2_problem()
    th = jnp.zeros(2)
    with pytest.raises(ValueError, match="hypergrad"):
        bilevel_layer(f, g, x0, y0, th, hypergrad="newton")
    with pytest.raises(ValueError, match="solver"):
        bilevel_layer(f, g, x0, y0, th, solver="bfgs")
    with pytest.raises(ValueError, match="linear_solver='minres'"):
        bilevel_layer(f, g, x0, y0, th, hypergrad="schur", linear_solver="minres")
    with pytest.raises(TypeError, match="f\\(x, y, z\\) must return a scalar"):
        bilevel_layer(lambda x, y, z: x, g, x0, y0, th)
    with pytest.raises(TypeError, match="g\\(x0, y0, z\\) could not be evaluated"):
        bilevel_layer(f, lambda x, y, z: y @ jnp.ones(5), x0, y0, th)
    with pytest.raises(TypeError, match="x0 must contain floating-point"):
        bilevel_layer(f, g, jnp.zeros(3, jnp.int32), y0, th)
    with pytest.raises(ValueError, match="y0 must contain at least one array"):
        bilevel_layer(f, g, x0, {}, th)
    with pytest.raises(ValueError, match="eq\\(x, z\\) returned A with shape \\(1, 3\\)"):
        bilevel_layer(f, g, x0, y0, th, eq=lambda x, z: (jnp.ones((1, 3)), jnp.ones(1)))
    with pytest.raises(ValueError, match="tol must be positive"):
        bilevel_layer(f, g, x0, y0, th, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        bilevel_layer(f, g, x0, y0, th, max_iter=0)


def test_status_max_steps_nonfinite_and_throw():
    f, g = f_small, g_small
    run = jax.jit(lambda th: bilevel_layer(f, g, 0.0, jnp.zeros(2), th, max_iter=1).info)
    info = run(jnp.asarray([2.0, -1.0]))
    assert int(info.status) == Status.MAX_STEPS and not bool(info.converged)
    assert 0 < float(info.residual) < np.inf
    info = run(jnp.asarray([jnp.nan, 0.0]))
    assert int(info.status) == Status.NONFINITE
    with pytest.raises(SolveError, match="MAX_STEPS"):
        # Eagerly; Newton is exact on T1, so only an unreachable tol leaves it short.
        bilevel_layer(f_t1, g_t1, 0.0, 0.0, 1.0, tol=1e-30, max_iter=1, throw=True)


# ------------------------------------------------------------------ benchmark smoke test
