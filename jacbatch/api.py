"""The one dispatch point: :func:`jacobian`, :func:`explain` and :func:`check`."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, overload

import torch

from . import _nonfinite, _probe, _progress, _state, _threads, _torch_bugs, memory, rules
from . import _validation as V
from .methods import (
    closed_form,
    functorch,
    has_tangents,
    in_transform,
    needs_graph,
    traced,
    vjp,
)
from .rules.terms import Unsupported
from .structured import JacobianOperator

ROUTES: tuple[str, ...] = ("closed_form", "jacrev", "jacfwd", "vjp")

# Functions whose forward vmap rejected once: "auto" goes straight to the vjp route for them.
_VMAP_REJECTED: weakref.WeakSet[Any] = weakref.WeakSet()
# Chunking chosen for a (function, shapes, budget): simulations run once per shape in a loop.
_FIT_CACHE: weakref.WeakKeyDictionary[Any, dict[Any, tuple[int, int | None]]] = (
    weakref.WeakKeyDictionary()
)


# ---------------------------------------------------------------------------------------------
# Planning: which route runs, and why
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One route applied to some of the argnums."""

    method: str
    argnums: tuple[int, ...]
    reason: str


@dataclass(frozen=True)
class Plan:
    """What :func:`jacobian` will do for a call (see :func:`explain`).

    Attributes:
        steps: the routes, each with the argnums it covers and why it was chosen.
        batch_size: ``B`` or ``None`` without a batch.
        out_shape: per-sample output shape.
        in_shapes: per-sample shape of each differentiated argument.
        ops: the aten ops the function runs (from the probe), for the known torch bugs.
        random: the function draws random numbers (from the probe).
    """

    steps: tuple[Step, ...]
    batch_size: int | None
    out_shape: tuple[int, ...]
    in_shapes: tuple[tuple[int, ...], ...]
    notes: tuple[str, ...] = field(default=())
    # How evaluations of func are protected (state, argument writes, randomness): _state.protect.
    protection: _state.Protection = field(
        default_factory=_state.Protection, repr=False, compare=False
    )
    ops: frozenset[str] = field(default=frozenset(), repr=False, compare=False)
    random: bool = field(default=False, repr=False, compare=False)

    def __str__(self) -> str:
        batch = "no batch" if self.batch_size is None else f"B={self.batch_size}"
        lines = [f"jacobian plan ({batch}, out {self.out_shape}, in {list(self.in_shapes)}):"]
        for s in self.steps:
            lines.append(f"  argnums {s.argnums}: {s.method} — {s.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


#: Per-sample Jacobians with at least this many entries go to the vjp route rather than jacrev.
LARGE_JACOBIAN = 2**20


def choose_autodiff(in_numel: int, out_numel: int, forward_ok: bool = True) -> tuple[str, str]:
    """The autodiff route expected to be fastest for one sample's sizes, with the reason.

    * A scalar output needs one reverse pass: the vjp route does it for the whole batch with
      one plain ``torch.autograd.grad`` call, without vmap's batching overhead.
    * Fewer inputs than outputs: forward mode (one pass per input element, vectorized).
    * A large per-sample Jacobian (``out_numel * in_numel >= LARGE_JACOBIAN``): ``vmap(jacrev)``
      materializes about three times the Jacobian in intermediates, and beyond the caches that
      traffic dominates; the vjp route runs one backward pass per output element for the whole
      batch and writes each row once (peak memory about the Jacobian itself).
    * Otherwise reverse mode (one vectorized pass per output element; ties go to jacrev).
    * ``forward_ok=False`` (``func`` switches grad mode off inside, which forward-mode AD does
      not see): reverse mode wherever forward mode would have been chosen.

    Example:
        >>> [choose_autodiff(i, o)[0] for i, o in [(1024, 1), (4, 1024), (64, 64), (1024, 1024)]]
        ['vjp', 'jacfwd', 'jacrev', 'vjp']
    """
    if out_numel == 1:
        return "vjp", "scalar output: one backward pass for the whole batch"
    if in_numel < out_numel and not forward_ok:
        return "jacrev", (
            "reverse mode: func switches grad mode off inside (e.g. torch.no_grad), a "
            "stop-gradient forward mode does not see"
        )
    if in_numel < out_numel:
        return "jacfwd", f"forward mode: {in_numel} input elements < {out_numel} output elements"
    if out_numel * in_numel >= LARGE_JACOBIAN:
        return "vjp", (
            f"reverse mode, one backward pass per output row: the {out_numel}x{in_numel} "
            f"per-sample Jacobian is too large for vmap(jacrev)'s intermediates"
        )
    return "jacrev", f"reverse mode: {out_numel} output elements <= {in_numel} input elements"


def plan_auto(
    func: Callable[..., Any],
    argnums: Sequence[int],
    in_numels: Sequence[int],
    out_numel: int,
    traced: Mapping[int, str | None] | None = None,
    forward_ok: bool = True,
) -> tuple[Step, ...]:
    """``method="auto"`` as a pure function of the function and the per-sample sizes.

    ``traced`` maps an argnum to ``None`` when the traced graph of ``func`` has a rule for every
    node on that argument's path, or to the reason it does not (see :mod:`jacbatch.tracing`).
    ``forward_ok=False`` keeps autodiff off forward mode (see :func:`choose_autodiff`).
    """
    traced = traced or {}
    with_rule = tuple(a for a in argnums if rules.lookup(func, a) is not None)
    with_trace = tuple(a for a in argnums if a not in with_rule and traced.get(a, "") is None)
    without = tuple(a for a in argnums if a not in with_rule and a not in with_trace)
    steps = []
    if with_rule:
        steps.append(Step("closed_form", with_rule, "registered closed-form rule, no autodiff"))
    if with_trace:
        steps.append(
            Step("traced", with_trace, "every traced op has a closed-form rule, no autodiff")
        )
    if without:
        why = "; ".join(dict.fromkeys(str(traced[a]) for a in without if traced.get(a) is not None))
        prefix = f"no closed form ({why})" if why else "no closed form"
        if func in _VMAP_REJECTED:
            steps.append(
                Step(
                    "vjp",
                    without,
                    f"{prefix}; vmap rejected this function before; explicit VJP loop",
                )
            )
        else:
            n_in = sum(n for a, n in zip(argnums, in_numels, strict=True) if a in without)
            method, reason = choose_autodiff(n_in, out_numel, forward_ok)
            steps.append(Step(method, without, f"{prefix}; {reason}"))
    return tuple(steps)


def probe_call(call: V.Call) -> _probe.ProbeResult:
    """Run ``func`` once for one sample, on meta tensors where it can (see :mod:`jacbatch._probe`).

    Checks that the output is one floating-point tensor.
    """
    where = "jacobian"

    def first_sample() -> list[torch.Tensor]:
        if call.batch_size == 0:
            return [
                torch.zeros(call.sample_shape(i), dtype=call.dtype, device=call.device)
                for i in range(len(call.args))
            ]
        return [
            a if d is None else a.select(d, 0) for a, d in zip(call.args, call.in_dims, strict=True)
        ]

    result = _probe.probe(
        call.func, [call.sample_shape(i) for i in range(len(call.args))], call.dtype, first_sample
    )
    out = result.out
    if not isinstance(out, torch.Tensor):
        V.output_error(where, out)
    if not out.dtype.is_floating_point:
        V.output_dtype_error(where, out.dtype)
    return result


def _normalize(
    where: str,
    func: object,
    args: tuple[object, ...],
    argnums: object,
    in_dims: object,
    randomness: object = "error",
) -> V.Call:
    """:func:`~jacbatch._validation.normalize_call` plus the ``randomness`` option."""
    call = V.normalize_call(where, func, args, argnums, in_dims)
    randomness = V.check_randomness(where, randomness)
    return (
        call if randomness == call.randomness else dataclasses.replace(call, randomness=randomness)
    )


def _probe_output(call: V.Call) -> tuple[int, ...]:
    """Per-sample output shape, found without heavy work (see :func:`probe_call`)."""
    return tuple(probe_call(call).out.shape)


def _probed(call: V.Call, create_graph: bool) -> tuple[V.Call, tuple[int, ...]]:
    """Probe ``func`` once: the call with its probe and whether the result keeps a graph (NOTE
    [Differentiable results: when a Jacobian keeps its graph] in :mod:`jacbatch.methods`), and
    the per-sample output shape."""
    probe = probe_call(call)
    graph = needs_graph(call.args, create_graph, probe.reads_grad)
    return dataclasses.replace(call, create_graph=graph, probe=probe), tuple(probe.out.shape)


def _forward_ok(call: V.Call) -> bool:
    """Forward mode is right for ``func``: it does not switch grad mode off inside (seen by the
    probe; forward-mode AD ignores ``torch.no_grad``), and the arguments are not forward-mode
    dual tensors (torch does not nest forward AD)."""
    blind = call.probe is not None and call.probe.forward_blind
    return not blind and not has_tangents(call.args)


@dataclass(frozen=True)
class _Untraced:
    """The analysis of a function that is not traced (it reads like a failed one)."""

    reason: str
    ok: bool = False
    notes: tuple[str, ...] = ()


#: Why plain code is not traced inside a torch.func transform.
IN_TRANSFORM = (
    "not traced inside a torch.func transform (grad, vjp, jacrev, jacfwd, vmap): "
    "autodiff composes with it"
)


def _traced_analyses(call: V.Call, argnums: Sequence[int], retry: bool = False) -> dict[int, Any]:
    """Per argnum without a registered rule, the traced analysis (cached with the trace).

    Inside a torch.func transform nothing is traced: tracing would see the transform's wrapped
    values, not the function (and cache that graph for later calls).
    """
    todo = [a for a in argnums if rules.lookup(call.func, a) is None]
    if not todo:
        return {}
    if in_transform(call.args):
        return {a: _Untraced(IN_TRANSFORM) for a in todo}
    tg = traced.traced_graph(call, retry)
    return {a: tg.analysis(a) for a in todo}


def _node_notes(analyses: Mapping[int, Any]) -> tuple[str, ...]:
    notes: list[str] = []
    for a, an in analyses.items():
        if not an.notes and not an.ok:
            notes.append(f"argnum {a}: {an.reason}")
        for nn in an.notes:
            notes.append(f"argnum {a}: {nn}")
    return tuple(notes)


def _untraceable(probe: _probe.ProbeResult | None) -> str | None:
    """Why the traced closed form must not be used for this function (None: it may)."""
    if probe is None:
        return None
    if probe.random:
        return "draws random numbers (a closed form cannot reproduce the draw)"
    if probe.writes_state:
        return "writes into tensors that exist before the call (state)"
    if probe.mutated:
        return f"writes into its arguments {list(probe.mutated)}"
    return None


def _protection(call: V.Call, probe: _probe.ProbeResult | None) -> _state.Protection:
    if probe is None:
        return _state.Protection(randomness=call.randomness)
    if probe.random and call.randomness == "error":
        V.random_function_error("jacobian", [o for o in probe.ops if _is_random_op(o)])
    same = probe.random and call.randomness == "same"
    return _state.Protection(
        probe.writes_state,
        probe.mutated,
        probe.random,
        call.randomness,
        _state.rng_state(call.device) if same else None,
    )


def _protection_notes(p: _state.Protection) -> tuple[str, ...]:
    notes = []
    if p.writes_state:
        notes.append(
            "func writes into tensors that exist before the call (state): each evaluation sees "
            "them as they were, and they are restored afterwards"
        )
    if p.mutated:
        notes.append(f"func writes into its arguments {list(p.mutated)}: it is given copies")
    if p.random:
        notes.append(
            f"func draws random numbers: randomness={p.randomness!r}, one realization per sample"
        )
    return tuple(notes)


def _is_random_op(name: str) -> bool:
    try:
        op: Any = torch.ops
        for part in name.split("."):
            op = getattr(op, part)
        return torch.Tag.nondeterministic_seeded in op.tags
    except (AttributeError, RuntimeError):
        return False


def _plan(
    call: V.Call,
    method: str,
    out_shape: tuple[int, ...],
    probe: _probe.ProbeResult | None = None,
) -> Plan:
    in_shapes = tuple(call.sample_shape(a) for a in call.argnums)
    probe = probe if probe is not None else (call.probe or probe_call(call))
    if method == "closed_form" and _probe.probing():
        # A nested call run by an enclosing call's probe (shapes only, under a dispatch mode
        # where nothing is captured): any route gives the same shapes.
        method = "auto"
    notes: tuple[str, ...] = ()
    protection = _protection(call, probe)
    untraceable = _untraceable(probe)
    if untraceable is not None and method in ("auto", "closed_form"):
        if method == "closed_form" and not closed_form.has_rules(call, call.argnums):
            V.no_closed_form_for("jacobian", untraceable)
        # Registered rules never run func; nothing is traced.
        todo = [a for a in call.argnums if rules.lookup(call.func, a) is None]
        steps = plan_auto(
            call.func,
            call.argnums,
            [math.prod(s) for s in in_shapes],
            math.prod(out_shape),
            traced={a: f"func {untraceable}" for a in todo},
        )
        if protection.writes_state:  # torch.func refuses writes into captured tensors
            steps = tuple(
                Step("vjp", s.argnums, f"{s.reason.split(';')[0]}; explicit VJP loop")
                if s.method in ("jacrev", "jacfwd")
                else s
                for s in steps
            )
        return _finish_plan(
            steps, call, out_shape, in_shapes, _protection_notes(protection), protection, probe
        )
    if method == "auto":
        analyses = _traced_analyses(call, call.argnums)
        steps = plan_auto(
            call.func,
            call.argnums,
            [math.prod(s) for s in in_shapes],
            math.prod(out_shape),
            traced={a: None if an.ok else an.reason for a, an in analyses.items()},
            forward_ok=_forward_ok(call),
        )
        notes = _node_notes(analyses)
    elif method == "closed_form":
        analyses = _traced_analyses(call, call.argnums, retry=True)
        for a, an in analyses.items():
            if not an.ok:
                V.no_rule_error(
                    "jacobian", call.func, a, rules.available(), f"Tracing it: {an.reason}."
                )
        registered = tuple(a for a in call.argnums if a not in analyses)
        steps = tuple(
            st
            for st in (
                Step("closed_form", registered, "requested") if registered else None,
                Step("traced", tuple(analyses), "requested (closed form from the traced graph)")
                if analyses
                else None,
            )
            if st is not None
        )
        notes = _node_notes(analyses)
    else:
        steps = (Step(method, call.argnums, "requested"),)
    notes += _protection_notes(protection)
    return _finish_plan(steps, call, out_shape, in_shapes, notes, protection, probe)


def _finish_plan(
    steps: tuple[Step, ...],
    call: V.Call,
    out_shape: tuple[int, ...],
    in_shapes: tuple[tuple[int, ...], ...],
    notes: tuple[str, ...],
    protection: _state.Protection,
    probe: _probe.ProbeResult,
) -> Plan:
    """The plan, with steps a known torch bug makes wrong replaced (see :mod:`jacbatch._torch_bugs`)."""
    steps, bug_notes = _avoid_torch_bugs(steps, probe.ops)
    return Plan(
        steps,
        call.batch_size,
        out_shape,
        in_shapes,
        notes + bug_notes,
        protection,
        probe.ops,
        probe.random,
    )


def _avoid_torch_bugs(
    steps: tuple[Step, ...], ops: frozenset[str]
) -> tuple[tuple[Step, ...], tuple[str, ...]]:
    """Steps whose route a known torch bug makes wrong run its replacement instead
    (NOTE [Known torch bugs: one list, consulted by the planner])."""
    out, notes = [], []
    for st in steps:
        route, bugs = _torch_bugs.replacement(ops, st.method)
        if bugs:
            note = _torch_bugs.note(bugs, st.method, route)
            notes.append(note)
            st = Step(route, st.argnums, f"{st.reason}; {note}")
        out.append(st)
    return tuple(out), tuple(notes)


def _run_step(
    call: V.Call,
    step: Step,
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    layout: str | None,
    outs: Sequence[torch.Tensor | None],
    *,
    max_rows: int | None = None,
) -> list[torch.Tensor]:
    if step.method == "closed_form":
        return closed_form.compute(call, step.argnums, out_shape, layout, outs)
    if step.method == "traced":
        return traced.compute(call, step.argnums, out_shape, layout, outs)
    if step.method == "jacrev":
        return functorch.compute(call, step.argnums, "rev", chunk_size, out_shape, layout, outs)
    if step.method == "jacfwd":
        # Tangents take the size of a view's whole storage: NOTE [A chunk costs what it holds].
        call = dataclasses.replace(call, args=tuple(memory.compact(a) for a in call.args))
        with _threads.FORWARD_AD:  # NOTE [First calls from several threads]
            return functorch.compute(call, step.argnums, "fwd", chunk_size, out_shape, layout, outs)
    per_sample = step.method == "per_sample"  # NOTE [Known torch bugs: one list, ...]
    return vjp.compute(
        call, step.argnums, out_shape, layout, outs, max_rows=max_rows, per_sample=per_sample
    )


def _result_shape(
    call: V.Call, a: int, out_shape: tuple[int, ...], layout: str | None
) -> tuple[int, ...]:
    lead = () if call.batch_size is None else (call.batch_size,)
    in_shape = call.sample_shape(a)
    if layout is None:
        return (*lead, *out_shape, *in_shape)
    return (*lead, math.prod(out_shape), math.prod(in_shape))


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


@overload
def jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    out: torch.Tensor | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    randomness: str = "error",
    create_graph: bool = False,
) -> torch.Tensor: ...


@overload
def jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: tuple[int, ...],
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    out: tuple[torch.Tensor, ...] | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    randomness: str = "error",
    create_graph: bool = False,
) -> tuple[torch.Tensor, ...]: ...


def jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    out: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
    max_memory: int | str | None = None,
    progress: bool | None = None,
    randomness: str = "error",
    create_graph: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """Full Jacobian of ``func`` w.r.t. ``args[argnums]``, for one input or a batch of inputs.

    ``func`` is written for ONE sample; ``in_dims`` says which arguments carry a batch dimension,
    exactly as in ``torch.func.vmap``.

    Args:
        func: per-sample function of tensors returning one floating-point tensor of shape
            ``out_shape``.
        *args: its arguments. A batched argument has its per-sample shape plus a batch dimension
            of size ``B`` at ``in_dims[i]``.
        argnums: the argument(s) to differentiate; a tuple returns a tuple of Jacobians.
        in_dims: int (every argument), or a tuple with one int/``None`` per argument. ``None``
            marks an argument shared by the whole batch; all ``None`` means no batch.
        method: ``"auto"`` (a registered closed form, else a closed form composed from op
            rules when ``func`` traces into ops that all have one, else the autodiff route
            expected to be fastest for the shapes), ``"closed_form"`` (registered or traced; raises
            ``NotImplementedError`` otherwise), ``"jacrev"``, ``"jacfwd"`` or ``"vjp"``.
        vec: ``None`` keeps the layout ``(B, *out_shape, *in_shape)``; ``"row"`` / ``"col"``
            flatten to ``(B, out_numel, in_numel)`` in row-major (PyTorch) or column-major order.
        chunk_size: at most this many Jacobian rows (jacrev) or columns (jacfwd) per vectorized
            pass. The closed form writes the result directly and the vjp route already computes
            one row per backward pass, so neither is affected by it.
        out: a contiguous tensor of the result's shape, dtype and device to write into (a tuple
            of them for tuple ``argnums``); a tensor over a numpy memmap streams to disk.
        max_memory: working-memory budget beyond the result, in bytes or as a string such as
            ``"512MiB"``. The route is chunked over the batch (and over rows or columns for
            jacrev/jacfwd) to stay within it. Default: half of the memory free now. A result that
            cannot fit in free memory at all is refused before anything is allocated.
        progress: show a progress bar for chunked runs that take over 2 seconds; ``None`` shows
            it only when stderr is a terminal.
        randomness: for a ``func`` that draws random numbers (dropout, ``rand_like``), as in
            ``torch.func.vmap``: ``"error"`` (default) refuses it before any work,
            ``"different"`` gives each sample its own draw, ``"same"`` one draw for every
            sample. Either way each sample's Jacobian is that of ONE realization (every row
            and column sees the same draw), by every route; the traced closed form is not used.

    ``func`` may write into tensors it closes over (a train-mode BatchNorm's running
    statistics): each evaluation sees them as the caller left them, and they are restored when
    the call returns. A ``func`` that writes into its arguments gets copies of them (the
    Jacobian is then with respect to the argument's value on entry). See NOTE [Writes into
    tensors that existed before the call] in :mod:`jacbatch._state`.
        create_graph: make the result differentiable (as in
            ``torch.autograd.functional.jacobian``), even under ``torch.no_grad()`` or when no
            argument requires grad. Not needed when autograd or torch.func already asks: the
            result is differentiable whenever grad mode is on and an argument (or a tensor
            ``func`` closes over, such as a module's parameters) requires grad, and whenever
            ``jacobian`` runs inside a torch.func transform (``grad``, ``vjp``, ``jacrev``,
            ``jacfwd``, ``vmap``), so ``jacobian(lambda x: jacobian(f, x), X)`` is the Hessian.
            Under ``torch.inference_mode()`` nothing is differentiable.

    Returns:
        ``(B, *out_shape, *in_shape)`` (no ``B`` without a batch), or ``(B, out_numel,
        in_numel)`` with ``vec``; a scalar output gives gradients ``(B, *in_shape)``. A tuple of
        those for tuple ``argnums``. The result carries an autograd graph only when it must be
        differentiable (see ``create_graph``); otherwise none is built. An ``out=`` buffer is
        filled with ``copy_``, so it carries the graph in that case; inside a torch.func
        transform ``out=`` is refused (a plain buffer cannot hold a transformed value).

    Example:
        >>> A = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
        >>> W, B = torch.zeros(3, 2), torch.zeros(2)
        >>> jacobian(jacbatch.affine, A, W, B, argnums=1, in_dims=None, vec="row")
        tensor([[1., 0., 2., 0., 3., 0.],
                [0., 1., 0., 2., 0., 3.],
                [4., 0., 5., 0., 6., 0.],
                [0., 4., 0., 5., 0., 6.]])
    """
    where = "jacobian"
    call = _normalize(where, func, args, argnums, in_dims, randomness)
    method = V.check_method(where, method)
    layout = V.check_vec(where, vec)
    chunk_size = V.check_chunk_size(where, chunk_size)
    budget = None if max_memory is None else memory.parse_bytes(where, max_memory)
    show = V.check_progress(where, progress)
    if out is not None:  # an out buffer over an argument is refused before any work
        given = out if isinstance(out, tuple) else (out,)
        V.check_out_aliasing(where, [o for o in given if isinstance(o, torch.Tensor)], call.args)
    call, out_shape = _probed(call, V.check_bool(where, "create_graph", create_graph))
    plan = _plan(call, method, out_shape, call.probe)
    shapes = [_result_shape(call, a, out_shape, layout) for a in call.argnums]
    bufs = _check_outs(where, call, out, shapes)
    transformed = call.create_graph and in_transform(call.args)
    if transformed and out is not None:
        raise ValueError(
            f"{where}: expected out=None inside a torch.func transform (grad, vjp, jacrev, "
            f"jacfwd, vmap), got an out buffer. A plain tensor cannot hold a transformed "
            f"(batched or gradient-tracking) value: drop out= and use the returned tensor."
        )

    # Refuse a result that cannot fit before allocating anything.
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    fresh = sum(math.prod(s) for s, b in zip(shapes, bufs, strict=True) if b is None) * itemsize
    free = memory.available_memory(call.device)
    if fresh > free:
        V.result_too_large(where, fresh, free, budget, call.batch_size)
    if budget is None:
        budget = memory.default_budget(call.device)

    batch_chunk, chunk_size = _fit(call, plan, out_shape, layout, chunk_size, budget, False)
    B = call.batch_size
    if B is None or batch_chunk >= B:
        final = _execute(call, plan, method, chunk_size, out_shape, layout, bufs)
    elif transformed:  # no plain buffer can hold the chunks: concatenate them
        parts: list[list[torch.Tensor]] = [[] for _ in call.argnums]
        with _progress.progress(B, show, "jacobian") as bar:
            for start in range(0, B, batch_chunk):
                n = min(batch_chunk, B - start)
                res = _execute(
                    _slice_call(call, start, n), plan, method, chunk_size, out_shape, layout,
                    [None] * len(call.argnums),
                )  # fmt: skip
                for p, J in zip(parts, res, strict=True):
                    p.append(J)
                bar(n)
        with _grad_for(call):
            final = [torch.cat(p) for p in parts]
    else:
        final = [
            b if b is not None else torch.empty(s, dtype=call.dtype, device=call.device)
            for s, b in zip(shapes, bufs, strict=True)
        ]
        # with a graph, the chunks' slices are views written with autograd on (CopySlices)
        with _progress.progress(B, show, "jacobian") as bar, _grad_for(call):
            for start in range(0, B, batch_chunk):
                n = min(batch_chunk, B - start)
                sub = _slice_call(call, start, n)
                _execute(
                    sub,
                    plan,
                    method,
                    chunk_size,
                    out_shape,
                    layout,
                    [f[start : start + n] for f in final],
                )
                memory.release_freed()  # see NOTE [A chunk costs what it holds]
                bar(n)
    return tuple(final) if call.tuple_argnums else final[0]


def _check_outs(
    where: str, call: V.Call, out: object, shapes: Sequence[tuple[int, ...]]
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


def _execute(
    call: V.Call,
    plan: Plan,
    method: str,
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    layout: str | None,
    bufs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Run the plan's steps for ``call``; results in the caller's layout (``bufs`` where given).

    Every evaluation of ``func`` is protected as ``plan.protection`` says (state restored,
    written arguments copied, randomness replayed: :func:`jacbatch._state.protect`). A
    differentiable result is computed with grad mode on from start to end (as
    ``torch.autograd.functional.jacobian`` with ``create_graph``), even under ``no_grad``.
    """
    with _grad_for(call), _state.protect(call.func, plan.protection, call.device) as f:
        run = call if f is call.func else dataclasses.replace(call, func=f)
        return _execute_steps(run, call.func, plan, method, chunk_size, out_shape, layout, bufs)


def _grad_for(call: V.Call) -> contextlib.AbstractContextManager[Any]:
    """Grad mode on for a differentiable result (whatever the caller's mode), else unchanged."""
    return torch.enable_grad() if call.create_graph else contextlib.nullcontext()


def _execute_steps(
    call: V.Call,
    user_func: Callable[..., Any],
    plan: Plan,
    method: str,
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    layout: str | None,
    bufs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    results: dict[int, torch.Tensor] = {}
    shapes = [_result_shape(call, a, out_shape, layout) for a in call.argnums]
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
        sub = Step(step.method, todo, step.reason)
        ran = step.method
        try:
            jacs = _run_step(call, sub, chunk_size, out_shape, layout, step_bufs)
        except Unsupported as err:
            # A rule does not cover these values (e.g. a singular matrix): autodiff instead.
            if method != "auto":
                raise NotImplementedError(
                    f"jacobian: expected values the closed-form rules cover, got {err}. "
                    f"Use method='auto' to fall back to autodiff."
                ) from err
            jacs = _run_autodiff(call, todo, chunk_size, out_shape, layout, step_bufs, plan.ops)
            ran = "jacfwd"  # whichever autodiff route ran, the strictest check applies
        except (RuntimeError, NotImplementedError) as err:
            if plan.protection.writes_state and _INPLACE_ERROR in str(err) and call.batched:
                # func writes into state autograd saved for a later sample's backward pass:
                # each sample's Jacobian is finished before the next sample's forward pass.
                jacs = _sample_by_sample(call, sub, out_shape, layout, step_bufs)
            else:
                if method != "auto" and plan.protection.writes_state and "captured" in str(err):
                    raise NotImplementedError(
                        f"jacobian: expected a func that {step.method} can differentiate, got "
                        f"one that writes into tensors it closes over (e.g. a train-mode "
                        f"BatchNorm's running statistics), which torch.func's transforms "
                        f"refuse. Use method='vjp' or 'auto' (the state is restored after the "
                        f"call), or put the module in eval mode."
                    ) from err
                replaced = _torch_bugs.NOTE_PREFIX in step.reason
                if (method != "auto" and not replaced) or step.method not in ("jacrev", "jacfwd"):
                    raise
                # vmap rejects some functions (.item(), control flow on values): fall back.
                try:
                    fallback, _ = _torch_bugs.replacement(plan.ops, "vjp")
                    fallback = "per_sample" if fallback == "jacrev" else fallback
                    ran = fallback
                    jacs = _run_step(
                        call, Step(fallback, todo, "fallback"), None, out_shape, layout, step_bufs
                    )
                except Exception as err2:
                    if plan.protection.writes_state and _INPLACE_ERROR in str(err2):
                        jacs = _sample_by_sample(
                            call, Step(fallback, todo, "fallback"), out_shape, layout, step_bufs
                        )
                    else:
                        raise err2 from err
                _VMAP_REJECTED.add(user_func)
        # NaN and Inf: per-sample reverse mode decides (NOTE [Non-finite values: one policy])
        _nonfinite.enforce(call, todo, jacs, ran, out_shape, layout, plan.random)
        for a, J in zip(todo, jacs, strict=True):
            results[a] = J if call.batched else J.squeeze(0)
    return [results[a] if b is None else b for a, b in zip(call.argnums, bufs, strict=True)]


#: autograd's error when a value saved for backward was written afterwards.
_INPLACE_ERROR = "modified by an inplace operation"


def _sample_by_sample(
    call: V.Call,
    step: Step,
    out_shape: tuple[int, ...],
    layout: str | None,
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
        for p, J in zip(
            parts, _run_step(sub, step, None, out_shape, layout, sub_bufs), strict=True
        ):
            p.append(J)
    # every sample was written into its slice of a caller's buffer, else concatenated (B >= 1)
    results = [buf if buf is not None else torch.cat(p) for p, buf in zip(parts, bufs, strict=True)]
    return results


def _slice_call(call: V.Call, start: int, n: int) -> V.Call:
    """The same call restricted to samples ``start : start + n``.

    A batched argument that is a narrow view of a larger storage is copied (see NOTE [A chunk
    costs what it holds]); shared arguments and whole-batch slices stay as they are.
    """
    args = tuple(
        a if d is None else memory.compact(a.narrow(d, start, n))
        for a, d in zip(call.args, call.in_dims, strict=True)
    )
    return dataclasses.replace(call, args=args, batch_size=n)


def _meta_call(call: V.Call, samples: int | None) -> V.Call:
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
    call: V.Call,
    plan: Plan,
    out_shape: tuple[int, ...],
    layout: str | None,
    chunk_size: int | None,
    samples: int | None = None,
) -> memory.MemoryEstimate:
    """Peak memory of running ``plan`` on ``call`` (or on its first ``samples`` samples),
    simulated on meta tensors (see NOTE in :mod:`jacbatch.memory`)."""
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    B = call.batch_size if samples is None else samples
    per_out = sum(math.prod(out_shape) * math.prod(call.sample_shape(a)) for a in call.argnums)
    output = per_out * (B if B is not None else 1) * itemsize
    name = "+".join(s.method for s in plan.steps)
    mcall = _meta_call(call, B)

    def run() -> list[torch.Tensor]:
        res: list[torch.Tensor] = []
        with _state.protect(mcall.func, plan.protection, mcall.device) as f:
            run_call = mcall if f is mcall.func else dataclasses.replace(mcall, func=f)
            for step in plan.steps:
                bufs: list[torch.Tensor | None] = [None] * len(step.argnums)
                res += _run_step(run_call, step, chunk_size, out_shape, layout, bufs, max_rows=2)
        return res

    try:
        peak = memory.simulate_peak(run)
    except Exception:  # cannot run on meta tensors: conservative multiples of the output
        mult = max(memory.FALLBACK_MULTIPLE.get(s.method, 4.0) for s in plan.steps)
        return memory.MemoryEstimate(name, output, int(output * (1 + mult)), B, exact=False)
    return memory.MemoryEstimate(name, output, max(peak, output), B)


def _fit(
    call: V.Call,
    plan: Plan,
    out_shape: tuple[int, ...],
    layout: str | None,
    chunk_size: int | None,
    budget: int,
    count_output: bool,
) -> tuple[int, int | None]:
    """Samples per batch chunk, and rows per vectorized pass, that keep working memory within
    ``budget`` (and the chunk's output too when ``count_output``)."""
    B = call.batch_size if call.batch_size is not None else 1
    itemsize = torch.empty((), dtype=call.dtype).element_size()
    per_out = sum(math.prod(out_shape) * math.prod(call.sample_shape(a)) for a in call.argnums)
    # Quick accept: a generous bound on any route's working memory, without simulating.
    bound = (10 if count_output else 9) * per_out * itemsize * B + sum(a.nbytes for a in call.args)
    if bound <= budget or B == 0:
        return max(B, 1), chunk_size

    key = (
        tuple((s.method, s.argnums) for s in plan.steps),
        tuple(tuple(a.shape) for a in call.args),
        call.in_dims,
        call.dtype,
        call.device,
        layout,
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
        cache[key] = _fit_uncached(call, plan, out_shape, layout, chunk_size, budget, count_output)
    return cache[key]


def _fit_uncached(
    call: V.Call,
    plan: Plan,
    out_shape: tuple[int, ...],
    layout: str | None,
    chunk_size: int | None,
    budget: int,
    count_output: bool,
) -> tuple[int, int | None]:
    B = call.batch_size if call.batch_size is not None else 1
    # These routes return a chunk's Jacobian as a temporary that is copied into the result.
    copies = any(s.method in ("jacrev", "jacfwd") for s in plan.steps)

    def need(samples: int, rows: int | None) -> int:
        est = _estimate(call, plan, out_shape, layout, rows, samples if call.batched else None)
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
    if all(s.method in ("jacrev", "jacfwd") for s in plan.steps):
        sizes = [math.prod(call.sample_shape(a)) for a in call.argnums]
        c = chunk_size or max(math.prod(out_shape), *sizes)
        while c > 1:
            c = max(1, c // 2)
            if need(1, c) <= budget:
                return 1, c
    V.budget_too_small(
        "jacobian", need(1, chunk_size), budget, "+".join(s.method for s in plan.steps)
    )


def _run_autodiff(
    call: V.Call,
    argnums: tuple[int, ...],
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    layout: str | None,
    bufs: Sequence[torch.Tensor | None],
    ops: frozenset[str] = frozenset(),
) -> list[torch.Tensor]:
    """The fastest autodiff route for ``argnums`` (the vjp loop where vmap rejects ``func``),
    avoiding the known torch bugs of ``ops``."""
    n_in = sum(math.prod(call.sample_shape(a)) for a in argnums)
    mode, reason = choose_autodiff(n_in, math.prod(out_shape), _forward_ok(call))
    mode, _ = _torch_bugs.replacement(ops, mode)
    if call.func not in _VMAP_REJECTED and mode != "per_sample":
        try:
            return _run_step(call, Step(mode, argnums, reason), chunk_size, out_shape, layout, bufs)
        except (RuntimeError, NotImplementedError):
            _VMAP_REJECTED.add(call.func)
    fallback, _ = _torch_bugs.replacement(ops, "vjp")
    fallback = "per_sample" if fallback == "jacrev" else fallback
    return _run_step(call, Step(fallback, argnums, "fallback"), None, out_shape, layout, bufs)


def _with_batch(buf: torch.Tensor | None, lead: int) -> torch.Tensor | None:
    if buf is None:
        return None
    return buf.unsqueeze(0) if lead else buf


def structured_jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
) -> JacobianOperator | tuple[JacobianOperator, ...]:
    """The Jacobian of ``func`` as a lazy operator that keeps its Kronecker / diagonal structure.

    Same call as :func:`jacobian` (``func`` per sample, ``in_dims`` as in ``torch.func.vmap``).
    Plain torch code is traced and its Jacobian kept as the op rules' lettered terms
    (:class:`~jacbatch.structured.TermJacobian`): ``tanh(A @ W + B)`` w.r.t. ``W`` holds the
    ``(B, m, q)`` derivative of ``tanh`` and ``A``; :func:`jacbatch.affine` gives named
    Kronecker operators (``dZ/dW`` holds ``A`` only). Nothing of size ``out_numel · in_numel``
    is built; a graph that does not trace into rules is held densely (``DenseJacobian``).
    ``to_dense()`` gives ``jacobian(..., method="closed_form")``; ``jvp``, ``vjp``, ``T`` and
    ``@`` (the chain rule) work on the structure (see :mod:`jacbatch.structured`).

    Args:
        func: per-sample function of tensors, as for :func:`jacobian`.
        *args: its arguments, batched along ``in_dims`` as in :func:`jacobian`.
        argnums: the argument(s) to differentiate; a tuple returns a tuple of operators.
        in_dims: as in :func:`jacobian`; shared arguments give factors shared by the batch.

    Returns:
        A :class:`~jacbatch.structured.JacobianOperator` with ``shape`` ``(B, *out_shape,
        *in_shape)`` (no ``B`` without a batch), or a tuple of them for tuple ``argnums``. It
        references the arguments' data (no copy, no autograd graph).

    Example:
        >>> from jacbatch import affine
        >>> A = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
        >>> W, B = torch.zeros(3, 2), torch.zeros(2)
        >>> J = structured_jacobian(affine, A, W, B, argnums=1, in_dims=None)
        >>> J
        KroneckerJacobian(A: (2, 3) ⊗ I_2, dense (2, 2, 3, 2), 24 B vs 96 B)
        >>> J.vjp(torch.ones(2, 2))  # d sum(Z) / dW
        tensor([[5., 5.],
                [7., 7.],
                [9., 9.]])
    """
    from .structured.traced import structured_jacobian as build

    return build(func, args, argnums, in_dims)


def explain(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    randomness: str = "error",
) -> Plan:
    """Say which route :func:`jacobian` would run for this call, and why, without running it.

    Args:
        func, args, argnums, in_dims, method, randomness: as in :func:`jacobian` (a random
            ``func`` under ``randomness="error"`` raises as :func:`jacobian` would).

    Returns:
        A :class:`Plan`; ``str(plan)`` is a readable summary.

    Example:
        >>> A, W, B = torch.ones(2, 3), torch.ones(3, 2), torch.ones(2)
        >>> print(explain(jacbatch.affine, A, W, B, argnums=1, in_dims=None))
        jacobian plan (no batch, out (2, 2), in [(3, 2)]):
          argnums (1,): closed_form — registered closed-form rule, no autodiff

        Plain torch code is traced; the notes say which op rule each node matched:

        >>> print(explain(lambda x: torch.cumsum(x, 0).tanh(), torch.ones(4, 3)))
        jacobian plan (B=4, out (3,), in [(3,)]):
          argnums (0,): jacrev — no closed form (cumsum (aten.cumsum.default) has no rule); reverse mode: 3 output elements <= 3 input elements
          note: argnum 0: cumsum = aten.cumsum.default: no closed-form rule for this op
          note: argnum 0: tanh = aten.tanh.default -> rule elementwise_tanh
    """
    where = "explain"
    call = _normalize(where, func, args, argnums, in_dims, randomness)
    method = V.check_method(where, method)
    call, out_shape = _probed(call, False)
    return _plan(call, method, out_shape, call.probe)


def estimate_memory(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    randomness: str = "error",
) -> memory.MemoryEstimate:
    """Preflight: the result's bytes and the route's peak working bytes, from shapes alone.

    The route is run on ``meta`` tensors of the arguments' shapes under an allocation tracker
    (no data, no compute, no memory). Only a function that cannot run on meta tensors at all is
    evaluated once on the first sample, to learn its output shape.

    Args:
        func, args, argnums, in_dims, method, vec, chunk_size, randomness: as in
            :func:`jacobian`.

    Returns:
        A :class:`~jacbatch.memory.MemoryEstimate` (``output_bytes``, ``peak_bytes``,
        ``working_bytes``).

    Example:
        >>> A, W, B = torch.randn(8, 64, 64), torch.randn(64, 64), torch.randn(64)
        >>> est = estimate_memory(jacbatch.affine, A, W, B, argnums=1, in_dims=(0, None, None))
        >>> est.output_bytes // 2**20, est.working_bytes < est.output_bytes // 100
        (512, True)
    """
    where = "estimate_memory"
    call = _normalize(where, func, args, argnums, in_dims, randomness)
    method = V.check_method(where, method)
    layout = V.check_vec(where, vec)
    chunk_size = V.check_chunk_size(where, chunk_size)
    call, out_shape = _probed(call, False)
    return _estimate(
        call, _plan(call, method, out_shape, call.probe), out_shape, layout, chunk_size
    )


@dataclass(frozen=True)
class CheckReport:
    """Result of :func:`check`.

    Attributes:
        ok: whether every pair of routes agrees within the per-dtype tolerance (and every route
            agrees with the finite difference within its looser tolerance).
        routes: the routes that ran, ``"finite_difference"`` last when computed.
        max_diff: ``{(route_a, route_b): max |J_a - J_b|}`` over all argnums, for every pair.
        failures: the pairs that disagree.
        dtype: the dtype of the call.
        errors: ``{route: message}`` for routes that raised (they count as not agreeing).
        finite_difference_dtype: the dtype the finite difference ran in (``None``: none ran).
    """

    ok: bool
    routes: tuple[str, ...]
    max_diff: dict[tuple[str, str], float]
    failures: tuple[tuple[str, str], ...]
    dtype: torch.dtype
    errors: dict[str, str] = field(default_factory=dict)
    finite_difference_dtype: torch.dtype | None = None

    def __str__(self) -> str:
        names = self.routes
        width = max(12, *(len(n) for n in names)) + 2
        head = " " * width + "".join(f"{n:>{width}}" for n in names)
        fd = self.finite_difference_dtype
        where = "" if fd is None else f", finite difference in {fd}"
        lines = [
            f"jacbatch.check ({self.dtype}{where}): " + ("OK" if self.ok else "MISMATCH"),
            head,
        ]
        for a in names:
            cells = []
            for b in names:
                if a == b:
                    cells.append(f"{'-':>{width}}")
                else:
                    d = self.max_diff.get((a, b), self.max_diff.get((b, a), float("nan")))
                    mark = "*" if (a, b) in self.failures or (b, a) in self.failures else " "
                    cells.append(f"{d:>{width - 1}.2e}{mark}")
            lines.append(f"{a:<{width}}" + "".join(cells))
        if self.failures:
            lines.append("* outside tolerance")
        lines.extend(f"{r} failed: {msg}" for r, msg in self.errors.items())
        return "\n".join(lines)


def check(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    finite_difference: bool = True,
    randomness: str = "error",
) -> CheckReport:
    """Run every applicable route (and a central finite difference) and compare them pairwise.

    Works on every call :func:`jacobian` accepts: closures and modules whose weights are in a
    different dtype than a float64 difference would need, shared arguments, tuple argnums.
    Routes that do not apply are left out: the closed form without rules, and jacrev/jacfwd for
    a ``func`` that writes into tensors it closes over (torch.func refuses that).

    Args:
        func, args, argnums, in_dims, randomness: as in :func:`jacobian`. For a random ``func``
            every route (and the difference) starts from the same generator state, so they
            differentiate the same realization.
        finite_difference: also compare with a central finite difference (costs two batched
            forward passes per input element), in float64 when ``func`` runs in float64 on
            float64 arguments, else in the call's dtype (see NOTE [Finite differences in the
            call's dtype] in :mod:`jacbatch.testing`).

    Returns:
        A :class:`CheckReport`; ``report.ok`` says whether all routes agree, ``str(report)`` is a
        table of pairwise max absolute differences.

    Example:
        >>> A, W, B = torch.randn(4, 2, 3), torch.randn(3, 2), torch.randn(2)
        >>> check(jacbatch.affine, A, W, B, argnums=1, in_dims=(0, None, None)).ok
        True
    """
    from . import testing
    from .methods import batched_args

    where = "check"
    call = _normalize(where, func, args, argnums, in_dims, randomness)
    probe = probe_call(call)
    protection = _protection(call, probe)
    untraceable = _untraceable(probe)
    # Not applicable: a closed form without rules; torch.func for a state-writing func (it
    # refuses writes into captured tensors by design).
    routes = [r for r in ROUTES if not (probe.writes_state and r in ("jacrev", "jacfwd"))]
    routes = [
        r
        for r in routes
        if r != "closed_form"
        or closed_form.has_rules(call, call.argnums)
        or (
            untraceable is None
            and all(an.ok for an in _traced_analyses(call, call.argnums).values())
        )
    ]
    # Random functions: every route and the difference start from one generator state.
    rng = _state.rng_state(call.device) if probe.random else None
    jacs: dict[str, list[torch.Tensor]] = {}
    errors: dict[str, str] = {}
    for r in routes:
        if rng is not None:
            _state.set_rng_state(call.device, rng)
        try:
            res = jacobian(
                func,
                *args,
                argnums=call.argnums,
                in_dims=call.in_dims,
                method=r,
                vec="row",
                randomness=call.randomness,
            )
        except (RuntimeError, NotImplementedError) as err:  # e.g. no forward-mode formula
            errors[r] = f"{type(err).__name__}: {str(err).splitlines()[0]}"
            continue
        jacs[r] = [J.detach().to(torch.float64).reshape(-1, *J.shape[-2:]) for J in res]
    fd_dtype: torch.dtype | None = None
    if finite_difference:
        bargs, flags, B = batched_args(call)
        with _state.protect(call.func, protection, call.device) as f:
            fds, fd_dtype = [], call.dtype
            for a in call.argnums:
                xs = list(bargs)
                fl = list(flags)
                if not fl[a]:
                    xs[a], fl[a] = xs[a].unsqueeze(0).expand(B, *xs[a].shape), True
                J, fd_dtype = testing.finite_difference(
                    f, xs, fl, a, randomness=call.randomness, rng=rng
                )
                fds.append(J.detach().to(torch.float64))
        jacs["finite_difference"] = fds
    names = tuple(jacs)
    rtol, atol = testing.tolerance(call.dtype)
    frtol, fatol = testing.finite_difference_tolerance(fd_dtype or torch.float64)
    max_diff: dict[tuple[str, str], float] = {}
    failures = []
    for i, ra in enumerate(names):
        for rb in names[i + 1 :]:
            worst, bad = 0.0, False
            for Ja, Jb in zip(jacs[ra], jacs[rb], strict=True):
                if Ja.numel() == 0:
                    continue
                diff = (Ja - Jb).abs()
                worst = max(worst, float(diff.max()))
                if "finite_difference" in (ra, rb):
                    scale = max(1.0, float(Jb.abs().max()))
                    r_, t_ = max(rtol, frtol), max(atol, fatol * scale)
                else:
                    r_, t_ = rtol, atol
                bad |= bool((diff > t_ + r_ * Jb.abs()).any())
            max_diff[(ra, rb)] = worst
            if bad:
                failures.append((ra, rb))
    return CheckReport(
        not failures and not errors,
        names,
        max_diff,
        tuple(failures),
        call.dtype,
        errors,
        fd_dtype,
    )


__all__ = [
    "ROUTES",
    "CheckReport",
    "Plan",
    "Step",
    "check",
    "choose_autodiff",
    "estimate_memory",
    "explain",
    "jacobian",
    "plan_auto",
    "structured_jacobian",
]
