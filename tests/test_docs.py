"""The documentation: no citation of files outside the repository, a complete API reference,
and a strict ``mkdocs build`` (skipped when mkdocs and its plugins are not installed)."""

import importlib.util
import pathlib
import re
import subprocess
import sys

import pytest

import bilevel_jax as bj
from bilevel_jax import algorithms, discrete, problems

ROOT = pathlib.Path(__file__).parents[1]
# Files outside the repository that a docstring, comment, page or result must not cite: the
# library's mathematics is stated in docs/ (and in the docstrings) instead.
OUTSIDE = re.compile(r"ALGORITHMS\.md|DESIGN\.md|STYLE\.md|\.\./shared|/work/shared")
SCANNED = ["bilevel_jax", "docs", "bench", "notebooks", "tests", "README.md"]
TEXT_SUFFIXES = {".py", ".md", ".txt", ".ipynb", ".yml", ".yaml", ".toml", ".cfg", ".js"}
SUBMODULES = {"algorithms": algorithms, "discrete": discrete, "problems": problems}
BUILD_PACKAGES = ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
                  "mkdocs_jupyter")


def _text_files():
    for entry in SCANNED:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for f in files:
            if f.suffix in TEXT_SUFFIXES and f.resolve() != pathlib.Path(__file__).resolve():
                yield f


def test_no_citation_of_files_outside_the_repository():
    hits = []
    for f in _text_files():
        for i, line in enumerate(f.read_text(encoding="utf-8", errors="replace").splitlines()):
            if OUTSIDE.search(line):
                hits.append(f"{f.relative_to(ROOT)}:{i + 1}: {line.strip()[:120]}")
    assert not hits, "citations of files outside the repository:\n" + "\n".join(hits)


def _api_directives():
    """Every ``::: identifier`` of the API reference pages."""
    found = set()
    for page in sorted((ROOT / "docs" / "api").glob("*.md")):
        found |= set(re.findall(r"^:::\s*(\S+)", page.read_text(encoding="utf-8"), re.M))
    return found


def test_api_reference_lists_every_public_name():
    directives = _api_directives()
    missing = [name for name in bj.__all__ if f"bilevel_jax.{name}" not in directives]
    assert not missing, f"public names without an API reference entry: {missing}"
    # The submodules are rendered whole (each of their __all__ names; checked in the build).
    assert {f"bilevel_jax.{name}" for name in SUBMODULES} <= directives


def test_docs_reference_only_existing_pages():
    """Nav entries and Markdown links between pages point at files that exist."""
    docs = ROOT / "docs"
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav_pages = re.findall(r":\s*([\w/.-]+\.md)\s*$", config, re.M)
    assert nav_pages and all((docs / p).exists() for p in nav_pages), nav_pages
    for page in docs.rglob("*.md"):
        for target in re.findall(r"\]\(([^)#\s]+\.md)(?:#[^)]*)?\)", page.read_text("utf-8")):
            assert (page.parent / target).resolve().exists(), f"{page.name} -> {target}"


@pytest.mark.slow  # ~5 s of CPU, 15-25 s of wall time on a loaded 2-core machine
def test_mkdocs_build_strict(tmp_path):
    missing = [m for m in BUILD_PACKAGES if importlib.util.find_spec(m.split(".")[0]) is None
               or importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"documentation packages not installed ({missing}): pip install -e '.[docs]'")
    site = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir",
                           str(site)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    # Every public name is rendered with its anchor (a directive that rendered nothing, or a
    # submodule whose __all__ gained a name mkdocstrings skips, fails here).
    html = "".join(p.read_text(encoding="utf-8") for p in (site / "api").rglob("*.html"))
    ids = set(re.findall(r'id="(bilevel_jax\.[\w.]+)"', html))
    expected = {f"bilevel_jax.{name}" for name in bj.__all__ if name not in SUBMODULES}
    for sub, module in SUBMODULES.items():
        expected |= {f"bilevel_jax.{sub}.{name}" for name in module.__all__}
    assert not expected - ids, f"not rendered in the API reference: {sorted(expected - ids)}"
    # The notebooks and the benchmark figures are part of the site.
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        assert (site / "notebooks" / nb.stem / "index.html").exists(), nb.name
    for fig in (ROOT / "bench" / "results").glob("*.png"):
        assert (site / "bench" / "results" / fig.name).exists(), fig.name
