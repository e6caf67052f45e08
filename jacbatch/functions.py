"""Matrix functions with known Jacobian structure: plain callables, one sample at a time.

Each function here has closed-form rules in :mod:`jacbatch.rules`, so
``jacobian(func, ..., method="closed_form")`` computes its Jacobian without autodiff. They are
ordinary torch code and work under ``torch.func`` transforms too.
"""

from __future__ import annotations

import torch

from . import _validation as V


def affine(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """``Z = A @ W + B`` for one sample.

    Args:
        A: ``(m, p)``.
        W: ``(p, q)``.
        B: ``(q,)``, broadcast over the rows of ``A @ W``, or ``(m, q)``.

    Returns:
        ``Z`` of shape ``(m, q)``.

    Closed-form Jacobians (row-major vec): ``dZ/dW = A ⊗ I_q``, ``dZ/dA = I_m ⊗ Wᵀ``,
    ``dZ/dB = 1_m ⊗ I_q`` for ``B (q,)`` (the identity for ``B (m, q)``).

    Example:
        >>> A = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
        >>> W = torch.tensor([[7., 8.], [10., 11.], [12., 13.]])
        >>> affine(A, W, torch.tensor([13., 14.]))
        tensor([[ 76.,  83.],
                [163., 179.]])
    """
    V.check_affine_shapes(A, W, B)
    return A @ W + B
