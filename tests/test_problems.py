"""The seed problems against their closed forms (ALGORITHMS.md §4.1, §4.5)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

from helpers import tree_allclose


@pytest.mark.parametrize("equation, slope_in, outside", [(16, -10.0, (0.5, -5.0)),
                                                         (17, -4.0, (1.0, -2.0))])
def test_sigd_quadratics_closed_form_hypergradients(equation, slope_in, outside):
    """(16), (17): y* = clip(-x), dF/dx_i = slope_in x_i inside, a x_i + b sign(x_i) outside."""
    prob = bj.problems.sigd_quadratic(equation)
    grad = jax.jit(jax.grad(prob.value))
    for x in ([0.5, -0.3], [2.0, -0.4], [-3.0, 1.5]):
        x = jnp.asarray(x)
        tree_allclose(prob.lower(x).y, jnp.clip(-x, -1, 1), atol=1e-9)
        a, b = outside
        expected = jnp.where(jnp.abs(x) < 1, slope_in * x, a * x + b * jnp.sign(x))
        tree_allclose(grad(x), expected, atol=1e-8)


def test_sigd_14_and_18_lower_levels():
    prob14 = bj.problems.sigd_quadratic(14)
    x = jnp.asarray([0.3, -0.6])
    tree_allclose(prob14.lower(x).y, jnp.clip(-x - jnp.asarray([0.0, 1.0]), -1, 1), atol=1e-9)
    # (18): y* = Proj_Y(-x - 1), the projection onto the polygon, computed as a QP.
    prob18 = bj.problems.sigd_quadratic(18)
    x = jnp.asarray([3.0, 2.5])
    G, h = prob18.ineq(x)
    proj = bj.solve_qp(jnp.eye(2), x + 1.0, G=G, h=h).y
    tree_allclose(prob18.lower(x).y, proj, atol=1e-9)
    assert float(jnp.sum(proj)) == pytest.approx(-5.0)  # the diagonal constraint is active
    e = jnp.asarray([1e-6, 0.0])
    fd = (prob18.value(x + e) - prob18.value(x - e)) / 2e-6
    tree_allclose(jax.grad(prob18.value)(x)[0], fd, rtol=1e-6)


def test_kink_problem():
    prob = bj.problems.kink()
    grad = jax.jit(jax.grad(prob.value))
    tree_allclose(grad(0.5), 1.0, rtol=1e-8)
    tree_allclose(grad(0.9), 2.0, rtol=1e-8)


def test_kornowski_l1_draws_and_hypergradients():
    prob, data = bj.problems.kornowski_l1(seed=1, dim_x=10, dim_y=20)
    assert data["A"].shape == (4, 20) and data["P"].shape == (10, 20)
    L = np.random.RandomState(1).rand(20, 20)  # the first draw
    tree_allclose(data["Q"], L.T @ L + np.eye(20), rtol=1e-14)
    tree_allclose(np.linalg.norm(data["c"]), 1.0)
    _, normal = bj.problems.kornowski_l1(seed=1, dim_x=10, dim_y=20, dist="normal")
    assert np.any(normal["A"] < 0)
    x = prob.x0

    def F_qp(x):
        y = bj.solve_qp(jnp.asarray(data["Q"]), jnp.asarray(data["P"]).T @ x,
                        G=jnp.asarray(data["A"]), h=jnp.asarray(data["b"])).y
        return prob.f(x, y)

    tree_allclose(jax.grad(prob.value)(x), jax.grad(F_qp)(x), atol=1e-9)
    with pytest.raises(ValueError, match="dist must be"):
        bj.problems.kornowski_l1(dist="gamma")
