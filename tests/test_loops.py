# ruff: noqa: B023  (the loops' search closures are called at once, in the iteration they read)
"""The iteration toolkit (``_src/loops.py``) and the unrolled rules built on it.

The unrolled hypergradient must differentiate the iteration that ran: on strictly convex
problems with a fixed iteration count, the unrolled gradient equals the gradient of an
explicitly written Python loop of the same steps (step sizes chosen by the same tests and held
constant), and the unrolled iterate equals the ``while_loop`` forward's after as many steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax._src import loops

TINY_TOL = 1e-300  # the forward runs every one of its max_iter steps
Q = jnp.array([[3.0, 1.0, 0.0], [1.0, 2.0, 0.5], [0.0, 0.5, 1.5]])
THETA = jnp.array([1.0, -0.5, 0.3])
Y0 = jnp.array([3.0, -2.0, 2.5])
LO, HI = -0.6, 0.8


def g(y, theta):
    """Strictly convex, not quadratic (pseudo-Huber): Newton needs damped steps from Y0."""
    return 0.05 * y @ Q @ y - theta @ y + jnp.sum(jnp.sqrt(1 + y**2))


def upper(y):
    return jnp.sum(jnp.sin(y)) + y[0] * y[1]


def sg(x):
    return jax.lax.stop_gradient(x)


class Decisions:
    """The loops' discrete choices: made (eagerly, on concrete values) and recorded on the
    first run, replayed on the next (so the replay can be jitted and differentiated)."""

    def __init__(self):
        self.made, self.replay = [], None

    def __call__(self, choose):
        if self.replay is None:
            self.made.append(choose())
            return self.made[-1]
        return next(self.replay)

    def again(self):
        self.replay = iter(self.made)
        return self


def newton_loop(theta, num_steps, choose):
    """Damped Newton, written out: Armijo on g or decrease of ||grad g||, halving from 1."""
    grad_g = jax.jit(jax.grad(g))
    y = Y0
    for _ in range(num_steps):
        grad = grad_g(y, theta)
        direction = -jnp.linalg.solve(jax.hessian(g)(y, theta), grad)

        def search():
            value, slope = g(y, theta), grad @ direction
            gnorm, t = jnp.linalg.norm(grad), 1.0
            while True:
                y_t = y + t * direction
                armijo = g(y_t, theta) <= value + 1e-4 * t * slope
                smaller = jnp.linalg.norm(grad_g(y_t, theta)) <= (1 - 1e-4 * t) * gnorm
                if bool(armijo | smaller) or t <= 1e-12:
                    return t
                t /= 2

        y = y + choose(search) * direction
    return y


def fista_loop(theta, num_steps, choose):
    """Projected FISTA onto [LO, HI], written out: curvature-adaptive step, restart."""
    grad_g = jax.jit(jax.grad(g))
    proj = lambda z: jnp.clip(z, LO, HI)  # noqa: E731
    y = x = proj(Y0)
    k, lip = 1.0, 1.0
    for _ in range(num_steps):
        grad = grad_g(x, theta)

        def search():
            t = 1 / lip
            while True:
                y_t = proj(x - t * grad)
                curvature = jnp.linalg.norm(grad_g(y_t, theta) - grad) / jnp.linalg.norm(y_t - x)
                if bool(curvature * t <= 1) or t <= 1e-30:
                    return t
                t = 1 / (2 * max(1 / t, float(curvature)))

        t = choose(search)
        y_new = proj(x - t * grad)
        k_new = (1 + np.sqrt(1 + 4 * k**2)) / 2
        if choose(lambda: bool((x - y_new) @ (y_new - y) > 0)):  # restart
            x, k = y_new, 1.0
        else:
            x, k = y_new + ((k - 1) / k_new) * (y_new - y), k_new
        y, lip = y_new, 0.9 * (1 / t)
    return y


def solve(theta, solver, num_steps, **kwargs):
    box = {"box": lambda t: (LO, HI)} if solver == "gradient" else {}
    return bj.argmin(g, Y0, theta, solver=solver, max_iter=num_steps, **box, **kwargs)


@pytest.mark.parametrize("solver, num_steps, loop", [("newton", 4, newton_loop),
                                                     ("gradient", 12, fista_loop)])
def test_argmin_unrolled_differentiates_the_iteration_that_ran(solver, num_steps, loop):
    choose = Decisions()
    y_loop = loop(THETA, num_steps, choose)
    steps = [c for c in choose.made if not isinstance(c, bool)]
    assert min(steps) < max(steps)  # the step-size search really chose different steps
    fwd = solve(THETA, solver, num_steps, tol=TINY_TOL)

    def unrolled(t):
        sol = solve(t, solver, num_steps, tol=TINY_TOL, hypergrad="unrolled")
        return upper(sol.y), sol

    grad_unr, unr = jax.grad(unrolled, has_aux=True)(THETA)
    assert int(fwd.info.num_steps) == int(unr.info.num_steps) == num_steps
    np.testing.assert_allclose(unr.y, fwd.y, rtol=0, atol=1e-13)
    np.testing.assert_allclose(unr.y, y_loop, rtol=0, atol=1e-13)
    grad_loop = jax.jit(jax.grad(lambda t: upper(loop(t, num_steps, choose.again()))))(THETA)
    np.testing.assert_allclose(grad_unr, grad_loop, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# saddle_point: f(u, v) convex in u, concave in v, not quadratic; u in the box [LO, HI].

B = jnp.array([[1.0, -0.5], [0.3, 0.8], [-0.2, 0.4]])
V0 = jnp.array([1.5, -1.0])
STEP = 0.3


def f(u, v, theta):
    """Strongly convex in u, strongly concave in v, pseudo-Huber terms: Newton is damped."""
    return (0.05 * u @ Q @ u + u @ B @ v - 0.05 * v @ v - theta @ u
            + jnp.sum(jnp.sqrt(1 + u**2)) - jnp.sum(jnp.sqrt(1 + v**2)))


@jax.jit
def operator(z, theta):
    gu, gv = jax.grad(f, argnums=(0, 1))(z[:3], z[3:], theta)
    return jnp.concatenate([gu, -gv])


def project(z):
    return jnp.concatenate([jnp.clip(z[:3], LO, HI), z[3:]])


def saddle_newton_loop(theta, num_steps, choose):
    """Newton on grad f = 0 with halving on ||grad f|| (no sets)."""
    @jax.jit
    def grad(z):
        return jnp.concatenate(jax.grad(f, argnums=(0, 1))(z[:3], z[3:], theta))

    z = jnp.concatenate([Y0, V0])
    for _ in range(num_steps):
        gz = grad(z)
        d = -jnp.linalg.solve(jax.jacfwd(grad)(z), gz)

        def search():
            gnorm, t = jnp.linalg.norm(gz), 1.0
            while not bool(jnp.linalg.norm(grad(z + t * d)) <= (1 - 1e-4 * t) * gnorm):
                t /= 2
                if t <= 1e-10:
                    break
            return t

        z = z + choose(search) * d
    return z


def extragradient_loop(theta, num_steps, choose):
    """Projected extragradient, step halved until eta ||F(zh) - F(z)|| <= 0.9 ||zh - z||."""
    eps = jnp.finfo(jnp.float64).eps
    z = project(jnp.concatenate([Y0, V0]))
    Fz, eta = operator(z, theta), STEP
    for _ in range(num_steps):

        def search(eta=eta):
            while True:
                zh = project(z - eta * Fz)
                Fh = operator(zh, theta)
                slack = 10 * eps * eta * (jnp.linalg.norm(Fz) + jnp.linalg.norm(Fh))
                if (bool(eta * jnp.linalg.norm(Fh - Fz) <= 0.9 * jnp.linalg.norm(zh - z) + slack)
                        or eta <= STEP * 1e-12):
                    return eta
                eta /= 2

        eta = choose(search)
        zh = project(z - eta * Fz)
        z = project(z - eta * operator(zh, theta))
        Fz, eta = operator(z, theta), 1.2 * eta
    return z


def ogda_loop(theta, num_steps, choose):
    """Forward-reflected-backward OGDA, eta_k = min(1.05 eta_{k-1}, 0.45 / local Lipschitz)."""
    z = project(jnp.concatenate([Y0, V0]))
    Fz = operator(z, theta)
    z_prev, F_prev, eta_prev = z, Fz, STEP
    for _ in range(num_steps):

        def local(eta_prev=eta_prev):
            dz, dF = float(jnp.linalg.norm(z - z_prev)), float(jnp.linalg.norm(Fz - F_prev))
            return min(1.05 * eta_prev, 0.45 * dz / dF if dF > 0 else np.inf)

        eta = choose(local)
        z_new = project(z - eta * Fz - eta_prev * (Fz - F_prev))
        z_prev, F_prev, z, Fz, eta_prev = z, Fz, z_new, operator(z_new, theta), eta
    return z


def saddle(theta, solver, num_steps, **kwargs):
    sets = {} if solver == "newton" else {"u_set": bj.Box(LO, HI), "step_size": STEP}
    sol = bj.saddle_point(f, Y0, V0, theta, solver=solver, max_iter=num_steps, **sets,
                          **kwargs)
    return jnp.concatenate([sol.u, sol.v]), sol.info


@pytest.mark.parametrize("solver, num_steps, loop", [
    pytest.param("newton", 4, saddle_newton_loop, marks=pytest.mark.slow),
    ("extragradient", 10, extragradient_loop),
    pytest.param("ogda", 10, ogda_loop, marks=pytest.mark.slow),
])
def test_saddle_unrolled_differentiates_the_iteration_that_ran(solver, num_steps, loop):
    choose = Decisions()
    z_loop = loop(THETA, num_steps, choose)
    assert min(choose.made) < max(choose.made)  # the step sizes adapted
    z_fwd, info_fwd = saddle(THETA, solver, num_steps, tol=TINY_TOL)

    def unrolled(t):
        z, info = saddle(t, solver, num_steps, tol=TINY_TOL, hypergrad="unrolled")
        return upper(z), (z, info)

    grad_unr, (z_unr, info_unr) = jax.grad(unrolled, has_aux=True)(THETA)
    assert int(info_fwd.num_steps) == int(info_unr.num_steps) == num_steps
    np.testing.assert_allclose(z_unr, z_fwd, rtol=0, atol=1e-13)
    np.testing.assert_allclose(z_unr, z_loop, rtol=0, atol=1e-13)
    grad_loop = jax.jit(jax.grad(lambda t: upper(loop(t, num_steps, choose.again()))))(THETA)
    np.testing.assert_allclose(grad_unr, grad_loop, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The pieces.


def test_iterate_stops_forward_and_masks_unrolled_at_the_same_step():
    def step(s):
        return s / 2

    def cond(s):
        return s > 0.1

    k_fwd, s_fwd = loops.iterate(step, jnp.asarray(1.0), cond, 10)
    k_unr, s_unr = loops.iterate(step, jnp.asarray(1.0), cond, 10, unrolled=True)
    assert int(k_fwd) == int(k_unr) == 4  # 1 -> 0.5 -> 0.25 -> 0.125 -> 0.0625
    assert float(s_fwd) == float(s_unr) == 0.0625
    grad = jax.grad(lambda s: loops.iterate(step, s, cond, 10, unrolled=True)[1])(1.0)
    assert float(grad) == 0.0625


def test_backtracking_first_accepted_step_and_give_up():
    t, ok, aux = loops.backtracking(lambda t: (t <= 0.3, 2 * t), jnp.asarray(1.0))
    assert bool(ok) and float(t) == 0.25 and float(aux) == 0.5
    t, ok, _ = loops.backtracking(lambda t: (t < 0, t), jnp.asarray(1.0), min_step=1e-3)
    assert not bool(ok) and 0 < float(t) <= 1e-3


def test_power_iteration_finds_the_largest_eigenvalue():
    M = jnp.diag(jnp.array([1.0, -4.0, 2.0]))
    v = loops.power_iteration(lambda w: M @ w, loops.power_start(jnp.zeros(3)), 200)
    np.testing.assert_allclose(jnp.linalg.norm(M @ v), 4.0, rtol=1e-12)
