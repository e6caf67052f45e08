"""One module per route. Every route computes, for a validated :class:`~jacbatch._validation.Call`
and a list of argnums, one Jacobian per argnum with a leading batch dimension (``B = 1`` for an
unbatched call; :mod:`jacbatch.api` removes it), in the requested layout:

* ``layout=None``: ``(B, *out_shape, *in_shape)``
* ``layout="row"`` / ``"col"``: ``(B, out_numel, in_numel)`` in that vec order.

``outs`` holds, per argnum, ``None`` or a caller's contiguous buffer of exactly that shape, which
the route fills and returns.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .. import conventions
from .._validation import Call


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
    layout: str | None,
    out: torch.Tensor | None,
) -> torch.Tensor:
    """Bring a natural-layout ``(B, *out_shape, *in_shape)`` Jacobian to ``layout`` (into ``out``)."""
    if layout is not None:
        J = conventions.flatten_jacobian(J, out_ndim, in_ndim, layout, batched=True)  # type: ignore[arg-type]
    if out is not None:
        out.copy_(J)
        return out
    return J.contiguous()


def sample_shapes(call: Call, argnums: Sequence[int]) -> list[tuple[int, ...]]:
    return [call.sample_shape(a) for a in argnums]
