"""Property tests against an independent reference (issue 10: no silent wrong answer).

Hypothesis draws *seeds* (deterministically: the ``bilevel_ci`` profile in ``conftest.py``);
each seed builds a batch of problems of one fixed shape with ``numpy.random.default_rng`` and
the batch is solved by one compiled, vmapped call, so compilation happens once per solver and
dtype. Every result is judged by ``qp_families.check`` against ``reference`` (Clarabel,
polished on the active set, and the exact KKT hypergradient).

Invariants, one test each so that a fix shows up as one XPASS:

* ``answers``: a ``SUCCESS`` satisfies the KKT conditions, agrees with the reference's ``y``
  and (where ``y*`` is differentiable) its hypergradient w.r.t. every data array; no
  ``SUCCESS`` on an infeasible, unbounded or non-finite problem;
* ``status``: infeasible problems report ``INFEASIBLE``, unbounded ones ``UNBOUNDED``,
  non-finite data ``NONFINITE``, and no solvable problem is called infeasible or unbounded;
* ``nan``: no NaN anywhere with ``SUCCESS``, and no finite gradient without it;
* ``solved``: a problem the reference solves comes back ``SUCCESS``.

``KNOWN_FAILURES`` below is the one list of what fails today; delete an entry when its fix
lands (the test then has to pass: the xfail marks are strict).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sps
import scipy.sparse.linalg as spsl
from hypothesis import given
from hypothesis import strategies as st

import bilevel_jax as bj

import qp_families as fam
import reference as ref_mod

# ------------------------------------------------------------------ known failures (one place)

KNOWN_FAILURES: dict[str, str] = {}


def known(test_id):
    """The strict xfail mark of a ``KNOWN_FAILURES`` entry (a no-op mark otherwise)."""
    return pytest.mark.xfail(test_id in KNOWN_FAILURES, strict=True,
                             reason=KNOWN_FAILURES.get(test_id, ""))


def _marks(test_id):
    if test_id in KNOWN_FAILURES:
        return [pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[test_id])]
    return []


def _param(*values, test_id, slow=False):
    marks = _marks(test_id) + ([pytest.mark.slow] if slow else [])
    return pytest.param(*values, marks=marks, id=test_id)


SEEDS = st.integers(0, 2**32 - 1)
BATCH = 8  # problems per hypothesis example (one vmapped call)

# ------------------------------------------------------------------ solve_qp families

INVARIANTS = ("answers", "status", "nan", "solved")
_SOLVABLE = {"strict", "small_margin", "degenerate", "rankdef_eq", "scaled", "inf_rows",
             "singular_psd", "lp"}
_cache = {}


def _verdicts(solver, family, dtype, seed):
    """The verdicts on one batch (cached: the four invariant tests share each solve)."""
    key = (solver, family, dtype, seed)
    if key not in _cache:
        problems = fam.batch(family, seed, BATCH)
        results = fam.run_batch(problems, dtype, solver)
        _cache[key] = [(p, r, fam.check(p, r, dtype)) for p, r in zip(problems, results,
                                                                        strict=True)]
    return _cache[key]


def _violations(verdicts, invariant):
    bad = []
    for i, (p, r, v) in enumerate(verdicts):
        if invariant == "answers":
            hit = v.silent_wrong
        elif invariant == "status":
            hit = v.wrong_status or v.crash
        elif invariant == "nan":
            hit = v.nan_leak
        else:
            hit = v.expected == "SUCCESS" and r.status != "SUCCESS"
        if hit:
            bad.append(f"#{i} ({p.kind}): {r.status}, expected {v.expected}; "
                       f"{'; '.join(v.reasons) or '-'}")
    return bad


def _qp_params(dtype):
    out = []
    for family in fam.FAMILIES:
        for inv in INVARIANTS:
            if inv == "solved" and family not in _SOLVABLE:
                continue
            out.append(_param(family, inv, test_id=f"qp-{dtype}-{family}-{inv}"))
    return out


def _assert_invariant(solver, family, dtype, invariant, seed):
    verdicts = _verdicts(solver, family, dtype, seed)
    for _, _, v in verdicts:
        assert not v.intent_mismatch, f"generator bug: {v.reasons}"
    bad = _violations(verdicts, invariant)
    assert not bad, f"{family} seed={seed}:\n" + "\n".join(bad)


@pytest.mark.parametrize("family, invariant", _qp_params("float64"))
@given(seed=SEEDS)
def test_qp_float64(family, invariant, seed):
    _assert_invariant("qp", family, "float64", invariant, seed)


@pytest.mark.parametrize("family, invariant", _qp_params("float32"))
@given(seed=SEEDS)
def test_qp_float32(family, invariant, seed):
    _assert_invariant("qp", family, "float32", invariant, seed)


# ------------------------------------------------------------------ argmin vs solve_qp


@pytest.mark.parametrize("family", [
    _param(f, test_id=f"argmin-ineq-{f}") for f in ("strict", "small_margin", "inf_rows")])
@given(seed=SEEDS)
def test_argmin_ineq_agrees_with_solve_qp_and_reference(family, seed):
    """``bj.argmin(g, y0, theta, eq=, ineq=)`` with the quadratic ``g`` of a QP: the same
    ``y`` and hypergradient as ``bj.solve_qp`` and the reference, every answer valid."""
    via_argmin = _verdicts("argmin", family, "float64", seed)
    via_qp = _verdicts("qp", family, "float64", seed)
    bad = _violations(via_argmin, "answers") + _violations(via_argmin, "solved")
    bad += _violations(via_argmin, "nan")
    for i, ((_, ra, _), (_, rq, _)) in enumerate(zip(via_argmin, via_qp, strict=True)):
        if ra.status == rq.status == "SUCCESS":
            err = ref_mod.relative_error(ra.y, rq.y, floor=1.0)
            if err > 1e-8:
                bad.append(f"#{i}: argmin and solve_qp differ in y by {err:.1e}")
    assert not bad, f"{family} seed={seed}:\n" + "\n".join(bad)


# ------------------------------------------------------------------ argmin(box=)


@pytest.mark.parametrize("family, dtype, invariant", [
    _param(f, d, inv, test_id=f"box-{d}-{f}-{inv}")
    for d in ("float64", "float32") for f in fam.BOX_FAMILIES
    for inv in ("answers", "status", "nan") + (("solved",) if f == "box" else ())])
@given(seed=SEEDS)
def test_argmin_box(family, dtype, invariant, seed):
    """``bj.argmin(g, y0, (Q, c, lo, hi), box=...)`` against the reference QP with
    ``G = [I; -I]``: ``y`` and the gradients w.r.t. ``Q``, ``c``, ``lo``, ``hi``; ``lo > hi``
    in one coordinate is INFEASIBLE."""
    _assert_invariant("argmin_box", family, dtype, invariant, seed)


def _grid_problem(side, dtype):
    """The issue's defect-2 problem: ``g = 1/2 y'(I + 0.2 Lap)y - theta'y`` on a periodic
    ``side x side`` grid (5-point Laplacian), box ``[-0.3, 0.3]``, ``theta ~ N(0, 1)``."""
    n = side * side
    eye = sps.identity(side, format="csr")
    shift = sps.lil_matrix((side, side))
    shift.setdiag(1.0, 1)
    shift.setdiag(1.0, -1)
    shift[0, side - 1] = shift[side - 1, 0] = 1.0
    lap1 = 2 * eye - shift.tocsr()
    lap = sps.kron(lap1, eye) + sps.kron(eye, lap1)
    H = (sps.identity(n) + 0.2 * lap).tocsr()
    theta = np.random.default_rng(0).standard_normal(n)

    def hvp(y):
        Y = y.reshape(side, side)
        nb = (jnp.roll(Y, 1, 0) + jnp.roll(Y, -1, 0) + jnp.roll(Y, 1, 1) + jnp.roll(Y, -1, 1))
        return (Y + 0.2 * (4 * Y - nb)).reshape(-1)

    def g(y, th):
        return 0.5 * y @ hvp(y) - th @ y

    return H, theta.astype(dtype), g


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [_param(d, test_id=f"box-large-{d}") for d in
                                   ("float64", "float32")])
def test_argmin_box_large_matrix_free(dtype):
    """10^4 variables, matrix-free box rule: hypergradient of ``sum(sin(y*))`` within
    1e-3 (float32) / 1e-8 (float64) of the exact masked system, solved in float64 by SciPy."""
    H, theta, g = _grid_problem(100, dtype)
    box = lambda th: (-0.3, 0.3)  # noqa: E731
    y0 = jnp.zeros(theta.shape, dtype)

    def upper(th):
        sol = bj.argmin(g, y0, th, box=box)
        return jnp.sum(jnp.sin(sol.y)), sol

    (_, sol), grad = jax.jit(jax.value_and_grad(upper, has_aux=True))(jnp.asarray(theta))
    assert int(sol.info.status) == bj.Status.SUCCESS
    # Reference: guess the active set from a float64 solve, solve the box QP on it with
    # SciPy, and certify it: free coordinates strictly inside the box, active ones with a
    # gradient pushing outwards (strict complementarity). Then the masked system.
    th64 = np.asarray(theta, np.float64)
    y64 = np.asarray(bj.argmin(g, jnp.zeros(theta.shape), jnp.asarray(th64), box=box).y)
    free = np.abs(y64) < 0.3 - 1e-6
    y_ref = np.where(y64 > 0, 0.3, -0.3)
    Hff = H[free][:, free].tocsc()
    y_ref[free] = spsl.spsolve(Hff, th64[free] - H[free][:, ~free] @ y_ref[~free])
    grad_y = H @ y_ref - th64
    assert np.all(np.abs(y_ref[free]) < 0.3), "reference: a free coordinate leaves the box"
    assert np.all(-grad_y[~free] * np.sign(y_ref[~free]) > 0), "reference: not optimal"
    w = np.zeros_like(th64)
    w[free] = spsl.spsolve(Hff, np.cos(y_ref[free]))
    err = np.linalg.norm(np.asarray(grad, np.float64) - w) / np.linalg.norm(w)
    assert err <= (1e-3 if dtype == "float32" else 1e-8), f"relative error {err:.2e}"


# ------------------------------------------------------------------ inconsistent sets, NaN


@known("argmin-box-lo-gt-hi")
def test_argmin_box_inconsistent_bounds_are_not_success():
    """``lo > hi``: an error for concrete data, INFEASIBLE when traced (defect 3)."""
    g = lambda y, th: 0.5 * y @ y - th @ y  # noqa: E731
    theta = jnp.array([0.5, -0.2])
    for box in (lambda t: (1.0, 0.0), lambda t: (jnp.array([0.0, 1.0]), jnp.array([1.0, 0.5]))):
        try:
            sol = bj.argmin(g, jnp.zeros(2), theta, box=box)
        except ValueError:
            continue
        assert int(sol.info.status) != bj.Status.SUCCESS
    traced = jax.jit(lambda lo: bj.argmin(g, jnp.zeros(2), theta, box=lambda t: (lo, 0.0)))(1.0)
    assert int(traced.info.status) == bj.Status.INFEASIBLE


@pytest.mark.parametrize("sets", [
    _param(dict(v_set=bj.Simplex(-1.0)), test_id="saddle-set-simplex-negative", slow=True),
    _param(dict(u_set=bj.Box(1.0, 0.0)), test_id="saddle-set-box-lo-gt-hi"),
    _param(dict(u_set=bj.Ball(-1.0)), test_id="saddle-set-ball-negative", slow=True),
])
def test_saddle_point_inconsistent_sets_are_not_success(sets):
    """Empty sets: an error for concrete data, never SUCCESS (defect 3)."""
    f = lambda u, v, th: 0.5 * u @ u - 0.5 * v @ v + u @ v + th @ u  # noqa: E731
    try:
        sol = bj.saddle_point(f, jnp.zeros(2), jnp.ones(2) / 2, jnp.array([0.3, -0.1]), **sets)
    except ValueError:
        return
    assert int(sol.info.status) != bj.Status.SUCCESS


def _nan_cases():
    g = lambda y, th: 0.5 * y @ y - th @ y  # noqa: E731
    f = lambda u, v, th: 0.5 * u @ u - 0.5 * v @ v + u @ v + th @ u  # noqa: E731
    G, h = jnp.array([[1.0, 1.0]]), jnp.array([0.5])
    return {
        "argmin": lambda th: bj.argmin(g, jnp.zeros(2), th),
        "argmin-ineq": lambda th: bj.argmin(g, jnp.zeros(2), th, ineq=lambda t: (G, h)),
        "argmin-box": lambda th: bj.argmin(g, jnp.zeros(2), th, box=lambda t: (-0.2, 0.2)),
        "saddle": lambda th: bj.saddle_point(f, jnp.zeros(2), jnp.zeros(2), th),
        "saddle-box": lambda th: bj.saddle_point(f, jnp.zeros(2), jnp.zeros(2), th,
                                                 u_set=bj.Box(-0.2, 0.2)),
    }


@pytest.mark.parametrize("name", [_param(n, test_id=f"nan-{n}", slow=n != "argmin")
                                  for n in _nan_cases()])
def test_nan_theta_gives_no_success_and_nan_gradient(name):
    """NaN in theta: status not SUCCESS, outputs and cotangents NaN (defect 4)."""
    solve = _nan_cases()[name]
    theta = jnp.array([jnp.nan, 0.3])
    sol = solve(theta)
    assert int(sol.info.status) != bj.Status.SUCCESS
    first = lambda s: s.y if hasattr(s, "y") else s.u  # noqa: E731
    grad = jax.grad(lambda th: jnp.sum(first(solve(th))))(theta)
    assert np.all(np.isnan(np.asarray(grad))), f"finite cotangent {grad} with a NaN input"


# ------------------------------------------------------------------ saddle_point over sets

_SADDLE_SETS = {
    "box-box": (bj.Box(-0.4, 0.4), bj.Box(-0.3, 0.5)),
    "ball-simplex": (bj.Ball(0.6), bj.Simplex()),
    "simplex-ball": (bj.Simplex(), bj.Ball(0.5)),
}
NU, NV = 4, 3


def _np_project(kind, s, z):
    if kind == "Box":
        return np.clip(z, s.lo, s.hi)
    if kind == "Ball":
        nz = np.linalg.norm(z)
        return z if nz <= s.radius else z * (s.radius / nz)
    # Simplex with total t: sort-based Euclidean projection
    t = s.total
    mu = np.sort(z)[::-1]
    cs = np.cumsum(mu) - t
    rho = np.nonzero(mu - cs / np.arange(1, z.size + 1) > 0)[0][-1]
    return np.maximum(z - cs[rho] / (rho + 1), 0.0)


def _np_project_jacobian(kind, s, z):
    """Jacobian of the projection at ``z`` (away from kinks)."""
    if kind == "Box":
        return np.diag(((z > s.lo) & (z < s.hi)).astype(float))
    if kind == "Ball":
        nz = np.linalg.norm(z)
        if nz <= s.radius:
            return np.eye(z.size)
        return (s.radius / nz) * (np.eye(z.size) - np.outer(z, z) / nz**2)
    supp = (_np_project(kind, s, z) > 0).astype(float)
    return np.diag(supp) - np.outer(supp, supp) / supp.sum()


def _saddle_data(seed):
    """``f = 1/2 u'Pu + u'Bv - 1/2 v'Rv + a'u + b'v``, ``P``, ``R`` SPD (strongly
    convex-concave)."""
    rng = np.random.default_rng(seed)
    P = fam._spd(rng, NU, 1.0, 3.0)
    R = fam._spd(rng, NV, 1.0, 3.0)
    B = rng.standard_normal((NU, NV))
    a, b = rng.standard_normal(NU), rng.standard_normal(NV)
    wu, wv = rng.standard_normal(NU), rng.standard_normal(NV)
    return P, R, B, a, b, wu, wv


def _saddle_reference(P, R, B, a, b, wu, wv, usets, vsets):
    """NumPy: projected extragradient to a 1e-13 natural residual, then the derivative of
    ``wu'u* + wv'v*`` w.r.t. ``(a, b)`` from the projection Jacobian ``D`` at
    ``z - F(z)``: ``dz = -(I - D(I - J))^-1 D dF``."""
    ku, kv = type(usets).__name__, type(vsets).__name__

    def F(u, v):
        return P @ u + B @ v + a, -(B.T @ u - R @ v + b)

    def proj(u, v):
        return _np_project(ku, usets, u), _np_project(kv, vsets, v)

    J = np.block([[P, B], [-B.T, R]])
    eta = 0.5 / np.linalg.norm(J, 2)
    u, v = proj(np.zeros(NU), np.full(NV, 1.0 / NV))
    for _ in range(20000):
        gu, gv = F(u, v)
        uh, vh = proj(u - eta * gu, v - eta * gv)
        gu, gv = F(uh, vh)
        u, v = proj(u - eta * gu, v - eta * gv)
        gu, gv = F(u, v)
        ru, rv = proj(u - gu, v - gv)
        if max(np.abs(u - ru).max(), np.abs(v - rv).max()) < 1e-13:
            break
    gu, gv = F(u, v)
    D = np.zeros((NU + NV, NU + NV))
    D[:NU, :NU] = _np_project_jacobian(ku, usets, u - gu)
    D[NU:, NU:] = _np_project_jacobian(kv, vsets, v - gv)
    M = np.eye(NU + NV) - D @ (np.eye(NU + NV) - J)
    dF = np.block([[np.eye(NU), np.zeros((NU, NV))], [np.zeros((NV, NU)), -np.eye(NV)]])
    dz = -np.linalg.solve(M, D @ dF)  # columns: d(u, v)/d(a, b)
    w = np.concatenate([wu, wv])
    grad = dz.T @ w
    return u, v, grad[:NU], grad[NU:]


def _saddle_f(u, v, th):
    P, R, B, a, b = th
    return 0.5 * u @ P @ u + u @ B @ v - 0.5 * v @ R @ v + a @ u + b @ v


@pytest.mark.parametrize("sets", [_param(k, test_id=f"saddle-{k}", slow=k != "box-box")
                                  for k in _SADDLE_SETS])
@given(seed=SEEDS)
def test_saddle_point_over_sets(sets, seed):
    """Strongly convex-concave quadratic saddles over boxes, balls and simplices: ``(u*, v*)``
    and the gradient of ``wu'u* + wv'v*`` w.r.t. ``(a, b)`` against a NumPy reference."""
    usets, vsets = _SADDLE_SETS[sets]
    P, R, B, a, b, wu, wv = _saddle_data(seed)
    u_ref, v_ref, ga_ref, gb_ref = _saddle_reference(P, R, B, a, b, wu, wv, usets, vsets)
    sol, (ga, gb) = _saddle_solver(sets)(P, R, B, a, b, wu, wv)
    assert int(sol.info.status) == bj.Status.SUCCESS
    np.testing.assert_allclose(sol.u, u_ref, atol=1e-8)
    np.testing.assert_allclose(sol.v, v_ref, atol=1e-8)
    np.testing.assert_allclose(ga, ga_ref, atol=1e-7, rtol=1e-6)
    np.testing.assert_allclose(gb, gb_ref, atol=1e-7, rtol=1e-6)


_saddle_jits = {}


def _saddle_solver(sets):
    if sets not in _saddle_jits:
        usets, vsets = _SADDLE_SETS[sets]

        def loss(a, b, P, R, B, wu, wv):
            sol = bj.saddle_point(_saddle_f, jnp.zeros(NU), jnp.full(NV, 1.0 / NV),
                                  (P, R, B, a, b), u_set=usets, v_set=vsets)
            return wu @ sol.u + wv @ sol.v, sol

        vg = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

        def run(P, R, B, a, b, wu, wv):
            (_, sol), grads = vg(a, b, P, R, B, wu, wv)
            return sol, grads

        _saddle_jits[sets] = run
    return _saddle_jits[sets]


def test_saddle_reference_matches_central_differences():
    """The NumPy saddle reference's derivative against central differences of itself."""
    usets, vsets = _SADDLE_SETS["ball-simplex"]
    P, R, B, a, b, wu, wv = _saddle_data(3)
    _, _, ga, gb = _saddle_reference(P, R, B, a, b, wu, wv, usets, vsets)
    eps = 1e-6
    for k in range(NU):
        e = np.eye(NU)[k] * eps
        up = _saddle_reference(P, R, B, a + e, b, wu, wv, usets, vsets)
        um = _saddle_reference(P, R, B, a - e, b, wu, wv, usets, vsets)
        fd = (wu @ (up[0] - um[0]) + wv @ (up[1] - um[1])) / (2 * eps)
        assert abs(fd - ga[k]) < 1e-6
    for k in range(NV):
        e = np.eye(NV)[k] * eps
        up = _saddle_reference(P, R, B, a, b + e, wu, wv, usets, vsets)
        um = _saddle_reference(P, R, B, a, b - e, wu, wv, usets, vsets)
        fd = (wu @ (up[0] - um[0]) + wv @ (up[1] - um[1])) / (2 * eps)
        assert abs(fd - gb[k]) < 1e-6


# ------------------------------------------------------------------ bilevel_layer

NX, NY, NZ = 3, 4, 2


def _layer_data(seed):
    """``g = 1/2 y'Hy - y'(Bx + Cz)``, ``f = 1/2 x'Px + x'Ez + 1/2 ||y - Wz||^2``."""
    rng = np.random.default_rng(seed)
    return dict(H=fam._spd(rng, NY, 1.0, 3.0), B=rng.standard_normal((NY, NX)),
                C=rng.standard_normal((NY, NZ)), P=fam._spd(rng, NX, 1.0, 3.0),
                E=rng.standard_normal((NX, NZ)), W=rng.standard_normal((NY, NZ))), rng


def _layer_closed_form(d, z):
    """``y*(x) = M x + H^-1 C z`` with ``M = H^-1 B``; ``x*`` minimises the quadratic
    ``phi(x) = 1/2 x'Px + x'Ez + 1/2 ||Mx + Nz||^2``, ``N = H^-1 C - W``."""
    M = np.linalg.solve(d["H"], d["B"])
    HC = np.linalg.solve(d["H"], d["C"])
    N = HC - d["W"]
    S = d["P"] + M.T @ M
    Dx = -np.linalg.solve(S, d["E"] + M.T @ N)  # dx*/dz
    Dy = M @ Dx + HC
    return Dx @ z, Dy @ z, Dx, Dy


def _layer_g(x, y, z):
    return 0.5 * y @ z["H"] @ y - y @ (z["B"] @ x + z["C"] @ z["z"])


def _layer_f(x, y, z):
    return (0.5 * x @ z["P"] @ x + x @ z["E"] @ z["z"]
            + 0.5 * jnp.sum((y - z["W"] @ z["z"]) ** 2))


@jax.jit
def _layer_solve(zd, wx, wy):
    def loss(zvec):
        sol = bj.bilevel_layer(_layer_f, _layer_g, jnp.zeros(NX), jnp.zeros(NY),
                               {**zd, "z": zvec})
        return wx @ sol.x + wy @ sol.y, sol

    return jax.value_and_grad(loss, has_aux=True)(zd["z"])


@given(seed=SEEDS)
def test_bilevel_layer_random_quadratic_closed_form(seed):
    """Random quadratic bilevel programs: ``x*``, ``y*`` and the gradient of
    ``wx'x* + wy'y*`` w.r.t. the layer input against the closed form."""
    d, rng = _layer_data(seed)
    z = rng.standard_normal(NZ)
    wx, wy = rng.standard_normal(NX), rng.standard_normal(NY)
    x_ref, y_ref, Dx, Dy = _layer_closed_form(d, z)
    (_, sol), grad = _layer_solve({**d, "z": z}, wx, wy)
    assert int(sol.info.status) == bj.Status.SUCCESS
    np.testing.assert_allclose(sol.x, x_ref, atol=1e-9)
    np.testing.assert_allclose(sol.y, y_ref, atol=1e-9)
    np.testing.assert_allclose(grad, Dx.T @ wx + Dy.T @ wy, atol=1e-8, rtol=1e-8)


# ------------------------------------------------------------------ the reference itself


def test_reference_hypergradient_matches_central_differences():
    """The reference's KKT hypergradient (and its sign conventions) against central
    differences of the reference solve, on one strictly complementary problem with an
    infinite row."""
    prob = fam.gen_inf_rows(np.random.default_rng(7))
    ref, data = fam.reference_of(prob)
    assert ref.strict
    want = ref_mod.hypergradient(*data, ref, prob.v)
    for key, X in zip(fam.KEYS, data, strict=True):
        fd = np.zeros_like(X)
        for idx in np.ndindex(X.shape):
            if not np.isfinite(X[idx]):
                continue
            step = 1e-6 * max(1.0, abs(X[idx]))
            hi, lo = [list(data) for _ in range(2)]
            hi[fam.KEYS.index(key)] = X.copy()
            hi[fam.KEYS.index(key)][idx] += step
            lo[fam.KEYS.index(key)] = X.copy()
            lo[fam.KEYS.index(key)][idx] -= step
            fd[idx] = prob.v @ (ref_mod.solve(*hi).y - ref_mod.solve(*lo).y) / (2 * step)
        if key == "Q":
            fd = 0.5 * (fd + fd.T)
        np.testing.assert_allclose(want[key], fd, atol=1e-7, err_msg=key)


def test_reference_verdicts_on_the_issue_examples():
    """The issue's small cases: a singular-Q QP with a unique answer, an LP, an infeasible
    LP and an unbounded LP; and a KKT checker that sees a violation."""
    Q = np.array([[1.0, 0, 1], [0, 1, 1], [1, 1, 2]])
    r = ref_mod.solve(Q, np.array([1, -1, 0.5]), np.array([[1.0, 2, 0]]), np.array([1.0]))
    np.testing.assert_allclose(r.y, [-8 / 9, 17 / 18, -5 / 18], atol=1e-12)
    assert r.unique
    G = np.vstack([-np.eye(3), np.ones((1, 3))])
    r = ref_mod.solve(np.zeros((3, 3)), np.array([2, -2.6, 0.4]), None, None, G, np.ones(4))
    np.testing.assert_allclose(r.y, [-1, 3, -1], atol=1e-12)
    assert r.strict
    infeasible = ref_mod.solve(np.zeros((1, 1)), np.ones(1), None, None,
                               np.array([[-1.0], [1.0]]), np.array([-1.0, -1.0]))
    assert infeasible.status == ref_mod.INFEASIBLE
    unbounded = ref_mod.solve(np.zeros((2, 2)), np.array([-1.0, 0.0]), np.array([[0.0, 1.0]]),
                              np.zeros(1))
    assert unbounded.status == ref_mod.UNBOUNDED
    res = ref_mod.kkt_residuals(Q, np.ones(3), None, None, G, np.ones(4), np.full(3, 2.0),
                                None, np.zeros(4))
    assert res["primal"] > 0.1 and res["dual"] > 0.1
