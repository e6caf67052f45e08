"""Rewrites of a traced Hessian program (:mod:`jacbatch.hessian`) that keep its values.

The program composes the op rules' terms as traced; two patterns cost it real time:

* a ``bmm`` whose second operand is one matrix expanded over the batch (a weight): torch runs
  it as a loop of small products with a copy each; one ``mm`` of the stacked rows is the same
  sums;
* a large intermediate scaled twice in a row by small broadcast factors (a sign mask, a
  constant, a per-sample scale): the factors are multiplied first, so the large tensor is
  read and written once.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx

_aten = torch.ops.aten


def shared_bmm_to_mm(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``bmm(A, W)`` with ``W`` one matrix shared by the batch (stride 0 over it) as one
    ``mm`` of the stacked rows of ``A``: ``bmm`` runs such a batch as a loop of small matrix
    products, each with a copy. Same sums in the same order per entry. Returns the count."""
    count = 0
    for nd in list(gm.graph.nodes):
        if nd.op != "call_function" or nd.target is not _aten.bmm.default:
            continue
        a, e = nd.args
        val = nd.meta.get("val")
        ev = e.meta.get("val") if isinstance(e, torch.fx.Node) else None
        if not isinstance(val, torch.Tensor) or not isinstance(ev, torch.Tensor):
            continue
        B, m, n = (int(v) for v in val.shape)
        if B < 2 or ev.stride(0) != 0:
            continue
        k = int(ev.shape[1])
        with gm.graph.inserting_before(nd):
            rows = gm.graph.call_function(_aten.reshape.default, (a, [B * m, k]))
            w = gm.graph.call_function(_aten.select.int, (e, 0, 0))
            mm = gm.graph.call_function(_aten.mm.default, (rows, w))
            out = gm.graph.call_function(_aten.view.default, (mm, [B, m, n]))
        nd.replace_all_uses_with(out)
        gm.graph.erase_node(nd)
        count += 1
    if count:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return count


def _same_view(nd: torch.fx.Node) -> bool:
    """A ``view``/``permute`` node that returns its input unchanged (same shape and strides)."""
    if nd.op != "call_function" or nd.target not in (_aten.view.default, _aten.permute.default):
        return False
    src = nd.args[0]
    v, sv = nd.meta.get("val"), getattr(src, "meta", {}).get("val")
    return (
        isinstance(v, torch.Tensor)
        and isinstance(sv, torch.Tensor)
        and v.shape == sv.shape
        and v.stride() == sv.stride()
    )


def fold_scalings(gm: torch.fx.GraphModule) -> int:
    """``mul(mul(X, a), b)`` with ``X`` large and ``a``, ``b`` small broadcast factors (a
    sign mask, a constant, a per-sample scale), where the inner product has no other use, as
    ``mul(X, mul(a, b))``: one pass over ``X`` instead of two (the factors commute; each entry
    is rounded once less). Views that change nothing are dropped first. Returns the count."""
    for nd in list(gm.graph.nodes):
        if _same_view(nd):
            nd.replace_all_uses_with(nd.args[0])
            gm.graph.erase_node(nd)

    def small(n: Any, big: torch.Tensor) -> bool:
        v = n.meta.get("val") if isinstance(n, torch.fx.Node) else None
        return isinstance(v, torch.Tensor) and v.numel() * 64 <= big.numel()

    count = 0
    for nd in list(gm.graph.nodes):
        if nd.op != "call_function" or nd.target is not _aten.mul.Tensor:
            continue
        inner, b = nd.args
        if not (isinstance(inner, torch.fx.Node) and inner.target is _aten.mul.Tensor):
            continue
        if len(inner.users) != 1:
            continue
        x, a = inner.args
        xv, v = getattr(x, "meta", {}).get("val"), nd.meta.get("val")
        if not (isinstance(xv, torch.Tensor) and isinstance(v, torch.Tensor)):
            continue
        if xv.shape != v.shape or not (small(a, xv) and small(b, xv)):
            continue
        if not isinstance(a, torch.fx.Node) or not isinstance(b, torch.fx.Node):
            continue
        if a.meta["val"].dim() != xv.dim() or b.meta["val"].dim() != xv.dim():
            continue
        with gm.graph.inserting_before(nd):
            ab = gm.graph.call_function(_aten.mul.Tensor, (a, b))
            new = gm.graph.call_function(_aten.mul.Tensor, (x, ab))
        new.meta["val"] = v
        nd.replace_all_uses_with(new)
        gm.graph.erase_node(nd)
        gm.graph.erase_node(inner)
        count += 1
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return count


__all__ = ["fold_scalings", "shared_bmm_to_mm"]
