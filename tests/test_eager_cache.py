"""Repeated eager calls reuse the compilation (issue 11): no retrace with the same functions."""

import jax.numpy as jnp

import bilevel_jax as bj
from bilevel_jax._src import argmin as argmin_module
from bilevel_jax._src import minimax as minimax_module

X = jnp.arange(12.0).reshape(4, 3) / 10


def g(y, lam):
    return 0.5 * jnp.sum((X @ y - 1.0) ** 2) + 0.5 * lam * y @ y


def ineq(lam):
    return jnp.ones((1, 3)), jnp.array([0.1])


def f(u, v, t):
    return 0.5 * u @ u - 0.5 * v @ v + t * u @ v + u.sum()


def test_repeated_eager_argmin_does_not_recompile():
    for kwargs in ({}, {"ineq": ineq}):
        first = bj.argmin(g, jnp.zeros(3), 0.1, **kwargs)
        size = argmin_module._solve.compiled._cache_size()
        again = bj.argmin(g, jnp.zeros(3), 0.7, **kwargs)  # new values, same shapes
        assert argmin_module._solve.compiled._cache_size() == size
        assert not jnp.allclose(first.y, again.y)
        assert int(again.info.status) == bj.Status.SUCCESS


def test_repeated_eager_saddle_point_does_not_recompile():
    bj.saddle_point(f, jnp.zeros(2), jnp.zeros(2), 0.5)
    size = minimax_module._solve.compiled._cache_size()
    sol = bj.saddle_point(f, jnp.zeros(2), jnp.zeros(2), 0.25)
    assert minimax_module._solve.compiled._cache_size() == size
    assert int(sol.info.status) == bj.Status.SUCCESS
