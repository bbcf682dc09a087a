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
# Learn a regularisation weight by gradient descent *through* a constrained solver: the
# hypergradient of a validation loss with respect to the hyperparameter, computed by
# `jax.grad` through `bj.argmin`.
#
# **Running it.** The first code cell installs `bilevel_jax` when it cannot be imported (on
# Colab) and does nothing otherwise. The package is not on PyPI yet, so the cell installs it
# from its git repository: set `REPO_URL` to the repository's address (the value in the cell
# is a placeholder), or install it yourself first, e.g. from a clone with
# `pip install -e ".[notebooks]"`. `BILEVEL_JAX_SIZE=small` runs a smaller problem (the size
# the test suite uses); the default size takes well under two minutes on a CPU.

# %%
REPO_URL = "https://github.com/<owner>/bilevel_jax"  # placeholder: the repository to install

import importlib.util
import subprocess
import sys

if importlib.util.find_spec("bilevel_jax") is None:  # e.g. on Colab
    if "<owner>" in REPO_URL:
        raise RuntimeError("bilevel_jax is not installed: set REPO_URL to its git repository.")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    f"bilevel_jax[notebooks] @ git+{REPO_URL}"], check=True)

# %%
import os

import jax
import jax.numpy as jnp
import matplotlib
import optax

if "ipykernel" not in sys.modules:  # run as a script: draw figures off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

import bilevel_jax as bj

jax.config.update("jax_enable_x64", True)
SMALL = os.environ.get("BILEVEL_JAX_SIZE") == "small"
SIZE, STEPS = (30, 60) if SMALL else (100, 150)

# %% [markdown]
# ## A nonnegative least-squares lower level
#
# The lower level fits nonnegative coefficients with a ridge penalty whose weight is
# `exp(theta)`:
#
# `y*(theta) = argmin_{y >= 0} 1/2 ||X y - t||^2 + 1/2 exp(theta) ||y||^2`.
#
# The upper level is the validation error of `y*(theta)`. The box `y >= 0` is handled
# matrix-free, and the implicit rule differentiates the optimality conditions on the
# coordinates that are not at their bound. Training and validation data come from the same
# sparse nonnegative model, with noise.

# %%
k_true, k_tr, k_val, k_noise = jax.random.split(jax.random.PRNGKey(0), 4)
y_true = jnp.where(jax.random.uniform(k_true, (SIZE,)) < 0.3, 1.0, 0.0)
X = jax.random.normal(k_tr, (SIZE, SIZE))
X_val = jax.random.normal(k_val, (2 * SIZE, SIZE))
t = X @ y_true + 1.5 * jax.random.normal(k_noise, (SIZE,))
t_val = X_val @ y_true


def inner(y, theta):
    return 0.5 * jnp.sum((X @ y - t) ** 2) + 0.5 * jnp.exp(theta) * y @ y


def solve(theta):
    return bj.argmin(inner, jnp.zeros(SIZE), theta, box=lambda theta: (0.0, jnp.inf))


def outer(theta):
    sol = solve(theta)
    return 0.5 * jnp.mean((X_val @ sol.y - t_val) ** 2), sol.info.status


value_and_grad = jax.jit(jax.value_and_grad(outer, has_aux=True))
theta, opt = jnp.asarray(-1.0), optax.adam(0.1)
state = opt.init(theta)
losses, thetas = [], []
for _ in range(STEPS):
    (loss, status), grad = value_and_grad(theta)
    assert status == bj.Status.SUCCESS, bj.Status(int(status))
    losses.append(float(loss))
    thetas.append(float(theta))
    updates, state = opt.update(grad, state)
    theta = optax.apply_updates(theta, updates)
print(f"validation loss {losses[0]:.4f} -> {losses[-1]:.4f}; "
      f"learned penalty exp(theta) = {float(jnp.exp(theta)):.3g}")

# %% [markdown]
# ## The learning curve, and where the learned hyperparameter sits
#
# Left: the validation loss along the Adam steps. Middle: the hyperparameter's path. Right:
# the validation loss over a grid of `theta` (one `jax.vmap`-ed call: the solver is a pure
# function) with the learned value marked. Gradient descent on the hypergradient should end
# at the bottom of that curve, without a grid search.

# %%
grid = jnp.linspace(-3.0, 7.0, 41)
grid_loss, _ = jax.jit(jax.vmap(outer))(grid)
best = float(grid[jnp.argmin(grid_loss)])

fig, ax = plt.subplots(1, 3, figsize=(13, 3.5))
ax[0].plot(losses)
ax[0].set(xlabel="Adam step", ylabel="validation loss", title="learning curve")
ax[1].plot(thetas)
ax[1].set(xlabel="Adam step", ylabel="theta (log-penalty)", title="hyperparameter")
ax[2].plot(grid, grid_loss, label="validation loss (grid)")
ax[2].axvline(float(theta), color="C3", ls="--", label="learned theta")
ax[2].set(xlabel="theta", ylabel="validation loss", title="grid check")
ax[2].legend()
fig.tight_layout()
plt.show()
print(f"learned theta {float(theta):.2f}, best grid point {best:.2f}")
assert losses[-1] < losses[0]
assert float(outer(theta)[0]) <= 1.01 * float(jnp.min(grid_loss))  # at the grid minimum

# %% [markdown]
# The learned coefficients against the true ones: the box keeps them nonnegative, and the
# penalty shrinks the noise-driven ones.

# %%
y_learned = solve(theta).y
fig, ax = plt.subplots(figsize=(8, 3))
ax.stem(y_true, linefmt="C0-", markerfmt="C0o", basefmt=" ", label="true")
ax.plot(y_learned, "C3x", label="y*(learned theta)")
ax.set(xlabel="coefficient", title="coefficients")
ax.legend()
plt.show()
assert bool(jnp.all(y_learned >= 0))

# %% [markdown]
# ## Rules side by side
#
# The same hypergradient from the exact implicit rule, the first-order penalty rule
# (Kornowski et al., Hessian-free, accurate to `O(alpha)`), and central finite differences,
# now with a general inequality `G y <= h` (the coefficients sum to at most `SIZE / 10`).
# The implicit rule should match the finite differences to many digits.

# %%
G = jnp.ones((1, SIZE))
h = jnp.full(1, SIZE / 10)


def outer_ineq(theta, rule):
    sol = bj.argmin(inner, jnp.zeros(SIZE), theta, ineq=lambda th: (G, h), hypergrad=rule)
    return 0.5 * jnp.mean((X_val @ sol.y - t_val) ** 2)


value_and_hypergrad = jax.jit(jax.value_and_grad(outer_ineq), static_argnums=1)
grads = {rule: float(value_and_hypergrad(0.0, rule)[1]) for rule in ("implicit", "penalty")}
eps = 1e-5  # the same compiled function gives the values for the central differences
fd = float((value_and_hypergrad(eps, "implicit")[0] - value_and_hypergrad(-eps, "implicit")[0])
           / (2 * eps))
for name, value in {**grads, "finite differences": fd}.items():
    print(f"{name:>20}: {value: .8f}")
assert abs(grads["implicit"] - fd) <= 1e-5 * abs(fd) + 1e-9
assert abs(grads["penalty"] - fd) <= 0.05 * abs(fd) + 1e-6
