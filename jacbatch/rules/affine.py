"""Closed-form Jacobians of ``Z = A @ W + B`` (:func:`jacbatch.affine`).

Shapes per sample: ``A (m, p)``, ``W (p, q)``, ``B (q,)`` or ``(m, q)``, ``Z (m, q)``.

NOTE [Kronecker Jacobian of A @ W + B]
    ``Z[i, j] = Σ_k A[i, k] W[k, j] + B[j]``, so

    * ``∂Z[i, j] / ∂W[k, l] = A[i, k] δ(j, l)``
    * ``∂Z[i, j] / ∂A[k, l] = δ(i, k) W[l, j]``
    * ``∂Z[i, j] / ∂B[l] = δ(j, l)`` for ``B (q,)``; ``∂Z[i, j] / ∂B[k, l] = δ(i, k) δ(j, l)``.

    Row-major vec puts ``(i, j)`` at ``i*q + j`` and ``(k, l)`` at ``k*cols + l``; reading the
    4-index tensors as block matrices gives ``dZ/dW = A ⊗ I_q`` (block ``(i, k)`` is
    ``A[i, k] I_q``), ``dZ/dA = I_m ⊗ Wᵀ`` (block ``(i, k)`` is ``δ(i, k) Wᵀ``) and
    ``dZ/dB = 1_m ⊗ I_q``.

    Column-major vec puts ``(i, j)`` at ``j*m + i``; the block index is now the column, so
    ``dZ/dW = I_q ⊗ A`` (block ``(j, l)`` is ``δ(j, l) A``), ``dZ/dA = Wᵀ ⊗ I_m`` (block
    ``(j, l)`` is ``W[l, j] I_m``) and ``dZ/dB = I_q ⊗ 1_m``. These agree with the general
    identities ``vec_r(A X C) = (A ⊗ Cᵀ) vec_r(X)`` and ``vec_c(A X C) = (Cᵀ ⊗ A) vec_c(X)``.

Each rule is one broadcast multiply of a factor with an identity, written straight into the
result: every output element is written exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..functions import affine
from . import eye, per_sample, register


def _result(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``shape``: ``out`` viewed as it, or a fresh uninitialized tensor."""
    if out is not None:
        return out.view(shape)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


@register(affine, 1)
def affine_wrt_W(
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    batch_size: int,
    order: str,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``dZ/dW``: ``A ⊗ I_q`` (row) or ``I_q ⊗ A`` (col), shape ``(B, m*q, p*q)``."""
    A = per_sample(args[0], batched[0], batch_size)  # (b, m, p)
    b, m, p = A.shape
    q = args[1].shape[-1]
    Iq = eye(q, A)
    if order == "row":  # J[b, i, j, k, l] = A[b, i, k] δ(j, l)
        J = _result(out, (b, m, q, p, q), A)
        torch.mul(A[:, :, None, :, None], Iq[None, None, :, None, :], out=J)
    else:  # J[b, j, i, l, k] = δ(j, l) A[b, i, k]
        J = _result(out, (b, q, m, q, p), A)
        torch.mul(Iq[None, :, None, :, None], A[:, None, :, None, :], out=J)
    return J.view(b, m * q, p * q)


@register(affine, 0)
def affine_wrt_A(
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    batch_size: int,
    order: str,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``dZ/dA``: ``I_m ⊗ Wᵀ`` (row) or ``Wᵀ ⊗ I_m`` (col), shape ``(B, m*q, m*p)``."""
    W = per_sample(args[1], batched[1], batch_size)  # (b, p, q)
    b, p, q = W.shape
    m = args[0].shape[-2]
    Wt = W.transpose(1, 2)  # (b, q, p): Wt[b, j, l] = W[b, l, j]
    Im = eye(m, W)
    if order == "row":  # J[b, i, j, k, l] = δ(i, k) W[b, l, j]
        J = _result(out, (b, m, q, m, p), W)
        torch.mul(Im[None, :, None, :, None], Wt[:, None, :, None, :], out=J)
    else:  # J[b, j, i, l, k] = W[b, l, j] δ(i, k)
        J = _result(out, (b, q, m, p, m), W)
        torch.mul(Wt[:, :, None, :, None], Im[None, None, :, None, :], out=J)
    return J.view(b, m * q, m * p)


@register(affine, 2)
def affine_wrt_B(
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    batch_size: int,
    order: str,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``dZ/dB``: ``1_m ⊗ I_q`` (row) / ``I_q ⊗ 1_m`` (col) for ``B (q,)``; ``I_{mq}`` for ``B (m, q)``."""
    A, W, Bias = args
    m, q = A.shape[-2], W.shape[-1]
    b = batch_size
    Iq = eye(q, Bias)
    bias_ndim = Bias.ndim - (1 if batched[2] else 0)
    if bias_ndim == 1:
        if order == "row":  # J[b, i, j, l] = δ(j, l)
            J = _result(out, (b, m, q, q), Bias)
            J.copy_(Iq[None, None].expand(b, m, q, q))
        else:  # J[b, j, i, l] = δ(j, l)
            J = _result(out, (b, q, m, q), Bias)
            J.copy_(Iq[None, :, None, :].expand(b, q, m, q))
        return J.view(b, m * q, q)
    # B (m, q): the identity on m*q entries, in either order
    J = _result(out, (b, m * q, m * q), Bias)
    J.copy_(eye(m * q, Bias)[None].expand(b, m * q, m * q))
    return J


# ---------------------------------------------------------------------------------------------
# Structured rules: the same Jacobians as lazy operators (jacbatch.structured), nothing
# materialized. The factors are those of NOTE [Kronecker Jacobian of A @ W + B] (row-major vec);
# the operators produce the column-major layout on request.
# ---------------------------------------------------------------------------------------------

from ..structured import IdentityJacobian, JacobianOperator, KroneckerJacobian  # noqa: E402
from . import register_structured  # noqa: E402


@register_structured(affine, 1)
def affine_wrt_W_structured(
    args: Sequence[torch.Tensor], batched: Sequence[bool], batch_size: int | None
) -> JacobianOperator:
    """``dZ/dW = A ⊗ I_q``: holds ``A`` (``(B, m, p)``, or ``(m, p)`` when shared)."""
    A = args[0]
    m, p = A.shape[-2:]
    q = args[1].shape[-1]
    return KroneckerJacobian(
        A, q, out_shape=(m, q), in_shape=(p, q), batch_size=batch_size, labels=("A", None)
    )


@register_structured(affine, 0)
def affine_wrt_A_structured(
    args: Sequence[torch.Tensor], batched: Sequence[bool], batch_size: int | None
) -> JacobianOperator:
    """``dZ/dA = I_m ⊗ Wᵀ``: holds ``W`` (``(B, p, q)``, or ``(p, q)`` when shared) as ``Wᵀ``."""
    W = args[1]
    m, p = args[0].shape[-2:]
    q = W.shape[-1]
    return KroneckerJacobian(
        m, W.mT, out_shape=(m, q), in_shape=(m, p), batch_size=batch_size, labels=(None, "Wᵀ")
    )


@register_structured(affine, 2)
def affine_wrt_B_structured(
    args: Sequence[torch.Tensor], batched: Sequence[bool], batch_size: int | None
) -> JacobianOperator:
    """``dZ/dB``: ``1_m ⊗ I_q`` for ``B (q,)`` (holds ``m`` ones), the identity for ``B (m, q)``."""
    A, W, Bias = args
    m, q = A.shape[-2], W.shape[-1]
    if Bias.ndim - (1 if batched[2] else 0) == 1:
        ones = torch.ones(m, 1, dtype=Bias.dtype, device=Bias.device)
        return KroneckerJacobian(
            ones, q, out_shape=(m, q), in_shape=(q,), batch_size=batch_size, labels=("1_m", None)
        )
    return IdentityJacobian((m, q), batch_size=batch_size, dtype=Bias.dtype, device=Bias.device)
