"""The one place where user-facing errors are raised.

Every message reads ``"<function>: expected <what>, got <actual>. <how to fix>"``. ``TypeError`` is
for types, ``ValueError`` for shapes and values, ``NotImplementedError`` when no closed form exists.
All checks run on shapes and metadata only, before any Jacobian work.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

METHODS: tuple[str, ...] = ("auto", "closed_form", "jacrev", "jacfwd", "vjp")
VEC_ORDERS: tuple[str | None, ...] = (None, "row", "col")


def _fmt_options(options: Sequence[object]) -> str:
    return ", ".join(repr(o) for o in options)


# ---------------------------------------------------------------------------------------------
# Small reusable checks
# ---------------------------------------------------------------------------------------------


def check_tensor(where: str, name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{where}: expected {name} to be a torch.Tensor, got {type(x).__name__}. "
            f"Convert it with torch.as_tensor(...)."
        )
    return x


def check_order(where: str, order: object, *, name: str = "order") -> None:
    if order not in ("row", "col"):
        raise ValueError(
            f"{where}: expected {name} to be one of 'row', 'col', got {order!r}. "
            f"'row' is PyTorch's reshape(-1) order, 'col' the column-major (Fortran) order."
        )


def check_nonneg_int(where: str, name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"{where}: expected {name} to be a non-negative int, got {n!r}.")
    return n


def check_shape_numel(where: str, name: str, shape: object, numel: int) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in shape)  # type: ignore[attr-defined]
    except TypeError:
        raise TypeError(
            f"{where}: expected {name} to be a tuple of ints, got {type(shape).__name__}."
        ) from None
    if any(d < 0 for d in dims):
        raise ValueError(f"{where}: expected {name} to have non-negative sizes, got {dims}.")
    if math.prod(dims) != numel:
        raise ValueError(
            f"{where}: expected {name} with {numel} elements to match the input, got {dims} "
            f"({math.prod(dims)} elements)."
        )
    return dims


def check_chunk_size(where: str, chunk_size: object) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(
            f"{where}: expected chunk_size to be a positive int or None, got {chunk_size!r}. "
            f"Use None to compute all rows (jacrev) or columns (jacfwd) in one vectorized pass."
        )
    return chunk_size


def check_method(where: str, method: object) -> str:
    if method not in METHODS:
        raise ValueError(
            f"{where}: expected method to be one of {_fmt_options(METHODS)}, got {method!r}."
        )
    return str(method)


def check_vec(where: str, vec: object) -> str | None:
    if vec not in VEC_ORDERS:
        raise ValueError(
            f"{where}: expected vec to be one of {_fmt_options(VEC_ORDERS)}, got {vec!r}. "
            f"None keeps the layout (B, *out_shape, *in_shape); 'row'/'col' flatten to "
            f"(B, out_numel, in_numel)."
        )
    return None if vec is None else str(vec)


def no_rule_error(
    where: str, func: Callable[..., Any], argnum: int, available: list[str]
) -> NoReturn:
    name = getattr(func, "__qualname__", repr(func))
    listing = ", ".join(available) if available else "(none registered)"
    raise NotImplementedError(
        f"{where}: expected a function with a registered closed-form rule for argnum {argnum}, "
        f"got {name}. Closed forms exist for: {listing}. Use method='auto' to fall back to "
        f"autodiff, or register a rule (see CONTRIBUTING.md)."
    )


def output_error(where: str, out: object) -> NoReturn:
    raise TypeError(
        f"{where}: expected func to return a single torch.Tensor, got {type(out).__name__}. "
        f"Return one tensor (stack or concatenate several outputs), or call jacobian once per output."
    )


def output_dtype_error(where: str, dtype: torch.dtype) -> NoReturn:
    raise TypeError(
        f"{where}: expected func to return a floating-point tensor, got dtype {dtype}. "
        f"Integer and bool outputs have no derivative; return a float tensor."
    )


# ---------------------------------------------------------------------------------------------
# The whole call to jacobian(): normalized once, used by every route
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """A validated, normalized call to :func:`jacbatch.jacobian`.

    Attributes:
        func: the per-sample function.
        args: the caller's tensors, untouched.
        in_dims: per argument, the (non-negative) batch dimension or ``None`` for shared.
        argnums: the differentiated argument indices (non-negative, unique).
        tuple_argnums: whether the caller passed a tuple (and gets a tuple back).
        batch_size: ``B``, or ``None`` when no argument is batched.
        dtype: the common floating dtype.
        device: the common device.
    """

    func: Callable[..., Any]
    args: tuple[torch.Tensor, ...]
    in_dims: tuple[int | None, ...]
    argnums: tuple[int, ...]
    tuple_argnums: bool
    batch_size: int | None
    dtype: torch.dtype
    device: torch.device

    @property
    def batched(self) -> bool:
        return self.batch_size is not None

    def sample_shape(self, i: int) -> tuple[int, ...]:
        """Shape of argument ``i`` as ``func`` sees it (batch dimension removed)."""
        shape = list(self.args[i].shape)
        d = self.in_dims[i]
        if d is not None:
            del shape[d]
        return tuple(shape)

    def moved(self, i: int) -> torch.Tensor:
        """Argument ``i`` with its batch dimension first (a view), or as is when shared."""
        d = self.in_dims[i]
        a = self.args[i]
        return a if d is None or d == 0 else a.movedim(d, 0)


def normalize_call(
    where: str,
    func: object,
    args: tuple[object, ...],
    argnums: object,
    in_dims: object,
) -> Call:
    """Validate ``func``, ``args``, ``argnums`` and ``in_dims`` together and normalize them."""
    if not callable(func):
        raise TypeError(
            f"{where}: expected func to be callable, got {type(func).__name__}. "
            f"Pass the function first, then its arguments: {where}(func, *args)."
        )
    if len(args) == 0:
        raise TypeError(f"{where}: expected at least one tensor argument after func, got none.")
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(
                f"{where}: expected args[{i}] to be a torch.Tensor, got {type(a).__name__}. "
                f"Convert it with torch.as_tensor(...), or close over non-tensor values in func."
            )
    tensors: tuple[torch.Tensor, ...] = tuple(args)  # type: ignore[arg-type]

    # dtypes: floating, and one of them
    for i, a in enumerate(tensors):
        if not a.dtype.is_floating_point:
            kind = "complex" if a.dtype.is_complex else "integer/bool"
            raise TypeError(
                f"{where}: expected floating-point tensors, got args[{i}] with {kind} dtype "
                f"{a.dtype}. Convert it with .double() or .float()"
                + (" (complex Jacobians are not supported)." if a.dtype.is_complex else ".")
            )
    dtypes = {a.dtype for a in tensors}
    if len(dtypes) > 1:
        listing = ", ".join(f"args[{i}]: {a.dtype}" for i, a in enumerate(tensors))
        raise TypeError(
            f"{where}: expected all arguments to share one dtype, got {listing}. "
            f"Cast them to one dtype, e.g. .double() for float64."
        )
    # devices: one, and not meta
    for i, a in enumerate(tensors):
        if a.device.type == "meta":
            raise ValueError(
                f"{where}: expected tensors with data, got args[{i}] on the meta device. "
                f"Use jacbatch.estimate_memory-style shape planning for meta tensors, or "
                f"materialize the argument on 'cpu' or 'cuda'."
            )
    devices = {a.device for a in tensors}
    if len(devices) > 1:
        listing = ", ".join(f"args[{i}]: {a.device}" for i, a in enumerate(tensors))
        raise ValueError(
            f"{where}: expected all arguments on one device, got {listing}. "
            f"Move them with .to(device)."
        )

    # argnums
    n = len(tensors)
    tuple_argnums = isinstance(argnums, tuple)
    raw = argnums if isinstance(argnums, tuple) else (argnums,)
    if len(raw) == 0:
        raise ValueError(f"{where}: expected argnums to name at least one argument, got ().")
    norm_argnums: list[int] = []
    for a in raw:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(
                f"{where}: expected argnums to be an int or a tuple of ints, got {argnums!r}."
            )
        if not -n <= a < n:
            raise ValueError(
                f"{where}: expected argnums in range [-{n}, {n}) for {n} argument(s), got {a}."
            )
        norm_argnums.append(a % n)
    if len(set(norm_argnums)) != len(norm_argnums):
        raise ValueError(f"{where}: expected distinct argnums, got {argnums!r}.")

    # in_dims, exactly as torch.func.vmap: an int/None for all, or one entry per argument
    if in_dims is None or isinstance(in_dims, int):
        if isinstance(in_dims, bool):
            raise TypeError(f"{where}: expected in_dims to be an int, None or a tuple, got bool.")
        raw_dims: tuple[object, ...] = (in_dims,) * n
    elif isinstance(in_dims, (tuple, list)):
        raw_dims = tuple(in_dims)
        if len(raw_dims) != n:
            raise ValueError(
                f"{where}: expected in_dims to have one entry per argument ({n}), got "
                f"{len(raw_dims)} entries: {tuple(in_dims)!r}. Use None for arguments shared by "
                f"the whole batch."
            )
    else:
        raise TypeError(
            f"{where}: expected in_dims to be an int, None or a tuple of those, got "
            f"{type(in_dims).__name__}."
        )
    norm_dims: list[int | None] = []
    for i, (a, d) in enumerate(zip(tensors, raw_dims, strict=True)):
        if d is None:
            norm_dims.append(None)
            continue
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(
                f"{where}: expected in_dims[{i}] to be an int or None, got {type(d).__name__}."
            )
        if a.ndim == 0 or not -a.ndim <= d < a.ndim:
            raise ValueError(
                f"{where}: expected in_dims[{i}] to be a dimension of args[{i}] (shape "
                f"{tuple(a.shape)}), got {d}. Use None if args[{i}] is shared by the whole batch."
            )
        norm_dims.append(d % a.ndim)

    sizes = {i: tensors[i].shape[d] for i, d in enumerate(norm_dims) if d is not None}
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"args[{i}] has {s} along dim {norm_dims[i]}" for i, s in sizes.items())
        raise ValueError(
            f"{where}: expected one batch size for all batched arguments, got {listing}. "
            f"Check in_dims, or mark shared arguments with None."
        )
    batch_size = next(iter(sizes.values())) if sizes else None

    return Call(
        func=func,
        args=tensors,
        in_dims=tuple(norm_dims),
        argnums=tuple(norm_argnums),
        tuple_argnums=tuple_argnums,
        batch_size=batch_size,
        dtype=tensors[0].dtype,
        device=tensors[0].device,
    )


def check_out(
    where: str, out: object, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """Check a caller's preallocated result buffer."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{where}: expected out to be a torch.Tensor, got {type(out).__name__}.")
    if tuple(out.shape) != tuple(shape):
        raise ValueError(
            f"{where}: expected out of shape {tuple(shape)}, got {tuple(out.shape)}. "
            f"Allocate it with torch.empty({tuple(shape)}, dtype={dtype}, device='{device}')."
        )
    if out.dtype != dtype:
        raise TypeError(f"{where}: expected out of dtype {dtype}, got {out.dtype}.")
    if out.device != device:
        raise ValueError(f"{where}: expected out on device {device}, got {out.device}.")
    if not out.is_contiguous():
        raise ValueError(
            f"{where}: expected a contiguous out tensor, got strides {out.stride()}. "
            f"Pass a freshly allocated buffer (torch.empty) or call .contiguous() once."
        )
    if out.requires_grad:
        raise ValueError(
            f"{where}: expected out not to require grad. Allocate it without requires_grad."
        )
    return out


def check_affine_shapes(A: torch.Tensor, W: torch.Tensor, B: torch.Tensor) -> None:
    """Per-sample shapes of ``affine(A, W, B)``: A ``(m, p)``, W ``(p, q)``, B ``(q,)`` or ``(m, q)``."""
    where = "affine"
    for name, t in (("A", A), ("W", W), ("B", B)):
        check_tensor(where, name, t)
    if A.ndim != 2 or W.ndim != 2:
        raise ValueError(
            f"{where}: expected A (m, p) and W (p, q) to be matrices per sample, got A "
            f"{tuple(A.shape)} and W {tuple(W.shape)}. Put batch dimensions in in_dims."
        )
    m, p = A.shape
    p2, q = W.shape
    if p != p2:
        raise ValueError(
            f"{where}: expected A (m, p) and W (p, q) with matching p, got A {tuple(A.shape)} "
            f"and W {tuple(W.shape)}."
        )
    if tuple(B.shape) not in ((q,), (m, q)):
        raise ValueError(
            f"{where}: expected B of shape ({q},) (broadcast over rows) or ({m}, {q}), got "
            f"{tuple(B.shape)}."
        )


# ---------------------------------------------------------------------------------------------
# jacbatch.distributed: the process group, the options, and agreement between ranks
# ---------------------------------------------------------------------------------------------

GATHER_MODES: tuple[str | None, ...] = ("all", "dst", None)


class RankFailedError(RuntimeError):
    """Raised on every rank that did not fail itself when another rank of the group failed.

    The failing rank raises its own exception; the others raise this one, naming that rank and
    its error, so no rank is left waiting in a collective.
    """


def check_process_group(where: str, initialized: bool) -> None:
    if not initialized:
        raise RuntimeError(
            f"{where}: expected an initialized torch.distributed process group, got none. "
            f"Launch with torchrun and call jacbatch.distributed.init() (or "
            f"torch.distributed.init_process_group) first."
        )


def check_gather(where: str, gather: object, dst: object, world_size: int) -> str | None:
    if gather not in GATHER_MODES:
        raise ValueError(
            f"{where}: expected gather to be one of {_fmt_options(GATHER_MODES)}, got {gather!r}. "
            f"'all' returns the whole Jacobian on every rank, 'dst' on rank dst only, None "
            f"returns each rank's own shard."
        )
    if isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < world_size:
        raise ValueError(f"{where}: expected dst to be a rank in [0, {world_size}), got {dst!r}.")
    return None if gather is None else str(gather)


def check_distributed_call(where: str, call: Call, backend: str) -> None:
    """What sharding needs beyond what :func:`normalize_call` checks."""
    if not call.batched:
        raise ValueError(
            f"{where}: expected at least one batched argument to shard over ranks, got in_dims "
            f"{call.in_dims}. Mark the batch dimension in in_dims, or call jacbatch.jacobian "
            f"on one rank."
        )
    if backend == "nccl" and call.device.type != "cuda":
        raise ValueError(
            f"{where}: expected CUDA tensors with the nccl backend, got tensors on "
            f"{call.device}. Move the arguments to jacbatch.distributed.local_device(), or "
            f"use the gloo backend for CPU tensors."
        )


def check_npy_paths(where: str, paths: object, n: int, dtype: torch.dtype) -> tuple[str, ...]:
    import os

    raw = paths if isinstance(paths, (tuple, list)) else (paths,)
    if len(raw) != n or not all(isinstance(p, (str, os.PathLike)) for p in raw):
        raise TypeError(
            f"{where}: expected "
            + ("a path" if n == 1 else f"a tuple of {n} paths, one per argnum")
            + f", got {paths!r}."
        )
    if dtype == torch.bfloat16:
        raise TypeError(
            f"{where}: expected a dtype that .npy files can hold, got {dtype}. Cast the "
            f"arguments to float32 or float64."
        )
    return tuple(os.fspath(p) for p in raw)


def rank_disagreement_error(
    where: str, rank: int, field: str, mine: object, ref: object
) -> NoReturn:
    raise ValueError(
        f"{where}: expected every rank to be called with the same arguments and options, got "
        f"rank {rank} with {field} = {mine!r} where rank 0 has {ref!r}. Build the same inputs on "
        f"every rank (same data, seed and shapes) and pass the same options."
    )


def rank_failed_error(
    where: str, failures: Sequence[tuple[int, str]], world_size: int, stage: str
) -> NoReturn:
    listing = "; ".join(f"rank {r}: {msg}" for r, msg in failures)
    raise RankFailedError(
        f"{where}: expected every rank to succeed {stage}, got a failure on {len(failures)} of "
        f"{world_size} rank(s); this rank stopped instead of waiting for it. {listing}"
    )
