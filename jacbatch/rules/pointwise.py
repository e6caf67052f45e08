"""More elementwise maps: inverse trigonometric and other special functions, piecewise
activations, scalar-operand arithmetic and ternary ops (``addcmul``, ``lerp``; ``addcdiv`` is decomposed
when traced).

The rules of :mod:`jacbatch.rules.elementwise` in the same form (NOTE [Elementwise Jacobians
are diagonal], NOTE [Broadcasting binary ops]), kept apart so that module stays the core set.
Piecewise maps follow autograd's choice at their kinks (``hardtanh'`` is 0 at its bounds,
``elu'(0)`` takes the negative branch, ``fmax`` gives a tie to its first operand), and
piecewise-constant maps (``floor``, ``round``, ``sign`` ...) have a zero Jacobian, as autograd.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import terms
from .ops import OpContext, broadcast_letters, identity, letters, register_op
from .terms import Term, Unsupported

aten = torch.ops.aten

_Deriv = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _diagonal(ctx: OpContext, d: torch.Tensor, i: int = 0) -> list[Term]:
    """A diagonal Jacobian w.r.t. argument ``i`` (of the output's shape) with entries ``d``."""
    o = letters(len(ctx.out_shape))
    d = d.reshape(d.shape[0], *((1,) * (len(o) - d.ndim + 1)), *d.shape[1:])
    return [ctx.term(d, o, o, o, i)]


def _binary(ctx: OpContext, i: int, factor: torch.Tensor | float) -> list[Term]:
    """A factor of the output's (broadcast) shape times the broadcast delta of argument ``i``."""
    o = letters(len(ctx.out_shape))
    inp = broadcast_letters(o, ctx.in_shape(i), ctx.out_shape)
    if not isinstance(factor, torch.Tensor):
        return [ctx.term(factor, "", o, inp, i)]
    return [ctx.term(factor, o, o, inp, i)]


def _mask(m: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return m.to(like.dtype)


def _arg(ctx: OpContext, k: int, name: str, default: object) -> object:
    return ctx.args[k] if len(ctx.args) > k else ctx.kwargs.get(name, default)


def _num(ctx: OpContext, k: int, name: str, default: float) -> float:
    v = _arg(ctx, k, name, default)
    if isinstance(v, (torch.Tensor, complex)):
        raise Unsupported(f"a tensor or complex {name}")
    return float(v)  # type: ignore[arg-type]


_LN2, _LN10 = math.log(2.0), math.log(10.0)

#: op -> f'(x) in terms of (x, y = f(x)).
UNARY: dict[object, _Deriv] = {
    aten.asin.default: lambda x, y: torch.rsqrt(1 - x * x),
    aten.acos.default: lambda x, y: -torch.rsqrt(1 - x * x),
    aten.asinh.default: lambda x, y: torch.rsqrt(x * x + 1),
    aten.acosh.default: lambda x, y: torch.rsqrt(x * x - 1),
    aten.atanh.default: lambda x, y: 1 / (1 - x * x),
    aten.log2.default: lambda x, y: 1 / (x * _LN2),
    aten.log10.default: lambda x, y: 1 / (x * _LN10),
    aten.exp2.default: lambda x, y: y * _LN2,
    aten.erfc.default: lambda x, y: (-2 / math.sqrt(math.pi)) * torch.exp(-x * x),
    aten.erfinv.default: lambda x, y: (math.sqrt(math.pi) / 2) * torch.exp(y * y),
    aten.lgamma.default: lambda x, y: torch.digamma(x),
    aten.digamma.default: lambda x, y: torch.polygamma(1, x),
    aten.i0.default: lambda x, y: torch.special.i1(x),
    aten.deg2rad.default: lambda x, y: torch.full_like(y[:1], math.pi / 180),
    aten.rad2deg.default: lambda x, y: torch.full_like(y[:1], 180 / math.pi),
    aten.frac.default: lambda x, y: torch.ones_like(y[:1]),
    aten.nan_to_num.default: lambda x, y: _mask(torch.isfinite(x), y),
    aten.sinc.default: lambda x, y: torch.where(
        x == 0,
        torch.zeros_like(x),
        (math.pi * x * torch.cos(math.pi * x) - torch.sin(math.pi * x)) / (math.pi * x * x),
    ),
    aten.mish.default: lambda x, y: (
        torch.tanh(torch.nn.functional.softplus(x))
        + x * torch.sigmoid(x) * (1 - torch.tanh(torch.nn.functional.softplus(x)) ** 2)
    ),
    aten.hardsigmoid.default: lambda x, y: _mask((x > -3) & (x < 3), y) / 6,
    aten.hardswish.default: lambda x, y: torch.where(
        x < -3, torch.zeros_like(x), torch.where(x <= 3, x / 3 + 0.5, torch.ones_like(x))
    ),
}

#: Piecewise-constant maps: a zero Jacobian, as autograd.
ZERO = (
    aten.floor.default,
    aten.ceil.default,
    aten.trunc.default,
    aten.round.default,
    aten.round.decimals,
    aten.sign.default,
    aten.sgn.default,
    aten.div.Tensor_mode,
    aten.div.Scalar_mode,
)

for _op, _f in UNARY.items():

    def _rule(ctx: OpContext, i: int, f: _Deriv = _f) -> list[Term]:
        """Diagonal Jacobian ``f'(x)`` (NOTE [Elementwise Jacobians are diagonal])."""
        return _diagonal(ctx, f(ctx.args[0], ctx.out))

    _rule.__name__ = _rule.__qualname__ = f"elementwise_{_op.overloadpacket.__name__}"  # type: ignore[attr-defined]
    register_op(_op)(_rule)


@register_op(*ZERO)
def piecewise_constant(ctx: OpContext, i: int) -> list[Term]:
    """``floor``, ``round``, ``sign``, rounding division ...: zero almost everywhere."""
    return []


@register_op(aten.log_sigmoid_forward.default, output=0)
def log_sigmoid(ctx: OpContext, i: int) -> list[Term]:
    """``log σ(x)``: ``σ(-x)``."""
    return _diagonal(ctx, torch.sigmoid(-ctx.args[0]))


@register_op(aten.polygamma.default)
def polygamma(ctx: OpContext, i: int) -> list[Term]:
    """``polygamma(n, x)`` w.r.t. ``x``: ``polygamma(n + 1, x)``."""
    return _diagonal(ctx, torch.polygamma(int(ctx.args[0]) + 1, ctx.args[1]), 1)


@register_op(aten.mvlgamma.default)
def mvlgamma(ctx: OpContext, i: int) -> list[Term]:
    """``mvlgamma(x, p)``: ``Σ_{j < p} digamma(x - j/2)``."""
    x, p = ctx.args[0], int(ctx.args[1])
    return _diagonal(ctx, sum(torch.digamma(x - j / 2) for j in range(p)))  # type: ignore[arg-type]


@register_op(aten.logit.default)
def logit(ctx: OpContext, i: int) -> list[Term]:
    """``logit(x, eps)``: ``1 / (x (1 - x))``, 0 outside ``[eps, 1 - eps]`` when clamped."""
    x = ctx.args[0]
    eps = _arg(ctx, 1, "eps", None)
    d = 1 / (x * (1 - x))
    if eps is not None:
        d = torch.where((x < eps) | (x > 1 - eps), torch.zeros_like(x), d)  # type: ignore[operator]
    return _diagonal(ctx, d)


@register_op(aten.elu.default)
def elu(ctx: OpContext, i: int) -> list[Term]:
    """``elu(x, α, scale, input_scale)``: ``scale`` for ``x > 0``, else
    ``input_scale · α · scale · exp(input_scale · x)``."""
    x = ctx.args[0]
    alpha, scale = _num(ctx, 1, "alpha", 1.0), _num(ctx, 2, "scale", 1.0)
    s = _num(ctx, 3, "input_scale", 1.0)
    neg = s * alpha * scale * torch.exp(x * s)
    return _diagonal(ctx, torch.where(x <= 0, neg, torch.full_like(x, scale)))


@register_op(aten.celu.default)
def celu(ctx: OpContext, i: int) -> list[Term]:
    """``celu(x, α)``: 1 for ``x > 0``, else ``exp(x / α)``."""
    x = ctx.args[0]
    alpha = _num(ctx, 1, "alpha", 1.0)
    return _diagonal(ctx, torch.where(x <= 0, torch.exp(x / alpha), torch.ones_like(x)))


@register_op(aten.hardtanh.default)
def hardtanh(ctx: OpContext, i: int) -> list[Term]:
    """``hardtanh(x, lo, hi)``: 1 strictly inside ``(lo, hi)`` (and at NaN, as autograd)."""
    x = ctx.args[0]
    lo, hi = _num(ctx, 1, "min_val", -1.0), _num(ctx, 2, "max_val", 1.0)
    return _diagonal(ctx, _mask(~((x <= lo) | (x >= hi)), x))


@register_op(aten.threshold.default)
def threshold(ctx: OpContext, i: int) -> list[Term]:
    """``threshold(x, t, v)``: 1 where ``x > t``."""
    x = ctx.args[0]
    return _diagonal(ctx, _mask(~(x <= _num(ctx, 1, "threshold", 0.0)), x))


@register_op(aten.hardshrink.default, aten.softshrink.default)
def shrink(ctx: OpContext, i: int) -> list[Term]:
    """``hardshrink``/``softshrink(x, λ)``: 1 outside ``[-λ, λ]``."""
    x = ctx.args[0]
    lam = _num(ctx, 1, "lambd", 0.5)
    return _diagonal(ctx, _mask(~((x >= -lam) & (x <= lam)), x))


@register_op(aten.add.Scalar, aten.sub.Scalar)
def add_scalar(ctx: OpContext, i: int) -> list[Term]:
    """``x ± c``: the identity."""
    return identity(ctx, 0)


@register_op(aten.mul.Scalar)
def mul_scalar(ctx: OpContext, i: int) -> list[Term]:
    """``c x``: ``c`` on the diagonal."""
    return identity(ctx, 0, _num(ctx, 1, "other", 1.0))


@register_op(aten.div.Scalar)
def div_scalar(ctx: OpContext, i: int) -> list[Term]:
    """``x / c``: ``1 / c`` on the diagonal."""
    return identity(ctx, 0, 1.0 / _num(ctx, 1, "other", 1.0))


@register_op(aten.rsub.Tensor)
def rsub_tensor(ctx: OpContext, i: int) -> list[Term]:
    """``y - alpha x`` (``rsub(x, y)``): ``-alpha`` for ``x``, 1 for ``y``."""
    return identity(ctx, i, -ctx.kwargs.get("alpha", 1) if i == 0 else 1)


@register_op(aten.clamp_min.default)
def clamp_min(ctx: OpContext, i: int) -> list[Term]:
    """``clamp_min(x, c)``: 1 where ``x >= c``."""
    x = ctx.args[0]
    return _diagonal(ctx, _mask(x >= _num(ctx, 1, "min", 0.0), x))


@register_op(aten.clamp_max.default)
def clamp_max(ctx: OpContext, i: int) -> list[Term]:
    """``clamp_max(x, c)``: 1 where ``x <= c``."""
    x = ctx.args[0]
    return _diagonal(ctx, _mask(x <= _num(ctx, 1, "max", 0.0), x))


@register_op(aten.clamp_min.Tensor)
def clamp_min_tensor(ctx: OpContext, i: int) -> list[Term]:
    """``clamp_min(x, m)``: ``x`` where ``x >= m``, ``m`` where ``x < m``."""
    x, m = ctx.aligned(0), ctx.aligned(1)
    return _binary(ctx, i, _mask(x >= m if i == 0 else x < m, ctx.out))


@register_op(aten.clamp_max.Tensor)
def clamp_max_tensor(ctx: OpContext, i: int) -> list[Term]:
    """``clamp_max(x, m)``: ``x`` where ``x <= m``, ``m`` where ``x > m``."""
    x, m = ctx.aligned(0), ctx.aligned(1)
    return _binary(ctx, i, _mask(x <= m if i == 0 else x > m, ctx.out))


@register_op(aten.logaddexp.default)
def logaddexp(ctx: OpContext, i: int) -> list[Term]:
    """``log(e^x + e^y)``: ``1 / (1 + e^(other - this))``."""
    a, b = ctx.aligned(i), ctx.aligned(1 - i)
    return _binary(ctx, i, 1 / (1 + torch.exp(b - a)))


@register_op(aten.logaddexp2.default)
def logaddexp2(ctx: OpContext, i: int) -> list[Term]:
    """``log2(2^x + 2^y)``: ``1 / (1 + 2^(other - this))``."""
    a, b = ctx.aligned(i), ctx.aligned(1 - i)
    return _binary(ctx, i, 1 / (1 + torch.pow(2.0, b - a)))


@register_op(aten.atan2.default)
def atan2(ctx: OpContext, i: int) -> list[Term]:
    """``atan2(y, x)``: ``x / (x² + y²)`` for ``y``, ``-y / (x² + y²)`` for ``x``."""
    y, x = ctx.aligned(0), ctx.aligned(1)
    r = 1 / (x * x + y * y)
    return _binary(ctx, i, x * r if i == 0 else -y * r)


@register_op(aten.hypot.default)
def hypot(ctx: OpContext, i: int) -> list[Term]:
    """``√(x² + y²)``: this operand over the result."""
    return _binary(ctx, i, ctx.aligned(i) / ctx.out)


@register_op(aten.xlogy.Tensor)
def xlogy(ctx: OpContext, i: int) -> list[Term]:
    """``x log y``: ``log y`` (0 where ``x = 0`` and ``y <= 0``) for ``x``; ``x / y`` for ``y``."""
    x, y = ctx.aligned(0), ctx.aligned(1)
    if i == 0:
        zero = torch.zeros((), dtype=y.dtype, device=y.device)
        return _binary(ctx, 0, torch.where((x == 0) & (y <= 0), zero, torch.log(y)))
    return _binary(ctx, 1, x / y)


def _select_first(ctx: OpContext, i: int, larger: bool) -> list[Term]:
    a, b = ctx.aligned(0), ctx.aligned(1)
    first = ((a >= b) if larger else (a <= b)) | b.isnan()
    return _binary(ctx, i, _mask(first if i == 0 else ~first, ctx.out))


@register_op(aten.fmax.default)
def fmax(ctx: OpContext, i: int) -> list[Term]:
    """``fmax(a, b)``: to ``a`` where ``a >= b`` or ``b`` is NaN, else to ``b`` (as autograd)."""
    return _select_first(ctx, i, larger=True)


@register_op(aten.fmin.default)
def fmin(ctx: OpContext, i: int) -> list[Term]:
    """``fmin(a, b)``: to ``a`` where ``a <= b`` or ``b`` is NaN, else to ``b`` (as autograd)."""
    return _select_first(ctx, i, larger=False)


@register_op(aten.copysign.Tensor, aten.copysign.Scalar)
def copysign(ctx: OpContext, i: int) -> list[Term]:
    """``copysign(x, s)``: ``±1`` (``out / x``, 0 where ``x = 0``) for ``x``; none for ``s``."""
    if i != 0:
        return []
    x = ctx.aligned(0)
    r = ctx.out / x
    return _binary(ctx, 0, torch.where(x == 0, torch.zeros_like(r), r))


def _rounded_quotient(ctx: OpContext, i: int, mode: str) -> list[Term]:
    if i == 0:
        return identity(ctx, 0)
    x, y = ctx.aligned(0), ctx.aligned(1)
    return _binary(ctx, 1, -torch.div(x, y, rounding_mode=mode))


@register_op(aten.fmod.Tensor)
def fmod(ctx: OpContext, i: int) -> list[Term]:
    """``fmod(x, y) = x - trunc(x / y) y``: 1 for ``x``, ``-trunc(x / y)`` for ``y``."""
    return _rounded_quotient(ctx, i, "trunc")


@register_op(aten.remainder.Tensor)
def remainder(ctx: OpContext, i: int) -> list[Term]:
    """``remainder(x, y) = x - floor(x / y) y``: 1 for ``x``, ``-floor(x / y)`` for ``y``."""
    return _rounded_quotient(ctx, i, "floor")


@register_op(aten.fmod.Scalar, aten.remainder.Scalar)
def fmod_scalar(ctx: OpContext, i: int) -> list[Term]:
    """``fmod(x, c)``, ``remainder(x, c)``: the identity almost everywhere."""
    return identity(ctx, 0)


@register_op(aten.lerp.Scalar, aten.lerp.Tensor)
def lerp(ctx: OpContext, i: int) -> list[Term]:
    """``a + w (b - a)``: ``1 - w`` for ``a``, ``w`` for ``b``, ``b - a`` for a tensor ``w``."""
    w = ctx.aligned(2)
    if i == 0:
        return _binary(ctx, 0, 1 - w)
    if i == 1:
        return _binary(ctx, 1, w)
    return _binary(ctx, 2, ctx.aligned(1) - ctx.aligned(0))


@register_op(aten.addcmul.default)
def addcmul(ctx: OpContext, i: int) -> list[Term]:
    """``s + v t1 t2``: 1 for ``s``; ``v t2`` for ``t1``, ``v t1`` for ``t2``."""
    if i == 0:
        return identity(ctx, 0)
    v = _num(ctx, 3, "value", 1.0)
    return _binary(ctx, i, v * ctx.aligned(3 - i))


@register_op(
    aten.zeros_like.default,
    aten.ones_like.default,
    aten.full_like.default,
    aten.empty_like.default,
    aten.new_zeros.default,
    aten.new_ones.default,
    aten.new_full.default,
    aten.new_empty.default,
)
def constant_like(ctx: OpContext, i: int) -> list[Term]:
    """``zeros_like(x)``, ``x.new_full(..)`` ...: values that do not depend on ``x``: zero."""
    return []


@register_op(aten.glu.default)
def glu(ctx: OpContext, i: int) -> list[Term]:
    """``glu(x, dim) = a σ(b)`` for the halves ``a``, ``b`` of ``x`` along ``dim``: ``σ(b)`` on
    ``a``'s half and ``a σ(b) (1 - σ(b))`` on ``b``'s, each a diagonal times the 0/1 map
    from the output's axis to that half."""
    shape = ctx.in_shape(0)
    n = len(shape)
    d = int(_num(ctx, 1, "dim", -1)) % n
    h = shape[d] // 2
    x = ctx.args[0]
    a, b = x.narrow(1 + d, 0, h), x.narrow(1 + d, h, h)
    s = torch.sigmoid(b)
    o = letters(n)
    c = letters(1, skip=o)
    inp = o[:d] + c + o[d + 1 :]
    res = []
    for k, g in ((0, s), (1, a * s * (1 - s))):
        S = torch.zeros(1, h, 2 * h, dtype=x.dtype, device=x.device)
        S[0, torch.arange(h), k * h + torch.arange(h)] = 1
        res.append(terms.from_factors([(g, o), (S, o[d] + c)], o, inp, ctx.out_shape, shape, x))
    return res


@register_op(aten._prelu_kernel.default)
def prelu(ctx: OpContext, i: int) -> list[Term]:
    """``prelu(x, w)``: 1 for ``x > 0``, else ``w``; w.r.t. ``w``: ``x`` where ``x <= 0``."""
    x, w = ctx.aligned(0), ctx.aligned(1)
    pos = x > 0
    if i == 0:
        return _binary(ctx, 0, torch.where(pos, torch.ones_like(w * x), w))
    return _binary(ctx, 1, torch.where(pos, torch.zeros_like(x), x))


@register_op(aten.clamp.Tensor)
def clamp_tensor(ctx: OpContext, i: int) -> list[Term]:
    """``clamp(x, lo, hi)`` with tensor bounds: ``x`` where ``lo <= x <= hi``; ``lo`` where
    ``x < lo < hi``; ``hi`` where ``x > hi`` or ``hi < lo`` (autograd's split)."""
    x = ctx.aligned(0)
    lo = ctx.aligned(1) if ctx.args[1] is not None else None
    hi = ctx.aligned(2) if len(ctx.args) > 2 and ctx.args[2] is not None else None
    if i == 0:
        keep = torch.ones_like(x, dtype=torch.bool)
        if lo is not None:
            keep = keep & (x >= lo)
        if hi is not None:
            keep = keep & (x <= hi)
        return _binary(ctx, 0, _mask(keep, ctx.out))
    if i == 1:
        assert lo is not None
        m = x < lo if hi is None else (x < lo) & (lo < hi)
        return _binary(ctx, 1, _mask(m, ctx.out))
    assert hi is not None
    m = x > hi if lo is None else (x > hi) | (hi < lo)
    return _binary(ctx, 2, _mask(m, ctx.out))
