"""Repeated sparse calls: the probe, detection and the pattern check once per function state,
and the compressed passes as one traced program.

NOTE [Repeated sparse calls]
    A sparse call pays, besides its compressed passes, the probe of ``func`` (on meta tensors,
    a quarter of the call for the Brusselator), detection with ``sparse=True``, and the pattern
    check (one pass in the other mode on the first sample, another quarter). None of these
    answers changes while ``func`` computes the same composition of ops over the same
    constants, and that is what Dynamo's guards tell (NOTE [Repeated plain calls] in
    :mod:`jacbatch.repeated`, whose keying this follows):

    1. A call is keyed by ``func`` (a plain function by its code object), the arguments'
       shapes, dtypes and devices, and every option, the patterns by identity (the entry holds
       them, so an identity is not reused while the entry lives). The full path runs; after it,
       the key's count goes up. On the :data:`HOT_CALLS`-th full call, ``func`` is captured
       (:func:`jacbatch.capture.capture`), its graph's output on the first sample compared with
       ``func``'s (NOTE [The value check] in :mod:`jacbatch.methods.traced`), and the entry
       keeps the prepared call, the graph object and the lifted tensors (weakly, with their
       version counters).
    2. A later call with the key is validated (:func:`jacbatch.plan.normalize`), captured again
       (Dynamo's guards run: code, globals, closures and attributes read, shapes, dtypes), and
       reuses the entry only if the graph is the very object kept, the lifted tensors are the
       very objects kept at the same version (no global rebound to another tensor, no in-place
       write: ``where`` masks and zero constants that detection reads are constants of the
       graph), and the graph's output on this call's first sample equals ``func``'s. Anything
       else drops the entry and runs the full path. A differentiable result (an argument or a
       lifted tensor that requires grad under grad mode, ``create_graph``, a transform) and
       ``batched=True`` always run the full path. A key dropped :data:`MAX_DROPS` times is
       not kept again (capturing and tracing would be paid over and over).
    3. What a hit skips: the probe (its output shape and grad-mode findings are those of the
       graph), detection (a function of the graph, the lifted constants and the shapes only:
       NOTE [Exact and conservative op classes] in :mod:`jacbatch.sparse.detect` reads no
       argument value), the coloring and layout look-ups, and the pattern check, but the check
       only where it is redundant: when, at step 1, every given pattern contains the pattern
       detection finds for the graph. A structural pattern holds for every input, so a pattern
       that contains it covers every dependence at every input of that graph and those
       constants; the random product could not fail. A given pattern smaller than the detected
       one (it relies on derivatives that vanish at particular values, ``relu`` below zero)
       keeps its check on every call, as does a function detection refuses. The compressed
       passes, the NaN policy and the gather run on every call.
    4. The program. At step 1, when the call ran all samples and colors in one pass, the
       compressed passes and the gather of every argnum are traced by ``make_fx`` over the
       captured graph (its lifted tensors as inputs, so their current values are read) into
       one aten graph, run once on the call's arguments and kept only if its values equal the
       full path's exactly (to rounding where the traced closed form wrote the full path's
       values: two computations that agree; a hit then runs the program, which measured
       faster than the closed form on repeated calls). A hit whose chunking is still one pass runs that program instead of
       the torch.func transforms (their Python overhead is most of a small call: ``diff`` at
       n = 10,000 spends 0.1 ms in kernels of a 0.5 ms pass); the NaN policy then runs on its
       values as on the full path's. The program stands for ``func`` exactly when the graph
       does, which is what point 2 establishes before it runs.

    5. A call under a ``TorchDispatchMode`` (a memory tracker, a probe of an enclosing call)
       or inside a transform cannot capture (NOTE [No capture under a dispatch mode, a
       transform or another compile] in :mod:`jacbatch.capture`). Such a call takes the full
       path and leaves the entry as it is: neither counted, nor dropped, nor refused. (Treated
       as a changed function, one tracked call used to drop a kept entry, and the next calls
       paid the full path and the tracing again: the benchmark's peak-memory measurement
       made the given-pattern ``diff`` case look twice as slow as ``sparse=True``.)

    A stale graph whose output at the first sample equals ``func``'s but whose derivative
    differs (a method replaced on a class, which Dynamo does not guard) is not caught by the
    value check (its limit as stated in :mod:`jacbatch.methods.traced`): the skipped pattern
    check and the program (which differentiates the graph) are then stale, as the traced
    closed forms are in that case.

NOTE [Writes the version counter does not see]
    A write through ``.data`` (``w.data.fill_(0.5)``, ``idx.data[0] = 7``, a hand-written
    ``p.data -= lr * g``) changes a tensor's values without bumping its version counter (the
    ``.data`` tensor has a counter of its own). The kept program reads the lifted tensors'
    current values, and so does the value check of point 2, so neither sees it; but the
    pattern detection found, and the skipped pattern check, depend on those values (an index
    tensor, a ``where`` mask, a factor's zeros: NOTE [Cost and caching] in
    :mod:`jacbatch.sparse.detect`), and a stale pattern gives silently wrong values. So the
    entry also keeps a copy of every lifted tensor, and a hit requires each to equal its copy
    (``torch.equal``: a NaN makes the call take the full path, which is safe). The copies cost
    the lifted tensors' memory once more and one comparison per hit; where they would exceed
    :data:`MAX_LIFTED_BYTES` the key is not kept and every call takes the full path.

NOTE [Compiling the kept program]
    With :data:`COMPILE` set, the program of point 4, once it reproduced the full path's
    values, is also compiled by Inductor (``torch._inductor.compile_fx``, C++ on the CPU), run
    once on the same inputs, and kept instead of it only if its values are exactly the make_fx
    program's; otherwise (or where compiling raises) the make_fx program stays. The gate is
    equality, not a tolerance: Inductor may fuse, contract to FMA or reassociate, and a
    program that differs in the last bit is simply not kept (the measured cases below all
    compiled to equal values, float32 and float64). Everything else of a hit (the guards, the
    value check, the NaN policy) is unchanged; the compiled program stands for ``func`` exactly
    when the make_fx one does.

    Inductor's default fusion inlines each intermediate into every consumer: the gathers of
    the compressed passes then recompute the whole forward per gathered entry, and the
    compiled program was slower than eager (heat n = 2,048, B = 64: 6.2 ms vs 1.7 ms;
    Brusselator 32², B = 64: 36 vs 16 ms). Storing every intermediate once
    (``realize_*_threshold = 1``) makes it faster: program alone diff n = 10⁴ 0.10 vs 0.25 ms,
    Brusselator 6.2 vs 14.3 ms, heat 1.45 vs 1.67 ms (one core, loaded machine).

    It is off by default: the compile takes 1-6 s per key (more for the first compile in a
    process) and saves 0.05-15 ms per call, so it pays after some hundreds (Brusselator) to
    some ten thousands (diff, heat) of calls: a Newton loop on a large residual wins, a test
    suite calling a few times loses.
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .. import capture
from ..methods import batched_args, in_transform
from ..plan import forward_ok, normalize
from .pattern import SparsityPattern

if TYPE_CHECKING:
    from .engine import Prepared

#: A key is kept on this many full calls (capturing costs some full calls' worth once).
HOT_CALLS = 3
#: A key whose entry was dropped this many times (its function keeps changing, or its first
#: sample is not finite) is not kept again: capturing and tracing cost more than they save.
MAX_DROPS = 4
#: Lifted tensors of more bytes than this in all are not copied, and their key not kept (NOTE
#: [Writes the version counter does not see]).
MAX_LIFTED_BYTES = 64 * 2**20
#: ``False``: every call takes the full path (for benchmarks of the full path).
ENABLED = True
#: ``True``: a kept program is also compiled by Inductor (NOTE [Compiling the kept program]);
#: off by default, since the compile takes seconds per key.
COMPILE = False


@dataclasses.dataclass
class _Entry:
    count: int = 0
    prep: Prepared | None = None
    graph: Any = None
    lifted: tuple[tuple[weakref.ReferenceType[torch.Tensor], int, torch.Tensor], ...] = ()
    skip_check: bool = False
    refused: bool = False
    program: Callable[..., Any] | None = None
    drops: int = 0
    compiled: bool = False  # ``program`` is Inductor's (NOTE [Compiling the kept program])


@dataclasses.dataclass(frozen=True)
class Hit:
    """A kept entry that this call may use (NOTE [Repeated sparse calls], point 2).

    Attributes:
        prep: the kept prepared call, with this call's validated arguments.
        skip_check: the pattern check is redundant (point 3).
        program: the traced compressed passes and gather (point 4), or ``None``.
        lifted: the graph's lifted tensors now (the program's trailing inputs).
    """

    prep: Prepared
    skip_check: bool
    program: Callable[..., Any] | None
    lifted: tuple[torch.Tensor, ...]

    def run(self, call: Any) -> list[torch.Tensor] | None:
        """``(B, nnz)`` values per argnum by the program (before the NaN policy), or ``None``."""
        if self.program is None:
            return None
        args, _, B = batched_args(call)
        if B == 0:
            return None
        with torch.no_grad():
            return list(self.program(*args, *self.lifted))


_SEEN: weakref.WeakKeyDictionary[Any, dict[Any, _Entry]] = weakref.WeakKeyDictionary()


def _owner(func: Callable[..., Any]) -> Any:
    return func.__code__ if isinstance(func, types.FunctionType) else func


def _key(args: Sequence[Any], options: Mapping[str, Any]) -> Any:
    if options.get("batched") is not False or options.get("create_graph") is not False:
        return None
    if not all(isinstance(a, torch.Tensor) for a in args):
        return None
    sparse = options.get("sparse")
    given = sparse if isinstance(sparse, tuple) else (sparse,)
    marks = tuple(id(p) if isinstance(p, SparsityPattern) else p for p in given)
    rest = tuple(sorted((k, v) for k, v in options.items() if k != "sparse"))
    key = (tuple((a.shape, a.dtype, a.device) for a in args), marks, rest)
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _entry(func: Callable[..., Any], key: Any, create: bool) -> _Entry | None:
    try:
        table = _SEEN.setdefault(_owner(func), {}) if create else _SEEN.get(_owner(func))
    except TypeError:  # not weakly referenceable
        return None
    if table is None:
        return None
    return table.setdefault(key, _Entry()) if create else table.get(key)


def _plain(args: Sequence[torch.Tensor], lifted: Sequence[torch.Tensor]) -> bool:
    from ..prepared import _plain as plain

    return plain(args, lifted)


def _capture(call: Any) -> Any:
    return capture.capture(
        call.func,
        [call.sample_shape(i) for i in range(len(call.args))],
        call.dtype,
        call.device,
        [d is not None for d in call.in_dims],
    )


def _same_output(call: Any, got: Any) -> bool:
    """The graph's output on the first sample equals ``func``'s (NOTE [The value check])."""
    args, flags, B = batched_args(call)
    if B == 0:
        return True
    first = [x[0] if f else x for x, f in zip(args, flags, strict=True)]
    values = [*first, *got.lifted]
    if got.graph.inputs is not None:  # placeholders: the arguments read, then lifted tensors
        values = [values[i] for i in got.graph.inputs]
    try:
        with torch.no_grad():
            y = call.func(*first)
            out = got.graph.gm(*values)
    except Exception:  # a graph that cannot even run on the sample does not stand for func
        return False
    v = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(y, torch.Tensor) or not isinstance(v, torch.Tensor):
        return False
    return y.shape == v.shape and bool(torch.equal(y, v.to(y.dtype)))


def _lifted_now(
    got: Any,
) -> tuple[tuple[weakref.ReferenceType[torch.Tensor], int, torch.Tensor], ...] | None:
    """Per lifted tensor: a weak reference, its version and a copy of its values (NOTE
    [Writes the version counter does not see]); ``None`` when the copies would exceed
    :data:`MAX_LIFTED_BYTES`."""
    size = sum(t.numel() * t.element_size() for t in got.lifted)
    if size > MAX_LIFTED_BYTES:
        return None
    return tuple((weakref.ref(t), t._version, t.detach().clone()) for t in got.lifted)


def _lifted_same(
    kept: Sequence[tuple[Any, int, torch.Tensor]], now: Sequence[torch.Tensor]
) -> bool:
    if len(kept) != len(now):
        return False
    return all(
        r() is t and t._version == v and c.shape == t.shape and bool(torch.equal(c, t.detach()))
        for (r, v, c), t in zip(kept, now, strict=True)
    )


def lookup(
    func: Callable[..., Any], args: tuple[Any, ...], options: Mapping[str, Any]
) -> Hit | None:
    """The kept entry for this call, or ``None`` for the full path (NOTE [Repeated sparse
    calls], point 2)."""
    key = _key(args, options) if ENABLED else None
    entry = _entry(func, key, create=False) if key is not None else None
    if entry is None or entry.prep is None:
        return None
    old = entry.prep
    sparse = options.get("sparse")
    given = sparse if isinstance(sparse, tuple) else (sparse,)
    if sparse is not True and any(
        p is not part.pattern for p, part in zip(given, old.parts, strict=True)
    ):
        return None
    call = normalize(
        "jacobian", func, args, options.get("argnums", 0), options.get("in_dims", 0),
        options.get("randomness", "error"), False,
    )  # fmt: skip
    if in_transform(call.args) or capture._busy() is not None:
        return None  # point 5: no capture now, which says nothing about ``func``
    got = _capture(call)
    if not _plain(call.args, got.lifted):
        return None
    if (
        got.graph is not entry.graph
        or not _lifted_same(entry.lifted, got.lifted)
        or not _same_output(call, got)
    ):
        entry.prep, entry.graph, entry.lifted, entry.count = None, None, (), 0
        entry.drops += 1
        entry.refused = entry.drops >= MAX_DROPS  # a function that keeps changing stays cold
        return None
    now = dataclasses.replace(call, create_graph=False, probe=old.call.probe)
    if not forward_ok(now) and any(p.coloring.mode == "column" for p in old.parts):
        return None
    return Hit(dataclasses.replace(old, call=now), entry.skip_check, entry.program, got.lifted)


def record(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    options: Mapping[str, Any],
    prep: Prepared,
    values: Sequence[torch.Tensor] | None,
    exact: bool = True,
) -> None:
    """Count a full call that passed its checks; on the :data:`HOT_CALLS`-th, keep it (NOTE
    [Repeated sparse calls], point 1), with a program where ``values`` (the call's values, all
    colors and samples in one pass) are given and the program reproduces them exactly
    (``exact=False``: to rounding, for values the traced closed form wrote)."""
    key = _key(args, options) if ENABLED else None
    entry = _entry(func, key, create=True) if key is not None else None
    if entry is None or entry.refused or entry.prep is not None or capture._busy() is not None:
        return  # point 5: a call that cannot capture is not counted
    entry.count += 1
    if entry.count < HOT_CALLS:
        return
    call = prep.call
    if call.create_graph or call.batched_func is not None or in_transform(call.args):
        return
    got = _capture(call)
    if got.graph.gm is None or not _plain(call.args, got.lifted) or not _same_output(call, got):
        entry.refused = True
        return
    lifted = _lifted_now(got)
    if lifted is None:
        entry.refused = True
        return
    entry.skip_check = all(_covers(call, part) for part in prep.parts)
    entry.program = _program(prep, call, got, values, exact) if values is not None else None
    # make_fx's program is a GraphModule; Inductor's is not
    entry.compiled = entry.program is not None and not isinstance(
        entry.program, torch.fx.GraphModule
    )
    # kept without the arguments and the function: a kept entry must not keep the caller's
    # batch alive, nor ``func`` (the table's weak key is its code, which ``func`` holds)
    bare = dataclasses.replace(call, func=_gone, args=())
    entry.prep, entry.graph, entry.lifted = (
        dataclasses.replace(prep, call=bare),
        got.graph,
        lifted,
    )


def _program(
    prep: Prepared, call: Any, got: Any, values: Sequence[torch.Tensor], exact: bool = True
) -> Callable[..., Any] | None:
    """The compressed passes and gather of every argnum over the captured graph, traced by
    ``make_fx`` into one aten graph: inputs the batched arguments (batch first) and the lifted
    tensors; outputs ``(B, nnz)`` per argnum. ``None`` where tracing fails or the program's
    values are not exactly ``values`` (NOTE [Repeated sparse calls], point 4)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from .compressed import gathered

    args, flags, B = batched_args(call)
    if B == 0:
        return None
    n, graph, wiring = len(args), got.graph.gm, got.graph.inputs

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        xs, lifted = inputs[:n], inputs[n:]

        def g(*ys: torch.Tensor) -> torch.Tensor:
            values = [*ys, *lifted]
            out = graph(*(values if wiring is None else [values[i] for i in wiring]))
            return out[0] if isinstance(out, (tuple, list)) else out

        return tuple(
            gathered(
                g, xs, flags, p.argnum, (prep.out_shape, call.sample_shape(p.argnum)), p.layout
            )
            for p in prep.parts
        )

    try:
        with torch.no_grad():
            program = make_fx(run)(*args, *got.lifted)
            again = program(*args, *got.lifted)
    except Exception:
        return None
    if len(again) != len(values) or not all(
        a.shape == v.shape and _same(a, v, exact) for a, v in zip(again, values, strict=True)
    ):
        return None
    if COMPILE:
        return _compiled(program, (*args, *got.lifted), again) or program
    return program


def _equal(got: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> bool:
    return len(got) == len(values) and all(
        a.shape == v.shape and bool(torch.equal(a, v)) for a, v in zip(got, values, strict=True)
    )


#: Inductor settings for the kept program (NOTE [Compiling the kept program]): every
#: intermediate is stored once instead of recomputed inside the gathers that read it.
_INDUCTOR = {"realize_opcount_threshold": 1, "realize_reads_threshold": 1,
             "realize_acc_reads_threshold": 1}  # fmt: skip


def _compiled(
    program: Callable[..., Any], inputs: Sequence[torch.Tensor], values: Sequence[torch.Tensor]
) -> Callable[..., Any] | None:
    """``program`` compiled by Inductor, or ``None`` where compiling fails or its values on
    ``inputs`` are not exactly ``values`` (``program``'s own on them)."""
    try:
        from torch._inductor import config
        from torch._inductor.compile_fx import compile_fx

        with torch.no_grad(), config.patch(_INDUCTOR):
            # Any: compile_fx's declared result also covers its AOT modes (paths, weights)
            fast: Any = compile_fx(program, list(inputs))  # type: ignore[arg-type]
            again = fast(*inputs)
    except Exception:
        return None
    if not _equal(list(again), values):
        return None
    return fast


def _same(a: torch.Tensor, v: torch.Tensor, exact: bool) -> bool:
    """``a`` equals ``v``; not ``exact``: to rounding (``v`` from another computation, the
    traced closed form: NOTE [Sampling lettered terms at the nonzeros] in
    :mod:`jacbatch.sparse.closed`), non-finite entries where both are."""
    if bool(torch.equal(a, v)) or exact:
        return bool(torch.equal(a, v))
    finite = torch.isfinite(v)
    if not bool(torch.equal(finite, torch.isfinite(a))):
        return False
    scale = float(v[finite].abs().max()) if bool(finite.any()) else 0.0
    tol = 1e3 * torch.finfo(v.dtype).eps * max(1.0, scale)
    return bool(((a - v).abs()[finite] <= tol).all())


def _gone(*args: Any) -> Any:
    raise AssertionError("a kept sparse preparation's call is never run")


def _covers(call: Any, part: Any) -> bool:
    """``part``'s pattern contains the structural one (detected: True; refused: False)."""
    if not part.given:
        return True
    try:
        from .detect import detect

        found = detect(call.func, call.args, part.argnum, call.in_dims)
    except Exception:
        return False
    p = part.pattern
    if tuple(found.shape) != tuple(p.shape):
        return False
    n = max(p.shape[1], 1)
    mine = p.row_indices() * n + p.col_indices
    theirs = found.row_indices() * n + found.col_indices
    return bool(torch.isin(theirs, mine).all())


def forget(func: Callable[..., Any], args: tuple[Any, ...], options: Mapping[str, Any]) -> None:
    """Drop the kept entry of this call (its prepared call no longer holds)."""
    key = _key(args, options)
    entry = _entry(func, key, create=False) if key is not None else None
    if entry is not None:
        entry.prep, entry.graph, entry.lifted, entry.program, entry.count = None, None, (), None, 0


def forget_all() -> None:
    """Drop every kept entry (for tests)."""
    _SEEN.clear()


__all__ = ["COMPILE", "ENABLED", "HOT_CALLS", "Hit", "forget", "forget_all", "lookup", "record"]
