"""Layout and vectorization conventions, decided once.

Layout (as ``torch.func`` and JAX): the Jacobian of ``f: in_shape -> out_shape`` has shape
``(*out_shape, *in_shape)``; with a batch, ``(B, *out_shape, *in_shape)``.

``vec`` is row-major by default (``x.reshape(-1)``, PyTorch's order); column-major (Fortran order,
the textbook ``vec``) on request. For a matrix product the two orders give

* row-major:    ``vec(A X B) = (A ⊗ Bᵀ) vec(X)``
* column-major: ``vec(A X B) = (Bᵀ ⊗ A) vec(X)``

A flattened Jacobian has shape ``(B, out_numel, in_numel)`` with both axes in the same order.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

from . import _validation as V

Order = Literal["row", "col"]


def vec(X: torch.Tensor, order: Order = "row") -> torch.Tensor:
    """Flatten ``X`` into a vector.

    Args:
        X: tensor of any shape ``(d0, ..., dk)``.
        order: ``"row"`` (last index fastest, PyTorch's ``reshape(-1)``) or ``"col"``
            (first index fastest, Fortran / textbook order).

    Returns:
        Tensor of shape ``(d0 * ... * dk,)``. Row-major order returns a view when ``X`` is
        contiguous; column-major order returns a copy.

    Example:
        >>> A = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
        >>> vec(A)
        tensor([1, 2, 3, 4, 5, 6, 7, 8, 9])
        >>> vec(A, order="col")
        tensor([1, 4, 7, 2, 5, 8, 3, 6, 9])
    """
    V.check_tensor("vec", "X", X)
    V.check_order("vec", order)
    if order == "row":
        return X.reshape(-1)
    return X.permute(tuple(reversed(range(X.ndim)))).reshape(-1)


def unvec(
    v: torch.Tensor, shape: tuple[int, ...] | torch.Size, order: Order = "row"
) -> torch.Tensor:
    """Inverse of :func:`vec`: reshape a vector of ``prod(shape)`` elements to ``shape``.

    Args:
        v: tensor with ``prod(shape)`` elements (usually of shape ``(n,)``).
        shape: the target shape ``(d0, ..., dk)``.
        order: the order ``v`` was flattened in, ``"row"`` or ``"col"``.

    Returns:
        Tensor of shape ``shape`` with ``vec(unvec(v, shape, order), order) == v``.

    Example:
        >>> unvec(torch.tensor([1, 4, 7, 2, 5, 8, 3, 6, 9]), (3, 3), order="col")
        tensor([[1, 2, 3],
                [4, 5, 6],
                [7, 8, 9]])
    """
    V.check_tensor("unvec", "v", v)
    V.check_order("unvec", order)
    shape = V.check_shape_numel("unvec", "shape", shape, v.numel())
    if order == "row":
        return v.reshape(shape)
    rev = tuple(reversed(shape))
    return v.reshape(rev).permute(tuple(reversed(range(len(shape)))))


def commutation_matrix(
    m: int,
    n: int,
    order: Order = "row",
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The commutation matrix ``K`` with ``K @ vec(X) == vec(X.T)`` for every ``X`` of shape ``(m, n)``.

    Args:
        m: rows of ``X``.
        n: columns of ``X``.
        order: the vec order, ``"row"`` or ``"col"``. The row-major matrix for ``(m, n)`` is the
            column-major matrix for ``(n, m)`` (and the transpose of the one for ``(m, n)``).
        dtype: dtype of the result (default: ``torch.get_default_dtype()``).
        device: device of the result.

    Returns:
        Permutation matrix of shape ``(m * n, m * n)``.

    Example:
        >>> X = torch.arange(6.0).reshape(2, 3)
        >>> K = commutation_matrix(2, 3)
        >>> torch.equal(K @ vec(X), vec(X.T))
        True
    """
    m = V.check_nonneg_int("commutation_matrix", "m", m)
    n = V.check_nonneg_int("commutation_matrix", "n", n)
    V.check_order("commutation_matrix", order)
    # Row-major: vec(X)[i*n + j] = X[i, j] and vec(X.T)[j*m + i] = X[i, j], so K[j*m + i, i*n + j] = 1.
    idx = torch.arange(m * n, device=device).reshape(
        m, n
    )  # idx[i, j] = i*n + j = position in vec(X)
    perm = idx.T.reshape(-1)  # row j*m + i of K selects column i*n + j
    K = torch.zeros(m * n, m * n, dtype=dtype, device=device)
    K[torch.arange(m * n, device=device), perm] = 1
    return K if order == "row" else K.T.contiguous()


def flatten_jacobian(
    J: torch.Tensor, out_ndim: int, in_ndim: int, order: Order, batched: bool
) -> torch.Tensor:
    """Flatten a Jacobian in layout ``([B,] *out_shape, *in_shape)`` to ``([B,] out_numel, in_numel)``.

    Both the output and the input axes are vectorized in ``order``.
    """
    lead = 1 if batched else 0
    out_shape = J.shape[lead : lead + out_ndim]
    in_shape = J.shape[lead + out_ndim :]
    if order == "col":
        out_axes = [lead + k for k in reversed(range(out_ndim))]
        in_axes = [lead + out_ndim + k for k in reversed(range(in_ndim))]
        J = J.permute((*range(lead), *out_axes, *in_axes))
    return J.reshape(*J.shape[:lead], math.prod(out_shape), math.prod(in_shape))
