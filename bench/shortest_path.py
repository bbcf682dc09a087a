"""BiGrad, combinatorial: learned shortest paths on grids, one level and two (interdiction).

Small-scale stand-in for the combinatorial experiment of BiGrad (Alesiani, AAAI 2023): a
model maps features to the costs of a combinatorial problem solved exactly by dynamic
programming, and is trained end to end through the solver with the discrete gradient
estimators of ``bj.discrete``. The paper's data, sizes and numbers for this task are not
available to us, so the setup is ours (data in the style of the perturbed-optimiser and
predict-then-optimise literature):

* **Grid.** ``k x k`` vertex costs; a path goes from the top-left to the bottom-right cell
  moving right or down (a DAG); ``y`` is the 0/1 indicator of the visited cells and the path
  cost is ``<c, y>``. The solver is a dynamic program in JAX: row by row,
  ``D[i, j] = S_ij + cummin_l (D[i-1, l] - S_i,l-1)`` with ``S`` the row's prefix sums (one
  ``lax.cummin`` per row), then a ``lax.scan`` backtrack of ``2k - 2`` steps.
* **Data.** Features ``z ~ N(0, I_p)``, ``p = 5``; true costs
  ``c = ((B z / sqrt(p) + 3)^deg / 3.5^deg + 1) * u`` with ``B`` a fixed random 0/1 matrix,
  ``deg = 4`` (nonlinear) and multiplicative noise ``u ~ U[0.9, 1.1]``. Labels: the optimal
  path ``y(c)`` (and, for the two-level task, the interdiction). 1000 training and 1000 test
  instances.
* **Model.** Linear ``c_hat = W z + b`` (misspecified: the true map is a degree-4
  polynomial), Adam (learning rate 0.05 with cosine decay), batch 32.
* **Metrics.** Path accuracy (predicted path equals the label), normalised regret
  ``(<c, y(c_hat)> - <c, y(c)>) / <c, y(c)>`` on the true costs, mean over the test set;
  mean +- std over 3 seeds (initialisation and batches).

**Single level** (``k = 8``): the loss is the squared error ``||y_hat - y||^2`` (Hamming for
0/1 paths) for every estimator: ``identity`` (straight-through, ``c_bar = -y_bar``),
``interpolated`` (``lambda_ = 5``), ``perturbed`` (Gaussian, ``sigma = 0.5``, 20 samples;
the layer's output is the mean path); beside them, "two-stage": least squares on the true
costs, no solver in training. ``bj.discrete.relaxed`` is the regularised LP over the simplex
(one-hot choices), not over the path polytope, so it does not apply to this task.

**Two levels: shortest-path interdiction** (``k = 5``): the leader (interdictor) chooses one
interior cell ``x`` (one-hot over the ``k^2`` cells, ``k^2 - 2`` choices) and raises its
cost by ``delta = 2``; the follower takes the shortest path for ``c_y + M x``, ``M = delta I``;
the leader minimises ``<c_x, x> - <c_y + M x, y*(x)>`` (it pays an interdiction cost ``c_x``
per cell and gains the follower's cost). The exact bilevel solver enumerates the leader's
choices, each with a DP solve. Both ``c_x`` and ``c_y`` come from features (independent
``B``, ``c_x`` scaled to ``[0.3, 1.3]``-ish), the model predicts both, the label is
``(x*, y*)`` of the true costs and the loss ``||x_hat - x*||^2 + ||y_hat - y*||^2``. Compared:

* **single-level**: two independent single-level layers on the same model,
  ``x_hat = onehot_argmin(c_x)`` over the interior cells and ``y_hat = path(c_y)`` (the
  structure of the interaction is not in the layer), identity estimator;
* **two-level (``bj.discrete.bilevel``)** with the ``identity``, ``interpolated`` and
  ``perturbed`` estimators, which keep the cross-level term (``y_bar`` reaches ``c_x`` through
  ``M``);
* **two-level without the cross-level term**: the same exact forward solver, but the
  backward pass given ``M = 0`` (an ablation of BiGrad's cross term).

Metrics: accuracy of ``x`` and of ``y`` and leader regret: the true leader objective at
``x_hat`` (with the follower's true best response) minus that at ``x*``, over ``|F(x*)|``.

Usage: ``python bench/shortest_path.py [--small] [--seeds N] [--epochs E] [--device cpu|gpu]``;
the full run saves ``bench/results/shortest_path.txt`` and ``shortest_path.png``.
"""

from __future__ import annotations

import argparse
import os
import time

import _device

if __name__ == "__main__":  # before JAX starts; bench/ is on sys.path when run as a script
    _device.select()  # (on the CPU: one pinned core, single-threaded kernels)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import bilevel_jax as bj  # noqa: E402

P_FEATURES, DEG, NOISE = 5, 4, 0.1
DELTA = 2.0
LR = 0.05


# --------------------------------------------------------------------------------------------
# The DP solver.


def shortest_path(costs):
    """Indicator of the cheapest right/down path from the top-left to the bottom-right cell.

    ``costs`` has shape ``(k, k)`` (any signs: the graph is acyclic). Ties go to the left
    predecessor.
    """
    k = costs.shape[0]

    def row(prev, c):
        s = jnp.cumsum(c)
        d = s + jax.lax.cummin(prev - (s - c))
        return d, d

    d0 = jnp.cumsum(costs[0])
    _, rest = jax.lax.scan(row, d0, costs[1:])
    dist = jnp.concatenate([d0[None], rest])
    inf = jnp.asarray(jnp.inf, costs.dtype)

    def back(carry, _):
        i, j, y = carry
        y = y.at[i, j].set(1)
        up = jnp.where(i > 0, dist[jnp.maximum(i - 1, 0), j], inf)
        left = jnp.where(j > 0, dist[i, jnp.maximum(j - 1, 0)], inf)
        go_up = up < left
        return (jnp.where(go_up, i - 1, i), jnp.where(go_up, j, j - 1), y), None

    y0 = jnp.zeros_like(costs)
    (_, _, y), _ = jax.lax.scan(back, (k - 1, k - 1, y0), None, length=2 * k - 2)
    return y.at[0, 0].set(1)


def path_solver(k):
    """The solver on flat costs of length ``k^2`` (the ``bj.discrete`` convention)."""
    return lambda c: shortest_path(c.reshape(k, k)).reshape(-1)


def all_paths(k):
    """Every right/down path as a 0/1 row of length ``k^2`` (for tests; ``C(2k-2, k-1)``)."""
    import itertools

    rows = []
    for downs in itertools.combinations(range(2 * k - 2), k - 1):
        y = np.zeros((k, k))
        i = j = 0
        y[0, 0] = 1
        for step in range(2 * k - 2):
            if step in downs:
                i += 1
            else:
                j += 1
            y[i, j] = 1
        rows.append(y.reshape(-1))
    return np.array(rows)


def interior_cells(k):
    return np.array([c for c in range(k * k) if c not in (0, k * k - 1)])


def interdiction_problem(k, delta=DELTA):
    """The exact shortest-path interdiction program as a ``bj.discrete.DiscreteBilevel``.

    ``x*`` minimises ``<c_x, x> - <c_y + M x, y*(x)>`` over one-hot interior cells,
    ``y*(x) = path(c_y + M x)``, ``M = delta I``.
    """
    n = k * k
    X = jnp.asarray(np.eye(n)[interior_cells(k)])
    M = delta * jnp.eye(n)
    follower = path_solver(k)

    def solver(c_x, c_y):
        def value(x):
            eff = c_y + M @ x
            y = follower(eff)
            return c_x @ x - eff @ y, y

        values, ys = jax.vmap(value)(X.astype(c_y.dtype))
        i = jnp.argmin(values)
        return X[i].astype(c_x.dtype), ys[i]

    return bj.discrete.DiscreteBilevel(solver, follower, M)


# --------------------------------------------------------------------------------------------
# Data and model.


def make_maps(key, k, two_level):
    kb, kx = jax.random.split(key)
    maps = {"B": jax.random.bernoulli(kb, 0.5, (k * k, P_FEATURES)).astype(jnp.float64)}
    if two_level:
        maps["Bx"] = jax.random.bernoulli(kx, 0.5, (k * k, P_FEATURES)).astype(jnp.float64)
    return maps


def true_costs(maps, z, key, name="B", scale=1.0, offset=1.0):
    """The true costs; ``key=None`` gives their noise-free mean (the oracle's prediction)."""
    lin = z @ maps[name].T / np.sqrt(P_FEATURES) + 3.0
    noise = 1.0 if key is None else jax.random.uniform(key, lin.shape, minval=1 - NOISE,
                                                       maxval=1 + NOISE)
    return scale * (lin**DEG / 3.5**DEG + offset) * noise


def make_data(key, n, k, maps, two_level=False):
    kz, kc, kx = jax.random.split(key, 3)
    z = jax.random.normal(kz, (n, P_FEATURES))
    c_y = true_costs(maps, z, kc)
    data = {"z": z, "c_y": c_y}
    if two_level:
        c_x = true_costs(maps, z, kx, "Bx", scale=0.5, offset=0.6)
        x, y = jax.vmap(interdiction_problem(k).solver)(c_x, c_y)
        data.update(c_x=c_x, x=x, y=y)
    else:
        data["y"] = jax.vmap(path_solver(k))(c_y)
    return data


def init_model(key, k, two_level):
    n = k * k
    k1, k2 = jax.random.split(key)
    params = {"W": 0.1 * jax.random.normal(k1, (n, P_FEATURES)), "b": jnp.ones(n)}
    if two_level:
        params["Wx"] = 0.1 * jax.random.normal(k2, (n, P_FEATURES))
        params["bx"] = jnp.ones(n)
    return params


def predict(params, z):
    if params.get("W") is None:  # the oracle: the noise-free true costs, given
        return {k: v for k, v in params.items() if k != "W"}
    out = {"c_y": z @ params["W"].T + params["b"]}
    if "Wx" in params:
        out["c_x"] = z @ params["Wx"].T + params["bx"]
    return out


# --------------------------------------------------------------------------------------------
# Single level.

SINGLE_METHODS = ("two-stage", "identity", "interpolated", "perturbed")


def single_layer(method, k):
    solver = path_solver(k)
    if method == "identity":
        layer = bj.discrete.identity(solver)
        return lambda c, key: layer(c)
    if method == "interpolated":
        layer = bj.discrete.interpolated(solver, lambda_=5.0)
        return lambda c, key: layer(c)
    if method == "perturbed":
        return bj.discrete.perturbed(solver, noise="gaussian", sigma=0.5, num_samples=20)
    raise ValueError(method)


def single_loss(method, k):
    if method == "two-stage":
        return lambda params, batch, key: jnp.mean(
            (predict(params, batch["z"])["c_y"] - batch["c_y"]) ** 2)
    layer = single_layer(method, k)

    def loss(params, batch, key):
        c = predict(params, batch["z"])["c_y"]
        keys = jax.random.split(key, c.shape[0])
        y = jax.vmap(layer)(c, keys)
        return jnp.mean(jnp.sum((y - batch["y"]) ** 2, axis=-1))

    return loss


def single_metrics(params, data, k):
    c_hat = predict(params, data["z"])["c_y"]
    y_hat = jax.vmap(path_solver(k))(c_hat)
    best = jnp.sum(data["c_y"] * data["y"], -1)
    got = jnp.sum(data["c_y"] * y_hat, -1)
    acc = jnp.mean(jnp.all(y_hat == data["y"], axis=-1))
    return jnp.stack([acc, jnp.mean((got - best) / best)])


# --------------------------------------------------------------------------------------------
# Two levels.

TWO_METHODS = ("single-level", "two-level identity", "two-level interpolated",
               "two-level perturbed", "two-level, no cross term")


def two_layer(method, k):
    prob = interdiction_problem(k)
    if method == "single-level":
        inner = interior_cells(k)
        mask = jnp.zeros(k * k).at[inner].set(1.0)

        def pick(c):  # one-hot argmin over the interior cells
            return bj.discrete.onehot_argmin(jnp.where(mask > 0, c, jnp.inf))

        lx, ly = bj.discrete.identity(pick), bj.discrete.identity(path_solver(k))
        return lambda c_x, c_y, key: (lx(c_x), ly(c_y))
    if method == "two-level, no cross term":
        blind = bj.discrete.DiscreteBilevel(prob.solver, prob.follower, 0.0 * prob.M)
        layer = bj.discrete.bilevel(blind, estimator="identity")
        return lambda c_x, c_y, key: layer(c_x, c_y)
    estimator = method.split()[-1]
    if estimator == "perturbed":
        layer = bj.discrete.bilevel(prob, estimator="perturbed", noise="gaussian", sigma=0.5,
                                    num_samples=10)
        return layer
    layer = bj.discrete.bilevel(prob, estimator=estimator, lambda_=5.0)
    return lambda c_x, c_y, key: layer(c_x, c_y)


def two_loss(method, k):
    layer = two_layer(method, k)

    def loss(params, batch, key):
        c = predict(params, batch["z"])
        keys = jax.random.split(key, batch["z"].shape[0])
        x, y = jax.vmap(layer)(c["c_x"], c["c_y"], keys)
        return jnp.mean(jnp.sum((x - batch["x"]) ** 2, -1) + jnp.sum((y - batch["y"]) ** 2, -1))

    return loss


def leader_value(c_x, c_y, x, k):
    """The true leader objective at ``x`` with the follower's best response to the truth."""
    eff = c_y + DELTA * x
    return c_x @ x - eff @ path_solver(k)(eff)


def two_metrics(params, data, k, method):
    c = predict(params, data["z"])
    layer = two_layer(method, k)
    keys = jax.random.split(jax.random.PRNGKey(0), data["z"].shape[0])
    if method == "two-level perturbed":  # evaluate the exact solver (no noise) at c_hat
        x_hat, y_hat = jax.vmap(interdiction_problem(k).solver)(c["c_x"], c["c_y"])
    else:
        x_hat, y_hat = jax.vmap(layer)(c["c_x"], c["c_y"], keys)
    acc_x = jnp.mean(jnp.all(x_hat == data["x"], -1))
    acc_y = jnp.mean(jnp.all(y_hat == data["y"], -1))
    value = jax.vmap(lambda a, b, x: leader_value(a, b, x, k))
    best = value(data["c_x"], data["c_y"], data["x"])
    got = value(data["c_x"], data["c_y"], x_hat)
    return jnp.stack([acc_x, acc_y, jnp.mean((got - best) / jnp.abs(best))])


# --------------------------------------------------------------------------------------------
# Training (one compilation per method; seeds vmapped).


def make_train(loss, metrics, train_data, test_data, k, two_level, *, epochs, batch):
    n = train_data["z"].shape[0]
    steps_per_epoch = n // batch
    opt = optax.adam(optax.cosine_decay_schedule(LR, epochs * steps_per_epoch))

    def step(carry, inputs):
        params, state = carry
        idx, key = inputs
        b = jax.tree_util.tree_map(lambda a: a[idx], train_data)
        value, grad = jax.value_and_grad(loss)(params, b, key)
        updates, state = opt.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), value

    def epoch(carry, key):
        kp, ks = jax.random.split(key)
        perm = jax.random.permutation(kp, n)[: steps_per_epoch * batch]
        idx = perm.reshape(steps_per_epoch, batch)
        carry, values = jax.lax.scan(step, carry, (idx, jax.random.split(ks, steps_per_epoch)))
        return carry, (jnp.mean(values), metrics(carry[0], test_data))

    def train(key):
        ki, ke = jax.random.split(key)
        params = init_model(ki, k, two_level)
        first = metrics(params, test_data)
        carry, (losses, curve) = jax.lax.scan(epoch, (params, opt.init(params)),
                                              jax.random.split(ke, epochs))
        return jnp.concatenate([first[None], curve]), losses

    return jax.jit(jax.vmap(train))


def run(*, k1=8, k2=5, n_train=1000, n_test=1000, epochs=15, batch=32, seeds=3,
        single=SINGLE_METHODS, two=TWO_METHODS, verbose=True):
    keys = jax.random.split(jax.random.PRNGKey(2023), 4)
    results = {"single": {}, "two": {}}
    seed_keys = jax.random.split(jax.random.PRNGKey(7), seeds)
    if single:
        maps = make_maps(keys[0], k1, False)
        train_data = make_data(keys[1], n_train, k1, maps)
        test_data = make_data(keys[2], n_test, k1, maps)
        oracle = {"W": None, "c_y": true_costs(maps, test_data["z"], None)}
        results["oracle_single"] = np.asarray(single_metrics(oracle, test_data, k1))
        for method in single:
            t0 = time.perf_counter()
            train = make_train(single_loss(method, k1),
                               lambda p, d: single_metrics(p, d, k1), train_data, test_data,
                               k1, False, epochs=epochs, batch=batch)
            curve, losses = jax.block_until_ready(train(seed_keys))
            results["single"][method] = (np.asarray(curve), np.asarray(losses),
                                         time.perf_counter() - t0)
            if verbose:
                print(f"single {method}: {time.perf_counter() - t0:.1f} s", flush=True)
    if two:
        maps = make_maps(keys[3], k2, True)
        kt, ke = jax.random.split(keys[3])
        train_data = make_data(kt, n_train, k2, maps, True)
        test_data = make_data(ke, n_test, k2, maps, True)
        oracle = {"W": None, "c_y": true_costs(maps, test_data["z"], None),
                  "c_x": true_costs(maps, test_data["z"], None, "Bx", scale=0.5, offset=0.6)}
        results["oracle_two"] = np.asarray(two_metrics(oracle, test_data, k2,
                                                       "two-level identity"))
        for method in two:
            t0 = time.perf_counter()
            train = make_train(two_loss(method, k2),
                               lambda p, d, m=method: two_metrics(p, d, k2, m), train_data,
                               test_data, k2, True, epochs=epochs, batch=batch)
            curve, losses = jax.block_until_ready(train(seed_keys))
            results["two"][method] = (np.asarray(curve), np.asarray(losses),
                                      time.perf_counter() - t0)
            if verbose:
                print(f"two {method}: {time.perf_counter() - t0:.1f} s", flush=True)
    return results


def _pm(a, scale=1.0, digits=1):
    a = scale * np.asarray(a)
    return f"{np.mean(a):.{digits}f} +- {np.std(a):.{digits}f}"


def format_table(results, *, k1, k2, n_train, n_test, epochs, seeds):
    lines = [
        "BiGrad combinatorial stand-in: shortest paths on grids with costs from a learned "
        "linear model of features (true map degree 4, noise U[0.9, 1.1]); "
        f"{n_train} train / {n_test} test instances, {epochs} epochs of Adam (batch 32), "
        f"{seeds} seeds (mean +- std); device {jax.devices()[0].platform}. The paper's "
        "numbers for this task are not available to us: no paper column.",
        "",
    ]
    if results["single"]:
        lines += [
            f"Single level, {k1}x{k1} grid (vertex costs, right/down paths): test path "
            "accuracy and normalised regret (%).",
            "",
            "| method | acc untrained | acc trained | regret untrained | regret trained | "
            "s (all seeds) |",
            "|---|---|---|---|---|---|",
        ]
        for method, (curve, _, secs) in results["single"].items():
            lines.append(
                f"| {method} | {_pm(curve[:, 0, 0], 100)} | {_pm(curve[:, -1, 0], 100)} | "
                f"{_pm(curve[:, 0, 1], 100, 2)} | {_pm(curve[:, -1, 1], 100, 2)} | "
                f"{secs:.0f} |")
        o = results["oracle_single"]
        lines.append(f"| oracle (noise-free true costs) | | {100 * o[0]:.1f} | | "
                     f"{100 * o[1]:.2f} | |")
        lines.append("| relaxed (bj.discrete.relaxed) | n/a: a relaxation of the one-hot "
                     "simplex, not of the path polytope | | | | |")
        lines.append("")
    if results["two"]:
        lines += [
            f"Two levels, shortest-path interdiction on a {k2}x{k2} grid (leader raises one "
            f"interior cell's cost by {DELTA}): test accuracy of x (interdicted cell), of y "
            "(path), and leader regret (%).",
            "",
            "| method | acc x | acc y | leader regret untrained | leader regret trained | "
            "s (all seeds) |",
            "|---|---|---|---|---|---|",
        ]
        for method, (curve, _, secs) in results["two"].items():
            lines.append(
                f"| {method} | {_pm(curve[:, -1, 0], 100)} | {_pm(curve[:, -1, 1], 100)} | "
                f"{_pm(curve[:, 0, 2], 100, 2)} | {_pm(curve[:, -1, 2], 100, 2)} | "
                f"{secs:.0f} |")
        o = results["oracle_two"]
        lines.append(f"| oracle (noise-free true costs, exact bilevel solver) | {100 * o[0]:.1f} "
                     f"| {100 * o[1]:.1f} | | {100 * o[2]:.2f} | |")
    return "\n".join(lines)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("single", 1, "single level: test regret (%)"),
              ("two", 2, "interdiction: leader regret (%)"),
              ("two", 1, "interdiction: path accuracy (%)")]
    panels = [p for p in panels if results[p[0]]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (part, col, title) in zip(axes[0], panels, strict=True):
        for i, (method, (curve, _, _)) in enumerate(results[part].items()):
            vals = 100 * curve[:, :, col]
            epochs = np.arange(vals.shape[1])
            mean, std = vals.mean(0), vals.std(0)
            ax.plot(epochs, mean, color=f"C{i}", label=method)
            ax.fill_between(epochs, mean - std, mean + std, color=f"C{i}", alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None)
    _device.add_option(parser)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    if args.small:
        cfg = dict(k1=5, k2=4, n_train=128, n_test=128, epochs=args.epochs or 3, seeds=1)
    else:
        cfg = dict(k1=8, k2=5, n_train=1000, n_test=1000, epochs=args.epochs or 15,
                   seeds=args.seeds)
    start = time.perf_counter()
    results = run(**cfg)
    table = format_table(results, **cfg)
    print(table)
    print(f"total {time.perf_counter() - start:.1f} s")
    if not args.small:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "shortest_path.txt"), "w") as fh:
            fh.write(table + "\n")
        plot(results, os.path.join(out, "shortest_path.png"))
    return results


if __name__ == "__main__":
    main()
