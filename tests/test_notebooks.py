"""The notebooks run at their small size (each has a jupytext ``.py`` twin that we execute)."""

import pathlib
import runpy

import pytest

NOTEBOOKS = sorted((pathlib.Path(__file__).parents[1] / "notebooks").glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs(path, monkeypatch):
    monkeypatch.setenv("BILEVEL_JAX_SIZE", "small")
    runpy.run_path(str(path), run_name="__main__")


def test_notebooks_have_an_ipynb_twin():
    for path in NOTEBOOKS:
        assert path.with_suffix(".ipynb").exists(), f"{path.name} has no .ipynb twin"
