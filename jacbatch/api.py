"""The one dispatch point: :func:`jacobian`, :func:`explain` and :func:`check`."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _validation as V
from . import rules
from .methods import closed_form, functorch, vjp

ROUTES: tuple[str, ...] = ("closed_form", "jacrev", "jacfwd", "vjp")

# Functions whose forward vmap rejected once: "auto" goes straight to the vjp route for them.
_VMAP_REJECTED: weakref.WeakSet[Any] = weakref.WeakSet()


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
    """

    steps: tuple[Step, ...]
    batch_size: int | None
    out_shape: tuple[int, ...]
    in_shapes: tuple[tuple[int, ...], ...]
    notes: tuple[str, ...] = field(default=())

    def __str__(self) -> str:
        batch = "no batch" if self.batch_size is None else f"B={self.batch_size}"
        lines = [f"jacobian plan ({batch}, out {self.out_shape}, in {list(self.in_shapes)}):"]
        for s in self.steps:
            lines.append(f"  argnums {s.argnums}: {s.method} — {s.reason}")
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)


#: Per-sample Jacobians with at least this many entries go to the vjp route rather than jacrev.
LARGE_JACOBIAN = 2**20


def choose_autodiff(in_numel: int, out_numel: int) -> tuple[str, str]:
    """The autodiff route expected to be fastest for one sample's sizes, with the reason.

    * A scalar output needs one reverse pass: the vjp route does it for the whole batch with
      one plain ``torch.autograd.grad`` call, without vmap's batching overhead.
    * Fewer inputs than outputs: forward mode (one pass per input element, vectorized).
    * A large per-sample Jacobian (``out_numel * in_numel >= LARGE_JACOBIAN``): ``vmap(jacrev)``
      materializes about three times the Jacobian in intermediates, and beyond the caches that
      traffic dominates; the vjp route runs one backward pass per output element for the whole
      batch and writes each row once (peak memory about the Jacobian itself).
    * Otherwise reverse mode (one vectorized pass per output element; ties go to jacrev).

    Example:
        >>> [choose_autodiff(i, o)[0] for i, o in [(1024, 1), (4, 1024), (64, 64), (1024, 1024)]]
        ['vjp', 'jacfwd', 'jacrev', 'vjp']
    """
    if out_numel == 1:
        return "vjp", "scalar output: one backward pass for the whole batch"
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
) -> tuple[Step, ...]:
    """``method="auto"`` as a pure function of the function and the per-sample sizes."""
    with_rule = tuple(a for a in argnums if rules.lookup(func, a) is not None)
    without = tuple(a for a in argnums if a not in with_rule)
    steps = []
    if with_rule:
        steps.append(Step("closed_form", with_rule, "registered closed-form rule, no autodiff"))
    if without:
        if func in _VMAP_REJECTED:
            steps.append(
                Step("vjp", without, "vmap rejected this function before; explicit VJP loop")
            )
        else:
            n_in = sum(n for a, n in zip(argnums, in_numels, strict=True) if a in without)
            method, reason = choose_autodiff(n_in, out_numel)
            steps.append(Step(method, without, f"no closed form; {reason}"))
    return tuple(steps)


def _probe_output(call: V.Call) -> tuple[int, ...]:
    """Per-sample output shape, found without heavy work.

    Tries meta tensors first (shapes only); functions that need data (``.item()``, closures over
    real tensors) are evaluated once on the first sample instead.
    """
    where = "jacobian"
    sample_shapes = [call.sample_shape(i) for i in range(len(call.args))]
    try:
        with torch.no_grad():
            out = call.func(
                *(torch.empty(s, dtype=call.dtype, device="meta") for s in sample_shapes)
            )
    except Exception:
        if call.batch_size == 0:
            sample = [torch.zeros(s, dtype=call.dtype, device=call.device) for s in sample_shapes]
        else:
            sample = [
                a if d is None else a.select(d, 0)
                for a, d in zip(call.args, call.in_dims, strict=True)
            ]
        with torch.no_grad():
            out = call.func(*sample)
    if not isinstance(out, torch.Tensor):
        V.output_error(where, out)
    if not out.dtype.is_floating_point:
        V.output_dtype_error(where, out.dtype)
    return tuple(out.shape)


def _plan(call: V.Call, method: str, out_shape: tuple[int, ...]) -> Plan:
    in_shapes = tuple(call.sample_shape(a) for a in call.argnums)
    if method == "auto":
        steps = plan_auto(
            call.func, call.argnums, [math.prod(s) for s in in_shapes], math.prod(out_shape)
        )
    elif method == "closed_form":
        for a in call.argnums:
            if rules.lookup(call.func, a) is None:
                V.no_rule_error("jacobian", call.func, a, rules.available())
        steps = (Step("closed_form", call.argnums, "requested"),)
    else:
        steps = (Step(method, call.argnums, "requested"),)
    return Plan(steps, call.batch_size, out_shape, in_shapes)


def _run_step(
    call: V.Call,
    step: Step,
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    layout: str | None,
    outs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    if step.method == "closed_form":
        return closed_form.compute(call, step.argnums, out_shape, layout, outs)
    if step.method in ("jacrev", "jacfwd"):
        mode = "rev" if step.method == "jacrev" else "fwd"
        return functorch.compute(call, step.argnums, mode, chunk_size, out_shape, layout, outs)
    return vjp.compute(call, step.argnums, out_shape, layout, outs)


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


def jacobian(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
    vec: str | None = None,
    chunk_size: int | None = None,
    out: torch.Tensor | tuple[torch.Tensor, ...] | None = None,
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
        method: ``"auto"`` (closed form where a rule exists, else the autodiff route expected to
            be fastest for the shapes), ``"closed_form"``, ``"jacrev"``, ``"jacfwd"`` or ``"vjp"``.
        vec: ``None`` keeps the layout ``(B, *out_shape, *in_shape)``; ``"row"`` / ``"col"``
            flatten to ``(B, out_numel, in_numel)`` in row-major (PyTorch) or column-major order.
        chunk_size: at most this many Jacobian rows (jacrev) or columns (jacfwd) per vectorized
            pass. The closed form writes the result directly and the vjp route already computes
            one row per backward pass, so neither is affected by it.
        out: a contiguous tensor of the result's shape, dtype and device to write into (a tuple
            of them for tuple ``argnums``).

    Returns:
        ``(B, *out_shape, *in_shape)`` (no ``B`` without a batch), or ``(B, out_numel,
        in_numel)`` with ``vec``; a scalar output gives gradients ``(B, *in_shape)``. A tuple of
        those for tuple ``argnums``. The result carries no autograd graph.

    Example:
        >>> A = torch.tensor([[1., 2., 3.], [4., 5., 6.]])
        >>> W, B = torch.zeros(3, 2), torch.zeros(2)
        >>> jacobian(affine, A, W, B, argnums=1, in_dims=None, vec="row")
        tensor([[1., 0., 2., 0., 3., 0.],
                [0., 1., 0., 2., 0., 3.],
                [4., 0., 5., 0., 6., 0.],
                [0., 4., 0., 5., 0., 6.]])
    """
    where = "jacobian"
    call = V.normalize_call(where, func, args, argnums, in_dims)
    method = V.check_method(where, method)
    layout = V.check_vec(where, vec)
    chunk_size = V.check_chunk_size(where, chunk_size)
    out_shape = _probe_output(call)
    plan = _plan(call, method, out_shape)

    shapes = [_result_shape(call, a, out_shape, layout) for a in call.argnums]
    bufs: list[torch.Tensor | None]
    if out is None:
        bufs = [None] * len(call.argnums)
    else:
        outs_in = out if isinstance(out, tuple) else (out,)
        if isinstance(out, tuple) != call.tuple_argnums or len(outs_in) != len(shapes):
            raise TypeError(
                f"{where}: expected out to be "
                + ("a tuple of tensors, one per argnum" if call.tuple_argnums else "one tensor")
                + f", got {type(out).__name__}."
            )
        bufs = [
            V.check_out(where, o, s, call.dtype, call.device)
            for o, s in zip(outs_in, shapes, strict=True)
        ]

    results: dict[int, torch.Tensor] = {}
    if any(math.prod(s) == 0 for s in shapes):
        # Empty Jacobians need no route; fill what is empty, compute the rest.
        for a, s, b in zip(call.argnums, shapes, bufs, strict=True):
            if math.prod(s) == 0:
                results[a] = (
                    b if b is not None else torch.empty(s, dtype=call.dtype, device=call.device)
                )

    lead = 0 if call.batched else 1  # routes always return a batch dimension
    for step in plan.steps:
        todo = tuple(a for a in step.argnums if a not in results)
        if not todo:
            continue
        step_bufs = [
            None
            if bufs[call.argnums.index(a)] is None
            else _with_batch(bufs[call.argnums.index(a)], lead)
            for a in todo
        ]
        sub = Step(step.method, todo, step.reason)
        try:
            jacs = _run_step(call, sub, chunk_size, out_shape, layout, step_bufs)
        except (RuntimeError, NotImplementedError) as err:
            if method != "auto" or step.method not in ("jacrev", "jacfwd"):
                raise
            # vmap rejects some functions (.item(), control flow on values): fall back.
            try:
                jacs = _run_step(
                    call, Step("vjp", todo, "fallback"), None, out_shape, layout, step_bufs
                )
            except Exception as err2:
                raise err2 from err
            _VMAP_REJECTED.add(call.func)
        for a, J in zip(todo, jacs, strict=True):
            results[a] = J if call.batched else J.squeeze(0)

    final = tuple(results[a] for a in call.argnums)
    return final if call.tuple_argnums else final[0]


def _with_batch(buf: torch.Tensor | None, lead: int) -> torch.Tensor | None:
    if buf is None:
        return None
    return buf.unsqueeze(0) if lead else buf


def explain(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    method: str = "auto",
) -> Plan:
    """Say which route :func:`jacobian` would run for this call, and why, without running it.

    Args:
        func, args, argnums, in_dims, method: as in :func:`jacobian`.

    Returns:
        A :class:`Plan`; ``str(plan)`` is a readable summary.

    Example:
        >>> A, W, B = torch.ones(2, 3), torch.ones(3, 2), torch.ones(2)
        >>> print(explain(affine, A, W, B, argnums=1, in_dims=None))
        jacobian plan (no batch, out (2, 2), in [(3, 2)]):
          argnums (1,): closed_form — registered closed-form rule, no autodiff
    """
    where = "explain"
    call = V.normalize_call(where, func, args, argnums, in_dims)
    method = V.check_method(where, method)
    return _plan(call, method, _probe_output(call))


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
    """

    ok: bool
    routes: tuple[str, ...]
    max_diff: dict[tuple[str, str], float]
    failures: tuple[tuple[str, str], ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        names = self.routes
        width = max(12, *(len(n) for n in names)) + 2
        head = " " * width + "".join(f"{n:>{width}}" for n in names)
        lines = [f"jacbatch.check ({self.dtype}): " + ("OK" if self.ok else "MISMATCH"), head]
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
        return "\n".join(lines)


def check(
    func: Callable[..., torch.Tensor],
    *args: torch.Tensor,
    argnums: int | tuple[int, ...] = 0,
    in_dims: int | tuple[int | None, ...] | None = 0,
    finite_difference: bool = True,
) -> CheckReport:
    """Run every applicable route (and a central finite difference) and compare them pairwise.

    Args:
        func, args, argnums, in_dims: as in :func:`jacobian`.
        finite_difference: also compare with a float64 central finite difference (costs two
            batched forward passes per input element).

    Returns:
        A :class:`CheckReport`; ``report.ok`` says whether all routes agree, ``str(report)`` is a
        table of pairwise max absolute differences.

    Example:
        >>> A, W, B = torch.randn(4, 2, 3), torch.randn(3, 2), torch.randn(2)
        >>> check(affine, A, W, B, argnums=1, in_dims=(0, None, None)).ok
        True
    """
    from .testing import FINITE_DIFFERENCE_TOLERANCE, finite_difference_jacobian, tolerance

    where = "check"
    call = V.normalize_call(where, func, args, argnums, in_dims)
    _probe_output(call)
    routes = [r for r in ROUTES if r != "closed_form" or closed_form.has_rules(call, call.argnums)]
    jacs: dict[str, list[torch.Tensor]] = {}
    for r in routes:
        res = jacobian(func, *args, argnums=call.argnums, in_dims=call.in_dims, method=r, vec="row")
        jacs[r] = [J.to(torch.float64).reshape(-1, *J.shape[-2:]) for J in res]
    if finite_difference:
        from .methods import batched_args

        bargs, flags, B = batched_args(call)
        fds = []
        for a in call.argnums:
            xs = list(bargs)
            fl = list(flags)
            if not fl[a]:
                xs[a], fl[a] = xs[a].unsqueeze(0).expand(B, *xs[a].shape), True
            fds.append(finite_difference_jacobian(func, xs, fl, a))
        jacs["finite_difference"] = fds
    names = tuple(jacs)
    rtol, atol = tolerance(call.dtype)
    frtol, fatol = FINITE_DIFFERENCE_TOLERANCE
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
    return CheckReport(not failures, names, max_diff, tuple(failures), call.dtype)


__all__ = [
    "ROUTES",
    "CheckReport",
    "Plan",
    "Step",
    "check",
    "choose_autodiff",
    "explain",
    "jacobian",
    "plan_auto",
]
