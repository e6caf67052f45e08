"""The vjp route: an explicit loop of vector-Jacobian products with one-hot cotangents.

NOTE [One backward pass per output element, for the whole batch]
    Samples are independent, so the batched output ``Y (B, *out_shape)`` depends on sample ``b``'s
    input only through ``Y[b]``. Pulling back the cotangent that is one at flat output index ``k``
    of every sample gives, in one ``torch.autograd.grad`` call, row ``k`` of every sample's
    Jacobian. Shared differentiated arguments are expanded to a batched leaf first, so their
    gradient is per sample instead of summed over the batch. ``out_numel`` backward passes in all,
    not ``B * out_numel``.

    The forward runs under ``torch.func.vmap`` when the function allows it; for functions vmap
    rejects (``.item()``, Python control flow on values) it runs sample by sample and stacks the
    outputs, so the backward passes still cover the whole batch. Any function autograd can
    differentiate works.

NOTE [A None gradient is not a zero]
    ``autograd.grad(..., allow_unused=True)`` returns ``None`` for an argument with no graph path
    to the output. Through ``vmap(f)`` that can be a torch bug rather than independence (the
    chunked ``linear_cross_entropy`` precomputes its gradient and leaves no path under vmap;
    :mod:`jacbatch._torch_bugs`), so a ``None`` seen with the vmapped forward makes the route
    start over with the forward run sample by sample; only a ``None`` from per-sample autograd
    (exactly what ``torch.autograd.functional.jacobian`` sees) is written as zeros.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import torch
from torch.func import vmap

from ..call import Call
from . import Route, batched_args, finish, in_transform, usable


def forward(
    call: Call,
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    B: int,
    per_sample: bool = False,
) -> torch.Tensor:
    """Batched output ``(B, *out_shape)`` with an autograd graph: vmap, else a per-sample loop.

    ``per_sample`` skips vmap (the route for known torch bugs, :mod:`jacbatch._torch_bugs`).
    """
    dims = tuple(0 if f else None for f in batched)
    if not per_sample:
        try:
            return vmap(call.func, in_dims=dims, randomness=call.randomness)(*args)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            pass
    outs = [
        # A sample is a copy, not a view: a func that writes into its argument only for some
        # samples (unseen by the probe) may neither write into the caller's tensor nor into a
        # view of a leaf that requires grad (which autograd refuses).
        call.func(*(x[b].clone() if f else x for x, f in zip(args, batched, strict=True)))
        for b in range(B)
    ]
    shapes = {tuple(o.shape) for o in outs}
    if len(shapes) > 1:
        raise ValueError(
            f"jacobian: expected func to return the same shape for every sample, got {sorted(shapes)}."
        )
    return torch.stack(outs)


def compute(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
    *,
    chunk_size: int | None = None,
    max_rows: int | None = None,
    per_sample: bool = False,
) -> list[torch.Tensor]:
    """Jacobians w.r.t. ``args[a]`` for ``a in argnums`` by ``out_numel`` backward passes.

    ``chunk_size`` is accepted for the route protocol and has no effect: every pass computes
    one row. ``max_rows`` stops after that many rows (memory estimation on meta tensors only).
    ``per_sample`` runs the forward sample by sample, never under vmap: per-sample reverse-mode
    autograd exactly (NOTE [Known torch bugs: one list, consulted by the planner]).

    Returns:
        Per argnum: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` (``vec``).
    """
    if call.create_graph:
        writes_state = call.probe is not None and getattr(call.probe, "writes_state", False)
        if writes_state and not in_transform(call.args):
            # torch.func refuses writes into captured tensors; plain autograd records them
            return _compute_graph_autograd(
                call, argnums, out_shape, vec, outs, max_rows, per_sample
            )
        return _compute_with_graph(call, argnums, out_shape, vec, outs, max_rows, per_sample)
    try:
        return _compute_detached(call, argnums, out_shape, vec, outs, max_rows, per_sample)
    except RuntimeError as err:
        if "Inference tensors cannot be saved for backward" not in str(err):
            raise
    # func closes over a tensor created under inference_mode: autograd cannot save it for
    # backward, torch.func's vjp can (on arguments that carry no graph, so neither does J).
    detached = dataclasses.replace(call, args=tuple(a.detach() for a in call.args))
    return _compute_with_graph(detached, argnums, out_shape, vec, outs, max_rows, per_sample)


def _compute_detached(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
    max_rows: int | None,
    per_sample: bool = False,
) -> list[torch.Tensor]:
    """The vjp route without a graph: ``torch.autograd.grad`` on fresh leaves."""
    # Autograd records nothing under inference mode: run outside it, on normal tensors (NOTE
    # [Inference mode] in jacbatch.methods). Rows go straight into the caller's buffer when its
    # memory order is the rows' order (natural vec or row-major vec) and it can be written
    # outside inference mode; every row is written once, so no zero fill.
    direct = [buf is not None and vec in (None, "row") and not buf.is_inference() for buf in outs]
    with torch.inference_mode(False):
        args, flags, B = batched_args(call)
        args = [usable(x.detach()) for x in args]
        leaves = []
        for a in argnums:
            x = args[a] if flags[a] else args[a].unsqueeze(0).expand(B, *args[a].shape)
            leaf = x.detach().requires_grad_(True)
            args[a], flags[a] = leaf, True
            leaves.append(leaf)

        with torch.enable_grad():
            Y = forward(call, args, flags, B, per_sample)
        o = Y[0].numel() if B > 0 else math.prod(out_shape)
        in_numels = [math.prod(call.sample_shape(a)) for a in argnums]
        rows = [
            buf.view(B, o, n)
            if buf is not None and d
            else torch.empty(B, o, n, dtype=Y.dtype, device=Y.device)
            for n, buf, d in zip(in_numels, outs, direct, strict=True)
        ]

        if Y.requires_grad and B > 0:
            onehot = torch.zeros(B, o, dtype=Y.dtype, device=Y.device)
            rows_run = o if max_rows is None else min(o, max_rows)
            cotangent = onehot.view(Y.shape)
            for k in range(rows_run):
                onehot[:, k] = 1
                grads = torch.autograd.grad(
                    Y, leaves, cotangent, retain_graph=k < rows_run - 1, allow_unused=True
                )
                if k == 0 and not per_sample and any(g is None for g in grads):
                    # No graph path from the vmapped output to an argument: per-sample autograd
                    # decides whether it is truly unused (NOTE [A None gradient is not a zero]).
                    del Y, grads
                    return _compute_detached(
                        call, argnums, out_shape, vec, outs, max_rows, per_sample=True
                    )
                for r, g in zip(rows, grads, strict=True):
                    if g is None:  # per-sample autograd: the function does not use this argument
                        r[:, k].zero_()
                    else:
                        r[:, k].copy_(g.view(B, -1) if g.is_contiguous() else g.reshape(B, -1))
                # Only now: a pass-through backward (e.g. of ``+ b``) returns the cotangent itself.
                onehot[:, k] = 0
        else:  # constant output (or empty batch): a zero Jacobian
            for r in rows:
                r.zero_()

    results = []
    for r, a, buf, d in zip(rows, argnums, outs, direct, strict=True):
        in_shape = call.sample_shape(a)
        J = r.view(B, *out_shape, *in_shape)
        if buf is not None and d:
            results.append(buf)
        else:
            results.append(finish(J, len(out_shape), len(in_shape), vec, buf))
    return results


def _compute_with_graph(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
    max_rows: int | None,
    per_sample: bool = False,
) -> list[torch.Tensor]:
    """The vjp route with a differentiable result (NOTE [Differentiable results] in
    :mod:`jacbatch.methods`).

    The same one pull-back per output element for the whole batch, through ``torch.func.vjp``
    of the batched function at the caller's tensors themselves (a shared argument expanded to a
    per-sample one): it composes with autograd (``create_graph``) and with outer torch.func
    transforms, where fresh ``requires_grad`` leaves are not allowed. Every cotangent is a fresh
    tensor and the rows are stacked, so no in-place write touches a value autograd saved.
    """
    args, flags, B = batched_args(call)
    args = [usable(x) for x in args]
    primals = []
    for a in argnums:
        primals.append(args[a] if flags[a] else args[a].unsqueeze(0).expand(B, *args[a].shape))
        flags[a] = True

    def batched(*xs: torch.Tensor) -> torch.Tensor:
        full = list(args)
        for a, x in zip(argnums, xs, strict=True):
            full[a] = x
        return forward(call, full, flags, B, per_sample)

    with torch.enable_grad():
        res = torch.func.vjp(batched, *primals)
        Y, pull = res[0], res[1]
        o = Y[0].numel() if B > 0 else math.prod(out_shape)
        rows_run = o if max_rows is None else min(o, max_rows)
        rows: list[list[torch.Tensor]] = [[] for _ in argnums]
        for k in range(rows_run if B > 0 else 0):
            onehot = torch.zeros(B, o, dtype=Y.dtype, device=Y.device)
            onehot[:, k] = 1
            for r, g in zip(rows, pull(onehot.view(Y.shape)), strict=True):
                r.append(g.reshape(B, -1))
        return _stacked(call, rows, argnums, outs, o, Y, out_shape, vec)


def _compute_graph_autograd(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    vec: str | None,
    outs: Sequence[torch.Tensor | None],
    max_rows: int | None,
    per_sample: bool = False,
) -> list[torch.Tensor]:
    """The vjp route with a differentiable result, by ``torch.autograd.grad(create_graph=True)``
    at the caller's tensors: for a ``func`` that writes into tensors it closes over (a
    train-mode BatchNorm), which ``torch.func.vjp`` refuses. Outside torch.func transforms only.
    """
    args, flags, B = batched_args(call)
    args = [usable(x) for x in args]
    primals = []
    for a in argnums:
        x = args[a] if flags[a] else args[a].unsqueeze(0).expand(B, *args[a].shape)
        if not x.requires_grad:  # nothing outside needs the graph to reach it
            x = x.detach().requires_grad_(True)
        args[a], flags[a] = x, True
        primals.append(x)
    in_numels = [math.prod(call.sample_shape(a)) for a in argnums]
    with torch.enable_grad():
        Y = forward(call, args, flags, B, per_sample)
        o = Y[0].numel() if B > 0 else math.prod(out_shape)
        rows_run = o if max_rows is None else min(o, max_rows)
        rows: list[list[torch.Tensor]] = [[] for _ in argnums]
        for k in range(rows_run if B > 0 and Y.requires_grad else 0):
            onehot = torch.zeros(B, o, dtype=Y.dtype, device=Y.device)
            onehot[:, k] = 1
            grads = torch.autograd.grad(
                Y, primals, onehot.view(Y.shape), retain_graph=True, create_graph=True,
                allow_unused=True,
            )  # fmt: skip
            for r, g, n in zip(rows, grads, in_numels, strict=True):
                r.append(
                    torch.zeros(B, n, dtype=Y.dtype, device=Y.device)
                    if g is None
                    else g.reshape(B, -1)
                )
        return _stacked(call, rows, argnums, outs, o, Y, out_shape, vec)


def _stacked(
    call: Call,
    rows: Sequence[Sequence[torch.Tensor]],
    argnums: Sequence[int],
    outs: Sequence[torch.Tensor | None],
    o: int,
    Y: torch.Tensor,
    out_shape: tuple[int, ...],
    vec: str | None,
) -> list[torch.Tensor]:
    """Per argnum, the rows ``(B, in_numel)`` each stacked into the Jacobian in ``vec``;
    rows not computed (an empty batch or output, a constant output, ``max_rows``) are zero."""
    B = Y.shape[0]
    results = []
    for r, a, buf in zip(rows, argnums, outs, strict=True):
        in_shape = call.sample_shape(a)
        n = math.prod(in_shape)
        if r and len(r) == o:
            J = torch.stack(list(r), dim=1)  # (B, o, n)
        else:
            zeros = torch.zeros(B, o - len(r), n, dtype=Y.dtype, device=Y.device)
            J = torch.cat([torch.stack(list(r), dim=1), zeros], dim=1) if r else zeros
        J = J.view(B, *out_shape, *in_shape)
        results.append(finish(J, len(out_shape), len(in_shape), vec, buf))
    return results


ROUTE: Route = Route("vjp", compute, method="vjp", fallback_multiple=1.5)
#: Internal: per-sample reverse mode, never under vmap (the planner's answer to torch bugs:
#: NOTE [Known torch bugs: one list, consulted by the planner]).
PER_SAMPLE: Route = Route(
    "per_sample", functools.partial(compute, per_sample=True), fallback_multiple=1.5
)
