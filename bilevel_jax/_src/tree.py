"""Small pytree utilities shared by the solution maps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._src.types import Array, PyTree


def is_inexact(x) -> bool:
    """Whether ``x`` has a floating or complex dtype."""
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def zero_cotangent(x) -> PyTree:
    """Zero cotangents for a pytree: zeros for inexact leaves, ``float0`` zeros otherwise."""

    def leaf(a):
        if is_inexact(a):
            return jnp.zeros_like(a)
        return np.zeros(np.shape(a), dtype=jax.dtypes.float0)

    return jax.tree_util.tree_map(leaf, x)


def tree_negative(tree: PyTree) -> PyTree:
    """Negate the inexact leaves of a cotangent pytree (``float0`` leaves pass through)."""

    def leaf(a):
        if getattr(a, "dtype", None) == jax.dtypes.float0:
            return a
        return -a

    return jax.tree_util.tree_map(leaf, tree)


def tree_scale(scale, tree: PyTree) -> PyTree:
    """Multiply the inexact leaves of a cotangent pytree by ``scale``."""

    def leaf(a):
        if getattr(a, "dtype", None) == jax.dtypes.float0:
            return a
        return scale * a

    return jax.tree_util.tree_map(leaf, tree)


def tree_all_finite(tree: PyTree) -> Array:
    """``True`` when every inexact leaf of ``tree`` is finite (a traced boolean scalar)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree) if is_inexact(x)]
    if not leaves:
        return jnp.asarray(True)
    return jnp.all(jnp.stack(leaves))
