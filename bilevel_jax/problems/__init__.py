"""Seed bilevel problems of the SIGD and F2CBA papers, with known answers where they exist.

Use as ``bj.problems.sigd_quadratic(16)``, ``bj.problems.kink()``,
``bj.problems.kornowski_l1(seed, dim_x, dim_y)``.
"""

from bilevel_jax._src.problems import BilevelProblem as BilevelProblem
from bilevel_jax._src.problems import kink as kink
from bilevel_jax._src.problems import kornowski_l1 as kornowski_l1
from bilevel_jax._src.problems import sigd_quadratic as sigd_quadratic

__all__ = ["BilevelProblem", "kink", "kornowski_l1", "sigd_quadratic"]
