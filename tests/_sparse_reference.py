"""The sparse tests' reference: per-sample ``torch.autograd.functional.jacobian``, flattened.

Independent of jacbatch: one autograd Jacobian per sample, stacked as ``(B, out_numel,
in_numel)``, the layout of a sparse result's ``to_dense()``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch


def flat_reference(
    f: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    in_dims: Sequence[Any] = (0,),
    a: int = 0,
) -> torch.Tensor:
    """``(B, out_numel, in_numel)``: per-sample autograd Jacobians of ``f`` w.r.t. ``args[a]``
    (``B`` from the first batched argument; ``in_dims``: 0 or ``None`` per argument)."""
    B = next(x.shape[0] for x, d in zip(args, in_dims, strict=True) if d is not None)
    out = []
    for b in range(B):
        xs = [x[b] if d is not None else x for x, d in zip(args, in_dims, strict=True)]

        def g(xa: torch.Tensor, xs: list[torch.Tensor] = xs) -> torch.Tensor:
            return f(*xs[:a], xa, *xs[a + 1 :])

        J = torch.autograd.functional.jacobian(g, xs[a])
        out.append(J.reshape(g(xs[a]).numel(), xs[a].numel()))
    return torch.stack(out)


def one_arg_reference(f: Callable[[torch.Tensor], torch.Tensor], X: torch.Tensor) -> torch.Tensor:
    """``(B, out_numel, in_numel)``: :func:`flat_reference` of a one-argument ``f``."""
    return flat_reference(f, (X,))
