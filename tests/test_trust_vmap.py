"""Defect 10 (issue 10): a ``jax.vmap`` batch of QPs that never finished.

``jit(vmap(value_and_grad(solve_qp)))`` over 40 random strictly convex QPs at n = 80 hung on
a 2-core machine (jaxlib 0.10.2): both XLA CPU threads waited inside ``jax::ParallelBatchMap``
of batched LAPACK kernels (``dpotrf`` and ``dtrsm``). The Cholesky factorisations and
triangular solves now loop over a vmapped batch (``linear_solve.cholesky`` /
``triangular_solve``). The batch runs in a subprocess under a timeout, so a regression fails
the test instead of hanging the suite.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._src import linear_solve as ls

_ROOT = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import bilevel_jax as bj

    def loss(Q, c, G, h):
        sol = bj.solve_qp(Q, c, G=G, h=h)
        return jnp.sum(sol.y ** 2) + jnp.sum(sol.lam), sol.info.status

    f = jax.jit(jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)))
    rng = np.random.default_rng(0)
    B, n, k = 40, 80, 40
    for _ in range(3):  # the hang came on the second call
        M = rng.normal(size=(B, n, n))
        Q = M @ np.swapaxes(M, 1, 2) / n + 0.1 * np.eye(n)
        c, G = rng.normal(size=(B, n)), rng.normal(size=(B, k, n))
        h = rng.uniform(0.1, 1.0, size=(B, k))
        (value, status), grads = f(Q, c, G, h)
        jax.block_until_ready(grads)
        assert np.all(np.asarray(status) == int(bj.Status.SUCCESS)), status
        assert all(np.all(np.isfinite(g)) for g in grads)
    print("ALL OK", flush=True)
    """
)


def test_defect10_vmapped_qp_batch_finishes():
    env = dict(os.environ)
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH")]))
    try:
        result = subprocess.run(
            [sys.executable, "-c", _SCRIPT], env=env, cwd=_ROOT, capture_output=True,
            text=True, timeout=600,
        )
    except subprocess.TimeoutExpired as err:  # the child is killed by subprocess.run
        raise AssertionError("the vmapped batch of QPs did not finish (deadlock?)") from err
    assert result.returncode == 0 and "ALL OK" in result.stdout, result.stderr[-6000:]


def test_defect10_looped_helpers_match_lax_and_differentiate():
    rng = np.random.default_rng(1)
    M = rng.normal(size=(3, 5, 5))
    A = jnp.asarray(M @ np.swapaxes(M, 1, 2) + 5 * np.eye(5))
    b = jnp.asarray(rng.normal(size=(3, 5)))
    L = jax.vmap(ls.cholesky)(A)
    np.testing.assert_allclose(L, jnp.linalg.cholesky(A), rtol=1e-12, atol=1e-12)
    x = jax.vmap(ls.cho_solve)(L, b)
    np.testing.assert_allclose(x, jnp.linalg.solve(A, b[..., None])[..., 0], rtol=1e-10)
    R = jax.vmap(lambda L, r: ls.triangular_solve(L, r[None], left_side=False, lower=True))(L, b)
    np.testing.assert_allclose(jnp.einsum("bj,bji->bi", R[:, 0], L), b, rtol=1e-10, atol=1e-12)

    # Reverse mode (first and second order) through the looped helpers equals that of lax's.
    def f(A, b, chol, solve):
        return jnp.sum(jnp.sin(solve(chol(A), b)))

    def ref(A, b):
        chol = lambda A: jax.lax.linalg.cholesky(A, symmetrize_input=False)  # noqa: E731
        return f(A, b, chol, lambda L, b: jax.scipy.linalg.cho_solve((L, True), b))

    def ours(A, b):
        return f(A, b, ls.cholesky, ls.cho_solve)

    for order in (jax.grad, lambda fn: jax.grad(lambda A, b: jnp.sum(jax.grad(fn)(A, b)))):
        got = jax.vmap(order(ours))(A, b)
        want = jax.vmap(order(ref))(A, b)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_defect10_looped_lu_matches_lax_under_vmap():
    rng = np.random.default_rng(2)
    A = jnp.asarray(rng.normal(size=(3, 6, 6)))
    b = jnp.asarray(rng.normal(size=(3, 6)))
    for transpose in (False, True):
        x = jax.vmap(lambda A, b, t=transpose: ls.lu_solve(*ls.lu_factor(A), b, t))(A, b)
        M = jnp.swapaxes(A, 1, 2) if transpose else A
        np.testing.assert_allclose(x, jnp.linalg.solve(M, b[..., None])[..., 0], rtol=1e-10)


def test_where_needed_runs_the_branch_only_for_a_batch_that_needs_it():
    from bilevel_jax._src import vma

    calls = []

    def branch(x):
        jax.debug.callback(lambda: calls.append(1))
        return 2 * x

    def f(x):
        return vma.where_needed(x > 0, branch, -x, x)

    x = jnp.array([-1.0, 3.0, -2.0])
    np.testing.assert_array_equal(jax.jit(jax.vmap(f))(x), [1.0, 6.0, 2.0])
    assert len(calls) == 1  # one trip for the whole batch
    calls.clear()
    np.testing.assert_array_equal(jax.jit(jax.vmap(f))(-jnp.abs(x)), [1.0, 3.0, 2.0])
    assert not calls  # no member needed it: the branch never ran
    np.testing.assert_array_equal(f(jnp.asarray(2.0)), 4.0)
    np.testing.assert_array_equal(jax.jit(f)(jnp.asarray(-2.0)), 2.0)
    np.testing.assert_allclose(jax.grad(f)(jnp.asarray(2.0)), 2.0)  # differentiable
    np.testing.assert_allclose(jax.vmap(jax.grad(f))(x), [-1.0, 2.0, -1.0])
