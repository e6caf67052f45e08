"""The traced route: closed forms for plain torch code, composed from op rules.

The function is traced once per (shapes, dtype, device, batched arguments) into an aten graph
(:mod:`jacbatch.tracing`); every node on the path from the differentiated argument to the output
has a closed-form rule (:mod:`jacbatch.rules.ops`). The graph is evaluated for the whole batch
under ``vmap`` (forward values only, no autograd graph), the rules' lettered terms are composed
by the chain rule (:mod:`jacbatch.rules.terms`) and the result is written once, directly in the
requested layout. A result that must be differentiable is evaluated on the caller's tensors and
written out of place instead (:func:`jacbatch.rules.terms.dense`). Anything the rules do not
cover raises :class:`~jacbatch.rules.terms.Unsupported`, and :func:`jacbatch.jacobian` falls
back to autodiff.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import tracing
from .._validation import Call
from ..rules import terms
from . import batched_args, finish, in_transform


def traced_graph(call: Call) -> tracing.TracedGraph:
    """The (cached) traced graph for this call's per-sample shapes, dtype, device and batching."""
    shapes = [call.sample_shape(i) for i in range(len(call.args))]
    return tracing.trace(
        call.func, shapes, call.dtype, call.device, [d is not None for d in call.in_dims]
    )


def compute(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    layout: str | None,
    outs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Jacobians w.r.t. ``args[a]`` for ``a in argnums`` from the traced graph's rules.

    Returns:
        Per argnum: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` (``layout``).

    Raises:
        terms.Unsupported: some node has no rule (or a rule does not cover its values), or a
            torch.func transform is running (tracing would see its wrapped values).
    """
    if in_transform(call.args):
        raise terms.Unsupported("no traced closed form inside a torch.func transform")
    tg = traced_graph(call)
    args, _, B = batched_args(call)
    results = []
    if call.create_graph:
        # A differentiable result (NOTE [Differentiable results] in jacbatch.methods): the graph
        # is evaluated on the caller's tensors and the terms composed and written out of place,
        # so autograd (or an outer torch.func transform) differentiates the closed form itself.
        with torch.enable_grad():
            all_terms = tracing.jacobian_terms(tg, argnums, args, B)
            for a, ts, buf in zip(argnums, all_terms, outs, strict=True):
                in_shape = call.sample_shape(a)
                J = terms.dense(ts, out_shape, in_shape, B, args[a])
                results.append(finish(J, len(out_shape), len(in_shape), layout, buf))
        return results
    with torch.no_grad():
        args = [x.detach() for x in args]
        all_terms = tracing.jacobian_terms(tg, argnums, args, B)
        for a, ts, buf in zip(argnums, all_terms, outs, strict=True):
            in_shape = call.sample_shape(a)
            Y, natural = _result(call, B, out_shape, in_shape, layout, buf)
            terms.materialize(ts, out_shape, in_shape, natural)
            results.append(Y)
    return results


def _result(
    call: Call,
    B: int,
    out_shape: tuple[int, ...],
    in_shape: tuple[int, ...],
    layout: str | None,
    buf: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The result tensor and a ``(B, *out_shape, *in_shape)`` view of it to write into."""
    o = math.prod(out_shape)
    i = math.prod(in_shape)
    shape = (B, *out_shape, *in_shape) if layout is None else (B, o, i)
    Y = buf if buf is not None else torch.empty(shape, dtype=call.dtype, device=call.device)
    if layout is None:
        return Y, Y
    if layout == "row":
        return Y, Y.view(B, *out_shape, *in_shape)
    # column-major: both axes' indices are reversed
    no, ni = len(out_shape), len(in_shape)
    rev = Y.view(B, *reversed(out_shape), *reversed(in_shape))
    perm = (0, *(no - k for k in range(no)), *(no + ni - k for k in range(ni)))
    return Y, rev.permute(*perm)
