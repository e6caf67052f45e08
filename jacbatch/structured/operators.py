"""The named structured operators: Kronecker, diagonal, identity, permutation, dense."""

from __future__ import annotations

import math
import string
from collections.abc import Sequence

import torch

from .. import _validation as V
from ..rules import terms as T_
from ..rules.terms import Term
from .base import Factor, JacobianOperator, _common_dtype_device, _infer_batch, _lead

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

    def to_terms(self) -> list[Term]:
        """``L[b, i, k] R[b, j, l]`` over the splits (an identity factor is a delta)."""
        (a, c), (b, d) = self.out_split, self.in_split
        fs: list[tuple[torch.Tensor, str]] = []
        left_in, right_in = "k", "l"
        if isinstance(self.left, int):
            left_in = "i"
        else:
            fs.append((self.left, "ik"))
        if isinstance(self.right, int):
            right_in = "j"
        else:
            fs.append((self.right, "jl"))
        return [T_.from_factors(fs, "ij", left_in + right_in, (a, c), (b, d), self._like())]

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

    def to_terms(self) -> list[Term]:
        s = _letters(len(self.in_shape))
        return [
            T_.from_factors([(self.diag, s)], s, s, self.out_shape, self.in_shape, self._like())
        ]

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

    def to_terms(self) -> list[Term]:
        return [T_.identity_reshape(self.out_shape, self.in_shape, self._like())]

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

    def to_terms(self) -> list[Term]:
        s = _letters(len(self.in_shape))
        out = "".join(s[d] for d in self.dims)
        return [T_.from_factors([], out, s, self.out_shape, self.in_shape, self._like())]

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

    def to_terms(self) -> list[Term]:
        n_o, n_i = len(self.out_shape), len(self.in_shape)
        s = _letters(n_o + n_i)
        J = self.flat.reshape(_lead(self.flat), *self.out_shape, *self.in_shape)
        o, i = s[:n_o], s[n_o:]
        return [T_.from_factors([(J, s)], o, i, self.out_shape, self.in_shape, self._like())]

    def _held(self) -> list[torch.Tensor]:
        return [self.flat]

    def _describe(self) -> str:
        return f"J: {self._factor_note(self.flat)}"


def _letters(n: int) -> str:
    return string.ascii_letters[:n]
