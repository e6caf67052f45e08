"""Tracing plain per-sample functions into aten graphs, matching their nodes to op rules.

NOTE [Why make_fx in fake mode]
    The traced route needs (1) a graph of a small, stable op set, (2) every node's per-sample
    shape, (3) a clean failure on data-dependent control flow, and (4) closures over tensors
    (weights captured by a lambda) to just work. ``torch.fx.symbolic_trace`` records Python-level
    calls (``operator.matmul``, ``Tensor.softmax``, ``x.T`` ...) with no shapes and cannot run code
    that reads ``x.shape``. ``torch.export`` needs a module, re-traces through Dynamo (slow for a
    call inside a loop) and specializes on many things we would have to undo.
    ``make_fx(tracing_mode="fake")`` runs the function once on fake tensors (no data, no compute)
    below autograd, so the graph holds aten ops with composite ops already decomposed
    (``matmul`` -> ``mm``/``bmm``/``view``, ``logdet`` -> ``_linalg_slogdet``), every node carries
    its shape in ``meta["val"]``, branching on a value (``if x.sum() > 0``) raises a
    data-dependent-guard error instead of silently specializing on one sample (what the "real"
    mode would do, giving wrong Jacobians for the rest of the batch). Dynamo (see
    :mod:`jacbatch.capture`) captures the function first, so closed-over tensors, globals and
    parameters arrive here as graph inputs whose current values every call passes in.

Tracing is per sample with the call's per-sample shapes, dtype and device; the graph is then
evaluated for the whole batch under ``torch.func.vmap`` (:meth:`TracedGraph.evaluate`).

Which graph a call uses, and when to re-trace, is decided by Dynamo's guards
(:mod:`jacbatch.capture`): :func:`to_aten` converts its captured graph, whose extra inputs are the
tensors the function reads besides its arguments (globals, closed-over tensors, parameters), so
their current values are used on every call. :func:`trace` traces a function directly, uncached.
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from . import accumulation
from .rules import ops as op_rules
from .rules.terms import Term, Unsupported


@dataclass(frozen=True)
class NodeNote:
    """How one graph node on the path from an argument to the output was handled.

    Attributes:
        node: the node's name in the traced graph (e.g. ``"mm"``).
        op: the op, e.g. ``"aten.mm.default"``.
        rule: the rule's name, or ``None`` when the node has no rule.
        detail: a short explanation.
    """

    node: str
    op: str
    rule: str | None
    detail: str

    def __str__(self) -> str:
        if self.rule is None:
            return f"{self.node} = {self.op}: {self.detail}"
        return f"{self.node} = {self.op} -> rule {self.rule}"


@dataclass(frozen=True)
class _Step:
    node: torch.fx.Node
    op: Any
    rule: op_rules.Rule
    src: torch.fx.Node  # the node holding the op's arguments (differs from node for getitem)
    operands: tuple[tuple[int, torch.fx.Node], ...]  # (argument position, operand on the path)
    listed: bool = False  # operand positions index the list in the first argument


@dataclass
class Analysis:
    """Whether the Jacobian w.r.t. one argument traces fully into rules, with node notes."""

    ok: bool
    reason: str
    notes: tuple[NodeNote, ...]
    steps: tuple[_Step, ...] = ()
    x: torch.fx.Node | None = None
    out: torch.fx.Node | None = None


def _is_differentiable_tensor(v: object) -> bool:
    """Floating-point or complex: values autograd differentiates through (integer and bool
    results, e.g. ``argmax`` or ``x.long()``, have no derivative there either)."""
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def _first_line(err: BaseException) -> str:
    name = type(err).__name__
    if "DataDependent" in name or "data-dependent" in str(err):
        return f"control flow or .item() on tensor values ({name})"
    msg = str(err).strip().splitlines()
    return f"{type(err).__name__}: {msg[0] if msg else ''}"[:200]


@dataclass
class TracedGraph:
    """A traced per-sample function, or why it could not be traced.

    Attributes:
        gm: the aten graph, or ``None``.
        error: why there is no graph.
        batched: per placeholder, whether its value carries the batch dimension.
        inputs: per placeholder, the index of its value in the list :meth:`evaluate` and
            :func:`jacobian_terms` receive: the call's arguments, then the values of the
            graph's lifted inputs (see :class:`jacbatch.capture.Captured`). ``None``: the
            placeholders are the arguments, in order. An argument the function does not read
            has no placeholder.
    """

    gm: torch.fx.GraphModule | None
    error: str | None
    batched: tuple[bool, ...]
    inputs: tuple[int, ...] | None = None
    _analyses: dict[int, Analysis] = field(default_factory=dict)
    _evaluators: dict[tuple[str, ...], Callable[..., Any]] = field(default_factory=dict)
    _batch_deps: set[torch.fx.Node] | None = None
    _orders: dict[tuple[tuple[int, ...], str], dict[int, accumulation.Choice]] = field(
        default_factory=dict
    )

    # -- analysis ------------------------------------------------------------------------------

    def analysis(self, argnum: int) -> Analysis:
        """The (cached) analysis of the path from ``args[argnum]`` to the output."""
        an = self._analyses.get(argnum)
        if an is None:
            an = self._analyze(argnum)
            self._analyses[argnum] = an
        return an

    def _analyze(self, argnum: int) -> Analysis:
        if self.gm is None:
            return Analysis(False, f"tracing failed ({self.error})", ())
        graph = self.gm.graph
        nodes = list(graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        where = list(range(len(placeholders))) if self.inputs is None else list(self.inputs)
        x = placeholders[where.index(argnum)] if argnum in where else None
        out_node = next(n for n in nodes if n.op == "output")
        result = out_node.args[0]
        if isinstance(result, (tuple, list)):
            if len(result) != 1:
                return Analysis(False, "the function returns several tensors", ())
            result = result[0]
        if not isinstance(result, torch.fx.Node):
            return Analysis(False, "the output is not a traced tensor", ())
        if x is None:  # the function never reads this argument
            return Analysis(
                True, "the output does not depend on the argument", (), (), None, result
            )
        # nodes reachable from x through floating-point values (multi-output ops pass through)
        fwd = {x}
        for n in nodes:
            if n in fwd or n.op != "call_function":
                continue
            val = n.meta.get("val")
            if not (_is_differentiable_tensor(val) or isinstance(val, (tuple, list))):
                continue
            if any(a in fwd for a in n.all_input_nodes):
                fwd.add(n)
        # nodes that reach the output
        bwd = {result}
        for n in reversed(nodes):
            if n in bwd:
                bwd.update(n.all_input_nodes)
        path = [n for n in nodes if n in fwd and n in bwd and n is not x]
        notes: list[NodeNote] = []
        steps: list[_Step] = []
        failure = None
        for n in path:
            val = n.meta.get("val")
            if isinstance(val, (tuple, list)):
                continue  # handled at its getitem users
            if n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
                src, k = n.args[0], n.args[1]
                op, idx = src.target, k
            else:
                src, op, idx = n, n.target, None
            name = op_rules.op_name(op) + ("" if idx is None else f"[{idx}]")
            if src.op != "call_function":
                notes.append(NodeNote(n.name, name, None, f"a {src.op} node has no rule"))
                failure = failure or f"{n.name} ({name}) is not an op call"
                continue
            rule = op_rules.lookup_op(op, idx)
            on_path = set(path) | {x}
            scalars = [
                a.name
                for a in _nested_nodes((src.args, src.kwargs))
                if not isinstance(a.meta.get("val"), torch.Tensor)
            ]
            if scalars:
                notes.append(
                    NodeNote(
                        n.name, name, None, f"reads a Python scalar from a tensor ({scalars[0]})"
                    )
                )
                failure = failure or f"{n.name} ({name}) uses a value read with .item()"
                continue
            if isinstance(val, torch.Tensor) and not all(isinstance(d, int) for d in val.shape):
                # e.g. x[mask]: a shape that depends on the values, not one per batch
                notes.append(NodeNote(n.name, name, None, "its shape depends on the values"))
                failure = failure or f"{n.name} ({name}) has a data-dependent shape"
                continue
            if isinstance(val, torch.Tensor) and val.dtype != x.meta["val"].dtype:
                # e.g. a complex intermediate (fft, .to(complex)): no rule follows it
                notes.append(NodeNote(n.name, name, None, f"changes the dtype to {val.dtype}"))
                failure = failure or f"{n.name} ({name}) changes the dtype to {val.dtype}"
                continue
            nested = [
                a
                for a in _nested_nodes(list(src.args[0:]) + list(src.kwargs.values()))
                if a in on_path
            ]
            operands = tuple(
                (i, a)
                for i, a in enumerate(src.args)
                if isinstance(a, torch.fx.Node) and a in on_path
            )
            listed = False
            if src.args and isinstance(src.args[0], (list, tuple)) and not operands:
                # ops on a list of tensors (cat, stack): operand i is element i of the list
                operands = tuple(
                    (i, a)
                    for i, a in enumerate(src.args[0])
                    if isinstance(a, torch.fx.Node) and a in on_path
                )
                listed = True
            if len(nested) != len(operands):
                notes.append(NodeNote(n.name, name, None, "differentiated input inside a list"))
                failure = failure or f"{n.name} ({name}) takes the argument inside a list"
                continue
            if rule is None:
                notes.append(NodeNote(n.name, name, None, "no closed-form rule for this op"))
                failure = failure or f"{n.name} ({name}) has no rule"
                continue
            notes.append(NodeNote(n.name, name, rule.__name__, "matched"))
            steps.append(_Step(n, op, rule, src, operands, listed))
        if failure is not None:
            return Analysis(False, failure, tuple(notes))
        reason = (
            f"traced {len(steps)} node(s) into closed-form rules"
            if steps
            else "the output does not depend on the argument through any op"
        )
        return Analysis(True, reason, tuple(notes), tuple(steps), x, result)

    # -- evaluation ----------------------------------------------------------------------------

    def _depends_on_batch(self) -> set[torch.fx.Node]:
        assert self.gm is not None
        if self._batch_deps is not None:
            return self._batch_deps
        nodes = list(self.gm.graph.nodes)
        ph = [n for n in nodes if n.op == "placeholder"]
        dep = {p for p, b in zip(ph, self.batched, strict=True) if b}
        for n in nodes:
            if n.op == "call_function" and any(a in dep for a in n.all_input_nodes):
                dep.add(n)
        self._batch_deps = dep
        return dep

    def evaluate(
        self, needed: Sequence[torch.fx.Node], args: Sequence[torch.Tensor], B: int
    ) -> dict[torch.fx.Node, torch.Tensor]:
        """Values of ``needed`` nodes for the whole batch: ``(B, *shape)`` or shared ``(1, *shape)``.

        ``args`` have their batch dimension first where batched (shared ones as they are): the
        call's arguments, then the lifted inputs' values (see ``inputs``).
        """
        assert self.gm is not None
        if self.inputs is not None:
            args = [args[i] for i in self.inputs]
        key = tuple(n.name for n in needed)
        fn = self._evaluators.get(key)
        if fn is None:
            fn = self._evaluator(needed)
            self._evaluators[key] = fn
        if not any(self.batched):
            vals = fn(*args)
            return {n: v.unsqueeze(0) for n, v in zip(needed, vals, strict=True)}
        dims = tuple(0 if b else None for b in self.batched)
        vals = torch.func.vmap(fn, in_dims=dims)(*args)
        dep = self._depends_on_batch()
        return {
            n: (v if n in dep else v[:1]) for n, v in zip(needed, vals, strict=True)
        }  # v[:1] of vmap's expanded shared value is the shared value itself

    def _evaluator(self, needed: Sequence[torch.fx.Node]) -> Callable[..., Any]:
        assert self.gm is not None
        g = torch.fx.Graph()
        env: dict[torch.fx.Node, torch.fx.Node] = {}
        for n in self.gm.graph.nodes:
            if n.op == "output":
                continue
            env[n] = g.node_copy(n, lambda a: env[a])
        g.output(tuple(env[n] for n in needed))
        return torch.fx.GraphModule(self.gm, g)


def _nested_nodes(xs: Any) -> list[torch.fx.Node]:
    found: list[torch.fx.Node] = []

    def visit(a: torch.fx.Node) -> torch.fx.Node:
        found.append(a)
        return a

    torch.fx.node.map_arg(xs, visit)
    return found


# ---------------------------------------------------------------------------------------------
# Accumulation of lettered terms (the chain rule over the graph, jacbatch.accumulation)
# ---------------------------------------------------------------------------------------------


def _shape(n: torch.fx.Node) -> tuple[int, ...]:
    return tuple(int(d) for d in n.meta["val"].shape)


def needed_nodes(an: Analysis) -> list[torch.fx.Node]:
    """Nodes whose values the rules of ``an`` read: every tensor operand and every output."""
    seen: dict[torch.fx.Node, None] = {}
    for s in an.steps:
        for a in _nested_nodes((s.src.args, s.src.kwargs)):
            if isinstance(a.meta.get("val"), torch.Tensor):
                seen[a] = None
        seen[s.node] = None
    return list(seen)


def accumulate(
    an: Analysis,
    values: dict[torch.fx.Node, torch.Tensor],
    like: torch.Tensor,
    order: str = "forward",
) -> list[Term]:
    """The Jacobian of the output w.r.t. the analysed argument, as lettered terms.

    ``order``: ``"forward"`` (from the identity on the argument, each node's Jacobian is
    ``Σ_i L_i ∘ J_(operand i)``), ``"reverse"``, ``"cut"`` or ``"auto"`` (chosen from the
    shapes): NOTE [Choosing the elimination order] in :mod:`jacbatch.accumulation`. Factors
    stay separate and deltas are never expanded (NOTE [Lettered Jacobian terms]).
    """
    assert an.ok and an.out is not None
    choices = accumulation.choose({0: an}, order)
    return accumulation.compose({0: an}, choices, values, {0: like})[0]


def orders(tg: TracedGraph, argnums: Sequence[int]) -> dict[int, accumulation.Choice]:
    """The elimination order per argnum (cached with the graph unless one is forced).

    Raises Unsupported where an argnum's path has no closed form.
    """
    forced = accumulation.current_order()
    key = (tuple(argnums), forced)
    got = tg._orders.get(key)
    if got is None:
        analyses = {}
        for a in argnums:
            an = tg.analysis(a)
            if not an.ok:
                raise Unsupported(an.reason)
            analyses[a] = an
        got = accumulation.choose(analyses, forced)
        tg._orders[key] = got
    return got


def estimated_cost(tg: TracedGraph, argnums: Sequence[int], B: int) -> float:
    """Estimated FLOPs of the traced closed form for a call: composing the Jacobians w.r.t.
    ``argnums`` in their chosen orders and writing them, for ``B`` samples (``B = 0`` or no
    batch counts as one sample).

    A dense estimate from the per-sample shapes (NOTE [Choosing the elimination order] in
    :mod:`jacbatch.accumulation`), one FLOP per multiply-add, the write of the
    ``(B, *out_shape, *in_shape)`` result counted as one per entry: an upper bound that
    lettered terms usually beat, meant for comparing orders and routes. ``inf`` where some
    argnum's path has no closed form. Cheap after the first call for a graph (cached).

    Example (``tg`` from :func:`jacbatch.methods.traced.traced_graph`)::

        flops = estimated_cost(tg, (1, 3), B=256)
    """
    try:
        choices = orders(tg, argnums)
    except Unsupported:
        return math.inf
    return accumulation.total_cost(choices) * max(1, B)


# ---------------------------------------------------------------------------------------------
# Tracing into aten
# ---------------------------------------------------------------------------------------------


def trace(
    func: Callable[..., Any],
    shapes: Sequence[tuple[int, ...]],
    dtype: torch.dtype,
    device: torch.device,
    batched: Sequence[bool],
) -> TracedGraph:
    """The graph of ``func`` traced now for per-sample ``shapes`` (not cached: what ``func``
    closes over is read as it is at this moment; :mod:`jacbatch.capture` decides reuse)."""
    examples = [torch.empty(s, dtype=dtype, device=device) for s in shapes]
    n = len(examples)

    def flat(*xs: torch.Tensor) -> Any:  # fixed arity: make_fx names one placeholder per arg
        return func(*xs)

    gm, error = to_aten(flat, examples)
    if gm is not None and sum(nd.op == "placeholder" for nd in gm.graph.nodes) != n:
        gm, error = None, "the traced graph's arguments do not match"
    return TracedGraph(gm, error, tuple(batched))


def to_aten(
    fn: Callable[..., Any], examples: Sequence[torch.Tensor]
) -> tuple[torch.fx.GraphModule | None, str | None]:
    """``make_fx(functionalize(fn), tracing_mode="fake")`` on ``examples``: the aten graph with
    functional views and no in-place op, or ``None`` and why not."""
    from torch.fx.experimental.proxy_tensor import make_fx

    # A failing trace is an expected answer ("no closed form"): keep torch's fake-tensor logger
    # from printing the failure as an error while we probe.
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with torch.no_grad():
            gm = make_fx(
                torch.func.functionalize(fn, remove="mutations"),
                tracing_mode="fake",
                _allow_non_fake_inputs=True,
            )(*examples)
    except Exception as err:  # any failure means "no traced closed form", never an error
        return None, _first_line(err)
    finally:
        fake_log.setLevel(level)
    # Decompositions leave in-place view ops on fresh temporaries (e.g. matmul's squeeze_);
    # their out-of-place forms keep every captured intermediate value intact.
    for nd in gm.graph.nodes:
        if nd.op == "call_function" and nd.target in _FUNCTIONAL_VIEW:
            nd.target = _FUNCTIONAL_VIEW[nd.target]
        elif nd.op == "call_function" and getattr(
            getattr(nd.target, "_schema", None), "is_mutable", False
        ):
            return None, f"in-place op {op_rules.op_name(nd.target)} in the graph"
    gm.recompile()
    return gm, None


_aten = torch.ops.aten
_FUNCTIONAL_VIEW = {
    _aten.squeeze_.dim: _aten.squeeze.dim,
    _aten.squeeze_.default: _aten.squeeze.default,
    _aten.squeeze_.dims: _aten.squeeze.dims,
    _aten.unsqueeze_.default: _aten.unsqueeze.default,
    _aten.t_.default: _aten.t.default,
    _aten.transpose_.default: _aten.transpose.int,
}


def jacobian_terms(
    tg: TracedGraph,
    argnums: Sequence[int],
    args: Sequence[torch.Tensor],
    B: int,
    check: Callable[[torch.Tensor], None] | None = None,
) -> list[list[Term]]:
    """Lettered terms of the Jacobian w.r.t. each ``args[a]`` for the batch (raises Unsupported).

    ``check`` is called with the graph's output value ``(B or 1, *out_shape)`` when the graph
    evaluates it (see NOTE [The value check] in :mod:`jacbatch.methods.traced`); its
    exceptions propagate.

    ``args``: the call's arguments (batch dimension first where batched), followed by the values
    of the graph's lifted inputs (:attr:`jacbatch.capture.Captured.lifted`). The graph is
    evaluated once for every argnum together.
    """
    choices = orders(tg, argnums)
    analyses = {a: tg.analysis(a) for a in argnums}
    needed = list(dict.fromkeys(n for an in analyses.values() for n in needed_nodes(an)))
    try:
        values = tg.evaluate(needed, args, B) if needed else {}
    except Exception as err:  # e.g. random ops under vmap: autodiff decides what to do
        raise Unsupported(f"evaluating the traced graph failed ({_first_line(err)})") from err
    out = analyses[argnums[0]].out if argnums else None
    if check is not None and out is not None and out in values:
        check(values[out])
    try:
        got = accumulation.compose(analyses, choices, values, {a: args[a] for a in argnums})
    except Unsupported:
        raise
    except Exception as err:  # e.g. random ops under vmap: autodiff decides what to do
        raise Unsupported(f"evaluating the traced graph failed ({_first_line(err)})") from err
    return [got[a] for a in argnums]


__all__ = [
    "NodeNote",
    "TracedGraph",
    "accumulate",
    "estimated_cost",
    "jacobian_terms",
    "orders",
    "to_aten",
    "trace",
]
