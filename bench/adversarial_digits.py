"""SIGD adversarial training at small scale: a stand-in for Khanduri et al. (ICML 2023).

The paper trains ResNet-18 on CIFAR-10/100 with a bilevel formulation of adversarial training
(their adversarial experiment). This script reproduces the *trends* on scikit-learn's digits (8x8
images, 1797 examples, pixels scaled to [0, 1]) with a small MLP, on one CPU core.

Setup (ours; the paper's schedule, lambda_a and step counts follow Fast-BAT and are not
published):

* Data: ``load_digits``, pixels / 16, a fixed 80/20 train/test split (split seed 0: 1438
  train, 359 test). The training seed changes the initialisation, the batches, the random
  starts and ``q``.
* Model: MLP 64-64-10 with ``tanh`` (smooth, so the lower level is twice differentiable),
  Adam (learning rate 3e-3, cosine decay to 0), batch 64, 40 epochs.
* Threat model: ``||y_i||_inf <= eps`` and ``x_i + y_i in [0, 1]`` (the lower level's box
  ``max(-eps, -x_i) <= y_i <= min(eps, 1 - x_i)``). ``eps = 0.1`` and ``0.2`` on [0, 1] pixels
  play the roles of 8/255 and 16/255: at ``eps = 0.1`` robust accuracy is high for the robust
  methods, at ``eps = 0.2`` it drops to about 35 % and clean training has none.

Methods:

* **clean** (ERM): cross-entropy on clean inputs.
* **AT** (Madry et al.): PGD-10 (sign steps of ``2.5 eps / 10``, uniform random start) on the
  cross-entropy, then the gradient of the loss at the perturbed input (no implicit term).
* **SSIGD** (the paper's method, SIGD Algorithm 2): per-example lower level
  ``g_i(y, w) = -CE(w; x_i + y) + lambda_a ||y||^2 + q_i^T y`` over the box, batched into one
  ``bj.argmin`` call on ``y`` of shape ``(batch, 64)`` (the box and the masked rule are
  separable), solved by 10 accelerated projected-gradient steps (``solver="gradient"``,
  ``max_iter=10``) from a uniform random start. The upper gradient is
  ``grad_w CE(w; x_i + y*) + Dy*^T grad_y CE``. ``q_i ~ N(0, sigma_q^2 I)`` is drawn **once
  per run** for every training example (the draw of ``bj.perturb_linear``) and kept fixed.
  Two implicit rules, both through ``bj.argmin``'s matrix-free masked box rule
  (docs ``lower/inequality.md``, 'Box constraints'; no new ``custom_vjp``):

  - ``"fastbat"`` (used for the sweep, the paper's Hessian-free rule): ``H ~ 2 lambda_a I``
    (the paper's ``H ~ lambda_a I`` with its ``lambda_a/2`` convention), i.e.
    ``Dy*^T v = (1/(2 lambda_a)) (d/dw grad_y CE)^T (m_free * v)``. It is obtained *exactly*
    from ``bj.argmin`` by differentiating the lower level linearised at the solution
    ``y_hat`` of the 10 steps (Fast-BAT's lower level): ``g_lin(y, w) = lambda_a ||y||^2 +
    q^T y - <grad_y CE(w; x + y_hat), y>``, Hessian ``2 lambda_a I``; argmin's masked CG
    converges in one iteration. The perturbation used is ``argmin g_lin``, i.e. one more
    projected step ``clip((grad_y CE - q) / (2 lambda_a))`` from ``y_hat`` (equal to
    ``y_hat`` once the lower level has converged).
  - ``"exact"``: argmin's exact masked rule on ``g`` itself, ``H_FF u_F = v_F`` by CG with
    Hessian-vector products. Exact when ``g`` is strongly convex on the free set (the test
    checks it against central differences). In training, however, the lower level gets 10
    steps, and at that point ``H_FF = 2 lambda_a I - (d^2 CE/dy^2)_FF`` is indefinite for
    some examples (5-13 % of the test examples at the trained model, lambda_a = 0.3; none
    once converged, a local minimum). The batch is one argmin call, so a single indefinite
    64x64 block spoils CG for the whole batch (it runs to its cap of 10 n iterations, which
    argmin does not expose, or returns garbage), and training breaks down, at
    ``lambda_a = 0.3`` and in some seeds at ``lambda_a = 1``: see the extra rows.

* **TRADES** (Zhang et al. 2019, the paper's second baseline): ``CE(w; x) + beta
  KL(p(x) || p(x + y))`` with ``y`` from PGD-10 on the KL term (sign steps of
  ``2.5 eps / 10`` from ``0.001 N(0, I)``), ``beta = 6``.

Per-example lower levels (:func:`per_example_exact_grad`): the recipe that keeps one bad
example from spoiling a batch-wide masked CG solve is ``jax.vmap`` over the examples of the
per-example loss and gradient (``params`` broadcast), dropping the examples whose gradient
is not finite; each example gets its own solve, CG and status.

* ``lambda_a = 0.3`` (``H ~ 0.6 I``): a coordinate saturates when ``|grad CE_j - q_j| >
  2 lambda_a eps``; smaller ``lambda_a`` makes the attack stronger (closer to PGD) and the
  lower level less convex.

**Scaling of sigma_q^2.** The paper's values ``sigma_q^2 in {2, 4, 6, 8, 10} x 1e-5`` (inputs
in [0, 1] but a ResNet, 3072 inputs and an unpublished ``lambda_a``) have no measurable effect
here (row "unscaled 1e-4"): what matters is ``q`` against the lower-level gradient
``2 lambda_a eps`` at which a coordinate saturates (0.06-0.12 here). We use
``sigma_q^2 = 1000 x {2, 4, 6, 8, 10} x 1e-5 = {0.02, ..., 0.1}`` (``sigma_q`` 0.14-0.32),
chosen so that the sweep spans a clean-accuracy gain and robust-accuracy loss of the
paper's order at the largest value; plus ``sigma_q = 0`` (plain SIGD, no smoothing).

Evaluation: SA = clean test accuracy; RA = accuracy under PGD-50-10 (50 sign steps of
``2.5 eps / 50``, 10 uniform random restarts; an example counts as robust only if every
restart fails), mean +- std over seeds (5 by default).

Usage: ``python bench/adversarial_digits.py [--small] [--seeds N] [--epochs E] [--eps 0.1 0.2]
[--out PATH] [--device cpu|gpu]``. ``--small`` (300 training examples, 2 epochs of batch 16
at learning rate 1e-2, 1 seed, eps = 0.2, PGD-10-1) trains in seconds, takes about a minute
with compilation, and saves nothing; the full run (about 13 CPU minutes on one core: 752 s
CPU, 21 min wall on a shared 2-core machine) saves the table to
``bench/results/adversarial_digits.txt`` and the plot to ``adversarial_digits.png``.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

import _device

if __name__ == "__main__":  # before JAX starts; bench/ is on sys.path when run as a script
    _device.select()  # (on the CPU: one pinned core, single-threaded kernels)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from bilevel_jax import linear_perturbation  # noqa: E402
from bilevel_jax._src.argmin import argmin  # noqa: E402

#: The paper's table (OpenReview version), SA / RA in %: setting -> method -> (SA, RA).
PAPER_SIGMAS = (2e-5, 4e-5, 6e-5, 8e-5, 1e-4)
PAPER = {
    "C100, 8/255": {"AT": (53.83, 27.36), "TRADES": (53.33, 28.44), 2e-5: (53.88, 27.43),
                    4e-5: (54.01, 28.22), 6e-5: (53.79, 28.12), 8e-5: (54.44, 27.14),
                    1e-4: (57.74, 25.22)},
    "C100, 16/255": {"AT": (42.06, 15.10), "TRADES": (42.19, 16.59), 2e-5: (44.06, 15.51),
                     4e-5: (45.66, 14.18), 6e-5: (46.57, 13.92), 8e-5: (47.11, 13.54),
                     1e-4: (47.46, 13.42)},
    "C10, 8/255": {"AT": (80.78, 50.71), "TRADES": (80.23, 51.17), 2e-5: (80.70, 50.78),
                   4e-5: (81.20, 51.15), 6e-5: (81.52, 50.59), 8e-5: (83.19, 49.83),
                   1e-4: (85.08, 47.83)},
    "C10, 16/255": {"AT": (70.31, 32.12), "TRADES": (70.22, 33.35), 2e-5: (71.43, 32.72),
                    4e-5: (72.79, 31.73), 6e-5: (73.50, 29.97), 8e-5: (73.98, 29.39),
                    1e-4: (75.31, 27.67)},
}
#: Our sigma_q^2 = SIGMA_SCALE x the paper's value (see the module docstring).
SIGMA_SCALE = 1000.0
LAMBDA_A = 0.3
SIZES = (64, 64, 10)
#: TRADES' trade-off (its CIFAR-10 setting, 1/lambda = 6).
TRADES_BETA = 6.0


# --------------------------------------------------------------------------------------------
# Data, model, attacks.


def load_data(split_seed=0, n_train=None, n_test=None, dtype=jnp.float32):
    """Digits with pixels in [0, 1]; a fixed 80/20 split. Returns ``(x, labels)`` pairs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64) / 16.0
    labels = digits.target.astype(np.int32)
    perm = np.random.default_rng(split_seed).permutation(len(labels))
    test, train = perm[: len(labels) // 5], perm[len(labels) // 5 :]
    train, test = train[:n_train], test[:n_test]
    return ((jnp.asarray(x[train], dtype), jnp.asarray(labels[train])),
            (jnp.asarray(x[test], dtype), jnp.asarray(labels[test])))


def init_mlp(key, sizes=SIZES, dtype=jnp.float32):
    """LeCun-normal weights, zero biases: a list of ``(W, b)``."""
    keys = jax.random.split(key, len(sizes) - 1)
    return [(jax.random.normal(k, (a, b), dtype) * a**-0.5, jnp.zeros((b,), dtype))
            for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)]


def logits_fn(params, x):
    for W, b in params[:-1]:
        x = jnp.tanh(x @ W + b)
    W, b = params[-1]
    return x @ W + b


def cross_entropy(params, x, labels):
    """Per-example cross-entropy, shape ``(batch,)``."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_fn(params, x), labels)


def box_bounds(x, eps):
    """``||y||_inf <= eps`` and ``x + y in [0, 1]``."""
    return jnp.maximum(-eps, -x), jnp.minimum(eps, 1 - x)


def random_start(key, x, eps):
    lo, hi = box_bounds(x, eps)
    return jnp.clip(jax.random.uniform(key, x.shape, x.dtype, -eps, eps), lo, hi)


def pgd_attack(params, x, labels, eps, steps, key):
    """L-inf PGD on the cross-entropy: sign steps of ``2.5 eps / steps``, random start."""
    lo, hi = box_bounds(x, eps)
    step_size = 2.5 * eps / steps
    grad = jax.grad(lambda y: jnp.sum(cross_entropy(params, x + y, labels)))

    def body(_, y):
        return jnp.clip(y + step_size * jnp.sign(grad(y)), lo, hi)

    return jax.lax.fori_loop(0, steps, body, random_start(key, x, eps))


def kl_attack(params, x, eps, steps, key):
    """TRADES' inner maximisation: L-inf PGD on ``KL(p(x) || p(x + y))``, sign steps of
    ``2.5 eps / steps`` from a small Gaussian start (``0.001 N(0, I)``, as in TRADES)."""
    lo, hi = box_bounds(x, eps)
    step_size = 2.5 * eps / steps
    p_clean = jax.nn.softmax(logits_fn(params, x))

    def kl(y):
        return jnp.sum(p_clean * (jnp.log(p_clean + 1e-12)
                                  - jax.nn.log_softmax(logits_fn(params, x + y))))

    grad = jax.grad(kl)

    def body(_, y):
        return jnp.clip(y + step_size * jnp.sign(grad(y)), lo, hi)

    y0 = jnp.clip(0.001 * jax.random.normal(key, x.shape, x.dtype), lo, hi)
    return jax.lax.fori_loop(0, steps, body, y0)


def trades_loss(params, x, labels, y, beta):
    """``mean CE(w; x) + beta mean KL(p(x) || p(x + y))`` (Zhang et al. 2019)."""
    log_clean = jax.nn.log_softmax(logits_fn(params, x))
    log_adv = jax.nn.log_softmax(logits_fn(params, x + y))
    kl = jnp.sum(jnp.exp(log_clean) * (log_clean - log_adv), axis=-1)
    return jnp.mean(cross_entropy(params, x, labels)) + beta * jnp.mean(kl)


def accuracy(params, x, labels):
    return jnp.mean(jnp.argmax(logits_fn(params, x), -1) == labels)


def robust_accuracy(params, x, labels, eps, key, steps=50, restarts=10):
    """Accuracy under PGD-``steps``-``restarts`` (robust only if every restart fails)."""

    def correct(k):
        y = pgd_attack(params, x, labels, eps, steps, k)
        return jnp.argmax(logits_fn(params, x + y), -1) == labels

    return jnp.mean(jnp.all(jax.lax.map(correct, jax.random.split(key, restarts)), 0))


# --------------------------------------------------------------------------------------------
# The SSIGD hyperobjective.


def lower_level(x, labels, q, *, lam):
    """``g_q(y, w) = sum_i [-CE(w; x_i + y_i) + lam ||y_i||^2 + q_i^T y_i]``, ``y`` (batch, 64)."""

    def g_q(y, params):
        return (-jnp.sum(cross_entropy(params, x + y, labels)) + lam * jnp.sum(y**2)
                + jnp.vdot(q, y))

    return g_q


def ssigd_objective(params, x, labels, q, y0, *, eps, lam, inner_steps, rule="fastbat",
                    tol=None):
    """Mean ``CE(w; x_i + y_i*(w))``, differentiable in ``params`` through ``bj.argmin``.

    Args:
      params: the MLP weights (the upper-level variable).
      x, labels: the batch.
      q: the linear perturbation for this batch, shape like ``x`` (zeros: no smoothing).
      y0: the lower-level start (no gradient).
      eps: the box radius.
      lam: ``lambda_a``.
      inner_steps: projected-gradient steps of the lower level (``max_iter``).
      rule: ``"fastbat"`` (``H ~ 2 lam I``) or ``"exact"`` (masked CG on the true ``H_FF``).
      tol: lower-level tolerance (argmin's default if None).

    Returns:
      ``(value, (y, info))``: ``y`` the perturbations used and the lower level's ``Info``.
    """
    g_q = lower_level(x, labels, q, lam=lam)
    lo, hi = box_bounds(x, eps)

    def box(_):
        return lo, hi

    if rule == "exact":
        sol = argmin(g_q, y0, params, box=box, solver="gradient", max_iter=inner_steps, tol=tol)
        y = sol.y
    elif rule == "fastbat":
        sol = argmin(g_q, y0, jax.lax.stop_gradient(params), box=box, solver="gradient",
                     max_iter=inner_steps, tol=tol)
        y_hat = jax.lax.stop_gradient(sol.y)
        # grad_y CE at y_hat depends on params; argmin hoists it (closure conversion), so its
        # cotangent u_F carries the mixed term (d/dw grad_y CE)^T u back to the weights.
        grad_ce = jax.grad(lambda y: jnp.sum(cross_entropy(params, x + y, labels)))(y_hat)

        def g_lin(y, _):
            return lam * jnp.sum(y**2) + jnp.vdot(q - grad_ce, y)

        y = argmin(g_lin, y_hat, params, box=box, solver="gradient", tol=tol).y
    else:
        raise ValueError(f"rule must be 'fastbat' or 'exact', got {rule!r}.")
    return jnp.mean(cross_entropy(params, x + y, labels)), (y, sol.info)


def per_example_exact_grad(params, x, labels, q, y0, *, eps, lam, inner_steps, tol=None):
    """The exact rule, one lower level per example: ``jax.vmap`` over examples (the recipe).

    One ``bj.argmin`` call on the whole batch couples the examples only through the solver:
    the box and the masked rule are separable, but one status, one CG (matrix-free on the
    whole ``(batch, 64)`` free set) and one NaN policy serve the batch, so a single example
    with an indefinite free Hessian (or a NaN) spoils every example's hypergradient. The
    recipe: ``jax.vmap`` a per-example loss ``CE(w; x_i + y_i*(w))`` and its gradient over
    the examples (``params`` broadcast, ``in_axes=None``). Each example then has its own
    lower-level solve, its own CG on its 64-dimensional free set and its own status; a failed
    example's gradient is NaN (the library's policy) and is dropped from the mean (the
    returned ``ok`` says which were kept). Under ``vmap`` the loops still run to the slowest
    example, so the cost is the batch-wide solve's.

    Returns:
      ``(value, grads, ok)``: the mean loss and mean gradient over the examples whose solve
      and hypergradient are finite, and the ``(batch,)`` mask of those examples.
    """

    def one(x_i, l_i, q_i, y0_i):
        def loss(p):
            value, (_, info) = ssigd_objective(p, x_i[None], l_i[None], q_i[None], y0_i[None],
                                               eps=eps, lam=lam, inner_steps=inner_steps,
                                               rule="exact", tol=tol)
            return value, info.status

        (value, status), grad = jax.value_and_grad(loss, has_aux=True)(params)
        return value, grad, status

    values, grads, _ = jax.vmap(one)(x, labels, q, y0)
    leaves = jax.tree_util.tree_leaves(grads)
    ok = jnp.isfinite(values) & jnp.all(jnp.stack(
        [jnp.all(jnp.isfinite(g.reshape(g.shape[0], -1)), axis=1) for g in leaves]), axis=0)
    n = jnp.maximum(jnp.sum(ok), 1)
    mean = jax.tree_util.tree_map(
        lambda g: jnp.sum(jnp.where(ok.reshape((-1,) + (1,) * (g.ndim - 1)), g, 0), 0) / n,
        grads)
    return jnp.sum(jnp.where(ok, values, 0)) / n, mean, ok


# --------------------------------------------------------------------------------------------
# Training and evaluation.


def make_loss(method, *, eps, lam=LAMBDA_A, inner_steps=10, rule="fastbat"):
    """``loss(params, x, labels, key, q) -> (value, lower-level steps)`` of a method."""
    if method not in ("erm", "at", "trades", "ssigd"):
        raise ValueError(f"method must be 'erm', 'at', 'trades' or 'ssigd', got {method!r}.")

    def loss(params, x, labels, key, q):
        none = jnp.zeros((), jnp.int32)
        if method == "erm":
            return jnp.mean(cross_entropy(params, x, labels)), none
        if method == "trades":
            y = kl_attack(jax.lax.stop_gradient(params), x, eps, inner_steps, key)
            return trades_loss(params, x, labels, y, TRADES_BETA), none
        if method == "at":
            y = pgd_attack(jax.lax.stop_gradient(params), x, labels, eps, inner_steps, key)
            return jnp.mean(cross_entropy(params, x + y, labels)), none
        value, (_, info) = ssigd_objective(params, x, labels, q, random_start(key, x, eps),
                                           eps=eps, lam=lam, inner_steps=inner_steps, rule=rule)
        return value, info.num_steps

    return loss


def train(method, train_data, key, sigma=0.0, *, eps, epochs, batch=64, lr=3e-3,
          lam=LAMBDA_A, inner_steps=10, rule="fastbat", sizes=SIZES):
    """Train one MLP; jit- and vmap-able over ``key`` and ``sigma`` (``sigma = sigma_q``).

    Returns:
      ``(params, losses, ll_steps)``, the last two of shape ``(epochs, steps_per_epoch)``.
    """
    x_all, labels_all = train_data
    n = x_all.shape[0]
    steps = n // batch
    k_init, k_loop, k_q = jax.random.split(key, 3)
    params = init_mlp(k_init, sizes, x_all.dtype)
    # q_i ~ N(0, sigma^2 I), one per training example, drawn once (bj.perturb_linear's draw).
    q_all = linear_perturbation(k_q, x_all, sigma)
    opt = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps))
    loss = make_loss(method, eps=eps, lam=lam, inner_steps=inner_steps, rule=rule)

    def step(carry, inputs):
        params, state = carry
        idx, k = inputs
        (value, ll_steps), grads = jax.value_and_grad(loss, has_aux=True)(
            params, x_all[idx], labels_all[idx], k, q_all[idx])
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), (value, ll_steps)

    def epoch(carry, k):
        k_perm, k_steps = jax.random.split(k)
        perm = jax.random.permutation(k_perm, n)[: steps * batch].reshape(steps, batch)
        return jax.lax.scan(step, carry, (perm, jax.random.split(k_steps, steps)))

    (params, _), (losses, ll_steps) = jax.lax.scan(
        epoch, (params, opt.init(params)), jax.random.split(k_loop, epochs))
    return params, losses, ll_steps


def evaluate(params, test_data, eps, key, *, steps=50, restarts=10):
    """``(SA, RA)`` on the test set."""
    x, labels = test_data
    return accuracy(params, x, labels), robust_accuracy(params, x, labels, eps, key, steps,
                                                        restarts)


def nonconvex_fraction(params, x, labels, q, *, eps, lam, inner_steps=10, key=None):
    """Fraction of examples whose lower level has an indefinite ``H_FF`` at its solution.

    Solves the lower level as in training, then forms each example's 64x64 Hessian of ``g_i``
    restricted to the free coordinates (``lo < y < hi``) and checks its smallest eigenvalue.
    """
    key = jax.random.PRNGKey(0) if key is None else key
    g_q = lower_level(x, labels, q, lam=lam)
    lo, hi = box_bounds(x, eps)
    y = argmin(g_q, random_start(key, x, eps), params, box=lambda _: (lo, hi),
               solver="gradient", max_iter=inner_steps).y

    def min_eig(xi, li, yi, qi, loi, hii):
        hess = jax.hessian(lower_level(xi[None], li[None], qi[None], lam=lam))(
            yi[None], params)[0, :, 0, :]
        free = ((yi > loi) & (yi < hii)).astype(hess.dtype)
        masked = free[:, None] * hess * free[None, :] + jnp.diag(1 - free) * 2 * lam
        return jnp.linalg.eigvalsh(masked)[0]

    eigs = jax.vmap(min_eig)(x, labels, y, q, lo, hi)
    return jnp.mean(eigs <= 0), jnp.median(eigs)


def rule_gap(params, x, labels, *, eps, lam, max_iter=2000):
    """Relative difference of the Fast-BAT (``H ~ 2 lam I``) and exact masked hypergradients.

    Both at the same lower-level solution (``q = 0``, solved with up to ``max_iter`` steps).
    Returns ``(relative difference, cosine, lower-level status)``.
    """
    y0 = random_start(jax.random.PRNGKey(0), x, eps)
    q = jnp.zeros_like(x)

    def grad(rule):
        g, (_, info) = jax.grad(
            lambda p: ssigd_objective(p, x, labels, q, y0, eps=eps, lam=lam,
                                      inner_steps=max_iter, rule=rule), has_aux=True)(params)
        return jnp.concatenate([a.ravel() for a in jax.tree_util.tree_leaves(g)]), info

    fast, info = grad("fastbat")
    exact, _ = grad("exact")
    diff = jnp.linalg.norm(fast - exact) / jnp.linalg.norm(exact)
    cosine = fast @ exact / (jnp.linalg.norm(fast) * jnp.linalg.norm(exact))
    return diff, cosine, info.status


# --------------------------------------------------------------------------------------------
# The experiment.


def run_config(method, train_data, test_data, keys, sigmas, *, eps, epochs, eval_steps,
               eval_restarts, **kw):
    """Train a (seeds x sigmas) grid with one vmapped compile; returns stats and timings."""

    def one(key, sigma):
        params, losses, ll_steps = train(method, train_data, key, sigma, eps=eps,
                                         epochs=epochs, **kw)
        return params, losses[-1].mean(), ll_steps.mean()

    grid = jax.jit(jax.vmap(jax.vmap(one, (None, 0)), (0, None)))
    t0 = time.perf_counter()
    compiled = grid.lower(keys, sigmas).compile()
    t1 = time.perf_counter()
    params, last_loss, ll_steps = jax.block_until_ready(compiled(keys, sigmas))
    t2 = time.perf_counter()
    ev = jax.jit(jax.vmap(jax.vmap(
        lambda p: evaluate(p, test_data, eps, jax.random.PRNGKey(1234), steps=eval_steps,
                           restarts=eval_restarts))))
    sa, ra = jax.block_until_ready(ev(params))
    t3 = time.perf_counter()
    return dict(params=params, sa=np.asarray(sa) * 100, ra=np.asarray(ra) * 100,
                loss=np.asarray(last_loss), ll_steps=np.asarray(ll_steps),
                compile_s=t1 - t0, run_s=t2 - t1, eval_s=t3 - t2)


def experiment(eps, train_data, test_data, *, seeds, epochs, eval_steps, eval_restarts,
               paper_sigmas=PAPER_SIGMAS, unscaled=True, extra=True, lam=LAMBDA_A, ssigd=True,
               **kw):
    """All methods at one ``eps``: a list of row dicts ``name, kind, paper, result``.

    ``kind`` is ``"clean"``, ``"AT"``, ``"sweep"`` (sigma_q = 0 and the scaled sigma_q^2),
    ``"unscaled"`` (the paper's 1e-4 as is) or ``"extra"`` (other rules / lambda_a);
    ``paper`` is the key of the paper's column to print beside it.
    """
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    dtype = train_data[0].dtype
    common = dict(eps=eps, epochs=epochs, eval_steps=eval_steps, eval_restarts=eval_restarts,
                  **kw)
    zero = jnp.zeros((1,), dtype)

    def row(name, kind, paper, result, sigma2=None):
        print(f"  eps = {eps:g}, {name} (all sigmas of a group): compile "
              f"{result['compile_s']:.0f} s, train {result['run_s']:.0f} s, eval "
              f"{result['eval_s']:.0f} s", file=sys.stderr, flush=True)
        return dict(name=name, kind=kind, paper=paper, sigma2=sigma2, **result)

    rows = [row("clean (ERM)", "clean", None,
                run_config("erm", train_data, test_data, keys, zero, **common)),
            row("AT (PGD-10)", "AT", "AT",
                run_config("at", train_data, test_data, keys, zero, **common)),
            row(f"TRADES (beta = {TRADES_BETA:g}, KL-PGD-10)", "TRADES", "TRADES",
                run_config("trades", train_data, test_data, keys, zero, **common))]
    if not ssigd:
        return rows
    # (sigma_q^2, kind, paper column): sigma_q = 0, the scaled sweep, the unscaled 1e-4.
    grid = [(0.0, "sweep", None)] + [(SIGMA_SCALE * p, "sweep", p) for p in paper_sigmas]
    if unscaled:
        grid.append((paper_sigmas[-1], "unscaled", None))
    sig = jnp.sqrt(jnp.asarray([s2 for s2, _, _ in grid], dtype))
    res = run_config("ssigd", train_data, test_data, keys, sig, lam=lam, **common)
    for j, (s2, kind, paper) in enumerate(grid):
        part = {k: (v[:, j] if isinstance(v, np.ndarray) and v.ndim == 2 else v)
                for k, v in res.items() if k != "params"}
        part["params"] = jax.tree_util.tree_map(lambda a, j=j: a[:, j], res["params"])
        if kind == "unscaled":
            name = f"SSIGD, sigma_q^2 = {s2:g} (the paper's value, unscaled)"
        elif paper is None:
            name = "SSIGD, sigma_q = 0 (no smoothing)"
        else:
            name = f"SSIGD, sigma_q^2 = {s2:.3g} (= {SIGMA_SCALE:g} x {paper:g})"
        rows.append(row(name, kind, paper, part, s2))
    if extra:
        for rule, lam_x in (("exact", lam), ("exact", 1.0), ("fastbat", 1.0)):
            res_x = run_config("ssigd", train_data, test_data, keys, zero, lam=lam_x,
                               rule=rule, **common)
            rows.append(row(f"SSIGD, sigma_q = 0, {rule} rule, lambda_a = {lam_x:g}", "extra",
                            None, res_x, 0.0))
    return rows


def _fmt(values):
    return f"{np.mean(values):.1f} +- {np.std(values):.1f}"


def format_table(results, header):
    """Markdown table: ours per eps beside the paper's CIFAR-10 and CIFAR-100 numbers."""
    eps_list = list(results)
    cols = ["method"]
    for eps in eps_list:
        cols += [f"SA eps={eps:g}", f"RA eps={eps:g}"]
    cols += [f"paper {s} SA / RA" for s in PAPER]
    cols += ["train loss", "LL steps", "compile s", "run s", "eval s"]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, first in enumerate(results[eps_list[0]]):
        cells = [first["name"]]
        for eps in eps_list:
            r = results[eps][i]
            cells += [_fmt(r["sa"]), _fmt(r["ra"])]
        for setting in PAPER:
            p = PAPER[setting].get(first["paper"])
            cells.append("-" if p is None else f"{p[0]:.2f} / {p[1]:.2f}")
        r = results[eps_list[-1]][i]
        cells += [f"{np.mean(r['loss']):.3f}", f"{np.mean(r['ll_steps']):.1f}",
                  f"{r['compile_s']:.1f}", f"{r['run_s']:.1f}", f"{r['eval_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def findings(results, tol=1.0):
    """Check the three claimed trends (see the module docstring); one line per eps."""
    out = []
    for eps, rows in results.items():
        by = {r["kind"]: r for r in rows if r["kind"] in ("clean", "AT")}
        at, clean = by["AT"], by["clean"]
        sweep = [r for r in rows if r["kind"] == "sweep"]
        small = sweep[1] if len(sweep) > 1 else sweep[0]  # the smallest sigma_q^2 > 0
        d_sa = np.mean(small["sa"]) - np.mean(at["sa"])
        d_ra = np.mean(small["ra"]) - np.mean(at["ra"])
        ok1 = abs(d_sa) <= tol and abs(d_ra) <= tol
        sa = [np.mean(r["sa"]) for r in sweep]
        ra = [np.mean(r["ra"]) for r in sweep]
        # noise: the standard error of a difference of two means over the seeds
        n = len(at["sa"])
        noise_sa = max(np.mean([np.std(r["sa"]) for r in sweep]) * np.sqrt(2 / n), 0.1)
        noise_ra = max(np.mean([np.std(r["ra"]) for r in sweep]) * np.sqrt(2 / n), 0.1)
        rises = sa[-1] - sa[0] > noise_sa and all(
            b >= a - noise_sa for a, b in zip(sa, sa[1:], strict=False))
        falls = ra[-1] - ra[0] < -noise_ra and all(b <= a + noise_ra
                                                   for a, b in zip(ra, ra[1:], strict=False))
        worst = min(np.mean(at["ra"]), *ra)
        ok3 = np.mean(clean["ra"]) < worst - 10
        sigmas = ", ".join(f"{r['sigma2']:.3g}" for r in sweep)
        out.append(
            f"eps = {eps:g}: (i) SSIGD at sigma_q^2 = {small['sigma2']:.3g} vs AT: SA "
            f"{d_sa:+.1f}, RA {d_ra:+.1f} points: {'holds' if ok1 else 'does NOT hold'} "
            f"(within {tol:g} point). (ii) sigma_q^2 = {sigmas}: SA "
            f"{' -> '.join(f'{v:.1f}' for v in sa)}: "
            f"{'rises' if rises else 'does NOT rise'} (monotone up to {noise_sa:.1f}); RA "
            f"{' -> '.join(f'{v:.1f}' for v in ra)}: {'falls' if falls else 'does NOT fall'} "
            f"(monotone up to {noise_ra:.1f}). (iii) clean RA {np.mean(clean['ra']):.1f} vs "
            f"AT and SSIGD >= {worst:.1f}: {'holds' if ok3 else 'does NOT hold'}.")
    return out


def plot(results, path):
    """SA (top) and RA (bottom) against sigma_q^2 per eps, AT and clean as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5 * len(results), 6.5), squeeze=False,
                             sharex=True)
    for col, (eps, rows) in enumerate(results.items()):
        by = {r["kind"]: r for r in rows if r["kind"] in ("clean", "AT")}
        sweep = [r for r in rows if r["kind"] == "sweep"]
        xs = np.asarray([r["sigma2"] for r in sweep])
        for row, (key, color) in enumerate((("sa", "tab:blue"), ("ra", "tab:red"))):
            ax = axes[row][col]
            mean = np.asarray([np.mean(r[key]) for r in sweep])
            std = np.asarray([np.std(r[key]) for r in sweep])
            ax.errorbar(xs, mean, std, marker="o", color=color, capsize=3, label="SSIGD")
            ax.axhline(np.mean(by["AT"][key]), color="k", ls="--", label="AT (PGD-10)")
            ax.axhspan(np.mean(by["AT"][key]) - 1, np.mean(by["AT"][key]) + 1, color="k",
                       alpha=0.08, label="AT +- 1 point")
            ax.set_ylabel(f"{key.upper()} (%)")
            ax.set_title(f"eps = {eps:g}: {key.upper()} (clean training: "
                         f"{np.mean(by['clean'][key]):.1f} %)", fontsize=9)
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel(f"sigma_q^2 (ours = {SIGMA_SCALE:g} x the paper's)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("SSIGD vs AT, digits MLP (mean +- std over seeds)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true",
                        help="seconds-long run: 300 examples, 2 epochs, 1 seed, PGD-10-1")
    parser.add_argument("--seeds", type=int, default=None, help="seeds (default 5; small 1)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default 40; small 2)")
    parser.add_argument("--eps", type=float, nargs="+", default=None,
                        help="L-inf budgets on [0, 1] pixels (default 0.1 0.2; small 0.2)")
    parser.add_argument("--out", default=None, help="table path (default "
                        "bench/results/adversarial_digits.txt; with --small: not saved)")
    parser.add_argument("--baselines-only", action="store_true",
                        help="only clean, AT and TRADES (saved as "
                        "adversarial_digits_baselines.txt, with a bar chart)")
    _device.add_option(parser)
    args = parser.parse_args(argv)
    if args.baselines_only:
        return baselines_only(args)
    small = args.small
    seeds = args.seeds or (1 if small else 5)
    epochs = args.epochs or (2 if small else 40)
    eps_list = args.eps or ([0.2] if small else [0.1, 0.2])
    eval_steps, eval_restarts = (10, 1) if small else (50, 10)
    batch, lr = (16, 1e-2) if small else (64, 3e-3)
    train_data, test_data = load_data(n_train=300 if small else None)

    t0, cpu0 = time.perf_counter(), time.process_time()
    results = {eps: experiment(eps, train_data, test_data, seeds=seeds, epochs=epochs,
                               eval_steps=eval_steps, eval_restarts=eval_restarts,
                               unscaled=not small, extra=not small, batch=batch, lr=lr)
               for eps in eps_list}
    for eps, rows in results.items():  # curvature of the lower level at the trained SSIGD model
        r = next(r for r in rows if r["kind"] == "sweep")
        curvature = jax.jit(functools.partial(nonconvex_fraction, eps=eps, lam=LAMBDA_A))
        frac, med = curvature(jax.tree_util.tree_map(lambda a: a[0], r["params"]), *test_data,
                              jnp.zeros_like(test_data[0]))
        r["nonconvex"] = (float(frac), float(med))
        r["rule_gap"] = {}
        for lam in (LAMBDA_A, 1.0, 10.0):
            gap = jax.jit(functools.partial(rule_gap, eps=eps, lam=lam))(
                jax.tree_util.tree_map(lambda a: a[0], r["params"]), test_data[0][:64],
                test_data[1][:64])
            r["rule_gap"][lam] = tuple(float(v) for v in gap)
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0

    header = (
        f"SIGD adversarial training stand-in: digits ({train_data[0].shape[0]} train / "
        f"{test_data[0].shape[0]} test, pixels in [0, 1]), MLP {'-'.join(map(str, SIZES))} tanh, "
        f"Adam {lr:g} cosine, batch {batch}, {epochs} epochs, {seeds} seed(s) (mean +- std); "
        f"lambda_a = {LAMBDA_A}, 10 PGD / projected-gradient lower-level steps; "
        f"RA under PGD-{eval_steps}-{eval_restarts}; our sigma_q^2 = {SIGMA_SCALE:g} x the "
        f"paper's column value. Device {jax.devices()[0].platform}"
        f"{', one pinned core' if jax.devices()[0].platform == 'cpu' else ''}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; compile s / run s (training of all "
        f"seeds and sigmas of a row group, vmapped) / eval s for the last eps (wall clock, on "
        f"a shared machine); total {total:.0f} s wall, {cpu:.0f} s CPU.")
    lines = [format_table(results, header), ""]
    lines += findings(results)
    for eps, rows in results.items():
        r = next(r for r in rows if r["kind"] == "sweep")
        lines.append(
            f"eps = {eps:g}: lower-level curvature at the trained SSIGD (sigma_q = 0) model, "
            f"test set, at the 10-step lower-level solution used in training: H_FF indefinite "
            f"for {100 * r['nonconvex'][0]:.0f} % of examples "
            f"(median smallest eigenvalue {r['nonconvex'][1]:.3f}; 2 lambda_a = "
            f"{2 * LAMBDA_A:g}). Fast-BAT vs exact masked hypergradient on 64 test examples "
            f"(same model, q = 0, lower level solved to 1e-5 or 2000 steps): " + "; ".join(
                f"lambda_a = {lam:g}: rel. difference {d:.2g}, cosine {c:.3f}, LL status "
                f"{int(st)}" for lam, (d, c, st) in r["rule_gap"].items()) + ".")
    text = "\n".join(lines)
    print(text)
    out = args.out
    if out is None and not small:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           "adversarial_digits.txt")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write(text + "\n")
        plot(results, os.path.splitext(out)[0] + ".png")
    return results


def baselines_only(args):
    """Clean, AT and TRADES at the full settings (cheap: no lower-level solves)."""
    seeds = args.seeds or (1 if args.small else 5)
    epochs = args.epochs or (2 if args.small else 40)
    eps_list = args.eps or ([0.2] if args.small else [0.1, 0.2])
    eval_steps, eval_restarts = (10, 1) if args.small else (50, 10)
    batch, lr = (16, 1e-2) if args.small else (64, 3e-3)
    train_data, test_data = load_data(n_train=300 if args.small else None)
    results = {eps: experiment(eps, train_data, test_data, seeds=seeds, epochs=epochs,
                               eval_steps=eval_steps, eval_restarts=eval_restarts,
                               unscaled=False, extra=False, ssigd=False, batch=batch, lr=lr)
               for eps in eps_list}
    header = (f"Baselines of the SIGD adversarial-training stand-in (digits, MLP "
              f"{'-'.join(map(str, SIZES))} tanh, Adam {lr:g} cosine, batch {batch}, {epochs} "
              f"epochs, {seeds} seed(s), RA under PGD-{eval_steps}-{eval_restarts}; same "
              "settings as bench/results/adversarial_digits.txt, whose SSIGD rows compare "
              f"with these). TRADES: beta = {TRADES_BETA:g}, KL-PGD-10. Device "
              f"{jax.devices()[0].platform}.")
    lines = [format_table(results, header), ""]
    for eps, rows in results.items():
        by = {r["kind"]: r for r in rows}
        at, tr = by["AT"], by["TRADES"]
        lines.append(
            f"eps = {eps:g}: TRADES - AT: SA {np.mean(tr['sa']) - np.mean(at['sa']):+.1f}, RA "
            f"{np.mean(tr['ra']) - np.mean(at['ra']):+.1f} points (paper, CIFAR: TRADES - AT "
            "SA -0.5 / -0.55 / +0.13 / -0.09, RA +1.08 / +0.46 / +1.49 / +1.23 at C100 8/255, "
            "C10 8/255, C100 16/255, C10 16/255).")
    text = "\n".join(lines)
    print(text)
    out = args.out
    if out is None and not args.small:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                           "adversarial_digits_baselines.txt")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write(text + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.5),
                                 squeeze=False)
        for ax, (eps, rows) in zip(axes[0], results.items(), strict=True):
            names = [r["name"].split(" (")[0] for r in rows]
            pos = np.arange(len(rows))
            ax.bar(pos - 0.2, [np.mean(r["sa"]) for r in rows], 0.4,
                   yerr=[np.std(r["sa"]) for r in rows], label="SA")
            ax.bar(pos + 0.2, [np.mean(r["ra"]) for r in rows], 0.4,
                   yerr=[np.std(r["ra"]) for r in rows], label="RA")
            ax.set_xticks(pos, names)
            ax.set_title(f"eps = {eps:g}")
            ax.set_ylabel("accuracy %")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.splitext(out)[0] + ".png", dpi=110)
    return results


if __name__ == "__main__":
    main()
