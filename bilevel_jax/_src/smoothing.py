"""SIGD smoothing: a random linear perturbation of the lower level, drawn once."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from bilevel_jax._src.types import Array, PyTree

DISTRIBUTIONS = ("normal", "sphere")


def linear_perturbation(key: Array, y: PyTree, scale: float, distribution: str = "normal"):
    r"""Draw the SIGD perturbation ``q``, a pytree like ``y``: :func:`perturb_linear`'s draw.

    ``q`` depends only on ``key`` and on the shapes and dtypes of ``y``'s leaves (the values
    of ``y`` are ignored), so ``perturb_linear(g, key, scale)`` adds exactly
    ``<linear_perturbation(key, y, scale), y>`` to ``g``. Use it directly when the
    perturbation must be stored or indexed, e.g. in adversarial training with one lower level
    per example: draw ``q_all = linear_perturbation(key, x_train, sigma)`` once for the whole
    training set (``"normal"``: every entry is an independent ``N(0, sigma^2)``, so each
    example's row is its own ``q_i``) and take ``q_all[batch_indices]`` at each step.

    With ``distribution="sphere"`` the norm is that of the whole pytree (``||q|| = scale``
    over all leaves); for one unit-norm ``q_i`` per example, ``jax.vmap`` over split keys:
    ``jax.vmap(lambda k, y: linear_perturbation(k, y, scale, "sphere"))(keys, y_batch)``.

    Args:
      key: a ``jax.random`` key.
      y: a pytree of floating arrays giving the shapes and dtypes of ``q``.
      scale: ``"normal"``: the standard deviation ``sigma_q``; ``"sphere"``: the norm of ``q``.
      distribution: ``"normal"`` (``q ~ N(0, scale^2 I)``) or ``"sphere"``
        (``q = scale z / ||z||``, ``z ~ N(0, I)``).

    Returns:
      ``q``, with the structure, shapes and dtypes of ``y``.

    Raises:
      ValueError: for an unknown ``distribution``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> x_train = jnp.zeros((100, 64))  # 100 examples, one lower level y_i (64,) each
      >>> q_all = bj.linear_perturbation(jax.random.PRNGKey(0), x_train, 0.1)
      >>> q_batch = q_all[jnp.arange(8)]  # the q_i of a minibatch, fixed across epochs
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    leaves, treedef = jax.tree_util.tree_flatten(y)
    keys = jax.random.split(key, len(leaves))
    qs = [jax.random.normal(k, jnp.shape(leaf), jnp.result_type(leaf))
          for k, leaf in zip(keys, leaves, strict=True)]
    if distribution == "sphere":
        norm = jnp.sqrt(sum(jnp.sum(q**2) for q in qs))
        qs = [q / norm for q in qs]
    return jax.tree_util.tree_unflatten(treedef, [scale * q for q in qs])


def perturb_linear(
    g: Callable, key: Array, scale: float, *, distribution: str = "normal"
) -> Callable:
    r"""Add a random linear term to a lower level: ``g_q(y, theta) = g(y, theta) + <q, y>``.

    The SIGD smoothing of Khanduri et al. (ICML 2023): ``q`` is drawn **once** (it depends only
    on ``key``, so every call of ``g_q`` sees the same ``q``). If ``q`` has a density and LICQ
    holds, strict complementarity holds with probability one at any fixed ``theta``, so the
    perturbed hyperobjective ``F_q(theta) = f(theta, y_q*(theta))`` is differentiable at every
    iterate of an algorithm with probability one, and the active-set rule of
    :func:`~bilevel_jax.argmin` applies. The Hessian is unchanged; the bias is bounded by
    ``|F_q - F| <= L_f ||q|| / mu_g`` (and ``||y_q* - y*|| <= ||q|| / mu_g``).

    Args:
      g: ``g(y, theta) -> scalar``.
      key: a ``jax.random`` key.
      scale: ``"normal"``: ``q ~ N(0, scale^2 I)`` (adversarial-training setting, with
        ``scale^2 = sigma_q^2``); ``"sphere"``: ``q = scale * z / ||z||``, ``z ~ N(0, I)``
        (so ``||q|| = scale``; ``scale = 1e-3`` in the SIGD comparison code).
      distribution: ``"normal"`` or ``"sphere"``.

    Returns:
      ``g_q(y, theta)``, with ``q`` shaped like ``y``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bilevel_jax as bj
      >>> g = lambda y, x: 0.5 * jnp.sum((y - x) ** 2)
      >>> g_q = bj.perturb_linear(g, jax.random.PRNGKey(0), 1e-3, distribution="sphere")
      >>> y = bj.argmin(g_q, jnp.zeros(3), jnp.ones(3), box=lambda x: (0.0, 1.0)).y

    References:
      Khanduri, Tsaknakis, Zhang, Liu, Liu, Zhang, Hong. Linearly Constrained Bilevel
      Optimization: A Smoothed Implicit Gradient Approach. ICML 2023 (docs: ``lower/inequality.md``,
      section 'SIGD smoothing').
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}.")
    if isinstance(scale, (int, float)) and scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}.")

    def g_q(y, theta):
        q = linear_perturbation(key, y, scale, distribution)
        inner = sum(jnp.vdot(a, b) for a, b in zip(
            jax.tree_util.tree_leaves(q), jax.tree_util.tree_leaves(y), strict=True))
        return g(y, theta) + inner

    return g_q
