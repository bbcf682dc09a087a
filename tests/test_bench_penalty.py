"""Smoke tests of bench/penalty_rate.py (cost vs eps on T4) and the stochastic group-DRO run."""

import numpy as np

from helpers import load_bench

penalty_rate = load_bench("penalty_rate")


def test_penalty_rate_small():
    rows = penalty_rate.main(["--small"])  # eps = 1e-1, 1e-2, 1e-3
    cons = rows.pop("constrained")
    # The constrained lower level through the Lagrangian reduction (Lambda = 10): the bound
    # is not active, lam -> lam* = 0.5 and x -> x* with eps; Lambda = 0.25 < lam*: flagged.
    for r in cons[:-1]:
        assert r["status"] == 0 and not r["active"] and r["err"] < 20 * r["eps"]
        assert abs(r["lam"] - 0.5) < 10 * r["eps"]
    assert cons[-1]["lam_max"] == 0.25 and cons[-1]["active"] and cons[-1]["violation"] > 0.1
    for rs in rows.values():
        for r in rs:
            assert r["status"] == 0 and r["kkt"] <= r["eps"]
            # |x1 - x1*| is within a small multiple of eps (the KKT residual bounds it).
            assert r["err"] < 10 * r["eps"]
        costs = [r["oracles"] for r in rs]
        assert costs == sorted(costs) and costs[0] > 0
        # About eps^-1 on this strongly convex-concave instance, far from the eps^-4 bound.
        assert -1.6 < penalty_rate.slope(rs) < -0.6
    # The theory schedule uses rho = 1/eps.
    np.testing.assert_allclose([r["rho"] for r in rows["theory"]], [10.0, 100.0, 1000.0])


def test_stochastic_penalty_group_dro_small():
    """Minibatch penalty method on the small group-DRO problem: the tuned classifier beats ERM
    on the worst-group validation loss (ERM ~1.65 here, group DRO ~0.46), all finite."""
    import jax.numpy as jnp

    from bilevel_jax._src.projections import Box

    gd = load_bench("group_dro")
    train, val, test = gd.make_data(0, n_train=400, n_val=100, n_test=500, d=8)
    run = gd.stochastic_penalty_method(train, val, lam=1e-2, box=Box(-1.0, 1.0),
                                       rhos=(1.0, 10.0), steps=300)
    x1, w, kkt, examples = run()
    assert np.all(np.isfinite(np.asarray(w))) and np.isfinite(float(kkt))
    assert np.all(np.abs(np.asarray(x1)) <= 1.0)
    assert examples == 300 * 4 * 4 * (16 + 32)
    worst = float(jnp.max(gd.group_losses(w, val)))
    erm_worst = float(jnp.max(gd.group_losses(gd.baselines(train, lam=1e-2, tau=0.1)[0](),
                                              val)))
    assert worst < 0.6 * erm_worst
