"""Random QP families, batched library solves, and the verdict on each result.

Shared by ``tests/test_properties.py`` (a few seeds per family, deterministic) and
``bench/fuzz.py`` (thousands of problems). Every generator takes a NumPy ``Generator`` and
returns a :class:`Problem` of the fixed shape ``SHAPE`` (so one compiled, vmapped solve serves
every family); :func:`check` compares a library result with :mod:`reference` and returns a
:class:`Verdict`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

import jax
import jax.numpy as jnp
import numpy as np

import bilevel_jax as bj

import reference as ref_mod

N, P, K = 8, 2, 24  # variables, equalities, inequality rows (16 of them box rows where used)
SHAPE = (N, P, K)
KEYS = ("Q", "c", "A", "b", "G", "h")

# Pass/fail thresholds, by dtype: relative KKT residual (reference.kkt_residuals), relative
# error of y, relative error of each hypergradient block, and the largest condition number of
# the (equilibrated) active-set KKT matrix at which y and the hypergradient are compared.
# float64: the library's default tolerance is 1e-10, ours 100x looser for the different
# residual scaling; a 1e-5 hypergradient error is what the issue calls a silent wrong answer.
# The hypergradient is compared where the strict-complementarity margin (reference.Reference)
# exceeds ``margin``: in float32 a multiplier or slack below ~100x the solver's tolerance
# cannot be told from zero, so the derivative there is not well defined at that precision.
# float32: tolerance 1e-5 in the library. Beyond ~1e3 the allowed error grows as
# 16 cond eps (see _allowed); above cond 1e5 float32 keeps under two digits and only the KKT
# residual is checked.
TOLERANCES = {
    "float64": dict(kkt=1e-8, y=1e-6, grad=1e-5, cond=1e12, margin=1e-6),
    "float32": dict(kkt=1e-3, y=1e-3, grad=1e-3, cond=1e5, margin=1e-3),
}


def _allowed(base, cond, dtype):
    """Error allowed for y or a hypergradient: ``base``, or 16 ``cond * eps`` when larger (a
    backward-stable solve loses about ``cond * eps``)."""
    return max(base, 16 * float(np.finfo(dtype).eps) * cond)


@dataclass
class Problem:
    """One QP instance (float64 NumPy data) and what its generator meant it to be."""

    Q: np.ndarray
    c: np.ndarray
    A: np.ndarray
    b: np.ndarray
    G: np.ndarray
    h: np.ndarray
    expect: str = "optimal"  # optimal | infeasible | unbounded | nonfinite
    kind: str = ""  # sub-kind, for reports
    v: np.ndarray = field(default=None)  # direction of the linear functional v'y

    def data(self):
        return (self.Q, self.c, self.A, self.b, self.G, self.h)


# ------------------------------------------------------------------ building blocks


def _spd(rng, n, lo=0.5, hi=5.0):
    """A random SPD matrix with eigenvalues in [lo, hi]."""
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    return (U * rng.uniform(lo, hi, n)) @ U.T


def _psd(rng, n, rank, lo=0.5, hi=5.0):
    """A random PSD matrix of the given rank, and an orthonormal basis of its null space."""
    U = np.linalg.qr(rng.standard_normal((n, n)))[0]
    ev = np.zeros(n)
    ev[:rank] = rng.uniform(lo, hi, rank)
    return (U * ev) @ U.T, U[:, rank:]


def _box_rows(n, bound):
    """``[I; -I] y <= [bound; bound]``: rows of a bounding box ``|y_i| <= bound``."""
    return np.vstack([np.eye(n), -np.eye(n)]), np.full(2 * n, float(bound))


def _design(rng, Q, A, G, active, slack=None, lam=None, weak=()):
    """Data ``(c, b, h)`` making ``(y*, nu*, lam*)`` a KKT point with the given active rows.

    Active rows get ``lam`` in [0.3, 3] (or the values given) and slack 0; weakly active rows
    slack 0 and ``lam = 0``; the others ``lam = 0`` and slack in [0.3, 3] (or ``slack``).
    """
    n, p, k = Q.shape[0], A.shape[0], G.shape[0]
    y = rng.standard_normal(n)
    nu = rng.standard_normal(p)
    lam_v = np.zeros(k)
    active = list(active)
    lam_v[active] = rng.uniform(0.3, 3.0, len(active)) if lam is None else lam
    s = rng.uniform(0.3, 3.0, k) if slack is None else np.array(slack, float)
    s[active] = 0.0
    s[list(weak)] = 0.0
    c = -(Q @ y + A.T @ nu + G.T @ lam_v)
    return c, A @ y, G @ y + s, y


def _v(rng, n):
    return rng.standard_normal(n)


# ------------------------------------------------------------------ families


def gen_strict(rng, n=N, p=P, k=K):
    """Strictly convex QP, random active set (0..n-p rows), clear margins (>= 0.3)."""
    Q = _spd(rng, n)
    A = rng.standard_normal((p, n))
    G = rng.standard_normal((k, n))
    m = int(rng.integers(0, n - p + 1))
    active = rng.choice(k, m, replace=False)
    c, b, h, _ = _design(rng, Q, A, G, active)
    return Problem(Q, c, A, b, G, h, kind=f"{m}-active", v=_v(rng, n))


def gen_small_margin(rng, n=N, p=P, k=K):
    """Strictly complementary but with small margins: active multipliers and inactive slacks
    in 1e-5..1e-3 (the issue's defect 1: lam = 1.2e-5 at an active row)."""
    Q = _spd(rng, n)
    A = rng.standard_normal((p, n))
    G = rng.standard_normal((k, n))
    m = int(rng.integers(1, n - p + 1))
    active = rng.choice(k, m, replace=False)
    lam = 10 ** rng.uniform(-5, -3, m)
    slack = np.where(rng.random(k) < 0.5, 10 ** rng.uniform(-5, -3, k), rng.uniform(0.3, 3.0, k))
    c, b, h, _ = _design(rng, Q, A, G, active, slack=slack, lam=lam)
    return Problem(Q, c, A, b, G, h, kind=f"{m}-active", v=_v(rng, n))


def gen_degenerate(rng, n=N, p=P, k=K):
    """Degenerate: weakly active rows (slack 0, lam 0), duplicated and parallel active rows."""
    Q = _spd(rng, n)
    A = rng.standard_normal((p, n))
    G = rng.standard_normal((k, n))
    m = int(rng.integers(1, n - p))  # distinct active directions (room for one weak row)
    rows = rng.permutation(k)
    active, rest = list(rows[:m]), list(rows[m:])
    n_weak = int(rng.integers(0, 3))
    weak = [rest.pop() for _ in range(min(n_weak, n - p - m))]
    dup = rest.pop()  # a copy of an active row: same normal, same bound
    par = rest.pop()  # a positive multiple of an active row (and of its bound)
    i, j = rng.choice(active, 2) if m > 1 else (active[0], active[0])
    alpha = 2.0 ** int(rng.integers(-3, 4))  # a power of 2: exactly parallel in float32 too
    G[dup] = G[i]
    G[par] = alpha * G[j]
    lam = rng.uniform(0.3, 3.0, m)
    c, b, h, _ = _design(rng, Q, A, G, active, lam=lam, weak=weak)
    h[dup] = h[i]
    h[par] = alpha * h[j]
    return Problem(Q, c, A, b, G, h, kind=f"weak={len(weak)}", v=_v(rng, n))


def gen_rankdef_eq(rng, n=N, p=P, k=K):
    """Rank-deficient but consistent equalities (a row that is a power-of-2 multiple of the
    other, so that the rounding to float32 keeps them consistent)."""
    Q = _spd(rng, n)
    A = rng.standard_normal((p, n))
    A[1] = rng.choice([-4.0, -2.0, -0.5, 0.5, 2.0, 4.0]) * A[0]  # exact in float32 too
    G = rng.standard_normal((k, n))
    m = int(rng.integers(0, n - p + 1))
    active = rng.choice(k, m, replace=False)
    c, b, h, _ = _design(rng, Q, A, G, active)
    return Problem(Q, c, A, b, G, h, kind="dependent-A", v=_v(rng, n))


def gen_infeasible(rng, n=N, p=P, k=K):
    """Infeasible: inconsistent equalities, an empty polyhedron, lo > hi, or an empty LP."""
    kind = ["equalities", "polyhedron", "box", "lp"][int(rng.integers(4))]
    prob = gen_strict(rng, n, p, k)
    Q, c, A, b, G, h = (x.copy() for x in prob.data())
    if kind == "equalities":
        A[1] = rng.uniform(-3, 3) * A[0]
        b[1] = A[1] @ np.linalg.lstsq(A[:1], b[:1], rcond=None)[0] + rng.choice([-1, 1]) * (
            rng.uniform(0.1, 2.0))
    elif kind == "polyhedron":  # g'y <= h_i and -g'y <= -h_i - delta
        i, j = rng.choice(k, 2, replace=False)
        G[j] = -G[i]
        h[j] = -h[i] - rng.uniform(0.1, 2.0)
    elif kind == "box":  # y_i <= lo and y_i >= hi with lo < hi
        i = int(rng.integers(n))
        r1, r2 = rng.choice(k, 2, replace=False)
        lo = rng.uniform(-2, 2)
        G[r1], G[r2] = np.eye(n)[i], -np.eye(n)[i]
        h[r1], h[r2] = lo, -(lo + rng.uniform(0.1, 2.0))
    else:  # an LP over an empty polyhedron inside a box
        Q = np.zeros((n, n))
        B, hb = _box_rows(n, 5.0)
        G[: 2 * n], h[: 2 * n] = B, hb
        i = int(rng.integers(2 * n, k))
        j = 2 * n + (i - 2 * n + 1) % (k - 2 * n)
        G[j] = -G[i]
        h[j] = -h[i] - rng.uniform(0.1, 2.0)
    return Problem(Q, c, A, b, G, h, expect="infeasible", kind=kind, v=prob.v)


def gen_unbounded(rng, n=N, p=P, k=K):
    """Unbounded: ``Q`` singular along a feasible recession direction ``d = +-e_j`` with
    ``c'd < 0`` (``psd``: ``Q`` of rank n - 1 with ``Q d = 0``; ``lp``: ``Q = 0``). The
    direction is a coordinate axis so that ``Q d = 0``, ``A d = 0`` and ``G d <= 0`` stay exact
    after rounding to float32."""
    kind = ["psd", "lp"][int(rng.integers(2))]
    j, sign = int(rng.integers(n)), float(rng.choice([-1.0, 1.0]))
    if kind == "lp":
        Q = np.zeros((n, n))
    else:
        Q = _spd(rng, n)
        Q[j], Q[:, j] = 0.0, 0.0
    A = rng.standard_normal((p, n))
    A[:, j] = 0.0  # A d = 0
    G = rng.standard_normal((k, n))
    G[:, j] = -sign * np.abs(G[:, j])  # G d <= 0: d is a recession direction
    y0 = rng.standard_normal(n)
    b = A @ y0
    h = G @ y0 + rng.uniform(0.0, 2.0, k)
    c = rng.standard_normal(n)
    c[j] = -sign * rng.uniform(0.5, 2.0)  # c'd < 0
    return Problem(Q, c, A, b, G, h, expect="unbounded", kind=kind, v=_v(rng, n))


def gen_scaled(rng, n=N, p=P, k=K):
    """A strict QP with its rows scaled by 1e-4..1e4, its columns by 1e-2..1e2 and its
    objective by 1e-2..1e2 (the same solution up to the column scaling)."""
    prob = gen_strict(rng, n, p, k)
    Q, c, A, b, G, h = prob.data()
    ra = 10 ** rng.uniform(-4, 4, p)
    rg = 10 ** rng.uniform(-4, 4, k)
    dc = 10 ** rng.uniform(-2, 2, n)
    so = 10 ** rng.uniform(-2, 2)
    Q = so * dc[:, None] * Q * dc[None, :]
    c = so * dc * c
    A, b = ra[:, None] * A * dc[None, :], ra * b
    G, h = rg[:, None] * G * dc[None, :], rg * h
    return Problem(Q, c, A, b, G, h, kind=prob.kind, v=prob.v)


def gen_inf_rows(rng, n=N, p=P, k=K):
    """A strict QP with a random third of its rows (active ones included) set to h = +inf."""
    prob = gen_strict(rng, n, p, k)
    h = prob.h.copy()
    h[rng.random(k) < 1 / 3] = np.inf
    prob.h = h
    return prob


def gen_singular_psd(rng, n=N, p=P, k=K):
    """Singular PSD ``Q`` (rank n - 3), unique solution. ``bounded``: a box ``|y| <= 4`` plus
    general rows, with enough active rows that ``Q`` is definite on their null space;
    ``eq-only``: rank n - 2, two equalities, every inequality ``+inf`` (the issue's case)."""
    kind = ["bounded", "eq-only"][int(rng.integers(2))]
    G = rng.standard_normal((k, n))
    A = rng.standard_normal((p, n))
    if kind == "eq-only":
        Q, _ = _psd(rng, n, n - 2)
        c, b, h, _ = _design(rng, Q, A, G, [])
        h = np.full(k, np.inf)
        return Problem(Q, c, A, b, G, h, kind=kind, v=_v(rng, n))
    Q, _ = _psd(rng, n, n - 3)
    B, hb = _box_rows(n, 4.0)
    G[: 2 * n] = B
    # y* inside the box (|y_i| <= ~2.5), a few box rows and general rows active.
    m_box = int(rng.integers(0, 3))
    m_gen = int(rng.integers(max(1 - m_box, 0) + 1, n - p - m_box + 1))
    coords = rng.choice(n, m_box, replace=False)
    box_active = [i if rng.random() < 0.5 else n + i for i in coords]
    gen_active = list(2 * n + rng.choice(k - 2 * n, min(m_gen, k - 2 * n), replace=False))
    active = box_active + gen_active
    y = np.clip(rng.standard_normal(n), -2.5, 2.5)
    for r in box_active:
        y[r % n] = 4.0 if r < n else -4.0
    nu = rng.standard_normal(p)
    lam = np.zeros(k)
    lam[active] = rng.uniform(0.3, 3.0, len(active))
    s = np.zeros(k)
    s[: 2 * n] = hb - B @ y
    s[2 * n:] = rng.uniform(0.3, 3.0, k - 2 * n)
    s[active] = 0.0
    h = G @ y + s
    h[: 2 * n] = np.where(np.isin(np.arange(2 * n), active), h[: 2 * n], hb)
    c = -(Q @ y + A.T @ nu + G.T @ lam)
    return Problem(Q, c, A, A @ y, G, h, kind=kind, v=_v(rng, n))


def gen_lp(rng, n=N, p=P, k=K):
    """An LP (Q = 0) with a bounded feasible set (box |y| <= 5) and a unique, nondegenerate
    optimal vertex: p equalities and n - p active general rows with lam in [0.3, 3]."""
    Q = np.zeros((n, n))
    A = rng.standard_normal((p, n))
    G = rng.standard_normal((k, n))
    B, hb = _box_rows(n, 5.0)
    G[: 2 * n] = B
    y = np.clip(rng.standard_normal(n), -2.0, 2.0)
    active = list(2 * n + rng.choice(k - 2 * n, n - p, replace=False))
    nu = rng.standard_normal(p)
    lam = np.zeros(k)
    lam[active] = rng.uniform(0.3, 3.0, n - p)
    s = np.concatenate([hb - B @ y, rng.uniform(0.3, 3.0, k - 2 * n)])
    s[active] = 0.0
    h = G @ y + s
    c = -(A.T @ nu + G.T @ lam)
    return Problem(Q, c, A, A @ y, G, h, kind="vertex", v=_v(rng, n))


def gen_nonfinite(rng, n=N, p=P, k=K):
    """A strict QP with one entry of one argument replaced by NaN, +inf or -inf (``h``: NaN
    or -inf; ``h_i = -inf`` is an infeasible row, ``+inf`` a valid "no constraint")."""
    prob = gen_strict(rng, n, p, k)
    data = dict(zip(KEYS, (x.copy() for x in prob.data()), strict=True))
    key = KEYS[int(rng.integers(6))]
    X = data[key]
    idx = tuple(int(rng.integers(s)) for s in X.shape)
    val = [np.nan, -np.inf] if key == "h" else [np.nan, np.inf, -np.inf]
    X[idx] = val[int(rng.integers(len(val)))]
    expect = "infeasible" if key == "h" and X[idx] == -np.inf else "nonfinite"
    return Problem(*(data[k_] for k_ in KEYS), expect=expect, kind=f"{key}={X[idx]}", v=prob.v)


def gen_box(rng, n=N, p=0, k=None):
    """A box-constrained strictly convex QP ``lo <= y <= hi`` as ``G = [I; -I]``,
    ``h = [hi; -lo]``: a random third of the coordinates at a bound with a clear multiplier.
    For :func:`bj.argmin` with ``box=``."""
    Q = _spd(rng, n)
    G, _ = _box_rows(n, 1.0)
    lo = -rng.uniform(0.5, 2.0, n)
    hi = rng.uniform(0.5, 2.0, n)
    y = lo + (hi - lo) * rng.uniform(0.2, 0.8, n)
    lam = np.zeros(2 * n)
    for i in np.flatnonzero(rng.random(n) < 1 / 3):
        upper = rng.random() < 0.5
        y[i] = hi[i] if upper else lo[i]
        lam[i if upper else n + i] = rng.uniform(0.3, 3.0)
    c = -(Q @ y + G.T @ lam)
    A, b = np.zeros((0, n)), np.zeros(0)
    return Problem(Q, c, A, b, G, np.concatenate([hi, -lo]), kind="box", v=_v(rng, n))


def gen_box_infeasible(rng, n=N, p=0, k=None):
    """A box QP with ``lo_i > hi_i`` for one coordinate."""
    prob = gen_box(rng, n)
    i = int(rng.integers(n))
    prob.h[n + i] = -(prob.h[i] + rng.uniform(0.1, 1.0))  # lo_i = hi_i + delta
    prob.expect = "infeasible"
    prob.kind = "lo>hi"
    return prob


BOX_FAMILIES = {"box": gen_box, "box_infeasible": gen_box_infeasible}

FAMILIES = {
    "strict": gen_strict,
    "small_margin": gen_small_margin,
    "degenerate": gen_degenerate,
    "rankdef_eq": gen_rankdef_eq,
    "infeasible": gen_infeasible,
    "unbounded": gen_unbounded,
    "scaled": gen_scaled,
    "inf_rows": gen_inf_rows,
    "singular_psd": gen_singular_psd,
    "lp": gen_lp,
    "nonfinite": gen_nonfinite,
}


def batch(family, seed, size):
    """``size`` problems of one family from ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    gen = FAMILIES[family] if family in FAMILIES else BOX_FAMILIES[family]
    return [gen(rng) for _ in range(size)]


def stack(problems, dtype):
    """Stack the problems' data (and ``v``) into batched arrays of ``dtype``."""
    cols = [np.stack([np.asarray(x, dtype) for x in col]) for col in zip(
        *[(*pr.data(), pr.v) for pr in problems], strict=True)]
    return tuple(cols)


# ------------------------------------------------------------------ library solves (batched)


def _qp_loss(Q, c, A, b, G, h, v):
    sol = bj.solve_qp(Q, c, A, b, G, h)
    return jnp.dot(v, sol.y), sol


@cache
def qp_solver():
    """Jitted ``vmap(value_and_grad)`` of ``v'y*`` for :func:`bj.solve_qp` w.r.t. all data."""
    return jax.jit(jax.vmap(jax.value_and_grad(_qp_loss, argnums=(0, 1, 2, 3, 4, 5),
                                               has_aux=True)))


def _quadratic(y, th):
    return 0.5 * y @ (th[0] @ y) + th[1] @ y


def _argmin_loss(theta, v):
    sol = bj.argmin(_quadratic, jnp.zeros_like(v), theta,
                    eq=lambda th: (th[2], th[3]), ineq=lambda th: (th[4], th[5]))
    return jnp.dot(v, sol.y), sol


@cache
def argmin_solver():
    """The same as :func:`qp_solver` through ``bj.argmin(g, y0, theta, eq=, ineq=)``."""
    grad = jax.value_and_grad(_argmin_loss, has_aux=True)

    def fn(Q, c, A, b, G, h, v):
        (val, sol), g = grad((Q, c, A, b, G, h), v)
        return (val, sol), tuple(g)

    return _batched(fn)


def _batched(fn):
    """``jit`` of ``fn`` mapped over a leading batch axis with ``lax.map`` (argmin's vmapped
    value-and-grad once hung in the XLA CPU runtime on this 2-core machine; ``lax.map`` costs
    the same compilation as one problem)."""
    return jax.jit(lambda *xs: jax.lax.map(lambda a: fn(*a), xs))


def _box_loss(Q, c, lo, hi, v):
    sol = bj.argmin(_quadratic, jnp.zeros_like(v), (Q, c, lo, hi),
                    box=lambda th: (th[2], th[3]))
    return jnp.dot(v, sol.y), sol


@cache
def box_solver():
    """``bj.argmin(g, y0, (Q, c, lo, hi), box=...)`` on box problems (``G = [I; -I]``):
    returns the gradients under the keys ``Q``, ``c`` and ``h = [hi; -lo]``."""
    grad = jax.value_and_grad(_box_loss, argnums=(0, 1, 2, 3), has_aux=True)

    def fn(Q, c, A, b, G, h, v):
        n = v.shape[0]
        (val, sol), (gQ, gc, glo, ghi) = grad(Q, c, -h[n:], h[:n], v)
        return (val, sol), (gQ, gc, jnp.concatenate([ghi, -glo]))

    return _batched(fn)


SOLVERS = {"qp": (qp_solver, KEYS), "argmin": (argmin_solver, KEYS),
           "argmin_box": (box_solver, ("Q", "c", "h"))}


@dataclass
class Result:
    """One library result in float64 NumPy: ``y, nu, lam``, status name, gradients by key."""

    y: np.ndarray
    nu: np.ndarray
    lam: np.ndarray
    status: str
    grads: dict
    crash: str = ""


def run_batch(problems, dtype="float64", solver="qp"):
    """Solve a list of problems in one vmapped call; returns a list of :class:`Result`.

    An exception in the batched call is retried problem by problem (a batch of one), and a
    problem that still raises becomes a ``crash`` result.
    """
    make, keys = SOLVERS[solver]
    fn = make()
    try:
        (_, sol), grads = fn(*stack(problems, dtype))
        jax.block_until_ready(grads)
    except Exception as err:  # noqa: BLE001 - a crash is a result here
        if len(problems) == 1:
            nan = np.full(problems[0].Q.shape[0], np.nan)
            return [Result(nan, nan, nan, "CRASH", {}, crash=f"{type(err).__name__}: {err}")]
        return [r for pr in problems for r in run_batch([pr], dtype, solver)]
    out = []
    status = np.asarray(sol.info.status)
    for i in range(len(problems)):
        out.append(Result(
            np.asarray(sol.y[i], np.float64),
            np.asarray(sol.nu[i], np.float64) if sol.nu is not None else np.zeros(0),
            np.asarray(sol.lam[i], np.float64) if sol.lam is not None else np.zeros(0),
            bj.Status(int(status[i])).name,
            {k_: np.asarray(g[i], np.float64) for k_, g in zip(keys, grads, strict=True)},
        ))
    return out


# ------------------------------------------------------------------ verdicts


@dataclass
class Verdict:
    """What one result says about the library (flags are independent)."""

    status: str
    expected: str  # SUCCESS | INFEASIBLE | UNBOUNDED | NONFINITE | "?" (reference undecided)
    silent_wrong: bool = False
    wrong_status: bool = False
    nan_leak: bool = False
    crash: bool = False
    intent_mismatch: bool = False  # the reference disagrees with the generator's intent
    reasons: list = field(default_factory=list)
    kkt: float = np.nan
    y_err: float = np.nan
    grad_err: float = np.nan
    cond: float = np.nan
    compared_grads: tuple = ()

    @property
    def ok(self):
        return not (self.silent_wrong or self.wrong_status or self.nan_leak or self.crash)


_EXPECTED = {ref_mod.OPTIMAL: "SUCCESS", ref_mod.INFEASIBLE: "INFEASIBLE",
             ref_mod.UNBOUNDED: "UNBOUNDED"}


def reference_of(problem, dtype="float64"):
    """The reference solution of the problem's data rounded to ``dtype``."""
    data = [np.asarray(np.asarray(x, dtype), np.float64) for x in problem.data()]
    return ref_mod.solve(*data), data


def grad_keys(ref, min_margin=1e-6):
    """The data blocks whose hypergradient the reference defines exactly: all of them at a
    strictly complementary point with LICQ and a unique solution; only ``Q`` and ``c`` when
    just LICQ fails (the multipliers are not unique but ``y*`` is still differentiable in
    ``(Q, c)``: the null space of the KKT matrix holds multipliers only); none otherwise."""
    if ref.strict and ref.margin > min_margin:
        return KEYS
    if ref.status == ref_mod.OPTIMAL and ref.margin > min_margin and ref.unique:
        return ("Q", "c")
    return ()


def check(problem, result, dtype="float64", ref=None):
    """Judge one library result against the reference; returns a :class:`Verdict`."""
    tol = TOLERANCES[str(np.dtype(dtype))]
    if ref is None:
        ref, data = reference_of(problem, dtype)
    else:
        data = [np.asarray(np.asarray(x, dtype), np.float64) for x in problem.data()]
    if problem.expect == "nonfinite":
        expected = "NONFINITE"
    else:
        expected = _EXPECTED.get(ref.status, "?")
    v = Verdict(result.status, expected, cond=ref.cond)
    if problem.expect != "nonfinite" and ref.status != problem.expect:
        v.intent_mismatch = True
        v.reasons.append(f"reference says {ref.status}, generator meant {problem.expect}")
    if result.crash:
        v.crash = True
        v.reasons.append(result.crash[:200])
        return v
    success = result.status == "SUCCESS"
    gc = result.grads.get("c")
    grad_finite = gc is not None and bool(np.any(np.isfinite(gc)))
    if not success and grad_finite:
        v.nan_leak = True
        v.reasons.append(f"finite gradient with {result.status}")
    if success:
        arrays = [result.y, result.nu, result.lam, *result.grads.values()]
        if not all(np.all(~np.isnan(a)) for a in arrays):
            v.nan_leak = True
            v.reasons.append("NaN with SUCCESS")
    if expected == "?":
        return v
    if expected != "SUCCESS":
        if success:
            v.silent_wrong = True
            v.reasons.append(f"SUCCESS on a problem that is {expected}")
        elif result.status != expected:
            v.wrong_status = True
            v.reasons.append(f"{result.status} instead of {expected}")
        return v
    if not success:
        if result.status in ("INFEASIBLE", "UNBOUNDED"):
            v.wrong_status = True
            v.reasons.append(f"{result.status} on a solvable problem")
        return v
    if result.lam.shape == ref.lam.shape:  # (argmin's box= returns no multipliers)
        v.kkt = ref_mod.kkt_residuals(*data, result.y, result.nu, result.lam)["max"]
        if not v.kkt <= tol["kkt"]:
            v.silent_wrong = True
            v.reasons.append(f"KKT residual {v.kkt:.2e}")
    if ref.cond > tol["cond"]:
        return v
    v.y_err = ref_mod.relative_error(result.y, ref.y, floor=1.0)
    if not v.y_err <= _allowed(tol["y"], ref.cond, dtype):
        v.silent_wrong = True
        v.reasons.append(f"y error {v.y_err:.2e}")
    keys = tuple(k_ for k_ in grad_keys(ref, tol["margin"]) if k_ in result.grads)
    v.compared_grads = keys
    if keys:
        want = ref_mod.hypergradient(*data, ref, problem.v.astype(dtype).astype(np.float64))
        total = np.sqrt(sum(np.linalg.norm(want[k_]) ** 2 for k_ in keys))
        floor = 1e-2 * total
        errs = {k_: ref_mod.relative_error(result.grads[k_], want[k_], floor=floor)
                for k_ in keys}
        # A backward-stable adjoint errs by ~cond eps relative to the whole gradient, so a
        # block measured against its own (smaller) size, down to the floor, may show up to
        # total / max(|block|, floor) <= 100 times that (an LP's d/dQ is exactly 0).
        amp = {k_: total / max(float(np.linalg.norm(want[k_])), floor) for k_ in keys}
        v.grad_err = max(errs.values())
        over = {k_: e_ / max(tol["grad"], 16 * float(np.finfo(dtype).eps) * ref.cond * amp[k_])
                for k_, e_ in errs.items()}
        if max(over.values()) > 1:
            worst = max(over, key=over.get)
            v.silent_wrong = True
            v.reasons.append(f"hypergradient error {errs[worst]:.2e} (d/d{worst})")
    return v
