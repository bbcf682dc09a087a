"""Box-constrained lower level at large n: bj.argmin(box=) against jaxopt's ProjectedGradient.

    y*(theta) = argmin_{lo <= y <= hi} 1/2 y'(I + 0.2 L) y - theta'y ,     loss w'y*(theta)

``L`` the path-graph Laplacian (applied matrix-free), ``theta ~ N(0, 1)``, ``lo = -0.3``,
``hi = 0.3``. Each method's forward solve and hypergradient ``d(w'y*)/d theta`` are timed
together (``jax.jit``, compile time apart, median over ``--reps``) and compared with an
exact reference that shares no code with bilevel_jax: a primal-dual active-set iteration in
SciPy (a banded solve on the free coordinates per round; ``I + 0.2 L`` is an M-matrix, so
the iteration ends in a few rounds), then ``(I + 0.2 L)_FF w_F = w_F`` on the final free set
(the hypergradient is zero on the coordinates at a bound).

Usage::

    python bench/box_qp.py --float32                     # n = 1e3, 1e4, 1e5 on one core
    python bench/box_qp.py --device gpu --sizes 1000000 4000000 16000000 --float32
"""

from __future__ import annotations

import argparse
import os
import sys

import _device

if __name__ == "__main__":  # before JAX starts (importing this file configures nothing)
    _device.select()

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg as sla  # noqa: E402

import bilevel_jax as bj  # noqa: E402

jax.config.update("jax_enable_x64", True)

LO, HI, MU = -0.3, 0.3, 0.2


def hess_apply(y):
    """``(I + MU L) y`` with ``L`` the path-graph Laplacian (degree 1 at the ends)."""
    d = jnp.diff(y)
    return y + MU * (jnp.concatenate([-d, d[-1:] * 0]) + jnp.concatenate([d[:1] * 0, d]))


def g(y, theta):
    return 0.5 * y @ hess_apply(y) - theta @ y


def reference(theta, w):
    """Primal-dual active-set iteration on the box QP (SciPy), and the exact hypergradient."""
    n = theta.size
    main = 1 + MU * np.r_[1.0, np.full(n - 2, 2.0), 1.0]
    off = np.full(n - 1, -MU)

    def hv(y):
        return main * y + np.r_[off * y[1:], 0] + np.r_[0, off * y[:-1]]

    def solve_free(free, rhs):
        """``H_FF x = rhs_F`` (tridiagonal; chains of free coordinates are decoupled)."""
        idx = np.flatnonzero(free)
        link = np.where(np.diff(idx) == 1, off[idx[:-1]], 0.0)
        ab = np.zeros((3, idx.size))
        ab[0, 1:], ab[1], ab[2, :-1] = link, main[idx], link
        return idx, sla.solve_banded((1, 1), ab, rhs[idx])

    y = np.clip(theta / main, LO, HI)
    for rounds in range(1, 101):  # noqa: B007 (reported)
        grad = hv(y) - theta
        at_lo = (y <= LO) & (grad >= 0)
        at_hi = (y >= HI) & (grad <= 0)
        fixed_y = np.where(at_hi, HI, np.where(at_lo, LO, 0.0))
        free = ~(at_lo | at_hi)
        idx, yf = solve_free(free, theta - hv(fixed_y))
        new = fixed_y.copy()
        new[idx] = yf
        new = np.clip(new, LO, HI)
        if np.array_equal(new, y):
            break
        y = new
    grad = hv(y) - theta
    kkt = np.max(np.abs(np.where(free, grad, np.minimum(0, np.where(at_lo, grad, -grad)))))
    idx, wf = solve_free(free, w)
    dtheta = np.zeros(n)
    dtheta[idx] = wf
    return y, dtheta, dict(rounds=rounds, kkt=kkt, at_bound=int((~free).sum()))


def ours(w, tol):
    def loss(theta):
        sol = bj.argmin(g, jnp.zeros_like(theta), theta, box=lambda _: (LO, HI), tol=tol)
        return w @ sol.y, sol

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def jaxopt_pg(w, tol):
    from jaxopt import ProjectedGradient
    from jaxopt.projection import projection_box

    pg = ProjectedGradient(fun=g, projection=projection_box, tol=tol, maxiter=10000,
                           implicit_diff=True)

    def loss(theta):
        y = pg.run(jnp.zeros_like(theta), hyperparams_proj=(LO, HI), theta=theta).params
        return w @ y, y

    return jax.jit(jax.value_and_grad(loss, has_aux=True))


def timed(fn, arg, reps):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(arg))
    first = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(arg))
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times)), first


def rel(got, want):
    got = np.asarray(got, np.float64)
    if not np.all(np.isfinite(got)):
        return np.inf
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-300))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--float32", action="store_true", help="also float32")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                  "box_qp.txt"))
    _device.add_option(ap)
    args = ap.parse_args(argv)
    lines = []

    def say(s):
        print(s, flush=True)
        lines.append(s)

    say(f"# bench/box_qp.py  {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    say(f"# jax {jax.__version__}, devices {jax.devices()}, argv {' '.join(sys.argv[1:])}")
    say("# box QP: 1/2 y'(I + 0.2 L)y - theta'y, -0.3 <= y <= 0.3; loss w'y*; fwd+bwd "
        "median seconds (compile apart); errors: relative 2-norm against the SciPy "
        "active-set reference")
    say(f"{'n':>9} {'method':<34} {'dtype':<8} {'fwd+bwd s':>10} {'compile s':>9} "
        f"{'err y':>9} {'err d/dtheta':>12} {'x ours':>7}")
    dtypes = [jnp.float64] + ([jnp.float32] if args.float32 else [])
    for n in args.sizes:
        rng = np.random.default_rng(args.seed)
        theta_np, w_np = rng.standard_normal(n), rng.standard_normal(n)
        t0 = time.perf_counter()
        y_ref, d_ref, info = reference(theta_np, w_np)
        say(f"# n = {n}: reference in {time.perf_counter() - t0:.1f} s, {info['rounds']} "
            f"active-set rounds, {info['at_bound']} coordinates at a bound, KKT residual "
            f"{info['kkt']:.1e}")
        for dtype in dtypes:
            theta, w = jnp.asarray(theta_np, dtype), jnp.asarray(w_np, dtype)
            tol = 1e-10 if dtype == jnp.float64 else 1e-5
            t_ours = None
            for name, make in [(f"bj.argmin(box=) tol={tol:g}", ours),
                               (f"jaxopt ProjectedGradient tol={tol:g}", jaxopt_pg)]:
                try:
                    ((_, aux), grad), t, first = timed(make(w, tol), theta, args.reps)
                except Exception as e:  # noqa: BLE001 - a bench reports, it does not stop
                    say(f"{n:>9} {name} FAILED: {type(e).__name__}: {str(e)[:200]}")
                    continue
                y = aux.y if hasattr(aux, "y") else aux
                t_ours = t if t_ours is None else t_ours
                say(f"{n:>9} {name:<34} {jnp.dtype(dtype).name:<8} {t:10.4f} {first - t:9.1f} "
                    f"{rel(y, y_ref):9.1e} {rel(grad, d_ref):12.1e} {t / t_ours:7.2f}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
