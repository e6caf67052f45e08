"""Reductions: sum, mean, trace, norms (scalar outputs give gradients).

NOTE [Reductions are free letters]
    ``s = Σ_a x[a]`` has ``∂s / ∂x[c] = 1`` for every ``c``: the input letters appear on no output
    axis and in no factor, so they are free (the Jacobian is constant along them). Summing only
    over ``dims`` keeps the other letters shared (a delta). ``mean`` divides by the count.
    ``trace(X) = Σ_i X[i, i]`` gives the input letters ``ii``: the identity matrix, the gradient
    ``I``. The Euclidean norm ``‖x‖₂`` has gradient ``x / ‖x‖`` (zero at ``x = 0``, as autograd),
    so the squared Frobenius norm ``‖X‖² = Σ X ⊙ X`` composes to ``2 X`` (the article's
    ``2·sum(A)`` example is ``sum`` composed with the Hadamard square).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .ops import OpContext, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def _reduced(ctx: OpContext, dims: object, keepdim: bool) -> tuple[str, str, list[int]]:
    """(out letters, in letters, reduced dims) for a reduction of argument 0 over ``dims``."""
    shape = ctx.in_shape(0)
    n = len(shape)
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        red = list(range(n))
    else:
        seq: list[Any] = list(dims) if isinstance(dims, (list, tuple)) else [dims]
        red = sorted({int(d) % n for d in seq})
    inp = letters(n)
    kept = letters(n, skip=inp)  # fresh letters for keepdim's size-1 axes
    out = "".join(kept[d] if d in red else inp[d] for d in range(n) if keepdim or d not in red)
    return out, inp, red


def _reduce_args(ctx: OpContext) -> tuple[object, bool]:
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim")
    keepdim = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("keepdim", False)
    return dims, bool(keepdim)


@register_op(aten.sum.default, aten.sum.dim_IntList)
def sum_(ctx: OpContext, i: int) -> list[Term]:
    """``sum`` (over all or some dims): ones (NOTE [Reductions are free letters])."""
    if ctx.kwargs.get("dtype") not in (None, ctx.out.dtype):
        raise Unsupported("sum with a dtype cast")
    dims, keepdim = _reduce_args(ctx)
    out, inp, _ = _reduced(ctx, dims, keepdim)
    return [ctx.term(1.0, "", out, inp, 0)]


@register_op(aten.mean.default, aten.mean.dim)
def mean(ctx: OpContext, i: int) -> list[Term]:
    """``mean``: ``1 / count``."""
    if ctx.kwargs.get("dtype") not in (None, ctx.out.dtype):
        raise Unsupported("mean with a dtype cast")
    dims, keepdim = _reduce_args(ctx)
    out, inp, red = _reduced(ctx, dims, keepdim)
    count = math.prod(ctx.in_shape(0)[d] for d in red)
    return [ctx.term(1.0 / count, "", out, inp, 0)]


@register_op(aten.trace.default)
def trace(ctx: OpContext, i: int) -> list[Term]:
    """``trace(X)``: the gradient is the identity (input letters ``ii``)."""
    m, n = ctx.in_shape(0)
    if m != n:
        raise Unsupported("trace of a non-square matrix")
    return [ctx.term(1.0, "", "", "ii", 0)]


@register_op(aten.linalg_vector_norm.default)
def vector_norm(ctx: OpContext, i: int) -> list[Term]:
    """``‖x‖₂`` over all or some dims: ``x / ‖x‖`` (0 where the norm is 0)."""
    ord_ = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("ord", 2)
    if ord_ != 2:
        raise Unsupported(f"vector norm of order {ord_}")
    dims = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("dim")
    keepdim = ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("keepdim", False)
    if ctx.kwargs.get("dtype") not in (None, ctx.out.dtype):
        raise Unsupported("norm with a dtype cast")
    out, inp, red = _reduced(ctx, dims, bool(keepdim))
    x = ctx.args[0]
    nrm = _restore(ctx, ctx.out, red, bool(keepdim))
    g = torch.where(nrm == 0, torch.zeros_like(x), x / nrm)
    return [ctx.term(g, inp, out, inp, 0)]


def _count(ctx: OpContext, red: list[int]) -> int:
    return math.prod(ctx.in_shape(0)[d] for d in red)


def _restore(ctx: OpContext, y: torch.Tensor, red: list[int], keepdim: bool) -> torch.Tensor:
    """A reduced value broadcastable against the input again (reduced axes re-inserted)."""
    if not keepdim:
        for d in red:
            y = y.unsqueeze(1 + d)
    return y


@register_op(aten.var.correction)
def var(ctx: OpContext, i: int) -> list[Term]:
    """``var(x)`` over ``dims``: ``2 (x - mean) / (N - correction)``."""
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim")
    keepdim = bool(ctx.kwargs.get("keepdim", False))
    c = ctx.kwargs.get("correction")
    c = 1 if c is None else c
    out, inp, red = _reduced(ctx, dims, keepdim)
    x = ctx.args[0]
    mean = x.mean(dim=[1 + d for d in red], keepdim=True)
    return [ctx.term(2 * (x - mean) / (_count(ctx, red) - c), inp, out, inp, 0)]


@register_op(aten.logsumexp.default)
def logsumexp(ctx: OpContext, i: int) -> list[Term]:
    """``logsumexp(x, dims)``: ``softmax`` over the reduced axes, ``exp(x - out)``."""
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim")
    keepdim = bool(ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("keepdim", False))
    out, inp, red = _reduced(ctx, dims, keepdim)
    y = _restore(ctx, ctx.out, red, keepdim)
    return [ctx.term(torch.exp(ctx.args[0] - y), inp, out, inp, 0)]
