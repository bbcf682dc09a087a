"""Real-world convex QPs: ``bj.solve_qp`` on the Maros–Meszaros problems, beside Clarabel.

Each problem of the collection (MATLAB files in the OSQP benchmark format)

    min 1/2 x'Px + q'x + r   s.t.   l <= A x <= u

is converted to the dense form of ``bj.solve_qp``: rows with ``l == u`` become equalities
``A_eq y = b``, every finite one-sided bound of the other rows becomes one row of ``G y <= h``
(``a'x <= u`` as ``a``, ``l <= a'x`` as ``-a``); rows with no finite bound are dropped, and
entries with ``|l|, |u| >= 1e19`` (the collection stores its infinity as about 1e20) count
as absent.

For every problem it runs

* ``bj.solve_qp`` in float64 under ``jax.jit`` (compile time reported apart from the median
  solve time over ``--repeats`` solves);
* Clarabel on the same (sparse) data as the reference, with tight tolerances;

and reports the status, iterations, the objective's relative error against Clarabel's,
the KKT residuals of ``(y, nu, lam)`` computed here in NumPy (no code shared with the
solver), and a verdict:

* ``solved``: status SUCCESS, objective within ``--obj-tol`` relative and KKT within
  ``--kkt-tol``;
* ``failed``: a status other than SUCCESS (the status is printed);
* ``WRONG``: status SUCCESS but the objective or the KKT residuals are off (a silent wrong
  answer).

With ``--grad`` (default on) every SUCCESS also gets two derivative checks: ``jax.grad`` of
its optimal value with respect to ``c``, which must equal ``y`` (column ``grad``: the envelope
theorem), and the cotangent of ``c`` for a random cotangent of ``y`` against the exact one from
the KKT system on Clarabel's active set, solved in NumPy (column ``hg err``). A mismatch above
``--grad-tol`` is flagged ``grad off`` beside the verdict and counted apart (a wrong
hypergradient).

KKT residuals, with ``s = h - G y`` and ``||.||`` the max-norm:

* primal: ``max(||A y - b||, ||max(G y - h, 0)||) / (1 + max(||b||, ||h||, ||A y||, ||G y||))``
  (``h`` over its finite entries);
* dual: ``max(||Q y + c + A'nu + G'lam||, ...) / (1 + max(||Q y||, ||c||, ||A'nu||, ||G'lam||))``
  together with ``||min(lam, 0)|| / (1 + ||lam||)``;
* complementarity: ``max_i |lam_i s_i| / (1 + max(|y'Q y|, |c'y|))`` (objective units).

Usage::

    python bench/maros_meszaros.py                           # every problem in the data folder
    python bench/maros_meszaros.py --problems HS21 QAFIRO    # a few by name
    python bench/maros_meszaros.py --max-size 400 --no-grad  # n + p + k <= 400, no gradient

With ``--device cpu`` (the default) threads are pinned (XLA and BLAS, one core) so that
timings are comparable between runs; ``--device gpu`` runs ``bj.solve_qp`` on a GPU.
"""

from __future__ import annotations

import argparse
import os

import _device

if __name__ == "__main__":  # before numpy/JAX start; bench/ is on sys.path as a script
    _device.select()  # (on the CPU: one pinned core, single-threaded kernels)

import pathlib  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.io  # noqa: E402
import scipy.sparse as sp  # noqa: E402

import bilevel_jax as bj  # noqa: E402

jax.config.update("jax_enable_x64", True)

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "maros_meszaros"
INFINITY = 1e19  # bounds this large are absent (the files store about +-1e20)


# --------------------------------------------------------------------------- data


def load_problem(path: pathlib.Path) -> dict:
    """One ``.mat`` file as dense ``solve_qp`` data ``(Q, c, A, b, G, h)`` plus ``r``."""
    raw = scipy.io.loadmat(path)
    P = sp.csc_matrix(raw["P"], dtype=np.float64)
    q = np.asarray(raw["q"], dtype=np.float64).ravel()
    r = float(np.asarray(raw["r"]).ravel()[0]) if raw["r"].size else 0.0
    Acon = sp.csr_matrix(raw["A"], dtype=np.float64)
    lo = np.asarray(raw["l"], dtype=np.float64).ravel()
    up = np.asarray(raw["u"], dtype=np.float64).ravel()
    n = P.shape[0]
    if Acon.shape[0] == 0:
        Acon = sp.csr_matrix((0, n))
    has_lo, has_up = np.abs(lo) < INFINITY, np.abs(up) < INFINITY
    eq = has_lo & has_up & (lo == up)
    upper_rows = np.flatnonzero(has_up & ~eq)
    lower_rows = np.flatnonzero(has_lo & ~eq)
    Ad = Acon.toarray()
    A, b = Ad[eq], up[eq]
    G = np.vstack([Ad[upper_rows], -Ad[lower_rows]])
    h = np.concatenate([up[upper_rows], -lo[lower_rows]])
    Q = P.toarray()
    Q = 0.5 * (Q + Q.T)
    return {
        "name": path.stem,
        "Q": Q,
        "c": q,
        "r": r,
        "A": A.reshape(-1, n),
        "b": b,
        "G": G.reshape(-1, n),
        "h": h,
        "P_sparse": P,
        "A_sparse": sp.csc_matrix(np.vstack([A.reshape(-1, n), G.reshape(-1, n)])),
    }


def size_of(prob: dict) -> int:
    """``n + p + k`` of the dense form."""
    return prob["Q"].shape[0] + prob["A"].shape[0] + prob["G"].shape[0]


def describe(prob: dict) -> str:
    """What makes a problem hard: ranks of ``Q`` and ``A``, the range of the data's magnitudes.

    The range ignores entries below ``1e-12`` times the largest (rounding noise in the files).
    """
    Q, A = prob["Q"], prob["A"]
    eig = np.linalg.eigvalsh(Q)
    rank = int(np.sum(eig > 1e-12 * max(eig.max(), 1e-300)))
    text = f"rank Q {rank}/{Q.shape[0]}"
    if A.shape[0]:
        text += f", rank A {np.linalg.matrix_rank(A)}/{A.shape[0]}"
    entries = np.abs(np.concatenate([m[np.isfinite(m)].ravel() for m in (
        Q, prob["c"], A, prob["b"], prob["G"], prob["h"])]))
    entries = entries[entries > 1e-12 * entries.max()]
    return text + f", |data| in [{entries.min():.0e}, {entries.max():.0e}]"


def objective(prob: dict, y: np.ndarray) -> float:
    """``1/2 y'Qy + c'y + r``."""
    return float(0.5 * y @ prob["Q"] @ y + prob["c"] @ y + prob["r"])


# --------------------------------------------------------------------------- KKT


def kkt_residuals(prob: dict, y, nu, lam) -> tuple[float, float, float]:
    """Relative primal, dual and complementarity residuals (see the module docstring)."""
    Q, c, A, b, G, h = (prob[key] for key in ("Q", "c", "A", "b", "G", "h"))
    y, nu, lam = (np.asarray(v, dtype=np.float64) for v in (y, nu, lam))

    def mx(v):
        return float(np.max(np.abs(v))) if np.size(v) else 0.0

    Ay, Gy, Qy = A @ y, G @ y, Q @ y
    primal = max(mx(Ay - b), mx(np.maximum(Gy - h, 0.0))) / (1 + max(mx(b), mx(h), mx(Ay), mx(Gy)))
    Anu, Glam = A.T @ nu, G.T @ lam
    stat = mx(Qy + c + Anu + Glam) / (1 + max(mx(Qy), mx(c), mx(Anu), mx(Glam)))
    sign = mx(np.minimum(lam, 0.0)) / (1 + mx(lam))
    dual = max(stat, sign)
    comp = mx(lam * (h - Gy)) / (1 + max(abs(float(y @ Qy)), abs(float(c @ y))))
    return primal, dual, comp


# --------------------------------------------------------------------------- solvers


def clarabel_solve(prob: dict, repeats: int) -> dict:
    """Reference: Clarabel on the sparse data (equalities as a zero cone), tight tolerances."""
    import clarabel

    n, p, k = prob["Q"].shape[0], prob["A"].shape[0], prob["G"].shape[0]
    P = sp.triu(prob["P_sparse"], format="csc")
    Acl = prob["A_sparse"]
    bcl = np.concatenate([prob["b"], prob["h"]])
    cones = []
    if p:
        cones.append(clarabel.ZeroConeT(p))
    if k:
        cones.append(clarabel.NonnegativeConeT(k))
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.tol_gap_abs = settings.tol_gap_rel = 1e-10
    settings.tol_feas = 1e-10
    settings.max_iter = 500
    times, sol = [], None
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        solver = clarabel.DefaultSolver(P, prob["c"], Acl, bcl, cones, settings)
        sol = solver.solve()
        times.append(time.perf_counter() - t0)
    status = str(sol.status)
    ok = status in ("Solved", "AlmostSolved")
    y = np.asarray(sol.x)
    z = np.asarray(sol.z)
    return {
        "status": status,
        "ok": ok,
        "iters": int(sol.iterations),
        "time": statistics.median(times),
        "y": y,
        "nu": z[:p],
        "lam": z[p:],
        "obj": objective(prob, y) if ok else float("nan"),
        "n": n,
    }


def make_solver(tol: float | None, max_iter: int | None):
    """The jitted ``bj.solve_qp`` (options are static), and two jitted derivatives.

    ``grad(c, Q, A, b, G, h)``: the gradient of the optimal value with respect to ``c``;
    ``vjp(ybar, Q, c, A, b, G, h)``: the cotangent of ``c`` for a cotangent ``ybar`` of ``y``.
    """

    def solve(Q, c, A, b, G, h):
        return bj.solve_qp(Q, c, A, b, G, h, tol=tol, max_iter=max_iter)

    def value(c, Q, A, b, G, h):
        sol = solve(Q, c, A, b, G, h)
        return 0.5 * sol.y @ Q @ sol.y + c @ sol.y

    def vjp(ybar, Q, c, A, b, G, h):
        return jax.vjp(lambda c_: solve(Q, c_, A, b, G, h).y, c)[1](ybar)[0]

    return jax.jit(solve), (jax.jit(jax.grad(value)), jax.jit(vjp))


def reference_vjp_c(prob: dict, ref: dict, ybar: np.ndarray) -> np.ndarray | None:
    """Exact ``c``-cotangent in NumPy: the KKT system on Clarabel's active set.

    Active rows: ``lam_i > s_i`` at Clarabel's solution. With ``C = [A; G_active]`` and
    ``K = [Q, C'; C, 0]``, the set is first confirmed by polishing: ``K [y; mu] = [-c; b;
    h_active]`` must give ``mu >= 0`` on the active rows and ``G y <= h`` (to ``1e-9``
    relative); otherwise (a nearly degenerate point that Clarabel's accuracy cannot settle)
    ``None``. Then ``K [w; mu] = [ybar; 0]`` (least squares, so that dependent active rows are
    allowed) and ``cbar = -w``.
    """
    G, h, A, b = prob["G"], prob["h"], prob["A"], prob["b"]
    active = np.flatnonzero(ref["lam"] > h - G @ ref["y"])
    C = np.vstack([A, G[active]])
    n, m, p = prob["Q"].shape[0], C.shape[0], A.shape[0]
    K = np.block([[prob["Q"], C.T], [C, np.zeros((m, m))]])
    polish = np.linalg.lstsq(K, np.concatenate([-prob["c"], b, h[active]]), rcond=None)[0]
    y, lam_active = polish[:n], polish[n + p:]
    scale = 1 + np.max(np.abs(ref["lam"]), initial=0.0)
    if np.any(lam_active < -1e-9 * scale) or np.any(G @ y > h + 1e-9 * (1 + np.abs(h))):
        return None
    rhs = np.concatenate([ybar, np.zeros(m)])
    return -np.linalg.lstsq(K, rhs, rcond=None)[0][:n]


def bj_solve(prob: dict, solve, grads, ref: dict, repeats: int, with_grad: bool) -> dict:
    """Compile (timed apart), then the median of ``repeats`` solves; optionally derivatives.

    ``grad_err``: ``max |d value/dc - y| / (1 + max |y|)``; ``hg_err``: the relative error of
    the ``c``-cotangent for a random cotangent of ``y`` against :func:`reference_vjp_c`.
    """
    args = tuple(jnp.asarray(prob[key]) for key in ("Q", "c", "A", "b", "G", "h"))
    t0 = time.perf_counter()
    compiled = solve.lower(*args).compile()
    compile_time = time.perf_counter() - t0
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        sol = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    out = {
        "status": bj.Status(int(sol.info.status)).name,
        "iters": int(sol.info.num_steps),
        "residual": float(sol.info.residual),
        "compile": compile_time,
        "time": statistics.median(times),
        "y": np.asarray(sol.y),
        "nu": np.asarray(sol.nu),
        "lam": np.asarray(sol.lam),
        "grad_err": None,
        "hg_err": None,
    }
    if with_grad and out["status"] == "SUCCESS":
        Q, c, A, b, G, h = args
        grad, vjp = grads
        g = np.asarray(grad(c, Q, A, b, G, h))
        y = out["y"]
        out["grad_err"] = (
            float("nan")
            if not np.all(np.isfinite(g))
            else float(np.max(np.abs(g - y)) / (1 + np.max(np.abs(y))))
        )
        if ref["ok"]:
            ybar = np.random.default_rng(0).standard_normal(y.shape[0])
            got = np.asarray(vjp(jnp.asarray(ybar), Q, c, A, b, G, h))
            exact = reference_vjp_c(prob, ref, ybar)
            if exact is not None:
                out["hg_err"] = float(np.max(np.abs(got - exact)) / np.max(np.abs(exact)))
    return out


def flat_directions(prob: dict, y: np.ndarray, lam: np.ndarray) -> int:
    """How many directions the optimal set extends along at ``y`` (0: the minimiser is unique).

    The rows that touch at ``y`` (``h_i - g_i'y <= 1e-9 (1 + |h_i|)``) are split into strongly
    active ones (``lam_i > 1e-9 (1 + max lam)``, kept at equality with ``A``: ``C``) and weakly
    active ones (``G_w``, a zero multiplier: they may loosen). A direction ``d`` with
    ``C d = 0``, ``Q d = 0`` and ``G_w d <= 0`` keeps ``y + t d`` feasible for small ``t > 0``
    and, by the KKT conditions, the objective unchanged: ``y`` is one of infinitely many
    minimisers, and the optimal value is not differentiable in ``c`` there (its derivative
    would be the minimiser). Returns the dimension of such two-sided directions
    (``G_w d = 0`` too), or 1 where only one-sided ones exist (``y`` at a vertex of a face of
    minimisers: found by a linear program, ``G_w d <= 0``, ``sum(G_w d) = -1``). In NumPy /
    SciPy: ``N`` an orthonormal basis of the null space of ``[C; Q]`` (singular values above
    ``1e-10`` of the largest).
    """
    from scipy.optimize import linprog

    Q, A, G, h = prob["Q"], prob["A"], prob["G"], prob["h"]
    touching = np.abs(h - G @ y) <= 1e-9 * (1 + np.abs(h))
    strong = touching & (lam > 1e-9 * (1 + np.max(lam, initial=0)))
    weak = touching & ~strong

    def null_space(M):
        if M.shape[0] == 0:
            return np.eye(M.shape[1])
        _, sv, vt = np.linalg.svd(M)
        rank = int(np.sum(sv > 1e-10 * sv[0])) if sv.size else 0
        return vt[rank:].T

    N = null_space(np.vstack([A, G[strong], Q / (1 + np.max(np.abs(Q)))]))
    if N.shape[1] == 0:
        return 0
    W = G[weak] @ N
    two_sided = null_space(W).shape[1] if W.shape[0] else N.shape[1]
    if two_sided or W.shape[0] == 0:
        return two_sided
    one_sided = linprog(np.zeros(N.shape[1]), A_ub=W, b_ub=np.zeros(W.shape[0]),
                        A_eq=W.sum(axis=0)[None, :], b_eq=[-1.0], bounds=(None, None))
    return int(one_sided.status == 0)


def lstsq_envelope_error(prob: dict, y, lam) -> float:
    """The envelope check's error when LAPACK solves the same adjoint system (float64).

    ``d f*/dc = y + w`` with ``K [w; mu] = [Q y + c; 0]`` on the active rows ``C`` (``lam_i >
    s_i``) and ``K = [Q, C'; C, 0]``; exactly, ``w = 0``. Returns ``max|w| / (1 + max|y|)``
    for ``w`` from NumPy's least-squares solve (SVD, backward stable, dependent rows allowed):
    the error a backward-stable dense solve makes on this system, to compare with the
    library's.
    """
    Q, c, A, G, h = (prob[key] for key in ("Q", "c", "A", "G", "h"))
    active = np.flatnonzero(lam > h - G @ y)
    C = np.vstack([A, G[active]])
    n, m = Q.shape[0], C.shape[0]
    K = np.block([[Q, C.T], [C, np.zeros((m, m))]])
    w = np.linalg.lstsq(K, np.concatenate([Q @ y + c, np.zeros(m)]), rcond=None)[0][:n]
    return float(np.max(np.abs(w)) / (1 + np.max(np.abs(y))))


# --------------------------------------------------------------------------- driver


def verdict(res: dict, ref: dict, obj_tol: float, kkt_tol: float) -> str:
    if res["status"] != "SUCCESS":
        return "failed"
    kkt_ok = max(res["primal"], res["dual"], res["comp"]) <= kkt_tol
    if not ref["ok"]:
        return "solved?" if kkt_ok else "WRONG"  # no reference objective to compare with
    if res["obj_err"] <= obj_tol and kkt_ok:
        return "solved"
    # A feasible point with a *lower* objective than the reference's, satisfying the KKT
    # conditions itself, shows the reference to be the suboptimal one (convex QP).
    if kkt_ok and res["obj"] < ref["obj"]:
        return "solved, ref. suboptimal"
    return "WRONG"


HEADER = (
    f"{'problem':<10} {'n':>4} {'p':>4} {'k':>5} | {'status':<14} {'it':>3} {'compile':>7} "
    f"{'solve':>9} | {'clarabel':<12} {'it':>3} {'time':>9} {'ratio':>7} | {'obj err':>8} "
    f"{'primal':>8} {'dual':>8} {'comp':>8} {'grad':>8} {'hg err':>8} | verdict"
)


def fmt_time(t: float) -> str:
    return f"{t * 1e3:7.1f}ms" if t < 10 else f"{t:8.1f}s"


def fmt_err(v) -> str:
    if v is None:
        return f"{'-':>8}"
    return f"{v:8.1e}"


def row(name, prob, res, ref, verd) -> str:
    n, p, k = prob["Q"].shape[0], prob["A"].shape[0], prob["G"].shape[0]
    return (
        f"{name:<10} {n:>4} {p:>4} {k:>5} | {res['status']:<14} {res['iters']:>3} "
        f"{res['compile']:6.1f}s {fmt_time(res['time']):>9} | {ref['status'][:12]:<12} "
        f"{ref['iters']:>3} {fmt_time(ref['time']):>9} {res['time'] / ref['time']:7.1f} | "
        f"{fmt_err(res['obj_err'])} {fmt_err(res['primal'])} {fmt_err(res['dual'])} "
        f"{fmt_err(res['comp'])} {fmt_err(res['grad_err'])} {fmt_err(res['hg_err'])} | {verd}"
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA,
                        help=f"folder of .mat files (default {DEFAULT_DATA})")
    parser.add_argument("--problems", nargs="*", default=None, help="problem names (default all)")
    parser.add_argument("--max-size", type=int, default=None,
                        help="skip problems with n + p + k above this (dense form)")
    parser.add_argument("--out", type=pathlib.Path,
                        default=ROOT / "bench" / "results" / "maros_meszaros.txt")
    parser.add_argument("--tol", type=float, default=None, help="solve_qp tol (default its own)")
    parser.add_argument("--max-iter", type=int, default=None,
                        help="solve_qp max_iter (default its own)")
    parser.add_argument("--obj-tol", type=float, default=1e-6,
                        help="relative objective error for 'solved': |f - f*| / (1 + |f*|)")
    parser.add_argument("--kkt-tol", type=float, default=1e-6,
                        help="relative KKT residual (primal, dual, complementarity) for 'solved'")
    parser.add_argument("--grad-tol", type=float, default=1e-6,
                        help="max |d f/dc - y| / (1 + max |y|) for the gradient check")
    parser.add_argument("--repeats", type=int, default=3, help="solves timed (median)")
    parser.add_argument("--grad", action=argparse.BooleanOptionalAction, default=True,
                        help="check d(optimal value)/dc == y on solved problems")
    _device.add_option(parser)
    args = parser.parse_args(argv)

    files = sorted(args.data.glob("*.mat"))
    if not files:
        parser.error(f"no .mat files in {args.data}")
    if args.problems:
        wanted = {name.upper().removesuffix(".MAT") for name in args.problems}
        files = [f for f in files if f.stem.upper() in wanted]
        missing = wanted - {f.stem.upper() for f in files}
        if missing:
            parser.error(f"not found in {args.data}: {sorted(missing)}")

    solve, grads = make_solver(args.tol, args.max_iter)
    lines = [
        f"Maros-Meszaros QPs through bj.solve_qp (float64, jit; tol={args.tol or 'default'}, "
        f"max_iter={args.max_iter or 'default'}) beside Clarabel (tol 1e-10)",
        f"solved: SUCCESS, |f - f*|/(1 + |f*|) <= {args.obj_tol:g}, KKT <= {args.kkt_tol:g}; "
        "solve/time: median; ratio = solve_qp / Clarabel; grad: |d f/dc - y| rel.",
        f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.environ.get('OPENBLAS_NUM_THREADS')} BLAS thread(s)",
        "",
        HEADER,
        "-" * len(HEADER),
    ]
    print("\n".join(lines), flush=True)
    counts = {"solved": 0, "solved?": 0, "solved, ref. suboptimal": 0, "failed": 0, "WRONG": 0,
              "CRASH": 0, "skipped": 0, "grad off": 0, "not unique": 0}
    clarabel_ok = 0
    failures = []
    for path in files:
        prob = load_problem(path)
        name = prob["name"]
        if args.max_size is not None and size_of(prob) > args.max_size:
            counts["skipped"] += 1
            continue
        try:
            ref = clarabel_solve(prob, args.repeats)
            clarabel_ok += ref["ok"]
            res = bj_solve(prob, solve, grads, ref, args.repeats, args.grad)
            res["obj"] = objective(prob, res["y"])
            res["obj_err"] = (
                abs(res["obj"] - ref["obj"]) / (1 + abs(ref["obj"])) if ref["ok"] else None
            )
            res["primal"], res["dual"], res["comp"] = kkt_residuals(
                prob, res["y"], res["nu"], res["lam"]
            )
            if not np.all(np.isfinite(res["y"])):
                res["obj_err"] = float("nan") if ref["ok"] else None
            verd = verdict(res, ref, args.obj_tol, args.kkt_tol)
            counts[verd] += 1
            ref_note = ""
            if verd == "solved, ref. suboptimal":
                ref_kkt = kkt_residuals(prob, ref["y"], ref["nu"], ref["lam"])
                ref_note = (f"; objective {res['obj']:.12e} below Clarabel's {ref['obj']:.12e}"
                            f" (Clarabel's KKT {max(ref_kkt):.1e})")
            errs = [e for e in (res["grad_err"], res["hg_err"]) if e is not None]
            grad_off = bool(errs) and not max(errs) <= args.grad_tol
            flat = flat_directions(prob, res["y"], res["lam"]) if grad_off else 0
            grad_note = ""
            if flat:  # no derivative to check: the minimiser is not unique
                counts["not unique"] += 1
                verd += ", not unique"
                grad_note = (f"; minimiser not unique ({flat} flat direction(s)): no derivative;"
                             f" returned {'NaN' if np.isnan(res['grad_err']) else 'finite'}")
            elif grad_off:
                counts["grad off"] += 1
                verd += ", grad off"
                lapack = lstsq_envelope_error(prob, res["y"], res["lam"])
                grad_note = (f"; grad {fmt_err(res['grad_err'])}, hg err "
                             f"{fmt_err(res['hg_err'])}; LAPACK lstsq on the same system "
                             f"{lapack:.1e}")
            line = row(name, prob, res, ref, verd)
            if verd != "solved":
                failures.append(f"{name}: {verd} status={res['status']} iters={res['iters']} "
                                f"info.residual={res['residual']:.1e} ({describe(prob)})"
                                + ref_note + grad_note)
        except Exception as err:  # noqa: BLE001 - a crash is a result, keep going
            counts["CRASH"] += 1
            line = f"{name:<10} CRASH {type(err).__name__}: {str(err)[:120]}"
            failures.append(f"{name}: CRASH {type(err).__name__}")
            traceback.print_exc(file=sys.stderr)
        print(line, flush=True)
        lines.append(line)

    total = sum(v for key, v in counts.items()
                if key not in ("skipped", "grad off", "not unique"))
    suboptimal = counts["solved, ref. suboptimal"]
    summary = [
        "",
        f"bj.solve_qp: {counts['solved'] + suboptimal} solved"
        + (f" ({suboptimal} where Clarabel's objective is the higher one)" if suboptimal else "")
        + f", {counts['failed']} failed, "
        f"{counts['WRONG']} WRONG, {counts['CRASH']} crashed"
        + (f", {counts['solved?']} solved without a reference" if counts["solved?"] else "")
        + f" of {total}; Clarabel solved {clarabel_ok} of {total}"
        + (f" ({counts['skipped']} skipped by --max-size)" if counts["skipped"] else ""),
    ]
    if args.grad:
        summary.append(
            f"derivatives (d value/dc == y; random c-cotangent vs exact KKT) off by more than "
            f"{args.grad_tol:g} on {counts['grad off']} SUCCESS problem(s); "
            f"{counts['not unique']} SUCCESS problem(s) with a minimiser that is not unique "
            "(no derivative exists)"
        )
    if failures:
        summary += ["not solved, or derivatives off:"] + [f"  {f}" for f in failures]
    print("\n".join(summary), flush=True)
    lines += summary
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
