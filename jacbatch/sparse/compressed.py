"""Compressed passes: one JVP per column color (or one VJP per row color), then one gather.

NOTE [Compressed Jacobians]
    With a column coloring (:mod:`jacbatch.sparse.coloring`), the seed matrix ``S``
    (``colors x n``) has ``S[c, j] = 1`` where column ``j`` has color ``c``. For every sample,
    ``C = J Sᵀ`` (``m x colors``) comes from one JVP per color, and entry ``k`` of the pattern,
    at ``(row_k, col_k)``, is ``C[row_k, color(col_k)]``: no two columns of one color share a
    row, so nothing else landed there. Row mode is the transpose: ``U[c, r] = 1`` where row
    ``r`` has color ``c``, ``C = U J`` (``colors x n``) from one VJP per color, and entry ``k`` is
    ``C[color(row_k), col_k]``.

    Forward mode runs ``jvp`` of the batch-``vmap``-ed function, with ``vmap`` over the colors
    outside (the tangent vmap outside the batch vmap, as the project's ``jacfwd`` route: torch
    2.13's ``vmap(jacfwd(f))`` is wrong for ``det``/``solve``); a shared argument's tangent is
    one ``in_shape`` tensor for the whole batch, a batched one the seed expanded over the batch
    (a view, no copy). Reverse mode runs per sample (``vmap`` over the batch outside ``vjp``,
    as ``vmap(jacrev(f))``), because the pull-back of a batched function w.r.t. a shared
    argument would sum over the samples. Both return ``(colors, B, m)`` / ``(colors, B, n)``,
    and the gather reads ``values[:, k] = C[color_k, :, row_k]`` (column mode) or
    ``C[color_k, :, col_k]`` (row mode) for all entries at once (NOTE [One gather into the
    values]; per chunk of colors when the colors are chunked), so that no index tensor of size
    ``B x nnz`` is ever built. These passes are torch.func
    transforms; where the traced rules cover the function and memory allows, the traced
    closed form writes the nonzeros instead (:mod:`jacbatch.sparse.closed`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .. import _torch_bugs
from .coloring import Coloring
from .pattern import SparsityPattern


def _batch_map(
    func: Callable[..., torch.Tensor], flags: Sequence[bool]
) -> Callable[..., torch.Tensor]:
    """``func`` over the batch: ``vmap`` over the batched arguments (dim 0), or, when none is
    batched, one call with a leading batch of one."""
    if any(flags):
        return torch.func.vmap(func, in_dims=tuple(0 if f else None for f in flags))
    return lambda *xs: func(*xs).unsqueeze(0)


def column_pass(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    flags: Sequence[bool],
    argnum: int,
    in_shape: tuple[int, ...],
    seeds: torch.Tensor,
) -> torch.Tensor:
    """``J_b Sᵀ`` for every sample by forward mode.

    Args:
        func: the per-sample function.
        args: its arguments, batch first where ``flags`` says batched (``B`` samples).
        flags: per argument, whether it is batched.
        argnum: the differentiated argument.
        in_shape: its per-sample shape (``n = prod(in_shape)``).
        seeds: ``(colors, n)`` tangent seeds, the arguments' dtype and device.

    Returns:
        ``(colors, B, m)``: ``out[c, b] = J_b @ seeds[c]``.
    """
    fb = _batch_map(func, flags)
    x = args[argnum]
    B = x.shape[0] if flags[argnum] else None

    def g(xa: torch.Tensor) -> torch.Tensor:
        return fb(*args[:argnum], xa, *args[argnum + 1 :])

    def one(s: torch.Tensor) -> torch.Tensor:
        t = s.reshape(in_shape)
        if B is not None:
            t = t.expand(B, *in_shape)
        tangent = torch.func.jvp(g, (x,), (t,))[1]
        return tangent.reshape(tangent.shape[0], -1)

    return torch.func.vmap(one)(seeds)


def row_pass(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    flags: Sequence[bool],
    argnum: int,
    out_shape: tuple[int, ...],
    cotangents: torch.Tensor,
    loop: bool = False,
) -> torch.Tensor:
    """``U J_b`` for every sample by reverse mode.

    Args:
        func, args, flags, argnum: as in :func:`column_pass`.
        out_shape: the per-sample output shape (``m = prod(out_shape)``).
        cotangents: ``(colors, m)`` cotangent seeds.
        loop: one pull-back per color in a Python loop instead of a ``vmap`` over the
            cotangents (for ops whose backward is wrong under that ``vmap``, e.g. ``cdist``:
            ``cdist_backward_vmap`` in :mod:`jacbatch._torch_bugs`).

    Returns:
        ``(colors, B, n)``: ``out[c, b] = cotangents[c] @ J_b``.
    """

    def per_sample(*xs: torch.Tensor) -> torch.Tensor:
        def g(xa: torch.Tensor) -> torch.Tensor:
            return func(*xs[:argnum], xa, *xs[argnum + 1 :])

        pull = torch.func.vjp(g, xs[argnum])[1]
        if loop:
            return torch.stack([pull(u.reshape(out_shape))[0].reshape(-1) for u in cotangents])
        return torch.func.vmap(lambda u: pull(u.reshape(out_shape))[0].reshape(-1))(cotangents)

    with _torch_bugs.reverse_mode():  # lu_backward_nested_vmap_no_grad
        if any(flags):
            dims = tuple(0 if f else None for f in flags)
            # out_dims=0 and a transpose, not out_dims=1: torch 2.13's vmap cannot place an
            # unbatched output (a pull-back that does not depend on the sample, ``A @ x``) at
            # out_dims=1 ("The expanded size of the tensor ... must match"); the transpose is
            # the same view out_dims=1 returns for a batched one
            return torch.func.vmap(per_sample, in_dims=dims)(*args).transpose(0, 1)
        return per_sample(*args).unsqueeze(1)


@dataclass(frozen=True)
class Layout:
    """How the entries of one pattern are read out of a compressed product, color by color.

    Attributes:
        mode: ``"column"`` or ``"row"``.
        n_colors: number of colors.
        seeds: ``(n_colors, n)`` (column) or ``(n_colors, m)`` (row) 0/1 seeds in the
            call's dtype, on its device.
        entries: ``(nnz,)`` the pattern's entries sorted by color.
        where: ``(nnz,)`` for each of ``entries``, its row (column mode) or column (row mode),
            the position it is read from in its color's compressed vector.
        starts: ``(n_colors + 1,)`` where each color's entries begin in ``entries``.
        rows: ``(nnz,)`` the row of each entry (CSR order), on the device.
        cols: ``(nnz,)`` the column of each entry, on the device.
        color: ``(nnz,)`` the color of each entry (CSR order), on the device.
        at: ``(nnz,)`` the position each entry is read from (CSR order): its row (column
            mode) or column (row mode), on the device.
        flat: ``(nnz,)`` ``color * length + at`` (CSR order, ``length`` that of one
            compressed vector: ``m`` in column mode, ``n`` in row mode): the entry's position in
            one sample's compressed vectors laid end to end, on the device.
        loop: row mode only: one pull-back per color in a loop (:func:`row_pass`).
    """

    mode: str
    n_colors: int
    seeds: torch.Tensor
    entries: torch.Tensor
    where: torch.Tensor
    starts: list[int]
    rows: torch.Tensor
    cols: torch.Tensor
    color: torch.Tensor
    at: torch.Tensor
    flat: torch.Tensor
    loop: bool = False

    @staticmethod
    def of(
        pattern: SparsityPattern,
        coloring: Coloring,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
        loop: bool = False,
    ) -> Layout:
        """The layout of ``pattern`` under ``coloring``, seeds in ``dtype``, all on ``device``;
        ``loop``: see :func:`row_pass`."""
        m, n = pattern.shape
        rows, cols = pattern.row_indices(), pattern.col_indices
        if coloring.mode == "column":
            key, where, size = coloring.colors[cols], rows, n
        else:
            key, where, size = coloring.colors[rows], cols, m
        k = coloring.n_colors
        seeds = torch.zeros(k, size, dtype=dtype)
        seeds[coloring.colors, torch.arange(size)] = 1.0
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=k)
        starts = [0, *torch.cumsum(counts, 0).tolist()]
        return Layout(
            coloring.mode, k, seeds.to(device), order.to(device), where[order].to(device),
            starts, rows.to(device), cols.to(device), key.to(device), where.to(device),
            (key * (m if coloring.mode == "column" else n) + where).to(device),
            loop and coloring.mode == "row",
        )  # fmt: skip


def compressed_values(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    flags: Sequence[bool],
    argnum: int,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    layout: Layout,
    values: torch.Tensor,
    color_chunk: int | None = None,
) -> torch.Tensor:
    """Fill ``values`` (``(B, nnz)``) with the pattern's entries for the ``B`` samples of
    ``args``, ``color_chunk`` colors per vectorized pass (all at once by default).

    Args:
        func, args, flags, argnum: as in :func:`column_pass`.
        shapes: ``(out_shape, in_shape)`` per sample.
        layout: :meth:`Layout.of` the pattern and its coloring (index tensors on the device).
        values: ``(B, nnz)`` buffer of the arguments' dtype and device; written in place
            (``index_copy_``, so it records an autograd graph when the passes do).
        color_chunk: colors per pass.

    Returns:
        ``values``.
    """
    out_shape, in_shape = shapes
    k = layout.n_colors
    step = k if color_chunk is None else max(1, color_chunk)
    ref = args[argnum]
    for c0 in range(0, k, step):
        c1 = min(k, c0 + step)
        seeds = layout.seeds[c0:c1].to(
            dtype=ref.dtype, device=ref.device
        )  # no-op: cached per dtype
        if layout.mode == "column":
            comp = column_pass(func, args, flags, argnum, in_shape, seeds)
        else:
            comp = row_pass(func, args, flags, argnum, out_shape, seeds, layout.loop)
        if c0 == 0 and c1 == k:
            _gather_all(comp, layout, values)
        else:
            s, e = layout.starts[c0], layout.starts[c1]
            if e > s:
                idx = layout.entries[s:e]
                picked = comp.transpose(0, 1)[:, layout.color[idx] - c0, layout.at[idx]]
                values.index_copy_(1, idx, picked)
        del comp
    return values


def _gather_all(comp: torch.Tensor, layout: Layout, values: torch.Tensor) -> None:
    """``values[b, k] = comp[color_k, b, at_k]`` for every entry, in one gather.

    NOTE [One gather into the values]
        The passes return ``(colors, B, size)``. Row mode's is a view of a ``(B, colors,
        size)`` tensor (the batch ``vmap`` is outermost), so per sample the compressed rows are
        one flat vector of ``colors * size`` and entry ``k`` sits at ``color_k * size + at_k``:
        one ``index_select`` on that flat view, written straight into ``values`` (no
        ``B x nnz`` index, no scatter). Column mode's (the color ``vmap`` outermost) is not
        flat per sample; advanced indexing of ``comp.transpose(0, 1)`` at ``(color, at)``
        gathers ``(B, nnz)`` in CSR order in one kernel, copied into ``values``. With
        autograd recording (``create_graph``) the copies are the differentiable ones.
    """
    per_sample = comp.transpose(0, 1)  # (B, colors, size)
    B, k, size = per_sample.shape
    plain = not (comp.requires_grad or values.requires_grad)
    if plain and per_sample.is_contiguous() and values.is_contiguous():
        torch.index_select(per_sample.reshape(B, k * size), 1, layout.flat, out=values)
    else:
        values.copy_(per_sample[:, layout.color, layout.at])


def gathered(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    flags: Sequence[bool],
    argnum: int,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    layout: Layout,
) -> torch.Tensor:
    """``(B, nnz)``: :func:`compressed_values` with all colors in one pass, as a fresh tensor
    (no ``out=``, no in-place write: traceable by ``make_fx``)."""
    out_shape, in_shape = shapes
    if layout.mode == "column":
        comp = column_pass(func, args, flags, argnum, in_shape, layout.seeds)
    else:
        comp = row_pass(func, args, flags, argnum, out_shape, layout.seeds, layout.loop)
    per_sample = comp.transpose(0, 1)
    if per_sample.is_contiguous():
        return per_sample.reshape(per_sample.shape[0], -1).index_select(1, layout.flat)
    return per_sample[:, layout.color, layout.at]


def gather_dense(J: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    """``(B, nnz)``: the pattern's entries of dense Jacobians ``J`` (``(B, m, n)``)."""
    rows = pattern.row_indices().to(J.device)
    cols = pattern.col_indices.to(J.device)
    return J[:, rows, cols]


def to_csr(pattern: SparsityPattern, values: torch.Tensor, batched: bool, vec: str) -> torch.Tensor:
    """The sparse CSR tensor of ``values`` (``(B, nnz)``, or ``(nnz,)`` with ``batched``
    False) on ``pattern``: ``(B, m, n)`` (or ``(m, n)``), index tensors shared by the batch
    (expanded views, no copies). ``vec="col"`` renumbers rows and columns to column-major vec
    of the output and argument and reorders the entries (one gather of ``values``)."""
    import warnings

    m, n = pattern.shape
    crow, col = pattern.crow_indices, pattern.col_indices
    if vec == "col":
        crow, col, order = _col_major(pattern)
        values = values.index_select(-1, order.to(values.device))
    dev = values.device
    crow, col = crow.to(dev), col.to(dev)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        if not batched:
            return torch.sparse_csr_tensor(crow, col, values, (m, n), check_invariants=False)
        B = values.shape[0]
        return torch.sparse_csr_tensor(
            crow.expand(B, m + 1), col.expand(B, col.numel()), values, (B, m, n),
            check_invariants=False,
        )  # fmt: skip


def _col_major(pattern: SparsityPattern) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CSR indices of ``pattern`` in column-major vec, and the order of its entries."""
    m, n = pattern.shape

    def perm(shape: tuple[int, ...]) -> torch.Tensor:
        # the column-major position of each row-major flat index: arange over the reversed
        # shape holds, at [i_k, ..., i_0], i_0 + d_0 (i_1 + d_1 (...)); reversing the axes back
        # and flattening row-major lists it by row-major index
        if not shape:
            return torch.zeros(1, dtype=torch.int64)
        grid = torch.arange(math.prod(shape)).reshape(shape[::-1])
        return grid.permute(*range(len(shape) - 1, -1, -1)).reshape(-1)

    r = perm(pattern.out_shape)[pattern.row_indices()]
    c = perm(pattern.in_shape)[pattern.col_indices]
    order = torch.argsort(r * max(n, 1) + c)
    crow = torch.zeros(m + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(r, minlength=m), 0)
    return crow, c[order], order


__all__ = [
    "Layout",
    "column_pass",
    "compressed_values",
    "gather_dense",
    "gathered",
    "row_pass",
    "to_csr",
]
