"""Coloring a sparsity pattern: which Jacobian columns (or rows) can share one JVP (or VJP).

NOTE [Distance-2 coloring of a Jacobian's columns and rows]
    Columns ``j`` and ``k`` of a Jacobian ``J`` (``m x n``) may share one forward-mode pass when
    no row has an entry in both: then ``J @ (e_j + e_k)`` holds column ``j`` in ``j``'s rows and
    column ``k`` in ``k``'s rows, without overlap. A *column coloring* gives columns that share
    a row different colors (a distance-2 coloring of the bipartite row/column graph, i.e. a
    proper coloring of the conflict graph ``PᵀP``); one JVP per color, with the seed
    ``S[c] = sum of e_j over the columns j of color c``, gives ``J @ Sᵀ`` (``m x colors``), and
    entry ``(r, j)`` is read back as ``(J Sᵀ)[r, color(j)]``. Rows that share a column get
    different colors in a *row coloring*, the same thing for ``Jᵀ``: one VJP per color, entry
    ``(r, j)`` is ``(U J)[color(r), j]``.

    The greedy algorithm visits the vertices in some order and gives each the smallest color
    that none of its already-colored distance-2 neighbours has. It never forms ``PᵀP``: each
    row keeps the set of colors used by its columns so far, as one Python ``int`` bit set, and
    a column's forbidden colors are the OR of its rows' sets (one big-int OR per row, in C).
    The first free color is the lowest zero bit: ``(~f & (f + 1)).bit_length() - 1``. The cost
    is ``O(nnz)`` big-int operations of ``colors / 64`` words each: one order on the
    10,000-column difference pattern takes about 15-30 ms, on 10^5 columns with 5 entries per
    row about 0.15 s; a coloring is cached per pattern object.

    Orders. Up to three orders are tried and the coloring with the fewest colors kept: the
    natural order (optimal for banded patterns, where it reproduces the band's width), largest
    first (by the number of entries in a column's rows, an upper bound of its distance-2
    degree, ties in natural order), and smallest last (repeatedly remove a vertex of least
    remaining degree in ``PᵀP``, color in reverse; a bucket queue), which needs the conflict
    graph and is tried only while building it takes at most :data:`SMALLEST_LAST_PAIRS` column
    pairs. On the 2-D Brusselator (N = 32) natural and largest-first give 12 colors, smallest
    last 11, as networkx's ``greedy_color(strategy="smallest_last")``; on banded patterns all
    three give the band's width. Measured (bench/README.md, "Sparse Jacobians"): all three
    orders on 10^4 columns in 50-170 ms (by machine load), once per pattern (cached). networkx's greedy
    coloring needs the conflict graph built first (scipy) and is slower; scipy itself has no
    graph coloring.

    Mode. ``mode="auto"`` colors both ways and keeps the fewer colors; on a tie, rows (reverse
    mode). Measured on the benchmark patterns (same colors both ways), row mode was 1.3-3.6x
    faster per call: a column pass is a ``jvp`` of the batch-``vmap``-ed function under a
    ``vmap`` over colors, and the NaN policy adds one batched forward pass that looks at every
    intermediate value after forward mode (NOTE [Non-finite values: one policy]), while the row
    pass is ``vmap`` over ``vjp`` per sample with no extra pass (bench/README.md, "Sparse
    Jacobians").
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch

from .pattern import SparsityPattern

_MODES = ("auto", "column", "row")


@dataclass(frozen=True)
class Coloring:
    """The result of :func:`color`.

    Attributes:
        mode: ``"column"`` (one JVP per color) or ``"row"`` (one VJP per color).
        colors: ``(in_numel,)`` int64 column colors (``mode="column"``) or ``(out_numel,)`` row
            colors (``mode="row"``), in ``range(n_colors)``.
        n_colors: the number of colors, i.e. of passes.
        column_colors: with ``mode="auto"``, the number of colors of the column coloring (else
            ``None`` when not computed).
        row_colors: likewise for the row coloring.
    """

    mode: str
    colors: torch.Tensor
    n_colors: int
    column_colors: int | None = None
    row_colors: int | None = None

    def __repr__(self) -> str:
        both = ""
        if self.column_colors is not None and self.row_colors is not None:
            both = f", column {self.column_colors} / row {self.row_colors}"
        return f"Coloring({self.mode}, {self.n_colors} colors{both})"


def _transpose(crow: np.ndarray, col: np.ndarray, n_cols: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR ``(crow, col)`` of an ``m x n_cols`` pattern -> CSR of its transpose (i.e. CSC)."""
    m = crow.shape[0] - 1
    rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(crow))
    order = np.argsort(col, kind="stable")  # within a column, rows stay sorted
    ccol = np.zeros(n_cols + 1, dtype=np.int64)
    ccol[1:] = np.cumsum(np.bincount(col, minlength=n_cols))
    return ccol, rows[order]


def greedy_columns(
    crow: np.ndarray, col: np.ndarray, n_cols: int, order: str = "best"
) -> np.ndarray:
    """Greedy distance-2 column coloring of the ``m x n_cols`` CSR pattern ``(crow, col)``.

    Args:
        crow: ``(m + 1,)`` int64 row pointers.
        col: ``(nnz,)`` int64 column indices.
        n_cols: ``n``.
        order: ``"natural"``, ``"largest_first"`` or ``"best"`` (both, the fewer colors kept;
            NOTE [Distance-2 coloring of a Jacobian's columns and rows]).

    Returns:
        ``(n,)`` int64 colors; columns that share a row differ. An empty column gets color 0.
    """
    if order == "best":
        orders = ["natural", "largest_first"]
        if int((np.diff(crow) ** 2).sum()) <= SMALLEST_LAST_PAIRS:
            orders.append("smallest_last")
        found = [greedy_columns(crow, col, n_cols, o) for o in orders]
        return min(found, key=_count)  # the first of the fewest
    ccol, rows_of = _transpose(crow, col, n_cols)
    if order == "natural":
        visit = np.arange(n_cols)
    elif order == "smallest_last":
        visit = smallest_last(*_conflict_graph(crow, col, n_cols))
    elif order == "largest_first":
        row_len = np.diff(crow)
        degree = np.zeros(n_cols, dtype=np.int64)
        np.add.at(degree, col, row_len[np.repeat(np.arange(len(row_len)), row_len)])
        visit = np.argsort(-degree, kind="stable")
    else:
        raise ValueError(
            f"order must be 'natural', 'largest_first', 'smallest_last' or 'best', got {order!r}"
        )
    used = [0] * (crow.shape[0] - 1)  # per row: bit set of the colors its columns hold
    colors = [0] * n_cols
    cptr, rlist = ccol.tolist(), rows_of.tolist()
    for j in visit.tolist():
        rs = rlist[cptr[j] : cptr[j + 1]]
        f = 0
        for r in rs:
            f |= used[r]
        c = (~f & (f + 1)).bit_length() - 1
        colors[j] = c
        bit = 1 << c
        for r in rs:
            used[r] |= bit
    return np.asarray(colors, dtype=np.int64)


#: ``smallest_last`` is tried by ``order="best"`` only when building the conflict graph takes
#: at most this many column pairs (the sum of squared row lengths).
SMALLEST_LAST_PAIRS = 2_000_000


def _conflict_graph(crow: np.ndarray, col: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """CSR adjacency ``(ptr, nbrs)`` of the column conflict graph ``PᵀP`` (no self loops):
    every pair of columns of every row, deduplicated (``sum(row_len**2)`` pairs built)."""
    row_len = np.diff(crow)
    rows = np.repeat(np.arange(len(row_len)), row_len)
    rl = row_len[rows]  # per entry, the length of its row
    left = np.repeat(col, rl)
    starts = np.repeat(crow[rows], rl)
    offsets = np.arange(int(rl.sum())) - np.repeat(np.cumsum(rl) - rl, rl)
    right = col[starts + offsets]
    keep = left != right
    key = np.unique(left[keep] * max(n, 1) + right[keep])
    a, b = key // max(n, 1), key % max(n, 1)
    ptr = np.zeros(n + 1, dtype=np.int64)
    ptr[1:] = np.cumsum(np.bincount(a, minlength=n))
    return ptr, b


def smallest_last(ptr: np.ndarray, nbrs: np.ndarray) -> np.ndarray:
    """Smallest-last vertex order of the graph ``(ptr, nbrs)``: repeatedly remove a vertex of
    least remaining degree; color in the reverse order of removal (bucket queue, O(V + E))."""
    n = len(ptr) - 1
    deg = np.diff(ptr).tolist()
    buckets: list[set[int]] = [set() for _ in range(max(deg, default=0) + 1)]
    for v, d in enumerate(deg):
        buckets[d].add(v)
    p, nb = ptr.tolist(), nbrs.tolist()
    removed = [False] * n
    order = []
    low = 0
    for _ in range(n):
        while not buckets[low]:
            low += 1
        v = buckets[low].pop()  # deterministic for ints (hash order)
        removed[v] = True
        order.append(v)
        for u in nb[p[v] : p[v + 1]]:
            if not removed[u]:
                buckets[deg[u]].discard(u)
                deg[u] -= 1
                buckets[deg[u]].add(u)
        low = max(low - 1, 0)
    return np.asarray(order[::-1], dtype=np.int64)


def _count(colors: np.ndarray) -> int:
    return int(colors.max()) + 1 if colors.size else 0


_CACHE: weakref.WeakKeyDictionary[SparsityPattern, dict[str, Coloring]] = (
    weakref.WeakKeyDictionary()
)


def color(pattern: SparsityPattern, mode: str = "auto") -> Coloring:
    """Color ``pattern``'s columns (forward mode) or rows (reverse mode) for compressed passes.

    Args:
        pattern: the per-sample Jacobian's structure, ``(out_numel, in_numel)``.
        mode: ``"column"``, ``"row"``, or ``"auto"`` (both; the fewer colors, rows on a tie;
            NOTE [Distance-2 coloring of a Jacobian's columns and rows]).

    Returns:
        A :class:`Coloring` (cached per pattern object and mode).

    Example:
        >>> r = torch.arange(4)  # d/dx of (x[1:] - x[:-1])**2 for x of shape (5,)
        >>> P = SparsityPattern.from_coo(torch.cat([r, r]), torch.cat([r, r + 1]), (4,), (5,))
        >>> color(P)
        Coloring(row, 2 colors, column 2 / row 2)
    """
    if mode not in _MODES:
        raise ValueError(f"color: expected mode in {_MODES}, got {mode!r}.")
    cache = _CACHE.setdefault(pattern, {})
    if mode in cache:
        return cache[mode]
    m, n = pattern.shape
    crow = pattern.crow_indices.cpu().numpy().astype(np.int64)
    col = pattern.col_indices.cpu().numpy().astype(np.int64)
    if mode in ("column", "auto") and "column" not in cache:
        c = greedy_columns(crow, col, n)
        cache["column"] = Coloring("column", torch.from_numpy(c), _count(c))
    if mode in ("row", "auto") and "row" not in cache:
        tcrow, tcol = _transpose(crow, col, n)
        r = greedy_columns(tcrow, tcol, m)
        cache["row"] = Coloring("row", torch.from_numpy(r), _count(r))
    if mode == "auto":
        cols, rows = cache["column"], cache["row"]
        best = cols if cols.n_colors < rows.n_colors else rows
        cache["auto"] = Coloring(
            best.mode, best.colors, best.n_colors, cols.n_colors, rows.n_colors
        )
    return cache[mode]


def is_valid(pattern: SparsityPattern, coloring: Coloring) -> bool:
    """Whether no two columns (rows, for a row coloring) that share a row (column) share a
    color: every row's (column's) entries carry distinct colors."""
    rows = pattern.row_indices()
    cols = pattern.col_indices
    if coloring.mode == "column":
        group, item = rows, cols
    else:
        group, item = cols, rows
    key = group * max(coloring.n_colors, 1) + coloring.colors[item]
    return int(torch.unique(key).numel()) == int(key.numel())


__all__ = ["Coloring", "color", "greedy_columns", "is_valid"]
