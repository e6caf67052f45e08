"""Scans along one axis: cumsum, cumprod, logcumsumexp, cummax and cummin.

NOTE [Scan Jacobians are triangular]
    A scan along axis ``d`` makes output ``a`` depend on inputs ``c <= a`` of the same slice, so
    its Jacobian is block-diagonal: a delta on every other axis and an ``n × n`` lower-triangular
    block ``T[a, c]`` on ``d`` (the factor is over the other letters too where it depends on the
    values):

    * ``cumsum``: ``T[a, c] = [c <= a]``, shared by the batch;
    * ``cumprod``: ``T[a, c] = [c <= a] Π_{k <= a, k != c} x_k``, computed as the exclusive prefix
      product ``Π_{k < c} x_k`` times the partial product ``Π_{c < k <= a} x_k`` (a cumprod of an
      ``n × n`` masked copy): no division, so zeros in ``x`` are exact, as autograd's formula;
    * ``logcumsumexp``: ``T[a, c] = [c <= a] exp(x_c - y_a)`` (the softmax of the prefix);
    * ``cummax``/``cummin`` (the values): ``T[a, c] = [c = index_a]``, the index the op returns.
"""

from __future__ import annotations

import torch

from .ops import OpContext, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def _scan(ctx: OpContext, block: torch.Tensor | None) -> list[Term]:
    """The term of a scan along ``ctx.args[1]`` with block ``(B or 1, *others, a, c)``
    (the other axes in order, or broadcast), or the lower-triangular ones for ``None``."""
    shape = ctx.in_shape(0)
    if not shape:  # a 0-d input: every scan is the identity
        return [ctx.term(1.0, "", "", "", 0)]
    n = len(shape)
    d = int(ctx.args[1]) % n
    inp = letters(n)
    a = letters(1, skip=inp)
    out = inp[:d] + a + inp[d + 1 :]
    others = inp[:d] + inp[d + 1 :]
    if block is None:
        m = shape[d]
        L = torch.ones(m, m, dtype=ctx.out.dtype, device=ctx.out.device).tril()
        return [ctx.term(L.unsqueeze(0), a + inp[d], out, inp, 0)]
    return [ctx.term(block, others + a + inp[d], out, inp, 0)]


def _last(ctx: OpContext, t: torch.Tensor) -> torch.Tensor:
    """``t`` (``(B or 1, *shape)``) with the scanned axis moved last."""
    n = len(ctx.in_shape(0))
    return t.movedim(1 + int(ctx.args[1]) % n, -1)


def _no_cast(ctx: OpContext) -> None:
    if ctx.kwargs.get("dtype") not in (None, ctx.out.dtype):
        raise Unsupported("a scan with a dtype cast")


@register_op(aten.cumsum.default)
def cumsum(ctx: OpContext, i: int) -> list[Term]:
    """``cumsum(x, dim)``: ``[c <= a]`` (NOTE [Scan Jacobians are triangular])."""
    _no_cast(ctx)
    return _scan(ctx, None)


@register_op(aten.cumprod.default)
def cumprod(ctx: OpContext, i: int) -> list[Term]:
    """``cumprod(x, dim)``: ``[c <= a] Π_{k <= a, k != c} x_k``, without a division."""
    _no_cast(ctx)
    if not ctx.in_shape(0):
        return _scan(ctx, None)
    x = _last(ctx, ctx.args[0])  # (B, *others, n)
    n = x.shape[-1]
    ones = torch.ones_like(x[..., :1])
    before = torch.cat([ones, x[..., :-1]], -1).cumprod(-1)  # Π_{k < c} x_k, over c
    upper = torch.ones(n, n, dtype=torch.bool, device=x.device).triu(1)  # [k > c], (c, k)
    masked = torch.where(upper, x.unsqueeze(-2), torch.ones_like(x).unsqueeze(-2))
    after = masked.cumprod(-1)  # (.., c, a): Π_{c < k <= a} x_k
    block = (before.unsqueeze(-1) * after).transpose(-1, -2)  # (.., a, c)
    tril = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    return _scan(ctx, torch.where(tril, block, torch.zeros_like(block)))


@register_op(aten.logcumsumexp.default)
def logcumsumexp(ctx: OpContext, i: int) -> list[Term]:
    """``logcumsumexp(x, dim)``: ``[c <= a] exp(x_c - y_a)``."""
    if not ctx.in_shape(0):
        return _scan(ctx, None)
    x, y = _last(ctx, ctx.args[0]), _last(ctx, ctx.out)
    n = x.shape[-1]
    tril = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    diff = x.unsqueeze(-2) - y.unsqueeze(-1)  # (.., a, c)
    return _scan(ctx, torch.where(tril, diff.exp(), torch.zeros_like(diff)))


def _cumext(ctx: OpContext, f: object) -> list[Term]:
    if not ctx.in_shape(0):
        return _scan(ctx, None)
    d = 1 + int(ctx.args[1]) % len(ctx.in_shape(0))
    _, index = f(ctx.args[0], d)  # type: ignore[operator]
    idx = _last(ctx, index)  # (.., a)
    n = idx.shape[-1]
    c = torch.arange(n, device=idx.device)
    return _scan(ctx, (idx.unsqueeze(-1) == c).to(ctx.out.dtype))


@register_op(aten.cummax.default, output=0)
def cummax(ctx: OpContext, i: int) -> list[Term]:
    """``cummax(x, dim).values``: 1 at the index of each running maximum (as autograd)."""
    return _cumext(ctx, torch.cummax)


@register_op(aten.cummin.default, output=0)
def cummin(ctx: OpContext, i: int) -> list[Term]:
    """``cummin(x, dim).values``: 1 at the index of each running minimum (as autograd)."""
    return _cumext(ctx, torch.cummin)
