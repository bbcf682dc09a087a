"""Tests of ``saddle_point`` and ``duality_gap`` (docs lower/minimax.md; oracle T3)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bilevel_jax._src.minimax import SaddleInfo, duality_gap, saddle_point
from bilevel_jax._src.projections import Box, Simplex
from bilevel_jax._src.types import Status

from helpers import tree_allclose


def t3(y1, y2, x):
    """T3: y1* = -x/6, y2* = -2x/3."""
    return y1**2 + y1 * y2 - 0.5 * y2**2 + x * y1 - 0.5 * x * y2


def t3_gap(y1, y2, x):
    return (
        y1**2 + x * y1 + 0.5 * (y1 - x / 2) ** 2 + (y2 + x) ** 2 / 4 + 0.5 * y2**2 + 0.5 * x * y2
    )


class Quad(NamedTuple):
    """``f = 1/2 u'Au + u'Bv - 1/2 v'Cv + u'(Dx + a) - v'(Ex + b)`` (T3's general quadratic)."""

    A: np.ndarray
    B: np.ndarray
    C: np.ndarray
    D: np.ndarray
    E: np.ndarray
    a: np.ndarray
    b: np.ndarray

    def f(self, u, v, x):
        return (
            0.5 * u @ self.A @ u + u @ self.B @ v - 0.5 * v @ self.C @ v
            + u @ (self.D @ x + self.a) - v @ (self.E @ x + self.b)
        )

    def K(self):
        return np.block([[self.A, self.B], [self.B.T, -self.C]])

    def solution(self, x):
        """``[[A, B], [B', -C]] [u; v] = [-(Dx + a); Ex + b]``."""
        x = np.asarray(x)
        z = np.linalg.solve(self.K(), np.concatenate([-(self.D @ x + self.a), self.E @ x + self.b]))
        n = self.A.shape[0]
        return z[:n], z[n:]

    def jacobian(self):
        J = np.linalg.solve(self.K(), np.vstack([-self.D, self.E]))
        n = self.A.shape[0]
        return J[:n], J[n:]


def quad(seed=0, nu=4, nv=3, dx=2):
    rng = np.random.default_rng(seed)
    M = rng.standard_normal((nu, nu))
    N = rng.standard_normal((nv, nv))
    return Quad(
        M @ M.T / nu + np.eye(nu), rng.standard_normal((nu, nv)), N @ N.T / nv + np.eye(nv),
        rng.standard_normal((nu, dx)), rng.standard_normal((nv, dx)),
        rng.standard_normal(nu), rng.standard_normal(nv),
    )


Q = quad()
X = jnp.asarray([0.3, -0.2])


def nonquadratic(seed=1, nu=4, nv=3, dx=2):
    """A smooth strongly convex–strongly concave non-quadratic saddle function."""
    q = quad(seed, nu, nv, dx)

    def f(u, v, x):
        return (
            q.f(u, v, x)
            + 0.1 * jnp.sum(u**4)
            - 0.1 * jnp.sum(v**4)
            + 0.3 * jnp.sin(x[0]) * jnp.sum(u[:3] ** 2 * v)
            + x[1] ** 2 * jnp.sum(u[1:] * v**2)
        )

    return f


# ------------------------------------------------------------------ T3 (saddle system)

# Unrolled extragradient and OGDA are checked against closed forms below (active box).
T3_CASES = [
    ("newton", "implicit"),
    ("extragradient", "implicit"),
    ("ogda", "implicit"),
    ("newton", "unrolled"),
]


def test_t3_saddle_and_derivatives():
    """y* = (-x/6, -2x/3), dy*/dx = (-1/6, -2/3) for every solver and rule (one compile)."""

    def one(x, solver, hypergrad):
        def solve(x):
            return saddle_point(t3, 0.0, 0.0, x, solver=solver, hypergrad=hypergrad)

        return solve(x), jax.jacrev(lambda x: solve(x)[:2])(x)

    results = jax.jit(lambda x: [one(x, *case) for case in T3_CASES])(1.0)
    for case, (sol, jac) in zip(T3_CASES, results, strict=True):
        assert int(sol.info.status) == Status.SUCCESS, case
        assert isinstance(sol.info, SaddleInfo)
        # First-order solvers stop at a relative residual of 1e-10 (condition number ~3).
        tree_allclose((sol.u, sol.v), (-1 / 6, -2 / 3), rtol=1e-9, atol=1e-9)
        tree_allclose(jac, (-1 / 6, -2 / 3), rtol=1e-12, atol=1e-12)
        assert 0 <= float(sol.info.gap) <= 1e-15, case


def test_t3_duality_gap_formula():
    """gap = T3 closed form at random points, >= 0, and 0 exactly at the saddle."""
    rng = np.random.default_rng(0)
    pts = jnp.asarray(rng.standard_normal((20, 3)) * 2)
    gaps = jax.jit(jax.vmap(lambda p: duality_gap(t3, p[0], p[1], p[2])))(pts)
    expected = t3_gap(pts[:, 0], pts[:, 1], pts[:, 2])
    tree_allclose(gaps, expected, rtol=1e-10, atol=1e-12)
    assert np.all(np.asarray(gaps) >= 0)
    at_saddle = jax.jit(duality_gap, static_argnums=0)(t3, -1 / 6, -2 / 3, 1.0)
    assert 0 <= float(at_saddle) <= 1e-15
    tree_allclose(t3_gap(-1 / 6, -2 / 3, 1.0), 0.0, atol=1e-15)


# ------------------------------------------------------------------ quadratic–bilinear saddles


def _quadratic_vjps(options):
    wu = np.random.default_rng(1).standard_normal(4)
    wv = np.random.default_rng(2).standard_normal(3)

    def vjp(**kw):
        def F(x):
            sol = saddle_point(Q.f, jnp.zeros(4), jnp.zeros(3), x, **kw)
            return sol.u @ wu + sol.v @ wv

        return jax.grad(F)

    @jax.jit
    def run(x):
        sol = saddle_point(Q.f, jnp.zeros(4), jnp.zeros(3), x)
        return (sol.u, sol.v), [vjp(**kw)(x) for kw in options]

    Du, Dv = Q.jacobian()
    return run(X), Du.T @ wu + Dv.T @ wv


def test_quadratic_unconstrained_against_dense_formula():
    """Random SCSC quadratic–bilinear saddle: solution and VJPs from the dense system, for
    Newton (implicit rule reusing its LU) and extragradient (dense LU of the system)."""
    options = [{}, {"solver": "extragradient"}]
    (z, grads), expected = _quadratic_vjps(options)
    tree_allclose(z, Q.solution(X))
    for grad in grads:
        tree_allclose(grad, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.slow
def test_quadratic_unconstrained_every_krylov_backward_solver():
    options = [{"linear_solver": m} for m in ["minres", "gmres", "normal_cg"]]
    (_, grads), expected = _quadratic_vjps(options)
    for kw, grad in zip(options, grads, strict=True):
        # Krylov backward solves stop at a relative residual of 1e-12.
        assert np.allclose(grad, expected, rtol=1e-8, atol=1e-10), kw


def _active_box_problem():
    """Q with an upper bound on u[0], u[1] and a lower bound on v[0], all strictly active."""
    u_star, v_star = Q.solution(X)
    hi_u = np.array([u_star[0] - 0.3, u_star[1] - 0.2, np.inf, np.inf])
    lo_v = np.array([v_star[0] + 0.25, -np.inf, -np.inf])
    act_u, act_v = np.array([1, 1, 0, 0], bool), np.array([1, 0, 0], bool)
    return hi_u, lo_v, act_u, act_v


def _active_set_oracle(x, hi_u, lo_v, act_u, act_v):
    """Solve the saddle system on the free coordinates with the active ones at their bounds."""
    K = Q.K()
    nu = Q.A.shape[0]
    act = np.concatenate([act_u, act_v])
    z_act = np.concatenate([hi_u, lo_v])[act]
    rhs = np.concatenate([-(Q.D @ x + Q.a), Q.E @ x + Q.b])
    free = ~act
    z = np.zeros(act.shape[0])
    z[act] = z_act
    z[free] = np.linalg.solve(K[np.ix_(free, free)], rhs[free] - K[np.ix_(free, act)] @ z_act)
    grad = K @ z - rhs  # [grad_u f; grad_v f]
    dz = np.zeros((act.shape[0], x.shape[0]))
    dz[free] = np.linalg.solve(K[np.ix_(free, free)], np.vstack([-Q.D, Q.E])[free])
    dbound = np.zeros((act.shape[0], act.sum()))  # d z / d (active bounds)
    dbound[act] = np.eye(act.sum())
    dbound[free] = -np.linalg.solve(K[np.ix_(free, free)], K[np.ix_(free, act)])
    return z[:nu], z[nu:], grad[:nu], grad[nu:], dz, dbound


@pytest.mark.parametrize(("solver", "hypergrad"), [
    ("extragradient", "implicit"),
    pytest.param("ogda", "unrolled", marks=pytest.mark.slow),
])
def test_quadratic_with_active_box_against_dense_formula(solver, hypergrad):
    """Box active on some coordinates of u and v: the masked system, and gradients with
    respect to the (traced) box bounds."""
    hi_u, lo_v, act_u, act_v = _active_box_problem()
    u_ex, v_ex, gu, gv, dz, dbound = _active_set_oracle(np.asarray(X), hi_u, lo_v, act_u, act_v)
    # Strict complementarity, so the oracle is the saddle point and is differentiable:
    # u pushes against its upper bounds (grad_u f < 0), v against its lower bound (grad_v f < 0).
    assert np.all(gu[act_u] < -1e-2) and np.all(gv[act_v] < -1e-2)
    kw = dict(solver=solver, hypergrad=hypergrad)
    if hypergrad == "unrolled":
        kw["max_iter"] = 3000

    def solve(x, bounds):
        hi = jnp.asarray(hi_u).at[:2].set(bounds[:2])
        lo = jnp.asarray(lo_v).at[0].set(bounds[2])
        sol = saddle_point(Q.f, jnp.zeros(4), jnp.zeros(3), x, u_set=Box(-jnp.inf, hi),
                           v_set=Box(lo, jnp.inf), **kw)
        return jnp.concatenate([sol.u, sol.v]), sol.info

    bounds = jnp.asarray([hi_u[0], hi_u[1], lo_v[0]])
    w = np.random.default_rng(3).standard_normal(7)

    @jax.jit
    def run(x, bounds):
        z, info = solve(x, bounds)
        gx, gb = jax.grad(lambda x, b: solve(x, b)[0] @ w, argnums=(0, 1))(x, bounds)
        return z, info, gx, gb

    z, info, gx, gb = run(X, bounds)
    assert int(info.status) == Status.SUCCESS
    tree_allclose(z, np.concatenate([u_ex, v_ex]), rtol=1e-8, atol=1e-9)
    tree_allclose(gx, dz.T @ w, rtol=1e-8, atol=1e-10)
    tree_allclose(gb, dbound.T @ w, rtol=1e-8, atol=1e-10)
    assert 0 <= float(info.gap) <= 1e-12


def test_ridge_gives_regularised_hypergradient():
    delta = 0.3
    Du = np.linalg.solve(Q.K() + delta * np.diag([1.0] * 4 + [-1.0] * 3),
                         np.vstack([-Q.D, Q.E]))[:4]
    jac = jax.jit(jax.jacrev(
        lambda x: saddle_point(Q.f, jnp.zeros(4), jnp.zeros(3), x, ridge=delta).u))(X)
    tree_allclose(jac, Du)


# ------------------------------------------------------------------ finite differences and rules


def test_check_grads_implicit_with_sets():
    """Reverse-mode check_grads of the implicit rule on a non-quadratic saddle with u in a box
    and v on a simplex (extragradient + the masked system). The unconstrained symmetric
    system is checked exactly against closed forms above (T3, dense formula, ridge)."""
    f0 = nonquadratic()
    f = lambda u, v, x: f0(u, v, x) - 2.0 * v[1]  # noqa: E731  (pushes v[1] to the face)

    @jax.jit
    def F(x):
        sol = saddle_point(f, jnp.zeros(4), jnp.ones(3) / 3, x, u_set=Box(-0.8, 0.8),
                           v_set=Simplex())
        value = jnp.sum(jnp.sin(sol.u) * jnp.arange(1.0, 5.0)) + jnp.sum(sol.v**2 * jnp.arange(3.0))
        return value, (sol.u, sol.v)

    x = jnp.asarray([0.4, 0.7])
    u, v = F(x)[1]
    # Some box bounds and simplex faces are active, so the masked system is exercised.
    assert np.sum(np.abs(np.abs(np.asarray(u)) - 0.8) < 1e-12) == 1
    assert np.sum(np.asarray(v) == 0) == 1
    # Inner residual 1e-10 -> about 1e-9 relative error in central differences (eps 1e-6).
    check_grads(lambda x: F(x)[0], (x,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_implicit_and_unrolled_agree_nonquadratic_with_sets():
    f = nonquadratic(seed=3)
    kw = dict(u_set=Box(-0.25, 0.25), v_set=Box(-0.4, jnp.inf))

    def F(x, **opts):
        sol = saddle_point(f, jnp.zeros(4), jnp.zeros(3), x, **kw, **opts)
        return jnp.sum(sol.u * jnp.arange(1.0, 5.0)) + jnp.sum(jnp.cos(sol.v))

    x = jnp.asarray([0.2, -0.5])
    g_imp, g_unr = jax.jit(lambda x: (
        jax.grad(F)(x), jax.grad(lambda x: F(x, hypergrad="unrolled", max_iter=1000))(x)
    ))(x)
    # Unrolled extragradient at a fixed step converges linearly; 1000 steps reach ~1e-11.
    tree_allclose(g_imp, g_unr, rtol=1e-8, atol=1e-9)


# ------------------------------------------------------------------ closure conversion


def test_closed_over_hyperparameter_gets_its_gradient():
    """A coupling weight captured by closure gets the same gradient as when passed in theta,
    equal to the closed form: with ``f_w = f + w u[0] v[0]`` the saddle matrix is
    ``K(w) = K + w (e_0 e_n' + e_n e_0')`` and ``dz/dw = -K(w)^{-1} (dK/dw) z``."""
    c = np.random.default_rng(8).standard_normal(7)

    def F_theta(w):
        f = lambda u, v, w: Q.f(u, v, X) + w * u[0] * v[0]  # noqa: E731
        sol = saddle_point(f, jnp.zeros(4), jnp.zeros(3), w)
        return jnp.concatenate([sol.u, sol.v]) @ c

    def F_closure(w):
        f = lambda u, v, _: Q.f(u, v, X) + w * u[0] * v[0]  # noqa: E731
        sol = saddle_point(f, jnp.zeros(4), jnp.zeros(3), None)
        return jnp.concatenate([sol.u, sol.v]) @ c

    w = 0.3
    g_theta, g_closure = jax.jit(lambda w: (jax.grad(F_theta)(w), jax.grad(F_closure)(w)))(w)
    dK = np.zeros((7, 7))
    dK[0, 4] = dK[4, 0] = 1.0
    Kw = Q.K() + w * dK
    x = np.asarray(X)
    z = np.linalg.solve(Kw, np.concatenate([-(Q.D @ x + Q.a), Q.E @ x + Q.b]))
    exact = c @ -np.linalg.solve(Kw, dK @ z)
    assert abs(exact) > 1e-3
    tree_allclose(g_theta, exact)
    tree_allclose(g_closure, g_theta, rtol=1e-12)


# ------------------------------------------------------------------ transformations


def test_jit_equals_eager(maybe_jit):
    def F(x):
        sol = saddle_point(t3, 0.0, 0.0, x, solver="extragradient", v_set=Box(-0.5, 0.5))
        return sol.u + sol.v**2

    value, grad = maybe_jit(jax.value_and_grad(F))(1.0)
    # v = -2/3 is clipped at -1/2, then u = -(x + v)/2 = -1/4 and du/dx = -1/2.
    tree_allclose((value, grad), (-0.25 + 0.25, -0.5), rtol=1e-9, atol=1e-9)
    ref = jax.jit(jax.value_and_grad(F))(1.0)
    tree_allclose((value, grad), ref, rtol=1e-12, atol=1e-14)


def test_vmap_equals_loop():
    def F(x):
        sol = saddle_point(t3, 0.0, 0.0, x, solver="extragradient", v_set=Box(-0.5, 0.5))
        return sol.u**3 + sol.v

    xs = jnp.asarray([0.3, 0.6, 1.0, 2.0])  # the bound on v is active for the last two
    batched = jax.jit(jax.vmap(jax.value_and_grad(F)))(xs)
    single = jax.jit(jax.value_and_grad(F))
    looped = [single(x) for x in xs]
    # The batched while_loop keeps stepping until its slowest member stops, so members can
    # take more steps than alone: agreement is to the solver tolerance.
    tree_allclose(batched[0], jnp.stack([v for v, _ in looped]), rtol=1e-8, atol=1e-9)
    tree_allclose(batched[1], jnp.stack([d for _, d in looped]), rtol=1e-7, atol=1e-8)


def test_pytree_players_and_product_sets():
    """u and v as dicts, with a container of sets matching a prefix of v's structure."""

    def f(u, v, x):
        uu = jnp.concatenate([u["a"], u["b"].ravel()])
        vv = jnp.concatenate([v[0], v[1]])
        return Q.f(uu, vv, x)

    u0 = {"a": jnp.zeros(1), "b": jnp.zeros((1, 3))}
    v0 = (jnp.zeros(2), jnp.zeros(1))
    hi_u, lo_v, _, _ = _active_box_problem()
    v_set = (Box(jnp.asarray(lo_v[:2]), jnp.inf), None)
    u_set = {"a": Box(-jnp.inf, hi_u[:1]), "b": Box(-jnp.inf, jnp.asarray(hi_u[1:]).reshape(1, 3))}
    sol = jax.jit(lambda x: saddle_point(f, u0, v0, x, u_set=u_set, v_set=v_set))(X)
    assert sol.u["b"].shape == (1, 3) and isinstance(sol.v, tuple)
    hi_u, lo_v, act_u, act_v = _active_box_problem()
    u_ex, v_ex, *_ = _active_set_oracle(np.asarray(X), hi_u, lo_v, act_u, act_v)
    tree_allclose(jnp.concatenate([sol.u["a"], sol.u["b"].ravel()]), u_ex, rtol=1e-8, atol=1e-9)
    tree_allclose(jnp.concatenate(sol.v), v_ex, rtol=1e-8, atol=1e-9)


def test_float32_in_float32_out():
    f32 = lambda u, v, x: t3(u, v, x)  # noqa: E731

    @jax.jit
    def run(x):
        sol = saddle_point(f32, jnp.float32(0), jnp.float32(0), x, solver="extragradient",
                           v_set=Box(-1.0, 1.0))
        return sol, jax.grad(lambda x: saddle_point(f32, jnp.float32(0), jnp.float32(0), x,
                                                    solver="extragradient",
                                                    v_set=Box(-1.0, 1.0)).v)(x)

    sol, grad = run(jnp.float32(1.0))
    assert sol.u.dtype == sol.v.dtype == grad.dtype == sol.info.gap.dtype == jnp.float32
    assert int(sol.info.status) == Status.SUCCESS
    # float32: residual 1e-5 relative.
    tree_allclose((sol.u, sol.v, grad), (-1 / 6, -2 / 3, -2 / 3), rtol=1e-4, atol=1e-4)


def test_no_recompilation_on_second_call():
    traces = []

    def f(u, v, x):
        traces.append(1)
        return Q.f(u, v, x)

    F = jax.jit(jax.grad(lambda x: jnp.sum(saddle_point(f, jnp.zeros(4), jnp.zeros(3), x).u)))
    F(X).block_until_ready()
    count = len(traces)
    F(X + 1).block_until_ready()
    assert len(traces) == count


# ------------------------------------------------------------------ bad input and failures


def test_bad_input_is_named_at_trace_time():
    u0, v0 = jnp.zeros(4), jnp.zeros(3)
    with pytest.raises(ValueError, match=r"u_set: Box.project cannot be applied to u0"):
        saddle_point(Q.f, u0, v0, X, u_set=Box(jnp.zeros(3), 1.0))
    with pytest.raises(ValueError, match=r"v_set: Box.project maps v0 of shape \(3,\)"):
        saddle_point(Q.f, u0, v0, X, v_set=Box(jnp.zeros((2, 3)), 1.0))
    with pytest.raises(TypeError, match=r"f\(u0, v0, theta\) could not be evaluated"):
        saddle_point(Q.f, jnp.zeros(5), v0, X)
    with pytest.raises(TypeError, match=r"f\(u, v, theta\) must return a scalar"):
        saddle_point(lambda u, v, x: u, u0, v0, X)
    with pytest.raises(TypeError, match="v0 must contain floating-point arrays"):
        saddle_point(Q.f, u0, jnp.zeros(3, jnp.int32), X)
    with pytest.raises(ValueError, match="solver='newton' handles unconstrained"):
        saddle_point(Q.f, u0, v0, X, solver="newton", v_set=Box(0.0, 1.0))
    with pytest.raises(ValueError, match="linear_solver='minres' needs the symmetric"):
        saddle_point(Q.f, u0, v0, X, linear_solver="minres", u_set=Box(0.0, 1.0))
    with pytest.raises(ValueError, match="solver must be one of"):
        saddle_point(Q.f, u0, v0, X, solver="gda")
    with pytest.raises(ValueError, match="hypergrad must be one of"):
        saddle_point(Q.f, u0, v0, X, hypergrad="penalty")
    with pytest.raises(ValueError, match="linear_solver must be one of"):
        saddle_point(Q.f, u0, v0, X, linear_solver="cg")
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        saddle_point(Q.f, u0, v0, X, max_iter=0)
    with pytest.raises(ValueError, match="step_size must be positive"):
        saddle_point(Q.f, u0, v0, X, step_size=-1.0)
    with pytest.raises(ValueError, match="gap_steps must be a positive integer"):
        saddle_point(Q.f, u0, v0, X, gap_steps=0)


def test_non_convex_concave_directions_are_diverged_not_a_hang():
    """f convex in v (the max is +inf) or concave in u: DIVERGED in status with finite
    output, for every solver, implicit and unrolled; nothing hangs."""
    f_v = lambda u, v, th: u @ u + th * v @ v + u @ v  # noqa: E731
    f_u = lambda u, v, th: -th * u @ u + u @ v - v @ v  # noqa: E731
    cases = [(f_v, "newton", "implicit"), (f_v, "extragradient", "implicit"),
             (f_v, "ogda", "implicit"), (f_u, "extragradient", "unrolled")]
    sols = jax.jit(lambda th: [saddle_point(f, jnp.ones(2), jnp.ones(2), th, solver=s,
                                            hypergrad=h) for f, s, h in cases])(0.5)
    for case, sol in zip(cases, sols, strict=True):
        assert int(sol.info.status) == Status.DIVERGED, case
        assert not bool(sol.info.converged)
        assert np.all(np.isfinite(np.asarray(sol.u))) and np.all(np.isfinite(np.asarray(sol.v)))
        assert int(sol.info.num_steps) <= 1000


def test_max_steps_nonfinite_and_throw():
    run = jax.jit(lambda x: saddle_point(Q.f, jnp.zeros(4), jnp.zeros(3), x,
                                         solver="extragradient", max_iter=2).info)
    info = run(X)
    assert int(info.status) == Status.MAX_STEPS
    assert int(info.num_steps) == 2 and float(info.residual) > 1e-3
    assert int(run(jnp.asarray([jnp.nan, 0.0])).status) == Status.NONFINITE
    # throw=True raises from a host callback under jit (eagerly: directly, see types.py).
    g = jax.jit(lambda x: saddle_point(t3, 0.0, 0.0, x, solver="ogda", max_iter=2,
                                       throw=True).u)
    with pytest.raises(Exception, match="MAX_STEPS"):
        g(1.0).block_until_ready()


def test_gap_nonnegative_and_bilinear_convex_concave():
    """Merely convex–concave (bilinear on boxes): extragradient converges, gap -> 0; the gap
    estimate is never negative at random points."""
    rng = np.random.default_rng(7)
    M = jnp.asarray(rng.standard_normal((3, 3)))
    c = jnp.asarray(rng.standard_normal(3))
    f = lambda u, v, th: u @ M @ v + th @ u  # noqa: E731
    sets = dict(u_set=Box(-1.0, 1.0), v_set=Box(-1.0, 1.0))
    pts = jnp.asarray(rng.uniform(-1, 1, (20, 6)))
    pts_q = jnp.asarray(rng.standard_normal((20, 7)))

    @jax.jit
    def run(th):
        sol = saddle_point(f, jnp.zeros(3), jnp.zeros(3), th, tol=1e-8, max_iter=50000, **sets)
        gaps = jax.vmap(lambda p: duality_gap(f, p[:3], p[3:], th, **sets))(pts)
        gaps_q = jax.vmap(lambda p: duality_gap(Q.f, p[:4], p[4:], X))(pts_q)
        return sol, gaps, gaps_q

    sol, gaps, gaps_q = run(0.1 * c)
    # Bilinear: O(1/k) only, so a looser tolerance and a larger budget.
    assert int(sol.info.status) == Status.SUCCESS, sol.info
    assert 0 <= float(sol.info.gap) <= 1e-6
    assert np.all(np.asarray(gaps) > 1e-3)
    assert np.all(np.asarray(gaps_q) >= 0)
