"""Linear maps: matrix products, permutations, reshapes, broadcasts, indexing.

NOTE [Matrix products as lettered terms]
    ``Z = X @ Y`` is ``Z[i, j] = Σ_k X[i, k] Y[k, j]``, so

    * ``∂Z[i, j] / ∂X[k, l] = δ(i, k) Y[l, j]``: factor ``Y`` over letters ``lj``, out ``ij``,
      in ``il`` (``I_m ⊗ Yᵀ`` in row-major vec);
    * ``∂Z[i, j] / ∂Y[k, l] = X[i, k] δ(j, l)``: factor ``X`` over ``ik``, out ``ij``, in ``kj``
      (``X ⊗ I_q``).

    ``A X B`` traces to two products and composes to ``A[i, k] B[l, j]`` (``A ⊗ Bᵀ``) without a
    dedicated rule. ``bmm`` adds a shared letter ``h`` for its batch axis; ``mv`` and ``dot``
    drop the missing axes; ``addmm(b, X, Y) = beta b + alpha X @ Y`` scales the same terms.

NOTE [Permutations and reshapes]
    ``permute(x, dims)`` has output axis ``k`` equal to input axis ``dims[k]``: the identity with
    the input letters reordered (the commutation matrix for a transpose). ``view``/``reshape``
    are the identity on the flat row-major index, expressed over the common refinement of both
    shapes (:func:`terms.identity_reshape`). ``expand`` is a broadcast (free letters).
    ``select``, ``slice`` and ``cat`` keep a delta on the other axes and a 0/1 selection factor on
    theirs (``cat``: a shifted identity); ``stack`` places the identity at one index of the new axis.
"""

from __future__ import annotations

import torch

from . import terms
from .ops import OpContext, identity, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


@register_op(aten.mm.default)
def mm(ctx: OpContext, i: int) -> list[Term]:
    """``X @ Y`` (NOTE [Matrix products as lettered terms])."""
    X, Y = ctx.args
    if i == 0:
        return [ctx.term(Y, "lj", "ij", "il", 0)]
    return [ctx.term(X, "ik", "ij", "kj", 1)]


@register_op(aten.bmm.default)
def bmm(ctx: OpContext, i: int) -> list[Term]:
    """Per-sample batched ``X @ Y`` with its batch letter ``h`` shared."""
    X, Y = ctx.args
    if i == 0:
        return [ctx.term(Y, "hlj", "hij", "hil", 0)]
    return [ctx.term(X, "hik", "hij", "hkj", 1)]


@register_op(aten.mv.default)
def mv(ctx: OpContext, i: int) -> list[Term]:
    """``X @ y`` for a vector ``y``."""
    X, y = ctx.args
    if i == 0:
        return [ctx.term(y, "l", "i", "il", 0)]
    return [ctx.term(X, "ik", "i", "k", 1)]


@register_op(aten.dot.default)
def dot(ctx: OpContext, i: int) -> list[Term]:
    """``x · y``: the other vector (a gradient)."""
    return [ctx.term(ctx.args[1 - i], "k", "", "k", i)]


@register_op(aten.addmm.default)
def addmm(ctx: OpContext, i: int) -> list[Term]:
    """``beta b + alpha X @ Y``."""
    beta, alpha = ctx.kwargs.get("beta", 1), ctx.kwargs.get("alpha", 1)
    if i == 0:
        return identity(ctx, 0, beta)
    X, Y = ctx.args[1], ctx.args[2]
    # alpha is a number: it goes into the term's scale, never multiplied into a copy of X or Y
    if i == 1:
        return [_scaled(ctx.term(Y, "lj", "ij", "il", 1), alpha)]
    return [_scaled(ctx.term(X, "ik", "ij", "kj", 2), alpha)]


def _scaled(term: Term, c: float) -> Term:
    if c == 1:
        return term
    return Term(
        term.factors, term.out, term.inp, term.sizes, term.scale * float(c), term.dtype, term.device
    )


@register_op(aten.permute.default)
def permute(ctx: OpContext, i: int) -> list[Term]:
    """``permute(x, dims)``: identity with reordered letters (NOTE [Permutations and reshapes])."""
    n = len(ctx.in_shape(0))
    inp = letters(n)
    dims = [d % n for d in ctx.args[1]] if n else []
    return [ctx.term(1.0, "", "".join(inp[d] for d in dims), inp, 0)]


@register_op(aten.t.default)
def t(ctx: OpContext, i: int) -> list[Term]:
    """``x.t()``: the commutation matrix (identity for vectors)."""
    n = len(ctx.in_shape(0))
    return [ctx.term(1.0, "", "ji"[:n] if n == 2 else "i"[:n], "ij"[:n], 0)]


@register_op(aten.transpose.int)
def transpose(ctx: OpContext, i: int) -> list[Term]:
    """``x.transpose(d0, d1)``: identity with two letters swapped."""
    n = len(ctx.in_shape(0))
    inp = list(letters(n))
    if n:
        d0, d1 = ctx.args[1] % n, ctx.args[2] % n
        out = list(inp)
        out[d0], out[d1] = inp[d1], inp[d0]
    else:
        out = []
    return [ctx.term(1.0, "", "".join(out), "".join(inp), 0)]


@register_op(
    aten.view.default,
    aten.reshape.default,
    aten._unsafe_view.default,
    aten.unsqueeze.default,
    aten.squeeze,
    aten.flatten.using_ints,
    aten.unflatten.int,
)
def reshape(ctx: OpContext, i: int) -> list[Term]:
    """A reshape: the identity on the flat index (NOTE [Permutations and reshapes])."""
    return [terms.identity_reshape(ctx.out_shape, ctx.in_shape(0), ctx.out)]


@register_op(aten.expand.default)
def expand(ctx: OpContext, i: int) -> list[Term]:
    """``x.expand(shape)``: a broadcast identity."""
    return identity(ctx, 0)


@register_op(aten.select.int)
def select(ctx: OpContext, i: int) -> list[Term]:
    """``x.select(dim, k)``: a delta on the other axes and ``e_k`` on ``dim``."""
    shape = ctx.in_shape(0)
    n = len(shape)
    dim, k = ctx.args[1] % n, ctx.args[2]
    inp = letters(n)
    onehot = torch.zeros(1, shape[dim], dtype=ctx.out.dtype, device=ctx.out.device)
    onehot[0, k] = 1
    return [ctx.term(onehot, inp[dim], inp[:dim] + inp[dim + 1 :], inp, 0)]


@register_op(aten.slice.Tensor)
def slice_(ctx: OpContext, i: int) -> list[Term]:
    """``x[start:end:step]`` along ``dim``: a 0/1 selection matrix on that axis."""
    shape = ctx.in_shape(0)
    n = len(shape)
    dim = (ctx.args[1] if len(ctx.args) > 1 else 0) % n
    start = ctx.args[2] if len(ctx.args) > 2 else None
    end = ctx.args[3] if len(ctx.args) > 3 else None
    step = ctx.args[4] if len(ctx.args) > 4 else 1
    rows = range(shape[dim])[slice(start, end, step)]
    if len(rows) != ctx.out_shape[dim]:
        raise Unsupported("slice bounds")
    S = torch.zeros(1, len(rows), shape[dim], dtype=ctx.out.dtype, device=ctx.out.device)
    dev = ctx.out.device
    S[0, torch.arange(len(rows), device=dev), torch.tensor(list(rows), device=dev)] = 1
    inp = letters(n + 1)
    r, c = inp[n], inp[dim]
    out = inp[:dim] + r + inp[dim + 1 : n]
    return [ctx.term(S, r + c, out, inp[:n], 0)]


@register_op(aten.cat.default)
def cat(ctx: OpContext, i: int) -> list[Term]:
    """``cat(xs, dim)`` w.r.t. ``xs[i]``: a delta on the other axes and a shifted identity on ``dim``."""
    shapes = ctx.list_shapes
    shape = shapes[i]
    n = len(ctx.out_shape)
    if len(shape) != n:
        raise Unsupported("cat with a legacy empty tensor")
    d = (ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim", 0)) % n
    offset = sum(s[d] for s in shapes[:i] if len(s) == n)
    S = torch.zeros(1, ctx.out_shape[d], shape[d], dtype=ctx.out.dtype, device=ctx.out.device)
    k = torch.arange(shape[d], device=ctx.out.device)
    S[0, offset + k, k] = 1
    inp = letters(n + 1)
    r, c = inp[n], inp[d]
    out = inp[:d] + r + inp[d + 1 : n]
    return [terms.make(S, r + c, out, inp[:n], ctx.out_shape, shape, ctx.out)]


@register_op(aten.stack.default)
def stack(ctx: OpContext, i: int) -> list[Term]:
    """``stack(xs, dim)`` w.r.t. ``xs[i]``: the identity placed at index ``i`` of the new axis."""
    shape = ctx.list_shapes[i]
    n = len(ctx.out_shape)
    d = (ctx.args[1] if len(ctx.args) > 1 else ctx.kwargs.get("dim", 0)) % n
    onehot = torch.zeros(1, ctx.out_shape[d], dtype=ctx.out.dtype, device=ctx.out.device)
    onehot[0, i] = 1
    inp = letters(n)
    r = letters(1, skip=inp)
    out = inp[:d] + r + inp[d : n - 1]
    return [terms.make(onehot, r, out, inp[: n - 1], ctx.out_shape, shape, ctx.out)]
