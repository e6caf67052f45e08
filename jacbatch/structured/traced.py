"""Structured Jacobians of traced functions: :class:`TermJacobian`, a view over lettered terms.

The traced route composes a function's Jacobian from per-op rules as a list of lettered terms
(NOTE [Lettered Jacobian terms] in :mod:`jacbatch.rules.terms`): factors over index letters and
Kronecker deltas. :class:`TermJacobian` keeps that list and applies it lazily, so
``structured_jacobian(lambda A, W, B: torch.tanh(A @ W + B), A, W, B, argnums=1)`` holds the
``(B, m, q)`` derivative of ``tanh`` and ``A`` (a diagonal times a Kronecker product), never the
``(B, m, q, p, q)`` Jacobian.

NOTE [Applying terms lazily]
    A term ``c · Π F_f · Π δ`` applied to a stack of vectors ``x (B, N, *in)`` is one
    contraction ``y[b, n, out letters] = c · Σ x[b, n, in letters] Π F_f[b, letters of f]``:
    a letter shared by an input and an output axis (a delta) is simply the same einsum index,
    an input letter in no factor and on no output axis is summed, an output letter in no factor
    and on no input axis is broadcast. The order of the contraction comes from
    :func:`jacbatch.rules.terms.contract` (opt_einsum's path search when installed), so ``x``
    meets ``A`` first (an ``(m, q)`` result per vector) and the diagonal after. The transpose
    swaps the output and input letters of every term; ``to_dense`` is the one writer's
    out-of-place :func:`jacbatch.rules.write.dense`, the same entries the traced route writes.

NOTE [Named operators over one representation]
    Every operator is a list of lettered terms (:meth:`JacobianOperator.to_terms`): a Kronecker
    product is one term with two factors (an identity factor is a delta), a diagonal one factor
    and deltas, an identity, reshape or permutation deltas only, a dense Jacobian one factor.
    The named classes (``KroneckerJacobian``, ``DiagonalJacobian``, ...) stay as constructors
    with their own ``jvp`` / ``vjp`` and readable reprs (``A: (64, 64) ⊗ I_64``), and their
    products among themselves keep the merges users rely on (``(L1 ⊗ R1)(L2 ⊗ R2)`` stays one
    Kronecker product with named factors). As soon as a :class:`TermJacobian` takes part, the
    chain rule is the terms' one (:func:`jacbatch.rules.terms.chain_rule_sums`): letters are
    matched, factor lists concatenated, nothing dense formed. Holding the named operators as
    their own classes rather than re-deriving them from terms keeps their reprs and fused
    products exactly as documented, at the cost of a second (small) application path each.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import _validation as V
from ..rules import terms as T_
from ..rules import write
from ..rules.terms import Term, Unsupported
from .base import JacobianOperator
from .operators import DenseJacobian

__all__ = ["TermJacobian", "structured_jacobian"]


class TermJacobian(JacobianOperator):
    """A Jacobian held as a sum of lettered terms (what the traced route composes).

    Args:
        terms: the terms (:class:`jacbatch.rules.terms.Term`); their factors lead with a batch
            axis of size ``B`` or 1 (shared).
        out_shape: per-sample output shape.
        in_shape: per-sample input shape.
        batch_size: ``B``, or ``None`` for no batch.
        dtype: dtype of the Jacobian.
        device: device of the Jacobian.

    Usually built by :func:`jacbatch.structured_jacobian`; see NOTE [Applying terms lazily].
    """

    def __init__(
        self,
        terms: Sequence[Term],
        out_shape: Sequence[int],
        in_shape: Sequence[int],
        *,
        batch_size: int | None,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.out_shape = tuple(int(s) for s in out_shape)
        self.in_shape = tuple(int(s) for s in in_shape)
        self.terms: tuple[Term, ...] = tuple(T_.refined(terms, self.out_shape, self.in_shape))
        self.batch_size = batch_size
        self.dtype, self.device = dtype, device

    # -- application -----------------------------------------------------------------------
    def _apply_terms(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        """``(Bx, N, *src_shape) -> (B', N, *dst_shape)`` (``src`` is the input unless
        ``transpose``)."""
        dst_shape = self.in_shape if transpose else self.out_shape
        Bx, N = x.shape[0], x.shape[1]
        total: torch.Tensor | None = None
        for term in self.terms:
            src, dst = (term.out, term.inp) if transpose else (term.inp, term.out)
            xv = x.reshape(Bx, N, *(term.sizes[s] for s in src))
            nl = T_.fresh()
            ops: list[T_.Factor] = [(xv, (nl, *src)), *term.factors]
            present = {c for _, ls in ops for c in ls}
            unique = list(dict.fromkeys(dst))
            keep = [nl, *(c for c in unique if c in present)]
            Y = T_.contract(ops, keep)
            if term.scale != 1.0:
                Y = Y * term.scale
            # letters in no operand: broadcast; letters twice among dst axes: a diagonal
            view = [Y.shape[0], N, *(term.sizes[c] if c in present else 1 for c in unique)]
            Y = Y.reshape(view).expand(Y.shape[0], N, *(term.sizes[c] for c in unique))
            if len(unique) != len(dst):
                Z = Y.new_zeros(Y.shape[0], N, *(term.sizes[c] for c in dst))
                D, order = write._diagonal_view(Z, [nl, *dst])
                D.copy_(Y.permute(0, *(1 + ([nl, *unique]).index(c) for c in order)))
                Y = Z
            else:
                Y = Y.permute(0, 1, *(2 + unique.index(c) for c in dst))
            Y = Y.reshape(Y.shape[0], N, *dst_shape)
            total = Y if total is None else total + Y
        if total is None:
            return x.new_zeros(1, N, *dst_shape)
        return total

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_terms(x, transpose=False)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return self._apply_terms(y, transpose=True)

    def _transpose(self) -> TermJacobian:
        return TermJacobian(
            [t.transposed() for t in self.terms],
            self.in_shape,
            self.out_shape,
            batch_size=self.batch_size,
            dtype=self.dtype,
            device=self.device,
        )

    def _dense(self) -> torch.Tensor:
        b = max((t.batch for t in self.terms), default=1)
        like = torch.empty(0, dtype=self.dtype, device=self.device)
        return write.dense(self.terms, self.out_shape, self.in_shape, b, like)

    def _held(self) -> list[torch.Tensor]:
        held = []
        for term in self.terms:
            for T, _ in term.factors:  # broadcast (stride-0) axes hold one element
                idx = tuple(slice(0, 1) if st == 0 else slice(None) for st in T.stride())
                held.append(T[idx])
        return held

    def _describe(self) -> str:
        parts = []
        for term in self.terms:
            axes = term.out + term.inp
            deltas = sum(1 for c in dict.fromkeys(axes) if axes.count(c) > 1)
            desc = " · ".join(self._factor_note(T) for T, _ in term.factors) or "1"
            if term.scale != 1.0:
                desc = f"{term.scale:g} · {desc}"
            if deltas:
                desc += f" ⊗ δ×{deltas}"
            parts.append(desc)
        return " + ".join(parts) if parts else "0"

    def to_terms(self) -> list[Term]:
        return list(self.terms)

    def then(self, inner: TermJacobian) -> TermJacobian:
        """``self @ inner`` by the terms' chain rule (letters matched, nothing contracted
        beyond summed letters)."""
        batch = self.batch_size if self.batch_size is not None else inner.batch_size
        ts = T_.chain_rule_sums(self.terms, inner.terms)
        return TermJacobian(
            ts,
            self.out_shape,
            inner.in_shape,
            batch_size=batch,
            dtype=self.dtype,
            device=self.device,
        )


def structured_jacobian(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    argnums: int | tuple[int, ...],
    in_dims: int | tuple[int | None, ...] | None,
) -> JacobianOperator | tuple[JacobianOperator, ...]:
    """The implementation of :func:`jacbatch.structured_jacobian` (see there).

    A function with registered structured rules (:func:`jacbatch.affine`) gets those named
    operators; any other function is traced and its terms kept as a :class:`TermJacobian`.
    Where the graph cannot be traced into rules (an op without a rule, a random or state-writing
    function, a call inside a torch.func transform), the Jacobian is computed densely by
    :func:`jacbatch.jacobian` and held as a :class:`~jacbatch.structured.DenseJacobian`
    (correct, not compact).
    """
    from .. import api, plan, rules
    from ..methods import batched_args, in_transform

    where = "structured_jacobian"
    call = V.normalize_call(where, func, tuple(args), argnums, in_dims)
    probe = plan.probe_call(call)  # the function's own shape checks, on meta tensors
    out_shape = tuple(probe.out.shape)
    found = [rules.lookup_structured(call.func, a) for a in call.argnums]
    bargs, flags, B = batched_args(call)
    bargs = [x.detach() for x in bargs]
    if all(r is not None for r in found):
        with torch.no_grad():
            ops = tuple(r(bargs, flags, call.batch_size) for r in found)  # type: ignore[misc]
        return ops if call.tuple_argnums else ops[0]
    ts: list[list[Term]] | None = None
    if plan.untraceable(probe) is None and not in_transform(call.args):
        ts = _traced_terms(call, bargs, B)
    result: list[JacobianOperator] = []
    for k, a in enumerate(call.argnums):
        in_shape = call.sample_shape(a)
        if ts is not None:
            result.append(
                TermJacobian(
                    ts[k],
                    out_shape,
                    in_shape,
                    batch_size=call.batch_size,
                    dtype=call.dtype,
                    device=call.device,
                )
            )
            continue
        J = api.jacobian(func, *args, argnums=a, in_dims=in_dims)
        assert isinstance(J, torch.Tensor)
        result.append(DenseJacobian(J.detach(), out_shape, in_shape))
    ops = tuple(result)
    return ops if call.tuple_argnums else ops[0]


def _traced_terms(call: Any, bargs: list[torch.Tensor], B: int) -> list[list[Term]] | None:
    """The traced terms per argnum, or ``None`` where the graph does not trace into rules."""
    from .. import tracing
    from ..methods import traced as route

    try:
        tg = route.traced_graph(call)
        if not all(tg.analysis(a).ok for a in call.argnums):
            return None
        check = route._output_check(call, bargs)
        with torch.no_grad():
            return tracing.jacobian_terms(
                tg, call.argnums, [*bargs, *route.lifted_inputs(call)], B, check
            )
    except (Unsupported, route._Stale):
        return None
