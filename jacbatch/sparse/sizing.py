"""Sizes of a sparse call: the working memory of its passes (simulated on meta tensors), the
batch and color chunks that fit the budget, and ``estimate_memory(..., sparse=...)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .. import _validation as V
from .. import memory
from .compressed import column_pass

if TYPE_CHECKING:
    from .engine import Part, Prepared


def unit_bytes(prep: Prepared, part: Part) -> int:
    """Working bytes of one color's pass for one sample, simulated on meta tensors (NOTE
    [Estimating peak memory by running the route on meta tensors] in :mod:`jacbatch.memory`);
    a conservative multiple of the compressed vectors where ``func`` cannot run on meta."""
    call = prep.call
    m = math.prod(prep.out_shape)
    n = math.prod(call.sample_shape(part.argnum))
    item = torch.empty((), dtype=call.dtype).element_size()
    fallback = 16 * (m + n) * item
    shapes = [
        (1, *call.sample_shape(i)) if d is not None else call.sample_shape(i)
        for i, d in enumerate(call.in_dims)
    ]
    args = [torch.empty(s, dtype=call.dtype, device="meta") for s in shapes]
    flags = [d is not None for d in call.in_dims]
    seeds = torch.empty((1, part.layout.seeds.shape[1]), dtype=call.dtype, device="meta")
    try:
        if part.coloring.mode == "column":
            run = lambda: column_pass(  # noqa: E731
                call.func, args, flags, part.argnum, call.sample_shape(part.argnum), seeds
            )
        else:
            from .compressed import row_pass

            run = lambda: row_pass(  # noqa: E731
                call.func, args, flags, part.argnum, prep.out_shape, seeds, part.layout.loop
            )
        return max(memory.simulate_peak(run), (m + n) * item)
    except Exception:
        return fallback


def estimate_memory(func: Callable[..., Any], args: tuple[Any, ...], **options: Any) -> Any:
    """:func:`jacbatch.estimate_memory` of a sparse call: a
    :class:`~jacbatch.memory.MemoryEstimate` from shapes alone.

    ``output_bytes``: the values ``(B, nnz)`` plus the CSR index tensors ``crow (m + 1,)`` and
    ``col (nnz,)``, int64, shared by the batch (one copy). ``peak_bytes`` adds the working memory
    of the compressed passes with the whole batch and every color (at most ``chunk_size``) in
    one pass, simulated on meta tensors per color and sample (``exact=False`` where ``func``
    cannot run on meta and the figure is a conservative multiple of the compressed vectors).
    ``route`` names the coloring, e.g. ``"sparse row (11 colors)"``.
    """
    from .engine import prepare

    prep = prepare("estimate_memory", func, args, **options)
    call = prep.call
    B = call.batch_size if call.batch_size is not None else 1
    item = torch.empty((), dtype=call.dtype).element_size()
    values = B * sum(p.pattern.nnz for p in prep.parts) * item
    index = sum((p.pattern.shape[0] + 1 + p.pattern.nnz) * 8 for p in prep.parts)
    colors = [
        p.coloring.n_colors
        if prep.chunk_size is None
        else min(p.coloring.n_colors, prep.chunk_size)
        for p in prep.parts
    ]
    units = [unit_bytes(prep, p) for p in prep.parts]
    m = math.prod(prep.out_shape)
    fallbacks = [
        16 * (m + p.pattern.shape[1]) * item for p in prep.parts
    ]  # what _unit_bytes returns when func cannot run on meta
    exact = all(u != f for u, f in zip(units, fallbacks, strict=True))
    working = max(u * c for u, c in zip(units, colors, strict=True)) * B
    route = ", ".join(
        f"sparse {p.coloring.mode} ({p.coloring.n_colors} colors)" for p in prep.parts
    )
    return memory.MemoryEstimate(
        route, values + index, values + index + working, call.batch_size, exact=exact
    )


def chunking(prep: Prepared, count_values: bool) -> tuple[int, list[int]]:
    """Samples per batch chunk, and per argnum colors per pass (at most ``chunk_size``),
    within ``prep.budget``.

    Args:
        prep: the prepared call.
        count_values: the chunk's own values count against the budget (iter_jacobian).
    """
    batch, colors = _chunking(prep, count_values)
    if prep.chunk_size is not None:
        colors = [min(c, prep.chunk_size) for c in colors]
    return batch, colors


def _chunking(prep: Prepared, count_values: bool) -> tuple[int, list[int]]:
    call = prep.call
    B = call.batch_size if call.batch_size is not None else 1
    item = torch.empty((), dtype=call.dtype).element_size()
    target = memory.chunk_target(prep.budget, call.device)
    per_sample_values = sum(p.pattern.nnz for p in prep.parts) * item if count_values else 0
    # quick accept: a generous bound, without simulating
    bound = sum(
        12 * (math.prod(prep.out_shape) + p.pattern.shape[1]) * item * p.coloring.n_colors
        for p in prep.parts
    )
    if (bound + per_sample_values) * max(B, 1) <= target:
        return max(B, 1), [p.coloring.n_colors for p in prep.parts]
    units = [unit_bytes(prep, p) for p in prep.parts]
    sample = max(u * p.coloring.n_colors for u, p in zip(units, prep.parts, strict=True))
    if sample + per_sample_values <= target:
        return max(1, min(B, target // (sample + per_sample_values))), [
            p.coloring.n_colors for p in prep.parts
        ]
    if max(units) + per_sample_values > prep.budget:
        V.budget_too_small("jacobian", max(units) + per_sample_values, prep.budget, "sparse")
    room = max(1, target - per_sample_values)
    return 1, [
        max(1, min(p.coloring.n_colors, room // u)) for u, p in zip(units, prep.parts, strict=True)
    ]


__all__ = ["chunking", "estimate_memory", "unit_bytes"]
