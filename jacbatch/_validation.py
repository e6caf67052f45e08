"""User-facing checks shared by several modules, and the errors they raise.

Every message reads ``"<function>: expected <what>, got <actual>. <how to fix>"``. ``TypeError``
is for types, ``ValueError`` for shapes and values, ``NotImplementedError`` when no closed form
exists. All checks run on shapes and metadata only, before any Jacobian work.

Checks with a single user live beside it (:mod:`jacbatch._sensitivity_checks`,
:mod:`jacbatch._distributed_checks`); the call type is :mod:`jacbatch.call`, the public
exception types :mod:`jacbatch.errors`. Size: over 600 lines only because the checks of the
structured operators (about 190 lines, section "Structured Jacobian operators") are still here;
they move next to :mod:`jacbatch.structured` with that module's rewrite.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import torch

from .call import Call
from .errors import JacobianMemoryError

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


def methods() -> tuple[str, ...]:
    """The values of ``method``: ``"auto"`` and the routes of the registry a caller may name
    (:func:`jacbatch.methods.names`)."""
    from .methods import names

    return ("auto", *names())


def __getattr__(name: str) -> Any:
    if name == "METHODS":  # read from the route registry, never a list kept by hand
        return methods()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def check_method(where: str, method: object) -> str:
    options = methods()
    if method not in options:
        raise ValueError(
            f"{where}: expected method to be one of {_fmt_options(options)}, got {method!r}."
        )
    return str(method)


RANDOMNESS_OPTIONS: tuple[str, ...] = ("error", "different", "same")


def check_randomness(where: str, randomness: object) -> str:
    if randomness not in RANDOMNESS_OPTIONS:
        raise ValueError(
            f"{where}: expected randomness to be one of {_fmt_options(RANDOMNESS_OPTIONS)}, got "
            f"{randomness!r}."
        )
    return str(randomness)


def random_function_error(where: str, ops: Sequence[str]) -> NoReturn:
    raise ValueError(
        f"{where}: expected a deterministic func under randomness='error', got one that draws "
        f"random numbers ({', '.join(sorted(ops)) or 'a random op'}). Pass "
        f"randomness='different' (each sample its own draw) or randomness='same' (one draw for "
        f"every sample); each sample's Jacobian is then that of one realization. For dropout at "
        f"evaluation, put the module in eval mode."
    )


def no_closed_form_for(where: str, why: str) -> NoReturn:
    raise NotImplementedError(
        f"jacobian: expected a function the closed-form route can reproduce, got one that "
        f"{why}. Use method='auto' (it falls back to autodiff), 'jacrev', 'jacfwd' or 'vjp'."
    )


def _address_range(t: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, stop)`` a non-empty tensor's elements span in memory."""
    size = t.element_size()
    ends = [(n - 1) * s * size for n, s in zip(t.shape, t.stride(), strict=True)]
    start = t.data_ptr() + sum(e for e in ends if e < 0)
    return start, t.data_ptr() + sum(e for e in ends if e > 0) + size


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors may share memory (their address ranges intersect; conservative for
    interleaved strides). Works across storages, e.g. two tensors over one numpy array."""
    a, b = _unwrapped(a), _unwrapped(b)
    if a.device != b.device or a.numel() == 0 or b.numel() == 0 or a.device.type == "meta":
        return False
    try:
        (a0, a1), (b0, b1) = _address_range(a), _address_range(b)
    except RuntimeError:  # no storage (a fake or otherwise storage-less tensor): no memory to share
        return False
    return a0 < b1 and b0 < a1


def _unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The tensor a torch.func wrapper (batched or gradient-tracking) holds, else ``t``."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        t = functorch.get_unwrapped(t)
    return t


def check_out_aliasing(
    where: str, outs: Sequence[torch.Tensor], args: Sequence[torch.Tensor]
) -> None:
    """Refuse ``out`` buffers that share memory with an argument (or with each other)."""
    for k, o in enumerate(outs):
        for i, a in enumerate(args):
            if overlaps(o, a):
                raise ValueError(
                    f"{where}: expected out to be memory of its own, got an out buffer that "
                    f"overlaps args[{i}]; writing the result would overwrite the input. Allocate "
                    f"a separate buffer (torch.empty_like) or pass a clone of the argument."
                )
        for j in range(k):
            if overlaps(o, outs[j]):
                raise ValueError(
                    f"{where}: expected each out buffer to be memory of its own, got out[{k}] "
                    f"overlapping out[{j}]. Allocate one buffer per argnum."
                )


def check_vec(where: str, vec: object) -> str | None:
    if vec not in VEC_ORDERS:
        raise ValueError(
            f"{where}: expected vec to be one of {_fmt_options(VEC_ORDERS)}, got {vec!r}. "
            f"None keeps the layout (B, *out_shape, *in_shape); 'row'/'col' flatten to "
            f"(B, out_numel, in_numel)."
        )
    return None if vec is None else str(vec)


def no_rule_error(
    where: str, func: Callable[..., Any], argnum: int, available: list[str], detail: str = ""
) -> NoReturn:
    name = getattr(func, "__qualname__", repr(func))
    listing = ", ".join(available) if available else "(none registered)"
    raise NotImplementedError(
        f"{where}: expected a function with a registered closed-form rule for argnum {argnum}, "
        f"got {name}. Closed forms exist for: {listing}, and for plain torch code whose traced "
        f"ops all have rules. {detail + ' ' if detail else ''}Use method='auto' to fall back to "
        f"autodiff, or register a rule (see CONTRIBUTING.md)."
    )


class TreeOutput(TypeError):
    """``func`` returned a tuple, list or dict: :func:`jacbatch.jacobian` takes it as a pytree
    output (NOTE [Pytree calls] in :mod:`jacbatch.pytree`)."""


def output_error(where: str, out: object) -> NoReturn:
    if isinstance(out, (tuple, list, dict)):
        raise TreeOutput(
            f"{where}: expected func to return a single torch.Tensor, got "
            f"{type(out).__name__}. jacbatch.jacobian takes tuple, list and dict outputs (and "
            f"has_aux=True); elsewhere return one tensor (stack or concatenate the outputs)."
        )
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


def check_argnums(where: str, argnums: object, n: int) -> tuple[tuple[int, ...], bool]:
    """``argnums`` (an int or a tuple of ints) for ``n`` arguments: the distinct non-negative
    indices, and whether it was a tuple."""
    tuple_argnums = isinstance(argnums, tuple)
    raw = argnums if isinstance(argnums, tuple) else (argnums,)
    if len(raw) == 0:
        raise ValueError(f"{where}: expected argnums to name at least one argument, got ().")
    norm: list[int] = []
    for a in raw:
        if isinstance(a, bool) or not isinstance(a, int):
            raise TypeError(
                f"{where}: expected argnums to be an int or a tuple of ints, got {argnums!r}."
            )
        if not -n <= a < n:
            raise ValueError(
                f"{where}: expected argnums in range [-{n}, {n}) for {n} argument(s), got {a}."
            )
        norm.append(a % n)
    if len(set(norm)) != len(norm):
        raise ValueError(f"{where}: expected distinct argnums, got {argnums!r}.")
    return tuple(norm), tuple_argnums


def normalize_call(
    where: str,
    func: object,
    args: tuple[object, ...],
    argnums: object,
    in_dims: object,
) -> Call:
    """Validate ``func``, ``args``, ``argnums`` and ``in_dims`` together and normalize them."""
    from ._threads import ready

    ready()  # NOTE [First calls from several threads]
    if not callable(func):
        raise TypeError(
            f"{where}: expected func to be callable, got {type(func).__name__}. "
            f"Pass the function first, then its arguments: {where}(func, *args)."
        )
    if len(args) == 0:
        raise TypeError(f"{where}: expected at least one tensor argument after func, got none.")
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            if isinstance(a, (dict, list, tuple)):
                raise TypeError(
                    f"{where}: expected args[{i}] to be a torch.Tensor, got "
                    f"{type(a).__name__}. jacbatch.jacobian, hessian, iter_jacobian, "
                    f"save_jacobian, explain and estimate_memory take dicts, tuples and lists "
                    f"of tensors (pytrees, as torch.func); here pass "
                    f"each tensor as its own argument (e.g. *params.values()) and rebuild the "
                    f"structure inside func."
                )
            raise TypeError(
                f"{where}: expected args[{i}] to be a torch.Tensor, got {type(a).__name__}. "
                f"Convert it with torch.as_tensor(...), or close over non-tensor values in func."
            )
    tensors: tuple[torch.Tensor, ...] = tuple(args)  # type: ignore[arg-type]

    # layouts: dense (sparse tensors have no nbytes, no views, few forward-mode formulas)
    for i, a in enumerate(tensors):
        if a.layout != torch.strided:
            raise TypeError(
                f"{where}: expected dense (strided) tensors, got args[{i}] with layout "
                f"{a.layout}. Convert it with .to_dense() (the Jacobian is dense anyway), or "
                f"close over the sparse tensor in func if it is not differentiated."
            )

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
    norm_argnums, tuple_argnums = check_argnums(where, argnums, n)

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
# Memory budgets
# ---------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    from .memory import format_bytes

    return format_bytes(n)


def bad_memory_value(where: str, value: object, why: str = "") -> NoReturn:
    raise ValueError(
        f"{where}: expected max_memory as a positive number of bytes (a whole number, at least "
        f"1) or a string such as '512MiB' or '2GB', got {value!r}{f' ({why})' if why else ''}."
    )


def check_bool(where: str, name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(
            f"{where}: expected {name} to be True or False, got {type(value).__name__}."
        )
    return value


def check_progress(where: str, progress: object) -> bool | None:
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(
            f"{where}: expected progress to be True, False or None, got {type(progress).__name__}."
        )
    return progress


def result_too_large(
    where: str, nbytes: int, free: int, budget: int | None, batch_size: int | None
) -> NoReturn:
    budget_txt = "" if budget is None else f" (working budget {_fmt_bytes(budget)})"
    per_sample = nbytes / batch_size if batch_size else nbytes
    fit = int(free // per_sample) if per_sample > 0 else 0
    if batch_size and fit >= 1:
        rest = (
            f"out= a tensor over a numpy memmap, or jacbatch.save_jacobian(path, ...), to "
            f"stream it to disk; "
            f"jacbatch.iter_jacobian(...) to reduce it chunk by chunk; or a smaller batch (up to "
            f"{fit} samples of {_fmt_bytes(per_sample)} each fit in the free memory)."
        )
    else:
        one = "one sample's Jacobian alone" if batch_size else "the Jacobian"
        rest = (
            f"{one} is {_fmt_bytes(per_sample)}, more than is free, so no batch size fits "
            f"and jacbatch.save_jacobian / iter_jacobian, which hold one sample at least, cannot "
            f"help; out= a tensor over a numpy memmap with method='vjp' (or a closed form) "
            f"writes it row by row straight into the file."
        )
    raise JacobianMemoryError(
        f"{where}: expected a result that fits in memory, got a Jacobian of {_fmt_bytes(nbytes)} "
        f"with {_fmt_bytes(free)} free{budget_txt}. Ways out: jacbatch.structured_jacobian for "
        f"a lazy operator (where a closed form exists); {rest}"
    )


def budget_too_small(where: str, needed: int, budget: int, method: str) -> NoReturn:
    raise JacobianMemoryError(
        f"{where}: expected max_memory to cover one sample's working memory, got a budget of "
        f"{_fmt_bytes(budget)} while {method} needs about {_fmt_bytes(needed)} for one sample. "
        f"Raise max_memory, or use a route that chunks finer (method='jacrev' or 'jacfwd' with "
        f"a small chunk_size)."
    )


def needs_batch(where: str) -> NoReturn:
    raise ValueError(
        f"{where}: expected at least one batched argument (an int in in_dims), got all None. "
        f"Call jacbatch.jacobian for a single Jacobian."
    )


def single_argnum(where: str, argnums: object) -> NoReturn:
    raise TypeError(
        f"{where}: expected one int argnums (one file per Jacobian), got {argnums!r}. "
        f"Call it once per argument."
    )


def check_positive_int(where: str, name: str, n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"{where}: expected {name} to be a positive int, got {n!r}.")
    return n


# Structured Jacobian operators (jacbatch.structured)
# ---------------------------------------------------------------------------------------------


def _fmt_batch(batch_size: int | None) -> str:
    return "no batch" if batch_size is None else f"batch {batch_size}"


def check_same_dtype_device(
    where: str,
    name: str,
    dtype: torch.dtype,
    device: torch.device,
    want_dtype: torch.dtype,
    want_device: torch.device,
) -> None:
    """``name`` must have the operator's dtype and device."""
    if dtype != want_dtype:
        raise TypeError(
            f"{where}: expected {name} of dtype {want_dtype}, got {dtype}. Cast it with "
            f".to({want_dtype})."
        )
    if device != want_device:
        raise ValueError(
            f"{where}: expected {name} on device {want_device}, got {device}. Move it with "
            f".to('{want_device}')."
        )


def check_operator_operand(
    where: str,
    name: str,
    x: object,
    sample_shape: tuple[int, ...],
    batch_size: int | None,
    dtype: torch.dtype,
    device: torch.device,
    like: str,
) -> bool:
    """A tangent / cotangent for a Jacobian operator; returns whether it carries a leading batch.

    Accepted: ``sample_shape`` (one vector, shared by the batch) or ``(B, *sample_shape)``. An
    operator without a batch accepts any leading size (a stack of vectors).
    """
    t = check_tensor(where, name, x)
    check_same_dtype_device(where, name, t.dtype, t.device, dtype, device)
    shape = tuple(t.shape)
    if shape == sample_shape:
        return False
    lead = "N" if batch_size is None else str(batch_size)
    if t.ndim == len(sample_shape) + 1 and shape[1:] == sample_shape:
        if batch_size is not None and shape[0] != batch_size:
            raise ValueError(
                f"{where}: expected {name} with batch size {batch_size} (shape "
                f"{(batch_size, *sample_shape)}), got batch size {shape[0]} (shape {shape}). "
                f"Pass one {name} per sample, or one of shape {sample_shape} for all samples."
            )
        return True
    raise ValueError(
        f"{where}: expected {name} shaped like the {like}, {sample_shape} or "
        f"({lead}, *{sample_shape}), got {shape}."
    )


def check_dense_matmul(
    where: str,
    x: torch.Tensor,
    side: str,
    numel: int,
    batch_size: int | None,
    dtype: torch.dtype,
    device: torch.device,
) -> None:
    """A dense matrix multiplying a Jacobian operator (flattened, row-major vec).

    ``side="right"``: ``op @ x`` with ``x`` ``(i,)``, ``(i, n)`` or ``(B, i, n)``;
    ``side="left"``: ``x @ op`` with ``x`` ``(o,)``, ``(n, o)`` or ``(B, n, o)``.
    """
    check_same_dtype_device(where, "the dense operand", x.dtype, x.device, dtype, device)
    forms = "(i,), (i, n) or (B, i, n)" if side == "right" else "(o,), (n, o) or (B, n, o)"
    letter = "i" if side == "right" else "o"
    if x.ndim not in (1, 2, 3):
        raise ValueError(
            f"{where}: expected a dense operand of shape {forms} with {letter} = {numel}, got "
            f"{tuple(x.shape)}."
        )
    k = x.shape[0] if x.ndim == 1 else (x.shape[-2] if side == "right" else x.shape[-1])
    if k != numel:
        what = "in_numel" if side == "right" else "out_numel"
        raise ValueError(
            f"{where}: expected a dense operand of shape {forms} with {letter} = {numel} (the "
            f"operator's {what}), got {tuple(x.shape)}. Dense operands are flattened "
            f"Jacobians or vectors in row-major vec order."
        )
    if x.ndim == 3 and batch_size is not None and x.shape[0] != batch_size:
        raise ValueError(
            f"{where}: expected a dense operand with batch size {batch_size}, got "
            f"{x.shape[0]} (shape {tuple(x.shape)}). Use a 2-D operand to share it by the batch."
        )


def check_compose(
    where: str,
    outer_in: tuple[int, ...],
    inner_out: tuple[int, ...],
    outer_batch: int | None,
    inner_batch: int | None,
) -> None:
    """``outer @ inner``: the outer operator's input must be the inner operator's output."""
    if outer_in != inner_out:
        raise ValueError(
            f"{where}: expected the outer Jacobian's input shape to equal the inner Jacobian's "
            f"output shape, got {outer_in} and {inner_out}. Compose d h/d y @ d y/d x, outer "
            f"first."
        )
    if outer_batch is not None and inner_batch is not None and outer_batch != inner_batch:
        raise ValueError(
            f"{where}: expected equal batch sizes, got {_fmt_batch(outer_batch)} (outer) and "
            f"{_fmt_batch(inner_batch)} (inner). Operators without a batch are shared by any batch."
        )


def check_sum_operands(
    where: str,
    shapes: tuple[tuple[int, ...], tuple[int, ...]],
    other_shapes: tuple[tuple[int, ...], tuple[int, ...]],
    batch: int | None,
    other_batch: int | None,
) -> None:
    """``J1 + J2``: same output and input shapes, compatible batches."""
    if shapes != other_shapes:
        raise ValueError(
            f"{where}: expected Jacobians with the same (out_shape, in_shape), got {shapes} and "
            f"{other_shapes}."
        )
    if batch is not None and other_batch is not None and batch != other_batch:
        raise ValueError(
            f"{where}: expected equal batch sizes, got {_fmt_batch(batch)} and "
            f"{_fmt_batch(other_batch)}."
        )


def check_factor(where: str, name: str, x: object, batch_size: int | None) -> int | None:
    """A Kronecker factor: ``int`` n (for ``I_n``), a matrix ``(r, c)`` (shared) or ``(B, r, c)``.

    Returns the factor's batch size (``None`` when shared; a leading 1 also means shared).
    """
    if isinstance(x, bool):
        raise TypeError(f"{where}: expected {name} to be an int or a tensor, got bool.")
    if isinstance(x, int):
        if x < 0:
            raise ValueError(f"{where}: expected {name} = n >= 0 for I_n, got {x}.")
        return None
    t = check_tensor(where, name, x)
    if not t.dtype.is_floating_point:
        raise TypeError(
            f"{where}: expected a floating-point {name}, got dtype {t.dtype}. Convert it with "
            f".double() or .float()."
        )
    if t.ndim not in (2, 3):
        raise ValueError(
            f"{where}: expected {name} to be a matrix (r, c) or a batch of them (B, r, c), got "
            f"shape {tuple(t.shape)}."
        )
    if t.ndim == 2 or t.shape[0] == 1:
        return None
    if batch_size is not None and t.shape[0] != batch_size:
        raise ValueError(
            f"{where}: expected {name} with batch size {batch_size}, got shape {tuple(t.shape)}."
        )
    return int(t.shape[0])


def check_operator_shapes(
    where: str, out_shape: object, in_shape: object, out_numel: int, in_numel: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """An operator's ``out_shape`` / ``in_shape`` must hold as many elements as its factors say."""
    outs = check_shape_numel(where, "out_shape", out_shape, out_numel)
    ins = check_shape_numel(where, "in_shape", in_shape, in_numel)
    return outs, ins


# Sensitivity analysis (jacbatch.sensitivity)
# ---------------------------------------------------------------------------------------------


def check_batch_size(where: str, batch_size: object) -> int | None:
    if batch_size is None:
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(
            f"{where}: expected batch_size to be a non-negative int or None, got {batch_size!r}."
        )
    return batch_size


def check_batch_sizes(where: str, batch_size: object, found: Sequence[int | None]) -> int | None:
    """The batch of an operator: ``batch_size`` if given, else the per-sample tensors' one."""
    b = check_batch_size(where, batch_size)
    for n in found:
        if n is None:
            continue
        if b is None:
            b = n
        elif n != b:
            raise ValueError(
                f"{where}: expected per-sample tensors with batch size {b}, got {n}. Give every "
                f"batched factor the same leading size, or a leading 1 (or none) to share it."
            )
    return b


def check_operator(where: str, name: str, x: object, cls: type) -> None:
    if not isinstance(x, cls):
        raise TypeError(
            f"{where}: expected {name} to be a JacobianOperator, got {type(x).__name__}. "
            f"Wrap a dense Jacobian with jacbatch.structured.DenseJacobian."
        )


def check_operator_list(where: str, name: str, items: Sequence[object], cls: type) -> None:
    if len(items) == 0:
        raise ValueError(f"{where}: expected at least one {name}, got none.")
    for i, x in enumerate(items):
        check_operator(where, f"{name}[{i}]", x, cls)


def check_diagonal(where: str, diag: object, batched: bool) -> torch.Tensor:
    d = check_tensor(where, "diag", diag)
    if not d.dtype.is_floating_point:
        raise TypeError(f"{where}: expected a floating-point diag, got dtype {d.dtype}.")
    if batched and d.ndim == 0:
        raise ValueError(
            f"{where}: expected diag of shape (B, *shape) with batched=True, got a scalar. "
            f"Pass batched=False for a diagonal shared by the batch."
        )
    return d


def check_dense_jacobian(
    where: str, J: object, out_shape: tuple[int, ...], in_shape: tuple[int, ...]
) -> tuple[torch.Tensor, bool]:
    """A dense Jacobian ``(*out_shape, *in_shape)`` or ``(B, *out_shape, *in_shape)``;
    returns it and whether it has the leading batch dimension."""
    t = check_tensor(where, "jacobian", J)
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where}: expected a floating-point jacobian, got dtype {t.dtype}.")
    sample = (*out_shape, *in_shape)
    if tuple(t.shape) == sample:
        return t, False
    if t.ndim == len(sample) + 1 and tuple(t.shape[1:]) == sample:
        return t, True
    raise ValueError(
        f"{where}: expected jacobian of shape {sample} or (B, *{sample}) for out_shape "
        f"{out_shape} and in_shape {in_shape}, got {tuple(t.shape)}. Pass the natural layout "
        f"of jacobian(..., vec=None)."
    )


def check_permutation(where: str, dims: object, ndim: int) -> tuple[int, ...]:
    try:
        perm = tuple(int(d) for d in dims)  # type: ignore[attr-defined]
    except TypeError:
        raise TypeError(
            f"{where}: expected dims to be a tuple of ints, got {type(dims).__name__}."
        ) from None
    if sorted(perm) != list(range(ndim)):
        raise ValueError(
            f"{where}: expected dims to be a permutation of {tuple(range(ndim))}, got {perm}."
        )
    return perm


# jacbatch.distributed: the process group, the options, and agreement between ranks
# ---------------------------------------------------------------------------------------------


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


def disk_too_small(where: str, path: str, nbytes: int, free: int) -> NoReturn:
    import errno

    raise OSError(
        errno.ENOSPC,
        f"{where}: expected room for the Jacobian file on disk, got {_fmt_bytes(nbytes)} to "
        f"write to {path!r} with {_fmt_bytes(free)} free on its file system. Free some space, "
        f"write to another file system, or use jacbatch.iter_jacobian to reduce the Jacobian "
        f"chunk by chunk",
    )
