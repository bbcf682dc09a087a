"""Tests of ``bj.argmin``: unconstrained and linear-equality lower levels."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import bilevel_jax as bj

from helpers import nonquadratic_g, quadratic_problem, tree_allclose

SOLVERS = ["newton", "lbfgs", "gradient"]
HYPERGRADS = ["implicit", "penalty", "finite_difference", "unrolled"]


def slow(*values):
    """A parameter set that runs only in the full (CI) run: ``pytest -m "slow or not slow"``."""
    return pytest.param(*values, marks=pytest.mark.slow)


def grid(fast, *axes):
    """The product of ``axes``; combinations not in ``fast`` are marked slow."""
    import itertools

    return [c if c in fast else slow(*c) for c in itertools.product(*axes)]


def _hypergradient(prob, x, **kwargs):
    eq = None if prob.E is None else prob.eq
    n = prob.Q.shape[0]

    def F(x):
        sol = bj.argmin(prob.g, jnp.zeros(n), x, eq=eq, **kwargs)
        return prob.f(x, sol.y)

    return jax.grad(F)(x)


def _unroll_ok(solver):
    return solver != "lbfgs"


# ------------------------------------------------------------------ closed forms (O1, O2)


@pytest.mark.parametrize(
    "m, solver, hypergrad",
    grid({(m, "newton", h) for m in (0, 2) for h in HYPERGRADS}
         | {(2, "lbfgs", "implicit"), (2, "gradient", "implicit")}, (0, 2), SOLVERS, HYPERGRADS),
)
def test_quadratic_closed_form(m, solver, hypergrad):
    """O1 (m = 0) and O2 (coupled E y = R x + r): solution and hypergradient to 1e-9."""
    if hypergrad == "unrolled" and not _unroll_ok(solver):
        pytest.skip("L-BFGS cannot be unrolled")
    prob = quadratic_problem(seed=1, m=m)
    x = jnp.asarray([0.3, -1.2, 0.7])
    kwargs = dict(solver=solver, hypergrad=hypergrad)
    if hypergrad == "unrolled" and solver == "gradient":
        kwargs["max_iter"] = 2000
    sol = bj.argmin(prob.g, jnp.zeros(6), x, eq=None if m == 0 else prob.eq, **kwargs)
    y_star, nu_star = prob.solution(x)
    assert int(sol.info.status) == bj.Status.SUCCESS
    tree_allclose(sol.y, y_star, rtol=1e-8, atol=1e-9)
    if m:
        tree_allclose(sol.nu, nu_star, rtol=1e-8, atol=1e-9)
    else:
        assert sol.nu is None and sol.lam is None
    # The finite-difference rule is exact for quadratic g (docs lower/unconstrained.md) up to the
    # inner-solve accuracy amplified by 1/delta; gradient-method inner solves stop at 1e-10.
    atol = 1e-6 if (hypergrad == "finite_difference" and solver != "newton") else 1e-9
    if hypergrad == "penalty":
        atol = 1e-5  # O(alpha^2) = 1e-6 with the default alpha = 1e-3
    tree_allclose(_hypergradient(prob, x, **kwargs), prob.hypergradient(x), rtol=1e-7, atol=atol)


@pytest.mark.parametrize("m", [0, 3])
def test_jacobians_of_y_and_nu(m):
    """Full Jacobians ``Dy*`` and ``Dnu*`` against the KKT closed form."""
    prob = quadratic_problem(seed=2, m=m)
    x = jnp.asarray([1.0, 0.5, -0.5])
    eq = None if m == 0 else prob.eq
    Dy, Dnu = prob.jacobian()
    jac_y = jax.jacrev(lambda x: bj.argmin(prob.g, jnp.zeros(6), x, eq=eq).y)(x)
    tree_allclose(jac_y, Dy)
    if m:
        jac_nu = jax.jacrev(lambda x: bj.argmin(prob.g, jnp.zeros(6), x, eq=eq).nu)(x)
        tree_allclose(jac_nu, Dnu)


LINEAR_SOLVERS = ["auto", "cholesky", "cg", "dense", "lu", "minres", "gmres", "normal_cg"]


@pytest.mark.parametrize(
    "m, linear_solver, solver",
    grid({(2, ls, "newton") for ls in ("auto", "cholesky", "cg", "minres", "lu")}
         | {(2, "auto", "lbfgs")}, (0, 2), LINEAR_SOLVERS, ["newton"])
    + [slow(2, "cg", "lbfgs")],
)
def test_every_backward_linear_solver(m, linear_solver, solver):
    prob = quadratic_problem(seed=3, m=m)
    x = jnp.asarray([0.1, 0.2, 0.3])
    grad = _hypergradient(prob, x, solver=solver, linear_solver=linear_solver)
    # Iterative backward solves stop at a relative residual of 1e-12 (x condition number).
    tree_allclose(grad, prob.hypergradient(x), rtol=1e-7, atol=1e-8)


def test_neumann_backward_solver():
    prob = quadratic_problem(seed=3, m=2)
    x = jnp.asarray([0.1, 0.2, 0.3])
    grad = _hypergradient(prob, x, linear_solver="neumann", max_iter=5000)
    # Neumann series converge linearly at rate 1 - mu/L; 5000 terms reach about 1e-7 here.
    tree_allclose(grad, prob.hypergradient(x), rtol=1e-5, atol=1e-6)


def test_ridge_gives_regularised_hypergradient():
    prob = quadratic_problem(seed=4)
    x = jnp.asarray([0.1, 0.2, 0.3])
    delta = 0.5
    grad = _hypergradient(prob, x, ridge=delta)
    y, _ = prob.solution(x)
    Dy = -np.linalg.solve(prob.Q + delta * np.eye(6), prob.P.T)
    tree_allclose(grad, prob.c + Dy.T @ (y - prob.t))


# ------------------------------------------------------------------ finite differences


@pytest.mark.parametrize(
    "eq, hypergrad", grid({(True, "implicit")}, (False, True), ("implicit", "unrolled"))
)
def test_nonquadratic_check_grads(eq, hypergrad):
    g = nonquadratic_g(seed=5)
    E = jnp.asarray(np.random.default_rng(5).standard_normal((2, 5)))
    R = jnp.asarray(np.random.default_rng(6).standard_normal((2, 3)))
    eq_fn = (lambda x: (E * (1 + 0.1 * x[0]), R @ x)) if eq else None

    def F(x):
        sol = bj.argmin(g, jnp.zeros(5), x, eq=eq_fn, hypergrad=hypergrad)
        out = jnp.sum(jnp.sin(sol.y)) + jnp.sum(sol.y**2)
        return out + (jnp.sum(sol.nu**2) if eq else 0.0)

    x = jnp.asarray([0.3, -0.4, 0.2])
    check_grads(jax.jit(F), (x,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def _rule(g, eq_fn, v, hypergrad, **kwargs):
    return jax.jit(jax.grad(
        lambda x: bj.argmin(g, jnp.zeros(5), x, eq=eq_fn, hypergrad=hypergrad, **kwargs).y @ v
    ))


@pytest.mark.slow
def test_finite_difference_rule_error_is_linear_in_delta():
    """Equality-constrained quadratic: error O(delta), log-log slope 1 +- 0.1."""
    g = nonquadratic_g(seed=7)
    E = jnp.asarray(np.random.default_rng(7).standard_normal((2, 5)))
    eq_fn = lambda x: (E, jnp.asarray([x[0], x[1] - x[2]]))  # noqa: E731
    x = jnp.asarray([0.2, 0.1, -0.3])
    v = jnp.asarray(np.random.default_rng(8).standard_normal(5))
    deltas = np.array([1e-1, 1e-2, 1e-3, 1e-4])
    exact = _rule(g, eq_fn, v, "implicit")(x)
    errors = np.array([
        float(jnp.linalg.norm(_rule(g, eq_fn, v, "finite_difference", delta=d)(x) - exact))
        for d in deltas
    ])
    slope = np.polyfit(np.log10(deltas), np.log10(errors), 1)[0]
    assert abs(slope - 1) < 0.1, (errors, slope)


def test_finite_difference_rule_exact_for_quadratic_g():
    prob = quadratic_problem(seed=9, m=2)
    x = jnp.asarray([0.3, 0.2, 0.1])
    for delta in [1e-1, 1.0]:
        grad = _hypergradient(prob, x, hypergrad="finite_difference", delta=delta)
        tree_allclose(grad, prob.hypergradient(x))


# ------------------------------------------------------------------ closure conversion


@pytest.mark.parametrize("hypergrad", ["implicit", slow("penalty"), "finite_difference",
                                       slow("unrolled")])
def test_closed_over_hyperparameter_gets_its_gradient(hypergrad):
    """The jaxopt pitfall: a hyperparameter captured by closure must not get a zero gradient."""
    rng = np.random.default_rng(10)
    X = jnp.asarray(rng.standard_normal((8, 4)))
    t = jnp.asarray(rng.standard_normal(8))

    def F_theta(lam):
        g = lambda w, lam: 0.5 * jnp.sum((X @ w - t) ** 2) + 0.5 * lam * w @ w  # noqa: E731
        return jnp.sum(bj.argmin(g, jnp.zeros(4), lam, hypergrad=hypergrad).y ** 2)

    def F_closure(lam):
        g = lambda w, _: 0.5 * jnp.sum((X @ w - t) ** 2) + 0.5 * lam * w @ w  # noqa: E731
        return jnp.sum(bj.argmin(g, jnp.zeros(4), None, hypergrad=hypergrad).y ** 2)

    lam = 0.7
    A = X.T @ X + lam * jnp.eye(4)
    w = jnp.linalg.solve(A, X.T @ t)
    exact = -2 * w @ jnp.linalg.solve(A, w)  # d/dlam ||w(lam)||^2
    grad_theta, grad_closure = jax.grad(F_theta)(lam), jax.grad(F_closure)(lam)
    assert abs(float(grad_closure)) > 1e-3
    # grad_theta g = w^2/2 is not linear in w: the first-order rules are O(delta), O(alpha).
    rtol = 1e-3 if hypergrad in ("finite_difference", "penalty") else 1e-7
    tree_allclose(grad_theta, exact, rtol=rtol)
    tree_allclose(grad_closure, grad_theta, rtol=1e-10)
    if hypergrad not in ("finite_difference", "penalty"):
        check_grads(
            jax.jit(F_closure), (lam,), order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6
        )


def test_closed_over_constraint_data_gets_its_gradient():
    prob = quadratic_problem(seed=11, m=2)
    x = jnp.asarray([0.3, 0.2, 0.1])

    def F(x):
        eq = lambda _: (jnp.asarray(prob.E), prob.R @ x + prob.r)  # noqa: E731
        g = lambda y, _: prob.g(y, x)  # noqa: E731
        return prob.f(x, bj.argmin(g, jnp.zeros(6), None, eq=eq).y)

    tree_allclose(jax.grad(F)(x), prob.hypergradient(x))


# ------------------------------------------------------------------ transformations


@pytest.mark.parametrize("hypergrad", ["implicit", slow("penalty"), slow("finite_difference"),
                                       slow("unrolled")])
def test_jit_equals_eager(maybe_jit, hypergrad):
    prob = quadratic_problem(seed=12, m=2)
    x = jnp.asarray([0.3, 0.2, 0.1])

    def F(x):
        return prob.f(x, bj.argmin(prob.g, jnp.zeros(6), x, eq=prob.eq, hypergrad=hypergrad).y)

    value, grad = maybe_jit(jax.value_and_grad(F))(x)
    # penalty: O(alpha^2) = 1e-6 with the default alpha.
    tree_allclose(grad, prob.hypergradient(x), atol=1e-5 if hypergrad == "penalty" else None)
    tree_allclose(value, F(x))


@pytest.mark.parametrize("solver", ["newton", slow("lbfgs"), slow("gradient")])
def test_vmap_equals_loop(solver):
    g = nonquadratic_g(seed=13)
    E = jnp.asarray(np.random.default_rng(13).standard_normal((2, 5)))
    eq_fn = lambda x: (E, x[:2])  # noqa: E731

    def F(x):
        return jnp.sum(bj.argmin(g, jnp.zeros(5), x, eq=eq_fn, solver=solver).y ** 3)

    xs = jnp.asarray(np.random.default_rng(14).standard_normal((4, 3)))
    batched = jax.jit(jax.vmap(jax.value_and_grad(F)))(xs)
    single = jax.jit(jax.value_and_grad(F))
    looped = [single(x) for x in xs]
    # The batched while_loop keeps iterating until the slowest member stops, so members can
    # take more steps than alone: agreement is to the solver tolerance.
    tree_allclose(batched[0], jnp.stack([v for v, _ in looped]), rtol=1e-8, atol=1e-9)
    tree_allclose(batched[1], jnp.stack([d for _, d in looped]), rtol=1e-7, atol=1e-8)


def test_pytree_y():
    prob = quadratic_problem(seed=15)
    x = jnp.asarray([0.3, 0.2, 0.1])

    def g_tree(y, x):
        return prob.g(jnp.concatenate([y["a"], y["b"].ravel()]), x)

    y0 = {"a": jnp.zeros(2), "b": jnp.zeros((2, 2))}

    def F(x):
        y = bj.argmin(g_tree, y0, x).y
        return prob.f(x, jnp.concatenate([y["a"], y["b"].ravel()]))

    sol = bj.argmin(g_tree, y0, x)
    assert sol.y["b"].shape == (2, 2)
    y_star, _ = prob.solution(x)
    tree_allclose(jnp.concatenate([sol.y["a"], sol.y["b"].ravel()]), y_star)
    tree_allclose(jax.grad(F)(x), prob.hypergradient(x))


def test_scalar_y_and_dict_theta():
    g = lambda y, th: 0.5 * th["a"] * y**2 - th["b"] * y  # noqa: E731  y* = b / a
    theta = {"a": 2.0, "b": 3.0}
    sol = bj.argmin(g, 0.0, theta)
    tree_allclose(sol.y, 1.5)
    grad = jax.grad(lambda th: bj.argmin(g, 0.0, th).y)(theta)
    tree_allclose(grad, {"a": -3.0 / 4.0, "b": 0.5})


@pytest.mark.parametrize("solver, m", grid({("newton", 2), ("gradient", 0)}, SOLVERS, (0, 2)))
def test_float32(solver, m):
    prob = quadratic_problem(seed=16, m=m)
    prob32 = prob._replace(**{
        k: (None if v is None else np.asarray(v, np.float32)) for k, v in prob._asdict().items()
    })
    x = jnp.asarray([0.3, 0.2, 0.1], jnp.float32)
    eq = None if m == 0 else prob32.eq
    sol = bj.argmin(prob32.g, jnp.zeros(6, jnp.float32), x, eq=eq, solver=solver)
    assert sol.y.dtype == jnp.float32
    assert int(sol.info.status) == bj.Status.SUCCESS
    grad = jax.grad(lambda x: prob32.f(x, bj.argmin(prob32.g, jnp.zeros(6, jnp.float32), x,
                                                    eq=eq, solver=solver).y))(x)
    assert grad.dtype == jnp.float32
    # float32: solve to 1e-5 relative residual, so about 1e-4 in the hypergradient.
    tree_allclose(grad, prob.hypergradient(np.asarray(x, np.float64)), rtol=1e-3, atol=1e-3)


def test_no_recompilation_on_second_call():
    traces = []
    prob = quadratic_problem(seed=17, m=2)

    def g(y, x):
        traces.append(1)
        return prob.g(y, x)

    F = jax.jit(jax.grad(lambda x: jnp.sum(bj.argmin(g, jnp.zeros(6), x, eq=prob.eq).y)))
    F(jnp.ones(3)).block_until_ready()
    count = len(traces)
    F(jnp.asarray([0.5, 0.1, 2.0])).block_until_ready()
    assert len(traces) == count


# ------------------------------------------------------------------ bad input and failures


def test_bad_shapes_are_named_at_trace_time():
    prob = quadratic_problem(seed=18, m=2)
    x = jnp.ones(3)
    with pytest.raises(ValueError, match=r"A with shape \(2, 5\) but y has 6 entries"):
        bj.argmin(prob.g, jnp.zeros(6), x, eq=lambda x: (jnp.ones((2, 5)), jnp.ones(2)))
    with pytest.raises(ValueError, match=r"b with shape \(3,\) but A has 2 rows"):
        bj.argmin(prob.g, jnp.zeros(6), x, eq=lambda x: (jnp.ones((2, 6)), jnp.ones(3)))
    with pytest.raises(TypeError, match="g\\(y, theta\\) must return a scalar"):
        bj.argmin(lambda y, x: y, jnp.zeros(6), x)
    with pytest.raises(TypeError, match="y0 must contain floating-point arrays"):
        bj.argmin(prob.g, jnp.zeros(6, jnp.int32), x)
    with pytest.raises(TypeError, match="g\\(y0, theta\\) could not be evaluated"):
        bj.argmin(prob.g, jnp.zeros(4), x)
    with pytest.raises(ValueError, match="solver must be one of"):
        bj.argmin(prob.g, jnp.zeros(6), x, solver="bfgs")
    with pytest.raises(ValueError, match="hypergrad must be one of"):
        bj.argmin(prob.g, jnp.zeros(6), x, hypergrad="implict")
    with pytest.raises(ValueError, match="linear_solver must be one of"):
        bj.argmin(prob.g, jnp.zeros(6), x, linear_solver="qr")
    with pytest.raises(ValueError, match="ridge must be >= 0"):
        bj.argmin(prob.g, jnp.zeros(6), x, ridge=-1.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        bj.argmin(prob.g, jnp.zeros(6), x, max_iter=0)
    with pytest.raises(ValueError, match="cannot be unrolled"):
        bj.argmin(prob.g, jnp.zeros(6), x, solver="lbfgs", hypergrad="unrolled")


def test_rank_deficient_equalities():
    """A repeated row: the status says so, y* and the hypergradient are still exact."""
    prob = quadratic_problem(seed=19, m=2)
    E2 = np.vstack([prob.E, prob.E[:1]])
    R2 = np.vstack([prob.R, prob.R[:1]])
    r2 = np.concatenate([prob.r, prob.r[:1]])
    eq2 = lambda x: (jnp.asarray(E2), R2 @ x + r2)  # noqa: E731
    x = jnp.asarray([0.3, 0.2, 0.1])
    for solver in SOLVERS:

        def F(x, solver=solver):
            return prob.f(x, bj.argmin(prob.g, jnp.zeros(6), x, eq=eq2, solver=solver).y)

        sol = bj.argmin(prob.g, jnp.zeros(6), x, eq=eq2, solver=solver)
        assert int(sol.info.status) == bj.Status.RANK_DEFICIENT
        tree_allclose(sol.y, prob.solution(x)[0], rtol=1e-8, atol=1e-9)
        assert np.all(np.isfinite(sol.nu))
        grad = jax.grad(F)(x)
        tree_allclose(grad, prob.hypergradient(x), rtol=1e-7, atol=1e-8)


def test_inconsistent_equalities_are_infeasible():
    prob = quadratic_problem(seed=20, m=1)
    E = np.vstack([prob.E, prob.E])
    eq = lambda x: (jnp.asarray(E), jnp.asarray([0.0, 1.0]))  # noqa: E731
    sol = bj.argmin(prob.g, jnp.zeros(6), jnp.zeros(3), eq=eq)
    assert int(sol.info.status) == bj.Status.INFEASIBLE
    assert not bool(sol.info.converged)
    assert np.all(np.isnan(sol.y))  # no point to return (bj.Status's policy)


def test_max_steps_reported_with_residual():
    g = nonquadratic_g(seed=21)
    sol = bj.argmin(g, jnp.zeros(5), jnp.ones(3), solver="gradient", max_iter=2)
    assert int(sol.info.status) == bj.Status.MAX_STEPS
    assert int(sol.info.num_steps) == 2
    assert float(sol.info.residual) > 1e-6
    assert not bool(sol.info.converged)


def test_nonfinite_input_reported():
    prob = quadratic_problem(seed=22)
    sol = bj.argmin(prob.g, jnp.zeros(6), jnp.asarray([jnp.nan, 0.0, 1.0]))
    assert int(sol.info.status) == bj.Status.NONFINITE
    sol = bj.argmin(prob.g, jnp.zeros(6), jnp.asarray([jnp.inf, 0.0, 1.0]), solver="gradient")
    assert int(sol.info.status) == bj.Status.NONFINITE


def test_throw_raises_eagerly_and_under_jit():
    g = nonquadratic_g(seed=23)
    with pytest.raises(bj.SolveError, match="MAX_STEPS"):
        bj.argmin(g, jnp.zeros(5), jnp.ones(3), solver="gradient", max_iter=2, throw=True)
    f = jax.jit(lambda x: bj.argmin(g, jnp.zeros(5), x, solver="gradient", max_iter=2,
                                    throw=True).y)
    with pytest.raises(Exception, match="MAX_STEPS"):
        f(jnp.ones(3)).block_until_ready()
    # A successful solve does not raise.
    bj.argmin(g, jnp.zeros(5), jnp.ones(3), throw=True)
