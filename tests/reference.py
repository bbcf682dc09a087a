"""An independent, test-only reference for dense convex QPs (NumPy/SciPy + Clarabel).

Nothing here imports ``bilevel_jax``. For

    min_y 1/2 y'Qy + c'y   s.t.   A y = b,  G y <= h      (rows with h_i = +inf dropped)

:func:`solve` runs Clarabel at high accuracy, then *polishes* its point: it identifies the
active set (``lam_i > s_i``), solves the equality KKT system on it in float64 with a symmetric
equilibration of the KKT matrix and iterative refinement whose residuals are computed in
extended precision, and keeps the polished point if its KKT residuals are no worse. The result
is exact to rounding on the (equilibrated) problem, so it stays a good reference on badly
scaled data.

:func:`hypergradient` is the exact gradient of ``v'y*`` with respect to ``Q, c, A, b, G, h``
from the KKT system on the active set (OptNet's formulas): with ``E`` the equalities and ``I``
the active inequality rows, solve

    [Q  A'  G_I'] [w   ]   [v]
    [A  0   0   ] [mu_E] = [0]
    [G_I 0  0   ] [mu_I]   [0]

then ``cbar = -w``, ``Qbar = -(w y' + y w')/2``, ``bbar = mu_E``, ``Abar = -(nu w' + mu_E y')``,
``hbar_I = mu_I``, ``Gbar_I = -(lam_I w' + mu_I y')``, and zero on inactive rows. (Derivation:
differentiate ``K z = (-c, b, h_I)`` with ``z = (y, nu, lam_I)``; ``d(v'y) = s'(d rhs - dK z)``
with ``K s = (v, 0, 0)``.) It is the true derivative at strictly complementary points where the
active rows and ``A`` are linearly independent and the reduced Hessian is positive definite;
:class:`Reference` reports those conditions.

:func:`kkt_residuals` measures relative primal, dual, complementarity and sign residuals of any
candidate ``(y, nu, lam)``.
"""

from __future__ import annotations

from typing import NamedTuple

import clarabel
import numpy as np
import scipy.sparse as sp

OPTIMAL, INFEASIBLE, UNBOUNDED, UNKNOWN = "optimal", "infeasible", "unbounded", "unknown"

_CLARABEL_STATUS = {
    "Solved": OPTIMAL,
    "AlmostSolved": OPTIMAL,
    "PrimalInfeasible": INFEASIBLE,
    "AlmostPrimalInfeasible": INFEASIBLE,
    "DualInfeasible": UNBOUNDED,
    "AlmostDualInfeasible": UNBOUNDED,
}


class Reference(NamedTuple):
    """The reference solution of one QP (all arrays float64, full-length ``lam``).

    Attributes:
      y, nu, lam: primal point and multipliers (``lam_i = 0`` on ``h_i = +inf`` rows); NaN
        unless ``status == "optimal"``.
      status: ``"optimal"``, ``"infeasible"``, ``"unbounded"`` or ``"unknown"`` (Clarabel did
        not decide).
      active: boolean mask of the active inequality rows (``lam_i > s_i``).
      margin: strict-complementarity margin, ``min_i max(lam_rel_i, s_rel_i)`` over the finite
        rows, with scale-invariant relative slacks and multipliers (1.0 without rows).
      licq: ``[A; G_I]`` has full row rank (after equilibration).
      unique: the reduced Hessian on the null space of ``[A; G_I]`` is positive definite.
      cond: 2-norm condition number of the equilibrated active-set KKT matrix.
      residual: the largest of :func:`kkt_residuals` at the returned point.
    """

    y: np.ndarray
    nu: np.ndarray
    lam: np.ndarray
    status: str
    active: np.ndarray
    margin: float
    licq: bool
    unique: bool
    cond: float
    residual: float

    @property
    def strict(self) -> bool:
        """Strictly complementary (margin > 1e-6), LICQ and a unique solution: ``y*`` is
        differentiable and :func:`hypergradient` is its exact derivative."""
        return self.status == OPTIMAL and self.margin > 1e-6 and self.licq and self.unique


def _blocks(Q, c, A, b, G, h):
    Q = np.asarray(Q, np.float64)
    n = Q.shape[0]
    c = np.asarray(c, np.float64)
    A = np.zeros((0, n)) if A is None else np.asarray(A, np.float64).reshape(-1, n)
    b = np.zeros((0,)) if b is None else np.asarray(b, np.float64).reshape(-1)
    G = np.zeros((0, n)) if G is None else np.asarray(G, np.float64).reshape(-1, n)
    h = np.zeros((0,)) if h is None else np.asarray(h, np.float64).reshape(-1)
    return 0.5 * (Q + Q.T), c, A, b, G, h


def kkt_residuals(Q, c, A, b, G, h, y, nu, lam) -> dict:
    """Relative KKT residuals of a candidate ``(y, nu, lam)`` (infinity norms).

    Rows with ``h_i = +inf`` are constraint-free: only ``lam_i = 0`` is required of them.
    With ``|.|`` elementwise absolute values and ``s = h - G y``:

    * ``primal``: ``max(|A y - b|, max(G y - h, 0)) / (1 + |b| + |A||y| + |h| + |G||y|)``;
    * ``dual``: ``|Q y + c + A'nu + G'lam| / (1 + |c| + |Q||y| + |A|'|nu| + |G|'|lam|)``;
    * ``comp``: ``max_i |lam_i s_i| / (1 + |c|'|y| + |y|'|Q||y| + |lam|'(|h| + |G||y|))``
      (each term is a product of a multiplier and a slack, so the measure is unchanged by
      rescaling a row of ``G``), and ``|lam_i|`` on infinite rows;
    * ``sign``: ``max(-lam, 0) / (1 + |lam|)``.

    Returns:
      dict with ``primal``, ``dual``, ``comp``, ``sign`` and ``max`` (their largest), floats;
      ``inf`` if any input is not finite where it must be (or a residual overflows).
    """
    with np.errstate(all="ignore"):
        out = _kkt_residuals(Q, c, A, b, G, h, y, nu, lam)
    out = {k: (v if np.isfinite(v) else np.inf) for k, v in out.items()}
    out["max"] = max(out.values())
    return out


def _kkt_residuals(Q, c, A, b, G, h, y, nu, lam):
    Q, c, A, b, G, h = _blocks(Q, c, A, b, G, h)
    y = np.asarray(y, np.float64).reshape(-1)
    nu = np.asarray(nu, np.float64).reshape(-1) if A.shape[0] else np.zeros(0)
    lam = np.asarray(lam, np.float64).reshape(-1) if G.shape[0] else np.zeros(0)
    if not (np.all(np.isfinite(y)) and np.all(np.isfinite(nu)) and np.all(np.isfinite(lam))):
        return dict(primal=np.inf, dual=np.inf, comp=np.inf, sign=np.inf)
    fin = np.isfinite(h)
    Gf, hf, lf = G[fin], h[fin], lam[fin]
    ay = np.abs(y)
    eq = A @ y - b
    ineq = np.maximum(Gf @ y - hf, 0.0)
    pscale = 1 + _mx(np.abs(b)) + _mx(np.abs(A) @ ay) + _mx(np.abs(hf)) + _mx(np.abs(Gf) @ ay)
    primal = max(_mx(np.abs(eq)), _mx(ineq)) / pscale
    rd = Q @ y + c + A.T @ nu + Gf.T @ lf
    dscale = (1 + _mx(np.abs(c)) + _mx(np.abs(Q) @ ay) + _mx(np.abs(A).T @ np.abs(nu))
              + _mx(np.abs(Gf).T @ np.abs(lf)))
    dual = _mx(np.abs(rd)) / dscale
    s = hf - Gf @ y
    escale = 1 + np.abs(c) @ ay + ay @ np.abs(Q) @ ay + np.abs(lf) @ (np.abs(hf) + np.abs(Gf) @ ay)
    comp = max(_mx(np.abs(lf * s)) / escale, _mx(np.abs(lam[~fin])))
    sign = _mx(np.maximum(-lam, 0.0)) / (1 + _mx(np.abs(lam)))
    return dict(primal=primal, dual=dual, comp=comp, sign=sign)


def _mx(x):
    return float(np.max(x)) if x.size else 0.0


# ------------------------------------------------------------------ symmetric KKT solves


def _equilibrate(K, iters=25):
    """Ruiz scaling ``d`` with ``diag(d) K diag(d)`` having rows of infinity norm ~1."""
    d = np.ones(K.shape[0])
    for _ in range(iters):
        r = np.max(np.abs(K * d[:, None] * d[None, :]), axis=1)
        r = np.where(r > 0, r, 1.0)
        d = d / np.sqrt(r)
    return d


def _kkt_solve(K, rhs, refine=3):
    """Solve ``K x = rhs`` (symmetric, possibly singular): equilibrate, least squares, then
    refinement steps whose residuals are computed in extended precision.

    Returns ``(x, cond)`` with ``cond`` the condition number of the equilibrated matrix
    (``inf`` when singular; ``x`` is then the minimum-norm least-squares solution).
    """
    d = _equilibrate(K)
    Ke = K * d[:, None] * d[None, :]
    U, sv, Vt = np.linalg.svd(Ke)
    cutoff = sv[0] * K.shape[0] * np.finfo(np.float64).eps if sv.size else 0.0
    keep = sv > cutoff
    cond = float(sv[0] / sv[-1]) if sv.size and sv[-1] > cutoff else np.inf
    inv_s = np.where(keep, 1.0 / np.where(keep, sv, 1.0), 0.0)

    def apply(r):
        return d * (Vt.T @ (inv_s * (U.T @ (d * r))))

    x = apply(rhs)
    Kl, rl = K.astype(np.longdouble), rhs.astype(np.longdouble)
    for _ in range(refine):
        res = (rl - Kl @ x.astype(np.longdouble)).astype(np.float64)
        x = x + apply(res)
    return x, cond


def _kkt_matrix(Q, A, GI):
    p, m = A.shape[0], GI.shape[0]
    return np.block([
        [Q, A.T, GI.T],
        [A, np.zeros((p, p)), np.zeros((p, m))],
        [GI, np.zeros((m, p)), np.zeros((m, m))],
    ])


# ------------------------------------------------------------------ the reference solve


def _clarabel(Q, c, A, b, Gf, hf, max_iter=400):
    n, p, k = Q.shape[0], A.shape[0], Gf.shape[0]
    settings = clarabel.DefaultSettings()
    settings.verbose = False
    settings.max_iter = max_iter
    # Tighter than these, Clarabel often stops with InsufficientProgress; the polish below
    # makes the point exact to rounding anyway.
    settings.tol_gap_abs = settings.tol_gap_rel = 1e-10
    settings.tol_feas = 1e-10
    settings.presolve_enable = False
    P = sp.csc_matrix(np.triu(Q))
    M = sp.csc_matrix(np.vstack([A, Gf]) if p + k else np.zeros((0, n)))
    cones = ([clarabel.ZeroConeT(p)] if p else []) + ([clarabel.NonnegativeConeT(k)] if k else [])
    rhs = np.concatenate([b, hf])
    solver = clarabel.DefaultSolver(P, c, M, rhs, cones, settings)
    sol = solver.solve()
    status = _CLARABEL_STATUS.get(str(sol.status).split(".")[-1], UNKNOWN)
    z = np.asarray(sol.z, np.float64)
    return np.asarray(sol.x, np.float64), z[:p], z[p:], status


def _relative_margins(Q, c, A, b, Gf, hf, y, nu, lf):
    """Scale-invariant relative slacks and multipliers of the finite rows.

    ``a_i = |h_i| + |G_i||y|`` is the size of row ``i`` at ``y``; ``s_rel = s_i / a_i`` is
    unchanged by rescaling the row or a column of ``y``; ``lam_rel = lam_i a_i / E`` with ``E``
    the "energy" ``|c|'|y| + |y|'|Q||y| + |nu|'(|b| + |A||y|) + sum_j lam_j a_j``.
    """
    ay = np.abs(y)
    a = np.abs(hf) + np.abs(Gf) @ ay
    energy = (np.abs(c) @ ay + ay @ np.abs(Q) @ ay + np.abs(nu) @ (np.abs(b) + np.abs(A) @ ay)
              + np.abs(lf) @ a)
    tiny = np.finfo(np.float64).tiny
    s = hf - Gf @ y
    s_rel = np.maximum(s, 0.0) / np.maximum(a, tiny)
    lam_rel = np.maximum(lf, 0.0) * a / max(energy, tiny)
    return s_rel, lam_rel


def _nan_reference(n, p, k, status):
    return Reference(np.full(n, np.nan), np.full(p, np.nan), np.full(k, np.nan), status,
                     np.zeros(k, bool), 0.0, False, False, np.inf, np.inf)


def solve(Q, c, A=None, b=None, G=None, h=None) -> Reference:
    """Solve the QP with Clarabel and polish the result on its active set (float64).

    Rows with ``h_i = +inf`` are dropped; a row with ``h_i = -inf`` makes the problem
    infeasible; non-finite data elsewhere give ``status = "unknown"``.
    """
    Q, c, A, b, G, h = _blocks(Q, c, A, b, G, h)
    n, p, k = Q.shape[0], A.shape[0], G.shape[0]
    if np.any(h == -np.inf):
        return _nan_reference(n, p, k, INFEASIBLE)
    if not all(np.all(np.isfinite(x)) for x in (Q, c, A, b, G)) or np.any(np.isnan(h)):
        return _nan_reference(n, p, k, UNKNOWN)
    fin = np.isfinite(h)
    Gf, hf = G[fin], h[fin]
    y, nu, lf, status = _clarabel(Q, c, A, b, Gf, hf)

    def full(lf_):
        lam = np.zeros(k)
        lam[fin] = lf_
        return lam

    def residual(y_, nu_, lf_):
        return kkt_residuals(Q, c, A, b, G, h, y_, nu_, full(lf_))["max"]

    best = (y, nu, np.maximum(lf, 0.0))
    best_res = residual(*best)
    # An undecided Clarabel run (insufficient progress, iteration limit) still counts as a
    # solve if its point is nearly optimal; the polish and the final residual check decide.
    if status == UNKNOWN and best_res < 1e-6:
        status = OPTIMAL
    if status != OPTIMAL:
        return _nan_reference(n, p, k, status)
    # Polish: the equality KKT system on an active set, first read from Clarabel's point with
    # scale-invariant margins (a row of G scaled by 1e-4 scales its multiplier by 1e4), then
    # corrected by primal-dual active-set steps until the polished point is primal and dual
    # feasible to rounding. A point with small margins (multipliers and slacks ~1e-5 apart)
    # is often misread from Clarabel's point; keeping that point unpolished made the reference
    # itself off by ~1e-5 (its KKT residual, with complementarity as a product, still ~1e-12).
    def polish(act):  # the equality KKT solve on the rows ``act``: (y, nu, lam)
        z, _ = _kkt_solve(_kkt_matrix(Q, A, Gf[act]), np.concatenate([-c, b, hf[act]]))
        lp = np.zeros(Gf.shape[0])
        lp[act] = z[n + p:]
        return z[:n], z[n:n + p], lp

    s_rel, lam_rel = _relative_margins(Q, c, A, b, Gf, hf, *best)
    act = lam_rel > s_rel
    polished = False
    for _ in range(2 * Gf.shape[0] + 2):
        cand = polish(act)
        if not all(np.all(np.isfinite(x)) for x in cand):
            break
        yc, nuc, lp = cand
        s_rel, lam_rel = _relative_margins(Q, c, A, b, Gf, hf, yc, nuc, np.abs(lp))
        s_c = hf - Gf @ yc
        size = np.maximum(np.abs(hf) + np.abs(Gf) @ np.abs(yc), np.finfo(float).tiny)
        violated = (s_c < 0) & (-s_c / size > 1e-12)
        negative = act & (lp < 0) & (lam_rel > 1e-12)
        if not violated.any() and not negative.any():
            best, best_res = (yc, nuc, np.maximum(lp, 0.0)), residual(*cand)
            polished = True
            break
        act = (act & ~negative) | violated
    for _ in range(0 if polished else 2):  # no feasible active set found: the plain polish
        yb, _, lb = best
        cand = polish(lb > np.maximum(hf - Gf @ yb, 0.0))
        res = residual(*cand)
        if res <= best_res or res < 1e-14:
            best, best_res = cand, res
    y, nu, lf = best
    if best_res > 1e-9:  # neither Clarabel nor the polish reached a trustworthy point
        return _nan_reference(n, p, k, UNKNOWN)
    s_rel, lam_rel = _relative_margins(Q, c, A, b, Gf, hf, y, nu, lf)
    act = lam_rel > s_rel
    margin = float(np.min(np.maximum(s_rel, lam_rel))) if lf.size else 1.0
    # LICQ: [A; G_I] (rows scaled to unit max) has full row rank. Uniqueness: Q is definite
    # on its null space Z (columns scaled by diag(Q)^-1/2 first).
    C = np.vstack([A, Gf[act]])
    licq, unique = True, True
    Z = np.eye(n)
    if C.shape[0]:
        Ce = C / np.maximum(np.max(np.abs(C), axis=1, keepdims=True), np.finfo(float).tiny)
        _, svn, Vt = np.linalg.svd(Ce)
        rank = int(np.sum(svn > 1e-10 * max(svn[0], 1e-300)))
        licq = rank == C.shape[0]
        Z = Vt[rank:].T
    if Z.shape[1]:
        dz = 1.0 / np.sqrt(np.maximum(np.abs(np.diag(Q)), 1e-300))
        Qs = Q * dz[:, None] * dz[None, :]
        Zs = np.linalg.qr(Z / dz[:, None])[0]
        ev = np.linalg.eigvalsh(Zs.T @ Qs @ Zs)
        unique = bool(ev[0] > 1e-10 * max(ev[-1], 1.0))
    _, cond = _kkt_solve(_kkt_matrix(Q, A, Gf[act]), np.zeros(n + p + int(act.sum())), refine=0)
    return Reference(y, nu, full(lf), OPTIMAL, _full_mask(fin, act), margin, licq, unique, cond,
                     best_res)


def _full_mask(fin, act):
    mask = np.zeros(fin.shape[0], bool)
    mask[fin] = act
    return mask


def hypergradient(Q, c, A, b, G, h, ref: Reference, v) -> dict:
    """Exact gradient of ``v'y*`` with respect to ``Q, c, A, b, G, h`` (float64).

    Uses the active set, ``y``, ``nu`` and ``lam`` of ``ref`` (see the module docstring for
    the formulas). Inactive and infinite rows get zero. Singular active-set systems (LICQ
    failing) give the minimum-norm multipliers ``mu``.

    Returns:
      dict with keys ``"Q", "c", "A", "b", "G", "h"``.
    """
    Q, c, A, b, G, h = _blocks(Q, c, A, b, G, h)
    n, p = Q.shape[0], A.shape[0]
    v = np.asarray(v, np.float64)
    act = ref.active
    K = _kkt_matrix(Q, A, G[act])
    s, _ = _kkt_solve(K, np.concatenate([v, np.zeros(p + int(act.sum()))]))
    w, mu_e, mu_i = s[:n], s[n:n + p], s[n + p:]
    y, nu, lam = ref.y, ref.nu, ref.lam
    gG = np.zeros_like(G)
    gh = np.zeros_like(h)
    gG[act] = -(np.outer(lam[act], w) + np.outer(mu_i, y))
    gh[act] = mu_i
    return {
        "Q": -0.5 * (np.outer(w, y) + np.outer(y, w)),
        "c": -w,
        "A": -(np.outer(nu, w) + np.outer(mu_e, y)),
        "b": mu_e,
        "G": gG,
        "h": gh,
    }


def relative_error(got, want, floor=0.0) -> float:
    """``||got - want|| / max(||want||, floor)`` (Frobenius; ``inf`` if ``got`` is not finite;
    0 when both are zero)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return np.inf
    num = float(np.linalg.norm(got - want))
    den = max(float(np.linalg.norm(want)), floor)
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else np.inf
