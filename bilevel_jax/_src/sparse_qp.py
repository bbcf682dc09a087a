"""``solve_qp_sparse``: large sparse and matrix-free convex QPs with exact hypergradients.

Two methods. ``method="direct"`` (BCOO or dense data) is ``solve_qp``'s own interior point,
polish, status rules and implicit rule (:mod:`bilevel_jax._src.qp`) run on
:class:`~bilevel_jax._src.sparse_linalg.SparseMatrix` data, whose KKT matrices are
factorised on the host (:mod:`bilevel_jax._src.sparse_linalg`); :func:`_solve_direct` only
writes the box as rows of ``G``. ``method="admm"``, below, is matrix-free (operators).

The problem is

    min_y  1/2 y'Qy + c'y    s.t.   A y = b ,   G y <= h ,   lo <= y <= hi ,

with ``Q``, ``A``, ``G`` given as :class:`jax.experimental.sparse.BCOO` matrices, dense arrays
or linear operators (functions ``v -> M v``), and every other argument a vector.

**Forward (ADMM).** Three stages, all matrix-free (only products with ``Q``, ``A``, ``A'``, ``G``,
``G'`` are formed):

1. *Equilibration.* Ruiz's iteration on ``[Q, C'; C, 0]`` (``C = [A; G]``) computes positive
   diagonal scalings ``D`` (variables) and ``E`` (rows) and a cost scale ``sigma_c`` so that the
   rows and columns of the scaled KKT matrix have unit max-norm (BCOO and dense data; operators
   are used unscaled, as their entries are not available).
2. *ADMM* (the OSQP splitting) on ``l <= C_b x <= u`` with ``C_b = [A; G; I]``: each iteration
   solves ``(Q + sigma I + C_b' R C_b) x~ = sigma x - c + C_b'(R z - w)`` by conjugate
   gradients (warm-started, with a tolerance that follows the ADMM residual), then
   ``z <- Pi_[l,u](alpha C_b x~ + (1 - alpha) z + w / rho)`` and
   ``w <- w + rho (alpha C_b x~ + (1 - alpha) z_old - z)`` (over-relaxation ``alpha = 1.6``,
   ``rho`` 1000 times larger on equality rows). ``rho`` is adapted to balance the relative
   primal and dual residuals (no factorisation is redone: only the CG operator changes).
   Infeasibility is detected from the iterate differences (``dw`` a Farkas certificate:
   ``C_b' dw ~ 0`` and ``u' max(dw, 0) + l' min(dw, 0) < 0``; ``dx`` an unbounded ray:
   ``Q dx ~ 0``, ``C_b dx`` in the recession cone of ``[l, u]``, ``c' dx < 0``).
3. *Polish.* The active set is read from the ADMM point with the library's one rule
   (:func:`bilevel_jax._src.kkt.active_mask`), then the equality-constrained QP on it is solved
   exactly: MINRES on the static-shape masked KKT system

       [ Q     A'   G'M   B ] [ y   ]   [ -c     ]
       [ A     0    0     0 ] [ nu  ] = [  b     ]
       [ MG    0   -(I-M) 0 ] [ lam ]   [  M h   ]
       [ B     0    0  -(I-B)] [ z  ]   [  B beta ]

   (``M`` the active rows of ``G``, ``B`` the variables at a bound ``beta``, ``z`` the signed
   bound multiplier), with the primal-dual active-set corrections accepted by
   :func:`bilevel_jax._src.kkt.polish_verdict`. A guess whose system MINRES does not solve
   (typically inconsistent: guessed active rows that contradict the fixed variables, read from
   a rough ADMM point) ends the polish at once, since an active-set step from an unsolved
   system means nothing. When a polish is rejected, ADMM resumes with a 100 times tighter
   tolerance and the polish is tried again.

**Backward.** The implicit function theorem on the masked residual of that system (the
matrix above is its Jacobian in ``(y, nu, lam, z)``), through
:func:`bilevel_jax._src.implicit.custom_solution`: one MINRES solve with the same matrix
(symmetrically scaled by the forward pass's equilibration), then one vector-Jacobian product
of the residual with respect to the data, which gives the gradients with respect to the BCOO
``data`` arrays (or the arrays an operator closes over), ``c``, ``b``, ``h``, ``lo``, ``hi``.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import sparse as jsparse

from bilevel_jax._src import kkt, vma
from bilevel_jax._src import linear_solve as ls
from bilevel_jax._src import qp as dense_qp
from bilevel_jax._src.implicit import SolveAux, custom_solution, implicit_backward
from bilevel_jax._src.qp import QPSolution
from bilevel_jax._src.sparse_linalg import SparseMatrix
from bilevel_jax._src.types import Status, check_info, make_info

__all__ = ["solve_qp_sparse"]

_HI = lax.Precision.HIGHEST

# --------------------------------------------------------------------------------------------
# Linear operators. A matrix is a static ``_Spec`` (hashable: it selects the code) plus a pytree
# of parameters that travels in ``theta`` (so it receives cotangents).


class _Spec(NamedTuple):
    kind: str  # "bcoo", "dense", "op", "empty"
    shape: tuple
    sym: bool = False  # apply the symmetric part (Q given as BCOO or dense)
    mv: Callable | None = None  # closure-converted ``mv(v, *consts)`` (operators)
    rmv: Callable | None = None  # closure-converted ``rmv(u, *consts)`` or None (transpose)


def _bcoo(spec: _Spec, params) -> SparseMatrix:
    """A BCOO's ``(data, row, col)`` as the engine's :class:`SparseMatrix`.

    One implementation of the sparse products and norms serves both methods.
    """
    return SparseMatrix(*params, spec.shape)


def _apply(spec: _Spec, params, v):
    """``M v`` (the symmetric part ``(M + M')/2`` when ``spec.sym``)."""
    r, n = spec.shape
    if spec.kind == "empty":
        return jnp.zeros((r,), v.dtype)
    if spec.kind == "dense":
        M = params
        out = jnp.matmul(M, v, precision=_HI)
        if spec.sym:
            out = 0.5 * (out + jnp.matmul(M.T, v, precision=_HI))
        return out
    if spec.kind == "bcoo":
        M = _bcoo(spec, params)
        out = M @ v
        if spec.sym:
            out = 0.5 * (out + M.T @ v)
        return out
    consts, _ = params
    return jnp.asarray(spec.mv(v, *consts)).astype(v.dtype)


def _apply_t(spec: _Spec, params, u, like):
    """``M' u`` (``like`` an ``(n,)`` array for shape and dtype)."""
    r, n = spec.shape
    if spec.kind == "empty":
        return jnp.zeros_like(like)
    if spec.sym:
        return _apply(spec, params, u)
    if spec.kind == "dense":
        return jnp.matmul(params.T, u, precision=_HI)
    if spec.kind == "bcoo":
        return _bcoo(spec, params).T @ u
    consts, rconsts = params
    if spec.rmv is not None:
        return jnp.asarray(spec.rmv(u, *rconsts)).astype(u.dtype)
    (out,) = jax.linear_transpose(lambda x: spec.mv(x, *consts), like)(u)
    return out


def _scaled_absmax(spec: _Spec, params, rs, cs):
    """Row and column max-norms of ``diag(rs) M diag(cs)`` (``None`` for operators)."""
    r, n = spec.shape
    if spec.kind == "empty":
        return jnp.zeros((r,), cs.dtype), jnp.zeros((n,), cs.dtype)
    if spec.kind == "dense":
        return dense_qp._abs_max(params, rs, cs)
    if spec.kind == "bcoo":
        return dense_qp._abs_max(_bcoo(spec, params), rs, cs)
    return None


def _row_norms(spec: _Spec, params, dtype):
    """``max_j |M_ij|`` per row (ones for operators, whose entries are not available)."""
    r, n = spec.shape
    if spec.kind == "op":
        return jnp.ones((r,), dtype)
    return _scaled_absmax(spec, params, jnp.ones((r,), dtype), jnp.ones((n,), dtype))[0]


# --------------------------------------------------------------------------------------------
# Problem data in one tuple ``theta = (Qp, c, Ap, b, Gp, h, lo, hi)``.


class _Specs(NamedTuple):
    Q: _Spec
    A: _Spec
    G: _Spec


class _Options(NamedTuple):
    tol: float
    max_iter: int
    max_krylov: int
    ridge: float
    rho: float
    max_rounds: int
    admm_tol: float


def _safe(x):
    """``x`` with non-finite entries replaced by 0 (those rows or bounds are masked)."""
    return jnp.where(jnp.isfinite(x), x, jnp.zeros_like(x))


def _amax(x):
    return jnp.max(jnp.abs(x), initial=0.0)


class _Ops(NamedTuple):
    """Products with the original (unscaled) data."""

    Q: Callable
    A: Callable
    At: Callable
    G: Callable
    Gt: Callable


def _ops(specs: _Specs, theta) -> _Ops:
    Qp, c, Ap, _, Gp, _, _, _ = theta
    return _Ops(
        lambda v: _apply(specs.Q, Qp, v),
        lambda v: _apply(specs.A, Ap, v),
        lambda u: _apply_t(specs.A, Ap, u, c),
        lambda v: _apply(specs.G, Gp, v),
        lambda u: _apply_t(specs.G, Gp, u, c),
    )


def _measure(ops: _Ops, theta, y, nu, lam, zb):
    """Largest relative KKT residual (primal, dual, complementarity, multiplier sign)."""
    _, c, _, b, _, h, lo, hi = theta
    vh, vlo, vhi = jnp.isfinite(h), jnp.isfinite(lo), jnp.isfinite(hi)
    Qy, Ay, Gy = ops.Q(y), ops.A(y), ops.G(y)
    Atnu, Gtlam = ops.At(nu), ops.Gt(jnp.where(vh, lam, 0))
    lam_lo, lam_hi = jnp.maximum(-zb, 0), jnp.maximum(zb, 0)
    s_g = jnp.where(vh, _safe(h) - Gy, 0)
    s_lo, s_hi = jnp.where(vlo, y - _safe(lo), 0), jnp.where(vhi, _safe(hi) - y, 0)
    viol = jnp.maximum(
        jnp.maximum(_amax(Ay - b), _amax(jnp.minimum(s_g, 0))),
        jnp.maximum(_amax(jnp.minimum(s_lo, 0)), _amax(jnp.minimum(s_hi, 0))),
    )
    pscale = jnp.max(jnp.stack([
        _amax(b), _amax(_safe(h)), _amax(Ay), _amax(Gy), _amax(jnp.where(vlo | vhi, y, 0)),
        _amax(_safe(lo)), _amax(_safe(hi)),
    ]))
    rd = Qy + c + Atnu + Gtlam + zb
    dscale = jnp.max(jnp.stack([_amax(c), _amax(Qy), _amax(Atnu), _amax(Gtlam), _amax(zb)]))
    obj = 0.5 * jnp.dot(y, Qy, precision=_HI) + jnp.dot(c, y, precision=_HI)
    comp = (
        jnp.sum(jnp.abs(jnp.where(vh, lam, 0) * s_g))
        + jnp.sum(jnp.abs(jnp.where(vlo, lam_lo, 0) * s_lo))
        + jnp.sum(jnp.abs(jnp.where(vhi, lam_hi, 0) * s_hi))
    )
    lmax = jnp.maximum(_amax(lam), _amax(zb))
    neg = _amax(jnp.minimum(jnp.where(vh, lam, 0), 0)) / (1 + lmax)
    return jnp.max(jnp.stack([
        viol / (1 + pscale), _amax(rd) / (1 + dscale), comp / (1 + jnp.abs(obj)), neg,
    ]))


# --------------------------------------------------------------------------------------------
# Active sets (the one rule of kkt.py, applied to G rows and to each side of the box).


class _Masks(NamedTuple):
    g: Any  # active rows of G y <= h
    lo: Any  # variables at their lower bound
    hi: Any  # variables at their upper bound


def _masks(ops: _Ops, theta, g_norm, y, lam, zb, tol) -> _Masks:
    _, _, _, _, _, h, lo, hi = theta
    y, lam, zb = (lax.stop_gradient(a) for a in (y, lam, zb))
    h, lo, hi = (lax.stop_gradient(a) for a in (h, lo, hi))
    vh, vlo, vhi = jnp.isfinite(h), jnp.isfinite(lo), jnp.isfinite(hi)
    Gy = jnp.where(vh, lax.stop_gradient(ops.G(y)), 0)
    hs, los, his = _safe(h), _safe(lo), _safe(hi)
    one = jnp.ones_like(y)
    mg = kkt.active_mask(hs - Gy, lam, vh, tol, jnp.maximum(jnp.abs(hs), jnp.abs(Gy)), g_norm)
    mlo = kkt.active_mask(y - los, jnp.maximum(-zb, 0), vlo, tol,
                          jnp.maximum(jnp.abs(los), jnp.abs(y)), one)
    mhi = kkt.active_mask(his - y, jnp.maximum(zb, 0), vhi, tol,
                          jnp.maximum(jnp.abs(his), jnp.abs(y)), one)
    return _Masks(mg, mlo, mhi)


def _box_target(m: _Masks, lo, hi):
    """The bound a fixed variable sits at (``hi`` where the upper bound is active)."""
    return jnp.where(m.hi, _safe(hi), _safe(lo))


def _residual(specs: _Specs, tol):
    """The masked active-set KKT residual ``r(z, theta)``, ``z = (y, nu, lam, zb)``."""

    def residual(z, theta):
        y, nu, lam, zb = z
        _, c, _, b, Gp, h, lo, hi = theta
        ops = _ops(specs, theta)
        g_norm = lax.stop_gradient(_row_norms(specs.G, Gp, y.dtype))
        m = _masks(ops, theta, g_norm, y, lam, zb, tol)
        mg = m.g.astype(y.dtype)
        mb = (m.lo | m.hi).astype(y.dtype)
        r_y = ops.Q(y) + c + ops.At(nu) + ops.Gt(mg * lam) + mb * zb
        r_nu = ops.A(y) - b
        r_lam = mg * (ops.G(y) - _safe(h)) - (1 - mg) * lam
        r_zb = mb * (y - _box_target(m, lo, hi)) - (1 - mb) * zb
        return r_y, r_nu, r_lam, r_zb

    return residual


# --------------------------------------------------------------------------------------------
# Equilibration (Ruiz) and the scaled problem.


class _Scaling(NamedTuple):
    D: Any  # (n,) variable scaling: y = D x
    EA: Any  # (p,) rows of A
    EG: Any  # (k,) rows of G
    cost: Any  # scalar cost scaling


def _ruiz(specs: _Specs, theta, iters=10) -> _Scaling:
    Qp, c, Ap, _, Gp, _, _, _ = theta
    n, p, k = c.shape[0], specs.A.shape[0], specs.G.shape[0]
    dtype = c.dtype
    D, EA, EG = jnp.ones((n,), dtype), jnp.ones((p,), dtype), jnp.ones((k,), dtype)
    if any(s.kind == "op" for s in specs):
        return _Scaling(D, EA, EG, jnp.ones((), dtype))

    def inv_sqrt(x):
        return jnp.where(x > 1e-8, 1 / jnp.sqrt(jnp.maximum(x, 1e-8)), 1.0)

    def step(_, carry):
        D, EA, EG = carry
        _, qc = _scaled_absmax(specs.Q, Qp, D, D)
        ar, ac = _scaled_absmax(specs.A, Ap, EA, D)
        gr, gc = _scaled_absmax(specs.G, Gp, EG, D)
        col = jnp.maximum(jnp.maximum(qc, ac), gc)
        return D * inv_sqrt(col), EA * inv_sqrt(ar), EG * inv_sqrt(gr)

    D, EA, EG = vma.fori_loop(0, iters, step, (D, EA, EG), like=theta)
    D, EA, EG = (jnp.clip(a, 1e-4, 1e4) for a in (D, EA, EG))
    _, qc = _scaled_absmax(specs.Q, Qp, D, D)
    scale = jnp.maximum(jnp.mean(qc), _amax(D * c))
    cost = jnp.where(scale > 1e-6, 1 / jnp.maximum(scale, 1e-6), 1.0)
    return _Scaling(D, EA, EG, jnp.clip(cost, 1e-4, 1e4))


class _ScaledOps(NamedTuple):
    Q: Callable
    A: Callable
    At: Callable
    G: Callable
    Gt: Callable


def _scaled_ops(ops: _Ops, s: _Scaling) -> _ScaledOps:
    return _ScaledOps(
        lambda x: s.cost * s.D * ops.Q(s.D * x),
        lambda x: s.EA * ops.A(s.D * x),
        lambda u: s.D * ops.At(s.EA * u),
        lambda x: s.EG * ops.G(s.D * x),
        lambda u: s.D * ops.Gt(s.EG * u),
    )


def _unscale(s: _Scaling, x, nu, lam, zb):
    return s.D * x, s.EA * nu / s.cost, s.EG * lam / s.cost, zb / (s.cost * s.D)


# --------------------------------------------------------------------------------------------
# ADMM (OSQP splitting) with conjugate gradients for the x-step.


class _ADMM(NamedTuple):
    it: Any
    x: Any
    xt: Any  # last CG solution (warm start)
    z: Any  # (p + k + n,) projected constraint values
    w: Any  # (p + k + n,) dual variables
    rho: Any
    res: Any  # relative KKT residual of the last check (unscaled units)
    x_old: Any
    w_old: Any
    flag: Any  # 0 running, 1 primal infeasible, 2 dual infeasible (unbounded)


_RUNNING, _PINF, _DINF = 0, 1, 2


def _admm(sops: _ScaledOps, s: _Scaling, q, lb, ub, eq_rows, state: _ADMM, eps, max_iter,
          check_every=10):
    """ADMM steps (in blocks of ``check_every``) until the relative residual is <= ``eps``."""
    n, p = q.shape[0], eq_rows
    dtype = q.dtype
    sigma = jnp.asarray(1e-6, dtype)
    alpha = jnp.asarray(1.6, dtype)
    free = ~jnp.isfinite(lb) & ~jnp.isfinite(ub)
    is_eq = jnp.arange(lb.shape[0]) < p
    floor = 1e-12 if jnp.finfo(dtype).bits >= 64 else 1e-6
    unscale_rows = jnp.concatenate([1 / s.EA, 1 / s.EG, s.D])
    k = lb.shape[0] - p - n

    def cmat(x):
        return jnp.concatenate([sops.A(x), sops.G(x), x])

    def cmat_t(w):
        return sops.At(w[:p]) + sops.Gt(w[p : p + k]) + w[p + k :]

    def rho_vec(rho):
        return jnp.where(free, 1e-6 * rho, jnp.where(is_eq, 1e3 * rho, rho))

    def step(_, st):
        it, x, xt, z, w, rho, res, x_old, w_old, flag = st
        R = rho_vec(rho)

        def op(v):
            return sops.Q(v) + sigma * v + cmat_t(R * cmat(v))

        rhs = sigma * x - q + cmat_t(R * z - w)
        # CG on the correction from the last solution: its relative tolerance then refers to
        # the residual left by the warm start, which shrinks as ADMM converges.
        cg_tol = jnp.clip(0.1 * res, floor, 1e-2)
        xt = xt + ls.solve_cg(op, rhs - op(xt), tol=cg_tol, max_iter=50).x
        zt = cmat(xt)
        x_new = alpha * xt + (1 - alpha) * x
        zr = alpha * zt + (1 - alpha) * z
        z_new = jnp.clip(zr + w / R, lb, ub)
        w_new = w + R * (zr - z_new)
        return _ADMM(it + 1, x_new, xt, z_new, w_new, rho, res, x, w, flag)

    def measure(st):
        Qx, Cx, Ctw = sops.Q(st.x), cmat(st.x), cmat_t(st.w)
        rp = _amax((Cx - st.z) * unscale_rows)
        ps = jnp.maximum(_amax(Cx * unscale_rows), _amax(st.z * unscale_rows))
        du = 1 / (s.cost * s.D)
        rd = _amax((Qx + q + Ctw) * du)
        ds = jnp.max(jnp.stack([_amax(Qx * du), _amax(Ctw * du), _amax(q * du)]))
        rel_p, rel_d = rp / (1 + ps), rd / (1 + ds)
        # rho balances the two relative residuals.
        ratio = jnp.sqrt(jnp.where(rel_d > 0, rel_p / jnp.maximum(rel_d, 1e-300), 1.0))
        ratio = jnp.where(jnp.isfinite(ratio), ratio, 1.0)
        new_rho = jnp.clip(st.rho * ratio, 1e-6, 1e6)
        rho = jnp.where((ratio > 2.2) | (ratio < 0.45), new_rho, st.rho)
        # Infeasibility certificates from the last differences.
        eps_inf = jnp.asarray(1e-5 if jnp.finfo(dtype).bits >= 64 else 1e-3, dtype)
        dw = st.w - st.w_old
        dw_n = _amax(dw * jnp.concatenate([s.EA, s.EG, 1 / s.D]) / s.cost)
        dual_map = _amax(cmat_t(dw) / (s.cost * s.D))
        pos, negp = jnp.maximum(dw, 0), jnp.minimum(dw, 0)
        ub_term = jnp.where(pos > 0, jnp.where(jnp.isfinite(ub), ub * pos, jnp.inf), 0)
        lb_term = jnp.where(negp < 0, jnp.where(jnp.isfinite(lb), lb * negp, -jnp.inf), 0)
        support = jnp.sum(ub_term) + jnp.sum(lb_term)
        pinf = (dw_n > 0) & (dual_map <= eps_inf * dw_n) & (support < -eps_inf * _amax(dw))
        dx = st.x - st.x_old
        dx_n = _amax(s.D * dx)
        Cdx = cmat(dx)
        tolc = eps_inf * _amax(dx) * jnp.ones_like(Cdx)
        cone = jnp.all(jnp.where(jnp.isfinite(ub), Cdx <= tolc, True)) & jnp.all(
            jnp.where(jnp.isfinite(lb), Cdx >= -tolc, True)
        )
        dinf = (
            (dx_n > 0)
            & (_amax(sops.Q(dx) / (s.cost * s.D)) <= eps_inf * dx_n)
            & (jnp.dot(q, dx, precision=_HI) < -eps_inf * s.cost * dx_n)
            & cone
        )
        flag = jnp.where(pinf, _PINF, jnp.where(dinf, _DINF, _RUNNING)).astype(jnp.int32)
        res = jnp.maximum(rel_p, rel_d)
        res = jnp.where(jnp.isfinite(res), res, jnp.inf)
        return st._replace(rho=rho.astype(dtype), res=res.astype(dtype), flag=flag)

    def cond(st):
        return (st.it < max_iter) & (st.res > eps) & (st.flag == _RUNNING)

    def body(st):
        st = vma.fori_loop(0, check_every, step, st)
        return measure(st)

    return vma.while_loop(cond, body, state)


# --------------------------------------------------------------------------------------------
# Polish: the equality-constrained QP on a guessed active set, by MINRES.


def _polish(specs, theta, s: _Scaling, sops, g_norm, guess: _Masks, start, tol, opts):
    """Primal-dual active-set rounds on the masked KKT system (scaled), from ``guess``.

    Returns ``(z, ok, masks)`` with ``z = (y, nu, lam, zb)`` in original units.
    """
    _, c, _, b, _, h, lo, hi = theta
    n, p, k = c.shape[0], b.shape[0], h.shape[0]
    dtype = c.dtype
    ops = _ops(specs, theta)
    vh, vlo, vhi = jnp.isfinite(h), jnp.isfinite(lo), jnp.isfinite(hi)
    q = s.cost * s.D * c
    bs, hs = s.EA * b, s.EG * _safe(h)

    def attempt(m: _Masks, x0):
        mg = m.g.astype(dtype)
        mb = (m.lo | m.hi).astype(dtype)
        beta = _box_target(m, lo, hi) / s.D

        def matvec(u):
            x, nu, lam, zb = u[:n], u[n : n + p], u[n + p : n + p + k], u[n + p + k :]
            top = sops.Q(x) + sops.At(nu) + sops.Gt(mg * lam) + mb * zb
            return jnp.concatenate([
                top, sops.A(x), mg * sops.G(x) - (1 - mg) * lam, mb * x - (1 - mb) * zb,
            ])

        rhs = jnp.concatenate([-q, bs, mg * hs, mb * beta])
        x0 = jnp.concatenate([x0[:n], x0[n : n + p], mg * x0[n + p : n + p + k],
                              mb * x0[n + p + k :]])
        sol = ls.solve_minres(matvec, rhs, x0=x0, max_iter=opts.max_krylov)
        u = sol.x
        x, nu, lam, zb = u[:n], u[n : n + p], mg * u[n + p : n + p + k], mb * u[n + p + k :]
        y, nu, lam, zb = _unscale(s, x, nu, lam, zb)
        Gy = jnp.where(vh, ops.G(y), 0)
        ok_g, up_g = kkt.polish_verdict(_safe(h) - Gy, lam, m.g, vh, tol,
                                        jnp.maximum(jnp.abs(_safe(h)), jnp.abs(Gy)), g_norm)
        lo_s, hi_s = _safe(lo), _safe(hi)
        one = jnp.ones_like(y)
        lam_lo = jnp.where(m.lo & ~m.hi, -zb, jnp.maximum(-zb, 0))
        lam_hi = jnp.where(m.hi & ~m.lo, zb, jnp.maximum(zb, 0))
        ok_l, up_l = kkt.polish_verdict(y - lo_s, lam_lo, m.lo, vlo, tol,
                                        jnp.maximum(jnp.abs(lo_s), jnp.abs(y)), one)
        ok_h, up_h = kkt.polish_verdict(hi_s - y, lam_hi, m.hi, vhi, tol,
                                        jnp.maximum(jnp.abs(hi_s), jnp.abs(y)), one)
        finite = jnp.all(jnp.isfinite(u))
        res = _measure(ops, theta, y, nu, jnp.maximum(lam, 0), zb)
        ok = ok_g & ok_l & ok_h & finite & (res <= tol)
        # The upper bound wins where both sides would be guessed (only when lo == hi).
        update = _Masks(up_g, up_l & ~up_h, up_h)
        return (y, nu, jnp.maximum(lam, 0), zb), ok, update, u, sol.converged

    def cond(st):
        return (st[0] < opts.max_rounds) & ~st[2] & st[5]

    def body(st):
        it, _, _, m, x0, _ = st
        z, ok, update, u, solved = attempt(m, x0)
        nxt = jax.tree.map(lambda a, b_: jnp.where(ok, a, b_), m, update)
        return it + 1, z, ok, nxt, u, solved

    z0 = (jnp.zeros((n,), dtype), jnp.zeros((p,), dtype), jnp.zeros((k,), dtype),
          jnp.zeros((n,), dtype))
    # A guess whose system MINRES cannot solve (typically inconsistent: active rows that
    # contradict the fixed variables, read from a rough ADMM point) ends the rounds: an
    # active-set step from an unsolved system has no meaning; ADMM goes on instead.
    st = (jnp.asarray(0, jnp.int32), z0, jnp.asarray(False), guess, start, jnp.asarray(True))
    _, z, ok, m, _, _ = vma.while_loop(cond, body, st, like=theta)
    return z, ok, m


# --------------------------------------------------------------------------------------------
# Forward.


class _Extra(NamedTuple):
    scale: Any  # (D, EA, EG, 1/D): the symmetric scaling of the adjoint system


def _finite_data(theta):
    Qp, c, Ap, b, Gp, h, lo, hi = theta
    ok = jnp.asarray(True)
    for leaf in jax.tree_util.tree_leaves((Qp, c, Ap, b, Gp)):
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(leaf))
    for v in (h, lo, hi):
        ok = ok & ~jnp.any(jnp.isnan(v))
    return ok


def _clean(theta):
    """NaN replaced by 0 everywhere (a NaN problem gets NONFINITE; its loops must still end)."""

    def leaf(a):
        if jnp.issubdtype(a.dtype, jnp.inexact):
            return jnp.where(jnp.isnan(a), jnp.zeros_like(a), a)
        return a

    Qp, c, Ap, b, Gp, h, lo, hi = theta
    clean = jax.tree.map(leaf, (Qp, c, Ap, b, Gp))
    return (*clean[:2], clean[2], clean[3], clean[4], leaf(h), leaf(lo), leaf(hi))


def _forward(specs: _Specs, opts: _Options, theta):
    raw = theta
    theta = _clean(theta)
    _, c, _, b, Gp, h, lo, hi = theta
    dtype = c.dtype
    n, p, k = c.shape[0], b.shape[0], h.shape[0]
    tol = opts.tol
    finite = _finite_data(raw)
    # Empty sets that need no solve: h_i = -inf, lo_i > hi_i, lo_i = +inf or hi_i = -inf.
    empty = jnp.any(h == -jnp.inf) | jnp.any(lo > hi) | jnp.any(lo == jnp.inf)
    empty = empty | jnp.any(hi == -jnp.inf)
    theta_solve = (*theta[:5], jnp.where(h == -jnp.inf, 0, h),
                   jnp.where(empty, -jnp.inf, lo), jnp.where(empty, jnp.inf, hi))
    _, _, _, _, _, h, lo, hi = theta_solve
    ops = _ops(specs, theta_solve)
    s = _ruiz(specs, theta_solve)
    sops = _scaled_ops(ops, s)
    g_norm = _row_norms(specs.G, Gp, dtype)
    q = s.cost * s.D * c
    bs = s.EA * b
    lb = jnp.concatenate([bs, jnp.full((k,), -jnp.inf, dtype), lo / s.D])
    ub = jnp.concatenate([bs, s.EG * h, hi / s.D])
    m_rows = p + k + n
    zero_n, zero_m = jnp.zeros((n,), dtype), jnp.zeros((m_rows,), dtype)
    admm0 = _ADMM(jnp.asarray(0, jnp.int32), zero_n, zero_n, zero_m, zero_m,
                  jnp.asarray(opts.rho, dtype), jnp.asarray(jnp.inf, dtype), zero_n, zero_m,
                  jnp.asarray(_RUNNING, jnp.int32))
    eps0 = jnp.maximum(jnp.asarray(opts.admm_tol, dtype), tol)
    zeros_z = (zero_n, jnp.zeros((p,), dtype), jnp.zeros((k,), dtype), zero_n)

    def admm_point(st: _ADMM):
        w = st.w
        return _unscale(s, st.x, w[:p], jnp.maximum(w[p : p + k], 0), w[p + k :])

    def cond(carry):
        st, _, _, ok, rounds = carry
        return ~ok & (st.flag == _RUNNING) & (st.it < opts.max_iter) & (rounds < 12)

    def body(carry):
        st, eps, _, _, rounds = carry
        # A phase runs at most as many iterations as all earlier phases together (at least
        # 500): when ADMM stagnates above eps (float32), the polish is tried again anyway.
        cap = jnp.minimum(opts.max_iter, st.it + jnp.maximum(st.it, 500))
        st = _admm(sops, s, q, lb, ub, p, st, eps, cap)
        y, nu, lam, zb = admm_point(st)
        rule_tol = jnp.clip(st.res, tol, 1e-2)
        guess = _masks(ops, theta_solve, g_norm, y, lam, zb, rule_tol)
        start = jnp.concatenate([st.x, st.w])
        z, ok, _ = _polish(specs, theta_solve, s, sops, g_norm, guess, start, tol, opts)
        ok = ok & (st.flag == _RUNNING)
        return st, jnp.maximum(jnp.minimum(eps, st.res) * 1e-2, tol * 1e-6), z, ok, rounds + 1

    carry = (admm0, eps0, zeros_z, jnp.asarray(False), jnp.asarray(0, jnp.int32))
    st, _, z_pol, ok, _ = vma.while_loop(cond, body, carry, like=theta)
    z_admm = admm_point(st)
    z = tuple(jnp.where(ok, a, b_) for a, b_ in zip(z_pol, z_admm, strict=True))
    residual = _measure(ops, theta_solve, *z)
    status = jnp.where(ok, Status.SUCCESS, Status.MAX_STEPS)
    status = jnp.where(st.flag == _DINF, Status.UNBOUNDED, status)
    status = jnp.where((st.flag == _PINF) | empty, Status.INFEASIBLE, status)
    status = jnp.where(finite, status, Status.NONFINITE)
    bad = (status == Status.NONFINITE) | (status == Status.INFEASIBLE)
    z = tuple(jnp.where(bad, jnp.nan, a) for a in z)
    residual = jnp.where(bad, jnp.nan, residual)
    info = make_info(st.it, residual, status == Status.SUCCESS, status)
    extra = _Extra((s.D, s.EA, s.EG, 1 / s.D))
    return z, SolveAux(info, extra)


# --------------------------------------------------------------------------------------------
# Backward: the adjoint of the masked KKT system, by MINRES.


def _adjoint_solve(opts: _Options):
    def adjoint_solve(vjp_z, zbar, z, theta, aux):
        scale = aux.extra.scale
        sizes = [a.shape[0] for a in z]
        splits = [sum(sizes[:i]) for i in range(1, 4)]
        sflat = jnp.concatenate(scale)
        dtype = sflat.dtype
        nmult = sizes[0]

        def unflat(v):
            return tuple(jnp.split(v, splits))

        def matvec(v):
            out = jnp.concatenate(vjp_z(unflat(sflat * v)))
            ridge = jnp.where(jnp.arange(v.shape[0]) >= nmult, opts.ridge, 0).astype(dtype)
            return sflat * out - ridge * v

        rhs = sflat * jnp.concatenate(zbar)
        sol = ls.solve_minres(matvec, rhs, max_iter=opts.max_krylov)
        u = sflat * ls.solution_or_nan(sol, what="solve_qp_sparse adjoint (MINRES) solve")
        return unflat(u)

    return adjoint_solve


@partial(jax.jit, static_argnums=(0, 1))
def _solve(specs: _Specs, opts: _Options, theta):
    z0 = tuple(jnp.zeros_like(a) for a in (theta[1], theta[3], theta[5], theta[1]))
    backward = implicit_backward(_residual(specs, opts.tol), _adjoint_solve(opts))
    z, aux = custom_solution(lambda _z0, th: _forward(specs, opts, th), backward, z0, theta)
    y, nu, lam, zb = z
    lam_lo = jnp.where(zb < 0, -zb, 0)
    lam_hi = jnp.where(zb > 0, zb, 0)
    return QPSolution(y, nu, jnp.concatenate([lam, lam_lo, lam_hi]), aux.info)


# --------------------------------------------------------------------------------------------
# Input handling.


def _vector(name, x, size, dtype, fill=None):
    if x is None:
        return jnp.full((size,), fill, dtype)
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        raise TypeError(f"{name} must be real, got dtype {x.dtype}.")
    if x.ndim == 0 and fill is not None:
        x = jnp.full((size,), x)
    if x.shape != (size,):
        raise ValueError(f"{name} has shape {x.shape} but must have shape ({size},).")
    return x.astype(dtype)


def _matrix(name, M, rows, n, dtype, sym=False):
    """The ``(_Spec, params)`` of a BCOO matrix, a dense array or an operator."""
    if M is None:
        return _Spec("empty", (rows, n)), ()
    if isinstance(M, jsparse.BCOO):
        if M.n_batch or M.n_dense or M.ndim != 2:
            raise ValueError(
                f"{name} must be a 2-D BCOO matrix without batch or dense dimensions "
                f"(got n_batch={M.n_batch}, n_dense={M.n_dense}); vmap over its data instead."
            )
        if tuple(M.shape) != (rows, n):
            raise ValueError(f"{name} has shape {tuple(M.shape)} but must have shape {(rows, n)}.")
        params = (M.data.astype(dtype), M.indices[:, 0], M.indices[:, 1])
        return _Spec("bcoo", (rows, n), sym), params
    if callable(M) or (isinstance(M, tuple | list) and len(M) == 2 and callable(M[0])):
        mv, rmv = (M, None) if callable(M) else M
        example = jnp.zeros((n,), dtype)
        out = jax.eval_shape(mv, example)
        if out.shape != (rows,):
            raise ValueError(f"{name}(v) has shape {out.shape} but must have shape ({rows},).")
        conv, consts = vma.closure_convert(mv, example)
        rconv, rconsts = None, ()
        if rmv is not None:
            rconv, rconsts = vma.closure_convert(rmv, jnp.zeros((rows,), dtype))
        return _Spec("op", (rows, n), False, conv, rconv), (tuple(consts), tuple(rconsts))
    M = jnp.asarray(M)
    if M.shape != (rows, n):
        raise ValueError(f"{name} has shape {M.shape} but must have shape {(rows, n)}.")
    return _Spec("dense", (rows, n), sym), M.astype(dtype)


def _is_number(x):
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------
# method="direct": the interior point, polish and adjoint of solve_qp on sparse matrices.


def _sparse(spec: _Spec, params, dtype):
    r, n = spec.shape
    if spec.kind == "bcoo":
        return _bcoo(spec, params)
    if spec.kind == "dense":
        return SparseMatrix.from_dense(params)
    none = jnp.zeros((0,), jnp.int32)
    return SparseMatrix(jnp.zeros((0,), dtype), none, none, (r, n))


@partial(jax.jit, static_argnums=(0, 1, 2))
def _solve_direct(specs: _Specs, opts: dense_qp._Options, box: bool, theta):
    """``solve_qp``'s implicit rule on ``(Q, c, A, b, [G; -I; I], [h; -lo; hi])``."""
    Qp, c, Ap, b, Gp, h, lo, hi = theta
    dtype, n = c.dtype, c.shape[0]
    G = _sparse(specs.G, Gp, dtype)
    if box:
        idx = jnp.arange(2 * n, dtype=jnp.int32)
        rows = SparseMatrix(jnp.concatenate([-jnp.ones((n,), dtype), jnp.ones((n,), dtype)]),
                            idx, idx % n, (2 * n, n))
        G = G.vstack(rows)
        # Crossed bounds: an empty set (a row h_i = -inf makes the status INFEASIBLE).
        h = jnp.concatenate([h, -lo, jnp.where(lo > hi, -jnp.inf, hi)])
    data = (_sparse(specs.Q, Qp, dtype), c, _sparse(specs.A, Ap, dtype), b, G, h)
    z0 = (jnp.zeros((n,), dtype), jnp.zeros_like(b), jnp.zeros_like(h))
    sol = dense_qp._solve(data, z0, opts)
    lam = sol.lam if box else jnp.concatenate([sol.lam, jnp.zeros((2 * n,), dtype)])
    return sol._replace(lam=lam)


def solve_qp_sparse(
    Q,
    c,
    A=None,
    b=None,
    G=None,
    h=None,
    lo=None,
    hi=None,
    *,
    tol: float | None = None,
    method: str = "auto",
    max_iter: int | None = None,
    max_krylov: int = 2000,
    ridge: float | None = None,
    rho: float = 0.1,
    max_rounds: int = 12,
    admm_tol: float | None = None,
    throw: bool = False,
) -> QPSolution:
    r"""Solve a large sparse or matrix-free convex QP, differentiably in its data.

    .. math::
        \min_y \tfrac12 y^T Q y + c^T y \quad \text{s.t.} \quad A y = b,\; G y \le h,\;
        lo \le y \le hi

    KKT conditions, with ``nu`` free, ``lam >= 0`` for ``G`` and ``lam_lo, lam_hi >= 0``
    for the box: ``Q y + c + A'nu + G'lam - lam_lo + lam_hi = 0``, primal feasibility and
    complementarity. The sibling of :func:`~bilevel_jax.solve_qp` for problems whose data do
    not fit (or are not stored) as dense matrices: same result type, same statuses, same
    active-set rule, same failure policy.

    Two methods (``method="auto"``: ``"direct"`` when ``Q``, ``A`` and ``G`` are BCOO or
    dense arrays, ``"admm"`` when one of them is an operator):

    **method="direct"** runs :func:`~bilevel_jax.solve_qp`'s own interior point and implicit
    rule on the sparse data (the box as the rows ``-y <= -lo``, ``y <= hi``): Ruiz
    equilibration, the homogeneous Mehrotra interior point (to ``1e-2 tol``), the status rules,
    and the adjoint of the masked active-set KKT system with refinement on the exact matrix. Its
    KKT matrices ``[[Q, C'M], [M C, -diag(e)]]``, regularised into quasi-definite matrices
    (``1e-2 sqrt(eps)``, the bias refined away), are factorised on the host (through
    :func:`jax.pure_callback`) by QDLDL (the ``sparse`` extra), whose ordering and symbolic
    analysis are done once per problem, or by SciPy's SuperLU without it (slower), with a
    fill-reducing ordering and diagonal pivots; then ``solve_qp``'s polish on the active set
    (from the interior point's multipliers, which keeps them nonnegative on dependent active
    rows). Cost: one sparse factorisation per interior-point iteration (about 15-20), one per
    polish round and one for the backward pass; memory that of the sparse factors. It runs on
    the CPU (on an accelerator the data go to the host for each factorisation); under
    ``jax.vmap`` the problems are factorised one after the other.

    **method="admm"**: Ruiz equilibration (BCOO and dense data), then ADMM (the OSQP splitting of
    ``l <= [A; G; I] y <= u``) whose linear step is solved by warm-started conjugate
    gradients on ``Q + sigma I + C'RC`` (adaptive ``rho``, infeasibility and unboundedness
    certificates from the iterate differences), run to a moderate accuracy (1e-4 float64,
    1e-3 float32). Then the polish: the active set is read with the library's active-set rule,
    and the equality-constrained QP on it is solved by MINRES on the masked KKT system
    ``[Q, A', G'M, B; A, 0, 0, 0; MG, 0, -(I-M), 0; B, 0, 0, -(I-B)]`` (``M`` the active rows
    of ``G``, ``B`` the variables at a bound), with primal-dual active-set corrections (add
    violated rows, drop multipliers of the wrong sign) until the point passes the KKT test
    at ``tol``. A rejected polish sends ADMM back for a 100 times tighter residual. SUCCESS
    therefore means: the relative primal, dual and complementarity residuals of the returned
    point, measured on the original data, are ``<= tol``.

    **Backward** (reverse mode only): the implicit function theorem on the masked KKT
    residual, whose Jacobian is the matrix above; one MINRES solve with it (scaled by the
    forward pass's equilibration, ``-ridge`` on the multiplier diagonal) and one
    vector-Jacobian product of the residual. Gradients flow to ``c``, ``b``, ``h``, ``lo``,
    ``hi``, to the ``data`` of BCOO matrices, to dense matrices, and to the arrays an operator
    closes over. Weakly active rows (tight with a zero multiplier) are classed inactive, as in
    :func:`~bilevel_jax.solve_qp`. A MINRES solve that does not converge gives NaN
    cotangents.

    Assumptions: ``Q`` symmetric positive semidefinite (a BCOO or dense ``Q`` is symmetrised;
    an operator ``Q`` must be symmetric), the objective strictly convex on the feasible set;
    LICQ and strict complementarity for a true derivative. Operators are used without
    equilibration (their entries are unknown) and their row norms are taken as 1 in the
    active-set rule; scale them yourself if they are badly scaled.

    Statuses (both methods; ``"direct"`` adds ``NONCONVEX``, an indefinite ``Q``, NaN
    outputs): ``SUCCESS``; ``MAX_STEPS`` (``max_iter`` ADMM iterations, or polishing kept
    failing; outputs are the last ADMM point); ``INFEASIBLE`` (a certificate, ``h_i = -inf``,
    ``lo_i > hi_i``; NaN outputs); ``UNBOUNDED`` (a certificate; the last ADMM point);
    ``NONFINITE`` (NaN in the data; NaN outputs). Non-success statuses give NaN cotangents.

    Cost (``"admm"``): per ADMM iteration, a few CG steps (each one product with ``Q``,
    ``C`` and ``C'``); then the polish (one MINRES solve per active-set round, each step one
    product with ``Q``, ``A``, ``A'``, ``G``, ``G'``); the backward pass is one more MINRES
    solve. Memory ``O(nnz + n + p + k)``. Under ``jax.vmap`` (same sparsity, batched
    ``data``) the loops run until the slowest member stops. Eager calls with BCOO or dense
    data reuse one compilation per shape; operators are closure-converted per call (``jit``
    the caller to reuse it).

    Args:
      Q: ``(n, n)`` PSD matrix: BCOO, dense, or a function ``v -> Q v`` (symmetric).
      c: ``(n,)`` vector.
      A: optional ``(p, n)`` equality matrix: BCOO, dense, a function ``v -> A v`` (its
        transpose by :func:`jax.linear_transpose`) or a pair ``(v -> A v, u -> A'u)``.
      b: ``(p,)`` right-hand side (with ``A``).
      G: optional ``(k, n)`` inequality matrix, as ``A``.
      h: ``(k,)`` right-hand side (with ``G``); ``+inf`` means no constraint.
      lo: optional lower bounds ``(n,)`` (or a scalar); ``-inf`` means none.
      hi: optional upper bounds ``(n,)`` (or a scalar); ``+inf`` means none.
      method: ``"auto"``, ``"direct"`` (BCOO or dense data) or ``"admm"``.
      tol: relative KKT tolerance (default :func:`bilevel_jax._src.kkt.default_tol`: 1e-10
        float64, 1e-5 float32).
      max_iter: iteration limit (default 100 interior-point iterations for ``"direct"``,
        20000 ADMM iterations for ``"admm"``).
      max_krylov: iteration limit of each MINRES solve (polish and adjoint; ``"admm"``).
      ridge: ``eps >= 0`` on the multiplier diagonal of the adjoint system (default 1e-12
        float64, 1e-6 float32), for degenerate active sets.
      rho: initial ADMM penalty (adapted; ``"admm"``).
      max_rounds: active-set corrections per polish (``"admm"``; ``"direct"`` uses
        ``solve_qp``'s 8).
      admm_tol: relative residual at which ADMM stops for the first polish (default 1e-4
        float64, 1e-3 float32); each rejected polish divides it by 100.
      throw: raise :class:`~bilevel_jax.SolveError` on a non-success status.

    Returns:
      A :class:`~bilevel_jax.QPSolution` ``(y, nu, lam, info)``. ``lam`` has shape
      ``(k + 2 n,)``: ``lam[:k]`` the multipliers of ``G y <= h``, ``lam[k:k+n]`` those of
      ``y >= lo`` and ``lam[k+n:]`` those of ``y <= hi`` (the box written as the rows
      ``-y <= -lo`` and ``y <= hi``), all ``>= 0``.

    Raises:
      ValueError, TypeError: for bad shapes (naming the argument) or options.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.experimental import sparse
      >>> Q = sparse.BCOO.fromdense(jnp.eye(3))
      >>> sol = solve_qp_sparse(Q, -jnp.ones(3), lo=-0.5, hi=0.5)
      >>> print(sol.y.round(6), int(sol.info.status))
      [0.5 0.5 0.5] 0

    References:
      Stellato, Banjac, Goulart, Bemporad, Boyd. OSQP: an operator splitting solver for
      quadratic programs. Math. Prog. Comp. 2020. Ruiz. A scaling algorithm to equilibrate
      both rows and columns norms in matrices. 2001. Amos and Kolter. OptNet. ICML 2017.
    """
    if method not in ("auto", "direct", "admm"):
        raise ValueError(f"method must be 'auto', 'direct' or 'admm', got {method!r}.")
    if tol is not None and not (_is_number(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number or None, got {tol!r}.")
    if ridge is not None and not (_is_number(ridge) and ridge >= 0):
        raise ValueError(f"ridge must be a number >= 0 or None, got {ridge!r}.")
    for name, v in (("max_iter", 1 if max_iter is None else max_iter),
                    ("max_krylov", max_krylov),
                    ("max_rounds", max_rounds)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}.")
    if not (_is_number(rho) and rho > 0):
        raise ValueError(f"rho must be a positive number, got {rho!r}.")
    for mname, mat, vname, vec in (("A", A, "b", b), ("G", G, "h", h)):
        if (mat is None) != (vec is None):
            given, missing = (mname, vname) if vec is None else (vname, mname)
            raise ValueError(f"{given} was given without {missing}; pass both or neither.")
    c = jnp.asarray(c)
    if c.ndim != 1 or c.shape[0] == 0:
        raise ValueError(f"c must be a non-empty vector, got shape {c.shape}.")
    n = c.shape[0]
    dtype = c.dtype if jnp.issubdtype(c.dtype, jnp.floating) else jnp.result_type(float)
    p = 0 if b is None else jnp.shape(b)[0]
    k = 0 if h is None else jnp.shape(h)[0]
    c = c.astype(dtype)
    b = _vector("b", b, p, dtype, 0.0)
    h = _vector("h", h, k, dtype, 0.0)
    lo_given, hi_given = lo, hi
    lo = _vector("lo", lo, n, dtype, -jnp.inf)
    hi = _vector("hi", hi, n, dtype, jnp.inf)
    if Q is None:
        raise ValueError("Q is required (pass a zero matrix for an LP).")
    specQ, Qp = _matrix("Q", Q, n, n, dtype, sym=True)
    specA, Ap = _matrix("A", A, p, n, dtype)
    specG, Gp = _matrix("G", G, k, n, dtype)
    tol = kkt.default_tol(dtype) if tol is None else float(tol)
    wide = jnp.finfo(dtype).bits >= 64
    ridge = (1e-12 if wide else 1e-6) if ridge is None else float(ridge)
    operators = any(spec.kind == "op" for spec in (specQ, specA, specG))
    if method == "direct" and operators:
        raise ValueError("method='direct' needs the entries of Q, A and G (BCOO or dense "
                         "arrays); operators are solved by method='admm'.")
    if method != "admm" and not operators:
        # No polish: the interior point already runs to 1e-2 tol, and each active-set round
        # of the polish is one more sparse factorisation (measured on the smoothing QP at
        # n = 1e4: 0.86 s with it, 0.40 s without, the same errors: y 8.9e-9, d/dtheta 3e-16).
        opts = dense_qp._Options("implicit", tol, 100 if max_iter is None else int(max_iter),
                                 ridge, 0.0, 0.0, True, False)
        box = not (lo_given is None and hi_given is None)
        solution = _solve_direct(_Specs(specQ, specA, specG), opts, box,
                                 (Qp, c, Ap, b, Gp, h, lo, hi))
        check_info(solution.info, throw)
        return solution
    max_iter = 20000 if max_iter is None else max_iter
    if admm_tol is not None and not (_is_number(admm_tol) and admm_tol > 0):
        raise ValueError(f"admm_tol must be a positive number or None, got {admm_tol!r}.")
    admm_tol = (1e-4 if wide else 1e-3) if admm_tol is None else float(admm_tol)
    opts = _Options(tol, int(max_iter), int(max_krylov), ridge, float(rho), int(max_rounds),
                    admm_tol)
    theta = (Qp, c, Ap, b, Gp, h, lo, hi)
    solution = _solve(_Specs(specQ, specA, specG), opts, theta)
    check_info(solution.info, throw)
    return solution
