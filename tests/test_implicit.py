"""The shared ``custom_vjp`` helper on small root-finding problems."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.test_util import check_grads

from bilevel_jax._src.implicit import custom_solution, implicit_solution

from helpers import tree_allclose


def _sqrt_by_newton(z0, theta):
    """Solve z^2 = theta for z > 0 by Newton; aux counts nothing."""
    z = jax.lax.fori_loop(0, 60, lambda _, z: 0.5 * (z + theta / z), z0)
    return z, None


def _residual(z, theta):
    return z**2 - theta


def _adjoint(vjp_z, zbar, z, theta, aux):
    return zbar / (2 * z)  # (dr/dz)^T u = zbar with dr/dz = 2 z


def test_implicit_solution_square_root():
    def root(theta):
        return implicit_solution(_sqrt_by_newton, _residual, _adjoint, 1.0, theta)[0]

    tree_allclose(root(4.0), 2.0)
    tree_allclose(jax.grad(root)(4.0), 0.25)
    check_grads(root, (3.0,), order=1, modes=["rev"])


def test_adjoint_solve_gets_the_transposed_jacobian():
    """Nonsymmetric residual: the helper must hand the adjoint solve (dr/dz)^T."""
    M = jnp.asarray([[3.0, 1.0], [-2.0, 4.0]])

    def solve(z0, theta):
        return jnp.linalg.solve(M, theta), None

    def residual(z, theta):
        return M @ z - theta

    def adjoint(vjp_z, zbar, z, theta, aux):
        Mt = jax.vmap(vjp_z)(jnp.eye(2)).T  # columns are vjp_z(e_i): materialise (dr/dz)^T
        tree_allclose(Mt, M.T)
        return jnp.linalg.solve(Mt, zbar)

    theta = jnp.asarray([1.0, 2.0])
    w = jnp.asarray([0.5, -1.5])
    grad = jax.grad(lambda t: implicit_solution(solve, residual, adjoint, jnp.zeros(2), t)[0] @ w)
    tree_allclose(grad(theta), jnp.linalg.solve(M.T, w))


def test_warm_start_gets_zero_cotangent_and_aux_passes_through():
    def solve(z0, theta):
        return theta * 2.0, {"steps": jnp.asarray(3)}

    def backward(zbar, z, theta, aux):
        return 2.0 * zbar

    def F(z0, theta):
        z, aux = custom_solution(solve, backward, z0, theta)
        return z + 0.0 * aux["steps"]

    g0, gt = jax.grad(F, argnums=(0, 1))(5.0, 1.5)
    assert float(g0) == 0.0
    assert float(gt) == 2.0


def test_closure_converted_constants_receive_gradients():
    """The pattern every public entry uses: hoist closed-over tracers into theta."""

    def root_of(theta_fn_const):
        def residual_user(z):
            return z**3 - theta_fn_const  # closes over a traced value

        conv, consts = jax.closure_convert(residual_user, 1.0)

        def solve(z0, consts):
            return jnp.cbrt(consts[0]), None

        def residual(z, consts):
            return conv(z, *consts)

        def adjoint(vjp_z, zbar, z, consts, aux):
            return zbar / (3 * z**2)

        return implicit_solution(solve, residual, adjoint, 1.0, tuple(consts))[0]

    c = 8.0
    tree_allclose(jax.grad(root_of)(c), 1.0 / (3 * c ** (2 / 3)))
    assert np.isfinite(float(jax.grad(root_of)(c)))
