"""Normalization layers: layer norm, batch norm (running statistics or batch statistics) and
group norm.

NOTE [Normalization Jacobians]
    With ``x̂ = (x - μ) r`` over a set of ``N`` entries (``μ`` their mean, ``r = 1/√(σ² + ε)``,
    ``σ²`` the biased variance) and ``y = g0 x̂ + b`` for a per-entry scale ``g0`` (the weight,
    broadcast), differentiating ``μ`` and ``σ²`` gives, for ``a``, ``c`` in the same set,

        ∂y[a] / ∂x[c] = g0[a] r (δ(a, c) - 1/N - x̂[a] x̂[c] / N)

    and zero across sets. Three terms with ``g = g0 r`` (shape of ``x``): the diagonal ``g``;
    ``-g[a] / N`` constant along ``c`` (the input letters of the normalized axes are free); and
    ``-(g x̂)[a] x̂[c] / N``, two factors. The axes that index the sets (layer norm's leading
    axes, batch norm's channel axis) keep a delta; the normalized axes get distinct output and
    input letters. Group norm normalizes over groups of channels too: its channel axis gets a
    third factor, the shared 0/1 matrix ``[group(a) = group(c)]``. Recomputing ``μ`` and ``r``
    from ``x`` reorders the op's own float arithmetic only at rounding level.

    Batch norm with running statistics (evaluation) is elementwise: ``y = (x - m) r g0 + b`` with
    fixed ``m``, ``r``: the diagonal ``g0 r``. W.r.t. the weight: ``x̂`` (a delta on the channel);
    the bias: the identity broadcast. The running statistics themselves are not differentiated
    (autograd does not either).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import terms
from .ops import OpContext, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def _stats(x: torch.Tensor, dims: Sequence[int], eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x̂, r)`` over ``dims`` of ``x`` (keepdim)."""
    mu = x.mean(dim=list(dims), keepdim=True)
    var = (x - mu).square().mean(dim=list(dims), keepdim=True)
    r = torch.rsqrt(var + eps)
    return (x - mu) * r, r


def _normalized(
    ctx: OpContext,
    g: torch.Tensor,
    xhat: torch.Tensor,
    reduced: Sequence[int],
    count: int,
    grouped: tuple[int, torch.Tensor] | None = None,
) -> list[Term]:
    """The three terms of NOTE [Normalization Jacobians] w.r.t. argument 0.

    ``g`` and ``xhat`` have the input's shape (with a batch axis); ``reduced`` are the
    normalized axes; ``grouped`` an axis and its ``(1, n, n)`` same-group matrix.
    """
    shape = ctx.in_shape(0)
    n = len(shape)
    o = letters(n)
    fresh = iter(letters(n, skip=o))
    inp = list(o)
    for d in reduced:
        inp[d] = next(fresh)
    extra: list[tuple[torch.Tensor, str]] = []
    if grouped is not None:
        d, M = grouped
        inp[d] = next(fresh)
        extra = [(M, o[d] + inp[d])]
    i_ = "".join(inp)
    like = ctx.out
    return [
        ctx.term(g, o, o, o, 0),
        terms.from_factors([(g, o), *extra], o, i_, ctx.out_shape, shape, like, -1.0 / count),
        terms.from_factors(
            [(g * xhat, o), (xhat, i_), *extra], o, i_, ctx.out_shape, shape, like, -1.0 / count
        ),
    ]


def _aligned(t: torch.Tensor | None, axes: Sequence[int], n: int) -> torch.Tensor | None:
    """A per-sample value over ``axes`` of an ``n``-d input, reshaped to broadcast against it."""
    if t is None:
        return None
    view = [1] * n
    for k, d in enumerate(axes):
        view[d] = t.shape[1 + k]
    return t.reshape(t.shape[0], *view)


@register_op(aten.native_layer_norm.default, output=0)
def layer_norm(ctx: OpContext, i: int) -> list[Term]:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)`` (NOTE [Normalization Jacobians])."""
    shape = ctx.in_shape(0)
    n, k = len(shape), len(ctx.args[1])
    last = list(range(n - k, n))
    x, w = ctx.args[0], _aligned(ctx.args[2], last, n)
    xhat, r = _stats(x, [1 + d for d in last], float(ctx.args[4]))
    o = letters(n)
    a = o[n - k :]
    if i == 0:
        g = r if w is None else w * r
        return _normalized(ctx, g, xhat, last, math.prod(shape[n - k :]))
    if i == 2:
        return [ctx.term(xhat, o, o, a, 2)]
    if i == 3:
        return [ctx.term(1.0, "", o, a, 3)]
    raise Unsupported("layer_norm w.r.t. this argument")


@register_op(aten.native_layer_norm.default, output=1)
@register_op(aten.native_layer_norm.default, output=2)
@register_op(aten.native_batch_norm.default, output=1)
@register_op(aten.native_batch_norm.default, output=2)
def saved_statistics(ctx: OpContext, i: int) -> list[Term]:
    """The mean and ``1/σ`` layer and batch norm return for their backward: autograd declares
    them not differentiable (a zero derivative), and every route must agree with autograd.

    (Group norm's are differentiable in autograd only where its first output's gradient is
    also defined, so they have no rule: no closed form can agree with both answers.)"""
    return []


def _batch_norm(ctx: OpContext, i: int, training: bool, eps: float) -> list[Term]:
    """``F.batch_norm`` output 0 w.r.t. input, weight or bias (NOTE [Normalization Jacobians])."""
    shape = ctx.in_shape(0)
    n = len(shape)
    if n < 2:
        raise Unsupported("batch norm of an input without a channel axis")
    x = ctx.args[0]
    w = _aligned(ctx.args[1], [1], n)
    o = letters(n)
    if training:
        red = [d for d in range(n) if d != 1]
        xhat, r = _stats(x, [1 + d for d in red], eps)
    else:
        rm, rv = ctx.args[3], ctx.args[4]
        if rm is None or rv is None:
            raise Unsupported("batch norm in evaluation without running statistics")
        rma, rva = _aligned(rm, [1], n), _aligned(rv, [1], n)
        assert rma is not None and rva is not None
        r = torch.rsqrt(rva + eps)
        xhat = (x - rma) * r
    if i == 0:
        g = r if w is None else w * r  # broadcast axes: letters the factor ignores
        if not training:
            return [ctx.term(g, o, o, o, 0)]
        return _normalized(ctx, g, xhat, red, math.prod(shape) // shape[1])
    if i == 1:
        return [ctx.term(xhat, o, o, o[1], 1)]
    if i == 2:
        return [ctx.term(1.0, "", o, o[1], 2)]
    raise Unsupported("batch norm w.r.t. its running statistics")


@register_op(aten.native_batch_norm.default, aten._native_batch_norm_legit.default, output=0)
def batch_norm(ctx: OpContext, i: int) -> list[Term]:
    """``F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)``."""
    return _batch_norm(ctx, i, bool(ctx.args[5]), float(ctx.args[7]))


@register_op(aten._native_batch_norm_legit_no_training.default, output=0)
def batch_norm_eval(ctx: OpContext, i: int) -> list[Term]:
    """Batch norm with running statistics (evaluation mode)."""
    return _batch_norm(ctx, i, False, float(ctx.args[6]))


@register_op(aten._native_batch_norm_legit.no_stats, output=0)
def batch_norm_no_stats(ctx: OpContext, i: int) -> list[Term]:
    """Batch norm with batch statistics and no running statistics."""
    if not ctx.args[3]:
        raise Unsupported("batch norm without statistics in evaluation")
    args = (*ctx.args[:3], None, None, *ctx.args[3:])
    inner = OpContext(args, ctx.kwargs, ctx.out, ctx.out_shape, (*ctx.shapes[:3], None, None))
    return _batch_norm(inner, i, True, float(ctx.args[5]))


@register_op(aten.native_group_norm.default, output=0)
def group_norm(ctx: OpContext, i: int) -> list[Term]:
    """``F.group_norm(x, G, weight, bias, eps)``: each sample's channels in ``G`` groups
    normalized together with the spatial axes (NOTE [Normalization Jacobians])."""
    shape = ctx.in_shape(0)
    n = len(shape)
    N, C, G = int(ctx.args[3]), int(ctx.args[4]), int(ctx.args[6])
    if n < 2 or shape[0] != N or shape[1] != C or C % G:
        raise Unsupported("group norm shapes")
    x = ctx.args[0]
    o = letters(n)
    grouped = x.reshape(x.shape[0], N, G, -1)
    xhat, r = _stats(grouped, [3], float(ctx.args[7]))
    xhat = xhat.reshape(x.shape)
    if i == 1:
        return [ctx.term(xhat, o, o, o[1], 1)]
    if i == 2:
        return [ctx.term(1.0, "", o, o[1], 2)]
    if i != 0:
        raise Unsupported("group norm w.r.t. this argument")
    per = C // G
    r = r.expand(*grouped.shape[:3], per).reshape(x.shape[0], N, C, *((1,) * (n - 2)))
    w = _aligned(ctx.args[1], [1], n)
    g = r if w is None else w * r
    gid = torch.arange(C, device=x.device) // per
    M = (gid[:, None] == gid[None, :]).to(x.dtype).unsqueeze(0)
    return _normalized(ctx, g, xhat, list(range(2, n)), math.prod(shape[1:]) // G, (1, M))
