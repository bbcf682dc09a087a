"""The BiGrad reproductions (bench/robust_control.py, shortest_path.py, bigrad_attack.py), tiny.

Each experiment runs at a small size with an assertion on its result: training through the
layer beats the untrained layer, the DP solver is exact, and the bilevel layers' gradients
match central differences. The two training runs through continuous layers are marked
``slow`` (their compilation takes minutes on a loaded 2-core machine); CI runs them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

from helpers import load_bench

rc = load_bench("robust_control")
sp = load_bench("shortest_path")


def _central_difference(fun, params, direction, h=1e-5):
    plus = jax.tree_util.tree_map(lambda p, d: p + h * d, params, direction)
    minus = jax.tree_util.tree_map(lambda p, d: p - h * d, params, direction)
    return (fun(plus) - fun(minus)) / (2 * h)


def _random_direction(key, params):
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef, [jax.random.normal(k, jnp.shape(p)) for k, p in zip(keys, leaves, strict=True)])


# --------------------------------------------------------------------------------------------
# Robust control.


def test_robust_control_bilevel_policy_gradient_matches_central_differences():
    system = rc.make_system(0)
    policy = rc.bigrad_policy(system)
    params = rc.init_params(bilevel=True)
    params["A_adv"] = 0.5 * jnp.eye(rc.N_STATE) + 0.1 * jax.random.normal(
        jax.random.PRNGKey(1), (rc.N_STATE, rc.N_STATE))
    x = jnp.array([0.3, -0.5, 0.2, 0.4])
    weights = jnp.array([1.0, -2.0])
    fun = jax.jit(lambda p: policy(p, x) @ weights)
    direction = _random_direction(jax.random.PRNGKey(2), params)
    grad = jax.grad(fun)(params)
    analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                   jax.tree_util.tree_leaves(direction),
                                                   strict=True))
    numeric = _central_difference(fun, params, direction)
    assert abs(float(analytic - numeric)) <= 1e-6 * (1 + abs(float(numeric)))


@pytest.mark.slow  # 29 s on an idle core, minutes on the loaded 2-core machine (compilation)
def test_robust_control_training_improves_both_layers_from_the_same_start():
    rows = rc.run(horizons=(10,), steps=10, batch=8, num_test=16, seeds=(0,), eval_every=10,
                  verbose=False)
    _, lqr, curves, _ = rows[0]
    start_opt, start_bi = curves["optnet"][0][0][1], curves["bigrad"][0][0][1]
    # The same uninformed start: the two layers' first policies agree up to the barrier.
    assert abs(start_opt - start_bi) <= 0.02 * start_opt
    for name in ("optnet", "bigrad"):
        curve = curves[name][0]
        assert curve[-1][1] < 0.95 * curve[0][1], (name, curve)
    assert np.isfinite(lqr)


# --------------------------------------------------------------------------------------------
# Shortest paths.


def test_shortest_path_dp_is_exact_against_enumeration():
    k = 4
    paths = jnp.asarray(sp.all_paths(k))
    assert paths.shape == (20, 16)
    costs = jax.random.normal(jax.random.PRNGKey(0), (300, k * k))
    got = jax.vmap(sp.path_solver(k))(costs)
    want = paths[jnp.argmin(costs @ paths.T, axis=1)]
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_interdiction_solver_matches_linear_bilevel_enumeration():
    # With a blocking raise the follower never pays it, and the leader's objective is the
    # linear_bilevel one (<c_x, x> - <c_y, y*(x)>), solved there by brute force over paths.
    k = 4
    prob = sp.interdiction_problem(k, delta=100.0)
    X = jnp.asarray(np.eye(k * k)[sp.interior_cells(k)])
    brute = bj.discrete.linear_bilevel(X, jnp.asarray(sp.all_paths(k)), prob.M,
                                       leader_weight=-1.0)
    c_y = jax.random.uniform(jax.random.PRNGKey(1), (100, k * k)) + 0.5
    c_x = 0.3 * jax.random.uniform(jax.random.PRNGKey(2), (100, k * k))
    x1, y1 = jax.vmap(prob.solver)(c_x, c_y)
    x2, y2 = jax.vmap(brute.solver)(c_x, c_y)
    np.testing.assert_array_equal(np.asarray(x1), np.asarray(x2))
    np.testing.assert_array_equal(np.asarray(y1), np.asarray(y2))


def test_interdiction_layer_keeps_the_cross_level_term():
    k = 4
    prob = sp.interdiction_problem(k)
    layer = bj.discrete.bilevel(prob, estimator="identity")
    c_x = jnp.full(k * k, 0.5)
    c_y = jax.random.uniform(jax.random.PRNGKey(3), (k * k,)) + 0.5
    target = jax.random.uniform(jax.random.PRNGKey(4), (k * k,))
    gx = jax.grad(lambda cx: layer(cx, c_y)[1] @ target)(c_x)
    # identity estimator: c_x receives M^T y_bar = delta * target.
    np.testing.assert_allclose(np.asarray(gx), sp.DELTA * np.asarray(target), rtol=1e-12)


def test_shortest_path_training_reduces_regret():
    results = sp.run(k1=5, n_train=96, n_test=96, epochs=3, batch=32, seeds=1,
                     single=("identity",), two=(), verbose=False)
    curve = results["single"]["identity"][0][0]  # (epochs + 1, [accuracy, regret])
    assert curve[-1, 1] < 0.8 * curve[0, 1], curve


# --------------------------------------------------------------------------------------------
# Adversarial attack.


@pytest.fixture(scope="module")
def ba():
    pytest.importorskip("sklearn")
    return load_bench("bigrad_attack")


def test_bigrad_attack_layer_input_gradient_matches_central_differences(ba):
    params = ba.init_params(jax.random.PRNGKey(0), "bilevel", d=4)
    params["A"] = 0.8 * jax.random.normal(jax.random.PRNGKey(1), (4, 4))
    params["L"] = 0.5 * jax.random.normal(jax.random.PRNGKey(2), (4, 4))
    h = jnp.array([0.4, -0.7, 0.1, 0.9])
    weights = jnp.array([1.0, -1.0, 0.5, 2.0])
    fun = jax.jit(lambda t: ba.bilevel_layer(t[1], t[0]) @ weights)
    layer_params = {k: params[k] for k in ("L", "q", "A", "log_kappa")}
    theta = (h, layer_params)
    direction = _random_direction(jax.random.PRNGKey(3), theta)
    grad = jax.grad(fun)(theta)
    analytic = sum(jnp.sum(g * d) for g, d in zip(jax.tree_util.tree_leaves(grad),
                                                   jax.tree_util.tree_leaves(direction),
                                                   strict=True))
    numeric = _central_difference(fun, theta, direction)
    assert abs(float(analytic - numeric)) <= 1e-6 * (1 + abs(float(numeric)))


@pytest.mark.slow  # 24 s on an idle core: compiles training and attacks through the layer
def test_bigrad_attack_bilevel_model_trains_and_attack_hurts(ba):
    results = ba.run(epochs=3, batch=32, seeds=1, n_train=128, n_test=64, epsilons=(0.0, 0.2),
                     pgd_steps=2, models=("bilevel",), verbose=False)
    r = results["bilevel"]
    clean, attacked = r["acc"][0, 0, 0], r["acc"][0, 1, 1]
    assert clean > r["untrained"][0] + 0.15, r
    assert attacked < clean
