"""One module per route, and the route registry. Every route computes, for a validated
:class:`~jacbatch.call.Call` and a list of argnums, one Jacobian per argnum with a leading batch dimension (``B = 1`` for an
unbatched call; :mod:`jacbatch.api` removes it), in the requested ``vec``:

* ``vec=None``: ``(B, *out_shape, *in_shape)``
* ``vec="row"`` / ``"col"``: ``(B, out_numel, in_numel)`` in that vec order.

``outs`` holds, per argnum, ``None`` or a caller's contiguous buffer of exactly that shape, which
the route fills and returns.

NOTE [Routes: one protocol, one registry]
    A route is a :class:`Route`: its ``name`` (as plans and reports show it), the ``method``
    a caller asks for it by (``None`` for internal routes the planner alone picks), ``compute``
    (the Jacobians, as described above), ``applies`` (whether it can run a probed call at all,
    for :func:`jacbatch.check`), and its memory hooks: ``vectorized`` (it takes ``chunk_size``
    and returns each chunk's Jacobian as a temporary, so the planner may chunk rows or columns
    and counts the chunk's output) and ``fallback_multiple`` (working memory as a multiple of
    the result when the route cannot be simulated on meta tensors; NOTE [Estimating peak
    memory by running the route on meta tensors] in :mod:`jacbatch.memory`). Each route module
    declares its routes at its end; :data:`ROUTES`, at the end of this module, is the registry:
    every other module (the planner, :func:`jacbatch.request.execute`, ``check``, the
    validation of ``method``, :func:`names` for reports and the CLI) reads it.

    The registered routes: ``traced`` (asked for as ``method="closed_form"``: closed forms
    composed from op rules over the traced graph, :mod:`.traced`), ``jacrev`` and ``jacfwd``
    (torch.func under vmap, :mod:`.functorch`: one module, two modes of one computation),
    ``vjp`` and the internal ``per_sample`` (explicit VJP loops, the latter never under vmap,
    for the known torch bugs: :mod:`.vjp`), and the internal ``closed_form`` (per-function
    registered rules, planned ahead of tracing: :mod:`.closed_form`; today only
    :func:`jacbatch.affine`'s, NOTE [Why affine keeps a registered rule] in
    :mod:`jacbatch.rules.affine`), and the internal ``batched_rev``, ``batched_fwd`` and
    ``batched_vjp`` for functions that map a batch to a batch (``batched=True``: the planner
    maps ``method="jacrev"``, ``"jacfwd"``, ``"vjp"`` to them, :mod:`.batched`).

    Adding a route is one module and one registry line. A route that differentiates by
    complex-step, say, in ``jacbatch/methods/complex_step.py``::

        from ..call import Call
        from . import Route, batched_args, finish

        def compute(call, argnums, out_shape, vec, outs, *, chunk_size=None, max_rows=None):
            args, flags, B = batched_args(call)
            jacs = ...  # per argnum (B, *out_shape, *in_shape)
            return [
                finish(J, len(out_shape), len(call.sample_shape(a)), vec, buf)
                for J, a, buf in zip(jacs, argnums, outs, strict=True)
            ]

        ROUTE = Route("complex_step", compute, method="complex_step", fallback_multiple=2.0)

    and here ``ROUTES = (..., complex_step.ROUTE)``. ``jacobian(f, X,
    method="complex_step")`` then runs it, ``explain`` shows it, ``check`` compares it with
    the others and ``names()`` lists it. The planner of ``method="auto"`` picks among the
    routes it knows the costs of (:func:`jacbatch.plan.choose_autodiff`); a new route joins
    it only where that function says when it is the fastest.

NOTE [Differentiable results: when a Jacobian keeps its graph]
    A Jacobian is itself a function of the inputs (and of the tensors ``func`` closes over), so
    autograd and torch.func may differentiate it again: a Hessian as the Jacobian of a Jacobian,
    a Jacobian penalty in a loss, a contractive autoencoder. :func:`needs_graph` decides, once
    per call, whether the result must stay connected (``call.create_graph``):

    * ``create_graph=True`` was passed (as ``torch.autograd.functional.jacobian``'s);
    * a torch.func transform is running (``grad``, ``vjp``, ``jacrev``, ``jacfwd``, ``vmap``:
      a functorch level is active or an argument is a functorch-wrapped tensor), a forward-mode
      AD level is active (``torch.autograd.forward_ad``: tangents ride on the arguments or on
      tensors ``func`` closes over, and ``detach`` or ``out=`` would drop them), or the call is
      being traced (fake tensors, ``torch.compile``), where a ``detach`` would be recorded as a
      stop-gradient, or probed (NOTE [The probe] in :mod:`jacbatch._probe`);
    * grad mode is on (and inference mode off) and an argument, or a tensor ``func`` reads (a
      closed-over parameter, seen by the probe), requires grad, as any torch op would record.

    Otherwise the routes keep the fast path: detached arguments, in-place writes, no graph.
    With a graph, every route computes out of place from the caller's tensors themselves: the
    torch.func routes do not detach, the vjp route pulls back through ``torch.func.vjp`` (which
    composes with outer transforms and with autograd), the closed forms are torch ops on the
    inputs, evaluated and materialized out of place. Results are written into an ``out=``
    buffer with ``copy_`` (autograd records it); inside a torch.func transform there is no
    buffer, since a plain tensor cannot hold a transformed value.

NOTE [Inference mode]
    Under ``torch.inference_mode()`` autograd records nothing, and inference tensors cannot be
    saved for backward. The vjp route therefore runs its forward and backward passes under
    ``torch.inference_mode(False)`` on clones of the arguments that are inference tensors (only
    those); the torch.func routes do not need it, and the closed forms use no autograd. A tensor
    created under inference mode that ``func`` closes over cannot be cloned by jacbatch, and
    autograd refuses to save it; ``torch.func.vjp`` accepts it, so the vjp route pulls back
    through that instead when autograd refuses. Results computed under inference mode carry no
    graph.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.autograd import forward_ad

from .. import _probe, conventions
from ..call import Call


@dataclass(frozen=True)
class Route:
    """One way of computing Jacobians; see NOTE [Routes: one protocol, one registry].

    Attributes:
        name: the route as plans and reports name it (``Step.route``).
        compute: ``compute(call, argnums, out_shape, vec, outs, *, chunk_size, max_rows)``
            -> per argnum ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)``.
            ``chunk_size`` bounds the rows or columns of one vectorized pass (routes that are
            not ``vectorized`` ignore it); ``max_rows`` stops a row-by-row route early (memory
            simulation on meta tensors only).
        method: the value of ``method=`` that asks for it; ``None`` for an internal route.
        applies: ``applies(call)`` for a probed call: whether the route can run it at all
            (``None``: always).
        vectorized: takes ``chunk_size`` and returns a chunk's Jacobian as a temporary that
            is copied into the result.
        fallback_multiple: working memory as a multiple of the result where the route cannot
            be simulated on meta tensors.
    """

    name: str
    compute: Callable[..., list[torch.Tensor]]
    method: str | None = None
    applies: Callable[[Call], bool] | None = None
    vectorized: bool = False
    fallback_multiple: float = 4.0


def plain(fn: Callable[..., list[torch.Tensor]]) -> Callable[..., list[torch.Tensor]]:
    """A route's ``compute`` from ``fn(call, argnums, out_shape, vec, outs)``, for a route that
    needs neither ``chunk_size`` (it does not vectorize over rows or columns) nor ``max_rows``."""

    def compute(
        call: Call,
        argnums: Sequence[int],
        out_shape: tuple[int, ...],
        vec: str | None,
        outs: Sequence[torch.Tensor | None],
        *,
        chunk_size: int | None = None,
        max_rows: int | None = None,
    ) -> list[torch.Tensor]:
        return fn(call, argnums, out_shape, vec, outs)

    return compute


def route(name: str) -> Route:
    """The registered route called ``name`` (a plan's step name)."""
    return _BY_NAME[name]


def by_method(method: str) -> Route:
    """The registered route a caller asks for with ``method=method``."""
    return _BY_METHOD[method]


def names() -> tuple[str, ...]:
    """The routes a caller may ask for by name besides ``"auto"``, in the order reports list them."""
    return tuple(_BY_METHOD)


def batched_args(call: Call) -> tuple[list[torch.Tensor], list[bool], int]:
    """Arguments with their batch dimension first (shared ones unchanged), flags, and ``B``.

    An unbatched call is treated as a batch of one with every argument shared.
    """
    args = [call.moved(i) for i in range(len(call.args))]
    flags = [d is not None for d in call.in_dims]
    return args, flags, (call.batch_size if call.batch_size is not None else 1)


def finish(
    J: torch.Tensor,
    out_ndim: int,
    in_ndim: int,
    vec: str | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Bring a natural-layout ``(B, *out_shape, *in_shape)`` Jacobian to ``vec`` (into ``out``)."""
    if vec is not None:
        J = conventions.flatten_jacobian(J, out_ndim, in_ndim, vec, batched=True)  # type: ignore[arg-type]
    if out is not None:
        out.copy_(J)
        return out
    return J.contiguous()


def in_transform(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether a torch.func transform is running, or one of ``tensors`` is functorch-wrapped."""
    fc = torch._C._functorch
    if fc.maybe_current_level() is not None:
        return True
    return any(fc.is_functorch_wrapped_tensor(t) for t in tensors)


def being_traced(tensors: Iterable[torch.Tensor]) -> bool:
    """Whether the call is being traced (fake tensors, ``torch.compile``) rather than run."""
    return torch.compiler.is_compiling() or any(isinstance(t, FakeTensor) for t in tensors)


def _dual_level() -> bool:
    """Whether a forward-mode AD level is active (``torch.autograd.forward_ad.dual_level``)."""
    return forward_ad._current_level >= 0


def has_tangents(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether one of ``tensors`` is a forward-mode dual tensor (``torch.autograd.forward_ad``).

    Inside a torch.func transform (whose ``jvp`` uses dual levels itself) this is False: the
    transforms nest forward mode natively.
    """
    if not _dual_level() or in_transform(tensors):
        return False
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def needs_graph(args: Sequence[torch.Tensor], create_graph: bool, reads_grad: bool) -> bool:
    """Whether the Jacobian must stay differentiable; see NOTE [Differentiable results].

    Args:
        args: the caller's arguments.
        create_graph: the caller asked for a differentiable result.
        reads_grad: ``func`` reads a tensor that requires grad (the probe saw one).
    """
    if in_transform(args) or being_traced(args) or _probe.probing() or _dual_level():
        return True
    if torch.is_inference_mode_enabled():
        return False
    if create_graph:
        return True
    return torch.is_grad_enabled() and (reads_grad or any(a.requires_grad for a in args))


def usable(x: torch.Tensor) -> torch.Tensor:
    """``x``, or a normal clone of it when it is an inference tensor (see NOTE [Inference mode]).

    Call under ``torch.inference_mode(False)``.
    """
    return x.clone() if x.is_inference() else x


# ---------------------------------------------------------------------------------------------
# The registry: one line per route (NOTE [Routes: one protocol, one registry])
# ---------------------------------------------------------------------------------------------

from . import batched, closed_form, functorch, traced, vjp  # noqa: E402  (they use the helpers above)

ROUTES: tuple[Route, ...] = (
    traced.ROUTE,
    functorch.JACREV,
    functorch.JACFWD,
    vjp.ROUTE,
    vjp.PER_SAMPLE,
    closed_form.ROUTE,
    batched.REVERSE,
    batched.FORWARD,
    batched.LOOP,
)

_BY_NAME: dict[str, Route] = {r.name: r for r in ROUTES}
_BY_METHOD: dict[str, Route] = {r.method: r for r in ROUTES if r.method is not None}
