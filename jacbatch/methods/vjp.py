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

import math
from collections.abc import Sequence

import torch
from torch.func import vmap

from .._validation import Call
from . import batched_args, finish


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
        call.func(*(x[b] if f else x for x, f in zip(args, batched, strict=True))) for b in range(B)
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
    layout: str | None,
    outs: Sequence[torch.Tensor | None],
    *,
    max_rows: int | None = None,
    per_sample: bool = False,
) -> list[torch.Tensor]:
    """Jacobians w.r.t. ``args[a]`` for ``a in argnums`` by ``out_numel`` backward passes.

    ``max_rows`` stops after that many rows (memory estimation on meta tensors only).
    ``per_sample`` runs the forward sample by sample, never under vmap: per-sample reverse-mode
    autograd exactly (NOTE [Known torch bugs: one list, consulted by the planner]).

    Returns:
        Per argnum: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` (``layout``).
    """
    args, flags, B = batched_args(call)
    args = [x.detach() for x in args]
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
    # Rows go straight into the caller's buffer when its memory order is the rows' order
    # (natural layout or row-major vec); every row is written once, so no zero fill.
    direct = layout in (None, "row")
    rows = [
        buf.view(B, o, n)
        if buf is not None and direct
        else torch.empty(B, o, n, dtype=Y.dtype, device=Y.device)
        for n, buf in zip(in_numels, outs, strict=True)
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
                return compute(
                    call, argnums, out_shape, layout, outs, max_rows=max_rows, per_sample=True
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
    for r, a, buf in zip(rows, argnums, outs, strict=True):
        in_shape = call.sample_shape(a)
        J = r.view(B, *out_shape, *in_shape)
        if buf is not None and direct:
            results.append(buf)
        else:
            results.append(finish(J, len(out_shape), len(in_shape), layout, buf))
    return results
