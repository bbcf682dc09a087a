"""BiGrad, adversarial attack at digits scale: single-level vs bilevel optimisation layers.

Small-scale stand-in for BiGrad's robustness-under-attack table (Alesiani, AAAI 2023), where a
small CNN on CIFAR-10 with a single-level optimisation layer (DCNN) is compared with the same
network whose layer is a bilevel program with the perturbation as lower level (Bi-DCNN), a
plain CNN and a capacity-matched CNN (CNN*). The paper's architecture and attack protocol
are not published in enough detail to copy, so the setup is ours:

* Data: scikit-learn's digits (8x8, pixels in [0, 1], 1438 train / 359 test), loaded and
  split by ``bench/adversarial_digits.py``'s ``load_data``.
* Encoder ``h = tanh(W_1 x + b_1)`` with ``d = 12`` features, then a layer ``h -> z``, then
  logits ``V z + c``. The layers (same parameters ``L`` (``P = LL'``), ``q``):

  Both start from ``L = 0.5 I`` (``P = 0.25 I``), ``q = 0``.
  - **single-level (DCNN)**: ``z = argmin_{|z_i| <= 1} 1/2 z'(I + P)z - (h + q)'z``, a box QP
    solved by ``bj.argmin(box=...)`` (OptNet-like, exact implicit gradients by the masked
    rule; ``bj.solve_qp`` gives the same layer but compiles several times slower here);
  - **bilevel (Bi-DCNN)**: ``bj.bilevel_layer`` with upper level
    ``z = argmin_z 1/2 (z + w*)'(I + P)(z + w*) - (h + q)'(z + w*) - mu sum log(1 - z_i^2)``
    and the perturbation of the features as lower level,
    ``w*(z) = argmin_{|w_i| < eps_w} -kappa eps_w sum sqrt(eps_w^2 - w_i^2) - w'(A z)``, i.e.
    ``w*_i = eps_w a_i / sqrt(a_i^2 + kappa^2 eps_w^2)``, ``a = A z`` (a smooth bounded
    worst-case shift the layer anticipates; ``eps_w = 0.3``, ``mu = 1e-3``). ``A`` starts at
    0, so the untrained bilevel layer equals the single-level one up to the barrier; ``A``
    and ``kappa`` are trained with everything else.
  - **MLP (CNN)**: no layer, ``z = h``; **MLP* (CNN*)**: one more ``tanh`` layer
    ``z = tanh(U h + u)``, about the bilevel layer's extra parameter count.

* Training: clean cross-entropy, Adam (learning rate 1e-2, cosine decay), batch 64, 10
  epochs, float64; 3 seeds (initialisation and batches), the same initial encoder and head
  for every model of a seed.
* Attacks (white box, through the layers' implicit gradients): FGSM and PGD-10 (sign steps
  of ``2.5 eps / 10``, random start) in ``||delta||_inf <= eps`` with ``x + delta`` in [0, 1],
  ``eps in {0, 0.05, 0.1, 0.2}`` (the paper's strengths 0 and 5 are on CIFAR's scale).
  Reported: test accuracy (%) mean +- std over seeds.

Usage: ``python bench/bigrad_attack.py [--small] [--seeds N] [--epochs E] [--n-train N]
[--pgd-steps S] [--name STEM] [--device cpu|gpu]``; the full run saves
``bench/results/STEM.txt`` and ``STEM.png`` (default ``bigrad_attack``).
"""

from __future__ import annotations

import argparse
import importlib.util
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

_HERE = os.path.dirname(os.path.abspath(__file__))
_SPEC = importlib.util.spec_from_file_location("adversarial_digits_bench",
                                               os.path.join(_HERE, "adversarial_digits.py"))
digits = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(digits)

#: The paper's table (CIFAR-10, accuracy %, mean +- std): attack -> model -> (mean, std).
PAPER = {0: {"DCNN": (62.9, 0.3), "Bi-DCNN": (64.0, 0.4), "CNN": (63.4, 0.7),
             "CNN*": (63.6, 0.5)},
         5: {"DCNN": (42.6, 1.0), "Bi-DCNN": (44.5, 0.2), "CNN": (43.8, 1.2),
             "CNN*": (44.3, None)}}
MODELS = ("single", "bilevel", "mlp", "mlp_star")
PAPER_NAME = {"single": "DCNN", "bilevel": "Bi-DCNN", "mlp": "CNN", "mlp_star": "CNN*"}
LABEL = {"single": "single-level layer (DCNN)", "bilevel": "bilevel layer (Bi-DCNN)",
         "mlp": "MLP (CNN)", "mlp_star": "MLP* (CNN*)"}
D = 12
EPS_W, BARRIER = 0.3, 1e-3
EPSILONS = (0.0, 0.05, 0.1, 0.2)


#: ``L = L0 I`` at the start. ``L = 0`` is a stationary point of ``P = LL'`` (zero gradient in
#: ``L``), where the layers' quadratic never trains: the first full run used it (``--l0 0``).
L0 = 0.5


def init_params(key, model, d=D, l0=None):
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"W1": jax.random.normal(k1, (64, d)) / 8.0, "b1": jnp.zeros(d),
              "V": jax.random.normal(k2, (d, 10)) / np.sqrt(d), "c": jnp.zeros(10)}
    if model in ("single", "bilevel"):
        params.update(L=(L0 if l0 is None else l0) * jnp.eye(d), q=jnp.zeros(d))
    if model == "bilevel":
        params.update(A=jnp.zeros((d, d)), log_kappa=jnp.asarray(np.log(0.2)))
    if model == "mlp_star":
        params.update(U=jax.random.normal(k3, (d, d)) / np.sqrt(d), u=jnp.zeros(d))
    return params


def _quadratic(params):
    d = params["q"].shape[0]
    return jnp.eye(d) + params["L"] @ params["L"].T


def single_layer(params, h):
    def g(z, t):
        h_, p = t
        return 0.5 * z @ (_quadratic(p) @ z) - (h_ + p["q"]) @ z

    layer_params = {k: params[k] for k in ("L", "q")}
    return bj.argmin(g, jnp.zeros_like(h), (h, layer_params), box=lambda t: (-1.0, 1.0)).y


def bilevel_objectives():
    def f(z, w, t):
        h, params = t
        s = z + w
        barrier = -BARRIER * jnp.sum(jnp.log1p(-(z**2)))
        return 0.5 * s @ (_quadratic(params) @ s) - (h + params["q"]) @ s + barrier

    def g(z, w, t):
        _, params = t
        kappa = 0.02 + jnp.exp(params["log_kappa"])
        return -kappa * EPS_W * jnp.sum(jnp.sqrt(EPS_W**2 - w**2)) - w @ (params["A"] @ z)

    return f, g


def bilevel_layer(params, h):
    f, g = bilevel_objectives()
    d = h.shape[0]
    layer_params = {k: params[k] for k in ("L", "q", "A", "log_kappa")}
    return bj.bilevel_layer(f, g, jnp.zeros(d), jnp.zeros(d), (h, layer_params)).x


def logits_fn(model):
    def logits(params, x):
        h = jnp.tanh(x @ params["W1"] + params["b1"])
        if model == "single":
            z = single_layer(params, h)
        elif model == "bilevel":
            z = bilevel_layer(params, h)
        elif model == "mlp_star":
            z = jnp.tanh(h @ params["U"] + params["u"])
        else:
            z = h
        return z @ params["V"] + params["c"]

    return logits


def batched_logits(model):
    return jax.vmap(logits_fn(model), in_axes=(None, 0))


def cross_entropy(model, params, x, labels):
    return optax.softmax_cross_entropy_with_integer_labels(batched_logits(model)(params, x),
                                                           labels)


def attack(model, params, x, labels, eps, key, steps):
    """FGSM (``steps=0``: one step of size ``eps`` from ``x``) or PGD-``steps``."""
    lo, hi = digits.box_bounds(x, eps)
    grad = jax.grad(lambda y: jnp.sum(cross_entropy(model, params, x + y, labels)))
    if steps == 0:
        return jnp.clip(eps * jnp.sign(grad(jnp.zeros_like(x))), lo, hi)
    step_size = 2.5 * eps / steps

    def body(_, y):
        return jnp.clip(y + step_size * jnp.sign(grad(y)), lo, hi)

    return jax.lax.fori_loop(0, steps, body, digits.random_start(key, x, eps))


def make_eval(model, x, labels, epsilons, pgd_steps):
    """Jitted ``(params, key) -> accuracies``: clean, then FGSM and PGD per ``eps``."""
    logits = batched_logits(model)

    def acc(params, delta):
        return jnp.mean(jnp.argmax(logits(params, x + delta), -1) == labels)

    def evaluate(params, key):
        out = []
        for eps in epsilons:
            for steps in (0, pgd_steps):
                delta = attack(model, params, x, labels, eps, key, steps)
                out.append(acc(params, delta))
        return jnp.stack(out).reshape(len(epsilons), 2)

    return jax.jit(evaluate)


def make_train(model, train, *, epochs, batch, lr=1e-2):
    x, labels = train
    n = x.shape[0]
    steps_per_epoch = n // batch
    opt = optax.adam(optax.cosine_decay_schedule(lr, epochs * steps_per_epoch))

    def loss(params, xb, lb):
        return jnp.mean(cross_entropy(model, params, xb, lb))

    def step(carry, idx):
        params, state = carry
        value, grad = jax.value_and_grad(loss)(params, x[idx], labels[idx])
        bad = ~jnp.all(jnp.array([jnp.all(jnp.isfinite(g))
                                  for g in jax.tree_util.tree_leaves(grad)]))
        # A failed layer solve gives NaN cotangents (the library's failure policy): skip it.
        grad = jax.tree_util.tree_map(lambda g: jnp.where(bad, 0.0, g), grad)
        updates, state = opt.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), (value, bad)

    def epoch(carry, key):
        perm = jax.random.permutation(key, n)[: steps_per_epoch * batch]
        carry, (values, bad) = jax.lax.scan(step, carry, perm.reshape(steps_per_epoch, batch))
        return carry, (jnp.mean(values), jnp.sum(bad))

    @jax.jit
    def run(params, key):
        (params, _), (losses, bad) = jax.lax.scan(epoch, (params, opt.init(params)),
                                                  jax.random.split(key, epochs))
        return params, losses, bad

    return run


def run(*, epochs=15, batch=64, seeds=3, n_train=None, n_test=None, epsilons=EPSILONS,
        pgd_steps=10, models=MODELS, l0=None, verbose=True):
    train, test = digits.load_data(n_train=n_train, n_test=n_test, dtype=jnp.float64)
    results = {}
    for model in models:
        t0 = time.perf_counter()
        trainer = make_train(model, train, epochs=epochs, batch=batch)
        evaluate = make_eval(model, *test, epsilons, pgd_steps)
        accs, losses, skipped, untrained = [], [], [], []
        for seed in range(seeds):
            key = jax.random.PRNGKey(seed)
            params = init_params(key, model, l0=l0)
            untrained.append(np.asarray(evaluate(params, key))[0, 0])
            params, loss_curve, bad = trainer(params, jax.random.fold_in(key, 1))
            accs.append(np.asarray(evaluate(params, jax.random.fold_in(key, 2))))
            losses.append(np.asarray(loss_curve))
            skipped.append(int(np.sum(bad)))
        results[model] = {"acc": np.array(accs), "loss": np.array(losses),
                          "skipped": skipped, "untrained": np.array(untrained),
                          "seconds": time.perf_counter() - t0}
        if verbose:
            print(f"{model}: {time.perf_counter() - t0:.1f} s", flush=True)
    return results


def _pm(a):
    return f"{100 * np.mean(a):.1f} +- {100 * np.std(a):.1f}"


def format_table(results, *, epochs, seeds, epsilons, pgd_steps, n_train, n_test, l0=L0):
    lines = [
        f"BiGrad adversarial-attack stand-in: digits ({n_train} train / {n_test} test), "
        f"encoder 64-{D} tanh + layer + linear head, clean training ({epochs} epochs), "
        f"layers from L = {l0} I, "
        f"{seeds} seeds; test accuracy (%) under FGSM and PGD-{pgd_steps} of strength eps "
        f"(L-inf, pixels in [0, 1]); device {jax.devices()[0].platform}.",
        "",
        "| attack | eps | " + " | ".join(LABEL[m] for m in results) + " |",
        "|---|---|" + "---|" * len(results),
    ]
    for i, eps in enumerate(epsilons):
        for j, name in enumerate(("FGSM", f"PGD-{pgd_steps}")):
            if eps == 0 and j == 1:
                continue
            label = "none" if eps == 0 else name
            cells = [_pm(r["acc"][:, i, j]) for r in results.values()]
            lines.append(f"| {label} | {eps} | " + " | ".join(cells) + " |")
    lines += ["", "Paper (CIFAR-10, small CNN; attack strengths 0 and 5 on its scale):", "",
              "| attack | DCNN | Bi-DCNN | CNN | CNN* |", "|---|---|---|---|---|"]
    for strength, row in PAPER.items():
        cells = [f"{m:.1f}" + ("" if s is None else f" +- {s:.1f}")
                 for m, s in row.values()]
        lines.append(f"| {strength} | " + " | ".join(cells) + " |")
    lines.append("")
    for model, r in results.items():
        lines.append(f"{LABEL[model]}: untrained clean accuracy {_pm(r['untrained'])}, final "
                     f"train loss {np.mean(r['loss'][:, -1]):.3f}, skipped steps (NaN "
                     f"cotangents) {r['skipped']}, {r['seconds']:.0f} s")
    if "single" in results and "bilevel" in results:
        s, b = results["single"]["acc"], results["bilevel"]["acc"]
        diff = 100 * (b - s).mean(0)
        wins = (b > s).sum(0)
        parts = []
        for i, eps in enumerate(epsilons):
            parts.append(f"eps={eps}: FGSM {diff[i, 0]:+.1f} ({wins[i, 0]}/{len(b)} seeds), "
                         f"PGD {diff[i, 1]:+.1f} ({wins[i, 1]}/{len(b)})")
        lines.append("Bilevel minus single-level layer, accuracy points: " + "; ".join(parts))
    return "\n".join(lines)


def plot(results, epsilons, pgd_steps, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, j, name in ((axes[0], 0, "FGSM"), (axes[1], 1, f"PGD-{pgd_steps}")):
        for i, (model, r) in enumerate(results.items()):
            acc = 100 * r["acc"][:, :, j]
            ax.errorbar(epsilons, acc.mean(0), yerr=acc.std(0), color=f"C{i}", marker="o",
                        capsize=3, label=LABEL[model])
        ax.set_title(f"test accuracy under {name}")
        ax.set_xlabel("eps (L-inf, pixels in [0, 1])")
        ax.set_ylabel("accuracy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--n-train", type=int, default=None, help="training subset size")
    parser.add_argument("--pgd-steps", type=int, default=10)
    parser.add_argument("--name", default="bigrad_attack", help="output file name stem")
    parser.add_argument("--l0", type=float, default=L0, help="initial L = l0 I")
    _device.add_option(parser)
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)
    if args.small:
        cfg = dict(epochs=args.epochs or 3, seeds=1, n_train=256, n_test=128,
                   epsilons=(0.0, 0.1), pgd_steps=3)
    else:
        cfg = dict(epochs=args.epochs or 10, seeds=args.seeds, n_train=args.n_train,
                   n_test=None, epsilons=EPSILONS, pgd_steps=args.pgd_steps)
    start = time.perf_counter()
    results = run(**cfg, l0=args.l0)
    n_train = cfg["n_train"] or 1438
    n_test = cfg["n_test"] or 359
    table = format_table(results, epochs=cfg["epochs"], seeds=cfg["seeds"],
                         epsilons=cfg["epsilons"], pgd_steps=cfg["pgd_steps"],
                         n_train=n_train, n_test=n_test, l0=args.l0)
    print(table)
    print(f"total {time.perf_counter() - start:.1f} s")
    if not args.small:
        out = os.path.join(_HERE, "results")
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, args.name + ".txt"), "w") as fh:
            fh.write(table + "\n")
        plot(results, cfg["epsilons"], cfg["pgd_steps"], os.path.join(out, args.name + ".png"))
    return results


if __name__ == "__main__":
    main()
