"""Ops that rearrange entries without arithmetic: split and unbind, diagonals, repeat, unfold,
the scatter of a slice or of a diagonal into a tensor, and the ``*_copy`` forms of views.

NOTE [Rearrangements as 0/1 factors]
    Each output entry is one input entry, so the Jacobian is a 0/1 selection: a delta on every
    axis the op leaves alone and a small 0/1 factor on the others. ``split`` output ``k`` is the
    slice of rows ``[start_k, start_k + size_k)``; ``unbind`` output ``k`` is ``select(dim, k)``;
    ``diagonal`` (offset ``δ``) reads ``x[.., t + max(-δ, 0), .., t + max(δ, 0), ..]``: two factors
    ``[i = t + r0]``, ``[j = t + c0]`` sharing the output letter ``t``; ``diag_embed`` is its
    transpose (a diagonal of the output); ``repeat`` reads ``x[o mod n]`` on every repeated axis
    (new leading axes are free letters); ``unfold(dim, size, step)`` reads ``x[w step + k]``, one
    factor over the window, offset and input letters. ``select_scatter``, ``slice_scatter`` and
    ``diagonal_scatter`` write ``src`` into a copy of ``x``: the transposed selection for
    ``src``, and for ``x`` the mask of entries not overwritten.
"""

from __future__ import annotations

import torch

from . import linear, terms
from .ops import OpContext, Rule, identity, letters, register_op
from .shifts import source_map
from .terms import Term, Unsupported

aten = torch.ops.aten

#: Outputs of ``split``/``unbind`` with a rule (one registration per output index).
MAX_PARTS = 256


def _rows(ctx: OpContext, d: int, rows: range, big: tuple[int, ...], i: int = 0) -> Term:
    """``x[.., rows, ..]`` on axis ``d`` of an input of shape ``big`` (a 0/1 ``(k, n)`` factor)."""
    n = len(big)
    x = ctx.out
    S = source_map(torch.tensor(list(rows), device=x.device, dtype=torch.long), big[d], x)
    inp = letters(n)
    r = letters(1, skip=inp)
    out = inp[:d] + r + inp[d + 1 :]
    small = tuple(len(rows) if k == d else big[k] for k in range(n))
    return terms.make(S, r + inp[d], out, inp, small, big, x)


def _split_rule(k: int) -> Rule:
    def split(ctx: OpContext, i: int) -> list[Term]:
        """Part ``k`` of ``split``: a slice of rows (NOTE [Rearrangements as 0/1 factors])."""
        shape = ctx.in_shape(0)
        n = len(shape)
        d = int(ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("dim", 0)) % n
        sizes = ctx.args[1]
        if isinstance(sizes, int):
            sizes = [min(sizes, shape[d] - s) for s in range(0, shape[d], sizes)] or [0]
        start = sum(int(s) for s in sizes[:k])
        rows = range(start, start + int(sizes[k]))
        if len(rows) != ctx.out_shape[d]:
            raise Unsupported("split sizes")
        return [_rows(ctx, d, rows, shape)]

    return split


def _unbind_rule(k: int) -> Rule:
    def unbind(ctx: OpContext, i: int) -> list[Term]:
        """Part ``k`` of ``unbind``: ``select(dim, k)``."""
        d = int(ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim", 0))
        inner = OpContext(
            (ctx.args[0], d, k), {}, ctx.out, ctx.out_shape, (*ctx.shapes[:1], None, None)
        )
        return linear.select(inner, 0)

    return unbind


for _k in range(MAX_PARTS):
    for _op in (
        aten.split.Tensor,
        aten.split_with_sizes.default,
        aten.unsafe_split.Tensor,
        aten.unsafe_split_with_sizes.default,
        aten.split_copy.Tensor,
        aten.split_with_sizes_copy.default,
    ):
        register_op(_op, output=_k)(_split_rule(_k))
    register_op(aten.unbind.int, aten.unbind_copy.int, output=_k)(_unbind_rule(_k))


def _diagonal_term(big: tuple[int, ...], offset: int, d1: int, d2: int, like: torch.Tensor) -> Term:
    """The Jacobian of ``diagonal(x, offset, d1, d2)`` for ``x`` of shape ``big``."""
    n = len(big)
    d1, d2 = d1 % n, d2 % n
    if d1 == d2:
        raise Unsupported("diagonal of one axis")
    r0, c0 = max(-offset, 0), max(offset, 0)
    L = max(min(big[d1] - r0, big[d2] - c0), 0)
    if L == 0:
        raise Unsupported("an empty diagonal")
    t = torch.arange(L, device=like.device)
    A = source_map(t + r0, big[d1], like)
    Bm = source_map(t + c0, big[d2], like)
    inp = letters(n)
    tl = letters(1, skip=inp)
    out = "".join(inp[k] for k in range(n) if k not in (d1, d2)) + tl
    small = (*tuple(big[k] for k in range(n) if k not in (d1, d2)), L)
    return terms.from_factors([(A, tl + inp[d1]), (Bm, tl + inp[d2])], out, inp, small, big, like)


def _diag_args(ctx: OpContext, k: int, defaults: tuple[int, int, int]) -> tuple[int, int, int]:
    names = ("offset", "dim1", "dim2")
    return tuple(  # type: ignore[return-value]
        int(ctx.args[k + j] if len(ctx.args) > k + j else ctx.kwargs.get(names[j], defaults[j]))
        for j in range(3)
    )


@register_op(aten.diagonal.default, aten.diagonal_copy.default)
def diagonal(ctx: OpContext, i: int) -> list[Term]:
    """``x.diagonal(offset, dim1, dim2)`` (NOTE [Rearrangements as 0/1 factors])."""
    offset, d1, d2 = _diag_args(ctx, 1, (0, 0, 1))
    return [_diagonal_term(ctx.in_shape(0), offset, d1, d2, ctx.out)]


@register_op(aten.diag_embed.default)
def diag_embed(ctx: OpContext, i: int) -> list[Term]:
    """``diag_embed(x, offset, dim1, dim2)``: the transposed ``diagonal`` of the output."""
    offset, d1, d2 = _diag_args(ctx, 1, (0, -2, -1))
    return [_diagonal_term(ctx.out_shape, offset, d1, d2, ctx.out).transposed()]


def _not_written(ctx: OpContext, written: torch.Tensor) -> list[Term]:
    """``∂out / ∂x`` of a scatter into a copy of ``x``: 1 where ``written`` (``bool``, the
    output's shape) is false."""
    o = letters(len(ctx.out_shape))
    return [ctx.term((~written).to(ctx.out.dtype).unsqueeze(0), o, o, o, 0)]


@register_op(aten.diagonal_scatter.default)
def diagonal_scatter(ctx: OpContext, i: int) -> list[Term]:
    """``diagonal_scatter(x, src, offset, dim1, dim2)``: ``src`` on a diagonal of a copy of ``x``."""
    offset, d1, d2 = _diag_args(ctx, 2, (0, 0, 1))
    if i == 0:
        w = torch.zeros(ctx.out_shape, dtype=torch.bool, device=ctx.out.device)
        w = torch.diagonal_scatter(w, torch.ones_like(w.diagonal(offset, d1, d2)), offset, d1, d2)
        return _not_written(ctx, w)
    return [_diagonal_term(ctx.out_shape, offset, d1, d2, ctx.out).transposed()]


@register_op(aten.select_scatter.default)
def select_scatter(ctx: OpContext, i: int) -> list[Term]:
    """``select_scatter(x, src, dim, index)``: ``src`` at ``index`` of ``dim`` in a copy of ``x``."""
    shape = ctx.out_shape
    n = len(shape)
    d = int(ctx.args[2]) % n
    k = int(ctx.args[3]) % shape[d]
    if i == 0:
        w = torch.zeros(shape, dtype=torch.bool, device=ctx.out.device)
        w.select(d, k).fill_(True)
        return _not_written(ctx, w)
    o = letters(n)
    e = torch.zeros(1, shape[d], dtype=ctx.out.dtype, device=ctx.out.device)
    e[0, k] = 1
    return [ctx.term(e, o[d], o, o[:d] + o[d + 1 :], 1)]


@register_op(aten.slice_scatter.default)
def slice_scatter(ctx: OpContext, i: int) -> list[Term]:
    """``slice_scatter(x, src, dim, start, end, step)``: ``src`` in a slice of a copy of ``x``."""
    shape = ctx.out_shape
    n = len(shape)
    d = int(ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("dim", 0)) % n
    start = ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("start")
    end = ctx.args[4] if len(ctx.args) > 4 else ctx.kwargs.get("end")
    step = ctx.args[5] if len(ctx.args) > 5 else ctx.kwargs.get("step", 1)
    rows = range(shape[d])[slice(start, end, step)]
    if i == 0:
        w = torch.zeros(shape, dtype=torch.bool, device=ctx.out.device)
        idx = torch.tensor(list(rows), dtype=torch.long, device=w.device)
        w.index_fill_(d, idx, True)
        return _not_written(ctx, w)
    if ctx.in_shape(1)[d] != len(rows):
        raise Unsupported("slice_scatter bounds")
    return [_rows(ctx, d, rows, shape).transposed()]


@register_op(aten.repeat.default)
def repeat(ctx: OpContext, i: int) -> list[Term]:
    """``x.repeat(*reps)``: ``x[o mod n]`` per repeated axis; new leading axes are free."""
    shape = ctx.in_shape(0)
    reps = [int(r) for r in ctx.args[1]]
    n, R = len(shape), len(reps)
    if n > R:
        raise Unsupported("repeat with fewer repeats than axes")
    x = ctx.out
    inp = letters(n)
    fresh = iter(letters(R + n, skip=inp))
    out = [next(fresh) for _ in range(R - n)]
    factors = []
    for d in range(n):
        r = reps[R - n + d]
        if r == 1:
            out.append(inp[d])
            continue
        c = next(fresh)
        out.append(c)
        m = shape[d]
        factors.append((source_map(torch.arange(m * r, device=x.device) % m, m, x), c + inp[d]))
    return [terms.from_factors(factors, "".join(out), inp, ctx.out_shape, shape, x)]


@register_op(aten.unfold.default, aten.unfold_copy.default)
def unfold(ctx: OpContext, i: int) -> list[Term]:
    """``x.unfold(dim, size, step)``: window ``w``, offset ``k`` read ``x[w step + k]``."""
    shape = ctx.in_shape(0)
    n = len(shape)
    if n == 0:
        raise Unsupported("unfold of a 0-d tensor")
    d, size, step = int(ctx.args[1]) % n, int(ctx.args[2]), int(ctx.args[3])
    W = ctx.out_shape[d]
    x = ctx.out
    w = torch.arange(W, device=x.device)[:, None, None]
    k = torch.arange(size, device=x.device)[None, :, None]
    c = torch.arange(shape[d], device=x.device)[None, None, :]
    S = (c == w * step + k).to(x.dtype).unsqueeze(0)
    inp = letters(n)
    wl, kl = letters(1, skip=inp), letters(1, skip=inp + letters(1, skip=inp))
    out = inp[:d] + wl + inp[d + 1 :] + kl
    return [ctx.term(S, wl + kl + inp[d], out, inp, 0)]


register_op(aten.expand_copy.default)(linear.expand)
register_op(aten.permute_copy.default)(linear.permute)
register_op(aten.t_copy.default)(linear.t)
register_op(aten.transpose_copy.int)(linear.transpose)
register_op(aten.select_copy.int)(linear.select)
register_op(aten.slice_copy.Tensor)(linear.slice_)
register_op(
    aten.view_copy.default,
    aten.unsqueeze_copy.default,
    aten.squeeze_copy,
    aten._reshape_copy.default,
)(linear.reshape)


@register_op(aten.alias_copy.default)
def alias_copy(ctx: OpContext, i: int) -> list[Term]:
    """``alias_copy``: the identity."""
    return identity(ctx, 0)


@register_op(aten.detach_copy.default)
def detach_copy(ctx: OpContext, i: int) -> list[Term]:
    """``detach_copy`` stops gradients, as ``detach``: zero."""
    return []


@register_op(aten.copy.default)
def copy(ctx: OpContext, i: int) -> list[Term]:
    """``copy(x, src)`` (an in-place ``x.copy_(src)`` made functional, e.g. by ``x[k] = src``):
    ``src`` broadcast to ``x``'s shape; nothing of ``x`` is kept."""
    if i == 0:
        return []
    src = ctx.args[1]
    if src.dtype != ctx.out.dtype:
        raise Unsupported("copy with a dtype cast")
    return identity(ctx, 1)


@register_op(aten.block_diag.default)
def block_diag(ctx: OpContext, i: int) -> list[Term]:
    """``block_diag(*xs)`` w.r.t. ``xs[i]`` (2-d): the identity shifted to its block, as two
    0/1 factors (rows and columns)."""
    shapes = ctx.list_shapes
    if any(len(s) != 2 for s in shapes):
        raise Unsupported("block_diag of tensors that are not matrices")
    r0 = sum(s[0] for s in shapes[:i])
    c0 = sum(s[1] for s in shapes[:i])
    (R, C), (m, n) = ctx.out_shape, shapes[i]
    x = ctx.out
    Sr = source_map(torch.arange(R, device=x.device) - r0, m, x)
    Sc = source_map(torch.arange(C, device=x.device) - c0, n, x)
    return [terms.from_factors([(Sr, "ai"), (Sc, "bj")], "ab", "ij", ctx.out_shape, (m, n), x)]
