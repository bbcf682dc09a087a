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
# # Learning many hyperparameters inside an optax loop
#
# One regularisation weight per feature (30 hyperparameters) for a logistic regression on
# scikit-learn's breast-cancer data, learned by Adam on the validation loss. Each step
# differentiates through the training problem with `bj.argmin`'s implicit rule: one solve
# and one linear solve per step, whatever the number of hyperparameters (finite differences
# would need two solves per hyperparameter).
#
# **Running it.** The first code cell installs `bilevel_jax` when it cannot be imported (on
# Colab) and does nothing otherwise. The package is not on PyPI yet, so the cell installs it
# from its git repository: set `REPO_URL` to the repository's address (the value in the cell
# is a placeholder), or install it yourself first, e.g. from a clone with
# `pip install -e ".[notebooks]"`. `BILEVEL_JAX_SIZE=small` runs fewer steps (the size the
# test suite uses). The data ship with scikit-learn: nothing is downloaded.

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
import numpy as np
import optax
from sklearn.datasets import load_breast_cancer

if "ipykernel" not in sys.modules:  # run as a script: draw figures off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

import bilevel_jax as bj

jax.config.update("jax_enable_x64", True)
SMALL = os.environ.get("BILEVEL_JAX_SIZE") == "small"
STEPS = 80 if SMALL else 300

# %% [markdown]
# ## Data
#
# 569 tumours, 30 standardised features, labels in {-1, +1}. A deliberately small training
# set (80 examples) makes regularisation matter; 160 examples for validation (the upper
# level), the rest for testing.

# %%
data = load_breast_cancer()
rng = np.random.default_rng(0)
perm = rng.permutation(len(data.target))
features = (data.data - data.data.mean(0)) / data.data.std(0)
labels = 2.0 * data.target - 1.0
splits = np.split(perm, [80, 240])
(X_tr, y_tr), (X_val, y_val), (X_te, y_te) = [
    (jnp.asarray(features[i]), jnp.asarray(labels[i])) for i in splits]
names = list(data.feature_names)
d = X_tr.shape[1]
print(f"train {len(y_tr)}, validation {len(y_val)}, test {len(y_te)}, features {d}")

# %% [markdown]
# ## The bilevel problem
#
# Lower level: `w*(theta) = argmin_w mean_i log(1 + exp(-y_i x_i'w - y_i b)) +
# 1/2 sum_j exp(theta_j) w_j^2 + 1/2 1e-4 b^2` (strongly convex, so `bj.argmin` uses Newton's
# method and the implicit rule solves one system with its Hessian). Upper level: the mean
# validation log-loss of `w*(theta)`. The weights are a pytree `(w, b)`.

# %%
def log_loss(params, X, y):
    w, b = params
    return jnp.mean(jax.nn.softplus(-y * (X @ w + b)))


def inner(params, theta):
    w, b = params
    return log_loss(params, X_tr, y_tr) + 0.5 * jnp.sum(jnp.exp(theta) * w**2) + 0.5e-4 * b**2


def fit(theta):
    return bj.argmin(inner, (jnp.zeros(d), jnp.zeros(())), theta)


def validation_loss(theta):
    sol = fit(theta)
    return log_loss(sol.y, X_val, y_val), sol.info.status


# %% [markdown]
# ## Hypergradient against finite differences
#
# Before training, check the hypergradient at a random `theta`: against central differences
# along a random direction and on three coordinates. The lower level is solved to about
# 1e-10, so the two should agree to about 1e-6 relative (the differences' own truncation and
# rounding error).

# %%
value_and_hypergrad = jax.jit(jax.value_and_grad(validation_loss, has_aux=True))
value = jax.jit(lambda theta: validation_loss(theta)[0])

theta0 = jnp.asarray(rng.normal(-1.0, 1.0, d))
(_, status), grad0 = value_and_hypergrad(theta0)
assert status == bj.Status.SUCCESS
direction = jnp.asarray(rng.normal(size=d))
eps = 1e-5
fd = (value(theta0 + eps * direction) - value(theta0 - eps * direction)) / (2 * eps)
print(f"directional derivative: hypergradient {float(grad0 @ direction): .10f}, "
      f"finite differences {float(fd): .10f}")
assert abs(float(grad0 @ direction - fd)) <= 1e-6 * abs(float(fd))
for j in (0, 7, 21):
    e = jnp.zeros(d).at[j].set(eps)
    fd_j = (value(theta0 + e) - value(theta0 - e)) / (2 * eps)
    print(f"d/dtheta_{j:<2} ({names[j]}): {float(grad0[j]): .3e} vs {float(fd_j): .3e}")
    assert abs(float(grad0[j] - fd_j)) <= 1e-6 * float(jnp.linalg.norm(grad0))

# %% [markdown]
# ## Training the 30 hyperparameters with Adam
#
# The whole loop is one `jax.lax.scan` under `jax.jit`, so it compiles once; each step is
# an ordinary optax update on the hypergradient.

# %%
opt = optax.adam(0.1)


@jax.jit
def train(theta):
    def step(carry, _):
        theta, state = carry
        (loss, status), grad = jax.value_and_grad(validation_loss, has_aux=True)(theta)
        updates, state = opt.update(grad, state)
        return (optax.apply_updates(theta, updates), state), (loss, status)

    (theta, _), (losses, statuses) = jax.lax.scan(step, (theta, opt.init(theta)), None,
                                                  length=STEPS)
    return theta, losses, statuses


theta_init = jnp.zeros(d)  # every penalty starts at exp(0) = 1
theta_learned, losses, statuses = train(theta_init)
assert bool(jnp.all(statuses == bj.Status.SUCCESS))
print(f"validation loss {float(losses[0]):.4f} -> {float(losses[-1]):.4f} in {STEPS} steps")

# %% [markdown]
# ## One shared penalty, for comparison
#
# The usual alternative tunes a single weight on a grid: here 60 values in one `jax.vmap`-ed
# call (the solver is a pure function, so the grid is one batched solve).

# %%
grid = jnp.linspace(-8.0, 4.0, 60)
grid_losses = jax.jit(jax.vmap(lambda s: validation_loss(jnp.full(d, s))[0]))(grid)
shared = float(grid[jnp.argmin(grid_losses)])


@jax.jit
def scores(theta):
    params = fit(theta).y
    accuracy = jnp.mean(jnp.sign(X_te @ params[0] + params[1]) == y_te)
    return log_loss(params, X_val, y_val), log_loss(params, X_te, y_te), accuracy


def evaluate(theta):
    return tuple(float(v) for v in scores(theta))


rows = {"all penalties = 1 (start)": evaluate(theta_init),
        f"shared penalty, best of grid (exp({shared:.2f}))": evaluate(jnp.full(d, shared)),
        "30 learned penalties": evaluate(theta_learned)}
print(f"{'':<42} {'val loss':>9} {'test loss':>9} {'test acc':>9}")
for name, (v, t, a) in rows.items():
    print(f"{name:<42} {v:9.4f} {t:9.4f} {a:9.3f}")
assert rows["30 learned penalties"][0] < rows["all penalties = 1 (start)"][0]

# %% [markdown]
# ## What was learned
#
# Left: the validation loss along training, with the best shared penalty as a reference
# line. Right: the learned penalty of each feature. A large penalty switches a feature off;
# a small one lets it through. With 30 hyperparameters and 160 validation examples the
# per-feature model can fit the validation set better than the test set: compare the test
# columns above before trusting it (more validation data, or a penalty on `theta`, helps).

# %%
order = np.argsort(np.asarray(theta_learned))
fig, ax = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1, 1.6]})
ax[0].plot(losses, label="30 learned penalties")
ax[0].axhline(float(jnp.min(grid_losses)), color="k", ls="--", label="best shared penalty")
ax[0].set(xlabel="Adam step", ylabel="validation log-loss", title="learning curve")
ax[0].legend()
ax[1].bar(range(d), np.exp(np.asarray(theta_learned))[order])
ax[1].axhline(np.exp(shared), color="k", ls="--", label="best shared penalty")
ax[1].set_yscale("log")
ax[1].set_xticks(range(d), [names[i] for i in order], rotation=90, fontsize=7)
ax[1].set(ylabel="learned penalty exp(theta_j)", title="per-feature penalties")
ax[1].legend()
fig.tight_layout()
plt.show()
