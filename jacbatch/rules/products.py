"""Fused products: ``addmv``, ``addr``, ``baddbmm``, ``addbmm``, ``vdot`` and the cross product;
and the negative log-likelihood loss.

The matrix-product rules (NOTE [Matrix products as lettered terms] in
:mod:`jacbatch.rules.linear`) with the added input scaled by ``beta`` and the product by
``alpha``. ``addbmm`` sums its products over the batch axis ``h``: that letter is on the inputs
only. The cross product ``c_i = ε_ijk a_j b_k`` has ``∂c_i / ∂a_j = ε_ijk b_k`` and
``∂c_i / ∂b_k = ε_ijk a_j``: a ``3 × 3`` factor per position (the other axes broadcast).

NOTE [Negative log-likelihood]
    ``nll_loss(x, t, w)`` is ``-w[t_n] x[n, t_n]`` per row (0 where ``t_n`` is ``ignore_index``),
    summed, or divided by ``Σ_n w[t_n]`` over the rows not ignored (``"mean"``): one factor
    ``-w[t_n] onehot(t_n)[c]`` over the row and class letters (the class letter only on the
    input), scaled per sample by the total weight. The total weight it also returns is not
    differentiable (autograd).
"""

from __future__ import annotations

import torch

from .linear import dot
from .ops import OpContext, broadcast_letters, identity, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def _scales(ctx: OpContext) -> tuple[float, float]:
    return ctx.kwargs.get("beta", 1), ctx.kwargs.get("alpha", 1)


@register_op(aten.addmv.default)
def addmv(ctx: OpContext, i: int) -> list[Term]:
    """``beta s + alpha M v``."""
    beta, alpha = _scales(ctx)
    if i == 0:
        return identity(ctx, 0, beta)
    M, v = ctx.args[1], ctx.args[2]
    if i == 1:
        return [ctx.term(alpha * v, "l", "i", "il", 1)]
    return [ctx.term(alpha * M, "ik", "i", "k", 2)]


@register_op(aten.addr.default)
def addr(ctx: OpContext, i: int) -> list[Term]:
    """``beta s + alpha u vᵀ``."""
    beta, alpha = _scales(ctx)
    if i == 0:
        return identity(ctx, 0, beta)
    u, v = ctx.args[1], ctx.args[2]
    if i == 1:
        return [ctx.term(alpha * v, "j", "ij", "i", 1)]
    return [ctx.term(alpha * u, "i", "ij", "j", 2)]


@register_op(aten.baddbmm.default)
def baddbmm(ctx: OpContext, i: int) -> list[Term]:
    """``beta s + alpha X @ Y`` per batch entry ``h``."""
    beta, alpha = _scales(ctx)
    if i == 0:
        return identity(ctx, 0, beta)
    X, Y = ctx.args[1], ctx.args[2]
    if i == 1:
        return [ctx.term(alpha * Y, "hlj", "hij", "hil", 1)]
    return [ctx.term(alpha * X, "hik", "hij", "hkj", 2)]


@register_op(aten.addbmm.default)
def addbmm(ctx: OpContext, i: int) -> list[Term]:
    """``beta s + alpha Σ_h X[h] @ Y[h]``."""
    beta, alpha = _scales(ctx)
    if i == 0:
        return identity(ctx, 0, beta)
    X, Y = ctx.args[1], ctx.args[2]
    if i == 1:
        return [ctx.term(alpha * Y, "hlj", "ij", "hil", 1)]
    return [ctx.term(alpha * X, "hik", "ij", "hkj", 2)]


register_op(aten.vdot.default)(dot)  # real tensors: the dot product


def _levi_civita(like: torch.Tensor) -> torch.Tensor:
    E = torch.zeros(3, 3, 3, dtype=like.dtype, device=like.device)
    for a, b, c in ((0, 1, 2), (1, 2, 0), (2, 0, 1)):
        E[a, b, c], E[a, c, b] = 1.0, -1.0
    return E


@register_op(aten.linalg_cross.default)
def cross(ctx: OpContext, i: int) -> list[Term]:
    """``a × b`` along ``dim``: ``ε_ijk b_k`` for ``a``, ``ε_ijk a_j`` for ``b``."""
    n = len(ctx.out_shape)
    d = int(ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("dim", -1)) % n
    other = ctx.aligned(1 - i).movedim(1 + d, -1)  # (B, .., 3)
    E = _levi_civita(ctx.out)
    F = torch.einsum("ijk,...k->...ij" if i == 0 else "ikj,...k->...ij", E, other)
    o = letters(n)
    j = letters(1, skip=o)
    inp = broadcast_letters(o, ctx.in_shape(i), ctx.out_shape)
    k = n - len(ctx.in_shape(i))
    inp = inp[: d - k] + j + inp[d - k + 1 :]
    t = o[:d] + o[d + 1 :] + o[d] + j
    return [ctx.term(F, t, o, inp, i)]


@register_op(aten.nll_loss_forward.default, output=0)
def nll_loss(ctx: OpContext, i: int) -> list[Term]:
    """``nll_loss(x, target, weight, reduction, ignore_index)`` w.r.t. ``x``
    (NOTE [Negative log-likelihood])."""
    if i != 0:
        raise Unsupported("nll_loss w.r.t. its weight")
    x, t, w = ctx.args[0], ctx.args[1], ctx.args[2]
    reduction, ignore = int(ctx.args[3]), int(ctx.args[4])
    shape = ctx.in_shape(0)
    C = shape[-1]
    valid = t != ignore
    tc = torch.where(valid, t, 0).clamp(0, C - 1)
    if w is None:
        wt = valid.to(x.dtype)
    else:  # w[t_n], per sample where the weight or the target is
        b = max(w.shape[0], t.shape[0])
        wr = w.reshape(w.shape[0], *((1,) * (t.ndim - 1)), C).expand(b, *t.shape[1:], C)
        picked = torch.gather(wr, -1, tc.expand(b, *t.shape[1:]).unsqueeze(-1))
        wt = picked.squeeze(-1) * valid
    c = torch.arange(C, device=x.device)
    F = -(tc.unsqueeze(-1) == c).to(x.dtype) * wt.unsqueeze(-1)  # (B, [N,] C)
    rows = "n" if len(shape) == 2 else ""
    if reduction == 1:  # mean over the total weight, per sample
        total = wt.reshape(wt.shape[0], -1).sum(-1)
        if bool((total == 0).any()):
            raise Unsupported("nll_loss with a total weight of 0")
        F = F / total.reshape(-1, *((1,) * (F.ndim - 1)))
    elif reduction not in (0, 2):
        raise Unsupported(f"nll_loss reduction {reduction}")
    out = rows if reduction == 0 else ""
    return [ctx.term(F, rows + "c", out, rows + "c", 0)]


@register_op(aten.nll_loss_forward.default, output=1)
def nll_loss_total_weight(ctx: OpContext, i: int) -> list[Term]:
    """The total weight ``nll_loss`` returns: not differentiable (autograd)."""
    return []


@register_op(aten.binary_cross_entropy.default)
def binary_cross_entropy(ctx: OpContext, i: int) -> list[Term]:
    """``-w (t log x + (1 - t) log(1 - x))``, per entry or summed or averaged: for ``x``
    ``w (x - t) / max(x (1 - x), 1e-12)`` (autograd's guard), for ``t``
    ``w (log(1 - x) - log x)``."""
    x, t = ctx.args[0], ctx.args[1]
    w = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("weight")
    reduction = int(ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("reduction", 1))
    shape = ctx.in_shape(0)
    if ctx.in_shape(1) != shape or (w is not None and tuple(w.shape[1:]) != shape):
        raise Unsupported("binary_cross_entropy with broadcasting")
    if i == 0:
        g = (x - t) / torch.clamp_min((1 - x) * x, 1e-12)
    elif i == 1:
        g = torch.log1p(-x) - torch.log(x)
    else:
        raise Unsupported("binary_cross_entropy w.r.t. its weight")
    if w is not None:
        g = g * w
    if reduction == 1:
        g = g / max(1, x[0].numel())
    elif reduction not in (0, 2):
        raise Unsupported(f"binary_cross_entropy reduction {reduction}")
    inp = letters(len(shape))
    return [ctx.term(g, inp, inp if reduction == 0 else "", inp, i)]
