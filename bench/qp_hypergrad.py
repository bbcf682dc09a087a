"""Hypergradient time and accuracy on Kornowski et al.'s Problem L.1, against the peers.

    min_x  c^T y*(x) + 0.01 ||x||^2 + 0.01 ||y*(x)||^2
    y*(x) = argmin_y 1/2 y^T Q y + x^T P y   s.t.   A y <= b          (Problem L.1)

For each size, one run times the hypergradient ``dF/dx`` (forward solve + backward pass,
``jit``-compiled where the method allows it; compile time reported apart) of

* bilevel_jax: ``bj.solve_qp`` with each rule (implicit, relaxed, penalty) and ``bj.argmin``
  with ``ineq=`` (interior point + active-set KKT);
* qpax (``solve_qp_primal``, smoothed derivatives), jaxopt's ``OSQP`` (implicit
  differentiation of ADMM iterates) and cvxpylayers (``CvxpyLayer``, JAX interface, not
  jittable), each with its default settings, where installed (``pip install -e .[bench]``);

and the relative error ``||g - g_ref|| / ||g_ref||`` against an exact float64 reference that
shares no code with bilevel_jax: a Clarabel solve (through CVXPY) polished on its active set,
then the KKT system on that set in NumPy. It prints a table of medians and ratios and saves
it under ``bench/results/``. On the CPU threads are pinned (XLA and BLAS) for stable timings.

Usage::

    python bench/qp_hypergrad.py                         # dy in {50, 100, 200, 500, 1000}
    python bench/qp_hypergrad.py --dy 200 --batch 64     # vmap over 64 upper-level points
    python bench/qp_hypergrad.py --small                 # a quick smoke run
    python bench/qp_hypergrad.py --device gpu --dy 200 --batch 1024 --dtype float64 float32
"""

from __future__ import annotations

import argparse

import _device

# On the CPU, every method pinned to one core (as in the paper's timings) and to
# single-threaded kernels; ``--device gpu`` runs on the GPU.
if __name__ == "__main__":  # before JAX starts (importing this file configures nothing)
    _device.select()

import pathlib  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import bilevel_jax as bj  # noqa: E402

jax.config.update("jax_enable_x64", True)


def l1_problem(seed: int, dx: int, dy: int, dist: str = "uniform"):
    """Problem L.1's data (``bj.problems.kornowski_l1``, the authors' draw order)."""
    return bj.problems.kornowski_l1(seed, dx, dy, dist)[1]


def upper(x, y, c):
    return c @ y + 0.01 * x @ x + 0.01 * y @ y


# ------------------------------------------------------------------------ exact reference


def reference_gradient(prob, x):
    """Clarabel solve, polished on the active set, then the KKT hypergradient in NumPy."""
    import cvxpy as cp

    Q, P, A, b, c = prob["Q"], prob["P"], prob["A"], prob["b"], prob["c"]
    y = cp.Variable(Q.shape[0])
    cons = [A @ y <= b]
    problem = cp.Problem(cp.Minimize(0.5 * cp.quad_form(y, cp.psd_wrap(Q)) + (P.T @ x) @ y), cons)
    problem.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    lam, slack = cons[0].dual_value, b - A @ y.value
    active = np.flatnonzero(lam > slack)
    AI = A[active]
    k = len(active)
    K = np.block([[Q, AI.T], [AI, np.zeros((k, k))]])
    z = np.linalg.solve(K, np.concatenate([-P.T @ x, b[active]]))
    y_ref, lam_I = z[: Q.shape[0]], z[Q.shape[0]:]
    assert np.all(lam_I >= -1e-10) and np.all(A @ y_ref <= b + 1e-9), "polish failed"
    v = c + 0.02 * y_ref
    w = np.linalg.solve(K, np.concatenate([v, np.zeros(k)]))[: Q.shape[0]]
    return 0.02 * x - P @ w, len(active)


# ------------------------------------------------------------------------ methods


def bilevel_jax_methods(prob, dtype):
    Q, P, A, b, c = (jnp.asarray(prob[k], dtype) for k in ("Q", "P", "A", "b", "c"))
    methods = {}
    for rule in ("implicit", "relaxed", "penalty"):
        def F(x, rule=rule):
            return upper(x, bj.solve_qp(Q, P.T @ x, G=A, h=b, hypergrad=rule).y, c)

        methods[f"bj.solve_qp[{rule}]"] = (jax.jit(jax.grad(F)), True)

    def g(y, x):
        return 0.5 * y @ (Q @ y) + (P.T @ x) @ y

    def F_argmin(x):
        return upper(x, bj.argmin(g, jnp.zeros_like(c), x, ineq=lambda x: (A, b)).y, c)

    methods["bj.argmin[ineq]"] = (jax.jit(jax.grad(F_argmin)), True)
    return methods


def peer_methods(prob, dtype, batch):
    methods = {}
    Q, P, A, b, c = (jnp.asarray(prob[k], dtype) for k in ("Q", "P", "A", "b", "c"))
    try:
        import qpax

        A0, b0 = jnp.zeros((0, Q.shape[0]), dtype), jnp.zeros((0,), dtype)

        def F_qpax(x):
            return upper(x, qpax.solve_qp_primal(Q, P.T @ x, A0, b0, A, b), c)

        methods["qpax"] = (jax.jit(jax.grad(F_qpax)), True)
    except ImportError:
        print("qpax not installed: skipped")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from jaxopt import OSQP

        def F_osqp(x):
            sol = OSQP().run(params_obj=(Q, P.T @ x), params_ineq=(A, b)).params.primal
            return upper(x, sol, c)

        methods["jaxopt.OSQP"] = (jax.jit(jax.grad(F_osqp)), True)
    except ImportError:
        print("jaxopt not installed: skipped")
    if dtype == jnp.float64:
        try:
            import cvxpy as cp
            from cvxpylayers.jax import CvxpyLayer

            n = Q.shape[0]
            q = cp.Parameter(n)
            y = cp.Variable(n)
            objective = 0.5 * cp.sum_squares(np.linalg.cholesky(prob["Q"]).T @ y) + q @ y
            problem = cp.Problem(cp.Minimize(objective), [prob["A"] @ y <= prob["b"]])
            layer = CvxpyLayer(problem, parameters=[q], variables=[y])

            def F_cvx(x):
                return upper(x, layer(P.T @ x)[0], c)

            def F_cvx_batched(xs):
                ys = layer(xs @ P)[0]
                return jnp.sum(jax.vmap(upper, in_axes=(0, 0, None))(xs, ys, c))

            methods["cvxpylayers"] = (jax.grad(F_cvx_batched if batch else F_cvx), False)
        except ImportError:
            print("cvxpylayers not installed: skipped")
    return methods


# ------------------------------------------------------------------------ timing


def time_method(fn, x, reps, budget):
    """Compile (first call) time, then the median of up to ``reps`` calls within ``budget`` s."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(x))
    first = time.perf_counter() - t0
    times = []
    while len(times) < reps and sum(times) < budget:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        times.append(time.perf_counter() - t0)
    return np.asarray(out), first, float(np.median(times)), len(times)


def run(dys, dx, batch, dtypes, reps, budget, seed):
    rows = []
    for dy in dys:
        prob = l1_problem(seed, dx, dy)
        x = prob["x0"]
        xs = x + 0.1 * np.random.RandomState(seed + 1).rand(batch, dx) if batch else None
        ref, n_active = reference_gradient(prob, x)
        refs = np.stack([reference_gradient(prob, xi)[0] for xi in xs]) if batch else None
        for dtype in dtypes:
            methods = {**bilevel_jax_methods(prob, dtype), **peer_methods(prob, dtype, batch)}
            base = None
            for name, (fn, jittable) in methods.items():
                if batch and jittable:
                    fn = jax.jit(jax.vmap(fn))
                arg = jnp.asarray(xs if batch else x, dtype)
                try:
                    out, first, median, n = time_method(fn, arg, reps, budget)
                except Exception as err:  # a peer failing is a result, not a crash
                    print(f"{name} failed at dy={dy}: {type(err).__name__}: {err}")
                    continue
                target = refs if batch else ref
                err = np.linalg.norm(out - target) / np.linalg.norm(target)
                if name == "bj.solve_qp[implicit]":
                    base = median
                rows.append(dict(dy=dy, dtype=jnp.dtype(dtype).name, method=name, median_s=median,
                                 compile_s=first - median, reps=n, rel_error=err,
                                 active=n_active))
            for row in rows:
                if row["dy"] == dy and row["dtype"] == jnp.dtype(dtype).name:
                    row["ratio"] = row["median_s"] / base if base else float("nan")
    return rows


def format_table(rows, header):
    lines = [header, f"{'dy':>5} {'dtype':>8} {'method':<24} {'median ms':>11} {'x bj.impl':>10} "
             f"{'compile s':>10} {'reps':>5} {'rel. error':>11}"]
    for r in rows:
        lines.append(
            f"{r['dy']:5d} {r['dtype']:>8} {r['method']:<24} {1e3 * r['median_s']:11.3f} "
            f"{r['ratio']:10.1f} {r['compile_s']:10.2f} {r['reps']:5d} {r['rel_error']:11.2e}"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dy", type=int, nargs="+", default=[50, 100, 200, 500, 1000])
    parser.add_argument("--dx", type=int, default=100)
    parser.add_argument("--batch", type=int, default=0, help="vmap batch size (0: single)")
    parser.add_argument("--dtype", nargs="+", default=["float64", "float32"])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds per method and size")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--small", action="store_true", help="dy=20, dx=10, 3 reps")
    _device.add_option(parser)
    parser.add_argument("--out", default=None, help="file for the table (default bench/results)")
    args = parser.parse_args(argv)
    if args.small:
        args.dy, args.dx, args.reps, args.budget = [20], 10, 3, 2.0
    dtypes = [jnp.dtype(d).type for d in args.dtype]
    rows = run(args.dy, args.dx, args.batch, dtypes, args.reps, args.budget, args.seed)
    header = (f"Problem L.1, dx={args.dx}, m=dy/5, seed {args.seed}, "
              f"{'batch ' + str(args.batch) if args.batch else 'single problem'}, "
              f"device {jax.devices()[0].device_kind}"
              f"{' (one core)' if jax.default_backend() == 'cpu' else ''}; "
              "time per hypergradient (forward+backward), "
              "ratio = median / median of bj.solve_qp[implicit]; error vs float64 KKT reference")
    table = format_table(rows, header)
    print(table)
    out = args.out
    if out is None and not args.small:
        name = f"qp_hypergrad_{'batch' + str(args.batch) if args.batch else 'single'}.txt"
        out = str(pathlib.Path(__file__).parent / "results" / name)
    if out:
        pathlib.Path(out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(out).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
