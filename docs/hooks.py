"""MkDocs build hooks: bring repository files that live outside ``docs/`` into the site.

* ``notebooks/*.ipynb`` become pages under ``notebooks/`` (rendered by mkdocs-jupyter, not
  executed), listed in a "Notebooks" nav section titled by each notebook's first heading;
* ``bench/results/*.png`` are copied to ``bench/results/`` for ``benchmarks.md``;
* ``--8<--`` snippet includes resolve against the repository root (``bench/results/*.txt``),
  whatever the working directory of ``mkdocs build``;
* optional pages (``migration.md``, ``sharding.md``) get their nav entries only when the file
  exists, so the nav tolerates their absence.
"""

from __future__ import annotations

import json
from pathlib import Path

from mkdocs.plugins import event_priority
from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent

# (nav title, file, the nav entry after which it goes)
OPTIONAL_PAGES = [
    ("Migrating from jaxopt, qpax, cvxpylayers", "migration.md", "Getting started"),
    ("Sharded sweeps", "sharding.md", "Upper-level algorithms"),
]


def _notebook_title(path: Path) -> str:
    """The first Markdown heading of a notebook, else its file name."""
    cells = json.loads(path.read_text(encoding="utf-8")).get("cells", [])
    for cell in cells:
        if cell.get("cell_type") != "markdown":
            continue
        for line in "".join(cell.get("source", [])).splitlines():
            if line.startswith("#"):
                return line.lstrip("#").strip()
    return path.stem


def _notebooks() -> list[Path]:
    return sorted((ROOT / "notebooks").glob("*.ipynb"))


def _nav_index(nav: list, title: str) -> int | None:
    for i, entry in enumerate(nav):
        if isinstance(entry, dict) and title in entry:
            return i
    return None


def on_config(config):
    """Point snippets at the repository root and complete the nav."""
    snippets = config.mdx_configs.setdefault("pymdownx.snippets", {})
    snippets["base_path"] = [str(ROOT)]
    nav = config.nav
    if nav is None:
        return config
    docs_dir = Path(config.docs_dir)
    for title, page, after in OPTIONAL_PAGES:
        if (docs_dir / page).exists() and _nav_index(nav, title) is None:
            i = _nav_index(nav, after)
            nav.insert(len(nav) if i is None else i + 1, {title: page})
    notebooks = _notebooks()
    if notebooks and _nav_index(nav, "Notebooks") is None:
        entries = [{_notebook_title(p): f"notebooks/{p.name}"} for p in notebooks]
        i = _nav_index(nav, "Benchmarks")
        nav.insert(len(nav) if i is None else i, {"Notebooks": entries})
    return config


@event_priority(50)  # before mkdocs-jupyter's on_files, so that it sees the notebooks
def on_files(files, config):
    """Add the notebooks and the benchmark figures to the site."""
    # Plain File objects rooted at the repository (not File.generated: mkdocs-jupyter reads
    # the notebook from src_dir + src_uri).
    paths = [*_notebooks(), *sorted((ROOT / "bench" / "results").glob("*.png"))]
    for path in paths:
        files.append(File(path.relative_to(ROOT).as_posix(), src_dir=str(ROOT),
                          dest_dir=config.site_dir, use_directory_urls=config.use_directory_urls))
    return files
