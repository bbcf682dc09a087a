"""SIGD's quadratic problems (14), (16), (17), (18): stationarity ||grad F(x_r)|| vs iteration r.

Reproduces the experiment of Khanduri et al. (ICML 2023), quadratic problems: ``d_x = d_y = 2``,
lower level ``y*(x) = argmin_{y in Y} g(y, x)`` over a box (14, 16, 17) or a polygon (18),
``X = R^2``. Methods (``bilevel_jax.algorithms``), each run 10 times:

* ``DSIGD``: ``dsigd`` with the authors' practical settings, passed explicitly (they are not
  the library's defaults): ``s = 1``, ``sigma = 1``, ``c_bt = 0.9`` (0.95 in (17)), at most 30
  backtracks, slack ``a e0 / m`` with ``e0 = 1`` (``slack_rule="backtracks"``);
* ``DSIGD sigma=1e-4``: ``dsigd``'s library defaults (not in the paper): the textbook Armijo
  constant ``sigma = 1e-4`` and the theorem's slack ``e0 (delta_r + delta_trial)``, decaying
  with the lower-level accuracy (``slack_rule="accuracy"``, ``e0 = 1``);
* ``SSIGD``: ``ssigd``, SGD with step 0.1 (deterministic upper gradient);
* ``implicit``: the same gradient descent with the implicit gradient and no perturbation
  (``perturbation_scale=0``): plain implicit differentiation without smoothing.

All three use the paper's lower-level settings (SIGD Algorithm 3: a fixed number of projected
gradient steps, warm-started at the previous ``y_hat``, the implicit rule at ``y_hat``):

| problem | SSIGD / implicit | DSIGD |
|---|---|---|
| (14) | 10 steps, gamma = 0.1 | 10 steps, gamma = 0.1 |
| (16) | 10 steps, gamma = 0.1 | 10 steps, gamma = 1 |
| (17) | 20 steps, gamma = 0.1 | 10 steps, gamma = 1 |
| (18) | 10 steps, gamma = 0.1 | 10 steps, gamma = 0.1 |

Run ``i`` (i = 0..9) starts at ``x0 ~ U[-3, 3]^2`` (NumPy ``default_rng(1000 + i)``; the paper
does not give its initial points) with ``jax.random.PRNGKey(i)``; the perturbation is
``q = 1e-3 z/||z||`` (the SIGD comparison code). The metric is the closed-form gradient of the
UNPERTURBED ``F`` at ``x_r`` (closed form: ``y* = Proj_Y(.)``, ``Dy* = -N`` with ``N``
the projector onto the null space of the active rows), computed in NumPy and checked against
``jax.grad(problem.value)`` at random points. The 10 runs of a method are one ``vmap``-ed,
jitted ``run`` (compile time reported apart; run time = median of ``--reps`` calls, all 10
runs together, one pinned core).

Usage: ``python bench/sigd_quadratics.py [--steps 100] [--runs 10] [--reps 3] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if hasattr(os, "sched_setaffinity"):
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

import itertools  # noqa: E402
import pathlib  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

import bilevel_jax as bj  # noqa: E402
from bilevel_jax._src.outer import dsigd, ssigd  # noqa: E402

PROBLEMS = (14, 16, 17, 18)
# (steps, gamma) of the lower-level PGD: SSIGD / implicit, then DSIGD (the paper's settings).
LOWER = {14: ((10, 0.1), (10, 0.1)), 16: ((10, 0.1), (10, 1.0)),
         17: ((20, 0.1), (10, 1.0)), 18: ((10, 0.1), (10, 0.1))}
BACKTRACK = {14: 0.9, 16: 0.9, 17: 0.95, 18: 0.9}
CHECKPOINTS = (0, 10, 20, 40, 80)
THRESHOLD = 1e-2
PAPER = ("[D]SIGD reaches the smallest ||grad F|| fastest; [S]SIGD ~ PDBO; ||grad F|| starts at "
         "~10-20 and approaches 0 within ~40-80 iterations (plots only; initial points and "
         "seeds unspecified).")

# --------------------------------------------------------------------------------------------
# Closed forms (NumPy, no bilevel_jax code): Y as rows G y <= h, grad F = f_x + Dy*^T f_y.

_BOX1 = (np.vstack([np.eye(2), -np.eye(2)]), np.ones(4))
_POLY = (np.array([[1.0, 0], [0, 1], [-1, 0], [0, -1], [1, 1], [-1, -1]]), np.full(6, 5.0))
# For each problem: Y, the unconstrained LL minimiser u(x) (H = c I, J = c I for every one, so
# y* = Proj_Y(u(x)) and Dy* = -N), and the partial gradients of f.
CLOSED = {
    14: (_BOX1, lambda x: -x - np.array([0.0, 1.0]),
         lambda x, y: 0.5 * x + 10 * y + 1, lambda x, y: 10 * x - 0.5 * y + 1),
    16: (_BOX1, lambda x: -x, lambda x, y: 0.5 * x + 5 * y, lambda x, y: 5 * x - 0.5 * y),
    17: (_BOX1, lambda x: -x, lambda x, y: x + 2 * y, lambda x, y: 2 * x - y),
    18: (_POLY, lambda x: -x - 1, lambda x, y: 0.5 * x + 2 * y, lambda x, y: 2 * x - 0.5 * y),
}


def project_polygon(z, G, h, tol=1e-10):
    """Euclidean projection onto ``{G y <= h}`` in R^2 by enumerating active sets (<= 2 rows)."""
    if np.all(G @ z <= h + tol):
        return z, np.zeros(0, int)
    best = None
    for k in (1, 2):
        for rows in itertools.combinations(range(len(h)), k):
            A, b = G[list(rows)], h[list(rows)]
            if np.linalg.matrix_rank(A) < k:
                continue
            y = z - A.T @ np.linalg.solve(A @ A.T, A @ z - b)
            if np.all(G @ y <= h + tol) and (best is None or
                                               np.sum((y - z) ** 2) < best[0] - 1e-14):
                best = (np.sum((y - z) ** 2), y)
    y = best[1]
    return y, np.flatnonzero(np.abs(G @ y - h) <= 1e-9)


def closed_form_grad(eq, x):
    (G, h), u, f_x, f_y = CLOSED[eq]
    y, active = project_polygon(u(x), G, h)
    A = G[active]
    N = np.eye(2) if len(active) == 0 else np.eye(2) - A.T @ np.linalg.pinv(A @ A.T) @ A
    return f_x(x, y) + (-N).T @ f_y(x, y)


def closed_form_value(eq, problem, x):
    (G, h), u, _, _ = CLOSED[eq]
    return float(problem.f(x, project_polygon(u(x), G, h)[0]))


def check_closed_forms(rng):
    """Max |closed form - jax.grad(problem.value)| over random points (exact LL, argmin)."""
    errors = {}
    for eq in PROBLEMS:
        problem = bj.problems.sigd_quadratic(eq)
        grad = jax.jit(jax.grad(problem.value))
        errs = [np.max(np.abs(closed_form_grad(eq, x) - np.asarray(grad(jnp.asarray(x)))))
                for x in rng.uniform(-3, 3, (20, 2))]
        errors[eq] = max(errs)
    return errors


# --------------------------------------------------------------------------------------------


def make_algorithms(eq):
    problem = bj.problems.sigd_quadratic(eq)
    (s_steps, s_gamma), (d_steps, d_gamma) = LOWER[eq]
    return problem, {
        "DSIGD": dsigd(problem, sigma=1.0, slack=1.0, slack_rule="backtracks",
                       backtrack_factor=BACKTRACK[eq], lower_steps=d_steps,
                       lower_step_size=d_gamma),
        "DSIGD sigma=1e-4": dsigd(problem, sigma=1e-4, backtrack_factor=BACKTRACK[eq],
                                  lower_steps=d_steps, lower_step_size=d_gamma),
        "SSIGD": ssigd(problem, learning_rate=0.1, lower_steps=s_steps,
                       lower_step_size=s_gamma),
        "implicit": ssigd(problem, learning_rate=0.1, perturbation_scale=0.0,
                          lower_steps=s_steps, lower_step_size=s_gamma),
    }


def bench_method(alg, x0s, keys, steps, reps):
    run = jax.jit(jax.vmap(lambda x0, k: alg.run(x0, k, steps)))
    t0 = time.perf_counter()
    compiled = run.lower(x0s, keys).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(x0s, keys))
        times.append(time.perf_counter() - t0)
    x_final, hist = out
    # Iterates x_0 .. x_T (history.x holds x_0 .. x_{T-1}).
    xs = np.concatenate([np.asarray(hist.x), np.asarray(x_final)[:, None]], axis=1)
    return xs, hist, compile_s, float(np.median(times))


def fmt(values):
    med = np.median(values)
    return f"{med:.2e} [{np.min(values):.1e}, {np.max(values):.1e}]"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    x0s = np.stack([np.random.default_rng(1000 + i).uniform(-3, 3, 2) for i in range(args.runs)])
    keys = jnp.stack([jax.random.PRNGKey(i) for i in range(args.runs)])
    check = check_closed_forms(np.random.default_rng(7))

    lines = [
        f"SIGD quadratic problems, {args.runs} runs x {args.steps} iterations, x0 ~ U[-3, 3]^2 "
        f"(default_rng(1000 + i)), keys PRNGKey(i), q = 1e-3 z/||z||; float64, one pinned "
        f"core, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}; device {jax.devices()[0].platform}.",
        "Metric: closed-form ||grad F(x_r)|| of the unperturbed F; cells are median [min, max] "
        f"over runs; 'r < {THRESHOLD:g}' = first iteration with ||grad F|| < {THRESHOLD:g} "
        "(median over runs; n = runs that got there). Closed form vs jax.grad(problem.value), "
        "max abs error over 20 random points in [-3, 3]^2: "
        + ", ".join(f"({k}) {v:.1e}" for k, v in check.items()) + ".",
        f"Paper (qualitative): {PAPER}",
        "",
        "| problem | method | LL (steps, gamma) | " + " | ".join(f"r = {r}" for r in CHECKPOINTS)
        + f" | r < {THRESHOLD:g} | final F | backtracks/step | compile s | run ms (all runs) |",
        "|---|---|---|" + "---|" * (len(CHECKPOINTS) + 5),
    ]
    curves = {}
    for eq in PROBLEMS:
        problem, algs = make_algorithms(eq)
        for name, alg in algs.items():
            xs, hist, compile_s, run_s = bench_method(alg, jnp.asarray(x0s), keys, args.steps,
                                                      args.reps)
            norms = np.array([[np.linalg.norm(closed_form_grad(eq, x)) for x in run]
                              for run in xs])  # (runs, T + 1)
            curves[eq, name] = norms
            below = [np.flatnonzero(n < THRESHOLD) for n in norms]
            firsts = [b[0] for b in below if len(b)]
            first = (f"{np.median(firsts):.0f} (n = {len(firsts)})" if firsts else "never")
            cells = [fmt(norms[:, r]) for r in CHECKPOINTS if r <= args.steps]
            final_f = np.array([closed_form_value(eq, problem, x) for x in xs[:, -1]])
            dsigd_like = name.startswith("DSIGD")
            lower = LOWER[eq][1 if dsigd_like else 0]
            bts = np.asarray(hist.num_backtracks).mean()
            lines.append(
                f"| ({eq}) | {name} | {lower} | " + " | ".join(cells)
                + f" | {first} | {fmt(final_f)} | {bts:.1f} | {compile_s:.1f} "
                f"| {1e3 * run_s:.1f} |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    (out_dir / "sigd_quadratics.txt").write_text(text)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROBLEMS), figsize=(4 * len(PROBLEMS), 3.4))
    # SSIGD and implicit coincide to plotting accuracy (||q|| = 1e-3): SSIGD is dashed.
    styles = {"DSIGD": ("C0", "-"), "DSIGD sigma=1e-4": ("C3", "-"), "SSIGD": ("C1", "--"),
              "implicit": ("C2", ":")}
    for ax, eq in zip(axes, PROBLEMS, strict=True):
        for name, (color, ls) in styles.items():
            norms = np.maximum(curves[eq, name], 1e-16)  # exact zeros drawn at 1e-16
            r = np.arange(norms.shape[1])
            ax.semilogy(r, np.median(norms, axis=0), color=color, ls=ls, label=name)
            ax.fill_between(r, norms.min(0), norms.max(0), color=color, alpha=0.2)
        ax.set_title(f"problem ({eq})")
        ax.set_xlabel("iteration r")
        ax.axhline(THRESHOLD, color="gray", lw=0.5, ls="--")
    axes[0].set_ylabel("||grad F(x_r)|| (median, min-max band)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "sigd_quadratics.png", dpi=120)
    print(f"saved {out_dir / 'sigd_quadratics.txt'} and {out_dir / 'sigd_quadratics.png'}")


if __name__ == "__main__":
    main()
