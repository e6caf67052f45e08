"""Running a prepared :class:`~jacbatch.request.Request`: :func:`execute` (the whole result, in
batch chunks within the budget) and :func:`chunks` (one batch chunk at a time), both through
one :func:`_execute` of the plan's steps on the registered routes, with the fallbacks of
``method="auto"`` (a closed form that does not cover the values, a function vmap rejects,
state written that autograd saved)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from . import _nonfinite, _progress, _state, _torch_bugs, memory
from .call import Call
from .methods import route
from .plan import VMAP_REJECTED, Step, choose_autodiff, forward_ok
from .rules.terms import Unsupported

if TYPE_CHECKING:
    from .request import Request


def result_shape(
    call: Call, a: int, out_shape: tuple[int, ...], vec: str | None
) -> tuple[int, ...]:
    """The result's shape for argnum ``a``: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel,
    in_numel)`` with a ``vec`` (no ``B`` without a batch)."""
    lead = () if call.batch_size is None else (call.batch_size,)
    in_shape = call.sample_shape(a)
    if vec is None:
        return (*lead, *out_shape, *in_shape)
    return (*lead, math.prod(out_shape), math.prod(in_shape))


def execute(req: Request) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """The Jacobian(s) of a prepared call: in ``req.batch_chunk`` samples at a time, into the
    caller's ``out`` buffers where given (a tuple for tuple argnums)."""
    call, bufs = req.call, req.bufs
    B, batch_chunk = call.batch_size, req.batch_chunk
    transformed = call.create_graph and req.transformed
    if B is None or batch_chunk >= B:
        final = _execute(call, req, bufs)
    elif transformed:  # no plain buffer can hold the chunks: concatenate them
        parts: list[list[torch.Tensor]] = [[] for _ in call.argnums]
        with _progress.progress(B, req.show, "jacobian") as bar:
            for start in range(0, B, batch_chunk):
                n = min(batch_chunk, B - start)
                res = _execute(_slice_call(call, start, n), req, [None] * len(call.argnums))
                for p, J in zip(parts, res, strict=True):
                    p.append(J)
                bar(n)
        with _grad_for(call):
            final = [torch.cat(p) for p in parts]
    else:
        final = [
            b if b is not None else torch.empty(s, dtype=call.dtype, device=call.device)
            for s, b in zip(req.shapes, bufs, strict=True)
        ]
        # with a graph, the chunks' slices are views written with autograd on (CopySlices)
        with _progress.progress(B, req.show, "jacobian") as bar, _grad_for(call):
            for start in range(0, B, batch_chunk):
                n = min(batch_chunk, B - start)
                sub = _slice_call(call, start, n)
                _execute(sub, req, [f[start : start + n] for f in final])
                memory.release_freed()  # see NOTE [A chunk costs what it holds]
                bar(n)
    return tuple(final) if call.tuple_argnums else final[0]


def chunks(req: Request) -> Iterator[tuple[slice, Any]]:
    """``(batch_slice, J_chunk)`` for each chunk of ``req.batch_chunk`` samples, computed only
    when asked for (a tuple for tuple argnums)."""
    call = req.call
    B = call.batch_size or 0
    with _progress.progress(B, req.show, "iter_jacobian") as bar:
        for start in range(0, B, req.batch_chunk):
            n = min(req.batch_chunk, B - start)
            sub = _slice_call(call, start, n)
            res = _execute(sub, req, [None] * len(call.argnums))
            bar(n)
            chunk = tuple(res) if call.tuple_argnums else res[0]
            del res
            yield slice(start, start + n), chunk
            del chunk  # the caller has dropped it too: free it before computing the next
            memory.release_freed()  # see NOTE [A chunk costs what it holds]


def _execute(call: Call, req: Request, bufs: Sequence[torch.Tensor | None]) -> list[torch.Tensor]:
    """Run the plan's steps for ``call`` (``req.call`` or a batch chunk of it); results in the
    caller's ``vec`` (``bufs`` where given).

    Every evaluation of ``func`` is protected as ``plan.protection`` says (state restored,
    written arguments copied, randomness replayed: :func:`jacbatch._state.protect`). A
    differentiable result is computed with grad mode on from start to end (as
    ``torch.autograd.functional.jacobian`` with ``create_graph``), even under ``no_grad``.
    """
    with _grad_for(call), _state.protect(call.func, req.plan.protection, call.device) as f:
        run = call if f is call.func else dataclasses.replace(call, func=f)
        return _execute_steps(run, call.func, req, bufs)


_STRICT = threading.local()


@contextlib.contextmanager
def strict() -> Iterator[None]:
    """Run each step on its planned route only: no fallback to another route (a prepared
    program must be what the plan says, or not be made; :mod:`jacbatch.prepared`)."""
    before = getattr(_STRICT, "on", False)
    _STRICT.on = True
    try:
        yield
    finally:
        _STRICT.on = before


def _grad_for(call: Call) -> contextlib.AbstractContextManager[Any]:
    """Grad mode on for a differentiable result (whatever the caller's mode), else unchanged."""
    return torch.enable_grad() if call.create_graph else contextlib.nullcontext()


def _execute_steps(
    call: Call,
    user_func: Callable[..., Any],
    req: Request,
    bufs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    plan, method, chunk_size = req.plan, req.method, req.chunk_size
    out_shape, vec = req.out_shape, req.vec
    results: dict[int, torch.Tensor] = {}
    shapes = [result_shape(call, a, out_shape, vec) for a in call.argnums]
    for a, s, b in zip(call.argnums, shapes, bufs, strict=True):
        if math.prod(s) == 0:  # empty Jacobians need no route
            results[a] = (
                b if b is not None else torch.empty(s, dtype=call.dtype, device=call.device)
            )

    lead = 0 if call.batched else 1  # routes always return a batch dimension
    for step in plan.steps:
        todo = tuple(a for a in step.argnums if a not in results)
        if not todo:
            continue
        step_bufs = [_with_batch(bufs[call.argnums.index(a)], lead) for a in todo]
        sub = Step(step.route, todo, step.reason)
        ran = step.route
        try:
            jacs = _run_step(call, sub, chunk_size, out_shape, vec, step_bufs)
        except Unsupported as err:
            if getattr(_STRICT, "on", False):
                raise
            # A rule does not cover these values (e.g. a singular matrix): autodiff instead.
            if method != "auto":
                raise NotImplementedError(
                    f"jacobian: expected values the closed-form rules cover, got {err}. "
                    f"Use method='auto' to fall back to autodiff."
                ) from err
            jacs = _run_autodiff(call, todo, chunk_size, out_shape, vec, step_bufs, plan.ops)
            ran = "jacfwd"  # whichever autodiff route ran, the strictest check applies
        except (RuntimeError, NotImplementedError) as err:
            if getattr(_STRICT, "on", False):
                raise
            if plan.protection.writes_state and _INPLACE_ERROR in str(err) and call.batched:
                # func writes into state autograd saved for a later sample's backward pass:
                # each sample's Jacobian is finished before the next sample's forward pass.
                jacs = _sample_by_sample(call, sub, out_shape, vec, step_bufs)
            else:
                if method != "auto" and plan.protection.writes_state and "captured" in str(err):
                    raise NotImplementedError(
                        f"jacobian: expected a func that {step.route} can differentiate, got "
                        f"one that writes into tensors it closes over (e.g. a train-mode "
                        f"BatchNorm's running statistics), which torch.func's transforms "
                        f"refuse. Use method='vjp' or 'auto' (the state is restored after the "
                        f"call), or put the module in eval mode."
                    ) from err
                replaced = _torch_bugs.NOTE_PREFIX in step.reason
                if (method != "auto" and not replaced) or not route(step.route).vectorized:
                    raise
                # vmap rejects some functions (.item(), control flow on values): fall back.
                try:
                    fallback, _ = _torch_bugs.replacement(plan.ops, "vjp")
                    fallback = "per_sample" if fallback == "jacrev" else fallback
                    ran = fallback
                    jacs = _run_step(
                        call, Step(fallback, todo, "fallback"), None, out_shape, vec, step_bufs
                    )
                except Exception as err2:
                    if plan.protection.writes_state and _INPLACE_ERROR in str(err2):
                        jacs = _sample_by_sample(
                            call, Step(fallback, todo, "fallback"), out_shape, vec, step_bufs
                        )
                    else:
                        raise err2 from err
                VMAP_REJECTED.add(user_func)
        # NaN and Inf: per-sample reverse mode decides (NOTE [Non-finite values: one policy])
        _nonfinite.enforce(call, todo, jacs, ran, out_shape, vec, plan.random)
        for a, J in zip(todo, jacs, strict=True):
            results[a] = J if call.batched else J.squeeze(0)
    return [results[a] if b is None else b for a, b in zip(call.argnums, bufs, strict=True)]


#: autograd's error when a value saved for backward was written afterwards.
_INPLACE_ERROR = "modified by an inplace operation"


def _sample_by_sample(
    call: Call,
    step: Step,
    out_shape: tuple[int, ...],
    vec: str | None,
    bufs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """``step``'s route one sample at a time (each Jacobian ``(1, ...)``, concatenated).

    For a ``func`` that writes into tensors it closes over (a train-mode BatchNorm's running
    statistics): every evaluation starts from the caller's state (:mod:`jacbatch._state`), so a
    batched or looped forward pass would leave earlier samples' saved values overwritten.
    """
    B = call.batch_size or 0
    parts: list[list[torch.Tensor]] = [[] for _ in step.argnums]
    for b in range(B):
        sub = _slice_call(call, b, 1)
        sub_bufs = [None if buf is None else buf[b : b + 1] for buf in bufs]
        for p, J in zip(parts, _run_step(sub, step, None, out_shape, vec, sub_bufs), strict=True):
            p.append(J)
    # every sample was written into its slice of a caller's buffer, else concatenated (B >= 1)
    results = [buf if buf is not None else torch.cat(p) for p, buf in zip(parts, bufs, strict=True)]
    return results


def _slice_call(call: Call, start: int, n: int) -> Call:
    """The same call restricted to samples ``start : start + n``.

    A batched argument that is a narrow view of a larger storage is copied (see NOTE [A chunk
    costs what it holds]); shared arguments and whole-batch slices stay as they are.
    """
    args = tuple(
        a if d is None else memory.compact(a.narrow(d, start, n))
        for a, d in zip(call.args, call.in_dims, strict=True)
    )
    return dataclasses.replace(call, args=args, batch_size=n)


def _run_autodiff(
    call: Call,
    argnums: tuple[int, ...],
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    vec: str | None,
    bufs: Sequence[torch.Tensor | None],
    ops: frozenset[str] = frozenset(),
) -> list[torch.Tensor]:
    """The fastest autodiff route for ``argnums`` (the vjp loop where vmap rejects ``func``),
    avoiding the known torch bugs of ``ops``."""
    n_in = sum(math.prod(call.sample_shape(a)) for a in argnums)
    mode, reason = choose_autodiff(n_in, math.prod(out_shape), forward_ok(call))
    if call.batched_func is not None:  # a batched func: its own routes (jacbatch.methods.batched)
        mode = "batched_fwd" if mode == "jacfwd" else "batched_rev"
        return _run_step(call, Step(mode, argnums, reason), chunk_size, out_shape, vec, bufs)
    mode, _ = _torch_bugs.replacement(ops, mode)
    if call.func not in VMAP_REJECTED and mode != "per_sample":
        try:
            return _run_step(call, Step(mode, argnums, reason), chunk_size, out_shape, vec, bufs)
        except (RuntimeError, NotImplementedError):
            VMAP_REJECTED.add(call.func)
    fallback, _ = _torch_bugs.replacement(ops, "vjp")
    fallback = "per_sample" if fallback == "jacrev" else fallback
    return _run_step(call, Step(fallback, argnums, "fallback"), None, out_shape, vec, bufs)


def _with_batch(buf: torch.Tensor | None, lead: int) -> torch.Tensor | None:
    if buf is None:
        return None
    return buf.unsqueeze(0) if lead else buf


def _run_step(
    call: Call,
    step: Step,
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
    *,
    max_rows: int | None = None,
) -> list[torch.Tensor]:
    """``step``'s registered route for its argnums (NOTE [Routes: one protocol, one registry])."""
    return route(step.route).compute(
        call, step.argnums, out_shape, vec, outs, chunk_size=chunk_size, max_rows=max_rows
    )
