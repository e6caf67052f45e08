"""Closed-form Jacobians of ``Z = A @ W + B`` (:func:`jacbatch.affine`) as lettered terms.

Shapes per sample: ``A (m, p)``, ``W (p, q)``, ``B (q,)`` or ``(m, q)``, ``Z (m, q)``. The
derivation is NOTE [Kronecker Jacobian of A @ W + B] in :mod:`jacbatch.rules.write`; the terms
here are exactly what the op rules give when ``A @ W + B`` is traced (``mm`` then ``add``), and
the one writer writes them (its Kronecker fast path).

NOTE [Why affine keeps a registered rule]
    ``jacbatch.affine`` is plain code the op rules trace (``jacobian(lambda A, W, B: A @ W + B,
    ..., method="closed_form")`` gives the same Jacobian), but the traced route pays per call
    for what a known function does not need: evaluating the graph under ``vmap``, the value
    check against ``func`` (NOTE [The value check]) and a finiteness pass over the written
    Jacobian (a registered rule's entries are copies of its arguments'). Measured at the
    ``affine-small`` size (B=1024, m=p=q=8, float32, one thread) with the same writer: 3.1 ms
    registered against 4.5 ms traced for ``dZ/dW``, 0.9 ms against 3.0 ms for ``dZ/dB``; the
    benchmark targets are ratios to an allocate-and-fill of the output, so the registered
    rule stays. It builds terms (the one representation) and nothing else: no writer of its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..functions import affine
from . import register, register_structured
from .terms import Term, make


def _lead(x: torch.Tensor, batched: bool) -> torch.Tensor:
    return x if batched else x[None]


@register(affine, 1)
def affine_wrt_W(args: Sequence[torch.Tensor], batched: Sequence[bool]) -> list[Term]:
    """``dZ/dW``: ``A[b, i, k] δ(j, l)`` (``A ⊗ I_q`` row-major, ``I_q ⊗ A`` column-major)."""
    A, W = args[0], args[1]
    m, p = A.shape[-2:]
    q = W.shape[-1]
    return [make(_lead(A, batched[0]), "ik", "ij", "kj", (m, q), (p, q), A)]


@register(affine, 0)
def affine_wrt_A(args: Sequence[torch.Tensor], batched: Sequence[bool]) -> list[Term]:
    """``dZ/dA``: ``δ(i, k) W[b, l, j]`` (``I_m ⊗ Wᵀ`` row-major, ``Wᵀ ⊗ I_m`` column-major)."""
    A, W = args[0], args[1]
    m, p = A.shape[-2:]
    q = W.shape[-1]
    return [make(_lead(W, batched[1]), "lj", "ij", "il", (m, q), (m, p), W)]


@register(affine, 2)
def affine_wrt_B(args: Sequence[torch.Tensor], batched: Sequence[bool]) -> list[Term]:
    """``dZ/dB``: ``δ(j, l)`` (``1_m ⊗ I_q``) for ``B (q,)``; the identity for ``B (m, q)``."""
    A, W, Bias = args
    m, q = A.shape[-2], W.shape[-1]
    if Bias.ndim - (1 if batched[2] else 0) == 1:
        return [make(1.0, "", "ij", "j", (m, q), (q,), Bias)]
    return [make(1.0, "", "ij", "ij", (m, q), (m, q), Bias)]


# ---------------------------------------------------------------------------------------------
# Structured rules: the same Jacobians as named operators (jacbatch.structured), for their
# readable reprs (``A: (64, 64) ⊗ I_64``); nothing materialized.
# ---------------------------------------------------------------------------------------------

from ..structured import IdentityJacobian, JacobianOperator, KroneckerJacobian  # noqa: E402


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
