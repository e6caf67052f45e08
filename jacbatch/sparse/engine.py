"""``jacobian(..., sparse=...)``, ``iter_jacobian(..., sparse=...)`` and ``explain(...,
sparse=...)``: the sparse path, from the validated call to batched sparse CSR results.

(A little over 600 lines: the steps of the NOTE below and their fall-backs stay in one module
that reads in the NOTE's order; the pattern check lives in :mod:`jacbatch.sparse.checks`, the
sizes and chunks in :mod:`jacbatch.sparse.sizing`, repeated calls in :mod:`jacbatch.sparse._hot`,
the passes in :mod:`jacbatch.sparse.compressed`, the closed form in :mod:`jacbatch.sparse.closed`.)

NOTE [Sparse Jacobians: what a call does]
    1. The call is validated and probed as every call is (:func:`jacbatch.plan.normalize`,
       :func:`jacbatch.plan.probed`): arguments, ``in_dims``, ``argnums``, the output shape.
    2. Per argnum, the pattern: the caller's :class:`SparsityPattern` (checked against the
       per-sample shapes), or, with ``sparse=True``, :func:`jacbatch.sparse.detect.detect`'s.
    3. The coloring (:func:`jacbatch.sparse.coloring.color`, cached per pattern): the mode
       with fewer colors, or the one ``method`` names (``"jacfwd"``: columns, ``"jacrev"``:
       rows). A function that switches grad mode off inside cannot be seen by forward mode, so
       it is colored by rows (``method="jacfwd"`` refuses it, as for dense Jacobians).
    4. The compressed passes and the gather (NOTE [Compressed Jacobians] and NOTE [One gather
       into the values] in :mod:`jacbatch.sparse.compressed`), in batch chunks (and color
       chunks when one sample's passes do not fit) within the working-memory budget, into
       ``(B, nnz)`` values. Where the traced closed form covers an argnum and its working
       memory is acceptable, it writes that argnum's values instead, only at the nonzeros
       (NOTE [Sampling lettered terms at the nonzeros] and NOTE [When the closed form writes a
       sparse Jacobian] in :mod:`jacbatch.sparse.closed`); its graph's output is checked
       against ``func`` on the first sample, and anything it cannot do falls back to the
       passes.
    5. The NaN policy (NOTE [Non-finite values: one policy] in :mod:`jacbatch._nonfinite`):
       samples whose arguments or values are not finite (after forward mode, also those with a
       non-finite intermediate) are recomputed by per-sample reverse mode, one pull-back per
       row, and their entries gathered; compression would otherwise mix a NaN of one column
       (row) into the other columns (rows) of its color. Values the closed form wrote follow
       the dense traced route's policy: samples with a non-finite argument or value.
    6. The pattern check (:mod:`jacbatch.sparse.checks`): on every sample, one random product
       in the *other* mode (a VJP after column mode, a JVP after row mode) is compared with
       the same product of the decompressed Jacobian. A pattern that misses a dependence makes
       them differ where the missed entry is nonzero (a random direction cancels the missing
       entries with probability zero); the columns (rows) that differ are then computed
       exactly on the first such sample, the entries outside the pattern counted, and the
       call refused with ``ValueError`` naming ``sparse=``. Checking in the other mode also
       catches a forward-mode error that the compressed passes would share. The check costs
       one pass over the batch. A repeated call may reuse steps 1-3 and skip
       this check where the pattern contains the structural one (NOTE [Repeated sparse calls]
       in :mod:`jacbatch.sparse._hot`).
    7. The result: a sparse CSR tensor ``(B, out_numel, in_numel)`` (``(out_numel, in_numel)``
       without a batch), its index tensors shared by the batch (expanded views), row-major vec
       (``vec=None`` or ``"row"``) or column-major (``vec="col"``: indices renumbered, entries
       reordered). ``.to_dense()`` gives the flattened dense Jacobian.

    ``create_graph`` works through torch.func: the values carry a graph when the result must
    be differentiable (differentiate through ``J.values()``; torch 2.13 has no backward for
    a batched CSR tensor's ``to_dense``). ``randomness`` other than ``"error"`` is refused:
    each color's pass would see its own draw.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import _nonfinite, _torch_bugs, memory
from .. import _validation as V
from ..call import Call
from ..methods import batched_args, in_transform
from ..plan import forward_ok, normalize, probed
from . import _gaps
from .checks import check_pattern, reverse_entries
from .coloring import Coloring, color
from .compressed import Layout, compressed_values, to_csr
from .pattern import SparsityPattern
from .sizing import chunking, unit_bytes

_MODE_OF_METHOD = {"auto": "auto", "jacfwd": "column", "jacrev": "row", "closed_form": "auto"}
_METHOD_OF_MODE = {"auto": "auto", "column": "jacfwd", "row": "jacrev"}


@dataclass(frozen=True)
class Part:
    """One differentiated argument: its pattern, coloring and gather layout."""

    argnum: int
    pattern: SparsityPattern
    coloring: Coloring
    layout: Layout
    given: bool  # the caller's pattern (checked by a random product), not detected


@dataclass(frozen=True)
class Prepared:
    """A validated sparse call (NOTE [Sparse Jacobians: what a call does], steps 1-3)."""

    call: Call
    out_shape: tuple[int, ...]
    parts: tuple[Part, ...]
    vec: str
    budget: int
    show: bool | None
    chunk_size: int | None = None
    method: str = "auto"
    #: per part: whether the traced closed form writes its values, and why (or why not)
    closed: tuple[tuple[bool, str], ...] = ()


@dataclass(frozen=True)
class SparsePlan:
    """What ``explain(..., sparse=...)`` reports: per argnum the pattern and both colorings."""

    batch_size: int | None
    out_shape: tuple[int, ...]
    lines: tuple[str, ...]

    def __str__(self) -> str:
        batch = "no batch" if self.batch_size is None else f"B={self.batch_size}"
        return "\n".join([f"sparse jacobian plan ({batch}, out {self.out_shape}):", *self.lines])


def _check_sparse(where: str, sparse: object, n_argnums: int) -> list[SparsityPattern | None]:
    """``True`` -> detect every argnum; a pattern (a tuple of them for tuple argnums)."""
    if sparse is True:
        return [None] * n_argnums
    given = sparse if isinstance(sparse, tuple) else (sparse,)
    if not given or not all(isinstance(p, SparsityPattern) for p in given):
        raise TypeError(
            f"{where}: expected sparse to be False, True or a jacbatch.sparse.SparsityPattern "
            f"(a tuple of them, one per argnum, for tuple argnums), got "
            f"{type(sparse).__name__}. Pass sparse=True to detect the pattern, or build one "
            f"with SparsityPattern.from_mask / from_coo."
        )
    if len(given) != n_argnums:
        raise ValueError(
            f"{where}: expected {n_argnums} sparsity pattern(s), one per argnum, got {len(given)}."
        )
    return list(given)


def _detect(where: str, call: Call, argnum: int) -> SparsityPattern:
    """The detected pattern (``sparse=True``; :func:`jacbatch.sparse.detect.detect` raises
    :class:`~jacbatch.sparse.detect.NoPatternError` where no pattern can be given)."""
    from .detect import detect

    batched = call.batched_func is not None
    func = call.batched_func if call.batched_func is not None else call.func
    pattern = detect(func, call.args, argnum, call.in_dims, batched=batched, copy=False)
    assert isinstance(pattern, SparsityPattern)
    return _canonical(pattern)


#: Detected patterns seen lately, by content. Detection hands out its cached object (the same
#: one on every call) where it caches; a pattern it could not cache (one shaped by a lifted
#: tensor's values) is new on every call, and the coloring and gather layout are cached per
#: pattern object, so an equal one is mapped to the first object seen (at most this many kept).
_SEEN_MAX = 32
_SEEN: dict[tuple[Any, ...], SparsityPattern] = {}
#: What :func:`_canonical` answered per pattern object (weakly both ways: a pattern that is
#: its own answer must not keep itself alive): met again, it needs no hashing.
_CANONICAL: weakref.WeakKeyDictionary[SparsityPattern, weakref.ref[SparsityPattern]] = (
    weakref.WeakKeyDictionary()
)


def _canonical(pattern: SparsityPattern) -> SparsityPattern:
    """The first-seen pattern equal to ``pattern`` (its coloring cached), else ``pattern``."""
    ref = _CANONICAL.get(pattern)
    known = ref() if ref is not None else None
    if known is not None:
        return known
    crow, col = pattern.crow_indices.cpu(), pattern.col_indices.cpu()
    digest = hashlib.blake2b(crow.numpy().tobytes(), digest_size=16)
    digest.update(col.numpy().tobytes())
    key = (tuple(pattern.out_shape), tuple(pattern.in_shape), pattern.nnz, digest.digest())
    seen = _SEEN.get(key)
    if seen is None:
        if len(_SEEN) >= _SEEN_MAX:
            _SEEN.pop(next(iter(_SEEN)))
        seen = _SEEN[key] = pattern
    _CANONICAL[pattern] = weakref.ref(seen)
    return seen


def prepare(
    where: str,
    func: Callable[..., Any],
    args: tuple[Any, ...],
    *,
    argnums: object,
    in_dims: object,
    sparse: object,
    method: object,
    vec: object,
    chunk_size: object = None,
    max_memory: object = None,
    progress: object,
    randomness: object,
    create_graph: object,
    batched: object,
    has_aux: object = False,
    rows: frozenset[int] = frozenset(),
) -> Prepared:
    """Steps 1-3 of NOTE [Sparse Jacobians: what a call does]; ``rows``: argnums colored by
    rows whatever ``method`` (NOTE [Forward-mode gaps fall back to rows] in :mod:`jacbatch.sparse._gaps`)."""
    if has_aux is not False:
        raise ValueError(f"{where}: expected has_aux=False with sparse=, got {has_aux!r}.")
    if method not in _MODE_OF_METHOD:
        raise ValueError(
            f"{where}: expected method to be one of 'auto', 'jacfwd' (column coloring, one "
            f"JVP per color), 'jacrev' (row coloring, one VJP per color) or 'closed_form' (the "
            f"traced rules written at the nonzeros) with sparse=, got {method!r}."
        )
    if V.check_randomness(where, randomness) != "error":
        raise ValueError(
            f"{where}: expected randomness='error' with sparse=, got {randomness!r}: each "
            f"color's pass would see its own random draw. Use sparse=False."
        )
    call = normalize(where, func, args, argnums, in_dims, randomness, batched)
    if in_transform(call.args):
        raise NotImplementedError(
            f"{where}: sparse= is not supported inside a torch.func transform (grad, vjp, "
            f"jacrev, jacfwd, vmap): a sparse CSR tensor cannot hold transformed values. Call "
            f"it outside the transform, or use sparse=False."
        )
    checked_vec = V.check_vec(where, vec) or "row"
    show = V.check_progress(where, progress)
    size = V.check_chunk_size(where, chunk_size)
    budget = (
        memory.default_budget(call.device)
        if max_memory is None
        else memory.parse_bytes(where, max_memory)
    )
    call, out_shape = probed(call, V.check_bool(where, "create_graph", create_graph))
    mode = _MODE_OF_METHOD[str(method)]
    if not forward_ok(call):
        if mode == "column":
            raise ValueError(
                f"{where}: method='jacfwd' (column coloring) cannot see a function that "
                f"switches grad mode off inside (forward mode ignores torch.no_grad); use "
                f"method='jacrev' or 'auto'."
            )
        mode = "row"
    mode = _around_known_bugs(where, call, mode)
    patterns = _check_sparse(where, sparse, len(call.argnums))
    parts = []
    for a, given in zip(call.argnums, patterns, strict=True):
        in_shape = call.sample_shape(a)
        if given is None:
            pattern = _detect(where, call, a)
        else:
            pattern = given
            if (tuple(pattern.out_shape), tuple(pattern.in_shape)) != (out_shape, in_shape):
                raise ValueError(
                    f"{where}: expected sparse= pattern for argnum {a} with out_shape "
                    f"{out_shape} and in_shape {in_shape} (per sample), got out_shape "
                    f"{tuple(pattern.out_shape)}, in_shape {tuple(pattern.in_shape)}."
                )
        part_mode, loop = mode, False
        if mode != "row" and (a in rows or _gaps.known(call, a)):
            if mode == "column" and method == "jacfwd":
                raise _gaps.jacfwd_error(where, a)
            part_mode, loop = "row", _gaps.row_loop(where, call)
        coloring = color(pattern, part_mode)
        layout = _layout(pattern, coloring, call, loop)
        parts.append(Part(a, pattern, coloring, layout, given is not None))
    prep = Prepared(call, out_shape, tuple(parts), checked_vec, budget, show, size, str(method))
    return dataclasses.replace(prep, closed=_closed_decisions(prep, str(method)))


def _closed_decisions(prep: Prepared, method: str) -> tuple[tuple[bool, str], ...]:
    """Per part, whether the traced closed form writes its values (NOTE [When the closed form
    writes a sparse Jacobian] in :mod:`jacbatch.sparse.closed`).

    NOTE [The closed form is chosen for memory]
        ``method="closed_form"`` asks for it (refused with ``NotImplementedError`` where it
        cannot run: an op without a rule, or a working memory over the budget or over a few
        times the passes', the 0/1 selection factors of ``x[1:]`` at ``n = 10⁴``). ``"auto"`` takes it only where the compressed passes of the whole batch
        do not fit the working-memory budget in one pass (they would be chunked) and the
        closed form is allowed: on time alone the passes measured as fast or faster (the
        Brusselator at B = 64: 45.6 ms against 56.0 ms on a full call, bench/README.md), and
        deciding costs a capture of ``func`` (about a second on its first call). ``"jacfwd"``/``"jacrev"``
        ask for the passes.
    """
    from . import closed

    if method not in ("auto", "closed_form"):
        return tuple(
            (False, f"closed form: method={method!r} asks for the passes") for _ in prep.parts
        )
    B = prep.call.batch_size if prep.call.batch_size is not None else 1
    target = memory.chunk_target(prep.budget, prep.call.device)
    verdicts = []
    item = torch.empty((), dtype=prep.call.dtype).element_size()
    for part in prep.parts:
        # the generous bound of sizing.chunking first: no simulation where it settles it
        m, n = part.pattern.shape
        bound = 12 * (m + n) * item * part.coloring.n_colors * B
        passes = bound if bound <= target else unit_bytes(prep, part) * part.coloring.n_colors * B
        if method == "auto" and passes <= target:
            verdicts.append(
                (False, "they fit the budget in one pass; method='closed_form' writes the "
                 "nonzeros from the traced rules")
            )  # fmt: skip
            continue
        # the passes' simulated size, not the bound: the closed form may hold a few times it
        use, why = closed.decide(
            prep.call,
            part,
            prep.budget,
            lambda part=part: unit_bytes(prep, part) * part.coloring.n_colors * B,  # type: ignore[misc]
        )
        if method == "closed_form" and not use:
            raise NotImplementedError(
                f"jacobian: method='closed_form' with sparse= writes argnum {part.argnum}'s "
                f"nonzeros from the traced rules, which cannot run here: {why}. Use "
                f"method='auto' (the compressed passes)."
            )
        verdicts.append((use, why))
    return tuple(verdicts)


def _around_known_bugs(where: str, call: Call, mode: str) -> str:
    """``mode`` ("auto", "column" or "row"), narrowed to the coloring whose passes no known
    torch bug (:mod:`jacbatch._torch_bugs`) makes wrong for the probed ops.

    Column passes are JVPs under ``vmap`` (what ``jacfwd`` runs), row passes a ``vmap`` of a
    pull-back over seeds (what ``jacrev`` runs), so the bugs listed for those routes apply.
    """
    ops = call.probe.ops if call.probe is not None else frozenset()
    bugs = {
        "column": _torch_bugs.affecting(ops, "jacfwd"),
        "row": _torch_bugs.affecting(ops, "jacrev"),
    }
    wanted = ("column", "row") if mode == "auto" else (mode,)
    fine = [m for m in wanted if not bugs[m]]
    if fine:
        return fine[0] if mode != "auto" or len(fine) == 1 else "auto"
    names = ", ".join(sorted({f"{b.name} ({b.what})" for m in wanted for b in bugs[m]}))
    raise NotImplementedError(
        f"{where}: {_torch_bugs.NOTE_PREFIX}: {names}; the sparse passes "
        f"({'method=' + repr(_METHOD_OF_MODE[mode]) if mode != 'auto' else 'both colorings'}) "
        f"would be wrong for this function. Use the dense jacobian (sparse=False), which "
        f"routes around it" + (", or method='auto'." if mode != "auto" else ".")
    )


_LAYOUTS: weakref.WeakKeyDictionary[SparsityPattern, dict[Any, Layout]] = (
    weakref.WeakKeyDictionary()
)


def _layout(pattern: SparsityPattern, coloring: Coloring, call: Call, loop: bool = False) -> Layout:
    """:meth:`Layout.of`, cached per pattern object, mode, dtype, device (as the coloring
    is) and ``loop``, so that no index or seed tensor is built per call."""
    cache = _LAYOUTS.setdefault(pattern, {})
    key = (coloring.mode, call.dtype, str(call.device), loop)
    if key not in cache:
        cache[key] = Layout.of(pattern, coloring, call.dtype, call.device, loop)
    return cache[key]


def _sub_call(call: Call, start: int, n: int) -> Call:
    args = tuple(
        a if d is None else memory.compact(a.narrow(d, start, n))
        for a, d in zip(call.args, call.in_dims, strict=True)
    )
    return dataclasses.replace(call, args=args, batch_size=n)


def values_of(
    prep: Prepared,
    call: Call,
    color_chunks: Sequence[int],
    bufs: Sequence[torch.Tensor | None],
    computed: Sequence[torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """``(B, nnz)`` values per argnum for ``call`` (the prepared call or a batch chunk of it),
    the NaN policy applied (NOTE [Sparse Jacobians: what a call does], steps 4-5).
    ``computed``: the compressed passes' values already gathered (a kept program's, NOTE
    [Repeated sparse calls] in :mod:`jacbatch.sparse._hot`); the NaN policy still applies."""
    args, flags, B = batched_args(call)
    if B == 0:
        return [
            buf
            if buf is not None
            else torch.empty((0, p.pattern.nnz), dtype=call.dtype, device=call.device)
            for p, buf in zip(prep.parts, bufs, strict=True)
        ]
    results = []
    closed: dict[int, torch.Tensor] = {}
    if computed is None and any(use for use, _ in prep.closed):
        closed = _closed(prep, call, bufs)
    grad = torch.enable_grad() if call.create_graph else torch.no_grad()
    with grad:
        for i, (part, cc, buf) in enumerate(zip(prep.parts, color_chunks, bufs, strict=True)):
            if i in closed:
                values = closed[i]
            elif computed is not None:
                values = computed[i] if buf is None else buf.copy_(computed[i])
            else:
                values = buf if buf is not None else torch.empty(
                    (B, part.pattern.nnz), dtype=call.dtype, device=call.device
                )  # fmt: skip
                shapes = (prep.out_shape, call.sample_shape(part.argnum))
                try:
                    compressed_values(
                        call.func, args, flags, part.argnum, shapes, part.layout, values, cc
                    )
                except (NotImplementedError, RuntimeError) as err:
                    _forward_gap(prep, call, part, err)
                    raise _passes_failed(part, err) from err
            method = "jacfwd" if part.coloring.mode == "column" else "jacrev"
            method = "traced" if i in closed else method
            bad = _nonfinite.affected(call, [values], method, random=False)
            for b in bad.nonzero().flatten().tolist():
                values[b] = reverse_entries(call, args, flags, b, part)
            results.append(values)
    return results


def _forward_gap(prep: Prepared, call: Call, part: Part, err: BaseException) -> None:
    """Where column passes failed for want of a forward-mode formula: remember it and raise
    :class:`ForwardGap` (``method="auto"``) or a ``ValueError`` naming the fix (``"jacfwd"``);
    any other error returns (the caller re-raises it)."""
    if part.coloring.mode != "column" or not _gaps.is_gap(err):
        return
    _gaps.remember(call, part.argnum)
    if prep.method == "jacfwd":
        raise _gaps.jacfwd_error("jacobian", part.argnum, err) from err
    raise _gaps.ForwardGap(part.argnum) from err


def _passes_failed(part: Part, err: BaseException) -> NotImplementedError:
    """The error for compressed passes that torch's transforms cannot run (a batching rule
    ``vmap`` lacks, an op on an in-place buffer, ``.item()``): the function itself ran (the
    probe), so it is the transform, and the dense routes' per-sample fallbacks can answer."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    mode = "one JVP per column color" if part.coloring.mode == "column" else "one VJP per row color"
    return NotImplementedError(
        f"jacobian: the sparse passes for argnum {part.argnum} ({mode}, under torch.func.vmap "
        f"over the batch) cannot run this function: {type(err).__name__}: {first[:300]}. Use "
        f"sparse=False: the dense routes fall back to a per-sample loop where vmap fails."
    )


def _closed(
    prep: Prepared, call: Call, bufs: Sequence[torch.Tensor | None]
) -> dict[int, torch.Tensor]:
    """Values of the parts the closed form writes, by index (empty where it fails: the
    compressed passes then run, NOTE [When the closed form writes a sparse Jacobian])."""
    from ..rules.terms import Unsupported
    from .closed import closed_values

    todo = [i for i, (use, _) in enumerate(prep.closed) if use]
    try:
        got = closed_values(call, [prep.parts[i] for i in todo], [bufs[i] for i in todo])
    except Unsupported:
        return {}
    return dict(zip(todo, got, strict=True))


def results(prep: Prepared, values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Sparse CSR tensors of ``values`` (step 7)."""
    batched = prep.call.batch_size is not None
    return [
        to_csr(part.pattern, v if batched else v[0], batched, prep.vec)
        for part, v in zip(prep.parts, values, strict=True)
    ]


def _check_out(prep: Prepared, out: object) -> list[torch.Tensor | None]:
    """The caller's ``out=``: ``(B, nnz)`` values buffers (``(nnz,)`` without a batch)."""
    call = prep.call
    if out is None:
        return [None] * len(prep.parts)
    given = out if isinstance(out, tuple) else (out,)
    if isinstance(out, tuple) != call.tuple_argnums or len(given) != len(prep.parts):
        raise TypeError(
            "jacobian: expected out to be "
            + ("a tuple of values tensors, one per argnum" if call.tuple_argnums else "one tensor")
            + f" with sparse=, got {type(out).__name__}."
        )
    lead = () if call.batch_size is None else (call.batch_size,)
    V.check_out_aliasing("jacobian", [o for o in given if isinstance(o, torch.Tensor)], call.args)
    bufs: list[torch.Tensor | None] = []
    for o, part in zip(given, prep.parts, strict=True):
        shape = (*lead, part.pattern.nnz)
        o = V.check_out(
            "jacobian (sparse=: out holds the values, (B, nnz))", o, shape, call.dtype, call.device
        )
        bufs.append(o if lead else o.unsqueeze(0))
    return bufs


def jacobian(
    func: Callable[..., Any], args: tuple[Any, ...], out: object = None, **options: Any
) -> Any:
    """The sparse Jacobian(s): ``jacbatch.jacobian(..., sparse=...)``; options as there.

    A repeated call may reuse the prepared call and skip a redundant pattern check (NOTE
    [Repeated sparse calls] in :mod:`jacbatch.sparse._hot`); column passes that meet an op
    without a forward-mode formula fall back to rows (NOTE [Forward-mode gaps fall back to
    rows])."""
    from . import _hot

    kept = _hot.lookup(func, args, options)
    prep = kept.prep if kept is not None else prepare("jacobian", func, args, **options)
    rows: frozenset[int] = frozenset()
    while True:
        try:
            return _jacobian(func, args, out, options, prep, kept)
        except _gaps.ForwardGap as gap:
            if gap.argnum in rows:  # colored by rows already: not a gap of the column passes
                raise
            if kept is not None:
                _hot.forget(func, args, options)
            rows |= {gap.argnum}
            kept, prep = None, prepare("jacobian", func, args, rows=rows, **options)


def _jacobian(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    out: object,
    options: dict[str, Any],
    prep: Prepared,
    kept: Any,
) -> Any:
    from . import _hot

    call = prep.call
    bufs = _check_out(prep, out)
    B = call.batch_size if call.batch_size is not None else 1
    item = torch.empty((), dtype=call.dtype).element_size()
    fresh = sum(p.pattern.nnz for p, b in zip(prep.parts, bufs, strict=True) if b is None) * B
    free = memory.available_memory(call.device)
    if fresh * item > free:
        V.result_too_large("jacobian", fresh * item, free, prep.budget, call.batch_size)
    batch_chunk, color_chunks = chunking(prep, count_values=False)
    whole = batch_chunk >= B and all(
        c >= p.coloring.n_colors for c, p in zip(color_chunks, prep.parts, strict=True)
    )
    if batch_chunk >= B:
        computed = kept.run(call) if kept is not None and whole else None
        values = values_of(prep, call, color_chunks, bufs, computed)
    else:
        values = [
            b
            if b is not None
            else torch.empty((B, p.pattern.nnz), dtype=call.dtype, device=call.device)
            for p, b in zip(prep.parts, bufs, strict=True)
        ]
        for start in range(0, B, batch_chunk):
            n = min(batch_chunk, B - start)
            values_of(
                prep,
                _sub_call(call, start, n),
                color_chunks,
                [v[start : start + n] for v in values],
            )
            memory.release_freed()
    if kept is None or not kept.skip_check:
        check_pattern(prep, call, values)
    if kept is None:
        closed = any(use for use, _ in prep.closed)  # its values are not the passes' bit for bit
        _hot.record(func, args, options, prep, values if whole else None, exact=not closed)
    res = results(prep, values)
    return tuple(res) if call.tuple_argnums else res[0]


def iter_jacobian(
    func: Callable[..., Any], args: tuple[Any, ...], batch_chunk: int | None = None, **options: Any
) -> Iterator[tuple[slice, Any]]:
    """``iter_jacobian(..., sparse=...)``: ``(batch_slice, sparse CSR chunk)`` pairs; the
    budget covers one chunk's values and working memory. Validated when called."""
    prep = prepare("iter_jacobian", func, args, **options)
    call = prep.call
    if call.batch_size is None:
        V.needs_batch("iter_jacobian")
    chunk, color_chunks = chunking(prep, count_values=True)
    if batch_chunk is not None:
        chunk = V.check_positive_int("iter_jacobian", "batch_chunk", batch_chunk)
    again = lambda rows: prepare("iter_jacobian", func, args, rows=rows, **options)  # noqa: E731
    return _iterate(prep, chunk, color_chunks, again)


def _iterate(
    prep: Prepared,
    chunk: int,
    color_chunks: list[int],
    again: Callable[[frozenset[int]], Prepared],
) -> Iterator[tuple[slice, Any]]:
    """The chunks; ``again(rows)``: the call prepared with ``rows`` colored by rows (NOTE
    [Forward-mode gaps fall back to rows])."""
    call = prep.call
    B = call.batch_size or 0
    rows: frozenset[int] = frozenset()
    for start in range(0, B, chunk):
        n = min(chunk, B - start)
        sub = _sub_call(call, start, n)
        while True:
            try:
                values = values_of(prep, sub, color_chunks, [None] * len(prep.parts))
                break
            except _gaps.ForwardGap as gap:
                if gap.argnum in rows:
                    raise
                rows |= {gap.argnum}
                prep = again(rows)
                color_chunks = chunking(prep, count_values=True)[1]
        if start == 0:
            check_pattern(prep, sub, values)
        res = results(prep, values)
        del values
        yield slice(start, start + n), (tuple(res) if call.tuple_argnums else res[0])
        del res
        memory.release_freed()


def explain(func: Callable[..., Any], args: tuple[Any, ...], **options: Any) -> SparsePlan:
    """``explain(..., sparse=...)``: the pattern, both colorings and the chosen mode: the one
    that will run where a forward pass on meta tensors tells that column passes would meet an
    op without a forward-mode formula (NOTE [Forward-mode gaps fall back to rows] in :mod:`jacbatch.sparse._gaps`); where
    ``func`` cannot run on meta, the coloring, and the call falls back when it runs."""
    prep = prepare("explain", func, args, **options)
    gaps = frozenset(
        p.argnum
        for p in prep.parts
        if p.coloring.mode == "column"
        and _gaps.meta_gap(prep.call, p.argnum, p.layout.seeds.shape[1])
    )
    if gaps:
        if prep.method == "jacfwd":
            raise _gaps.jacfwd_error("explain", min(gaps))
        prep = prepare("explain", func, args, rows=gaps, **options)
    lines = []
    for k, part in enumerate(prep.parts):
        p, c = part.pattern, part.coloring
        both = color(p, "auto")
        m, n = p.shape
        source = "given" if part.given else "detected"
        lines.append(
            f"  argnum {part.argnum}: pattern ({source}) {m} x {n}, nnz {p.nnz}, density "
            f"{p.density:.3g}; colors: column {both.column_colors} (JVPs), row "
            f"{both.row_colors} (VJPs); chosen: {c.mode}, {c.n_colors} "
            f"{'JVP' if c.mode == 'column' else 'VJP'} pass(es) per sample instead of "
            f"{min(m, n)}"
            + (
                " (column passes would meet an op without a forward-mode formula)"
                if part.argnum in gaps
                else ""
            )
            + (" (one pull-back per color: cdist_backward_vmap)" if part.layout.loop else "")
        )
        use, why = prep.closed[k] if prep.closed else (False, "")
        lines.append(f"    values: {why}" if use else f"    values: compressed passes ({why})")
    return SparsePlan(prep.call.batch_size, prep.out_shape, tuple(lines))


__all__ = ["SparsePlan", "explain", "iter_jacobian", "jacobian", "prepare"]
