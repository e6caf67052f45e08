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

import copy
import itertools
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch

from .. import _validation as V
from .. import conventions
from ..memory import format_bytes

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
        layout = V.check_vec(f"{type(self).__name__}.to_dense", vec)
        with torch.no_grad():
            J = self._dense()
            if self.batch_size is None:
                J = J[0]
            elif _lead(J) != self.batch_size:
                J = J.expand(self.batch_size, *J.shape[1:])
            if layout is not None:
                J = conventions.flatten_jacobian(
                    J,
                    len(self.out_shape),
                    len(self.in_shape),
                    layout,  # type: ignore[arg-type]
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
        where = f"{type(self).__name__}.jvp"
        batched = V.check_operator_operand(
            where,
            "tangent",
            tangent,
            self.in_shape,
            self.batch_size,
            self.dtype,
            self.device,
            "input",
        )
        with torch.no_grad():
            return self._apply(tangent.detach(), batched, self._matvec, self.out_shape)

    def vjp(self, cotangent: torch.Tensor) -> torch.Tensor:
        """Vector-Jacobian product ``cᵀ·J`` per sample.

        Args:
            cotangent: ``(B, *out_shape)``, or ``out_shape`` (shared by the batch). Without a
                batch, ``out_shape`` or a stack ``(N, *out_shape)``.

        Returns:
            ``(B, *in_shape)`` (or ``(N, *in_shape)``), or ``in_shape`` for one vector without
            a batch.
        """
        where = f"{type(self).__name__}.vjp"
        batched = V.check_operator_operand(
            where,
            "cotangent",
            cotangent,
            self.out_shape,
            self.batch_size,
            self.dtype,
            self.device,
            "output",
        )
        with torch.no_grad():
            return self._apply(cotangent.detach(), batched, self._rmatvec, self.in_shape)

    def _apply(
        self,
        v: torch.Tensor,
        batched: bool,
        fn: Callable[[torch.Tensor], torch.Tensor],
        result_shape: tuple[int, ...],
    ) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------
# Kronecker
# ---------------------------------------------------------------------------------------------


def _factor_rows_cols(f: Factor) -> tuple[int, int]:
    if isinstance(f, int):
        return f, f
    return int(f.shape[-2]), int(f.shape[-1])


def _factor_mul(f: Factor, g: Factor) -> Factor:
    """Product of two factors (``int`` n is ``I_n``), batches broadcast."""
    if isinstance(f, int):
        return g
    if isinstance(g, int):
        return f
    return torch.matmul(f, g)


def _factor_t(f: Factor) -> Factor:
    return f if isinstance(f, int) else f.mT


def _factor_dense(f: Factor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(f, int):
        return torch.eye(f, dtype=dtype, device=device)[None]
    return f


class KroneckerJacobian(JacobianOperator):
    """``L ⊗ R`` per sample in row-major vec: ``J[i, j, k, l] = L[i, k] R[j, l]``.

    The Jacobians of ``Z = A @ W + B`` are of this form: ``dZ/dW = A ⊗ I_q``,
    ``dZ/dA = I_m ⊗ Wᵀ``, ``dZ/dB = 1_m ⊗ I_q``. Applying it costs two small matrix products
    per sample (see NOTE [Structured Jacobian operators]).

    Args:
        left: ``L``: a matrix ``(a, b)`` shared by the batch, a batch of them ``(B, a, b)`` (a
            leading 1 also means shared), or an int ``a`` for ``I_a``.
        right: ``R``: ``(c, d)``, ``(B, c, d)`` or an int ``c`` for ``I_c``.
        out_shape: per-sample output shape with ``a·c`` elements (default ``(a, c)``).
        in_shape: per-sample input shape with ``b·d`` elements (default ``(b, d)``).
        batch_size: ``B`` for a batch whose samples share every factor; inferred from a batched
            factor otherwise. ``None`` (and no batched factor): no batch.
        labels: names of the two factors for ``repr`` (``None`` keeps ``"L"`` / ``"R"``).
        dtype: dtype when both factors are identities (default: torch's default dtype).
        device: device when both factors are identities (default: CPU).

    The operator keeps references to the factor tensors (no copy): modifying them in place
    changes the operator.

    Example:
        >>> A = torch.arange(6.0).reshape(2, 3)
        >>> J = KroneckerJacobian(A, 2, in_shape=(3, 2))
        >>> X = torch.ones(3, 2)
        >>> torch.equal(J.jvp(X), A @ X)
        True
    """

    def __init__(
        self,
        left: torch.Tensor | int,
        right: torch.Tensor | int,
        *,
        out_shape: Sequence[int] | None = None,
        in_shape: Sequence[int] | None = None,
        batch_size: int | None = None,
        labels: tuple[str | None, str | None] = (None, None),
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = "KroneckerJacobian"
        bl = V.check_factor(where, "left", left, batch_size)
        br = V.check_factor(where, "right", right, batch_size if batch_size is not None else bl)
        self.batch_size = _infer_batch(where, batch_size, [bl, br])
        tensors = [f for f in (left, right) if isinstance(f, torch.Tensor)]
        dd = _common_dtype_device(where, tensors)
        if dd is None:
            self.dtype = dtype if dtype is not None else torch.get_default_dtype()
            self.device = torch.device(device if device is not None else "cpu")
        else:
            self.dtype, self.device = dd
        self.left: Factor = left if isinstance(left, int) else _as3d(left.detach())
        self.right: Factor = right if isinstance(right, int) else _as3d(right.detach())
        a, b = _factor_rows_cols(self.left)
        c, d = _factor_rows_cols(self.right)
        self.out_shape, self.in_shape = V.check_operator_shapes(
            where,
            (a, c) if out_shape is None else tuple(out_shape),
            (b, d) if in_shape is None else tuple(in_shape),
            a * c,
            b * d,
        )
        self.labels = (labels[0] or "L", labels[1] or "R")

    @property
    def out_split(self) -> tuple[int, int]:
        """``(a, c)``: the output read as an ``a × c`` matrix."""
        return _factor_rows_cols(self.left)[0], _factor_rows_cols(self.right)[0]

    @property
    def in_split(self) -> tuple[int, int]:
        """``(b, d)``: the input read as a ``b × d`` matrix."""
        return _factor_rows_cols(self.left)[1], _factor_rows_cols(self.right)[1]

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        (a, c), (b, d) = self.out_split, self.in_split
        X = x.reshape(x.shape[0], x.shape[1], b, d)
        L = None if isinstance(self.left, int) else self.left.unsqueeze(1)  # (BL, 1, a, b)
        Rt = None if isinstance(self.right, int) else self.right.mT.unsqueeze(1)  # (BR, 1, d, c)
        # L X Rᵀ, in the cheaper order
        if L is not None and Rt is not None and b * d * c + a * b * c < a * b * d + a * d * c:
            Y = torch.matmul(L, torch.matmul(X, Rt))
        else:
            Y = X if L is None else torch.matmul(L, X)
            Y = Y if Rt is None else torch.matmul(Y, Rt)
        return Y.reshape(Y.shape[0], Y.shape[1], *self.out_shape)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        (a, c), (b, d) = self.out_split, self.in_split
        Y = y.reshape(y.shape[0], y.shape[1], a, c)
        Lt = None if isinstance(self.left, int) else self.left.mT.unsqueeze(1)  # (BL, 1, b, a)
        R = None if isinstance(self.right, int) else self.right.unsqueeze(1)  # (BR, 1, c, d)
        # Lᵀ Y R, in the cheaper order
        if Lt is not None and R is not None and a * c * d + b * a * d < b * a * c + b * c * d:
            X = torch.matmul(Lt, torch.matmul(Y, R))
        else:
            X = Y if Lt is None else torch.matmul(Lt, Y)
            X = X if R is None else torch.matmul(X, R)
        return X.reshape(X.shape[0], X.shape[1], *self.in_shape)

    def _transpose(self) -> KroneckerJacobian:
        return KroneckerJacobian(
            _factor_t(self.left),
            _factor_t(self.right),
            out_shape=self.in_shape,
            in_shape=self.out_shape,
            batch_size=self.batch_size,
            labels=(_t_label(self.labels[0]), _t_label(self.labels[1])),
            dtype=self.dtype,
            device=self.device,
        )

    def _dense(self) -> torch.Tensor:
        L = _factor_dense(self.left, self.dtype, self.device)  # (BL, a, b)
        R = _factor_dense(self.right, self.dtype, self.device)  # (BR, c, d)
        J = L[:, :, None, :, None] * R[:, None, :, None, :]  # (B', a, c, b, d)
        return J.reshape(J.shape[0], *self.out_shape, *self.in_shape)

    def _held(self) -> list[torch.Tensor]:
        return [f for f in (self.left, self.right) if isinstance(f, torch.Tensor)]

    def _describe(self) -> str:
        parts = []
        for f, name in zip((self.left, self.right), self.labels, strict=True):
            parts.append(f"I_{f}" if isinstance(f, int) else f"{name}: {self._factor_note(f)}")
        return " ⊗ ".join(parts)


def _t_label(label: str) -> str:
    return label[:-1] if label.endswith("ᵀ") else label + "ᵀ"


def _as3d(t: torch.Tensor) -> torch.Tensor:
    return t.unsqueeze(0) if t.ndim == 2 else t


# ---------------------------------------------------------------------------------------------
# Diagonal, identity, dense
# ---------------------------------------------------------------------------------------------


class DiagonalJacobian(JacobianOperator):
    """The Jacobian of an elementwise map: ``J[..., k] = diag[k] δ(k, ·)``, ``out_shape == in_shape``.

    For ``y = f(x)`` elementwise, ``diag = f'(x)``; ``jvp`` and ``vjp`` are one multiply.

    Args:
        diag: ``shape`` (shared) or ``(B, *shape)`` when ``batched``.
        batched: whether ``diag`` has a leading batch dimension.
        batch_size: ``B`` for a batch sharing one ``diag`` (``batched=False``).

    Example:
        >>> x = torch.tensor([1.0, 2.0, 3.0])
        >>> J = DiagonalJacobian(2 * x)  # d (x**2) / dx
        >>> J.to_dense()
        tensor([[2., 0., 0.],
                [0., 4., 0.],
                [0., 0., 6.]])
    """

    def __init__(
        self, diag: torch.Tensor, *, batched: bool = False, batch_size: int | None = None
    ) -> None:
        where = "DiagonalJacobian"
        d = V.check_diagonal(where, diag, batched).detach()
        self.batch_size = _infer_batch(where, batch_size, [_lead(d) if batched else None])
        self.diag = d if batched else d.unsqueeze(0)  # (1 | B, *shape)
        self.out_shape = self.in_shape = tuple(self.diag.shape[1:])
        self.dtype, self.device = d.dtype, d.device

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return self.diag.unsqueeze(1) * x

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return self._matvec(y)

    def _transpose(self) -> DiagonalJacobian:
        return self

    def _dense(self) -> torch.Tensor:
        n = self.in_numel
        D = torch.diag_embed(self.diag.reshape(_lead(self.diag), n))
        return D.reshape(_lead(self.diag), *self.out_shape, *self.in_shape)

    def _held(self) -> list[torch.Tensor]:
        return [self.diag]

    def _describe(self) -> str:
        return f"diag: {self._factor_note(self.diag)}"


class IdentityJacobian(JacobianOperator):
    """The identity on ``shape`` (e.g. ``dZ/dB`` when ``B`` has ``Z``'s shape); holds nothing.

    With ``out_shape`` it is the Jacobian of ``x.reshape(out_shape)``: in row-major vec a reshape
    is the identity matrix, only the shapes change.

    Args:
        shape: per-sample shape of the input (and of the output, without ``out_shape``).
        out_shape: per-sample shape of the output, with as many elements as ``shape``.
        batch_size: ``B``, or ``None`` for no batch.
        dtype: dtype (default: torch's default dtype).
        device: device (default: CPU).

    Example:
        >>> J = IdentityJacobian((2, 3), out_shape=(6,))  # d x.reshape(6) / dx
        >>> J.jvp(torch.arange(6.0).reshape(2, 3))
        tensor([0., 1., 2., 3., 4., 5.])
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        out_shape: Sequence[int] | None = None,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = "IdentityJacobian"
        dims = tuple(int(s) for s in shape)
        self.in_shape = V.check_shape_numel(where, "shape", dims, math.prod(dims))
        self.out_shape = (
            self.in_shape
            if out_shape is None
            else V.check_shape_numel(where, "out_shape", tuple(out_shape), math.prod(dims))
        )
        self.batch_size = V.check_batch_size(where, batch_size)
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.device = torch.device(device if device is not None else "cpu")

    @property
    def is_reshape(self) -> bool:
        """Whether the output shape differs from the input shape."""
        return self.out_shape != self.in_shape

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], x.shape[1], *self.out_shape).clone()  # never a view of x

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return y.reshape(y.shape[0], y.shape[1], *self.in_shape).clone()

    def _transpose(self) -> IdentityJacobian:
        if not self.is_reshape:
            return self
        return IdentityJacobian(
            self.out_shape,
            out_shape=self.in_shape,
            batch_size=self.batch_size,
            dtype=self.dtype,
            device=self.device,
        )

    def _dense(self) -> torch.Tensor:
        n = self.in_numel
        eye = torch.eye(n, dtype=self.dtype, device=self.device)
        return eye.reshape(1, *self.out_shape, *self.in_shape)

    def _held(self) -> list[torch.Tensor]:
        return []

    def _describe(self) -> str:
        if self.is_reshape:
            return f"reshape {self.in_shape} -> {self.out_shape}"
        return f"I_{self.in_numel}"


class PermuteJacobian(JacobianOperator):
    """The Jacobian of ``x.permute(dims)`` (a transpose for matrices): a permutation, held as ``dims``.

    For a matrix ``(m, n)`` and ``dims = (1, 0)`` it is the commutation matrix
    (:func:`jacbatch.commutation_matrix`); ``jvp`` / ``vjp`` are a permute, nothing is stored.

    Args:
        in_shape: per-sample shape of ``x``.
        dims: a permutation of ``range(len(in_shape))``; the output shape is
            ``tuple(in_shape[d] for d in dims)``.
        batch_size: ``B``, or ``None`` for no batch.
        dtype: dtype (default: torch's default dtype).
        device: device (default: CPU).

    Example:
        >>> from jacbatch import commutation_matrix
        >>> J = PermuteJacobian((2, 3), (1, 0))  # d Xᵀ / dX
        >>> torch.equal(J.to_dense(vec="row"), commutation_matrix(2, 3))
        True
    """

    def __init__(
        self,
        in_shape: Sequence[int],
        dims: Sequence[int],
        *,
        batch_size: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        where = "PermuteJacobian"
        shape = tuple(int(s) for s in in_shape)
        self.dims = V.check_permutation(where, dims, len(shape))
        self.in_shape = V.check_shape_numel(where, "in_shape", shape, math.prod(shape))
        self.out_shape = tuple(shape[d] for d in self.dims)
        self.batch_size = V.check_batch_size(where, batch_size)
        self.dtype = dtype if dtype is not None else torch.get_default_dtype()
        self.device = torch.device(device if device is not None else "cpu")

    @property
    def inverse_dims(self) -> tuple[int, ...]:
        inv = [0] * len(self.dims)
        for k, d in enumerate(self.dims):
            inv[d] = k
        return tuple(inv)

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 1, *(2 + d for d in self.dims))

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        return y.permute(0, 1, *(2 + d for d in self.inverse_dims))

    def _transpose(self) -> PermuteJacobian:
        return PermuteJacobian(
            self.out_shape,
            self.inverse_dims,
            batch_size=self.batch_size,
            dtype=self.dtype,
            device=self.device,
        )

    def _dense(self) -> torch.Tensor:
        n = self.in_numel
        # column r of J is the permuted one-hot of input element r
        onehots = torch.eye(n, dtype=self.dtype, device=self.device).reshape(1, n, *self.in_shape)
        cols = self._matvec(onehots).reshape(1, n, n)  # (1, i, o)
        return cols.mT.reshape(1, *self.out_shape, *self.in_shape)

    def _held(self) -> list[torch.Tensor]:
        return []

    def _describe(self) -> str:
        return f"permute {self.dims} of {self.in_shape}"


class DenseJacobian(JacobianOperator):
    """A dense Jacobian as an operator, so that it composes with structured ones.

    Args:
        jacobian: ``(*out_shape, *in_shape)`` (shared) or ``(B, *out_shape, *in_shape)``, as
            :func:`jacbatch.jacobian` returns it with ``vec=None``.
        out_shape: per-sample output shape.
        in_shape: per-sample input shape.
        batch_size: ``B`` for a batch sharing one unbatched ``jacobian``.

    Example:
        >>> J = DenseJacobian(torch.ones(2, 3), (2,), (3,))
        >>> J.jvp(torch.tensor([1.0, 2.0, 3.0]))
        tensor([6., 6.])
    """

    def __init__(
        self,
        jacobian: torch.Tensor,
        out_shape: Sequence[int],
        in_shape: Sequence[int],
        *,
        batch_size: int | None = None,
    ) -> None:
        where = "DenseJacobian"
        outs, ins = tuple(int(s) for s in out_shape), tuple(int(s) for s in in_shape)
        J, has_batch = V.check_dense_jacobian(where, jacobian, outs, ins)
        J = J.detach() if has_batch else J.detach().unsqueeze(0)
        lead = _lead(J) if has_batch else None
        self.batch_size = _infer_batch(where, batch_size, [lead])
        self.out_shape, self.in_shape = outs, ins
        self.flat = J.reshape(_lead(J), math.prod(outs), math.prod(ins))  # (1 | B, o, i)
        self.dtype, self.device = J.dtype, J.device

    @classmethod
    def from_flat(
        cls,
        flat: torch.Tensor,
        out_shape: tuple[int, ...],
        in_shape: tuple[int, ...],
        batch_size: int | None,
    ) -> DenseJacobian:
        """From a row-major flattened ``(1 | B, out_numel, in_numel)`` tensor (kept as is)."""
        new = cls.__new__(cls)
        new.flat = flat.detach()
        new.out_shape, new.in_shape = tuple(out_shape), tuple(in_shape)
        new.batch_size = batch_size
        new.dtype, new.device = flat.dtype, flat.device
        return new

    def _matvec(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.reshape(x.shape[0], x.shape[1], self.in_numel)
        y = torch.matmul(xf, self.flat.mT)  # (B', N, o)
        return y.reshape(y.shape[0], y.shape[1], *self.out_shape)

    def _rmatvec(self, y: torch.Tensor) -> torch.Tensor:
        yf = y.reshape(y.shape[0], y.shape[1], self.out_numel)
        x = torch.matmul(yf, self.flat)  # (B', N, i)
        return x.reshape(x.shape[0], x.shape[1], *self.in_shape)

    def _transpose(self) -> DenseJacobian:
        return DenseJacobian.from_flat(self.flat.mT, self.in_shape, self.out_shape, self.batch_size)

    def _dense(self) -> torch.Tensor:
        # a copy: to_dense promises new memory, never the caller's own tensor
        return self.flat.reshape(_lead(self.flat), *self.out_shape, *self.in_shape).clone()

    def _held(self) -> list[torch.Tensor]:
        return [self.flat]

    def _describe(self) -> str:
        return f"J: {self._factor_note(self.flat)}"


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

    if isinstance(outer, TermJacobian) and isinstance(inner, TermJacobian):
        return outer.then(inner)
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


from .traced import TermJacobian  # noqa: E402  (a view over lettered terms; imports the above)
