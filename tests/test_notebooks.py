"""The notebooks run top to bottom at their small size (each has a jupytext ``.py`` twin).

Each notebook's ``.py`` twin runs in its own subprocess, so that every notebook starts with a
fresh JAX: four forced host CPU devices (``batched_sweeps`` shards its sweep across them),
``BILEVEL_JAX_SIZE=small`` (the CI size) and matplotlib's non-interactive ``Agg`` backend.
The notebooks assert what a reader would check (a hypergradient against finite differences, a
known solution); a failing assertion makes the subprocess exit non-zero. The execution time
of each notebook is printed (``pytest -s``) and reported by ``--durations``.
"""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))
#: Seconds a notebook may run at its small size before the test fails (they take about a
#: minute each on a shared 2-core machine; compilation dominates).
TIMEOUT = 600


def _environment():
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=4", "")
    env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=4").strip()
    env["BILEVEL_JAX_SIZE"] = "small"
    env["MPLBACKEND"] = "Agg"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, tmp_path):
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, str(path)], cwd=tmp_path, env=_environment(),
                                capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{path.name} did not finish in {TIMEOUT} s:\n{(err.stdout or '')[-4000:]}")
    seconds = time.perf_counter() - start
    print(f"{path.stem}: {seconds:.1f} s")
    assert result.returncode == 0, (
        f"{path.name} exited with {result.returncode} after {seconds:.0f} s\n"
        f"--- stdout (end) ---\n{result.stdout[-4000:]}\n--- stderr (end) ---\n"
        f"{result.stderr[-6000:]}")


def test_notebooks_have_an_ipynb_twin():
    """Each ``.py`` has its ``.ipynb`` twin, paired by jupytext, with the same code cells and
    no stored outputs."""
    assert len(NOTEBOOKS) >= 8, [p.name for p in NOTEBOOKS]
    for path in NOTEBOOKS:
        twin = path.with_suffix(".ipynb")
        assert twin.exists(), f"{path.name} has no .ipynb twin"
        assert "formats: ipynb,py:percent" in path.read_text(), path.name
        cells = json.loads(twin.read_text())["cells"]
        code = [c for c in cells if c["cell_type"] == "code"]
        assert all(not c.get("outputs") for c in code), f"{twin.name} has stored outputs"
        assert "".join(code[0]["source"]).count("REPO_URL") >= 2, (
            f"{twin.name}: the first code cell should install the package from REPO_URL")
        py_code = path.read_text().split("\n# %%")
        py_code = [c for c in py_code if not c.startswith(" [markdown]")]
        assert len(code) == len(py_code) - 1, (
            f"{twin.name} has {len(code)} code cells but {path.name} has {len(py_code) - 1}: "
            f"regenerate it with `jupytext --to ipynb {path.name}`")
