"""Upper-level algorithms (bilevel_jax._src.outer): SSIGD, DSIGD, F2CBA, zeroth order, equality GD.

Each ``run`` is jitted once per configuration (``_jit_run``) to keep compile time down.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import bilevel_jax as bj
from bilevel_jax._src.outer import (
    Algorithm,
    O2NCState,
    State,
    StepInfo,
    dsigd,
    equality_gd,
    f2cba,
    pgd_solution,
    ssigd,
    zeroth_order,
)
from bilevel_jax._src.smoothing import linear_perturbation, perturb_linear

from helpers import tree_allclose

KEY = jax.random.PRNGKey(0)
P16 = bj.problems.sigd_quadratic(16)
P17 = bj.problems.sigd_quadratic(17)
P18 = bj.problems.sigd_quadratic(18)
# Problem (17) with the box written as rows of G y <= h (the penalty rule needs rows).
G_BOX = jnp.concatenate([jnp.eye(2), -jnp.eye(2)])
P17_ROWS = bj.problems.BilevelProblem(P17.f, P17.g, P17.x0, 2,
                                      ineq=lambda x: (G_BOX.astype(x.dtype),
                                                      jnp.ones(4, x.dtype)))


def _jit_run(alg):
    return jax.jit(alg.run, static_argnames=("num_steps", "callback"))


def grad_16(x):
    """Closed form of problem (16): -10 x inside |x_i| < 1, x/2 - 5 sign(x) outside."""
    return jnp.where(jnp.abs(x) < 1, -10 * x, 0.5 * x - 5 * jnp.sign(x))


def grad_17(x):
    return jnp.where(jnp.abs(x) < 1, -4 * x, x - 2 * jnp.sign(x))


# --------------------------------------------------------------------------------------------
# Convergence on problems with known solutions.


@functools.cache
def _ssigd16():
    return _jit_run(ssigd(P16))


def test_ssigd_problem_16_reaches_minimiser():
    x, hist = _ssigd16()(P16.x0, KEY, 80)
    # SGD with step 0.1 contracts by 0.95 per step outside the box (F'' = 1/2): after ~75
    # steps outside, |x_i| is within ~0.3 of 10; the bias of q (1e-3) is far smaller.
    np.testing.assert_allclose(jnp.abs(x), 10.0, atol=0.3)
    assert float(jnp.linalg.norm(grad_16(x))) < 0.2
    assert float(jnp.linalg.norm(grad_16(hist.x[0]))) > 5  # started far from stationary
    assert jnp.all(hist.status == bj.Status.SUCCESS)
    assert jnp.all(hist.num_active[-10:] == 2)  # y* = -sign(x) on the box's corner
    np.testing.assert_allclose(hist.value[-1], -25.25 * 2, atol=0.05)
    # The recorded hypergradient norms follow the closed form at the recorded iterates.
    np.testing.assert_allclose(hist.grad_norm, jnp.linalg.norm(jax.vmap(grad_16)(hist.x),
                                                               axis=1), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("problem, grad_fn, x_star, f_star, factor", [
    (P16, grad_16, 10.0, -25.25, 0.9),
    (P17, grad_17, 2.0, -2.5, 0.95),
])
def test_dsigd_with_pgd_lower_level(problem, grad_fn, x_star, f_star, factor):
    # The paper's DSIGD settings (not the library defaults): sigma = 1, slack a e0 / m with
    # e0 = 1, 10 PGD steps at gamma = 1, c_bt = 0.9 (0.95 for (17)).
    alg = dsigd(problem, sigma=1.0, slack=1.0, slack_rule="backtracks", backtrack_factor=factor,
                lower_steps=10, lower_step_size=1.0)
    x, hist = _jit_run(alg)(problem.x0, KEY, 60)
    np.testing.assert_allclose(jnp.abs(x), x_star, atol=1e-4)
    assert float(jnp.linalg.norm(grad_fn(x))) < 1e-4
    np.testing.assert_allclose(hist.value[-1], 2 * f_star, atol=1e-4)
    assert jnp.all(hist.num_backtracks >= 0) & jnp.all(hist.num_backtracks <= 30)
    # Armijo with slack: F_hat never increases by more than the slack a e0 / m <= 1.
    assert jnp.all(jnp.diff(hist.value) < 1.0)


def test_f2cba_o2nc_problem_17():
    alg = f2cba(P17_ROWS, radius=0.05, block_size=20, learning_rate=0.05)
    x, hist = _jit_run(alg)(P17.x0, KEY, 400)
    # O2NC guarantees (delta, eps)-Goldstein stationarity: the best block average sits within
    # about D M / 2 ~ 0.5 of a stationary point; in practice ~0.05 here.
    np.testing.assert_allclose(jnp.abs(x), 2.0, atol=0.1)
    assert float(jnp.linalg.norm(grad_17(x))) < 0.15
    assert jnp.all(jnp.linalg.norm(jnp.diff(hist.x, axis=0), axis=1) <= 0.05 * 2 + 1e-12)


def test_f2cba_o2nc_random_output_rule_is_uniform_over_blocks():
    """output_rule="random" (the theory's O2NC output): a completed block's average drawn
    uniformly (reservoir sampling); "best" returns the block with the smallest mean gradient.
    400 keys, 8 steps in blocks of 2 -> 4 blocks, each chosen ~100 times."""
    f = lambda x, y: jnp.sum((x - 1.0) ** 2) + y @ y  # noqa: E731
    g = lambda y, x: 0.5 * y @ y - x @ y  # noqa: E731
    keys = jax.random.split(KEY, 400)
    x0 = jnp.asarray([3.0, -2.0])
    outs = {}
    for rule in ("random", "best"):
        alg = f2cba(f, g, jnp.zeros(2), hypergrad="implicit", block_size=2, radius=0.5,
                    learning_rate=0.1, output_rule=rule)
        outs[rule] = jax.jit(jax.vmap(lambda k, alg=alg: alg.run(x0, k, 8)))(keys)
    x, hist = outs["random"]
    blocks = hist.x.reshape(400, 4, 2, 2).mean(axis=2)  # (keys, block, d)
    dist = jnp.linalg.norm(blocks - x[:, None], axis=-1)
    assert float(jnp.max(jnp.min(dist, axis=1))) < 1e-12  # the output is a block average
    counts = np.bincount(np.asarray(jnp.argmin(dist, axis=1)), minlength=4)
    assert np.all((counts > 60) & (counts < 140)), counts  # uniform: 100 each, sd ~ 8.7
    x, hist = outs["best"]
    blocks = hist.x.reshape(400, 4, 2, 2).mean(axis=2)
    mean_grad = jnp.linalg.norm(hist.grad.reshape(400, 4, 2, 2).mean(axis=2), axis=-1)
    best = blocks[jnp.arange(400), jnp.argmin(mean_grad, axis=1)]
    tree_allclose(x, best, rtol=1e-12)
    with pytest.raises(ValueError, match="output_rule"):
        f2cba(P17_ROWS, output_rule="last")


def test_zeroth_order_problem_17():
    alg = zeroth_order(P17, radius=0.05, block_size=20, learning_rate=0.05, num_directions=4)
    x, hist = _jit_run(alg)(P17.x0, KEY, 400)
    # Two-point estimates in d = 2 are noisy; the best block average is within ~0.05.
    np.testing.assert_allclose(jnp.abs(x), 2.0, atol=0.1)
    np.testing.assert_allclose(P17.value(x), -5.0, atol=0.02)


def test_zeroth_order_estimate_is_unbiased_for_a_linear_function():
    # F(x) = f(x, y*(x)) linear in x (y* = 0 by construction): two-point estimates with d
    # directions average to the gradient; one estimate equals d (c'w) w.
    c = jnp.array([1.0, -2.0, 0.5])
    alg = zeroth_order(lambda x, y: c @ x + y @ y, lambda y, x: 0.5 * y @ y, jnp.zeros(2),
                       num_directions=1, smoothing_radius=0.1)
    state = alg.init(jnp.zeros(3), KEY)
    new, info = jax.jit(alg.step)(state)
    # Delta_2 = clip_D(Delta_1 - eta g) with Delta_1 = 0 and ||eta g|| < D: recover g.
    g = (state.extra.delta - new.extra.delta) / 1e-2
    w = g / jnp.linalg.norm(g)
    tree_allclose(g, 3 * (c @ w) * w, rtol=1e-8)


def test_equality_gd_closed_form_minimiser():
    # LL: min 1/2 y'Qy - (P'x)'y s.t. 1'y = 1 (y in R^3); UL: f = c'y + rho/2 ||x||^2.
    # y*(x) = M x + m is affine, F quadratic, x* = -M'c / rho; the finite-difference rule is
    # exact here (f linear in y, g quadratic).
    rng = np.random.default_rng(0)
    B = rng.standard_normal((3, 3))
    Q, P = B @ B.T + 2 * np.eye(3), rng.standard_normal((2, 3))
    c, rho = np.array([1.0, -0.5, 2.0]), 0.5
    E = np.ones((1, 3))
    K = np.block([[Q, E.T], [E, np.zeros((1, 1))]])
    M = np.linalg.solve(K, np.vstack([P.T, np.zeros((1, 2))]))[:3]
    x_star = -M.T @ c / rho
    lr = 1.0 / rho  # F'' = rho I: one step of size 1/C_F solves it; use half of that
    alg = equality_gd(lambda x, y: c @ y + 0.5 * rho * x @ x,
                      lambda y, x: 0.5 * y @ (Q @ y) - (P.T @ x) @ y, jnp.zeros(3),
                      eq=lambda x: (jnp.asarray(E), jnp.ones(1)), learning_rate=0.5 * lr)
    x, hist = _jit_run(alg)(jnp.zeros(2), KEY, 40)
    tree_allclose(x, x_star, rtol=1e-8, atol=1e-8)  # contraction 1/2 per step: 2^-40 ~ 1e-12
    assert jnp.all(hist.status == bj.Status.SUCCESS)


# --------------------------------------------------------------------------------------------
# F2CBA on Problem L.1: penalty hypergradients track the exact implicit rule.


L1, _ = bj.problems.kornowski_l1(seed=1, dim_x=5, dim_y=10)
X_ACTIVE = -10.0 * L1.x0  # two constraints active here (none at x0)


def test_f2cba_penalty_tracks_exact_rule_on_l1():
    hist = {}
    for rule in ("implicit", "penalty"):
        alg = f2cba(L1, method="adam", hypergrad=rule, alpha=0.1, learning_rate=0.05)
        hist[rule] = _jit_run(alg)(X_ACTIVE, KEY, 150)[1]
    exact, pen = hist["implicit"], hist["penalty"]
    assert int(exact.num_active[0]) == 2
    tree_allclose(exact.grad[0], jax.grad(L1.value)(X_ACTIVE))
    # Quadratic lower level: error O(alpha^2), ~2e-3 at alpha = 0.1 (docs lower/inequality.md).
    error = float(jnp.linalg.norm(pen.grad[0] - exact.grad[0]))
    assert 1e-4 < error < 1e-2
    # Along the run the error stays O(alpha^2) and the final values agree: Adam's normalised
    # steps keep the trajectories within ~1e-2.
    assert float(jnp.max(jnp.linalg.norm(pen.grad - exact.grad, axis=1))) < 5e-2
    assert pen.value[-1] < pen.value[0] - 1.0
    np.testing.assert_allclose(pen.value[-1], exact.value[-1], atol=1e-3)
    np.testing.assert_allclose(pen.x[-1], exact.x[-1], atol=2e-2)


@pytest.mark.slow
def test_f2cba_penalty_error_falls_with_alpha():
    exact = jax.jit(jax.grad(L1.value))(X_ACTIVE)
    errors = []
    for alpha in (0.1, 0.01):
        alg = f2cba(L1, method="adam", alpha=alpha, optimizer=optax.sgd(1.0))
        info = jax.jit(alg.step)(alg.init(X_ACTIVE, KEY))[1]
        errors.append(float(jnp.linalg.norm(info.grad - exact)))
    # O(alpha^2): ~2e-3 at 0.1 and ~2e-5 at 0.01 (docs lower/inequality.md).
    assert 1e-4 < errors[0] < 1e-2
    assert errors[1] < errors[0] / 30


# --------------------------------------------------------------------------------------------
# pgd_solution: the implicit rule at the PGD output, checked three ways.


def test_pgd_solution_closed_form_and_finite_differences():
    x = jnp.array([0.4, -1.7])

    def y_of(x_, steps=200):
        return pgd_solution(P16.g, jnp.zeros(2), x_, steps=steps, step_size=1.0,
                            box=P16.box)[0]

    # (16): H = I/2, gamma = 1 contracts by 1/2 per step: 200 steps reach y* = clip(-x).
    tree_allclose(y_of(x), jnp.clip(-x, -1, 1))
    jac = jax.jacrev(y_of)(x)
    tree_allclose(jac, -jnp.diag((jnp.abs(x) < 1).astype(float)))  # Dy* (O3)
    check_grads(jax.jit(lambda x_: P16.f(x_, y_of(x_))), (x,), order=1, modes=["rev"])


@pytest.mark.slow
def test_pgd_lower_level_on_polygon_agrees_with_argmin():
    # Problem (18): Y = {|y_i| <= 5, |y_1 + y_2| <= 5}; PGD projects with a QP (argmin).
    q = jnp.array([1e-3, -2e-3])
    x18 = jnp.array([1.0, 6.5])  # y* = Proj_Y(-x - 1 - q) on the edge y_1 + y_2 = -5

    def value18(x_, exact):
        if exact:
            y = bj.argmin(lambda y, t: P18.g(y, t) + q @ y, jnp.zeros(2), x_, ineq=P18.ineq).y
        else:
            y = pgd_solution(P18.g, jnp.zeros(2), x_, steps=300, step_size=0.5,
                             ineq=P18.ineq, q=q)[0]
        return P18.f(x_, y)

    g_exact = jax.jit(jax.grad(value18), static_argnums=1)(x18, True)
    # 300 steps at gamma = 0.5 (H = I) converge to rounding: the rules agree to ~1e-10.
    tree_allclose(jax.jit(jax.grad(value18), static_argnums=1)(x18, False), g_exact,
                  rtol=1e-7, atol=1e-8)
    # SSIGD with the paper's (18) settings (10 PGD steps, gamma = 0.1, step 0.1) descends
    # from x0 = (3, -1) (F = -24.5) towards the minimiser (20, -20) (F = -211.5).
    x, hist = _jit_run(ssigd(P18, lower_steps=10, lower_step_size=0.1))(P18.x0, KEY, 60)
    assert jnp.all(hist.status == bj.Status.SUCCESS)
    assert hist.value[-1] < -150.0
    assert int(hist.num_active[-1]) >= 1


def test_pgd_solution_closure_matches_theta():
    # A hyperparameter s captured by closure in g gets the gradient it gets through theta.
    x = jnp.array([0.3, -0.2])

    def by_closure(s):
        g = lambda y, x_: s * 0.5 * y @ y + x_ @ y  # noqa: E731
        y = pgd_solution(g, jnp.zeros(2), x, steps=100, step_size=0.5, box=P17.box)[0]
        return jnp.sum(y**2)

    def by_theta(s):
        g = lambda y, t: t[1] * 0.5 * y @ y + t[0] @ y  # noqa: E731
        y = pgd_solution(g, jnp.zeros(2), (x, s), steps=100, step_size=0.5,
                         box=lambda t: (-1.0, 1.0))[0]
        return jnp.sum(y**2)

    s = 1.5  # y* = -x / s inside the box: d/ds sum y^2 = -2 |x|^2 / s^3
    expected = -2 * jnp.sum(x**2) / s**3
    tree_allclose(jax.grad(by_closure)(s), expected, rtol=1e-8)
    tree_allclose(jax.grad(by_theta)(s), expected, rtol=1e-8)


def test_algorithm_with_closed_over_traced_data():
    # g closes over a value traced by an outer jit: the lower-level maps hoist it (closure
    # conversion), so the run matches the one with the value written in.
    def final_x(scale):
        def g(y, x):
            return scale * P17.g(y, x)

        alg = ssigd(P17.f, g, jnp.zeros(2), box=P17.box, lower_steps=20, lower_step_size=0.1)
        return alg.run(P17.x0, KEY, 5)[0]

    reference = _jit_run(ssigd(P17, lower_steps=20, lower_step_size=0.1))(P17.x0, KEY, 5)[0]
    tree_allclose(jax.jit(final_x)(1.0), reference)


# --------------------------------------------------------------------------------------------
# Contracts: jit vs step loop, determinism, keys, vmap, dtypes, state invariance, callbacks.


def test_jit_run_equals_step_loop():
    alg = ssigd(P16)
    _, hist = _ssigd16()(P16.x0, KEY, 80)  # the scan of the convergence test
    state = alg.init(P16.x0, KEY)
    infos = []
    for _ in range(2):
        state, info = alg.step(state)  # eager: no jit anywhere
        infos.append(info)
    tree_allclose(hist.x[2], state.x)
    tree_allclose(jax.tree_util.tree_map(lambda a: a[:2], hist),
                  jax.tree_util.tree_map(lambda *a: jnp.stack(a), *infos))


def test_determinism_and_keys():
    run = _ssigd16()
    a = run(P16.x0, KEY, 80)
    b = run(P16.x0, KEY, 80)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_array_equal(u, v)  # bitwise
    alg = ssigd(P16)
    q0, q1 = alg.init(P16.x0, KEY).extra, alg.init(P16.x0, jax.random.PRNGKey(1)).extra
    assert not np.allclose(q0, q1)
    np.testing.assert_allclose(jnp.linalg.norm(q0), 1e-3, rtol=1e-12)  # "sphere": ||q|| = scale
    # q is perturb_linear's draw for init's split key.
    q_key = jax.random.split(KEY)[1]
    tree_allclose(q0, linear_perturbation(q_key, jnp.zeros(2), 1e-3, "sphere"))
    g_q = perturb_linear(P16.g, q_key, 1e-3, distribution="sphere")
    y, x = jnp.array([0.3, -0.1]), jnp.array([1.0, 2.0])
    tree_allclose(g_q(y, x), P16.g(y, x) + q0 @ y)


def test_vmap_over_keys_equals_loop():
    alg = ssigd(P17, perturbation_scale=0.1)
    run = jax.jit(jax.vmap(lambda k: alg.run(P17.x0, k, 4)))
    keys = jax.random.split(KEY, 2)
    xs, hists = run(keys)
    for i in range(2):
        x, hist = _jit_run(alg)(P17.x0, keys[i], 4)
        tree_allclose(xs[i], x)
        tree_allclose(hists.value[i], hist.value)
    assert not np.allclose(xs[0], xs[1])  # different q, different iterates


def test_float32_in_float32_out():
    x, hist = _jit_run(ssigd(P17))(P17.x0.astype(jnp.float32), KEY, 60)
    assert x.dtype == jnp.float32
    assert hist.value.dtype == jnp.float32 and hist.x.dtype == jnp.float32
    np.testing.assert_allclose(jnp.abs(x), 2.0, atol=1e-2)  # float32 LL tolerance 1e-5


ALGORITHMS = {
    "ssigd": lambda: ssigd(P16),
    "ssigd_pgd": lambda: ssigd(P16, lower_steps=3),
    "dsigd": lambda: dsigd(P16),
    "f2cba_o2nc": lambda: f2cba(P17_ROWS),
    "f2cba_adam": lambda: f2cba(P17_ROWS, method="adam"),
    "zeroth_order": lambda: zeroth_order(P17),
    "equality_gd": lambda: equality_gd(P17.f, P17.g, jnp.zeros(2),
                                       eq=lambda x: (jnp.ones((1, 2)), jnp.zeros(1))),
}


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_state_structure_and_dtypes_invariant(name, dtype):
    alg = ALGORITHMS[name]()
    assert isinstance(alg, Algorithm)
    state = alg.init(jnp.asarray([0.5, -0.3], dtype), KEY)
    assert isinstance(state, State)
    new, info = jax.eval_shape(alg.step, state)
    assert isinstance(info, StepInfo)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state),
                    strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
    assert info.value.dtype == dtype and info.status.dtype == jnp.int32
    if name.endswith(("o2nc", "order")):
        assert isinstance(state.extra, O2NCState)


def test_callback_and_projection_and_batches():
    seen = []
    # SSIGD on (16) with X = [-5, 5]^2: the minimiser over X is the corner |x_i| = 5.
    # The batch scales f by b_r (a "stochastic" upper level with mean 1).
    alg = ssigd(lambda x, y, b: b * P16.f(x, y), P16.g, jnp.zeros(2), box=P16.box,
                projection=bj.Box(-5.0, 5.0))
    batches = jnp.linspace(0.8, 1.2, 30)
    x, hist = _jit_run(alg)(P16.x0, KEY, 30, batches=(batches,),
                            callback=lambda k, info: seen.append(int(k)))
    jax.effects_barrier()
    assert sorted(seen) == list(range(30))
    np.testing.assert_allclose(jnp.abs(x), 5.0)
    assert jnp.all(jnp.abs(hist.x) <= 5.0)


def test_nonfinite_step_is_skipped_and_reported():
    # f is NaN for x_1 > 1: the state is kept and the status says NONFINITE.
    f = lambda x, y: jnp.where(x[0] > 1, jnp.nan, P17.f(x, y))  # noqa: E731
    alg = ssigd(f, P17.g, jnp.zeros(2), box=P17.box)
    state = alg.init(jnp.array([1.5, 0.0]), KEY)
    new, info = jax.jit(alg.step)(state)
    assert int(info.status) == bj.Status.NONFINITE
    tree_allclose(new.x, state.x)
    assert int(new.count) == 1


# --------------------------------------------------------------------------------------------
# Bad input raises, naming the argument.


@pytest.mark.parametrize("make, match", [
    (lambda: ssigd(P16, optimizer="sgd"), "optimizer"),
    (lambda: ssigd(P16, optimizer=optax.sgd), "optimizer"),
    (lambda: ssigd(P16, learning_rate=-1.0), "learning_rate"),
    (lambda: ssigd(P16, perturbation_scale=-1.0), "perturbation_scale"),
    (lambda: ssigd(P16, distribution="cauchy"), "distribution"),
    (lambda: ssigd(P16, hypergrad="magic"), "hypergrad"),
    (lambda: ssigd(P16, lower_steps=0), "lower_steps"),
    (lambda: ssigd(P16, lower_steps=5, hypergrad="penalty"), "lower_steps"),
    (lambda: ssigd(P16, projection=3.0), "projection"),
    (lambda: ssigd(P16, lower_kwargs=[1]), "lower_kwargs"),
    (lambda: ssigd(P16.f, P16.g), "y0"),
    (lambda: ssigd(P16, P16.g), "BilevelProblem"),
    (lambda: ssigd(P16.f, "g", jnp.zeros(2)), "g"),
    (lambda: ssigd(P16.f, P16.g, jnp.zeros(2, jnp.int32)), "y0"),
    (lambda: dsigd(P16, backtrack_factor=1.5), "backtrack_factor"),
    (lambda: dsigd(P16, max_backtracks=-1), "max_backtracks"),
    (lambda: dsigd(P16, sigma=0.0), "sigma"),
    (lambda: f2cba(P17_ROWS, method="sgd"), "method"),
    (lambda: f2cba(P17_ROWS, radius=0.0), "radius"),
    (lambda: f2cba(P17_ROWS, block_size=0), "block_size"),
    (lambda: f2cba(P17_ROWS, alpha=-0.1), "alpha"),
    (lambda: zeroth_order(P17, smoothing_radius=0.0), "smoothing_radius"),
    (lambda: zeroth_order(P17, num_directions=0), "num_directions"),
    (lambda: equality_gd(P17.f, P17.g, jnp.zeros(2), eq=None), "eq"),
    (lambda: equality_gd(P17, eq=lambda x: x), "ineq/box"),
    (lambda: equality_gd(P17.f, P17.g, jnp.zeros(2), eq=lambda x: x,
                         hypergrad="penalty"), "hypergrad"),
])
def test_bad_options_raise(make, match):
    with pytest.raises((TypeError, ValueError), match=match):
        make()


def test_bad_run_and_init_arguments_raise():
    alg = ssigd(P16)
    with pytest.raises(ValueError, match="num_steps"):
        alg.run(P16.x0, KEY, -1)
    with pytest.raises(ValueError, match="num_steps"):
        alg.run(P16.x0, KEY, 2.5)
    with pytest.raises(ValueError, match="batches"):
        alg.run(P16.x0, KEY, 3, batches=(jnp.ones(4),))
    with pytest.raises(TypeError, match="callback"):
        alg.run(P16.x0, KEY, 3, callback=1)
    with pytest.raises(TypeError, match="x0"):
        alg.init(jnp.array([1, 2]), KEY)
    with pytest.raises(TypeError, match="key"):
        alg.init(P16.x0, 0)
    bad_f = ssigd(lambda x, y: x + y, P16.g, jnp.zeros(2), box=P16.box)
    with pytest.raises(TypeError, match="f"):
        bad_f.step(bad_f.init(P16.x0, KEY))
    bad_g = ssigd(P16.f, lambda y, x: y, jnp.zeros(2), box=P16.box)
    with pytest.raises(TypeError, match="g"):
        bad_g.init(P16.x0, KEY)
