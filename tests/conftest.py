"""Test configuration: float64 everywhere, and a jit / no-jit fixture."""

import jax
import pytest

jax.config.update("jax_enable_x64", True)


@pytest.fixture(params=["jit", "eager"])
def maybe_jit(request):
    """Return ``jax.jit`` or the identity, so each test runs compiled and eagerly."""
    if request.param == "jit":
        return jax.jit
    return lambda fn: fn
