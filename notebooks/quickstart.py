# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     name: python3
# ---

# %% [markdown]
# # bilevel_jax quickstart
#
# Hypergradients of constrained lower levels, in three cells. Runs on Colab: the first cell
# installs the library. `BILEVEL_JAX_SIZE=small` (the default) keeps it fast; CI runs it so.

# %%
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("bilevel_jax") is None:  # on Colab
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "bilevel_jax"], check=True)

import jax
import jax.numpy as jnp
import optax

import bilevel_jax as bj

jax.config.update("jax_enable_x64", True)
SIZE = {"small": 20, "large": 200}[os.environ.get("BILEVEL_JAX_SIZE", "small")]

# %% [markdown]
# ## A nonnegative least-squares lower level
#
# `y*(theta) = argmin_{y >= 0} 1/2 ||X y - t||^2 + 1/2 exp(theta) ||y||^2`: the box
# constraint is handled matrix-free, and the implicit rule differentiates on the free set.

# %%
key = jax.random.PRNGKey(0)
X = jax.random.normal(key, (2 * SIZE, SIZE))
t = X @ jnp.where(jnp.arange(SIZE) < SIZE // 4, 1.0, -1.0)
X_val, t_val = X + 0.1, t


def inner(y, theta):
    return 0.5 * jnp.sum((X @ y - t) ** 2) + 0.5 * jnp.exp(theta) * y @ y


def outer(theta):
    sol = bj.argmin(inner, jnp.zeros(SIZE), theta, box=lambda theta: (0.0, jnp.inf))
    return 0.5 * jnp.mean((X_val @ sol.y - t_val) ** 2)


value_and_grad = jax.jit(jax.value_and_grad(outer))
theta, opt = 0.0, optax.adam(0.1)
state = opt.init(theta)
for step in range(50):
    loss, grad = value_and_grad(theta)
    updates, state = opt.update(grad, state)
    theta = optax.apply_updates(theta, updates)
print(f"validation loss {float(loss):.4f} at log-penalty {float(theta):.3f}")

# %% [markdown]
# ## Rules side by side
#
# The same hypergradient from the exact implicit rule, the first-order penalty rule
# (Kornowski et al.), and central finite differences, with general inequalities `G y <= h`.

# %%
G = jnp.ones((1, SIZE))


def outer_ineq(theta, rule):
    sol = bj.argmin(inner, jnp.zeros(SIZE), theta, ineq=lambda th: (G, jnp.ones(1)),
                    hypergrad=rule)
    return 0.5 * jnp.mean((X_val @ sol.y - t_val) ** 2)


for rule in ("implicit", "penalty"):
    print(rule, float(jax.grad(outer_ineq)(0.0, rule)))
eps = 1e-5
print("finite differences", float((outer_ineq(eps, "implicit") - outer_ineq(-eps, "implicit"))
                                  / (2 * eps)))
