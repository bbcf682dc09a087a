"""Smoke tests of bench/penalty_rate.py (cost vs eps on T4) and the stochastic group-DRO run."""

import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "bench"))
penalty_rate = pytest.importorskip("penalty_rate")


def test_penalty_rate_small():
    rows = penalty_rate.main(["--small"])  # eps = 1e-1, 1e-2, 1e-3
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
