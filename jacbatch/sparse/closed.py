"""The traced closed form of a sparse Jacobian, written only at the pattern's nonzeros.

NOTE [Sampling lettered terms at the nonzeros]
    A traced Jacobian is a sum of lettered terms (NOTE [Lettered Jacobian terms] in
    :mod:`jacbatch.rules.terms`): ``J[b, o.., i..] = c · Π_f F_f[b, letters of f] · deltas``.
    The dense writer forms every entry; a sparse call needs only the ``nnz`` entries of its
    pattern, ``(rows[k], cols[k])`` in CSR order (per-sample flat output and input indices).
    For one term:

    * ``rows`` is unravelled row-major over the term's output axes (size-1 axes are dropped
      from terms and a reshape may have split an axis into a refinement: neither changes the
      row-major flat index, so the term's own axis sizes are the ones to unravel over), and
      ``cols`` over its input axes: one ``(nnz,)`` index per axis;
    * each letter takes the index of its axes; a letter on several axes is a delta, so the
      term is zero at the entries where those indices differ: only the others, ``sel``, are
      evaluated;
    * each factor is gathered at its letters' indices (advanced indexing over its non-batch
      axes, a stride-0 view stays one), a ``(B or 1, len(sel))`` tensor; their product times
      ``c`` is added into the ``(B, nnz)`` values at ``sel``.

    No dense Jacobian is formed; the working memory is the factors the rules build (what the
    traced graph's composition holds) plus a few ``(B, nnz)`` gathers. The unravelled indices
    and each delta structure's ``sel`` are cached per pattern (terms get fresh letters every
    call, so a delta structure is keyed by which axes share a letter, not by the letters).

NOTE [When the closed form writes a sparse Jacobian]
    Some rules build dense factors that are cheap next to a dense Jacobian but not next to a
    sparse one: ``x[1:]`` has a ``(n - 1, n)`` 0/1 selection factor, 10^8 elements for
    ``(x[1:] - x[:-1])**2`` at ``n = 10^4``, while the compressed passes hold a few vectors of
    ``n``. So the closed form runs for an argnum only when the traced analysis covers every op
    on its path and the composition's peak, simulated on meta tensors for the whole batch
    (:func:`jacbatch.memory.simulate_peak`) plus the gathers, is within the budget's chunk
    target and at most :data:`RATIO` times what the compressed passes hold (their working
    memory, or the values, whichever is larger) or :data:`FLOOR` bytes (a small call). The decision is cached per traced graph,
    argnum, pattern, batch size, dtype, device and budget. Anything that fails at run time
    (:class:`~jacbatch.rules.terms.Unsupported`, a stale graph) falls back to the passes.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import capture, memory, tracing
from ..call import Call
from ..methods import batched_args
from ..rules.terms import Term, Unsupported
from .pattern import SparsityPattern

#: The closed form may hold at most this many times the compressed passes' working memory,
RATIO = 4
#: or this many bytes, whichever is more (small calls: memory is no concern there).
FLOOR = 1 << 22
#: ``False``: every sparse call takes the compressed passes (for benchmarks).
ENABLED = True
#: ``"calls"``: calls whose values the closed form wrote (tests check the route by it).
STATS = {"calls": 0}

_Index = tuple[torch.Tensor, ...]
#: Per pattern: unravelled indices per (sizes, flat side) and ``sel`` per delta structure.
_CACHE: weakref.WeakKeyDictionary[SparsityPattern, dict[Any, Any]] = weakref.WeakKeyDictionary()
#: Decisions per traced graph (by id, with a weak reference to tell a reused id).
_DECISIONS: dict[int, tuple[weakref.ref[Any], dict[Any, tuple[bool, str]]]] = {}


def _unravel(flat: torch.Tensor, sizes: Sequence[int]) -> _Index:
    """``(nnz,)`` flat row-major indices into per-axis ``(nnz,)`` indices over ``sizes``."""
    out = []
    rest = flat
    for n in reversed(sizes):
        out.append(rest % n)
        rest = rest // n
    return tuple(reversed(out))


def _axes(
    pattern: SparsityPattern, side: str, flat: torch.Tensor, sizes: tuple[int, ...]
) -> _Index:
    cache = _CACHE.setdefault(pattern, {})
    key = ("axes", side, sizes, str(flat.device))
    got = cache.get(key)
    if got is None:
        got = cache[key] = _unravel(flat, sizes)
    return got


def _selection(
    pattern: SparsityPattern, term: Term, axes: Sequence[torch.Tensor], device: torch.device
) -> tuple[Any, torch.Tensor | None, _Index]:
    """The term's delta structure (a cache key), the ``(k,)`` entries where its deltas hold
    (``None``: every entry, no delta) and the axes' indices at those entries."""
    letters = term.out + term.inp
    first = {x: letters.index(x) for x in letters}
    shape = tuple(first[x] for x in letters)  # which axis each axis must equal
    key = ("sel", term.out_sizes, term.in_sizes, len(term.out), shape, str(device))
    if len(set(letters)) == len(letters):
        return key, None, tuple(axes)
    cache = _CACHE.setdefault(pattern, {})
    got = cache.get(key)
    if got is None:
        ok = torch.ones(axes[0].shape[0], dtype=torch.bool, device=device)
        for k, f in enumerate(shape):
            if f != k:
                ok &= axes[k] == axes[f]
        sel = ok.nonzero().flatten()
        got = cache[key] = (sel, tuple(x[sel] for x in axes))
    return key, got[0], got[1]


def _flat(
    pattern: SparsityPattern, key: Any, T: torch.Tensor, pos: tuple[int, ...], at: _Index
) -> torch.Tensor:
    """``(k,)`` element offsets of a factor's entries (its non-batch strides; a stride-0 view
    stays one) at the indices ``at[p]`` for its letters' axes ``pos``, cached."""
    cache = _CACHE.setdefault(pattern, {})
    full = ("flat", key, pos, tuple(T.shape[1:]), tuple(T.stride()[1:]))
    got = cache.get(full)
    if got is None:
        got = torch.zeros_like(at[0])
        for p, st in zip(pos, T.stride()[1:], strict=True):
            if st:
                got = got + at[p] * st
        cache[full] = got
    return got


def write_sampled(
    terms: Sequence[Term],
    pattern: SparsityPattern,
    rows: torch.Tensor,
    cols: torch.Tensor,
    values: torch.Tensor,
) -> torch.Tensor:
    """Write ``Σ terms`` at the entries ``(rows, cols)`` into ``values`` (NOTE [Sampling
    lettered terms at the nonzeros]); returns ``values``.

    Args:
        terms: the Jacobian's terms (per-sample output ``m``, input ``n`` elements).
        pattern: the pattern ``rows`` and ``cols`` belong to (the index cache's key).
        rows: ``(nnz,)`` int64 flat output index of every entry.
        cols: ``(nnz,)`` int64 flat input index of every entry.
        values: ``(B, nnz)`` written in place.
    """
    m, n = pattern.shape
    B, nnz = values.shape
    shared = torch.zeros(nnz, dtype=values.dtype, device=values.device)
    batched = []
    for term in terms:
        if math.prod(term.out_sizes) != m or math.prod(term.in_sizes) != n:
            raise Unsupported("a term's axes do not cover the output and input")
        if term.batch not in (1, B):
            raise ValueError("rule bug: factor batch size differs from the call's")
        axes = _axes(pattern, "out", rows, term.out_sizes) + _axes(
            pattern, "in", cols, term.in_sizes
        )
        key, sel, at = _selection(pattern, term, axes, values.device)
        prod = _sampled(pattern, term, key, at, nnz if sel is None else sel.shape[0], values)
        if prod.shape[0] != 1:
            batched.append((prod, sel))
        elif sel is None:
            shared.add_(prod[0])
        else:
            shared.index_add_(0, sel, prod[0])
    # the shared terms once for the batch, then the per-sample ones
    values.copy_(shared.expand(B, nnz))
    for prod, sel in batched:
        if sel is None:
            values.add_(prod)
        else:
            values.index_add_(1, sel, prod)
    return values


def _sampled(
    pattern: SparsityPattern, term: Term, key: Any, at: _Index, k: int, like: torch.Tensor
) -> torch.Tensor:
    """``(B or 1, k)``: ``term`` at the ``k`` entries whose per-axis indices are ``at``
    (``(k,)`` each; none for a ``1 x 1`` Jacobian), scale included; dtype and device of
    ``like``."""
    letters = term.out + term.inp
    prod: torch.Tensor | None = None
    for T, ls in term.factors:
        if any(x not in letters for x in ls):
            raise Unsupported("a factor letter is on no axis")
        if ls:
            flat = _flat(pattern, key, T, tuple(letters.index(x) for x in ls), at)
            span = (
                int(sum((n - 1) * st for n, st in zip(T.shape[1:], T.stride()[1:], strict=True)))
                + 1
            )
            base = T.as_strided((T.shape[0], span), (T.stride(0), 1), T.storage_offset())
            g = base.index_select(1, flat)
        else:
            g = T.reshape(T.shape[0], 1)
        prod = g if prod is None else prod * g
    if prod is None:
        return torch.full((1, k), term.scale, dtype=like.dtype, device=like.device)
    if term.scale != 1.0:
        prod = prod * term.scale
    return prod.to(like.dtype).expand(prod.shape[0], k)


def closed_values(
    call: Call,
    parts: Sequence[Any],
    bufs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """``(B, nnz)`` values per part of ``parts`` (engine ``Part``s) by the traced closed form,
    the graph's output checked against ``func`` on the first sample (NOTE [The value check] in
    :mod:`jacbatch.methods.traced`).

    Raises:
        Unsupported: a rule does not cover these values, or the graph is stale (its captures
            are then dropped, so the next call captures afresh).
    """
    from ..methods.traced import _output_check, _Stale, lifted_inputs, traced_graph

    tg = traced_graph(call)  # Dynamo's guards may have re-traced it since the decision
    for p in parts:
        if not tg.analysis(p.argnum).ok:
            raise Unsupported(tg.analysis(p.argnum).reason)
    args, _, B = batched_args(call)
    check = _output_check(call, args)
    full = [x.detach() for x in (*args, *lifted_inputs(call))]
    argnums = [p.argnum for p in parts]
    with torch.no_grad():
        try:
            all_terms = tracing.jacobian_terms(tg, argnums, full, B, check)
        except _Stale as err:  # NOTE [The value check]: the passes answer, the next call
            capture.forget(call.func)  # captures afresh
            raise Unsupported(str(err)) from None
        results = []
        for part, ts, buf in zip(parts, all_terms, bufs, strict=True):
            values = buf if buf is not None else torch.empty(
                (B, part.pattern.nnz), dtype=call.dtype, device=call.device
            )  # fmt: skip
            write_sampled(ts, part.pattern, part.layout.rows, part.layout.cols, values)
            results.append(values)
    STATS["calls"] += 1
    return results


def _decisions(tg: Any) -> dict[Any, tuple[bool, str]]:
    got = _DECISIONS.get(id(tg))
    if got is None or got[0]() is not tg:
        for k in [k for k, (r, _) in _DECISIONS.items() if r() is None]:
            del _DECISIONS[k]
        got = _DECISIONS[id(tg)] = (weakref.ref(tg), {})
    return got[1]


def decide(call: Call, part: Any, budget: int, passes_bytes: Callable[[], int]) -> tuple[bool, str]:
    """Whether the closed form writes ``part``'s values for ``call``, and why (NOTE [When the
    closed form writes a sparse Jacobian]). ``passes_bytes()``: the compressed passes' working
    memory for the whole batch (asked only when the closed form applies)."""
    from ..methods import in_transform
    from ..methods.traced import lifted_inputs, traced_graph

    if not ENABLED:
        return False, "closed form: disabled (jacbatch.sparse.closed.ENABLED)"
    if call.create_graph:
        return False, "closed form: a differentiable result (create_graph) takes the passes"
    if in_transform(call.args) or call.device.type == "meta":
        return False, "closed form: not inside a torch.func transform"
    try:
        tg = traced_graph(call)
    except Exception as err:  # capturing failed: the passes
        return False, f"closed form: tracing failed ({type(err).__name__})"
    an = tg.analysis(part.argnum)
    if not an.ok:
        return False, f"closed form: {an.reason}"
    _, _, B = batched_args(call)
    p = part.pattern
    key: tuple[Any, ...] = (part.argnum, p.shape, p.nnz, part.coloring.n_colors, B)
    key += (call.dtype, str(call.device), budget)
    cache = _decisions(tg)
    if key in cache:
        return cache[key]
    item = torch.empty((), dtype=call.dtype).element_size()
    gathers = 3 * B * part.pattern.nnz * item
    args, _, _ = batched_args(call)
    meta = [torch.empty_like(t, device="meta") for t in (*args, *lifted_inputs(call))]

    def run() -> Any:
        with torch.no_grad():
            return tracing.jacobian_terms(tg, [part.argnum], meta, B)

    try:
        peak = memory.simulate_peak(run) + gathers
    except Exception as err:
        verdict = (False, f"closed form: its memory could not be simulated ({type(err).__name__})")
    else:
        target = memory.chunk_target(budget, call.device)
        allowed = RATIO * max(passes_bytes(), B * part.pattern.nnz * item)
        elements = peak // item
        if peak > target:
            verdict = (False, f"closed form: factors {elements:.1e} elements > budget")
        elif peak > max(allowed, FLOOR):
            verdict = (
                False,
                f"closed form: factors {elements:.1e} elements > {RATIO}x the passes' "
                f"{allowed // RATIO // item:.1e}",
            )
        else:
            verdict = (True, f"closed form writes the nonzeros (working {elements:.1e} elements)")
    cache[key] = verdict
    return verdict


__all__ = ["closed_values", "decide", "write_sampled"]
