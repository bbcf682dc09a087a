"""Smoke test of bench/sigd_quadratics.py: the PDBO baseline and the ordering verdicts."""

import jax.numpy as jnp
import numpy as np

from helpers import load_bench

sigd = load_bench("sigd_quadratics")


def test_polygon_projection_matches_the_numpy_reference():
    (G, h), *_ = sigd.CLOSED[18]
    project = sigd.polygon_projection(G, h)
    for z in np.random.default_rng(0).uniform(-12, 12, (30, 2)):
        np.testing.assert_allclose(np.asarray(project(jnp.asarray(z))),
                                   sigd.project_polygon(z, G, h)[0], atol=1e-12)


def test_small_run_pdbo_and_ordering():
    results = sigd.main(["--small"])  # problem (16), 3 runs, 30 steps, three methods
    rows = {name: r for (eq, name), r in results.items() if eq == 16}
    assert set(rows) == {"DSIGD sigma=1e-4", "SSIGD", "PDBO"}
    for r in rows.values():
        assert r["norms"].shape == (3, 31) and np.all(np.isfinite(r["norms"]))
    # PDBO descends: ||grad F|| at r = 30 well below r = 0 on every run, like SSIGD, and the
    # two are within 2x of each other at r = 20 (the paper's "[S]SIGD ~ PDBO").
    pd, ss = rows["PDBO"]["norms"], rows["SSIGD"]["norms"]
    assert np.all(pd[:, -1] < 0.5 * pd[:, 0])
    assert 0.5 < rows["PDBO"]["at20"] / rows["SSIGD"]["at20"] < 2
    assert np.all(ss[:, -1] < 0.5 * ss[:, 0])
    # [D]SIGD with sigma = 1e-4 reaches ||grad F|| < 1e-2 first; the other two do not by r = 30.
    first, close = sigd.paper_order(rows, "DSIGD sigma=1e-4")
    assert first and close
    assert rows["DSIGD sigma=1e-4"]["first"] < 20
    assert np.isinf(rows["PDBO"]["first"]) and np.isinf(rows["SSIGD"]["first"])
