"""One plain-text table formatter for every report the library prints."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(
    header: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "", rule: bool = False
) -> list[str]:
    """Lines of a table: the first column left-aligned, the others right-aligned.

    Args:
        header: one title per column.
        rows: one sequence of cells per row (converted with ``str``), as many as ``header``.
        indent: prefix of every line.
        rule: add a line of dashes under the header.

    Example:
        >>> print("\\n".join(format_table(["route", "ms"], [["jacrev", "1.5"], ["vjp", "12.0"]])))
        route     ms
        jacrev   1.5
        vjp     12.0
    """
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[k]) for r in cells)) for k, h in enumerate(header)]

    def line(row: Sequence[str]) -> str:
        parts = [
            f"{c:<{w}}" if k == 0 else f"{c:>{w}}"
            for k, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        return (indent + "  ".join(parts)).rstrip()

    lines = [line(header)]
    if rule:
        lines.append(line(["-" * w for w in widths]))
    lines += [line(r) for r in cells]
    return lines
