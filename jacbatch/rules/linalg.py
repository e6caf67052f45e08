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

import threading

import torch

from .ops import OpContext, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def _lead(ctx: OpContext) -> str:
    """Letters for the matrix-batch axes inside one sample (``(..., n, n)`` inputs)."""
    return "".join("ABCDEFGH"[: len(ctx.in_shape(0)) - 2])


#: ``UNCHECKED.on`` true (per thread): the rules skip their singularity checks (value reads, which a trace on
#: fake tensors cannot do). Only for a traced program whose every result is checked for
#: finiteness (a singular matrix gives a non-finite inverse): NOTE [Second-order closed forms:
#: the Jacobian program, traced again] in :mod:`jacbatch.hessian`.
UNCHECKED = threading.local()


def _checked() -> bool:
    return not getattr(UNCHECKED, "on", False)


def _inverse(ctx: OpContext) -> torch.Tensor:
    Y, info = torch.linalg.inv_ex(ctx.args[0])
    if not _checked():
        return Y
    if bool((info != 0).any()) or not bool(torch.isfinite(Y).all()):
        raise Unsupported("singular matrix")
    return Y


@register_op(aten.linalg_inv_ex.default, output=0)
def inverse(ctx: OpContext, i: int) -> list[Term]:
    """``X⁻¹``: ``-Y[i, k] Y[l, j]`` (NOTE [Inverse and determinant Jacobians])."""
    Y = ctx.out
    if _checked() and not bool(torch.isfinite(Y).all()):
        raise Unsupported("singular matrix")
    h = _lead(ctx)
    outer = -(Y[..., :, :, None, None] * Y[..., None, None, :, :])  # (B, .., i, k, l, j)
    return [ctx.term(outer, h + "iklj", h + "ij", h + "kl", 0)]


@register_op(aten._linalg_det.default, output=0)
def det(ctx: OpContext, i: int) -> list[Term]:
    """``det(X)``: gradient ``det(X) X⁻ᵀ`` (Jacobi's formula)."""
    Yt = _inverse(ctx).transpose(-1, -2)
    h = _lead(ctx)
    return [ctx.term(ctx.out[..., None, None] * Yt, h + "kl", h, h + "kl", 0)]


@register_op(aten._linalg_slogdet.default, output=1)
def logabsdet(ctx: OpContext, i: int) -> list[Term]:
    """``log|det X|``: gradient ``X⁻ᵀ``."""
    h = _lead(ctx)
    return [ctx.term(_inverse(ctx).transpose(-1, -2), h + "kl", h, h + "kl", 0)]


@register_op(aten._linalg_slogdet.default, output=0)
def sign(ctx: OpContext, i: int) -> list[Term]:
    """The sign of ``slogdet`` is piecewise constant: zero derivative, as autograd."""
    return []


@register_op(aten._linalg_solve_ex.default, output=0)
def solve(ctx: OpContext, i: int) -> list[Term]:
    """``X = A⁻¹ B``: ``A⁻¹`` for ``B``; ``-A⁻¹[i, k] X[l, j]`` for ``A`` (``dX = -A⁻¹ dA X``)."""
    if not ctx.kwargs.get("left", True) or len(ctx.in_shape(0)) != 2:
        raise Unsupported("solve from the right, or stacks of systems inside a sample")
    Ainv = _inverse(ctx)
    X = ctx.out
    vector = len(ctx.in_shape(1)) == 1
    if i == 1:
        return [ctx.term(Ainv, "ik", "i" if vector else "ij", "k" if vector else "kj", 1)]
    if vector:
        return [ctx.term(-(Ainv[:, :, :, None] * X[:, None, None, :]), "ikl", "i", "kl", 0)]
    outer = -(Ainv[:, :, :, None, None] * X[:, None, None, :, :])  # (B, i, k, l, j)
    return [ctx.term(outer, "iklj", "ij", "kl", 0)]
