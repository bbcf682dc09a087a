"""Gradient estimators for discrete (combinatorial) solvers, one or two levels (BiGrad).

A combinatorial solver ``solver(costs) -> y`` minimising a linear cost over a finite set,
``y(c) = argmin_{y in Y} <c, y>``, is piecewise constant in ``c``: its true derivative is zero
almost everywhere. The estimators below turn it into a layer with useful gradients
(docs page ``lower/discrete.md``). Each is a function transformer built on the one custom-VJP
helper (:func:`~bilevel_jax._src.implicit.custom_solution`):

* :func:`identity` (straight-through): ``dy/dc ~ -I`` (minimisation), so ``cbar = -ybar``.
* :func:`perturbed` (Berthet et al.): the forward pass returns ``E[y(c - sigma eta)]`` over
  ``num_samples`` draws of Gaussian or Gumbel noise and the backward pass is the
  unbiased Monte-Carlo estimate of its Jacobian.
* :func:`interpolated` (Vlastelica/Pogančić et al.): one extra solve at
  ``c' = c + lambda_ ybar``; ``cbar = (y(c') - y(c)) / lambda_``.
* :func:`relaxed`: the regularised LP over the simplex (one-hot polytope), ``softmax`` or
  ``sparsemax`` of ``-c / temperature``, differentiated exactly.

Two levels: :func:`brute_force_bilevel` solves a small discrete bilevel program exactly by
enumeration; :func:`linear_bilevel` and :func:`interdiction` build the linear-cost programs
``x* = argmin_{x in X} <c_x, x> + kappa <c_y, y*(x)>``, ``y*(x) = argmin_{y in Y} <c_y + M x, y>``;
:func:`bilevel` wraps such a program in an estimator that keeps the cross-level term
(``c_y`` reaches ``x`` through ``M``): for the identity estimator
``cbar_y = -ybar`` and ``cbar_x = -xbar + M^T ybar``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bilevel_jax._src.implicit import custom_solution
from bilevel_jax._src.tree import zero_cotangent
from bilevel_jax._src.types import Array
from bilevel_jax._src.validation import check_float_tree

__all__ = [
    "DiscreteBilevel",
    "bilevel",
    "brute_force_bilevel",
    "identity",
    "interdiction",
    "interpolated",
    "linear_bilevel",
    "onehot_argmin",
    "perturbed",
    "relaxed",
]

NOISES = ("gumbel", "gaussian")
REGULARIZERS = ("entropy", "quadratic")
ESTIMATORS = ("identity", "interpolated", "perturbed")


# --------------------------------------------------------------------------------------------
# Helpers.


def onehot_argmin(costs: Array) -> Array:
    """One-hot vector of the smallest cost along the last axis (ties: lowest index).

    The combinatorial solver ``argmin_{y in simplex vertices} <c, y>``, pure JAX.

    Args:
      costs: array of shape ``(..., n)``.

    Returns:
      An array like ``costs`` with a single one per row.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import onehot_argmin
      >>> onehot_argmin(jnp.array([3.0, 1.0, 2.0]))
      Array([0., 1., 0.], dtype=float32)
    """
    costs = jnp.asarray(costs)
    return jax.nn.one_hot(jnp.argmin(costs, axis=-1), costs.shape[-1], dtype=costs.dtype)


def _tree_dot(a, b):
    pairs = zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True)
    leaves = [jnp.sum(x * y) for x, y in pairs]
    return sum(leaves[1:], leaves[0])


def _eval_solver(solver, costs, what="solver(costs)"):
    try:
        return jax.eval_shape(solver, costs)
    except Exception as err:  # re-raise with the argument named
        raise TypeError(f"{what} could not be evaluated: {err}") from err


def _check_same_structure(solver, costs, estimator):
    out = _eval_solver(solver, costs)
    s_out, s_in = jax.tree_util.tree_structure(out), jax.tree_util.tree_structure(costs)
    shapes_out = [tuple(a.shape) for a in jax.tree_util.tree_leaves(out)]
    shapes_in = [tuple(np.shape(a)) for a in jax.tree_util.tree_leaves(costs)]
    if s_out != s_in or shapes_out != shapes_in:
        raise ValueError(
            f"{estimator} needs solver(costs) to return a solution shaped like costs "
            f"(the linear-cost convention y = argmin <costs, y>); got {shapes_out} for costs "
            f"of shapes {shapes_in}."
        )


def _convert(solver, costs):
    """Closure-convert ``solver``; closed-over arrays get zero cotangents."""
    conv, consts = jax.closure_convert(solver, costs)
    return (lambda c, k: conv(c, *k)), tuple(consts)


def _cast_like(tree, like):
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(a).astype(jnp.result_type(b)),
                                  tree, like)


def _check_positive(name, value):
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a positive number, got {value!r}.")


# --------------------------------------------------------------------------------------------
# Single-level estimators.


def identity(solver: Callable) -> Callable:
    r"""Straight-through (identity) estimator for a minimisation solver.

    The forward pass returns ``y = solver(c)``; the backward pass pretends
    ``dy/dc = -I`` (the Jacobian of ``y = -c``, the minimiser of
    ``<c, y> + 1/2 ||y||^2``), so

    .. math:: \bar c = -\bar y .

    No extra solver call. Exact for solvers that are the identity map up to sign; a
    biased but cheap direction otherwise.

    Args:
      solver: ``solver(costs) -> y``, a pure JAX function whose output has the structure
        and shapes of ``costs`` (e.g. :func:`onehot_argmin`). Arrays it closes over receive
        zero gradient (the solution is piecewise constant in them).

    Returns:
      ``fn(costs) -> y``, reverse-mode differentiable in ``costs``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import identity, onehot_argmin
      >>> layer = identity(onehot_argmin)
      >>> jax.grad(lambda c: layer(c) @ jnp.array([5.0, 0.0, 0.0]))(jnp.array([1.0, 2.0, 3.0]))
      Array([-5., -0., -0.], dtype=float32)

    References:
      Bengio, Léonard, Courville. Estimating or Propagating Gradients Through Stochastic
      Neurons. 2013. Alesiani. Implicit Bilevel Optimization. AAAI 2023.
    """

    def fn(costs):
        check_float_tree("costs", costs)
        _check_same_structure(solver, costs, "identity")
        conv, consts = _convert(solver, costs)

        def solve(_, theta):
            c, k = theta
            return _cast_like(conv(c, k), c), None

        def backward(ybar, y, theta, aux):
            c, k = theta
            return (_cast_like(jax.tree_util.tree_map(jnp.negative, ybar), c),
                    zero_cotangent(k))

        return custom_solution(solve, backward, None, (costs, consts))[0]

    return fn


def perturbed(
    solver: Callable,
    *,
    noise: str = "gumbel",
    sigma: float = 1.0,
    num_samples: int = 100,
) -> Callable:
    r"""Perturbed optimiser (Berthet et al.) for a minimisation solver.

    With ``theta = -c`` the perturbed maximiser is
    ``y_sigma(theta) = E[argmax_y <theta + sigma eta, y>] = E[y(c - sigma eta)]``; its
    Jacobian is ``(1/sigma) E[y(theta + sigma eta) grad nu(eta)^T]`` with ``nu`` the negative
    log-density of the noise: ``grad nu(eta) = eta`` (standard Gaussian) or
    ``1 - exp(-eta)`` (standard Gumbel, per entry). The layer returns the Monte-Carlo mean of
    ``y(c - sigma eta_s)`` over ``S = num_samples`` draws and the backward pass

    .. math:: \bar c = -\frac{1}{\sigma S} \sum_s \langle \bar y, y(c - \sigma\eta_s)\rangle
              \nabla\nu(\eta_s).

    For one-hot argmin with Gumbel noise the mean is ``softmax(-c / sigma)`` in expectation.
    The estimate is unbiased; its standard error is about ``1/(sigma sqrt(S))`` per entry.

    Cost: ``S`` solver calls (``jax.vmap`` over the samples) and ``O(S)`` memory for the
    saved solutions and noise.

    Args:
      solver: ``solver(costs) -> solution``, pure JAX (vmapped over samples); ``costs`` any
        pytree of float arrays, ``solution`` any pytree. Closed-over arrays get zero gradient.
      noise: ``"gumbel"`` or ``"gaussian"``.
      sigma: noise scale ``> 0``.
      num_samples: ``S >= 1``.

    Returns:
      ``fn(costs, key) -> mean solution``, differentiable in ``costs``; ``key`` a PRNG key.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import onehot_argmin, perturbed
      >>> layer = perturbed(onehot_argmin, sigma=0.5, num_samples=1000)
      >>> y = layer(jnp.array([1.0, 2.0, 3.0]), jax.random.PRNGKey(0))

    References:
      Berthet, Blondel, Teboul, Cuturi, Vert, Bach. Learning with Differentiable Perturbed
      Optimizers. NeurIPS 2020.
    """
    if noise not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {noise!r}.")
    _check_positive("sigma", sigma)
    if not (isinstance(num_samples, int) and num_samples >= 1):
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}.")

    def sample(key, costs):
        leaves, treedef = jax.tree_util.tree_flatten(costs)
        keys = jax.random.split(key, len(leaves))
        draw = jax.random.gumbel if noise == "gumbel" else jax.random.normal
        eta = [
            draw(k, (num_samples,) + tuple(jnp.shape(c)), jnp.result_type(c))
            for k, c in zip(keys, leaves, strict=True)
        ]
        return jax.tree_util.tree_unflatten(treedef, eta)

    def grad_nu(eta):
        if noise == "gumbel":
            return jax.tree_util.tree_map(lambda e: -jnp.expm1(-e), eta)
        return eta

    def fn(costs, key):
        check_float_tree("costs", costs)
        _eval_solver(solver, costs)
        if not (hasattr(key, "shape") and (key.shape == (2,) or
                                           jnp.issubdtype(key.dtype, jax.dtypes.prng_key))):
            raise TypeError(f"key must be a PRNG key (jax.random.PRNGKey or key), got {key!r}.")
        conv, consts = _convert(solver, costs)
        eta = jax.lax.stop_gradient(sample(key, costs))

        def solve(_, theta):
            c, eta_, k = theta
            shifted = jax.tree_util.tree_map(lambda c_, e: c_ - sigma * e, c, eta_)
            sols = jax.vmap(lambda cs: conv(cs, k))(shifted)
            mean = jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0), sols)
            return mean, sols

        def backward(ybar, mean, theta, sols):
            c, eta_, k = theta
            weights = jax.vmap(lambda s: _tree_dot(ybar, s))(sols)  # <ybar, y_s>, shape (S,)
            cbar = jax.tree_util.tree_map(
                lambda g: -jnp.tensordot(weights, g, axes=1) / (sigma * num_samples),
                grad_nu(eta_),
            )
            eta_bar = jax.tree_util.tree_map(jnp.zeros_like, eta_)
            return _cast_like(cbar, c), eta_bar, zero_cotangent(k)

        return custom_solution(solve, backward, None, (costs, eta, consts))[0]

    return fn


def interpolated(solver: Callable, *, lambda_: float = 1.0) -> Callable:
    r"""Black-box differentiation by loss interpolation (Vlastelica/Pogančić et al.).

    Forward ``y = solver(c)``; backward one extra solve at the shifted costs
    ``c' = c + lambda_ ybar``:

    .. math:: \bar c = \frac{y(c') - y(c)}{\lambda},

    the gradient of a piecewise-linear interpolation of the loss (for a minimisation solver;
    ``lambda_`` trades informativeness against faithfulness).

    Args:
      solver: ``solver(costs) -> y`` with ``y`` shaped like ``costs``, pure JAX.
      lambda_: interpolation step ``> 0``.

    Returns:
      ``fn(costs) -> y``, differentiable in ``costs``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import interpolated, onehot_argmin
      >>> layer = interpolated(onehot_argmin, lambda_=1.0)
      >>> jax.grad(lambda c: layer(c) @ jnp.array([5.0, 0.0, 0.0]))(jnp.array([1.0, 2.0, 3.0]))
      Array([-1.,  1.,  0.], dtype=float32)

    References:
      Vlastelica, Paulus, Musil, Martius, Rolínek. Differentiation of Blackbox Combinatorial
      Solvers. ICLR 2020.
    """
    _check_positive("lambda_", lambda_)

    def fn(costs):
        check_float_tree("costs", costs)
        _check_same_structure(solver, costs, "interpolated")
        conv, consts = _convert(solver, costs)

        def solve(_, theta):
            c, k = theta
            return _cast_like(conv(c, k), c), None

        def backward(ybar, y, theta, aux):
            c, k = theta
            shifted = jax.tree_util.tree_map(lambda c_, b: c_ + lambda_ * b, c, ybar)
            y_shift = _cast_like(conv(shifted, k), c)
            cbar = jax.tree_util.tree_map(lambda a, b: (a - b) / lambda_, y_shift, y)
            return cbar, zero_cotangent(k)

        return custom_solution(solve, backward, None, (costs, consts))[0]

    return fn


def relaxed(*, regularizer: str = "entropy", temperature: float = 1.0) -> Callable:
    r"""Continuous relaxation of ``argmin_{y in simplex} <c, y>`` (the one-hot polytope).

    Adds a strongly convex regulariser to the LP over the probability simplex (last axis):

    * ``"entropy"``: ``argmin <c, y> + tau sum y log y = softmax(-c / tau)``;
    * ``"quadratic"``: ``argmin <c, y> + tau/2 ||y||^2 = sparsemax(-c / tau)``, the
      Euclidean projection of ``-c / tau`` onto the simplex (sparse).

    Both are closed forms differentiated exactly by autodiff: ``dy/dc`` is
    ``-(diag(p) - p p^T) / tau`` (entropy, ``p = y``) and ``-(diag(s) - s s^T / |s|) / tau``
    (quadratic, ``s`` the 0/1 indicator of the support; defined almost everywhere). As
    ``tau -> 0`` both tend to :func:`onehot_argmin`.

    Args:
      regularizer: ``"entropy"`` or ``"quadratic"``.
      temperature: ``tau > 0``.

    Returns:
      ``fn(costs) -> y`` for ``costs`` of shape ``(..., n)``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import relaxed
      >>> y = relaxed(regularizer="quadratic", temperature=1.0)(jnp.array([0.0, 0.2, 3.0]))

    References:
      Martins, Astudillo. From Softmax to Sparsemax. ICML 2016. Mandi, Guns. Interior Point
      Solving for LP-based prediction+optimisation. NeurIPS 2020.
    """
    if regularizer not in REGULARIZERS:
        raise ValueError(f"regularizer must be one of {REGULARIZERS}, got {regularizer!r}.")
    _check_positive("temperature", temperature)

    def fn(costs):
        costs = jnp.asarray(costs)
        check_float_tree("costs", costs)
        if costs.ndim < 1:
            raise ValueError("costs must have at least one axis (the choices), got a scalar.")
        scores = -costs / temperature
        if regularizer == "entropy":
            return jax.nn.softmax(scores, axis=-1)
        return _sparsemax(scores)

    return fn


def _sparsemax(scores):
    n = scores.shape[-1]
    srt = -jnp.sort(-scores, axis=-1)
    cumsum = jnp.cumsum(srt, axis=-1) - 1
    ks = jnp.arange(1, n + 1, dtype=scores.dtype)
    support = srt - cumsum / ks > 0
    k = jnp.sum(support, axis=-1, keepdims=True)
    tau = jnp.take_along_axis(cumsum, k.astype(jnp.int32) - 1, axis=-1) / k
    return jnp.maximum(scores - tau, 0)


# --------------------------------------------------------------------------------------------
# Two levels.


class DiscreteBilevel(NamedTuple):
    """A discrete bilevel program with linear costs, in the form used by :func:`bilevel`.

    Attributes:
      solver: ``solver(c_x, c_y) -> (x, y)``, an exact bilevel solver.
      follower: ``follower(c) -> y``, the follower's best response to an effective cost
        ``c = c_y + M x``.
      M: the coupling matrix of shape ``(n_y, n_x)``.
    """

    solver: Callable
    follower: Callable
    M: Array


def brute_force_bilevel(
    X: Array, Y: Array, leader_cost: Callable, follower_cost: Callable
) -> Callable:
    """Exact solver of a small discrete bilevel program by enumeration.

    Solves ``min_{x in X} F(x, y*(x), theta)`` with ``y*(x) in argmin_{y in Y} g(x, y, theta)``
    where ``X`` and ``Y`` are finite sets given as rows: for every leader choice the follower's
    best response is found, then the leader picks the best choice. Ties are broken towards the
    first row (the follower is neither optimistic nor pessimistic: it takes the lowest index).

    Cost: ``|X| |Y|`` evaluations of ``follower_cost`` and ``|X|`` of ``leader_cost``
    (vectorised with ``jax.vmap``); only for small instances.

    Args:
      X: leader choices, shape ``(K_x, n_x)``.
      Y: follower choices, shape ``(K_y, n_y)``.
      leader_cost: ``leader_cost(x, y, theta) -> scalar`` (``F``).
      follower_cost: ``follower_cost(x, y, theta) -> scalar`` (``g``).

    Returns:
      ``solve(theta) -> (x, y)``, pure JAX (piecewise constant in ``theta``; wrap it in an
      estimator to differentiate).

    Examples:
      >>> import jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import brute_force_bilevel
      >>> I = jnp.eye(3)
      >>> solve = brute_force_bilevel(I, I, lambda x, y, w: -w @ y,
      ...                             lambda x, y, w: (w + 100 * x) @ y)
      >>> x, y = solve(jnp.array([1.0, 2.0, 3.0]))  # block item 0, follower takes item 1
    """
    X, Y = jnp.asarray(X), jnp.asarray(Y)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(
            f"X and Y must be 2-D arrays of choices (one per row); got X with shape {X.shape} "
            f"and Y with shape {Y.shape}."
        )

    def solve(theta):
        def response(x):
            costs = jax.vmap(lambda y: follower_cost(x, y, theta))(Y)
            j = jnp.argmin(costs)
            return j, leader_cost(x, Y[j], theta)

        js, values = jax.vmap(response)(X)
        i = jnp.argmin(values)
        return X[i], Y[js[i]]

    return solve


def linear_bilevel(X: Array, Y: Array, M: Array, *, leader_weight: float = -1.0) -> DiscreteBilevel:
    """The linear-cost discrete bilevel program solved by enumeration.

    ``x* = argmin_{x in X} <c_x, x> + kappa <c_y, y*(x)>``,
    ``y*(x) = argmin_{y in Y} <c_y + M x, y>``, with ``kappa = leader_weight``
    (``-1``: the leader maximises the follower's cost, as in interdiction; ``+1``:
    cooperative).

    Args:
      X: leader choices, shape ``(K_x, n_x)``.
      Y: follower choices, shape ``(K_y, n_y)``.
      M: coupling, shape ``(n_y, n_x)``.
      leader_weight: ``kappa``.

    Returns:
      A :class:`DiscreteBilevel` for :func:`bilevel`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import linear_bilevel
      >>> prob = linear_bilevel(jnp.eye(3), jnp.eye(3), 100 * jnp.eye(3))
      >>> x, y = prob.solver(jnp.zeros(3), jnp.array([1.0, 2.0, 3.0]))
    """
    X, Y, M = jnp.asarray(X), jnp.asarray(Y), jnp.asarray(M)
    if X.ndim != 2 or Y.ndim != 2:
        raise ValueError(f"X and Y must be 2-D; got shapes {X.shape} and {Y.shape}.")
    if M.shape != (Y.shape[1], X.shape[1]):
        raise ValueError(
            f"M has shape {M.shape} but must be (n_y, n_x) = {(Y.shape[1], X.shape[1])}."
        )
    solve = brute_force_bilevel(
        X, Y,
        lambda x, y, c: c[0] @ x + leader_weight * (c[1] @ y),
        lambda x, y, c: (c[1] + M @ x) @ y,
    )

    def follower(c):
        return Y[jnp.argmin(Y @ c)]

    return DiscreteBilevel(lambda c_x, c_y: solve((c_x, c_y)), follower, M)


def interdiction(num_items: int, *, big: float = 100.0) -> DiscreteBilevel:
    """Tiny discrete interdiction: the leader blocks one item, the follower picks the cheapest.

    ``x`` and ``y`` are one-hot over ``num_items`` items, ``M = big * I`` makes a blocked item
    unattractive to the follower, and the leader maximises the follower's cost net of its own
    blocking cost: ``min_x <c_x, x> - <c_y, y*(x)>``, ``y*(x) = argmin_y <c_y + M x, y>``.
    With ``c_x = 0`` and item costs ``c_y = w`` (range below ``big``) the leader blocks the
    cheapest item and the follower takes the second cheapest.

    Args:
      num_items: ``n >= 2``.
      big: interdiction penalty ``> 0`` (larger than the spread of the item costs).

    Returns:
      A :class:`DiscreteBilevel`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import interdiction
      >>> prob = interdiction(4)
      >>> x, y = prob.solver(jnp.zeros(4), jnp.array([3.0, 1.0, 2.0, 5.0]))  # x = e1, y = e2
    """
    if not (isinstance(num_items, int) and num_items >= 2):
        raise ValueError(f"num_items must be an integer >= 2, got {num_items!r}.")
    _check_positive("big", big)
    eye = jnp.eye(num_items)
    return linear_bilevel(eye, eye, big * eye, leader_weight=-1.0)


def bilevel(
    problem: DiscreteBilevel,
    *,
    estimator: str = "identity",
    lambda_: float = 1.0,
    noise: str = "gumbel",
    sigma: float = 1.0,
    num_samples: int = 100,
) -> Callable:
    r"""A discrete bilevel layer ``(c_x, c_y) -> (x*, y*)`` with a gradient estimator.

    The follower sees the effective cost ``c_y + M x``, so ``ybar`` reaches ``c_x`` through
    ``x`` (the cross-level term; dropping it would turn the layer into two independent
    single-level layers). With ``cbar_eff`` the follower-level estimate for the effective
    cost, ``cbar_y = cbar_eff`` and the leader receives ``xbar + M^T cbar_eff``.

    * ``"identity"``: ``cbar_y = -ybar``, ``cbar_x = -(xbar - M^T ybar) = -xbar + M^T ybar``.
      No extra solver call.
    * ``"interpolated"``: per level, keeping the cross-level term: the follower is re-solved
      at ``c_y + M x + lambda_ ybar`` with ``x`` fixed, giving ``cbar_eff``; the whole
      bilevel program is re-solved at ``c_x + lambda_ (xbar + M^T cbar_eff)`` for
      ``cbar_x``. Two extra calls.
    * ``"perturbed"``: :func:`perturbed` applied to the whole map ``(c_x, c_y) -> (x, y)``
      (the cross-level dependence is in the re-solves); returns the Monte-Carlo mean and
      takes a ``key``. ``num_samples`` bilevel solves.

    Args:
      problem: a :class:`DiscreteBilevel` (:func:`linear_bilevel`, :func:`interdiction`, or
        user-built with an exact bilevel solver).
      estimator: ``"identity"``, ``"interpolated"`` or ``"perturbed"``.
      lambda_: step of ``"interpolated"``.
      noise: noise of ``"perturbed"``.
      sigma: scale of ``"perturbed"``.
      num_samples: samples of ``"perturbed"``.

    Returns:
      ``fn(c_x, c_y) -> (x, y)`` (``fn(c_x, c_y, key)`` for ``"perturbed"``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from bilevel_jax._src.discrete import bilevel, interdiction
      >>> layer = bilevel(interdiction(3), estimator="identity")
      >>> loss = lambda cx, cy: jnp.sum(layer(cx, cy)[1] * jnp.array([1.0, -1.0, 1.0]))
      >>> gx, gy = jax.grad(loss, argnums=(0, 1))(jnp.zeros(3), jnp.array([1.0, 2.0, 3.0]))

    References:
      Alesiani. Implicit Bilevel Optimization: Differentiating through Bilevel Optimization
      Programming. AAAI 2023.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}.")
    _check_positive("lambda_", lambda_)
    solver, follower, M = problem

    if estimator == "perturbed":
        layer = perturbed(lambda c: solver(c[0], c[1]), noise=noise, sigma=sigma,
                          num_samples=num_samples)
        return lambda c_x, c_y, key: layer((c_x, c_y), key)

    def fn(c_x, c_y):
        check_float_tree("c_x", c_x)
        check_float_tree("c_y", c_y)
        c_x, c_y = jnp.asarray(c_x), jnp.asarray(c_y)
        if c_x.ndim != 1 or c_y.ndim != 1 or M.shape != (c_y.shape[0], c_x.shape[0]):
            raise ValueError(
                f"c_x and c_y must be vectors with problem.M of shape (len(c_y), len(c_x)); "
                f"got c_x {c_x.shape}, c_y {c_y.shape} and M {M.shape}."
            )
        out = _eval_solver(lambda c: solver(*c), (c_x, c_y), "solver(c_x, c_y)")
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and out[0].shape == c_x.shape
                and out[1].shape == c_y.shape):
            raise ValueError(
                "solver(c_x, c_y) must return (x, y) shaped like (c_x, c_y); got "
                f"{jax.tree_util.tree_map(lambda a: a.shape, out)} for c_x {c_x.shape}, "
                f"c_y {c_y.shape}."
            )
        conv, consts = _convert(lambda c: solver(*c), (c_x, c_y))
        f_conv, f_consts = _convert(follower, c_y)
        Mc = jnp.asarray(M, c_y.dtype)

        def solve(_, theta):
            c, k, _ = theta
            x, y = conv(c, k)
            return (x.astype(c[0].dtype), y.astype(c[1].dtype)), None

        def backward(zbar, z, theta, aux):
            (cx, cy), k, fk = theta
            xbar, ybar = zbar
            x, y = z
            if estimator == "identity":
                cbar_eff = -ybar
            else:
                y_shift = f_conv(cy + Mc @ x + lambda_ * ybar, fk).astype(cy.dtype)
                cbar_eff = (y_shift - y) / lambda_
            xbar_total = xbar + Mc.T @ cbar_eff
            if estimator == "identity":
                cbar_x = -xbar_total
            else:
                x_shift = conv((cx + lambda_ * xbar_total, cy), k)[0].astype(cx.dtype)
                cbar_x = (x_shift - x) / lambda_
            return (cbar_x, cbar_eff), zero_cotangent(k), zero_cotangent(fk)

        return custom_solution(solve, backward, None, ((c_x, c_y), consts, f_consts))[0]

    return fn

