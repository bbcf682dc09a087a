"""Tests of the discrete estimators (docs lower/discrete.md; oracles T6-T9)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import norm
from jax.test_util import check_grads

from bilevel_jax._src.discrete import (
    DiscreteBilevel,
    bilevel,
    brute_force_bilevel,
    identity,
    interdiction,
    interpolated,
    linear_bilevel,
    onehot_argmin,
    perturbed,
    relaxed,
)

from helpers import tree_allclose

THETA_T6 = jnp.asarray([0.2, -0.5, 1.0, 0.3])
EPS_T6 = 0.7
S_T6 = 400_000


# ------------------------------------------------------------------ T6: perturbed optimiser


def _gaussian_argmax_probs(theta, eps, num_nodes=80):
    """P(argmax(theta + eps Z) = i) by Gauss-Hermite quadrature (exact to ~1e-12 here)."""
    nodes, weights = np.polynomial.hermite.hermgauss(num_nodes)
    z = jnp.sqrt(2.0) * nodes

    def prob(i):
        diff = (theta[i] - theta) / eps  # P(theta_i + eps z >= theta_j + eps Z_j) = Phi(diff + z)
        cdf = norm.cdf(diff[None, :] + z[:, None])
        cdf = cdf.at[:, i].set(1.0)
        return jnp.sum(weights * jnp.prod(cdf, axis=1)) / jnp.sqrt(jnp.pi)

    return jnp.stack([prob(i) for i in range(theta.shape[0])])


@pytest.mark.parametrize("noise", ["gumbel", "gaussian"])
def test_t6_perturbed_matches_smoothed_jacobian(noise):
    """argmin at c = -theta: mean = softmax(theta/eps) (Gumbel), Jacobian within 5/sqrt(S)."""
    layer = perturbed(onehot_argmin, noise=noise, sigma=EPS_T6, num_samples=S_T6)
    key = jax.random.PRNGKey(0)
    mean, jac = jax.jit(lambda c: (layer(c, key), jax.jacrev(layer)(c, key)))(-THETA_T6)
    if noise == "gumbel":
        p = jax.nn.softmax(THETA_T6 / EPS_T6)
        exact = (jnp.diag(p) - jnp.outer(p, p)) / EPS_T6
    else:
        p, exact = jax.jit(lambda t: (_gaussian_argmax_probs(t, EPS_T6),
                                      jax.jacfwd(_gaussian_argmax_probs)(t, EPS_T6)))(THETA_T6)
        tree_allclose(jnp.sum(p), 1.0, atol=1e-10)
    tol = 5 / np.sqrt(S_T6)  # Monte-Carlo error: std <= 1/(eps sqrt(S)) per entry
    assert np.abs(mean - p).max() <= tol
    # d mean / d c = -d mean / d theta.
    assert np.abs(-jac - exact).max() <= tol


def test_perturbed_vmap_over_keys_equals_loop():
    """Independent keys give independent estimates (pytree costs: see the T9 tests)."""
    layer = perturbed(onehot_argmin, noise="gaussian", sigma=0.5, num_samples=50)
    costs = jnp.asarray([0.1, 0.0, 0.3])
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    fn = jax.value_and_grad(lambda c, k: layer(c, k) @ jnp.asarray([1.0, 2.0, 0.0]))
    batched = jax.jit(jax.vmap(fn, in_axes=(None, 0)))(costs, keys)
    single = jax.jit(fn)
    looped = [single(costs, k) for k in keys]
    tree_allclose(batched, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *looped))
    assert not np.allclose(batched[0][0], batched[0][1])  # independent noise per key


# ------------------------------------------------------------------ T7, T8


def test_t7_interpolation_sign():
    layer = interpolated(onehot_argmin, lambda_=1.0)
    w = jnp.asarray([1.0, 2.0, 3.0])
    grad = jax.grad(lambda c: layer(c) @ jnp.asarray([5.0, 0.0, 0.0]))(w)
    tree_allclose(grad, jnp.asarray([-1.0, 1.0, 0.0]), atol=0)


def test_t8_identity_is_minus_ybar(maybe_jit):
    layer = identity(onehot_argmin)
    c = jnp.asarray([0.3, -1.0, 2.0, 0.5])
    ybar = jnp.asarray([0.7, -0.2, 1.3, 4.0])
    y, vjp = jax.vjp(layer, c)
    tree_allclose(y, jnp.asarray([0.0, 1.0, 0.0, 0.0]), atol=0)
    tree_allclose(vjp(ybar)[0], -ybar, atol=0)
    tree_allclose(maybe_jit(jax.grad(lambda c: layer(c) @ ybar))(c), -ybar, atol=0)


def test_t8_cross_level_sign_on_interdiction():
    prob = interdiction(4, big=10.0)
    layer = bilevel(prob, estimator="identity")
    c_x, c_y = jnp.zeros(4), jnp.asarray([3.0, 1.0, 2.0, 5.0])
    rng = np.random.default_rng(0)
    xbar, ybar = jnp.asarray(rng.standard_normal(4)), jnp.asarray(rng.standard_normal(4))
    (x, y), (cbar_x, cbar_y) = jax.jit(
        lambda a, b: (layer(a, b), jax.vjp(layer, a, b)[1]((xbar, ybar))))(c_x, c_y)
    tree_allclose((x, y), (jnp.eye(4)[1], jnp.eye(4)[2]), atol=0)
    tree_allclose(cbar_y, -ybar, atol=0)
    tree_allclose(cbar_x, -xbar + prob.M.T @ ybar, atol=1e-15)
    # The wrong sign (M^T(-ybar) applied without the upper -I).
    assert not np.allclose(cbar_x, -xbar - prob.M.T @ ybar)


@pytest.mark.parametrize("estimator", ["identity", "interpolated"])
def test_t8_exact_for_the_quadratic_regularised_solver(estimator):
    """x = -c_x, y = -(c_y + M x): the identity Jacobian is exact, so is interpolation."""
    rng = np.random.default_rng(1)
    M = jnp.asarray(rng.standard_normal((3, 2)))

    def closed_form(c_x, c_y):
        x = -c_x
        return x, -(c_y + M @ x)

    prob = DiscreteBilevel(closed_form, lambda c: -c, M)
    layer = bilevel(prob, estimator=estimator, lambda_=0.3)
    c_x, c_y = jnp.asarray([0.2, -0.4]), jnp.asarray([1.0, 0.5, -0.3])

    def loss(fn):
        def value(c_x, c_y):
            x, y = fn(c_x, c_y)
            return jnp.sum(jnp.sin(x)) + jnp.sum(y**2) + x @ (M.T @ y)

        return value

    got, want = jax.jit(lambda a, b: (jax.grad(loss(layer), argnums=(0, 1))(a, b),
                                      jax.grad(loss(closed_form), argnums=(0, 1))(a, b)))(c_x, c_y)
    tree_allclose(got, want, atol=1e-14)


# ------------------------------------------------------------------ T9: tiny interdiction


def test_t9_brute_force_blocks_the_cheapest():
    prob = interdiction(5)
    w = jnp.asarray([0.4, 0.9, 0.1, 0.7, 0.3])
    x, y = jax.jit(prob.solver)(jnp.zeros(5), w)
    tree_allclose((x, y), (jnp.eye(5)[2], jnp.eye(5)[4]), atol=0)


def test_brute_force_bilevel_matches_python_enumeration():
    rng = np.random.default_rng(2)
    X = rng.integers(0, 2, (6, 3)).astype(float)
    Y = rng.integers(0, 2, (5, 4)).astype(float)
    D = rng.standard_normal((4, 3))
    theta = jnp.asarray(rng.standard_normal(4))
    leader = lambda x, y, t: ((x - 0.5) ** 2 * t[:3]).sum() - y @ t  # noqa: E731
    follower = lambda x, y, t: y @ (t + D @ x) + 0.1 * y.sum()  # noqa: E731
    x, y = jax.jit(brute_force_bilevel(X, Y, leader, follower))(theta)
    best, theta = None, np.asarray(theta)
    for xi in X:
        fvals = [float(follower(xi, yj, theta)) for yj in Y]
        yj = Y[int(np.argmin(fvals))]
        value = float(leader(xi, yj, theta))
        if best is None or value < best[0]:
            best = (value, xi, yj)
    tree_allclose((x, y), (best[1], best[2]), atol=0)


def _hamming(x, y, x_t, y_t):
    return jnp.sum(jnp.abs(x - x_t)) + jnp.sum(jnp.abs(y - y_t))


@pytest.mark.parametrize(
    "estimator, lr, options, target",
    [
        ("identity", 0.01, {}, (4, 0)),
        ("identity", 0.01, {}, (0, 4)),
        ("interpolated", 0.1, {"lambda_": 2.0}, (4, 0)),
        ("perturbed", 0.1, {"sigma": 0.5, "num_samples": 200}, (0, 4)),
    ],
)
def test_t9_training_drives_hamming_loss_to_zero(estimator, lr, options, target):
    """Gradient descent on (c_x, w) through the layer reaches the target choices (x, y)."""
    n = 5
    prob = interdiction(n, big=100.0)
    x_t, y_t = jnp.eye(n)[target[0]], jnp.eye(n)[target[1]]
    layer = bilevel(prob, estimator=estimator, **options)

    def surrogate(c, key):
        # Hamming loss of 0/1 vectors, written linearly: |x - x_t| = x (1 - 2 x_t) + x_t.
        args = (c[0], c[1], key) if estimator == "perturbed" else (c[0], c[1])
        x, y = layer(*args)
        return x @ (1 - 2 * x_t) + y @ (1 - 2 * y_t)

    @jax.jit
    def step(c, key):
        grad = jax.grad(surrogate)(c, key)
        c = jax.tree_util.tree_map(lambda a, b: a - lr * b, c, grad)
        return c, _hamming(*prob.solver(*c), x_t, y_t)

    c = (jnp.zeros(n), jnp.asarray(np.random.default_rng(0).uniform(0, 1, n)))
    assert _hamming(*prob.solver(*c), x_t, y_t) > 0
    for k in range(300):
        c, loss = step(c, jax.random.PRNGKey(k))
        if loss == 0:
            break
    assert loss == 0


# ------------------------------------------------------------------ relaxation


def test_relaxed_entropy_and_quadratic():
    c = jnp.asarray([0.3, -0.1, 0.05, 1.0])
    tree_allclose(relaxed(regularizer="entropy", temperature=0.5)(c), jax.nn.softmax(-c / 0.5))
    layer = relaxed(regularizer="quadratic", temperature=0.5)
    y = layer(c)
    support = y > 0
    tree_allclose(jnp.sum(y), 1.0)
    assert bool(jnp.all(y >= 0)) and 1 <= int(support.sum()) < 4
    # Sparsemax Jacobian on the support: -(diag(s) - s s^T / |s|) / tau (costs, not scores).
    s = support.astype(float)
    exact = -(jnp.diag(s) - jnp.outer(s, s) / s.sum()) / 0.5
    tree_allclose(jax.jit(jax.jacrev(layer))(c), exact, atol=1e-12)
    check_grads(jax.jit(layer), (c,), order=1, modes=["rev"])
    # Small temperature: the one-hot argmin.
    tree_allclose(relaxed(temperature=1e-3)(c), onehot_argmin(c), atol=1e-12)


# ------------------------------------------------------------------ contract


def test_vmap_equals_loop_for_identity_and_interpolated():
    costs = jnp.asarray(np.random.default_rng(3).standard_normal((4, 5)))
    ybar = jnp.asarray(np.random.default_rng(4).standard_normal(5))
    for layer in (identity(onehot_argmin), interpolated(onehot_argmin, lambda_=0.5)):
        fn = jax.value_and_grad(lambda c, layer=layer: layer(c) @ ybar)
        batched = jax.jit(jax.vmap(fn))(costs)
        looped = [fn(c) for c in costs]
        tree_allclose(batched, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *looped))


def test_float32_in_float32_out():
    c = jnp.asarray([0.3, -0.1, 0.2], jnp.float32)
    key = jax.random.PRNGKey(0)
    layers = [identity(onehot_argmin), interpolated(onehot_argmin),
              lambda c: perturbed(onehot_argmin, num_samples=10)(c, key), relaxed()]
    layer = bilevel(interdiction(3), estimator="interpolated")

    def outputs(c):
        ys = [f(c) for f in layers]
        grads = [jax.grad(lambda c, f=f: f(c)[0])(c) for f in layers]
        cross = jax.grad(lambda a, b: jnp.sum(layer(a, b)[1] * jnp.arange(3.0)),
                         argnums=(0, 1))(c, -c)
        return ys, grads, cross

    for leaf in jax.tree_util.tree_leaves(jax.jit(outputs)(c)):
        assert leaf.dtype == jnp.float32


def test_closed_over_arrays_are_hoisted_and_get_zero_gradient():
    """A solver closing over a traced array works under jit (no CustomVJPException).

    The estimators define the gradient with respect to the costs; the solution is piecewise
    constant in anything else, so a closed-over array gets a zero gradient (documented).
    """

    def loss(c, shift):
        solver = lambda costs: onehot_argmin(costs + shift)  # noqa: E731
        return identity(solver)(c) @ jnp.asarray([1.0, 2.0, 3.0])

    c, shift = jnp.asarray([0.5, 0.1, 0.9]), jnp.asarray([0.0, 1.0, 0.0])
    grad_c, grad_shift = jax.jit(jax.grad(loss, argnums=(0, 1)))(c, shift)
    tree_allclose(grad_c, -jnp.asarray([1.0, 2.0, 3.0]), atol=0)
    tree_allclose(grad_shift, jnp.zeros(3), atol=0)


def test_linear_bilevel_cooperative_leader():
    """kappa = +1: the leader helps the follower; enumeration over all pairs agrees."""
    X = jnp.asarray(list(itertools.product([0.0, 1.0], repeat=2)))
    Y = jnp.eye(3)
    M = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    prob = linear_bilevel(X, Y, M, leader_weight=1.0)
    c_x, c_y = jnp.asarray([0.2, -0.3]), jnp.asarray([0.1, 0.4, -0.2])
    x, y = jax.jit(prob.solver)(c_x, c_y)
    c_x, c_y, M = np.asarray(c_x), np.asarray(c_y), np.asarray(M)
    values = []
    for xi in np.asarray(X):
        yi = np.eye(3)[np.argmin(c_y + M @ xi)]
        values.append((float(c_x @ xi + c_y @ yi), xi, yi))
    _, x_best, y_best = min(values, key=lambda v: v[0])
    tree_allclose((x, y), (x_best, y_best), atol=0)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="noise"):
        perturbed(onehot_argmin, noise="laplace")
    with pytest.raises(ValueError, match="sigma"):
        perturbed(onehot_argmin, sigma=0.0)
    with pytest.raises(ValueError, match="num_samples"):
        perturbed(onehot_argmin, num_samples=0)
    with pytest.raises(ValueError, match="lambda_"):
        interpolated(onehot_argmin, lambda_=-1.0)
    with pytest.raises(ValueError, match="regularizer"):
        relaxed(regularizer="l1")
    with pytest.raises(ValueError, match="estimator"):
        bilevel(interdiction(3), estimator="relaxed")
    with pytest.raises(ValueError, match="num_items"):
        interdiction(1)
    with pytest.raises(ValueError, match="M has shape"):
        linear_bilevel(jnp.eye(2), jnp.eye(3), jnp.eye(2))
    with pytest.raises(ValueError, match="solution shaped like costs"):
        identity(lambda c: c[:2])(jnp.zeros(3))
    with pytest.raises(TypeError, match="costs must contain floating-point"):
        identity(onehot_argmin)(jnp.arange(3))
    with pytest.raises(TypeError, match="solver\\(costs\\) could not be evaluated"):
        interpolated(lambda c: c @ jnp.ones(4))(jnp.zeros(3))
    with pytest.raises(TypeError, match="key must be a PRNG key"):
        perturbed(onehot_argmin)(jnp.zeros(3), 0)
    with pytest.raises(ValueError, match="c_x and c_y must be vectors"):
        bilevel(interdiction(3))(jnp.zeros(2), jnp.zeros(3))
