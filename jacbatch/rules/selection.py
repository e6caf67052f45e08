"""Ops that pick entries by value: max/min (reductions and per-axis), amax/amin, median, sort,
topk, kthvalue; and the statistics var_mean, std, std_mean.

NOTE [Picking by value]
    ``y = x[idx(x)]`` is locally the constant selection ``idx`` wherever the order of the
    entries is strict, so its Jacobian is ``onehot(idx)`` (NOTE [Index Jacobians are one-hot
    factors]) with the indices the op returns, recomputed from ``x``. Ties follow autograd:
    the full reductions ``max()``, ``min()``, ``median()`` and ``amax``/``amin`` split the
    derivative evenly among the tied entries (autograd's ``evenly_distribute_backward`` and
    ``scale_grad_by_count``); the ops that return indices give it to the returned index, which
    for tied values is an implementation choice of the kernel (and may differ between a batched
    and a per-sample call): those raise ``Unsupported`` on ties (two equal values along the
    axis), so the call falls back to autodiff.
"""

from __future__ import annotations

from typing import Any

import torch

from . import reductions
from .indexing import onehot
from .ops import OpContext, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def _evenly(ctx: OpContext, dims: object, keepdim: bool, nan_ties: bool) -> list[Term]:
    """``mask / count`` over the entries equal to the result (NaN equal to NaN with
    ``nan_ties``), per reduced slice."""
    out, inp, red = reductions._reduced(ctx, dims, keepdim)
    x = ctx.args[0]
    y = reductions._restore(ctx, ctx.out, red, keepdim)
    mask = x == y
    if nan_ties:
        mask = mask | (x.isnan() & y.isnan())
    m = mask.to(ctx.out.dtype)
    count = m.sum(dim=[1 + d for d in red], keepdim=True) if red else m
    return [ctx.term(m / count, inp, out, inp, 0)]


@register_op(aten.max.default, aten.min.default, aten.median.default, aten.nanmedian.default)
def max_all(ctx: OpContext, i: int) -> list[Term]:
    """``x.max()``, ``x.min()``, ``x.median()``: split evenly among the entries equal to it."""
    return _evenly(ctx, None, False, nan_ties=True)


@register_op(aten.amax.default, aten.amin.default)
def amax(ctx: OpContext, i: int) -> list[Term]:
    """``amax(x, dims)``/``amin``: split evenly among the entries equal to the result."""
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim", [])
    keepdim = bool(ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("keepdim", False))
    return _evenly(ctx, dims, keepdim, nan_ties=False)


def _no_ties(x: torch.Tensor, d: int) -> None:
    """Raise on two equal values along axis ``d`` of ``x`` (``(B, *shape)``, ``d`` counted with
    the batch axis); NaNs count as equal."""
    s = x.sort(dim=d).values
    n = s.shape[d]
    if n > 1:
        a, b = s.narrow(d, 0, n - 1), s.narrow(d, 1, n - 1)
        if bool(((a == b) | (a.isnan() & b.isnan())).any()):
            raise Unsupported("tied values: the index an op returns for them is arbitrary")


def _picked(ctx: OpContext, idx: torch.Tensor, d: int) -> list[Term]:
    """``out = x[.., idx, ..]`` along axis ``d`` of the input; ``idx`` has the output's shape
    (the axis ``d`` kept, of any size, or removed)."""
    shape = ctx.in_shape(0)
    n = len(shape)
    o = letters(len(ctx.out_shape))
    c = letters(1, skip=o)
    kept = len(ctx.out_shape) == n
    inp = o[:d] + c + (o[d + 1 :] if kept else o[d:])
    return [ctx.term(onehot(idx, shape[d], ctx.out.dtype), o + c, o, inp, 0)]


def _arg(ctx: OpContext, k: int, name: str, default: Any) -> Any:
    """Positional argument ``k`` or keyword ``name`` (keyword-only in some overloads)."""
    return ctx.args[k] if len(ctx.args) > k else ctx.kwargs.get(name, default)


def _dim(ctx: OpContext, k: int, name: str, default: Any) -> int:
    return int(_arg(ctx, k, name, default)) % max(len(ctx.in_shape(0)), 1)


def _by_index(ctx: OpContext, d: int, index: Any) -> list[Term]:
    """:func:`_picked` with ``index(x, axis)`` the indices (``x`` with its batch axis); ties
    raise (NOTE [Picking by value])."""
    if not ctx.in_shape(0):
        return [ctx.term(1.0, "", "", "", 0)]
    x = ctx.args[0]
    _no_ties(x, 1 + d)
    return _picked(ctx, index(x, 1 + d), d)


@register_op(aten.max.dim, aten.min.dim, aten.median.dim, aten.nanmedian.dim, output=0)
def max_dim(ctx: OpContext, i: int) -> list[Term]:
    """``x.max(dim)`` (``min``, ``median``) values: one-hot at the entry equal to the value
    (without ties it is the returned index)."""
    d = _dim(ctx, 1, "dim", 0)
    keepdim = bool(_arg(ctx, 2, "keepdim", False))

    def index(x: torch.Tensor, dd: int) -> torch.Tensor:
        y = ctx.out if keepdim else ctx.out.unsqueeze(dd)
        hit = (x == y) | (x.isnan() & y.isnan())
        return hit.to(torch.int64).argmax(dd, keepdim=keepdim)

    return _by_index(ctx, d, index)


@register_op(aten.sort.default, aten.sort.stable, output=0)
def sort(ctx: OpContext, i: int) -> list[Term]:
    """``x.sort(dim)`` values: one-hot at the sorting permutation (no ties)."""
    d = _dim(ctx, 1, "dim", -1)
    desc = bool(_arg(ctx, 2, "descending", False))
    return _by_index(ctx, d, lambda x, dd: x.sort(dim=dd, descending=desc).indices)


@register_op(aten.topk.default, output=0)
def topk(ctx: OpContext, i: int) -> list[Term]:
    """``x.topk(k, dim)`` values: one-hot at the returned indices (no ties along the axis)."""
    k = int(ctx.args[1])
    d = _dim(ctx, 2, "dim", -1)
    largest = bool(_arg(ctx, 3, "largest", True))
    return _by_index(ctx, d, lambda x, dd: x.topk(k, dim=dd, largest=largest).indices)


@register_op(aten.kthvalue.default, output=0)
def kthvalue(ctx: OpContext, i: int) -> list[Term]:
    """``x.kthvalue(k, dim)`` values: one-hot at the returned index (no ties along the axis)."""
    k = int(ctx.args[1])
    d = _dim(ctx, 2, "dim", -1)
    keepdim = bool(_arg(ctx, 3, "keepdim", False))
    return _by_index(ctx, d, lambda x, dd: x.kthvalue(k, dim=dd, keepdim=keepdim).indices)


# -- statistics returned together -----------------------------------------------------------

register_op(aten.var_mean.correction, output=0)(reductions.var)
register_op(aten.var_mean.correction, output=1)(reductions.mean)
register_op(aten.std_mean.correction, output=1)(reductions.mean)


@register_op(aten.std.correction)
@register_op(aten.std_mean.correction, output=0)
def std(ctx: OpContext, i: int) -> list[Term]:
    """``std(x)`` over ``dims``: ``(x - mean) / ((N - correction) std)``, 0 where ``std = 0``
    (as autograd)."""
    dims = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim")
    keepdim = bool(ctx.kwargs.get("keepdim", False))
    c = ctx.kwargs.get("correction")
    c = 1 if c is None else c
    out, inp, red = reductions._reduced(ctx, dims, keepdim)
    x = ctx.args[0]
    mean = x.mean(dim=[1 + d for d in red], keepdim=True)
    s = reductions._restore(ctx, ctx.out, red, keepdim)
    count = reductions._count(ctx, red) - c
    g = torch.where(s == 0, torch.zeros_like(x), (x - mean) / (count * s))
    return [ctx.term(g, inp, out, inp, 0)]


@register_op(aten.norm.ScalarOpt_dim, aten.norm.Scalar)
def p_norm(ctx: OpContext, i: int) -> list[Term]:
    """``‖x‖_p`` over ``dims`` for ``p = 1`` (``sign(x)``), ``p = 2`` (``x / ‖x‖``) or
    ``p > 2`` (``x |x|^(p-2) / ‖x‖^(p-1)``), 0 where the norm is 0 (as autograd); other orders
    are not covered."""
    p = ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("p", 2)
    p = 2.0 if p is None else float(p)
    dims = _arg(ctx, 2, "dim", None)
    keepdim = bool(_arg(ctx, 3, "keepdim", False))
    out, inp, red = reductions._reduced(ctx, dims, keepdim)
    x = ctx.args[0]
    nrm = reductions._restore(ctx, ctx.out, red, keepdim)
    if p == 1:
        g = torch.sign(x)
    elif p == 2 or p > 2:
        g = x * x.abs().pow(p - 2) / nrm.pow(p - 1)
        g = torch.where(nrm == 0, torch.zeros_like(g), g)
    else:
        raise Unsupported(f"a norm of order {p}")
    return [ctx.term(g, inp, out, inp, 0)]
