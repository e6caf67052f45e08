"""Matrix inverse, determinant and log-determinant.

NOTE [Inverse and determinant Jacobians]
    From ``X X⁻¹ = I``: ``d(X⁻¹) = -X⁻¹ (dX) X⁻¹`` (Matrix Cookbook (59)), so with ``Y = X⁻¹``
    ``∂Y[i, j] / ∂X[k, l] = -Y[i, k] Y[l, j]``: a dense factor over letters ``iklj``
    (``-Y ⊗ Yᵀ`` in row-major vec). Jacobi's formula ``d det(X) = det(X) tr(X⁻¹ dX)`` (Cookbook
    (49)) gives the gradient ``det(X) X⁻ᵀ``, and ``d log|det X| = tr(X⁻¹ dX)`` the gradient
    ``X⁻ᵀ``; the sign of ``slogdet`` is piecewise constant (zero derivative). The inverse is
    recomputed from the batch of inputs; a singular matrix (non-finite inverse) is not covered
    (autograd's SVD-based formulas handle it), so the traced route falls back.
"""

from __future__ import annotations

import torch

from .ops import OpContext, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def _inverse(ctx: OpContext) -> torch.Tensor:
    if len(ctx.in_shape(0)) != 2:
        raise Unsupported("batched matrices inside one sample")
    X = ctx.args[0]
    Y, info = torch.linalg.inv_ex(X)
    if bool((info != 0).any()) or not bool(torch.isfinite(Y).all()):
        raise Unsupported("singular matrix")
    return Y


@register_op(aten.linalg_inv_ex.default, output=0)
def inverse(ctx: OpContext, i: int) -> list[Term]:
    """``X⁻¹``: ``-Y[i, k] Y[l, j]`` (NOTE [Inverse and determinant Jacobians])."""
    if len(ctx.in_shape(0)) != 2:
        raise Unsupported("batched matrices inside one sample")
    Y = ctx.out
    if not bool(torch.isfinite(Y).all()):
        raise Unsupported("singular matrix")
    outer = -(Y[:, :, :, None, None] * Y[:, None, None, :, :])  # (B, i, k, l, j)
    return [ctx.term(outer, "iklj", "ij", "kl", 0)]


@register_op(aten._linalg_det.default, output=0)
def det(ctx: OpContext, i: int) -> list[Term]:
    """``det(X)``: gradient ``det(X) X⁻ᵀ`` (Jacobi's formula)."""
    Yt = _inverse(ctx).transpose(-1, -2)
    return [ctx.term(ctx.out[:, None, None] * Yt, "kl", "", "kl", 0)]


@register_op(aten._linalg_slogdet.default, output=1)
def logabsdet(ctx: OpContext, i: int) -> list[Term]:
    """``log|det X|``: gradient ``X⁻ᵀ``."""
    return [ctx.term(_inverse(ctx).transpose(-1, -2), "kl", "", "kl", 0)]


@register_op(aten._linalg_slogdet.default, output=0)
def sign(ctx: OpContext, i: int) -> list[Term]:
    """The sign of ``slogdet`` is piecewise constant: zero derivative, as autograd."""
    return []
