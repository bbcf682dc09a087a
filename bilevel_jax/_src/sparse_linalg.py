"""Sparse matrices for the KKT core, and the sparse direct factorisation of its KKT matrices.

:class:`SparseMatrix` is a coordinate-format matrix (a pytree of ``data``, ``row``, ``col``;
the shape is static) with the few operations the interior point, polish and adjoint of
:mod:`bilevel_jax._src.qp` need: products with vectors, the transpose, diagonal scaling,
stacking, the symmetric part and row/column max-norms. Its ``data`` receive gradients.

The KKT matrices of that module are

    K(m, e) = [[Q, C'M], [M C, -diag(e)]] ,   M = diag(m) ,   e >= 0 ,

and :func:`factor` / :func:`solve` handle them when ``Q`` and ``C`` are sparse. The
factorisation runs on the host, through :func:`jax.pure_callback`, with SciPy's SuperLU
(``jax.experimental.sparse.linalg.spsolve`` does the same on CPU): rows with ``e_i >= 1e-8``
(inactive at an interior point, or masked out) and at most 32 entries are eliminated into
the ``y`` block (``Q + sum_i m_i^2 c_i c_i' / e_i``); the others stay, and the matrix
factorised is the *quasi-definite* ``[[P + d1 I, C_R'M], [M C_R, -diag(e_R) - d2 I]]``
(``d1, d2 > 0``), which has an ``L D L'`` factorisation for every symmetric ordering. So
SuperLU runs with a fill-reducing column ordering (COLAMD) and diagonal pivots only.
(Measured on the 1-D smoothing QP at ``n = 1e5`` with 9e4 active rows: 0.1 s and 1.3e6
factor entries; SuperLU's default partial pivoting instead let the ordering degrade as
interior-point weights spread, and ran out of memory on that active-set system; the
minimum-degree ordering of ``A + A'`` took 3.5 s.) :func:`solve` returns the solution of
that regularised matrix (in float64 on the host); the caller refines it on the exact ``K(m,
e)`` with the dense path's loop (:func:`bilevel_jax._src.qp._refine`), which removes the
regularisation's bias.

A factorisation is a small integer token: the factors stay in a host-side cache, and
:func:`solve` refactorises from the data it is passed when its token was evicted, so the
result depends only on the arguments (the callback is pure in effect). Under ``jax.vmap``
the problems of a batch are factorised one after the other. The device never holds the
factors; on an accelerator each call copies the data to the host and back.
"""

from __future__ import annotations

import collections
import itertools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._src import vma

__all__ = ["SparseMatrix", "factor", "solve"]


@jax.tree_util.register_pytree_node_class
class SparseMatrix:
    """A ``shape`` matrix with entries ``data[i]`` at ``(row[i], col[i])`` (duplicates add).

    Indices out of range (BCOO's padding) contribute nothing.
    """

    def __init__(self, data, row, col, shape):
        self.data, self.row, self.col = data, row, col
        self.shape = tuple(int(s) for s in shape)

    def tree_flatten(self):
        return (self.data, self.row, self.col), self.shape

    @classmethod
    def tree_unflatten(cls, shape, children):
        return cls(*children, shape)

    @classmethod
    def from_dense(cls, M):
        """Every entry stored (for small dense blocks beside sparse ones)."""
        r, n = M.shape
        row, col = np.divmod(np.arange(r * n), max(n, 1))
        return cls(jnp.reshape(M, (-1,)), jnp.asarray(row, jnp.int32),
                   jnp.asarray(col, jnp.int32), (r, n))

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def size(self):
        return self.data.size

    @property
    def T(self):  # noqa: N802
        return SparseMatrix(self.data, self.col, self.row, self.shape[::-1])

    def __matmul__(self, x):
        v = self.data * x.at[self.col].get(mode="fill", fill_value=0)
        return jax.ops.segment_sum(v, self.row, num_segments=self.shape[0])

    def scale(self, r, c):
        """``diag(r) M diag(c)``."""
        d = self.data * r.at[self.row].get(mode="fill", fill_value=0)
        return self._with(d * c.at[self.col].get(mode="fill", fill_value=0))

    def _with(self, data):
        return SparseMatrix(data, self.row, self.col, self.shape)

    def sym(self):
        """``(M + M') / 2``."""
        half = 0.5 * self.data
        return SparseMatrix(jnp.concatenate([half, half]), jnp.concatenate([self.row, self.col]),
                            jnp.concatenate([self.col, self.row]), self.shape)

    def abs_max(self, r, c):
        """Row and column max-norms of ``diag(r) |M| diag(c)``."""
        a = jnp.abs(self.scale(r, c).data)
        rows = jax.ops.segment_max(a, self.row, num_segments=self.shape[0])
        cols = jax.ops.segment_max(a, self.col, num_segments=self.shape[1])
        return jnp.maximum(rows, 0), jnp.maximum(cols, 0)

    def vstack(self, other):
        """``[self; other]`` (same number of columns)."""
        return SparseMatrix(jnp.concatenate([self.data, other.data]),
                            jnp.concatenate([self.row, other.row + self.shape[0]]),
                            jnp.concatenate([self.col, other.col]),
                            (self.shape[0] + other.shape[0], self.shape[1]))


# --------------------------------------------------------------------------------------------
# Host side.

_CACHE: collections.OrderedDict = collections.OrderedDict()
_CACHE_SIZE = 8
# The SciPy matrices of the last few (Q, C), found by comparing their arrays: an interior
# point factorises the same Q and C with new weights every iteration (building them cost
# 0.3 s of 3.8 s on the smoothing QP at n = 1e5; a blake2b digest of the arrays, 0.24 s).
_MATRICES: collections.deque = collections.deque(maxlen=4)
_LOCK = threading.Lock()
_TOKENS = itertools.count(1)


class _Factor:
    """The factors of the regularised, reduced matrix and what a solve needs of the data."""

    def __init__(self, Q, C, m, e, d1, d2, inertia=False):
        import scipy.sparse as sp
        import scipy.sparse.linalg as sla

        self.n = n = Q.shape[0]
        self.C = C
        # Rows with more than 32 entries stay (eliminating a row of k entries adds k^2 to
        # the y block: the dense equality sum(y) = b of the smoothing QP, with the float32
        # ridge 1e-6 on it, asked for 1e10 entries at n = 1e5), except masked ones
        # (m_i = 0: -e_i x2_i = r2_i, no fill).
        short = (np.diff(C.indptr) <= 32) | (m == 0)
        self.elim = (e >= 1e-8) & short
        keep = ~self.elim
        self.m_over_e = np.where(self.elim, m / np.where(self.elim, e, 1), 0)
        self.inv_e = np.where(self.elim, 1 / np.where(self.elim, e, 1), 0)
        w = m * self.m_over_e
        rows = np.flatnonzero(w != 0)
        Ce = C[rows]
        P = Q + Ce.T @ sp.diags(w[rows]) @ Ce + d1 * sp.eye(n)
        self.keep = np.flatnonzero(keep)
        CR = sp.diags(m[self.keep]) @ C[self.keep]
        K = sp.bmat([[P, CR.T], [CR, -sp.diags(e[self.keep] + d2)]], format="csc")
        self.lu, self.positive, self.pivot = None, -1, np.nan
        if not np.all(np.isfinite(K.data)):
            return  # (NaN data: every solve is NaN)
        try:
            self.lu = sla.splu(K, permc_spec="COLAMD", diag_pivot_thresh=0.0,
                               options={"SymmetricMode": True}, panel_size=4, relax=1)
        except RuntimeError:  # a zero pivot: Q + d1 I is not positive definite
            return
        if inertia:  # (``lu.U`` copies the factor: only when asked)
            # Inertia of the quasi-definite matrix: n positive pivots when Q + d1 I is
            # positive definite (diagonal pivots: U's diagonal has the signs of L D L''s D).
            pivots = self.lu.U.diagonal()
            self.positive = int(np.sum(pivots > 0))
            self.pivot = float(np.min(np.abs(pivots), initial=np.inf))

    def apply_inverse(self, r1, r2):
        if self.lu is None:
            return np.full_like(r1, np.nan), np.full_like(r2, np.nan)
        rhs = np.concatenate([r1 + self.C.T @ (self.m_over_e * r2), r2[self.keep]])
        x = self.lu.solve(rhs)
        x1 = x[: self.n]
        x2 = self.m_over_e * (self.C @ x1) - self.inv_e * r2
        x2[self.keep] = x[self.n:]
        return x1, x2


def _matrix(data, row, col, shape):
    import scipy.sparse as sp

    ok = (row >= 0) & (row < shape[0]) & (col >= 0) & (col < shape[1])
    return sp.csr_matrix((data[ok], (row[ok], col[ok])), shape=shape)


def _matrices(Qd, Qr, Qc, Cd, Cr, Cc, shapes):
    """The SciPy ``(Q, C)`` of these arrays, from :data:`_MATRICES` when they were seen."""
    arrays = (Qd, Qr, Qc, Cd, Cr, Cc)
    with _LOCK:
        for saved_shapes, saved, pair in _MATRICES:
            if saved_shapes == shapes and all(
                    a.dtype == b.dtype and np.array_equal(a, b)
                    for a, b in zip(arrays, saved, strict=True)):
                return pair
    pair = (_matrix(np.float64(Qd), Qr, Qc, shapes[0]), _matrix(np.float64(Cd), Cr, Cc, shapes[1]))
    with _LOCK:
        _MATRICES.append((shapes, tuple(np.array(a) for a in arrays), pair))
    return pair


def _host_factor(Qd, Qr, Qc, Cd, Cr, Cc, m, e, d1, d2, *, shapes, inertia):
    Q, C = _matrices(Qd, Qr, Qc, Cd, Cr, Cc, shapes)
    f = _Factor(Q, C, np.float64(m), np.float64(e), float(d1), float(d2), inertia)
    with _LOCK:
        token = next(_TOKENS) % (2**31 - 1)
        _CACHE[token] = f
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return (np.int32(token), np.int32(f.positive), np.asarray(f.pivot, Qd.dtype))


def _host_solve(token, Qd, Qr, Qc, Cd, Cr, Cc, m, e, d1, d2, r1, r2, *, shapes):
    with _LOCK:
        f = _CACHE.get(int(token))
    if f is None:  # evicted: factorise again from the data
        Q, C = _matrices(Qd, Qr, Qc, Cd, Cr, Cc, shapes)
        f = _Factor(Q, C, np.float64(m), np.float64(e), float(d1), float(d2))
    x1, x2 = f.apply_inverse(np.float64(r1), np.float64(r2))
    return x1.astype(r1.dtype), x2.astype(r2.dtype)


def _parts(Q: SparseMatrix, C: SparseMatrix):
    return (Q.data, Q.row, Q.col, C.data, C.row, C.col)


def factor(Q: SparseMatrix, C: SparseMatrix, m, e, d1, d2, inertia=False):
    """Factorise the regularised ``K(m, e)`` (see the module docstring) on the host.

    Args:
      Q: ``(n, n)``, symmetric.
      C: ``(r, n)``.
      m: ``(r,)`` row mask (or weights).
      e: ``(r,)``, ``>= 0``.
      d1: regularisation of the ``y`` block (``> 0``).
      d2: regularisation of the kept multiplier rows (``> 0``).
      inertia: compute ``positive`` and ``pivot`` (-1 and NaN otherwise).

    Returns:
      ``(token, positive, pivot)``: the token :func:`solve` takes, the number of positive
      pivots (``n`` when ``Q + d1 I`` is positive definite: the inertia of a quasi-definite
      matrix) and the smallest pivot magnitude.
    """
    dtype = Q.dtype
    out = (jax.ShapeDtypeStruct((), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32),
           jax.ShapeDtypeStruct((), dtype))
    cb = _partial(_host_factor, shapes=(Q.shape, C.shape), inertia=bool(inertia))
    result = jax.pure_callback(cb, out, *_parts(Q, C), m, e, jnp.asarray(d1, dtype),
                               jnp.asarray(d2, dtype), vmap_method="sequential")
    # (inside shard_map a callback's results are typed replicated: they vary like its inputs)
    return vma.vary_like(result, (Q, C, m, e))


def solve(token, Q: SparseMatrix, C: SparseMatrix, m, e, d1, d2, r):
    """``x = K^-1 r`` for the *regularised* ``K`` factorised as ``token``.

    ``token`` is ``factor(Q, C, m, e, d1, d2)``'s; the factors are recomputed from these
    arguments if it was evicted. Refinement on the exact matrix is the caller's
    (:func:`bilevel_jax._src.qp._kkt_solve`, the loop of the dense path).

    Returns:
      ``(x1, x2)``, NaN where the factorisation failed.
    """
    r1, r2 = r
    out = (jax.ShapeDtypeStruct(r1.shape, r1.dtype), jax.ShapeDtypeStruct(r2.shape, r2.dtype))
    cb = _partial(_host_solve, shapes=(Q.shape, C.shape))
    dtype = Q.dtype
    result = jax.pure_callback(
        cb, out, token, *_parts(Q, C), m, e, jnp.asarray(d1, dtype), jnp.asarray(d2, dtype),
        r1, r2, vmap_method="sequential")
    return vma.vary_like(result, (token, Q, C, m, e, r))


def _partial(fn, **kw):
    def call(*args):
        return fn(*(np.asarray(a) for a in args), **kw)

    return call
