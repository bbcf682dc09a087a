"""Issue 10, defects 3, 4, 5 and 7: honest and uniform failure behaviour at every entry point.

The contract (``bilevel_jax._src.types.Status``): inconsistent set data is a ``ValueError``
when concrete and ``INFEASIBLE`` when traced; a failed status comes with NaN cotangents (per
batch member under ``vmap``), NONFINITE data with NaN outputs; ``throw=True`` raises a
``SolveError`` (eagerly, under ``vmap`` and ``grad``) or, under ``jit``, the
``jax.errors.JaxRuntimeError`` that ``SolveError`` subclasses, with the SolveError line last;
non-convex and singular lower levels say so (``NONCONVEX``, ``SINGULAR``).
"""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

TH = jnp.asarray([1.0, 2.0])


def g_quad(y, t):
    return 0.5 * jnp.sum((y - t) ** 2) + 0.25 * y[0] * y[1]


def g_hard(y, t):  # not solved by one projected-gradient step
    return 0.5 * jnp.sum((y - t) ** 2) + 0.25 * jnp.sum(y**4) + 0.5 * y[0] * y[1]


def g_nonconvex(y, t):
    return -0.5 * jnp.sum(y**2) + t @ y


def g_singular(y, t):  # depends on y_0 + y_1 only: the minimisers form a line
    return 0.5 * (y[0] + y[1] - t[0]) ** 2


def f_saddle(u, v, t):
    return u @ u - v @ v + u @ v + t @ u


def all_nan(tree):
    return all(np.all(np.isnan(np.asarray(a))) for a in jax.tree_util.tree_leaves(tree))


def all_finite(tree):
    return all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree_util.tree_leaves(tree))


# ------------------------------------------------------------------ defect 3: empty sets


def test_defect3_argmin_box_lo_above_hi_is_an_error_when_concrete():
    with pytest.raises(ValueError, match="lo > hi"):
        bj.argmin(g_quad, jnp.zeros(2), TH, box=lambda t: (1.0, 0.0))
    # One inconsistent entry, with the bounds as pytrees, also inside jit (concrete bounds).
    lo, hi = jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 0.5])
    with pytest.raises(ValueError, match="flattened index 1"):
        bj.argmin(g_quad, jnp.zeros(2), TH, box=lambda t: (lo, hi))
    with pytest.raises(ValueError, match="lo > hi"):
        jax.jit(lambda t: bj.argmin(g_quad, jnp.zeros(2), t, box=lambda t_: (1.0, 0.0)).y)(TH)


@jax.jit
def _argmin_traced_box(hi1):
    hi = jnp.stack([jnp.asarray(1.0), hi1])
    alone = bj.argmin(g_quad, jnp.zeros(2), TH, box=lambda t: (0.0, hi))
    with_rows = bj.argmin(g_quad, jnp.zeros(2), TH, box=lambda t: (0.0, hi),
                          ineq=lambda t: (jnp.ones((1, 2)), jnp.ones(1)))
    return alone.info.status, with_rows.info.status


def test_defect3_argmin_box_lo_above_hi_is_infeasible_when_traced():
    # lo[1] = 0 > hi[1] = -1, known only at run time.
    alone, with_rows = _argmin_traced_box(-1.0)
    assert int(alone) == bj.Status.INFEASIBLE
    assert int(with_rows) == bj.Status.INFEASIBLE
    ok_alone, ok_rows = _argmin_traced_box(1.0)
    assert int(ok_alone) == bj.Status.SUCCESS and int(ok_rows) == bj.Status.SUCCESS


def test_defect3_saddle_point_empty_sets_error_when_concrete():
    with pytest.raises(ValueError, match="v_set: Simplex needs total >= 0"):
        bj.saddle_point(f_saddle, jnp.zeros(2), jnp.zeros(2), TH, v_set=bj.Simplex(-1.0))
    with pytest.raises(ValueError, match="u_set: Box has lo > hi"):
        bj.saddle_point(f_saddle, jnp.zeros(2), jnp.zeros(2), TH, u_set=bj.Box(1.0, 0.0))
    with pytest.raises(ValueError, match="Ball needs radius >= 0"):
        # A product set (container) is checked entry by entry.
        bj.saddle_point(lambda u, v, t: f_saddle(u[0], v, t), (jnp.zeros(2),), jnp.zeros(2), TH,
                        u_set=(bj.Ball(-1.0),))


@jax.jit
def _saddle_traced_sets(a):
    simplex = bj.saddle_point(f_saddle, jnp.zeros(2), jnp.zeros(2), TH, v_set=bj.Simplex(a))
    box = bj.saddle_point(f_saddle, jnp.zeros(2), jnp.zeros(2), TH, u_set=bj.Box(-a, 0.0))
    ball = bj.saddle_point(f_saddle, jnp.zeros(2), jnp.zeros(2), TH, u_set=bj.Ball(a))
    return simplex, box, ball


def test_defect3_saddle_point_empty_sets_are_infeasible_when_traced():
    for sol in _saddle_traced_sets(-1.0):
        assert int(sol.info.status) == bj.Status.INFEASIBLE
        assert not bool(sol.info.converged)
    for sol in _saddle_traced_sets(1.0):
        assert int(sol.info.status) == bj.Status.SUCCESS


def test_defect3_projections_of_empty_sets():
    z = jnp.ones(3)
    for s, match in ((bj.Simplex(-1.0), "total >= 0"), (bj.Ball(-1.0), "radius >= 0"),
                     (bj.Box(jnp.asarray([0.0, 2.0, 0.0]), 1.0), "lo > hi"),
                     (bj.Halfspace(jnp.zeros(3), -1.0), "a = 0")):
        with pytest.raises(ValueError, match=match):
            s.project(z)
        assert bool(s.empty())
    # Traced data: no projection exists, NaN (never zeros that look like a point of the set).
    traced = jax.jit(lambda a: (bj.Simplex(a).project(z), bj.Ball(a).project(z),
                                bj.Box(0.0, a).project(z)))
    assert all_nan(traced(-1.0))
    assert all_finite(traced(1.0))
    # Boundary cases are not empty: a zero budget or radius is a single point.
    tree_zero = (bj.Simplex(0.0).project(z), bj.Ball(0.0).project(z))
    np.testing.assert_array_equal(np.asarray(tree_zero), 0.0)
    assert bool(bj.Affine(jnp.ones((2, 3)), jnp.asarray([0.0, 1.0])).empty())
    assert not bool(bj.Affine(jnp.ones((2, 3)), jnp.asarray([1.0, 1.0])).empty())


# ------------------------------------------------------------------ defect 4: NaN in, NaN out


@jax.jit
def _argmin_value_and_grad(theta):
    def loss(t):
        sol = bj.argmin(g_quad, jnp.zeros(2), t)
        return sol.y.sum(), sol
    return jax.value_and_grad(loss, has_aux=True)(theta)


def test_defect4_argmin_nan_theta_gives_nan_outputs_and_cotangents():
    (_, sol), grad = _argmin_value_and_grad(TH.at[0].set(jnp.nan))
    assert int(sol.info.status) == bj.Status.NONFINITE
    assert all_nan(sol.y) and all_nan(grad)
    (_, sol), grad = _argmin_value_and_grad(TH)
    assert int(sol.info.status) == bj.Status.SUCCESS and all_finite(grad)


def test_defect4_vmap_judges_each_member():
    batch = jnp.stack([TH, TH.at[1].set(jnp.nan), 2 * TH])
    (_, sol), grad = jax.vmap(_argmin_value_and_grad)(batch)
    np.testing.assert_array_equal(np.asarray(sol.info.status),
                                  [bj.Status.SUCCESS, bj.Status.NONFINITE, bj.Status.SUCCESS])
    assert all_finite(grad[0]) and all_finite(grad[2]) and all_nan(grad[1])
    assert all_finite(sol.y[0]) and all_nan(sol.y[1])


def test_defect4_argmin_max_steps_gives_nan_cotangents_for_every_rule():
    x = jnp.asarray([0.5, -0.3])
    for hypergrad, solver in (("implicit", "gradient"), ("implicit", "newton"),
                              ("finite_difference", "newton"), ("unrolled", "gradient")):
        def loss(t, hypergrad=hypergrad, solver=solver):
            sol = bj.argmin(g_hard, jnp.zeros(2), t, solver=solver, hypergrad=hypergrad,
                            max_iter=1, tol=1e-14)
            return sol.y.sum(), sol.info.status
        (_, status), grad = jax.value_and_grad(loss, has_aux=True)(x)
        assert int(status) == bj.Status.MAX_STEPS, hypergrad
        if hypergrad == "unrolled":  # differentiates the one step it ran: finite by design
            assert all_finite(grad)
        else:
            assert all_nan(grad), hypergrad


def test_defect4_solve_qp_nan_and_infeasible_give_nan_cotangents():
    Q, c = jnp.eye(2), jnp.asarray([1.0, -1.0])
    G, h = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]]), jnp.asarray([-1.0, -1.0])  # y0<=-1, y0>=1

    def loss(c, h):
        sol = bj.solve_qp(Q, c, G=G, h=h)
        return sol.y.sum(), sol.info.status

    vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (value, status), grads = vg(c.at[1].set(jnp.nan), -h)
    assert int(status) == bj.Status.NONFINITE and np.isnan(float(value)) and all_nan(grads)
    (_, status), grads = vg(c, h)
    assert int(status) == bj.Status.INFEASIBLE and all_nan(grads)
    (_, status), grads = vg(c, -h)
    assert int(status) == bj.Status.SUCCESS and all_finite(grads)


def test_defect4_saddle_point_and_bilevel_layer_failures_give_nan_cotangents():
    def saddle_loss(t, max_iter):
        sol = bj.saddle_point(f_saddle, jnp.zeros(2), jnp.zeros(2), t, solver="extragradient",
                              max_iter=max_iter)
        return sol.u.sum(), sol.info.status

    (_, status), grad = jax.value_and_grad(saddle_loss, has_aux=True)(TH, 2)
    assert int(status) == bj.Status.MAX_STEPS and all_nan(grad)
    (_, status), grad = jax.value_and_grad(saddle_loss, has_aux=True)(TH.at[0].set(jnp.nan), 50)
    assert int(status) == bj.Status.NONFINITE and all_nan(grad)

    def f(x, y, z):
        return (x - 1.0) ** 2 + (y - z) ** 2

    def g(x, y, z):
        return (y - x) ** 2 + 0.1 * y**4

    def layer_loss(z, max_iter):
        sol = bj.bilevel_layer(f, g, 0.0, 0.0, z, max_iter=max_iter, tol=1e-14)
        return sol.x + sol.y, sol.info.status

    (_, status), grad = jax.value_and_grad(layer_loss, has_aux=True)(0.5, 1)
    assert int(status) == bj.Status.MAX_STEPS and np.isnan(float(grad))
    (_, status), grad = jax.value_and_grad(layer_loss, has_aux=True)(0.5, 100)
    assert int(status) == bj.Status.SUCCESS and np.isfinite(float(grad))


# ------------------------------------------------------------------ defect 5: throw=True

_THROW = dict(solver="gradient", max_iter=1, throw=True)


def _throwing_solve(t):
    return bj.argmin(g_hard, jnp.zeros(2), t, **_THROW).y


def test_defect5_throw_eager_vmap_grad_raise_solve_error(caplog):
    cases = {
        "eager": lambda: _throwing_solve(TH),
        "vmap": lambda: jax.vmap(_throwing_solve)(jnp.stack([TH, TH])),
        "grad": lambda: jax.grad(lambda t: _throwing_solve(t).sum())(TH),
    }
    with caplog.at_level(logging.ERROR):
        for name, run in cases.items():
            with pytest.raises(bj.SolveError, match="status MAX_STEPS") as err:
                run()
            # One short line, and no unrelated exception (TracerArrayConversionError) chained.
            assert "\n" not in str(err.value) and len(str(err.value)) < 200, name
            assert err.value.__context__ is None and err.value.__cause__ is None, name
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]
    # A successful solve raises nothing.
    bj.argmin(g_hard, jnp.zeros(2), TH, throw=True)


def test_defect5_throw_under_jit_is_a_catchable_jax_runtime_error(caplog):
    jitted = jax.jit(_throwing_solve)
    with caplog.at_level(logging.ERROR):
        with pytest.raises(jax.errors.JaxRuntimeError) as err:
            jitted(TH).block_until_ready()
    last = str(err.value).strip().splitlines()[-1]
    assert last.startswith("SolveError: bilevel_jax solve failed with status MAX_STEPS"), last
    assert not [r for r in caplog.records if "callback failed" in r.getMessage()]
    # SolveError subclasses JaxRuntimeError: one except clause covers every mode.
    assert issubclass(bj.SolveError, jax.errors.JaxRuntimeError)
    # saddle_point and solve_qp go through the same check.
    with pytest.raises(jax.errors.JaxRuntimeError, match="SolveError: .* INFEASIBLE"):
        G, h = jnp.asarray([[1.0, 0.0], [-1.0, 0.0]]), jnp.asarray([-1.0, -1.0])
        jax.jit(lambda h: bj.solve_qp(jnp.eye(2), TH, G=G, h=h, throw=True).y)(h)
    with pytest.raises(bj.SolveError, match="MAX_STEPS"):
        bj.saddle_point(f_saddle, jnp.zeros(2), jnp.zeros(2), TH, solver="extragradient",
                        max_iter=1, throw=True)


# ------------------------------------------------------------------ defect 7: curvature


def test_defect7_nonconvex_lower_level_is_reported():
    for solver in ("newton", "lbfgs"):
        def loss(t, solver=solver):
            sol = bj.argmin(g_nonconvex, jnp.zeros(2), t, solver=solver)
            return sol.y.sum(), sol.info

        (_, info), grad = jax.value_and_grad(loss, has_aux=True)(TH)
        assert int(info.status) == bj.Status.NONCONVEX, solver
        assert int(info.num_steps) <= 2 and not bool(info.converged)
        assert all_nan(grad)


def test_defect7_singular_hessian_is_reported():
    def loss(t, y0):
        sol = bj.argmin(g_singular, y0, t, solver="newton")
        return sol.y.sum(), sol.info

    for y0 in (jnp.zeros(2), jnp.asarray([0.5, 0.5])):  # the latter is already a minimiser
        (_, info), grad = jax.value_and_grad(loss, has_aux=True)(TH, y0)
        assert int(info.status) == bj.Status.SINGULAR
        assert all_nan(grad)
    # A zero Hessian (linear g) is singular too, not non-convex.
    sol = bj.argmin(lambda y, t: t @ y, jnp.zeros(2), TH, solver="newton")
    assert int(sol.info.status) == bj.Status.SINGULAR


def test_defect7_strongly_convex_problems_keep_success():
    # The curvature checks do not fire on well-posed problems, in float64 and float32.
    for dtype in (jnp.float64, jnp.float32):
        for solver in ("newton", "lbfgs"):
            sol = bj.argmin(g_hard, jnp.zeros(2, dtype), TH.astype(dtype), solver=solver)
            assert int(sol.info.status) == bj.Status.SUCCESS, (dtype, solver)
        # Badly scaled but well-posed (a diagonal Hessian 1e-4 ... 1e4) is not singular.
        d = jnp.asarray([1e-4, 1e4], dtype)
        sol = bj.argmin(lambda y, t, d=d: 0.5 * jnp.sum(d * y**2) - t @ y, jnp.zeros(2, dtype),
                        jnp.ones(2, dtype), solver="newton")
        assert int(sol.info.status) == bj.Status.SUCCESS, dtype


def test_defect7_status_enum_is_append_only():
    assert [s.name for s in bj.Status] == [
        "SUCCESS", "MAX_STEPS", "INFEASIBLE", "UNBOUNDED", "NONFINITE", "RANK_DEFICIENT",
        "DIVERGED", "NONCONVEX", "SINGULAR",
    ]
    assert [int(s) for s in bj.Status] == list(range(9))


def test_defect7_argmin_answer_outside_the_domain_of_g_is_not_success():
    # A log barrier's gradient is defined past the barrier: Newton found z = 3.00075, where
    # g is NaN, and reported SUCCESS.
    def g(z, t):
        return 0.5 * z[0] ** 2 - t * z[0] - 1e-3 * jnp.log(1 - z[0] ** 2)

    sol = bj.argmin(g, jnp.zeros(1), 3.0, solver="newton")
    assert int(sol.info.status) != bj.Status.SUCCESS or abs(float(sol.y[0])) < 1
