"""The migration guide (docs/migration.md) runs as written and its agreements hold.

Every fenced ``python`` block of the page is preceded by ``<!-- test: GROUP/PART -->``. Each
test below runs the blocks of its groups in page order in one namespace (the page's set-up
block first): the ``bj`` and ``setup`` parts always, the peer's part only when the peer is
installed (else the test skips after running the bilevel_jax half), then checks the
agreement that the page quotes. Measured values (printed with ``pytest -s``) are in the page.
"""

import pathlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj

PAGE = pathlib.Path(__file__).parents[1] / "docs" / "migration.md"
TEXT = PAGE.read_text()
BLOCKS = re.findall(r"<!-- test: (\S+) -->\n```python\n(.*?)```", TEXT, flags=re.S)
CODE = dict(BLOCKS)
PEER_OF = {"jaxopt": "jaxopt", "qpax": "qpax", "cvxpylayers": "cvxpylayers"}


def test_every_code_block_is_tested_once():
    fences = re.findall(r"^```python$", TEXT, flags=re.M)
    assert len(fences) == len(BLOCKS), "a python block without a <!-- test: ... --> tag"
    assert len(CODE) == len(BLOCKS), "duplicate test tags"
    groups = {name.split("/")[0] for name in CODE} - {"setup"}
    assert groups == {group for test in GROUPS.values() for group in test}


def _import_peer(name):
    """Import a peer (jaxopt warns on import that it is unmaintained), or skip."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return pytest.importorskip(name)


def _run(groups):
    """Run the page's blocks for ``groups`` (bj and set-up parts first in page order).

    Returns the namespace and the peer module's name if it is missing (``None`` otherwise).
    """
    namespace, missing = {}, None
    exec(compile(CODE["setup"], f"{PAGE}:setup", "exec"), namespace)
    for name, code in BLOCKS:
        group, part = name.split("/") if "/" in name else (name, "")
        if group not in groups:
            continue
        if part in PEER_OF:
            try:
                _import_peer(PEER_OF[part])
            except pytest.skip.Exception:
                missing = PEER_OF[part]
                continue
        exec(compile(code, f"{PAGE}:{name}", "exec"), namespace)
    return namespace, missing


def _max_abs(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    return max(float(jnp.max(jnp.abs(jnp.asarray(x) - jnp.asarray(y))))
               for x, y in zip(leaves_a, leaves_b, strict=True))


def _agree(ns, a, b, tol, label):
    err = _max_abs(ns[a], ns[b])
    print(f"\n{label}: max |{a} - {b}| = {err:.2e} (asserted < {tol:.0e})")
    assert err < tol, (label, err)
    return err


def _skip_if(missing):
    if missing is not None:
        pytest.skip(f"{missing} is not installed: only the bilevel_jax half ran")


# Each test: the page groups it runs.
GROUPS = {
    "test_jaxopt_implicit_diff": ("custom_root", "custom_fixed_point"),
    "test_jaxopt_osqp_failure_float32": ("osqp", "failure", "float32"),
    "test_jaxopt_boxosqp": ("boxosqp",),
    "test_jaxopt_eqqp": ("eqqp",),
    "test_jaxopt_projected_gradient": ("projected_gradient",),
    "test_jaxopt_lbfgs": ("lbfgs",),
    "test_qpax": ("qpax_primal", "qpax_solve"),
    "test_cvxpylayers": ("cvxpylayers",),
}


def test_jaxopt_implicit_diff():
    ns, missing = _run(GROUPS["test_jaxopt_implicit_diff"])
    # bj against the closed-form ridge Jacobian -(X'X + lam I)^-2 X't.
    X, t = ns["X"], ns["t"]
    M = X.T @ X + 10.0 * jnp.eye(5)
    np.testing.assert_allclose(ns["jac_bj"], -jnp.linalg.solve(M, jnp.linalg.solve(M, X.T @ t)),
                               rtol=1e-12, atol=1e-15)
    _skip_if(missing)
    _agree(ns, "jac_jaxopt", "jac_bj", 1e-12, "custom_root")
    _agree(ns, "jac_jaxopt_fp", "jac_bj", 1e-12, "custom_fixed_point")


def test_jaxopt_osqp_failure_float32(capsys):
    ns, missing = _run(GROUPS["test_jaxopt_osqp_failure_float32"])
    out = capsys.readouterr().out
    with capsys.disabled():
        # bj: the printed status lines (the comments on the page), NaN gradient, SolveError.
        assert "SUCCESS\n" in out and "INFEASIBLE\n" in out and "[nan]\n" in out
        assert "bilevel_jax solve failed with status INFEASIBLE" in out
        assert "float32 SUCCESS\n" in out
        assert bj.Status(ns["sol_bad"].info.status) is bj.Status.INFEASIBLE
        np.testing.assert_allclose(ns["sol"].y, [0.4, 0.6, 0.0], atol=1e-12)
        assert ns["sol32"].y.dtype == jnp.float32
        err32 = _max_abs(ns["sol32"].y, ns["sol"].y)
        print(f"\nfloat32 vs float64 solution: {err32:.2e} (asserted < 1e-05)")
        assert err32 < 1e-5
        _skip_if(missing)
        _agree(ns, "grads_jaxopt", "grads_bj", 1e-7, "OSQP")
        jaxopt_bad = ns["grad_jaxopt"](*(ns[k] for k in ("Q", "c", "A", "b_bad", "G", "h")))[3]
        assert np.all(np.isfinite(jaxopt_bad)) and "[0.5]" in out  # the page's claim
        # The page's claim on jaxopt's float32 OSQP with x64 enabled.
        data32 = [x.astype(jnp.float32) for x in (ns[k] for k in "QcAbGh")]
        with pytest.raises(TypeError, match="cond branches"):
            ns["osqp"].run(params_obj=tuple(data32[:2]), params_eq=tuple(data32[2:4]),
                           params_ineq=tuple(data32[4:]))


def test_jaxopt_boxosqp():
    ns, missing = _run(GROUPS["test_jaxopt_boxosqp"])
    assert ns["grads_bj"][2][2] == 0.0  # the +inf bound: no constraint, zero gradient
    _skip_if(missing)
    _agree(ns, "grads_jaxopt", "grads_bj", 1e-5, "BoxOSQP")


def test_jaxopt_eqqp():
    ns, missing = _run(GROUPS["test_jaxopt_eqqp"])
    _skip_if(missing)
    _agree(ns, "grads_jaxopt", "grads_bj", 1e-10, "EqualityConstrainedQP")


def test_jaxopt_projected_gradient():
    ns, missing = _run(GROUPS["test_jaxopt_projected_gradient"])
    y = bj.argmin(ns["energy"], jnp.zeros(3), ns["theta"], box=lambda _: (ns["lo"], ns["hi"])).y
    np.testing.assert_allclose(y[:2], [0.5, -0.5], atol=1e-12)  # the page: y0 at hi, y1 at lo
    assert -0.5 < y[2] < 0.5
    _skip_if(missing)
    _agree(ns, "grads_jaxopt", "grads_bj", 1e-9, "ProjectedGradient")


def test_jaxopt_lbfgs():
    ns, missing = _run(GROUPS["test_jaxopt_lbfgs"])
    _skip_if(missing)
    _agree(ns, "hypergrad_jaxopt", "hypergrad_bj", 1e-9, "LBFGS")


def test_qpax():
    ns, missing = _run(GROUPS["test_qpax"])
    bias = _max_abs(ns["grads_bj_exact"], ns["grads_bj_relaxed"])
    print(f"\nexact vs relaxed (mu = 1e-3): {bias:.2e}")
    assert 1e-3 < bias < 5e-2  # the smoothing bias the page quotes (1.7e-2)
    _skip_if(missing)
    qpax = _import_peer("qpax")
    no_G = [0, 1, 2, 3, 5]
    ns["qpax_no_G"] = [ns["grads_qpax"][i] for i in no_G]
    ns["relaxed_no_G"] = [ns["grads_bj_relaxed"][i] for i in no_G]
    _agree(ns, "qpax_no_G", "relaxed_no_G", 1e-8, "qpax solve_qp_primal (Q, c, A, b, h)")
    data = [ns[k] for k in "QcAbGh"]
    w = ns["w"]

    def loss_qpax_implicit(*args):
        return w @ qpax.solve_qp_primal(*args, solver_tol=1e-10, target_kappa=1e-3,
                                        backend="i")

    ns["grads_qpax_i"] = jax.jit(jax.grad(loss_qpax_implicit, argnums=range(6)))(*data)
    _agree(ns, "grads_qpax_i", "grads_bj_relaxed", 1e-8, "qpax solve_qp_primal backend='i'")
    # solve_qp: names mapped as on the page, to qpax's default tolerance 1e-5.
    ns["qpax_out"] = [ns["x"], ns["z"], ns["y"]]
    ns["bj_out"] = [ns["x_bj"], ns["z_bj"], ns["y_bj"]]
    np.testing.assert_allclose(ns["s_bj"], ns["s"], atol=1e-4)
    _agree(ns, "qpax_out", "bj_out", 1e-4, "qpax solve_qp (x, z, y)")
    assert bool(ns["converged"]) and bool(ns["converged_bj"])
    # The page: at solver_tol=1e-8 qpax's flag stays 0 after 30 iterations, x exact.
    x8, *_, converged8, iters8 = qpax.solve_qp(*data, solver_tol=1e-8)
    assert int(converged8) == 0 and int(iters8) == 30
    np.testing.assert_allclose(x8, ns["sol"].y, atol=1e-9)


def test_cvxpylayers():
    ns, missing = _run(GROUPS["test_cvxpylayers"])
    _skip_if(missing)
    _agree(ns, "grads_cvx", "grads_bj", 1e-6, "cvxpylayers")
