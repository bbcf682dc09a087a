"""``bj.argmin`` with inequality and box constraints; penalty rule; SIGD perturbation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bilevel_jax as bj

from helpers import nonquadratic_g, tree_allclose


def designed_active_set(seed=0, n=6, dx=3, k=5, active=(0, 2), multipliers=(0.7, 1.3)):
    """O4: a polyhedral QP ``G y + B x <= h`` whose solution, multipliers and active set are
    chosen first; returns the problem and the closed-form ``Dy*``."""
    rng = np.random.default_rng(seed)
    L = rng.standard_normal((n, n))
    Q = L @ L.T + n * np.eye(n)
    P, G = rng.standard_normal((dx, n)), rng.standard_normal((k, n))
    B = rng.standard_normal((k, dx))
    y_star, x0 = rng.standard_normal(n), rng.standard_normal(dx)
    I = np.asarray(active)  # noqa: E741
    lam = np.zeros(k)
    lam[I] = multipliers
    h = G @ y_star + B @ x0 + rng.uniform(0.5, 1.0, k)
    h[I] = (G @ y_star + B @ x0)[I]
    d = -Q @ y_star - P.T @ x0 - G.T @ lam
    Qi = np.linalg.inv(Q)
    GI, BI = G[I], B[I]
    S = GI @ Qi @ GI.T
    N = Qi - Qi @ GI.T @ np.linalg.solve(S, GI @ Qi)
    Dy = -N @ P.T - Qi @ GI.T @ np.linalg.solve(S, BI)

    def g(y, x):
        return 0.5 * y @ (Q @ y) + (P.T @ x + d) @ y

    def ineq(x):
        return jnp.asarray(G), h - B @ x

    return g, ineq, jnp.asarray(x0), y_star, lam, Dy


# ------------------------------------------------------------------ O4 closed form


@pytest.mark.parametrize("hypergrad", ["implicit", "penalty"])
def test_designed_active_set_closed_form(hypergrad):
    g, ineq, x0, y_star, lam_star, Dy = designed_active_set()
    sol = bj.argmin(g, jnp.zeros(6), x0, ineq=ineq, hypergrad=hypergrad)
    assert int(sol.info.status) == bj.Status.SUCCESS
    tree_allclose(sol.y, y_star, atol=1e-12)
    tree_allclose(sol.lam, lam_star, atol=1e-12)
    jac = jax.jacrev(lambda x: bj.argmin(g, jnp.zeros(6), x, ineq=ineq, hypergrad=hypergrad).y)(x0)
    # penalty: O(alpha^2) with the default alpha = 1e-3.
    tree_allclose(jac, Dy, atol=1e-10 if hypergrad == "implicit" else 1e-5)


@pytest.mark.parametrize("linear_solver", ["cg", pytest.param("minres", marks=pytest.mark.slow),
                                           pytest.param("lu", marks=pytest.mark.slow)])
def test_active_set_rule_with_each_backward_solver(linear_solver):
    g, ineq, x0, _, _, Dy = designed_active_set(seed=1)
    jac = jax.jacrev(
        lambda x: bj.argmin(g, jnp.zeros(6), x, ineq=ineq, linear_solver=linear_solver).y
    )(x0)
    tree_allclose(jac, Dy, atol=1e-9)


@pytest.mark.slow
def test_multiplier_jacobian_against_central_differences():
    g, ineq, x0, _, _, _ = designed_active_set(seed=2)

    def lam(x):
        return bj.argmin(g, jnp.zeros(6), x, ineq=ineq).lam

    # Strict complementarity holds, so the active set is fixed for |h| <= 1e-5.
    lam = jax.jit(lam)
    jac = jax.jacrev(lam)(x0)
    h = 1e-5
    fd = jnp.stack([(lam(x0 + h * e) - lam(x0 - h * e)) / (2 * h) for e in jnp.eye(3)], axis=1)
    tree_allclose(jac, fd, atol=1e-7)


def test_inactive_rows_do_not_change_the_result():
    g, ineq, x0, _, _, Dy = designed_active_set(seed=3)

    def ineq_more(x):
        G, h = ineq(x)
        extra = np.random.default_rng(0).standard_normal((4, 6))
        return jnp.concatenate([G, extra]), jnp.concatenate([h, 100.0 + 0 * h[:4]])

    jac = jax.jacrev(lambda x: bj.argmin(g, jnp.zeros(6), x, ineq=ineq_more).y)(x0)
    tree_allclose(jac, Dy, atol=1e-10)


@pytest.mark.slow
def test_penalty_error_falls_like_alpha_squared():
    """O5: log-log slope about 2 over alpha in {0.3, 0.1, 0.03, 0.01}."""
    g, ineq, x0, _, _, Dy = designed_active_set(seed=4)
    alphas = np.array([0.3, 0.1, 0.03, 0.01])
    errors = []
    for a in alphas:
        jac = jax.jit(jax.jacrev(
            lambda x, a=a: bj.argmin(g, jnp.zeros(6), x, ineq=ineq, hypergrad="penalty", alpha=a).y
        ))(x0)
        errors.append(float(jnp.abs(jac - Dy).max()))
    slope = np.polyfit(np.log10(alphas), np.log10(errors), 1)[0]
    assert 1.7 < slope < 2.3, (errors, slope)


# ------------------------------------------------------------------ boxes (O3) and kinks (O6)


def separable_box(seed=0, n=8, dx=3):
    rng = np.random.default_rng(seed)
    s, P, d = rng.uniform(1, 3, n), rng.standard_normal((dx, n)), rng.standard_normal(n)
    lo, hi = -0.3 * np.ones(n), 0.4 * np.ones(n)
    x = jnp.asarray(rng.standard_normal(dx))
    u = -(P.T @ x + d) / s
    Dy = ((lo < u) & (u < hi))[:, None] * (-(1 / s)[:, None] * P.T)

    def g(y, x):
        return 0.5 * jnp.sum(s * y**2) + (P.T @ x + d) @ y

    return g, lo, hi, x, np.clip(u, lo, hi), Dy


@pytest.mark.parametrize("form", ["box", pytest.param("box-unrolled", marks=pytest.mark.slow),
                                  "ineq", pytest.param("ineq-penalty", marks=pytest.mark.slow)])
def test_separable_box_exact_jacobian(form):
    g, lo, hi, x, y_star, Dy = separable_box()
    n = 8
    if form.startswith("box"):
        kwargs = dict(box=lambda x: (lo, hi))
        if form == "box-unrolled":
            kwargs.update(hypergrad="unrolled", max_iter=2000)
    else:
        G = jnp.concatenate([jnp.eye(n), -jnp.eye(n)])
        kwargs = dict(ineq=lambda x: (G, jnp.concatenate([hi, -lo])))
        if form == "ineq-penalty":
            kwargs.update(hypergrad="penalty")
    sol = bj.argmin(g, jnp.zeros(n), x, **kwargs)
    assert int(sol.info.status) == bj.Status.SUCCESS
    tree_allclose(sol.y, y_star, atol=1e-10)
    jac = jax.jacrev(lambda x: bj.argmin(g, jnp.zeros(n), x, **kwargs).y)(x)
    # penalty: O(alpha^2) = 1e-6 with the default alpha, times the problem's constants.
    tree_allclose(jac, Dy, atol=1e-5 if form == "ineq-penalty" else 1e-10)


def test_box_bounds_depending_on_theta_and_pytree_bounds():
    """Coupled bounds: d y*/d hi = 1 on coordinates at the upper bound."""
    g = lambda y, th: 0.5 * jnp.sum((y["a"] - 1.0) ** 2)  # noqa: E731  unconstrained y* = 1
    y0 = {"a": jnp.zeros(3)}
    box = lambda th: (-1.0, {"a": th})  # noqa: E731
    theta = jnp.asarray([0.5, 2.0, 0.2])
    sol = bj.argmin(g, y0, theta, box=box)
    tree_allclose(sol.y["a"], jnp.asarray([0.5, 1.0, 0.2]))
    jac = jax.jacrev(lambda th: bj.argmin(g, y0, th, box=box).y["a"])(theta)
    tree_allclose(jac, jnp.diag(jnp.asarray([1.0, 0.0, 1.0])))


def test_kink_example_gradients():
    """O6(a): F(x) = x + y*(x), y* = max(x, sqrt(0.6)); grad F = 1 then 2."""
    g = lambda y, x: (y[0] ** 2 - x**2) ** 2  # noqa: E731

    @jax.jit
    @jax.grad
    def dF(x):
        return x + bj.argmin(g, jnp.ones(1), x, box=lambda x: (jnp.sqrt(0.6), 1.0)).y[0]

    for x, expected in [(0.5, 1.0), (0.7, 1.0), (0.85, 2.0), (0.95, 2.0)]:
        tree_allclose(dF(x), expected, rtol=1e-8)


def test_box_at_scale_is_matrix_free():
    """10^5 variables: the masked CG rule never forms G or the Hessian."""
    import scipy.sparse
    import scipy.sparse.linalg

    n = 100_000
    rng = np.random.default_rng(5)
    w = rng.uniform(1.0, 2.0, n)
    target = rng.standard_normal(n)

    def g(y, x):
        return 0.5 * jnp.sum(w * y**2) - x * (target @ y) + 0.01 * jnp.sum(jnp.roll(y, 1) * y)

    def F(x):
        return jnp.sum(bj.argmin(g, jnp.zeros(n), x, box=lambda x: (-0.5, 0.5)).y ** 2)

    grad = jax.grad(F)(1.0)
    # Exact reference on the free set: H_FF dy_F = target_F, dF/dx = 2 y . dy.
    y = np.asarray(bj.argmin(g, jnp.zeros(n), 1.0, box=lambda x: (-0.5, 0.5)).y)
    shift = scipy.sparse.eye(n, k=1, format="csr") + scipy.sparse.eye(n, k=-(n - 1), format="csr")
    H = scipy.sparse.diags(w) + 0.01 * (shift + shift.T)
    free = np.flatnonzero(np.abs(y) < 0.5)
    dy = scipy.sparse.linalg.spsolve(H[free][:, free].tocsc(), target[free])
    tree_allclose(grad, 2 * y[free] @ dy, rtol=1e-8)


# ------------------------------------------------------------------ nonquadratic, degenerate


@pytest.mark.parametrize("hypergrad", ["implicit", pytest.param("penalty", marks=pytest.mark.slow)])
def test_nonquadratic_inequalities_check_grads(hypergrad):
    g = nonquadratic_g(seed=6)
    G = jnp.asarray(np.random.default_rng(6).standard_normal((4, 5)))

    def ineq(x):
        return G * (1 + 0.1 * x[1]), jnp.asarray([0.1, -0.2, 0.3, 0.0]) + 0.5 * x[0]

    def F(x):
        sol = bj.argmin(g, jnp.zeros(5), x, ineq=ineq, hypergrad=hypergrad)
        return jnp.sum(jnp.sin(sol.y)) + jnp.sum(sol.lam**2)

    x = jnp.asarray([0.3, -0.4, 0.2])
    sol = bj.argmin(g, jnp.zeros(5), x, ineq=ineq)
    assert 0 < int(jnp.sum(sol.lam > 1e-6)) < 4  # some rows active, some not
    if hypergrad == "implicit":
        check_grads(jax.jit(F), (x,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)
    else:  # penalty vs implicit: O(alpha) for non-quadratic g
        implicit = jax.grad(lambda x: jnp.sum(jnp.sin(bj.argmin(g, jnp.zeros(5), x,
                                                               ineq=ineq).y)))(x)
        penalty = jax.grad(lambda x: jnp.sum(jnp.sin(bj.argmin(g, jnp.zeros(5), x, ineq=ineq,
                                                              hypergrad="penalty").y)))(x)
        tree_allclose(penalty, implicit, atol=1e-3)


def test_weakly_active_row_gives_the_documented_one_sided_derivative():
    """y* = argmin 1/2 (y - x)^2 s.t. y <= 0 at x = 0: weakly active (lam = 0). The rule drops
    the row: dy*/dx = 1, the derivative from the side where the row is inactive (x < 0)."""
    g = lambda y, x: 0.5 * (y[0] - x) ** 2  # noqa: E731
    ineq = lambda x: (jnp.ones((1, 1)), jnp.zeros(1))  # noqa: E731
    for hypergrad in ["implicit", "penalty"]:
        grad = jax.grad(lambda x, hg=hypergrad: bj.argmin(g, jnp.zeros(1), x, ineq=ineq,
                                                          hypergrad=hg).y[0])(0.0)
        assert np.isfinite(float(grad))
        tree_allclose(grad, 1.0, atol=1e-6)
    # Away from the kink: the two one-sided values.
    grad_in = jax.jit(jax.grad(lambda x: bj.argmin(g, jnp.zeros(1), x, ineq=ineq).y[0]))
    tree_allclose(grad_in(-0.5), 1.0)
    tree_allclose(grad_in(0.5), 0.0)


def test_dependent_active_rows_give_a_finite_exact_gradient():
    """LICQ fails (a duplicated active row): w is still unique (only mu is not)."""
    g, ineq, x0, y_star, _, Dy = designed_active_set(seed=7)

    def ineq_dup(x):
        G, h = ineq(x)
        return jnp.concatenate([G, G[:1]]), jnp.concatenate([h, h[:1]])

    sol = bj.argmin(g, jnp.zeros(6), x0, ineq=ineq_dup)
    tree_allclose(sol.y, y_star, atol=1e-9)
    jac = jax.jacrev(lambda x: bj.argmin(g, jnp.zeros(6), x, ineq=ineq_dup).y)(x0)
    tree_allclose(jac, Dy, atol=1e-8)


def test_infinite_rows_mean_no_constraint():
    g, ineq, x0, y_star, lam_star, Dy = designed_active_set(seed=8)

    def ineq_inf(x):
        G, h = ineq(x)
        return jnp.concatenate([G, jnp.ones((2, 6))]), jnp.concatenate([h, jnp.full(2, jnp.inf)])

    sol = bj.argmin(g, jnp.zeros(6), x0, ineq=ineq_inf)
    assert np.all(np.isfinite(sol.lam)) and np.all(sol.lam[-2:] == 0)
    tree_allclose(sol.y, y_star, atol=1e-12)
    # h as theta: the cotangent of the infinite rows is zero, never NaN.
    G, h = ineq_inf(x0)
    grad_h = jax.grad(lambda h: jnp.sum(bj.argmin(g, jnp.zeros(6), x0,
                                                  ineq=lambda _: (G, h)).y ** 2))(h)
    assert np.all(np.isfinite(grad_h)) and np.all(grad_h[-2:] == 0)
    # All rows infinite: the unconstrained solution.
    sol = bj.argmin(g, jnp.zeros(6), x0, ineq=lambda _: (G, jnp.full(7, jnp.inf)))
    tree_allclose(sol.y, bj.argmin(g, jnp.zeros(6), x0).y, atol=1e-9)


def test_infeasible_inequalities_reported():
    g = lambda y, x: 0.5 * jnp.sum((y - x) ** 2)  # noqa: E731
    ineq = lambda x: (jnp.asarray([[1.0, 0.0], [-1.0, 0.0]]), jnp.asarray([-1.0, -1.0]))  # noqa: E731
    sol = bj.argmin(g, jnp.zeros(2), jnp.zeros(2), ineq=ineq, max_iter=50)
    assert int(sol.info.status) == bj.Status.INFEASIBLE
    assert not bool(sol.info.converged)


@pytest.mark.slow
def test_equalities_and_inequalities_together():
    g, ineq, x0, _, _, _ = designed_active_set(seed=9)
    E = jnp.asarray(np.random.default_rng(9).standard_normal((1, 6)))
    y_ref = bj.argmin(g, jnp.zeros(6), x0, ineq=ineq).y
    eq = lambda x: (E, E @ y_ref + 0.01 * x[:1])  # noqa: E731

    def F(x):
        sol = bj.argmin(g, jnp.zeros(6), x, ineq=ineq, eq=eq)
        return jnp.sum(sol.y**2) + jnp.sum(sol.nu**2)

    check_grads(jax.jit(F), (x0,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ transformations


@pytest.mark.slow
def test_vmap_equals_loop_with_inequalities():
    g, ineq, x0, _, _, _ = designed_active_set(seed=10)

    def F(x):
        return jnp.sum(bj.argmin(g, jnp.zeros(6), x, ineq=ineq).y ** 2)

    xs = x0 + 0.05 * jnp.asarray(np.random.default_rng(1).standard_normal((3, 3)))
    batched = jax.jit(jax.vmap(jax.value_and_grad(F)))(xs)
    single = jax.jit(jax.value_and_grad(F))
    looped = [single(x) for x in xs]
    tree_allclose(batched[0], jnp.stack([v for v, _ in looped]), atol=1e-10)
    tree_allclose(batched[1], jnp.stack([d for _, d in looped]), atol=1e-9)


def test_jit_equals_eager_with_inequalities(maybe_jit):
    g, ineq, x0, _, _, Dy = designed_active_set(seed=11)
    jac = maybe_jit(jax.jacrev(lambda x: bj.argmin(g, jnp.zeros(6), x, ineq=ineq).y))(x0)
    tree_allclose(jac, Dy, atol=1e-10)


@pytest.mark.slow
def test_float32_inequalities_and_box():
    g, ineq, x0, y_star, _, Dy = designed_active_set(seed=12)
    g32 = lambda y, x: g(y.astype(jnp.float64), x.astype(jnp.float64)).astype(jnp.float32)  # noqa: E731
    ineq32 = lambda x: tuple(a.astype(jnp.float32) for a in ineq(x.astype(jnp.float64)))  # noqa: E731
    x32 = x0.astype(jnp.float32)
    sol = bj.argmin(g32, jnp.zeros(6, jnp.float32), x32, ineq=ineq32)
    assert sol.y.dtype == jnp.float32 and sol.lam.dtype == jnp.float32
    assert int(sol.info.status) == bj.Status.SUCCESS
    tree_allclose(sol.y, y_star.astype(np.float32), rtol=1e-3, atol=1e-4)
    g_box, lo, hi, x, y_box, _ = separable_box()
    sol = bj.argmin(lambda y, x: g_box(y, x).astype(jnp.float32), jnp.zeros(8, jnp.float32),
                    x.astype(jnp.float32), box=lambda x: (lo, hi))
    assert sol.y.dtype == jnp.float32
    tree_allclose(sol.y, y_box.astype(np.float32), rtol=1e-3, atol=1e-4)


def test_bad_inequality_input_named():
    g, ineq, x0, _, _, _ = designed_active_set()
    with pytest.raises(ValueError, match=r"G with shape \(2, 5\) but y has 6 entries"):
        bj.argmin(g, jnp.zeros(6), x0, ineq=lambda x: (jnp.ones((2, 5)), jnp.ones(2)))
    with pytest.raises(ValueError, match=r"h with shape \(3,\) but G has 2 rows"):
        bj.argmin(g, jnp.zeros(6), x0, ineq=lambda x: (jnp.ones((2, 6)), jnp.ones(3)))
    with pytest.raises(ValueError, match="box\\(theta\\) returned lo with shape"):
        bj.argmin(g, jnp.zeros(6), x0, box=lambda x: (jnp.zeros(3), 1.0))
    with pytest.raises(ValueError, match="not available with inequality constraints"):
        bj.argmin(g, jnp.zeros(6), x0, ineq=ineq, hypergrad="unrolled")
    with pytest.raises(ValueError, match="does not handle inequality constraints"):
        bj.argmin(g, jnp.zeros(6), x0, ineq=ineq, solver="lbfgs")


# ------------------------------------------------------------------ SIGD perturbation (O6)


def test_perturbation_is_drawn_once_and_bias_is_bounded():
    g, lo, hi, x, y_star, _ = separable_box(seed=13)
    key = jax.random.PRNGKey(0)
    g_q = bj.perturb_linear(g, key, 1e-2)
    y = jnp.zeros(8)
    q = jax.grad(g_q)(y, x) - jax.grad(g)(y, x)
    tree_allclose(jax.grad(g_q)(y + 1.0, x) - jax.grad(g)(y + 1.0, x), q)  # the same q
    y_q = bj.argmin(g_q, jnp.zeros(8), x, box=lambda x: (lo, hi)).y
    # ||y_q* - y*|| <= ||q|| / mu_g with mu_g = min s >= 1.
    assert float(jnp.linalg.norm(y_q - y_star)) <= float(jnp.linalg.norm(q)) / 1.0 + 1e-12
    sphere = bj.perturb_linear(g, key, 1e-3, distribution="sphere")
    q_s = jax.grad(sphere)(y, x) - jax.grad(g)(y, x)
    tree_allclose(jnp.linalg.norm(q_s), 1e-3)
    # vmap over keys gives independent draws.
    qs = jax.vmap(lambda k: jax.grad(bj.perturb_linear(g, k, 1.0))(y, x))(jax.random.split(key, 3))
    assert float(jnp.min(jnp.abs(qs[0] - qs[1]))) > 0


def test_perturbation_restores_strict_complementarity_at_a_kink():
    """O6(c): at x exactly on a kink of y*, the perturbed problem has a positive SC margin."""
    g = lambda y, x: 0.5 * jnp.sum((y - x) ** 2)  # noqa: E731  y* = clip(x, 0, 1)
    x = jnp.asarray([0.0, 0.5, 1.0])  # coordinates 0 and 2 sit on kinks
    g_q = bj.perturb_linear(g, jax.random.PRNGKey(3), 1e-3, distribution="sphere")
    y_q = bj.argmin(g_q, jnp.zeros(3), x, box=lambda x: (0.0, 1.0)).y
    grad_at_bound = jax.grad(g_q)(y_q, x)
    on_bound = (y_q <= 0) | (y_q >= 1)
    interior = ~on_bound
    assert np.all(np.abs(np.asarray(grad_at_bound)[np.asarray(on_bound)]) > 1e-8)
    inside = np.asarray(y_q)[np.asarray(interior)]
    assert np.all((inside > 0) & (inside < 1))
    jac = jax.jacrev(lambda x: bj.argmin(g_q, jnp.zeros(3), x, box=lambda x: (0.0, 1.0)).y)(x)
    tree_allclose(jac, jnp.diag(interior.astype(jnp.float64)))
