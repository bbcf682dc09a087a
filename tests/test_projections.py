"""Tests of the projections (docs lower/minimax.md): brute force, KKT and variational checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bilevel_jax._src.projections import (
    Affine,
    Ball,
    Box,
    Halfspace,
    NonNegative,
    Simplex,
    check_set,
    project,
)

from helpers import tree_allclose

RNG = np.random.default_rng(0)
N = 6


def _sets():
    a = RNG.standard_normal(N)
    A = RNG.standard_normal((2, N))
    return {
        "box": Box(-0.5 * np.ones(N), np.array([0.3, 1.0, np.inf, 0.0, 2.0, np.inf])),
        "nonneg": NonNegative(),
        "simplex": Simplex(1.0),
        "budget": Simplex(2.5),
        "ball": Ball(0.7, center=RNG.standard_normal(N) * 0.1),
        "halfspace": Halfspace(a, 0.3),
        "affine": Affine(A, RNG.standard_normal(2)),
    }


SETS = _sets()


def _feasible_points(s, count=20):
    """Random points of the set (to test the variational inequality)."""
    z = RNG.standard_normal((count, N)) * 3
    return np.asarray(jax.vmap(s.project)(jnp.asarray(z)))


@pytest.mark.parametrize("name", sorted(SETS))
def test_projection_characterisation(name):
    """P(z) is in the set, P(P(z)) = P(z), <z - P(z), y - P(z)> <= 0 for every y in the set
    (the variational characterisation of the Euclidean projection) and P is nonexpansive."""
    s = SETS[name]
    proj = jax.jit(jax.vmap(s.project))
    z = jnp.asarray(RNG.standard_normal((30, N)) * 2)
    p = proj(z)
    tree_allclose(proj(p), p, atol=1e-12)
    ys = _feasible_points(s)
    for zi, pi in zip(np.asarray(z), np.asarray(p), strict=True):
        assert np.all((ys - pi) @ (zi - pi) <= 1e-10)
    diffs = np.linalg.norm(np.asarray(p)[:, None] - np.asarray(p)[None], axis=-1)
    dists = np.linalg.norm(np.asarray(z)[:, None] - np.asarray(z)[None], axis=-1)
    assert np.all(diffs <= dists + 1e-12)


def test_box_and_nonnegative_brute_force_and_infinite_bounds():
    z = jnp.asarray(RNG.standard_normal((10, N)) * 2)
    box = SETS["box"]
    expected = np.clip(np.asarray(z), box.lo, box.hi)
    free = Box(-jnp.inf, jnp.inf)
    tie = Box(0.0, 1.0)

    @jax.jit
    def run(z):
        return (
            jax.vmap(box.project)(z),
            NonNegative().project(z),
            free.project(z),
            jax.jacobian(free.project)(z[0]),
            jax.vmap(jax.grad(tie.project))(jnp.asarray([0.0, -0.1, 1.0, 1.1])),
        )

    boxed, nonneg, same, jac, ties = run(z)
    tree_allclose(boxed, expected)
    tree_allclose(nonneg, np.maximum(np.asarray(z), 0))
    # All-infinite bounds: identity, no NaN, and a clean unit Jacobian.
    tree_allclose(same, z)
    tree_allclose(jac, np.eye(N))
    # A tie (z exactly on a bound) has derivative exactly 1 (treated inactive), never 1/2.
    np.testing.assert_array_equal(ties, [1.0, 0.0, 1.0, 0.0])


def _simplex_brute_force(z, total):
    """Projection onto the simplex by enumerating supports (exact KKT solution)."""
    n = z.shape[0]
    best = None
    for mask in range(1, 2**n):
        S = np.array([(mask >> i) & 1 for i in range(n)], bool)
        tau = (z[S].sum() - total) / S.sum()
        x = np.where(S, z - tau, 0.0)
        if np.all(x[S] >= -1e-14) and np.all(z[~S] <= tau + 1e-14):
            d = np.linalg.norm(x - z)
            if best is None or d < best[0]:
                best = (d, x)
    return best[1]


@pytest.mark.parametrize("total", [1.0, 2.5])
def test_simplex_against_support_enumeration(total):
    s = Simplex(total)
    zs = RNG.standard_normal((10, N)) * 2
    out = jax.jit(jax.vmap(s.project))(jnp.asarray(zs))
    for z, o in zip(zs, np.asarray(out), strict=True):
        tree_allclose(o, _simplex_brute_force(z, total), atol=1e-12)
    # Ties and a 2-D input (projected as a flattened vector, shape kept).
    tree_allclose(jax.jit(s.project)(jnp.ones(4)), np.full(4, total / 4))
    zm = jnp.asarray(RNG.standard_normal((2, 3)))
    out = jax.jit(s.project)(zm)
    assert out.shape == (2, 3)
    tree_allclose(out.ravel(), _simplex_brute_force(np.asarray(zm).ravel(), total), atol=1e-12)


def test_simplex_jacobian_is_the_tangent_projector():
    z = jnp.asarray([0.9, 0.2, -1.0, 0.6, 0.05])
    x, jac = jax.jit(lambda z: (Simplex().project(z), jax.jacobian(Simplex().project)(z)))(z)
    S = np.asarray(x) > 0
    expected = np.diag(S.astype(float)) - np.outer(S, S) / S.sum()
    tree_allclose(jac, expected)


def test_ball_halfspace_affine_closed_forms():
    z = jnp.asarray(RNG.standard_normal(N) * 3)
    ball = SETS["ball"]
    d = np.asarray(z) - ball.center
    tree_allclose(ball.project(z), ball.center + d * min(1.0, ball.radius / np.linalg.norm(d)))
    inside = jnp.asarray(ball.center) + 0.01
    tree_allclose(ball.project(inside), inside)
    hs = SETS["halfspace"]
    out = np.asarray(hs.project(z))
    viol = hs.a @ np.asarray(z) - hs.b
    expected = np.asarray(z) - max(viol, 0) * hs.a / (hs.a @ hs.a)
    tree_allclose(out, expected)
    aff = SETS["affine"]
    x = np.asarray(aff.project(z))
    tree_allclose(aff.A @ x, aff.b)
    # z - x lies in range(A^T): its component in null(A) vanishes.
    null = np.linalg.svd(aff.A)[2][2:]
    tree_allclose(null @ (np.asarray(z) - x), np.zeros(N - 2), atol=1e-12)


def test_traced_set_data_jit_vmap_and_gradient():
    """Set data are pytree leaves: batched bounds, and the gradient of P(z) w.r.t. a bound."""
    z = jnp.asarray([-2.0, 0.5, 3.0])
    his = jnp.asarray([1.0, 2.0, 4.0])
    out = jax.jit(jax.vmap(lambda hi: Box(0.0, hi).project(z)))(his)
    tree_allclose(out, np.stack([np.clip(np.asarray(z), 0, h) for h in np.asarray(his)]))
    # d/d hi of sum(clip(z, 0, hi)) = number of entries clipped at hi.
    grads = jax.jit(lambda t: (
        jax.grad(lambda hi: jnp.sum(Box(0.0, hi).project(z)))(t),
        jax.grad(lambda r: jnp.sum(Ball(r).project(jnp.asarray([3.0, 4.0]))))(t),
        jax.grad(lambda b: Simplex(b).project(jnp.asarray([1.0, 0.0, 0.5]))[0])(t),
    ))(1.0)
    assert float(grads[0]) == 1.0
    tree_allclose(grads[1], 7.0 / 5.0)
    tree_allclose(grads[2], 0.5)  # support {0, 2}: each entry moves by dt / 2


def test_float32_in_float32_out():
    z = jnp.asarray(RNG.standard_normal(N), jnp.float32)
    outs = jax.jit(lambda z: [s.project(z) for s in SETS.values()])(z)
    for out in outs:
        assert out.dtype == jnp.float32


def test_product_sets_on_pytrees():
    tree = {"a": jnp.asarray([2.0, -1.0]), "b": (jnp.asarray([0.5, 0.5, 1.0]), jnp.ones((2, 2)))}
    sets = {"a": Box(0.0, 1.0), "b": (Simplex(), None)}
    out = project(sets, tree)
    tree_allclose(out["a"], np.asarray([1.0, 0.0]))
    tree_allclose(out["b"][0], _simplex_brute_force(np.asarray([0.5, 0.5, 1.0]), 1.0))
    tree_allclose(out["b"][1], np.ones((2, 2)))
    # One set for a whole multi-leaf pytree acts on the flattened vector.
    out = project(Ball(1.0), (jnp.asarray([3.0]), jnp.asarray([4.0])))
    tree_allclose(out, (np.asarray([0.6]), np.asarray([0.8])))
    assert project(None, tree) is tree


def test_bad_sets_are_named():
    u0 = jnp.ones(4)
    check_set(Box(jnp.zeros(4), 1.0), u0, "u_set", "u0")  # fine
    with pytest.raises(ValueError, match=r"u_set: Box.project cannot be applied to u0"):
        check_set(Box(jnp.zeros(3), 1.0), u0, "u_set", "u0")
    with pytest.raises(ValueError, match=r"v_set: Box.project maps v0 of shape \(4,\)"):
        check_set(Box(jnp.zeros((4, 4)), 1.0), u0, "v_set", "v0")
    with pytest.raises(TypeError, match="not a prefix of the structure of u0"):
        check_set((Box(), None, None), (u0, u0), "u_set", "u0")
    with pytest.raises(TypeError, match="got an entry of type str"):
        check_set(("box", None), (u0, u0), "u_set", "u0")
    with pytest.raises(ValueError, match="Halfspace.project cannot be applied"):
        check_set(Halfspace(jnp.ones(3), 0.0), u0, "u_set", "u0")
