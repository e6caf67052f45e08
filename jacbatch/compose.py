"""The chain rule on flattened Jacobians."""

from __future__ import annotations

import torch

from . import _validation as V


def chain(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """Chain rule: ``d vec(h) / d vec(x) = (d vec(h) / d vec(y)) @ (d vec(y) / d vec(x))``.

    Both Jacobians must be flattened in the same vec order (``jacobian(..., vec="row")``).

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
    """
    where = "chain"
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
