"""The structural sparsity pattern of a per-sample Jacobian.

A :class:`SparsityPattern` says which entries of the flattened per-sample Jacobian
``(out_numel, in_numel)`` (row-major vec of the output and of the argument, the project's
default) can be nonzero for *some* input values. It is shared by every sample of a batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True, eq=False)
class SparsityPattern:
    """Which entries of a per-sample Jacobian may be nonzero, stored as CSR index arrays.

    Attributes:
        out_shape: the per-sample output shape; ``out_numel = prod(out_shape)`` rows.
        in_shape: the per-sample argument shape; ``in_numel = prod(in_shape)`` columns.
        crow_indices: ``(out_numel + 1,)`` int64, CSR row pointers.
        col_indices: ``(nnz,)`` int64, column of each stored entry, sorted within each row.
    """

    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    crow_indices: torch.Tensor
    col_indices: torch.Tensor

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_mask(
        cls, mask: torch.Tensor, out_shape: tuple[int, ...], in_shape: tuple[int, ...]
    ) -> SparsityPattern:
        """The pattern of a boolean ``(out_numel, in_numel)`` mask (``True``: may be nonzero)."""
        m, n = math.prod(out_shape), math.prod(in_shape)
        if tuple(mask.shape) != (m, n):
            raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {(m, n)}")
        rows, cols = mask.to(torch.bool).cpu().nonzero(as_tuple=True)
        return cls.from_coo(rows, cols, out_shape, in_shape)

    @classmethod
    def from_coo(
        cls,
        rows: torch.Tensor,
        cols: torch.Tensor,
        out_shape: tuple[int, ...],
        in_shape: tuple[int, ...],
    ) -> SparsityPattern:
        """The pattern with entries at ``(rows[k], cols[k])`` (duplicates merged, any order)."""
        m, n = math.prod(out_shape), math.prod(in_shape)
        rows = rows.to(torch.int64).cpu().reshape(-1)
        cols = cols.to(torch.int64).cpu().reshape(-1)
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= m):
            raise ValueError(f"row indices must lie in [0, {m})")
        if cols.numel() and (int(cols.min()) < 0 or int(cols.max()) >= n):
            raise ValueError(f"column indices must lie in [0, {n})")
        key = torch.unique(rows * max(n, 1) + cols)  # sorted: row-major order, no duplicates
        r, c = key // max(n, 1), key % max(n, 1)
        crow = torch.zeros(m + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(torch.bincount(r, minlength=m), 0)
        return cls(tuple(out_shape), tuple(in_shape), crow, c)

    # -- views -------------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_numel, in_numel)``."""
        return (math.prod(self.out_shape), math.prod(self.in_shape))

    @property
    def nnz(self) -> int:
        """The number of structurally nonzero entries."""
        return int(self.col_indices.numel())

    @property
    def density(self) -> float:
        """``nnz / (out_numel * in_numel)`` (1.0 for an empty shape)."""
        m, n = self.shape
        return self.nnz / (m * n) if m * n else 1.0

    def row_indices(self) -> torch.Tensor:
        """``(nnz,)`` int64: the row of each stored entry (COO rows, in CSR order)."""
        counts = self.crow_indices[1:] - self.crow_indices[:-1]
        return torch.repeat_interleave(torch.arange(self.shape[0]), counts)

    def to_mask(self) -> torch.Tensor:
        """The dense boolean ``(out_numel, in_numel)`` mask."""
        mask = torch.zeros(self.shape, dtype=torch.bool)
        mask[self.row_indices(), self.col_indices] = True
        return mask


__all__ = ["SparsityPattern"]
