"""Smoke test of bench/f2cba_l1.py (F2CBA on Problem L.1): tiny sizes, a few steps."""

import numpy as np
import pytest

from helpers import load_bench

f2cba_l1 = load_bench("f2cba_l1")


def test_small_loss_and_alpha_experiments(tmp_path):
    # --small: dy=50 (m=10), 2 active constraints at x0, so the penalty oracle is not exact.
    argv = ["--small", "--out-dir", str(tmp_path), "--no-plot", "--no-cvx"]
    _, runs = f2cba_l1.main(argv + ["--exp", "loss"])["loss"]
    f2, ex, cv, _ = runs[1]
    assert f2["loss"].shape == (5,) and f2["grad"].shape == (5, 100)
    for logs in (f2, ex):
        assert np.all(np.isfinite(logs["loss"])) and np.all(np.isfinite(logs["grad"]))
        assert np.all(logs["status"] == 0)
    assert np.all(f2["active"] >= 1)
    # Both runs start at the same x0 with the same exact forward solve.
    assert f2["loss"][0] == pytest.approx(ex["loss"][0], rel=1e-12)
    assert f2["x"].shape == (5, 100) and np.all(f2["lam"] >= 0)
    # O(alpha^2) accuracy at alpha = 0.1: nonzero (active rows) and below 3e-2 (the docs
    # quote ~3e-3 at alpha = 0.1; 10x slack for the instance-dependent constant).
    err = f2cba_l1.rel_err(f2["grad"], f2["grad_exact"])
    assert np.all(err > 1e-8) and np.all(err < 3e-2)
    # Adam descends, and the F2CBA and exact trajectories stay close.
    assert f2["loss"][-1] < f2["loss"][0]
    np.testing.assert_allclose(f2["loss"], ex["loss"], rtol=1e-3, atol=1e-6)
    assert cv is None
    table = (tmp_path / "f2cba_l1_loss.txt").read_text()
    assert table.startswith("exp1") and "oracle form at x_0" in table
    # The paper's form of the oracle (f kept in the penalty problem) is as accurate.
    g_paper = f2cba_l1.paper_oracle(f2cba_l1.load(1, 100, 50), f2["x"][0],
                                    f2["y"][0], f2["lam"][0], 0.1)
    assert f2cba_l1.rel_err(g_paper, f2["grad_exact"][0]) < 3e-2
    assert f2cba_l1.rel_err(g_paper, f2["grad"][0]) < 0.1 * err[0]

    # exp3 reuses the compiled alpha = 0.1 steps; --timing-steps 0 skips its timing.
    _, rows = f2cba_l1.main(argv + ["--exp", "alpha", "--alpha2", "1e-2", "1e-4",
                                    "--timing-steps", "0"])["alpha"]
    by_alpha = {r["alpha2"]: r for r in rows}
    assert set(by_alpha) == {1e-2, 1e-4}
    assert by_alpha[1e-2]["err_med"] == pytest.approx(np.median(err), rel=1e-6)  # same run
    for r in rows:
        assert np.isfinite(r["final"]) and r["bad"] == 0
        assert r["final"] == pytest.approx(r["exact_final"], abs=1e-3)  # F crosses 0 here
    # Error O(alpha^2): 100x smaller alpha^2 -> about 100x smaller error (allow 30x-300x).
    assert 30 < by_alpha[1e-2]["err_med"] / by_alpha[1e-4]["err_med"] < 300
    assert (tmp_path / "f2cba_l1_alpha.txt").read_text().startswith("exp3")


def test_small_timing_experiment(tmp_path):
    # qp-implicit at dy=50 is already compiled if the test above ran in this process.
    argv = ["--small", "--exp", "timing", "--methods", "qp-implicit", "--timing-steps", "2",
            "--out-dir", str(tmp_path), "--no-plot"]
    if not f2cba_l1.have_cvxpylayers():
        argv.append("--no-cvx")
    _, rows = f2cba_l1.main(argv)["timing"]
    row = rows[0]
    assert row["method"] == "qp-implicit" and row["dy"] == 50 and row["n"] == 2
    assert np.isfinite(row["median"]) and row["median"] > 0 and row["compile"] > 0
    assert row["bad"] == 0 and np.isfinite(row["loss"])
    if len(rows) > 1:  # cvxpylayers: --small times 2 steps after the first (setup) one
        cvx = rows[1]
        assert cvx["method"] == "cvxpylayers" and cvx["n"] == 2
        assert np.isfinite(cvx["median"]) and cvx["median"] > 0
        assert np.isfinite(row["x_cvx"]) and row["x_cvx"] > 0
    assert (tmp_path / "f2cba_l1_timing.txt").read_text().startswith("exp2")


def test_small_dys_experiment(tmp_path):
    """--exp dys at two sizes and two seeds: F2CBA's loss falls on every seed, all solves ok."""
    argv = ["--small", "--exp", "dys", "--dy", "5", "20", "--seeds", "1", "2",
            "--out-dir", str(tmp_path), "--no-plot"]
    _, rows = f2cba_l1.main(argv)["dys"]
    assert [r["dy"] for r in rows] == [5, 20]
    for r in rows:
        assert r["steps"] == 5 and r["bad"] == 0 and r["at"][0].shape == (2,)
        assert np.all(np.isfinite(r["final"])) and np.all(r["final"] < r["at"][0])
    assert (tmp_path / "f2cba_l1_dys.txt").read_text().startswith("exp1 at every d_y")


def test_small_o2nc_experiment(tmp_path):
    """--exp o2nc, reduced: O2NC with the penalty oracle (random output block) and the
    zeroth-order method lower F from x0 like the exact-rule reference."""
    argv = ["--small", "--exp", "o2nc", "--o2nc-steps", "20", "--o2nc-keys", "1",
            "--o2nc-size", "4", "10", "--o2nc-only", "penalty, random", "zeroth order O2NC, best",
            "--out-dir", str(tmp_path), "--no-plot"]
    _, rows = f2cba_l1.main(argv)["o2nc"]
    assert [r["name"] for r in rows] == ["exact rule, Adam (reference)",
                                         "O2NC F2CBA penalty, random block",
                                         "zeroth order O2NC, best block"]
    problem, _ = f2cba_l1.bj.problems.kornowski_l1(seed=1, dim_x=4, dim_y=10)
    f0 = float(problem.value(problem.x0))
    for r in rows:
        assert r["bad"] == 0 and np.all(np.isfinite(r["F"])) and np.all(r["F"] < f0)
