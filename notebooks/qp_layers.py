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
# # QP layers (OptNet-style) with `bj.solve_qp`
#
# `bj.solve_qp(Q, c, A, b, G, h)` solves the dense convex QP
# `min 1/2 y'Qy + c'y  s.t.  A y = b, G y <= h` and is reverse-mode differentiable with
# respect to **all six** arrays, exactly (the implicit function theorem on the KKT system of
# the active constraints). That makes it a layer: its data can be network outputs or learned
# parameters. This notebook checks the gradients against finite differences, learns the
# constraints of a layer from input/output pairs, and compares with qpax and cvxpylayers when
# they are installed.
#
# **Running it.** The first code cell installs `bilevel_jax` when it cannot be imported (on
# Colab) and does nothing otherwise. The package is not on PyPI yet, so the cell installs it
# from its git repository: set `REPO_URL` to the repository's address (the value in the cell
# is a placeholder), or install it yourself first, e.g. from a clone with
# `pip install -e ".[notebooks]"`. `BILEVEL_JAX_SIZE=small` trains for fewer steps (the size
# the test suite uses). The comparison cells need `pip install qpax cvxpylayers` and are
# skipped otherwise.

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
import time
import warnings

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

if "ipykernel" not in sys.modules:  # run as a script: draw figures off-screen
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

import bilevel_jax as bj

jax.config.update("jax_enable_x64", True)
SMALL = os.environ.get("BILEVEL_JAX_SIZE") == "small"
STEPS = 150 if SMALL else 500

# %% [markdown]
# ## Gradients with respect to all the data
#
# A random strictly convex QP with 10 variables, 2 equalities and 15 inequalities, and a
# scalar loss of its solution and multipliers. `jax.grad` with `argnums=(0, ..., 5)` gives
# the gradient with respect to `Q, c, A, b, G, h` at once. We compare the directional
# derivative along a random perturbation of all six arrays (symmetric for `Q`) with central
# differences: at a solution with strict complementarity (the generic case) the solution is
# differentiable and the two agree to the accuracy of the differences.

# %%
n, p, m = 10, 2, 15
rng = np.random.default_rng(0)
L = rng.normal(size=(n, n))
Q = jnp.asarray(L @ L.T / n + np.eye(n))
c = jnp.asarray(rng.normal(size=n))
A = jnp.asarray(rng.normal(size=(p, n)))
G = jnp.asarray(rng.normal(size=(m, n)))
y_feasible = rng.normal(scale=0.5, size=n)  # a strictly feasible point
b = A @ y_feasible
h = G @ y_feasible + jnp.asarray(rng.uniform(0.1, 1.0, m))
data = (Q, c, A, b, G, h)
weights = jnp.asarray(rng.normal(size=n))


def loss(Q, c, A, b, G, h):
    sol = bj.solve_qp(Q, c, A, b, G, h)
    return weights @ sol.y + jnp.sum(sol.lam**2) + jnp.sum(sol.nu), sol


grads_fn = jax.jit(jax.grad(loss, argnums=tuple(range(6)), has_aux=True))
value_fn = jax.jit(lambda *d: loss(*d)[0])
grads, sol = grads_fn(*data)
assert sol.info.status == bj.Status.SUCCESS, bj.Status(int(sol.info.status))
print(f"status {bj.Status(int(sol.info.status)).name}, {int(jnp.sum(sol.lam > 0))} of {m} "
      f"inequalities active")

direction = [jnp.asarray(rng.normal(size=x.shape)) for x in data]
direction[0] = (direction[0] + direction[0].T) / 2
eps = 1e-6
plus = value_fn(*[x + eps * v for x, v in zip(data, direction, strict=True)])
minus = value_fn(*[x - eps * v for x, v in zip(data, direction, strict=True)])
fd = float(plus - minus) / (2 * eps)
for name, g, v in zip("Q c A b G h".split(), grads, direction, strict=True):
    print(f"  d loss along d{name}: {float(jnp.vdot(g, v)): .6f}")
total = sum(float(jnp.vdot(g, v)) for g, v in zip(grads, direction, strict=True))
print(f"directional derivative: implicit {total:.8f}, central differences {fd:.8f}")
assert abs(total - fd) <= 1e-6 * (1 + abs(fd))

# %% [markdown]
# ## Learning a layer's constraints from data
#
# OptNet's classic demonstration, in two dimensions so that we can look at it: a hidden
# polytope `{y : G_true y <= h_true}`, and training pairs `(z, y)` with `y` the Euclidean
# projection of `z` onto it, i.e. the QP `min 1/2 ||y||^2 - z'y  s.t.  G_true y <= h_true`.
# The model is the same layer with `G` and `h` learned (started from a random polytope),
# trained with Adam on the squared error, batched with `jax.vmap`.

# %%
k = 6
angles = np.linspace(0, 2 * np.pi, k, endpoint=False) + 0.3
G_true = jnp.asarray(np.stack([np.cos(angles), np.sin(angles)], 1))
h_true = jnp.asarray(rng.uniform(0.6, 1.2, k))


def layer(params, z):
    return bj.solve_qp(jnp.eye(2), -z, G=params["G"], h=params["h"]).y


z_train = jnp.asarray(rng.normal(scale=1.5, size=(256, 2)))
y_train = jax.vmap(lambda z: layer({"G": G_true, "h": h_true}, z))(z_train)
params = {"G": jnp.asarray(rng.normal(size=(k, 2))), "h": jnp.ones(k)}
opt = optax.adam(0.03)


@jax.jit
def train(params):
    def step(carry, key):
        params, state = carry
        batch = jax.random.choice(key, len(z_train), (64,), replace=False)

        def mse(params):
            pred = jax.vmap(lambda z: layer(params, z))(z_train[batch])
            return jnp.mean(jnp.sum((pred - y_train[batch]) ** 2, -1))

        value, grad = jax.value_and_grad(mse)(params)
        updates, state = opt.update(grad, state)
        return (optax.apply_updates(params, updates), state), value

    keys = jax.random.split(jax.random.PRNGKey(1), STEPS)
    (params, _), losses = jax.lax.scan(step, (params, opt.init(params)), keys)
    return params, losses


learned, losses = train(params)
print(f"training loss {float(losses[0]):.4f} -> {float(losses[-1]):.2e}")
assert float(losses[-10:].mean()) < 0.1 * float(losses[:10].mean())

# %% [markdown]
# Left: the training loss. Right: the true polytope (black), the learned constraints (red
# lines `G_i y = h_i`) and the initial ones (grey). The learned lines that matter settle on the
# true edges; a learned constraint that no training point ever touches gets no gradient and
# stays where it is (it is inactive, so the layer does not depend on it).

# %%
def draw_lines(ax, G, h, **kw):
    s = np.linspace(-3, 3, 2)
    for g_i, h_i in zip(np.asarray(G), np.asarray(h), strict=True):
        normal = g_i / np.linalg.norm(g_i)
        point = normal * h_i / np.linalg.norm(g_i)
        tangent = np.array([-normal[1], normal[0]])
        ax.plot(*(point[:, None] + tangent[:, None] * s), **kw)


fig, ax = plt.subplots(1, 2, figsize=(12, 4.5))
ax[0].semilogy(losses)
ax[0].set(xlabel="Adam step", ylabel="mean squared error", title="training the QP layer")
corners = [np.linalg.solve(np.stack([G_true[i], G_true[(i + 1) % k]]),
                           np.array([h_true[i], h_true[(i + 1) % k]])) for i in range(k)]
corners = np.array(corners + corners[:1])
draw_lines(ax[1], params["G"], params["h"], color="0.7", lw=0.8)
draw_lines(ax[1], learned["G"], learned["h"], color="C3", lw=1.2)
ax[1].plot(corners[:, 0], corners[:, 1], "k-", lw=2.5, label="true polytope")
ax[1].scatter(*np.asarray(y_train).T, s=4, color="C0", label="training outputs y")
ax[1].set(xlim=(-2.5, 2.5), ylim=(-2.5, 2.5), aspect="equal",
          title="true (black), learned (red), initial (grey)")
ax[1].legend(loc="upper right", fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## Comparison with qpax and cvxpylayers (when installed)
#
# The same QP (inequalities and equalities) and the gradient of `weights'y` with respect to
# `c` and `h`, through each library: the solution, the gradient's relative difference from
# `bj.solve_qp`'s, and the time of a warm call (forward and backward). qpax differentiates a
# smoothed (relaxed) problem, so its gradient is close but not exact; cvxpylayers solves with
# SCS by default (moderate accuracy, not jittable). The cell skips any library that is missing.

# %%
def bj_loss(c, h):
    return weights @ bj.solve_qp(Q, c, A, b, G, h).y


def timed(fn, *args, reps=5):
    jax.block_until_ready(fn(*args))  # compile / warm up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return out, 1e3 * float(np.median(times))


def rel(a, ref):
    return float(jnp.linalg.norm(jnp.concatenate([jnp.ravel(x) for x in a]) -
                                 jnp.concatenate([jnp.ravel(x) for x in ref])) /
                 jnp.linalg.norm(jnp.concatenate([jnp.ravel(x) for x in ref])))


y_ref = bj.solve_qp(*data).y
grad_ref, ms = timed(jax.jit(jax.grad(bj_loss, argnums=(0, 1))), c, h)
rows = [("bilevel_jax solve_qp", 0.0, 0.0, ms)]

try:
    import qpax

    def qpax_loss(c, h):
        return weights @ qpax.solve_qp_primal(Q, c, A, b, G, h)

    y_qpax = qpax.solve_qp_primal(Q, c, A, b, G, h)
    grad_qpax, ms = timed(jax.jit(jax.grad(qpax_loss, argnums=(0, 1))), c, h)
    rows.append(("qpax solve_qp_primal", rel([y_qpax], [y_ref]), rel(grad_qpax, grad_ref), ms))
except ImportError:
    print("qpax is not installed: skipped (pip install qpax)")

try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import cvxpy as cp
        from cvxpylayers.jax import CvxpyLayer

    c_param, h_param = cp.Parameter(n), cp.Parameter(m)
    y_var = cp.Variable(n)
    chol = np.linalg.cholesky(np.asarray(Q))
    problem = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(chol.T @ y_var) + c_param @ y_var),
                         [np.asarray(A) @ y_var == np.asarray(b),
                          np.asarray(G) @ y_var <= h_param])
    cvx_layer = CvxpyLayer(problem, parameters=[c_param, h_param], variables=[y_var])

    def cvx_loss(c, h):
        return weights @ cvx_layer(c, h)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        y_cvx = cvx_layer(c, h)[0]
        grad_cvx, ms = timed(jax.grad(cvx_loss, argnums=(0, 1)), c, h, reps=3)
    rows.append(("cvxpylayers (SCS)", rel([y_cvx], [y_ref]), rel(grad_cvx, grad_ref), ms))
except ImportError:
    print("cvxpylayers is not installed: skipped (pip install cvxpylayers)")

print(f"{'':<22} {'y rel. diff':>12} {'grad rel. diff':>15} {'warm ms':>9}")
for name, dy, dg, ms in rows:
    print(f"{name:<22} {dy:12.1e} {dg:15.1e} {ms:9.2f}")

# %% [markdown]
# Reading the table: every library finds the same solution (differences at the level of the
# peers' solver tolerances). The gradient differences measure the peers' error, since
# `bj.solve_qp`'s gradient matched finite differences above; timings are of one small QP on
# this machine and say more about per-call overhead than about large problems (see
# `bench/qp_hypergrad.py` in the repository for a benchmark).

# %%
fig, ax = plt.subplots(figsize=(6, 3))
ax.barh([r[0] for r in rows], [r[3] for r in rows])
ax.set_xscale("log")
ax.set(xlabel="ms per forward + backward (warm)", title=f"one QP, n={n}, m={m}, p={p}")
fig.tight_layout()
plt.show()
