"""The structural sparsity pattern of a per-sample Jacobian.

A :class:`SparsityPattern` says which entries of the flattened per-sample Jacobian
``(out_numel, in_numel)`` (row-major vec of the output and of the argument, the project's
default) can be nonzero for *some* input values. It is shared by every sample of a batch.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

#: Patterns with more entries are plotted as occupied bins (at most ``SPY_BINS`` per axis)
#: instead of one marker per entry.
SPY_MARKERS_MAX = 200_000
SPY_BINS = 800


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

    def to_sparse(self) -> torch.Tensor:
        """The pattern as a sparse CSR boolean tensor ``(out_numel, in_numel)`` (``True`` at
        every stored entry)."""
        with warnings.catch_warnings():  # "sparse CSR support is in beta": not the caller's concern
            warnings.simplefilter("ignore", UserWarning)
            return torch.sparse_csr_tensor(
                self.crow_indices,
                self.col_indices,
                torch.ones(self.nnz, dtype=torch.bool),
                size=self.shape,
                check_invariants=False,
            )

    def equals(self, other: object) -> bool:
        """Whether ``other`` is a pattern with the same shapes and the same entries."""
        return (
            isinstance(other, SparsityPattern)
            and self.out_shape == other.out_shape
            and self.in_shape == other.in_shape
            and torch.equal(self.crow_indices, other.crow_indices)
            and torch.equal(self.col_indices, other.col_indices)
        )

    def __repr__(self) -> str:
        return (
            f"SparsityPattern(out_shape={self.out_shape}, in_shape={self.in_shape}, "
            f"nnz={self.nnz}, density={self.density:.4g})"
        )

    # -- plotting ----------------------------------------------------------------------------------

    def plot(
        self,
        path: str | os.PathLike[str],
        *,
        title: str | None = None,
        markersize: float | None = None,
        dpi: int = 150,
    ) -> None:
        """Write a spy plot of the pattern (rows: output elements, columns: argument elements)
        to the PNG file ``path``.

        Needs matplotlib (``pip install "jacbatch[plot]"``), imported here and used without
        pyplot's global state. The file is written under a temporary name beside ``path`` and
        moved onto it only when complete, so ``path`` never holds a half-written image.

        Args:
            path: the ``.png`` file to create or replace.
            title: the plot's title (default: shape, nnz and density).
            markersize: the size of one entry's marker (default: from the pattern's size).
                Patterns over ``SPY_MARKERS_MAX`` entries are drawn as occupied bins instead.
            dpi: resolution.

        Raises:
            ImportError: matplotlib is not installed.
        """
        try:
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError(
                "SparsityPattern.plot: expected matplotlib to be installed, got ImportError. "
                'Install it with pip install "jacbatch[plot]".'
            ) from None
        from ..streaming import discard, temp_name

        m, n = self.shape
        aspect = max(m, 1) / max(n, 1)
        size_in = (6.0, max(3.0, 6.0 * aspect)) if aspect <= 1 else (max(3.0, 6.0 / aspect), 6.0)
        fig: Any = Figure(figsize=size_in, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        rows, cols = self.row_indices(), self.col_indices
        if self.nnz > SPY_MARKERS_MAX:  # one marker per entry would be slow: occupied bins
            bm, bn = min(m, SPY_BINS), min(n, SPY_BINS)
            occupied = torch.zeros(bm * bn, dtype=torch.bool)
            occupied[(rows * bm // m) * bn + cols * bn // n] = True
            ax.imshow(
                occupied.reshape(bm, bn).numpy(), cmap="Greys", interpolation="nearest",
                extent=(-0.5, n - 0.5, m - 0.5, -0.5), aspect="auto",
            )  # fmt: skip
        else:
            size = markersize if markersize is not None else max(0.5, 300.0 / max(m, n, 1))
            ax.plot(
                cols.numpy(), rows.numpy(), "s", markersize=size, color="black",
                linestyle="none",
            )  # fmt: skip
        ax.set_xlim(-0.5, n - 0.5)
        ax.set_ylim(m - 0.5, -0.5)
        ax.set_xlabel(f"argument element (in_shape {self.in_shape})")
        ax.set_ylabel(f"output element (out_shape {self.out_shape})")
        ax.set_title(title if title is not None else f"{m} x {n}, nnz {self.nnz}, "
                     f"density {self.density:.3g}")  # fmt: skip
        target = os.fspath(path)
        tmp = temp_name(target)
        try:
            with open(tmp, "wb") as f:
                fig.savefig(f, format="png", dpi=dpi)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            discard(tmp)
            raise


__all__ = ["SparsityPattern"]
