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


def finite_difference_tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """``(rtol, atol)`` for a central finite difference computed in ``dtype`` against a route
    (atol relative to the Jacobian's largest entry, at least 1): see NOTE [Finite differences in
    the call's dtype]."""
    if dtype == torch.float64:
        return FINITE_DIFFERENCE_TOLERANCE
    r = 100 * torch.finfo(dtype).eps ** (2 / 3)
    return r, r


def finite_difference(
    func: Callable[..., torch.Tensor],
    args: Sequence[torch.Tensor],
    batched: Sequence[bool],
    argnum: int,
    *,
    step: float | None = None,
    randomness: str = "error",
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.dtype]:
    """Central finite-difference Jacobian, and the dtype it was computed in.

    NOTE [Finite differences in the call's dtype]
        The difference runs in float64 when ``func`` runs in float64 on float64 arguments: it
        is evaluated once on float64 copies, and used if that works and returns float64 (a
        closure over float32 weights either fails, "mat1 and mat2 must have the same dtype", or
        computes in float32). Otherwise it runs in the arguments' own dtype. The step is
        ``h = eps**(1/3) * max(1, |x|)`` per element, which balances the truncation error
        ``O(h**2)`` against the rounding error ``O(eps * |f| / h)``: both are about
        ``eps**(2/3)`` (4e-11 in float64, 2.4e-5 in float32). The tolerance against a route is
        ``100 * eps**(2/3)`` relative and absolute (times ``max(1, max |J|)``) outside float64
        (2.4e-3 in float32), and :data:`FINITE_DIFFERENCE_TOLERANCE` in float64. The divisor is
        the step actually represented, ``(x + h) - (x - h)``.

    Args:
        func: per-sample function.
        args: arguments with the batch dimension first where ``batched[i]``; shared otherwise.
            At least the differentiated one must be batched (expand it first if shared).
        batched: per argument, whether it carries the batch dimension (dim 0).
        argnum: the differentiated argument.
        step: the difference step; default ``eps**(1/3) * max(1, |x|)`` per element.
        randomness: passed to ``vmap`` (as in :func:`jacbatch.jacobian`).
        rng: a generator state every evaluation starts from (the same realization throughout).

    Returns:
        ``(J, dtype)``: ``J`` ``(B, out_numel, in_numel)`` in ``dtype`` (row-major vec).
    """
    dims = tuple(0 if f else None for f in batched)
    device = args[argnum].device

    def batched_f(*xs: torch.Tensor) -> torch.Tensor:
        if rng is not None:
            torch.set_rng_state(rng[0])
            if rng[1] is not None:
                torch.cuda.set_rng_state(rng[1], device)
        try:
            return vmap(func, in_dims=dims, randomness=randomness)(*xs)
        except (RuntimeError, NotImplementedError, ValueError, TypeError):
            if rng is not None:
                torch.set_rng_state(rng[0])
                if rng[1] is not None:
                    torch.cuda.set_rng_state(rng[1], device)
            B = next(x.shape[0] for x, f in zip(xs, batched, strict=True) if f)
            return torch.stack(
                [
                    func(*(x[b] if f else x for x, f in zip(xs, batched, strict=True)))
                    for b in range(B)
                ]
            )

    own = args[argnum].dtype
    dtype = torch.float64
    xs_ = [a.detach().to(torch.float64) for a in args]
    if own != torch.float64:
        try:
            with torch.no_grad():
                ok = batched_f(*xs_).dtype == torch.float64
        except (RuntimeError, TypeError, ValueError):
            ok = False
        if not ok:
            dtype = own
            xs_ = [a.detach() for a in args]
    x = xs_[argnum]
    B = x.shape[0]
    flat = x.reshape(B, -1)
    n = flat.shape[1]
    eps = torch.finfo(dtype).eps
    h = step if step is not None else None
    cols = []
    with torch.no_grad():
        for j in range(n):
            hj = h if h is not None else eps ** (1 / 3) * torch.clamp(flat[:, j].abs(), min=1.0)
            plus, minus = flat.clone(), flat.clone()
            plus[:, j] += hj
            minus[:, j] -= hj
            xs_p = list(xs_)
            xs_m = list(xs_)
            xs_p[argnum] = plus.view(x.shape)
            xs_m[argnum] = minus.view(x.shape)
            fp = batched_f(*xs_p).reshape(B, -1)
            fm = batched_f(*xs_m).reshape(B, -1)
            width = (plus[:, j] - minus[:, j]).reshape(B, 1)
            cols.append((fp - fm) / width)
    if not cols:
        out = batched_f(*xs_).reshape(B, -1)
        return out.new_zeros(B, out.shape[1], 0), dtype
    return torch.stack(cols, dim=-1), dtype
