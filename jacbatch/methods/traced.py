"""The traced route: closed forms for plain torch code, composed from op rules.

The function is captured by Dynamo into an aten graph, re-traced only when its guards say the
computation changed (:mod:`jacbatch.capture`, :mod:`jacbatch.tracing`); every node on the path
from the differentiated argument to the output has a closed-form rule (:mod:`jacbatch.rules.ops`). The graph is evaluated for the whole batch
under ``vmap`` (forward values only, no autograd graph), the rules' lettered terms are composed
by the chain rule (:mod:`jacbatch.rules.terms`) and the result is written once, directly in the
requested vec. A result that must be differentiable is evaluated on the caller's tensors and
written out of place instead (:func:`jacbatch.rules.write.dense`). Anything the rules do not
cover raises :class:`~jacbatch.rules.terms.Unsupported`, and :func:`jacbatch.jacobian` falls
back to autodiff.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch

from .. import capture, tracing
from ..call import Call
from ..rules import terms, write
from . import Route, batched_args, being_traced, finish, in_transform, plain

_LOCAL = threading.local()


def captured_for(call: Call) -> capture.Captured:
    """The capture this call uses (made now, or the one planning made)."""
    return _captured(call)


@contextlib.contextmanager
def replaying(got: capture.Captured, lifted: Sequence[torch.Tensor]) -> Iterator[None]:
    """Use ``got``'s graph, with ``lifted`` as its lifted inputs, for every call in this block,
    without asking Dynamo (a prepared program is traced with fake stand-ins:
    :mod:`jacbatch.prepared`)."""
    before = getattr(_LOCAL, "replay", None)
    _LOCAL.replay = capture.Captured(got.graph, tuple(lifted))
    try:
        yield
    finally:
        _LOCAL.replay = before


def _captured(call: Call, retry: bool = False) -> capture.Captured:
    """The capture for ``call``, made once per call (planning and computing share it).

    A call on ``meta`` tensors (memory estimates) reuses the capture of the real call it was
    made from, with meta stand-ins for the lifted tensors; it never captures by itself.
    """
    replay = getattr(_LOCAL, "replay", None)
    if replay is not None:
        return replay
    memo = getattr(_LOCAL, "memo", None)
    owner = memo[0]() if memo is not None else None
    if owner is call:
        return memo[1]  # type: ignore[index]
    shapes = [call.sample_shape(i) for i in range(len(call.args))]
    batched = [d is not None for d in call.in_dims]
    if call.device.type == "meta":
        same = (
            owner is not None
            and owner.func is call.func
            and owner.dtype == call.dtype
            and [owner.sample_shape(i) for i in range(len(owner.args))] == shapes
            and [d is not None for d in owner.in_dims] == batched
        )
        if not same:
            return capture.Captured(tracing.TracedGraph(None, "not captured", tuple(batched)))
        real: capture.Captured = memo[1]  # type: ignore[index]
        return capture.Captured(
            real.graph, tuple(torch.empty_like(t, device="meta") for t in real.lifted)
        )
    got = capture.capture(call.func, shapes, call.dtype, call.device, batched, retry=retry)
    _LOCAL.memo = (weakref.ref(call), got)
    return got


def traced_graph(call: Call, retry: bool = False) -> tracing.TracedGraph:
    """The traced graph for this call (Dynamo's guards decide whether it is re-traced).

    ``retry``: capture again even if capturing this function failed recently.
    """
    return _captured(call, retry).graph


def lifted_inputs(call: Call) -> tuple[torch.Tensor, ...]:
    """This call's values of the tensors the graph reads besides the arguments (globals,
    closed-over tensors, parameters), in the order :func:`tracing.jacobian_terms` expects them
    after the arguments."""
    return _captured(call).lifted


def compute(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Jacobians w.r.t. ``args[a]`` for ``a in argnums`` from the traced graph's rules.

    Returns:
        Per argnum: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` (``vec``).

    Raises:
        terms.Unsupported: some node has no rule (or a rule does not cover its values), or a
            torch.func transform is running (tracing would see its wrapped values).
    """
    if in_transform(call.args):
        raise terms.Unsupported("no traced closed form inside a torch.func transform")
    try:
        return _compute(call, argnums, out_shape, vec, outs)
    except _Stale:
        # NOTE [The value check]: Dynamo kept a graph the function no longer computes. Drop its
        # captures of this function and capture afresh, once.
        capture.forget(call.func)
        _LOCAL.memo = None
        traced_graph(call, retry=True)
    try:
        return _compute(call, argnums, out_shape, vec, outs)
    except _Stale as err:
        raise terms.Unsupported(str(err)) from None


class _Stale(Exception):
    """The traced graph's output differs from the function's own output for the first sample."""


# NOTE [The value check]
#     Dynamo's guards decide when a capture is reused (NOTE [Why Dynamo decides when to
#     re-trace] in jacbatch.capture), but they have blind spots of Dynamo's own: a method
#     replaced on a class (``Act.forward = ...``, ``Base.act = ...``) and reached through an
#     instance is not guarded, so torch.compile itself keeps running the old code. So every
#     traced call also runs ``func`` for real on its first sample (one per-sample forward, small
#     next to writing the Jacobian) and compares that output with the graph's output for the
#     same sample, which the closed form evaluates anyway. A mismatch drops Dynamo's captures
#     of the function and captures again; if they still disagree, autodiff answers (auto) or the
#     call refuses (closed_form). A stale graph that happens to give the same output value at the
#     first sample but a different derivative is not caught by this check; the guards remain the
#     first line of defence.


def _output_check(call: Call, args: Sequence[torch.Tensor]) -> Callable[[torch.Tensor], None]:
    """A check of the graph's output for sample 0 against ``func`` run for real on it.

    ``args``: the call's arguments, batch dimension first where batched (``batched_args``).
    """
    first = [x[0] if d is not None else x for x, d in zip(args, call.in_dims, strict=True)]
    pair = None
    if call.batched_func is not None and (call.batch_size or 0) >= 2:
        # NOTE [A batched function on a batch of one]: the graph is that of ``func`` on a
        # batch of one (NOTE [Batched functions: one call, two views] in
        # jacbatch.methods.batched). It stands for row 0 of ``func`` on the whole batch only if
        # rows do not depend on the batch's size or other rows (``X / len(X)``,
        # ``X - X.mean(0)``): the reference value is row 0 of ``func`` on the first two
        # samples, which differs from the batch of one for such a function.
        pair = [
            x.narrow(d, 0, 2) if d is not None else x
            for x, d in zip(call.args, call.in_dims, strict=True)
        ]

    def check(value: torch.Tensor) -> None:
        if value.shape[0] == 0:
            return
        with torch.no_grad():
            if pair is not None:
                assert call.batched_func is not None
                y = call.batched_func(*[x.detach() for x in pair])
                y = y[0] if isinstance(y, torch.Tensor) and y.dim() > 0 else y
            else:
                y = call.func(*[x.detach() for x in first])
        v = value[0].detach()
        if not isinstance(y, torch.Tensor) or y.shape != v.shape:
            raise _Stale("the traced graph no longer computes what func computes (shape)")
        y = y.to(v.dtype)
        if torch.equal(y, v):  # the usual case, in one op (NaN never compares equal)
            return
        eps = torch.finfo(v.dtype).eps
        scale = float(y.abs().nan_to_num(0.0, 0.0, 0.0).max()) if y.numel() else 0.0
        tol = 1e3 * eps * max(1.0, scale)
        close = (y == v) | ((y - v).abs() <= tol)
        same_nan = torch.isnan(y) & torch.isnan(v)
        if not bool((close | same_nan).all()):
            raise _Stale(
                "the traced graph no longer computes what func computes "
                "(its output differs from func's own on the first sample)"
            )

    return check


def _compute(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    tg = traced_graph(call)
    args, _, B = batched_args(call)
    meta = call.device.type == "meta" or being_traced(args)
    check = None if meta else _output_check(call, args)
    args = [*args, *lifted_inputs(call)]
    results = []
    if call.create_graph:
        # A differentiable result (NOTE [Differentiable results] in jacbatch.methods): the graph
        # is evaluated on the caller's tensors and the terms composed and written out of place,
        # so autograd (or an outer torch.func transform) differentiates the closed form itself.
        with torch.enable_grad():
            all_terms = tracing.jacobian_terms(tg, argnums, args, B, check)
            for a, ts, buf in zip(argnums, all_terms, outs, strict=True):
                in_shape = call.sample_shape(a)
                J = write.dense(ts, out_shape, in_shape, B, args[a])
                results.append(finish(J, len(out_shape), len(in_shape), vec, buf))
        return results
    with torch.no_grad():
        args = [x.detach() for x in args]
        all_terms = tracing.jacobian_terms(tg, argnums, args, B, check)
        for a, ts, buf in zip(argnums, all_terms, outs, strict=True):
            in_shape = call.sample_shape(a)
            Y, natural = _result(call, B, out_shape, in_shape, vec, buf)
            write.materialize(ts, out_shape, in_shape, natural)
            results.append(Y)
    return results


def _result(
    call: Call,
    B: int,
    out_shape: tuple[int, ...],
    in_shape: tuple[int, ...],
    vec: str | None,
    buf: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The result tensor and a ``(B, *out_shape, *in_shape)`` view of it to write into."""
    o = math.prod(out_shape)
    i = math.prod(in_shape)
    shape = (B, *out_shape, *in_shape) if vec is None else (B, o, i)
    Y = buf if buf is not None else torch.empty(shape, dtype=call.dtype, device=call.device)
    if vec is None:
        return Y, Y
    if vec == "row":
        return Y, Y.view(B, *out_shape, *in_shape)
    # column-major: both axes' indices are reversed
    no, ni = len(out_shape), len(in_shape)
    rev = Y.view(B, *reversed(out_shape), *reversed(in_shape))
    perm = (0, *(no - k for k in range(no)), *(no + ni - k for k in range(ni)))
    return Y, rev.permute(*perm)


def order_notes(call: Call, argnums: Sequence[int]) -> tuple[str, ...]:
    """Plan notes: per argnum of ``argnums`` traced into rules, the elimination order chosen
    and its estimate (NOTE [Choosing the elimination order] in :mod:`jacbatch.accumulation`),
    e.g. ``"argnum 1: reverse accumulation, est. 1.2 MFLOP (forward 9.8 MFLOP)"``."""
    if not argnums or in_transform(call.args):
        return ()
    tg = traced_graph(call)
    todo = [a for a in argnums if tg.analysis(a).ok]
    if not todo:
        return ()
    choices = tracing.orders(tg, todo)
    B = call.batch_size or 1
    return tuple(f"argnum {a}: {choices[a].describe(B)}" for a in todo)


def estimated_cost(call: Call, argnums: Sequence[int]) -> float:
    """Estimated FLOPs of this route for ``call`` w.r.t. ``argnums`` (``inf`` where it does not
    apply): :func:`jacbatch.tracing.estimated_cost` on the call's traced graph."""
    if in_transform(call.args):
        return math.inf
    return tracing.estimated_cost(traced_graph(call), argnums, call.batch_size or 1)


# ---------------------------------------------------------------------------------------------
# The route (NOTE [Routes: one protocol, one registry] in jacbatch.methods)
# ---------------------------------------------------------------------------------------------


def _route_applies(call: Call) -> bool:
    """Every op on every differentiated argument's path has a rule, for a function a closed
    form may stand for (no random draws, no writes)."""
    from ..plan import registered, traced_analyses, untraceable

    if all(registered(call.func, a) for a in call.argnums):
        return True  # the registered rules (jacbatch.methods.closed_form) apply
    if untraceable(call.probe) is not None:
        return False
    return all(an.ok for an in traced_analyses(call, call.argnums).values())


#: Asked for as ``method="closed_form"``; plans name it ``traced``. Only a simulation that
#: fails falls back to the multiple (the closed form's own working memory is small, but the
#: composed terms may hold intermediates: the autodiff figure stays the conservative one).
ROUTE: Route = Route(
    "traced", plain(compute), method="closed_form", applies=_route_applies, fallback_multiple=4.0
)
