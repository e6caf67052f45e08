"""Chain rule and sums of structured operators: :func:`compose`, :class:`ComposedJacobian`,
:class:`SumJacobian`, :func:`sum_jacobian`."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch

from .. import _validation as V
from ..rules.terms import Term, chain_rule_sums, merge
from .base import Factor, JacobianOperator, _lead
from .operators import (
    DenseJacobian,
    DiagonalJacobian,
    IdentityJacobian,
    KroneckerJacobian,
    PermuteJacobian,
    _factor_mul,
)

# ---------------------------------------------------------------------------------------------
# Composition and sums
# ---------------------------------------------------------------------------------------------


def _check_same_kind(where: str, ops: Sequence[JacobianOperator]) -> None:
    for op in ops[1:]:
        V.check_same_dtype_device(
            where, "every operand", op.dtype, op.device, ops[0].dtype, ops[0].device
        )


class ComposedJacobian(JacobianOperator):
    """The product ``F0 @ F1 @ ... @ Fk`` of operators (the chain rule), kept unevaluated.

    ``jvp`` applies the factors innermost first, ``vjp`` outermost first; nothing is ever
    materialized beyond one vector per sample. Usually built by :func:`compose` (``@``), which
    first merges neighbours whose product stays structured.

    Args:
        factors: outermost first; ``factors[j].in_shape == factors[j + 1].out_shape``. Factors
            without a batch are shared by the batch of the others.
    """

    def __init__(self, factors: Sequence[JacobianOperator]) -> None:
        where = "ComposedJacobian"
        V.check_operator_list(where, "factors", factors, JacobianOperator)
        flat: list[JacobianOperator] = []
        for f in factors:
            flat.extend(f.factors if isinstance(f, ComposedJacobian) else [f])
        _check_same_kind(where, flat)
        batch: int | None = None
        for outer, inner in itertools.pairwise(flat):
            V.check_compose(
                where, outer.in_shape, inner.out_shape, outer.batch_size, inner.batch_size
            )
        for f in flat:
            if f.batch_size is not None:
                if batch is not None and f.batch_size != batch:
                    V.check_compose(where, (), (), batch, f.batch_size)
                batch = f.batch_size
        self.factors: tuple[JacobianOperator, ...] = tuple(flat)
        self.batch_size = batch
        self.out_shape, self.in_shape = flat[0].out_shape, flat[-1].in_shape
        self.dtype, self.device = flat[0].dtype, flat[0].device

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        for f in reversed(self.factors):
            x = f._matvec(x)
        return x

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        for f in self.factors:
            y = f._rmatvec(y)
        return y

    def _transpose(self) -> ComposedJacobian:
        new = ComposedJacobian([f.T for f in reversed(self.factors)])
        new.batch_size = self.batch_size
        return new

    def _dense(self) -> torch.Tensor:
        last = self.factors[-1]
        J = last._dense()
        J = J.reshape(J.shape[0], last.out_numel, last.in_numel)  # (B', k, i)
        n = J.shape[-1]
        for f in reversed(self.factors[:-1]):
            x = J.mT.reshape(J.shape[0], n, *f.in_shape)  # the i columns as vectors
            J = f._matvec(x)
            J = J.reshape(J.shape[0], n, f.out_numel).mT
        return J.reshape(J.shape[0], *self.out_shape, *self.in_shape)

    def to_terms(self) -> list[Term] | None:
        parts = [f.to_terms() for f in self.factors]
        if any(p is None for p in parts):
            return None
        ts = parts[-1]
        for p in reversed(parts[:-1]):
            ts = chain_rule_sums(p, ts)  # type: ignore[arg-type]
        return ts

    def _held(self) -> list[torch.Tensor]:
        return [t for f in self.factors for t in f._held()]

    def _describe(self) -> str:
        return " @ ".join(f._with_batch(self.batch_size)._short() for f in self.factors)


class SumJacobian(JacobianOperator):
    """``J1 + J2 + ...`` of operators of one shape (e.g. a variable used twice), unevaluated.

    Args:
        terms: operators with equal ``out_shape`` and ``in_shape``; ones without a batch are
            shared by the batch of the others.
    """

    def __init__(self, terms: Sequence[JacobianOperator]) -> None:
        where = "SumJacobian"
        V.check_operator_list(where, "terms", terms, JacobianOperator)
        flat: list[JacobianOperator] = []
        for t in terms:
            flat.extend(t.terms if isinstance(t, SumJacobian) else [t])
        _check_same_kind(where, flat)
        batch: int | None = None
        first = flat[0]
        for t in flat:
            V.check_sum_operands(
                where,
                (first.out_shape, first.in_shape),
                (t.out_shape, t.in_shape),
                batch,
                t.batch_size,
            )
            batch = t.batch_size if t.batch_size is not None else batch
        self.terms: tuple[JacobianOperator, ...] = tuple(flat)
        self.batch_size = batch
        self.out_shape, self.in_shape = first.out_shape, first.in_shape
        self.dtype, self.device = first.dtype, first.device

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        ys = [t._matvec(x) for t in self.terms]
        return _bsum(ys)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        xs = [t._rmatvec(y) for t in self.terms]
        return _bsum(xs)

    def _transpose(self) -> SumJacobian:
        new = SumJacobian([t.T for t in self.terms])
        new.batch_size = self.batch_size
        return new

    def _dense(self) -> torch.Tensor:
        return _bsum([t._dense() for t in self.terms])

    def to_terms(self) -> list[Term] | None:
        parts = [t.to_terms() for t in self.terms]
        if any(p is None for p in parts):
            return None
        return merge([t for p in parts for t in p])  # type: ignore[union-attr]

    def _held(self) -> list[torch.Tensor]:
        return [h for t in self.terms for h in t._held()]

    def _describe(self) -> str:
        return " + ".join(t._with_batch(self.batch_size)._short() for t in self.terms)


def _bsum(ts: Sequence[torch.Tensor]) -> torch.Tensor:
    out = ts[0]
    for t in ts[1:]:
        out = out + t  # broadcasts a shared (1, ...) with a batched (B, ...)
    return out


def compose(outer: JacobianOperator, inner: JacobianOperator) -> JacobianOperator:
    """The chain rule ``d h/d x = (d h/d y) @ (d y/d x)`` on operators, structured where possible.

    Merges: identity with anything; diagonal @ diagonal -> diagonal; Kronecker @ Kronecker with
    matching splits -> Kronecker (``(L1 L2) ⊗ (R1 R2)``); dense @ dense -> dense; a dense factor
    absorbs a neighbour when the result is no larger. Anything else (diagonal @ Kronecker, ...)
    becomes a :class:`ComposedJacobian`, which stays lazy.

    Args:
        outer: ``d h/d y`` with ``in_shape == inner.out_shape``.
        inner: ``d y/d x``.

    Returns:
        An operator for ``d h/d x`` with ``out_shape = outer.out_shape``,
        ``in_shape = inner.in_shape`` and the batch of either (an operator without a batch is
        shared).
    """
    where = "compose"
    V.check_operator(where, "outer", outer, JacobianOperator)
    V.check_operator(where, "inner", inner, JacobianOperator)
    V.check_compose(where, outer.in_shape, inner.out_shape, outer.batch_size, inner.batch_size)
    V.check_same_dtype_device(where, "inner", inner.dtype, inner.device, outer.dtype, outer.device)
    batch = outer.batch_size if outer.batch_size is not None else inner.batch_size
    with torch.no_grad():
        fused = _fuse(outer, inner, batch)
    if fused is not None:
        return fused
    return ComposedJacobian([outer, inner])


def _fuse(
    outer: JacobianOperator, inner: JacobianOperator, batch: int | None
) -> JacobianOperator | None:
    """``outer @ inner`` as one operator when that stays structured, else ``None``."""
    if isinstance(outer, ComposedJacobian) or isinstance(inner, ComposedJacobian):
        left = list(outer.factors) if isinstance(outer, ComposedJacobian) else [outer]
        right = list(inner.factors) if isinstance(inner, ComposedJacobian) else [inner]
        mid = _fuse(left[-1], right[0], batch)
        if mid is None:
            return None
        parts = [*left[:-1], mid, *right[1:]]
        if len(parts) == 1:
            return parts[0]._with_batch(batch)
        new = ComposedJacobian(parts)
        new.batch_size = batch
        return new
    from .traced import TermJacobian

    if isinstance(outer, TermJacobian) or isinstance(inner, TermJacobian):
        lo, li = outer.to_terms(), inner.to_terms()
        if lo is not None and li is not None:  # the terms' chain rule: stays terms
            return TermJacobian(
                chain_rule_sums(lo, li),
                outer.out_shape,
                inner.in_shape,
                batch_size=batch,
                dtype=outer.dtype,
                device=outer.device,
            )
    if isinstance(outer, IdentityJacobian):
        return _reshaped(inner, batch, out_shape=outer.out_shape)
    if isinstance(inner, IdentityJacobian):
        return _reshaped(outer, batch, in_shape=inner.in_shape)
    if isinstance(outer, PermuteJacobian) and isinstance(inner, PermuteJacobian):
        dims = tuple(inner.dims[d] for d in outer.dims)  # x.permute(d1).permute(d2)
        if dims == tuple(range(len(dims))):
            return IdentityJacobian(
                inner.in_shape, batch_size=batch, dtype=outer.dtype, device=outer.device
            )
        return PermuteJacobian(
            inner.in_shape, dims, batch_size=batch, dtype=outer.dtype, device=outer.device
        )
    if isinstance(outer, DiagonalJacobian) and isinstance(inner, DiagonalJacobian):
        d = outer.diag * inner.diag
        if _lead(d) == 1:  # shared by the batch (or no batch)
            return DiagonalJacobian(d[0], batch_size=batch)
        return DiagonalJacobian(d, batched=True, batch_size=batch)
    if (
        isinstance(outer, KroneckerJacobian)
        and isinstance(inner, KroneckerJacobian)
        and outer.in_split == inner.out_split
    ):
        return KroneckerJacobian(
            _factor_mul(outer.left, inner.left),
            _factor_mul(outer.right, inner.right),
            out_shape=outer.out_shape,
            in_shape=inner.in_shape,
            batch_size=batch,
            labels=_merge_labels(outer, inner),
            dtype=outer.dtype,
            device=outer.device,
        )
    if isinstance(inner, DenseJacobian) and outer.out_numel <= outer.in_numel:
        J = inner.flat  # (1 | B, k, i): its i columns through outer
        n = J.shape[-1]
        x = J.mT.reshape(J.shape[0], n, *outer.in_shape)
        flat = outer._matvec(x)
        flat = flat.reshape(flat.shape[0], n, outer.out_numel).mT
        return DenseJacobian.from_flat(flat, outer.out_shape, inner.in_shape, batch)
    if isinstance(outer, DenseJacobian) and inner.in_numel <= inner.out_numel:
        J = outer.flat  # (1 | B, o, k): its o rows through inner
        n = J.shape[1]
        y = J.reshape(J.shape[0], n, *inner.out_shape)
        flat = inner._rmatvec(y)
        flat = flat.reshape(flat.shape[0], n, inner.in_numel)
        return DenseJacobian.from_flat(flat, outer.out_shape, inner.in_shape, batch)
    return None


def _reshaped(
    op: JacobianOperator,
    batch: int | None,
    out_shape: tuple[int, ...] | None = None,
    in_shape: tuple[int, ...] | None = None,
) -> JacobianOperator | None:
    """``op`` with its output or input reshaped (an identity or reshape composed with it)."""
    outs = op.out_shape if out_shape is None else out_shape
    ins = op.in_shape if in_shape is None else in_shape
    if (outs, ins) == (op.out_shape, op.in_shape):
        return op._with_batch(batch)
    if isinstance(op, IdentityJacobian):
        if outs == ins:
            return IdentityJacobian(ins, batch_size=batch, dtype=op.dtype, device=op.device)
        return IdentityJacobian(
            ins, out_shape=outs, batch_size=batch, dtype=op.dtype, device=op.device
        )
    if isinstance(op, KroneckerJacobian):
        new = copy.copy(op)
        new.out_shape, new.in_shape, new.batch_size = outs, ins, batch
        return new
    if isinstance(op, DenseJacobian):
        return DenseJacobian.from_flat(op.flat, outs, ins, batch)
    return None


def _merge_labels(outer: KroneckerJacobian, inner: KroneckerJacobian) -> tuple[str, str]:
    def one(f: Factor, g: Factor, a: str, b: str) -> str:
        if isinstance(f, int):
            return b
        if isinstance(g, int):
            return a
        return f"{a}·{b}"

    return (
        one(outer.left, inner.left, outer.labels[0], inner.labels[0]),
        one(outer.right, inner.right, outer.labels[1], inner.labels[1]),
    )


def sum_jacobian(
    shape: Sequence[int],
    *,
    batch_size: int | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> JacobianOperator:
    """The Jacobian of ``x.sum()`` for ``x`` of ``shape``: a row of ones, ``out_shape = ()``.

    Held as ``1ᵀ_a ⊗ 1ᵀ_c`` with ``(a, c) = (prod(shape[:-1]), shape[-1])``, which is the split of
    a matrix output such as ``A @ W + B``, so ``sum_jacobian(Z.shape) @ dZ/dW`` stays Kronecker.

    Args:
        shape: per-sample shape of the summed tensor.
        batch_size: ``B`` for a batched chain, or ``None``.
        dtype: dtype (default: torch's default dtype).
        device: device (default: CPU).

    Example:
        >>> sum_jacobian((2, 3), dtype=torch.float64).to_dense()
        tensor([[1., 1., 1.],
                [1., 1., 1.]], dtype=torch.float64)
    """
    dims = tuple(int(s) for s in shape)
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    if len(dims) == 0:
        return IdentityJacobian((), batch_size=batch_size, dtype=dtype, device=device)
    a, c = math.prod(dims[:-1]), dims[-1]
    ones_a = torch.ones(1, a, dtype=dtype, device=device)
    ones_c = torch.ones(1, c, dtype=dtype, device=device)
    return KroneckerJacobian(
        ones_a,
        ones_c,
        out_shape=(),
        in_shape=dims,
        batch_size=batch_size,
        labels=("1ᵀ", "1ᵀ"),
    )
