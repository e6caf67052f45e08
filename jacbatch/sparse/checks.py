"""The pattern check of a sparse call and the per-sample exact entries its fall-backs use.

Step 6 of NOTE [Sparse Jacobians: what a call does] in :mod:`jacbatch.sparse.engine`: one random
product of every sample's Jacobian in the other mode, compared with the same product of the
decompressed values; and the per-sample reverse-mode entries of the NaN policy (step 5).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .. import _torch_bugs
from ..call import Call
from ..methods import batched_args
from ..testing import tolerance

if TYPE_CHECKING:
    from .engine import Part, Prepared


def _sample(args: Sequence[torch.Tensor], flags: Sequence[bool], b: int) -> list[torch.Tensor]:
    return [x[b] if f else x for x, f in zip(args, flags, strict=True)]


def _single(call: Call, xs: list[torch.Tensor], a: int) -> Callable[[torch.Tensor], torch.Tensor]:
    def g(xa: torch.Tensor) -> torch.Tensor:
        return call.func(*xs[:a], xa, *xs[a + 1 :]).reshape(-1)

    return g


def _rows_of(call: Call, xs: list[torch.Tensor], a: int, rows: torch.Tensor) -> torch.Tensor:
    """``(len(rows), n)``: rows of one sample's Jacobian by reverse mode, 256 at a time."""
    out, pull = torch.func.vjp(_single(call, xs, a), xs[a])[:2]
    parts = []
    for s in range(0, rows.numel(), 256):
        eye = torch.zeros(
            min(256, rows.numel() - s), out.numel(), dtype=out.dtype, device=out.device
        )
        eye[torch.arange(eye.shape[0]), rows[s : s + 256]] = 1
        parts.append(torch.func.vmap(lambda u: pull(u)[0].reshape(-1))(eye))
    return torch.cat(parts) if parts else out.new_zeros(0, xs[a].numel())


def _cols_of(call: Call, xs: list[torch.Tensor], a: int, cols: torch.Tensor) -> torch.Tensor:
    """``(len(cols), m)``: columns of one sample's Jacobian by forward mode, 256 at a time."""
    g, x = _single(call, xs, a), xs[a]
    parts = []
    for s in range(0, cols.numel(), 256):
        eye = torch.zeros(min(256, cols.numel() - s), x.numel(), dtype=x.dtype, device=x.device)
        eye[torch.arange(eye.shape[0]), cols[s : s + 256]] = 1
        parts.append(
            torch.func.vmap(lambda t: torch.func.jvp(g, (x,), (t.reshape(x.shape),))[1])(eye)
        )
    return torch.cat(parts)


def reverse_entries(
    call: Call, args: Sequence[torch.Tensor], flags: Sequence[bool], b: int, part: Part
) -> torch.Tensor:
    """``(nnz,)``: sample ``b``'s entries by per-sample reverse mode (the NaN policy)."""
    p = part.pattern
    rows = torch.arange(p.shape[0], device=call.device)
    dense_rows = _rows_of(call, _sample(args, flags, b), part.argnum, rows)
    return dense_rows[part.layout.rows, part.layout.cols]


def check_pattern(prep: Prepared, call: Call, values: Sequence[torch.Tensor]) -> None:
    """Step 6 of NOTE [Sparse Jacobians: what a call does], on every sample of ``call``.

    NOTE [The pattern check covers every sample]
        A pattern that misses an entry is caught where that entry is nonzero; on one sample it
        may vanish (a zero initial state, ``relu`` below zero) and be wrong on the others. So
        for a given pattern the random product (one direction, shared by the samples) runs for
        the whole batch under ``vmap``, as one more pass next to the ``colors`` passes, and
        every sample's product is compared; the first sample that disagrees is examined and
        refused. A detected pattern is structural (it holds for every input value, NOTE
        [Exact and conservative op classes] in :mod:`jacbatch.sparse.detect`), so a value
        cannot hide its miss; it is checked on the first sample (the Brusselator at B = 64:
        the whole batch would add 20 ms to a 30 ms call).
    """
    args, flags, B = batched_args(call)
    if B == 0:
        return
    gen = torch.Generator().manual_seed(0)
    eps = torch.finfo(call.dtype).eps
    ops = prep.call.probe.ops if prep.call.probe is not None else frozenset()
    first_only = dataclasses.replace(
        call,
        args=tuple(x if d is None else x.narrow(d, 0, 1) for x, d in zip(call.args, call.in_dims, strict=True)),
        batch_size=1 if call.batch_size is not None else None,
    )  # fmt: skip
    with torch.no_grad():
        for part, vals in zip(prep.parts, values, strict=True):
            V = vals.detach() if part.given else vals.detach()[:1]
            checked = call if part.given else first_only
            # NOTE [The pattern check's mode]: a random product in the mode the passes did not
            # use tests the decompression independently of the seeds; the same mode (a random
            # direction, not a seed) detects a missed dependence as well. It is the fallback
            # where the other mode has no formula for an op (forward AD of cdist, say), and
            # where a known torch bug makes forward mode wrong for an op the call runs
            # (cholesky, eigh: symmetric_input_forward_mode in jacbatch._torch_bugs), since a
            # wrong reference would refuse a right result.
            wrong_fwd = _torch_bugs.affecting(ops, "jacfwd")
            first = "reverse" if part.coloring.mode == "column" or wrong_fwd else "forward"
            used = first
            try:
                exact, prod, scale = _random_products(first, prep, checked, part, V, gen)
            except Exception:  # torch cannot run that mode here (a custom Function without jvp
                # fails inside vmap with an AssertionError): the passes' own mode ran
                used = "forward" if first == "reverse" else "reverse"
                exact, prod, scale = _random_products(used, prep, checked, part, V, gen)
            # rounding of both products, plus a floor relative to each sample's largest term
            floor = scale.amax(1, keepdim=True) if scale.shape[1] else scale.sum(1, keepdim=True)
            tol = 1000 * eps * (scale + exact.abs() + 1e-3 * floor)
            finite = torch.isfinite(exact) & torch.isfinite(prod)
            off = ((exact - prod).abs() > tol) & finite
            bad = off.any(1).nonzero().flatten()
            if bad.numel():
                b = int(bad[0])
                xs = _sample(args, flags, b)
                _missed(prep.call, xs, part, off[b].nonzero().flatten(), used, V[b], b)


def _random_products(
    mode: str, prep: Prepared, call: Call, part: Part, V: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(exact, from the values, scale)``, each ``(B, size)``: one random product with every
    sample's Jacobian, ``uᵀ J_b`` ``(n,)`` by reverse mode or ``J_b w`` ``(m,)`` by forward
    mode, the same direction for all samples; ``V (B, nnz)`` the values at the pattern's
    ``(rows, cols)``; ``scale`` the sums of the absolute terms."""
    from .compressed import column_pass, row_pass

    args, flags, _ = batched_args(call)
    m, n = part.pattern.shape
    rows, cols = part.layout.rows, part.layout.cols
    dtype, device = V.dtype, V.device
    a = part.argnum
    if mode == "reverse":
        u = torch.randn(m, generator=gen, dtype=dtype).to(device)
        # one cotangent, pulled back without a vmap over cotangents (cdist_backward_vmap)
        exact = row_pass(call.func, args, flags, a, prep.out_shape, u[None], loop=True)[0]
        terms, at, size = u[rows] * V, cols, n
    else:
        w = torch.randn(n, generator=gen, dtype=dtype).to(device)
        exact = column_pass(call.func, args, flags, a, call.sample_shape(a), w[None])[0]
        terms, at, size = V * w[cols], rows, m
    B = V.shape[0]
    prod = torch.zeros(B, size, dtype=dtype, device=device).index_add_(1, at, terms)
    scale = torch.zeros(B, size, dtype=dtype, device=device).index_add_(1, at, terms.abs())
    return exact.reshape(B, size).to(dtype), prod, scale


def _missed(
    call: Call,
    xs: list[torch.Tensor],
    part: Part,
    idx: torch.Tensor,
    used: str,
    v0: torch.Tensor,
    b: int = 0,
) -> None:
    """Count the entries outside the pattern in the columns (``used="reverse"``: the check was
    ``uᵀ J``) or rows (``"forward"``) ``idx`` of sample ``b`` (``xs`` its arguments), and
    raise; ``v0 (nnz,)``: that sample's values.

    NOTE [A check that fails inside the pattern]
        Where no entry lies outside the pattern, the pattern is not at fault: either the random
        product's rounding exceeded the check's tight bound (an ill-conditioned function whose
        entries cancel: attention, at 1e-10 relative) or the compressed passes are wrong (a
        torch transform that gives wrong derivatives under ``vmap`` for some op: the row
        passes of ``torch.gradient``). The exact columns (rows) just computed tell which: the
        values agree with them within the routes' tolerance (:data:`jacbatch.testing.
        TOLERANCES`, atol relative to the largest entry), and the call stands, or they do
        not, and it is refused with ``NotImplementedError`` naming the fix, never returned.
    """
    p, a = part.pattern, part.argnum
    idx = idx[:4096]
    kind = "columns" if used == "reverse" else "rows"
    try:  # columns by forward mode, rows by reverse mode: the check's other mode
        if used == "reverse":
            exact = _cols_of(call, xs, a, idx).T  # (m, k)
            mask_full = p.to_mask()[:, idx.cpu()].to(exact.device)
        else:
            exact = _rows_of(call, xs, a, idx)  # (k, n)
            mask_full = p.to_mask()[idx.cpu()].to(exact.device)
        count: int | None = int(((exact != 0) & ~mask_full).sum())
    except (NotImplementedError, RuntimeError):  # that mode has no formula for some op
        count = None
    if count == 0:
        rows, cols = part.layout.rows, part.layout.cols
        pos = torch.full((p.shape[1] if kind == "columns" else p.shape[0],), -1, device=rows.device)
        pos[idx.to(rows.device)] = torch.arange(idx.numel(), device=rows.device)
        line, other = (cols, rows) if kind == "columns" else (rows, cols)
        sel = pos[line] >= 0
        ours = torch.zeros_like(exact)
        if kind == "columns":
            ours[other[sel], pos[line[sel]]] = v0[sel].to(exact.dtype)
        else:
            ours[pos[line[sel]], other[sel]] = v0[sel].to(exact.dtype)
        rtol, atol = tolerance(exact.dtype)
        big = float(exact.abs().nan_to_num(0.0, 0.0, 0.0).max()) if exact.numel() else 0.0
        if torch.allclose(ours, exact, rtol=rtol, atol=atol * max(big, 1e-300), equal_nan=True):
            return
        mode = "column (forward)" if part.coloring.mode == "column" else "row (reverse)"
        raise NotImplementedError(
            f"jacobian: the sparse passes for argnum {a} ({mode} mode, under torch.func.vmap) "
            f"give wrong derivatives for this function: {idx.numel()} {kind} of sample {b}'s "
            f"Jacobian differ from {'forward' if kind == 'columns' else 'reverse'} "
            f"mode on that sample alone, with no dependence outside the pattern. Use "
            f"method={'jacfwd' if part.coloring.mode == 'row' else 'jacrev'!r} or sparse=False."
        )
    if count:
        detail = f"{count} nonzero entr{'y' if count == 1 else 'ies'} outside the pattern"
    elif count is None:
        detail = "a compressed product that disagrees with the exact one"
    else:
        detail = "no entry outside the pattern, but the compressed product disagrees"
    raise ValueError(
        f"jacobian: expected the sparse= pattern for argnum {a} to contain every dependence of "
        f"the output on the argument, got {detail} in {idx.numel()} {kind} of sample {b}'s "
        f"Jacobian (checked against a random {'VJP' if kind == 'columns' else 'JVP'}). "
        f"A pattern that misses an entry gives wrong values; pass a pattern that covers it, "
        f"or sparse=True to detect it."
    )


__all__ = ["check_pattern", "reverse_entries"]
