"""Coloring of sparsity patterns: valid colorings, and color counts against an independent
distance-2 greedy written here (on the dense mask, with Python sets)."""

from __future__ import annotations

import pytest
import torch

from jacbatch.sparse import SparsityPattern
from jacbatch.sparse.coloring import color, greedy_columns, is_valid


def reference_greedy(mask: torch.Tensor) -> int:
    """Colors of the plain distance-2 greedy, natural column order, from the dense mask."""
    m, n = mask.shape
    rows_of = [set(mask[:, j].nonzero().flatten().tolist()) for j in range(n)]
    cols_of = [mask[i].nonzero().flatten().tolist() for i in range(m)]
    colors: dict[int, int] = {}
    for j in range(n):
        taken = {colors[k] for i in rows_of[j] for k in cols_of[i] if k in colors}
        c = 0
        while c in taken:
            c += 1
        colors[j] = c
    return max(colors.values(), default=-1) + 1


def independent_valid(mask: torch.Tensor, colors: torch.Tensor, mode: str) -> bool:
    """No row (column mode) or column (row mode) holds two entries of the same color."""
    if mode == "row":
        mask = mask.T
    for i in range(mask.shape[0]):
        cs = colors[mask[i]].tolist()
        if len(cs) != len(set(cs)):
            return False
    return True


def banded(n: int, lower: int, upper: int) -> torch.Tensor:
    i = torch.arange(n)
    d = i[None, :] - i[:, None]
    return (d >= -lower) & (d <= upper)


def difference(n: int) -> torch.Tensor:  # (x[1:] - x[:-1])**2: rows i, columns i and i + 1
    return banded(n, 0, 1)[: n - 1]


def brusselator(N: int) -> torch.Tensor:
    """The 2-D Brusselator's pattern: periodic 5-point stencil per species, local coupling."""
    idx = torch.arange(N * N).reshape(N, N)
    mask = torch.zeros(2 * N * N, 2 * N * N, dtype=torch.bool)
    for di, dj in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1)):
        nb = torch.roll(idx, (di, dj), (0, 1)).reshape(-1)
        for s in (0, 1):
            mask[s * N * N + idx.reshape(-1), s * N * N + nb] = True
    for s, t in ((0, 1), (1, 0)):
        mask[s * N * N + idx.reshape(-1), t * N * N + idx.reshape(-1)] = True
    return mask


def random_mask(m: int, n: int, density: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(m, n, generator=g) < density


CASES = {
    "difference_40": difference(40),
    "tridiagonal_30": banded(30, 1, 1),
    "band_2_3": banded(25, 2, 3),
    "brusselator_8": brusselator(8),
    "block_diag": torch.block_diag(*[torch.ones(4, 3, dtype=torch.bool)] * 5),
    "dense_6x9": torch.ones(6, 9, dtype=torch.bool),
    "random_sparse": random_mask(50, 40, 0.05, 0),
    "random_denser": random_mask(30, 60, 0.2, 1),
    "empty": torch.zeros(5, 7, dtype=torch.bool),
}


def pattern(mask: torch.Tensor) -> SparsityPattern:
    return SparsityPattern.from_mask(mask, (mask.shape[0],), (mask.shape[1],))


@pytest.mark.parametrize("mode", ["column", "row"])
@pytest.mark.parametrize("name", list(CASES))
def test_valid_and_near_greedy(name: str, mode: str) -> None:
    mask = CASES[name]
    c = color(pattern(mask), mode)
    assert c.mode == mode
    n_items = mask.shape[1] if mode == "column" else mask.shape[0]
    assert c.colors.shape == (n_items,)
    assert independent_valid(mask, c.colors, mode)
    assert is_valid(pattern(mask), c)
    expected = reference_greedy(mask if mode == "column" else mask.T)
    assert c.n_colors <= max(1, int(1.1 * expected)) or c.n_colors <= expected
    if mask.any():
        assert c.n_colors == int(c.colors.max()) + 1


@pytest.mark.parametrize(
    "mask, colors",
    [(difference(100), 2), (banded(50, 1, 1), 3), (banded(40, 2, 3), 6), (torch.eye(7) > 0, 1)],
    ids=["difference", "tridiagonal", "band_2_3", "diagonal"],
)
def test_banded_counts(mask: torch.Tensor, colors: int) -> None:
    """A band of width w needs exactly w colors; the greedy finds that."""
    assert color(pattern(mask), "column").n_colors == colors
    assert color(pattern(mask), "row").n_colors == colors


def test_dense_needs_every_column() -> None:
    mask = torch.ones(3, 8, dtype=torch.bool)
    c = color(pattern(mask))
    assert (c.column_colors, c.row_colors) == (8, 3)
    assert (c.mode, c.n_colors) == ("row", 3)


def test_auto_prefers_fewer_and_rows_on_ties() -> None:
    tall = torch.ones(8, 3, dtype=torch.bool)  # 3 column colors, 8 row colors
    assert color(pattern(tall)).mode == "column"
    square = banded(10, 1, 1)  # 3 and 3: a tie goes to rows (reverse mode)
    c = color(pattern(square))
    assert (c.mode, c.column_colors, c.row_colors) == ("row", 3, 3)
    assert "column 3 / row 3" in repr(c)


def test_cached_per_pattern() -> None:
    p = pattern(difference(20))
    assert color(p) is color(p)


def test_bad_mode() -> None:
    with pytest.raises(ValueError, match="mode"):
        color(pattern(difference(5)), "columns")


def test_is_valid_rejects_a_conflict() -> None:
    p = pattern(difference(6))
    c = color(p, "column")
    bad = type(c)("column", torch.zeros_like(c.colors), 1)
    assert not is_valid(p, bad)


@pytest.mark.parametrize("order", ["natural", "largest_first", "smallest_last", "best"])
@pytest.mark.parametrize("name", ["brusselator_8", "random_sparse", "random_denser", "dense_6x9"])
def test_every_order_is_valid(name: str, order: str) -> None:
    mask = CASES[name]
    p = pattern(mask)
    crow, col = p.crow_indices.numpy(), p.col_indices.numpy()
    colors = torch.from_numpy(greedy_columns(crow, col, mask.shape[1], order))
    assert independent_valid(mask, colors, "column")


def test_smallest_last_on_the_brusselator() -> None:
    """Smallest-last finds 11 colors on the 32 x 32 Brusselator where the other orders find 12;
    "best" keeps it."""
    assert color(pattern(brusselator(32)), "column").n_colors <= 11
