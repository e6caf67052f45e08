"""The shared interface of structured Jacobian operators (see :mod:`jacbatch.structured`)."""

from __future__ import annotations

import copy
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .. import _validation as V
from .. import conventions
from ..memory import format_bytes

if TYPE_CHECKING:
    from ..rules.terms import Term

Factor = torch.Tensor | int  # a (1 | B, r, c) matrix, or n for I_n


def _lead(t: torch.Tensor) -> int:
    return int(t.shape[0])


class JacobianOperator(ABC):
    """A Jacobian held in structured form; see the module docstring for the shared interface.

    Attributes:
        out_shape: per-sample output shape of the function.
        in_shape: per-sample shape of the differentiated input.
        batch_size: ``B``, or ``None`` for an operator without a batch.
        dtype: dtype of the Jacobian.
        device: device of the Jacobian.
    """

    out_shape: tuple[int, ...]
    in_shape: tuple[int, ...]
    batch_size: int | None
    dtype: torch.dtype
    device: torch.device

    # -- to implement ----------------------------------------------------------------------
    @abstractmethod
    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        """``(Bx, N, *in_shape) -> (B', N, *out_shape)``."""

    @abstractmethod
    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        """``(By, N, *out_shape) -> (B', N, *in_shape)``."""

    @abstractmethod
    def _transpose(self) -> JacobianOperator:
        """The transposed operator (see :attr:`T`)."""

    @abstractmethod
    def _dense(self) -> torch.Tensor:
        """``(1 | B, *out_shape, *in_shape)``."""

    @abstractmethod
    def _held(self) -> list[torch.Tensor]:
        """The tensors this operator holds (for ``nbytes``)."""

    def to_terms(self) -> list[Term] | None:
        """The Jacobian as lettered terms (:mod:`jacbatch.rules.terms`), or ``None``.

        Every named operator is a term list (a Kronecker product: two factors; a diagonal: one
        factor and deltas; an identity, reshape or permutation: deltas only), so the chain rule
        with a :class:`~jacbatch.structured.TermJacobian` stays terms.
        """
        return None

    def _like(self) -> torch.Tensor:
        return torch.empty(0, dtype=self.dtype, device=self.device)

    @abstractmethod
    def _describe(self) -> str:
        """The structure, e.g. ``'A: (64, 64) ⊗ I_64'``."""

    # -- shared interface ------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, ...]:
        """The dense shape this operator stands for: ``(B, *out_shape, *in_shape)`` or no ``B``."""
        lead = () if self.batch_size is None else (self.batch_size,)
        return (*lead, *self.out_shape, *self.in_shape)

    @property
    def out_numel(self) -> int:
        return math.prod(self.out_shape)

    @property
    def in_numel(self) -> int:
        return math.prod(self.in_shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors the operator holds (each distinct tensor counted once)."""
        seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
        total = 0
        for t in self._held():
            key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
            if key in seen:
                continue
            seen.add(key)
            total += t.numel() * t.element_size()
        return total

    @property
    def dense_nbytes(self) -> int:
        """Bytes of the dense Jacobian, ``prod(shape) * element_size``."""
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()

    @property
    def T(self) -> JacobianOperator:
        """The transpose: ``(B, *in_shape, *out_shape)``; its ``jvp`` is this operator's ``vjp``."""
        return self._transpose()

    def to_dense(self, vec: str | None = None) -> torch.Tensor:
        """Materialize the Jacobian, exactly as ``jacobian(..., method="closed_form", vec=vec)``.

        Args:
            vec: ``None`` for ``(B, *out_shape, *in_shape)``; ``"row"`` / ``"col"`` for
                ``(B, out_numel, in_numel)`` in that vec order. No ``B`` without a batch.

        Returns:
            A new contiguous tensor of that shape.
        """
        vec = V.check_vec(f"{type(self).__name__}.to_dense", vec)
        with torch.no_grad():
            J = self._dense()
            if self.batch_size is None:
                J = J[0]
            elif _lead(J) != self.batch_size:
                J = J.expand(self.batch_size, *J.shape[1:])
            if vec is not None:
                J = conventions.flatten_jacobian(
                    J,
                    len(self.out_shape),
                    len(self.in_shape),
                    vec,  # type: ignore[arg-type]
                    batched=self.batch_size is not None,
                )
            return J.contiguous()

    def jvp(self, tangent: torch.Tensor) -> torch.Tensor:
        """Jacobian-vector product ``J·t`` per sample.

        Args:
            tangent: ``(B, *in_shape)``, or ``in_shape`` (shared by the batch). Without a batch,
                ``in_shape`` or a stack ``(N, *in_shape)``.

        Returns:
            ``(B, *out_shape)`` (or ``(N, *out_shape)``), or ``out_shape`` for one vector without
            a batch.
        """
        return self._apply("jvp", "tangent", tangent, "input")

    def vjp(self, cotangent: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian product ``cᵀ·J`` per sample.

        Args:
            cotangent: ``(B, *out_shape)``, or ``out_shape`` (shared by the batch). Without a
                batch, ``out_shape`` or a stack ``(N, *out_shape)``.

        Returns:
            ``(B, *in_shape)`` (or ``(N, *in_shape)``), or ``in_shape`` for one vector without
            a batch.
        """
        return self._apply("vjp", "cotangent", cotangent, "output")

    def _apply(self, op: str, name: str, v: torch.Tensor, side: str) -> torch.Tensor:
        """``jvp`` (``side="input"``) or ``vjp`` (``side="output"``) of ``v``, checked."""
        forward = side == "input"
        shape, result_shape = (
            (self.in_shape, self.out_shape) if forward else (self.out_shape, self.in_shape)
        )
        fn = self._matvec if forward else self._rmatvec
        batched = V.check_operator_operand(
            f"{type(self).__name__}.{op}",
            name,
            v,
            shape,
            self.batch_size,
            self.dtype,
            self.device,
            side,
        )
        with torch.no_grad():
            v = v.detach()
            if self.batch_size is None:
                x = v.unsqueeze(0) if batched else v[None, None]  # (1, N, *shape)
                y = fn(x)[0]
                return (y if batched else y[0]).contiguous()
            x = v.unsqueeze(1) if batched else v[None, None]  # (B | 1, 1, *shape)
            y = fn(x)[:, 0]
            return y.expand(self.batch_size, *result_shape).contiguous()

    def _matmul_dense(self, X: torch.Tensor) -> torch.Tensor:
        """``op @ X`` with ``X`` ``(i,)``, ``(i, n)`` or ``(B, i, n)`` (row-major vec)."""
        V.check_dense_matmul(
            "JacobianOperator @ tensor",
            X,
            "right",
            self.in_numel,
            self.batch_size,
            self.dtype,
            self.device,
        )
        with torch.no_grad():
            Xb = X.detach()
            if Xb.ndim == 1:
                Xb = Xb[None, :, None]
            elif Xb.ndim == 2:
                Xb = Xb[None]
            n = Xb.shape[-1]
            x = Xb.mT.reshape(Xb.shape[0], n, *self.in_shape)
            y = self._matvec(x)
            y = y.reshape(y.shape[0], n, self.out_numel).mT  # (B', o, n)
            return self._finish_dense(y, X.ndim)

    def _rmatmul_dense(self, X: torch.Tensor) -> torch.Tensor:
        """``X @ op`` with ``X`` ``(o,)``, ``(n, o)`` or ``(B, n, o)`` (row-major vec)."""
        V.check_dense_matmul(
            "tensor @ JacobianOperator",
            X,
            "left",
            self.out_numel,
            self.batch_size,
            self.dtype,
            self.device,
        )
        with torch.no_grad():
            Xb = X.detach()
            if Xb.ndim == 1:
                Xb = Xb[None, None]
            elif Xb.ndim == 2:
                Xb = Xb[None]
            n = Xb.shape[1]
            y = self._rmatvec(Xb.reshape(Xb.shape[0], n, *self.out_shape))
            return self._finish_dense(y.reshape(y.shape[0], n, self.in_numel), X.ndim)

    def _finish_dense(self, y: torch.Tensor, x_ndim: int) -> torch.Tensor:
        """``(B', r, c)`` -> the documented result shape of ``@`` with a dense operand."""
        batched = x_ndim == 3 or self.batch_size is not None
        if batched:
            B = self.batch_size if self.batch_size is not None else _lead(y)
            y = y.expand(B, *y.shape[1:])
            if x_ndim == 1:  # (B, o, 1) or (B, 1, i)
                y = y.reshape(B, y.shape[1] * y.shape[2])
            return y.contiguous()
        y = y[0]
        return (y.reshape(-1) if x_ndim == 1 else y).contiguous()

    def __matmul__(self, other: object) -> JacobianOperator | torch.Tensor:
        if isinstance(other, JacobianOperator):
            from .composition import compose

            return compose(self, other)
        if isinstance(other, torch.Tensor):
            return self._matmul_dense(other)
        return NotImplemented

    def __rmatmul__(self, other: object) -> torch.Tensor:
        if isinstance(other, torch.Tensor):
            return self._rmatmul_dense(other)
        return NotImplemented

    def __add__(self, other: object) -> JacobianOperator:
        if isinstance(other, JacobianOperator):
            from .composition import SumJacobian

            return SumJacobian([self, other])
        return NotImplemented

    def _with_batch(self, batch_size: int | None) -> JacobianOperator:
        """This operator standing for a batch of ``batch_size`` (its data shared)."""
        if batch_size == self.batch_size:
            return self
        new = copy.copy(self)
        new.batch_size = batch_size
        return new

    def __repr__(self) -> str:
        batch = "" if self.batch_size is None else f"batch={self.batch_size}, "
        return (
            f"{type(self).__name__}({batch}{self._describe()}, dense {self.shape}, "
            f"{format_bytes(self.nbytes)} vs {format_bytes(self.dense_nbytes)})"
        )

    def _short(self) -> str:
        return f"{type(self).__name__.removesuffix('Jacobian')}[{self._describe()}]"

    def _factor_note(self, t: torch.Tensor) -> str:
        shape = tuple(t.shape[1:])
        shared = self.batch_size is not None and _lead(t) == 1 and self.batch_size != 1
        return f"{shape}" + (" shared" if shared else "")


def _infer_batch(where: str, batch_size: int | None, found: Sequence[int | None]) -> int | None:
    return V.check_batch_sizes(where, batch_size, found)


def _common_dtype_device(
    where: str, tensors: Sequence[torch.Tensor]
) -> tuple[torch.dtype, torch.device] | None:
    if not tensors:
        return None
    dtype, device = tensors[0].dtype, tensors[0].device
    for t in tensors[1:]:
        V.check_same_dtype_device(where, "every factor", t.dtype, t.device, dtype, device)
    return dtype, device
