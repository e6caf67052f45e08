"""Convolutions (``aten.convolution``: conv1d/2d/3d and their transposes, any stride, padding,
dilation and groups).

NOTE [Convolution Jacobians]
    A convolution is linear in its input and in its weight. Per spatial axis, output position
    ``p`` and kernel offset ``k`` read input position ``q = p s + k d - pad`` (stride ``s``,
    dilation ``d``); a transposed convolution writes ``p = q s + k d - pad`` instead. Both are the
    0/1 tensor ``S[p, k, q]`` (out-of-range positions are zero padding: no entry). Then, with
    ``W̄[o, c, k]`` the weight spread over all channel pairs (zero across groups),

    * w.r.t. the input: ``∂y[n, o, p] / ∂x[n, c, q] = Σ_k W̄[o, c, k] Π_axes S[p, k, q]``: one dense
      factor over ``(o, p, c, q)``, built once per call by one einsum (per sample only when the
      weight is per sample), and a delta on the batch axis ``n`` of the op. It is the size of
      one sample's Jacobian block, so the rule refuses above :data:`DENSE_LIMIT` elements;
    * w.r.t. the weight: ``∂y[n, o, p] / ∂w[o, c, k] = x̃[n, c_o, p, k]``, the unfolded input
      ``x̃ = Σ_q x[n, c, q] Π S[p, k, q]`` (im2col) with ``c_o`` the input channel ``c`` of
      ``o``'s group, and a delta on ``o``; transposed: ``w[c, o', k]`` with ``o' = o`` within the
      group, a 0/1 factor ``[o' = o mod O_g][group(c) = group(o)]`` where there are groups;
    * w.r.t. the bias: the identity broadcast over the batch and spatial axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import terms
from .ops import OpContext, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten

#: Largest dense input Jacobian factor (elements) a convolution builds.
DENSE_LIMIT = 1 << 24


def _per_axis(v: Sequence[int], k: int) -> list[int]:
    v = [int(a) for a in v]
    return v * k if len(v) == 1 else v


def _selection(
    P: int, K: int, Q: int, s: int, d: int, pad: int, transposed: bool, like: torch.Tensor
) -> torch.Tensor:
    """``S[p, k, q]`` of NOTE [Convolution Jacobians] for one spatial axis: ``(P, K, Q)``."""
    dev = like.device
    p = torch.arange(P, device=dev)[:, None, None]
    k = torch.arange(K, device=dev)[None, :, None]
    q = torch.arange(Q, device=dev)[None, None, :]
    hit = (p == q * s + k * d - pad) if transposed else (q == p * s + k * d - pad)
    return hit.to(like.dtype)


def _spread(w: torch.Tensor, cout: int, cin: int, groups: int, transposed: bool) -> torch.Tensor:
    """``W̄[z, o, c, *k]`` (zero across groups) from the weight ``(z, *weight_shape)``."""
    og, cg = cout // groups, cin // groups
    if transposed:  # (z, cin, og, *k) -> (z, og, cin, *k)
        w = w.transpose(1, 2)
    if groups == 1:
        return w
    # w: (z, cout, cg, *k) as (z, G, og, cg, *k) placed on the block diagonal of (G, og, G, cg)
    if transposed:  # (z, og, cin, *k) = (z, og, G, cg, *k): the group of the input channel
        blocks = w.reshape(w.shape[0], og, groups, cg, *w.shape[3:]).transpose(1, 2)
    else:
        blocks = w.reshape(w.shape[0], groups, og, cg, *w.shape[3:])
    eye = torch.eye(groups, dtype=w.dtype, device=w.device)
    full = torch.einsum("zgac...,gh->zgahc...", blocks, eye)
    return full.reshape(w.shape[0], cout, cin, *w.shape[3:])


@register_op(aten.convolution.default)
def convolution(ctx: OpContext, i: int) -> list[Term]:
    """``aten.convolution(x, w, b, stride, padding, dilation, transposed, output_padding,
    groups)`` w.r.t. ``x``, ``w`` or ``b`` (NOTE [Convolution Jacobians])."""
    x, w = ctx.args[0], ctx.args[1]
    transposed, groups = bool(ctx.args[6]), int(ctx.args[8])
    xs, ws, ys = ctx.in_shape(0), ctx.in_shape(1), ctx.out_shape
    nsp = len(ws) - 2
    if len(xs) != nsp + 2 or len(ys) != nsp + 2:
        raise Unsupported("a convolution without a batch axis")
    stride = _per_axis(ctx.args[3], nsp)
    padding = _per_axis(ctx.args[4], nsp)
    dilation = _per_axis(ctx.args[5], nsp)
    cin, cout = xs[1], ys[1]
    Pn, Qn, Kn = ys[2:], xs[2:], ws[2:]
    sel = [
        _selection(Pn[a], Kn[a], Qn[a], stride[a], dilation[a], padding[a], transposed, ctx.out)
        for a in range(nsp)
    ]
    # integer einsum letters: z batch, n, o, c, then p, k, q per spatial axis
    Z, N, O, C = 0, 1, 2, 3
    p = [5 + 3 * a for a in range(nsp)]
    k = [6 + 3 * a for a in range(nsp)]
    q = [7 + 3 * a for a in range(nsp)]
    sel_ops: list[object] = []
    for a in range(nsp):
        sel_ops += [sel[a], [p[a], k[a], q[a]]]
    L = _Letters(nsp)
    if i == 2:
        return [ctx.term(1.0, "", L.out, L.o, 2)]
    if i == 0:
        size = w.shape[0] * cout * math.prod(Pn) * cin * math.prod(Qn)
        if size > DENSE_LIMIT:
            raise Unsupported(f"a convolution Jacobian factor of {size} elements")
        Wb = _spread(w, cout, cin, groups, transposed)
        F = torch.einsum(Wb, [Z, O, C, *k], *sel_ops, [Z, O, *p, C, *q])
        return [ctx.term(F, L.o + L.p + L.c + L.q, L.out, L.inp, 0)]
    if i != 1:
        raise Unsupported("the convolution's parameters have no derivative")
    U = torch.einsum(x, [Z, N, C, *q], *sel_ops, [Z, N, C, *p, *k])
    if not transposed:
        wl = L.o + L.c + L.k  # weight (cout, cg, *k)
        if groups == 1:
            return [ctx.term(U, L.n + L.c + L.p + L.k, L.out, wl, 1)]
        og, cg = cout // groups, cin // groups
        o = torch.arange(cout, device=x.device)
        idx = (o // og)[:, None] * cg + torch.arange(cg, device=x.device)[None, :]  # (cout, cg)
        Ug = U[:, :, idx]  # (z, n, cout, cg, *p, *k)
        return [ctx.term(Ug, L.n + L.o + L.c + L.p + L.k, L.out, wl, 1)]
    wl = L.c + L.o2 + L.k  # weight (cin, og, *k)
    og, cg = cout // groups, cin // groups
    if groups == 1:
        return [ctx.term(U, L.n + L.c + L.p + L.k, L.out, L.c + L.o + L.k, 1)]
    o = torch.arange(cout, device=x.device)
    c = torch.arange(cin, device=x.device)
    M = ((o[:, None, None] % og) == torch.arange(og, device=x.device)[None, None, :]) & (
        (c[None, :, None] // cg) == (o[:, None, None] // og)
    )
    factors = [(U, L.n + L.c + L.p + L.k), (M.to(x.dtype).unsqueeze(0), L.o + L.c + L.o2)]
    return [terms.from_factors(factors, L.out, wl, ys, ws, ctx.out)]


class _Letters:
    """Single-character letters for the terms of a convolution with ``nsp`` spatial axes."""

    def __init__(self, nsp: int) -> None:
        pool = iter("abdefghijlmrstuvwxyABDEFGHIJLMRSTUVWXY")
        self.n, self.o, self.c, self.o2 = "n", "o", "c", "O"
        self.p = "".join(next(pool) for _ in range(nsp))
        self.k = "".join(next(pool) for _ in range(nsp))
        self.q = "".join(next(pool) for _ in range(nsp))
        self.out = self.n + self.o + self.p
        self.inp = self.n + self.c + self.q
