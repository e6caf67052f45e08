"""Per-dtype tolerances and a finite-difference Jacobian, shared by tests, benchmarks and
:func:`jacbatch.check`.

The tolerance table is the one place that says how closely two routes must agree.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.func import vmap

#: ``dtype -> (rtol, atol)`` for comparing two routes (or a route with a float64 reference).
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (5e-2, 5e-2),
}

#: ``(rtol, atol)`` for a central finite difference in float64 against any route (relative to
#: the Jacobian's largest entry for atol).
FINITE_DIFFERENCE_TOLERANCE: tuple[float, float] = (1e-6, 1e-6)


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for ``dtype``; float32's for dtypes not in the table."""
    return TOLERANCES.get(dtype, TOLERANCES[torch.float32])


def finite_difference_jacobian(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    argnum: int,
    *,
    step: float | None = None,
) -> torch.Tensor:
    """Central finite-difference Jacobian in float64.

    Args:
        func: per-sample function.
        args: arguments with the batch dimension first where ``batched[i]``; shared otherwise.
            At least the differentiated one must be batched (expand it first if shared).
        batched: per argument, whether it carries the batch dimension (dim 0).
        argnum: the differentiated argument.
        step: the difference step; default ``eps**(1/3) * max(1, |x|)`` per element.

    Returns:
        ``(B, out_numel, in_numel)`` in float64 (row-major vec).
    """
    x64 = [a.detach().to(torch.float64) for a in args]
    dims = tuple(0 if f else None for f in batched)

    def batched_f(*xs: torch.Tensor) -> torch.Tensor:
        try:
            return vmap(func, in_dims=dims)(*xs)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            B = next(x.shape[0] for x, f in zip(xs, batched, strict=True) if f)
            return torch.stack(
                [
                    func(*(x[b] if f else x for x, f in zip(xs, batched, strict=True)))
                    for b in range(B)
                ]
            )

    x = x64[argnum]
    B = x.shape[0]
    flat = x.reshape(B, -1)
    n = flat.shape[1]
    eps = torch.finfo(torch.float64).eps
    h = step if step is not None else None
    cols = []
    with torch.no_grad():
        for j in range(n):
            hj = h if h is not None else eps ** (1 / 3) * torch.clamp(flat[:, j].abs(), min=1.0)
            plus, minus = flat.clone(), flat.clone()
            plus[:, j] += hj
            minus[:, j] -= hj
            xs_p = list(x64)
            xs_m = list(x64)
            xs_p[argnum] = plus.view(x.shape)
            xs_m[argnum] = minus.view(x.shape)
            fp = batched_f(*xs_p).reshape(B, -1)
            fm = batched_f(*xs_m).reshape(B, -1)
            width = (plus[:, j] - minus[:, j]).reshape(B, 1)
            cols.append((fp - fm) / width)
    if not cols:
        out = batched_f(*x64).reshape(B, -1)
        return out.new_zeros(B, out.shape[1], 0)
    return torch.stack(cols, dim=-1)
