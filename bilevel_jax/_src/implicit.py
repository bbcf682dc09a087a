"""The one ``custom_vjp`` helper, shared by every solution map and hypergradient rule.

:func:`custom_solution` runs a forward ``solve`` and attaches a caller-supplied reverse rule
``backward(zbar, z, theta, aux) -> thetabar``. The warm start ``z0`` never receives a
cotangent. Every rule of the library goes through it:

* :func:`implicit_backward` is the implicit function theorem over an optimality residual
  ``r(z, theta)`` with ``r(z*(theta), theta) = 0``: since ``dz*/dtheta = -(dr/dz)^{-1} dr/dtheta``,
  for a cotangent ``zbar`` it solves ``(dr/dz)^T u = zbar`` and returns
  ``thetabar = -(dr/dtheta)^T u`` (one linear solve, one vector-Jacobian product of ``r``).
* first-order rules (finite differences, penalty) supply their own ``backward``.

**Failure policy (written once, here).** When the forward's ``aux`` has an ``info`` field
(an :class:`~bilevel_jax._src.types.Info`, or any record with a ``status``), every cotangent
returned for ``theta`` is replaced by NaN where the status is a failure (anything but
``SUCCESS`` and ``RANK_DEFICIENT``): a failed solve never yields finite numbers that look like
a hypergradient. The status is a per-problem scalar, so under ``jax.vmap`` each member of a
batch is judged on its own. :class:`SolveAux` is the record the solution maps use.

``custom_vjp`` rules out forward mode (``jax.jvp``, ``jax.jacfwd``); use reverse mode.
Callers must pass every differentiable value inside ``theta``: values a user function closes
over are hoisted into ``theta`` with ``jax.closure_convert`` by the public entry points.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from bilevel_jax._src.tree import tree_negative, zero_cotangent
from bilevel_jax._src.types import PyTree, is_successful
from bilevel_jax._src.vma import vary_like


class SolveAux(NamedTuple):
    """The ``aux`` of a solution map's forward: its diagnostics and what the backward reuses.

    Attributes:
      info: the solve's ``Info`` (or ``SaddleInfo``); its ``status`` gates the cotangents.
      extra: anything the backward rule needs (a factorisation, multipliers), or ``None``.
    """

    info: Any
    extra: Any = None


def custom_solution(solve: Callable, backward: Callable, z0: PyTree, theta: PyTree):
    """Run ``solve(z0, theta) -> (z, aux)`` with the reverse rule ``backward``.

    Inside ``jax.shard_map``, ``theta`` and ``z0`` are first marked as varying over every mesh
    axis over which any of their leaves varies (:func:`~bilevel_jax._src.vma.vary_like`), so
    the solver sees one uniformly typed problem: its iterates, loop carries and derivatives
    never mix per-device and replicated values (and the derivative at a replicated warm start
    is not summed over the devices). The cast is outside the ``custom_vjp``, so the
    cotangent of a replicated input is summed over the devices as JAX defines it. Outside
    ``shard_map`` nothing is cast.

    Args:
      solve: ``solve(z0, theta) -> (z, aux)``. ``aux`` (diagnostics, a factorisation to reuse
        on the backward pass) is returned as is and is not differentiated. If it has an
        ``info`` field (e.g. a :class:`SolveAux`), a failed ``info.status`` makes the
        cotangents NaN.
      backward: ``backward(zbar, z, theta, aux) -> thetabar``, a pytree like ``theta``.
      z0: the warm start; its cotangent is zero.
      theta: every differentiable input.

    Returns:
      ``(z, aux)``.
    """
    theta = vary_like(theta, theta, z0)
    return _custom_solution(solve, backward, vary_like(z0, theta), theta)


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _custom_solution(solve, backward, z0, theta):
    return solve(z0, theta)


def _fwd(solve, backward, z0, theta):
    z, aux = solve(z0, theta)
    return (z, aux), (z0, z, theta, aux)


def _bwd(solve, backward, saved, cotangents):
    z0, z, theta, aux = saved
    zbar, _ = cotangents
    return zero_cotangent(z0), nan_unless_successful(aux, backward(zbar, z, theta, aux))


def nan_unless_successful(aux: Any, cotangent: PyTree) -> PyTree:
    """NaN in every inexact leaf of ``cotangent`` unless ``aux.info.status`` is a success.

    Leaves of dtype ``float0`` (integer inputs) pass through. Without ``aux.info`` the
    cotangent is returned unchanged.
    """
    info = getattr(aux, "info", None)
    if info is None:
        return cotangent
    ok = is_successful(info.status)

    def leaf(a):
        if getattr(a, "dtype", None) == jax.dtypes.float0:
            return a
        return jnp.where(ok, a, jnp.asarray(jnp.nan, a.dtype))

    return jax.tree_util.tree_map(leaf, cotangent)


_custom_solution.defvjp(_fwd, _bwd)


def implicit_backward(residual: Callable, adjoint_solve: Callable) -> Callable:
    """The implicit-function-theorem reverse rule for :func:`custom_solution`.

    Args:
      residual: ``residual(z, theta) -> r``, a pytree with the structure of ``z``, zero at the
        solution.
      adjoint_solve: ``adjoint_solve(vjp_z, zbar, z, theta, aux) -> u`` solving
        ``(dr/dz)^T u = zbar``, where ``vjp_z(u) = (dr/dz)^T u`` is supplied matrix-free.

    Returns:
      ``backward(zbar, z, theta, aux) = -(dr/dtheta)^T u``.
    """

    def backward(zbar, z, theta, aux):
        # Inside shard_map the residual and its cotangents vary like the problem (vma.py).
        def res(z_, theta_):
            return vary_like(residual(z_, theta_), z, theta)

        _, vjp_z = jax.vjp(lambda z_: res(z_, theta), z)
        u = adjoint_solve(lambda u_: vjp_z(vary_like(u_, z, theta))[0], zbar, z, theta, aux)
        _, vjp_theta = jax.vjp(lambda theta_: res(z, theta_), theta)
        return tree_negative(vjp_theta(vary_like(u, z, theta))[0])

    return backward


def implicit_solution(
    solve: Callable, residual: Callable, adjoint_solve: Callable, z0: PyTree, theta: PyTree
):
    """Solve ``r(z, theta) = 0`` with hypergradients from the implicit function theorem.

    See :func:`custom_solution` and :func:`implicit_backward` for the arguments.
    """
    return custom_solution(solve, implicit_backward(residual, adjoint_solve), z0, theta)
