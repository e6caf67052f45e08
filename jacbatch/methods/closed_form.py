"""The closed-form route for registered functions: their rules' terms, written by the one writer.

A registered rule (:mod:`jacbatch.rules`, NOTE [Why affine keeps a registered rule]) returns
lettered terms from the arguments alone; :func:`jacbatch.rules.write.materialize` writes them in
the requested ``vec``, under ``torch.no_grad()`` on detached arguments, so no graph is built. A
result that must be differentiable (``call.create_graph``, NOTE [Differentiable results] in
:mod:`jacbatch.methods`), or whose arguments are an outer torch.func transform's wrapped values
(which cannot be written into a plain buffer), is computed out of place from the caller's tensors instead
(:func:`jacbatch.rules.write.dense`), so autograd (or an outer torch.func transform)
differentiates the closed form itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import _validation as V
from .. import rules
from ..call import Call
from ..rules import write
from ..rules.terms import keeps_graph
from . import Route, batched_args, finish, plain
from .traced import _result


def has_rules(call: Call, argnums: Sequence[int]) -> bool:
    return all(rules.lookup(call.func, a) is not None for a in argnums)


def compute(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Jacobians w.r.t. ``args[a]`` for ``a in argnums`` via the registered rules.

    Returns:
        Per argnum: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` (``vec``).
    """
    found = []
    for a in argnums:
        rule = rules.lookup(call.func, a)
        if rule is None:
            V.no_rule_error("jacobian", call.func, a, rules.available())
        found.append(rule)
    args, flags, B = batched_args(call)
    results = []
    if call.create_graph or keeps_graph(*args):  # also: wrapped values of an outer transform
        with torch.enable_grad() if call.create_graph else torch.no_grad():
            for a, rule, buf in zip(argnums, found, outs, strict=True):
                in_shape = call.sample_shape(a)
                J = write.dense(rule(args, flags), out_shape, in_shape, B, args[a])
                results.append(finish(J, len(out_shape), len(in_shape), vec, buf))
        return results
    with torch.no_grad():
        args = [x.detach() for x in args]
        for a, rule, buf in zip(argnums, found, outs, strict=True):
            in_shape = call.sample_shape(a)
            Y, natural = _result(call, B, out_shape, in_shape, vec, buf)
            write.materialize(rule(args, flags), out_shape, in_shape, natural)
            results.append(Y)
    return results


#: Internal: planned ahead of tracing where a rule is registered (``method="closed_form"`` or
#: ``"auto"``); plans name it ``closed_form``.
ROUTE: Route = Route("closed_form", plain(compute), fallback_multiple=0.1)
