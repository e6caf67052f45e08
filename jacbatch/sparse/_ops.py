"""Per-op rules of sparsity detection: how each aten op maps its inputs' index sets to its output's.

One rule per op class (NOTE [Exact and conservative op classes] in :mod:`jacbatch.sparse.detect`),
looked up per op overload, then per overload packet; an op without a rule is pointwise when
torch tags it so, and dense (every output element depends on every input element's set)
otherwise. A rule that cannot handle its arguments (an unknown index, an odd layout) raises
:class:`_Fallback`, and the op is treated as dense: never a missed dependence.

A rule is ``rule(walk, node) -> Deps | None | list[Deps | None]`` (a list for ops with several
outputs); ``walk.deps(a)`` gives an argument's sets, ``walk.value(a)`` the value of an argument
computed from constants only (or ``None``).

Size: about 770 lines, over the project's 600, on purpose: one rule per op class and the one
registry that names every op they cover, read together when checking that no op is missed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx

from ._sets import Deps, stack_rows, union

aten = torch.ops.aten
_I64 = torch.int64

Rule = Callable[[Any, torch.fx.Node], Any]


class _Fallback(Exception):
    """This rule cannot handle the node's arguments: treat the op as dense."""


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def shape(n: Any) -> tuple[int, ...]:
    """Per-sample shape of a node's value (``()`` for a number)."""
    if not isinstance(n, torch.fx.Node):
        return ()
    return tuple(int(s) for s in n.meta["val"].shape)


def ids(s: Sequence[int]) -> torch.Tensor:
    """``arange(numel).reshape(s)``: each element's flat (row-major) index."""
    return torch.arange(math.prod(s), dtype=_I64).reshape(tuple(s))


def is_random(target: Any) -> bool:
    return torch.Tag.nondeterministic_seeded in getattr(target, "tags", ())


def _differentiable(v: object) -> bool:
    return isinstance(v, torch.Tensor) and (v.dtype.is_floating_point or v.dtype.is_complex)


def mask_nondifferentiable(n: torch.fx.Node, out: Any) -> Any:
    """Integer and boolean results depend on nothing (autograd passes nothing through them)."""
    val = n.meta.get("val")
    if isinstance(val, (tuple, list)):
        outs = out if isinstance(out, (tuple, list)) else [out] * len(val)
        return [o if _differentiable(v) else None for o, v in zip(outs, val, strict=True)]
    return out if _differentiable(val) else None


def bind(n: torch.fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name (defaults filled in)."""
    schema = n.target._schema  # type: ignore[union-attr]
    got: dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if not arg.kwarg_only and i < len(n.args):
            got[arg.name] = n.args[i]
        elif arg.name in n.kwargs:
            got[arg.name] = n.kwargs[arg.name]
        elif arg.has_default_value():
            got[arg.name] = arg.default_value
        else:
            got[arg.name] = None
    return got


def _only(w: Any, n: torch.fx.Node, *xs: Any) -> None:
    """Raise :class:`_Fallback` when an input other than ``xs`` carries sets."""
    for a in n.all_input_nodes:
        if a not in xs and w.deps(a) is not None:
            raise _Fallback


def _dims(d: Any, ndim: int) -> list[int]:
    """Reduced dims: ``None`` or ``[]`` means all of them."""
    if ndim == 0:
        return []
    if d is None or (isinstance(d, (list, tuple)) and len(d) == 0):
        return list(range(ndim))
    ds = [d] if isinstance(d, int) else list(d)
    return sorted({int(k) % ndim for k in ds})


def reduce_deps(d: Deps, s: tuple[int, ...], dims: Sequence[int]) -> tuple[Deps, tuple[int, ...]]:
    """The union over ``dims`` of ``d`` (shape ``s``), with its keepdim shape."""
    keep = tuple(1 if i in dims else k for i, k in enumerate(s))
    if keep == s:
        return d, keep
    return d.scatter(ids(keep).expand(s), math.prod(keep)), keep


def _bcast(d: Deps | None, s: tuple[int, ...], out: tuple[int, ...]) -> Deps | None:
    """``d`` of shape ``s`` broadcast to ``out`` (raises when not broadcastable)."""
    if d is None or s == out:
        return d
    return d.gather(ids(s).expand(out))


def _along(
    d: Deps, s: tuple[int, ...], dim: int, po: torch.Tensor, pi: torch.Tensor, out_len: int
) -> tuple[Deps, tuple[int, ...]]:
    """The relation ``out[.., po[k], ..] ∪= in[.., pi[k], ..]`` along ``dim``, every other index
    kept; returns the sets and the new shape."""
    so = (*s[:dim], out_len, *s[dim + 1 :])
    oi = ids(so).movedim(dim, -1)[..., po]
    ii = ids(s).movedim(dim, -1)[..., pi]
    return d.relate(oi, ii, math.prod(so)), so


# ---------------------------------------------------------------------------------------------
# Rules
# ---------------------------------------------------------------------------------------------


def dense(w: Any, n: torch.fx.Node) -> Any:
    """Every output element depends on the union of every input element's set."""
    parts = [d for d in (w.deps(a) for a in n.all_input_nodes) if d is not None]
    if not parts:
        return None
    cols = torch.unique(torch.cat([p.col for p in parts]))
    k = int(cols.numel())

    def make(v: object) -> Deps | None:
        if not isinstance(v, torch.Tensor):
            return None
        r = v.numel()
        return Deps(torch.arange(r + 1, dtype=_I64) * k, cols.repeat(r), w.n)

    val = n.meta.get("val")
    if isinstance(val, (tuple, list)):
        return [make(v) for v in val]
    return make(val)


def pointwise(w: Any, n: torch.fx.Node, inputs: Sequence[Any] | None = None) -> Deps | None:
    """Output element ``k`` depends on its broadcast input elements."""
    out = shape(n)
    parts = [_bcast(w.deps(a), shape(a), out) for a in (inputs or n.all_input_nodes)]
    return union(parts, math.prod(out), w.n)


def _selected(w: Any, n: torch.fx.Node, choices: Sequence[tuple[Any, torch.Tensor]]) -> Any:
    """Output element ``k`` depends on input ``a``'s broadcast element where ``mask[k]``."""
    out = shape(n)
    parts = []
    for a, mask in choices:
        d = w.deps(a)
        if d is not None:
            src = ids(shape(a)).expand(out).reshape(-1)
            parts.append(d.gather(torch.where(mask.expand(out).reshape(-1), src, -1)))
    return union(parts, math.prod(out), w.n)


def _bool_value(w: Any, a: Any) -> torch.Tensor | None:
    v = w.known(a) if isinstance(a, torch.fx.Node) else None
    return v.detach().cpu().to(torch.bool) if isinstance(v, torch.Tensor) else None


def _where(w: Any, n: torch.fx.Node) -> Any:
    """``where(cond, a, b)``: with a known ``cond`` (computed from constants), each element
    depends on the branch it takes; otherwise on both (pointwise)."""
    cond = _bool_value(w, n.args[0])
    if cond is None:
        return pointwise(w, n)
    return _selected(w, n, [(n.args[1], cond), (n.args[2], ~cond)])


def _masked_fill(w: Any, n: torch.fx.Node) -> Any:
    """``masked_fill(x, mask, value)``: with a known ``mask``, the filled elements depend on
    ``value`` only, the others on ``x`` only."""
    mask = _bool_value(w, n.args[1])
    if mask is None:
        return pointwise(w, n)
    return _selected(w, n, [(n.args[0], ~mask), (n.args[2], mask)])


def _mul(w: Any, n: torch.fx.Node) -> Any:
    """``a * b`` with a known factor (a constant mask): where it is exactly zero, the product
    depends on nothing (its derivative there is ``0 * a'``); elsewhere pointwise."""
    for i in (0, 1):
        a, b = n.args[i], n.args[1 - i]
        if not isinstance(a, torch.fx.Node) or w.deps(a) is not None:
            continue
        v = w.value(a)
        if isinstance(v, torch.Tensor) and not v.is_complex() and bool((v == 0).any()):
            w.known(a)  # the pattern now depends on its zeros
            return _selected(w, n, [(b, (v != 0).detach().cpu())])
    return pointwise(w, n)


def _zero(w: Any, n: torch.fx.Node) -> None:
    return None


def _copy(w: Any, n: torch.fx.Node) -> Deps | None:
    return pointwise(w, n, [n.args[1]])  # copy(self, src): the values are src's


def _moved(fill: dict[int, Any] | None = None) -> Rule:
    """Data movement: the op applied to element ids tells each output element's source.

    Every differentiable input gets ids ``offset + 1 ..`` (float64, exact below 2**53), so that a
    filler (padding, the zeros of ``tril``) reads as ``0``: depends on nothing. Index tensors
    must be known (computed from constants); ``fill`` overrides argument positions (a padding
    value) with 0.
    """

    def rule(w: Any, n: torch.fx.Node) -> Any:
        parts: list[Deps | None] = []
        sizes: list[int] = []

        def sub(a: torch.fx.Node) -> Any:
            v = a.meta.get("val")
            if isinstance(v, torch.Tensor) and _differentiable(v):
                k = v.numel()
                offset = sum(sizes)
                sizes.append(k)
                parts.append(w.deps(a))
                return torch.arange(offset + 1, offset + k + 1, dtype=torch.float64).reshape(
                    v.shape
                )
            if isinstance(v, torch.Tensor) and n.target.overloadpacket not in _INDEXED:  # type: ignore[union-attr]
                return torch.zeros(v.shape, dtype=torch.float64)  # integer data: no set
            val = w.known(a)
            if val is None:
                raise _Fallback  # an index computed from the arguments: value-dependent
            return val.cpu() if isinstance(val, torch.Tensor) else val

        args = list(torch.fx.node.map_arg(n.args, sub))
        kwargs = dict(torch.fx.node.map_arg(n.kwargs, sub))
        for i, v in (fill or {}).items():
            if i < len(args):
                args[i] = v
        got = n.target(*args, **kwargs)  # type: ignore[operator]
        src = stack_rows(parts, sizes, w.n)

        def rows(t: object) -> Deps | None:
            if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
                return None
            return src.gather(t.detach().reshape(-1).round().to(_I64) - 1)

        if isinstance(got, (tuple, list)):
            return [rows(t) for t in got]
        return rows(got)

    return rule


#: Movement ops whose integer tensor arguments are indices (their values are needed); in any
#: other op an integer tensor is data, which depends on nothing.
_INDEXED = {
    getattr(aten, name)
    for name in (
        "index_select", "gather", "index", "_unsafe_index", "take", "embedding", "index_fill",
        "scatter", "repeat_interleave",
    )
}  # fmt: skip


def _as_strided(w: Any, n: torch.fx.Node) -> Any:
    v = n.args[0].meta["val"]  # type: ignore[union-attr]
    if not v.is_contiguous() or v.storage_offset() != 0:
        raise _Fallback
    if v.untyped_storage().nbytes() != v.numel() * v.element_size():
        raise _Fallback
    return _moved()(w, n)


def _reduction(w: Any, n: torch.fx.Node) -> Any:
    b = bind(n)
    x = b.get("self", b.get("input"))
    _only(w, n, x)
    d, s = w.deps(x), shape(x)
    r, _ = reduce_deps(d, s, _dims(b.get("dim"), len(s)))
    val = n.meta["val"]
    outs = val if isinstance(val, (tuple, list)) else (val,)
    if any(isinstance(v, torch.Tensor) and v.numel() != r.rows for v in outs):
        raise _Fallback
    return [r] * len(outs) if isinstance(val, (tuple, list)) else r


def _fiber(dims_of: Callable[[dict[str, Any], int], list[int]], extra: Sequence[str] = ()) -> Rule:
    """Every output element depends on its whole fiber along the dims; ``extra`` arguments
    (a layer norm's weight and bias) join output 0 pointwise."""

    def rule(w: Any, n: torch.fx.Node) -> Any:
        b = bind(n)
        x = b.get("self", b.get("input"))
        _only(w, n, x, *(b[e] for e in extra))
        d, s = w.deps(x), shape(x)
        r = keep = None
        if d is not None:
            r, keep = reduce_deps(d, s, dims_of(b, len(s)))
        val = n.meta["val"]
        outs = list(val) if isinstance(val, (tuple, list)) else [val]
        res: list[Deps | None] = []
        for k, v in enumerate(outs):
            if not isinstance(v, torch.Tensor):
                res.append(None)
                continue
            vs = tuple(int(q) for q in v.shape)
            got = None
            if r is not None and keep is not None:
                if len(vs) == len(keep):
                    got = r.gather(ids(keep).expand(vs))
                elif math.prod(vs) == r.rows:
                    got = r
                else:
                    raise _Fallback
            if k == 0 and extra:
                got = union(
                    [got, *(_bcast(w.deps(b[e]), shape(b[e]), vs) for e in extra)],
                    math.prod(vs),
                    w.n,
                )
            res.append(got)
        return res if isinstance(val, (tuple, list)) else res[0]

    return rule


def _dim_arg(b: dict[str, Any], ndim: int) -> list[int]:
    return [int(b["dim"]) % ndim] if ndim else []


def _layer_dims(b: dict[str, Any], ndim: int) -> list[int]:
    return list(range(ndim - len(b["normalized_shape"]), ndim))


def _channel_norm(w: Any, n: torch.fx.Node) -> Any:
    """Batch norm (training: each element depends on its whole channel; eval: pointwise) and
    group norm (its whole group of channels), plus its channel's weight and bias. The op's
    other outputs (statistics) are treated as dense."""
    b = bind(n)
    x, weight, bias = b["input"], b.get("weight"), b.get("bias")
    _only(w, n, x, weight, bias)
    sx = shape(x)
    if len(sx) < 2:
        raise _Fallback
    C = sx[1]
    name = n.target.overloadpacket.__name__  # type: ignore[union-attr]
    d = w.deps(x)
    if d is not None and name == "native_group_norm":
        G = int(b["group"])
        grouped = (sx[0], G, math.prod(sx) // (sx[0] * G))
        r, keep = reduce_deps(d, grouped, [2])
        d = r.gather(ids(keep).expand(grouped))
    elif d is not None and bool(b.get("training", False)):
        dims = [0, *range(2, len(sx))]
        r, keep = reduce_deps(d, sx, dims)
        d = r.gather(ids(keep).expand(sx))
    view = (1, C, *([1] * (len(sx) - 2)))
    out0 = union([d, _part(w, weight, [], view, sx), _part(w, bias, [], view, sx)],
                 math.prod(sx), w.n)  # fmt: skip
    rest = dense(w, n)
    return [out0, *rest[1:]]


def _prefix(w: Any, n: torch.fx.Node) -> Any:
    """``cumsum`` and friends: element ``p`` of a fiber depends on elements ``0..p``."""
    b = bind(n)
    x = b["self"]
    _only(w, n, x)
    d, s = w.deps(x), shape(x)
    if not s:
        r = d
    else:
        dim = int(b["dim"]) % len(s)
        po, pi = torch.tril_indices(s[dim], s[dim])
        r, _ = _along(d, s, dim, po, pi, s[dim])
    val = n.meta["val"]
    return [r] * len(val) if isinstance(val, (tuple, list)) else r


def _part(w: Any, a: Any, dims: Sequence[int], view: tuple[int, ...], out: tuple[int, ...]) -> Any:
    """An operand's contribution to a contraction: its union over the contracted ``dims``,
    viewed as ``view`` and broadcast to the output ``out``."""
    d = w.deps(a)
    if d is None:
        return None
    r, _ = reduce_deps(d, shape(a), dims)
    return r.gather(ids(view).expand(out))


def _contraction(kind: str) -> Rule:
    """``Z[i, j]`` depends on ``A[i, :]`` and ``B[:, j]`` (and ``C[i, j]`` for ``add*``)."""

    def rule(w: Any, n: torch.fx.Node) -> Any:
        out = shape(n)
        args = list(n.args)
        parts: list[Any] = []
        if kind.startswith("add") or kind == "baddbmm":
            c = args.pop(0)
            parts.append(_bcast(w.deps(c), shape(c), out))
        a, b = args[0], args[1]
        sa, sb = shape(a), shape(b)
        if kind in ("mm", "addmm"):
            parts += [_part(w, a, [1], (sa[0], 1), out), _part(w, b, [0], (1, sb[1]), out)]
        elif kind in ("bmm", "baddbmm"):
            parts += [
                _part(w, a, [2], (sa[0], sa[1], 1), out),
                _part(w, b, [1], (sb[0], 1, sb[2]), out),
            ]
        elif kind in ("mv", "addmv"):
            parts += [_part(w, a, [1], (sa[0],), out), _part(w, b, [0], (), out)]
        elif kind == "dot":
            parts += [_part(w, a, [0], (), out), _part(w, b, [0], (), out)]
        elif kind == "addbmm":
            parts += [_part(w, a, [0, 2], (sa[1], 1), out), _part(w, b, [0, 1], (1, sb[2]), out)]
        elif kind == "addr":
            parts += [_part(w, a, [], (sa[0], 1), out), _part(w, b, [], (1, sb[0]), out)]
        else:  # pragma: no cover - every registered kind is handled above
            raise _Fallback
        return union(parts, math.prod(out), w.n)

    return rule


def _scatter_into(
    w: Any,
    n: torch.fx.Node,
    self_node: Any,
    dest: torch.Tensor,
    src_node: Any,
    src_pos: torch.Tensor | None,
    accumulate: bool,
) -> Deps | None:
    """Written element ``dest[k]`` depends on source element ``src_pos[k]`` (every writer, all
    duplicates); the destination's own element stays where it is accumulated into or not
    written."""
    out = shape(n)
    rows = math.prod(out)
    parts: list[Deps | None] = []
    ds = w.deps(self_node)
    if ds is not None:
        if accumulate:
            parts.append(ds)
        else:
            keep = torch.ones(rows, dtype=torch.bool)
            keep[dest.reshape(-1)] = False
            parts.append(ds.gather(torch.where(keep, torch.arange(rows), -1)))
    dv = w.deps(src_node) if src_node is not None else None
    if dv is not None and src_pos is not None:
        parts.append(dv.relate(dest, src_pos, rows))
    return union(parts, rows, w.n)


def _known(w: Any, a: Any) -> torch.Tensor:
    v = w.known(a)
    if not isinstance(v, torch.Tensor):
        raise _Fallback
    return v.cpu()


def _index_put(w: Any, n: torch.fx.Node) -> Any:
    b = bind(n)
    _only(w, n, b["self"], b["values"])
    idx = [None if i is None else _known(w, i) for i in b["indices"]]
    dest = aten.index.Tensor(ids(shape(n)), idx)
    src_pos = ids(shape(b["values"])).expand(dest.shape)
    return _scatter_into(w, n, b["self"], dest, b["values"], src_pos, bool(b["accumulate"]))


def _scatter(w: Any, n: torch.fx.Node) -> Any:
    b = bind(n)
    src = b.get("src")
    _only(w, n, b["self"], src)
    index = _known(w, b["index"])
    dim = int(b["dim"]) % max(len(shape(n)), 1)
    dest = ids(shape(n)).gather(dim, index)
    src_pos = None
    if isinstance(src, torch.fx.Node):
        src_pos = ids(shape(src))[tuple(slice(0, k) for k in index.shape)]
    packet = n.target.overloadpacket  # type: ignore[union-attr]
    accumulate = packet is aten.scatter_add or (
        packet is aten.scatter_reduce and bool(b.get("include_self", True))
    )
    return _scatter_into(w, n, b["self"], dest, src, src_pos, accumulate)


def _index_add(w: Any, n: torch.fx.Node) -> Any:
    b = bind(n)
    _only(w, n, b["self"], b["source"])
    index = _known(w, b["index"])
    dim = int(b["dim"]) % max(len(shape(n)), 1)
    dest = ids(shape(n)).index_select(dim, index)
    src_pos = ids(shape(b["source"]))
    accumulate = n.target.overloadpacket is aten.index_add  # type: ignore[union-attr]
    return _scatter_into(w, n, b["self"], dest, b["source"], src_pos, accumulate)


def _window_pairs(
    L: int, O: int, K: int, stride: int, pad: int, dil: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along one spatial dim: output position ``o`` reads input ``o * stride - pad + k * dil``
    for taps ``k < K``; the valid (inside the input) ``(o, i, k)`` triples."""
    o = torch.arange(O).unsqueeze(1)
    k = torch.arange(K).unsqueeze(0)
    i = o * stride - pad + k * dil
    ok = (i >= 0) & (i < L)
    return o.expand(O, K)[ok], i[ok], k.expand(O, K)[ok]


def _ints(v: Any, k: int, default: int | None = None) -> list[int]:
    """A conv/pool size argument (an int or a list of 1 or ``k`` ints) as ``k`` ints."""
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        if default is None:
            raise _Fallback
        return [default] * k
    vs = [int(v)] * k if isinstance(v, int) else [int(q) for q in v]
    return vs * k if len(vs) == 1 else vs


def _convolution(w: Any, n: torch.fx.Node) -> Any:
    """``convolution(input, weight, bias, stride, padding, dilation, transposed, ..., groups)``:
    output ``(n, co, o..)`` depends on input ``(n, ci, i..)`` for ``ci`` in ``co``'s group and
    ``i`` in the receptive field (applied one dim at a time: the relation is a product), on the
    weights ``(co, :, k..)`` whose taps land inside the input, and on ``bias[co]``."""
    b = bind(n)
    if b["transposed"]:
        raise _Fallback
    x, wt, bias = b["input"], b["weight"], b["bias"]
    sx, sw, out = shape(x), shape(wt), shape(n)
    k = len(sx) - 2
    stride, pad = _ints(b["stride"], k), _ints(b["padding"], k)
    dil, groups = _ints(b["dilation"], k), int(b["groups"])
    cout, cin = sw[0], sx[1]
    parts: list[Deps | None] = []
    d = w.deps(x)
    if d is not None:
        co = torch.arange(cout).repeat_interleave(cin // groups)
        ci = (co // (cout // groups)) * (cin // groups) + torch.arange(cin // groups).repeat(cout)
        d, cur = _along(d, sx, 1, co, ci, cout)
        for j in range(k):
            po, pi, _ = _window_pairs(sx[2 + j], out[2 + j], sw[2 + j], stride[j], pad[j], dil[j])
            d, cur = _along(d, cur, 2 + j, po, pi, out[2 + j])
        parts.append(d)
    dw = w.deps(wt)
    if dw is not None:
        dw, cur = reduce_deps(dw, sw, [1])
        for j in range(k):
            po, _, pk = _window_pairs(sx[2 + j], out[2 + j], sw[2 + j], stride[j], pad[j], dil[j])
            dw, cur = _along(dw, cur, 2 + j, po, pk, out[2 + j])
        parts.append(dw.gather(ids((1, cur[0], *cur[2:])).expand(out)))
    if isinstance(bias, torch.fx.Node):
        parts.append(_part(w, bias, [], (1, cout, *([1] * k)), out))
    return union(parts, math.prod(out), w.n)


def _pool(adaptive: bool = False) -> Rule:
    """Pooling over the last spatial dims: an output element depends on its window (max
    pooling picks one by value: conservative)."""

    def rule(w: Any, n: torch.fx.Node) -> Any:
        b = bind(n)
        x = b["self"]
        _only(w, n, x)
        d, sx = w.deps(x), shape(x)
        val = n.meta["val"]
        out = tuple(int(q) for q in (val[0] if isinstance(val, (tuple, list)) else val).shape)
        name = n.target.overloadpacket.__name__  # type: ignore[union-attr]
        k = 3 if "3d" in name else 2 if "2d" in name else 1
        cur = sx
        for j in range(k):
            dim = len(sx) - k + j
            L, O = sx[dim], out[dim]
            if adaptive:
                o = torch.arange(O)
                start, end = (o * L) // O, ((o + 1) * L + O - 1) // O
                width = int((end - start).max())
                ii = start.unsqueeze(1) + torch.arange(width).unsqueeze(0)
                ok = ii < end.unsqueeze(1)
                po, pi = o.unsqueeze(1).expand_as(ii)[ok], ii[ok]
            else:
                K = _ints(b["kernel_size"], k)[j]
                stride = _ints(b.get("stride"), k, K)[j] if b.get("stride") else K
                pad = _ints(b.get("padding", 0), k)[j]
                dil = _ints(b.get("dilation", 1), k)[j]
                po, pi, _ = _window_pairs(L, O, K, stride, pad, dil)
            d, cur = _along(d, cur, dim, po, pi, O)
        if cur != out:
            raise _Fallback
        return [d, None] if isinstance(val, (tuple, list)) else d

    return rule


#: Largest ``in_plane * out_plane`` for which an interpolation's weights are found by applying
#: it to basis images (above it, the op is treated as dense).
INTERPOLATION_LIMIT = 1 << 22


def _interpolation(w: Any, n: torch.fx.Node) -> Any:
    """Linear, bilinear, bicubic, trilinear upsampling ``(N, C, *S) -> (N, C, *O)``: each
    ``(n, c)`` plane is mapped by the same fixed weights, whatever the values. The op is
    applied to the ``S``-plane basis images (one per input position, in the batch dim); its
    nonzero weights are the plane's relation, exactly (a weight that is exactly zero gives a
    zero derivative too)."""
    x = n.args[0]
    _only(w, n, x)
    if any(isinstance(a, torch.fx.Node) for a in (*n.args[1:], *n.kwargs.values())):
        raise _Fallback
    sx, out = shape(x), shape(n)
    plane, oplane = math.prod(sx[2:]), math.prod(out[2:])
    if len(sx) < 3 or sx[:2] != out[:2] or plane * oplane > INTERPOLATION_LIMIT:
        raise _Fallback
    basis = torch.eye(plane, dtype=torch.float64).reshape(plane, 1, *sx[2:])
    y = n.target(basis, *n.args[1:], **n.kwargs)  # type: ignore[operator]
    i_sp, o_sp = (y.reshape(plane, oplane) != 0).nonzero(as_tuple=True)
    nc = torch.arange(sx[0] * sx[1]).unsqueeze(1)
    return w.deps(x).relate(nc * oplane + o_sp, nc * plane + i_sp, math.prod(out))


def _glu(w: Any, n: torch.fx.Node) -> Any:
    """``glu(x, dim)``: element ``i`` of the output is ``a[i] * sigmoid(b[i])`` with ``a``, ``b``
    the halves of ``x`` along ``dim``."""
    b = bind(n)
    x = b["self"]
    _only(w, n, x)
    s = shape(x)
    dim = int(b["dim"]) % len(s)
    h = s[dim] // 2
    o = torch.arange(h)
    d, _ = _along(w.deps(x), s, dim, torch.cat([o, o]), torch.cat([o, o + h]), h)
    return d


def _trace(w: Any, n: torch.fx.Node) -> Any:
    """``trace(x)``: the sum of the diagonal."""
    x = n.args[0]
    _only(w, n, x)
    diag = w.deps(x).gather(ids(shape(x)).diagonal())
    return diag.scatter(torch.zeros(diag.rows, dtype=_I64), 1)


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

_RULES: dict[Any, Rule] = {}


def _register(rule: Rule, *ops: str) -> None:
    for name in ops:
        packet, _, overload = name.partition(".")
        p = getattr(aten, packet, None)
        if p is None:
            continue
        op = getattr(p, overload, None) if overload else p
        if op is not None:
            _RULES[op] = rule


_register(
    _zero,
    "detach", "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_ones",
    "new_empty", "new_full", "sign", "floor", "ceil", "round", "trunc", "fill.Scalar",
    "heaviside", "zero",
)  # fmt: skip
_register(_copy, "copy.default")
_register(pointwise, "_to_copy", "clamp", "clamp_min", "clamp_max")
_register(_where, "where.self")
_register(_masked_fill, "masked_fill")
_register(_mul, "mul.Tensor")
_register(
    _moved(),
    "view", "_unsafe_view", "reshape", "view_copy", "_reshape_copy", "_reshape_alias", "permute",
    "permute_copy", "transpose", "transpose_copy", "t", "t_copy", "expand", "expand_copy",
    "slice", "slice_copy", "select", "select_copy", "squeeze", "squeeze_copy", "unsqueeze",
    "unsqueeze_copy", "flip", "roll", "cat", "stack", "split", "split_with_sizes",
    "unsafe_split", "unsafe_split_with_sizes", "split_copy", "split_with_sizes_copy", "unbind",
    "unbind_copy", "index_select", "gather", "index.Tensor", "diagonal", "diagonal_copy",
    "clone", "alias", "alias_copy", "lift_fresh_copy", "repeat", "unfold", "unfold_copy",
    "flatten", "unflatten", "block_diag", "diag_embed", "tril", "triu", "reflection_pad1d",
    "reflection_pad2d", "reflection_pad3d", "replication_pad1d", "replication_pad2d",
    "replication_pad3d", "slice_scatter", "select_scatter", "diagonal_scatter", "take",
    "embedding", "narrow", "movedim", "pixel_shuffle", "pixel_unshuffle", "upsample_nearest1d",
    "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact1d",
    "_upsample_nearest_exact2d", "_upsample_nearest_exact3d", "rot90", "diag", "im2col",
    "contiguous", "expand_as", "view_as", "reshape_as", "repeat_interleave.self_int",
    "_unsafe_index",
)  # fmt: skip
_register(_moved({2: 0.0}), "constant_pad_nd")
_register(_moved({3: 0.0}), "index_fill", "scatter.value")
_register(_as_strided, "as_strided", "as_strided_copy")
_register(
    _reduction,
    "sum", "mean", "prod", "amax", "amin", "max.default", "min.default", "max.dim", "min.dim",
    "logsumexp", "var", "std", "var_mean", "std_mean", "linalg_vector_norm", "norm", "nansum",
    "nanmean", "median", "nanmedian", "kthvalue", "mode", "aminmax",
)  # fmt: skip
_register(
    _fiber(_dim_arg),
    "_softmax", "_log_softmax", "softmax", "log_softmax", "_safe_softmax", "sort", "topk",
)  # fmt: skip
_register(_fiber(_layer_dims, ("weight", "bias")), "native_layer_norm")
_register(
    _channel_norm,
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit_functional", "native_batch_norm", "native_group_norm",
)  # fmt: skip
_register(_prefix, "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin")
for _kind in ("mm", "bmm", "mv", "dot", "addmm", "baddbmm", "addmv", "addbmm", "addr"):
    _register(_contraction(_kind), _kind)
_register(_contraction("dot"), "vdot")
_register(_index_put, "index_put", "_unsafe_index_put")
_register(_scatter, "scatter.src", "scatter_add", "scatter_reduce.two")
_register(_index_add, "index_add", "index_copy")
_register(_convolution, "convolution")
_register(
    _interpolation,
    "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
    "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
)  # fmt: skip
_register(_glu, "glu")
_register(_trace, "trace")
_register(pointwise, "_prelu_kernel", "prelu")
_register(
    _pool(),
    "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool2d", "avg_pool3d",
)  # fmt: skip
_register(
    _pool(adaptive=True),
    "_adaptive_avg_pool2d", "_adaptive_avg_pool3d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "adaptive_max_pool2d", "adaptive_max_pool3d",
)  # fmt: skip


def lookup(op: Any) -> Rule | None:
    """The rule for an op (its overload first, then its packet), or ``None``."""
    rule = _RULES.get(op)
    if rule is None and hasattr(op, "overloadpacket"):
        rule = _RULES.get(op.overloadpacket)
    return rule


def propagate(w: Any, n: torch.fx.Node) -> Any:
    """The sets of node ``n``'s output(s) (see the module docstring)."""
    rule = lookup(n.target)
    if rule is None:
        rule = pointwise if torch.Tag.pointwise in getattr(n.target, "tags", ()) else dense
    if rule is dense:
        return dense(w, n)
    try:
        return rule(w, n)
    except Exception:  # _Fallback, or arguments a rule does not cover: dense, never a miss
        return dense(w, n)


__all__ = ["dense", "lookup", "mask_nondifferentiable", "propagate", "shape"]
