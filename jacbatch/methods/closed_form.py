"""The closed-form route: registered rules, no autodiff.

Runs every rule under ``torch.no_grad()`` on detached arguments, so no graph is built (and no
op pays for autograd's bookkeeping), unless the result must be
differentiable (``call.create_graph``, NOTE [Differentiable results] in :mod:`jacbatch.methods`):
the rules are torch ops on the arguments, so they then run on the caller's tensors themselves,
out of place, and autograd (or an outer torch.func transform) differentiates them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .. import _validation as V
from .. import rules
from ..call import Call
from . import batched_args


def has_rules(call: Call, argnums: Sequence[int]) -> bool:
    return all(rules.lookup(call.func, a) is not None for a in argnums)


def compute(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    layout: str | None,
    outs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Jacobians w.r.t. ``args[a]`` for ``a in argnums`` via the registered rules.

    Returns:
        Per argnum: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` (``layout``).
    """
    found = []
    for a in argnums:
        rule = rules.lookup(call.func, a)
        if rule is None:
            V.no_rule_error("jacobian", call.func, a, rules.available())
        found.append(rule)
    args, flags, B = batched_args(call)
    graph = call.create_graph
    if not graph:
        args = [x.detach() for x in args]
    order = "col" if layout == "col" else "row"
    results = []
    with torch.enable_grad() if graph else torch.no_grad():
        for a, rule, buf in zip(argnums, found, outs, strict=True):
            in_shape = call.sample_shape(a)
            n_in = math.prod(in_shape)
            # with a graph the rule writes out of place; the result is then copied into buf
            flat_buf = None if buf is None or n_in == 0 or graph else buf.view(B, -1, n_in)
            J = rule(args, flags, B, order, flat_buf)  # (B, o, i)
            if layout is None:
                J = J.view(B, *out_shape, *in_shape)
            if buf is not None:
                if graph or J.data_ptr() != buf.data_ptr():
                    buf.copy_(J.view(buf.shape))
                J = buf
            results.append(J)
    return results
