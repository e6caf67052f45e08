"""The chain rule on flattened Jacobians and on structured Jacobian operators."""

from __future__ import annotations

from typing import overload

import torch

from . import _validation as V
from .structured import JacobianOperator


@overload
def chain(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor: ...


@overload
def chain(
    outer: torch.Tensor | JacobianOperator, inner: torch.Tensor | JacobianOperator
) -> torch.Tensor | JacobianOperator: ...


def chain(
    outer: torch.Tensor | JacobianOperator, inner: torch.Tensor | JacobianOperator
) -> torch.Tensor | JacobianOperator:
    """Chain rule: ``d vec(h) / d vec(x) = (d vec(h) / d vec(y)) @ (d vec(y) / d vec(x))``.

    Both Jacobians must be flattened in the same vec order (``jacobian(..., vec="row")``).
    Either may instead be a structured operator (:func:`jacbatch.structured_jacobian`): two
    operators give an operator (structured where the algebra allows, see
    :func:`jacbatch.structured.compose`); an operator with a dense Jacobian gives the dense,
    flattened ``dh/dx`` (row-major vec) without materializing the operator.

    Args:
        outer: ``dh/dy``: ``(k,)`` (the gradient of a scalar ``h``), ``(o, k)``, or batched
            ``(B, o, k)``.
        inner: ``dy/dx``: ``(k, i)`` or batched ``(B, k, i)``. A batched operand may meet an
            unbatched one (it is shared by the batch).

    Returns:
        ``dh/dx``: ``(i,)`` for a 1-D ``outer``, ``(o, i)``, or ``(B, o, i)`` if either is batched.

    Example (the chain rule of the reference article, ``S = sum(A @ W + B)``):
        >>> dS_dZ = torch.ones(4)
        >>> dZ_dW = torch.tensor([[1., 0, 2, 0, 3, 0], [0, 1, 0, 2, 0, 3],
        ...                       [4, 0, 5, 0, 6, 0], [0, 4, 0, 5, 0, 6]])
        >>> chain(dS_dZ, dZ_dW).reshape(3, 2)
        tensor([[5., 5.],
                [7., 7.],
                [9., 9.]])

    The same with ``dZ/dW = A ⊗ I_2`` kept structured (its 4 x 6 entries are never built):
        >>> from jacbatch import affine, structured_jacobian
        >>> from jacbatch.structured import sum_jacobian
        >>> A = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
        >>> dZ_dW = structured_jacobian(affine, A, torch.zeros(3, 2), torch.zeros(2), argnums=1,
        ...                             in_dims=None)
        >>> chain(dS_dZ, dZ_dW).reshape(3, 2)
        tensor([[5., 5.],
                [7., 7.],
                [9., 9.]])
        >>> dS_dW = chain(sum_jacobian((2, 2)), dZ_dW)
        >>> dS_dW
        KroneckerJacobian(1ᵀ·A: (1, 3) ⊗ 1ᵀ: (1, 2), dense (3, 2), 20 B vs 24 B)
        >>> dS_dW.to_dense()
        tensor([[5., 5.],
                [7., 7.],
                [9., 9.]])
    """
    where = "chain"
    if isinstance(outer, JacobianOperator) or isinstance(inner, JacobianOperator):
        return _chain_structured(outer, inner)
    V.check_tensor(where, "outer", outer)
    V.check_tensor(where, "inner", inner)
    if outer.ndim not in (1, 2, 3):
        raise ValueError(
            f"{where}: expected outer of shape (k,), (o, k) or (B, o, k), got {tuple(outer.shape)}."
        )
    if inner.ndim not in (2, 3):
        raise ValueError(
            f"{where}: expected inner of shape (k, i) or (B, k, i), got {tuple(inner.shape)}. "
            f"Flatten Jacobians with jacobian(..., vec='row') first."
        )
    if outer.shape[-1] != inner.shape[-2]:
        raise ValueError(
            f"{where}: expected outer (..., k) and inner (..., k, i) with the same k, got outer "
            f"{tuple(outer.shape)} and inner {tuple(inner.shape)}. The outer function's input must "
            f"be the inner function's output."
        )
    if outer.ndim == 3 and inner.ndim == 3 and outer.shape[0] != inner.shape[0]:
        raise ValueError(
            f"{where}: expected equal batch sizes, got outer batch {outer.shape[0]} and inner "
            f"batch {inner.shape[0]}."
        )
    if outer.dtype != inner.dtype:
        raise TypeError(f"{where}: expected one dtype, got {outer.dtype} and {inner.dtype}.")
    if outer.device != inner.device:
        raise ValueError(f"{where}: expected one device, got {outer.device} and {inner.device}.")
    if outer.ndim == 1:
        return outer @ inner if inner.ndim == 2 else torch.einsum("k,bki->bi", outer, inner)
    return torch.matmul(outer, inner)


def _chain_structured(
    outer: torch.Tensor | JacobianOperator, inner: torch.Tensor | JacobianOperator
) -> torch.Tensor | JacobianOperator:
    where = "chain"
    if isinstance(outer, JacobianOperator) and isinstance(inner, JacobianOperator):
        return outer @ inner
    if isinstance(outer, JacobianOperator):
        dense = V.check_tensor(where, "inner", inner)
        if dense.ndim not in (2, 3):
            raise ValueError(
                f"{where}: expected inner of shape (k, i) or (B, k, i), got "
                f"{tuple(dense.shape)}. Flatten Jacobians with jacobian(..., vec='row') first."
            )
        return outer._matmul_dense(dense)
    assert isinstance(inner, JacobianOperator)
    dense = V.check_tensor(where, "outer", outer)
    return inner._rmatmul_dense(dense)
