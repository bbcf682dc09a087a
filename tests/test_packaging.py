"""What a user expects of an installed package: licence, typing marker, metadata, version,
readable statuses, and progress display on long runs."""

import importlib.metadata
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bilevel_jax as bj
from bilevel_jax._src import progress
from bilevel_jax._src.progress import make_progress

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = pathlib.Path(__file__).parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PEERS = ("jaxopt", "qpax", "cvxpy", "cvxpylayers", "tqdm")


# --------------------------------------------------------------------------------------------
# Metadata and files.


def test_license_file_matches_pyproject():
    project = PYPROJECT["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    # With an SPDX `license`, a licence classifier is an error for setuptools >= 77.
    assert not any(c.startswith("License ::") for c in project["classifiers"])


def test_py_typed_ships_with_the_package():
    assert (ROOT / "bilevel_jax" / "py.typed").is_file()
    assert "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"]["bilevel_jax"]
    assert "Typing :: Typed" in PYPROJECT["project"]["classifiers"]


def test_classifiers_urls_and_extras():
    project = PYPROJECT["project"]
    assert any(c.startswith("Development Status ::") for c in project["classifiers"])
    assert set(project["urls"]) >= {"Homepage", "Documentation", "Source", "Issues", "Changelog"}
    assert all(url.startswith("https://") for url in project["urls"].values())
    extras = project["optional-dependencies"]
    assert extras["progress"] == ["tqdm"]
    names = {re.split(r"[<>=\[; ]", req)[0] for req in extras["test"]}
    assert names >= {"jaxopt", "qpax", "cvxpy", "cvxpylayers", "tqdm"}
    assert not any(re.split(r"[<>=\[; ]", req)[0] in PEERS for req in project["dependencies"])


def test_version_is_the_project_version():
    assert bj.__version__ == PYPROJECT["project"]["version"]
    assert bj.__version__ == importlib.metadata.version("bilevel_jax")
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", bj.__version__)


def test_core_imports_no_peer_library():
    """The package never imports jaxopt, qpax, cvxpy(layers) or tqdm at import time."""
    for path in (ROOT / "bilevel_jax").rglob("*.py"):
        source = path.read_text()
        for peer in PEERS[:-1]:  # tqdm: only lazily, inside the progress display
            assert not re.search(rf"^\s*(import|from)\s+{peer}\b", source, re.M), (path, peer)
    code = ("import sys, bilevel_jax; "
            f"print(sorted(m for m in {PEERS!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------
# Status names.


def test_status_prints_its_name(capsys):
    S = bj.Status
    assert str(S.SUCCESS) == "SUCCESS" and f"{S.MAX_STEPS}" == "MAX_STEPS"
    assert f"{S.INFEASIBLE:>12}|" == "  INFEASIBLE|"
    assert f"{S.NONFINITE:d}" == "4" and f"{S.NONFINITE:3d}" == "  4"  # numeric specs: code
    print(S.UNBOUNDED, [S.SUCCESS])
    assert capsys.readouterr().out == "UNBOUNDED [<Status.SUCCESS: 0>]\n"
    assert repr(S.SUCCESS) == "<Status.SUCCESS: 0>"
    assert S.SUCCESS == 0 and int(S.SINGULAR) == 8 and jnp.asarray(S.NONCONVEX) == 7


def _quadratic(y, t):
    return 0.5 * jnp.sum((y - t) ** 2)


def test_status_of_a_solve_and_of_a_batch():
    sol = bj.argmin(_quadratic, jnp.zeros(2), jnp.ones(2))
    assert bj.Status(int(sol.info.status)) is bj.Status.SUCCESS
    assert bj.Status(sol.info.status) is bj.Status.SUCCESS  # a 0-d array works directly
    assert bj.Status.name_of(sol.info.status) == "SUCCESS"
    batch = jax.vmap(lambda t: bj.argmin(_quadratic, jnp.zeros(2), t))(
        jnp.array([[1.0, 2.0], [jnp.nan, 0.0]]))
    names = bj.Status.name_of(batch.info.status)
    assert names.tolist() == ["SUCCESS", "NONFINITE"]
    assert bj.Status.name_of(np.array([[0, 8]])).tolist() == [["SUCCESS", "SINGULAR"]]
    assert bj.Status.name_of(np.zeros((0,), np.int32)).shape == (0,)
    with pytest.raises(ValueError):
        bj.Status.name_of(99)


def test_demo_status_column_prints_names(capsys):
    from bilevel_jax._src import demo

    demo.main(num_steps=0)
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["step"])
    assert lines[header].split()[-1] == "status"
    assert lines[header + 1].split()[0] == "0" and lines[header + 1].split()[-1] == "SUCCESS"


# --------------------------------------------------------------------------------------------
# Progress display of the algorithms' run.

_P16 = bj.problems.sigd_quadratic(16)
_RUN = jax.jit(bj.algorithms.ssigd(_P16).run,
               static_argnames=("num_steps", "callback", "verbose"))


def _run(verbose, num_steps=20, key=0):
    x, history = _RUN(_P16.x0, jax.random.PRNGKey(key), num_steps, verbose=verbose)
    jax.effects_barrier()
    return x, history


def test_run_verbose_print(capsys):
    x_quiet, _ = _run(False)
    assert capsys.readouterr().out == ""
    x, history = _run("print")
    out = capsys.readouterr().out.splitlines()
    # The display does not change the result: the same iterates, up to the last bit that a
    # differently compiled program (the callback in the loop) may round otherwise.
    np.testing.assert_allclose(x, x_quiet, rtol=8 * np.finfo(x.dtype).eps, atol=0)
    steps = [int(line.split()[1].split("/")[0]) for line in out if line.startswith("step")]
    assert steps == [1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    assert out[-1].startswith("20 steps in")
    last = out[-2].split()
    assert float(last[3]) == pytest.approx(float(history.value[-1]), rel=1e-6)
    assert last[-1] == bj.Status.name_of(history.status[-1]) == "SUCCESS"
    # A second call of the compiled run starts a new display.
    _run("print", key=1)
    again = capsys.readouterr().out.splitlines()
    assert again[0].startswith("step  1/20") and again[-1].startswith("20 steps in")


def test_run_verbose_under_vmap_shows_one_member(capsys):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    jax.vmap(lambda k: _RUN(_P16.x0, k, 20, verbose="print")[0])(keys)
    jax.effects_barrier()
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in out if line.startswith("step")][:3] == [
        "1/20", "2/20", "4/20"]
    assert sum(line.startswith("20 steps in") for line in out) == 1


def test_run_verbose_tqdm(capsys):
    pytest.importorskip("tqdm")
    _run("tqdm")
    err = capsys.readouterr().err
    assert "20/20" in err and "SUCCESS" in err and "bilevel_jax" in err
    _run(True)  # automatic: tqdm when installed
    assert "20/20" in capsys.readouterr().err


def test_verbose_bad_values():
    assert make_progress(5, False) is None and make_progress(5, None) is None
    with pytest.raises(ValueError, match="verbose must be"):
        make_progress(5, "bar")
    with pytest.raises(TypeError, match="static"):
        make_progress(5, jnp.asarray(True))
    with pytest.raises(TypeError):
        bj.algorithms.ssigd(_P16).run(_P16.x0, jax.random.PRNGKey(0), 3, verbose=2)


def test_verbose_without_tqdm_falls_back_to_printing(monkeypatch, capsys):
    monkeypatch.setattr(progress, "_have_tqdm", lambda: False)
    with pytest.raises(ImportError, match="progress"):
        make_progress(3, "tqdm")
    display = make_progress(3, True)
    for i in range(3):
        display(np.int32(i), np.float64(1.0 / (i + 1)), np.float64(0.5), np.int32(i))
    out = capsys.readouterr().out.splitlines()
    assert [line.split()[-1] for line in out[:3]] == ["SUCCESS", "MAX_STEPS", "INFEASIBLE"]
    assert out[3].startswith("3 steps in")
