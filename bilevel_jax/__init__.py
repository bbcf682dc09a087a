"""bilevel_jax: bilevel optimization in JAX.

Lower-level solution maps that are pure functions (jit-compiled, vmap-batched, taking pytrees)
with reverse-mode hypergradients: exact implicit rules, first-order (Hessian-free) rules and
unrolling, for unconstrained, equality-, inequality-constrained and minimax lower levels, and
bilevel programs as differentiable layers. Import as ``import bilevel_jax as bj``; everything
public is listed in ``__all__`` (plus the submodule ``bj.discrete``). Do not import from
``bilevel_jax._src``: it may change without notice.
"""

from importlib.metadata import PackageNotFoundError, version

from bilevel_jax import algorithms as algorithms
from bilevel_jax import discrete as discrete
from bilevel_jax import problems as problems
from bilevel_jax._src.argmin import argmin as argmin
from bilevel_jax._src.bilevel_layer import BilevelSolution as BilevelSolution
from bilevel_jax._src.bilevel_layer import bilevel_layer as bilevel_layer
from bilevel_jax._src.minimax import SaddleInfo as SaddleInfo
from bilevel_jax._src.minimax import SaddleSolution as SaddleSolution
from bilevel_jax._src.minimax import duality_gap as duality_gap
from bilevel_jax._src.minimax import saddle_point as saddle_point
from bilevel_jax._src.penalty_minimax import KKTResiduals as KKTResiduals
from bilevel_jax._src.penalty_minimax import LagrangianMinimax as LagrangianMinimax
from bilevel_jax._src.penalty_minimax import LagrangianSolution as LagrangianSolution
from bilevel_jax._src.penalty_minimax import PenaltyMinimaxSolution as PenaltyMinimaxSolution
from bilevel_jax._src.penalty_minimax import bilevel_minimax_kkt as bilevel_minimax_kkt
from bilevel_jax._src.penalty_minimax import lagrangian_minimax as lagrangian_minimax
from bilevel_jax._src.penalty_minimax import penalty_bilevel_minimax as penalty_bilevel_minimax
from bilevel_jax._src.projections import Affine as Affine
from bilevel_jax._src.projections import Ball as Ball
from bilevel_jax._src.projections import Box as Box
from bilevel_jax._src.projections import Halfspace as Halfspace
from bilevel_jax._src.projections import NonNegative as NonNegative
from bilevel_jax._src.projections import Simplex as Simplex
from bilevel_jax._src.qp import QPSolution as QPSolution
from bilevel_jax._src.qp import solve_qp as solve_qp
from bilevel_jax._src.smoothing import linear_perturbation as linear_perturbation
from bilevel_jax._src.smoothing import perturb_linear as perturb_linear
from bilevel_jax._src.sparse_qp import solve_qp_sparse as solve_qp_sparse
from bilevel_jax._src.types import Info as Info
from bilevel_jax._src.types import Solution as Solution
from bilevel_jax._src.types import SolveError as SolveError
from bilevel_jax._src.types import Status as Status

try:
    __version__ = version("bilevel_jax")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "Affine",
    "Ball",
    "BilevelSolution",
    "Box",
    "Halfspace",
    "Info",
    "KKTResiduals",
    "LagrangianMinimax",
    "LagrangianSolution",
    "NonNegative",
    "PenaltyMinimaxSolution",
    "QPSolution",
    "SaddleInfo",
    "SaddleSolution",
    "Simplex",
    "Solution",
    "SolveError",
    "Status",
    "algorithms",
    "argmin",
    "bilevel_layer",
    "bilevel_minimax_kkt",
    "discrete",
    "duality_gap",
    "lagrangian_minimax",
    "linear_perturbation",
    "penalty_bilevel_minimax",
    "perturb_linear",
    "problems",
    "saddle_point",
    "solve_qp",
    "solve_qp_sparse",
]
