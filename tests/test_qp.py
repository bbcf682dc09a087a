"""Tests of ``solve_qp``: the interior-point solve, and its implicit, relaxed and penalty rules.

Oracles: a separable box QP (O3), a designed active set (O4), penalty convergence (O5) and
cross-rule consistency (O7), plus the OptNet formulas (docs lower/qp.md).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from bilevel_jax._src.qp import _central_path_point, active_set_adjoint, solve_qp
from bilevel_jax._src.types import SolveError, Status

from helpers import tree_allclose

RULES = ["implicit", "relaxed", "penalty"]


# ------------------------------------------------------------------ problems with known answers


class Designed:
    """O4: ``min 1/2 y'Qy + (P'x + d)'y  s.t.  A y = b0 + R x,  G y <= h0 - B x``.

    ``y_star``, the active rows (``lam > 0``), the weakly active rows (slack 0, ``lam = 0``)
    and the slacks of the inactive rows are chosen; ``d``, ``b0`` and ``h0`` are set so that
    ``(y_star, nu_star, lam_star)`` is the KKT point at ``x0``.
    """

    def __init__(self, seed=0, n=6, dx=3, p=1, active=(0, 1), weak=(), k=5, lam=(1.0, 0.5)):
        rng = np.random.default_rng(seed)
        L = rng.standard_normal((n, n))
        self.Q = L @ L.T / n + np.eye(n)
        self.P = rng.standard_normal((dx, n))
        self.A = rng.standard_normal((p, n))
        self.R = rng.standard_normal((p, dx))
        self.G = rng.standard_normal((k, n))
        self.B = rng.standard_normal((k, dx))
        self.y_star = rng.standard_normal(n)
        self.x0 = rng.standard_normal(dx)
        self.nu_star = rng.standard_normal(p)
        self.lam_star = np.zeros(k)
        self.lam_star[list(active)] = lam
        self.active = list(active)
        self.weak = list(weak)
        slack = rng.uniform(0.3, 1.0, k)
        slack[self.active + self.weak] = 0.0
        self.h0 = self.G @ self.y_star + self.B @ self.x0 + slack
        self.b0 = self.A @ self.y_star - self.R @ self.x0
        self.d = -(
            self.Q @ self.y_star
            + self.P.T @ self.x0
            + self.A.T @ self.nu_star
            + self.G.T @ self.lam_star
        )
        self.t = rng.standard_normal(n)  # upper-level target

    def data(self, x):
        A = None if self.A.shape[0] == 0 else jnp.asarray(self.A)
        b = None if A is None else jnp.asarray(self.b0 + self.R @ x)
        return (
            jnp.asarray(self.Q),
            jnp.asarray(self.P.T @ x + self.d),
            A,
            b,
            jnp.asarray(self.G),
            jnp.asarray(self.h0 - self.B @ x),
        )

    def solve(self, x, **kwargs):
        return solve_qp(*self.data(x), **kwargs)

    def jacobians(self, rows):
        """Closed form ``(Dy*, Dlam_rows)`` of O4 with the constraints ``rows`` active."""
        Qi = np.linalg.inv(self.Q)
        AI = np.vstack([self.A, self.G[rows]])
        BI = np.vstack([-self.R, self.B[rows]])
        S = AI @ Qi @ AI.T
        N = Qi - Qi @ AI.T @ np.linalg.solve(S, AI @ Qi)
        Dy = -N @ self.P.T - Qi @ AI.T @ np.linalg.solve(S, BI)
        Dmult = -np.linalg.solve(S, AI @ Qi @ self.P.T - BI)
        return Dy, Dmult[self.A.shape[0] :]

    def F(self, x, **kwargs):
        """Upper level ``f = 1/2 ||y - t||^2 + 0.1 ||x||^2``."""
        y = self.solve(x, **kwargs).y
        return 0.5 * jnp.sum((y - self.t) ** 2) + 0.1 * jnp.sum(x**2)

    def hypergradient(self, x):
        Dy, _ = self.jacobians(self.active)
        return 0.2 * x + Dy.T @ (self.y_star - self.t)


def kkt_adjoint(Q, A, G, active, v, rho_e, rho_i):
    """Dense KKT solve on the active set: ``[Q A' G_I'; A 0 0; G_I 0 0] u = [v; rho_e; rho_i]``."""
    n, p, GI = Q.shape[0], A.shape[0], G[active]
    m = GI.shape[0]
    K = np.block([[Q, A.T, GI.T], [A, np.zeros((p, p + m))], [GI, np.zeros((m, p + m))]])
    u = np.linalg.solve(K, np.concatenate([v, rho_e, rho_i[active]]))
    return u[:n], u[n : n + p], u[n + p :]


# ------------------------------------------------------------------ O3: separable box QP


def test_box_qp_exact_jacobian_and_kink():
    """O3: y* = clip(u, lo, hi), u = -(P'x + d)/s; Dy* = diag(free) (-diag(1/s) P') a.e.

    Coordinate 5 sits exactly on its upper bound (u_5 = hi_5: a weakly active row, zero
    multiplier). The implicit and penalty rules drop it: they return the derivative from the
    side where the bound is inactive (the free derivative). The relaxed rule returns half of it
    at the kink (1-D barrier algebra; the opposite bound adds O(sqrt(mu))).
    """
    rng = np.random.default_rng(0)
    n, dx = 6, 3
    s = np.array([1.0, 2.0, 0.5, 1.5, 3.0, 0.8])
    lo, hi = -np.ones(n), np.ones(n)
    P = rng.standard_normal((dx, n))
    x = jnp.asarray(rng.standard_normal(dx))
    u_target = np.array([-2.0, 0.3, 1.7, -0.5, 0.9, 1.0])  # lo, free, hi, free, free, kink
    d = -s * u_target - P.T @ x
    G, h = np.vstack([np.eye(n), -np.eye(n)]), np.concatenate([hi, -lo])

    def solve(x, **kw):
        return solve_qp(jnp.diag(s), P.T @ x + d, G=G, h=h, **kw)

    sol = solve(x)
    assert int(sol.info.status) == Status.SUCCESS
    tree_allclose(sol.y, np.clip(u_target, lo, hi))
    lam = np.concatenate([np.maximum(0, s * (u_target - hi)), np.maximum(0, s * (lo - u_target))])
    tree_allclose(sol.lam, lam)
    free = (u_target > lo) & (u_target <= hi)  # the kink coordinate counts as free
    exact = (free / s)[:, None] * -P.T
    tree_allclose(jax.jacrev(lambda x: solve(x).y)(x), exact)
    # The penalty oracle converges as alpha -> 0 (O3); its error is O(alpha^2).
    jac = jax.jacrev(lambda x: solve(x, hypergrad="penalty", alpha=1e-3).y)(x)
    tree_allclose(jac, exact, rtol=0, atol=1e-5)
    # The kink: one-sided differences. Along `inward` u_5 decreases (the bound is released).
    inward = P[:, 5] if P[:, 5] @ P[:, 5] > 0 else -P[:, 5]  # d u_5 = -P[:, 5] . dx / s_5 < 0
    t = 1e-6
    released = (solve(x + t * inward).y[5] - sol.y[5]) / t
    pushed = (solve(x - t * inward).y[5] - sol.y[5]) / t
    tree_allclose(released, exact[5] @ inward, rtol=1e-7, atol=1e-8)  # rounding / t
    tree_allclose(pushed, 0.0, rtol=0, atol=1e-8)
    relaxed = jax.grad(lambda x: solve(x, hypergrad="relaxed", mu=1e-6).y[5])(x)
    tree_allclose(relaxed, 0.5 * exact[5], rtol=1e-3, atol=1e-4)


# ------------------------------------------------------------------ O4: designed active set


def test_designed_active_set_exact():
    """O4 with a coupled equality row: y*, nu*, lam* exact; Jacobians of y and lam_I exact."""
    prob = Designed(seed=1)
    x0 = jnp.asarray(prob.x0)
    sol = prob.solve(x0)
    assert int(sol.info.status) == Status.SUCCESS
    assert bool(sol.info.converged) and float(sol.info.residual) < 1e-12
    tree_allclose(sol.y, prob.y_star)
    tree_allclose(sol.lam, prob.lam_star)
    tree_allclose(sol.nu, prob.nu_star)
    Dy, Dlam = prob.jacobians(prob.active)
    jac_y, jac_lam = jax.jacrev(lambda x: (prob.solve(x).y, prob.solve(x).lam))(x0)
    tree_allclose(jac_y, Dy)
    tree_allclose(jac_lam[np.array(prob.active)], Dlam)
    tree_allclose(jac_lam[2:], np.zeros((3, 3)))  # inactive multipliers stay 0
    # Central differences of F (h = 1e-6 keeps the active set: the margins are >= 0.3).
    grad = jax.grad(prob.F)(x0)
    tree_allclose(grad, prob.hypergradient(prob.x0))
    e = np.eye(3)
    fd = np.array([(prob.F(x0 + 1e-6 * e[i]) - prob.F(x0 - 1e-6 * e[i])) / 2e-6 for i in range(3)])
    tree_allclose(grad, fd, rtol=1e-7, atol=1e-7)  # O(eps / h) rounding in the differences


def test_inactive_rows_do_not_change_the_gradient():
    prob = Designed(seed=2)
    x0 = jnp.asarray(prob.x0)
    grad = jax.grad(prob.F)(x0)
    looser = Designed(seed=2)
    looser.h0 = prob.h0 + np.array([0, 0, 5.0, 0.1, 2.0])  # only inactive rows move
    tree_allclose(jax.grad(looser.F)(x0), grad)
    tree_allclose(grad, prob.hypergradient(prob.x0))


# ------------------------------------------------------------------ OptNet gradients w.r.t. data


def test_data_gradients_match_optnet_formulas():
    """Equality + inequality QP: the VJP w.r.t. every data array equals the OptNet form."""
    prob = Designed(seed=3, active=(0, 2), lam=(0.8, 1.3))
    data = prob.data(prob.x0)
    rng = np.random.default_rng(4)
    ybar, nubar, lambar = rng.standard_normal(6), rng.standard_normal(1), rng.standard_normal(5)
    sol, vjp = jax.vjp(lambda *d: solve_qp(*d)[:3], *data)
    Qbar, cbar, Abar, bbar, Gbar, hbar = vjp((ybar, nubar, lambar))
    y, nu, lam = prob.y_star, prob.nu_star, prob.lam_star
    w, mu_e, mu_i = kkt_adjoint(prob.Q, prob.A, prob.G, prob.active, ybar, nubar, lambar)
    act = np.array(prob.active)
    tree_allclose(cbar, -w)
    tree_allclose(Qbar, -0.5 * (np.outer(w, y) + np.outer(y, w)))
    tree_allclose(bbar, mu_e)
    tree_allclose(Abar, -(np.outer(nu, w) + np.outer(mu_e, y)))
    expected_h = np.zeros(5)
    expected_h[act] = mu_i
    tree_allclose(hbar, expected_h)
    expected_G = np.zeros((5, 6))
    expected_G[act] = -(np.outer(lam[act], w) + np.outer(mu_i, y))
    tree_allclose(Gbar, expected_G)


def test_check_grads_every_argument():
    """Reverse-mode finite-difference check w.r.t. Q, c, A, b, G, h at a nondegenerate point."""
    prob = Designed(seed=5, active=(1, 3), lam=(0.9, 0.6))
    data = prob.data(prob.x0)
    rng = np.random.default_rng(6)
    w_nu, w_lam = rng.standard_normal(1), rng.standard_normal(5)

    def F(*d):
        sol = solve_qp(*d)
        return jnp.sum(jnp.sin(sol.y)) + sol.nu @ w_nu + sol.lam @ w_lam + 0.5 * sol.lam @ sol.lam

    check_grads(F, data, order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ degenerate points


def test_weakly_active_row_gives_the_documented_one_sided_derivative():
    """O4 with a weakly active row (slack 0, lam 0): the Jacobian is that of the piece where the
    row is inactive; it equals one-sided differences along directions that make it inactive."""
    prob = Designed(seed=7, active=(0, 1), weak=(2,))
    x0 = jnp.asarray(prob.x0)
    sol = prob.solve(x0)
    assert int(sol.info.status) == Status.SUCCESS
    tree_allclose(sol.y, prob.y_star)
    jac = jax.jacrev(lambda x: prob.solve(x).y)(x0)
    Dy_drop, _ = prob.jacobians([0, 1])
    Dy_keep, _ = prob.jacobians([0, 1, 2])
    tree_allclose(jac, Dy_drop)
    assert np.abs(Dy_drop - Dy_keep).max() > 1e-2  # the two pieces really differ
    # A direction along which row 2 becomes inactive: its slack grows on the "drop" piece.
    direction = np.random.default_rng(8).standard_normal(3)
    growth = -prob.B[2] @ direction - prob.G[2] @ Dy_drop @ direction
    direction = direction if growth > 0 else -direction
    t = 1e-5
    forward = (prob.solve(x0 + t * direction).y - sol.y) / t
    tree_allclose(forward, jac @ direction, rtol=1e-6, atol=1e-6)  # O(eps/t) rounding
    backward = (prob.solve(x0 - t * direction).y - sol.y) / t
    tree_allclose(backward, Dy_keep @ -direction, rtol=1e-6, atol=1e-6)
    for rule in RULES:
        assert np.all(np.isfinite(jax.grad(lambda x, r=rule: prob.F(x, hypergrad=r))(x0)))


def test_dependent_active_rows_give_finite_gradients():
    """LICQ fails (an active row repeated): the ridge keeps every gradient finite, the y-part is
    unchanged and the h-gradient of the pair sums to that of the single row."""
    prob = Designed(seed=9)
    Q, c, A, b, G, h = prob.data(prob.x0)
    G2, h2 = jnp.vstack([G, G[:1]]), jnp.concatenate([h, h[:1]])
    for rule in RULES:

        def loss(c, h, G=G, rule=rule):
            return jnp.sum(solve_qp(Q, c, A, b, G, h, hypergrad=rule).y ** 2)

        gc1, gh1 = jax.grad(loss, argnums=(0, 1))(c, h)
        gc2, gh2 = jax.grad(lambda c, h, rule=rule: loss(c, h, G2, rule), argnums=(0, 1))(c, h2)
        gG2 = jax.grad(lambda G, rule=rule: loss(c, h2, G, rule))(G2)
        assert np.all(np.isfinite(gG2)) and np.all(np.isfinite(gh2))
        # Duplicated rows: the y-part is unique, the split of the multiplier is the ridge's.
        # The relaxed rule's barrier counts the repeated row twice: an O(mu) change.
        tol = 1e-2 if rule == "relaxed" else 1e-6
        tree_allclose(gc2, gc1, rtol=tol, atol=tol)
        tree_allclose(gh2[0] + gh2[-1], gh1[0], rtol=tol, atol=tol)


# ------------------------------------------------------------------ penalty and relaxed rules


def test_penalty_error_is_second_order_in_alpha():
    """O5: error of the penalty hypergradient ~ alpha^2 (log-log slope 2; theory >= 1)."""
    prob = Designed(seed=10)
    x0 = jnp.asarray(prob.x0)
    exact = prob.hypergradient(prob.x0)
    alphas = np.array([0.3, 0.1, 0.03, 0.01])
    errors = np.array(
        [
            np.linalg.norm(
                jax.grad(lambda x, a=a: prob.F(x, hypergrad="penalty", alpha=a))(x0) - exact
            )
            for a in alphas
        ]
    )
    slope = np.polyfit(np.log10(alphas), np.log10(errors), 1)[0]
    assert 1.7 < slope < 2.3, (errors, slope)
    assert errors[-1] < 1e-2


def test_penalty_vjp_equals_the_oracle_form():
    """O5: with f = v'y the VJP equals Kornowski et al.'s oracle
    alpha^-2 P (y_hat - y*) + alpha^-4 B_I' h_I(x, y_hat), where
    (alpha^-2 Q + alpha^-4 C_I'C_I)(y_hat - y*) = -v, C_I the equality and active rows."""
    prob = Designed(seed=11)
    alpha = 0.05
    v = np.random.default_rng(12).standard_normal(6)
    grad = jax.grad(lambda x: prob.solve(x, hypergrad="penalty", alpha=alpha).y @ v)(
        jnp.asarray(prob.x0)
    )
    # The equality A y = b0 + R x is always active: h(x, y) = A y - R x - b0 = 0.
    CI = np.vstack([prob.A, prob.G[prob.active]])
    BI = np.vstack([-prob.R, prob.B[prob.active]])
    delta = np.linalg.solve(prob.Q / alpha**2 + CI.T @ CI / alpha**4, -v)
    oracle = prob.P @ delta / alpha**2 + BI.T @ (CI @ delta) / alpha**4
    tree_allclose(grad, oracle, rtol=1e-8, atol=1e-9)


def test_rules_agree_at_strict_complementarity():
    """O7: implicit, penalty (alpha = 1e-3), relaxed (small mu) and central differences, with
    cotangents on y and on the multipliers."""
    prob = Designed(seed=13, active=(0, 3), lam=(0.7, 1.1))
    x0 = jnp.asarray(prob.x0)
    implicit = jax.grad(prob.F)(x0)
    e = np.eye(3)
    fd = np.array([(prob.F(x0 + 1e-6 * e[i]) - prob.F(x0 - 1e-6 * e[i])) / 2e-6 for i in range(3)])
    tree_allclose(implicit, fd, rtol=1e-7, atol=1e-7)
    penalty = jax.grad(lambda x: prob.F(x, hypergrad="penalty", alpha=1e-3))(x0)
    tree_allclose(penalty, implicit, rtol=0, atol=1e-5)  # O(alpha^2) bias
    errors = []
    for mu in [1e-5, 1e-6]:
        relaxed = jax.grad(lambda x, mu=mu: prob.F(x, hypergrad="relaxed", mu=mu))(x0)
        errors.append(np.linalg.norm(relaxed - implicit))
    assert errors[0] < 1e-3 and 5 < errors[0] / errors[1] < 20  # O(mu) bias: 10x per decade
    # Multiplier cotangents (the penalty rule's rho-term is our derived extension).
    w_nu, w_lam = np.array([0.7]), np.random.default_rng(14).standard_normal(5)

    def multipliers(x, **kw):
        sol = prob.solve(x, **kw)
        return sol.nu @ w_nu + sol.lam @ w_lam

    exact = jax.grad(multipliers)(x0)
    tree_allclose(
        jax.grad(lambda x: multipliers(x, hypergrad="penalty", alpha=1e-3))(x0),
        exact,
        rtol=0,
        atol=1e-5,
    )
    tree_allclose(
        jax.grad(lambda x: multipliers(x, hypergrad="relaxed", mu=1e-7))(x0),
        exact,
        rtol=0,
        atol=1e-4,
    )  # O(mu / margin^2)


def test_relaxed_rule_is_the_derivative_of_the_central_path():
    """The relaxed rule differentiates the barrier point y_mu(theta) exactly: compare with
    central differences of y_mu, computed by the same Newton iteration."""
    prob = Designed(seed=24)
    data = [jnp.asarray(d) for d in prob.data(prob.x0)]
    mu = 1e-2
    rng = np.random.default_rng(25)
    w = rng.standard_normal(6)
    directions = [jnp.asarray(rng.standard_normal(d.shape)) for d in data]
    sol = solve_qp(*data)
    central_path_point = jax.jit(_central_path_point)

    def y_mu(t):
        theta = tuple(d + t * v for d, v in zip(data, directions, strict=True))
        return central_path_point(theta, (sol.y, sol.nu, sol.lam), mu, 1e-12, 50)[0] @ w

    fd = (y_mu(1e-6) - y_mu(-1e-6)) / 2e-6
    grads = jax.grad(
        lambda *d: solve_qp(*d, hypergrad="relaxed", mu=mu).y @ w, argnums=tuple(range(6))
    )(*data)
    directional = sum(jnp.sum(g * v) for g, v in zip(grads, directions, strict=True))
    tree_allclose(directional, fd, rtol=1e-7, atol=1e-8)  # rounding / 1e-6


# ------------------------------------------------------------------ transformations


def test_vmap_equals_loop():
    prob = Designed(seed=14)
    rng = np.random.default_rng(15)
    xs = jnp.asarray(prob.x0 + 0.05 * rng.standard_normal((3, 3)))
    batch = [prob.data(x) for x in xs]
    stacked = [jnp.stack([jnp.asarray(d[i]) for d in batch]) for i in range(6)]

    def loss(*d):
        sol = solve_qp(*d)
        return jnp.sum(sol.y**2) + jnp.sum(sol.lam**2) + jnp.sum(sol.nu)

    value_and_grad = jax.value_and_grad(loss, argnums=tuple(range(6)))
    # Q, c and h batched, A, b, G shared.
    in_axes = (0, 0, None, None, None, 0)
    args = [stacked[i] if ax == 0 else batch[0][i] for i, ax in enumerate(in_axes)]
    batched = jax.vmap(value_and_grad, in_axes=in_axes)(*args)
    looped = [value_and_grad(d[0], d[1], *batch[0][2:5], d[5]) for d in batch]
    tree_allclose(batched, jax.tree.map(lambda *a: jnp.stack(a), *looped))


def test_jit_equals_eager(maybe_jit):
    prob = Designed(seed=16)
    x0 = jnp.asarray(prob.x0)

    def all_rules(x):
        # throw=True: the status check runs as a host callback under jit (and must not raise).
        return [
            jax.value_and_grad(lambda x, r=r: prob.F(x, hypergrad=r, throw=True))(x) for r in RULES
        ]

    out = maybe_jit(all_rules)(x0)
    exact = prob.hypergradient(prob.x0)
    tree_allclose(out[0][1], exact)
    tree_allclose(out[2][1], exact, rtol=0, atol=1e-5)  # penalty: O(alpha^2)
    tree_allclose(out[1][1], exact, rtol=0, atol=1e-2)  # relaxed: O(mu), mu = 1e-3
    for value, _ in out:
        tree_allclose(value, prob.F(x0))


@pytest.mark.parametrize("rule", RULES)
def test_float32(rule):
    prob = Designed(seed=17)
    data64 = prob.data(prob.x0)
    data32 = [jnp.asarray(d, jnp.float32) for d in data64]
    sol = solve_qp(*data32, hypergrad=rule)
    assert sol.y.dtype == sol.nu.dtype == sol.lam.dtype == jnp.float32
    assert int(sol.info.status) == Status.SUCCESS
    # float32: a 1e-5 relative KKT tolerance, and the polish makes (y, lam) exact to rounding.
    tree_allclose(sol.y, prob.y_star, rtol=1e-4, atol=1e-5)
    tree_allclose(sol.lam, prob.lam_star, rtol=1e-4, atol=1e-5)

    def loss(*d):
        s = solve_qp(*d, hypergrad=rule, alpha=2e-2)  # alpha: the float32 default
        return jnp.sum(s.y**2) + jnp.sum(s.lam)

    grads32 = jax.grad(loss, argnums=tuple(range(6)))(*data32)
    grads64 = jax.grad(loss, argnums=tuple(range(6)))(*data64)  # same rule, same options
    # Rounding: 1e-7 times the KKT condition number; the penalty rule's e = alpha^-4 C_I Delta
    # loses a further factor alpha^-2 = 2.5e3.
    tol = 1e-2 if rule == "penalty" else 1e-3
    for g32, g64 in zip(grads32, grads64, strict=True):
        assert g32.dtype == jnp.float32
        tree_allclose(g32, g64, rtol=tol, atol=tol)


# ------------------------------------------------------------------ infinite bounds, absent blocks


@pytest.mark.parametrize("rule", RULES)
def test_inf_rows_are_dropped(rule):
    """h_i = +inf: same solution as dropping the row, lam_i = 0, zero cotangents for the row."""
    prob = Designed(seed=18, active=(0, 2))
    Q, c, A, b, G, h = prob.data(prob.x0)
    inf_rows = np.array([1, 3])  # inactive rows become infinite
    keep = np.array([0, 2, 4])
    h = jnp.asarray(h)
    h_inf = h.at[inf_rows].set(jnp.inf)

    def loss(G, h):
        sol = solve_qp(Q, c, A, b, G, h, hypergrad=rule)
        return jnp.sum(sol.y**2) + jnp.sum(sol.lam**2), sol

    (value, sol), (gG, gh) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(G, h_inf)
    dropped = solve_qp(Q, c, A, b, G[keep], h[keep])
    assert int(sol.info.status) == Status.SUCCESS
    tree_allclose(sol.y, dropped.y)
    tree_allclose(sol.lam[keep], dropped.lam)
    assert np.all(np.asarray(sol.lam[inf_rows]) == 0)
    assert np.all(np.asarray(gh[inf_rows]) == 0) and np.all(np.asarray(gG[inf_rows]) == 0)
    assert np.all(np.isfinite(gh)) and np.all(np.isfinite(gG))
    if rule != "relaxed":  # (spares a compilation; the relaxed rule masks rows the same way)
        gG_d, gh_d = jax.grad(lambda G, h: loss(G, h)[0], argnums=(0, 1))(G[keep], h[keep])
        # The penalty rule amplifies rounding by alpha^-2 = 1e6 (its error is O(alpha^2) +
        # O(eps / alpha^2)); the two problems round differently.
        rtol = 1e-7 if rule == "penalty" else None
        tree_allclose(gh[keep], gh_d, rtol=rtol)
        tree_allclose(gG[keep], gG_d, rtol=rtol)


def test_all_inf_and_absent_blocks():
    """No G (and all-inf h): the equality-constrained KKT solution; neither A nor G: -Q^-1 c.
    (The O3 box test covers G without A.)"""
    prob = Designed(seed=19)
    Q, c, A, b, G, h = prob.data(prob.x0)
    free = solve_qp(Q, c)
    assert free.nu.shape == (0,) and free.lam.shape == (0,)
    tree_allclose(free.y, -np.linalg.solve(prob.Q, np.asarray(c)))
    grad = jax.grad(lambda c: solve_qp(Q, c).y @ prob.t)(c)
    tree_allclose(grad, -np.linalg.solve(prob.Q, prob.t))
    eq = solve_qp(Q, c, A, b)
    assert int(eq.info.status) == Status.SUCCESS and eq.lam.shape == (0,)
    K = np.block([[prob.Q, prob.A.T], [prob.A, np.zeros((1, 1))]])
    z = np.linalg.solve(K, np.concatenate([-np.asarray(c), np.asarray(b)]))
    tree_allclose(eq.y, z[:6])
    tree_allclose(eq.nu, z[6:])
    w, mu, _ = kkt_adjoint(prob.Q, prob.A, prob.G, [], prob.t, np.zeros(1), np.zeros(5))
    tree_allclose(jax.grad(lambda b: solve_qp(Q, c, A, b).y @ prob.t)(b), mu)
    all_inf = jnp.full(h.shape, jnp.inf)
    sol = solve_qp(Q, c, A, b, G, all_inf)
    assert int(sol.info.status) == Status.SUCCESS
    tree_allclose(sol.y, eq.y)
    assert np.all(np.asarray(sol.lam) == 0)
    loss = lambda G, h: solve_qp(Q, c, A, b, G, h).y @ prob.t  # noqa: E731
    gG, gh = jax.grad(loss, argnums=(0, 1))(G, all_inf)
    assert np.all(np.asarray(gh) == 0) and np.all(np.asarray(gG) == 0)


# ------------------------------------------------------------------ failures and bad input


def test_infeasible_problems_are_reported():
    prob = Designed(seed=20)
    Q, c, A, b, G, h = prob.data(prob.x0)
    contradictory = solve_qp(Q, c, A, b, jnp.vstack([G, -G[:1]]), jnp.concatenate([h, -h[:1] - 1]))
    zero_row = jnp.zeros_like(A)  # 0 y = 1
    inconsistent = solve_qp(Q, c, zero_row, jnp.ones(1), G, h)
    minus_inf = solve_qp(Q, c, A, b, G, h.at[4].set(-jnp.inf))
    for sol in (contradictory, inconsistent, minus_inf):
        assert int(sol.info.status) == Status.INFEASIBLE
        assert not bool(sol.info.converged)
        # no point to return: NaN outputs (bj.Status's policy)
        assert all(np.all(np.isnan(a)) for a in (sol.y, sol.nu, sol.lam))
    with pytest.raises(SolveError, match="INFEASIBLE"):
        solve_qp(Q, c, zero_row, jnp.ones(1), G, h, throw=True)


def test_unbounded_max_steps_and_nonfinite():
    prob = Designed(seed=21)
    Q, c, A, b, G, h = prob.data(prob.x0)
    # An LP with a descent ray: min -y_0 s.t. y_1 = 0 (and 0 y <= 1).
    e = jnp.eye(6)
    lp = solve_qp(jnp.zeros((6, 6)), -e[0], e[1:2], jnp.zeros(1), jnp.zeros((5, 6)), jnp.ones(5))
    assert int(lp.info.status) == Status.UNBOUNDED
    short = solve_qp(Q, c, A, b, G, h, max_iter=2, polish=False)
    assert int(short.info.status) == Status.MAX_STEPS
    assert int(short.info.num_steps) == 2 and float(short.info.residual) > 1e-6
    bad = solve_qp(Q, c.at[0].set(jnp.nan), A, b, G, h)
    assert int(bad.info.status) == Status.NONFINITE


def test_bad_input_is_named_at_trace_time():
    Q, c = jnp.eye(5), jnp.ones(5)
    with pytest.raises(ValueError, match=r"G has shape \(3, 4\) but Q has 5 rows"):
        solve_qp(Q, c, G=jnp.ones((3, 4)), h=jnp.ones(3))
    with pytest.raises(ValueError, match=r"h has shape \(2,\) but G has 3 rows"):
        solve_qp(Q, c, G=jnp.ones((3, 5)), h=jnp.ones(2))
    with pytest.raises(ValueError, match=r"A has shape \(2, 6\) but Q has 5 rows"):
        solve_qp(Q, c, A=jnp.ones((2, 6)), b=jnp.ones(2))
    with pytest.raises(ValueError, match="A was given without b"):
        solve_qp(Q, c, A=jnp.ones((2, 5)))
    with pytest.raises(ValueError, match=r"c has shape \(4,\) but Q has 5 rows"):
        solve_qp(Q, jnp.ones(4))
    with pytest.raises(ValueError, match="Q must be a non-empty square matrix"):
        solve_qp(jnp.ones((5, 4)), c)
    with pytest.raises(TypeError, match="Q must be a real array"):
        solve_qp(Q.astype(jnp.complex64), c)
    with pytest.raises(ValueError, match="hypergrad must be one of"):
        solve_qp(Q, c, hypergrad="exact")
    with pytest.raises(ValueError, match="alpha must be a positive"):
        solve_qp(Q, c, alpha=0.0)
    with pytest.raises(ValueError, match="ridge must be"):
        solve_qp(Q, c, ridge=-1.0)
    with pytest.raises(ValueError, match="max_iter must be a positive integer"):
        solve_qp(Q, c, max_iter=0)
    with pytest.raises(ValueError, match=r"init lam has shape \(2,\) but must have shape \(3,\)"):
        solve_qp(Q, c, G=jnp.ones((3, 5)), h=jnp.ones(3), init=(c, None, jnp.ones(2)))


# ------------------------------------------------------------------ options


def test_warm_start_and_no_polish():
    prob = Designed(seed=22)
    data = prob.data(prob.x0)
    cold = solve_qp(*data)
    warm = solve_qp(*data, init=(cold.y, cold.nu, cold.lam))
    assert int(warm.info.status) == Status.SUCCESS
    assert int(warm.info.num_steps) <= int(cold.info.num_steps)
    tree_allclose(warm.y, cold.y)
    # The warm start receives no gradient, and does not change the hypergradient.
    g_init = jax.grad(lambda y0: jnp.sum(solve_qp(*data, init=(y0, None, None)).y))(cold.y)
    assert np.all(np.asarray(g_init) == 0)
    # Without polish: interior-point accuracy, and the thresholded mask still finds I.
    rough = solve_qp(*data, polish=False)
    assert int(rough.info.status) == Status.SUCCESS
    tree_allclose(rough.y, prob.y_star, rtol=1e-8, atol=1e-8)  # stops at a 1e-10 residual
    grad = jax.grad(lambda c: jnp.sum(solve_qp(data[0], c, *data[2:], polish=False).y ** 2))
    grad_polished = jax.grad(lambda c: jnp.sum(solve_qp(data[0], c, *data[2:]).y ** 2))
    tree_allclose(grad(data[1]), grad_polished(data[1]), rtol=1e-6, atol=1e-6)


def test_nonsymmetric_Q_uses_its_symmetric_part():
    prob = Designed(seed=23)
    Q, c, A, b, G, h = prob.data(prob.x0)
    skew = jnp.asarray(np.triu(np.ones((6, 6)), 1))
    sol = solve_qp(Q + skew - skew.T, c, A, b, G, h)
    tree_allclose(sol.y, prob.y_star)
    for rule in RULES:
        gQ = jax.grad(lambda Q, r=rule: jnp.sum(solve_qp(Q, c, A, b, G, h, hypergrad=r).y ** 2))(
            Q + skew - skew.T
        )
        tree_allclose(gQ, gQ.T)


def test_no_recompilation_when_values_or_options_change():
    """The compiled solver and rules are reused across data values and numerical options."""
    from bilevel_jax._src import qp

    prob = Designed(seed=26)
    data = prob.data(prob.x0)
    loss = lambda c, **kw: jnp.sum(solve_qp(data[0], c, *data[2:], **kw).y)  # noqa: E731
    jax.grad(loss)(data[1])
    jax.grad(lambda c: loss(c, hypergrad="penalty"))(data[1])
    # _cache_size: the number of compiled versions held by a jitted function.
    compiled = (qp.solve_forward, qp._implicit_backward, qp._penalty_backward)
    sizes = [f._cache_size() for f in compiled]
    jax.grad(loss)(data[1] + 1.0)
    jax.grad(lambda c: loss(c, tol=1e-9, ridge=1e-10, max_iter=40, polish=False))(data[1])
    jax.grad(lambda c: loss(c, hypergrad="penalty", alpha=0.05))(data[1])
    solve_qp(*data, init=(prob.y_star, None, None))
    assert sizes == [f._cache_size() for f in compiled]


def test_active_set_adjoint_helper():
    """The reusable masked adjoint solve: dense and MINRES against the reduced closed form."""
    rng = np.random.default_rng(24)
    n, p, k = 6, 1, 4
    L = rng.standard_normal((n, n))
    H = L @ L.T / n + np.eye(n)
    A, G = rng.standard_normal((p, n)), rng.standard_normal((k, n))
    mask = np.array([True, False, True, False])
    v, rho_e, rho_i = rng.standard_normal(n), rng.standard_normal(p), rng.standard_normal(k)
    w, mu_e, mu_i = kkt_adjoint(H, A, G, np.flatnonzero(mask), v, rho_e, rho_i)
    expected_i = -rho_i
    expected_i[mask] = mu_i
    hvp = lambda x: jnp.asarray(H) @ x  # noqa: E731
    solve = jax.jit(active_set_adjoint, static_argnums=0, static_argnames=("method", "tol"))
    dense = solve(hvp, v, G, mask, A=A, rhs_eq=rho_e, rhs_ineq=rho_i)
    tree_allclose(dense, (w, mu_e, expected_i))
    minres = solve(hvp, v, G, mask, A=A, rhs_eq=rho_e, rhs_ineq=rho_i, method="minres", tol=1e-13)
    tree_allclose(minres, (w, mu_e, expected_i), rtol=1e-8, atol=1e-9)  # Krylov tolerance
    # Dependent active rows: finite with a ridge, w unchanged.
    G2 = np.vstack([G, G[:1]])
    mask2 = np.append(mask, True)
    w2, _, mu2 = solve(hvp, v, G2, mask2, A=A, ridge=1e-10)
    w1, _, mu1 = solve(hvp, v, G, mask, A=A)
    assert np.all(np.isfinite(mu2))
    tree_allclose(w2, w1, rtol=1e-6, atol=1e-6)  # O(ridge x cond) perturbation
    tree_allclose(mu2[0] + mu2[-1], mu1[0], rtol=1e-6, atol=1e-6)
