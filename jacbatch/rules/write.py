"""The one writer: lettered Jacobian terms (:mod:`jacbatch.rules.terms`) into a dense result.

:func:`materialize` writes ``Σ terms`` into a ``(B, *out_shape, *in_shape)`` view of any strides
(the natural layout, or a row- or column-major flattened buffer seen through a view), each entry
once where it can; :func:`dense` computes the same out of place, differentiably. A single term that
is a batched Kronecker product in the buffer's memory order (``A ⊗ I_q``, ``I_m ⊗ Wᵀ`` and their
column-major forms, the Jacobians of ``A @ W + B``) takes the fast path :func:`kron`.

NOTE [Kronecker Jacobian of A @ W + B]
    ``Z[i, j] = Σ_k A[i, k] W[k, j] + B[j]``, so

    * ``∂Z[i, j] / ∂W[k, l] = A[i, k] δ(j, l)``
    * ``∂Z[i, j] / ∂A[k, l] = δ(i, k) W[l, j]``
    * ``∂Z[i, j] / ∂B[l] = δ(j, l)`` for ``B (q,)``; ``∂Z[i, j] / ∂B[k, l] = δ(i, k) δ(j, l)``.

    Row-major vec puts ``(i, j)`` at ``i*q + j`` and ``(k, l)`` at ``k*cols + l``; reading the
    4-index tensors as block matrices gives ``dZ/dW = A ⊗ I_q`` (block ``(i, k)`` is
    ``A[i, k] I_q``), ``dZ/dA = I_m ⊗ Wᵀ`` (block ``(i, k)`` is ``δ(i, k) Wᵀ``) and
    ``dZ/dB = 1_m ⊗ I_q``. Column-major vec puts ``(i, j)`` at ``j*m + i``; the block index is now
    the column, so ``dZ/dW = I_q ⊗ A``, ``dZ/dA = Wᵀ ⊗ I_m`` and ``dZ/dB = I_q ⊗ 1_m``. These
    agree with ``vec_r(A X C) = (A ⊗ Cᵀ) vec_r(X)`` and ``vec_c(A X C) = (Cᵀ ⊗ A) vec_c(X)``.
    As terms they are one factor and one delta each; the writer finds the Kronecker form from
    the letters and the buffer's memory order.

NOTE [Writing a batched Kronecker product at the memory-write limit]
    ``J[b, i, j, k, l] = X[b, i, k] Y[b, j, l]`` (``X ⊗ Y``, one factor often an identity) written
    straight into the result: every output element is written exactly once, so the cost is the
    write of the output. How it is written matters when the inner factor is narrow:

    * ``Y`` with ``c2 >= 16`` columns: one broadcast multiply
      ``X[:, :, None, :, None] * Y[:, None, :, None, :]``; its innermost loop runs over ``l``
      (``c2`` contiguous elements), long enough for vectorized writes.
    * fewer columns (``q = 8`` in ``A ⊗ I_q``): that innermost loop is too short and the
      broadcast kernel spends its time on loop overhead. Flattening ``(k, l)`` gives
      ``J[b, i, j, (k, l)] = Xr[b, i, (k, l)] Yt[b, j, (k, l)]`` with ``Xr[b, i, (k, l)] =
      X[b, i, k]`` and ``Yt[b, j, (k, l)] = Y[b, j, l]`` (for ``Y = I_q``, a fixed 0/1 selection
      pattern): one multiply whose innermost loop runs over ``c1 * c2`` contiguous elements.
      ``Xr`` and ``Yt`` are built per batch chunk, so these temporaries stay under ``1/32`` of
      the output.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .terms import Factor, Term, _einsum, collapse, dense_factor, fresh, refined

#: Below this many columns of the inner factor, the broadcast multiply's innermost loop is too
#: short; see NOTE [Writing a batched Kronecker product at the memory-write limit].
_NARROW = 16
#: The narrow formulation's temporaries stay under ``1 / _TEMP_FRACTION`` of the output.
_TEMP_FRACTION = 32


def _repeat_flat(F: torch.Tensor, reps: int, inner: bool) -> torch.Tensor:
    """``(n, r, c) -> (n, r, c * reps)``: ``F[.., k]`` at ``(k, l)`` (``inner``), else at ``(l, k)``."""
    n, r, c = F.shape
    if inner:
        return F[:, :, :, None].expand(n, r, c, reps).reshape(n, r, c * reps)
    return F[:, :, None, :].expand(n, r, reps, c).reshape(n, r, reps * c)


def kron(X: torch.Tensor, Y: torch.Tensor, batch_size: int, out: torch.Tensor) -> torch.Tensor:
    """Batched Kronecker product ``J[b, i, j, k, l] = X[b, i, k] Y[b, j, l]`` written into ``out``.

    Args:
        X: ``(B, r1, c1)``, or ``(1, r1, c1)`` when shared by the batch.
        Y: ``(B, r2, c2)``, or ``(1, r2, c2)`` when shared by the batch.
        batch_size: ``B``.
        out: a contiguous buffer of ``B * r1 * r2 * c1 * c2`` elements.

    Returns:
        ``out`` viewed as ``(B, r1, r2, c1, c2)``.
    """
    b = batch_size
    _, r1, c1 = X.shape
    _, r2, c2 = Y.shape
    J = out.view(b, r1, r2, c1, c2)
    x_batched, y_batched = X.shape[0] == b != 1, Y.shape[0] == b != 1
    X, Y = X.expand(b, r1, c1), Y.expand(b, r2, c2)  # shared: stride-0 views
    if c2 >= _NARROW or b == 0 or J.numel() == 0:
        torch.mul(X[:, :, None, :, None], Y[:, None, :, None, :], out=J)
        return J
    # Narrow inner factor: one multiply over the flattened (k, l), in batch chunks.
    Jf = J.view(b, r1, r2, c1 * c2)
    temp = (r1 if x_batched else 0) + (r2 if y_batched else 0)  # per sample, times c1 * c2
    chunks = max(1, min(b, -(-_TEMP_FRACTION * temp // (r1 * r2))))
    step = -(-b // chunks)
    Xr = None if x_batched else _repeat_flat(X[:1], c2, inner=True)  # (1, r1, c1*c2)
    Yt = None if y_batched else _repeat_flat(Y[:1], c1, inner=False)  # (1, r2, c1*c2)
    for s in range(0, b, step):
        e = min(b, s + step)
        Xs = _repeat_flat(X[s:e], c2, inner=True) if Xr is None else Xr.expand(e - s, -1, -1)
        Ys = _repeat_flat(Y[s:e], c1, inner=False) if Yt is None else Yt.expand(e - s, -1, -1)
        torch.mul(Xs[:, :, None, :], Ys[:, None, :, :], out=Jf[s:e])
    return J


def _block(
    term: Term, fs: Sequence[tuple[torch.Tensor, tuple[int, ...]]], o: int, i: int
) -> torch.Tensor | None:
    """The ``(B or 1, n_o, n_i)`` matrix of the factors ``fs`` over letters ``o`` (rows) and
    ``i`` (columns); ``o == i`` is a delta (a diagonal matrix)."""
    if o == i:
        if not fs:
            return torch.eye(term.sizes[o], dtype=term.dtype, device=term.device)[None]
        T, _ = collapse(Term(tuple(fs), (o,), (o,), term.sizes, 1.0, term.dtype, term.device))
        return torch.diag_embed(T.expand(T.shape[0], term.sizes[o]))
    if not fs:
        return None
    T, ls = collapse(Term(tuple(fs), (o,), (i,), term.sizes, 1.0, term.dtype, term.device))
    view = [T.shape[0], *(term.sizes[x] if x in ls else 1 for x in (o, i))]
    T = T.permute(0, *(1 + ls.index(x) for x in (o, i) if x in ls)).reshape(view)
    return T.expand(T.shape[0], term.sizes[o], term.sizes[i])


def _kron_fast(term: Term, Y: torch.Tensor) -> bool:
    """Write ``term`` into ``Y`` with :func:`kron` when it is one there (see module docstring)."""
    axes = term.out + term.inp
    if len(term.out) != 2 or len(term.inp) != 2 or Y.ndim != 5 or Y.shape[0] == 0:
        return False
    # the memory order of Y's axes: outputs first in either vec order
    order = sorted(range(1, 5), key=lambda k: -Y.stride()[k])
    if order[:2] not in ([1, 2], [2, 1]) or not Y.permute(0, *order).is_contiguous():
        return False
    o1, o2, i1, i2 = (axes[k - 1] for k in order)
    if len({o1, o2}) < 2 or len({i1, i2}) < 2:
        return False
    g1, g2 = {o1, i1}, {o2, i2}
    if g1 & g2:
        return False
    fs1 = [f for f in term.factors if set(f[1]) <= g1]
    fs2 = [f for f in term.factors if set(f[1]) <= g2]
    if len(fs1) + len(fs2) != len(term.factors) or any(not f[1] for f in term.factors):
        return False
    X1 = _block(term, fs1, o1, i1)
    X2 = _block(term, fs2, o2, i2)
    if X1 is None or X2 is None:  # a free letter pair (a broadcast): not a Kronecker product
        return False
    if term.scale != 1.0:
        X1 = X1 * term.scale if X1.numel() <= X2.numel() else X1
        X2 = X2 if X1.numel() <= X2.numel() else X2 * term.scale
    kron(X1, X2, Y.shape[0], Y.permute(0, *order))
    return True


def _diagonal_view(Y: torch.Tensor, letters: Sequence[int]) -> tuple[torch.Tensor, list[int]]:
    """View of ``Y (B, *axes)`` with one axis per distinct letter (shared letters: a diagonal)."""
    order = list(dict.fromkeys(letters))
    stride = dict.fromkeys(order, 0)
    size = {}
    for x, n, s in zip(letters, Y.shape[1:], Y.stride()[1:], strict=True):
        stride[x] += s
        size[x] = n
    view = Y.as_strided(
        (Y.shape[0], *(size[x] for x in order)),
        (Y.stride(0), *(stride[x] for x in order)),
        Y.storage_offset(),
    )
    return view, order


def _aligned(
    T: torch.Tensor, t: Sequence[int], order: Sequence[int], shape: Sequence[int]
) -> torch.Tensor:
    """``T`` (letters ``t``) permuted to ``order`` with missing letters broadcast, shape ``shape``."""
    pos = {x: k for k, x in enumerate(order)}
    T = T.permute(0, *sorted(range(1, T.ndim), key=lambda k: pos[t[k - 1]]))
    present = set(t)
    view = [T.shape[0]]
    it = iter(T.shape[1:])
    for x in order:
        view.append(next(it) if x in present else 1)
    return T.reshape(view).expand(*shape)


def write(terms: Sequence[Term], Y: torch.Tensor) -> torch.Tensor:
    """Write ``Σ terms`` into ``Y (B, *out_sizes, *in_sizes)`` (any strides); returns ``Y``.

    NOTE [Writing a lettered Jacobian once]
        A single Kronecker term goes to :func:`kron`. Otherwise the result is written through
        strided views of ``Y`` (whatever its vec order), never formed elsewhere and copied or
        permuted in. A single term with no shared letter is its factors' product written once
        (NOTE [Writing a product of factors once]). A single term with one delta (a letter on
        two axes) is the same with the delta as an identity factor ``I_n`` over a second
        letter, so each entry of ``Y`` is written exactly once, like an allocate-and-fill (more
        deltas: the term is formed ``n`` times smaller than ``Y`` and multiplied by ``I_n``
        into it). Several terms: one with no delta (it covers every entry) is written first,
        or ``Y`` is zeroed when all have deltas; every other term is added into its diagonal
        view (only its nonzeros are touched), its last product formed inside the add
        (``addcmul_``), so no term is materialized before it is added.
    """
    if not terms:
        return Y.zero_()
    axes = terms[0].out + terms[0].inp
    if len(terms) == 1:
        term = terms[0]
        if _kron_fast(term, Y):
            return Y
        if len(set(axes)) == len(axes):
            D, order = _diagonal_view(Y, axes)
            _product(list(term.factors), term, order, D)
            return Y
        twice = [x for x in dict.fromkeys(axes) if axes.count(x) == 2]
        if twice:
            star = max(twice, key=lambda x: term.sizes[x])
            p1 = axes.index(star)
            p2 = axes.index(star, p1 + 1)
            rest = axes[:p2] + axes[p2 + 1 :]
            n = term.sizes[star]
            if len(set(rest)) == len(rest):
                # the delta as an identity factor over a second letter: then no letter is
                # shared and the product is written once (deltas only: one broadcast copy)
                star2 = fresh()
                eye = torch.eye(n, dtype=Y.dtype, device=Y.device)[None]
                sizes = {**term.sizes, star2: n}
                letters = (*axes[:p2], star2, *axes[p2 + 1 :])
                D, order = _diagonal_view(Y, letters)
                fs = [*term.factors, (eye, (star, star2))]
                _product(fs, Term((), (), (), sizes, term.scale, Y.dtype, Y.device), order, D)
                return Y
            T, t = collapse(term, axes)
            eye_shape = [1] * Y.ndim
            eye_shape[1 + p1] = eye_shape[1 + p2] = n
            I = torch.eye(n, dtype=Y.dtype, device=Y.device).reshape(eye_shape)
            zshape = Y.shape[: 1 + p2] + Y.shape[2 + p2 :]
            Z = _scatter([(T, t)], torch.empty(zshape, dtype=Y.dtype, device=Y.device), [rest])
            Z = Z.unsqueeze(1 + p2)
            torch.mul(Z.expand(Y.shape[0], *Z.shape[1:]), I, out=Y)
            return Y
    # Several terms: one that covers every entry (no delta) is written first, the others are
    # added into their diagonal views, each product formed in the add (addcmul), not before it.
    order_ = sorted(range(len(terms)), key=lambda k: _has_delta(terms[k]))
    first = True
    if _has_delta(terms[order_[0]]):
        Y.zero_()
        first = False
    for k in order_:
        term = terms[k]
        D, seen = _diagonal_view(Y, term.out + term.inp)
        _product(list(term.factors), term, seen, D, add=not first)
        first = False
    return Y


def _has_delta(term: Term) -> bool:
    axes = term.out + term.inp
    return len(set(axes)) != len(axes)


def _product(
    fs: list[Factor], term: Term, order: Sequence[int], D: torch.Tensor, add: bool = False
) -> None:
    """Write (``add``: add) ``term.scale · Π fs`` into ``D`` (letters ``order``, one distinct
    letter per axis).

    NOTE [Writing a product of factors once]
        No letter is summed, so the product is an outer product: factors are multiplied pairwise
        (always the pair with the smallest result, the scale into the smallest factor) until two
        are left, and their broadcast product goes straight into ``D``, each entry written once.
        Forming the whole product first and copying it in would write the result twice.
    """
    sizes = term.sizes
    if term.scale != 1.0:
        if fs:
            k = min(range(len(fs)), key=lambda i: fs[i][0].numel())
            fs[k] = (fs[k][0] * term.scale, fs[k][1])
        else:
            fs = [(torch.full((1,), term.scale, dtype=D.dtype, device=D.device), ())]
    if not fs:
        D.add_(1) if add else D.fill_(1)
        return
    pos = {x: k for k, x in enumerate(order)}
    while len(fs) > 2:
        best: tuple[int, int, int] | None = None
        for a in range(len(fs)):
            for b in range(a + 1, len(fs)):
                (Ta, la), (Tb, lb) = fs[a], fs[b]
                n = max(Ta.shape[0], Tb.shape[0]) * math.prod(sizes[x] for x in set(la) | set(lb))
                if best is None or n < best[0]:
                    best = (n, a, b)
        assert best is not None
        _, a, b = best
        keep = tuple(sorted(set(fs[a][1]) | set(fs[b][1]), key=pos.__getitem__))
        merged = (_einsum([fs[a], fs[b]], keep), keep)
        fs = [f for k, f in enumerate(fs) if k not in (a, b)] + [merged]
    if len(fs) == 1:
        T, t = fs[0]
        A = _aligned(T, t, order, D.shape)
        D.add_(A) if add else D.copy_(A)
        return
    (X1, l1), (X2, l2) = fs
    A1, A2 = _aligned(X1, l1, order, D.shape), _aligned(X2, l2, order, D.shape)
    D.addcmul_(A1, A2) if add else torch.mul(A1, A2, out=D)


def _scatter(
    factors: Sequence[tuple[torch.Tensor, tuple[int, ...]]],
    Y: torch.Tensor,
    axes: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Zero ``Y`` (unless one delta-free term covers it) and add each term into its diagonal view.

    ``factors[k]`` is term ``k`` as one factor; ``axes[k]`` are the letters of ``Y``'s non-batch
    axes for it.
    """
    first = True
    if len(factors) > 1 or len(set(axes[0])) < len(axes[0]):
        Y.zero_()
        first = False
    for (T, t), letters in zip(factors, axes, strict=True):
        D, order = _diagonal_view(Y, letters)
        A = _aligned(T, t, order, D.shape)
        if first:
            D.copy_(A)
            first = False
        else:
            D.add_(A)
    return Y


def dense(
    terms: Sequence[Term],
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    batch_size: int,
    like: torch.Tensor,
) -> torch.Tensor:
    """The Jacobian ``Σ terms`` as a new ``(B, *out_shape, *in_shape)`` tensor, out of place.

    What :func:`materialize` writes, computed with out-of-place torch ops on the factors, so the
    result stays differentiable w.r.t. whatever the factors depend on (autograd, or an outer
    torch.func transform whose wrapped values cannot be written into a plain buffer).
    ``like`` gives the dtype and device of an all-zero result.
    """
    shape = (batch_size, *out_shape, *in_shape)
    terms = refined(terms, out_shape, in_shape)
    if not terms:
        return torch.zeros(shape, dtype=like.dtype, device=like.device)
    for term in terms:
        if term.batch not in (1, batch_size):
            raise ValueError("rule bug: factor batch size differs from the call's")
    parts = [dense_factor(term) for term in terms]
    Y = parts[0]
    for part in parts[1:]:
        Y = Y + part
    Y = Y.expand(batch_size, *Y.shape[1:]).reshape(shape)
    # a single term may still be a view of a factor (e.g. of an argument): never return one
    return Y.clone() if len(parts) == 1 else Y


def materialize(
    terms: Sequence[Term],
    out_shape: Sequence[int],
    in_shape: Sequence[int],
    Y: torch.Tensor,
) -> torch.Tensor:
    """Write the Jacobian ``Σ terms`` into ``Y``, a ``(B, *out_shape, *in_shape)`` view (any strides).

    Terms' axes may refine ``out_shape``/``in_shape``; they are brought to one refinement first.
    For a result that must stay differentiable, use :func:`dense` (out of place) instead.
    """
    P = [int(n) for n in out_shape if n != 1]
    Q = [int(n) for n in in_shape if n != 1]
    terms = refined(terms, out_shape, in_shape)
    Ro = terms[0].out_sizes if terms else tuple(P)
    Ri = terms[0].in_sizes if terms else tuple(Q)
    Yv = Y.view(Y.shape[0], *Ro, *Ri)  # drops size-1 axes and splits others: always a view
    for term in terms:
        if term.batch not in (1, Y.shape[0]):
            raise ValueError("rule bug: factor batch size differs from the call's")
    write(terms, Yv)
    return Y


__all__ = ["dense", "kron", "materialize", "write"]
