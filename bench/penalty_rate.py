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

A second table runs a constrained lower level through the Lagrangian reduction (T5:
``y*(x) = argmin 1/2 ||y - x||^2 s.t. y1 + y2 <= 1``, upper level
``1/2 ||x - (2, 0)||^2 + 1/2 ||y* - (2, 1)||^2``, solution ``x* = (1.75, 0.25)``,
``lam* = 0.5``): ``bj.lagrangian_minimax`` with the default bound ``Lambda = 10``, then the
penalty method with the continuation schedule, for the same eps; the multiplier bound is
checked at each solution (``LagrangianMinimax.bound_active`` on the returned ``y2 = lam``),
and a last row with ``Lambda = 0.25 < lam*`` shows the check firing.

Usage: ``python bench/penalty_rate.py [--small] [--out DIR] [--device cpu|gpu]``; ``--small``
(three eps, the smoke test) saves nothing unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import pathlib
import time

import _device

if __name__ == "__main__":  # before JAX starts; bench/ is on sys.path when run as a script
    _device.select()  # (on the CPU: one pinned core, single-threaded kernels)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

from bilevel_jax._src.penalty_minimax import (  # noqa: E402
    lagrangian_minimax,
    penalty_bilevel_minimax,
)

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


T5_X_STAR = np.array([1.75, 0.25])


def t5_g(x, y, th):
    return 0.5 * jnp.sum((y - x) ** 2)


def t5_c(x, y, th):
    return jnp.asarray([y[0] + y[1] - 1.0])


def t5_f(x, x2, y, lam, th):
    return 0.5 * jnp.sum((x - jnp.asarray([2.0, 0.0])) ** 2) \
        + 0.5 * jnp.sum((y - jnp.asarray([2.0, 1.0])) ** 2)


def solve_constrained(eps, max_iter, lam_max=10.0):
    lag = lagrangian_minimax(t5_g, t5_c, jnp.zeros(2), jnp.zeros(2), lam_max=lam_max)
    run = jax.jit(lambda: penalty_bilevel_minimax(
        t5_f, lag.lagrangian, jnp.zeros(2), None, jnp.zeros(2), jnp.zeros(1),
        y2_set=lag.lam_set, rho0=1.0, rho_growth=10.0, rho_max=1e6, tol=eps,
        max_iter=max_iter))
    sol = jax.block_until_ready(run())
    return dict(eps=eps, lam_max=lam_max, rho=float(sol.rho), iters=int(sol.info.num_steps),
                oracles=ORACLES_PER_ITERATION * int(sol.info.num_steps),
                kkt=float(sol.kkt.max()), status=int(sol.info.status),
                err=float(np.max(np.abs(np.asarray(sol.x1) - T5_X_STAR))),
                lam=float(sol.y2[0]), active=bool(lag.bound_active(sol.y2)),
                violation=float(t5_c(sol.x1, sol.y1, None)[0]))


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
    _device.add_option(parser)
    args = parser.parse_args(argv)
    epsilons = SMALL_EPSILONS if args.small else EPSILONS
    rows = {mode: [solve(eps, mode, args.max_iter) for eps in epsilons]
            for mode in ("theory", "continuation")}
    curves = dict(rows)
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
    cons = [solve_constrained(eps, args.max_iter) for eps in epsilons]
    cons.append(solve_constrained(epsilons[-1], args.max_iter, lam_max=0.25))
    rows["constrained"] = cons
    lines += [
        "", "Constrained lower level through the Lagrangian reduction (T5, lagrangian_minimax, "
        "continuation schedule); x* = (1.75, 0.25), lam* = 0.5; 'bound active' = "
        "LagrangianMinimax.bound_active(y2).", "",
        "| Lambda | eps | final rho | oracle calls | eps-KKT residual | status | "
        "max abs(x - x*) | lam | bound active | c(x, y) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in cons:
        lines.append(
            f"| {r['lam_max']:g} | {r['eps']:.0e} | {r['rho']:.0e} | {r['oracles']} | "
            f"{r['kkt']:.1e} | {r['status']} | {r['err']:.1e} | {r['lam']:.4f} | "
            f"{'YES' if r['active'] else 'no'} | {r['violation']:.1e} |")
    lines.append(f"log-log slope of oracle calls vs eps, constrained (Lambda = 10): "
                 f"{slope(cons[:-1]):.2f} (analysis: -4, as for the minimax lower level; "
                 "Lu & Mei's method: -7)")
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
        for (mode, rs), marker in zip(curves.items(), "os", strict=True):
            eps = np.array([r["eps"] for r in rs])
            cost = np.array([r["oracles"] for r in rs])
            ax.loglog(eps, cost, marker=marker, label=f"{mode} (slope {slope(rs):.2f})")
        eps = np.array(epsilons)
        ref = rows["theory"][0]["oracles"]
        ax.loglog(eps, ref * (eps / eps[0]) ** -1.0, "k:", lw=0.8, label="eps^-1")
        ax.loglog(eps, ref * (eps / eps[0]) ** -4.0, "k--", lw=0.8, label="eps^-4 (analysis)")
        rs = cons[:-1]
        ax.loglog(eps, [r["oracles"] for r in rs], marker="^",
                  label=f"constrained LL, Lagrangian (slope {slope(rs):.2f})")
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
    main()
