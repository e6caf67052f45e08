"""The torch.func route: ``vmap(jacrev(func))`` or ``vmap(jacfwd(func))``.

``chunk_size`` bounds how many Jacobian rows (jacrev) or columns (jacfwd) are computed in one
vectorized pass. ``torch.func.jacrev`` chunks natively; ``torch.func.jacfwd`` has no chunking, so
with a ``chunk_size`` the columns are pushed forward in chunks of ``vmap(jvp)`` over slices of the
identity, which is exactly what ``jacfwd`` does in a single chunk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.func import jacfwd, jacrev, jvp, vmap

from .._validation import Call
from . import batched_args, finish


def _jacfwd_chunked(
    func: Callable[..., Any], argnum: int, chunk_size: int
) -> Callable[..., torch.Tensor]:
    """Per-sample ``jacfwd(func, argnum)`` that pushes at most ``chunk_size`` tangents at once."""

    def jac(*args: torch.Tensor) -> torch.Tensor:
        x = args[argnum]
        n = x.numel()

        def f(xx: torch.Tensor) -> torch.Tensor:
            return func(*args[:argnum], xx, *args[argnum + 1 :])

        def push(t: torch.Tensor) -> torch.Tensor:
            return jvp(f, (x,), (t.view(x.shape),))[1]

        cols = []
        for start in range(0, n, chunk_size):
            stop = min(n, start + chunk_size)
            basis = torch.zeros(stop - start, n, dtype=x.dtype, device=x.device)
            basis[torch.arange(stop - start), torch.arange(start, stop)] = 1
            cols.append(vmap(push)(basis))  # (c, *out_shape)
        if not cols:  # zero-sized input: push a single zero tangent for the output shape
            out = f(x)
            return out.new_zeros(*out.shape, *x.shape)
        Jt = torch.cat(cols)  # (n, *out_shape)
        return Jt.movedim(0, -1).reshape(*Jt.shape[1:], *x.shape)

    return jac


def compute(
    call: Call,
    argnums: Sequence[int],
    mode: str,
    chunk_size: int | None,
    out_shape: tuple[int, ...],
    layout: str | None,
    outs: Sequence[torch.Tensor | None],
) -> list[torch.Tensor]:
    """Jacobians w.r.t. ``args[a]`` for ``a in argnums`` with torch.func (``mode`` ``"rev"``/``"fwd"``).

    Returns:
        Per argnum: ``(B, *out_shape, *in_shape)`` or ``(B, out_numel, in_numel)`` (``layout``).
    """
    args, flags, _ = batched_args(call)
    dims = tuple(0 if f else None for f in flags)
    nums = tuple(argnums)
    per_sample: list[Callable[..., Any]]
    if mode == "rev":
        per_sample = [jacrev(call.func, argnums=nums, chunk_size=chunk_size)]
    elif chunk_size is None:
        per_sample = [jacfwd(call.func, argnums=nums)]
    else:
        per_sample = [_jacfwd_chunked(call.func, a, chunk_size) for a in nums]

    jacs: list[torch.Tensor] = []
    for fn in per_sample:
        res = vmap(fn, in_dims=dims)(*args) if call.batched else fn(*args)
        res_t = res if isinstance(res, tuple) else (res,)
        jacs.extend(r if call.batched else r.unsqueeze(0) for r in res_t)

    return [
        finish(J.detach(), len(out_shape), len(call.sample_shape(a)), layout, buf)
        for J, a, buf in zip(jacs, nums, outs, strict=True)
    ]
