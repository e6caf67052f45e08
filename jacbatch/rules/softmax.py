"""Softmax and log-softmax along one axis: block-diagonal Jacobians.

NOTE [Softmax Jacobian]
    For ``y = softmax(x)`` along axis ``d``, ``∂y[.., r, ..] / ∂x[.., c, ..] = y_r (δ(r, c) - y_c)``
    within a slice and zero across slices: the other axes share letters (block-diagonal), and the
    block is ``diag(y) - y yᵀ``. That is two terms: ``y`` over the shared letters with the axis
    letter also shared (the diagonal), and ``-y_r y_c`` with distinct letters ``r`` (out) and ``c``
    (in). For ``log_softmax``, ``∂ / ∂x_c = δ(r, c) - softmax(x)_c``: the identity plus a term with
    the output letter ``r`` free.
"""

from __future__ import annotations

import torch

from .ops import OpContext, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def _axes(ctx: OpContext) -> tuple[int, str, str, str]:
    n = len(ctx.out_shape)
    if ctx.args[2]:
        raise Unsupported("softmax with half_to_float")
    if n == 0:
        return 0, "", "", ""
    d = ctx.args[1] % n
    inp = letters(n)
    r = letters(1, skip=inp)
    out = inp[:d] + r + inp[d + 1 :]
    return d, inp, out, r


@register_op(aten._softmax.default)
def softmax(ctx: OpContext, i: int) -> list[Term]:
    """``softmax(x, dim)``: ``diag(y) - y yᵀ`` per slice (NOTE [Softmax Jacobian])."""
    y = ctx.out
    d, inp, out, _ = _axes(ctx)
    if not inp:  # softmax of a scalar is 1: zero derivative
        return []
    outer = -(y.unsqueeze(2 + d) * y.unsqueeze(1 + d))  # (B, .., r, c, ..)
    t_outer = out[: d + 1] + inp[d:]
    return [ctx.term(y, inp, inp, inp, 0), ctx.term(outer, t_outer, out, inp, 0)]


@register_op(aten._log_softmax.default)
def log_softmax(ctx: OpContext, i: int) -> list[Term]:
    """``log_softmax(x, dim)``: ``I - 1 softmax(x)ᵀ`` per slice."""
    _, inp, out, _ = _axes(ctx)
    if not inp:
        return []
    p = torch.exp(ctx.out)
    return [ctx.term(1.0, "", inp, inp, 0), ctx.term(-p, inp, out, inp, 0)]
