"""Smoke test of bench/fuzz.py: a few problems of two families, the table written."""

from helpers import load_bench

fuzz = load_bench("fuzz")


def test_fuzz_runs_and_writes_its_table(tmp_path):
    # 8 per family: the batch size of test_properties.py, whose compiled solve is reused.
    rows = fuzz.main(["--total", "16", "--families", "strict,unbounded",
                      "--results-dir", str(tmp_path), "--out", str(tmp_path / "t.txt")])
    assert [r["label"] for r in rows] == ["strict", "unbounded"]
    strict, unbounded = rows
    assert strict["count"] == unbounded["count"] == 8
    # Well-posed strictly convex QPs are solved exactly; unbounded ones are never SUCCESS.
    assert strict["statuses"]["SUCCESS"] == 8 and strict["counts"]["wrong"] == 0
    assert unbounded["statuses"]["SUCCESS"] == 0 and unbounded["counts"]["wrong"] == 0
    table = (tmp_path / "fuzz.txt").read_text()
    assert table == (tmp_path / "t.txt").read_text()
    assert "strict" in table and "TOTAL" in table
