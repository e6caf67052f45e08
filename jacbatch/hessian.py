"""Per-sample Hessians of per-sample functions, batched like :func:`jacbatch.jacobian`.

:func:`hessian` has two routes:

* ``closed_form``: a second-order closed form built from the op rules, without autodiff
  (NOTE [Second-order closed forms: the Jacobian program, traced again]);
* ``jacfwd`` / ``jacrev``: ``vmap(jacfwd(jacrev(f)))`` (forward over reverse, what
  ``torch.func.hessian`` does) or ``vmap(jacrev(jacrev(f)))``; reverse over reverse replaces
  forward over reverse where a known torch bug makes forward mode wrong (:func:`outer_route`).

``method="auto"`` takes the closed form where every op on the way has a rule and the program
agreed with autodiff on the first samples when it was built, else autodiff.

(About 640 lines: the entry point, both routes and the program builder share the program
table and its keys and are read together; the pytree front end and the program rewrites live
in :mod:`jacbatch.second_order`.)

NOTE [Second-order closed forms: the Jacobian program, traced again]
    The traced route (:mod:`jacbatch.methods.traced`) turns a per-sample function ``f`` into an
    aten graph and composes its op rules' lettered terms into the Jacobian. Those rules are
    plain torch ops on the graph's values, so the whole first-derivative computation for ONE
    sample can itself be traced (``make_fx`` in fake mode, as :mod:`jacbatch.prepared` traces a
    plan) into a second aten graph ``g`` with ``g(x, *lifted) = J_f(x)`` of shape
    ``(*out_shape, *in_shape)`` (written out of place, :func:`jacbatch.rules.write.dense`).
    ``g`` is again a graph of ops with rules (``mm``, ``mul``, views, ``tanh`` ...), so the
    same machinery gives its Jacobian ``(*out_shape, *in_shape, *in_shape)``: the Hessian, for
    the whole batch at once, evaluated under ``vmap`` and composed from terms. That second
    computation is traced once more into a third program ``h(X, *lifted)`` for the batch size
    at hand (written by the one writer, :func:`jacbatch.rules.write.materialize`), so a call
    runs one aten program: no rule runs in Python per call. Value-preserving rewrites
    (:mod:`jacbatch.second_order.passes`) remove a batch loop inside ``bmm``, double passes
    over large intermediates and products by a factor of ones, and compute the
    last large sum into the result buffer instead of copying it there.

    Soundness: Fake tensors carry no values, so a rule that reads a value (a tie check, a zero
    in a product) makes the trace fail, and the call goes to autodiff, never to a program that
    specialized on the example. The one exception is the singularity check of the inverse and
    log-determinant rules, skipped while tracing (``jacbatch.rules.linalg.UNCHECKED``): a
    singular matrix gives a non-finite inverse, and every result is checked for finiteness.
    Each program is built for one captured graph of ``f`` (the
    graph object :mod:`jacbatch.capture` returns; Dynamo's guards decide when it changes), so a
    changed ``f`` gets a new program. When it is built, a program is run on the call's
    arguments and compared with ``vmap(jacrev(jacrev(f)))`` on the first samples; a
    disagreement keeps the graph on autodiff for good. Every call also compares ``f`` with its
    captured graph on the first sample (NOTE [The value check] in
    :mod:`jacbatch.methods.traced`), and a result that is not finite is recomputed by autodiff.

Pytrees: the routes take flat tuples of tensor arguments and ``argnums`` as a tuple of ints; a
pytree front end flattens the arguments at :func:`hessian`'s entry and unflattens the nested
result (see :func:`_nest`).
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import _torch_bugs, capture, memory, tracing
from . import _validation as V
from .call import Call
from .methods import in_transform, needs_graph
from .plan import _is_random_op, normalize, probe_call
from .rules import linalg, write
from .rules.terms import Unsupported
from .second_order import passes

#: Hessian routes a caller may name besides ``"auto"``.
METHODS: tuple[str, ...] = ("auto", "closed_form", "jacfwd", "jacrev")

#: Samples compared with autodiff when a closed-form program is built.
_CHECKED_SAMPLES = 2

#: A closed-form program and autodiff must agree to this many ulps of the result's scale.
_AGREE_ULPS = 1024

#: Working memory of a route per sample, in multiples of one sample's result (a coarse model:
#: the closed form holds a few terms of the result's size; autodiff one per vectorized row).
_WORK_MULTIPLE = 4

Nested = torch.Tensor | tuple[Any, ...]


def hessian(
    func: Callable[..., Any],
    *args: Any,
    argnums: int | tuple[int, ...] = 0,
    in_dims: Any = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    max_memory: int | str | None = None,
    has_aux: bool = False,
) -> Any:
    """Per-sample Hessians of ``func`` w.r.t. ``args[argnums]``, for a batch of inputs.

    The same as ``torch.func.vmap(torch.func.hessian(func, argnums), in_dims)(*args)``:
    ``func`` is written for ONE sample, ``in_dims`` says which arguments carry the batch.

    Pytrees work as in :func:`jacbatch.jacobian`: arguments may be dicts, tuples and lists of
    tensors (a module's parameters), ``in_dims`` a matching prefix tree, the output a tree;
    the result nests as ``torch.func.hessian``'s: the output's tree, each leaf holding the
    differentiated argument's tree, each of whose leaves holds that tree again (tuples of
    those for tuple ``argnums``). See :mod:`jacbatch.second_order.trees`.

    Args:
        func: per-sample function returning a floating-point tensor of shape ``out_shape``
            (usually a scalar: a loss, a log-density), or a tree of them; with
            ``has_aux=True`` a pair ``(output, aux)``.
        *args: its arguments, tensors or pytrees of tensors; a batched one has a batch
            dimension of size ``B`` at ``in_dims[i]``.
        argnums: the argument to differentiate twice, or a tuple of them (the result is then
            nested: ``H[i][j]`` is the block for ``args[argnums[i]]`` and
            ``args[argnums[j]]``, as ``torch.func.hessian``).
        in_dims: int (every argument), or one int/``None`` (or a prefix tree) per argument, as
            in :func:`jacbatch.jacobian`; all ``None`` means no batch dimension in the result.
        method: ``"auto"`` (the closed form where it applies, else ``"jacfwd"``),
            ``"closed_form"`` (second-order closed form from the op rules, no autodiff;
            ``NotImplementedError`` where some op has no rule), ``"jacfwd"`` (forward over
            reverse, ``vmap(jacfwd(jacrev(func)))``) or ``"jacrev"`` (reverse over reverse).
            Where a known torch bug makes forward mode wrong for an op ``func`` runs (LU-based
            ``det``/``logdet``/``solve``, for which ``vmap(torch.func.hessian(f))`` itself is
            wrong; :mod:`jacbatch._torch_bugs`), reverse over reverse runs instead.
        vec: ``None`` keeps ``(B, *out_shape, *in_shape_i, *in_shape_j)``; ``"row"`` /
            ``"col"`` flatten each of the three groups in row- or column-major order:
            ``(B, out_numel, in_numel_i, in_numel_j)``, without the ``out_numel`` axis for a
            scalar output.
        chunk_size: at most this many rows per vectorized pass of the autodiff routes' reverse
            passes (``torch.func.jacrev``'s ``chunk_size``); the closed form is not affected.
        max_memory: working-memory budget beyond the result (bytes or a string such as
            ``"512MiB"``); the batch is split into chunks to stay within it. A result that
            cannot fit in free memory is refused before anything is computed.
        has_aux: ``func`` returns ``(output, aux)``; the result is ``(hessian, aux)`` with
            ``aux`` batched like the output, as
            ``vmap(jacfwd(jacrev(func, has_aux=True), has_aux=True))`` returns it.

    There is no ``out=``: the result is written by the route that computes it (a program's
    fresh buffers, or autodiff's), so a caller's buffer could only be filled by a copy.

    Returns:
        ``(B, *out_shape, *in_shape, *in_shape)`` (no ``B`` without a batch), in the ``vec``
        layout if asked; a tuple of tuples of them for tuple ``argnums``. The result is
        differentiable when autograd or a torch.func transform asks (then autodiff computes
        it): with grad mode on and an argument or a tensor ``func`` reads (a module's
        parameters) requiring grad. Under ``torch.no_grad()`` the closed form can answer.

    Example:
        >>> W = torch.tensor([[1.0, 2.0], [0.5, -1.0]])
        >>> X = torch.tensor([[0.1, 0.2], [0.3, -0.4], [1.0, 0.0]])
        >>> H = jacbatch.hessian(lambda x: torch.tanh(W @ x).pow(2).sum(), X)
        >>> H.shape
        torch.Size([3, 2, 2])
        >>> ref = torch.func.vmap(torch.func.hessian(lambda x: torch.tanh(W @ x).pow(2).sum()))(X)
        >>> torch.allclose(H, ref)
        True
    """
    from .second_order import trees

    if trees.is_tree_call(args, in_dims, has_aux):
        return trees.hessian(
            func, args, argnums, in_dims, method, vec, chunk_size, max_memory, has_aux
        )
    try:
        blocks, call, out_shape, order = blocks_of(
            "hessian", func, args, argnums, in_dims, method, vec, chunk_size, max_memory
        )
    except V.TreeOutput:  # a tuple, list or dict output
        return trees.hessian(
            func, args, argnums, in_dims, method, vec, chunk_size, max_memory, has_aux
        )
    lead = 1 if call.batch_size is not None else 0
    shapes = [call.sample_shape(i) for i in range(len(call.args))]
    n = len(call.argnums)
    flat = []
    for k, H in enumerate(blocks):
        i, j = call.argnums[k // n], call.argnums[k % n]
        flat.append(_flatten(H, lead, len(out_shape), len(shapes[i]), len(shapes[j]), order))
    return _nest(flat, n, call.tuple_argnums)


def blocks_of(
    where: str,
    func: Callable[..., torch.Tensor],
    args: tuple[torch.Tensor, ...],
    argnums: object,
    in_dims: object,
    method: str,
    vec: object,
    chunk_size: object,
    max_memory: int | str | None,
) -> tuple[list[torch.Tensor], Call, tuple[int, ...], str | None]:
    """The Hessian blocks ``([B,] *out, *in_i, *in_j)`` in row-major order of ``(i, j)`` over
    ``argnums`` (unflattened: ``vec`` is checked and returned, not applied), the call as
    normalized (its own ``batch_size``: ``None`` without a batch), ``out_shape`` and the
    ``vec`` order."""
    call = normalize(where, func, args, argnums, in_dims)
    if method not in METHODS:
        raise ValueError(
            f"{where}: expected method to be one of {', '.join(map(repr, METHODS))}, got "
            f"{method!r}."
        )
    order = V.check_vec(where, vec)
    size = V.check_chunk_size(where, chunk_size)
    budget = None if max_memory is None else memory.parse_bytes(where, max_memory)
    batched = call.batch_size is not None
    given = call
    if not batched:  # a batch of one, with every argument batched
        call = Call(
            call.func, tuple(a.unsqueeze(0) for a in call.args), (0,) * len(call.args),
            call.argnums, call.tuple_argnums, 1, call.dtype, call.device,
        )  # fmt: skip
    # NOTE [Repeated Hessians]: a call whose captured graph already has a checked program needs
    # no probe (the program knows the output shape; the tensors the graph reads say whether
    # the result must be differentiable): the per-call cost is the guard check, the value
    # check on one sample, the program and its finiteness check.
    cached = _cached(call) if method in ("auto", "closed_form") else None
    probe = None
    if cached is not None:
        out_shape = cached[0].out_shape
        reads_grad = any(t.requires_grad for t in cached[1].lifted)
    else:
        probe = _probe(call)
        out_shape = tuple(probe.out.shape)
        reads_grad = probe.reads_grad
    B = call.batch_size or 0
    shapes = [call.sample_shape(i) for i in range(len(call.args))]
    per_sample = (
        sum(
            math.prod(out_shape) * math.prod(shapes[i]) * math.prod(shapes[j])
            for i in call.argnums
            for j in call.argnums
        )
        * torch.empty((), dtype=call.dtype).element_size()
    )
    free = memory.available_memory(call.device)
    if per_sample * B > free:
        V.result_too_large(where, per_sample * B, free, budget, B if batched else None)
    if budget is None:
        budget = memory.default_budget(call.device)
    work = _WORK_MULTIPLE * per_sample
    if work > budget:
        V.budget_too_small(where, work, budget, f"method={method!r}")
    chunk = max(1, min(B, budget // max(work, 1))) if B else 0

    graph = needs_graph(call.args, False, reads_grad)
    blocks = None
    if cached is not None and not graph and chunk >= B:
        try:
            blocks = _run_program(call, *cached)
        except Unsupported:
            blocks = None
    if blocks is None:
        if probe is None:
            probe = _probe(call)
        outer = outer_route(probe.ops, method)
        blocks = _run(call, method, out_shape, size, chunk, graph, outer)
    if not batched:
        blocks = [b[0] for b in blocks]
    return blocks, given, out_shape, order


def _probe(call: Call) -> Any:
    """The probe of ``func`` (:func:`jacbatch.plan.probe_call`), its errors worded for
    ``hessian``; a ``func`` that draws random numbers is refused (as ``torch.func.vmap``'s
    default ``randomness="error"`` does)."""
    try:
        probe = probe_call(call)
        if probe.random:
            V.random_function_error("hessian", [o for o in probe.ops if _is_random_op(o)])
        return probe
    except (TypeError, ValueError) as err:
        msg = str(err)
        if msg.startswith("jacobian:"):
            raise type(err)("hessian:" + msg[len("jacobian:") :]) from None
        raise


def _flatten(
    H: torch.Tensor, lead: int, no: int, ni: int, nj: int, order: str | None
) -> torch.Tensor:
    """``([B,] *out, *in_i, *in_j)`` -> ``([B,] out_numel, in_i numel, in_j numel)`` in ``order``
    (no ``out_numel`` axis for a scalar output); ``None`` leaves ``H`` as it is."""
    if order is None:
        return H
    groups = [list(range(lead, lead + no)), list(range(lead + no, lead + no + ni))]
    groups.append(list(range(lead + no + ni, lead + no + ni + nj)))
    if order == "col":
        H = H.permute(*range(lead), *[a for g in groups for a in reversed(g)])
    sizes = [math.prod(H.shape[g[0] : g[-1] + 1]) if g else 1 for g in groups]
    shape = [*H.shape[:lead], *(sizes if no else sizes[1:])]
    return H.reshape(shape)


def _nest(flat: Sequence[torch.Tensor], n: int, tuple_argnums: bool) -> Nested:
    """Blocks in row-major order of ``(i, j)`` -> one tensor, or ``n`` tuples of ``n``."""
    if not tuple_argnums:
        return flat[0]
    return tuple(tuple(flat[i * n : (i + 1) * n]) for i in range(n))


# ---------------------------------------------------------------------------------------------
# Running a route over batch chunks
# ---------------------------------------------------------------------------------------------


def _run(
    call: Call,
    method: str,
    out_shape: tuple[int, ...],
    chunk_size: int | None,
    chunk: int,
    graph: bool,
    outer: str,
) -> list[torch.Tensor]:
    """Blocks ``(B, *out, *in_i, *in_j)`` in row-major order of ``(i, j)``."""
    B = call.batch_size or 0
    if B == 0:  # an empty batch: nothing to evaluate
        shapes = [call.sample_shape(a) for a in call.argnums]
        return [
            torch.zeros((0, *out_shape, *si, *sj), dtype=call.dtype, device=call.device)
            for si in shapes
            for sj in shapes
        ]
    if chunk >= B:
        return _run_chunk(call, method, out_shape, chunk_size, graph, outer)
    parts: list[list[torch.Tensor]] = []
    for start in range(0, B, chunk):
        n = min(chunk, B - start)
        sub = Call(
            call.func,
            tuple(
                a.narrow(d, start, n) if d is not None else a
                for a, d in zip(call.args, call.in_dims, strict=True)
            ),
            call.in_dims, call.argnums, call.tuple_argnums, n, call.dtype, call.device,
        )  # fmt: skip
        parts.append(_run_chunk(sub, method, out_shape, chunk_size, graph, outer))
    return [torch.cat(blocks) for blocks in zip(*parts, strict=True)]


def _run_chunk(
    call: Call,
    method: str,
    out_shape: tuple[int, ...],
    chunk_size: int | None,
    graph: bool,
    outer: str,
) -> list[torch.Tensor]:
    if method in ("auto", "closed_form") and not graph:
        try:
            return closed_form(call, out_shape)
        except Unsupported as err:
            if method == "closed_form":
                raise NotImplementedError(
                    f"hessian: expected a function whose Jacobian program traces into op "
                    f"rules, got one that does not ({err}). Use method='auto', 'jacfwd' or "
                    f"'jacrev'."
                ) from None
    elif method == "closed_form":
        raise NotImplementedError(
            "hessian: expected a result without an autograd graph for method='closed_form', "
            "got a call that must stay differentiable (an argument requires grad, or a "
            "torch.func transform is active). Use method='auto', 'jacfwd' or 'jacrev'."
        )
    return autodiff(call, outer, chunk_size)


#: Ops for which ``vmap(jacfwd(jacrev(f)))`` is wrong in torch 2.13 (LU-based: the tangent
#: ``vmap`` of ``jacfwd`` sits inside the batch ``vmap``; see ``lu_forward_nested_vmap`` in
#: :mod:`jacbatch._torch_bugs`). ``vmap(torch.func.hessian(logdet))`` is off by 1e3 here.
LU_OPS = frozenset(
    {
        "aten._linalg_slogdet.default",
        "aten._linalg_det.default",
        "aten._linalg_solve_ex.default",
        "aten.linalg_lu_factor_ex.default",
        "aten.linalg_lu.default",
        "aten.linalg_lu_solve.default",
        "aten.lu_unpack.default",
    }
)


def outer_route(ops: Iterable[str], method: str) -> str:
    """The outer transform of the autodiff route: ``"jacfwd"`` (forward over reverse, the
    faster one and ``torch.func.hessian``'s) unless ``method="jacrev"`` or ``func`` runs an op
    that a known torch bug makes wrong in forward mode (:mod:`jacbatch._torch_bugs`, and
    :data:`LU_OPS`): then ``"jacrev"`` (reverse over reverse)."""
    ran = set(ops)
    if method == "jacrev" or ran & LU_OPS or _torch_bugs.affecting(ran, "jacfwd"):
        return "jacrev"
    return "jacfwd"


def autodiff(call: Call, outer: str, chunk_size: int | None = None) -> list[torch.Tensor]:
    """``vmap(jacfwd(jacrev(f)))`` (``outer="jacfwd"``) or ``vmap(jacrev(jacrev(f)))``.

    Returns:
        Blocks ``(B, *out, *in_i, *in_j)`` in row-major order of ``(i, j)``.
    """
    argnums = call.argnums
    inner = torch.func.jacrev(call.func, argnums=argnums, chunk_size=chunk_size)
    if outer == "jacfwd":
        second = torch.func.jacfwd(inner, argnums=argnums)
    else:
        second = torch.func.jacrev(inner, argnums=argnums, chunk_size=chunk_size)
    keep = torch.is_grad_enabled()
    with _torch_bugs.reverse_mode():  # lu_backward_nested_vmap_no_grad
        got = torch.func.vmap(second, in_dims=call.in_dims)(*call.args)
    blocks = [got[i][j] for i in range(len(argnums)) for j in range(len(argnums))]
    return blocks if keep else [b.detach() for b in blocks]


# ---------------------------------------------------------------------------------------------
# The second-order closed form (NOTE [Second-order closed forms: the Jacobian program, traced
# again])
# ---------------------------------------------------------------------------------------------


@dataclass
class _Program:
    """The Hessian program for one captured graph, argnums, batch layout and batch size, or why
    there is none."""

    run: Callable[..., Any] | None
    why: str
    checked: bool = True  # False: no sample could be compared; used once, not kept
    out_shape: tuple[int, ...] = ()


#: Programs per captured graph module (it changes when Dynamo re-traces ``func``).
_PROGRAMS: weakref.WeakKeyDictionary[Any, dict[Any, _Program]] = weakref.WeakKeyDictionary()


def _captured(call: Call) -> capture.Captured:
    """The capture of ``func`` for this call (raises ``Unsupported`` where there is no graph
    or an argument's path has an op without a rule)."""
    if in_transform(call.args):
        raise Unsupported("no closed form inside a torch.func transform")
    shapes = [call.sample_shape(i) for i in range(len(call.args))]
    flags = [d is not None for d in call.in_dims]
    got = capture.capture(call.func, shapes, call.dtype, call.device, flags)
    tg = got.graph
    if tg.gm is None:
        raise Unsupported(f"tracing failed ({tg.error})")
    for a in call.argnums:
        an = tg.analysis(a)
        if not an.ok:
            raise Unsupported(an.reason)
    return got


def _key(call: Call) -> tuple[Any, ...]:
    return (call.argnums, tuple(d is not None for d in call.in_dims), call.batch_size or 0)


def _cached(call: Call) -> tuple[_Program, capture.Captured] | None:
    """The checked program for this call's captured graph, if one was built (no probe)."""
    try:
        got = _captured(call)
    except Unsupported:
        return None
    assert got.graph.gm is not None
    prog = _PROGRAMS.get(got.graph.gm, {}).get(_key(call))
    if prog is None or prog.run is None or not prog.checked:
        return None
    return prog, got


def closed_form(call: Call, out_shape: tuple[int, ...]) -> list[torch.Tensor]:
    """The Hessian blocks from the second-order closed form (raises ``Unsupported``).

    ``call`` has a batch (``batch_size`` set). Returns blocks ``(B, *out, *in_i, *in_j)`` in
    row-major order of ``(i, j)``.
    """
    got = _captured(call)
    assert got.graph.gm is not None
    programs = _PROGRAMS.setdefault(got.graph.gm, {})
    prog = programs.get(_key(call))
    if prog is None:
        args = [call.moved(i) for i in range(len(call.args))]
        _value_check(call, got.graph, got.lifted, args)
        prog = _build(call, got.graph, got.lifted, args, out_shape)
        if prog.checked:
            programs[_key(call)] = prog
    if prog.run is None:
        raise Unsupported(prog.why)
    if not prog.checked:
        raise Unsupported("no sample of the example was finite to check the program on")
    return _run_program(call, prog, got)


def _run_program(call: Call, prog: _Program, got: capture.Captured) -> list[torch.Tensor]:
    """Run a checked program: the value check on the first sample, the program, and the
    finiteness check of its result (a non-finite value: ``Unsupported``, autodiff answers)."""
    assert prog.run is not None
    args = [call.moved(i) for i in range(len(call.args))]
    _value_check(call, got.graph, got.lifted, args)
    with torch.no_grad():
        blocks = list(prog.run(*args, *got.lifted))
        # one reduction per block: inf or NaN anywhere makes the sum non-finite (an overflow
        # of the sum itself only sends a finite result to autodiff)
        finite = all(bool(torch.isfinite(H.sum())) for H in blocks)
    if not finite:
        raise Unsupported("a non-finite value: autodiff answers")
    return blocks


def _value_check(
    call: Call,
    tg: tracing.TracedGraph,
    lifted: Sequence[torch.Tensor],
    args: Sequence[torch.Tensor],
) -> None:
    """``func`` and its captured graph agree on the first sample (NOTE [The value check] in
    :mod:`jacbatch.methods.traced`)."""
    from .prepared import graph_function

    first = [x[0] if d is not None else x for x, d in zip(args, call.in_dims, strict=True)]
    with torch.no_grad():
        want = call.func(*first)
        have = graph_function(tg, lifted)(*first)
    if not isinstance(want, torch.Tensor) or want.shape != have.shape:
        raise Unsupported("the captured graph no longer computes what func computes")
    want = want.to(have.dtype)
    eps = torch.finfo(have.dtype).eps
    scale = float(want.abs().nan_to_num(0.0, 0.0, 0.0).max()) if want.numel() else 0.0
    close = (want - have).abs() <= 1e3 * eps * max(1.0, scale)
    if not bool((close | (want.isnan() & have.isnan())).all()):
        raise Unsupported("the captured graph no longer computes what func computes")


@contextlib.contextmanager
def _unchecked() -> Iterator[None]:
    """The linear-algebra rules skip their singularity checks while a program is traced (a
    singular matrix gives a non-finite result, which every call checks for)."""
    linalg.UNCHECKED.on = True
    try:
        yield
    finally:
        linalg.UNCHECKED.on = False


def _trace_writes(
    fn: Callable[..., Any], examples: Sequence[torch.Tensor]
) -> tuple[torch.fx.GraphModule | None, str | None]:
    """``make_fx(fn)`` in fake mode, keeping the writer's in-place writes into fresh buffers
    (the program is run, never differentiated: as :mod:`jacbatch.prepared` traces plans)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with capture._LOCK, _unchecked(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gm = make_fx(fn, tracing_mode="fake", _allow_non_fake_inputs=True)(*examples)
    except Exception as err:  # a value-dependent step, an op the trace cannot follow
        return None, tracing._first_line(err)
    return gm, None


def _build(
    call: Call,
    tg: tracing.TracedGraph,
    lifted: Sequence[torch.Tensor],
    args: Sequence[torch.Tensor],
    out_shape: tuple[int, ...],
) -> _Program:
    """Trace the first-derivative programs, their Jacobians and the Hessian program; check it."""
    n = len(call.args)
    shapes = [call.sample_shape(i) for i in range(n)]
    B = call.batch_size or 0
    first = [x[0] if d is not None else x for x, d in zip(args, call.in_dims, strict=True)]
    one = tracing.TracedGraph(tg.gm, None, (False,) * len(tg.batched), tg.inputs)
    seconds = []
    for a in call.argnums:

        def jac(*xs: torch.Tensor, a: int = a) -> torch.Tensor:
            terms = tracing.jacobian_terms(one, [a], list(xs), 1)[0]
            return write.dense(terms, out_shape, shapes[a], 1, xs[a])[0]

        with capture._LOCK, _unchecked():  # make_fx's tracing flag: see jacbatch.prepared
            gm, error = tracing.to_aten(jac, [*first, *lifted])
        if gm is None:
            return _Program(None, f"the Jacobian program does not trace ({error})")
        gm.graph.eliminate_dead_code()
        gm.recompile()
        batched = (*[d is not None for d in call.in_dims], *[False] * len(lifted))
        g = tracing.TracedGraph(gm, None, batched, None)
        for b in call.argnums:
            an = g.analysis(b)
            if not an.ok:
                return _Program(None, f"the Jacobian program has no closed form ({an.reason})")
        seconds.append((a, g))

    def program(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        blocks = []
        for a, g in seconds:
            all_terms = tracing.jacobian_terms(g, call.argnums, list(xs), B)
            for b, terms in zip(call.argnums, all_terms, strict=True):
                rows = (*out_shape, *shapes[a])
                Y = torch.empty((B, *rows, *shapes[b]), dtype=call.dtype, device=call.device)
                blocks.append(write.materialize(terms, rows, shapes[b], Y))
        return tuple(blocks)

    gm, error = _trace_writes(program, [*args, *lifted])
    if gm is None:
        return _Program(None, f"the Hessian program does not trace ({error})")
    gm.graph.eliminate_dead_code()
    gm.recompile()
    passes.shared_bmm_to_mm(gm)
    passes.fold_scalings(gm)
    passes.drop_unit_factors(gm)
    passes.compute_into_result(gm)
    passes.sum_of_products_in_place(gm)
    with torch.no_grad():
        got = gm(*args, *lifted)
    k = min(B, _CHECKED_SAMPLES)
    sub = Call(
        call.func, tuple(x[:k] if d is not None else x for x, d in zip(args, call.in_dims, strict=True)),
        tuple(0 if d is not None else None for d in call.in_dims), call.argnums,
        call.tuple_argnums, k, call.dtype, call.device,
    )  # fmt: skip
    want = autodiff(sub, "jacrev")
    compared = 0
    for G, W in zip(got, want, strict=True):
        if G.shape[1:] != W.shape[1:] or G.dtype != W.dtype:
            return _Program(None, "the Hessian program disagreed with autodiff (shape)")
        for s in range(k):  # samples that are not finite are left to autodiff on every call
            g, w = G[s], W[s]
            if not bool(torch.isfinite(g).all() & torch.isfinite(w).all()):
                continue
            eps = torch.finfo(w.dtype).eps
            scale = float(w.abs().max()) if w.numel() else 0.0
            if not bool(((g - w).abs() <= _AGREE_ULPS * eps * max(1.0, scale)).all()):
                return _Program(None, "the Hessian program disagreed with autodiff")
            compared += 1
    ops = sum(nd.op == "call_function" for nd in gm.graph.nodes)
    return _Program(gm, f"aten program ({ops} ops)", compared > 0, out_shape)


__all__ = ["METHODS", "autodiff", "closed_form", "hessian"]
