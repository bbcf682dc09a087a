"""Euclidean projections onto simple convex sets, as small pytree "set" objects.

Each set is a ``NamedTuple`` whose data (bounds, radius, normal vector, ...) are pytree
leaves, so a set can be traced, batched with :func:`jax.vmap` and differentiated: a box bound
that depends on a hyperparameter receives its gradient. Every set has one method,
``project(z)``, the Euclidean projection ``argmin_{x in C} ||x - z||``, which is pure, jittable
and differentiable almost everywhere (its Jacobian is the projector onto the tangent space of
the active face; for a box, the 0/1 mask of the free coordinates).

| set | projection of ``z`` | cost |
|---|---|---|
| :class:`Box` ``[lo, hi]`` (infinite bounds allowed) | ``clip(z, lo, hi)`` | ``O(n)`` |
| :class:`NonNegative` | ``max(z, 0)`` | ``O(n)`` |
| :class:`Simplex` ``{x >= 0, sum x = total}`` | ``max(z - tau, 0)`` (optax) | ``O(n log n)`` |
| :class:`Ball` ``{||x - c|| <= r}`` | ``c + (z - c) min(1, r / ||z - c||)`` | ``O(n)`` |
| :class:`Halfspace` ``{a'x <= b}`` | ``z - max(0, a'z - b) a / ||a||^2`` | ``O(n)`` |
| :class:`Affine` ``{A x = b}`` | ``z - A^+ (A z - b)`` | ``O(m^2 n)`` (an SVD) |

``Box``, ``NonNegative`` and ``Ball`` act on arrays of any shape (elementwise, or with the
Frobenius norm); ``Simplex``, ``Halfspace`` and ``Affine`` act on the flattened array and
return the input's shape.

A *set argument* (``u_set=``/``v_set=`` of :func:`bilevel_jax.saddle_point`) is ``None`` (no
constraint), one set, applied to the whole variable (a pytree is flattened in
``jax.flatten_util.ravel_pytree`` order; a single array keeps its shape), or a container of
sets and ``None`` with the structure of a prefix of the variable's pytree (a product set),
e.g. ``(Box(0.0, 1.0), None)`` for a variable ``(a, b)``. Any pytree with a ``project`` method
is accepted as a set.

Only :class:`Simplex` delegates to ``optax.projections``. The others keep their own few
lines because optax 0.2.8's versions break this module's contract that a point exactly on the
boundary (a tie) counts as inactive, with a Jacobian of exactly 0 or 1 along each constraint,
never a blend (measured): ``projection_box`` (``jnp.clip``) gives the derivative 1/2 at
``z = lo`` or ``z = hi``; ``projection_non_negative`` (``relu``) gives 0 at ``z = 0``, where
``Box(0, inf)`` gives 1; ``projection_halfspace`` gives ``I - aa'/(2 a'a)`` at ``a'z = b``;
``projection_l2_ball`` gives a blend of the identity and the tangent projector at
``||z|| = r`` (and NaN at ``z = 0`` for ``r = 0``). optax has no centred ball and no
``{A x = b}`` with several rows (:class:`Affine`).

Empty sets (``Box`` with some ``lo > hi``, ``Simplex`` with ``total < 0``, ``Ball`` with
``radius < 0``, ``Halfspace`` with ``a = 0`` and ``b < 0``) have no projection. Each set has
an ``empty()`` method (a boolean array, traceable); ``project`` raises ``ValueError`` when the
set's data are concrete and empty, and returns NaN when they are traced and empty, and the
solvers that take sets report ``Status.INFEASIBLE``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from optax import projections as optax_projections

from bilevel_jax._src.types import Array, ArrayLike, PyTree, concrete_or_none

__all__ = [
    "Affine",
    "Ball",
    "Box",
    "Halfspace",
    "NonNegative",
    "Simplex",
    "check_set",
    "check_set_data",
    "is_set",
    "project",
    "sets_empty",
]


def _as(value, z):
    return jnp.asarray(value, dtype=z.dtype)


def _nonempty(s, out: Array, name: str = "set") -> Array:
    """Raise if ``s`` is concretely empty; NaN in ``out`` where a traced ``s`` is empty."""
    _raise_if_empty(s, name)
    return jnp.where(s.empty(), jnp.asarray(jnp.nan, out.dtype), out)


def _raise_if_empty(s, name: str) -> None:
    """``ValueError`` naming the data when ``s.empty()`` is concretely ``True``."""
    if not callable(getattr(s, "empty", None)):
        return
    with jax.ensure_compile_time_eval():
        empty = concrete_or_none(s.empty())
    if empty is not None and bool(np.any(empty)):
        describe = getattr(s, "describe_empty", None)
        reason = describe() if callable(describe) else f"{type(s).__name__} is empty."
        raise ValueError(f"{name}: {reason}")


class Box(NamedTuple):
    """The box ``{x : lo <= x <= hi}``; infinite bounds mean "no bound".

    ``lo`` and ``hi`` broadcast against the projected array (scalars, or arrays of its
    shape). An ``inf`` bound is never active and never produces NaN.

    Attributes:
      lo: lower bound (default ``-inf``).
      hi: upper bound (default ``+inf``). ``lo > hi`` anywhere makes the box empty: a
        ``ValueError`` from ``project`` when concrete, NaN when traced.

    Examples:
      >>> import jax.numpy as jnp
      >>> Box(0.0, 1.0).project(jnp.array([-1.0, 0.5, 2.0]))
      Array([0. , 0.5, 1. ], dtype=float32)
    """

    lo: ArrayLike = -jnp.inf
    hi: ArrayLike = jnp.inf

    def project(self, z: Array) -> Array:
        """``clip(z, lo, hi)``; the Jacobian is the 0/1 mask of the inactive entries."""
        z = jnp.asarray(z)
        lo, hi = _as(self.lo, z), _as(self.hi, z)
        # where (not clip) so that the derivative at a tie is exactly 0 or 1, never 1/2.
        out = jnp.where(z < lo, lo, jnp.where(z > hi, hi, z))
        out = jnp.broadcast_to(out, jnp.broadcast_shapes(z.shape, lo.shape, hi.shape))
        return _nonempty(self, out, "Box")

    def empty(self) -> Array:
        """Whether some ``lo > hi`` (NaN bounds do not count)."""
        return jnp.any(jnp.asarray(self.lo) > jnp.asarray(self.hi))

    def describe_empty(self) -> str:
        """The reason the box is empty, for error messages."""
        lo, hi = np.broadcast_arrays(np.asarray(self.lo), np.asarray(self.hi))
        i = np.flatnonzero(lo > hi)[0]
        return (f"Box has lo > hi (lo = {lo.ravel()[i]}, hi = {hi.ravel()[i]} at flat index "
                f"{i}); the set is empty.")


class NonNegative(NamedTuple):
    """The nonnegative orthant ``{x : x >= 0}``.

    Examples:
      >>> import jax.numpy as jnp
      >>> NonNegative().project(jnp.array([-1.0, 2.0]))
      Array([0., 2.], dtype=float32)
    """

    def project(self, z: Array) -> Array:
        """``max(z, 0)``."""
        z = jnp.asarray(z)
        return jnp.where(z < 0, jnp.zeros_like(z), z)

    def empty(self) -> Array:
        """Never empty."""
        return jnp.asarray(False)


class Simplex(NamedTuple):
    """The (budget) simplex ``{x : x >= 0, sum(x) = total}``, ``total >= 0``.

    The projection is ``max(z - tau, 0)`` with ``tau`` chosen so that the entries sum to
    ``total``, found by sorting ``z`` (Held, Wolfe and Crowder, 1974; Duchi et al., 2008).

    Attributes:
      total: the budget ``beta >= 0`` (default 1: the probability simplex; ``0`` gives the
        single point ``0``). A negative budget makes the set empty: a ``ValueError`` from
        ``project`` when concrete, NaN when traced.

    Examples:
      >>> import jax.numpy as jnp
      >>> Simplex().project(jnp.array([0.0, 0.5, 1.0]))
      Array([0.  , 0.25, 0.75], dtype=float32)

    References:
      Duchi, Shalev-Shwartz, Singer, Chandra. Efficient projections onto the l1-ball for
      learning in high dimensions. ICML 2008.
    """

    total: ArrayLike = 1.0

    def project(self, z: Array) -> Array:
        """Sort-based projection onto the simplex, ``O(n log n)`` (``optax.projections``)."""
        z = jnp.asarray(z)
        x = z.ravel()
        total = _as(self.total, x)
        # optax.projections.projection_simplex (0.2.8) agrees with the former own sort-based
        # projection to 1.6e-15 on 1,000 random points (n = 50, totals 1 and 2.5), Jacobians
        # equal; but it divides by the total (total = 0, the point {0}, gives NaN) and
        # returns a point with a negative sum for a negative total (an empty set): those two
        # cases are handled here (the guard keeps NaN out of the unused branch's gradient).
        # With x64 enabled it also returns float64 for float32 input (``1 / index`` is
        # computed from integers), hence the cast.
        positive = total > 0
        safe = jnp.where(positive, total, jnp.ones_like(total))
        inner = optax_projections.projection_simplex(x, safe).astype(x.dtype)
        out = jnp.where(positive, inner, jnp.zeros_like(x)).reshape(z.shape)
        return _nonempty(self, out, "Simplex")

    def empty(self) -> Array:
        """Whether ``total < 0``."""
        return jnp.any(jnp.asarray(self.total) < 0)

    def describe_empty(self) -> str:
        """The reason the simplex is empty, for error messages."""
        return f"Simplex needs total >= 0, got {np.asarray(self.total)}; the set is empty."


class Ball(NamedTuple):
    """The Euclidean ball ``{x : ||x - center|| <= radius}`` (Frobenius norm for arrays).

    Attributes:
      radius: ``r >= 0``; a negative radius makes the ball empty: a ``ValueError`` from
        ``project`` when concrete, NaN when traced.
      center: the centre (default 0), broadcast against the projected array.

    Examples:
      >>> import jax.numpy as jnp
      >>> Ball(1.0).project(jnp.array([3.0, 4.0]))
      Array([0.6, 0.8], dtype=float32)
    """

    radius: ArrayLike = 1.0
    center: ArrayLike = 0.0

    def project(self, z: Array) -> Array:
        """``center + (z - center) min(1, radius / ||z - center||)``."""
        z = jnp.asarray(z)
        center = _as(self.center, z)
        radius = _as(self.radius, z)
        d = z - center
        norm = jnp.sqrt(jnp.sum(d * d))
        outside = norm > radius
        scale = jnp.where(outside, radius / jnp.where(outside, norm, 1), 1)
        return _nonempty(self, jnp.broadcast_to(center + scale * d, z.shape), "Ball")

    def empty(self) -> Array:
        """Whether ``radius < 0``."""
        return jnp.any(jnp.asarray(self.radius) < 0)

    def describe_empty(self) -> str:
        """The reason the ball is empty, for error messages."""
        return f"Ball needs radius >= 0, got {np.asarray(self.radius)}; the set is empty."


class Halfspace(NamedTuple):
    """The halfspace ``{x : a'x <= b}`` on the flattened array (``a`` nonzero).

    ``a = 0`` gives the whole space when ``b >= 0`` (the projection is then NaN: ``a`` must
    be nonzero) and the empty set when ``b < 0``.

    Attributes:
      a: normal vector with as many entries as the projected array.
      b: offset (scalar).

    Examples:
      >>> import jax.numpy as jnp
      >>> Halfspace(jnp.array([1.0, 1.0]), 1.0).project(jnp.array([2.0, 1.0]))
      Array([1., 0.], dtype=float32)
    """

    a: ArrayLike
    b: ArrayLike = 0.0

    def project(self, z: Array) -> Array:
        """``z - max(0, a'z - b) a / ||a||^2``."""
        z = jnp.asarray(z)
        x = z.ravel()
        a = _as(self.a, x).ravel()
        excess = a @ x - _as(self.b, x)
        step = jnp.where(excess > 0, excess, jnp.zeros_like(excess)) / (a @ a)
        return _nonempty(self, (x - step * a).reshape(z.shape), "Halfspace")

    def empty(self) -> Array:
        """Whether ``a = 0`` and ``b < 0``."""
        return jnp.all(jnp.asarray(self.a) == 0) & jnp.any(jnp.asarray(self.b) < 0)

    def describe_empty(self) -> str:
        """The reason the halfspace is empty, for error messages."""
        return f"Halfspace has a = 0 and b = {np.asarray(self.b)} < 0; the set is empty."


class Affine(NamedTuple):
    """The affine set ``{x : A x = b}`` on the flattened array.

    The projection ``z - A^+ (A z - b)`` uses the pseudo-inverse, so linearly dependent rows
    are allowed. An inconsistent system (the set is empty) projects onto the least-squares
    solutions; ``empty()`` reports it, and solvers taking this set then say ``INFEASIBLE``.

    Attributes:
      A: matrix of shape ``(m, n)``, ``n`` the size of the projected array.
      b: right-hand side of shape ``(m,)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> Affine(jnp.array([[1.0, 1.0]]), jnp.array([1.0])).project(jnp.array([1.0, 1.0]))
      Array([0.5, 0.5], dtype=float32)
    """

    A: ArrayLike
    b: ArrayLike

    def project(self, z: Array) -> Array:
        """``z - A^+ (A z - b)``."""
        z = jnp.asarray(z)
        x = z.ravel()
        A = _as(self.A, x)
        b = _as(self.b, x)
        return (x - jnp.linalg.pinv(A) @ (A @ x - b)).reshape(z.shape)

    def empty(self) -> Array:
        """Whether ``A x = b`` is inconsistent: ``||A A^+ b - b|| > sqrt(eps) (1 + ||b||)``."""
        A = jnp.asarray(self.A)
        if not jnp.issubdtype(A.dtype, jnp.inexact):
            A = A.astype(float)
        b = jnp.asarray(self.b, A.dtype)
        miss = jnp.linalg.norm(A @ (jnp.linalg.pinv(A) @ b) - b)
        return miss > jnp.sqrt(jnp.finfo(A.dtype).eps) * (1 + jnp.linalg.norm(b))

    def describe_empty(self) -> str:
        """The reason the affine set is empty, for error messages."""
        return "Affine has an inconsistent system A x = b; the set is empty."


# --------------------------------------------------------------------------------------------
# Set arguments: None, one set, or a container (product) of sets.


def is_set(obj: Any) -> bool:
    """Whether ``obj`` is a set object (anything with a callable ``project`` method)."""
    return callable(getattr(obj, "project", None))


def _is_node(obj: Any) -> bool:
    return obj is None or is_set(obj)


def _project_one(s, sub: PyTree) -> PyTree:
    if s is None:
        return sub
    leaves = jax.tree_util.tree_leaves(sub)
    if len(leaves) == 1 and jax.tree_util.tree_structure(sub).num_nodes == 1:
        return s.project(sub)
    flat, unravel = ravel_pytree(sub)
    return unravel(s.project(flat))


def project(sets: PyTree, tree: PyTree) -> PyTree:
    """Project the pytree ``tree`` onto a set argument.

    Args:
      sets: ``None``, a set (applied to the whole of ``tree``: a single array keeps its
        shape, a larger pytree is flattened), or a container of sets and ``None`` whose
        structure is a prefix of ``tree``'s (a product set).
      tree: the point to project.

    Returns:
      The projection, with the structure of ``tree``.
    """
    if _is_node(sets):
        return _project_one(sets, tree)
    return jax.tree_util.tree_map(_project_one, sets, tree, is_leaf=_is_node)


def sets_empty(sets: PyTree) -> Array:
    """Whether any set of a set argument is empty (sets without ``empty()`` count as not)."""
    if sets is None:
        return jnp.asarray(False)
    leaves = jax.tree_util.tree_leaves(sets, is_leaf=_is_node) if not _is_node(sets) else [sets]
    flags = [jnp.any(s.empty()) for s in leaves
             if s is not None and callable(getattr(s, "empty", None))]
    return jnp.any(jnp.stack(flags)) if flags else jnp.asarray(False)


def check_set_data(sets: PyTree, name: str) -> None:
    """Raise ``ValueError`` if a set of the argument ``name`` is empty with concrete data."""
    if sets is None:
        return
    leaves = jax.tree_util.tree_leaves(sets, is_leaf=_is_node) if not _is_node(sets) else [sets]
    for s in leaves:
        if s is not None:
            _raise_if_empty(s, name)


def cast_sets(sets: PyTree, dtype) -> PyTree:
    """Cast every array leaf of a set argument to ``dtype`` (ints, float64 bounds, ...)."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), sets)


def flat_projector(sets: PyTree, unravel: Callable) -> Callable:
    """Return ``proj(sets, z_flat) -> z_flat`` for a variable flattened by ``unravel``."""

    def proj(sets_, z):
        if sets is None:
            return z
        return ravel_pytree(project(sets_, unravel(z)))[0].astype(z.dtype)

    return proj


def check_set(sets: PyTree, tree: PyTree, name: str, var: str) -> None:
    """Validate a set argument against a variable at trace time.

    Args:
      sets: the set argument.
      tree: the variable (arrays or shape structs).
      name: the argument's name for messages (e.g. ``"u_set"``).
      var: the variable's name for messages (e.g. ``"u0"``).

    Raises:
      TypeError: an entry is neither ``None`` nor a set, or the structures do not match.
      ValueError: a projection cannot be applied to its part of the variable, or returns a
        different shape.
    """
    if sets is None:
        return
    if not _is_node(sets):
        bad = [s for s in jax.tree_util.tree_leaves(sets, is_leaf=_is_node) if not _is_node(s)]
        if bad:
            raise TypeError(
                f"{name} must be None, a set with a project() method (e.g. Box, Simplex) or a "
                f"container of sets matching {var}; got an entry of type {type(bad[0]).__name__}."
            )
        treedef = jax.tree_util.tree_structure(sets, is_leaf=_is_node)
        try:
            subtrees = treedef.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise TypeError(
                f"{name} has structure {treedef}, which is not a prefix of the structure of "
                f"{var}: {err}"
            ) from err
        for s, sub in zip(jax.tree_util.tree_leaves(sets, is_leaf=_is_node), subtrees, strict=True):
            check_set(s, sub, name, var)
        return
    leaves = jax.tree_util.tree_leaves(tree)
    single = len(leaves) == 1 and jax.tree_util.tree_structure(tree).num_nodes == 1
    if single:
        example = jax.ShapeDtypeStruct(jnp.shape(leaves[0]), jnp.result_type(leaves[0]))
    else:
        size = sum(int(jnp.size(x)) for x in leaves)
        dtype = jnp.result_type(*leaves) if leaves else jnp.float32
        example = jax.ShapeDtypeStruct((size,), dtype)
    label = type(sets).__name__
    try:
        out = jax.eval_shape(lambda s, z: s.project(z), sets, example)
    except Exception as err:  # re-raise with the argument named
        raise ValueError(
            f"{name}: {label}.project cannot be applied to {var}, which has shape "
            f"{example.shape}: {err}"
        ) from err
    if tuple(out.shape) != tuple(example.shape):
        raise ValueError(
            f"{name}: {label}.project maps {var} of shape {example.shape} to shape "
            f"{tuple(out.shape)}; the set's data must broadcast to {example.shape}."
        )
