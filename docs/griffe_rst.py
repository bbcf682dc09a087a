"""Griffe extension: render the reST idioms of the docstrings as Markdown.

The docstrings are Google style with two reST habits that Markdown does not know:
``:func:`~pkg.name``` roles (shown as code ``name``) and ``.. math::`` blocks (turned into
``$$ ... $$`` display maths for ``pymdownx.arithmatex``). Double backticks already render as
code in Markdown.
"""

from __future__ import annotations

import re
import textwrap

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|data|obj|exc):`(~?)([^`]+)`")


def _short(match: re.Match) -> str:
    """``:func:`~a.b``` -> ```b```, ``:func:`a.b``` -> ```a.b```."""
    target = match.group(2)
    if match.group(1):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


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


def convert(text: str) -> str:
    """The docstring ``text`` with roles and maths blocks converted to Markdown."""
    return _math(_ROLE.sub(_short, text))


class RestToMarkdown(griffe.Extension):
    """Convert reST roles and maths blocks in every docstring before rendering."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:  # noqa: D102
        if obj.docstring is not None:
            obj.docstring.value = convert(obj.docstring.value)
