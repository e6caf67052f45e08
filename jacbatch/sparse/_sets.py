"""Index-set algebra for sparsity detection: per element of a tensor, a set of argument elements.

A :class:`Deps` is a boolean sparse matrix in CSR form, ``(rows, n_cols)``: row ``r`` lists the
flat argument elements that flat element ``r`` of some graph value may depend on. Every
operation here is vectorized (``gather``, ``repeat_interleave``, ``unique``): the cost grows with
the number of stored entries, never with a Python loop over elements.

NOTE [Three primitives are enough]
    Every op rule of :mod:`jacbatch.sparse.detect` is one of, or a union of:

    * **gather** (``out[m] = deps[src[m]]``, ``src[m] = -1`` for "nothing"): views, indexing,
      broadcasting, padding; one output element copies one input element's set;
    * **scatter** (``out[tgt[e]] ∪= deps[e]``): reductions; many inputs into one output;
    * **relate** (``out[o] ∪= deps[e]`` for each pair ``(o, e)`` of a relation): windows
      (convolution, pooling), prefixes (``cumsum``), scatters into a tensor.

    Sets are merged by sorting the keys ``row * n_cols + col`` once (``torch.unique``), which
    leaves each row's columns sorted and distinct, as :class:`SparsityPattern` stores them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

_I64 = torch.int64


@dataclass(frozen=True)
class Deps:
    """Per row (a flat element of a value), the sorted distinct argument elements it may depend on.

    Attributes:
        crow: ``(rows + 1,)`` int64 CSR row pointers.
        col: ``(nnz,)`` int64 columns, sorted and distinct within each row.
        n_cols: the argument's ``in_numel``.
    """

    crow: torch.Tensor
    col: torch.Tensor
    n_cols: int

    @property
    def rows(self) -> int:
        return int(self.crow.numel()) - 1

    @property
    def nnz(self) -> int:
        return int(self.col.numel())

    @staticmethod
    def identity(n: int) -> Deps:
        """Element ``i`` of the argument depends on itself only."""
        return Deps(torch.arange(n + 1, dtype=_I64), torch.arange(n, dtype=_I64), n)

    def row_index(self) -> torch.Tensor:
        """``(nnz,)``: the row of each stored entry."""
        counts = self.crow[1:] - self.crow[:-1]
        return torch.repeat_interleave(torch.arange(self.rows, dtype=_I64), counts)

    def gather(self, src: torch.Tensor) -> Deps:
        """``out[m] = self[src[m]]`` (empty where ``src[m] < 0``); ``src`` any shape, flattened."""
        src = src.reshape(-1).to(_I64)
        valid = src >= 0
        s = src.clamp(min=0)
        if self.rows == 0:
            starts = torch.zeros_like(s)
            counts = torch.zeros_like(s)
        else:
            starts = self.crow[s]
            counts = torch.where(valid, self.crow[s + 1] - starts, 0)
        crow = torch.zeros(src.numel() + 1, dtype=_I64)
        torch.cumsum(counts, 0, out=crow[1:])
        total = int(crow[-1])
        if total == 0:
            return Deps(crow, torch.zeros(0, dtype=_I64), self.n_cols)
        row = torch.repeat_interleave(torch.arange(src.numel(), dtype=_I64), counts)
        pos = torch.arange(total, dtype=_I64) - crow[row] + starts[row]
        return Deps(crow, self.col[pos], self.n_cols)

    def scatter(self, tgt: torch.Tensor, rows: int) -> Deps:
        """``out[tgt[e]] ∪= self[e]`` for every row ``e`` (``tgt`` flattened, one per row)."""
        tgt = tgt.reshape(-1).to(_I64)
        return from_coo(tgt[self.row_index()], self.col, rows, self.n_cols)

    def relate(self, out_idx: torch.Tensor, in_idx: torch.Tensor, rows: int) -> Deps:
        """``out[out_idx[k]] ∪= self[in_idx[k]]`` for every pair ``k``."""
        out_idx = out_idx.reshape(-1).to(_I64)
        got = self.gather(in_idx)  # one row per pair
        return from_coo(out_idx[got.row_index()], got.col, rows, self.n_cols)


def from_coo(rows_idx: torch.Tensor, cols: torch.Tensor, rows: int, n_cols: int) -> Deps:
    """The sets with entries ``(rows_idx[k], cols[k])`` (duplicates merged)."""
    key = torch.unique(rows_idx * max(n_cols, 1) + cols)
    r = torch.div(key, max(n_cols, 1), rounding_mode="floor")
    crow = torch.zeros(rows + 1, dtype=_I64)
    if key.numel():
        torch.cumsum(torch.bincount(r, minlength=rows), 0, out=crow[1:])
    return Deps(crow, key - r * max(n_cols, 1), n_cols)


def union(parts: Sequence[Deps | None], rows: int, n_cols: int) -> Deps | None:
    """Row-wise union of sets with the same rows (``None``: depends on nothing)."""
    got = [p for p in parts if p is not None and p.nnz]
    if not got:
        return None if all(p is None for p in parts) else empty(rows, n_cols)
    if len(got) == 1 or all(p is got[0] for p in got):
        return got[0]
    if all(torch.equal(p.crow, got[0].crow) and torch.equal(p.col, got[0].col) for p in got[1:]):
        return got[0]
    return from_coo(
        torch.cat([p.row_index() for p in got]), torch.cat([p.col for p in got]), rows, n_cols
    )


def empty(rows: int, n_cols: int) -> Deps:
    """No element depends on anything."""
    return Deps(torch.zeros(rows + 1, dtype=_I64), torch.zeros(0, dtype=_I64), n_cols)


def stack_rows(parts: Sequence[Deps | None], sizes: Sequence[int], n_cols: int) -> Deps:
    """The rows of ``parts`` one after another (``None`` stands for ``size`` empty rows)."""
    crows = [torch.zeros(1, dtype=_I64)]
    cols = []
    offset = 0
    for p, size in zip(parts, sizes, strict=True):
        if p is None:
            crows.append(torch.full((size,), offset, dtype=_I64))
            continue
        crows.append(p.crow[1:] + offset)
        cols.append(p.col)
        offset += p.nnz
    col = torch.cat(cols) if cols else torch.zeros(0, dtype=_I64)
    return Deps(torch.cat(crows), col, n_cols)


__all__ = ["Deps", "empty", "from_coo", "stack_rows", "union"]
