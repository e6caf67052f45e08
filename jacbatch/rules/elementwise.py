"""Elementwise maps: diagonal Jacobians, and binary ops with broadcasting.

NOTE [Elementwise Jacobians are diagonal]
    For ``y = f(x)`` applied entrywise, ``∂y[a] / ∂x[c] = f'(x[a]) δ(a, c)``: one term whose
    factor is ``f'(x)`` (shape of ``x``) and whose output and input axes share letters. The
    derivatives below are written with the output ``y`` where that is cheaper (``tanh' = 1 - y²``,
    ``σ' = y (1 - y)``, ``exp' = y``), and match autograd's conventions at kinks
    (``relu'(0) = 0``, ``|x|'(0) = 0``) and at NaN (``relu'(NaN) = 1``: autograd zeroes the
    gradient where ``y <= 0``, which NaN is not).

NOTE [Broadcasting binary ops]
    For ``z = x ∘ y`` with ``x``, ``y`` broadcast to ``z``'s shape, ``∂z[a] / ∂x[c]`` is
    ``∂(x ∘ y)/∂x`` at ``a`` times a delta on the axes where ``x`` is not broadcast; along a
    broadcast axis (size 1 in ``x``) every output index reads the same ``x`` entry, so that
    output letter is free. ``add``/``sub`` have factor ``±alpha``, ``mul`` the other operand,
    ``div`` ``1/y`` and ``-z/y``, ``where(c, x, y)`` the mask ``c`` (resp. ``¬c``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .ops import OpContext, broadcast_letters, identity, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten

_Deriv = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: op -> f'(x) written in terms of (x, y = f(x)), as a tensor broadcastable to x.
UNARY: dict[object, _Deriv] = {
    aten.tanh.default: lambda x, y: 1 - y * y,
    aten.sigmoid.default: lambda x, y: y * (1 - y),
    aten.relu.default: lambda x, y: (~(y <= 0)).to(y.dtype),  # 1 at NaN, as autograd
    aten.exp.default: lambda x, y: y,
    aten.expm1.default: lambda x, y: y + 1,
    aten.log.default: lambda x, y: 1 / x,
    aten.log1p.default: lambda x, y: 1 / (1 + x),
    aten.sin.default: lambda x, y: torch.cos(x),
    aten.cos.default: lambda x, y: -torch.sin(x),
    aten.tan.default: lambda x, y: 1 + y * y,
    aten.sinh.default: lambda x, y: torch.cosh(x),
    aten.cosh.default: lambda x, y: torch.sinh(x),
    aten.atan.default: lambda x, y: 1 / (1 + x * x),
    aten.sqrt.default: lambda x, y: 0.5 / y,
    aten.rsqrt.default: lambda x, y: -0.5 * y * y * y,
    aten.reciprocal.default: lambda x, y: -y * y,
    aten.neg.default: lambda x, y: -torch.ones_like(y[:1]),
    aten.abs.default: lambda x, y: torch.sign(x),
    aten.erf.default: lambda x, y: (2 / math.sqrt(math.pi)) * torch.exp(-x * x),
    aten.silu.default: lambda x, y: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x))),
    aten.clone.default: lambda x, y: torch.ones_like(y[:1]),
    aten.alias.default: lambda x, y: torch.ones_like(y[:1]),
    aten.lift_fresh_copy.default: lambda x, y: torch.ones_like(y[:1]),
}


def _diagonal(ctx: OpContext, d: torch.Tensor, i: int = 0) -> list[Term]:
    """A diagonal Jacobian w.r.t. argument ``i`` (of the output's shape) with entries ``d``."""
    o = letters(len(ctx.out_shape))
    d = d.reshape(d.shape[0], *((1,) * (len(o) - d.ndim + 1)), *d.shape[1:])
    return [ctx.term(d, o, o, o, i)]


for _op, _f in UNARY.items():

    def _rule(ctx: OpContext, i: int, f: _Deriv = _f) -> list[Term]:
        """Diagonal Jacobian ``f'(x)`` (NOTE [Elementwise Jacobians are diagonal])."""
        return _diagonal(ctx, f(ctx.args[0], ctx.out))

    _rule.__name__ = _rule.__qualname__ = f"elementwise_{_op.overloadpacket.__name__}"  # type: ignore[attr-defined]
    register_op(_op)(_rule)


@register_op(aten.detach.default)
def detach(ctx: OpContext, i: int) -> list[Term]:
    """``detach`` stops gradients: a zero Jacobian, as autograd."""
    return []


@register_op(aten._to_copy.default)
def to_copy(ctx: OpContext, i: int) -> list[Term]:
    """A copy (device/layout change) keeps values: the identity. Dtype casts are not covered."""
    if ctx.args[0].dtype != ctx.out.dtype:
        raise Unsupported("dtype cast")
    return identity(ctx, 0)


@register_op(aten.pow.Tensor_Scalar)
def pow_scalar(ctx: OpContext, i: int) -> list[Term]:
    """``x ** c``: ``c x^(c-1)`` on the diagonal (zero for ``c = 0``, as autograd)."""
    x, c = ctx.args[0], ctx.args[1]
    if isinstance(c, complex) or not isinstance(c, (int, float)):
        raise Unsupported("non-real exponent")
    d = torch.zeros_like(x) if c == 0 else c * x.pow(c - 1)
    return _diagonal(ctx, d)


@register_op(aten.add.Tensor)
def add(ctx: OpContext, i: int) -> list[Term]:
    """``x + alpha y``: a broadcast identity, times ``alpha`` for ``y``."""
    return identity(ctx, i, 1 if i == 0 else ctx.kwargs.get("alpha", 1))


@register_op(aten.sub.Tensor)
def sub(ctx: OpContext, i: int) -> list[Term]:
    """``x - alpha y``: a broadcast identity, times ``-alpha`` for ``y``."""
    return identity(ctx, i, 1 if i == 0 else -ctx.kwargs.get("alpha", 1))


@register_op(aten.rsub.Scalar)
def rsub(ctx: OpContext, i: int) -> list[Term]:
    """``c - alpha x``: ``-alpha`` on the diagonal."""
    return identity(ctx, 0, -ctx.kwargs.get("alpha", 1))


def _binary_factor(ctx: OpContext, i: int, factor: torch.Tensor) -> list[Term]:
    """One term: a factor of the output's (broadcast) shape times the broadcast delta of arg ``i``."""
    o = letters(len(ctx.out_shape))
    return [ctx.term(factor, o, o, broadcast_letters(o, ctx.in_shape(i), ctx.out_shape), i)]


@register_op(aten.mul.Tensor)
def mul(ctx: OpContext, i: int) -> list[Term]:
    """Hadamard product ``x * y``: the other operand (NOTE [Broadcasting binary ops])."""
    return _binary_factor(ctx, i, ctx.aligned(1 - i))


@register_op(aten.div.Tensor)
def div(ctx: OpContext, i: int) -> list[Term]:
    """``x / y``: ``1 / y`` for ``x``; ``-z / y`` for ``y``."""
    y = ctx.aligned(1)
    if i == 0:
        return _binary_factor(ctx, 0, 1 / y)
    return _binary_factor(ctx, 1, -ctx.out / y)


@register_op(aten.where.self)
def where(ctx: OpContext, i: int) -> list[Term]:
    """``where(c, x, y)``: the mask ``c`` for ``x``, ``¬c`` for ``y``."""
    if i == 0:
        raise Unsupported("the condition of where has no derivative")
    c = ctx.aligned(0)
    mask = c if i == 1 else ~c
    return _binary_factor(ctx, i, mask.to(ctx.out.dtype))


def _arg(ctx: OpContext, k: int, name: str, default: object) -> object:
    return ctx.args[k] if len(ctx.args) > k else ctx.kwargs.get(name, default)


@register_op(aten.clamp.default)
def clamp(ctx: OpContext, i: int) -> list[Term]:
    """``clamp(x, lo, hi)``: 1 where ``lo <= x <= hi`` (bounds included, as autograd)."""
    x = ctx.args[0]
    lo, hi = _arg(ctx, 1, "min", None), _arg(ctx, 2, "max", None)
    if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
        raise Unsupported("clamp with tensor bounds")
    mask = torch.ones_like(x, dtype=torch.bool)
    if lo is not None:
        mask &= x >= lo
    if hi is not None:
        mask &= x <= hi
    return _diagonal(ctx, mask.to(x.dtype))


@register_op(aten.leaky_relu.default)
def leaky_relu(ctx: OpContext, i: int) -> list[Term]:
    """``leaky_relu(x, s)``: 1 for ``x > 0``, else ``s``."""
    x = ctx.args[0]
    s = float(_arg(ctx, 1, "negative_slope", 0.01))  # type: ignore[arg-type]
    return _diagonal(ctx, torch.where(x > 0, torch.ones_like(x), torch.full_like(x, s)))


@register_op(aten.softplus.default)
def softplus(ctx: OpContext, i: int) -> list[Term]:
    """``softplus(x, β, t) = log(1 + e^(βx)) / β``: ``σ(βx)``, and 1 where ``βx > t`` (linear)."""
    x = ctx.args[0]
    beta = float(_arg(ctx, 1, "beta", 1.0))  # type: ignore[arg-type]
    threshold = float(_arg(ctx, 2, "threshold", 20.0))  # type: ignore[arg-type]
    bx = x * beta
    return _diagonal(ctx, torch.where(bx > threshold, torch.ones_like(x), torch.sigmoid(bx)))


@register_op(aten.gelu.default)
def gelu(ctx: OpContext, i: int) -> list[Term]:
    """GELU: ``Φ(x) + x φ(x)`` (exact), or the derivative of its tanh approximation."""
    x = ctx.args[0]
    approximate = _arg(ctx, 1, "approximate", "none")
    if approximate == "none":
        cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
        pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
        return _diagonal(ctx, cdf + x * pdf)
    k_beta, k_kappa = math.sqrt(2 / math.pi), 0.044715
    t = torch.tanh(k_beta * (x + k_kappa * x * x * x))
    d = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k_beta * (1 + 3 * k_kappa * x * x)
    return _diagonal(ctx, d)


def _select(ctx: OpContext, i: int, larger: bool) -> list[Term]:
    # autograd: the gradient, halved on ties, zeroed where this operand loses; at NaN no
    # comparison holds, so both operands get 1 (NOTE [Non-finite values: one policy])
    a, b = ctx.aligned(i), ctx.aligned(1 - i)
    loses = (a < b) if larger else (a > b)
    dt = ctx.out.dtype
    factor = 1 - loses.to(dt) - 0.5 * (a == b).to(dt)
    return _binary_factor(ctx, i, factor)


@register_op(aten.maximum.default)
def maximum(ctx: OpContext, i: int) -> list[Term]:
    """``maximum(a, b)``: 1 where this operand is larger, 1/2 on ties (as autograd)."""
    return _select(ctx, i, larger=True)


@register_op(aten.minimum.default)
def minimum(ctx: OpContext, i: int) -> list[Term]:
    """``minimum(a, b)``: 1 where this operand is smaller, 1/2 on ties (as autograd)."""
    return _select(ctx, i, larger=False)


@register_op(aten.pow.Tensor_Tensor)
def pow_tensor(ctx: OpContext, i: int) -> list[Term]:
    """``x ** y``: ``y x^(y-1)`` for ``x``, ``x^y log x`` for ``y`` (0 where autograd has 0)."""
    x, y = ctx.aligned(0), ctx.aligned(1)
    zero = torch.zeros((), dtype=ctx.out.dtype, device=ctx.out.device)
    if i == 0:
        return _binary_factor(ctx, 0, torch.where(y == 0, zero, y * x.pow(y - 1)))
    return _binary_factor(ctx, 1, torch.where((x == 0) & (y >= 0), zero, ctx.out * torch.log(x)))


@register_op(aten.pow.Scalar)
def pow_base(ctx: OpContext, i: int) -> list[Term]:
    """``c ** x``: ``c^x log c`` on the diagonal (0 for ``c = 0``, as autograd)."""
    c = ctx.args[0]
    if isinstance(c, complex) or not isinstance(c, (int, float)):
        raise Unsupported("non-real base")
    y = ctx.out
    d = torch.zeros_like(y) if c == 0 else y * math.log(c) if c > 0 else y * float("nan")
    return _diagonal(ctx, d, 1)
