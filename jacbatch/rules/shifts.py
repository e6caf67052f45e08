"""Ops that move entries along axes independently: flip, roll, and padding.

NOTE [Per-axis maps]
    ``flip``, ``roll`` and the paddings move every entry along each affected axis by a rule that
    depends on that axis alone: output index ``o_d`` reads input index ``src_d(o_d)`` (or nothing,
    for a constant pad). Their Jacobian is a product over axes, ``Π_d M_d[o_d, c_d]`` with
    ``M_d[o, c] = [c = src_d(o)]`` a small 0/1 matrix ``(out_d, in_d)``, and a delta on every axis
    left alone: one term with one factor per moved axis, never the dense ``numel²`` matrix.
    ``flip``: ``src(o) = n - 1 - o``; ``roll`` by ``s``: ``src(o) = (o - s) mod n`` (a roll of the
    flattened tensor is one cyclic shift on the flat index, between two reshapes); constant
    padding by ``(l, r)``: ``src(o) = o - l`` where that is in range, nothing elsewhere (negative
    pads crop); reflection and replication padding reflect or clamp ``o - l`` into ``[0, n)``.
    Padding values are numbers with no derivative; autograd sums the gradient of entries read
    twice (reflection), which the sum over ``o`` does too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from . import terms
from .ops import OpContext, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten

#: Largest dense cyclic shift (elements) built for a roll of the flattened tensor.
FLAT_ROLL_LIMIT = 1 << 22


def axis_maps(ctx: OpContext, i: int, maps: Mapping[int, torch.Tensor]) -> list[Term]:
    """The Jacobian of argument ``i`` for per-axis maps (NOTE [Per-axis maps]).

    Args:
        ctx: the node; the output has the rank of argument ``i``.
        i: the argument.
        maps: per moved axis ``d``, ``M_d`` of shape ``(B or 1, out_shape[d], in_shape[d])``.
    """
    shape = ctx.in_shape(i)
    n = len(shape)
    if len(ctx.out_shape) != n:
        raise Unsupported("a per-axis map that changes the rank")
    inp = letters(n)
    fresh = letters(len(maps), skip=inp)
    out = list(inp)
    factors = []
    for k, d in enumerate(sorted(maps)):
        out[d] = fresh[k]
        factors.append((maps[d], fresh[k] + inp[d]))
    if not factors:
        return [ctx.term(1.0, "", inp, inp, i)]
    return [terms.from_factors(factors, "".join(out), inp, ctx.out_shape, shape, ctx.out)]


def source_map(src: torch.Tensor, n_in: int, like: torch.Tensor) -> torch.Tensor:
    """``M[o, c] = [c = src[o]]`` as a ``(1, len(src), n_in)`` tensor; ``src[o] < 0``: no entry."""
    c = torch.arange(n_in, device=like.device)
    return (src[:, None] == c[None, :]).to(like.dtype).unsqueeze(0)


def _arange(n: int, like: torch.Tensor) -> torch.Tensor:
    return torch.arange(n, device=like.device)


@register_op(aten.flip.default)
def flip(ctx: OpContext, i: int) -> list[Term]:
    """``flip(x, dims)``: the anti-identity on each flipped axis (NOTE [Per-axis maps])."""
    shape = ctx.in_shape(0)
    n = len(shape)
    if n == 0:
        return [ctx.term(1.0, "", "", "", 0)]
    dims = {int(d) % n for d in ctx.args[1]}
    x = ctx.out
    return axis_maps(
        ctx, 0, {d: source_map(shape[d] - 1 - _arange(shape[d], x), shape[d], x) for d in dims}
    )


@register_op(aten.roll.default)
def roll(ctx: OpContext, i: int) -> list[Term]:
    """``roll(x, shifts, dims)``: a cyclic shift per axis, or of the flat index without dims."""
    shape = ctx.in_shape(0)
    shifts = [int(s) for s in ctx.args[1]]
    dims = [int(d) for d in (ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("dims", []))]
    x = ctx.out
    if not shape:
        return [ctx.term(1.0, "", "", "", 0)]
    if not dims:  # the flattened tensor rolled, then reshaped back
        (s,) = shifts
        N = x[0].numel()
        if N * N > FLAT_ROLL_LIMIT:
            raise Unsupported("roll of a large flattened tensor")
        M = source_map((_arange(N, x) - s) % N, N, x)
        flat = terms.make(M, "ab", "a", "b", (N,), (N,), x)
        into = terms.identity_reshape(ctx.out_shape, (N,), x)
        outof = terms.identity_reshape((N,), shape, x)
        return [terms.chain_rule(terms.chain_rule(into, flat), outof)]
    n = len(shape)
    total: dict[int, int] = {}
    for s, d in zip(shifts, dims, strict=True):
        total[d % n] = total.get(d % n, 0) + s
    return axis_maps(
        ctx,
        0,
        {
            d: source_map((_arange(shape[d], x) - s) % shape[d], shape[d], x)
            for d, s in total.items()
        },
    )


def _pad_maps(
    ctx: OpContext, pad: Sequence[int], src: Callable[[torch.Tensor, int], torch.Tensor]
) -> dict[int, torch.Tensor]:
    """Per padded axis (``pad`` pairs from the last axis back) ``M_d`` with
    ``src(o - l, n)`` the source index of output ``o`` (negative: none)."""
    shape = ctx.in_shape(0)
    n = len(shape)
    if len(pad) % 2 or len(pad) // 2 > n:
        raise Unsupported("padding of more axes than the input has")
    x = ctx.out
    maps = {}
    for j in range(len(pad) // 2):
        d = n - 1 - j
        lo, hi = int(pad[2 * j]), int(pad[2 * j + 1])
        if lo == 0 and hi == 0:
            continue
        size = shape[d] + lo + hi
        if size != ctx.out_shape[d]:
            raise Unsupported("padding sizes")
        maps[d] = source_map(src(_arange(size, x) - lo, shape[d]), shape[d], x)
    return maps


def _crop(k: torch.Tensor, n: int) -> torch.Tensor:
    return torch.where((k >= 0) & (k < n), k, -1)


@register_op(aten.constant_pad_nd.default)
def constant_pad(ctx: OpContext, i: int) -> list[Term]:
    """``F.pad(x, pad, value=c)``: a shifted identity per padded axis (negative pads crop)."""
    return axis_maps(ctx, 0, _pad_maps(ctx, ctx.args[1], _crop))


def _reflect(k: torch.Tensor, n: int) -> torch.Tensor:
    k = k.abs()
    return torch.where(k >= n, 2 * (n - 1) - k, k)


@register_op(aten.reflection_pad1d.default, aten.reflection_pad2d.default)
@register_op(aten.reflection_pad3d.default)
def reflection_pad(ctx: OpContext, i: int) -> list[Term]:
    """``F.pad(x, pad, mode="reflect")``: each padded index reads its mirror image."""
    return axis_maps(ctx, 0, _pad_maps(ctx, ctx.args[1], _reflect))


@register_op(aten.replication_pad1d.default, aten.replication_pad2d.default)
@register_op(aten.replication_pad3d.default)
def replication_pad(ctx: OpContext, i: int) -> list[Term]:
    """``F.pad(x, pad, mode="replicate")``: each padded index reads the nearest edge."""
    return axis_maps(ctx, 0, _pad_maps(ctx, ctx.args[1], lambda k, n: k.clamp(0, n - 1)))
