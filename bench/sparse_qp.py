"""Sparse QP lower level: the 1-D smoothing QP at n = 1e3 ... 1e5 (1e6), against the peers.

    y*(theta) = argmin_y 1/2 y'(I + 0.2 L) y - theta'y
                s.t.  sum(y) = 0.05 n,   y_i - y_{i+1} <= h_i (= 0.05),   -0.3 <= y <= 0.3

with ``L`` the path-graph Laplacian (tridiagonal 2/-1, degree-corrected ends) and
``theta ~ N(0, 1)``. The upper-level loss is a random linear function ``w'y*``; the
hypergradient is taken with respect to ``theta`` and the slope bounds ``h``.

Timed in the same run (medians over ``--reps`` after a warm-up; compile time apart):

* bilevel_jax ``bj.solve_qp_sparse`` (BCOO data): forward, and forward + backward
  (``jax.value_and_grad``), float64 (and float32 with ``--float32``); ``method="direct"``
  (interior point, sparse factorisations) at every ``n``, ``method="admm"`` up to
  ``--admm-max``;
* Clarabel (sparse interior point, CPU, forward only, default settings);
* MPAX raPDHG (forward at ``eps`` 1e-4 and 1e-6; its unrolled gradient, a fixed number of
  iterations, where ``--mpax-unroll`` fits);
* cvxpylayers (forward + backward) up to ``--cvxpylayers-max`` variables.

Accuracy: ``y`` and the two hypergradients against an exact float64 reference: Clarabel at
tight tolerances, polished on its active set, then the KKT system on that set solved with
``scipy.sparse`` (``spsolve``), which shares no code with bilevel_jax. The table is printed
and saved to ``bench/results/sparse_qp.txt`` (``--out`` to change). ``--device`` picks the
JAX platform (``cpu`` or ``gpu``); ``jax.devices()`` is recorded in the output.

Usage::

    nice -n 10 python bench/sparse_qp.py                       # n = 1e3, 1e4, 1e5
    python bench/sparse_qp.py --sizes 1000 --reps 3            # quick
    python bench/sparse_qp.py --device gpu --sizes 100000 1000000 --float32
"""

from __future__ import annotations

import argparse
import os
import sys

import _device


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--reps", type=int, default=5)
    _device.add_option(ap)
    ap.add_argument("--float32", action="store_true", help="also time and check float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-mpax", action="store_true")
    ap.add_argument("--mpax-unroll", type=int, default=0,
                    help="largest n for MPAX's unrolled gradient (0: never)")
    ap.add_argument("--mpax-unroll-iters", type=int, default=2000)
    ap.add_argument("--cvxpylayers-max", type=int, default=10000)
    ap.add_argument("--admm-max", type=int, default=1000,
                    help="largest n for solve_qp_sparse(method='admm') (0: never)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "sparse_qp.txt"))
    return ap.parse_args()


ARGS = _args() if __name__ == "__main__" else None
if ARGS is not None:
    _device.select()  # (one pinned core on the CPU)

import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.sparse as sp  # noqa: E402
import scipy.sparse.linalg as spla  # noqa: E402
from jax.experimental import sparse  # noqa: E402

import bilevel_jax as bj  # noqa: E402

jax.config.update("jax_enable_x64", True)

SLOPE, BOX, MEAN = 0.05, 0.3, 0.05


# ------------------------------------------------------------------------------- the problem


def smoothing_problem(n: int, seed: int):
    """SciPy data of the smoothing QP, plus the loss weights ``w``."""
    rng = np.random.default_rng(seed)
    theta = rng.standard_normal(n)
    w = rng.standard_normal(n)
    main = np.full(n, 2.0)
    main[[0, -1]] = 1.0
    L = sp.diags([main, -np.ones(n - 1), -np.ones(n - 1)], [0, 1, -1], format="csc")
    Q = (sp.eye(n, format="csc") + 0.2 * L).tocsc()
    A = sp.csc_matrix(np.ones((1, n)))
    b = np.array([MEAN * n])
    G = sp.diags([np.ones(n - 1), -np.ones(n - 1)], [0, 1], shape=(n - 1, n), format="csc")
    h = np.full(n - 1, SLOPE)
    return dict(n=n, Q=Q, A=A, b=b, G=G, h=h, theta=theta, w=w, lo=-BOX, hi=BOX)


def _bcoo(M, dtype):
    M = M.tocoo()
    return (jnp.asarray(M.data, dtype),
            jnp.asarray(np.stack([M.row, M.col], axis=1).astype(np.int32)))


# ----------------------------------------------------------------------------- the reference


def _clarabel_solve(prob, tight: bool):
    import clarabel

    n = prob["n"]
    P = sp.triu(prob["Q"], format="csc")
    eye = sp.eye(n, format="csc")
    Cm = sp.vstack([prob["A"], prob["G"], -eye, eye], format="csc")
    rhs = np.concatenate([prob["b"], prob["h"], np.full(n, BOX), np.full(n, BOX)])
    cones = [clarabel.ZeroConeT(1), clarabel.NonnegativeConeT(Cm.shape[0] - 1)]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    if tight:
        settings.tol_gap_abs = settings.tol_gap_rel = settings.tol_feas = 1e-12
        settings.tol_ktratio = 1e-10
        settings.max_iter = 400
    solver = clarabel.DefaultSolver(P, -prob["theta"], Cm, rhs, cones, settings)
    return solver.solve()


def _active_system(prob, act_g, fixed):
    """The equality KKT matrix on a guessed set (variables at a bound eliminated), its
    regularised LU (-1e-10 I on the multiplier block: dependent active rows) and a solve
    refined against the exact matrix."""
    Q, A, G = prob["Q"], prob["A"], prob["G"]
    free = ~fixed
    C = sp.vstack([A, G[act_g]], format="csc")
    QF = Q[free][:, free]
    K = sp.bmat([[QF, C[:, free].T], [C[:, free], None]], format="csc")
    m = C.shape[0]
    reg = sp.bmat([[sp.csc_matrix((QF.shape[0], QF.shape[0])), None],
                   [None, -1e-10 * sp.eye(m)]], format="csc")
    lu = spla.splu((K + reg).tocsc())

    def ksolve(r, x):
        for _ in range(12):
            x = x + lu.solve(r - K @ x)
        return x

    return C, ksolve


def exact_derivative(prob, act_g, fixed):
    """``(dtheta, dh)`` of ``w'y*`` on the active set ``(act_g, fixed)``.

    ``[QF CF'; CF 0] [w; mu] = [v_F; 0]``; ``dL/dtheta = w`` (``c = -theta``), ``dL/dh_I = mu_I``.
    """
    n, free = prob["n"], ~fixed
    C, ksolve = _active_system(prob, act_g, fixed)
    m = C.shape[0]
    adj = ksolve(np.concatenate([prob["w"][free], np.zeros(m)]), np.zeros(free.sum() + m))
    dtheta = np.zeros(n)
    dtheta[free] = adj[: free.sum()]
    dh = np.zeros(n - 1)
    dh[act_g] = adj[free.sum() + 1 :]
    return dtheta, dh


def reference(prob):
    """Clarabel at tight tolerances, polished on its active set, and the exact hypergradient.

    The polish is the textbook primal-dual active-set iteration, written here with SciPy
    (no bilevel_jax code): the equality KKT system on the guessed set (variables at a bound
    eliminated), solved for the correction from Clarabel's point so that the multipliers
    of dependent active rows (chains of active slope rows between two variables at a
    bound: y is unique, the multipliers are not) stay near Clarabel's nonnegative ones;
    then rows with a clearly negative multiplier leave the set and violated rows join it,
    until nothing changes. (Without that step, at n = 1e5 one slope row that Clarabel's
    point classed active kept a multiplier of -2.4e-6 in every solution, and the reference
    hypergradient was 2.8e-3 off the solution with that row inactive, which satisfies the
    KKT conditions to 1e-15.)

    Returns ``(y, dtheta, dh)`` of ``w'y*`` (float64) and diagnostics.
    """
    n = prob["n"]
    sol = _clarabel_solve(prob, tight=True)
    y0 = np.asarray(sol.x)
    z = np.asarray(sol.z)
    nu0, lam_g, lam_lo, lam_hi = z[:1], z[1:n], z[n : 2 * n], z[2 * n :]
    Q, A, G, h, theta = prob["Q"], prob["A"], prob["G"], prob["h"], prob["theta"]
    Gy = G @ y0
    act_g = lam_g > np.maximum(h - Gy, 0)
    act_lo = lam_lo > np.maximum(y0 + BOX, 0)
    act_hi = lam_hi > np.maximum(BOX - y0, 0)

    for rounds in range(1, 21):  # noqa: B007 (reported)
        fixed = act_lo | act_hi
        free = ~fixed
        yfix = np.where(act_hi, BOX, -BOX)
        C, ksolve = _active_system(prob, act_g, fixed)
        rhs_y = theta[free] - Q[free][:, fixed] @ yfix[fixed]
        rhs_c = np.concatenate([prob["b"], h[act_g]]) - C[:, fixed] @ yfix[fixed]
        x0 = np.concatenate([y0[free], nu0, np.maximum(lam_g[act_g], 0)])
        x = ksolve(np.concatenate([rhs_y, rhs_c]), x0)
        y = yfix.copy()
        y[free] = x[: free.sum()]
        nu, lam_act = x[free.sum() : free.sum() + 1], x[free.sum() + 1 :]
        lam = np.zeros(n - 1)
        lam[act_g] = lam_act
        # Bound multipliers from stationarity on the fixed variables: g + lam_hi - lam_lo = 0.
        g = Q @ y - theta + A.T @ nu + G.T @ lam
        big = 1 + np.max(np.abs(lam), initial=0) + np.max(np.abs(g), initial=0)
        drop_g = act_g & (lam < -1e-9 * big)
        drop_lo = act_lo & (g < -1e-9 * big)  # lam_lo = g must be >= 0
        drop_hi = act_hi & (-g < -1e-9 * big)
        slack = h - G @ y
        add_g = ~act_g & (slack < -1e-12)
        add_lo, add_hi = free & (y < -BOX - 1e-12), free & (y > BOX + 1e-12)
        if not (drop_g | add_g).any() and not (drop_lo | drop_hi | add_lo | add_hi).any():
            break
        act_g = (act_g & ~drop_g) | add_g
        act_lo, act_hi = (act_lo & ~drop_lo) | add_lo, (act_hi & ~drop_hi) | add_hi
        y0, nu0, lam_g = y, nu, lam
    dtheta, dh = exact_derivative(prob, act_g, fixed)
    err = max(np.max(np.abs(y - np.asarray(sol.x))), 0.0)
    viol = max(np.max(G @ y - h), np.max(np.abs(y)) - BOX, abs(np.sum(y) - MEAN * n))
    return dict(y=y, dtheta=dtheta, dh=dh, clarabel_gap=err, violation=viol,
                active=int(act_g.sum()), fixed=int(fixed.sum()), rounds=rounds, act_g=act_g,
                lam_g=lam, fixed_mask=fixed,
                min_lam=float(np.min(lam_act, initial=0)))


def own_set_check(prob, ref, o, tol=1e-5):
    """Where float32's hypergradient differs from the reference: the rows its active set
    classes otherwise (multipliers above ``tol`` times the largest count as active, the
    library's rule at float32's default tolerance), their float64 multipliers, and its
    error against the exact derivative on its own set."""
    n, lam = prob["n"], o["lam"]
    lam_g, lam_lo, lam_hi = lam[: n - 1], lam[n - 1 : 2 * n - 1], lam[2 * n - 1 :]
    big = 1 + np.max(lam, initial=0)
    act_g = lam_g > tol * big
    fixed = (lam_lo > tol * big) | (lam_hi > tol * big)
    rows = np.flatnonzero(act_g != ref["act_g"])
    dtheta, _ = exact_derivative(prob, act_g, fixed)
    share = ref["lam_g"][rows] / np.max(ref["lam_g"])
    return (f"#   float32 at n = {n}: active set differs from the reference's in {rows.size} slope "
            f"rows (their float64 multipliers / the largest: "
            f"{', '.join(f'{x:.1e}' for x in share[:6])}) and "
            f"{int(np.sum(fixed != ref['fixed_mask']))} bounds; its d/dtheta against the "
            f"exact derivative on its own active set: {rel(o['dtheta'], dtheta):.1e}")


def rel(got, want):
    got = np.asarray(got, np.float64)
    if not np.all(np.isfinite(got)):
        return np.inf
    den = np.linalg.norm(want)
    return float(np.linalg.norm(got - want) / den) if den > 0 else float(np.linalg.norm(got))


def timed(fn, reps):
    """Median wall time over ``reps`` calls after one warm-up (whose time is returned apart)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times)), first


# -------------------------------------------------------------------------------- the methods


def ours(prob, dtype, reps, method="direct"):
    n = prob["n"]
    qd, qi = _bcoo(prob["Q"], dtype)
    gd, gi = _bcoo(prob["G"], dtype)
    ad, ai = _bcoo(prob["A"], dtype)
    b = jnp.asarray(prob["b"], dtype)
    w = jnp.asarray(prob["w"], dtype)
    theta = jnp.asarray(prob["theta"], dtype)
    h = jnp.asarray(prob["h"], dtype)

    # The data are arguments, not closed-over constants (XLA would constant-fold them).
    data = (qd, qi, gd, gi, ad, ai, b, w)

    def solve(theta, h, data):
        qd, qi, gd, gi, ad, ai, b, _ = data
        Q = sparse.BCOO((qd, qi), shape=(n, n))
        G = sparse.BCOO((gd, gi), shape=(n - 1, n))
        A = sparse.BCOO((ad, ai), shape=(1, n))
        return bj.solve_qp_sparse(Q, -theta, A, b, G, h, -BOX, BOX, method=method)

    def loss(theta, h, data):
        sol = solve(theta, h, data)
        return data[-1] @ sol.y, sol

    fwd = jax.jit(solve)
    both = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    sol, t_fwd, c_fwd = timed(lambda: fwd(theta, h, data), reps)
    (_, sol2), (g_theta, g_h) = both(theta, h, data)
    _, t_both, c_both = timed(lambda: both(theta, h, data), reps)
    t_cold = None
    if method == "direct":  # the host's ordering and analysis of the KKT pattern redone
        from bilevel_jax._src import sparse_linalg

        def cold():
            sparse_linalg._STRUCTURES.clear()
            return both(theta, h, data)

        _, t_cold, _ = timed(cold, reps)
    return dict(y=np.asarray(sol.y), dtheta=np.asarray(g_theta), dh=np.asarray(g_h),
                lam=np.asarray(sol.lam, np.float64),
                status=bj.Status(int(sol2.info.status)).name, steps=int(sol.info.num_steps),
                t_fwd=t_fwd, t_both=t_both, compile=c_fwd + c_both, t_cold=t_cold,
                residual=float(sol.info.residual))


def clarabel_forward(prob, reps):
    ts = []
    sol = None
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        sol = _clarabel_solve(prob, tight=False)
        ts.append(time.perf_counter() - t0)
    return dict(y=np.asarray(sol.x), t_fwd=float(np.median(ts)), status=str(sol.status))


def _mpax_problem(prob, dtype):
    from mpax import create_qp

    n = prob["n"]
    qd, qi = _bcoo(prob["Q"], dtype)
    gd, gi = _bcoo(prob["G"], dtype)
    ad, ai = _bcoo(prob["A"], dtype)
    Q = sparse.BCOO((qd, qi), shape=(n, n))
    A = sparse.BCOO((ad, ai), shape=(1, n))
    # MPAX's convention is G y >= h: the slope rows become -(y_i - y_{i+1}) >= -h.
    G = sparse.BCOO((-gd, gi), shape=(n - 1, n))
    lo = jnp.full(n, -BOX, dtype)
    hi = jnp.full(n, BOX, dtype)
    b = jnp.asarray(prob["b"], dtype)

    def make(theta, h):
        return create_qp(Q, -theta, A, b, G, -h, lo, hi)

    return make


def mpax_forward(prob, eps, reps):
    from mpax import raPDHG

    make = _mpax_problem(prob, jnp.float64)
    theta = jnp.asarray(prob["theta"])
    h = jnp.asarray(prob["h"])
    # One outer jit around MPAX's solve (its own jit=True retraces on every call, which puts
    # the compile time in every timing); fall back to jit=True if MPAX cannot be traced so.
    try:
        solver = raPDHG(eps_abs=eps, eps_rel=eps, verbose=False, jit=False)
        run_jit = jax.jit(lambda t, h_: solver.optimize(make(t, h_)).primal_solution)
        y, t, first = timed(lambda: run_jit(theta, h), reps)
    except Exception:  # noqa: BLE001
        solver = raPDHG(eps_abs=eps, eps_rel=eps, verbose=False, jit=True)
        y, t, first = timed(lambda: solver.optimize(make(theta, h)).primal_solution, reps)
    return dict(y=np.asarray(y), t_fwd=t, compile=first)


def mpax_unrolled(prob, iters, reps):
    from mpax import raPDHG

    make = _mpax_problem(prob, jnp.float64)
    w = jnp.asarray(prob["w"])
    solver = raPDHG(eps_abs=1e-12, eps_rel=1e-12, verbose=False, jit=True, unroll=True,
                    iteration_limit=iters)

    def both(theta, h):  # MPAX jits its own loop; its Python checks cannot be traced by jit
        return jax.value_and_grad(
            lambda t, h_: w @ solver.optimize(make(t, h_)).primal_solution, argnums=(0, 1)
        )(theta, h)

    theta = jnp.asarray(prob["theta"])
    h = jnp.asarray(prob["h"])
    (_, (gt, gh)), t, first = timed(lambda: both(theta, h), reps)
    return dict(dtheta=np.asarray(gt), dh=np.asarray(gh), t_both=t, compile=first)


def cvxpylayers_both(prob, reps):
    import cvxpy as cp
    from cvxpylayers.jax import CvxpyLayer

    n = prob["n"]
    y = cp.Variable(n)
    th = cp.Parameter(n)
    hp = cp.Parameter(n - 1)
    # 1/2 y'(I + 0.2 L) y = 1/2 |y|^2 + 0.1 |D y|^2 with D the difference matrix.
    D = prob["G"]
    obj = 0.5 * cp.sum_squares(y) + 0.1 * cp.sum_squares(D @ y) - th @ y
    cons = [cp.sum(y) == MEAN * n, D @ y <= hp, y >= -BOX, y <= BOX]
    layer = CvxpyLayer(cp.Problem(cp.Minimize(obj), cons), parameters=[th, hp], variables=[y])
    w = jnp.asarray(prob["w"])

    def both():
        return jax.value_and_grad(lambda t, h_: w @ layer(t, h_)[0], argnums=(0, 1))(
            jnp.asarray(prob["theta"]), jnp.asarray(prob["h"]))

    (_, (gt, gh)), t, first = timed(both, reps)
    return dict(dtheta=np.asarray(gt), dh=np.asarray(gh), t_both=t, compile=first)


# ---------------------------------------------------------------------------------- the table


def main(args):
    lines = []

    def say(s=""):
        print(s, flush=True)
        lines.append(s)

    say(f"# bench/sparse_qp.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say(f"# jax {jax.__version__}, devices {jax.devices()}, argv {' '.join(sys.argv[1:])}")
    say("# smoothing QP: Q = I + 0.2 L, c = -theta, sum(y) = 0.05 n, y_i - y_{i+1} <= 0.05, "
        "|y| <= 0.3; loss w'y*")
    say("# times: median seconds over reps (compile apart); errors: relative 2-norm against "
        "Clarabel polished + exact KKT (scipy.sparse)")
    header = (f"{'n':>8} {'method':<36} {'status':<10} {'fwd s':>9} {'fwd+bwd s':>10} "
              f"{'compile s':>9} {'err y':>9} {'err d/dtheta':>12} {'err d/dh':>9} "
              f"{'x Clarabel fwd':>14}")
    say(header)
    for n in args.sizes:
        prob = smoothing_problem(n, args.seed)
        reps = args.reps if n < 10**6 else max(1, args.reps // 2)
        t0 = time.perf_counter()
        ref = reference(prob)
        say(f"# n = {n}: reference in {time.perf_counter() - t0:.1f} s, {ref['active']} slope "
            f"rows active, {ref['fixed']} variables at a bound, Clarabel-to-polished max "
            f"|dy| {ref['clarabel_gap']:.1e}, polished violation {ref['violation']:.1e}, "
            f"{ref['rounds']} active-set rounds, min active multiplier {ref['min_lam']:.1e}")
        cl = clarabel_forward(prob, reps)
        t_cl = cl["t_fwd"]

        def row(name, status, t_fwd, t_both, comp, y=None, dth=None, dh=None, t_ratio=None,
                n=n, ref=ref, t_cl=t_cl):
            def f(x, fmt):
                return format(x, fmt) if x is not None else "-"

            ey = rel(y, ref["y"]) if y is not None else None
            et = rel(dth, ref["dtheta"]) if dth is not None else None
            eh = rel(dh, ref["dh"]) if dh is not None else None
            ratio = (t_ratio or t_both or t_fwd) / t_cl
            say(f"{n:>8} {name:<36} {status:<10} {f(t_fwd, '9.4f')} {f(t_both, '10.4f')} "
                f"{f(comp, '9.1f')} {f(ey, '9.1e')} {f(et, '12.1e')} {f(eh, '9.1e')} "
                f"{ratio:14.2f}")

        row("clarabel (fwd)", cl["status"], t_cl, None, None, y=cl["y"])
        dtypes = [("float64", jnp.float64)] + ([("float32", jnp.float32)] if args.float32 else [])
        methods = ["direct"] + (["admm"] if n <= args.admm_max else [])
        for method in methods:
            for label, dt in dtypes:
                name = f"bj.solve_qp_sparse {method} {label}"
                try:
                    o = ours(prob, dt, reps, method)
                    row(name, o["status"], o["t_fwd"], o["t_both"], o["compile"], o["y"],
                        o["dtheta"], o["dh"])
                    if o["t_cold"] is not None:
                        row("  the same, new sparsity every call", o["status"], None,
                            o["t_cold"], None)
                    if label == "float32":
                        say(own_set_check(prob, ref, o))
                except Exception as e:  # noqa: BLE001 - a bench reports, it does not stop
                    say(f"{n:>8} {name} FAILED: {type(e).__name__}: {e}")
        if not args.no_mpax:
            for eps in (1e-4, 1e-6):
                try:
                    m = mpax_forward(prob, eps, reps)
                    row(f"mpax raPDHG eps={eps:g}", "-", m["t_fwd"], None, m["compile"], m["y"])
                except Exception as e:  # noqa: BLE001
                    say(f"{n:>8} mpax eps={eps:g} FAILED: {type(e).__name__}: {e}")
            if n <= args.mpax_unroll:
                try:
                    m = mpax_unrolled(prob, args.mpax_unroll_iters, reps)
                    row(f"mpax unrolled {args.mpax_unroll_iters} it", "-", None, m["t_both"],
                        m["compile"], dth=m["dtheta"], dh=m["dh"])
                except Exception as e:  # noqa: BLE001
                    say(f"{n:>8} mpax unrolled FAILED: {type(e).__name__}: {str(e)[:200]}")
        if n <= args.cvxpylayers_max:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    cv = cvxpylayers_both(prob, min(reps, 3))
                row("cvxpylayers (fwd+bwd)", "-", None, cv["t_both"], cv["compile"],
                    dth=cv["dtheta"], dh=cv["dh"])
            except Exception as e:  # noqa: BLE001
                say(f"{n:>8} cvxpylayers FAILED: {type(e).__name__}: {str(e)[:200]}")
    say("# 'x Clarabel fwd': the method's fwd+bwd time (fwd when it has no backward) divided by"
        " Clarabel's forward time at the same n")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main(ARGS)
