"""Structured (lazy) Jacobians: keep Kronecker and diagonal structure instead of materializing it.

A dense Jacobian of ``Z = A @ W + B`` w.r.t. ``W`` has ``B·m·q·p·q`` entries but is fully
described by ``A`` (``B·m·p`` numbers) and ``q``: it is ``A ⊗ I_q``. The operators here hold only
such factors and apply them on demand. :func:`jacbatch.structured_jacobian` returns them for
functions with structured rules; the constructors below are public so that other code (a tracer,
a user's own rule) can build operators and compose them with the chain rule.

Every operator stands for the Jacobian of ``f: in_shape -> out_shape``, for a batch of ``B``
samples or without a batch, and has

* ``shape``: the dense shape it stands for, ``(B, *out_shape, *in_shape)`` (no ``B`` without a
  batch), exactly the shape :func:`jacbatch.jacobian` would return;
* ``dtype``, ``device``, ``nbytes`` (the bytes it holds) and ``dense_nbytes``;
* ``to_dense(vec=None | "row" | "col")``: identical to ``jacobian(..., method="closed_form")``;
* ``jvp(tangent)`` (``J·t``), ``vjp(cotangent)`` (``cᵀ·J``) and ``T`` (the transpose);
* ``@`` with another operator (the chain rule, :func:`compose`) or with a dense tensor (a
  flattened Jacobian or vector in row-major vec order), and ``+`` with another operator.

NOTE [Structured Jacobian operators]
    Batch. Every stored tensor has a leading batch dimension of size ``B`` (one factor per sample)
    or ``1`` (shared by the whole batch), so one broadcasting code path serves batched and shared
    factors. An operator whose ``batch_size`` is ``None`` has no batch; it composes with batched
    operators as a shared one.

    Application. Internally, ``_matvec`` maps a stack ``x`` of shape ``(Bx, N, *in_shape)``
    (``Bx`` in ``{1, B}``, ``N`` vectors per sample) to ``(B', N, *out_shape)`` and ``_rmatvec``
    maps ``(By, N, *out_shape)`` to ``(B', N, *in_shape)``, where ``B'`` is the broadcast batch.
    ``jvp``/``vjp`` use ``N = 1``; ``op @ X`` and ``to_dense`` of a composition use ``N`` columns.

    Kronecker. With row-major vec and ``out_shape`` read as ``(a, c)``, ``in_shape`` as
    ``(b, d)``, ``(L ⊗ R)[(i, j), (k, l)] = L[i, k] R[j, l]``, so
    ``(L ⊗ R) vec(X) = vec(L X Rᵀ)`` and ``vec(Y)ᵀ (L ⊗ R) = vec(Lᵀ Y R)ᵀ``: two small matrix
    products per sample instead of one product with ``a·c·b·d`` entries. Products of Kronecker
    operators whose inner splits agree stay Kronecker:
    ``(L1 ⊗ R1)(L2 ⊗ R2) = (L1 L2) ⊗ (R1 R2)``, and ``(L ⊗ R)ᵀ = Lᵀ ⊗ Rᵀ``.

Example:
    >>> A = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
    >>> J = KroneckerJacobian(A, 2, in_shape=(3, 2), labels=("A", None))
    >>> J
    KroneckerJacobian(A: (2, 3) ⊗ I_2, dense (2, 2, 3, 2), 24 B vs 96 B)
    >>> (sum_jacobian((2, 2), dtype=A.dtype) @ J).to_dense()  # d sum(A @ W) / dW
    tensor([[5., 5.],
            [7., 7.],
            [9., 9.]])
"""

from __future__ import annotations

import torch  # noqa: F401  (the doctests above use it)

from ..memory import format_bytes  # noqa: F401  (re-exported for the benchmarks)
from .base import JacobianOperator
from .composition import ComposedJacobian, SumJacobian, compose, sum_jacobian
from .operators import (
    DenseJacobian,
    DiagonalJacobian,
    IdentityJacobian,
    KroneckerJacobian,
    PermuteJacobian,
)
from .traced import TermJacobian

__all__ = [
    "ComposedJacobian",
    "DenseJacobian",
    "DiagonalJacobian",
    "IdentityJacobian",
    "JacobianOperator",
    "KroneckerJacobian",
    "PermuteJacobian",
    "SumJacobian",
    "TermJacobian",
    "compose",
    "sum_jacobian",
]
