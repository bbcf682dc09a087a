"""Upper-level algorithms for linearly constrained bilevel problems (SIGD and F2CBA papers).

Use as ``import bilevel_jax as bj`` then ``bj.algorithms.ssigd(problem)``, or
``from bilevel_jax import algorithms``. Each factory returns an :class:`Algorithm`, a
NamedTuple of pure functions ``(init, step, run, output)`` in the style of optax:

* :func:`ssigd`: [S]SIGD, smoothed implicit gradient descent (SIGD Algorithm 2), with an
  exact lower solve or SIGD Algorithm 3's projected-gradient steps (:func:`pgd_solution`);
* :func:`dsigd`: [D]SIGD with Armijo backtracking (SIGD Algorithm 1);
* :func:`f2cba`: the F2CBA penalty (Hessian-free) hypergradient inside the O2NC loop, or
  with any optax optimizer (the authors' Adam variant);
* :func:`zeroth_order`: O2NC with a two-point spherical value-difference estimator;
* :func:`equality_gd`: gradient descent with the finite-difference first-order oracle for
  linear equality constraints.

``init(x0, key) -> State``, ``step(state, *batch) -> (State, StepInfo)``,
``run(x0, key, num_steps) -> (x, history)`` (a ``lax.scan``; history is the stacked
:class:`StepInfo`), ``output(state) -> x``.
"""

from bilevel_jax._src.outer import Algorithm as Algorithm
from bilevel_jax._src.outer import O2NCState as O2NCState
from bilevel_jax._src.outer import State as State
from bilevel_jax._src.outer import StepInfo as StepInfo
from bilevel_jax._src.outer import dsigd as dsigd
from bilevel_jax._src.outer import equality_gd as equality_gd
from bilevel_jax._src.outer import f2cba as f2cba
from bilevel_jax._src.outer import pgd_solution as pgd_solution
from bilevel_jax._src.outer import ssigd as ssigd
from bilevel_jax._src.outer import zeroth_order as zeroth_order

__all__ = [
    "Algorithm",
    "O2NCState",
    "State",
    "StepInfo",
    "dsigd",
    "equality_gd",
    "f2cba",
    "pgd_solution",
    "ssigd",
    "zeroth_order",
]
