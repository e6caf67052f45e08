"""The independent reference Jacobian every test compares with.

A per-sample loop of ``torch.autograd.functional.jacobian``, in float64 on the CPU: it shares no
code with jacbatch (plain torch only), so a wrong jacbatch result cannot hide in the reference.
Tests import it through ``tests.conftest``; the OpInfo sweep (``tests/_opinfo.py``, also run by
``bench/opinfo_sweep.py`` outside pytest) imports it from here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["reference_jacobian"]


def reference_jacobian(
    func: Callable[..., torch.Tensor],
    args: Sequence[Any],
    argnums: int | Sequence[int] = 0,
    in_dims: int | Sequence[int | None] | None = 0,
    *,
    vec: str | None = None,
    create_graph: bool = False,
) -> Any:
    """The Jacobian of ``func`` at ``args``, one sample at a time, by autograd.

    Args:
        func: the per-sample function, ``func(*sample_args) -> Tensor``.
        args: the arguments, batched along ``in_dims``; non-tensors are passed through.
        argnums: the argument (or tuple of arguments) to differentiate; negative counts from
            the end.
        in_dims: the batch dimension of each argument (``None``: shared by every sample); an
            int or None applies to all. Nothing batched: the Jacobian of one call, no batch.
        vec: ``None``: ``([B,] *out_shape, *in_shape)``; ``"row"`` / ``"col"``:
            ``([B,] out_numel, in_numel)`` with both sides flattened in row-major (C) or
            column-major (Fortran) order.
        create_graph: keep the graph, so the result can be differentiated again with respect to
            ``args`` (which are then used as given and must be float64 on the CPU; nothing is
            detached). Without it, floating arguments are detached and cast to float64 on the
            CPU, and the result has no graph.

    Returns:
        The Jacobian (float64, CPU) for an int ``argnums``; a tuple, one per entry, for a
        sequence.
    """
    n = len(args)
    dims = tuple(in_dims) if isinstance(in_dims, Sequence) else (in_dims,) * n
    if len(dims) != n:
        raise ValueError(f"reference_jacobian: {len(dims)} in_dims for {n} arguments")
    prepared = [_prepare(a, create_graph) for a in args]
    if isinstance(argnums, int):
        return _jacobian(func, prepared, argnums % n, dims, vec, create_graph)
    return tuple(_jacobian(func, prepared, a % n, dims, vec, create_graph) for a in argnums)


def _prepare(a: Any, create_graph: bool) -> Any:
    if not isinstance(a, torch.Tensor):
        return a
    if create_graph:
        if a.dtype != torch.float64 or a.device.type != "cpu":
            raise ValueError("reference_jacobian: create_graph needs float64 CPU arguments")
        return a
    a = a.detach().to("cpu")
    return a.to(torch.float64) if a.is_floating_point() else a


def _jacobian(
    func: Callable[..., torch.Tensor],
    args: list[Any],
    argnum: int,
    dims: tuple[int | None, ...],
    vec: str | None,
    create_graph: bool,
) -> torch.Tensor:
    batched = [i for i, d in enumerate(dims) if d is not None]
    if not batched:
        J = _one(func, args, argnum, create_graph)
        return _flatten(J, J.ndim - args[argnum].ndim, vec)
    b0 = batched[0]
    size = args[b0].shape[dims[b0]]
    if size == 0:  # no sample to differentiate: the result is empty, shapes from zeros
        sample = [
            a if d is None else torch.zeros(_drop(a.shape, d), dtype=a.dtype)
            for a, d in zip(args, dims, strict=True)
        ]
        out = func(*sample)
        J = _flatten(
            torch.zeros(*out.shape, *sample[argnum].shape, dtype=torch.float64), out.ndim, vec
        )
        return torch.zeros(0, *J.shape, dtype=torch.float64)
    per_sample = []
    for b in range(size):
        # each sample its own storage: a function reading storage (as_strided) sees only it
        sample = [
            a if d is None else a.select(d, b).clone() for a, d in zip(args, dims, strict=True)
        ]
        J = _one(func, sample, argnum, create_graph)
        per_sample.append(_flatten(J, J.ndim - sample[argnum].ndim, vec))
    return torch.stack(per_sample)


def _drop(shape: torch.Size, d: int) -> tuple[int, ...]:
    s = list(shape)
    del s[d]
    return tuple(s)


def _one(
    func: Callable[..., torch.Tensor], args: list[Any], argnum: int, create_graph: bool
) -> torch.Tensor:
    """``(*out_shape, *in_shape)`` of one call."""

    def f(x: torch.Tensor) -> torch.Tensor:
        return func(*args[:argnum], x, *args[argnum + 1 :])

    x = args[argnum]
    if x.numel() == 0:
        out = f(x)
        return torch.zeros(*out.shape, *x.shape, dtype=torch.float64)
    # one call of func per sample, inside autograd.functional (a function with state sees
    # exactly one call, as under a fresh per-sample call)
    seen: list[torch.Tensor] = []

    def g(x: torch.Tensor) -> torch.Tensor:
        out = f(x)
        seen.append(out)
        return out

    try:
        return torch.autograd.functional.jacobian(g, x, create_graph=create_graph)
    except RuntimeError:
        if len(seen) == 1 and seen[0].numel() == 0:  # autograd.functional cannot stack nothing
            return torch.zeros(*seen[0].shape, *x.shape, dtype=torch.float64)
        raise


def _flatten(J: torch.Tensor, n_out: int, vec: str | None) -> torch.Tensor:
    """``(*out, *in)`` to ``(out_numel, in_numel)`` in the ``vec`` order (None: unchanged)."""
    if vec is None:
        return J
    n_in = J.ndim - n_out
    rows, cols = math.prod(J.shape[:n_out]), math.prod(J.shape[n_out:])
    if vec == "row":
        return J.reshape(rows, cols)
    if vec == "col":
        perm = [*reversed(range(n_out)), *(n_out + k for k in reversed(range(n_in)))]
        return J.permute(*perm).reshape(rows, cols)
    raise ValueError(f"reference_jacobian: vec must be None, 'row' or 'col', got {vec!r}")
