"""Cost of the penalty method (Shen et al.) against the target accuracy eps, on the T4 family.

T4 (a bilevel minimax problem with a known optimum): lower level
``g = y1^2 + y1 y2 - y2^2/2 + x1 y1 - x1 y2/2`` (strongly convex-strongly concave, saddle
``y1* = -x1/6``, ``y2* = -2 x1/3``), upper level
``f = x1^2/2 + x2 (x1 - 1) - x2^2/2 + (y1 - 1)^2/2 + y2^2/2``; the bilevel solution is
``x1* = 30/89``. ``bj.penalty_bilevel_minimax`` is run to eps-KKT tolerance ``eps`` for eps
in EPSILONS, two ways:

* ``theory``: one stage at the penalty the analysis prescribes, ``rho = c_rho / eps``
  (``c_rho = 1``): the complementarity residual ``rho gap = O(1/rho)`` must be ``<= eps``;
* ``continuation``: the library's schedule ``rho = 1, 10, 100, ...`` (up to 1e6), each stage
  warm-started, stopping at the first stage whose eps-KKT residual is ``<= eps``.

Cost = oracle calls = gradient evaluations of the penalty function ``P_rho`` (each one is
a gradient of ``f`` and two of ``g``): the projected extragradient inner solver spends two
per iteration (``info.num_steps`` counts iterations over all stages; the rare extra
backtracking trials are not counted). Also reported: the eps-KKT residual reached, the
status and ``|x1 - x1*|``.

Rates. The paper's analysis gives ``O~(eps^-4)`` oracle calls for the nonconvex-concave
penalised problem (``rho = Theta(1/eps)``, smoothness ``L_P = O(1/eps)``, cost ``L_P eps^-3``).
T4 is quadratic and its penalised problem is strongly convex-strongly concave in the
solver's variables, where extragradient converges linearly at a rate set by the condition
number ``kappa ~ rho``: ``O(rho log(1/eps)) = O~(eps^-1)`` calls. The fitted log-log slope
is printed beside both.

Usage: ``python bench/penalty_rate.py [--small] [--out DIR]``; ``--small`` (three eps, the
smoke test) saves nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time

import jax
import numpy as np

jax.config.update("jax_enable_x64", True)

from bilevel_jax._src.penalty_minimax import penalty_bilevel_minimax  # noqa: E402

X1_STAR = 30 / 89
EPSILONS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
SMALL_EPSILONS = (1e-1, 1e-2, 1e-3)
ORACLES_PER_ITERATION = 2  # extragradient: F(z) and F(z_half)
PAPER = ("paper: O~(eps^-4) oracle calls for an eps-KKT point (deterministic, convex-concave "
         "lower level without strong convexity); Lu & Mei O~(eps^-7) for constrained lower "
         "levels; T4 table (exact penalised saddle): |x1(rho) - x1*| = 0.0641/rho")


def t4_g(x1, y1, y2, th):
    return y1**2 + y1 * y2 - 0.5 * y2**2 + x1 * y1 - 0.5 * x1 * y2


def t4_f(x1, x2, y1, y2, th):
    return 0.5 * x1**2 + x2 * (x1 - 1) - 0.5 * x2**2 + 0.5 * (y1 - th) ** 2 + 0.5 * y2**2


def solve(eps, mode, max_iter):
    if mode == "theory":
        kwargs = dict(rho0=1.0 / eps, rho_max=1.0 / eps)
    else:
        kwargs = dict(rho0=1.0, rho_growth=10.0, rho_max=1e6)
    run = jax.jit(lambda th: penalty_bilevel_minimax(
        t4_f, t4_g, 0.0, 0.0, 0.0, 0.0, th, tol=eps, max_iter=max_iter, **kwargs))
    t0 = time.perf_counter()
    sol = jax.block_until_ready(run(1.0))
    seconds = time.perf_counter() - t0
    return dict(eps=eps, mode=mode, rho=float(sol.rho), iters=int(sol.info.num_steps),
                oracles=ORACLES_PER_ITERATION * int(sol.info.num_steps),
                kkt=float(sol.kkt.max()), status=int(sol.info.status),
                err=abs(float(sol.x1) - X1_STAR), seconds=seconds)


def slope(rows):
    eps = np.array([r["eps"] for r in rows])
    cost = np.array([r["oracles"] for r in rows], float)
    ok = cost > 0
    return float(np.polyfit(np.log(eps[ok]), np.log(cost[ok]), 1)[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--max-iter", type=int, default=400000)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    epsilons = SMALL_EPSILONS if args.small else EPSILONS
    rows = {mode: [solve(eps, mode, args.max_iter) for eps in epsilons]
            for mode in ("theory", "continuation")}
    lines = [
        "Penalty method (penalty_bilevel_minimax, extragradient inner solver) on T4: oracle "
        f"calls (= {ORACLES_PER_ITERATION} x inner iterations) to an eps-KKT point; float64; "
        f"device {jax.devices()[0].platform}.",
        PAPER, "",
        "| schedule | eps | final rho | inner iterations | oracle calls | eps-KKT residual | "
        "status | abs(x1 - x1*) | paper's 0.0641/rho | s (incl. compile) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, rs in rows.items():
        for r in rs:
            lines.append(
                f"| {mode} | {r['eps']:.0e} | {r['rho']:.0e} | {r['iters']} | {r['oracles']} "
                f"| {r['kkt']:.1e} | {r['status']} | {r['err']:.1e} | {0.0641 / r['rho']:.1e} "
                f"| {r['seconds']:.1f} |")
    lines.append("")
    for mode, rs in rows.items():
        lines.append(f"log-log slope of oracle calls vs eps, {mode}: {slope(rs):.2f} "
                     "(analysis, nonconvex-concave: -4; strongly convex-concave T4 with "
                     "rho ~ 1/eps: about -1 up to the log)")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None or not args.small:
        out = pathlib.Path(args.out or pathlib.Path(__file__).parent / "results")
        out.mkdir(parents=True, exist_ok=True)
        (out / "penalty_rate.txt").write_text(text)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.6))
        for (mode, rs), marker in zip(rows.items(), "os", strict=True):
            eps = np.array([r["eps"] for r in rs])
            cost = np.array([r["oracles"] for r in rs])
            ax.loglog(eps, cost, marker=marker, label=f"{mode} (slope {slope(rs):.2f})")
        eps = np.array(epsilons)
        ref = rows["theory"][0]["oracles"]
        ax.loglog(eps, ref * (eps / eps[0]) ** -1.0, "k:", lw=0.8, label="eps^-1")
        ax.loglog(eps, ref * (eps / eps[0]) ** -4.0, "k--", lw=0.8, label="eps^-4 (analysis)")
        ax.set_ylim(ref / 3, 30 * max(max(r["oracles"] for r in rs) for rs in rows.values()))
        ax.invert_xaxis()
        ax.set_xlabel("target eps")
        ax.set_ylabel("oracle calls")
        ax.set_title("penalty method on T4")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "penalty_rate.png", dpi=120)
        print(f"saved {out / 'penalty_rate.txt'} and {out / 'penalty_rate.png'}")
    return rows


if __name__ == "__main__":
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    main()
