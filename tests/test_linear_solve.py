"""Tests for bilevel_jax._src.linear_solve.

Compilation dominates the run time (the Krylov solvers are ``lax.while_loop`` s), so most
tests go through a few cached ``jax.jit`` helpers whose options (ridge, tol, max_iter, x0)
are traced arguments: each solver is compiled once per shape/dtype and reused. Eager
execution is covered by the ``maybe_jit`` tests.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as spla

from bilevel_jax._src import linear_solve as ls

N = 12  # small systems (linear_solve tests)
NL = 40  # larger systems (direct calls of the iterative solvers)


def _orthogonal(n, rng):
    q, r = np.linalg.qr(rng.standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def make_spd(n=N, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, n))
    return a @ a.T + n * np.eye(n)


def make_symmetric_indefinite(n=N, seed=1):
    rng = np.random.default_rng(seed)
    q = _orthogonal(n, rng)
    mags = rng.uniform(1.0, 4.0, n)
    signs = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)
    return q @ np.diag(signs * mags) @ q.T


def make_general(n=N, seed=2):
    rng = np.random.default_rng(seed)
    return n * np.eye(n) + rng.standard_normal((n, n))


def make_well_conditioned_spd(n=N, seed=3, lo=1.0, hi=3.0):
    rng = np.random.default_rng(seed)
    q = _orthogonal(n, rng)
    return q @ np.diag(np.linspace(lo, hi, n)) @ q.T


def make_neumann_matrix(n=N, seed=3):
    """SPD with spectrum in [0.5, 1.5], so the step-1 Neumann series converges (rate 1/2)."""
    return make_well_conditioned_spd(n, seed, lo=0.5, hi=1.5)


def make_singular_symmetric(n, rank, indefinite, seed):
    rng = np.random.default_rng(seed)
    q = _orthogonal(n, rng)
    eig = rng.uniform(0.5, 3.0, rank)
    if indefinite:
        eig[::2] *= -1
    return q @ np.diag(np.r_[eig, np.zeros(n - rank)]) @ q.T


def make_rhs(n=N, seed=10):
    return np.random.default_rng(seed).standard_normal(n)


MAKERS = {"spd": make_spd, "symmetric": make_symmetric_indefinite, "general": make_general}
ALL = tuple(MAKERS)
SUPPORTED = {
    "dense": ALL,
    "lu": ALL,
    "cholesky": ("spd",),
    "cg": ("spd",),
    "minres": ("spd", "symmetric"),
    "gmres": ALL,
    "normal_cg": ALL,
}
CASES = [
    (method, structure) for method, structures in SUPPORTED.items() for structure in structures
]
ITERATIVE = {
    "cg": ls.solve_cg,
    "minres": ls.solve_minres,
    "gmres": ls.solve_gmres,
    "normal_cg": ls.solve_normal_cg,
}
ITERATIVE_CASES = [(m, s) for m, s in CASES if m in ITERATIVE]
ALL_CASES = CASES + [("neumann", "spd")]


def mv(matrix):
    matrix = jnp.asarray(matrix)
    return lambda v: matrix @ v


def rel_err(x, ref):
    x = np.asarray(x, dtype=np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def matrix_for(method, structure, n=N, seed=None):
    if method == "neumann":
        return make_neumann_matrix(n, *(() if seed is None else (seed,)))
    return MAKERS[structure](n, *(() if seed is None else (seed,)))


def _structure_key(method, structure):
    # Only "auto" and "dense" depend on `structure`: share the compiled solver otherwise.
    return structure if method in ("auto", "dense") else "spd"


@functools.cache
def _linear_solve_fn(method, structure):
    def run(m, b, ridge):
        return ls.linear_solve(mv(m), b, method=method, structure=structure, ridge=ridge).x

    return jax.jit(run)


def solve(method, structure, m, b, ridge=0.0):
    """Jitted ``linear_solve`` (traced ridge), compiled once per method and shape."""
    return _linear_solve_fn(method, _structure_key(method, structure))(m, b, ridge)


@functools.cache
def _iterative_fn(method):
    def run(m, b, x0, tol, max_iter):
        return ITERATIVE[method](mv(m), b, x0=x0, tol=tol, max_iter=max_iter).x

    return jax.jit(run)


def iterate(method, m, b, x0=None, tol=None, max_iter=None):
    """Jitted direct call of an iterative solver with traced x0 / tol / max_iter."""
    b = np.asarray(b)
    x0 = np.zeros_like(b) if x0 is None else x0
    tol = ls.default_tol(b.dtype) if tol is None else tol
    max_iter = ls.default_max_iter(b.shape[0]) if max_iter is None else max_iter
    return _iterative_fn(method)(m, b, x0, tol, max_iter)


# --------------------------------------------------------------------------------------
# materialize
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("structure", ALL)
def test_materialize_equals_matrix(structure, maybe_jit):
    a = MAKERS[structure]()
    out = maybe_jit(lambda m: ls.materialize(mv(m), N, jnp.float64))(a)
    assert out.shape == (N, N) and out.dtype == jnp.float64
    np.testing.assert_allclose(out, a, rtol=0, atol=1e-13)


def test_materialize_dtype_and_jvp_matvec():
    def f(x):
        return jnp.tanh(x) * jnp.sum(x**2) + jnp.roll(x, 1)

    x = jnp.linspace(-1.0, 1.0, 7)
    out = ls.materialize(lambda t: jax.jvp(f, (x,), (t,))[1], 7, jnp.float64)
    np.testing.assert_allclose(out, jax.jacfwd(f)(x), rtol=1e-12, atol=1e-12)
    out32 = ls.materialize(mv(make_spd(5).astype(np.float32)), 5, jnp.float32)
    assert out32.dtype == jnp.float32


# --------------------------------------------------------------------------------------
# Accuracy against numpy, eager and jit
# --------------------------------------------------------------------------------------

REPRESENTATIVE = [
    ("auto", "general"),
    ("dense", "symmetric"),
    ("cholesky", "spd"),
    ("lu", "general"),
    ("cg", "spd"),
    ("minres", "symmetric"),
    ("gmres", "general"),
    ("normal_cg", "general"),
    ("neumann", "spd"),
]


@pytest.mark.parametrize(("method", "structure"), REPRESENTATIVE)
def test_linear_solve_defaults_eager_and_jit(method, structure, maybe_jit):
    a, b = matrix_for(method, structure), make_rhs()
    run = maybe_jit(
        lambda m, rhs: ls.linear_solve(mv(m), rhs, method=method, structure=structure).x
    )
    x = run(a, b)
    assert x.shape == (N,) and x.dtype == jnp.float64
    assert rel_err(x, np.linalg.solve(a, b)) < 1e-9


@pytest.mark.parametrize(("method", "structure"), ALL_CASES)
def test_linear_solve_matches_numpy_with_ridge(method, structure):
    a, b = matrix_for(method, structure), make_rhs()
    for ridge in (0.0, 0.2 if method == "neumann" else 0.7):  # Neumann: keep rho(I - A) < 1
        ref = np.linalg.solve(a + ridge * np.eye(N), b)
        x = solve(method, structure, a, b, ridge)
        assert x.dtype == jnp.float64
        assert rel_err(x, ref) < 1e-9, ridge


@pytest.mark.parametrize(("method", "structure"), ITERATIVE_CASES)
def test_iterative_larger_n_with_x0(method, structure):
    a, b = MAKERS[structure](NL, seed=7), make_rhs(NL, seed=8)
    ref = np.linalg.solve(a, b)
    x0 = np.random.default_rng(9).standard_normal(NL)
    for start in (None, x0, ref + 1e-3 * x0, ref):
        assert rel_err(iterate(method, a, b, x0=start), ref) < 1e-9


@pytest.mark.parametrize("structure", ALL)
def test_dense_structures(structure):
    a, b = MAKERS[structure](), make_rhs()
    ref = np.linalg.solve(a, b)
    assert rel_err(ls.solve_dense(mv(a), b, structure=structure).x, ref) < 1e-12
    assert rel_err(ls.solve_dense(mv(a), b, structure="general").x, ref) < 1e-12
    if structure == "symmetric":  # Cholesky of an indefinite matrix: NaN, not an exception
        assert np.isnan(ls.solve_dense(mv(a), b, structure="spd").x).any()


@pytest.mark.parametrize("structure", ALL)
def test_auto_small_n(structure, maybe_jit):
    a, b = MAKERS[structure](), make_rhs()
    x = maybe_jit(lambda m, rhs: ls.linear_solve(mv(m), rhs, structure=structure).x)(a, b)
    assert rel_err(x, np.linalg.solve(a, b)) < 1e-12


@pytest.mark.parametrize(
    ("structure", "primitive"), [("spd", "cholesky"), ("symmetric", "lu"), ("general", "lu")]
)
def test_auto_dispatch(structure, primitive, monkeypatch):
    a, b = MAKERS[structure](), make_rhs()

    def primitives():
        jaxpr = jax.make_jaxpr(lambda r: ls.linear_solve(mv(a), r, structure=structure))(b)
        return set(re.findall(r"= ([a-z_]+)\b", str(jaxpr)))

    assert ls.DENSE_MAX_SIZE >= 100
    small = primitives()
    assert primitive in small and "while" not in small
    monkeypatch.setattr(ls, "DENSE_MAX_SIZE", N - 1)
    large = primitives()
    assert "while" in large and primitive not in large


def test_ridge_regularises_singular_system():
    a = make_singular_symmetric(N, N - 3, False, seed=4)
    b = make_rhs()
    ref = np.linalg.solve(a + 1e-2 * np.eye(N), b)
    for method in ("cg", "minres", "gmres", "dense", "cholesky"):
        assert rel_err(solve(method, "spd", a, b, 1e-2), ref) < 1e-9


# --------------------------------------------------------------------------------------
# Neumann series
# --------------------------------------------------------------------------------------


@functools.cache
def _neumann_fn():
    def run(m, b, step, num_terms, ridge):
        return ls.solve_neumann(mv(m), b, step=step, num_terms=num_terms, ridge=ridge).x

    return jax.jit(run)


def test_neumann_converges_with_step_one_over_lambda_max():
    a, b = make_well_conditioned_spd(), make_rhs()
    step = 1.0 / np.linalg.eigvalsh(a).max()  # spectrum of I - step A in [0, 2/3]
    x = _neumann_fn()(a, b, step, 200, 0.0)
    assert rel_err(x, np.linalg.solve(a, b)) < 1e-8
    x = _neumann_fn()(a, b, step, 200, 0.5)
    assert rel_err(x, np.linalg.solve(a + 0.5 * np.eye(N), b)) < 1e-8


def test_neumann_error_decays_and_matches_series():
    a, b = make_well_conditioned_spd(), make_rhs()
    step = 1.0 / np.linalg.eigvalsh(a).max()
    ref = np.linalg.solve(a, b)
    errors = [rel_err(_neumann_fn()(a, b, step, t, 0.0), ref) for t in (1, 5, 10, 20, 40)]
    assert all(e2 < 0.5 * e1 for e1, e2 in zip(errors, errors[1:], strict=False))
    # Exact truncated series, and the predicted error (I - step A)^T A^{-1} b.
    t = 7
    iteration = np.eye(N) - step * a
    series = step * sum(np.linalg.matrix_power(iteration, k) @ b for k in range(t))
    x = _neumann_fn()(a, b, step, t, 0.0)
    np.testing.assert_allclose(x, series, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref - x, np.linalg.matrix_power(iteration, t) @ ref, atol=1e-12)
    np.testing.assert_array_equal(_neumann_fn()(a, b, step, 0, 0.0), np.zeros(N))
    np.testing.assert_array_equal(ls.solve_neumann(mv(a), b, num_terms=0).x, np.zeros(N))
    np.testing.assert_allclose(_neumann_fn()(a, b, 0.3, 1, 0.0), 0.3 * b, rtol=1e-15)


# --------------------------------------------------------------------------------------
# MINRES
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [make_spd, make_symmetric_indefinite])
def test_minres_iterates_match_scipy(make):
    a, b = make(NL, seed=11), make_rhs(NL, seed=12)
    residuals = []
    for k in (1, 2, 3, 5, 8, 13, 21):
        x = iterate("minres", a, b, tol=1e-30, max_iter=k)
        ref, _ = spla.minres(a, b, maxiter=k, rtol=1e-30)
        np.testing.assert_allclose(x, ref, rtol=1e-10, atol=1e-10)
        residuals.append(np.linalg.norm(a @ np.asarray(x) - b))
    # MINRES minimises the residual over nested Krylov spaces: non-increasing.
    assert all(r2 <= r1 * (1 + 1e-12) for r1, r2 in zip(residuals, residuals[1:], strict=False))


@pytest.mark.parametrize("indefinite", [False, True])
def test_minres_singular_consistent_is_min_norm(indefinite):
    a = make_singular_symmetric(NL, 30, indefinite, seed=21)
    pinv = np.linalg.pinv(a)
    b = a @ pinv @ make_rhs(NL, seed=22)  # projected onto range(A): consistent
    x = iterate("minres", a, b)
    assert np.linalg.norm(a @ np.asarray(x) - b) < 1e-10 * np.linalg.norm(b)
    min_norm = pinv @ b
    assert rel_err(x, min_norm) < 1e-9
    # From x0, the null-space component of x0 is kept: x = P_null x0 + A^+ b.
    x0 = make_rhs(NL, seed=23)
    x = iterate("minres", a, b, x0=x0)
    assert rel_err(x, x0 - pinv @ a @ x0 + min_norm) < 1e-9


def test_minres_singular_consistent_small_eager(maybe_jit):
    a = make_singular_symmetric(N, 8, True, seed=24)
    b = a @ make_rhs()
    x = maybe_jit(lambda m, rhs: ls.linear_solve(mv(m), rhs, method="minres").x)(a, b)
    assert rel_err(x, np.linalg.pinv(a) @ b) < 1e-9


def test_singular_inconsistent_systems():
    a = make_singular_symmetric(NL, 31, True, seed=31)
    b = make_rhs(NL, seed=32)  # has a null-space component: inconsistent
    lsq = np.linalg.pinv(a) @ b
    # MINRES with a moderate tol stops at a least-squares solution (with tol=1e-12 its
    # iterates may diverge past it, as SciPy's do: documented limitation).
    x = np.asarray(iterate("minres", a, b, tol=1e-8))
    assert np.all(np.isfinite(x))
    assert np.linalg.norm(a @ (a @ x - b)) < 1e-6 * np.linalg.norm(b)
    np.testing.assert_allclose(np.linalg.norm(a @ x - b), np.linalg.norm(a @ lsq - b), rtol=1e-9)
    # GMRES is meant for nonsingular systems, but must not blow up.
    x = np.asarray(iterate("gmres", a, b))
    assert np.all(np.isfinite(x)) and np.linalg.norm(a @ x - b) <= np.linalg.norm(b)
    # CGLS converges to the minimum-norm least-squares solution.
    assert rel_err(iterate("normal_cg", a, b), lsq) < 1e-8


def test_minres_eigenvector_rhs_and_scale_of_matrix():
    a = make_symmetric_indefinite(NL, seed=33)
    w, v = np.linalg.eigh(a)
    x = iterate("minres", a, v[:, 2])  # Krylov space of dimension 1
    np.testing.assert_allclose(x, v[:, 2] / w[2], rtol=1e-12, atol=1e-13)
    b = make_rhs(NL)
    for scale in (1e-150, 1e-12, 1e10, 1e150):  # the stopping rules are invariant to the scale of M
        x = iterate("minres", scale * a, b)
        assert rel_err(np.asarray(x) * scale, np.linalg.solve(a, b)) < 1e-9


# --------------------------------------------------------------------------------------
# CG / GMRES / normal CG specifics
# --------------------------------------------------------------------------------------


def test_cg_one_iteration_is_steepest_descent():
    a, b = make_spd(NL), make_rhs(NL)
    alpha = (b @ b) / (b @ a @ b)
    np.testing.assert_allclose(iterate("cg", a, b, max_iter=1), alpha * b, rtol=1e-12)


@pytest.mark.parametrize("method", list(ITERATIVE))
def test_tol_is_relative_residual(method):
    a = make_spd(NL, seed=41) if method in ("cg", "minres") else make_general(NL, seed=41)
    b = make_rhs(NL, seed=42)
    residuals = []
    for tol in (1e-2, 1e-6, 1e-10):
        x = np.asarray(iterate(method, a, b, tol=tol))
        residuals.append(np.linalg.norm(a @ x - b) / np.linalg.norm(b))
        assert residuals[-1] <= 1.01 * tol
    assert residuals[0] > 1e-10  # a loose tolerance really stops early


def test_gmres_restarts():
    a, b = make_general(NL, seed=51), make_rhs(NL, seed=52)
    x = ls.solve_gmres(mv(a), b, restart=7).x  # several cycles, budget not a multiple of 7
    assert rel_err(x, np.linalg.solve(a, b)) < 1e-9
    # A tiny budget stops early but still improves on x0 = 0.
    x = np.asarray(iterate("gmres", a, b, max_iter=2))
    assert 0 < np.linalg.norm(a @ x - b) < np.linalg.norm(b)


def test_matrix_free_jvp_and_vjp_matvecs():
    weight = jnp.asarray(make_general(N, seed=61))

    def residual_map(z):
        return weight @ z + 0.3 * jnp.sin(z) + 0.1 * jnp.roll(z, 1) ** 2

    z, b = jnp.asarray(make_rhs(N, seed=62)), make_rhs()
    jac = np.asarray(jax.jacfwd(residual_map)(z))

    @jax.jit
    def solves(z, rhs):
        def jvp(t):
            return jax.jvp(residual_map, (z,), (t,))[1]

        _, vjp = jax.vjp(residual_map, z)
        return (
            ls.linear_solve(jvp, rhs, method="gmres").x,
            ls.linear_solve(jvp, rhs, method="normal_cg").x,  # transposes a JVP
            ls.linear_solve(jvp, rhs, method="lu").x,
            ls.linear_solve(lambda t: vjp(t)[0], rhs, method="normal_cg").x,  # transposes a VJP
        )

    x_gmres, x_ncg, x_lu, x_t = solves(z, b)
    for x in (x_gmres, x_ncg, x_lu):
        assert rel_err(x, np.linalg.solve(jac, b)) < 1e-9
    assert rel_err(x_t, np.linalg.solve(jac.T, b)) < 1e-9


@pytest.mark.parametrize("method", list(ITERATIVE))
def test_scale_invariance(method):
    a = make_spd(NL) if method in ("cg", "minres") else make_general(NL)
    b = make_rhs(NL)
    ref = np.linalg.solve(a, b)
    for scale in (1e-200, 1e-30, 1e30, 1e200):  # right-hand side
        x = np.asarray(iterate(method, a, scale * b))
        assert np.all(np.isfinite(x))
        assert rel_err(x / scale, ref) < 1e-9
    for scale in (1e-100, 1e-20, 1e20, 1e100):  # operator
        x = np.asarray(iterate(method, scale * a, b))
        assert rel_err(x * scale, ref) < 1e-9


# --------------------------------------------------------------------------------------
# Zero right-hand side
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ls.METHODS)
def test_zero_rhs(method):
    zero = np.zeros(N)
    singular = make_singular_symmetric(N, N - 4, False, seed=71)
    for m in (make_spd(), singular, np.zeros((N, N))):  # incl. 0 * inf for dense solves
        x = solve(method, "spd", m, zero)
        assert x.dtype == jnp.float64
        np.testing.assert_array_equal(x, zero)


@pytest.mark.parametrize("method", list(ITERATIVE))
def test_zero_rhs_with_x0(method):
    x = iterate(method, make_spd(NL), np.zeros(NL), x0=np.ones(NL))
    np.testing.assert_array_equal(x, np.zeros(NL))


def test_zero_rhs_factorized_and_float32():
    f = ls.factorize(np.zeros((N, N)))  # singular: the factors contain inf/nan
    np.testing.assert_array_equal(ls.solve_factorized(f, np.zeros(N)), np.zeros(N))
    a = make_spd().astype(np.float32)
    for method in ITERATIVE:
        x = solve(method, "spd", a, np.zeros(N, np.float32))
        assert x.dtype == jnp.float32
        np.testing.assert_array_equal(x, np.zeros(N, np.float32))


# --------------------------------------------------------------------------------------
# factorize / solve_factorized
# --------------------------------------------------------------------------------------


def test_factorize_general_transpose(maybe_jit):
    a, b = make_general(), make_rhs()
    f = maybe_jit(ls.factorize)(a)
    assert isinstance(f, ls.Factorization) and f.kind == "lu"
    solve_n = maybe_jit(ls.solve_factorized)
    solve_t = maybe_jit(lambda f, r: ls.solve_factorized(f, r, transpose=True))
    assert rel_err(solve_n(f, b), np.linalg.solve(a, b)) < 1e-12
    assert rel_err(solve_t(f, b), np.linalg.solve(a.T, b)) < 1e-12
    f = ls.factorize(a, ridge=0.5)
    ref = np.linalg.solve((a + 0.5 * np.eye(N)).T, b)
    assert rel_err(ls.solve_factorized(f, b, transpose=True), ref) < 1e-12


def test_factorize_cholesky_and_pytree(maybe_jit):
    a, b = make_spd(), make_rhs()
    f = maybe_jit(lambda m: ls.factorize(m, structure="spd"))(a)
    assert f.kind == "cholesky"
    leaves, treedef = jax.tree_util.tree_flatten(f)
    assert len(leaves) == 1 and all(isinstance(leaf, jax.Array) for leaf in leaves)
    f2 = jax.tree_util.tree_unflatten(treedef, leaves)
    assert f2.kind == "cholesky"
    ref = np.linalg.solve(a, b)
    for transpose in (False, True):
        assert rel_err(ls.solve_factorized(f2, b, transpose=transpose), ref) < 1e-12
    assert ls.factorize(make_symmetric_indefinite(), structure="symmetric").kind == "lu"
    assert "cholesky" in repr(f)
    # float32 right-hand side with float64 factors: output has the dtype of b.
    assert ls.solve_factorized(f, b.astype(np.float32)).dtype == jnp.float32


def test_factorization_as_custom_vjp_residual():
    @jax.custom_vjp
    def linsolve(m, rhs):
        return jnp.linalg.solve(m, rhs)

    def fwd(m, rhs):
        f = ls.factorize(m)
        x = ls.solve_factorized(f, rhs)
        return x, (f, x)

    def bwd(res, g):
        f, x = res
        lam = ls.solve_factorized(f, g, transpose=True)
        return -jnp.outer(lam, x), lam

    linsolve.defvjp(fwd, bwd)
    a, b = jnp.asarray(make_general()), jnp.asarray(make_rhs())

    def loss(fn):
        return lambda m, rhs: jnp.sum(jnp.sin(fn(m, rhs)))

    got = jax.jit(jax.grad(loss(linsolve), argnums=(0, 1)))(a, b)
    want = jax.grad(loss(jnp.linalg.solve), argnums=(0, 1))(a, b)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    # vmap of factorize / solve_factorized over a batch of matrices.
    mats = jnp.stack([make_general(seed=s) for s in range(3)])
    fs = jax.vmap(ls.factorize)(mats)
    xs = jax.vmap(ls.solve_factorized, in_axes=(0, None))(fs, b)
    for m, x in zip(mats, xs, strict=True):
        assert rel_err(x, np.linalg.solve(m, b)) < 1e-12


# --------------------------------------------------------------------------------------
# vmap, float32
# --------------------------------------------------------------------------------------


@functools.cache
def _vmapped_fns(method, structure):
    def run(m, b):
        return ls.linear_solve(mv(m), b, method=method, structure=structure).x

    return jax.jit(jax.vmap(run, in_axes=(None, 0))), jax.jit(jax.vmap(run))


@pytest.mark.parametrize(("method", "structure"), ALL_CASES)
def test_vmap_over_rhs_and_matrices(method, structure):
    over_rhs, over_both = _vmapped_fns(method, _structure_key(method, structure))
    rhs = np.stack([make_rhs(seed=s) for s in range(3)])
    rhs[1] = 0.0  # a zero right-hand side inside a batch
    a = matrix_for(method, structure, seed=5)
    batched = over_rhs(a, rhs)
    looped = np.stack([solve(method, structure, a, r) for r in rhs])
    np.testing.assert_allclose(batched, looped, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(batched[1], np.zeros(N))
    mats = np.stack([matrix_for(method, structure, seed=s) for s in (5, 6, 7)])
    batched = over_both(mats, rhs)
    for m, r, x in zip(mats, rhs, batched, strict=True):
        np.testing.assert_allclose(x, np.linalg.solve(m, r), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize(("method", "structure"), ALL_CASES)
def test_float32(method, structure):
    a, b = matrix_for(method, structure), make_rhs()
    x = solve(method, structure, a.astype(np.float32), b.astype(np.float32))
    assert x.dtype == jnp.float32
    assert rel_err(x, np.linalg.solve(a, b)) < 1e-4


@pytest.mark.parametrize("method", ["dense", "cg"])
def test_float32_eager(method, maybe_jit):
    a, b = make_spd(), make_rhs()
    run = maybe_jit(lambda m, rhs: ls.linear_solve(mv(m), rhs, method=method, structure="spd").x)
    x = run(a.astype(np.float32), b.astype(np.float32))
    assert x.dtype == jnp.float32 and rel_err(x, np.linalg.solve(a, b)) < 1e-4


@pytest.mark.parametrize("method", ["dense", "minres"])
def test_mixed_precision_output_dtype_is_dtype_of_b(method):
    a, b = make_spd(), make_rhs()
    x = solve(method, "spd", a, b.astype(np.float32))  # float64 operator, float32 rhs
    assert x.dtype == jnp.float32 and rel_err(x, np.linalg.solve(a, b)) < 1e-4


def test_integer_rhs_and_defaults():
    a = make_spd()
    x = ls.solve_dense(mv(a), np.arange(N)).x
    assert jnp.issubdtype(x.dtype, jnp.floating)
    assert rel_err(x, np.linalg.solve(a, np.arange(N))) < 1e-12
    assert ls.default_tol(jnp.float64) == 1e-12
    assert ls.default_tol(jnp.float32) == 1e-6
    assert ls.default_max_iter(5) == 100 and ls.default_max_iter(50) == 500


# --------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------


def test_invalid_method_and_structure():
    a, b = make_spd(), make_rhs()
    with pytest.raises(ValueError, match="method") as info:
        ls.linear_solve(mv(a), b, method="qr")
    assert "minres" in str(info.value) and "'qr'" in str(info.value)
    with pytest.raises(ValueError, match="structure") as info:
        ls.linear_solve(mv(a), b, structure="hermitian")
    assert "spd" in str(info.value)
    with pytest.raises(ValueError, match="structure"):  # also with an iterative method
        ls.linear_solve(mv(a), b, method="cg", structure="sym")
    with pytest.raises(ValueError, match="structure"):
        ls.solve_dense(mv(a), b, structure="pd")
    with pytest.raises(ValueError, match="structure"):
        ls.factorize(a, structure="SPD")
    with pytest.raises(ValueError, match="structure"):  # validated at trace time under jit
        jax.jit(lambda r: ls.linear_solve(mv(a), r, structure="x"))(b)


def test_invalid_ridge_and_options():
    a, b = make_spd(), make_rhs()
    calls = [
        lambda r: ls.linear_solve(mv(a), b, ridge=r),
        lambda r: ls.linear_solve(mv(a), b, method="gmres", ridge=r),
        lambda r: ls.solve_dense(mv(a), b, ridge=r),
        lambda r: ls.factorize(a, ridge=r),
        lambda r: ls.solve_cg(mv(a), b, ridge=r),
        lambda r: ls.solve_minres(mv(a), b, ridge=r),
        lambda r: ls.solve_gmres(mv(a), b, ridge=r),
        lambda r: ls.solve_normal_cg(mv(a), b, ridge=r),
        lambda r: ls.solve_neumann(mv(a), b, ridge=r),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="ridge"):
            call(-1e-3)
    with pytest.raises(ValueError, match="tol"):
        ls.solve_cg(mv(a), b, tol=0.0)
    with pytest.raises(ValueError, match="max_iter"):
        ls.solve_minres(mv(a), b, max_iter=0)
    with pytest.raises(ValueError, match="max_iter"):
        ls.solve_cg(mv(a), b, max_iter=2.5)
    with pytest.raises(ValueError, match="restart"):
        ls.solve_gmres(mv(a), b, restart=0)
    with pytest.raises(ValueError, match="num_terms"):
        ls.solve_neumann(mv(a), b, num_terms=-1)
    with pytest.raises(ValueError, match="x0"):
        ls.solve_cg(mv(a), b, x0=np.zeros(N + 1))
    with pytest.raises(ValueError, match="matvec"):
        ls.solve_cg(lambda v: v[:-1], b)
    with pytest.raises(ValueError, match="1-D"):
        ls.solve_cg(mv(a), np.zeros((N, 2)))
    with pytest.raises(TypeError, match="real"):
        ls.solve_cg(mv(a), np.zeros(N, np.complex128))


def test_hessian_by_materialize_equals_jax_hessian():
    # ls.hessian keeps products A v symbolic (A itself, no A @ I): the same matrix as
    # jax.hessian on quadratic, non-quadratic, control-flow and jitted-inner functions, under
    # jit and vmap, and differentiable.
    rng = np.random.default_rng(0)
    n = 6
    Q = jnp.asarray(rng.normal(size=(n, n)))
    P = jnp.asarray(rng.normal(size=(3, n)))
    inner = jax.jit(lambda y: jnp.sum(jnp.tanh(P @ y)))
    funs = [
        lambda y: 0.5 * y @ Q @ y,
        lambda y: 0.5 * jnp.dot(y, jnp.dot(Q.T, y)) + jnp.sum(jnp.sin(y)) - 3.0 * y @ y,
        lambda y: jnp.sum((P @ y) ** 2) + jnp.sum(y**4) + jnp.linalg.norm(Q @ y + 1.0) ** 2,
        lambda y: jax.nn.logsumexp(Q @ y) + inner(y) + jnp.sum(jnp.where(y > 0, y**3, -y)),
        lambda y: jnp.sum(y),  # Hessian 0
    ]
    ys = jnp.asarray(rng.normal(size=(2, n)))
    for fun in funs:
        want = jax.vmap(jax.hessian(fun))(ys)
        np.testing.assert_allclose(ls.hessian(fun, ys[0]), want[0], rtol=1e-12, atol=1e-12)
        got = jax.jit(jax.vmap(lambda y, fun=fun: ls.hessian(fun, y)))(ys)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    dQ = jax.grad(lambda Q: jnp.sum(jnp.sin(ls.hessian(lambda y: y @ Q @ y, ys[0]))))(Q)
    dQ_ref = jax.grad(lambda Q: jnp.sum(jnp.sin(jax.hessian(lambda y: y @ Q @ y)(ys[0]))))(Q)
    np.testing.assert_allclose(dQ, dQ_ref, rtol=1e-12, atol=1e-12)
