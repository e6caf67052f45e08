"""One prepared request: every entry point validates, probes, plans and budgets a call here.

NOTE [One request per call]
    :func:`jacbatch.jacobian`, :func:`jacbatch.explain`, :func:`jacbatch.estimate_memory`,
    :func:`jacbatch.iter_jacobian`, :func:`jacbatch.save_jacobian`, :mod:`jacbatch.distributed`
    and :mod:`jacbatch.sensitivity` all start with :func:`build_request`, which does, once and
    in this order (so that every entry point words and orders its errors alike):

    1. the call: ``func``, ``args``, ``argnums``, ``in_dims`` and ``randomness`` normalized
       into a :class:`~jacbatch.call.Call` (:func:`jacbatch.plan.normalize`);
    2. the options: ``method`` (against the route registry), ``vec``, ``chunk_size``,
       ``max_memory``, ``progress``; a batch where the caller chunks (``chunked``); the
       entry point's own ``checks`` (e.g. the distributed ones); ``out`` buffers that alias
       an argument;
    3. the probe of ``func`` (one sample, meta tensors where it can) and whether the result
       keeps a graph (``create_graph``);
    4. the plan (:func:`jacbatch.plan.make_plan`): the routes and why, what protects each
       evaluation (state, argument writes, randomness), the known torch bugs avoided;
    5. the result shapes and ``out`` buffers; then the budget: a result that cannot fit in free
       memory is refused before anything is allocated (``fit="result"``), and the batch chunk
       and ``chunk_size`` that keep working memory (and, with ``fit="chunk"``, each chunk's own
       output) within it (:func:`fit`, cached per function and shapes).

    What each entry point adds: ``jacobian`` runs :func:`jacbatch.executor.execute` on the
    request; ``iter_jacobian`` iterates :func:`jacbatch.executor.chunks` (``fit="chunk"``, or
    the caller's ``batch_chunk``); ``save_jacobian`` writes those chunks into a ``.npy`` file;
    ``explain`` returns ``request.plan``; ``estimate_memory`` simulates the plan on meta tensors
    (:func:`estimate`); :mod:`jacbatch.distributed` stops after the probe (``plan=False``) so
    that the ranks can agree on the call before each plans its own shard; the sensitivity
    functions build and execute one request per batch of the sample and evaluate ``func``
    with the request's call.

    The request is frozen: a batch chunk is the same request run on a slice of its call
    (:func:`jacbatch.executor._slice_call`), so the plan, the budget and the chosen chunking
    are decided once for the whole batch. Nothing here depends on which route runs: the
    routes' own properties (their memory hooks, whether they chunk rows) come from the
    registry (:mod:`jacbatch.methods`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _state, memory
from . import _validation as V
from .call import Call
from .executor import _run_step, result_shape
from .methods import in_transform, route
from .plan import Plan, make_plan, normalize, probed


@dataclass(frozen=True)
class Request:
    """A validated, probed and planned call, ready to run (NOTE [One request per call]).

    Attributes:
        where: the public function that was called (for messages).
        call: the normalized call, probed (``call.probe``) and with ``create_graph`` decided.
        method: the requested ``method`` (``"auto"`` or a route's name).
        plan: the routes and why (empty with ``plan=False``).
        vec: the checked ``vec``: ``None``, ``"row"`` or ``"col"``.
        chunk_size: rows (jacrev) or columns (jacfwd) per vectorized pass, after fitting.
        out_shape: the per-sample output shape.
        shapes: per argnum, the result's shape (:func:`jacbatch.executor.result_shape`).
        bufs: per argnum, the caller's ``out`` buffer or ``None``.
        budget: working-memory budget in bytes (``None`` where nothing is fitted).
        batch_chunk: samples per chunk (at least 1).
        show: the ``progress`` option.
        transformed: a torch.func transform is running (no plain buffer holds its values).
    """

    where: str
    call: Call
    method: str
    plan: Plan
    vec: str | None
    chunk_size: int | None
    out_shape: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]
    bufs: tuple[torch.Tensor | None, ...]
    budget: int | None
    batch_chunk: int
    show: bool | None = None
    transformed: bool = False


def build_request(
    where: str,
    func: Callable[..., torch.Tensor],
    args: tuple[object, ...],
    argnums: object = 0,
    in_dims: object = 0,
    *,
    method: object = "auto",
    vec: object = None,
    chunk_size: object = None,
    randomness: object = "error",
    create_graph: object = False,
    batched: object = False,
    out: object = None,
    max_memory: object = None,
    progress: object = None,
    batch_chunk: object = None,
    chunked: bool = False,
    fit: str | None = "result",
    plan: bool = True,
    checks: Callable[[Call], None] | None = None,
) -> Request:
    """Validate, probe, plan and budget one call (NOTE [One request per call]).

    Args:
        where: the public function's name, for messages.
        func, args, argnums, in_dims, method, vec, chunk_size, randomness, create_graph,
            batched, out, max_memory, progress: as in :func:`jacbatch.jacobian`.
        batch_chunk: samples per chunk, overriding the budget (``chunked`` requests only).
        chunked: the caller consumes the result chunk by chunk: at least one argument must
            be batched, and ``max_memory`` bounds one chunk's result with its working memory.
        fit: ``"result"``: refuse a result that cannot fit in free memory, then chunk the
            working memory into the budget (:func:`jacbatch.jacobian`); ``"chunk"``: chunk
            result and working memory together (``chunked``); ``None``: no budget.
        plan: plan the call (``False``: validate and probe only).
        checks: the entry point's own checks of the normalized call, run before the probe.
    """
    call = normalize(where, func, args, argnums, in_dims, randomness, batched)
    method = V.check_method(where, method)
    vec = V.check_vec(where, vec)
    size = V.check_chunk_size(where, chunk_size)
    show = V.check_progress(where, progress)
    if chunked and call.batch_size is None:
        V.needs_batch(where)
    budget = None if max_memory is None else memory.parse_bytes(where, max_memory)
    if checks is not None:
        checks(call)
    if out is not None:  # an out buffer over an argument is refused before any work
        given = out if isinstance(out, tuple) else (out,)
        V.check_out_aliasing(where, [o for o in given if isinstance(o, torch.Tensor)], call.args)
    graph = V.check_bool(where, "create_graph", create_graph)
    call, out_shape = probed(call, graph)
    shapes = tuple(result_shape(call, a, out_shape, vec) for a in call.argnums)
    empty = Plan((), call.batch_size, out_shape, tuple(call.sample_shape(a) for a in call.argnums))
    the_plan = make_plan(call, method, out_shape, call.probe) if plan else empty
    bufs = tuple(_check_outs(where, call, out, shapes))
    transformed = call.create_graph and in_transform(call.args)
    if transformed and out is not None:
        raise ValueError(
            f"{where}: expected out=None inside a torch.func transform (grad, vjp, jacrev, "
            f"jacfwd, vmap), got an out buffer. A plain tensor cannot hold a transformed "
            f"(batched or gradient-tracking) value: drop out= and use the returned tensor."
        )
    B = call.batch_size if call.batch_size is not None else 1
    batch = max(B, 1)
    if fit == "result" and plan:
        # Refuse a result that cannot fit before allocating anything.
        itemsize = torch.empty((), dtype=call.dtype).element_size()
        fresh = sum(math.prod(s) for s, b in zip(shapes, bufs, strict=True) if b is None)
        free = memory.available_memory(call.device)
        if fresh * itemsize > free:
            V.result_too_large(where, fresh * itemsize, free, budget, call.batch_size)
        if budget is None:
            budget = memory.default_budget(call.device)
        batch, size = _fit(call, the_plan, out_shape, vec, size, budget, False)
    elif fit == "chunk" and plan:
        if budget is None:
            budget = memory.default_budget(call.device)
        if batch_chunk is None:
            batch, size = _fit(call, the_plan, out_shape, vec, size, budget, True)
        else:
            batch = V.check_positive_int(where, "batch_chunk", batch_chunk)
    return Request(
        where, call, method, the_plan, vec, size, out_shape, shapes, bufs, budget, batch,
        show, transformed,
    )  # fmt: skip


def estimate(req: Request) -> memory.MemoryEstimate:
    """The result's bytes and the plan's peak working bytes, simulated on meta tensors."""
    return _estimate(req.call, req.plan, req.out_shape, req.vec, req.chunk_size)


# Chunking chosen for a (function, shapes, budget): simulations run once per shape in a loop.
_FIT_CACHE: weakref.WeakKeyDictionary[Any, dict[Any, tuple[int, int | None]]] = (
    weakref.WeakKeyDictionary()
)


def _check_outs(
    where: str, call: Call, out: object, shapes: Sequence[tuple[int, ...]]
) -> list[torch.Tensor | None]:
    if out is None:
        return [None] * len(call.argnums)
    outs_in = out if isinstance(out, tuple) else (out,)
    if isinstance(out, tuple) != call.tuple_argnums or len(outs_in) != len(shapes):
        raise TypeError(
            f"{where}: expected out to be "
            + ("a tuple of tensors, one per argnum" if call.tuple_argnums else "one tensor")
            + f", got {type(out).__name__}."
        )
    return [
        V.check_out(where, o, s, call.dtype, call.device)
        for o, s in zip(outs_in, shapes, strict=True)
    ]


def _meta_call(call: Call, samples: int | None) -> Call:
    """The call on meta tensors with ``samples`` samples (shapes only)."""
    args = []
    for i, d in enumerate(call.in_dims):
        shape = list(call.sample_shape(i))
        if d is not None and samples is not None:
            shape.insert(d, samples)
        args.append(torch.empty(shape, dtype=call.dtype, device="meta"))
    return dataclasses.replace(
        call,
        args=tuple(args),
        batch_size=samples if call.batched else None,
        device=torch.device("meta"),
    )


def _estimate(
    call: Call,
    plan: Plan,
    out_shape: tuple[int, ...],
    vec: str | None,
    chunk_size: int | None,
    samples: int | None = None,
) -> memory.MemoryEstimate:
    """Peak memory of running ``plan`` on ``call`` (or on its first ``samples`` samples),
    simulated on meta tensors (see NOTE in :mod:`jacbatch.memory`)."""
    B = call.batch_size if samples is None else samples
    output = _sample_result_bytes(call, out_shape) * (B if B is not None else 1)
    name = plan.routes
    mcall = _meta_call(call, B)

    def run() -> list[torch.Tensor]:
        res: list[torch.Tensor] = []
        with _state.protect(mcall.func, plan.protection, mcall.device) as f:
            run_call = mcall if f is mcall.func else dataclasses.replace(mcall, func=f)
            for step in plan.steps:
                bufs: list[torch.Tensor | None] = [None] * len(step.argnums)
                res += _run_step(run_call, step, chunk_size, out_shape, vec, bufs, max_rows=2)
        return res

    try:
        peak = memory.simulate_peak(run)
    except Exception:  # cannot run on meta tensors: conservative multiples of the output
        mult = max(route(s.route).fallback_multiple for s in plan.steps)
        return memory.MemoryEstimate(name, output, int(output * (1 + mult)), B, exact=False)
    return memory.MemoryEstimate(name, output, max(peak, output), B)


def _sample_result_bytes(call: Call, out_shape: tuple[int, ...]) -> int:
    """Bytes of one sample's Jacobians, summed over the differentiated arguments."""
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    return itemsize * sum(
        math.prod(out_shape) * math.prod(call.sample_shape(a)) for a in call.argnums
    )


def _fit(
    call: Call,
    plan: Plan,
    out_shape: tuple[int, ...],
    vec: str | None,
    chunk_size: int | None,
    budget: int,
    count_output: bool,
) -> tuple[int, int | None]:
    """Samples per batch chunk, and rows per vectorized pass, that keep working memory within
    ``budget`` (and the chunk's output too when ``count_output``)."""
    B = call.batch_size if call.batch_size is not None else 1
    # Quick accept: a generous bound on any route's working memory, without simulating.
    per_sample = _sample_result_bytes(call, out_shape)
    bound = (10 if count_output else 9) * per_sample * B + sum(a.nbytes for a in call.args)
    if bound <= budget or B == 0:
        return max(B, 1), chunk_size

    key = (
        tuple((s.route, s.argnums) for s in plan.steps),
        tuple(tuple(a.shape) for a in call.args),
        call.in_dims,
        call.dtype,
        call.device,
        vec,
        chunk_size,
        budget,
        count_output,
        call.create_graph,
    )
    try:
        cache = _FIT_CACHE.setdefault(call.func, {})
    except TypeError:  # not weak-referenceable (a builtin): no caching
        cache = {}
    if key not in cache:
        cache[key] = _fit_uncached(call, plan, out_shape, vec, chunk_size, budget, count_output)
    return cache[key]


def _fit_uncached(
    call: Call,
    plan: Plan,
    out_shape: tuple[int, ...],
    vec: str | None,
    chunk_size: int | None,
    budget: int,
    count_output: bool,
) -> tuple[int, int | None]:
    B = call.batch_size if call.batch_size is not None else 1
    # These routes return a chunk's Jacobian as a temporary that is copied into the result.
    copies = any(route(s.route).vectorized for s in plan.steps)

    def need(samples: int, rows: int | None) -> int:
        est = _estimate(call, plan, out_shape, vec, rows, samples if call.batched else None)
        if count_output or (copies and samples < B):
            return est.peak_bytes
        return est.working_bytes

    if need(B, chunk_size) <= budget:
        return B, chunk_size
    # Chunks aim at a fraction of the budget: see NOTE [A chunk costs what it holds].
    for limit in dict.fromkeys((memory.chunk_target(budget, call.device), budget)):
        if need(1, chunk_size) <= limit:  # bisect the largest chunk of samples that fits
            lo, hi = 1, B
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if need(mid, chunk_size) <= limit else (lo, mid)
            return lo, chunk_size
    # One sample does not fit: fewer rows (jacrev) or columns (jacfwd) per vectorized pass.
    if all(route(s.route).vectorized for s in plan.steps):
        sizes = [math.prod(call.sample_shape(a)) for a in call.argnums]
        c = chunk_size or max(math.prod(out_shape), *sizes)
        while c > 1:
            c = max(1, c // 2)
            if need(1, c) <= budget:
                return 1, c
    V.budget_too_small("jacobian", need(1, chunk_size), budget, plan.routes)
