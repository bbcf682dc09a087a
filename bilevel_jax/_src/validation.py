"""Trace-time checks shared by the public entry points; errors name the argument."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from bilevel_jax._src.tree import is_inexact
from bilevel_jax._src.types import concrete_or_none


def check_option(name: str, value, allowed: tuple) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}.")


def flatten_variables(name: str, tree):
    """Check ``tree`` is a non-empty pytree of float arrays; return ``ravel_pytree(tree)``."""
    check_float_tree(name, tree)
    return ravel_pytree(tree)


def check_float_tree(name: str, tree):
    """Raise unless ``tree`` is a non-empty pytree of floating-point arrays (names ``name``)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if not leaves:
        raise ValueError(f"{name} must contain at least one array, got an empty pytree.")
    for leaf in leaves:
        if not is_inexact(leaf):
            raise TypeError(
                f"{name} must contain floating-point arrays, got dtype "
                f"{jnp.result_type(leaf)}; pass e.g. jnp.zeros(n) rather than an integer array."
            )


def check_scalar_output(fn: Callable, args: tuple, call: str, signature: str) -> None:
    """Check that ``fn(*args)`` traces and returns a scalar (``call`` / ``signature`` name it)."""
    try:
        out = jax.eval_shape(fn, *args)
    except Exception as err:  # re-raise with the argument named
        raise TypeError(f"{call} could not be evaluated: {err}") from err
    if not (hasattr(out, "shape") and out.shape == ()):
        shape = getattr(out, "shape", type(out).__name__)
        raise TypeError(f"{signature} must return a scalar, got {shape}.")


def crossed_bounds(lo, hi):
    """``(lo, hi, indices)`` of the entries with ``lo > hi`` when both bounds are concrete.

    Returns ``None`` when either bound is traced (checked at run time instead, as
    ``INFEASIBLE``); ``indices`` is empty when the bounds are consistent.
    """
    lo, hi = concrete_or_none(lo), concrete_or_none(hi)
    if lo is None or hi is None:
        return None
    lo, hi = np.broadcast_arrays(lo, hi)
    return lo, hi, np.flatnonzero(lo > hi)


def raise_if_crossed(lo, hi, what: str, empty: str, index: str = "row"):
    """Raise ``ValueError`` at concrete ``lo > hi``; else ``(lo, hi)`` as NumPy, or ``None``.

    ``what`` names the bounds (e.g. ``"box(theta) returned lo > hi"``), ``empty`` the set
    they leave empty and ``index`` what an index counts (``"row"``, ``"flattened index"``).
    Traced bounds give ``None``: they are checked at run time instead (``INFEASIBLE``).
    """
    crossed = crossed_bounds(lo, hi)
    if crossed is None:
        return None
    lo, hi, bad = crossed
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{what} at {bad.size} of {lo.size} entries, e.g. {index} {i} "
                         f"({lo.flat[i]} > {hi.flat[i]}): {empty}")
    return lo, hi
