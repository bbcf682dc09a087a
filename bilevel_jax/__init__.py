"""bilevel_jax: bilevel optimization in JAX.

Lower-level solution maps that are pure functions (jit-compiled, vmap-batched, taking pytrees)
with reverse-mode hypergradients: exact implicit rules, first-order (Hessian-free) rules and
unrolling. Import as ``import bilevel_jax as bj``; everything public is listed in ``__all__``.
Do not import from ``bilevel_jax._src``: it may change without notice.
"""

from importlib.metadata import PackageNotFoundError, version

from bilevel_jax._src.argmin import argmin as argmin
from bilevel_jax._src.smoothing import perturb_linear as perturb_linear
from bilevel_jax._src.types import Info as Info
from bilevel_jax._src.types import Solution as Solution
from bilevel_jax._src.types import SolveError as SolveError
from bilevel_jax._src.types import Status as Status

try:
    __version__ = version("bilevel_jax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Info",
    "Solution",
    "SolveError",
    "Status",
    "argmin",
    "perturb_linear",
]
