"""Pytrees in and out of :func:`jacbatch.jacobian`, and ``has_aux``, with torch.func's semantics.

NOTE [Pytree calls: one flat call of the same machinery]
    ``jacobian(f, params, x, in_dims=(None, 0))`` with ``params`` a dict of tensors is, in
    torch.func, ``vmap(jacrev(f), in_dims=(None, 0))(params, x)``. Here it becomes ONE call of
    the tensor machinery (plan, routes, chunking, the repeated-call programs), of a flat
    per-sample function:

    1. The arguments are flattened with :mod:`torch.utils._pytree` (what torch.func uses), and
       ``in_dims`` is broadcast over them as a prefix tree, as ``torch.func.vmap`` does. Every
       tensor leaf of the common dtype and device becomes one positional argument with its own
       in_dim; a shared leaf that cannot be one (an integer buffer such as BatchNorm's
       ``num_batches_tracked``, a Python number, a tensor of another dtype) is a constant of the
       flat function. The differentiated arguments' leaves are its argnums.
    2. The flat function rebuilds the caller's arguments (``tree_unflatten``), calls ``func``,
       drops ``aux`` with ``has_aux=True``, and returns a single tensor output as it is (the
       tensor path, unchanged), or else the output leaves flattened and concatenated into one
       vector per sample (``cat``, which the traced route has a rule for). With ``vec="col"``
       each leaf is flattened in column-major order, so the rows come out in the order ``vec``
       asks for.
    3. The machinery's result, per differentiated leaf ``(B, O, *leaf_shape)``, is split along
       its rows into the output leaves and nested as ``torch.func.jacrev`` nests: the output
       tree, each output leaf holding the differentiated argument's tree (a tuple of those for
       tuple ``argnums``).
    4. With ``has_aux=True``, ``aux`` comes from one more batched evaluation of ``func``
       (``torch.func.vmap`` with the call's ``randomness``, per sample where vmap refuses
       ``func``), under the same protection of the caller's state as the Jacobian's
       evaluations; it is batched like the output, as ``vmap(jacrev(f, has_aux=True))``
       returns it. A ``func`` that draws random numbers with ``randomness="different"`` gets
       another draw for ``aux`` than for the Jacobian.

    The flat function is a new closure per call, of one code object per ``func`` (per code
    object for plain functions, as :mod:`jacbatch.repeated` keys them): Dynamo's guards compare
    the closure (the tree structures by value, the constants), so a loop of pytree calls is
    captured once and becomes hot in :mod:`jacbatch.repeated` like a tensor call, while two
    functions never share a capture cache or a repeated-call table. The output's structure is
    noted by the flat function whenever it runs eagerly (the probe, the value checks); Dynamo
    does not see that branch (``torch.compiler.is_compiling``).

    A call whose arguments are all tensors, with ``in_dims`` an int, ``None`` or a flat
    sequence, and ``has_aux=False`` takes the tensor path; only when its ``func`` returns a
    tuple, list or dict does it come here (the tensor path refuses such an output at its probe,
    before any work, so such a call pays one probe more than a pytree call).

    ``out=`` takes a tree of buffers shaped like the result when ``func`` returns one tensor:
    the routes write into them directly. For a tree output the rows of every output leaf come
    from one concatenated Jacobian per differentiated leaf, which no set of separate buffers
    can be, so ``out=`` is refused there rather than filled through a hidden full-size copy.
"""

from __future__ import annotations

import contextlib
import math
import types
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pt

from . import _probe, _state, repeated
from . import _validation as V
from .executor import execute
from .request import Request, build_request

#: One copy of the flat function's code per ``func`` (see NOTE [Pytree calls]).
_CODES: weakref.WeakKeyDictionary[Any, types.CodeType] = weakref.WeakKeyDictionary()


def is_tree_call(args: Sequence[object], in_dims: object, has_aux: object) -> bool:
    """Whether a call needs the pytree path: a non-tensor argument, a nested ``in_dims`` or
    ``has_aux``. Cheap: the tensor path's calls pay one pass over ``args``."""
    if has_aux is not False:
        return True
    if not all(isinstance(a, torch.Tensor) for a in args):
        return True
    if isinstance(in_dims, (tuple, list)):
        return not all(d is None or isinstance(d, int) for d in in_dims)
    return False


@dataclass
class _Noted:
    """The output's structure, noted when the flat function runs eagerly."""

    spec: Any = None
    shapes: tuple[tuple[int, ...], ...] = ()
    single: bool = True


@dataclass
class Flat:
    """A pytree call as a call of one flat per-sample function of tensors.

    Attributes:
        func: the flat function ``func(*args) -> (O,)`` or the single output tensor.
        aux: the same flat function returning ``aux`` (``has_aux=True``), else ``None``.
        args: the flat positional tensors.
        in_dims: per flat argument, its batch dimension (non-negative) or ``None``.
        argnums: the flat positions of the differentiated leaves, in the caller's order.
        groups: per caller argnum, its tree structure and how many leaves it has.
        tuple_argnums: the caller passed a tuple ``argnums``.
        batch_size: ``B``, or ``None`` without a batched leaf.
        noted: the output's structure, filled when ``func`` runs.
    """

    func: Callable[..., torch.Tensor]
    aux: Callable[..., Any] | None
    args: tuple[torch.Tensor, ...]
    in_dims: tuple[int | None, ...]
    argnums: tuple[int, ...]
    groups: tuple[tuple[Any, int], ...]
    tuple_argnums: bool
    batch_size: int | None
    noted: _Noted = field(default_factory=_Noted)


def _code(func: Callable[..., Any], base: types.CodeType) -> types.CodeType:
    owner = func.__code__ if isinstance(func, types.FunctionType) else func
    try:
        code = _CODES.get(owner)
        if code is None:
            code = _CODES[owner] = base.replace()
    except TypeError:  # not weakly referenceable: the shared code
        return base
    return code


def _flat_leaf(x: torch.Tensor, col: bool, lead: int) -> torch.Tensor:
    """``x`` as a row (per sample), row- or column-major; ``lead`` batch dimensions first."""
    if col and x.ndim - lead > 1:
        x = x.permute(*range(lead), *reversed(range(lead, x.ndim)))
    return x.reshape(*x.shape[:lead], -1)


def _primal(where: str, out: object) -> tuple[object, object]:
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(
            f"{where}: expected func to return a tuple (output, aux) with has_aux=True, got "
            f"{type(out).__name__}"
            + (f" of length {len(out)}" if isinstance(out, tuple) else "")
            + ". Return (output, aux), or pass has_aux=False."
        )
    return out[0], out[1]


def _note(where: str, out: object, noted: _Noted, lead: int) -> list[torch.Tensor]:
    """Check the output tree's leaves and note its structure (per-sample shapes)."""
    paths, spec = pt.tree_flatten_with_path(out)
    leaves: list[torch.Tensor] = []
    for path, x in paths:
        name = "output" + pt.keystr(path)
        if not isinstance(x, torch.Tensor):
            raise TypeError(
                f"{where}: expected every leaf of func's output to be a torch.Tensor, got "
                f"{name} of type {type(x).__name__}. Return tensors only (return other values "
                f"as aux with has_aux=True)."
            )
        if not x.dtype.is_floating_point:
            raise TypeError(
                f"{where}: expected floating-point output leaves, got {name} with dtype "
                f"{x.dtype}. Integer and bool outputs have no derivative: return them as aux "
                f"with has_aux=True, or return a float tensor."
            )
        leaves.append(x)
    if not leaves:
        raise ValueError(f"{where}: expected func to return at least one tensor, got {out!r}.")
    noted.spec = spec
    noted.shapes = tuple(tuple(x.shape[lead:]) for x in leaves)
    noted.single = isinstance(out, torch.Tensor)
    return leaves


def _make(
    where: str,
    func: Callable[..., Any],
    spec: Any,
    slots: tuple[int | None, ...],
    consts: tuple[Any, ...],
    has_aux: bool,
    col: bool,
    lead: int,
    noted: _Noted,
) -> tuple[Callable[..., torch.Tensor], Callable[..., Any] | None]:
    """The flat function (and its ``aux`` twin) of NOTE [Pytree calls], point 2."""

    def flat(*xs: torch.Tensor) -> torch.Tensor:
        leaves = [c if s is None else xs[s] for s, c in zip(slots, consts, strict=True)]
        out = func(*pt.tree_unflatten(leaves, spec))
        if has_aux:
            out = _primal(where, out)[0]
        if not torch.compiler.is_compiling():  # Dynamo does not see this branch
            _note(where, out, noted, lead)
        if isinstance(out, torch.Tensor):
            return out
        parts = [_flat_leaf(x, col, lead) for x in pt.tree_leaves(out)]
        return torch.cat(parts, dim=lead)

    def aux(*xs: torch.Tensor) -> Any:
        leaves = [c if s is None else xs[s] for s, c in zip(slots, consts, strict=True)]
        return _primal(where, func(*pt.tree_unflatten(leaves, spec)))[1]

    made = types.FunctionType(
        _code(func, flat.__code__), flat.__globals__, "flat", None, flat.__closure__
    )
    made.__qualname__ = getattr(func, "__qualname__", "flat")
    return made, (aux if has_aux else None)


def flatten(
    where: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: object,
    in_dims: object,
    *,
    has_aux: object = False,
    vec: object = None,
    batched: object = False,
) -> Flat:
    """The flat call of a pytree call (NOTE [Pytree calls], points 1-2).

    Raises:
        TypeError, ValueError: naming the offending leaf (``args[0]['fc.weight']``) and the fix.
    """
    if not callable(func):
        raise TypeError(
            f"{where}: expected func to be callable, got {type(func).__name__}. "
            f"Pass the function first, then its arguments: {where}(func, *args)."
        )
    if not isinstance(has_aux, bool):
        raise TypeError(f"{where}: expected has_aux to be a bool, got {type(has_aux).__name__}.")
    n = len(args)
    if n == 0:
        raise TypeError(f"{where}: expected at least one argument after func, got none.")
    diff_args, tuple_argnums = V.check_argnums(where, argnums, n)
    if isinstance(in_dims, list):
        in_dims = tuple(in_dims)
    if isinstance(in_dims, bool) or not (in_dims is None or isinstance(in_dims, (int, tuple))):
        raise TypeError(
            f"{where}: expected in_dims to be an int, None or a tuple (one entry per argument, "
            f"each an int, None or a tree matching that argument), got {type(in_dims).__name__}."
        )
    if isinstance(in_dims, tuple) and len(in_dims) != n:
        raise ValueError(
            f"{where}: expected in_dims to have one entry per argument ({n}), got "
            f"{len(in_dims)} entries: {in_dims!r}. Use None for arguments shared by the batch."
        )
    paths, spec = pt.tree_flatten_with_path(tuple(args))
    dims = pt._broadcast_to_and_flatten(in_dims, spec)
    if dims is None:
        raise ValueError(
            f"{where}: expected in_dims to be a prefix of the arguments' structure, as in "
            f"torch.func.vmap (an int or None for a whole argument, or a dict/tuple/list of "
            f"the same keys and lengths), got in_dims={in_dims!r} for arguments "
            f"{pt.tree_map(lambda x: type(x).__name__, tuple(args))!r}."
        )
    names = ["args" + pt.keystr(p) for p, _ in paths]
    leaves = [x for _, x in paths]
    owner = [p[0].idx for p, _ in paths]  # type: ignore[attr-defined]

    # The differentiated leaves: floating tensors of one dtype and device.
    diff = [i for i, a in enumerate(owner) if a in diff_args]
    for a in diff_args:
        if not any(owner[i] == a for i in diff):
            raise ValueError(
                f"{where}: expected args[{a}] (argnums) to hold at least one tensor, got "
                f"{type(args[a]).__name__} with none."
            )
    for i in diff:
        x = leaves[i]
        if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
            got = type(x).__name__ if not isinstance(x, torch.Tensor) else f"dtype {x.dtype}"
            raise TypeError(
                f"{where}: expected every leaf of a differentiated argument to be a "
                f"floating-point torch.Tensor, got {names[i]}: {got}. Convert it with "
                f"torch.as_tensor(..., dtype=torch.float64), or move it to an argument that is "
                f"not in argnums."
            )
    first = leaves[diff[0]]
    dtype, device = first.dtype, first.device
    for i in diff:
        if leaves[i].dtype != dtype:
            raise TypeError(
                f"{where}: expected the differentiated leaves to share one dtype, got "
                f"{names[diff[0]]}: {dtype} and {names[i]}: {leaves[i].dtype}. Cast them to one "
                f"dtype (e.g. model.double(), or {{k: v.double() for k, v in params.items()}})."
            )
        if leaves[i].device != device:
            raise ValueError(
                f"{where}: expected the differentiated leaves on one device, got "
                f"{names[diff[0]]}: {device} and {names[i]}: {leaves[i].device}. Move them "
                f"with .to(device)."
            )

    # in_dims per leaf, batch size, and which leaves are positional.
    slots: list[int | None] = []
    consts: list[Any] = []
    flat_args: list[torch.Tensor] = []
    flat_dims: list[int | None] = []
    sizes: dict[int, int] = {}
    diff_set = set(diff)  # differentiated leaves are usable (checked above)
    position: dict[int, int] = {}
    for i, (x, d) in enumerate(zip(leaves, dims, strict=True)):
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, int):
                raise TypeError(
                    f"{where}: expected the in_dim of {names[i]} to be an int or None, got "
                    f"{type(d).__name__}."
                )
            if not isinstance(x, torch.Tensor) or x.ndim == 0 or not -x.ndim <= d < x.ndim:
                shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(
                    f"{where}: expected the in_dim of {names[i]} to be one of its dimensions "
                    f"(got {shape}), got {d}. Use None for a leaf shared by the whole batch."
                )
            d %= x.ndim
            sizes[i] = x.shape[d]
        usable = (
            isinstance(x, torch.Tensor)
            and x.dtype == dtype
            and x.device == device
            and x.layout == torch.strided
        )
        if i in diff_set or usable or d is not None:
            if not usable:
                raise TypeError(
                    f"{where}: expected batched leaves to be dense tensors of the "
                    f"differentiated dtype {dtype} on {device}, got {names[i]}"
                    + (
                        f" with dtype {x.dtype} on {x.device}."
                        if isinstance(x, torch.Tensor)
                        else f" of type {type(x).__name__}."
                    )
                    + " Cast it, or pass it unbatched (in_dim None) or close over it in func."
                )
            position[i] = len(flat_args)
            slots.append(len(flat_args))
            consts.append(None)
            flat_args.append(x)
            flat_dims.append(d)
        else:  # a shared leaf of another kind: a constant of the flat function
            slots.append(None)
            consts.append(x)
    if len(set(sizes.values())) > 1:
        listing = ", ".join(f"{names[i]} has {s}" for i, s in sizes.items())
        raise ValueError(
            f"{where}: expected one batch size for all batched leaves, got {listing}. Check "
            f"in_dims, or mark shared leaves with None."
        )
    batch_size = next(iter(sizes.values())) if sizes else None
    lead = 1 if batched is True else 0
    noted = _Noted()
    flat, aux = _make(
        where, func, spec, tuple(slots), tuple(consts), has_aux, vec == "col", lead, noted
    )
    groups = tuple(
        (pt.tree_structure(args[a]), sum(1 for i in diff if owner[i] == a)) for a in diff_args
    )
    order = [i for a in diff_args for i in diff if owner[i] == a]
    return Flat(
        flat, aux, tuple(flat_args), tuple(flat_dims), tuple(position[i] for i in order),
        groups, tuple_argnums, batch_size, noted,
    )  # fmt: skip


def flat_call(
    where: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: object,
    in_dims: object,
    **kw: Any,
) -> tuple[Callable[..., torch.Tensor], tuple[torch.Tensor, ...], tuple[int, ...], Any]:
    """``(func, args, argnums, in_dims)`` of the flat call (for :func:`jacbatch.explain` and
    :func:`jacbatch.estimate_memory`); ``kw``: as for :func:`flatten`."""
    flat = flatten(where, func, args, argnums, in_dims, **kw)
    return flat.func, flat.args, flat.argnums, flat.in_dims


def nest(flat: Flat, jacs: Sequence[torch.Tensor], vec: str | None) -> Any:
    """The machinery's per-leaf Jacobians split into the output leaves and nested as
    ``torch.func.jacrev`` nests them (NOTE [Pytree calls], point 3)."""
    noted = flat.noted
    lead = 0 if flat.batch_size is None else 1
    blocks: list[list[torch.Tensor]] = []  # per differentiated leaf, per output leaf
    for J in jacs:
        if noted.single:
            blocks.append([J])
            continue
        sizes = [math.prod(s) for s in noted.shapes]
        parts = torch.split(J, sizes, dim=lead)
        if vec is None:
            in_shape = J.shape[lead + 1 :]
            parts = tuple(
                p.reshape(*J.shape[:lead], *s, *in_shape)
                for p, s in zip(parts, noted.shapes, strict=True)
            )
        blocks.append(list(parts))
    per_out = []
    for k in range(len(noted.shapes)):
        start, per_arg = 0, []
        for spec, count in flat.groups:
            per_arg.append(pt.tree_unflatten([b[k] for b in blocks[start : start + count]], spec))
            start += count
        per_out.append(tuple(per_arg) if flat.tuple_argnums else per_arg[0])
    return pt.tree_unflatten(per_out, noted.spec)


def flat_outs(where: str, flat: Flat, out: object) -> tuple[torch.Tensor, ...]:
    """The caller's ``out`` tree as one buffer per differentiated leaf (a single output
    tensor only: the buffers are written by the routes directly)."""
    specs = [spec for spec, _ in flat.groups]
    trees = [pt.tree_unflatten([0] * spec.num_leaves, spec) for spec in specs]
    want = pt.tree_structure(tuple(trees) if flat.tuple_argnums else trees[0])
    bufs, got = pt.tree_flatten(out)
    if got != want or not all(isinstance(b, torch.Tensor) for b in bufs):
        raise TypeError(
            f"{where}: expected out to be a tree of tensors like the Jacobian ({want}), got "
            f"{got}. Allocate one buffer per differentiated leaf, or drop out=."
        )
    return tuple(bufs)


def note_output(flat: Flat) -> None:
    """Run the flat function once, on meta tensors where it can (the probe), to note the
    output's structure."""
    shapes = [
        tuple(s for j, s in enumerate(x.shape) if j != d)
        for x, d in zip(flat.args, flat.in_dims, strict=True)
    ]
    first = [
        x if d is None else x.select(d, 0) for x, d in zip(flat.args, flat.in_dims, strict=True)
    ]
    _probe.probe(flat.func, shapes, flat.args[0].dtype, lambda: first)


def batched_aux(flat: Flat, req: Request | None, randomness: str, batched: bool) -> Any:
    """``aux`` batched like the output (NOTE [Pytree calls], point 4), under the protections
    of ``req``'s plan (none after a repeated call's program: a hot key needs none)."""
    assert flat.aux is not None
    protection: contextlib.AbstractContextManager[Any]
    if req is None:
        protection = contextlib.nullcontext(flat.aux)
    else:
        protection = _state.protect(flat.aux, req.plan.protection, req.call.device)
    with protection as f:
        if flat.batch_size is None or batched:
            return f(*flat.args)
        try:
            return torch.func.vmap(f, in_dims=flat.in_dims, randomness=randomness)(*flat.args)
        except RuntimeError:  # vmap refuses func (.item(), data-dependent control flow)
            samples = [
                f(
                    *[
                        x if d is None else x.select(d, b)
                        for x, d in zip(flat.args, flat.in_dims, strict=True)
                    ]
                )
                for b in range(flat.batch_size)
            ]
            return pt.tree_map(lambda *xs: torch.stack(xs), *samples)


def jacobian(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: object,
    in_dims: object,
    has_aux: bool,
    out: object,
    options: dict[str, Any],
) -> Any:
    """:func:`jacbatch.jacobian` for a pytree call (NOTE [Pytree calls])."""
    where = "jacobian"
    vec, batched = options["vec"], options["batched"]
    flat = flatten(where, func, args, argnums, in_dims, has_aux=has_aux, vec=vec, batched=batched)
    fargnums = flat.argnums
    plain = out is None and options["create_graph"] is False
    key = (
        fargnums, flat.in_dims, options["method"], vec, options["chunk_size"],
        options["max_memory"], options["randomness"], options["progress"], batched,
    )  # fmt: skip
    jacs = repeated.run(flat.func, flat.args, key) if plain else None
    req = None
    if jacs is None:
        bufs = None if out is None else flat_outs(where, flat, out)
        if bufs is not None:
            note_output(flat)
        if bufs is not None and not flat.noted.single:
            raise ValueError(
                f"{where}: expected func to return a single tensor with out=, got an output "
                f"tree {flat.noted.spec}. The routes write one tensor per differentiated leaf; "
                f"drop out= (the result is a tree of views of one tensor per leaf), or return "
                f"one tensor (torch.cat of the flattened outputs)."
            )
        req = build_request(
            where, flat.func, flat.args, fargnums, flat.in_dims, out=bufs, **options
        )
        jacs = execute(req)
        if plain:
            repeated.record(flat.func, flat.args, key, req)
    if flat.noted.spec is None:  # a program ran without an eager run of func: note it now
        note_output(flat)
    result = nest(flat, jacs, vec)  # type: ignore[arg-type]
    if not has_aux:
        return result
    return result, batched_aux(flat, req, options["randomness"], batched is True)


__all__ = [
    "Flat",
    "batched_aux",
    "flat_call",
    "flatten",
    "is_tree_call",
    "jacobian",
    "nest",
    "note_output",
]
