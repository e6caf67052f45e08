"""Planning a call: which route runs for which argnums, and why (:class:`Plan`, :func:`make_plan`).

The planner reads the probe of ``func`` (:mod:`jacbatch._probe`), the traced graph's analysis
(:mod:`jacbatch.methods.traced`) and the known torch bugs (:mod:`jacbatch._torch_bugs`); the
routes it names are those of the registry (:mod:`jacbatch.methods`).
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _probe, _state, _torch_bugs, rules
from . import _validation as V
from .call import Call
from .methods import batched as batched_routes
from .methods import by_method, has_tangents, in_transform, needs_graph, traced

# Functions whose forward vmap rejected once: "auto" goes straight to the vjp route for them.
VMAP_REJECTED: weakref.WeakSet[Any] = weakref.WeakSet()


@dataclass(frozen=True)
class Step:
    """One route applied to some of the argnums.

    Attributes:
        route: the registered route's name (:func:`jacbatch.methods.route`), e.g. ``"traced"``.
        argnums: the differentiated arguments it computes.
        reason: why the planner chose it.
    """

    route: str
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

    @property
    def routes(self) -> str:
        """The routes of the steps, as reports name the plan: ``"traced+vjp"``."""
        return "+".join(s.route for s in self.steps)

    def __str__(self) -> str:
        batch = "no batch" if self.batch_size is None else f"B={self.batch_size}"
        lines = [f"jacobian plan ({batch}, out {self.out_shape}, in {list(self.in_shapes)}):"]
        for s in self.steps:
            lines.append(f"  argnums {s.argnums}: {s.route} — {s.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


#: Per-sample Jacobians with at least this many entries go to the vjp route rather than jacrev.
LARGE_JACOBIAN = 2**20


# NOTE [What method="closed_form" asks for]
#     A closed form is the traced route (:mod:`jacbatch.methods.traced`): the function is traced
#     into aten ops and every op on each differentiated argument's path must have a rule.
#     Argnums with a per-function registered rule (today only ``jacbatch.affine``'s: NOTE [Why
#     affine keeps a registered rule] in :mod:`jacbatch.rules.affine`) take that rule first,
#     :mod:`jacbatch.methods.closed_form`. So
#     ``method="closed_form"`` plans a ``traced`` step for the other argnums or refuses before any
#     work (a node without a rule, a function that draws random numbers or writes state, a call
#     inside a torch.func transform, where tracing would see the transform's wrapped values);
#     ``method="auto"`` takes the traced step where it applies and the fastest autodiff route
#     for the other argnums. The route names a caller may use come from the registry
#     (:func:`jacbatch.methods.names`); a plan names the route that runs (``Step.route``).


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
    with_rule = tuple(a for a in argnums if registered(func, a))
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
        if func in VMAP_REJECTED:
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


def probe_call(call: Call) -> _probe.ProbeResult:
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


def normalize(
    where: str,
    func: object,
    args: tuple[object, ...],
    argnums: object,
    in_dims: object,
    randomness: object = "error",
    batched: object = False,
) -> Call:
    """:func:`~jacbatch._validation.normalize_call` plus the ``randomness`` and ``batched``
    options (``batched=True``: ``func`` becomes its per-sample view and ``batched_func`` the
    caller's function, NOTE [Batched functions: one call, two views] in
    :mod:`jacbatch.methods.batched`)."""
    call = V.normalize_call(where, func, args, argnums, in_dims)
    randomness = V.check_randomness(where, randomness)
    if V.check_bool(where, "batched", batched):
        if call.batch_size is None:
            raise ValueError(
                f"{where}: expected at least one batched argument with batched=True (func maps "
                f"a batch to a batch), got in_dims={in_dims!r} with no batched argument. Give "
                f"in_dims the batch dimension of the batched arguments, or pass batched=False."
            )
        return dataclasses.replace(
            call,
            func=batched_routes.per_sample(call.func, call.in_dims),
            batched_func=call.func,
            randomness=randomness,
        )
    return (
        call if randomness == call.randomness else dataclasses.replace(call, randomness=randomness)
    )


def probe_output(call: Call) -> tuple[int, ...]:
    """Per-sample output shape, found without heavy work (see :func:`probe_call`)."""
    return tuple(probe_call(call).out.shape)


def probed(call: Call, create_graph: bool) -> tuple[Call, tuple[int, ...]]:
    """Probe ``func`` once: the call with its probe and whether the result keeps a graph (NOTE
    [Differentiable results: when a Jacobian keeps its graph] in :mod:`jacbatch.methods`), and
    the per-sample output shape."""
    probe = probe_call(call)
    graph = needs_graph(call.args, create_graph, probe.reads_grad)
    return dataclasses.replace(call, create_graph=graph, probe=probe), tuple(probe.out.shape)


def forward_ok(call: Call) -> bool:
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


def traced_analyses(call: Call, argnums: Sequence[int], retry: bool = False) -> dict[int, Any]:
    """Per argnum without a registered rule, the traced analysis (cached with the trace).

    Inside a torch.func transform nothing is traced: tracing would see the transform's wrapped
    values, not the function (and cache that graph for later calls).
    """
    todo = [a for a in argnums if not registered(call.func, a)]
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


def registered(func: Callable[..., Any], argnum: int) -> bool:
    """Whether a closed-form rule is registered for ``func`` w.r.t. ``argnum``
    (:mod:`jacbatch.methods.closed_form`)."""
    return rules.lookup(func, argnum) is not None


def untraceable(probe: _probe.ProbeResult | None) -> str | None:
    """Why the traced closed form must not be used for this function (None: it may)."""
    if probe is None:
        return None
    if probe.random:
        return "draws random numbers (a closed form cannot reproduce the draw)"
    if probe.writes_state:
        return "writes into tensors that exist before the call (state)"
    if probe.mutated:
        return f"writes into its arguments {list(probe.mutated)}"
    if probe.custom_function:  # NOTE [Custom autograd.Functions] in jacbatch._probe
        return "calls a custom torch.autograd.Function (its backward defines the derivative)"
    return None


def protection_of(call: Call, probe: _probe.ProbeResult | None) -> _state.Protection:
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


def make_plan(
    call: Call,
    method: str,
    out_shape: tuple[int, ...],
    probe: _probe.ProbeResult | None = None,
) -> Plan:
    """The plan of a probed call for ``method`` (see NOTE [What method="closed_form" asks for]).

    Raises before any work where the request cannot be met: ``method="closed_form"`` for a
    function with no traced closed form, a random ``func`` under ``randomness="error"``.
    """
    in_shapes = tuple(call.sample_shape(a) for a in call.argnums)
    probe = probe if probe is not None else (call.probe or probe_call(call))
    if method == "closed_form" and _probe.probing():
        # A nested call run by an enclosing call's probe (shapes only, under a dispatch mode
        # where nothing is captured): any route gives the same shapes.
        method = "auto"
    notes: tuple[str, ...] = ()
    protection = protection_of(call, probe)
    if call.batched_func is not None:
        steps, notes = _batched_steps(call, method, out_shape, in_shapes, probe)
        return _finish_plan(steps, call, out_shape, in_shapes, notes, protection, probe)
    why = untraceable(probe)
    if why is not None and method in ("auto", "closed_form"):
        todo = [a for a in call.argnums if not registered(call.func, a)]
        if method == "closed_form" and todo:
            V.no_closed_form_for("jacobian", why)
        # Registered rules never run func; nothing is traced.
        steps = plan_auto(
            call.func,
            call.argnums,
            [math.prod(s) for s in in_shapes],
            math.prod(out_shape),
            traced={a: f"func {why}" for a in todo},
        )
        if protection.writes_state:  # torch.func refuses writes into captured tensors
            steps = tuple(
                Step("vjp", s.argnums, f"{s.reason.split(';')[0]}; explicit VJP loop")
                if s.route in ("jacrev", "jacfwd")
                else s
                for s in steps
            )
        return _finish_plan(
            steps, call, out_shape, in_shapes, _protection_notes(protection), protection, probe
        )
    if method == "auto":
        analyses = traced_analyses(call, call.argnums)
        steps = plan_auto(
            call.func,
            call.argnums,
            [math.prod(s) for s in in_shapes],
            math.prod(out_shape),
            traced={a: None if an.ok else an.reason for a, an in analyses.items()},
            forward_ok=forward_ok(call),
        )
        notes = _node_notes(analyses)
        notes += traced.order_notes(
            call, [a for s in steps if s.route == "traced" for a in s.argnums]
        )
    elif method == "closed_form":
        analyses = traced_analyses(call, call.argnums, retry=True)
        for a, an in analyses.items():
            if not an.ok:
                V.no_rule_error(
                    "jacobian", call.func, a, rules.available(), f"Tracing it: {an.reason}."
                )
        with_rule = tuple(a for a in call.argnums if a not in analyses)
        steps = tuple(
            st
            for st in (
                Step("closed_form", with_rule, "requested") if with_rule else None,
                Step("traced", tuple(analyses), "requested (closed form from the traced graph)")
                if analyses
                else None,
            )
            if st is not None
        )
        notes = _node_notes(analyses) + traced.order_notes(call, tuple(analyses))
    else:
        steps = (Step(by_method(method).name, call.argnums, "requested"),)
    notes += _protection_notes(protection)
    return _finish_plan(steps, call, out_shape, in_shapes, notes, protection, probe)


def _batched_steps(
    call: Call,
    method: str,
    out_shape: tuple[int, ...],
    in_shapes: tuple[tuple[int, ...], ...],
    probe: _probe.ProbeResult,
) -> tuple[tuple[Step, ...], tuple[str, ...]]:
    """The steps for a batched ``func`` (``batched=True``; :mod:`jacbatch.methods.batched`).

    ``closed_form``: the traced route on the per-sample view; ``auto``: that where it traces,
    else the sum trick (reverse) when ``out_numel <= in_numel``, else batched tangents
    (forward), and forward mode for a shared argument where forward mode is right;
    ``jacrev``/``jacfwd``/``vjp``: the batched reverse, forward and row-by-row routes.
    """
    if probe.random:
        raise ValueError(
            "jacobian: expected a func that draws no random numbers with batched=True, got one "
            "that does. Its Jacobian is that of one realization only when every row sees the "
            "same draw; write func for one sample (batched=False) and pass randomness=."
        )
    if probe.writes_state:
        raise ValueError(
            "jacobian: expected a func that writes into no tensor it closes over with "
            "batched=True, got one that does (e.g. a train-mode BatchNorm's running "
            "statistics, which also mixes the samples of a batch). Put the module in eval mode, "
            "or write func for one sample (batched=False)."
        )
    note = "func maps a batch to a batch (batched=True): samples are taken to be independent"
    if method in batched_routes.BY_METHOD:
        name = batched_routes.BY_METHOD[method]
        return (Step(name, call.argnums, "requested (batched function)"),), (note,)
    if method == "closed_form":
        analyses = traced_analyses(call, call.argnums, retry=True)
        for a, an in analyses.items():
            if not an.ok:
                V.no_rule_error(
                    "jacobian", call.func, a, rules.available(), f"Tracing it: {an.reason}."
                )
        return (Step("traced", call.argnums, "requested (closed form from the traced graph)"),), (
            *_node_notes(analyses),
            note,
        )
    why = untraceable(probe)
    found: dict[int, Any] = (
        {a: _Untraced(f"func {why}") for a in call.argnums}
        if why is not None
        else traced_analyses(call, call.argnums)
    )
    analyses = found
    with_trace = tuple(a for a in call.argnums if analyses[a].ok)
    without = [a for a in call.argnums if a not in with_trace]
    steps = []
    if with_trace:
        steps.append(
            Step("traced", with_trace, "every traced op has a closed-form rule, no autodiff")
        )
    fwd_ok = forward_ok(call)
    shared = tuple(a for a in without if call.in_dims[a] is None and fwd_ok)
    rest = tuple(a for a in without if a not in shared)
    why_not = "; ".join(dict.fromkeys(str(analyses[a].reason) for a in without))
    prefix = f"no closed form ({why_not})" if why_not else "no closed form"
    if rest:
        n_in = sum(math.prod(call.sample_shape(a)) for a in rest)
        o = math.prod(out_shape)
        if o <= n_in or not fwd_ok:
            reason = f"reverse mode (sum trick): {o} output elements <= {n_in} input elements"
            if o > n_in:
                reason = "reverse mode (sum trick): func switches grad mode off inside"
            steps.append(Step("batched_rev", rest, f"{prefix}; {reason}"))
        else:
            steps.append(
                Step(
                    "batched_fwd",
                    rest,
                    f"{prefix}; forward mode: {n_in} input elements < {o} output elements",
                )
            )
    if shared:
        steps.append(
            Step(
                "batched_fwd",
                shared,
                f"{prefix}; forward mode: a shared argument's per-sample columns in one jvp each",
            )
        )
    return tuple(steps), (*_node_notes(analyses), note)


def _finish_plan(
    steps: tuple[Step, ...],
    call: Call,
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
        route, bugs = _torch_bugs.replacement(ops, st.route)
        if bugs:
            note = _torch_bugs.note(bugs, st.route, route)
            notes.append(note)
            st = Step(route, st.argnums, f"{st.reason}; {note}")
        out.append(st)
    return tuple(out), tuple(notes)
