"""bench/adversarial_digits.py (SIGD adversarial training stand-in) at tiny size.

Checks that every method trains (accuracy far above chance, finite losses) and that the
SSIGD upper gradient through ``argmin``'s masked box rule is the gradient of the
hyperobjective (central differences, float64), plus the Hessian-free Fast-BAT rule against its
closed form (masked box rule, ``H ~ 2 lambda_a I``) and against the exact rule.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax._src.smoothing import perturb_linear

from helpers import load_bench

pytest.importorskip("sklearn")

bench = load_bench("adversarial_digits")


@pytest.fixture(scope="module")
def digits32():
    return bench.load_data(n_train=256, n_test=200, dtype=jnp.float32)


@pytest.fixture(scope="module")
def tiny64():
    """Six examples, an MLP 64-8-10, float64: the finite-difference instance."""
    (x, labels), _ = bench.load_data(n_train=6, n_test=1, dtype=jnp.float64)
    params = bench.init_mlp(jax.random.PRNGKey(0), (64, 8, 10), jnp.float64)
    # Larger first-layer weights so that the cross-entropy has curvature in the input.
    params[0] = (3 * params[0][0], params[0][1])
    q = bench.linear_perturbation(jax.random.PRNGKey(3), x, 0.05)
    y0 = bench.random_start(jax.random.PRNGKey(4), x, 0.1)
    return params, x, labels, q, y0


# PGD-5-1 (compiled once for the three methods).
_evaluate = jax.jit(lambda p, data, eps, key: bench.evaluate(p, data, eps, key, steps=5,
                                                             restarts=1))


@pytest.mark.parametrize("method", ["erm", "at", "trades", "ssigd"])
def test_every_method_trains_above_chance(digits32, method):
    train_data, test_data = digits32
    eps = 0.1

    train = jax.jit(lambda key: bench.train(method, train_data, key, 0.2, eps=eps, epochs=2,
                                            batch=16, lr=1e-2))
    params, losses, ll_steps = train(jax.random.PRNGKey(0))
    sa, ra = _evaluate(params, test_data, eps, jax.random.PRNGKey(1))
    assert losses.shape == (2, 256 // 16)
    assert losses.dtype == jnp.float32 and params[0][0].dtype == jnp.float32
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-1]) < np.mean(losses[0])  # training makes progress
    assert sa > 0.6, f"{method}: clean accuracy {sa} (chance 0.1)"
    assert 0.0 <= ra <= sa
    if method == "ssigd":  # the lower level ran (at most 10 projected-gradient steps)
        assert 1 <= np.min(ll_steps) and np.max(ll_steps) <= 10
    if method in ("at", "trades"):  # robust beyond a clean model's level
        assert ra > 0.2


EPS = 0.1


@pytest.fixture(scope="module")
def tiny_fns(tiny64):
    """Jitted ``(value, (y*, info)), grad`` of the hyperobjective; lam_a traced (one compile
    per rule), lower level solved to 1e-13."""
    _, x, labels, q, y0 = tiny64

    def value(p, lam, rule):
        return bench.ssigd_objective(p, x, labels, q, y0, eps=EPS, lam=lam, inner_steps=20000,
                                     rule=rule, tol=1e-13)

    return jax.jit(jax.value_and_grad(value, has_aux=True), static_argnums=2)


def _central_difference(fun, params, index, h=1e-5):
    layer, which, pos = index

    def shifted(s):
        p = [list(a) for a in params]
        p[layer][which] = p[layer][which].at[pos].add(s)
        return [tuple(a) for a in p]

    return (fun(shifted(h)) - fun(shifted(-h))) / (2 * h)


INDICES = [(0, 0, (10, 3)), (0, 1, (5,)), (1, 0, (2, 7)), (1, 1, (4,))]


def test_ssigd_hypergradient_matches_finite_differences(tiny64, tiny_fns):
    """Exact masked rule (lambda_a = 2: g strongly convex in y) vs central differences."""
    params, x, labels, _, _ = tiny64
    lam = 2.0
    (_, (y, info)), g = tiny_fns(params, lam, "exact")
    # The lower level must have free and active coordinates for the check to mean anything.
    lo, hi = bench.box_bounds(x, EPS)
    assert info.status == 0
    free = (y > lo) & (y < hi)
    assert 0 < int(free.sum()) < free.size
    for layer, which, pos in INDICES:
        fd = _central_difference(lambda p: tiny_fns(p, lam, "exact")[0][0], params,
                                 (layer, which, pos))
        # h = 1e-5 with a lower level solved to 1e-13: truncation ~1e-10, rounding ~1e-11.
        np.testing.assert_allclose(g[layer][which][pos], fd, rtol=1e-6, atol=1e-9)
    # The implicit term is not negligible: the gradient with y* frozen differs.
    frozen = jax.grad(lambda p: jnp.mean(bench.cross_entropy(p, x + y, labels)))(params)
    implicit = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(frozen), strict=True))
    assert implicit > 1e-3


def _flat(tree):
    return jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(tree)])


def test_fastbat_rule_is_the_masked_closed_form_and_approaches_the_exact_rule(tiny64,
                                                                               tiny_fns):
    """Fast-BAT rule == grad_w CE + (1/(2 lam)) (d/dw grad_y CE)^T (m v) (the masked
    box rule with H ~ 2 lam I); it tends to the exact rule as lam grows (the neglected curvature
    of CE is O(1/lam) of H)."""
    params, x, labels, _, _ = tiny64
    lo, hi = bench.box_bounds(x, EPS)

    @jax.jit
    def closed_form(p, y, lam):
        m = ((y > lo) & (y < hi)).astype(y.dtype)
        v = jax.grad(lambda yy: jnp.mean(bench.cross_entropy(p, x + yy, labels)))(y)

        def surrogate(p_):
            grad_y = jax.grad(lambda yy: jnp.sum(bench.cross_entropy(p_, x + yy, labels)))(y)
            return (jnp.mean(bench.cross_entropy(p_, x + y, labels))
                    + jnp.vdot(grad_y, m * v) / (2 * lam))

        return jax.grad(surrogate)(p)

    errors = []
    for lam in (2.0, 8.0):
        (_, (y, _)), g_fast = tiny_fns(params, lam, "fastbat")
        (_, (y_exact, _)), g_exact = tiny_fns(params, lam, "exact")
        np.testing.assert_allclose(y, y_exact, atol=1e-10)  # same lower-level solution
        np.testing.assert_allclose(_flat(g_fast), _flat(closed_form(params, y, lam)),
                                   rtol=1e-8, atol=1e-11)
        errors.append(float(jnp.linalg.norm(_flat(g_fast) - _flat(g_exact))
                            / jnp.linalg.norm(_flat(g_exact))))
    # Agreement with the exact rule improves as lam_a grows (roughly like 1/lam).
    assert errors[1] < errors[0] / 2, errors
    assert errors[1] < 0.05, errors


def test_per_example_perturbation_is_perturb_linear(tiny64):
    """The script's q (one per training example, drawn once) is bj.perturb_linear's q."""
    params, x, labels, _, y0 = tiny64
    key, sigma = jax.random.PRNGKey(7), 0.3
    q = bench.linear_perturbation(key, x, sigma)
    ours = bench.lower_level(x, labels, q, lam=0.3)
    g_q = perturb_linear(bench.lower_level(x, labels, jnp.zeros_like(x), lam=0.3), key, sigma)
    plain = bench.lower_level(x, labels, jnp.zeros_like(x), lam=0.3)
    np.testing.assert_allclose(jax.jit(ours)(y0, params), jax.jit(g_q)(y0, params), rtol=1e-12)
    # grad_y differs from the unperturbed one by exactly q, example by example.
    np.testing.assert_allclose(jax.jit(jax.grad(g_q))(y0, params)
                               - jax.jit(jax.grad(plain))(y0, params), q, atol=1e-12)
    assert 0.2 < float(jnp.std(q)) < 0.4


def test_per_example_vmap_recipe_isolates_a_bad_example(tiny64, tiny_fns):
    """bench.per_example_exact_grad (vmap over examples, own solve/CG/status each): with all
    examples good it equals the batch-wide exact rule; with a NaN in example 0 the batch-wide
    gradient is NaN everywhere while the recipe drops example 0 only and returns the gradient
    of the other five."""
    params, x, labels, q, y0 = tiny64
    lam = 2.0
    kw = dict(eps=EPS, lam=lam, inner_steps=20000, tol=1e-13)
    recipe = jax.jit(lambda x, labels, q, y0: bench.per_example_exact_grad(
        params, x, labels, q, y0, **kw))
    value, grads, ok = recipe(x, labels, q, y0)
    (batch_value, _), batch_grads = tiny_fns(params, lam, "exact")
    assert bool(jnp.all(ok))
    np.testing.assert_allclose(value, batch_value, rtol=1e-10)
    np.testing.assert_allclose(_flat(grads), _flat(batch_grads), rtol=1e-7, atol=1e-10)

    bad = x.at[0, 5].set(jnp.nan)
    _, batch_bad = jax.jit(jax.value_and_grad(lambda p: bench.ssigd_objective(
        p, bad, labels, q, y0, rule="exact", **kw)[0]))(params)
    assert not np.any(np.isfinite(np.asarray(_flat(batch_bad))))
    value, grads, ok = recipe(bad, labels, q, y0)
    np.testing.assert_array_equal(np.asarray(ok), [False] + [True] * 5)
    value5, grads5, _ = recipe(x[1:], labels[1:], q[1:], y0[1:])
    np.testing.assert_allclose(value, value5, rtol=1e-12)
    np.testing.assert_allclose(_flat(grads), _flat(grads5), rtol=1e-12, atol=1e-14)


def test_public_linear_perturbation():
    """bj.linear_perturbation (public) is the draw of bj.perturb_linear and of the script."""
    import bilevel_jax as bj

    assert bench.linear_perturbation is bj.linear_perturbation
    y = jnp.zeros((500, 64))
    q = bj.linear_perturbation(jax.random.PRNGKey(0), y, 0.1)
    assert q.shape == y.shape and 0.095 < float(jnp.std(q)) < 0.105
    g_q = bj.perturb_linear(lambda y, t: 0.0 * jnp.sum(y), jax.random.PRNGKey(0), 0.1)
    np.testing.assert_allclose(jax.grad(g_q)(y, None), q, rtol=1e-12)
    keys = jax.random.split(jax.random.PRNGKey(1), 4)
    qs = jax.vmap(lambda k, y: bj.linear_perturbation(k, y, 2.0, "sphere"))(keys, y[:4])
    np.testing.assert_allclose(jnp.linalg.norm(qs, axis=1), 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="distribution"):
        bj.linear_perturbation(keys[0], y, 1.0, "uniform")


def test_findings_report_each_claim():
    """The claim checker on synthetic results: monotone trends pass, reversed ones fail."""

    def rows(sa, ra, clean_ra=5.0, at=(90.0, 40.0)):
        def r(kind, s, a, s2=None):
            return dict(kind=kind, sa=np.full(3, s), ra=np.full(3, a), sigma2=s2, name=kind)

        out = [r("clean", 97.0, clean_ra), r("AT", *at)]
        out += [r("sweep", s, a, 0.02 * i) for i, (s, a) in enumerate(zip(sa, ra, strict=True))]
        return out

    good = bench.findings({0.2: rows([90.0, 90.2, 91, 92], [40.5, 40.2, 38, 35])})[0]
    assert good.count("holds") == 2 and "rises" in good and "falls" in good
    bad = bench.findings({0.2: rows([90.0, 95, 89, 88], [40.0, 30, 41, 42], clean_ra=39.0)})[0]
    assert bad.count("does NOT") == 4
