"""Griffe extension: render the reST idioms of the docstrings as Markdown.

The docstrings are Google style with three reST habits that Markdown does not know:

* roles such as ``:func:`~bilevel_jax.argmin```: a cross-reference link (autorefs) when the
  target is a public, documented name, else inline code (private helpers, JAX functions);
* ``.. math::`` blocks, turned into ``$$ ... $$`` display maths for ``pymdownx.arithmatex``;
* a paragraph ending in ``::`` before a literal block, which keeps a single colon (the
  indented block is a code block in Markdown too).

Double backticks already render as code in Markdown.
"""

from __future__ import annotations

import ast
import re
import textwrap
from pathlib import Path

import griffe

ROOT = Path(__file__).resolve().parent.parent
_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([^`]+)`")
# Public namespaces and the files that define their __all__; a private module's objects are
# documented under the namespace that re-exports them.
_NAMESPACES = {
    "bilevel_jax": "bilevel_jax/__init__.py",
    "bilevel_jax.algorithms": "bilevel_jax/algorithms.py",
    "bilevel_jax.discrete": "bilevel_jax/discrete.py",
    "bilevel_jax.problems": "bilevel_jax/problems/__init__.py",
}
_HOME = {"outer": "bilevel_jax.algorithms", "discrete": "bilevel_jax.discrete",
         "problems": "bilevel_jax.problems"}
_SUBMODULES = {ns.rsplit(".", 1)[1] for ns in _NAMESPACES if "." in ns}


def _all_names(path: Path) -> list[str]:
    """The string entries of ``__all__`` in a module (read statically)."""
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return [e.value for e in node.value.elts if isinstance(e, ast.Constant)]
    return []


def _public() -> set[str]:
    names = set()
    for ns, rel in _NAMESPACES.items():
        names |= {f"{ns}.{n}" for n in _all_names(ROOT / rel) if n not in _SUBMODULES}
    return names


PUBLIC = _public()


def _resolve(target: str, home: str) -> str | None:
    """The public identifier that ``target`` (as written in a docstring of ``home``) names."""
    if target in PUBLIC:
        return target
    parts = target.split(".")
    if target.startswith("bilevel_jax._src.") and len(parts) == 4:
        candidate = f"{_HOME.get(parts[2], 'bilevel_jax')}.{parts[3]}"
        return candidate if candidate in PUBLIC else None
    if len(parts) == 1:
        for ns in (home, *_NAMESPACES):
            if f"{ns}.{target}" in PUBLIC:
                return f"{ns}.{target}"
    return None


def _roles(text: str, home: str) -> str:
    def replace(match: re.Match) -> str:
        tilde, target = match.groups()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        identifier = _resolve(target, home)
        return f"[`{shown}`][{identifier}]" if identifier else f"`{shown}`"

    return _ROLE.sub(replace, text)


def _math(text: str) -> str:
    """Replace ``.. math:: X`` (inline or indented block) by a ``$$`` display block."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if not stripped.startswith(".. math::"):
            out.append(line)
            i += 1
            continue
        indent = line[: len(line) - len(stripped)]
        body = [stripped[len(".. math::"):].strip()]
        i += 1
        while i < len(lines) and (not lines[i].strip() or
                                  len(lines[i]) - len(lines[i].lstrip()) > len(indent)):
            body.append(lines[i])
            i += 1
        maths = textwrap.dedent("\n".join(body[1:])).strip()
        maths = (body[0] + "\n" + maths).strip()
        out.extend([indent + "$$", *[indent + m for m in maths.splitlines()], indent + "$$", ""])
    return "\n".join(out)


def _literal_blocks(text: str) -> str:
    """``text::`` before an indented literal block keeps one colon."""
    return re.sub(r"(\S)::[ \t]*$", r"\1:", text, flags=re.M)


def convert(text: str, home: str = "bilevel_jax") -> str:
    """The docstring ``text`` with roles, maths blocks and literal markers made Markdown."""
    return _literal_blocks(_math(_roles(text, home)))


class RestToMarkdown(griffe.Extension):
    """Convert reST roles and maths blocks in every docstring before rendering."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: D102
        if obj.docstring is None:
            return
        parts = obj.path.split(".")
        home = _HOME.get(parts[2], "bilevel_jax") if obj.path.startswith("bilevel_jax._src.") \
            else "bilevel_jax"
        obj.docstring.value = convert(obj.docstring.value, home)
