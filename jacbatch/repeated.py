"""Repeated plain calls: :func:`jacbatch.jacobian` called again with the same function and
signature runs a program, after the same checks the full call would make.

NOTE [Repeated plain calls]
    ``jacobian(func, X)`` inside a loop pays, on every call, the validation, the probe of
    ``func``, planning and the budget (0.5-1 ms), while the answer to all of it only changes
    when ``func`` does. Whether ``func`` changed is what Dynamo's guards decide for the traced
    route already (NOTE [Why Dynamo decides when to re-trace] in :mod:`jacbatch.capture`): the
    captured graph object is the same exactly when no guard failed, that is, when ``func``'s
    code, the globals, closures and attributes it reads, a module's ``training`` flag and the
    shapes, dtypes and ``requires_grad`` of the tensors it reads are as they were. So:

    1. A call is keyed by ``func`` (weakly; a plain Python function by its code object, so
       an inline ``lambda`` written in a loop counts as one function) and its signature: the arguments' shapes, dtypes,
       devices and every option. The full path runs; after it, the key's count goes up.
    2. On the :data:`HOT_CALLS`-th full call with one key, if ``func`` was captured, its plan
       runs on the whole batch without protections, randomness or a graph, and the probe saw no
       grad-mode switch inside ``func``, the plan is traced into a program over the captured
       aten graph (:func:`jacbatch.prepared._build` with ``over_graph``): the tensors ``func``
       reads are program inputs (their current values are passed on every call, so rebinding a
       global or attribute is seen), and the autodiff routes differentiate the aten graph. The
       program is checked against the full path's result on that call.
    3. A later call with the key, in a context that needs no differentiable result, asks Dynamo
       for the capture (its guards run); only if it returns the very graph the program was made
       from does the program run, with the lifted tensors' current values. The program also
       returns the graph's output for the first sample, which is compared with ``func`` run for
       real on that sample, the value check of NOTE [The value check] in
       :mod:`jacbatch.methods.traced` (Dynamo does not guard a method replaced on a class). A
       non-finite flag, another graph or a different value sends the call down the full path,
       which recomputes, re-captures or falls back as it always does.

    4. With ``method="auto"``, the programs of the plain routes auto could have run instead
       (:data:`RIVALS`: ``jacrev`` and ``jacfwd`` over the same captured graph) are made too,
       each is timed on the hot call's arguments (median of :data:`TIMED_RUNS` runs), and the
       fastest is kept: NOTE [auto measures its hot programs]. A cost model decides the first
       calls (the accumulation order, reverse or forward mode by the shapes); it is off by
       small factors where kernels, not FLOPs, set the time, so the key that runs many times is
       decided by measurement. Every candidate was checked against its route run interpreted;
       they agree to rounding, so the choice moves the result in its last bits only. Pass a
       ``method`` to pin a route (or set :data:`MEASURE` to ``False``).

    5. A batched function (``batched=True``) gets no program: its routes run ``func`` on the
       whole batch, and tracing them would specialize on what ``func`` does in Python
       (pytorch-kinematics reads ``.item()`` of index tensors). Its hot key keeps the full
       path's request instead; a later call runs it (the routes, chunks and NaN policy, no
       validation, probe or planning) once Dynamo's guards return the same capture of its
       per-sample view, so a change to ``func`` still goes down the full path.

    The cost of a repeated call is then Dynamo's guard check, the program, and one per-sample
    forward pass of ``func``. What the full path decides from free memory (the budget) was
    decided when the program was made, for a batch that fitted whole then.
"""

from __future__ import annotations

import dataclasses
import math
import types
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import capture, executor
from .methods import batched as batched_routes
from .methods import traced
from .prepared import _build, _enforce_forward, _Entry, _plain, median_seconds
from .request import Request

#: A key is prepared on this many full calls (a function called twice is often just called
#: twice; preparing costs about a hundred full calls' worth of tracing).
HOT_CALLS = 3

#: With ``method="auto"``, the routes whose programs are timed against auto's plan when a key
#: becomes hot (NOTE [auto measures its hot programs]); ``MEASURE = False`` keeps auto's plan.
RIVALS = ("jacrev", "jacfwd")
MEASURE = True
TIMED_RUNS = 5
#: A rival is not made when it needs this many times more passes than the other mode (reverse
#: mode with ``RIVAL_SPREAD`` times more output than input elements, or forward mode the other
#: way round), nor timed beyond its warm-up when that took ``GIVE_UP`` times auto's median.
RIVAL_SPREAD = 8
GIVE_UP = 4.0


@dataclasses.dataclass
class _Seen:
    count: int = 0
    entry: _Entry | None = None
    graph: Any = None
    refused: str | None = None


_SEEN: weakref.WeakKeyDictionary[Any, dict[Any, _Seen]] = weakref.WeakKeyDictionary()


def _key(args: Sequence[Any], options: tuple[Any, ...]) -> Any:
    try:
        key = (tuple([(a.shape, a.dtype, a.device) for a in args]), options)
        hash(key)
    except (AttributeError, TypeError):
        return None
    return key


def _owner(func: Callable[..., Any]) -> Any:
    """What a key's table hangs on: a plain Python function's code object, so that a lambda
    written inline (a new function object per call, the same code) gets hot like a function
    defined once; any other callable itself. Which closure, globals and attributes the code
    reads now is Dynamo's guards' to decide (point 3 of NOTE [Repeated plain calls])."""
    return func.__code__ if isinstance(func, types.FunctionType) else func


def _table(func: Callable[..., Any]) -> dict[Any, _Seen] | None:
    try:
        return _SEEN.setdefault(_owner(func), {})
    except TypeError:  # not weakly referenceable
        return None


def run(func: Callable[..., Any], args: Sequence[Any], options: tuple[Any, ...]) -> Any:
    """The Jacobian(s) by the key's program, or ``None`` for the full path (see NOTE
    [Repeated plain calls])."""
    try:
        table = _SEEN.get(_owner(func))
    except TypeError:  # not weakly referenceable
        return None
    if table is None:
        return None
    key = _key(args, options)
    seen = table.get(key) if key is not None else None
    if seen is None or seen.entry is None or not _plain(args, ()):
        return None
    entry = seen.entry
    call = entry.request.call
    target = func if call.batched_func is None else batched_routes.per_sample(func, call.in_dims)
    got = capture.capture(
        target,
        [call.sample_shape(i) for i in range(len(call.args))],
        call.dtype,
        call.device,
        [d is not None for d in call.in_dims],
    )
    if got.graph is not seen.graph:  # a guard failed: func changed; the full path decides
        seen.entry, seen.graph, seen.count = None, None, 0
        return None
    grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    if grad and any(t.requires_grad for t in got.lifted):
        return None  # a differentiable result
    if entry.program is None:  # a batched func: its plan, as planned (point 5)
        now = dataclasses.replace(call, func=target, batched_func=func, args=tuple(args))
        req = dataclasses.replace(entry.request, call=now, bufs=(None,) * len(call.argnums))
        return executor.execute(req)
    res = entry.program(*args, *got.lifted)
    if not bool(res[-1]):
        return None  # a non-finite value: the NaN policy, on the full path
    k = len(call.argnums)
    now = dataclasses.replace(call, func=func, args=tuple(args))
    moved = [now.moved(i) for i in range(len(args))]
    try:
        traced._output_check(now, moved)(res[k].unsqueeze(0))
    except traced._Stale:
        seen.entry, seen.graph, seen.count = None, None, 0
        return None  # the full path re-captures
    jacs = list(res[:k])
    if entry.forward:
        _enforce_forward(now, entry.request, jacs)
    return tuple(jacs) if call.tuple_argnums else jacs[0]


def record(
    func: Callable[..., Any],
    args: Sequence[Any],
    options: tuple[Any, ...],
    req: Request,
    result: Any = None,
) -> None:
    """Count a full call; on the :data:`HOT_CALLS`-th, prepare its program, checked against
    ``result`` (the call's Jacobian or tuple of them, as the full path computed it)."""
    table = _table(func)
    key = _key(args, options)
    if table is None or key is None:
        return
    seen = table.setdefault(key, _Seen())
    seen.count += 1
    if seen.entry is not None or seen.refused is not None or seen.count < HOT_CALLS:
        return
    if req.call.create_graph:
        return  # this call needs a graph; a later one may not
    seen.refused = _refusal(req)
    if seen.refused is not None:
        return
    got = traced.captured_for(req.call)
    if got.graph.gm is None:
        seen.refused = "not captured"
        return
    if req.call.batched_func is not None:
        seen.entry, seen.graph = _Entry(req, None, "planned: a batched function"), got.graph
        return
    reference = None if result is None else list(result if isinstance(result, tuple) else (result,))
    entry = _build(req, False, over_graph=got, reference=reference)
    if entry.program is None:
        seen.refused = entry.why
        return
    if req.method == "auto" and MEASURE:
        entry = _fastest(func, args, options, req, got, entry, reference)
    seen.entry, seen.graph = entry, got.graph


def _fastest(
    func: Callable[..., Any],
    args: Sequence[Any],
    options: tuple[Any, ...],
    req: Request,
    got: Any,
    auto: _Entry,
    reference: Sequence[torch.Tensor] | None,
) -> _Entry:
    """NOTE [auto measures its hot programs]: the program of auto's plan and those of the
    plain autodiff routes it could have run instead (:data:`RIVALS`) over the same captured
    graph, timed on this call's arguments; the fastest is kept (NOTE [Repeated plain calls],
    point 4). A rival whose request or program cannot be made is left out."""
    from .request import build_request

    argnums, in_dims, _, vec, chunk_size, max_memory, randomness, progress, batched = options
    call = req.call
    n_in = sum(math.prod(call.sample_shape(a)) for a in call.argnums)
    n_out = math.prod(req.out_shape)
    hopeless = {"jacrev": n_out > RIVAL_SPREAD * n_in, "jacfwd": n_in > RIVAL_SPREAD * n_out}
    rivals = {"auto": auto}
    for method in RIVALS:
        if any(s.route == method for s in req.plan.steps) and len(req.plan.steps) == 1:
            continue  # auto's own plan
        if hopeless.get(method, False):
            continue  # one pass per output (input) element, many times more of them
        try:
            with torch.no_grad():
                alt = build_request(
                    "jacobian", func, tuple(args), argnums, in_dims, method=method, vec=vec,
                    chunk_size=chunk_size, randomness=randomness, max_memory=max_memory,
                    progress=progress, batched=batched,
                )  # fmt: skip
        except (NotImplementedError, ValueError, RuntimeError):
            continue
        entry = _build(alt, False, over_graph=got, reference=reference)
        if entry.program is not None:
            rivals[method] = entry
    if len(rivals) == 1:
        return auto
    timings = {"auto": _seconds(auto, args, got.lifted)}
    for m, e in rivals.items():
        if m != "auto":
            timings[m] = _seconds(e, args, got.lifted, give_up=GIVE_UP * timings["auto"])
    best = min(timings, key=lambda m: timings[m])
    chosen = rivals[best]
    chosen.timings = timings
    return chosen


def _seconds(
    entry: _Entry,
    args: Sequence[torch.Tensor],
    lifted: Sequence[torch.Tensor],
    give_up: float = math.inf,
) -> float:
    """Median seconds of a call of ``entry``'s program (with the forward routes' extra pass of
    the NaN policy) over :data:`TIMED_RUNS` runs after one warm-up; the warm-up's time when it
    took longer than ``give_up`` (a rival far slower is not timed further)."""
    assert entry.program is not None
    call = dataclasses.replace(entry.request.call, args=tuple(args))
    k = len(call.argnums)

    def once() -> None:
        res = entry.program(*args, *lifted)  # type: ignore[misc]
        if entry.forward:
            _enforce_forward(call, entry.request, list(res[:k]))

    return median_seconds(once, TIMED_RUNS, give_up)


def _refusal(req: Request) -> str | None:
    call = req.call
    if call.batch_size == 0 or call.device.type == "meta":
        return "nothing to run"
    probe = call.probe
    if probe is None or probe.grad_disabled or probe.custom_function:
        return "func switches grad mode inside (no_grad, a custom autograd.Function)"
    return None


def forget_all() -> None:
    """Drop every program (tests, and after changing torch's global settings)."""
    _SEEN.clear()


__all__ = ["HOT_CALLS", "forget_all", "record", "run"]
