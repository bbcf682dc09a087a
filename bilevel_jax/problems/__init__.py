"""Seed bilevel problems of the SIGD and F2CBA papers, with known answers where they exist.

Use as ``bj.problems.sigd_quadratic(16)``, ``bj.problems.kink()``,
``bj.problems.kornowski_l1(seed, dim_x, dim_y)``, ``bj.problems.coupled_benchmark(seed)``
(the coupled 50/50/10 quadratic benchmark) and ``bj.problems.toll_network(seed)`` (the network
toll attack problem).
"""

from bilevel_jax._src.problems import BilevelProblem as BilevelProblem
from bilevel_jax._src.problems import coupled_benchmark as coupled_benchmark
from bilevel_jax._src.problems import kink as kink
from bilevel_jax._src.problems import kornowski_l1 as kornowski_l1
from bilevel_jax._src.problems import sigd_quadratic as sigd_quadratic
from bilevel_jax._src.problems import toll_network as toll_network

__all__ = ["BilevelProblem", "coupled_benchmark", "kink", "kornowski_l1", "sigd_quadratic",
           "toll_network"]
