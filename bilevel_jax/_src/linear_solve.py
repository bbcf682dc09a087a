"""Linear solvers for the backward pass of implicit differentiation.

Implicit differentiation of a lower-level solution ``x*(θ)`` defined by an optimality
condition ``F(x*, θ) = 0`` requires solving linear systems with the Jacobian
``M = ∂F/∂x`` (or its transpose), usually available only through matrix-vector products.
This module provides direct and iterative solvers for ``(M + δI) x = b``, where ``M`` is
given by a linear function ``matvec: (n,) -> (n,)`` (typically a JVP or VJP, never
materialised by the iterative methods), ``b`` is a flat 1-D array of shape
``(n,)`` and ``δ = ridge >= 0`` is an optional Tikhonov regularisation. With ``ridge > 0``
every solver returns the solution of the *regularised* system, not of ``M x = b``.

Solvers:

* :func:`solve_dense` / :func:`factorize` / :func:`solve_factorized`: materialise ``M`` and
  use a Cholesky (SPD) or LU (otherwise) factorisation, ``O(n^3)``.
* :func:`solve_cg`: conjugate gradients, ``M`` symmetric positive definite.
* :func:`solve_minres`: MINRES (Paige & Saunders, 1975), ``M`` symmetric, possibly indefinite
  or singular (consistent systems converge to the minimum-norm solution from ``x0 = 0``).
* :func:`solve_gmres`: restarted GMRES, any nonsingular ``M``.
* :func:`solve_normal_cg`: CG on the normal equations (CGLS), any ``M``.
* :func:`solve_neumann`: truncated Neumann series (Richardson iteration).
* :func:`linear_solve`: dispatch by ``method`` and ``structure``.

All functions are pure JAX and work under :func:`jax.jit` and :func:`jax.vmap` (over ``b``
and over arrays closed over by ``matvec``). The solvers (:func:`linear_solve`,
:func:`solve_dense` and the iterative ones) return a :class:`LinearSolution`
``(x, converged, residual, num_steps)``: ``x`` has the dtype of ``b``; ``residual`` is the
relative residual ``||b - (M + δI) x|| / ||b||`` recomputed from ``x`` (one extra matvec, not
the recurrence's estimate); ``converged`` says that the method met its stopping test within
``max_iter`` *and* that this recomputed residual is finite and at most
:func:`attainable_tol` ``= max(10 tol, eps^(1/4))`` (a recurrence that no longer describes
``x``, a breakdown or a non-finite ``x`` is never reported as converged). Callers on a
backward pass turn a non-converged solve into NaN with :func:`solution_or_nan`, so an
untrustworthy hypergradient never looks valid. The iterative methods use
:func:`jax.lax.while_loop` and are therefore not reverse-mode differentiable themselves; they
are meant to be called inside custom VJP rules.

Conventions shared by the iterative solvers:

* ``tol`` is a *relative* residual tolerance: iteration stops once
  ``||b - (M + δI) x|| <= tol * ||b||`` (as estimated by the recurrence of the method).
  ``tol=None`` selects :func:`default_tol` of the dtype of ``b`` (``1e-12`` for float64,
  ``1e-6`` for float32).
* ``max_iter=None`` selects :func:`default_max_iter`, i.e. ``max(10 * n, 100)`` matrix-vector
  products.
* ``ridge``, ``tol`` and ``max_iter`` (and ``step``/``num_terms`` of the Neumann series) may be
  traced JAX scalars, so changing them does not trigger recompilation; Python numbers are
  validated eagerly (``ValueError`` naming the argument).
* Internally the system is rescaled by ``max|b_i|`` (the solution is linear in ``b``), so the
  result does not depend on the magnitude of ``b`` and tiny or huge right-hand sides neither
  underflow nor overflow. MINRES, GMRES and CGLS also divide the operator by
  ``max|M b̂ + δ b̂|`` (one extra matvec), making them invariant to the scale of ``M``.
* ``b == 0`` returns exactly zero (``x0`` is then ignored), and breakdowns are guarded so that
  no NaN is produced by the solver itself.

Why our own Krylov solvers: ``jax.scipy.sparse.linalg`` has CG and GMRES (no MINRES), with
the same iterates as ours (measured at n = 200: CG relative error 6.2e-13 against our
6.3e-13 in float64, 8.4e-7 against 7.6e-7 in float32; on a 10^4 masked-Laplacian system
1.4 ms against 2.0 ms in float64, 0.35 against 0.38 ms in float32), but it reports nothing
about convergence (its ``info`` is always ``None`` in jax 0.10.2: no flag, no step count, so
a solve that ran out of steps cannot be told from one that met its tolerance), and without a
pre-scaling a right-hand side of size 1e-200 comes back as zero (relative residual 1.0, ours
6.4e-13). Reporting is the point of this module on a backward pass, so the solvers are ours.
Recomputing the residual after a ``jax.scipy`` solve would restore ``converged`` and
``residual`` but not ``num_steps``, and the library's solvers also fail where ours run
(measured with jax 0.10.2, 4 host devices, a batch of 8 SPD systems of size 20, each case
checked against ``numpy.linalg.solve``): ``jax.scipy.sparse.linalg.gmres`` fails under
``jax.shard_map`` with its default checks ("while_loop body function carry input and carry
output must have equal types": its Krylov basis starts replicated), with per-device matrices
as with a replicated one; ``cg`` passes with per-device matrices (error 7.4e-14, as ours) but
fails when ``jax.vmap`` over per-device right-hand sides meets a replicated operator ("pvary
is a invariant->variant collective"), the shape of a batched backward pass; ours pass all
three (errors 7.4e-14, 7.4e-14, 6.5e-14). CGLS and MINRES have no ``jax.scipy`` version.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.extend.core
import jax.numpy as jnp
import jax.scipy.linalg as jsp_linalg
import numpy as np
from jax import lax

from bilevel_jax._src import loops, vma

__all__ = [
    "DENSE_MAX_SIZE",
    "METHODS",
    "STRUCTURES",
    "Factorization",
    "LinearSolution",
    "attainable_tol",
    "cho_solve",
    "cholesky",
    "default_max_iter",
    "default_tol",
    "factorize",
    "hessian",
    "inverse_products",
    "lu_factor",
    "lu_solve",
    "linear_solve",
    "materialize",
    "solve_cg",
    "solve_dense",
    "solve_factorized",
    "symmetric_norm",
    "solve_gmres",
    "triangular_solve",
    "solve_minres",
    "solve_neumann",
    "solve_normal_cg",
    "solution_or_nan",
]

Matvec = Callable[[jax.Array], jax.Array]

#: Largest system size for which ``linear_solve(method="auto")`` materialises the matrix
#: (``n`` batched matrix-vector products, ``O(n^2)`` memory) and uses a dense
#: factorisation (``O(n^3)`` flops). Larger systems use a matrix-free Krylov method.
DENSE_MAX_SIZE = 1000

#: Valid values of the ``structure`` argument.
STRUCTURES = ("spd", "symmetric", "general")

#: Valid values of the ``method`` argument of :func:`linear_solve`.
METHODS = ("auto", "dense", "cholesky", "lu", "cg", "minres", "gmres", "normal_cg", "neumann")

_NEUMANN_DEFAULT_TERMS = 100


class LinearSolution(NamedTuple):
    """Result of a linear solve: the solution and whether it can be trusted.

    Attributes:
      x: the approximate solution, with the dtype of ``b``.
      converged: ``bool`` scalar: the stopping test was met within ``max_iter`` and the
        recomputed relative residual is finite and at most :func:`attainable_tol`.
      residual: ``||b - (M + δI) x|| / ||b||`` recomputed from ``x`` (0 when ``b = 0``).
      num_steps: ``int32`` scalar: iterations taken (matrix-vector products of the iteration;
        0 for the dense solvers).
    """

    x: jax.Array
    converged: jax.Array
    residual: jax.Array
    num_steps: jax.Array


def attainable_tol(tol: Any, dtype: Any) -> jax.Array:
    """The largest recomputed relative residual a converged solve may have.

    ``max(10 tol, eps^(1/4))`` (1.2e-4 in float64, 1.9e-2 in float32). The recomputed residual
    of a Krylov method that met its recursive test sits within a small factor of ``tol`` when
    ``tol`` is attainable, and otherwise at the rounding floor, about ``eps`` times the
    condition number, where a backward-stable direct solve of the same system sits too: that
    is the conditioning of the problem, not a failed solve, and is accepted up to condition
    numbers near ``eps^(-3/4)``. Far above it the recurrence no longer describes the returned
    ``x`` (an operator that is not symmetric given to CG, a breakdown): not converged.

    Args:
      tol: the relative tolerance asked for (a number or a traced scalar).
      dtype: the floating dtype of the system.

    Returns:
      The bound, a scalar of ``dtype``.
    """
    eps = float(jnp.finfo(dtype).eps)
    return jnp.maximum(10 * jnp.asarray(tol, dtype), jnp.asarray(eps**0.25, dtype))


def _report(what, converged, residual, num_steps):
    converged = np.asarray(converged)
    if not np.all(converged):
        index = np.flatnonzero(~converged.ravel())[0]
        residual = np.broadcast_to(np.asarray(residual), converged.shape).ravel()[index]
        steps = np.broadcast_to(np.asarray(num_steps), converged.shape).ravel()[index]
        print(
            f"bilevel_jax: the {what} did not converge (relative residual {residual:.3e} "
            f"after {int(steps)} steps); its result is NaN."
        )


def solution_or_nan(
    solution: LinearSolution, *, report: bool = False, what: str = "backward linear solve"
) -> jax.Array:
    """``solution.x``, or NaN where the solve did not converge (the backward-pass contract).

    A hypergradient built from a non-converged adjoint solve cannot be trusted, so it comes
    back as NaN rather than as a plausible number.

    Args:
      solution: a :class:`LinearSolution`.
      report: also print a message (through :func:`jax.debug.callback`, so under ``jit``,
        ``vmap`` and ``grad`` alike) when the solve did not converge.
      what: the name of the solve in the message.

    Returns:
      ``x`` with NaN in every entry when ``converged`` is false.
    """
    if report:
        jax.debug.callback(
            partial(_report, what), solution.converged, solution.residual, solution.num_steps
        )
    x = solution.x
    return jnp.where(solution.converged, x, jnp.full_like(x, jnp.nan))


# --------------------------------------------------------------------------------------
# Validation and shared helpers
# --------------------------------------------------------------------------------------


def _check_choice(name: str, value: Any, valid: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, valid))}; got {value!r}.")
    return value


def _is_python_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | jax.Array)


def _check_ridge(ridge: Any) -> None:
    if _is_python_number(ridge) and not ridge >= 0:
        raise ValueError(f"`ridge` must be a non-negative number; got {ridge!r}.")


def _check_tol(tol: Any) -> None:
    if tol is not None and _is_python_number(tol) and not tol > 0:
        raise ValueError(f"`tol` must be a positive number or None; got {tol!r}.")


def _check_positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    if isinstance(value, jax.Array):  # traced or concrete integer scalar: checked by dtype
        if not jnp.issubdtype(value.dtype, jnp.integer) or value.ndim != 0:
            raise ValueError(f"`{name}` must be an int or an integer scalar array; got {value!r}.")
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an int; got {value!r}.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = "non-negative" if allow_zero else "positive"
        raise ValueError(f"`{name}` must be a {bound} int; got {value!r}.")


def _as_rhs(b: Any) -> jax.Array:
    """Return ``b`` as a 1-D real floating array (integers are promoted)."""
    b = jnp.asarray(b)
    if jnp.issubdtype(b.dtype, jnp.complexfloating):
        raise TypeError(f"`b` must be real; got dtype {b.dtype}.")
    if not jnp.issubdtype(b.dtype, jnp.floating):
        b = b.astype(jnp.result_type(float))
    if b.ndim != 1:
        raise ValueError(f"`b` must be a flat 1-D array of shape (n,); got shape {b.shape}.")
    return b


def _as_x0(x0: Any, b: jax.Array) -> jax.Array | None:
    if x0 is None:
        return None
    x0 = jnp.asarray(x0)
    if x0.shape != b.shape:
        raise ValueError(f"`x0` must have the shape of `b`, {b.shape}; got {x0.shape}.")
    return x0.astype(b.dtype)


def default_tol(dtype: Any) -> float:
    """Default relative residual tolerance for a floating dtype.

    Args:
      dtype: a floating dtype.

    Returns:
      ``1e-12`` for float64 (and wider), ``1e-6`` for float32, ``10 * eps`` for narrower
      types (float16, bfloat16).
    """
    eps = float(jnp.finfo(dtype).eps)
    if eps <= 1e-15:
        return 1e-12
    if eps <= 1e-6:
        return 1e-6
    return 10.0 * eps


def default_max_iter(n: int) -> int:
    """Default iteration cap (matrix-vector products) of the Krylov solvers: ``max(10 n, 100)``.

    Args:
      n: system size.

    Returns:
      The iteration cap.
    """
    return max(10 * int(n), 100)


def _dot(x: jax.Array, y: jax.Array) -> jax.Array:
    # Elementwise product + reduction: exact float32 on accelerators (no TF32 matmul path).
    return jnp.sum(x * y)


def _norm(x: jax.Array) -> jax.Array:
    return jnp.sqrt(_dot(x, x))


def _safe_div(num: jax.Array, den: jax.Array) -> jax.Array:
    """``num / den``, or 0 where ``den == 0`` (no NaN/inf, also in the untaken branch)."""
    nonzero = den != 0
    return jnp.where(nonzero, num / jnp.where(nonzero, den, 1), 0)


def _make_operator(matvec: Matvec, ridge: Any, dtype: Any, n: int) -> Matvec:
    """Return ``x -> matvec(x) + ridge * x`` with output cast to ``dtype`` and shape checked."""
    static_zero_ridge = _is_python_number(ridge) and ridge == 0

    def operator(x: jax.Array) -> jax.Array:
        y = jnp.asarray(matvec(x))
        if y.shape != (n,):
            raise ValueError(
                f"`matvec` must map arrays of shape ({n},) to shape ({n},); got {y.shape}."
            )
        y = y.astype(dtype)
        if static_zero_ridge:
            return y
        return y + jnp.asarray(ridge).astype(dtype) * x

    return operator


class _Prepared:
    """Normalised problem shared by the iterative solvers."""

    def __init__(self, b: jax.Array, x0: jax.Array | None, tol: Any, max_iter: Any):
        self.n = b.shape[0]
        self.dtype = b.dtype
        self.tol = default_tol(b.dtype) if tol is None else tol
        self.max_iter = default_max_iter(self.n) if max_iter is None else max_iter
        if max_iter is not None:
            _check_positive_int("max_iter", max_iter)
        self.alpha = jnp.ones((), b.dtype)
        self.b_is_zero = jnp.all(b == 0)
        scale = jnp.max(jnp.abs(b)) if self.n else jnp.zeros((), b.dtype)
        self.scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
        self.b = b / self.scale
        if x0 is None:
            self.x0 = None
        else:
            # b == 0: start (and hence stay) at exactly 0.
            self.x0 = jnp.where(self.b_is_zero, jnp.zeros_like(x0), x0) / self.scale

    def normalize(self, operator: Matvec) -> Matvec:
        """Return ``operator / α`` with ``α = max|A b̂|`` (one matvec), ``b̂ = b / max|b|``.

        Solving ``(A/α) x' = b̂`` and returning ``x = x'/α`` makes the recurrences invariant
        to the scale of ``A`` as well: methods that square matrix entries (vector norms of
        ``A v``, CGLS's ``||A p||^2``) then neither underflow nor overflow.
        """
        alpha = jnp.max(jnp.abs(operator(self.b)))
        self.alpha = jnp.where((alpha > 0) & jnp.isfinite(alpha), alpha, jnp.ones_like(alpha))
        if self.x0 is not None:
            self.x0 = self.x0 * self.alpha

        def normalized(x: jax.Array) -> jax.Array:
            return operator(x) / self.alpha

        return normalized

    def initial(self, operator: Matvec) -> tuple[jax.Array, jax.Array]:
        """Return the scaled initial iterate and residual."""
        if self.x0 is None:
            return jnp.zeros_like(self.b), self.b
        return self.x0, self.b - operator(self.x0)

    def finish(self, x: jax.Array) -> jax.Array:
        """Undo the scalings, force exact zero for ``b == 0`` and cast to the dtype of ``b``."""
        x = (x * (self.scale / self.alpha)).astype(self.dtype)
        return jnp.where(self.b_is_zero, jnp.zeros_like(x), x)

    def result(self, operator: Matvec, x: jax.Array, met: Any, num_steps: Any) -> LinearSolution:
        """The :class:`LinearSolution` of the scaled iterate ``x`` (``operator`` the scaled map).

        The residual is recomputed in the scaled system, where it equals the relative residual
        of the original one and neither underflows nor overflows.
        """
        residual = _norm(self.b - operator(x)) / _norm(self.b)
        residual = jnp.where(self.b_is_zero, jnp.zeros_like(residual), residual)
        converged = (met | self.b_is_zero) & jnp.isfinite(residual) & jnp.all(jnp.isfinite(x))
        converged = converged & (residual <= attainable_tol(self.tol, self.dtype))
        return LinearSolution(
            self.finish(x), converged, residual, jnp.asarray(num_steps, jnp.int32)
        )


def _empty(b: jax.Array) -> LinearSolution:
    zero = jnp.zeros((), b.dtype)
    return LinearSolution(b, jnp.ones((), bool), zero, jnp.zeros((), jnp.int32))


def _prepare(b: Any, x0: Any, tol: Any, max_iter: Any, ridge: Any):
    _check_ridge(ridge)
    _check_tol(tol)
    b = _as_rhs(b)
    x0 = _as_x0(x0, b)
    return b, _Prepared(b, x0, tol, max_iter)


# --------------------------------------------------------------------------------------
# Dense solvers
# --------------------------------------------------------------------------------------


def materialize(matvec: Matvec, n: int, dtype: Any, *, like: Any = None) -> jax.Array:
    """Materialise a linear map as a dense matrix.

    Builds ``M`` with ``M[:, j] = matvec(e_j)``, so that ``M @ x == matvec(x)``. The map is
    traced once and its jaxpr evaluated on the identity with the identity kept symbolic
    (:func:`_matrix_of`): a product ``dot_general(A, v)`` of a matrix that does not depend on
    the input with the input itself is ``A`` (no multiplication), scalings of the input stay
    diagonal, and every other operation on the input is applied to the columns of the
    identity (``vmap``). For a quadratic
    ``g`` the Hessian-vector product ``v -> Q v`` thus yields ``Q`` at no cost, where
    ``vmap(matvec)(eye)`` computes the product ``Q I``: 0.78 ms against 0.03 ms for a
    dense ``Q`` at ``n = 200`` (float64, one CPU core), twice ``solve_qp``'s Cholesky.

    Args:
      matvec: linear function from shape ``(n,)`` to shape ``(n,)``.
      n: dimension.
      dtype: dtype of the probing vectors and of the returned matrix.
      like: optional array (the right-hand side) whose ``shard_map`` varying axes the probing
        vectors take: a ``matvec`` built from ``jax.jvp``/``jax.vjp`` at a per-device point
        accepts only vectors that vary like that point.

    Returns:
      The ``(n, n)`` matrix of ``matvec``.

    Cost: at most one batched application of ``matvec`` to ``n`` vectors (less where it
    multiplies its input by matrices); ``O(n^2)`` memory.
    """
    probe = vma.vary_like(jnp.zeros((n,), dtype), like)
    closed = jax.make_jaxpr(matvec)(probe)
    (out,) = _matrix_of(closed.jaxpr, closed.consts, _Diag(probe, jnp.ones((), dtype)))
    if not isinstance(out, (_Diag, _Linear)):  # the map does not depend on its input: zero
        out = _Linear(jnp.zeros((n, n), dtype) + 0 * jnp.sum(jnp.asarray(out)))
    return jnp.asarray(_dense(out).matrix).astype(dtype)


def hessian(fun: Callable, y: jax.Array) -> jax.Array:
    """The dense Hessian of a scalar ``fun`` at the flat ``y``.

    :func:`materialize` of its Hessian-vector products (``jax.jvp`` of ``jax.grad``). Equal
    to ``jax.hessian(fun)(y)`` (forward over reverse, ``n`` products), but a product ``A v``
    in the Hessian-vector product contributes ``A`` itself: for a quadratic ``1/2 y'Qy`` no
    ``n^3`` product ``Q I`` is formed.
    """
    return materialize(lambda v: jax.jvp(jax.grad(fun), (y,), (v,))[1], y.shape[0], y.dtype,
                       like=y)


class _Diag(NamedTuple):
    """A value ``x = diag(d) v``, ``d`` a scalar or of shape ``(n,)`` (kept symbolic).

    The input ``v`` itself is ``_Diag(probe, 1)``; ``probe`` is an array like ``v``.
    """

    probe: jax.Array
    d: jax.Array


class _Linear(NamedTuple):
    """A value ``x = M v`` linear in the input, stored as ``M`` (shape ``x.shape + (n,)``)."""

    matrix: jax.Array


def _dense(x):
    """``x`` as a :class:`_Linear` (a :class:`_Diag` becomes its dense matrix)."""
    if isinstance(x, _Linear):
        return x
    n = x.probe.shape[0]
    d = jnp.broadcast_to(jnp.asarray(x.d, x.probe.dtype), (n,))
    return _Linear(vma.vary_like(jnp.eye(n, dtype=x.probe.dtype) * d, x.probe))


def _matrix_of(jaxpr, consts, *args):
    """Evaluate ``jaxpr`` with inputs that may be linear in ``v`` (see :func:`materialize`)."""
    env = {}

    def read(var):
        return var.val if isinstance(var, jax.extend.core.Literal) else env[var]

    for var, val in zip(jaxpr.constvars, consts, strict=True):
        env[var] = val
    for var, val in zip(jaxpr.invars, args, strict=True):
        env[var] = val
    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        linear = [isinstance(x, (_Diag, _Linear)) for x in ins]
        params = eqn.primitive.get_bind_params(eqn.params)
        with eqn.ctx.manager:
            if not any(linear):
                outs = eqn.primitive.bind(*ins, **params)
            elif "jaxpr" in eqn.params and eqn.primitive.name in ("pjit", "jit", "closed_call"):
                inner = eqn.params["jaxpr"]
                outs = _matrix_of(inner.jaxpr, inner.consts, *ins)
            else:
                outs = _linear_eqn(eqn, params, ins, linear)
        if not eqn.primitive.multiple_results:
            outs = [outs]
        for var, val in zip(eqn.outvars, outs, strict=True):
            env[var] = val
    return [read(v) for v in jaxpr.outvars]


def _is_scale(x, n):
    """Whether the constant ``x`` scales a vector of length ``n`` elementwise."""
    return not isinstance(x, (_Diag, _Linear)) and jnp.shape(x) in ((), (n,))


def _linear_eqn(eqn, params, ins, linear):
    """One operation with inputs linear in ``v``: diagonal and ``A v`` rules, else by columns."""
    name = eqn.primitive.name
    diag = [x for x in ins if isinstance(x, _Diag)]
    if diag and len(diag) == linear.count(True):
        probe = diag[0].probe
        n = probe.shape[0]
        if name in ("mul", "neg", "add_any", "add", "sub", "convert_element_type", "copy"):
            others = [x for x, lin in zip(ins, linear, strict=True) if not lin]
            if name == "mul" and len(diag) == 1 and _is_scale(others[0], n):
                return _Diag(probe, diag[0].d * others[0])
            if name == "neg":
                return _Diag(probe, -diag[0].d)
            if name in ("add_any", "add") and len(diag) == 2:
                return _Diag(probe, diag[0].d + diag[1].d)
            if name == "sub" and len(diag) == 2:
                return _Diag(probe, diag[0].d - diag[1].d)
            if name in ("convert_element_type", "copy"):
                return _Diag(probe, diag[0].d)
        # Reshapes that keep the vector as it is (ravel_pytree's unravel of one array is a
        # one-piece split) pass the diagonal through.
        if name == "split" and len(params["sizes"]) == 1:
            return [diag[0]]
        if name in ("reshape", "squeeze") and eqn.outvars[0].aval.shape == (n,):
            return diag[0]
        if name == "dot_general" and len(diag) == 1:
            (contract_l, contract_r), (batch_l, batch_r) = params["dimension_numbers"]
            i = linear.index(True)
            a = jnp.asarray(ins[1 - i])
            contract_v, contract_a = (contract_l, contract_r) if i == 0 else (
                contract_r, contract_l)
            if not batch_l and not batch_r:
                if not contract_v and a.ndim == 0:  # a scalar times v
                    return _Diag(probe, diag[0].d * a)
                if tuple(contract_v) == (0,) and len(contract_a) == 1:
                    # dot_general(A, diag(d) v), either order, contracts A's axis k with v:
                    # M = A with axis k last, scaled by d (the result's axes are A's others).
                    out = jnp.moveaxis(a, contract_a[0], -1) * diag[0].d
                    dtype = params.get("preferred_element_type") or out.dtype
                    return _Linear(vma.vary_like(out.astype(dtype), probe))
    cols = [_dense(x).matrix if lin else x for x, lin in zip(ins, linear, strict=True)]
    axes = [-1 if lin else None for lin in linear]

    def column(*xs):
        return eqn.primitive.bind(*xs, **params)

    out = jax.vmap(column, in_axes=axes, out_axes=-1)(*cols)
    if eqn.primitive.multiple_results:
        return [_Linear(o) for o in out]
    return _Linear(out)


@jax.tree_util.register_pytree_node_class
class Factorization:
    """A dense factorisation of ``M + δI``, reusable across solves (e.g. forward -> backward).

    A pytree whose leaves are the factor arrays and whose static auxiliary data is ``kind``,
    so it can be returned from :func:`jax.jit`, batched by :func:`jax.vmap` and stored as a
    :func:`jax.custom_vjp` residual.

    Attributes:
      kind: ``"cholesky"`` (``factors = (c,)``, lower-triangular ``c`` with ``c c^T = M + δI``)
        or ``"lu"`` (``factors = (lu, piv)`` as returned by
        :func:`jax.scipy.linalg.lu_factor`).
      factors: tuple of arrays.
    """

    KINDS = ("cholesky", "lu")

    def __init__(self, kind: str, factors: tuple[Any, ...]):
        """Store ``kind`` (static) and ``factors`` (pytree leaves) without validation."""
        self.kind = kind
        self.factors = tuple(factors)

    def tree_flatten(self):
        """Return ``(factors, kind)``."""
        return self.factors, self.kind

    @classmethod
    def tree_unflatten(cls, kind, factors):
        """Rebuild from ``kind`` and ``factors``."""
        return cls(kind, tuple(factors))

    def __repr__(self) -> str:
        """Show the kind and the factor shapes."""
        shapes = ", ".join(str(getattr(f, "shape", f)) for f in self.factors)
        return f"Factorization(kind={self.kind!r}, factors=({shapes}))"


def factorize(matrix: Any, *, structure: str = "general", ridge: Any = 0.0) -> Factorization:
    """Factorise the dense matrix ``M + δI``.

    Args:
      matrix: square array ``M`` of shape ``(n, n)``.
      structure: ``"spd"`` uses a Cholesky factorisation (requires ``M + δI`` symmetric
        positive definite, otherwise the factors contain NaN); ``"symmetric"`` and
        ``"general"`` use LU with partial pivoting (requires ``M + δI`` nonsingular).
      ridge: ``δ >= 0`` added to the diagonal.

    Returns:
      A :class:`Factorization`.

    Raises:
      ValueError: on an invalid ``structure``, a negative ``ridge`` or a non-square matrix.

    Cost: ``n^3 / 3`` (Cholesky) or ``2 n^3 / 3`` (LU) flops.
    """
    _check_choice("structure", structure, STRUCTURES)
    _check_ridge(ridge)
    matrix = jnp.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"`matrix` must be square of shape (n, n); got {matrix.shape}.")
    if not jnp.issubdtype(matrix.dtype, jnp.inexact):
        matrix = matrix.astype(jnp.result_type(float))
    if not (_is_python_number(ridge) and ridge == 0):
        matrix = matrix + jnp.asarray(ridge).astype(matrix.dtype) * jnp.eye(
            matrix.shape[0], dtype=matrix.dtype
        )
    if structure == "spd":
        # The lower factor only (cho_factor leaves the input's upper triangle in place,
        # which every solve below ignores).
        return Factorization("cholesky", (cholesky(matrix),))
    return Factorization("lu", lu_factor(matrix))


def symmetric_norm(matvec: Callable, like: Any, num_iter: int = 20) -> jax.Array:
    """``||M||_2`` of a symmetric operator by ``num_iter`` steps of power iteration.

    Args:
      matvec: ``w -> M w`` on flat arrays, ``M`` symmetric.
      like: a flat array with the shape and dtype of ``w``.
      num_iter: power-iteration steps (fixed, so the cost is static).

    Returns:
      The estimate ``||M w|| / ||w||`` after the iterations (a lower bound that converges to
      the largest absolute eigenvalue), from the deterministic start ``1 + i / n``.
    """
    mw = matvec(loops.power_iteration(matvec, loops.power_start(like), num_iter))
    return jnp.sqrt(jnp.sum(mw * mw))


# --------------------------------------------------------------------------------------
# Cholesky factorisation and triangular solves that stay safe under jax.vmap on CPU.
#
# jaxlib 0.10.2 runs a batched LAPACK kernel (potrf, trsm, ...) by splitting the batch over
# XLA's intra-op thread pool and waiting for the pieces (``jax::ParallelBatchMap``). When two
# such kernels run at once on a pool with no spare thread, each waits for work queued behind
# the other: a deadlock. Reproduction (2-core machine, jaxlib 0.10.2):
# ``jax.jit(jax.vmap(jax.value_and_grad(loss)))`` with ``loss`` a function of
# ``solve_qp(Q, c, G=G, h=h)`` over a batch of 40 random strictly convex QPs, n = 80,
# k = 40 inequalities: the second call hung in 3 of 3 fresh processes (``timeout 150``), and
# a batch of 64 at n = 200 hung too; gdb showed both "tf_XLAEigen" threads blocked in
# ``jax::ParallelBatchMap``, one under ``lapack_dpotrf_ffi``, one under ``lapack_dtrsm_ffi``.
# The same batch through ``lax.map`` completes. So the helpers below call the LAPACK kernel
# on one matrix at a time when batched (a ``jax.custom_batching.custom_vmap`` rule: a loop
# over the batch, each call unbatched, which never queues work on the pool); unbatched they
# are the plain primitives. Their derivatives are those of the plain primitives (a custom
# JVP), so they stay differentiable to any order.


def _sharded_batch(x) -> bool:
    """Whether the leading (batch) axis of ``x`` is sharded in its type (explicit sharding)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    return bool(spec) and spec[0] is not None


@functools.cache
def _looped(fn: Callable) -> Callable:
    """``fn`` batched by a loop over the batch, differentiated as ``fn`` itself.

    A batch axis sharded over devices in its type (``jax.set_mesh`` with explicit axes)
    cannot be looped over; such a batch gets ``fn``'s own batching.
    """

    @jax.custom_batching.custom_vmap
    def looped(*args):
        return fn(*args)

    @looped.def_vmap
    def _rule(axis_size, in_batched, *args):
        del axis_size
        if any(_sharded_batch(a) for a, b in zip(args, in_batched, strict=True) if b):
            axes = [0 if b else None for b in in_batched]
            out = jax.vmap(fn, in_axes=axes)(*args)
            return out, jax.tree.map(lambda _: True, out)
        mapped = [a for a, b in zip(args, in_batched, strict=True) if b]

        def one(items):
            items = iter(items)
            return looped(*(next(items) if b else a for a, b in zip(args, in_batched, strict=True)))

        out = lax.map(one, mapped)
        return out, jax.tree.map(lambda _: True, out)

    @jax.custom_jvp
    def wrapped(*args):
        return looped(*args)

    @wrapped.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(fn, primals, tangents)

    return wrapped


def _cholesky_lower(a):
    return lax.linalg.cholesky(a, symmetrize_input=False)


@functools.cache
def _triangular(left_side: bool, lower: bool, transpose_a: bool) -> Callable:
    return _looped(
        functools.partial(
            lax.linalg.triangular_solve, left_side=left_side, lower=lower,
            transpose_a=transpose_a,
        )
    )


def cholesky(a: Any) -> jax.Array:
    """Lower Cholesky factor ``L`` of a symmetric positive definite ``a`` (``L L' = a``).

    The lower triangle of ``a`` is used as it is (no symmetrisation); a matrix that is not
    positive definite gives NaN entries. Safe under :func:`jax.vmap` on CPU (see the comment
    above: batched, the factorisations run one after the other).

    Args:
      a: array of shape ``(n, n)``.

    Returns:
      ``L``, lower triangular, shape ``(n, n)``.
    """
    return _looped(_cholesky_lower)(a)


def triangular_solve(
    a: Any, b: Any, *, left_side: bool = True, lower: bool = True, transpose_a: bool = False
) -> jax.Array:
    """Solve ``op(a) x = b`` (``left_side``) or ``x op(a) = b`` with triangular ``a``.

    As :func:`jax.lax.linalg.triangular_solve` (``op(a) = a'`` when ``transpose_a``), and safe
    under :func:`jax.vmap` on CPU like :func:`cholesky`.

    Args:
      a: triangular matrix, shape ``(n, n)``.
      b: right-hand sides, shape ``(n, k)`` (left side) or ``(k, n)`` (right side).
      left_side: whether ``a`` multiplies ``x`` from the left.
      lower: whether ``a`` is lower triangular.
      transpose_a: whether to use ``a'``.

    Returns:
      ``x`` with the shape of ``b``.
    """
    return _triangular(bool(left_side), bool(lower), bool(transpose_a))(a, b)


def _lu(a):
    lu, piv, _ = lax.linalg.lu(a)
    return lu, piv


def lu_factor(a: Any) -> tuple[jax.Array, jax.Array]:
    """LU factorisation with partial pivoting, ``(lu, piv)`` as :func:`jax.scipy.linalg.lu_factor`.

    Safe under :func:`jax.vmap` on CPU (batched, the factorisations run one after the other;
    see the comment above :func:`cholesky`). A singular ``a`` gives non-finite solves.

    Cost: ``2 n^3 / 3`` flops.
    """
    return _looped(_lu)(jnp.asarray(a))


@functools.cache
def _lu_solver(trans: int) -> Callable:
    return _looped(lambda lu, piv, b: jsp_linalg.lu_solve((lu, piv), b, trans=trans))


def lu_solve(lu: Any, piv: Any, b: Any, transpose: bool = False) -> jax.Array:
    """Solve ``A x = b`` (``A' x = b`` with ``transpose``) given :func:`lu_factor` of ``A``.

    Safe under :func:`jax.vmap` on CPU, like :func:`lu_factor`. Cost: ``2 n^2`` flops per
    right-hand side.
    """
    return _lu_solver(1 if transpose else 0)(lu, piv, jnp.asarray(b))


def cho_solve(chol: Any, b: Any) -> jax.Array:
    """Solve ``(L L') x = b`` given the lower Cholesky factor ``L`` (:func:`cholesky`).

    Args:
      chol: ``L``, shape ``(n, n)``.
      b: right-hand side, shape ``(n,)`` or ``(n, k)``.

    Returns:
      ``x`` with the shape of ``b``.

    Cost: two triangular solves, ``2 n^2`` flops per right-hand side.
    """
    b = jnp.asarray(b)
    rhs = b[:, None] if b.ndim == 1 else b
    x = triangular_solve(chol, rhs, left_side=True, lower=True)
    x = triangular_solve(chol, x, left_side=True, lower=True, transpose_a=True)
    return x[:, 0] if b.ndim == 1 else x


def inverse_products(chol: Any, rows: Any):
    """Apply ``M^-1`` to the rows of ``C``, given the lower Cholesky factor ``L`` of ``M``.

    Args:
      chol: ``L`` with ``L L' = M``, shape ``(n, n)``.
      rows: ``C``, shape ``(k, n)``.

    Returns:
      ``(U, W)``: ``U = M^-1 C'`` of shape ``(n, k)`` and ``W = C M^-1 C'`` (exactly
      symmetric), the pieces of a Schur complement or a Woodbury update.

    Cost: ``2 n^2 k`` flops; the triangular solves act on the right (``C L^-T``), which XLA's
    CPU backend runs several times faster than left-side solves with ``k`` right-hand sides.
    """
    V = triangular_solve(chol, rows, left_side=False, lower=True, transpose_a=True)
    U = triangular_solve(chol, V, left_side=False, lower=True).T
    return U, V @ V.T


def solve_factorized(factorization: Factorization, b: Any, *, transpose: bool = False) -> jax.Array:
    """Solve ``A x = b`` (or ``A^T x = b``) with a precomputed factorisation of ``A = M + δI``.

    Args:
      factorization: result of :func:`factorize`.
      b: right-hand side of shape ``(n,)``.
      transpose: solve with ``A^T`` instead of ``A`` (no-op for Cholesky, ``A`` symmetric).

    Returns:
      ``x`` with the dtype of ``b``; exactly 0 if ``b == 0``.

    Cost: ``O(n^2)`` (two triangular solves).
    """
    b = _as_rhs(b)
    kind = factorization.kind
    if kind == "cholesky":
        (c,) = factorization.factors
        dtype = jnp.result_type(c, b)
        x = cho_solve(c, b.astype(dtype))
    elif kind == "lu":
        lu, piv = factorization.factors
        dtype = jnp.result_type(lu, b)
        x = lu_solve(lu, piv, b.astype(dtype), transpose)
    else:
        raise ValueError(
            f"`factorization.kind` must be one of {Factorization.KINDS}; got {kind!r}."
        )
    x = x.astype(b.dtype)
    return jnp.where(jnp.all(b == 0), jnp.zeros_like(x), x)


def solve_dense(
    matvec: Matvec, b: Any, *, structure: str = "general", ridge: Any = 0.0
) -> LinearSolution:
    """Solve ``(M + δI) x = b`` by materialising ``M`` and factorising it.

    Args:
      matvec: linear map ``x -> M x`` on shape ``(n,)``.
      b: right-hand side of shape ``(n,)``.
      structure: ``"spd"`` (Cholesky), ``"symmetric"`` or ``"general"`` (LU with partial
        pivoting). See :func:`factorize`.
      ridge: ``δ >= 0``.

    Returns:
      A :class:`LinearSolution` (``num_steps`` 0; ``converged`` false when the factorisation
      broke down, e.g. Cholesky of a matrix that is not positive definite, or the recomputed
      residual exceeds :func:`attainable_tol` of the dtype's default tolerance).

    Cost: ``n`` batched matvecs (:func:`materialize`) plus ``O(n^3)`` flops, ``O(n^2)`` memory.
    """
    _check_choice("structure", structure, STRUCTURES)
    _check_ridge(ridge)
    b = _as_rhs(b)
    n = b.shape[0]
    if n == 0:
        return _empty(b)
    operator = _make_operator(matvec, 0.0, b.dtype, n)
    matrix = materialize(operator, n, b.dtype, like=b)
    prob = _Prepared(b, None, None, None)
    x = solve_factorized(factorize(matrix, structure=structure, ridge=ridge), prob.b)
    regularized = _make_operator(lambda v: matrix @ v, ridge, b.dtype, n)
    return prob.result(regularized, x, jnp.ones((), bool), 0)


# --------------------------------------------------------------------------------------
# Krylov solvers
# --------------------------------------------------------------------------------------


def solve_cg(
    matvec: Matvec,
    b: Any,
    *,
    x0: Any = None,
    tol: Any = None,
    max_iter: int | None = None,
    ridge: Any = 0.0,
) -> LinearSolution:
    """Conjugate gradients for ``(M + δI) x = b`` with ``M + δI`` symmetric positive definite.

    Hestenes–Stiefel CG: ``α_k = r_k·r_k / p_k·A p_k``, ``x_{k+1} = x_k + α_k p_k``,
    ``r_{k+1} = r_k - α_k A p_k``, ``p_{k+1} = r_{k+1} + (r_{k+1}·r_{k+1} / r_k·r_k) p_k``.
    The error decreases in the ``A``-norm at rate ``(√κ - 1)/(√κ + 1)`` per iteration.

    Args:
      matvec: linear map ``x -> M x``; ``M`` must be symmetric, ``M + δI`` positive definite.
      b: right-hand side of shape ``(n,)``.
      x0: initial guess (default 0).
      tol: relative residual tolerance, stop when ``||r_k|| <= tol ||b||`` (recursive
        residual). Default :func:`default_tol`.
      max_iter: maximum number of iterations (one matvec each). Default
        :func:`default_max_iter`.
      ridge: ``δ >= 0``.

    Returns:
      A :class:`LinearSolution` (``x`` with the dtype of ``b``).

    Cost: one matvec and ``O(n)`` work per iteration, ``O(n)`` memory.
    """
    b, prob = _prepare(b, x0, tol, max_iter, ridge)
    if prob.n == 0:
        return _empty(b)
    operator = _make_operator(matvec, ridge, prob.dtype, prob.n)
    x, r = prob.initial(operator)
    thresh2 = (prob.tol * _norm(prob.b)) ** 2
    rs = _dot(r, r)

    def cond(state):
        k, _, _, _, rs, breakdown = state
        return (k < prob.max_iter) & (rs > thresh2) & ~breakdown

    def body(state):
        k, x, r, p, rs, _ = state
        ap = operator(p)
        pap = _dot(p, ap)
        alpha = _safe_div(rs, pap)
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = _dot(r, r)
        p = r + _safe_div(rs_new, rs) * p
        return k + 1, x, r, p, rs_new, pap == 0

    state = (0, x, r, r, rs, jnp.zeros((), bool))
    k, x, _, _, rs, _ = vma.while_loop(cond, body, state)
    return prob.result(operator, x, rs <= thresh2, k)


def solve_minres(
    matvec: Matvec,
    b: Any,
    *,
    x0: Any = None,
    tol: Any = None,
    max_iter: int | None = None,
    ridge: Any = 0.0,
) -> LinearSolution:
    """MINRES for ``(M + δI) x = b`` with ``M`` symmetric, possibly indefinite or singular.

    Paige & Saunders (1975), following SciPy's ``minres`` without preconditioner: the
    Lanczos process builds an orthonormal basis ``V_k`` of the Krylov space
    ``K_k(A, r_0)`` and a tridiagonal ``T_k``; the iterate
    ``x_k = x_0 + V_k y_k`` minimises ``||b - A x||`` over ``x_0 + K_k``, with the
    least-squares problem ``min ||β_1 e_1 - T_k y||`` solved by Givens rotations updated
    one per iteration (short recurrences, three stored direction vectors).

    The residual norm ``||r_k||`` is non-increasing. If ``A`` is singular but the system is
    consistent (``b ∈ range(A)``), the iterates stay in ``x_0 + range(A)`` and converge to a
    solution; from ``x_0 = 0`` it is the minimum-norm solution ``A^+ b``. For an
    inconsistent system (``b`` not in ``range(A)``) the iteration stops once
    ``||A r_k|| <= tol ||A|| ||r_k||``, at a least-squares solution (not necessarily of
    minimum norm). Caveat, inherent to MINRES (Choi, Paige & Saunders, 2011) and shared by
    SciPy: on inconsistent systems the iterates can diverge once the least-squares solution
    is reached if ``tol`` is below the attainable ``||A r|| / (||A|| ||r||)`` (typically
    ``1e-8``-``1e-10`` in float64), so pass e.g. ``tol=1e-6``, add a ``ridge``, or use
    :func:`solve_normal_cg` for those. The iterates coincide with those of
    :func:`scipy.sparse.linalg.minres` (only the stopping rules differ).

    Args:
      matvec: linear map ``x -> M x``; ``M`` must be symmetric.
      b: right-hand side of shape ``(n,)``.
      x0: initial guess (default 0).
      tol: relative residual tolerance: stop when the MINRES residual estimate satisfies
        ``||r_k|| <= tol ||b||``, or when ``||A r_k|| <= tol ||T_k||_F ||r_k||``
        (inconsistent singular systems), or when ``T_k`` is numerically singular. Default
        :func:`default_tol`.
      max_iter: maximum number of iterations (one matvec each). Default
        :func:`default_max_iter`.
      ridge: ``δ >= 0``.

    Returns:
      A :class:`LinearSolution` (``x`` with the dtype of ``b``).

    Cost: one matvec and ``O(n)`` work per iteration, ``O(n)`` memory (6 vectors).
    """
    b, prob = _prepare(b, x0, tol, max_iter, ridge)
    if prob.n == 0:
        return _empty(b)
    dtype = prob.dtype
    operator = _make_operator(matvec, ridge, dtype, prob.n)
    operator = prob.normalize(operator)
    eps = jnp.finfo(dtype).eps
    x, r0 = prob.initial(operator)
    beta1 = _norm(r0)
    thresh = prob.tol * _norm(prob.b)
    zero = jnp.zeros((), dtype)
    zeros = jnp.zeros_like(prob.b)

    def cond(state):
        k, done = state[0], state[1]
        return (k < prob.max_iter) & ~done

    def body(state):
        (k, _, x, r1, r2, beta, oldb, dbar, epsln, phibar, cs, sn, w, w2, tnorm2, gmax) = state
        # Lanczos step: v = r2 / beta is the current basis vector, r1 the previous residual.
        v = _safe_div(1, beta) * r2
        y = operator(v)
        y = y - _safe_div(beta, oldb) * r1
        alfa = _dot(v, y)
        y = y - _safe_div(alfa, beta) * r2
        r1, r2 = r2, y
        oldb, beta = beta, _norm(y)
        # Frobenius norm of T_{k+1,k} (SciPy also adds beta_1 = ||r_0|| at k = 0, which would
        # make the estimate depend on the scale of b; it is left out here).
        tnorm2 = tnorm2 + alfa**2 + jnp.where(k == 0, 0, oldb**2) + beta**2
        # Apply the previous rotation Q_{k-1} to the new column of T_k.
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        # ||A r_{k-1}|| = phibar_{k-1} * root, so test2 = ||A r_{k-1}|| / (||A|| ||r_{k-1}||).
        root = jnp.sqrt(gbar**2 + dbar**2)
        test2 = _safe_div(root, jnp.sqrt(tnorm2))
        # New rotation Q_k eliminating beta_{k+1}.
        gamma = jnp.sqrt(gbar**2 + beta**2)
        gmax = jnp.maximum(gmax, gamma)
        # Stop *without* taking step k when x_{k-1} already solves the least-squares problem
        # (test2 <= tol: r_{k-1} is numerically in the null space of A, the system is
        # inconsistent), or when T_k is numerically singular (gamma_k <= 10 eps max gamma,
        # SciPy's `Acond >= 0.1/eps` test: an exhausted Krylov space of an inconsistent
        # singular system), where the step would divide by ~0. Since gamma_k is bounded below
        # by the smallest singular value of A on the Krylov space, consistent systems with
        # condition number below ~min(1/tol, 0.1/eps) never trigger this.
        stop_before = (test2 <= prob.tol) | (gamma <= 10 * eps * gmax)
        gamma = jnp.where(gamma > 0, gamma, 1)  # relative guard above; no absolute floor
        cs = gbar / gamma
        sn = beta / gamma
        phi = jnp.where(stop_before, 0, cs * phibar)
        phibar = jnp.where(stop_before, phibar, sn * phibar)
        # Update the direction vectors and the solution.
        w1, w2 = w2, w
        w = (v - oldeps * w1 - delta * w2) / gamma
        x = x + phi * w
        done = (phibar <= thresh) | stop_before
        return (
            k + 1,
            done,
            x,
            r1,
            r2,
            beta,
            oldb,
            dbar,
            epsln,
            phibar,
            cs,
            sn,
            w,
            w2,
            tnorm2,
            gmax,
        )

    state = (
        0,
        beta1 <= thresh,
        x,
        zeros,  # r1 (the term beta/oldb * r1 vanishes at the first step since oldb = 0)
        r0,  # r2
        beta1,
        zero,  # oldb
        zero,  # dbar
        zero,  # epsln
        beta1,  # phibar
        -jnp.ones((), dtype),  # cs
        zero,  # sn
        zeros,  # w
        zeros,  # w2
        zero,  # tnorm2
        zero,  # gmax
    )
    final = vma.while_loop(cond, body, state)
    # Met: the residual estimate reached the tolerance (not the least-squares or the
    # singular-T_k exits, which leave a residual above it).
    return prob.result(operator, final[2], final[9] <= thresh, final[0])


def solve_gmres(
    matvec: Matvec,
    b: Any,
    *,
    x0: Any = None,
    tol: Any = None,
    max_iter: int | None = None,
    restart: int = 50,
    ridge: Any = 0.0,
) -> LinearSolution:
    """Restarted GMRES(m) for ``(M + δI) x = b`` with a general (nonsymmetric) ``M``.

    Each cycle runs the Arnoldi process from the current residual ``r`` (classical
    Gram–Schmidt with reorthogonalisation, "twice is enough"), building an orthonormal basis
    ``V_k`` of ``K_k(A, r)`` and a Hessenberg ``H_k`` with ``A V_k = V_{k+1} H_k``, and
    reduces ``H_k`` to triangular form by Givens rotations updated once per step, so that the
    least-squares residual ``min_y ||β e_1 - H_k y|| = ||b - A x_k||`` is known at every step
    (early termination inside a cycle). After at most ``m = min(restart, n)`` steps,
    ``x <- x + V_k y_k`` and the true residual is recomputed; the method restarts until the
    tolerance, the iteration budget or stagnation (no decrease of the true residual over a
    cycle; the iterate of that cycle is then discarded, so the returned residual is never
    larger than the initial one) is reached. Without restarts (``restart >= n``) GMRES
    terminates in at most ``n`` steps in exact arithmetic for any nonsingular ``A``.

    Args:
      matvec: linear map ``x -> M x``; ``M + δI`` should be nonsingular.
      b: right-hand side of shape ``(n,)``.
      x0: initial guess (default 0).
      tol: relative residual tolerance, ``||r|| <= tol ||b||``. Default :func:`default_tol`.
      max_iter: maximum total number of Arnoldi steps (one matvec each; every cycle costs one
        extra matvec for the true residual). Default :func:`default_max_iter`.
      restart: Krylov dimension ``m`` per cycle (capped at ``n``).
      ridge: ``δ >= 0``.

    Returns:
      A :class:`LinearSolution` (``x`` with the dtype of ``b``).

    Cost: one matvec and ``O(k n)`` work at Arnoldi step ``k``; ``O(m n)`` memory.
    """
    _check_positive_int("restart", restart)
    b, prob = _prepare(b, x0, tol, max_iter, ridge)
    if prob.n == 0:
        return _empty(b)
    n, dtype = prob.n, prob.dtype
    operator = _make_operator(matvec, ridge, dtype, n)
    operator = prob.normalize(operator)
    m = min(restart, n)
    eps = jnp.finfo(dtype).eps
    hi = lax.Precision.HIGHEST
    x, r = prob.initial(operator)
    thresh = prob.tol * _norm(prob.b)

    def cycle(x, r, beta, budget):
        """One GMRES(m) cycle from ``x`` with residual ``r``; returns new ``x`` and steps."""
        basis = jnp.zeros((m + 1, n), dtype).at[0].set(_safe_div(1, beta) * r)
        g = jnp.zeros((m + 1,), dtype).at[0].set(beta)
        tri = jnp.zeros((m, m), dtype)
        cs = jnp.zeros((m,), dtype)
        sn = jnp.zeros((m,), dtype)

        def inner_cond(state):
            k, _, _, _, _, g, _, stop = state
            return (k < m) & (k < budget) & (jnp.abs(g[k]) > thresh) & ~stop

        def inner_body(state):
            k, basis, tri, cs, sn, g, rmax, _ = state
            w = operator(basis[k])
            w_norm0 = _norm(w)
            # Rows > k of `basis` are zero, so h[j] = 0 for j > k.
            h = jnp.matmul(basis, w, precision=hi)
            w = w - jnp.matmul(h, basis, precision=hi)
            h2 = jnp.matmul(basis, w, precision=hi)
            w = w - jnp.matmul(h2, basis, precision=hi)
            h = h + h2
            h_next = _norm(w)
            lucky = h_next <= eps * w_norm0  # invariant subspace: exact solution in K_{k+1}
            basis = basis.at[k + 1].set(jnp.where(lucky, 0, _safe_div(1, h_next)) * w)

            def rotate(i, h):
                a, b_ = h[i], h[i + 1]
                return h.at[i].set(cs[i] * a + sn[i] * b_).at[i + 1].set(cs[i] * b_ - sn[i] * a)

            h = vma.fori_loop(0, k, rotate, h)
            a = h[k]
            rho = jnp.sqrt(a**2 + h_next**2)
            rmax = jnp.maximum(rmax, rho)
            # rho ~ 0: H_k numerically singular (e.g. exhausted Krylov space of a singular
            # system). Drop this column (x stays the minimiser over K_k) and end the cycle.
            singular = rho <= 10 * eps * rmax
            c = _safe_div(a, rho)
            s = _safe_div(h_next, rho)
            h = h.at[k].set(rho)
            keep = ~singular
            tri = jnp.where(keep, tri.at[:, k].set(h[:m]), tri)
            cs = jnp.where(keep, cs.at[k].set(c), cs)
            sn = jnp.where(keep, sn.at[k].set(s), sn)
            gk = g[k]
            g = jnp.where(keep, g.at[k].set(c * gk).at[k + 1].set(-s * gk), g)
            return k + keep.astype(k.dtype), basis, tri, cs, sn, g, rmax, lucky | singular

        zero = jnp.zeros((), dtype)
        state = (jnp.zeros((), int), basis, tri, cs, sn, g, zero, jnp.zeros((), bool))
        k, basis, tri, _, _, g, _, _ = vma.while_loop(inner_cond, inner_body, state)
        # Solve the leading k x k triangular system; pad the rest with the identity.
        active = jnp.arange(m) < k
        diag = jnp.diagonal(tri)
        diag = jnp.where(active & (diag != 0), diag, 1)
        tri = tri.at[jnp.arange(m), jnp.arange(m)].set(diag)
        y = jsp_linalg.solve_triangular(tri, jnp.where(active, g[:m], 0), lower=False)
        return x + jnp.matmul(y, basis[:m], precision=hi), k

    def outer_cond(state):
        total, _, _, beta, stalled = state
        return (total < prob.max_iter) & (beta > thresh) & ~stalled

    def outer_body(state):
        total, x, r, beta, _ = state
        x_new, k = cycle(x, r, beta, prob.max_iter - total)
        k = jnp.maximum(k, 1)  # a cycle costs at least one matvec (counts for the budget)
        r_new = prob.b - operator(x_new)
        beta_new = _norm(r_new)
        # No decrease of the true residual over a whole cycle (stagnation, or a breakdown
        # on a singular system): keep the previous iterate and stop.
        stalled = beta_new >= beta
        x, r, beta = (
            jnp.where(stalled, old, new) for old, new in ((x, x_new), (r, r_new), (beta, beta_new))
        )
        return total + k, x, r, beta, stalled

    state = (0, x, r, _norm(r), jnp.zeros((), bool))
    total, x, _, beta, _ = vma.while_loop(outer_cond, outer_body, state)
    return prob.result(operator, x, beta <= thresh, total)


def solve_normal_cg(
    matvec: Matvec,
    b: Any,
    *,
    x0: Any = None,
    tol: Any = None,
    max_iter: int | None = None,
    ridge: Any = 0.0,
) -> LinearSolution:
    """CG on the normal equations ``A^T A x = A^T b`` with ``A = M + δI`` (CGLS).

    The ridge regularises the operator itself (the system solved is ``(M + δI) x = b``), it is
    *not* added to ``A^T A``. ``A^T`` is obtained with :func:`jax.linear_transpose`, so
    ``matvec`` must be transposable (any JAX-traceable linear function is). Uses the CGLS
    recurrences (residual ``r = b - A x`` updated explicitly), which are numerically
    preferable to CG on the explicitly formed ``A^T A``. Works for any nonsingular ``M`` but
    converges with the squared condition number ``κ(A)^2``; for singular ``A`` it converges to
    a least-squares solution (the minimum-norm one from ``x0 = 0``).

    Args:
      matvec: linear map ``x -> M x``.
      b: right-hand side of shape ``(n,)``.
      x0: initial guess (default 0).
      tol: relative tolerance: stop when ``||r|| <= tol ||b||`` or
        ``||A^T r|| <= tol ||A^T b||``. Default :func:`default_tol`.
      max_iter: maximum number of iterations (one matvec and one transposed matvec each).
        Default :func:`default_max_iter`.
      ridge: ``δ >= 0``.

    Returns:
      A :class:`LinearSolution` (``x`` with the dtype of ``b``).

    Cost: two operator applications and ``O(n)`` work per iteration.
    """
    b, prob = _prepare(b, x0, tol, max_iter, ridge)
    if prob.n == 0:
        return _empty(b)
    operator = _make_operator(matvec, ridge, prob.dtype, prob.n)
    operator = prob.normalize(operator)
    transpose = jax.linear_transpose(operator, prob.b)

    def operator_t(y):
        return transpose(y)[0]

    x, r = prob.initial(operator)
    s = operator_t(r)
    r_thresh2 = (prob.tol * _norm(prob.b)) ** 2
    s_thresh2 = (prob.tol * _norm(operator_t(prob.b))) ** 2
    gamma = _dot(s, s)

    def cond(state):
        k, _, r, _, gamma, breakdown = state
        converged = (_dot(r, r) <= r_thresh2) | (gamma <= s_thresh2)
        return (k < prob.max_iter) & ~converged & ~breakdown

    def body(state):
        k, x, r, p, gamma, _ = state
        q = operator(p)
        qq = _dot(q, q)
        alpha = _safe_div(gamma, qq)
        x = x + alpha * p
        r = r - alpha * q
        s = operator_t(r)
        gamma_new = _dot(s, s)
        p = s + _safe_div(gamma_new, gamma) * p
        return k + 1, x, r, p, gamma_new, qq == 0

    state = (0, x, r, s, gamma, jnp.zeros((), bool))
    k, x, r, _, gamma, _ = vma.while_loop(cond, body, state)
    met = (_dot(r, r) <= r_thresh2) | (gamma <= s_thresh2)
    return prob.result(operator, x, met, k)


def solve_neumann(
    matvec: Matvec,
    b: Any,
    *,
    step: Any = 1.0,
    num_terms: int = _NEUMANN_DEFAULT_TERMS,
    ridge: Any = 0.0,
) -> LinearSolution:
    """Truncated Neumann series ``x_T = η Σ_{t<T} (I - η A)^t b`` with ``A = M + δI``.

    Computed as the Richardson iteration ``x_1 = η b``, ``x_{t+1} = x_t + η (b - A x_t)``
    (``T - 1`` matvecs). Converges to ``A^{-1} b`` iff the spectral radius of ``I - η A`` is
    below 1, e.g. for ``A`` SPD with ``0 < η < 2 / λ_max`` (``η <= 1/L`` with ``L`` the
    Lipschitz constant of the lower-level gradient is the usual choice); the error after
    ``T`` terms is ``(I - η A)^T A^{-1} b``. No tolerance test: exactly ``num_terms`` terms.

    Args:
      matvec: linear map ``x -> M x``.
      b: right-hand side of shape ``(n,)``.
      step: ``η``.
      num_terms: number of terms ``T >= 0`` (``T = 0`` returns 0); a Python int or an
        integer scalar array (may be traced).
      ridge: ``δ >= 0``.

    Returns:
      A :class:`LinearSolution` with ``x = x_T``. The truncation is the method (no tolerance),
      so ``converged`` only says that ``x_T`` is finite; ``residual`` says how far it is from
      solving the system.

    Cost: ``T`` matvecs (one to report the residual).
    """
    _check_ridge(ridge)
    _check_positive_int("num_terms", num_terms, allow_zero=True)
    b = _as_rhs(b)
    n = b.shape[0]
    if n == 0:
        return _empty(b)
    operator = _make_operator(matvec, ridge, b.dtype, n)
    step = jnp.asarray(step).astype(b.dtype)

    def body(_, x):
        return x + step * (b - operator(x))

    if isinstance(num_terms, numbers.Integral) and num_terms == 0:
        x = jnp.zeros_like(b)
    else:
        x = vma.fori_loop(1, num_terms, body, step * b)
    if isinstance(num_terms, jax.Array):
        x = jnp.where(num_terms > 0, x, jnp.zeros_like(x))
    scale = jnp.max(jnp.abs(b))
    scale = jnp.where(scale > 0, scale, jnp.ones_like(scale))
    residual = _safe_div(_norm((b - operator(x)) / scale), _norm(b / scale))
    finite = jnp.isfinite(residual) & jnp.all(jnp.isfinite(x))
    return LinearSolution(x, finite, residual, jnp.asarray(num_terms, jnp.int32))


# --------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------


def linear_solve(
    matvec: Matvec,
    b: Any,
    *,
    method: str = "auto",
    structure: str = "general",
    ridge: Any = 0.0,
    tol: Any = None,
    max_iter: int | None = None,
) -> LinearSolution:
    """Solve ``(M + δI) x = b`` with the method chosen by ``method`` and ``structure``.

    ``method="auto"``: if ``n <= DENSE_MAX_SIZE`` a dense factorisation (Cholesky for
    ``structure="spd"``, LU otherwise); else CG (``"spd"``), MINRES (``"symmetric"``) or
    GMRES (``"general"``). ``"dense"`` factorises according to ``structure``, ``"cholesky"``
    and ``"lu"`` force the factorisation. The other methods ignore ``structure`` (it is still
    validated). ``"neumann"`` uses ``step=1`` and ``max_iter`` terms (default 100), ``tol`` is
    ignored; call :func:`solve_neumann` directly to choose the step. ``tol`` and
    ``max_iter`` are ignored by the dense methods.

    Args:
      matvec: linear map ``x -> M x`` on shape ``(n,)``.
      b: right-hand side of shape ``(n,)``.
      method: one of :data:`METHODS`.
      structure: one of :data:`STRUCTURES`: ``"spd"`` (``M + δI`` symmetric positive
        definite), ``"symmetric"`` (``M`` symmetric, possibly indefinite/singular) or
        ``"general"``.
      ridge: ``δ >= 0``; the solution of the regularised system is returned.
      tol: relative residual tolerance of the iterative methods (see module docstring).
      max_iter: iteration cap of the iterative methods.

    Returns:
      A :class:`LinearSolution` ``(x, converged, residual, num_steps)``, ``x`` with the dtype
      of ``b``.

    Raises:
      ValueError: on an invalid ``method`` or ``structure`` or a negative ``ridge``.
    """
    _check_choice("method", method, METHODS)
    _check_choice("structure", structure, STRUCTURES)
    _check_ridge(ridge)
    _check_tol(tol)
    if method == "auto":
        n = jnp.shape(b)[0] if jnp.ndim(b) else 0
        if n <= DENSE_MAX_SIZE:
            method = "dense"
        else:
            method = {"spd": "cg", "symmetric": "minres", "general": "gmres"}[structure]
    if method == "dense":
        return solve_dense(matvec, b, structure=structure, ridge=ridge)
    if method == "cholesky":
        return solve_dense(matvec, b, structure="spd", ridge=ridge)
    if method == "lu":
        return solve_dense(matvec, b, structure="general", ridge=ridge)
    if method == "neumann":
        num_terms = _NEUMANN_DEFAULT_TERMS if max_iter is None else max_iter
        return solve_neumann(matvec, b, num_terms=num_terms, ridge=ridge)
    solver = {
        "cg": solve_cg,
        "minres": solve_minres,
        "gmres": solve_gmres,
        "normal_cg": solve_normal_cg,
    }[method]
    return solver(matvec, b, tol=tol, max_iter=max_iter, ridge=ridge)
