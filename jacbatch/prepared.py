"""Prepared Jacobians: validation, tracing, planning and chunking done once, then a program run
per call (:func:`prepare`).

NOTE [Prepared Jacobians: one aten program per signature]
    A call of :func:`jacbatch.jacobian` validates its arguments, probes ``func``, plans, fits
    the budget and asks Dynamo whether its capture still holds, before any Jacobian kernel
    runs: about 0.5-1 ms, more than the kernels themselves for small problems. A training
    loop, an optimizer or a sampler calls the same Jacobian thousands of times with the same
    shapes; :func:`prepare` does that work once per signature (the arguments' shapes, dtypes
    and devices) and then runs the plan as ONE aten program:

    1. the request is built as :func:`jacbatch.jacobian` would build it (same validation,
       probe, plan, budget);
    2. the plan's steps are traced by ``make_fx`` in fake mode into an aten graph: the traced
       closed form (graph evaluation, composition of the rules' terms, the write), the
       torch.func transforms (``vmap(jacrev)``: their backward ops become plain aten ops), the
       registered closed forms, and an ``isfinite`` flag over the arguments and the result.
       Fake tensors carry no values, so anything that depends on a value (a rule that checks
       for a singular matrix, ``.item()``, control flow on data) makes the trace fail: such a
       plan is run interpreted, never specialized on the example's values;
    3. the program is run once on the example arguments and compared with the interpreted
       plan; any difference (beyond float rounding) discards it;
    4. with ``compile=True`` the program is handed to ``torch.compile`` (Inductor), so that
       elementwise factors fuse with the write; the compile time is reported.

    A call then checks the signature (a dictionary lookup), that nothing asks for a
    differentiable result (see below), runs the program, and reads its one ``isfinite`` flag.

    What a prepared Jacobian holds: the tensors ``func`` read when it was prepared (closed-over
    tensors, globals, a module's parameters), by reference, so in-place updates (an optimizer
    step, ``load_state_dict``) are seen, but rebinding them (``model.fc = nn.Linear(...)``,
    ``W = W * 2`` on a global), editing ``func``'s code or switching a module between train
    and eval mode is not: prepare again after such changes. Plain :func:`jacbatch.jacobian`
    re-checks all of that on every call (Dynamo's guards, the probe, the value check).

    Calls that fall back to the interpreted path, which is :func:`jacbatch.jacobian` itself
    (same result, its full overhead): a result that must stay differentiable (grad mode on
    and an argument or a read tensor requires grad, a torch.func transform or forward-mode AD
    level active, ``torch.compile`` tracing the call); a sample whose argument or Jacobian is
    not finite (the NaN policy recomputes it, NOTE [Non-finite values: one policy]); a plan
    that protects state or replays randomness; a plan chunked over the batch to stay within
    the memory budget; and a plan that does not trace (above). ``prepared.program`` says
    which path a signature takes and why.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.autograd import forward_ad
from torch.fx.experimental.proxy_tensor import make_fx

from . import _validation as V
from . import capture, executor, tracing
from .methods import traced
from .plan import Plan
from .request import Request, build_request

#: Signatures (shapes, dtypes, devices) one prepared Jacobian keeps programs for; the oldest
#: is dropped past this (a data loader's last, smaller batch is the usual second one).
MAX_SIGNATURES = 8

#: A program and the interpreted plan must agree to this many ulps of the result's scale.
_AGREE_ULPS = 64


@dataclasses.dataclass
class _Entry:
    """What one signature runs: its request, and its program or why it has none."""

    request: Request
    program: Callable[..., Any] | None
    why: str
    lifted: tuple[torch.Tensor, ...] = ()
    watched: tuple[torch.Tensor, ...] = ()
    forward: bool = False  # the plan runs forward mode: the NaN policy needs one more pass
    compile_seconds: float = 0.0
    ops: int = 0
    timings: dict[str, float] = dataclasses.field(default_factory=dict)


class PreparedJacobian:
    """A Jacobian of ``func`` prepared by :func:`prepare`; call it like the function itself.

    ``J(*args)`` returns what ``jacbatch.jacobian(func, *args, **options)`` returns, for
    arguments of the prepared shapes (other shapes are prepared on first use, up to
    :data:`MAX_SIGNATURES`). See NOTE [Prepared Jacobians: one aten program per signature].

    Attributes:
        func: the function.
        options: the :func:`jacbatch.jacobian` options it was prepared with.
        compile: whether programs are compiled with ``torch.compile``.
    """

    def __init__(
        self,
        func: Callable[..., Any],
        options: dict[str, Any],
        compile: bool,
        autotune: bool = False,
    ) -> None:
        self.func = func
        self.options = options
        self.compile = compile
        self.autotune = autotune
        self._entries: dict[Any, _Entry] = {}
        self._first: _Entry | None = None

    # -- inspection ---------------------------------------------------------------------------

    @property
    def plan(self) -> Plan:
        """The plan of the first prepared signature (as :func:`jacbatch.explain` prints it)."""
        return self._entry0().request.plan

    @property
    def program(self) -> str:
        """How the first prepared signature runs: ``"aten program (N ops)"``, ``"compiled
        program (N ops)"``, or ``"interpreted: <why>"``."""
        return self._entry0().why

    @property
    def timings(self) -> dict[str, float]:
        """With ``autotune``: seconds per call of each candidate ``method`` on the first
        signature's example (the fastest one runs); empty otherwise."""
        return dict(self._entry0().timings)

    @property
    def compile_seconds(self) -> float:
        """Seconds spent in ``torch.compile`` for the first signature (0 without ``compile``)."""
        return self._entry0().compile_seconds

    def _entry0(self) -> _Entry:
        assert self._first is not None
        return self._first

    def __repr__(self) -> str:
        name = getattr(self.func, "__qualname__", type(self.func).__name__)
        return f"PreparedJacobian({name}, {len(self._entries)} signature(s), {self.program})"

    # -- calling ------------------------------------------------------------------------------

    def __call__(
        self, *args: torch.Tensor, out: torch.Tensor | tuple[torch.Tensor, ...] | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The Jacobian(s) of ``func`` at ``args``: shapes as :func:`jacbatch.jacobian`'s.

        Args:
            *args: the arguments, batched along the prepared ``in_dims``.
            out: as in :func:`jacbatch.jacobian` (filled with ``copy_``).
        """
        try:
            key = tuple([(a.shape, a.dtype, a.device) for a in args])
        except AttributeError:  # not tensors: jacobian() words the error
            return self._interpreted(args, out)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._prepare(args, key)
        if not _plain(args, entry.watched):
            return self._interpreted(args, out)
        if entry.program is None:
            return self._planned(entry, args, out)
        res = entry.program(*args, *entry.lifted)
        if not bool(res[-1]):  # a non-finite value: the NaN policy recomputes those samples
            return self._planned(entry, args, out)
        jacs = list(res[:-1])
        if entry.forward:
            call = dataclasses.replace(entry.request.call, args=tuple(args))
            _enforce_forward(call, entry.request, jacs)
        if out is not None:
            outs = out if isinstance(out, tuple) else (out,)
            for o, J in zip(outs, jacs, strict=False):
                o.copy_(J)
            return out
        return tuple(jacs) if entry.request.call.tuple_argnums else jacs[0]

    def _planned(
        self,
        entry: _Entry,
        args: Sequence[torch.Tensor],
        out: torch.Tensor | tuple[torch.Tensor, ...] | None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """The signature's plan run by the executor on ``args``: chunks, protections and the
        NaN policy as :func:`jacbatch.jacobian` runs them, without validating, probing and
        planning again."""
        req = entry.request
        call = dataclasses.replace(req.call, args=tuple(args))
        got = executor.execute(dataclasses.replace(req, call=call, bufs=(None,) * len(req.bufs)))
        if out is None:
            return got
        outs = out if isinstance(out, tuple) else (out,)
        for o, J in zip(outs, got if isinstance(got, tuple) else (got,), strict=True):
            o.copy_(J)
        return out

    def _interpreted(
        self,
        args: Sequence[Any],
        out: torch.Tensor | tuple[torch.Tensor, ...] | None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        from .api import jacobian

        return jacobian(self.func, *args, out=out, **self.options)

    # -- preparing ----------------------------------------------------------------------------

    def _prepare(self, args: Sequence[torch.Tensor], key: Any) -> _Entry:
        if self.autotune and self.options["method"] == "auto":
            entry = self._tuned(args)
        else:
            entry = self._entry_for(args, self.options["method"])
        if len(self._entries) >= MAX_SIGNATURES:
            self._entries.pop(next(iter(self._entries)))
        self._entries[key] = entry
        if self._first is None:
            self._first = entry
        return entry

    def _entry_for(self, args: Sequence[torch.Tensor], method: str) -> _Entry:
        opts = dict(self.options)
        opts["method"] = method
        # Planned for a result without a graph (the program's case); a call that needs a
        # graph runs interpreted (see _plain).
        with torch.no_grad():
            req = build_request("prepare", self.func, tuple(args), fit="result", **opts)
        return _build(req, self.compile)

    def _tuned(self, args: Sequence[torch.Tensor]) -> _Entry:
        """NOTE [Autotuning]: every route that applies is prepared for this signature and timed
        on the example (median of a few calls after one warm-up); the fastest is kept. The
        timings are medians of one short run on a possibly busy machine: a close call may go
        either way, but never to a route that is wrong, since each program was checked."""
        from .methods import by_method, names

        candidates: dict[str, _Entry] = {"auto": self._entry_for(args, "auto")}
        call = candidates["auto"].request.call
        for name in names():
            applies = by_method(name).applies
            if applies is not None and not applies(call):
                continue
            try:
                candidates[name] = self._entry_for(args, name)
            except (NotImplementedError, ValueError, RuntimeError):
                continue
        timings = {name: _time(self, e, args) for name, e in candidates.items()}
        best = min(timings, key=lambda k: timings[k])
        chosen = candidates[best]
        chosen.timings = timings
        chosen.why = f"{chosen.why}, autotuned: method={best!r}"
        return chosen


def _time(prepared: PreparedJacobian, entry: _Entry, args: Sequence[torch.Tensor]) -> float:
    """Median seconds of one call of ``entry`` on ``args`` (:func:`median_seconds`)."""

    def once() -> None:
        if entry.program is not None:
            entry.program(*args, *entry.lifted)
        else:
            from .executor import execute

            execute(entry.request)

    return median_seconds(once)


def _plain(args: Sequence[torch.Tensor], watched: Sequence[torch.Tensor]) -> bool:
    """Nothing asks for a differentiable result (NOTE [Differentiable results] in
    :mod:`jacbatch.methods`) and nothing is being traced: the program may run."""
    if torch._C._functorch.maybe_current_level() is not None or forward_ad._current_level >= 0:
        return False
    if torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
        for t in args:
            if t.requires_grad:
                return False
        for t in watched:
            if t.requires_grad:
                return False
    for t in args:
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            return False  # a subclass (fake tensors, wrappers): let jacobian() decide
    return True


def _enforce_forward(call: Any, req: Request, jacs: list[torch.Tensor]) -> None:
    from . import _nonfinite

    lead = [J if call.batched else J.unsqueeze(0) for J in jacs]
    _nonfinite.enforce(call, call.argnums, lead, "jacfwd", req.out_shape, req.vec, False)


def _why_interpreted(req: Request) -> str | None:
    plan = req.plan
    if req.call.create_graph:
        return "the result must stay differentiable"
    if plan.protection.needed or plan.random:
        return "func writes state or its arguments, or draws random numbers"
    if req.call.batch_size is not None and req.batch_chunk < req.call.batch_size:
        return f"the memory budget chunks the batch ({req.batch_chunk} samples at a time)"
    if any(s.route == "per_sample" for s in plan.steps):
        return "the plan loops over samples"
    return None


def _build(
    req: Request,
    compile: bool,
    over_graph: Any = None,
    reference: Sequence[torch.Tensor] | None = None,
) -> _Entry:
    """Trace ``req``'s plan into a program (NOTE [Prepared Jacobians: one aten program per
    signature]), or say why it runs interpreted.

    ``over_graph``: a :class:`~jacbatch.capture.Captured` whose lifted tensors become program
    inputs for every route (the autodiff routes then differentiate its aten graph rather than
    ``func``), and the program also returns the graph's output for the first sample (NOTE
    [Repeated plain calls] in :mod:`jacbatch.repeated`). ``reference``: the example's
    Jacobians as the full path computed them, to check the program against (else the plan is
    run interpreted for that).
    """
    why = _why_interpreted(req)
    if why is not None:
        return _Entry(req, None, f"interpreted: {why}")
    call = req.call
    n = len(call.args)
    captured = over_graph
    if captured is None and any(s.route == "traced" for s in req.plan.steps):
        captured = traced.captured_for(call)
    lifted: tuple[torch.Tensor, ...] = () if captured is None else tuple(captured.lifted)
    forward = any(s.route == "jacfwd" for s in req.plan.steps)
    summed = [True] * len(call.argnums)
    for s in req.plan.steps:
        if s.route == "closed_form":  # registered rules copy their arguments' entries
            summed = [a not in s.argnums and f for a, f in zip(call.argnums, summed, strict=True)]

    # Inductor cannot functionalize the in-place strided writes of the closed forms' writer:
    # a program to compile is traced with the out-of-place writes of a differentiable result.
    run_call = dataclasses.replace(call, create_graph=True) if compile else call

    def program(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        args, lift = tuple(xs[:n]), xs[n:]
        sub = dataclasses.replace(run_call, args=args)
        if over_graph is not None:
            sub = dataclasses.replace(sub, func=graph_function(over_graph.graph, lift))
        replay = traced.replaying(captured, lift) if captured is not None else None
        with replay if replay is not None else contextlib.nullcontext(), executor.strict():
            jacs = executor._execute(sub, req, [None] * len(call.argnums))
        total = sum(x.sum() for x in args if x.dtype.is_floating_point)
        for J, s in zip(jacs, summed, strict=True):
            if s:
                total = total + J.sum()
        flag = torch.isfinite(torch.as_tensor(total))
        if over_graph is None:
            return (*jacs, flag)
        dims = call.in_dims
        first = [a.select(d, 0) if d is not None else a for a, d in zip(args, dims, strict=True)]
        return (*jacs, sub.func(*first), flag)

    examples = tuple(call.args) + lifted
    if over_graph is not None:
        _transformable(over_graph.graph.gm)  # made (cached) before tracing: not while tracing
    try:
        # make_fx sets a process-wide "FX is tracing" flag that makes Dynamo refuse to
        # capture in other threads: trace under the capture lock.
        with capture._LOCK, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = make_fx(program, tracing_mode="fake", _allow_non_fake_inputs=True)(*examples)
    except Exception as err:  # a value-dependent step, a route the trace cannot follow
        return _Entry(
            req, None, f"interpreted: the plan does not trace ({tracing._first_line(err)})"
        )
    gm.graph.eliminate_dead_code()  # views the routes made and did not use (in-place ops stay)
    gm.recompile()
    ops = sum(nd.op == "call_function" for nd in gm.graph.nodes)
    # the tensors the program reads besides its inputs: a parameter among them that requires
    # grad (with grad mode on) makes a call need a differentiable result
    constants = [t for t in vars(gm).values() if isinstance(t, torch.Tensor)]
    watched = (*constants, *gm.parameters(), *gm.buffers(), *lifted)
    run: Callable[..., Any] = gm
    seconds = 0.0
    if compile:
        start = time.perf_counter()
        try:
            run = torch.compile(gm, backend="inductor", fullgraph=True, dynamic=False)
            with torch.no_grad():
                run(*examples)
        except Exception as err:
            return _Entry(
                req, None, f"interpreted: torch.compile failed ({tracing._first_line(err)})"
            )
        seconds = time.perf_counter() - start
    kind = "compiled program" if compile else "aten program"
    entry = _Entry(req, run, f"{kind} ({ops} ops)", lifted, watched, forward, seconds, ops)
    if not _agrees(entry, examples, reference):
        return _Entry(req, None, "interpreted: the program disagreed with the plan")
    if compile:
        # NOTE [A compiled program must earn its place]: Inductor does not always win (a
        # write-bound Jacobian gains nothing from fusion and loses the in-place strided
        # writes); the plain program is made too and the faster of the two is kept.
        plain_entry = _build(req, False, over_graph, reference)
        if plain_entry.program is not None:
            fast, slow = _seconds_of(plain_entry.program, examples), _seconds_of(run, examples)
            if fast < slow:
                plain_entry.compile_seconds = seconds
                plain_entry.why = (
                    f"{plain_entry.why}, kept over the compiled program "
                    f"({fast * 1e3:.3g} ms against {slow * 1e3:.3g} ms a call)"
                )
                return plain_entry
    return entry


def median_seconds(once: Callable[[], Any], runs: int = 5, give_up: float = math.inf) -> float:
    """Median seconds of ``once()`` over ``runs`` runs after a warm-up, without a graph; the
    warm-up's time when it took longer than ``give_up`` (not worth timing further)."""
    with torch.no_grad():
        start = time.perf_counter()
        once()
        first = time.perf_counter() - start
        if first > give_up:
            return first
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            once()
            times.append(time.perf_counter() - start)
    return sorted(times)[runs // 2]


def _seconds_of(program: Callable[..., Any], examples: Sequence[torch.Tensor]) -> float:
    return median_seconds(lambda: program(*examples))


def graph_function(graph: Any, lifted: Sequence[torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``func`` as its traced aten graph (:class:`~jacbatch.tracing.TracedGraph`), with
    ``lifted`` as the values of the tensors it reads besides its arguments (the graph made
    ready for torch.func's transforms: :func:`_transformable`)."""
    gm, inputs = _transformable(graph.gm), graph.inputs

    def f(*args: torch.Tensor) -> torch.Tensor:
        vals = [*args, *lifted]
        if inputs is not None:
            vals = [vals[i] for i in inputs]
        out = gm(*vals)
        return out[0] if isinstance(out, (tuple, list)) else out

    return f


_aten = torch.ops.aten
_TRANSFORMABLE: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _transformable(gm: Any) -> Any:
    """``gm`` with the functionalized writes that torch.func cannot transform replaced by what
    they compute (a copy when there are any; cached per graph).

    NOTE [Functional writes in a captured graph]
        Functionalization turns ``dst.copy_(src)`` and ``dst.fill_(v)`` into the out-of-place
        ``aten.copy(dst, src)`` and ``aten.fill.Tensor(dst, v)``. In torch 2.13 ``aten.copy``
        has no derivative under torch.func ("derivative for aten::copy is not implemented")
        and ``fill.Tensor`` no batching rule (a slow per-sample fallback), while both compute
        nothing but ``src`` (``v``) converted to ``dst``'s dtype and broadcast to its shape,
        which is what they are replaced with here. This is what lets ``vmap(jacrev)`` run over
        the captured graph of code that writes in place (pytorch-kinematics' chain), where
        ``vmap`` over the code itself refuses the writes.
    """
    if gm is None:
        return gm
    hit = _TRANSFORMABLE.get(gm)
    if hit is not None:
        return hit
    targets = (_aten.copy.default, _aten.fill.Tensor, _aten.fill.Scalar)
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in targets]
    if not nodes or any("val" not in n.args[0].meta for n in nodes):
        _TRANSFORMABLE[gm] = gm
        return gm
    new = copy.deepcopy(gm)
    graph = new.graph
    for n in [n for n in graph.nodes if n.op == "call_function" and n.target in targets]:
        dst, src = n.args[0], n.args[1]
        like = dst.meta["val"]
        with graph.inserting_before(n):
            if n.target is _aten.fill.Scalar:
                made = graph.call_function(
                    _aten.full.default,
                    (list(like.shape), src),
                    {"dtype": like.dtype, "device": like.device},
                )
            else:
                cast = graph.call_function(_aten._to_copy.default, (src,), {"dtype": like.dtype})
                wide = graph.call_function(_aten.expand.default, (cast, list(like.shape)))
                made = graph.call_function(_aten.clone.default, (wide,))
        n.replace_all_uses_with(made)
        graph.erase_node(n)
    new.recompile()
    _TRANSFORMABLE[gm] = new
    return new


def _agrees(
    entry: _Entry,
    examples: Sequence[torch.Tensor],
    reference: Sequence[torch.Tensor] | None = None,
) -> bool:
    """Run the program on the example and compare with ``reference`` (the Jacobians of the
    example by the full path), or with the interpreted plan; a plan that fails to run
    interpreted disagrees."""
    req = entry.request
    call = req.call
    assert entry.program is not None
    with torch.no_grad():
        got = entry.program(*examples)
        if reference is not None:
            want = list(reference)
        else:
            try:
                want = executor._execute(call, req, [None] * len(call.argnums))
            except Exception:  # a route the interpreted plan cannot run on func itself
                return False
    if any(t.device != call.device for t in got if isinstance(t, torch.Tensor)):
        return False  # a value the trace kept from the probe's meta tensors: not a program
    if not bool(got[-1]):
        return True  # the example itself is not finite: the NaN policy handles such calls
    for G, W in zip(got[: len(want)], want, strict=True):
        if G.shape != W.shape or G.dtype != W.dtype:
            return False
        if G.numel() == 0:
            continue
        eps = torch.finfo(W.dtype).eps
        scale = float(W.abs().max())
        if not bool(((G - W).abs() <= _AGREE_ULPS * eps * max(1.0, scale)).all()):
            return False
    return True


def prepare(
    func: Callable[..., torch.Tensor],
    *example_args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    randomness: str = "error",
    batched: bool = False,
    compile: bool = False,
    autotune: bool = False,
) -> PreparedJacobian:
    """``jacobian(func, *args, ...)`` prepared once, to be called many times.

    Validation, probing, tracing, planning and the memory budget are done here, for the
    example's signature (shapes, dtypes, devices), and the plan is traced into one aten program
    (NOTE [Prepared Jacobians: one aten program per signature] in :mod:`jacbatch.prepared`).
    A call then costs the program's kernels plus some 15-35 µs (bench/overhead_bench.py).

    Args:
        func: per-sample function, as for :func:`jacbatch.jacobian`.
        *example_args: arguments of the shapes, dtype and device the calls will use (their
            values are used once, to check the program against the interpreted plan).
        argnums, in_dims, method, vec, chunk_size, max_memory, randomness, batched: as in
            :func:`jacbatch.jacobian` (with ``batched=True``, ``func`` maps the whole batch).
        compile: compile each program with ``torch.compile`` (Inductor): slower to prepare
            (see ``compile_seconds``), faster per call where elementwise work fuses.
        autotune: with ``method="auto"``, prepare every route that applies, time each on the
            example and keep the fastest (``timings`` has the figures; NOTE [Autotuning]).

    Returns:
        A :class:`PreparedJacobian` ``J``: ``J(*args)`` has :func:`jacbatch.jacobian`'s result
        shapes, ``(B, *out_shape, *in_shape)`` (or the ``vec`` layout, or a tuple for tuple
        ``argnums``); ``J.plan`` and ``J.program`` say what runs.

    The prepared Jacobian holds the tensors ``func`` reads by reference: in-place updates are
    seen, rebinding them or changing ``func``'s code is not (prepare again).

    Example:
        >>> W = torch.randn(4, 3)
        >>> J = jacbatch.prepare(lambda x: torch.tanh(W @ x), torch.randn(8, 3))
        >>> J(torch.randn(8, 3)).shape
        torch.Size([8, 4, 3])
    """
    V.check_bool("prepare", "compile", compile)
    V.check_bool("prepare", "autotune", autotune)
    options = {
        "argnums": argnums, "in_dims": in_dims, "method": method, "vec": vec,
        "chunk_size": chunk_size, "max_memory": max_memory, "randomness": randomness,
        "batched": batched,
    }  # fmt: skip
    prepared = PreparedJacobian(func, options, compile, autotune)
    key = tuple([(a.shape, a.dtype, a.device) for a in example_args if hasattr(a, "shape")])
    if len(key) != len(example_args):
        build_request(
            "prepare", func, tuple(example_args), argnums, in_dims, batched=batched
        )  # raises
    prepared._prepare(example_args, key)
    return prepared


__all__ = ["MAX_SIGNATURES", "PreparedJacobian", "prepare"]
