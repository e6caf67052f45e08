"""Pytrees in and out of :func:`jacbatch.hessian`, and ``has_aux``, with torch.func's semantics.

NOTE [Pytree Hessians: one flat call, nested twice]
    ``hessian(f, params, x, in_dims=(None, 0))`` with ``params`` a dict of tensors is, in
    torch.func, ``vmap(hessian(f), in_dims=(None, 0))(params, x)``, i.e.
    ``vmap(jacfwd(jacrev(f)))``. As for :func:`jacbatch.jacobian` (NOTE [Pytree calls] in
    :mod:`jacbatch.pytree`), the call becomes ONE call of the tensor machinery: the flat
    per-sample function of :func:`jacbatch.pytree.flatten` (one positional argument per tensor
    leaf, the output leaves concatenated row-major into one vector unless ``func`` returns one
    tensor), with every differentiated leaf in a tuple ``argnums``. The machinery's blocks
    ``H[p][q]`` ``(B, O, *leaf_p, *leaf_q)``, for every pair of differentiated leaves, are then
    split along ``O`` into the output leaves, flattened per leaf as ``vec`` asks (so a scalar
    output leaf has no ``out_numel`` axis, as for a tensor output), and nested as
    ``torch.func.hessian`` nests them: the output's tree; in each output leaf the
    differentiated argument's tree (``jacrev``), a tuple of those for tuple ``argnums``; in each
    of its leaves ``p`` the same again (``jacfwd``), holding ``H[p][q]``.

    With ``has_aux=True``, ``func`` returns ``(output, aux)`` and ``aux`` comes from one more
    batched evaluation of ``func``, batched like the output, as
    ``vmap(jacfwd(jacrev(f, has_aux=True), has_aux=True))`` returns it (torch 2.13's
    ``torch.func.hessian`` has no ``has_aux``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils import _pytree as pt

from .. import _validation as V
from .. import pytree

is_tree_call = pytree.is_tree_call


def hessian(
    func: Callable[..., Any],
    args: tuple[Any, ...],
    argnums: object,
    in_dims: object,
    method: str,
    vec: object,
    chunk_size: object,
    max_memory: int | str | None,
    has_aux: bool,
) -> Any:
    """:func:`jacbatch.hessian` for a pytree call (NOTE [Pytree Hessians])."""
    from ..hessian import _flatten, blocks_of

    where = "hessian"
    order = V.check_vec(where, vec)
    flat = pytree.flatten(where, func, args, argnums, in_dims, has_aux=has_aux)
    blocks, call, _, _ = blocks_of(
        where, flat.func, flat.args, flat.argnums, flat.in_dims, method, None, chunk_size,
        max_memory,
    )  # fmt: skip
    if flat.noted.spec is None:  # a program ran without an eager run of func: note it now
        pytree.note_output(flat)
    noted = flat.noted
    lead = 0 if call.batch_size is None else 1
    n = len(flat.argnums)
    leaf = [call.sample_shape(a) for a in flat.argnums]
    sizes = [math.prod(s) for s in noted.shapes]
    split: list[list[list[torch.Tensor]]] = [[[] for _ in range(n)] for _ in range(n)]
    for k, H in enumerate(blocks):  # H[p][q] per output leaf, flattened as vec asks
        p, q = divmod(k, n)
        if noted.single:
            parts = [H]
        else:
            rest = H.shape[lead + 1 :]
            pieces = torch.split(H, sizes, dim=lead)
            parts = [
                x.reshape(*H.shape[:lead], *s, *rest)
                for x, s in zip(pieces, noted.shapes, strict=True)
            ]
        split[p][q] = [
            _flatten(x, lead, len(s), len(leaf[p]), len(leaf[q]), order)
            for x, s in zip(parts, noted.shapes, strict=True)
        ]
    starts = []
    start = 0
    for _, count in flat.groups:
        starts.append(start)
        start += count

    def of_args(per_group: list[Any]) -> Any:
        return tuple(per_group) if flat.tuple_argnums else per_group[0]

    per_out = []
    for o in range(len(noted.shapes)):
        outer = []
        for (spec_i, count_i), start_i in zip(flat.groups, starts, strict=True):
            rows = [
                of_args(
                    [
                        pt.tree_unflatten([split[p][q][o] for q in range(s_j, s_j + c_j)], spec_j)
                        for (spec_j, c_j), s_j in zip(flat.groups, starts, strict=True)
                    ]
                )
                for p in range(start_i, start_i + count_i)
            ]
            outer.append(pt.tree_unflatten(rows, spec_i))
        per_out.append(of_args(outer))
    result = pt.tree_unflatten(per_out, noted.spec)
    if not has_aux:
        return result
    return result, pytree.batched_aux(flat, None, "error", False)


__all__ = ["hessian", "is_tree_call"]
