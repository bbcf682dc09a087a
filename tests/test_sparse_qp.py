"""Tests of ``solve_qp_sparse``: agreement with the dense ``solve_qp`` and with the independent
Clarabel + exact-KKT reference (``tests/reference.py``), finite differences, float32, vmap,
operators against BCOO, and the failure statuses.

One problem shape is used throughout (n = 10 variables, p = 2 equalities, k = 6 inequalities,
a box), so that every test reuses the same compilations.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import sparse

import bilevel_jax as bj
from bilevel_jax._src.sparse_qp import solve_qp_sparse

import reference

N, P, K = 10, 2, 6


def problem(seed, dtype=np.float64):
    """A strictly convex QP with a sparse Q, A, G and a box; some rows active."""
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((N, N)) * (rng.uniform(size=(N, N)) < 0.3)
    Q = B @ B.T + 0.5 * np.eye(N)
    A = rng.standard_normal((P, N)) * (rng.uniform(size=(P, N)) < 0.6)
    G = rng.standard_normal((K, N)) * (rng.uniform(size=(K, N)) < 0.5)
    y0 = rng.uniform(-0.4, 0.4, N)  # a feasible point
    b = A @ y0
    h = G @ y0 + rng.uniform(0.0, 0.3, K)
    c = 2.0 * rng.standard_normal(N)
    lo, hi = -0.5 * np.ones(N), 0.5 * np.ones(N)
    return tuple(np.asarray(a, dtype) for a in (Q, c, A, b, G, h, lo, hi))


def bcoo(M):
    return sparse.BCOO.fromdense(jnp.asarray(M))


def dense_data(Q, c, A, b, G, h, lo, hi):
    """The same QP for ``solve_qp``: the box as rows ``-y <= -lo``, ``y <= hi``."""
    eye = jnp.eye(N, dtype=c.dtype)
    return Q, c, A, b, jnp.concatenate([G, -eye, eye]), jnp.concatenate([h, -lo, hi])


@partial(jax.jit, static_argnames="method")
def sparse_solve(qd, c, ad, b, gd, h, lo, hi, qi, ai, gi, method="auto"):
    Q = sparse.BCOO((qd, qi), shape=(N, N))
    A = sparse.BCOO((ad, ai), shape=(P, N))
    G = sparse.BCOO((gd, gi), shape=(K, N))
    return solve_qp_sparse(Q, c, A, b, G, h, lo, hi, method=method)


# The default method for BCOO and dense data is "direct" (the interior point with sparse
# factorisations); the tests marked with METHODS also run the matrix-free "admm" path.
METHODS = pytest.mark.parametrize("method", ["direct", "admm"])


def split(data):
    Q, c, A, b, G, h, lo, hi = (jnp.asarray(a) for a in data)
    Qs, As, Gs = bcoo(Q), bcoo(A), bcoo(G)
    values = (Qs.data, c, As.data, b, Gs.data, h, lo, hi)
    return values, (Qs.indices, As.indices, Gs.indices)


def objective(weights, method="auto"):
    def f(values, idx):
        sol = sparse_solve(*values, *idx, method=method)
        return weights @ sol.y + 0.3 * jnp.sum(sol.nu) + 0.1 * jnp.sum(sol.lam)

    return f


@pytest.mark.parametrize("seed,method", [(0, "direct"), (1, "direct"), (2, "direct"),
                                         (0, "admm"), (1, "admm")])
def test_agrees_with_dense_solve_qp(seed, method):
    data = problem(seed)
    values, idx = split(data)
    sol = sparse_solve(*values, *idx, method=method)
    ref = bj.solve_qp(*dense_data(*(jnp.asarray(a) for a in data)))
    assert int(sol.info.status) == bj.Status.SUCCESS
    assert int(ref.info.status) == bj.Status.SUCCESS
    assert float(sol.info.residual) <= 1e-10
    np.testing.assert_allclose(sol.y, ref.y, atol=1e-9)
    np.testing.assert_allclose(sol.nu, ref.nu, atol=1e-8)
    np.testing.assert_allclose(sol.lam, ref.lam, atol=1e-8)
    # Hypergradients: every argument, including the BCOO data, against the dense gradient.
    w = jnp.asarray(np.random.default_rng(seed + 10).standard_normal(N))

    def dense_loss(Q, c, A, b, G, h, lo, hi):
        s = bj.solve_qp(*dense_data(Q, c, A, b, G, h, lo, hi))
        return w @ s.y + 0.3 * jnp.sum(s.nu) + 0.1 * jnp.sum(s.lam)

    gd = jax.grad(dense_loss, argnums=tuple(range(8)))(*(jnp.asarray(a) for a in data))
    gs = jax.grad(objective(w, method))(values, idx)
    (_, qi, ai, gi) = (None, *idx)
    for name, got, want in (
        ("Q", gs[0], gd[0][qi[:, 0], qi[:, 1]]),
        ("c", gs[1], gd[1]),
        ("A", gs[2], gd[2][ai[:, 0], ai[:, 1]]),
        ("b", gs[3], gd[3]),
        ("G", gs[4], gd[4][gi[:, 0], gi[:, 1]]),
        ("h", gs[5], gd[5]),
        ("lo", gs[6], gd[6]),
        ("hi", gs[7], gd[7]),
    ):
        np.testing.assert_allclose(got, want, atol=1e-7, rtol=1e-6, err_msg=name)


@pytest.mark.parametrize("seed", [3, 4])
def test_against_independent_reference(seed):
    Q, c, A, b, G, h, lo, hi = problem(seed)
    Gd = np.vstack([G, -np.eye(N), np.eye(N)])
    hd = np.concatenate([h, -lo, hi])
    ref = reference.solve(Q, c, A, b, Gd, hd)
    assert ref.status == reference.OPTIMAL
    values, idx = split((Q, c, A, b, G, h, lo, hi))
    sol = sparse_solve(*values, *idx)
    assert int(sol.info.status) == bj.Status.SUCCESS
    np.testing.assert_allclose(sol.y, ref.y, atol=1e-8)
    np.testing.assert_allclose(sol.lam, ref.lam, atol=1e-7)
    v = np.random.default_rng(seed).standard_normal(N)
    want = reference.hypergradient(Q, c, A, b, Gd, hd, ref, v)
    got = jax.grad(lambda vals: jnp.asarray(v) @ sparse_solve(*vals, *idx).y)(values)
    np.testing.assert_allclose(got[1], want["c"], atol=1e-7)
    np.testing.assert_allclose(got[3], want["b"], atol=1e-7)
    np.testing.assert_allclose(got[5], want["h"][:K], atol=1e-7)
    np.testing.assert_allclose(-got[6], want["h"][K : K + N], atol=1e-7)
    np.testing.assert_allclose(got[7], want["h"][K + N :], atol=1e-7)


def test_finite_differences():
    data = problem(5)
    values, idx = split(data)
    w = jnp.asarray(np.random.default_rng(0).standard_normal(N))
    f = objective(w)
    grad = jax.grad(f)(values, idx)
    rng = np.random.default_rng(1)
    for i in range(8):
        direction = jnp.asarray(rng.standard_normal(values[i].shape))
        eps = 1e-6

        def at(t, i=i, direction=direction):
            vals = list(values)
            vals[i] = vals[i] + t * direction
            return f(tuple(vals), idx)

        fd = (at(eps) - at(-eps)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(grad[i], direction), fd, rtol=1e-5, atol=1e-6)


def test_float32():
    data = problem(0, np.float32)
    values, idx = split(data)
    sol = sparse_solve(*values, *idx)
    assert sol.y.dtype == jnp.float32 and sol.lam.dtype == jnp.float32
    assert int(sol.info.status) == bj.Status.SUCCESS
    assert float(sol.info.residual) <= 1e-5
    ref = bj.solve_qp(*dense_data(*(jnp.asarray(a, jnp.float64) for a in data)))
    np.testing.assert_allclose(sol.y, ref.y, atol=1e-4)
    w = np.random.default_rng(7).standard_normal(N)
    g32 = jax.grad(objective(jnp.asarray(w, jnp.float32)))(values, idx)
    values64 = tuple(jnp.asarray(a, jnp.float64) for a in values)
    g64 = jax.grad(objective(jnp.asarray(w)))(values64, idx)
    for a, b_ in zip(g32, g64, strict=True):
        assert a.dtype == jnp.float32
        # float32: a relative error of order sqrt(eps) times the KKT conditioning.
        np.testing.assert_allclose(a, b_, atol=2e-3 * (1 + float(jnp.max(jnp.abs(b_)))))


def batch(seeds, method):
    """Problems of one sparsity (the union pattern, each problem's values on it): their
    stacked values, each problem's values, and the loss ``w'y*`` of one problem."""
    datas = [problem(s) for s in seeds]
    pattern = [np.any([d[i] != 0 for d in datas], axis=0) for i in (0, 2, 4)]
    idx = tuple(jnp.asarray(np.argwhere(m)) for m in pattern)

    def values_of(d):
        Q, c, A, b, G, h, lo, hi = d
        return tuple(jnp.asarray(a) for a in (Q[pattern[0]], c, A[pattern[1]], b,
                                              G[pattern[2]], h, lo, hi))

    singles = [values_of(d) for d in datas]
    stacked = [jnp.stack(x) for x in zip(*singles, strict=True)]
    w = jnp.asarray(np.random.default_rng(3).standard_normal(N))

    def loss(*vals):
        return w @ sparse_solve(*vals, *idx, method=method).y

    return stacked, singles, loss


@METHODS
def test_vmap_equals_loop(method):
    stacked, singles, loss = batch((0, 1, 2), method)
    batched = jax.vmap(jax.value_and_grad(loss, argnums=(1, 5)))(*stacked)
    for j, values in enumerate(singles):
        single = jax.value_and_grad(loss, argnums=(1, 5))(*values)
        np.testing.assert_allclose(batched[0][j], single[0], rtol=1e-9, atol=1e-10)
        for a, b_ in zip(batched[1], single[1], strict=True):
            np.testing.assert_allclose(a[j], b_, rtol=1e-8, atol=1e-9)


def test_operator_equals_bcoo():
    Q, c, A, b, G, h, lo, hi = (jnp.asarray(a) for a in problem(6))
    values, idx = split((Q, c, A, b, G, h, lo, hi))
    w = jnp.asarray(np.random.default_rng(4).standard_normal(N))

    @jax.jit
    def op_loss(Q, c, A, b, G, h):
        sol = solve_qp_sparse(lambda v: Q @ v, c, lambda v: A @ v, b,
                              (lambda v: G @ v, lambda u: G.T @ u), h, lo, hi)
        return w @ sol.y, sol

    (val, sol_op), g_op = jax.value_and_grad(op_loss, argnums=(0, 1, 2, 4, 5), has_aux=True)(
        Q, c, A, b, G, h)
    sol_sp = sparse_solve(*values, *idx)
    assert int(sol_op.info.status) == bj.Status.SUCCESS
    np.testing.assert_allclose(sol_op.y, sol_sp.y, atol=1e-9)
    np.testing.assert_allclose(sol_op.lam, sol_sp.lam, atol=1e-8)
    g_sp = jax.grad(lambda vals: w @ sparse_solve(*vals, *idx).y)(values)
    qi, ai, gi = idx
    np.testing.assert_allclose(g_op[1], g_sp[1], atol=1e-8)
    np.testing.assert_allclose(g_op[4], g_sp[5], atol=1e-8)
    # The operator's closed-over matrices get gradients (dense, not symmetrised for Q): their
    # entries on the pattern agree with the BCOO data gradients up to the symmetrisation.
    np.testing.assert_allclose(g_op[2][ai[:, 0], ai[:, 1]], g_sp[2], atol=1e-8)
    np.testing.assert_allclose(g_op[3][gi[:, 0], gi[:, 1]], g_sp[4], atol=1e-8)
    gq = 0.5 * (g_op[0] + g_op[0].T)
    np.testing.assert_allclose(gq[qi[:, 0], qi[:, 1]], g_sp[0], atol=1e-8)


@METHODS
def test_infeasible_never_success(method):
    sparse_solve_ = partial(sparse_solve, method=method)
    Q, c, A, b, G, h, lo, hi = (jnp.asarray(a) for a in problem(0))
    values, idx = split((Q, c, A, b, G, h, lo, hi))
    # G y <= h with h very negative on a row with a bounded box: an empty set.
    bad_h = values[5].at[0].set(-100.0 - float(jnp.sum(jnp.abs(G[0]))))
    vals = (*values[:5], bad_h, *values[6:])
    sol = sparse_solve_(*vals, *idx)
    assert int(sol.info.status) == bj.Status.INFEASIBLE
    assert bool(jnp.all(jnp.isnan(sol.y)))
    g = jax.grad(lambda c_: jnp.sum(sparse_solve_(vals[0], c_, *vals[2:], *idx).y))(values[1])
    assert bool(jnp.all(jnp.isnan(g)))
    # lo > hi.
    sol = sparse_solve_(*values[:6], values[6].at[1].set(1.0), values[7], *idx)
    assert int(sol.info.status) == bj.Status.INFEASIBLE


@METHODS
def test_nan_input_gives_nonfinite(method):
    values, idx = split(problem(0))
    vals = (values[0], values[1].at[2].set(jnp.nan), *values[2:])
    sol = sparse_solve(*vals, *idx, method=method)
    assert int(sol.info.status) == bj.Status.NONFINITE
    assert bool(jnp.all(jnp.isnan(sol.y)))
    g = jax.grad(lambda c_: jnp.sum(sparse_solve(vals[0], c_, *vals[2:], *idx,
                                                 method=method).y))(vals[1])
    assert bool(jnp.all(jnp.isnan(g)))


def test_unbounded_lp():
    # min -y_0 with y_0 free above and only y_1 bounded: unbounded.
    Q = sparse.BCOO.fromdense(jnp.zeros((2, 2)))
    sol = solve_qp_sparse(Q, jnp.array([-1.0, 0.0]), lo=jnp.array([0.0, 0.0]),
                          hi=jnp.array([jnp.inf, 1.0]))
    assert int(sol.info.status) == bj.Status.UNBOUNDED


def test_infinite_h_rows_and_absent_blocks():
    Q, c, A, b, G, h, lo, hi = (jnp.asarray(a) for a in problem(2))
    h_inf = h.at[0].set(jnp.inf)
    sol = solve_qp_sparse(bcoo(Q), c, G=bcoo(G), h=h_inf, lo=lo, hi=hi)
    eye = jnp.eye(N)
    ref = bj.solve_qp(Q, c, G=jnp.concatenate([G, -eye, eye]),
                      h=jnp.concatenate([h_inf, -lo, hi]))
    assert int(sol.info.status) == bj.Status.SUCCESS
    np.testing.assert_allclose(sol.y, ref.y, atol=1e-9)
    assert float(sol.lam[0]) == 0.0
    g = jax.grad(lambda h_: jnp.sum(solve_qp_sparse(bcoo(Q), c, G=bcoo(G), h=h_, lo=lo,
                                                    hi=hi).y))(h_inf)
    assert float(g[0]) == 0.0 and bool(jnp.all(jnp.isfinite(g)))


def test_bad_shapes_name_the_argument():
    Q, c, A, b, G, h, lo, hi = (jnp.asarray(a) for a in problem(0))
    with pytest.raises(ValueError, match="G has shape"):
        solve_qp_sparse(bcoo(Q), c, G=bcoo(G[:, :-1]), h=h)
    with pytest.raises(ValueError, match="h was given without G"):
        solve_qp_sparse(bcoo(Q), c, h=h)
    with pytest.raises(ValueError, match="lo has shape"):
        solve_qp_sparse(bcoo(Q), c, lo=lo[:-1])


def smoothing(n, dtype):
    """The 1-D smoothing QP of bench/sparse_qp.py (BCOO data), at a small size."""
    rng = np.random.default_rng(0)
    i = np.arange(n)
    main = np.full(n, 1.4)
    main[[0, -1]] = 1.2
    Q = sparse.BCOO((jnp.asarray(np.concatenate([main, -0.2 * np.ones(2 * n - 2)]), dtype),
                     jnp.asarray(np.stack([np.concatenate([i, i[:-1], i[1:]]),
                                           np.concatenate([i, i[1:], i[:-1]])], 1))),
                    shape=(n, n))
    G = sparse.BCOO((jnp.asarray(np.concatenate([np.ones(n - 1), -np.ones(n - 1)]), dtype),
                     jnp.asarray(np.stack([np.concatenate([i[:-1], i[:-1]]),
                                           np.concatenate([i[:-1], i[1:]])], 1))),
                    shape=(n - 1, n))
    A = sparse.BCOO.fromdense(jnp.ones((1, n), dtype))
    theta = jnp.asarray(rng.standard_normal(n), dtype)
    return Q, -theta, A, jnp.asarray([0.05 * n], dtype), G, jnp.full(n - 1, 0.05, dtype)


def test_defect1_float32_stagnating_admm_polishes_again():
    # In float32 the ADMM residual stagnates near 1e-4 on the smoothing QP; the phase after a
    # rejected polish used to run to max_iter (20000 iterations, minutes) before polishing
    # again. Phases are now bounded, so the polish is retried after a few hundred iterations.
    Q, c, A, b, G, h = smoothing(300, jnp.float32)
    sol = solve_qp_sparse(Q, c, A, b, G, h, -0.3, 0.3, max_iter=3000, method="admm")
    assert int(sol.info.status) == bj.Status.SUCCESS
    assert float(sol.info.residual) <= 1e-5
    assert int(sol.info.num_steps) < 2000


def test_defect2_unsolvable_polish_system_ends_the_polish(monkeypatch):
    """A guess whose masked KKT system is inconsistent (every variable fixed at a bound and
    equality rows that the fixed point violates) is one MINRES solve, not ``max_rounds``:
    at n = 1e4 on the smoothing QP of bench/sparse_qp.py such guesses from rough ADMM points
    cost 36 full-length MINRES runs (fwd 50 s -> 19 s once they end the polish)."""
    from bilevel_jax._src import linear_solve as ls
    from bilevel_jax._src import sparse_qp as S

    calls = []
    orig = ls.solve_minres

    def counted(*args, **kwargs):
        sol = orig(*args, **kwargs)
        jax.debug.callback(lambda conv: calls.append(bool(conv)), sol.converged)
        return sol

    monkeypatch.setattr(ls, "solve_minres", counted)
    Q, c, A, b, G, h, lo, hi = (jnp.asarray(a) for a in problem(0))
    opts = S._Options(1e-10, 1000, 200, 1e-12, 0.1, 12, 1e-4)
    specs = S._Specs(S._matrix("Q", Q, N, N, c.dtype, sym=True)[0],
                     S._matrix("A", A, P, N, c.dtype)[0], S._matrix("G", G, K, N, c.dtype)[0])
    theta = (Q, c, A, b, G, h, lo, hi)
    s = S._ruiz(specs, theta)
    sops = S._scaled_ops(S._ops(specs, theta), s)
    g_norm = S._row_norms(specs.G, G, c.dtype)
    guess = S._Masks(jnp.zeros(K, bool), jnp.ones(N, bool), jnp.zeros(N, bool))
    start = jnp.zeros(2 * N + P + K)
    z, ok, _ = S._polish(specs, theta, s, sops, g_norm, guess, start, 1e-10, opts)
    jax.block_until_ready(z)
    assert not bool(ok)
    assert calls == [False]


def test_direct_smoothing_qp_against_dense_and_statuses():
    """The direct method on the bench's smoothing QP (n = 400): y and d/dtheta equal
    solve_qp's on the dense data; an indefinite Q is NONCONVEX (not SUCCESS); an LP (Q = 0,
    the sparse factorisation's singular path) agrees with solve_qp; operators are refused."""
    Q, c, A, b, G, h = smoothing(400, jnp.float64)
    w = jnp.asarray(np.random.default_rng(0).standard_normal(400))

    def loss_sparse(c):
        return w @ solve_qp_sparse(Q, c, A, b, G, h, -0.3, 0.3, method="direct").y

    eye = jnp.eye(400)
    dense = (Q.todense(), A.todense(), b, jnp.concatenate([G.todense(), -eye, eye]),
             jnp.concatenate([h, jnp.full(800, 0.3)]))

    def loss_dense(c):
        Qd, Ad, bd, Gd, hd = dense
        return w @ bj.solve_qp(Qd, c, Ad, bd, Gd, hd).y

    sol = solve_qp_sparse(Q, c, A, b, G, h, -0.3, 0.3, method="direct")
    assert int(sol.info.status) == bj.Status.SUCCESS
    ref = bj.solve_qp(dense[0], c, *dense[1:])
    np.testing.assert_allclose(sol.y, ref.y, atol=1e-9)
    np.testing.assert_allclose(jax.grad(loss_sparse)(c), jax.grad(loss_dense)(c), atol=1e-8)
    # Indefinite Q.
    bad = sparse.BCOO((-Q.data, Q.indices), shape=Q.shape)
    sol = solve_qp_sparse(bad, c, A, b, G, h, -0.3, 0.3, method="direct")
    assert int(sol.info.status) == bj.Status.NONCONVEX
    assert bool(jnp.all(jnp.isnan(sol.y)))
    # An LP with a unique solution: min c'y over the box and the slope rows.
    zero = sparse.BCOO((0 * Q.data, Q.indices), shape=Q.shape)
    lp = solve_qp_sparse(zero, c, A, b, G, h, -0.3, 0.3, method="direct")
    lp_ref = bj.solve_qp(jnp.zeros((400, 400)), c, *dense[1:])
    assert int(lp.info.status) == int(lp_ref.info.status) == bj.Status.SUCCESS
    np.testing.assert_allclose(c @ lp.y, c @ lp_ref.y, rtol=1e-9)
    with pytest.raises(ValueError, match="method='direct'"):
        solve_qp_sparse(lambda v: v, c, lo=-0.3, hi=0.3, method="direct")
    with pytest.raises(ValueError, match="method"):
        solve_qp_sparse(Q, c, method="ipm")


@pytest.mark.parametrize("backend", ["qdldl", "superlu"])
def test_direct_factorisation_of_a_dense_row(backend, monkeypatch):
    """The host factorisation (QDLDL, or SuperLU without the ``qdldl`` package) of a KKT
    matrix with a dense row (the smoothing QP's sum(y) = b) stays O(n), solves the
    regularised matrix exactly and reads the inertia from the pivots."""
    import scipy.sparse as sp

    from bilevel_jax._src import sparse_linalg as sl

    if backend == "superlu":
        monkeypatch.setattr(sl, "_qdldl", lambda: None)
    n = 2000
    Q = sp.eye(n, format="csr")
    C = sp.vstack([sp.csr_matrix(np.ones((1, n))), sp.eye(n)], format="csr")
    m, e = np.ones(n + 1), np.full(n + 1, 1e-6)

    def values(Q, C, repeat=1):  # (repeat: every entry of C given ``repeat`` times, summed)
        Qo, Co = Q.tocoo(), C.tocoo()
        Cd, Cr, Cc = (np.tile(a, repeat) for a in (Co.data / repeat, Co.row, Co.col))
        return sl._values(Qo.data, Qo.row, Qo.col, Cd, Cr, Cc, (Q.shape, C.shape))

    v = values(Q, C)
    assert v.pattern.upper == (backend == "qdldl")
    f = sl._Factor(v, m, e, 1e-12, 1e-10, inertia=True)
    assert f.ok and f.positive == n and f.pivot > 0
    if backend == "qdldl":
        assert v.pattern.qdldl_solver.factors()[0].nnz < 20 * n
    else:
        assert f.lu.L.nnz + f.lu.U.nnz < 20 * n
    rng = np.random.default_rng(0)
    r1, r2 = rng.standard_normal(n), rng.standard_normal(n + 1)
    x1, x2 = f.apply_inverse(r1, r2)
    K = sp.bmat([[Q + 1e-12 * sp.eye(n), C.T], [C, -sp.diags(e + 1e-10)]], format="csr")
    res = K @ np.concatenate([x1, x2]) - np.concatenate([r1, r2])
    assert np.max(np.abs(res)) < 1e-8 * (1 + np.max(np.abs(r2)))
    # Repeated entries add up, as in BCOO.
    twice = sl._Factor(values(Q, C, repeat=2), m, e, 1e-12, 1e-10)
    np.testing.assert_allclose(twice.apply_inverse(r1, r2)[0], x1, rtol=1e-10, atol=1e-12)
    # With the rows masked out (m = 0, as _prepare_sparse asks) the inertia is Q's: an
    # indefinite Q gives fewer than n positive pivots (or a zero pivot: no factorisation).
    Q_bad = sp.diags(np.where(np.arange(n) % 2, 1.0, -1.0), format="csr")
    bad = sl._Factor(values(Q_bad, C), 0 * m, e, 1e-12, 1e-10, inertia=True)
    assert not bad.ok or bad.positive < n


def test_direct_host_cache_eviction_and_superlu(monkeypatch):
    """With the host caches holding one pattern and one factorisation, a vmapped solve (the
    problems factorised one after the other) passes the matrices again and gives the loop's
    answer; so does SciPy's SuperLU in place of QDLDL."""
    from bilevel_jax._src import sparse_linalg as sl

    stacked, _, loss = batch((0, 1), "direct")
    grad = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(1, 5))))
    expected = grad(*stacked)
    monkeypatch.setattr(sl, "_CACHE_SIZE", 1)
    monkeypatch.setattr(sl, "_PATTERNS_SIZE", 1)
    evicting = grad(*stacked)
    monkeypatch.setattr(sl, "_qdldl", lambda: None)
    superlu = grad(*stacked)
    for got in (evicting, superlu):
        for a, b_ in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
            np.testing.assert_allclose(a, b_, rtol=1e-8, atol=1e-9)


def test_direct_float32_smoothing_qp():
    Q64, c64, A64, b64, G64, h64 = smoothing(300, jnp.float64)
    Q32, c32, A32, b32, G32, h32 = smoothing(300, jnp.float32)
    w = np.random.default_rng(1).standard_normal(300)

    def grad(Q, c, A, b, G, h, dtype):
        def f(c):
            return jnp.asarray(w, dtype) @ solve_qp_sparse(Q, c, A, b, G, h, -0.3, 0.3).y
        return jax.grad(f)(c)

    sol = solve_qp_sparse(Q32, c32, A32, b32, G32, h32, -0.3, 0.3)
    assert sol.y.dtype == jnp.float32 and int(sol.info.status) == bj.Status.SUCCESS
    g32 = grad(Q32, c32, A32, b32, G32, h32, jnp.float32)
    g64 = grad(Q64, c64, A64, b64, G64, h64, jnp.float64)
    assert g32.dtype == jnp.float32
    assert float(jnp.linalg.norm(g32 - g64) / jnp.linalg.norm(g64)) <= 1e-3
