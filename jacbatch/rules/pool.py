"""Pooling and resampling: average pooling (fixed and adaptive), max pooling (fixed and
adaptive), and interpolation (nearest, linear, bilinear, bicubic, trilinear).

NOTE [Separable pooling and resampling]
    Average pooling and interpolation are linear maps that act on each spatial axis separately:
    ``y[.., p_1, .., p_k] = Σ_q Π_d A_d[p_d, q_d] x[.., q_1, .., q_k]``, so their Jacobian is one
    term with one small ``(P_d, Q_d)`` factor per spatial axis (NOTE [Per-axis maps] in
    :mod:`jacbatch.rules.shifts`) and deltas on the batch and channel axes.

    * ``avg_pool``: ``A[p, q] = [s_p <= q < e_p] / div_p`` for the window ``[p s - pad, ..)``
      clipped to the input, with ``div_p`` the window's size before clipping
      (``count_include_pad``) or after; both are products over axes, as in ATen's kernel;
      ``divisor_override`` replaces the product by one number;
    * ``adaptive_avg_pool``: windows ``[⌊p n / P⌋, ⌈(p + 1) n / P⌉)``, divided by their size;
    * interpolation: the weights depend on the mode, the sizes and the scales alone, so ``A_d``
      is read off the op itself, applied to the ``Q_d`` unit vectors along axis ``d`` (constant
      along the other axes, where every mode reproduces a constant): exactly the op's own
      index and weight arithmetic, whatever its rounding.

    Max pooling selects one entry per window: ``onehot(index)`` over the window's output
    position and the input's spatial positions, with the indices the op returns, recomputed
    from ``x`` with the same kernel (per plane, so a batched call picks what a per-sample call
    picks, ties included); one dense factor per plane pair, refused above :data:`DENSE_LIMIT`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .indexing import onehot
from .ops import OpContext, letters, register_op
from .shifts import axis_maps
from .terms import Term, Unsupported

aten = torch.ops.aten

#: Largest max-pooling factor (elements) built.
DENSE_LIMIT = 1 << 24


def _per_axis(v: Any, k: int, default: Sequence[int]) -> list[int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return [int(a) for a in default]
    if isinstance(v, int):
        return [v] * k
    v = [int(a) for a in v]
    return v * k if len(v) == 1 else v


def _arg(ctx: OpContext, k: int, name: str, default: Any) -> Any:
    return ctx.args[k] if len(ctx.args) > k else ctx.kwargs.get(name, default)


def _window(
    lo: torch.Tensor, hi: torch.Tensor, n: int, div: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """``(1, P, n)``: ``[lo_p <= q < hi_p] / div_p`` (``div_p = 0``: an empty row)."""
    q = torch.arange(n, device=like.device)
    hit = ((q[None, :] >= lo[:, None]) & (q[None, :] < hi[:, None])).to(like.dtype)
    return (hit / torch.where(div == 0, 1, div).to(like.dtype)[:, None]).unsqueeze(0)


def _avg_pool(ctx: OpContext, nsp: int) -> list[Term]:
    shape = ctx.in_shape(0)
    r = len(shape)
    K = _per_axis(ctx.args[1], nsp, ())
    S = _per_axis(_arg(ctx, 2, "stride", None), nsp, K)
    pad = _per_axis(_arg(ctx, 3, "padding", 0), nsp, [0] * nsp)
    include = bool(_arg(ctx, 5, "count_include_pad", True))
    override = _arg(ctx, 6, "divisor_override", None)
    x = ctx.out
    maps = {}
    for j in range(nsp):
        a = r - nsp + j
        n, P = shape[a], ctx.out_shape[a]
        start = torch.arange(P, device=x.device) * S[j] - pad[j]
        end = torch.clamp(start + K[j], max=n + pad[j])
        lo, hi = start.clamp(min=0), end.clamp(max=n)
        div = torch.ones_like(start) if override else (end - start if include else hi - lo)
        maps[a] = _window(lo, hi, n, div, x)
    if override:
        a0 = r - nsp
        maps[a0] = maps[a0] / float(override)
    return axis_maps(ctx, 0, maps)


@register_op(aten.avg_pool2d.default)
def avg_pool2d(ctx: OpContext, i: int) -> list[Term]:
    """``F.avg_pool2d`` (and ``avg_pool1d``) (NOTE [Separable pooling and resampling])."""
    return _avg_pool(ctx, 2)


@register_op(aten.avg_pool3d.default)
def avg_pool3d(ctx: OpContext, i: int) -> list[Term]:
    """``F.avg_pool3d`` (NOTE [Separable pooling and resampling])."""
    return _avg_pool(ctx, 3)


def _adaptive_avg(ctx: OpContext, nsp: int) -> list[Term]:
    shape = ctx.in_shape(0)
    r = len(shape)
    x = ctx.out
    maps = {}
    for j in range(nsp):
        a = r - nsp + j
        n, P = shape[a], ctx.out_shape[a]
        p = torch.arange(P, device=x.device)
        lo, hi = (p * n) // P, ((p + 1) * n + P - 1) // P
        maps[a] = _window(lo, hi, n, hi - lo, x)
    return axis_maps(ctx, 0, maps)


@register_op(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool2d.default)
def adaptive_avg_pool2d(ctx: OpContext, i: int) -> list[Term]:
    """``F.adaptive_avg_pool2d`` (and 1d) (NOTE [Separable pooling and resampling])."""
    return _adaptive_avg(ctx, 2)


@register_op(aten._adaptive_avg_pool3d.default, aten.adaptive_avg_pool3d.default)
def adaptive_avg_pool3d(ctx: OpContext, i: int) -> list[Term]:
    """``F.adaptive_avg_pool3d`` (NOTE [Separable pooling and resampling])."""
    return _adaptive_avg(ctx, 3)


_RESAMPLE = {
    aten.upsample_nearest1d: 1,
    aten.upsample_nearest2d: 2,
    aten.upsample_nearest3d: 3,
    aten._upsample_nearest_exact1d: 1,
    aten._upsample_nearest_exact2d: 2,
    aten._upsample_nearest_exact3d: 3,
    aten.upsample_linear1d: 1,
    aten.upsample_bilinear2d: 2,
    aten.upsample_bicubic2d: 2,
    aten.upsample_trilinear3d: 3,
    aten._upsample_bilinear2d_aa: 2,
    aten._upsample_bicubic2d_aa: 2,
}


def _resample_rule(op: Any, nsp: int) -> Any:
    def resample(ctx: OpContext, i: int) -> list[Term]:
        """Interpolation: ``A_d`` read off the op on unit vectors (NOTE [Separable pooling
        and resampling])."""
        shape = ctx.in_shape(0)
        r = len(shape)
        if r != nsp + 2:
            raise Unsupported("interpolation of an input without batch and channel axes")
        x = ctx.out
        sp = shape[2:]
        maps = {}
        for j in range(nsp):
            n = sp[j]
            view = [n, 1] + [1] * nsp
            view[2 + j] = n
            probe = torch.eye(n, dtype=x.dtype, device=x.device).reshape(view)
            probe = probe.expand(n, 1, *sp).contiguous()
            res = op(probe, *ctx.args[1:], **ctx.kwargs)[:, 0]  # (n, *P)
            res = res[(slice(None), *(slice(None) if k == j else 0 for k in range(nsp)))]
            if res.shape != (n, ctx.out_shape[2 + j]):
                raise Unsupported("interpolation sizes")
            maps[2 + j] = res.transpose(0, 1).unsqueeze(0)
        return axis_maps(ctx, 0, maps)

    resample.__name__ = resample.__qualname__ = "resample"
    return resample


for _packet, _nsp in _RESAMPLE.items():
    for _name in _packet.overloads():
        if _name in ("default", "vec"):
            _overload = getattr(_packet, _name)
            register_op(_overload)(_resample_rule(_overload, _nsp))


def _max_pool(ctx: OpContext, nsp: int, op: Any) -> list[Term]:
    """``onehot(index)`` over the spatial positions, indices recomputed with ``op``."""
    shape = ctx.in_shape(0)
    r = len(shape)
    if r < nsp + 1:
        raise Unsupported("max pooling of an input without a channel axis")
    x = ctx.args[0]
    sp_in = shape[-nsp:]
    Nin = math.prod(sp_in)
    size = x.shape[0] * math.prod(ctx.out_shape) * Nin
    if size > DENSE_LIMIT:
        raise Unsupported(f"a max-pooling factor of {size} elements")
    planes = x.reshape(-1, *shape[-(nsp + 1) :])
    _, idx = op(planes, *ctx.args[1:], **ctx.kwargs)
    idx = idx.reshape(x.shape[0], *ctx.out_shape)
    F = onehot(idx, Nin, ctx.out.dtype).reshape(x.shape[0], *ctx.out_shape, *sp_in)
    o = letters(r)
    q = letters(nsp, skip=o)
    inp = o[: r - nsp] + q
    return [ctx.term(F, o + q, o, inp, 0)]


@register_op(aten.max_pool2d_with_indices.default, output=0)
def max_pool2d(ctx: OpContext, i: int) -> list[Term]:
    """``F.max_pool2d`` (and 1d) (NOTE [Separable pooling and resampling])."""
    return _max_pool(ctx, 2, aten.max_pool2d_with_indices.default)


@register_op(aten.max_pool3d_with_indices.default, output=0)
def max_pool3d(ctx: OpContext, i: int) -> list[Term]:
    """``F.max_pool3d`` (NOTE [Separable pooling and resampling])."""
    return _max_pool(ctx, 3, aten.max_pool3d_with_indices.default)


@register_op(aten.adaptive_max_pool2d.default, output=0)
def adaptive_max_pool2d(ctx: OpContext, i: int) -> list[Term]:
    """``F.adaptive_max_pool2d`` (and 1d) (NOTE [Separable pooling and resampling])."""
    return _max_pool(ctx, 2, aten.adaptive_max_pool2d.default)


@register_op(aten.adaptive_max_pool3d.default, output=0)
def adaptive_max_pool3d(ctx: OpContext, i: int) -> list[Term]:
    """``F.adaptive_max_pool3d`` (NOTE [Separable pooling and resampling])."""
    return _max_pool(ctx, 3, aten.adaptive_max_pool3d.default)
