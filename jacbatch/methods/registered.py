"""Transitional route: the per-function registered closed forms (``jacbatch.rules.register``,
today only :func:`jacbatch.affine`), planned ahead of tracing.

It exists only while that registry does: once ``jacbatch.affine`` is plain code traced like
any other function, this module, its registry line in :mod:`jacbatch.methods` and
:func:`jacbatch.plan.registered` go. Until then it keeps ``affine`` off the traced route,
whose capture of one code object for every shape in a long run meets Dynamo's per-code
recompile budget (``FailOnRecompileLimitHit``; see :mod:`jacbatch.capture`). Internal: a
caller asks for it as ``method="closed_form"``, which plans it where a rule is registered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..call import Call
from . import Route


def _compute(
    call: Call,
    argnums: Sequence[int],
    out_shape: tuple[int, ...],
    layout: str | None,
    outs: Sequence[torch.Tensor | None],
    *,
    chunk_size: int | None = None,
    max_rows: int | None = None,
) -> list[torch.Tensor]:
    from . import closed_form

    return closed_form.compute(call, argnums, out_shape, layout, outs)


#: Plans name it ``closed_form`` (as before the traced route existed).
ROUTE: Route = Route("closed_form", _compute, fallback_multiple=0.1)
