"""Indexing with integer tensors: index_select, gather, advanced indexing, embedding, scatter,
index_add and masked_fill.

NOTE [Index Jacobians are one-hot factors]
    An op that reads ``x`` at integer positions has ``∂y[o] / ∂x[c] = [c_d = idx[o]]`` along the
    indexed axis ``d`` (a delta elsewhere): one term whose factor is ``onehot(idx, n)``, over the
    index's letters and the input's letter on ``d`` (``index_select``: ``(k, n)``; ``gather``:
    ``(*index.shape, n)``; ``x[i, :, j]``: one one-hot factor per indexed axis over the broadcast
    index shape). Repeated indices read the same entry several times: nothing special, the
    factor simply has several ones in a column. An op that writes ``src`` at positions
    (``scatter``, ``scatter_add``, ``index_add``) has the transposed factor w.r.t. ``src``, and
    w.r.t. ``self`` the identity (adding) or the mask of entries not overwritten (``scatter``).
    Index values may differ per sample (a factor with a batch axis of size ``B``).

    Where an index tensor is smaller than the input on an axis it does not index (``gather``,
    ``scatter``: ``index.size(k) <= input.size(k)``), only the leading box is read or written:
    that box is a term of its own (a ``(k, n)`` slice of the identity per such axis) composed
    with the one-hot term by :func:`terms.chain_rule`. (A scatter's ``src`` larger than its
    index is not covered: autograd raises there.)

    Where autograd's formula is not the derivative of the forward, autograd decides (as the
    reference every route is checked against): ``scatter`` with repeated indices keeps one
    ``src`` entry per position, but autograd gives every duplicate the gradient of that position
    (``grad.gather(dim, index)``), and so does this rule; ``embedding`` gives the row
    ``padding_idx`` no gradient. ``scale_grad_by_freq`` (a gradient that is not a derivative) is
    not covered.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import terms
from .ops import OpContext, broadcast_letters, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten


def onehot(idx: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """``(*idx.shape, n)`` with ``[c = idx[..] mod n]`` (negative indices count from the end)."""
    c = torch.arange(n, device=idx.device)
    return (idx.remainder(n).unsqueeze(-1) == c).to(dtype)


def box(big: Sequence[int], small: Sequence[int], like: torch.Tensor) -> Term:
    """The Jacobian of taking the leading box ``x[:small[0], :small[1], ..]`` of an input of
    shape ``big`` (same rank, ``small <= big`` per axis)."""
    inp = letters(len(big))
    fresh = letters(len(big), skip=inp)
    out = list(inp)
    factors = []
    for d, (n, k) in enumerate(zip(big, small, strict=True)):
        if k != n:
            out[d] = fresh[d]
            eye = torch.eye(k, n, dtype=like.dtype, device=like.device).unsqueeze(0)
            factors.append((eye, fresh[d] + inp[d]))
    return terms.from_factors(factors, "".join(out), inp, small, big, like)


def _index_tensor(ctx: OpContext, k: int) -> torch.Tensor:
    idx = ctx.args[k]
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
        raise Unsupported("an index that is not an integer tensor")
    return idx


@register_op(aten.index_select.default)
def index_select(ctx: OpContext, i: int) -> list[Term]:
    """``index_select(x, dim, index)``: ``onehot(index)`` on ``dim``, deltas elsewhere."""
    shape = ctx.in_shape(0)
    n = len(shape)
    if n == 0 or len(ctx.out_shape) != n:
        raise Unsupported("index_select of a 0-d tensor")
    d = int(ctx.args[1]) % n
    idx = _index_tensor(ctx, 2)
    idx = idx.reshape(idx.shape[0], -1)  # a 0-d index selects one entry
    inp = letters(n)
    r = letters(1, skip=inp)
    out = inp[:d] + r + inp[d + 1 :]
    return [ctx.term(onehot(idx, shape[d], ctx.out.dtype), r + inp[d], out, inp, 0)]


@register_op(aten.gather.default)
def gather(ctx: OpContext, i: int) -> list[Term]:
    """``gather(x, dim, index)``: ``onehot(index)`` over the index's letters and ``dim``
    (NOTE [Index Jacobians are one-hot factors])."""
    shape = ctx.in_shape(0)
    n = len(shape)
    if n == 0:
        return [ctx.term(1.0, "", "", "", 0)]  # gather of a 0-d tensor: the identity
    d = int(ctx.args[1]) % n
    idx = _index_tensor(ctx, 2)
    ishape = ctx.out_shape
    if len(ishape) != n:
        raise Unsupported("gather with an index of another rank")
    read = tuple(shape[k] if k == d else ishape[k] for k in range(n))  # the box that is read
    o = letters(n)
    c = letters(1, skip=o)
    G = terms.make(
        onehot(idx, shape[d], ctx.out.dtype),
        o + c,
        o,
        o[:d] + c + o[d + 1 :],
        ishape,
        read,
        ctx.out,
    )
    if read == tuple(shape):
        return [G]
    return [terms.chain_rule(G, box(shape, read, ctx.out))]


@register_op(aten.index.Tensor)
def index(ctx: OpContext, i: int) -> list[Term]:
    """``x[..., idx_1, ..., idx_k, ...]`` with integer tensors: one one-hot factor per indexed
    axis over the broadcast index shape (NOTE [Index Jacobians are one-hot factors])."""
    shape = ctx.in_shape(0)
    n = len(shape)
    given = list(ctx.args[1])
    if len(given) > n:
        raise Unsupported("more indices than axes")
    pos = [k for k, t in enumerate(given) if t is not None]
    idxs = []
    for k in pos:
        t = given[k]
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int64, torch.int32):
            raise Unsupported("indexing with a mask or a non-integer tensor")
        idxs.append(t)
    if not idxs:
        return [ctx.term(1.0, "", letters(n), letters(n), 0)]
    # per-sample index shapes: the batch axis (B or 1) leads each value
    bshape = torch.broadcast_shapes(*(t.shape[1:] for t in idxs))
    inp = letters(n)
    s = letters(len(bshape), skip=inp)
    rest = [inp[k] for k in range(n) if k not in pos]
    adjacent = pos == list(range(pos[0], pos[-1] + 1))
    # adjacent indexed axes are replaced in place, others moved to the front (as numpy)
    out = inp[: pos[0]] + s + inp[pos[-1] + 1 :] if adjacent else s + "".join(rest)
    if len(out) != len(ctx.out_shape):
        raise Unsupported("advanced indexing with an unexpected result shape")
    factors = []
    for k, t in zip(pos, idxs, strict=True):
        full = t.reshape(t.shape[0], *((1,) * (len(bshape) - t.ndim + 1)), *t.shape[1:])
        full = full.expand(t.shape[0], *bshape)
        factors.append((onehot(full, shape[k], ctx.out.dtype), s + inp[k]))
    return [terms.from_factors(factors, out, inp, ctx.out_shape, shape, ctx.out)]


@register_op(aten.embedding.default)
def embedding(ctx: OpContext, i: int) -> list[Term]:
    """``F.embedding(indices, weight)`` w.r.t. ``weight``: ``onehot(indices)`` on the rows, a
    delta on the columns; the row ``padding_idx`` gets none (as autograd)."""
    if i != 0:
        raise Unsupported("the indices of embedding have no derivative")
    pad = ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("padding_idx", -1)
    freq = ctx.args[3] if len(ctx.args) > 3 else ctx.kwargs.get("scale_grad_by_freq", False)
    if freq:
        raise Unsupported("embedding with scale_grad_by_freq")
    num, _ = ctx.in_shape(0)
    idx = _index_tensor(ctx, 1)
    oh = onehot(idx, num, ctx.out.dtype)
    if pad is not None and pad >= 0:
        oh = oh * (idx != pad).unsqueeze(-1).to(oh.dtype)
    s = letters(idx.ndim - 1, skip="cd")
    return [ctx.term(oh, s + "c", s + "d", "cd", 0)]


def _written(ctx: OpContext, d: int, idx: torch.Tensor, src_shape: tuple[int, ...]) -> Term:
    """``∂out / ∂src`` of a scatter along ``d`` (autograd's ``grad.gather(d, idx)``, transposed):
    the one-hot factor, then the box of ``out`` it lands in. A ``src`` larger than the index
    is not covered (autograd raises there)."""
    out_shape = ctx.out_shape
    ishape = tuple(int(k) for k in idx.shape[1:])
    if ishape != tuple(src_shape):
        raise Unsupported("scatter with a source larger than its index")
    n = len(out_shape)
    landed = tuple(out_shape[k] if k == d else ishape[k] for k in range(n))
    s = letters(n)
    a = letters(1, skip=s)
    oh = onehot(idx, out_shape[d], ctx.out.dtype)
    J = terms.make(oh, s + a, s[:d] + a + s[d + 1 :], s, landed, ishape, ctx.out)
    if landed != tuple(out_shape):
        J = terms.chain_rule(box(out_shape, landed, ctx.out).transposed(), J)
    return J


def _dim_index(ctx: OpContext) -> tuple[int, torch.Tensor]:
    n = len(ctx.out_shape)
    if n == 0:
        raise Unsupported("scatter into a 0-d tensor")
    idx = _index_tensor(ctx, 2)
    if idx.ndim - 1 != n:
        raise Unsupported("scatter with an index of another rank")
    return int(ctx.args[1]) % n, idx


def _kept(ctx: OpContext, d: int, idx: torch.Tensor) -> list[Term]:
    """``∂out / ∂self`` of an overwriting scatter: 1 where no index writes (as autograd)."""
    o = letters(len(ctx.out_shape))
    ones = torch.ones((idx.shape[0], *ctx.out_shape), dtype=ctx.out.dtype, device=ctx.out.device)
    mask = ones.scatter(1 + d, idx, 0.0)
    return [ctx.term(mask, o, o, o, 0)]


@register_op(aten.scatter.src, aten.scatter.value)
def scatter(ctx: OpContext, i: int) -> list[Term]:
    """``x.scatter(dim, index, src)``: for ``x`` the entries not overwritten; for ``src`` the
    positions it is written to (NOTE [Index Jacobians are one-hot factors])."""
    if "reduce" in ctx.kwargs:
        raise Unsupported("scatter with reduce")
    d, idx = _dim_index(ctx)
    if ctx.in_shape(0) != ctx.out_shape:
        raise Unsupported("scatter of a broadcast input")
    if i == 0:
        return _kept(ctx, d, idx)
    if i == 3:
        return [_written(ctx, d, idx, ctx.in_shape(3))]
    raise Unsupported("the index of scatter has no derivative")


@register_op(aten.scatter_add.default)
def scatter_add(ctx: OpContext, i: int) -> list[Term]:
    """``x.scatter_add(dim, index, src)``: the identity for ``x``; for ``src`` its positions."""
    d, idx = _dim_index(ctx)
    if ctx.in_shape(0) != ctx.out_shape:
        raise Unsupported("scatter of a broadcast input")
    if i == 0:
        o = letters(len(ctx.out_shape))
        return [ctx.term(1.0, "", o, o, 0)]
    if i == 3:
        return [_written(ctx, d, idx, ctx.in_shape(3))]
    raise Unsupported("the index of scatter_add has no derivative")


@register_op(aten.scatter_reduce.two)
def scatter_reduce(ctx: OpContext, i: int) -> list[Term]:
    """``scatter_reduce(x, dim, index, src, "sum", include_self)``: ``scatter_add``, with ``x``
    masked where written when ``include_self=False``; other reductions are not covered."""
    reduce = ctx.args[4] if len(ctx.args) > 4 else ctx.kwargs.get("reduce")
    include = ctx.args[5] if len(ctx.args) > 5 else ctx.kwargs.get("include_self", True)
    if reduce != "sum":
        raise Unsupported(f"scatter_reduce with {reduce!r}")
    d, idx = _dim_index(ctx)
    if i == 0 and not include:
        return _kept(ctx, d, idx)
    return scatter_add(ctx, i)


@register_op(aten.index_add.default)
def index_add(ctx: OpContext, i: int) -> list[Term]:
    """``x.index_add(dim, index, source, alpha=a)``: the identity for ``x``; for ``source``
    ``a · onehot(index)ᵀ`` on ``dim``, deltas elsewhere."""
    n = len(ctx.out_shape)
    if ctx.in_shape(0) != ctx.out_shape or n == 0:
        raise Unsupported("index_add of a broadcast or 0-d input")
    o = letters(n)
    if i == 0:
        return [ctx.term(1.0, "", o, o, 0)]
    if i != 3:
        raise Unsupported("the index of index_add has no derivative")
    if len(ctx.in_shape(3)) != n:
        raise Unsupported("index_add with a source of another rank")
    d = int(ctx.args[1]) % n
    alpha = ctx.kwargs.get("alpha", 1)
    idx = _index_tensor(ctx, 2).reshape(ctx.args[2].shape[0], -1)
    k = letters(1, skip=o)
    S = onehot(idx, ctx.out_shape[d], ctx.out.dtype).transpose(-1, -2) * alpha  # (B, n_d, k)
    return [ctx.term(S, o[d] + k, o, o[:d] + k + o[d + 1 :], 3)]


@register_op(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(ctx: OpContext, i: int) -> list[Term]:
    """``x.masked_fill(mask, v)``: ``¬mask`` for ``x``; ``mask`` for a tensor ``v`` (0-d)."""
    mask = ctx.aligned(1)
    o = letters(len(ctx.out_shape))
    if i == 0:
        keep = (~mask).to(ctx.out.dtype)
        return [ctx.term(keep, o, o, broadcast_letters(o, ctx.in_shape(0), ctx.out_shape), 0)]
    if i == 2 and ctx.in_shape(2) == ():
        return [ctx.term(mask.to(ctx.out.dtype), o, o, "", 2)]
    raise Unsupported("the mask of masked_fill has no derivative")
