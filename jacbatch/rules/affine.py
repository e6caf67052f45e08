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

NOTE [Writing a batched Kronecker product at the memory-write limit]
    The ``W`` and ``A`` rules are each one batched Kronecker product
    ``J[b, i, j, k, l] = X[b, i, k] Y[b, j, l]`` (``X ⊗ Y``, one factor an identity) written
    straight into the result: every output element is written exactly once, so the cost is
    the write of the output. How it is written matters when the inner factor is narrow:

    * ``Y`` with ``c2 >= 16`` columns: one broadcast multiply
      ``X[:, :, None, :, None] * Y[:, None, :, None, :]``; its innermost loop runs over ``l``
      (``c2`` contiguous elements), long enough for vectorized writes.
    * fewer columns (``q = 8`` in ``A ⊗ I_q``): that innermost loop is too short and the
      broadcast kernel spends its time on loop overhead. Flattening ``(k, l)`` gives
      ``J[b, i, j, (k, l)] = Xr[b, i, (k, l)] Yt[b, j, (k, l)]`` with ``Xr[b, i, (k, l)] =
      X[b, i, k]`` and ``Yt[b, j, (k, l)] = Y[b, j, l]`` (for ``Y = I_q``, a fixed 0/1 selection
      pattern): one multiply whose innermost loop runs over ``c1 * c2`` contiguous elements.
      ``Xr`` and ``Yt`` are built per batch chunk, so these temporaries stay under ``1/32`` of
      the output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..functions import affine
from . import eye, register
from .terms import keeps_graph

#: Below this many columns of the inner factor, the broadcast multiply's innermost loop is too
#: short; see NOTE [Writing a batched Kronecker product at the memory-write limit].
_NARROW = 16
#: The narrow formulation's temporaries stay under ``1 / _TEMP_FRACTION`` of the output.
_TEMP_FRACTION = 32


def _result(out: torch.Tensor | None, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    """A buffer of ``shape``: ``out`` viewed as it, or a fresh uninitialized tensor."""
    if out is not None:
        return out.view(shape)
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _repeat_flat(F: torch.Tensor, reps: int, inner: bool) -> torch.Tensor:
    """``(n, r, c) -> (n, r, c * reps)``: ``F[.., k]`` at ``(k, l)`` (``inner``), else at ``(l, k)``."""
    n, r, c = F.shape
    if inner:
        return F[:, :, :, None].expand(n, r, c, reps).reshape(n, r, c * reps)
    return F[:, :, None, :].expand(n, r, reps, c).reshape(n, r, reps * c)


def _kron(
    X: torch.Tensor, Y: torch.Tensor, batch_size: int, out: torch.Tensor | None
) -> torch.Tensor:
    """Batched Kronecker product ``J[b, i, j, k, l] = X[b, i, k] Y[b, j, l]``.

    Args:
        X: ``(B, r1, c1)``, or ``(1, r1, c1)`` when shared by the batch.
        Y: ``(B, r2, c2)``, or ``(1, r2, c2)`` when shared by the batch.
        batch_size: ``B``.
        out: ``None`` or a contiguous buffer of ``B * r1 * r2 * c1 * c2`` elements. Without
            one, a differentiable ``X`` or ``Y`` gives an out-of-place (differentiable) product.

    Returns:
        ``(B, r1 * r2, c1 * c2)``; a view of ``out`` when given.
    """
    b = batch_size
    _, r1, c1 = X.shape
    _, r2, c2 = Y.shape
    if out is None and keeps_graph(X, Y):  # a differentiable result: one out-of-place product
        J = X[:, :, None, :, None] * Y[:, None, :, None, :]
        return J.expand(b, r1, r2, c1, c2).reshape(b, r1 * r2, c1 * c2)
    J = _result(out, (b, r1, r2, c1, c2), X)
    x_batched, y_batched = X.shape[0] == b != 1, Y.shape[0] == b != 1
    X, Y = X.expand(b, r1, c1), Y.expand(b, r2, c2)  # shared: stride-0 views
    if c2 >= _NARROW or b == 0 or J.numel() == 0:
        torch.mul(X[:, :, None, :, None], Y[:, None, :, None, :], out=J)
        return J.view(b, r1 * r2, c1 * c2)
    # Narrow inner factor: one multiply over the flattened (k, l), in batch chunks.
    Jf = J.view(b, r1, r2, c1 * c2)
    temp = (r1 if x_batched else 0) + (r2 if y_batched else 0)  # per sample, times c1 * c2
    chunks = max(1, min(b, -(-_TEMP_FRACTION * temp // (r1 * r2))))
    step = -(-b // chunks)
    Xr = None if x_batched else _repeat_flat(X[:1], c2, inner=True)  # (1, r1, c1*c2)
    Yt = None if y_batched else _repeat_flat(Y[:1], c1, inner=False)  # (1, r2, c1*c2)
    for s in range(0, b, step):
        e = min(b, s + step)
        Xs = _repeat_flat(X[s:e], c2, inner=True) if Xr is None else Xr.expand(e - s, -1, -1)
        Ys = _repeat_flat(Y[s:e], c1, inner=False) if Yt is None else Yt.expand(e - s, -1, -1)
        torch.mul(Xs[:, :, None, :], Ys[:, None, :, :], out=Jf[s:e])
    return J.view(b, r1 * r2, c1 * c2)


@register(affine, 1)
def affine_wrt_W(
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    batch_size: int,
    order: str,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``dZ/dW``: ``A ⊗ I_q`` (row) or ``I_q ⊗ A`` (col), shape ``(B, m*q, p*q)``."""
    A = args[0] if batched[0] else args[0][None]  # (b, m, p), or (1, m, p) when shared
    Iq = eye(args[1].shape[-1], A)[None]  # (1, q, q)
    if order == "row":  # J[b, i, j, k, l] = A[b, i, k] δ(j, l)
        return _kron(A, Iq, batch_size, out)
    return _kron(Iq, A, batch_size, out)  # J[b, j, i, l, k] = δ(j, l) A[b, i, k]


@register(affine, 0)
def affine_wrt_A(
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    batch_size: int,
    order: str,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """``dZ/dA``: ``I_m ⊗ Wᵀ`` (row) or ``Wᵀ ⊗ I_m`` (col), shape ``(B, m*q, m*p)``."""
    W = args[1] if batched[1] else args[1][None]  # (b, p, q), or (1, p, q) when shared
    Wt = W.transpose(1, 2)  # Wt[b, j, l] = W[b, l, j]
    Im = eye(args[0].shape[-2], W)[None]  # (1, m, m)
    if order == "row":  # J[b, i, j, k, l] = δ(i, k) W[b, l, j]
        return _kron(Im, Wt, batch_size, out)
    return _kron(Wt, Im, batch_size, out)  # J[b, j, i, l, k] = W[b, l, j] δ(i, k)


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
