"""Test configuration: float64 everywhere, and a jit / no-jit fixture."""

import os

# Single-threaded BLAS/LAPACK (jaxlib's CPU linear algebra calls it): with pytest-xdist workers
# on a 2-core machine, spinning BLAS threads make each dense solve orders of magnitude slower.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

# A persistent compilation cache shared by the pytest workers and the subprocesses the tests
# start (notebooks, sharding, README): most of the suite's time is XLA compilation. Measured
# on tests/test_two_sided.py: 62 s with a cold cache, 20 s with a warm one. A clean CI
# checkout starts cold; repeated local runs start warm. Entries are keyed by the program,
# the flags and jax's version, so a code change never reuses a stale executable.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
                 "jax-compilation"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
# LLVM's optimisation level 0 for the compiled tests: the tests check results, not speed,
# and XLA:CPU spends most of a compilation in LLVM's passes. Measured on jax.jit(jax.grad(.))
# through solve_qp at n = 200: 8.0 s to compile at the default level, 4.2 s at 0 (the run
# itself 9 ms -> 15 ms). Floating-point semantics do not depend on it (no fast-math).
# Subprocesses the tests start inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_backend_optimization_level=0").strip()


# XLA:CPU's elemental emitter instead of its MLIR fusion emitters, where this jaxlib has the
# switch: with LLVM at level 0 the MLIR pipeline that every fused kernel goes through is most
# of what remains of a compilation. Measured on jax.jit(jax.grad(.)) through solve_qp at
# n = 200 (jaxlib 0.10.2): 3.5 s -> 1.3 s to compile, and the run 3.9 ms -> 2.5 ms. XLA
# aborts the process on a flag it does not know, so a newer jaxlib that dropped the switch is
# probed first, in a subprocess, once (the pytest workers and subprocesses inherit the result).
def _xla_knows(flag):
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " " + flag, JAX_PLATFORMS="cpu")
    probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True,
                          timeout=120).returncode == 0


_EMITTER = "--xla_cpu_use_fusion_emitters=false"
if os.environ.get("BILEVEL_JAX_TEST_EMITTER") is None:
    os.environ["BILEVEL_JAX_TEST_EMITTER"] = _EMITTER if _xla_knows(_EMITTER) else ""
if os.environ["BILEVEL_JAX_TEST_EMITTER"] and _EMITTER not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + _EMITTER

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)


@pytest.fixture(params=["jit", "eager"])
def maybe_jit(request):
    """Return ``jax.jit`` or the identity, so each test runs compiled and eagerly."""
    if request.param == "jit":
        return jax.jit
    return lambda fn: fn

# Property tests (tests/test_properties.py): deterministic examples, no deadline (the first
# example compiles), a fixed modest number of examples, no shrinking of failing seeds.
from hypothesis import HealthCheck, Phase, settings  # noqa: E402

settings.register_profile(
    "bilevel_ci", derandomize=True, deadline=None, max_examples=3, database=None,
    phases=(Phase.explicit, Phase.generate), suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("bilevel_ci")
