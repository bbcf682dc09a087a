"""Control flow that keeps ``jax.shard_map``'s varying-manual-axes types consistent.

Inside ``jax.shard_map`` (with its default ``check_vma=True``) every value has a type that
records the mesh axes over which it *varies*: per-device data (``in_specs=P('x')``) varies
over ``'x'``, while a constant created inside the solver (``jnp.zeros(n)``, an iteration
counter, a flag) is the same on every device. JAX combines the two in arithmetic, but four
places of an iterative solver need them to agree, and each broke the solution maps:

* a ``lax.while_loop`` / ``fori_loop`` / ``scan`` carry and a ``lax.cond`` branch output must
  have the same type on the way in and out, so a carry that starts as a constant and comes
  back computed from the data ("carry input and carry output must have equal types",
  "cond branches must have equal output types") is rejected;
* a jaxpr traced by ``jax.closure_convert`` with a constant warm start records no cast for it,
  and replaying it on iterates that vary fails inside JAX ("requires varying manual axes to
  match", "pvary is a invariant->variant collective");
* ``jax.grad`` with respect to a value that is the same on every device sums the cotangents
  over the devices (the gradient of a replicated value), so a derivative evaluated at a
  constant warm start would be silently multiplied by the number of devices;
* ``jax.jvp`` / ``jax.vjp`` at a per-device point accept only tangents and cotangents that
  vary like it, so probing vectors (``jnp.eye`` columns) must be marked as well.

The cure is to mark such constants as varying over the axes of the data they meet
(``jax.lax.pcast(x, axes, to="varying")``, which changes no value and is the identity outside
``shard_map``): :func:`vary_like` does it, :func:`closure_convert` traces with the warm start
so marked, and the loop and conditional wrappers below mark the carries and branch outputs.
Outside ``shard_map`` every function here costs one Python pass over the leaves and emits
exactly the ``jax.lax`` operation it wraps.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bilevel_jax._src.types import PyTree

__all__ = [
    "OPTAX_LINESEARCH",
    "closure_convert",
    "cond",
    "fori_loop",
    "scan",
    "unsupported",
    "vary_like",
    "varying_axes",
    "where_needed",
    "while_loop",
]


#: Why optax's L-BFGS cannot run under ``shard_map`` with per-device data (optax 0.2.8): its
#: zoom line search creates replicated constants inside ``lax.cond`` branches.
OPTAX_LINESEARCH = "optax's zoom line search builds replicated constants inside lax.cond"


def _leaf_axes(x) -> frozenset:
    mat = getattr(jax.typeof(x), "mat", None)
    return frozenset(getattr(mat, "varying", ()))


def varying_axes(*trees: PyTree) -> frozenset:
    """The manual mesh axes over which any leaf of ``trees`` varies (empty outside shard_map).

    Args:
      *trees: pytrees of arrays (``None`` leaves are skipped).

    Returns:
      A frozenset of axis names.
    """
    axes = frozenset()
    for leaf in jax.tree_util.tree_leaves(trees):
        axes = axes | _leaf_axes(leaf)
    return axes


def vary_like(tree: PyTree, *refs: PyTree) -> PyTree:
    """Mark every leaf of ``tree`` as varying over the manual axes over which ``refs`` vary.

    Args:
      tree: a pytree of arrays.
      *refs: pytrees whose varying axes ``tree`` must carry.

    Returns:
      ``tree`` with the same values; leaves that already vary over those axes are returned
      as they are (so outside ``shard_map`` the result is ``tree`` itself).
    """
    axes = varying_axes(*refs)
    if not axes:
        return tree

    def leaf(x):
        if not isinstance(x, jax.Array | np.ndarray):  # Python scalars stay weakly typed
            return x
        missing = tuple(sorted(axes - _leaf_axes(x), key=str))
        return lax.pcast(x, missing, to="varying") if missing else x

    return jax.tree_util.tree_map(leaf, tree)


def _unchanged(a: PyTree, b: PyTree) -> bool:
    la, lb = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    return all(x is y for x, y in zip(la, lb, strict=True))


def closure_convert(fn: Callable, *args):
    """``jax.closure_convert(fn, *args)``, traced with ``args`` varying like the whole problem.

    The converted function replays a jaxpr traced once, with the types of ``args``. Inside
    ``shard_map`` the solvers call it with iterates that vary over every axis over which the
    parameters or the closed-over arrays vary (the warm start goes through :func:`vary_like`
    in :func:`~bilevel_jax._src.implicit.custom_solution`), so ``args`` are cast the same way
    before tracing (a second trace, only when a cast is needed).

    The solvers also cast the closed-over arrays (``consts``) that way, which the replayed
    jaxpr cannot take when ``fn`` closes over a value that is the same on every device (an
    input replicated by ``in_specs=P()``, a constant built inside the ``shard_map`` body)
    while the problem varies: that case raises a ``NotImplementedError`` that says so,
    instead of JAX's "requires varying manual axes to match" deep inside a solver loop.

    Args:
      fn: the function to convert.
      *args: example arguments.

    Returns:
      ``(converted, consts)`` as :func:`jax.closure_convert`.

    Raises:
      NotImplementedError: inside ``shard_map``, for a closed-over replicated value that
        the replayed function cannot take once it is marked as varying.
    """
    converted, consts = jax.closure_convert(fn, *args)
    cast = vary_like(args, args, consts)
    if not _unchanged(cast, args):
        converted, consts = jax.closure_convert(fn, *cast)
    if not _unchanged(vary_like(consts, cast, consts), consts):
        try:  # an abstract replay with the consts as the solvers will pass them
            jax.eval_shape(lambda a, c: converted(*a, *vary_like(c, a, c)), cast, consts)
        except ValueError as err:
            axes = sorted(varying_axes(cast, consts), key=str)
            raise NotImplementedError(
                f"{getattr(fn, '__name__', 'a user function')} closes over a value that is "
                f"replicated over the jax.shard_map mesh axes {axes} (an input with "
                "in_specs P(), or a constant built inside the shard_map body) while the "
                "problem varies per device; with check_vma=True the solver cannot replay it. "
                "Pass that value in theta (the argument the solver differentiates) instead "
                "of closing over it, mark it per-device with jax.lax.pcast(value, axes, "
                "to='varying') before closing over it, or build it outside the jitted "
                "function."
            ) from err
    return converted, consts


def _carry(init: PyTree, *refs: PyTree) -> PyTree:
    """``init`` with every leaf (Python scalars included) varying like ``init`` and ``refs``."""
    if not varying_axes(init, *refs):
        return init
    init = jax.tree_util.tree_map(
        lambda x: x if isinstance(x, jax.Array | np.ndarray) else jnp.asarray(x), init
    )
    return vary_like(init, init, *refs)


def unsupported(what: str, reason: str, *trees: PyTree) -> None:
    """Raise a clear error when ``trees`` vary over ``shard_map`` axes that ``what`` cannot take.

    Args:
      what: the feature, for the message.
      reason: why it cannot, for the message.
      *trees: the values the feature would see.

    Raises:
      NotImplementedError: inside ``shard_map`` when a leaf of ``trees`` varies.
    """
    axes = varying_axes(*trees)
    if axes:
        raise NotImplementedError(
            f"{what} cannot run inside jax.shard_map on per-device data (mesh axes "
            f"{sorted(axes, key=str)}) with check_vma=True: {reason}. Use another solver, or "
            "jax.shard_map(..., check_vma=False)."
        )


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: PyTree, *, like: PyTree = None):
    """:func:`jax.lax.while_loop` whose carry varies over the axes of ``init_val`` and ``like``.

    Every carry leaf (counters and flags included) is marked as varying over the union of
    the axes of the initial carry and ``like``, on the way in and out of ``body_fun``.

    Args:
      cond_fun: ``carry -> bool``.
      body_fun: ``carry -> carry``.
      init_val: the initial carry.
      like: optional extra pytree whose axes the carry must carry (the data of the loop, when
        the initial carry holds constants only).

    Returns:
      The final carry.
    """
    init_val = _carry(init_val, like)
    return lax.while_loop(cond_fun, lambda c: vary_like(body_fun(c), init_val), init_val)


def fori_loop(lower, upper, body_fun: Callable, init_val: PyTree, *, like: PyTree = None):
    """:func:`jax.lax.fori_loop` with the carry handled as in :func:`while_loop`.

    Args:
      lower: first index.
      upper: end index (exclusive).
      body_fun: ``(i, carry) -> carry``.
      init_val: the initial carry.
      like: optional extra pytree whose axes the carry must carry.

    Returns:
      The final carry.
    """
    init_val = _carry(init_val, like)
    return lax.fori_loop(
        lower, upper, lambda i, c: vary_like(body_fun(i, c), init_val), init_val
    )


def scan(f: Callable, init: PyTree, xs=None, length=None, *, like: PyTree = None):
    """:func:`jax.lax.scan` with the carry handled as in :func:`while_loop`.

    Args:
      f: ``(carry, x) -> (carry, y)``.
      init: the initial carry.
      xs: scanned inputs.
      length: number of steps when ``xs`` is ``None``.
      like: optional extra pytree whose axes the carry must carry.

    Returns:
      ``(carry, ys)``.
    """
    init = _carry(init, xs, like)

    def step(carry, x):
        carry, y = f(carry, x)
        return vary_like(carry, init), y

    return lax.scan(step, init, xs, length=length)


def cond(pred, true_fun: Callable, false_fun: Callable, *operands):
    """:func:`jax.lax.cond` that also works on per-device predicates inside ``shard_map``.

    When ``pred`` varies over manual mesh axes both branches are evaluated and the result is
    selected, with both outputs marked as varying like ``pred`` (the result depends on it).
    This is what ``jax.vmap`` makes of a ``cond`` with a batched predicate anyway; a
    ``lax.cond`` there is not used because JAX 0.10's batching rule for it fails when a branch
    closes over a replicated value that the branch combines with per-device data ("pvary is a
    invariant->variant collective"). Otherwise it is ``lax.cond`` itself.

    Args:
      pred: scalar boolean.
      true_fun: branch taken when ``pred`` is true.
      false_fun: branch taken otherwise.
      *operands: operands passed to the branches.

    Returns:
      The output of the branch taken.
    """
    if not varying_axes(pred):
        return lax.cond(pred, true_fun, false_fun, *operands)
    on_true = vary_like(true_fun(*operands), pred, operands)
    on_false = vary_like(false_fun(*operands), pred, operands)
    return jax.tree_util.tree_map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def where_needed(pred, fn: Callable, default: PyTree, *operands: PyTree) -> PyTree:
    """``fn(*operands)`` where ``pred`` holds, else ``default``; ``fn`` runs only if needed.

    A :func:`cond` whose expensive branch is rare. Unbatched it *is* :func:`cond` (the branch
    runs only when ``pred`` holds). Under :func:`jax.vmap`, where a ``cond`` with a batched
    predicate evaluates both branches for every member, a one-trip ``while_loop`` runs the
    vmapped ``fn`` (its results selected per member) only when some member needs it, and not
    at all otherwise (a ``jax.custom_batching.custom_vmap`` rule). The loop is not used
    unbatched: measured on ``solve_qp``'s hypergradient at ``n = 200``, an unexecuted
    ``while_loop`` there cost 2 ms of 2.5 ms (XLA:CPU), a ``cond`` nothing. Used for
    fallbacks (a dense LU where a cheaper solve failed its check).

    Args:
      pred: scalar boolean.
      fn: ``fn(*operands) -> tree`` with the structure, shapes and dtypes of ``default``; a
        pure function of its operands (it must not close over traced values).
      default: the result where ``pred`` is false.
      *operands: the arrays (pytrees) ``fn`` reads.

    Returns:
      A tree like ``default``. Differentiable as the plain :func:`cond`.
    """
    return _where_needed(fn)(pred, default, *operands)


def _cond_version(fn):
    def plain(pred, default, *operands):
        return cond(pred, lambda: fn(*operands), lambda: vary_like(default, pred, operands))

    return plain


def _where_needed(fn):
    plain = _cond_version(fn)

    @jax.custom_batching.custom_vmap
    def run(pred, default, *operands):
        return plain(pred, default, *operands)

    @run.def_vmap
    def _rule(axis_size, in_batched, pred, default, *operands):
        def batched(x, b):
            return jax.tree_util.tree_map(
                lambda a, flag: a if flag else jnp.broadcast_to(a, (axis_size, *jnp.shape(a))),
                x, b)

        pred = batched(pred, in_batched[0])
        default = batched(default, in_batched[1])
        operands = tuple(batched(o, b) for o, b in zip(operands, in_batched[2:], strict=True))

        def body(state):
            _, out = state
            new = jax.vmap(fn)(*operands)
            return jnp.ones((), bool), jax.tree_util.tree_map(
                lambda a, b: jnp.where(pred.reshape(pred.shape + (1,) * (a.ndim - 1)), a, b),
                new, out)

        _, out = while_loop(lambda s: jnp.any(pred) & ~s[0], body,
                            (jnp.zeros((), bool), default), like=(pred, operands))
        return out, jax.tree_util.tree_map(lambda _: True, out)

    @jax.custom_jvp
    def wrapped(pred, default, *operands):
        return run(pred, default, *operands)

    @wrapped.defjvp
    def _jvp(primals, tangents):
        return jax.jvp(plain, primals, tangents)

    return wrapped


def jit_when_eager(fn: Callable, static_argnums: tuple) -> Callable:
    """``fn`` compiled once per static arguments and shapes when called eagerly, else ``fn``.

    The entry points build their solve from the user's (closure-converted) functions, passed
    as static arguments, so a repeated eager call with the same functions reuses the
    compilation instead of retracing. Under a transformation (:func:`is_eager` is False) ``fn``
    runs inside the caller's trace. The compiled function is the attribute ``compiled``.
    """
    compiled = jax.jit(fn, static_argnums=static_argnums)

    def call(*args):
        return (compiled if is_eager() else fn)(*args)

    call.compiled = compiled
    return call


def is_eager() -> bool:
    """Whether the caller runs outside every JAX transformation (no ``jit``/``vmap``/``grad``).

    The entry points compile their solve once per (functions, options, shapes) only then: under
    a transformation the outer trace compiles anyway, and a user function may close over a
    tracer of that trace (e.g. a ``vmap`` batch tracer), which must not be captured by a
    separately compiled function.
    """
    from jax._src import core  # no public equivalent in jax 0.10

    return isinstance(core.trace_ctx.trace, core.EvalTrace)
