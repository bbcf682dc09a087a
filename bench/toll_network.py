"""Network toll attack (SIGD authors' code): implicit-gradient attack against simple baselines.

The operator routes ``demand`` units from node 0 to node n-1 of a complete digraph at minimum
regularised cost under the attacker's tolls ``x``::

    y*(x) = argmin_y (c + x)'y + gamma/2 ||y||^2   s.t.  N y = e,  0 <= y <= cap

(``bj.problems.toll_network``). The attacker spreads a budget over the edges,
``x in {x >= 0, 1'x = budget}``, to maximise the operator's cost ``C(x) = (c + x)'y*(x)``
(the upper level is ``min_x f = -C``).

Methods:

* ``implicit PGD``: projected gradient ascent on ``C`` over the budget simplex, from the
  uniform attack, 100 iterations, the lower level solved exactly by ``bj.solve_qp`` and
  differentiated by its active-set implicit rule (docs ``lower/qp.md``; the closed form
  ``Dy* = -(1/gamma)(I - A_I^T (A_I A_I^T)^{-1} A_I)``, checked in tests/test_problems.py);
  UL steps in ``[1e-3, 1e-2]``; the best iterate is reported. (``bj.argmin``'s interior point
  does not converge on this equality-plus-box lower level at present, so the QP route is
  used.)
* baselines: ``uniform`` (``budget / E`` on every edge), ``max-capacity`` (the whole budget on
  the edge of largest capacity), ``max-flow edge`` (the whole budget on the edge carrying the
  most flow without tolls; our addition, a stronger one-edge baseline) and ``random``
  (``budget * Dirichlet(1)``, mean and best of ``--random-draws`` draws).

Metric: the relative increase of the total min-cost-flow cost, ``C(x) / C(0) - 1``, with
``C(0) = c'y*(0)``; also the increase of the routing cost at the true costs,
``c'y*(x) / c'y*(0) - 1`` (how much the tolls divert flow to worse paths).

Usage: ``python bench/toll_network.py [--seeds 0 1 2] [--iters 100] [--reps 3] [--small]
[--device cpu|gpu]``; the table is printed and saved to ``bench/results/toll_network.txt``
(``--out``).
"""

from __future__ import annotations

import argparse
import os
import time

import _device

if __name__ == "__main__":  # before JAX starts; bench/ is on sys.path when run as a script
    _device.select()  # (on the CPU: one pinned core, single-threaded kernels)

import pathlib  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

import bilevel_jax as bj  # noqa: E402
from bilevel_jax._src.problems import toll_network  # noqa: E402


def make_attack(problem, data, iters):
    """Jitted functions: the operator's cost and flow at ``x``, and a PGD attack run."""
    project = data["projection"].project

    def lower(x):
        return bj.solve_qp(**data["qp"](x))

    def cost(x):
        sol = lower(x)
        return -problem.f(x, sol.y), sol  # C(x) = (c + x)'y*(x)

    value_and_grad = jax.value_and_grad(cost, has_aux=True)

    @jax.jit
    def evaluate(x):
        sol = lower(x)
        return -problem.f(x, sol.y), sol.y, sol.info.status

    @jax.jit
    def attack(x0, step):
        def body(carry, _):
            x, best_x, best_c, worst_status = carry
            (c, sol), g = value_and_grad(x)
            better = c > best_c
            best_x = jnp.where(better, x, best_x)
            best_c = jnp.where(better, c, best_c)
            worst_status = jnp.maximum(worst_status, sol.info.status)
            return (project(x + step * g), best_x, best_c, worst_status), c

        init = (x0, x0, -jnp.inf, jnp.asarray(0, jnp.int32))
        (x, best_x, best_c, worst_status), trace = jax.lax.scan(body, init, None, length=iters)
        c_last, _, _ = evaluate(x)
        better = c_last > best_c
        return (jnp.where(better, x, best_x), jnp.maximum(c_last, best_c), worst_status,
                trace)

    return evaluate, attack


def run_seed(seed, args):
    problem, data = toll_network(seed=seed, num_nodes=args.nodes, gamma=args.gamma,
                                 budget=args.budget)
    num_edges = problem.dim_y
    cost_vec = data["cost"]
    evaluate, attack = make_attack(problem, data, args.iters)

    t0 = time.perf_counter()
    jax.block_until_ready(evaluate(jnp.zeros(num_edges)))
    compile_eval = time.perf_counter() - t0
    c0, y0, status0 = evaluate(jnp.zeros(num_edges))
    base_total = float(c0)
    base_route = float(cost_vec @ np.asarray(y0))
    assert int(status0) == bj.Status.SUCCESS

    def metrics(x):
        c, y, status = evaluate(jnp.asarray(x))
        return (float(c) / base_total - 1, float(cost_vec @ np.asarray(y)) / base_route - 1,
                int(status))

    rows = []
    uniform = np.full(num_edges, args.budget / num_edges)
    rows.append(("uniform", *metrics(uniform), "-", "-", ""))
    one_edge = np.zeros(num_edges)
    one_edge[np.argmax(data["capacity"])] = args.budget
    rows.append(("max-capacity", *metrics(one_edge), "-", "-", ""))
    one_edge = np.zeros(num_edges)
    one_edge[np.argmax(np.asarray(y0))] = args.budget
    rows.append(("max-flow edge", *metrics(one_edge), "-", "-", ""))
    rng = np.random.RandomState(1000 + seed)
    draws = [metrics(args.budget * rng.dirichlet(np.ones(num_edges)))
             for _ in range(args.random_draws)]
    draws = np.array(draws)
    rows.append((f"random (mean of {args.random_draws})", draws[:, 0].mean(),
                 draws[:, 1].mean(), int(draws[:, 2].max()), "-", "-", ""))
    best = int(np.argmax(draws[:, 0]))
    rows.append((f"random (best of {args.random_draws})", draws[best, 0], draws[best, 1],
                 int(draws[best, 2]), "-", "-", ""))

    x_start = jnp.asarray(uniform)
    for i, step in enumerate(args.steps):
        t0 = time.perf_counter()
        jax.block_until_ready(attack(x_start, step))  # compiles once: step is a traced input
        first = time.perf_counter() - t0
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            out = jax.block_until_ready(attack(x_start, step))
            times.append(time.perf_counter() - t0)
        best_x, _, worst_status, trace = out
        run_s = float(np.median(times))
        rel, route, status = metrics(best_x)
        support = int(np.sum(np.asarray(best_x) > 1e-9))
        note = (f"{args.iters} steps, worst LL status {int(worst_status)}, tolls on {support} "
                f"edges, last iterate {float(trace[-1]) / base_total - 1:.4f}")
        rows.append((f"implicit PGD, step {step:g}", rel, route, status,
                     f"{first - run_s:.1f}" if i == 0 else "(cached)", f"{run_s:.2f}", note))
    header = (f"seed {seed}: n = {args.nodes} ({num_edges} edges), gamma = {args.gamma}, "
              f"budget = {args.budget}, demand = {data['demand']:.1f} "
              f"(0.75 x max flow {data['max_flow']:.1f}); C(0) = {base_total:.1f}; "
              f"LL compile {compile_eval:.1f} s")
    return header, rows


def format_table(rows):
    lines = ["| method | C(x)/C(0) - 1 | c'y*(x)/c'y*(0) - 1 | LL status | compile s | run s "
             "| note |", "|---|---|---|---|---|---|---|"]
    for name, rel, route, status, comp, run, note in rows:
        lines.append(f"| {name} | {rel:.4f} | {route:.4f} | {status} | {comp} | {run} | {note} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--gamma", type=float, default=0.05)
    parser.add_argument("--budget", type=float, default=100.0)
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--steps", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    parser.add_argument("--random-draws", type=int, default=20)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="one seed, 20 iterations")
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"
                                             / "toll_network.txt"))
    _device.add_option(parser)
    args = parser.parse_args(argv)
    if args.small:
        args.seeds, args.iters, args.steps, args.random_draws, args.reps = [0], 20, [1e-2], 5, 1
    if not all(1e-3 <= s <= 1e-2 for s in args.steps):
        print("note: steps outside the authors' range [1e-3, 1e-2]")

    blocks = [
        "Network toll attack (SIGD authors' problem), lower level solved by bj.solve_qp (implicit "
        f"rule); device {jax.devices()[0].platform}, XLA_FLAGS={os.environ.get('XLA_FLAGS')!r}, "
        f"median of {args.reps} run(s); 'run s' is one whole {args.iters}-step attack, "
        "compilation excluded ('compile s' = first call minus run). Load average at start "
        f"{os.getloadavg()[0]:.1f} (shared machine: timings indicative only)."
    ]
    for seed in args.seeds:
        header, rows = run_seed(seed, args)
        blocks.append(header + "\n\n" + format_table(rows))
        print(blocks[-1] + "\n", flush=True)
    text = "\n\n".join(blocks) + "\n"
    if not args.small:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)
        print(f"saved {args.out}")


if __name__ == "__main__":
    main()
