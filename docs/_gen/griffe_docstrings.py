"""A griffe extension that adapts jacbatch's docstrings to mkdocstrings' Google parser.

Two conventions of the code base that griffe reads differently from Sphinx/napoleon:

* ``Example:`` (singular, also ``Example (what it shows):``) opens an examples section in the
  code base, but griffe only knows ``Examples:`` and would render the doctest lines as Markdown;
  it is renamed.
* Sphinx cross-reference roles (``:func:`jacobian```, ``:class:`~x.Y```) would show as literal
  text; they become inline code.
* An ``Args:`` entry that documents several parameters at once (``func, args, argnums, ...:
  as in jacobian``) may wrap its list of names onto a second line; the two lines are joined so
  that the entry is parsed as one item instead of being dropped.

The docstrings in the package are left as they are (doctests and ``help()`` read them as
written); only what the documentation site renders is adapted.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example(?: \([^)\n]*\))?:\s*$", re.MULTILINE)
_ROLE = re.compile(r":(?:func|class|meth|attr|mod|data|exc|obj|py:\w+):`~?([^`]+)`")
_WRAPPED_NAMES = re.compile(r"^( +)([A-Za-z_][\w, ]*,)[ ]*\n +([A-Za-z_][\w, ]*:)", re.MULTILINE)


class JacbatchDocstrings(griffe.Extension):
    """Rename ``Example:`` sections and join wrapped multi-name ``Args:`` entries."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is None:
            return
        value = _ROLE.sub(r"`\1`", _EXAMPLE.sub(r"\1Examples:", doc.value))
        doc.value = _WRAPPED_NAMES.sub(r"\1\2 \3", value)
