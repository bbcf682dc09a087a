"""Gradient estimators for discrete (combinatorial) solvers, one or two levels (BiGrad).

Use as ``import bilevel_jax as bj`` then ``bj.discrete.identity(solver)``, or
``from bilevel_jax import discrete``. Each estimator is a function transformer that turns a
pure-JAX solver ``solver(costs) -> y`` (``y = argmin_{y in Y} <costs, y>``, piecewise constant
in ``costs``) into a layer with informative reverse-mode gradients:

* :func:`identity`: straight-through, ``cbar = -ybar``;
* :func:`perturbed`: Gaussian or Gumbel perturbed optimiser (Berthet et al.);
* :func:`interpolated`: black-box interpolation (Vlastelica et al.);
* :func:`relaxed`: entropy- or quadratic-regularised LP over the simplex;
* :func:`bilevel`: a two-level discrete layer (e.g. :func:`interdiction`) that keeps the
  cross-level term, solved exactly by :func:`brute_force_bilevel` / :func:`linear_bilevel`.
"""

from bilevel_jax._src.discrete import DiscreteBilevel as DiscreteBilevel
from bilevel_jax._src.discrete import bilevel as bilevel
from bilevel_jax._src.discrete import brute_force_bilevel as brute_force_bilevel
from bilevel_jax._src.discrete import identity as identity
from bilevel_jax._src.discrete import interdiction as interdiction
from bilevel_jax._src.discrete import interpolated as interpolated
from bilevel_jax._src.discrete import linear_bilevel as linear_bilevel
from bilevel_jax._src.discrete import onehot_argmin as onehot_argmin
from bilevel_jax._src.discrete import perturbed as perturbed
from bilevel_jax._src.discrete import relaxed as relaxed

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
