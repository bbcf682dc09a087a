"""Group-DRO last-layer retraining with tuned group adjustments (Shen et al., small).

Synthetic stand-in for Waterbirds/CelebA: frozen "features" with a weak core signal (the label
``y``) and a strong spurious one (an attribute ``a``), four groups ``(y, a)``, and training
data in which the groups with ``a != y`` are rare, so ERM leans on the spurious feature.

Lower level (group DRO on the last layer, weights ``w`` and group weights ``q`` on the
simplex)::

    min_w max_{q in simplex}  sum_g q_g (loss_g(w) + x1_g) + lam/2 ||w||^2 - tau/2 ||q - 1/G||^2

``x1`` are per-group loss adjustments (Sagawa et al.'s group adjustments, learned here).
Upper level: the worst-group validation loss ``min_x1 max_{x2 in simplex} sum_g x2_g
val_loss_g(w*(x1))``, ``x1`` in a box.

Methods compared:

* ``implicit``: ``tau > 0`` makes the lower level strongly convex–strongly concave;
  ``saddle_point`` (extragradient, simplex projection) gives exact hypergradients through the
  masked implicit rule; the upper level runs Adam on a smoothed max
  (``max_x2 x2'val - sigma/2 ||x2 - 1/G||^2``, Danskin gradient), projected on the box.
* ``penalty``: ``tau = 0`` (plain group DRO, linear in ``q``: not strongly concave) solved
  by ``penalty_bilevel_minimax`` (extragradient inner solver, rho = 1, 10, 100).
* ``stochastic penalty``: the stochastic variant of the penalty method (minibatch
  gradients), :func:`stochastic_penalty_method`: the same penalised minimax problem
  ``P_rho`` with the training losses of ``g`` estimated on a group-stratified minibatch
  (``batch`` examples from each group, so every group mean is estimated without bias), solved
  by projected stochastic extragradient (the same minibatch for both half steps) with the
  step ``eta0 / (1 + 2 rho)`` for each ``rho`` in 1, 10, 100 (warm-started), and the
  minibatch growing with ``rho``; the eps-KKT residual is then evaluated on the full data.
* baselines: ERM and group DRO with ``x1 = 0`` (``tau = 0`` and ``tau > 0``).

Reported: worst-group validation loss (exact max over groups) of each method's classifier,
worst-group and average test accuracy, compile time and the median run time.

Usage: ``python bench/group_dro.py [--small] [--reps N] [--out PATH] [--device cpu|gpu]``.
``--small`` (used by a test) runs in well under 30 s; the default size in under 2 minutes on
one CPU core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import _device

if __name__ == "__main__":  # before JAX starts; bench/ is on sys.path when run as a script
    _device.select()  # (on the CPU: one pinned core, single-threaded kernels, for timing)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

jax.config.update("jax_enable_x64", True)

from bilevel_jax._src.argmin import argmin  # noqa: E402
from bilevel_jax._src.minimax import saddle_point  # noqa: E402
from bilevel_jax._src.penalty_minimax import penalty_bilevel_minimax  # noqa: E402
from bilevel_jax._src.projections import Box, Simplex  # noqa: E402

G = 4  # groups (y, a) in {-1, 1}^2


def make_split(rng, n_per_group, d, core, spurious, noise=1.0):
    """Features for the given group sizes; group = 2 * (y > 0) + (a > 0)."""
    u_core, u_sp = np.zeros(d), np.zeros(d)
    u_core[: d // 2] = 1 / np.sqrt(d // 2)
    u_sp[d // 2 :] = 1 / np.sqrt(d - d // 2)
    xs, ys, gs = [], [], []
    for g, n in enumerate(n_per_group):
        y, a = (1.0 if g >= 2 else -1.0), (1.0 if g % 2 else -1.0)
        x = core * y * u_core + spurious * a * u_sp + noise * rng.standard_normal((n, d))
        xs.append(np.hstack([x, np.ones((n, 1))]))  # bias feature
        ys.append(np.full(n, y))
        gs.append(np.full(n, g))
    return np.vstack(xs), np.concatenate(ys), np.concatenate(gs)


def make_data(seed, n_train, n_val, n_test, d, minority=0.05, core=1.0, spurious=3.0):
    rng = np.random.default_rng(seed)
    major = int(n_train * (1 - minority) / 2)
    minor = int(n_train * minority / 2)
    # Groups 0 = (y-, a-) and 3 = (y+, a+) are the majority (a = y).
    train = make_split(rng, [major, minor, minor, major], d, core, spurious)
    val = make_split(rng, [n_val] * G, d, core, spurious)
    test = make_split(rng, [n_test] * G, d, core, spurious)
    return tuple(tuple(jnp.asarray(a) for a in split) for split in (train, val, test))


def group_losses(w, split):
    """Mean logistic loss per group (a length-G vector)."""
    x, y, g = split
    per = jax.nn.softplus(-y * (x @ w))
    onehot = jax.nn.one_hot(g, G, dtype=w.dtype)
    return (onehot.T @ per) / onehot.sum(0)


def group_accuracy(w, split):
    x, y, g = split
    correct = (jnp.sign(x @ w) == y).astype(w.dtype)
    onehot = jax.nn.one_hot(g, G, dtype=w.dtype)
    return (onehot.T @ correct) / onehot.sum(0), correct.mean()


def lower_level(train, lam, tau):
    """``f(w, q, x1)`` of the group-DRO lower level."""

    def f(w, q, x1):
        losses = group_losses(w, train) + x1
        return q @ losses + 0.5 * lam * w @ w - 0.5 * tau * jnp.sum((q - 1.0 / G) ** 2)

    return f


def smoothed_worst(losses, sigma):
    """``max_{x2 in simplex} x2'losses - sigma/2 ||x2 - 1/G||^2`` and its maximiser."""
    x2 = jax.lax.stop_gradient(Simplex().project(1.0 / G + losses / sigma))
    return x2 @ losses - 0.5 * sigma * jnp.sum((x2 - 1.0 / G) ** 2), x2


def implicit_method(train, val, *, lam, tau, sigma, steps, lr, box):
    f = lower_level(train, lam, tau)
    d = train[0].shape[1]
    opt = optax.adam(lr)

    def solve(x1, w0, q0, tol=1e-8):
        return saddle_point(f, w0, q0, x1, v_set=Simplex(), solver="extragradient", tol=tol,
                            max_iter=100000)

    def objective(x1, w0, q0, tol=1e-8):
        sol = solve(x1, w0, q0, tol)
        value, _ = smoothed_worst(group_losses(sol.u, val), sigma)
        return value, sol

    def step(carry, _):
        x1, state, w, q = carry
        (value, sol), grad = jax.value_and_grad(objective, has_aux=True)(x1, w, q)
        updates, state = opt.update(grad, state)
        x1 = box.project(optax.apply_updates(x1, updates))
        return (x1, state, sol.u, sol.v), value

    @jax.jit
    def run():
        x1 = jnp.zeros(G)
        carry = (x1, opt.init(x1), jnp.zeros(d), jnp.full(G, 1.0 / G))
        (x1, _, w, q), trace = jax.lax.scan(step, carry, None, length=steps)
        sol = solve(x1, w, q)
        return x1, sol.u, sol.info.status, trace

    @jax.jit
    def check(x1, h=1e-5):
        """Implicit hypergradient vs central differences of the smoothed upper level (lower
        level solved to 1e-13, so the differences carry ~1e-13/h of solver error)."""
        w0, q0 = jnp.zeros(d), jnp.full(G, 1.0 / G)
        grad = jax.grad(lambda x: objective(x, w0, q0, 1e-13)[0])(x1)
        values = jax.vmap(lambda x: objective(x, w0, q0, 1e-13)[0])(
            jnp.concatenate([x1 + h * jnp.eye(G), x1 - h * jnp.eye(G)]))
        fd = (values[:G] - values[G:]) / (2 * h)
        return jnp.linalg.norm(grad - fd) / jnp.linalg.norm(fd)

    return run, check


def penalty_method(train, val, *, lam, box, rho_max, tol, max_iter):
    d = train[0].shape[1]

    def f(x1, x2, w, q, th):
        return x2 @ group_losses(w, val)

    def g(x1, w, q, th):
        return q @ (group_losses(w, train) + x1) + 0.5 * lam * w @ w

    @jax.jit
    def run():
        sol = penalty_bilevel_minimax(
            f, g, jnp.zeros(G), jnp.full(G, 1.0 / G), jnp.zeros(d), jnp.full(G, 1.0 / G),
            x1_set=box, x2_set=Simplex(), y2_set=Simplex(), rho0=1.0, rho_growth=10.0,
            rho_max=rho_max, tol=tol, max_iter=max_iter,
        )
        return sol.x1, sol.y1, sol.info.status, sol.kkt.max(), sol.rho, sol.info.num_steps

    return run


def stochastic_penalty_method(train, val, *, lam, box, rhos=(1.0, 10.0, 100.0), steps=2000,
                              batch=16, batch_growth=2, eta0=1.0, seed=0):
    """Minibatch (stochastic) penalty method: projected stochastic extragradient on ``P_rho``.

    ``u = (x1, w, q)`` is minimised and ``v = (x2, z1, z2)`` maximised in
    ``P_rho = x2' val_loss(w) + rho [g(x1, w, z2; B) - g(x1, z1, q; B)]`` with
    ``g(x1, w, q; B) = q' (loss_B(w) + x1) + lam/2 ||w||^2`` and ``loss_B`` the per-group mean
    losses on the stratified minibatch ``B`` (``batch`` examples per group, times
    ``batch_growth`` at each new ``rho``). Returns a jitted ``run()`` giving ``(x1, w, kkt,
    oracle_examples)``: the full-data eps-KKT residual (``mu = rho``) at the end and the number
    of per-example loss gradients spent.
    """
    from bilevel_jax._src.penalty_minimax import bilevel_minimax_kkt

    x_tr, y_tr, g_tr = train
    d = x_tr.shape[1]
    groups = np.asarray(g_tr)
    starts = jnp.asarray([int(np.flatnonzero(groups == k)[0]) for k in range(G)])
    sizes = jnp.asarray([int(np.sum(groups == k)) for k in range(G)])
    simplex = Simplex()

    def batch_losses(w, idx):
        per = jax.nn.softplus(-y_tr[idx] * (x_tr[idx] @ w))  # (G, b)
        return per.mean(axis=1)

    def g_batch(x1, w, q, idx):
        return q @ (batch_losses(w, idx) + x1) + 0.5 * lam * w @ w

    def f(x1, x2, w, q):
        return x2 @ group_losses(w, val)

    def P(u, v, rho, idx):
        (x1, w, q), (x2, z1, z2) = u, v
        return f(x1, x2, w, q) + rho * (g_batch(x1, w, z2, idx) - g_batch(x1, z1, q, idx))

    grads = jax.grad(P, argnums=(0, 1))

    def proj(u, v):
        (x1, w, q), (x2, z1, z2) = u, v
        return ((box.project(x1), w, simplex.project(q)),
                (simplex.project(x2), z1, simplex.project(z2)))

    def step_fn(rho, b):
        eta = eta0 / (1 + 2 * rho)

        def step(carry, key):
            u, v = carry
            idx = starts[:, None] + jax.random.randint(key, (G, b), 0, sizes[:, None])
            gu, gv = grads(u, v, rho, idx)
            uh, vh = proj(jax.tree_util.tree_map(lambda a, c: a - eta * c, u, gu),
                          jax.tree_util.tree_map(lambda a, c: a + eta * c, v, gv))
            gu, gv = grads(uh, vh, rho, idx)
            return proj(jax.tree_util.tree_map(lambda a, c: a - eta * c, u, gu),
                        jax.tree_util.tree_map(lambda a, c: a + eta * c, v, gv)), None

        return step

    def full_g(x1, w, q, th):
        return q @ (group_losses(w, train) + x1) + 0.5 * lam * w @ w

    def full_f(x1, x2, w, q, th):
        return f(x1, x2, w, q)

    @jax.jit
    def run():
        unif = jnp.full(G, 1.0 / G)
        u = (jnp.zeros(G), jnp.zeros(d), unif)
        v = (unif, jnp.zeros(d), unif)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(rhos))
        examples = 0
        for k, rho in enumerate(rhos):
            b = batch * batch_growth**k
            (u, v), _ = jax.lax.scan(step_fn(rho, b), (u, v),
                                     jax.random.split(keys[k], steps))
            examples += steps * 2 * 2 * G * b  # 2 half steps, g at two points, G b examples
        (x1, w, q), (x2, z1, z2) = u, v
        kkt = bilevel_minimax_kkt(full_f, full_g, x1, x2, w, q, z1, z2, rhos[-1], None,
                                  x1_set=box, x2_set=simplex, y2_set=simplex)
        return x1, w, kkt.max(), examples

    return run


def baselines(train, *, lam, tau):
    d = train[0].shape[1]

    @jax.jit
    def erm():
        def loss(w, _):
            x, y, _g = train
            return jnp.mean(jax.nn.softplus(-y * (x @ w))) + 0.5 * lam * w @ w

        return argmin(loss, jnp.zeros(d), None).y

    def dro(tau_):
        f = lower_level(train, lam, tau_)
        return jax.jit(lambda: saddle_point(f, jnp.zeros(d), jnp.full(G, 1.0 / G), jnp.zeros(G),
                                            v_set=Simplex(), solver="extragradient",
                                            tol=1e-8, max_iter=50000).u)

    return erm, dro(0.0), dro(tau)


def resolve_lower_level(train, lam, tau):
    d = train[0].shape[1]
    f = lower_level(train, lam, tau)
    return jax.jit(lambda x1: saddle_point(f, jnp.zeros(d), jnp.full(G, 1.0 / G), x1,
                                           v_set=Simplex(), solver="extragradient", tol=1e-8,
                                           max_iter=50000).u)


def timed(fn, reps):
    """Compile time (trace, lower and compile) and the median run time over ``reps`` runs."""
    t0 = time.perf_counter()
    compiled = fn.lower().compile()
    compile_s = time.perf_counter() - t0
    runs = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled())
        runs.append(time.perf_counter() - t0)
    return out, compile_s, float(np.median(runs))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="tiny problem (< 30 s)")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="file for the table (default: "
                        "bench/results/group_dro.txt; with --small: not saved)")
    _device.add_option(parser)
    args = parser.parse_args(argv)
    if args.small:
        sizes = dict(n_train=400, n_val=100, n_test=500, d=8)
        steps, max_iter, reps = 40, 5000, 1 if args.reps is None else args.reps
    else:
        sizes = dict(n_train=2000, n_val=250, n_test=2000, d=16)
        steps, max_iter, reps = 100, 20000, 3 if args.reps is None else args.reps
    lam, tau, sigma = 1e-2, 0.1, 0.05
    box = Box(-1.0, 1.0)
    train, val, test = make_data(args.seed, **sizes)

    rows = []

    def report(name, w, x1, compile_s, run_s, note=""):
        wg_val = float(jnp.max(group_losses(w, val)))
        acc_g, acc = group_accuracy(w, test)
        rows.append((name, wg_val, float(jnp.min(acc_g)), float(acc),
                     "-" if compile_s is None else f"{compile_s:.1f}",
                     "-" if run_s is None else f"{run_s:.2f}",
                     "-" if x1 is None else np.array2string(np.asarray(x1), precision=2),
                     note))

    erm, dro0, dro_tau = baselines(train, lam=lam, tau=tau)
    w, c, r = timed(erm, reps)
    report("ERM", w, None, c, r)
    w, c, r = timed(dro0, reps)
    report("group DRO, x1 = 0, tau = 0", w, jnp.zeros(G), c, r)
    w, c, r = timed(dro_tau, reps)
    report(f"group DRO, x1 = 0, tau = {tau}", w, jnp.zeros(G), c, r)

    run, check = implicit_method(train, val, lam=lam, tau=tau, sigma=sigma, steps=steps,
                                 lr=0.05, box=box)
    (x1, w, status, trace), c, r = timed(run, reps)
    error = float(check(x1))
    report(f"implicit (saddle_point), tau = {tau}", w, x1, c, r,
           f"{steps} Adam steps, final LL status {int(status)}, hypergradient rel. error "
           f"{error:.1e} vs central differences")
    w_unreg = resolve_lower_level(train, lam, 0.0)(x1)
    report("  same x1, LL re-solved with tau = 0", w_unreg, x1, None, None)

    rho_max = 100.0
    run = penalty_method(train, val, lam=lam, box=box, rho_max=rho_max, tol=1e-3,
                         max_iter=max_iter)
    (x1, w, status, kkt, rho, steps_pen), c, r = timed(run, reps)
    report("penalty (PBM), tau = 0", w, x1, c, r,
           f"rho = {float(rho):g}, eps-KKT residual {float(kkt):.1e} (tol 1e-3), status "
           f"{int(status)}, {int(steps_pen)} inner steps")
    w_unreg = resolve_lower_level(train, lam, 0.0)(x1)
    report("  same x1, LL re-solved with tau = 0", w_unreg, x1, None, None)

    n_train = int(train[0].shape[0])
    run = stochastic_penalty_method(train, val, lam=lam, box=box,
                                    steps=300 if args.small else 3000)
    (x1, w, kkt, examples), c, r = timed(run, reps)
    report("stochastic penalty (minibatch), tau = 0", w, x1, c, r,
           f"rho = 100, full-data eps-KKT residual {float(kkt):.1e}, {int(examples)} "
           f"per-example gradients (= {int(examples) / n_train:.0f} passes over the "
           f"{n_train} training examples; the deterministic run above: "
           f"{2 * 2 * int(steps_pen)} passes)")
    w_unreg = resolve_lower_level(train, lam, 0.0)(x1)
    report("  same x1, LL re-solved with tau = 0", w_unreg, x1, None, None)

    header = (f"group-DRO last-layer retraining, {'small' if args.small else 'default'} size "
              f"{sizes}, lam = {lam}, seed {args.seed}; device {jax.devices()[0].platform}, "
              f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, median of {reps} run(s); "
              "run s excludes compilation")
    cols = ("method", "worst-group val loss", "worst-group test acc", "avg test acc",
            "compile s", "run s", "x1", "note")
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, wg, wacc, acc, c, r, x1s, note in rows:
        lines.append(f"| {name} | {wg:.4f} | {wacc:.3f} | {acc:.3f} | {c} | {r} | "
                     f"{x1s} | {note} |")
    table = "\n".join(lines)
    print(table)
    out = args.out
    if out is None and not args.small:
        out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "group_dro.txt")
    if out:
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        with open(out, "w") as fh:
            fh.write(table + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
